"""Shared fixtures: a real checkpoint on disk (untrained weights, fixed seed) and env hygiene."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dmm_train.baselines import build_policy
from dmm_train.checkpoint import checkpoint_metadata, save_model
from dmm_train.config import ModelConfig, TrainConfig, get_preset


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never reach for the network: the hub fails fast instead of retrying."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_checkpoint(directory, *, seed: int = 0, preset: str = "hopper", model_kind: str = "dmm"):
    """A model.pt of a freshly initialised model (DMM, or the baseline ``model_kind``) with plausible
    Hopper normalisation stats."""
    torch.manual_seed(seed)
    env_preset = get_preset(preset)
    model = build_policy(ModelConfig.from_preset(env_preset, model=model_kind)).eval()
    rng = np.random.default_rng(seed)
    state_mean = rng.normal(0.0, 0.5, env_preset.state_dim).astype(np.float32)
    state_std = rng.uniform(0.2, 2.0, env_preset.state_dim).astype(np.float32)
    metadata = checkpoint_metadata(
        model=model, train_config=dataclasses.asdict(TrainConfig(preset=preset, model=model_kind)), preset=preset,
        env_id=env_preset.env_id, state_mean=state_mean, state_std=state_std,
        rtg_scale=env_preset.rtg_scale, target_returns=env_preset.target_returns,
        ref_min_score=env_preset.ref_min_score, ref_max_score=env_preset.ref_max_score,
        dataset_id="fixture/untrained", dataset_hash="0" * 64, step=0,
    )
    return save_model(directory, model, metadata)


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory):
    """Path of a hopper model.pt with untrained, seeded weights."""
    return write_checkpoint(tmp_path_factory.mktemp("checkpoint"))
