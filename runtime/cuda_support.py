"""CUDA through pycuda (and cuda-python where present), for the TensorRT builder and backend: which
CUDA bindings are usable, the GPU's identity, a device's primary context made current around a
call, and the pinned host / device buffers of an engine's I/O.

Torch-free, and importing it imports neither pycuda nor cuda-python (docs/deployment.md#pycuda).

Bindings. pycuda is what the runtime runs on, so it is tried first; cuda-python is the fallback
for reading the GPU and the only way to capture CUDA graphs (pycuda has no stream-capture API).
Either may be installed and unusable: pycuda compiled against another CUDA toolkit fails at
import; cuda-python 13.x needs a CUDA 13 driver (JetPack 6 has CUDA 12.6) and answers
``cudaErrorInsufficientDriver`` or fails to load the driver; and a ``cuda`` namespace package
may come from another distribution (cuda-pathfinder, cuda-core) without cuda-python's bindings.
So the bindings are looked up as ``cuda.bindings.runtime`` (cuda-python 12.6 and later) or
``cuda.cudart`` (older), never by the ``cuda`` package alone, and every failure becomes a
`CudaUnavailable` whose message says which one failed and why.

Contexts. A plan runs in the device's primary context, the one the CUDA runtime (TensorRT,
cuda-python, PyTorch) uses. A context is current per thread: `PrimaryContext` pushes it around
every call and pops it after, so a backend loaded on one thread can be called from another (a
ROS callback thread); the lock it holds meanwhile serialises calls of one backend.

Buffers. `DeviceBuffers` keeps one page-locked host buffer and one device buffer per I/O
tensor, and two device buffers per stream-mode cache (A and B: a step reads one and writes the
other, never one buffer as both input and output), with every copy and the zeroing ordered on
the backend's stream.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from contract.errors import DMMError

CUDART_MODULES = ("cuda.bindings.runtime", "cuda.cudart")  # cuda-python >= 12.6, then older releases
INSTALL_HINT = ("install the GPU extra where the NVIDIA GPU is (pip install -e '.[gpu]' in the checkout, or "
                "on a Jetson JetPack's TensorRT through a venv with --system-site-packages and pycuda built with the "
                "CUDA toolkit on PATH, see docs/jetson.md)")


class CudaUnavailable(Exception):
    """One CUDA binding cannot be used here; the message says which and why (a clause, not a sentence)."""


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def distribution_version(*names: str) -> str | None:
    """The installed version of the first of ``names`` that is installed, without importing it."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def import_pycuda():
    """``pycuda.driver``, initialised, or CudaUnavailable."""
    if importlib.util.find_spec("pycuda") is None:
        raise CudaUnavailable("pycuda is not installed")
    try:
        import pycuda.driver as cuda  # pyright: ignore[reportMissingImports] - pycuda ships no type information
    except (ImportError, OSError) as error:  # built against a CUDA toolkit that is not here
        raise CudaUnavailable(pycuda_import_failure(first_line(error))) from None
    try:
        cuda.init()
    except (cuda.Error, RuntimeError) as error:  # pycuda's own error family; no driver at all
        raise CudaUnavailable(f"pycuda finds no usable CUDA driver ({type(error).__name__}: "
                              f"{first_line(error)})") from None
    return cuda


