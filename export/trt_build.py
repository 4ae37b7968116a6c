"""Build a TensorRT plan from an exported ONNX graph, on the GPU it will run on (``cli.py build``).

    plan_path, manifest_path = build_engine(BuildConfig(onnx="hopper.onnx"))

A plan is tied to the TensorRT version and the GPU it was built with, so it is built on the target (a
Jetson builds its own), and its manifest NAME.plan.json (the ONNX manifest plus an ``engine`` record:
TensorRT version, GPU, the plan's sha256, its I/O, how it was built) lets `runtime.trt_backend` refuse
any other machine. `adopt_plan` (``cli.py adopt``) gives a plan built elsewhere on this GPU (trtexec)
the same manifest. tensorrt is imported only inside the functions and nothing here needs torch, onnx
or onnxruntime: a Jetson builds its plans with numpy, TensorRT and pycuda / cuda-python only
(docs/jetson.md). How the network is built, typed and checked: docs/deployment.md#building-an-engine.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from contract.errors import DMMError
from contract.files import atomic_write_bytes, atomic_write_set, sha256_bytes, sha256_file
from contract.manifest import Manifest, export_lock, manifest_bytes, manifest_path_for, read_manifest, write_manifest
from runtime.cuda_support import device_current
from runtime.tensorrt_support import (
    PLAN_KIND,
    PRECISION_CHECKS,
    capturing_logger,
    check_io,
    check_layer_precisions,
    create_runtime,
    engine_io,
    gpu_identity,
    import_tensorrt,
    layer_summary,
    logged_errors,
    tensorrt_major,
)

if TYPE_CHECKING:  # the static check of the GPU layer (scripts/typecheck_gpu.sh) reads TensorRT's stubs
    import tensorrt

TYPINGS = ("auto", "strong", "weak")
DEFAULT_WORKSPACE_MB = 256


def _check_device_options(device, precision_check) -> None:
    """The --device and --precision-check rules that build and adopt share."""
    if isinstance(device, bool) or not isinstance(device, int) or device < 0:
        raise DMMError(f"--device {device!r}", "a CUDA device index (0, 1, ...)", "pass --device 0 or leave it out")
    if precision_check not in PRECISION_CHECKS:
        raise DMMError(f"--precision-check {precision_check!r}", f"one of {', '.join(PRECISION_CHECKS)}",
                       f"pass --precision-check {PRECISION_CHECKS[0]} or another of those")


@dataclass(frozen=True)
class BuildConfig:
    """What ``cli.py build`` asks for."""

    onnx: Path = field(metadata={"help": "NAME.onnx with its manifest NAME.json beside it"})
    out: Path | None = field(default=None, metadata={"help": "NAME.plan to write (default: beside the ONNX)"})
    workspace_mb: int = field(default=DEFAULT_WORKSPACE_MB, metadata={"help": "builder workspace limit in MiB"})
    timing_cache: Path | None = field(default=None, metadata={
        "help": "timing cache to reuse and update (default: beside the plan, one per TensorRT version and GPU)"})
    typing: str = field(default="auto", metadata={
        "help": "strong: precision from the graph; weak: the FP16/INT8 builder flags (TensorRT 10.x only); "
                "auto: strong, weak only where 10.x needs it"})
    tf32: bool = field(default=False, metadata={"help": "allow TF32 in the fp32 layers (off: true fp32, for parity)"})
    device: int = field(default=0, metadata={"help": "CUDA device to build on (made current for the build)"})
    precision_check: str = field(default="fail", metadata={
        "help": "fail: refuse a plan in which a layer the graph keeps in fp32 runs in fp16/int8; warn: record it "
                "in the manifest and keep the plan"})

    def validate(self) -> None:
        if Path(self.onnx).suffix != ".onnx":
            raise DMMError(f"build {str(self.onnx)!r}", "a NAME.onnx written by 'cli.py export'",
                           "pass the .onnx file the export wrote")
        if self.out is not None and Path(self.out).suffix != ".plan":
            raise DMMError(f"--out {str(self.out)!r}", "a NAME.plan path", "pass --out NAME.plan")
        if isinstance(self.workspace_mb, bool) or not isinstance(self.workspace_mb, int) or self.workspace_mb < 1:
            raise DMMError(f"--workspace-mb {self.workspace_mb!r}", "a positive number of MiB",
                           "pass --workspace-mb 1 or more")
        if self.typing not in TYPINGS:
            raise DMMError(f"--typing {self.typing!r}", f"one of {', '.join(TYPINGS)}", "pass --typing auto")
        _check_device_options(self.device, self.precision_check)

    @property
    def plan_path(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.onnx).with_suffix(".plan")


def tensorrt_status(device: int = 0) -> tuple[bool, str]:
    """(True, what) where TensorRT and a CUDA GPU are usable here, else (False, why not), without building."""
    try:
        trt = import_tensorrt("building an engine")
        gpu = gpu_identity(device)
    except DMMError as error:
        return False, str(error)
    return True, f"TensorRT {trt.__version__} on {gpu.label()}"


def default_timing_cache(plan_path: Path, tensorrt_version: str, compute_capability: str) -> Path:
    safe = re.sub(r"[^0-9A-Za-z.]+", "_", f"tensorrt-{tensorrt_version}-sm{compute_capability}")
    return plan_path.with_name(f"{safe}.timing-cache")


def _source_manifest(onnx_path: Path, command: str = "build") -> Manifest:
    if not onnx_path.is_file():
        raise DMMError(f"{command}: {str(onnx_path)!r} does not exist", "a NAME.onnx written by 'cli.py export'",
                       "export first or fix the path")
    manifest = read_manifest(manifest_path_for(onnx_path))
    if manifest.engine:
        raise DMMError(f"{command}: {str(manifest_path_for(onnx_path))!r} is a plan's manifest",
                       "the manifest of an exported ONNX graph", "pass the .onnx file the export wrote")
    digest = sha256_file(onnx_path)
    if manifest.onnx_sha256 and manifest.onnx_sha256 != digest:
        raise DMMError(f"{command}: {str(onnx_path)!r} sha256 {digest[:12]}... (the graph was changed after export "
                       "or the manifest belongs to another export)", f"the manifest's {manifest.onnx_sha256[:12]}...",
                       "re-export")
    return manifest


def _low_precision_linears(manifest: Manifest) -> list[str]:
    return list(manifest.exporter.get("precision_pass", {}).get("low_precision_linears", []))


def _fp32_linears(manifest: Manifest) -> list[str]:
    """The Linears an int8 graph keeps in float (``--int8-layers``: "fp32" in ``precision_pass.int8_layers``)."""
    layers = manifest.exporter.get("precision_pass", {}).get("int8_layers", {})
    return sorted(name for name, precision in layers.items() if precision == "fp32")


def _with_fp32_linears_pinned(manifest: Manifest) -> Manifest:
    """The manifest whose fp32 pins also name the Linears the int8 graph keeps in float, for checking a plan's
    layer precisions: such a Linear running in int8 is then caught like any other fp32 node in reduced precision.
    A manifest without pins (an older export) is left as it is (its pins stay unknown, and say so)."""
    kept = _fp32_linears(manifest)
    pins = manifest.exporter.get("precision_pins", {})
    if not kept or not pins.get("fp32"):
        return manifest
    pins = {**pins, "fp32": [*pins["fp32"], *(name for name in kept if name not in pins["fp32"])]}
    return dataclasses.replace(manifest, exporter={**manifest.exporter, "precision_pins": pins})


def _network_flags(strong: bool) -> int:
    import tensorrt as trt

    if strong and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0  # explicit batch is the only mode since 10.0; on 11.x every network is strongly typed


def _parse(builder: tensorrt.Builder, logger: tensorrt.ILogger, onnx_path: Path, strong: bool):
    import tensorrt as trt

    network = builder.create_network(_network_flags(strong))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        problems = []
        for index in range(parser.num_errors):
            error = parser.get_error(index)
            where = ""
            if hasattr(error, "node_name") and error.node_name():
                where = f" at node {error.node_name()!r}"
                if hasattr(error, "node_operator") and error.node_operator():
                    where += f" ({error.node_operator()})"
            problems.append(f"{error.desc()}{where}")
        raise _BuildFailure(f"the TensorRT ONNX parser rejected {str(onnx_path)!r}: "
                            + (", ".join(problems[:3]) or "no error reported")
                            + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
    return network, parser


class _BuildFailure(Exception):
    """A strongly typed attempt failed (what the 10.x fallback reacts to); becomes a DMMError otherwise."""


def _pin_precisions(network: tensorrt.INetworkDefinition, linears: list[str]) -> None:
    """Weak typing, fp16 (with OBEY_PRECISION_CONSTRAINTS): the Linear MatMuls of the fp16 graph compute
    in fp16, every other float layer computes and outputs float32, as the graph's casts say.

    The ONNX parser names a node's layer after the node (helper layers get suffixes).
    """
    import tensorrt as trt

    untouched = {getattr(trt.LayerType, name) for name in ("CAST", "CONSTANT", "SHAPE", "IDENTITY")
                 if hasattr(trt.LayerType, name)}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type in untouched:
            continue
        float_outputs = [i for i in range(layer.num_outputs)
                         if layer.get_output(i).dtype in (trt.float32, trt.float16)]
        if not float_outputs:
            continue
        linear = layer.type == trt.LayerType.MATRIX_MULTIPLY and any(
            layer.name == name or layer.name.startswith(name + "_") for name in linears)
        dtype = trt.float16 if linear else trt.float32
        layer.precision = dtype
        for i in float_outputs:
            layer.set_output_type(i, dtype)


def _pin_fp32_linears(network: tensorrt.INetworkDefinition, linears: list[str]) -> None:
    """Weak typing, int8 (with OBEY_PRECISION_CONSTRAINTS): the Linear MatMuls the graph keeps in float
    (``--int8-layers``) compute and output float32, so that the INT8 flag cannot pick int8 kernels for them;
    the Q/DQ'd Linears and everything else are left to the graph as before."""
    import tensorrt as trt

    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type != trt.LayerType.MATRIX_MULTIPLY or not any(
                layer.name == name or layer.name.startswith(name + "_") for name in linears):
            continue
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            if layer.get_output(i).dtype in (trt.float32, trt.float16):
                layer.set_output_type(i, trt.float32)


