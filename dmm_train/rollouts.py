"""Rollouts: a behaviour policy driving a gymnasium env, recorded as episode buffers.

A policy is a callable ``observation -> action`` (a shipped SAC actor, or "random"). Episode
i is reset with seed ``seed + i``, so a rollout is deterministic for a seed on a given machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import queue
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from contract.errors import DMMError, error_parts
from contract.signals import signal_handled
from dmm_train.behavior import MlpPolicy
from dmm_train.config import PRESETS
from runtime.plant import make_plant

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
        raise DMMError(f"n_episodes={n_episodes!r}, n_steps={n_steps!r}", "exactly one of them to be given",
                       fix="pass either n_episodes or n_steps")
    budget = n_episodes if n_episodes is not None else n_steps
    if not isinstance(budget, (int, np.integer)) or budget < 1:
        raise DMMError(f"episode/step count {budget!r}", "a positive integer", fix="pass 1 or more")

    import gymnasium as gym

    env = make_plant(env_id)
    try:
        spaces = (env.observation_space, env.action_space)
        if not all(isinstance(space, gym.spaces.Box) for space in spaces):
            raise DMMError(
                f"environment {env_id!r} has {type(env.observation_space).__name__} observations and "
                f"{type(env.action_space).__name__} actions", "Box spaces (MuJoCo locomotion)",
                fix="roll out an env with Box observation and action spaces"
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
                    raise DMMError(f"policy returned an action of shape {action.shape}",
                                   f"{act_shape} for {env_id!r}",
                                   fix=f"use a policy for {env_id!r} (its action space)")
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
        return MlpPolicy.load(policy)
    raise DMMError(f"policy {policy!r}", "'random', a path to a behaviour-policy .npz, or a callable obs -> action",
                   fix="pass --policy random or the path of a .npz policy")


def preset_for(env_or_preset: str):
    if env_or_preset in PRESETS:
        return PRESETS[env_or_preset]
    return next((p for p in PRESETS.values() if p.env_id == env_or_preset), None)


# --------------------------------------------------------------------------- batched rollouts

# A batch policy maps the observations of the running episodes (n, S) and each episode's own
# noise generator to their actions (n, Adim).
BatchPolicy = Callable[[np.ndarray, list], np.ndarray]

DEFAULT_NUM_ENVS = 16  # envs stepped side by side; the data does not depend on it


def episode_generator(seed: int, episode: int) -> np.random.Generator:
    """The action-noise generator of episode ``episode`` of a rollout seeded ``seed``."""
    return np.random.default_rng((seed, episode))


def uniform_random_policy(action_space) -> BatchPolicy:
    """Uniform random actions in the action space's bounds, drawn from each episode's generator."""
    low = np.asarray(action_space.low, dtype=np.float64)
    high = np.asarray(action_space.high, dtype=np.float64)

    def act(_observations: np.ndarray, generators: list) -> np.ndarray:
        return np.stack([g.uniform(low, high) for g in generators]).astype(np.float32)  # (n, Adim)

    return act


class _Episode:
    """The growing record of one running episode."""

    def __init__(self, index: int, reset_seed: int, generator: np.random.Generator, observation: np.ndarray,
                 capacity: int, act_dim: int):
        self.index, self.reset_seed, self.generator, self.length = index, reset_seed, generator, 0
        self.observations = np.empty((capacity + 1, observation.shape[0]))  # (T+1, S)
        self.observations[0] = observation
        self.actions = np.empty((capacity, act_dim), dtype=np.float32)  # (T, Adim)
        self.rewards = np.empty(capacity)  # (T,)
        self.terminated = self.truncated = False

    def record(self, action: np.ndarray, observation: np.ndarray, reward: float) -> None:
        if self.length == len(self.rewards):  # an env without a time limit: grow
            self.observations = np.concatenate([self.observations, np.empty_like(self.observations[1:])])
            self.actions = np.concatenate([self.actions, np.empty_like(self.actions)])
            self.rewards = np.concatenate([self.rewards, np.empty_like(self.rewards)])
        self.actions[self.length] = action
        self.rewards[self.length] = reward
        self.length += 1
        self.observations[self.length] = observation

    def rollout(self) -> Rollout:
        terminations = np.zeros(self.length, dtype=bool)
        truncations = np.zeros(self.length, dtype=bool)
        terminations[-1] = self.terminated
        truncations[-1] = not self.terminated  # a time limit, or the step budget (like a time limit)
        return Rollout(
            observations=self.observations[: self.length + 1].copy(),  # (T+1, S)
            actions=self.actions[: self.length].copy(),  # (T, Adim)
            rewards=self.rewards[: self.length].copy(),  # (T,)
            terminations=terminations, truncations=truncations, seed=self.reset_seed,
        )


def cut_rollout(rollout: Rollout, steps: int) -> Rollout:
    """The first ``steps`` steps of ``rollout``; ending it earlier than it ended is a truncation."""
    if steps >= len(rollout):
        return rollout
    truncations = np.zeros(steps, dtype=bool)
    truncations[-1] = True
    return Rollout(observations=rollout.observations[: steps + 1], actions=rollout.actions[:steps],
                   rewards=rollout.rewards[:steps], terminations=np.zeros(steps, dtype=bool),
                   truncations=truncations, seed=rollout.seed)


_MUJOCO_WARNINGS_SEEN: set[str] = set()


@contextlib.contextmanager
def mujoco_warnings_once():
    """Print each distinct MuJoCo warning once per process: every env of a batch compiles the same
    model and would repeat its compiler warnings (HalfCheetah's XML uses a deprecated attribute)."""
    try:
        import mujoco
    except ImportError:
        yield
        return
    previous = mujoco.get_mju_user_warning()

    def once(message: str) -> None:
        if message not in _MUJOCO_WARNINGS_SEEN:
            _MUJOCO_WARNINGS_SEEN.add(message)
            print(f"MuJoCo warning: {message}", file=sys.stderr, flush=True)

    mujoco.set_mju_user_warning(once)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


class _LocalSchedule:
    """One process: episodes start in order while the episodes before them may leave room in the
    budget, and an episode stops as soon as none of its later steps could be kept."""

    def __init__(self, n_steps: int):
        self.n_steps = n_steps
        self.lengths: list[int] = []  # of every episode started, growing while it runs
        self.settled, self.settled_steps = 0, 0  # the leading finished episodes, and their total length
        self.finished: set[int] = set()

    def _steps_before_each(self) -> np.ndarray:
        # Lower bounds of the steps taken by the episodes before each started one and after the
        # last (exact once those episodes finish): (started - settled + 1,)
        tail = np.asarray(self.lengths[self.settled:], dtype=np.int64)
        return self.settled_steps + np.concatenate([[0], np.cumsum(tail)])

    def next_episode(self) -> int | None:
        if self._steps_before_each()[-1] >= self.n_steps:
            return None
        self.lengths.append(0)
        return len(self.lengths) - 1

    def stepped(self, episodes: list[_Episode]) -> list[bool]:
        """Record the new lengths of ``episodes``; which of them are done."""
        for episode in episodes:
            self.lengths[episode.index] = episode.length
        before = self._steps_before_each()
        done = [episode.terminated or episode.truncated
                or before[episode.index - self.settled] + episode.length >= self.n_steps for episode in episodes]
        self.finished.update(e.index for e, d in zip(episodes, done, strict=True) if d)
        while self.settled in self.finished:
            self.settled_steps += self.lengths[self.settled]
            self.settled += 1
        return done


class _SharedSchedule:
    """Several processes: the next episode index and the steps of every started episode are shared,
    so the episodes started are always 0..m-1; an episode starts while those steps are below the
    budget and runs to its own end (what a cut drops is at most one episode per env slot)."""

    def __init__(self, n_steps: int, next_index, steps_started):
        self.n_steps, self.next_index, self.steps_started = n_steps, next_index, steps_started

    def next_episode(self) -> int | None:
        with self.next_index.get_lock():
            if self.steps_started.value >= self.n_steps:
                return None
            self.next_index.value += 1
            return self.next_index.value - 1

    def stepped(self, episodes: list[_Episode]) -> list[bool]:
        with self.steps_started.get_lock():
            self.steps_started.value += len(episodes)
        return [episode.terminated or episode.truncated for episode in episodes]


def _run_episodes(env_id: str, envs: list, policy: BatchPolicy, seed: int, schedule,
                  on_batch: Callable[[int], None] | None = None) -> dict[int, Rollout]:
    """Step ``envs`` side by side through the episodes ``schedule`` hands out; index -> whole Rollout."""
    action_space = envs[0].action_space
    spec = envs[0].spec
    capacity = spec.max_episode_steps if spec is not None and spec.max_episode_steps else 1000
    act_dim = action_space.shape[0]
    finished: dict[int, Rollout] = {}
    running: dict[int, _Episode] = {}  # env slot -> its episode
    while True:
        for slot in range(len(envs)):
            if slot not in running and (index := schedule.next_episode()) is not None:
                observation, _ = envs[slot].reset(seed=seed + index)
                running[slot] = _Episode(index, seed + index, episode_generator(seed, index), observation,
                                         capacity, act_dim)
        if not running:
            return finished
        slots = sorted(running)
        episodes = [running[slot] for slot in slots]
        observations = np.stack([e.observations[e.length] for e in episodes])  # (n, S)
        actions = np.asarray(policy(observations, [e.generator for e in episodes]), dtype=action_space.dtype)
        if actions.shape != (len(slots), act_dim):
            raise DMMError(f"policy returned actions of shape {actions.shape}",
                           f"{(len(slots), act_dim)} for {len(slots)} episodes of {env_id!r}",
                           fix=f"use a batch policy for {env_id!r} that returns one action row per observation")
        for slot, episode, action in zip(slots, episodes, actions, strict=True):
            observation, reward, terminated, truncated, _ = envs[slot].step(action)
            episode.record(action, observation, float(reward))
            episode.terminated, episode.truncated = bool(terminated), bool(truncated)
        for slot, episode, done in zip(slots, episodes, schedule.stepped(episodes), strict=True):
            if done:
                finished[episode.index] = running.pop(slot).rollout()
        if on_batch is not None:
            on_batch(len(slots))


def _make_envs(env_id: str, num_envs: int) -> list:
    import gymnasium as gym

    with mujoco_warnings_once():
        envs = [make_plant(env_id)]
        spaces = (envs[0].observation_space, envs[0].action_space)
        if not all(isinstance(space, gym.spaces.Box) for space in spaces):
            envs[0].close()
            raise DMMError(f"environment {env_id!r} has {type(spaces[0]).__name__} observations and "
                           f"{type(spaces[1]).__name__} actions", "Box spaces (MuJoCo locomotion)",
                           fix="roll out an env with Box observation and action spaces")
        envs += [make_plant(env_id) for _ in range(num_envs - 1)]
    return envs


def _resolve_batch_policy(policy: BatchPolicy | str, action_space) -> BatchPolicy:
    if isinstance(policy, str) and policy == "random":
        return uniform_random_policy(action_space)
    if not callable(policy):
        raise DMMError(f"policy {policy!r}", "'random' or a batch policy (observations, generators) -> actions",
                       fix="pass 'random' or a callable batch policy (e.g. MlpPolicy.sample_batch)")
    return policy


def _worker(env_id: str, policy, n_steps: int, seed: int, num_envs: int, next_index, steps_started,
            results) -> None:
    """One rollout process: its share of the episodes, sent back as (index -> Rollout) or an error's parts."""
    # Ctrl-C reaches the whole process group: the parent alone handles it (and stops this
    # process), so no worker prints a KeyboardInterrupt traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        envs = _make_envs(env_id, num_envs)
        try:
            schedule = _SharedSchedule(n_steps, next_index, steps_started)
            results.put(("rollouts", _run_episodes(env_id, envs, _resolve_batch_policy(policy, envs[0].action_space),
                                                   seed, schedule)))
        finally:
            for env in envs:
                env.close()
    except Exception as error:  # reported by the parent as one DMMError
        results.put(("error", _error_parts(error)))


def _error_parts(error: BaseException) -> tuple[str, str, str]:
    """(received, expected, fix) of a worker's error (a library's error becomes the received part of one)."""
    if isinstance(error, DMMError):
        return error.received, error.expected, error.fix
    received, expected, fix = error_parts(error, "every rollout process to finish its episodes",
                                          "retry with --workers 1 to see the full traceback")
    return f"a rollout process failed: {received}", expected, fix


def _die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux): a parent killed outright
    (SIGKILL, out of memory) runs no cleanup, and its workers would roll on as orphans."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _sigint_ignored():
    """Ignore SIGINT while workers start: a spawned interpreter inherits the ignored signal from
    its first instruction, so a Ctrl-C during its start-up prints no traceback either."""
    return signal_handled(signal.SIGINT, signal.SIG_IGN)


