"""Which reader reads a log, and what every reader hands back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from contract.errors import DMMError
from dmm_train.importing.core import LoggedEpisode
from dmm_train.importing.mapping import ImportMapping

_INSTALL = "pip install -e '.[robot]' (rosbags, pyarrow, h5py)"


@dataclass
class ReadLog:
    """A reader's result: the episodes, the files it read (hashed into the metadata), the mapping with
    the format's defaults filled in, where the final observations came from, and notes for the summary."""

    episodes: list[LoggedEpisode]
    files: list[Path]
    mapping: ImportMapping
    final_note: str
    notes: list[str] = field(default_factory=list)


def require_library(name: str, fmt: str):
    """Import an optional reader library, or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise DMMError(f"importing {fmt} needs the {name.split('.')[0]!r} package; install it with {_INSTALL}") \
            from None


def read_log(source: Path, mapping: ImportMapping, *, rewards_from_log: bool) -> ReadLog:
    if mapping.format in ("npz", "hdf5", "robomimic"):
        from dmm_train.importing.arrays import read_arrays

        return read_arrays(source, mapping, rewards_from_log=rewards_from_log)
    if mapping.format in ("rosbag2", "mcap"):
        from dmm_train.importing.rosbag import read_bag

        return read_bag(source, mapping, rewards_from_log=rewards_from_log)
    from dmm_train.importing.lerobot import read_lerobot

    return read_lerobot(source, mapping, rewards_from_log=rewards_from_log)
