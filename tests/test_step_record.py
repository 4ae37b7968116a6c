"""The step record (runtime/step_record.py): what it holds, a record cut by SIGKILL, replay parity on ONNX Runtime,
C and PyTorch, and record -> Minari dataset -> training. Real engines, a real Hopper-v5 plant, the real CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest

import cli
from contract.files import sha256_file
from contract.manifest import manifest_path_for
from runtime.limits import ActuatorLimits
from runtime.loading import load_backend
from runtime.policy import FAULT_KINDS, Policy
from runtime.recording import trajectory_of_record
from runtime.step_record import COLUMNS, RECORD_HEADER, read_record
from tests.helpers import REPO_ROOT, assert_one_line_error, export_c, run_json


def test_record_holds_every_call_faults_limits_and_the_episode_end(engines, tmp_path):
    engine = engines["stream"]
    limits = ActuatorLimits(lower=(-1.0,) * 3, upper=(1.0,) * 3, max_change=(0.02,) * 3, ramp_steps=3)
    env = gym.make("Hopper-v5")
    with load_backend(engine) as backend, Policy(backend, on_fault="hold", limits=limits, record=tmp_path / "rec",
                                                 record_chunk_steps=7) as policy:
        observation, _ = env.reset(seed=1)
        policy.reset()
        reward, calls = 0.0, 0
        while True:
            if calls == 5:  # a sensor glitch: recorded as a fault, the held action sent
                policy.act(np.full_like(observation, np.nan), reward)
                calls += 1
            action = policy.act(observation, reward)
            calls += 1
            observation, reward, terminated, truncated, _ = env.step(action)
            if terminated or truncated or calls == 30:
                policy.end_episode(observation, reward, terminated=terminated)
                break
    env.close()

    record = read_record(tmp_path / "rec")
    columns = record.columns
    assert record.closed and record.rows == calls + 1 and set(columns) == set(COLUMNS)
    assert sorted(p.name for p in (tmp_path / "rec").iterdir() if p.name.startswith("chunk")) == [
        f"chunk-{i:06d}.npz" for i in range(-(-record.rows // 7))]
    assert record.header["manifest_sha256"] == sha256_file(manifest_path_for(engine))
    assert record.header["limits"]["max_change"] == [0.02] * 3
    assert columns["observation"].shape == (record.rows, 11) and columns["action"].shape == (record.rows, 3)
    fault_row = 5
    assert columns["fault"][fault_row] == 1 + FAULT_KINDS.index("observation_nonfinite")
    assert np.isnan(columns["action_policy"][fault_row]).all() and np.isnan(columns["rtg"][fault_row])
    np.testing.assert_array_equal(columns["action"][fault_row], columns["action"][fault_row - 1])  # held
    good = (columns["fault"] == 0) & (columns["event"] == 0)
    assert good.sum() == calls - 1 and columns["episode_start"].sum() == 1 and columns["episode_start"][0]
    # The limits are visible in the record: every sent action within 0.02 of the one before it.
    sent = columns["action"][good]
    assert np.abs(np.diff(sent, axis=0)).max() <= 0.02 + 1e-6
    assert np.abs(columns["action_policy"][good] - sent).max() > 0.02  # the engine asked for more
    assert (columns["step_ns"][good] > 0).all()
    assert columns["event"][-1] in (1, 2) and np.isfinite(columns["observation"][-1]).all()
    # The good steps rebuild the trajectory the policy conditioned on.
    trajectory = trajectory_of_record(record)
    assert trajectory.steps == calls - 1 and trajectory.episodes == 1
    np.testing.assert_array_equal(trajectory.actions, sent)


RECORDING_SCRIPT = """
import sys, gymnasium as gym
sys.path.insert(0, sys.argv[3])
from runtime.loading import load_backend
from runtime.policy import Policy
policy = Policy(load_backend(sys.argv[1]), record=sys.argv[2], record_chunk_steps=20)
env = gym.make("Hopper-v5")
seed = 0
while True:  # until killed
    observation, _ = env.reset(seed=seed)
    policy.reset()
    reward, done = 0.0, False
    while not done:
        action = policy.act(observation, reward)
        observation, reward, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
    policy.end_episode(observation, reward, terminated=terminated)
    seed += 1
