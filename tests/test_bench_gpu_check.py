"""bench/gpu_check.sh and bench/gpu_check.py: usage errors and the refusal without a GPU in one line, the
wheel-folder check, the tables, and the dry run end to end on this machine (every GPU step "no GPU")."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

SCRIPT = str(REPO_ROOT / "bench" / "gpu_check.sh")
STEPS = ["env", "wheels", "pycuda", "cuda-python", "cuda-tests", "doctor", "training", "latency"]


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def test_help_and_usage_errors():
    result = _run("--help")
    assert result.returncode == 0 and "--python PY --out DIR [--wheels DIR] [--dry-run]" in result.stdout
    for args, fragment in ((("--out", "x"), "no --python given"), (("--python", sys.executable), "no --out given"),
                           (("--python", "no-such-python", "--out", "x"), "is not an executable"),
                           (("--bogus",), "unknown argument --bogus")):
        result = _run(*args)
        assert result.returncode == 2 and result.stdout == "", args
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and fragment in result.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="nvidia-smi is here: the check would run")
def test_without_a_gpu_only_the_dry_run_runs(tmp_path):
    result = _run("--python", sys.executable, "--out", str(tmp_path))
    assert result.returncode == 2 and "error: bench/gpu_check.sh needs an NVIDIA GPU" in result.stderr
    assert "--dry-run" in result.stderr.splitlines()[-1]


def test_the_wheel_folder_check_names_what_is_missing(tmp_path):
    bench = _bench()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for name in ("pycuda-2025.1.2.tar.gz", "setuptools-80.0-py3-none-any.whl", "wheel-0.45-py3-none-any.whl",
                 "pytools-2025.1-py3-none-any.whl", "platformdirs-4.3-py3-none-any.whl", "mako-1.3-py3-none-any.whl",
                 "pytest-8.3-py3-none-any.whl", "numpy-2.2.0-cp39-cp39-manylinux_2_28_x86_64.whl"):
        (tmp_path / name).write_bytes(b"")
    assert bench.missing_wheels(tmp_path, tag) == [f"numpy ({tag})"]  # a numpy for another Python is none
    (tmp_path / f"numpy-2.2.0-{tag}-{tag}-manylinux_2_28_x86_64.whl").write_bytes(b"")
    assert bench.missing_wheels(tmp_path, tag) == []
    (tmp_path / "pycuda-2025.1.2.tar.gz").unlink()
    assert bench.missing_wheels(tmp_path, tag) == ["pycuda"]


def test_the_summary_has_benchmarks_form():
    text = _bench().markdown({
        "command": "bash bench/gpu_check.sh --python py --out o", "machine": "GPU X", "seconds": 300.0,
        "budget_s": 540, "dry_run": False,
        "steps": [{"step": "pycuda", "status": "ok", "detail": "built in 130 s", "seconds": 130, "budget_s": 200},
                  {"step": "training", "status": "ok", "detail": "4 models",
                   "rows": [{"model": "dmm", "cuda_ms": 4.0, "cpu_ms": 40.0, "speedup": 10.0}]},
                  {"step": "latency", "status": "ok", "detail": "",
                   "rows": [{"mode": "window", "path": "torch cuda", "p50_ms": 1.0, "p99_ms": 1.5, "max_ms": 2.0,
                             "x_cpu": 3.0, "max_abs": 1e-7}]}]})
    assert text.startswith("## GPU without TensorRT") and "Machine: GPU X" in text
    assert "| 1 | pycuda | ok | 130 | 200 | built in 130 s |" in text
    assert "| dmm | 4.00 | 40.0 | **10.0x** |" in text
    assert "| window | torch cuda | 1000.0 | 1500.0 | 2000.0 | 3.0x | 1.0e-07 |" in text


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU is here: the dry run would measure")
def test_the_dry_run_ends_0_with_every_gpu_step_no_gpu(tmp_path):
    result = _run("--python", sys.executable, "--out", str(tmp_path / "out"), "--dry-run", timeout=540)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    statuses = {record["step"]: record["status"] for record in summary["steps"]}
    assert [record["step"] for record in summary["steps"]] == STEPS and summary["ok"] and summary["dry_run"]
    for step in ("env", "pycuda", "cuda-python", "cuda-tests", "training", "latency"):
        assert statuses[step] == "no GPU", (step, statuses)
    assert statuses["wheels"] == "skipped" and statuses["doctor"] == "ok"
    assert summary["seconds"] < 540
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "| 3 | pycuda | no GPU |" in markdown and "dry run" in markdown
