"""Training-step speed: the fused CPU scan against the loop reference, side by side.

One full DMM training step at the hopper preset (B = 64 windows, K = 8 so L = 24 tokens,
D = 64, N = 16, 3 layers): forward, masked MSE loss, backward, grad-norm clip 0.25, AdamW
step and scheduler step, exactly as `dmm_train.train.train_step` runs them. Three
identically initialised models take turns in short blocks, so that a change in the
machine's load hits every path alike:

- reference: the obviously-correct model: the loop reference scan (`selective_scan_loop`)
             and the official DSM (pad, unfold, Linear; `DenseSequenceMixer.forward_window`);
- loop:      the loop reference scan with the lean rest of the step (the DSM as a convolution),
             to separate what the scan kernel gains from what the rest gains;
- fused:     the default training path: fused C kernel (`dmm_train.fused_scan`) + lean rest;
- no scan:   the fused model with the scan swapped for a stand-in of almost no cost, to
             show what the rest of the step costs (the scan's share is step - this).

The last line is ``speedup: X.Xx`` (reference ms / fused ms).

    python bench/train_speed.py [--steps 200] [--threads 1]

Under load (``--load K``): the default training step (fused) quiet and with K busy processes
(a Python busy loop, started and stopped by the bench around each timed run, each ending by
itself after 30 x --seconds + 300 s should the bench be killed), side by side in one run, for
four thread policies and a reference, each served by its own process (the OpenMP wait policy is read once per
process):

- default: what ``cli.py train`` does: threads from the free cores, and OpenMP waiting passively
           when other work competes for them (`contract.threads`), measured at the start of
           each timed run in a worker started for it, the scan pool alike;
- 1 thread: torch and the scan pool on one thread;
- all cores: the new pools (passive OpenMP, a scan pool that sleeps at once) on every usable
           core whatever the load: what the passive waiting alone saves;
- old:     before the policy: torch's default threads (spinning OpenMP team), the scan pool at
           the same count with its 200 us spin;
- cpu loop: not training: one thread of plain Python arithmetic, whose slowdown is the share
           of a core the machine gives any one thread (the fair share to compare with).

Rounds alternate quiet and loaded runs of every policy, so that a change in the machine's own
background load hits them alike; each line ends ``under load: Z.Zx quiet``.

    python bench/train_speed.py --load 2 [--rounds 2] [--seconds 6]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import subprocess

import torch

from contract.errors import DMMError
from contract.threads import busy_threads, usable_cores, waits_passively
from dmm_train import fused_scan
from dmm_train import model as model_module
from dmm_train.config import ACTION_PAD_VALUE, ModelConfig, TrainConfig, get_preset
from dmm_train.fused_scan import THREADS_ENV
from dmm_train.model import DecisionMetaMamba
from dmm_train.train import make_optimizer, train_step

PRESET = "hopper"
BATCH_SIZE = 64
WARMUP_STEPS = 10
ROUNDS = 10  # blocks per path, alternating
PAD_FRACTION = 0.25  # windows that start near an episode start and are left-padded
SEED = 0


def make_batch(preset, context_len: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Realistic windows: normalised states, actions in [-1, 1], rtg / scale, some left padding."""
    states = torch.randn(BATCH_SIZE, context_len, preset.state_dim, generator=generator)  # (B, K, S)
    actions = torch.rand(BATCH_SIZE, context_len, preset.act_dim, generator=generator) * 2 - 1  # (B, K, Adim)
    rtg = 3.6 - torch.rand(BATCH_SIZE, context_len, 1, generator=generator).cumsum(1) * 0.05  # (B, K, 1)
    mask = torch.ones(BATCH_SIZE, context_len)  # (B, K)
    padded_rows = torch.rand(BATCH_SIZE, generator=generator) < PAD_FRACTION
    for row in torch.nonzero(padded_rows).flatten().tolist():
        pad = int(torch.randint(1, context_len, (1,), generator=generator))
        mask[row, :pad] = 0.0
        states[row, :pad] = 0.0
        actions[row, :pad] = ACTION_PAD_VALUE
        rtg[row, :pad] = 0.0
    return {"states": states, "actions": actions, "rtg": rtg, "mask": mask}


def free_scan(x, delta, A, Bm, Cm, Dskip, impl="auto", *, z=None, delta_bias=None, delta_softplus=False):
    """Stand-in for the scan with the same inputs and output shape and almost no cost."""
    out = x * delta + (Bm.sum() + Cm.sum()) * A.sum() + Dskip  # (B, L, D)
    if delta_bias is not None:
        out = out + delta_bias
    return out if z is None else out * z


@contextlib.contextmanager
def scan_replaced_by_stand_in():
    original = model_module.selective_scan
    model_module.selective_scan = free_scan
    try:
        yield
    finally:
        model_module.selective_scan = original


def build(impl: str, train_config: TrainConfig, dsm_impl: str = "conv"):
    torch.manual_seed(SEED)  # the same initial weights for every path
    model = DecisionMetaMamba(ModelConfig.from_preset(get_preset(PRESET)))
    model.set_scan_impl(impl)
    model.set_dsm_impl(dsm_impl)
    model.train()
    optimizer, scheduler = make_optimizer(model, train_config)
    return model, optimizer, scheduler


