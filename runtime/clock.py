"""A fixed-rate control loop: an absolute-deadline clock, per-step timing, real-time options.

Each tick is computed from the origin (``origin + k * period``), never from the time the previous
step ended, so the loop does not drift whatever the steps cost, and a late step rejoins the grid
instead of running catch-up steps (docs/design.md#control-loop). A caller's own loop uses it as

    loop = ControlLoop(policy, period_ms=8.0)
    with realtime(RealtimeOptions(cpu=1, fifo=True)):   # optional: pin, SCHED_FIFO, GC paused
        loop.start()                                    # tick 0 is now
        while running:
            loop.wait()                                 # sleep until the next tick
            action = loop.act(read_sensors(), reward)   # Policy.act, timed against the tick
            send(action)
    print(loop.timings().summary())

`realtime` applies the options that make the loop's timing depend less on the rest of the
machine, each doing what it says or raising a DMMError that says why it cannot; all are undone on
exit.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from contract.errors import DMMError
from runtime.latency import NS_PER_MS, LatencyStats

# Spin this long before a tick instead of sleeping through it: it covers time.sleep's overshoot
# up to its p99 (BENCHMARKS.md, design measurements).
DEFAULT_SPIN_US = 200.0
# Above ordinary processes, below the kernel's threaded interrupt handlers of a PREEMPT_RT
# kernel (50 there is the default of the IRQ threads; equal priority runs them first in turn).
DEFAULT_FIFO_PRIORITY = 49
# Steps whose timings are kept for the percentiles (a ring beyond: the last this many steps);
# counts, misses and the maximum cover every step.
DEFAULT_CAPACITY = 1 << 17


def sleep_until(deadline_ns: int, spin_ns: int) -> None:
    """Return at ``deadline_ns`` (perf_counter_ns) or just after: sleep, then spin the last ``spin_ns``."""
    remaining = deadline_ns - time.perf_counter_ns()
    if remaining > spin_ns:
        time.sleep((remaining - spin_ns) / 1e9)
    while time.perf_counter_ns() < deadline_ns:
        pass


class FixedRateClock:
    """Ticks at ``origin + k * period_ns``; ``start()`` sets the origin, each ``wait()`` the next tick."""

    def __init__(self, period_ns: int, *, spin_ns: int = int(DEFAULT_SPIN_US * 1e3)):
        if period_ns <= 0:
            raise DMMError(f"control period {period_ns} ns", "a positive period", "pass a period above 0 ns")
        self.period_ns = int(period_ns)
        self.spin_ns = max(0, int(spin_ns))
        self.skipped = 0
        self._origin = 0
        self._index = -1

    def start(self, origin_ns: int | None = None) -> None:
        """Tick 0 is ``origin_ns`` (default: now); the first ``wait`` returns at it."""
        self._origin = time.perf_counter_ns() if origin_ns is None else int(origin_ns)
        self._index = -1
        self.skipped = 0

    def wait(self) -> int:
        """Sleep until the next tick and return its time (ns). If the next tick's whole period has
        passed already, rejoin the grid at the latest tick that has come (skipped ticks are counted).
        """
        index = self._index + 1
        tick = self._origin + index * self.period_ns
        now = time.perf_counter_ns()
        if now >= tick + self.period_ns:
            latest = (now - self._origin) // self.period_ns
            self.skipped += latest - index
            index = latest
            tick = self._origin + index * self.period_ns
        else:
            sleep_until(tick, self.spin_ns)
        self._index = index
        return tick


@dataclass(frozen=True)
class LoopTimings:
    """The timing of a fixed-rate loop's steps (milliseconds)."""

    steps: int  # every step timed
    period_ms: float
    deadline_ms: float
    lateness: LatencyStats  # wake-up - tick, over the recorded steps
    compute: LatencyStats  # Policy.act alone
    misses: int  # steps whose action was ready after tick + deadline_ms (every step)
    skipped_ticks: int
    max_ready_ms: float  # the latest an action was ready after its tick (every step)

    def to_dict(self) -> dict:
        return {
            "steps": self.steps, "period_ms": self.period_ms, "deadline_ms": self.deadline_ms,
            "tick_lateness_ms": {"p50": self.lateness.p50, "p99": self.lateness.p99, "max": self.lateness.max},
            "compute_ms": {"p50": self.compute.p50, "p99": self.compute.p99, "p99.9": self.compute.p999,
                           "max": self.compute.max},
            "deadline_misses": self.misses, "skipped_ticks": self.skipped_ticks, "max_ready_ms": self.max_ready_ms,
        }

    def summary(self) -> str:
        return (f"period {self.period_ms:g} ms, {self.steps} steps: tick lateness p50 {self.lateness.p50:.3f} "
                f"p99 {self.lateness.p99:.3f} max {self.lateness.max:.3f} ms; compute p50 {self.compute.p50:.3f} "
                f"p99 {self.compute.p99:.3f} p99.9 {self.compute.p999:.3f} max {self.compute.max:.3f} ms; "
                f"deadline {self.deadline_ms:g} ms: {self.misses} missed; {self.skipped_ticks} ticks skipped")


