"""Reading Minari datasets into episode records, including the remote probe.

Three ways to name a dataset (``load_dataset``):

1. a directory holding a Minari dataset (``<dir>/data/metadata.json``, or the
   ``data`` directory itself);
2. the id of a dataset in the local Minari store (``$MINARI_DATASETS_PATH``,
   default ``~/.minari/datasets``);
3. a remote id, downloaded by Minari from its hub. This needs ``minari[hf]`` and a
   network; without one it fails at once with a DMMError instead of retrying.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from contract.errors import DMMError, describe_error
from dmm_train.records import Episode, OfflineDataset

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


_LOCAL_HINT = (
    "train on a local dataset instead: pass --dataset PATH (a Minari dataset directory) or "
    "generate one with `python cli.py collect`"
)


def load_dataset(spec: str | os.PathLike, *, download: bool = True) -> OfflineDataset:
    """Load the dataset named by ``spec``: a dataset directory, a local id, or a remote id.

    A remote id is only tried when it is not in the local store and ``download`` is
    True; without a network the call fails within a few seconds with a DMMError.
    """
    spec_text = os.fspath(spec)
    if not spec_text:
        raise DMMError("empty dataset name", "a Minari dataset id (namespace/name-vN) or a directory",
                       fix="pass --dataset ID|PATH")
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
        raise DMMError(f"directory {spec!r} is not a Minari dataset (no {DATA_DIR}/{METADATA_FILE} in it)",
                       "the directory of a dataset written by Minari or `python cli.py collect`",
                       fix="pass the dataset's own directory, or write one with `python cli.py collect --out DIR`")
    if path.exists():
        raise DMMError(f"{spec!r} is a file", "a Minari dataset directory or a dataset id",
                       fix="pass the directory holding the dataset, or its id")
    looks_like_path = (
        spec.startswith(("/", "./", "../", "~", "."))
        or spec.endswith(("/", os.sep))
        or (os.altsep is not None and os.altsep in spec)
    )
    if looks_like_path:
        raise DMMError(f"dataset directory {spec!r} does not exist", f"a directory holding {DATA_DIR}/{METADATA_FILE}",
                       fix="check the path, or write one with `python cli.py collect --out DIR`")
    return None


def _data_path_for_id(dataset_id: str, *, download: bool) -> Path:
    from minari.storage import get_dataset_path

    remote_path = "://" in dataset_id  # e.g. hf://farama-minari/D4RL/door/human-v2
    bare_id = dataset_id.split("://", 1)[1].split("/", 1)[-1] if remote_path else dataset_id
    if not DATASET_ID_RE.fullmatch(bare_id):
        raise DMMError(f"dataset {dataset_id!r} is neither an existing directory nor a valid Minari id",
                       "a directory or an id of the form namespace/name-vN (e.g. dmm-deploy/hopper-random-v0)",
                       fix="check the path or the id's spelling (its -vN version included)")
    local = Path(get_dataset_path(bare_id)) / DATA_DIR
    if local.is_dir():
        return local
    if not download:
        raise DMMError(f"dataset {dataset_id!r} is not in the local Minari store {str(get_dataset_path())!r} and "
                       "download is off", "a dataset in the local store (or download on)", fix=_LOCAL_HINT)
    _download(dataset_id)
    if not local.is_dir():
        raise DMMError(f"Minari reported {dataset_id!r} downloaded but {str(local)!r} is missing",
                       f"the downloaded dataset at {str(local)!r}", fix=_LOCAL_HINT)
    return local


def _download(dataset_id: str) -> None:
    """Download through Minari, translating every failure into one actionable DMMError."""
    remote = os.environ.get("MINARI_REMOTE", "hf://farama-minari")
    if "://" in dataset_id:
        remote = dataset_id
    if remote.startswith("hf://"):
        if not _hub_client_installed():
            raise DMMError(
                f"could not download dataset {dataset_id!r}: it is not in the local Minari store and huggingface_hub "
                "is not installed", "huggingface_hub for remote datasets",
                fix=f'install it with `pip install "minari[hf]"`, or {_LOCAL_HINT}'
            )
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            raise DMMError(
                f"could not download dataset {dataset_id!r}: it is not in the local Minari store and "
                "HF_HUB_OFFLINE is set (no network use)", "a dataset in the local store, or network use allowed",
                fix=f"unset HF_HUB_OFFLINE to download it, or {_LOCAL_HINT}"
            )
        endpoint = os.environ.get("HF_ENDPOINT", _DEFAULT_HF_ENDPOINT)
    else:
        endpoint = _GCP_STORAGE_URL
    if not _endpoint_reachable(endpoint, REMOTE_PROBE_TIMEOUT_S):
        raise DMMError(
            f"could not download dataset {dataset_id!r}: it is not in the local Minari store and there is no "
            f"network ({endpoint} did not answer within {REMOTE_PROBE_TIMEOUT_S:g} s)",
            "a dataset in the local store, or a reachable dataset hub", fix=_LOCAL_HINT
        )
    import minari

    try:
        # download_dataset, not load_dataset(download=True): only it understands hf://... ids.
        minari.download_dataset(dataset_id)
    except ImportError as exc:
        raise DMMError(f"could not download dataset {dataset_id!r} ({describe_error(exc)})",
                       "the packages Minari downloads with", fix=f'pip install "minari[hf]", or {_LOCAL_HINT}') from exc
    except Exception as exc:
        # The hub stack raises types from huggingface_hub, httpx, requests and minari itself
        # (ValueError for an unknown id); all of them mean "this download failed".
        raise DMMError(f"could not download dataset {dataset_id!r} ({describe_error(exc)})",
                       "an id in the Minari catalogue",
                       fix=f"check the id against the Minari catalogue, or {_LOCAL_HINT}") from exc


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
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DMMError(f"cannot read {str(data_path / METADATA_FILE)!r} ({describe_error(exc)})",
                       "Minari metadata JSON", fix="regenerate the dataset (python cli.py collect) or pick another"
                       ) from None
    version = metadata.get("minari_version")
    if version not in supported_dataset_versions:
        raise DMMError(f"dataset {spec!r} written by Minari {version!r}",
                       f"one of {', '.join(sorted(supported_dataset_versions))} (the versions this Minari reads)",
                       fix="regenerate it or install a matching minari")
    try:
        minari_dataset = MinariDataset(data_path)
        minari_episodes = list(minari_dataset.iterate_episodes())
    except (OSError, ValueError, KeyError) as exc:
        raise DMMError(f"cannot read Minari dataset {spec!r} at {str(data_path)!r} ({describe_error(exc)})",
                       "a readable Minari dataset", fix="regenerate it (python cli.py collect) or pick another"
                       ) from None

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
            raise DMMError(f"dataset {spec!r} has dict observations with keys {sorted(observations)}",
                           "a flat Box observation or a dict with an 'observation' entry",
                           fix="re-import the dataset with its state under an 'observation' key")
        observations = observations["observation"]
    if not isinstance(episode.actions, np.ndarray):
        raise DMMError(f"dataset {spec!r} has {type(episode.actions).__name__} actions", "a Box action space",
                       fix="use a dataset with continuous (Box) actions")
    length = len(episode.rewards)
    observations = np.asarray(observations)
    if observations.shape[0] != length + 1:
        raise DMMError(
            f"dataset {spec!r} episode {episode.id} has {observations.shape[0]} observations for {length} steps",
            "T + 1 (Minari stores the final observation too)",
            fix="regenerate the dataset (python cli.py collect) or pick another"
        )
    _refuse_non_finite(spec, episode.id, observations=observations, actions=episode.actions,
                       rewards=episode.rewards, terminations=episode.terminations)
    return Episode(
        observations=observations[:-1].reshape(length, -1),  # (T, S): drop the final observation
        actions=np.asarray(episode.actions).reshape(length, -1),  # (T, Adim)
        rewards=np.asarray(episode.rewards),  # (T,)
        terminated=bool(episode.terminations[-1]) if length else False,
    )


def _refuse_non_finite(spec: str, episode_id, **fields) -> None:
    """Refuse an episode holding NaN or inf in any field: one such value poisons the normalisation
    stats and every gradient, and trains silently into a useless policy."""
    for name, values in fields.items():
        values = np.asarray(values)
        if values.dtype.kind not in "fc":  # integers and booleans are always finite
            continue
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1) if values.ndim else ~np.isfinite(values)
        if bad.any():
            step = int(np.argmax(bad))
            value = values[step].ravel()[~np.isfinite(values[step].ravel())][0] if values.ndim else values
            raise DMMError(
                f"dataset {spec!r} episode {episode_id} step {step}: {name} holds {value} ({int(bad.sum())} "
                "non-finite step(s) in that episode)", "finite values",
                fix="regenerate the dataset or drop that episode"
            )
