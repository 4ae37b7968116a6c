"""The format-neutral core of ``cli.py import``: check logged episodes, complete them, write Minari.

A reader gives :class:`LoggedEpisode` records: per-step observations and actions, rewards and
done flags where the log has them, and the observation after the last action where the log has
it. Minari needs T+1 observations for T steps: with a final observation the episode keeps all its
steps; without one its last transition is dropped (its observation becomes the final one), and the
summary line says which.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.errors import DMMError, describe_error
from contract.files import file_error
from dmm_train.importing.mapping import SPARSE_SUCCESS, ImportMapping
from dmm_train.minari_writer import write_minari_dataset
from dmm_train.rollouts import Rollout

RewardFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class LoggedEpisode:
    """One episode as a reader found it, before the T+1 rule.

    observations: (N, S) the observation at each step
    actions: (N, A) the action taken at each step
    rewards: (N,) or None (none in the log: sparse-success or --reward-fn supply them)
    terminations, truncations: (N,) bool or None; at most the last entry True
    final_observation: (S,) the observation after the last action, or None (not in the log)
    success: the episode's success flag (sparse-success), or None
    names: what each array was read from (file, key/column/topic), for error lines
    """

    file: str
    index: int
    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray | None = None
    terminations: np.ndarray | None = None
    truncations: np.ndarray | None = None
    final_observation: np.ndarray | None = None
    success: bool | None = None
    names: dict[str, str] | None = None

    def where(self, what: str) -> str:
        name = (self.names or {}).get(what, what)
        return f"{self.file!r} {name} (episode {self.index})"


@dataclass(frozen=True)
class ImportResult:
    """What ``run_import`` wrote, and the summary line the CLI prints."""

    path: Path
    episodes: int
    steps: int
    state_dim: int
    act_dim: int
    content_hash: str
    summary: str


def check_finite(values: np.ndarray, file: str, name: str, episode: int | None = None, first_step: int = 0) -> None:
    """One line naming the file, the key/column/topic and the step of the first non-finite value."""
    values = np.asarray(values)
    if values.dtype.kind not in "fiub":
        raise DMMError(f"{file!r} {name}: dtype {values.dtype}", "numbers",
                       f"map {name} to a numeric key / column / field instead")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        rows = values.reshape(values.shape[0], -1) if values.ndim else values.reshape(1, 1)
        step = int(np.argmax(~np.isfinite(rows).all(axis=1)))
        where = f" episode {episode}" if episode is not None else ""
        raise DMMError(f"{file!r} {name}{where} step {first_step + step}: non-finite value "
                       f"{rows[step][~np.isfinite(rows[step])][0]}", "finite numbers", "drop or repair those samples")


def check_time(times: np.ndarray, file: str, name: str, episode: int | None = None, unit: str = "s") -> None:
    """Timestamps must never go backwards; one line naming the first step that does."""
    times = np.asarray(times)
    back = np.flatnonzero(np.diff(times) < 0)
    if back.size:
        step = int(back[0]) + 1
        where = f" episode {episode}" if episode is not None else ""
        raise DMMError(f"{file!r} {name}{where} step {step}: timestamp {times[step]} {unit} goes backwards (after "
                       f"{times[step - 1]} {unit})", "non-decreasing timestamps", "fix the log's clock or sort it")


def _as_2d(values: np.ndarray, episode: LoggedEpisode, what: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim == 1:
        values = values[:, None]  # (N,) scalar per step -> (N, 1)
    if values.ndim != 2:
        raise DMMError(f"{episode.where(what)}: shape {values.shape}", "(steps, dim) or (steps,)",
                       f"map the {what} to a key with one row per step")
    return values


def _flags(values: np.ndarray | None, n: int, episode: LoggedEpisode, what: str) -> np.ndarray:
    if values is None:
        return np.zeros(n, dtype=bool)
    flags = np.asarray(values).reshape(-1).astype(bool)
    if flags.shape[0] != n:
        raise DMMError(f"{episode.where(what)}: {flags.shape[0]} entries for {n} steps", "one entry per step",
                       f"map {what} to a flag with one entry per step")
    early = np.flatnonzero(flags[:-1])
    if early.size:
        raise DMMError(f"{episode.where(what)} step {int(early[0])}: set before the episode's last step {n - 1}",
                       "the flag set only at the last step", "give episode boundaries that end there")
    return flags


def complete_episode(episode: LoggedEpisode, *, need_rewards: bool) -> tuple[Rollout, bool]:
    """The Minari episode (T+1 observations) of ``episode``, and whether its last transition was dropped."""
    observations = _as_2d(episode.observations, episode, "observation")  # (N, S)
    actions = _as_2d(episode.actions, episode, "action")  # (N, A)
    n = actions.shape[0]
    if observations.shape[0] != n:
        raise DMMError(f"{episode.where('observation')}: {observations.shape[0]} observations for {n} actions "
                       f"({episode.where('action')}, mismatched lengths)", "one observation per action",
                       "map observation and action keys recorded at the same steps")
    rewards = None
    if episode.rewards is not None:
        rewards = np.asarray(episode.rewards, dtype=np.float64).reshape(-1)  # (N,)
        if rewards.shape[0] != n:
            raise DMMError(f"{episode.where('reward')}: {rewards.shape[0]} rewards for {n} actions (mismatched "
                           "lengths)", "one reward per step", "map a reward recorded at every step")
    elif need_rewards:
        raise DMMError(f"{episode.where('reward')}: the log has no reward", "a reward for every step",
                       "name one (--reward KEY), or use --reward sparse-success or --reward-fn module:function")
    terminations = _flags(episode.terminations, n, episode, "terminations")
    truncations = _flags(episode.truncations, n, episode, "truncations")
    dropped = episode.final_observation is None
    if dropped:
        # No observation after the last action: that transition cannot be stored; the episode now ends
        # where the log stopped observing, which is a truncation.
        if n < 2:
            raise DMMError(f"{episode.where('observation')}: {n} step(s) and no final observation",
                           "at least 2 steps (an empty episode once its last transition is dropped)",
                           "check the episode boundaries, or map the next observations")
        full_obs = observations  # (T+1, S), T = n-1
        actions, terminations = actions[:-1], np.zeros(n - 1, dtype=bool)
        truncations = np.zeros(n - 1, dtype=bool)
        truncations[-1] = True
        rewards = None if rewards is None else rewards[:-1]
    else:
        if n < 1:
            raise DMMError(f"{episode.where('action')}: an empty episode (0 steps)", "at least one step",
                           "check the episode boundaries")
        final = np.asarray(episode.final_observation).reshape(1, -1)  # (1, S)
        if final.shape[1] != observations.shape[1]:
            raise DMMError(f"{episode.where('observation')}: final observation of size {final.shape[1]}",
                           f"{observations.shape[1]} like the others", "map next observations of the same keys")
        full_obs = np.concatenate([observations, final], axis=0)  # (T+1, S)
        if not (terminations[-1] or truncations[-1]):
            truncations = truncations.copy()
            truncations[-1] = True  # the log ends the episode there without a termination
    t = actions.shape[0]
    rollout = Rollout(
        observations=np.ascontiguousarray(full_obs, dtype=np.float64),  # (T+1, S)
        actions=np.ascontiguousarray(actions, dtype=np.float32),  # (T, A)
        rewards=np.zeros(t) if rewards is None else np.ascontiguousarray(rewards),  # (T,)
        terminations=terminations,  # (T,)
        truncations=truncations,  # (T,)
        seed=episode.index,
    )
    return rollout, dropped


def load_reward_fn(spec: str) -> RewardFn:
    """The user's ``module:function`` reward, named on the command line (never by a file)."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise DMMError(f"--reward-fn {spec!r}", "module:function", "pass e.g. --reward-fn my_rewards:reach_reward")
    added = os.getcwd() not in sys.path
    if added:  # the user's module usually sits in the directory they run from
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise DMMError(f"--reward-fn {spec!r}: cannot import {module_name!r} ({describe_error(error)})",
                       "an importable module", "run from its directory or put it on PYTHONPATH") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DMMError(f"--reward-fn {spec!r}: {module_name!r} has no function {function_name!r}",
                       "a function (observations, actions, next_observations) -> rewards",
                       f"define {function_name} in {module_name}, or name the function it has")
    return function


