"""calibration/: real inputs from the training dataset, Q/DQ by ONNX Runtime's tools under TensorRT's rules.

The dataset is a real Minari dataset of real Hopper-v5 rollouts; the checkpoint records its id
and content hash (as 'cli.py train' writes them); graphs run in real ONNX Runtime sessions.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from calibration.data import (
    calibration_feeds,
    episode_trajectory,
    load_training_dataset,
    split_episodes,
    stream_rollout,
    window_samples,
)
from calibration.qdq import CALIBRATION_METHODS, calibrate_ranges, check_qdq, quantize_qdq
from contract.errors import DMMError
from contract.graph_roles import INT8_ROLES, linear_nodes
from dmm_train.checkpoint import load_checkpoint
from dmm_train.manifest_builder import build_manifest
from export.onnx_export import build_graph
from tests.helpers import dataset_checkpoint


@pytest.fixture(scope="module")
def trained_on(tmp_path_factory):
    return dataset_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def setup(trained_on):
    checkpoint_path, dataset_dir = trained_on
    checkpoint = load_checkpoint(checkpoint_path)
    dataset = load_training_dataset(checkpoint, str(dataset_dir))
    # The fp32 graphs as the int8 export lowers them (the stream graph without x_proj's identity block).
    graphs = {mode: build_graph(checkpoint.model.eval(), mode=mode, precision="int8") for mode in ("window", "stream")}
    manifests = {mode: build_manifest(checkpoint, mode=mode) for mode in ("window", "stream")}
    return checkpoint, dataset, split_episodes(dataset), graphs, manifests


def _session(proto):
    from runtime.ort_backend import cpu_session

    return cpu_session(proto.SerializeToString(), optimize=True)


# -- the dataset ------------------------------------------------------------------------


def test_the_training_dataset_is_found_and_checked_by_content_hash(trained_on, checkpoint_path, tmp_path):
    path, dataset_dir = trained_on
    checkpoint = load_checkpoint(path)
    assert load_training_dataset(checkpoint, str(dataset_dir)).content_hash == checkpoint.dataset_hash
    # Another dataset than the checkpoint's: refused with both hashes and what to pass.
    other = load_checkpoint(checkpoint_path)  # the conftest checkpoint records a made-up dataset
    with pytest.raises(DMMError, match=r"content hash .*; expected 000000000000\.\.\., the content .*--dataset"):
        load_training_dataset(other, str(dataset_dir))
    # The recorded id is not in the local store (never downloaded here): says to pass --dataset.
    with pytest.raises(DMMError, match=r"cannot be loaded here .*pass --dataset"):
        load_training_dataset(checkpoint, str(tmp_path / "absent"))


def test_calibration_and_heldout_episodes_are_disjoint_and_seeded(setup):
    _, dataset, split, _, _ = setup
    calibration, heldout = {id(e) for e in split.calibration}, {id(e) for e in split.heldout}
    assert not calibration & heldout and calibration | heldout == {id(e) for e in dataset.episodes}
    assert len(split.heldout) == round(0.2 * len(dataset.episodes))
    again = split_episodes(dataset)
    assert [id(e) for e in again.heldout] == [id(e) for e in split.heldout]
    assert [id(e) for e in split_episodes(dataset, seed=1).heldout] != [id(e) for e in split.heldout]
    with pytest.raises(DMMError, match="at least 2"):
        split_episodes(dataclasses.replace(dataset, episodes=dataset.episodes[:1]))


def test_window_samples_are_the_windows_the_runtime_policy_builds(setup, tmp_path):
    """Teacher-forced through a real episode, runtime.Policy's window at step t is window_samples' window."""
    from runtime.ort_backend import OrtBackend
    from runtime.policy import Policy

    checkpoint, _, split, graphs, manifests = setup
    manifest = manifests["window"]
    episode = max(split.calibration, key=len)
    trajectory = episode_trajectory(episode, state_mean=manifest.state_mean, state_std=manifest.state_std,
                                    rtg_scale=manifest.rtg_scale, target_return=manifest.target_return)
    samples = window_samples([episode], len(episode), context_len=manifest.context_len,
                             state_mean=manifest.state_mean, state_std=manifest.state_std,
                             rtg_scale=manifest.rtg_scale, target_return=manifest.target_return)
    assert len(samples) == len(episode)  # every step once, in order (one episode)
    with OrtBackend(graphs["window"].SerializeToString(), manifest=manifest, label="fp32") as backend:
        policy = Policy(backend)
        for t, sample in enumerate(samples):
            policy.act(episode.observations[t], float(episode.rewards[t - 1]) if t else 0.0)
            feeds = policy._feeds
            np.testing.assert_allclose(sample["states"], feeds["states"], atol=1e-6)
            np.testing.assert_allclose(sample["rtg"], feeds["rtg"], atol=1e-6)  # float32 vs float64 rtg sums
            assert np.all(sample["actions"][0, -1] == 0.0)  # the placeholder for the action being predicted
            np.testing.assert_array_equal(sample["actions"][0, :-1], feeds["actions"][0, :-1])
            policy.override_action(episode.actions[t])  # the dataset's action was the executed one
    assert samples[0]["rtg"][0, -1, 0] == pytest.approx(manifest.target_return / manifest.rtg_scale)
    assert not samples[0]["states"][0, :-1].any()  # zero left-padding, not the training sampler's
    assert trajectory.states.shape == (1, len(episode), manifest.state_dim)


def test_stream_samples_carry_the_caches_of_the_fp32_graph(setup):
    from runtime.ort_backend import OrtBackend
    from runtime.policy import Policy

    _, _, split, graphs, manifests = setup
    manifest = manifests["stream"]
    episode = max(split.calibration, key=len)
    trajectory = episode_trajectory(episode, state_mean=manifest.state_mean, state_std=manifest.state_std,
                                    rtg_scale=manifest.rtg_scale, target_return=manifest.target_return)
    feeds = stream_rollout(_session(graphs["stream"]), trajectory, n_layer=manifest.n_layer,
                           dsm_window=manifest.dsm_window, d_model=manifest.d_model, d_state=manifest.d_state)
    assert len(feeds) == len(episode)
    assert not feeds[0]["dsm_cache"].any() and feeds[0]["prev_action_valid"][0, 0] == 0.0
    assert feeds[3]["ssm_state"].any() and feeds[3]["prev_action_valid"][0, 0] == 1.0
    with OrtBackend(graphs["stream"].SerializeToString(), manifest=manifest, label="fp32") as backend:
        policy = Policy(backend)
        for t, feed in enumerate(feeds):
            # Before the step: the caches (and a_{t-1}) the runtime is about to feed are the sample's.
            np.testing.assert_allclose(feed["ssm_state"], policy._feeds["ssm_state"], atol=1e-6)
            np.testing.assert_allclose(feed["dsm_cache"], policy._feeds["dsm_cache"], atol=1e-6)
            if t:
                np.testing.assert_array_equal(feed["prev_action"], policy._feeds["prev_action"])
            policy.act(episode.observations[t], float(episode.rewards[t - 1]) if t else 0.0)
            for name in ("state", "rtg", "prev_action_valid"):  # what the step itself fed
                np.testing.assert_allclose(feed[name], policy._feeds[name], atol=1e-6)
            policy.override_action(episode.actions[t])


# -- Q/DQ -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_graphs(setup):
    _, _, split, graphs, manifests = setup
    result = {}
    for mode in ("window", "stream"):
        feeds = calibration_feeds(graphs[mode], manifests[mode], split.calibration, 96)
        result[mode] = (feeds, *quantize_qdq(graphs[mode], feeds, method="percentile"))
    return result


@pytest.mark.parametrize("mode", ["window", "stream"])
def test_qdq_follows_tensorrt_rules(setup, int8_graphs, mode):
    _, _, _, graphs, _ = setup
    _, quantized, details = int8_graphs[mode]
    onnx.checker.check_model(quantized, full_check=True)
    linears = {name for name, role in linear_nodes(graphs[mode]).items() if role in INT8_ROLES}
    assert sorted(linears) == details["quantized_linears"] and len(linears) == 12  # 4 per layer
    initializers = {init.name: init for init in quantized.graph.initializer}
    producers = {output: node for node in quantized.graph.node for output in node.output}
    consumers = {}
    for node in quantized.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    q_nodes = [n for n in quantized.graph.node if n.op_type == "QuantizeLinear"]
    dq_nodes = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear"]
    assert len(q_nodes) == 12 and len(dq_nodes) == 24  # one activation pair and one weight DQ per Linear
    for node in q_nodes + dq_nodes:
        zero = initializers[node.input[2]]
        assert zero.data_type == TensorProto.INT8 and not numpy_helper.to_array(zero).any()  # symmetric
        scale = numpy_helper.to_array(initializers[node.input[1]])
        assert np.all(scale > 0) and np.all(np.isfinite(scale))
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:  # a weight
            weight = numpy_helper.to_array(initializers[node.input[0]])
            assert weight.dtype == np.int8 and scale.shape == (weight.shape[1],)  # per output channel
            assert next(a.i for a in node.attribute if a.name == "axis") == 1
            assert np.abs(weight).max() <= 127
        else:
            assert scale.shape == ()  # activations per tensor
    for dq in dq_nodes:  # dequantized tensors reach Linear layers only, never the scan, exp or softplus
        readers = consumers[dq.output[0]]
        assert [r.name for r in readers if r.name not in linears] == []
        assert dq.input[0] in initializers or producers[dq.input[0]].op_type == "QuantizeLinear"
    for node in quantized.graph.node:
        if node.op_type in ("Exp", "Log", "LayerNormalization", "Sigmoid") or "/h" in node.name:
            assert all(producers.get(i) is None or producers[i].op_type not in ("DequantizeLinear",)
                       for i in node.input), node.name
    def float_silu_source(name: str) -> bool:
        """True when ``name`` is the silu split's output, or a slice / reshape of it (never a DQ)."""
        node = producers.get(name)
        while node is not None and node.op_type in ("Slice", "Gather", "Squeeze", "Reshape", "Unsqueeze"):
            node = producers.get(node.input[0])
        return node is not None and node.name.endswith("/ssm/split_xz")

    for node in quantized.graph.node:  # the scan's x (delta * x, Dskip * x) is the float silu output
        if node.name.endswith(("/ssm/delta_x", "/ssm/skip")):
            assert any(float_silu_source(name) for name in node.input), node.name
    if mode == "stream":  # the caches stay float32 graph I/O, untouched by Q/DQ
        for name in ("dsm_cache", "ssm_state"):
            assert all(reader.op_type not in ("QuantizeLinear",) for reader in consumers[name])
    assert check_qdq(quantized, linears) == []


