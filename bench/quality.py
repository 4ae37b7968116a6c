"""Quality: DMM against Decision Mamba, BC and Decision Transformer, in one harness, at the official budget.

Each model kind (dmm_train.baselines) trains with the same trainer (`dmm_train.train`: the
official sampler, AdamW lr 1e-4, weight decay 1e-4, linear warmup of min(10k, 10%) of the
run's steps, grad clip 0.25, batch 64) on one dataset, once per seed, ``--steps`` steps (the
official 100,000 by default; ``--model-steps dt=30000`` gives one kind a smaller budget, and
every number is labelled with its budget; ``--model-device dt=cuda`` trains one kind on a GPU, and the
table names the device). Each run evaluates itself at ``--evaluations``
periodic checkpoints (every steps / 10, the last at the final step), in the trainer:

- selection: ``--selection-episodes`` episodes at the first target on env seeds 20000 + i;
  the best of them is kept as best.pt (`dmm_train.train`);
- report: ``--episodes`` episodes at every target on env seeds 10000 + i, the same for every
  run, recorded in the run's metrics.jsonl. The two seed ranges are disjoint, so best.pt is
  never chosen on the episodes it is reported on.

Evaluating inside training costs the same episodes as evaluating saved periodic checkpoints
afterwards and needs no snapshot files: each run's numbers are read from its metrics.jsonl.
Three scores per run, labelled as such (CORL reports "last" and "best" side by side):

- last: the final checkpoint's report score at the first target (hopper: 3600), the honest number;
- best: best.pt's report score at the first target (chosen on the selection seeds);
- official: the maximum over targets and over the periodic checkpoints of the report score,
  as the official script reports it (optimistic: chosen on the episodes it reports).

Beside the last checkpoint, the mean of the last three periodic evaluations (steadier where scores swing).
DMM is compared with each baseline by the difference of the means over seeds with a 95% interval
(Welch's t; a one-seed side is taken to spread as the other side), and called ahead or behind only
where the whole interval lies above or below zero, else level.

Plus the training cost (ms per step without evaluation, hours per run with it), and a
compute-matched row: DT trained for DMM's mean training wall time (``dt-matched`` runs, whose
step count is DMM's seconds divided by DT's seconds per step, measured in the bench's own runs,
and fixed when the run starts, from the DMM runs that trained on DT's CPU where there are such runs).
Each run records the CPU (and GPU) it trained on: costs are figures of a run's own machine, so a table
whose runs trained on several machines names each run's CPU.

BENCHMARKS.md gets a section per dataset and budget between ``<!-- quality:begin ID @ STEPS -->``
and ``<!-- quality:end ID @ STEPS -->``; the rest of the file is left alone. It ends with

    quality on <dataset id> @ <steps> steps (last checkpoint, N seeds): DMM=x DMamba=y BC=z DT=w

(``DT@<steps>=w`` for a kind trained on fewer steps). Each run is a resumable run directory of
the trainer, OUT/<name>/ (OUT defaults to runs/quality/<dataset>-<steps>steps; names dmm-seed0,
dt-matched-seed0, ...), finished once its result.json exists; started again with the same
settings, the bench skips finished runs and resumes the others from their last checkpoint.

Sweeps on any scheduler: ``--print-commands`` prints one independent, resumable command per run
(``--run NAME``: train or continue that run alone, write its result.json, touch no table), the
dt-matched ones last (they read the finished DMM and DT runs: start them after those);
``--jobs N`` runs N of them at once on this machine, each with ``--threads`` torch threads (carried runs
first, then the longest);
``--report-only`` writes the tables from the runs directory (and the settings it recorded: the dataset
need not be present); ``--status`` says where each run stands.

A bench outlives one machine when its directory lives in the tree, ``--out
bench/results/quality/<dataset>-<steps>steps``: the runs' JSON records there are tracked (.gitignore
leaves out checkpoints, plots and logs), so a finished run travels as its result.json and is never
retrained; an unfinished one also needs its resume.pt and best.pt (``git add -f``), from whose step the
bench continues it on the next machine (the recipes regenerate the same dataset, hash and all, and
the trainer refuses another).

    python bench/quality.py [--dataset ID|DIR] [--steps 100000] [--seeds 0 1 2] [--model-steps dt=N]
                            [--model-seeds dt=0] [--model-device dt=cuda] [--jobs N] [--print-commands]
                            [--run NAME] [--report-only] [--status]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from calibration.accuracy import student_t_quantile
from contract.errors import DMMError, check_dims
from contract.files import atomic_write_bytes, atomic_write_json, lock_holder
from dmm_train.baselines import DISPLAY_NAMES
from dmm_train.checkpoint import MODEL_JSON, RESUME_FILE
from dmm_train.config import (
    MAX_EVAL_EPISODES,
    MODEL_KINDS,
    REPORT_EVAL_SEED,
    SELECTION_EVAL_SEED,
    TrainConfig,
    get_preset,
)
from dmm_train.minari_reader import load_dataset
from dmm_train.recipes import ensure_default_dataset
from dmm_train.train import train

OFFICIAL_STEPS = 100_000
DEFAULT_KINDS = ("dmm", "dmamba", "bc", "dt")  # the order of the table and of the quality line
MATCHED = "dt-matched"  # DT trained for DMM's training wall time
DEFAULT_OUT = Path("runs/quality")
BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
BEGIN, END = "<!-- quality:begin", "<!-- quality:end"
SETTINGS_FILE = "bench.json"
RUN_FILE = "run.json"  # a run's own settings, fixed when it starts
RESULT_FILE = "result.json"
DEVICES_FILE = "devices.json"  # the torch devices (with the GPU's and the CPU's names) a run has trained on, in order
LOG_FILE = "bench.log"  # a --jobs child's output
RESULT_FORMAT = 2
# Settings that must match for finished runs to be reused.
LOCKED = ("preset", "dataset_hash", "steps", "batch_size", "episodes", "selection_episodes", "evaluations",
          "report_seed", "selection_seed")
# Relative cost per step, to start the longest runs first under --jobs (after the carried ones).
COST_PER_STEP = {"dt": 6.0, "dmm": 1.0, "dmamba": 1.0, "bc": 0.1}
UNRECORDED_CPU = "CPU not recorded (runs from before the bench recorded it)"
LAST_EVALUATIONS = 3  # the steadier score beside the last checkpoint: the mean of the last periodic evaluations


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the runs of a bench


def plan_runs(args) -> list[dict]:
    """Every run of the bench: name, kind, seed, steps (None for a dt-matched run: fixed when it starts)."""
    runs = []
    for kind in args.models:
        for seed in args.model_seeds.get(kind, args.seeds):
            runs.append({"name": f"{kind}-seed{seed}", "kind": kind, "seed": seed,
                         "steps": args.model_steps.get(kind, args.steps), "matched": False,
                         "device": args.model_device.get(kind, "cpu")})
    if args.matched:
        for seed in args.model_seeds.get("dt", args.seeds):
            runs.append({"name": f"{MATCHED}-seed{seed}", "kind": "dt", "seed": seed, "steps": None, "matched": True,
                         "device": args.model_device.get("dt", "cpu")})
    return runs


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_config(run: dict, steps: int, settings: dict) -> TrainConfig:
    return TrainConfig(
        preset=settings["preset"], model=run["kind"], dataset=settings["dataset_spec"], steps=steps,
        batch_size=settings["batch_size"], seed=run["seed"],
        eval_every=max(1, steps // settings["evaluations"]), eval_episodes=settings["selection_episodes"],
        report_episodes=settings["episodes"], checkpoint_every=settings["checkpoint_every"], device=run["device"],
        threads=torch.get_num_threads(),  # the bench's --threads, which main set: not the free cores
    )


def resume_step(run_dir: Path) -> int | None:
    """The step a run would continue from, or None before its first resume point."""
    # model.json is written last at each resume point (after resume.pt and model.pt).
    record = read_json(run_dir / MODEL_JSON) if (run_dir / RESUME_FILE).exists() else None
    return record["step"] if record else None


def seconds_per_step(run_dir: Path) -> float | None:
    """Training seconds per step of a run so far (evaluation left out), from its metrics."""
    timed = [r for r in read_metrics(run_dir) if "train_seconds" in r and r["step"] > 0]
    return timed[-1]["train_seconds"] / timed[-1]["step"] if timed else None


def matched_steps(out: Path, runs: list[dict]) -> int:
    """DMM's mean training seconds (every DMM run finished) over DT's seconds per step (its runs here).

    A wall time is a figure of one machine: where the DT runs trained on one CPU and some DMM runs trained on
    that CPU too, DMM's seconds are those runs' (a bench carried between machines mixes both otherwise)."""
    dmm = [run for run in runs if run["kind"] == "dmm" and not run["matched"]]
    devices = {run["device"] for run in runs if run["kind"] in ("dmm", "dt")}
    if len(devices) > 1:
        raise DMMError(f"a {MATCHED} run: DMM and DT train on {' and '.join(sorted(devices))} here",
                       "both on one device (a wall time on one is no budget on the other)",
                       "pass --no-matched, or the same --model-device to both")
    results = [read_json(out / run["name"] / RESULT_FILE) for run in dmm]
    if not dmm or any(result is None for result in results):
        missing = [run["name"] for run, result in zip(dmm, results, strict=True) if result is None]
        raise DMMError(f"a {MATCHED} run: DMM runs {', '.join(missing) or '(none)'} are not finished in {str(out)!r}",
                       "every DMM run of the bench finished first (it trains for DMM's wall time)",
                       "run them (and a DT run) before the dt-matched ones")
    dt_dirs = [out / run["name"] for run in runs if run["kind"] == "dt" and not run["matched"]]
    dt_speeds = [speed for speed in map(seconds_per_step, dt_dirs) if speed is not None]
    if not dt_speeds:
        raise DMMError(f"a {MATCHED} run: no DT run in {str(out)!r} has trained yet",
                       "a DT run started first (its first log records DT's seconds per step)", "start a DT run first")
    dt_cpus = {cpu for run_dir in dt_dirs for cpu in recorded_cpus(read_json(run_dir / DEVICES_FILE) or [])}
    same_machine = [result for result in results if len(dt_cpus) == 1 and result.get("cpus") == sorted(dt_cpus)]
    dmm_seconds = statistics.fmean(result["train_seconds"] for result in same_machine or results)
    return max(1, round(dmm_seconds / statistics.fmean(dt_speeds)))


def run_settings(run: dict, steps: int, settings: dict) -> dict:
    """A run's own settings: the bench's locked ones (its budget as bench_steps) and the run's steps."""
    bench = {("bench_steps" if name == "steps" else name): settings[name] for name in LOCKED}
    return {**bench, "name": run["name"], "kind": run["kind"], "seed": run["seed"], "steps": steps,
            "matched": run["matched"]}


