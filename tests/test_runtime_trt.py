"""The TensorRT layer: 'cli.py build', plan manifests, and the TensorRT backend's checks before the first step.

What runs everywhere: the build command and the backend without TensorRT, the plan checks that
need no TensorRT (a random or truncated .plan, a manifest without an engine record, a plan whose
manifest names another TensorRT version or GPU), and lazy imports. What needs TensorRT and an
NVIDIA GPU (build, parity against ONNX Runtime per precision, device-resident stream caches,
CUDA graphs) skips with the reason where they are absent.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import cli
from contract.errors import DMMError
from contract.files import sha256_bytes
from contract.manifest import manifest_path_for, read_manifest, write_manifest
from contract.tolerances import max_abs, tolerance
from export.trt_build import TIMING_CACHE_STATUS, BuildConfig, engine_after_export, tensorrt_status
from runtime import Policy, load_backend
from runtime.cuda_support import CudaUnavailable, cudart_call, import_cudart
from runtime.tensorrt_support import (
    PLAN_KIND,
    GpuIdentity,
    check_layer_precisions,
    check_plan_manifest,
    check_plan_target,
    gpu_identity,
    layer_summary,
)
from runtime.trt_backend import TrtBackend
from tests.helpers import assert_one_line_error, copy_engine, gpu_runtime_usable

REPO_ROOT = Path(__file__).resolve().parent.parent
TRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None


USABLE, WHY = gpu_runtime_usable()
needs_gpu = pytest.mark.skipif(not USABLE, reason=f"needs TensorRT, pycuda and an NVIDIA GPU ({WHY.split(';')[0]})")


def _cuda_graphs_usable() -> tuple[bool, str]:
    """cuda-python that imports and answers the driver: importing alone succeeds without a driver."""
    try:
        count = cudart_call(import_cudart(), "cudaGetDeviceCount")
    except CudaUnavailable as unavailable:
        return False, str(unavailable)
    return (True, "") if int(count) > 0 else (False, "cuda-python sees no CUDA device")


GRAPHS, NO_GRAPHS_WHY = _cuda_graphs_usable()
needs_cuda_graphs = pytest.mark.skipif(not GRAPHS, reason=f"CUDA graphs need cuda-python ({NO_GRAPHS_WHY})")
without_tensorrt = pytest.mark.skipif(TRT_INSTALLED, reason="tensorrt is installed here: the no-TensorRT path "
                                                            "cannot be observed")
# docs/design.md#tolerances: TensorRT == ONNX Runtime in fp32 with TF32 off; fp16 by mean abs.
FP32_ATOL, FP16_MEAN_ABS = max_abs("trt-vs-ort"), tolerance("trt-vs-ort", "fp16").mean_abs


def write_plan(onnx_path: Path, plan_path: Path, data: bytes, **engine_changes) -> Path:
    """A .plan file of ``data`` with a plan manifest: the ONNX manifest plus an engine record (what
    'cli.py build' writes), for checks that run before TensorRT deserialises anything.
    """
    plan_path.write_bytes(data)
    manifest = read_manifest(manifest_path_for(onnx_path))
    engine = {"kind": PLAN_KIND, "tensorrt_version": "10.3.0.30", "gpu_name": "Orin",
              "compute_capability": "8.7", "plan_sha256": sha256_bytes(data), "plan_bytes": len(data),
              "io": [{"name": s.name, "mode": m, "shape": list(s.shape), "dtype": s.dtype}
                     for m, specs in (("input", manifest.inputs), ("output", manifest.outputs)) for s in specs],
              **engine_changes}
    write_manifest(dataclasses.replace(manifest, engine=engine), manifest_path_for(plan_path))
    return plan_path


# -- everywhere ---------------------------------------------------------------------------------


def test_importing_the_project_imports_no_gpu_package():
    script = textwrap.dedent("""
        import sys
        import cli, runtime, runtime.trt_backend, runtime.loading, export.trt_build, export.precision
        import calibration.data, calibration.qdq, calibration.accuracy
        loaded = sorted(name for name in sys.modules
                        if name.split(".")[0] in ("tensorrt", "pycuda", "cuda", "onnxruntime_gpu"))
        assert not loaded, loaded
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr


