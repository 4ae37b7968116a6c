"""Quality: DMM against Decision Mamba, Decision Transformer and BC, in one harness, on one budget.

Each model kind (dmm_train.baselines) trains with the same trainer (`dmm_train.train`:
the official sampler, AdamW lr 1e-4, weight decay 1e-4, linear warmup, grad clip 0.25,
batch 64) for the same number of steps on one dataset, once per seed; then its last
checkpoint is evaluated with the official sliding-window protocol at every target of the
preset, ``--episodes`` episodes per target, episode i reset with seed EVAL_SEED + i for
every run. Two scores per run, labelled as such:

- last checkpoint @ first target: the honest number (hopper: target 3600);
- best over targets: the maximum over targets of the mean score, which is optimistic
  (the official script also takes the maximum over 10 checkpoints; this bench does not).

BENCHMARKS.md gets a table (params, steps, training time, mean and std over seeds of
both scores) between the markers ``<!-- quality:begin -->`` and ``<!-- quality:end -->``
(another dataset than the embedded hopper-medium gets markers and a last line naming it,
so benches on several datasets sit side by side); the rest of the file is left alone. The
section is rewritten after every finished run, and stdout ends with

    quality: DMM=<score> DMamba=<score> DT=<score> BC=<score>

(last checkpoint @ first target, mean over seeds).

The official budget is 100k steps per run; where that does not fit, every model gets the
same smaller ``--steps`` and the warmup keeps the official share of it (10k of 100k),
both stated in the table. Resumable: each run is a resumable run directory of the
trainer, OUT/<model>-seed<S>/ (OUT defaults to runs/quality/<dataset>), finished once its
result.json exists. A killed bench,
started again with the same settings, skips the finished runs and continues the
unfinished one from its last checkpoint (every ``--checkpoint-every`` steps). ``--report-only``
trains nothing and rewrites the section from the runs already finished, naming the others.

    python bench/quality.py [--dataset ID|DIR] [--steps 10000] [--seeds 0 1 2] [--episodes 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from contract.errors import DMMError  # noqa: E402
from contract.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from dmm_train.baselines import DISPLAY_NAMES  # noqa: E402
from dmm_train.checkpoint import MODEL_FILE, RESUME_FILE  # noqa: E402
from dmm_train.config import MODEL_KINDS, TrainConfig, get_preset  # noqa: E402

OFFICIAL_STEPS = 100_000
OFFICIAL_WARMUP_SHARE = 0.1  # 10k warmup steps of the official 100k
DEFAULT_STEPS = 10_000
EVAL_SEED = 10_000  # the same env resets for every model and training seed
DEFAULT_OUT = Path("runs/quality")
BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"  # the embedded default dataset's section
SETTINGS_FILE = "bench.json"
RESULT_FILE = "result.json"
TIMING_FILE = "timing.json"
# Settings that must match for finished runs to be reused.
LOCKED = ("preset", "dataset_hash", "steps", "warmup_steps", "batch_size", "episodes", "eval_seed")


# --------------------------------------------------------------------------- one run


def train_run(config: TrainConfig, run_dir: Path, progress: bool) -> float:
    """Train (or resume) one run; returns its training wall time in seconds over every session.

    The time up to the last checkpoint is saved with the checkpoint, so the time a killed
    session spent after it (redone on resume) is not counted twice.
    """
    from dmm_train.train import train

    timing_path = run_dir / TIMING_FILE
    spent = json.loads(timing_path.read_text())["seconds"] if timing_path.exists() else 0.0
    started = time.perf_counter()

    def record(step: int) -> None:
        if step % config.checkpoint_every == 0:  # the trainer has just written a resume point
            atomic_write_json({"seconds": spent + time.perf_counter() - started, "step": step}, timing_path)

    train(config, run_dir, resume=(run_dir / RESUME_FILE).exists(), progress=progress, on_step=record)
    total = spent + time.perf_counter() - started
    atomic_write_json({"seconds": total, "step": config.steps}, timing_path)
    return total


def evaluate_run(run_dir: Path, episodes: int):
    """The last checkpoint and its evaluation at every target of its preset (one EvalResult dict each)."""
    from dmm_train.checkpoint import load_checkpoint
    from dmm_train.evaluate import evaluate_checkpoint

    checkpoint = load_checkpoint(run_dir / MODEL_FILE)
    per_target = [
        evaluate_checkpoint(checkpoint, target_return=target, episodes=episodes, seed=EVAL_SEED).to_dict()
        for target in checkpoint.target_returns
    ]
    return checkpoint, per_target


def run_one(kind: str, seed: int, settings: dict, out: Path, progress: bool) -> dict:
    """Train and evaluate ``kind`` at ``seed`` unless its result.json exists; returns the result."""
    run_dir = out / f"{kind}-seed{seed}"
    result_path = run_dir / RESULT_FILE
    if result_path.exists():
        return json.loads(result_path.read_text())
    config = TrainConfig(
        preset=settings["preset"], model=kind, dataset=settings["dataset_spec"], steps=settings["steps"],
        batch_size=settings["batch_size"], warmup_steps=settings["warmup_steps"], seed=seed,
        eval_every=0, eval_episodes=0, checkpoint_every=settings["checkpoint_every"],
    )
    log(f"{DISPLAY_NAMES[kind]} seed {seed}: training {config.steps} steps in {run_dir}")
    train_seconds = train_run(config, run_dir, progress)
    log(f"{DISPLAY_NAMES[kind]} seed {seed}: evaluating the last checkpoint, {settings['episodes']} "
        "episodes per target")
    started = time.perf_counter()
    checkpoint, per_target = evaluate_run(run_dir, settings["episodes"])
    best = max(per_target, key=lambda r: r["normalized_mean"])
    result = {
        "model": kind, "seed": seed, "steps": checkpoint.step, "params": checkpoint.metadata["n_params"],
        "context_len": checkpoint.model_config.context_len,
        "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - started,
        "settings": {name: settings[name] for name in LOCKED},
        "first_target": per_target[0]["target_return"],
        "last_first_target": per_target[0]["normalized_mean"],
        "best_over_targets": best["normalized_mean"], "best_target": best["target_return"],
        "per_target": per_target,
    }
    atomic_write_json(result, result_path)
    log(f"{DISPLAY_NAMES[kind]} seed {seed}: last @ {result['first_target']:g} {result['last_first_target']:.1f}, "
        f"best over targets {result['best_over_targets']:.1f} (@ {result['best_target']:g}); "
        f"trained in {train_seconds:.0f} s")
    return result


# --------------------------------------------------------------------------- the table


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: list[dict], kinds: list[str]) -> list[dict]:
    """One row per kind with at least one finished run."""
    rows = []
    for kind in kinds:
        runs = [r for r in results if r["model"] == kind]
        if not runs:
            continue
        seconds = statistics.fmean(r["train_seconds"] for r in runs)
        rows.append({
            "kind": kind, "name": DISPLAY_NAMES[kind], "params": runs[0]["params"],
            "context_len": runs[0]["context_len"], "steps": runs[0]["steps"], "seeds": len(runs),
            "train_seconds": seconds, "ms_per_step": 1e3 * seconds / runs[0]["steps"],
            "last": mean_std([r["last_first_target"] for r in runs]),
            "best": mean_std([r["best_over_targets"] for r in runs]),
        })
    return rows


def quality_line(rows: list[dict], label: str = "quality") -> str:
    return f"{label}: " + " ".join(f"{row['name']}={row['last'][0]:.1f}" for row in rows)


def section_markers(dataset_id: str, default_id: str) -> tuple[str, str, str]:
    """(begin, end, label of the last line) of a dataset's section.

    The embedded default (hopper-medium) has the plain markers and the one ``quality:`` line
    of the file; any other dataset gets its own markers and a line naming it, so that
    benches on several datasets live side by side without two ``quality:`` lines.
    """
    if dataset_id == default_id:
        return BEGIN, END, "quality"
    return (BEGIN.replace(" -->", f" {dataset_id} -->"), END.replace(" -->", f" {dataset_id} -->"),
            f"quality on {dataset_id}")


def machine_description(threads: int) -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{model}, {cpus} CPUs, torch {torch.__version__} on {threads} thread(s), "
            f"Python {platform.python_version()}")


def duration(seconds: float) -> str:
    """A wall time as it reads best: 42 s, 12.5 min, 3.2 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 2 * 3600 else f"{seconds / 3600:.1f} h"


