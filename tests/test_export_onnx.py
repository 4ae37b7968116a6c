"""The lowered graphs (export/lowering.py) and ``cli.py export``.

Every graph is held to the TensorRT parser's op table (export/trt_ops.py), to static shapes,
opset >= 17 and ``onnx.checker``'s full check, and in ONNX Runtime to the PyTorch model on
real Hopper-v5 trajectories: window mode to ``model.forward`` at the last state token, stream
mode to ``model.step`` (caches included). Node counts are bounded: on a batch-1 CPU step
ONNX Runtime's cost grows with them (bench/step_latency.py has the timings).
"""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import onnx
import pytest
import torch

import cli
from contract.manifest import read_manifest, tensor_specs
from contract.tolerances import max_abs
from dmm_train.checkpoint import load_checkpoint
from export.lowering import MAX_OPSET, MIN_OPSET, build_stream_graph, build_window_graph
from export.onnx_export import check_graph, optimized_node_count
from export.reference import torch_stream_step, torch_window_action
from export.trt_ops import CONTROL_FLOW_OPS, TRT_SUPPORTED_OPS, check_graph_ops
from runtime import load_backend
from runtime.feeds import InputTrajectory, stream_feeds, window_at
from runtime.ort_backend import cpu_session
from runtime.plant import make_plant
from tests.helpers import assert_one_line_error, one_torch_thread, write_checkpoint

FP32_TOLERANCE = max_abs("ort-vs-torch")  # docs/design.md#tolerances
# Measured: window 203 nodes, stream 148 (ONNX Runtime's optimiser leaves about as many).
# The bounds leave room for small changes; a traced forward has about 1200 and 600.
MAX_NODES = {"window": 220, "stream": 160}
BUILDERS = {"window": build_window_graph, "stream": build_stream_graph}
EPISODE_STEPS = 48


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def model(checkpoint_path):
    loaded = load_checkpoint(checkpoint_path).model.eval()
    loaded.set_scan_impl("loop")  # the slow, obviously-correct reference
    return loaded


@pytest.fixture(scope="module")
def hopper(checkpoint_path):
    """Three real Hopper-v5 episode starts of EPISODE_STEPS steps as graph inputs, built the way
    `runtime.Policy` builds them: states (3, T, S) normalised, actions (3, T, Adim), rtg (3, T, 1).

    The plant is driven by small random torques (the untrained checkpoint falls within about ten
    steps); episodes that end sooner are passed over.
    """
    with load_backend(checkpoint_path) as backend:
        manifest = backend.manifest
    mean, std = np.asarray(manifest.state_mean), np.asarray(manifest.state_std)
    plant = make_plant("Hopper-v5")
    rows = []
    for seed in range(50):
        observation, _ = plant.reset(seed=seed)
        rng = np.random.default_rng(seed)
        observations, actions, rewards = [], [], []
        for _ in range(EPISODE_STEPS):
            observations.append(observation)
            actions.append(rng.uniform(-0.2, 0.2, size=manifest.act_dim).astype(np.float32))
            observation, reward, terminated, truncated, _ = plant.step(actions[-1])
            rewards.append(reward)
            if terminated or truncated:
                break
        if len(observations) < EPISODE_STEPS:
            continue
        rtg = np.empty(EPISODE_STEPS, dtype=np.float32)  # (T,), float32 bookkeeping as in the Policy
        rtg[0] = manifest.target_return / manifest.rtg_scale
        for t in range(1, EPISODE_STEPS):
            rtg[t] = rtg[t - 1] - rewards[t - 1] / manifest.rtg_scale
        states = ((np.asarray(observations) - mean) / std).astype(np.float32)  # (T, S)
        rows.append((states, np.asarray(actions), rtg[:, None]))
        if len(rows) == 3:
            break
    plant.close()
    assert len(rows) == 3
    states, actions, rtg = (np.stack(parts) for parts in zip(*rows, strict=True))  # (3, T, *)
    assert np.abs(np.diff(states, axis=1)).max() > 0.1  # a moving plant, not a constant
    return InputTrajectory(states, actions, rtg)


