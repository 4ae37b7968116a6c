"""Precision in the graph (docs/design.md#precision): which MatMuls are Linear layers, the fp16 pass, and
`lower_precision`, which turns a checked fp32 graph into its fp16 or int8 (Q/DQ) form with an
accuracy report.

TensorRT 11 removed the FP16/INT8 builder flags and the INT8 calibrators, and JetPack 6 ships
TensorRT 10.3, so the precision is written into the ONNX graph itself: a strongly typed
TensorRT network (or ONNX Runtime) runs each tensor in the type the graph gives it.

Linear layers: the role table `contract.graph_roles` (shared with the Q/DQ pass) names each
projection of the lowered graph by its node name; every other MatMul (selection matrices, the SSM
output) stays float32 in every precision. The fp16 pass, why the CPU report runs `fp16_emulation`,
and how ``--int8-layers`` chooses the int8 Linears: docs/design.md#fp16 and docs/design.md#int8.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibration.accuracy import ScoreGate, accuracy_report, describe_delta
from calibration.data import CLOSED_LOOP_MIN_STEPS, calibration_data
from calibration.int8 import lower_int8
from calibration.qdq import CALIBRATION_METHODS
from contract.errors import DMMError
from contract.graph_roles import ALL_ROLES, FP16_ROLES, linear_nodes, set_precision_metadata

LOW_PRECISIONS = ("fp16", "int8")
FP16_MAX = float(np.finfo(np.float16).max)  # 65504

# What a precision may lose in closed-loop normalised score, in points (cli.py --max-score-drop). Three points
# for both: a trained Hopper policy's paired per-episode deltas spread by about 4.4 points (one fall ends an
# episode early), so showing a 1-point bound would refuse most sound fp16 graphs at any affordable episode
# count (BENCHMARKS.md, "The export's score gate").
DEFAULT_MAX_SCORE_DROP = {"fp16": 3.0, "int8": 3.0}
# The largest action RMSE against fp32 on held-out inputs, as a fraction of the mean action range
# (cli.py --max-action-error): fp16 rounding of the Linear layers stays far below its limit.
DEFAULT_MAX_ACTION_ERROR = {"fp16": 1e-2, "int8": 2e-2}
# --int8-layers auto keeps Linears in fp32 until the int8 graph's action RMSE is within this fraction of
# the action range (--int8-target; at most the limit above). A quarter of the limit, measured: on a 100k-step
# hopper checkpoint the graph auto chose at 1.4e-2 lost 2.6 points closed loop and could not be shown within
# the allowed drop in 40 paired episodes; at 4.5e-3 (three Linears fp32, 92.5% of the multiply-adds int8)
# it lost 0.4 and passed in 20 (BENCHMARKS.md, "Int8 where it is harmless").
DEFAULT_INT8_TARGET = 5e-3
MAX_PRECISION_SAMPLES = 100_000  # calibration windows, held-out samples, paired episodes: checked before any work
DEFAULT_SCORE_BATCH = 10  # paired episodes per look of the score gate
DEFAULT_SCORE_CAP = 40  # the most paired episodes the score gate plays


def _fp16_initializer(init: onnx.TensorProto, name: str) -> onnx.TensorProto:
    array = numpy_helper.to_array(init)  # float32
    peak = float(np.abs(array).max()) if array.size else 0.0
    if not np.isfinite(peak) or peak > FP16_MAX:
        raise DMMError(f"weight {init.name!r} max |value| {peak:.4g}", f"at most {FP16_MAX:g} (what fp16 holds)",
                       "export this checkpoint in fp32 (or int8)")
    return numpy_helper.from_array(array.astype(np.float16), name)


def to_fp16(proto: onnx.ModelProto, roles: tuple[str, ...] = FP16_ROLES) -> onnx.ModelProto:
    """The mixed-precision graph: the Linear layers of ``roles`` in fp16, everything else float32.

    Node names stay those of the fp32 graph; the casts are named ``<node>/to_fp16`` and
    ``<node>/to_fp32``, and the Linear's output keeps its name (on the fp32 cast), so
    downstream wiring and name-based exclusions are unchanged.
    """
    unknown = sorted(set(roles) - set(ALL_ROLES))
    if unknown:
        raise DMMError(f"fp16 roles {unknown}", f"some of {', '.join(ALL_ROLES)}", "name roles from that list")
    linears = {name: role for name, role in linear_nodes(proto).items() if role in roles}
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    initializers = {init.name: init for init in graph.initializer}
    converted: dict[str, str] = {}  # fp32 initializer -> its fp16 copy
    nodes = []
    for node in graph.node:
        if node.name not in linears:
            nodes.append(node)
            continue
        cast_in = helper.make_node("Cast", [node.input[0]], [f"{node.name}/to_fp16"], name=f"{node.name}/to_fp16",
                                   to=TensorProto.FLOAT16)
        constant_inputs = range(1, len(node.input))  # MatMul: the weight; Gemm: weight and bias
        for index in constant_inputs:
            source = node.input[index]
            if source not in converted:
                converted[source] = f"{source}:fp16"
                graph.initializer.append(_fp16_initializer(initializers[source], converted[source]))
            node.input[index] = converted[source]
        node.input[0] = cast_in.output[0]
        output = node.output[0]
        node.output[0] = f"{output}:fp16"
        cast_out = helper.make_node("Cast", [node.output[0]], [output], name=f"{node.name}/to_fp32",
                                    to=TensorProto.FLOAT)
        nodes.extend([cast_in, node, cast_out])
    del graph.node[:]
    graph.node.extend(nodes)
    # Drop the float32 originals nothing reads any more (a weight shared with an fp32 node stays).
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    set_precision_metadata(out, "fp16")
    return out


def fp16_emulation(fp16_proto: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 graph's arithmetic in float32 ops that ONNX Runtime's CPU provider keeps, for the accuracy report.

    ORT CPU has no fp16 MatMul / Gemm kernel: it inserts its own fp16 -> fp32 casts around them
    and then drops them together with the graph's casts (even at ORT_DISABLE_ALL), which would
    leave only the weights rounded. Here each Linear instead reads fp16-rounded inputs as float32
    (Cast to fp16 then back), uses the fp16 weights' exact values as float32, and rounds its float32
    result to fp16 and back: fp16 inputs and weights, fp32 accumulation, fp16 output, what
    TensorRT's fp16 GEMMs compute (up to the accumulation order). Not the deployable graph.
    """
    out = onnx.ModelProto()
    out.CopyFrom(fp16_proto)
    graph = out.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    nodes = []
    for node in graph.node:
        source = producers.get(node.input[0]) if node.op_type in ("MatMul", "Gemm") else None
        lowered = source is not None and source.op_type == "Cast" and source.name.endswith("/to_fp16")
        if not lowered:
            nodes.append(node)
            continue
        widened = helper.make_node("Cast", [node.input[0]], [f"{node.name}/input_fp16_as_fp32"],
                                   name=f"{node.name}/input_fp16_as_fp32", to=TensorProto.FLOAT)
        node.input[0] = widened.output[0]
        for index in range(1, len(node.input)):
            init = initializers[node.input[index]]
            if init.data_type == TensorProto.FLOAT16:  # exact: every fp16 value is a float32 value
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
        fp16_output = node.output[0]  # read by the graph's <node>/to_fp32 cast
        node.output[0] = f"{node.name}:fp32_accumulated"
        rounded = helper.make_node("Cast", [node.output[0]], [fp16_output], name=f"{node.name}/output_to_fp16",
                                   to=TensorProto.FLOAT16)
        nodes.extend([widened, node, rounded])
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def tensor_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type for every tensor of the graph (by strict shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    types = {}
    for info in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info):
        types[info.name] = info.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    return types


