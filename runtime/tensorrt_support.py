"""The TensorRT / CUDA toolkit shared by the builder (`export.trt_build`) and the backend (`runtime.trt_backend`).

Torch-free, and importing it imports neither tensorrt nor pycuda: `import_tensorrt`
does that on demand with an install hint. Here: the plan manifest's ``engine`` record
and its checks (sha256, TensorRT version, GPU), the GPU's identity, the engine's I/O as
the manifest writes it, and a TensorRT logger that keeps what it was told.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from contract.errors import DMMError
from contract.files import sha256_bytes
from contract.manifest import Manifest
from runtime.backend import check_engine_io
from runtime.cuda_support import INSTALL_HINT, gpu_name_and_capability

if TYPE_CHECKING:  # the static check of the GPU layer (scripts/typecheck_gpu.sh) reads TensorRT's stubs
    import tensorrt

PLAN_KIND = "tensorrt-plan"
ENGINE_FIELDS = ("kind", "tensorrt_version", "gpu_name", "compute_capability", "plan_sha256", "io")
REBUILD_HINT = "rebuild the plan on this machine: python cli.py build NAME.onnx (plans are not portable)"


@dataclass(frozen=True)
class GpuIdentity:
    """What a plan is tied to besides the TensorRT version."""

    name: str
    compute_capability: str  # "8.7"

    def label(self) -> str:
        return f"{self.name} (compute capability {self.compute_capability})"


def import_tensorrt(purpose: str):
    """The tensorrt module, or a DMMError that says how to get it."""
    if importlib.util.find_spec("tensorrt") is None:
        raise DMMError(f"{purpose}: the 'tensorrt' package is not installed", "the 'tensorrt' package",
                       f"{INSTALL_HINT}, or run the .onnx with ONNX Runtime")
    try:
        import tensorrt
    except (ImportError, OSError) as error:  # a wheel without its CUDA libraries raises at import
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DMMError(f"{purpose}: 'tensorrt' is installed but does not import ({first_line})",
                       "the TensorRT libraries for this CUDA", INSTALL_HINT) from None
    return tensorrt


def tensorrt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def gpu_identity(device: int = 0) -> GpuIdentity:
    """Name and compute capability of CUDA device ``device``: pycuda first (what the runtime runs on), then
    cuda-python (`runtime.cuda_support`). DMMError when neither answers, saying what each said.
    """
    name, capability, _ = gpu_name_and_capability(device)
    return GpuIdentity(name, capability)


def check_plan_manifest(source: str, manifest: Manifest) -> dict:
    """The manifest's engine record, or a DMMError when the manifest is not a plan's."""
    engine = manifest.engine or {}
    missing = [name for name in ENGINE_FIELDS if name not in engine]
    if engine.get("kind") != PLAN_KIND or missing:
        raise DMMError(f"{source}: its manifest has no TensorRT engine record (missing {', '.join(missing) or 'kind'})",
                       "the NAME.plan.json that 'cli.py build' writes beside the plan",
                       "rebuild: python cli.py build NAME.onnx")
    return engine


def check_plan_bytes(source: str, engine: dict, plan: bytes) -> None:
    """The plan must be the one its manifest describes (sha256): refuses truncated, damaged or foreign files."""
    digest = sha256_bytes(plan)
    if digest != engine["plan_sha256"]:
        size = engine.get("plan_bytes")
        raise DMMError(f"{source}: sha256 {digest[:12]}... ({len(plan)} bytes)",
                       f"the manifest's {str(engine['plan_sha256'])[:12]}...{f' ({size} bytes)' if size else ''} (the "
                       "plan is truncated, damaged or not the one its manifest describes)",
                       "rebuild it: python cli.py build NAME.onnx")


def check_plan_target(source: str, engine: dict, *, tensorrt_version: str, gpu: GpuIdentity) -> None:
    """The TensorRT version and the GPU here must be the ones the plan was built with."""
    if str(engine["tensorrt_version"]) != str(tensorrt_version):
        raise DMMError(f"{source}: plan built with TensorRT {engine['tensorrt_version']}",
                       f"TensorRT {tensorrt_version} (this machine's)", REBUILD_HINT)
    built_on = GpuIdentity(str(engine["gpu_name"]), str(engine["compute_capability"]))
    if built_on != gpu:
        raise DMMError(f"{source}: plan built on GPU {built_on.label()}", f"{gpu.label()} (this machine's GPU)",
                       REBUILD_HINT)


def numpy_dtype_name(dtype: tensorrt.DataType) -> str:
    """TensorRT DataType -> numpy dtype name as manifests write it ("float32")."""
    import tensorrt as trt

    try:
        return np.dtype(trt.nptype(dtype)).name
    except TypeError:  # BF16, FP8, INT4 have no numpy type
        return str(dtype).split(".")[-1].lower()


def engine_io(engine: tensorrt.ICudaEngine) -> list[dict]:
    """Every I/O tensor of a deserialised engine: name, mode ("input" / "output"), shape, dtype."""
    import tensorrt as trt

    tensors = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        tensors.append({"name": name, "mode": mode, "shape": [int(d) for d in engine.get_tensor_shape(name)],
                        "dtype": numpy_dtype_name(engine.get_tensor_dtype(name))})
    return tensors


def check_io(source: str, manifest: Manifest, tensors: list[dict]) -> None:
    for kind in ("input", "output"):
        check_engine_io(source, manifest, kind, [(t["name"], tuple(t["shape"]), t["dtype"])
                                                 for t in tensors if t["mode"] == kind])


_LOGGER = None


def capturing_logger():
    """The process's TensorRT logger: it keeps the errors and warnings of the current operation
    (``messages``, cleared by the caller) so that they end up in DMMErrors instead of on stderr only.

    One per process: older TensorRT releases treat the logger as a singleton.
    """
    import tensorrt as trt

    global _LOGGER
    if _LOGGER is None:
        class CapturingLogger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages: list[tuple[str, str]] = []

            def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
                if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                    self.messages.append(("error", str(msg)))
                elif severity == trt.ILogger.WARNING:
                    self.messages.append(("warning", str(msg)))

        _LOGGER = CapturingLogger()
    return _LOGGER


def create_runtime(trt, logger, source: str) -> tensorrt.Runtime:
    """``trt.Runtime(logger)``, or a DMMError. Like the Builder's constructor, it raises TypeError
    ("factory function returned nullptr") when CUDA cannot initialise, e.g. TensorRT 11 (CUDA 13) on a
    CUDA 12 driver."""
    try:
        return trt.Runtime(logger)
    except TypeError:
        raise DMMError(f"{source}: TensorRT {trt.__version__} could not create its runtime ({logged_errors(logger)})",
                       "a CUDA driver as new as this TensorRT's CUDA (TensorRT 11.x needs CUDA 13, tensorrt-cu12 "
                       "10.x CUDA 12)", "install the TensorRT build for this driver or update the driver "
                       "(python cli.py doctor shows both)") from None


def logged_errors(logger, limit: int = 3) -> str:
    errors = [message for level, message in logger.messages if level == "error"]
    if not errors:
        return "TensorRT logged no error"
    shown = ", ".join(message.strip().splitlines()[0] for message in errors[:limit])
    return shown + (f" (+{len(errors) - limit} more)" if len(errors) > limit else "")


# -- what each layer of a built plan runs in (the engine inspector) ---------------------------------

# Substrings of the inspector's "Format/Datatype" ("Row major linear FP32", "Half", "Int8", ...) ->
# precision, checked in this order ("BFLOAT16" holds "FLOAT", "UINT8" holds "INT8").
TENSOR_PRECISIONS = (("BFLOAT16", "bf16"), ("BF16", "bf16"), ("FP16", "fp16"), ("HALF", "fp16"), ("FP8", "fp8"),
                     ("UINT8", "uint8"), ("INT8", "int8"), ("INT4", "int4"), ("FP4", "fp4"), ("FP32", "fp32"),
                     ("FLOAT", "fp32"), ("INT32", "int32"), ("INT64", "int64"), ("BOOL", "bool"))
REDUCED_PRECISIONS = ("fp16", "bf16", "fp8", "int8", "int4", "fp4")
ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
MYELIN_SUFFIX = re.compile(r"_myl\d+_\d+$")
PRECISION_CHECKS = ("fail", "warn")


def tensor_precision(format_datatype: str) -> str:
    text = str(format_datatype).upper()
    for key, name in TENSOR_PRECISIONS:
        if key in text:
            return name
    return "unknown"


def layer_precision(precisions: list[str]) -> str:
    """What a layer computes in, judged by its I/O tensors: the most reduced float type among them."""
    for candidate in ("int4", "fp4", "int8", "fp8", "fp16", "bf16", "fp32"):
        if candidate in precisions:
            return candidate
    return "none"  # shapes, indices, booleans only


def is_opaque_region(layer: dict) -> bool:
    """A fused Myelin region ("{ForeignNode[first...last]}") whose inner layers the inspector does not show:
    its I/O types are its boundaries' only (TensorRT 10.3 reports fp32 boundaries around fp16 / int8 inside)."""
    name = str(layer.get("Name", ""))
    return (name.startswith("{") or "ForeignNode" in name) and not ONNX_LAYER.search(str(layer.get("Metadata", "")))


