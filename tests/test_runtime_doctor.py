"""'cli.py doctor': the environment record on any machine, and an engine's backends, parity and latency.

On a machine without TensorRT / pycuda / cuda-python (this one) the record says so, with what to
install, and exits 0; a real exported graph is loaded, driven along a recorded Hopper-v5
trajectory and timed.
"""

from __future__ import annotations

import json

import cli
from tests.helpers import assert_one_line_error, copy_engine

COMPONENTS = ("numpy", "onnxruntime", "tensorrt", "pycuda", "cuda-python", "torch", "gymnasium")


def doctor(capsys, *args: str) -> dict:
    code = cli.main(["doctor", "--json", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_doctor_json_is_a_record_for_a_bug_report(capsys):
    report = doctor(capsys)
    assert report["kind"] == "dmm-deploy-doctor" and report["format_version"] == 1
    environment = report["environment"]
    assert set(COMPONENTS) <= set(environment["components"]) and environment["python"].count(".") == 2
    for name, component in environment["components"].items():
        assert set(component) >= {"installed", "usable", "detail"}, name
        if not component["usable"]:
            assert component["install"], name  # the one thing to install
    onnxruntime = environment["components"]["onnxruntime"]
    assert onnxruntime["usable"] and "CPUExecutionProvider" in onnxruntime["providers"]
    if not environment["gpus"]:
        assert "NVIDIA GPU" in environment["gpu_install"]
    if not environment["components"]["tensorrt"]["usable"]:
        assert "'tensorrt' package" in environment["components"]["tensorrt"]["detail"] or \
            "does not import" in environment["components"]["tensorrt"]["detail"]


def test_doctor_text_names_each_component(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in (*COMPONENTS, "cuda", "gpu"):
        assert any(line.startswith(name) for line in out.splitlines()), name


def test_doctor_runs_an_engine_and_times_it(capsys, engines, tmp_path):
    onnx_path = copy_engine(engines["stream"], tmp_path)
    report = doctor(capsys, "--engine", str(onnx_path), "--steps", "40")["engine"]
    backends = {item["backend"]: item for item in report["backends"]}
    cpu = backends["ort cpu"]
    assert cpu["loads"] and cpu["mode"] == "stream" and cpu["latency_ms"]["steps"] == 40
    assert 0 < cpu["latency_ms"]["p50"] <= cpu["latency_ms"]["p99"] <= cpu["latency_ms"]["max"]
    assert not backends["trt"]["loads"] and "python cli.py build" in backends["trt"]["detail"]
    assert report["trajectory"]["steps"] == 40 and report["trajectory"]["env_id"] == "Hopper-v5"
    if all(not item["loads"] for label, item in backends.items() if label != "ort cpu"):
        assert "nothing to compare with" in report["comparison"]
    else:
        for value in report["comparison"].values():
            assert value["against"] == "ort cpu" and value["max_abs"] >= value["mean_abs"] >= 0


def test_doctor_on_a_plan_without_manifest_says_how_to_adopt_it(capsys, engines, tmp_path):
    onnx_path = copy_engine(engines["window"], tmp_path)
    plan = onnx_path.with_suffix(".plan")
    plan.write_bytes(b"\0" * 128)  # what trtexec --saveEngine leaves: a plan and no manifest
    report = doctor(capsys, "--engine", str(plan), "--steps", "20")["engine"]
    backends = {item["backend"]: item for item in report["backends"]}
    assert not backends["trt"]["loads"] and "python cli.py adopt" in backends["trt"]["detail"]
    assert backends["ort cpu"]["loads"] and backends["ort cpu"]["path"] == str(onnx_path)  # the plan's ONNX


def test_doctor_on_a_missing_engine_is_one_line(capsys, tmp_path):
    assert_one_line_error(capsys, cli.main(["doctor", "--engine", str(tmp_path / "none.plan")]), "does not exist")
