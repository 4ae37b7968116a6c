"""Evaluation without a simulator: held-out episodes of the data, teacher-forced.

A policy trained from a robot's logs has no env to play episodes in. Its periodic evaluation
(and `cli.py eval`) then reads episodes the training never sampled (`heldout_split`) and asks
two questions where the closed-loop score would stand:

- **Action error.** Each step of a held-out episode becomes the window the runtime would feed
  there (the last K states, the actions taken before, the return-to-go the episode actually
  went on to collect, left-padded with zeros, the current action a zero placeholder, as in
  `dmm_train.evaluate`); the RMSE between the predicted and the logged action. best.pt is the
  checkpoint with the lowest.
- **Return conditioning.** The same windows conditioned instead on the lowest episode return of
  the data. On the held-out episodes that did better than the data's median, asking for their
  own (higher) return should bring the actions closer to what they did than asking for the
  lowest return does: the conditioning gain, RMSE(lowest target) - RMSE(own return), is then
  positive. A gain near zero says the policy ignores the return it is asked for.

Both are offline figures: they say how well the policy imitates the held-out behaviour, not how
it would score on the robot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from contract.deployment import PolicyFacts
from contract.errors import DMMError
from dmm_train.baselines import policy_actions

HELDOUT_FRACTION = 0.1  # of the episodes, held out of training when there is no simulator
HELDOUT_SEED = 0  # the split is fixed by the data alone, so a resumed run holds out the same episodes
MAX_WINDOWS = 2048  # held-out steps evaluated, evenly spaced over the held-out episodes
BATCH_WINDOWS = 256  # windows per forward pass


@dataclass(frozen=True)
class OfflineResult:
    action_rmse: float  # predicted against logged actions, every evaluated held-out step
    conditioning_gain: float | None  # RMSE(lowest target) - RMSE(own return) on the better episodes; None: none
    action_shift: float  # mean |a(own return) - a(lowest target)| over those windows
    heldout_episodes: int
    windows: int
    low_target: float

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        gain = "n/a" if self.conditioning_gain is None else f"{self.conditioning_gain:+.4f}"
        return (f"held-out action RMSE {self.action_rmse:.4f} ({self.windows} steps of {self.heldout_episodes} "
                f"episodes), return conditioning gain {gain}")


def heldout_split(episodes: tuple, *, fraction: float = HELDOUT_FRACTION, seed: int = HELDOUT_SEED
                  ) -> tuple[tuple, tuple]:
    """(training episodes, held-out episodes): a seeded shuffle, at least one on each side."""
    if len(episodes) < 2:
        raise DMMError(f"offline evaluation of a dataset of {len(episodes)} episode",
                       "at least 2, so that one is held out of training",
                       fix="import more episodes, or pass --eval-episodes 0")
    order = np.random.default_rng(seed).permutation(len(episodes))  # (E,)
    count = min(len(episodes) - 1, max(1, round(fraction * len(episodes))))
    held = set(int(i) for i in order[:count])
    return (tuple(e for i, e in enumerate(episodes) if i not in held),
            tuple(e for i, e in enumerate(episodes) if i in held))


@torch.no_grad()
def evaluate_offline(model: torch.nn.Module, facts: PolicyFacts, heldout: tuple, *, dataset_returns: np.ndarray,
                     device: str = "cpu") -> OfflineResult:
    """The held-out action error and the return-conditioning gain of ``model`` (see the module docstring).

    dataset_returns: (E,) every episode's return in the whole dataset, whose lowest is the low target
    and whose median splits the better held-out episodes from the rest.
    """
    low_target, median_return = float(np.min(dataset_returns)), float(np.median(dataset_returns))
    if not heldout:
        raise DMMError("offline evaluation with no held-out episodes", "at least one",
                       fix="hold out an episode with heldout_split before evaluating")
    was_training = model.training
    model.eval()
    try:
        steps = [(e, t) for e in heldout for t in range(len(e))]
        picked = np.unique(np.linspace(0, len(steps) - 1, min(MAX_WINDOWS, len(steps))).round().astype(np.int64))
        chosen = [steps[i] for i in picked]
        better = np.array([float(np.sum(e.rewards)) > median_return for e, _ in chosen])  # (W,)
        own, logged = _predict(model, facts, chosen, None, device)  # (W, Adim) each
        errors = ((own - logged) ** 2).mean(axis=1)  # (W,)
        gain, shift = None, 0.0
        if better.any():
            subset = [window for window, keep in zip(chosen, better, strict=True) if keep]
            low, _ = _predict(model, facts, subset, low_target, device)  # (W', Adim)
            low_errors = ((low - logged[better]) ** 2).mean(axis=1)  # (W',)
            gain = float(np.sqrt(low_errors.mean()) - np.sqrt(errors[better].mean()))
            shift = float(np.abs(own[better] - low).mean())
        return OfflineResult(action_rmse=float(np.sqrt(errors.mean())), conditioning_gain=gain, action_shift=shift,
                             heldout_episodes=len(heldout), windows=len(chosen), low_target=float(low_target))
    finally:
        model.train(was_training)


def _predict(model, facts: PolicyFacts, chosen, target: float | None, device: str):
    """Predicted and logged actions at each chosen (episode, step); target None: the episode's own return."""
    context_len = model.config.context_len
    mean = np.asarray(facts.state_mean, dtype=np.float32)  # (S,)
    std = np.asarray(facts.state_std, dtype=np.float32)  # (S,)
    predicted, logged = [], []
    for first in range(0, len(chosen), BATCH_WINDOWS):
        batch = chosen[first:first + BATCH_WINDOWS]
        count = len(batch)
        states = np.zeros((count, context_len, facts.state_dim), dtype=np.float32)  # (B, K, S)
        actions = np.zeros((count, context_len, facts.act_dim), dtype=np.float32)  # (B, K, Adim)
        rtg = np.zeros((count, context_len, 1), dtype=np.float32)  # (B, K, 1)
        timesteps = np.zeros((count, context_len), dtype=np.int64)  # (B, K)
        mask = np.zeros((count, context_len), dtype=np.float32)  # (B, K)
        for row, (episode, t) in enumerate(batch):
            start = max(0, t + 1 - context_len)
            width = t + 1 - start
            rewards = episode.rewards.astype(np.float64)
            before = np.concatenate([[0.0], np.cumsum(rewards)])  # (T+1,), collected before each step
            goal = float(before[-1]) if target is None else float(target)
            states[row, context_len - width:] = (episode.observations[start:t + 1] - mean) / std
            actions[row, context_len - width:context_len - 1] = episode.actions[start:t]  # a_t: placeholder 0
            rtg[row, context_len - width:, 0] = (goal - before[start:t + 1]) / facts.rtg_scale
            timesteps[row, context_len - width:] = np.arange(start, t + 1)
            mask[row, context_len - width:] = 1.0
            logged.append(episode.actions[t])
        out = policy_actions(model, *(torch.from_numpy(a).to(device) for a in (states, actions, rtg, timesteps, mask)))
        predicted.append(out[:, -1].cpu().numpy())  # (B, Adim), at the last state token
    return np.concatenate(predicted), np.stack(logged)
