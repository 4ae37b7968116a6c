"""The closed-loop score gate of a low-precision export (calibration/accuracy.py).

The gate is a sequential non-inferiority test on paired per-episode score deltas (the same reset
seeds for both graphs): a graph passes only once it is shown no worse than the allowed drop, is
refused once shown worse, and plays more episodes in between, up to a cap. Both error rates are
checked here on synthetic paired deltas shaped like a chaotic plant's (mostly small, now and then
an episode that ends hundreds of steps earlier or later), and once on a real trained checkpoint;
bench/precision_gate.py measures them on real closed-loop episodes.
"""

from __future__ import annotations

import numpy as np
import pytest

from calibration.accuracy import ScoreGate, judge_deltas, sequential_score_gate, student_t_quantile
from contract.errors import DMMError

LIMIT = 3.0  # an allowed drop of three points


def test_t_quantiles_are_the_textbook_ones():
    for dof, expected in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert student_t_quantile(0.975, dof) == pytest.approx(expected, abs=1e-3)
    assert student_t_quantile(0.95, 4) == pytest.approx(2.1318, abs=1e-3)
    assert student_t_quantile(0.975, 100_000) == pytest.approx(1.9600, abs=1e-3)
    with pytest.raises(DMMError, match="expected 0.5 <= p < 1"):
        student_t_quantile(1.0, 3)


def chaotic_deltas(rng, count: int, mean: float = 0.0) -> np.ndarray:
    """(count,) paired deltas: a few points of noise, and in one episode of five a jump of 20-60 points
    either way (one graph's hopper falls, the other's does not)."""
    noise = rng.normal(0.0, 4.0, size=count)
    jumps = rng.uniform(20.0, 60.0, size=count) * rng.choice([-1.0, 1.0], size=count)
    return mean + noise + np.where(rng.random(count) < 0.2, jumps, 0.0)


def outcomes(draw, gate: ScoreGate, exports: int, seed: int) -> dict:
    """How ``exports`` sequential exports end when each batch of deltas comes from ``draw(rng, count)``."""
    rng = np.random.default_rng(seed)
    verdicts = [sequential_score_gate(lambda start, count: draw(rng, count), gate) for _ in range(exports)]
    return {"passed": np.mean([not v["score_refused"] for v in verdicts]),
            "refused_as_worse": np.mean([v["score_looks"][-1]["decision"] == "refuse" for v in verdicts]),
            "episodes": np.mean([v["paired_episodes"] for v in verdicts])}


def test_a_graph_at_the_allowed_drop_passes_in_at_most_alpha_of_exports():
    """The guarantee: a graph whose mean loss is exactly the allowed drop (the worst case for it), however
    noisy its episodes, passes in at most 5% of exports, though the gate looks up to four times."""
    gate = ScoreGate(max_score_drop=LIMIT, batch=10, cap=40)
    for draw in (lambda rng, n: rng.normal(-LIMIT, 6.0, size=n), lambda rng, n: chaotic_deltas(rng, n, -LIMIT)):
        assert outcomes(draw, gate, 2000, seed=1)["passed"] <= 0.05


def test_a_graph_as_good_as_fp32_is_rarely_refused_as_worse_and_passes_when_the_episodes_allow():
    gate = ScoreGate(max_score_drop=LIMIT, batch=10, cap=40)
    steady = outcomes(lambda rng, n: rng.normal(0.0, 3.0, size=n), gate, 2000, seed=2)
    assert steady["passed"] >= 0.95 and steady["episodes"] < 15  # most exports stop at the first look
    chaotic = outcomes(lambda rng, n: chaotic_deltas(rng, n), gate, 2000, seed=3)
    assert chaotic["refused_as_worse"] <= 0.05
    # Chaotic episodes need the cap more often; what is not shown is refused, never passed by default.
    assert chaotic["episodes"] > steady["episodes"]


