"""Action error against the fraction of Linear multiply-adds in int8, per calibration method.

For each calibration method the checkpoint's graph is quantized once (every projection in int8, as
``export --int8 --int8-layers all``), each Linear's share of the action error is measured by quantizing
it alone, and the Linears are then returned to fp32 one by one, most sensitive first, as
``--int8-layers auto`` does (`calibration.int8.choose_int8_layers`), here all the way to none. Each row
is one step of that curve: the relative action RMSE (against fp32, on held-out inputs, as a fraction
of the action range) and the fraction of the Linear multiply-adds still in int8. With
``--closed-loop N`` the steps keeping 0, 1, 2, 3 and 6 Linears in fp32 also play N episodes each,
paired by reset seed with the fp32 graph's N (played once), and report the mean paired delta of the
normalised score with a 95% t interval, as the export's gate computes its deltas.

    python bench/int8_layers.py --checkpoint runs/hopper-seed0/best.pt [--closed-loop 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from calibration.accuracy import closed_loop, student_t_quantile
from calibration.data import CLOSED_LOOP_MIN_STEPS, calibration_data, calibration_feeds
from calibration.int8 import choose_int8_layers
from calibration.qdq import float_linears, quantize_qdq
from contract.errors import DMMError
from dmm_train.checkpoint import load_checkpoint
from dmm_train.manifest_builder import build_manifest
from export.onnx_export import build_graph


def curves(checkpoint_path: Path, *, mode: str, methods: list[str], dataset: str | None, calibration_samples: int,
           heldout_samples: int, seed: int) -> dict[str, dict]:
    """method -> `choose_int8_layers`' record of the full greedy sweep (target 0), with its seconds."""
    checkpoint = load_checkpoint(checkpoint_path)
    proto = build_graph(checkpoint.model.eval(), mode=mode, precision="int8")
    manifest = build_manifest(checkpoint, mode=mode)
    steps = max(CLOSED_LOOP_MIN_STEPS, 2 * (calibration_samples + heldout_samples))
    data = calibration_data(proto, manifest, checkpoint, dataset=dataset, steps=steps, seed=seed)
    feeds = calibration_feeds(proto, manifest, data.split.calibration, calibration_samples, seed=seed)
    results = {}
    for method in methods:
        started = time.monotonic()
        quantized, _ = quantize_qdq(proto, feeds, method=method)
        record = choose_int8_layers(proto, quantized, manifest, data.split.heldout, count=heldout_samples,
                                    seed=seed, target=0.0, sensitivity=True)
        record["seconds"] = time.monotonic() - started
        results[method] = record
    return results


CLOSED_LOOP_STEPS = (0, 1, 2, 3, 6)  # Linears in fp32 at the curve's points that play episodes


def closed_loop_deltas(checkpoint_path: Path, results: dict[str, dict], *, mode: str, dataset: str | None,
                       calibration_samples: int, episodes: int, seed: int) -> None:
    """Adds ``closed_loop`` (mean paired delta, 95% interval, episodes) to the curve's CLOSED_LOOP_STEPS."""
    checkpoint = load_checkpoint(checkpoint_path)
    proto = build_graph(checkpoint.model.eval(), mode=mode, precision="int8")
    manifest = build_manifest(checkpoint, mode=mode)
    data = calibration_data(proto, manifest, checkpoint, dataset=dataset, steps=CLOSED_LOOP_MIN_STEPS, seed=seed)
    feeds = calibration_feeds(proto, manifest, data.split.calibration, calibration_samples, seed=seed)
    reference = closed_loop(proto.SerializeToString(), manifest, optimize=True, label="fp32", episodes=episodes,
                            seed=seed)["scores"]  # (N,)
    int8_manifest = dataclasses.replace(manifest, precision="int8")
    for method, record in results.items():
        quantized, _ = quantize_qdq(proto, feeds, method=method)
        for step in record["steps"]:
            if len(step["fp32_layers"]) not in CLOSED_LOOP_STEPS:
                continue
            graph = float_linears(quantized, proto, step["fp32_layers"])
            scores = closed_loop(graph.SerializeToString(), int8_manifest, optimize=False, label="int8",
                                 episodes=episodes, seed=seed)["scores"]
            deltas = np.asarray(scores) - np.asarray(reference)  # (N,) paired by reset seed
            half = student_t_quantile(0.975, episodes - 1) * deltas.std(ddof=1) / np.sqrt(episodes)
            step["closed_loop"] = {"delta": float(deltas.mean()), "low": float(deltas.mean() - half),
                                   "high": float(deltas.mean() + half), "episodes": episodes}


def table(results: dict[str, dict]) -> str:
    lines = ["| method | Linears in fp32 | last returned to fp32 | int8 MAC fraction | action RMSE / range | "
             "closed-loop delta (95%) |", "|---|---|---|---|---|---|"]
    for method, record in results.items():
        for step in record["steps"]:
            kept = step["fp32_layers"]
            played = step.get("closed_loop")
            delta = (f"{played['delta']:+.2f} ({played['low']:+.2f} .. {played['high']:+.2f}, "
                     f"{played['episodes']} pairs)" if played else "")
            lines.append(f"| {method} | {len(kept)} | {kept[-1] if kept else '-'} | "
                         f"{step['int8_mac_fraction']:.3f} | {step['rmse_relative']:.2e} | {delta} |")
    shares = ["", "| method | Linear | RMSE / range alone | share of squared error | MACs |", "|---|---|---|---|---|"]
    for method, record in results.items():
        ranked = sorted(record["sensitivity"].items(), key=lambda item: -item[1]["rmse_relative_alone"])
        for name, entry in ranked:
            shares.append(f"| {method} | {name} | {entry['rmse_relative_alone']:.2e} | {entry['share']:.3f} | "
                          f"{entry['macs']} |")
    timing = [f"{method}: calibration, quantization and {len(record['steps']) + len(record['sensitivity'])} "
              f"evaluations in {record['seconds']:.1f} s" for method, record in results.items()]
    return "\n".join([*lines, *shares, "", *timing])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="model.pt (or best.pt) of a trained run")
    parser.add_argument("--mode", default="window", choices=("window", "stream"))
    parser.add_argument("--methods", default="minmax,entropy,percentile", help="comma-separated calibration methods")
    parser.add_argument("--dataset", default=None, help="the training dataset (default: the checkpoint's id)")
    parser.add_argument("--calibration-windows", type=int, default=512)
    parser.add_argument("--heldout", type=int, default=256, help="held-out inputs for the action RMSE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--closed-loop", type=int, default=0, metavar="N",
                        help="also play N paired episodes at the curve's first points (0: none)")
    args = parser.parse_args(argv)
    try:
        results = curves(args.checkpoint, mode=args.mode, methods=[m.strip() for m in args.methods.split(",")],
                         dataset=args.dataset, calibration_samples=args.calibration_windows,
                         heldout_samples=args.heldout, seed=args.seed)
        if args.closed_loop:
            closed_loop_deltas(args.checkpoint, results, mode=args.mode, dataset=args.dataset,
                               calibration_samples=args.calibration_windows, episodes=args.closed_loop,
                               seed=args.seed)
    except DMMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.checkpoint} ({args.mode}), {args.calibration_windows} calibration windows, {args.heldout} held-out")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