def pycuda_import_failure(message: str) -> str:
    """Why pycuda does not import, with the fix: a missing shared library is named (libcurand.so.10 of a
    toolkit without curand is one), not taken for a pycuda built for another CUDA."""
    version = distribution_version("pycuda") or ""
    missing = re.search(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file", message)
    if missing:
        library = missing.group(1)
        if library.startswith("libcurand"):
            return (f"pycuda {version} does not import: {library} is missing ({message}); this CUDA has no curand: "
                    "put the toolkit's lib64 on LD_LIBRARY_PATH, or rebuild pycuda with CUDA_ENABLE_CURAND = False "
                    "in its siteconf.py (bench/gpu_check.sh does)")
        return (f"pycuda {version} does not import: {library} is missing ({message}); put the CUDA library folder "
                "that holds it on LD_LIBRARY_PATH, or rebuild pycuda against the CUDA toolkit here")
    return (f"pycuda {version} does not import ({message}); it was built for another CUDA: rebuild it here "
            "(pip install --no-binary pycuda --force-reinstall pycuda with nvcc on PATH)")


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent that is not a package, or a broken one
        return False


def import_cudart():
    """cuda-python's runtime bindings (``cuda.bindings.runtime`` or ``cuda.cudart``), or CudaUnavailable.

    Only imports them: whether the driver answers is `cudart_call`'s business.
    """
    for name in CUDART_MODULES:
        if not _module_present(name):
            continue
        try:
            return importlib.import_module(name)
        except Exception as error:  # the bindings load libcudart / the driver and raise their own types
            raise CudaUnavailable(f"cuda-python's {name} does not import ({type(error).__name__}: "
                                  f"{first_line(error)})") from None
    if _module_present("cuda"):
        raise CudaUnavailable("cuda-python is not installed (a 'cuda' package is, without cuda.bindings or "
                              "cuda.cudart: another distribution's namespace)")
    raise CudaUnavailable("cuda-python is not installed")


def cudart_call(cudart, function: str, *args) -> Any:
    """Call ``cudart.<function>(*args)``; its values after the error code, or CudaUnavailable."""
    try:
        result = getattr(cudart, function)(*args)
    except Exception as error:  # a missing or too old driver raises from the bindings' loader
        raise CudaUnavailable(f"cuda-python {cuda_python_version() or ''}: {function} raised "
                              f"{type(error).__name__}: {first_line(error)}") from None
    result = result if isinstance(result, tuple) else (result,)
    if int(result[0]) != 0:
        raise CudaUnavailable(f"cuda-python {cuda_python_version() or ''}: {function} returned {result[0]}"
                              + ("; its major version must match the driver's CUDA (12.x for CUDA 12)"
                                 if "Driver" in str(result[0]) else ""))
    values = result[1:]
    return values[0] if len(values) == 1 else values


def cuda_python_version() -> str | None:
    return distribution_version("cuda-python", "cuda-bindings")


def gpu_name_and_capability(device: int) -> tuple[str, str, str]:
    """(name, "major.minor", which binding answered) of CUDA device ``device``: pycuda first, then cuda-python.

    DMMError when neither answers, naming what each said.
    """
    reasons = []
    try:
        cuda = import_pycuda()
        try:
            count = cuda.Device.count()
            if count <= device:
                raise CudaUnavailable(f"pycuda sees {count} CUDA device(s), no device {device}")
            gpu = cuda.Device(device)
            major, minor = gpu.compute_capability()
            return gpu.name().strip(), f"{major}.{minor}", "pycuda"
        except cuda.Error as error:
            raise CudaUnavailable(f"pycuda: {type(error).__name__}: {first_line(error)}") from None
    except CudaUnavailable as why:
        reasons.append(str(why))
    try:
        cudart = import_cudart()
        count = cudart_call(cudart, "cudaGetDeviceCount")
        if count <= device:
            raise CudaUnavailable(f"cuda-python sees {count} CUDA device(s), no device {device}")
        props = cudart_call(cudart, "cudaGetDeviceProperties", device)
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}", "cuda-python"
    except CudaUnavailable as why:
        reasons.append(str(why))
    if all(reason.endswith("is not installed") for reason in reasons):
        raise DMMError("reading the GPU: neither pycuda nor cuda-python is installed", "one of them installed",
                       INSTALL_HINT)
    raise DMMError(f"no usable CUDA GPU {device} here ({', and '.join(reasons)})",
                   "an NVIDIA GPU with its driver and pycuda built for its CUDA", INSTALL_HINT)