def layer_onnx_nodes(layer: dict) -> list[str]:
    """The ONNX nodes a layer was built from: its metadata ("[ONNX Layer: name]" per node, TensorRT
    8.6+ with detailed verbosity), else its name ("a + b"; Myelin kernels "node_myl0_3"). Empty where the
    name does not say (a fused "{ForeignNode[first...last]}" region, a generated kernel "__myl_...").
    """
    found = ONNX_LAYER.findall(str(layer.get("Metadata", "")))
    if found:
        return list(dict.fromkeys(name.strip() for name in found))
    name = str(layer.get("Name", ""))
    if name.startswith("{") or "ForeignNode" in name:
        return []
    parts = [MYELIN_SUFFIX.sub("", part.strip()) for part in name.split(" + ")]
    return [part for part in parts if part and not part.startswith("__") and "Reformat" not in part
            and "copy" not in part.lower()]


def layer_summary(engine_information: str, manifest: Manifest) -> dict:
    """What each layer of a plan runs in, from the engine inspector's JSON (``get_engine_information``),
    and which layers the manifest pins to fp32 run in reduced precision.

    The manifest's ``exporter.precision_pins`` (`contract.graph_roles.precision_pins`) names the
    nodes the graph computes in fp32 (everything outside the Linear layers: LayerNorm, softplus,
    exp, the recurrence, ...) and the data-movement nodes that carry no precision of their own. A
    layer built from pinned nodes (and data movement) is judged; a layer fused with a Linear, a Cast
    or a Q/DQ node computes in more than one type and counts as unverifiable, as does a fused region
    whose nodes the inspector does not name. In an fp32 graph every layer is judged. Needs a plan
    built with detailed profiling verbosity; with less the summary says so and nothing is judged.
    """
    try:
        information = json.loads(engine_information)
    except (json.JSONDecodeError, TypeError):
        information = {}
    layers = information.get("Layers", []) if isinstance(information, dict) else information
    layers = layers if isinstance(layers, list) else []
    detailed = any(isinstance(layer, dict) and ("Inputs" in layer or "Outputs" in layer) for layer in layers)
    pins = manifest.exporter.get("precision_pins", {})
    pinned, neutral = set(pins.get("fp32", [])), set(pins.get("neutral", []))
    all_pinned = manifest.precision == "fp32"
    summary: dict = {"profiling_verbosity": "detailed" if detailed else "layer names only" if layers else "none",
                     "layers": len(layers), "by_precision": {}, "tf32_kernels": 0, "per_layer": [],
                     "pinned_fp32_checked": 0, "pinned_fp32_unverifiable": 0,
                     "pinned_fp32_in_reduced_precision": [],
                     "pins_known": all_pinned or bool(pinned), "opaque_regions": 0}
    for layer in layers:
        if not isinstance(layer, dict):
            summary["per_layer"].append({"name": str(layer)[:300]})
            continue
        inputs = [tensor_precision(t.get("Format/Datatype", "")) for t in layer.get("Inputs", [])
                  if isinstance(t, dict)]
        outputs = [tensor_precision(t.get("Format/Datatype", "")) for t in layer.get("Outputs", [])
                   if isinstance(t, dict)]
        precision = layer_precision(inputs + outputs)
        nodes = layer_onnx_nodes(layer)
        summary["opaque_regions"] += is_opaque_region(layer)
        tactic = str(layer.get("TacticName", layer.get("TacticValue", "")))
        summary["by_precision"][precision] = summary["by_precision"].get(precision, 0) + 1
        summary["tf32_kernels"] += "tf32" in tactic.lower()
        summary["per_layer"].append({"name": str(layer.get("Name", ""))[:300], "type": str(layer.get("LayerType", "")),
                                     "precision": precision, "inputs": inputs, "outputs": outputs,
                                     "onnx_nodes": nodes, "tactic": tactic[:160]})
        if all_pinned:
            judged = precision != "none"
        elif any(node in pinned for node in nodes):
            judged = all(node in pinned or node in neutral for node in nodes)
            summary["pinned_fp32_unverifiable"] += not judged
        else:
            judged = False
            summary["pinned_fp32_unverifiable"] += bool(pinned) and not nodes and precision != "none"
        if judged:
            summary["pinned_fp32_checked"] += 1
            if precision in REDUCED_PRECISIONS:
                summary["pinned_fp32_in_reduced_precision"].append(
                    {"layer": str(layer.get("Name", ""))[:300], "precision": precision, "onnx_nodes": nodes})
    summary["reduced_precision_layers"] = sum(count for name, count in summary["by_precision"].items()
                                              if name in REDUCED_PRECISIONS)
    # Which precision the plan computes in cannot be told when no layer shows a reduced type and fused
    # regions hide their inside: "fp32 only" would be a guess (recorded, not warned about).
    summary["reduced_precision_unverifiable"] = (
        f"{summary['opaque_regions']} fused Myelin region(s) show only their fp32 boundaries; the precision inside "
        "them is not reported by this TensorRT's inspector"
        if summary["opaque_regions"] and not summary["reduced_precision_layers"] else None)
    return summary


