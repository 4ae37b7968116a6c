"""Shared fixtures: a real checkpoint on disk (untrained weights, fixed seed), its engines, and env hygiene."""

from __future__ import annotations

import pytest

from tests.helpers import export_c, export_engines, write_checkpoint


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never reach for the network: the hub fails fast instead of retrying."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory):
    """Path of a hopper model.pt with untrained, seeded weights."""
    return write_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def engines(checkpoint_path, tmp_path_factory):
    """mode -> exported .onnx of ``checkpoint_path``."""
    return export_engines(checkpoint_path, tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def c_export(checkpoint_path, tmp_path_factory):
    """hopper-c.c of ``checkpoint_path`` (export --target c; hopper-c.h and hopper-c.json beside it)."""
    return export_c(checkpoint_path, tmp_path_factory.mktemp("c-export"))
