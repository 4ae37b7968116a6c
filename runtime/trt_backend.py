"""TensorRT backend: a .plan run with tensorrt + pycuda, checked against its manifest before the first step.

Importing this module imports neither tensorrt nor pycuda (both are imported in ``load``),
so the runtime stays importable on a machine without them, and asking for a plan there
says what to install.

Before anything is deserialised, ``load`` checks, in this order (each failure is one
DMMError saying what was received, what was expected and what to do):
1. the plan exists and its manifest NAME.plan.json is a plan manifest (``engine`` record);
2. the plan's sha256 is the one the manifest records (a truncated, damaged or foreign
   .plan is refused here, without TensorRT being involved);
3. tensorrt imports, and its version is the one the plan was built with (plans are not
   portable across TensorRT versions: "Version tag does not match");
4. pycuda imports and a CUDA GPU answers, and it is the GPU (name, compute capability)
   the plan was built on ("plan file is generated on an incompatible device");
5. the deserialised engine's I/O (names, shapes, dtypes) is the manifest's.

Execution (docs/deployment.md#running-an-engine): TensorRT 10's name-based API (set_tensor_address
+ execute_async_v3) on one non-default pycuda stream in the device's *primary* context
(pycuda.autoprimaryctx, which coexists with other CUDA users in the process; autoinit
would create a second context); pinned host buffers for every I/O tensor.

Stream-mode caches live on the device in two buffers per cache, A and B: a step reads
A and writes B, the next one reads B and writes A (the tensor addresses are swapped
after every step). One buffer is never bound as both input and output (TensorRT gives
wrong results then). The `Backend` contract still holds: ``infer`` returns the new
caches to the caller (`runtime.Policy` feeds them back); when the caches fed are
bitwise the ones the device already holds, nothing is uploaded, so in the control loop
the caches cross host -> device only after ``reset`` (which zeroes both buffers) or when
a caller feeds other caches. They still come back device -> host every step (16 KB at
the Hopper preset) because the contract returns them.

Optional CUDA graph (``cuda_graph=True``, needs cuda-python): the enqueue is captured
once per binding set (one graph in window mode, one per buffer parity in stream mode:
a graph bakes in the tensor addresses) after a first uncaptured run, and replayed with
cudaGraphLaunch on the same stream; the host <-> device copies stay outside the graph.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from contract.errors import DMMError
from contract.manifest import STREAM_CACHE_PAIRS, Manifest, manifest_path_for, read_manifest
from runtime.backend import Backend
from runtime.tensorrt_support import (
    INSTALL_HINT,
    REBUILD_HINT,
    GpuIdentity,
    capturing_logger,
    check_io,
    check_plan_bytes,
    check_plan_manifest,
    check_plan_target,
    engine_io,
    import_tensorrt,
    logged_errors,
)


class TrtBackend(Backend):
    """A .plan with its NAME.plan.json, run by TensorRT on the GPU (see the module docstring).

    cuda_graph: capture the enqueue into CUDA graphs (needs cuda-python). device: the CUDA
    device the primary context is taken on (pycuda.autoprimaryctx honours CUDA_DEVICE;
    choose GPUs with CUDA_VISIBLE_DEVICES).
    """

    name = "trt"

    def __init__(self, path: str | Path, *, cuda_graph: bool = False, manifest_path: str | Path | None = None):
        super().__init__(path)
        self.cuda_graph = bool(cuda_graph)
        self.manifest_path = Path(manifest_path) if manifest_path else manifest_path_for(self.path)
        self._trt = self._cuda = None
        self._runtime = self._engine = self._context = self._stream = None
        self._host: dict[str, np.ndarray] = {}  # pinned host buffer per I/O tensor
        self._device: dict[str, object] = {}  # device buffer per I/O tensor (caches: buffer A)
        self._spare: dict[str, object] = {}  # stream mode: buffer B per cache pair, keyed by the input name
        self._resident: dict[str, np.ndarray] = {}  # stream mode: what the current cache input buffer holds
        self._parity = 0
        self._graphs: dict[int, tuple] = {}
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._cache_input_of: dict[str, str] = {}  # stream mode: cache output -> the input it feeds

    # -- load -----------------------------------------------------------------------------

    def _load(self) -> Manifest:
        source = f"engine {str(self.path)!r}"
        if not self.path.is_file():
            raise DMMError(f"{source} does not exist; expected a TensorRT plan built by 'cli.py build' (or "
                           "'cli.py export' where TensorRT and a GPU are present); build it on the target GPU")
        manifest = read_manifest(self.manifest_path)
        engine_record = check_plan_manifest(source, manifest)
        plan = self.path.read_bytes()
        check_plan_bytes(source, engine_record, plan)

        trt = import_tensorrt(f"{source} is a TensorRT plan; running it")
        cuda = self._import_pycuda(source)
        if self.cuda_graph and importlib.util.find_spec("cuda") is None:
            raise DMMError(f"{source}: cuda_graph=True needs cuda-python, which is not installed; pip install "
                           "'dmm-deploy[gpu]', or run without CUDA graphs")
        gpu = self._context_gpu(cuda)
        check_plan_target(source, engine_record, tensorrt_version=trt.__version__, gpu=gpu)

        logger = capturing_logger(trt)
        logger.messages.clear()
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise DMMError(f"{source}: TensorRT could not deserialise the plan ({logged_errors(logger)}); "
                           f"{REBUILD_HINT}")
        check_io(source, manifest, engine_io(trt, engine))
        context = engine.create_execution_context()
        if context is None:
            raise DMMError(f"{source}: TensorRT could not create an execution context ({logged_errors(logger)}); "
                           "expected enough free GPU memory; close other GPU users and retry")
        self._trt, self._cuda = trt, cuda
        self._runtime, self._engine, self._context = runtime, engine, context
        self._stream = cuda.Stream()
        self._allocate(manifest)
        self.provider = f"TensorRT {trt.__version__} on {gpu.name}" + (" (CUDA graph)" if self.cuda_graph else "")
        return manifest

    @staticmethod
    def _import_pycuda(source: str):
        if importlib.util.find_spec("pycuda") is None:
            raise DMMError(f"{source}: running a plan needs pycuda, which is not installed; {INSTALL_HINT}")
        try:
            import pycuda.driver as cuda
        except (ImportError, OSError) as error:  # built against a CUDA that is not here
            raise DMMError(f"{source}: pycuda does not import ({error}); expected pycuda built for this CUDA; "
                           f"{INSTALL_HINT}") from None
        try:
            # The primary context (shared with TensorRT's own runtime-API use and any other CUDA
            # user in the process); pycuda.autoinit would push a second, private context.
            import pycuda.autoprimaryctx  # noqa: F401
        except (cuda.Error, RuntimeError) as error:  # pycuda's errors; RuntimeError: no device at all
            raise DMMError(f"{source}: no usable CUDA GPU here (pycuda: {type(error).__name__}: {error}); expected "
                           "an NVIDIA GPU with its driver; run the .onnx with ONNX Runtime on this machine") from None
        return cuda

    @staticmethod
    def _context_gpu(cuda) -> GpuIdentity:
        device = cuda.Context.get_device()
        major, minor = device.compute_capability()
        return GpuIdentity(device.name().strip(), f"{major}.{minor}")

    def _allocate(self, manifest: Manifest) -> None:
        cuda, context = self._cuda, self._context
        self._inputs = [spec.name for spec in manifest.inputs]
        self._outputs = [spec.name for spec in manifest.outputs]
        for spec in (*manifest.inputs, *manifest.outputs):
            host = cuda.pagelocked_empty(spec.shape, np.dtype(spec.dtype))  # pinned: async copies, no staging
            host.fill(0)
            self._host[spec.name] = host
            self._device[spec.name] = cuda.mem_alloc(host.nbytes)
        if manifest.mode == "stream":
            self._cache_input_of = dict(STREAM_CACHE_PAIRS)
            for _, input_name in STREAM_CACHE_PAIRS:
                self._spare[input_name] = cuda.mem_alloc(self._host[input_name].nbytes)
        for name in (*self._inputs, *self._outputs):
            context.set_tensor_address(name, int(self._device[name]))
        self._zero_caches()

    # -- run ------------------------------------------------------------------------------

    def _cache_buffers(self, input_name: str, parity: int) -> tuple[object, object]:
        """(input buffer, output buffer) of a cache pair at ``parity``: A -> B on even steps, B -> A on odd."""
        first, second = self._device[input_name], self._spare[input_name]
        return (first, second) if parity == 0 else (second, first)

    def _bind_caches(self) -> None:
        for output_name, input_name in STREAM_CACHE_PAIRS:
            read, write = self._cache_buffers(input_name, self._parity)
            self._context.set_tensor_address(input_name, int(read))
            self._context.set_tensor_address(output_name, int(write))

    def _zero_caches(self) -> None:
        if not self._spare:
            return
        cuda = self._cuda
        self._parity = 0
        self._bind_caches()
        for _, input_name in STREAM_CACHE_PAIRS:
            nbytes = self._host[input_name].nbytes
            cuda.memset_d8(self._device[input_name], 0, nbytes)  # count is bytes for d8
            cuda.memset_d8(self._spare[input_name], 0, nbytes)
            self._resident[input_name] = np.zeros_like(self._host[input_name])

    def reset(self) -> None:
        """Episode start: both cache buffers zeroed on the device (stream mode)."""
        if self.loaded:
            self._stream.synchronize()
            self._zero_caches()

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, stream = self._cuda, self._stream
        for name in self._inputs:
            if name in self._resident:
                if np.array_equal(feeds[name], self._resident[name]):
                    continue  # the device already holds exactly these caches: no upload
                read, _ = self._cache_buffers(name, self._parity)
                np.copyto(self._host[name], feeds[name])
                cuda.memcpy_htod_async(read, self._host[name], stream)
                self._resident[name] = np.array(feeds[name], copy=True)
                continue
            np.copyto(self._host[name], feeds[name])
            cuda.memcpy_htod_async(self._device[name], self._host[name], stream)
        self._enqueue()
        for name in self._outputs:
            if name in self._cache_input_of:
                _, write = self._cache_buffers(self._cache_input_of[name], self._parity)
                cuda.memcpy_dtoh_async(self._host[name], write, stream)
            else:
                cuda.memcpy_dtoh_async(self._host[name], self._device[name], stream)
        stream.synchronize()
        outputs = {name: self._host[name].copy() for name in self._outputs}  # the caller's, free to change
        if self._spare:
            # The buffers just written become the next step's inputs; what they hold is the pinned
            # host copy just read back (a view, valid until the next read-back, which comes after
            # the comparison in the next call).
            for output_name, input_name in STREAM_CACHE_PAIRS:
                self._resident[input_name] = self._host[output_name]
            self._parity ^= 1
            self._bind_caches()
        return outputs

    def _enqueue(self) -> None:
        if self.cuda_graph:
            graph = self._graphs.get(self._parity)
            if graph is None:
                graph = self._graphs[self._parity] = self._capture()
            cudart = graph[0]
            self._check_cuda(cudart.cudaGraphLaunch(graph[2], self._stream.handle), "cudaGraphLaunch")
            return
        if not self._context.execute_async_v3(self._stream.handle):
            logger = capturing_logger(self._trt)
            raise DMMError(f"engine {str(self.path)!r}: execute_async_v3 failed ({logged_errors(logger)}); "
                           "expected a plan built for this GPU; rebuild it")

    def _capture(self) -> tuple:
        """A CUDA graph of one enqueue with the current tensor addresses (after one uncaptured run)."""
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        stream = self._stream.handle
        # Run once outside the capture: first enqueues allocate and initialise, which must not be captured.
        if not self._context.execute_async_v3(stream):
            raise DMMError(f"engine {str(self.path)!r}: execute_async_v3 failed before the CUDA graph capture")
        self._stream.synchronize()
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check_cuda(cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
        enqueued = self._context.execute_async_v3(stream)
        error, graph = cudart.cudaStreamEndCapture(stream)
        if not enqueued:
            raise DMMError(f"engine {str(self.path)!r}: this engine cannot be captured into a CUDA graph (its "
                           "enqueue failed during capture); run it without cuda_graph")
        self._check_cuda((error,), "cudaStreamEndCapture")
        error, executable = cudart.cudaGraphInstantiateWithFlags(graph, 0)
        self._check_cuda((error,), "cudaGraphInstantiateWithFlags")
        return cudart, graph, executable

    @staticmethod
    def _check_cuda(result, call: str) -> None:
        error = result[0] if isinstance(result, tuple) else result
        if int(error) != 0:
            raise DMMError(f"{call} failed ({error}); expected a working CUDA driver; run without cuda_graph")

    # -- close ----------------------------------------------------------------------------

    def _close(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        for cudart, graph, executable in self._graphs.values():
            cudart.cudaGraphExecDestroy(executable)
            cudart.cudaGraphDestroy(graph)
        self._graphs.clear()
        # TensorRT objects before the memory they point at, all before the context goes at exit.
        self._context = self._engine = self._runtime = None
        for buffer in (*self._device.values(), *self._spare.values()):
            buffer.free()
        self._device.clear()
        self._spare.clear()
        self._host.clear()
        self._resident.clear()
        self._stream = None
