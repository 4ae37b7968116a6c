"""The Python steps of bench/gpu_check.sh, one subcommand each, every one writing its record to
OUT/steps/NAME.json (the shell script runs them under their own time budgets and then ``summary``).

    env       what this machine has: nvidia-smi's GPUs, the CUDA driver, torch and its CUDA, nvcc;
              exit 3 when no GPU answers (the GPU steps then report "no GPU")
    wheels    whether a wheel folder (scripts/download_gpu_wheels.sh) holds what the offline installs need
    doctor    ``cli.py doctor``'s environment record, seeing what the earlier steps installed
    training  ms per training step with ``--device cuda`` against the CPU, for DMM and the baselines: the
              trainer's own step (`dmm_train.train.train_step`: sampler, forward, masked loss, backward, clip,
              fused AdamW) on a synthetic Hopper-shaped dataset, so that no dataset, gymnasium or MuJoCo is needed
    latency   the PyTorch backend's ``Policy.act`` latency on the GPU without and with CUDA-graph replay
              against the CPU, teacher-forced along one synthetic trajectory, with the largest action difference
    record    a record the shell script writes for a step of its own (the pycuda build, the installs, the tests)
    summary   OUT/summary.json and OUT/summary.md from every step's record

Needs PyTorch (a CUDA build for the GPU figures) and numpy only. Exit 0: done; 3: no GPU (the step says
so in its record); 2: a DMMError (one line on stderr).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from contract.errors import DMMError
from contract.files import atomic_write_json, atomic_write_text

MODELS = ("dmm", "dmamba", "dt", "bc")
WARMUP_STEPS = 10  # training steps left out of the timing (CUDA context, cuBLAS handles, allocator)
PRESET = "hopper"
SEED = 0
NO_GPU = 3  # exit status of a step that found no GPU
STATUSES = ("ok", "no GPU", "skipped", "failed", "timed out")
# What each step's wheel needs from a folder of scripts/download_gpu_wheels.sh, by file-name prefix.
WHEEL_NEEDS = {"pycuda": ("pycuda-", ".tar.gz"), "setuptools": ("setuptools-", ".whl"), "wheel": ("wheel-", ".whl"),
               "numpy": ("numpy-", ".whl"), "pytools": ("pytools-", ".whl"), "platformdirs": ("platformdirs-", ".whl"),
               "mako": ("mako-", ".whl"), "pytest": ("pytest-", ".whl")}


def step_path(out: Path, name: str) -> Path:
    return Path(out) / "steps" / f"{name}.json"


def write_record(out: Path, name: str, status: str, detail: str, **extra) -> dict:
    if status not in STATUSES:
        raise DMMError(f"step status {status!r}", f"one of {', '.join(STATUSES)}", "record one of those statuses")
    record = {"step": name, "status": status, "detail": detail, **extra}
    step_path(out, name).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, step_path(out, name))
    return record


# -- env ----------------------------------------------------------------------------------------


def driver_cuda_version() -> tuple[int, str]:
    """(version number, what answered) of the CUDA driver through libcuda itself; 0 when there is none."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        return 0, "libcuda.so.1 not found" if "No such file" in str(error) else f"libcuda.so.1: {error}"
    version = ctypes.c_int(0)
    status = libcuda.cuDriverGetVersion(ctypes.byref(version))
    if status != 0:
        return 0, f"cuDriverGetVersion returned {status}"
    return int(version.value), "libcuda"


def decode_cuda_version(number: int) -> str | None:
    """12080 -> "12.8"; 0 (no driver) -> None."""
    return f"{number // 1000}.{number % 1000 // 10}" if number > 0 else None


def _run(command: list[str], timeout: float = 20) -> str | None:
    """stdout of ``command``, or None when it is not there or fails."""
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def probe_machine() -> dict:
    """What the GPU steps need, without raising: nvidia-smi, the driver, torch, nvcc."""
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    number, driver_source = driver_cuda_version()
    nvcc = shutil.which("nvcc")
    nvcc_version = _run(["nvcc", "--version"]) if nvcc else None
    record: dict = {"python": platform.python_version(), "executable": sys.executable, "machine": platform.machine(),
                    "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                    "nvidia_smi": smi.splitlines() if smi else None, "driver_cuda": decode_cuda_version(number),
                    "driver_source": driver_source, "nvcc": nvcc,
                    "nvcc_version": nvcc_version.splitlines()[-1] if nvcc_version else None,
                    "cuda_root": str(Path(nvcc).resolve().parent.parent) if nvcc else None}
    try:
        import torch

        record["torch"] = torch.__version__
        record["torch_cuda"] = torch.version.cuda
        record["torch_sees_gpu"] = bool(torch.cuda.is_available())
        if record["torch_sees_gpu"]:
            properties = torch.cuda.get_device_properties(0)
            record["gpu"] = (f"{torch.cuda.get_device_name(0)} (compute capability {properties.major}."
                             f"{properties.minor}, {properties.total_memory >> 30} GiB)")
    except ImportError as error:
        record.update(torch=None, torch_cuda=None, torch_sees_gpu=False, torch_error=str(error).splitlines()[0])
    record["has_gpu"] = bool(number > 0 and record["torch_sees_gpu"])
    return record


