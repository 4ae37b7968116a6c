"""Accuracy reports of a low-precision graph against its fp32 graph, on the CPU with ONNX Runtime.

Two figures (docs/design.md#accuracy-reports), both stored in the manifest's ``accuracy``:
- action RMSE against fp32 on held-out inputs (episodes the calibration never saw):
  window mode on held-out windows built as the evaluation builds them; stream mode over
  held-out episodes teacher-forced with the dataset's actions, each graph carrying its own
  caches from zero (as in deployment: the low-precision caches drift on their own);
- the closed-loop normalised score: `runtime.Policy` on each graph driving the real env for
  the same seeds, through the same `runtime.loop.run_episode` as ``cli.py run``; the score
  delta is candidate - fp32 (``score_drop`` = fp32 - candidate, what --max-score-drop bounds).

The fp32 graph runs at ONNX Runtime's default optimisation level (how the export runs it);
the candidate with graph optimisations off (ORT_DISABLE_ALL): Q/DQ is then evaluated as
fake-quant in float (`calibration.qdq`). ONNX Runtime's CPU provider cannot run the fp16 graph
as written (it has no fp16 MatMul and drops the graph's casts around the ones it inserts), so
fp16 is evaluated on `export.precision.fp16_emulation`, the same arithmetic in float32 ops.
"""

from __future__ import annotations

import dataclasses

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
    return {"returns": returns, "lengths": [r.length for r in results], "score": float(np.mean(scores))}


# How each precision's graph is evaluated on the CPU (see the module docstring and export.precision).
EVALUATED_AS = {
    "fp16": "the fp16 graph's arithmetic in float32 ops (export.precision.fp16_emulation: fp16-rounded Linear "
            "inputs, weights and outputs, fp32 accumulation), ONNX Runtime CPU, graph optimisations off",
    "int8": "the Q/DQ graph, ONNX Runtime CPU, graph optimisations off (Q/DQ as fake-quant)",
}


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
    report.update({
        "env_id": manifest.env_id, "target_return": manifest.target_return,
        "seeds": [seed + index for index in range(episodes)],
        "returns_fp32": fp32["returns"], "returns": low["returns"],
        "lengths_fp32": fp32["lengths"], "lengths": low["lengths"],
        "score_fp32": fp32["score"], "score": low["score"],
        "score_delta": low["score"] - fp32["score"], "score_drop": fp32["score"] - low["score"],
        "max_score_drop": float(max_score_drop),
    })
    return report


def accuracy_summary(accuracy: dict, precision: str) -> str:
    """One line for the CLI."""
    return (f"{precision} accuracy vs fp32 (ONNX Runtime CPU): action RMSE {accuracy['action_rmse']:.2e} "
            f"(max |diff| {accuracy['action_max_abs']:.2e}) on {accuracy['heldout_samples']} held-out samples; "
            f"closed-loop normalised score {accuracy['score']:.3f} vs {accuracy['score_fp32']:.3f} "
            f"(delta {accuracy['score_delta']:+.3f}, allowed drop {accuracy['max_score_drop']:g}) over "
            f"{len(accuracy['seeds'])} episodes")
