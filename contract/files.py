"""Atomic file writes and content hashes, without torch (the runtime and the TensorRT builder use them too).

A write goes to a fsynced temporary file in the target's directory and is renamed over the
target, so a reader (or a crash) never sees a half-written artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from contract.errors import DMMError

HASH_CHUNK_BYTES = 1 << 20
LOCK_FILE = ".lock"  # held by the one process writing a run directory


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process umask."""
    # The umask can only be read by setting it; done once, at import, so that no other
    # thread ever creates a file under the momentary value.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


NEW_FILE_MODE = _new_file_mode()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename.

    The file gets the permissions of the one it replaces, or those of any new file (0666 less
    the umask), never the temporary file's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp makes its file private (0600); the artifact takes the mode it replaces, or a new
    # file's, so an engine or checkpoint stays readable by the service user that runs it.
    mode = path.stat().st_mode & 0o7777 if path.exists() else NEW_FILE_MODE
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks (plans and datasets can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, what: str = "training run") -> Iterator[None]:
    """Hold ``directory``'s lock for the duration: a second process that asks for it gets one DMMError.

    Two processes resuming one run (a scheduler that requeues a job still running, a command
    started twice) would interleave their checkpoints and metrics; the lock refuses the second
    one instead. It is an advisory ``flock`` on ``directory/.lock``, released by the kernel when
    the holder exits however it exits, so a killed run never leaves a stale lock behind. Where
    ``fcntl`` is missing (Windows) no lock is taken.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with _held(directory, what, fcntl):
            yield
    except BaseException:
        # A run that failed before writing anything (a bad option, a missing dataset) leaves no
        # directory behind, as it would without the lock.
        if created and [path.name for path in directory.iterdir()] == [LOCK_FILE]:
            (directory / LOCK_FILE).unlink(missing_ok=True)
            directory.rmdir()
        raise


def lock_holder(directory: str | os.PathLike) -> int | None:
    """The process id holding ``directory``'s lock, or None when no live process holds it.

    It reads the id the holder wrote and asks whether that process still lives, rather than
    probing the lock, since a probe could make a run that starts at that instant fail.
    """
    try:
        pid = int((Path(directory) / LOCK_FILE).read_text().strip())
        os.kill(pid, 0)
    except PermissionError:  # alive, owned by another user
        return pid
    except (OSError, ValueError):  # no lock file, no id in it, or no such process
        return None
    return pid


@contextlib.contextmanager
def _held(directory: Path, what: str, fcntl) -> Iterator[None]:
    with open(directory / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise DMMError(f"{str(directory)!r} is in use by another {what} (process {holder}); expected one "
                           "process per run directory; wait for that one to finish or stop it, or pass another "
                           "--out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()  # released: no holder to name (a killed holder's id names a dead process)
            fcntl.flock(handle, fcntl.LOCK_UN)
