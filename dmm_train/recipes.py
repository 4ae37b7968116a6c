"""The embedded offline datasets: D4RL's recipes, regenerated offline from shipped SAC policies.

D4RL's MuJoCo datasets (and Minari's copies of them) cannot be downloaded behind a
closed network, so the project regenerates datasets of the same kinds and sizes itself
(``<env>-random``, ``-medium``, ``-expert``, ``-medium-replay``, ``-medium-expert`` for hopper,
walker2d and halfcheetah), as real Minari datasets, deterministically from a seed: episode i is
reset with seed ``seed + i`` and draws its action noise from its own generator, so the data does
not depend on how many envs or processes roll it out, and a dataset id names one content forever.
The recipes, their determinism and the ids' versions: docs/design.md#embedded-datasets; the shipped
policies and their provenance: ``dmm_train/policies/README.md``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.errors import DMMError, describe_error
from contract.files import exclusive_lock, file_error
from contract.scores import normalized_score
from contract.threads import measure_machine
from dmm_train.behavior import POLICY_DIR, MlpPolicy
from dmm_train.config import CollectConfig, get_preset
from dmm_train.minari_reader import DATA_DIR, METADATA_FILE
from dmm_train.minari_writer import check_dataset_id, store_root, write_minari_dataset
from dmm_train.progress import Progress
from dmm_train.records import Episode, hash_episodes
from dmm_train.rollouts import Policy, Rollout, preset_for, rollout_batched, rollout_episodes

RECIPE_STEPS = 1_000_000  # D4RL's size for random, medium and expert (medium-expert: twice that)
RECIPE_SEED = 0
NAMESPACE = "dmm-deploy"
RECIPE_PRESETS = ("hopper", "walker2d", "halfcheetah")


# The content each recipe's id names: sha256 of the episodes (`dmm_train.records.hash_episodes`) of
# `collect --recipe NAME` at RECIPE_STEPS and RECIPE_SEED (BENCHMARKS.md, bench/results/quality; the random,
# expert and medium-expert ones hashed from one process's rollouts by `rollouts_content_hash`, which gave the
# benchmarks' medium and hopper-random hashes again).
# None: not measured yet; `collect` prints the hash it got, to be recorded here.
CONTENT_HASHES: dict[str, str | None] = {
    "hopper-random": "e9197e7eaed1000c620cc56badd5e6cb344eef631500a7f5bdc9ccc5d1e52f4d",
    "hopper-medium": "aad734bf1dadee3bd3d411acaccc8ede905abd546ba73dff8b1f59a0f5da1bf6",
    "hopper-expert": "4d75b4367d0aafdee217466c861e8336c48c894d19e271c623c55c4a9c582e15",
    "hopper-medium-replay": "66fb20dd0dc0d4f6f87b5a54ad070c3e6b93935f264164490a18838253c454a4",
    "hopper-medium-expert": "66d4b141a20267497ca26b7e4bcac1661a589968fef1ca337b0374ca77f2ee3f",
    "walker2d-random": "8f0fb35534a225236df25da9d292f1f50da8df633a0e6b0000a53e5ffc1f1e10",
    "walker2d-medium": "e565f9b3303bb9714ac468d09ff76d50b9764f752b0604eb1af73318a0ed3c23",
    "walker2d-expert": "1c95655200cba19f131e6ec6762de1fbe3992d31ff4ee115c3c3da08cd6a9ff4",
    "walker2d-medium-replay": "aa78781c1b7ef53fc4a8ab81be13c25e96ff4493cdcfbf26bd7673eaa1220bc6",
    "walker2d-medium-expert": "3b3ecf591409c91a5475f2103749345c8cab6e1fe4359ccb1b93bf98eb204382",
    "halfcheetah-random": "159b3df1d98678f48ef44e18e6a8e6f97bb4b67675afdfa7a87038bbefb0a7db",
    "halfcheetah-medium": "10d0ba4a9e0e7f2abda2d3e9bbb4150d6f6b64dc014e95f5b3fcc8595b0c61b8",
    "halfcheetah-expert": "6e965fccca88db9e658c95d7fd8b35228611ae555cc5c98b3a17fd13a56bcd31",
    "halfcheetah-medium-replay": "1a81639cc8a52cf104ae38022282563f9a28ba0a989a9c8da2099cd5283aecbb",
    "halfcheetah-medium-expert": "69e66d504a5d5af281e288bedad7744c1fa57864d6f17db37d4bc6608bc3e1ba",
}
# A recipe whose output changes gets the next version here, and its old content goes to RETIRED.
VERSIONS: dict[str, int] = {}


@dataclass(frozen=True)
class Retired:
    """A content a dataset id named before its recipe changed, and the commit of this project that made it."""

    dataset_id: str
    hash_prefix: str  # the content hash (or as much of it as the records quote)
    recipe: str
    commit: str  # the last commit whose `collect --recipe` made this content
    made: str  # what it was

    def matches(self, dataset_id: str, content_hash: str) -> bool:
        return dataset_id == self.dataset_id and content_hash.startswith(self.hash_prefix)

    def advice(self) -> str:
        return (f"regenerate it with that commit: 'git checkout {self.commit} && python cli.py collect --recipe "
                f"{self.recipe}' (into its own MINARI_DATASETS_PATH), or pass the data another way (--dataset DIR)")


RETIRED: tuple[Retired, ...] = (
    # Until 2eda373 the recipes were a tenth of D4RL's size (RECIPE_STEPS = 100_000); that commit made
    # them 1M steps under the same ids (before ids were versioned), so the old content is listed here.
    # Regenerated with 8c0f0f7 (git archive, then `cli.py collect --recipe hopper-medium`): the same hash.
    Retired("dmm-deploy/hopper-medium-v0", "a9386828075fa2304e0b5833833522220f25045664696d7fe423945044ddf1fa",
            "hopper-medium", "8c0f0f7",
            "100,000 steps (280 episodes) of the shipped medium SAC policy, seed 0 (the recipe's size from "
            "9b5e978 on)"),
)


@dataclass(frozen=True)
class Recipe:
    """How one embedded dataset is made."""

    name: str  # e.g. hopper-medium; the Minari id is dmm-deploy/<name>-v<version>
    preset: str
    kind: str  # "policy" (rollouts), "replay" (the shipped SAC replay log), "mixture" (of other recipes), "random"
    source: tuple[str, ...]  # policy .npz files, the replay log, or the recipes mixed
    description: str

    @property
    def version(self) -> int:
        return VERSIONS.get(self.name, 0)

    @property
    def content_hash(self) -> str | None:
        """The content hash the id names (None: not measured yet)."""
        return CONTENT_HASHES.get(self.name)

    @property
    def dataset_id(self) -> str:
        return f"{NAMESPACE}/{self.name}-v{self.version}"

    def missing_files(self) -> list[str]:
        """The shipped files the recipe needs that this checkout lacks (those of its parts, for a mixture)."""
        if self.kind == "mixture":
            return [file for name in self.source for file in RECIPES[name].missing_files()]
        if self.kind == "random":
            return []
        return [file for file in self.source if not (POLICY_DIR / file).is_file()]

    def available(self) -> bool:
        """True when every shipped file the recipe needs is present."""
        return not self.missing_files()


def _recipes_of(preset: str) -> tuple[Recipe, ...]:
    return (
        Recipe(f"{preset}-random", preset, "random", (),
               "uniform random actions"),
        Recipe(f"{preset}-medium", preset, "policy", (f"{preset}_medium.npz",),
               "rollouts of a medium-level SAC policy (stochastic actions, as SAC samples them)"),
        Recipe(f"{preset}-expert", preset, "policy", (f"{preset}_expert.npz",),
               "rollouts of the best SAC snapshot of the run (stochastic actions)"),
        Recipe(f"{preset}-medium-replay", preset, "replay", (f"{preset}_medium_replay.npz",),
               "the replay buffer of SAC training up to the medium snapshot, in order"),
        Recipe(f"{preset}-medium-expert", preset, "mixture", (f"{preset}-medium", f"{preset}-expert"),
               f"the {preset}-medium and {preset}-expert episodes together"),
    )


RECIPES: dict[str, Recipe] = {recipe.name: recipe for preset in RECIPE_PRESETS for recipe in _recipes_of(preset)}
DEFAULT_PRESET = "hopper"


def default_recipe(preset: str = DEFAULT_PRESET) -> str:
    """The recipe ``train --preset <preset>`` uses when no --dataset is given: ``<preset>-medium``."""
    name = f"{preset}-medium"
    if name not in RECIPES:
        raise DMMError(f"preset {preset!r} has no embedded dataset", f"one of {', '.join(RECIPE_PRESETS)}",
                       fix="pass one of those presets, or pass --dataset ID|PATH")
    return name


DEFAULT_RECIPE = default_recipe()
DEFAULT_DATASET_ID = RECIPES[DEFAULT_RECIPE].dataset_id  # what `train` uses when no --dataset is given


def recipe_of_id(dataset_id: str) -> Recipe | None:
    """The recipe whose id (any version) is ``dataset_id``, or None."""
    match = re.fullmatch(rf"{NAMESPACE}/(?P<name>.+)-v\d+", dataset_id)
    return RECIPES.get(match["name"]) if match else None


def retired_content(dataset_id: str, content_hash: str) -> Retired | None:
    """The retired content ``dataset_id`` named with ``content_hash``, or None."""
    return next((entry for entry in RETIRED if entry.matches(dataset_id, content_hash)), None)


def describe_content(dataset_id: str, content_hash: str) -> str | None:
    """Where the content ``content_hash`` of the embedded id ``dataset_id`` came from, when it is not what the id
    names now: a retired content (with the commit that made it) or an unknown one. None when the id is not an
    embedded recipe's, or names this very content."""
    recipe = recipe_of_id(dataset_id)
    if recipe is None or (recipe.dataset_id == dataset_id and recipe.content_hash == content_hash):
        return None
    now = (f"the id now names {recipe.content_hash[:12]}..." if recipe.dataset_id == dataset_id and
           recipe.content_hash else f"the recipe now makes {recipe.dataset_id}")
    retired = retired_content(dataset_id, content_hash)
    if retired is not None:
        return (f"{dataset_id} @ {content_hash[:12]}... is {retired.made}, made by commit {retired.commit} of this "
                f"project; {now}; {retired.advice()}")
    if recipe.dataset_id == dataset_id and recipe.content_hash is None:
        return None  # the recipe's hash is not recorded yet: this may well be the content the id names
    return (f"{dataset_id} @ {content_hash[:12]}... is not a content this project's recipes are known to make at "
            f"their default size and seed ({now}): it came from 'collect' with other --steps/--seed, another "
            "machine or a modified checkout; pass that data with --dataset DIR")