"""


def test_a_sigkilled_recording_leaves_a_readable_record_up_to_its_last_chunk(engines, tmp_path):
    record_dir = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", RECORDING_SCRIPT, str(engines["stream"]), str(record_dir),
                                str(REPO_ROOT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if record_dir.is_dir() and len(list(record_dir.glob("chunk-*.npz"))) >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL

    record = read_record(record_dir)
    assert not record.closed and record.rows >= 60 and record.rows % 20 == 0
    assert all(values.shape[0] == record.rows for values in record.columns.values())
    assert np.isfinite(record.columns["observation"][record.columns["event"] == 0]).all()
    # What was flushed is usable: it replays and becomes transitions.
    assert trajectory_of_record(record).steps > 0 and record.transition_arrays()["actions"].shape[0] > 0
    # A new recorder into the same directory is refused; the record is never appended to.
    with load_backend(engines["stream"]) as backend, pytest.raises(Exception, match="already holds a step record"):
        Policy(backend, record=record_dir)


def test_replay_parity_on_ort_c_and_pytorch(engines, checkpoint_path, tmp_path, capsys):
    c_path = export_c(checkpoint_path, tmp_path / "c")  # the same checkpoint as the ONNX engines
    record_dir = tmp_path / "run-record"
    report = run_json(capsys, "--engine", str(engines["stream"]), "--episodes", "2", "--record", str(record_dir),
                      "--action-rate-limit", "0.05")
    assert report["record"] == str(record_dir) and report["record_rows"] == sum(report["lengths"]) + 2

    code = cli.main(["parity", "--replay", str(record_dir), "--onnx", str(engines["stream"]), "--onnx", str(c_path),
                     "--checkpoint", str(checkpoint_path), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    replay = json.loads(captured.out.strip().splitlines()[-1])
    assert replay["steps"] == sum(report["lengths"]) and replay["episodes"] == 2
    drift = {pair["candidate"].split()[0]: pair["max_abs"] for pair in replay["pairs"]}
    assert drift["ort/stream"] == 0.0  # the recorded engine itself: bit for bit
    assert drift["native/stream"] < 1e-4 and drift["torch/stream"] < 1e-4, drift
    assert "recorded" in captured.err and "max@1" in captured.err

    # Another checkpoint's engine is refused in one line.
    other = tmp_path / "other-record"
    run_json(capsys, "--engine", str(engines["window"]), "--episodes", "1", "--record", str(other))
    header = json.loads((other / RECORD_HEADER).read_text())
    header["checkpoint_sha256"] = "f" * 64
    (other / RECORD_HEADER).write_text(json.dumps(header))
    code = cli.main(["parity", "--replay", str(other), "--onnx", str(engines["window"])])
    assert_one_line_error(capsys, code, "comes from checkpoint", "expected the record's ffffffffffff")


def test_record_becomes_a_minari_dataset_that_trains(engines, tmp_path, capsys):
    record_dir = tmp_path / "robot-run"
    report = run_json(capsys, "--engine", str(engines["window"]), "--episodes", "3", "--record", str(record_dir))
    store = tmp_path / "store"
    code = cli.main(["import", str(record_dir), "--format", "npz", "--dataset-id", "test/recorded-hopper-v0",
                     "--out", str(store)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"{sum(report['lengths'])} steps" in captured.out and "3 episodes" in captured.out

    from dmm_train.minari_reader import load_dataset

    dataset_dir = next(path for path in store.rglob("*") if path.is_dir() and (path / "data").is_dir())
    dataset = load_dataset(dataset_dir)
    record = read_record(record_dir)
    arrays = record.transition_arrays()
    np.testing.assert_allclose(dataset.episodes[0].actions, arrays["actions"][:arrays["episode_ends"][0]],
                               atol=1e-7)
    run_dir = tmp_path / "run"
    code = cli.main(["train", "--dataset", str(dataset_dir), "--preset", "hopper", "--steps", "3", "--out",
                     str(run_dir), "--eval-episodes", "0", "--quiet", "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (run_dir / "model.pt").is_file()


def test_record_refuses_bad_places_in_one_line(engines, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code = cli.main(["run", "--engine", str(engines["stream"]), "--episodes", "1", "--record", str(a_file)])
    assert_one_line_error(capsys, code, "is a file", "choose another path")
    assert os.listdir(tmp_path) == ["file"]
