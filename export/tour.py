"""The first run (``cli.py tour``): train, export the fp16 graph and the C step, run both, summarise.

The whole path on the embedded default (or ``--dataset``), in one directory:

1. an estimate of the whole duration, from ~20 measured training steps on the dataset;
2. training (`dmm_train.train.train`), resumed from the directory's resume.pt where there is one;
3. the fp16 ONNX graph (the fp32 one where the fp16 gate refuses it) and the C step, each reused where its
   files already hold an export of this checkpoint;
4. a few episodes of each engine in the control loop (`runtime.loop.run_engine`);
5. one short summary: score and latency p50/p99 per backend, files written, the next commands.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from contract.errors import DMMError
from contract.files import sha256_file
from contract.manifest import manifest_path_for, read_manifest
from dmm_train.config import TrainConfig, run_name
from export.polygraphy_check import data_loader_paths

TIMED_STEPS = 20  # training steps timed for the estimate (after a few untimed ones)
WARMUP_STEPS = 3
GATE_EPISODES = 80  # the fp16 score gate: at most 40 paired episodes, each played by the fp32 and fp16 graphs
MAX_EPISODE_STEPS = 1000  # Hopper-v5's episode length


@dataclass
class BackendResult:
    """One backend's export and run: its engine file, or why there is none; its score and latency."""

    name: str
    engine: Path | None = None
    note: str = ""  # reused, or why the preferred export was refused
    error: str | None = None
    score: float | None = None
    episode_return: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    files: list[Path] = field(default_factory=list)


@dataclass
class TourResult:
    run_dir: Path
    checkpoint: Path
    trained: bool
    backends: list[BackendResult]
    episodes: int

    def summary(self) -> str:
        lines = ["summary:"]
        for backend in self.backends:
            if backend.error is not None:
                lines.append(f"  {backend.name}: not available ({backend.error})")
                continue
            note = f"  [{backend.note}]" if backend.note else ""
            lines.append(f"  {backend.name}: normalised score {backend.score:.1f} (return "
                         f"{backend.episode_return:.1f}, {self.episodes} episode(s)), latency p50 "
                         f"{backend.p50_ms:.3f} ms  p99 {backend.p99_ms:.3f} ms{note}")
        lines.append("files:")
        lines.append(f"  {self.checkpoint} (the trained policy; training.png, metrics.jsonl beside it)")
        for backend in self.backends:
            lines.extend(f"  {path}" for path in backend.files)
        lines.append("next:")
        for backend in self.backends:
            if backend.engine is not None:
                lines.append(f"  python cli.py run --engine {backend.engine} --episodes 10")
        lines.append(f"  python cli.py export --int8 --checkpoint {self.checkpoint} --out "
                     f"{self.run_dir / 'hopper-int8'}")
        onnx = next((b.engine for b in self.backends if b.engine is not None and b.engine.suffix == ".onnx"), None)
        if onnx is not None:
            lines.append(f"  python cli.py build {onnx}   (on the target GPU, with TensorRT)")
        return "\n".join(lines)