def run_one(run: dict, runs: list[dict], settings: dict, out: Path, progress: bool) -> dict:
    """Train (or continue) one run and summarise it, unless its result.json exists; returns the result."""
    run_dir = out / run["name"]
    result = read_json(run_dir / RESULT_FILE)
    if result is not None:
        return check_result(result, run_dir)
    fixed = read_json(run_dir / RUN_FILE)
    steps = fixed["steps"] if fixed else run["steps"] if run["steps"] is not None else matched_steps(out, runs)
    expected = run_settings(run, steps, settings)
    if fixed is not None and fixed != expected:
        changed = sorted(name for name in expected if fixed.get(name) != expected[name])
        raise DMMError(f"run {str(run_dir)!r} with " + ", ".join(f"{n}={expected[n]!r}" for n in changed),
                       "the settings it was started with: " + ", ".join(f"{n}={fixed.get(n)!r}" for n in changed),
                       "pass the same settings to continue it, or another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(expected, run_dir / RUN_FILE)
    config = train_config(run, steps, settings)
    history = record_device(run_dir, run["device"])
    log(f"{run['name']}: training {steps} steps in {run_dir} on {run['device']}")
    train(config, run_dir, resume=(run_dir / RESUME_FILE).exists(), progress=progress)
    result = {**summarize_run(run_dir, expected), "devices": [entry["device"] for entry in history],
              "gpus": sorted({entry["gpu"] for entry in history if entry["gpu"]}), "cpus": recorded_cpus(history)}
    atomic_write_json(result, run_dir / RESULT_FILE)
    log(f"{run['name']}: last {result['last']:.1f}, best checkpoint {result['best']:.1f} (step {result['best_step']}), "
        f"official {result['official']:.1f}; {result['ms_per_step']:.1f} ms/step")
    return result


def record_device(run_dir: Path, device: str) -> list[dict]:
    """Add ``device`` (with the GPU's name, and the CPU's, read here, where the run trains on it) to the devices a
    run has trained on, and return them all (a run may move: begun on a CPU, ended on a GPU of another machine).
    The CPU is named for every device: a run's ms/step is a figure of the machine it trained on."""
    history = read_json(run_dir / DEVICES_FILE) or []
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    entry = {"device": device, "gpu": gpu, "cpu": cpu_model()}
    if entry not in history:
        history = [*history, entry]
        atomic_write_json(history, run_dir / DEVICES_FILE)
    return history


def recorded_cpus(history: list[dict]) -> list[str]:
    """The CPUs a run trained on, as its device history names them (runs from before CPUs were recorded: none)."""
    return sorted({entry["cpu"] for entry in history if entry.get("cpu")})


def summarize_run(run_dir: Path, settings: dict) -> dict:
    """A finished run's three scores and cost, from its metrics.jsonl, best.json and model.json."""
    records = read_metrics(run_dir)
    evaluations = [r for r in records if "report" in r]
    steps = settings["steps"]
    if not evaluations or evaluations[-1]["step"] != steps:
        raise DMMError(f"run {str(run_dir)!r}: no report evaluation at its last step {steps}",
                       "a run trained by this bench", "delete the run directory to retrain it")
    best_record = read_json(run_dir / "best.json")
    best_step = best_record["step"]
    at_best = next(r for r in evaluations if r["step"] == best_step)
    official_record, official_target = max(
        ((record, target) for record in evaluations for target in record["report"]),
        key=lambda pair: pair[1]["normalized_mean"],
    )
    timed = [r for r in records if "train_seconds" in r]
    train_seconds = timed[-1]["train_seconds"]
    eval_seconds = sum(r.get("eval_seconds", 0.0) for r in records)
    model = read_json(run_dir / MODEL_JSON)
    return {
        "format": RESULT_FORMAT, **settings,
        "params": model["n_params"], "context_len": model["model_config"]["context_len"],
        "train_seconds": train_seconds, "eval_seconds": eval_seconds, "ms_per_step": 1e3 * train_seconds / steps,
        "first_target": evaluations[-1]["report"][0]["target_return"],
        "last": evaluations[-1]["report"][0]["normalized_mean"],
        "best": at_best["report"][0]["normalized_mean"], "best_step": best_step,
        "best_selection_score": best_record["selection"]["normalized_mean"],
        "official": official_target["normalized_mean"], "official_step": official_record["step"],
        "official_target": official_target["target_return"],
        "evaluations": [{"step": r["step"], "selection": r.get("normalized_mean"),
                         "report": [{"target_return": t["target_return"], "normalized_mean": t["normalized_mean"]}
                                    for t in r["report"]]}
                        for r in evaluations],
    }


def check_result(result: dict, run_dir: Path) -> dict:
    if result.get("format") != RESULT_FORMAT:
        raise DMMError(f"{str(run_dir / RESULT_FILE)!r} format {result.get('format')} (an older bench's)",
                       f"format {RESULT_FORMAT}", "use another --out for this bench")
    return result


def run_status(run: dict, run_dir: Path) -> str:
    """One line on where a run stands: finished (its scores), running now (in which process), at step N of M
    (what carries it on), not started."""
    result = read_json(run_dir / RESULT_FILE)
    if result is not None:
        return (f"{run['name']:<18} finished: {result['steps']:,} steps, last {result['last']:.1f}, best ckpt "
                f"{result['best']:.1f}, official {result['official']:.1f}")
    fixed = read_json(run_dir / RUN_FILE)
    steps = fixed["steps"] if fixed else run["steps"]
    budget = f"{steps:,} steps" if steps is not None else "DMM's wall time of steps"
    done = resume_step(run_dir)
    holder = lock_holder(run_dir)
    if holder is not None:
        where = f"at step {done:,}" if done is not None else "before its first resume point"
        return f"{run['name']:<18} running now (process {holder}), {where} of {budget}"
    if done is None:
        return f"{run['name']:<18} not started ({budget})"
    speed = seconds_per_step(run_dir)
    left = f", about {duration(speed * (steps - done))} of training left at its speed so far" if speed and steps else ""
    return (f"{run['name']:<18} at step {done:,} of {budget}{left}; continues from {RESUME_FILE} (carry it, "
            f"with best.pt and the JSON records, to continue elsewhere)")


# --------------------------------------------------------------------------- the table


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: list[dict], kinds: list[str]) -> list[dict]:
    """One row per kind (and one for the dt-matched runs) with at least one finished run."""
    rows = []
    groups = [(kind, False) for kind in kinds] + [("dt", True)]
    for kind, matched in groups:
        runs = sorted((r for r in results if r["kind"] == kind and r["matched"] == matched), key=lambda r: r["seed"])
        if not runs:
            continue
        # Runs from before devices were recorded trained on the CPU.
        devices = sorted({device for r in runs for device in r.get("devices") or ["cpu"]})
        gpus = sorted({gpu for r in runs for gpu in r.get("gpus", [])})
        name = DISPLAY_NAMES[kind] + (" (DMM's wall time)" if matched else "")
        if devices != ["cpu"]:
            name += f" [{' + '.join(devices)}: {', '.join(gpus)}]" if gpus else f" [{' + '.join(devices)}]"
        rows.append({
            "kind": kind, "matched": matched, "name": name, "label": DISPLAY_NAMES[kind], "devices": devices,
            "params": runs[0]["params"],
            "context_len": runs[0]["context_len"], "steps": sorted({r["steps"] for r in runs}),
            "seeds": [r["seed"] for r in runs], "runs": runs,
            "ms_per_step": statistics.fmean(r["ms_per_step"] for r in runs),
            "hours": statistics.fmean(r["train_seconds"] + r["eval_seconds"] for r in runs) / 3600,
            "last": mean_std([r["last"] for r in runs]),
            "last3": mean_std([last_evaluations_mean(r) for r in runs]),
            "best": mean_std([r["best"] for r in runs]),
            "official": mean_std([r["official"] for r in runs]),
        })
    return rows


