"""The one shape every backend has: `Backend`, and the feed / engine-I/O checks they share.

A backend is Polygraphy's runner: constructed from a path (cheap), ``load()``ed (the heavy
part: a session, an engine, a model), then ``infer(feeds)`` any number of times, then
``close()``d; it is also a context manager. ``infer`` takes and returns the tensors of
the graph I/O contract in `contract.manifest` by name, as float32 numpy arrays, for
every backend alike; inputs are checked by name, dtype and shape against the manifest
before anything runs, with "received; expected ...; fix" errors.

Backends are stateless between calls (the caches of stream mode travel through
``infer``, owned by `runtime.policy.Policy`); ``reset()`` exists so that a backend
that keeps state of its own (a TensorRT engine with device-resident caches) has the
hook the loop calls at every episode start.

A new backend subclasses `Backend`: ``_load`` opens the engine, reads its manifest
(`contract.manifest.manifest_path_for`: hopper.plan -> hopper.plan.json), compares the
engine's own I/O with it (`check_engine_io`) and returns it; ``_infer`` and ``_close``
do the rest; `runtime.loading.load_backend` picks it by file type.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np

from contract.errors import DMMError
from contract.manifest import Manifest

AnyBackend = TypeVar("AnyBackend", bound="Backend")  # load() and `with` give back the backend's own class


def array_kind(array) -> str:
    """'float32 (1, 8, 11)' for an array, the type name for anything else."""
    if isinstance(array, np.ndarray):
        return f"{array.dtype} {tuple(array.shape)}"
    return type(array).__name__


def check_feeds(manifest: Manifest, feeds: Mapping[str, np.ndarray]) -> None:
    """Raise DMMError unless ``feeds`` holds exactly the manifest's inputs, as float32 arrays of their shape.

    No silent casts or reshapes (as in Polygraphy): a float64 or (8, 11) array fed for
    a float32 (1, 8, 11) input is a bug in the caller, not something to guess about.
    """
    expected_names = [spec.name for spec in manifest.inputs]
    if set(feeds) != set(expected_names):
        raise DMMError(f"inputs {sorted(feeds)}", f"{expected_names} (the {manifest.mode} graph's)",
                       f"feed exactly the inputs of the {manifest.mode} graph")
    for spec in manifest.inputs:
        array = feeds[spec.name]
        if (not isinstance(array, np.ndarray) or array.dtype != np.dtype(spec.dtype)
                or tuple(array.shape) != spec.shape):
            raise DMMError(f"input {spec.name!r} {array_kind(array)}", f"{spec.dtype} {spec.shape}",
                           "feed numpy arrays of the dtype and shape in the engine's manifest")


def zero_feeds(manifest: Manifest) -> dict[str, np.ndarray]:
    """One zero float32 array per manifest input, of its shape (a valid first stream step)."""
    return {spec.name: np.zeros(spec.shape, dtype=np.dtype(spec.dtype)) for spec in manifest.inputs}


class Backend:
    """The shape every backend shares.

    Attributes once loaded: ``name`` ("ort", "torch", "trt"), ``provider`` (what runs
    the graph: an ONNX Runtime execution provider, "torch-cpu", a GPU), ``manifest``
    (the `Manifest` the engine is checked against), ``path``.
    """

    name = "backend"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.provider = ""
        self._manifest: Manifest | None = None

    # -- lifecycle -------------------------------------------------------------------

    def load(self: AnyBackend) -> AnyBackend:
        """Do the heavy work (idempotent); returns self so that ``Backend(p).load()`` chains."""
        if self._manifest is None:
            self._manifest = self._load()
        return self

    def reset(self) -> None:
        """Start of an episode. Stateless backends have nothing to do."""

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph once: manifest inputs by name -> manifest outputs by name (float32 arrays)."""
        manifest = self.manifest
        check_feeds(manifest, feeds)
        return self._infer(feeds)

    def infer_prechecked(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`infer` without the per-call feed check, for feeds checked once (`check_feeds`) and written
        in place since: a Policy's own preallocated arrays, whose names, dtypes and shapes never change.
        The check costs microseconds per call, a large share of a control step on the fast backends."""
        return self._infer(feeds)

    def close(self) -> None:
        """Release the session / engine / model; a later ``load()`` starts again."""
        self._close()
        self._manifest = None

    def __enter__(self: AnyBackend) -> AnyBackend:
        return self.load()

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def loaded(self) -> bool:
        return self._manifest is not None

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            raise DMMError(f"{self.name} backend for {str(self.path)!r}: not loaded", "a loaded backend",
                           "call load() first or use it as a context manager")
        return self._manifest

    def __repr__(self) -> str:
        state = f"{self.manifest.mode}, {self.provider}" if self.loaded else "not loaded"
        return f"{type(self).__name__}({str(self.path)!r}, {state})"

    # -- what each backend implements ------------------------------------------------

    def _load(self) -> Manifest:
        raise NotImplementedError

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


def check_engine_io(source: str, manifest: Manifest, kind: str, graph: list[tuple[str, tuple, str]]) -> None:
    """Compare an engine's own I/O (names, shapes, dtypes) with its manifest; DMMError on any difference.

    ``graph`` holds (name, shape, dtype) per tensor as the engine reports them; a
    non-integer dim (a symbolic one) matches any size, since the feed check pins the
    manifest's static shape anyway.
    """
    specs = manifest.inputs if kind == "input" else manifest.outputs
    expected = {spec.name: spec for spec in specs}
    found = {name: (tuple(shape), dtype) for name, shape, dtype in graph}
    if set(found) != set(expected):
        raise DMMError(f"{source}: graph {kind}s {sorted(found)}",
                       f"the manifest's {sorted(expected)} (it describes another graph, a {manifest.mode} one)",
                       "re-export, or keep each engine next to its own manifest")
    for name, spec in expected.items():
        shape, dtype = found[name]
        shapes_agree = len(shape) == len(spec.shape) and all(
            not isinstance(dim, int) or dim == want for dim, want in zip(shape, spec.shape, strict=True)
        )
        if not shapes_agree or dtype != spec.dtype:
            raise DMMError(f"{source}: graph {kind} {name!r} {dtype} {shape}",
                           f"the manifest's {spec.dtype} {spec.shape} (it describes another graph)",
                           "re-export, or keep each engine next to its own manifest")


# Intra-op threads of ONNX Runtime and torch by default: a batch-1 policy is a chain of small
# matmuls, where a thread pool only adds synchronisation (on a loaded machine, several to a
# hundred times slower steps: BENCHMARKS.md#design-measurements) and latency jitter.
DEFAULT_THREADS = 1