def score_cell(mean_and_std: tuple[float, float], seeds: int) -> str:
    """"mean ± std" over several seeds; one seed has no spread to show."""
    mean, std = mean_and_std
    return f"{mean:.1f} ± {std:.1f}" if seeds > 1 else f"{mean:.1f} (one seed)"


def render_section(rows: list[dict], settings: dict, command: str, machine: str, expected_runs: int,
                   markers: tuple[str, str, str] = (BEGIN, END, "quality")) -> str:
    done = sum(row["seeds"] for row in rows)
    steps, warmup = settings["steps"], settings["warmup_steps"]
    # What the official budget would cost here, at the measured speeds: the reason for a smaller one.
    official_hours = sum(row["ms_per_step"] for row in rows) * OFFICIAL_STEPS * len(settings["seeds"]) / 3.6e6
    budget = (f"{steps:,} steps per run (the official budget)" if steps >= OFFICIAL_STEPS else
              f"{steps:,} steps per run for every model, a smaller budget than the official {OFFICIAL_STEPS:,} "
              f"(at the ms/step below, {OFFICIAL_STEPS:,} steps for these models and seeds would train for about "
              f"{official_hours:.0f} h on this machine)")
    targets = ", ".join(f"{t:g}" for t in get_preset(settings["preset"]).target_returns)
    lines = [
        markers[0],
        f"## Quality: DMM and its baselines on {settings['dataset_id']}",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine}",
        f"- Dataset: {settings['dataset_id']} ({settings['dataset_episodes']} episodes, "
        f"{settings['dataset_steps']:,} steps, content hash {settings['dataset_hash'][:12]}), env "
        f"{get_preset(settings['preset']).env_id}",
        f"- Training: {budget}; the same trainer for all: AdamW lr 1e-4, weight decay 1e-4, warmup {warmup:,} "
        f"steps (the official {OFFICIAL_WARMUP_SHARE:.0%} of the budget), grad clip 0.25, batch "
        f"{settings['batch_size']}, the official sampler; K (timesteps per window) per model as in the table.",
        f"- Evaluation: the last checkpoint, official sliding-window protocol, {settings['episodes']} episodes "
        f"per target (env seeds {EVAL_SEED} + i, the same for every run), D4RL-normalised. "
        f"\"Last @ {targets.split(',')[0]}\" is the first target; \"best over targets\" is the maximum over "
        f"{targets} of the per-target mean (optimistic; the official script also maximises over checkpoints).",
        "- Training time: wall time of one run's training, checkpoints included, mean over seeds.",
        f"- Mean ± sample std over seeds {', '.join(str(s) for s in settings['seeds'])}"
        + ("" if done == expected_runs else f"; partial: {done} of {expected_runs} runs finished"),
        "",
        "| model | params | K | steps | training time per run | ms/step | last checkpoint @ first target | "
        "best over targets | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['params']:,} | {row['context_len']} | {row['steps']:,} | "
            f"{duration(row['train_seconds'])} | "
            f"{row['ms_per_step']:.1f} | {score_cell(row['last'], row['seeds'])} | "
            f"{score_cell(row['best'], row['seeds'])} | {row['seeds']} |"
        )
    lines += ["", quality_line(rows, markers[2]), markers[1]]
    return "\n".join(lines) + "\n"