TIMING_CACHE_STATUS = {
    "new": "no cache file yet: a new cache",
    "reused": "reused",
    "unreadable": "rejected: TensorRT could not read the file (corrupt or not a timing cache); started empty",
    "mismatch": "rejected: built by another TensorRT version or on another device; started empty",
}


def _timing_cache(builder_config: tensorrt.IBuilderConfig, cache_bytes: bytes) -> str:
    """Attach a timing cache to the config; returns its `TIMING_CACHE_STATUS` key.

    ``create_timing_cache`` returns None for bytes it cannot read; ``set_timing_cache`` returns
    False for a cache of another TensorRT version or device (ignore_mismatch=False). Either way
    the build starts from an empty cache, which is written back after it.
    """
    if not cache_bytes:
        builder_config.set_timing_cache(builder_config.create_timing_cache(b""), ignore_mismatch=False)
        return "new"
    try:
        cache = builder_config.create_timing_cache(cache_bytes)
    except (RuntimeError, TypeError, ValueError):  # some releases raise for bytes they cannot read
        cache = None
    status = "unreadable" if cache is None else (
        "reused" if builder_config.set_timing_cache(cache, ignore_mismatch=False) else "mismatch")
    if status != "reused":
        builder_config.set_timing_cache(builder_config.create_timing_cache(b""), ignore_mismatch=False)
    return status


