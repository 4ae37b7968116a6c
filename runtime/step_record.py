"""The step record: every ``act`` call of a deployed `runtime.policy.Policy`, written as it happens.

`StepRecorder` writes it (``Policy(..., record=PATH)``, ``cli.py run --record PATH``), `read_record`
reads it back with numpy alone; it replays through the teacher forcing of `runtime.recording`
(``cli.py parity --replay``) and becomes training data (`StepRecord.transition_arrays`, read by
``cli.py import --format npz``). It is written as it happens, in chunks a writer thread writes
atomically, so that the loop never waits on the disk and a SIGKILLed run loses at most one chunk
and never leaves a half-written file. The format (a header.json and chunk-NNNNNN.npz files, one row
per ``act`` call and per ``end_episode``): docs/deployment.md#the-step-record.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.errors import DMMError, describe_error
from contract.files import atomic_write_bytes, atomic_write_json, exclusive_lock, file_error

RECORD_KIND = "dmm-step-record"
RECORD_FORMAT_VERSION = 1
RECORD_HEADER = "header.json"
DEFAULT_CHUNK_STEPS = 250  # 2 s of Hopper-v5 at 125 Hz: what a kill can lose at most
MAX_CHUNK_STEPS = 1_000_000
_CHUNK = re.compile(r"^chunk-(\d{6,})\.npz$")
EVENT_ACT, EVENT_TERMINATED, EVENT_TRUNCATED = 0, 1, 2
# Chunks queued for the writer thread before ``act`` waits for it (a disk slower than the loop).
_QUEUED_CHUNKS = 4
COLUMNS = {
    "observation": "(n, S) float64: the raw observation (NaN where it was not a vector of shape (S,))",
    "reward": "(n,) float64: the reward passed with it, for the previous action (NaN: not a number)",
    "rtg": "(n,) float32: the return-to-go the engine saw, divided by rtg_scale (NaN: a fault)",
    "action_policy": "(n, Adim) float32: the engine's action before the limits (NaN: the engine gave none)",
    "action": "(n, Adim) float32: the action sent (limited, held or safe; NaN: act raised, or an end row)",
    "fault": "(n,) int8: 0 good, else 1 + the index of the fault kind in fault_kinds",
    "step_ns": "(n,) int64: the time act took, recording excluded",
    "t": "(n,) int64: the policy's good steps since reset before the call",
    "episode_start": "(n,) bool: the first call after a reset",
    "event": "(n,) int8: 0 an act call; 1 / 2 the episode ended terminated / truncated (final observation, "
             "last reward)",
}


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}.npz"


class StepRecorder:
    """Writes one step record (see the module docstring) into ``path``, a new directory.

    ``add_step`` copies a row into preallocated buffers (no file work); every ``chunk_steps``
    rows the chunk goes to a writer thread that writes it atomically, so the control loop never
    waits on the disk unless it runs ahead of it by several chunks. ``close`` writes the rest.
    The directory is locked while recording: a second recorder into it is refused.
    """

    def __init__(self, path: str | os.PathLike, header: dict, *, state_dim: int, act_dim: int,
                 chunk_steps: int = DEFAULT_CHUNK_STEPS):
        if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, int) or not 1 <= chunk_steps <= MAX_CHUNK_STEPS:
            raise DMMError(f"record chunk steps {chunk_steps!r}", f"a whole number from 1 to {MAX_CHUNK_STEPS:,}",
                           f"pass --record-chunk-steps from 1 to {MAX_CHUNK_STEPS:,}")
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise DMMError(f"record {str(self.path)!r} is a file", "a new directory for the step record",
                           "choose another path")
        if (self.path / RECORD_HEADER).exists():
            raise DMMError(f"record {str(self.path)!r} already holds a step record",
                           "a new directory (a record is never appended to or overwritten)", "choose another path")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise file_error(error, self.path, "create the record directory") from None
        self._exit = contextlib.ExitStack()
        self._exit.enter_context(exclusive_lock(self.path / ".record.lock", self.path, "recording",
                                                "record into another directory"))
        self.chunk_steps = chunk_steps
        self.header = {"kind": RECORD_KIND, "format_version": RECORD_FORMAT_VERSION, **header,
                       "chunk_steps": chunk_steps, "columns": COLUMNS, "closed": False}
        atomic_write_json(self.header, self.path / RECORD_HEADER)
        self._observation = np.empty((chunk_steps, state_dim), dtype=np.float64)  # (C, S)
        self._action_policy = np.empty((chunk_steps, act_dim), dtype=np.float32)  # (C, Adim)
        self._action = np.empty((chunk_steps, act_dim), dtype=np.float32)  # (C, Adim)
        # The scalars of a row go to a list as one tuple (an append costs less than numpy item writes) and
        # become arrays per chunk.
        self._scalars: list[tuple] = []
        self._rows = 0  # rows in the buffers
        self._written_rows = 0
        self._chunks = 0
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUED_CHUNKS)
        self._writer = threading.Thread(target=self._write_chunks, name="dmm-step-record", daemon=True)
        self._writer.start()
        self.closed = False

    @property
    def rows(self) -> int:
        """Rows recorded so far (written or buffered)."""
        return self._written_rows + self._rows

    def add_step(self, observation, reward, rtg: float, action_policy, action, fault: int, step_ns: int,
                 t: int, episode_start: bool, event: int = EVENT_ACT) -> None:
        """One row; ``action_policy`` / ``action`` None: NaN (the engine gave none; act raised)."""
        if self._rows == self.chunk_steps:  # flushed here, not at the end of the last add: the row just
            self.flush()  # added stays in the buffer for override_action
        row = self._rows
        try:
            self._observation[row] = observation
        except (TypeError, ValueError):  # a faulty observation of another shape or kind
            self._observation[row] = np.nan
        self._action_policy[row] = np.nan if action_policy is None else action_policy
        self._action[row] = np.nan if action is None else action
        try:
            reward_value = float(reward)
        except (TypeError, ValueError):
            reward_value = float("nan")
        self._scalars.append((reward_value, rtg, fault, step_ns, t, episode_start, event))
        self._rows = row + 1

    def replace_last_action(self, action) -> None:
        """The caller executed ``action`` instead of the one just returned (`Policy.override_action`)."""
        if self._rows:
            self._action[self._rows - 1] = action

    def flush(self) -> None:
        """Hand the buffered rows to the writer thread (a no-op when there are none)."""
        self._raise_writer_error()
        if not self._rows:
            return
        rows = self._rows
        arrays = {"observation": self._observation[:rows].copy(), "action_policy": self._action_policy[:rows].copy(),
                  "action": self._action[:rows].copy()}
        dtypes = {"reward": np.float64, "rtg": np.float32, "fault": np.int8, "step_ns": np.int64, "t": np.int64,
                  "episode_start": bool, "event": np.int8}
        for name, values in zip(dtypes, zip(*self._scalars, strict=True), strict=True):  # rows -> columns
            arrays[name] = np.asarray(values, dtype=dtypes[name])
        self._scalars.clear()
        self._queue.put((self._chunks, arrays))
        self._chunks += 1
        self._written_rows += rows
        self._rows = 0

    def _write_chunks(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            index, arrays = item
            if self._error is not None:
                continue  # the record stops at the first chunk that could not be written
            try:
                buffer = io.BytesIO()
                np.savez(buffer, **arrays)
                atomic_write_bytes(self.path / chunk_name(index), buffer.getvalue())
            except Exception as error:  # reported by the control thread at its next flush or close
                self._error = error

    def _raise_writer_error(self) -> None:
        if self._error is None:
            return
        error, self._error = self._error, None
        if isinstance(error, OSError):
            raise file_error(error, self.path, "write the step record into") from None
        raise DMMError(f"step record {str(self.path)!r}: writing a chunk failed ({describe_error(error)})",
                       "a writable directory", "check the disk") from None

    def close(self) -> None:
        """Write the buffered rows and the final header; wait for the writer. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            self.flush()
        finally:
            self._queue.put(None)
            self._writer.join()
        try:
            self._raise_writer_error()
            atomic_write_json({**self.header, "closed": True, "rows": self._written_rows}, self.path / RECORD_HEADER)
        finally:
            self._exit.close()


