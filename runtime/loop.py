"""The control loop: a `Policy` driving a plant, timed per step.

``run_episode`` works with any plant of the gymnasium shape (``reset(seed=) -> (obs,
info)``, ``step(action) -> (obs, reward, terminated, truncated, info)``); only
`runtime.plant` imports gymnasium, for the CLI's simulated plant. ``run_engine`` is what
``cli.py run`` calls: engine file -> backend -> Policy -> episodes -> `RunReport`.

Without a control period the loop runs each step as soon as the plant has answered and
times ``policy.act``; with one (``RunConfig.period_ms``) every step waits for its tick of a
`runtime.clock.ControlLoop` and the report adds the tick lateness and the deadline misses
(action ready after tick + deadline). Either way the plant's own step is outside the timed
part, and the garbage collector is frozen and disabled while an episode runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.errors import DMMError
from runtime.backend import DEFAULT_THREADS, zero_feeds
from runtime.clock import DEFAULT_SPIN_US, ControlLoop, LoopTimings, RealtimeOptions, gc_paused, realtime
from runtime.latency import LatencyStats, save_histogram
from runtime.limits import limit_option_field, limits_options_of
from runtime.loading import load_backend
from runtime.plant import check_plant, make_plant
from runtime.policy import DEFAULT_MAX_CONSECUTIVE_FAULTS, ON_FAULT, Policy
from runtime.step_record import DEFAULT_CHUNK_STEPS

# Calls of the engine before the first timed episode: first runs allocate and pick kernels.
DEFAULT_WARMUP = 10


MAX_RUN_EPISODES = 100_000  # a bound checked before any work: every step's latency is kept in memory


@dataclass(frozen=True)
class EpisodeResult:
    seed: int
    episode_return: float
    length: int
    latency_ns: np.ndarray = field(repr=False)  # (length,) int64, policy.act per step
    faults: dict = field(default_factory=dict)  # fault kind -> count in this episode
    stopped_by: str | None = None  # the fault that ended the episode early (`run_episode(end_on_fault=True)`)


def run_episode(policy: Policy, plant, *, seed: int, loop: ControlLoop | None = None,
                freeze_gc: bool = True, end_on_fault: bool = False) -> EpisodeResult:
    """One episode from ``plant.reset(seed=seed)`` until terminated or truncated.

    loop: a `ControlLoop` of ``policy``: each step waits for its tick (the loop's clock restarts
    here) and is timed against it; None: as fast as the plant answers.
    freeze_gc: freeze and disable the garbage collector for the episode (`runtime.clock.gc_paused`).
    end_on_fault: a fault the policy raises (``on_fault="raise"``) ends this episode, recorded in
    ``stopped_by``, instead of the run: in simulation a weak policy's fallen robot leaves the
    observation range, and its results still count. A robot's own loop stops at the first.
    """
    if loop is not None and loop.policy is not policy:
        raise DMMError("run_episode: a ControlLoop of another Policy", "the ControlLoop of this policy",
                       "pass loop=ControlLoop(policy, ...) built on the same policy")
    observation, _ = plant.reset(seed=seed)
    policy.reset()
    faults_before = dict(policy.faults)
    spec = getattr(plant, "spec", None)
    latency = np.empty(getattr(spec, "max_episode_steps", None) or 1024, dtype=np.int64)  # grown if needed
    action = np.empty(policy.manifest.act_dim, dtype=np.float32)  # (Adim,) refilled by every act
    episode_return, reward, steps = 0.0, 0.0, 0
    stopped_by = None
    with gc_paused(freeze_gc):
        if loop is not None:
            loop.start()
        while True:
            faulted = sum(policy.faults.values())
            try:
                if loop is None:
                    start = time.perf_counter_ns()
                    policy.act(observation, reward, out=action)
                    elapsed = time.perf_counter_ns() - start
                else:
                    loop.wait()
                    loop.act(observation, reward, out=action)
                    elapsed = loop.last_compute_ns
            except DMMError as error:
                if not end_on_fault or sum(policy.faults.values()) == faulted:  # not a fault: a real error
                    raise
                stopped_by = f"step {steps}: {error}"
                break
            if steps == latency.size:
                latency = np.concatenate([latency, np.empty_like(latency)])
            latency[steps] = elapsed
            observation, reward, terminated, truncated, _ = plant.step(action)  # outside the timed part
            episode_return += float(reward)
            steps += 1
            if terminated or truncated:
                policy.end_episode(observation, reward, terminated=bool(terminated))  # a record's last transition
                break
    faults = {kind: count - faults_before[kind] for kind, count in policy.faults.items()}
    return EpisodeResult(seed=seed, episode_return=episode_return, length=steps,
                         latency_ns=latency[:steps].copy(), faults=faults, stopped_by=stopped_by)


def warm_up(policy: Policy, calls: int = DEFAULT_WARMUP) -> None:
    """Run the engine ``calls`` times on zero inputs, then reset the policy."""
    feeds = zero_feeds(policy.manifest)
    for _ in range(calls):
        policy.backend.infer(feeds)
    policy.reset()


@dataclass(frozen=True)
class RunConfig:
    """What ``cli.py run`` asks for."""

    engine: Path = field(metadata={"help": "hopper.plan, hopper.onnx, hopper.c (export --target c) or a model.pt"})
    episodes: int = field(default=5, metadata={"help": "episodes to run; episode i is seeded seed + i"})
    seed: int = field(default=0, metadata={"help": "reset seed of the first episode"})
    target_return: float | None = field(default=None, metadata={"help": "target return (default: the manifest's)"})
    deadline_ms: float | None = field(default=None, metadata={
        "help": "per-step deadline (default: the plant's control period, 8 ms for Hopper-v5)"})
    mode: str | None = field(default=None, metadata={
        "help": "inference mode of a model.pt (default window); an exported engine has its own"})
    provider: str | None = field(default=None, metadata={
        "help": "ONNX Runtime execution provider for a .onnx (default cpu); the one in use is asserted"})
    threads: int | None = field(default=DEFAULT_THREADS, metadata={
        "help": "intra-op threads of the backend; 0 = the library's default"})
    warmup: int = field(default=DEFAULT_WARMUP, metadata={"help": "engine calls before the first timed episode"})
    histogram: Path | None = field(default=None, metadata={"help": "write a latency histogram PNG here"})
    cuda_graph: bool = field(default=False, metadata={
        "help": "replay a .plan's enqueue as a CUDA graph (needs cuda-python), or a model.pt's step on "
                "--device cuda"})
    device: str | None = field(default=None, metadata={
        "help": "torch device of a model.pt (cpu, cuda, cuda:N; default cpu) or CUDA device of a .plan (default 0)"})
    on_fault: str = field(default="raise", metadata={
        "help": "on a bad observation, reward or engine result: raise (stop with an error), hold (repeat the "
                "last good action) or safe (zeros clipped to the action bounds)"})
    max_consecutive_faults: int = field(default=DEFAULT_MAX_CONSECUTIVE_FAULTS, metadata={
        "help": "faults in a row tolerated by --on-fault hold/safe before the run stops"})
    period_ms: float | None = field(default=None, metadata={
        "help": "run each step on a fixed-rate clock of this period; reports tick lateness and deadline misses "
                "(default: no period, each step as soon as the plant answers)"})
    spin_us: float = field(default=DEFAULT_SPIN_US, metadata={
        "help": "with --period-ms: busy-wait this long before each tick instead of sleeping through it"})
    cpu: int | None = field(default=None, metadata={"help": "pin the control loop to this CPU core"})
    realtime: bool = field(default=False, metadata={
        "help": "run the loop under SCHED_FIFO (needs CAP_SYS_NICE or an rtprio limit)"})
    freeze_gc: bool = field(default=True, metadata={
        "help": "freeze and disable the garbage collector while an episode runs (--keep-gc: leave it running)"})
    env_id: str | None = field(default=None, metadata={
        "help": "gymnasium env to run on instead of the manifest's (a module:Env id imports that module: "
                "name one only from here, never from a file)"})
    record: Path | None = field(default=None, metadata={
        "help": "write every step to this new directory (a step record: docs/deployment.md#the-step-record)"})
    record_chunk_steps: int = field(default=DEFAULT_CHUNK_STEPS, metadata={
        "help": "rows per chunk file of --record (a kill loses at most this many)"})
    # Limits at the actuator, overriding the manifest's (runtime/limits.py).
    limits_file: Path | None = limit_option_field("limits_file")
    action_lower: str | None = limit_option_field("action_lower")
    action_upper: str | None = limit_option_field("action_upper")
    action_rate_limit: str | None = limit_option_field("action_rate_limit")
    ramp_steps: int | None = limit_option_field("ramp_steps")
    ramp_start: str | None = limit_option_field("ramp_start")

    def validate(self) -> None:
        if not 1 <= self.episodes <= MAX_RUN_EPISODES:
            raise DMMError(f"--episodes {self.episodes}",
                           f"1 to {MAX_RUN_EPISODES:,} (each episode's latency samples are kept for the report)",
                           "run longer campaigns as several runs")
        if self.deadline_ms is not None and not self.deadline_ms > 0:
            raise DMMError(f"--deadline-ms {self.deadline_ms}", "a positive number of milliseconds",
                           "pass --deadline-ms above 0, or leave it out (the control period)")
        if self.warmup < 0:
            raise DMMError(f"warmup {self.warmup}", "0 or more engine calls", "pass a warmup of 0 or more")
        if self.on_fault not in ON_FAULT:
            raise DMMError(f"--on-fault {self.on_fault!r}", f"one of {', '.join(ON_FAULT)}",
                           f"pass --on-fault {ON_FAULT[0]} (or another of them)")
        if self.max_consecutive_faults < 0:
            raise DMMError(f"--max-consecutive-faults {self.max_consecutive_faults}", "0 or more",
                           "pass --max-consecutive-faults 0 or more")
        if self.period_ms is not None and not self.period_ms > 0:
            raise DMMError(f"--period-ms {self.period_ms}", "a positive number of milliseconds",
                           "pass --period-ms above 0, or leave it out")
        if not self.spin_us >= 0:
            raise DMMError(f"--spin-us {self.spin_us}", "0 or more microseconds", "pass --spin-us 0 or more")
        if self.cpu is not None and self.cpu < 0:
            raise DMMError(f"--cpu {self.cpu}", "a core number (0 or more)", "pass --cpu 0 or another core number")
        if self.ramp_steps is not None and self.ramp_steps < 0:
            raise DMMError(f"--ramp-steps {self.ramp_steps}", "0 or more steps", "pass --ramp-steps 0 or more")


@dataclass(frozen=True)
class RunReport:
    engine: str
    backend: str
    provider: str
    mode: str
    precision: str
    env_id: str
    target_return: float
    episodes: tuple[EpisodeResult, ...]
    normalized_scores: tuple[float, ...]  # raw returns where the policy has no reference scores (score_name)
    latency: LatencyStats
    histogram: str | None = None
    histogram_failure: DMMError | None = field(default=None, repr=False, compare=False)  # why the histogram
    # could not be written (the results stand): raised by the CLI after the results
    on_fault: str = "raise"
    faults: dict = field(default_factory=dict)  # fault kind -> count over every episode
    timings: LoopTimings | None = None  # with a control period
    realtime: dict = field(default_factory=dict)  # what `runtime.clock.realtime` applied
    limits: dict = field(default_factory=dict)  # the actuator limits in force (`ActuatorLimits.to_dict`)
    limit_counts: dict = field(default_factory=dict)  # limit kind -> per-dimension count of steps it bit
    limits_summary: str = ""
    record: str | None = None  # the step record's directory
    record_rows: int = 0
    score_name: str = "normalised score"  # or "return": a policy with no reference scores

    @property
    def histogram_error(self) -> str | None:
        """The histogram's failure as its one line, for the JSON record."""
        return str(self.histogram_failure) if self.histogram_failure is not None else None

    @property
    def returns(self) -> tuple[float, ...]:
        return tuple(e.episode_return for e in self.episodes)

    def to_dict(self) -> dict:
        return {
            "engine": self.engine, "backend": self.backend, "provider": self.provider, "mode": self.mode,
            "precision": self.precision, "env_id": self.env_id, "target_return": self.target_return,
            "return": float(np.mean(self.returns)), "return_std": float(np.std(self.returns)),
            "normalized_score": float(np.mean(self.normalized_scores)),
            "returns": list(self.returns), "lengths": [e.length for e in self.episodes],
            "seeds": [e.seed for e in self.episodes], "normalized_scores": list(self.normalized_scores),
            "score_name": self.score_name, "stopped_by": [e.stopped_by for e in self.episodes],
            "latency_ms": {"p50": self.latency.p50, "p99": self.latency.p99, "p99.9": self.latency.p999,
                           "max": self.latency.max, "mean": self.latency.mean},
            "steps": self.latency.count, "deadline_ms": self.latency.deadline_ms,
            "deadline_misses": self.latency.misses, "histogram": self.histogram,
            "histogram_error": self.histogram_error,
            **self._control_dict(),
        }

    def _control_dict(self) -> dict:
        data = {"on_fault": self.on_fault, "faults": dict(self.faults),
                "limits": {**self.limits, "counts": {kind: list(c) for kind, c in self.limit_counts.items()}},
                "record": self.record, "record_rows": self.record_rows,
                "episode_faults": [e.faults for e in self.episodes], "realtime": self.realtime,
                "period_ms": None, "tick_lateness_ms": None, "skipped_ticks": None}
        if self.timings is not None:
            timing = self.timings.to_dict()
            data.update(period_ms=timing["period_ms"], tick_lateness_ms=timing["tick_lateness_ms"],
                        skipped_ticks=timing["skipped_ticks"], deadline_ms=timing["deadline_ms"],
                        deadline_misses=timing["deadline_misses"], max_ready_ms=timing["max_ready_ms"])
        return data

    def limit_summary(self) -> str:
        """The limits in force and how often each bit, per dimension."""
        counts = "; ".join(f"{kind} {list(c)}" for kind, c in self.limit_counts.items())
        return f"{self.limits_summary}; steps changed per dimension: {counts}"

    def fault_summary(self) -> str:
        counted = {kind: count for kind, count in self.faults.items() if count}
        listed = ", ".join(f"{kind} {count}" for kind, count in counted.items()) or "none"
        stopped = sum(e.stopped_by is not None for e in self.episodes)
        if not stopped:
            return f"faults (on-fault {self.on_fault}): {listed}"
        return (f"faults (on-fault {self.on_fault}): {listed}; {stopped} of {len(self.episodes)} episode(s) ended "
                "early by a fault (in simulation a fault ends its episode and the run goes on; a Policy on the "
                "robot raises at the first, or rides through with --on-fault hold|safe)")


