"""How often the export's closed-loop score gate refuses a low-precision graph, over split / episode seeds.

For one checkpoint, `export.precision.lower_precision` runs once per seed (the held-out split, the
calibration samples and the closed-loop reset seeds all follow it), and each run's paired score
deltas are judged by the interval gate (`calibration.accuracy.paired_score_gate`) and, side by
side, by the mean-only gate it replaced (refuse when the mean drop exceeds the limit).

    python bench/precision_gate.py --checkpoint runs/hopper-seed0 --precision fp16 --seeds 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contract.errors import DMMError  # noqa: E402


def main(argv: list[str] | None = None) -> tuple[int, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model.pt or its run directory")
    parser.add_argument("--precision", choices=("fp16", "int8"), default="fp16")
    parser.add_argument("--mode", choices=("window", "stream"), default="window")
    parser.add_argument("--seeds", type=int, default=20, help="exports judged, seeds 0 .. N-1 (default 20)")
    parser.add_argument("--score-episodes", type=int, default=5, help="paired episodes per export (default 5)")
    parser.add_argument("--dataset", default=None, help="training dataset (default: the checkpoint's)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.score_episodes < 2:
        raise DMMError(f"--seeds {args.seeds}, --score-episodes {args.score_episodes}; expected >= 1 and >= 2")

    import torch

    from dmm_train.checkpoint import load_checkpoint
    from dmm_train.manifest_builder import build_manifest
    from export.onnx_export import build_graph
    from export.precision import PrecisionOptions, lower_precision

    torch.set_num_threads(1)
    checkpoint = load_checkpoint(args.checkpoint)
    model = checkpoint.model.eval()
    model.set_scan_impl("loop")
    proto = build_graph(model, mode=args.mode, precision=args.precision)
    manifest = build_manifest(checkpoint, mode=args.mode)
    print(f"{args.precision} {args.mode} of {checkpoint.path} (step {checkpoint.step}), {args.score_episodes} paired "
          f"episodes per export, seeds 0..{args.seeds - 1}")
    print(f"{'seed':>4} {'fp32':>7} {'delta':>7} {'95% interval':>17} {'mean-only gate':>15} {'interval gate':>14} "
          f"{'s':>5}")
    old_refusals = new_refusals = 0
    for seed in range(args.seeds):
        started = time.perf_counter()
        options = PrecisionOptions(seed=seed, score_episodes=args.score_episodes, dataset=args.dataset)
        try:
            _, accuracy, _ = lower_precision(proto, checkpoint, manifest, precision=args.precision, options=options)
        except DMMError as error:
            if "accuracy |" not in str(error):
                raise
            new_refusals += 1
            old_refusals += 1  # an interval wholly below -limit has its mean below -limit too
            print(f"{seed:>4} refused: {str(error)[:100]}")
            continue
        old = accuracy["score_drop"] > accuracy["max_score_drop"]
        old_refusals += old
        low, high = accuracy["score_delta_ci"]
        print(f"{seed:>4} {accuracy['score_fp32']:>7.2f} {accuracy['score_delta']:>+7.2f} "
              f"{f'{low:+.2f} .. {high:+.2f}':>17} {'refuses' if old else 'passes':>15} {'passes':>14} "
              f"{time.perf_counter() - started:>5.1f}")
    print(f"refused: mean-only gate {old_refusals}/{args.seeds}, interval gate {new_refusals}/{args.seeds}")
    return old_refusals, new_refusals


if __name__ == "__main__":
    try:
        main()
    except DMMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
