"""Training-step speed: the fused CPU scan against the loop reference, side by side.

One full DMM training step at the hopper preset (B = 64 windows, K = 8 so L = 24 tokens,
D = 64, N = 16, 3 layers): forward, masked MSE loss, backward, grad-norm clip 0.25, AdamW
step and scheduler step, exactly as `dmm_train.train.train_step` runs them. Three
identically initialised models take turns in short blocks, so that a change in the
machine's load hits every path alike:

- reference: the obviously-correct model: the loop reference scan (`selective_scan_loop`)
             and the official DSM (pad, unfold, Linear; `DenseSequenceMixer.forward_window`);
- loop:      the loop reference scan with the lean rest of the step (the DSM as a convolution),
             to separate what the scan kernel gains from what the rest gains;
- fused:     the default training path: fused C kernel (`dmm_train.fused_scan`) + lean rest;
- no scan:   the fused model with the scan swapped for a stand-in of almost no cost, to
             show what the rest of the step costs (the scan's share is step - this).

The last line is ``speedup: X.Xx`` (reference ms / fused ms).

    python bench/train_speed.py [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from contract.errors import DMMError  # noqa: E402
from dmm_train import fused_scan  # noqa: E402
from dmm_train import model as model_module  # noqa: E402
from dmm_train.config import ACTION_PAD_VALUE, ModelConfig, TrainConfig, get_preset  # noqa: E402
from dmm_train.model import DecisionMetaMamba  # noqa: E402
from dmm_train.train import make_optimizer, train_step  # noqa: E402

PRESET = "hopper"
BATCH_SIZE = 64
WARMUP_STEPS = 10
ROUNDS = 10  # blocks per path, alternating
PAD_FRACTION = 0.25  # windows that start near an episode start and are left-padded
SEED = 0


def make_batch(preset, context_len: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Realistic windows: normalised states, actions in [-1, 1], rtg / scale, some left padding."""
    states = torch.randn(BATCH_SIZE, context_len, preset.state_dim, generator=generator)  # (B, K, S)
    actions = torch.rand(BATCH_SIZE, context_len, preset.act_dim, generator=generator) * 2 - 1  # (B, K, Adim)
    rtg = 3.6 - torch.rand(BATCH_SIZE, context_len, 1, generator=generator).cumsum(1) * 0.05  # (B, K, 1)
    mask = torch.ones(BATCH_SIZE, context_len)  # (B, K)
    padded_rows = torch.rand(BATCH_SIZE, generator=generator) < PAD_FRACTION
    for row in torch.nonzero(padded_rows).flatten().tolist():
        pad = int(torch.randint(1, context_len, (1,), generator=generator))
        mask[row, :pad] = 0.0
        states[row, :pad] = 0.0
        actions[row, :pad] = ACTION_PAD_VALUE
        rtg[row, :pad] = 0.0
    return {"states": states, "actions": actions, "rtg": rtg, "mask": mask}


def free_scan(x, delta, A, Bm, Cm, Dskip, impl="auto", *, z=None, delta_bias=None, delta_softplus=False):
    """Stand-in for the scan with the same inputs and output shape and almost no cost."""
    out = x * delta + (Bm.sum() + Cm.sum()) * A.sum() + Dskip  # (B, L, D)
    if delta_bias is not None:
        out = out + delta_bias
    return out if z is None else out * z


@contextlib.contextmanager
def scan_replaced_by_stand_in():
    original = model_module.selective_scan
    model_module.selective_scan = free_scan
    try:
        yield
    finally:
        model_module.selective_scan = original


def build(impl: str, train_config: TrainConfig, dsm_impl: str = "conv"):
    torch.manual_seed(SEED)  # the same initial weights for every path
    model = DecisionMetaMamba(ModelConfig.from_preset(get_preset(PRESET)))
    model.set_scan_impl(impl)
    model.set_dsm_impl(dsm_impl)
    model.train()
    optimizer, scheduler = make_optimizer(model, train_config)
    return model, optimizer, scheduler


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200, help="timed steps per path (default 200)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads for every path; the scan kernel uses as many (default 1: on a "
             "2-core machine shared with another job, torch's OpenMP pool was 3-10x slower with 2)",
    )
    parser.add_argument(
        "--scan-threads", type=int, default=None,
        help="threads of the fused scan kernel (default: as --threads; see DMM_SCAN_THREADS)",
    )
    args = parser.parse_args(argv)
    scan_threads = args.threads if args.scan_threads is None else args.scan_threads
    if args.steps < ROUNDS or args.threads < 1 or scan_threads < 1:
        raise DMMError(
            f"--steps {args.steps}, --threads {args.threads}, --scan-threads {scan_threads}; "
            f"expected >= {ROUNDS}, >= 1 and >= 1"
        )
    torch.set_num_threads(args.threads)
    fused_scan.set_num_threads(scan_threads)
    if not fused_scan.is_available():
        raise DMMError(f"the fused scan kernel is unavailable: {fused_scan.UNAVAILABLE_REASON}")

    train_config = TrainConfig(preset=PRESET)
    preset = get_preset(PRESET)
    context_len = ModelConfig.from_preset(preset).context_len
    batch = make_batch(preset, context_len, torch.Generator().manual_seed(SEED))
    paths = {"reference": build("loop", train_config, dsm_impl="window"),
             "loop": build("loop", train_config), "fused": build("fused", train_config),
             "no scan": build("fused", train_config)}

    def run(name: str, steps: int) -> float:
        model, optimizer, scheduler = paths[name]
        context = scan_replaced_by_stand_in() if name == "no scan" else contextlib.nullcontext()
        with context:
            start = time.perf_counter()
            for _ in range(steps):
                train_step(model, optimizer, scheduler, batch, train_config.grad_clip)
            return (time.perf_counter() - start) / steps * 1e3

    for name in paths:
        run(name, WARMUP_STEPS)
    block = args.steps // ROUNDS
    per_block = {name: [] for name in paths}
    for _ in range(ROUNDS):
        for name in paths:
            per_block[name].append(run(name, block))
    ms = {name: statistics.median(values) for name, values in per_block.items()}

    rest = ms["no scan"]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"DMM training step, {PRESET}: B={BATCH_SIZE}, L={3 * batch['states'].shape[1]}, "
          f"D={preset.d_model}, 3 layers; torch threads {args.threads}, scan threads "
          f"{fused_scan.get_num_threads()}, {cpus} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"scan kernel build: {' '.join(fused_scan.build_flags())}")
    print(f"{'path':<11}{'ms/step':>10}{'scan ms':>10}{'scan share':>12}{'spread':>16}")
    for name in ("reference", "loop", "fused", "no scan"):
        # The reference's rest differs (unfold DSM), so its scan time is not step - rest.
        scan_ms = {"reference": None, "no scan": 0.0}.get(name, ms[name] - rest)
        scan_cells = ("-", "-") if scan_ms is None else (f"{scan_ms:.1f}", f"{scan_ms / ms[name]:.0%}")
        low, high = min(per_block[name]), max(per_block[name])
        print(f"{name:<11}{ms[name]:>10.1f}{scan_cells[0]:>10}{scan_cells[1]:>12}"
              f"{f'{low:.1f}-{high:.1f}':>16}")
    speedup = ms["reference"] / ms["fused"]
    print(f"median of {ROUNDS} alternating blocks of {block} steps; 'no scan' = the rest of the step; "
          f"scan kernel alone (loop / fused): {ms['loop'] / ms['fused']:.1f}x")
    print(f"speedup: {speedup:.1f}x")
    return speedup


if __name__ == "__main__":
    try:
        main()
    except DMMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
