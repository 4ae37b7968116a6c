"""The embedded offline datasets: D4RL's recipes, regenerated offline from shipped SAC policies.

D4RL's MuJoCo datasets (and Minari's copies of them) cannot be downloaded behind a
closed network, so the project regenerates datasets of the same kinds and sizes itself,
as real Minari datasets, deterministically from a seed. For each of hopper, walker2d and
halfcheetah (``<env>`` below):

- ``<env>-random``: uniform random actions, 1M steps;
- ``<env>-medium``: 1M steps of a SAC policy stopped at a medium level (D4RL: about a
  third of expert), actions sampled from its squashed Gaussian as SAC samples them;
- ``<env>-expert``: 1M steps of the best SAC snapshot of the run (its level is in
  ``dmm_train/policies/README.md`` and in the dataset's algorithm name);
- ``<env>-medium-replay``: every transition the SAC learner saw up to the medium
  snapshot, in order (its replay buffer, the first 1000 steps random), shipped as a
  compressed log and converted here (its own size);
- ``<env>-medium-expert``: the medium and expert episodes together, 2M steps.

The shipped policies and their provenance (training command, SB3 version, evaluated
returns) are in ``dmm_train/policies/README.md``; a recipe whose files this checkout does
not ship says which file is missing and the command that makes it.

Regeneration is deterministic for a seed on a given machine: episode i is reset with
seed ``seed + i`` and draws its action noise from its own generator
(``rollouts.episode_generator``), so the data does not depend on how many envs are
stepped side by side or how many processes roll them out (``default_workers``);
``python cli.py collect`` twice gives the same content hash.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.errors import DMMError, describe_error
from contract.scores import normalized_score
from dmm_train.config import CollectConfig, get_preset
from dmm_train.minari_reader import DATA_DIR, METADATA_FILE
from dmm_train.minari_writer import check_dataset_id, store_root, write_minari_dataset
from dmm_train.progress import Progress
from dmm_train.rollouts import Policy, Rollout, preset_for, rollout_batched, rollout_episodes

POLICY_DIR = Path(__file__).resolve().parent / "policies"
RECIPE_STEPS = 1_000_000  # D4RL's size for random, medium and expert (medium-expert: twice that)
RECIPE_SEED = 0
NAMESPACE = "dmm-deploy"
RECIPE_PRESETS = ("hopper", "walker2d", "halfcheetah")


@dataclass(frozen=True)
class Recipe:
    """How one embedded dataset is made."""

    name: str  # e.g. hopper-medium; the Minari id is dmm-deploy/<name>-v0
    preset: str
    kind: str  # "policy" (rollouts), "replay" (the shipped SAC replay log), "mixture" (of other recipes), "random"
    source: tuple[str, ...]  # policy .npz files, the replay log, or the recipes mixed
    description: str

    @property
    def dataset_id(self) -> str:
        return f"{NAMESPACE}/{self.name}-v0"

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
        raise DMMError(f"preset {preset!r} has no embedded dataset; expected one of {', '.join(RECIPE_PRESETS)}, "
                       "or pass --dataset ID|PATH")
    return name


DEFAULT_RECIPE = default_recipe()
DEFAULT_DATASET_ID = RECIPES[DEFAULT_RECIPE].dataset_id  # what `train` uses when no --dataset is given


def make_policy_command(file: str) -> str:
    """The commands that make the shipped file ``file`` (dmm_train/policies/README.md has the exact ones)."""
    preset = file.split("_")[0]
    env_id = get_preset(preset).env_id
    return (f"'python -m dmm_train.behavior train --env {env_id} --out RUN' then 'python -m dmm_train.behavior "
            f"export --env {env_id} --run RUN --medium-step STEP --expert-step STEP' (dmm_train/policies/README.md)")


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise DMMError(f"unknown dataset recipe {name!r}; expected one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    missing = recipe.missing_files()
    if missing:
        raise DMMError(f"recipe {name!r} needs {', '.join(missing)} in dmm_train/policies, which this checkout "
                       f"does not ship; make it with {make_policy_command(missing[0])}, or use one of the "
                       f"available recipes: {', '.join(n for n, r in RECIPES.items() if r.available())}")
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
        raise DMMError(f"replay log {str(path)!r} is unreadable ({describe_error(error)}); expected the npz written by "
                       "'python -m dmm_train.behavior export'") from None
    ends = np.flatnonzero(terminations | truncations)  # (episodes,)
    if len(ends) != len(final_observations):
        raise DMMError(f"replay log {str(path)!r} has {len(ends)} episode ends but {len(final_observations)} "
                       "final observations; expected one per end")
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
    """Rollout processes for a budget of ``steps``: one per CPU core this process may use (at most
    MAX_WORKERS) from PARALLEL_FROM_STEPS steps on, else one. The data does not depend on it."""
    if steps < PARALLEL_FROM_STEPS:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


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
        from dmm_train.behavior import MlpPolicy

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
    """
    recipe = get_recipe(name)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DMMError(f"--steps {steps!r}; expected a positive integer")
    final = recipe_dataset_dir(name, out)
    if final.exists() and not overwrite:
        raise DMMError(f"dataset {recipe.dataset_id!r} already exists at {str(final)!r}; pass --overwrite to "
                       "regenerate it")
    preset = get_preset(recipe.preset)
    rollouts = make_rollouts(recipe, steps=steps, seed=seed, progress=progress, workers=workers)
    total = sum(len(r) for r in rollouts)
    provenance = policy_provenance(recipe)
    return write_minari_dataset(
        recipe.dataset_id, rollouts, preset.env_id,
        algorithm_name=f"SAC (stable-baselines3) {provenance}" if provenance else "uniform random actions",
        ref_min_score=preset.ref_min_score, ref_max_score=preset.ref_max_score,
        description=(f"{recipe.description}: {len(rollouts)} episodes, {total} steps of {preset.env_id}, "
                     f"seed {seed}; regenerate with 'python cli.py collect --recipe {recipe.name}'"),
        data_path=out, overwrite=overwrite,
    )


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
    preset = preset_for(env_or_preset)
    env_id = preset.env_id if preset is not None else env_or_preset
    final = store_root(out) / dataset_id
    if final.exists() and not overwrite:
        # Checked before rolling out, so a clash costs nothing.
        raise DMMError(
            f"dataset {dataset_id!r} already exists at {str(final)!r}; pass --overwrite to replace it, "
            "or choose another --dataset-id"
        )
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
            raise DMMError(
                f"{str(final)!r} exists but is not a Minari dataset (no {DATA_DIR}/{METADATA_FILE}); "
                "remove that directory so the default dataset can be regenerated"
            )
        return final
    missing = recipe.missing_files()
    if missing:
        raise DMMError(f"the default {preset} dataset ({recipe.dataset_id}) is made from dmm_train/policies/"
                       f"{missing[0]}, which this checkout does not ship; make it with "
                       f"{make_policy_command(missing[0])}, or pass --dataset ID|PATH")
    budget = RECIPE_STEPS if steps is None else steps
    if progress:
        print(f"generating the default dataset {recipe.dataset_id} ({budget} steps of the shipped medium "
              f"SAC policy, seed {RECIPE_SEED}) in {str(root)!r}; this happens once ...",
              file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        path = collect_recipe(recipe.name, steps=budget, seed=RECIPE_SEED, progress=progress)
    except DMMError:
        # Another process may have generated it meanwhile; same seed, same data.
        if (final / DATA_DIR / METADATA_FILE).is_file():
            return final
        raise
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
