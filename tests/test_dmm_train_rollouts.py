"""Rollouts and the Minari writer: real Hopper-v5 rollouts written as Minari datasets, atomically."""

from __future__ import annotations

import json

import numpy as np
import pytest

from contract.errors import DMMError
from dmm_train.minari_reader import load_dataset
from dmm_train.minari_writer import write_minari_dataset
from dmm_train.recipes import DEFAULT_DATASET_ID, collect, ensure_default_dataset
from dmm_train.rollouts import rollout_episodes


@pytest.fixture
def store(monkeypatch, tmp_path):
    """A private, empty default Minari store; the hub is offline."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def hidden_entries(root):
    return sorted(p.name for p in root.rglob(".*"))


def write(rollouts, dataset_id, **kwargs):
    return write_minari_dataset(dataset_id, rollouts, "Hopper-v5", algorithm_name="random",
                                description="test", **kwargs)


# --------------------------------------------------------------------------- rollouts


def test_rollouts_are_deterministic_per_seed():
    first = rollout_episodes("Hopper-v5", "random", n_episodes=3, seed=5)
    again = rollout_episodes("Hopper-v5", "random", n_episodes=3, seed=5)
    other = rollout_episodes("Hopper-v5", "random", n_episodes=3, seed=6)
    for a, b in zip(first, again, strict=True):
        for name in ("observations", "actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(first[0].actions[:1], other[0].actions[:1])
    assert [r.seed for r in first] == [5, 6, 7]


def test_rollout_layout_is_minari_s():
    rollouts = rollout_episodes("Hopper-v5", "random", n_episodes=2, seed=0)
    for r in rollouts:
        T = len(r)
        assert r.observations.shape == (T + 1, 11) and r.actions.shape == (T, 3)
        assert r.rewards.shape == r.terminations.shape == r.truncations.shape == (T,)
        assert r.terminations[-1] or r.truncations[-1]
        assert not r.terminations[:-1].any() and not r.truncations[:-1].any()


def test_step_budget_cuts_the_last_episode():
    rollouts = rollout_episodes("Hopper-v5", "random", n_steps=50, seed=0)
    assert sum(len(r) for r in rollouts) == 50
    last = rollouts[-1]
    assert last.terminations[-1] or last.truncations[-1]


def test_callable_policy_is_used():
    rollouts = rollout_episodes("Hopper-v5", lambda obs: np.zeros(3, np.float32), n_episodes=1, seed=0)
    assert np.all(rollouts[0].actions == 0.0)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"n_episodes": 1, "n_steps": 5}, "exactly one"),
        ({}, "exactly one"),
        ({"n_episodes": 0}, "positive"),
    ],
)
def test_rollout_budget_errors(kwargs, fragment):
    with pytest.raises(DMMError, match=fragment):
        rollout_episodes("Hopper-v5", "random", **kwargs)


def test_rollout_policy_and_env_errors():
    with pytest.raises(DMMError, match="shape"):
        rollout_episodes("Hopper-v5", lambda obs: np.zeros(2), n_episodes=1)
    with pytest.raises(DMMError, match="policy 'greedy'"):
        rollout_episodes("Hopper-v5", "greedy", n_episodes=1)
    with pytest.raises(DMMError, match="cannot create environment 'NoSuchEnv-v0'"):
        rollout_episodes("NoSuchEnv-v0", "random", n_episodes=1)


# --------------------------------------------------------------------------- writing


def test_write_to_default_store_lists_and_loads(store):
    import minari

    rollouts = rollout_episodes("Hopper-v5", "random", n_episodes=3, seed=2)
    path = write(rollouts, "test/nested/hopper-v0", ref_min_score=-20.0, ref_max_score=3000.0)
    assert path == store / "test" / "nested" / "hopper-v0"
    assert "test/nested/hopper-v0" in minari.list_local_datasets()
    assert (store / "test" / "namespace_metadata.json").is_file()
    assert (store / "test" / "nested" / "namespace_metadata.json").is_file()
    assert hidden_entries(store) == []  # no staging or trash left behind
    metadata = json.loads((path / "data" / "metadata.json").read_text())
    assert metadata["ref_min_score"] == -20.0 and metadata["ref_max_score"] == 3000.0
    assert metadata["algorithm_name"] == "random"
    dataset = load_dataset("test/nested/hopper-v0")
    assert len(dataset.episodes) == 3
    np.testing.assert_array_equal(dataset.episodes[1].actions, rollouts[1].actions)


def test_write_to_a_given_directory(store, tmp_path):
    out = tmp_path / "elsewhere"
    path = write(rollout_episodes("Hopper-v5", "random", n_episodes=1, seed=0), "xx/one-v0", data_path=out)
    assert path == out / "xx" / "one-v0"
    assert not store.joinpath("xx").exists()
    assert load_dataset(path).dataset_id == "xx/one-v0"


def test_content_hash_stable_across_writes_and_seeds(store):
    hashes = {}
    for dataset_id, seed in (("hh/a-v0", 4), ("hh/b-v0", 4), ("hh/c-v0", 5)):
        path = write(rollout_episodes("Hopper-v5", "random", n_episodes=4, seed=seed), dataset_id)
        hashes[dataset_id] = load_dataset(path).content_hash
    assert hashes["hh/a-v0"] == hashes["hh/b-v0"]
    assert hashes["hh/a-v0"] != hashes["hh/c-v0"]


def test_refuses_to_overwrite_unless_asked(store):
    first = rollout_episodes("Hopper-v5", "random", n_episodes=2, seed=0)
    second = rollout_episodes("Hopper-v5", "random", n_episodes=3, seed=1)
    path = write(first, "ow/w-v0")
    with pytest.raises(DMMError, match="already exists"):
        write(second, "ow/w-v0")
    assert len(load_dataset(path).episodes) == 2
    write(second, "ow/w-v0", overwrite=True)
    assert len(load_dataset(path).episodes) == 3
    assert hidden_entries(store) == []


def test_interrupted_write_leaves_nothing_under_the_final_name(store, monkeypatch):
    import minari

    real = minari.create_dataset_from_buffers

    def write_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # e.g. Ctrl-C after the data reached the disk

    rollouts = rollout_episodes("Hopper-v5", "random", n_episodes=2, seed=0)
    old = write(rollouts[:1], "ii/old-v0")
    monkeypatch.setattr(minari, "create_dataset_from_buffers", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        write(rollouts, "ii/new-v0")
    with pytest.raises(KeyboardInterrupt):
        write(rollouts, "ii/old-v0", overwrite=True)
    assert not (store / "ii" / "new-v0").exists()
    assert len(load_dataset(old).episodes) == 1  # the old dataset is untouched
    assert hidden_entries(store) == []


@pytest.mark.parametrize("dataset_id", ["no-version", "bad id-v0", "a//b-v0", "x/one-char-namespace-v0"])
def test_malformed_ids_are_refused(store, dataset_id):
    with pytest.raises(DMMError, match="namespace/name-vN"):
        write(rollout_episodes("Hopper-v5", "random", n_episodes=1), dataset_id)


def test_reference_scores_come_as_a_pair(store):
    with pytest.raises(DMMError, match="both or neither"):
        write(rollout_episodes("Hopper-v5", "random", n_episodes=1), "rs/s-v0", ref_min_score=0.0)


# --------------------------------------------------------------------------- entry points


def test_collect_from_a_preset_records_reference_scores(store, tmp_path):
    path = collect("hopper", "cc/hopper-v0", episodes=3, seed=1, out=tmp_path)
    dataset = load_dataset(path)
    assert dataset.env_id == "Hopper-v5" and len(dataset.episodes) == 3
    assert (dataset.ref_min_score, dataset.ref_max_score) == (-20.272305, 3234.3)
    with pytest.raises(DMMError, match="--overwrite"):
        collect("Hopper-v5", "cc/hopper-v0", episodes=3, seed=1, out=tmp_path)


def test_default_dataset_is_generated_once(store, capsys):
    path = ensure_default_dataset(progress=True, steps=300)
    assert path == store / DEFAULT_DATASET_ID
    assert "generating the default dataset" in capsys.readouterr().err
    stamp = (path / "data" / "metadata.json").stat().st_mtime_ns
    assert ensure_default_dataset(progress=True) == path
    assert capsys.readouterr().err == ""  # reused, not regenerated
    assert (path / "data" / "metadata.json").stat().st_mtime_ns == stamp
    dataset = load_dataset(path)
    assert dataset.total_steps == 300 and (dataset.state_dim, dataset.act_dim) == (11, 3)


def test_broken_default_dataset_directory_is_reported(store):
    (store / DEFAULT_DATASET_ID).mkdir(parents=True)
    with pytest.raises(DMMError, match="remove that directory"):
        ensure_default_dataset(progress=False)
