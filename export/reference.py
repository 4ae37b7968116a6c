"""PyTorch references of both graph contracts and the export-time parity gate.

The references call the model's own forms: window mode is ``model(states, actions,
rtg)[:, -1]``, stream mode is `DecisionMetaMamba.env_step`. Both run with the loop
selective scan, the slow obviously-correct reference.

Glossary: B batch, K window length, S state dim, Adim action dim, nl n_layer, W DSM
window, D d_model, N d_state, T trajectory steps.
"""

from __future__ import annotations

import numpy as np
import torch

from contract.tolerances import max_abs
from dmm_train.model import DecisionMetaMamba
from runtime.feeds import real_looking_trajectory, stream_feeds, window_at

# Where the ONNX Runtime graph and PyTorch disagree by more than this the graph is wrong,
# not rounded differently (docs/design.md#tolerances): the export refuses to write it.
PARITY_REFUSE_ABOVE = max_abs("export-gate")


WINDOW_PARITY_STEPS = 24  # windows at t = 0..23: the first K-1 are zero-padded starts


STREAM_PARITY_STEPS = 48


def torch_window_action(model: DecisionMetaMamba, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Window contract on the model: states (B, K, S), actions (B, K, Adim), rtg (B, K, 1) -> (B, Adim)."""
    with torch.no_grad():
        inputs = {name: torch.from_numpy(np.ascontiguousarray(feeds[name]))
                  for name in ("states", "actions", "rtg")}
        return model(inputs["states"], inputs["actions"], inputs["rtg"])[:, -1].numpy()  # (B, Adim)


def torch_stream_step(model: DecisionMetaMamba, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stream contract (contract/manifest.py) on `DecisionMetaMamba.env_step`, numpy in and out."""
    with torch.no_grad():
        inputs = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in feeds.items()}
        action, dsm_cache, ssm_state = model.env_step(**inputs)
        return {"action": action.numpy(), "dsm_cache_next": dsm_cache.numpy(),  # (B, Adim), caches
                "ssm_state_next": ssm_state.numpy()}


def measure_parity(model: DecisionMetaMamba, session, *, mode: str, batch: int, rtg_start: float,
                   rtg_scale: float, seed: int = 0) -> dict:
    """Max |ONNX Runtime - PyTorch| on real-looking inputs; ``session`` is an ORT InferenceSession.

    window: WINDOW_PARITY_STEPS windows of each of B trajectories (zero-padded starts
    included); stream: B trajectories of STREAM_PARITY_STEPS steps, each graph carrying its
    own caches, actions compared at every step and caches at every step.
    """
    cfg = model.config
    steps = WINDOW_PARITY_STEPS if mode == "window" else STREAM_PARITY_STEPS
    trajectory = real_looking_trajectory(np.random.default_rng(seed), batch=batch, steps=steps,
                                         state_dim=cfg.state_dim, act_dim=cfg.act_dim,
                                         rtg_start=rtg_start, rtg_scale=rtg_scale)
    action_error, cache_error = 0.0, 0.0
    if mode == "window":
        for t in range(steps):
            feeds = window_at(trajectory, t, cfg.context_len)
            (action,) = session.run(["action"], feeds)  # (B, Adim)
            action_error = max(action_error, float(np.abs(action - torch_window_action(model, feeds)).max()))
    else:
        dsm_ort, ssm_ort = (c.numpy() for c in model.init_cache(batch))  # (nl, B, W-1, D), (nl, B, D, N)
        dsm_ref, ssm_ref = dsm_ort, ssm_ort
        for t in range(steps):
            action, dsm_ort, ssm_ort = session.run(
                ["action", "dsm_cache_next", "ssm_state_next"], stream_feeds(trajectory, t, dsm_ort, ssm_ort))
            reference = torch_stream_step(model, stream_feeds(trajectory, t, dsm_ref, ssm_ref))
            dsm_ref, ssm_ref = reference["dsm_cache_next"], reference["ssm_state_next"]
            action_error = max(action_error, float(np.abs(action - reference["action"]).max()))
            cache_error = max(cache_error, float(np.abs(dsm_ort - dsm_ref).max()),
                              float(np.abs(ssm_ort - ssm_ref).max()))
    result = {
        "reference": "PyTorch dmm_train.model (loop scan), float32",
        "candidate": "ONNX Runtime CPU, float32",
        "max_abs": max(action_error, cache_error),
        "action_max_abs": action_error,
        "inputs": f"real-looking synthetic trajectories (seed {seed}), batch {batch}, {steps} "
                  + ("windows each, zero-padded starts included" if mode == "window"
                     else "steps each from zero caches, each side carrying its own caches"),
    }
    if mode == "stream":
        result["cache_max_abs"] = cache_error
    return result
