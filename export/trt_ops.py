"""The ONNX ops the TensorRT ONNX parser supports, for the ops the export uses and others commonly needed.

Source: onnx/onnx-tensorrt ``docs/operators.md`` for TensorRT 10.15 ("TensorRT 10.15
supports operators in the inclusive range of opset 9 to opset 24"). Each entry: the
supported types and the restriction the table states ("" for none). Ops the table marks
"N" are not here; an op missing from this table is treated as unsupported, so adding
one to the lowering means checking the table first and adding it here.

`check_graph_ops` is what tests/test_export_onnx.py holds every exported graph to. The
export also never emits control flow (Loop, Scan, If): TensorRT accepts those, but
they serialise the graph into per-iteration kernels and defeat the static, unrolled
shape this project relies on (docs/design.md#graph-lowering).
"""

from __future__ import annotations

from collections.abc import Iterable

TRT_DOC = "onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15)"

# op_type -> (supported types, restriction)
TRT_SUPPORTED_OPS: dict[str, tuple[str, str]] = {
    # used by export/lowering.py
    "Add": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Concat": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Exp": ("FP32, FP16, BF16", ""),
    "Gather": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Gemm": ("FP32, FP16, BF16", ""),
    "LayerNormalization": ("FP32, FP16, BF16", "Only the first output `Y` is supported."),
    "Log": ("FP32, FP16, BF16", ""),
    "MatMul": ("FP32, FP16, BF16", ""),
    "Mul": ("FP32, FP16, BF16, INT32, INT64", ""),
    "ReduceSum": ("FP32, FP16, BF16, INT32, INT64", "`axes` must be an initializer"),
    "Reshape": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Sigmoid": ("FP32, FP16, BF16", ""),
    "Slice": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Split": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Tanh": ("FP32, FP16, BF16", ""),
    "Transpose": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Unsqueeze": ("FP32, FP16, BF16, INT32, INT64, BOOL", "`axes` must be resolvable to a constant."),
    # commonly needed by other lowerings of the same maths (traced exports, precision passes)
    "Cast": ("FP32, FP16, BF16, INT32, INT64, UINT8, BOOL", ""),
    "Constant": ("FP32, FP16, BF16, FP8, FP4, INT4, INT32, INT64, BOOL",
                 "`sparse_value`, `value_string`, and `value_strings` attributes are unsupported."),
    "ConstantOfShape": ("FP32, FP16, BF16, FP8, FP4, INT4, INT32, INT64, BOOL", ""),
    "Conv": ("FP32, FP16, BF16", ""),
    "CumSum": ("FP32, FP16, BF16", "`axis` must be a build-time constant"),
    "DequantizeLinear": ("INT8, FP8, FP4, INT4", "`x_zero_point` must be zero"),
    "Div": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Einsum": ("FP32, FP16, BF16", ""),
    "Equal": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Expand": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Flatten": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Greater": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Identity": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Max": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Min": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Neg": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Pad": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Pow": ("FP32, FP16, BF16, INT32, INT64", ""),
    "QuantizeLinear": ("FP32, FP16, BF16", "`y_zero_point` must be 0"),
    "Reciprocal": ("FP32, FP16, BF16", ""),
    "ReduceMean": ("FP32, FP16, BF16, INT32, INT64", "`axes` must be an initializer"),
    "Relu": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Shape": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Softplus": ("FP32, FP16, BF16", ""),
    "Sqrt": ("FP32, FP16, BF16", ""),
    "Squeeze": ("FP32, FP16, BF16, INT32, INT64, BOOL", "`axes` must be resolvable to a constant."),
    "Sub": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Where": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
}

# Supported by the parser, never emitted by the export (see the module docstring).
CONTROL_FLOW_OPS = frozenset({"Loop", "Scan", "If"})


def check_graph_ops(op_types: Iterable[tuple[str, str]]) -> list[str]:
    """(domain, op_type) of every node -> the problems, empty when TensorRT can parse all of them.

    Only the default ONNX domain counts: a com.microsoft op (what ONNX Runtime fuses
    into its own optimised copy) is not parseable by TensorRT.
    """
    problems = []
    for domain, op_type in op_types:
        if domain not in ("", "ai.onnx"):
            problems.append(f"{domain}.{op_type}: not in the default ONNX domain")
        elif op_type in CONTROL_FLOW_OPS:
            problems.append(f"{op_type}: control flow (the export unrolls everything)")
        elif op_type not in TRT_SUPPORTED_OPS:
            problems.append(f"{op_type}: not in the TensorRT ONNX parser table ({TRT_DOC})")
    return sorted(set(problems))
