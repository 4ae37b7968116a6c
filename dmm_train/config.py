"""Configuration: environment presets, model config, train config, collect config.

One table of presets per environment (docs/model.md#training and docs/model.md#evaluation-protocol),
one frozen dataclass per stage. The CLI parses options into these and calls one
function; the checkpoint stores them, so later stages never re-read CLI flags.
Importable without torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.errors import DMMError
from contract.threads import check_threads

# Padding conventions of the official sampler (docs/model.md#sampler-and-padding).
ACTION_PAD_VALUE = -10.0  # left-padded actions in training windows; out of tanh's range on purpose
RTG_PAD_VALUE = 0.0
STATE_STD_EPS = 1e-6  # added to the dataset std before normalising
RUNS_DIR = Path("runs")  # training runs go to RUNS_DIR/<name> unless --out says otherwise
# Env reset seeds of evaluation episodes (episode i resets with BASE + i), in disjoint ranges so
# that a checkpoint is never chosen on the episodes it is reported on: training's periodic
# evaluation picks best.pt on the selection seeds; bench/quality.py reports on the report seeds
# (and `cli.py eval` / `run` start at 0 by default). Each range holds MAX_EVAL_EPISODES seeds.
REPORT_EVAL_SEED = 10_000
SELECTION_EVAL_SEED = 20_000
MAX_EVAL_EPISODES = 10_000
OFFICIAL_WARMUP_STEPS = 10_000  # the official warmup, at the official 100k-step budget
WARMUP_SHARE = 0.1  # the official warmup's share of that budget, kept by shorter runs


@dataclass(frozen=True)
class EnvPreset:
    """Everything that depends on the environment rather than on the run."""

    name: str = field(metadata={"help": "preset name (hopper, walker2d, ...; data: derived from a dataset)"})
    env_id: str | None = field(metadata={"help": "gymnasium id of the plant; None: no simulator"})
    state_dim: int = field(metadata={"help": "observation size S"})
    act_dim: int = field(metadata={"help": "action size Adim"})
    d_model: int = field(metadata={"help": "model width D"})
    target_returns: tuple[float, ...] = field(metadata={"help": "evaluation targets; the first is the default"})
    rtg_scale: float = field(default=1000.0, metadata={"help": "return-to-go divisor"})
    ref_min_score: float | None = field(default=0.0, metadata={
        "help": "D4RL random-policy return; None: scores are raw returns"})
    ref_max_score: float | None = field(default=1.0, metadata={"help": "D4RL expert return"})
    max_episode_steps: int = field(default=1000, metadata={"help": "episode cap of the plant"})
    share_dsm_across_layers: bool = field(
        default=False,
        metadata={"help": "official antmaze/kitchen quirk: one DSM shared by all layers"},
    )


# D4RL reference scores (random and expert returns) for the normalised score.
PRESETS: dict[str, EnvPreset] = {
    "hopper": EnvPreset(
        "hopper", "Hopper-v5", 11, 3, 64, (3600.0, 7200.0, 36000.0, 72000.0),
        ref_min_score=-20.272305, ref_max_score=3234.3,
    ),
    "walker2d": EnvPreset(
        "walker2d", "Walker2d-v5", 17, 6, 64, (5000.0, 10000.0, 50000.0, 100000.0),
        ref_min_score=1.629008, ref_max_score=4592.3,
    ),
    "halfcheetah": EnvPreset(
        "halfcheetah", "HalfCheetah-v5", 17, 6, 64, (12000.0, 24000.0, 120000.0, 240000.0),
        ref_min_score=-280.178953, ref_max_score=12135.0,
    ),
    # antmaze/kitchen: D=128 as in the official run.sh; their reward scale is 1, and
    # the official code shares one DSM across layers there (offered only explicitly).
    "antmaze": EnvPreset(
        "antmaze", "AntMaze_UMaze-v5", 27, 8, 128, (1.0,), rtg_scale=1.0,
        ref_min_score=0.0, ref_max_score=1.0, max_episode_steps=700,
    ),
    "kitchen": EnvPreset(
        "kitchen", "FrankaKitchen-v1", 59, 9, 128, (4.0,), rtg_scale=1.0,
        ref_min_score=0.0, ref_max_score=4.0, max_episode_steps=280,
    ),
}


# `train --preset` beyond the named presets: auto (the default) takes the preset whose env the
# dataset names, else derives one from the data; data always derives one (`derived_preset`).
AUTO_PRESET = "auto"
DATA_PRESET = "data"
DEFAULT_PRESET_NAME = "hopper"  # the embedded default dataset's preset
PRESET_CHOICES = (AUTO_PRESET, DATA_PRESET)
# A derived preset's width: the locomotion presets' D, which fits their 11-17 observation dims.
DERIVED_D_MODEL = 64
# Target returns a derived preset conditions on: the best episode's return (the default target),
# then these quantiles of the episode returns (docs/model.md#a-preset-from-the-data).
DERIVED_TARGET_QUANTILES = (0.75, 0.5)


def get_preset(name: str) -> EnvPreset:
    """Return the preset called ``name`` or raise a DMMError listing the known ones."""
    if name not in PRESETS:
        raise DMMError(f"unknown preset {name!r}", f"one of {', '.join(sorted(PRESETS))}",
                       fix="pass --preset with one of those names")
    return PRESETS[name]


def check_preset_choice(name: str) -> str:
    """``name`` if `train --preset` accepts it (a named preset, auto or data), else a DMMError."""
    if name not in PRESETS and name not in PRESET_CHOICES:
        raise DMMError(f"unknown preset {name!r}", f"one of {', '.join(sorted(PRESETS))}, auto (the preset "
                       "of the dataset's env, else one derived from the data) or data",
                       fix="pass --preset with one")
    return name


def preset_for_dataset(name: str, dataset) -> EnvPreset:
    """The preset a run of ``--preset name`` trains ``dataset`` (an `OfflineDataset`) with.

    A named preset is taken as named; ``data`` derives one from the dataset; ``auto`` takes the
    named preset whose env the dataset records, else derives one (a robot's logs name no env).
    """
    check_preset_choice(name)
    if name == AUTO_PRESET:
        # By the env's name without its version: Hopper-v4 data trains with the hopper preset (played in v5).
        matching = [preset for preset in PRESETS.values()
                    if dataset.env_id and _unversioned(preset.env_id) == _unversioned(dataset.env_id)]
        return matching[0] if matching else derived_preset(dataset)
    if name == DATA_PRESET:
        return derived_preset(dataset)
    return get_preset(name)


def _unversioned(env_id: str) -> str:
    return re.sub(r"-v\d+$", "", env_id)


def derived_preset(dataset) -> EnvPreset:
    """A preset from the data alone: dims from its arrays, the return scale and targets from its returns.

    rtg_scale is the power of ten at or below the largest |episode return| (hopper's 1000 for
    returns in the thousands), so the conditioning return is of order one, as with the named
    presets. The targets are the best episode's return (the default: ask for the best behaviour
    the data shows), then the DERIVED_TARGET_QUANTILES of the episode returns. No reference
    scores: a dataset of a robot's logs has no D4RL random and expert returns, so its scores
    are raw returns. The env id is the dataset's own, when it records one.
    """
    returns = dataset.episode_returns  # (E,)
    largest = float(np.max(np.abs(returns))) if returns.size else 0.0
    rtg_scale = 10.0 ** math.floor(math.log10(largest)) if largest > 0 else 1.0
    targets = [float(returns.max())] + [float(np.quantile(returns, q)) for q in DERIVED_TARGET_QUANTILES]
    unique_targets = tuple(dict.fromkeys(round(value, 6) for value in targets))
    return EnvPreset(
        DATA_PRESET, dataset.env_id or None, dataset.state_dim, dataset.act_dim, DERIVED_D_MODEL, unique_targets,
        rtg_scale=rtg_scale, ref_min_score=None, ref_max_score=None,
        max_episode_steps=max(len(episode) for episode in dataset.episodes),
    )


def run_name(preset: str, dataset: str | None) -> str:
    """The name of a run's default directory: the preset, else the preset the dataset's id names, else the id.

    ``auto`` and ``data`` are resolved from the loaded dataset only later; the directory is chosen
    before, from the id alone: the embedded default is hopper's, an id naming a preset word
    (``mujoco/hopper/medium-v0``) takes that preset's name, any other id its last part without
    the version (``robot/reacher-bag-v0`` -> ``reacher-bag``).
    """
    if preset not in PRESET_CHOICES:
        return preset
    if dataset is None:
        return DEFAULT_PRESET_NAME
    words = set(re.split(r"[/\\_.\-]+", dataset.lower()))
    named = [name for name in PRESETS if name in words]
    if preset == AUTO_PRESET and named:
        return named[0]
    last = re.sub(r"-v\d+$", "", Path(dataset.rstrip("/\\")).name) or "data"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", last).strip("-.") or "data"


# The policies one harness trains and evaluates (dmm_train/baselines.py has the baselines):
# dmm: Decision MetaMamba; dmamba: the paper's ablation, DMM without the DSM and with Mamba's
# depthwise conv back in the block; dt: Decision Transformer (kzl/decision-transformer);
# bc: an MLP on the normalised state.
MODEL_KINDS = ("dmm", "dmamba", "dt", "bc")

# What each kind changes in the preset's ModelConfig. DT follows kzl's experiment.py
# (K 20, embed_dim 128 for every env, 3 layers, 1 head); BC reads one state per window.
MODEL_KIND_OVERRIDES: dict[str, dict] = {
    "dmm": {},
    "dmamba": {},
    "dt": {"context_len": 20, "d_model": 128, "n_layer": 3},
    "bc": {"context_len": 1, "d_model": 256, "n_layer": 2},
}


def check_model_kind(model: str) -> str:
    """Return ``model`` if it is a known kind, else raise a DMMError listing the kinds."""
    if model not in MODEL_KINDS:
        raise DMMError(f"unknown model {model!r}", f"one of {', '.join(MODEL_KINDS)}", fix="pass --model with one")
    return model


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one policy (docs/model.md#symbols in brackets); DMM unless ``model`` says otherwise.

    d_model and n_layer mean the width and depth of whichever kind ``model`` names
    (for bc: the hidden width and the number of hidden layers).
    """

    state_dim: int = field(metadata={"help": "observation size [S]"})
    act_dim: int = field(metadata={"help": "action size [Adim]"})
    d_model: int = field(default=64, metadata={"help": "residual width [D] (bc: hidden width)"})
    n_layer: int = field(
        default=3, metadata={"help": "layers: DSM + Mamba (dmm), Mamba (dmamba), GPT blocks (dt), hidden (bc)"}
    )
    d_state: int = field(default=16, metadata={"help": "SSM state size per channel [N]"})
    dsm_window: int = field(default=6, metadata={"help": "DSM window in tokens [W]; 6 = two timesteps"})
    context_len: int = field(default=8, metadata={"help": "timesteps per window [K]; tokens L = 3K"})
    embed_dropout: float = field(
        default=0.1,
        metadata={"help": "dropout: after the embedding LayerNorm (dmm, dmamba: the only one); on embeddings, "
                          "attention and residuals (dt); after each hidden layer (bc)"},
    )
    per_layer_norms: bool = field(
        default=False,
        metadata={"help": "one LN_1/LN_2 per layer instead of the official shared pair"},
    )
    share_dsm_across_layers: bool = field(
        default=False,
        metadata={"help": "official antmaze/kitchen compatibility: one DSM for all layers (trainable here)"},
    )
    model: str = field(default="dmm", metadata={"help": "policy kind: dmm | dmamba | dt | bc"})
    conv_kernel: int = field(default=4, metadata={"help": "dmamba: depthwise causal conv width, Mamba's d_conv"})
    n_head: int = field(default=1, metadata={"help": "dt: attention heads"})
    max_ep_len: int = field(default=1000, metadata={"help": "dt: rows of the timestep embedding table"})

    @property
    def dt_rank(self) -> int:
        """[R] = ceil(D / 16), as in Mamba."""
        return math.ceil(self.d_model / 16)

    @property
    def n_tokens(self) -> int:
        """[L] = 3K tokens per window: (rtg, state, action) per timestep."""
        return 3 * self.context_len

    def validate(self) -> None:
        check_model_kind(self.model)
        for name in ("state_dim", "act_dim", "d_model", "n_layer", "d_state", "dsm_window", "context_len",
                     "conv_kernel", "n_head", "max_ep_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise DMMError(f"model config {name}={value!r}", "a positive integer",
                               fix=f"set {name} to 1 or more")
        if not 0.0 <= self.embed_dropout < 1.0:
            raise DMMError(f"model config embed_dropout={self.embed_dropout!r}", "a value in [0, 1)",
                           fix="set embed_dropout to at least 0 and below 1")
        if self.d_model % self.n_head:
            raise DMMError(f"model config d_model={self.d_model} with n_head={self.n_head}",
                           "d_model divisible by n_head", fix="set d_model to a multiple of n_head")

    @classmethod
    def from_preset(cls, preset: EnvPreset, model: str = "dmm", **overrides) -> ModelConfig:
        """The config of kind ``model`` for ``preset``: the preset's dims, the kind's overrides, then ``overrides``."""
        config = cls(
            state_dim=preset.state_dim,
            act_dim=preset.act_dim,
            d_model=preset.d_model,
            # The shared-DSM quirk belongs to DMM's official code; no other kind has a DSM.
            share_dsm_across_layers=preset.share_dsm_across_layers and model == "dmm",
            model=check_model_kind(model),
            # DT's timestep table covers the plant's longest episode (kzl: max_ep_len 1000 for gym).
            max_ep_len=preset.max_episode_steps,
        )
        return dataclasses.replace(config, **{**MODEL_KIND_OVERRIDES[model], **overrides})