def _apply_reward_fn(function: RewardFn, spec: str, rollout: Rollout, index: int) -> np.ndarray:
    observations = rollout.observations[:-1]  # (T, S)
    next_observations = rollout.observations[1:]  # (T, S)
    try:
        rewards = np.asarray(function(observations.copy(), rollout.actions.copy(), next_observations.copy()),
                             dtype=np.float64).reshape(-1)
    except DMMError:
        raise
    except Exception as error:
        raise DMMError(f"--reward-fn {spec!r} failed on episode {index} ({describe_error(error)})",
                       "rewards (T,) for observations (T, S), actions (T, A), next observations (T, S)",
                       "fix the reward function for that episode") from None
    if rewards.shape[0] != len(rollout):
        raise DMMError(f"--reward-fn {spec!r} returned {rewards.shape[0]} rewards for episode {index} of "
                       f"{len(rollout)} steps", "one reward per step", "make the function return one reward per step")
    check_finite(rewards, f"--reward-fn {spec}", "rewards", index)
    return rewards


def _with_rewards(rollout: Rollout, rewards: np.ndarray) -> Rollout:
    return Rollout(observations=rollout.observations, actions=rollout.actions, rewards=rewards,
                   terminations=rollout.terminations, truncations=rollout.truncations, seed=rollout.seed)


