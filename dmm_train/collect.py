"""Generate offline datasets: roll out a behaviour policy, write a Minari dataset.

Datasets are written with ``minari.create_dataset_from_buffers`` (no jax needed,
unlike ``minari.DataCollector``). A write goes to a hidden staging store beside the
final location and is renamed into place at the end, so an interrupted write never
leaves a half dataset under the final id; Minari skips hidden directories when it
lists a store.

The embedded default (``DEFAULT_DATASET_ID``) is ``hopper-medium`` of
`dmm_train.recipes`, rolled out from the shipped medium SAC policy on first use;
remote Minari datasets need a network, which a closed lab may not have.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.errors import DMMError
from dmm_train.config import PRESETS
from dmm_train.data import DATA_DIR, DATASET_ID_RE, METADATA_FILE

DEFAULT_DATASET_ID = "dmm-deploy/hopper-medium-v0"  # recipes.RECIPES["hopper-medium"].dataset_id

MINARI_STORE_ENV = "MINARI_DATASETS_PATH"
_STAGING_PREFIX = ".dmm-staging-"
_TRASH_PREFIX = ".dmm-trash-"
_NAMESPACE_METADATA_FILE = "namespace_metadata.json"
_AUTHOR = "dmm-deploy"

Policy = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, eq=False)
class Rollout:
    """One episode as collected, in Minari's layout.

    observations: (T+1, S), including the observation after the last action
    actions:      (T, Adim) float32
    rewards:      (T,) float64
    terminations, truncations: (T,) bool; at most the last entry is True
    seed:         the ``env.reset`` seed of this episode
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminations: np.ndarray
    truncations: np.ndarray
    seed: int

    def __len__(self) -> int:
        return int(self.rewards.shape[0])


# --------------------------------------------------------------------------- rollouts


def make_env(env_id: str):
    """``gym.make(env_id)`` with failures turned into DMMErrors that say what to install."""
    import gymnasium as gym

    try:
        return gym.make(env_id)
    except gym.error.DependencyNotInstalled as exc:
        raise DMMError(
            f"environment {env_id!r} needs a missing package ({exc}); install it, e.g. "
            '`pip install "gymnasium[mujoco]"`'
        ) from exc
    except gym.error.Error as exc:
        raise DMMError(
            f"unknown environment {env_id!r} ({exc}); expected a registered gymnasium id such as "
            f"{', '.join(p.env_id for p in PRESETS.values() if p.env_id.endswith('-v5'))}"
        ) from exc