class PrimaryContext:
    """The primary context of CUDA device ``index`` (pycuda), current on the calling thread inside ``with``.

    Re-entrant on one thread (a nested ``with`` pushes again) and serialising across threads: one
    backend's calls never interleave.
    """

    def __init__(self, cuda, index: int):
        self._cuda = cuda
        self.index = int(index)
        try:
            count = cuda.Device.count()
            if self.index >= count:
                raise CudaUnavailable(f"pycuda sees {count} CUDA device(s), no device {self.index}")
            self.device = cuda.Device(self.index)
            self._context = _retained_primary_context(self.device, self.index)
        except cuda.Error as error:
            raise CudaUnavailable(f"pycuda: {type(error).__name__}: {first_line(error)}") from None
        self._lock = threading.RLock()

    def name_and_capability(self) -> tuple[str, str]:
        """(name, "major.minor") of the device."""
        major, minor = self.device.compute_capability()
        return self.device.name().strip(), f"{major}.{minor}"

    def __enter__(self) -> PrimaryContext:
        if self._context is None:
            raise DMMError(f"CUDA device {self.index}: this context handle was released", "a live context handle",
                           "load the backend again")
        self._lock.acquire()
        try:
            self._context.push()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self._cuda.Context.pop()
        finally:
            self._lock.release()

    def release(self) -> None:
        """Drop this handle. The primary context itself stays retained for the rest of the process
        (`_retained_primary_context`): releasing its last pycuda handle would reset it, freeing memory
        that TensorRT objects still alive (an error path's, a traceback's) point at."""
        self._context = None


# device index -> pycuda's handle on its primary context, retained once and never released: the driver
# resets a primary context when its retain count drops to zero, and that must not happen while any
# TensorRT object or buffer of this process may still use it. The driver frees it at process exit.
_RETAINED: dict[int, Any] = {}
_RETAINED_LOCK = threading.Lock()


def _retained_primary_context(device, index: int):
    with _RETAINED_LOCK:
        if index not in _RETAINED:
            _RETAINED[index] = device.retain_primary_context()
        return _RETAINED[index]


@contextlib.contextmanager
def device_current(index: int):
    """CUDA device ``index`` current on this thread inside the block, for TensorRT's runtime-API use (the
    builder, the runtime): its primary context pushed by pycuda, else ``cudaSetDevice`` by cuda-python
    (the previous device restored after). Yields the binding used.
    """
    reasons = []
    try:
        context = PrimaryContext(import_pycuda(), index)
    except CudaUnavailable as why:
        reasons.append(str(why))
    else:
        with context:
            yield "pycuda"
        return
    try:
        cudart = import_cudart()
        previous = cudart_call(cudart, "cudaGetDevice")
        cudart_call(cudart, "cudaSetDevice", index)
    except CudaUnavailable as why:
        reasons.append(str(why))
        raise DMMError(f"cannot make CUDA device {index} current ({', and '.join(reasons)})",
                       "pycuda or cuda-python working with this GPU's driver", INSTALL_HINT) from None
    try:
        yield "cuda-python"
    finally:
        cudart_call(cudart, "cudaSetDevice", previous)


