"""Which Linears an int8 export quantizes: --int8-layers all | auto | LIST (export/precision.py, calibration/qdq.py).

Real graphs of a trained checkpoint, real ONNX Runtime sessions, a real Minari dataset and real Hopper-v5
episodes for the score gate; the TensorRT side is checked through the plan manifest's per-layer summary.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

import cli
from calibration.int8 import linear_macs, listed_int8_layers
from calibration.qdq import check_qdq, float_linears, quantize_qdq
from contract.errors import DMMError
from contract.graph_roles import INT8_ROLES, linear_nodes
from contract.manifest import manifest_path_for, read_manifest
from dmm_train.checkpoint import load_checkpoint
from export.onnx_export import build_graph
from export.precision import precision_summary
from export.trt_build import _with_fp32_linears_pinned
from runtime.ort_backend import cpu_session
from runtime.tensorrt_support import check_layer_precisions, layer_summary
from tests.helpers import assert_one_line_error, trained_checkpoint

SMALL = ["--calibration-windows", "64", "--score-episodes", "2", "--accept-inconclusive", "--no-engine"]


@pytest.fixture(scope="module")
def trained_on(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def graphs(trained_on):
    model = load_checkpoint(trained_on[0]).model.eval()
    return {mode: build_graph(model, mode=mode, precision="int8") for mode in ("window", "stream")}


def candidates_of(proto) -> list[str]:
    return [name for name, role in linear_nodes(proto).items() if role in INT8_ROLES]


def export_int8(capsys, trained_on, out, *args) -> tuple[onnx.ModelProto, object]:
    checkpoint, dataset = trained_on
    code = cli.main(["export", "--checkpoint", str(checkpoint), "--int8", "--dataset", str(dataset),
                     "--out", str(out), *SMALL, *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    onnx_path = out.with_suffix(".onnx")
    return onnx.load(str(onnx_path)), read_manifest(manifest_path_for(onnx_path))


def quantized_linears(proto) -> list[str]:
    return precision_summary(proto, "int8")["low_precision_linears"]


# -- the graph -----------------------------------------------------------------------------------


def test_float_linears_is_the_graph_quantized_without_them(graphs):
    proto = graphs["stream"]
    rng = np.random.default_rng(0)
    feeds = [{i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
              for i in proto.graph.input} for _ in range(16)]
    kept = ["layer0/ssm/out_proj", "layer1/dsm/dense"]
    everything, _ = quantize_qdq(proto, feeds, method="minmax")
    assert quantized_linears(everything) == sorted(candidates_of(proto))  # all: every projection
    swept = float_linears(everything, proto, kept)
    direct, details = quantize_qdq(proto, feeds, method="minmax", float_layers=kept)
    expected = sorted(set(candidates_of(proto)) - set(kept))
    assert quantized_linears(swept) == quantized_linears(direct) == details["quantized_linears"] == expected
    assert details["float_linears"] == sorted(kept) and not check_qdq(direct, set(expected))
    nodes = {node.name: node for node in direct.graph.node}
    originals = {node.name: node for node in proto.graph.node}
    for name in kept:  # the fp32 activation and the fp32 weight, as in the fp32 graph
        assert list(nodes[name].input) == list(originals[name].input)
    # One calibration serves every choice: the swept graph computes what the directly quantized one does.
    outputs = [cpu_session(g.SerializeToString(), optimize=False).run(None, feeds[3]) for g in (swept, direct)]
    for a, b in zip(*outputs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_linear_macs_count_the_tokens_each_mode_runs_on(graphs):
    window, stream = linear_macs(graphs["window"]), linear_macs(graphs["stream"])
    weights = {init.name: list(init.dims) for init in graphs["stream"].graph.initializer}
    nodes = {node.name: node for node in graphs["stream"].graph.node}
    # A stream step runs each projection on the step's tokens (return, state, action): rows x K x N.
    rows = {stream[name] / np.prod(weights[nodes[name].input[1]]) for name in candidates_of(graphs["stream"])}
    assert rows == {3}
    # A window runs it on the window's tokens (the last action is not an input: 3 K - 1), except where the
    # lowering computes only the token the action is read from (the last layer's out_proj): the count is
    # what the graph computes.
    states = next(i for i in graphs["window"].graph.input if i.name == "states")
    context_len = states.type.tensor_type.shape.dim[1].dim_value
    window_rows = {name: window[name] / stream[name] * 3 for name in candidates_of(graphs["window"])}
    assert window_rows.pop("layer2/ssm/out_proj") == 1
    assert set(window_rows.values()) == {3 * context_len - 1}


def test_int8_layer_lists_are_checked(graphs):
    names = candidates_of(graphs["window"])
    assert listed_int8_layers("auto", names) is None and listed_int8_layers("all", names) == names
    assert listed_int8_layers(f" {names[5]}, {names[1]} ", names) == [names[1], names[5]]  # graph order
    with pytest.raises(DMMError, match=r"unknown Linear layer\(s\) head, layer9/ssm/x_proj; expected auto, all"):
        listed_int8_layers("head,layer9/ssm/x_proj", names)


# -- cli export ----------------------------------------------------------------------------------


def test_auto_keeps_every_layer_int8_when_the_target_is_met(capsys, trained_on, graphs, tmp_path):
    proto, manifest = export_int8(capsys, trained_on, tmp_path / "auto")
    record, accuracy = manifest.exporter["precision_pass"], manifest.accuracy
    names = candidates_of(graphs["window"])  # the fp32 graph's names: the int8 graph reads DQ'd weights
    assert record["int8_layers_choice"] == "auto" and record["int8_layers_target"] == 0.005  # DEFAULT_INT8_TARGET
    assert accuracy["max_action_error"] == 0.02  # the int8 limit: a quarter of it is auto's default target
    [step] = record["int8_selection"]  # the all-int8 graph met it: no layer kept, no sweep needed
    assert step["fp32_layers"] == [] and step["rmse_relative"] <= 0.005 and "int8_sensitivity" not in record
    assert record["int8_layers"] == {name: "int8" for name in names}
    assert quantized_linears(proto) == sorted(names)
    assert record["int8_action_rmse_relative"] == accuracy["action_rmse_relative"] == pytest.approx(
        step["rmse_relative"], rel=1e-6)
    macs = linear_macs(graphs["window"])
    assert record["int8_mac_fraction"] == pytest.approx(sum(macs[n] for n in names) / sum(macs.values()))
    assert 0.5 < record["int8_mac_fraction"] < 1  # the embedding and head stay fp32


def test_auto_keeps_the_most_sensitive_layers_in_fp32_until_the_target_is_met(capsys, trained_on, tmp_path):
    target = 1e-3  # below the all-int8 graph's error on this checkpoint (about 2.6e-3 of the action range)
    proto, manifest = export_int8(capsys, trained_on, tmp_path / "tight", "--mode", "stream",
                                  "--max-action-error", str(target))
    record = manifest.exporter["precision_pass"]
    steps, sensitivity = record["int8_selection"], record["int8_sensitivity"]
    assert steps[0]["fp32_layers"] == [] and steps[0]["rmse_relative"] > target, "precondition: all-int8 misses"
    assert all(step["rmse_relative"] > target for step in steps[:-1]) and steps[-1]["rmse_relative"] <= target
    kept = steps[-1]["fp32_layers"]
    order = sorted(sensitivity, key=lambda name: -sensitivity[name]["rmse_relative_alone"])
    assert kept == order[:len(kept)] and 0 < len(kept) < len(sensitivity)  # most sensitive first, some stay int8
    assert sum(entry["share"] for entry in sensitivity.values()) == pytest.approx(1.0)
    assert record["int8_layers"] == {name: "fp32" if name in kept else "int8" for name in sensitivity}
    assert quantized_linears(proto) == sorted(set(sensitivity) - set(kept))  # no Q/DQ on the kept layers
    assert manifest.accuracy["action_rmse_relative"] <= target
    assert record["int8_mac_fraction"] == pytest.approx(steps[-1]["int8_mac_fraction"]) and (
        0 < record["int8_mac_fraction"] < steps[0]["int8_mac_fraction"])
    assert record["calibration"]["float_linears"] == sorted(kept)


@pytest.mark.parametrize(("choice", "mode"), [("layer0/ssm/in_proj,layer2/dsm/dense", "window"), ("all", "stream")])
def test_a_list_quantizes_exactly_those_layers_and_all_every_projection(capsys, trained_on, graphs, tmp_path, choice,
                                                                        mode):
    proto, manifest = export_int8(capsys, trained_on, tmp_path / "listed", "--mode", mode, "--int8-layers", choice)
    record = manifest.exporter["precision_pass"]
    names = candidates_of(graphs[mode])
    int8 = names if choice == "all" else choice.split(",")
    assert record["int8_layers_choice"] == ("all" if choice == "all" else "list")
    assert record["int8_layers"] == {name: "int8" if name in int8 else "fp32" for name in names}
    assert quantized_linears(proto) == sorted(int8)
    assert "int8_selection" not in record and "int8_layers_target" not in record  # nothing measured to choose
    assert record["int8_action_rmse_relative"] == manifest.accuracy["action_rmse_relative"]
    json.dumps(record)  # plain JSON in the manifest


def test_int8_layer_option_errors_are_one_line(capsys, trained_on, tmp_path):
    checkpoint, dataset = trained_on
    base = ["export", "--checkpoint", str(checkpoint), "--dataset", str(dataset), "--out", str(tmp_path / "x")]
    cases = [
        (["--int8", "--int8-layers", "layer0/ssm/in_proj,layer0/ssm/inproj"],
         ["--int8-layers with unknown Linear layer(s) layer0/ssm/inproj", "layer2/ssm/out_proj"]),
        (["--int8", "--int8-layers", ","], ["--int8-layers ','", "expected auto, all or a comma-separated list"]),
        (["--fp16", "--int8-layers", "all"], ["--int8-layers with --fp16"]),
        (["--int8-layers", "all"], ["--int8-layers without --fp16 or --int8"]),
    ]
    for args, fragments in cases:
        assert_one_line_error(capsys, cli.main([*base, *args]), *fragments)
    assert not (tmp_path / "x.onnx").exists()


# -- TensorRT: the kept Linears are fp32 pins of the plan check ----------------------------------------


def test_a_kept_linear_running_int8_in_a_plan_is_caught(capsys, trained_on, tmp_path):
    _, manifest = export_int8(capsys, trained_on, tmp_path / "pins", "--int8-layers", "layer0/ssm/in_proj")
    checked = _with_fp32_linears_pinned(manifest)
    fp32 = set(checked.exporter["precision_pins"]["fp32"])
    assert "layer1/dsm/dense" in fp32 and "layer0/ssm/in_proj" not in fp32
    assert not {"layer1/dsm/dense"} & set(manifest.exporter["precision_pins"]["fp32"])  # the manifest is unchanged

    def layer(node: str, datatype: str) -> dict:
        tensors = [{"Name": f"{node}:io", "Dimensions": [1, 64], "Format/Datatype": datatype}]
        return {"Name": node, "LayerType": "gemm", "Inputs": tensors, "Outputs": tensors,
                "Metadata": f"[ONNX Layer: {node}]", "TacticName": "sm90_gemm"}

    information = json.dumps({"Layers": [layer("layer0/ssm/in_proj", "Int8"), layer("layer1/dsm/dense", "Int8")]})
    [offender] = layer_summary(information, checked)["pinned_fp32_in_reduced_precision"]
    assert offender["onnx_nodes"] == ["layer1/dsm/dense"] and offender["precision"] == "int8"
    warnings = check_layer_precisions("plan", layer_summary(information, checked), checked, precision_check="warn")
    assert any("run in reduced precision" in warning for warning in warnings)
    # An all-int8 manifest pins nothing more.
    assert _with_fp32_linears_pinned(dataclasses.replace(manifest, exporter={
        **manifest.exporter, "precision_pass": {}})).exporter == {**manifest.exporter, "precision_pass": {}}


def test_auto_aims_below_the_int8_limit_and_never_above_it():
    from export.precision import DEFAULT_INT8_TARGET, PrecisionOptions

    assert PrecisionOptions().int8_layers_target() == DEFAULT_INT8_TARGET < PrecisionOptions().action_error_limit(
        "int8")
    assert PrecisionOptions(int8_target=0.05).int8_layers_target() == 0.02  # capped at the limit it is judged by
    assert PrecisionOptions(int8_target=0.05, max_action_error=0.1).int8_layers_target() == 0.05
    with pytest.raises(DMMError, match=r"--int8-target -1.0; expected a positive fraction"):
        PrecisionOptions(int8_target=-1.0).validate("int8")


def test_the_bench_curve_plays_paired_episodes_at_its_first_points(trained_on, capsys):
    import importlib.util

    from tests.helpers import REPO_ROOT

    spec = importlib.util.spec_from_file_location("int8_layers_bench", REPO_ROOT / "bench/int8_layers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    checkpoint, dataset = trained_on
    assert bench.main(["--checkpoint", str(checkpoint), "--dataset", str(dataset), "--methods", "minmax",
                       "--calibration-windows", "32", "--heldout", "32", "--closed-loop", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| minmax | ")
            and line.count("|") == 7]
    played = [row for row in rows if "pairs)" in row]
    # Every point with 0, 1, 2, 3 or 6 Linears in fp32 played its 2 pairs; the others did not.
    assert [int(row.split("|")[2]) for row in played] == list(bench.CLOSED_LOOP_STEPS)
    assert all("2 pairs" in row for row in played) and len(rows) > len(played)
