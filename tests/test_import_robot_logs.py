"""`cli.py import`: robot logs in each format, written by its real library from real MuJoCo rollouts,
imported and compared with the Minari dataset written directly from the same rollouts."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import cli
from dmm_train.minari_reader import load_dataset
from dmm_train.minari_writer import write_minari_dataset
from dmm_train.rollouts import cut_rollout, rollout_episodes
from tests.helpers import assert_one_line_error

h5py = pytest.importorskip("h5py")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
rosbag2 = pytest.importorskip("rosbags.rosbag2")
typesys = pytest.importorskip("rosbags.typesys")

ENV = "Reacher-v5"
STEPS = 12  # per episode: small, the formats' paths are what is tested
PERIOD_NS = 20_000_000  # Reacher-v5's dt: 20 ms
EPISODE_GAP_NS = 1_000_000_000


@pytest.fixture(scope="module")
def rollouts():
    return [cut_rollout(r, STEPS) for r in rollout_episodes(ENV, n_episodes=3, seed=3)]


@pytest.fixture(scope="module")
def direct(rollouts, tmp_path_factory):
    """The dataset `collect` would write from the same rollouts, as the project reads it."""
    store = tmp_path_factory.mktemp("direct")
    return load_dataset(write_minari_dataset("test/direct-v0", rollouts, ENV, algorithm_name="random",
                                             description="direct", data_path=store))


def _import(tmp_path, source, *options) -> str:
    args = ["import", str(source), "--dataset-id", "test/imported-v0", "--out", str(tmp_path / "store"), *options]
    assert cli.main(args) == 0
    return str(tmp_path / "store" / "test" / "imported-v0")


def _plain_minari(path: str):
    """The dataset read with plain minari (no project code)."""
    import minari

    return list(minari.MinariDataset(os.path.join(path, "data")).iterate_episodes())


def _assert_same(path: str, rollouts, direct) -> None:
    episodes = _plain_minari(path)
    assert len(episodes) == len(rollouts)
    for episode, rollout in zip(episodes, rollouts, strict=True):
        np.testing.assert_array_equal(episode.observations, rollout.observations)
        np.testing.assert_array_equal(episode.actions, rollout.actions)
        np.testing.assert_array_equal(episode.rewards, rollout.rewards)
        np.testing.assert_array_equal(episode.truncations, rollout.truncations)
        np.testing.assert_array_equal(episode.terminations, rollout.terminations)
    assert load_dataset(path).content_hash == direct.content_hash


def _flat(rollouts) -> dict[str, np.ndarray]:
    return {
        "observations": np.concatenate([r.observations[:-1] for r in rollouts]),  # (N, S)
        "next_observations": np.concatenate([r.observations[1:] for r in rollouts]),  # (N, S)
        "actions": np.concatenate([r.actions for r in rollouts]),  # (N, A)
        "rewards": np.concatenate([r.rewards for r in rollouts]),  # (N,)
        "terminations": np.concatenate([r.terminations for r in rollouts]),
        "truncations": np.concatenate([r.truncations for r in rollouts]),
        "episode_ends": np.cumsum([len(r) for r in rollouts]),
    }


def test_npz_flat_arrays_match_the_direct_dataset(tmp_path, rollouts, direct, capsys):
    np.savez(tmp_path / "log.npz", **_flat(rollouts))
    path = _import(tmp_path, tmp_path / "log.npz", "--format", "npz")
    out = capsys.readouterr().out
    assert "3 episodes, 36 steps, obs dim 10, action dim 2" in out and "final observation from" in out
    _assert_same(path, rollouts, direct)
    # The metadata records the source's sha256 and the mapping used.
    import hashlib

    description = json.loads((tmp_path / "store/test/imported-v0/data/metadata.json").read_text())["description"]
    record = json.loads(description.split("import: ", 1)[1])
    assert record["sources_sha256"] == {"log.npz": hashlib.sha256((tmp_path / "log.npz").read_bytes()).hexdigest()}
    assert record["mapping"]["observation"] == ["observations"]


def test_npz_without_final_observation_drops_the_last_transition(tmp_path, rollouts, capsys):
    arrays = _flat(rollouts)
    del arrays["next_observations"]
    np.savez(tmp_path / "log.npz", **arrays)
    path = _import(tmp_path, tmp_path / "log.npz", "--format", "npz")
    assert "dropped the last transition of 3 of 3 episodes" in capsys.readouterr().out
    for episode, rollout in zip(_plain_minari(path), rollouts, strict=True):
        np.testing.assert_array_equal(episode.observations, rollout.observations[:-1])
        np.testing.assert_array_equal(episode.actions, rollout.actions[:-1])
        assert episode.truncations[-1] and not episode.terminations.any()


def test_hdf5_one_group_per_episode(tmp_path, rollouts, direct):
    with h5py.File(tmp_path / "log.h5", "w") as handle:
        for i, r in enumerate(rollouts):
            group = handle.create_group(f"episode_{i}")
            for name in ("observations", "actions", "rewards", "terminations", "truncations"):
                group[name] = getattr(r, name)
    _assert_same(_import(tmp_path, tmp_path / "log.h5", "--format", "hdf5"), rollouts, direct)


def test_robomimic_layout_concatenates_obs_keys_in_the_stated_order(tmp_path, rollouts, direct):
    with h5py.File(tmp_path / "demo.hdf5", "w") as handle:
        for i, r in enumerate(rollouts):
            demo = handle.create_group(f"data/demo_{i}")
            # robomimic splits the observation into named keys; here angles first, the rest second.
            demo["obs/joint_angles"], demo["obs/target_and_vel"] = r.observations[:-1, :4], r.observations[:-1, 4:]
            demo["next_obs/joint_angles"], demo["next_obs/target_and_vel"] = r.observations[1:, :4], \
                r.observations[1:, 4:]
            demo["actions"], demo["rewards"] = r.actions, r.rewards
            demo["dones"] = r.truncations.astype(np.int64)
    path = _import(tmp_path, tmp_path / "demo.hdf5", "--format", "robomimic", "--obs", "joint_angles",
                   "--obs", "target_and_vel")
    _assert_same(path, rollouts, direct)


def _typestore():
    return typesys.get_typestore(typesys.Stores.LATEST)


def _write_bag(path, storage, messages: dict[str, list[tuple[int, object]]]) -> None:
    """A rosbag2 written by rosbags' own writer; messages: topic -> [(time ns, message)]."""
    store = _typestore()
    plugin = rosbag2.StoragePlugin.MCAP if storage == "mcap" else rosbag2.StoragePlugin.SQLITE3
    with rosbag2.Writer(path, version=9, storage_plugin=plugin) as writer:
        connections = {topic: writer.add_connection(topic, items[0][1].__msgtype__, typestore=store)
                       for topic, items in messages.items()}
        timeline = sorted((t, topic, i) for topic, items in messages.items() for i, (t, _) in enumerate(items))
        for t, topic, i in timeline:
            message = messages[topic][i][1]
            writer.write(connections[topic], t, store.serialize_cdr(message, message.__msgtype__))