def _seconds_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def measure_speeds(config, dataset, *, train: bool = True) -> tuple[float, float, float]:
    """(seconds per training step, seconds per evaluation forward, seconds per batch-1 forward), measured on
    ``dataset`` with the trainer's own model, optimizer, sampler and step (no training step: 0 s per step)."""
    import numpy as np
    import torch

    from dmm_train.baselines import build_policy, policy_actions, set_scan_impl
    from dmm_train.config import ModelConfig, preset_for_dataset
    from dmm_train.sampler import WindowSampler
    from dmm_train.train import batch_to_tensors, make_optimizer, train_step

    preset = preset_for_dataset(config.preset, dataset)
    model_config = ModelConfig.from_preset(preset, model=config.model)
    rng_state = torch.get_rng_state()  # the estimate leaves the training's random streams as they were
    try:
        torch.manual_seed(config.seed)
        model = build_policy(model_config).to(config.device)
        set_scan_impl(model, config.scan)
        optimizer, scheduler = make_optimizer(model, config)
        sampler = WindowSampler(dataset, model_config.context_len, preset.rtg_scale, seed=config.seed)
        model.train()
        started = time.perf_counter()
        for index in range(WARMUP_STEPS + TIMED_STEPS if train else 0):
            if index == WARMUP_STEPS:
                started = time.perf_counter()
            batch = batch_to_tensors(sampler.sample(config.batch_size), config.device)
            train_step(model, optimizer, scheduler, batch, config.grad_clip)
        step_seconds = (time.perf_counter() - started) / TIMED_STEPS if train else 0.0

        model.eval()

        def forward_seconds(batch_size: int, calls: int = 5) -> float:
            context = model_config.context_len
            inputs = (
                torch.zeros(batch_size, context, model_config.state_dim),
                torch.zeros(batch_size, context, model_config.act_dim),
                torch.zeros(batch_size, context, 1),
                torch.from_numpy(np.tile(np.arange(context, dtype=np.int64), (batch_size, 1))),
                torch.ones(batch_size, context),
            )
            inputs = tuple(tensor.to(config.device) for tensor in inputs)
            policy_actions(model, *inputs)
            started = time.perf_counter()
            for _ in range(calls):
                policy_actions(model, *inputs)
            return (time.perf_counter() - started) / calls

        eval_forward = forward_seconds(max(config.eval_episodes, 1))
        single_forward = forward_seconds(1)
    finally:
        torch.set_rng_state(rng_state)
    return step_seconds, eval_forward, single_forward


def estimate_line(config, *, steps_left: int, evaluations: int, episodes: int,
                  speeds: tuple[float, float, float]) -> str:
    """The estimate of the whole run: training from the measured step time, the evaluations and the
    exports' checks and runs from the measured forward times at the longest episodes (falls end them sooner)."""
    step_seconds, eval_forward, single_forward = speeds
    train_seconds = steps_left * step_seconds
    eval_seconds = evaluations * MAX_EPISODE_STEPS * eval_forward
    after_seconds = (GATE_EPISODES + 2 * episodes) * MAX_EPISODE_STEPS * single_forward
    total = train_seconds + eval_seconds + after_seconds
    parts = [f"{step_seconds * 1000:.0f} ms/step measured x {steps_left:,} steps" if steps_left
             else "training already finished"]
    if evaluations:
        parts.append(f"{evaluations} evaluation(s) of {config.eval_episodes} episodes ~{_seconds_text(eval_seconds)}")
    parts.append(f"exports and runs ~{_seconds_text(after_seconds)}")
    return (f"estimate: about {_seconds_text(total)} ({' + '.join(parts)}; evaluations, the fp16 gate's "
            f"{GATE_EPISODES} episodes and the runs are counted as full {MAX_EPISODE_STEPS}-step episodes at the "
            "measured forward time: an upper bound, since a fall ends an episode sooner)")


def _remaining_evaluations(config, done_steps: int) -> int:
    """Evaluations the trainer still runs: the periodic ones after ``done_steps``, and the final one."""
    if not (config.eval_episodes or config.report_episodes) or done_steps >= config.steps:
        return 0
    periodic = 0
    if config.eval_every:
        periodic = (config.steps - 1) // config.eval_every - done_steps // config.eval_every
    return periodic + 1


def _current_export(manifest_path: Path, checkpoint_sha: str, engine_files: dict) -> bool:
    """Whether ``manifest_path`` and ``engine_files`` (path -> a function of the manifest giving the sha256 it
    records for that file, or None: the file need only exist)
    are an export of the checkpoint whose sha256 is ``checkpoint_sha``."""
    if not manifest_path.is_file() or not all(path.is_file() for path in engine_files):
        return False
    try:
        manifest = read_manifest(manifest_path)
    except DMMError:
        return False
    if manifest.checkpoint_sha256 != checkpoint_sha:
        return False
    return all(sha256_file(path) == recorded(manifest) for path, recorded in engine_files.items()
               if recorded is not None)