class ControlLoop:
    """`Policy.act` on a fixed-rate clock, timed per step (see the module docstring).

    period_ms: the control period; deadline_ms: how long after its tick an action may be
    ready (default: the period); spin_us: the busy wait before each tick; capacity: steps
    whose timings are kept for the percentiles (preallocated, a ring beyond).
    """

    def __init__(self, policy, period_ms: float, *, deadline_ms: float | None = None,
                 spin_us: float = DEFAULT_SPIN_US, capacity: int = DEFAULT_CAPACITY):
        if not period_ms > 0:
            raise DMMError(f"--period-ms {period_ms}", "a positive number of milliseconds",
                           "pass --period-ms above 0")
        if deadline_ms is not None and not deadline_ms > 0:
            raise DMMError(f"--deadline-ms {deadline_ms}", "a positive number of milliseconds",
                           "pass --deadline-ms above 0, or leave it out (the period)")
        if not spin_us >= 0:
            raise DMMError(f"--spin-us {spin_us}", "0 or more microseconds", "pass --spin-us 0 or more")
        if capacity < 1:
            raise DMMError(f"timing capacity {capacity}", "at least 1 step", "pass a capacity of 1 or more")
        self.policy = policy
        self.period_ms = float(period_ms)
        self.deadline_ms = float(deadline_ms if deadline_ms is not None else period_ms)
        self.clock = FixedRateClock(round(period_ms * NS_PER_MS), spin_ns=round(spin_us * 1e3))
        self._deadline_ns = round(self.deadline_ms * NS_PER_MS)
        self._lateness = np.zeros(capacity, dtype=np.int64)  # (capacity,) ns
        self._compute = np.zeros(capacity, dtype=np.int64)  # (capacity,) ns
        self._steps = 0
        self._misses = 0
        self._skipped = 0
        self._max_ready = 0
        self._tick = 0
        self._woke = 0
        self.last_compute_ns = 0

    @property
    def steps(self) -> int:
        """Steps timed so far."""
        return self._steps

    def start(self) -> None:
        """Tick 0 is now (call at each episode start; the timings keep accumulating)."""
        self._skipped += self.clock.skipped
        self.clock.start()

    def wait(self) -> None:
        """Sleep until the next tick."""
        self._tick = self.clock.wait()
        self._woke = time.perf_counter_ns()

    def act(self, observation, reward: float = 0.0, *, out: np.ndarray | None = None) -> np.ndarray:
        """``policy.act`` timed against the tick of the last ``wait``."""
        start = time.perf_counter_ns()
        action = self.policy.act(observation, reward, out=out)
        ready = time.perf_counter_ns()
        slot = self._steps % self._compute.size
        self._compute[slot] = self.last_compute_ns = ready - start
        self._lateness[slot] = self._woke - self._tick
        after_tick = ready - self._tick
        if after_tick > self._deadline_ns:
            self._misses += 1
        if after_tick > self._max_ready:
            self._max_ready = after_tick
        self._steps += 1
        return action

    def timings(self) -> LoopTimings:
        recorded = min(self._steps, self._compute.size)
        if recorded == 0:
            raise DMMError("loop timings: no timed step", "at least one step timed",
                           "call wait() then act() at least once before timings()")
        return LoopTimings(
            steps=self._steps, period_ms=self.period_ms, deadline_ms=self.deadline_ms,
            lateness=LatencyStats.from_ns(self._lateness[:recorded]),
            compute=LatencyStats.from_ns(self._compute[:recorded]),
            misses=self._misses, skipped_ticks=self._skipped + self.clock.skipped,
            max_ready_ms=self._max_ready / NS_PER_MS,
        )


