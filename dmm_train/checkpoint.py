"""Checkpoints: the atomic `model.pt` (+ readable `model.json`) and the resume state.

`model.pt` is everything later stages need (weights, configs, the model kind, the policy's
facts (`contract.deployment.PolicyFacts`: normalisation, rtg scale, targets, env and reference
scores or none), dataset identity, versions) and nothing about the optimizer. The kind
(dmm, dmamba, dt, bc) is ``model_config["model"]``, also shown at
the top level as ``"model"``; a checkpoint without it is a DMM checkpoint (written before
the baselines existed), so format version 1 covers both.
`best.pt` (+ `best.json`, which adds the ``selection`` score it was chosen on) is a model.pt
in all but name: the run's best periodic checkpoint; every loader takes either path.
`resume.pt` is self-contained training state (weights, optimizer, scheduler, every
RNG and sampler state of every rank, the step), so a run killed at any instant resumes
exactly from the last one written. Both are written to a temporary file in the same directory, fsynced
and renamed, so a reader never sees a half-written file.

Loading never runs code: every file is read by :func:`load_plain_data` (``torch.load`` with
``weights_only=True``), so a file holds tensors and plain data (dicts, lists, tuples, numbers,
strings) only, and one whose pickle asks for anything else is refused with one line.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from contract.deployment import PolicyFacts
from contract.errors import DMMError, describe_error
from contract.files import atomic_write_bytes, atomic_write_json
from contract.versions import CHECKPOINT_PACKAGES, library_versions
from dmm_train.baselines import build_policy
from dmm_train.config import MODEL_KINDS, ModelConfig
from dmm_train.model import count_parameters

FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
MODEL_JSON = "model.json"
RESUME_FILE = "resume.pt"
MODEL_STEM = "model"
BEST_STEM = "best"  # best.pt / best.json: the best periodic checkpoint of a run, a model.pt in all but name


# Resume points written before their RNG states were stored as plain data hold numpy's legacy RNG
# key, a uint32 array. Pickled, it needs exactly these: they rebuild a uint32 ndarray and call
# nothing else (an array of any other dtype, objects included, is still refused).
_NUMPY_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core to np._core
LEGACY_NUMPY_GLOBALS = (_NUMPY_CORE.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType)


def load_plain_data(path: Path, what: str, advice: str, *, legacy_numpy: bool = False, map_location: str = "cpu"):
    """``torch.load(weights_only=True)`` of ``path``; a file that needs code to load, or is damaged, is one DMMError.

    what: how the message names the file ("checkpoint", "resume point"); advice: what to do about
    a file that cannot be used. legacy_numpy: also accept `LEGACY_NUMPY_GLOBALS`.
    """
    try:
        with torch.serialization.safe_globals(list(LEGACY_NUMPY_GLOBALS) if legacy_numpy else []):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        refusal = _code_request(str(error))
        if refusal is not None:
            raise DMMError(f"{what} {str(path)!r} needs code to load ({refusal}), which is refused",
                           "a file written by 'cli.py train', which holds only tensors and plain data",
                           fix=advice) from None
        reason = describe_error(error)
    except Exception as error:  # torch raises many types for a damaged file
        reason = describe_error(error)
    raise DMMError(f"{what} {str(path)!r} could not be read ({reason})", "a file written by 'cli.py train'",
                   fix=advice)


def _code_request(message: str) -> str | None:
    """What a refused pickle asked for (a global, or an object of a class), from torch's message; None when
    the refusal is about damaged bytes."""
    detail = message.partition("WeightsUnpickler error:")[2].strip()
    if not detail or detail.startswith("Unsupported operand") or "too long" in detail:
        return None
    line = detail.splitlines()[0]
    found = re.search(r"GLOBAL (\S+)", line)
    return f"it asks for {found.group(1)}" if found else line.split(". ")[0][:200]


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


@dataclass(frozen=True)
class Checkpoint:
    """A loaded `model.pt`: the model, its deployment facts and where it came from."""

    model: nn.Module  # DecisionMetaMamba, or the baseline that model_config.model names
    model_config: ModelConfig
    train_config: dict
    facts: PolicyFacts  # dims, normalisation, rtg scale, targets, env or none, references or none
    dataset_id: str
    dataset_hash: str
    step: int
    path: Path
    metadata: dict

    # The facts by name, for the stages that read one or two of them.
    @property
    def preset(self) -> str:
        return self.facts.preset

    @property
    def env_id(self) -> str | None:
        return self.facts.env_id

    @property
    def state_mean(self) -> np.ndarray:  # (S,) float32
        return np.asarray(self.facts.state_mean, dtype=np.float32)

    @property
    def state_std(self) -> np.ndarray:  # (S,) float32, eps already added
        return np.asarray(self.facts.state_std, dtype=np.float32)

    @property
    def rtg_scale(self) -> float:
        return self.facts.rtg_scale

    @property
    def target_returns(self) -> tuple[float, ...]:
        return self.facts.target_returns

    @property
    def ref_min_score(self) -> float | None:
        return self.facts.ref_min_score

    @property
    def ref_max_score(self) -> float | None:
        return self.facts.ref_max_score

    # (S,) float32 per-dimension extremes of the training states; None in checkpoints written
    # before they were recorded (their exports carry no observation range).
    @property
    def state_min(self) -> np.ndarray | None:
        return _optional_vector(self.facts.state_min)

    @property
    def state_max(self) -> np.ndarray | None:
        return _optional_vector(self.facts.state_max)


def policy_facts(model_config: ModelConfig, preset, dataset) -> PolicyFacts:
    """The facts of a policy of ``model_config`` trained with ``preset`` (an EnvPreset) on ``dataset``."""
    references = (dataset.ref_min_score, dataset.ref_max_score)
    if references[0] is None or references[1] is None:
        references = (preset.ref_min_score, preset.ref_max_score)  # None for a preset derived from the data
    return PolicyFacts(
        preset=preset.name, env_id=preset.env_id, state_dim=model_config.state_dim, act_dim=model_config.act_dim,
        context_len=model_config.context_len, state_mean=dataset.state_mean, state_std=dataset.state_std,
        rtg_scale=preset.rtg_scale, target_returns=preset.target_returns, ref_min_score=references[0],
        ref_max_score=references[1], state_min=dataset.state_min, state_max=dataset.state_max,
    )


def checkpoint_metadata(*, model: nn.Module, train_config: dict, facts: PolicyFacts, dataset_id: str,
                        dataset_hash: str, step: int, world_size: int = 1) -> dict:
    """The JSON-able description stored in model.pt and model.json."""
    stored = facts.to_dict()
    for name in ("state_min", "state_max"):  # absent, not null, when not recorded (older readers)
        if stored[name] is None:
            del stored[name]
    del stored["state_dim"], stored["act_dim"], stored["context_len"]  # the model config holds them
    return {
        "format_version": FORMAT_VERSION,
        "kind": "dmm-checkpoint",
        "model": model.config.model,
        "model_config": dataclasses.asdict(model.config),
        "train_config": train_config,
        "n_params": count_parameters(model),
        **stored,
        "dataset": {"id": dataset_id, "content_hash": dataset_hash},
        "step": int(step),
        "world_size": int(world_size),  # training processes (torchrun ranks) that took each step
        "versions": library_versions(CHECKPOINT_PACKAGES, python=True),
    }


def save_model(directory: Path, model: nn.Module, metadata: dict, stem: str = MODEL_STEM) -> Path:
    """Write DIR/<stem>.pt and DIR/<stem>.json (model.pt / model.json) atomically; returns the .pt path."""
    directory = Path(directory)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({**metadata, "model_state": state}, directory / f"{stem}.pt")
    atomic_write_json(metadata, directory / f"{stem}.json")
    return directory / f"{stem}.pt"


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> Checkpoint:
    """Load a model.pt (or a run directory holding one); raise DMMError if it is not usable."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise DMMError(f"checkpoint {str(path)!r} does not exist",
                       "a model.pt written by 'python cli.py train' (or its run directory)",
                       fix="pass the path of a model.pt or its run directory")
    payload = load_plain_data(path, "checkpoint", "retrain or pick another file", map_location=map_location)
    if not isinstance(payload, dict) or payload.get("kind") != "dmm-checkpoint":
        raise DMMError(f"{str(path)!r}: not a dmm-deploy checkpoint", "a model.pt from 'cli.py train'",
                       fix="pass the model.pt of a run, or retrain")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise DMMError(f"checkpoint {str(path)!r} format version {version}",
                       f"version {FORMAT_VERSION} (the one this dmm-deploy reads)",
                       fix="retrain with this version or use the dmm-deploy release that wrote it")
    _require_keys(path, payload)
    kind = payload["model_config"].get("model", "dmm")  # no "model" key: a DMM checkpoint
    if kind not in MODEL_KINDS:
        raise DMMError(f"checkpoint {str(path)!r} model kind {kind!r}",
                       f"one of {', '.join(MODEL_KINDS)} (the kinds this dmm-deploy reads)",
                       fix="use the dmm-deploy release that wrote it")
    try:
        model_config = ModelConfig(**payload["model_config"])
        model = build_policy(model_config)
        model.load_state_dict(payload["model_state"])
    except (TypeError, ValueError, RuntimeError) as error:  # unknown config fields, wrong shapes or names
        raise DMMError(f"checkpoint {str(path)!r} does not describe a loadable model ({describe_error(error)})",
                       "a model.pt written by 'cli.py train'", fix="retrain or pick another file") from None
    model.eval()
    metadata = {k: v for k, v in payload.items() if k != "model_state"}
    facts = PolicyFacts.from_dict({**payload, "state_dim": model_config.state_dim, "act_dim": model_config.act_dim,
                                   "context_len": model_config.context_len}, source=f"checkpoint {str(path)!r}")
    return Checkpoint(
        model=model,
        model_config=model_config,
        train_config=payload["train_config"],
        facts=facts,
        dataset_id=payload["dataset"]["id"],
        dataset_hash=payload["dataset"]["content_hash"],
        step=int(payload["step"]),
        path=path,
        metadata=metadata,
    )


# Every key a checkpoint must hold (``dataset`` with these sub-keys); the rest are optional.
REQUIRED_KEYS = ("model_config", "model_state", "train_config", "preset", "env_id", "state_mean", "state_std",
                 "rtg_scale", "target_returns", "ref_min_score", "ref_max_score", "dataset", "step")
DICT_KEYS = {"model_config": (), "model_state": (), "train_config": (), "dataset": ("id", "content_hash")}


def _require_keys(path: Path, payload: dict) -> None:
    """Every required key present, the dict-valued ones dicts: else one DMMError naming what is missing."""
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    for key, subkeys in DICT_KEYS.items():
        if key in payload:
            if not isinstance(payload[key], dict):
                missing.append(f"{key} as a dict (it holds a {type(payload[key]).__name__})")
            else:
                missing += [f"{key}.{sub}" for sub in subkeys if sub not in payload[key]]
    if missing:
        raise DMMError(f"checkpoint {str(path)!r} lacks {', '.join(missing)}",
                       "a model.pt written by 'cli.py train', which holds them all",
                       fix="retrain or pick another file")


def _optional_vector(values) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=np.float32)
