"""The embedded datasets: shipped SAC policies, D4RL-style recipes, deterministic regeneration."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cli
from contract.errors import DMMError
from dmm_train import recipes
from dmm_train.behavior import MlpPolicy, evaluate_behavior
from dmm_train.minari_reader import load_dataset
from dmm_train.recipes import (
    DEFAULT_DATASET_ID,
    POLICY_DIR,
    RECIPES,
    collect_recipe,
    recipe_dataset_dir,
    replay_rollouts,
)
from dmm_train.rollouts import rollout_episodes

MEDIUM = POLICY_DIR / "hopper_medium.npz"


@pytest.fixture
def store(monkeypatch, tmp_path):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def test_the_default_dataset_is_the_medium_recipe():
    assert DEFAULT_DATASET_ID == RECIPES[recipes.DEFAULT_RECIPE].dataset_id == "dmm-deploy/hopper-medium-v0"
    assert RECIPES["hopper-medium"].available() and RECIPES["hopper-medium-replay"].available()


def test_shipped_medium_policy_is_medium_level():
    policy = MlpPolicy.load(MEDIUM)
    assert (policy.observation_dim, policy.action_dim) == (11, 3)
    metadata = policy.metadata
    # D4RL's "medium" is about a third of expert: on Hopper a return of about 1000 to 1800.
    assert 900 <= metadata["sampled_return"] <= 2000, metadata
    rng = np.random.default_rng(5)
    returns = evaluate_behavior(lambda obs: policy.sample(obs, rng), "Hopper-v5", 2, seed=123)
    assert np.mean(returns) > 500, returns  # hops, where a random policy scores about 20


def test_sampled_actions_are_seeded_and_squashed():
    import gymnasium as gym

    policy = MlpPolicy.load(MEDIUM)
    observation, _ = gym.make("Hopper-v5").reset(seed=0)  # a real start state (saturating ones give tanh = +-1)
    first = [policy.sample(observation, np.random.default_rng(0)) for _ in range(2)]
    assert np.array_equal(first[0], first[1])
    draws = np.stack([policy.sample(observation, np.random.default_rng(i)) for i in range(50)])  # (50, 3)
    assert np.all(np.abs(draws) <= 1.0) and draws.std(axis=0).min() > 0
    assert policy(observation).shape == (3,)


def test_recipe_regenerates_with_the_same_content_hash(store):
    first = load_dataset(collect_recipe("hopper-medium", steps=400, progress=False))
    second = load_dataset(collect_recipe("hopper-medium", steps=400, progress=False, overwrite=True))
    other_seed = load_dataset(collect_recipe("hopper-medium", steps=400, seed=1, progress=False, overwrite=True))
    assert first.content_hash == second.content_hash
    assert first.content_hash != other_seed.content_hash
    assert first.total_steps == 400
    assert (first.ref_min_score, first.ref_max_score) == (-20.272305, 3234.3)
    metadata = json.loads((store / first.dataset_id / "data" / "metadata.json").read_text())
    assert "SAC" in metadata["algorithm_name"] and "hopper_medium.npz" in metadata["algorithm_name"]
    assert "Hopper-v5" in metadata["env_spec"]


def test_replay_log_round_trips_real_rollouts(tmp_path):
    rollouts = rollout_episodes("Hopper-v5", "random", n_steps=150, seed=2)
    log = tmp_path / "replay.npz"
    ends_final = [r.observations[-1] for r in rollouts]
    np.savez_compressed(
        log,
        observations=np.concatenate([r.observations[:-1] for r in rollouts]).astype(np.float32),
        actions=np.concatenate([r.actions for r in rollouts]),
        rewards=np.concatenate([r.rewards for r in rollouts]).astype(np.float32),
        terminations=np.concatenate([r.terminations for r in rollouts]),
        truncations=np.concatenate([r.truncations for r in rollouts]),
        final_observations=np.stack(ends_final).astype(np.float32),
    )
    converted = replay_rollouts(log)
    assert [len(r) for r in converted] == [len(r) for r in rollouts]
    for original, back in zip(rollouts, converted, strict=True):
        assert np.allclose(back.observations, original.observations, atol=1e-6)
        assert np.array_equal(back.actions, original.actions)
        assert np.array_equal(back.terminations, original.terminations)
        assert np.array_equal(back.truncations, original.truncations)


def test_shipped_replay_log_is_the_sac_history(store):
    dataset = load_dataset(collect_recipe("hopper-medium-replay", progress=False))
    lengths = dataset.episode_lengths
    returns = np.array([e.rewards.sum() for e in dataset.episodes])
    assert dataset.total_steps >= 20_000
    # The learner starts from random actions and improves: late episodes score far above early ones.
    assert returns[-20:].mean() > 5 * returns[:20].mean(), (returns[:20].mean(), returns[-20:].mean())
    assert lengths.min() >= 1


def test_mixture_is_its_parts_in_order(store):
    if not RECIPES["hopper-medium-expert"].available():
        pytest.skip("this checkout ships no expert policy (dmm_train/policies/hopper_expert.npz)")
    mixed = load_dataset(collect_recipe("hopper-medium-expert", steps=300, progress=False))
    medium = load_dataset(collect_recipe("hopper-medium", steps=300, progress=False))
    expert = load_dataset(collect_recipe("hopper-expert", steps=300, progress=False))
    assert len(mixed.episodes) == len(medium.episodes) + len(expert.episodes)
    assert np.array_equal(mixed.episodes[0].actions, medium.episodes[0].actions)


def test_recipe_errors(store):
    with pytest.raises(DMMError, match="unknown dataset recipe 'hopper-perfect'"):
        collect_recipe("hopper-perfect")
    collect_recipe("hopper-random", steps=50, progress=False)
    with pytest.raises(DMMError, match="--overwrite"):
        collect_recipe("hopper-random", steps=50, progress=False)
    with pytest.raises(DMMError, match="--steps 0"):
        collect_recipe("hopper-random", steps=0, overwrite=True)


def test_cli_collect_recipe_prints_the_hash_and_is_repeatable(capsys, store):
    args = ["collect", "--recipe", "hopper-medium", "--steps", "300", "--quiet"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main([*args, "--overwrite"]) == 0
    second = capsys.readouterr().out
    assert "dmm-deploy/hopper-medium-v0" in first and "content hash" in first
    assert first.split("content hash")[1].split()[0] == second.split("content hash")[1].split()[0]


def test_cli_collect_refuses_recipe_with_custom_options(capsys, store):
    code = cli.main(["collect", "--recipe", "hopper-medium", "--policy", "random"])
    captured = capsys.readouterr()
    assert code != 0 and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert "--recipe hopper-medium" in captured.err


def test_cli_collect_without_recipes_fills_in_only_the_missing_ones(capsys, store):
    assert cli.main(["collect", "--recipe", "hopper-medium", "--steps", "300", "--quiet"]) == 0
    medium = recipe_dataset_dir("hopper-medium")
    written = medium.stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(["collect", "--steps", "300", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "kept the existing dmm-deploy/hopper-medium-v0" in out
    assert "wrote dmm-deploy/hopper-medium-replay-v0" in out and "wrote dmm-deploy/hopper-medium-v0" not in out
    assert medium.stat().st_mtime_ns == written
    assert recipe_dataset_dir("hopper-medium-replay").exists()


# -- a dataset id names one content forever ------------------------------------------------------------


def test_every_recipe_declares_its_version_and_content():
    for name, recipe in RECIPES.items():
        assert isinstance(recipe.version, int) and recipe.version >= 0, name
        assert recipe.dataset_id == f"dmm-deploy/{name}-v{recipe.version}"
        assert recipe.content_hash is None or (len(recipe.content_hash) == 64
                                               and set(recipe.content_hash) <= set("0123456789abcdef")), name
        assert recipes.recipe_of_id(recipe.dataset_id) is recipe
    assert all(recipe.content_hash for recipe in RECIPES.values())  # every recipe's content is recorded
    assert set(recipes.CONTENT_HASHES) <= set(RECIPES) and set(recipes.VERSIONS) <= set(RECIPES)


def test_no_retired_content_is_one_an_id_names_now():
    current = {(recipe.dataset_id, recipe.content_hash) for recipe in RECIPES.values() if recipe.content_hash}
    assert recipes.RETIRED
    for entry in recipes.RETIRED:
        assert entry.recipe in RECIPES and entry.commit and entry.made
        assert len(entry.hash_prefix) >= 12
        assert not any(entry.matches(dataset_id, content) for dataset_id, content in current), entry
    # The November default: the 100k-step hopper-medium, regenerable with the commit that made it.
    old = "a9386828075fa2304e0b5833833522220f25045664696d7fe423945044ddf1fa"
    message = recipes.describe_content("dmm-deploy/hopper-medium-v0", old)
    assert "100,000 steps" in message and "git checkout 8c0f0f7 && python cli.py collect --recipe hopper-medium" \
        in message and "the id now names aad734bf1dad" in message
    assert recipes.describe_content("dmm-deploy/hopper-medium-v0", RECIPES["hopper-medium"].content_hash) is None
    assert recipes.describe_content("someone/else-v0", old) is None  # not an embedded id: nothing to say
    unknown = recipes.describe_content("dmm-deploy/hopper-medium-v0", "f" * 64)
    assert "not a content this project's recipes are known to make" in unknown and "--dataset" in unknown
    for recipe in RECIPES.values():  # no recorded hash: nothing can be said against the content
        if recipe.content_hash is None:
            assert recipes.describe_content(recipe.dataset_id, "f" * 64) is None


@pytest.mark.parametrize("preset", recipes.RECIPE_PRESETS)
def test_replay_recipes_give_their_declared_content(preset):
    recipe = RECIPES[f"{preset}-medium-replay"]
    if not recipe.available():
        pytest.skip(f"this checkout does not ship {recipe.source[0]}")
    # The replay log is converted, not rolled out: its content is the same on any machine.
    assert recipes.rollouts_content_hash(replay_rollouts(POLICY_DIR / recipe.source[0])) == recipe.content_hash


def test_the_hash_collect_checks_is_the_one_the_dataset_loads_with(store):
    rollouts = recipes.make_rollouts(RECIPES["hopper-medium"], steps=300, seed=0, progress=False, workers=1)
    path = collect_recipe("hopper-medium", steps=300, progress=False, workers=1)
    assert recipes.rollouts_content_hash(rollouts) == load_dataset(path).content_hash


# -- one process generates a dataset at a time -------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from dmm_train.recipes import generation_lock
with generation_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def generating(store):
    """A child process holding the generation lock of the default dataset in ``store`` (as one rolling it out)."""
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, DEFAULT_DATASET_ID, str(store)], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_second_generation_of_a_dataset_is_refused_at_once(generating, store, capsys):
    for attempt in (lambda: recipes.ensure_default_dataset(progress=False, steps=200),
                    lambda: collect_recipe("hopper-medium", steps=200, progress=False)):
        with pytest.raises(DMMError) as caught:
            attempt()
        message = str(caught.value)
        assert "\n" not in message
        assert f"'{DEFAULT_DATASET_ID}' is in use by another dataset generation (process {generating.pid})" \
            in message and "wait for it to finish" in message
    assert not (store / DEFAULT_DATASET_ID).exists()  # nothing rolled out, nothing written
    code = cli.main(["collect", "--recipe", "hopper-medium", "--steps", "200", "--quiet"])
    assert code == 1 and f"process {generating.pid}" in capsys.readouterr().err


def test_generation_after_the_first_finished_uses_its_result(generating, store):
    generating.kill()
    generating.wait()
    made = recipes.ensure_default_dataset(progress=False, steps=200)
    assert recipes.ensure_default_dataset(progress=False, steps=200) == made  # found, not regenerated
    assert load_dataset(made).total_steps == 200


def test_collect_says_when_a_recipe_no_longer_makes_the_content_its_id_names(store, monkeypatch, capsys):
    # A recipe whose output changed: its budget is made tiny here, so its content is not the declared one.
    monkeypatch.setattr(recipes, "RECIPE_STEPS", 200)
    path = collect_recipe("hopper-medium", steps=200, progress=False, workers=1)
    err = capsys.readouterr().err
    content = load_dataset(path).content_hash
    assert f"notice: dmm-deploy/hopper-medium-v0 came out with content hash {content[:12]}..., not the " \
           f"{RECIPES['hopper-medium'].content_hash[:12]}... the id names" in err and "new version" in err
    collect_recipe("hopper-medium", steps=100, progress=False, workers=1, overwrite=True)
    assert "notice" not in capsys.readouterr().err  # not the recipe's budget: not the named content, no claim