def test_check_qdq_catches_a_broken_rule(int8_graphs):
    _, quantized, details = int8_graphs["window"]
    broken = onnx.ModelProto()
    broken.CopyFrom(quantized)
    q = next(n for n in broken.graph.node if n.op_type == "QuantizeLinear")
    zero = next(i for i in broken.graph.initializer if i.name == q.input[2])
    zero.CopyFrom(numpy_helper.from_array(np.array(3, dtype=np.int8), zero.name))
    assert any("zero point is not 0" in p for p in check_qdq(broken, set(details["quantized_linears"])))
    leak = onnx.ModelProto()
    leak.CopyFrom(quantized)
    linears = set(details["quantized_linears"])
    producers = {output: node for node in leak.graph.node for output in node.output}
    x_proj = next(n for n in leak.graph.node if n.name == "layer0/ssm/x_proj")
    dq = producers[x_proj.input[0]]
    x = producers[dq.input[0]].input[0]  # the float x that the quantize pair reads
    scan_reader = next(n for n in leak.graph.node  # a scan node reading x (delta * x, Dskip * x)
                       if x in n.input and n.op_type != "QuantizeLinear" and n.name not in linears)
    scan_reader.input[list(scan_reader.input).index(x)] = dq.output[0]  # what ORT's quantizer leaves
    assert any("reaches" in p and scan_reader.name in p for p in check_qdq(leak, linears))


