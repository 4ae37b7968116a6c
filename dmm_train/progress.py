"""The progress line of long work (dataset generation, training), on stderr.

One shape for both: ``label: done/total unit (percent), rate, eta`` plus whatever the
caller adds (training adds loss and lr). On a terminal the line is redrawn in place at
most every ``tty_interval_s``; elsewhere (a log file, CI) a new line is printed at most
every ``log_interval_s``, so logs stay short. The last update always prints.
"""

from __future__ import annotations

import math
import sys
import time


class Progress:
    """``update(done, extra="")`` as work proceeds, ``close()`` at the end (or use as a context manager)."""

    def __init__(self, label: str, total: int, *, unit: str = "steps", start: int = 0,
                 tty_interval_s: float = 0.5, log_interval_s: float = 5.0, enabled: bool = True):
        self.label, self.total, self.unit = label, max(int(total), 1), unit
        self.start, self.enabled = int(start), enabled
        self.started = time.perf_counter()
        self.last = -math.inf
        self.tty = sys.stderr.isatty()
        self.interval_s = float(tty_interval_s if self.tty else log_interval_s)
        self.drawn = False

    def line(self, done: int, extra: str = "") -> str:
        elapsed = time.perf_counter() - self.started
        rate = (done - self.start) / max(elapsed, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        eta_text = f"{eta / 60:.1f} min" if math.isfinite(eta) else "?"
        text = (f"{self.label}: {done}/{self.total} {self.unit} ({min(done / self.total, 1.0):.0%})  "
                f"{rate:.1f} {self.unit}/s  eta {eta_text}")
        return f"{text}  {extra}" if extra else text

    def update(self, done: int, extra: str = "", *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not (force or done >= self.total or now - self.last >= self.interval_s):
            return
        self.last = now
        if self.tty:
            print(f"\r{self.line(done, extra)}\x1b[K", end="", file=sys.stderr, flush=True)
            self.drawn = True
        else:
            print(self.line(done, extra), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.drawn:
            print(file=sys.stderr, flush=True)
            self.drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
