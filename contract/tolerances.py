"""The tolerance table: how far each pair in the parity chain may differ, per precision.

One table keyed by (pair, precision), read by the export's parity gate, the parity
harness, the benchmarks and the tests (docs/design.md#tolerances). A pair names the two
sides compared, reference first:

    step-vs-sequence   DecisionMetaMamba.step / env_step against forward, same history
    ort-vs-torch       ONNX Runtime against the PyTorch reference (loop scan)
    c-vs-torch         the C target (export --target c, compiled) against the PyTorch reference
    export-gate        the export refuses a graph whose ORT output differs from PyTorch by
                       more than this: a wrong graph, not a rounding difference (fp32 parity
                       is about 1e-7 here)
    trt-vs-ort         a TensorRT plan against ONNX Runtime on the same graph (TF32 off)
    low-vs-fp32        a reduced-precision graph against its fp32 graph (action RMSE on
                       held-out windows); int8 is judged by RMSE and the closed-loop return

``max_abs`` bounds the largest absolute action (and cache) difference, ``mean_abs`` the
mean, ``rmse`` the root-mean-square action difference; None where the pair is not judged so.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.errors import DMMError


@dataclass(frozen=True)
class Tolerance:
    max_abs: float | None = None
    mean_abs: float | None = None
    rmse: float | None = None
    note: str = ""


TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("step-vs-sequence", "fp32"): Tolerance(max_abs=1e-5),
    ("ort-vs-torch", "fp32"): Tolerance(max_abs=1e-5),
    ("c-vs-torch", "fp32"): Tolerance(max_abs=1e-5),
    ("export-gate", "fp32"): Tolerance(max_abs=1e-4, note="the export refuses to write the graph above it"),
    ("trt-vs-ort", "fp32"): Tolerance(max_abs=1e-4, note="TF32 off"),
    ("trt-vs-ort", "fp16"): Tolerance(mean_abs=1e-2),
    ("trt-vs-ort", "int8"): Tolerance(rmse=5e-2, note="judged by action RMSE and the closed-loop return"),
    ("low-vs-fp32", "fp16"): Tolerance(rmse=3e-3, max_abs=1e-2, note="fp16 rounding of the Linear layers"),
    ("low-vs-fp32", "int8"): Tolerance(rmse=5e-2, note="and the closed-loop score (--max-score-drop)"),
}


def tolerance(pair: str, precision: str = "fp32") -> Tolerance:
    """The entry of the table for ``(pair, precision)``; an unknown key is a DMMError naming the known ones."""
    try:
        return TOLERANCES[(pair, precision)]
    except KeyError:
        known = ", ".join(f"{p}/{q}" for p, q in TOLERANCES)
        raise DMMError(f"tolerance {pair}/{precision}: not in the table", f"one of {known}",
                       "ask for one of those pairs, or add the entry to contract/tolerances.py") from None


def max_abs(pair: str, precision: str = "fp32") -> float:
    """The ``max_abs`` bound of a pair judged by it."""
    bound = tolerance(pair, precision).max_abs
    if bound is None:
        raise DMMError(f"tolerance {pair}/{precision}: no max_abs bound", "a pair judged by max_abs",
                       "read tolerance() instead")
    return bound
