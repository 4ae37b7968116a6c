"""Fused CPU selective scan: a small C kernel (dmm_train/csrc/selective_scan.c) built
with the system C compiler on first use and called through ctypes on tensor pointers.

Symbols (docs/model.md#symbols): B batch, L tokens, D channels, N state size.

Why a C kernel: the scan is B * L * D * N = 1.6M exp/multiply-adds per layer at the
hopper preset, far too little work for PyTorch to amortise its per-op cost over L = 24
sequential steps. In C the time loop runs inside, nothing of shape (B, L, D, N) is
materialised, and exp is an inlined polynomial that vectorises with the loop.
How it is built, for which instruction set, and its threads: docs/design.md#the-fused-cpu-scan.

`is_available()` never raises: when no compiler is present or the build fails it
returns False and keeps the reason in `UNAVAILABLE_REASON`; `selective_scan(impl="auto")`
then falls back to the loop reference.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import torch

from contract.errors import DMMError
from runtime.native_build import build_shared_library, find_compiler, isa_flags
from runtime.native_build import isa_level as _isa_level

SOURCE_PATH = Path(__file__).resolve().parent / "csrc" / "selective_scan.c"
LIBRARY_NAME = "libdmm_selective_scan.so"
COMPILE_FLAGS = (
    "-O3", "-std=gnu11", "-fPIC", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
    "-ffp-contract=fast", "-Wall",
)
LINK_FLAGS = ("-shared", "-pthread")
ISA_ENV = "DMM_SCAN_ISA"
CACHE_SUBDIR = "fused_scan"
THREADS_ENV = "DMM_SCAN_THREADS"  # see "Threads" above
# Error codes of the C entry points (DMM_SCAN_* in the source).
_KERNEL_ERRORS = {1: "out of memory for the scan scratch"}

# Why the kernel is unavailable (None while it has not been tried or when it loaded).
UNAVAILABLE_REASON: str | None = None
_library: ctypes.CDLL | None = None
_tried = False
_num_threads: int | None = None
SPIN_NS = 200_000  # the kernel's default (SPIN_NS in the source)
_spin_ns_set = SPIN_NS


def isa_level() -> str:
    """The instruction-set level the kernel is built for: "baseline" or an x86-64-vN name ($DMM_SCAN_ISA)."""
    return _isa_level(ISA_ENV)


def build_flags() -> tuple[str, ...]:
    """Compiler flags for this machine (the ISA level included)."""
    return (*COMPILE_FLAGS, *isa_flags(isa_level()))


def _load() -> ctypes.CDLL:
    path = build_shared_library([SOURCE_PATH], library_name=LIBRARY_NAME, subdir=CACHE_SUBDIR,
                                flags=build_flags(), link_flags=LINK_FLAGS, compiler=find_compiler())
    library = ctypes.CDLL(str(path))
    pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.dmm_selective_scan_fwd.argtypes = [pointer] * 3 + [flag] + [pointer] * 7 + [size] * 7 + [flag]
    library.dmm_selective_scan_fwd.restype = ctypes.c_int
    library.dmm_selective_scan_bwd.argtypes = [pointer] * 3 + [flag] + [pointer] * 15 + [size] * 7 + [flag]
    library.dmm_selective_scan_bwd.restype = ctypes.c_int
    library.dmm_selective_scan_set_spin_ns.argtypes = [ctypes.c_int64]
    library.dmm_selective_scan_set_spin_ns.restype = None
    library.dmm_selective_scan_get_spin_ns.argtypes = []
    library.dmm_selective_scan_get_spin_ns.restype = ctypes.c_int64
    return library


def is_available() -> bool:
    """True when the kernel is built and loaded; builds it on the first call. Never raises."""
    global _library, _tried, UNAVAILABLE_REASON
    if not _tried:
        _tried = True
        try:
            _library = _load()
        except (OSError, RuntimeError, subprocess.SubprocessError, DMMError) as error:
            UNAVAILABLE_REASON = f"{type(error).__name__}: {error}"
    return _library is not None


def _require_library() -> ctypes.CDLL:
    if not is_available():
        reason = " ".join(str(UNAVAILABLE_REASON).split())  # a compiler's report can span lines
        raise DMMError(f"the fused selective-scan kernel is unavailable ({reason})", "a working C compiler",
                       fix="install gcc (e.g. apt-get install gcc), set $CC, or use scan impl 'loop'")
    return _library


def _check_inputs(tensors: dict, batch: int, length: int, channels: int, states: int) -> None:
    """Shapes, float32 and CPU, with one DMMError naming the input (None entries are skipped)."""
    expected = {
        "x": (batch, length, channels), "delta": (batch, length, channels), "A": (channels, states),
        "Bm": (batch, length, states), "Cm": (batch, length, states), "Dskip": (channels,),
        "z": (batch, length, channels), "delta_bias": (channels,),
    }
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        shape_ok = tuple(tensor.shape) == expected[name]
        if not shape_ok or tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            raise DMMError(
                f"fused selective scan input {name} {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}",
                f"{expected[name]} torch.float32 on cpu",
                fix="pass CPU float32 tensors of those shapes, or use scan impl 'loop'"
            )


def _rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A (B, L, C) tensor whose rows (b, t) are contiguous and evenly spaced, and that spacing.

    Views into wider rows, such as the chunks of in_proj's output and the splits of
    x_proj's, are passed as they are; anything else is made contiguous.
    """
    _, length, _ = tensor.shape
    row_stride = tensor.stride(1)
    if tensor.stride(2) == 1 and row_stride >= tensor.shape[2] and tensor.stride(0) == length * row_stride:
        return tensor, row_stride
    tensor = tensor.contiguous()
    return tensor, tensor.shape[2]


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def default_num_threads() -> int:
    """$DMM_SCAN_THREADS if set, else torch's intra-op thread count (one knob for the whole step)."""
    requested = os.environ.get(THREADS_ENV)
    if requested:
        if not requested.isdigit() or int(requested) < 1:
            raise DMMError(f"{THREADS_ENV}={requested!r}", "a positive integer",
                           fix=f"set {THREADS_ENV} to 1 or more, or unset it")
        return int(requested)
    return torch.get_num_threads()


