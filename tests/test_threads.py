"""The thread policy: threads from the free cores, --threads overrides, one count for torch and the scan pool."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
from contract.errors import DMMError
from contract.threads import (
    ThreadChoice,
    busy_threads,
    choose_threads,
    prefer_passive_waiting,
    usable_cores,
    waits_passively,
)
from dmm_train import fused_scan
from dmm_train.checkpoint import load_checkpoint
from dmm_train.config import TrainConfig
from dmm_train.recipes import default_workers
from dmm_train.threads import setup_threads


@pytest.fixture
def restore_threads():
    """Tests here change the process's thread counts; later tests get them back."""
    torch_threads = torch.get_num_threads()
    yield
    torch.set_num_threads(torch_threads)
    fused_scan.set_num_threads(None)


@pytest.mark.parametrize(("cores", "busy", "expected"), [
    (2, 0.0, 2),    # quiet: every core
    (2, 0.4, 2),    # a blip rounds away
    (2, 0.5, 1),    # half a core rounds down: a second thread would share its core
    (2, 0.6, 1),
    (2, 2.0, 1),    # two busy processes on two cores: one thread
    (2, 3.9, 1),    # never below one
    (16, 3.0, 13),
    (1, 0.0, 1),
    (4, None, 4),   # load unknown: every usable core, as before
])
def test_threads_follow_the_free_cores(cores, busy, expected):
    choice = choose_threads(cores, busy)
    assert choice == ThreadChoice(threads=expected, cores=cores, busy=busy)


def test_the_automatic_choice_never_exceeds_the_ceiling_and_threads_overrides_it():
    assert choose_threads(16, 0.0, ceiling=8).threads == 8
    assert choose_threads(16, 15.0, ceiling=8).threads == 1
    requested = choose_threads(2, 3.9, requested=4, ceiling=2)  # the user's count wins over load and ceiling
    assert (requested.threads, requested.requested) == (4, True)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(DMMError, match="--threads"):
            choose_threads(2, 0.0, requested=bad)
    with pytest.raises(DMMError, match="--threads 0"):
        TrainConfig(threads=0).validate()


def test_the_start_line_says_the_count_and_why():
    assert (choose_threads(2, 2.1).line()
            == "threads: 1 (2 cores, 2.1 busy: 0.0 free; --threads N to override)")
    assert choose_threads(4, 0.0).line() == "threads: 4 (4 cores, 0.0 busy: 4.0 free; --threads N to override)"
    assert choose_threads(2, None, requested=3).line() == "threads: 3 (--threads; 2 cores)"


def test_busy_processes_are_counted():
    """Two real busy processes on the machine: the measurement counts at least them."""
    loop = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"
    busy = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(2)]
    try:
        time.sleep(1.0)  # past the interpreters' start-up, in their loops
        measured = busy_threads()
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert measured is not None and measured >= 1.9  # procs_running counts runnable ones, waiting or not
    assert usable_cores() >= 1


def test_the_scan_pool_follows_the_torch_count_and_spins_only_alone(restore_threads):
    assert setup_threads(3).threads == 3
    assert torch.get_num_threads() == 3 and fused_scan.get_num_threads() == 3
    assert fused_scan.spin_ns() == 0  # torch's own pool has several threads: the scan's threads sleep at once
    setup_threads(1)
    assert torch.get_num_threads() == 1 and fused_scan.get_num_threads() == 1
    assert fused_scan.spin_ns() == fused_scan.SPIN_NS


def test_the_scan_is_the_same_with_a_sleeping_pool(restore_threads):
    """Two scan threads that sleep at once (torch on two threads) give the one-thread results, bitwise."""
    if not fused_scan.is_available():
        pytest.skip(f"no fused scan kernel here: {fused_scan.UNAVAILABLE_REASON}")
    generator = torch.Generator().manual_seed(0)
    batch, length, channels, states = 64, 24, 64, 16
    x = torch.randn(batch, length, channels, generator=generator).requires_grad_()  # (B, L, D)
    delta = torch.rand(batch, length, channels, generator=generator).requires_grad_()  # (B, L, D)
    A = (-torch.rand(channels, states, generator=generator)).requires_grad_()  # (D, N)
    Bm, Cm = torch.randn(2, batch, length, states, generator=generator)  # (B, L, N) each
    Dskip = torch.randn(channels, generator=generator)  # (D,)
    z = torch.randn(batch, length, channels, generator=generator)  # (B, L, D)

    def scan_and_grads():
        out = fused_scan.fused_selective_scan(x, delta, A, Bm, Cm, Dskip, z=z, delta_softplus=True)
        return (out, *torch.autograd.grad(out.square().sum(), (x, delta, A)))

    setup_threads(1)
    alone = scan_and_grads()
    setup_threads(2)
    for _ in range(5):  # several calls: helpers asleep between them, the caller sleeping for their items
        pooled = scan_and_grads()
        assert fused_scan.kernel_spin_ns() == 0
        assert all(torch.equal(a, b) for a, b in zip(alone, pooled, strict=True))


