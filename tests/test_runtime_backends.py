"""The torch-free runtime: backends by file type, manifest checks, Policy bookkeeping, latency, `run`.

Engines are real ONNX graphs of the fixture checkpoint, run by real ONNX Runtime sessions;
the plant is a real gymnasium Hopper-v5.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cli
from contract.errors import DMMError
from contract.manifest import MODES, manifest_path_for, read_manifest
from runtime import LatencyStats, Policy, load_backend
from runtime.backend import check_feeds, zero_feeds
from runtime.latency import save_histogram
from runtime.ort_backend import OrtBackend
from runtime.torch_backend import TorchBackend
from tests.helpers import REPO_ROOT, assert_one_line_error, copy_engine, edit_manifest, run_json

# -- torch-free -------------------------------------------------------------------------


def test_runtime_runs_a_policy_without_torch_or_gymnasium(engines):
    """A fresh interpreter where torch and gymnasium cannot be imported runs both modes on ONNX Runtime."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        sys.modules["gymnasium"] = None
        import numpy as np
        import runtime
        from runtime import Policy, load_backend
        rng = np.random.default_rng(0)
        observations = rng.normal(size=(5, 11))
        actions = {{}}
        for mode, path in {json.dumps({m: str(p) for m, p in engines.items()})}.items():
            with load_backend(path) as backend:
                policy = Policy(backend)
                actions[mode] = [policy.act(o, 1.0).tolist() for o in observations]
        assert not any(name == "torch" or name.startswith("torch.") for name, module in sys.modules.items()
                       if module is not None)
        print(json.dumps(actions))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    actions = json.loads(result.stdout.strip().splitlines()[-1])
    observations = np.random.default_rng(0).normal(size=(5, 11))
    for mode, path in engines.items():  # the same actions as in this (torch-loaded) process
        with load_backend(path) as backend:
            policy = Policy(backend)
            expected = [policy.act(o, 1.0) for o in observations]
        np.testing.assert_array_equal(np.asarray(actions[mode], dtype=np.float32), np.asarray(expected))


# -- backends ---------------------------------------------------------------------------


def test_load_backend_picks_by_file_type(engines, checkpoint_path):
    with load_backend(engines["window"]) as backend:
        assert isinstance(backend, OrtBackend) and backend.provider == "CPUExecutionProvider"
        assert backend.manifest.mode == "window" and backend.name == "ort"
    with load_backend(engines["stream"]) as backend:
        assert backend.manifest.mode == "stream"
    with load_backend(checkpoint_path) as backend:
        assert isinstance(backend, TorchBackend) and backend.manifest.mode == "window"
    with load_backend(checkpoint_path, "stream") as backend:
        assert backend.manifest.mode == "stream" and backend.provider == "torch-cpu"
    assert not backend.loaded  # the context manager closed it


def test_backends_share_one_shape(engines, checkpoint_path):
    """Same feeds -> same outputs by name, for every backend of a mode."""
    rng = np.random.default_rng(1)
    for mode in MODES:
        with load_backend(engines[mode]) as ort_backend, load_backend(checkpoint_path, mode) as torch_backend:
            assert ort_backend.manifest.inputs == torch_backend.manifest.inputs
            feeds = {name: rng.normal(size=a.shape).astype(np.float32) for name, a in
                     zero_feeds(ort_backend.manifest).items()}
            if mode == "stream":
                feeds["prev_action_valid"][:] = 1.0
            ort_out, torch_out = ort_backend.infer(feeds), torch_backend.infer(feeds)
            output_names = sorted(spec.name for spec in ort_backend.manifest.outputs)
            assert sorted(ort_out) == sorted(torch_out) == output_names
            for name in ort_out:
                difference = np.abs(ort_out[name] - torch_out[name]).max()
                assert difference < 1e-5, (mode, name, difference)


