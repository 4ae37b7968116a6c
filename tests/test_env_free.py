"""A policy from a robot's logs: no simulator, no preset, no reference scores.

Real Reacher-v5 rollouts (an env with no preset here) are written as the flat arrays a robot
logger would save, imported with `cli.py import` into a real Minari store, and then trained,
evaluated, exported (fp32 window and stream, fp16, int8, C) and compared with PyTorch, all
without the simulator: the dataset names no env.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

import cli
from contract.deployment import PolicyFacts
from contract.errors import DMMError
from dmm_train.config import derived_preset, get_preset, preset_for_dataset, run_name
from dmm_train.minari_reader import load_dataset
from dmm_train.rollouts import cut_rollout, rollout_episodes
from tests.helpers import assert_one_line_error

ENV = "Reacher-v5"
DATASET_ID = "robot/reacher-logs-v0"


def _flat(rollouts, *, action_scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "observations": np.concatenate([r.observations[:-1] for r in rollouts]),  # (N, S)
        "next_observations": np.concatenate([r.observations[1:] for r in rollouts]),  # (N, S)
        "actions": np.concatenate([r.actions for r in rollouts]) * action_scale,  # (N, A)
        "rewards": np.concatenate([r.rewards for r in rollouts]),  # (N,)
        "terminations": np.concatenate([r.terminations for r in rollouts]),
        "truncations": np.concatenate([r.truncations for r in rollouts]),
        "episode_ends": np.cumsum([len(r) for r in rollouts]),
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A local Minari store holding DATASET_ID, imported from 12 real 30-step Reacher-v5 episodes."""
    root = tmp_path_factory.mktemp("env-free")
    rollouts = [cut_rollout(r, 30) for r in rollout_episodes(ENV, n_episodes=12, seed=5)]
    np.savez(root / "log.npz", **_flat(rollouts))
    assert cli.main(["import", str(root / "log.npz"), "--format", "npz", "--dataset-id", DATASET_ID,
                     "--out", str(root / "store")]) == 0
    return root


