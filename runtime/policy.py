"""`Policy`: observation in, action out, for any backend, in the user's own control loop.

It does what the exported graph leaves to the runtime, from the manifest alone:
state normalisation, return-to-go bookkeeping, the K-step window (window mode) or
the caches (stream mode), and action clipping. The window is built exactly as the
official evaluation does (`dmm_train.evaluate`, docs/model.md#evaluation-protocol):

    s_t  = (o_t - mean) / std                 float64 arithmetic, stored float32
    R_0  = target / scale;  R_t = R_{t-1} - r_{t-1} / scale   (float64 arithmetic, stored float32)
    window at t: the last min(t+1, K) (s, a, R), zero left-padded, a_t = 0 as a placeholder

so a Policy on the torch backend reproduces `evaluate_policy` step for step. In stream
mode the same s_t and R_t are fed with a_{t-1} (prev_action_valid = 0 at t = 0, when
there is none) and the caches the previous step returned (zeros after ``reset``).
Every feed is a preallocated float32 array, updated in place; a good step allocates
nothing that stays (the returned action is a fresh copy unless ``out=`` is given).

Faults. A step is a fault when its input or its result cannot be trusted:

    observation_shape      not a real vector of shape (S,)
    observation_nonfinite  NaN or inf in the observation
    observation_range      outside the manifest's observation range (the training data's
                           per-dimension min/max widened by the export margin; skipped when
                           the manifest has none: engines of checkpoints that recorded none)
    reward_nonfinite       NaN, inf or not a number as the reward (from the second step on)
    backend                backend.infer raised (a driver, device or session error)
    action_nonfinite       the engine returned a non-finite action (in stream mode: or
                           non-finite next caches, which would poison every later step)

``on_fault`` says what ``act`` then does: "raise" (a one-line DMMError; the default, right
for scripts), "hold" (return the last good action of this episode; the safe action before
the first one) or "safe" (return the safe action: zeros clipped to the action bounds, or
``safe_action``). Whatever it does, a fault never reaches the model's state: the window,
the caches, a_{t-1}, t and the return-to-go stay those of the last good step, so the next
good step computes what it would have computed had the faulty call not been made. One
exception, on purpose: under "hold" and "safe" a finite reward passed with a faulty
observation is kept and subtracted from the return-to-go at the next good step, since the
plant really earned it (by the last action, then by the held or safe one) and the
return-to-go is the target minus the reward actually collected. A call that raises keeps
nothing, its reward included: a caller that retries passes that reward again.
``faults`` counts faults per kind since construction; more than ``max_consecutive_faults``
faults in a row raise even under "hold" or "safe": a plant driven blind for that long must
be stopped by its operator, not by the policy.

Limits at the actuator (`runtime.limits`): the engine's action goes through the bounds, the
start-up ramp and the rate limit of ``limits`` (default: the manifest's ``actuator_limits``,
else the action bounds alone). The limited action is the one returned AND the one that enters
the history (window / caches), as it is the one the plant executes; ``limit_counts`` counts
each limit per dimension. ``engine_action`` is the engine's own action of the last good step.

Recording (`runtime.step_record`): with ``record=PATH`` every ``act`` call is written to a step
record (observation, reward, return-to-go, the action before and after the limits, the fault,
the step time); ``end_episode`` adds the final observation and reward, ``close`` finishes it.

Classes: ``Policy(backend, ...)`` builds the class of the engine's mode, `WindowPolicy` or
`StreamPolicy`, both Policies. `Policy` holds the step, the checks, the faults, the limits and
the record; a mode class holds only what that mode feeds and keeps between steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from contract.errors import DMMError, describe_error
from contract.files import sha256_bytes
from contract.manifest import STREAM_CACHE_PAIRS, Manifest, manifest_bytes
from runtime.backend import Backend, check_feeds
from runtime.limits import ActuatorLimiter, ActuatorLimits
from runtime.step_record import DEFAULT_CHUNK_STEPS, EVENT_TERMINATED, EVENT_TRUNCATED, StepRecorder

FAULT_KINDS = ("observation_shape", "observation_nonfinite", "observation_range", "reward_nonfinite", "backend",
               "action_nonfinite")
ON_FAULT = ("raise", "hold", "safe")
# 10 steps: 80 ms of Hopper-v5 (8 ms period) held blind before the loop gives up.
DEFAULT_MAX_CONSECUTIVE_FAULTS = 10
_LISTED = 5  # offending indices named in a fault message
# Observation dtypes (float64, float32) numpy centres and compares in float64 arithmetic, exactly as
# the centred range check assumes; others (ints, float16, longdouble) take the raw check.
_EXACT_IN_FLOAT64 = "fd"
# The step's path calls these as module globals (no attribute lookup on np), out given by position:
# keyword parsing costs about as much as the work on an (S,) array.
_subtract, _divide, _less = np.subtract, np.divide, np.less
_isfinite = math.isfinite
_ndarray = np.ndarray


@dataclass(frozen=True)
class Fault:
    """The last fault: its kind, the step it replaced (``policy.t`` then) and the one-line message."""

    kind: str
    step: int
    message: str


class _Refusal(NamedTuple):
    """Why a step did not advance the state: the fault kind, the three parts of its DMMError (made only when
    raised: "hold" and "safe" keep just the line), and the reward the step brought, which "hold" and "safe"
    keep for the next good step (0 when the reward was the fault)."""

    kind: str
    received: str
    expected: str
    fix: str
    reward: float

    @property
    def message(self) -> str:
        """The line its DMMError reads (`contract.errors`)."""
        return f"{self.received}; expected {self.expected}; {self.fix}"


class Policy:
    """A DMM policy on one backend: ``reset()`` at an episode start, then ``act(observation, reward)``.

    ``Policy(backend, ...)`` gives a `WindowPolicy` or a `StreamPolicy`, as the engine's mode says.
    target_return: the return to condition on (default: the manifest's default target).
    on_fault, safe_action, max_consecutive_faults: see the module docstring.
    limits: an `ActuatorLimits` in place of the manifest's (see `runtime.limits.LimitsOptions`).
    record: a new directory to write the step record into; record_chunk_steps: rows per chunk file.
    Only batch-1 engines: one Policy drives one plant.
    """

    mode = ""  # "window" or "stream": set by each mode's class

    def __new__(cls, *args, **kwargs):
        if cls is Policy:  # called as the factory: build the class of the engine's mode
            backend = args[0] if args else kwargs["backend"]
            cls = WindowPolicy if backend.manifest.mode == WindowPolicy.mode else StreamPolicy
        return super().__new__(cls)

    def __init__(self, backend: Backend, target_return: float | None = None, *, on_fault: str = "raise",
                 safe_action=None, max_consecutive_faults: int = DEFAULT_MAX_CONSECUTIVE_FAULTS,
                 limits: ActuatorLimits | None = None, record=None, record_chunk_steps: int = DEFAULT_CHUNK_STEPS):
        manifest = backend.manifest
        if manifest.mode != self.mode:
            raise DMMError(f"{type(self).__name__} on a {manifest.mode} engine", f"a {self.mode} engine",
                           "build it with Policy(backend), which picks the class of the engine's mode")
        if manifest.batch != 1:
            raise DMMError(f"engine batch {manifest.batch}", "1 (a Policy drives one plant)",
                           "export with batch 1 for the control loop")
        target = manifest.target_return if target_return is None else float(target_return)
        if not np.isfinite(target):
            raise DMMError(f"target return {target}", "a finite number", "pass a finite target_return")
        if on_fault not in ON_FAULT:
            raise DMMError(f"on_fault {on_fault!r}", f"one of {', '.join(ON_FAULT)}",
                           "pass on_fault='raise', 'hold' or 'safe'")
        if isinstance(max_consecutive_faults, bool) or not isinstance(max_consecutive_faults, int) \
                or max_consecutive_faults < 0:
            raise DMMError(f"max_consecutive_faults {max_consecutive_faults!r}",
                           "a whole number >= 0 (faults in a row tolerated before act raises)",
                           f"pass max_consecutive_faults={DEFAULT_MAX_CONSECUTIVE_FAULTS} or another whole number")
        self.backend = backend
        self.manifest = manifest
        self.target_return = target
        self.on_fault = on_fault
        self.max_consecutive_faults = max_consecutive_faults
        state_dim, act_dim = manifest.state_dim, manifest.act_dim
        self._scale = float(manifest.rtg_scale)
        self._mean = np.asarray(manifest.state_mean, dtype=np.float64)  # (S,), float64 as in evaluate.py
        self._std = np.asarray(manifest.state_std, dtype=np.float64)  # (S,)
        self._low = np.asarray(manifest.action_low, dtype=np.float32)  # (Adim,)
        self._high = np.asarray(manifest.action_high, dtype=np.float32)  # (Adim,)
        self._observation_shape = (state_dim,)
        self._observation_low = self._observation_high = None
        # This step's centred observation d = o - mean (float64, the first half of normalising) between the
        # observation range's bounds, centred alike, rows (low - mean, d, high - mean): comparing rows 0-1
        # with rows 1-2 checks low - mean < d < high - mean for every dimension in one call. Subtracting
        # mean, rounded, never decreases as o grows, so a strict inequality of the centred values proves the
        # raw one: this check accepts only what the raw check accepts, and NaN and inf fail it. A tie or an
        # overflow goes to the raw check. The second half, d / std, follows in place.
        self._centred_in_bounds = np.zeros((3, state_dim))  # (3, S) float64
        self._centred = self._centred_in_bounds[1]  # (S,) float64 view
        self._low_and_centred = self._centred_in_bounds[:2]  # (2, S) view
        self._centred_and_high = self._centred_in_bounds[1:]  # (2, S) view
        self._in_range = np.empty((2, state_dim), dtype=bool)  # (2, S)
        self._all_in_range = np.ones((2, state_dim), dtype=bool).tobytes()
        self._zero_observation = np.zeros(state_dim)  # (S,) for the finite check when there is no range
        if manifest.observation_low is not None:
            self._observation_low = np.asarray(manifest.observation_low, dtype=np.float64)  # (S,)
            self._observation_high = np.asarray(manifest.observation_high, dtype=np.float64)  # (S,)
            np.subtract(self._observation_low, self._mean, out=self._centred_in_bounds[0])
            np.subtract(self._observation_high, self._mean, out=self._centred_in_bounds[2])
        self.limits = (ActuatorLimits.from_manifest(manifest) if limits is None else
                       limits.check(manifest, "limits"))
        self._limiter = ActuatorLimiter(self.limits)
        self._rate_limited = self._limiter.max_change is not None
        self._safe = self._check_safe_action(safe_action)  # (Adim,) float32

        # Scratch and state, all allocated here: act() writes into them in place (``array[...] = values``
        # on the step's path: np.copyto costs a Python-level dispatch on every call).
        self._observation_ok = np.empty(state_dim, dtype=bool)  # (S,) for the full check's messages
        self._outside = np.empty(state_dim, dtype=bool)  # (S,)
        self._engine_action = np.full(act_dim, np.nan, dtype=np.float32)  # (Adim,) before the limits
        self._start = self._limiter.start.copy()  # (Adim,) the ramp's start of this episode
        self._sent = np.empty(act_dim, dtype=np.float32)  # (Adim,) the rate limit's reference
        self._feeds = {spec.name: np.zeros(spec.shape, dtype=np.float32) for spec in manifest.inputs}
        self._allocate(manifest)
        # Checked once here, then written in place only: each step calls the backend without the check.
        check_feeds(manifest, self._feeds)
        self._faults = dict.fromkeys(FAULT_KINDS, 0)
        self._faults_view = MappingProxyType(self._faults)
        self.last_fault: Fault | None = None
        self._t = 0
        self._rtg = 0.0
        self._recorder = None
        self._episode_start = True
        self.reset()
        if record is not None:  # last: a refused argument above leaves no record directory behind
            self._recorder = StepRecorder(record, self._record_header(), state_dim=state_dim,
                                          act_dim=act_dim, chunk_steps=record_chunk_steps)

    @property
    def t(self) -> int:
        """Good steps taken since the last reset (faulty calls do not count)."""
        return self._t

    @property
    def rtg(self) -> float:
        """The current return-to-go, divided by the rtg scale (what the graph sees)."""
        return float(self._rtg)

    @property
    def faults(self) -> MappingProxyType:
        """Fault kind -> count since this Policy was made (every kind of FAULT_KINDS, read-only)."""
        return self._faults_view

    @property
    def safe_action(self) -> np.ndarray:
        return self._safe.copy()

    @property
    def consecutive_faults(self) -> int:
        return self._consecutive_faults

    @property
    def limit_counts(self) -> dict[str, tuple[int, ...]]:
        """Limit kind (`runtime.limits.LIMIT_KINDS`) -> per-dimension count of the steps it changed the action."""
        return self._limiter.counts

    @property
    def engine_action(self) -> np.ndarray:
        """(Adim,) the engine's action of the last good step within the action bounds, before the limits."""
        return np.minimum(np.maximum(self._engine_action, self._low), self._high)

    @property
    def recorder(self) -> StepRecorder | None:
        return self._recorder

    def reset(self, start_action=None) -> None:
        """Start an episode: zero window / caches, return-to-go back to the target (fault counts stay).

        start_action: (Adim,) where the actuators are now (the robot's current command): the start of
        the ramp and the rate limit's reference at the first step; default: the limits' ramp_start.
        """
        for array in self._feeds.values():
            array.fill(0.0)
        self._clear_history()
        self._t = 0
        self._rtg = float(np.float32(self.target_return / self._scale))  # float32's value, as the feeds hold it
        self._pending_reward = 0.0  # rewards passed with faulty steps, for the next good step
        self._consecutive_faults = 0
        self._has_good_action = False
        self._last_faulted = False
        self.last_fault = None
        if start_action is None:
            np.copyto(self._start, self._limiter.start)
        else:
            start = np.asarray(start_action, dtype=np.float32)
            if start.shape != self._start.shape or not np.isfinite(start).all() \
                    or (start < self._limiter.lower).any() or (start > self._limiter.upper).any():
                raise DMMError(f"start_action {np.asarray(start_action).tolist()}",
                               f"{self._start.shape[0]} finite values within the limits [{self.limits.lower}, "
                               f"{self.limits.upper}]", "pass the actuators' current command")
            np.copyto(self._start, start)
        np.copyto(self._sent, self._start)
        self._episode_start = True
        self.backend.reset()

    def act(self, observation, reward: float = 0.0, *, out: np.ndarray | None = None) -> np.ndarray:
        """observation: (S,) raw, as the plant gives it; reward: received for the previous action
        (ignored on the first good step after reset). Returns the action (Adim,) float32 within the
        bounds: a new array, or ``out`` (a float32 (Adim,) array) filled in place.
        On a fault it raises, or returns the held / safe action, as ``on_fault`` says.
        """
        recorder = self._recorder
        started = time.perf_counter_ns() if recorder is not None else 0
        t = self._t
        refusal = self._step(observation, reward)
        if refusal is None:
            self._consecutive_faults = 0
            self._last_faulted = False
            action = self._action
            if recorder is None:  # the common path: done
                if out is None:
                    return action.copy()
                np.copyto(out, action)
                return out
        else:
            try:
                action = self._handle_fault(refusal)
            except DMMError:
                if recorder is not None:
                    self._record_row(observation, reward, refusal.kind, None, started, t)
                raise
            np.copyto(self._sent, action)  # the rate limit starts from what the plant got
        if recorder is not None:
            if refusal is None:  # the good step written inline: this is the common path on every step
                recorder.add_step(observation, reward, self._rtg, self._engine_action, action, 0,
                                  time.perf_counter_ns() - started, t, self._episode_start)
                self._episode_start = False
            else:
                self._record_row(observation, reward, refusal.kind, action, started, t)
        if out is None:
            return action.copy()
        np.copyto(out, action)
        return out

    def override_action(self, action) -> None:
        """Replace the action just returned by the one actually executed (a safety layer, or teacher
        forcing in parity checks): the history the next step conditions on holds this one.
        After an act that returned a held or safe action it does nothing: that step never entered
        the history.
        """
        if self._last_faulted:
            return
        if self._t == 0:
            raise DMMError("override_action before any act()", "it right after act()", "call act() first")
        action = np.asarray(action, dtype=np.float32)
        if action.shape != self._action.shape or not np.isfinite(action).all():
            raise DMMError(f"action {action.dtype} {action.shape} (finite: {bool(np.isfinite(action).all())})",
                           f"{self._action.shape} finite values", "pass the action the plant executed")
        self._write_executed_action(action)
        np.copyto(self._sent, action)
        if self._recorder is not None:
            self._recorder.replace_last_action(action)

    def end_episode(self, observation, reward: float, *, terminated: bool) -> None:
        """The episode ended (terminated, or truncated: a time limit, the operator): with a record, write the
        final observation and the last action's reward, which make the last step a transition; else nothing."""
        if self._recorder is None:
            return
        self._recorder.add_step(observation, reward, math.nan, None, None, 0, 0, self._t, False,
                                EVENT_TERMINATED if terminated else EVENT_TRUNCATED)

    def close(self) -> None:
        """Finish the step record (writes the buffered rows); the Policy still acts, unrecorded. Idempotent."""
        if self._recorder is not None:
            recorder, self._recorder = self._recorder, None
            recorder.close()

    def __enter__(self) -> Policy:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _record_header(self) -> dict:
        manifest = self.manifest
        return {"manifest_sha256": sha256_bytes(manifest_bytes(manifest)),
                "checkpoint_sha256": manifest.checkpoint_sha256, "engine": str(self.backend.path),
                "backend": self.backend.name, "provider": self.backend.provider, "mode": manifest.mode,
                "precision": manifest.precision, "env_id": manifest.env_id, "state_dim": manifest.state_dim,
                "act_dim": manifest.act_dim, "rtg_scale": manifest.rtg_scale, "target_return": self.target_return,
                "action_low": list(manifest.action_low), "action_high": list(manifest.action_high),
                "on_fault": self.on_fault, "fault_kinds": list(FAULT_KINDS), "limits": self.limits.to_dict()}

    def _record_row(self, observation, reward, kind, action, started: int, t: int) -> None:
        elapsed = time.perf_counter_ns() - started
        good = kind is None
        self._recorder.add_step(observation, reward, self._rtg if good else math.nan,
                                self._engine_action if good else None, action,
                                0 if good else FAULT_KINDS.index(kind) + 1, elapsed, t, self._episode_start)
        self._episode_start = False

    # -- one step -------------------------------------------------------------------------

    def _step(self, observation, reward) -> _Refusal | None:
        """Run one step; None when it was good (state advanced), else why not (state untouched)."""
        t = self._t
        reward_value = 0.0
        if t:
            try:
                reward_value = float(reward)
            except (TypeError, ValueError):
                reward_value = math.nan
            if not _isfinite(reward_value):
                return _Refusal("reward_nonfinite", f"reward {reward}", "a finite number", "check the plant's reward",
                                0.0)
        # The quick check: a float64 or float32 array of shape (S,), centred into ``_centred`` (float64
        # arithmetic, as evaluate.py), finite and within the observation range: the common case, in two
        # numpy calls. Anything else goes to the raw check, which tells what is wrong (or accepts another
        # real dtype).
        centred = self._centred
        if type(observation) is _ndarray and observation.shape == self._observation_shape \
                and observation.dtype.char in _EXACT_IN_FLOAT64:
            _subtract(observation, self._mean, centred)
            if self._observation_low is None:
                plainly_good = centred.dot(self._zero_observation) == 0.0  # NaN unless all finite
            else:
                # low < o < high for every dimension in one call (rows 0-1 against rows 1-2), and the mask's
                # bytes against all-True bytes: one memcmp, where a numpy reduction costs microseconds.
                _less(self._low_and_centred, self._centred_and_high, self._in_range)
                plainly_good = self._in_range.tobytes() == self._all_in_range
        else:
            plainly_good = False
        if not plainly_good:
            fault = self._observation_fault(observation)
            if fault is not None:
                return _Refusal(*fault, reward_value)
            _subtract(np.asarray(observation), self._mean, centred)  # a good one the quick check could not vouch for
        # s_t = (o - mean) / std in float64 arithmetic, as evaluate.py, stored float32 in its feed (a float32
        # out= would cast in the ufunc's buffered loop: slower than this copy).
        _divide(centred, self._std, centred)
        self._state_written[...] = centred
        # R_t in float64 arithmetic from the float32 R_{t-1}; the feed stores it as float32 (rounded there).
        rtg = self._rtg - (self._pending_reward + reward_value) / self._scale if t else self._rtg
        self._write_feeds(rtg, t)

        try:
            outputs = self.backend.infer_prechecked(self._feeds)
            predicted = outputs["action"][0]  # (Adim,)
            # A NaN or inf makes the sum NaN or inf; float32 values summed in float64 cannot overflow. On a
            # few floats this beats any numpy reduction.
            action_finite = _isfinite(sum(predicted.tolist()))
        except Exception as error:  # any backend failure is a fault; the policy's state is untouched
            return _Refusal("backend", f"engine {self.backend.name} at step {t}: {describe_error(error)}",
                            "an action", "check the engine and its device", reward_value)
        if not action_finite or not self._outputs_finite(outputs):
            return _Refusal("action_nonfinite",
                            f"engine {self.backend.name} action {predicted.tolist()} (or its caches): not finite",
                            "finite values",
                            "stop the plant and check the engine: it broke or overflowed (check its precision)",
                            reward_value)

        self._engine_action[...] = predicted
        # The limited action is written where the next step reads a_t: the plant executes it, not the
        # raw prediction.
        self._limiter.apply(predicted, self._action, t, self._start, self._sent)
        self._commit(outputs)
        if self._rate_limited:  # the reference only the rate limit reads
            self._sent[...] = self._action
        self._rtg = self._rtg_written.item(0)  # R_t as float32 rounded it
        self._pending_reward = 0.0
        self._has_good_action = True
        self._t = t + 1
        return None

    def _handle_fault(self, refusal: _Refusal) -> np.ndarray:
        kind = refusal.kind
        self._faults[kind] += 1
        self._consecutive_faults += 1
        self.last_fault = Fault(kind=kind, step=self._t, message=refusal.message)
        if self.on_fault == "raise":
            raise DMMError(refusal.received, refusal.expected, refusal.fix)
        if self._consecutive_faults > self.max_consecutive_faults:
            raise DMMError(f"{self._consecutive_faults} consecutive faults, the last {kind}: {refusal.received}",
                           f"at most max_consecutive_faults={self.max_consecutive_faults} in a row",
                           "stop the plant and check its sensors and the engine")
        self._last_faulted = True  # the action returned now is no step of the history
        self._pending_reward += refusal.reward  # the plant earned it; a raised call keeps nothing
        if self.on_fault == "hold" and self._has_good_action:
            return self._executed_action
        return self._safe

    # -- what each mode feeds and keeps -----------------------------------------------------

    def _allocate(self, manifest: Manifest) -> None:
        """Make the mode's views into ``_feeds`` and its history, among them ``_action`` (Adim,), where a good
        step's limited action is written (a feed the next step reads it from), and ``_executed_action``
        (Adim,), the executed action of the last good step (what the next step conditions on and "hold"
        repeats), ``_state_written`` (S,) and ``_rtg_written`` (1,), the float32 places of s_t and R_t."""
        raise NotImplementedError

    def _clear_history(self) -> None:
        """Zero what the mode keeps apart from the feeds (reset)."""
        raise NotImplementedError

    def _write_feeds(self, rtg: float, t: int) -> None:
        """Write this step's R_t (``rtg``) into the feeds, s_t being in ``_state_written`` already; the history
        stays as it was."""
        raise NotImplementedError

    def _outputs_finite(self, outputs) -> bool:
        """Whether the outputs the next step is fed, beyond the action, are finite."""
        raise NotImplementedError

    def _commit(self, outputs) -> None:
        """A good step, its action in ``_action``: what the next step conditions on becomes this step's."""
        raise NotImplementedError

    def _write_executed_action(self, action: np.ndarray) -> None:
        """Replace a_t of the last good step in what the next step conditions on (override_action)."""
        raise NotImplementedError

    # -- checks ---------------------------------------------------------------------------

    def _observation_fault(self, observation) -> tuple[str, str, str, str] | None:
        """None for a good observation, else (fault kind, received, expected, fix)."""
        try:
            observation = np.asarray(observation)
        except (TypeError, ValueError):  # ragged or otherwise not an array
            return ("observation_shape", f"observation {type(observation).__name__} that is not an array",
                    f"a real vector of shape {self._observation_shape}", "pass the plant's raw observation as a numpy "
                    "array")
        if observation.shape != self._observation_shape or observation.dtype.kind not in "fiu":
            return ("observation_shape", f"observation {observation.dtype} {observation.shape}",
                    f"a real vector of shape {self._observation_shape} (the engine's state_dim)",
                    "pass the plant's raw observation for the env the policy was trained on")
        finite = self._observation_ok
        np.isfinite(observation, out=finite)
        if not finite.all():
            bad = np.flatnonzero(~finite).tolist()
            return ("observation_nonfinite", f"observation with non-finite values at indices {bad}", "finite numbers",
                    "check the sensors before calling act()")
        if self._observation_low is None:
            return None
        outside = self._outside
        above = self._observation_ok  # free again once the finite check passed
        np.less(observation, self._observation_low, out=outside)
        np.greater(observation, self._observation_high, out=above)
        np.logical_or(outside, above, out=outside)
        if not outside.any():
            return None
        indices = np.flatnonzero(outside)
        values = ", ".join(f"[{i}] {float(observation[i]):.4g} not in [{self._observation_low[i]:.4g}, "
                           f"{self._observation_high[i]:.4g}]" for i in indices[:_LISTED])
        more = f" and {indices.size - _LISTED} more" if indices.size > _LISTED else ""
        return ("observation_range", f"observation values outside the engine's observation range: {values}{more}",
                "the training data's range widened by the export margin",
                "check the sensors, their units and that this is the plant the policy was trained for")

    def _check_safe_action(self, safe_action) -> np.ndarray:
        if safe_action is None:  # zeros within the limits' bounds (the action bounds unless narrowed)
            return np.minimum(np.maximum(np.zeros_like(self._low), self._limiter.lower), self._limiter.upper)
        action = np.asarray(safe_action, dtype=np.float64)
        if action.shape != self._low.shape or not np.isfinite(action).all() \
                or (action < self._low).any() or (action > self._high).any():
            raise DMMError(f"safe_action {np.asarray(safe_action).tolist()}",
                           f"{self._low.shape[0]} finite values within the action bounds "
                           f"[{self._low.tolist()}, {self._high.tolist()}]", "pass a safe_action within them")
        return action.astype(np.float32)


class WindowPolicy(Policy):
    """Window mode: every step feeds the last K steps (s, a, R), zero left-padded, a_t = 0 as a placeholder."""

    mode = "window"

    def _allocate(self, manifest: Manifest) -> None:
        context, state_dim, act_dim = manifest.context_len, manifest.state_dim, manifest.act_dim
        feeds = self._feeds
        self._states = feeds["states"][0]  # (K, S) views into the feeds
        self._actions = feeds["actions"][0]  # (K, Adim)
        self._rtgs = feeds["rtg"][0, :, 0]  # (K,)
        self._action = self._actions[-1]  # (Adim,) a_t's place: the placeholder while the graph runs
        # The history, one row longer than the window: rows 0..K-1 are the window of the last good step
        # (a_t filled in), row K is the step being built, so the feeds are rows 1..K, copied in one call
        # each. A good step is committed by copying the feeds back into rows 0..K-1: until then, a fault
        # leaves the history of the last good step. Row K of the actions stays zero: the placeholder.
        self._state_rows = np.zeros((context + 1, state_dim), dtype=np.float32)  # (K+1, S)
        self._action_rows = np.zeros((context + 1, act_dim), dtype=np.float32)  # (K+1, Adim)
        self._rtg_rows = np.zeros(context + 1, dtype=np.float32)  # (K+1,)
        self._history_states = self._state_rows[:-1]  # (K, S) views: what the next step conditions on
        self._history_actions = self._action_rows[:-1]  # (K, Adim)
        self._history_rtgs = self._rtg_rows[:-1]  # (K,)
        self._executed_action = self._history_actions[-1]  # (Adim,)
        self._new_state = self._state_rows[-1]  # (S,)
        self._window_states = self._state_rows[1:]  # (K, S) views: the window of the step being built
        self._window_actions = self._action_rows[1:]  # (K, Adim)
        self._window_rtgs = self._rtg_rows[1:]  # (K,)
        self._rtg_written = self._rtg_rows[-1:]  # (1,) where _write_feeds writes R_t, float32
        self._state_written = self._new_state  # (S,) where s_t is written, float32

    def _clear_history(self) -> None:
        for array in (self._state_rows, self._action_rows, self._rtg_rows):
            array.fill(0.0)

    def _write_feeds(self, rtg: float, t: int) -> None:
        self._rtg_rows[-1] = rtg
        # The window slid by one: the oldest step drops out, the zero padding stays on the left.
        self._states[...] = self._window_states
        self._actions[...] = self._window_actions
        self._rtgs[...] = self._window_rtgs

    def _outputs_finite(self, outputs) -> bool:
        return True  # the action is all a window graph returns

    def _commit(self, outputs) -> None:
        self._history_states[...] = self._states
        self._history_actions[...] = self._actions  # a_t included
        self._history_rtgs[...] = self._rtgs

    def _write_executed_action(self, action: np.ndarray) -> None:
        np.copyto(self._action, action)
        np.copyto(self._executed_action, action)


class StreamPolicy(Policy):
    """Stream mode: every step feeds s_t, R_t and a_{t-1} with the caches the previous step returned."""

    mode = "stream"

    def _allocate(self, manifest: Manifest) -> None:
        feeds = self._feeds
        self._state_fed = feeds["state"][0]  # (S,) views into the feeds
        self._rtg_fed = feeds["rtg"][0]  # (1,)
        self._prev_action_valid = feeds["prev_action_valid"][0]  # (1,)
        self._rtg_written = self._rtg_fed  # (1,) where _write_feeds writes R_t, float32
        self._state_written = self._state_fed  # (S,) where s_t is written, float32
        # a_t is written where the next step reads a_{t-1}; only it and the caches carry state, written
        # after a good step alone.
        self._action = self._executed_action = feeds["prev_action"][0]  # (Adim,)
        # Per cache: the output that returns it, the feed it goes back into, and zeros of its size for
        # the finite check.
        self._caches = tuple((output_name, feeds[input_name], np.zeros(feeds[input_name].size, dtype=np.float32))
                             for output_name, input_name in STREAM_CACHE_PAIRS)
        ((self._first_cache, self._first_cache_fed, self._first_zeros),
         (self._second_cache, self._second_cache_fed, self._second_zeros)) = self._caches

    def _clear_history(self) -> None:
        pass  # the caches and a_{t-1} are feeds, zeroed with them

    def _write_feeds(self, rtg: float, t: int) -> None:
        self._rtg_fed[0] = rtg  # float64 -> float32
        # a_{t-1} (written by the previous good step) is a token only from the second step on; reset zeroes
        # the flag, so only the first two steps of an episode write it.
        if t < 2:
            self._prev_action_valid[0] = t

    def _outputs_finite(self, outputs) -> bool:
        # Non-finite caches would poison every later step (both checked in line: STREAM_CACHE_PAIRS has two).
        # Each in one BLAS call and no temporary: values . 0 is 0 when all are finite and NaN when one is
        # not (inf * 0 and NaN * 0 are NaN); a third of isfinite + all. ravel: a view of the contiguous
        # arrays engines return.
        return (outputs[self._first_cache].ravel().dot(self._first_zeros) == 0.0
                and outputs[self._second_cache].ravel().dot(self._second_zeros) == 0.0)

    def _commit(self, outputs) -> None:
        # Copied, not aliased: a backend may reuse its buffers.
        self._first_cache_fed[...] = outputs[self._first_cache]
        self._second_cache_fed[...] = outputs[self._second_cache]

    def _write_executed_action(self, action: np.ndarray) -> None:
        np.copyto(self._executed_action, action)