POLICIES = ("default", "1 thread", "all cores", "old", "cpu loop")
BUSY_LOOP = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"


def worker(policy: str) -> None:
    """Serve one policy: for each line ``SECONDS`` on stdin, print ``ms/step threads`` of the training step."""
    from dmm_train.threads import setup_threads

    if policy == "1 thread":
        setup_threads(1)
    elif policy == "all cores":
        setup_threads(usable_cores())
    elif policy == "old":  # torch's default count for both pools, the scan pool spinning as it did
        fused_scan.set_num_threads(torch.get_num_threads())
        fused_scan.spin_ns = lambda: fused_scan.SPIN_NS
    train_config = TrainConfig(preset=PRESET)
    preset = get_preset(PRESET)
    batch = make_batch(preset, ModelConfig.from_preset(preset).context_len, torch.Generator().manual_seed(SEED))
    model, optimizer, scheduler = build("fused", train_config)
    step = lambda: train_step(model, optimizer, scheduler, batch, train_config.grad_clip)  # noqa: E731
    if policy == "cpu loop":  # one thread of plain Python arithmetic: the share of a core the machine gives
        step = lambda: sum(i * i for i in range(100_000))  # noqa: E731
    print("ready", flush=True)
    for line in sys.stdin:
        seconds = float(line)
        if policy == "default":
            setup_threads()  # as a training started now would choose
        warm_until = time.perf_counter() + seconds / 4
        while time.perf_counter() < warm_until:
            step()
        steps, start = 0, time.perf_counter()
        while steps < 3 or time.perf_counter() - start < seconds:
            step()
            steps += 1
        print(f"{(time.perf_counter() - start) / steps * 1e3:.3f} {torch.get_num_threads()}", flush=True)