@pytest.fixture()
def local_store(store, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(store / "store"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return store


@pytest.fixture(scope="module")
def trained(store):
    """(run directory, stderr of the training) of 40 steps on DATASET_ID, no --preset given."""
    import os

    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(store / "store")
    try:
        run = store / "run"
        code = cli.main(["train", "--dataset", DATASET_ID, "--steps", "40", "--eval-every", "20",
                         "--batch-size", "8", "--threads", "1", "--out", str(run)])
        assert code == 0
        return run
    finally:
        if previous is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous


def test_a_preset_is_derived_from_the_data(store):
    dataset = load_dataset(store / "store" / DATASET_ID)
    returns = np.array([float(np.sum(e.rewards)) for e in dataset.episodes])  # (E,), computed here independently
    preset = derived_preset(dataset)
    assert (preset.name, preset.env_id, preset.state_dim, preset.act_dim) == ("data", None, 10, 2)
    assert preset.ref_min_score is None and preset.ref_max_score is None
    # Reacher's returns are negative tens: the scale is the power of ten below the largest |return|.
    assert preset.rtg_scale == 10.0 ** math.floor(math.log10(np.abs(returns).max()))
    assert preset.target_returns[0] == pytest.approx(returns.max(), abs=1e-5)  # the best episode first
    assert preset.target_returns[1:] == pytest.approx([np.quantile(returns, 0.75), np.median(returns)], abs=1e-5)
    assert preset.max_episode_steps == 30
    assert preset_for_dataset("auto", dataset) == preset  # no env recorded: auto derives


def test_auto_takes_the_named_preset_of_the_datasets_env(store):
    dataset = load_dataset(store / "store" / DATASET_ID)
    hopper_like = dataclasses.replace(dataset, env_id="Hopper-v4")  # another version of a preset's env
    assert preset_for_dataset("auto", hopper_like) is get_preset("hopper")
    assert preset_for_dataset("data", hopper_like).name == "data"  # data derives even then
    with pytest.raises(DMMError, match="unknown preset 'reacher'"):
        preset_for_dataset("reacher", dataset)


@pytest.mark.parametrize(("preset", "dataset", "name"), [
    ("auto", None, "hopper"), ("walker2d", "anything-v0", "walker2d"),
    ("auto", "mujoco/halfcheetah/medium-v0", "halfcheetah"), ("auto", "robot/reacher-logs-v0", "reacher-logs"),
    ("data", "dmm-deploy/hopper-medium-v0", "hopper-medium"), ("auto", "logs/../arm one-v2/", "arm-one"),
])
def test_run_directories_are_named_before_the_data_is_read(preset, dataset, name):
    assert run_name(preset, dataset) == name


def test_training_without_a_simulator_records_the_facts_and_evaluates_offline(trained):
    metadata = json.loads((trained / "model.json").read_text())
    facts = PolicyFacts.from_dict({**metadata, **{k: metadata["model_config"][k]
                                                 for k in ("state_dim", "act_dim", "context_len")}})
    assert (facts.preset, facts.env_id, facts.ref_min_score, facts.ref_max_score) == ("data", None, None, None)
    assert facts.score_name == "return" and facts.score(-12.5) == -12.5  # raw returns, never normalised
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    offline = [r["offline"] for r in records if "offline" in r]
    assert len(offline) == 2 and all(r["heldout_episodes"] == 1 and r["windows"] == 30 for r in offline)
    assert all(0 < r["action_rmse"] < 2 for r in offline) and not any("normalized_mean" in r for r in records)
    best = json.loads((trained / "best.json").read_text())
    assert best["selection"]["offline"]["action_rmse"] == min(r["action_rmse"] for r in offline)


def test_eval_is_offline_and_run_needs_a_simulator(trained, local_store, capsys):
    assert cli.main(["eval", "--checkpoint", str(trained), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["env_id"] is None and result["offline"]["windows"] == 30
    assert cli.main(["export", "--checkpoint", str(trained), "--out", str(local_store / "w")]) == 0
    capsys.readouterr()
    code = cli.main(["run", "--engine", str(local_store / "w.onnx")])
    assert_one_line_error(capsys, code, "a policy with no simulator", "--env ID")
    # A simulator the user names still runs it; its scores are raw returns.
    assert cli.main(["run", "--engine", str(local_store / "w.onnx"), "--env", ENV, "--episodes", "1",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["normalized_score"] == pytest.approx(report["return"])


def test_every_export_of_an_env_free_policy_matches_pytorch(trained, local_store, capsys):
    out = local_store / "exports"
    out.mkdir(exist_ok=True)
    for name, options in {"window": [], "stream": ["--mode", "stream"], "fp16": ["--fp16", "--no-engine"],
                          "int8": ["--int8", "--no-engine"], "c": ["--target", "c"]}.items():
        assert cli.main(["export", "--checkpoint", str(trained), "--out", str(out / name), *options]) == 0, name
    printed = capsys.readouterr().out
    assert printed.count("closed loop not played (no simulator): judged by the held-out action error alone") == 2
    for precision in ("fp16", "int8"):
        accuracy = json.loads((out / f"{precision}.json").read_text())["accuracy"]
        assert accuracy["closed_loop"] is False and not accuracy["action_refused"] and "seeds" not in accuracy
    graphs = [out / "window.onnx", out / "stream.onnx", out / "fp16.onnx", out / "int8.onnx", out / "c.c"]
    args = ["parity", "--checkpoint", str(trained), "--steps", "120", "--json"]
    for graph in graphs:
        args += ["--onnx", str(graph)]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["env_id"] == "logged episodes (no simulator)" and report["steps"] == 120
    limits = {"window.onnx": 1e-5, "stream.onnx": 1e-5, "c.c": 1e-5, "fp16.onnx": 5e-3, "int8.onnx": 5e-2}
    for pair in report["pairs"]:
        graph = next(name for name in limits if name in pair["candidate"])
        assert pair["max_abs"] < limits[graph], pair


def test_actions_beyond_the_tanh_range_are_refused_in_one_line(local_store, tmp_path, capsys):
    rollouts = [cut_rollout(r, 10) for r in rollout_episodes(ENV, n_episodes=3, seed=9)]
    np.savez(tmp_path / "wide.npz", **_flat(rollouts, action_scale=3.0))
    assert cli.main(["import", str(tmp_path / "wide.npz"), "--format", "npz", "--dataset-id", "robot/wide-v0"]) == 0
    capsys.readouterr()
    code = cli.main(["train", "--dataset", "robot/wide-v0", "--steps", "2", "--out", str(tmp_path / "run")])
    assert_one_line_error(capsys, code, "dataset 'robot/wide-v0' actions in", "expected [-1, 1]")


def test_report_evaluations_need_a_simulator(local_store, tmp_path, capsys):
    code = cli.main(["train", "--dataset", DATASET_ID, "--steps", "2", "--report-episodes", "2",
                     "--out", str(tmp_path / "run")])
    assert_one_line_error(capsys, code, "--report-episodes 2 for a dataset with no simulator")


def test_the_example_feeds_the_policy_from_the_log(trained, local_store, capsys):
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    assert cli.main(["export", "--checkpoint", str(trained), "--target", "c", "--out", str(local_store / "ex-c")]) == 0
    result = subprocess.run([sys.executable, str(REPO_ROOT / "examples/robot_logs/drive_from_log.py"), "--engine",
                             str(local_store / "ex-c.c"), "--dataset", DATASET_ID, "--episodes", "2"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["episode 0", "episode 1"]
    assert all(0 < float(line.rsplit(" ", 1)[1]) < 2 for line in lines)  # an RMSE of actions in [-1, 1]
