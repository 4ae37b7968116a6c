"""Per-step latency statistics (from perf_counter_ns samples) and their histogram."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from contract.errors import DMMError
from contract.files import atomic_write_bytes

NS_PER_MS = 1e6


@dataclass(frozen=True)
class LatencyStats:
    """Latency of ``count`` steps in milliseconds; ``misses`` counts steps slower than ``deadline_ms``."""

    count: int
    p50: float
    p99: float
    max: float
    mean: float
    deadline_ms: float | None
    misses: int
    p999: float = 0.0  # the 99.9th percentile

    @classmethod
    def from_ns(cls, samples_ns, deadline_ms: float | None = None) -> LatencyStats:
        """samples_ns: (n,) integer nanoseconds, one per step."""
        samples = np.asarray(samples_ns, dtype=np.float64) / NS_PER_MS  # (n,) ms
        if samples.size == 0:
            raise DMMError("latency samples: none", "at least one step", "run an episode first")
        misses = int((samples > deadline_ms).sum()) if deadline_ms is not None else 0
        return cls(
            count=int(samples.size),
            p50=float(np.percentile(samples, 50)),
            p99=float(np.percentile(samples, 99)),
            max=float(samples.max()),
            mean=float(samples.mean()),
            deadline_ms=deadline_ms,
            misses=misses,
            p999=float(np.percentile(samples, 99.9)),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        line = (f"latency p50 {self.p50:.3f} ms  p99 {self.p99:.3f} ms  p99.9 {self.p999:.3f} ms  "
                f"max {self.max:.3f} ms  ({self.count} steps)")
        if self.deadline_ms is not None:
            line += f"  deadline {self.deadline_ms:g} ms: {self.misses} missed"
        return line


def save_histogram(samples_ns, path: str | Path, *, deadline_ms: float | None = None,
                   title: str = "") -> Path:
    """Write a PNG histogram of per-step latencies (ms), with the deadline and p50/p99 marked, to exactly ``path``.

    The image is rendered in memory and written atomically (`contract.files.atomic_write_bytes`): a
    symlink at ``path`` is replaced, never written through; a directory there is refused with one line
    (matplotlib would have written PATH.png instead, under a name nobody asked for).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a robot or in CI
        import matplotlib.pyplot as plt
    except ImportError:
        raise DMMError("--histogram: matplotlib is not installed", "matplotlib for --histogram",
                       "pip install matplotlib, or leave --histogram out") from None
    stats = LatencyStats.from_ns(samples_ns, deadline_ms)
    samples = np.asarray(samples_ns, dtype=np.float64) / NS_PER_MS  # (n,) ms
    path = Path(path)
    figure, axes = plt.subplots(figsize=(7, 4))
    try:
        axes.hist(samples, bins=min(100, max(10, samples.size // 10)), color="tab:blue", alpha=0.8)
        axes.set_yscale("log")  # the tail (p99, max) is what matters in a control loop
        for value, label, style in ((stats.p50, "p50", "--"), (stats.p99, "p99", ":")):
            axes.axvline(value, color="black", linestyle=style, label=f"{label} {value:.3f} ms")
        if deadline_ms is not None:
            axes.axvline(deadline_ms, color="tab:red",
                         label=f"deadline {deadline_ms:g} ms ({stats.misses} missed)")
        axes.set_xlabel("policy.act latency (ms)")
        axes.set_ylabel("steps")
        axes.set_title(title or f"{stats.count} steps")
        axes.legend()
        figure.tight_layout()
        image = io.BytesIO()
        figure.savefig(image, format="png", dpi=100)  # PNG whatever the suffix: the file is the one named
    finally:
        plt.close(figure)
    atomic_write_bytes(path, image.getvalue())
    return path
