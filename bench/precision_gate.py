"""Both error rates of the export's closed-loop score gate (`calibration.accuracy.ScoreGate`) on a trained checkpoint.

Two candidates play ``--pool`` paired episodes against the fp32 graph (reset seeds 0 .. pool - 1; the
fp32 episodes are shared), in the real env, as the export plays them:

- a graph as good as fp32: the fp16 graph, evaluated as the export evaluates it (its arithmetic
  emulated in float32 ops on ONNX Runtime's CPU provider);
- a graph made worse on purpose: fp32 with the action head's bias shifted by ``--worse-bias``
  (before the tanh), which loses several points.

The sequential gate is then run ``--resamples`` times per setting, each time on paired deltas drawn
with replacement from a pool (a bootstrap of new exports: the pool stands for the policy's
distribution of paired deltas). Per allowed drop and cap it prints how often the good graph is
refused (as worse, or as inconclusive at the cap), how often the worse graph passes, how often a
graph passes whose mean loss is exactly the allowed drop (the worse pool shifted there: the case the
guarantee is about), and the mean paired episodes per export with the seconds they cost here.

    python bench/precision_gate.py --checkpoint runs/hopper-seed0/best.pt --pool 100
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calibration.accuracy import ScoreGate, closed_loop, sequential_score_gate
from contract.errors import DMMError


def play_pools(checkpoint, *, mode: str, pool: int, worse_bias: float) -> dict:
    """Scores of ``pool`` episodes of fp32, fp16 and the worse graph, and seconds per episode of each."""
    import torch

    from dmm_train.manifest_builder import build_manifest
    from export.onnx_export import build_graph
    from export.precision import fp16_emulation, to_fp16

    model = checkpoint.model.eval()
    model.set_scan_impl("loop")
    fp32 = build_graph(model, mode=mode)
    worse_model = copy.deepcopy(model)
    with torch.no_grad():
        worse_model.action_head.bias += worse_bias  # (Adim,): every action pushed one way before the tanh
    manifest = build_manifest(checkpoint, mode=mode)
    graphs = {
        "fp32": (fp32.SerializeToString(), manifest, True),
        "fp16": (fp16_emulation(to_fp16(fp32)).SerializeToString(),
                 dataclasses.replace(manifest, precision="fp16"), False),
        "worse": (build_graph(worse_model, mode=mode).SerializeToString(), manifest, True),
    }
    played = {}
    for label, (graph, graph_manifest, optimize) in graphs.items():
        started = time.perf_counter()
        result = closed_loop(graph, graph_manifest, optimize=optimize, label=label, episodes=pool, seed=0)
        seconds = (time.perf_counter() - started) / pool
        played[label] = {"scores": np.asarray(result["scores"]), "seconds": seconds}  # (pool,)
        print(f"{label:>5}: {pool} episodes, mean score {result['score']:.2f}, {seconds:.2f} s per episode",
              flush=True)
    return played


def error_rates(deltas: np.ndarray, gate, resamples: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """(passed, refused, mean paired episodes) of the gate over ``resamples`` bootstrap exports of ``deltas``."""
    passed = refused = episodes = 0
    for _ in range(resamples):
        verdict = sequential_score_gate(lambda start, count: rng.choice(deltas, size=count), gate)
        passed += not verdict["score_refused"]
        refused += verdict["score_refused"]
        episodes += verdict["paired_episodes"]
    return passed / resamples, refused / resamples, episodes / resamples


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model.pt / best.pt or its run directory")
    parser.add_argument("--mode", choices=("window", "stream"), default="window")
    parser.add_argument("--pool", type=int, default=100, help="paired episodes per candidate (default 100)")
    parser.add_argument("--worse-bias", type=float, default=0.2,
                        help="shift of the action head's bias of the worse graph (default 0.2)")
    parser.add_argument("--drops", type=float, nargs="+", default=[1.0, 3.0, 5.0], help="allowed drops to try")
    parser.add_argument("--caps", type=int, nargs="+", default=[20, 40, 60], help="episode caps to try")
    parser.add_argument("--batch", type=int, default=10, help="paired episodes per look (default 10)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap exports per setting")
    args = parser.parse_args(argv)
    if args.pool < 10 or args.resamples < 100:
        raise DMMError(f"--pool {args.pool}, --resamples {args.resamples}", "at least 10 and 100",
                       "pass --pool 10 or more and --resamples 100 or more")

    import torch

    from dmm_train.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    checkpoint = load_checkpoint(args.checkpoint)
    print(f"{checkpoint.path} (step {checkpoint.step}, {checkpoint.dataset_id}), {args.mode} mode, "
          f"pool {args.pool} paired episodes, worse graph: action-head bias {args.worse_bias:+g}")
    played = play_pools(checkpoint, mode=args.mode, pool=args.pool, worse_bias=args.worse_bias)
    good = played["fp16"]["scores"] - played["fp32"]["scores"]  # (pool,)
    worse = played["worse"]["scores"] - played["fp32"]["scores"]  # (pool,)
    print(f"paired deltas: fp16 {good.mean():+.2f} ± {good.std(ddof=1):.2f}, "
          f"worse {worse.mean():+.2f} ± {worse.std(ddof=1):.2f} (mean ± std over the pool)")
    seconds_per_pair = played["fp32"]["seconds"] + played["fp16"]["seconds"]
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'drop':>5} {'cap':>4} {'fp16 refused':>13} {'worse passed':>13} {'at the drop passed':>19} "
          f"{'episodes':>9} {'s/export':>9}")
    for drop in args.drops:
        for cap in args.caps:
            gate = ScoreGate(max_score_drop=drop, batch=min(args.batch, cap), cap=cap)
            _, good_refused, episodes = error_rates(good, gate, args.resamples, rng)
            worse_passed, _, _ = error_rates(worse, gate, args.resamples, rng)
            boundary_passed, _, _ = error_rates(worse - worse.mean() - drop, gate, args.resamples, rng)
            row = {"drop": drop, "cap": cap, "good_refused": good_refused, "worse_passed": worse_passed,
                   "boundary_passed": boundary_passed, "episodes": episodes,
                   "seconds": episodes * seconds_per_pair}
            rows.append(row)
            print(f"{drop:>5g} {cap:>4} {good_refused:>13.1%} {worse_passed:>13.1%} {boundary_passed:>19.1%} "
                  f"{episodes:>9.1f} {row['seconds']:>9.0f}", flush=True)
    return rows


if __name__ == "__main__":
    try:
        main()
    except DMMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