@without_tensorrt
def test_build_and_plans_need_no_torch_onnx_or_onnxruntime(engines, tmp_path):
    """The robot's side: 'cli.py build' and a .plan get as far as TensorRT with none of the training stack."""
    plan = write_plan(engines["window"], tmp_path / "robot.plan", b"x" * 64)
    script = textwrap.dedent(f"""
        import sys
        for name in ("torch", "onnx", "onnxruntime", "gymnasium", "minari"):
            sys.modules[name] = None  # any import of them now raises ImportError
        import cli
        assert cli.main(["build", {str(engines["window"])!r}]) == 1
        assert cli.main(["run", "--engine", {str(plan)!r}]) == 1
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all("'tensorrt' package" in line for line in lines), lines


@without_tensorrt
def test_build_without_tensorrt_says_what_to_install(capsys, engines):
    code = cli.main(["build", str(engines["window"])])
    assert_one_line_error(capsys, code, "the 'tensorrt' package is not installed", "pip install -e '.[gpu]'",
                          "docs/jetson.md")
    assert not engines["window"].with_suffix(".plan").exists()


def test_build_argument_errors_come_before_tensorrt(capsys, engines, tmp_path):
    assert_one_line_error(capsys, cli.main(["build", str(tmp_path / "absent.onnx")]), "absent.onnx",
                          "does not exist")
    assert_one_line_error(capsys, cli.main(["build", str(manifest_path_for(engines["window"]))]),
                          "expected a NAME.onnx")
    assert_one_line_error(capsys, cli.main(["build", str(engines["window"]), "--out", str(tmp_path / "x.engine")]),
                          "--out", "NAME.plan")
    assert_one_line_error(capsys, cli.main(["build", str(engines["window"]), "--workspace-mb", "0"]),
                          "--workspace-mb 0")
    changed = copy_engine(engines["window"], tmp_path)
    changed.write_bytes(changed.read_bytes() + b"\0")  # the graph no longer is the exported one
    assert_one_line_error(capsys, cli.main(["build", str(changed)]), "sha256", "re-export")
    assert BuildConfig(onnx=Path("a/hopper.onnx")).plan_path == Path("a/hopper.plan")


def test_the_export_note_says_how_to_build_on_the_target(engines):
    note = engine_after_export(engines["window"], build=False)
    assert note.startswith("no engine built (--no-engine)") and f"python cli.py build {engines['window']}" in note
    if not USABLE:
        note = engine_after_export(engines["window"])
        assert note.startswith("no engine built here (") and "\n" not in note
        assert "tied to the GPU and the TensorRT version" in note


def test_random_and_truncated_plans_are_refused_before_tensorrt(capsys, engines, tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes()

    # A plan with no manifest (what trtexec --saveEngine leaves): refused with the way to adopt it.
    bare = tmp_path / "random.plan"
    bare.write_bytes(data)
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(bare)]), "has no manifest", "random.plan.json",
                          f"python cli.py adopt {bare} --onnx {tmp_path / 'random.onnx'}", "cli.py build")

    # A plan beside the ONNX manifest: a manifest, but no engine record.
    foreign = tmp_path / "foreign.plan"
    foreign.write_bytes(data)
    manifest_path_for(foreign).write_text(manifest_path_for(engines["window"]).read_text())
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(foreign)]), "no TensorRT engine record",
                          "python cli.py adopt", "cli.py build")

    # A plan cut short after its manifest was written (a copy interrupted, a full disk).
    truncated = write_plan(engines["window"], tmp_path / "truncated.plan", data)
    truncated.write_bytes(data[:1000])
    err = assert_one_line_error(capsys, cli.main(["run", "--engine", str(truncated)]), "sha256",
                                "(1000 bytes)", "(4096 bytes)", "truncated, damaged")
    assert "Traceback" not in err

    # Random bytes with a matching manifest get as far as TensorRT: on a machine without it, refused there.
    intact = write_plan(engines["window"], tmp_path / "intact.plan", data)
    if not TRT_INSTALLED:
        assert_one_line_error(capsys, cli.main(["run", "--engine", str(intact)]), "'tensorrt' package",
                              "pip install -e '.[gpu]'")


def test_a_plan_for_another_tensorrt_or_gpu_is_refused():
    engine = {"tensorrt_version": "10.3.0.30", "gpu_name": "Orin", "compute_capability": "8.7"}
    here = GpuIdentity("Orin", "8.7")
    check_plan_target("engine 'p.plan'", engine, tensorrt_version="10.3.0.30", gpu=here)  # the same: accepted
    with pytest.raises(DMMError, match=r"plan built with TensorRT 10.3.0.30; expected TensorRT 11.4.0.106 "
                                       r"\(this machine's\); rebuild the plan on this machine: python cli.py build"):
        check_plan_target("engine 'p.plan'", engine, tensorrt_version="11.4.0.106", gpu=here)
    with pytest.raises(DMMError, match=r"plan built on GPU Orin \(compute capability 8.7\); expected "
                                       r"NVIDIA H100 \(compute capability 9.0\)"):
        check_plan_target("engine 'p.plan'", engine, tensorrt_version="10.3.0.30",
                          gpu=GpuIdentity("NVIDIA H100", "9.0"))
    with pytest.raises(DMMError, match="compute capability 8.6"):
        check_plan_target("engine 'p.plan'", engine, tensorrt_version="10.3.0.30", gpu=GpuIdentity("Orin", "8.6"))


def test_a_plan_manifest_needs_its_engine_record(engines, tmp_path):
    plan = write_plan(engines["stream"], tmp_path / "s.plan", b"plan")
    manifest = read_manifest(manifest_path_for(plan))
    assert check_plan_manifest("p", manifest)["compute_capability"] == "8.7"
    partial = dataclasses.replace(manifest, engine={k: v for k, v in manifest.engine.items() if k != "gpu_name"})
    with pytest.raises(DMMError, match="missing gpu_name"):
        check_plan_manifest("p", partial)
    assert manifest.mode == "stream" and json.loads(manifest_path_for(plan).read_text())["engine"]["kind"] == PLAN_KIND


@pytest.mark.skipif(USABLE, reason="a GPU is usable here")
def test_without_a_gpu_the_gpu_probe_is_a_clear_error():
    with pytest.raises(DMMError, match="pycuda nor cuda-python|no CUDA GPU|no usable CUDA"):
        gpu_identity()
    usable, why = tensorrt_status()
    assert not usable and why


NO_CUDA_BINDINGS = importlib.util.find_spec("pycuda") is None and not any(
    importlib.util.find_spec(name.split(".")[0]) is not None for name in ("cuda.bindings", "cuda.cudart"))


@pytest.mark.skipif(not NO_CUDA_BINDINGS, reason="pycuda or a 'cuda' package is installed here")
def test_a_foreign_cuda_namespace_is_not_taken_for_cuda_python(tmp_path):
    """Another distribution's 'cuda' namespace package (cuda-pathfinder, cuda-core) is no cuda-python: the
    probe says so in one line instead of raising from inside the missing bindings."""
    (tmp_path / "cuda" / "pathfinder").mkdir(parents=True)
    (tmp_path / "cuda" / "pathfinder" / "__init__.py").write_text("")
    script = textwrap.dedent("""
        import importlib.util
        from contract.errors import DMMError
        from runtime.cuda_support import CudaUnavailable, import_cudart
        from runtime.tensorrt_support import gpu_identity
        assert importlib.util.find_spec("cuda") is not None  # what the old probe took for cuda-python
        try:
            import_cudart()
        except CudaUnavailable as why:
            print("cudart:", why)
        try:
            gpu_identity(0)
        except DMMError as error:
            print("identity:", error)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{tmp_path}"})
    assert result.returncode == 0, result.stderr
    cudart, identity = result.stdout.strip().splitlines()
    assert "cuda-python is not installed" in cudart and "without cuda.bindings or cuda.cudart" in cudart
    assert identity.startswith("identity: no usable CUDA GPU 0 here (pycuda is not installed, and cuda-python is not")
    assert "pip install -e '.[gpu]'" in identity


def test_a_trt_backend_device_must_be_an_index():
    for device in (-1, "0", True):
        with pytest.raises(DMMError, match=r"device .*; expected a CUDA device index"):
            TrtBackend("x.plan", device=device)  # pyright: ignore[reportArgumentType]  (refused on purpose)


def test_adopt_argument_errors_come_before_tensorrt(capsys, engines, tmp_path):
    onnx_path = copy_engine(engines["window"], tmp_path)
    plan = onnx_path.with_suffix(".plan")
    assert_one_line_error(capsys, cli.main(["adopt", str(tmp_path / "x.engine")]), "expected a NAME.plan")
    assert_one_line_error(capsys, cli.main(["adopt", str(plan)]), "does not exist",
                          f"trtexec --onnx={onnx_path} --saveEngine={plan}")
    plan.write_bytes(b"\0" * 256)
    assert_one_line_error(capsys, cli.main(["adopt", str(plan), "--onnx", str(tmp_path / "other.onnx")]),
                          "adopt:", "other.onnx", "does not exist")
    changed = tmp_path / "changed"
    changed.mkdir()
    changed_onnx = copy_engine(onnx_path, changed)
    changed_onnx.write_bytes(changed_onnx.read_bytes() + b"\0")
    (changed / plan.name).write_bytes(b"\0" * 256)
    assert_one_line_error(capsys, cli.main(["adopt", str(changed / plan.name)]), "adopt:", "sha256", "re-export")
    manifest_path_for(plan).write_text("{}")
    assert_one_line_error(capsys, cli.main(["adopt", str(plan)]), "already exists", "--force")
    assert manifest_path_for(plan).read_text() == "{}"  # untouched
    assert_one_line_error(capsys, cli.main(["adopt", str(plan), "--precision-check", "maybe"]),
                          "--precision-check")
    if not TRT_INSTALLED:
        assert_one_line_error(capsys, cli.main(["adopt", str(plan), "--force"]), "'tensorrt' package",
                              "pip install -e '.[gpu]'")
        assert manifest_path_for(plan).read_text() == "{}"


def test_build_options_are_checked():
    with pytest.raises(DMMError, match="--precision-check 'maybe'"):
        BuildConfig(onnx=Path("a.onnx"), precision_check="maybe").validate()
    with pytest.raises(DMMError, match="--device -1"):
        BuildConfig(onnx=Path("a.onnx"), device=-1).validate()


# -- the per-layer precision summary (the engine inspector's JSON) ------------------------------------


def _tensor(name: str, datatype: str) -> dict:
    return {"Name": name, "Dimensions": [1, 64], "Format/Datatype": datatype}


def _layer(name: str, datatype_in: str, datatype_out: str, nodes: list[str] | None = None, kind: str = "kgen",
           tactic: str = "sm87_kernel") -> dict:
    layer = {"Name": name, "LayerType": kind, "Inputs": [_tensor(f"{name}:in", datatype_in)],
             "Outputs": [_tensor(f"{name}:out", datatype_out)], "TacticName": tactic, "StreamId": 0}
    if nodes is not None:
        layer["Metadata"] = "\x1e".join(f"[ONNX Layer: {node}]" for node in nodes)
    return layer


def _pinned_manifest(engines, precision: str):
    manifest = read_manifest(manifest_path_for(engines["window"]))
    return dataclasses.replace(manifest, precision=precision)


def test_the_exported_manifest_names_the_fp32_pins(engines):
    pins = read_manifest(manifest_path_for(engines["window"])).exporter["precision_pins"]
    fp32, neutral = set(pins["fp32"]), set(pins["neutral"])
    for node in ("layer2/ssm/decay", "layer0/ssm/delta", "layer0/ssm/delta/exp", "layer2/ssm/terms", "layer1/ssm/y_C"):
        assert node in fp32, node
    assert not fp32 & {"embed/linear", "head", "layer0/ssm/in_proj", "layer0/dsm/dense"}  # the Linear layers
    assert "layer0/dsm/flatten" in neutral and not fp32 & neutral
    assert any(name.startswith("ln") or "norm" in name for name in fp32)  # the LayerNormalization nodes


def test_a_pinned_layer_in_fp16_fails_the_build_or_is_recorded(engines):
    manifest = _pinned_manifest(engines, "fp16")
    information = json.dumps({"Layers": [
        _layer("layer0/ssm/in_proj", "Half", "Half", ["layer0/ssm/in_proj"], tactic="sm87_xmma_gemm_f16f16"),
        _layer("layer0/ssm/dA_myl0_3", "Half", "Half", ["layer0/ssm/delta_A", "layer0/ssm/dA"]),  # the pin broken
        _layer("fused", "Half", "Float", ["layer0/ssm/in_proj/to_fp32", "layer0/ssm/sigmoid"]),  # with a Cast
        _layer("layer0/ssm/h1", "Float", "Float", ["layer0/ssm/h1_decay", "layer0/ssm/h1"]),
        _layer("{ForeignNode[layer1/ssm/dA...layer1/ssm/h7]}", "Float", "Float"),
        _layer("shape", "Int64", "Int64", ["layer0/dsm/flatten"], kind="shuffle"),
    ], "Bindings": ["states", "actions", "rtg", "action"]})
    summary = layer_summary(information, manifest)
    assert summary["profiling_verbosity"] == "detailed" and summary["layers"] == 6
    assert summary["by_precision"] == {"fp16": 3, "fp32": 2, "none": 1} and summary["reduced_precision_layers"] == 3
    assert summary["pinned_fp32_checked"] == 2 and summary["pinned_fp32_unverifiable"] == 2
    [offender] = summary["pinned_fp32_in_reduced_precision"]
    assert offender["onnx_nodes"] == ["layer0/ssm/delta_A", "layer0/ssm/dA"] and offender["precision"] == "fp16"
    assert summary["per_layer"][1]["inputs"] == ["fp16"] and summary["per_layer"][0]["type"] == "kgen"
    with pytest.raises(DMMError, match=r"1 layer\(s\) the graph keeps in fp32 .* layer0/ssm/dA_myl0_3 \(fp16\).*"
                                       r"--typing strong.*--precision-check warn"):
        check_layer_precisions("plan 'p.plan'", summary, manifest)
    warnings = check_layer_precisions("plan 'p.plan'", summary, manifest, precision_check="warn")
    assert len(warnings) == 1 and "run in reduced precision" in warnings[0]
    json.dumps(summary)  # it goes into the plan manifest as it is


def test_an_int8_plan_without_int8_layers_and_tf32_kernels_are_reported(engines):
    manifest = _pinned_manifest(engines, "int8")
    information = json.dumps({"Layers": [
        _layer("layer0/ssm/in_proj", "Float", "Float", ["layer0/ssm/in_proj/quantize", "layer0/ssm/in_proj"],
               tactic="sm80_xmma_gemm_f32f32_tf32f32_f32"),
        _layer("layer0/ssm/dA", "Float", "Float", ["layer0/ssm/dA"]),
    ]})
    summary = layer_summary(information, manifest)
    warnings = check_layer_precisions("plan 'p.plan'", summary, manifest)
    assert any("no layer of the plan runs in int8" in w and "fake-quant" in w for w in warnings)
    assert any("1 kernel(s) use TF32 although TF32 is off" in w for w in warnings)
    assert not check_layer_precisions("plan 'p.plan'", summary, manifest, tf32=True)[1:]


def test_an_fp32_plan_judges_every_layer(engines):
    manifest = _pinned_manifest(engines, "fp32")
    information = json.dumps({"Layers": [_layer("head", "Float", "Float", ["head"]),
                                         _layer("anything", "Float", "Half")]})
    summary = layer_summary(information, manifest)
    assert summary["pinned_fp32_checked"] == 2
    with pytest.raises(DMMError, match="anything \\(fp16\\)"):
        check_layer_precisions("plan 'p.plan'", summary, manifest)


def test_without_detailed_verbosity_nothing_is_judged(engines):
    manifest = _pinned_manifest(engines, "fp16")
    summary = layer_summary(json.dumps({"Layers": ["layer0/ssm/dA", "head"]}), manifest)
    assert summary["profiling_verbosity"] == "layer names only" and summary["per_layer"][0] == {"name": "layer0/ssm/dA"}
    [warning] = check_layer_precisions("plan 'p.plan'", summary, manifest)
    assert "--profilingVerbosity=detailed" in warning
    assert layer_summary("not json", manifest)["profiling_verbosity"] == "none"
    older = dataclasses.replace(manifest, exporter={})
    detailed = layer_summary(json.dumps({"Layers": [_layer("x", "Float", "Float", ["x"])]}), older)
    assert any("names no fp32-pinned nodes" in w for w in check_layer_precisions("p", detailed, older))


# -- with TensorRT and a GPU -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def plans(engines, tmp_path_factory):
    from export.trt_build import build_engine

    directory = tmp_path_factory.mktemp("plans")
    built = {}
    for mode, onnx_path in engines.items():
        local = copy_engine(onnx_path, directory)
        built[mode] = build_engine(BuildConfig(onnx=local))[0]
    return built


def _teacher_forced_actions(engine_path, observations, actions) -> np.ndarray:
    with load_backend(engine_path) as backend:
        policy = Policy(backend)
        out = []
        for t, observation in enumerate(observations):
            out.append(policy.act(observation, 1.0))
            policy.override_action(actions[t])
        return np.asarray(out)


@needs_gpu
def test_fp32_plans_match_onnx_runtime_teacher_forced(engines, plans):
    rng = np.random.default_rng(0)
    observations = rng.normal(size=(200, 11))
    actions = np.tanh(rng.normal(size=(200, 3))).astype(np.float32)
    for mode in ("window", "stream"):  # stream: 200 steps through the swapped device cache buffers
        trt_actions = _teacher_forced_actions(plans[mode], observations, actions)
        ort_actions = _teacher_forced_actions(engines[mode], observations, actions)
        assert np.abs(trt_actions - ort_actions).max() < FP32_ATOL, mode


@needs_gpu
def test_the_plan_manifest_records_the_target(plans):
    import tensorrt as trt

    manifest = read_manifest(manifest_path_for(plans["window"]))
    engine = manifest.engine
    gpu = gpu_identity()
    assert engine["tensorrt_version"] == trt.__version__
    assert (engine["gpu_name"], engine["compute_capability"]) == (gpu.name, gpu.compute_capability)
    assert engine["plan_sha256"] == sha256_bytes(plans["window"].read_bytes())
    assert engine["network"] == "strongly typed" and engine["tf32"] is False
    assert Path(engine["timing_cache"]).is_file()
    assert {t["name"] for t in engine["io"]} == {s.name for s in (*manifest.inputs, *manifest.outputs)}


@needs_gpu
def test_a_rebuild_reuses_the_timing_cache(plans):
    from export.trt_build import build_engine

    onnx_path = plans["window"].with_suffix(".onnx")
    _, manifest_path = build_engine(BuildConfig(onnx=onnx_path, out=onnx_path.with_name("again.plan")))
    assert read_manifest(manifest_path).engine["timing_cache_reused"] is True


@needs_gpu
def test_a_plan_whose_manifest_names_another_target_is_refused(plans, tmp_path):
    for field, value, fragment in (("tensorrt_version", "0.0.0", "plan built with TensorRT 0.0.0"),
                                   ("gpu_name", "Another GPU", "plan built on GPU Another GPU")):
        plan = copy_engine(plans["window"], tmp_path)
        manifest = read_manifest(manifest_path_for(plan))
        write_manifest(dataclasses.replace(manifest, engine={**manifest.engine, field: value}),
                       manifest_path_for(plan))
        with pytest.raises(DMMError, match=fragment.replace("|", r"\|")):
            load_backend(plan)


def _acts(backend, observations) -> np.ndarray:
    policy = Policy(backend)
    return np.asarray([policy.act(o, 1.0) for o in observations])


@needs_gpu
@pytest.mark.parametrize("cuda_graph", [False, pytest.param(True, marks=needs_cuda_graphs)])
def test_reset_zeroes_the_device_caches_from_either_buffer_parity(plans, cuda_graph):
    # An odd number of steps leaves the caches at parity 1 (reading buffer B): reset must zero both
    # buffers and go back to parity 0, with and without the CUDA graphs that bake in the addresses.
    observations = np.random.default_rng(1).normal(size=(7, 11))
    with TrtBackend(plans["stream"], cuda_graph=cuda_graph).load() as backend:
        policy = Policy(backend)
        first = [policy.act(o, 1.0) for o in observations]
        buffers = backend._buffers
        assert buffers is not None and buffers.parity == 1
        policy.reset()
        assert buffers.parity == 0
        again = [policy.act(o, 1.0) for o in observations]
        if cuda_graph:
            assert backend.graphs_in_use == 2 and backend.graph_launches > 0, backend.warnings
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))