def precision_summary(proto: onnx.ModelProto, precision: str) -> dict:
    """What the pass did, for the manifest: the low-precision Linear layers and the node counts.

    A MatMul / Gemm counts as low precision when its activation input comes from a Cast to
    fp16 (fp16) or from a DequantizeLinear (int8).
    """
    producers = {output: node for node in proto.graph.node for output in node.output}

    def lowered(node) -> bool:
        source = producers.get(node.input[0])
        if source is None:
            return False
        if precision == "fp16":
            return source.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16
                                                    for a in source.attribute)
        return source.op_type == "DequantizeLinear"

    low = sorted(node.name for node in proto.graph.node if node.op_type in ("MatMul", "Gemm") and lowered(node))
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"precision": precision, "low_precision_linears": low, "graph_nodes": len(proto.graph.node),
            "casts": ops.get("Cast", 0), "quantize_linear": ops.get("QuantizeLinear", 0),
            "dequantize_linear": ops.get("DequantizeLinear", 0)}


# -- the export step ----------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionOptions:
    """How `lower_precision` calibrates and judges a low-precision graph (cli.py export options)."""

    dataset: str | None = None  # a recording (directory or local id); None: the checkpoint's id, else closed loop
    calibration: str = "percentile"  # int8 range calibration: minmax | entropy | percentile
    calibration_samples: int = 512  # calibration windows (stream: steps with real caches)
    heldout_samples: int = 256  # held-out windows / steps for the action RMSE
    score_episodes: int = DEFAULT_SCORE_CAP  # the most closed-loop episodes per graph (seeds seed .. seed + n - 1)
    score_batch: int | None = None  # paired episodes per look (None: DEFAULT_SCORE_BATCH, at most score_episodes)
    max_score_drop: float | None = None  # None: DEFAULT_MAX_SCORE_DROP of the precision
    accept_inconclusive: bool = False  # pass a graph the gate could not judge at the cap (recorded)
    max_action_error: float | None = None  # None: DEFAULT_MAX_ACTION_ERROR of the precision
    int8_target: float | None = None  # None: DEFAULT_INT8_TARGET, at most the int8 limit
    int8_layers: str = "auto"  # auto | all | comma-separated Linear names to quantize (see the module docstring)
    seed: int = 0

    def validate(self, precision: str) -> None:
        if precision not in LOW_PRECISIONS:
            raise DMMError(f"precision {precision!r}", f"one of {', '.join(LOW_PRECISIONS)}",
                           "pass --fp16 or --int8 (fp32 needs no precision pass)")
        if self.calibration not in CALIBRATION_METHODS:
            raise DMMError(f"--calibration {self.calibration!r}", f"one of {', '.join(CALIBRATION_METHODS)}",
                           "pass --calibration percentile (the default) or another of those")
        flags = {"calibration_samples": "--calibration-windows", "heldout_samples": "heldout_samples",
                 "score_episodes": "--score-episodes"}
        for name, flag in flags.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PRECISION_SAMPLES:
                raise DMMError(f"{flag} {value!r}", f"a positive integer of at most {MAX_PRECISION_SAMPLES:,} "
                               "(the samples and episodes are held in memory)",
                               f"pass {flag} from 1 to {MAX_PRECISION_SAMPLES:,}")
        if self.max_score_drop is not None and not np.isfinite(self.max_score_drop):
            raise DMMError(f"--max-score-drop {self.max_score_drop}", "a finite number of points",
                           f"pass --max-score-drop {DEFAULT_MAX_SCORE_DROP[precision]:g} (the default) or another")
        if self.max_action_error is not None and not (np.isfinite(self.max_action_error) and self.max_action_error > 0):
            raise DMMError(f"--max-action-error {self.max_action_error}",
                           "a positive fraction of the action range (e.g. 0.02)", "pass --max-action-error 0.02")
        if self.int8_target is not None and not (np.isfinite(self.int8_target) and self.int8_target > 0):
            raise DMMError(f"--int8-target {self.int8_target}",
                           f"a positive fraction of the action range (e.g. {DEFAULT_INT8_TARGET:g})",
                           f"pass --int8-target {DEFAULT_INT8_TARGET:g} (the default) or leave it out")
        if not isinstance(self.int8_layers, str) or not self.int8_layers.strip(" ,"):
            raise DMMError(f"--int8-layers {self.int8_layers!r}", "auto, all or a comma-separated list of Linear "
                           "layer names (e.g. layer0/ssm/in_proj,layer1/dsm/dense)",
                           "pass --int8-layers auto (the default) or name the layers")
        if not 2 <= self.look_size <= self.score_episodes:
            raise DMMError(f"--score-batch {self.look_size} with --score-episodes {self.score_episodes}",
                           "2 <= batch <= episodes (each look of the gate needs two paired episodes)",
                           "pass --score-batch 2 or more and --score-episodes at least that")

    @property
    def look_size(self) -> int:
        """Paired episodes per look of the gate."""
        return self.score_batch if self.score_batch is not None else min(DEFAULT_SCORE_BATCH, self.score_episodes)

    def score_drop_limit(self, precision: str) -> float:
        return DEFAULT_MAX_SCORE_DROP[precision] if self.max_score_drop is None else float(self.max_score_drop)

    def action_error_limit(self, precision: str) -> float:
        return DEFAULT_MAX_ACTION_ERROR[precision] if self.max_action_error is None else float(self.max_action_error)

    def int8_layers_target(self) -> float:
        """What --int8-layers auto aims at: --int8-target (default DEFAULT_INT8_TARGET), never above the limit."""
        target = DEFAULT_INT8_TARGET if self.int8_target is None else float(self.int8_target)
        return min(target, self.action_error_limit("int8"))

    def score_gate(self, precision: str):
        return ScoreGate(max_score_drop=self.score_drop_limit(precision), batch=self.look_size,
                         cap=self.score_episodes, accept_inconclusive=self.accept_inconclusive)


