"""Faults without crashes, the fixed-rate clock and the real-time options of the control loop.

The engines are real ONNX graphs of a checkpoint trained here on a real Hopper-v5 dataset
(so it records the training states' range) and run by real ONNX Runtime sessions; faults
are real: malformed, non-finite and out-of-range observations, non-finite rewards, a
closed backend (what infer raises then), and an engine that overflows to NaN.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import gymnasium
import numpy as np
import pytest

import cli
from contract.errors import DMMError
from contract.manifest import MODES, manifest_path_for, read_manifest
from runtime import Policy, load_backend
from runtime.clock import ControlLoop, FixedRateClock, RealtimeOptions, realtime, request_fifo
from runtime.loop import run_episode
from runtime.plant import make_plant
from runtime.policy import FAULT_KINDS
from tests.helpers import assert_one_line_error, copy_engine, edit_manifest, export_engines, run_json

REPO_ROOT = Path(__file__).resolve().parent.parent
FAULT_REWARD = 0.25  # passed with the faulty observation: exact in binary, so sums compare exactly
STEPS = 6  # good observations per test episode; the fault comes before the one at FAULT_AT
FAULT_AT = 3
# The overflow engine's inf is made by numpy's float64 -> float32 cast, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, dataset) of a few official training steps on a small random-policy Hopper-v5 dataset."""
    from dmm_train.config import TrainConfig
    from dmm_train.minari_reader import load_dataset
    from dmm_train.recipes import collect
    from dmm_train.train import train

    directory = tmp_path_factory.mktemp("trained")
    dataset_path = collect("Hopper-v5", "test/faults-random-v0", policy="random", episodes=8, seed=3,
                           out=directory / "datasets")
    config = TrainConfig(dataset=str(dataset_path), steps=2, batch_size=8, eval_episodes=0, checkpoint_every=2,
                         scan="loop")
    return train(config, directory / "run", progress=False), load_dataset(dataset_path)


@pytest.fixture(scope="module")
def ranged_engines(trained, tmp_path_factory):
    return export_engines(trained[0], tmp_path_factory.mktemp("ranged"))


@pytest.fixture(scope="module")
def observations(trained):
    """STEPS real dataset observations (float64) and the rewards that followed them."""
    episode = max(trained[1].episodes, key=len)
    return episode.observations[:STEPS].astype(np.float64), episode.rewards[:STEPS].astype(np.float64)


@pytest.fixture(scope="module")
def overflow_engines(ranged_engines, observations, tmp_path_factory):
    """Engines whose manifest divides state 0 by 1e-300: an observation off the mean there normalises
    to inf in float32 and the real graph returns NaN; one at the mean normalises to 0 and is good."""
    directory = tmp_path_factory.mktemp("overflow")
    engines = {}
    for mode, engine in ranged_engines.items():
        engines[mode] = copy_engine(engine, directory)
        manifest = json.loads(manifest_path_for(engine).read_text())
        edit_manifest(engines[mode], state_std=[1e-300, *manifest["state_std"][1:]])
    return engines


def good_observations(observations, manifest, kind):
    """The good observations of a test episode (state 0 pinned to the mean for the overflow engine)."""
    values = observations[0].copy()
    if kind == "action_nonfinite":
        values[:, 0] = manifest.state_mean[0]
    return values


def faulty_call(kind, observation, manifest, backend):
    """(observation, reward) that make a step of ``kind``; may break ``backend`` (see restore)."""
    bad = observation.copy()
    if kind == "observation_shape":
        return bad[:-1], FAULT_REWARD
    if kind == "observation_nonfinite":
        bad[2] = np.nan
        return bad, FAULT_REWARD
    if kind == "observation_range":
        bad[4] = manifest.observation_high[4] + 1.0
        return bad, FAULT_REWARD
    if kind == "reward_nonfinite":
        return bad, float("inf")
    if kind == "backend":
        backend.close()  # infer on a closed backend raises: a real backend error
        return bad, FAULT_REWARD
    bad[0] = manifest.state_mean[0] + 0.01  # action_nonfinite: normalises to inf, the graph gives NaN
    return bad, FAULT_REWARD


