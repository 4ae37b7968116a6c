"""PyTorch backend: the reference every exported engine is compared with.

It runs the plain model of `dmm_train.model` from a model.pt, behind the same graph
I/O contract as the exported graphs (`contract.manifest`), with a manifest built from
the checkpoint by `dmm_train.manifest_builder.build_manifest`:

- window: ``model(states, actions, rtg)[:, -1]``, the official sliding-window form;
- stream: ``model.step`` once per token over a_{t-1} (skipped where
  prev_action_valid == 0), R_t, s_t, and the action read at s_t.

It uses the loop selective scan (the slow, obviously-correct reference;
docs/design.md#reference-implementations), so it needs no C compiler and checks the fast
paths rather than sharing them. torch is imported in ``load``: importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from contract.errors import DMMError
from contract.manifest import MODES, Manifest
from runtime.backend import Backend


class TorchBackend(Backend):
    """A model.pt run by PyTorch on the CPU. mode: "window" or "stream".

    threads: torch's intra-op threads while this backend runs (set and restored around
    each call, which is cheap, so the process's own setting is untouched; None: torch's
    setting). `load_backend` passes 1: batch-1 tensors of width 64 gain nothing from
    threads, and OpenMP barriers on a busy machine make steps far slower
    (BENCHMARKS.md#design-measurements).
    """

    name = "torch"

    def __init__(self, path: str | Path, *, mode: str = "window", threads: int | None = None):
        super().__init__(path)
        if mode not in MODES:
            raise DMMError(f"mode | received {mode!r} | expected one of {', '.join(MODES)}")
        self.mode = mode
        self.threads = threads
        self.checkpoint = None
        self._model = None
        self._torch = None

    def _load(self) -> Manifest:
        try:
            import torch
        except ImportError:
            raise DMMError(f"engine {str(self.path)!r} is a PyTorch checkpoint and torch is not installed; "
                           "install torch, or run an exported .onnx / .plan") from None
        from dmm_train.checkpoint import load_checkpoint
        from dmm_train.manifest_builder import build_manifest

        checkpoint = load_checkpoint(self.path)
        if checkpoint.model_config.model != "dmm":  # the runtime's window/stream contract is DMM's
            raise DMMError(f"engine {str(self.path)!r} is a {checkpoint.model_config.model!r} baseline checkpoint; "
                           "expected a DMM model.pt (the runtime and export serve DMM only); evaluate baselines "
                           "with 'python cli.py eval --checkpoint PATH'")
        checkpoint.model.set_scan_impl("loop")
        self.checkpoint = checkpoint
        self._model = checkpoint.model.eval()
        self._torch = torch
        self.provider = "torch-cpu"
        return build_manifest(checkpoint, mode=self.mode)

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        previous_threads = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(int(self.threads))
        try:
            with torch.inference_mode():
                inputs = {name: torch.from_numpy(array) for name, array in feeds.items()}
                if self.mode == "window":
                    states, actions, rtg = inputs["states"], inputs["actions"], inputs["rtg"]
                    predicted = self._model(states, actions, rtg)  # (B, K, Adim)
                    return {"action": predicted[:, -1].numpy()}  # (B, Adim), at the last state token
                action, dsm_cache, ssm_state = self._model.env_step(**inputs)
                return {"action": action.numpy(), "dsm_cache_next": dsm_cache.numpy(),  # (B, Adim), caches
                        "ssm_state_next": ssm_state.numpy()}
        finally:
            torch.set_num_threads(previous_threads)

    def _close(self) -> None:
        self._model = None
        self.checkpoint = None

