"""LeRobotDataset logs (v3.0, and v2.x's per-episode files), read with pyarrow; no videos needed.

The layout followed is LeRobot's ``CODEBASE_VERSION = "v3.0"`` (huggingface/lerobot,
src/lerobot/datasets/utils.py, lerobot 0.4): ``meta/info.json`` (codebase_version, fps, features)
and ``data/chunk-XXX/file-YYY.parquet`` with columns ``observation.state``, ``action``,
``timestamp``, ``frame_index``, ``episode_index``, ``index``, ``task_index`` and, where recorded,
``next.reward``, ``next.done``, ``next.success``. Episodes are the rows of one ``episode_index``, in
``frame_index`` order.

LeRobot logs no observation after an episode's last action, so each episode's last transition is
dropped. ``next.done`` mixes termination and truncation: it is read as a truncation (the episode
was stopped) unless ``--done-means terminated`` says the task ended there.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from contract.errors import DMMError, describe_error
from dmm_train.importing.arrays import build_episode
from dmm_train.importing.core import ReadLog, require_library
from dmm_train.importing.mapping import SPARSE_SUCCESS, ImportMapping

INFO_FILE = Path("meta") / "info.json"


def _column(table, name: str, file: str) -> np.ndarray:
    """A parquet column as numpy: (rows,) for scalars, (rows, d) for fixed or variable lists of numbers."""
    import pyarrow as pa

    column = table.column(name).combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) or \
            pa.types.is_large_list(column.type):
        lengths = set(column.value_lengths().to_pylist()) if not pa.types.is_fixed_size_list(column.type) \
            else {column.type.list_size}
        if len(lengths) > 1:
            raise DMMError(f"{file!r} column {name!r}: rows of {sorted(lengths)} values (mismatched lengths)",
                           "the same size in every row", f"map a column other than {name!r}, or fix the dataset")
        width = lengths.pop() if lengths else 0
        return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width)  # (rows, d)
    return column.to_numpy(zero_copy_only=False)  # (rows,)


def read_lerobot(source: Path, mapping: ImportMapping, *, rewards_from_log: bool) -> ReadLog:
    pq = require_library("pyarrow.parquet", "lerobot")
    pa = require_library("pyarrow", "lerobot")
    root = str(source)
    info_path = source / INFO_FILE
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DMMError(f"cannot read {str(info_path)!r} ({describe_error(error)})",
                       "a LeRobotDataset directory (meta/info.json and data/*/*.parquet)",
                       "pass the dataset's root directory, or the log's --format") from None
    version = str(info.get("codebase_version", ""))
    if not version.startswith(("v2", "v3")):
        raise DMMError(f"{str(info_path)!r}: codebase_version {version!r}", "v3.0 (or v2.x)",
                       "convert the dataset with LeRobot's v3.0 converter")
    files = sorted((source / "data").rglob("*.parquet"))
    if not files:
        raise DMMError(f"{root!r} has no data/*/*.parquet files", "LeRobot's data files",
                       "download the dataset's data files too, or pass its root directory")
    try:
        table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for damaged or mismatched files
        raise DMMError(f"cannot read the parquet files of {root!r} ({describe_error(error)})",
                       "LeRobot data files with one schema", "re-download or repair the damaged files") from None
    columns = set(table.column_names)
    features = info.get("features", {})
    defaults = {"observation": ("observation.state",), "action": ("action",)}
    changes = {key: value for key, value in defaults.items() if not getattr(mapping, key)}
    if mapping.reward is None and rewards_from_log and "next.reward" in columns:
        changes["reward"] = "next.reward"
    if not any((mapping.terminations, mapping.truncations, mapping.dones)) and "next.done" in columns:
        changes["dones"] = "next.done"
    if mapping.timestamps is None and "timestamp" in columns:
        changes["timestamps"] = "timestamp"
    if mapping.success is None and mapping.reward == SPARSE_SUCCESS and "next.success" in columns:
        changes["success"] = "next.success"
    mapping = dataclasses.replace(mapping, **changes)
    for key in ("episode_index", "frame_index"):
        if key not in columns:
            raise DMMError(f"{root!r} data has no {key!r} column", "LeRobot's episode_index and frame_index columns",
                           "pass a LeRobotDataset, or the log's --format")
    order = np.lexsort((_column(table, "frame_index", root), _column(table, "episode_index", root)))
    table = table.take(pa.array(order))
    episode_index = _column(table, "episode_index", root)  # (rows,)
    cache: dict[str, np.ndarray] = {}

    def full(name: str) -> np.ndarray | None:
        if name not in columns:
            return None
        if name not in cache:
            cache[name] = _column(table, name, root)
        return cache[name]

    starts = np.flatnonzero(np.diff(episode_index, prepend=episode_index[0] - 1))
    bounds = [*starts, len(episode_index)]
    episodes = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        def get(name: str, start=start, stop=stop):
            values = full(name)
            return None if values is None else values[start:stop]

        episodes.append(build_episode(get, root, int(episode_index[start]), mapping, keys=lambda: sorted(columns),
                                      label=lambda name: f"column {name}"))
    notes = [f"LeRobot {version} at {info.get('fps', '?')} fps"]
    if mapping.dones:
        notes.append(f"{mapping.dones} read as {mapping.done_means} "
                     f"({'--done-means truncated' if mapping.done_means == 'terminated' else '--done-means terminated'}"
                     " to change)")
    unknown = [name for name in (*mapping.observation, *mapping.action) if features and name not in features]
    if unknown:
        notes.append(f"columns {', '.join(unknown)} not in meta/info.json features")
    return ReadLog(episodes, [info_path, *files], mapping, "from the log", notes)
