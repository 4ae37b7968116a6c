"""Limits at the actuator: per-dimension bounds, a rate limit and a start-up ramp, applied to every action.

The engine's action a (Adim,) float32, finite, becomes the action sent to the plant in three
steps, each in float32 arithmetic (the C step, export/c_template/policy.c.in, does the same
operations in the same order, so both agree to float rounding):

    bounds   a = min(max(a, lower), upper)                    lower / upper: the manifest's action
                                                              bounds unless narrowed
    ramp     for the first ramp_steps good steps after reset (t = 0 .. N-1):
             w = (t + 1) / (N + 1);  a = start + w * (a - start), then within the bounds again
             (an ulp of rounding must not leave them)
    rate     a = min(max(a, previous - max_change), previous + max_change)
             previous: the action last sent (or overridden as executed); at t = 0 the ramp's start

start (``ramp_start``): the robot's current command, given at ``Policy.reset(start_action=)``;
default: zeros within [lower, upper]. The limited action is the one sent AND the one that enters
the policy's own history (window / caches): the policy conditions on what the robot did.

Counts: per limit kind (LIMIT_KINDS) and dimension, the steps where that limit changed the
action (`ActuatorLimiter.counts`, ``Policy.limit_counts``, ``run --json`` "limits").

Where the numbers come from: the manifest's ``actuator_limits`` (``export --limits FILE``,
``--action-lower/--action-upper/--action-rate-limit/--ramp-steps/--ramp-start``), overridden at
load by a `LimitsOptions` (``run`` takes the same options) or an `ActuatorLimits` passed to the
Policy. Torch-free, numpy only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.errors import DMMError, describe_error
from contract.manifest import ACTUATOR_LIMIT_KEYS, Manifest, check_actuator_limits

LIMIT_KINDS = ("bounds", "rate", "ramp")
# Steps of per-step hit flags kept before they are summed into the counts: adding a bool row to an
# int64 count every step costs a casting ufunc call, about as much as the limit itself.
_HIT_ROWS = 1024


@dataclass(frozen=True)
class ActuatorLimits:
    """The limits of one engine (see the module docstring); vectors have one value per action dimension."""

    lower: tuple[float, ...]
    upper: tuple[float, ...]
    max_change: tuple[float, ...] | None = None  # None: no rate limit
    ramp_steps: int = 0  # 0: no ramp
    ramp_start: tuple[float, ...] | None = None  # None: zeros within [lower, upper]

    @classmethod
    def bounds_only(cls, manifest: Manifest) -> ActuatorLimits:
        """The action bounds alone: what the runtime did before limits existed (and what replay uses)."""
        return cls(lower=tuple(manifest.action_low), upper=tuple(manifest.action_high))

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ActuatorLimits:
        if manifest.actuator_limits is None:
            return cls.bounds_only(manifest)
        return cls.from_dict(manifest.actuator_limits, manifest)

    @classmethod
    def from_dict(cls, data: dict, manifest: Manifest, source: str = "actuator limits") -> ActuatorLimits:
        check_actuator_limits(data, manifest.action_low, manifest.action_high, source)

        def vector(key):
            return None if data[key] is None else tuple(float(v) for v in data[key])

        return cls(lower=vector("lower"), upper=vector("upper"), max_change=vector("max_change"),
                   ramp_steps=int(data["ramp_steps"]), ramp_start=vector("ramp_start"))

    def to_dict(self) -> dict:
        def vector(values):
            return None if values is None else list(values)

        return {"lower": vector(self.lower), "upper": vector(self.upper), "max_change": vector(self.max_change),
                "ramp_steps": self.ramp_steps, "ramp_start": vector(self.ramp_start)}

    def check(self, manifest: Manifest, source: str = "actuator limits") -> ActuatorLimits:
        check_actuator_limits(self.to_dict(), manifest.action_low, manifest.action_high, source)
        return self

    def start_action(self) -> np.ndarray:
        """(Adim,) float32: the ramp's start (and the rate limit's reference at t = 0)."""
        lower, upper = np.asarray(self.lower, dtype=np.float32), np.asarray(self.upper, dtype=np.float32)
        if self.ramp_start is None:
            return np.minimum(np.maximum(np.zeros_like(lower), lower), upper)
        return np.asarray(self.ramp_start, dtype=np.float32)

    def summary(self) -> str:
        """One line: what is limited, for ``run`` and ``doctor``."""
        def values(vector) -> str:
            unique = sorted(set(vector))
            return f"{unique[0]:g}" if len(unique) == 1 else "[" + ", ".join(f"{v:g}" for v in vector) + "]"

        parts = [f"bounds {values(self.lower)} .. {values(self.upper)}",
                 "rate " + (f"{values(self.max_change)}/step" if self.max_change is not None else "off"),
                 f"ramp {self.ramp_steps} steps" + (f" from {values(self.ramp_start)}" if self.ramp_start else "")
                 if self.ramp_steps else "ramp off"]
        return "limits: " + ", ".join(parts)


def _numbers(text: str | float | None, act_dim: int, flag: str) -> tuple[float, ...] | None:
    """'0.1' (every dimension) or '0.1,0.2,0.3' (one per dimension) -> Adim floats."""
    if text is None:
        return None
    try:
        values = [float(part) for part in str(text).split(",")]
    except ValueError:
        raise DMMError(f"{flag} {text!r}", f"a number or {act_dim} comma-separated numbers",
                       f"pass {flag} one number or {act_dim} separated by commas") from None
    if len(values) == 1:
        values *= act_dim
    if len(values) != act_dim:
        raise DMMError(f"{flag} {text!r}: {len(values)} numbers", f"1 or {act_dim} (the action dimension)",
                       f"pass {flag} one number or {act_dim} separated by commas")
    return tuple(values)


@dataclass(frozen=True)
class LimitsOptions:
    """Limits asked for on the command line (export or run); each field overrides what the base has."""

    limits_file: Path | None = field(default=None, metadata={
        "help": "JSON file of actuator limits: any of lower, upper, max_change (numbers or one per action "
                "dimension), ramp_steps, ramp_start (docs/deployment.md#limits-at-the-actuator)"})
    action_lower: str | None = field(default=None, metadata={
        "help": "lowest action sent, one number or one per dimension (default: the action space's)"})
    action_upper: str | None = field(default=None, metadata={
        "help": "highest action sent, one number or one per dimension (default: the action space's)"})
    action_rate_limit: str | None = field(default=None, metadata={
        "help": "largest change of the action per step, one number or one per dimension (default: none)"})
    ramp_steps: int | None = field(default=None, metadata={
        "help": "blend the first N steps after each reset from the ramp start into the policy's action (default 0)"})
    ramp_start: str | None = field(default=None, metadata={
        "help": "the ramp's start action (default: zeros within the bounds; on a robot pass its current command "
                "to Policy.reset)"})

    def given(self) -> bool:
        return any(value is not None for value in (self.limits_file, self.action_lower, self.action_upper,
                                                   self.action_rate_limit, self.ramp_steps, self.ramp_start))

    def resolve(self, manifest: Manifest, base: ActuatorLimits | None = None) -> ActuatorLimits:
        """``base`` (default: the manifest's limits) with the file's entries, then the options, in its place."""
        data = (base or ActuatorLimits.from_manifest(manifest)).to_dict()
        act_dim = manifest.act_dim
        if self.limits_file is not None:
            data.update(read_limits_file(self.limits_file, act_dim))
        for key, value, flag in (("lower", self.action_lower, "--action-lower"),
                                 ("upper", self.action_upper, "--action-upper"),
                                 ("max_change", self.action_rate_limit, "--action-rate-limit"),
                                 ("ramp_start", self.ramp_start, "--ramp-start")):
            if value is not None:
                data[key] = list(_numbers(value, act_dim, flag))
        if self.ramp_steps is not None:
            data["ramp_steps"] = self.ramp_steps
        return ActuatorLimits.from_dict(data, manifest, source="actuator limits (--limits and the limit options)")


def read_limits_file(path: str | Path, act_dim: int) -> dict:
    """The entries of a limits file (JSON object, keys of ACTUATOR_LIMIT_KEYS), numbers broadcast per dimension."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DMMError(f"--limits {str(path)!r}: no such file", "a JSON file of actuator limits",
                       "pass --limits the path of an existing limits file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DMMError(f"--limits {str(path)!r}: cannot be read as JSON ({describe_error(error)})",
                       'a JSON object such as {"max_change": 0.1, "ramp_steps": 50}',
                       "write the limits file as one JSON object (docs/deployment.md#limits-at-the-actuator)") from None
    if not isinstance(data, dict) or not set(data) <= set(ACTUATOR_LIMIT_KEYS):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DMMError(f"--limits {str(path)!r}: keys {keys}",
                       f"an object with some of {', '.join(ACTUATOR_LIMIT_KEYS)}",
                       "remove the other keys from the limits file")
    entries = {}
    for key, value in data.items():
        if key == "ramp_steps" or value is None:
            entries[key] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            entries[key] = [float(value)] * act_dim
        else:
            entries[key] = value
    return entries


