"""The int8 pass: which Linears of the graph are int8, and the Q/DQ graph of that choice.

`lower_int8` builds calibration feeds from the calibration episodes (`calibration.data`), inserts
Q/DQ on the chosen Linears (`calibration.qdq`) and, for ``--int8-layers auto``, measures each
Linear's share of the action error on held-out inputs as the accuracy report measures it
(`calibration.accuracy.action_errors`) to keep the most sensitive in fp32 (docs/design.md#int8).
"""

from __future__ import annotations

import numpy as np
import onnx

from calibration.accuracy import action_errors
from calibration.data import calibration_feeds
from calibration.qdq import float_linears, quantize_qdq
from contract.errors import DMMError
from contract.graph_roles import INT8_ROLES, linear_nodes
from runtime.ort_backend import cpu_session

INT8_LAYER_CHOICES = ("auto", "all")  # besides a comma-separated list of Linear names


def lower_int8(proto: onnx.ModelProto, manifest, split, *, layers: str, method: str, samples: int,
               heldout_samples: int, target: float, seed: int) -> tuple[onnx.ModelProto, dict]:
    """The int8 graph of the fp32 graph ``proto`` and its ``calibration`` and ``int8_*`` details.

    split: the `calibration.data.EpisodeSplit` to calibrate on (``samples`` feeds of its calibration
    episodes, `calibration.data.calibration_feeds`) and, for ``layers`` auto, to choose the int8 Linears
    on (``heldout_samples`` inputs of its held-out episodes, aiming at ``target``); layers: the
    ``--int8-layers`` value; method: the range calibration (`calibration.qdq.CALIBRATION_METHODS`).
    """
    candidates = [name for name, role in linear_nodes(proto).items() if role in INT8_ROLES]
    listed = listed_int8_layers(layers, candidates)  # before the calibration: a typo fails fast
    feeds = calibration_feeds(proto, manifest, split.calibration, samples, seed=seed)
    details: dict = {}
    if listed is None:
        quantized, calibration = quantize_qdq(proto, feeds, method=method)
        chosen = choose_int8_layers(proto, quantized, manifest, split.heldout, count=heldout_samples,
                                    seed=seed, target=target)
        if not chosen["int8_layers"]:
            raise DMMError(
                f"--int8-layers auto: the action RMSE met {target:g} of the action range only with every Linear in "
                f"fp32 (all int8: {chosen['steps'][0]['rmse_relative']:.2e}, nothing was written)",
                "at least one int8 Linear within --int8-target",
                "export fp32 or --fp16, or raise --int8-target")
        lowered = float_linears(quantized, proto, chosen["fp32_layers"])
        calibration.update(quantized_linears=chosen["int8_layers"], float_linears=sorted(chosen["fp32_layers"]))
        details.update(int8_layers_target=target, int8_selection=chosen["steps"])
        if "sensitivity" in chosen:
            details["int8_sensitivity"] = chosen["sensitivity"]
        int8 = chosen["int8_layers"]
    else:
        int8 = listed
        lowered, calibration = quantize_qdq(proto, feeds, method=method,
                                            float_layers=[name for name in candidates if name not in listed])
    details.update(
        calibration=calibration,
        int8_layers_choice=layers.strip() if layers.strip() in INT8_LAYER_CHOICES else "list",
        int8_layers={name: "int8" if name in int8 else "fp32" for name in candidates},
        int8_mac_fraction=int8_mac_fraction(linear_macs(proto), int8),
    )
    return lowered, details


def linear_macs(proto: onnx.ModelProto) -> dict[str, int]:
    """Linear node name -> its multiply-adds per call of the graph: rows it runs on x K x N.

    Rows are the product of the activation's leading dimensions (batch x tokens: a window
    graph's Linears run on every token of the window, a stream graph's on one step), K x N
    the weight initializer's shape (a Gemm's transposed weight has the same product).
    """
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {info.name: [dim.dim_value for dim in info.type.tensor_type.shape.dim]
              for info in (*inferred.graph.input, *inferred.graph.value_info)}
    weights = {init.name: list(init.dims) for init in proto.graph.initializer}
    nodes = {node.name: node for node in proto.graph.node}
    macs = {}
    for name in linear_nodes(proto):
        node = nodes[name]
        rows = shapes.get(node.input[0], [])[:-1]
        if not rows or not all(rows):
            raise DMMError(f"Linear {name!r} activation shape {shapes.get(node.input[0])}",
                           "static shapes, as export.lowering writes them (a static batch)",
                           "report this bug with the checkpoint")
        macs[name] = int(np.prod(rows)) * int(np.prod(weights[node.input[1]]))
    return macs


