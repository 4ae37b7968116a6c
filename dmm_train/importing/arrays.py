"""Array logs: ``.npz`` and HDF5 (one group per episode, flat arrays with episode boundaries, robomimic).

Flat arrays hold every step of every episode in one array per key; the episodes are cut by an
``episode_ends`` or ``episode_starts`` array (indices, or per-step flags), else after every step
whose termination / truncation / done flag is set, else the file is one episode. Where the log has
the observation after each step (``next_observations``, robomimic's ``next_obs``), or an episode's
observations are one longer than its actions, the final observation comes from the log.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from contract.errors import DMMError, describe_error
from dmm_train.importing.core import LoggedEpisode, ReadLog, check_finite, check_time, require_library
from dmm_train.importing.mapping import SPARSE_SUCCESS, ImportMapping
from runtime.step_record import is_record, read_record

Getter = Callable[[str], "np.ndarray | None"]


def _first(candidates: tuple[str, ...], exists: Callable[[str], bool]) -> str | None:
    return next((name for name in candidates if exists(name)), None)


def with_defaults(mapping: ImportMapping, exists: Callable[[str], bool], *, rewards_from_log: bool,
                  observation=("observations",), action=("actions",), reward=("rewards",),
                  terminations=("terminations", "terminals"), truncations=("truncations", "timeouts"),
                  dones=("dones",), timestamps=("timestamps",), success=()) -> ImportMapping:
    """``mapping`` with each unset key given the first of its usual names that the log has."""
    changes: dict = {}
    if not mapping.observation:
        changes["observation"] = observation
    if not mapping.action:
        changes["action"] = action
    if mapping.reward is None and rewards_from_log:
        changes["reward"] = _first(reward, exists)
    if not mapping.next_observation:
        obs = changes.get("observation", mapping.observation)
        nexts = tuple(_next_name(name) for name in obs)
        if all(exists(name) for name in nexts):
            changes["next_observation"] = nexts
    flags_given = any((mapping.terminations, mapping.truncations, mapping.dones))
    if not flags_given:
        changes["terminations"] = _first(terminations, exists)
        changes["truncations"] = _first(truncations, exists)
        changes["dones"] = _first(dones, exists) if not (changes["terminations"] or changes["truncations"]) else None
    if mapping.timestamps is None:
        changes["timestamps"] = _first(timestamps, exists)
    if mapping.success is None and mapping.reward == SPARSE_SUCCESS:
        changes["success"] = _first(success, exists)
    return dataclasses.replace(mapping, **changes)


def _next_name(name: str) -> str:
    head, _, last = name.rpartition("/")
    if head.endswith("obs") and not head.endswith("next_obs"):  # robomimic: obs/KEY -> next_obs/KEY
        return f"{head[: -len('obs')]}next_obs/{last}"
    return f"{head}/next_{last}" if head else f"next_{name}"


def build_episode(get: Getter, file: str, index: int, mapping: ImportMapping, *,
                  keys: Callable[[], list[str]], label: Callable[[str], str] = str) -> LoggedEpisode:
    """One episode from named arrays (``get(name)``: the episode's rows of that array, None if absent)."""

    def read(name: str, *, required: bool = True) -> np.ndarray | None:
        values = get(name)
        if values is None:
            if required:
                raise DMMError(f"{file!r} has no {label(name)!r} (episode {index})",
                               f"one of {', '.join(keys()) or 'nothing: it is empty'}",
                               "name it with --obs / --action / --reward or in the mapping file")
            return None
        check_finite(values, file, label(name), index)
        return values

    def concat(names: tuple[str, ...], what: str) -> np.ndarray:
        parts = [read(name) for name in names]
        parts = [p.reshape(p.shape[0], int(np.prod(p.shape[1:], dtype=np.int64))) for p in parts]  # each (N, d)
        lengths = {p.shape[0] for p in parts}
        if len(lengths) != 1:
            described = ", ".join(f"{label(n)}: {p.shape[0]}" for n, p in zip(names, parts, strict=True))
            raise DMMError(f"{file!r} episode {index}: the {what} keys have different lengths ({described}, "
                           "mismatched lengths)", "one row per step in each",
                           f"choose {what} keys recorded at the same rate")
        return np.concatenate(parts, axis=1)  # (N, sum d)

    observations = concat(mapping.observation, "observation")  # (N or N+1, S)
    actions = concat(mapping.action, "action")  # (N, A)
    n = actions.shape[0]
    final = None
    if mapping.next_observation:
        next_observations = concat(mapping.next_observation, "next observation")  # (N, S)
        if next_observations.shape[0] != n:
            raise DMMError(f"{file!r} episode {index}: {next_observations.shape[0]} next observations for {n} "
                           "actions (mismatched lengths)", "one next observation per step",
                           "name matching next-observation keys in the mapping file, or fix the log")
        final = next_observations[-1] if n else None
    elif observations.shape[0] == n + 1:  # the episode stores its final observation itself
        observations, final = observations[:-1], observations[-1]
    rewards = None
    if mapping.reward not in (None, SPARSE_SUCCESS):
        rewards = read(mapping.reward)
    terminations = truncations = None
    if mapping.terminations:
        terminations = read(mapping.terminations)
    if mapping.truncations:
        truncations = read(mapping.truncations)
    if mapping.dones:
        dones = read(mapping.dones)
        if mapping.done_means == "terminated":
            terminations = dones
        else:
            truncations = dones
    if mapping.timestamps:
        stamps = read(mapping.timestamps, required=False)
        if stamps is not None:
            check_time(stamps.reshape(-1), file, label(mapping.timestamps), index)
    success = None
    if mapping.success:
        flags = read(mapping.success).reshape(-1)
        success = bool(flags[-1]) if flags.size else False
    if n == 0:
        raise DMMError(f"{file!r} {label(mapping.action[0])} episode {index}: an empty episode (0 steps)",
                       "at least one step per episode", "check the episode boundaries")
    names = {"observation": " + ".join(label(k) for k in mapping.observation),
             "action": " + ".join(label(k) for k in mapping.action),
             "reward": label(mapping.reward) if mapping.reward else "reward",
             "terminations": label(mapping.terminations or mapping.dones or "terminations"),
             "truncations": label(mapping.truncations or mapping.dones or "truncations")}
    return LoggedEpisode(file=file, index=index, observations=observations, actions=actions, rewards=rewards,
                         terminations=terminations, truncations=truncations, final_observation=final,
                         success=success, names=names)


def episode_ranges(arrays: Mapping[str, np.ndarray], file: str, mapping: ImportMapping,
                   total: int) -> tuple[list[tuple[int, int]], str]:
    """(start, end) row ranges of the episodes of flat arrays of ``total`` rows, and how they were found."""
    for key, kind in ((mapping.episode_ends, "ends"), (mapping.episode_starts, "starts"),
                      ("episode_ends", "ends"), ("episode_starts", "starts")):
        if key is None or key not in arrays:
            if key is not None and key in (mapping.episode_ends, mapping.episode_starts):
                raise DMMError(f"{file!r} has no {key!r}", f"one of {', '.join(sorted(arrays))}",
                               "name an episode boundary key the file has, or leave it out")
            continue
        values = np.asarray(arrays[key]).reshape(-1)
        if values.dtype == bool:
            if values.shape[0] != total:
                raise DMMError(f"{file!r} {key}: {values.shape[0]} flags for {total} steps (mismatched lengths)",
                               "one flag per step", "name a boundary key with one flag per step, or fix the log")
            marks = np.flatnonzero(values)
            cuts = marks + 1 if kind == "ends" else marks
        else:
            cuts = values.astype(np.int64)
        bounds = np.unique(np.concatenate([[0], cuts, [total]]))
        if bounds[0] < 0 or bounds[-1] > total or (cuts.size and (np.diff(cuts) <= 0).any()):
            raise DMMError(f"{file!r} {key}: {values.tolist()[:8]}...", f"increasing indices within 0..{total} "
                           f"(episode {kind})", f"name another episode {kind} key, or fix the log")
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)], f"episodes by {key}"
    flag_keys = [k for k in (mapping.terminations, mapping.truncations, mapping.dones) if k and k in arrays]
    if flag_keys:
        ends = np.zeros(total, dtype=bool)
        for key in flag_keys:
            flags = np.asarray(arrays[key]).reshape(-1).astype(bool)
            if flags.shape[0] != total:
                raise DMMError(f"{file!r} {key}: {flags.shape[0]} flags for {total} steps (mismatched lengths)",
                               "one flag per step", "name a flag key with one flag per step, or fix the log")
            ends |= flags
        bounds = np.unique(np.concatenate([[0], np.flatnonzero(ends) + 1, [total]]))
        return ([(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
                f"episodes cut after each {' / '.join(flag_keys)} step")
    return [(0, total)], "one episode (no episode boundaries in the file)"


def _flat_episodes(arrays: dict[str, np.ndarray], file: str, mapping: ImportMapping) -> tuple[list, str]:
    if mapping.action[0] not in arrays:
        raise DMMError(f"{file!r} has no {mapping.action[0]!r}", f"one of {', '.join(sorted(arrays))}",
                       "name the action with --action")
    total = int(np.asarray(arrays[mapping.action[0]]).shape[0])
    used = [*mapping.observation, *mapping.action, *mapping.next_observation, mapping.reward, mapping.terminations,
            mapping.truncations, mapping.dones, mapping.timestamps, mapping.success]
    for key in used:
        if key in arrays and np.asarray(arrays[key]).shape[0] != total:
            raise DMMError(f"{file!r} {key}: {np.asarray(arrays[key]).shape[0]} rows for {total} rows of "
                           f"{mapping.action[0]} (mismatched lengths)", "one row per step",
                           f"map keys with {total} rows, or fix the log")
    ranges, how = episode_ranges(arrays, file, mapping, total)
    episodes = []
    for index, (start, end) in enumerate(ranges):
        def get(name: str, start=start, end=end):
            return None if name not in arrays else np.asarray(arrays[name])[start:end]

        episodes.append(build_episode(get, file, index, mapping, keys=lambda: sorted(arrays)))
    return episodes, how


def _read_npz(source: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(source, allow_pickle=False) as archive:  # never unpickle a file from elsewhere
            return {key: archive[key] for key in archive.files}
    except ValueError as error:
        raise DMMError(f"{str(source)!r} holds object arrays or is damaged ({describe_error(error)})",
                       "numeric arrays (object arrays would need pickle, which is never loaded)",
                       "save the log with numeric arrays only") from None
    except OSError as error:
        raise DMMError(f"cannot read {str(source)!r} as .npz ({describe_error(error)})", "a numpy .npz archive",
                       "pass a .npz file, or the log's --format") from None


def _natural(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _hdf5_arrays(node, prefix: str = "") -> dict[str, np.ndarray]:
    """Every dataset under ``node``, by its path relative to it (e.g. ``obs/qpos``)."""
    import h5py

    found = {}
    for name, item in node.items():
        if isinstance(item, h5py.Dataset):
            found[prefix + name] = item[()]
        elif isinstance(item, h5py.Group):
            found.update(_hdf5_arrays(item, f"{prefix}{name}/"))
    return found


def read_arrays(source: Path, mapping: ImportMapping, *, rewards_from_log: bool) -> ReadLog:
    file = str(source)
    if mapping.format == "npz":
        files = [source]
        if is_record(source):  # a step record of a deployed policy (runtime/recording.py): its transitions
            record = read_record(source)
            arrays, files = record.transition_arrays(), list(record.files)
        else:
            arrays = _read_npz(source)
        mapping = with_defaults(mapping, arrays.__contains__, rewards_from_log=rewards_from_log,
                                success=("success", "successes"))
        episodes, how = _flat_episodes(arrays, file, mapping)
        return ReadLog(episodes, files, mapping, _final_note(mapping), [how])
    h5py = require_library("h5py", mapping.format)
    try:
        handle = h5py.File(source, "r")
    except OSError as error:
        raise DMMError(f"cannot read {file!r} as HDF5 ({describe_error(error)})", "an HDF5 file",
                       "pass an HDF5 file, or the log's --format") from None
    with handle:
        if mapping.format == "robomimic":
            return _read_robomimic(handle, source, mapping, rewards_from_log)
        groups = sorted((name for name, item in handle.items() if isinstance(item, h5py.Group)), key=_natural)
        flat = _hdf5_arrays(handle)
        action_key = (mapping.action or ("actions",))[0]
        if action_key in flat:  # flat arrays with boundaries
            mapping = with_defaults(mapping, flat.__contains__, rewards_from_log=rewards_from_log,
                                    success=("success", "successes"))
            episodes, how = _flat_episodes(flat, file, mapping)
            return ReadLog(episodes, [source], mapping, _final_note(mapping), [how])
        per_episode = [g for g in groups if action_key in handle[g]]
        if not per_episode:
            raise DMMError(f"{file!r} has neither a {action_key!r} dataset nor groups holding one",
                           "flat arrays or one group per episode", "name the action with --action")
        first = handle[per_episode[0]]
        mapping = with_defaults(mapping, first.__contains__, rewards_from_log=rewards_from_log,
                                success=("success", "successes"))
        episodes = []
        for index, group_name in enumerate(per_episode):
            group = handle[group_name]

            def get(name: str, group=group):
                return group[name][()] if name in group else None

            episodes.append(build_episode(get, file, index, mapping, keys=lambda g=group: sorted(_hdf5_arrays(g)),
                                          label=lambda name, g=group_name: f"{g}/{name}"))
        return ReadLog(episodes, [source], mapping, _final_note(mapping),
                       [f"one episode per group ({len(episodes)} groups)"])


def _read_robomimic(handle, source: Path, mapping: ImportMapping, rewards_from_log: bool) -> ReadLog:
    file = str(source)
    if "data" not in handle or not len(handle["data"]):
        raise DMMError(f"{file!r} has no data/demo_N groups", "the robomimic layout data/demo_N/{obs,actions,"
                       "rewards,dones}", "pass a robomimic file, or the log's --format (hdf5 for other layouts)")
    demos = sorted(handle["data"].keys(), key=_natural)
    first = handle["data"][demos[0]]
    notes = []
    if not mapping.observation:
        if "obs" not in first:
            raise DMMError(f"{file!r} data/{demos[0]} has no obs group", "robomimic's obs/KEY datasets",
                           "name the observation keys with --obs")
        keys = sorted(first["obs"].keys())
        mapping = dataclasses.replace(mapping, observation=tuple(f"obs/{k}" for k in keys))
        notes.append(f"observation = obs keys {', '.join(keys)} in sorted order (choose with --obs obs/KEY)")
    else:  # robomimic users name obs keys bare: eef_pos means obs/eef_pos
        mapping = dataclasses.replace(mapping, observation=tuple(
            k if "/" in k else f"obs/{k}" for k in mapping.observation))
    mapping = with_defaults(mapping, first.__contains__, rewards_from_log=rewards_from_log,
                            success=("success",))
    episodes = []
    for index, demo in enumerate(demos):
        group = handle["data"][demo]

        def get(name: str, group=group):
            return group[name][()] if name in group else None

        episodes.append(build_episode(get, file, index, mapping, keys=lambda g=group: sorted(_hdf5_arrays(g)),
                                      label=lambda name, d=demo: f"data/{d}/{name}"))
    return ReadLog(episodes, [source], mapping, _final_note(mapping), [*notes, f"{len(demos)} demos"])


def _final_note(mapping: ImportMapping) -> str:
    if mapping.next_observation:
        return f"from {' + '.join(mapping.next_observation)}"
    return "from the log (one observation more than actions)"