def rollouts_content_hash(rollouts) -> str:
    """The content hash (`dmm_train.records.hash_episodes`) the dataset of ``rollouts`` has once written and
    loaded: the loader drops the final observation and keeps float32, as here."""
    return hash_episodes([Episode(r.observations[:-1].reshape(len(r), -1), r.actions.reshape(len(r), -1),
                                  r.rewards, bool(r.terminations[-1])) for r in rollouts])


def generation_lock(dataset_id: str, out: str | os.PathLike | None = None):
    """The lock held while ``dataset_id`` is generated into the store ``out``: a second process generating it
    is refused at once with one line naming the first (it would roll out for minutes, then find the first
    one's result)."""
    root = store_root(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise file_error(error, root, "create the directory") from None
    return exclusive_lock(root / f".{dataset_id.replace('/', '--')}.lock", dataset_id, "dataset generation",
                          "wait for it to finish, then run again")


def make_policy_command(file: str) -> str:
    """The commands that make the shipped file ``file`` (dmm_train/policies/README.md has the exact ones)."""
    preset = file.split("_")[0]
    env_id = get_preset(preset).env_id
    return (f"'python -m dmm_train.behavior train --env {env_id} --out RUN' then 'python -m dmm_train.behavior "
            f"export --env {env_id} --run RUN --medium-step STEP --expert-step STEP' (dmm_train/policies/README.md)")


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise DMMError(f"unknown dataset recipe {name!r}", f"one of {', '.join(RECIPES)}",
                       fix="pass --recipe with one of those")
    recipe = RECIPES[name]
    missing = recipe.missing_files()
    if missing:
        raise DMMError(f"recipe {name!r} needs {', '.join(missing)} in dmm_train/policies, which this checkout "
                       "does not ship",
                       f"one of the available recipes: {', '.join(n for n, r in RECIPES.items() if r.available())}",
                       fix=f"make it with {make_policy_command(missing[0])}, or use an available recipe")
    return recipe


# --------------------------------------------------------------------------- making the data


def replay_rollouts(path: Path):
    """The SAC replay log at ``path`` as Rollouts, in the order the learner collected them.

    The log holds, per transition t: observations (n, S), actions (n, Adim), rewards (n,),
    terminations and truncations (n,) bool, and at each episode end the observation after
    it (final_observations, one row per episode end, in order). The last, unfinished
    episode is closed as truncated where the log stops.
    """
    try:
        with np.load(path) as log:
            observations = log["observations"].astype(np.float64)  # (n, S)
            actions = log["actions"].astype(np.float32)  # (n, Adim)
            rewards = log["rewards"].astype(np.float64)  # (n,)
            terminations = log["terminations"].astype(bool)  # (n,)
            truncations = log["truncations"].astype(bool)  # (n,)
            final_observations = log["final_observations"].astype(np.float64)  # (episodes, S)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DMMError(f"replay log {str(path)!r} is unreadable ({describe_error(error)})",
                       "the npz written by 'python -m dmm_train.behavior export'",
                       fix="rebuild it with 'python -m dmm_train.behavior export'") from None
    ends = np.flatnonzero(terminations | truncations)  # (episodes,)
    if len(ends) != len(final_observations):
        raise DMMError(f"replay log {str(path)!r} has {len(ends)} episode ends but {len(final_observations)} "
                       "final observations", "one final observation per end",
                       fix="rebuild it with 'python -m dmm_train.behavior export'")
    rollouts, start = [], 0
    for index, end in enumerate(ends):
        rollouts.append(Rollout(
            observations=np.concatenate([observations[start: end + 1], final_observations[index][None]]),
            actions=actions[start: end + 1], rewards=rewards[start: end + 1],
            terminations=terminations[start: end + 1], truncations=truncations[start: end + 1],
            seed=index,
        ))
        start = end + 1
    return rollouts


