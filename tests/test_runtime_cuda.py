"""runtime/cuda_support.py: which CUDA bindings are usable, and the TensorRT backend's buffer code on a real GPU.

The buffer tests need pycuda and an NVIDIA GPU but no TensorRT (bench/gpu_check.sh runs them on a
GPU machine without TensorRT): a device-to-device copy stands in for the engine, which is enough to
see the double-buffered caches, the skipped uploads, the stream-ordered zeroing and the context
made current on another thread; with cuda-python too, the TensorRT backend's CUDA-graph capture and replay on a
pycuda stream and its failed-capture fallback. They skip with the reason elsewhere.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from contract.errors import DMMError
from runtime.cuda_support import (
    CudaUnavailable,
    DeviceBuffers,
    PrimaryContext,
    distribution_version,
    gpu_name_and_capability,
    import_pycuda,
)


def _pycuda():
    try:
        return import_pycuda(), ""
    except CudaUnavailable as why:
        return None, str(why)


CUDA, WHY = _pycuda()
needs_pycuda_gpu = pytest.mark.skipif(CUDA is None, reason=f"needs pycuda and an NVIDIA GPU ({WHY})")

CACHE_SHAPE = (3, 1, 5, 64)  # (nl, B, W-1, D) at the hopper preset
SPECS = [("state", (1, 11), "float32"), ("cache", CACHE_SHAPE, "float32"),
         ("action", (1, 3), "float32"), ("cache_next", CACHE_SHAPE, "float32")]


def test_without_bindings_the_gpu_identity_is_one_clear_line():
    if CUDA is not None:
        pytest.skip("pycuda answers here")
    with pytest.raises(DMMError) as caught:
        gpu_name_and_capability(0)
    message = str(caught.value)
    assert "\n" not in message and ("neither pycuda nor cuda-python is installed" in message
                                     or "no usable CUDA GPU 0" in message)
    assert "pip install -e '.[gpu]'" in message


def test_versions_are_read_without_importing():
    assert distribution_version("numpy") == np.__version__
    assert distribution_version("no-such-distribution-here") is None


class CopyEngine:
    """Stands in for an engine: state -> action (its first 3 values) and cache -> cache_next (a copy)."""

    def __init__(self, cuda, buffers: DeviceBuffers, stream):
        self.cuda, self.buffers, self.stream = cuda, buffers, stream

    def run(self) -> None:
        addresses = self.buffers.addresses()
        nbytes = int(np.prod(CACHE_SHAPE)) * 4
        self.cuda.memcpy_dtod_async(addresses["cache_next"], addresses["cache"], nbytes, self.stream)
        self.cuda.memcpy_dtod_async(addresses["action"], addresses["state"], 12, self.stream)


def _step(engine: CopyEngine, feeds) -> dict[str, np.ndarray]:
    engine.buffers.upload(feeds)
    engine.run()
    outputs = engine.buffers.download()
    engine.buffers.advance()
    return outputs


@needs_pycuda_gpu
def test_caches_stay_on_the_device_and_alternate_buffers():
    cuda = CUDA
    assert cuda is not None  # the module skips without pycuda
    with PrimaryContext(cuda, 0) as context:
        stream = cuda.Stream()
        buffers = DeviceBuffers(cuda, SPECS, ["state", "cache"], [("cache_next", "cache")], stream)
        engine = CopyEngine(cuda, buffers, stream)
        rng = np.random.default_rng(0)
        first = rng.normal(size=CACHE_SHAPE).astype(np.float32)
        state = rng.normal(size=(1, 11)).astype(np.float32)
        outputs = _step(engine, {"state": state, "cache": first})
        np.testing.assert_array_equal(outputs["cache_next"], first)
        np.testing.assert_array_equal(outputs["action"], state[:, :3])
        uploads = buffers.uploads
        for _ in range(5):  # the caches fed are the ones returned: nothing but the state crosses
            outputs = _step(engine, {"state": state, "cache": outputs["cache_next"]})
            np.testing.assert_array_equal(outputs["cache_next"], first)
        assert buffers.uploads == uploads + 5 and buffers.parity == 0
        second = rng.normal(size=CACHE_SHAPE).astype(np.float32)  # other caches: uploaded
        outputs = _step(engine, {"state": state, "cache": second})
        np.testing.assert_array_equal(outputs["cache_next"], second)
        assert buffers.parity == 1  # an odd number of steps: reading buffer B
        read, write = buffers.cache_buffers("cache")
        assert int(read) != int(write)  # never one buffer as input and output
        buffers.zero_caches()  # from parity 1: both buffers zeroed, in stream order
        assert buffers.parity == 0
        outputs = _step(engine, {"state": state, "cache": np.zeros(CACHE_SHAPE, np.float32)})
        np.testing.assert_array_equal(outputs["cache_next"], 0.0)
        outputs = _step(engine, {"state": state, "cache": outputs["cache_next"]})
        np.testing.assert_array_equal(outputs["cache_next"], 0.0)
        assert context.name_and_capability()[1].count(".") == 1
        buffers.free()


@needs_pycuda_gpu
def test_the_context_is_made_current_on_another_thread():
    cuda = CUDA
    assert cuda is not None  # the module skips without pycuda
    context = PrimaryContext(cuda, 0)
    with context:
        stream = cuda.Stream()
        buffers = DeviceBuffers(cuda, SPECS, ["state", "cache"], [("cache_next", "cache")], stream)
    found: dict = {}

    def worker():
        try:
            with context:  # without it, this thread has no current context: pycuda raises
                engine = CopyEngine(cuda, buffers, stream)
                found["out"] = _step(engine, {"state": np.ones((1, 11), np.float32),
                                              "cache": np.full(CACHE_SHAPE, 2.0, np.float32)})
        except Exception as error:  # reported to the test thread
            found["error"] = error

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(60)
    assert "error" not in found, found.get("error")
    np.testing.assert_array_equal(found["out"]["cache_next"], 2.0)
    with context:
        buffers.free()
        stream = None


# -- CUDA graphs on a pycuda stream (the TensorRT backend's capture, without TensorRT) -----------------


def _cudart_answering():
    """cuda-python's runtime bindings, when they import and see a device: importing alone succeeds
    without a driver, so a device count is what tells."""
    from runtime.cuda_support import cudart_call, import_cudart

    try:
        cudart = import_cudart()
        count = int(cudart_call(cudart, "cudaGetDeviceCount"))
    except CudaUnavailable as why:
        return None, str(why)
    return (cudart, "") if count > 0 else (None, "cuda-python sees no CUDA device")


CUDART, NO_CUDART_WHY = _cudart_answering()
needs_cuda_graphs = pytest.mark.skipif(CUDA is None or CUDART is None,
                                       reason=f"needs pycuda and cuda-python answering a GPU ({WHY or NO_CUDART_WHY})")


class CopyContext:
    """Stands in for TensorRT's IExecutionContext (TensorRT is not on the GPU check's machine): its enqueue is
    CopyEngine's copies on the given stream, or a failure, as the backend's capture code must handle."""

    def __init__(self, engine: CopyEngine, fail_in_capture: bool = False):
        self.engine, self.fail_in_capture, self.calls = engine, fail_in_capture, 0

    def execute_async_v3(self, handle) -> bool:
        self.calls += 1
        if self.fail_in_capture and self.calls == 2:  # the uncaptured run before the capture works
            raise RuntimeError("enqueue failed during capture")
        self.engine.run()
        return True


def _graph_backend(tmp_path, engine: CopyEngine, context: CopyContext):
    from runtime.trt_backend import TrtBackend

    backend = TrtBackend(tmp_path / "copy.plan", cuda_graph=True)
    backend._cuda, backend._cudart, backend._stream = CUDA, CUDART, engine.stream
    backend._buffers, backend._context = engine.buffers, context  # pyright: ignore[reportAttributeAccessIssue]
    backend.provider = "copy (CUDA graph)"
    return backend


@needs_cuda_graphs
def test_cuda_graphs_capture_and_replay_on_a_pycuda_stream(tmp_path):
    cuda = CUDA
    assert cuda is not None  # the module skips without pycuda
    with PrimaryContext(cuda, 0):
        stream = cuda.Stream()
        buffers = DeviceBuffers(cuda, SPECS, ["state", "cache"], [("cache_next", "cache")], stream)
        engine = CopyEngine(cuda, buffers, stream)
        backend = _graph_backend(tmp_path, engine, CopyContext(engine))
        rng = np.random.default_rng(1)
        cache = rng.normal(size=CACHE_SHAPE).astype(np.float32)
        for step in range(4):  # parity 0, 1, 0, 1: one graph per parity, then replays
            state = rng.normal(size=(1, 11)).astype(np.float32)
            buffers.upload({"state": state, "cache": cache})
            backend._enqueue()
            outputs = buffers.download()
            buffers.advance()
            np.testing.assert_array_equal(outputs["action"], state[:, :3])
            np.testing.assert_array_equal(outputs["cache_next"], cache)
            cache = outputs["cache_next"]
            assert backend.graph_launches == step + 1
        assert backend.graphs_in_use == 2 and not backend.warnings
        backend._destroy_graphs()
        buffers.free()


@needs_cuda_graphs
def test_a_failed_capture_falls_back_and_leaves_the_stream_usable(tmp_path):
    cuda = CUDA
    assert cuda is not None  # the module skips without pycuda
    with PrimaryContext(cuda, 0):
        stream = cuda.Stream()
        buffers = DeviceBuffers(cuda, SPECS, ["state", "cache"], [("cache_next", "cache")], stream)
        engine = CopyEngine(cuda, buffers, stream)
        backend = _graph_backend(tmp_path, engine, CopyContext(engine, fail_in_capture=True))
        state = np.full((1, 11), 3.0, np.float32)
        buffers.upload({"state": state, "cache": np.ones(CACHE_SHAPE, np.float32)})
        backend._enqueue()  # the capture fails: ended, its error cleared, plain enqueue from now on
        outputs = buffers.download()
        assert backend.graphs_in_use == 0 and backend.graph_launches == 0
        assert "CUDA graph capture failed (execute_async_v3 raised RuntimeError" in backend.warnings[0]
        assert "capture failed: plain enqueue" in backend.provider
        np.testing.assert_array_equal(outputs["cache_next"], 1.0)  # the stream still works: not left capturing
        backend.cuda_graph = True
        backend._enqueue()  # no second capture after a failure
        buffers.download()
        assert backend.graph_launches == 0 and len(backend.warnings) == 1
        buffers.free()
