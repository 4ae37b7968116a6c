"""The parity chain on the CPU: ONNX Runtime == PyTorch per mode, teacher-forced over a whole 1000-step
Hopper-v5 episode and closed loop; the stream Policy == the sequence form over the whole history;
the torch Policy == the official evaluation protocol.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cli
from contract.manifest import manifest_path_for, read_manifest
from contract.tolerances import max_abs
from dmm_train.checkpoint import load_checkpoint
from dmm_train.evaluate import evaluate_policy
from export.parity import ParityConfig, run_parity
from runtime import Policy, load_backend
from runtime.loop import run_episode
from runtime.plant import make_plant
from tests.helpers import assert_one_line_error, one_torch_thread, write_checkpoint

FP32_TOLERANCE = max_abs("ort-vs-torch")  # docs/design.md#tolerances
EPISODE_STEPS = 1000


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def parity_report(checkpoint_path, engines):
    """Both modes, teacher-forced on one real 1000-step Hopper-v5 episode of the torch window policy."""
    graphs = (engines["window"], engines["stream"])
    return run_parity(ParityConfig(checkpoint_path, graphs, steps=EPISODE_STEPS))


def test_ort_equals_torch_teacher_forced_over_a_whole_episode(parity_report):
    trajectory = parity_report.trajectory
    assert (trajectory.steps, trajectory.episodes) == (EPISODE_STEPS, 1)  # one whole episode, no resets
    assert np.isfinite(trajectory.observations).all()
    assert np.abs(np.diff(trajectory.observations, axis=0)).max() > 0  # a moving plant, not a constant
    print(parity_report.table())
    assert [pair.mode for pair in parity_report.pairs] == ["window", "stream"]
    for pair in parity_report.pairs:
        assert pair.reference == f"torch/{pair.mode}" and pair.candidate.startswith(f"ort/{pair.mode}")
        assert [b.label for b in pair.bins] == ["1", "2-10", "11-100", "101-1000"]
        assert sum(b.count for b in pair.bins) == EPISODE_STEPS
        assert pair.max_abs < FP32_TOLERANCE, pair
        assert all(b.max_abs < FP32_TOLERANCE for b in pair.bins)


def normalised_history(manifest, trajectory, target_return: float):
    """The whole episode as sequence-form inputs: states (1, T, S), actions (1, T, Adim), rtg (1, T, 1)."""
    states = (trajectory.observations - np.asarray(manifest.state_mean)) / np.asarray(manifest.state_std)
    rtg = np.empty(trajectory.steps, dtype=np.float32)  # (T,), float32 bookkeeping as in evaluate.py
    rtg[0] = target_return / manifest.rtg_scale
    for t in range(1, trajectory.steps):
        rtg[t] = rtg[t - 1] - trajectory.rewards[t - 1] / manifest.rtg_scale
    states = torch.from_numpy(states.astype(np.float32))[None]  # (1, T, S)
    return states, torch.from_numpy(trajectory.actions)[None], torch.from_numpy(rtg)[None, :, None]


@torch.no_grad()
def test_stream_policy_equals_sequence_form_over_the_whole_history(parity_report, checkpoint_path, engines):
    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint.model.set_scan_impl("loop")
    manifest = read_manifest(manifest_path_for(engines["stream"]))
    states, actions, rtg = normalised_history(manifest, parity_report.trajectory, manifest.target_return)
    sequence = checkpoint.model(states, actions, rtg)[0].numpy()  # (T, Adim), one forward over 3T tokens
    for label in ("torch/stream", "ort/stream"):
        difference = np.abs(parity_report.actions[label] - sequence).max()
        print(f"{label} Policy vs sequence form, {parity_report.trajectory.steps} steps: {difference:.2e}")
        assert difference < FP32_TOLERANCE


@pytest.mark.parametrize("mode", ["window", "stream"])
def test_closed_loop_returns_equal(mode, checkpoint_path, engines):
    plant = make_plant("Hopper-v5")
    results = {}
    with load_backend(checkpoint_path, mode) as torch_backend, load_backend(engines[mode]) as ort_backend:
        for backend in (torch_backend, ort_backend):
            policy = Policy(backend)
            results[backend.name] = [run_episode(policy, plant, seed=seed) for seed in (0, 1, 2)]
    plant.close()
    for torch_episode, ort_episode in zip(results["torch"], results["ort"], strict=True):
        assert torch_episode.length == ort_episode.length
        assert ort_episode.episode_return == pytest.approx(torch_episode.episode_return, rel=1e-6)


@torch.no_grad()
def test_torch_policy_reproduces_the_official_evaluation(checkpoint_path):
    """Policy's window, rtg and normalisation are evaluate.py's, to the last bit."""
    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint.model.set_scan_impl("loop")
    plant = make_plant(checkpoint.env_id)
    with load_backend(checkpoint_path) as backend:
        policy = Policy(backend, target_return=7200.0)
        for seed in (3, 4):
            official = evaluate_policy(checkpoint.model, checkpoint.facts, target_return=7200.0, episodes=1,
                                       seed=seed)
            episode = run_episode(policy, plant, seed=seed)
            assert (episode.episode_return, episode.length) == (official.returns[0], official.lengths[0])
    plant.close()


def test_cli_parity_json(capsys, checkpoint_path, engines):
    code = cli.main(["parity", "--checkpoint", str(checkpoint_path), "--onnx", str(engines["window"]),
                     "--onnx", str(engines["stream"]), "--steps", "30", "--atol", "1e-5", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "torch/window" in captured.err and "max@11-100" in captured.err  # the table, beside the JSON
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["steps"] == 30 and report["env_id"] == "Hopper-v5"
    assert [(p["reference"], p["mode"]) for p in report["pairs"]] == [("torch/window", "window"),
                                                                       ("torch/stream", "stream")]
    for pair in report["pairs"]:
        assert pair["max_abs"] < FP32_TOLERANCE
        assert [b["steps"] for b in pair["bins"]] == ["1", "2-10", "11-100"]


def test_cli_parity_errors(capsys, checkpoint_path, engines, tmp_path):
    onnx = str(engines["stream"])
    assert_one_line_error(capsys, cli.main(["parity", "--checkpoint", str(checkpoint_path), "--onnx", onnx,
                                            "--steps", "0"]), "--steps 0")
    other = write_checkpoint(tmp_path, seed=1)
    code = cli.main(["parity", "--checkpoint", str(other), "--onnx", onnx, "--steps", "3"])
    assert_one_line_error(capsys, code, "exported from another checkpoint")
    assert_one_line_error(capsys, cli.main(["parity", "--checkpoint", str(checkpoint_path), "--onnx", onnx,
                                            "--steps", "5", "--atol", "0"]), "expected at most --atol 0")
    code = cli.main(["parity", "--checkpoint", str(tmp_path / "none.pt"), "--onnx", onnx])
    assert_one_line_error(capsys, code, "none.pt", "does not exist")
