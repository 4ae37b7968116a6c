"""Torch's and the fused scan's thread counts from one choice (`contract.threads`: the free cores, or --threads).

torch's intra-op pool and the scan kernel's pool get the same count; the scan's threads then
spin only while torch runs on one thread (`fused_scan.spin_ns`). The inter-op pool is left
alone: training runs one operator at a time.
"""

from __future__ import annotations

import torch

from contract.threads import ThreadChoice, measure_machine
from dmm_train import fused_scan


def use_threads(choice: ThreadChoice) -> ThreadChoice:
    """Set torch's intra-op threads and the scan pool to ``choice.threads``; returns ``choice``."""
    torch.set_num_threads(choice.threads)
    fused_scan.set_num_threads(choice.threads)
    return choice


def setup_threads(requested: int | None = None, *, source: str = "--threads") -> ThreadChoice:
    """Measure the machine (unless ``requested``), use the choice, and return it (its ``line()`` says why;
    ``source`` names where a requested count comes from).

    The automatic choice never exceeds torch's own default (its count before any change here).
    """
    return use_threads(measure_machine(requested, ceiling=_torch_default_threads(), source=source))


_TORCH_DEFAULT: int | None = None


def _torch_default_threads() -> int:
    """torch's count as first seen in this process (later calls here change it)."""
    global _TORCH_DEFAULT
    if _TORCH_DEFAULT is None:
        _TORCH_DEFAULT = torch.get_num_threads()
    return _TORCH_DEFAULT
