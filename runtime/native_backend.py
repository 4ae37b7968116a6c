"""Native backend: a policy exported as C (NAME.c + NAME.h by 'cli.py export --target c').

The .c is compiled on first use with the system C compiler into the per-user cache of
`runtime.native_build` and loaded with ctypes; nothing but the standard library and numpy
is needed at run time (no ONNX Runtime, no torch). Before the library is used the files are
checked against their manifest NAME.json: target "c", stream mode, fp32, batch 1, the
sha256 of both files, and the dimensions the compiled code reports against the manifest's
I/O tensors.

The backend presents the same graph-level I/O as the stream ONNX graph (`contract.manifest`),
through the C function PREFIX_stream_step, so `runtime.Policy`, the control loop and the
parity harness use it unchanged. `NativeLibrary` also offers the C file's own env-step API
(PREFIX_reset / PREFIX_step / PREFIX_override_action: normalisation, return-to-go and action
clipping inside C), which a C or C++ control loop links directly.

Compile flags (`compile_flags`): -O3 -std=c99 plus
- -fno-math-errno: sqrtf becomes one instruction instead of a call that may set errno; the
  step never takes the root of a negative number (variance + eps > 0), values are unchanged;
- -fno-trapping-math: the compiler may evaluate both sides of the selects in the vectorised
  exp/log1p and compare unconditionally; no FP traps are ever enabled, values are unchanged;
- -ffp-contract=fast: a*b + c may become one fused multiply-add (ISO C mode turns this off by
  default); this changes rounding only (one rounding instead of two), not NaN / inf handling;
- the instruction-set level of `runtime.native_build.isa_level` (``$DMM_NATIVE_ISA`` overrides).
Never -ffast-math / -ffinite-math-only / -fassociative-math: the step tests for NaN and inf,
and the fixed summation order and the rounding trick of exp must not be rewritten. Every sum
in the C file is taken in an order fixed by its source, so builds with different levels (or
compilers) differ only by FMA contraction, within float rounding.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from contract.errors import DMMError
from contract.files import sha256_file
from contract.manifest import Manifest, manifest_path_for, read_manifest, tensor_specs
from runtime.backend import Backend, check_engine_io
from runtime.native_build import build_shared_library, find_compiler, isa_flags, isa_level

ISA_ENV = "DMM_NATIVE_ISA"
CACHE_SUBDIR = "native_policy"
BASE_FLAGS = ("-O3", "-std=c99", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast")
LINK_FLAGS = ("-shared", "-lm")
N_DIMS = 8  # PREFIX_dims: state_dim, act_dim, n_layer, dsm_window, d_model, d_state, dt_rank, batch
# Return codes of the C API (PREFIX_OK, PREFIX_E_* in NAME.h).
OK, E_NONFINITE_INPUT, E_NONFINITE_OUTPUT, E_NOT_RESET, E_NO_STEP, E_NULL = range(6)


def compile_flags() -> tuple[str, ...]:
    """The flags the policy library is built with on this machine (see the module docstring)."""
    return (*BASE_FLAGS, *isa_flags(isa_level(ISA_ENV)))


def build_policy_library(c_path: Path, h_path: Path) -> Path:
    """Compile NAME.c (which includes NAME.h) into the per-user cache, once per content and flags."""
    return build_shared_library([c_path], library_name=f"lib{c_path.stem}.so", subdir=CACHE_SUBDIR,
                                flags=compile_flags(), link_flags=LINK_FLAGS, headers=[h_path])


def _address(array: np.ndarray) -> int:
    return array.ctypes.data


class NativeLibrary:
    """The ctypes face of one compiled policy (``prefix``: the C API's prefix, e.g. "hopper")."""

    def __init__(self, library_path: Path, prefix: str):
        self.path = Path(library_path)
        self.prefix = prefix
        library = ctypes.CDLL(str(self.path))
        pointer = ctypes.c_void_p

        def function(name: str, argtypes: list, restype=ctypes.c_int):
            try:
                entry = getattr(library, f"{prefix}_{name}")
            except AttributeError:
                raise DMMError(f"library {str(self.path)!r}: no function {prefix}_{name}",
                               "the API of a C file written by 'cli.py export --target c'",
                               "re-export it with 'cli.py export --target c'") from None
            entry.argtypes, entry.restype = argtypes, restype
            return entry

        self._dims = function("dims", [pointer], None)
        self._state_size = function("state_size", [], ctypes.c_ulong)
        self._reset = function("reset", [pointer, ctypes.c_double])
        self._step = function("step", [pointer, pointer, ctypes.c_double, pointer])
        self._override = function("override_action", [pointer, pointer])
        self._stream_step = function("stream_step", [pointer] * 10)
        self._error_string = function("error_string", [ctypes.c_int], ctypes.c_char_p)
        self._library = library
        dims = np.zeros(N_DIMS, dtype=np.int64)  # C long: 64 bits on the LP64 targets this runs on
        self._dims(_address(dims))
        (self.state_dim, self.act_dim, self.n_layer, self.dsm_window, self.d_model, self.d_state, self.dt_rank,
         self.batch) = (int(v) for v in dims)
        # The C state struct as raw bytes the library owns the layout of (8-byte aligned, as numpy allocates).
        self._state = np.zeros(int(self._state_size()), dtype=np.uint8)
        self._state_address = _address(self._state)
        self._work = np.zeros_like(self._state)  # scratch of stream_step
        # The env-step API's arguments live in buffers of fixed address: a call copies into them and
        # passes precomputed pointers, since numpy's .ctypes costs a good part of the step
        # (BENCHMARKS.md#design-measurements).
        self._observation = np.zeros(self.state_dim, dtype=np.float64)
        self._executed = np.zeros(self.act_dim, dtype=np.float32)
        self._action = np.zeros(self.act_dim, dtype=np.float32)
        self._observation_address, self._executed_address, self._action_address = (
            _address(self._observation), _address(self._executed), _address(self._action))
        self._outputs = {spec.name: np.zeros(spec.shape, dtype=np.float32) for spec in self.tensor_specs()[1]}
        self._output_addresses = [_address(self._outputs[name])
                                  for name in ("action", "dsm_cache_next", "ssm_state_next")]

    def tensor_specs(self):
        """(inputs, outputs) of the stream contract at the dimensions the compiled code reports."""
        return tensor_specs("stream", batch=self.batch, context_len=0, state_dim=self.state_dim,
                            act_dim=self.act_dim, n_layer=self.n_layer, dsm_window=self.dsm_window,
                            d_model=self.d_model, d_state=self.d_state)

    def error_string(self, code: int) -> str:
        return self._error_string(int(code)).decode()

    # -- the env-step API of the C file ------------------------------------------------

    def reset(self, target_return: float) -> None:
        status = self._reset(self._state_address, float(target_return))
        if status != OK:
            raise DMMError(f"target return {target_return} ({self.error_string(status)})", "a finite number",
                           "pass a finite target return")

    def step(self, observation: np.ndarray, reward: float = 0.0) -> np.ndarray:
        """observation: (S,) raw -> the action (Adim,) float32, clipped (a buffer reused by the next call)."""
        if np.shape(observation) != self._observation.shape:
            raise DMMError(f"observation shape {np.shape(observation)}", f"({self.state_dim},)",
                           f"pass one observation of {self.state_dim} numbers")
        np.copyto(self._observation, observation)  # as float64, what the C API reads
        status = self._step(self._state_address, self._observation_address, float(reward), self._action_address)
        if status != OK:
            raise DMMError(f"{self.prefix}_step returned {status}: {self.error_string(status)}", f"{OK} (success)",
                           "check the inputs (finite observation and reward), or stop the plant")
        return self._action

    def override_action(self, action) -> None:
        """The action actually executed after the last step (teacher forcing, a safety layer's clamp)."""
        if np.shape(action) != self._executed.shape:
            raise DMMError(f"action shape {np.shape(action)}", f"({self.act_dim},)",
                           f"pass one executed action of {self.act_dim} numbers")
        np.copyto(self._executed, action)
        status = self._override(self._state_address, self._executed_address)
        if status != OK:
            raise DMMError(f"{self.prefix}_override_action returned {status}: {self.error_string(status)}",
                           f"{OK} (success)", "pass the finite action actually executed")

    # -- the graph-level stream step -----------------------------------------------------

    def stream_step(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The stream graph's inputs by name -> its outputs by name (buffers reused by the next call)."""
        inputs = []
        for name in ("prev_action", "prev_action_valid", "rtg", "state", "dsm_cache", "ssm_state"):
            array = feeds[name]
            if array.dtype != np.float32 or not array.flags.c_contiguous:
                array = np.ascontiguousarray(array, dtype=np.float32)
            inputs.append(array)
        status = self._stream_step(_address(self._work), *(_address(a) for a in inputs), *self._output_addresses)
        if status == E_NONFINITE_INPUT:
            raise DMMError(f"stream inputs: non-finite prev_action, rtg or state ({self.error_string(status)})",
                           "finite values", "check the observation and reward")
        if status not in (OK, E_NONFINITE_OUTPUT):  # a non-finite action is the caller's to report (Policy does)
            raise DMMError(f"{self.prefix}_stream_step returned {status}: {self.error_string(status)}",
                           f"{OK} (success)", "check the stream inputs, or re-export with 'cli.py export --target c'")
        return self._outputs

    def session(self) -> _StreamSession:
        """An object with ONNX Runtime's ``run(output_names, feeds)``, for `export.reference.measure_parity`."""
        return _StreamSession(self)


class _StreamSession:
    def __init__(self, library: NativeLibrary):
        self.library = library

    def run(self, output_names, feeds):
        outputs = self.library.stream_step(feeds)
        return [outputs[name].copy() for name in output_names]


class NativeBackend(Backend):
    """NAME.c (+ NAME.h, NAME.json) compiled into a shared library and run through ctypes on the CPU."""

    name = "native"

    def __init__(self, path: str | Path, *, manifest_path: str | Path | None = None):
        super().__init__(path)
        self.header_path = self.path.with_suffix(".h")
        self.manifest_path = Path(manifest_path) if manifest_path else manifest_path_for(self.path)
        self.library: NativeLibrary | None = None

    def _load(self) -> Manifest:
        source = f"engine {str(self.path)!r}"
        for path, what in ((self.path, "C source"), (self.header_path, "header")):
            if not path.is_file():
                raise DMMError(f"{source}: {what} {str(path)!r} does not exist",
                               "NAME.c and NAME.h written by 'cli.py export --target c'",
                               "export it, or keep the two files together")
        manifest = read_manifest(self.manifest_path)
        engine = manifest.engine
        if engine.get("target") != "c":
            raise DMMError(f"{source}: manifest {str(self.manifest_path)!r} describes a {manifest.mode} "
                           f"{engine.get('target') or 'ONNX'} export", "a C export's manifest (target c)",
                           "re-export with 'cli.py export --target c', or keep each export under its own NAME")
        if (manifest.mode, manifest.precision, manifest.batch) != ("stream", "fp32", 1):
            raise DMMError(f"{source}: manifest {manifest.mode}, {manifest.precision}, batch {manifest.batch}",
                           "stream, fp32, batch 1 (the C target's only form)",
                           "re-export with 'cli.py export --target c'")
        for path, key in ((self.path, "source_sha256"), (self.header_path, "header_sha256")):
            actual = sha256_file(path)
            if actual != engine.get(key):
                raise DMMError(f"{source}: sha256 of {path.name} {actual[:12]}...",
                               f"the manifest's {str(engine.get(key))[:12]}... (the file was changed after export "
                               "or the manifest belongs to another export)", "re-export")
        try:
            compiler = find_compiler()
            library_path = build_policy_library(self.path, self.header_path)
        except DMMError as error:
            raise error.within(f"{source} is C and is compiled on first use") from None
        library = NativeLibrary(library_path, str(engine.get("symbol_prefix")))
        inputs, outputs = library.tensor_specs()
        check_engine_io(source, manifest, "input", [(s.name, s.shape, s.dtype) for s in inputs])
        check_engine_io(source, manifest, "output", [(s.name, s.shape, s.dtype) for s in outputs])
        self.library = library
        self.provider = f"cpu ({Path(compiler).name} {isa_level(ISA_ENV)})"
        return manifest

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.library.stream_step(feeds)

    def _close(self) -> None:
        self.library = None
