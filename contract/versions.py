"""Versions of the libraries an artifact was made with (recorded in checkpoints and manifests)."""

from __future__ import annotations

import importlib.metadata as metadata
import platform

CHECKPOINT_PACKAGES = ("torch", "numpy", "minari", "gymnasium", "mujoco", "onnx", "onnxruntime")
EXPORTER_PACKAGES = ("torch", "onnx", "onnxruntime", "numpy")


def library_versions(packages: tuple[str, ...], *, python: bool = False) -> dict[str, str]:
    """``{package: version}`` for the installed ones among ``packages`` (plus Python's if asked)."""
    versions = {"python": platform.python_version()} if python else {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions
