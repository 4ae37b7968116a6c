"""`collect --workers N` stopped by Ctrl-C or SIGTERM: every worker stops, nothing half-written stays, one line.

Real processes throughout: the real CLI in a subprocess, its real spawned rollout workers, real signals.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmm_train.recipes import RECIPES
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the workers")


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(child) for child in (task / "children").read_text().split())
        except OSError:  # the task ended meanwhile
            pass
    return found


def _workers(pid: int) -> set[int]:
    """The parent's spawned rollout processes (multiprocessing's spawn entry point in their command line)."""
    workers = set()
    for child in _children(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:
            workers.add(child)
    return workers


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has stopped; only its parent's wait is missing


@pytest.mark.skipif(not RECIPES["hopper-medium"].available(), reason="this checkout ships no hopper-medium policy")
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_interrupted_collect_stops_its_workers_and_keeps_nothing(tmp_path, how):
    store = tmp_path / "store"
    # A budget far beyond what the test waits for: the workers are mid-rollout when the signal comes.
    process = subprocess.Popen(
        [sys.executable, "cli.py", "collect", "--recipe", "hopper-medium", "--steps", "5000000", "--workers", "2",
         "--out", str(store), "--quiet"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # As from a terminal: a test suite started in the background (nohup ... &) has SIGINT ignored, and
        # the child would inherit that and never see the Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        workers: set[int] = set()
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and process.poll() is None:
            workers |= _workers(process.pid)
            time.sleep(0.2)
        assert len(workers) == 2, f"the workers never started: {process.poll()} {process.stderr.read()}"
        time.sleep(3)  # let them import and start rolling out
        if how == "sigterm":
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        _, err = process.communicate(timeout=240)  # a hang guard: a loaded 2-core machine is slow to stop workers
    except subprocess.TimeoutExpired:
        err = "(no end: a worker kept stderr open)"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = [pid for pid in workers if _alive(pid)]
    for pid in orphans:  # leave no process of this test behind, whatever it found
        os.kill(pid, signal.SIGKILL)
    assert not orphans, "workers outlived the interrupted collect"
    assert process.returncode != 0
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "rerun" in lines[0], err
    # No dataset, complete or partial, and no staging directory.
    leftovers = [p.name for p in store.rglob("*") if p.is_dir()] if store.exists() else []
    assert not [name for name in leftovers if name.startswith(".dmm-staging-") or name == "data"], leftovers
    assert not (store / RECIPES["hopper-medium"].dataset_id).exists()
