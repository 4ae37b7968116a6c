"""Control-loop jitter: `Policy.act` latency and tick lateness on a fixed-rate clock, side by side.

For each mode (stream, window), each load (quiet: whatever else the machine runs; loaded:
plus busy processes this bench starts) and each setting of the real-time options (off:
the loop floats over the cores under the default scheduler with the garbage collector
running; on: `runtime.clock.realtime` with the loop pinned to one core, SCHED_FIFO where
permitted, and the collector frozen and disabled during episodes), it runs the closed
loop of `cli.py run --period-ms` (`runtime.loop.run_episode` with a
`runtime.clock.ControlLoop`) on Hopper-v5 for at least --steps steps and reports
p50/p99/p99.9/max of the compute latency (`Policy.act` alone) and of the tick lateness
(wake-up - tick), the deadline misses (action ready after tick + period) and the skipped
ticks. The plant's step is outside the timed part. Within one load the configurations
run in alternating rounds, so that a change in the rest of the machine hits them alike;
the busy processes are started before the loaded rounds, each bounded in time by itself,
and stopped by the bench after them.

The last lines give, per mode and load, the ratio off / on of the p99.9 and max of each.

Without --checkpoint it trains a tiny real checkpoint first (a small random-policy
Hopper-v5 dataset, a few official training steps, in a temporary directory): its weights
matter little for timing, and it records the state range, so the range check is timed too.

    python bench/jitter.py [--checkpoint runs/hopper-seed0] [--steps 10000] [--period-ms 2] [--busy 2]
                           [--modes stream window] [--settings off on] (or off pin fifo gc on, one at a time)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from contract.errors import DMMError
from runtime import ControlLoop, Policy, RealtimeOptions, load_backend, realtime
from runtime.clock import DEFAULT_FIFO_PRIORITY, request_fifo
from runtime.loop import run_episode
from runtime.plant import make_plant

PRESET = "hopper"
ROUNDS = 4  # alternating rounds per load
WARMUP_STEPS = 200
TRAIN_EPISODES = 30
SEED = 0
BUSY_SLACK_S = 60.0  # a busy process outlives its expected share by at most this, even if the bench dies
# A busy process: pure Python spinning until its own deadline (no import of the project).
BUSY_SCRIPT = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


def tiny_checkpoint(directory: Path, train_steps: int) -> Path:
    """A real model.pt: a few official training steps (batch 16, one torch thread) on random-policy episodes."""
    import torch

    from dmm_train.config import TrainConfig, get_preset
    from dmm_train.recipes import collect
    from dmm_train.train import train

    dataset = collect(get_preset(PRESET).env_id, "bench/jitter-random-v0", policy="random",
                      episodes=TRAIN_EPISODES, seed=SEED, out=directory / "datasets")
    config = TrainConfig(preset=PRESET, dataset=str(dataset), steps=train_steps, batch_size=16, seed=SEED,
                         eval_episodes=0, checkpoint_every=max(train_steps, 1), scan="loop")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a thread pool on a busy machine only adds waiting
    try:
        return train(config, directory / "run", progress=False)
    finally:
        torch.set_num_threads(threads)


class BusyLoad:
    """``count`` spinning processes, each exiting by itself after ``seconds``; stopped on exit."""

    def __init__(self, count: int, seconds: float):
        self.count, self.seconds = count, seconds
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> BusyLoad:
        for _ in range(self.count):
            self.processes.append(subprocess.Popen([sys.executable, "-c", BUSY_SCRIPT, f"{self.seconds:.1f}"]))
        time.sleep(0.2)  # let them start spinning
        return self

    def __exit__(self, *exc_info) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class Configuration:
    """One (mode, load, options) cell: its Policy, ControlLoop and plant, run round by round."""

    def __init__(self, name, backend, options, freeze_gc: bool, period_ms: float, capacity: int):
        self.name = name
        self.options = options
        self.freeze_gc = freeze_gc
        self.policy = Policy(backend, on_fault="hold", max_consecutive_faults=1_000_000)
        self.loop = ControlLoop(self.policy, period_ms, capacity=capacity)
        self.plant = make_plant(backend.manifest.env_id)
        self.episodes = 0
        self.applied: dict = {}

    def run(self, steps: int) -> None:
        """At least ``steps`` timed steps, whole episodes (seeded SEED + episode index)."""
        target = self.loop.steps + steps
        with realtime(self.options) as applied:
            self.applied = applied
            while self.loop.steps < target:
                run_episode(self.policy, self.plant, seed=SEED + self.episodes, loop=self.loop,
                            freeze_gc=self.freeze_gc)
                self.episodes += 1

    def warm_up(self, steps: int) -> None:
        """Untimed episodes, without the clock: the engine's first calls allocate and pick kernels."""
        done = 0
        while done < steps:
            done += run_episode(self.policy, self.plant, seed=SEED + self.episodes).length
            self.episodes += 1

    def close(self) -> None:
        self.plant.close()


