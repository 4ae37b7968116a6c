"""Accuracy reports of a low-precision graph against its fp32 graph, on the CPU with ONNX Runtime.

Two figures (docs/design.md#accuracy-reports), both stored in the manifest's ``accuracy``:
- action RMSE against fp32 on held-out inputs (episodes the calibration never saw):
  window mode on held-out windows built as the evaluation builds them; stream mode over
  held-out episodes teacher-forced with the dataset's actions, each graph carrying its own
  caches from zero (as in deployment: the low-precision caches drift on their own);
- the closed-loop normalised score: `runtime.Policy` on each graph driving the real env for
  the same reset seeds, through the same `runtime.loop.run_episode` as ``cli.py run``. The
  episodes are paired (episode i of both graphs starts from seed + i), and the per-episode
  delta is candidate - fp32.

The gate on that delta is a non-inferiority test (`ScoreGate`, `sequential_score_gate`). A
"passed" must mean "shown no worse than the allowed drop", not "not shown worse": Hopper is
chaotic, so a rounding of 1e-4 in one action sends the two graphs' episodes apart, and a paired
delta has a spread of many points (one fall ends an episode hundreds of steps early). The graph
passes when the lower bound of the delta lies above -allowed drop, is refused when the upper
bound lies below it, and otherwise plays another batch of paired episodes, up to a cap.
Bonferroni over the planned looks keeps each error at most 5% however many looks are taken;
inconclusive at the cap is refused unless the user accepts it explicitly.

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
from dataclasses import dataclass

import numpy as np

from calibration.data import episode_trajectory, window_samples
from contract.errors import DMMError
from contract.manifest import Manifest
from runtime.feeds import stream_feeds
from runtime.loop import run_episode
from runtime.ort_backend import OrtBackend, cpu_session
from runtime.plant import check_plant, make_plant
from runtime.policy import Policy


def action_errors(reference, candidate, manifest: Manifest, heldout, count: int, *, seed: int = 0) -> dict:
    """RMSE and max |difference| of the actions of two sessions on ``count`` held-out inputs.

    reference, candidate: ONNX Runtime sessions of the same I/O contract; heldout: episodes.
    """
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
        raise DMMError(f"the low-precision graph's actions on held-out inputs ({inputs}): non-finite (it overflowed)",
                       "finite actions", "export fp32 (or the other precision)")
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
    scores = [manifest.facts.score(r) for r in returns]
    return {"returns": returns, "lengths": [r.length for r in results], "scores": scores,
            "score": float(np.mean(scores))}


# How each precision's graph is evaluated on the CPU (see the module docstring and export.precision).
EVALUATED_AS = {
    "fp16": "the fp16 graph's arithmetic in float32 ops (export.precision.fp16_emulation: fp16-rounded Linear "
            "inputs, weights and outputs, fp32 accumulation), ONNX Runtime CPU, graph optimisations off",
    "int8": "the Q/DQ graph, ONNX Runtime CPU, graph optimisations off (Q/DQ as fake-quant)",
}


@functools.lru_cache(maxsize=256)
def student_t_quantile(probability: float, dof: int) -> float:
    """The ``probability`` quantile of Student's t with ``dof`` degrees of freedom (numpy only).

    Bisection on the CDF, which is 1/2 plus Simpson's integral of the density from 0; exact to
    about 1e-6 for the quantiles an interval needs (0.9 .. 0.9995).
    """
    if not 0.5 <= probability < 1.0 or dof < 1:
        raise DMMError(f"t quantile of probability {probability}, dof {dof}", "0.5 <= p < 1 and dof >= 1",
                       "ask for a one-sided bound level of at least 0.5 from two samples or more")
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


SCORE_ALPHA = 0.05  # each error, one-sided: passing a graph worse than the allowed drop; refusing one that is not


@dataclass(frozen=True)
class ScoreGate:
    """How the closed-loop score of a low-precision graph is judged: non-inferiority, sequentially.

    The graph passes once the lower bound of the paired delta (candidate - fp32) lies above
    ``-max_score_drop``: shown no worse than the allowed drop. It is refused once the upper bound
    lies below it: shown worse. In between it is inconclusive and ``batch`` more paired episodes
    are played, up to ``cap``. Every look uses one-sided bounds at ``alpha / looks`` (Bonferroni
    over the planned looks), so however many looks are taken, a graph worse than the allowed drop
    passes, and one within it is refused as worse, each with probability at most ``alpha``.
    Inconclusive at the cap is refused unless ``accept_inconclusive``, which the manifest records.
    """

    max_score_drop: float
    batch: int = 10
    cap: int = 40
    alpha: float = SCORE_ALPHA
    accept_inconclusive: bool = False

    def __post_init__(self):
        if not (2 <= self.batch <= self.cap):
            raise DMMError(f"score gate batch {self.batch}, cap {self.cap}",
                           "2 <= batch <= cap (a look needs two paired episodes for an interval)",
                           "pass --score-batch 2 or more and --score-episodes at least that")
        if not (math.isfinite(self.max_score_drop) and 0 < self.alpha < 0.5):
            raise DMMError(f"score gate allowed drop {self.max_score_drop}, alpha {self.alpha}",
                           "a finite drop and 0 < alpha < 0.5", "pass a finite --max-score-drop")

    @property
    def looks(self) -> int:
        return math.ceil(self.cap / self.batch)

    @property
    def bound_level(self) -> float:
        """The one-sided level of each look's bounds."""
        return 1 - self.alpha / self.looks

    def rule_text(self) -> str:
        """The gate's rule in words (for the manifest)."""
        return (f"non-inferiority, one-sided {1 - self.alpha:.0%} per error, Bonferroni over up to {self.looks} "
                f"looks of {self.batch} paired episodes (bounds at {self.bound_level:.2%}), cap {self.cap}")


