"""rosbag2 (sqlite3 or MCAP storage) and plain MCAP logs, read with ``rosbags`` (no ROS install).

The user names ``topic:field`` entries for the observation (concatenated in the stated order), the
action and the reward; a field is a path into the message (``position``, ``pose.position.x``,
``data``), an array or a scalar. Messages are aligned to the control period: ticks run every
``period_ms`` from the first moment every observation and action topic has published, and each tick
takes, per topic, the latest message at or before it (never a later one). The reward of step k is
the latest reward message at or before tick k+1, the moment its outcome is observed; so the last
tick's observation is the episode's final observation and its action is dropped.

Episodes are cut at each message of a reset topic (a std_msgs/Bool cuts only when True), at a gap
in time longer than ``episode_gap_s`` with no observation or action message, and at
``max_episode_steps`` (those ends are truncations).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from contract.errors import DMMError, describe_error
from dmm_train.importing.core import LoggedEpisode, ReadLog, check_finite, require_library
from dmm_train.importing.mapping import SPARSE_SUCCESS, ImportMapping


@dataclasses.dataclass
class _Stream:
    """One topic field over time: times (M,) int ns, values (M, d) float64."""

    topic: str
    path: str
    times: np.ndarray
    values: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.topic}:{self.path}"


def _split(entry: str, what: str) -> tuple[str, str]:
    topic, sep, path = entry.rpartition(":")
    if not sep or not topic or not path:
        raise DMMError(f"{what} {entry!r}", "topic:field",
                       "write it as e.g. /joint_states:position or /odom:pose.pose.position.x")
    return topic, path


def _field(message, path: str):
    value = message
    for part in path.split("."):
        if not hasattr(value, part):
            fields = [f.name for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else []
            raise KeyError(f"no field {part!r} (fields: {', '.join(fields) or 'none'})")
        value = getattr(value, part)
    return value


def _stamp_ns(message) -> int:
    stamp = message.header.stamp
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _open(source: Path, fmt: str):
    highlevel = require_library("rosbags.highlevel", fmt)
    typesys = require_library("rosbags.typesys", fmt)
    if fmt == "mcap" and source.is_dir():
        raise DMMError(f"--format mcap with {str(source)!r}: a directory", "one .mcap file",
                       "use --format rosbag2 for a rosbag2 directory, or pass the .mcap file")
    if fmt == "rosbag2" and not source.is_dir():
        raise DMMError(f"--format rosbag2 with {str(source)!r}: a file", "a bag directory (with metadata.yaml)",
                       "use --format mcap for a single .mcap file, or pass the bag directory")
    try:
        reader = highlevel.AnyReader([source], default_typestore=typesys.get_typestore(typesys.Stores.LATEST))
        reader.open()
    except Exception as error:  # rosbags raises its own error types, FileNotFoundError and yaml errors
        raise DMMError(f"cannot open {str(source)!r} as {fmt} ({describe_error(error)})",
                       f"a {'rosbag2 directory' if fmt == 'rosbag2' else '.mcap file'}",
                       "pass an intact bag, or the log's --format") from None
    return reader


def _collect(reader, source: Path, entries: dict[str, list[str]], reset_topic: str | None,
             stamp: str) -> tuple[dict[str, _Stream], np.ndarray]:
    """The named fields of every message of the named topics; and the reset times (ns)."""
    file = str(source)
    topics = {topic for topic in entries} | ({reset_topic} if reset_topic else set())
    available = {c.topic for c in reader.connections}
    for topic in sorted(topics):
        if topic not in available:
            raise DMMError(f"{file!r} has no topic {topic!r}", f"one of {', '.join(sorted(available))}",
                           "name a topic the bag has")
    times: dict[str, list[int]] = {t: [] for t in entries}
    values: dict[tuple[str, str], list[np.ndarray]] = {(t, p): [] for t, paths in entries.items() for p in paths}
    resets: list[int] = []
    connections = [c for c in reader.connections if c.topic in topics]
    for connection, log_time, raw in reader.messages(connections=connections):
        topic = connection.topic
        try:
            message = reader.deserialize(raw, connection.msgtype)
        except Exception as error:
            raise DMMError(f"{file!r} topic {topic!r}: cannot decode a {connection.msgtype} message "
                           f"({describe_error(error)})", "messages of a known type",
                           "leave that topic out of the mapping, or record it with a standard message type") from None
        if stamp == "header":
            try:
                time = _stamp_ns(message)
            except AttributeError:
                raise DMMError(f"{file!r} topic {topic!r}: {connection.msgtype} has no header.stamp",
                               "stamped messages with stamp = 'header'", "use stamp = 'log'") from None
        else:
            time = int(log_time)
        if topic == reset_topic:
            data = getattr(message, "data", True)
            if not isinstance(data, (bool, np.bool_)) or data:
                resets.append(time)
            if topic not in entries:
                continue
        index = len(times[topic])
        times[topic].append(time)
        for path in entries[topic]:
            try:
                value = np.asarray(_field(message, path), dtype=np.float64).reshape(-1)
            except KeyError as error:
                raise DMMError(f"{file!r} topic {topic!r} message {index}: {error.args[0]} for field {path!r}",
                               "a field path such as position or pose.position.x",
                               "name one of the message's fields") from None
            except (TypeError, ValueError):
                raise DMMError(f"{file!r} topic {topic!r} field {path!r} message {index}: not numbers",
                               "a number or an array of numbers", "name a numeric field") from None
            bucket = values[(topic, path)]
            if bucket and value.shape != bucket[0].shape:
                raise DMMError(f"{file!r} topic {topic!r} field {path!r} message {index}: {value.size} values "
                               f"after {bucket[0].size} in the first message (mismatched lengths)",
                               "the same size in every message", "name a field of fixed size")
            bucket.append(value)
    streams = {}
    for (topic, path), rows in values.items():
        if not rows:
            raise DMMError(f"{file!r} topic {topic!r} has no messages", f"messages for {topic}:{path}",
                           "name a topic that published in this log")
        stream_times = np.asarray(times[topic], dtype=np.int64)  # (M,)
        back = np.flatnonzero(np.diff(stream_times) < 0)
        if back.size:
            i = int(back[0]) + 1
            raise DMMError(f"{file!r} topic {topic!r} message {i}: timestamp {stream_times[i] / 1e9:.9f} s goes "
                           f"backwards (after {stream_times[i - 1] / 1e9:.9f} s)",
                           f"non-decreasing {stamp} timestamps", "fix the clock, or use stamp = 'log'")
        streams[f"{topic}:{path}"] = _Stream(topic, path, stream_times, np.stack(rows))  # (M, d)
    return streams, np.asarray(sorted(resets), dtype=np.int64)


def _segments(streams: list[_Stream], resets: np.ndarray, gap_ns: int | None) -> list[tuple[int, int]]:
    """[start, end) time ranges of the episodes: cut at resets and at gaps with no message."""
    all_times = np.unique(np.concatenate([s.times for s in streams]))  # (K,)
    cuts = set(int(t) for t in resets)
    if gap_ns is not None:
        gaps = np.flatnonzero(np.diff(all_times) > gap_ns)
        cuts.update(int(all_times[i + 1]) for i in gaps)
    edges = sorted(cuts | {int(all_times[0])})
    end = int(all_times[-1]) + 1
    return [(a, b) for a, b in zip(edges, [*edges[1:], end], strict=True) if a < b]


def read_bag(source: Path, mapping: ImportMapping, *, rewards_from_log: bool) -> ReadLog:
    file = str(source)
    if not mapping.observation or not mapping.action:
        raise DMMError(f"--format {mapping.format} without the observation and action topics",
                       "--obs TOPIC:FIELD (repeat, in order) and --action TOPIC:FIELD",
                       "pass --obs and --action, or name them in the mapping file")
    if mapping.period_ms is None:
        raise DMMError(f"--format {mapping.format} without a control period",
                       "--period-ms P (each step takes the latest message at or before its tick)",
                       "pass --period-ms with the controller's period")
    reward_entry = mapping.reward if mapping.reward not in (None, SPARSE_SUCCESS) and rewards_from_log else None
    if rewards_from_log and mapping.reward is None:
        raise DMMError(f"--format {mapping.format} without a reward",
                       "--reward TOPIC:FIELD, --reward sparse-success or --reward-fn module:function",
                       "pass one of those")
    entries: dict[str, list[str]] = {}
    control = [*mapping.observation, *mapping.action]
    for entry in [*control, *([reward_entry] if reward_entry else []), *([mapping.success] if mapping.success
                                                                        else [])]:
        topic, path = _split(entry, "topic field")
        if path not in entries.setdefault(topic, []):
            entries[topic].append(path)
    reader = _open(source, mapping.format)
    try:
        streams, resets = _collect(reader, source, entries, mapping.reset_topic, mapping.stamp)
    finally:
        reader.close()
    control_streams = [streams[entry] for entry in control]
    period_ns = int(round(mapping.period_ms * 1e6))
    gap_ns = None if mapping.episode_gap_s is None else int(round(mapping.episode_gap_s * 1e9))
    episodes: list[LoggedEpisode] = []
    cut_by_length = 0
    for segment, (start, end) in enumerate(_segments(control_streams, resets, gap_ns)):
        inside = [(s, (s.times >= start) & (s.times < end)) for s in control_streams]
        if not any(mask.any() for _, mask in inside):
            continue  # nothing logged between two cuts: not an episode
        for stream, mask in inside:
            if not mask.any():
                raise DMMError(f"{file!r} topic {stream.topic!r}: no message in episode {segment} (from "
                               f"{start / 1e9:.3f} s to {end / 1e9:.3f} s, an empty episode)",
                               "every observation and action topic to publish in each episode",
                               "check the reset topic and --episode-gap-s")
        first = max(int(s.times[m][0]) for s, m in inside)
        # Ticks run while every observation topic has published; the action of the last tick is dropped,
        # so an action topic that stops one period earlier does not shorten the episode.
        last = min(int(s.times[m][-1]) for s, m in inside[: len(mapping.observation)])
        ticks = first + period_ns * np.arange(max(0, (last - first) // period_ns + 1), dtype=np.int64)  # (N,)
        if ticks.size < 2:
            raise DMMError(f"{file!r} episode {segment} (from {start / 1e9:.3f} s): {ticks.size} tick(s) of "
                           f"{mapping.period_ms:g} ms while every topic publishes (an empty episode)",
                           "at least 2 ticks (one transition)", "pass a shorter --period-ms, or check the episode cuts")
        aligned = {}
        for name, stream in streams.items():
            mask = (stream.times >= start) & (stream.times < end)
            aligned[name] = _align(stream, stream.times[mask], stream.values[mask], ticks, file, segment)
        steps = ticks.size - 1
        chunk = mapping.max_episode_steps or steps
        for begin in range(0, steps, chunk):
            stop = min(begin + chunk, steps)  # transitions begin..stop-1, observations begin..stop
            cut_by_length += stop < steps
            episodes.append(_episode(aligned, mapping, reward_entry, file, len(episodes), begin, stop,
                                     ended_by_log=stop == steps))
    notes = [f"aligned to {mapping.period_ms:g} ms ticks ({mapping.stamp} time)"]
    if cut_by_length:
        notes.append(f"{cut_by_length} episodes cut at --max-episode-steps {mapping.max_episode_steps}")
    return ReadLog(episodes, _bag_files(source), mapping, "from the log (the last tick's; its action dropped)",
                   notes)


def _align(stream: _Stream, times: np.ndarray, values: np.ndarray, ticks: np.ndarray, file: str,
           segment: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, d) values and (N,) indices of the latest message at or before each tick; index -1: none yet."""
    index = np.searchsorted(times, ticks, side="right") - 1  # (N,), never a message after the tick
    picked = values[np.maximum(index, 0)]  # (N, d)
    valid = index >= 0
    if valid.any():
        check_finite(picked[valid], file, f"topic {stream.topic} field {stream.path}", segment,
                     first_step=int(np.argmax(valid)))
    return picked, index