def test_calibration_methods_give_different_real_ranges(setup, int8_graphs, tmp_path):
    _, _, _, graphs, _ = setup
    feeds, _, details = int8_graphs["window"]
    tensors = sorted(details["activation_thresholds"])
    path = tmp_path / "fp32.onnx"
    onnx.save(graphs["window"], str(path))
    ranges = {method: calibrate_ranges(path, feeds, tensors, method, tmp_path) for method in CALIBRATION_METHODS}
    for method, thresholds in ranges.items():
        assert set(thresholds) == set(tensors) and all(t > 0 for t in thresholds.values()), method
    # minmax is the largest |value| seen; the percentile and entropy thresholds clip below it somewhere.
    for method in ("percentile", "entropy"):
        assert all(ranges[method][t] <= ranges["minmax"][t] * (1 + 1e-6) for t in tensors), method
        assert any(ranges[method][t] < 0.99 * ranges["minmax"][t] for t in tensors), method
    assert ranges["percentile"] == pytest.approx(details["activation_thresholds"], rel=1e-6)
    with pytest.raises(DMMError, match="--calibration 'kl'"):
        calibrate_ranges(path, feeds, tensors, "kl", tmp_path)


@pytest.mark.parametrize("mode", ["window", "stream"])
def test_int8_fake_quant_accuracy_on_heldout_episodes(setup, int8_graphs, mode):
    from calibration.accuracy import action_errors
    from runtime.ort_backend import cpu_session

    _, _, split, graphs, manifests = setup
    _, quantized, _ = int8_graphs[mode]
    fp32 = cpu_session(graphs[mode].SerializeToString(), optimize=True)
    int8 = cpu_session(quantized.SerializeToString(), optimize=False)  # Q/DQ as fake-quant
    errors = action_errors(fp32, int8, manifests[mode], split.heldout, 128)
    assert errors["heldout_samples"] == 128
    # Real quantization error (not zero), and small against actions of RMS ~0.3.
    assert 1e-5 < errors["action_rmse"] < 2e-2 and errors["action_max_abs"] < 0.1
    assert errors["action_rms_fp32"] > 0.05
    if mode == "stream":
        assert 0 < errors["cache_max_abs"] < 0.5  # the int8 graph's own caches drift, boundedly