class ActuatorLimiter:
    """Applies `ActuatorLimits` in place, step by step, and counts each limit per dimension.

    Every array is allocated here; ``apply`` allocates nothing.
    """

    def __init__(self, limits: ActuatorLimits):
        self.limits = limits
        self.lower = np.asarray(limits.lower, dtype=np.float32)  # (Adim,)
        self.upper = np.asarray(limits.upper, dtype=np.float32)  # (Adim,)
        self.max_change = None if limits.max_change is None else np.asarray(limits.max_change, dtype=np.float32)
        self.ramp_steps = int(limits.ramp_steps)
        self.start = limits.start_action()  # (Adim,) float32
        self._counts = np.zeros((len(LIMIT_KINDS), self.lower.shape[0]), dtype=np.int64)  # (kinds, Adim)
        self._hits = np.zeros((_HIT_ROWS, len(LIMIT_KINDS), self.lower.shape[0]), dtype=bool)  # (R, kinds, Adim)
        # Views made once: indexing a row per step costs as much as the comparison written into it.
        self._hit_rows = [tuple(self._hits[row, kind] for kind in range(len(LIMIT_KINDS)))
                          for row in range(_HIT_ROWS)]
        self._row = 0
        self._before = np.empty_like(self.lower)  # (Adim,) the action before the current limit
        self._window_low = np.empty_like(self.lower)  # (Adim,)
        self._window_high = np.empty_like(self.lower)  # (Adim,)

    @property
    def counts(self) -> dict[str, tuple[int, ...]]:
        """Limit kind -> per-dimension count of the steps where it changed the action."""
        counts = self._counts + self._hits[:self._row].sum(axis=0)  # (kinds, Adim)
        return {kind: tuple(int(v) for v in counts[index]) for index, kind in enumerate(LIMIT_KINDS)}

    def _fold(self) -> None:
        self._counts += self._hits.sum(axis=0)
        self._hits.fill(False)
        self._row = 0

    def apply(self, predicted: np.ndarray, out: np.ndarray, step: int, start: np.ndarray,
              previous: np.ndarray) -> None:
        """predicted (Adim,) finite -> out (Adim,) float32, limited. step: good steps since reset;
        start: the ramp's start (Adim,); previous: the action last sent (Adim,), the start at step 0."""
        if self._row == _HIT_ROWS:
            self._fold()
        bounds_hit, rate_hit, ramp_hit = self._hit_rows[self._row]  # (Adim,) views, False until written
        self._row += 1
        np.maximum(predicted, self.lower, out=out)
        np.minimum(out, self.upper, out=out)
        np.not_equal(out, predicted, out=bounds_hit)
        if step < self.ramp_steps:
            # float32 (t + 1) / (N + 1), then start + w * (a - start): the C step's operations in its order.
            weight = np.float32(step + 1) / np.float32(self.ramp_steps + 1)
            np.copyto(self._before, out)
            np.subtract(out, start, out=out)
            np.multiply(out, weight, out=out)
            np.add(out, start, out=out)
            # Between start and a in exact arithmetic; the roundings could leave the bounds by an ulp.
            np.maximum(out, self.lower, out=out)
            np.minimum(out, self.upper, out=out)
            np.not_equal(out, self._before, out=ramp_hit)
        if self.max_change is not None:
            np.subtract(previous, self.max_change, out=self._window_low)
            np.add(previous, self.max_change, out=self._window_high)
            np.copyto(self._before, out)
            np.maximum(out, self._window_low, out=out)
            np.minimum(out, self._window_high, out=out)
            np.not_equal(out, self._before, out=rate_hit)


LIMIT_OPTION_NAMES = ("limits_file", "action_lower", "action_upper", "action_rate_limit", "ramp_steps", "ramp_start")


def limit_option_field(name: str):
    """A fresh dataclass field with `LimitsOptions`' default and help, for a config that offers the limit options."""
    return field(default=None, metadata=LimitsOptions.__dataclass_fields__[name].metadata)


def limits_options_of(config) -> LimitsOptions:
    """The `LimitsOptions` of a config (ExportConfig, RunConfig) that has the LIMIT_OPTION_NAMES fields."""
    return LimitsOptions(**{name: getattr(config, name) for name in LIMIT_OPTION_NAMES})
