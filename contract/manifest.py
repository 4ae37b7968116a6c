"""The manifest: the JSON record beside every .onnx and .plan (docs/design.md#manifest).

It carries everything the runtime needs (mode, I/O tensors, normalisation, rtg scale,
default target, action bounds) so that no stage re-reads an earlier stage's flags,
and the identity of what it describes (sha256 of the source checkpoint and of the
graph, exporter versions, parity figures, and for a plan the TensorRT version and GPU).
numpy-free and torch-free: the robot reads it with the standard library. The graph I/O of each
mode: docs/design.md#graph-io; the optional fields (format version 1 reads manifests with or
without them): docs/design.md#manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from contract.deployment import PolicyFacts
from contract.errors import DMMError
from contract.files import atomic_write_bytes, complete_interrupted_sets, exclusive_lock, file_error

MANIFEST_FORMAT_VERSION = 1
MANIFEST_KIND = "dmm-manifest"
MODES = ("window", "stream")
PRECISIONS = ("fp32", "fp16", "int8")

# Fields a manifest may lack (older exports): they take their defaults.
OPTIONAL_FIELDS = ("exporter", "parity", "accuracy", "engine", "format_version", "observation_low",
                   "observation_high", "actuator_limits")
ACTUATOR_LIMIT_KEYS = ("lower", "upper", "max_change", "ramp_steps", "ramp_start")
# Which output feeds which input on the next stream step.
STREAM_CACHE_PAIRS = (("dsm_cache_next", "dsm_cache"), ("ssm_state_next", "ssm_state"))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict) -> TensorSpec:
        return cls(name=str(data["name"]), shape=tuple(int(d) for d in data["shape"]),
                   dtype=str(data["dtype"]))


def tensor_specs(mode: str, *, batch: int, context_len: int, state_dim: int, act_dim: int,
                 n_layer: int, dsm_window: int, d_model: int, d_state: int
                 ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The I/O tensors of a graph of ``mode`` (see the module docstring)."""
    if mode == "window":
        inputs = (
            TensorSpec("states", (batch, context_len, state_dim)),
            TensorSpec("actions", (batch, context_len, act_dim)),
            TensorSpec("rtg", (batch, context_len, 1)),
        )
        return inputs, (TensorSpec("action", (batch, act_dim)),)
    if mode == "stream":
        dsm_shape = (n_layer, batch, dsm_window - 1, d_model)
        ssm_shape = (n_layer, batch, d_model, d_state)
        inputs = (
            TensorSpec("prev_action", (batch, act_dim)),
            TensorSpec("prev_action_valid", (batch, 1)),
            TensorSpec("rtg", (batch, 1)),
            TensorSpec("state", (batch, state_dim)),
            TensorSpec("dsm_cache", dsm_shape),
            TensorSpec("ssm_state", ssm_shape),
        )
        outputs = (
            TensorSpec("action", (batch, act_dim)),
            TensorSpec("dsm_cache_next", dsm_shape),
            TensorSpec("ssm_state_next", ssm_shape),
        )
        return inputs, outputs
    raise DMMError(f"mode {mode!r}", f"one of {', '.join(MODES)}", "pass --mode with one of those")


