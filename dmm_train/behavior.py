"""Behaviour policies for generating offline datasets.

A trained SAC actor is shipped as a small .npz of its MLP weights and run here with
numpy alone, so regenerating a dataset needs neither stable-baselines3 nor torch.
`train_sac` (stable-baselines3, an optional extra) is how the shipped weights were made;
`python -m dmm_train.behavior --help` gives the command.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from contract.errors import DMMError, describe_error
from contract.files import atomic_write_bytes, atomic_write_set
from dmm_train.config import PRESETS, get_preset

POLICY_DIR = Path(__file__).resolve().parent / "policies"  # the shipped actors and replay log


# SB3's SAC clamps the log standard deviation of its Gaussian to this range.
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


class MlpPolicy:
    """A SAC actor run with numpy: obs -> ReLU MLP -> (mean, log_std) -> tanh-squashed Gaussian.

    ``policy(obs)`` is the deterministic action tanh(mean); ``policy.sample(obs, rng)``
    draws tanh(mean + std * eps) as SAC does while it collects data, which is how the
    D4RL datasets were recorded. Weights are (in, out) matrices, float32 on disk and
    float64 in memory so that actions do not depend on BLAS summation order more than
    float64 rounding does.
    """

    def __init__(self, weights: list[np.ndarray], biases: list[np.ndarray],
                 log_std_weight: np.ndarray | None = None, log_std_bias: np.ndarray | None = None,
                 metadata: dict | None = None):
        self.weights = [np.asarray(w, dtype=np.float64) for w in weights]  # (in, out) each
        self.biases = [np.asarray(b, dtype=np.float64) for b in biases]
        self.log_std_weight = None if log_std_weight is None else np.asarray(log_std_weight, dtype=np.float64)
        self.log_std_bias = None if log_std_bias is None else np.asarray(log_std_bias, dtype=np.float64)
        self.metadata = dict(metadata or {})

    @property
    def observation_dim(self) -> int:
        return self.weights[0].shape[0]

    @property
    def action_dim(self) -> int:
        return self.weights[-1].shape[1]

    @classmethod
    def load(cls, path: str | Path) -> MlpPolicy:
        path = Path(path)
        if not path.is_file():
            raise DMMError(f"behaviour policy {str(path)!r} does not exist",
                           "an .npz of MLP weights written by 'python -m dmm_train.behavior'",
                           fix="pass the path of such a file (dmm_train/policies holds the shipped ones)")
        try:
            with np.load(path) as data:
                count = int(data["n_layers"])
                metadata = json.loads(str(data["metadata"])) if "metadata" in data else {}
                log_std = (data["log_std_w"], data["log_std_b"]) if "log_std_w" in data else (None, None)
                return cls([data[f"w{i}"] for i in range(count)], [data[f"b{i}"] for i in range(count)],
                           *log_std, metadata=metadata)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise DMMError(f"behaviour policy {str(path)!r} is unreadable ({describe_error(error)})",
                           "an .npz with n_layers, w0.., b0..",
                           fix="rebuild it with 'python -m dmm_train.behavior'") from None

    def save(self, path: str | Path, **metadata) -> None:
        arrays = {f"w{i}": w.astype(np.float32) for i, w in enumerate(self.weights)}
        arrays.update({f"b{i}": b.astype(np.float32) for i, b in enumerate(self.biases)})
        if self.log_std_weight is not None:
            arrays["log_std_w"] = self.log_std_weight.astype(np.float32)
            arrays["log_std_b"] = self.log_std_bias.astype(np.float32)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, n_layers=len(self.weights), metadata=json.dumps(metadata), **arrays)
        atomic_write_bytes(path, buffer.getvalue())  # never a half-written policy, nor one written through a link

    def _features(self, observation: np.ndarray) -> np.ndarray:
        hidden = np.asarray(observation, dtype=np.float64)  # (S,) or (n, S)
        for weight, bias in zip(self.weights[:-1], self.biases[:-1], strict=True):
            hidden = np.maximum(hidden @ weight + bias, 0.0)
        return hidden  # (..., H)

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        """observation: (S,) -> deterministic action (Adim,) in [-1, 1]."""
        hidden = self._features(observation)
        return np.tanh(hidden @ self.weights[-1] + self.biases[-1]).astype(np.float32)

    def sample(self, observation: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """observation: (S,) -> action (Adim,) drawn from the squashed Gaussian, as SAC explores."""
        if self.log_std_weight is None:
            raise DMMError("a behaviour policy with no log_std head", "a policy with a log_std head to sample from",
                           fix="call it for deterministic actions, or export one with its log_std head")
        hidden = self._features(observation)  # (H,)
        mean = hidden @ self.weights[-1] + self.biases[-1]  # (Adim,)
        log_std = np.clip(hidden @ self.log_std_weight + self.log_std_bias, LOG_STD_MIN, LOG_STD_MAX)
        noise = rng.standard_normal(mean.shape)  # (Adim,)
        return np.tanh(mean + np.exp(log_std) * noise).astype(np.float32)

    def sample_batch(self, observations: np.ndarray, generators: list[np.random.Generator]) -> np.ndarray:
        """observations: (n, S) -> actions (n, Adim), row i sampled with ``generators[i]``.

        Each row is computed on its own (a stack of vector-matrix products, never one
        matrix product whose summation order could depend on n), so a row's action is
        the same whichever other rows share the batch: batched rollouts equal
        sequential ones. It also keeps BLAS from spinning up threads for a product this small.
        """
        if self.log_std_weight is None:
            raise DMMError("a behaviour policy with no log_std head", "a policy with a log_std head to sample from",
                           fix="call it for deterministic actions, or export one with its log_std head")
        hidden = np.asarray(observations, dtype=np.float64)[:, None, :]  # (n, 1, S)
        for weight, bias in zip(self.weights[:-1], self.biases[:-1], strict=True):
            hidden = np.maximum(np.matmul(hidden, weight) + bias, 0.0)  # (n, 1, H)
        mean = (np.matmul(hidden, self.weights[-1]) + self.biases[-1])[:, 0]  # (n, Adim)
        log_std = np.clip((np.matmul(hidden, self.log_std_weight) + self.log_std_bias)[:, 0],
                          LOG_STD_MIN, LOG_STD_MAX)  # (n, Adim)
        noise = np.stack([g.standard_normal(mean.shape[1]) for g in generators])  # (n, Adim)
        return np.tanh(mean + np.exp(log_std) * noise).astype(np.float32)


def actor_from_sb3(model) -> MlpPolicy:
    """The actor of an SB3 SAC model: latent_pi layers, the mu head and the log_std head."""
    import torch

    layers = [m for m in model.actor.latent_pi if isinstance(m, torch.nn.Linear)] + [model.actor.mu]
    weights = [layer.weight.detach().cpu().numpy().T for layer in layers]
    biases = [layer.bias.detach().cpu().numpy() for layer in layers]
    log_std = model.actor.log_std
    return MlpPolicy(weights, biases, log_std.weight.detach().cpu().numpy().T, log_std.bias.detach().cpu().numpy())


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


LATEST_MODEL = "sac_latest.zip"
LATEST_BUFFER = "replay_buffer.pkl"


def train_sac(env_id: str, total_steps: int, seed: int, out_dir: Path, snapshot_every: int,
              buffer_every: int, threads: int = 1, resume: bool = False) -> None:
    """Train SB3 SAC (default hyperparameters) and snapshot the actor with its evaluated return.

    Every ``snapshot_every`` steps the deterministic actor is saved as ``sac_<steps>.npz``
    with its mean return over 5 evaluation episodes; every ``buffer_every`` steps the
    replay buffer so far (every transition the learner saw, in order) is written to
    ``replay.npz``, so that a medium-replay dataset can be cut at the medium snapshot, and
    the model and SB3's replay buffer are saved (atomically) so that ``resume`` continues the
    run where that save left it.
    """
    try:
        from stable_baselines3 import SAC
        from stable_baselines3.common.callbacks import BaseCallback
    except ImportError:
        raise DMMError("stable-baselines3 is not installed", "stable-baselines3 to train SAC",
                       fix="pip install -e '.[behavior]'") from None
    import gymnasium as gym
    import torch

    torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)

    def dump_replay(model) -> None:
        buffer = model.replay_buffer
        size = buffer.buffer_size if buffer.full else buffer.pos
        arrays = {name: getattr(buffer, name)[:size, 0] for name in
                  ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")}
        replay = io.BytesIO()
        np.savez(replay, **arrays)
        atomic_write_bytes(out_dir / "replay.npz", replay.getvalue())

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
            return True

        def _on_rollout_end(self) -> None:
            # SB3 stores a step's transition after _on_step: here the buffer holds every step counted,
            # so a resume loses none.
            steps = self.num_timesteps
            if steps % buffer_every == 0 or steps == total_steps:
                dump_replay(self.model)
                save_latest(self.model)

    def save_latest(model) -> None:
        # SB3 writes its own files (it keeps a name ending in .zip / .pkl as given): written aside, then the
        # model and its buffer replace the previous pair as one set, so that a resume never pairs a model with
        # another save's buffer. A kill leaves at most these two fixed names, overwritten by the next save.
        staged = {out_dir / LATEST_MODEL: out_dir / "sac_latest.tmp.zip",
                  out_dir / LATEST_BUFFER: out_dir / "replay_buffer.tmp.pkl"}
        model.save(staged[out_dir / LATEST_MODEL])
        model.save_replay_buffer(staged[out_dir / LATEST_BUFFER])
        atomic_write_set({target: aside.read_bytes() for target, aside in staged.items()}, set_name="sac_latest")
        for aside in staged.values():
            aside.unlink()

    if resume:
        missing = [name for name in (LATEST_MODEL, LATEST_BUFFER) if not (out_dir / name).is_file()]
        if missing:
            raise DMMError(f"--resume: {str(out_dir)!r} has no {', '.join(missing)}",
                           "the --out of a 'train' run that reached its first --buffer-every save",
                           fix="pass that --out, or start without --resume")
        model = SAC.load(out_dir / LATEST_MODEL, env=gym.make(env_id))
        model.load_replay_buffer(out_dir / LATEST_BUFFER)
        remaining = total_steps - model.num_timesteps
        if remaining <= 0:
            raise DMMError(f"--resume --steps {total_steps} for the run in {str(out_dir)!r} at "
                           f"{model.num_timesteps} steps", f"--steps above {model.num_timesteps}",
                           fix="pass a larger --steps to train further")
        print(f"resuming at {model.num_timesteps} steps", file=sys.stderr, flush=True)
        model.learn(total_timesteps=remaining, callback=Snapshot(), reset_num_timesteps=False)
        return
    model = SAC("MlpPolicy", gym.make(env_id), seed=seed, verbose=0, learning_starts=1000,
                buffer_size=max(total_steps, 1000))
    model.learn(total_timesteps=total_steps, callback=Snapshot())


def policy_prefix(env: str) -> str:
    """The file prefix of an env's shipped files: its preset name (Walker2d-v5 -> walker2d)."""
    for preset in PRESETS.values():
        if env in (preset.name, preset.env_id):
            return preset.name
    raise DMMError(f"--env {env!r}", f"one of {', '.join(p.env_id for p in PRESETS.values())} (or its preset name)",
                   fix="pass --env with one of those")