def _configure(builder: tensorrt.Builder, config: BuildConfig, manifest: Manifest, *, strong: bool,
               cache_bytes: bytes) -> tuple[tensorrt.IBuilderConfig, list[str], str]:
    import tensorrt as trt

    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
    # The engine inspector reports each layer's I/O types only with detailed verbosity (it also names
    # the layers in profiles and NVTX ranges; it does not change what is built).
    builder_config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    flags = []
    if not config.tf32:
        builder_config.clear_flag(trt.BuilderFlag.TF32)
    else:
        flags.append("TF32")
    if not strong:  # TensorRT 10.x weak typing only (the flags are gone in 11.x)
        if manifest.precision == "fp16":
            builder_config.set_flag(trt.BuilderFlag.FP16)
            builder_config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            flags += ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
        elif manifest.precision == "int8":
            builder_config.set_flag(trt.BuilderFlag.INT8)  # needed for Q/DQ in a weakly typed network
            flags.append("INT8")
            if _fp32_linears(manifest):  # the Linears --int8-layers kept in float stay float32
                builder_config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
                flags.append("OBEY_PRECISION_CONSTRAINTS")
    return builder_config, flags, _timing_cache(builder_config, cache_bytes)


def inspect_layers(engine: tensorrt.ICudaEngine, manifest: Manifest) -> dict:
    """The per-layer summary of a deserialised engine (`runtime.tensorrt_support.layer_summary`)."""
    import tensorrt as trt

    inspector = engine.create_engine_inspector()
    information = inspector.get_engine_information(trt.LayerInformationFormat.JSON) if inspector else ""
    return layer_summary(information or "", _with_fp32_linears_pinned(manifest))