def _rollout_in_processes(env_id: str, policy, n_steps: int, seed: int, num_envs: int, workers: int,
                          on_step: Callable[[int], None] | None) -> dict[int, Rollout]:
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited torch or BLAS threads
    next_index, steps_started = context.Value("q", 0), context.Value("q", 0)
    results = context.Queue()
    processes = [context.Process(target=_worker, args=(env_id, policy, n_steps, seed, num_envs, next_index,
                                                       steps_started, results), daemon=True)
                 for _ in range(workers)]
    with _sigint_ignored():
        for process in processes:
            process.start()
    finished: dict[int, Rollout] = {}
    errors: list[tuple[str, str, str]] = []
    try:
        for _ in processes:
            while True:
                try:
                    kind, payload = results.get(timeout=0.5)
                    break
                except queue.Empty:
                    if on_step is not None:
                        on_step(min(steps_started.value, n_steps))
                    if not any(p.is_alive() for p in processes) and results.empty():
                        raise DMMError("a rollout process died without a result (out of memory?)",
                                       "every process to report", fix="retry with --workers 1") from None
            if kind == "error":
                errors.append(payload)
            else:
                finished.update(payload)
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM turned into KeyboardInterrupt by the caller) or failed: stop
        # every worker now rather than wait for them to finish their share.
        for process in processes:
            if process.is_alive():
                process.terminate()
        raise
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
    if errors:
        received, expected, fix = errors[0]
        raise DMMError(received, expected, fix)
    if on_step is not None:
        on_step(n_steps)
    return finished


