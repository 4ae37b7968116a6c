"""What ``cli.py export`` asks for: one dataclass whose fields carry the CLI's defaults and help."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from contract.errors import DMMError
from contract.manifest import MODES, PRECISIONS
from dmm_train.config import RUNS_DIR

DEFAULT_OPSET = 17
DEFAULT_RUNS_DIR = RUNS_DIR


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path | None = field(default=None, metadata={
        "help": "model.pt or its run directory (default: the newest model.pt under runs/)"})
    mode: str = field(default="window", metadata={
        "help": "window (the official sliding-window evaluation) | stream (one step, explicit caches)"})
    out: Path | None = field(default=None, metadata={
        "help": "NAME: writes NAME.onnx and the manifest NAME.json (default: preset, mode and precision: hopper, "
                "hopper-fp16, hopper-int8, hopper-stream, hopper-stream-fp16, ...)"})
    batch: int = field(default=1, metadata={"help": "static batch (1 for a control loop)"})
    opset: int = field(default=DEFAULT_OPSET, metadata={"help": "ONNX opset (17 or newer)"})
    precision: str = field(default="fp32", metadata={"help": "fp32 | fp16 | int8 (cli: --fp16, --int8)"})
    calibration: str | None = field(default=None, metadata={
        "help": "int8 range calibration: minmax | entropy | percentile (default percentile)"})
    calibration_samples: int | None = field(default=None, metadata={
        "help": "int8 calibration samples from the training dataset (default 512; stream: steps)"})
    dataset: str | None = field(default=None, metadata={
        "help": "the training dataset (directory or local Minari id) for calibration and the held-out accuracy "
                "(default: the id the checkpoint records)"})
    max_score_drop: float | None = field(default=None, metadata={
        "help": "fail when the closed-loop normalised score drops significantly by more than this many points "
                "against fp32: the whole 95% interval of the paired per-episode delta below -X (default: fp16 1, "
                "int8 3)"})
    score_episodes: int | None = field(default=None, metadata={
        "help": "closed-loop episodes per graph for the accuracy report, paired by reset seed (default 5)"})
    build_engine: bool = field(default=True, metadata={
        "help": "where TensorRT and a GPU are present, build NAME.plan too"})
    runs_dir: Path = field(default=DEFAULT_RUNS_DIR, metadata={"help": "where the newest checkpoint is looked for"})

    # CLI flag of each precision option, for messages.
    PRECISION_FLAGS = {"calibration": "--calibration", "calibration_samples": "--calibration-windows",
                       "dataset": "--dataset", "max_score_drop": "--max-score-drop",
                       "score_episodes": "--score-episodes"}

    def validate(self) -> None:
        if self.mode not in MODES:
            raise DMMError(f"--mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.precision not in PRECISIONS:
            raise DMMError(f"precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        given = [flag for name, flag in self.PRECISION_FLAGS.items() if getattr(self, name) is not None]
        if self.precision == "fp32" and given:
            raise DMMError(f"{', '.join(given)} without --fp16 or --int8; expected them only with a low "
                           "precision, which they calibrate and judge")
        for flag in ("--calibration", "--calibration-windows"):
            if self.precision == "fp16" and flag in given:
                raise DMMError(f"{flag} with --fp16; expected it only with --int8 (fp16 needs no calibration)")

    def precision_options(self):
        """The `export.precision.PrecisionOptions` of a low-precision export (None for fp32)."""
        if self.precision == "fp32":
            return None
        from export.precision import PrecisionOptions

        chosen = {"calibration": self.calibration, "calibration_samples": self.calibration_samples,
                  "dataset": self.dataset, "max_score_drop": self.max_score_drop,
                  "score_episodes": self.score_episodes}
        return PrecisionOptions(**{name: value for name, value in chosen.items() if value is not None})
