"""Graph feeds built from a trajectory of model inputs, exactly as `runtime.policy.Policy` builds them.

Torch-free. The export parity gate, the calibration readers and the accuracy reports feed
graphs from these; a test holds them equal to what a Policy feeds.

Glossary: B batch, K window length, S state dim, Adim action dim, nl n_layer, W DSM
window, D d_model, N d_state, T trajectory steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InputTrajectory:
    """Real-looking model inputs for B parallel episodes of T steps (already normalised / scaled)."""

    states: np.ndarray  # (B, T, S) float32, normalised observations
    actions: np.ndarray  # (B, T, Adim) float32, executed actions in (-1, 1)
    rtg: np.ndarray  # (B, T, 1) float32, return-to-go / rtg_scale


def real_looking_trajectory(rng: np.random.Generator, *, batch: int, steps: int, state_dim: int,
                            act_dim: int, rtg_start: float, rtg_scale: float) -> InputTrajectory:
    """Smooth normalised states (AR(1), unit variance), tanh actions, rewards of Hopper's size.

    Not an env rollout (the export does not need gymnasium); tests/test_export_onnx.py and
    ``cli.py parity`` use real Hopper trajectories.
    """
    noise = rng.normal(size=(batch, steps, state_dim))  # (B, T, S)
    states = np.empty_like(noise)
    states[:, 0] = noise[:, 0]
    for t in range(1, steps):  # AR(1) with coefficient 0.9 keeps unit variance: like a moving body
        states[:, t] = 0.9 * states[:, t - 1] + np.sqrt(1 - 0.81) * noise[:, t]
    actions = np.tanh(rng.normal(size=(batch, steps, act_dim)))  # (B, T, Adim)
    rewards = rng.uniform(0.0, 4.0, size=(batch, steps))  # (B, T): Hopper-like 0..4 per step
    returned = np.concatenate([np.zeros((batch, 1)), np.cumsum(rewards, axis=1)[:, :-1]], axis=1)  # (B, T)
    rtg = (rtg_start - returned) / rtg_scale  # (B, T)
    return InputTrajectory(states.astype(np.float32), actions.astype(np.float32),
                      rtg[..., None].astype(np.float32))


def window_at(trajectory: InputTrajectory, t: int, context_len: int) -> dict[str, np.ndarray]:
    """The window-mode feeds at step t, built as the official evaluation builds them.

    The last min(t+1, K) steps, zero left-padded, with a zero placeholder for a_t.
    Returns states (B, K, S), actions (B, K, Adim), rtg (B, K, 1).
    """
    first = max(0, t + 1 - context_len)
    feeds = {}
    for name, values in (("states", trajectory.states), ("actions", trajectory.actions),
                         ("rtg", trajectory.rtg)):
        window = np.zeros((values.shape[0], context_len, values.shape[2]), dtype=np.float32)  # (B, K, *)
        window[:, context_len - (t + 1 - first):] = values[:, first:t + 1]
        feeds[name] = window
    feeds["actions"][:, -1] = 0.0  # a_t is what is being predicted
    return feeds


def stream_feeds(trajectory: InputTrajectory, t: int, dsm_cache: np.ndarray, ssm_state: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """Stream-mode feeds at step t of ``trajectory`` (all rows start their episode at t = 0)."""
    batch, _, act_dim = trajectory.actions.shape
    prev_action = trajectory.actions[:, t - 1] if t > 0 else np.zeros((batch, act_dim), np.float32)
    return {
        "prev_action": np.ascontiguousarray(prev_action),  # (B, Adim)
        "prev_action_valid": np.full((batch, 1), 1.0 if t > 0 else 0.0, dtype=np.float32),  # (B, 1)
        "rtg": np.ascontiguousarray(trajectory.rtg[:, t]),  # (B, 1)
        "state": np.ascontiguousarray(trajectory.states[:, t]),  # (B, S)
        "dsm_cache": dsm_cache,  # (nl, B, W-1, D)
        "ssm_state": ssm_state,  # (nl, B, D, N)
    }
