"""Offline datasets: load a Minari dataset into episodes, sample training windows.

Symbols (DMM_SPEC.md): B batch, K context length in timesteps, T steps in one
episode, N steps in the whole dataset, S state dim, Adim action dim.

Three ways to name a dataset (``load_dataset``):

1. a directory holding a Minari dataset (``<dir>/data/metadata.json``, or the
   ``data`` directory itself);
2. the id of a dataset in the local Minari store (``$MINARI_DATASETS_PATH``,
   default ``~/.minari/datasets``);
3. a remote id, downloaded by Minari from its hub. This needs ``minari[hf]`` and a
   network; without one it fails at once with a DMMError instead of retrying.

The sampler reproduces the official DT/DMM ``get_batch`` (see
``reference/dmm_official_code_notes.md`` section 4), vectorised over the batch.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.errors import DMMError
from dmm_train.config import ACTION_PAD_VALUE, RTG_PAD_VALUE, STATE_STD_EPS

METADATA_FILE = "metadata.json"
DATA_DIR = "data"

# Minari's id grammar, ``(namespace/)name-vN``, with the version made mandatory: Minari's own
# parser accepts a missing version and then fails on ``int(None)``.
DATASET_ID_RE = re.compile(r"^(?:[-_\w][-_\w/]*[-_\w]+/)?[-_\w]+?-v\d+$")

# Seconds to wait for the dataset hub to answer one HEAD request before calling the network
# absent. Without this probe huggingface_hub retries for about 24 s (1+2+4+8+8) before failing.
REMOTE_PROBE_TIMEOUT_S = 3.0
_DEFAULT_HF_ENDPOINT = "https://huggingface.co"
_GCP_STORAGE_URL = "https://storage.googleapis.com"

# Version tag hashed in front of the episode arrays; bump it if the hashed layout changes.
_HASH_FORMAT = b"dmm-deploy/episodes/v1"

_LOCAL_HINT = (
    "train on a local dataset instead: pass --dataset PATH (a Minari dataset directory) or "
    "generate one with `python cli.py collect`"
)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, eq=False)
class Episode:
    """One episode as the sampler sees it (arrays are read-only).

    observations: (T, S) float32, the state *before* each action; Minari's final
                  observation (after the last action) is dropped, as in the D4RL pickles
                  the official code trains on.
    actions:      (T, Adim) float32
    rewards:      (T,) float32
    terminated:   True if the episode ended in a terminal state (not a time limit).
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool

    def __post_init__(self) -> None:
        observations = _frozen_float32(self.observations)  # (T, S)
        actions = _frozen_float32(self.actions)  # (T, Adim)
        rewards = _frozen_float32(self.rewards)  # (T,)
        if observations.ndim != 2 or actions.ndim != 2 or rewards.ndim != 1:
            raise DMMError(
                f"episode arrays have shapes observations {observations.shape}, actions {actions.shape}, "
                f"rewards {rewards.shape}; expected (T, S), (T, Adim) and (T,)"
            )
        length = rewards.shape[0]
        if length < 1 or observations.shape[0] != length or actions.shape[0] != length:
            raise DMMError(
                f"episode has {observations.shape[0]} observations, {actions.shape[0]} actions and "
                f"{length} rewards; expected the same T >= 1 for all three"
            )
        object.__setattr__(self, "observations", observations)
        object.__setattr__(self, "actions", actions)
        object.__setattr__(self, "rewards", rewards)
        object.__setattr__(self, "terminated", bool(self.terminated))

    def __len__(self) -> int:
        return int(self.rewards.shape[0])


