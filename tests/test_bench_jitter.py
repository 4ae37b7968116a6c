"""bench/jitter.py end to end on a tiny budget: every configuration timed, its busy load stopped."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from contract.errors import DMMError

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_jitter", REPO_ROOT / "bench" / "jitter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jitter_bench_times_every_configuration_and_stops_its_load(checkpoint_path, capsys):
    bench = load_bench()
    scheduler, affinity = os.sched_getscheduler(0), os.sched_getaffinity(0)
    result = bench.main(["--checkpoint", str(checkpoint_path), "--steps", "8", "--period-ms", "1", "--busy", "1",
                         "--modes", "stream", "--settings", "off", "gc", "on"])
    output = capsys.readouterr().out
    timings = result["timings"]
    assert sorted(timings) == sorted(("stream", load, setting) for load in ("quiet", "loaded")
                                      for setting in ("off", "gc", "on"))
    for key, timing in timings.items():
        assert timing.steps >= 8 and timing.period_ms == 1.0, key
        assert 0 <= timing.lateness.p50 <= timing.lateness.p999 <= timing.lateness.max
        assert 0 < timing.compute.p50 <= timing.compute.p999 <= timing.compute.max
    assert result["applied"][("stream", "quiet", "on")]["cpu"] == max(affinity)
    assert result["applied"][("stream", "quiet", "off")] == {"cpu": None, "scheduler": "default", "gc": "running"}
    assert "ratio off / setting" in output and "stream loaded on" in output.replace("  ", " ")
    # The options were undone and no busy process outlived the bench.
    assert os.sched_getscheduler(0) == scheduler and os.sched_getaffinity(0) == affinity
    assert not [child for child in os.listdir("/proc") if child.isdigit() and _is_busy_child(child)]


def _is_busy_child(pid: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().split()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return int(stat[3]) == os.getpid() and b"time.monotonic() + float" in command and stat[2] != "Z"


def test_jitter_bench_refuses_settings_without_a_baseline(checkpoint_path):
    bench = load_bench()
    with pytest.raises(DMMError, match="expected 'off' and at least one other"):
        bench.main(["--checkpoint", str(checkpoint_path), "--settings", "on"])
