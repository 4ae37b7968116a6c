"""Generate the stream-mode policy as one C99 file: NAME.c + NAME.h (+ the manifest NAME.json).

    c_path, h_path, manifest_path = export_c_checkpoint("runs/hopper-seed0/model.pt", out="hopper")

The C code is a fixed template (export/c_template/policy.c.in, .h.in: kernels, the step, the
API) into which the model's weights are written as static const float arrays, each named
after the parameter it comes from and laid out the way the kernels read it (input-major,
(K, O); the SSM's A as (N, D)). Every float is written as a C99 hexadecimal literal, so the
compiled weights are the checkpoint's bits exactly; doubles (normalisation, rtg scale,
target) as Python's shortest round-trip decimal, which C reads back to the same double.

The maths is `DecisionMetaMamba.step` (the reference), not the ONNX lowering's folded form:
dt_proj stays a rank-R product after x_proj (cheaper in C than the folded D x D matrix, and
closer to the reference's rounding). Before anything is written, the generated file is
compiled (`runtime.native_backend`), run on real-looking inputs against the PyTorch model
(`export.reference.measure_parity`, the same check as the ONNX export's) and refused beyond
PARITY_REFUSE_ABOVE; the files are written atomically.

Glossary: S state dim, Adim action dim, D d_model, N d_state, R dt_rank, W DSM window.
"""

from __future__ import annotations

import dataclasses
import keyword
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contract.errors import DMMError
from contract.files import atomic_write_set, sha256_bytes
from contract.manifest import Manifest, export_lock, manifest_bytes, manifest_path_for, read_manifest
from contract.names import check_export_name
from dmm_train.checkpoint import load_checkpoint
from dmm_train.manifest_builder import build_manifest
from dmm_train.model import DecisionMetaMamba
from export.config import DEFAULT_RUNS_DIR
from export.onnx_export import find_latest_checkpoint
from export.reference import PARITY_REFUSE_ABOVE, measure_parity
from runtime.limits import ActuatorLimits
from runtime.native_backend import NativeLibrary, build_policy_library, compile_flags

TEMPLATE_DIR = Path(__file__).resolve().parent / "c_template"
GENERATOR = "export.c_source"
VALUES_PER_LINE = 6
# x_proj's and the head's outputs are padded with zero columns to a multiple of this (the kernels' block).
COLUMN_MULTIPLE = 16
# Stack the step uses (its scratch arrays), rounded up; printed in the header for embedded users.
STACK_KIB = 12


@dataclass(frozen=True)
class CSource:
    """The generated text of NAME.c and NAME.h; ``prefix`` is the C identifier prefix of the API."""

    name: str
    prefix: str
    source: str
    header: str


def c_identifier(name: str) -> str:
    """A file stem -> the API's prefix: 'hopper-stream' -> 'hopper_stream' (letters, digits, _)."""
    identifier = re.sub(r"[^0-9A-Za-z_]", "_", name)
    if not identifier or identifier[0].isdigit() or keyword.iskeyword(identifier):
        identifier = f"policy_{identifier}"
    return identifier


def c_paths_for(out: str | Path) -> tuple[Path, Path]:
    """NAME or NAME.c -> (NAME.c, NAME.h); a dotted NAME like 'hopper.v2' keeps its dot."""
    out = Path(out)
    c_path = out if out.suffix == ".c" else out.with_name(out.name + ".c")
    return c_path, c_path.with_suffix(".h")


def _hex_float(value: np.float32) -> str:
    """An exact C99 float literal: float32 0.1 -> '0x1.99999ap-4f'."""
    text = float(value).hex()  # '0x1.99999a0000000p-4' (a float32 needs at most 6 of the 13 hex digits)
    mantissa, exponent = text.split("p")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}p{exponent}f"


def _double(value: float) -> str:
    text = repr(float(value))
    return text if any(c in text for c in ".en") else text + ".0"