class DeviceBuffers:
    """Pinned host and device buffers of an engine's I/O, with double-buffered caches (stream mode).

    specs: (name, shape, dtype) of every input then every output; cache_pairs: (output, input)
    whose output feeds the input on the next step. All copies and the zeroing are queued on
    ``stream``; `download` synchronises it. After `advance` the buffers just written are the next
    step's inputs, and while the caches fed are bitwise the ones those buffers hold, nothing is
    uploaded (``uploads`` counts what was).
    """

    def __init__(self, cuda, specs: Sequence[tuple[str, tuple[int, ...], str]], inputs: Sequence[str],
                 cache_pairs: Sequence[tuple[str, str]], stream):
        self._cuda, self._stream = cuda, stream
        self.inputs = list(inputs)
        self.outputs = [name for name, _, _ in specs if name not in self.inputs]
        self.cache_input_of = dict(cache_pairs)  # cache output -> the input it feeds
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, Any] = {}  # pycuda DeviceAllocation per tensor (caches: buffer A)
        self.spare: dict[str, Any] = {}  # caches: buffer B, keyed by the cache input's name
        self.resident: dict[str, np.ndarray] = {}  # what each cache input buffer holds now
        self.parity = 0
        self.uploads = 0
        for name, shape, dtype in specs:
            host = cuda.pagelocked_empty(tuple(shape), np.dtype(dtype))  # pinned: truly async copies
            host.fill(0)
            self.host[name] = host
            self.device[name] = cuda.mem_alloc(max(host.nbytes, 1))
        for input_name in self.cache_input_of.values():
            self.spare[input_name] = cuda.mem_alloc(max(self.host[input_name].nbytes, 1))

    def cache_buffers(self, input_name: str) -> tuple[Any, Any]:
        """(read, write) buffers of a cache pair now: A -> B at parity 0, B -> A at parity 1."""
        first, second = self.device[input_name], self.spare[input_name]
        return (first, second) if self.parity == 0 else (second, first)

    def addresses(self) -> dict[str, int]:
        """Device address of every I/O tensor for the current parity (what set_tensor_address takes)."""
        found = {name: int(buffer) for name, buffer in self.device.items()}
        for output_name, input_name in self.cache_input_of.items():
            read, write = self.cache_buffers(input_name)
            found[input_name], found[output_name] = int(read), int(write)
        return found

    def upload(self, feeds: Mapping[str, np.ndarray]) -> None:
        cuda, stream = self._cuda, self._stream
        for name in self.inputs:
            target = self.device[name]
            if name in self.spare:
                if name in self.resident and np.array_equal(feeds[name], self.resident[name]):
                    continue  # the device already holds exactly these caches
                target = self.cache_buffers(name)[0]
                self.resident[name] = np.array(feeds[name], copy=True)
            np.copyto(self.host[name], feeds[name])
            cuda.memcpy_htod_async(target, self.host[name], stream)
            self.uploads += 1

    def download(self) -> dict[str, np.ndarray]:
        """Every output, copied device -> pinned host -> a fresh array the caller owns."""
        cuda, stream = self._cuda, self._stream
        for name in self.outputs:
            source = self.device[name]
            if name in self.cache_input_of:
                source = self.cache_buffers(self.cache_input_of[name])[1]
            cuda.memcpy_dtoh_async(self.host[name], source, stream)
        stream.synchronize()
        return {name: self.host[name].copy() for name in self.outputs}

    def advance(self) -> None:
        """After a step: the cache buffers just written become the inputs of the next one."""
        if not self.spare:
            return
        for output_name, input_name in self.cache_input_of.items():
            # A view of the pinned copy just read back: valid until the next download, which comes
            # after the comparison in the next upload.
            self.resident[input_name] = self.host[output_name]
        self.parity ^= 1

    def zero_caches(self) -> None:
        """Both buffers of every cache zeroed on the device, in stream order; parity back to 0."""
        cuda, stream = self._cuda, self._stream
        self.parity = 0
        for input_name in self.spare:
            nbytes = self.host[input_name].nbytes
            cuda.memset_d8_async(self.device[input_name], 0, nbytes, stream)  # count in bytes for d8
            cuda.memset_d8_async(self.spare[input_name], 0, nbytes, stream)
            self.resident[input_name] = np.zeros_like(self.host[input_name])

    def free(self) -> None:
        """Every buffer freed, each one even when another fails; then the first failure is raised."""
        first = None
        for buffer in (*self.device.values(), *self.spare.values()):
            try:
                buffer.free()
            except Exception as error:  # pycuda's error family
                first = first or error
        self.device.clear()
        self.spare.clear()
        self.host.clear()
        self.resident.clear()
        if first is not None:
            raise first
