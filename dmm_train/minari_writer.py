"""Writing Minari datasets: episode buffers into a Minari store, atomically.

Datasets are written with ``minari.create_dataset_from_buffers`` (no jax needed,
unlike ``minari.DataCollector``). A write goes to a hidden staging store beside the
final location and is renamed into place at the end, so an interrupted write never
leaves a half dataset under the final id; Minari skips hidden directories when it
lists a store.

Minari writes through HDF5, which buffers its writes and, when the disk fills up mid-write,
crashes the process at close (a segfault inside the C library, after pages of warnings). The
write therefore runs in a forked child process (where ``fork`` exists): whatever happens to it,
the parent turns its end into one line naming the store, and removes the staging directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from contract.errors import DMMError, describe_error, error_parts
from contract.files import file_error
from dmm_train.minari_reader import DATASET_ID_RE
from dmm_train.rollouts import Rollout, mujoco_warnings_once

MINARI_STORE_ENV = "MINARI_DATASETS_PATH"


_STAGING_PREFIX = ".dmm-staging-"


_TRASH_PREFIX = ".dmm-trash-"


_NAMESPACE_METADATA_FILE = "namespace_metadata.json"


_AUTHOR = "dmm-deploy"


def check_dataset_id(dataset_id: str) -> None:
    if not isinstance(dataset_id, str) or not DATASET_ID_RE.fullmatch(dataset_id):
        raise DMMError(f"dataset id {dataset_id!r}",
                       "the Minari form namespace/name-vN (e.g. dmm-deploy/hopper-random-v0)",
                       fix="pass an id with a namespace, a name and a -vN version")


def store_root(data_path: str | os.PathLike | None = None) -> Path:
    """The Minari store to write into: ``data_path``, else $MINARI_DATASETS_PATH, else ~/.minari/datasets."""
    if data_path is not None:
        return Path(data_path).expanduser()
    from minari.storage import get_dataset_path

    return Path(get_dataset_path())


@contextlib.contextmanager
def _minari_store(path: Path) -> Iterator[None]:
    """Point Minari at ``path`` for the duration (Minari reads the store from the environment).

    Process-wide: not safe while another thread uses Minari.
    """
    previous = os.environ.get(MINARI_STORE_ENV)
    os.environ[MINARI_STORE_ENV] = str(path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(MINARI_STORE_ENV, None)
        else:
            os.environ[MINARI_STORE_ENV] = previous


def write_minari_dataset(
    dataset_id: str,
    rollouts: Sequence[Rollout],
    env_id: str | None,
    *,
    algorithm_name: str,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    description: str,
    data_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    observation_space=None,
    action_space=None,
) -> Path:
    """Write ``rollouts`` as Minari dataset ``dataset_id``; return its directory.

    ``data_path`` is the root of the Minari store to write into (the dataset lands in
    ``<data_path>/<dataset_id>/data``); None means the default store. The reference
    scores are stored only as a pair (Minari would otherwise estimate the missing
    one with 100 random episodes). The write is atomic: staged in a hidden
    directory of the same store, then renamed. An existing dataset of the same id is
    an error unless ``overwrite``. ``env_id`` None (a log with no simulator, ``cli.py import``) needs
    ``observation_space`` and ``action_space`` (gymnasium Boxes); the dataset then names no env.
    """
    check_dataset_id(dataset_id)
    if not rollouts:
        raise DMMError(f"no episodes to write for {dataset_id!r}", "at least one episode",
                       fix="roll out or import at least one episode")
    if (ref_min_score is None) != (ref_max_score is None):
        raise DMMError(f"ref_min_score={ref_min_score!r}, ref_max_score={ref_max_score!r}", "both or neither",
                       fix="pass both reference scores, or neither")
    root = store_root(data_path)
    final = root / dataset_id
    if final.exists() and not overwrite:
        raise DMMError(f"dataset {dataset_id!r} already exists at {str(final)!r}", "a dataset id not in the store",
                       fix="pass overwrite=True (--overwrite) to replace it, or choose another id")
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root))
    except OSError as error:
        raise file_error(error, root, "create the Minari store") from None
    try:
        _isolated(lambda: _write_into_store(staging, dataset_id, rollouts, env_id, algorithm_name=algorithm_name,
                                            ref_min_score=ref_min_score, ref_max_score=ref_max_score,
                                            description=description, observation_space=observation_space,
                                            action_space=action_space),
                  root, dataset_id)
        try:
            _copy_namespace_metadata(staging, root, dataset_id)
        except OSError as error:
            raise file_error(error, root, f"write dataset {dataset_id!r} into") from None
        _move_into_place(staging / dataset_id, final, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


_CHILD_ERROR = "dmm-writer-error:"  # marks the child's own report among the library's stderr lines
_CHILD_STDERR_KEPT = 1 << 16  # bytes of the child's stderr kept to explain a crash


def _isolated(write, root: Path, dataset_id: str) -> None:
    """Run ``write()`` in a forked child; its failure or crash becomes one DMMError naming ``root``.

    The child's stderr (HDF5's warnings) is captured, not shown: the errno HDF5 reports there
    explains a crash. Where there is no ``fork`` the write runs here.
    """
    what = f"write dataset {dataset_id!r} into"
    if not hasattr(os, "fork"):
        try:
            write()
        except OSError as error:
            raise file_error(error, root, what) from None
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 1
        try:
            os.dup2(write_end, 2)
            os.close(read_end)
            try:
                write()
                code = 0
            except BaseException as error:
                number = error.errno if isinstance(error, OSError) else None
                # "detail": the whole text, where HDF5 names the failed call's errno ("errno = 28").
                report = {"errno": number, "interrupted": isinstance(error, KeyboardInterrupt),
                          "detail": f"{type(error).__name__}: {error}", **_error_parts(error)}
                os.write(2, f"\n{_CHILD_ERROR}{json.dumps(report)}\n".encode())
        finally:
            os._exit(code)
    os.close(write_end)
    captured = b""
    try:
        with os.fdopen(read_end, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 14), b""):
                captured = (captured + chunk)[-_CHILD_STDERR_KEPT:]
        _, status = os.waitpid(pid, 0)
    except BaseException:  # Ctrl-C, SIGTERM: the child must not write on after the parent gave up
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return
    stderr = captured.decode(errors="replace")
    report = next((json.loads(line[len(_CHILD_ERROR):]) for line in reversed(stderr.splitlines())
                   if line.startswith(_CHILD_ERROR)), None)
    if report is not None and report["interrupted"]:
        raise KeyboardInterrupt  # Ctrl-C reached the child too: an interruption, as in the parent
    raise _child_failure(stderr, report, status, root, what)


def _error_parts(error: BaseException) -> dict[str, str]:
    """The child's error as the three parts of a DMMError (a library's error in the received part)."""
    parts = error_parts(error, "a dataset written", "check the free space and the store, and rerun")
    return dict(zip(("received", "expected", "fix"), parts, strict=True))


def _child_failure(stderr: str, report: dict | None, status: int, root: Path, what: str) -> DMMError:
    # HDF5 names the failed system call's errno in its own messages ("errno = 28"), raised or printed.
    number = report["errno"] if report is not None else None
    if number is None:
        number = next((int(n) for n in reversed(re.findall(r"errno = (\d+)", stderr))), None)
    if number is not None:
        return file_error(OSError(number, os.strerror(number)), root, what)
    if report is not None:
        return DMMError(f"cannot {what} {str(root)!r}: {report['received']}", report["expected"], fix=report["fix"])
    how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
           else f"exit status {os.WEXITSTATUS(status)}")
    return DMMError(f"cannot {what} {str(root)!r}: the writer process ended without a result ({how})",
                    "a dataset written", fix="check the free space and the store, and rerun")


def _write_into_store(store: Path, dataset_id: str, rollouts: Sequence[Rollout], env_id: str | None, *,
                      algorithm_name: str, ref_min_score: float | None, ref_max_score: float | None,
                      description: str, observation_space=None, action_space=None) -> None:
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = [
        EpisodeBuffer(
            id=index,  # Minari requires sequential ids from 0
            seed=rollout.seed,
            observations=rollout.observations,
            actions=rollout.actions,
            rewards=rollout.rewards,
            terminations=rollout.terminations,
            truncations=rollout.truncations,
            infos={},
        )
        for index, rollout in enumerate(rollouts)
    ]
    with _minari_store(store), warnings.catch_warnings(), mujoco_warnings_once():
        # Minari nags about optional provenance fields we have no value for.
        warnings.filterwarnings("ignore", message=r"`(author_email|code_permalink)` is set to None",
                                category=UserWarning)
        minari.create_dataset_from_buffers(
            dataset_id,
            buffers,
            env=env_id,
            eval_env=env_id,
            observation_space=observation_space,
            action_space=action_space,
            algorithm_name=algorithm_name,
            author=_AUTHOR,
            ref_min_score=ref_min_score,
            ref_max_score=ref_max_score,
            description=description,
            data_format="hdf5",
        )


def _copy_namespace_metadata(staging: Path, root: Path, dataset_id: str) -> None:
    """Give the final store the namespace markers Minari wrote in staging, where missing."""
    parts = dataset_id.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        relative = Path(*parts[:depth])
        source = staging / relative / _NAMESPACE_METADATA_FILE
        target = root / relative / _NAMESPACE_METADATA_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_file() and not target.exists():
            shutil.copyfile(source, target)


def _move_into_place(source: Path, final: Path, *, overwrite: bool) -> None:
    """Rename ``source`` to ``final``; an existing ``final`` is swapped out first if ``overwrite``."""
    trash = None
    if final.exists():
        if not overwrite:
            raise DMMError(f"dataset directory {str(final)!r} appeared while writing", "no dataset there",
                           fix="pass overwrite=True to replace it")
        trash = final.parent / f"{_TRASH_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
    try:
        os.rename(source, final)
    except OSError as exc:
        if trash is not None:
            os.rename(trash, final)
        raise DMMError(f"could not move the new dataset into {str(final)!r} ({describe_error(exc)})",
                       "no other process writing it", fix="retry, or pass overwrite=True") from exc
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
