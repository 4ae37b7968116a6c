"""Write robot logs from real MuJoCo rollouts of Reacher-v5 (an env with no preset here):

- ``reacher_bag/``: a rosbag2 with MCAP storage, as a robot would record it: the observation split
  over two topics at different rates (/reacher/arm at 50 Hz, /reacher/sensors at 100 Hz), the
  command, the reward as its own topic (published when its outcome is observed, one tick later)
  and a std_msgs/Bool reset at each episode's start;
- ``reacher_lerobot/``: the same episodes as a LeRobotDataset v3.0 (meta/info.json and
  data/chunk-000/file-000.parquet, as LeRobot's CODEBASE_VERSION "v3.0" lays them out; no videos).

Usage: python examples/robot_logs/make_logs.py [--out DIR] [--episodes N]
Needs the [train] and [robot] extras (gymnasium[mujoco], rosbags, pyarrow).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from dmm_train.rollouts import rollout_episodes  # noqa: E402

ENV = "Reacher-v5"
PERIOD_NS = 20_000_000  # Reacher-v5 steps every 20 ms
EPISODE_SPACING_NS = 5_000_000_000  # episodes 5 s apart, each starting with a reset message


def scripted_policy(seed: int):
    """A simple scripted reacher: push the fingertip toward the target, damped, with a little noise."""
    rng = np.random.default_rng(seed)

    def act(observation: np.ndarray) -> np.ndarray:
        cos_q, sin_q, qvel, to_target = observation[:2], observation[2:4], observation[6:8], observation[8:10]
        q = np.arctan2(sin_q, cos_q)  # (2,) joint angles
        # Jacobian transpose of a two-link arm (link lengths 0.1, 0.11): torques that pull the tip along -to_target.
        l1, l2 = 0.1, 0.11
        jac = np.array([[-l1 * np.sin(q[0]) - l2 * np.sin(q.sum()), -l2 * np.sin(q.sum())],
                        [l1 * np.cos(q[0]) + l2 * np.cos(q.sum()), l2 * np.cos(q.sum())]])  # (2, 2)
        torque = -20.0 * jac.T @ to_target - 0.1 * qvel + rng.normal(0.0, 0.05, 2)
        return np.clip(torque, -1.0, 1.0).astype(np.float32)

    return act


def write_bag(path: Path, rollouts) -> None:
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.LATEST)
    array_type = store.types["std_msgs/msg/Float64MultiArray"]
    layout = store.types["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)

    def array(values):
        return array_type(layout=layout, data=np.asarray(values, dtype=np.float64))

    messages = []  # (time ns, topic, message)
    for i, rollout in enumerate(rollouts):
        start = EPISODE_SPACING_NS * (i + 1)
        messages.append((start, "/reacher/reset", store.types["std_msgs/msg/Bool"](data=True)))
        for k, observation in enumerate(rollout.observations):
            tick = start + k * PERIOD_NS
            messages.append((tick, "/reacher/arm", array(observation[:4])))  # cos q, sin q: 50 Hz
            for offset in (0, PERIOD_NS // 2):  # target, joint velocities, tip-to-target: 100 Hz
                messages.append((tick + offset, "/reacher/sensors", array(observation[4:])))
            if k < len(rollout):
                messages.append((tick, "/reacher/command", array(rollout.actions[k])))
                messages.append((tick + PERIOD_NS, "/reacher/reward",
                                 store.types["std_msgs/msg/Float64"](data=float(rollout.rewards[k]))))
    messages.sort(key=lambda item: item[0])
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = {}
        for time, topic, message in messages:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, message.__msgtype__, typestore=store)
            writer.write(connections[topic], time, store.serialize_cdr(message, message.__msgtype__))


def write_lerobot(root: Path, rollouts, fps: int = 50, timestamps=None) -> None:
    """LeRobotDataset v3.0 files as LeRobot writes them (huggingface/lerobot, CODEBASE_VERSION "v3.0",
    src/lerobot/datasets/utils.py: meta/info.json and data/chunk-000/file-000.parquet with fixed-size list
    columns for vector features); no videos. timestamps: one per frame in place of k / fps (a logger's
    irregular clock)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    state_dim, act_dim = rollouts[0].observations.shape[1], rollouts[0].actions.shape[1]
    columns = {name: [] for name in ("observation.state", "action", "timestamp", "frame_index", "episode_index",
                                     "index", "task_index", "next.reward", "next.done")}
    for e, rollout in enumerate(rollouts):
        for k in range(len(rollout)):
            columns["observation.state"].append(rollout.observations[k].astype(np.float32))
            columns["action"].append(rollout.actions[k])
            columns["timestamp"].append(k / fps)
            columns["frame_index"].append(k)
            columns["episode_index"].append(e)
            columns["index"].append(len(columns["index"]))
            columns["task_index"].append(0)
            columns["next.reward"].append(float(rollout.rewards[k]))
            columns["next.done"].append(k == len(rollout) - 1)
    if timestamps is not None:
        columns["timestamp"] = list(timestamps)
    table = pa.table({
        "observation.state": pa.array(columns["observation.state"], type=pa.list_(pa.float32(), state_dim)),
        "action": pa.array(columns["action"], type=pa.list_(pa.float32(), act_dim)),
        "timestamp": pa.array(columns["timestamp"], type=pa.float32()),
        **{k: pa.array(columns[k], type=pa.int64()) for k in ("frame_index", "episode_index", "index", "task_index")},
        "next.reward": pa.array(columns["next.reward"], type=pa.float32()),
        "next.done": pa.array(columns["next.done"], type=pa.bool_()),
    })
    (root / "data" / "chunk-000").mkdir(parents=True)
    (root / "meta").mkdir()
    pq.write_table(table, root / "data" / "chunk-000" / "file-000.parquet")
    vector = {"dtype": "float32", "names": None}
    info = {
        "codebase_version": "v3.0", "robot_type": "reacher", "fps": fps, "total_episodes": len(rollouts),
        "total_frames": table.num_rows, "chunks_size": 1000,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "features": {"observation.state": {**vector, "shape": [state_dim]}, "action": {**vector, "shape": [act_dim]},
                     "timestamp": {**vector, "shape": [1]}, "next.reward": {**vector, "shape": [1]},
                     "next.done": {"dtype": "bool", "shape": [1], "names": None}},
    }
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("robot_logs"))
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"error: {args.out} exists; choose another --out or remove it")
    rollouts = rollout_episodes(ENV, scripted_policy(args.seed), n_episodes=args.episodes, seed=args.seed)
    args.out.mkdir(parents=True)
    write_bag(args.out / "reacher_bag", rollouts)
    write_lerobot(args.out / "reacher_lerobot", rollouts)
    returns = [float(r.rewards.sum()) for r in rollouts]
    print(f"wrote {len(rollouts)} episodes of {ENV} (return {np.mean(returns):.2f} ± {np.std(returns):.2f}) to "
          f"{args.out}/reacher_bag (rosbag2, MCAP) and {args.out}/reacher_lerobot (LeRobotDataset v3.0)")


if __name__ == "__main__":
    main()
