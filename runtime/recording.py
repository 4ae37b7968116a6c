"""A recorded closed-loop trajectory of a plant, and teacher-forced replay of a Policy along it.

Torch-free: the parity harness (`export.parity`), the accuracy reports and ``cli.py doctor``
record one trajectory with a reference Policy, then feed every other backend the same
observations and rewards, overwriting its history with the executed actions
(`Policy.override_action`), so all condition on the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.policy import Policy


@dataclass(frozen=True)
class Trajectory:
    """T recorded steps of a plant, episodes concatenated (``starts`` marks each reset)."""

    observations: np.ndarray  # (T, S) float64, raw o_t
    actions: np.ndarray  # (T, Adim) float32, the executed a_t
    rewards: np.ndarray  # (T,) float64, r_t received for a_t
    starts: np.ndarray  # (T,) bool, True where an episode begins

    @property
    def steps(self) -> int:
        return int(self.observations.shape[0])

    @property
    def episodes(self) -> int:
        return int(self.starts.sum())

    def step_in_episode(self) -> np.ndarray:
        """(T,) int64, 1-based index of each step within its episode."""
        index = np.arange(self.steps)
        last_start = np.maximum.accumulate(np.where(self.starts, index, 0))  # (T,)
        return index - last_start + 1


def record_trajectory(policy: Policy, plant, *, steps: int, seed: int) -> Trajectory:
    """Roll ``policy`` in ``plant`` closed loop for ``steps`` steps; episode i is seeded seed + i."""
    manifest = policy.manifest
    observations = np.empty((steps, manifest.state_dim), dtype=np.float64)  # (T, S)
    actions = np.empty((steps, manifest.act_dim), dtype=np.float32)  # (T, Adim)
    rewards = np.empty(steps, dtype=np.float64)  # (T,)
    starts = np.zeros(steps, dtype=bool)  # (T,)
    done, episode, reward = True, 0, 0.0
    for t in range(steps):
        if done:
            observation, _ = plant.reset(seed=seed + episode)
            policy.reset()
            starts[t], episode, reward = True, episode + 1, 0.0
        observations[t] = observation
        actions[t] = policy.act(observation, reward)
        observation, reward, terminated, truncated, _ = plant.step(actions[t])
        rewards[t] = reward
        done = terminated or truncated
    return Trajectory(observations, actions, rewards, starts)


def teacher_forced_actions(policy: Policy, trajectory: Trajectory) -> np.ndarray:
    """The actions (T, Adim) ``policy`` predicts along ``trajectory``, conditioned on its executed actions."""
    predicted = np.empty_like(trajectory.actions)  # (T, Adim)
    for t in range(trajectory.steps):
        if trajectory.starts[t]:
            policy.reset()
        reward = 0.0 if trajectory.starts[t] else trajectory.rewards[t - 1]
        predicted[t] = policy.act(trajectory.observations[t], reward)
        policy.override_action(trajectory.actions[t])
    return predicted