def test_inputs_are_checked_by_name_dtype_and_shape(engines):
    with load_backend(engines["window"]) as backend:
        feeds = zero_feeds(backend.manifest)
        with pytest.raises(DMMError, match=r"'states' float64 \(1, 8, 11\); expected float32 "
                                           r"\(1, 8, 11\)"):
            backend.infer({**feeds, "states": feeds["states"].astype(np.float64)})
        with pytest.raises(DMMError, match=r"'rtg' float32 \(1, 8\); expected float32 "
                                           r"\(1, 8, 1\)"):
            backend.infer({**feeds, "rtg": feeds["rtg"][..., 0]})
        with pytest.raises(DMMError, match=r"inputs \['actions', 'states'\]; expected"):
            backend.infer({"states": feeds["states"], "actions": feeds["actions"]})
        with pytest.raises(DMMError, match=r"'actions' list; expected"):
            check_feeds(backend.manifest, {**feeds, "actions": feeds["actions"].tolist()})


def test_unknown_suffix_and_missing_tensorrt(tmp_path):
    with pytest.raises(DMMError, match="unknown engine file type '.bin'"):
        load_backend(tmp_path / "policy.bin")
    with pytest.raises(DMMError, match="unknown engine file type"):
        load_backend(tmp_path / "policy")
    # A plan is checked against its manifest before TensorRT is needed (tests/test_runtime_trt.py has the rest).
    with pytest.raises(DMMError, match="hopper.plan' does not exist.*build it on the target GPU"):
        load_backend(tmp_path / "hopper.plan")


def test_missing_and_corrupt_onnx(engines, tmp_path):
    with pytest.raises(DMMError, match="does not exist"):
        load_backend(tmp_path / "absent.onnx")
    corrupt = copy_engine(engines["window"], tmp_path)
    corrupt.write_bytes(b"not a protobuf" * 100)
    with pytest.raises(DMMError, match="could not be loaded by ONNX Runtime.*re-export"):
        load_backend(corrupt)


def test_manifest_missing_or_disagreeing(engines, tmp_path):
    engine = copy_engine(engines["window"], tmp_path)
    manifest_path_for(engine).unlink()
    with pytest.raises(DMMError, match=rf"manifest .*{engine.stem}.json': no such file"):
        load_backend(engine)

    # The stream manifest beside the window graph: different I/O names.
    shutil.copy(manifest_path_for(engines["stream"]), manifest_path_for(engine))
    with pytest.raises(DMMError, match=r"graph inputs \['actions', 'rtg', 'states'\]; expected the manifest's"):
        load_backend(engine)

    # A consistent manifest of another K: same names, other shapes.
    shutil.copy(manifest_path_for(engines["window"]), manifest_path_for(engine))
    manifest = json.loads(manifest_path_for(engine).read_text())
    manifest["context_len"] = 9
    for spec in manifest["inputs"]:
        spec["shape"][1] = 9
    manifest_path_for(engine).write_text(json.dumps(manifest))
    with pytest.raises(DMMError, match=r"graph input 'states' float32 \(1, 8, 11\); expected the manifest's float32 "
                                       r"\(1, 9, 11\)"):
        load_backend(engine)

    # Same I/O, but the graph is not the one the manifest was written for.
    shutil.copy(manifest_path_for(engines["window"]), manifest_path_for(engine))
    edit_manifest(engine, onnx_sha256="0" * 64)
    with pytest.raises(DMMError, match="sha256 .*re-export"):
        load_backend(engine)

    manifest_path_for(engine).write_text("{not json")
    with pytest.raises(DMMError, match="not valid JSON"):
        load_backend(engine)


def test_mode_must_match_an_exported_engine(engines):
    with pytest.raises(DMMError, match="mode 'stream' for engine .* which is a window graph"):
        load_backend(engines["window"], "stream")


def test_gpu_provider_request_is_asserted(engines):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu installed: see test_cuda_provider_in_use")
    with pytest.raises(DMMError, match="provider 'cuda'.*onnxruntime-gpu"):
        load_backend(engines["window"], provider="cuda")
    with pytest.raises(DMMError, match="provider 'gpu'; expected"):
        OrtBackend(engines["window"], provider="gpu")
    with load_backend(engines["window"], provider="auto") as backend:
        assert backend.provider == "CPUExecutionProvider"