def update_benchmarks(path: Path, section: str, markers: tuple[str, str, str] = (BEGIN, END, "quality")) -> None:
    """Replace the text between the markers in ``path`` (or append the section); the rest is kept."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(markers[0]) + r".*?" + re.escape(markers[1]) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_bytes(path, text.encode())


# --------------------------------------------------------------------------- driver


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_settings(args, dataset, dataset_spec: str) -> dict:
    return {
        "preset": args.preset, "dataset_id": dataset.dataset_id, "dataset_hash": dataset.content_hash,
        "dataset_spec": dataset_spec, "dataset_episodes": len(dataset.episodes),
        "dataset_steps": dataset.total_steps, "steps": args.steps, "warmup_steps": args.warmup_steps,
        "batch_size": args.batch_size, "episodes": args.episodes, "eval_seed": EVAL_SEED,
        "checkpoint_every": args.checkpoint_every, "seeds": list(args.seeds),
    }


def check_settings(out: Path, settings: dict) -> None:
    """Refuse to mix runs of different settings in one bench directory."""
    path = out / SETTINGS_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        changed = [name for name in LOCKED if saved.get(name) != settings[name]]
        if changed:
            received = ", ".join(f"{name}={settings[name]!r}" for name in changed)
            expected = ", ".join(f"{name}={saved.get(name)!r}" for name in changed)
            raise DMMError(f"bench directory {str(out)!r} holds runs with {expected}; received {received}; "
                           "pass the same settings to continue it, or another --out for a new bench")
    atomic_write_json(settings, path)


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None,
                        help="Minari id or dataset directory (default: the embedded hopper-medium)")
    parser.add_argument("--preset", default="hopper", help="environment preset (default hopper)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_KINDS),
                        help=f"model kinds (default: {' '.join(MODEL_KINDS)})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"training steps per run, the same for every model (default {DEFAULT_STEPS})")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="linear warmup (default: the official 10%% of --steps)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes per target (default 10)")
    parser.add_argument("--checkpoint-every", type=int, default=1000,
                        help="steps between resumable checkpoints (default 1000)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"bench directory: one run directory per model and seed (default {DEFAULT_OUT}/<dataset>)")
    parser.add_argument("--benchmarks", type=Path, default=BENCHMARKS,
                        help="markdown file whose quality section is (re)written (default BENCHMARKS.md)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch (and scan kernel) threads (default 1: the machine is shared)")
    parser.add_argument("--quiet", action="store_true", help="no training progress lines")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: rewrite the section from the runs already finished (the rest are "
                             "named as missing)")
    args = parser.parse_args(argv)
    if args.warmup_steps is None:
        args.warmup_steps = int(args.steps * OFFICIAL_WARMUP_SHARE)
    unknown = [kind for kind in args.models if kind not in MODEL_KINDS]
    if unknown or len(set(args.models)) != len(args.models):
        raise DMMError(f"--models {' '.join(args.models)}; expected distinct kinds among {', '.join(MODEL_KINDS)}")
    if len(set(args.seeds)) != len(args.seeds):
        raise DMMError(f"--seeds {' '.join(map(str, args.seeds))}; expected distinct seeds")
    for name in ("steps", "episodes", "threads", "batch_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise DMMError(f"--{name.replace('_', '-')} {getattr(args, name)}; expected a positive integer")
    return args


def main(argv: list[str] | None = None) -> str:
    """Run (or continue) the bench; returns the quality line, which is also stdout's last line."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # the fused scan kernel follows torch's thread count
    from dmm_train.minari_reader import load_dataset
    from dmm_train.recipes import DEFAULT_DATASET_ID, ensure_default_dataset

    dataset_spec = args.dataset if args.dataset is not None else str(ensure_default_dataset(progress=True))
    dataset = load_dataset(dataset_spec)
    preset = get_preset(args.preset)
    if (dataset.state_dim, dataset.act_dim) != (preset.state_dim, preset.act_dim):
        raise DMMError(f"dataset {dataset.dataset_id!r} has state/action dims {dataset.state_dim}/"
                       f"{dataset.act_dim}; preset {preset.name!r} expects {preset.state_dim}/{preset.act_dim}; "
                       "pass the --preset of the dataset's environment")
    settings = bench_settings(args, dataset, dataset_spec)
    if args.out is None:
        args.out = DEFAULT_OUT / dataset.dataset_id.replace("/", "--")
    args.out.mkdir(parents=True, exist_ok=True)
    check_settings(args.out, settings)
    command = "python bench/quality.py" + ("" if not argv else " " + shlex.join(argv))
    machine = machine_description(args.threads)
    markers = section_markers(dataset.dataset_id, DEFAULT_DATASET_ID)
    expected_runs = len(args.models) * len(args.seeds)

    results, missing = [], []
    for seed in args.seeds:  # seeds outermost: a partial bench compares every model on the same seeds
        for kind in args.models:
            if args.report_only and not (args.out / f"{kind}-seed{seed}" / RESULT_FILE).exists():
                missing.append(f"{kind}-seed{seed}")
                continue
            results.append(run_one(kind, seed, settings, args.out, progress=not args.quiet))
            rows = summarize(results, args.models)
            section = render_section(rows, settings, command, machine, expected_runs, markers)
            update_benchmarks(args.benchmarks, section, markers)
    if not results:
        raise DMMError(f"--report-only: no finished run under {args.out} (missing: {', '.join(missing)}); "
                       "run the bench without --report-only first")
    if missing:
        log(f"not finished, left out of the table: {', '.join(missing)}")
    rows = summarize(results, args.models)
    for row in rows:
        print(f"{row['name']:<7} params {row['params']:>8,}  K {row['context_len']:>2}  {row['steps']:,} steps  "
              f"{row['ms_per_step']:6.1f} ms/step  last @ first target {row['last'][0]:6.1f} ± {row['last'][1]:5.1f}"
              f"  best over targets {row['best'][0]:6.1f} ± {row['best'][1]:5.1f}  ({row['seeds']} seeds)")
    print(f"wrote the quality section of {args.benchmarks}")
    line = quality_line(rows)
    print(line)
    return line


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DMMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)