# -- real-time options ------------------------------------------------------------------


@dataclass(frozen=True)
class RealtimeOptions:
    cpu: int | None = None  # pin the loop's thread to this core
    fifo: bool = False  # SCHED_FIFO at fifo_priority
    fifo_priority: int = DEFAULT_FIFO_PRIORITY
    freeze_gc: bool = True  # gc.freeze() + gc.disable() while the loop runs

    def settings(self) -> dict:
        """The options in words, as a run reports them."""
        return {"cpu": self.cpu, "scheduler": f"SCHED_FIFO {self.fifo_priority}" if self.fifo else "default",
                "gc": "frozen" if self.freeze_gc else "running"}


def pin_to_cpu(cpu: int) -> set[int]:
    """Run the calling thread on core ``cpu`` alone; returns the previous affinity set."""
    if not hasattr(os, "sched_setaffinity"):
        raise DMMError(f"--cpu {cpu}: this platform has no os.sched_setaffinity", "Linux", "leave --cpu out here")
    allowed = os.sched_getaffinity(0)
    if cpu not in allowed:
        raise DMMError(f"--cpu {cpu}: this process may run on CPUs {sorted(allowed)}", "one of those CPUs",
                       f"pass --cpu {min(allowed)} (or another of them), or leave --cpu out")
    os.sched_setaffinity(0, {cpu})
    return allowed


def request_fifo(priority: int) -> tuple[int, int]:
    """Switch the calling thread to SCHED_FIFO at ``priority``; returns the previous (policy, priority)."""
    if not hasattr(os, "sched_setscheduler"):
        raise DMMError("--realtime: this platform has no os.sched_setscheduler", "Linux",
                       "leave --realtime out here")
    lowest, highest = os.sched_get_priority_min(os.SCHED_FIFO), os.sched_get_priority_max(os.SCHED_FIFO)
    if not lowest <= priority <= highest:
        raise DMMError(f"SCHED_FIFO priority {priority}", f"{lowest}..{highest}",
                       f"pass a priority from {lowest} to {highest}")
    previous = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except PermissionError as error:
        raise DMMError(f"--realtime: SCHED_FIFO priority {priority} was refused ({error.strerror})",
                       "a user allowed real-time scheduling",
                       f"give it an rtprio limit (limits.conf 'USER - rtprio {priority}') or the CAP_SYS_NICE "
                       "capability, or leave --realtime out") from None
    return previous


@contextlib.contextmanager
def gc_paused(enabled: bool = True) -> Iterator[None]:
    """Freeze what lives and disable the collector inside; restore it on exit.

    No automatic collection runs inside, and one that a library forces (gc.collect) skips
    the frozen heap. The young generations are collected first (a few ms) so that their
    garbage is not frozen; a full collection (BENCHMARKS.md, design measurements: 120 ms with
    torch and gymnasium loaded) is left to the collector once it runs again, since garbage
    frozen here is only delayed to it.
    """
    if not enabled:
        yield
        return
    was_enabled = gc.isenabled()
    gc.collect(1)
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def realtime(options: RealtimeOptions) -> Iterator[dict]:
    """Apply ``options`` for the duration; yields what was applied (`RealtimeOptions.settings`)."""
    previous_affinity = previous_scheduler = None
    try:
        if options.cpu is not None:
            previous_affinity = pin_to_cpu(options.cpu)
        if options.fifo:
            previous_scheduler = request_fifo(options.fifo_priority)
        with gc_paused(options.freeze_gc):
            yield options.settings()
    finally:
        if previous_scheduler is not None:
            policy, priority = previous_scheduler
            os.sched_setscheduler(0, policy, os.sched_param(priority))
        if previous_affinity is not None:
            os.sched_setaffinity(0, previous_affinity)
