"""The selective scan of Mamba-1, in float32.

Symbols (docs/model.md#symbols): B batch, L tokens, D channels (d_inner = d_model, expand 1),
N state size.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * Bm_t * x_t       h: (B, D, N), h_0 given or 0
    y_t = <h_t, Cm_t> + Dskip * x_t

`selective_scan_loop` is the slow, obviously-correct reference: one Python step per
token, autograd through every op. `selective_scan` dispatches to the fused CPU kernel
(`dmm_train.fused_scan`) when it is available and the tensors are float32 on the CPU,
and to the loop otherwise (on a GPU the loop is the plain-PyTorch path). Like Mamba's
``selective_scan_fn`` it optionally takes the delta bias and softplus and the z gate,
which the kernel applies in its own passes; around the loop they are plain torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contract.errors import DMMError
from dmm_train import fused_scan

SCAN_IMPLS = ("auto", "fused", "loop")


def selective_scan_loop(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    Dskip: torch.Tensor,
    h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference scan.

    Args:
        x, delta: (B, L, D); A: (D, N); Bm, Cm: (B, L, N); Dskip: (D,); h0: (B, D, N) or None.
    Returns:
        y: (B, L, D) and the last state h_L: (B, D, N).
    """
    batch, length, channels = x.shape
    h = x.new_zeros(batch, channels, A.shape[1]) if h0 is None else h0  # (B, D, N)
    outputs = []
    for t in range(length):
        delta_t = delta[:, t, :, None]  # (B, D, 1)
        decay = torch.exp(delta_t * A)  # (B, D, N)
        drive = delta_t * Bm[:, t, None, :] * x[:, t, :, None]  # (B, D, N)
        h = decay * h + drive  # (B, D, N)
        outputs.append((h * Cm[:, t, None, :]).sum(-1) + Dskip * x[:, t])  # (B, D)
    return torch.stack(outputs, dim=1), h  # (B, L, D), (B, D, N)


def _tracing() -> bool:
    """True inside torch.jit.trace / torch.jit.script or torch.onnx.export."""
    return bool(torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export())


def fused_scan_available() -> bool:
    """True when the fused CPU kernel can be built or is already loaded."""
    return fused_scan.is_available()


def selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    Dskip: torch.Tensor,
    impl: str = "auto",
    *,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Scan from h_0 = 0, returning y: (B, L, D). Shapes as in `selective_scan_loop`.

    impl: "loop" (reference), "fused" (CPU kernel; error if unavailable) or "auto"
    (fused for float32 CPU tensors where the kernel is available, else loop).

    Mamba's ``selective_scan_fn`` options, applied around the scan (inside the fused
    kernel, as plain torch ops around the loop):
        delta_bias: (D,) added to delta; delta_softplus: delta = softplus(delta + delta_bias);
        z: (B, L, D); the output becomes y * silu(z).
    """
    if impl not in SCAN_IMPLS:
        raise DMMError(f"scan impl {impl!r}", f"one of {', '.join(SCAN_IMPLS)}",
                       fix="pass --scan with one of those")
    if _tracing():
        # A tracer records tensor ops; the fused kernel is a ctypes call whose output it would bake
        # into the graph as a constant (a silently wrong graph). "auto" traces the loop instead.
        if impl == "fused":
            raise DMMError("scan impl 'fused' while tracing or exporting with torch (torch.jit.trace / "
                           "torch.onnx.export)", "'auto' or 'loop', which trace the loop scan",
                           fix="call model.set_scan_impl('loop') before tracing, or use 'cli.py export'")
        impl = "loop"
    use_loop = impl == "loop" or (
        impl == "auto" and (x.device.type != "cpu" or x.dtype != torch.float32 or not fused_scan_available())
    )
    if use_loop:
        if delta_bias is not None:
            delta = delta + delta_bias  # (B, L, D)
        if delta_softplus:
            delta = F.softplus(delta)  # (B, L, D)
        y = selective_scan_loop(x, delta, A, Bm, Cm, Dskip)[0]  # (B, L, D)
        return y if z is None else y * F.silu(z)  # (B, L, D)

    return fused_scan.fused_selective_scan(
        x, delta, A, Bm, Cm, Dskip, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus
    )
