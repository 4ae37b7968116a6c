"""Dataset generation speed: batched rollouts in parallel processes against one env at a time,
and a full recipe twice.

Two measurements in one run:

- side by side: the recipe's policy rolled out for ``--compare-steps`` steps one env at a time
  (``rollouts.rollout_episodes`` with the actor called on one observation per step, how the
  recipes ran before), batched in this process (``rollouts.rollout_batched``: ``--num-envs``
  envs stepped side by side, the actor run on all their observations at once) and batched in
  ``--workers`` processes (what the recipes use from 50k steps on), taking turns in
  ``--rounds`` rounds so that a change in the machine's load hits all alike; wall and CPU
  time (the processes' included) of each, median over the rounds;
- the whole recipe (``--full-steps``, default D4RL's 1M) generated ``--repeats`` times, each
  into a fresh, empty Minari store, as ``cli.py collect --recipe`` makes it: rollouts plus
  the Minari write, then loaded back for its content hash, which must be the same every time.

CPU time is reported beside wall time because on a shared machine wall time mostly
measures the other processes. The last line is ``speedup: X.Xx wall (W processes vs one env); ...``.

    python bench/collect_speed.py [--recipe hopper-medium] [--compare-steps 50000] [--rounds 3]
                                  [--workers W] [--full-steps 1000000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from contract.errors import DMMError
from dmm_train import recipes
from dmm_train.behavior import MlpPolicy
from dmm_train.config import get_preset
from dmm_train.minari_reader import load_dataset
from dmm_train.rollouts import DEFAULT_NUM_ENVS, rollout_batched, rollout_episodes


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (the rollout workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(work, *args, **kwargs) -> tuple[float, float]:
    """(wall s, CPU s) of ``work(*args, **kwargs)``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    work(*args, **kwargs)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def compare(recipe, steps: int, rounds: int, num_envs: int, workers: int) -> tuple[dict, dict]:
    """Median (wall, CPU) seconds of the one-env, the batched and the parallel rollout of ``steps`` steps."""
    env_id = get_preset(recipe.preset).env_id
    if recipe.kind == "random":
        one_at_a_time, batched = "random", "random"
    else:
        actor = MlpPolicy.load(recipes.POLICY_DIR / recipe.source[0])
        rng = np.random.default_rng(0)
        one_at_a_time, batched = (lambda observation: actor.sample(observation, rng)), actor.sample_batch
    processes = f"{workers} processes"
    times = {"one env": [], "batched": [], processes: []}
    for round_index in range(rounds):
        times["one env"].append(timed(rollout_episodes, env_id, one_at_a_time, n_steps=steps, seed=round_index))
        times["batched"].append(timed(rollout_batched, env_id, batched, n_steps=steps, seed=round_index,
                                      num_envs=num_envs))
        times[processes].append(timed(rollout_batched, env_id, batched, n_steps=steps, seed=round_index,
                                      num_envs=num_envs, workers=workers))
    return ({name: statistics.median(t[0] for t in runs) for name, runs in times.items()},
            {name: statistics.median(t[1] for t in runs) for name, runs in times.items()})


def generate_fresh(name: str, steps: int) -> tuple[float, float, float, str, int]:
    """Generate recipe ``name`` into a fresh store: (wall s, CPU s, load s, content hash, episodes)."""
    store = Path(tempfile.mkdtemp(prefix="dmm-collect-bench-"))
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(store)
    try:
        paths = []
        wall, cpu = timed(lambda: paths.append(recipes.collect_recipe(name, steps=steps, progress=False)))  # noqa: B023
        load_started = time.perf_counter()
        dataset = load_dataset(paths[0])
        return wall, cpu, time.perf_counter() - load_started, dataset.content_hash, len(dataset.episodes)
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
        shutil.rmtree(store, ignore_errors=True)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="hopper-medium")
    parser.add_argument("--compare-steps", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-envs", type=int, default=DEFAULT_NUM_ENVS)
    parser.add_argument("--workers", type=int, default=recipes.default_workers(recipes.RECIPE_STEPS))
    parser.add_argument("--full-steps", type=int, default=recipes.RECIPE_STEPS)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    for option in ("compare_steps", "rounds", "num_envs", "workers", "full_steps", "repeats"):
        if getattr(args, option) < 1:
            raise DMMError(f"--{option.replace('_', '-')} {getattr(args, option)}", "a positive integer",
                           f"pass --{option.replace('_', '-')} 1 or more")
    recipe = recipes.get_recipe(args.recipe)
    if recipe.kind not in ("policy", "random"):
        raise DMMError(f"--recipe {args.recipe!r}: a {recipe.kind} recipe",
                       "one that rolls a policy out (random, medium or expert)",
                       "pass --recipe random, medium or expert")

    walls, cpus = compare(recipe, args.compare_steps, args.rounds, args.num_envs, args.workers)
    for name in walls:
        print(f"{name:12s}: {args.compare_steps} steps in {walls[name]:.2f} s wall, {cpus[name]:.2f} s CPU "
              f"({args.compare_steps / cpus[name]:.0f} steps per CPU second), median of {args.rounds}")
    speedup = walls["one env"] / walls[f"{args.workers} processes"]
    batching = cpus["one env"] / cpus["batched"]

    hashes = []
    for repeat in range(args.repeats):
        wall, cpu, load, content_hash, episodes = generate_fresh(args.recipe, args.full_steps)
        hashes.append(content_hash)
        print(f"{args.recipe} ({args.full_steps} steps, {episodes} episodes) in a fresh store, run {repeat + 1}: "
              f"generated in {wall:.1f} s wall / {cpu:.1f} s CPU, loaded in {load:.1f} s, "
              f"content hash {content_hash}", flush=True)
    same = "yes" if len(set(hashes)) == 1 else "NO"
    line = (f"speedup: {speedup:.1f}x wall ({args.workers} processes vs one env; batching alone {batching:.2f}x CPU); "
            f"{args.recipe} {args.full_steps} steps: {wall:.0f} s wall, {cpu:.0f} s CPU; hash {hashes[0][:16]} "
            f"(same in {args.repeats} runs: {same})")
    print(line)
    return line


if __name__ == "__main__":
    try:
        main()
    except DMMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
