"""Episode records: the frozen arrays of one episode, a whole dataset with its normalisation, and a content hash.

Symbols (docs/model.md#symbols): T steps in one episode, N steps in the whole dataset,
S state dim, Adim action dim. Arrays are read-only float32; the content hash covers the
episode arrays in order, so a regenerated dataset can be checked bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from contract.errors import DMMError
from dmm_train.config import STATE_STD_EPS

# Version tag hashed in front of the episode arrays; bump it if the hashed layout changes.
_HASH_FORMAT = b"dmm-deploy/episodes/v1"


@dataclass(frozen=True, eq=False)
class Episode:
    """One episode as the sampler sees it (arrays are read-only).

    observations: (T, S) float32, the state *before* each action; Minari's final
                  observation (after the last action) is dropped, as in the D4RL pickles
                  the official code trains on.
    actions:      (T, Adim) float32
    rewards:      (T,) float32
    terminated:   True if the episode ended in a terminal state (not a time limit).
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool

    def __post_init__(self) -> None:
        observations = _frozen_float32(self.observations)  # (T, S)
        actions = _frozen_float32(self.actions)  # (T, Adim)
        rewards = _frozen_float32(self.rewards)  # (T,)
        if observations.ndim != 2 or actions.ndim != 2 or rewards.ndim != 1:
            raise DMMError(
                f"episode arrays of shapes observations {observations.shape}, actions {actions.shape}, "
                f"rewards {rewards.shape}", "(T, S), (T, Adim) and (T,)",
                fix="give each episode 2-d observations and actions and 1-d rewards"
            )
        length = rewards.shape[0]
        if length < 1 or observations.shape[0] != length or actions.shape[0] != length:
            raise DMMError(
                f"episode with {observations.shape[0]} observations, {actions.shape[0]} actions and "
                f"{length} rewards", "the same T >= 1 for all three",
                fix="give each step of the episode one observation, one action and one reward"
            )
        object.__setattr__(self, "observations", observations)
        object.__setattr__(self, "actions", actions)
        object.__setattr__(self, "rewards", rewards)
        object.__setattr__(self, "terminated", bool(self.terminated))

    def __len__(self) -> int:
        return int(self.rewards.shape[0])


@dataclass(frozen=True, eq=False)
class OfflineDataset:
    """A whole offline dataset in memory, with the statistics training needs.

    state_mean, state_std: (S,) float32, over every state of every episode; the std
    already includes STATE_STD_EPS (as the official code's ``std + 1e-6``).
    content_hash: sha256 hex digest of the episode arrays in order (see
    ``hash_episodes``); the same data gives the same hash whatever the file format.
    ref_min_score, ref_max_score: D4RL-style reference returns from the Minari
    metadata, or None when the dataset has none.
    state_min, state_max: (S,) float32, per-dimension extremes over every state: the range
    the deployed policy has seen, from which export writes the observation range the
    runtime checks (`runtime.policy`).
    """

    dataset_id: str
    env_id: str
    episodes: tuple[Episode, ...]
    state_mean: np.ndarray
    state_std: np.ndarray
    content_hash: str
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    state_min: np.ndarray | None = None
    state_max: np.ndarray | None = None

    @classmethod
    def from_episodes(
        cls,
        dataset_id: str,
        env_id: str,
        episodes: Iterable[Episode],
        *,
        ref_min_score: float | None = None,
        ref_max_score: float | None = None,
    ) -> OfflineDataset:
        """Build a dataset from episodes, computing the normalisation stats and the hash."""
        episodes = tuple(episodes)
        if not episodes:
            raise DMMError(f"dataset {dataset_id!r} has no episodes", "at least one non-empty episode",
                           fix="import or collect a dataset with episodes")
        state_dims = {e.observations.shape[1] for e in episodes}
        act_dims = {e.actions.shape[1] for e in episodes}
        if len(state_dims) != 1 or len(act_dims) != 1:
            raise DMMError(
                f"dataset {dataset_id!r} mixes state dims {sorted(state_dims)} and action dims {sorted(act_dims)}",
                "one of each", fix="keep only the episodes of one robot/env in the dataset"
            )
        states = np.concatenate([e.observations for e in episodes]).astype(np.float64)  # (N, S)
        if not np.all(np.isfinite(states)):
            raise DMMError(f"dataset {dataset_id!r} has NaN or inf observations", "finite values",
                           fix="drop or repair the episodes with NaN or inf observations and import again")
        mean = states.mean(axis=0).astype(np.float32)  # (S,)
        std = (states.std(axis=0) + STATE_STD_EPS).astype(np.float32)  # (S,)
        return cls(
            dataset_id=dataset_id,
            env_id=env_id,
            episodes=episodes,
            state_mean=_freeze(mean),
            state_std=_freeze(std),
            content_hash=hash_episodes(episodes),
            ref_min_score=None if ref_min_score is None else float(ref_min_score),
            ref_max_score=None if ref_max_score is None else float(ref_max_score),
            state_min=_freeze(states.min(axis=0).astype(np.float32)),  # (S,)
            state_max=_freeze(states.max(axis=0).astype(np.float32)),  # (S,)
        )

    @property
    def state_dim(self) -> int:
        return int(self.episodes[0].observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.episodes[0].actions.shape[1])

    @property
    def episode_returns(self) -> np.ndarray:
        """(E,) float64, each episode's summed reward."""
        return np.array([float(np.sum(e.rewards)) for e in self.episodes])

    @property
    def total_steps(self) -> int:
        return sum(len(e) for e in self.episodes)

    @property
    def episode_lengths(self) -> np.ndarray:
        """(num_episodes,) int64."""
        return np.array([len(e) for e in self.episodes], dtype=np.int64)


def hash_episodes(episodes: Sequence[Episode]) -> str:
    """sha256 over the float32 little-endian bytes of each episode, in order.

    Each episode contributes its shape (T, S, Adim), its terminated flag, then its
    observations, actions and rewards; so the hash depends on the data only, not on
    the Minari storage format, the dataset id or the file layout.
    """
    digest = hashlib.sha256(_HASH_FORMAT)
    for episode in episodes:
        header = np.array(
            [len(episode), episode.observations.shape[1], episode.actions.shape[1], int(episode.terminated)],
            dtype="<i8",
        )
        digest.update(header.tobytes())
        for array in (episode.observations, episode.actions, episode.rewards):
            digest.update(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return digest.hexdigest()


def _freeze(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _frozen_float32(array) -> np.ndarray:
    out = np.array(array, dtype=np.float32, copy=True)
    return _freeze(out)