def _episode(aligned: dict, mapping: ImportMapping, reward_entry: str | None, file: str, index: int, begin: int,
             stop: int, *, ended_by_log: bool) -> LoggedEpisode:
    def rows(entries: tuple[str, ...], lo: int, hi: int) -> np.ndarray:
        return np.concatenate([aligned[e][0][lo:hi] for e in entries], axis=1)  # (hi-lo, sum d)

    observations = rows(mapping.observation, begin, stop)  # (T, S)
    final = rows(mapping.observation, stop, stop + 1)[0]  # (S,) the last tick's observation
    actions = rows(mapping.action, begin, stop)  # (T, A)
    rewards = None
    if reward_entry:
        values, indices = aligned[reward_entry]
        missing = np.flatnonzero(indices[begin + 1: stop + 1] < 0)
        if missing.size:
            raise DMMError(f"{file!r} topic {reward_entry.rpartition(':')[0]!r} episode {index} step "
                           f"{int(missing[0])}: no reward message at or before the step's end",
                           "the reward topic to publish from the first step on",
                           "record the reward from the start, or use --reward-fn module:function")
        if values.shape[1] != 1:
            raise DMMError(f"{file!r} topic {reward_entry!r}: {values.shape[1]} values per message", "one number",
                           "name a scalar field, e.g. /reward:data")
        rewards = values[begin + 1: stop + 1, 0]  # (T,): the reward observed at tick k+1
    success = None
    if mapping.success:
        values, indices = aligned[mapping.success]
        success = bool(indices[stop] >= 0 and values[stop, 0])
    end_flag = np.zeros(stop - begin, dtype=bool)
    end_flag[-1] = True
    terminated = ended_by_log and mapping.done_means == "terminated"
    names = {"observation": " + ".join(f"topic {e}" for e in mapping.observation),
             "action": " + ".join(f"topic {e}" for e in mapping.action), "reward": f"topic {reward_entry}"}
    return LoggedEpisode(file=file, index=index, observations=observations, actions=actions, rewards=rewards,
                         terminations=end_flag if terminated else None,
                         truncations=None if terminated else end_flag, final_observation=final, success=success,
                         names=names)


def _bag_files(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file())
    return [source]
