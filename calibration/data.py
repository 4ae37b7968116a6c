"""Real model inputs from the training dataset: calibration samples and held-out samples.

Glossary: B batch (1 here: precision graphs are for the control loop), K window length,
S state dim, Adim action dim, nl n_layer, W DSM window, D d_model, N d_state, T steps
of one episode.

Where the inputs come from (docs/design.md#calibration):
- the dataset the checkpoint was trained on, found by the id the checkpoint records and
  identified by its content hash, which must equal the checkpoint's: calibrating on other
  data under the training data's name would silently tune the scales to inputs the policy
  never sees; or a recording given explicitly (``--dataset``), used as given;
- where the training dataset is not here, or the id now names other content
  (`calibration_data`): closed-loop episodes of the fp32 graph driving its env, the inputs
  the deployed policy itself meets, with a one-line notice saying so, and the manifest
  recording what was used; a checkpoint never needs its training dataset to be exported;
- its episodes split once, by a seeded shuffle, into calibration and held-out episodes,
  so that the accuracy report never scores a graph on the windows it was calibrated on;
- window mode: windows built exactly as the official evaluation builds them
  (`export.reference.window_at`: the last min(t+1, K) steps, zero left-padded, a zero
  placeholder for a_t), with the return-to-go conditioned on the manifest's default
  target (rtg_t = (target - rewards so far) / scale), as it is at run time; the
  training sampler's padding (-10 actions, -mean/std states) never reaches a deployed
  graph, so it is not used here;
- stream mode: every step of an episode as the runtime feeds it, with the caches that
  the fp32 graph itself produced rolling through the episode from zero caches: real
  caches, not zeros or noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from contract.errors import DMMError, check_dims
from dmm_train.minari_reader import load_dataset
from dmm_train.recipes import describe_content
from dmm_train.records import Episode, hash_episodes
from runtime.feeds import InputTrajectory, stream_feeds, window_at
from runtime.ort_backend import OrtBackend, cpu_session
from runtime.plant import check_plant, make_plant
from runtime.policy import Policy

DEFAULT_HELDOUT_FRACTION = 0.2  # of the episodes; at least one episode either side
# Stream samples come from whole rolled episodes; roll this many times the requested
# count before subsampling, so that the samples spread over many episodes and phases.
STREAM_OVERSAMPLING = 4


@dataclass(frozen=True)
class EpisodeSplit:
    """Episodes of the training dataset (`dmm_train.records.Episode`), split once by a seeded shuffle."""

    dataset_id: str
    content_hash: str
    calibration: tuple
    heldout: tuple

    def summary(self) -> dict:
        """What the split is, for the manifest: the dataset, its hash, episodes and steps either side."""
        return {
            "dataset_id": self.dataset_id, "content_hash": self.content_hash,
            "calibration_episodes": len(self.calibration), "heldout_episodes": len(self.heldout),
            "calibration_steps": int(sum(len(e) for e in self.calibration)),
            "heldout_steps": int(sum(len(e) for e in self.heldout)),
        }


def load_training_dataset(checkpoint, dataset: str | None = None, *, require_hash: bool = True):
    """The dataset ``checkpoint`` was trained on (`OfflineDataset`), checked by content hash.

    dataset: a Minari dataset directory or id (default: the id the checkpoint records,
    looked up in the local Minari store, never downloaded here). require_hash: False takes
    a dataset of other content (a recording the user chose), still of the checkpoint's dims.
    """
    spec = dataset if dataset is not None else checkpoint.dataset_id
    loaded = _read_dataset(spec, given=dataset is not None)
    if require_hash and loaded.content_hash != checkpoint.dataset_hash:
        raise DMMError(f"dataset {spec!r} content hash {loaded.content_hash[:12]}...",
                       f"{checkpoint.dataset_hash[:12]}..., the content the checkpoint was trained on "
                       f"({checkpoint.dataset_id!r})",
                       "pass --dataset with the dataset the checkpoint was trained on")
    check_dims(f"dataset {spec!r}", (loaded.state_dim, loaded.act_dim),
               (checkpoint.model_config.state_dim, checkpoint.model_config.act_dim), "the checkpoint's",
               "pass --dataset with a recording of the checkpoint's environment")
    return loaded


def _read_dataset(spec: str, *, given: bool):
    """The one read of a dataset here: ``spec`` from the local store (never downloaded)."""
    try:
        return load_dataset(spec, download=False)
    except DMMError as error:
        received = (f"dataset {spec!r} cannot be loaded here" if given
                    else f"the training dataset {spec!r} is not found here")
        raise DMMError(f"{received} ({error.received})",
                       "a dataset directory or an id in the local Minari store (calibration and accuracy run on it)",
                       "pass --dataset with its directory or local id") from None


CLOSED_LOOP_MIN_STEPS = 1000  # closed-loop steps rolled when the training dataset is not used
CLOSED_LOOP_SEED_OFFSET = 10_000  # their reset seeds, apart from the seeds the closed-loop score is judged on


@dataclass(frozen=True)
class CalibrationData:
    """The episodes a low-precision export calibrates and judges on, and what they are."""

    split: EpisodeSplit
    source: str  # for the manifest (``calibration_source``)
    notice: str | None  # one line for the user when the training dataset is not used as recorded


def find_training_dataset(checkpoint, dataset: str | None = None):
    """(the dataset to calibrate on or None, why not / what to know): ``dataset`` when given (a recording the
    user chose: an unreadable one or one of other dims is an error, other content is used with a notice);
    else the checkpoint's training dataset from the local store when it is here with the recorded content."""
    given = dataset is not None
    spec = dataset if given else checkpoint.dataset_id
    dims = (checkpoint.model_config.state_dim, checkpoint.model_config.act_dim)
    try:
        loaded = _read_dataset(spec, given=given)
    except DMMError as error:
        if given:
            raise
        loaded, why = None, error.received
    else:
        other_content = loaded.content_hash != checkpoint.dataset_hash
        why = None
        if other_content and not given:
            why = (f"the training dataset {spec!r} here has content hash {loaded.content_hash[:12]}..., not the "
                   f"{checkpoint.dataset_hash[:12]}... the checkpoint was trained on")
    if why is not None:  # not here, or other content under the recorded id: where the recorded content came from
        history = describe_content(spec, checkpoint.dataset_hash)
        return None, why + (f"; {history}" if history else "")
    if given:
        check_dims(f"dataset {spec!r}", (loaded.state_dim, loaded.act_dim), dims, "the checkpoint's",
                   "pass --dataset with a recording of the checkpoint's environment")
        if other_content:
            return loaded, (f"notice: --dataset {dataset!r} has content hash {loaded.content_hash[:12]}..., not the "
                            f"training dataset's {checkpoint.dataset_hash[:12]}... ({checkpoint.dataset_id!r}); "
                            "calibrating and judging on it as given")
        return loaded, None
    if (loaded.state_dim, loaded.act_dim) != dims:
        return None, (f"the training dataset {spec!r} here has state/action dims {loaded.state_dim}/"
                      f"{loaded.act_dim}, not the checkpoint's")
    return loaded, None