@pytest.mark.gpu
def test_cuda_provider_in_use(engines):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with CUDA")
    with load_backend(engines["window"], provider="cuda") as backend:
        assert backend.provider == "CUDAExecutionProvider"
        assert backend._session.get_providers()[0] == "CUDAExecutionProvider"


# -- Policy -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def window_backend(engines):
    with load_backend(engines["window"]) as backend:
        yield backend


def test_policy_window_protocol(window_backend):
    """Normalisation, rtg bookkeeping, zero left-padding and the zero placeholder, step by step."""
    manifest = window_backend.manifest
    mean, std = np.asarray(manifest.state_mean), np.asarray(manifest.state_std)
    policy = Policy(window_backend, target_return=3000.0)
    rng = np.random.default_rng(2)
    observations, rewards = rng.normal(size=(12, 11)), rng.uniform(0, 3, size=12)
    actions = []
    for t in range(12):
        actions.append(policy.act(observations[t], rewards[t - 1] if t else 123.0))
        feeds = policy._feeds
        width = min(t + 1, manifest.context_len)
        pad = manifest.context_len - width
        assert not feeds["states"][0, :pad].any() and not feeds["rtg"][0, :pad].any()
        expected_states = ((observations[t + 1 - width:t + 1] - mean) / std).astype(np.float32)
        np.testing.assert_array_equal(feeds["states"][0, pad:], expected_states)
        # The placeholder was zero when the graph ran; after act it holds the action taken.
        assert not feeds["actions"][0, :pad].any()
        np.testing.assert_array_equal(feeds["actions"][0, pad:], np.asarray(actions)[t + 1 - width:])
    rtg = [np.float32(3000.0 / 1000.0)]  # the first reward (123) is ignored
    for t in range(1, 12):
        rtg.append(np.float32(float(rtg[-1]) - rewards[t - 1] / 1000.0))
    np.testing.assert_array_equal(policy._feeds["rtg"][0, :, 0], np.asarray(rtg[-8:]))
    assert policy.t == 12 and policy.rtg == pytest.approx(float(rtg[-1]))

    policy.reset()
    assert policy.t == 0 and not any(array.any() for array in policy._feeds.values())
    np.testing.assert_array_equal(policy.act(observations[0], 5.0), actions[0])  # a fresh episode


def test_policy_refuses_bad_observations_and_rewards(window_backend):
    policy = Policy(window_backend)
    with pytest.raises(DMMError, match=r"observation float64 \(12,\); expected .*\(11,\)"):
        policy.act(np.zeros(12))
    with pytest.raises(DMMError, match=r"observation float64 \(1, 11\)"):
        policy.act(np.zeros((1, 11)))
    observation = np.zeros(11)
    observation[[3, 7]] = [np.nan, np.inf]
    with pytest.raises(DMMError, match=r"non-finite values at indices \[3, 7\]"):
        policy.act(observation)
    with pytest.raises(DMMError, match="override_action .*before any act"):
        policy.override_action(np.zeros(3))
    policy.act(np.zeros(11))
    with pytest.raises(DMMError, match=r"reward nan; expected a finite number"):
        policy.act(np.zeros(11), float("nan"))
    with pytest.raises(DMMError, match="target return"):
        Policy(window_backend, target_return=float("inf"))