@dataclass(frozen=True)
class Manifest:
    """Everything a runtime needs to drive one engine, and what the engine is."""

    mode: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch: int
    context_len: int
    state_dim: int
    act_dim: int
    n_layer: int
    d_model: int
    d_state: int
    dsm_window: int
    state_mean: tuple[float, ...]
    state_std: tuple[float, ...]
    rtg_scale: float
    target_return: float
    target_returns: tuple[float, ...]
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    env_id: str | None  # None: no simulator (a policy trained from a robot's logs)
    preset: str
    ref_min_score: float | None  # None: scores are raw returns
    ref_max_score: float | None
    checkpoint_sha256: str
    onnx_sha256: str
    opset: int
    exporter: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)  # for a .plan: TensorRT version, GPU name, compute capability
    format_version: int = MANIFEST_FORMAT_VERSION
    observation_low: tuple[float, ...] | None = None  # (S,) raw; None: no range recorded
    observation_high: tuple[float, ...] | None = None  # (S,)
    actuator_limits: dict | None = None  # see `check_actuator_limits`; None: the action bounds alone

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["inputs"] = [spec.to_dict() for spec in self.inputs]
        data["outputs"] = [spec.to_dict() for spec in self.outputs]
        data["kind"] = MANIFEST_KIND
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "manifest") -> Manifest:
        if data.get("kind") != MANIFEST_KIND:
            raise DMMError(f"{source}: not a dmm-deploy manifest (kind {data.get('kind')!r})",
                           "the .json written beside the engine by 'cli.py export'",
                           "re-export the engine, or keep its own manifest next to it")
        version = data.get("format_version")
        if version != MANIFEST_FORMAT_VERSION:
            raise DMMError(f"{source}: manifest format version {version}",
                           f"format version {MANIFEST_FORMAT_VERSION} (what this runtime reads)",
                           "re-export the engine with this dmm-deploy version")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(name for name in names if name not in data and name not in
                         OPTIONAL_FIELDS)
        if missing:
            raise DMMError(f"{source}: fields {', '.join(missing)} missing", "every manifest field",
                           "re-export the engine")
        values = {name: data[name] for name in names if name in data}
        values["inputs"] = tuple(TensorSpec.from_dict(d) for d in data["inputs"])
        values["outputs"] = tuple(TensorSpec.from_dict(d) for d in data["outputs"])
        for name in ("state_mean", "state_std", "target_returns", "action_low", "action_high"):
            values[name] = tuple(float(v) for v in data[name])
        for name in ("observation_low", "observation_high"):
            if values.get(name) is not None:
                values[name] = tuple(float(v) for v in values[name])
        manifest = cls(**values)
        manifest.validate(source)
        return manifest

    def validate(self, source: str = "manifest") -> None:
        if self.mode not in MODES:
            raise DMMError(f"{source}: mode {self.mode!r}", f"one of {', '.join(MODES)}", "re-export the engine")
        if self.precision not in PRECISIONS:
            raise DMMError(f"{source}: precision {self.precision!r}", f"one of {', '.join(PRECISIONS)}",
                           "re-export the engine")
        expected_inputs, expected_outputs = tensor_specs(
            self.mode, batch=self.batch, context_len=self.context_len, state_dim=self.state_dim,
            act_dim=self.act_dim, n_layer=self.n_layer, dsm_window=self.dsm_window,
            d_model=self.d_model, d_state=self.d_state,
        )
        if self.inputs != expected_inputs or self.outputs != expected_outputs:
            raise DMMError(f"{source}: I/O tensors that disagree with its own {self.mode} mode and dims (damaged)",
                           f"the I/O tensors of {self.mode} mode with those dims", "re-export the engine")
        if len(self.state_mean) != self.state_dim or len(self.state_std) != self.state_dim:
            raise DMMError(f"{source}: state_mean/std with {len(self.state_mean)}/{len(self.state_std)} entries",
                           f"state_dim={self.state_dim} each", "re-export the engine")
        self._validate_observation_range(source)
        if self.actuator_limits is not None:
            check_actuator_limits(self.actuator_limits, self.action_low, self.action_high, f"{source}: actuator_limits")

    def _validate_observation_range(self, source: str) -> None:
        low, high = self.observation_low, self.observation_high
        if low is None and high is None:
            return
        if low is None or high is None or len(low) != self.state_dim or len(high) != self.state_dim:
            lengths = [None if bound is None else len(bound) for bound in (low, high)]
            raise DMMError(f"{source}: observation_low/high with {lengths[0]}/{lengths[1]} entries",
                           f"both null or both state_dim={self.state_dim}", "re-export the engine")
        if not all(math.isfinite(a) and math.isfinite(b) and a <= b for a, b in zip(low, high, strict=True)):
            raise DMMError(f"{source}: observation_low/high with a bound that is not finite or low > high",
                           "finite low <= high per dimension", "re-export the engine")

    @property
    def facts(self) -> PolicyFacts:
        """The policy's deployment facts (`contract.deployment`), as the checkpoint recorded them."""
        return PolicyFacts(
            preset=self.preset, env_id=self.env_id, state_dim=self.state_dim, act_dim=self.act_dim,
            context_len=self.context_len, state_mean=self.state_mean, state_std=self.state_std,
            rtg_scale=self.rtg_scale, target_returns=self.target_returns, ref_min_score=self.ref_min_score,
            ref_max_score=self.ref_max_score)

    def input(self, name: str) -> TensorSpec:
        return next(spec for spec in self.inputs if spec.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(spec for spec in self.outputs if spec.name == name)


def check_actuator_limits(limits, action_low, action_high, source: str = "actuator limits") -> None:
    """Refuse actuator limits that are not of `ACTUATOR_LIMIT_KEYS` shape, or lie outside the action bounds."""
    act_dim = len(action_low)

    def vector(key: str, optional: bool) -> list[float] | None:
        value = limits.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, (list, tuple)) or len(value) != act_dim or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            raise DMMError(f"{source}: {key} {value!r}", f"{act_dim} finite numbers (one per action dimension)"
                           + ("" if not optional else " or null"), f"give {key} one finite number per action dimension")
        return [float(v) for v in value]

    if not isinstance(limits, dict) or sorted(limits) != sorted(ACTUATOR_LIMIT_KEYS):
        keys = sorted(limits) if isinstance(limits, dict) else type(limits).__name__
        raise DMMError(f"{source}: keys {keys}", f"exactly {', '.join(ACTUATOR_LIMIT_KEYS)}",
                       "give the actuator limits exactly those keys")
    lower, upper = vector("lower", False), vector("upper", False)
    if not all(a <= lo <= hi <= b for a, lo, hi, b in zip(action_low, lower, upper, action_high, strict=True)):
        raise DMMError(f"{source}: lower/upper {lower} / {upper}",
                       f"action_low <= lower <= upper <= action_high per dimension ({list(action_low)} / "
                       f"{list(action_high)})", "narrow lower/upper to within the action bounds")
    max_change = vector("max_change", True)
    if max_change is not None and not all(v > 0 for v in max_change):
        raise DMMError(f"{source}: max_change {max_change}", "a positive change per step in every dimension",
                       "raise each max_change above 0, or set it to null for no rate limit")
    steps = limits["ramp_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise DMMError(f"{source}: ramp_steps {steps!r}", "a whole number >= 0",
                       "set ramp_steps to 0 (no ramp) or a positive whole number")
    start = vector("ramp_start", True)
    if start is not None and not all(lo <= v <= hi for lo, v, hi in zip(lower, start, upper, strict=True)):
        raise DMMError(f"{source}: ramp_start {start}", f"values within lower / upper ({lower} / {upper})",
                       "move ramp_start within the limits, or set it to null")


