"""Training windows: the official DT/DMM ``get_batch``, vectorised over the batch.

Symbols (docs/model.md#symbols): B batch, K context length in timesteps, S state dim,
Adim action dim. The sampling and padding conventions are those of docs/model.md#sampler-and-padding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from contract.errors import DMMError
from dmm_train.config import ACTION_PAD_VALUE, RTG_PAD_VALUE
from dmm_train.records import OfflineDataset


@dataclass(frozen=True, eq=False)
class WindowBatch:
    """One training batch of left-padded windows (numpy float32).

    states:  (B, K, S) normalised; padded steps are ``-mean/std`` (raw zeros normalised)
    actions: (B, K, Adim); padded steps are ACTION_PAD_VALUE
    rtg:     (B, K, 1) return-to-go / rtg_scale, aligned with the states; padded 0
    mask:    (B, K) 1 on real steps, 0 on padding (used by the loss; DT also masks attention with it)
    timesteps: (B, K) int64 step index within the episode; padded 0 (kzl's get_batch). DMM
             ignores it, as the official code; the Decision Transformer embeds it.
    """

    states: np.ndarray
    actions: np.ndarray
    rtg: np.ndarray
    mask: np.ndarray
    timesteps: np.ndarray


class WindowSampler:
    """The official DT/DMM ``get_batch``, vectorised.

    Per window: an episode with probability proportional to its length, a start
    index ``si`` uniform in [0, T-1], then steps ``si .. si+K-1`` cut at the
    episode end and left-padded to K. The return-to-go at window step j is the
    undiscounted sum of rewards from ``si + j`` to the episode end: the official
    ``discount_cumsum(rewards[si:], 1)[:tlen + 1]`` with its extra last entry dropped
    (the model is fed ``rtg[:, :-1]``).

    All per-step quantities are precomputed once into flat (N, ...) arrays, so a
    batch is a few integer draws and one gather.
    """

    def __init__(self, dataset: OfflineDataset, context_len: int, rtg_scale: float, seed: int = 0):
        if not isinstance(context_len, int) or context_len < 1:
            raise DMMError(f"context_len={context_len!r}", "a positive integer", fix="pass context_len 1 or more")
        if not rtg_scale > 0:
            raise DMMError(f"rtg_scale={rtg_scale!r}", "a positive number", fix="pass an rtg_scale above 0")
        self.context_len = context_len
        self.rtg_scale = float(rtg_scale)
        self.rng = np.random.default_rng(seed)

        lengths = dataset.episode_lengths  # (E,)
        self._lengths = lengths
        self._ends = np.cumsum(lengths)  # (E,) exclusive end of each episode in the flat arrays
        self._starts = self._ends - lengths  # (E,)
        mean = dataset.state_mean.astype(np.float64)  # (S,)
        std = dataset.state_std.astype(np.float64)  # (S,)
        states = np.concatenate([e.observations for e in dataset.episodes]).astype(np.float64)  # (N, S)
        self._states = ((states - mean) / std).astype(np.float32)  # (N, S)
        self._state_pad = ((0.0 - mean) / std).astype(np.float32)  # (S,) a raw zero state, normalised
        self._actions = np.concatenate([e.actions for e in dataset.episodes])  # (N, Adim)
        # Suffix sums per episode in float64 (gamma = 1), then scaled.
        rtg = np.concatenate([_reverse_cumsum(e.rewards) for e in dataset.episodes])  # (N,)
        self._rtg = (rtg / self.rtg_scale).astype(np.float32)  # (N,)
        self._offsets = np.arange(context_len)  # (K,)

    def sample(self, batch_size: int) -> WindowBatch:
        """Draw ``batch_size`` windows; see the class docstring for the distribution."""
        return self.windows(*self.draw(batch_size))

    def draw(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The random part of ``sample``: (episode, start), each (B,) int64."""
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise DMMError(f"batch_size={batch_size!r}", "a positive integer", fix="pass --batch-size 1 or more")
        # A uniform global step picks its episode with probability length / N (exactly the
        # official p_sample); the start inside that episode is drawn afresh, uniformly.
        step = self.rng.integers(0, self._ends[-1], size=batch_size)  # (B,) uniform over all N steps
        episode = np.searchsorted(self._ends, step, side="right")  # (B,)
        start = self.rng.integers(0, self._lengths[episode])  # (B,) uniform in [0, T-1]
        return episode, start

    def windows(self, episode: np.ndarray, start: np.ndarray) -> WindowBatch:
        """The deterministic part of ``sample``: the windows at (episode, start), each (B,)."""
        episode = np.asarray(episode, dtype=np.int64)  # (B,)
        start = np.asarray(start, dtype=np.int64)  # (B,)
        length = self._lengths[episode]  # (B,)
        if np.any(start < 0) or np.any(start >= length):
            raise DMMError(f"window starts {start.tolist()}", "each in [0, T-1] of its episode",
                           fix="pick starts inside their episodes (as WindowSampler.draw does)")
        K = self.context_len
        tlen = np.minimum(K, length - start)  # (B,) real steps in the window
        pad = K - tlen  # (B,) left padding
        real = self._offsets[None, :] >= pad[:, None]  # (B, K)
        first = self._starts[episode] + start - pad  # (B,) flat index of window slot 0 (may be padding)
        index = first[:, None] + self._offsets[None, :]  # (B, K)
        index = np.where(real, index, 0)  # padded slots read step 0, then get overwritten

        states = np.where(real[..., None], self._states[index], self._state_pad)  # (B, K, S)
        action_pad = np.float32(ACTION_PAD_VALUE)
        actions = np.where(real[..., None], self._actions[index], action_pad)  # (B, K, Adim)
        rtg = np.where(real, self._rtg[index], np.float32(RTG_PAD_VALUE))[..., None]  # (B, K, 1)
        timesteps = np.where(real, (start - pad)[:, None] + self._offsets[None, :], 0)  # (B, K)
        return WindowBatch(
            states=states.astype(np.float32, copy=False),
            actions=actions.astype(np.float32, copy=False),
            rtg=rtg.astype(np.float32, copy=False),
            mask=real.astype(np.float32),
            timesteps=timesteps.astype(np.int64, copy=False),
        )

    def get_state(self) -> dict:
        """The RNG state, a JSON-able dict (numpy's bit-generator state)."""
        return copy.deepcopy(self.rng.bit_generator.state)

    def set_state(self, state: dict) -> None:
        """Restore a state returned by ``get_state`` (same bit generator)."""
        expected = type(self.rng.bit_generator).__name__
        if not isinstance(state, dict) or state.get("bit_generator") != expected:
            received = state.get("bit_generator") if isinstance(state, dict) else type(state).__name__
            raise DMMError(f"sampler state for {received!r}", f"a {expected} state from WindowSampler.get_state()",
                           fix="resume from a checkpoint written by this version")
        self.rng.bit_generator.state = copy.deepcopy(state)


def _reverse_cumsum(rewards: np.ndarray) -> np.ndarray:
    """(T,) -> (T,) float64: out[t] = sum(rewards[t:]), the official discount_cumsum at gamma 1."""
    return np.cumsum(rewards.astype(np.float64)[::-1])[::-1]
