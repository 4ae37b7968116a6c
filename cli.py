"""dmm-deploy command line: collect, train, eval (and the deployment commands).

Each command parses its options into the stage's config and calls one function.
User errors (DMMError, bad options) print one line on stderr and exit non-zero,
with no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from contract.errors import DMMError

DEFAULT_RUNS_DIR = Path("runs")


@click.group()
def cli() -> None:
    """Train Decision MetaMamba policies and deploy them to ONNX / TensorRT."""


@cli.command()
@click.option("--recipe", "recipes", multiple=True,
              help="embedded dataset to regenerate (repeatable): hopper-medium, hopper-medium-replay, "
                   "hopper-expert, hopper-medium-expert, hopper-random (default: every one this checkout ships)")
@click.option("--steps", default=None, type=int, help="rollout budget per policy (default 100000)")
@click.option("--seed", default=None, type=int, help="seed of the env resets and the action noise (default 0)")
@click.option("--out", default=None, type=click.Path(), help="Minari store to write into (default: the local one)")
@click.option("--overwrite", is_flag=True, help="replace an existing dataset of the same id")
@click.option("--policy", default=None, help="custom rollouts: 'random' or a behaviour-policy .npz")
@click.option("--episodes", default=None, type=int, help="custom rollouts: episodes to roll out (default 100)")
@click.option("--dataset-id", default=None, help="custom rollouts: Minari id to write (namespace/name-vN)")
@click.option("--preset", default="hopper", show_default=True, help="custom rollouts: environment preset")
@click.option("--quiet", is_flag=True, help="no progress bar")
def collect(recipes, steps, seed, out, overwrite, policy, episodes, dataset_id, preset, quiet) -> None:
    """Write Minari datasets: the embedded D4RL-style recipes, or custom rollouts of a policy."""
    from dmm_train.config import get_preset
    from dmm_train.minari_reader import load_dataset
    from dmm_train.recipes import RECIPE_SEED, RECIPE_STEPS, RECIPES, collect_recipe, recipe_dataset_dir
    from dmm_train.recipes import collect as collect_dataset

    seed = RECIPE_SEED if seed is None else seed
    custom = policy is not None or episodes is not None or dataset_id is not None
    if custom and recipes:
        raise DMMError(f"--recipe {' '.join(recipes)} with --policy/--episodes/--dataset-id; expected either a "
                       "recipe or custom rollouts, not both")
    if custom:
        env_preset = get_preset(preset)
        episodes = 100 if episodes is None else episodes
        if episodes < 1:
            raise DMMError(f"--episodes {episodes}; expected at least 1")
        policy = policy or "random"
        if policy != "random" and not policy.endswith(".npz"):
            raise DMMError(f"--policy {policy!r}; expected 'random' or a behaviour-policy .npz file")
        name = "random" if policy == "random" else Path(policy).stem.replace("_", "-")
        dataset_id = dataset_id or f"dmm-deploy/{env_preset.name}-{name}-custom-v0"
        paths = [collect_dataset(env_preset.env_id, dataset_id, policy=policy, episodes=episodes, seed=seed,
                                 out=out, overwrite=overwrite)]
    else:
        names = recipes or tuple(name for name, recipe in RECIPES.items()
                                 if recipe.available() and recipe.kind != "random")
        if not recipes and not overwrite:  # the no-argument form fills in what is missing
            kept = [name for name in names if recipe_dataset_dir(name, out).exists()]
            for name in kept:
                click.echo(f"kept the existing {RECIPES[name].dataset_id} (--overwrite regenerates it)")
            names = tuple(name for name in names if name not in kept)
        paths = [collect_recipe(name, steps=RECIPE_STEPS if steps is None else steps, seed=seed, out=out,
                                overwrite=overwrite, progress=not quiet) for name in names]
    for path in paths:
        dataset = load_dataset(path)
        click.echo(f"wrote {dataset.dataset_id}: {len(dataset.episodes)} episodes, {dataset.total_steps} steps, "
                   f"content hash {dataset.content_hash[:16]} -> {path}")


@cli.command()
@click.option("--dataset", default=None,
              help="Minari id or dataset directory (default: the embedded hopper-medium, generated on first use)")
@click.option("--preset", default="hopper", show_default=True, help="environment preset")
@click.option("--model", default="dmm", show_default=True,
              help="policy: dmm | dmamba (DMM without DSM, with Mamba's conv) | dt (Decision Transformer) | bc")
@click.option("--steps", default=100_000, show_default=True, type=int, help="gradient steps")
@click.option("--out", default=None, type=click.Path(),
              help="run directory (default: runs/<preset>-seed<S>; runs/<preset>-<model>-seed<S> for a baseline)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True,
              help="continue the run in --out exactly where it stopped (with its own model and settings)")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--eval-every", default=10_000, show_default=True, type=int, help="0 = only at the end")
@click.option("--eval-episodes", default=10, show_default=True, type=int, help="0 = no evaluation")
@click.option("--checkpoint-every", default=1_000, show_default=True, type=int)
@click.option("--scan", default="auto", show_default=True, help="selective scan: auto | fused | loop")
@click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda)")
@click.option("--quiet", is_flag=True, help="no progress output")
def train(dataset, preset, model, steps, out, seed, resume, batch_size, eval_every, eval_episodes,
          checkpoint_every, scan, device, quiet) -> None:
    """Train a DMM policy (or a baseline, --model) offline (official DMM hyperparameters)."""
    from dmm_train.config import TrainConfig
    from dmm_train.train import train as run_training

    config = TrainConfig(
        preset=preset, model=model, dataset=dataset, steps=steps, batch_size=batch_size, seed=seed,
        eval_every=eval_every, eval_episodes=eval_episodes, checkpoint_every=checkpoint_every,
        scan=scan, device=device,
    )
    config.validate()
    run_name = f"{preset}-seed{seed}" if model == "dmm" else f"{preset}-{model}-seed{seed}"
    out_dir = Path(out) if out else DEFAULT_RUNS_DIR / run_name
    model_path = run_training(config, out_dir, resume=resume, progress=not quiet)
    click.echo(f"wrote {model_path}")


@cli.command(name="eval")
@click.option("--checkpoint", required=True, type=click.Path(), help="model.pt or its run directory")
@click.option("--episodes", default=10, show_default=True, type=int)
@click.option("--target", "targets", multiple=True, type=float, help="target return (repeatable; default: all)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
def evaluate(checkpoint, episodes, targets, seed, device, as_json) -> None:
    """Evaluate a checkpoint with the official sliding-window protocol."""
    from dmm_train.checkpoint import load_checkpoint
    from dmm_train.evaluate import evaluate_checkpoint

    if episodes < 1:
        raise DMMError(f"--episodes {episodes}; expected at least 1")
    loaded = load_checkpoint(checkpoint)
    results = []
    for target in targets or loaded.target_returns:
        result = evaluate_checkpoint(loaded, target_return=target, episodes=episodes, seed=seed, device=device)
        results.append(result)
        click.echo(
            f"target {target:g}: return {result.return_mean:.1f} ± {result.return_std:.1f}  "
            f"normalised {result.normalized_mean:.1f} ± {result.normalized_std:.1f}  ({episodes} episodes)",
            err=as_json,
        )
    if as_json:
        click.echo(json.dumps({
            "checkpoint": str(loaded.path), "model": loaded.model_config.model, "step": loaded.step,
            "env_id": loaded.env_id,
            "results": [r.to_dict() for r in results],
        }))


@cli.command()
@click.option("--engine", required=True, type=click.Path(), help="hopper.plan, hopper.onnx or a model.pt")
@click.option("--episodes", default=5, show_default=True, type=int, help="episode i is seeded seed + i")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--target", default=None, type=float, help="target return (default: the manifest's)")
@click.option("--deadline-ms", default=None, type=float,
              help="per-step deadline (default: the plant's control period, 8 ms for Hopper-v5)")
@click.option("--mode", default=None, type=click.Choice(["window", "stream"]),
              help="inference mode of a model.pt (default window); an exported engine has its own")
@click.option("--provider", default=None, type=click.Choice(["cpu", "cuda", "tensorrt", "auto"]),
              help="ONNX Runtime execution provider for a .onnx (default cpu); the one in use is asserted")
@click.option("--threads", default=1, show_default=True, type=int,
              help="intra-op threads of the backend; 0 = the library's default")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
@click.option("--histogram", default=None, type=click.Path(), help="write a latency histogram PNG here")
@click.option("--cuda-graph", is_flag=True, help="replay a .plan's enqueue as a CUDA graph (needs cuda-python)")
def run(engine, episodes, seed, target, deadline_ms, mode, provider, threads, as_json, histogram, cuda_graph) -> None:
    """Run an engine in the control loop on its env; report return, score and per-step latency."""
    from runtime.loop import RunConfig, run_engine

    if threads < 0:
        raise DMMError(f"--threads {threads}; expected 0 (library default) or a positive count")
    config = RunConfig(
        engine=Path(engine), episodes=episodes, seed=seed, target_return=target, deadline_ms=deadline_ms,
        mode=mode, provider=provider, threads=threads or None,
        histogram=Path(histogram) if histogram else None, cuda_graph=cuda_graph,
    )
    report = run_engine(config)
    for episode, score in zip(report.episodes, report.normalized_scores, strict=True):
        click.echo(f"episode seed {episode.seed}: return {episode.episode_return:.2f}  "
                   f"normalised {score:.2f}  ({episode.length} steps)", err=as_json)
    summary = report.to_dict()
    click.echo(f"{report.backend} ({report.provider}, {report.mode}, {report.precision}) on {report.env_id}, "
               f"target {report.target_return:g}: return {summary['return']:.2f} ± "
               f"{summary['return_std']:.2f}  normalised {summary['normalized_score']:.2f}", err=as_json)
    click.echo(report.latency.summary(), err=as_json)
    if report.histogram:
        click.echo(f"wrote {report.histogram}", err=as_json)
    if as_json:
        click.echo(json.dumps(summary))


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(), help="model.pt (the PyTorch reference)")
@click.option("--onnx", "onnx_paths", multiple=True, type=click.Path(),
              help="graph exported from it (repeatable; default: export both modes to a temporary directory)")
@click.option("--steps", default=1000, show_default=True, type=int, help="steps of the recorded trajectory")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--target", default=None, type=float, help="target return (default: the manifest's)")
@click.option("--atol", default=None, type=float, help="fail when a pair's max abs difference exceeds this")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
def parity(checkpoint, onnx_paths, steps, seed, target, atol, as_json) -> None:
    """Compare the actions of PyTorch and ONNX Runtime, teacher-forced on a real trajectory, per step bin."""
    from export.parity import ParityConfig, run_parity

    config = ParityConfig(checkpoint=Path(checkpoint), onnx=tuple(Path(p) for p in onnx_paths), steps=steps,
                          seed=seed, target_return=target)
    report = run_parity(config)
    trajectory = report.trajectory
    click.echo(f"{report.env_id}: {trajectory.steps} steps in {trajectory.episodes} episode(s), "
               "teacher-forced; |action difference| per backend pair and step-in-episode bin", err=as_json)
    click.echo(report.table(), err=as_json)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    worst = max(report.pairs, key=lambda pair: pair.max_abs, default=None)
    if atol is not None and worst is not None and worst.max_abs > atol:
        raise DMMError(f"parity | {worst.candidate} differs from {worst.reference} by up to "
                       f"{worst.max_abs:.2e} | expected at most --atol {atol:g}; inspect the graph "
                       "(or loosen --atol for this precision)")


@cli.command(name="export")
@click.option("--checkpoint", default=None, type=click.Path(),
              help="model.pt or its run directory (default: the newest model.pt under runs/)")
@click.option("--mode", default="window", show_default=True,
              help="window (the official sliding-window evaluation) | stream (one step, explicit caches)")
@click.option("--out", default=None, type=click.Path(),
              help="NAME: writes NAME.onnx and the manifest NAME.json (default: the preset, e.g. hopper)")
@click.option("--batch", default=1, show_default=True, type=int, help="static batch (1 for a control loop)")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset (17 or newer)")
@click.option("--fp16", is_flag=True, help="mixed precision: fp16 Linear layers, everything else (LayerNorm, "
              "softplus, exp, the SSM recurrence, caches, graph I/O) fp32")
@click.option("--int8", is_flag=True, help="Q/DQ int8 on the Linear inputs (symmetric, per-channel weights, "
              "per-tensor activations), calibrated on the training dataset")
@click.option("--calibration", default=None, type=click.Choice(["minmax", "entropy", "percentile"]),
              help="int8 range calibration (default percentile)")
@click.option("--calibration-windows", default=None, type=int,
              help="int8 calibration samples from the training dataset (default 512; stream: steps)")
@click.option("--dataset", default=None,
              help="the training dataset (directory or local Minari id) for calibration and the held-out "
                   "accuracy (default: the id the checkpoint records)")
@click.option("--max-score-drop", default=None, type=float,
              help="fail when the closed-loop normalised score drops by more than this many points against "
                   "fp32 (default: fp16 1, int8 3)")
@click.option("--score-episodes", default=None, type=int,
              help="closed-loop episodes per graph for the accuracy report (default 5)")
@click.option("--no-engine", is_flag=True, help="only the ONNX, even where TensorRT and a GPU are present")
def export_graph(checkpoint, mode, out, batch, opset, fp16, int8, calibration, calibration_windows, dataset,
                 max_score_drop, score_episodes, no_engine) -> None:
    """Export a checkpoint to ONNX (+ manifest), checked against PyTorch in ONNX Runtime; --fp16 / --int8
    add an accuracy report against fp32; where TensorRT and a GPU are present, build NAME.plan too.
    """
    from export.onnx_export import export_checkpoint, export_summary
    from export.trt_build import engine_after_export

    if fp16 and int8:
        raise DMMError("--fp16 with --int8; expected one precision per export (run export twice with two --out)")
    precision = "fp16" if fp16 else "int8" if int8 else "fp32"
    precision_flags = {"--calibration": calibration, "--calibration-windows": calibration_windows,
                       "--dataset": dataset, "--max-score-drop": max_score_drop, "--score-episodes": score_episodes}
    given = [flag for flag, value in precision_flags.items() if value is not None]
    if precision == "fp32" and given:
        raise DMMError(f"{', '.join(given)} without --fp16 or --int8; expected them only with a low precision, "
                       "which they calibrate and judge")
    for flag in ("--calibration", "--calibration-windows"):
        if precision == "fp16" and flag in given:
            raise DMMError(f"{flag} with --fp16; expected it only with --int8 (fp16 needs no calibration)")
    options = None
    if precision != "fp32":
        from export.precision import PrecisionOptions

        chosen = {"calibration": calibration, "calibration_samples": calibration_windows, "dataset": dataset,
                  "max_score_drop": max_score_drop, "score_episodes": score_episodes}
        options = PrecisionOptions(**{name: value for name, value in chosen.items() if value is not None})
    onnx_path, manifest_path = export_checkpoint(checkpoint, mode=mode, out=out, batch=batch, opset=opset,
                                                 runs_dir=DEFAULT_RUNS_DIR, precision=precision,
                                                 precision_options=options)
    click.echo(export_summary(onnx_path, manifest_path))
    if precision != "fp32":
        from calibration.accuracy import accuracy_summary
        from contract.manifest import read_manifest

        click.echo(accuracy_summary(read_manifest(manifest_path).accuracy, precision))
    click.echo(engine_after_export(onnx_path, build=not no_engine))


@cli.command()
@click.argument("onnx_file", type=click.Path())
@click.option("--out", default=None, type=click.Path(), help="NAME.plan to write (default: beside the ONNX)")
@click.option("--workspace-mb", default=None, type=int, help="builder workspace limit in MiB (default 256)")
@click.option("--timing-cache", default=None, type=click.Path(),
              help="timing cache to reuse and update (default: beside the plan, one per TensorRT version and GPU)")
@click.option("--typing", default=None, type=click.Choice(["auto", "strong", "weak"]),
              help="strongly typed network (precision from the graph), or weak typing with the FP16/INT8 "
                   "builder flags (TensorRT 10.x only); auto: strong, weak only where 10.x needs it")
@click.option("--tf32", is_flag=True, help="allow TF32 in the fp32 layers (off: true fp32, for parity)")
@click.option("--device", default=None, type=int, help="CUDA device to build on (default 0)")
def build(onnx_file, out, workspace_mb, timing_cache, typing, tf32, device) -> None:
    """Build the TensorRT engine NAME.plan (+ NAME.plan.json) of an exported NAME.onnx on this machine's GPU."""
    from export.trt_build import BuildConfig, build_engine, build_summary

    chosen = {"out": Path(out) if out else None, "workspace_mb": workspace_mb,
              "timing_cache": Path(timing_cache) if timing_cache else None, "typing": typing, "device": device}
    config = BuildConfig(onnx=Path(onnx_file), tf32=tf32,
                         **{name: value for name, value in chosen.items() if value is not None})
    click.echo(build_summary(*build_engine(config)))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors become one line on stderr and a non-zero exit code."""
    try:
        cli.main(args=argv, prog_name="cli.py", standalone_mode=False)
    except DMMError as error:
        click.echo(f"error: {error}", err=True)
        return 1
    except click.exceptions.Exit as exit_request:
        return exit_request.exit_code
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except click.ClickException as error:
        command = error.ctx.command_path if getattr(error, "ctx", None) else "cli.py"
        click.echo(f"error: {error.format_message()} (see '{command} --help')", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
