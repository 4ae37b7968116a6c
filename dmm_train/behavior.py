"""Behaviour policies for generating offline datasets.

A trained SAC actor is shipped as a small .npz of its MLP weights and run here with
numpy alone, so regenerating a dataset needs neither stable-baselines3 nor torch.
`train_sac` (stable-baselines3, an optional extra) is how the shipped weights were made;
`python -m dmm_train.behavior --help` gives the command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dmm_train.errors import DMMError

POLICY_DIR = Path(__file__).resolve().parent / "policies"


class MlpPolicy:
    """Deterministic SAC actor: obs -> ReLU MLP -> mean -> tanh (the SAC action squashing)."""

    def __init__(self, weights: list[np.ndarray], biases: list[np.ndarray]):
        self.weights = [np.asarray(w, dtype=np.float64) for w in weights]  # (in, out) each
        self.biases = [np.asarray(b, dtype=np.float64) for b in biases]

    @classmethod
    def load(cls, path: str | Path) -> MlpPolicy:
        path = Path(path)
        if not path.is_file():
            raise DMMError(f"behaviour policy {str(path)!r} does not exist; expected an .npz of MLP weights")
        with np.load(path) as data:
            count = int(data["n_layers"])
            return cls([data[f"w{i}"] for i in range(count)], [data[f"b{i}"] for i in range(count)])

    def save(self, path: str | Path, **metadata) -> None:
        arrays = {f"w{i}": w.astype(np.float32) for i, w in enumerate(self.weights)}
        arrays.update({f"b{i}": b.astype(np.float32) for i, b in enumerate(self.biases)})
        np.savez(path, n_layers=len(self.weights), metadata=json.dumps(metadata), **arrays)

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        """observation: (S,) -> action (Adim,) in [-1, 1]."""
        hidden = np.asarray(observation, dtype=np.float64)
        for weight, bias in zip(self.weights[:-1], self.biases[:-1], strict=True):
            hidden = np.maximum(hidden @ weight + bias, 0.0)
        return np.tanh(hidden @ self.weights[-1] + self.biases[-1]).astype(np.float32)


def actor_from_sb3(model) -> MlpPolicy:
    """The deterministic actor of an SB3 SAC model: latent_pi layers then the mu head."""
    import torch

    layers = [m for m in model.actor.latent_pi if isinstance(m, torch.nn.Linear)] + [model.actor.mu]
    weights = [layer.weight.detach().cpu().numpy().T for layer in layers]
    biases = [layer.bias.detach().cpu().numpy() for layer in layers]
    return MlpPolicy(weights, biases)


def evaluate_behavior(policy, env_id: str, episodes: int, seed: int) -> list[float]:
    import gymnasium as gym

    env = gym.make(env_id)
    returns = []
    for index in range(episodes):
        observation, _ = env.reset(seed=seed + index)
        total, done = 0.0, False
        while not done:
            observation, reward, terminated, truncated, _ = env.step(policy(observation))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def train_sac(env_id: str, total_steps: int, seed: int, out_dir: Path, snapshot_every: int,
              buffer_every: int, threads: int = 1) -> None:
    """Train SB3 SAC (default hyperparameters) and snapshot the actor with its evaluated return.

    Every ``snapshot_every`` steps the deterministic actor is saved as ``sac_<steps>.npz``
    with its mean return over 5 evaluation episodes; every ``buffer_every`` steps the
    replay buffer so far (every transition the learner saw, in order) is written to
    ``replay.npz``, so that a medium-replay dataset can be cut at the medium snapshot.
    """
    try:
        from stable_baselines3 import SAC
        from stable_baselines3.common.callbacks import BaseCallback
    except ImportError:
        raise DMMError("stable-baselines3 is not installed; pip install -e '.[behavior]'") from None
    import gymnasium as gym
    import torch

    torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)

    def dump_replay(model) -> None:
        buffer = model.replay_buffer
        size = buffer.buffer_size if buffer.full else buffer.pos
        arrays = {name: getattr(buffer, name)[:size, 0] for name in
                  ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")}
        partial = out_dir / "replay.tmp.npz"
        np.savez(partial, **arrays)
        partial.replace(out_dir / "replay.npz")

    class Snapshot(BaseCallback):
        def _on_step(self) -> bool:
            steps = self.num_timesteps
            if steps % snapshot_every == 0:
                actor = actor_from_sb3(self.model)
                returns = evaluate_behavior(actor, env_id, 5, seed=10_000)
                mean = float(np.mean(returns))
                actor.save(out_dir / f"sac_{steps}.npz", env_id=env_id, steps=steps, seed=seed,
                           eval_return=mean, eval_returns=returns)
                print(f"{steps} steps: eval return {mean:.1f} (min {min(returns):.1f})", file=sys.stderr, flush=True)
            if steps % buffer_every == 0 or steps == total_steps:
                dump_replay(self.model)
                self.model.save(out_dir / "sac_latest")
            return True

    model = SAC("MlpPolicy", gym.make(env_id), seed=seed, verbose=0, learning_starts=1000,
                buffer_size=max(total_steps, 1000))
    model.learn(total_timesteps=total_steps, callback=Snapshot())


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a SAC behaviour policy (needs stable-baselines3).")
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--steps", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--snapshot-every", type=int, default=10_000)
    parser.add_argument("--buffer-every", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the learner")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    train_sac(args.env, args.steps, args.seed, args.out, args.snapshot_every, args.buffer_every, args.threads)


if __name__ == "__main__":
    main()