def set_num_threads(count: int | None) -> None:
    """Threads of the scan kernel; None restores the default (`default_num_threads`)."""
    global _num_threads
    if count is not None and count < 1:
        raise DMMError(f"scan threads {count}", "a positive integer or None", fix="pass 1 or more, or None")
    _num_threads = count


def get_num_threads() -> int:
    return _num_threads if _num_threads is not None else default_num_threads()


def spin_ns() -> int:
    """How long the pool's threads spin before sleeping: SPIN_NS while torch uses one thread, else 0."""
    return SPIN_NS if torch.get_num_threads() == 1 else 0


def _sync_spin(library: ctypes.CDLL) -> None:
    """Tell the kernel `spin_ns` when it changed (torch's count can change between calls)."""
    global _spin_ns_set
    wanted = spin_ns()
    if wanted != _spin_ns_set:
        library.dmm_selective_scan_set_spin_ns(wanted)
        _spin_ns_set = wanted


def kernel_spin_ns() -> int:
    """The spin the kernel uses now (what `_sync_spin` last told it)."""
    return int(_require_library().dmm_selective_scan_get_spin_ns())


def _check_status(status: int, direction: str) -> None:
    if status != 0:
        raise DMMError(f"fused selective scan {direction} failed: {_KERNEL_ERRORS.get(status, status)}",
                       "the kernel to finish (status 0)",
                       fix="free memory, use a smaller batch, or use scan impl 'loop'")


