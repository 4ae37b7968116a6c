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
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from contract.errors import DMMError
from contract.files import sha256_bytes
from contract.manifest import STREAM_CACHE_PAIRS, manifest_bytes
from runtime.backend import Backend
from runtime.limits import ActuatorLimiter, ActuatorLimits
from runtime.step_record import DEFAULT_CHUNK_STEPS, EVENT_TERMINATED, EVENT_TRUNCATED, StepRecorder

FAULT_KINDS = ("observation_shape", "observation_nonfinite", "observation_range", "reward_nonfinite", "backend",
               "action_nonfinite")
ON_FAULT = ("raise", "hold", "safe")
# 10 steps: 80 ms of Hopper-v5 (8 ms period) held blind before the loop gives up.
DEFAULT_MAX_CONSECUTIVE_FAULTS = 10
_LISTED = 5  # offending indices named in a fault message


@dataclass(frozen=True)
class Fault:
    """The last fault: its kind, the step it replaced (``policy.t`` then) and the one-line message."""

    kind: str
    step: int
    message: str


class Policy:
    """A DMM policy on one backend: ``reset()`` at an episode start, then ``act(observation, reward)``.

    target_return: the return to condition on (default: the manifest's default target).
    on_fault, safe_action, max_consecutive_faults: see the module docstring.
    limits: an `ActuatorLimits` in place of the manifest's (see `runtime.limits.LimitsOptions`).
    record: a new directory to write the step record into; record_chunk_steps: rows per chunk file.
    Only batch-1 engines: one Policy drives one plant.
    """

    def __init__(self, backend: Backend, target_return: float | None = None, *, on_fault: str = "raise",
                 safe_action=None, max_consecutive_faults: int = DEFAULT_MAX_CONSECUTIVE_FAULTS,
                 limits: ActuatorLimits | None = None, record=None, record_chunk_steps: int = DEFAULT_CHUNK_STEPS):
        manifest = backend.manifest
        if manifest.batch != 1:
            raise DMMError(f"engine batch | received {manifest.batch} | expected 1; a Policy drives one "
                           "plant; export with batch 1 for the control loop")
        target = manifest.target_return if target_return is None else float(target_return)
        if not np.isfinite(target):
            raise DMMError(f"target return | received {target} | expected a finite number")
        if on_fault not in ON_FAULT:
            raise DMMError(f"on_fault | received {on_fault!r} | expected one of {', '.join(ON_FAULT)}")
        if isinstance(max_consecutive_faults, bool) or not isinstance(max_consecutive_faults, int) \
                or max_consecutive_faults < 0:
            raise DMMError(f"max_consecutive_faults | received {max_consecutive_faults!r} | expected a "
                           "whole number >= 0 (faults in a row tolerated before act raises)")
        self.backend = backend
        self.manifest = manifest
        self.mode = manifest.mode
        self.target_return = target
        self.on_fault = on_fault
        self.max_consecutive_faults = max_consecutive_faults
        self._scale = float(manifest.rtg_scale)
        self._mean = np.asarray(manifest.state_mean, dtype=np.float64)  # (S,), float64 as in evaluate.py
        self._std = np.asarray(manifest.state_std, dtype=np.float64)  # (S,)
        self._low = np.asarray(manifest.action_low, dtype=np.float32)  # (Adim,)
        self._high = np.asarray(manifest.action_high, dtype=np.float32)  # (Adim,)
        self._observation_shape = (manifest.state_dim,)
        self._observation_low = self._observation_high = None
        if manifest.observation_low is not None:
            self._observation_low = np.asarray(manifest.observation_low, dtype=np.float64)  # (S,)
            self._observation_high = np.asarray(manifest.observation_high, dtype=np.float64)  # (S,)
        self.limits = (ActuatorLimits.from_manifest(manifest) if limits is None else
                       limits.check(manifest, "limits"))
        self._limiter = ActuatorLimiter(self.limits)
        self._safe = self._check_safe_action(safe_action)  # (Adim,) float32

        # Scratch and state, all allocated here: act() writes into them in place.
        self._normalised = np.empty(manifest.state_dim, dtype=np.float64)  # (S,)
        self._observation_ok = np.empty(manifest.state_dim, dtype=bool)  # (S,)
        self._outside = np.empty(manifest.state_dim, dtype=bool)  # (S,)
        self._action_ok = np.empty(manifest.act_dim, dtype=bool)  # (Adim,)
        self._action = np.empty(manifest.act_dim, dtype=np.float32)  # (Adim,) the last good action
        self._held = np.empty(manifest.act_dim, dtype=np.float32)  # (Adim,) what "hold" repeats
        self._engine_action = np.full(manifest.act_dim, np.nan, dtype=np.float32)  # (Adim,) before the limits
        self._start = self._limiter.start.copy()  # (Adim,) the ramp's start of this episode
        self._sent = np.empty(manifest.act_dim, dtype=np.float32)  # (Adim,) the rate limit's reference
        self._feeds = {spec.name: np.zeros(spec.shape, dtype=np.float32) for spec in manifest.inputs}
        if self.mode == "window":
            # The window's committed history lives apart from the feeds: a step builds its feeds
            # from it and commits them back only once the engine returned a good action, so a
            # fault after the engine ran leaves the history of the last good step.
            self._states = self._feeds["states"][0]  # (K, S) views into the feeds
            self._actions = self._feeds["actions"][0]  # (K, Adim)
            self._rtgs = self._feeds["rtg"][0, :, 0]  # (K,)
            self._history_states = np.zeros_like(self._states)  # (K, S)
            self._history_actions = np.zeros_like(self._actions)  # (K, Adim)
            self._history_rtgs = np.zeros_like(self._rtgs)  # (K,)
        else:
            # Only prev_action and the caches carry state, written after a good step alone.
            self._cache_ok = {name: np.empty(self._feeds[name].shape, dtype=bool) for _, name in STREAM_CACHE_PAIRS}
        self._faults = dict.fromkeys(FAULT_KINDS, 0)
        self._faults_view = MappingProxyType(self._faults)
        self._fault_message = ""
        self.last_fault: Fault | None = None
        self._t = 0
        self._rtg = np.float32(0.0)
        self._recorder = None
        self._episode_start = True
        self.reset()
        if record is not None:  # last: a refused argument above leaves no record directory behind
            self._recorder = StepRecorder(record, self._record_header(), state_dim=manifest.state_dim,
                                          act_dim=manifest.act_dim, chunk_steps=record_chunk_steps)

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
        if self.mode == "window":
            for array in (self._history_states, self._history_actions, self._history_rtgs):
                array.fill(0.0)
        self._t = 0
        self._rtg = np.float32(self.target_return / self._scale)
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
                raise DMMError(f"start_action | received {np.asarray(start_action).tolist()} | expected "
                               f"{self._start.shape[0]} finite values within the limits [{self.limits.lower}, "
                               f"{self.limits.upper}]; pass the actuators' current command")
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
        kind = self._step(observation, reward)
        if kind is None:
            self._consecutive_faults = 0
            self._last_faulted = False
            action = self._action
        else:
            try:
                action = self._handle_fault(kind)
            except DMMError:
                if recorder is not None:
                    self._record_row(observation, reward, kind, None, started, t)
                raise
            np.copyto(self._sent, action)  # the rate limit starts from what the plant got
        if recorder is not None:
            if kind is None:  # the good step written inline: this is the common path on every step
                recorder.add_step(observation, reward, self._rtg, self._engine_action, action, 0,
                                  time.perf_counter_ns() - started, t, self._episode_start)
                self._episode_start = False
            else:
                self._record_row(observation, reward, kind, action, started, t)
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
            raise DMMError("override_action | received a call before any act() | expected it right after "
                           "act(); call act() first")
        action = np.asarray(action, dtype=np.float32)
        if action.shape != self._action.shape or not np.isfinite(action).all():
            raise DMMError(f"action | received {action.dtype} {action.shape} (finite: "
                           f"{bool(np.isfinite(action).all())}) | expected {self._action.shape} finite")
        self._record(action)
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
        self._recorder.add_step(observation, reward, float(self._rtg) if good else math.nan,
                                self._engine_action if good else None, action,
                                0 if good else FAULT_KINDS.index(kind) + 1, elapsed, t, self._episode_start)
        self._episode_start = False

    # -- one step -------------------------------------------------------------------------

    def _step(self, observation, reward) -> str | None:
        """Run one step; None when it was good (state advanced), else the fault kind (state untouched)."""
        reward_value = 0.0
        self._fault_reward = 0.0
        if self._t > 0:
            try:
                reward_value = float(reward)
            except (TypeError, ValueError):
                reward_value = math.nan
            if not math.isfinite(reward_value):
                self._fault_message = f"reward | received {reward} | expected a finite number; check the plant"
                return "reward_nonfinite"
        self._fault_reward = reward_value  # kept by _handle_fault when it returns an action
        kind = self._check_observation(observation)
        if kind is not None:
            return kind
        observation = np.asarray(observation)
        np.subtract(observation, self._mean, out=self._normalised)
        np.divide(self._normalised, self._std, out=self._normalised)  # (S,) float64
        rtg = self._rtg
        if self._t > 0:
            rtg = np.float32(float(self._rtg) - (self._pending_reward + reward_value) / self._scale)

        feeds = self._feeds
        if self.mode == "window":
            # Slide the history by one into the feeds; the oldest drops out, zero padding stays left.
            self._states[:-1] = self._history_states[1:]  # (K-1, S)
            self._states[-1] = self._normalised  # float64 -> float32, as evaluate.py stores it
            self._actions[:-1] = self._history_actions[1:]  # (K-1, Adim)
            self._actions[-1] = 0.0  # placeholder for the action being predicted
            self._rtgs[:-1] = self._history_rtgs[1:]  # (K-1,)
            self._rtgs[-1] = rtg
        else:
            feeds["state"][0] = self._normalised  # (S,)
            feeds["rtg"][0, 0] = rtg
            # a_{t-1} (written by the previous good act) is a token only from the second step on.
            feeds["prev_action_valid"][0, 0] = 1.0 if self._t > 0 else 0.0

        try:
            outputs = self.backend.infer(feeds)
            predicted = outputs["action"][0]  # (Adim,)
            np.isfinite(predicted, out=self._action_ok)
        except Exception as error:  # any backend failure is a fault; the policy's state is untouched
            first_line = str(error).splitlines()[0] if str(error) else ""
            self._fault_message = (f"engine {self.backend.name} | raised {type(error).__name__}: {first_line} "
                                   f"at step {self._t} | expected an action; check the engine and its device")
            return "backend"
        if not self._action_ok.all() or (self.mode == "stream" and not self._caches_finite(outputs)):
            self._fault_message = (f"action | engine {self.backend.name} produced {predicted.tolist()} (or "
                                   "non-finite caches) | expected finite values; the engine is broken or "
                                   "overflowed (check its precision); stop the plant")
            return "action_nonfinite"

        np.copyto(self._engine_action, predicted)
        self._limiter.apply(predicted, self._action, self._t, self._start, self._sent)
        if self.mode == "stream":
            # Copied, not aliased: a backend may reuse its output buffers on the next call.
            for output_name, input_name in STREAM_CACHE_PAIRS:
                np.copyto(feeds[input_name], outputs[output_name])
        if self.mode == "window":  # the slid window becomes the history; _record then fills in a_t
            np.copyto(self._history_states, self._states)
            np.copyto(self._history_actions, self._actions)
            np.copyto(self._history_rtgs, self._rtgs)
        self._record(self._action)
        np.copyto(self._sent, self._action)
        self._rtg = rtg
        self._pending_reward = 0.0
        self._has_good_action = True
        self._t += 1
        return None

    def _caches_finite(self, outputs) -> bool:
        for output_name, input_name in STREAM_CACHE_PAIRS:
            finite = self._cache_ok[input_name]
            np.isfinite(outputs[output_name], out=finite)
            if not finite.all():
                return False
        return True

    def _record(self, action: np.ndarray) -> None:
        # The executed action (limited) enters the history: the plant's a_t, not the raw prediction.
        if self.mode == "window":
            self._actions[-1] = action
            self._history_actions[-1] = action
        else:
            self._feeds["prev_action"][0] = action
        np.copyto(self._held, action)

    def _handle_fault(self, kind: str) -> np.ndarray:
        self._faults[kind] += 1
        self._consecutive_faults += 1
        message = self._fault_message
        self.last_fault = Fault(kind=kind, step=self._t, message=message)
        if self.on_fault == "raise":
            raise DMMError(message)
        if self._consecutive_faults > self.max_consecutive_faults:
            raise DMMError(f"{self._consecutive_faults} consecutive faults | last {kind}: {message} | expected at "
                           f"most max_consecutive_faults={self.max_consecutive_faults} in a row; stop the plant "
                           "and check its sensors and the engine")
        self._last_faulted = True  # the action returned now is no step of the history
        self._pending_reward += self._fault_reward  # the plant earned it; a raised call keeps nothing
        if self.on_fault == "hold" and self._has_good_action:
            return self._held
        return self._safe

    # -- checks ---------------------------------------------------------------------------

    def _check_observation(self, observation) -> str | None:
        """None for a good observation, else the fault kind (with the message in _fault_message)."""
        try:
            observation = np.asarray(observation)
        except (TypeError, ValueError):  # ragged or otherwise not an array
            self._fault_message = (f"observation | received {type(observation).__name__} that is not an array "
                                   f"| expected a real vector of shape {self._observation_shape}")
            return "observation_shape"
        if observation.shape != self._observation_shape or observation.dtype.kind not in "fiu":
            self._fault_message = (f"observation | received {observation.dtype} {observation.shape} | expected a "
                                   f"real vector of shape {self._observation_shape} (the engine's state_dim); "
                                   "pass the plant's raw observation for the env the policy was trained on")
            return "observation_shape"
        finite = self._observation_ok
        np.isfinite(observation, out=finite)
        if not finite.all():
            bad = np.flatnonzero(~finite).tolist()
            self._fault_message = (f"observation | received non-finite values at indices {bad} | expected "
                                   "finite numbers; check the sensors before calling act()")
            return "observation_nonfinite"
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
        self._fault_message = (f"observation | received values outside the engine's observation range: {values}"
                               f"{more} | expected the training data's range widened by the export margin; "
                               "check the sensors, their units and that this is the plant the policy was "
                               "trained for")
        return "observation_range"

    def _check_safe_action(self, safe_action) -> np.ndarray:
        if safe_action is None:  # zeros within the limits' bounds (the action bounds unless narrowed)
            return np.minimum(np.maximum(np.zeros_like(self._low), self._limiter.lower), self._limiter.upper)
        action = np.asarray(safe_action, dtype=np.float64)
        if action.shape != self._low.shape or not np.isfinite(action).all() \
                or (action < self._low).any() or (action > self._high).any():
            raise DMMError(f"safe_action | received {np.asarray(safe_action).tolist()} | expected "
                           f"{self._low.shape[0]} finite values within the action bounds "
                           f"[{self._low.tolist()}, {self._high.tolist()}]")
        return action.astype(np.float32)
