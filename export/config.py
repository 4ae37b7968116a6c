"""What ``cli.py export`` asks for: one dataclass whose fields carry the CLI's defaults and help."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from contract.errors import DMMError
from contract.manifest import MODES, PRECISIONS
from contract.names import check_export_name
from dmm_train.config import RUNS_DIR
from runtime.limits import limit_option_field, limits_options_of

DEFAULT_OPSET = 17
DEFAULT_RUNS_DIR = RUNS_DIR
TARGETS = ("onnx", "c")


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path | None = field(default=None, metadata={
        "help": "model.pt or its run directory (default: the newest model.pt under runs/)"})
    mode: str | None = field(default=None, metadata={
        "help": "window (the official sliding-window evaluation; the default) | stream (one step, explicit "
                "caches; the only mode of --target c)"})
    target: str = field(default="onnx", metadata={
        "help": "onnx: NAME.onnx; c: NAME.c + NAME.h, the stream step as one C99 file (fp32, batch 1; "
                "docs/c_target.md)"})
    out: Path | None = field(default=None, metadata={
        "help": "NAME: writes NAME.onnx (or NAME.c + NAME.h with --target c) and the manifest NAME.json "
                "(default: preset, mode and precision: hopper, hopper-fp16, hopper-int8, hopper-stream, ...)"})
    batch: int = field(default=1, metadata={"help": "static batch (1 for a control loop)"})
    opset: int = field(default=DEFAULT_OPSET, metadata={"help": "ONNX opset (17 or newer)"})
    precision: str = field(default="fp32", metadata={"help": "fp32 | fp16 | int8 (cli: --fp16, --int8)"})
    calibration: str | None = field(default=None, metadata={
        "help": "int8 range calibration: minmax | entropy | percentile (default percentile)"})
    calibration_samples: int | None = field(default=None, metadata={
        "help": "int8 calibration samples from the training dataset (default 512; stream: steps)"})
    dataset: str | None = field(default=None, metadata={
        "help": "the training dataset (directory or local Minari id): the graph's check inputs, and a low "
                "precision's calibration and held-out accuracy (default: the id the checkpoint records)"})
    max_score_drop: float | None = field(default=None, metadata={
        "help": "the closed-loop normalised score a precision may lose against fp32, in points; the graph passes "
                "only once the paired per-episode delta is shown no worse than -X (default 3 for fp16 and int8)"})
    score_episodes: int | None = field(default=None, metadata={
        "help": "the most closed-loop episodes per graph, paired by reset seed, played in batches until the gate "
                "decides (default 40)"})
    score_batch: int | None = field(default=None, metadata={
        "help": "paired episodes per look of the score gate (default 10)"})
    accept_inconclusive: bool | None = field(default=None, metadata={
        "help": "pass a graph the score gate could not judge at --score-episodes (recorded in the manifest)"})
    max_action_error: float | None = field(default=None, metadata={
        "help": "the largest action RMSE against fp32 on held-out inputs, as a fraction of the action range "
                "(default: fp16 0.01, int8 0.02); a graph beyond it is refused"})
    int8_target: float | None = field(default=None, metadata={
        "help": "--int8-layers auto keeps the most sensitive Linears in fp32 until the action RMSE is within this "
                "fraction of the action range (default 0.005, at most --max-action-error)"})
    int8_layers: str | None = field(default=None, metadata={
        "help": "which Linear layers --int8 quantizes: auto (the default: the ones the action error allows, the "
                "most sensitive stay fp32 until --int8-target is met) | all (every projection) | a "
                "comma-separated list of Linear names as the manifest names them (e.g. layer0/ssm/in_proj)"})
    build_engine: bool = field(default=True, metadata={
        "help": "where TensorRT and a GPU are present, build NAME.plan too"})
    runs_dir: Path = field(default=DEFAULT_RUNS_DIR, metadata={"help": "where the newest checkpoint is looked for"})
    # Limits at the actuator, recorded in the manifest (and compiled into the C step); runtime/limits.py.
    limits_file: Path | None = limit_option_field("limits_file")
    action_lower: str | None = limit_option_field("action_lower")
    action_upper: str | None = limit_option_field("action_upper")
    action_rate_limit: str | None = limit_option_field("action_rate_limit")
    ramp_steps: int | None = limit_option_field("ramp_steps")
    ramp_start: str | None = limit_option_field("ramp_start")

    # CLI flag of each precision option, for messages.
    PRECISION_FLAGS = {"calibration": "--calibration", "calibration_samples": "--calibration-windows",
                       "dataset": "--dataset", "max_score_drop": "--max-score-drop",
                       "score_episodes": "--score-episodes", "score_batch": "--score-batch",
                       "accept_inconclusive": "--accept-inconclusive", "max_action_error": "--max-action-error",
                       "int8_target": "--int8-target", "int8_layers": "--int8-layers"}

    @property
    def export_mode(self) -> str:
        """The mode to export: --mode, else stream for the C target and window for ONNX."""
        return self.mode or ("stream" if self.target == "c" else "window")

    def validate(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise DMMError(f"--mode {self.mode!r}", f"one of {', '.join(MODES)}", f"pass --mode {MODES[0]}")
        if self.target not in TARGETS:
            raise DMMError(f"--target {self.target!r}", f"one of {', '.join(TARGETS)}", f"pass --target {TARGETS[0]}")
        if self.out is not None:  # refused before any work: NAME becomes file names and generated code
            check_export_name(self.out, ".c" if self.target == "c" else ".onnx")
        if self.target == "c":
            chosen = {"--mode window": self.export_mode != "stream", "--batch": self.batch != 1,
                      "--opset": self.opset != DEFAULT_OPSET, "--fp16": self.precision == "fp16",
                      "--int8": self.precision == "int8",
                      **{flag: getattr(self, name) is not None for name, flag in self.PRECISION_FLAGS.items()}}
            given = [flag for flag, value in chosen.items() if value]
            if given:
                raise DMMError(f"{', '.join(given)} with --target c",
                               "none of them: the C target is the stream step in fp32 at batch 1",
                               "leave them out, or export ONNX")
        if self.precision not in PRECISIONS:
            raise DMMError(f"precision {self.precision!r}", f"one of {', '.join(PRECISIONS)}",
                           "pass --fp16 or --int8, or neither for fp32")
        if self.ramp_steps is not None and self.ramp_steps < 0:
            raise DMMError(f"--ramp-steps {self.ramp_steps}", "0 or more steps", "pass --ramp-steps 0 or more")
        given = [flag for name, flag in self.PRECISION_FLAGS.items() if getattr(self, name) is not None]
        low_precision_only = [flag for flag in given if flag != "--dataset"]  # fp32 checks its graph on it too
        if self.precision == "fp32" and low_precision_only:
            raise DMMError(f"{', '.join(low_precision_only)} without --fp16 or --int8",
                           "them only with a low precision, which they calibrate and judge",
                           "add --fp16 or --int8, or leave them out")
        for flag in ("--calibration", "--calibration-windows", "--int8-layers", "--int8-target"):
            if self.precision == "fp16" and flag in given:
                raise DMMError(f"{flag} with --fp16", "it only with --int8 (fp16 needs no calibration)",
                               f"leave {flag} out with --fp16")

    def limits_options(self):
        """The `runtime.limits.LimitsOptions` asked for (``given()`` False: the action bounds alone)."""
        return limits_options_of(self)

    def precision_options(self):
        """The `export.precision.PrecisionOptions` of a low-precision export (None for fp32)."""
        from export.precision import PrecisionOptions

        if self.precision == "fp32":  # only where the graph's check inputs come from
            return None if self.dataset is None else PrecisionOptions(dataset=self.dataset)

        chosen = {"calibration": self.calibration, "calibration_samples": self.calibration_samples,
                  "dataset": self.dataset, "max_score_drop": self.max_score_drop,
                  "score_episodes": self.score_episodes, "score_batch": self.score_batch,
                  "accept_inconclusive": self.accept_inconclusive, "max_action_error": self.max_action_error,
                  "int8_target": self.int8_target, "int8_layers": self.int8_layers}
        return PrecisionOptions(**{name: value for name, value in chosen.items() if value is not None})