def _onnx_files(onnx_path: Path) -> list[Path]:
    """The ONNX export's files: NAME.onnx, NAME.json and the data loader's files beside them."""
    return [path for path in (onnx_path, manifest_path_for(onnx_path), *data_loader_paths(onnx_path))
            if path.is_file()]


def _c_files(c_path: Path) -> list[Path]:
    return [c_path, c_path.with_suffix(".h"), manifest_path_for(c_path)]


def export_graph(checkpoint: Path, out_dir: Path, preset: str, dataset: str | None, report) -> BackendResult:
    """The fp16 window graph (reused if current); the fp32 one where the fp16 gate refuses it. ``dataset``:
    the training dataset (None: the checkpoint's id), which calibrates and judges the fp16 graph."""
    from export.onnx_export import default_export_name, export_checkpoint
    from export.precision import PrecisionOptions

    checkpoint_sha = sha256_file(checkpoint)
    paths = {precision: out_dir / f"{default_export_name(preset, precision=precision)}.onnx"
             for precision in ("fp16", "fp32")}

    def current(path: Path) -> bool:
        return _current_export(manifest_path_for(path), checkpoint_sha, {path: lambda m: m.onnx_sha256})

    result = BackendResult(name="onnx")
    for precision in ("fp16", "fp32"):  # an fp32 graph alone: the fp16 gate refused an earlier tour
        if current(paths[precision]):
            result.engine = paths[precision]
            result.name = f"onnx {precision}"
            result.note = "reused: already exported from this checkpoint" + (
                "; fp16 was refused by its accuracy gate (cli.py export --fp16 says why)"
                if precision == "fp32" else "")
            report(f"export: {paths[precision]} is already an export of this checkpoint; reused")
            result.files = _onnx_files(paths[precision])
            return result
    report(f"export: fp16 ONNX graph -> {paths['fp16']} (checked against PyTorch; its accuracy gate plays "
           "closed-loop episodes)")
    try:
        export_checkpoint(checkpoint, out=paths["fp16"], precision="fp16",
                          precision_options=PrecisionOptions(dataset=dataset))
        result.engine, result.name = paths["fp16"], "onnx fp16"
    except DMMError as refused:
        report(f"export: fp16 refused ({refused}); exporting the fp32 graph -> {paths['fp32']}")
        result.note = f"fp16 refused: {str(refused).split(' | ')[0]}; fp32 graph instead"
        try:
            export_checkpoint(checkpoint, out=paths["fp32"], precision="fp32",
                              precision_options=PrecisionOptions(dataset=dataset))
        except DMMError as error:
            result.error = str(error)
            return result
        result.engine, result.name = paths["fp32"], "onnx fp32"
    result.files = _onnx_files(result.engine)
    return result


def export_c_step(checkpoint: Path, out_dir: Path, preset: str, report) -> BackendResult:
    """The C step (NAME.c, NAME.h, NAME.json; reused if current)."""
    from export.c_source import default_c_name, export_c_checkpoint

    c_path = out_dir / f"{default_c_name(preset)}.c"
    h_path = c_path.with_suffix(".h")
    result = BackendResult(name="c")
    recorded = {c_path: lambda m: m.engine.get("source_sha256"), h_path: lambda m: m.engine.get("header_sha256")}
    if _current_export(manifest_path_for(c_path), sha256_file(checkpoint), recorded):
        report(f"export: {c_path} is already an export of this checkpoint; reused")
        result.engine, result.note = c_path, "reused: already exported from this checkpoint"
        result.files = _c_files(c_path)
        return result
    report(f"export: C step -> {c_path} (compiled and checked against PyTorch)")
    try:
        result.files = list(export_c_checkpoint(checkpoint, out=c_path))
    except DMMError as error:
        result.error = str(error)
        return result
    result.engine = c_path
    return result


