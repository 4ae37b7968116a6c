"""The native backend (runtime/native_backend.py) and its build helper (runtime/native_build.py): the C file's
env-step API against the Python Policy, portable builds, refusal of non-finite input, the torch-free load,
the per-user build cache and the one-line errors (no compiler, a changed file, another export's manifest).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import cli
from contract.errors import DMMError
from contract.manifest import manifest_path_for
from runtime import Policy, load_backend
from runtime.native_backend import BASE_FLAGS, NativeLibrary, build_policy_library, compile_flags
from runtime.native_build import build_shared_library
from tests.helpers import REPO_ROOT, assert_one_line_error, copy_c_export, write_checkpoint


@pytest.fixture(autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def library(c_export):
    return NativeLibrary(build_policy_library(c_export, c_export.with_suffix(".h")), "hopper")

def test_env_step_api_matches_the_python_policy(library, c_export):
    """hopper_step (normalisation, rtg, clipping in C) == runtime.Policy on the graph-level API, bitwise."""
    rng = np.random.default_rng(5)
    observations = rng.normal(size=(40, 11)) * 2
    rewards = rng.uniform(0, 4, size=40)
    with load_backend(c_export) as backend:
        policy = Policy(backend, target_return=1800.0)
        expected = np.asarray([policy.act(o, r) for o, r in zip(observations, rewards, strict=True)])
    library.reset(1800.0)
    actions = np.asarray([library.step(o, r).copy() for o, r in zip(observations, rewards, strict=True)])
    np.testing.assert_array_equal(actions, expected)

def test_portable_baseline_build_agrees_with_this_machines_level(library, c_export, monkeypatch):
    """The build for the x86-64 baseline (SSE2: 4-wide vectors, no FMA), as on a CPU without AVX, gives the
    same actions within float rounding: the sums are taken in the same order, only contraction differs."""
    monkeypatch.setenv("DMM_NATIVE_ISA", "baseline")
    assert not any(flag.startswith("-march") for flag in compile_flags())
    baseline = NativeLibrary(build_policy_library(c_export, c_export.with_suffix(".h")), "hopper")
    assert baseline.path != library.path
    observations = np.random.default_rng(8).normal(size=(200, 11))
    actions = {}
    for name, built in (("native", library), ("baseline", baseline)):
        built.reset(3600.0)
        actions[name] = np.asarray([built.step(o, 1.0).copy() for o in observations])
    difference = float(np.abs(actions["native"] - actions["baseline"]).max())
    print(f"baseline vs {library.path.parent.name} build over 200 steps: max |diff| {difference:.2e}")
    assert difference < 1e-6

def test_non_finite_inputs_are_refused_and_leave_the_state_as_it_was(library):
    observations = np.random.default_rng(6).normal(size=(6, 11))

    def run(bad_step: np.ndarray | None) -> np.ndarray:
        library.reset(3600.0)
        actions = []
        for index, observation in enumerate(observations):
            if index == 3 and bad_step is not None:
                with pytest.raises(DMMError, match="non-finite"):
                    library.step(bad_step, 1.0)
            actions.append(library.step(observation, 1.0).copy())
        return np.asarray(actions)

    clean = run(None)
    for bad in (np.full(11, np.nan), np.r_[np.inf, np.zeros(10)], np.full(11, 1e300)):  # 1e300 overflows float
        np.testing.assert_array_equal(run(bad), clean)
    library.reset(3600.0)
    library.step(observations[0], 1.0)
    with pytest.raises(DMMError, match="non-finite"):
        library.step(observations[1], float("nan"))
    with pytest.raises(DMMError, match="target return"):
        library.reset(float("inf"))

def test_backend_runs_without_torch(c_export):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        import numpy as np
        from runtime import Policy, load_backend
        with load_backend({str(c_export)!r}) as backend:
            policy = Policy(backend)
            print(policy.act(np.zeros(11), 0.0).tolist())
        assert "dmm_train.model" not in sys.modules and "onnxruntime" not in sys.modules
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout.strip().splitlines()[-1])) == 3

def test_library_is_built_once_per_content(c_export, tmp_path, monkeypatch):
    monkeypatch.setenv("DMM_CACHE_DIR", str(tmp_path / "cache"))
    header = c_export.with_suffix(".h")
    first = build_policy_library(c_export, header)
    assert build_policy_library(c_export, header) == first
    assert not list((tmp_path / "cache").rglob(".build-*"))
    other = tmp_path / "other"
    other.mkdir()
    copy = copy_c_export(c_export, other)
    copy.with_suffix(".h").write_text(header.read_text() + "\n/* changed */\n")
    assert build_policy_library(copy, copy.with_suffix(".h")) != first  # the header is part of the key
    with pytest.raises(DMMError, match="failed"):
        broken = tmp_path / "broken.c"
        broken.write_text("int f(void) { return }\n")
        build_shared_library([broken], library_name="libbroken.so", subdir="test", flags=BASE_FLAGS)

def test_run_and_parity_errors_are_one_line(capsys, c_export, checkpoint_path, engines, tmp_path):
    tampered = copy_c_export(c_export, tmp_path)
    tampered.write_text(tampered.read_text().replace("0x", "-0x", 1))
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(tampered)]), "sha256 of hopper-c.c", "re-export")
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(tmp_path / "none.c")]), "does not exist")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(c_export, foreign / "hopper.c")
    shutil.copy(c_export.with_suffix(".h"), foreign / "hopper.h")
    shutil.copy(manifest_path_for(engines["stream"]), foreign / "hopper.json")
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(foreign / "hopper.c")]),
                          "expected a C export's manifest (target c)")
    # No compiler: $CC pointing nowhere, or none on PATH; an empty cache, so that a build is needed.
    script = f"import cli, sys; sys.exit(cli.main(['run', '--engine', {str(c_export)!r}, '--episodes', '1']))"
    environment = {key: value for key, value in os.environ.items() if key != "CC"}
    environment["DMM_CACHE_DIR"] = str(tmp_path / "empty-cache")
    (tmp_path / "no-bin").mkdir()
    for extra, fragment in (({"CC": "/no-such-compiler"}, "/no-such-compiler"),
                            ({"PATH": str(tmp_path / "no-bin")}, "no C compiler found")):
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=120, env={**environment, **extra})
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "compiled on first use" in result.stderr and fragment in result.stderr, result.stderr
    other = write_checkpoint(tmp_path / "other", seed=1)
    code = cli.main(["parity", "--checkpoint", str(other), "--onnx", str(c_export), "--steps", "3"])
    assert_one_line_error(capsys, code, "exported from another checkpoint")