def _float_array(name: str, array: np.ndarray, comment: str) -> str:
    flat = np.ascontiguousarray(array, dtype=np.float32).ravel()
    if not np.isfinite(flat).all():
        raise DMMError(f"checkpoint weight {name} with non-finite values", "a trained model with finite weights",
                       "retrain or pick another checkpoint")
    literals = [_hex_float(v) for v in flat]
    lines = [", ".join(literals[i:i + VALUES_PER_LINE]) for i in range(0, len(literals), VALUES_PER_LINE)]
    body = ",\n    ".join(lines)
    return f"/* {comment} */\nstatic const float {name}[{flat.size}] = {{\n    {body}\n}};\n"


def _padded(width: int) -> int:
    """``width`` rounded up to a multiple of COLUMN_MULTIPLE: the Linear kernels' blocks need no remainder."""
    return -(-width // COLUMN_MULTIPLE) * COLUMN_MULTIPLE


def _pad_columns(matrix: np.ndarray) -> np.ndarray:
    """(K, O) -> (K, `_padded` (O)) with zero columns: outputs nobody reads, exactly 0."""
    padded = np.zeros((matrix.shape[0], _padded(matrix.shape[1])), dtype=np.float32)
    padded[:, :matrix.shape[1]] = matrix
    return padded


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float32).numpy()


class _Arrays:
    """The weight arrays of the C file, one per (parameter, layout), shared modules written once."""

    def __init__(self, model: DecisionMetaMamba):
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.chunks: list[str] = []
        self._written: set[str] = set()

    def __call__(self, parameter: torch.Tensor, tag: str, array: np.ndarray, comment: str) -> str:
        name = re.sub(r"[^0-9A-Za-z_]", "_", self.names[id(parameter)]) + tag
        if name not in self._written:
            self._written.add(name)
            self.chunks.append(_float_array(name, array, comment))
        return name


def _layer_norm(arrays: _Arrays, norm: torch.nn.LayerNorm, what: str) -> str:
    """A C initializer of layer_norm_params for ``norm``."""
    weight = arrays(norm.weight, "", _np(norm.weight), f"{what} weight (D,)")
    bias = arrays(norm.bias, "", _np(norm.bias), f"{what} bias (D,)")
    return f"{{{weight}, {bias}, {_hex_float(np.float32(norm.eps))}}}"


