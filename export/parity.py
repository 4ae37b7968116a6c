"""Backend parity on a real trajectory, teacher-forced, with the drift over the episode.

Polygraphy's Comparator feeds identical inputs to stateless runners; a recurrent policy
needs more (docs/deployment.md#parity-of-a-recurrent-policy). Here every backend gets a
`Policy` of its own and, step by step, the same observation and reward of one recorded
trajectory (`runtime.recording`); all backends condition on the same tokens while each
carries its own caches (stream mode). The per-step action difference against the
reference, binned by step index (1, 2-10, 11-100, 101-1000, ...), shows whether an
error grows over the episode rather than hiding it in one per-step tolerance.

``run_parity`` (``cli.py parity``) compares the PyTorch reference with ONNX Runtime per
mode, exporting the graphs it needs; it lives above the runtime because it exports.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration.data import load_training_dataset
from contract.errors import DMMError
from runtime.backend import DEFAULT_THREADS, Backend
from runtime.loading import load_backend
from runtime.plant import check_plant, make_plant
from runtime.policy import Policy
from runtime.recording import Trajectory, record_trajectory, teacher_forced_actions

# Upper edges (inclusive) of the step-index bins of the drift table; the last bin is open.
DRIFT_EDGES = (1, 10, 100, 1000)

# Most recorded steps a comparison takes: every backend replays them one by one, and the
# trajectory and each backend's actions are held in memory (a typo of a few zeros asked for
# terabytes before this bound).
MAX_STEPS = 1_000_000


@dataclass(frozen=True)
class DriftBin:
    first: int  # step index within the episode, 1-based, inclusive
    last: int | None  # inclusive; None: open-ended
    max_abs: float
    mean_abs: float
    count: int

    @property
    def label(self) -> str:
        if self.last is None:
            return f"{self.first}+"
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class PairReport:
    """|candidate - reference| over all action components of all steps, and per step-index bin."""

    reference: str
    candidate: str
    mode: str
    max_abs: float
    mean_abs: float
    bins: tuple[DriftBin, ...]

    def to_dict(self) -> dict:
        return {
            "reference": self.reference, "candidate": self.candidate, "mode": self.mode,
            "max_abs": self.max_abs, "mean_abs": self.mean_abs,
            "bins": [{"steps": b.label, "max_abs": b.max_abs, "mean_abs": b.mean_abs, "count": b.count}
                     for b in self.bins],
        }


def compare_actions(reference: np.ndarray, candidate: np.ndarray, step_index: np.ndarray, *,
                    reference_label: str, candidate_label: str, mode: str) -> PairReport:
    """reference, candidate: (T, Adim); step_index: (T,) 1-based step within the episode."""
    error = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))  # (T, Adim)
    bins = []
    lower = 1
    for upper in (*DRIFT_EDGES, None):
        selected = (step_index >= lower) & (step_index <= upper if upper is not None else True)  # (T,)
        if selected.any():
            bins.append(DriftBin(lower, upper, float(error[selected].max()), float(error[selected].mean()),
                                 int(selected.sum())))
        if upper is None:
            break
        lower = upper + 1
    return PairReport(reference_label, candidate_label, mode, float(error.max()), float(error.mean()),
                      tuple(bins))


@dataclass(frozen=True)
class ParityConfig:
    """What ``cli.py parity`` asks for."""

    checkpoint: Path = field(metadata={"help": "model.pt (the PyTorch reference)"})
    onnx: tuple[Path, ...] = field(default=(), metadata={
        "help": "graph (.onnx, or .c from export --target c) exported from it (repeatable; default: export both "
                "modes to a temporary directory)"})
    steps: int = field(default=1000, metadata={"help": "steps of the recorded trajectory"})
    seed: int = field(default=0, metadata={"help": "reset seed of the recorded trajectory"})
    target_return: float | None = field(default=None, metadata={"help": "target return (default: the manifest's)"})
    threads: int | None = field(default=DEFAULT_THREADS, metadata={
        "help": "intra-op threads; None: the library's default"})
    atol: float | None = field(default=None, metadata={
        "help": "fail when a pair's max abs difference exceeds this"})

    def validate(self) -> None:
        if self.steps < 1:
            raise DMMError(f"--steps {self.steps}", "at least 1", "pass --steps 1 or more")
        if self.steps > MAX_STEPS:
            raise DMMError(f"--steps {self.steps}", f"at most {MAX_STEPS} (each backend replays every step "
                           "and all of them are held in memory)", "pass a smaller --steps")


@dataclass(frozen=True)
class ParityReport:
    checkpoint: str
    env_id: str
    trajectory: Trajectory = field(repr=False)
    pairs: tuple[PairReport, ...]
    actions: dict = field(repr=False)  # label -> (T, Adim) teacher-forced actions
    range_faults: int = 0  # recorded steps whose observation left the manifest's observation range
    first_range_fault: int | None = None  # index of the first such step in the trajectory (0-based)

    def to_dict(self) -> dict:
        return {
            "checkpoint": self.checkpoint, "env_id": self.env_id, "steps": self.trajectory.steps,
            "episodes": self.trajectory.episodes, "pairs": [pair.to_dict() for pair in self.pairs],
            "observation_range_faults": {"steps": self.range_faults, "first_step": self.first_range_fault},
        }

    def range_summary(self) -> str:
        if not self.range_faults:
            return "observation range: every recorded observation within the engine's range"
        return (f"observation range: {self.range_faults} of {self.trajectory.steps} recorded steps outside the "
                f"engine's range (first at step {self.first_range_fault}); compared all the same, a control "
                "loop would fault there")

    def table(self) -> str:
        """The drift table: one row per backend pair, max abs difference per step-index bin."""
        labels = [b.label for b in self.pairs[0].bins] if self.pairs else []
        width = max([34, *(len(pair.candidate) for pair in self.pairs)])  # candidates named by file vary
        header = f"{'reference':<14} {'candidate':<{width}} {'max abs':>9} {'mean abs':>9}" + "".join(
            f" {'max@' + label:>12}" for label in labels)
        rows = [header]
        for pair in self.pairs:
            rows.append(f"{pair.reference:<14} {pair.candidate:<{width}} {pair.max_abs:9.2e} {pair.mean_abs:9.2e}"
                        + "".join(f" {b.max_abs:12.2e}" for b in pair.bins))
        rows.append(self.range_summary())
        return "\n".join(rows)


class _RangeFree:
    """``backend`` seen through a manifest without an observation range.

    Parity compares backends on identical inputs; it drives no robot. A Policy on the real
    manifest would stop at the first observation outside the training range (a fallen hopper
    leaves it), so the policies here take every recorded observation and the range faults are
    counted on the trajectory instead (`ParityReport.range_faults`).
    """

    def __init__(self, backend: Backend):
        self._backend = backend
        self.manifest = dataclasses.replace(backend.manifest, observation_low=None, observation_high=None)

    def __getattr__(self, name: str):
        return getattr(self._backend, name)


def _comparing_policy(backend: Backend, target_return: float | None) -> Policy:
    return Policy(_RangeFree(backend), target_return)


def _range_faults(trajectory: Trajectory, manifest) -> tuple[int, int | None]:
    """(steps outside the manifest's observation range, the first such step or None)."""
    if manifest.observation_low is None:
        return 0, None
    low = np.asarray(manifest.observation_low, dtype=np.float64)  # (S,)
    high = np.asarray(manifest.observation_high, dtype=np.float64)  # (S,)
    outside = ((trajectory.observations < low) | (trajectory.observations > high)).any(axis=1)  # (T,)
    return int(outside.sum()), (int(np.argmax(outside)) if outside.any() else None)


def _label(backend: Backend) -> str:
    return f"{backend.name}/{backend.manifest.mode}"


def run_parity(config: ParityConfig) -> ParityReport:
    """PyTorch reference vs each ONNX graph (per mode), teacher-forced on a real trajectory of the plant.

    The trajectory is a closed-loop rollout of the PyTorch window policy in the
    checkpoint's env; for Hopper / Walker2d the env is made with
    ``terminate_when_unhealthy=False`` so that one episode covers all ``steps`` steps
    (a fallen robot still gives real observations), elsewhere episodes are concatenated.
    """
    config.validate()
    with tempfile.TemporaryDirectory(prefix="dmm-parity-") as scratch:
        onnx_paths = config.onnx or _export_both_modes(config.checkpoint, Path(scratch))
        candidates = [load_backend(path, provider="cpu", threads=config.threads) for path in onnx_paths]
        references = {}
        try:
            for mode in sorted({c.manifest.mode for c in candidates}, key=("window", "stream").index):
                references[mode] = load_backend(config.checkpoint, mode, threads=config.threads)
            reference_window = references.get("window") or load_backend(config.checkpoint, "window",
                                                                         threads=config.threads)
            references.setdefault("window", reference_window)
            manifest = reference_window.manifest
            for candidate, path in zip(candidates, onnx_paths, strict=True):
                _check_same_checkpoint(candidate.manifest.checkpoint_sha256, manifest.checkpoint_sha256, path)
            names = [path.name for path in onnx_paths]
            file_names = {id(candidate): path.name if names.count(path.name) == 1 else str(path)
                          for candidate, path in zip(candidates, onnx_paths, strict=True)}

            # The range a deployed graph enforces: its own manifest's (an edited or re-exported one may differ).
            ranged = next((c.manifest for c in candidates if c.manifest.observation_low is not None), manifest)
            # No simulator (a policy from a robot's logs): the logged episodes of its training dataset instead.
            rolled_out = bool(manifest.env_id)
            trajectory = (_record(reference_window, config, manifest.env_id) if rolled_out
                          else _logged(config))
            step_index = trajectory.step_in_episode()
            actions = {}
            pairs = []
            for mode, reference in references.items():
                mode_candidates = [c for c in candidates if c.manifest.mode == mode]
                if not mode_candidates:
                    continue
                reference_label = _label(reference)
                if mode == "window" and rolled_out:
                    # The trajectory was rolled out by this very policy, so teacher forcing it on its own
                    # executed actions reproduces the recorded actions exactly: no second pass needed.
                    actions[reference_label] = trajectory.actions
                else:
                    actions[reference_label] = teacher_forced_actions(
                        _comparing_policy(reference, config.target_return), trajectory)
                for candidate in mode_candidates:
                    # Several graphs of one mode (fp32, fp16, int8, C) are told apart by their files.
                    label = _label(candidate) + (f" {file_names[id(candidate)]}" if len(mode_candidates) > 1 else "")
                    actions[label] = teacher_forced_actions(
                        _comparing_policy(candidate, config.target_return), trajectory)
                    pairs.append(compare_actions(
                        actions[reference_label], actions[label], step_index, reference_label=reference_label,
                        candidate_label=f"{label} ({candidate.provider})", mode=mode))
        finally:
            for backend in (*candidates, *references.values()):
                backend.close()
    range_faults, first_range_fault = _range_faults(trajectory, ranged)
    source = manifest.env_id or "logged episodes (no simulator)"
    return ParityReport(str(config.checkpoint), source, trajectory, tuple(pairs), actions,
                        range_faults, first_range_fault)


def _check_same_checkpoint(graph_sha: str, checkpoint_sha: str, path: Path) -> None:
    if graph_sha and graph_sha != checkpoint_sha:
        raise DMMError(f"--onnx {str(path)!r}: the graph's manifest names checkpoint sha256 {graph_sha[:12]}... "
                       "(exported from another checkpoint)", f"--checkpoint's {checkpoint_sha[:12]}...",
                       "pass the matching pair")


def _record(reference: Backend, config: ParityConfig, env_id: str) -> Trajectory:
    try:
        plant = make_plant(env_id, terminate_when_unhealthy=False)
    except DMMError:
        plant = make_plant(env_id)  # no such option (not a locomotion env): episodes are concatenated
    try:
        check_plant(plant, reference.manifest, env_id)
        return record_trajectory(_comparing_policy(reference, config.target_return), plant, steps=config.steps,
                                 seed=config.seed)
    finally:
        plant.close()


def _logged(config: ParityConfig) -> Trajectory:
    """The first ``config.steps`` steps of the checkpoint's training episodes, as a Trajectory."""
    from dmm_train.checkpoint import load_checkpoint

    dataset = load_training_dataset(load_checkpoint(config.checkpoint))
    observations, actions, rewards, starts, total = [], [], [], [], 0
    for episode in dataset.episodes:
        take = min(len(episode), config.steps - total)
        observations.append(episode.observations[:take])  # (take, S)
        actions.append(episode.actions[:take])  # (take, Adim)
        rewards.append(episode.rewards[:take])  # (take,)
        starts.append(np.arange(take) == 0)  # (take,)
        total += take
        if total >= config.steps:
            break
    return Trajectory(np.concatenate(observations).astype(np.float64), np.concatenate(actions).astype(np.float32),
                      np.concatenate(rewards).astype(np.float64), np.concatenate(starts))


def _export_both_modes(checkpoint: Path, directory: Path) -> tuple[Path, ...]:
    try:
        from export.onnx_export import export_checkpoint
    except ModuleNotFoundError as error:
        if error.name != "export.onnx_export":
            raise
        raise DMMError("parity without --onnx, in a dmm-deploy with no ONNX exporter yet",
                       "--onnx PATH (without it parity exports the checkpoint first)",
                       "pass --onnx PATH for each graph to compare") from None
    return tuple(export_checkpoint(checkpoint, mode=mode, out=directory / f"policy-{mode}")[0]
                 for mode in ("window", "stream"))