def last_evaluations_mean(result: dict, count: int = LAST_EVALUATIONS) -> float:
    """The mean of a run's last ``count`` periodic report scores at the first target (its last alone when the
    result holds no evaluations): a steadier figure than the last checkpoint where scores swing."""
    scores = [e["report"][0]["normalized_mean"] for e in result.get("evaluations") or []][-count:]
    return statistics.fmean(scores) if scores else result["last"]


def difference_interval(ours: list[float], theirs: list[float]) -> dict | None:
    """Mean of ``ours`` minus mean of ``theirs`` with a 95% Welch t interval over seeds.

    A side with one seed has no spread of its own: it is taken to spread as much as the other side
    (a t interval on the other side's n - 1 degrees of freedom), and the record says so. None when
    both sides have one seed: no interval can be drawn.
    """
    n_ours, n_theirs = len(ours), len(theirs)
    if n_ours < 2 and n_theirs < 2:
        return None
    difference = statistics.fmean(ours) - statistics.fmean(theirs)
    if n_ours > 1 and n_theirs > 1:
        var_ours, var_theirs = statistics.variance(ours) / n_ours, statistics.variance(theirs) / n_theirs
        spread = var_ours + var_theirs
        # Welch-Satterthwaite; two sides with no spread at all keep the pooled count
        denominator = var_ours ** 2 / (n_ours - 1) + var_theirs ** 2 / (n_theirs - 1)
        df = spread ** 2 / denominator if denominator else n_ours + n_theirs - 2
        method = "Welch's t over seeds"
    else:
        several = ours if n_ours > 1 else theirs
        spread = statistics.variance(several) * (1 / n_ours + 1 / n_theirs)
        df = len(several) - 1
        method = "t over seeds, the one-seed side assumed to spread as the other"
    half = student_t_quantile(0.975, df) * math.sqrt(spread)  # Student's t holds for a fractional df too
    low, high = difference - half, difference + half
    word = "ahead" if low > 0 else "behind" if high < 0 else "level"
    return {"difference": difference, "low": low, "high": high, "df": df, "method": method, "word": word}