@dataclass(frozen=True)
class _Recorded:
    """Closed-loop episodes in the shape `split_episodes` takes."""

    dataset_id: str
    content_hash: str
    episodes: tuple


def closed_loop_episodes(model_bytes: bytes, manifest, *, steps: int, seed: int) -> tuple:
    """Whole episodes (`dmm_train.records.Episode`) of the graph ``model_bytes`` driving ``manifest.env_id``
    through a `runtime.Policy`, reset with seeds seed, seed + 1, ..., until ``steps`` steps and 2 episodes."""
    episodes, total = [], 0
    with OrtBackend(model_bytes, manifest=manifest, threads=1, label="fp32 graph") as backend:
        policy = Policy(backend)
        plant = make_plant(manifest.env_id)
        try:
            check_plant(plant, manifest, manifest.env_id)
            limit = getattr(getattr(plant, "spec", None), "max_episode_steps", None) or steps
            while total < steps or len(episodes) < 2:
                observation, _ = plant.reset(seed=seed + len(episodes))
                policy.reset()
                observations, actions, rewards, reward, terminated = [], [], [], 0.0, False
                for _ in range(limit):
                    observations.append(np.asarray(observation, dtype=np.float64).reshape(-1))  # (S,)
                    action = np.array(policy.act(observation, reward), dtype=np.float32)  # (Adim,)
                    actions.append(action)
                    observation, reward, terminated, truncated, _ = plant.step(action)
                    rewards.append(float(reward))
                    if terminated or truncated:
                        break
                episodes.append(Episode(np.stack(observations), np.stack(actions), np.asarray(rewards),
                                        bool(terminated)))
                total += len(rewards)
        finally:
            plant.close()
    return tuple(episodes)