def manifest_path_for(engine_path: str | Path) -> Path:
    """hopper.onnx -> hopper.json; hopper.plan -> hopper.plan.json."""
    engine_path = Path(engine_path)
    if engine_path.suffix == ".plan":
        return engine_path.with_name(engine_path.name + ".json")
    return engine_path.with_suffix(".json")


def manifest_bytes(manifest: Manifest) -> bytes:
    """The manifest as written on disk: indented, key-sorted JSON (a member of an export's file set)."""
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode()


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write atomically (temporary file + rename)."""
    path = Path(path)
    atomic_write_bytes(path, manifest_bytes(manifest))
    return path


def complete_export(directory: str | Path) -> None:
    """Finish an export's file set that a kill interrupted in ``directory`` before reading from it.

    A kill after an export committed its set leaves the new files staged: finishing the renames
    gives the complete new set. A directory this process cannot write (someone else's export) is
    read as it stands; the hashes in the manifest then refuse a mixed set.
    """
    with contextlib.suppress(DMMError):
        complete_interrupted_sets(directory)


@contextlib.contextmanager
def export_lock(path: str | Path) -> Iterator[None]:
    """Hold the lock of the export that writes ``path`` (NAME.onnx, NAME.c, NAME.plan...) for the duration.

    Two exports to one NAME at once would interleave their files; the second is refused at
    once with one line naming the first's process. Taken before the expensive work starts.
    """
    path = Path(path)
    name = path.name[:-len(path.suffix)] if path.suffix else path.name
    lock_path = path.parent / f".{name}.export.lock"
    created = not path.parent.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        failure = file_error(error, path.parent, "write an export into")
        raise DMMError(failure.received, failure.expected,
                       f"{failure.fix}, or pass --out with a writable NAME") from None
    try:
        with exclusive_lock(lock_path, path.with_name(name), "export", "wait for it to finish or pass another --out"):
            yield
    except BaseException:
        # An export that failed before writing anything leaves no directory behind, as without the lock.
        if created and [entry.name for entry in path.parent.iterdir()] == [lock_path.name]:
            with contextlib.suppress(OSError):
                lock_path.unlink()
                path.parent.rmdir()
        raise


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    complete_export(path.parent)
    if not path.is_file():
        raise DMMError(f"manifest {str(path)!r}: no such file",
                       "the .json that 'cli.py export' writes beside the engine",
                       "re-export, or keep the manifest next to the engine")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DMMError(f"manifest {str(path)!r}: not valid JSON ({error})", "a JSON manifest",
                       "re-export the engine") from None
    if not isinstance(data, dict):
        raise DMMError(f"manifest {str(path)!r}: holds {type(data).__name__}", "a JSON object",
                       "re-export the engine")
    return Manifest.from_dict(data, source=f"manifest {str(path)!r}")