def comparisons(rows: list[dict]) -> list[dict]:
    """DMM against every other row: the difference of the last-checkpoint means (and of the means of the
    last evaluations) with its 95% interval, and the word the interval gives."""
    dmm = next((row for row in rows if row["kind"] == "dmm" and not row["matched"]), None)
    if dmm is None:
        return []
    found = []
    for row in rows:
        if row is dmm:
            continue
        found.append({"against": row["name"], "seeds": (len(dmm["seeds"]), len(row["seeds"])),
                      "last": difference_interval([r["last"] for r in dmm["runs"]], [r["last"] for r in row["runs"]]),
                      "last3": difference_interval([last_evaluations_mean(r) for r in dmm["runs"]],
                                                   [last_evaluations_mean(r) for r in row["runs"]])})
    return found


def interval_cell(interval: dict | None) -> str:
    if interval is None:
        return "one seed each: no interval, no word"
    return (f"{interval['difference']:+.1f} (95% interval {interval['low']:+.1f} .. {interval['high']:+.1f}): "
            f"**{interval['word']}**")


def comparison_lines(rows: list[dict]) -> list[str]:
    """The section's comparison bullets, one per baseline."""
    lines = []
    for found in comparisons(rows):
        methods = sorted({i["method"] for i in (found["last"], found["last3"]) if i is not None})
        ours, theirs = found["seeds"]
        lines.append(f"- DMM − {found['against']} ({ours} against {theirs} seed{'s' if theirs > 1 else ''}): "
                     f"last checkpoint {interval_cell(found['last'])}; mean of the last {LAST_EVALUATIONS} "
                     f"evaluations {interval_cell(found['last3'])}" + (f"; {methods[0]}" if methods else ""))
    return lines