def calibration_data(fp32_proto, manifest, checkpoint, *, dataset: str | None = None,
                     steps: int = CLOSED_LOOP_MIN_STEPS, seed: int = 0) -> CalibrationData:
    """The episodes to calibrate and judge a low-precision graph on (see the module docstring).

    fp32_proto: the fp32 graph, which drives the env where the training dataset is not used;
    manifest: its `runtime.Manifest` (batch 1); steps: at least this many closed-loop steps then.
    """
    loaded, why = find_training_dataset(checkpoint, dataset)
    if loaded is not None:
        split = split_episodes(loaded, seed=seed)
        return CalibrationData(split, f"the dataset {loaded.dataset_id} ({loaded.content_hash[:12]}...)"
                               + ("" if dataset is None else f", given with --dataset {dataset}"), why)
    if not manifest.env_id:
        raise DMMError(f"low-precision export of a policy with no simulator to roll out, and no training dataset "
                       f"({why})", "the dataset it was trained on", "pass --dataset with its directory or local id")
    first = seed + CLOSED_LOOP_SEED_OFFSET
    episodes = closed_loop_episodes(fp32_proto.SerializeToString(), manifest, steps=steps, seed=first)
    total = sum(len(e) for e in episodes)
    recorded = _Recorded(f"closed-loop rollouts of the fp32 graph in {manifest.env_id}", hash_episodes(episodes),
                         episodes)
    source = (f"closed-loop rollouts: {len(episodes)} episodes ({total} steps) of the fp32 graph driving "
              f"{manifest.env_id}, reset seeds {first}..{first + len(episodes) - 1}, target return "
              f"{manifest.target_return:g} (training dataset not used: {why})")
    notice = (f"notice: {why}; calibrating and judging on closed-loop rollouts of the policy in {manifest.env_id} "
              "instead (or pass --dataset with a recording)")
    return CalibrationData(split_episodes(recorded, seed=seed), source, notice)


def split_episodes(dataset, *, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, seed: int = 0
                   ) -> EpisodeSplit:
    """Disjoint calibration and held-out episodes (a seeded shuffle of the dataset's episodes)."""
    episodes = dataset.episodes
    if len(episodes) < 2:
        raise DMMError(f"dataset {dataset.dataset_id!r} with {len(episodes)} episode",
                       "at least 2 episodes (the accuracy report runs on episodes the calibration never saw)",
                       "pass --dataset with a recording of two episodes or more")
    if not 0.0 < heldout_fraction < 1.0:
        raise DMMError(f"held-out fraction {heldout_fraction!r}", "a number strictly between 0 and 1",
                       "pass a held-out fraction such as 0.2")
    order = np.random.default_rng(seed).permutation(len(episodes))  # (E,)
    n_heldout = min(len(episodes) - 1, max(1, round(heldout_fraction * len(episodes))))
    heldout = tuple(episodes[i] for i in sorted(order[:n_heldout]))
    calibration = tuple(episodes[i] for i in sorted(order[n_heldout:]))
    return EpisodeSplit(dataset.dataset_id, dataset.content_hash, calibration, heldout)


def episode_trajectory(episode, *, state_mean, state_std, rtg_scale: float, target_return: float):
    """One dataset episode as the runtime would have seen it (`runtime.feeds.InputTrajectory`, B = 1).

    states (1, T, S) normalised in float64 and stored float32 (as `runtime.Policy`),
    actions (1, T, Adim) the executed actions, rtg (1, T, 1) = (target - rewards so far) / scale.
    """
    mean = np.asarray(state_mean, dtype=np.float64)  # (S,)
    std = np.asarray(state_std, dtype=np.float64)  # (S,)
    states = (episode.observations.astype(np.float64) - mean) / std  # (T, S)
    received = np.concatenate([[0.0], np.cumsum(episode.rewards.astype(np.float64))[:-1]])  # (T,) before step t
    rtg = (float(target_return) - received) / float(rtg_scale)  # (T,)
    return InputTrajectory(states[None].astype(np.float32), np.asarray(episode.actions, dtype=np.float32)[None],
                      rtg[None, :, None].astype(np.float32))