PARALLEL_FROM_STEPS = 50_000  # below this, starting worker processes costs more than it saves
MAX_WORKERS = 4


def default_workers(steps: int) -> int:
    """Rollout processes for a budget of ``steps``: one per free CPU core (`contract.threads`: the cores this
    process may use less the busy ones, at most MAX_WORKERS) from PARALLEL_FROM_STEPS steps on, else one.
    The data does not depend on it."""
    if steps < PARALLEL_FROM_STEPS:
        return 1
    return measure_machine(ceiling=MAX_WORKERS).threads


def make_rollouts(recipe: Recipe, *, steps: int, seed: int, progress: bool,
                  workers: int | None = None) -> list[Rollout]:
    env_id = get_preset(recipe.preset).env_id
    if recipe.kind == "replay":
        return replay_rollouts(POLICY_DIR / recipe.source[0])
    if recipe.kind == "mixture":
        return [rollout for name in recipe.source
                for rollout in make_rollouts(RECIPES[name], steps=steps, seed=seed, progress=progress,
                                             workers=workers)]
    if recipe.kind == "random":
        policy = "random"
    else:
        policy = MlpPolicy.load(POLICY_DIR / recipe.source[0]).sample_batch
    bar = Progress(f"rolling out {recipe.name}", steps, enabled=progress)
    try:
        return rollout_batched(env_id, policy, n_steps=steps, seed=seed, on_step=bar.update,
                               workers=default_workers(steps) if workers is None else workers)
    finally:
        bar.close()