def quality_line(rows: list[dict], dataset_id: str, steps: int) -> str:
    """The section's last line: last-checkpoint means, a kind with fewer steps labelled with its own.

    N is the fewest seeds among the models the table compares with several seeds (DT may have one
    by design), so a table with runs still to finish never claims more seeds than a model has.
    """
    main = [row for row in rows if not row["matched"]]
    seeded = [row for row in main if row["kind"] != "dt"] or main
    seeds = min((len(row["seeds"]) for row in seeded), default=0)

    def label(row: dict) -> str:
        own = max(row["steps"])
        return row["label"] if own >= steps else f"{row['label']}@{own}"

    scores = " ".join(f"{label(row)}={row['last'][0]:.1f}" for row in main)
    seed_count = f"{seeds} seed" + ("" if seeds == 1 else "s")
    return f"quality on {dataset_id} @ {steps} steps (last checkpoint, {seed_count}): {scores}"


def section_markers(dataset_id: str, steps: int) -> tuple[str, str]:
    """(begin, end) of the section of one dataset at one budget (benches side by side in one file)."""
    return f"{BEGIN} {dataset_id} @ {steps} -->", f"{END} {dataset_id} @ {steps} -->"


def cpu_model() -> str:
    """This machine's CPU as /proc/cpuinfo names it (the platform's word for it elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(threads: int, jobs: int) -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu_model()}, {cpus} CPUs, torch {torch.__version__} on {threads} thread(s) per run, up to {jobs} "
            f"run(s) at once, Python {platform.python_version()}")


def machines_line(results: list[dict], machine: str) -> str:
    """Where the table's costs were measured: this machine when every run trained here, else each CPU with
    the runs it trained (a run's ms/step and hours are figures of its own machine)."""
    by_cpu: dict[str, list[str]] = {}
    for result in results:
        for cpu in result.get("cpus") or [UNRECORDED_CPU]:
            by_cpu.setdefault(cpu, []).append(result["name"])
    here = cpu_model()
    if set(by_cpu) == {here}:
        return f"- Machine: {machine}"
    trained = "; ".join(f"{cpu}: {', '.join(names)}" for cpu, names in by_cpu.items())
    return (f"- Machines: each run's ms/step and hours were measured on the machine it trained on (a row whose "
            f"runs trained on different CPUs mixes them): {trained}. Table written on: {machine}")


def duration(seconds: float) -> str:
    """A wall time as it reads best: 42 s, 12.5 min, 3.2 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 2 * 3600 else f"{seconds / 3600:.1f} h"


def score_cell(mean_and_std: tuple[float, float], seeds: int) -> str:
    """"mean ± std" over several seeds; one seed has no spread to show."""
    mean, std = mean_and_std
    return f"{mean:.1f} ± {std:.1f}" if seeds > 1 else f"{mean:.1f} (one seed)"


def steps_cell(steps: list[int]) -> str:
    return " / ".join(f"{s:,}" for s in steps)


def render_section(rows: list[dict], settings: dict, command: str, machine: str, missing: list[str]) -> str:
    begin, end = section_markers(settings["dataset_id"], settings["steps"])
    preset = get_preset(settings["preset"])
    first = f"{preset.target_returns[0]:g}"
    targets = ", ".join(f"{t:g}" for t in preset.target_returns)
    episodes, selection = settings["episodes"], settings["selection_episodes"]
    lines = [
        begin,
        f"## Quality: DMM and its baselines on {settings['dataset_id']} at {settings['steps']:,} steps",
        "",
        f"- Command: `{command}`",
        machines_line([run for row in rows for run in row["runs"]], machine),
        f"- Dataset: {settings['dataset_id']} ({settings['dataset_episodes']} episodes, "
        f"{settings['dataset_steps']:,} steps, content hash {settings['dataset_hash'][:12]}), env {preset.env_id}",
        f"- Training: {settings['steps']:,} steps per run"
        + (" (the official budget)" if settings["steps"] >= OFFICIAL_STEPS else
           f" (below the official {OFFICIAL_STEPS:,})")
        + " unless the steps column says otherwise; the same trainer for all: AdamW lr 1e-4, weight decay 1e-4, "
        "linear warmup min(10,000, 10% of the run's steps), grad clip 0.25, batch "
        f"{settings['batch_size']}, the official sampler; K (timesteps per window) per model as in the table.",
        f"- Evaluation, official sliding-window protocol, D4RL-normalised, at {settings['evaluations']} periodic "
        f"checkpoints of each run (every steps / {settings['evaluations']}, the last at the final step): report "
        f"episodes {episodes} per target at {targets} on env seeds {REPORT_EVAL_SEED} + i (the same for every run); "
        f"selection episodes {selection} at {first} on env seeds {SELECTION_EVAL_SEED} + i (disjoint from the "
        "report seeds) choose best.pt.",
        f"- Scores: **last** = the final checkpoint @ {first} (the honest number); **best ckpt** = best.pt (chosen "
        f"on the selection episodes) @ {first} on the report episodes; **official** = the maximum over the targets "
        f"and the {settings['evaluations']} periodic checkpoints on the report episodes, as the official script "
        f"reports it (optimistic: chosen on the episodes it reports); **last {LAST_EVALUATIONS} evals** = the mean "
        f"of the last {LAST_EVALUATIONS} periodic checkpoints @ {first} on the report episodes (steadier where "
        "scores swing between checkpoints). Mean ± sample std over seeds.",
        "- Cost: ms/step = training wall time without evaluation / steps; hours per run = training plus "
        "evaluation, mean over seeds. DT (DMM's wall time) trains for DMM's mean training seconds: DMM's "
        "seconds (those of the DMM runs on DT's CPU, where there are such runs) over DT's seconds per step, both "
        "measured in this bench's runs.",
    ]
    if any(row["devices"] != ["cpu"] for row in rows):
        lines.append("- Devices: every row trained on the machine's CPU unless its name says otherwise: [cuda: GPU] "
                     "trained on that GPU; [cpu + cuda] moved between them, so its ms/step mixes both.")
    if missing:
        lines.append(f"- Partial: not finished and left out: {', '.join(missing)}")
    lines += [
        "",
        f"| model | params | K | steps | seeds | ms/step | hours per run | last @ {first} | "
        f"last {LAST_EVALUATIONS} evals @ {first} | best ckpt @ {first} | official (max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        seeds = len(row["seeds"])
        lines.append(
            f"| {row['name']} | {row['params']:,} | {row['context_len']} | {steps_cell(row['steps'])} | {seeds} | "
            f"{row['ms_per_step']:.1f} | {row['hours']:.2f} | {score_cell(row['last'], seeds)} | "
            f"{score_cell(row['last3'], seeds)} | {score_cell(row['best'], seeds)} | "
            f"{score_cell(row['official'], seeds)} |"
        )
    lines += ["", "Per seed, last / best ckpt / official:", "", "| model | per seed |", "|---|---|"]
    for row in rows:
        cells = "; ".join(f"seed {r['seed']}: {r['last']:.1f} / {r['best']:.1f} / {r['official']:.1f}"
                          for r in row["runs"])
        lines.append(f"| {row['name']} | {cells} |")
    compared = comparison_lines(rows)
    if compared:
        lines += ["", "DMM against each baseline: the difference of the means over seeds with a 95% interval; "
                  "**ahead** or **behind** only where the whole interval lies above or below zero, else **level**:",
                  "", *compared]
    lines += ["", quality_line(rows, settings["dataset_id"], settings["steps"]), end]
    return "\n".join(lines) + "\n"


def update_benchmarks(path: Path, section: str, markers: tuple[str, str]) -> None:
    """Replace the text between the markers in ``path`` (or append the section); the rest is kept."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(markers[0]) + r".*?" + re.escape(markers[1]) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_bytes(path, text.encode())


# --------------------------------------------------------------------------- driver


def bench_settings(args, dataset, dataset_spec: str) -> dict:
    return {
        "dataset_id": dataset.dataset_id, "dataset_hash": dataset.content_hash,
        "dataset_spec": dataset_spec, "dataset_episodes": len(dataset.episodes),
        "dataset_steps": dataset.total_steps, **option_settings(args),
    }


def option_settings(args) -> dict:
    """The settings the options give (the rest describe the dataset)."""
    return {
        "preset": args.preset, "steps": args.steps, "batch_size": args.batch_size,
        "episodes": args.episodes, "selection_episodes": args.selection_episodes, "evaluations": args.evaluations,
        "report_seed": REPORT_EVAL_SEED, "selection_seed": SELECTION_EVAL_SEED,
        "checkpoint_every": args.checkpoint_every,
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
            raise DMMError(f"bench directory {str(out)!r} with {received}", f"the settings of its runs: {expected}",
                           "pass the same settings to continue it, or another --out for a new bench")
        if saved == settings:
            return  # several --run commands share the directory: leave the file alone
    atomic_write_json(settings, path)


def kind_values(pairs: list[str], option: str, parse) -> dict:
    """``KIND=VALUE`` options (repeatable) as {kind: parsed value}."""
    values = {}
    for pair in pairs:
        kind, _, value = pair.partition("=")
        if kind not in MODEL_KINDS or not value:
            raise DMMError(f"{option} {pair}", f"KIND=VALUE with KIND among {', '.join(MODEL_KINDS)}",
                           f"pass {option} KIND=VALUE")
        try:
            values[kind] = parse(value)
        except ValueError:
            raise DMMError(f"{option} {pair}", "a number after '=' (seeds: comma-separated)",
                           f"pass {option} KIND=NUMBER") from None
    return values


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None,
                        help="Minari id or dataset directory (default: the preset's embedded medium dataset)")
    parser.add_argument("--preset", default="hopper", help="environment preset (default hopper)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_KINDS),
                        help=f"model kinds (default: {' '.join(DEFAULT_KINDS)})")
    parser.add_argument("--steps", type=int, default=OFFICIAL_STEPS,
                        help=f"training steps per run (default: the official {OFFICIAL_STEPS})")
    parser.add_argument("--model-steps", action="append", default=[], metavar="KIND=STEPS",
                        help="another budget for one kind (repeatable), e.g. dt=30000")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--model-seeds", action="append", default=[], metavar="KIND=S,S",
                        help="other seeds for one kind (repeatable), e.g. dt=0")
    parser.add_argument("--model-device", action="append", default=[], metavar="KIND=DEVICE",
                        help="train one kind on another torch device (repeatable), e.g. dt=cuda; the table says so")
    parser.add_argument("--no-matched", dest="matched", action="store_false",
                        help="no compute-matched DT runs (default: with them when dmm and dt are both benched)")
    parser.add_argument("--episodes", type=int, default=10,
                        help=f"report episodes per target and periodic checkpoint (seeds {REPORT_EVAL_SEED} + i; "
                             "default 10)")
    parser.add_argument("--selection-episodes", type=int, default=10,
                        help=f"episodes choosing best.pt, first target (seeds {SELECTION_EVAL_SEED} + i; default 10)")
    parser.add_argument("--evaluations", type=int, default=10,
                        help="periodic checkpoints evaluated per run (every steps / N; default 10)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--checkpoint-every", type=int, default=1000,
                        help="steps between resumable checkpoints (default 1000)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"one run directory per run (default {DEFAULT_OUT}/<dataset>-<steps>steps)")
    parser.add_argument("--benchmarks", type=Path, default=BENCHMARKS,
                        help="markdown file whose quality section is (re)written (default BENCHMARKS.md)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch (and scan kernel) threads per run (default 1: the machine is shared)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once on this machine (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no training progress lines")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--report-only", action="store_true",
                      help="train nothing: write the section from the runs already finished (naming the others)")
    mode.add_argument("--print-commands", nargs="?", const="all", choices=("all", "independent", "matched"),
                      help="print one resumable command per run for a scheduler (default all: the independent runs, "
                           "then the dt-matched ones, which must start after the DMM and DT runs)")
    mode.add_argument("--status", action="store_true",
                      help="train nothing: say where each run stands (finished, at step N of M, not started)")
    mode.add_argument("--run", action="append", default=None, metavar="NAME",
                      help="train (or continue) only this run (repeatable, --jobs of them at once), e.g. dmm-seed0; "
                           "no table is written")
    args = parser.parse_args(argv)
    unknown = [kind for kind in args.models if kind not in MODEL_KINDS]
    if unknown or len(set(args.models)) != len(args.models):
        raise DMMError(f"--models {' '.join(args.models)}", f"distinct kinds among {', '.join(MODEL_KINDS)}",
                       "name each kind once, from that list")
    if len(set(args.seeds)) != len(args.seeds):
        raise DMMError(f"--seeds {' '.join(map(str, args.seeds))}", "distinct seeds", "name each seed once")
    for name in ("steps", "episodes", "selection_episodes", "evaluations", "threads", "jobs", "batch_size",
                 "checkpoint_every"):
        if getattr(args, name) < 1:
            raise DMMError(f"--{name.replace('_', '-')} {getattr(args, name)}", "a positive integer",
                           f"pass --{name.replace('_', '-')} 1 or more")
    if max(args.episodes, args.selection_episodes) > MAX_EVAL_EPISODES:
        raise DMMError(f"--episodes {args.episodes}, --selection-episodes {args.selection_episodes}",
                       f"at most {MAX_EVAL_EPISODES} each (the report and selection seed ranges stay disjoint)",
                       f"pass --episodes and --selection-episodes {MAX_EVAL_EPISODES} or fewer")
    args.model_steps = kind_values(args.model_steps, "--model-steps", int)
    args.model_seeds = kind_values(args.model_seeds, "--model-seeds",
                                   lambda text: [int(seed) for seed in text.split(",")])
    args.model_device = kind_values(args.model_device, "--model-device", str)
    bad = {kind: device for kind, device in args.model_device.items() if not re.fullmatch(r"cpu|cuda(:\d+)?", device)}
    if bad:
        raise DMMError(f"--model-device {', '.join(f'{k}={v}' for k, v in bad.items())}", "cpu, cuda or cuda:N",
                       "pass --model-device KIND=cpu, KIND=cuda or KIND=cuda:N")
    if any(steps < 1 for steps in args.model_steps.values()):
        raise DMMError(f"--model-steps {args.model_steps}", "positive step counts", "pass --model-steps KIND=1 or more")
    args.matched = args.matched and "dmm" in args.models and "dt" in args.models
    return args


