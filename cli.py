"""dmm-deploy command line: collect, train, eval (and the deployment commands).

Each command parses its options into the stage's config and calls one function.
User errors (DMMError, bad options) print one line on stderr and exit non-zero,
with no traceback.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

# The project's own packages: a missing module among them is a broken checkout, not a missing install.
PROJECT_PACKAGES = ("calibration", "contract", "dmm_train", "export", "runtime", "cli")


def missing_package_line(error: ModuleNotFoundError) -> str | None:
    """The one line for a package this Python lacks (the system Python instead of the project's .venv),
    or None where the missing module is the project's own."""
    package = (error.name or "").split(".")[0]
    if not package or package in PROJECT_PACKAGES:
        return None
    return (f"this Python ({sys.executable}) lacks the package {package!r}; expected the project's environment, "
            "where it is installed; set it up once with 'bash scripts/setup.sh', then run '.venv/bin/python "
            "cli.py ...' (or 'source .venv/bin/activate' first)")


try:
    import click

    # Configs only (torch-free): every option's default and help come from these dataclasses.
    from contract.errors import DMMError
    from contract.manifest import MODES
    from contract.threads import prefer_passive_waiting
    from dmm_train.config import CollectConfig, EvalConfig, TrainConfig
    from dmm_train.importing.mapping import DONE_MEANS
    from dmm_train.importing.mapping import FORMATS as IMPORT_FORMATS
    from dmm_train.recipes import RECIPES
    from export.config import TARGETS, ExportConfig
    from export.parity import ParityConfig
    from export.trt_build import TYPINGS, AdoptConfig, BuildConfig
    from runtime.loop import RunConfig
    from runtime.ort_backend import PROVIDERS
    from runtime.policy import ON_FAULT
    from runtime.tensorrt_support import PRECISION_CHECKS
except ModuleNotFoundError as _missing:
    if __name__ != "__main__" or missing_package_line(_missing) is None:
        raise
    print(f"error: {missing_package_line(_missing)}", file=sys.stderr)
    sys.exit(1)


@click.group()
def cli() -> None:
    """Train Decision MetaMamba policies and deploy them to ONNX / TensorRT."""

def config_option(config_class, name: str, *decls: str, **overrides):
    """A click option whose default and help are those of ``config_class``'s field ``name``.

    The dataclass is the one place a default lives; the CLI only parses into it. ``decls``
    default to ``--name-with-dashes``; ``overrides`` adjust click's settings (type, multiple, ...).
    """
    spec = next(f for f in dataclasses.fields(config_class) if f.name == name)
    default = None if spec.default is dataclasses.MISSING else spec.default
    settings = {"default": default, "help": spec.metadata.get("help"), "show_default": default not in (None, (), False)}
    if isinstance(default, bool):
        settings.update(is_flag=True, show_default=False)
    elif isinstance(default, (int, float, str)):
        settings["type"] = type(default)
    settings.update(overrides)
    return click.option(*(decls or (f"--{name.replace('_', '-')}",)), name, **settings)


def limit_options(config_class):
    """The actuator-limit options (runtime/limits.py) of ``config_class``: export records them, run overrides."""
    options = [config_option(config_class, "limits_file", "--limits", type=click.Path()),
               config_option(config_class, "action_lower"), config_option(config_class, "action_upper"),
               config_option(config_class, "action_rate_limit"),
               config_option(config_class, "ramp_steps", type=int), config_option(config_class, "ramp_start")]

    def apply(command):
        for option in reversed(options):  # as stacked decorators: the first listed shows first in --help
            command = option(command)
        return command

    return apply


def from_options(config_class, options: dict, **fixed):
    """``config_class`` from the parsed options that are its fields (plus ``fixed`` values)."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{key: value for key, value in options.items() if key in names}, **fixed)


def path_or_none(value):
    return Path(value) if value is not None else None


@cli.command()
@config_option(CollectConfig, "recipes", "--recipe", multiple=True,
               help="embedded dataset to regenerate (repeatable): " + ", ".join(RECIPES)
               + " (default: every one this checkout ships)")
@config_option(CollectConfig, "steps", type=int)
@config_option(CollectConfig, "seed")
@config_option(CollectConfig, "out", type=click.Path())
@config_option(CollectConfig, "overwrite")
@config_option(CollectConfig, "policy")
@config_option(CollectConfig, "episodes", type=int)
@config_option(CollectConfig, "dataset_id")
@config_option(CollectConfig, "preset")
@config_option(CollectConfig, "quiet")
@config_option(CollectConfig, "workers", type=int)
def collect(**options) -> None:
    """Write Minari datasets: the embedded D4RL-style recipes, or custom rollouts of a policy."""
    prefer_passive_waiting()  # before torch starts its OpenMP pool (contract/threads.py)
    from dmm_train.minari_reader import load_dataset
    from dmm_train.recipes import run_collect

    options["recipes"] = tuple(options["recipes"])
    options["out"] = path_or_none(options["out"])
    with _signals_interrupt():
        try:
            paths = run_collect(from_options(CollectConfig, options), report=click.echo)
        except KeyboardInterrupt:
            # The worker pool and the dataset writer clean up on the way out: nothing half-written stays.
            raise DMMError("collect: stopped by a signal before the dataset was complete (the workers are stopped, no "
                           "partial dataset was kept)", "the collection to run to its end",
                           "rerun the same command to collect it") from None
    for path in paths:
        dataset = load_dataset(path)
        click.echo(f"wrote {dataset.dataset_id}: {len(dataset.episodes)} episodes, {dataset.total_steps} steps, "
                   f"content hash {dataset.content_hash[:16]} -> {path}")


def _signals_interrupt():
    """SIGTERM (a scheduler, ``kill``) interrupts like Ctrl-C for the duration, so that the same cleanup runs
    (the default action would end the process at once, leaving its worker processes running)."""
    import signal

    from contract.signals import signal_handled

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal_handled(signal.SIGTERM, interrupt)


@cli.command(name="import")
@click.argument("source", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(IMPORT_FORMATS), default=None,
              help="the log's format (or format = ... in the mapping file)")
@click.option("--dataset-id", default=None, help="id of the Minari dataset to write, namespace/name-vN")
@click.option("--mapping", "mapping_file", type=click.Path(), default=None,
              help="TOML file with the mapping (keys as these options, with _); options given here override it")
@click.option("--obs", multiple=True, help="observation key / column / TOPIC:FIELD (repeat: concatenated in order)")
@click.option("--action", multiple=True, help="action key / column / TOPIC:FIELD (repeat: concatenated in order)")
@click.option("--reward", default=None, help="reward key / column / TOPIC:FIELD, or sparse-success")
@click.option("--reward-fn", default=None, help="module:function computing an episode's rewards from "
              "(observations, actions, next_observations); only ever taken from the command line")
@click.option("--success", default=None, help="key / column / TOPIC:FIELD saying an episode succeeded "
              "(--reward sparse-success; default: every episode)")
@click.option("--done-means", type=click.Choice(DONE_MEANS), default=None,
              help="what a done flag mixing both means at an episode's end (default truncated)")
@click.option("--period-ms", type=float, default=None, help="control period of a rosbag2 / MCAP log")
@click.option("--episode-gap-s", type=float, default=None, help="start a new episode after a gap this long")
@click.option("--max-episode-steps", type=click.IntRange(min=1), default=None,
              help="cut longer episodes (rosbag2 / MCAP); the cuts are truncations")
@click.option("--reset-topic", default=None, help="topic whose messages start a new episode (Bool: when True)")
@click.option("--out", type=click.Path(), default=None,
              help="Minari store to write into (default $MINARI_DATASETS_PATH or ~/.minari/datasets)")
@click.option("--overwrite", is_flag=True, help="replace an existing dataset of that id")
def import_logs(source, fmt, mapping_file, obs, action, reward_fn, out, overwrite, **options) -> None:
    """Write a Minari dataset from robot logs: npz, HDF5, robomimic, rosbag2, MCAP or LeRobotDataset."""
    from dmm_train.importing.mapping import ImportMapping, load_mapping
    from dmm_train.importing.readers import run_import

    mapping = load_mapping(mapping_file) if mapping_file else ImportMapping()
    mapping = mapping.with_overrides(format=fmt, observation=tuple(obs), action=tuple(action), **options)
    click.echo(run_import(source, mapping, reward_fn=reward_fn, out=out, overwrite=overwrite).summary)


@cli.command()
@config_option(TrainConfig, "dataset")
@config_option(TrainConfig, "preset")
@config_option(TrainConfig, "model")
@config_option(TrainConfig, "steps")
@click.option("--out", default=None, type=click.Path(),
              help="run directory (default: runs/<preset>-seed<S>; runs/<preset>-<model>-seed<S> for a baseline)")
@config_option(TrainConfig, "seed")
@click.option("--resume", is_flag=True,
              help="continue the run in --out exactly where it stopped (with its own model and settings)")
@config_option(TrainConfig, "batch_size")
@config_option(TrainConfig, "warmup_steps", "--warmup", "--warmup-steps", type=int)
@config_option(TrainConfig, "eval_every")
@config_option(TrainConfig, "eval_episodes")
@config_option(TrainConfig, "report_episodes")
@config_option(TrainConfig, "checkpoint_every")
@config_option(TrainConfig, "checkpoint_minutes")
@config_option(TrainConfig, "scan")
@config_option(TrainConfig, "device")
@config_option(TrainConfig, "emulate_ranks")
@config_option(TrainConfig, "dist_timeout_s", "--dist-timeout", type=float)
@config_option(TrainConfig, "threads", type=int)
@click.option("--quiet", is_flag=True, help="no progress output")
def train(out, resume, quiet, **options) -> None:
    """Train a DMM policy (or a baseline, --model) offline (official DMM hyperparameters)."""
    prefer_passive_waiting()  # before torch starts its OpenMP pool (contract/threads.py)
    from dmm_train.train import train as run_training

    config = from_options(TrainConfig, options)
    config.validate()
    # Rank 0 reports what was written (or that the run was already finished); the other ranks write nothing.
    # SIGTERM (a scheduler's preemption, kill) stops like Ctrl-C: one line saying what is kept.
    with _signals_interrupt():
        run_training(config, Path(out) if out else config.run_dir(), resume=resume, progress=not quiet,
                     report=click.echo)


@cli.command()
@config_option(TrainConfig, "steps")
@click.option("--out", default=None, type=click.Path(),
              help="run directory, which also receives the exports (default: runs/<preset>-seed<S>, with "
              "-<N>steps for a shorter --steps)")
@click.option("--episodes", type=click.IntRange(min=1), default=3, show_default=True,
              help="episodes of each engine in the control loop")
@config_option(TrainConfig, "dataset")
@config_option(TrainConfig, "preset")
@config_option(TrainConfig, "seed")
@config_option(TrainConfig, "threads", type=int)
@click.option("--quiet", is_flag=True, help="no progress bars (the phases and the summary still print)")
def tour(out, episodes, quiet, **options) -> None:
    """The whole path in one command, the quick start.

    Train DMM (resumable), export the fp16 graph and the C step, run each in the control loop and
    print a summary (score, latency p50/p99, files, next commands)."""
    prefer_passive_waiting()  # before torch starts its OpenMP pool (contract/threads.py)
    from export.tour import default_tour_dir
    from export.tour import tour as run_tour

    config = from_options(TrainConfig, options)
    config.validate()
    with _signals_interrupt():  # SIGTERM stops like Ctrl-C: the same command continues later
        result = run_tour(config, Path(out) if out else default_tour_dir(config), episodes=episodes,
                          progress=not quiet, report=click.echo)
    click.echo(result.summary())


@cli.command(name="eval")
@config_option(EvalConfig, "checkpoint", required=True, type=click.Path())
@config_option(EvalConfig, "episodes")
@config_option(EvalConfig, "targets", "--target", multiple=True, type=float)
@config_option(EvalConfig, "seed")
@config_option(EvalConfig, "device")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
def evaluate(as_json, **options) -> None:
    """Evaluate a checkpoint with the official sliding-window protocol."""
    prefer_passive_waiting()  # before torch starts its OpenMP pool (contract/threads.py)
    from dmm_train.checkpoint import load_checkpoint
    from dmm_train.evaluate import evaluate_checkpoint
    from dmm_train.threads import setup_threads

    setup_threads()  # torch's threads from the free cores, as in training

    config = from_options(EvalConfig, {**options, "targets": tuple(options["targets"])})
    config.validate()
    loaded = load_checkpoint(config.checkpoint)
    if not loaded.facts.has_simulator:
        _evaluate_offline(loaded, config, as_json)
        return
    results = []
    for target in config.targets or loaded.target_returns:
        result = evaluate_checkpoint(loaded, target_return=target, episodes=config.episodes, seed=config.seed,
                                     device=config.device, progress_label=f"eval target {target:g}")
        results.append(result)
        score = ("" if result.normalized_mean is None
                 else f"  normalised {result.normalized_mean:.1f} ± {result.normalized_std:.1f}")
        click.echo(f"target {target:g}: return {result.return_mean:.1f} ± {result.return_std:.1f}{score}  "
                   f"({config.episodes} episodes)", err=as_json)
    if as_json:
        click.echo(json.dumps({
            "checkpoint": str(loaded.path), "model": loaded.model_config.model, "step": loaded.step,
            "env_id": loaded.env_id,
            "results": [r.to_dict() for r in results],
        }))


def _evaluate_offline(loaded, config, as_json: bool) -> None:
    """`eval` of a policy with no simulator: its training run's held-out episodes (dmm_train/offline_eval.py)."""

    from calibration.data import load_training_dataset
    from dmm_train.offline_eval import evaluate_offline, heldout_split

    dataset = load_training_dataset(loaded)
    _, heldout = heldout_split(dataset.episodes)
    result = evaluate_offline(loaded.model.to(config.device), loaded.facts, heldout,
                              dataset_returns=dataset.episode_returns, device=config.device)
    click.echo(f"no simulator ({loaded.dataset_id} names no env): offline on the episodes its training held out; "
               f"{result.line()}", err=as_json)
    if as_json:
        click.echo(json.dumps({"checkpoint": str(loaded.path), "model": loaded.model_config.model,
                               "step": loaded.step, "env_id": None, "offline": result.to_dict()}))


@cli.command()
@config_option(RunConfig, "engine", required=True, type=click.Path())
@config_option(RunConfig, "episodes")
@config_option(RunConfig, "seed")
@config_option(RunConfig, "target_return", "--target", type=float)
@config_option(RunConfig, "deadline_ms", type=float)
@config_option(RunConfig, "mode", type=click.Choice(MODES))
@config_option(RunConfig, "provider", type=click.Choice(PROVIDERS))
@config_option(RunConfig, "threads", type=int)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
@config_option(RunConfig, "histogram", type=click.Path())
@config_option(RunConfig, "cuda_graph")
@config_option(RunConfig, "on_fault", type=click.Choice(ON_FAULT))
@config_option(RunConfig, "max_consecutive_faults")
@config_option(RunConfig, "period_ms", type=float)
@config_option(RunConfig, "spin_us")
@config_option(RunConfig, "cpu", type=int)
@config_option(RunConfig, "realtime")
@config_option(RunConfig, "freeze_gc", "--freeze-gc/--keep-gc")
@config_option(RunConfig, "device")
@config_option(RunConfig, "env_id", "--env")
@config_option(RunConfig, "record", type=click.Path())
@config_option(RunConfig, "record_chunk_steps", type=click.IntRange(min=1))
@limit_options(RunConfig)
def run(as_json, **options) -> None:
    """Run an engine in the control loop on its env; report return, score, faults and per-step latency."""
    from runtime.loop import run_engine

    if options["threads"] < 0:
        raise DMMError(f"--threads {options['threads']}", "0 (library default) or a positive count",
                       "pass --threads 0 or more")
    config = from_options(RunConfig, {**options, "engine": Path(options["engine"]),
                                      "threads": options["threads"] or None,
                                      "histogram": path_or_none(options["histogram"]),
                                      "record": path_or_none(options["record"])})
    report = run_engine(config)
    for episode, score in zip(report.episodes, report.normalized_scores, strict=True):
        stopped = f"; ended by a fault at {episode.stopped_by}" if episode.stopped_by else ""
        scored = f"  normalised {score:.2f}" if report.score_name == "normalised score" else ""
        click.echo(f"episode seed {episode.seed}: return {episode.episode_return:.2f}{scored}  "
                   f"({episode.length} steps{stopped})", err=as_json)
    summary = report.to_dict()
    click.echo(f"{report.backend} ({report.provider}, {report.mode}, {report.precision}) on {report.env_id}, "
               f"target {report.target_return:g}: return {summary['return']:.2f} ± "
               f"{summary['return_std']:.2f}" + (f"  normalised {summary['normalized_score']:.2f}"
                                                 if report.score_name == "normalised score" else ""), err=as_json)
    click.echo(report.latency.summary(), err=as_json)
    if report.timings is not None:
        click.echo(report.timings.summary(), err=as_json)
    click.echo(report.fault_summary(), err=as_json)
    click.echo(report.limit_summary(), err=as_json)
    if report.record:
        click.echo(f"recorded {report.record_rows} rows -> {report.record}", err=as_json)
    if report.histogram:
        click.echo(f"wrote {report.histogram}", err=as_json)
    if as_json:
        click.echo(json.dumps(summary))
    if report.histogram_failure is not None:  # after the results, which stand: one line, and a failing exit status
        raise report.histogram_failure


@cli.command()
@config_option(ParityConfig, "checkpoint", type=click.Path())
@config_option(ParityConfig, "onnx", "--onnx", multiple=True, type=click.Path())
@click.option("--replay", type=click.Path(), default=None,
              help="a step record (run --record): teacher-force --onnx engines (.onnx, .c, .plan) and --checkpoint "
                   "on it and report their drift from the recorded engine per step")
@config_option(ParityConfig, "steps")
@config_option(ParityConfig, "seed")
@config_option(ParityConfig, "target_return", "--target", type=float)
@config_option(ParityConfig, "atol", type=float)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
def parity(as_json, replay, **options) -> None:
    """Compare every backend's actions with PyTorch's, teacher-forced on a real trajectory.

    The drift is reported per step-in-episode bin; --replay DIR compares along a run's step record."""
    from export.parity import run_parity

    if replay is not None:
        from export.parity import ParityReport, compare_actions
        from runtime.recording import replay_record

        engines = [*options["onnx"], *([options["checkpoint"]] if options["checkpoint"] else [])]
        replayed = replay_record(replay, engines)
        step_index = replayed.trajectory.step_in_episode()
        pairs = tuple(compare_actions(replayed.reference, actions, step_index, reference_label="recorded",
                                      candidate_label=label, mode=replayed.mode)
                      for label, actions in replayed.actions.items())
        report = ParityReport(str(replay), replayed.env_id, replayed.trajectory, pairs, replayed.actions)
        click.echo(f"{replay}: {replayed.trajectory.steps} good steps in {replayed.trajectory.episodes} episode(s) of "
                   f"{replayed.engine_label}, teacher-forced; |action difference| from the recorded engine's (before "
                   "its limits) per step-in-episode bin", err=as_json)
        click.echo(report.table(), err=as_json)
        if as_json:
            click.echo(json.dumps({**report.to_dict(), "replay": str(replay)}))
        worst = max(pairs, key=lambda pair: pair.max_abs, default=None)
        if options["atol"] is not None and worst is not None and worst.max_abs > options["atol"]:
            raise DMMError(f"parity --replay: {worst.candidate} differs from the record by up to {worst.max_abs:.2e}",
                           f"at most --atol {options['atol']:g}", "inspect that engine")
        return
    if options["checkpoint"] is None:
        raise DMMError("parity: no --checkpoint", "--checkpoint model.pt (the PyTorch reference), or --replay RECORD",
                       "pass --checkpoint, or --replay with the engines to check on it")

    config = from_options(ParityConfig, {**options, "checkpoint": Path(options["checkpoint"]),
                                         "onnx": tuple(Path(p) for p in options["onnx"])})
    report = run_parity(config)
    trajectory = report.trajectory
    click.echo(f"{report.env_id}: {trajectory.steps} steps in {trajectory.episodes} episode(s), "
               "teacher-forced; |action difference| per backend pair and step-in-episode bin", err=as_json)
    click.echo(report.table(), err=as_json)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    worst = max(report.pairs, key=lambda pair: pair.max_abs, default=None)
    if config.atol is not None and worst is not None and worst.max_abs > config.atol:
        raise DMMError(f"parity: {worst.candidate} differs from {worst.reference} by up to {worst.max_abs:.2e}",
                       f"at most --atol {config.atol:g}", "inspect the graph (or loosen --atol for this precision)")


@cli.command(name="export")
@config_option(ExportConfig, "checkpoint", type=click.Path())
@config_option(ExportConfig, "mode")
@config_option(ExportConfig, "target", type=click.Choice(TARGETS))
@config_option(ExportConfig, "out", type=click.Path())
@config_option(ExportConfig, "batch")
@config_option(ExportConfig, "opset")
@click.option("--fp16", is_flag=True, help="mixed precision: fp16 Linear layers, everything else (LayerNorm, "
              "softplus, exp, the SSM recurrence, caches, graph I/O) fp32")
@click.option("--int8", is_flag=True, help="Q/DQ int8 on the Linear inputs (symmetric, per-channel weights, "
              "per-tensor activations), calibrated on the training dataset")
@config_option(ExportConfig, "calibration")
@config_option(ExportConfig, "calibration_samples", "--calibration-windows", type=int)
@config_option(ExportConfig, "dataset")
@config_option(ExportConfig, "max_score_drop", type=float)
@config_option(ExportConfig, "score_episodes", type=int)
@config_option(ExportConfig, "score_batch", type=int)
@config_option(ExportConfig, "accept_inconclusive", is_flag=True)
@config_option(ExportConfig, "max_action_error", type=float)
@config_option(ExportConfig, "int8_target", type=float)
@config_option(ExportConfig, "int8_layers")
@limit_options(ExportConfig)
@click.option("--no-engine", is_flag=True, help="only the ONNX, even where TensorRT and a GPU are present")
def export_graph(fp16, int8, no_engine, **options) -> None:
    """Export a checkpoint to ONNX or C, checked against PyTorch.

    The ONNX graph (+ manifest) is checked in ONNX Runtime; --fp16 / --int8 add an accuracy report
    against fp32; where TensorRT and a GPU are present, NAME.plan is built too. --target c writes the
    stream step as C99 (NAME.c + NAME.h) instead, compiled and checked against PyTorch.
    """
    prefer_passive_waiting()  # before torch starts its OpenMP pool (contract/threads.py)
    if fp16 and int8:
        raise DMMError("--fp16 with --int8", "one precision per export",
                       "run export once per precision (each writes its own NAME, hopper-fp16 / hopper-int8 by default)")
    config = from_options(ExportConfig, options, precision="fp16" if fp16 else "int8" if int8 else "fp32",
                          build_engine=not no_engine)
    config.validate()
    if config.checkpoint is None:  # say which checkpoint the export takes before the work starts
        from export.onnx_export import describe_chosen_checkpoint, find_latest_checkpoint

        config = dataclasses.replace(config, checkpoint=find_latest_checkpoint(config.runs_dir))
        click.echo(describe_chosen_checkpoint(config.checkpoint, config.runs_dir), err=True)
    from dmm_train.threads import setup_threads

    setup_threads()  # torch's threads (tracing, checks, scoring) from the free cores, as in training
    if config.target == "c":
        from export.c_source import c_export_summary, export_c_checkpoint

        click.echo(c_export_summary(*export_c_checkpoint(config.checkpoint, out=config.out,
                                                         runs_dir=config.runs_dir, limits=config.limits_options())))
        return
    from export.onnx_export import export_checkpoint, export_summary
    from export.trt_build import engine_after_export

    onnx_path, manifest_path = export_checkpoint(config.checkpoint, mode=config.export_mode, out=config.out,
                                                 batch=config.batch, opset=config.opset, runs_dir=config.runs_dir,
                                                 precision=config.precision,
                                                 precision_options=config.precision_options(),
                                                 limits=config.limits_options())
    click.echo(export_summary(onnx_path, manifest_path))
    if config.precision != "fp32":
        from calibration.accuracy import accuracy_summary
        from contract.manifest import read_manifest

        click.echo(accuracy_summary(read_manifest(manifest_path).accuracy, config.precision))
    click.echo(engine_after_export(onnx_path, build=config.build_engine))


@cli.command()
@click.argument("onnx_file", type=click.Path())
@config_option(BuildConfig, "out", type=click.Path())
@config_option(BuildConfig, "workspace_mb")
@config_option(BuildConfig, "timing_cache", type=click.Path())
@config_option(BuildConfig, "typing", type=click.Choice(TYPINGS))
@config_option(BuildConfig, "tf32")
@config_option(BuildConfig, "device")
@config_option(BuildConfig, "precision_check", type=click.Choice(PRECISION_CHECKS))
def build(onnx_file, **options) -> None:
    """Build the TensorRT engine NAME.plan (+ NAME.plan.json) of an exported NAME.onnx on this GPU."""
    from export.trt_build import build_engine, build_summary

    config = from_options(BuildConfig, {**options, "out": path_or_none(options["out"]),
                                        "timing_cache": path_or_none(options["timing_cache"])},
                          onnx=Path(onnx_file))
    click.echo(build_summary(*build_engine(config)))


@cli.command()
@click.argument("plan_file", type=click.Path())
@config_option(AdoptConfig, "onnx", type=click.Path())
@config_option(AdoptConfig, "device")
@config_option(AdoptConfig, "precision_check", type=click.Choice(PRECISION_CHECKS))
@config_option(AdoptConfig, "force")
def adopt(plan_file, **options) -> None:
    """Write NAME.plan.json for a plan another tool built on this GPU (trtexec).

    The plan (trtexec --saveEngine=NAME.plan) has its I/O checked against NAME.onnx's manifest; its
    TensorRT version, GPU and per-layer precisions are recorded.
    """
    from export.trt_build import adopt_plan, build_summary

    config = from_options(AdoptConfig, {**options, "onnx": path_or_none(options["onnx"])}, plan=Path(plan_file))
    click.echo(build_summary(*adopt_plan(config)))


@cli.command()
@click.option("--engine", type=click.Path(), default=None,
              help="a .plan, .onnx or model.pt: which backends load it, their actions against ONNX Runtime and "
                   "their latency")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="recorded plant steps for the comparison and the latency")