def build_engine(config: BuildConfig) -> tuple[Path, Path]:
    """Build ``config.onnx`` into a plan on GPU ``config.device``; returns (plan_path, manifest_path)."""
    config.validate()
    onnx_path = Path(config.onnx)
    manifest = _source_manifest(onnx_path)
    import_tensorrt(f"building {str(onnx_path)!r} into a TensorRT plan")
    gpu = gpu_identity(config.device)
    # TensorRT builds on the current device; a second build or export of this NAME at once is refused.
    with device_current(config.device), export_lock(config.plan_path):
        return _build_on_current_device(config, onnx_path, manifest, gpu)


def _build_on_current_device(config: BuildConfig, onnx_path: Path, manifest: Manifest, gpu) -> tuple[Path, Path]:
    import tensorrt as trt

    version = str(trt.__version__)
    major = tensorrt_major(trt)
    if config.typing == "weak" and (major >= 11 or not hasattr(trt.BuilderFlag, "FP16")):
        raise DMMError(f"--typing weak with TensorRT {version}",
                       "TensorRT 10.x (weak typing, the FP16/INT8 builder flags, exists there only)",
                       "use --typing strong (or auto)")
    plan_path = config.plan_path
    cache_path = Path(config.timing_cache) if config.timing_cache else default_timing_cache(
        plan_path, version, gpu.compute_capability)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""

    logger = capturing_logger()
    logger.messages.clear()
    try:
        builder = trt.Builder(logger)
    except TypeError:  # "pybind11::init(): factory function returned nullptr": CUDA init failed
        raise DMMError(f"TensorRT {version} could not start a builder on {gpu.label()} ({logged_errors(logger)})",
                       "a working CUDA driver for this GPU", "check the driver with 'python cli.py doctor'") from None

    strong_available = major >= 11 or hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if config.typing == "strong" and not strong_available:
        raise DMMError(f"--typing strong with TensorRT {version}, which has no strongly typed networks",
                       "10.x with STRONGLY_TYPED or 11.x", "use --typing weak (or auto)")
    if config.typing == "auto":
        attempts = (["strong"] if strong_available else []) + (["weak"] if major < 11 else [])
    else:
        attempts = [config.typing]
    fallback_reason, started = None, time.monotonic()
    plan = builder_config = None
    flags, cache_status, typing = [], "new", attempts[0]
    for typing in attempts:
        strong = typing == "strong"
        logger.messages.clear()
        try:
            network, _parser = _parse(builder, logger, onnx_path, strong)
            if not strong and manifest.precision == "fp16":
                _pin_precisions(network, _low_precision_linears(manifest))
            elif not strong and manifest.precision == "int8" and _fp32_linears(manifest):
                _pin_fp32_linears(network, _fp32_linears(manifest))
            builder_config, flags, cache_status = _configure(builder, config, manifest, strong=strong,
                                                             cache_bytes=cache_bytes)
            plan = builder.build_serialized_network(network, builder_config)
            if plan is None:
                raise _BuildFailure(f"TensorRT could not build {str(onnx_path)!r} ({logged_errors(logger)})")
            break
        except _BuildFailure as failure:
            if typing != attempts[-1]:
                fallback_reason = str(failure)
                continue
            prefix = f"strongly typed build failed ({fallback_reason}), and the weakly typed one too: " \
                if fallback_reason else ""
            raise DMMError(f"{prefix}{failure}", f"a graph written by 'cli.py export' for TensorRT {version}",
                           "report it with the ONNX") from None
    assert plan is not None and builder_config is not None  # the last attempt raised otherwise
    plan_bytes = bytes(plan)
    build_seconds = time.monotonic() - started
    warnings = [message for level, message in logger.messages if level == "warning"]

    # What the engine really has, checked against the manifest before anything is written.
    runtime = create_runtime(trt, logger, f"checking the plan built from {str(onnx_path)!r}")
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        raise DMMError(f"TensorRT built {str(onnx_path)!r} but cannot deserialise the plan ({logged_errors(logger)})",
                       "a plan this TensorRT reads back", "report it with the ONNX")
    source = f"plan built from {str(onnx_path)!r}"
    tensors = engine_io(engine)
    check_io(source, manifest, tensors)
    layers = inspect_layers(engine, manifest)
    precision_warnings = check_layer_precisions(source, layers, manifest, precision_check=config.precision_check,
                                                tf32=config.tf32)

    engine_record = plan_record(
        version, gpu, config, plan_bytes, tensors, onnx_path, manifest, layers, precision_warnings,
        built_by="cli.py build",
        network="strongly typed" if typing == "strong" else "weakly typed (TensorRT 10.x builder flags)",
        typing_fallback_reason=fallback_reason,
        builder_flags=flags,
        tf32=bool(config.tf32),
        workspace_bytes=config.workspace_mb << 20,
        timing_cache=str(cache_path),
        timing_cache_reused=cache_status == "reused",
        timing_cache_status=TIMING_CACHE_STATUS[cache_status],
        build_seconds=round(build_seconds, 2),
        builder_warnings=[message.strip().splitlines()[0] for message in warnings[:10]],
    )
    plan_manifest = dataclasses.replace(manifest, engine=engine_record)
    plan_manifest_path = manifest_path_for(plan_path)
    # The plan and its manifest are one set (after a kill, the old pair or the new one); the timing cache,
    # possibly elsewhere, is only a speed-up of the next build.
    atomic_write_set({plan_path: plan_bytes, plan_manifest_path: manifest_bytes(plan_manifest)},
                     set_name=plan_path.name)
    atomic_write_bytes(cache_path, bytes(builder_config.get_timing_cache().serialize()))
    return plan_path, plan_manifest_path