def int8_mac_fraction(macs: dict[str, int], int8_layers) -> float:
    """The fraction of all Linear multiply-adds (``macs``, `linear_macs`) that run in int8."""
    return sum(macs[name] for name in int8_layers) / sum(macs.values())


def listed_int8_layers(choice: str, candidates: list[str]) -> list[str] | None:
    """The Linears an ``--int8-layers`` value puts in int8: ``all`` every candidate, a comma-separated
    LIST exactly those (in graph order); None for ``auto`` (`choose_int8_layers` measures)."""
    choice = choice.strip()
    if choice == "auto":
        return None
    if choice == "all":
        return list(candidates)
    names = [name.strip() for name in choice.split(",") if name.strip()]
    unknown = [name for name in names if name not in candidates]
    if unknown:
        raise DMMError(f"--int8-layers with unknown Linear layer(s) {', '.join(unknown)}",
                       f"auto, all or names among {','.join(candidates)}", "pick the names from those")
    return [name for name in candidates if name in names]


def choose_int8_layers(proto: onnx.ModelProto, quantized: onnx.ModelProto, manifest, heldout, *, count: int,
                       seed: int, target: float, sensitivity: bool | None = None) -> dict:
    """``--int8-layers auto``: which quantized Linears of ``quantized`` (all of them int8) stay fp32.

    Measured as the accuracy report measures (`calibration.accuracy.action_errors`, the fp32 graph
    at full optimisation against the candidate at ORT_DISABLE_ALL, ``count`` held-out inputs, seed
    ``seed``), relative to the mean action range. If the all-int8 graph meets ``target`` it is kept
    whole. Otherwise each Linear's share of the action error is measured by quantizing it alone
    (one Linear in int8, the rest fp32: its own error, free of interactions with the others' rounding),
    and the Linears stay fp32 one by one, most sensitive first, each step measured, until the
    relative RMSE meets ``target``. ``sensitivity`` True measures the shares even when the
    all-int8 graph meets the target (the bench's curve).

    Returns {"fp32_layers", "int8_layers", "rmse_relative" (of the chosen graph), "steps" (each
    step's fp32 layers, relative RMSE and int8 MAC fraction), "sensitivity" (name -> relative RMSE
    alone, its share of the summed squared errors, MACs; absent when not measured), "macs"}.
    """
    candidates = _int8_linears(quantized)
    macs = linear_macs(proto)
    action_range = float(np.mean(np.asarray(manifest.action_high) - np.asarray(manifest.action_low)))
    reference = cpu_session(proto.SerializeToString(), optimize=True)

    def relative_rmse(fp32_layers) -> float:
        graph = float_linears(quantized, proto, fp32_layers)
        candidate = cpu_session(graph.SerializeToString(), optimize=False)
        return action_errors(reference, candidate, manifest, heldout, count, seed=seed)["action_rmse"] / action_range

    def step(fp32_layers: list[str]) -> dict:
        int8 = [name for name in candidates if name not in fp32_layers]
        return {"fp32_layers": list(fp32_layers), "rmse_relative": relative_rmse(fp32_layers),
                "int8_mac_fraction": int8_mac_fraction(macs, int8)}

    steps = [step([])]
    result: dict = {"macs": macs}
    if steps[0]["rmse_relative"] > target or sensitivity:
        alone = {name: relative_rmse([other for other in candidates if other != name]) for name in candidates}
        total = sum(value ** 2 for value in alone.values()) or 1.0
        result["sensitivity"] = {name: {"rmse_relative_alone": alone[name], "share": alone[name] ** 2 / total,
                                        "macs": macs[name]} for name in candidates}
        order = sorted(candidates, key=lambda name: (-alone[name], candidates.index(name)))
        while steps[-1]["rmse_relative"] > target and len(steps) <= len(order):
            steps.append(step(order[:len(steps)]))
    fp32_layers = steps[-1]["fp32_layers"]
    result.update({"fp32_layers": fp32_layers, "int8_layers": [n for n in candidates if n not in fp32_layers],
                   "rmse_relative": steps[-1]["rmse_relative"], "steps": steps})
    return result


def _int8_linears(quantized: onnx.ModelProto) -> list[str]:
    """The Linears of a Q/DQ graph whose activation input is dequantized, in graph order."""
    producers = {output: node for node in quantized.graph.node for output in node.output}
    return [node.name for node in quantized.graph.node if node.op_type in ("MatMul", "Gemm")
            and getattr(producers.get(node.input[0]), "op_type", None) == "DequantizeLinear"]