def no_gpu_reason(machine: dict) -> str:
    """Why the GPU steps cannot run here, in one clause."""
    if machine["driver_cuda"] is None:
        return f"no GPU: no CUDA driver ({machine['driver_source']})"
    if machine.get("torch") is None:
        return "no GPU for torch: torch is not installed in this Python"
    build = "a CPU build" if machine["torch_cuda"] is None else f"built for CUDA {machine['torch_cuda']}"
    return f"no GPU for torch {machine['torch']} ({build}) with CUDA driver {machine['driver_cuda']}"


def step_env(args) -> int:
    machine = probe_machine()
    atomic_write_json(machine, Path(args.out) / "machine.json")
    if machine["has_gpu"]:
        detail = f"{machine.get('gpu')}, CUDA driver {machine['driver_cuda']}, torch {machine['torch']}"
        write_record(args.out, "env", "ok", detail, machine=machine)
        print(detail)
        return 0
    write_record(args.out, "env", "no GPU", no_gpu_reason(machine), machine=machine)
    print(no_gpu_reason(machine))
    return NO_GPU


# -- wheels -------------------------------------------------------------------------------------


def missing_wheels(folder: Path, python_tag: str) -> list[str]:
    """The requirements a wheel folder lacks for this Python (a binary wheel must be for its cpXY)."""
    names = [path.name for path in Path(folder).iterdir()] if Path(folder).is_dir() else []
    missing = []
    for requirement, (prefix, suffix) in WHEEL_NEEDS.items():
        found = [name for name in names if name.lower().startswith(prefix) and name.endswith(suffix)]
        if requirement == "numpy":  # the only binary one among them: its tag must match this Python
            found = [name for name in found if f"-{python_tag}-" in name]
        if not found:
            missing.append(requirement + (f" ({python_tag})" if requirement == "numpy" else ""))
    return missing


def step_wheels(args) -> int:
    folder = Path(args.dir)
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if not folder.is_dir():
        raise DMMError(f"--wheels {str(folder)!r}: not a folder", "the folder scripts/download_gpu_wheels.sh filled",
                       "run that script where there is network and copy the folder here")
    missing = missing_wheels(folder, tag)
    cuda_python = sorted(path.name for path in folder.glob("cuda_python-*.whl"))
    if missing:
        detail = (f"{folder} lacks {', '.join(missing)}; expected scripts/download_gpu_wheels.sh's folder for "
                  f"Python {platform.python_version()}; run it with --python-version "
                  f"{sys.version_info.major}.{sys.version_info.minor}")
        write_record(args.out, "wheels", "failed", detail)
        print(detail)
        return 1
    size = sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
    detail = (f"{folder}: pycuda sdist, its build and runtime requirements, pytest, "
              f"{len(cuda_python)} cuda-python release(s); {size >> 20} MB")
    write_record(args.out, "wheels", "ok", detail, cuda_python=cuda_python, bytes=size)
    print(detail)
    return 0


# -- doctor -------------------------------------------------------------------------------------


def step_doctor(args) -> int:
    from runtime.doctor import diagnose, report_text

    report = diagnose()
    atomic_write_json(report, Path(args.out) / "doctor.json")
    text = report_text(report)
    print(text)
    components = report["environment"]["components"]
    usable = [name for name in ("pycuda", "cuda-python") if components[name]["usable"]]
    gpus = report["environment"]["gpus"]
    detail = (f"{len(gpus)} GPU(s); usable CUDA bindings: {', '.join(usable) or 'none'}; "
              f"cuda {report['environment']['cuda']['driver_cuda'] or 'no driver'}")
    write_record(args.out, "doctor", "ok" if gpus or not args.expect_gpu else "failed", detail)
    return 0 if gpus or not args.expect_gpu else 1


# -- training -----------------------------------------------------------------------------------


