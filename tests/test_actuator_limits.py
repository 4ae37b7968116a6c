"""Limits at the actuator (runtime/limits.py): bounds, rate limit and start-up ramp, in both modes and in C.

Real engines (ONNX Runtime, the compiled C step), a real Hopper-v5 plant, the real CLI.
"""

from __future__ import annotations

import ctypes
import json

import gymnasium as gym
import numpy as np
import pytest

import cli
from contract.manifest import read_manifest
from runtime.limits import LIMIT_KINDS, ActuatorLimits, LimitsOptions
from runtime.loading import load_backend
from runtime.policy import Policy
from tests.helpers import assert_one_line_error, export_c, run_json

# Narrow enough that each limit bites an untrained engine's actions in a few dozen steps.
LIMITS = ActuatorLimits(lower=(-0.05, -0.9, -1.0), upper=(0.05, 0.7, 1.0), max_change=(0.05, 0.08, 0.1),
                        ramp_steps=6, ramp_start=(0.02, -0.2, 0.0))


def reference_limits(engine_actions: np.ndarray, limits: ActuatorLimits, start: np.ndarray):
    """The limits written out step by step in float32 scalars, apart from runtime/limits.py: (T, Adim), counts."""
    f32 = np.float32
    sent, counts = [], {kind: np.zeros(len(limits.lower), dtype=np.int64) for kind in LIMIT_KINDS}
    previous = [f32(v) for v in start]
    for t, predicted in enumerate(engine_actions):
        row = []
        for j, value in enumerate(predicted):
            value = f32(value)
            bounded = min(max(value, f32(limits.lower[j])), f32(limits.upper[j]))
            counts["bounds"][j] += bounded != value
            if t < limits.ramp_steps:
                weight = f32(t + 1) / f32(limits.ramp_steps + 1)
                ramped = f32(start[j]) + weight * (bounded - f32(start[j]))
                ramped = min(max(ramped, f32(limits.lower[j])), f32(limits.upper[j]))
                counts["ramp"][j] += ramped != bounded
                bounded = ramped
            change = f32(limits.max_change[j])
            limited = min(max(bounded, previous[j] - change), previous[j] + change)
            counts["rate"][j] += limited != bounded
            row.append(limited)
        previous = row
        sent.append(row)
    return np.asarray(sent, dtype=np.float32), {kind: tuple(int(v) for v in c) for kind, c in counts.items()}


def closed_loop(policy: Policy, steps: int, seed: int = 0, start_action=None):
    """(observations (T, S), rewards passed (T,), sent actions (T, Adim), engine actions (T, Adim)), one episode."""
    env = gym.make("Hopper-v5")
    observation, _ = env.reset(seed=seed)
    policy.reset(start_action=start_action)
    observations, rewards, sent, engine = [], [], [], []
    reward = 0.0
    for _ in range(steps):
        observations.append(observation)
        rewards.append(reward)
        sent.append(policy.act(observation, reward))
        engine.append(policy.engine_action)
        observation, reward, terminated, truncated, _ = env.step(sent[-1])
        if terminated or truncated:
            break
    env.close()
    return np.asarray(observations), np.asarray(rewards), np.asarray(sent), np.asarray(engine)


@pytest.mark.parametrize("mode", ["window", "stream"])
def test_each_limit_bites_as_specified_and_the_history_holds_the_limited_action(engines, mode):
    with load_backend(engines[mode]) as backend:
        limited = Policy(backend, limits=LIMITS)
        observations, rewards, sent, engine = closed_loop(limited, 40)
        expected, counts = reference_limits(engine, LIMITS, np.asarray(LIMITS.ramp_start, dtype=np.float32))
        np.testing.assert_array_equal(sent, expected)
        assert limited.limit_counts == counts
        assert all(sum(counts[kind]) > 0 for kind in LIMIT_KINDS), counts  # every limit bit in this run
        assert (sent >= np.float32(LIMITS.lower)).all() and (sent <= np.float32(LIMITS.upper)).all()

        # A policy without limits, teacher-forced on the limited actions, predicts exactly what the limited one
        # did: the history (window or caches) of the limited policy held the limited actions, not its own.
        free = Policy(backend)
        free.reset()
        for t in range(len(sent)):
            free.act(observations[t], rewards[t])
            np.testing.assert_array_equal(free.engine_action, engine[t])
            free.override_action(sent[t])
        # Without that forcing, its own (unlimited) actions in its history change its predictions: the check
        # above has teeth.
        unforced = Policy(backend)
        unforced.reset()
        own = np.asarray([(unforced.act(o, r), unforced.engine_action)[1] for o, r in zip(observations, rewards,
                                                                                          strict=True)])
        assert np.abs(own - engine).max() > 1e-4