@dataclass(frozen=True)
class StepRecord:
    """A step record read back: the header and every column over every chunk on disk."""

    path: Path
    header: dict
    columns: dict = field(repr=False)  # column name -> array over all rows (see COLUMNS)
    files: tuple[Path, ...] = field(repr=False, default=())

    @property
    def rows(self) -> int:
        return int(self.columns["event"].shape[0])

    @property
    def closed(self) -> bool:
        return bool(self.header.get("closed"))

    def _good_rows(self) -> np.ndarray:
        """(G,) indices of the act rows whose step was good (the policy's state advanced)."""
        return np.flatnonzero((self.columns["event"] == EVENT_ACT) & (self.columns["fault"] == 0))

    def engine_actions(self) -> np.ndarray:
        """(G, Adim) float32: the recorded engine's actions before the limits, within the action bounds, at the
        good steps (the rows of `runtime.recording.trajectory_of_record`): the reference a replay is compared with."""
        good = self._good_rows()
        actions = self.columns["action_policy"][good]  # (G, Adim)
        low, high = self.header.get("action_low"), self.header.get("action_high")
        if low is not None and high is not None:
            actions = np.clip(actions, np.float32(low), np.float32(high)).astype(np.float32)
        return actions

    def transition_arrays(self) -> dict[str, np.ndarray]:
        """The record as transitions in the flat-array layout ``cli.py import --format npz`` reads.

        observations (N, S), actions (N, Adim) as sent, rewards (N,), next_observations (N, S),
        terminations / truncations (N,) bool, episode_ends (E,) int64. A transition needs the next
        good observation of the same episode (or the final one of ``end_episode``): the last step
        before a fault, before a reset without ``end_episode``, or at the record's end is dropped, and
        the transition before it ends its episode as truncated.
        """
        columns = self.columns
        fields = {name: [] for name in ("observations", "actions", "rewards", "next_observations", "terminations",
                                        "truncations")}
        ends: list[int] = []
        previous = None  # the last good act row of the current segment, awaiting its next observation

        def close_segment(truncate: bool) -> None:
            if fields["truncations"] and (not ends or ends[-1] < len(fields["actions"])):
                if truncate:
                    fields["truncations"][-1] = True
                ends.append(len(fields["actions"]))

        def add(row: int, next_observation, reward: float, terminated: bool, truncated: bool) -> None:
            fields["observations"].append(columns["observation"][row])
            fields["actions"].append(columns["action"][row])
            fields["rewards"].append(reward)
            fields["next_observations"].append(next_observation)
            fields["terminations"].append(terminated)
            fields["truncations"].append(truncated)

        for row in range(self.rows):
            event, fault = columns["event"][row], columns["fault"][row]
            if event == EVENT_ACT and columns["episode_start"][row] and previous is not None:
                close_segment(truncate=True)  # a reset without end_episode: its last step has no successor
                previous = None
            if event != EVENT_ACT:
                if previous is not None:
                    add(previous, columns["observation"][row], float(columns["reward"][row]),
                        event == EVENT_TERMINATED, event == EVENT_TRUNCATED)
                    close_segment(truncate=False)
                previous = None
                continue
            if fault:
                if previous is not None:
                    close_segment(truncate=True)
                previous = None
                continue
            if previous is not None:
                add(previous, columns["observation"][row], float(columns["reward"][row]), False, False)
            previous = row
        if previous is not None:
            close_segment(truncate=True)
        if not fields["actions"]:
            raise DMMError(f"record {str(self.path)!r}: no complete transition",
                           "two good steps in a row or a step followed by end_episode", "record a longer run")
        state_dim, act_dim = self.header["state_dim"], self.header["act_dim"]
        return {
            "observations": np.asarray(fields["observations"], dtype=np.float64).reshape(-1, state_dim),
            "actions": np.asarray(fields["actions"], dtype=np.float32).reshape(-1, act_dim),
            "rewards": np.asarray(fields["rewards"], dtype=np.float64),
            "next_observations": np.asarray(fields["next_observations"], dtype=np.float64).reshape(-1, state_dim),
            "terminations": np.asarray(fields["terminations"], dtype=bool),
            "truncations": np.asarray(fields["truncations"], dtype=bool),
            "episode_ends": np.asarray(ends, dtype=np.int64),
        }