# -- plans built elsewhere (trtexec) ----------------------------------------------------------------


@dataclass(frozen=True)
class AdoptConfig:
    """What ``cli.py adopt`` asks for."""

    plan: Path = field(metadata={"help": "NAME.plan built on this GPU by another tool (trtexec --saveEngine)"})
    onnx: Path | None = field(default=None, metadata={
        "help": "the NAME.onnx it was built from, with its manifest NAME.json beside it (default: beside the plan)"})
    device: int = field(default=0, metadata={"help": "CUDA device the plan runs on"})
    precision_check: str = field(default="fail", metadata={
        "help": "fail: refuse a plan in which a layer the graph keeps in fp32 runs in fp16/int8; warn: record it"})
    force: bool = field(default=False, metadata={"help": "replace an existing NAME.plan.json"})

    def validate(self) -> None:
        if Path(self.plan).suffix != ".plan":
            raise DMMError(f"adopt {str(self.plan)!r}", "a NAME.plan (trtexec --saveEngine=NAME.plan)",
                           "pass the .plan file trtexec wrote")
        if self.onnx is not None and Path(self.onnx).suffix != ".onnx":
            raise DMMError(f"--onnx {str(self.onnx)!r}", "the NAME.onnx the plan was built from",
                           "pass --onnx NAME.onnx")
        _check_device_options(self.device, self.precision_check)

    @property
    def onnx_path(self) -> Path:
        return Path(self.onnx) if self.onnx is not None else Path(self.plan).with_suffix(".onnx")