def test_openmp_waits_passively_only_when_others_compete_for_the_cores():
    assert waits_passively(2, 0.2) is False  # quiet: OpenMP's own brief spinning is the faster
    assert waits_passively(2, 0.8) is True  # one core taken: a spinning team would steal it back
    assert waits_passively(2, 3.9) is True and waits_passively(8, 1.0) is True
    assert waits_passively(2, None) is True  # the load cannot be read: the safe side
    # The measured choice goes into the environment, and a user's own policy stays.
    environment = {}
    passive = prefer_passive_waiting(environment)
    assert environment == ({"OMP_WAIT_POLICY": "passive"} if passive else {})
    environment = {"OMP_WAIT_POLICY": "active"}
    prefer_passive_waiting(environment)
    assert environment == {"OMP_WAIT_POLICY": "active"}


def test_collect_workers_follow_the_free_cores():
    assert default_workers(1000) == 1  # too short to pay for worker processes
    workers = default_workers(1_000_000)
    assert 1 <= workers <= min(usable_cores(), 4)


def test_train_prints_its_choice_and_honours_threads(tmp_path, monkeypatch, capsys, restore_threads):
    from dmm_train.recipes import collect

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    dataset = collect("Hopper-v5", "test/hopper-threads-v0", policy="random", episodes=8, seed=1)
    common = ["train", "--dataset", str(dataset), "--steps", "2", "--batch-size", "8", "--eval-episodes", "0",
              "--checkpoint-every", "100", "--warmup", "1"]
    assert cli.main([*common, "--out", str(tmp_path / "given"), "--threads", "1"]) == 0
    assert "threads: 1 (--threads; " in capsys.readouterr().err
    assert torch.get_num_threads() == 1 and fused_scan.get_num_threads() == 1
    assert cli.main([*common, "--out", str(tmp_path / "auto")]) == 0
    line = re.search(r"threads: (\d+) \((\d+) cores, [\d.]+ busy: [\d.]+ free; --threads N to override\)",
                     capsys.readouterr().err)
    assert line is not None
    assert int(line[1]) == torch.get_num_threads() == fused_scan.get_num_threads()
    assert int(line[2]) == usable_cores()
    assert cli.main([*common, "--out", str(tmp_path / "bad"), "--threads", "0"]) == 1
    assert "--threads 0; expected a positive integer" in capsys.readouterr().err

    # A resumed run keeps the count it was trained with (torch's sums depend on it), unless --threads says otherwise.
    longer = [arg if arg != "2" else "3" for arg in common]  # --steps 3
    assert cli.main([*longer, "--out", str(tmp_path / "given"), "--resume"]) == 0
    assert "threads: 1 (the run's count, kept for exact resume; " in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "given").train_config["threads"] == 1
    assert cli.main([*longer[:4], "4", *longer[5:], "--out", str(tmp_path / "given"), "--resume",
                     "--threads", "2"]) == 0
    assert "threads: 2 (--threads; " in capsys.readouterr().err


@pytest.mark.slow
def test_the_load_bench_prints_a_ratio_per_policy_and_leaves_no_busy_process():
    """bench/train_speed.py --load on its smallest budget: one line per policy in the form BENCHMARKS.md quotes."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "bench/train_speed.py", "--load", "1", "--rounds", "1", "--seconds",
                             "0.3"], cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    for policy in ("default", "1 thread", "all cores", "old", "cpu loop"):
        assert any(re.match(rf"{policy} +\(threads .*\): quiet [\d.]+ ms/step, under load [\d.]+ ms/step: "
                            r"under load: [\d.]+x quiet$", line) for line in lines), (policy, lines)
    assert re.match(r"default vs old: quiet [\d.]+x faster, under load [\d.]+x faster$", lines[-1])
    busy = subprocess.run(["pgrep", "-f", "while time.monotonic"], capture_output=True, text=True).stdout.split()
    assert busy == []  # the bench stopped every busy process it started