@dataclass(frozen=True, eq=False)
class OfflineDataset:
    """A whole offline dataset in memory, with the statistics training needs.

    state_mean, state_std: (S,) float32, over every state of every episode; the std
    already includes STATE_STD_EPS (as the official code's ``std + 1e-6``).
    content_hash: sha256 hex digest of the episode arrays in order (see
    ``hash_episodes``); the same data gives the same hash whatever the file format.
    ref_min_score, ref_max_score: D4RL-style reference returns from the Minari
    metadata, or None when the dataset has none.
    """

    dataset_id: str
    env_id: str
    episodes: tuple[Episode, ...]
    state_mean: np.ndarray
    state_std: np.ndarray
    content_hash: str
    ref_min_score: float | None = None
    ref_max_score: float | None = None

    @classmethod
    def from_episodes(
        cls,
        dataset_id: str,
        env_id: str,
        episodes: Iterable[Episode],
        *,
        ref_min_score: float | None = None,
        ref_max_score: float | None = None,
    ) -> OfflineDataset:
        """Build a dataset from episodes, computing the normalisation stats and the hash."""
        episodes = tuple(episodes)
        if not episodes:
            raise DMMError(f"dataset {dataset_id!r} has no episodes; expected at least one non-empty episode")
        state_dims = {e.observations.shape[1] for e in episodes}
        act_dims = {e.actions.shape[1] for e in episodes}
        if len(state_dims) != 1 or len(act_dims) != 1:
            raise DMMError(
                f"dataset {dataset_id!r} mixes state dims {sorted(state_dims)} and action dims "
                f"{sorted(act_dims)}; expected one of each"
            )
        states = np.concatenate([e.observations for e in episodes]).astype(np.float64)  # (N, S)
        if not np.all(np.isfinite(states)):
            raise DMMError(f"dataset {dataset_id!r} has NaN or inf observations; expected finite values")
        mean = states.mean(axis=0).astype(np.float32)  # (S,)
        std = (states.std(axis=0) + STATE_STD_EPS).astype(np.float32)  # (S,)
        return cls(
            dataset_id=dataset_id,
            env_id=env_id,
            episodes=episodes,
            state_mean=_freeze(mean),
            state_std=_freeze(std),
            content_hash=hash_episodes(episodes),
            ref_min_score=None if ref_min_score is None else float(ref_min_score),
            ref_max_score=None if ref_max_score is None else float(ref_max_score),
        )

    @property
    def state_dim(self) -> int:
        return int(self.episodes[0].observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.episodes[0].actions.shape[1])

    @property
    def total_steps(self) -> int:
        return sum(len(e) for e in self.episodes)

    @property
    def episode_lengths(self) -> np.ndarray:
        """(num_episodes,) int64."""
        return np.array([len(e) for e in self.episodes], dtype=np.int64)


