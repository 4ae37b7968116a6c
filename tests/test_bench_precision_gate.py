"""bench/precision_gate.py: the gate's two error rates from pools of real paired episodes of a real checkpoint."""

from __future__ import annotations

import importlib.util

import pytest

from contract.errors import DMMError
from tests.helpers import REPO_ROOT, dataset_checkpoint


def _bench():
    spec = importlib.util.spec_from_file_location("precision_gate", REPO_ROOT / "bench" / "precision_gate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gate_bench_measures_both_errors_per_setting(tmp_path_factory, capsys):
    checkpoint, _ = dataset_checkpoint(tmp_path_factory)
    rows = _bench().main(["--checkpoint", str(checkpoint), "--pool", "10", "--drops", "1", "50", "--caps", "20",
                          "--resamples", "100"])
    out = capsys.readouterr().out
    assert [(row["drop"], row["cap"]) for row in rows] == [(1.0, 20), (50.0, 20)]
    for row in rows:
        for rate in ("good_refused", "worse_passed", "boundary_passed"):
            assert 0.0 <= row[rate] <= 1.0
        assert 10 <= row["episodes"] <= 20 and row["seconds"] > 0
    # A drop of 50 points allows far more than the pools' spread: the good graph passes at the first look.
    assert rows[1]["good_refused"] == 0.0 and rows[1]["episodes"] == 10
    assert "paired deltas: fp16" in out and "fp32: 10 episodes" in out
    with pytest.raises(DMMError, match="--pool 5"):
        _bench().main(["--checkpoint", str(checkpoint), "--pool", "5"])
