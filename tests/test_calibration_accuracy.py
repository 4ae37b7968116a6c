"""The closed-loop score gate of a low-precision export (calibration/accuracy.py).

The gate judges paired per-episode score deltas (the same reset seeds for both graphs) by their
confidence interval. Its false-refusal rate is measured on synthetic paired deltas shaped like
a chaotic plant's (mostly small, now and then an episode that ends hundreds of steps earlier or
later), against the mean-only gate it replaces, and once on a real trained checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest

from calibration.accuracy import paired_score_gate, student_t_quantile
from contract.errors import DMMError

LIMIT = 1.0  # the fp16 default (export.precision.DEFAULT_MAX_SCORE_DROP)


def test_t_quantiles_are_the_textbook_ones():
    for dof, expected in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert student_t_quantile(0.975, dof) == pytest.approx(expected, abs=1e-3)
    assert student_t_quantile(0.95, 4) == pytest.approx(2.1318, abs=1e-3)
    assert student_t_quantile(0.975, 100_000) == pytest.approx(1.9600, abs=1e-3)
    with pytest.raises(DMMError, match="expected 0.5 <= p < 1"):
        student_t_quantile(1.0, 3)


def chaotic_deltas(rng, trials: int, episodes: int, mean: float = 0.0) -> np.ndarray:
    """(trials, episodes) paired deltas: a few points of noise, and in one episode of five a jump of
    20-60 points either way (one graph's hopper falls, the other's does not)."""
    noise = rng.normal(0.0, 4.0, size=(trials, episodes))
    jumps = rng.uniform(20.0, 60.0, size=(trials, episodes)) * rng.choice([-1.0, 1.0], size=(trials, episodes))
    return mean + noise + np.where(rng.random((trials, episodes)) < 0.2, jumps, 0.0)


def refusal_rate(deltas: np.ndarray, limit: float = LIMIT) -> float:
    return float(np.mean([paired_score_gate(row, limit)["score_refused"] for row in deltas]))


@pytest.mark.parametrize("episodes", [5, 10, 20])
def test_a_graph_as_good_as_fp32_is_rarely_refused(episodes):
    rng = np.random.default_rng(episodes)
    deltas = chaotic_deltas(rng, 4000, episodes)
    assert refusal_rate(deltas) < 0.03
    # The mean-only gate it replaces ("drop > 1 point") refuses such a graph about every other time.
    assert np.mean(deltas.mean(axis=1) < -LIMIT) > 0.3


def test_a_skewed_delta_with_no_loss_on_average_is_rarely_refused():
    rng = np.random.default_rng(7)
    # One episode in five falls 40 points short, the others gain 10: no loss on average.
    deltas = np.where(rng.random((4000, 5)) < 0.2, -40.0, 10.0) + rng.normal(0.0, 1.0, size=(4000, 5))
    assert refusal_rate(deltas) < 0.03


def test_a_drop_within_the_allowance_is_rarely_refused():
    rng = np.random.default_rng(1)
    assert refusal_rate(rng.normal(-0.9, 3.0, size=(4000, 5))) < 0.03


def test_a_real_loss_is_refused():
    rng = np.random.default_rng(2)
    assert refusal_rate(rng.normal(-10.0, 3.0, size=(2000, 5))) > 0.95  # 10 points, consistently
    assert refusal_rate(chaotic_deltas(rng, 2000, 20, mean=-25.0)) > 0.9  # a broken graph, noisy episodes
    verdict = paired_score_gate([-1.5] * 5, LIMIT)  # identical episodes: no spread, the mean decides
    assert verdict["score_refused"] and verdict["score_delta_ci"] == [-1.5, -1.5]


def test_the_verdict_reports_the_interval():
    verdict = paired_score_gate([0.5, -2.0, 1.0, -4.0, 0.0], LIMIT)
    low, high = verdict["score_delta_ci"]
    assert low < verdict["score_delta"] < high and not verdict["score_refused"]
    assert verdict["score_delta"] == pytest.approx(-0.9)
    assert verdict["paired_episodes"] == 5 and verdict["score_drop"] == pytest.approx(0.9)
    single = paired_score_gate([-50.0], LIMIT)
    assert single["score_delta_ci"] is None and not single["score_refused"] and "not judged" in single["score_verdict"]
    with pytest.raises(DMMError, match="one finite delta per paired episode"):
        paired_score_gate([float("nan"), 1.0], LIMIT)


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
    assert accuracy["seeds"] == [0, 1, 2, 3, 4] and len(accuracy["score_deltas"]) == 5
    assert not accuracy["score_refused"] and accuracy["score_verdict"].startswith("passed")
    low, high = accuracy["score_delta_ci"]
    assert low <= accuracy["score_delta"] <= high
    assert "95% CI" in captured.out and "5 paired episodes" in captured.out
