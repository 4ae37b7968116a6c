"""Feed a deployed policy the observations of a logged episode, as the robot's own loop would.

The engine (an ONNX graph or the C step from `cli.py export`) runs through `runtime.Policy`, the
torch-free API a robot uses. Each step gets the logged observation and the reward of the step
before; the action the robot actually executed is written back into the policy's history
(`Policy.override_action`), so the policy sees what the robot did. The script prints the action
RMSE against the logged actions per episode: how closely the policy follows the behaviour it
was trained on.

    python examples/robot_logs/drive_from_log.py --engine reacher.onnx --dataset robot/reacher-bag-v0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's runtime/ and dmm_train/

from contract.errors import DMMError  # noqa: E402
from dmm_train.minari_reader import load_dataset  # noqa: E402
from runtime.loading import load_backend  # noqa: E402
from runtime.policy import Policy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True, help="NAME.onnx or NAME.c from 'cli.py export'")
    parser.add_argument("--dataset", required=True, help="the imported dataset: local Minari id or directory")
    parser.add_argument("--episodes", type=int, default=3)
    args = parser.parse_args()
    try:
        dataset = load_dataset(args.dataset, download=False)
        with load_backend(args.engine) as backend:
            policy = Policy(backend)
            for index, episode in enumerate(dataset.episodes[:args.episodes]):
                policy.reset()
                actions = np.zeros_like(episode.actions)  # (T, Adim)
                reward = 0.0
                for t, observation in enumerate(episode.observations):
                    actions[t] = policy.act(observation, reward)
                    policy.override_action(episode.actions[t])  # what the robot executed
                    reward = float(episode.rewards[t])
                rmse = float(np.sqrt(np.mean((actions - episode.actions) ** 2)))
                print(f"episode {index}: {len(episode)} steps, action RMSE against the log {rmse:.4f}")
    except DMMError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
