"""What runs on a machine with an NVIDIA GPU but no TensorRT, measured side by side (bench/gpu_check.sh).

1. Training speed with ``train --device cuda`` for DMM and the baselines (DMamba, DT, BC): the
   trainer's own loop (`dmm_train.train.train`: sampler, forward, loss, backward, clip, AdamW),
   ms per step on the GPU against the same loop on this machine's CPU, one model after another.
2. The PyTorch backend's step latency on the GPU (``run --device cuda``), without and with
   CUDA-graph replay (``--cuda-graph``), against the same backend on the CPU: `Policy.act` timed
   along one recorded Hopper-v5 trajectory, teacher-forced, both modes, with the largest action
   difference from the CPU.

Prints the tables in BENCHMARKS.md's form and writes them to --out. pycuda (built from source
here) running the runtime's buffer code is the shell script's part.

    python bench/gpu_check.py [--out runs/gpu_check.md] [--train-steps 200] [--latency-steps 1000]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contract.errors import DMMError  # noqa: E402
from contract.files import atomic_write_text  # noqa: E402

MODELS = ("dmm", "dmamba", "dt", "bc")
WARMUP_STEPS = 20  # training steps left out of the timing (CUDA context, cuBLAS handles, allocator)
PRESET = "hopper"
SEED = 0


def require_cuda():
    """torch with a usable CUDA device, or a DMMError saying what is missing."""
    try:
        import torch
    except ImportError:
        raise DMMError("bench/gpu_check.py needs torch; install a CUDA build (PyPI's Linux torch wheel is one)") \
            from None
    if not torch.cuda.is_available():
        build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise DMMError(f"no CUDA device for torch {torch.__version__} ({build}); expected an NVIDIA GPU with its "
                       "driver and a CUDA build of torch; run this on the GPU machine with PYTHON set to such an "
                       "environment")
    return torch


def time_training(model: str, dataset: Path, device: str, steps: int, scratch: Path) -> list[float]:
    """Seconds of each training step after the warm-up, as ``cli.py train --model M --device D`` runs them."""
    from dmm_train.config import TrainConfig
    from dmm_train.train import train

    stamps: list[float] = []
    config = TrainConfig(preset=PRESET, model=model, dataset=str(dataset), steps=steps + WARMUP_STEPS, seed=SEED,
                         eval_episodes=0, checkpoint_every=steps + WARMUP_STEPS, device=device)
    train(config, scratch / f"{model}-{device}", progress=False, on_step=lambda _: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps[WARMUP_STEPS - 1:-1], stamps[WARMUP_STEPS:], strict=True)]


def training_rows(dataset: Path, scratch: Path, steps: int, cpu_steps: int) -> list[dict]:
    rows = []
    for model in MODELS:
        cuda = statistics.median(time_training(model, dataset, "cuda", steps, scratch)) * 1e3
        cpu = statistics.median(time_training(model, dataset, "cpu", cpu_steps, scratch)) * 1e3
        rows.append({"model": model, "cuda_ms": cuda, "cpu_ms": cpu, "speedup": cpu / cuda})
    return rows


def latency_rows(checkpoint: Path, steps: int) -> list[dict]:
    import numpy as np

    from runtime.doctor import timed_teacher_forced
    from runtime.latency import LatencyStats
    from runtime.plant import make_plant
    from runtime.policy import Policy
    from runtime.recording import record_trajectory
    from runtime.torch_backend import TorchBackend

    rows = []
    for mode in ("window", "stream"):
        with TorchBackend(checkpoint, mode=mode, threads=1).load() as reference:
            plant = make_plant(reference.manifest.env_id)
            try:
                trajectory = record_trajectory(Policy(reference), plant, steps=steps, seed=SEED)
            finally:
                plant.close()
            cpu_actions, cpu_ns = timed_teacher_forced(Policy(reference), trajectory)
        cpu = LatencyStats.from_ns(cpu_ns)
        rows.append({"mode": mode, "path": "torch cpu (1 thread)", "stats": cpu, "x_cpu": 1.0, "max_abs": 0.0})
        for label, options in (("torch cuda", {}), ("torch cuda + CUDA graph", {"cuda_graph": True})):
            with TorchBackend(checkpoint, mode=mode, device="cuda", **options).load() as backend:
                timed_teacher_forced(Policy(backend), trajectory)  # warm-up (and the graphs' capture)
                actions, elapsed = timed_teacher_forced(Policy(backend), trajectory)
            stats = LatencyStats.from_ns(elapsed)
            rows.append({"mode": mode, "path": label, "stats": stats, "x_cpu": cpu.p50 / stats.p50,
                         "max_abs": float(np.abs(actions - cpu_actions).max())})
    return rows


def machine_line() -> str:
    import torch

    gpu = torch.cuda.get_device_properties(0)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{torch.cuda.get_device_name(0)} (compute capability {gpu.major}.{gpu.minor}, "
            f"{gpu.total_memory >> 30} GiB), {cpus} CPUs ({platform.processor() or platform.machine()}), torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}")


def markdown(machine: str, command: str, training: list[dict], latency: list[dict]) -> str:
    """The tables in BENCHMARKS.md's form."""
    lines = ["## GPU without TensorRT (`bench/gpu_check.sh`)", "", f"Command: `{command}`", "",
             f"Machine: {machine}", "", "Training step, `train --device cuda` against the same loop on this "
             "machine's CPU (median ms/step after the warm-up; batch 64, the trainer's own loop):", "",
             "| model | cuda ms/step | cpu ms/step | speedup (cpu / cuda) |", "|---|---:|---:|---:|"]
    lines += [f"| {row['model']} | {row['cuda_ms']:.2f} | {row['cpu_ms']:.1f} | **{row['speedup']:.1f}x** |"
              for row in training]
    lines += ["", "PyTorch backend step latency (`Policy.act`, teacher-forced along one recorded Hopper-v5 "
              "trajectory; `run --device cuda [--cuda-graph]`):", "",
              "| mode | path | p50 us | p99 us | max us | x cpu p50 | max abs diff vs cpu |",
              "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {row['mode']} | {row['path']} | {row['stats'].p50 * 1e3:.1f} | {row['stats'].p99 * 1e3:.1f} | "
              f"{row['stats'].max * 1e3:.1f} | {row['x_cpu']:.1f}x | {row['max_abs']:.1e} |" for row in latency]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check.md", help="markdown file to write (default %(default)s)")
    parser.add_argument("--train-steps", type=int, default=200, help="timed CUDA training steps per model")
    parser.add_argument("--cpu-steps", type=int, default=20, help="timed CPU training steps per model")
    parser.add_argument("--latency-steps", type=int, default=1000, help="recorded trajectory steps per mode")
    args = parser.parse_args(argv)
    if min(args.train_steps, args.cpu_steps, args.latency_steps) < 2:
        raise DMMError(f"--train-steps {args.train_steps}, --cpu-steps {args.cpu_steps}, --latency-steps "
                       f"{args.latency_steps}; expected at least 2 each")
    require_cuda()
    from dmm_train.recipes import collect_recipe

    with tempfile.TemporaryDirectory(prefix="dmm-gpu-check-") as scratch:
        scratch = Path(scratch)
        dataset = collect_recipe("hopper-medium", steps=20_000, out=scratch / "store", progress=False)
        training = training_rows(dataset, scratch, args.train_steps, args.cpu_steps)
        latency = latency_rows(scratch / "dmm-cuda" / "model.pt", args.latency_steps)
        command = "bash bench/gpu_check.sh" + (f" (python bench/gpu_check.py {' '.join(argv)})" if argv else "")
        text = markdown(machine_line(), command, training, latency)
    print(text, end="")  # first: the measurements are shown even if the report cannot be written
    atomic_write_text(Path(args.out), text)
    return text


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DMMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