# Setting -> (pin to --cpu, SCHED_FIFO, GC paused per episode); "on" is all of them.
SETTINGS = {"off": (False, False, False), "pin": (True, False, False), "fifo": (False, True, False),
            "gc": (False, False, True), "on": (True, True, True)}


def options_for(setting: str, cpu: int, fifo_permitted: bool):
    """(RealtimeOptions, freeze_gc) of a setting; SCHED_FIFO only where permitted."""
    pin, fifo, freeze_gc = SETTINGS[setting]
    # The GC is paused per episode by run_episode (as cli.py run does), not for the whole round.
    return RealtimeOptions(cpu=cpu if pin else None, fifo=fifo and fifo_permitted, freeze_gc=False), freeze_gc


def fifo_permitted() -> tuple[bool, str]:
    try:
        policy, priority = request_fifo(DEFAULT_FIFO_PRIORITY)
    except DMMError as error:
        return False, str(error)
    os.sched_setscheduler(0, policy, os.sched_param(priority))
    return True, f"SCHED_FIFO {DEFAULT_FIFO_PRIORITY} permitted"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="model.pt or its run directory (default: train a "
                                                           "tiny one in a temporary directory)")
    parser.add_argument("--steps", type=int, default=10_000, help="timed steps per configuration (default 10000)")
    parser.add_argument("--period-ms", type=float, default=2.0, help="control period (default 2 ms)")
    parser.add_argument("--busy", type=int, default=2, help="busy processes of the loaded rounds (default 2)")
    parser.add_argument("--cpu", type=int, default=None, help="core the 'on' loop is pinned to (default: the last)")
    parser.add_argument("--modes", nargs="+", default=["stream", "window"], choices=["stream", "window"])
    parser.add_argument("--settings", nargs="+", default=["off", "on"], choices=list(SETTINGS),
                        help="real-time settings to compare (default: off on; pin, fifo, gc: one option alone)")
    parser.add_argument("--train-steps", type=int, default=20, help="training steps of the tiny checkpoint")
    args = parser.parse_args(argv)
    if "off" not in args.settings or len(set(args.settings)) < 2:
        raise DMMError(f"--settings {' '.join(args.settings)}", "'off' and at least one other to compare",
                       f"pass --settings off and one or more of {', '.join(s for s in SETTINGS if s != 'off')}")
    if args.steps < ROUNDS or not args.period_ms > 0 or args.busy < 1 or args.train_steps < 1:
        raise DMMError(f"--steps {args.steps}, --period-ms {args.period_ms}, --busy {args.busy}, --train-steps "
                       f"{args.train_steps}", f">= {ROUNDS}, > 0, >= 1 and >= 1",
                       f"pass --steps {ROUNDS} or more, a positive --period-ms, --busy and --train-steps 1 or more")

    from export.onnx_export import export_checkpoint

    cores = sorted(os.sched_getaffinity(0))
    cpu = cores[-1] if args.cpu is None else args.cpu
    if cpu not in cores:
        raise DMMError(f"--cpu {cpu} (this process may run on CPUs {cores})", "one of those CPUs",
                       f"pass --cpu {cores[0] if cores else 0} or another of them")
    permitted, fifo_note = fifo_permitted()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dmm-jitter-") as scratch:
        scratch = Path(scratch)
        if args.checkpoint is None:
            checkpoint_path = tiny_checkpoint(scratch, args.train_steps)
            origin = f"tiny checkpoint trained here ({args.train_steps} steps on {TRAIN_EPISODES} random episodes)"
        else:
            checkpoint_path, origin = Path(args.checkpoint), args.checkpoint
        graphs = {mode: export_checkpoint(checkpoint_path, mode=mode, out=scratch / mode)[0] for mode in args.modes}
        backends = {}
        configurations: dict[tuple[str, str, str], Configuration] = {}
        try:
            for load in ("quiet", "loaded"):
                for mode in args.modes:
                    for setting in dict.fromkeys(args.settings):
                        # A backend per configuration: a Policy's feeds are bound to its session.
                        backend = backends[(mode, load, setting)] = load_backend(graphs[mode], threads=1)
                        options, freeze_gc = options_for(setting, cpu, permitted)
                        configurations[(mode, load, setting)] = Configuration(
                            f"{mode} {load} {setting}", backend, options, freeze_gc, args.period_ms,
                            capacity=args.steps + 2_000)
            for configuration in configurations.values():
                configuration.warm_up(WARMUP_STEPS)
            setup_seconds = time.perf_counter() - started
            per_round = -(-args.steps // ROUNDS)
            round_seconds = per_round * args.period_ms / 1e3 * 1.5
            for load in ("quiet", "loaded"):
                cells = [c for key, c in configurations.items() if key[1] == load]
                busy_seconds = len(cells) * ROUNDS * round_seconds + BUSY_SLACK_S
                with BusyLoad(args.busy, busy_seconds) if load == "loaded" else contextlib.nullcontext():
                    for _ in range(ROUNDS):
                        for configuration in cells:
                            configuration.run(per_round)
            timings = {key: c.loop.timings() for key, c in configurations.items()}
            faults = {key: sum(c.policy.faults.values()) for key, c in configurations.items()}
            applied = {key: c.applied for key, c in configurations.items()}
        finally:
            for configuration in configurations.values():
                configuration.close()
            for backend in backends.values():
                backend.close()
    elapsed = time.perf_counter() - started

    print(f"control-loop jitter, {PRESET} (Hopper-v5), period {args.period_ms:g} ms, closed loop; checkpoint: "
          f"{origin}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {len(cores)} CPUs, Python "
          f"{platform.python_version()}, load average now {os.getloadavg()[0]:.2f}; busy processes when loaded: "
          f"{args.busy}")
    if not permitted:
        print(f"SCHED_FIFO: {fifo_note}")
    print(f"rt: on = pin + fifo + gc; pin = pinned to CPU {cpu}; fifo = SCHED_FIFO"
          f"{'' if permitted else ' (not permitted: left out)'}; gc = collector frozen+disabled per episode; "
          "off = unpinned, default scheduler, collector running")
    print(f"{ROUNDS} alternating rounds per load; {elapsed:.0f} s in all ({setup_seconds:.0f} s of checkpoint, "
          "export and warm-up); times in us")
    header = (f"{'mode':<7}{'load':<8}{'rt':<5}{'steps':>7}  {'act p50':>8}{'p99':>8}{'p99.9':>8}{'max':>9}  "
              f"{'late p50':>8}{'p99':>8}{'p99.9':>8}{'max':>9}  {'misses':>7}{'skipped':>8}{'faults':>7}")
    print(header)
    for (mode, load, setting), timing in timings.items():
        act, late = timing.compute, timing.lateness
        print(f"{mode:<7}{load:<8}{setting:<5}{timing.steps:>7}  {act.p50 * 1e3:>8.1f}{act.p99 * 1e3:>8.1f}"
              f"{act.p999 * 1e3:>8.1f}{act.max * 1e3:>9.1f}  {late.p50 * 1e3:>8.1f}{late.p99 * 1e3:>8.1f}"
              f"{late.p999 * 1e3:>8.1f}{late.max * 1e3:>9.1f}  {timing.misses:>7}{timing.skipped_ticks:>8}"
              f"{faults[(mode, load, setting)]:>7}")
    print("ratio off / setting (above 1: the setting helps):")
    for mode in args.modes:
        for load in ("quiet", "loaded"):
            off = timings[(mode, load, "off")]
            for setting in dict.fromkeys(args.settings):
                if setting == "off":
                    continue
                on = timings[(mode, load, setting)]
                print(f"  {mode:<7}{load:<7}{setting:<5} act p99.9 {off.compute.p999 / on.compute.p999:6.2f}x  "
                      f"max {off.compute.max / on.compute.max:6.2f}x   lateness p99.9 "
                      f"{off.lateness.p999 / on.lateness.p999:7.2f}x  max {off.lateness.max / on.lateness.max:7.2f}x"
                      f"   misses {off.misses} / {on.misses}")
    return {"timings": timings, "faults": faults, "applied": applied}


if __name__ == "__main__":
    try:
        main()
    except DMMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