def run_command(args, name: str) -> list[str]:
    """The command that trains (or continues) run ``name`` with every setting of this bench spelled out."""
    # The embedded default by its id, which the local store now holds: the commands never generate it
    # concurrently.
    command = ["python", "bench/quality.py", "--dataset", args.dataset if args.dataset is not None else args.dataset_id]
    command += ["--preset", args.preset, "--models", *args.models, "--steps", str(args.steps),
                "--seeds", *map(str, args.seeds)]
    for kind, steps in sorted(args.model_steps.items()):
        command += ["--model-steps", f"{kind}={steps}"]
    for kind, seeds in sorted(args.model_seeds.items()):
        command += ["--model-seeds", f"{kind}={','.join(map(str, seeds))}"]
    for kind, device in sorted(args.model_device.items()):
        command += ["--model-device", f"{kind}={device}"]
    if not args.matched and "dmm" in args.models and "dt" in args.models:
        command.append("--no-matched")
    command += ["--episodes", str(args.episodes), "--selection-episodes", str(args.selection_episodes),
                "--evaluations", str(args.evaluations), "--batch-size", str(args.batch_size),
                "--checkpoint-every", str(args.checkpoint_every), "--out", str(args.out),
                "--threads", str(args.threads), "--run", name]
    return command


def start_order(runs: list[dict], out: Path) -> list[dict]:
    """The order --jobs starts ``runs`` in: the carried ones (a resume point, no result yet) first, then
    the rest; the most work left first within each.

    A sweep that spans machines or sessions is restarted with runs half done: finishing those first
    turns their hours into table rows soonest, where longest-first alone would start a fresh DT run
    (the costliest) and leave a nearly finished DMM run waiting behind it.
    """
    def key(run: dict) -> tuple[bool, float]:
        run_dir = out / run["name"]
        done = None if (run_dir / RESULT_FILE).exists() else resume_step(run_dir)
        carried = done is not None
        return not carried, -COST_PER_STEP[run["kind"]] * max(0, (run["steps"] or 0) - (done or 0))
    return sorted(runs, key=key)


