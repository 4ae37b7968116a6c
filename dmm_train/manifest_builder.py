"""Build a runtime `Manifest` from a loaded checkpoint (torch side of the manifest)."""

from __future__ import annotations

from contract.files import sha256_file
from contract.manifest import Manifest, tensor_specs
from contract.versions import EXPORTER_PACKAGES, library_versions
from dmm_train.checkpoint import Checkpoint

# Gymnasium MuJoCo locomotion actions live in [-1, 1]; the tanh head cannot leave it.
DEFAULT_ACTION_BOUND = 1.0

# The observation range written into the manifest: the training states' per-dimension
# [min, max] widened on each side by OBSERVATION_RANGE_MARGIN times that dimension's span,
# and by at least OBSERVATION_RANGE_FLOOR (a dimension constant in the data). Half a span
# lets the policy meet states somewhat beyond what it was trained on (a better or a
# perturbed episode) and still flags what no plant of that kind produces: a sensor glitch,
# a unit or scaling error, a value an order of magnitude off (how many states of one Hopper
# dataset fall outside another's range: BENCHMARKS.md, design measurements).
OBSERVATION_RANGE_MARGIN = 0.5
OBSERVATION_RANGE_FLOOR = 1e-3


def observation_range(state_min, state_max) -> tuple[tuple[float, ...], tuple[float, ...]] | tuple[None, None]:
    """(low, high) the runtime accepts, from the training states' extremes; (None, None) without them."""
    if state_min is None or state_max is None:
        return None, None
    low, high = [], []
    for lowest, highest in zip(state_min, state_max, strict=True):
        widen = max(OBSERVATION_RANGE_MARGIN * (float(highest) - float(lowest)), OBSERVATION_RANGE_FLOOR)
        low.append(float(lowest) - widen)
        high.append(float(highest) + widen)
    return tuple(low), tuple(high)


def build_manifest(
    checkpoint: Checkpoint,
    *,
    mode: str,
    precision: str = "fp32",
    batch: int = 1,
    onnx_sha256: str = "",
    opset: int = 0,
    parity: dict | None = None,
    accuracy: dict | None = None,
) -> Manifest:
    """The manifest of a graph of ``mode`` exported from ``checkpoint``."""
    config = checkpoint.model_config
    facts = checkpoint.facts  # what the policy needs to be fed and judged, as training recorded it
    observation_low, observation_high = observation_range(facts.state_min, facts.state_max)
    inputs, outputs = tensor_specs(
        mode, batch=batch, context_len=config.context_len, state_dim=config.state_dim,
        act_dim=config.act_dim, n_layer=config.n_layer, dsm_window=config.dsm_window,
        d_model=config.d_model, d_state=config.d_state,
    )
    manifest = Manifest(
        mode=mode,
        precision=precision,
        inputs=inputs,
        outputs=outputs,
        batch=batch,
        context_len=config.context_len,
        state_dim=config.state_dim,
        act_dim=config.act_dim,
        n_layer=config.n_layer,
        d_model=config.d_model,
        d_state=config.d_state,
        dsm_window=config.dsm_window,
        state_mean=facts.state_mean,
        state_std=facts.state_std,
        rtg_scale=facts.rtg_scale,
        target_return=facts.target_returns[0],
        target_returns=facts.target_returns,
        action_low=(-DEFAULT_ACTION_BOUND,) * config.act_dim,
        action_high=(DEFAULT_ACTION_BOUND,) * config.act_dim,
        env_id=facts.env_id,
        preset=facts.preset,
        ref_min_score=facts.ref_min_score,
        ref_max_score=facts.ref_max_score,
        checkpoint_sha256=sha256_file(checkpoint.path),
        onnx_sha256=onnx_sha256,
        opset=opset,
        exporter=library_versions(EXPORTER_PACKAGES),
        parity=parity or {},
        accuracy=accuracy or {},
        observation_low=observation_low,
        observation_high=observation_high,
    )
    manifest.validate()
    return manifest
