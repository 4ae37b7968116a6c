"""ONNX Runtime backend: CPU by default, CUDA / TensorRT execution providers on request.

ONNX Runtime does not fail when a requested GPU provider cannot start (a missing
libcublas, no GPU): it logs and runs on the CPU (docs/deployment.md#onnx-runtime-providers). So the
provider actually in use, ``session.get_providers()``, is asserted after the session is
built, and a request that fell back is a DMMError, never a silently slower policy.

On the CPU provider a call goes through IO binding: the outputs are written into buffers
the backend owns (reused by the next call, as the `Backend` contract allows; `Policy`
copies what it keeps), and the inputs are bound by address, rebound only when the caller
passes other arrays. Against ``session.run``, which allocates every output and converts
every input each call, this saves the per-call allocations and conversions
(bench/step_latency.py measures the step). An input that is one of the backend's
own output buffers is copied first: a buffer bound as input and output of one run would be
read while it is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from contract.errors import DMMError, describe_error
from contract.files import sha256_file
from contract.manifest import Manifest, manifest_path_for, read_manifest
from runtime.backend import Backend, check_engine_io

# Requested provider -> ONNX Runtime's provider list, best first; the first one must end up in use.
PROVIDER_CHAINS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
PROVIDERS = (*PROVIDER_CHAINS, "auto")
GPU_PACKAGE_HINT = ("install onnxruntime-gpu (in place of onnxruntime, as they share the import name) with the "
                    "CUDA/cuDNN (and TensorRT) libraries it was built for, or use provider 'cpu'")

# ONNX Runtime's type strings -> numpy dtype names, as the manifest writes them.
ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool",
}


def session_options(*, threads: int | None = 1, optimize: bool = True, optimized_model_path=None):
    """ONNX Runtime session options of the project: errors-only logging, ``threads`` intra- and
    inter-op threads (None: ORT's default), and ``optimize`` False for ORT_DISABLE_ALL (Q/DQ as
    fake-quant, casts as written)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a failed GPU provider is reported as a DMMError
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = int(threads)
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


def cpu_session(model: bytes | str | Path, *, threads: int | None = 1, optimize: bool = True,
                optimized_model_path=None):
    """A CPU ``onnxruntime.InferenceSession`` of serialized bytes or a path (see `session_options`)."""
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"], sess_options=session_options(
        threads=threads, optimize=optimize, optimized_model_path=optimized_model_path))