def lower_precision(proto: onnx.ModelProto, checkpoint, manifest, *, precision: str,
                    options: PrecisionOptions) -> tuple[onnx.ModelProto, dict, dict]:
    """The ``precision`` form of the checked fp32 graph ``proto``, with its accuracy report.

    manifest: the `runtime.Manifest` of the graph (its mode, dims, normalisation), batch 1.
    Returns (graph, accuracy, details): accuracy is the manifest's ``accuracy`` record,
    details what the pass did (for ``exporter``). Raises DMMError, with nothing written, when
    the action error against fp32 exceeds its limit, or when the closed-loop score is not shown
    to be no worse than the allowed drop (`calibration.accuracy.ScoreGate`: refused as worse, or
    inconclusive at the episode cap unless the options accept that).
    """
    options.validate(precision)
    if manifest.batch != 1:
        raise DMMError(f"--batch {manifest.batch} with --{precision}", "1 (a precision graph is judged by its "
                       "closed-loop score in the control loop, which drives one plant)",
                       f"leave --batch out with --{precision}")
    # What the options ask of each step, settled before the pass goes down into calibration/.
    steps = max(CLOSED_LOOP_MIN_STEPS, 2 * (options.calibration_samples + options.heldout_samples))
    int8_target = options.int8_layers_target()
    action_limit = options.action_error_limit(precision)
    gate = options.score_gate(precision)
    # 1. data: the training dataset where it is here as the checkpoint recorded it, else closed-loop rollouts of
    # the policy: a checkpoint stays exportable when its dataset is gone or its id now names other content.
    data = calibration_data(proto, manifest, checkpoint, dataset=options.dataset, steps=steps, seed=options.seed)
    if data.notice:
        print(data.notice, file=sys.stderr, flush=True)
    split = data.split
    details: dict = {"dataset": split.summary(), "calibration_source": data.source}
    # 2. the graph: fp16 here, int8 calibrated on the calibration episodes.
    if precision == "fp16":
        lowered = to_fp16(proto)
        evaluated = fp16_emulation(lowered)
    else:
        lowered, int8_details = lower_int8(proto, manifest, split, layers=options.int8_layers,
                                           method=options.calibration, samples=options.calibration_samples,
                                           heldout_samples=options.heldout_samples,
                                           target=int8_target, seed=options.seed)
        details.update(int8_details)
        evaluated = lowered
    details.update(precision_summary(lowered, precision))
    # 3. the judgement, on the held-out episodes.
    lowered_manifest = dataclasses.replace(manifest, precision=precision)
    accuracy = accuracy_report(proto, evaluated, manifest=lowered_manifest, heldout=split.heldout,
                               heldout_samples=options.heldout_samples, gate=gate, seed=options.seed,
                               action_limit=action_limit)
    accuracy["calibration_source"] = data.source
    if precision == "int8":
        accuracy["calibration_method"] = options.calibration
        details["int8_action_rmse_relative"] = accuracy["action_rmse_relative"]
    if accuracy["action_refused"]:
        layers = ", --int8-layers auto" if precision == "int8" and details["int8_layers_choice"] != "auto" else ""
        raise DMMError(
            f"--{precision} accuracy: action RMSE {accuracy['action_rmse']:.2e} against fp32 on held-out inputs, "
            f"{accuracy['action_rmse_relative']:.2e} of the action range (nothing was written, no episode was played)",
            f"at most --max-action-error {action_limit:g}",
            f"export fp32/fp16, try another --calibration{layers}, or raise --max-action-error")
    if accuracy["score_refused"]:
        accept = "" if accuracy["score_looks"][-1]["decision"] == "refuse" else ", pass --accept-inconclusive"
        raise DMMError(
            f"--{precision} accuracy: closed-loop normalised score {accuracy['score']:.2f} against fp32 "
            f"{accuracy['score_fp32']:.2f}, {describe_delta(accuracy)}, action RMSE {accuracy['action_rmse']:.2e}: "
            f"{accuracy['score_verdict']} (nothing was written)",
            f"a score shown no worse than --max-score-drop {accuracy['max_score_drop']:g}",
            f"export fp32/fp16, try another --calibration, play more episodes (--score-episodes){accept}, "
            "or raise --max-score-drop")
    return lowered, accuracy, details