def failed_runs_error(failed: list[str], out: Path) -> DMMError:
    return DMMError(f"runs {', '.join(failed)}: failed", "every run to finish",
                    f"see their {LOG_FILE} under {out} and start the bench again to continue them")


def run_jobs(args, runs: list[dict]) -> list[str]:
    """Run ``runs`` as child commands, ``args.jobs`` at a time; returns the names of those that failed."""
    pending = start_order(runs, args.out)
    running: dict[str, tuple[subprocess.Popen, Path]] = {}
    failed = []
    root = Path(__file__).resolve().parent.parent
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    while pending or running:
        while pending and len(running) < args.jobs:
            run = pending.pop(0)
            log_path = args.out / run["name"] / LOG_FILE
            log_path.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, *run_command(args, run["name"])[1:]]
            with open(log_path, "ab") as output:
                running[run["name"]] = (subprocess.Popen(command, cwd=root, env=environment, stdout=output,
                                                         stderr=subprocess.STDOUT), log_path)
            log(f"started {run['name']} (log {log_path})")
        time.sleep(0.5)
        for name, (process, log_path) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            if process.returncode != 0:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                log(f"{name} failed (exit {process.returncode}): {tail[0]}")
                failed.append(name)
            else:
                log(f"finished {name}")
    return failed