@pytest.mark.parametrize("engine", ["window", "stream", "checkpoint"])
def test_a_refused_observation_is_one_line_and_leaves_the_episode_intact(engine, engines, checkpoint_path):
    """Wrong size or non-finite: a DMMError of one line before anything runs; the next good
    observation continues the episode as if the bad one had never come."""
    path = checkpoint_path if engine == "checkpoint" else engines[engine]
    mode = "stream" if engine == "stream" else "window"
    observations = np.random.default_rng(5).normal(size=(3, 11))
    with load_backend(path, mode) as backend:
        reference = Policy(backend)
        expected = [reference.act(o, 1.0) for o in observations]
        policy = Policy(backend)
        policy.act(observations[0], 1.0)
        snapshot = {name: array.copy() for name, array in policy._feeds.items()}
        bad = observations[1].copy()
        bad[4] = np.nan
        for observation, fragment in ((bad, "non-finite values at indices [4]"),
                                      (observations[1][:10], "(10,); expected"),
                                      (np.full(11, np.inf), "non-finite")):
            with pytest.raises(DMMError) as refused:
                policy.act(observation, 1.0)
            assert fragment in str(refused.value) and "\n" not in str(refused.value)
        assert policy.t == 1
        assert all(np.array_equal(policy._feeds[name], array) for name, array in snapshot.items())
        actions = [expected[0], policy.act(observations[1], 1.0), policy.act(observations[2], 1.0)]
    np.testing.assert_array_equal(np.asarray(actions), np.asarray(expected))


def test_run_errors_of_stream_and_checkpoint_engines_are_one_line(capsys, checkpoint_path, engines):
    stream = str(engines["stream"])
    assert_one_line_error(capsys, cli.main(["run", "--engine", stream, "--episodes", "0"]), "--episodes 0")
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(checkpoint_path), "--episodes", "0"]),
                          "--episodes 0")
    assert_one_line_error(capsys, cli.main(["run", "--engine", stream, "--mode", "window"]), "stream graph")
    assert_one_line_error(capsys, cli.main(["run", "--engine", stream, "--threads", "-2"]), "--threads -2")


def test_policy_clips_to_the_manifest_bounds(engines, tmp_path):
    engine = copy_engine(engines["window"], tmp_path)
    edit_manifest(engine, action_low=[-0.001] * 3, action_high=[0.002] * 3)
    with load_backend(engine) as backend:
        policy = Policy(backend)
        actions = np.asarray([policy.act(o, 1.0) for o in np.random.default_rng(3).normal(size=(20, 11))])
    assert actions.min() >= -0.001 and actions.max() <= 0.002
    assert actions.min() == np.float32(-0.001) or actions.max() == np.float32(0.002)


def test_policy_stream_feeds_back_its_caches(engines):
    with load_backend(engines["stream"]) as backend:
        policy = Policy(backend)
        feeds = policy._feeds
        first = policy.act(np.ones(11))
        assert feeds["prev_action_valid"][0, 0] == 0.0  # the first step had no a_{t-1} token
        np.testing.assert_array_equal(feeds["prev_action"][0], first)  # the next step consumes a_0
        assert feeds["dsm_cache"].any() and feeds["ssm_state"].any()  # the caches came back
        policy.act(np.ones(11), 1.0)
        assert feeds["prev_action_valid"][0, 0] == 1.0
        policy.reset()
        assert not feeds["dsm_cache"].any() and not feeds["ssm_state"].any() and policy.t == 0


def test_ort_io_binding_equals_session_run_and_survives_aliased_caches(engines):
    import onnxruntime as ort

    reference = ort.InferenceSession(str(engines["stream"]), providers=["CPUExecutionProvider"])
    names = [o.name for o in reference.get_outputs()]
    rng = np.random.default_rng(0)
    with load_backend(engines["stream"]) as backend:
        feeds = {name: rng.normal(0, 0.5, array.shape).astype(np.float32) for name, array in zero_feeds(
            backend.manifest).items()}
        feeds["prev_action_valid"][:] = 1.0
        expected = dict(zip(names, reference.run(names, feeds), strict=True))
        first = backend.infer(feeds)
        for name in names:
            np.testing.assert_array_equal(first[name], expected[name])
        # Feed the backend's own output buffers straight back (no copy): the result must be the
        # one a fresh session computes from copies, not a run reading a buffer it is writing.
        aliased = {**feeds, "dsm_cache": first["dsm_cache_next"], "ssm_state": first["ssm_state_next"]}
        copies = {name: np.array(array) for name, array in aliased.items()}
        expected = dict(zip(names, reference.run(names, copies), strict=True))
        second = backend.infer(aliased)
        for name in names:
            np.testing.assert_array_equal(second[name], expected[name])
        # Same arrays, new contents: read afresh through the bound addresses.
        feeds["state"][:] = rng.normal(0, 0.5, feeds["state"].shape)
        expected = reference.run(["action"], feeds)[0]
        np.testing.assert_array_equal(backend.infer(feeds)["action"], expected)


