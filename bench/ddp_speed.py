"""Training speed of one process against two torchrun ranks (gloo on the CPU), side by side in one run.

For each global batch (64 and 128 by default) the same training (default dataset, evaluation off)
runs once in one process and once under ``torchrun --standalone --nproc_per_node 2``; steps/s
comes from the run's own clock (``train_seconds`` of the last metrics.jsonl record: the training
loop alone, after the dataset load and model setup). Prints one line per batch with the ratio.

    python bench/ddp_speed.py [--steps 40] [--batches 64 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def steps_per_second(ranks: int, batch: int, steps: int, out: Path) -> float:
    train = ["cli.py", "train", "--steps", str(steps), "--batch-size", str(batch), "--eval-episodes", "0",
             "--checkpoint-every", str(steps), "--out", str(out), "--quiet"]
    if ranks == 1:
        command = [sys.executable, *train]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                   *train]
    # One thread per rank: two ranks on two cores, and the one-process run on the same one thread per process.
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, cwd=REPO_ROOT, env=environment, check=True, capture_output=True)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return steps / last["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for batch in args.batches:
            one = steps_per_second(1, batch, args.steps, Path(scratch) / f"one-{batch}")
            two = steps_per_second(2, batch, args.steps, Path(scratch) / f"two-{batch}")
            print(f"global batch {batch}: 1 rank {one:.2f} steps/s, 2 ranks {two:.2f} steps/s, "
                  f"ratio {two / one:.2f}x ({args.steps} steps each)")


if __name__ == "__main__":
    main()