def synthetic_dataset(episodes: int = 20, length: int = 200, seed: int = SEED):
    """A Hopper-shaped offline dataset of random data: what the trainer's step needs, without MuJoCo."""
    from dmm_train.config import get_preset
    from dmm_train.records import Episode, OfflineDataset

    preset = get_preset(PRESET)
    rng = np.random.default_rng(seed)
    state_dim, act_dim = preset.state_dim, preset.act_dim
    return OfflineDataset.from_episodes("synthetic/hopper-shaped", preset.env_id, [
        Episode(rng.normal(size=(length, state_dim)), np.tanh(rng.normal(size=(length, act_dim))),
                rng.uniform(0.0, 3.0, size=length), terminated=bool(index % 2))
        for index in range(episodes)])


def time_training(model: str, dataset, device: str, steps: int, warmup: int = WARMUP_STEPS) -> list[float]:
    """Seconds of each of ``steps`` training steps after ``warmup`` ones, as ``train --model M --device D``
    runs them (one process, batch 64)."""
    import torch

    from dmm_train.baselines import build_policy
    from dmm_train.config import ModelConfig, TrainConfig, get_preset
    from dmm_train.sampler import WindowSampler
    from dmm_train.train import batch_to_tensors, make_optimizer, train_step

    preset = get_preset(PRESET)
    config = TrainConfig(preset=PRESET, model=model, steps=steps + warmup, seed=SEED, device=device)
    torch.manual_seed(SEED)
    model_config = ModelConfig.from_preset(preset, model=model)
    network = build_policy(model_config).to(device).train()
    optimizer, scheduler = make_optimizer(network, config)
    sampler = WindowSampler(dataset, model_config.context_len, preset.rtg_scale, seed=SEED)
    seconds = []
    for step in range(steps + warmup):
        start = time.perf_counter()
        train_step(network, optimizer, scheduler, batch_to_tensors(sampler.sample(config.batch_size), device),
                   config.grad_clip)
        if device.startswith("cuda"):
            torch.cuda.synchronize()  # the step is done when the GPU is, not when its launches return
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def step_training(args) -> int:
    import torch

    dataset = synthetic_dataset()
    has_gpu = torch.cuda.is_available()
    models = MODELS if has_gpu else ("bc",)  # without a GPU: only the plumbing, on the cheapest model
    rows = []
    for model in models:
        cpu = statistics.median(time_training(model, dataset, "cpu", args.cpu_steps, warmup=2)) * 1e3
        row = {"model": model, "cpu_ms": cpu, "cuda_ms": None, "speedup": None}
        if has_gpu:
            row["cuda_ms"] = statistics.median(time_training(model, dataset, "cuda", args.steps)) * 1e3
            row["speedup"] = cpu / row["cuda_ms"]
        rows.append(row)
        print(json.dumps(row))
    if not has_gpu:
        write_record(args.out, "training", "no GPU", f"no CUDA device for torch {torch.__version__}; the CPU loop "
                     f"ran ({args.cpu_steps} steps of bc)", rows=rows)
        return NO_GPU
    write_record(args.out, "training", "ok", f"{len(rows)} models, {args.steps} CUDA steps each", rows=rows)
    return 0


# -- latency ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trajectory:
    """What `runtime.doctor.timed_teacher_forced` reads of a recorded trajectory."""

    observations: object
    actions: object
    rewards: object
    starts: object

    @property
    def steps(self) -> int:
        return len(self.observations)


def synthetic_trajectory(steps: int, state_dim: int, act_dim: int, episode: int = 250) -> Trajectory:
    rng = np.random.default_rng(SEED)
    starts = np.zeros(steps, dtype=bool)
    starts[::episode] = True
    return Trajectory(rng.normal(size=(steps, state_dim)).astype(np.float32),
                      np.tanh(rng.normal(size=(steps, act_dim))).astype(np.float32),
                      rng.uniform(0.0, 3.0, size=steps).astype(np.float32), starts)


def untrained_checkpoint(directory: Path) -> Path:
    """A seeded, untrained hopper DMM model.pt (latency does not depend on the weights' values)."""
    import torch

    from contract.deployment import PolicyFacts
    from dmm_train.baselines import build_policy
    from dmm_train.checkpoint import checkpoint_metadata, save_model
    from dmm_train.config import ModelConfig, TrainConfig, get_preset

    torch.manual_seed(SEED)
    preset = get_preset(PRESET)
    model = build_policy(ModelConfig.from_preset(preset)).eval()
    facts = PolicyFacts(preset=preset.name, env_id=preset.env_id, state_dim=model.config.state_dim,
                        act_dim=model.config.act_dim, context_len=model.config.context_len,
                        state_mean=np.zeros(preset.state_dim, np.float32),
                        state_std=np.ones(preset.state_dim, np.float32),
                        rtg_scale=preset.rtg_scale, target_returns=preset.target_returns,
                        ref_min_score=preset.ref_min_score, ref_max_score=preset.ref_max_score)
    metadata = checkpoint_metadata(model=model, train_config=dataclasses.asdict(TrainConfig(preset=PRESET)),
                                   facts=facts, dataset_id="synthetic/untrained", dataset_hash="0" * 64, step=0)
    return save_model(directory, model, metadata)


