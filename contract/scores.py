"""The D4RL normalised score, used by evaluation, the control loop and the accuracy reports."""

from __future__ import annotations

import numpy as np

from contract.errors import DMMError


def normalized_score(episode_return, ref_min: float, ref_max: float):
    """D4RL normalised score, ``100 * (return - ref_min) / (ref_max - ref_min)``.

    ``episode_return`` may be a number (a float comes back) or an array (an array comes back).
    """
    if ref_max == ref_min:
        raise DMMError(f"reference scores min={ref_min} and max={ref_max} (equal)", "max != min",
                       "fix the dataset's ref_min_score/ref_max_score")
    score = 100.0 * (np.asarray(episode_return, dtype=np.float64) - ref_min) / (ref_max - ref_min)
    return float(score) if score.ndim == 0 else score
