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
from export.trt_build import BuildConfig, engine_after_export, tensorrt_status
from runtime import Policy, load_backend
from runtime.tensorrt_support import (
    PLAN_KIND,
    GpuIdentity,
    check_plan_manifest,
    check_plan_target,
    gpu_identity,
)
from runtime.trt_backend import TrtBackend
from tests.helpers import assert_one_line_error, copy_engine

REPO_ROOT = Path(__file__).resolve().parent.parent
TRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None
USABLE, WHY = tensorrt_status()
needs_gpu = pytest.mark.skipif(not USABLE, reason=f"needs TensorRT and an NVIDIA GPU ({WHY.split(';')[0]})")
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
        import cli, runtime, runtime.trt_backend, runtime.backends, export.trt_build, export.precision
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
    assert_one_line_error(capsys, code, "'tensorrt' package, which is not installed", "dmm-deploy[gpu]",
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

    bare = tmp_path / "random.plan"
    bare.write_bytes(data)
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(bare)]), "random.plan.json", "does not exist")

    # A plan beside the ONNX manifest: a manifest, but no engine record.
    foreign = tmp_path / "foreign.plan"
    foreign.write_bytes(data)
    manifest_path_for(foreign).write_text(manifest_path_for(engines["window"]).read_text())
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(foreign)]), "no TensorRT engine record",
                          "cli.py build")

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
                              "dmm-deploy[gpu]")


def test_a_plan_for_another_tensorrt_or_gpu_is_refused():
    engine = {"tensorrt_version": "10.3.0.30", "gpu_name": "Orin", "compute_capability": "8.7"}
    here = GpuIdentity("Orin", "8.7")
    check_plan_target("engine 'p.plan'", engine, tensorrt_version="10.3.0.30", gpu=here)  # the same: accepted
    with pytest.raises(DMMError, match=r"TensorRT \| plan built with 10.3.0.30 \| this machine has 11.4.0.106; "
                                       r"rebuild the plan on this machine: python cli.py build"):
        check_plan_target("engine 'p.plan'", engine, tensorrt_version="11.4.0.106", gpu=here)
    with pytest.raises(DMMError, match=r"GPU \| plan built on Orin \(compute capability 8.7\) \| this machine "
                                       r"has NVIDIA H100 \(compute capability 9.0\)"):
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
    with pytest.raises(DMMError, match="pycuda or cuda-python|no CUDA GPU|no usable CUDA"):
        gpu_identity()
    usable, why = tensorrt_status()
    assert not usable and why


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
    for field, value, fragment in (("tensorrt_version", "0.0.0", "TensorRT | plan built with 0.0.0"),
                                   ("gpu_name", "Another GPU", "GPU | plan built on Another GPU")):
        plan = copy_engine(plans["window"], tmp_path)
        manifest = read_manifest(manifest_path_for(plan))
        write_manifest(dataclasses.replace(manifest, engine={**manifest.engine, field: value}),
                       manifest_path_for(plan))
        with pytest.raises(DMMError, match=fragment.replace("|", r"\|")):
            load_backend(plan)


@needs_gpu
def test_reset_zeroes_the_device_caches(plans):
    observations = np.random.default_rng(1).normal(size=(10, 11))
    with load_backend(plans["stream"]) as backend:
        policy = Policy(backend)
        first = [policy.act(o, 1.0) for o in observations]
        policy.reset()
        again = [policy.act(o, 1.0) for o in observations]
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))


@needs_gpu
@pytest.mark.skipif(importlib.util.find_spec("cuda") is None, reason="CUDA graphs need cuda-python")
def test_cuda_graphs_give_the_same_actions(plans):
    observations = np.random.default_rng(2).normal(size=(30, 11))
    for mode in ("window", "stream"):
        results = []
        for cuda_graph in (False, True):
            with TrtBackend(plans[mode], cuda_graph=cuda_graph).load() as backend:
                policy = Policy(backend)
                results.append(np.asarray([policy.act(o, 1.0) for o in observations]))
        np.testing.assert_array_equal(results[0], results[1])


@needs_gpu
def test_cli_run_drives_a_plan_through_the_same_loop(capsys, plans):
    code = cli.main(["run", "--engine", str(plans["window"]), "--episodes", "1", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["backend"] == "trt" and report["provider"].startswith("TensorRT ")
    assert report["lengths"][0] > 0


@needs_gpu
def test_fp16_and_int8_plans_within_their_tolerances(tmp_path_factory, tmp_path):
    import onnx

    from calibration.data import load_training_dataset, split_episodes, window_samples
    from dmm_train.checkpoint import load_checkpoint
    from export.onnx_export import export_checkpoint
    from export.precision import PrecisionOptions, fp16_emulation
    from export.trt_build import build_engine
    from runtime.ort_backend import cpu_session
    from tests.helpers import dataset_checkpoint

    checkpoint_path, dataset_dir = dataset_checkpoint(tmp_path_factory)
    checkpoint = load_checkpoint(checkpoint_path)
    split = split_episodes(load_training_dataset(checkpoint, str(dataset_dir)))
    options = PrecisionOptions(dataset=str(dataset_dir), score_episodes=1, calibration_samples=64)
    fp32_onnx, fp32_manifest = export_checkpoint(checkpoint_path, out=tmp_path / "fp32")
    manifest = read_manifest(fp32_manifest)
    feeds = window_samples(split.heldout, 64, context_len=manifest.context_len, state_mean=manifest.state_mean,
                           state_std=manifest.state_std, rtg_scale=manifest.rtg_scale,
                           target_return=manifest.target_return)
    fp32 = cpu_session(fp32_onnx.read_bytes(), optimize=True)
    reference = np.concatenate([fp32.run(["action"], f)[0] for f in feeds])
    for precision in ("fp16", "int8"):
        onnx_path, _ = export_checkpoint(checkpoint_path, out=tmp_path / precision, precision=precision,
                                         precision_options=options)
        plan, _ = build_engine(BuildConfig(onnx=onnx_path))
        low = onnx.load(str(onnx_path))
        evaluated = fp16_emulation(low) if precision == "fp16" else low  # what the CPU accuracy report runs
        ort_low = cpu_session(evaluated.SerializeToString(), optimize=False)
        with load_backend(plan) as backend:
            trt_actions = np.concatenate([backend.infer(f)["action"].copy() for f in feeds])  # buffers are reused
        ort_actions = np.concatenate([ort_low.run(["action"], f)[0] for f in feeds])
        if precision == "fp16":
            assert np.abs(trt_actions - ort_actions).mean() < FP16_MEAN_ABS
        else:  # judged by the action RMSE against fp32 (TensorRT may place and fuse Q/DQ differently)
            assert np.sqrt(np.mean((trt_actions - reference) ** 2)) < 3e-2