def step_latency(args) -> int:
    import torch

    from runtime.doctor import timed_teacher_forced
    from runtime.latency import LatencyStats
    from runtime.policy import Policy
    from runtime.torch_backend import TorchBackend

    checkpoint = untrained_checkpoint(Path(args.out) / "work")
    has_gpu = torch.cuda.is_available()
    rows = []
    for mode in ("window", "stream"):
        with TorchBackend(checkpoint, mode=mode, threads=1).load() as reference:
            manifest = reference.manifest
            trajectory = synthetic_trajectory(args.steps, manifest.state_dim, manifest.act_dim)
            cpu_actions, cpu_ns = timed_teacher_forced(Policy(reference), trajectory)
        cpu = LatencyStats.from_ns(cpu_ns)
        rows.append({"mode": mode, "path": "torch cpu (1 thread)", "p50_ms": cpu.p50, "p99_ms": cpu.p99,
                     "max_ms": cpu.max, "x_cpu": 1.0, "max_abs": 0.0})
        if not has_gpu:
            continue
        for label, options in (("torch cuda", {}), ("torch cuda + CUDA graph", {"cuda_graph": True})):
            with TorchBackend(checkpoint, mode=mode, device="cuda", **options).load() as backend:
                timed_teacher_forced(Policy(backend), trajectory)  # warm-up (and the graphs' capture)
                actions, elapsed = timed_teacher_forced(Policy(backend), trajectory)
            stats = LatencyStats.from_ns(elapsed)
            rows.append({"mode": mode, "path": label, "p50_ms": stats.p50, "p99_ms": stats.p99, "max_ms": stats.max,
                         "x_cpu": cpu.p50 / stats.p50, "max_abs": float(np.abs(actions - cpu_actions).max())})
    for row in rows:
        print(json.dumps(row))
    if not has_gpu:
        write_record(args.out, "latency", "no GPU", f"no CUDA device for torch {torch.__version__}; the CPU rows "
                     f"ran ({args.steps} steps per mode)", rows=rows)
        return NO_GPU
    write_record(args.out, "latency", "ok", f"{args.steps} teacher-forced steps per mode", rows=rows)
    return 0


# -- record and summary ------------------------------------------------------------------------


def step_record(args) -> int:
    extra = {key: value for key, value in (("seconds", args.seconds), ("budget_s", args.budget), ("log", args.log))
             if value is not None}
    write_record(args.out, args.step, args.status, args.detail, **extra)
    return 0