def window_samples(episodes, count: int, *, context_len: int, state_mean, state_std, rtg_scale: float,
                   target_return: float, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` window-mode feeds at distinct (episode, t) drawn uniformly over every step of ``episodes``.

    Each feed: states (1, K, S), actions (1, K, Adim), rtg (1, K, 1), as the evaluation builds
    them (`export.reference.window_at`). Fewer when the episodes have fewer steps.
    """
    _check_count(count)
    lengths = np.array([len(e) for e in episodes], dtype=np.int64)  # (E,)
    ends = np.cumsum(lengths)  # (E,)
    rng = np.random.default_rng(seed)
    steps = np.sort(rng.choice(int(ends[-1]), size=min(count, int(ends[-1])), replace=False))  # (n,) global steps
    samples, trajectories = [], {}
    for step in steps:
        index = int(np.searchsorted(ends, step, side="right"))
        t = int(step - (ends[index] - lengths[index]))
        if index not in trajectories:
            trajectories[index] = episode_trajectory(episodes[index], state_mean=state_mean, state_std=state_std,
                                                     rtg_scale=rtg_scale, target_return=target_return)
        samples.append(window_at(trajectories[index], t, context_len))
    return samples


def stream_rollout(session, trajectory, *, n_layer: int, dsm_window: int, d_model: int, d_state: int,
                   max_steps: int | None = None) -> list[dict[str, np.ndarray]]:
    """Roll a stream graph (an ONNX Runtime session) through one episode from zero caches.

    Returns the feeds of every step, each with the caches the graph produced at the step
    before (copied): prev_action (1, Adim), prev_action_valid (1, 1), rtg (1, 1), state (1, S),
    dsm_cache (nl, 1, W-1, D), ssm_state (nl, 1, D, N). Actions are the episode's own
    (teacher-forced); the caches are the graph's.
    """
    dsm = np.zeros((n_layer, 1, dsm_window - 1, d_model), dtype=np.float32)  # (nl, 1, W-1, D)
    ssm = np.zeros((n_layer, 1, d_model, d_state), dtype=np.float32)  # (nl, 1, D, N)
    steps = trajectory.states.shape[1] if max_steps is None else min(max_steps, trajectory.states.shape[1])
    feeds = []
    for t in range(steps):
        feed = stream_feeds(trajectory, t, dsm, ssm)
        feeds.append({name: np.array(value, copy=True) for name, value in feed.items()})
        _, dsm, ssm = session.run(["action", "dsm_cache_next", "ssm_state_next"], feed)
    return feeds


def stream_samples(session, episodes, count: int, *, n_layer: int, dsm_window: int, d_model: int,
                   d_state: int, state_mean, state_std, rtg_scale: float, target_return: float,
                   seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` stream-mode feeds with real caches: episodes in a seeded random order are rolled
    whole through the fp32 stream graph ``session`` until STREAM_OVERSAMPLING * count steps are
    collected, then ``count`` of those steps are drawn without replacement.
    """
    _check_count(count)
    rng = np.random.default_rng(seed)
    pool: list[dict[str, np.ndarray]] = []
    for index in rng.permutation(len(episodes)):
        trajectory = episode_trajectory(episodes[int(index)], state_mean=state_mean, state_std=state_std,
                                        rtg_scale=rtg_scale, target_return=target_return)
        pool.extend(stream_rollout(session, trajectory, n_layer=n_layer, dsm_window=dsm_window,
                                   d_model=d_model, d_state=d_state))
        if len(pool) >= STREAM_OVERSAMPLING * count:
            break
    chosen = np.sort(rng.choice(len(pool), size=min(count, len(pool)), replace=False))
    return [pool[int(i)] for i in chosen]


def calibration_feeds(proto, manifest, episodes, count: int, *, seed: int = 0
                      ) -> list[dict[str, np.ndarray]]:
    """``count`` real inputs of the graph ``proto`` (fp32) from ``episodes``: the one place calibration builds
    feeds from a split (the calibration episodes for `calibration.qdq`, held-out ones for a parity check)."""
    common = dict(state_mean=manifest.state_mean, state_std=manifest.state_std, rtg_scale=manifest.rtg_scale,
                  target_return=manifest.target_return, seed=seed)
    if manifest.mode == "window":
        return window_samples(episodes, count, context_len=manifest.context_len, **common)
    session = cpu_session(proto.SerializeToString())  # the fp32 graph at full optimisation
    return stream_samples(session, episodes, count, n_layer=manifest.n_layer, dsm_window=manifest.dsm_window,
                          d_model=manifest.d_model, d_state=manifest.d_state, **common)


def _check_count(count) -> None:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise DMMError(f"sample count {count!r}", "a positive integer", "ask for 1 sample or more")