def test_start_action_at_reset_starts_ramp_and_rate_limit(engines):
    with load_backend(engines["stream"]) as backend:
        policy = Policy(backend, limits=LIMITS)
        start = np.array([0.04, -0.5, 0.3], dtype=np.float32)
        _, _, sent, engine = closed_loop(policy, 12, start_action=start)
        expected, _ = reference_limits(engine, LIMITS, start)
        np.testing.assert_array_equal(sent, expected)
        assert np.abs(sent[0] - start).max() <= 0.1 + 1e-7
        with pytest.raises(Exception, match="start_action"):
            policy.reset(start_action=[2.0, 0.0, 0.0])


def test_export_records_limits_run_applies_and_counts_them_and_overrides_win(checkpoint_path, tmp_path, capsys):
    limits_file = tmp_path / "limits.json"
    limits_file.write_text(json.dumps({"max_change": 0.05, "ramp_steps": 10, "upper": [0.9, 0.9, 0.5]}))
    engine = tmp_path / "limited.onnx"
    assert cli.main(["export", "--checkpoint", str(checkpoint_path), "--mode", "stream", "--out", str(engine),
                     "--limits", str(limits_file), "--action-lower", "-0.7", "--no-engine"]) == 0
    capsys.readouterr()
    recorded = read_manifest(engine.with_suffix(".json")).actuator_limits
    assert recorded == {"lower": [-0.7] * 3, "upper": [0.9, 0.9, 0.5], "max_change": [0.05] * 3, "ramp_steps": 10,
                        "ramp_start": None}
    with load_backend(engine) as backend:
        assert Policy(backend).limits == ActuatorLimits.from_dict(recorded, backend.manifest)

    report = run_json(capsys, "--engine", str(engine), "--episodes", "1")
    assert report["limits"]["max_change"] == [0.05] * 3
    assert set(report["limits"]["counts"]) == set(LIMIT_KINDS)
    assert all(len(counts) == 3 for counts in report["limits"]["counts"].values())
    assert sum(report["limits"]["counts"]["rate"]) > 0 and sum(report["limits"]["counts"]["ramp"]) == 30

    # Overridden at load: run's options replace the manifest's numbers.
    report = run_json(capsys, "--engine", str(engine), "--episodes", "1", "--action-rate-limit",
                      "2", "--ramp-steps", "0")
    assert report["limits"]["max_change"] == [2.0] * 3 and report["limits"]["ramp_steps"] == 0
    assert sum(report["limits"]["counts"]["ramp"]) == 0

    code = cli.main(["run", "--engine", str(engine), "--episodes", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "limits: bounds -0.7 .. [0.9, 0.9, 0.5], rate 0.05/step, ramp 10 steps" in out

    code = cli.main(["doctor", "--engine", str(engine), "--steps", "20"])
    out = capsys.readouterr().out
    assert code == 0 and "limits: bounds -0.7 .. [0.9, 0.9, 0.5], rate 0.05/step, ramp 10 steps" in out


@pytest.mark.parametrize(("options", "fragments"), [
    (["--action-upper", "1.5"], ["lower/upper", "action_low <= lower <= upper <= action_high"]),
    (["--action-rate-limit", "0"], ["max_change", "positive"]),
    (["--action-lower", "0.1,0.2"], ["--action-lower", "1 or 3"]),
    (["--ramp-steps", "-1"], ["--ramp-steps -1"]),
])
def test_bad_limits_are_one_line_errors(engines, capsys, options, fragments):
    code = cli.main(["run", "--engine", str(engines["stream"]), "--episodes", "1", *options])
    assert_one_line_error(capsys, code, *fragments)


# -- the C step -------------------------------------------------------------------------------


class _Limits(ctypes.Structure):
    _fields_ = [("lower", ctypes.c_float * 3), ("upper", ctypes.c_float * 3), ("max_change", ctypes.c_float * 3),
                ("ramp_start", ctypes.c_float * 3), ("ramp_steps", ctypes.c_long), ("rate_limited", ctypes.c_int)]


class CStep:
    """The C file's env-step API through ctypes: what a C control loop calls."""

    def __init__(self, library_path, prefix: str):
        self.lib = ctypes.CDLL(str(library_path))
        self.prefix = prefix
        size = getattr(self.lib, f"{prefix}_state_size")
        size.restype = ctypes.c_ulong
        self.state = ctypes.create_string_buffer(int(size()))
        self.action = np.zeros(3, dtype=np.float32)

    def call(self, name: str, *args) -> int:
        return getattr(self.lib, f"{self.prefix}_{name}")(self.state, *args)

    def reset(self, target: float) -> None:
        assert self.call("reset", ctypes.c_double(target)) == 0

    def step(self, observation, reward) -> np.ndarray:
        observation = np.ascontiguousarray(observation, dtype=np.float64)
        status = self.call("step", observation.ctypes.data_as(ctypes.c_void_p), ctypes.c_double(reward),
                           self.action.ctypes.data_as(ctypes.c_void_p))
        assert status == 0
        return self.action.copy()

    def counts(self) -> dict:
        counts = np.zeros((3, 3), dtype=np.int64)
        assert self.call("limit_counts", counts.ctypes.data_as(ctypes.c_void_p)) == 0
        return {"bounds": tuple(counts[0]), "rate": tuple(counts[1]), "ramp": tuple(counts[2])}

    def set_ramp_start(self, start) -> int:
        limits = _Limits()
        getattr(self.lib, f"{self.prefix}_default_limits")(ctypes.byref(limits))
        for j, value in enumerate(start):
            limits.ramp_start[j] = float(value)
        return self.call("set_limits", ctypes.byref(limits))


@pytest.fixture(scope="module")
def limited_c_export(checkpoint_path, tmp_path_factory):
    from export.c_source import export_c_checkpoint

    export_c(checkpoint_path, tmp_path_factory.mktemp("plain-c"))  # skips without a compiler
    options = LimitsOptions(action_lower="-0.05,-0.9,-1", action_upper="0.05,0.7,1",
                            action_rate_limit="0.05,0.08,0.1", ramp_steps=6, ramp_start="0.02,-0.2,0")
    return export_c_checkpoint(checkpoint_path, out=tmp_path_factory.mktemp("limited-c") / "hopper-lim",
                               limits=options)[0]


@pytest.mark.parametrize("start", [None, (0.04, -0.5, 0.3)])
def test_c_step_applies_the_manifests_limits_as_the_python_runtime(limited_c_export, start):
    manifest = read_manifest(limited_c_export.with_suffix(".json"))
    assert ActuatorLimits.from_dict(manifest.actuator_limits, manifest) == LIMITS
    with load_backend(limited_c_export) as backend:
        policy = Policy(backend)  # the manifest's limits, applied in Python around the C network
        assert policy.limits == LIMITS
        observations, rewards, sent, _ = closed_loop(policy, 60, seed=3, start_action=start)
        c_step = CStep(backend.library.path, manifest.engine["symbol_prefix"])
        c_step.reset(policy.target_return)
        if start is not None:
            assert c_step.set_ramp_start(start) == 0
        c_actions = np.asarray([c_step.step(o, r) for o, r in zip(observations, rewards, strict=True)])
        assert np.abs(c_actions - sent).max() <= 1e-6
        assert c_step.counts() == policy.limit_counts
        assert sum(policy.limit_counts["rate"]) > 0 and sum(policy.limit_counts["ramp"]) > 0
        assert c_step.set_ramp_start((2.0, 0.0, 0.0)) == 6  # E_BAD_LIMITS: outside the bounds


def test_export_refuses_bad_limits_before_writing_anything(checkpoint_path, tmp_path, capsys):
    engine = tmp_path / "bad.onnx"
    code = cli.main(["export", "--checkpoint", str(checkpoint_path), "--out", str(engine), "--action-lower", "0.5",
                     "--action-upper", "0.2", "--no-engine"])
    assert_one_line_error(capsys, code)
    assert not engine.exists() and not engine.with_suffix(".json").exists()