class _FusedSelectiveScan(torch.autograd.Function):
    """out = scan(x, softplus?(delta + delta_bias), A, Bm, Cm, Dskip) * silu?(z), exact reverse backward."""

    @staticmethod
    def forward(ctx, x, delta, A, Bm, Cm, Dskip, z, delta_bias, delta_softplus):
        library = _require_library()
        if x.dim() != 3 or A.dim() != 2:
            raise DMMError(f"fused selective scan x {tuple(x.shape)}, A {tuple(A.shape)}", "x (B, L, D), A (D, N)",
                           fix="pass x with 3 dims and A with 2")
        batch, length, channels = x.shape
        states = A.shape[1]
        inputs = {"x": x, "delta": delta, "A": A, "Bm": Bm, "Cm": Cm, "Dskip": Dskip}
        _check_inputs({**inputs, "z": z, "delta_bias": delta_bias}, batch, length, channels, states)
        x, delta, Dskip = x.contiguous(), delta.contiguous(), Dskip.contiguous()  # (B, L, D) x2, (D,)
        Bm, stride_B = _rows(Bm)  # (B, L, N)
        Cm, stride_C = _rows(Cm)  # (B, L, N)
        z, stride_z = (None, channels) if z is None else _rows(z)  # (B, L, D)
        delta_bias = None if delta_bias is None else delta_bias.contiguous()  # (D,)
        A_t = A.t().contiguous()  # (N, D): the kernel's inner loops run over D
        out = torch.empty_like(x)  # (B, L, D)
        # The backward needs softplus?(delta + bias); the kernel writes it on the way.
        transformed = bool(delta_softplus) or delta_bias is not None
        delta_used = torch.empty_like(delta) if transformed else delta  # (B, L, D)
        _sync_spin(library)
        status = library.dmm_selective_scan_fwd(
            x.data_ptr(), delta.data_ptr(), _pointer(delta_bias), int(delta_softplus), A_t.data_ptr(),
            Bm.data_ptr(), Cm.data_ptr(), Dskip.data_ptr(), _pointer(z), out.data_ptr(),
            delta_used.data_ptr() if transformed else None,
            batch, length, channels, states, stride_B, stride_C, stride_z, get_num_threads(),
        )
        _check_status(status, "forward")
        ctx.delta_softplus = bool(delta_softplus)
        ctx.strides = (stride_B, stride_C, stride_z)
        ctx.save_for_backward(x, delta, A_t, Bm, Cm, Dskip, z, delta_bias, delta_used)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, delta, A_t, Bm, Cm, Dskip, z, delta_bias, delta_used = ctx.saved_tensors
        batch, length, channels = x.shape
        states = A_t.shape[0]
        dout = dout.contiguous()  # (B, L, D)
        dx = torch.empty_like(x)  # (B, L, D)
        ddelta = torch.empty_like(delta)  # (B, L, D)
        dA_t = torch.empty_like(A_t)  # (N, D)
        dBm = x.new_empty(batch, length, states)  # (B, L, N)
        dCm = x.new_empty(batch, length, states)  # (B, L, N)
        dDskip = torch.empty_like(Dskip)  # (D,)
        dz = None if z is None else torch.empty_like(x)  # (B, L, D)
        ddelta_bias = None if delta_bias is None else torch.empty_like(delta_bias)  # (D,)
        inputs = (x, delta, delta_bias, A_t, Bm, Cm, Dskip, z, delta_used, dout)
        outputs = (dx, ddelta, dA_t, dBm, dCm, dDskip, dz, ddelta_bias)
        pointers = [_pointer(t) for t in (*inputs, *outputs)]
        pointers.insert(3, int(ctx.delta_softplus))  # the flag follows delta_bias in the C signature
        _sync_spin(_library)
        status = _library.dmm_selective_scan_bwd(
            *pointers, batch, length, channels, states, *ctx.strides, get_num_threads()
        )
        _check_status(status, "backward")
        return dx, ddelta, dA_t.t(), dBm, dCm, dDskip, dz, ddelta_bias, None


def fused_selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    Dskip: torch.Tensor,
    *,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Scan from h_0 = 0 with the fused kernel.

    Args:
        x, delta: (B, L, D); A: (D, N); Bm, Cm: (B, L, N); Dskip: (D,); float32 on the CPU,
        any strides.
        z: (B, L, D) or None; when given the output is gated, y * silu(z) (Mamba's gate).
        delta_bias: (D,) or None, added to delta; delta_softplus: apply softplus to
        delta + delta_bias first (Mamba's ``selective_scan_fn`` options, fused here so
        that the step spends no separate passes on them).
    Returns:
        y (or the gated y): (B, L, D), differentiable w.r.t. every tensor input.
    """
    return _FusedSelectiveScan.apply(x, delta, A, Bm, Cm, Dskip, z, delta_bias, delta_softplus)
