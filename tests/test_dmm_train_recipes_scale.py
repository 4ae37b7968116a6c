"""The D4RL-scale recipes of every locomotion env: deterministic regeneration, batched rollouts, missing policies."""

from __future__ import annotations

import numpy as np
import pytest

import cli
from dmm_train.behavior import MlpPolicy
from dmm_train.config import PRESETS
from dmm_train.minari_reader import load_dataset
from dmm_train.recipes import POLICY_DIR, RECIPE_PRESETS, RECIPE_STEPS, RECIPES, collect_recipe
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


@pytest.mark.skipif((POLICY_DIR / "walker2d_medium.npz").is_file(), reason="walker2d policies are shipped")
def test_missing_policy_is_one_clear_line(capsys, store):
    code = cli.main(["collect", "--recipe", "walker2d-medium", "--steps", "100", "--quiet"])
    assert_one_line_error(capsys, code, "walker2d_medium.npz", "python -m dmm_train.behavior export")
    code = cli.main(["train", "--preset", "walker2d", "--steps", "1", "--out", str(store / "run")])
    assert_one_line_error(capsys, code, "walker2d_medium.npz", "python -m dmm_train.behavior export")
    assert not (store / RECIPES["walker2d-medium"].dataset_id).exists()


@pytest.mark.skipif((POLICY_DIR / "walker2d_medium.npz").is_file(), reason="walker2d policies are shipped")
def test_collect_without_recipes_skips_the_unshipped_ones():
    shipped = [name for name, recipe in RECIPES.items() if recipe.available()]
    assert "hopper-medium" in shipped and "walker2d-medium" not in shipped and "walker2d-random" in shipped