def recipe_dataset_dir(name: str, out: str | os.PathLike | None = None) -> Path:
    """Where recipe ``name`` writes its dataset in the Minari store ``out`` (default: the local one)."""
    return store_root(out) / get_recipe(name).dataset_id


def collect_recipe(name: str, *, steps: int = RECIPE_STEPS, seed: int = RECIPE_SEED,
                   out: str | os.PathLike | None = None, overwrite: bool = False,
                   progress: bool = True, workers: int | None = None) -> Path:
    """Generate the embedded dataset ``name`` as a Minari dataset; return its directory.

    ``steps`` is the rollout budget (per policy for a mixture; the replay log has its own
    size); ``out`` is the Minari store (default: the local one); ``workers`` the rollout
    processes (default: ``default_workers(steps)``; the data is the same for any number).
    A second process generating the same dataset meanwhile is refused (`generation_lock`).
    """
    recipe = get_recipe(name)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DMMError(f"--steps {steps!r}", "a positive integer", fix="pass --steps 1 or more")
    with generation_lock(recipe.dataset_id, out):
        return _collect_recipe_locked(recipe, steps=steps, seed=seed, out=out, overwrite=overwrite,
                                      progress=progress, workers=workers)


def _collect_recipe_locked(recipe: Recipe, *, steps: int, seed: int, out, overwrite: bool, progress: bool,
                           workers: int | None) -> Path:
    final = recipe_dataset_dir(recipe.name, out)
    if final.exists() and not overwrite:
        raise DMMError(f"dataset {recipe.dataset_id!r} already exists at {str(final)!r}",
                       "a dataset id not in the store", fix="pass --overwrite to regenerate it")
    preset = get_preset(recipe.preset)
    rollouts = make_rollouts(recipe, steps=steps, seed=seed, progress=progress, workers=workers)
    total = sum(len(r) for r in rollouts)
    provenance = policy_provenance(recipe)
    path = write_minari_dataset(
        recipe.dataset_id, rollouts, preset.env_id,
        algorithm_name=f"SAC (stable-baselines3) {provenance}" if provenance else "uniform random actions",
        ref_min_score=preset.ref_min_score, ref_max_score=preset.ref_max_score,
        description=(f"{recipe.description}: {len(rollouts)} episodes, {total} steps of {preset.env_id}, "
                     f"seed {seed}; regenerate with 'python cli.py collect --recipe {recipe.name}'"),
        data_path=out, overwrite=overwrite,
    )
    if (steps, seed) == (RECIPE_STEPS, RECIPE_SEED) or recipe.kind == "replay":
        # The content the id names: say so when this one differs (a recipe changed without a new version,
        # or this machine's simulator computes other numbers), so it is not mistaken for the named one.
        content_hash = rollouts_content_hash(rollouts)
        if recipe.content_hash is None:
            print(f"{recipe.dataset_id}: content hash {content_hash} (no hash recorded for this recipe yet; "
                  "record it in dmm_train/recipes.py CONTENT_HASHES)", file=sys.stderr, flush=True)
        elif content_hash != recipe.content_hash:
            print(f"notice: {recipe.dataset_id} came out with content hash {content_hash[:12]}..., not the "
                  f"{recipe.content_hash[:12]}... the id names; checkpoints trained on it record this one; a "
                  "recipe whose output changes needs a new version in dmm_train/recipes.py VERSIONS",
                  file=sys.stderr, flush=True)
    return path


