"""Accuracy reports of a low-precision graph against its fp32 graph, on the CPU with ONNX Runtime.

Two figures (docs/design.md#accuracy-reports), both stored in the manifest's ``accuracy``:
- action RMSE against fp32 on held-out inputs (episodes the calibration never saw):
  window mode on held-out windows built as the evaluation builds them; stream mode over
  held-out episodes teacher-forced with the dataset's actions, each graph carrying its own
  caches from zero (as in deployment: the low-precision caches drift on their own);
- the closed-loop normalised score: `runtime.Policy` on each graph driving the real env for
  the same reset seeds, through the same `runtime.loop.run_episode` as ``cli.py run``. The
  episodes are paired (episode i of both graphs starts from seed + i), the per-episode delta is
  candidate - fp32, and the mean delta is reported with its 95% confidence interval
  (`paired_score_gate`).

Why an interval: Hopper is chaotic, so an fp16 rounding of 1e-4 in one action sends the two
graphs' episodes apart, and the per-episode delta of a trained policy has a standard deviation
of several points (one fall ends an episode hundreds of steps early). A 5-episode mean of such
deltas misses 0 by more than a point in about half of the exports of a graph that is as good as
fp32, so a gate on the mean alone refused sound graphs by chance. The gate refuses only when
the drop is significant *and* larger than the allowed one: when the whole interval of the delta
lies below -max_score_drop. A graph as good as fp32 is then refused in at most 2.5% of exports
(one-sided, under normal deltas; heavier tails widen the interval and refuse less), and a real
loss of many points over consistent episodes is still refused.

The fp32 graph runs at ONNX Runtime's default optimisation level (how the export runs it);
the candidate with graph optimisations off (ORT_DISABLE_ALL): Q/DQ is then evaluated as
fake-quant in float (`calibration.qdq`). ONNX Runtime's CPU provider cannot run the fp16 graph
as written (it has no fp16 MatMul and drops the graph's casts around the ones it inserts), so
fp16 is evaluated on `export.precision.fp16_emulation`, the same arithmetic in float32 ops.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from contract.errors import DMMError
from contract.manifest import Manifest
from runtime.ort_backend import OrtBackend, cpu_session


def action_errors(reference, candidate, manifest: Manifest, heldout, count: int, *, seed: int = 0) -> dict:
    """RMSE and max |difference| of the actions of two sessions on ``count`` held-out inputs.

    reference, candidate: ONNX Runtime sessions of the same I/O contract; heldout: episodes.
    """
    from calibration.data import episode_trajectory, window_samples
    from runtime.feeds import stream_feeds

    common = dict(state_mean=manifest.state_mean, state_std=manifest.state_std, rtg_scale=manifest.rtg_scale,
                  target_return=manifest.target_return)
    ref_actions, cand_actions, cache_error = [], [], 0.0
    if manifest.mode == "window":
        for feed in window_samples(heldout, count, context_len=manifest.context_len, seed=seed + 1, **common):
            ref_actions.append(reference.run(["action"], feed)[0])  # (1, Adim)
            cand_actions.append(candidate.run(["action"], feed)[0])  # (1, Adim)
        inputs = f"{len(ref_actions)} windows of {len(heldout)} held-out episodes"
    else:
        names = ["action", "dsm_cache_next", "ssm_state_next"]
        zeros = (np.zeros(manifest.input("dsm_cache").shape, np.float32),  # (nl, 1, W-1, D)
                 np.zeros(manifest.input("ssm_state").shape, np.float32))  # (nl, 1, D, N)
        episodes_used = 0
        for index in np.random.default_rng(seed + 1).permutation(len(heldout)):
            trajectory = episode_trajectory(heldout[int(index)], **common)
            (ref_dsm, ref_ssm), (cand_dsm, cand_ssm) = zeros, zeros
            episodes_used += 1
            for t in range(trajectory.states.shape[1]):
                ref_action, ref_dsm, ref_ssm = reference.run(names, stream_feeds(trajectory, t, ref_dsm, ref_ssm))
                cand_action, cand_dsm, cand_ssm = candidate.run(names, stream_feeds(trajectory, t, cand_dsm,
                                                                                    cand_ssm))
                ref_actions.append(ref_action)
                cand_actions.append(cand_action)
                cache_error = max(cache_error, float(np.abs(cand_dsm - ref_dsm).max()),
                                  float(np.abs(cand_ssm - ref_ssm).max()))
                if len(ref_actions) >= count:
                    break
            if len(ref_actions) >= count:
                break
        inputs = (f"{len(ref_actions)} steps of {episodes_used} held-out episodes, teacher-forced, each graph "
                  "carrying its own caches from zero")
    ref = np.concatenate(ref_actions)  # (n, Adim)
    cand = np.concatenate(cand_actions)  # (n, Adim)
    if not np.isfinite(cand).all():
        raise DMMError(f"the low-precision graph produced non-finite actions on held-out inputs ({inputs}); "
                       "expected finite values; it overflowed: export fp32 (or the other precision)")
    difference = cand.astype(np.float64) - ref.astype(np.float64)
    errors = {"action_rmse": float(np.sqrt(np.mean(difference ** 2))),
              "action_max_abs": float(np.abs(difference).max()),
              "action_rms_fp32": float(np.sqrt(np.mean(ref.astype(np.float64) ** 2))),
              "heldout_samples": int(ref.shape[0]), "heldout_inputs": inputs}
    if manifest.mode == "stream":
        errors["cache_max_abs"] = cache_error
    return errors


def closed_loop(model_bytes: bytes, manifest: Manifest, *, optimize: bool, label: str, episodes: int,
                seed: int) -> dict:
    """Returns and normalised scores of ``episodes`` episodes (seeds seed + i) of one graph in the real env."""
    from contract.scores import normalized_score
    from runtime.loop import run_episode
    from runtime.plant import check_plant, make_plant
    from runtime.policy import Policy

    backend = OrtBackend(model_bytes, manifest=manifest, optimize=optimize, threads=1, label=label)
    with backend:
        policy = Policy(backend)
        plant = make_plant(manifest.env_id)
        try:
            check_plant(plant, manifest, manifest.env_id)
            results = [run_episode(policy, plant, seed=seed + index) for index in range(episodes)]
        finally:
            plant.close()
    returns = [r.episode_return for r in results]
    scores = [normalized_score(r, manifest.ref_min_score, manifest.ref_max_score) for r in returns]
    return {"returns": returns, "lengths": [r.length for r in results], "scores": scores,
            "score": float(np.mean(scores))}


# How each precision's graph is evaluated on the CPU (see the module docstring and export.precision).
EVALUATED_AS = {
    "fp16": "the fp16 graph's arithmetic in float32 ops (export.precision.fp16_emulation: fp16-rounded Linear "
            "inputs, weights and outputs, fp32 accumulation), ONNX Runtime CPU, graph optimisations off",
    "int8": "the Q/DQ graph, ONNX Runtime CPU, graph optimisations off (Q/DQ as fake-quant)",
}


SCORE_CONFIDENCE = 0.95  # two-sided level of the reported interval of the paired score delta


@functools.lru_cache(maxsize=256)
def student_t_quantile(probability: float, dof: int) -> float:
    """The ``probability`` quantile of Student's t with ``dof`` degrees of freedom (numpy only).

    Bisection on the CDF, which is 1/2 plus Simpson's integral of the density from 0; exact to
    about 1e-6 for the quantiles an interval needs (0.9 .. 0.9995).
    """
    if not 0.5 <= probability < 1.0 or dof < 1:
        raise DMMError(f"t quantile | received probability {probability}, dof {dof} | expected 0.5 <= p < 1, dof >= 1")
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 4001)  # (4001,), an even number of Simpson intervals
        density = np.exp(log_norm - (dof + 1) / 2 * np.log1p(grid ** 2 / dof))  # (4001,)
        step = x / 4000
        return 0.5 + step / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum())

    low, high = 0.0, 1.0
    while cdf(high) < probability:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2


def paired_score_gate(deltas, max_score_drop: float, confidence: float = SCORE_CONFIDENCE) -> dict:
    """The verdict on paired per-episode score deltas (candidate - fp32, the same reset seeds).

    Returns the mean delta, its two-sided ``confidence`` interval (Student's t on the paired
    differences) and ``refused``: True only when the whole interval lies below -max_score_drop,
    that is when the graph loses significantly more than the allowed drop. One episode gives no
    interval: the score is then reported and not judged.
    """
    deltas = np.asarray(deltas, dtype=np.float64)  # (n,)
    count = int(deltas.size)
    if count == 0 or not np.isfinite(deltas).all():
        raise DMMError(f"score deltas | received {deltas.tolist()} | expected one finite delta per paired episode")
    mean = float(deltas.mean())
    record = {"score_delta": mean, "score_drop": -mean, "score_confidence": confidence, "paired_episodes": count}
    if count < 2:
        return {**record, "score_delta_ci": None, "score_refused": False,
                "score_verdict": "not judged: one episode gives no interval (use --score-episodes 2 or more)"}
    half_width = student_t_quantile(1 - (1 - confidence) / 2, count - 1) * float(deltas.std(ddof=1)) / math.sqrt(count)
    low, high = mean - half_width, mean + half_width
    refused = bool(high < -float(max_score_drop))
    if refused:
        verdict = (f"refused: the whole {confidence:.0%} interval of the delta lies below -{max_score_drop:g} "
                   "(a significant drop larger than the allowed one)")
    elif mean < -float(max_score_drop):
        verdict = (f"passed: the mean drop exceeds {max_score_drop:g} but the {confidence:.0%} interval reaches "
                   f"-{max_score_drop:g} or above, so it is not significant over {count} episodes")
    else:
        verdict = f"passed: the mean delta is within the allowed drop of {max_score_drop:g}"
    return {**record, "score_delta_ci": [low, high], "score_refused": refused, "score_verdict": verdict}


def accuracy_report(reference_proto, candidate_proto, *, manifest: Manifest, heldout, heldout_samples: int,
                    episodes: int, seed: int, max_score_drop: float) -> dict:
    """The manifest's ``accuracy`` record of ``candidate_proto`` (precision ``manifest.precision``).

    candidate_proto: the graph to evaluate, as `EVALUATED_AS` describes it (for fp16 the caller
    passes `export.precision.fp16_emulation` of the deployable graph).
    """
    reference_bytes = reference_proto.SerializeToString()
    candidate_bytes = candidate_proto.SerializeToString()
    reference = cpu_session(reference_bytes, optimize=True)
    candidate = cpu_session(candidate_bytes, optimize=False)
    report = {
        "reference": "fp32 graph, ONNX Runtime CPU",
        "candidate": EVALUATED_AS[manifest.precision],
        **action_errors(reference, candidate, manifest, heldout, heldout_samples, seed=seed),
    }
    fp32_manifest = dataclasses.replace(manifest, precision="fp32")
    fp32 = closed_loop(reference_bytes, fp32_manifest, optimize=True, label="fp32", episodes=episodes, seed=seed)
    low = closed_loop(candidate_bytes, manifest, optimize=False, label=manifest.precision, episodes=episodes,
                      seed=seed)
    deltas = [candidate_score - reference_score
              for candidate_score, reference_score in zip(low["scores"], fp32["scores"], strict=True)]
    report.update({
        "env_id": manifest.env_id, "target_return": manifest.target_return,
        "seeds": [seed + index for index in range(episodes)],
        "returns_fp32": fp32["returns"], "returns": low["returns"],
        "lengths_fp32": fp32["lengths"], "lengths": low["lengths"],
        "score_fp32": fp32["score"], "score": low["score"], "score_deltas": deltas,
        "max_score_drop": float(max_score_drop),
        **paired_score_gate(deltas, max_score_drop),
    })
    return report


def describe_delta(accuracy: dict) -> str:
    """'delta -0.68 (95% CI -2.91 .. +1.55, 5 paired episodes)'."""
    interval = accuracy.get("score_delta_ci")
    span = (f"{accuracy.get('score_confidence', SCORE_CONFIDENCE):.0%} CI {interval[0]:+.2f} .. {interval[1]:+.2f}, "
            if interval else "no interval, ")
    return f"delta {accuracy['score_delta']:+.2f} ({span}{len(accuracy['seeds'])} paired episodes)"


def accuracy_summary(accuracy: dict, precision: str) -> str:
    """One line for the CLI."""
    return (f"{precision} accuracy vs fp32 (ONNX Runtime CPU): action RMSE {accuracy['action_rmse']:.2e} "
            f"(max |diff| {accuracy['action_max_abs']:.2e}) on {accuracy['heldout_samples']} held-out samples; "
            f"closed-loop normalised score {accuracy['score']:.2f} vs {accuracy['score_fp32']:.2f}, "
            f"{describe_delta(accuracy)}; allowed drop {accuracy['max_score_drop']:g}: "
            f"{accuracy.get('score_verdict', 'not judged')}")
