"""An independent check of a build with NVIDIA's own tool: a Polygraphy data loader beside every ONNX.

``cli.py export`` writes, beside NAME.onnx, NAME_data_loader.py (plain Python and numpy) and
NAME.inputs.npz: real inputs of the graph, held-out dataset windows (window mode) or stream
steps with the real caches the fp32 graph produced along a held-out episode (stream mode), or
where the training dataset is not on this machine, the inputs a `runtime.Policy` fed the fp32
graph along a closed-loop episode of its plant. The manifest (``exporter.polygraphy``) names the
command that runs the graph in TensorRT and ONNX Runtime on those inputs and compares the
outputs with the project's tolerances (`contract.tolerances`, pair trt-vs-ort):

    polygraphy run hopper.onnx --trt --strongly-typed --onnxrt --data-loader-script hopper_data_loader.py \\
        --atol 1e-4 --rtol 0

Polygraphy imports the script by its file name, so the name carries no dot but the ``.py``.
"""

from __future__ import annotations

import dataclasses
import io
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from calibration.data import calibration_feeds, find_training_dataset, split_episodes
from contract.errors import DMMError
from contract.manifest import Manifest
from contract.tolerances import tolerance
from runtime.backend import Backend
from runtime.ort_backend import OrtBackend
from runtime.plant import check_plant, make_plant
from runtime.policy import Policy
from runtime.recording import record_trajectory

FEEDS = 16  # inputs in the data loader: enough to see a wrong layer, small enough to ship (~100 KB)


def data_loader_paths(onnx_path: Path) -> tuple[Path, Path]:
    """(script, inputs) beside ``onnx_path``: hopper.onnx -> hopper_data_loader.py, hopper.inputs.npz."""
    stem = onnx_path.name[:-len(".onnx")] if onnx_path.name.endswith(".onnx") else onnx_path.stem
    return (onnx_path.with_name(stem.replace(".", "_") + "_data_loader.py"),
            onnx_path.with_name(stem + ".inputs.npz"))


def polygraphy_tolerance_args(precision: str) -> tuple[list[str], str]:
    """Polygraphy's comparison options for the trt-vs-ort tolerance of ``precision``, and what they mean."""
    bound = tolerance("trt-vs-ort", precision)
    if bound.max_abs is not None:
        return ["--atol", f"{bound.max_abs:g}", "--rtol", "0"], f"max |TensorRT - ONNX Runtime| <= {bound.max_abs:g}"
    if bound.mean_abs is not None:
        return (["--check-error-stat", "mean", "--atol", f"{bound.mean_abs:g}", "--rtol", "0"],
                f"mean |TensorRT - ONNX Runtime| <= {bound.mean_abs:g}")
    # Polygraphy has no RMS statistic: mean |diff| <= the RMSE bound is implied by it (mean <= RMS), so
    # this check is looser than the table's; the accuracy report judges the RMSE itself.
    return (["--check-error-stat", "mean", "--atol", f"{bound.rmse:g}", "--rtol", "0"],
            f"mean |TensorRT - ONNX Runtime| <= {bound.rmse:g} (the table bounds the RMSE by {bound.rmse:g}; "
            "Polygraphy has no RMS statistic, and mean <= RMS)")


class _RecordingBackend(Backend):
    """Passes every call to ``inner`` and keeps a copy of each feed it was given."""

    name = "recording"

    def __init__(self, inner: Backend):
        super().__init__(inner.path)
        self.inner = inner
        self.feeds: list[dict[str, np.ndarray]] = []
        self.step_in_episode: list[int] = []  # per feed: calls since the last reset
        self._since_reset = 0

    def _load(self) -> Manifest:
        return self.inner.load().manifest

    def reset(self) -> None:
        self._since_reset = 0
        self.inner.reset()

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.append({name: np.array(array, copy=True) for name, array in feeds.items()})
        self.step_in_episode.append(self._since_reset)
        self._since_reset += 1
        return self.inner.infer(feeds)

    def _close(self) -> None:
        self.inner.close()