def _weights(model: DecisionMetaMamba) -> str:
    """The C text of every weight array and of the tables that point into them."""
    cfg = model.config
    arrays = _Arrays(model)
    w = arrays
    embed = [
        w(model.embed_action.weight, "_T", _np(model.embed_action.weight).T, "embed_action, input-major (Adim, D)"),
        w(model.embed_action.bias, "", _np(model.embed_action.bias), "embed_action bias (D,)"),
        w(model.embed_return.weight, "_T", _np(model.embed_return.weight).T, "embed_return, input-major (1, D)"),
        w(model.embed_return.bias, "", _np(model.embed_return.bias), "embed_return bias (D,)"),
        w(model.embed_state.weight, "_T", _np(model.embed_state.weight).T, "embed_state, input-major (S, D)"),
        w(model.embed_state.bias, "", _np(model.embed_state.bias), "embed_state bias (D,)"),
    ]
    embed_ln = _layer_norm(arrays, model.embed_ln, "embed_ln")
    layers = []
    for index in range(cfg.n_layer):
        norm_mixer, dsm, norm_ssm, ssm = model._layer(index)  # the model's own layer wiring (shared modules)
        R, N = ssm.dt_rank, ssm.d_state
        x_proj = _np(ssm.x_proj.weight)  # (R + 2N, D): rows dt | Bm | Cm
        fields = [
            _layer_norm(arrays, norm_mixer, "LN_1"),
            _layer_norm(arrays, norm_ssm, "LN_2"),
            w(dsm.lin.weight, "_T", _np(dsm.lin.weight).T,
              "DSM, input-major (W*D, D): row w*D + i is channel i of the token w places into the window"),
            w(ssm.in_proj.weight, "_T", _np(ssm.in_proj.weight).T, "in_proj, input-major (D, 2D): x | z"),
            w(ssm.x_proj.weight, "_T", _pad_columns(np.concatenate([x_proj[R:], x_proj[:R]]).T),
              f"x_proj, input-major (D, {_padded(R + 2 * N)}): Bm ({N}) | Cm ({N}) | dt ({R}) | zeros"),
            w(ssm.dt_proj.weight, "_T", _np(ssm.dt_proj.weight).T, "dt_proj, input-major (R, D)"),
            w(ssm.dt_proj.bias, "", _np(ssm.dt_proj.bias), "dt_proj bias (D,)"),
            # A = -exp(A_log) by torch in float32, exactly as the model computes it, stored (N, D).
            w(ssm.A_log, "_A_T", _np(-torch.exp(ssm.A_log)).T, "A = -exp(A_log), transposed (N, D)"),
            w(ssm.Dskip, "", _np(ssm.Dskip), "Dskip (D,)"),
            w(ssm.out_proj.weight, "_T", _np(ssm.out_proj.weight).T, "out_proj, input-major (D, D)"),
        ]
        layers.append("    {" + ", ".join(fields) + "}")
    ln_f = _layer_norm(arrays, model.ln_f, "ln_f")
    head = [w(model.action_head.weight, "_T", _pad_columns(_np(model.action_head.weight).T),
              f"action_head, input-major (D, {_padded(cfg.act_dim)}): the actions, then zeros"),
            w(model.action_head.bias, "", _pad_columns(_np(model.action_head.bias)[None])[0],
              f"action_head bias ({_padded(cfg.act_dim)},): the actions, then zeros")]
    aliases = dict(zip(("embed_action_w", "embed_action_b", "embed_return_w", "embed_return_b", "embed_state_w",
                        "embed_state_b", "head_w", "head_b"), (*embed, *head), strict=True))
    tables = [f"#define {alias} {target}" for alias, target in aliases.items()]
    tables.append(f"static const layer_norm_params embed_ln = {embed_ln};")
    tables.append(f"static const layer_norm_params ln_f = {ln_f};")
    tables.append("static const layer_params layers[N_LAYER] = {\n" + ",\n".join(layers) + "\n};")
    return "\n".join(arrays.chunks) + "\n" + "\n".join(tables)


def _fill(template: str, values: dict[str, str]) -> str:
    text = template
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    leftover = sorted(set(re.findall(r"@[A-Z_]+@", text)))
    if leftover:
        raise AssertionError(f"unfilled template fields {leftover}")
    return text


def generate_c_source(model: DecisionMetaMamba, manifest: Manifest, name: str, prefix: str | None = None) -> CSource:
    """NAME.c and NAME.h of ``model`` (eval mode) with the runtime figures of ``manifest`` (stream, batch 1).

    ``prefix``: the API's identifier prefix (default: from NAME, `c_identifier`).
    """
    if model.training:
        raise ValueError("the model is in training mode (dropout on); call model.eval() first")
    cfg = model.config
    check_export_name(name)  # a NAME that cannot leave a comment or #include string
    prefix = c_identifier(prefix if prefix is not None else name)
    values = {
        "NAME": name, "PREFIX": prefix, "PREFIX_UPPER": prefix.upper(),
        "GUARD": f"DMM_{prefix.upper()}_H", "CHECKPOINT_SHA": manifest.checkpoint_sha256[:16],
        "STACK_KB": str(STACK_KIB),
        "STATE_DIM": str(cfg.state_dim), "ACT_DIM": str(cfg.act_dim), "N_LAYER": str(cfg.n_layer),
        "D_MODEL": str(cfg.d_model), "D_STATE": str(cfg.d_state), "DT_RANK": str(cfg.dt_rank),
        "DSM_WINDOW": str(cfg.dsm_window), "X_PROJ_OUT": str(_padded(cfg.dt_rank + 2 * cfg.d_state)),
        "HEAD_OUT": str(_padded(cfg.act_dim)),
        "TARGET_RETURN": _double(manifest.target_return), "RTG_SCALE": _double(manifest.rtg_scale),
        "STATE_MEAN": ", ".join(_double(v) for v in manifest.state_mean),
        "STATE_STD": ", ".join(_double(v) for v in manifest.state_std),
        "ACTION_LOW": ", ".join(_hex_float(np.float32(v)) for v in manifest.action_low),
        "ACTION_HIGH": ", ".join(_hex_float(np.float32(v)) for v in manifest.action_high),
        **_limit_values(manifest),
    }
    header = _fill((TEMPLATE_DIR / "policy.h.in").read_text(), values)
    source = _fill((TEMPLATE_DIR / "policy.c.in").read_text(), {**values, "WEIGHTS": _weights(model)})
    return CSource(name=name, prefix=prefix, source=source, header=header)


