"""The TensorRT / CUDA toolkit shared by the builder (`export.trt_build`) and the backend (`runtime.trt_backend`).

Torch-free, and importing it imports neither tensorrt nor pycuda: `import_tensorrt`
does that on demand with an install hint. Here: the plan manifest's ``engine`` record
and its checks (sha256, TensorRT version, GPU), the GPU's identity, the engine's I/O as
the manifest writes it, and a TensorRT logger that keeps what it was told.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np

from contract.errors import DMMError
from contract.files import sha256_bytes
from contract.manifest import Manifest
from runtime.backend import check_engine_io

PLAN_KIND = "tensorrt-plan"
ENGINE_FIELDS = ("kind", "tensorrt_version", "gpu_name", "compute_capability", "plan_sha256", "io")
INSTALL_HINT = ("install the GPU extra where the NVIDIA GPU is (pip install 'dmm-deploy[gpu]'; on a Jetson, "
                "JetPack's TensorRT through a venv with --system-site-packages and pycuda built with the CUDA "
                "toolkit on PATH, see docs/jetson.md)")
REBUILD_HINT = "rebuild the plan on this machine: python cli.py build NAME.onnx (plans are not portable)"


@dataclass(frozen=True)
class GpuIdentity:
    """What a plan is tied to besides the TensorRT version."""

    name: str
    compute_capability: str  # "8.7"

    def describe(self) -> str:
        return f"{self.name} (compute capability {self.compute_capability})"


def import_tensorrt(purpose: str):
    """The tensorrt module, or a DMMError that says how to get it."""
    if importlib.util.find_spec("tensorrt") is None:
        raise DMMError(f"{purpose} needs the 'tensorrt' package, which is not installed; {INSTALL_HINT}; or run "
                       "the .onnx with ONNX Runtime")
    try:
        import tensorrt
    except (ImportError, OSError) as error:  # a wheel without its CUDA libraries raises at import
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DMMError(f"{purpose}: 'tensorrt' is installed but does not import ({first_line}); expected the "
                       f"TensorRT libraries for this CUDA; {INSTALL_HINT}") from None
    return tensorrt


def tensorrt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def gpu_identity(device: int = 0) -> GpuIdentity:
    """Name and compute capability of CUDA device ``device``, by cuda-python or pycuda (whichever is present).

    DMMError when neither is installed or no CUDA GPU / driver answers.
    """
    if importlib.util.find_spec("cuda") is not None:
        try:
            try:
                from cuda.bindings import runtime as cudart
            except ImportError:
                from cuda import cudart
            error, count = cudart.cudaGetDeviceCount()
            if error == cudart.cudaError_t.cudaSuccess and count > device:
                error, props = cudart.cudaGetDeviceProperties(device)
                if error == cudart.cudaError_t.cudaSuccess:
                    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
                    return GpuIdentity(name.rstrip("\x00").strip(), f"{props.major}.{props.minor}")
            raise DMMError(f"no CUDA GPU {device} here (cuda-python: {error}, {count} device(s)); expected an "
                           "NVIDIA GPU with its driver; run the .onnx with ONNX Runtime on this machine")
        except DMMError:
            raise
        except Exception as error:  # the bindings load the driver lazily and raise their own loader errors
            raise DMMError(f"no usable CUDA driver here (cuda-python: {type(error).__name__}: {error}); expected "
                           "an NVIDIA GPU with its driver") from None
    if importlib.util.find_spec("pycuda") is not None:
        try:
            import pycuda.driver as cuda
        except (ImportError, OSError) as error:  # built against a CUDA that is not here
            raise DMMError(f"pycuda does not import ({error}); expected pycuda built for this CUDA; "
                           f"{INSTALL_HINT}") from None
        try:
            cuda.init()
            count = cuda.Device.count()
            if count <= device:
                raise DMMError(f"no CUDA GPU {device} here (pycuda sees {count}); expected an NVIDIA GPU with its "
                               "driver")
            gpu = cuda.Device(device)
            major, minor = gpu.compute_capability()
            return GpuIdentity(gpu.name().strip(), f"{major}.{minor}")
        except cuda.Error as error:  # pycuda's own exception family (not the builtin types)
            raise DMMError(f"no usable CUDA GPU here (pycuda: {type(error).__name__}: {error}); expected an "
                           "NVIDIA GPU with its driver") from None
    raise DMMError(f"reading the GPU needs pycuda or cuda-python, and neither is installed; {INSTALL_HINT}")


def check_plan_manifest(source: str, manifest: Manifest) -> dict:
    """The manifest's engine record, or a DMMError when the manifest is not a plan's."""
    engine = manifest.engine or {}
    missing = [name for name in ENGINE_FIELDS if name not in engine]
    if engine.get("kind") != PLAN_KIND or missing:
        raise DMMError(f"{source}: its manifest has no TensorRT engine record (missing "
                       f"{', '.join(missing) or 'kind'}); expected the NAME.plan.json that 'cli.py build' writes "
                       "beside the plan; rebuild: python cli.py build NAME.onnx")
    return engine


def check_plan_bytes(source: str, engine: dict, plan: bytes) -> None:
    """The plan must be the one its manifest describes (sha256): refuses truncated, damaged or foreign files."""
    digest = sha256_bytes(plan)
    if digest != engine["plan_sha256"]:
        size = engine.get("plan_bytes")
        raise DMMError(f"{source}: sha256 | file {digest[:12]}... ({len(plan)} bytes) | manifest "
                       f"{str(engine['plan_sha256'])[:12]}...{f' ({size} bytes)' if size else ''}; the plan is "
                       "truncated, damaged or not the one its manifest describes; rebuild it: python cli.py build "
                       "NAME.onnx")


def check_plan_target(source: str, engine: dict, *, tensorrt_version: str, gpu: GpuIdentity) -> None:
    """The TensorRT version and the GPU here must be the ones the plan was built with."""
    if str(engine["tensorrt_version"]) != str(tensorrt_version):
        raise DMMError(f"{source}: TensorRT | plan built with {engine['tensorrt_version']} | this machine has "
                       f"{tensorrt_version}; {REBUILD_HINT}")
    built_on = GpuIdentity(str(engine["gpu_name"]), str(engine["compute_capability"]))
    if built_on != gpu:
        raise DMMError(f"{source}: GPU | plan built on {built_on.describe()} | this machine has "
                       f"{gpu.describe()}; {REBUILD_HINT}")


def numpy_dtype_name(trt, dtype) -> str:
    """TensorRT DataType -> numpy dtype name as manifests write it ("float32")."""
    try:
        return np.dtype(trt.nptype(dtype)).name
    except TypeError:  # BF16, FP8, INT4 have no numpy type
        return str(dtype).split(".")[-1].lower()


def engine_io(trt, engine) -> list[dict]:
    """Every I/O tensor of a deserialised engine: name, mode ("input" / "output"), shape, dtype."""
    tensors = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        tensors.append({"name": name, "mode": mode, "shape": [int(d) for d in engine.get_tensor_shape(name)],
                        "dtype": numpy_dtype_name(trt, engine.get_tensor_dtype(name))})
    return tensors


def check_io(source: str, manifest: Manifest, tensors: list[dict]) -> None:
    for kind in ("input", "output"):
        check_engine_io(source, manifest, kind, [(t["name"], tuple(t["shape"]), t["dtype"])
                                                 for t in tensors if t["mode"] == kind])


_LOGGER = None


def capturing_logger(trt):
    """The process's TensorRT logger: it keeps the errors and warnings of the current operation
    (``messages``, cleared by the caller) so that they end up in DMMErrors instead of on stderr only.

    One per process: older TensorRT releases treat the logger as a singleton.
    """
    global _LOGGER
    if _LOGGER is None:
        class CapturingLogger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages: list[tuple[str, str]] = []

            def log(self, severity, msg):
                if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                    self.messages.append(("error", str(msg)))
                elif severity == trt.ILogger.WARNING:
                    self.messages.append(("warning", str(msg)))

        _LOGGER = CapturingLogger()
    return _LOGGER


def logged_errors(logger, limit: int = 3) -> str:
    errors = [message for level, message in logger.messages if level == "error"]
    if not errors:
        return "TensorRT logged no error"
    shown = "; ".join(message.strip().splitlines()[0] for message in errors[:limit])
    return shown + (f" (+{len(errors) - limit} more)" if len(errors) > limit else "")
