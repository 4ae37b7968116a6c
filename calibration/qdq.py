"""INT8 as explicit Q/DQ, inserted by ONNX Runtime's quantization tools, on Linear inputs only.

Q/DQ goes where TensorRT fuses it into a weighted op and nowhere the recurrence could be hurt:
on the inputs of the Linears of `contract.graph_roles.INT8_ROLES`, symmetric, per channel for
weights and per tensor for activations (what is written and why: docs/deployment.md#qdq-placement).
Ranges come from ONNX Runtime's calibrators over real inputs (`calibration.data`), as explicit
symmetric scales in quantize_static's ``TensorQuantOverrides`` (docs/design.md#calibration). The
result is judged on the CPU with graph optimisations off, where ONNX Runtime runs Q/DQ as
fake-quant in float, what TensorRT's int8 arithmetic approximates
(docs/deployment.md#estimating-int8-on-the-cpu).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from contract.errors import DMMError
from contract.graph_roles import INT8_ROLES, linear_nodes, set_precision_metadata

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 2048, 128  # TensorRT's entropy calibrator
PERCENTILE, PERCENTILE_BINS = 99.99, 2048
INT8_MAX = 127  # symmetric int8: [-127, 127] for weights; activations use the same scale rule


class FeedReader:
    """An ONNX Runtime calibration data reader over a list of feeds (dicts of float32 arrays)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        if not feeds:
            raise DMMError("no calibration samples", "at least one feed from the calibration episodes",
                           "pass --calibration-windows 1 or more, with a dataset of at least two episodes")
        self._feeds = list(feeds)
        self._position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._position >= len(self._feeds):
            return None
        self._position += 1
        return self._feeds[self._position - 1]

    def rewind(self) -> None:
        self._position = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)