def _array(values):
    store = _typestore()
    layout = store.types["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
    return store.types["std_msgs/msg/Float64MultiArray"](layout=layout, data=np.asarray(values, dtype=np.float64))


def _scalar(value):
    return _typestore().types["std_msgs/msg/Float64"](data=float(value))


def _bool(value):
    return _typestore().types["std_msgs/msg/Bool"](data=bool(value))


def _robot_messages(rollouts) -> dict:
    """The rollouts as a robot would log them: the observation over two topics (the target and
    velocities at twice the control rate), the command, the reward observed one tick later, and a
    reset at each episode's start."""
    topics: dict[str, list] = {"/joints": [], "/target": [], "/command": [], "/reward": [], "/reset": []}
    for i, r in enumerate(rollouts):
        start = EPISODE_GAP_NS * (i + 1)
        topics["/reset"].append((start, _bool(True)))
        for k, observation in enumerate(r.observations):
            tick = start + k * PERIOD_NS
            topics["/joints"].append((tick, _array(observation[:4])))
            topics["/target"].append((tick, _array(observation[4:])))
            topics["/target"].append((tick + PERIOD_NS // 2, _array(observation[4:])))
            if k < len(r):
                topics["/command"].append((tick, _array(r.actions[k])))
                topics["/reward"].append((tick + PERIOD_NS, _scalar(r.rewards[k])))
    return topics


MAPPING = """\
observation = ["/joints:data", "/target:data"]
action = "/command:data"
reward = "/reward:data"
period_ms = 20
reset_topic = "/reset"
"""


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_rosbag2_matches_the_direct_dataset(tmp_path, rollouts, direct, storage, capsys):
    _write_bag(tmp_path / "bag", storage, _robot_messages(rollouts))
    (tmp_path / "mapping.toml").write_text(MAPPING)
    path = _import(tmp_path, tmp_path / "bag", "--format", "rosbag2", "--mapping", str(tmp_path / "mapping.toml"))
    assert "final observation from the log" in capsys.readouterr().out
    _assert_same(path, rollouts, direct)


def test_plain_mcap_file_cut_by_time_gaps(tmp_path, rollouts, direct):
    messages = _robot_messages(rollouts)
    del messages["/reset"]
    _write_bag(tmp_path / "bag", "mcap", messages)
    (mcap,) = (tmp_path / "bag").glob("*.mcap")  # the storage file of a rosbag2 is a plain MCAP file
    path = _import(tmp_path, mcap, "--format", "mcap", "--obs", "/joints:data", "--obs", "/target:data",
                   "--action", "/command:data", "--reward", "/reward:data", "--period-ms", "20",
                   "--episode-gap-s", "0.5")
    _assert_same(path, rollouts, direct)


def test_alignment_never_takes_a_later_message(tmp_path):
    """Jittered, irregular timestamps: each step holds the latest message at or before its tick."""
    rng = np.random.default_rng(0)
    obs_times = np.cumsum(rng.integers(3_000_000, 37_000_000, size=80))  # ns, irregular
    act_times = np.cumsum(rng.integers(5_000_000, 30_000_000, size=100))
    # Each message carries its own timestamp (seconds) as its value, so a step shows which one it took.
    messages = {"/obs": [(int(t), _array([t / 1e9])) for t in obs_times],
                "/act": [(int(t), _array([t / 1e9])) for t in act_times],
                "/rew": [(int(t), _scalar(t / 1e9)) for t in act_times]}
    _write_bag(tmp_path / "bag", "sqlite3", messages)
    path = _import(tmp_path, tmp_path / "bag", "--format", "rosbag2", "--obs", "/obs:data", "--action",
                   "/act:data", "--reward", "/rew:data", "--period-ms", "20")
    (episode,) = _plain_minari(path)
    first = max(obs_times[0], act_times[0])
    ticks = first + PERIOD_NS * np.arange(len(episode.observations))  # (T+1,)
    assert len(episode.observations) > 20
    for values, times, tick_set, tolerance in ((episode.observations[:, 0], obs_times, ticks, 1e-9),
                                               (episode.actions[:, 0], act_times, ticks[:-1], 1e-6)):
        for value, tick in zip(values, tick_set, strict=True):
            latest = times[times <= tick][-1]  # the latest message at or before the tick, never a later one
            assert abs(value - latest / 1e9) <= tolerance * max(1.0, latest / 1e9)
    # Rewards: the latest reward at or before the next tick.
    for k, reward in enumerate(episode.rewards):
        assert reward == act_times[act_times <= ticks[k + 1]][-1] / 1e9


def _write_lerobot(root, rollouts, *, timestamps=None) -> None:
    """The example's LeRobotDataset v3.0 writer (examples/robot_logs/make_logs.py), so the test checks it too."""
    import importlib.util

    from tests.helpers import REPO_ROOT

    spec = importlib.util.spec_from_file_location("make_logs", REPO_ROOT / "examples/robot_logs/make_logs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_lerobot(root, rollouts, fps=50, timestamps=timestamps)


def test_lerobot_v3_drops_the_last_transition_and_says_how_done_is_read(tmp_path, rollouts, capsys):
    _write_lerobot(tmp_path / "lerobot", rollouts)
    path = _import(tmp_path, tmp_path / "lerobot", "--format", "lerobot")
    out = capsys.readouterr().out
    assert "dropped the last transition of 3 of 3 episodes" in out
    assert "next.done read as truncated (--done-means terminated to change)" in out
    shortened = [cut_rollout(r, len(r) - 1) for r in rollouts]
    for episode, r in zip(_plain_minari(path), shortened, strict=True):
        np.testing.assert_allclose(episode.observations, r.observations.astype(np.float32))
        np.testing.assert_array_equal(episode.actions, r.actions)
        np.testing.assert_allclose(episode.rewards, r.rewards.astype(np.float32))
        assert episode.truncations[-1] and not episode.terminations.any()


def test_reward_function_from_the_command_line(tmp_path, rollouts, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "import numpy as np\n"
        "def reach(observations, actions, next_observations):\n"
        "    return -np.linalg.norm(next_observations[:, 8:10], axis=1) - np.square(actions).sum(axis=1)\n")
    monkeypatch.chdir(tmp_path)
    arrays = _flat(rollouts)
    del arrays["rewards"]
    np.savez(tmp_path / "log.npz", **arrays)
    path = _import(tmp_path, tmp_path / "log.npz", "--format", "npz", "--reward-fn", "my_rewards:reach")
    for episode, r in zip(_plain_minari(path), rollouts, strict=True):
        expected = -np.linalg.norm(r.observations[1:, 8:10], axis=1) - np.square(r.actions.astype(np.float64)).sum(1)
        np.testing.assert_allclose(episode.rewards, expected, rtol=1e-6)


def test_sparse_success_rewards_the_end_of_successful_episodes(tmp_path, rollouts):
    arrays = _flat(rollouts)
    del arrays["rewards"]
    success = np.zeros(len(arrays["actions"]), dtype=bool)
    success[arrays["episode_ends"][1] - 1] = True  # only the second episode ends in success
    np.savez(tmp_path / "log.npz", success=success, **arrays)
    path = _import(tmp_path, tmp_path / "log.npz", "--format", "npz", "--reward", "sparse-success",
                   "--success", "success")
    returns = [float(e.rewards.sum()) for e in _plain_minari(path)]
    assert returns == [0.0, 1.0, 0.0]


def _run(tmp_path, *args) -> int:
    return cli.main(["import", *map(str, args), "--dataset-id", "test/bad-v0", "--out", str(tmp_path / "store")])


def test_non_finite_value_names_file_key_and_step(tmp_path, rollouts, capsys):
    arrays = _flat(rollouts)
    arrays["observations"][arrays["episode_ends"][0] + 3, 2] = np.nan  # episode 1, step 3
    np.savez(tmp_path / "log.npz", **arrays)
    assert_one_line_error(capsys, _run(tmp_path, tmp_path / "log.npz", "--format", "npz"),
                          "log.npz", "observations episode 1 step 3", "non-finite")


def test_mismatched_lengths_are_one_line(tmp_path, rollouts, capsys):
    arrays = _flat(rollouts)
    arrays["rewards"] = arrays["rewards"][:-2]
    np.savez(tmp_path / "log.npz", **arrays)
    assert_one_line_error(capsys, _run(tmp_path, tmp_path / "log.npz", "--format", "npz"),
                          "log.npz", "rewards", "mismatched lengths")


def test_empty_episode_is_one_line(tmp_path, rollouts, capsys):
    with h5py.File(tmp_path / "log.h5", "w") as handle:
        handle["episode_0/observations"] = rollouts[0].observations
        handle["episode_0/actions"] = rollouts[0].actions
        handle["episode_0/rewards"] = rollouts[0].rewards
        handle["episode_1/observations"] = np.zeros((1, 10))
        handle["episode_1/actions"] = np.zeros((0, 2), dtype=np.float32)
        handle["episode_1/rewards"] = np.zeros(0)
    assert_one_line_error(capsys, _run(tmp_path, tmp_path / "log.h5", "--format", "hdf5"),
                          "log.h5", "episode_1/actions", "episode 1", "empty episode")


def test_timestamps_going_backwards_are_one_line(tmp_path, rollouts, capsys):
    steps = sum(len(r) for r in rollouts)
    stamps = np.tile(np.arange(STEPS, dtype=np.float32) * 0.02, 3)[:steps]
    stamps[STEPS + 5] = 0.0  # episode 1 step 5 jumps back in time
    _write_lerobot(tmp_path / "lerobot", rollouts, timestamps=stamps)
    assert_one_line_error(capsys, _run(tmp_path, tmp_path / "lerobot", "--format", "lerobot"),
                          "lerobot", "column timestamp episode 1 step 5", "goes backwards")


def test_missing_topic_and_field_are_one_line(tmp_path, rollouts, capsys):
    _write_bag(tmp_path / "bag", "sqlite3", _robot_messages(rollouts[:1]))
    common = ["--action", "/command:data", "--reward", "/reward:data", "--period-ms", "20"]
    assert_one_line_error(capsys, _run(tmp_path, tmp_path / "bag", "--format", "rosbag2", "--obs", "/camera:data",
                                       *common), "bag", "no topic '/camera'", "/joints")
    assert_one_line_error(capsys, _run(tmp_path, tmp_path / "bag", "--format", "rosbag2", "--obs",
                                       "/joints:position", *common),
                          "bag", "topic '/joints' message 0", "no field 'position'", "data")


def test_mapping_file_naming_code_is_refused(tmp_path, rollouts, capsys):
    np.savez(tmp_path / "log.npz", **_flat(rollouts))
    (tmp_path / "mapping.toml").write_text('format = "npz"\nreward_fn = "os:system"\n')
    assert_one_line_error(capsys, _run(tmp_path, tmp_path / "log.npz", "--mapping", tmp_path / "mapping.toml"),
                          "mapping.toml", "names code", "--reward-fn")
    assert not (tmp_path / "store").exists()