@dataclass(frozen=True)
class TrainConfig:
    """Official DMM training hyperparameters (docs/model.md#training), the same for every model kind."""

    preset: str = field(default=AUTO_PRESET, metadata={
        "help": "environment preset: hopper, walker2d, ...; auto (default): the dataset's env's preset, else one "
                "derived from the data; data: always derived (dims, return scale and targets from its episodes)"})
    model: str = field(default="dmm", metadata={"help": "policy kind: dmm | dmamba | dt | bc (MODEL_KINDS)"})
    dataset: str | None = field(default=None, metadata={"help": "Minari id or path; None = embedded default"})
    steps: int = field(default=100_000, metadata={"help": "gradient steps"})
    batch_size: int = field(default=64, metadata={"help": "windows per step"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay, on every parameter"})
    warmup_steps: int | None = field(default=None, metadata={
        "help": "linear warmup in (global) steps, then constant (default: min(10000, 10% of --steps))"})
    grad_clip: float = field(default=0.25, metadata={"help": "max global grad norm"})
    seed: int = field(default=0, metadata={"help": "seeds torch, numpy and the sampler"})
    eval_every: int = field(default=10_000, metadata={"help": "steps between evaluations; 0 = only at the end"})
    eval_episodes: int = field(default=10, metadata={
        "help": "episodes per periodic evaluation at the first target, env seeds 20000 + i; best.pt is "
                "the checkpoint that scores best on them (0 = no evaluation, no best.pt)"})
    report_episodes: int = field(default=0, metadata={
        "help": "also evaluate every target at each periodic evaluation, this many episodes on the report "
                "seeds 10000 + i, recorded in metrics.jsonl (bench/quality.py's official number; 0 = no)"})
    checkpoint_every: int = field(default=1_000, metadata={"help": "steps between resumable checkpoints"})
    checkpoint_minutes: float = field(default=5.0, metadata={
        "help": "also a resumable checkpoint at least this often, in minutes, however slow the steps "
                "(0 = by steps only)"})
    scan: str = field(default="auto", metadata={"help": "selective-scan implementation: auto | fused | loop"})
    device: str = field(default="cpu", metadata={"help": "torch device (under torchrun, cuda = each rank's GPU)"})
    emulate_ranks: int = field(default=1, metadata={
        "help": "one process plays N ranks in turn (gradient accumulation over their shards of the batch): the "
                "windows, dropout and parameters of an N-rank torchrun run, up to float rounding"})
    threads: int | None = field(default=None, metadata={
        "help": "torch and scan-kernel threads (default: the cores free at start, contract/threads.py; a run "
                "resumes with the count its command gives)"})
    dist_timeout_s: float = field(default=1800.0, metadata={
        "help": "under torchrun: seconds a rank waits for the others before the job fails; must exceed one "
                "periodic evaluation, which rank 0 runs while the others wait"})

    def resolved_warmup(self) -> int:
        """The warmup in steps: ``warmup_steps``, else min(the official 10k, 10% of ``steps``)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(OFFICIAL_WARMUP_STEPS, int(self.steps * WARMUP_SHARE))

    def validate(self) -> None:
        check_preset_choice(self.preset)
        check_model_kind(self.model)
        positive = {
            "steps": self.steps, "batch_size": self.batch_size,
            "checkpoint_every": self.checkpoint_every, "emulate_ranks": self.emulate_ranks,
        }
        for name, value in positive.items():
            if value < 1:
                option = f"--{name.replace('_', '-')}"
                raise DMMError(f"{option} {value}", "a positive integer", fix=f"pass {option} 1 or more")
        if self.eval_every < 0 or self.eval_episodes < 0 or self.report_episodes < 0 or self.resolved_warmup() < 0:
            raise DMMError(
                f"eval_every={self.eval_every}, eval_episodes={self.eval_episodes}, "
                f"report_episodes={self.report_episodes}, warmup_steps={self.warmup_steps}",
                "non-negative integers", fix="pass 0 or more for each of them"
            )
        if max(self.eval_episodes, self.report_episodes) > MAX_EVAL_EPISODES:
            raise DMMError(
                f"eval_episodes={self.eval_episodes}, report_episodes={self.report_episodes}",
                f"at most {MAX_EVAL_EPISODES} each, so the selection and report seed ranges stay disjoint",
                fix=f"pass --eval-episodes and --report-episodes of {MAX_EVAL_EPISODES} or fewer"
            )
        if not self.checkpoint_minutes >= 0:  # also refuses NaN
            raise DMMError(f"--checkpoint-minutes {self.checkpoint_minutes}",
                           "a non-negative number of minutes (0 = checkpoints by steps only)",
                           fix="pass --checkpoint-minutes 0 or more")
        if not self.dist_timeout_s > 0:
            raise DMMError(f"--dist-timeout {self.dist_timeout_s}", "a positive number of seconds",
                           fix="pass --dist-timeout above 0")
        if self.learning_rate <= 0 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise DMMError(
                f"learning_rate={self.learning_rate}, grad_clip={self.grad_clip}, weight_decay={self.weight_decay}",
                "positive lr and clip, non-negative decay",
                fix="pass a learning rate and grad clip above 0 and a weight decay of 0 or more"
            )
        if self.threads is not None:
            check_threads(self.threads)
        if self.scan not in ("auto", "fused", "loop"):
            raise DMMError(f"scan={self.scan!r}", "auto, fused or loop", fix="pass --scan auto, fused or loop")

    def run_dir(self) -> Path:
        """The default run directory: runs/<name>-seed<S> (runs/<name>-<model>-seed<S> for a baseline), `run_name`."""
        kind = "" if self.model == "dmm" else f"-{self.model}"
        name = f"{run_name(self.preset, self.dataset)}{kind}-seed{self.seed}"
        return RUNS_DIR / name


@dataclass(frozen=True)
class CollectConfig:
    """What ``cli.py collect`` asks for: embedded recipes, or custom rollouts of a policy."""

    recipes: tuple[str, ...] = field(default=(), metadata={
        "help": "embedded dataset to regenerate (repeatable; default: every one this checkout ships)"})
    steps: int | None = field(default=None, metadata={"help": "rollout budget per policy (default: the recipe's)"})
    seed: int = field(default=0, metadata={"help": "seed of the env resets and the action noise"})
    out: Path | None = field(default=None, metadata={"help": "Minari store to write into (default: the local one)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing dataset of the same id"})
    policy: str | None = field(default=None, metadata={"help": "custom rollouts: 'random' or a behaviour-policy .npz"})
    episodes: int | None = field(default=None, metadata={"help": "custom rollouts: episodes to roll out (default 100)"})
    dataset_id: str | None = field(default=None, metadata={
        "help": "custom rollouts: Minari id to write (namespace/name-vN)"})
    preset: str = field(default="hopper", metadata={"help": "custom rollouts: environment preset"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})
    workers: int | None = field(default=None, metadata={
        "help": "processes rolling a recipe out (default: one per CPU core, at most 4, from 50k steps; "
                "the data is the same for any number)"})

    DEFAULT_EPISODES = 100

    @property
    def custom(self) -> bool:
        return self.policy is not None or self.episodes is not None or self.dataset_id is not None

    def validate(self) -> None:
        if self.custom and self.recipes:
            raise DMMError(f"--recipe {' '.join(self.recipes)} with --policy/--episodes/--dataset-id",
                           "either a recipe or custom rollouts, not both",
                           fix="leave out --recipe, or leave out --policy/--episodes/--dataset-id")
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps < 1):
            raise DMMError(f"--steps {self.steps!r}", "a positive integer", fix="pass --steps 1 or more")
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise DMMError(f"--workers {self.workers!r}", "a positive integer", fix="pass --workers 1 or more")
        if self.custom:
            get_preset(self.preset)
            if self.episodes is not None and self.episodes < 1:
                raise DMMError(f"--episodes {self.episodes}", "at least 1", fix="pass --episodes 1 or more")
            if self.policy not in (None, "random") and not str(self.policy).endswith(".npz"):
                raise DMMError(f"--policy {self.policy!r}", "'random' or a behaviour-policy .npz file",
                               fix="pass --policy random or the path of a .npz policy")


@dataclass(frozen=True)
class EvalConfig:
    """What ``cli.py eval`` asks for (the official sliding-window protocol, docs/model.md#evaluation-protocol)."""

    checkpoint: Path = field(metadata={"help": "model.pt or its run directory"})
    episodes: int = field(default=10, metadata={"help": "episodes per target"})
    targets: tuple[float, ...] = field(default=(), metadata={"help": "target return (repeatable; default: all)"})
    seed: int = field(default=0, metadata={"help": "reset seed of the first episode"})
    device: str = field(default="cpu", metadata={"help": "torch device"})

    # The episodes run side by side, one env and one (episodes, 1001, S) buffer row each: bounded
    # before anything is allocated.
    MAX_EPISODES = 1000

    def validate(self) -> None:
        if self.episodes < 1:
            raise DMMError(f"--episodes {self.episodes}", "at least 1", fix="pass --episodes 1 or more")
        if self.episodes > self.MAX_EPISODES:
            raise DMMError(f"--episodes {self.episodes}",
                           f"at most {self.MAX_EPISODES} (they run side by side, one env each)",
                           fix="pass fewer, or run eval several times with other --seed")