@needs_gpu
@needs_cuda_graphs
def test_cuda_graphs_are_used_and_give_the_same_actions(plans):
    observations = np.random.default_rng(2).normal(size=(30, 11))
    for mode, graphs in (("window", 1), ("stream", 2)):
        with TrtBackend(plans[mode]).load() as plain:
            expected = _acts(plain, observations)
            assert plain.graph_launches == 0
        with TrtBackend(plans[mode], cuda_graph=True).load() as backend:
            actions = _acts(backend, observations)
            # Every step after each parity's first (uncaptured warm-up + capture) replays a graph.
            assert backend.graphs_in_use == graphs and not backend.warnings, backend.warnings
            assert backend.graph_launches >= len(observations) - graphs
            assert backend.provider.endswith("(CUDA graph)")
        np.testing.assert_array_equal(expected, actions)


@needs_gpu
def test_a_backend_runs_from_another_thread_and_closes_at_exit(plans):
    import threading

    observations = np.random.default_rng(3).normal(size=(5, 11))
    with load_backend(plans["stream"]) as backend:
        expected = _acts(backend, observations)
        found: dict = {}

        def callback():  # a ROS-style callback thread: the context is pushed for every call
            try:
                found["actions"] = _acts(backend, observations)
            except Exception as error:  # reported to the test thread
                found["error"] = error

        worker = threading.Thread(target=callback)
        worker.start()
        worker.join(60)
        assert "error" not in found, found.get("error")
        np.testing.assert_array_equal(expected, found["actions"])
    script = textwrap.dedent(f"""
        from runtime import load_backend, Policy
        backend = load_backend({str(plans["window"])!r})
        Policy(backend).act([0.0] * 11, 0.0)
        print("left open")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0 and result.stdout.strip() == "left open", result.stderr
    assert "error" not in result.stderr.lower() and "Traceback" not in result.stderr, result.stderr


@needs_gpu
def test_cli_run_drives_a_plan_through_the_same_loop(capsys, plans):
    code = cli.main(["run", "--engine", str(plans["window"]), "--episodes", "1", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["backend"] == "trt" and report["provider"].startswith("TensorRT ")
    assert report["lengths"][0] > 0


@needs_gpu
def test_the_plan_manifest_records_each_layers_precision(plans):
    engine = read_manifest(manifest_path_for(plans["window"])).engine
    layers = engine["layers"]
    assert layers["profiling_verbosity"] == "detailed" and layers["layers"] == len(layers["per_layer"]) > 0
    assert layers["reduced_precision_layers"] == 0 and not layers["pinned_fp32_in_reduced_precision"]
    assert layers["pinned_fp32_checked"] > 0 and layers["tf32_kernels"] == 0  # TF32 off: true fp32 GEMMs
    assert engine["device"] == 0 and engine["built_by"] == "cli.py build"


@needs_gpu
def test_a_corrupt_timing_cache_is_replaced_by_an_empty_one(plans, tmp_path):
    from export.trt_build import build_engine

    onnx_path = copy_engine(plans["window"].with_suffix(".onnx"), tmp_path)
    cache = tmp_path / "corrupt.timing-cache"
    cache.write_bytes(b"not a timing cache" * 64)
    _, manifest_path = build_engine(BuildConfig(onnx=onnx_path, timing_cache=cache))
    engine = read_manifest(manifest_path).engine
    # TensorRT either cannot read the bytes (create_timing_cache returns None or raises) or reads a cache
    # that set_timing_cache refuses: both are a rejection, and the build starts from an empty cache.
    assert engine["timing_cache_reused"] is False
    assert engine["timing_cache_status"] in (TIMING_CACHE_STATUS["unreadable"], TIMING_CACHE_STATUS["mismatch"])
    assert cache.read_bytes() != b"not a timing cache" * 64  # the new cache was written back
    _, manifest_path = build_engine(BuildConfig(onnx=onnx_path, timing_cache=cache, out=tmp_path / "again.plan"))
    assert read_manifest(manifest_path).engine["timing_cache_status"] == "reused"


@needs_gpu
def test_build_on_another_device_makes_it_current(engines, tmp_path):
    import pycuda.driver as cuda  # pyright: ignore[reportMissingImports]  (source-only: no type information)

    from export.trt_build import build_engine

    cuda.init()
    if cuda.Device.count() < 2:
        pytest.skip("needs two CUDA devices to tell --device 1 from the default")
    onnx_path = copy_engine(engines["window"], tmp_path)
    plan, manifest_path = build_engine(BuildConfig(onnx=onnx_path, device=1))
    engine = read_manifest(manifest_path).engine
    assert (engine["gpu_name"], engine["compute_capability"]) == astuple(gpu_identity(1))
    with TrtBackend(plan, device=1).load() as backend:
        assert _acts(backend, np.zeros((2, 11))).shape == (2, 3)


def astuple(gpu: GpuIdentity) -> tuple[str, str]:
    return gpu.name, gpu.compute_capability


@needs_gpu
def test_a_trtexec_plan_is_adopted_and_runs(capsys, engines, tmp_path):
    """A plan without manifest, as trtexec --saveEngine leaves it: refused with the way to adopt it, adopted
    (I/O checked against the ONNX's manifest), then equal to ONNX Runtime."""
    import shutil

    import tensorrt as trt

    onnx_path = copy_engine(engines["stream"], tmp_path)
    plan = onnx_path.with_suffix(".plan")
    trtexec = shutil.which("trtexec")
    if trtexec:
        subprocess.run([trtexec, f"--onnx={onnx_path}", f"--saveEngine={plan}", "--stronglyTyped", "--noTF32",
                        "--profilingVerbosity=detailed"], check=True, capture_output=True, timeout=600)
    else:  # what trtexec does, through TensorRT's Python API
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        assert trt.OnnxParser(network, logger).parse_from_file(str(onnx_path))
        config = builder.create_builder_config()
        config.clear_flag(trt.BuilderFlag.TF32)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        plan.write_bytes(bytes(builder.build_serialized_network(network, config)))
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(plan)]), "has no manifest", "cli.py adopt")
    assert cli.main(["adopt", str(plan)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {manifest_path_for(plan)} for {plan} (adopted: TensorRT {trt.__version__}")
    engine = read_manifest(manifest_path_for(plan)).engine
    assert engine["built_by"].startswith("adopted") and engine["layers"]["profiling_verbosity"] == "detailed"
    rng = np.random.default_rng(4)
    observations, actions = rng.normal(size=(50, 11)), np.tanh(rng.normal(size=(50, 3))).astype(np.float32)
    assert np.abs(_teacher_forced_actions(plan, observations, actions)
                  - _teacher_forced_actions(onnx_path, observations, actions)).max() < FP32_ATOL


@pytest.fixture(scope="module")
def low_precision_exports(tmp_path_factory):
    """(checkpoint, dataset, {(precision, mode): onnx}) of a dataset-backed checkpoint."""
    from export.onnx_export import export_checkpoint
    from export.precision import PrecisionOptions
    from tests.helpers import dataset_checkpoint

    checkpoint_path, dataset_dir = dataset_checkpoint(tmp_path_factory)
    directory = tmp_path_factory.mktemp("low-precision")
    options = PrecisionOptions(dataset=str(dataset_dir), score_episodes=2, calibration_samples=64)
    exported = {}
    for mode in ("window", "stream"):
        exported[("fp32", mode)] = export_checkpoint(checkpoint_path, mode=mode, out=directory / f"fp32-{mode}")[0]
        for precision in ("fp16", "int8"):
            exported[(precision, mode)] = export_checkpoint(checkpoint_path, mode=mode, precision=precision,
                                                            out=directory / f"{precision}-{mode}",
                                                            precision_options=options)[0]
    return checkpoint_path, dataset_dir, exported


def _heldout_trajectory_actions(backend_or_session_path, dataset_dir, checkpoint_path, limit: int = 200):
    """Actions along a held-out dataset episode, teacher-forced, through a Policy (either mode)."""
    from calibration.data import load_training_dataset, split_episodes
    from dmm_train.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    episode = split_episodes(load_training_dataset(checkpoint, str(dataset_dir))).heldout[0]
    steps = min(limit, len(episode.actions))
    return _teacher_forced_actions(backend_or_session_path, episode.observations[:steps],
                                   np.asarray(episode.actions[:steps], np.float32))


@needs_gpu
@pytest.mark.parametrize("mode", ["window", "stream"])
def test_fp16_and_int8_plans_within_their_tolerances(low_precision_exports, mode):
    """Both modes: the stream plans carry their fp16/int8 caches on the device, step after step."""
    from export.trt_build import build_engine

    checkpoint_path, dataset_dir, exported = low_precision_exports
    reference = _heldout_trajectory_actions(exported[("fp32", mode)], dataset_dir, checkpoint_path)
    for precision in ("fp16", "int8"):
        onnx_path = exported[(precision, mode)]
        plan, manifest_path = build_engine(BuildConfig(onnx=onnx_path))
        engine = read_manifest(manifest_path).engine
        assert engine["layers"]["by_precision"].get(precision), engine["layers"]["by_precision"]
        assert not engine["layers"]["pinned_fp32_in_reduced_precision"]
        trt_actions = _heldout_trajectory_actions(plan, dataset_dir, checkpoint_path)
        ort_actions = _heldout_trajectory_actions(onnx_path, dataset_dir, checkpoint_path)
        if precision == "fp16":
            assert np.abs(trt_actions - ort_actions).mean() < FP16_MEAN_ABS
        else:  # judged by the action RMSE against fp32 (TensorRT may place and fuse Q/DQ differently)
            assert np.sqrt(np.mean((trt_actions - reference) ** 2)) < tolerance("trt-vs-ort", "int8").rmse


@needs_gpu
def test_a_weakly_typed_fp16_build_keeps_the_pins_or_says_so(low_precision_exports, tmp_path):
    import tensorrt as trt

    from export.trt_build import build_engine

    if int(trt.__version__.split(".")[0]) >= 11:
        pytest.skip(f"TensorRT {trt.__version__}: weak typing exists on 10.x only")
    checkpoint_path, dataset_dir, exported = low_precision_exports
    onnx_path = copy_engine(exported[("fp16", "window")], tmp_path)
    # The pins may be ignored inside fused regions under weak typing: the build then fails with the
    # layers named, or (warn) records them; either way the manifest says what ran.
    try:
        plan, manifest_path = build_engine(BuildConfig(onnx=onnx_path, typing="weak"))
    except DMMError as error:
        assert "run in reduced precision" in str(error)
        plan, manifest_path = build_engine(BuildConfig(onnx=onnx_path, typing="weak", precision_check="warn"))
        assert read_manifest(manifest_path).engine["precision_warnings"]
    engine = read_manifest(manifest_path).engine
    assert engine["network"].startswith("weakly typed") and "FP16" in engine["builder_flags"]
    trt_actions = _heldout_trajectory_actions(plan, dataset_dir, checkpoint_path)
    ort_actions = _heldout_trajectory_actions(onnx_path, dataset_dir, checkpoint_path)
    assert np.abs(trt_actions - ort_actions).mean() < FP16_MEAN_ABS
