"""Operating-system failures, bad datasets and huge sizes are one line, never a traceback or a crash.

Real file systems stand in for the failures (the tests may run as root, whom permissions do not stop):
a tiny tmpfs for a full disk, a read-only tmpfs for a read-only directory. The tests that need them
are skipped where mounting is not allowed.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import cli
from tests.helpers import assert_one_line_error, copy_engine, edit_manifest

LONG_NAME = "n" * 300  # longer than any common file system's 255-byte name limit


def _mount(directory: Path, options: str) -> Path:
    directory.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode})")
    return directory


@pytest.fixture
def full_dir(tmp_path):
    """A directory on a 256 KiB file system that is already full."""
    directory = _mount(tmp_path / "full", "size=256k")
    try:
        with open(directory / "filler", "wb") as filler:
            try:
                while True:
                    filler.write(b"\0" * 4096)
                    filler.flush()
            except OSError:
                pass
    except OSError:
        pass
    yield directory
    subprocess.run(["umount", "-l", str(directory)], check=False)


@pytest.fixture
def small_dir(tmp_path):
    """A directory on a 256 KiB file system: room to start writing, not to finish a dataset."""
    directory = _mount(tmp_path / "small", "size=256k")
    yield directory
    subprocess.run(["umount", "-l", str(directory)], check=False)


@pytest.fixture
def readonly_dir(tmp_path):
    directory = _mount(tmp_path / "readonly", "ro,size=64k")
    yield directory
    subprocess.run(["umount", "-l", str(directory)], check=False)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    from dmm_train.recipes import collect

    return collect("Hopper-v5", "test/os-small-v0", policy="random", episodes=4, seed=0,
                   out=tmp_path_factory.mktemp("os-store"))


# -- collect: the Minari writer ------------------------------------------------------------------------


def test_collect_into_a_full_disk_is_one_line_and_leaves_no_staging(capsys, small_dir):
    # Before: HDF5 crashed the process at close (segfault, rc 139) after pages of warnings.
    store = small_dir / "store"
    code = cli.main(["collect", "--policy", "random", "--episodes", "30", "--dataset-id", "test/full-v0",
                     "--out", str(store), "--quiet"])
    assert_one_line_error(capsys, code, str(store), "No space left on device")
    assert not [p.name for p in store.iterdir() if p.is_dir()], "a staging or dataset directory was left"


def test_collect_into_a_read_only_directory_is_one_line(capsys, readonly_dir):
    store = readonly_dir / "store"
    code = cli.main(["collect", "--policy", "random", "--episodes", "2", "--out", str(store), "--quiet"])
    assert_one_line_error(capsys, code, str(store), "read-only")


def test_collect_into_a_file_or_a_long_name_is_one_line(capsys, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a store")
    code = cli.main(["collect", "--policy", "random", "--episodes", "2", "--out", str(a_file), "--quiet"])
    assert_one_line_error(capsys, code, str(a_file))
    code = cli.main(["collect", "--policy", "random", "--episodes", "2", "--out", str(tmp_path / LONG_NAME),
                     "--quiet"])
    assert_one_line_error(capsys, code, LONG_NAME, "too long")


# -- train ---------------------------------------------------------------------------------------------


def test_train_into_a_full_disk_names_the_run_directory(capsys, small_dataset, full_dir):
    # Before: the run lock's buffered write failed again at close, with no path: "cannot use '?'".
    out = full_dir / "run"
    code = cli.main(["train", "--dataset", str(small_dataset), "--steps", "2", "--out", str(out), "--quiet"])
    assert_one_line_error(capsys, code, str(out), "No space left on device")


def test_train_into_a_read_only_directory_a_file_or_a_long_name_is_one_line(capsys, small_dataset, readonly_dir,
                                                                             tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a run directory")
    for out, fragment in ((readonly_dir / "run", "read-only"), (a_file, "another kind"),
                          (tmp_path / LONG_NAME, "too long")):
        code = cli.main(["train", "--dataset", str(small_dataset), "--steps", "2", "--out", str(out), "--quiet"])
        assert_one_line_error(capsys, code, str(out), fragment)


# -- export --------------------------------------------------------------------------------------------


def test_export_into_a_full_or_read_only_directory_is_one_line(capsys, checkpoint_path, full_dir, readonly_dir):
    for out, fragment in ((full_dir / "hopper", "No space left on device"), (readonly_dir / "hopper", "read-only")):
        code = cli.main(["export", "--checkpoint", str(checkpoint_path), "--out", str(out), "--no-engine"])
        assert_one_line_error(capsys, code, str(out.parent), fragment)


# -- datasets with non-finite values --------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("rewards", np.inf), ("observations", np.nan)])
def test_a_dataset_with_a_non_finite_value_is_refused_with_its_episode_and_step(capsys, tmp_path, field, value):
    # Before: an inf reward trained silently (NaN normalisation stats, a useless policy).
    from dmm_train.minari_writer import write_minari_dataset
    from dmm_train.rollouts import rollout_batched

    rollouts = rollout_batched("Hopper-v5", "random", n_steps=60, seed=0)
    assert len(rollouts) >= 2 and len(rollouts[1]) > 3
    poisoned = getattr(rollouts[1], field).copy()
    poisoned[3] = value
    rollouts[1] = dataclasses.replace(rollouts[1], **{field: poisoned})
    path = write_minari_dataset("test/poisoned-v0", rollouts, "Hopper-v5", algorithm_name="random",
                                description="one non-finite value", data_path=tmp_path / "store")
    code = cli.main(["train", "--dataset", str(path), "--steps", "2", "--out", str(tmp_path / "run"), "--quiet"])
    assert_one_line_error(capsys, code, "episode 1 step 3", field)


# -- sizes checked before allocating --------------------------------------------------------------------


def test_huge_counts_are_one_line(capsys, checkpoint_path, engines):
    # Before: parity tried to allocate 80 TiB; eval built one env per episode until memory ran out.
    code = cli.main(["parity", "--checkpoint", str(checkpoint_path), "--onnx", str(engines["stream"]),
                     "--steps", str(10**12)])
    assert_one_line_error(capsys, code, "--steps 1000000000000", "at most")
    code = cli.main(["eval", "--checkpoint", str(checkpoint_path), "--episodes", str(10**12)])
    assert_one_line_error(capsys, code, "--episodes 1000000000000", "at most")
    code = cli.main(["run", "--engine", str(engines["stream"]), "--episodes", str(10**12)])
    assert_one_line_error(capsys, code, "--episodes 1000000000000", "expected 1 to 100,000")
    code = cli.main(["export", "--checkpoint", str(checkpoint_path), "--int8", "--calibration-windows",
                     str(10**12), "--out", str(checkpoint_path.parent / "huge")])
    assert_one_line_error(capsys, code, "--calibration-windows 1000000000000", "at most 100,000")


def test_parity_reports_observation_range_faults_instead_of_stopping(capsys, checkpoint_path, engines, tmp_path):
    # A graph whose recorded observation range is nearly a single point: every real observation
    # leaves it. Before: parity stopped at the first step with the control loop's range fault.
    engine = copy_engine(engines["stream"], tmp_path)
    edit_manifest(engine, observation_low=[-1e-3] * 11, observation_high=[1e-3] * 11)
    code = cli.main(["parity", "--checkpoint", str(checkpoint_path), "--onnx", str(engine), "--steps", "12",
                     "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["steps"] == 12 and report["pairs"]
    assert report["observation_range_faults"] == {"steps": 12, "first_step": 0}
    assert "12 of 12 recorded steps outside" in captured.err