def hash_episodes(episodes: Sequence[Episode]) -> str:
    """sha256 over the float32 little-endian bytes of each episode, in order.

    Each episode contributes its shape (T, S, Adim), its terminated flag, then its
    observations, actions and rewards; so the hash depends on the data only, not on
    the Minari storage format, the dataset id or the file layout.
    """
    digest = hashlib.sha256(_HASH_FORMAT)
    for episode in episodes:
        header = np.array(
            [len(episode), episode.observations.shape[1], episode.actions.shape[1], int(episode.terminated)],
            dtype="<i8",
        )
        digest.update(header.tobytes())
        for array in (episode.observations, episode.actions, episode.rewards):
            digest.update(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return digest.hexdigest()


def normalized_score(return_, ref_min: float, ref_max: float):
    """D4RL normalised score, ``100 * (return - ref_min) / (ref_max - ref_min)``.

    ``return_`` may be a number (a float comes back) or an array (an array comes back).
    """
    if ref_max == ref_min:
        raise DMMError(
            f"reference scores min={ref_min} and max={ref_max} are equal; expected max != min; "
            "fix the dataset's ref_min_score/ref_max_score"
        )
    score = 100.0 * (np.asarray(return_, dtype=np.float64) - ref_min) / (ref_max - ref_min)
    return float(score) if score.ndim == 0 else score


# --------------------------------------------------------------------------- loading


def load_dataset(spec: str | os.PathLike, *, download: bool = True) -> OfflineDataset:
    """Load the dataset named by ``spec``: a dataset directory, a local id, or a remote id.

    A remote id is only tried when it is not in the local store and ``download`` is
    True; without a network the call fails within a few seconds with a DMMError.
    """
    spec_text = os.fspath(spec)
    if not spec_text:
        raise DMMError("empty dataset name; expected a Minari dataset id (namespace/name-vN) or a directory")
    data_path = _local_data_path(spec_text)
    if data_path is None:
        data_path = _data_path_for_id(spec_text, download=download)
    return _read_minari(data_path, spec_text)


def _local_data_path(spec: str) -> Path | None:
    """The ``data`` directory when ``spec`` names a directory on disk; None when it is an id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        for candidate in (path / DATA_DIR, path):
            if (candidate / METADATA_FILE).is_file():
                return candidate
        raise DMMError(
            f"directory {spec!r} is not a Minari dataset (no {DATA_DIR}/{METADATA_FILE} in it); expected the "
            f"directory of a dataset written by Minari or `python cli.py collect`"
        )
    if path.exists():
        raise DMMError(f"{spec!r} is a file; expected a Minari dataset directory or a dataset id")
    looks_like_path = (
        spec.startswith(("/", "./", "../", "~", "."))
        or spec.endswith(("/", os.sep))
        or (os.altsep is not None and os.altsep in spec)
    )
    if looks_like_path:
        raise DMMError(
            f"dataset directory {spec!r} does not exist; expected a directory holding "
            f"{DATA_DIR}/{METADATA_FILE}; check the path, or write one with `python cli.py collect --out DIR`"
        )
    return None


def _data_path_for_id(dataset_id: str, *, download: bool) -> Path:
    from minari.storage import get_dataset_path

    remote_path = "://" in dataset_id  # e.g. hf://farama-minari/D4RL/door/human-v2
    bare_id = dataset_id.split("://", 1)[1].split("/", 1)[-1] if remote_path else dataset_id
    if not DATASET_ID_RE.fullmatch(bare_id):
        raise DMMError(
            f"dataset {dataset_id!r} is neither an existing directory nor a valid Minari id; expected a "
            "directory or an id of the form namespace/name-vN (e.g. dmm-deploy/hopper-random-v0)"
        )
    local = Path(get_dataset_path(bare_id)) / DATA_DIR
    if local.is_dir():
        return local
    if not download:
        raise DMMError(
            f"dataset {dataset_id!r} is not in the local Minari store {str(get_dataset_path())!r} and "
            f"download is off; {_LOCAL_HINT}"
        )
    _download(dataset_id)
    if not local.is_dir():
        raise DMMError(
            f"Minari reported {dataset_id!r} downloaded but {str(local)!r} is missing; {_LOCAL_HINT}"
        )
    return local


def _download(dataset_id: str) -> None:
    """Download through Minari, translating every failure into one actionable DMMError."""
    remote = os.environ.get("MINARI_REMOTE", "hf://farama-minari")
    if "://" in dataset_id:
        remote = dataset_id
    if remote.startswith("hf://"):
        if not _hub_client_installed():
            raise DMMError(
                f"could not download dataset {dataset_id!r}: it is not in the local Minari store and remote "
                f'datasets need huggingface_hub; install it with `pip install "minari[hf]"`, or {_LOCAL_HINT}'
            )
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            raise DMMError(
                f"could not download dataset {dataset_id!r}: it is not in the local Minari store and "
                f"HF_HUB_OFFLINE is set (no network use); {_LOCAL_HINT}"
            )
        endpoint = os.environ.get("HF_ENDPOINT", _DEFAULT_HF_ENDPOINT)
    else:
        endpoint = _GCP_STORAGE_URL
    if not _endpoint_reachable(endpoint, REMOTE_PROBE_TIMEOUT_S):
        raise DMMError(
            f"could not download dataset {dataset_id!r}: it is not in the local Minari store and there is no "
            f"network ({endpoint} did not answer within {REMOTE_PROBE_TIMEOUT_S:g} s); {_LOCAL_HINT}"
        )
    import minari

    try:
        # download_dataset, not load_dataset(download=True): only it understands hf://... ids.
        minari.download_dataset(dataset_id)
    except ImportError as exc:
        raise DMMError(f"could not download dataset {dataset_id!r}: {exc}; or {_LOCAL_HINT}") from exc
    except Exception as exc:
        # The hub stack raises types from huggingface_hub, httpx, requests and minari itself
        # (ValueError for an unknown id); all of them mean "this download failed".
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DMMError(
            f"could not download dataset {dataset_id!r} ({type(exc).__name__}: {first_line}); "
            f"check the id against the Minari catalogue, or {_LOCAL_HINT}"
        ) from exc


def _hub_client_installed() -> bool:
    """True if huggingface_hub (``minari[hf]``) can be imported; it is not imported here."""
    return importlib.util.find_spec("huggingface_hub") is not None


def _endpoint_reachable(url: str, timeout_s: float) -> bool:
    """True if ``url`` answers an HTTP(S) HEAD request, any status, within ``timeout_s``.

    A full request rather than a TCP connect: sandboxes that intercept TCP accept any
    connection, and only the TLS handshake or the HTTP exchange then fails. Runs in a
    daemon thread because name resolution ignores socket timeouts; a stuck resolver
    must not hang the caller.
    """
    result: list[bool] = []

    def probe() -> None:
        request = urllib.request.Request(url, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s):
                result.append(True)
        except urllib.error.HTTPError:
            result.append(True)  # the server answered, with an error status
        except (OSError, ValueError):
            result.append(False)  # URLError, timeouts, TLS errors are OSErrors; ValueError: bad URL

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def _read_minari(data_path: Path, spec: str) -> OfflineDataset:
    """Read a Minari ``data`` directory (any storage format) into an OfflineDataset."""
    from minari import MinariDataset, supported_dataset_versions

    try:
        metadata = json.loads((data_path / METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DMMError(
            f"cannot read {str(data_path / METADATA_FILE)!r} ({exc}); expected Minari metadata JSON"
        ) from exc
    version = metadata.get("minari_version")
    if version not in supported_dataset_versions:
        raise DMMError(
            f"dataset {spec!r} was written by Minari {version!r}; this Minari reads "
            f"{', '.join(sorted(supported_dataset_versions))}; regenerate it or install a matching minari"
        )
    try:
        minari_dataset = MinariDataset(data_path)
        minari_episodes = list(minari_dataset.iterate_episodes())
    except (OSError, ValueError, KeyError) as exc:
        raise DMMError(f"cannot read Minari dataset {spec!r} at {str(data_path)!r}: {exc}") from exc

    episodes = tuple(_episode_from_minari(e, spec) for e in minari_episodes)
    env_id = _env_id(metadata)
    return OfflineDataset.from_episodes(
        str(metadata.get("dataset_id", spec)),
        env_id,
        episodes,
        ref_min_score=metadata.get("ref_min_score"),
        ref_max_score=metadata.get("ref_max_score"),
    )


def _env_id(metadata: dict) -> str:
    for key in ("env_spec", "eval_env_spec"):
        spec_json = metadata.get(key)
        if isinstance(spec_json, str):
            env_id = json.loads(spec_json).get("id")
            if env_id:
                return str(env_id)
    return ""


def _episode_from_minari(episode, spec: str) -> Episode:
    observations = episode.observations
    if isinstance(observations, dict):
        # Goal-conditioned datasets (antmaze, kitchen) store a dict; the presets' S is the
        # size of its "observation" entry, so the goal entries are not part of the state
        # (the official D4RL antmaze state appends the 2-d goal: 29 values, not 27).
        if "observation" not in observations:
            raise DMMError(
                f"dataset {spec!r} has dict observations with keys {sorted(observations)}; expected a flat "
                "Box observation or a dict with an 'observation' entry"
            )
        observations = observations["observation"]
    if not isinstance(episode.actions, np.ndarray):
        raise DMMError(
            f"dataset {spec!r} has {type(episode.actions).__name__} actions; expected a Box action space"
        )
    length = len(episode.rewards)
    observations = np.asarray(observations)
    if observations.shape[0] != length + 1:
        raise DMMError(
            f"dataset {spec!r} episode {episode.id} has {observations.shape[0]} observations for {length} "
            "steps; expected T + 1 (Minari stores the final observation too)"
        )
    return Episode(
        observations=observations[:-1].reshape(length, -1),  # (T, S): drop the final observation
        actions=np.asarray(episode.actions).reshape(length, -1),  # (T, Adim)
        rewards=np.asarray(episode.rewards),  # (T,)
        terminated=bool(episode.terminations[-1]) if length else False,
    )


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True, eq=False)
class WindowBatch:
    """One training batch of left-padded windows (numpy float32).

    states:  (B, K, S) normalised; padded steps are ``-mean/std`` (raw zeros normalised)
    actions: (B, K, Adim); padded steps are ACTION_PAD_VALUE
    rtg:     (B, K, 1) return-to-go / rtg_scale, aligned with the states; padded 0
    mask:    (B, K) 1 on real steps, 0 on padding (used by the loss; DT also masks attention with it)
    timesteps: (B, K) int64 step index within the episode; padded 0 (kzl's get_batch). DMM
             ignores it, as the official code; the Decision Transformer embeds it.
    """

    states: np.ndarray
    actions: np.ndarray
    rtg: np.ndarray
    mask: np.ndarray
    timesteps: np.ndarray


class WindowSampler:
    """The official DT/DMM ``get_batch``, vectorised.

    Per window: an episode with probability proportional to its length, a start
    index ``si`` uniform in [0, T-1], then steps ``si .. si+K-1`` cut at the
    episode end and left-padded to K. The return-to-go at window step j is the
    undiscounted sum of rewards from ``si + j`` to the episode end: the official
    ``discount_cumsum(rewards[si:], 1)[:tlen + 1]`` with its extra last entry dropped
    (the model is fed ``rtg[:, :-1]``).

    All per-step quantities are precomputed once into flat (N, ...) arrays, so a
    batch is a few integer draws and one gather.
    """

    def __init__(self, dataset: OfflineDataset, context_len: int, rtg_scale: float, seed: int = 0):
        if not isinstance(context_len, int) or context_len < 1:
            raise DMMError(f"context_len={context_len!r}; expected a positive integer")
        if not rtg_scale > 0:
            raise DMMError(f"rtg_scale={rtg_scale!r}; expected a positive number")
        self.context_len = context_len
        self.rtg_scale = float(rtg_scale)
        self.rng = np.random.default_rng(seed)

        lengths = dataset.episode_lengths  # (E,)
        self._lengths = lengths
        self._ends = np.cumsum(lengths)  # (E,) exclusive end of each episode in the flat arrays
        self._starts = self._ends - lengths  # (E,)
        mean = dataset.state_mean.astype(np.float64)  # (S,)
        std = dataset.state_std.astype(np.float64)  # (S,)
        states = np.concatenate([e.observations for e in dataset.episodes]).astype(np.float64)  # (N, S)
        self._states = ((states - mean) / std).astype(np.float32)  # (N, S)
        self._state_pad = ((0.0 - mean) / std).astype(np.float32)  # (S,) a raw zero state, normalised
        self._actions = np.concatenate([e.actions for e in dataset.episodes])  # (N, Adim)
        # Suffix sums per episode in float64 (gamma = 1), then scaled.
        rtg = np.concatenate([_reverse_cumsum(e.rewards) for e in dataset.episodes])  # (N,)
        self._rtg = (rtg / self.rtg_scale).astype(np.float32)  # (N,)
        self._offsets = np.arange(context_len)  # (K,)

    def sample(self, batch_size: int) -> WindowBatch:
        """Draw ``batch_size`` windows; see the class docstring for the distribution."""
        return self.windows(*self.draw(batch_size))

    def draw(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The random part of ``sample``: (episode, start), each (B,) int64."""
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise DMMError(f"batch_size={batch_size!r}; expected a positive integer")
        # A uniform global step picks its episode with probability length / N (exactly the
        # official p_sample); the start inside that episode is drawn afresh, uniformly.
        step = self.rng.integers(0, self._ends[-1], size=batch_size)  # (B,) uniform over all N steps
        episode = np.searchsorted(self._ends, step, side="right")  # (B,)
        start = self.rng.integers(0, self._lengths[episode])  # (B,) uniform in [0, T-1]
        return episode, start

    def windows(self, episode: np.ndarray, start: np.ndarray) -> WindowBatch:
        """The deterministic part of ``sample``: the windows at (episode, start), each (B,)."""
        episode = np.asarray(episode, dtype=np.int64)  # (B,)
        start = np.asarray(start, dtype=np.int64)  # (B,)
        length = self._lengths[episode]  # (B,)
        if np.any(start < 0) or np.any(start >= length):
            raise DMMError(f"window starts {start.tolist()}; expected each in [0, T-1] of its episode")
        K = self.context_len
        tlen = np.minimum(K, length - start)  # (B,) real steps in the window
        pad = K - tlen  # (B,) left padding
        real = self._offsets[None, :] >= pad[:, None]  # (B, K)
        first = self._starts[episode] + start - pad  # (B,) flat index of window slot 0 (may be padding)
        index = first[:, None] + self._offsets[None, :]  # (B, K)
        index = np.where(real, index, 0)  # padded slots read step 0, then get overwritten

        states = np.where(real[..., None], self._states[index], self._state_pad)  # (B, K, S)
        action_pad = np.float32(ACTION_PAD_VALUE)
        actions = np.where(real[..., None], self._actions[index], action_pad)  # (B, K, Adim)
        rtg = np.where(real, self._rtg[index], np.float32(RTG_PAD_VALUE))[..., None]  # (B, K, 1)
        timesteps = np.where(real, (start - pad)[:, None] + self._offsets[None, :], 0)  # (B, K)
        return WindowBatch(
            states=states.astype(np.float32, copy=False),
            actions=actions.astype(np.float32, copy=False),
            rtg=rtg.astype(np.float32, copy=False),
            mask=real.astype(np.float32),
            timesteps=timesteps.astype(np.int64, copy=False),
        )

    def get_state(self) -> dict:
        """The RNG state, a JSON-able dict (numpy's bit-generator state)."""
        return copy.deepcopy(self.rng.bit_generator.state)

    def set_state(self, state: dict) -> None:
        """Restore a state returned by ``get_state`` (same bit generator)."""
        expected = type(self.rng.bit_generator).__name__
        if not isinstance(state, dict) or state.get("bit_generator") != expected:
            received = state.get("bit_generator") if isinstance(state, dict) else type(state).__name__
            raise DMMError(
                f"sampler state is for {received!r}; expected a {expected} state from "
                "WindowSampler.get_state(); resume from a checkpoint written by this version"
            )
        self.rng.bit_generator.state = copy.deepcopy(state)


# --------------------------------------------------------------------------- helpers


def _reverse_cumsum(rewards: np.ndarray) -> np.ndarray:
    """(T,) -> (T,) float64: out[t] = sum(rewards[t:]), the official discount_cumsum at gamma 1."""
    return np.cumsum(rewards.astype(np.float64)[::-1])[::-1]


def _freeze(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _frozen_float32(array) -> np.ndarray:
    out = np.array(array, dtype=np.float32, copy=True)
    return _freeze(out)
