"""Records, the Minari reader and the sampler: real Minari datasets, training windows, the score."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from contract.errors import DMMError
from contract.scores import normalized_score
from dmm_train import minari_reader
from dmm_train.config import ACTION_PAD_VALUE, STATE_STD_EPS
from dmm_train.minari_reader import load_dataset
from dmm_train.minari_writer import write_minari_dataset
from dmm_train.records import Episode, OfflineDataset
from dmm_train.rollouts import rollout_episodes
from dmm_train.sampler import WindowSampler

DATASET_ID = "test/hopper-data-v0"
EPISODES = 6
SEED = 11


@pytest.fixture(scope="module")
def hopper(tmp_path_factory):
    """A Minari store with one real Hopper-v5 dataset, plus the rollouts it was written from."""
    store = tmp_path_factory.mktemp("store")
    rollouts = rollout_episodes("Hopper-v5", "random", n_episodes=EPISODES, seed=SEED)
    path = write_minari_dataset(
        DATASET_ID, rollouts, "Hopper-v5", algorithm_name="random", ref_min_score=-20.0,
        ref_max_score=3000.0, description="test data", data_path=store,
    )
    return store, path, rollouts


@pytest.fixture
def store_env(monkeypatch, hopper):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(hopper[0]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hopper


# --------------------------------------------------------------------------- loading


def test_load_by_path_equals_rollouts(hopper):
    _, path, rollouts = hopper
    dataset = load_dataset(str(path))
    assert dataset.dataset_id == DATASET_ID and dataset.env_id == "Hopper-v5"
    assert (dataset.state_dim, dataset.act_dim) == (11, 3)
    assert len(dataset.episodes) == EPISODES
    assert dataset.total_steps == sum(len(r) for r in rollouts)
    for episode, rollout in zip(dataset.episodes, rollouts, strict=True):
        assert episode.observations.dtype == np.float32 and episode.observations.shape == (len(rollout), 11)
        np.testing.assert_array_equal(episode.observations, rollout.observations[:-1].astype(np.float32))
        np.testing.assert_array_equal(episode.actions, rollout.actions)
        np.testing.assert_array_equal(episode.rewards, rollout.rewards.astype(np.float32))
        assert episode.terminated == bool(rollout.terminations[-1])
    assert (dataset.ref_min_score, dataset.ref_max_score) == (-20.0, 3000.0)


def test_normalisation_stats_follow_the_official_formula(hopper):
    dataset = load_dataset(hopper[1])
    states = np.concatenate([r.observations[:-1].astype(np.float32) for r in hopper[2]]).astype(np.float64)
    np.testing.assert_allclose(dataset.state_mean, states.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dataset.state_std, states.std(0) + STATE_STD_EPS, rtol=1e-6, atol=1e-7)
    assert dataset.state_mean.dtype == dataset.state_std.dtype == np.float32


def test_load_by_id_and_by_data_dir_give_the_same_data(store_env):
    _, path, _ = store_env
    by_path = load_dataset(path)
    by_id = load_dataset(DATASET_ID)
    by_data_dir = load_dataset(path / "data")
    assert by_id.content_hash == by_path.content_hash == by_data_dir.content_hash
    assert len(by_path.content_hash) == 64


def test_arrays_are_read_only(hopper):
    dataset = load_dataset(hopper[1])
    with pytest.raises(ValueError):
        dataset.episodes[0].observations[0, 0] = 1.0
    with pytest.raises(ValueError):
        dataset.state_mean[0] = 1.0


def test_remote_id_without_network_fails_fast_with_a_way_out(store_env):
    started = time.perf_counter()
    with pytest.raises(DMMError) as info:
        load_dataset("nobody/nothing-v0")
    assert time.perf_counter() - started < 30
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("nobody/nothing-v0", "could not download", "--dataset PATH", "cli.py collect"):
        assert fragment in message, message
    # Either the hub client is missing (say how to install it) or the network is (say so).
    assert 'pip install "minari[hf]"' in message or "HF_HUB_OFFLINE" in message or "network" in message


def test_remote_with_hub_client_but_offline_flag(store_env, monkeypatch):
    monkeypatch.setattr(minari_reader, "_hub_client_installed", lambda: True)
    with pytest.raises(DMMError, match="HF_HUB_OFFLINE is set"):
        load_dataset("nobody/nothing-v0")


def test_remote_with_hub_client_and_no_network(store_env, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(minari_reader, "_hub_client_installed", lambda: True)
    monkeypatch.setattr(minari_reader, "_endpoint_reachable", lambda url, timeout_s: False)
    with pytest.raises(DMMError, match="there is no network"):
        load_dataset("nobody/nothing-v0")


def test_network_probe_never_hangs():
    started = time.perf_counter()
    # A non-routable address: the request fails at once, times out, or (behind a TCP-intercepting
    # sandbox) fails in the TLS handshake.
    assert minari_reader._endpoint_reachable("https://10.255.255.1", 0.5) is False
    assert time.perf_counter() - started < 2.0


def test_download_off_says_not_local(store_env):
    with pytest.raises(DMMError, match="not in the local Minari store"):
        load_dataset("nobody/nothing-v0", download=False)


@pytest.mark.parametrize("spec", ["./no/such/dir", "/no/such/dataset", "not an id", "hopper", ""])
def test_bad_paths_and_ids_are_dmm_errors(store_env, spec):
    with pytest.raises(DMMError):
        load_dataset(spec)


def test_directory_that_is_not_a_dataset(tmp_path):
    with pytest.raises(DMMError, match="is not a Minari dataset"):
        load_dataset(tmp_path)


def test_unsupported_minari_version_is_refused(hopper, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(hopper[1], copy)
    metadata_path = copy / "data" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["minari_version"] = "9.9.9"
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(DMMError, match="9.9.9"):
        load_dataset(copy)


# --------------------------------------------------------------------------- records


def test_episode_validates_shapes():
    with pytest.raises(DMMError, match="same T"):
        Episode(np.zeros((3, 2)), np.zeros((2, 1)), np.zeros(3), False)
    with pytest.raises(DMMError, match="shapes"):
        Episode(np.zeros(3), np.zeros((3, 1)), np.zeros(3), False)


def test_content_hash_depends_on_data_only():
    a = [Episode(np.ones((2, 2)), np.zeros((2, 1)), np.arange(2), True)]
    b = [Episode(np.ones((2, 2)), np.zeros((2, 1)), np.arange(2), False)]
    first = OfflineDataset.from_episodes("x/a-v0", "E", a)
    assert first.content_hash == OfflineDataset.from_episodes("y/b-v1", "F", a).content_hash
    assert first.content_hash != OfflineDataset.from_episodes("x/a-v0", "E", b).content_hash


def test_normalized_score():
    assert normalized_score(50.0, 0.0, 200.0) == pytest.approx(25.0)
    assert normalized_score(-20.272305, -20.272305, 3234.3) == pytest.approx(0.0)
    np.testing.assert_allclose(normalized_score(np.array([0.0, 100.0]), 0.0, 100.0), [0.0, 100.0])
    with pytest.raises(DMMError, match="equal"):
        normalized_score(1.0, 5.0, 5.0)


# --------------------------------------------------------------------------- sampler

K = 4
RTG_SCALE = 10.0
LENGTHS = (3, 12)


@pytest.fixture(scope="module")
def tiny():
    """Two hand-built episodes: states t + 0.1*episode, actions -t, rewards 1, 2, 3, ..."""
    episodes = []
    for number, length in enumerate(LENGTHS):
        t = np.arange(length, dtype=np.float32)
        observations = np.stack([t + 0.1 * number, 2.0 * t + 1.0], axis=1)  # (T, 2)
        actions = -t[:, None] / 100.0  # (T, 1)
        episodes.append(Episode(observations, actions, t + 1.0, terminated=number == 0))
    return OfflineDataset.from_episodes("test/tiny-v0", "None", episodes)


def official_window(dataset: OfflineDataset, episode: int, start: int, context_len: int, scale: float):
    """The official DT/DMM get_batch for one window, written out step by step (slow reference)."""
    traj = dataset.episodes[episode]
    s = traj.observations[start:start + context_len].astype(np.float64)
    a = traj.actions[start:start + context_len].astype(np.float64)
    rewards = traj.rewards[start:].astype(np.float64)
    cumsum = np.zeros_like(rewards)
    cumsum[-1] = rewards[-1]
    for t in reversed(range(rewards.shape[0] - 1)):
        cumsum[t] = rewards[t] + cumsum[t + 1]  # discount_cumsum, gamma = 1
    tlen = s.shape[0]
    rtg = cumsum[:tlen + 1]
    if rtg.shape[0] <= tlen:
        rtg = np.concatenate([rtg, np.zeros(1)])
    pad = context_len - tlen
    s = np.concatenate([np.zeros((pad, s.shape[1])), s])
    s = (s - dataset.state_mean) / dataset.state_std
    a = np.concatenate([np.ones((pad, a.shape[1])) * -10.0, a])
    rtg = np.concatenate([np.zeros(pad), rtg]) / scale
    mask = np.concatenate([np.zeros(pad), np.ones(tlen)])
    return s, a, rtg[:-1, None], mask  # the model is fed rtg[:, :-1]


def test_windows_match_the_official_sampler_everywhere(tiny):
    sampler = WindowSampler(tiny, K, RTG_SCALE, seed=0)
    pairs = [(e, s) for e, length in enumerate(LENGTHS) for s in range(length)]
    episode, start = (np.array(column) for column in zip(*pairs, strict=True))
    batch = sampler.windows(episode, start)
    for i, (e, s) in enumerate(pairs):
        ref_states, ref_actions, ref_rtg, ref_mask = official_window(tiny, e, s, K, RTG_SCALE)
        np.testing.assert_allclose(batch.states[i], ref_states, rtol=1e-6, atol=1e-6, err_msg=f"{e},{s}")
        np.testing.assert_array_equal(batch.actions[i], ref_actions.astype(np.float32))
        np.testing.assert_allclose(batch.rtg[i], ref_rtg, rtol=1e-6, err_msg=f"{e},{s}")
        np.testing.assert_array_equal(batch.mask[i], ref_mask)


def test_window_values_by_hand(tiny):
    sampler = WindowSampler(tiny, K, RTG_SCALE, seed=0)
    batch = sampler.windows(np.array([0, 1, 1]), np.array([1, 2, 11]))
    assert batch.states.shape == (3, K, 2) and batch.actions.shape == (3, K, 1)
    assert batch.rtg.shape == (3, K, 1) and batch.mask.shape == (3, K)
    for array in (batch.states, batch.actions, batch.rtg, batch.mask):
        assert array.dtype == np.float32
    pad_state = -tiny.state_mean / tiny.state_std
    # Episode 0 (rewards 1, 2, 3) from step 1: two real steps, two padded on the left.
    np.testing.assert_array_equal(batch.mask[0], [0, 0, 1, 1])
    np.testing.assert_allclose(batch.rtg[0, :, 0], [0.0, 0.0, 0.5, 0.3], rtol=1e-6)  # (2+3)/10, 3/10
    np.testing.assert_allclose(batch.states[0, :2], [pad_state, pad_state], rtol=1e-6)
    np.testing.assert_allclose(batch.states[0, 2], ([1.0, 3.0] - tiny.state_mean) / tiny.state_std, rtol=1e-6)
    np.testing.assert_array_equal(batch.actions[0, :2, 0], [ACTION_PAD_VALUE, ACTION_PAD_VALUE])
    np.testing.assert_allclose(batch.actions[0, 2:, 0], [-0.01, -0.02], rtol=1e-6)
    # Episode 1 (rewards 1..12) from step 2: a full window, rtg = 75, 72, 68, 63 over 10.
    np.testing.assert_array_equal(batch.mask[1], [1, 1, 1, 1])
    np.testing.assert_allclose(batch.rtg[1, :, 0], [7.5, 7.2, 6.8, 6.3], rtol=1e-6)
    # Episode 1 from its last step: the window holds that one step, rtg = 12 / 10.
    np.testing.assert_array_equal(batch.mask[2], [0, 0, 0, 1])
    np.testing.assert_allclose(batch.rtg[2, :, 0], [0.0, 0.0, 0.0, 1.2], rtol=1e-6)


def test_episode_choice_is_length_proportional_and_starts_uniform(tiny):
    sampler = WindowSampler(tiny, K, RTG_SCALE, seed=1)
    draws = 40_000
    episode, start = sampler.draw(draws)
    share_long = np.mean(episode == 1)
    expected = LENGTHS[1] / sum(LENGTHS)  # 0.8
    assert abs(share_long - expected) < 0.02, share_long  # binomial sd is 0.002
    for number, length in enumerate(LENGTHS):
        counts = np.bincount(start[episode == number], minlength=length)
        assert counts.shape == (length,)  # never beyond T-1
        assert counts.min() > 0.7 * counts.mean(), counts


def assert_rows_are_official_windows(dataset, batch, context_len: int, scale: float) -> None:
    """Every row of ``batch`` is the official window of some (episode, start) of ``dataset``."""
    pairs = [(e, t) for e, episode in enumerate(dataset.episodes) for t in range(len(episode.rewards))]
    for i in range(batch.states.shape[0]):
        found = False
        for e, t in pairs:
            states, actions, rtg, mask = official_window(dataset, e, t, context_len, scale)
            if (np.array_equal(batch.mask[i], mask) and np.array_equal(batch.actions[i], actions.astype(np.float32))
                    and np.allclose(batch.states[i], states, rtol=1e-6, atol=1e-6)
                    and np.allclose(batch.rtg[i], rtg, rtol=1e-6, atol=1e-7)):
                found = True
                break
        assert found, f"row {i} of the sampled batch is no official window of the dataset"


def test_sampled_batches_are_official_windows(tiny):
    # sample() checked against the slow step-by-step get_batch, not against the sampler's own windows().
    batch = WindowSampler(tiny, K, RTG_SCALE, seed=2).sample(32)
    assert_rows_are_official_windows(tiny, batch, K, RTG_SCALE)


def test_sampler_state_round_trips_through_json(tiny):
    sampler = WindowSampler(tiny, K, RTG_SCALE, seed=3)
    sampler.sample(5)
    saved = json.loads(json.dumps(sampler.get_state()))
    first = sampler.sample(8)
    other = WindowSampler(tiny, K, RTG_SCALE, seed=99)
    other.set_state(saved)
    second = other.sample(8)
    np.testing.assert_array_equal(first.states, second.states)
    np.testing.assert_array_equal(first.rtg, second.rtg)
    with pytest.raises(DMMError, match="sampler state"):
        other.set_state({"bit_generator": "MT19937"})


def test_sampler_rejects_bad_arguments(tiny):
    with pytest.raises(DMMError):
        WindowSampler(tiny, 0, RTG_SCALE)
    with pytest.raises(DMMError):
        WindowSampler(tiny, K, 0.0)
    with pytest.raises(DMMError):
        WindowSampler(tiny, K, RTG_SCALE).sample(0)


def test_sampler_on_real_data_gives_official_windows(hopper):
    dataset = load_dataset(hopper[1])
    batch = WindowSampler(dataset, 8, 1000.0, seed=0).sample(16)
    assert batch.states.shape == (16, 8, 11)
    assert_rows_are_official_windows(dataset, batch, 8, 1000.0)


def test_download_failures_become_one_dmm_error(store_env, monkeypatch):
    import minari

    def unknown(dataset_id):
        raise ValueError(f"Couldn't find any version for dataset {dataset_id} in the remote server.\nmore")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(minari_reader, "_hub_client_installed", lambda: True)
    monkeypatch.setattr(minari_reader, "_endpoint_reachable", lambda url, timeout_s: True)
    monkeypatch.setattr(minari, "download_dataset", unknown)
    with pytest.raises(DMMError, match="ValueError: Couldn't find any version") as info:
        load_dataset("nobody/nothing-v0")
    assert "\n" not in str(info.value) and "--dataset PATH" in str(info.value)


def test_successful_download_is_loaded_from_the_store(store_env, monkeypatch):
    import shutil

    import minari

    store, path, _ = store_env

    def fake_download(dataset_id):
        shutil.copytree(path, store / dataset_id)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(minari_reader, "_hub_client_installed", lambda: True)
    monkeypatch.setattr(minari_reader, "_endpoint_reachable", lambda url, timeout_s: True)
    monkeypatch.setattr(minari, "download_dataset", fake_download)
    downloaded = load_dataset("remote/hopper-v3")
    assert downloaded.content_hash == load_dataset(path).content_hash
    shutil.rmtree(store / "remote")