def run_backend(result: BackendResult, episodes: int, report) -> None:
    """``episodes`` episodes of the backend's engine in the control loop: its score and latency."""
    import numpy as np

    from runtime.loop import RunConfig, run_engine

    if result.engine is None:
        return
    report(f"run: {result.name}, {episodes} episode(s) of {result.engine.name} in the control loop")
    try:
        run = run_engine(RunConfig(engine=result.engine, episodes=episodes))
    except DMMError as error:
        result.error = f"its run stopped: {error}"
        return
    result.score = float(np.mean(run.normalized_scores))
    result.episode_return = float(np.mean(run.returns))
    result.p50_ms, result.p99_ms = run.latency.p50, run.latency.p99


def default_tour_dir(config) -> Path:
    """runs/<preset>-seed<S> for the official budget; a shorter --steps gets its own directory
    (runs/hopper-seed0-5000steps), so that a later full run does not resume a short run's settings."""
    run_dir = config.run_dir()
    official = TrainConfig().steps
    return run_dir if config.steps == official else run_dir.with_name(f"{run_dir.name}-{config.steps}steps")


def tour(config, out_dir: Path, *, episodes: int = 3, progress: bool = True,
         report: Callable[[str], None] = print) -> TourResult:
    """Train (resuming from ``out_dir``), export, run both backends; returns the result with its summary.

    ``config``: the `dmm_train.config.TrainConfig` of a new run (a resumed run keeps its own settings, with
    ``config.steps``). ``report(line)`` receives each phase's start and the estimate.
    """
    from dmm_train.threads import setup_threads
    from dmm_train.train import MODEL_FILE, RESUME_FILE, load_resume_point, resolve_dataset, train
    from runtime.loop import RunConfig

    RunConfig(engine=out_dir, episodes=episodes).validate()
    config.validate()
    out_dir = Path(out_dir)
    resume_path = out_dir / RESUME_FILE
    done_steps, resume = 0, resume_path.exists()
    run_config = config
    if resume:
        state = load_resume_point(resume_path)
        done_steps = int(state["step"])
        run_config = dataclasses.replace(TrainConfig(**state["train_config"]), steps=config.steps)
        del state
    elif (out_dir / MODEL_FILE).exists():
        raise DMMError(f"{str(out_dir)!r} holds a model.pt but no resume.pt",
                       "a run directory of 'cli.py tour' or 'cli.py train' (or a new one)", "pass another --out")
    finished = done_steps >= run_config.steps
    report(f"dataset: {run_config.dataset or 'the embedded default (generated on first use)'}")
    dataset = resolve_dataset(run_config.dataset, progress=progress, preset=run_config.preset)
    setup_threads(config.threads)  # the estimate runs with the threads the training will use
    report(f"estimate: timing {'' if finished else f'{TIMED_STEPS} training steps and '}forward passes on "
           f"{dataset.dataset_id}")
    speeds = measure_speeds(run_config, dataset, train=not finished)
    del dataset
    report(estimate_line(run_config, steps_left=max(run_config.steps - done_steps, 0),
                         evaluations=_remaining_evaluations(run_config, done_steps), episodes=episodes,
                         speeds=speeds))
    report("Ctrl-C stops at any time; the same command continues where it stopped")

    if finished:
        report(f"train: {out_dir} already finished at step {done_steps}; training skipped (a larger --steps "
               "trains further)")
        checkpoint = out_dir / MODEL_FILE
    else:
        report(("train: resuming at step " + str(done_steps) if resume else "train: starting")
               + f", {run_config.steps:,} steps -> {out_dir}")
        try:
            checkpoint = train(config, out_dir, resume=resume, progress=progress, report=report)
        except DMMError as error:  # Ctrl-C: the trainer's advice names 'cli.py train'; the tour resumes by itself
            if not error.received.startswith("training interrupted"):
                raise
            raise DMMError(error.received, error.expected,
                           error.fix.replace("continue with the same command plus --resume",
                                             "continue with the same command")) from None

    preset = run_name(run_config.preset, run_config.dataset)
    backends = [export_graph(checkpoint, out_dir, preset, run_config.dataset, report),
                export_c_step(checkpoint, out_dir, preset, report)]
    for backend in backends:
        run_backend(backend, episodes, report)
    return TourResult(run_dir=out_dir, checkpoint=checkpoint, trained=not finished, backends=backends,
                      episodes=episodes)
