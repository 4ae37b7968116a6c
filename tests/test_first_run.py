"""cli.py tour: the first run's whole path (estimate, training, fp16 graph and C step, runs, summary), resumable."""

from __future__ import annotations

import re

import pytest

import cli
from tests.helpers import c_compiler, one_torch_thread


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """A real random-policy Hopper-v5 Minari dataset, small enough to train on in seconds."""
    from dmm_train.recipes import collect

    return collect("Hopper-v5", "test/tour-hopper-v0", policy="random", episodes=20, seed=5,
                   out=tmp_path_factory.mktemp("tour-store") / "store")


def _tour(capsys, out, dataset) -> str:
    with one_torch_thread():
        code = cli.main(["tour", "--steps", "20", "--out", str(out), "--episodes", "1", "--dataset", str(dataset),
                         "--threads", "1", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_tour_trains_exports_runs_and_resumes(tmp_path, capsys, small_dataset):
    c_compiler()
    out = tmp_path / "tour"
    first = _tour(capsys, out, small_dataset)

    estimate = re.search(r"estimate: about \d+ (s|min|h) \((\d+) ms/step measured x 20 steps", first)
    assert estimate, first
    assert first.index("estimate: about") < first.index("train: starting") < first.index("wrote ")
    summary = first[first.index("summary:"):]
    for backend in (r"onnx fp(16|32)", r"c"):
        assert re.search(rf"\n  {backend}: normalised score -?\d+\.\d .*latency p50 \d+\.\d+ ms  p99 \d+\.\d+ ms",
                         summary), summary
    files = [line.strip() for line in summary.split("files:\n")[1].split("next:")[0].splitlines()]
    written = [line for line in files if " " not in line]
    assert any(line.endswith(".onnx") for line in written) and any(line.endswith(".c") for line in written), files
    for path in written:
        assert (out / path.split("/")[-1]).is_file(), path
    assert "python cli.py run --engine " + str(out) in summary
    assert "python cli.py export --int8" in summary and "python cli.py build " in summary
    stamps = {path: (out / path.split("/")[-1]).stat().st_mtime_ns for path in written}

    second = _tour(capsys, out, small_dataset)
    assert "already finished at step 20; training skipped" in second, second
    assert "train: starting" not in second and "wrote " + str(out / "model.pt") not in second
    assert second.count("already an export of this checkpoint; reused") == 2, second
    assert {path: (out / path.split("/")[-1]).stat().st_mtime_ns for path in written} == stamps
    assert re.search(r"\n  c: normalised score .*reused", second), second


def test_short_tour_has_its_own_directory():
    """A short first look never shares the official run's directory (a later full run would resume its settings)."""
    from dmm_train.config import TrainConfig
    from export.tour import default_tour_dir

    assert default_tour_dir(TrainConfig()) == TrainConfig().run_dir()
    short = default_tour_dir(TrainConfig(steps=5000))
    assert short != TrainConfig().run_dir() and short.name.endswith("-5000steps"), short