def adopt_plan(config: AdoptConfig) -> tuple[Path, Path]:
    """Write NAME.plan.json for a plan built outside ``cli.py build``, on the GPU it will run on.

    Checks, before anything is written: the plan and the ONNX exist, the ONNX is the one its
    manifest describes (sha256), TensorRT here deserialises the plan (so it was built for this
    TensorRT and GPU), and its I/O (names, shapes, dtypes) are the manifest's. Records the TensorRT
    version, the GPU and the per-layer summary; the precision check is `build_engine`'s. That
    the plan was built from this ONNX cannot be proved from the plan: the I/O check and the
    per-layer precisions are what can be checked.
    """
    config.validate()
    plan_path, onnx_path = Path(config.plan), config.onnx_path
    if not plan_path.is_file():
        raise DMMError(f"adopt: {str(plan_path)!r} does not exist", "a plan built on this GPU",
                       f"build it, e.g. trtexec --onnx={onnx_path} --saveEngine={plan_path} --stronglyTyped")
    plan_manifest_path = manifest_path_for(plan_path)
    if plan_manifest_path.exists() and not config.force:
        raise DMMError(f"adopt: {str(plan_manifest_path)!r} already exists", "a plan without a manifest",
                       "pass --force to replace it")
    manifest = _source_manifest(onnx_path, "adopt")
    plan_bytes = plan_path.read_bytes()
    import_tensorrt(f"adopting {str(plan_path)!r}")
    import tensorrt as trt

    gpu = gpu_identity(config.device)
    version = str(trt.__version__)
    source = f"plan {str(plan_path)!r}"
    with device_current(config.device):
        logger = capturing_logger()
        logger.messages.clear()
        runtime = create_runtime(trt, logger, source)
        engine = runtime.deserialize_cuda_engine(plan_bytes)
        if engine is None:
            raise DMMError(f"{source}: TensorRT {version} cannot deserialise it on {gpu.label()} "
                           f"({logged_errors(logger)})", "a plan built here with this TensorRT",
                           f"rebuild it (python cli.py build {onnx_path}, or trtexec on this machine)")
        tensors = engine_io(engine)
        check_io(source, manifest, tensors)
        layers = inspect_layers(engine, manifest)
        precision_warnings = check_layer_precisions(source, layers, manifest, precision_check=config.precision_check)
        del engine, runtime
    engine_record = plan_record(
        version, gpu, config, plan_bytes, tensors, onnx_path, manifest, layers, precision_warnings,
        built_by="adopted (built outside cli.py build, e.g. by trtexec); I/O and layer precisions checked",
        network="unknown (built elsewhere)", typing_fallback_reason=None, tf32=None,
    )
    try:
        write_manifest(dataclasses.replace(manifest, engine=engine_record), plan_manifest_path)
    except OSError as error:
        raise DMMError(f"cannot write {str(plan_manifest_path)!r} ({error.strerror or error})",
                       "a writable directory beside the plan", "make that directory writable") from None
    return plan_path, plan_manifest_path


