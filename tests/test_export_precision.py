"""Precision graphs (export/precision.py) and 'cli.py export --fp16 / --int8' end to end on the CPU.

Real graphs of a real checkpoint, real ONNX Runtime sessions, a real Minari dataset and real
Hopper-v5 episodes for the closed-loop score.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import cli
from calibration.accuracy import action_errors
from calibration.data import load_training_dataset, split_episodes
from contract.errors import DMMError
from contract.files import sha256_file
from contract.graph_roles import ALL_ROLES, linear_nodes
from contract.manifest import manifest_path_for, read_manifest
from contract.tolerances import tolerance
from dmm_train.checkpoint import load_checkpoint
from dmm_train.manifest_builder import build_manifest
from export.onnx_export import build_graph, check_graph
from export.precision import DEFAULT_MAX_SCORE_DROP, fp16_emulation, tensor_types, to_fp16
from runtime import Policy, load_backend
from runtime.ort_backend import cpu_session
from tests.helpers import assert_one_line_error, dataset_checkpoint

MODES = ("window", "stream")
FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16


@pytest.fixture(scope="module")
def trained_on(tmp_path_factory):
    return dataset_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def graphs(trained_on):
    checkpoint = load_checkpoint(trained_on[0])
    return {mode: build_graph(checkpoint.model.eval(), mode=mode) for mode in MODES}


# -- which MatMuls are Linear layers ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_linear_layers_are_the_weight_matmuls(graphs, mode):
    roles = linear_nodes(graphs[mode])
    expected = {"embed/linear": "embed", "head": "head"}
    for layer in range(3):
        expected.update({f"layer{layer}/dsm/dense": "dsm", f"layer{layer}/ssm/in_proj": "in_proj",
                         f"layer{layer}/ssm/x_proj": "x_proj", f"layer{layer}/ssm/out_proj": "out_proj"})
    assert roles == expected
    others = {n.name for n in graphs[mode].graph.node if n.op_type in ("MatMul", "Gemm")} - set(roles)
    # Selection matrices and the recurrence's <h, Cm> are not Linear layers: they stay float32.
    assert others and all(any(key in name for key in ("select", "later", "y_C", "decay")) for name in others)


def test_an_unknown_weight_matmul_is_an_error_not_a_guess(graphs):
    changed = onnx.ModelProto()
    changed.CopyFrom(graphs["window"])
    next(n for n in changed.graph.node if n.name == "layer1/ssm/in_proj").name = "layer1/ssm/new_proj"
    with pytest.raises(ValueError, match="'layer1/ssm/new_proj' reads the weight .* contract.graph_roles.LINEAR_ROLES"):
        linear_nodes(changed)


# -- fp16 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_fp16_graph_keeps_everything_but_the_linears_in_fp32(graphs, mode):
    fp32 = graphs[mode]
    fp16 = to_fp16(fp32)
    check_graph(fp16)  # onnx.checker (full) and the TensorRT parser's op table
    types = tensor_types(fp16)
    linears = linear_nodes(fp32)
    nodes = {node.name: node for node in fp16.graph.node}
    for name in linears:  # fp16 in, fp16 weights, fp16 out, cast back to the fp32 name
        node = nodes[name]
        assert all(types[i] == FLOAT16 for i in node.input) and types[node.output[0]] == FLOAT16, name
        assert nodes[f"{name}/to_fp16"].op_type == "Cast" and nodes[f"{name}/to_fp32"].output[0] == name
        assert types[name] == FLOAT
    fp32_ops = ("LayerNormalization", "Exp", "Log", "Sigmoid", "Tanh", "Softplus", "ReduceSum")
    for node in fp16.graph.node:
        if node.name in linears or node.op_type == "Cast":
            continue
        float_tensors = [t for t in (*node.input, *node.output) if types.get(t) in (FLOAT, FLOAT16)]
        # Everything else, the recurrence (h_t = dA * h + dBx), exp(delta * A), softplus, LayerNorm,
        # the selection MatMuls, is float32 in and out.
        assert all(types[t] == FLOAT for t in float_tensors), (node.name, node.op_type)
        if node.op_type in fp32_ops:
            assert float_tensors
    for value in (*fp16.graph.input, *fp16.graph.output):  # fp32 graph I/O, caches included
        assert value.type.tensor_type.elem_type == FLOAT, value.name
    fp16_inits = {i.name for i in fp16.graph.initializer if i.data_type == FLOAT16}
    assert fp16_inits == {i for name in linears for i in nodes[name].input[1:]}
    assert {p.key: p.value for p in fp16.metadata_props}["precision"] == "fp16"
    assert set(linears.values()) == set(ALL_ROLES)


@pytest.mark.parametrize("mode", MODES)
def test_fp16_accuracy_on_heldout_episodes(trained_on, graphs, mode):
    checkpoint = load_checkpoint(trained_on[0])
    split = split_episodes(load_training_dataset(checkpoint, str(trained_on[1])))
    manifest = build_manifest(checkpoint, mode=mode)
    fp32 = cpu_session(graphs[mode].SerializeToString(), optimize=True)
    fp16 = cpu_session(fp16_emulation(to_fp16(graphs[mode])).SerializeToString(), optimize=False)
    errors = action_errors(fp32, fp16, manifest, split.heldout, 128)
    # fp16 rounding is really there and small: about 1e-4..1e-3 at actions of RMS ~0.4
    # (docs/design.md#tolerances).
    bound = tolerance("low-vs-fp32", "fp16")
    assert 1e-5 < errors["action_rmse"] < bound.rmse and errors["action_max_abs"] < bound.max_abs
    if mode == "stream":
        assert errors["cache_max_abs"] < 1e-2


def test_fp16_emulation_rounds_inputs_weights_and_outputs_where_ort_would_not(graphs):
    """ORT CPU drops the casts around its fp32 fallback for fp16 MatMuls; the emulation keeps every rounding."""
    from onnx import helper, numpy_helper

    fp32 = graphs["window"]
    fp16 = to_fp16(fp32)
    emulation = fp16_emulation(fp16)
    check_graph(emulation)
    for proto in (fp16, emulation):
        proto.graph.output.append(helper.make_tensor_value_info("embed/linear", FLOAT, None))
    rng = np.random.default_rng(0)
    feeds = {"states": rng.normal(size=(1, 8, 11)).astype(np.float32),
             "actions": np.tanh(rng.normal(size=(1, 8, 3))).astype(np.float32),
             "rtg": np.full((1, 8, 1), 3.6, np.float32)}
    block = np.concatenate([feeds["rtg"], feeds["states"], feeds["actions"], np.ones((1, 8, 1), np.float32)], 2)
    weight = numpy_helper.to_array(next(i for i in fp32.graph.initializer
                                        if i.name == "embed_return.weight+embed_state+embed_action"))

    def half(array):
        return array.astype(np.float16).astype(np.float32)

    expected = half(half(block).astype(np.float64) @ half(weight).astype(np.float64))  # (1, 8, 3D)
    emulated = cpu_session(emulation.SerializeToString(), optimize=False).run(["embed/linear"], feeds)[0]
    as_written = cpu_session(fp16.SerializeToString(), optimize=False).run(["embed/linear"], feeds)[0]
    np.testing.assert_allclose(emulated, expected, rtol=1e-3, atol=1e-6)  # within an fp16 ulp of rounding ties
    assert np.mean(emulated == expected) > 0.95 and np.all(half(emulated) == emulated)  # fp16 values
    assert not np.all(half(as_written) == as_written)  # ORT's run of the fp16 graph: an unrounded output
    ops = [n.op_type for n in emulation.graph.node]
    assert ops.count("Cast") == 4 * len(linear_nodes(fp32)) and not any(
        i.data_type == TensorProto.FLOAT16 for i in emulation.graph.initializer)


def test_fp16_refuses_weights_beyond_its_range(graphs):
    from onnx import numpy_helper

    big = onnx.ModelProto()
    big.CopyFrom(graphs["window"])
    weight = next(i for i in big.graph.initializer if i.name == "ssm.0.in_proj.weight.T")
    array = numpy_helper.to_array(weight).copy()
    array[0, 0] = 1e5
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    with pytest.raises(DMMError, match=r"'ssm.0.in_proj.weight.T' max \|value\| 1e\+05; expected at most 65504"):
        to_fp16(big)


# -- cli export ---------------------------------------------------------------------------------


def export(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["export", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(("precision", "mode"), [("fp16", "window"), ("int8", "stream")])
def test_cli_export_writes_the_precision_graph_with_its_accuracy(capsys, trained_on, tmp_path, precision, mode):
    checkpoint, dataset = trained_on
    out = tmp_path / f"hopper-{precision}"
    extra = ["--calibration", "minmax", "--calibration-windows", "64"] if precision == "int8" else []
    code, stdout, stderr = export(capsys, "--checkpoint", str(checkpoint), f"--{precision}", "--mode", mode,
                                  "--dataset", str(dataset), "--out", str(out), "--score-episodes", "2", *extra)
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    onnx_path = out.with_suffix(".onnx")
    assert lines[0].startswith(f"wrote {onnx_path} ({precision}, {mode},")
    assert lines[1].startswith(f"{precision} accuracy vs fp32 (ONNX Runtime CPU): action RMSE")
    try:
        import tensorrt  # noqa: F401
    except ImportError:  # the one-line note about building the engine on the target
        assert len(lines) == 3 and lines[2].startswith("no engine built here (")
        assert f"'python cli.py build {onnx_path}'" in lines[2]
        assert not out.with_suffix(".plan").exists()

    manifest = read_manifest(manifest_path_for(onnx_path))
    assert manifest.precision == precision and manifest.mode == mode
    assert manifest.onnx_sha256 == sha256_file(onnx_path)
    accuracy = manifest.accuracy
    assert accuracy["max_score_drop"] == DEFAULT_MAX_SCORE_DROP[precision] and not accuracy["score_refused"]
    assert accuracy["score_delta"] == pytest.approx(accuracy["score"] - accuracy["score_fp32"])
    assert accuracy["score_deltas"] == pytest.approx([a - b for a, b in zip(
        [100 * (r - manifest.ref_min_score) / (manifest.ref_max_score - manifest.ref_min_score)
         for r in accuracy["returns"]],
        [100 * (r - manifest.ref_min_score) / (manifest.ref_max_score - manifest.ref_min_score)
         for r in accuracy["returns_fp32"]], strict=True)])  # paired: episode i of both graphs, seed i
    assert accuracy["score_delta_ci"][0] <= accuracy["score_delta"] <= accuracy["score_delta_ci"][1]
    assert accuracy["seeds"] == [0, 1] and len(accuracy["returns"]) == len(accuracy["returns_fp32"]) == 2
    assert all(n > 0 for n in accuracy["lengths"])
    assert 0 < accuracy["action_rmse"] < {"fp16": 1e-3, "int8": 2e-2}[precision]
    described = manifest.exporter["precision_pass"]["dataset"]
    assert accuracy["heldout_samples"] == min(256, described["heldout_steps"])  # every held-out step, at most 256
    assert described["content_hash"] == load_checkpoint(checkpoint).dataset_hash
    if precision == "int8":
        assert accuracy["calibration_method"] == "minmax"
        assert manifest.exporter["precision_pass"]["calibration"]["samples"] == 64
    proto = onnx.load(str(onnx_path))
    assert {p.key: p.value for p in proto.metadata_props}["precision"] == precision

    # The runtime runs it through the same Policy as any other engine; I/O is float32.
    with load_backend(onnx_path) as backend:
        assert backend.manifest.precision == precision
        policy = Policy(backend)
        actions = [policy.act(np.full(11, 0.1 * step), 1.0) for step in range(5)]
    assert np.isfinite(actions).all()


def test_a_score_drop_beyond_the_limit_fails_the_export_and_writes_nothing(capsys, trained_on, tmp_path):
    checkpoint, dataset = trained_on
    out = tmp_path / "refused"
    # A negative limit asks for an improvement of at least 1000 points: no graph can pass it, and the
    # bounds over two paired episodes lie wholly below +1000, so the graph is shown worse at once.
    code = cli.main(["export", "--checkpoint", str(checkpoint), "--fp16", "--dataset", str(dataset),
                     "--out", str(out), "--score-episodes", "2", "--max-score-drop", "-1000"])
    assert code == 1
    assert_one_line_error(capsys, code, "--fp16 accuracy: closed-loop normalised score", "bounds",
                          "2 paired episodes", "refused: shown worse", "--max-score-drop -1000",
                          "nothing was written")
    assert not out.with_suffix(".onnx").exists() and not manifest_path_for(out.with_suffix(".onnx")).exists()


def test_export_option_errors_are_one_line(capsys, trained_on, checkpoint_path, tmp_path):
    checkpoint, dataset = trained_on
    base = ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x")]
    cases = [
        (["--fp16", "--int8"], ["--fp16 with --int8"]),
        (["--calibration", "entropy"], ["--calibration without --fp16 or --int8"]),
        (["--fp16", "--calibration", "entropy", "--dataset", str(dataset)], ["--calibration with --fp16"]),
        (["--int8", "--batch", "2", "--dataset", str(dataset)], ["--batch 2 with --int8", "expected 1"]),
        (["--int8", "--calibration", "kl"], ["'kl'"]),
        (["--int8", "--calibration-windows", "0", "--dataset", str(dataset)], ["--calibration-windows 0"]),
        (["--fp16", "--score-episodes", "0", "--dataset", str(dataset)], ["--score-episodes 0"]),
    ]
    for args, fragments in cases:
        assert_one_line_error(capsys, cli.main([*base, *args]), *fragments)
    # A recording given with --dataset that is not the checkpoint's training data: used as given, with a notice.
    code = cli.main(["export", "--checkpoint", str(checkpoint_path), "--fp16", "--dataset", str(dataset),
                     "--out", str(tmp_path / "y"), "--score-episodes", "2", "--no-engine"])
    assert code == 0 and "has content hash" in capsys.readouterr().err
    assert (tmp_path / "y.onnx").exists()


def test_manifest_accuracy_survives_a_round_trip(capsys, trained_on, tmp_path):
    """The accuracy record is plain JSON the torch-free runtime reads back unchanged."""
    checkpoint, dataset = trained_on
    out = tmp_path / "rt"
    code, _, stderr = export(capsys, "--checkpoint", str(checkpoint), "--int8", "--dataset", str(dataset),
                             "--out", str(out), "--score-episodes", "2", "--calibration-windows", "32",
                             "--no-engine")
    assert code == 0, stderr
    path = manifest_path_for(out.with_suffix(".onnx"))
    raw = json.loads(path.read_text())
    assert raw["accuracy"] == read_manifest(path).accuracy and raw["precision"] == "int8"
    assert raw["accuracy"]["calibration_method"] == "percentile"  # the default