def _plant_feeds(model_bytes: bytes, manifest: Manifest, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """What a Policy feeds the fp32 graph along closed-loop episodes of its plant, ``count`` of them spread
    over the steps (later steps carry full windows and long-lived caches)."""
    recorder = _RecordingBackend(OrtBackend(model_bytes, manifest=manifest, threads=1, label="fp32 graph"))
    with recorder.load():
        plant = make_plant(manifest.env_id)
        try:
            check_plant(plant, manifest, manifest.env_id)
            record_trajectory(Policy(recorder), plant, steps=max(10 * count, 200), seed=seed)
        finally:
            plant.close()
    # Prefer steps with a full window (and caches that have lived as long) where the episodes are that long.
    steps = np.asarray(recorder.step_in_episode)  # (calls,)
    candidates = np.flatnonzero(steps >= min(manifest.context_len, int(steps.max())))
    picks = candidates[np.linspace(0, len(candidates) - 1, count).round().astype(int)]
    return [recorder.feeds[int(index)] for index in picks]


def real_feeds(fp32_proto, manifest: Manifest, checkpoint, *, dataset: str | None = None, count: int = FEEDS,
               seed: int = 0) -> tuple[list[dict[str, np.ndarray]], str]:
    """(feeds, where they come from): held-out dataset inputs where the training dataset is here, else the
    plant's closed loop (see the module docstring)."""
    fp32_manifest = manifest if manifest.precision == "fp32" else _as_fp32(manifest)
    loaded, why = find_training_dataset(checkpoint, dataset)  # None where missing or of other content
    if loaded is None and not manifest.env_id:
        raise DMMError(f"export of a policy with no simulator whose training dataset is not here ({why})",
                       "that dataset, whose held-out inputs check the exported graph",
                       "pass --dataset with its directory or local id")
    if loaded is None:
        feeds = _plant_feeds(fp32_proto.SerializeToString(), fp32_manifest, count, seed)
        return feeds, (f"{len(feeds)} inputs a Policy fed the fp32 graph along a closed-loop {manifest.env_id} "
                       f"episode (seed {seed}); the training dataset is not used: {why}")
    split = split_episodes(loaded, seed=seed)
    feeds = calibration_feeds(fp32_proto, fp32_manifest, split.heldout, count, seed=seed + 2)
    kind = ("windows" if manifest.mode == "window" else
            "stream steps with the caches the fp32 graph produced from zero")
    return feeds, f"{len(feeds)} {kind} of held-out episodes of {split.dataset_id}"


def _as_fp32(manifest: Manifest) -> Manifest:
    return dataclasses.replace(manifest, precision="fp32")


def docstring_text(text: str) -> str:
    """``text`` as it may stand inside a generated triple-quoted docstring: backslashes, double quotes and
    unprintable characters escaped, so that it reads as itself and can never end the string."""
    escaped = []
    for char in text:
        if char in '\\"':
            escaped.append("\\" + char)
        elif not char.isprintable():
            escaped.append(repr(char)[1:-1])  # \n, \x00, \u2028: a line break or NUL never reaches the file
        else:
            escaped.append(char)
    return "".join(escaped)


SCRIPT = '''"""Polygraphy data loader for {onnx} (written by 'cli.py export'): {count} real inputs of the graph.

    {command}

{source}
Plain Python and numpy; the arrays are in {inputs} beside this file.
"""

from pathlib import Path

import numpy as np

INPUTS = Path(__file__).with_name({inputs!r})


def load_data():
    """Yield one feed dict (input name -> array) per input, as Polygraphy's data loaders do."""
    with np.load(INPUTS) as archive:
        names = [str(name) for name in archive["names"]]
        feeds = [{{name: archive[f"{{index}}.{{name}}"] for name in names}} for index in range(int(archive["count"]))]
    yield from feeds
'''


def data_loader_files(onnx_path: Path, manifest: Manifest, feeds: list[dict[str, np.ndarray]],
                      source: str) -> tuple[dict, dict[Path, bytes]]:
    """The data loader and its inputs beside ``onnx_path``: the manifest's ``polygraphy`` record, and the
    files (path -> bytes) that the export writes with its graph and manifest as one set."""
    script_path, inputs_path = data_loader_paths(onnx_path)
    names = [spec.name for spec in manifest.inputs]
    for feed in feeds:
        for spec in manifest.inputs:
            array = feed[spec.name]
            if array.dtype != np.dtype(spec.dtype) or tuple(array.shape) != spec.shape:
                raise DMMError(f"data loader input {spec.name!r} {array.dtype} {array.shape}",
                               f"{spec.dtype} {spec.shape}", "report this bug in export/polygraphy_check.py")
    arrays = {f"{index}.{name}": feed[name] for index, feed in enumerate(feeds) for name in names}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, names=np.array(names), count=np.array(len(feeds)), **arrays)
    options, meaning = polygraphy_tolerance_args(manifest.precision)
    command = " ".join(["polygraphy", "run", onnx_path.name, "--trt", "--strongly-typed", "--onnxrt",
                        "--data-loader-script", script_path.name, *options])
    head, _, tail = command.partition(" --data-loader-script ")  # two docstring lines of at most 120 columns
    # Every interpolated text is escaped for the docstring: no name, env id or message can close it.
    shown = f"{docstring_text(head)} \\\n        --data-loader-script {docstring_text(tail)}"
    script = SCRIPT.format(onnx=docstring_text(onnx_path.name), count=len(feeds), command=shown,
                           source=textwrap.fill(docstring_text(f"Inputs: {source}."), 110), inputs=inputs_path.name)
    files = {inputs_path: buffer.getvalue(), script_path: script.encode()}
    return {"data_loader_script": script_path.name, "inputs": inputs_path.name, "feeds": len(feeds),
            "source": source, "command": command, "tolerance": meaning,
            "note": "run on the target GPU, in the directory of the ONNX; TensorRT and ONNX Runtime on the same "
                    "inputs, TF32 off (Polygraphy's default), strongly typed as 'cli.py build' builds"
                    + (INT8_ORT_NOTE if manifest.precision == "int8" else "")}, files


# Polygraphy runs ONNX Runtime at full graph optimisation, which fuses the Q/DQ pairs into integer kernels;
# on an x86 CPU without VNNI those kernels saturate (u8 x s8 pairs overflow int16), so the ONNX Runtime side
# itself can be off by more than the tolerance there.
INT8_ORT_NOTE = ("; int8: ONNX Runtime runs the Q/DQ graph with integer kernels that saturate on x86 CPUs without "
                 "VNNI (AVX512-VNNI / AVX-VNNI), so on such a host this command can fail for that reason alone: run "
                 "it on the target (ARM CPUs and VNNI x86 are exact), or compare TensorRT against the fp32 graph's "
                 "outputs instead (polygraphy run NAME-fp32.onnx --onnxrt --save-outputs, then --load-outputs)")