# -- latency ----------------------------------------------------------------------------


def test_latency_stats_and_histogram(tmp_path):
    samples = np.arange(1, 101, dtype=np.int64) * 100_000  # 0.1 .. 10 ms
    stats = LatencyStats.from_ns(samples, deadline_ms=8.0)
    assert stats.count == 100 and stats.max == pytest.approx(10.0) and stats.misses == 20
    assert stats.p50 == pytest.approx(5.05) and stats.p99 == pytest.approx(9.901)
    assert "deadline 8 ms: 20 missed" in stats.summary()
    path = save_histogram(samples, tmp_path / "h.png", deadline_ms=8.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DMMError, match="latency samples"):
        LatencyStats.from_ns([])


# -- cli run ----------------------------------------------------------------------------


def test_run_same_return_for_checkpoint_and_window_onnx(capsys, checkpoint_path, engines, tmp_path):
    histogram = tmp_path / "latency.png"
    torch_report = run_json(capsys, "--engine", str(checkpoint_path), "--episodes", "2", "--seed", "5")
    ort_report = run_json(capsys, "--engine", str(engines["window"]), "--episodes", "2", "--seed", "5",
                          "--deadline-ms", "50", "--histogram", str(histogram))
    def identity(report):
        return report["backend"], report["provider"], report["mode"]

    assert identity(torch_report) == ("torch", "torch-cpu", "window")
    assert identity(ort_report) == ("ort", "CPUExecutionProvider", "window")
    assert ort_report["lengths"] == torch_report["lengths"] and ort_report["seeds"] == [5, 6]
    np.testing.assert_allclose(ort_report["returns"], torch_report["returns"], rtol=1e-6)
    assert ort_report["return"] == pytest.approx(np.mean(ort_report["returns"]))
    expected_score = 100 * (ort_report["return"] + 20.272305) / (3234.3 + 20.272305)
    assert ort_report["normalized_score"] == pytest.approx(expected_score)
    latency = ort_report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    assert ort_report["steps"] == sum(ort_report["lengths"]) and ort_report["deadline_ms"] == 50.0
    assert torch_report["deadline_ms"] == pytest.approx(8.0)  # Hopper-v5's control period by default
    assert histogram.is_file() and ort_report["histogram"] == str(histogram)


def test_run_stream_checkpoint_and_target(capsys, checkpoint_path, engines):
    torch_report = run_json(capsys, "--engine", str(checkpoint_path), "--mode", "stream", "--episodes", "1",
                            "--target", "7200")
    ort_report = run_json(capsys, "--engine", str(engines["stream"]), "--episodes", "1", "--target", "7200")
    assert torch_report["mode"] == ort_report["mode"] == "stream"
    assert torch_report["target_return"] == ort_report["target_return"] == 7200.0
    assert ort_report["lengths"] == torch_report["lengths"]
    np.testing.assert_allclose(ort_report["returns"], torch_report["returns"], rtol=1e-6)