def rollout_batched(
    env_id: str,
    policy: BatchPolicy | str,
    *,
    n_steps: int,
    seed: int = 0,
    num_envs: int = DEFAULT_NUM_ENVS,
    workers: int = 1,
    on_step: Callable[[int], None] | None = None,
) -> list[Rollout]:
    """``n_steps`` steps of ``policy`` in ``num_envs`` real envs stepped side by side, in ``workers`` processes.

    The result is the same as rolling the episodes out one after another, whatever
    ``num_envs`` and ``workers``: episode i is reset with seed ``seed + i`` and draws its
    action noise from its own generator (``episode_generator(seed, i)``), and the episodes
    are returned in order, the last one cut at the budget and marked truncated. ``policy``
    is "random" or a batch policy ``(observations (n, S), generators) -> actions (n, Adim)``
    that treats each row on its own (as ``MlpPolicy.sample_batch`` does); with several
    workers it must be picklable. ``on_step(steps_done)`` reports progress.
    """
    for name, value in (("n_steps", n_steps), ("num_envs", num_envs), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DMMError(f"{name} {value!r}", "a positive integer", fix=f"pass {name} 1 or more")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DMMError(f"seed {seed!r}", "a non-negative integer (episode i is reset with seed + i)",
                       fix="pass --seed 0 or more")
    if workers > 1:
        finished = _rollout_in_processes(env_id, policy, n_steps, seed, num_envs, workers, on_step)
    else:
        envs = _make_envs(env_id, num_envs)
        try:
            steps_done = [0]

            def on_batch(count: int) -> None:
                steps_done[0] += count
                if on_step is not None:
                    on_step(min(steps_done[0], n_steps))

            finished = _run_episodes(env_id, envs, _resolve_batch_policy(policy, envs[0].action_space), seed,
                                     _LocalSchedule(n_steps), on_batch)
        finally:
            for env in envs:
                env.close()
    rollouts, kept = [], 0
    for index in range(len(finished)):
        if kept >= n_steps:
            break
        rollouts.append(cut_rollout(finished.pop(index), n_steps - kept))
        kept += len(rollouts[-1])
    return rollouts