def judge_deltas(deltas, gate: ScoreGate) -> dict:
    """One look at paired per-episode score deltas: their mean, its bounds, and pass / refuse / continue."""
    deltas = np.asarray(deltas, dtype=np.float64)  # (n,)
    count = int(deltas.size)
    if count < 2 or not np.isfinite(deltas).all():
        raise DMMError(f"score deltas {deltas.tolist()}", "two or more finite deltas, one per paired episode",
                       "play at least two paired episodes per look")
    mean = float(deltas.mean())
    half_width = student_t_quantile(gate.bound_level, count - 1) * float(deltas.std(ddof=1)) / math.sqrt(count)
    low, high = mean - half_width, mean + half_width
    margin = -float(gate.max_score_drop)
    decision = "pass" if low > margin else "refuse" if high < margin else "continue"
    return {"episodes": count, "delta": mean, "low": low, "high": high, "decision": decision}


def sequential_score_gate(play, gate: ScoreGate) -> dict:
    """Play paired episodes in batches until the gate decides or the cap is reached.

    play(start, count) plays episodes start .. start + count - 1 of both graphs and returns their
    paired deltas. Returns the manifest's score-gate record.
    """
    deltas: list[float] = []
    looks: list[dict] = []
    while True:
        deltas += list(play(len(deltas), min(gate.batch, gate.cap - len(deltas))))
        look = judge_deltas(deltas, gate)
        looks.append(look)
        if look["decision"] != "continue" or len(deltas) >= gate.cap:
            break
    drop = gate.max_score_drop
    bounds = f"{look['low']:+.2f} .. {look['high']:+.2f}"
    inconclusive = look["decision"] == "continue"
    if look["decision"] == "pass":
        verdict = f"passed: shown no worse than the allowed drop {drop:g} (lower bound {look['low']:+.2f} > -{drop:g})"
    elif look["decision"] == "refuse":
        verdict = f"refused: shown worse than the allowed drop {drop:g} (upper bound {look['high']:+.2f} < -{drop:g})"
    elif gate.accept_inconclusive:
        verdict = (f"accepted by --accept-inconclusive: after {len(deltas)} paired episodes the bounds {bounds} "
                   f"still contain -{drop:g}: neither shown no worse nor shown worse")
    else:
        verdict = (f"refused as inconclusive: after {len(deltas)} paired episodes (the cap) the bounds {bounds} "
                   f"still contain -{drop:g}")
    return {
        "score_gate": gate.rule_text(), "score_looks": looks, "score_deltas": deltas,
        "score_delta": look["delta"], "score_drop": -look["delta"], "score_delta_ci": [look["low"], look["high"]],
        "score_confidence": gate.bound_level, "paired_episodes": len(deltas), "max_score_drop": float(drop),
        "score_inconclusive": inconclusive, "score_accepted_inconclusive": inconclusive and gate.accept_inconclusive,
        "score_refused": look["decision"] == "refuse" or (inconclusive and not gate.accept_inconclusive),
        "score_verdict": verdict,
    }