def test_run_errors_are_one_line(capsys, checkpoint_path, engines, tmp_path):
    window = str(engines["window"])
    assert_one_line_error(capsys, cli.main(["run", "--engine", window, "--episodes", "0"]), "--episodes 0")
    assert_one_line_error(capsys, cli.main(["run", "--engine", window, "--deadline-ms", "-1"]),
                          "--deadline-ms")
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(tmp_path / "policy.tflite")]),
                          "unknown engine file type '.tflite'")
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(tmp_path / "absent.onnx")]),
                          "absent.onnx", "does not exist")
    corrupt = copy_engine(engines["window"], tmp_path)
    corrupt.write_bytes(b"\x00garbage")
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(corrupt)]), "could not be loaded")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(engines["window"], bare / "hopper.onnx")
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(bare / "hopper.onnx")]),
                          "hopper.json", "no such file")
    assert_one_line_error(capsys, cli.main(["run", "--engine", window, "--mode", "stream"]), "window graph")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert_one_line_error(capsys, cli.main(["run", "--engine", window, "--provider", "cuda"]),
                              "onnxruntime-gpu")
    # The plant gives 17-dim observations to an 11-dim policy: refused before the first step.
    walker = copy_engine(engines["window"], tmp_path / "bare")
    edit_manifest(walker, env_id="Walker2d-v5")
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(walker)]), "dims 17/6; expected 11/3")
    code = cli.main(["run", "--engine", str(checkpoint_path), "--provider", "tensorrt"])
    assert_one_line_error(capsys, code, "provider 'tensorrt' for a .pt engine")
    assert_one_line_error(capsys, cli.main(["run", "--engine", window, "--cuda-graph"]),
                          "--cuda-graph for a .onnx engine")


def test_manifest_of_the_engines_is_readable_without_torch(engines):
    manifest = read_manifest(manifest_path_for(engines["stream"]))
    assert manifest.mode == "stream" and manifest.input("dsm_cache").shape == (3, 1, 5, 64)


def test_run_refuses_a_baseline_checkpoint(capsys, tmp_path):
    from tests.helpers import write_checkpoint

    baseline = write_checkpoint(tmp_path / "bc", model_kind="bc")
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(baseline), "--episodes", "1"]),
                          "'bc' baseline", "cli.py eval")


def test_the_torch_backends_device_options_are_checked(capsys, checkpoint_path, engines):
    with pytest.raises(DMMError, match="expected cpu, cuda or cuda:N"):
        TorchBackend(checkpoint_path, device="gpu")
    with pytest.raises(DMMError, match="CUDA-graph replay needs a CUDA device"):
        TorchBackend(checkpoint_path, cuda_graph=True)
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(checkpoint_path), "--cuda-graph"]),
                          "--cuda-graph for a .pt engine on cpu", "--device cuda")
    assert_one_line_error(capsys, cli.main(["run", "--engine", str(engines["window"]), "--device", "cuda"]),
                          "for a .onnx engine", "--provider cuda")
    import torch

    if not torch.cuda.is_available():
        assert_one_line_error(capsys, cli.main(["run", "--engine", str(checkpoint_path), "--device", "cuda"]),
                              "sees no CUDA GPU", "--device cpu")


@pytest.mark.parametrize("mode", ["window", "stream"])
def test_the_torch_backend_on_a_gpu_with_and_without_cuda_graphs_matches_the_cpu(checkpoint_path, mode):
    import torch

    if not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA build of torch and an NVIDIA GPU (torch {torch.__version__} sees none)")

    observations = np.random.default_rng(5).normal(size=(9, 11))
    results = {}
    for label, options in (("cpu", {}), ("cuda", {"device": "cuda"}),
                           ("graph", {"device": "cuda", "cuda_graph": True})):
        with TorchBackend(checkpoint_path, mode=mode, **options).load() as backend:
            policy = Policy(backend)
            first = [policy.act(o, 1.0) for o in observations]
            policy.reset()  # the graphs' static inputs are overwritten by the next feeds
            results[label] = np.asarray(first + [policy.act(o, 1.0) for o in observations])
            if label == "graph":
                assert len(backend._graphs) == (1 if mode == "window" else 2)  # stream: with and without a_{t-1}
    np.testing.assert_allclose(results["cuda"], results["cpu"], atol=1e-5)
    np.testing.assert_allclose(results["graph"], results["cuda"], atol=1e-6)