def _limit_values(manifest: Manifest) -> dict[str, str]:
    """The template fields of the manifest's actuator limits (the action bounds alone when it has none)."""
    limits = ActuatorLimits.from_manifest(manifest)

    def floats(values) -> str:
        return ", ".join(_hex_float(np.float32(v)) for v in values)

    rate = limits.max_change is not None
    return {"LIMIT_LOWER": floats(limits.lower), "LIMIT_UPPER": floats(limits.upper),
            "LIMIT_MAX_CHANGE": floats(limits.max_change if rate else [0.0] * manifest.act_dim),
            "LIMIT_RAMP_START": floats(limits.start_action()), "LIMIT_RAMP_STEPS": f"{limits.ramp_steps}L",
            "LIMIT_RATE_LIMITED": "1" if rate else "0"}


def _refuse_foreign_manifest(manifest_path: Path) -> None:
    """NAME.json beside an ONNX export (hopper.onnx + hopper.json) must not be overwritten by a C export."""
    if not manifest_path.is_file():
        return
    try:
        existing = read_manifest(manifest_path)
    except DMMError:
        return  # not a readable manifest of ours: nothing to protect
    if existing.engine.get("target") != "c" and manifest_path.with_suffix(".onnx").is_file():
        raise DMMError(f"--out {str(manifest_path.with_suffix(''))!r}: {str(manifest_path)!r} is the manifest of "
                       f"{str(manifest_path.with_suffix('.onnx'))!r}", "a NAME of its own for the C export",
                       "pass another --out (e.g. hopper-c)")


def export_c_checkpoint(checkpoint_path: str | Path | None = None, *, out: str | Path | None = None,
                        runs_dir: str | Path = DEFAULT_RUNS_DIR, limits=None) -> tuple[Path, Path, Path]:
    """Export a checkpoint to NAME.c, NAME.h and the manifest NAME.json; returns their paths.

    checkpoint_path: a model.pt or its run directory (None: the newest model.pt under
    ``runs_dir``). out: NAME or NAME.c (default: the checkpoint's preset + "-c", e.g. "hopper-c",
    beside the ONNX export's hopper.onnx + hopper.json). The API prefix comes from NAME
    (--out hopper-v2: hopper_v2_), except for the default NAME, whose prefix is the preset's
    (hopper-c: hopper_, as in the README and examples/c_loop).
    Stream mode, fp32, batch 1. Needs a C compiler: the file is compiled and checked
    against PyTorch before it is written. limits: a `runtime.limits.LimitsOptions`: the actuator
    limits recorded in the manifest and compiled into the step (default: the action bounds alone).
    """
    source = Path(checkpoint_path) if checkpoint_path is not None else find_latest_checkpoint(runs_dir)
    checkpoint = load_checkpoint(source)
    if checkpoint.model_config.model != "dmm":
        raise DMMError(f"checkpoint {str(checkpoint.path)!r}: a {checkpoint.model_config.model!r} baseline",
                       "a 'dmm' checkpoint (cli.py train --model dmm)", "evaluate baselines with 'cli.py eval'")
    c_path, h_path = c_paths_for(out if out is not None else default_c_name(checkpoint.preset))
    check_export_name(c_path, ".c")  # the checkpoint's preset names the default: a file's word
    prefix = checkpoint.preset if c_path.stem == default_c_name(checkpoint.preset) else None
    # Held from before the source is generated and compiled: a second export to this NAME is refused at once.
    with export_lock(c_path):
        return _export_c_locked(checkpoint, c_path, h_path, prefix, limits)


