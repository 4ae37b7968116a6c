"""The D4RL-scale recipes of every locomotion env: deterministic regeneration, batched rollouts, missing policies."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cli
from contract.errors import DMMError
from dmm_train import recipes
from dmm_train.behavior import MlpPolicy
from dmm_train.config import PRESETS
from dmm_train.minari_reader import load_dataset
from dmm_train.recipes import (
    POLICY_DIR,
    RECIPE_PRESETS,
    RECIPE_STEPS,
    RECIPES,
    collect_recipe,
    ensure_default_dataset,
)
from dmm_train.rollouts import rollout_batched
from tests.helpers import assert_one_line_error

KINDS = ("random", "medium", "expert", "medium-replay", "medium-expert")


@pytest.fixture
def store(monkeypatch, tmp_path):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def test_every_env_has_the_five_d4rl_recipes_at_d4rl_size():
    assert RECIPE_STEPS == 1_000_000
    assert {f"{preset}-{kind}" for preset in RECIPE_PRESETS for kind in KINDS} == set(RECIPES)
    assert RECIPES["walker2d-medium-replay"].source == ("walker2d_medium_replay.npz",)
    assert RECIPES["halfcheetah-medium-expert"].source == ("halfcheetah-medium", "halfcheetah-expert")


def test_presets_carry_the_official_targets():
    assert PRESETS["hopper"].target_returns == (3600.0, 7200.0, 36000.0, 72000.0)
    assert PRESETS["halfcheetah"].target_returns == (12000.0, 24000.0, 120000.0, 240000.0)
    assert PRESETS["walker2d"].target_returns == (5000.0, 10000.0, 50000.0, 100000.0)


@pytest.mark.parametrize("preset", RECIPE_PRESETS)
def test_random_recipe_regenerates_with_the_same_hash(store, preset):
    first = load_dataset(collect_recipe(f"{preset}-random", steps=300, progress=False))
    second = load_dataset(collect_recipe(f"{preset}-random", steps=300, progress=False, overwrite=True))
    assert first.content_hash == second.content_hash
    assert first.total_steps == 300 and first.env_id == PRESETS[preset].env_id
    assert (first.ref_min_score, first.ref_max_score) == (PRESETS[preset].ref_min_score, PRESETS[preset].ref_max_score)
    assert first.state_dim == PRESETS[preset].state_dim and first.act_dim == PRESETS[preset].act_dim


@pytest.mark.parametrize("name", [name for name, recipe in RECIPES.items()
                                  if recipe.kind == "policy" and recipe.preset != "hopper"])
def test_shipped_policy_recipes_of_other_envs_regenerate_with_the_same_hash(store, name):
    if not RECIPES[name].available():
        pytest.skip(f"this checkout ships no {RECIPES[name].source[0]}")
    first = load_dataset(collect_recipe(name, steps=300, progress=False))
    second = load_dataset(collect_recipe(name, steps=300, progress=False, overwrite=True))
    assert first.content_hash == second.content_hash and first.total_steps == 300
    assert first.env_id == PRESETS[RECIPES[name].preset].env_id


@pytest.mark.parametrize("preset", RECIPE_PRESETS)
def test_shipped_replay_logs_are_sac_histories(store, preset):
    recipe = RECIPES[f"{preset}-medium-replay"]
    if not recipe.available():
        pytest.skip(f"this checkout ships no {recipe.source[0]}")
    dataset = load_dataset(collect_recipe(recipe.name, progress=False))
    steps = MlpPolicy.load(POLICY_DIR / f"{preset}_medium.npz").metadata["sac_steps"]
    assert dataset.total_steps == steps  # every transition up to the medium snapshot
    returns = np.array([e.rewards.sum() for e in dataset.episodes])
    # The learner starts from random actions and improves: late episodes score far above early ones.
    assert returns[-10:].mean() > returns[:10].mean() + 0.2 * PRESETS[preset].ref_max_score


def test_hopper_medium_regenerates_with_the_same_hash(store):
    first = load_dataset(collect_recipe("hopper-medium", steps=1500, progress=False))
    second = load_dataset(collect_recipe("hopper-medium", steps=1500, progress=False, overwrite=True))
    other = load_dataset(collect_recipe("hopper-medium", steps=1500, seed=1, progress=False, overwrite=True))
    assert first.content_hash == second.content_hash != other.content_hash


def test_batched_rollouts_do_not_depend_on_the_number_of_envs():
    actor = MlpPolicy.load(POLICY_DIR / "hopper_medium.npz")
    one = rollout_batched("Hopper-v5", actor.sample_batch, n_steps=700, seed=3, num_envs=1)
    many = rollout_batched("Hopper-v5", actor.sample_batch, n_steps=700, seed=3, num_envs=5)
    assert len(one) == len(many) and sum(len(r) for r in one) == 700
    for a, b in zip(one, many, strict=True):
        assert a.seed == b.seed
        for field in ("observations", "actions", "rewards", "terminations", "truncations"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert many[-1].truncations[-1] and not many[-1].terminations[-1]
    # Worker processes share the episodes out (each runs its episodes to their end) and give the same data.
    parallel = rollout_batched("Hopper-v5", actor.sample_batch, n_steps=700, seed=3, num_envs=2, workers=2)
    assert len(parallel) == len(one)
    for a, b in zip(one, parallel, strict=True):
        for field in ("observations", "actions", "rewards", "terminations", "truncations"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field


@pytest.fixture
def no_shipped_policies(monkeypatch, tmp_path):
    """A checkout that ships no behaviour policy: every recipe but the random ones lacks its files."""
    empty = tmp_path / "policies"
    empty.mkdir()
    monkeypatch.setattr(recipes, "POLICY_DIR", empty)
    return empty


def test_missing_policy_is_one_clear_line(capsys, store, no_shipped_policies):
    code = cli.main(["collect", "--recipe", "walker2d-medium", "--steps", "100", "--quiet"])
    assert_one_line_error(capsys, code, "walker2d_medium.npz", "python -m dmm_train.behavior export")
    code = cli.main(["collect", "--recipe", "halfcheetah-medium-expert", "--steps", "100", "--quiet"])
    assert_one_line_error(capsys, code, "halfcheetah_medium.npz, halfcheetah_expert.npz", "--env HalfCheetah-v5")
    code = cli.main(["train", "--preset", "walker2d", "--steps", "5", "--out", str(store / "run")])
    error = assert_one_line_error(capsys, code, "walker2d_medium.npz", "python -m dmm_train.behavior export",
                                  "--env Walker2d-v5", "--dataset")
    assert "dmm-deploy/walker2d-medium-v0" in error
    assert not (store / RECIPES["walker2d-medium"].dataset_id).exists()


def test_collect_without_recipes_skips_the_unshipped_ones(capsys, store, no_shipped_policies):
    assert cli.main(["collect", "--steps", "50", "--quiet"]) == 0
    out = capsys.readouterr().out
    skipped = next(line for line in out.splitlines() if line.startswith("skipped "))
    assert "walker2d-medium," in skipped and "hopper-medium-replay" in skipped and "hopper_medium.npz" in skipped
    written = sorted(line.split(":")[0] for line in out.splitlines() if line.startswith("wrote "))
    assert written == [f"wrote dmm-deploy/{preset}-random-v0" for preset in sorted(RECIPE_PRESETS)]


def test_train_preset_defaults_to_its_own_medium_dataset(store, capsys):
    if not RECIPES["walker2d-medium"].available():
        pytest.skip("this checkout ships no dmm_train/policies/walker2d_medium.npz")
    # Generated at a small budget first (its 1M steps take minutes); train picks it by id in this fresh store.
    path = ensure_default_dataset("walker2d", progress=False, steps=300)
    assert path == store / "dmm-deploy/walker2d-medium-v0"
    out = store.parent / "run"
    assert cli.main(["train", "--preset", "walker2d", "--steps", "5", "--out", str(out), "--eval-episodes", "0",
                     "--quiet"]) == 0
    record = json.loads((out / "model.json").read_text())
    assert record["dataset"]["id"] == "dmm-deploy/walker2d-medium-v0"
    assert len(record["state_mean"]) == 17 and record["target_returns"] == [5000.0, 10000.0, 50000.0, 100000.0]


def test_a_failing_worker_process_is_one_clear_error():
    with pytest.raises(DMMError, match="cannot create environment 'NoSuchEnv-v0'"):
        rollout_batched("NoSuchEnv-v0", "random", n_steps=10, workers=2)
    with pytest.raises(DMMError, match="workers 0; expected a positive integer"):
        rollout_batched("Hopper-v5", "random", n_steps=10, workers=0)