def rollout_episodes(
    env_id: str,
    policy: Policy | str = "random",
    *,
    n_episodes: int | None = None,
    n_steps: int | None = None,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> list[Rollout]:
    """Roll out ``policy`` in a real gymnasium env; deterministic for a given seed.

    Exactly one of ``n_episodes`` (whole episodes) and ``n_steps`` (total steps; the
    last episode is cut and marked truncated) must be given. Episode i is reset with
    seed ``seed + i``; the "random" policy samples the action space seeded with
    ``seed``. ``policy`` may also be any callable ``obs (S,) -> action (Adim,)``.
    ``on_step(steps_done)`` is called after every env step (progress reporting).
    """
    if (n_episodes is None) == (n_steps is None):
        raise DMMError(
            f"n_episodes={n_episodes!r}, n_steps={n_steps!r}; expected exactly one of them to be given"
        )
    budget = n_episodes if n_episodes is not None else n_steps
    if not isinstance(budget, (int, np.integer)) or budget < 1:
        raise DMMError(f"episode/step count {budget!r}; expected a positive integer")

    import gymnasium as gym

    env = make_env(env_id)
    try:
        spaces = (env.observation_space, env.action_space)
        if not all(isinstance(space, gym.spaces.Box) for space in spaces):
            raise DMMError(
                f"environment {env_id!r} has {type(env.observation_space).__name__} observations and "
                f"{type(env.action_space).__name__} actions; expected Box spaces (MuJoCo locomotion)"
            )
        act = _resolve_policy(policy, env, seed)
        act_shape = env.action_space.shape
        rollouts: list[Rollout] = []
        steps_done = 0
        while True:
            if n_episodes is not None and len(rollouts) >= n_episodes:
                break
            if n_steps is not None and steps_done >= n_steps:
                break
            episode_seed = seed + len(rollouts)
            observation, _ = env.reset(seed=episode_seed)
            observations = [observation]
            actions, rewards, terminations, truncations = [], [], [], []
            while True:
                action = np.asarray(act(observation), dtype=env.action_space.dtype)
                if action.shape != act_shape:
                    raise DMMError(
                        f"policy returned an action of shape {action.shape}; "
                        f"expected {act_shape} for {env_id!r}"
                    )
                observation, reward, terminated, truncated, _ = env.step(action)
                steps_done += 1
                if on_step is not None:
                    on_step(steps_done)
                out_of_budget = n_steps is not None and steps_done >= n_steps
                observations.append(observation)
                actions.append(action)
                rewards.append(float(reward))
                terminations.append(bool(terminated))
                # Cutting an episode at the step budget is a truncation, like a time limit.
                truncations.append(bool(truncated) or (out_of_budget and not terminated))
                if terminated or truncated or out_of_budget:
                    break
            rollouts.append(Rollout(
                observations=np.asarray(observations),  # (T+1, S)
                actions=np.asarray(actions, dtype=np.float32),  # (T, Adim)
                rewards=np.asarray(rewards, dtype=np.float64),  # (T,)
                terminations=np.asarray(terminations, dtype=bool),  # (T,)
                truncations=np.asarray(truncations, dtype=bool),  # (T,)
                seed=episode_seed,
            ))
        return rollouts
    finally:
        env.close()


def _resolve_policy(policy: Policy | str, env, seed: int) -> Policy:
    if callable(policy):
        return policy
    if policy == "random":
        env.action_space.seed(seed)
        return lambda _observation: env.action_space.sample()
    if isinstance(policy, (str, os.PathLike)) and str(policy).endswith(".npz"):
        from dmm_train.behavior import MlpPolicy

        return MlpPolicy.load(policy)
    raise DMMError(
        f"policy {policy!r}; expected 'random', a path to a behaviour-policy .npz, "
        "or a callable obs -> action"
    )


# --------------------------------------------------------------------------- writing


def _check_dataset_id(dataset_id: str) -> None:
    if not isinstance(dataset_id, str) or not DATASET_ID_RE.fullmatch(dataset_id):
        raise DMMError(
            f"dataset id {dataset_id!r}; expected the Minari form namespace/name-vN "
            "(e.g. dmm-deploy/hopper-random-v0)"
        )


def store_root(data_path: str | os.PathLike | None = None) -> Path:
    """The Minari store to write into: ``data_path``, else $MINARI_DATASETS_PATH, else ~/.minari/datasets."""
    if data_path is not None:
        return Path(data_path).expanduser()
    from minari.storage import get_dataset_path

    return Path(get_dataset_path())


@contextlib.contextmanager
def _minari_store(path: Path) -> Iterator[None]:
    """Point Minari at ``path`` for the duration (Minari reads the store from the environment).

    Process-wide: not safe while another thread uses Minari.
    """
    previous = os.environ.get(MINARI_STORE_ENV)
    os.environ[MINARI_STORE_ENV] = str(path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(MINARI_STORE_ENV, None)
        else:
            os.environ[MINARI_STORE_ENV] = previous


def write_minari_dataset(
    dataset_id: str,
    rollouts: Sequence[Rollout],
    env_id: str,
    *,
    algorithm_name: str,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    description: str,
    data_path: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``rollouts`` as Minari dataset ``dataset_id``; return its directory.

    ``data_path`` is the root of the Minari store to write into (the dataset lands in
    ``<data_path>/<dataset_id>/data``); None means the default store. The reference
    scores are stored only as a pair (Minari would otherwise estimate the missing
    one with 100 random episodes). The write is atomic: staged in a hidden
    directory of the same store, then renamed. An existing dataset of the same id is
    an error unless ``overwrite``.
    """
    _check_dataset_id(dataset_id)
    if not rollouts:
        raise DMMError(f"no episodes to write for {dataset_id!r}; expected at least one")
    if (ref_min_score is None) != (ref_max_score is None):
        raise DMMError(
            f"ref_min_score={ref_min_score!r}, ref_max_score={ref_max_score!r}; expected both or neither"
        )
    root = store_root(data_path)
    final = root / dataset_id
    if final.exists() and not overwrite:
        raise DMMError(
            f"dataset {dataset_id!r} already exists at {str(final)!r}; pass overwrite=True (--overwrite) to "
            "replace it, or choose another id"
        )
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root))
    try:
        _write_into_store(staging, dataset_id, rollouts, env_id, algorithm_name=algorithm_name,
                          ref_min_score=ref_min_score, ref_max_score=ref_max_score, description=description)
        _copy_namespace_metadata(staging, root, dataset_id)
        _move_into_place(staging / dataset_id, final, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _write_into_store(store: Path, dataset_id: str, rollouts: Sequence[Rollout], env_id: str, *,
                      algorithm_name: str, ref_min_score: float | None, ref_max_score: float | None,
                      description: str) -> None:
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = [
        EpisodeBuffer(
            id=index,  # Minari requires sequential ids from 0
            seed=rollout.seed,
            observations=rollout.observations,
            actions=rollout.actions,
            rewards=rollout.rewards,
            terminations=rollout.terminations,
            truncations=rollout.truncations,
            infos={},
        )
        for index, rollout in enumerate(rollouts)
    ]
    with _minari_store(store), warnings.catch_warnings():
        # Minari nags about optional provenance fields we have no value for.
        warnings.filterwarnings("ignore", message=r"`(author_email|code_permalink)` is set to None",
                                category=UserWarning)
        minari.create_dataset_from_buffers(
            dataset_id,
            buffers,
            env=env_id,
            eval_env=env_id,
            algorithm_name=algorithm_name,
            author=_AUTHOR,
            ref_min_score=ref_min_score,
            ref_max_score=ref_max_score,
            description=description,
            data_format="hdf5",
        )


def _copy_namespace_metadata(staging: Path, root: Path, dataset_id: str) -> None:
    """Give the final store the namespace markers Minari wrote in staging, where missing."""
    parts = dataset_id.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        relative = Path(*parts[:depth])
        source = staging / relative / _NAMESPACE_METADATA_FILE
        target = root / relative / _NAMESPACE_METADATA_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_file() and not target.exists():
            shutil.copyfile(source, target)


def _move_into_place(source: Path, final: Path, *, overwrite: bool) -> None:
    """Rename ``source`` to ``final``; an existing ``final`` is swapped out first if ``overwrite``."""
    trash = None
    if final.exists():
        if not overwrite:
            raise DMMError(
                f"dataset directory {str(final)!r} appeared while writing; pass overwrite=True to replace it"
            )
        trash = final.parent / f"{_TRASH_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
    try:
        os.rename(source, final)
    except OSError as exc:
        if trash is not None:
            os.rename(trash, final)
        raise DMMError(
            f"could not move the new dataset into {str(final)!r} ({exc}); another process may have "
            "written it; retry, or pass overwrite=True"
        ) from exc
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- entry points


def _preset_for(env_or_preset: str):
    if env_or_preset in PRESETS:
        return PRESETS[env_or_preset]
    return next((p for p in PRESETS.values() if p.env_id == env_or_preset), None)


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
    _check_dataset_id(dataset_id)
    preset = _preset_for(env_or_preset)
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
    from dmm_train.recipes import DEFAULT_RECIPE, RECIPE_SEED, RECIPE_STEPS, collect_recipe

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