@click.option("--seed", type=int, default=0, show_default=True, help="reset seed of the recorded trajectory")
@click.option("--json", "as_json", is_flag=True, help="print one JSON record (to attach to a bug report)")
def doctor(engine, steps, seed, as_json) -> None:
    """What is installed and usable here, and with --engine which backends run it.

    Covers numpy, ONNX Runtime, TensorRT, pycuda, cuda-python, the driver and the GPU; for what is
    missing, the one thing to install.
    """
    from runtime.doctor import diagnose, report_text

    report = diagnose(engine, steps=steps, seed=seed)
    click.echo(json.dumps(report, indent=2) if as_json else report_text(report))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors become one line on stderr and a non-zero exit code."""
    try:
        cli.main(args=argv, prog_name="cli.py", standalone_mode=False)
    except DMMError as error:
        if not getattr(error, "quiet", False):  # under torchrun, an error every rank raised alike prints once
            click.echo(f"error: {error}", err=True)
        return 1
    except OSError as error:  # an operating-system failure no stage turned into its own DMMError
        from contract.files import file_error

        click.echo(f"error: {file_error(error, action='use')}", err=True)
        return 1
    except click.exceptions.Exit as exit_request:
        return exit_request.exit_code
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except ModuleNotFoundError as error:  # a command's own imports (torch, onnx, ...) in the wrong Python
        line = missing_package_line(error)
        if line is None:
            raise
        click.echo(f"error: {line}", err=True)
        return 1
    except click.ClickException as error:
        command = error.ctx.command_path if getattr(error, "ctx", None) else "cli.py"
        click.echo(f"error: {error.format_message()} (see '{command} --help')", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