def _reader(feeds):
    """`FeedReader` registered as ORT's CalibrationDataReader (ORT checks the type)."""
    from onnxruntime.quantization import CalibrationDataReader

    CalibrationDataReader.register(FeedReader)
    return FeedReader(feeds)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's calibrators print progress and log a pre-processing hint; keep the CLI to its own lines."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def calibrate_ranges(model_path: Path, feeds, tensors: list[str], method: str, scratch: Path) -> dict[str, float]:
    """Tensor -> symmetric threshold (max |range|) for ``tensors``, by ONNX Runtime's calibrator of ``method``."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    if method not in CALIBRATION_METHODS:
        raise DMMError(f"--calibration {method!r}", f"one of {', '.join(CALIBRATION_METHODS)}",
                       "pass --calibration percentile (the default) or another of those")
    settings = {
        "minmax": (CalibrationMethod.MinMax, {"symmetric": True}),
        "entropy": (CalibrationMethod.Entropy, {"symmetric": True, "num_bins": ENTROPY_BINS,
                                                "num_quantized_bins": ENTROPY_QUANTIZED_BINS}),
        "percentile": (CalibrationMethod.Percentile, {"symmetric": True, "num_bins": PERCENTILE_BINS,
                                                      "percentile": PERCENTILE}),
    }[method]
    with _quiet():
        calibrator = create_calibrator(model_path, ["MatMul", "Gemm"], augmented_model_path=str(
            scratch / f"augmented-{method}.onnx"), calibrate_method=settings[0], extra_options=settings[1])
        if hasattr(calibrator, "tensors_to_calibrate"):
            # Histograms of the quantized activations only: the entropy search costs about a second
            # per tensor, and the calibrator would otherwise histogram every MatMul input and output.
            calibrator.tensors_to_calibrate = set(tensors)
        calibrator.collect_data(_reader(feeds))
        ranges = calibrator.compute_data()
    thresholds = {}
    for tensor in tensors:
        low, high = (float(np.asarray(v).max()) if i else float(np.asarray(v).min())
                     for i, v in enumerate(ranges[tensor].range_value))
        thresholds[tensor] = max(abs(low), abs(high))
    return thresholds


def quantize_qdq(proto: onnx.ModelProto, feeds, *, method: str = "percentile", roles=None, float_layers=()
                 ) -> tuple[onnx.ModelProto, dict]:
    """The Q/DQ graph of the fp32 graph ``proto``, calibrated on ``feeds``; returns (graph, details).

    roles: the Linear roles to quantize (default `contract.graph_roles.INT8_ROLES`); float_layers:
    Linear node names of those roles that stay float (no Q/DQ on their inputs, `float_linears`).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    roles = INT8_ROLES if roles is None else tuple(roles)
    linears = {name: role for name, role in linear_nodes(proto).items() if role in roles}
    nodes = {node.name: node for node in proto.graph.node}
    activations = sorted({nodes[name].input[0] for name in linears})
    with tempfile.TemporaryDirectory(prefix="dmm-qdq-") as scratch_dir:
        scratch = Path(scratch_dir)
        source = scratch / "fp32.onnx"
        onnx.save(proto, str(source))  # a copy: quantize_static rewrites the model it is given
        thresholds = calibrate_ranges(source, feeds, activations, method, scratch)
        # Explicit symmetric per-tensor scales from the chosen method; a tensor that never left 0
        # in calibration gets a step of 1/127 (any positive scale represents an all-zero tensor).
        overrides = {tensor: [{"scale": np.array((t if t > 0 else 1.0) / INT8_MAX, dtype=np.float32),
                                "zero_point": np.array(0, dtype=np.int8)}] for tensor, t in thresholds.items()}
        target = scratch / "int8.onnx"
        with _quiet():
            quantize_static(
                str(source), str(target), _reader(feeds), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=sorted(linears), per_channel=True,
                reduce_range=False, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={
                    "ActivationSymmetric": True, "WeightSymmetric": True,  # zero points 0 (TensorRT)
                    "QuantizeBias": False,  # no int32 DequantizeLinear (TensorRT has none)
                    "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],  # inputs only
                    "DedicatedQDQPair": True,  # TensorRT fuses a Q/DQ pair into one consumer
                    "TensorQuantOverrides": overrides,
                },
            )
        quantized = onnx.load(str(target), load_external_data=True)
    _confine_to_linears(quantized, set(linears))
    unknown = sorted(set(float_layers) - set(linears))
    if unknown:
        raise DMMError(f"float layers {unknown}", f"int8 Linear layers among {', '.join(sorted(linears))}",
                       "name only quantizable Linears as float layers")
    quantized = float_linears(quantized, proto, float_layers)
    # The oldest IR that carries the opset, as the lowering writes it (what older TensorRT parsers accept).
    quantized.ir_version = onnx.helper.find_min_ir_version_for(list(quantized.opset_import))
    quantized.producer_name = proto.producer_name
    quantized.doc_string = proto.doc_string
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(proto.metadata_props)
    set_precision_metadata(quantized, "int8")
    int8_linears = set(linears) - set(float_layers)
    problems = check_qdq(quantized, int8_linears)
    if problems:
        raise DMMError(f"the int8 graph breaks the Q/DQ rules ({', '.join(problems[:3])})",
                       "Q/DQ on Linear inputs only, as docs/deployment.md#qdq-placement writes them",
                       "report this bug in calibration/qdq.py with the checkpoint")
    details = {
        "method": method, "samples": len(feeds), "tool": "onnxruntime.quantization.quantize_static (QDQ)",
        "quantized_linears": sorted(int8_linears), "float_linears": sorted(float_layers), "roles": list(roles),
        "activation_thresholds": {tensor: round(t, 8) for tensor, t in thresholds.items()
                                  if tensor in {nodes[name].input[0] for name in int8_linears}},
        "weights": "int8 per output channel, symmetric", "activations": "int8 per tensor, symmetric",
        "settings": {"entropy_bins": [ENTROPY_BINS, ENTROPY_QUANTIZED_BINS], "percentile": PERCENTILE}
        if method != "minmax" else {},
    }
    return quantized, details


def _confine_to_linears(proto: onnx.ModelProto, linears: set[str]) -> None:
    """Give every non-Linear consumer of a dequantized activation the float tensor back; drop orphans."""
    producers = {output: node for node in proto.graph.node for output in node.output}
    for node in proto.graph.node:
        if node.name in linears or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for index, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[index] = q.input[0]
    _drop_unused_qdq(proto)


