"""`export_checkpoint`: a model.pt -> NAME.onnx and its manifest NAME.json (window or stream mode).

    onnx_path, manifest_path = export_checkpoint("runs/hopper-seed0/model.pt", mode="stream")

The graph comes from `export.lowering` (built from the model's weights), is checked
with ``onnx.checker`` (full check), against the TensorRT parser's op table
(`export.trt_ops`) and, in ONNX Runtime, against the PyTorch model on real-looking
inputs (`export.reference.measure_parity`); the figures go into the manifest. Nothing
is written unless every check passes; the graph, manifest and data loader are written as one
set (`contract.files.atomic_write_set`): after a kill, the complete old or new export is on
disk. A second export to the same NAME while one runs is refused (`contract.manifest.export_lock`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

from contract.errors import DMMError
from contract.files import atomic_write_set
from contract.graph_roles import linear_nodes, precision_pins
from contract.manifest import MODES, PRECISIONS, export_lock, manifest_bytes, manifest_path_for, read_manifest
from contract.names import check_export_name
from dmm_train.checkpoint import MODEL_FILE, load_checkpoint
from dmm_train.manifest_builder import build_manifest
from export.config import DEFAULT_OPSET, DEFAULT_RUNS_DIR
from export.polygraphy_check import data_loader_files, real_feeds
from export.reference import PARITY_REFUSE_ABOVE, measure_parity
from export.trt_ops import check_graph_ops
from runtime.ort_backend import cpu_session


def find_latest_checkpoint(runs_dir: str | Path = DEFAULT_RUNS_DIR) -> Path:
    """The newest model.pt (by modification time) anywhere under ``runs_dir``."""
    runs_dir = Path(runs_dir)
    candidates = list(runs_dir.rglob(MODEL_FILE)) if runs_dir.is_dir() else []
    if not candidates:
        raise DMMError(f"no checkpoint given and no {MODEL_FILE} under {str(runs_dir)!r}/",
                       "one written by 'python cli.py train'", "train first or pass --checkpoint PATH")
    return max(candidates, key=lambda path: path.stat().st_mtime)


def describe_chosen_checkpoint(path: Path, runs_dir: str | Path = DEFAULT_RUNS_DIR) -> str:
    """The line an export without --checkpoint prints first: which model.pt it took (path, step, dataset),
    so that a run trained later, or elsewhere under runs/, is never exported unnoticed."""
    try:
        record = json.loads(path.with_suffix(".json").read_text())
        details = f" (step {int(record['step'])}, dataset {record['dataset']['id']})"
    except (OSError, ValueError, KeyError, TypeError):
        details = ""  # no readable model.json beside it: loading the checkpoint will say what is wrong
    return (f"exporting {path}{details}: the newest model.pt under {str(runs_dir)!r}/; "
            "pass --checkpoint to choose another")


def onnx_path_for(out: str | Path) -> Path:
    """NAME or NAME.onnx -> NAME.onnx (a dotted NAME like 'hopper.v2' keeps its dot)."""
    out = Path(out)
    return out if out.suffix == ".onnx" else out.with_name(out.name + ".onnx")


def default_export_name(preset: str, *, mode: str = "window", precision: str = "fp32") -> str:
    """The NAME an export writes when --out is not given: one per mode and precision, so that exports of
    one checkpoint in several precisions sit side by side (hopper, hopper-fp16, hopper-int8,
    hopper-stream, hopper-stream-int8, ...); ``cli.py build`` names the plan after its ONNX.
    """
    return preset + ("-stream" if mode == "stream" else "") + ("" if precision == "fp32" else f"-{precision}")


def build_graph(model, *, mode: str, batch: int = 1, opset: int = DEFAULT_OPSET, precision: str = "fp32"):
    """The fp32 ONNX model (onnx.ModelProto) of ``mode`` for ``model`` (in eval mode), as the pass
    for ``precision`` wants it: the int8 stream graph keeps the scan's x out of x_proj's output."""
    from export.lowering import build_stream_graph, build_window_graph

    if mode == "stream":
        return build_stream_graph(model, batch=batch, opset=opset, x_through_x_proj=precision != "int8")
    return build_window_graph(model, batch=batch, opset=opset)


def optimized_node_count(model_bytes: bytes) -> int:
    """Nodes of the graph after ONNX Runtime's CPU optimisations (what a session actually runs)."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="dmm-ort-opt-") as scratch:
        path = Path(scratch) / "optimized.onnx"
        cpu_session(model_bytes, optimized_model_path=path)
        return len(onnx.load(str(path)).graph.node)


