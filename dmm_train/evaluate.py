"""The official DMM evaluation protocol in gymnasium MuJoCo, batched over episodes.

Each env step (docs/model.md#evaluation-protocol): append a zero placeholder action, take
the last K normalised states, actions and rtg, left-pad with zeros, run the whole
window and act with the prediction at the last state token; then
rtg_{t+1} = rtg_t - r_t / scale, starting from target / scale.

All episodes of one evaluation run side by side: one batched forward per env step
over the episodes still running. Every model kind runs the same protocol; the kinds that
read timesteps and a padding mask (DT) get them as kzl's evaluation builds them: the
window's episode step indices, left-padded with 0, and 0 on the padded steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from contract.deployment import PolicyFacts
from contract.errors import DMMError, check_dims
from dmm_train.baselines import policy_actions
from dmm_train.progress import Progress
from runtime.plant import make_plant


@dataclass(frozen=True)
class EvalResult:
    target_return: float
    returns: tuple[float, ...]
    lengths: tuple[int, ...]
    return_mean: float
    return_std: float
    normalized_mean: float | None  # None: the policy has no reference scores (`PolicyFacts.normalises`)
    normalized_std: float | None

    @property
    def score_mean(self) -> float:
        """What selection compares: the normalised score, else the raw return."""
        return self.return_mean if self.normalized_mean is None else self.normalized_mean

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_policy(
    model: torch.nn.Module,
    facts: PolicyFacts,
    *,
    target_return: float,
    episodes: int,
    seed: int,
    device: str = "cpu",
    progress_label: str | None = None,
) -> EvalResult:
    """Run ``episodes`` episodes of the sliding-window protocol; episode i uses seed + i.

    With ``progress_label``, a progress line on stderr: env steps (an episode that ends early counts its
    remaining steps as done, so the eta holds) and episodes finished; the episodes run side by side, so
    most of them finish together near the end.
    """
    if episodes < 1:
        raise DMMError(f"--episodes {episodes}", "at least 1", fix="pass --episodes 1 or more")
    if not facts.has_simulator:
        raise DMMError("closed-loop evaluation of a policy with no simulator (its dataset names no env)",
                       "an env to play episodes in", fix="evaluate offline (cli.py eval does so by itself)")
    env_id, rtg_scale = facts.env_id, facts.rtg_scale
    was_training = model.training
    model.eval()
    envs = [make_plant(env_id) for _ in range(episodes)]
    context_len = model.config.context_len
    max_steps = envs[0].spec.max_episode_steps or 1000
    state_dim = int(np.prod(envs[0].observation_space.shape))
    act_dim = int(np.prod(envs[0].action_space.shape))
    check_dims(f"environment {env_id}", (state_dim, act_dim), (model.config.state_dim, model.config.act_dim),
               "the model's", "evaluate on the env the model was trained for")
    mean = np.asarray(facts.state_mean, dtype=np.float32)  # (S,)
    std = np.asarray(facts.state_std, dtype=np.float32)  # (S,)

    # Per-episode histories; index t holds s_t, a_t, rtg_t. a_t stays 0 until acted (placeholder).
    states = np.zeros((episodes, max_steps + 1, state_dim), dtype=np.float32)  # (E, Tmax+1, S)
    actions = np.zeros((episodes, max_steps + 1, act_dim), dtype=np.float32)  # (E, Tmax+1, Adim)
    rtg = np.zeros((episodes, max_steps + 1, 1), dtype=np.float32)  # (E, Tmax+1, 1)
    for index, env in enumerate(envs):
        observation, _ = env.reset(seed=seed + index)
        states[index, 0] = (observation - mean) / std
    rtg[:, 0, 0] = target_return / rtg_scale
    returns = np.zeros(episodes, dtype=np.float64)
    lengths = np.zeros(episodes, dtype=np.int64)
    running = np.ones(episodes, dtype=bool)
    tracker = Progress(progress_label or "eval", episodes * max_steps, unit="env steps",
                       enabled=progress_label is not None)

    try:
        for t in range(max_steps):
            if not running.any():
                break
            finished = int(episodes - running.sum())
            tracker.update(int(lengths[running].sum()) + finished * max_steps, f"{finished}/{episodes} episodes done")
            active = np.flatnonzero(running)
            start = max(0, t + 1 - context_len)
            width = t + 1 - start
            window_states = np.zeros((len(active), context_len, state_dim), dtype=np.float32)  # (E', K, S)
            window_actions = np.zeros((len(active), context_len, act_dim), dtype=np.float32)  # (E', K, Adim)
            window_rtg = np.zeros((len(active), context_len, 1), dtype=np.float32)  # (E', K, 1)
            window_states[:, context_len - width:] = states[active, start:t + 1]
            window_actions[:, context_len - width:] = actions[active, start:t + 1]
            window_rtg[:, context_len - width:] = rtg[active, start:t + 1]
            window_timesteps = np.zeros((len(active), context_len), dtype=np.int64)  # (E', K)
            window_timesteps[:, context_len - width:] = np.arange(start, t + 1)
            window_mask = np.zeros((len(active), context_len), dtype=np.float32)  # (E', K)
            window_mask[:, context_len - width:] = 1.0
            predicted = policy_actions(
                model,
                torch.from_numpy(window_states).to(device),
                torch.from_numpy(window_actions).to(device),
                torch.from_numpy(window_rtg).to(device),
                torch.from_numpy(window_timesteps).to(device),
                torch.from_numpy(window_mask).to(device),
            )[:, -1].cpu().numpy()  # (E', Adim), at the last state token
            for row, index in enumerate(active):
                observation, reward, terminated, truncated, _ = envs[index].step(predicted[row])
                actions[index, t] = predicted[row]
                states[index, t + 1] = (observation - mean) / std
                rtg[index, t + 1, 0] = rtg[index, t, 0] - reward / rtg_scale
                returns[index] += reward
                lengths[index] = t + 1
                if terminated or truncated:
                    running[index] = False
        tracker.update(episodes * max_steps, f"{episodes}/{episodes} episodes done")
    finally:
        tracker.close()
        for env in envs:
            env.close()
        model.train(was_training)

    scores = facts.score(returns) if facts.normalises else None
    return EvalResult(
        target_return=float(target_return),
        returns=tuple(float(r) for r in returns),
        lengths=tuple(int(n) for n in lengths),
        return_mean=float(returns.mean()),
        return_std=float(returns.std()),
        normalized_mean=None if scores is None else float(scores.mean()),
        normalized_std=None if scores is None else float(scores.std()),
    )


def evaluate_checkpoint(checkpoint, *, target_return: float, episodes: int, seed: int, device: str = "cpu",
                        progress_label: str | None = None):
    """`evaluate_policy` of a loaded `Checkpoint`."""
    return evaluate_policy(checkpoint.model.to(device), checkpoint.facts, target_return=target_return,
                           episodes=episodes, seed=seed, device=device, progress_label=progress_label)
