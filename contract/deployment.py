"""The deployment facts a trained policy carries, as one frozen record.

Training derives them once (from a preset, or from the data when the env has no preset), the
checkpoint stores them, evaluation, export and the manifest read them, and the runtime's
`Manifest` gives them back (`Manifest.facts`). One record passed as one argument, so that no
stage copies a long list of loose values from the one before.

A policy trained from a robot's logs has no simulator and no D4RL reference: ``env_id`` and the
reference scores are then None, and its scores are raw returns, never normalised ones.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from contract.errors import DMMError, describe_error
from contract.scores import normalized_score


@dataclass(frozen=True)
class PolicyFacts:
    """What a policy needs to be fed and judged, whatever runs it."""

    preset: str  # a known preset's name, or "data" (derived from the dataset)
    env_id: str | None  # the gymnasium id of its simulator; None: no simulator (a robot's logs)
    state_dim: int
    act_dim: int
    context_len: int
    state_mean: tuple[float, ...]  # (S,)
    state_std: tuple[float, ...]  # (S,), eps already added
    rtg_scale: float
    target_returns: tuple[float, ...]  # the first is the default target
    ref_min_score: float | None = None  # D4RL-style reference returns; None: scores are raw returns
    ref_max_score: float | None = None
    state_min: tuple[float, ...] | None = None  # (S,) the training states' extremes; None: not recorded
    state_max: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("state_mean", "state_std", "target_returns", "state_min", "state_max"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in np.asarray(value).reshape(-1)))
        if self.env_id == "":
            object.__setattr__(self, "env_id", None)
        self.validate()

    def validate(self, source: str = "policy facts") -> None:
        if len(self.state_mean) != self.state_dim or len(self.state_std) != self.state_dim:
            raise DMMError(f"{source}: state_mean/std with {len(self.state_mean)}/{len(self.state_std)} entries",
                           f"state_dim={self.state_dim} each", "retrain or re-export")
        if not (math.isfinite(self.rtg_scale) and self.rtg_scale > 0):
            raise DMMError(f"{source}: rtg_scale {self.rtg_scale}", "a positive number", "retrain or re-export")
        if not self.target_returns or not all(math.isfinite(v) for v in self.target_returns):
            raise DMMError(f"{source}: target_returns {self.target_returns}", "one or more target returns, all finite",
                           "retrain or re-export with finite target returns")
        if (self.ref_min_score is None) != (self.ref_max_score is None):
            raise DMMError(f"{source}: reference scores min {self.ref_min_score}, max {self.ref_max_score}",
                           "both or neither", "retrain or re-export with both reference scores or none")

    @property
    def has_simulator(self) -> bool:
        return self.env_id is not None

    @property
    def normalises(self) -> bool:
        """True when scores are D4RL-normalised; False: they are raw returns."""
        return self.ref_min_score is not None

    @property
    def score_name(self) -> str:
        return "normalised score" if self.normalises else "return"

    def score(self, episode_return):
        """The score of a return (or an array of returns): normalised when the facts carry references."""
        if not self.normalises:
            value = np.asarray(episode_return, dtype=np.float64)
            return float(value) if value.ndim == 0 else value
        return normalized_score(episode_return, self.ref_min_score, self.ref_max_score)

    def to_dict(self) -> dict:
        """The JSON form; the same keys the checkpoint and manifest have always stored."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "policy facts") -> PolicyFacts:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{name: data[name] for name in names if name in data})
        except (TypeError, ValueError) as error:
            raise DMMError(f"{source}: the policy's facts are incomplete or malformed ({describe_error(error)})",
                           "every policy fact, well-formed", "retrain or re-export") from None
