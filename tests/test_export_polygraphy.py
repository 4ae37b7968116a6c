"""The Polygraphy data loader written beside every ONNX (export/polygraphy_check.py), and the per-precision
names of the exports.

On the CPU: the script runs with plain Python and numpy, yields feeds of the manifest's inputs that
ONNX Runtime accepts, and (where polygraphy is installed) Polygraphy's own ONNX Runtime runner
takes it. On a GPU: the TensorRT backend's outputs equal Polygraphy's TrtRunner's on the same plan.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cli
from contract.manifest import manifest_path_for, read_manifest
from export.polygraphy_check import data_loader_paths, polygraphy_tolerance_args
from runtime.ort_backend import cpu_session
from tests.helpers import REPO_ROOT, copy_engine, dataset_checkpoint, gpu_runtime_usable

GPU_USABLE, GPU_WHY = gpu_runtime_usable()
POLYGRAPHY = shutil.which("polygraphy") or (
    str(os.path.join(os.path.dirname(sys.executable), "polygraphy"))
    if os.path.exists(os.path.join(os.path.dirname(sys.executable), "polygraphy")) else None)


def load_feeds(script, cwd) -> list[dict[str, np.ndarray]]:
    """Run the data loader in a fresh interpreter that sees neither the project nor its dependencies but
    numpy, and bring the feeds back through an .npz."""
    out = cwd / "feeds.npz"
    code = textwrap.dedent(f"""
        import runpy, sys
        import numpy as np
        assert not any(name in sys.modules for name in ("onnx", "onnxruntime", "torch", "runtime", "contract"))
        feeds = list(runpy.run_path({str(script)!r})["load_data"]())
        np.savez({str(out)!r}, count=len(feeds), **{{f"{{i}}.{{k}}": v for i, f in enumerate(feeds)
                                                   for k, v in f.items()}})
    """)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    with np.load(out) as archive:
        count = int(archive["count"])
        keys = [key for key in archive.files if key != "count"]
        return [{key.split(".", 1)[1]: archive[key] for key in keys if key.startswith(f"{index}.")}
                for index in range(count)]


@pytest.mark.parametrize("mode", ["window", "stream"])
def test_the_data_loader_yields_real_feeds_onnx_runtime_accepts(engines, tmp_path, mode):
    onnx_path = engines[mode]
    manifest = read_manifest(manifest_path_for(onnx_path))
    record = manifest.exporter["polygraphy"]
    script, inputs = data_loader_paths(onnx_path)
    assert (record["data_loader_script"], record["inputs"]) == (script.name, inputs.name)
    assert "." not in script.stem  # Polygraphy imports the script by its file name
    feeds = load_feeds(script, tmp_path)
    assert len(feeds) == record["feeds"] == 16
    session = cpu_session(onnx_path.read_bytes())
    for feed in feeds:
        assert set(feed) == {spec.name for spec in manifest.inputs}
        for spec in manifest.inputs:
            assert feed[spec.name].dtype == np.dtype(spec.dtype) and feed[spec.name].shape == spec.shape
        outputs = session.run(None, feed)
        assert all(np.isfinite(output).all() for output in outputs)
    if mode == "stream":  # real caches: not all zero, and different from step to step
        caches = np.stack([feed["ssm_state"] for feed in feeds])
        assert np.abs(caches).max() > 0 and len({caches[i].tobytes() for i in range(len(feeds))}) > 8
    else:  # real windows: later ones full (no zero left padding)
        assert np.abs(feeds[-1]["states"][0, 0]).sum() > 0
    assert record["command"].startswith(f"polygraphy run {onnx_path.name} --trt --strongly-typed --onnxrt "
                                        f"--data-loader-script {script.name} --atol 0.0001 --rtol 0")
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config",
                           str(REPO_ROOT / "pyproject.toml"), str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout  # the written script is as clean as the project's own


def test_the_command_carries_each_precisions_tolerance():
    assert polygraphy_tolerance_args("fp32")[0] == ["--atol", "0.0001", "--rtol", "0"]
    assert polygraphy_tolerance_args("fp16")[0] == ["--check-error-stat", "mean", "--atol", "0.01", "--rtol", "0"]
    options, meaning = polygraphy_tolerance_args("int8")
    assert options[-4:] == ["--atol", "0.05", "--rtol", "0"] and "no RMS statistic" in meaning


@pytest.mark.skipif(POLYGRAPHY is None, reason="polygraphy is not installed (pip install polygraphy)")
def test_polygraphy_runs_the_data_loader_on_onnx_runtime(engines, tmp_path):
    onnx_path = copy_engine(engines["stream"], tmp_path)
    for path in data_loader_paths(engines["stream"]):
        shutil.copy(path, tmp_path / path.name)
    script = data_loader_paths(onnx_path)[0]
    result = subprocess.run([POLYGRAPHY, "run", onnx_path.name, "--onnxrt", "--data-loader-script", script.name],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "PASSED" in result.stdout + result.stderr, result.stdout + result.stderr
    assert "Iteration: 15" in result.stdout + result.stderr  # all 16 feeds ran


def test_export_export_fp16_export_int8_leave_three_graphs(capsys, tmp_path_factory, tmp_path, monkeypatch):
    checkpoint, dataset = dataset_checkpoint(tmp_path_factory)
    monkeypatch.chdir(tmp_path)
    common = ["export", "--checkpoint", str(checkpoint), "--no-engine"]
    low = ["--dataset", str(dataset), "--score-episodes", "2"]
    for args in ([], ["--fp16", *low], ["--int8", *low, "--calibration-windows", "32"]):
        assert cli.main([*common, *args]) == 0, capsys.readouterr().err
    capsys.readouterr()
    for name, precision in (("hopper", "fp32"), ("hopper-fp16", "fp16"), ("hopper-int8", "int8")):
        onnx_path = tmp_path / f"{name}.onnx"
        manifest = read_manifest(manifest_path_for(onnx_path))
        assert manifest.precision == precision and manifest.mode == "window", name
        script, inputs = data_loader_paths(onnx_path)
        assert script.is_file() and inputs.is_file()
        assert manifest.exporter["polygraphy"]["command"].startswith(f"polygraphy run {name}.onnx ")
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["hopper-fp16.onnx", "hopper-int8.onnx", "hopper.onnx"]
    fp16 = read_manifest(tmp_path / "hopper-fp16.json")
    assert "--check-error-stat mean --atol 0.01" in fp16.exporter["polygraphy"]["command"]
    assert "held-out episodes" in fp16.exporter["polygraphy"]["source"]  # --dataset: real dataset windows
    pins = fp16.exporter["precision_pins"]["fp32"]
    assert pins and not any(name.endswith(("/to_fp16", "/to_fp32")) for name in pins)
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--mode", "stream", "--no-engine"]) == 0
    assert (tmp_path / "hopper-stream.onnx").is_file() and read_manifest(tmp_path / "hopper.json").mode == "window"


@pytest.mark.skipif(not GPU_USABLE, reason=f"needs TensorRT, pycuda and an NVIDIA GPU ({GPU_WHY.split(';')[0]})")
@pytest.mark.skipif(importlib.util.find_spec("polygraphy") is None, reason="polygraphy is not installed")
@pytest.mark.parametrize("mode", ["window", "stream"])
def test_the_trt_backend_equals_polygraphys_trt_runner(engines, tmp_path, mode):
    """The same plan through the project's backend and Polygraphy's TrtRunner, on the data loader's feeds."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from export.trt_build import BuildConfig, build_engine
    from runtime.trt_backend import TrtBackend

    onnx_path = copy_engine(engines[mode], tmp_path)
    for path in data_loader_paths(engines[mode]):
        shutil.copy(path, tmp_path / path.name)
    plan, _ = build_engine(BuildConfig(onnx=onnx_path))
    feeds = load_feeds(data_loader_paths(onnx_path)[0], tmp_path)
    with TrtRunner(EngineFromBytes(plan.read_bytes())) as runner, TrtBackend(plan).load() as backend:
        for feed in feeds:  # each feed carries its own caches: the backend uploads them every call
            theirs = runner.infer(feed)
            ours = backend.infer(feed)
            for name, value in ours.items():
                np.testing.assert_allclose(value, np.asarray(theirs[name]), rtol=0, atol=1e-6, err_msg=name)
