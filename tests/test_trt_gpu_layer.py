"""The GPU layer's own logic, on the CPU: what TensorRT, pycuda and a driver would make it do.

TensorRT and pycuda cannot be installed on a machine without a GPU, so where a path starts with one
of their objects raising, a small stand-in with just that behaviour triggers it (said at each one);
everything else is the real code. The same paths on a real GPU are bench/gpu_check.sh's and
tests/test_runtime_trt.py's.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import cli
from contract.errors import DMMError
from contract.manifest import manifest_path_for, read_manifest
from export.polygraphy_check import data_loader_files
from runtime import cuda_support
from runtime.cuda_support import PrimaryContext, pycuda_import_failure
from runtime.tensorrt_support import check_layer_precisions, create_runtime, layer_summary
from runtime.trt_backend import TrtBackend
from tests.helpers import assert_one_line_error, copy_engine

# -- item: trt.Runtime raising TypeError when CUDA cannot initialise --------------------------------


class _TensorRtWithoutCuda:
    """Stands in for the tensorrt module (not installable here): its Runtime constructor fails as the real
    one does when CUDA cannot initialise (pybind11's "factory function returned nullptr")."""

    __version__ = "11.1.0.0"

    class Runtime:
        def __init__(self, logger):
            raise TypeError("pybind11::init(): factory function returned nullptr")


class _Logger:
    messages = [("error", "CUDA initialization failure with error: 35")]


def test_a_runtime_that_cannot_start_cuda_is_one_dmmerror():
    with pytest.raises(DMMError) as caught:
        create_runtime(_TensorRtWithoutCuda, _Logger(), "engine 'p.plan'")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("engine 'p.plan': TensorRT 11.1.0.0 could not create")
    assert "CUDA initialization failure with error: 35" in message and "driver" in message


# -- item: pycuda import failures name the missing library ---------------------------------------


def test_a_missing_curand_is_named_with_its_fix():
    message = pycuda_import_failure("libcurand.so.10: cannot open shared object file: No such file or directory")
    assert "libcurand.so.10 is missing" in message and "CUDA_ENABLE_CURAND = False" in message
    assert "built for another CUDA" not in message
    other = pycuda_import_failure("libcuda.so.1: cannot open shared object file: No such file or directory")
    assert "libcuda.so.1 is missing" in other and "LD_LIBRARY_PATH" in other
    mismatch = pycuda_import_failure("undefined symbol: cuMemAllocAsync")
    assert "built for another CUDA" in mismatch and "--no-binary pycuda" in mismatch


# -- item: one retained primary context per device ----------------------------------------------


class _PycudaDevice:
    """Stands in for pycuda.driver (not installable here) to count primary-context retains."""

    retains = 0

    class Error(Exception):
        pass

    class Device:
        def __init__(self, index):
            self.index = index

        @staticmethod
        def count():
            return 2

        def retain_primary_context(self):
            _PycudaDevice.retains += 1
            return object()


def test_the_primary_context_is_retained_once_per_device_for_the_process(monkeypatch):
    monkeypatch.setattr(cuda_support, "_RETAINED", {})
    _PycudaDevice.retains = 0
    first = PrimaryContext(_PycudaDevice, 1)
    first.release()  # dropping a handle must not drop the process's retain
    second = PrimaryContext(_PycudaDevice, 1)
    assert _PycudaDevice.retains == 1 and cuda_support._RETAINED[1] is second._context
    PrimaryContext(_PycudaDevice, 0)
    assert _PycudaDevice.retains == 2
    with pytest.raises(DMMError, match="this context handle was released"):
        first.__enter__()


# -- item: close() failing part way ------------------------------------------------------------


class _Context:
    """Stands in for PrimaryContext's push / pop (pycuda cannot run here)."""

    def __init__(self):
        self.released = False

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None

    def release(self):
        self.released = True


class _FailingStream:
    """Stands in for a pycuda stream whose synchronize fails (a sticky CUDA error)."""

    def synchronize(self):
        raise RuntimeError("cuStreamSynchronize failed: an illegal memory access was encountered")


class _Buffers:
    freed = False

    def free(self):
        self.freed = True


def test_a_close_that_fails_part_way_frees_the_rest_and_says_so(tmp_path):
    backend = TrtBackend(tmp_path / "p.plan")
    gpu, buffers = _Context(), _Buffers()
    # Stand-ins where no TensorRT or CUDA exists: only the order and completeness of freeing is tested.
    backend._gpu, backend._stream, backend._buffers = gpu, _FailingStream(), buffers  # pyright: ignore
    backend._context = backend._engine = backend._runtime = object()  # pyright: ignore
    with pytest.raises(DMMError) as caught:
        backend.close()
    message = str(caught.value)
    assert "\n" not in message and "synchronising the stream: RuntimeError: cuStreamSynchronize failed" in message
    assert buffers.freed and gpu.released  # freed although the synchronisation before it failed
    assert backend._context is None and backend._engine is None and backend._buffers is None and backend._gpu is None
    backend.close()  # closed: a second close has nothing left to do
    with pytest.raises(DMMError, match="this TensorRT backend is closed"):
        backend._current()


# -- item: fused Myelin regions hide the precision inside -----------------------------------------


def _region(name: str, dtype: str) -> dict:
    return {"Name": name, "LayerType": "Myelin", "Inputs": [{"Format/Datatype": dtype}],
            "Outputs": [{"Format/Datatype": dtype}]}


def test_only_opaque_regions_are_unverifiable_not_a_false_warning(engines):
    manifest = dataclasses.replace(read_manifest(manifest_path_for(engines["window"])), precision="int8")
    opaque = json.dumps({"Layers": [_region("{ForeignNode[embed/linear...head]}", "Row major linear FP32"),
                                    _region("{ForeignNode[layer0/ssm/dA...layer2/ssm/h7]}", "Float")]})
    summary = layer_summary(opaque, manifest)
    assert summary["opaque_regions"] == 2 and "2 fused Myelin region(s)" in summary["reduced_precision_unverifiable"]
    assert not any("no layer of the plan runs in int8" in w for w in check_layer_precisions("p", summary, manifest))
    json.dumps(summary)  # recorded in the plan manifest as it is
    visible = json.dumps({"Layers": [{**_region("head", "Float"), "Metadata": "[ONNX Layer: head]"}]})
    summary = layer_summary(visible, manifest)  # a named fp32 layer: the int8 finding stands
    assert summary["opaque_regions"] == 0 and summary["reduced_precision_unverifiable"] is None
    assert any("no layer of the plan runs in int8" in w for w in check_layer_precisions("p", summary, manifest))


# -- item: the int8 Polygraphy command's note ----------------------------------------------------


def test_the_int8_polygraphy_note_names_the_vnni_saturation(engines, tmp_path):
    onnx_path = copy_engine(engines["window"], tmp_path)
    manifest = read_manifest(manifest_path_for(onnx_path))
    feeds = [{spec.name: np.zeros(spec.shape, spec.dtype) for spec in manifest.inputs}]
    int8, _ = data_loader_files(onnx_path, dataclasses.replace(manifest, precision="int8"), feeds, "zeros")
    fp32, _ = data_loader_files(onnx_path, manifest, feeds, "zeros")
    assert "without VNNI" in int8["note"] and "fp32 graph's outputs" in int8["note"]
    assert "VNNI" not in fp32["note"]


# -- item: doctor knows every engine kind run knows -----------------------------------------------


def _doctor(capsys, *args: str) -> dict:
    code = cli.main(["doctor", "--json", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)["engine"]


def test_doctor_runs_a_c_engine_and_a_checkpoint(capsys, c_export, checkpoint_path):
    report = _doctor(capsys, "--engine", str(c_export), "--steps", "20")
    [c_backend] = report["backends"]
    assert c_backend["backend"] == "c" and c_backend["loads"] and c_backend["latency_ms"]["steps"] == 20
    assert report["comparison"].startswith("only the c backend runs a .c engine")
    report = _doctor(capsys, "--engine", str(checkpoint_path), "--steps", "20")
    assert [item["backend"] for item in report["backends"]] == ["torch"] and report["backends"][0]["loads"]
    assert "ONNX" not in report["comparison"].split("(")[0] and "nothing to compare with" in report["comparison"]


def test_doctor_refuses_an_unknown_engine_kind_in_one_line(capsys, tmp_path):
    engine = tmp_path / "hopper.engine"
    engine.write_bytes(b"\0")
    assert_one_line_error(capsys, cli.main(["doctor", "--engine", str(engine)]), "unknown engine kind", ".c")
