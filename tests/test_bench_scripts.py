"""The bench scripts no other test runs, each end to end on its smallest budget in a fresh process:
they still run against today's trainer and recipes, and their last line keeps the form BENCHMARKS.md
quotes. Nothing here reads the timings themselves (no timing assertion in a unit test)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str, env: dict | None = None, timeout: int = 600) -> list[str]:
    result = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()


@pytest.mark.slow
def test_train_speed_times_every_path_and_prints_the_speedup():
    lines = run_bench("train_speed.py", "--steps", "10", "--threads", "1")
    rows = {line.split()[0]: line for line in lines if re.match(r"(reference|loop|fused|no) ", line)}
    assert sorted(rows) == ["fused", "loop", "no", "reference"], lines
    assert re.fullmatch(r"speedup: \d+\.\dx", lines[-1]), lines[-1]


@pytest.mark.slow
def test_collect_speed_compares_the_rollout_paths_and_regenerates_the_same_hash(tmp_path):
    lines = run_bench("collect_speed.py", "--compare-steps", "400", "--rounds", "1", "--workers", "2",
                      "--full-steps", "1500", "--repeats", "2", env={"MINARI_DATASETS_PATH": str(tmp_path)})
    assert any(line.startswith("one env") for line in lines) and any(line.startswith("batched") for line in lines)
    assert re.fullmatch(r"speedup: \d+\.\dx wall \(2 processes vs one env; batching alone \d+\.\d\dx CPU\); "
                        r"hopper-medium 1500 steps: \d+ s wall, \d+ s CPU; hash [0-9a-f]{16} \(same in 2 runs: yes\)",
                        lines[-1]), lines[-1]
    assert not any(tmp_path.iterdir())  # the fresh stores are its own and removed


@pytest.mark.slow
def test_step_latency_runs_every_backend_and_mode_and_prints_the_speedups():
    lines = run_bench("step_latency.py", "--steps", "20", "--episodes", "1", "--train-steps", "20")
    closed_loop = {line.split()[0]: line for line in lines if re.match(r"\s+(window|stream|native)\s+return", line)}
    assert sorted(closed_loop) == ["native", "stream", "window"], lines
    # The C step is the stream step: the same episode, to the printed digit.
    assert closed_loop["stream"].split()[1:] == closed_loop["native"].split()[1:]
    speedups = r"speedup window: \d+\.\dx stream: \d+\.\dx native vs ORT stream: \d+\.\dx"
    assert re.fullmatch(speedups, lines[-1]), lines[-1]