def rows(trajectory: InputTrajectory, batch: int) -> InputTrajectory:
    return InputTrajectory(trajectory.states[:batch], trajectory.actions[:batch], trajectory.rtg[:batch])


def static_shape(value_info) -> tuple[int, ...] | None:
    """The shape of a value_info when every dimension is a fixed positive number, else None."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = tensor_type.shape.dim
    if any(not d.HasField("dim_value") or d.dim_value < 1 for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


@pytest.mark.parametrize(("mode", "batch", "opset"), [
    ("window", 1, MIN_OPSET), ("window", 3, MIN_OPSET), ("stream", 1, MIN_OPSET), ("stream", 2, MIN_OPSET),
    ("window", 1, MAX_OPSET), ("stream", 1, MAX_OPSET),
])
def test_graph_is_static_checked_and_trt_parseable(model, mode, batch, opset):
    proto = BUILDERS[mode](model, batch=batch, opset=opset)
    op_types = {(node.domain, node.op_type) for node in proto.graph.node}
    assert check_graph_ops(op_types) == []
    assert all(domain in ("", "ai.onnx") and op in TRT_SUPPORTED_OPS for domain, op in op_types)
    assert not {op for _, op in op_types} & CONTROL_FLOW_OPS
    subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    assert not [node.name for node in proto.graph.node if any(a.type in subgraphs for a in node.attribute)]
    (version,) = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    assert version == opset and version >= 17  # LayerNormalization

    onnx.checker.check_model(proto, full_check=True)
    check_graph(proto)  # what the export runs: the same checker and op table, as DMMErrors

    config = model.config
    inputs, outputs = tensor_specs(mode, batch=batch, context_len=config.context_len,
                                   state_dim=config.state_dim, act_dim=config.act_dim, n_layer=config.n_layer,
                                   dsm_window=config.dsm_window, d_model=config.d_model,
                                   d_state=config.d_state)
    assert [(v.name, static_shape(v)) for v in proto.graph.input] == [(s.name, s.shape) for s in inputs]
    assert [(v.name, static_shape(v)) for v in proto.graph.output] == [(s.name, s.shape) for s in outputs]
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
               for v in [*proto.graph.input, *proto.graph.output])
    # Strict shape inference reaches every intermediate tensor with a fixed shape.
    inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    intermediates = {v.name: static_shape(v) for v in inferred.graph.value_info}
    produced = {name for node in proto.graph.node for name in node.output}
    output_names = {v.name for v in proto.graph.output}
    assert set(intermediates) == produced - output_names
    assert all(shape is not None for shape in intermediates.values()), \
        [name for name, shape in intermediates.items() if shape is None]


@pytest.mark.parametrize("mode", ["window", "stream"])
def test_node_counts_stay_lean(model, mode):
    proto = BUILDERS[mode](model)
    nodes, optimized = len(proto.graph.node), optimized_node_count(proto.SerializeToString())
    print(f"{mode}: {nodes} nodes, {optimized} after ONNX Runtime's optimisation")
    assert nodes <= MAX_NODES[mode] and optimized <= MAX_NODES[mode]


@pytest.mark.parametrize("batch", [1, 3])
def test_window_graph_equals_forward_at_the_last_state_token(model, hopper, batch):
    trajectory = rows(hopper, batch)
    session = cpu_session(build_window_graph(model, batch=batch).SerializeToString())
    worst = 0.0
    for t in range(EPISODE_STEPS):  # t < K - 1: zero-left-padded windows of an episode start
        feeds = window_at(trajectory, t, model.config.context_len)
        (action,) = session.run(["action"], feeds)  # (B, Adim)
        reference = torch_window_action(model, feeds)  # model(states, actions, rtg)[:, -1]
        assert action.shape == reference.shape == (batch, model.config.act_dim)
        worst = max(worst, float(np.abs(action - reference).max()))
    print(f"window, batch {batch}: max |ORT - model.forward| over {EPISODE_STEPS} windows: {worst:.2e}")
    assert worst < FP32_TOLERANCE


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 2])
def test_stream_graph_equals_model_step_caches_included(model, hopper, batch):
    trajectory = rows(hopper, batch)
    session = cpu_session(build_stream_graph(model, batch=batch).SerializeToString())
    names = ["action", "dsm_cache_next", "ssm_state_next"]
    dsm_ort, ssm_ort = (c.numpy() for c in model.init_cache(batch))  # (nl, B, W-1, D), (nl, B, D, N)
    dsm_ref, ssm_ref = dsm_ort, ssm_ort
    actions_ort = []
    worst = dict.fromkeys(names, 0.0)
    for t in range(EPISODE_STEPS):
        out = dict(zip(names, session.run(names, stream_feeds(trajectory, t, dsm_ort, ssm_ort)), strict=True))
        reference = torch_stream_step(model, stream_feeds(trajectory, t, dsm_ref, ssm_ref))  # 3 model.step calls
        for name in names:
            assert out[name].shape == reference[name].shape
            worst[name] = max(worst[name], float(np.abs(out[name] - reference[name]).max()))
        dsm_ort, ssm_ort = out["dsm_cache_next"], out["ssm_state_next"]  # each side carries its own caches
        dsm_ref, ssm_ref = reference["dsm_cache_next"], reference["ssm_state_next"]
        actions_ort.append(out["action"])
    print(f"stream, batch {batch}: max |ORT - model.step| over {EPISODE_STEPS} steps: "
          + ", ".join(f"{name} {value:.2e}" for name, value in worst.items()))
    assert all(value < FP32_TOLERANCE for value in worst.values())
    # From zero caches the stream is the sequence form over the whole history.
    sequence = model(*(torch.from_numpy(a) for a in (trajectory.states, trajectory.actions, trajectory.rtg)))
    difference = np.abs(np.stack(actions_ort, axis=1) - sequence.numpy()).max()
    print(f"stream, batch {batch}: max |ORT - model.forward over the history|: {difference:.2e}")
    assert difference < FP32_TOLERANCE


@torch.no_grad()
def test_stream_skips_the_action_token_exactly_where_not_valid(model, hopper):
    """prev_action_valid = 0 drops a_{t-1} whatever the caches hold; rows of a batch choose independently."""
    session = cpu_session(build_stream_graph(model, batch=2).SerializeToString())
    rng = np.random.default_rng(4)
    dsm_cache, ssm_state = (rng.normal(size=c.shape).astype(np.float32) for c in model.init_cache(2))
    feeds = stream_feeds(rows(hopper, 2), 10, dsm_cache, ssm_state)
    feeds["prev_action_valid"] = np.array([[0.0], [1.0]], dtype=np.float32)  # (B, 1)
    names = ["action", "dsm_cache_next", "ssm_state_next"]
    out = dict(zip(names, session.run(names, feeds), strict=True))
    reference = torch_stream_step(model, feeds)
    for name in names:
        assert np.abs(out[name] - reference[name]).max() < FP32_TOLERANCE, name
    # Row 0 skipped a_{t-1}: two model.step calls (R_t, s_t) from its own caches.
    dsm_row, ssm_row = torch.from_numpy(dsm_cache[:, :1]), torch.from_numpy(ssm_state[:, :1])
    _, dsm_row, ssm_row = model.step(model.embed_rtg(torch.from_numpy(feeds["rtg"][:1])), dsm_row, ssm_row)
    hidden, _, _ = model.step(model.embed_observation(torch.from_numpy(feeds["state"][:1])), dsm_row, ssm_row)
    assert np.abs(out["action"][:1] - model.predict_action(hidden).numpy()).max() < FP32_TOLERANCE


# -- cli.py export ----------------------------------------------------------------------


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_export_defaults_to_the_newest_checkpoint_and_the_preset_name(capsys, tmp_path, monkeypatch):
    run_dirs = [tmp_path / "runs" / "hopper-seed0", tmp_path / "runs" / "nested" / "hopper-seed1"]
    for directory in run_dirs:
        directory.mkdir(parents=True)
    older, newer = (write_checkpoint(directory, seed=seed) for seed, directory in enumerate(run_dirs))
    os.utime(older, (1_000_000_000, 1_000_000_000))  # the newest by modification time is `newer`
    monkeypatch.chdir(tmp_path)

    assert cli.main(["export"]) == 0
    captured = capsys.readouterr()
    assert (tmp_path / "hopper.onnx").is_file() and (tmp_path / "hopper.json").is_file()
    assert captured.out.startswith("wrote hopper.onnx (window") and "hopper.json" in captured.out
    manifest = read_manifest(tmp_path / "hopper.json")
    assert manifest.mode == "window" and manifest.batch == 1 and manifest.opset == 17
    assert manifest.checkpoint_sha256 == sha256(newer) != sha256(older)
    assert manifest.onnx_sha256 == sha256(tmp_path / "hopper.onnx")
    assert manifest.parity["max_abs"] < FP32_TOLERANCE
    assert manifest.exporter["graph_nodes"] == len(onnx.load(str(tmp_path / "hopper.onnx")).graph.node)

    code = cli.main(["export", "--checkpoint", str(older.parent), "--mode", "stream", "--out", "policy.v2",
                     "--opset", str(MAX_OPSET)])
    assert code == 0, capsys.readouterr().err
    manifest = read_manifest(tmp_path / "policy.v2.json")  # a dotted NAME keeps its dot
    assert (tmp_path / "policy.v2.onnx").is_file()
    assert (manifest.mode, manifest.opset, manifest.checkpoint_sha256) == ("stream", MAX_OPSET, sha256(older))
    with load_backend(tmp_path / "policy.v2.onnx") as backend:  # the runtime accepts what export wrote
        assert backend.manifest.mode == "stream"


def test_cli_export_errors_are_one_line_and_write_nothing(capsys, checkpoint_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = str(checkpoint_path)
    assert_one_line_error(capsys, cli.main(["export", "--checkpoint", checkpoint, "--mode", "sideways"]),
                          "--mode 'sideways'", "window", "stream")
    assert_one_line_error(capsys, cli.main(["export", "--checkpoint", checkpoint, "--batch", "0"]),
                          "--batch 0", "positive")
    assert_one_line_error(capsys, cli.main(["export", "--checkpoint", checkpoint, "--opset", "16"]),
                          "--opset 16", "17")
    assert_one_line_error(capsys, cli.main(["export", "--checkpoint", checkpoint, "--batch", "two"]),
                          "'two'", "--batch")
    assert_one_line_error(capsys, cli.main(["export", "--checkpoint", str(tmp_path / "gone" / "model.pt")]),
                          "gone", "does not exist")
    assert_one_line_error(capsys, cli.main(["export"]), "no checkpoint given", "runs", "--checkpoint")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert_one_line_error(capsys, cli.main(["export", "--checkpoint", checkpoint, "--out", str(blocker / "x")]),
                          "cannot write", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written, not even partly

    # A model.pt that is not a checkpoint (e.g. truncated in a copy).
    broken = tmp_path / "broken" / "model.pt"
    broken.parent.mkdir()
    shutil.copy(checkpoint_path, broken)
    broken.write_bytes(broken.read_bytes()[:100])
    code = cli.main(["export", "--checkpoint", str(broken)])
    assert_one_line_error(capsys, code, "broken")
    assert not any(p.suffix in (".onnx", ".json") for p in tmp_path.rglob("*"))