def main(argv: list[str] | None = None) -> str | None:
    """Run (or continue) the bench; returns the quality line (stdout's last line), or None for --run,
    --print-commands and --status."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # the fused scan kernel follows torch's thread count

    recorded = read_json(args.out / SETTINGS_FILE) if args.report_only and args.out is not None else None
    if recorded is not None:
        # A table needs only what the bench recorded of its dataset: nothing to regenerate or download.
        settings = {**recorded, **option_settings(args)}
    else:
        # The preset's own medium dataset by default: walker2d and halfcheetah never train on Hopper's data.
        dataset_spec = args.dataset if args.dataset is not None else str(ensure_default_dataset(args.preset))
        dataset = load_dataset(dataset_spec)
        preset = get_preset(args.preset)
        check_dims(f"dataset {dataset.dataset_id!r}", (dataset.state_dim, dataset.act_dim),
                   (preset.state_dim, preset.act_dim), f"preset {preset.name!r}",
                   "pass the --preset of the dataset's environment")
        settings = bench_settings(args, dataset, dataset_spec)
    dataset_id = args.dataset_id = settings["dataset_id"]
    if args.out is None:
        # One folder per dataset and budget: a 10k-step bench never meets the runs of a 100k-step one.
        args.out = DEFAULT_OUT / f"{dataset_id.replace('/', '--')}-{args.steps}steps"
    runs = plan_runs(args)
    by_name = {run["name"]: run for run in runs}

    if args.print_commands:
        chosen = [run for run in runs if args.print_commands == "all"
                  or run["matched"] == (args.print_commands == "matched")]
        for run in chosen:
            print(shlex.join(run_command(args, run["name"])))
        return None

    if args.status:
        for run in runs:
            print(run_status(run, args.out / run["name"]))
        return None

    args.out.mkdir(parents=True, exist_ok=True)
    check_settings(args.out, settings)
    if args.run:
        unknown = [name for name in args.run if name not in by_name]
        if unknown:
            raise DMMError(f"--run {' '.join(unknown)}", f"runs of this bench: {', '.join(by_name)}",
                           "pass names that --print-commands lists")
        if args.jobs > 1 and len(args.run) > 1:  # several chosen runs, --jobs of them at once
            failed = run_jobs(args, [by_name[name] for name in dict.fromkeys(args.run)])
            if failed:
                raise failed_runs_error(failed, args.out)
            return None
        for name in args.run:
            run_one(by_name[name], runs, settings, args.out, progress=not args.quiet)
        return None

    def write_table() -> tuple[list[dict], list[str]]:
        results, missing = [], []
        for run in runs:
            result = read_json(args.out / run["name"] / RESULT_FILE)
            if result is None:
                missing.append(run["name"])
            else:
                results.append(check_result(result, args.out / run["name"]))
        rows = summarize(results, args.models)
        if rows:
            section = render_section(rows, settings, command, machine, missing)
            update_benchmarks(args.benchmarks, section, section_markers(dataset_id, args.steps))
        return rows, missing

    command = "python bench/quality.py" + ("" if not argv else " " + shlex.join(argv))
    machine = machine_description(args.threads, args.jobs)
    failed = []
    if not args.report_only:
        independent = [run for run in runs if not run["matched"]]
        matched = [run for run in runs if run["matched"]]
        if args.jobs > 1:
            failed += run_jobs(args, independent)
            write_table()
            failed += run_jobs(args, matched)
        else:
            for run in independent + matched:  # seeds outermost within a kind; dt-matched ones last
                run_one(run, runs, settings, args.out, progress=not args.quiet)
                write_table()
    rows, missing = write_table()
    if not rows:
        raise DMMError(f"--report-only: no finished run under {args.out} (missing: {', '.join(missing)})",
                       "at least one finished run", "run the bench without --report-only first")
    if missing:
        log(f"not finished, left out of the table: {', '.join(missing)}")
    for row in rows:
        seeds = len(row["seeds"])
        print(f"{row['name']:<22} steps {steps_cell(row['steps']):>9}  {row['ms_per_step']:6.1f} ms/step  "
              f"last {score_cell(row['last'], seeds)}  best ckpt {score_cell(row['best'], seeds)}  "
              f"official {score_cell(row['official'], seeds)}" + (f"  ({seeds} seeds)" if seeds > 1 else ""))
    for compared in comparison_lines(rows):
        print(compared.replace("**", ""))
    print(f"wrote the quality section of {args.benchmarks}")
    if failed:
        raise failed_runs_error(failed, args.out)
    line = quality_line(rows, dataset_id, args.steps)
    print(line)
    return line


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DMMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
