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

from dmm_train.errors import DMMError

DEFAULT_RUNS_DIR = Path("runs")


@click.group()
def cli() -> None:
    """Train Decision MetaMamba policies and deploy them to ONNX / TensorRT."""


@cli.command()
@click.option("--preset", default="hopper", show_default=True, help="environment preset")
@click.option("--dataset-id", default=None, help="Minari id to write (default: dmm-deploy/<env>-random-v0)")
@click.option("--episodes", default=100, show_default=True, type=int, help="episodes to roll out")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the env and the policy")
@click.option("--policy", default="random", show_default=True, help="behaviour policy (random)")
@click.option("--out", default=None, type=click.Path(), help="directory to write into (default: Minari store)")
@click.option("--overwrite", is_flag=True, help="replace an existing dataset of the same id")
def collect(preset, dataset_id, episodes, seed, policy, out, overwrite) -> None:
    """Write a Minari dataset from rollouts of a behaviour policy."""
    from dmm_train.collect import collect as collect_dataset
    from dmm_train.config import get_preset

    env_preset = get_preset(preset)
    if episodes < 1:
        raise DMMError(f"--episodes {episodes}; expected at least 1")
    if policy != "random":
        raise DMMError(f"--policy {policy!r}; expected 'random' (trained behaviour policies are not shipped yet)")
    dataset_id = dataset_id or f"dmm-deploy/{env_preset.name}-random-v0"
    path = collect_dataset(
        env_preset.env_id, dataset_id, policy=policy, episodes=episodes, seed=seed, out=out, overwrite=overwrite
    )
    click.echo(f"wrote {dataset_id} to {path}")


@cli.command()
@click.option("--dataset", default=None, help="Minari id or dataset directory (default: embedded Hopper dataset)")
@click.option("--preset", default="hopper", show_default=True, help="environment preset")
@click.option("--steps", default=100_000, show_default=True, type=int, help="gradient steps")
@click.option("--out", default=None, type=click.Path(), help="run directory (default: runs/<preset>-seed<S>)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="continue the run in --out exactly where it stopped")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--eval-every", default=10_000, show_default=True, type=int, help="0 = only at the end")
@click.option("--eval-episodes", default=10, show_default=True, type=int, help="0 = no evaluation")
@click.option("--checkpoint-every", default=1_000, show_default=True, type=int)
@click.option("--scan", default="auto", show_default=True, help="selective scan: auto | fused | loop")
@click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda)")
@click.option("--quiet", is_flag=True, help="no progress output")
def train(dataset, preset, steps, out, seed, resume, batch_size, eval_every, eval_episodes,
          checkpoint_every, scan, device, quiet) -> None:
    """Train a DMM policy offline (official hyperparameters)."""
    from dmm_train.config import TrainConfig
    from dmm_train.train import train as run_training

    config = TrainConfig(
        preset=preset, dataset=dataset, steps=steps, batch_size=batch_size, seed=seed,
        eval_every=eval_every, eval_episodes=eval_episodes, checkpoint_every=checkpoint_every,
        scan=scan, device=device,
    )
    config.validate()
    out_dir = Path(out) if out else DEFAULT_RUNS_DIR / f"{preset}-seed{seed}"
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
            "checkpoint": str(loaded.path), "step": loaded.step, "env_id": loaded.env_id,
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
def run(engine, episodes, seed, target, deadline_ms, mode, provider, threads, as_json, histogram) -> None:
    """Run an engine in the control loop on its env; report return, score and per-step latency."""
    from runtime.loop import RunConfig, run_engine

    if threads < 0:
        raise DMMError(f"--threads {threads}; expected 0 (library default) or a positive count")
    config = RunConfig(
        engine=Path(engine), episodes=episodes, seed=seed, target_return=target, deadline_ms=deadline_ms,
        mode=mode, provider=provider, threads=threads or None,
        histogram=Path(histogram) if histogram else None,
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
    from runtime.parity import ParityConfig, run_parity

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
def export_graph(checkpoint, mode, out, batch, opset) -> None:
    """Export a checkpoint to ONNX (+ manifest), checked against PyTorch in ONNX Runtime."""
    from export.onnx_export import export_checkpoint, export_summary

    onnx_path, manifest_path = export_checkpoint(checkpoint, mode=mode, out=out, batch=batch, opset=opset,
                                                 runs_dir=DEFAULT_RUNS_DIR)
    click.echo(export_summary(onnx_path, manifest_path))


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
