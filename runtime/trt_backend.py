"""TensorRT backend: a .plan run with tensorrt + pycuda, checked against its manifest before the first step.

Importing this module imports neither tensorrt nor pycuda (both are imported in ``load``), so the
runtime stays importable on a machine without them, and asking for a plan there says what to
install. ``load`` refuses, before anything is deserialised, a plan without its manifest, with another
sha256, another TensorRT version or another GPU, or with other I/O: plans are not portable, and
TensorRT's own failures there are cryptic. Checks, execution, device-resident caches and CUDA graphs:
docs/deployment.md#running-an-engine.
"""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from contract.errors import DMMError
from contract.manifest import STREAM_CACHE_PAIRS, Manifest, manifest_path_for, read_manifest
from runtime.backend import Backend, check_feeds
from runtime.cuda_support import (
    INSTALL_HINT,
    CudaUnavailable,
    DeviceBuffers,
    PrimaryContext,
    first_line,
    import_cudart,
    import_pycuda,
)
from runtime.tensorrt_support import (
    REBUILD_HINT,
    GpuIdentity,
    capturing_logger,
    check_io,
    check_plan_bytes,
    check_plan_manifest,
    check_plan_target,
    create_runtime,
    engine_io,
    import_tensorrt,
    logged_errors,
)

if TYPE_CHECKING:  # the static check of the GPU layer (scripts/typecheck_gpu.sh) reads TensorRT's stubs
    import tensorrt

# Backends loaded and not closed yet: closed at interpreter exit, before the CUDA context goes.
_OPEN: weakref.WeakSet = weakref.WeakSet()
_EXIT_HOOK_REGISTERED = False


def _close_open_backends() -> None:
    for backend in list(_OPEN):
        try:
            backend.close()
        except Exception:  # at exit there is no caller left to report a failed free to
            pass


def _register_for_exit(backend: TrtBackend) -> None:
    """atexit handlers run last-registered first: registered after pycuda's import, this one closes the
    open backends before any handler pycuda set up at import time tears its context state down."""
    global _EXIT_HOOK_REGISTERED
    if not _EXIT_HOOK_REGISTERED:
        atexit.register(_close_open_backends)
        _EXIT_HOOK_REGISTERED = True
    _OPEN.add(backend)


def adopt_hint(plan: Path) -> str:
    return (f"adopt a plan built by trtexec (or any tool but 'cli.py build') on this GPU with "
            f"'python cli.py adopt {plan} --onnx {plan.with_suffix('.onnx')}' (the ONNX's manifest "
            f"{plan.with_suffix('.json').name} beside it), or build it with 'python cli.py build "
            f"{plan.with_suffix('.onnx')}'")


