"""Signal handlers set for the duration of a block, and given back after it."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def signal_handled(signum: int, handler) -> Iterator[None]:
    """``signal.signal(signum, handler)`` for the block; a thread other than the main one leaves it alone
    (only the main thread may set handlers)."""
    try:
        previous = signal.signal(signum, handler)
    except ValueError:  # not the main thread: signals are not ours to manage
        yield
        return
    try:
        yield
    finally:
        signal.signal(signum, previous)