def policy_provenance(recipe: Recipe) -> str:
    """A short label of the shipped policies behind a recipe: SAC step, sampled return, normalised score."""
    if recipe.kind == "mixture":
        return " + ".join(filter(None, (policy_provenance(RECIPES[name]) for name in recipe.source)))
    if recipe.kind == "replay":
        return f"replay buffer {recipe.source[0]}"
    if recipe.kind != "policy":
        return ""
    with np.load(POLICY_DIR / recipe.source[0]) as data:
        metadata = json.loads(str(data["metadata"])) if "metadata" in data else {}
    if "sampled_return" not in metadata:
        return recipe.source[0]
    preset = get_preset(recipe.preset)
    score = normalized_score(metadata["sampled_return"], preset.ref_min_score, preset.ref_max_score)
    return (f"{recipe.source[0]} ({metadata.get('sac_steps', metadata.get('steps'))} SAC steps, sampled return "
            f"{metadata['sampled_return']:.0f}, normalised {score:.0f})")


# --------------------------------------------------------------------------- custom rollouts and the default


def collect(
    env_or_preset: str,
    dataset_id: str,
    *,
    policy: Policy | str = "random",
    episodes: int | None = 100,
    steps: int | None = None,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Roll out ``policy`` and write the Minari dataset ``dataset_id``; return its directory.

    ``env_or_preset`` is a preset name (hopper, ...) or a gymnasium id; a preset's
    D4RL reference scores go into the metadata. Give ``steps`` (with
    ``episodes=None``) for a step budget instead of an episode count. ``out`` is the
    Minari store to write into (default: the local store). The returned directory
    can be passed to ``load_dataset`` / ``--dataset``.
    """
    check_dataset_id(dataset_id)
    with generation_lock(dataset_id, out):
        return _collect_locked(env_or_preset, dataset_id, policy=policy, episodes=episodes, steps=steps, seed=seed,
                               out=out, overwrite=overwrite)


def _collect_locked(env_or_preset: str, dataset_id: str, *, policy, episodes, steps, seed, out,
                    overwrite: bool) -> Path:
    preset = preset_for(env_or_preset)
    env_id = preset.env_id if preset is not None else env_or_preset
    final = store_root(out) / dataset_id
    if final.exists() and not overwrite:
        # Checked before rolling out, so a clash costs nothing.
        raise DMMError(f"dataset {dataset_id!r} already exists at {str(final)!r}", "a dataset id not in the store",
                       fix="pass --overwrite to replace it, or choose another --dataset-id")
    rollouts = rollout_episodes(env_id, policy, n_episodes=episodes, n_steps=steps, seed=seed)
    if callable(policy):
        algorithm = f"callable policy {getattr(policy, '__name__', type(policy).__name__)}"
    else:
        algorithm = f"{Path(str(policy)).name} policy"
    total = sum(len(r) for r in rollouts)
    return write_minari_dataset(
        dataset_id,
        rollouts,
        env_id,
        algorithm_name=algorithm,
        ref_min_score=preset.ref_min_score if preset is not None else None,
        ref_max_score=preset.ref_max_score if preset is not None else None,
        description=(
            f"{len(rollouts)} episodes ({total} steps) of {env_id} under the {algorithm}, seed {seed}, "
            "written by dmm-deploy"
        ),
        data_path=out,
        overwrite=overwrite,
    )


def ensure_default_dataset(preset: str = DEFAULT_PRESET, progress: bool = True, steps: int | None = None) -> Path:
    """Path of the embedded default dataset of ``preset`` (``<preset>-medium``), generated on first use.

    It goes into the local Minari store; ``steps`` overrides the recipe's rollout budget
    (tests use small ones). A preset whose medium policy this checkout does not ship is an
    error naming the missing file and the command that makes it.
    """
    recipe = RECIPES[default_recipe(preset)]
    root = store_root()
    final = root / recipe.dataset_id
    if final.exists():
        if not (final / DATA_DIR / METADATA_FILE).is_file():
            raise DMMError(f"{str(final)!r} exists but is not a Minari dataset (no {DATA_DIR}/{METADATA_FILE})",
                           "the default dataset there, or nothing",
                           fix="remove that directory so the default dataset can be regenerated")
        return final
    missing = recipe.missing_files()
    if missing:
        raise DMMError(f"the default {preset} dataset ({recipe.dataset_id}) is made from dmm_train/policies/"
                       f"{missing[0]}, which this checkout does not ship", f"dmm_train/policies/{missing[0]}",
                       fix=f"make it with {make_policy_command(missing[0])}, or pass --dataset ID|PATH")
    budget = RECIPE_STEPS if steps is None else steps
    # Held from before the rollouts: a second process asking for the missing dataset meanwhile is refused at
    # once, naming this one, instead of rolling out for minutes and then finding this one's result.
    with generation_lock(recipe.dataset_id):
        if (final / DATA_DIR / METADATA_FILE).is_file():  # made by another process while this one started
            return final
        if progress:
            print(f"generating the default dataset {recipe.dataset_id} ({budget} steps of the shipped medium "
                  f"SAC policy, seed {RECIPE_SEED}) in {str(root)!r}; this happens once ...",
                  file=sys.stderr, flush=True)
        started = time.perf_counter()
        path = _collect_recipe_locked(recipe, steps=budget, seed=RECIPE_SEED, out=None, overwrite=False,
                                      progress=progress, workers=None)
    if progress:
        elapsed = time.perf_counter() - started
        print(f"wrote {recipe.dataset_id} in {elapsed:.1f} s", file=sys.stderr, flush=True)
    return path


def run_collect(config: CollectConfig, report: Callable[[str], None] = print) -> list[Path]:
    """``cli.py collect``: write the datasets ``config`` asks for; return their directories.

    Custom rollouts when a policy, episode count or dataset id is given; else the recipes named,
    or every one this checkout ships the files of (the no-argument form fills in what is missing and
    ``report``s what it kept and what it skipped).
    """
    config.validate()
    if config.custom:
        env_preset = get_preset(config.preset)
        policy = config.policy or "random"
        name = "random" if policy == "random" else Path(policy).stem.replace("_", "-")
        dataset_id = config.dataset_id or f"dmm-deploy/{env_preset.name}-{name}-custom-v0"
        episodes = config.DEFAULT_EPISODES if config.episodes is None else config.episodes
        return [collect(env_preset.env_id, dataset_id, policy=policy, episodes=episodes, seed=config.seed,
                        out=config.out, overwrite=config.overwrite)]
    names = config.recipes or tuple(name for name, recipe in RECIPES.items() if recipe.available())
    if not config.recipes:
        skipped = [name for name, recipe in RECIPES.items() if not recipe.available()]
        if skipped:
            files = sorted({file for name in skipped for file in RECIPES[name].missing_files()})
            report(f"skipped {', '.join(skipped)}: this checkout does not ship {', '.join(files)} "
                   "(dmm_train/policies/README.md says how they are made)")
    if not config.recipes and not config.overwrite:  # the no-argument form fills in what is missing
        kept = [name for name in names if recipe_dataset_dir(name, config.out).exists()]
        for name in kept:
            report(f"kept the existing {RECIPES[name].dataset_id} (--overwrite regenerates it)")
        names = tuple(name for name in names if name not in kept)
    return [collect_recipe(name, steps=RECIPE_STEPS if config.steps is None else config.steps, seed=config.seed,
                           out=config.out, overwrite=config.overwrite, progress=not config.quiet,
                           workers=config.workers) for name in names]