def start_worker(policy: str):
    """A fresh process serving ``policy`` (the OpenMP wait policy is read once per process)."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", THREADS_ENV)}
    if policy == "default" and waits_passively(usable_cores(), busy_threads()):  # as cli.py decides it, now
        environment["OMP_WAIT_POLICY"] = "passive"
    if policy == "all cores":
        environment["OMP_WAIT_POLICY"] = "passive"
    process = subprocess.Popen([sys.executable, __file__, "--worker", policy], env=environment, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    if process.stdout.readline().strip() != "ready":
        raise DMMError(f"the {policy!r} worker: exit code {process.wait()} before it started", "a running worker",
                       "see its error above")
    return process


def timed_run(policy: str, process, seconds: float, load: int, load_seconds: float) -> tuple[float, int]:
    """(ms/step, torch threads) of one run of a worker while ``load`` busy processes run. The default policy
    gets a worker started for the run, as a training started then would be (its wait policy is chosen from
    the load at its start); the others keep theirs."""
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=load_seconds)])
            for _ in range(load)]
    fresh = None
    try:
        time.sleep(0.5)  # the busy processes are running when the default policy measures the machine
        if policy == "default":
            process = fresh = start_worker(policy)
        process.stdin.write(f"{seconds}\n")
        process.stdin.flush()
        reply = process.stdout.readline().split()
    finally:
        if fresh is not None:
            fresh.kill()
            fresh.wait()
        for busy_process in busy:
            busy_process.kill()
        for busy_process in busy:
            busy_process.wait()
    if len(reply) != 2:
        raise DMMError(f"a worker: stopped with exit code {process.poll()}", "a worker that runs to the end",
                       "see its error above")
    return float(reply[0]), int(reply[1])


def under_load(load: int, rounds: int, seconds: float, load_seconds: float) -> float:
    """The table of the module docstring; returns the default policy's loaded / quiet ratio."""
    runs: dict[tuple[str, int], list[tuple[float, int]]] = {}
    workers = {}
    try:
        for policy in POLICIES:
            if policy != "default":  # the default policy's workers start with each run
                workers[policy] = start_worker(policy)
        for _ in range(rounds):
            for policy in POLICIES:
                for busy in (0, load):
                    runs.setdefault((policy, busy), []).append(
                        timed_run(policy, workers.get(policy), seconds, busy, load_seconds))
    finally:
        for process in workers.values():
            process.kill()
            process.wait()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"DMM training step, {PRESET}, B={BATCH_SIZE}: quiet and with {load} busy processes; {cpus} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at the end; median of {rounds} runs of {seconds:g} s per cell")
    ratios = {}
    for policy in POLICIES:
        quiet = statistics.median(ms for ms, _ in runs[policy, 0])
        loaded = statistics.median(ms for ms, _ in runs[policy, load])
        threads = "/".join(sorted({str(t) for _, t in runs[policy, 0]})) + " quiet, " + "/".join(
            sorted({str(t) for _, t in runs[policy, load]})) + " under load"
        if policy == "cpu loop":
            threads = "1, plain Python"
        ratios[policy] = (quiet, loaded)
        print(f"{policy:<10}(threads {threads}): quiet {quiet:.1f} ms/step, under load {loaded:.1f} ms/step: "
              f"under load: {loaded / quiet:.1f}x quiet")
    default_quiet, default_loaded = ratios["default"]
    print(f"default vs old: quiet {ratios['old'][0] / default_quiet:.2f}x faster, under load "
          f"{ratios['old'][1] / default_loaded:.1f}x faster")
    return default_loaded / default_quiet


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200, help="timed steps per path (default 200)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads for every path; the scan kernel uses as many (default 1: on a "
             "2-core machine shared with another job, torch's OpenMP pool was 3-10x slower with 2)",
    )
    parser.add_argument(
        "--scan-threads", type=int, default=None,
        help="threads of the fused scan kernel (default: as --threads; see DMM_SCAN_THREADS)",
    )
    parser.add_argument("--load", type=int, default=None,
                        help="busy processes: time the default step quiet and under this load per thread policy")
    parser.add_argument("--rounds", type=int, default=2, help="--load: runs per policy and condition (default 2)")
    parser.add_argument("--seconds", type=float, default=6.0, help="--load: timed seconds per run (default 6)")
    parser.add_argument("--worker", choices=POLICIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return 0.0
    if args.load is not None:
        if args.load < 1 or args.rounds < 1 or not args.seconds > 0:
            raise DMMError(f"--load {args.load}, --rounds {args.rounds}, --seconds {args.seconds}", "positive values",
                           "pass a value above 0 for each")
        # Every busy process ends by itself after this, should the bench itself be killed.
        return under_load(args.load, args.rounds, args.seconds, load_seconds=30 * args.seconds + 300)
    scan_threads = args.threads if args.scan_threads is None else args.scan_threads
    if args.steps < ROUNDS or args.threads < 1 or scan_threads < 1:
        raise DMMError(f"--steps {args.steps}, --threads {args.threads}, --scan-threads {scan_threads}",
                       f">= {ROUNDS}, >= 1 and >= 1", f"pass --steps {ROUNDS} or more and 1 or more threads")
    torch.set_num_threads(args.threads)
    fused_scan.set_num_threads(scan_threads)
    if not fused_scan.is_available():
        reason = " ".join(str(fused_scan.UNAVAILABLE_REASON).split())  # a compiler's report can span lines
        raise DMMError(f"the fused scan kernel: unavailable ({reason})", "a working C compiler (gcc or cc)",
                       "install gcc (e.g. apt-get install gcc) or set $CC (this bench times the fused scan)")

    train_config = TrainConfig(preset=PRESET)
    preset = get_preset(PRESET)
    context_len = ModelConfig.from_preset(preset).context_len
    batch = make_batch(preset, context_len, torch.Generator().manual_seed(SEED))
    paths = {"reference": build("loop", train_config, dsm_impl="window"),
             "loop": build("loop", train_config), "fused": build("fused", train_config),
             "no scan": build("fused", train_config)}

    def run(name: str, steps: int) -> float:
        model, optimizer, scheduler = paths[name]
        context = scan_replaced_by_stand_in() if name == "no scan" else contextlib.nullcontext()
        with context:
            start = time.perf_counter()
            for _ in range(steps):
                train_step(model, optimizer, scheduler, batch, train_config.grad_clip)
            return (time.perf_counter() - start) / steps * 1e3

    for name in paths:
        run(name, WARMUP_STEPS)
    block = args.steps // ROUNDS
    per_block = {name: [] for name in paths}
    for _ in range(ROUNDS):
        for name in paths:
            per_block[name].append(run(name, block))
    ms = {name: statistics.median(values) for name, values in per_block.items()}

    rest = ms["no scan"]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"DMM training step, {PRESET}: B={BATCH_SIZE}, L={3 * batch['states'].shape[1]}, "
          f"D={preset.d_model}, 3 layers; torch threads {args.threads}, scan threads "
          f"{fused_scan.get_num_threads()}, {cpus} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"scan kernel build: {' '.join(fused_scan.build_flags())}")
    print(f"{'path':<11}{'ms/step':>10}{'scan ms':>10}{'scan share':>12}{'spread':>16}")
    for name in ("reference", "loop", "fused", "no scan"):
        # The reference's rest differs (unfold DSM), so its scan time is not step - rest.
        scan_ms = {"reference": None, "no scan": 0.0}.get(name, ms[name] - rest)
        scan_cells = ("-", "-") if scan_ms is None else (f"{scan_ms:.1f}", f"{scan_ms / ms[name]:.0%}")
        low, high = min(per_block[name]), max(per_block[name])
        print(f"{name:<11}{ms[name]:>10.1f}{scan_cells[0]:>10}{scan_cells[1]:>12}"
              f"{f'{low:.1f}-{high:.1f}':>16}")
    speedup = ms["reference"] / ms["fused"]
    print(f"median of {ROUNDS} alternating blocks of {block} steps; 'no scan' = the rest of the step; "
          f"scan kernel alone (loop / fused): {ms['loop'] / ms['fused']:.1f}x")
    print(f"speedup: {speedup:.1f}x")
    return speedup


if __name__ == "__main__":
    try:
        main()
    except DMMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
