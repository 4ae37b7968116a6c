"""bench/precision_gate.py: the gate's refusals over seeds, on a real checkpoint and dataset."""

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


def test_the_gate_bench_judges_each_seed_by_both_gates(tmp_path_factory, capsys):
    checkpoint, dataset = dataset_checkpoint(tmp_path_factory)
    old, new = _bench().main(["--checkpoint", str(checkpoint), "--dataset", str(dataset), "--seeds", "2",
                              "--score-episodes", "2"])
    out = capsys.readouterr().out
    assert 0 <= new <= old <= 2 and f"interval gate {new}/2" in out.splitlines()[-1]
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 2
    with pytest.raises(DMMError, match="--score-episodes 1"):
        _bench().main(["--checkpoint", str(checkpoint), "--score-episodes", "1"])