def check_layer_precisions(source: str, summary: dict, manifest: Manifest, *, precision_check: str = "fail",
                           tf32: bool = False) -> list[str]:
    """DMMError when a layer the manifest pins to fp32 runs in reduced precision (``precision_check``
    "fail"), else the warnings to record: the same finding under "warn", a reduced-precision graph
    with no reduced-precision layer at all (an int8 graph whose Q/DQ TensorRT left as fp32), TF32
    kernels with TF32 off, a summary that could not judge.
    """
    warnings = []
    if summary["profiling_verbosity"] != "detailed":
        return [f"{source}: the engine inspector gave no per-layer precisions (profiling verbosity "
                f"{summary['profiling_verbosity']}); build with detailed profiling verbosity "
                "(trtexec --profilingVerbosity=detailed) to check the fp32 pins"]
    if not summary["pins_known"]:
        warnings.append(f"{source}: the manifest names no fp32-pinned nodes (exported by an older dmm-deploy); "
                        "per-layer precisions recorded, not checked; re-export to check them")
    offenders = summary["pinned_fp32_in_reduced_precision"]
    if offenders:
        shown = ", ".join(f"{item['layer'][:80]} ({item['precision']})" for item in offenders[:3])
        message = (f"{source}: {len(offenders)} layer(s) the graph keeps in fp32 (LayerNorm, softplus, exp, the "
                   f"recurrence, everything outside the Linear layers) run in reduced precision: {shown}"
                   + (f" (+{len(offenders) - 3} more)" if len(offenders) > 3 else ""))
        if precision_check == "fail":
            raise DMMError(message, f"them in fp32 as the {manifest.precision} graph says",
                           "build with --typing strong (weak typing may ignore the pins inside fused regions), or "
                           "pass --precision-check warn to keep the plan anyway")
        warnings.append(message)
    if (manifest.precision in ("fp16", "int8") and not summary["by_precision"].get(manifest.precision)
            and not summary.get("reduced_precision_unverifiable")):
        warnings.append(f"{source}: a {manifest.precision} graph, but no layer of the plan runs in "
                        f"{manifest.precision} (TensorRT kept those layers in fp32: "
                        + ("Q/DQ run as fake-quant)" if manifest.precision == "int8" else "the casts were folded)"))
    if summary["tf32_kernels"] and not tf32:
        warnings.append(f"{source}: {summary['tf32_kernels']} kernel(s) use TF32 although TF32 is off")
    return warnings
