"""bench/gpu_check.sh and bench/gpu_check.py: refused clearly without a GPU; the parts that need none (the
trainer's timing loop on the CPU, the tables) run here."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import numpy as np
import pytest

from runtime.latency import LatencyStats
from tests.helpers import REPO_ROOT, dataset_checkpoint


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="nvidia-smi is here: the check would run")
def test_the_script_refuses_clearly_without_a_gpu():
    result = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: bench/gpu_check.sh needs an NVIDIA GPU")


def test_the_python_part_refuses_clearly_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--out", "/dev/null"],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 2 and "error: no CUDA device for torch" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_training_timer_runs_the_trainers_loop(tmp_path_factory, tmp_path):
    _, dataset = dataset_checkpoint(tmp_path_factory)
    seconds = _bench().time_training("bc", dataset, "cpu", 5, tmp_path)
    assert len(seconds) == 5 and all(s > 0 for s in seconds)
    assert (tmp_path / "bc-cpu" / "model.pt").is_file()  # a real run of 'train --model bc'


def test_the_tables_have_benchmarks_form():
    bench = _bench()
    stats = LatencyStats.from_ns(np.array([900_000, 1_000_000, 1_100_000]))
    text = bench.markdown("GPU X", "bash bench/gpu_check.sh",
                          [{"model": "dmm", "cuda_ms": 4.0, "cpu_ms": 40.0, "speedup": 10.0}],
                          [{"mode": "window", "path": "torch cuda", "stats": stats, "x_cpu": 3.0, "max_abs": 1e-7}])
    assert "| dmm | 4.00 | 40.0 | **10.0x** |" in text
    assert "| window | torch cuda | 1000.0 | " in text and "| 3.0x | 1.0e-07 |" in text
    assert text.startswith("## GPU without TensorRT") and "Machine: GPU X" in text
