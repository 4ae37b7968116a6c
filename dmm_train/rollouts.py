"""Rollouts: a behaviour policy driving a gymnasium env, recorded as episode buffers.

A policy is a callable ``observation -> action`` (a shipped SAC actor, or "random"). Episode
i is reset with seed ``seed + i``, so a rollout is deterministic for a seed on a given machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from contract.errors import DMMError
from dmm_train.config import PRESETS
from runtime.plant import make_plant

Policy = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, eq=False)
class Rollout:
    """One episode as collected, in Minari's layout.

    observations: (T+1, S), including the observation after the last action
    actions:      (T, Adim) float32
    rewards:      (T,) float64
    terminations, truncations: (T,) bool; at most the last entry is True
    seed:         the ``env.reset`` seed of this episode
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminations: np.ndarray
    truncations: np.ndarray
    seed: int

    def __len__(self) -> int:
        return int(self.rewards.shape[0])


def rollout_episodes(
    env_id: str,
    policy: Policy | str = "random",
    *,
    n_episodes: int | None = None,
    n_steps: int | None = None,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> list[Rollout]:
    """Roll out ``policy`` in a real gymnasium env; deterministic for a given seed.

    Exactly one of ``n_episodes`` (whole episodes) and ``n_steps`` (total steps; the
    last episode is cut and marked truncated) must be given. Episode i is reset with
    seed ``seed + i``; the "random" policy samples the action space seeded with
    ``seed``. ``policy`` may also be any callable ``obs (S,) -> action (Adim,)``.
    ``on_step(steps_done)`` is called after every env step (progress reporting).
    """
    if (n_episodes is None) == (n_steps is None):
        raise DMMError(
            f"n_episodes={n_episodes!r}, n_steps={n_steps!r}; expected exactly one of them to be given"
        )
    budget = n_episodes if n_episodes is not None else n_steps
    if not isinstance(budget, (int, np.integer)) or budget < 1:
        raise DMMError(f"episode/step count {budget!r}; expected a positive integer")

    import gymnasium as gym

    env = make_plant(env_id)
    try:
        spaces = (env.observation_space, env.action_space)
        if not all(isinstance(space, gym.spaces.Box) for space in spaces):
            raise DMMError(
                f"environment {env_id!r} has {type(env.observation_space).__name__} observations and "
                f"{type(env.action_space).__name__} actions; expected Box spaces (MuJoCo locomotion)"
            )
        act = _resolve_policy(policy, env, seed)
        act_shape = env.action_space.shape
        rollouts: list[Rollout] = []
        steps_done = 0
        while True:
            if n_episodes is not None and len(rollouts) >= n_episodes:
                break
            if n_steps is not None and steps_done >= n_steps:
                break
            episode_seed = seed + len(rollouts)
            observation, _ = env.reset(seed=episode_seed)
            observations = [observation]
            actions, rewards, terminations, truncations = [], [], [], []
            while True:
                action = np.asarray(act(observation), dtype=env.action_space.dtype)
                if action.shape != act_shape:
                    raise DMMError(
                        f"policy returned an action of shape {action.shape}; "
                        f"expected {act_shape} for {env_id!r}"
                    )
                observation, reward, terminated, truncated, _ = env.step(action)
                steps_done += 1
                if on_step is not None:
                    on_step(steps_done)
                out_of_budget = n_steps is not None and steps_done >= n_steps
                observations.append(observation)
                actions.append(action)
                rewards.append(float(reward))
                terminations.append(bool(terminated))
                # Cutting an episode at the step budget is a truncation, like a time limit.
                truncations.append(bool(truncated) or (out_of_budget and not terminated))
                if terminated or truncated or out_of_budget:
                    break
            rollouts.append(Rollout(
                observations=np.asarray(observations),  # (T+1, S)
                actions=np.asarray(actions, dtype=np.float32),  # (T, Adim)
                rewards=np.asarray(rewards, dtype=np.float64),  # (T,)
                terminations=np.asarray(terminations, dtype=bool),  # (T,)
                truncations=np.asarray(truncations, dtype=bool),  # (T,)
                seed=episode_seed,
            ))
        return rollouts
    finally:
        env.close()


def _resolve_policy(policy: Policy | str, env, seed: int) -> Policy:
    if callable(policy):
        return policy
    if policy == "random":
        env.action_space.seed(seed)
        return lambda _observation: env.action_space.sample()
    if isinstance(policy, (str, os.PathLike)) and str(policy).endswith(".npz"):
        from dmm_train.behavior import MlpPolicy

        return MlpPolicy.load(policy)
    raise DMMError(
        f"policy {policy!r}; expected 'random', a path to a behaviour-policy .npz, "
        "or a callable obs -> action"
    )


def preset_for(env_or_preset: str):
    if env_or_preset in PRESETS:
        return PRESETS[env_or_preset]
    return next((p for p in PRESETS.values() if p.env_id == env_or_preset), None)
