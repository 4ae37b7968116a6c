"""The import mapping: which keys, columns or topic fields make the observation, action and reward.

The mapping can live in a small TOML file (``--mapping FILE.toml``) so that the same import can be
repeated; options given on the command line override the file's values. A mapping file is data: it
never names code. The reward function (``--reward-fn module:function``) is taken from the command
line only, and a file that tries to name one is refused.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.errors import DMMError, describe_error
from contract.files import file_error

FORMATS = ("npz", "hdf5", "robomimic", "rosbag2", "mcap", "lerobot")
DONE_MEANS = ("truncated", "terminated")
STAMPS = ("log", "header")
SPARSE_SUCCESS = "sparse-success"

# Keys a file may not carry: each would decide what code runs.
_CODE_KEYS = ("reward_fn", "reward-fn", "reward_function", "module", "function", "entry_point")


@dataclass(frozen=True)
class ImportMapping:
    """How a log becomes episodes; every field has the meaning of the matching ``cli.py import`` option.

    observation, action: keys / columns / ``topic:field`` entries, concatenated in this order
    reward: a key / column / ``topic:field``; or "sparse-success" (1 at the end of a successful
        episode); None: the format's default reward column, where it has one
    success: the key / column / ``topic:field`` that says an episode succeeded (sparse-success;
        its value at the episode's last step); None: every episode counts as a success
    """

    format: str | None = None
    dataset_id: str | None = None
    observation: tuple[str, ...] = ()
    action: tuple[str, ...] = ()
    reward: str | None = None
    success: str | None = None
    next_observation: tuple[str, ...] = ()  # keys of the observation after each step (arrays formats)
    terminations: str | None = None
    truncations: str | None = None
    dones: str | None = None  # a done flag mixing termination and truncation: read per done_means
    done_means: str = "truncated"
    episode_starts: str | None = None
    episode_ends: str | None = None
    timestamps: str | None = None
    period_ms: float | None = None
    episode_gap_s: float | None = None
    max_episode_steps: int | None = None
    reset_topic: str | None = None
    stamp: str = "log"
    description: str | None = None
    # Where each value came from ("file" / "option"), for the provenance record; not a mapping key.
    origin: dict[str, str] = field(default_factory=dict, compare=False)

    def with_overrides(self, **options: Any) -> ImportMapping:
        """This mapping with every option that was given (not None, not empty) replacing the file's value."""
        given = {key: value for key, value in options.items() if value not in (None, ())}
        origin = {**self.origin, **{key: "option" for key in given}}
        return dataclasses.replace(self, **given, origin=origin)

    def validate(self) -> ImportMapping:
        if self.format not in FORMATS:
            raise DMMError(f"import format {self.format!r}", f"one of {', '.join(FORMATS)}",
                           "pass --format, or format = ... in the mapping file")
        if self.dataset_id is None:
            raise DMMError("no dataset id", "a dataset id namespace/name-vN",
                           "pass --dataset-id namespace/name-vN, or dataset_id = ... in the mapping file")
        if self.done_means not in DONE_MEANS:
            raise DMMError(f"done_means {self.done_means!r}", f"one of {', '.join(DONE_MEANS)}",
                           "set done_means to one of those")
        if self.stamp not in STAMPS:
            raise DMMError(f"stamp {self.stamp!r}", "'log' (the bag's receive time) or 'header' (each message's "
                           "header.stamp)", "set stamp to log or header")
        for name in ("period_ms", "episode_gap_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise DMMError(f"{name} {value!r}", "a positive number", f"set {name} above 0, or leave it out")
        if self.max_episode_steps is not None and not (
                isinstance(self.max_episode_steps, int) and self.max_episode_steps >= 1):
            raise DMMError(f"max_episode_steps {self.max_episode_steps!r}", "a positive integer",
                           "set max_episode_steps to 1 or more, or leave it out")
        return self

    def to_record(self) -> dict[str, Any]:
        """The mapping as plain JSON values, for the dataset's metadata."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "origin"}
        return {key: list(value) if isinstance(value, tuple) else value for key, value in record.items()}


_FIELDS = {f.name: f for f in dataclasses.fields(ImportMapping) if f.name != "origin"}
_LISTS = {"observation", "action", "next_observation"}


def load_mapping(path: str | os.PathLike) -> ImportMapping:
    """Read a TOML mapping file; unknown keys, wrong types and keys naming code are one-line errors."""
    path = Path(path)
    tomllib = _toml_library()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise file_error(error, path, action="read") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise DMMError(f"mapping file {str(path)!r}: not valid TOML ({describe_error(error)})",
                       "key = value lines such as observation = [\"observations\"]",
                       "fix the TOML at the line named") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _CODE_KEYS:
            raise DMMError(f"mapping file {str(path)!r} names code ({key} = {value!r})",
                           "data only (a mapping file never decides what code runs)",
                           "pass the reward function on the command line, --reward-fn module:function")
        name = key.replace("-", "_")
        if name not in _FIELDS:
            raise DMMError(f"mapping file {str(path)!r}: unknown key {key!r}", f"some of {', '.join(sorted(_FIELDS))}",
                           f"remove or rename {key!r}")
        values[name] = _coerce(path, name, value)
    return ImportMapping(**values, origin={name: "file" for name in values})


def _toml_library():
    """tomllib (Python 3.11+), else tomli, its backport; one line when neither is there."""
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise DMMError("a TOML mapping file: neither tomllib nor tomli is available",
                           "Python 3.11+ (tomllib) or the tomli package",
                           "pip install tomli, or pass the mapping as options") from None
    return tomllib


def _coerce(path: Path, name: str, value: Any) -> Any:
    if name in _LISTS:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
            raise DMMError(f"mapping file {str(path)!r}: {name} = {value!r}",
                           "a non-empty string or a list of them (concatenated in that order)",
                           f"write {name} = [\"KEY\", ...]")
        return tuple(items)
    if name in ("period_ms", "episode_gap_s"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif name == "max_episode_steps":
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = {"period_ms": "number", "episode_gap_s": "number", "max_episode_steps": "whole number"}
        raise DMMError(f"mapping file {str(path)!r}: {name} = {value!r}", f"a {expected.get(name, 'string')}",
                       f"give {name} a {expected.get(name, 'string')}")
    return float(value) if name in ("period_ms", "episode_gap_s") else value