def is_record(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a step record's directory (it has the header)."""
    return (Path(path) / RECORD_HEADER).is_file()


def read_record(path: str | os.PathLike) -> StepRecord:
    """Read a step record (closed, or cut by a kill: every chunk on disk), numpy only, never pickle."""
    path = Path(path)
    header_path = path / RECORD_HEADER
    if not header_path.is_file():
        raise DMMError(f"record {str(path)!r}: no {RECORD_HEADER}",
                       "the directory written by Policy(record=PATH) or 'cli.py run --record PATH'",
                       "pass the directory of a step record")
    try:
        header = json.loads(header_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DMMError(f"record {str(path)!r}: {RECORD_HEADER} cannot be read ({describe_error(error)})",
                       "the JSON header of a step record",
                       "record again with 'cli.py run --record PATH' (the header is damaged)") from None
    if not isinstance(header, dict) or header.get("kind") != RECORD_KIND:
        raise DMMError(f"record {str(path)!r}: {RECORD_HEADER} is not a step record's header",
                       f"kind {RECORD_KIND!r}", "pass the directory of a step record")
    if header.get("format_version") != RECORD_FORMAT_VERSION:
        raise DMMError(f"record {str(path)!r}: format version {header.get('format_version')}",
                       f"{RECORD_FORMAT_VERSION}", "read it with the dmm-deploy version that wrote it")
    indices = sorted(int(match[1]) for name in os.listdir(path) if (match := _CHUNK.match(name)))
    # Chunks are written in order; a gap can only follow a failed write: what comes after it is not read.
    contiguous = [index for position, index in enumerate(indices) if index == position]
    files = [path / chunk_name(index) for index in contiguous]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in COLUMNS}
    for file in files:
        try:
            with np.load(file, allow_pickle=False) as archive:
                for name in COLUMNS:
                    parts[name].append(archive[name])
        except (OSError, ValueError, KeyError) as error:
            raise DMMError(f"record chunk {str(file)!r} cannot be read ({describe_error(error)})",
                           "a numpy .npz of the record's columns",
                           "remove it and the later chunks (the record ends before it)") from None
    state_dim, act_dim = int(header["state_dim"]), int(header["act_dim"])
    empty = {"observation": np.empty((0, state_dim)), "action_policy": np.empty((0, act_dim), np.float32),
             "action": np.empty((0, act_dim), np.float32)}
    columns = {name: np.concatenate(values) if values else empty.get(name, np.empty(0)) for name, values in
               parts.items()}
    return StepRecord(path, header, columns, (header_path, *files))