def plan_record(version: str, gpu, config, plan_bytes: bytes, tensors, onnx_path: Path, manifest, layers: dict,
                precision_warnings: list, **how_built) -> dict:
    """NAME.plan.json's engine record: what every plan records (TensorRT, GPU, hash, I/O, source, layer
    precisions), then ``how_built`` (what `build` knows of its own build; what `adopt` cannot know)."""
    return {
        "kind": PLAN_KIND,
        "tensorrt_version": version,
        "gpu_name": gpu.name,
        "compute_capability": gpu.compute_capability,
        "device": config.device,
        "plan_sha256": sha256_bytes(plan_bytes),
        "plan_bytes": len(plan_bytes),
        "io": tensors,
        "source_onnx": onnx_path.name,
        "source_onnx_sha256": manifest.onnx_sha256,
        **how_built,
        "layers": layers,
        "precision_check": config.precision_check,
        "precision_warnings": precision_warnings,
    }


def layers_line(engine: dict) -> str:
    """'212 layers: 150 fp32, 62 fp16; fp32 pins: 140 checked, 12 unverifiable'."""
    layers = engine.get("layers") or {}
    if not layers.get("layers"):
        return "no per-layer information"
    counts = ", ".join(f"{count} {name}" for name, count in sorted(layers["by_precision"].items()))
    return (f"{layers['layers']} layers: {counts}; fp32 pins: {layers['pinned_fp32_checked']} checked, "
            f"{layers['pinned_fp32_unverifiable']} unverifiable, "
            f"{len(layers['pinned_fp32_in_reduced_precision'])} in reduced precision")


def build_summary(plan_path: Path, manifest_path: Path) -> str:
    """What the CLI prints: one line, then one per precision warning."""
    engine = read_manifest(manifest_path).engine
    fallback = f"; fallback because {engine['typing_fallback_reason']}" if engine.get("typing_fallback_reason") \
        else ""
    if engine.get("built_by", "cli.py build") != "cli.py build":
        line = (f"wrote {manifest_path} for {plan_path} (adopted: TensorRT {engine['tensorrt_version']}, "
                f"{engine['gpu_name']} sm {engine['compute_capability']}, {engine['plan_bytes']} bytes; "
                f"{layers_line(engine)})")
    else:
        line = (f"wrote {plan_path} (TensorRT {engine['tensorrt_version']}, {engine['gpu_name']} sm "
                f"{engine['compute_capability']}, {engine['network']}{fallback}, TF32 "
                f"{'on' if engine['tf32'] else 'off'}, {engine['plan_bytes']} bytes, {engine['build_seconds']} s, "
                f"timing cache {engine.get('timing_cache_status', 'new')}; {layers_line(engine)}) and {manifest_path}")
    return "\n".join([line, *(f"warning: {w}" for w in engine.get("precision_warnings", []))])


def engine_after_export(onnx_path: Path, *, build: bool = True) -> str:
    """What ``cli.py export`` does about the engine: build it where TensorRT and a GPU are present,
    else one line saying how to build it on the target.
    """
    command = f"python cli.py build {onnx_path}"
    if not build:
        return f"no engine built (--no-engine); build it on the target GPU with '{command}'"
    usable, why = tensorrt_status()
    if not usable:
        reason = why.split(";")[0]
        return (f"no engine built here ({reason}); build it on the target GPU with '{command}' (a plan is tied "
                "to the GPU and the TensorRT version it is built with)")
    try:
        return build_summary(*build_engine(BuildConfig(onnx=Path(onnx_path))))
    except DMMError as error:
        raise error.within(f"wrote {onnx_path}, but building its engine failed") from None