def finish_episodes(episodes: Sequence[LoggedEpisode], mapping: ImportMapping,
                    reward_fn: str | None = None) -> tuple[list[Rollout], int, str]:
    """Rollouts in Minari's layout from ``episodes``; also how many lost their last transition, and
    a few words on where the rewards came from."""
    if not episodes:
        raise DMMError("the log holds no episode", "at least one episode",
                       "check the episode boundaries, topics and time range")
    sparse = mapping.reward == SPARSE_SUCCESS
    function = load_reward_fn(reward_fn) if reward_fn else None
    rollouts, dropped = [], 0
    for episode in episodes:
        rollout, was_dropped = complete_episode(episode, need_rewards=not (sparse or function))
        dropped += was_dropped
        if function is not None:
            rollout = _with_rewards(rollout, _apply_reward_fn(function, reward_fn, rollout, episode.index))
        elif sparse:
            rewards = np.zeros(len(rollout))
            rewards[-1] = 1.0 if episode.success in (None, True) else 0.0
            rollout = _with_rewards(rollout, rewards)
        rollouts.append(rollout)
    dims = {(r.observations.shape[1], r.actions.shape[1]) for r in rollouts}
    if len(dims) != 1:
        raise DMMError(f"the episodes mix observation/action sizes {sorted(dims)}", "one size of each",
                       "check that every message has the same field sizes")
    if function is not None:
        reward_note = f"rewards from --reward-fn {reward_fn}"
    elif sparse:
        reward_note = ("rewards sparse: 1 at the end of episodes whose " + mapping.success + " is set"
                       if mapping.success else "rewards sparse: 1 at the end of every episode (no success signal)")
    else:
        reward_note = f"rewards from {mapping.reward}"
    return rollouts, dropped, reward_note


def sha256_sources(paths: Sequence[Path], root: Path) -> dict[str, str]:
    """sha256 of each source file, keyed by its path relative to ``root`` (or its name)."""
    digests = {}
    for path in sorted(paths):
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as error:
            raise file_error(error, path, action="read") from None
        key = path.name if path == root else str(path.relative_to(root))
        digests[key] = digest.hexdigest()
    return digests


def write_import(rollouts: Sequence[Rollout], mapping: ImportMapping, provenance: dict, *,
                 out: str | os.PathLike | None, overwrite: bool) -> Path:
    """Write the rollouts as a Minari dataset with no env: the spaces come from the data."""
    import gymnasium as gym

    state_dim = rollouts[0].observations.shape[1]
    act_dim = rollouts[0].actions.shape[1]
    observation_space = gym.spaces.Box(-np.inf, np.inf, (state_dim,), np.float64)
    action_space = gym.spaces.Box(-np.inf, np.inf, (act_dim,), np.float32)
    description = (mapping.description or f"imported from {mapping.format} logs by dmm-deploy")
    description += "\nimport: " + json.dumps(provenance, sort_keys=True)
    with warnings.catch_warnings():
        # Minari warns that a dataset without an env has no env spec: that is what an import is.
        warnings.filterwarnings("ignore", message=r"(`eval_env` is set to None|env_spec is None)", category=UserWarning)
        return write_minari_dataset(mapping.dataset_id, rollouts, None, algorithm_name=f"import ({mapping.format})",
                                    description=description, data_path=out, overwrite=overwrite,
                                    observation_space=observation_space, action_space=action_space)


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
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DMMError(f"importing {fmt}: the {name.split('.')[0]!r} package is not installed",
                       f"the {name.split('.')[0]!r} package for {fmt}", f"install it with {_INSTALL}") from None
