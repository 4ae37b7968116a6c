"""The embedded offline datasets: D4RL's recipes, regenerated offline from shipped SAC policies.

D4RL's MuJoCo datasets (and Minari's copies of them) cannot be downloaded behind a
closed network, so the project regenerates datasets of the same kinds itself, as real
Minari datasets, deterministically from a seed:

- ``hopper-medium``: rollouts of a SAC policy stopped at a medium level (D4RL: about a
  third of expert), actions sampled from its squashed Gaussian as SAC samples them;
- ``hopper-medium-replay``: every transition the SAC learner saw up to the medium
  snapshot, in order (its replay buffer, the first 1000 steps random), shipped as a
  compressed log and converted here;
- ``hopper-expert``: rollouts of the final SAC policy, when it reached an expert level;
- ``hopper-medium-expert``: the medium and expert episodes together (D4RL's mixture);
- ``hopper-random``: uniform random actions (a smoke-test dataset).

Sizes are a tenth of D4RL's 1M transitions (``RECIPE_STEPS``): 100k steps take about a
minute to roll out on one CPU core, and DMM's 100k training steps see each transition
about 500 times anyway. The shipped policies and their provenance (training command,
SB3 version, evaluated returns) are in ``dmm_train/policies/README.md``.

Regeneration is deterministic for a seed on a given machine: episode i is reset with
seed ``seed + i`` and the action noise comes from ``numpy.random.default_rng(seed)``;
``python cli.py collect`` twice gives the same content hash (tests check it).
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
from dmm_train.config import CollectConfig, get_preset
from dmm_train.minari_reader import DATA_DIR, METADATA_FILE
from dmm_train.minari_writer import check_dataset_id, store_root, write_minari_dataset
from dmm_train.progress import Progress
from dmm_train.rollouts import Policy, Rollout, preset_for, rollout_episodes

POLICY_DIR = Path(__file__).resolve().parent / "policies"
RECIPE_STEPS = 100_000
RECIPE_SEED = 0
NAMESPACE = "dmm-deploy"
REPLAY_LOG = "hopper_medium_replay.npz"


@dataclass(frozen=True)
class Recipe:
    """How one embedded dataset is made."""

    name: str  # e.g. hopper-medium; the Minari id is dmm-deploy/<name>-v0
    preset: str
    kind: str  # "policy" (rollouts), "replay" (the shipped SAC replay log), "mixture" (of other recipes)
    source: tuple[str, ...]  # policy .npz files, the replay log, or the recipes mixed
    description: str

    @property
    def dataset_id(self) -> str:
        return f"{NAMESPACE}/{self.name}-v0"

    def available(self) -> bool:
        """True when every shipped file the recipe needs is present."""
        if self.kind == "mixture":
            return all(RECIPES[name].available() for name in self.source)
        if self.kind == "random":
            return True
        return all((POLICY_DIR / file).is_file() for file in self.source)


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe("hopper-medium", "hopper", "policy", ("hopper_medium.npz",),
               "rollouts of a medium-level SAC policy (stochastic actions, as SAC samples them)"),
        Recipe("hopper-medium-replay", "hopper", "replay", (REPLAY_LOG,),
               "the replay buffer of SAC training up to the medium snapshot, in order"),
        Recipe("hopper-expert", "hopper", "policy", ("hopper_expert.npz",),
               "rollouts of the final SAC policy (stochastic actions)"),
        Recipe("hopper-medium-expert", "hopper", "mixture", ("hopper-medium", "hopper-expert"),
               "the hopper-medium and hopper-expert episodes together"),
        Recipe("hopper-random", "hopper", "random", (),
               "uniform random actions (a smoke-test dataset; random Hopper episodes last ~20 steps)"),
    )
}
DEFAULT_RECIPE = "hopper-medium"
DEFAULT_DATASET_ID = RECIPES[DEFAULT_RECIPE].dataset_id  # what `train` uses when no --dataset is given


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise DMMError(f"unknown dataset recipe {name!r}; expected one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    if not recipe.available():
        missing = [f for f in recipe.source if f.endswith(".npz") and not (POLICY_DIR / f).is_file()]
        raise DMMError(f"recipe {name!r} needs {', '.join(missing) or 'files'} in dmm_train/policies, "
                       "which this checkout does not ship; expected one of the available recipes: "
                       f"{', '.join(n for n, r in RECIPES.items() if r.available())}")
    return recipe


# --------------------------------------------------------------------------- making the data


def sampling_policy(path: Path, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """The shipped SAC actor at ``path``, sampling its squashed Gaussian from a generator seeded ``seed``."""
    from dmm_train.behavior import MlpPolicy

    actor = MlpPolicy.load(path)
    rng = np.random.default_rng(seed)

    def act(observation: np.ndarray) -> np.ndarray:
        return actor.sample(observation, rng)

    act.__name__ = f"SAC actor {path.name}"
    return act


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


def make_rollouts(recipe: Recipe, *, steps: int, seed: int, progress: bool):
    env_id = get_preset(recipe.preset).env_id
    if recipe.kind == "replay":
        return replay_rollouts(POLICY_DIR / recipe.source[0])
    if recipe.kind == "mixture":
        return [rollout for name in recipe.source
                for rollout in make_rollouts(RECIPES[name], steps=steps, seed=seed, progress=progress)]
    bar = Progress(f"rolling out {recipe.name}", steps, enabled=progress)
    policy = "random" if recipe.kind == "random" else sampling_policy(POLICY_DIR / recipe.source[0], seed)
    try:
        return rollout_episodes(env_id, policy, n_steps=steps, seed=seed, on_step=bar.update)
    finally:
        bar.close()


def recipe_dataset_dir(name: str, out: str | os.PathLike | None = None) -> Path:
    """Where recipe ``name`` writes its dataset in the Minari store ``out`` (default: the local one)."""
    return store_root(out) / get_recipe(name).dataset_id


def collect_recipe(name: str, *, steps: int = RECIPE_STEPS, seed: int = RECIPE_SEED,
                   out: str | os.PathLike | None = None, overwrite: bool = False,
                   progress: bool = True) -> Path:
    """Generate the embedded dataset ``name`` as a Minari dataset; return its directory.

    ``steps`` is the rollout budget (per policy for a mixture; the replay log has its own
    size); ``out`` is the Minari store (default: the local one).
    """
    recipe = get_recipe(name)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DMMError(f"--steps {steps!r}; expected a positive integer")
    final = recipe_dataset_dir(name, out)
    if final.exists() and not overwrite:
        raise DMMError(f"dataset {recipe.dataset_id!r} already exists at {str(final)!r}; pass --overwrite to "
                       "regenerate it")
    preset = get_preset(recipe.preset)
    rollouts = make_rollouts(recipe, steps=steps, seed=seed, progress=progress)
    total = sum(len(r) for r in rollouts)
    provenance = policy_provenance(recipe)
    return write_minari_dataset(
        recipe.dataset_id, rollouts, preset.env_id,
        algorithm_name=f"SAC (stable-baselines3) {provenance}" if provenance else recipe.kind,
        ref_min_score=preset.ref_min_score, ref_max_score=preset.ref_max_score,
        description=(f"{recipe.description}: {len(rollouts)} episodes, {total} steps of {preset.env_id}, "
                     f"seed {seed}; regenerate with 'python cli.py collect --recipe {recipe.name}'"),
        data_path=out, overwrite=overwrite,
    )


def policy_provenance(recipe: Recipe) -> str:
    """A short label of the shipped policies behind a recipe (their SAC step and evaluated return)."""
    if recipe.kind == "mixture":
        return " + ".join(filter(None, (policy_provenance(RECIPES[name]) for name in recipe.source)))
    if recipe.kind != "policy":
        return "replay buffer" if recipe.kind == "replay" else ""
    with np.load(POLICY_DIR / recipe.source[0]) as data:
        metadata = json.loads(str(data["metadata"])) if "metadata" in data else {}
    if not metadata:
        return recipe.source[0]
    return f"{recipe.source[0]} ({metadata.get('steps')} steps, eval return {metadata.get('eval_return', 0):.0f})"


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


def ensure_default_dataset(progress: bool = True, steps: int | None = None) -> Path:
    """Path of the embedded default dataset (hopper-medium), generated in the local Minari store on first use.

    ``steps`` overrides the recipe's rollout budget (tests use small ones).
    """
    root = store_root()
    final = root / DEFAULT_DATASET_ID
    if final.exists():
        if not (final / DATA_DIR / METADATA_FILE).is_file():
            raise DMMError(
                f"{str(final)!r} exists but is not a Minari dataset (no {DATA_DIR}/{METADATA_FILE}); "
                "remove that directory so the default dataset can be regenerated"
            )
        return final
    budget = RECIPE_STEPS if steps is None else steps
    if progress:
        print(f"generating the default dataset {DEFAULT_DATASET_ID} ({budget} steps of the shipped medium "
              f"SAC policy, seed {RECIPE_SEED}) in {str(root)!r}; this happens once ...",
              file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        path = collect_recipe(DEFAULT_RECIPE, steps=budget, seed=RECIPE_SEED, progress=progress)
    except DMMError:
        # Another process may have generated it meanwhile; same seed, same data.
        if (final / DATA_DIR / METADATA_FILE).is_file():
            return final
        raise
    if progress:
        elapsed = time.perf_counter() - started
        print(f"wrote {DEFAULT_DATASET_ID} in {elapsed:.1f} s", file=sys.stderr, flush=True)
    return path


def run_collect(config: CollectConfig, report: Callable[[str], None] = print) -> list[Path]:
    """``cli.py collect``: write the datasets ``config`` asks for; return their directories.

    Custom rollouts when a policy, episode count or dataset id is given; else the recipes named,
    or every shipped one (the no-argument form fills in what is missing and ``report``s what it kept).
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
    names = config.recipes or tuple(name for name, recipe in RECIPES.items()
                                    if recipe.available() and recipe.kind != "random")
    if not config.recipes and not config.overwrite:  # the no-argument form fills in what is missing
        kept = [name for name in names if recipe_dataset_dir(name, config.out).exists()]
        for name in kept:
            report(f"kept the existing {RECIPES[name].dataset_id} (--overwrite regenerates it)")
        names = tuple(name for name in names if name not in kept)
    return [collect_recipe(name, steps=RECIPE_STEPS if config.steps is None else config.steps, seed=config.seed,
                           out=config.out, overwrite=config.overwrite, progress=not config.quiet) for name in names]