def read_records(out: Path) -> list[dict]:
    records = []
    for path in sorted((Path(out) / "steps").glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            records.append({"step": path.stem, "status": "failed", "detail": f"its record is unreadable ({error})"})
    return records


def markdown(summary: dict) -> str:
    """The summary in BENCHMARKS.md's form: a step table, then the measurements that were made."""
    lines = ["## GPU without TensorRT (`bench/gpu_check.sh`)", "", f"Command: `{summary['command']}`", "",
             f"Machine: {summary['machine']}", "",
             f"{summary['seconds']:.0f} s in all (budget {summary['budget_s']} s); "
             f"{'dry run' if summary['dry_run'] else 'full run'}.", "",
             "| # | step | status | s | budget s | detail |", "|---:|---|---|---:|---:|---|"]
    for index, record in enumerate(summary["steps"], 1):
        seconds = record.get("seconds")
        lines.append(f"| {index} | {record['step']} | {record['status']} | "
                     f"{'' if seconds is None else f'{seconds:.0f}'} | {record.get('budget_s', '')} | "
                     f"{str(record.get('detail', '')).replace('|', '/')} |")
    by_step = {record["step"]: record for record in summary["steps"]}
    training = [row for row in by_step.get("training", {}).get("rows", []) if row.get("cuda_ms")]
    if training:
        lines += ["", "Training step, `train --device cuda` against the same step on this machine's CPU (median "
                  "ms/step after the warm-up; batch 64, the trainer's own step):", "",
                  "| model | cuda ms/step | cpu ms/step | speedup (cpu / cuda) |", "|---|---:|---:|---:|"]
        lines += [f"| {row['model']} | {row['cuda_ms']:.2f} | {row['cpu_ms']:.1f} | **{row['speedup']:.1f}x** |"
                  for row in training]
    latency = by_step.get("latency", {}).get("rows", [])
    if any(row["path"] != "torch cpu (1 thread)" for row in latency):
        lines += ["", "PyTorch backend step latency (`Policy.act`, teacher-forced along one synthetic trajectory; "
                  "`run --device cuda [--cuda-graph]`):", "",
                  "| mode | path | p50 us | p99 us | max us | x cpu p50 | max abs diff vs cpu |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {row['mode']} | {row['path']} | {row['p50_ms'] * 1e3:.1f} | {row['p99_ms'] * 1e3:.1f} | "
                  f"{row['max_ms'] * 1e3:.1f} | {row['x_cpu']:.1f}x | {row['max_abs']:.1e} |" for row in latency]
    return "\n".join(lines) + "\n"


def machine_line(machine: dict) -> str:
    gpu = machine.get("gpu") or "no GPU"
    return (f"{gpu}, CUDA driver {machine.get('driver_cuda') or 'none'}, {machine.get('cpus')} CPUs "
            f"({machine.get('machine')}), torch {machine.get('torch')} (CUDA {machine.get('torch_cuda')}), "
            f"nvcc {machine.get('nvcc_version') or 'none'}, Python {machine.get('python')}")


def step_summary(args) -> int:
    out = Path(args.out)
    try:
        machine = json.loads((out / "machine.json").read_text())
    except (OSError, json.JSONDecodeError):
        machine = {}
    records = read_records(out)
    order = {name: index for index, name in enumerate(args.order.split(","))} if args.order else {}
    records.sort(key=lambda record: order.get(record["step"], len(order)))
    failed = [record["step"] for record in records if record["status"] in ("failed", "timed out")]
    summary = {"kind": "dmm-deploy-gpu-check", "format_version": 1, "command": args.run_command,
               "dry_run": bool(args.dry_run), "seconds": float(args.seconds), "budget_s": args.budget,
               "machine": machine_line(machine), "machine_record": machine, "steps": records, "failed": failed,
               "ok": not failed}
    atomic_write_json(summary, out / "summary.json")
    text = markdown(summary)
    atomic_write_text(out / "summary.md", text)
    print(text, end="")
    return 1 if failed else 0


# -- command line -------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = main.add_subparsers(dest="command", required=True)
    for name in ("env", "wheels", "doctor", "training", "latency", "record", "summary"):
        sub = steps.add_parser(name)
        sub.add_argument("--out", required=True, help="the output folder of bench/gpu_check.sh")
        if name == "wheels":
            sub.add_argument("--dir", required=True, help="the wheel folder")
        if name == "doctor":
            sub.add_argument("--expect-gpu", action="store_true", help="a doctor that finds no GPU fails the step")
        if name == "training":
            sub.add_argument("--steps", type=int, default=100, help="timed CUDA training steps per model")
            sub.add_argument("--cpu-steps", type=int, default=10, help="timed CPU training steps per model")
        if name == "latency":
            sub.add_argument("--steps", type=int, default=1000, help="synthetic trajectory steps per mode")
        if name == "record":
            sub.add_argument("--step", required=True)
            sub.add_argument("--status", required=True, choices=STATUSES)
            sub.add_argument("--detail", required=True)
            sub.add_argument("--seconds", type=float)
            sub.add_argument("--budget", type=int)
            sub.add_argument("--log")
        if name == "summary":
            sub.add_argument("--seconds", type=float, required=True)
            sub.add_argument("--budget", type=int, required=True)
            sub.add_argument("--run-command", required=True, help="the command line the summary names")
            sub.add_argument("--order", default="", help="step names in run order, comma-separated")
            sub.add_argument("--dry-run", action="store_true")
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name in ("steps", "cpu_steps"):
        value = getattr(args, name, None)
        if value is not None and value < 2:
            raise DMMError(f"--{name.replace('_', '-')} {value}", "at least 2",
                           f"pass --{name.replace('_', '-')} 2 or more")
    handlers = {"env": step_env, "wheels": step_wheels, "doctor": step_doctor, "training": step_training,
                "latency": step_latency, "record": step_record, "summary": step_summary}
    return handlers[args.command](args)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except DMMError as error:
        message = re.sub(r"\s+", " ", str(error))
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
