"""The control loop: a `Policy` driving a plant, timed per step.

``run_episode`` works with any plant of the gymnasium shape (``reset(seed=) -> (obs,
info)``, ``step(action) -> (obs, reward, terminated, truncated, info)``); only
`runtime.plant` imports gymnasium, for the CLI's simulated plant. ``run_engine`` is what
``cli.py run`` calls: engine file -> backend -> Policy -> episodes -> `RunReport`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.errors import DMMError
from contract.scores import normalized_score
from runtime.backend import DEFAULT_THREADS, zero_feeds
from runtime.backends import load_backend
from runtime.latency import LatencyStats, save_histogram
from runtime.plant import check_plant, make_plant
from runtime.policy import Policy

# Calls of the engine before the first timed episode: first runs allocate and pick kernels.
DEFAULT_WARMUP = 10


@dataclass(frozen=True)
class EpisodeResult:
    seed: int
    episode_return: float
    length: int
    latency_ns: np.ndarray = field(repr=False)  # (length,) int64, policy.act per step


def run_episode(policy: Policy, plant, *, seed: int) -> EpisodeResult:
    """One episode from ``plant.reset(seed=seed)`` until terminated or truncated."""
    observation, _ = plant.reset(seed=seed)
    policy.reset()
    latency = np.empty(1024, dtype=np.int64)  # grown by doubling; episodes are usually <= 1000 steps
    episode_return, reward, steps = 0.0, 0.0, 0
    while True:
        start = time.perf_counter_ns()
        action = policy.act(observation, reward)
        elapsed = time.perf_counter_ns() - start
        if steps == latency.size:
            latency = np.concatenate([latency, np.empty_like(latency)])
        latency[steps] = elapsed
        observation, reward, terminated, truncated, _ = plant.step(action)
        episode_return += float(reward)
        steps += 1
        if terminated or truncated:
            break
    return EpisodeResult(seed=seed, episode_return=episode_return, length=steps,
                         latency_ns=latency[:steps].copy())


def warm_up(policy: Policy, calls: int = DEFAULT_WARMUP) -> None:
    """Run the engine ``calls`` times on zero inputs, then reset the policy."""
    feeds = zero_feeds(policy.manifest)
    for _ in range(calls):
        policy.backend.infer(feeds)
    policy.reset()


@dataclass(frozen=True)
class RunConfig:
    """What ``cli.py run`` asks for."""

    engine: Path = field(metadata={"help": "hopper.plan, hopper.onnx or a model.pt"})
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

    def validate(self) -> None:
        if self.episodes < 1:
            raise DMMError(f"--episodes {self.episodes}; expected at least 1")
        if self.deadline_ms is not None and not self.deadline_ms > 0:
            raise DMMError(f"--deadline-ms {self.deadline_ms}; expected a positive number of milliseconds")
        if self.warmup < 0:
            raise DMMError(f"warmup {self.warmup}; expected 0 or more engine calls")


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
    normalized_scores: tuple[float, ...]
    latency: LatencyStats
    histogram: str | None = None

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
            "latency_ms": {"p50": self.latency.p50, "p99": self.latency.p99, "max": self.latency.max,
                           "mean": self.latency.mean},
            "steps": self.latency.count, "deadline_ms": self.latency.deadline_ms,
            "deadline_misses": self.latency.misses, "histogram": self.histogram,
        }


def run_engine(config: RunConfig) -> RunReport:
    """Open the engine, drive its manifest's env for ``config.episodes`` episodes (seed + i), report."""
    config.validate()
    backend = load_backend(config.engine, config.mode, provider=config.provider, threads=config.threads,
                           cuda_graph=config.cuda_graph, device=config.device)
    with backend:
        manifest = backend.manifest
        policy = Policy(backend, config.target_return)
        plant = make_plant(manifest.env_id)
        try:
            check_plant(plant, manifest, manifest.env_id)
            # The plant's control period is the natural deadline (Hopper-v5: 8 ms, 125 Hz).
            deadline_ms = config.deadline_ms or 1000.0 * float(getattr(plant.unwrapped, "dt", 0.0)) or None
            warm_up(policy, config.warmup)
            episodes = tuple(run_episode(policy, plant, seed=config.seed + index)
                             for index in range(config.episodes))
        finally:
            plant.close()
    samples = np.concatenate([e.latency_ns for e in episodes])  # (total steps,)
    histogram = None
    if config.histogram is not None:
        histogram = str(save_histogram(samples, config.histogram, deadline_ms=deadline_ms,
                                       title=f"{Path(config.engine).name} ({backend.name}, {manifest.mode})"))
    return RunReport(
        engine=str(config.engine), backend=backend.name, provider=backend.provider, mode=manifest.mode,
        precision=manifest.precision, env_id=manifest.env_id, target_return=policy.target_return,
        episodes=episodes,
        normalized_scores=tuple(normalized_score(e.episode_return, manifest.ref_min_score,
                                                 manifest.ref_max_score) for e in episodes),
        latency=LatencyStats.from_ns(samples, deadline_ms), histogram=histogram,
    )