class OrtBackend(Backend):
    """A graph of the I/O contract, run by an ``onnxruntime.InferenceSession``.

    source: a .onnx path (its manifest: the .json beside it, or ``manifest_path``), or the
    serialized graph as bytes with its ``manifest`` (an export's candidate graph, before
    anything is written; ``label`` names it in messages). provider: "cpu" (default),
    "cuda", "tensorrt" (asserted in use) or "auto" (the best one that starts, reported in
    ``provider``). threads: intra-op threads (None: ORT's default). optimize: None picks
    by precision (int8 runs without graph optimisations on the CPU, see below), True/False
    forces it.
    """

    name = "ort"

    def __init__(self, source: str | Path | bytes, *, provider: str = "cpu", threads: int | None = None,
                 manifest_path: str | Path | None = None, manifest: Manifest | None = None,
                 optimize: bool | None = None, label: str = "in-memory graph"):
        self._bytes = bytes(source) if isinstance(source, (bytes, bytearray)) else None
        if self._bytes is not None and manifest is None:
            raise DMMError("OrtBackend: serialized graph bytes without a manifest", "manifest=... with graph bytes",
                           "pass the manifest the graph was built for")
        super().__init__(label if self._bytes is not None else source)
        if provider not in PROVIDERS:
            raise DMMError(f"provider {provider!r}", f"one of {', '.join(PROVIDERS)}",
                           "pass provider 'cpu' (or another of them)")
        self.requested_provider = provider
        self.threads = threads
        self.optimize = optimize
        self._given_manifest = manifest
        self.manifest_path = None
        if self._bytes is None and manifest is None:
            self.manifest_path = Path(manifest_path) if manifest_path else manifest_path_for(self.path)
        self._session = None
        self._output_names: list[str] = []
        self._binding = None  # IO binding on the CPU provider (None: session.run)
        self._outputs: dict[str, np.ndarray] = {}
        self._bound: dict[str, np.ndarray] = {}  # the input arrays the binding points at

    def _load(self) -> Manifest:
        import onnxruntime as ort

        in_memory = self._bytes is not None
        source = f"graph {self.path}" if in_memory else f"engine {str(self.path)!r}"
        if not in_memory and not self.path.is_file():
            raise DMMError(f"{source} does not exist", "a .onnx written by 'cli.py export'",
                           "export the checkpoint or fix the path")
        manifest = self._given_manifest or read_manifest(self.manifest_path)

        available = ort.get_available_providers()
        if self.requested_provider == "auto":
            chain = next(c for key in ("tensorrt", "cuda", "cpu")
                         if (c := PROVIDER_CHAINS[key])[0] in available)
        else:
            chain = PROVIDER_CHAINS[self.requested_provider]
            if chain[0] not in available:
                raise DMMError(f"provider {self.requested_provider!r}: this onnxruntime offers {', '.join(available)}",
                               f"an onnxruntime with {chain[0]}", GPU_PACKAGE_HINT)
        optimize = self.optimize
        if optimize is None:
            # ORT's CPU optimiser fuses DQ -> MatMul -> Q into integer kernels whose u8s8 path
            # saturates on CPUs without VNNI; without fusion Q/DQ run as fake-quant in float, which
            # is what the export's accuracy report measured and what TensorRT's int8 approximates.
            optimize = not (manifest.precision == "int8" and chain[0] == "CPUExecutionProvider")
        options = session_options(threads=self.threads, optimize=optimize)
        try:
            session = ort.InferenceSession(self._bytes if in_memory else str(self.path), sess_options=options,
                                           providers=list(chain))
        except Exception as error:  # ORT raises several pybind types (InvalidProtobuf, Fail, ...)
            raise DMMError(f"{source} could not be loaded by ONNX Runtime ({describe_error(error)})",
                           "a .onnx written by 'cli.py export'", "re-export it") from None

        in_use = session.get_providers()
        if self.requested_provider != "auto" and chain[0] not in in_use:
            raise DMMError(f"provider {chain[0]} requested: ONNX Runtime runs on {', '.join(in_use)} (it falls "
                           "back silently when a GPU provider cannot start)", f"{chain[0]} in use", GPU_PACKAGE_HINT)
        self.provider = in_use[0]

        def graph_io(args):
            return [(a.name, tuple(a.shape), ORT_DTYPES.get(a.type, a.type)) for a in args]

        check_engine_io(source, manifest, "input", graph_io(session.get_inputs()))
        check_engine_io(source, manifest, "output", graph_io(session.get_outputs()))
        if not in_memory and manifest.onnx_sha256 and manifest.onnx_sha256 != sha256_file(self.path):
            raise DMMError(f"{source}: sha256 {sha256_file(self.path)[:12]}...",
                           f"the manifest's {manifest.onnx_sha256[:12]}... (the graph was changed after export or "
                           "the manifest belongs to another export)", "re-export")
        self._session = session
        self._output_names = [spec.name for spec in manifest.outputs]
        if self.provider == "CPUExecutionProvider":
            self._binding = session.io_binding()
            self._outputs = {spec.name: np.zeros(spec.shape, dtype=np.float32) for spec in manifest.outputs}
            for name, buffer in self._outputs.items():
                self._binding.bind_output(name, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
            self._bound = {}
        return manifest

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._binding is None:
            outputs = self._session.run(self._output_names, dict(feeds))
            return dict(zip(self._output_names, outputs, strict=True))
        for name, array in feeds.items():
            if self._bound.get(name) is array:
                continue  # the same array as last call, read afresh through its address
            if not array.flags.c_contiguous or any(np.shares_memory(array, out) for out in self._outputs.values()):
                # An owned copy, kept alive in _bound while bound; the caller never passes this
                # object, so the next call binds whatever it passes then.
                array = np.array(array, dtype=np.float32, order="C")
            self._bound[name] = array
            self._binding.bind_input(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        self._session.run_with_iobinding(self._binding)
        return self._outputs

    def _close(self) -> None:
        self._session = None
        self._binding = None
        self._outputs = {}
        self._bound = {}