def export_policies(run_dir: Path, medium_step: int, expert_step: int | None, out_dir: Path = POLICY_DIR,
                    episodes: int = 20, env: str = "Hopper-v5", expert_label: str = "expert") -> None:
    """Ship snapshots of a SAC run: <env>_medium.npz (+ <env>_<expert_label>.npz) and the replay log.

    Each policy is re-evaluated deterministically over ``episodes`` episodes (seeds
    20000+) and with sampled actions (the way the datasets are rolled out) and the
    returns go into its metadata. The replay log (<env>_medium_replay.npz) is the run's
    replay buffer cut at the medium snapshot: every transition SAC saw up to it, in order.
    ``expert_label`` names the best snapshot's file; the recipes read ``expert``, so a
    snapshot far from D4RL's expert level is exported under another label until it is.
    """
    prefix = policy_prefix(env)

    env_id = get_preset(prefix).env_id
    for step in (medium_step, expert_step):
        if step is not None and not (run_dir / f"sac_{step}.npz").is_file():
            raise DMMError(f"{str(run_dir)!r} has no sac_{step}.npz",
                           "a snapshot step of that run (its sac_<step>.npz files)",
                           fix="pass --medium-step/--expert-step of a sac_<step>.npz in that directory")
    if not (run_dir / "replay.npz").is_file():
        raise DMMError(f"{str(run_dir)!r} has no replay.npz", "the --out directory of 'train'",
                       fix="pass --run with the --out directory of a 'train' run")
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = {f"{prefix}_medium.npz": medium_step}
    if expert_step is not None:
        chosen[f"{prefix}_{expert_label}.npz"] = expert_step
    for name, step in chosen.items():
        policy = MlpPolicy.load(run_dir / f"sac_{step}.npz")
        deterministic = evaluate_behavior(policy, env_id, episodes, seed=20_000)
        rng = np.random.default_rng(0)
        sampled = evaluate_behavior(lambda obs, p=policy, g=rng: p.sample(obs, g), env_id, episodes, seed=20_000)
        snapshot = {key: value for key, value in policy.metadata.items() if not key.startswith("eval_")}
        metadata = {**snapshot, "sac_steps": step,
                    "eval_return": float(np.mean(deterministic)), "eval_return_std": float(np.std(deterministic)),
                    "sampled_return": float(np.mean(sampled)), "sampled_return_std": float(np.std(sampled)),
                    "eval_episodes": episodes}
        policy.save(out_dir / name, **metadata)
        print(f"{name}: SAC step {step}, deterministic return {np.mean(deterministic):.0f} "
              f"± {np.std(deterministic):.0f}, sampled {np.mean(sampled):.0f} ± {np.std(sampled):.0f}",
              file=sys.stderr)
    with np.load(run_dir / "replay.npz") as buffer:
        if len(buffer["observations"]) < medium_step:
            raise DMMError(f"replay.npz holds {len(buffer['observations'])} transitions",
                           f"at least {medium_step} (the medium snapshot)",
                           fix="export after the buffer dump past it")
        cut = slice(0, medium_step)
        dones = buffer["dones"][cut].astype(bool)
        timeouts = buffer["timeouts"][cut].astype(bool)
        # A resumed run starts a new episode without closing the one running at its save point:
        # wherever a transition does not start from the previous one's next observation, an episode ended.
        seams = np.zeros(medium_step, dtype=bool)
        seams[:-1] = ~dones[:-1] & np.any(buffer["next_observations"][: medium_step - 1]
                                          != buffer["observations"][1:medium_step], axis=1)
        truncations = (timeouts & dones) | seams
        terminations = dones & ~timeouts
        truncations[-1] |= not dones[-1]  # the episode running at the cut ends there
        ends = np.flatnonzero(terminations | truncations)
        replay = io.BytesIO()
        np.savez_compressed(
            replay,
            observations=buffer["observations"][cut].astype(np.float32),
            actions=buffer["actions"][cut].astype(np.float32),
            rewards=buffer["rewards"][cut].astype(np.float32),
            terminations=terminations, truncations=truncations,
            final_observations=buffer["next_observations"][ends].astype(np.float32),
        )
    atomic_write_bytes(out_dir / f"{prefix}_medium_replay.npz", replay.getvalue())
    print(f"{prefix}_medium_replay.npz: {medium_step} transitions, {len(ends)} episodes", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description="Behaviour policies: train SAC (needs stable-baselines3), "
                                                 "then export snapshots for the embedded datasets.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train SAC and snapshot its actor")
    train.add_argument("--env", default="Hopper-v5")
    train.add_argument("--steps", type=int, default=300_000)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--snapshot-every", type=int, default=10_000)
    train.add_argument("--buffer-every", type=int, default=50_000)
    train.add_argument("--threads", type=int, default=1, help="torch threads of the learner")
    train.add_argument("--out", type=Path, required=True)
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last --buffer-every save (model + replay buffer)")
    export = commands.add_parser("export", help="ship snapshots of a run into dmm_train/policies")
    export.add_argument("--run", type=Path, required=True, help="the --out directory of 'train'")
    export.add_argument("--medium-step", type=int, required=True)
    export.add_argument("--expert-step", type=int, default=None)
    export.add_argument("--episodes", type=int, default=20)
    export.add_argument("--env", default="Hopper-v5", help="the run's env (gymnasium id or preset name)")
    export.add_argument("--expert-label", default="expert",
                        help="file label of the best snapshot (<env>_<label>.npz); the recipes read 'expert'")
    export.add_argument("--out", type=Path, default=POLICY_DIR, help="where the files go")
    args = parser.parse_args()
    if args.command == "train":
        train_sac(args.env, args.steps, args.seed, args.out, args.snapshot_every, args.buffer_every, args.threads,
                  resume=args.resume)
    else:
        export_policies(args.run, args.medium_step, args.expert_step, out_dir=args.out, episodes=args.episodes,
                        env=args.env, expert_label=args.expert_label)


if __name__ == "__main__":
    try:
        main()
    except DMMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