class TrtBackend(Backend):
    """A .plan with its NAME.plan.json, run by TensorRT on the GPU (see the module docstring).

    cuda_graph: capture the enqueue into CUDA graphs (needs cuda-python). device: the CUDA device
    whose primary context runs the plan (it must be the GPU the plan was built on).
    """

    name = "trt"

    def __init__(self, path: str | Path, *, cuda_graph: bool = False, manifest_path: str | Path | None = None,
                 device: int = 0):
        super().__init__(path)
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise DMMError(f"device {device!r}", "a CUDA device index (0, 1, ...)",
                           "pass device 0 (or another index)")
        self.cuda_graph = bool(cuda_graph)
        self.device = device
        self.manifest_path = Path(manifest_path) if manifest_path else manifest_path_for(self.path)
        self.warnings: list[str] = []
        self.graph_launches = 0
        self._cuda = self._cudart = None
        self._gpu: PrimaryContext | None = None
        self._runtime: tensorrt.Runtime | None = None
        self._engine: tensorrt.ICudaEngine | None = None
        self._context: tensorrt.IExecutionContext | None = None
        self._stream = None
        self._buffers: DeviceBuffers | None = None
        self._graphs: dict[int, tuple] = {}  # parity -> (graph, executable graph)
        self._graph_failure: str | None = None

    # -- public calls: each one with the device's context current on the calling thread -----

    def load(self) -> TrtBackend:
        if self._manifest is None:
            self._manifest = self._load()
        return self

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.manifest, feeds)
        with self._current():
            return self._infer(feeds)

    def infer_prechecked(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._current():
            return self._infer(feeds)

    def reset(self) -> None:
        """Episode start: both cache buffers zeroed on the device, in stream order (stream mode)."""
        if self.loaded and self._buffers is not None and self._buffers.spare:
            with self._current():
                self._buffers.zero_caches()
                self._bind()

    def _current(self) -> PrimaryContext:
        if self._gpu is None or self._context is None or self._buffers is None:
            raise DMMError(f"engine {str(self.path)!r}: this TensorRT backend is closed (or its close failed part "
                           "way)", "a loaded backend", "load it again")
        return self._gpu

    def close(self) -> None:
        """Free everything, each part even when an earlier one fails; a failure is one DMMError after it all."""
        gpu, self._gpu = self._gpu, None
        errors: list[str] = []
        try:
            if gpu is not None:
                try:
                    with gpu:
                        self._free_parts(errors)
                except DMMError:
                    raise
                except Exception as error:  # pushing / popping the context: a driver error
                    errors.append(f"the CUDA context: {type(error).__name__}: {first_line(error)}")
                finally:
                    gpu.release()
        finally:
            # Whatever failed, nothing of this load is reachable any more: later calls say "closed".
            self._context = self._engine = self._runtime = None
            self._buffers = self._stream = None
            self._graphs.clear()
            _OPEN.discard(self)
            self._manifest = None
        if errors:
            raise DMMError(f"engine {str(self.path)!r}: closing the TensorRT backend failed ({', '.join(errors)})",
                           "a working CUDA driver", "check the driver with nvidia-smi (the backend is closed "
                           "regardless, and its GPU memory is freed at process exit)")

    # -- load -----------------------------------------------------------------------------

    def _load(self) -> Manifest:
        source = f"engine {str(self.path)!r}"
        if not self.path.is_file():
            raise DMMError(f"{source} does not exist", "a TensorRT plan built by 'cli.py build' (or 'cli.py export' "
                           "where TensorRT and a GPU are present)", "build it on the target GPU")
        if not self.manifest_path.is_file():
            raise DMMError(f"{source} has no manifest {str(self.manifest_path)!r}",
                           "the plan's manifest NAME.plan.json beside it", adopt_hint(self.path))
        manifest = read_manifest(self.manifest_path)
        if not manifest.engine:
            raise DMMError(f"{source}: its manifest {str(self.manifest_path)!r} has no TensorRT engine record (it "
                           "is an ONNX graph's)", "a plan's manifest with its engine record", adopt_hint(self.path))
        engine_record = check_plan_manifest(source, manifest)
        plan = self.path.read_bytes()
        check_plan_bytes(source, engine_record, plan)

        import_tensorrt(f"running {source} (a TensorRT plan)")
        import tensorrt as trt

        try:
            cuda = import_pycuda()
        except CudaUnavailable as why:
            raise DMMError(f"{source}: running a plan needs pycuda ({why})", "pycuda working with this GPU",
                           INSTALL_HINT) from None
        cudart = None
        if self.cuda_graph:
            try:
                cudart = import_cudart()
            except CudaUnavailable as why:
                raise DMMError(f"{source}: cuda_graph=True needs cuda-python's runtime bindings ({why})",
                               "cuda-python's runtime bindings for the driver's CUDA",
                               "pip install 'cuda-python>=12,<13' on CUDA 12 (its major version must match the "
                               "driver's CUDA), or run without CUDA graphs") from None
        try:
            gpu = PrimaryContext(cuda, self.device)
        except CudaUnavailable as why:
            raise DMMError(f"{source}: no usable CUDA GPU {self.device} here ({why})",
                           "an NVIDIA GPU with its driver", "run the .onnx with ONNX Runtime on this machine") from None
        name, capability = gpu.name_and_capability()
        check_plan_target(source, engine_record, tensorrt_version=trt.__version__, gpu=GpuIdentity(name, capability))

        self._cuda, self._cudart, self._gpu = cuda, cudart, gpu
        try:
            with gpu:
                try:
                    self._open_engine(source, manifest, plan)
                except BaseException:
                    # TensorRT objects of this failed load freed now, while the context is current, not
                    # whenever the traceback that refers to them goes.
                    self._free_parts([])
                    raise
        except BaseException:
            try:
                self.close()
            except DMMError:
                pass  # the load's own error is the one to report
            raise
        self.provider = f"TensorRT {trt.__version__} on {name}" + (" (CUDA graph)" if self.cuda_graph else "")
        _register_for_exit(self)
        return manifest

    def _open_engine(self, source: str, manifest: Manifest, plan: bytes) -> None:
        import tensorrt as trt

        logger = capturing_logger()
        logger.messages.clear()
        # Only attributes hold TensorRT objects (no locals): `_free_parts` can free them all on an error path.
        self._runtime = create_runtime(trt, logger, source)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise DMMError(f"{source}: TensorRT could not deserialise the plan ({logged_errors(logger)})",
                           f"a plan built by this TensorRT {trt.__version__}", REBUILD_HINT)
        check_io(source, manifest, engine_io(self._engine))
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise DMMError(f"{source}: TensorRT could not create an execution context ({logged_errors(logger)})",
                           "enough free GPU memory", "close other GPU users and retry")
        cuda = self._cuda
        assert cuda is not None
        self._stream = cuda.Stream()
        specs = [(spec.name, spec.shape, spec.dtype) for spec in (*manifest.inputs, *manifest.outputs)]
        pairs = STREAM_CACHE_PAIRS if manifest.mode == "stream" else ()
        self._buffers = DeviceBuffers(cuda, specs, [spec.name for spec in manifest.inputs], pairs, self._stream)
        self._buffers.zero_caches()
        self._bind()

    # -- run ------------------------------------------------------------------------------

    def _bind(self) -> None:
        assert self._buffers is not None and self._context is not None
        for name, address in self._buffers.addresses().items():
            self._context.set_tensor_address(name, address)

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        buffers = self._buffers
        assert buffers is not None
        buffers.upload(feeds)
        self._enqueue()
        outputs = buffers.download()  # the caller's, free to change
        if buffers.spare:
            buffers.advance()
            self._bind()
        return outputs

    def _enqueue(self) -> None:
        assert self._buffers is not None and self._context is not None and self._stream is not None
        if self.cuda_graph and self._graph_failure is None:
            parity = self._buffers.parity
            if parity not in self._graphs:
                captured = self._capture()
                if captured is not None:
                    self._graphs[parity] = captured
            if parity in self._graphs:
                cudart = self._cudart
                assert cudart is not None
                error = cudart.cudaGraphLaunch(self._graphs[parity][1], self._stream.handle)[0]
                if int(error) != 0:
                    raise DMMError(f"engine {str(self.path)!r}: cudaGraphLaunch returned {error}",
                                   "cudaSuccess from a working CUDA driver", "run without cuda_graph")
                self.graph_launches += 1
                return
        if not self._context.execute_async_v3(self._stream.handle):
            raise DMMError(f"engine {str(self.path)!r}: execute_async_v3 failed ({logged_errors(capturing_logger())})",
                           "a plan built for this GPU", "rebuild it: python cli.py build NAME.onnx")

    def _capture(self) -> tuple | None:
        """A CUDA graph of one enqueue with the current tensor addresses, or None (and plain execution from
        now on) when it cannot be captured. The capture is ended whatever happens inside it: a stream left
        capturing fails every later call on it, close included."""
        cudart, context, stream = self._cudart, self._context, self._stream
        assert cudart is not None and context is not None and stream is not None
        handle = stream.handle
        # One run outside the capture: first enqueues allocate and initialise, which must not be captured.
        if not context.execute_async_v3(handle):
            raise DMMError(f"engine {str(self.path)!r}: execute_async_v3 failed before the CUDA graph capture "
                           f"({logged_errors(capturing_logger())})", "a plan built for this GPU",
                           "rebuild it: python cli.py build NAME.onnx")
        stream.synchronize()
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        begun = cudart.cudaStreamBeginCapture(handle, mode)[0]
        if int(begun) != 0:
            return self._fall_back(f"cudaStreamBeginCapture returned {begun}")
        failure, graph, enqueued = None, None, False
        try:
            enqueued = context.execute_async_v3(handle)
        except Exception as error:  # any failure inside the capture means: no graph
            failure = f"execute_async_v3 raised {type(error).__name__}: {first_line(error)}"
        finally:
            ended, graph = cudart.cudaStreamEndCapture(handle)
        if failure is None and not enqueued:
            failure = f"the enqueue failed during capture ({logged_errors(capturing_logger())})"
        if failure is None and int(ended) != 0:
            failure = f"cudaStreamEndCapture returned {ended}"
        executable = None
        if failure is None:
            instantiated, executable = cudart.cudaGraphInstantiateWithFlags(graph, 0)
            if int(instantiated) != 0:
                failure = f"cudaGraphInstantiateWithFlags returned {instantiated}"
        if failure is not None:
            if graph is not None and int(graph) != 0:
                cudart.cudaGraphDestroy(graph)
            cudart.cudaGetLastError()  # clear the error the failed capture left for the next call
            return self._fall_back(failure)
        return graph, executable

    def _fall_back(self, reason: str) -> None:
        """No CUDA graphs from now on: destroy those captured, record why."""
        self._destroy_graphs()
        self._graph_failure = reason
        self.warnings.append(f"CUDA graph capture failed ({reason}); running without CUDA graphs")
        self.provider = self.provider.replace(" (CUDA graph)", " (CUDA graph capture failed: plain enqueue)")
        return None

    @property
    def graphs_in_use(self) -> int:
        """CUDA graphs captured and replayed (0 without cuda_graph, or after a failed capture)."""
        return 0 if self._graph_failure is not None else len(self._graphs)

    def _destroy_graphs(self) -> None:
        cudart = self._cudart
        if cudart is None:
            return
        for graph, executable in self._graphs.values():
            cudart.cudaGraphExecDestroy(executable)
            cudart.cudaGraphDestroy(graph)
        self._graphs.clear()

    # -- close ----------------------------------------------------------------------------

    def _close(self) -> None:  # the Backend interface; close() above is what frees a TrtBackend
        self._free_parts([])

    def _free_parts(self, errors: list[str]) -> None:
        """Free in order, every step attempted whatever the previous one did; what failed goes to ``errors``."""

        def attempt(what: str, action) -> None:
            try:
                action()
            except Exception as error:  # pycuda / cuda-python raise their own types
                errors.append(f"{what}: {type(error).__name__}: {first_line(error)}")

        stream = self._stream
        if stream is not None:
            attempt("synchronising the stream", stream.synchronize)
        if self._graphs:
            attempt("destroying the CUDA graphs", self._destroy_graphs)
            self._graphs.clear()
        # TensorRT objects before the memory they point at, all while the context is current.
        self._context = self._engine = self._runtime = None
        buffers, self._buffers = self._buffers, None
        if buffers is not None:
            attempt("freeing the device buffers", buffers.free)
        self._stream = None
