"""`load_backend`: open an engine file with the backend its type calls for.

    suffix   backend                             heavy import (lazy)
    .plan    runtime.trt_backend.TrtBackend      tensorrt, pycuda   (built on the target GPU)
    .onnx    runtime.ort_backend.OrtBackend      onnxruntime
    .pt      runtime.torch_backend.TorchBackend  torch (the reference; not on the robot)
    .c       runtime.native_backend.NativeBackend  a C compiler, on first use (export --target c)

Each backend module imports `runtime.backend` (the shared shape); this module imports
them (their heavy libraries stay lazy), and nothing imports it back.
"""

from __future__ import annotations

from pathlib import Path

from contract.errors import DMMError
from contract.manifest import MODES, complete_export
from runtime.backend import DEFAULT_THREADS, Backend
from runtime.native_backend import NativeBackend
from runtime.ort_backend import OrtBackend
from runtime.torch_backend import TorchBackend
from runtime.trt_backend import TrtBackend

ENGINE_SUFFIXES = (".plan", ".onnx", ".pt", ".c")


def load_backend(path: str | Path, mode: str | None = None, *, provider: str | None = None,
                 threads: int | None = DEFAULT_THREADS, cuda_graph: bool = False,
                 device: str | None = None) -> Backend:
    """Open the engine at ``path`` with the backend its file type calls for, loaded and checked.

    mode: only for a .pt checkpoint ("window" by default); an exported engine has its
    mode in its manifest, and asking for another one is an error.
    provider: ONNX Runtime execution provider for a .onnx ("cpu" by default, "cuda",
    "tensorrt" or "auto"; the one actually in use is asserted).
    threads: intra-op threads of ONNX Runtime / torch (None: the library's default).
    cuda_graph: replay a .plan's enqueue as a CUDA graph (needs cuda-python), or a .pt's step
    on a CUDA device (torch.cuda.CUDAGraph).
    device: a .pt's torch device ("cpu" by default, "cuda", "cuda:N"); a .plan's CUDA device
    index ("0" by default, or "cuda:N"); a .onnx takes a provider instead.
    """
    path = Path(path)
    if path.is_dir() and (path / "model.pt").is_file():
        path = path / "model.pt"  # a training run directory, as 'cli.py eval' accepts
    # An export killed between its renames left a committed set: finish it, so that the engine and its
    # manifest are the complete new export (not a new graph missing, or beside the old manifest).
    complete_export(path.parent)
    suffix = path.suffix.lower()
    if mode is not None and mode not in MODES:
        raise DMMError(f"mode {mode!r}", f"one of {', '.join(MODES)}", f"pass --mode {MODES[0]} or {MODES[-1]}")
    if suffix not in ENGINE_SUFFIXES:
        raise DMMError(f"unknown engine file type {path.suffix or '(none)'!r} of {str(path)!r}",
                       ".plan (TensorRT), .onnx (ONNX Runtime), .c (export --target c) or .pt (PyTorch checkpoint)",
                       "pass the path of an exported engine or a checkpoint")
    if provider is not None and suffix != ".onnx" and not (suffix in (".pt", ".c") and provider == "cpu"):
        raise DMMError(f"provider {provider!r} for a {suffix} engine",
                       "no provider (execution providers choose how ONNX Runtime runs a .onnx)",
                       "leave the provider out for this engine")
    if device is not None and suffix == ".onnx":
        raise DMMError(f"--device {device!r} for a .onnx engine",
                       "no --device (ONNX Runtime picks its device by execution provider)",
                       "pass --provider cuda (or tensorrt) instead")
    if cuda_graph and suffix == ".onnx":
        raise DMMError(f"--cuda-graph for a {suffix} engine",
                       "a .plan (TensorRT) or a .pt on a CUDA device (.pt --device cuda) for CUDA-graph replay",
                       "leave --cuda-graph out, or run the .plan")
    if cuda_graph and suffix == ".pt" and not str(device or "cpu").startswith("cuda"):
        raise DMMError(f"--cuda-graph for a .pt engine on {device or 'cpu'}",
                       "a CUDA device for CUDA-graph replay of the PyTorch backend",
                       "leave --cuda-graph out, or pass --device cuda")
    if suffix == ".plan":
        backend = _trt_backend(path, cuda_graph=cuda_graph, device=_cuda_index(device))
    elif suffix == ".onnx":
        backend = OrtBackend(path, provider=provider or "cpu", threads=threads)
    elif suffix == ".c":
        backend = NativeBackend(path)  # single-threaded by design: ``threads`` does not apply
    else:
        backend = TorchBackend(path, mode=mode or "window", threads=threads, device=device or "cpu",
                               cuda_graph=cuda_graph)
    backend.load()
    if mode is not None and backend.manifest.mode != mode:
        received = backend.manifest.mode
        backend.close()
        raise DMMError(f"mode {mode!r} for engine {str(path)!r}, which is a {received} graph",
                       f"{received} (the engine's own mode)",
                       "leave --mode out for an exported engine, or export the other mode")
    return backend


def _cuda_index(device: str | None) -> int:
    """A .plan's device: None -> 0, "1" or "cuda:1" -> 1."""
    text = str(device or "0").removeprefix("cuda:")
    if not text.isdigit():
        raise DMMError(f"--device {device!r} for a .plan", "a CUDA device index (0, 1, ...) or cuda:N",
                       "pass --device 0 (or another index), or leave it out")
    return int(text)


def _trt_backend(path: Path, cuda_graph: bool = False, device: int = 0) -> Backend:
    """The TensorRT backend. Its ``load`` checks the plan against its manifest (sha256), then the
    installed TensorRT and the GPU against the ones the plan was built with, before deserialising;
    where tensorrt or pycuda is missing it says what to install (`runtime.trt_backend`).
    """
    return TrtBackend(path, cuda_graph=cuda_graph, device=device)