def accuracy_report(reference_proto, candidate_proto, *, manifest: Manifest, heldout, heldout_samples: int,
                    gate: ScoreGate, seed: int, action_limit: float) -> dict:
    """The manifest's ``accuracy`` record of ``candidate_proto`` (precision ``manifest.precision``).

    candidate_proto: the graph to evaluate, as `EVALUATED_AS` describes it (for fp16 the caller
    passes `export.precision.fp16_emulation` of the deployable graph). The closed-loop episodes
    are played in the gate's batches (`sequential_score_gate`), episode i of both graphs from
    reset seed ``seed + i``. The action RMSE is judged first, as a fraction of the mean action
    range against ``action_limit``: a graph refused there plays no episode (``action_refused``).
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
    action_range = float(np.mean(np.asarray(manifest.action_high) - np.asarray(manifest.action_low)))
    report["action_rmse_relative"] = report["action_rmse"] / action_range
    report["max_action_error"] = float(action_limit)
    report["action_refused"] = bool(report["action_rmse_relative"] > action_limit)
    if report["action_refused"]:
        return report
    if not (manifest.facts.has_simulator and manifest.facts.normalises):
        # A policy from a robot's logs: no simulator to play episodes in, and no reference scores that make
        # a drop in points comparable. The held-out action error is the whole judgement, and the report says so.
        why = "no simulator" if not manifest.facts.has_simulator else "no reference scores"
        report.update({"score_refused": False, "score_verdict": f"not played ({why}): judged by the held-out "
                       "action error alone", "closed_loop": False})
        return report
    fp32_manifest = dataclasses.replace(manifest, precision="fp32")
    played = {"fp32": [], "low": []}

    def play(start: int, count: int) -> list[float]:
        fp32 = closed_loop(reference_bytes, fp32_manifest, optimize=True, label="fp32", episodes=count,
                           seed=seed + start)
        low = closed_loop(candidate_bytes, manifest, optimize=False, label=manifest.precision, episodes=count,
                          seed=seed + start)
        played["fp32"].append(fp32)
        played["low"].append(low)
        return [candidate - reference for candidate, reference in zip(low["scores"], fp32["scores"], strict=True)]

    verdict = sequential_score_gate(play, gate)

    def joined(side: str, key: str) -> list:
        return [value for batch in played[side] for value in batch[key]]

    episodes = verdict["paired_episodes"]
    report.update({
        "env_id": manifest.env_id, "target_return": manifest.target_return,
        "seeds": [seed + index for index in range(episodes)],
        "returns_fp32": joined("fp32", "returns"), "returns": joined("low", "returns"),
        "lengths_fp32": joined("fp32", "lengths"), "lengths": joined("low", "lengths"),
        "score_fp32": float(np.mean(joined("fp32", "scores"))), "score": float(np.mean(joined("low", "scores"))),
        **verdict,
    })
    return report


def describe_delta(accuracy: dict) -> str:
    """'delta -0.68 (bounds -2.91 .. +1.55 at 99.4% each, 20 paired episodes)'."""
    interval = accuracy.get("score_delta_ci")
    span = (f"bounds {interval[0]:+.2f} .. {interval[1]:+.2f} at {accuracy.get('score_confidence', 0.95):.1%} each, "
            if interval else "no interval, ")
    return f"delta {accuracy['score_delta']:+.2f} ({span}{len(accuracy['seeds'])} paired episodes)"


def accuracy_summary(accuracy: dict, precision: str) -> str:
    """One line for the CLI."""
    relative = (f", {accuracy['action_rmse_relative']:.1e} of the action range, limit {accuracy['max_action_error']:g}"
                if "action_rmse_relative" in accuracy else "")
    if accuracy.get("closed_loop") is False:
        return (f"{precision} accuracy vs fp32 (ONNX Runtime CPU): action RMSE {accuracy['action_rmse']:.2e}{relative} "
                f"(max |diff| {accuracy['action_max_abs']:.2e}) on {accuracy['heldout_samples']} held-out samples; "
                f"closed loop {accuracy['score_verdict']}")
    return (f"{precision} accuracy vs fp32 (ONNX Runtime CPU): action RMSE {accuracy['action_rmse']:.2e}{relative} "
            f"(max |diff| {accuracy['action_max_abs']:.2e}) on {accuracy['heldout_samples']} held-out samples; "
            f"closed-loop normalised score {accuracy['score']:.2f} vs {accuracy['score_fp32']:.2f}, "
            f"{describe_delta(accuracy)}; allowed drop {accuracy['max_score_drop']:g}: "
            f"{accuracy.get('score_verdict', 'not judged')}")