def float_linears(quantized: onnx.ModelProto, fp32: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of the Q/DQ graph ``quantized`` in which the Linears ``names`` are float again.

    Each such Linear reads what it reads in ``fp32`` (the float activation, which the Q/DQ graph
    keeps under its fp32 name as its QuantizeLinear's input, and the float32 weight) and the Q/DQ
    nodes nothing reads any more are dropped. The other Linears' scales are untouched: ranges are
    calibrated on the fp32 graph, per tensor, so this is the graph `quantize_qdq` would write with
    those Linears left out, and a sweep over layer choices needs one calibration only.
    """
    names = set(names)
    out = onnx.ModelProto()
    out.CopyFrom(quantized)
    if not names:
        return out
    originals = {node.name: node for node in fp32.graph.node if node.name in names}
    missing = sorted(names - set(originals))
    if missing:
        raise DMMError(f"float layers {missing}", "Linear node names of the graph",
                       "name Linear nodes of this graph")
    fp32_inits = {init.name: init for init in fp32.graph.initializer}
    present = {init.name for init in out.graph.initializer}
    for node in out.graph.node:
        if node.name not in names:
            continue
        del node.input[:]
        node.input.extend(originals[node.name].input)
        for name in node.input:
            if name in fp32_inits and name not in present:  # the float32 weight the quantizer replaced
                out.graph.initializer.append(fp32_inits[name])
                present.add(name)
    _drop_unused_qdq(out)
    return out


def _drop_unused_qdq(proto: onnx.ModelProto) -> None:
    """Drop the Q/DQ nodes nothing reads any more (a DQ's Q goes next round) and unread initializers."""
    graph_outputs = {output.name for output in proto.graph.output}
    while True:  # drop Q/DQ nodes nothing reads any more (a DQ's Q goes next round)
        used = {name for node in proto.graph.node for name in node.input} | graph_outputs
        orphans = [node for node in proto.graph.node
                   if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.output[0] not in used]
        if not orphans:
            break
        for node in orphans:
            proto.graph.node.remove(node)
    used = {name for node in proto.graph.node for name in node.input}
    kept = [init for init in proto.graph.initializer if init.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)


def check_qdq(proto: onnx.ModelProto, linears: set[str]) -> list[str]:
    """The TensorRT Q/DQ rules of the module docstring; returns the problems (empty: all hold)."""
    initializers = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    init_types = {init.name: init.data_type for init in proto.graph.initializer}
    producers = {output: node for node in proto.graph.node for output in node.output}
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    problems = []
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.name}: domain {node.domain!r}, expected the default ONNX domain")
        scale = initializers.get(node.input[1])
        zero = node.input[2] if len(node.input) > 2 else ""
        if scale is None or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
            problems.append(f"{node.name}: scale is not a positive finite initializer")
            continue
        if not zero or zero not in initializers or init_types[zero] != TensorProto.INT8:
            problems.append(f"{node.name}: zero point is not an int8 initializer")
        elif np.any(initializers[zero] != 0):
            problems.append(f"{node.name}: zero point is not 0")
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        weight = node.op_type == "DequantizeLinear" and node.input[0] in initializers
        readers = consumers.get(node.output[0], [])
        if weight:
            data = initializers[node.input[0]]
            if init_types[node.input[0]] != TensorProto.INT8:
                problems.append(f"{node.name}: weight data is not int8")
            per_channel_ok = scale.ndim == 1 and data.ndim == 2 and axis in (1, -1) and scale.size == data.shape[1]
            if not per_channel_ok:
                problems.append(f"{node.name}: weight scale {scale.shape} is not one per output channel of "
                                f"{data.shape}")
            if len(readers) != 1 or readers[0][0].name not in linears or readers[0][1] != 1:
                problems.append(f"{node.name}: a weight DQ must feed exactly one Linear's weight input")
        else:
            if scale.ndim != 0:
                problems.append(f"{node.name}: activation scale has shape {scale.shape}, expected per-tensor")
            if node.op_type == "DequantizeLinear":
                source = producers.get(node.input[0])
                if source is None or source.op_type != "QuantizeLinear":
                    problems.append(f"{node.name}: an activation DQ must read a QuantizeLinear")
                if not readers or any(reader.name not in linears or index != 0 for reader, index in readers):
                    problems.append(f"{node.name}: dequantized activation reaches "
                                    f"{sorted({r.name for r, _ in readers} - linears)}, expected Linear inputs only")
            else:
                if any(reader.op_type != "DequantizeLinear" for reader, _ in readers):
                    problems.append(f"{node.name}: a QuantizeLinear must feed DequantizeLinear only")
    return problems