def committed_state(policy: Policy) -> dict[str, np.ndarray]:
    """Copies of everything the next step conditions on."""
    if policy.mode == "window":
        arrays = {"states": policy._history_states, "actions": policy._history_actions,
                  "rtgs": policy._history_rtgs}
    else:
        arrays = {name: policy._feeds[name] for name in ("prev_action", "dsm_cache", "ssm_state")}
    return {**{name: array.copy() for name, array in arrays.items()}, "t": np.asarray(policy.t),
            "rtg": np.asarray(policy.rtg)}


def engine_for(kind, mode, ranged_engines, overflow_engines):
    return (overflow_engines if kind == "action_nonfinite" else ranged_engines)[mode]


def reference_actions(backend, goods, rewards, extra_reward):
    """The episode without the faulty call; ``extra_reward`` arrives with the first step after it."""
    policy = Policy(backend)
    actions = []
    for t, observation in enumerate(goods):
        reward = rewards[t - 1] + (extra_reward if t == FAULT_AT else 0.0) if t else 0.0
        actions.append(policy.act(observation, reward))
    return np.asarray(actions), policy.rtg


# -- the fault matrix: every kind, both modes -------------------------------------------------


@pytest.mark.parametrize("on_fault", ["hold", "safe"])
@pytest.mark.parametrize("kind", FAULT_KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_a_fault_returns_the_fallback_and_never_reaches_the_state(mode, kind, on_fault, ranged_engines,
                                                                  overflow_engines, observations):
    with load_backend(engine_for(kind, mode, ranged_engines, overflow_engines)) as backend:
        manifest = backend.manifest
        goods, rewards = good_observations(observations, manifest, kind), observations[1]
        kept = 0.0 if kind == "reward_nonfinite" else FAULT_REWARD  # a non-finite reward is not kept
        expected, expected_rtg = reference_actions(backend, goods, rewards, kept)

        policy = Policy(backend, on_fault=on_fault)
        actions = [policy.act(goods[t], rewards[t - 1] if t else 0.0) for t in range(FAULT_AT)]
        before = committed_state(policy)
        observation, reward = faulty_call(kind, goods[FAULT_AT], manifest, backend)
        fallback = policy.act(observation, reward)
        assert policy.last_fault.kind == kind and "\n" not in policy.last_fault.message
        assert dict(policy.faults) == {k: int(k == kind) for k in FAULT_KINDS}
        after = committed_state(policy)
        for name, array in before.items():
            np.testing.assert_array_equal(after[name], array, err_msg=name)
        if on_fault == "hold":
            np.testing.assert_array_equal(fallback, actions[-1])
        else:
            np.testing.assert_array_equal(fallback, np.zeros(manifest.act_dim, dtype=np.float32))
        backend.load()  # a closed one reopens: the next step runs on a fresh session
        actions += [policy.act(goods[t], rewards[t - 1]) for t in range(FAULT_AT, STEPS)]
    np.testing.assert_allclose(np.asarray(actions), expected, atol=1e-6, rtol=0)
    assert policy.t == STEPS and policy.rtg == pytest.approx(expected_rtg, abs=1e-7)


@pytest.mark.parametrize("kind", FAULT_KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_under_raise_a_fault_is_one_line_counted_and_leaves_no_trace(mode, kind, ranged_engines, overflow_engines,
                                                                     observations):
    with load_backend(engine_for(kind, mode, ranged_engines, overflow_engines)) as backend:
        manifest = backend.manifest
        goods, rewards = good_observations(observations, manifest, kind), observations[1]
        expected, _ = reference_actions(backend, goods, rewards, 0.0)  # a raised call keeps no reward
        policy = Policy(backend)
        actions = [policy.act(goods[t], rewards[t - 1] if t else 0.0) for t in range(FAULT_AT)]
        before = committed_state(policy)
        observation, reward = faulty_call(kind, goods[FAULT_AT], manifest, backend)
        with pytest.raises(DMMError) as raised:
            policy.act(observation, reward)
        assert "\n" not in str(raised.value) and "; expected " in str(raised.value)
        assert policy.faults[kind] == 1 and sum(policy.faults.values()) == 1
        for name, array in committed_state(policy).items():
            np.testing.assert_array_equal(array, before[name], err_msg=name)
        backend.load()
        actions += [policy.act(goods[t], rewards[t - 1]) for t in range(FAULT_AT, STEPS)]
    np.testing.assert_allclose(np.asarray(actions), expected, atol=1e-6, rtol=0)


def test_rewards_of_held_steps_reach_the_return_to_go(ranged_engines, observations):
    """Every finite reward the plant gave from the first good step on is subtracted, held steps' too."""
    goods, rewards = observations
    with load_backend(ranged_engines["window"]) as backend:
        policy = Policy(backend, target_return=3000.0, on_fault="hold")
        policy.act(goods[0], 99.0)  # the first step's reward is ignored (no previous action)
        policy.act(goods[1], 1.0)
        policy.act(np.full(11, np.nan), 0.5)  # faulty: its reward 0.5 is kept
        policy.act(goods[2][:5], 0.25)  # faulty again
        policy.act(goods[2], float("nan"))  # a non-finite reward: a fault, nothing kept
        assert policy.rtg == pytest.approx(3.0 - 1.0 / 1000)
        policy.act(goods[2], 2.0)
        assert policy.rtg == pytest.approx(3.0 - (1.0 + 0.5 + 0.25 + 2.0) / 1000, abs=1e-6)
        assert policy.t == 3 and sum(policy.faults.values()) == 3


def test_consecutive_faults_beyond_the_limit_raise(ranged_engines, observations):
    goods = observations[0]
    with load_backend(ranged_engines["stream"]) as backend:
        policy = Policy(backend, on_fault="hold", max_consecutive_faults=2)
        first = policy.act(goods[0])
        bad = np.full(11, np.inf)
        for _ in range(2):
            np.testing.assert_array_equal(policy.act(bad, 1.0), first)
        with pytest.raises(DMMError, match=r"3 consecutive faults, the last observation_nonfinite: .*"
                                           r"max_consecutive_faults=2"):
            policy.act(bad, 1.0)
        policy.act(goods[1], 1.0)  # a good step starts the count again
        assert policy.consecutive_faults == 0
        for _ in range(2):
            policy.act(bad, 1.0)
        assert policy.faults["observation_nonfinite"] == 5


def test_hold_before_any_good_step_and_a_given_safe_action(ranged_engines, observations):
    goods = observations[0]
    with load_backend(ranged_engines["window"]) as backend:
        hold = Policy(backend, on_fault="hold", safe_action=[0.1, -0.2, 0.3])
        np.testing.assert_array_equal(hold.act(np.zeros(4)), np.float32([0.1, -0.2, 0.3]))  # nothing to hold yet
        hold.override_action(np.ones(3))  # after a fallback: no step to override, nothing happens
        assert hold.t == 0 and not hold._history_actions.any()
        good = hold.act(goods[0])
        np.testing.assert_array_equal(hold.act(np.zeros(4)), good)
        hold.reset()  # a new episode holds nothing of the last one
        np.testing.assert_array_equal(hold.act(np.zeros(4)), np.float32([0.1, -0.2, 0.3]))
        for safe_action, fragment in (([0.0, 0.0], "3 finite values"), ([2.0, 0.0, 0.0], "within the action "
                                                                                         "bounds"),
                                      ([np.nan, 0.0, 0.0], "finite")):
            with pytest.raises(DMMError, match=fragment):
                Policy(backend, on_fault="safe", safe_action=safe_action)
        with pytest.raises(DMMError, match=r"on_fault 'ignore'; expected one of raise, hold, safe"):
            Policy(backend, on_fault="ignore")
        with pytest.raises(DMMError, match="max_consecutive_faults"):
            Policy(backend, max_consecutive_faults=-1)


def test_safe_action_is_zero_clipped_to_the_bounds(ranged_engines, tmp_path):
    engine = copy_engine(ranged_engines["stream"], tmp_path)
    edit_manifest(engine, action_low=[0.1, -1.0, -1.0], action_high=[1.0, 1.0, -0.3])
    with load_backend(engine) as backend:
        policy = Policy(backend, on_fault="safe")
        np.testing.assert_array_equal(policy.act(np.full(11, np.nan)), np.float32([0.1, 0.0, -0.3]))


# -- the observation range: recorded by training, carried by export, checked by Policy ----------


def test_training_records_the_state_range_and_export_widens_it(trained, ranged_engines):
    from dmm_train.checkpoint import load_checkpoint
    from dmm_train.manifest_builder import OBSERVATION_RANGE_FLOOR, OBSERVATION_RANGE_MARGIN

    checkpoint_path, dataset = trained
    states = np.concatenate([e.observations for e in dataset.episodes])  # (N, S)
    record = json.loads((checkpoint_path.parent / "model.json").read_text())
    np.testing.assert_array_equal(np.float32(record["state_min"]), states.min(axis=0).astype(np.float32))
    np.testing.assert_array_equal(np.float32(record["state_max"]), states.max(axis=0).astype(np.float32))
    checkpoint = load_checkpoint(checkpoint_path)
    span = checkpoint.state_max.astype(np.float64) - checkpoint.state_min
    widen = np.maximum(OBSERVATION_RANGE_MARGIN * span, OBSERVATION_RANGE_FLOOR)
    for mode in MODES:
        manifest = read_manifest(manifest_path_for(ranged_engines[mode]))
        np.testing.assert_allclose(manifest.observation_low, checkpoint.state_min - widen, rtol=0, atol=1e-12)
        np.testing.assert_allclose(manifest.observation_high, checkpoint.state_max + widen, rtol=0, atol=1e-12)
    # Every state the policy was trained on is inside, and the edges are where the manifest says.
    with load_backend(ranged_engines["window"]) as backend:
        policy = Policy(backend)
        for observation in (states.min(axis=0), states.max(axis=0), states[0]):
            policy.act(observation)
        edge = np.asarray(backend.manifest.observation_high)
        policy.act(edge)  # the bound itself is inside
        with pytest.raises(DMMError, match=r"outside the engine's observation range: \[0\] "):
            policy.act(np.nextafter(edge, np.inf))


def test_without_a_recorded_range_the_check_is_skipped(engines_without_range, tmp_path):
    """The fixture checkpoint records no range (as checkpoints written before it): no range fault."""
    manifest = read_manifest(manifest_path_for(engines_without_range["stream"]))
    assert manifest.observation_low is None and manifest.observation_high is None
    with load_backend(engines_without_range["stream"]) as backend:
        policy = Policy(backend)
        policy.act(np.full(11, 1e6))
        assert policy.faults["observation_range"] == 0
    # An older manifest, without the fields at all, still reads.
    engine = copy_engine(engines_without_range["window"], tmp_path)
    data = json.loads(manifest_path_for(engine).read_text())
    del data["observation_low"], data["observation_high"]
    manifest_path_for(engine).write_text(json.dumps(data))
    assert read_manifest(manifest_path_for(engine)).observation_low is None
    edit_manifest(engine, observation_low=[0.0] * 11, observation_high=[1.0] * 10)
    with pytest.raises(DMMError, match="observation_low/high with 11/10 entries"):
        load_backend(engine)
    edit_manifest(engine, observation_low=[0.0] * 11, observation_high=[-1.0] * 11)
    with pytest.raises(DMMError, match="low > high"):
        load_backend(engine)


@pytest.fixture(scope="module")
def engines_without_range(checkpoint_path, tmp_path_factory):
    return export_engines(checkpoint_path, tmp_path_factory.mktemp("engines"))


# -- no allocation that grows ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_act_allocates_nothing_that_grows_over_1000_steps(mode, ranged_engines, observations):
    goods, rewards = observations
    with load_backend(ranged_engines[mode]) as backend:
        policy = Policy(backend, on_fault="hold", max_consecutive_faults=1_000_000)
        action = np.empty(3, dtype=np.float32)
        bad = np.full(11, np.nan)

        def steps(count):
            for step in range(count):
                observation = bad if step % 97 == 0 else goods[step % STEPS]  # the fault path as well
                policy.act(observation, float(rewards[step % STEPS]), out=action)
                policy.act(goods[step % STEPS], 0.5)  # and the copying form

        steps(50)
        tracemalloc.start()
        try:
            steps(10)
            before = tracemalloc.take_snapshot()
            steps(1000)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
    # ONNX Runtime's binding keeps a few small buffers of its own now and then (about 1.5 kB over 1000
    # steps, allocated at its run call): the policy's own allocations are what must not grow.
    ours = [tracemalloc.Filter(False, "*/onnxruntime/*"), tracemalloc.Filter(False, tracemalloc.__file__)]
    growth = sum(stat.size_diff for stat in after.filter_traces(ours).compare_to(before.filter_traces(ours),
                                                                                   "filename"))
    assert policy.t > 2000 and policy.faults["observation_nonfinite"] > 10
    # Anything kept per step (a list entry, an array) would be 8 bytes x 2000 steps at the least.
    assert growth < 2048, growth


# -- the fixed-rate clock and the loop helper -----------------------------------------------


def test_the_clock_ticks_on_its_grid_and_rejoins_it_after_an_overrun():
    period = 2_000_000
    clock = FixedRateClock(period, spin_ns=100_000)
    origin = time.perf_counter_ns()
    clock.start(origin)
    previous = origin - period
    for _ in range(20):
        skipped = clock.skipped
        tick = clock.wait()
        # On the grid from the origin (no drift), the next tick unless the machine made us miss some.
        assert tick == previous + (1 + clock.skipped - skipped) * period
        assert time.perf_counter_ns() >= tick
        previous = tick
    time.sleep(3.5 * period / 1e9)  # an overrun of more than three periods
    skipped = clock.skipped
    tick = clock.wait()
    assert (tick - origin) % period == 0 and tick <= time.perf_counter_ns()
    assert clock.skipped - skipped >= 2 and tick >= previous + 3 * period  # no burst of catch-up steps
    skipped = clock.skipped
    assert clock.wait() == tick + (1 + clock.skipped - skipped) * period
    with pytest.raises(DMMError, match="positive period"):
        FixedRateClock(0)


def test_control_loop_times_act_and_counts_misses(ranged_engines, observations):
    goods, rewards = observations
    with load_backend(ranged_engines["stream"]) as backend:
        plain = Policy(backend)
        expected = [plain.act(o, r) for o, r in zip(goods, rewards, strict=True)]
        loop = ControlLoop(Policy(backend), period_ms=2.0)
        loop.start()
        actions = []
        for observation, reward in zip(goods, rewards, strict=True):
            loop.wait()
            actions.append(loop.act(observation, reward))
        timings = loop.timings()
        np.testing.assert_array_equal(np.asarray(actions), np.asarray(expected))  # timing changes nothing
        assert timings.steps == STEPS and timings.period_ms == timings.deadline_ms == 2.0
        assert 0 <= timings.lateness.p50 <= timings.lateness.max and timings.compute.count == STEPS
        assert 0 <= timings.misses <= STEPS and timings.skipped_ticks >= 0
        strict = ControlLoop(Policy(backend), period_ms=2.0, deadline_ms=1e-6)  # 1 ns after the tick
        strict.start()
        for observation in goods:
            strict.wait()
            strict.act(observation)
        assert strict.timings().misses == STEPS
        assert "deadline 1e-06 ms: 6 missed" in strict.timings().summary()
    for bad, fragment in (({"period_ms": 0}, "--period-ms 0"), ({"period_ms": 1, "deadline_ms": -1}, "--deadline-ms"),
                          ({"period_ms": 1, "spin_us": -1}, "--spin-us")):
        with pytest.raises(DMMError, match=fragment):
            ControlLoop(None, **bad)


class GcProbe(gymnasium.Wrapper):
    """Records whether the garbage collector was enabled at each plant step."""

    def __init__(self, env):
        super().__init__(env)
        self.enabled: list[bool] = []

    def step(self, action):
        self.enabled.append(gc.isenabled())
        return self.env.step(action)


def test_the_collector_is_paused_during_an_episode_only(ranged_engines):
    with load_backend(ranged_engines["stream"]) as backend:
        policy = Policy(backend, on_fault="hold", max_consecutive_faults=1000)
        plant = GcProbe(make_plant("Hopper-v5"))
        try:
            assert gc.isenabled()
            run_episode(policy, plant, seed=0)
            assert plant.enabled and not any(plant.enabled) and gc.isenabled() and gc.get_freeze_count() == 0
            plant.enabled.clear()
            run_episode(policy, plant, seed=0, freeze_gc=False)
            assert plant.enabled and all(plant.enabled)
        finally:
            plant.close()


def test_realtime_options_do_what_they_say_and_are_undone():
    affinity = os.sched_getaffinity(0)
    scheduler = os.sched_getscheduler(0)
    cpu = min(affinity)
    try:
        with realtime(RealtimeOptions(cpu=cpu, fifo=True)) as applied:
            assert os.sched_getaffinity(0) == {cpu} and os.sched_getscheduler(0) == os.SCHED_FIFO
            assert applied == {"cpu": cpu, "scheduler": "SCHED_FIFO 49", "gc": "frozen"} and not gc.isenabled()
    except DMMError as refused:  # an unprivileged user: the message says why and what to do
        assert "SCHED_FIFO priority 49 was refused" in str(refused) and "rtprio" in str(refused)
    assert os.sched_getaffinity(0) == affinity and os.sched_getscheduler(0) == scheduler and gc.isenabled()
    with pytest.raises(DMMError, match=re.escape(f"--cpu 4096: this process may run on CPUs {sorted(affinity)}")):
        realtime(RealtimeOptions(cpu=4096)).__enter__()
    with pytest.raises(DMMError, match=r"SCHED_FIFO priority 0; expected"):
        request_fifo(0)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to an unprivileged user needs root")
def test_realtime_refused_for_an_unprivileged_user_is_one_clear_line():
    script = ("import os\n"
              "from runtime.clock import request_fifo\n"
              "from contract.errors import DMMError\n"
              "os.setgid(65534); os.setuid(65534)  # nobody: no CAP_SYS_NICE, rtprio limit 0\n"
              "try:\n    request_fifo(49)\nexcept DMMError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "--realtime: SCHED_FIFO priority 49 was refused" in result.stdout
    assert "CAP_SYS_NICE" in result.stdout and "leave --realtime out" in result.stdout


# -- cli run --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def narrow_engine(ranged_engines, tmp_path_factory):
    """The stream engine with state 0 (the torso height) accepted only above 1.2: a falling hopper leaves it."""
    engine = copy_engine(ranged_engines["stream"], tmp_path_factory.mktemp("narrow"))
    edit_manifest(engine, observation_low=[1.2] + [-1e3] * 10, observation_high=[1e3] * 11)
    return engine


def test_run_on_fault_hold_reports_the_counts(capsys, narrow_engine):
    report = run_json(capsys, "--engine", str(narrow_engine), "--episodes", "2", "--on-fault", "hold",
                      "--max-consecutive-faults", "1000")
    faults = report["faults"]
    assert report["on_fault"] == "hold" and sorted(faults) == sorted(FAULT_KINDS)
    assert 0 < faults["observation_range"] < report["steps"]
    assert sum(faults.values()) == faults["observation_range"]
    assert len(report["episode_faults"]) == 2
    for kind in FAULT_KINDS:
        assert sum(episode[kind] for episode in report["episode_faults"]) == faults[kind]
    # --on-fault raise, the default: in simulation a fault ends its episode, and the results still count.
    report = run_json(capsys, "--engine", str(narrow_engine), "--episodes", "2")
    assert report["faults"]["observation_range"] == 2 and len(report["stopped_by"]) == 2
    assert all("outside the engine's observation range: [0]" in stopped for stopped in report["stopped_by"])
    assert all(0 < length < 1000 for length in report["lengths"]) and len(report["returns"]) == 2
    code = cli.main(["run", "--engine", str(narrow_engine), "--episodes", "1"])
    printed = capsys.readouterr().out
    assert code == 0 and "ended by a fault at step" in printed and "1 of 1 episode(s) ended early" in printed
    # On the robot the same Policy raises at the first fault: the strict default of the API.
    with load_backend(narrow_engine) as backend:
        policy = Policy(backend)
        with pytest.raises(DMMError, match=r"outside the engine's observation range: \[0\]"):
            policy.act(np.zeros(11))
    code = cli.main(["run", "--engine", str(narrow_engine), "--episodes", "1", "--on-fault", "safe",
                     "--max-consecutive-faults", "0"])
    assert_one_line_error(capsys, code, "1 consecutive faults", "max_consecutive_faults=0")


def test_run_period_reports_tick_lateness_and_misses(capsys, ranged_engines):
    engine = str(ranged_engines["stream"])
    free = run_json(capsys, "--engine", engine, "--episodes", "1")
    assert free["period_ms"] is None and free["tick_lateness_ms"] is None
    assert free["latency_ms"]["p99"] <= free["latency_ms"]["p99.9"] <= free["latency_ms"]["max"]
    affinity = os.sched_getaffinity(0)
    started = time.perf_counter()
    report = run_json(capsys, "--engine", engine, "--episodes", "1", "--period-ms", "10", "--cpu",
                      str(min(os.sched_getaffinity(0))))
    elapsed = time.perf_counter() - started
    assert report["returns"] == free["returns"] and report["lengths"] == free["lengths"]  # the same policy
    assert report["period_ms"] == 10.0 and report["deadline_ms"] == 10.0
    lateness = report["tick_lateness_ms"]
    assert 0 <= lateness["p50"] <= lateness["p99"] <= lateness["max"]
    assert 0 <= report["deadline_misses"] <= report["steps"] and report["skipped_ticks"] >= 0
    assert elapsed >= (report["steps"] - 1) * 0.010  # the clock waited for every tick
    assert report["realtime"] == {"cpu": min(os.sched_getaffinity(0)), "scheduler": "default",
                                  "gc": "frozen per episode"}
    assert os.sched_getaffinity(0) == affinity  # the pin lasted as long as the run
    strict = run_json(capsys, "--engine", engine, "--episodes", "1", "--period-ms", "10", "--deadline-ms", "1e-6")
    assert strict["deadline_misses"] == strict["steps"]
    assert_one_line_error(capsys, cli.main(["run", "--engine", engine, "--period-ms", "0"]), "--period-ms 0")
    assert_one_line_error(capsys, cli.main(["run", "--engine", engine, "--cpu", "4096"]),
                          "--cpu 4096: this process may run on CPUs")
    assert_one_line_error(capsys, cli.main(["run", "--engine", engine, "--max-consecutive-faults", "-1"]),
                          "--max-consecutive-faults -1")


def test_run_keep_gc_and_realtime_are_reported_and_given_back(capsys, ranged_engines):
    """`run --realtime --keep-gc`: the loop ran under SCHED_FIFO with the collector running, the report
    says so, and the caller's scheduler is given back after the run (or, for a user without real-time
    rights, one line says why and what to do). On a period, so the real-time loop sleeps between ticks
    and never monopolises a core of a busy machine."""
    engine = str(ranged_engines["stream"])
    scheduler, priority = os.sched_getscheduler(0), os.sched_getparam(0).sched_priority
    argv = ["--engine", engine, "--episodes", "1", "--period-ms", "10", "--realtime", "--keep-gc"]
    try:
        request_fifo(49)
    except DMMError:
        assert_one_line_error(capsys, cli.main(["run", *argv]), "--realtime: SCHED_FIFO priority 49 was refused")
        return
    os.sched_setscheduler(0, scheduler, os.sched_param(priority))
    report = run_json(capsys, *argv)
    assert report["realtime"] == {"cpu": None, "scheduler": "SCHED_FIFO 49", "gc": "running"}
    assert report["steps"] == sum(report["lengths"]) and report["period_ms"] == 10.0
    assert (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority) == (scheduler, priority)
    assert gc.isenabled() and gc.get_freeze_count() == 0
