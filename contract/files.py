"""Atomic, symlink-safe file writes, file sets, locks and content hashes, without torch.

Every file the project writes goes through :func:`atomic_write_bytes` (or its text / JSON
forms): the bytes go to a fsynced temporary file in the target's directory, which is renamed
over the target. A reader (or a crash) never sees a half-written artifact, and a symlink at the
target is replaced, never written through. A temporary file carries its writer's process id, so
one left by a killed writer is removed by the next write of the same target.

A set of files that only make sense together (an export: graph, manifest, data loader, inputs)
is written with :func:`atomic_write_set`: every member is staged first, then a journal naming
the renames is committed, and the renames follow. After a kill at any moment the directory holds
the complete old set or, once the journal is on disk, the complete new one: the next writer or
reader of that directory finishes the renames (:func:`complete_interrupted_sets`).

Operating-system failures (full disk, read-only directory, a path of the wrong kind, a name too
long, no permission) become one :class:`DMMError` line naming the path and what to do
(:func:`file_error`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from contract.errors import DMMError

HASH_CHUNK_BYTES = 1 << 20
LOCK_FILE = ".lock"  # held by the one process writing a run directory
SET_JOURNAL_SUFFIX = ".set.json"  # .NAME.set.json: the renames of a committed file set
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")

# What would have worked, and what to do, for each operating-system failure a write or read can meet.
_ADVICE = {
    errno.ENOSPC: ("enough free space on that disk", "free some space or write elsewhere"),
    errno.EDQUOT: ("enough room within your disk quota", "free some space within your quota or write elsewhere"),
    errno.EROFS: ("a writable file system (this one is read-only)", "write to a writable location"),
    errno.EACCES: ("a location you have permission for", "write to a location you own or fix its permissions"),
    errno.EPERM: ("a location you have permission for", "write to a location you own or fix its permissions"),
    errno.ENAMETOOLONG: ("a name the file system accepts (this one is too long)", "choose a shorter name"),
    errno.EISDIR: ("a file there, not a directory", "choose another path or remove the directory"),
    errno.ENOTDIR: ("a directory there, not a file", "choose another path"),
    errno.EEXIST: ("nothing of another kind there", "choose another path or remove what exists there"),
    errno.ENOENT: ("every part of the path to exist", "correct the path or create its missing directories"),
    errno.ELOOP: ("a regular file or directory, not a symlink", "point the path at a regular file or directory"),
    errno.EMFILE: ("fewer open files than the limit", "raise the limit (ulimit -n) or close other programs"),
}


def file_error(error: OSError, path: str | os.PathLike | None = None, action: str = "write") -> DMMError:
    """One line for an operating-system failure on ``path``: what failed, why, and what to do."""
    where = path if path is not None else error.filename
    reason = error.strerror or type(error).__name__
    expected, fix = _ADVICE.get(error.errno, ("a usable path on a working disk", "check the path and the disk"))
    if where is None:  # a library that dropped the path: say so rather than print a placeholder
        return DMMError(f"cannot {action} a file the library did not name ({reason})", expected, fix)
    return DMMError(f"cannot {action} {str(where)!r} ({reason})", expected, fix)


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process umask."""
    # The umask can only be read by setting it; done once, at import, so that no other
    # thread ever creates a file under the momentary value.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


NEW_FILE_MODE = _new_file_mode()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # alive, owned by another user
        return True
    except OSError:
        return False
    return True


def remove_orphan_temporaries(directory: Path, target_name: str | None = None) -> None:
    """Remove temporary files in ``directory`` (of ``target_name`` only, if given) whose writer is dead."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = _TEMPORARY.match(name)
        if not match or (target_name is not None and match["target"] != target_name):
            continue
        if int(match["pid"]) != os.getpid() and not _process_alive(int(match["pid"])):
            with contextlib.suppress(OSError):
                os.unlink(directory / name)


def _refuse_directory_target(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        raise DMMError(f"cannot write {str(path)!r}: it is a directory", "a file path there",
                       "choose another path or remove the directory")


def _stage(path: Path, data: bytes) -> Path:
    """``data`` in a fsynced temporary file beside ``path`` with the mode ``path`` should get; returns it."""
    _refuse_directory_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise file_error(error, path.parent, "create the directory") from None
    remove_orphan_temporaries(path.parent, path.name)
    # A new file gets open()'s mode, not the temporary file's private 0600; a replaced regular
    # file keeps its mode (lstat: a symlink's target is never consulted or touched).
    try:
        existing = os.lstat(path)
        mode = existing.st_mode & 0o7777 if not os.path.islink(path) else NEW_FILE_MODE
    except OSError:
        mode = NEW_FILE_MODE
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    with _temporary_removed_on_failure(temporary, path):
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    return temporary


@contextlib.contextmanager
def _temporary_removed_on_failure(temporary: Path, target: Path) -> Iterator[None]:
    """Whatever stops the block (an OS error, Ctrl-C) removes ``temporary``; an OS error becomes one line."""
    try:
        yield
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise file_error(error, target) from None
        raise


def _sync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable (a power cut keeps them)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename; raise a one-line DMMError.

    A symlink at ``path`` is replaced by the file, never written through. The file gets the
    permissions of the regular file it replaces, or those of any new file (0666 less the umask).
    """
    path = Path(path)
    temporary = _stage(path, data)
    with _temporary_removed_on_failure(temporary, path):
        os.replace(temporary, path)
    _sync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _journal_path(directory: Path, set_name: str) -> Path:
    return directory / f".{set_name}{SET_JOURNAL_SUFFIX}"


