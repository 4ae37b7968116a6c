"""runtime/cuda_support.py: which CUDA bindings are usable, and the TensorRT backend's buffer code on a real GPU.

The buffer tests need pycuda and an NVIDIA GPU but no TensorRT (bench/gpu_check.sh runs them on a
GPU machine without TensorRT): a device-to-device copy stands in for the engine, which is enough to
see the double-buffered caches, the skipped uploads, the stream-ordered zeroing and the context
made current on another thread. They skip with the reason elsewhere.
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
    assert "\n" not in message and ("neither is installed" in message or "no usable CUDA GPU 0" in message)
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
        assert context.describe()[1].count(".") == 1
        buffers.free()


@needs_pycuda_gpu
def test_the_context_is_made_current_on_another_thread():
    cuda = CUDA
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
