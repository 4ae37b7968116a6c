"""Recorded closed-loop trajectories, teacher-forced replay of a Policy along them, and step records.

Torch-free: the parity harness (`export.parity`), the accuracy reports and ``cli.py doctor``
record one trajectory with a reference Policy, then feed every other backend the same
observations and rewards, overwriting its history with the executed actions
(`Policy.override_action`), so all condition on the same tokens.

A step record (`runtime.step_record`: ``Policy(..., record=PATH)``, ``cli.py run --record PATH``)
is the same thing written by a deployed policy, every call of ``act`` as it happened; it replays
through the same teacher forcing (`trajectory_of_record`, `replay_record`, ``cli.py parity
--replay``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.errors import DMMError
from runtime.limits import ActuatorLimits
from runtime.loading import load_backend
from runtime.policy import Policy
from runtime.step_record import EVENT_ACT, read_record


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


def record_trajectory(policy, plant, *, steps: int, seed: int) -> Trajectory:
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


def teacher_forced_actions(policy, trajectory: Trajectory) -> np.ndarray:
    """The actions (T, Adim) ``policy`` predicts along ``trajectory``, conditioned on its executed actions.

    The engine's actions within the action bounds, before the actuator limits: a rate limit or a ramp
    depends on what was sent, not on the engine, and would hide (or fake) a difference between engines.
    """
    predicted = np.empty_like(trajectory.actions)  # (T, Adim)
    for t in range(trajectory.steps):
        if trajectory.starts[t]:
            policy.reset()
        reward = 0.0 if trajectory.starts[t] else trajectory.rewards[t - 1]
        policy.act(trajectory.observations[t], reward)
        predicted[t] = policy.engine_action
        policy.override_action(trajectory.actions[t])
    return predicted


def trajectory_of_record(record) -> Trajectory:
    """A step record's (`runtime.step_record.StepRecord`) good steps as a `Trajectory` (executed actions,
    episodes by reset) for teacher-forced replay.

    A faulty step never reached the policy's state, so it is left out; under on_fault hold / safe the
    finite reward it carried was kept for the next good step (runtime/policy.py), and is here too.
    """
    columns = record.columns
    keep_fault_rewards = record.header.get("on_fault") in ("hold", "safe")
    observations, actions, rewards, starts = [], [], [], []
    pending, new_episode = 0.0, True
    for row in range(record.rows):
        event, fault, reward = columns["event"][row], columns["fault"][row], float(columns["reward"][row])
        if event == EVENT_ACT and columns["episode_start"][row]:
            new_episode, pending = True, 0.0
        if event != EVENT_ACT:
            if not new_episode and rewards:
                rewards[-1] = pending + reward
            new_episode, pending = True, 0.0
            continue
        if fault:
            if keep_fault_rewards and np.isfinite(reward) and not new_episode:
                pending += reward
            continue
        if not new_episode and rewards:
            rewards[-1] = pending + reward  # the reward of the previous good step's action
        pending = 0.0
        observations.append(columns["observation"][row])
        actions.append(columns["action"][row])
        rewards.append(0.0)  # filled by the next good row or the episode's end
        starts.append(new_episode)
        new_episode = False
    if not observations:
        raise DMMError(f"record {str(record.path)!r}: no good step",
                       "at least one act call that returned the policy's action", "record a longer run")
    state_dim, act_dim = record.header["state_dim"], record.header["act_dim"]
    return Trajectory(np.asarray(observations, dtype=np.float64).reshape(-1, state_dim),
                      np.asarray(actions, dtype=np.float32).reshape(-1, act_dim),
                      np.asarray(rewards, dtype=np.float64), np.asarray(starts, dtype=bool))


@dataclass(frozen=True)
class Replay:
    """Engines teacher-forced on a step record: their actions beside the recorded engine's."""

    trajectory: Trajectory = field(repr=False)
    reference: np.ndarray = field(repr=False)  # (T, Adim) the recorded engine's actions before its limits
    actions: dict = field(repr=False)  # label -> (T, Adim) each replayed engine's, before limits
    mode: str
    env_id: str
    engine_label: str  # the recorded engine, in words


class _RangeFree:
    """A backend seen through a manifest without an observation range: a replay drives no robot, and a
    recorded observation that was good for the recorded engine must reach every replayed one."""

    def __init__(self, backend):
        self._backend = backend
        self.manifest = dataclasses.replace(backend.manifest, observation_low=None, observation_high=None)

    def __getattr__(self, name: str):
        return getattr(self._backend, name)


def replay_record(path: str | os.PathLike, engines, *, threads: int | None = 1) -> Replay:
    """Teacher-force every engine of ``engines`` (.onnx, .c, .plan, model.pt: a .pt in the record's mode) on
    the record at ``path``, conditioned on the recorded executed actions (`teacher_forced_actions`)."""
    record = read_record(path)
    if not engines:
        raise DMMError("parity --replay: no engine", "an engine to replay the record on",
                       "pass --onnx ENGINE (.onnx, .c or .plan, repeatable) and / or --checkpoint model.pt")
    trajectory = trajectory_of_record(record)
    header = record.header
    actions = {}
    for engine in engines:
        engine = Path(engine)
        is_checkpoint = engine.suffix == ".pt" or engine.is_dir()
        backend = load_backend(engine, header["mode"] if is_checkpoint else None, threads=threads)
        try:
            manifest = backend.manifest
            if header.get("checkpoint_sha256") and manifest.checkpoint_sha256 != header["checkpoint_sha256"]:
                raise DMMError(f"parity --replay: {str(engine)!r} comes from checkpoint "
                               f"{manifest.checkpoint_sha256[:12]}...",
                               f"the record's {str(header['checkpoint_sha256'])[:12]}...",
                               "replay engines of the recorded policy")
            policy = Policy(_RangeFree(backend), header["target_return"], limits=ActuatorLimits.bounds_only(manifest))
            label = f"{backend.name}/{manifest.mode} {engine.name} ({backend.provider})"
            actions[label] = teacher_forced_actions(policy, trajectory)
        finally:
            backend.close()
    engine_label = (f"{header.get('backend')}/{header.get('mode')} {Path(str(header.get('engine'))).name} on "
                    f"{header.get('env_id')} (manifest sha256 {str(header.get('manifest_sha256'))[:12]}...)")
    return Replay(trajectory, record.engine_actions(), actions, header["mode"], header.get("env_id", ""), engine_label)
