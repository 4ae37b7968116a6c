"""How many threads the heavy CPU work uses: chosen from the cores that are free now, not from the core count.

Why: on a machine shared with other busy processes, a thread pool wider than the free cores
is much slower than one thread, not just less fast: its threads spin or wait at barriers on
each other while the OS gives their core to another process (BENCHMARKS.md#training-under-load:
14x slower training with two busy processes on two cores). So:

- usable cores = the CPUs this process may run on (its affinity mask, else the CPU count);
- busy = the other runnable threads on the machine, measured as the average of ``procs_running``
  in /proc/stat over BUSY_SAMPLES samples BUSY_INTERVAL_S apart, less this sampling thread (else
  the 1-minute load average where /proc/stat is missing); a machine-wide count, so on a machine
  with more cores than the affinity mask it overestimates what competes for ours (the safe side);
- threads = usable cores - busy, rounded to the nearest integer, at least 1 and at most
  ``ceiling`` (the library's own default); ``--threads N`` overrides it.

`choose_threads` is the pure rule (tested with explicit numbers); `measure_machine` the
measurement; `prefer_passive_waiting` the environment set before torch starts its OpenMP pool:
passive waiting on a busy machine, OpenMP's own (brief spinning) on a quiet one, where it is
faster. At most one pool ever spins: the fused scan's pool follows the same count and spins
only when torch uses one thread. Torch-free.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from contract.errors import DMMError

BUSY_SAMPLES = 10
BUSY_INTERVAL_S = 0.01  # 10 samples over 0.1 s: short next to any run, long enough to average out blips
OVERRIDE_HINT = "--threads N to override"


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count chosen and why: ``cores`` usable, ``busy`` other runnable threads (None: unknown)."""

    threads: int
    cores: int
    busy: float | None
    source: str = ""  # where a given count comes from ("--threads", ...); "" when chosen from the free cores

    @property
    def requested(self) -> bool:
        return bool(self.source)

    def line(self) -> str:
        """The line at the start of a run: ``threads: 1 (2 cores, 2.1 busy: 0.0 free; --threads N to override)``."""
        if self.requested:
            return f"threads: {self.threads} ({self.source}; {self.cores} cores)"
        if self.busy is None:
            return f"threads: {self.threads} ({self.cores} cores, load unknown; {OVERRIDE_HINT})"
        free = max(self.cores - self.busy, 0.0)
        return f"threads: {self.threads} ({self.cores} cores, {self.busy:.1f} busy: {free:.1f} free; {OVERRIDE_HINT})"


def free_cores(cores: int, busy: float | None) -> int:
    """cores - busy rounded to the nearest integer (half down), at least 1; all of them when busy is unknown."""
    if busy is None:
        return max(1, cores)
    return max(1, math.ceil(cores - max(busy, 0.0) - 0.5))


def choose_threads(cores: int, busy: float | None, *, requested: int | None = None,
                   ceiling: int | None = None, source: str = "--threads") -> ThreadChoice:
    """The rule of this module's docstring. ``requested`` (from ``source``) wins; ``ceiling`` caps the
    automatic choice."""
    if requested is not None:
        check_threads(requested)
        return ThreadChoice(threads=requested, cores=cores, busy=busy, source=source)
    threads = free_cores(cores, busy)
    if ceiling is not None:
        threads = max(1, min(threads, ceiling))
    return ThreadChoice(threads=threads, cores=cores, busy=busy)


def check_threads(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DMMError(f"--threads {value!r}", "a positive integer",
                       "pass --threads 1 or more, or leave it out to follow the free cores")
    return value


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _procs_running() -> int | None:
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            for line in stat:
                if line.startswith("procs_running "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def busy_threads(samples: int = BUSY_SAMPLES, interval_s: float = BUSY_INTERVAL_S) -> float | None:
    """Other runnable threads on the machine now (see the module docstring); None where nothing tells."""
    counts = []
    for index in range(samples):
        if index:
            time.sleep(interval_s)
        count = _procs_running()
        if count is None:
            break
        counts.append(count - 1)  # this thread, running while it reads
    if counts:
        return max(0.0, sum(counts) / len(counts))
    if hasattr(os, "getloadavg"):
        return os.getloadavg()[0]
    return None


_measured_busy: list[float | None] = []  # this process's one measurement, taken before torch started


def measure_machine(requested: int | None = None, *, ceiling: int | None = None,
                    source: str = "--threads") -> ThreadChoice:
    """`choose_threads` for this machine (no measurement when ``requested`` is given). The busy count is
    the one `prefer_passive_waiting` measured in this process, so the wait policy and the count agree."""
    cores = usable_cores()
    if requested is not None:
        return choose_threads(cores, None, requested=requested, source=source)
    busy = _measured_busy[0] if _measured_busy else busy_threads()
    return choose_threads(cores, busy, ceiling=ceiling)


def prefer_passive_waiting(environ=None) -> bool:
    """On a busy machine, let OpenMP threads sleep, not spin, while they wait (unless the user chose a
    policy); returns whether it did.

    Effective only before the OpenMP runtime starts (before ``import torch`` in this process, or
    in a child's environment): libgomp reads OMP_WAIT_POLICY once. Where other processes compete
    for the cores, a spinning team keeps every thread of the pool on a core between torch's
    operators, taking it from them and from the fused scan's pool (11x slower training with two
    busy processes on two cores); passive waiting costs a wake-up per parallel region instead. On
    a quiet machine that wake-up is the dearer of the two (a step 1.4x slower on two cores), so
    there the OpenMP default stays. BENCHMARKS.md#training-under-load measures both.
    """
    environ = os.environ if environ is None else environ
    if not _measured_busy:
        _measured_busy.append(busy_threads())
    passive = waits_passively(usable_cores(), _measured_busy[0])
    if passive:
        environ.setdefault("OMP_WAIT_POLICY", "passive")
    return passive


def waits_passively(cores: int, busy: float | None) -> bool:
    """Whether OpenMP should wait passively: when other work leaves this process fewer free cores than usable
    ones (or the load cannot be read: the safe side)."""
    return busy is None or free_cores(cores, busy) < cores