def default_c_name(preset: str) -> str:
    """The NAME of ``export --target c`` without --out: hopper-c, apart from the ONNX export's hopper."""
    return f"{preset}-c"


def _export_c_locked(checkpoint, c_path: Path, h_path: Path, prefix: str | None,
                     limits=None) -> tuple[Path, Path, Path]:
    manifest_path = manifest_path_for(c_path)
    _refuse_foreign_manifest(manifest_path)
    model = checkpoint.model.eval()
    model.set_scan_impl("loop")  # the reference the parity figures are measured against
    base = build_manifest(checkpoint, mode="stream", precision="fp32", batch=1)
    if limits is not None and limits.given():
        base = dataclasses.replace(base, actuator_limits=limits.resolve(base).to_dict())
    generated = generate_c_source(model, base, c_path.stem, prefix)

    with tempfile.TemporaryDirectory(prefix="dmm-c-export-") as scratch:
        staged_c, staged_h = Path(scratch) / c_path.name, Path(scratch) / h_path.name
        staged_c.write_text(generated.source)
        staged_h.write_text(generated.header)
        library = NativeLibrary(build_policy_library(staged_c, staged_h), generated.prefix)
        parity = measure_parity(model, library.session(), mode="stream", batch=1,
                                rtg_start=float(checkpoint.target_returns[0]), rtg_scale=checkpoint.rtg_scale)
    if not np.isfinite(parity["max_abs"]) or parity["max_abs"] > PARITY_REFUSE_ABOVE:
        raise DMMError(f"parity: the generated C differs from PyTorch by {parity['max_abs']:.3g} on real-looking "
                       "inputs (nothing was written)", f"at most {PARITY_REFUSE_ABOVE:g}",
                       "report this bug in export/c_source.py (or check the checkpoint for non-finite weights)")
    parity = {**parity, "candidate": "the generated C, compiled with " + " ".join(compile_flags())}

    source_bytes, header_bytes = generated.source.encode(), generated.header.encode()
    manifest = dataclasses.replace(
        base, parity=parity,
        exporter={**base.exporter, "generator": GENERATOR},
        engine={
            "target": "c", "language": "C99", "source": c_path.name, "header": h_path.name,
            "symbol_prefix": generated.prefix,
            "source_sha256": sha256_bytes(source_bytes),
            "header_sha256": sha256_bytes(header_bytes),
        },
    )
    # One set: after a kill, the complete old or new export is on disk (never a new .c with an old manifest).
    atomic_write_set({h_path: header_bytes, c_path: source_bytes, manifest_path: manifest_bytes(manifest)},
                     set_name=c_path.stem)
    return c_path, h_path, manifest_path


def c_export_summary(c_path: Path, h_path: Path, manifest_path: Path) -> str:
    """One line for the CLI: what was written, and how it checked out."""
    manifest = read_manifest(manifest_path)
    limits = f"; {ActuatorLimits.from_manifest(manifest).summary()}" if manifest.actuator_limits else ""
    return (f"wrote {c_path} and {h_path} (C99, stream, fp32, API prefix {manifest.engine['symbol_prefix']}_, "
            f"C vs PyTorch max |diff| {manifest.parity['max_abs']:.1e}) and {manifest_path}{limits}")