def atomic_write_set(files: Mapping[str | os.PathLike, bytes], set_name: str) -> None:
    """Write several files of one directory all or nothing.

    Each member is staged beside its target; a journal ``.SET_NAME.set.json`` listing the renames
    is then written atomically (the commit point) and the renames follow. A kill before the
    journal leaves the old set and orphan temporaries (removed by the next write); a kill after it
    leaves a journal that :func:`complete_interrupted_sets` finishes, giving the new set.
    """
    paths = [Path(path) for path in files]
    directories = {path.parent.resolve() for path in paths}
    if len(directories) != 1:
        raise DMMError(f"a file set spanning several directories ({', '.join(sorted(map(str, directories)))})",
                       "one directory per file set", "report this bug in the caller")
    directory = paths[0].parent
    complete_interrupted_sets(directory)
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in zip(paths, files.values(), strict=True):
            staged.append((_stage(path, data), path))
        journal = _journal_path(directory, set_name)
        atomic_write_json({"renames": [[temporary.name, path.name] for temporary, path in staged]}, journal)
    except BaseException:
        for temporary, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise
    _finish_set(directory, journal)


def _finish_set(directory: Path, journal: Path) -> None:
    try:
        renames = json.loads(journal.read_text())["renames"]
    except (OSError, ValueError, KeyError, TypeError):
        with contextlib.suppress(OSError):
            journal.unlink()  # not a journal of ours (or torn before its rename, which cannot happen)
        return
    for entry in renames:
        # The journal is read back from disk: only plain names in this directory, and only a
        # temporary file of the very target it names, may be renamed.
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(n, str) for n in entry)):
            continue
        temporary, target = entry
        match = _TEMPORARY.match(temporary)
        if "/" in temporary + target or not match or match["target"] != target:
            continue
        try:
            os.replace(directory / temporary, directory / target)
        except FileNotFoundError:
            pass  # renamed before the interruption
        except OSError as error:
            raise file_error(error, directory / target) from None
    _sync_directory(directory)
    with contextlib.suppress(FileNotFoundError):
        journal.unlink()


def complete_interrupted_sets(directory: str | os.PathLike) -> None:
    """Finish every file set whose renames a kill interrupted in ``directory`` (a no-op when there is none)."""
    directory = Path(directory)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(".") and name.endswith(SET_JOURNAL_SUFFIX):
            _finish_set(directory, directory / name)


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
def exclusive_lock(lock_path: str | os.PathLike, subject: str | os.PathLike, what: str,
                   advice: str) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``lock_path`` for the duration; a second holder gets one DMMError.

    The message says ``subject`` is in use by another ``what``, names the process holding it (its
    id is written into the file) and ends with ``advice`` (what to do). The kernel releases the lock
    when the holder exits however it exits, so a killed holder leaves no stale lock. The lock file is
    opened without following a symlink, so a planted link cannot make it truncate another file.
    Where ``fcntl`` is missing (Windows) no lock is taken.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path = Path(lock_path)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), NEW_FILE_MODE)
    except OSError as error:
        if error.errno == errno.ELOOP:
            # Refused, not replaced: a lock file swapped under a process about to lock it could let two
            # holders in; no process of ours ever locks through a link, so removing it is safe.
            raise DMMError(f"cannot lock {str(lock_path)!r}: a symlink stands where the lock file belongs",
                           "a regular file or none", "remove the symlink (its target is left untouched)") from None
        raise file_error(error, lock_path, "lock") from None
    with os.fdopen(fd, "r+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "unknown"
            raise DMMError(f"{str(subject)!r} is in use by another {what} (process {holder})",
                           f"one {what} at a time there", advice) from None
        try:
            # Unbuffered: a buffered write that fails (full disk) would fail again, with no path, at close.
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as error:
            raise file_error(error, lock_path, "lock") from None
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()  # released: no holder to name (a killed holder's id names a dead process)
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, what: str = "training run") -> Iterator[None]:
    """Hold ``directory``'s lock for the duration: a second process that asks for it gets one DMMError.

    Two processes resuming one run (a scheduler that requeues a job still running, a command
    started twice) would interleave their checkpoints and metrics; the lock refuses the second
    one instead (:func:`exclusive_lock` on ``directory/.lock``).
    """
    directory = Path(directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise file_error(error, directory, "create the directory") from None
    try:
        with exclusive_lock(directory / LOCK_FILE, directory, what,
                            "wait for that one to finish or stop it, or pass another --out"):
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
    except (OSError, ValueError):  # no lock file, or no id in it
        return None
    return pid if _process_alive(pid) else None