def check_graph(proto) -> None:
    """onnx.checker (full check: strict shape inference) and the TensorRT op table; DMMError on failure."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise DMMError(f"the exported graph fails onnx.checker ({first_line})", "a graph onnx.checker accepts",
                       "report this bug in export/lowering.py with the checkpoint") from None
    problems = check_graph_ops((node.domain, node.op_type) for node in proto.graph.node)
    if problems:
        raise DMMError(f"the exported graph has ops TensorRT cannot parse ({', '.join(problems)})",
                       "ops TensorRT's ONNX parser supports", "report this bug in export/lowering.py")


def export_checkpoint(
    checkpoint_path: str | Path | None = None,
    *,
    mode: str = "window",
    out: str | Path | None = None,
    batch: int = 1,
    opset: int = DEFAULT_OPSET,
    runs_dir: str | Path = DEFAULT_RUNS_DIR,
    precision: str = "fp32",
    precision_options=None,
    limits=None,
) -> tuple[Path, Path]:
    """Export a checkpoint to ``out``.onnx + ``out``.json; returns (onnx_path, manifest_path).

    checkpoint_path: a model.pt or its run directory (None: the newest model.pt under
    ``runs_dir``). mode: "window" (the official sliding-window evaluation, default) or
    "stream" (one env step with explicit caches). out: NAME or NAME.onnx (default:
    `default_export_name`, e.g. "hopper" / "hopper-fp16", in the current directory). batch: the static
    batch dimension (1 for a control loop). opset: 17 (LayerNormalization) or newer.
    precision: "fp32", "fp16" (mixed-precision casts) or "int8" (Q/DQ); a low precision is
    lowered from the checked fp32 graph by `export.precision.lower_precision` with
    ``precision_options`` (`export.precision.PrecisionOptions`), and its accuracy report
    goes into the manifest; a score drop beyond the limit writes nothing.
    """
    from export.lowering import MAX_OPSET, MIN_OPSET

    if precision not in PRECISIONS:
        raise DMMError(f"precision {precision!r}", f"one of {', '.join(PRECISIONS)}",
                       "pass --fp16 or --int8, or neither for fp32")
    if mode not in MODES:
        raise DMMError(f"--mode {mode!r}", f"one of {', '.join(MODES)} (window: the official sliding-window "
                       "evaluation, stream: one step with explicit caches)", f"pass --mode {MODES[0]}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise DMMError(f"--batch {batch!r}", "a positive integer (1 for a control loop)", "pass --batch 1 or more")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise DMMError(f"--opset {opset!r}", f"an integer in {MIN_OPSET}..{MAX_OPSET} (17 is the first with "
                       "LayerNormalization, TensorRT 10 parses up to 24)",
                       f"leave --opset out (default {DEFAULT_OPSET})")
    source = Path(checkpoint_path) if checkpoint_path is not None else find_latest_checkpoint(runs_dir)
    checkpoint = load_checkpoint(source)
    if checkpoint.model_config.model != "dmm":  # export.lowering lowers DMM's own graph only
        raise DMMError(f"checkpoint {str(checkpoint.path)!r}: a {checkpoint.model_config.model!r} baseline",
                       "a 'dmm' checkpoint (cli.py train --model dmm)", "evaluate baselines with 'cli.py eval'")
    onnx_path = onnx_path_for(out if out is not None else default_export_name(checkpoint.preset, mode=mode,
                                                                             precision=precision))
    check_export_name(onnx_path, ".onnx")  # the checkpoint's preset names the default: a file's word
    # Held from before the graph is built: a second export to this NAME is refused at once.
    actuator_limits = None
    if limits is not None and limits.given():  # checked before any work: the graph does not depend on them
        actuator_limits = limits.resolve(build_manifest(checkpoint, mode=mode, batch=batch), base=None).to_dict()
    with export_lock(onnx_path):
        return _export_locked(checkpoint, onnx_path, mode=mode, batch=batch, opset=opset, precision=precision,
                              precision_options=precision_options, actuator_limits=actuator_limits)


def _export_locked(checkpoint, onnx_path: Path, *, mode: str, batch: int, opset: int, precision: str,
                   precision_options, actuator_limits: dict | None = None) -> tuple[Path, Path]:
    model = checkpoint.model.eval()
    model.set_scan_impl("loop")  # the reference the parity figures are measured against

    proto = build_graph(model, mode=mode, batch=batch, opset=opset, precision=precision)
    check_graph(proto)
    linears = list(linear_nodes(proto))  # named in the fp32 graph; the precision passes keep the names
    model_bytes = proto.SerializeToString()
    parity = _measure_parity(model, model_bytes, checkpoint, mode=mode, batch=batch)

    fp32_proto = proto
    accuracy, precision_pass = {}, {}
    if precision != "fp32":
        from export.precision import PrecisionOptions, lower_precision

        proto, accuracy, precision_pass = lower_precision(
            proto, checkpoint, build_manifest(checkpoint, mode=mode, batch=batch, opset=opset),
            precision=precision, options=precision_options or PrecisionOptions())
        check_graph(proto)
        model_bytes = proto.SerializeToString()
        parity = {**parity, "graph": "the fp32 graph this one was lowered from (see accuracy)"}
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))

    manifest = build_manifest(
        checkpoint, mode=mode, precision=precision, batch=batch,
        onnx_sha256=hashlib.sha256(model_bytes).hexdigest(), opset=opset, parity=parity, accuracy=accuracy,
    )
    manifest = dataclasses.replace(manifest, exporter={
        **manifest.exporter, "lowering": "export.lowering", "graph_nodes": len(proto.graph.node),
        "graph_nodes_ort_optimized": optimized_node_count(model_bytes),
        **({"precision_pass": precision_pass} if precision_pass else {}),
        "precision_pins": precision_pins(proto, linears),
    }, actuator_limits=actuator_limits)
    manifest_path = manifest_path_for(onnx_path)
    files = {onnx_path: model_bytes}
    if batch == 1:  # the control-loop graph; real inputs come from one plant / episode at a time
        manifest, loader_files = _with_data_loader(fp32_proto, manifest, checkpoint, onnx_path, precision_options)
        files.update(loader_files)
    files[manifest_path] = manifest_bytes(manifest)
    atomic_write_set(files, set_name=onnx_path.name[:-len(".onnx")])
    return onnx_path, manifest_path


def _with_data_loader(fp32_proto, manifest, checkpoint, onnx_path: Path, precision_options):
    """The manifest with its ``exporter.polygraphy`` record, and the data loader's files (path -> bytes) to
    write beside the ONNX (`export.polygraphy_check`)."""
    dataset = getattr(precision_options, "dataset", None)
    feeds, source = real_feeds(fp32_proto, manifest, checkpoint, dataset=dataset)
    record, files = data_loader_files(onnx_path, manifest, feeds, source)
    return dataclasses.replace(manifest, exporter={**manifest.exporter, "polygraphy": record}), files


def _measure_parity(model, model_bytes: bytes, checkpoint, *, mode: str, batch: int) -> dict:
    session = cpu_session(model_bytes)
    parity = measure_parity(model, session, mode=mode, batch=batch,
                            rtg_start=float(checkpoint.target_returns[0]), rtg_scale=checkpoint.rtg_scale)
    if not np.isfinite(parity["max_abs"]) or parity["max_abs"] > PARITY_REFUSE_ABOVE:
        raise DMMError(f"parity: ONNX Runtime differs from PyTorch by {parity['max_abs']:.3g} on real-looking "
                       "inputs (nothing was written)", f"at most {PARITY_REFUSE_ABOVE:g}",
                       "report this bug in export/lowering.py (or check the checkpoint for non-finite weights)")
    return parity


def export_summary(onnx_path: Path, manifest_path: Path) -> str:
    """One line for the CLI: what was written, and how it checked out."""
    manifest = read_manifest(manifest_path)
    lowered = manifest.precision != "fp32"
    return (f"wrote {onnx_path} ({manifest.precision + ', ' if lowered else ''}{manifest.mode}, batch "
            f"{manifest.batch}, opset {manifest.opset}, {manifest.exporter.get('graph_nodes')} nodes, "
            f"{'its fp32 graph: ' if lowered else ''}ORT vs PyTorch max |diff| "
            f"{manifest.parity['max_abs']:.1e}) and {manifest_path}")


__all__ = ["DEFAULT_OPSET", "build_graph", "check_graph", "default_export_name", "export_checkpoint",
           "export_summary", "find_latest_checkpoint", "onnx_path_for", "optimized_node_count"]