def test_a_real_loss_is_refused_and_no_more_episodes_are_played_than_needed():
    gate = ScoreGate(max_score_drop=LIMIT, batch=10, cap=40)
    broken = outcomes(lambda rng, n: rng.normal(-15.0, 3.0, size=n), gate, 500, seed=4)
    assert broken["refused_as_worse"] > 0.99 and broken["episodes"] == 10  # shown worse at the first look


def test_inconclusive_at_the_cap_is_refused_unless_accepted_and_the_record_says_which():
    wide = [40.0, -40.0, 35.0, -45.0]  # mean -2.5 with a huge spread: neither shown no worse nor worse

    def play(start, count):
        return [wide[(start + index) % 4] for index in range(count)]

    refused = sequential_score_gate(play, ScoreGate(max_score_drop=LIMIT, batch=4, cap=8))
    assert refused["score_refused"] and refused["score_inconclusive"] and refused["paired_episodes"] == 8
    assert [look["episodes"] for look in refused["score_looks"]] == [4, 8]
    assert refused["score_verdict"].startswith("refused as inconclusive")
    accepted = sequential_score_gate(play, ScoreGate(max_score_drop=LIMIT, batch=4, cap=8, accept_inconclusive=True))
    assert not accepted["score_refused"] and accepted["score_accepted_inconclusive"]
    assert "--accept-inconclusive" in accepted["score_verdict"]


def test_a_look_reports_its_bounds_at_the_bonferroni_level():
    gate = ScoreGate(max_score_drop=LIMIT, batch=5, cap=20)  # 4 looks: each bound one-sided at 1 - 0.05 / 4
    look = judge_deltas([0.5, -2.0, 1.0, -4.0, 0.0], gate)
    half = student_t_quantile(1 - 0.05 / 4, 4) * np.std([0.5, -2.0, 1.0, -4.0, 0.0], ddof=1) / np.sqrt(5)
    assert (look["low"], look["high"]) == pytest.approx((-0.9 - half, -0.9 + half))
    assert look["decision"] == "continue"  # the lower bound -5.7 reaches below -3
    assert judge_deltas([-1.5] * 5, gate)["decision"] == "pass"  # identical episodes: no spread, the mean decides
    assert judge_deltas([-4.5] * 5, gate)["decision"] == "refuse"
    with pytest.raises(DMMError, match="two or more finite deltas"):
        judge_deltas([float("nan"), 1.0], gate)
    with pytest.raises(DMMError, match="expected 2 <= batch <= cap"):
        ScoreGate(max_score_drop=LIMIT, batch=1, cap=20)


@pytest.mark.slow
def test_fp16_of_a_trained_checkpoint_passes_with_the_defaults(tmp_path_factory, tmp_path, capsys):
    """A checkpoint trained on the medium SAC policy's data: its fp16 graph, at fp16 rounding level per step,
    passes `cli.py export --fp16` with the default gate, and the report pairs the episodes by seed."""
    import cli
    from contract.manifest import manifest_path_for, read_manifest
    from tests.helpers import trained_checkpoint

    checkpoint, dataset = trained_checkpoint(tmp_path_factory)
    out = tmp_path / "trained-fp16"
    code = cli.main(["export", "--checkpoint", str(checkpoint), "--fp16", "--dataset", str(dataset),
                     "--out", str(out), "--no-engine"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    accuracy = read_manifest(manifest_path_for(out.with_suffix(".onnx"))).accuracy
    assert accuracy["action_rmse"] < 3e-3  # fp16 rounding of the Linear layers, nothing more
    episodes = accuracy["paired_episodes"]
    assert episodes % 10 == 0 and accuracy["seeds"] == list(range(episodes))  # looks of 10 paired episodes
    assert len(accuracy["score_deltas"]) == len(accuracy["returns"]) == episodes
    assert not accuracy["score_refused"] and accuracy["score_verdict"].startswith("passed: shown no worse")
    low, high = accuracy["score_delta_ci"]
    assert -accuracy["max_score_drop"] < low <= accuracy["score_delta"] <= high  # the lower bound clears the drop
    assert accuracy["action_rmse_relative"] < accuracy["max_action_error"] == 0.01
    assert f"{episodes} paired episodes" in captured.out and "bounds" in captured.out
