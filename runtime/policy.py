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
Every feed is a preallocated float32 array, updated in place.
"""

from __future__ import annotations

import numpy as np

from contract.errors import DMMError
from contract.manifest import STREAM_CACHE_PAIRS
from runtime.backend import Backend


class Policy:
    """A DMM policy on one backend: ``reset()`` at an episode start, then ``act(observation, reward)``.

    target_return: the return to condition on (default: the manifest's default target).
    Only batch-1 engines: one Policy drives one plant.
    """

    def __init__(self, backend: Backend, target_return: float | None = None):
        manifest = backend.manifest
        if manifest.batch != 1:
            raise DMMError(f"engine batch | received {manifest.batch} | expected 1; a Policy drives one "
                           "plant; export with batch 1 for the control loop")
        target = manifest.target_return if target_return is None else float(target_return)
        if not np.isfinite(target):
            raise DMMError(f"target return | received {target} | expected a finite number")
        self.backend = backend
        self.manifest = manifest
        self.mode = manifest.mode
        self.target_return = target
        self._scale = float(manifest.rtg_scale)
        self._mean = np.asarray(manifest.state_mean, dtype=np.float64)  # (S,), float64 as in evaluate.py
        self._std = np.asarray(manifest.state_std, dtype=np.float64)  # (S,)
        self._low = np.asarray(manifest.action_low, dtype=np.float32)  # (Adim,)
        self._high = np.asarray(manifest.action_high, dtype=np.float32)  # (Adim,)
        self._normalised = np.empty(manifest.state_dim, dtype=np.float64)  # (S,) scratch
        self._action = np.empty(manifest.act_dim, dtype=np.float32)  # (Adim,) the last action returned
        self._feeds = {spec.name: np.zeros(spec.shape, dtype=np.float32) for spec in manifest.inputs}
        if self.mode == "window":
            self._states = self._feeds["states"][0]  # (K, S) view into the feed
            self._actions = self._feeds["actions"][0]  # (K, Adim)
            self._rtgs = self._feeds["rtg"][0, :, 0]  # (K,)
        self._t = 0
        self._rtg = np.float32(0.0)
        self.reset()

    @property
    def t(self) -> int:
        """Actions taken since the last reset."""
        return self._t

    @property
    def rtg(self) -> float:
        """The current return-to-go, divided by the rtg scale (what the graph sees)."""
        return float(self._rtg)

    def reset(self) -> None:
        """Start an episode: zero window / caches, return-to-go back to the target."""
        for array in self._feeds.values():
            array.fill(0.0)
        self._t = 0
        self._rtg = np.float32(self.target_return / self._scale)
        self.backend.reset()

    def act(self, observation, reward: float = 0.0) -> np.ndarray:
        """observation: (S,) raw, as the plant gives it; reward: received for the previous action
        (ignored on the first call after reset). Returns the action (Adim,) float32 within the bounds.
        """
        observation = self._check_observation(observation)
        if self._t > 0:
            reward = float(reward)
            if not np.isfinite(reward):
                raise DMMError(f"reward | received {reward} | expected a finite number; check the plant")
            self._rtg = np.float32(float(self._rtg) - reward / self._scale)
        np.subtract(observation, self._mean, out=self._normalised)
        np.divide(self._normalised, self._std, out=self._normalised)  # (S,) float64

        feeds = self._feeds
        if self.mode == "window":
            if self._t > 0:
                # Slide by one timestep; the oldest drops out, zero padding stays on the left.
                self._states[:-1] = self._states[1:]  # (K-1, S)
                self._actions[:-1] = self._actions[1:]  # (K-1, Adim)
                self._rtgs[:-1] = self._rtgs[1:]  # (K-1,)
            self._states[-1] = self._normalised  # float64 -> float32, as evaluate.py stores it
            self._actions[-1] = 0.0  # placeholder for the action being predicted
            self._rtgs[-1] = self._rtg
        else:
            feeds["state"][0] = self._normalised  # (S,)
            feeds["rtg"][0, 0] = self._rtg
            # a_{t-1} (written by the previous act) is a token only from the second step on.
            feeds["prev_action_valid"][0, 0] = 1.0 if self._t > 0 else 0.0

        outputs = self.backend.infer(feeds)
        predicted = outputs["action"][0]  # (Adim,)
        if not np.isfinite(predicted).all():
            raise DMMError(f"action | engine {self.backend.name} produced {predicted.tolist()} | expected "
                           "finite values; the engine is broken or overflowed (check its precision); "
                           "stop the plant")
        np.clip(predicted, self._low, self._high, out=self._action)
        if self.mode == "stream":
            # Copied, not aliased: a backend may reuse its output buffers on the next call.
            for output_name, input_name in STREAM_CACHE_PAIRS:
                np.copyto(feeds[input_name], outputs[output_name])
        self._record(self._action)
        self._t += 1
        return self._action.copy()

    def override_action(self, action) -> None:
        """Replace the action just returned by the one actually executed (a safety layer, or teacher
        forcing in parity checks): the history the next step conditions on holds this one.
        """
        if self._t == 0:
            raise DMMError("override_action | received a call before any act() | expected it right after "
                           "act(); call act() first")
        action = np.asarray(action, dtype=np.float32)
        if action.shape != self._action.shape or not np.isfinite(action).all():
            raise DMMError(f"action | received {action.dtype} {action.shape} (finite: "
                           f"{bool(np.isfinite(action).all())}) | expected {self._action.shape} finite")
        self._record(action)

    def _record(self, action: np.ndarray) -> None:
        # The executed action (clipped) enters the history: the plant's a_t, not the raw prediction.
        if self.mode == "window":
            self._actions[-1] = action
        else:
            self._feeds["prev_action"][0] = action

    def _check_observation(self, observation) -> np.ndarray:
        observation = np.asarray(observation)
        expected = (self.manifest.state_dim,)
        if observation.shape != expected or observation.dtype.kind not in "fiu":
            raise DMMError(f"observation | received {observation.dtype} {observation.shape} | expected a "
                           f"real vector of shape {expected} (the engine's state_dim); pass the plant's raw "
                           "observation for the env the policy was trained on")
        finite = np.isfinite(observation)
        if not finite.all():
            bad = np.flatnonzero(~finite).tolist()
            raise DMMError(f"observation | received non-finite values at indices {bad} | expected finite "
                           "numbers; check the sensors before calling act()")
        return observation