def run_engine(config: RunConfig) -> RunReport:
    """Open the engine, drive its manifest's env for ``config.episodes`` episodes (seed + i), report."""
    config.validate()
    backend = load_backend(config.engine, config.mode, provider=config.provider, threads=config.threads,
                           cuda_graph=config.cuda_graph, device=config.device)
    with backend:
        manifest = backend.manifest
        limit_options = limits_options_of(config)
        policy = Policy(backend, config.target_return, on_fault=config.on_fault,
                        max_consecutive_faults=config.max_consecutive_faults,
                        limits=limit_options.resolve(manifest) if limit_options.given() else None,
                        record=config.record, record_chunk_steps=config.record_chunk_steps)
        recorder = policy.recorder
        env_id = config.env_id or manifest.env_id
        plant = make_plant(env_id, trusted=config.env_id is not None)  # --env: the user's own choice
        try:
            check_plant(plant, manifest, env_id)
            loop = None
            if config.period_ms is not None:
                # With a period, the deadline is measured from each tick (the period itself by default).
                loop = ControlLoop(policy, config.period_ms, deadline_ms=config.deadline_ms, spin_us=config.spin_us)
                deadline_ms = loop.deadline_ms
            else:
                # The plant's control period is the natural deadline (Hopper-v5: 8 ms, 125 Hz).
                deadline_ms = config.deadline_ms or 1000.0 * float(getattr(plant.unwrapped, "dt", 0.0)) or None
            # The collector is paused per episode (run_episode), not over the whole run.
            options = RealtimeOptions(cpu=config.cpu, fifo=config.realtime, freeze_gc=False)
            with realtime(options) as applied:
                warm_up(policy, config.warmup)  # engine calls and a reset: nothing is recorded
                # A fault ends its episode, not the simulation: the results of a weak policy still count.
                episodes = tuple(run_episode(policy, plant, seed=config.seed + index, loop=loop,
                                             freeze_gc=config.freeze_gc, end_on_fault=config.on_fault == "raise")
                                 for index in range(config.episodes))
            applied = {**applied, "gc": "frozen per episode" if config.freeze_gc else "running"}
        finally:
            plant.close()
            policy.close()  # a run stopped before its episodes still leaves a readable record
        record_rows = recorder.rows if recorder is not None else 0
    samples = np.concatenate([e.latency_ns for e in episodes])  # (total steps,)
    histogram = histogram_failure = None
    if config.histogram is not None:
        # A side output: the episodes are the result, and a histogram that cannot be written (a directory
        # or a full disk at that path) must not throw them away; the caller reports both.
        try:
            histogram = str(save_histogram(samples, config.histogram, deadline_ms=deadline_ms,
                                           title=f"{Path(config.engine).name} ({backend.name}, {manifest.mode})"))
        except DMMError as error:
            histogram_failure = error
    return RunReport(
        engine=str(config.engine), backend=backend.name, provider=backend.provider, mode=manifest.mode,
        precision=manifest.precision, env_id=env_id, target_return=policy.target_return,
        episodes=episodes,
        normalized_scores=tuple(manifest.facts.score(e.episode_return) for e in episodes),
        latency=LatencyStats.from_ns(samples, None if loop is not None else deadline_ms), histogram=histogram,
        histogram_failure=histogram_failure,
        on_fault=config.on_fault, faults=dict(policy.faults), timings=loop.timings() if loop is not None else None,
        realtime=applied, limits=policy.limits.to_dict(), limit_counts=policy.limit_counts,
        limits_summary=policy.limits.summary(), record=str(config.record) if config.record is not None else None,
        record_rows=record_rows, score_name=manifest.facts.score_name,
    )
