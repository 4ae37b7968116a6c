"""Build a TensorRT plan from an exported ONNX graph, on the GPU it will run on (``cli.py build``).

    plan_path, manifest_path = build_engine(BuildConfig(onnx="hopper.onnx"))

A plan is tied to the TensorRT version and the GPU it was built with, so it is built on
the target (a Jetson builds its own) and its manifest NAME.plan.json (the ONNX manifest
plus an ``engine`` record: TensorRT version, GPU name and compute capability, the plan's
sha256, its I/O, how it was built) lets `runtime.trt_backend` refuse any other machine.

How the network is built (docs/deployment.md#building-an-engine):
- precision comes from the graph (`export.precision`: fp16 casts, int8 Q/DQ). The network
  is strongly typed where TensorRT has the flag (10.x with STRONGLY_TYPED; 11.x, where
  every network is strongly typed and the flag is accepted or absent): tensor types follow
  the ONNX graph and no precision flag is set;
- only on TensorRT 10.x, when the strongly typed parse or build fails (``typing="auto"``)
  or when asked (``typing="weak"``), a weakly typed network with the FP16 / INT8 builder
  flags (both removed in 11.x); for fp16 the Linear MatMuls are then pinned to fp16 and
  every other layer to float32 with OBEY_PRECISION_CONSTRAINTS, so the recurrence, exp,
  softplus and LayerNorm stay fp32 as in the graph. The manifest records which typing was used and why;
- TF32 is cleared (it is on by default) unless ``tf32``: fp32 parity with ONNX Runtime
  needs true fp32 GEMMs (TF32 keeps 10 mantissa bits), and the recurrence's fp32 parts
  must stay fp32 in the fp16 and int8 graphs too;
- a workspace memory-pool limit; a timing cache read before and written after every build
  (one file per TensorRT version and compute capability beside the plan by default, since
  a cache only applies to the exact version and device);
- every parser error (with its node and op) and every builder error TensorRT logs ends up
  in the DMMError.

tensorrt is imported only inside the functions (importing this module is free), and nothing
here needs torch, onnx or onnxruntime: a Jetson builds its plans with numpy, TensorRT and
pycuda / cuda-python only (docs/jetson.md).
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from contract.errors import DMMError
from contract.files import atomic_write_bytes, sha256_bytes
from contract.manifest import Manifest, manifest_path_for, read_manifest, write_manifest

TYPINGS = ("auto", "strong", "weak")
DEFAULT_WORKSPACE_MB = 256


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
    device: int = field(default=0, metadata={"help": "CUDA device to build on"})

    def validate(self) -> None:
        if Path(self.onnx).suffix != ".onnx":
            raise DMMError(f"build | received {str(self.onnx)!r} | expected a NAME.onnx written by 'cli.py export'")
        if self.out is not None and Path(self.out).suffix != ".plan":
            raise DMMError(f"--out {str(self.out)!r}; expected a NAME.plan path")
        if isinstance(self.workspace_mb, bool) or not isinstance(self.workspace_mb, int) or self.workspace_mb < 1:
            raise DMMError(f"--workspace-mb {self.workspace_mb!r}; expected a positive number of MiB")
        if self.typing not in TYPINGS:
            raise DMMError(f"--typing {self.typing!r}; expected one of {', '.join(TYPINGS)}")
        if isinstance(self.device, bool) or not isinstance(self.device, int) or self.device < 0:
            raise DMMError(f"--device {self.device!r}; expected a CUDA device index (0, 1, ...)")

    @property
    def plan_path(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.onnx).with_suffix(".plan")


def tensorrt_status(device: int = 0) -> tuple[bool, str]:
    """(True, what) where TensorRT and a CUDA GPU are usable here, else (False, why not), without building."""
    from runtime.tensorrt_support import gpu_identity, import_tensorrt

    try:
        trt = import_tensorrt("building an engine")
        gpu = gpu_identity(device)
    except DMMError as error:
        return False, str(error)
    return True, f"TensorRT {trt.__version__} on {gpu.describe()}"


def default_timing_cache(plan_path: Path, tensorrt_version: str, compute_capability: str) -> Path:
    safe = re.sub(r"[^0-9A-Za-z.]+", "_", f"tensorrt-{tensorrt_version}-sm{compute_capability}")
    return plan_path.with_name(f"{safe}.timing-cache")


def _source_manifest(onnx_path: Path) -> Manifest:
    from contract.files import sha256_file

    if not onnx_path.is_file():
        raise DMMError(f"build | {str(onnx_path)!r} does not exist | expected a NAME.onnx written by "
                       "'cli.py export'; export first or fix the path")
    manifest = read_manifest(manifest_path_for(onnx_path))
    if manifest.engine:
        raise DMMError(f"build | {str(manifest_path_for(onnx_path))!r} is a plan's manifest | expected the "
                       "manifest of an exported ONNX graph")
    digest = sha256_file(onnx_path)
    if manifest.onnx_sha256 and manifest.onnx_sha256 != digest:
        raise DMMError(f"build | {str(onnx_path)!r} sha256 {digest[:12]}... | manifest {manifest.onnx_sha256[:12]}...; "
                       "the graph was changed after export or the manifest belongs to another export; re-export")
    return manifest


def _low_precision_linears(manifest: Manifest) -> list[str]:
    return list(manifest.exporter.get("precision_pass", {}).get("low_precision_linears", []))


def _network_flags(trt, strong: bool) -> int:
    if strong and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0  # explicit batch is the only mode since 10.0; on 11.x every network is strongly typed


def _parse(trt, builder, logger, onnx_path: Path, strong: bool):
    network = builder.create_network(_network_flags(trt, strong))
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
                            + ("; ".join(problems[:3]) or "no error reported")
                            + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
    return network, parser


class _BuildFailure(Exception):
    """A strongly typed attempt failed (what the 10.x fallback reacts to); becomes a DMMError otherwise."""


def _pin_precisions(trt, network, linears: list[str]) -> None:
    """Weak typing, fp16 (with OBEY_PRECISION_CONSTRAINTS): the Linear MatMuls of the fp16 graph compute
    in fp16, every other float layer computes and outputs float32, as the graph's casts say.

    The ONNX parser names a node's layer after the node (helper layers get suffixes).
    """
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


def _configure(trt, builder, config: BuildConfig, manifest: Manifest, *, strong: bool, cache_bytes: bytes):
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
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
    # A cache only applies to the exact TensorRT version and device (ignore_mismatch=False): one
    # TensorRT refuses starts the build from an empty cache instead.
    accepted = builder_config.set_timing_cache(builder_config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    if cache_bytes and not accepted:
        builder_config.set_timing_cache(builder_config.create_timing_cache(b""), ignore_mismatch=False)
    return builder_config, flags, bool(cache_bytes) and bool(accepted)


def build_engine(config: BuildConfig) -> tuple[Path, Path]:
    """Build ``config.onnx`` into a plan on this machine's GPU; returns (plan_path, manifest_path)."""
    from runtime.tensorrt_support import (
        PLAN_KIND,
        capturing_logger,
        check_io,
        engine_io,
        gpu_identity,
        import_tensorrt,
        logged_errors,
        tensorrt_major,
    )

    config.validate()
    onnx_path = Path(config.onnx)
    manifest = _source_manifest(onnx_path)
    trt = import_tensorrt(f"building {str(onnx_path)!r} into a TensorRT plan")
    gpu, version = gpu_identity(config.device), str(trt.__version__)
    major = tensorrt_major(trt)
    if config.typing == "weak" and (major >= 11 or not hasattr(trt.BuilderFlag, "FP16")):
        raise DMMError(f"--typing weak | TensorRT {version} | weak typing (the FP16/INT8 builder flags) exists on "
                       "TensorRT 10.x only; use --typing strong (or auto)")
    plan_path = config.plan_path
    cache_path = Path(config.timing_cache) if config.timing_cache else default_timing_cache(
        plan_path, version, gpu.compute_capability)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""

    logger = capturing_logger(trt)
    logger.messages.clear()
    try:
        builder = trt.Builder(logger)
    except TypeError:  # "pybind11::init(): factory function returned nullptr": CUDA init failed
        raise DMMError(f"TensorRT {version} could not start a builder on {gpu.describe()} "
                       f"({logged_errors(logger)}); expected a working CUDA driver for this GPU") from None

    strong_available = major >= 11 or hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if config.typing == "strong" and not strong_available:
        raise DMMError(f"--typing strong | TensorRT {version} has no strongly typed networks | expected 10.x with "
                       "STRONGLY_TYPED or 11.x; use --typing weak (or auto)")
    if config.typing == "auto":
        attempts = (["strong"] if strong_available else []) + (["weak"] if major < 11 else [])
    else:
        attempts = [config.typing]
    fallback_reason, started = None, time.monotonic()
    for typing in attempts:
        strong = typing == "strong"
        logger.messages.clear()
        try:
            network, _parser = _parse(trt, builder, logger, onnx_path, strong)
            if not strong and manifest.precision == "fp16":
                _pin_precisions(trt, network, _low_precision_linears(manifest))
            builder_config, flags, reused = _configure(trt, builder, config, manifest, strong=strong,
                                                       cache_bytes=cache_bytes)
            plan = builder.build_serialized_network(network, builder_config)
            if plan is None:
                raise _BuildFailure(f"TensorRT could not build {str(onnx_path)!r} ({logged_errors(logger)})")
            break
        except _BuildFailure as failure:
            if typing != attempts[-1]:
                fallback_reason = str(failure)
                continue
            prefix = f"strongly typed build failed ({fallback_reason}); the weakly typed one too: " \
                if fallback_reason else ""
            raise DMMError(f"{prefix}{failure}; expected a graph written by 'cli.py export' for TensorRT "
                           f"{version}; report it with the ONNX") from None
    plan_bytes = bytes(plan)
    build_seconds = time.monotonic() - started

    # What the engine really has, checked against the manifest before anything is written.
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        raise DMMError(f"TensorRT built {str(onnx_path)!r} but cannot deserialise the plan "
                       f"({logged_errors(logger)}); report it with the ONNX")
    tensors = engine_io(trt, engine)
    check_io(f"plan built from {str(onnx_path)!r}", manifest, tensors)
    warnings = [message for level, message in logger.messages if level == "warning"]

    engine_record = {
        "kind": PLAN_KIND,
        "tensorrt_version": version,
        "gpu_name": gpu.name,
        "compute_capability": gpu.compute_capability,
        "plan_sha256": sha256_bytes(plan_bytes),
        "plan_bytes": len(plan_bytes),
        "io": tensors,
        "source_onnx": onnx_path.name,
        "source_onnx_sha256": manifest.onnx_sha256,
        "network": "strongly typed" if typing == "strong" else "weakly typed (TensorRT 10.x builder flags)",
        "typing_fallback_reason": fallback_reason,
        "builder_flags": flags,
        "tf32": bool(config.tf32),
        "workspace_bytes": config.workspace_mb << 20,
        "timing_cache": str(cache_path),
        "timing_cache_reused": bool(reused),
        "build_seconds": round(build_seconds, 2),
        "builder_warnings": [message.strip().splitlines()[0] for message in warnings[:10]],
    }
    plan_manifest = dataclasses.replace(manifest, engine=engine_record)
    plan_manifest_path = manifest_path_for(plan_path)
    try:
        atomic_write_bytes(plan_path, plan_bytes)
        write_manifest(plan_manifest, plan_manifest_path)
        atomic_write_bytes(cache_path, bytes(builder_config.get_timing_cache().serialize()))
    except OSError as error:
        raise DMMError(f"cannot write {str(plan_path)!r} ({error.strerror or error}); expected a writable "
                       "location; pass --out with a writable NAME.plan") from None
    return plan_path, plan_manifest_path


def build_summary(plan_path: Path, manifest_path: Path) -> str:
    """One line for the CLI."""
    engine = read_manifest(manifest_path).engine
    fallback = f"; fallback because {engine['typing_fallback_reason']}" if engine.get("typing_fallback_reason") \
        else ""
    return (f"wrote {plan_path} (TensorRT {engine['tensorrt_version']}, {engine['gpu_name']} sm "
            f"{engine['compute_capability']}, {engine['network']}{fallback}, TF32 "
            f"{'on' if engine['tf32'] else 'off'}, {engine['plan_bytes']} bytes, {engine['build_seconds']} s, "
            f"timing cache {'reused' if engine['timing_cache_reused'] else 'new'}) and {manifest_path}")


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
        raise DMMError(f"wrote {onnx_path}, but building its engine failed: {error}") from None
