"""PyTorch backend: the reference every exported engine is compared with.

It runs the plain model of `dmm_train.model` from a model.pt, behind the same graph
I/O contract as the exported graphs (`contract.manifest`), with a manifest built from
the checkpoint by `dmm_train.manifest_builder.build_manifest`:

- window: ``model(states, actions, rtg)[:, -1]``, the official sliding-window form;
- stream: ``model.step`` once per token over a_{t-1} (skipped where
  prev_action_valid == 0), R_t, s_t, and the action read at s_t.

It uses the loop selective scan (the slow, obviously-correct reference;
docs/design.md#reference-implementations), so it needs no C compiler and checks the fast
paths rather than sharing them. torch is imported in ``load``: importing this module costs
nothing. On a CUDA device (``device="cuda"``), optionally with CUDA-graph replay, it is also
the GPU path of a machine without TensorRT (bench/gpu_check.sh).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from contract.errors import DMMError
from contract.manifest import MODES, Manifest
from runtime.backend import Backend

TORCH_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class TorchBackend(Backend):
    """A model.pt run by PyTorch. mode: "window" or "stream".

    threads: torch's intra-op threads while this backend runs (set and restored around
    each call, which is cheap, so the process's own setting is untouched; None: torch's
    setting). `load_backend` passes 1: batch-1 tensors of width 64 gain nothing from
    threads, and OpenMP barriers on a busy machine make steps far slower
    (BENCHMARKS.md#design-measurements).

    device: "cpu" (default), "cuda" or "cuda:N": the GPU path for a machine without TensorRT.
    cuda_graph (CUDA only): each step replays a CUDA graph of the model captured once after
    warm-up (`torch.cuda.CUDAGraph`) on static input tensors the feeds are copied into; in
    stream mode two graphs, with and without the a_{t-1} token (the step's only branch, decided
    on the host from the feed, `DecisionMetaMamba.env_step`'s ``rows_valid``).
    """

    name = "torch"

    def __init__(self, path: str | Path, *, mode: str = "window", threads: int | None = None, device: str = "cpu",
                 cuda_graph: bool = False):
        super().__init__(path)
        if mode not in MODES:
            raise DMMError(f"mode {mode!r}", f"one of {', '.join(MODES)}", f"pass --mode {MODES[0]} or {MODES[-1]}")
        if not isinstance(device, str) or not TORCH_DEVICE.match(device):
            raise DMMError(f"device {device!r}", "cpu, cuda or cuda:N", "pass --device cpu, cuda or cuda:N")
        if cuda_graph and not device.startswith("cuda"):
            raise DMMError(f"cuda_graph with device {device!r}: CUDA-graph replay needs a CUDA device",
                           "device cuda or cuda:N", "pass --device cuda, or leave --cuda-graph out")
        self.mode = mode
        self.threads = threads
        self.device = device
        self.cuda_graph = bool(cuda_graph)
        self.checkpoint = None
        self._model = None
        self._torch = None
        self._static: dict = {}  # CUDA graphs: the input tensors each graph reads
        self._graphs: dict = {}  # key -> (graph, output tensors)

    def _load(self) -> Manifest:
        try:
            import torch
        except ImportError:
            raise DMMError(f"engine {str(self.path)!r}: a PyTorch checkpoint, and torch is not installed",
                           "torch installed to run a checkpoint",
                           "install torch, or run an exported .onnx / .plan") from None
        from dmm_train.checkpoint import load_checkpoint
        from dmm_train.manifest_builder import build_manifest

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise DMMError(f"device {self.device!r}: torch {torch.__version__} sees no CUDA GPU (a CPU build of "
                           "torch, or no NVIDIA driver)", "a CUDA GPU torch can use",
                           "install a CUDA build of torch on the GPU machine, or use --device cpu")
        checkpoint = load_checkpoint(self.path)
        if checkpoint.model_config.model != "dmm":  # the runtime's window/stream contract is DMM's
            raise DMMError(f"engine {str(self.path)!r} is a {checkpoint.model_config.model!r} baseline checkpoint",
                           "a DMM model.pt (the runtime and export serve DMM only)",
                           "evaluate baselines with 'python cli.py eval --checkpoint PATH'")
        checkpoint.model.set_scan_impl("loop")
        self.checkpoint = checkpoint
        self._model = checkpoint.model.eval().to(self.device)
        self._torch = torch
        manifest = build_manifest(checkpoint, mode=self.mode)
        if self.device == "cpu":
            self.provider = "torch-cpu"
        else:
            self.provider = (f"torch-{self.device} ({torch.cuda.get_device_name(torch.device(self.device))})"
                             + (" (CUDA graph)" if self.cuda_graph else ""))
        if self.cuda_graph:
            self._static = {spec.name: torch.zeros(spec.shape, dtype=torch.float32, device=self.device)
                            for spec in manifest.inputs}
        return manifest

    def _forward(self, inputs: dict, rows_valid: bool | None = None) -> dict:
        """The graph contract's outputs (device tensors) from its inputs (device tensors)."""
        if self.mode == "window":
            predicted = self._model(inputs["states"], inputs["actions"], inputs["rtg"])  # (B, K, Adim)
            return {"action": predicted[:, -1]}  # (B, Adim), at the last state token
        action, dsm_cache, ssm_state = self._model.env_step(**inputs, rows_valid=rows_valid)
        return {"action": action, "dsm_cache_next": dsm_cache, "ssm_state_next": ssm_state}  # (B, Adim), caches

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        if self.cuda_graph:
            return self._replay(feeds)
        previous_threads = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(int(self.threads))
        try:
            with torch.inference_mode():
                inputs = {name: torch.from_numpy(array).to(self.device) for name, array in feeds.items()}
                return {name: value.cpu().numpy() for name, value in self._forward(inputs).items()}
        finally:
            torch.set_num_threads(previous_threads)

    def _replay(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        key = "window" if self.mode == "window" else bool((feeds["prev_action_valid"] > 0.5).any())
        with torch.no_grad():
            for name, array in feeds.items():
                self._static[name].copy_(torch.from_numpy(array))
            if key not in self._graphs:
                self._graphs[key] = self._capture(None if key == "window" else key)
            graph, outputs = self._graphs[key]
            graph.replay()
            return {name: value.cpu().numpy() for name, value in outputs.items()}  # .cpu() waits for the replay

    def _capture(self, rows_valid: bool | None):
        """A CUDA graph of one forward on the static inputs, after warm-up runs on a side stream (the
        allocations and kernel choices of first runs must not be captured)."""
        torch = self._torch
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._forward(self._static, rows_valid)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._forward(self._static, rows_valid)
        return graph, outputs

    def _close(self) -> None:
        self._graphs.clear()
        self._static.clear()
        self._model = None
        self.checkpoint = None
