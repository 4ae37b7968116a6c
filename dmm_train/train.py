"""The training loop: official DMM hyperparameters, progress, periodic evaluation,
atomic checkpoints and exact resume, for every model kind (``TrainConfig.model``), in one
process or on several under torchrun (DistributedDataParallel, `dmm_train.distributed`).

A run directory holds:
- model.pt / model.json: the latest weights and everything later stages need;
- best.pt / best.json: with periodic evaluation, the checkpoint that scored best on the
  selection episodes (env seeds SELECTION_EVAL_SEED + i, disjoint from the report seeds);
- resume.pt: the full training state (written every ``checkpoint_every`` steps, at least every
  ``checkpoint_minutes`` and at every evaluation), every rank's sampler and RNG state included;
- metrics.jsonl: one JSON record per logged step or evaluation;
- training.png: loss and score curves.

Several ranks: ``--batch-size`` is the global batch; each rank draws batch / ranks windows
from its own streams (`distributed.rank_seed`) and the loss is the masked MSE over the whole
global batch (each rank's sum of squared errors over the global count of real steps), so a
W-rank run takes the same steps as one process given the union of the ranks' windows, which
``emulate_ranks`` does: one process plays the W ranks in turn, with their streams. Rank 0 alone
reads and writes the run directory, evaluates and prints. A run resumes only with the world
size it was trained with: the resume point holds one sampler and RNG state per rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from contract.errors import DMMError, check_dims
from contract.files import directory_lock
from dmm_train import distributed
from dmm_train.baselines import build_policy, policy_actions, set_scan_impl
from dmm_train.checkpoint import (
    BEST_STEM,
    MODEL_FILE,
    RESUME_FILE,
    atomic_torch_save,
    atomic_write_bytes,
    checkpoint_metadata,
    load_plain_data,
    policy_facts,
    save_model,
)
from dmm_train.config import (
    DEFAULT_PRESET_NAME,
    PRESET_CHOICES,
    REPORT_EVAL_SEED,
    SELECTION_EVAL_SEED,
    ModelConfig,
    TrainConfig,
    preset_for_dataset,
)
from dmm_train.distributed import RankContext
from dmm_train.progress import Progress
from dmm_train.threads import setup_threads

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"
# Under torchrun the ranks agree on a time-based resume point every this many steps (one all-reduce of a
# flag): each rank's clock differs, and a resume point is a collective.
TIME_CHECK_STEPS = 10


def masked_action_loss(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over the non-padded positions. predicted, target: (B, K, Adim); mask: (B, K) in {0, 1}."""
    squared = (predicted - target).pow(2).mean(-1)  # (B, K)
    return (squared * mask).sum() / mask.sum().clamp_min(1.0)


def batch_to_tensors(batch, device: str) -> dict[str, torch.Tensor]:
    return {
        name: torch.from_numpy(np.ascontiguousarray(getattr(batch, name))).to(device)
        for name in ("states", "actions", "rtg", "mask", "timesteps")
    }


def make_optimizer(model: torch.nn.Module, config: TrainConfig):
    """AdamW on every parameter (official: no exclusions) and linear warmup then constant."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=True
    )
    warmup = max(config.resolved_warmup(), 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / warmup, 1.0))
    return optimizer, scheduler


def train_step(model, optimizer, scheduler, batch: dict[str, torch.Tensor], grad_clip: float) -> float:
    """One gradient step on a batch of windows; returns the loss."""
    predicted = policy_actions(
        model, batch["states"], batch["actions"], batch["rtg"], batch.get("timesteps"), batch["mask"]
    )  # (B, K, Adim)
    loss = masked_action_loss(predicted, batch["actions"], batch["mask"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def sharded_train_step(network, optimizer, scheduler, batches: list[dict[str, torch.Tensor]], grad_clip: float,
                       context: RankContext, shard_rng: list[dict] | None = None) -> float:
    """One gradient step on a global batch of which this process holds ``batches`` (one per rank it plays).

    The loss is the masked MSE over the global batch: each shard's sum of squared errors over
    the count of real steps in every shard of every rank. Under DDP (one shard per process) the
    gradients are averaged over the ranks, hence the factor world_size; when one process plays
    several ranks (``shard_rng``: each one's torch RNG state, swapped in for its forward so its
    dropout is that rank's) the shards' gradients accumulate. Returns the global loss.
    """
    real_steps = torch.stack([batch["mask"].sum() for batch in batches]).sum()  # () this process's shards
    optimizer.zero_grad(set_to_none=True)
    if context.distributed:
        (batch,) = batches
        predicted = policy_actions(
            network, batch["states"], batch["actions"], batch["rtg"], batch.get("timesteps"), batch["mask"]
        )  # (B / W, K, Adim)
        error_sum = masked_error_sum(predicted, batch["actions"], batch["mask"])
        totals = distributed.all_reduce_sum(context, torch.stack([error_sum.detach(), real_steps]))  # (2,)
        global_steps = totals[1].clamp_min(1.0)
        (error_sum / global_steps * context.world_size).backward()
        loss = totals[0] / global_steps
    else:
        global_steps = real_steps.clamp_min(1.0)
        loss = torch.zeros((), device=real_steps.device)
        for index, batch in enumerate(batches):
            _set_torch_rng(shard_rng[index])
            predicted = policy_actions(
                network, batch["states"], batch["actions"], batch["rtg"], batch.get("timesteps"), batch["mask"]
            )  # (B / W, K, Adim)
            error_sum = masked_error_sum(predicted, batch["actions"], batch["mask"])
            (error_sum / global_steps).backward()
            shard_rng[index] = _torch_rng(batch["mask"].device)
            loss = loss + error_sum.detach()
        loss = loss / global_steps
    torch.nn.utils.clip_grad_norm_(network.parameters(), grad_clip, foreach=True)
    optimizer.step()
    scheduler.step()
    return float(loss)


def masked_error_sum(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the non-padded positions of the per-position MSE (the numerator of masked_action_loss)."""
    return ((predicted - target).pow(2).mean(-1) * mask).sum()  # ()


def _torch_rng(device: torch.device | str) -> dict:
    """The torch RNG state dropout draws from: the CPU generator, and the device's on CUDA."""
    state = {"torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_torch_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


def _fresh_torch_rng(seed: int, device: torch.device | str) -> dict:
    """The torch RNG state right after seeding with ``seed``; the current state is left as it was."""
    saved = _torch_rng(device)
    torch.manual_seed(seed)
    fresh = _torch_rng(device)
    _set_torch_rng(saved)
    return fresh


def _rng_state(device: torch.device | str = "cpu") -> dict:
    """Every RNG's state as plain data (tensors, lists, numbers, strings): a resume point loads without code."""
    name, key, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        **_torch_rng(device),
        "numpy": [str(name), [int(v) for v in key], int(position), int(has_gauss), float(gauss)],
        "python": [int(version), [int(v) for v in internal], gauss_next],
    }


def _set_rng_state(state: dict) -> None:
    _set_torch_rng(state)
    # Resume points written before the states were plain data hold numpy's key as a uint32 array and
    # Python's state as tuples; both forms are restored alike.
    name, key, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _rank_states(resume_state: dict) -> list[dict]:
    """Every rank's sampler and RNG state (a resume point of a one-process run before ranks existed has one)."""
    if "rank_states" in resume_state:
        return resume_state["rank_states"]
    return [{"sampler_state": resume_state["sampler_state"], "rng_state": resume_state["rng_state"]}]


class RunClock:
    """Training and evaluation wall time of a run over all its sessions, kept in the resume point.

    A killed session's time after its last resume point is lost with the steps it redoes, so
    the steps are not counted twice. Evaluation time is kept apart from the training time.
    """

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.base_train = float(state.get("train_seconds", 0.0))
        self.eval_seconds = float(state.get("eval_seconds", 0.0))
        self.session_start = time.perf_counter()
        self.session_eval = 0.0

    def add_eval(self, seconds: float) -> None:
        self.eval_seconds += seconds
        self.session_eval += seconds

    def train_seconds(self) -> float:
        return self.base_train + time.perf_counter() - self.session_start - self.session_eval

    def state(self) -> dict:
        return {"train_seconds": self.train_seconds(), "eval_seconds": self.eval_seconds}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_dataset(spec: str | None, progress: bool = True, preset: str = DEFAULT_PRESET_NAME):
    """Load the dataset named by ``spec``, or the embedded default of ``preset`` (generated on first use)."""
    from dmm_train.minari_reader import load_dataset
    from dmm_train.recipes import ensure_default_dataset

    if spec is None:
        spec = str(ensure_default_dataset(DEFAULT_PRESET_NAME if preset in PRESET_CHOICES else preset,
                                          progress=progress))
    return load_dataset(spec)


# The policy's tanh head acts in [-1, 1]; logged actions beyond it (by more than float rounding)
# could never be imitated.
ACTION_BOUND_TOLERANCE = 1e-6


def _check_actions_in_range(dataset) -> None:
    actions = np.concatenate([e.actions for e in dataset.episodes])  # (N, Adim)
    low, high = float(actions.min()), float(actions.max())
    if low < -1.0 - ACTION_BOUND_TOLERANCE or high > 1.0 + ACTION_BOUND_TOLERANCE:
        raise DMMError(
            f"dataset {dataset.dataset_id!r} actions in [{low:.4g}, {high:.4g}]",
            "[-1, 1], the range of the policy's tanh head",
            fix="rescale the actions to [-1, 1] when importing them (and scale the policy's actions back on the robot)")


def _check_dataset_matches(dataset, preset) -> None:
    check_dims(f"dataset {dataset.dataset_id!r}", (dataset.state_dim, dataset.act_dim),
               (preset.state_dim, preset.act_dim), f"preset {preset.name!r}",
               "pass the --preset that matches the dataset's environment")


RESUME_KEYS = ("train_config", "dataset_hash", "model_state", "optimizer_state", "scheduler_state", "step")


def load_resume_point(path: Path) -> dict:
    """resume.pt, checked to be a resume point of this trainer; a damaged one is one DMMError."""
    state = load_plain_data(path, "resume point", "start a new run (the run's model.pt is kept)", legacy_numpy=True)
    missing = [key for key in RESUME_KEYS if not isinstance(state, dict) or key not in state]
    if isinstance(state, dict) and "rank_states" not in state:  # a one-process point from before ranks
        missing += [key for key in ("sampler_state", "rng_state") if key not in state]
    if missing:
        raise DMMError(f"resume point {str(path)!r} lacks {', '.join(missing)}", "the resume.pt 'cli.py train' writes",
                       fix="start a new run in another --out")
    return state


def _read_metrics(path: Path) -> list[dict]:
    """The run's metrics log; a last line cut by a kill is dropped, anything else damaged is refused."""
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        lines = None
    records = []
    for index, line in enumerate(lines or ()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if index == len(lines) - 1:
                break  # a line cut by a kill
            record = None
        if not isinstance(record, dict) or "step" not in record:
            lines = None
            break
        records.append(record)
    if lines is None:
        raise DMMError(f"training log {str(path)!r} is damaged or another file", "a metrics.jsonl of 'cli.py train'",
                       fix="move it away to resume (the log restarts), or start a new run")
    return records


def _write_metrics(path: Path, records: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def plot_metrics(records: list[dict], path: Path) -> None:
    """Loss and normalised score against step, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    score_points = [(r["step"], r["normalized_mean"]) for r in records if "normalized_mean" in r]
    figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(10, 4))
    if loss_points:
        loss_axis.plot(*zip(*loss_points, strict=True))
    loss_axis.set(xlabel="step", ylabel="action MSE", title="training loss", yscale="log")
    if score_points:
        score_axis.plot(*zip(*score_points, strict=True), marker="o")
    score_axis.set(xlabel="step", ylabel="normalised score", title="evaluation (first target)")
    figure.tight_layout()
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log_every: int = 100,
    on_step: Callable[[int], None] | None = None,
    report: Callable[[str], None] | None = None,
) -> Path | None:
    """Train a policy of the kind ``config.model`` (DMM by default); returns the path of model.pt.

    Under torchrun every rank calls this; rank 0 returns the path and the other ranks, which
    write nothing, return None. ``on_step(step)`` is called on every rank after each step.
    ``report(line)`` receives rank 0's outcome: what was written, or that the run was already finished.
    """
    config.validate()
    context = distributed.start(config.device, config.dist_timeout_s)
    try:
        # One process writes a run directory (rank 0; the other ranks write nothing).
        with directory_lock(out_dir) if context.is_main else contextlib.nullcontext():
            return _train(config, Path(out_dir), context, resume=resume, progress=progress and context.is_main,
                          log_every=log_every, on_step=on_step, report=report)
    except BaseException as error:
        if context.owns_group:
            # The failed run's frames hold the DistributedDataParallel wrapper, which holds the process
            # group: without their locals, `stop` can end the group (and its threads) before the exit.
            traceback.clear_frames(error.__traceback__)
        if isinstance(error, distributed.process_group_error_types()):
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DMMError(
                f"rank {context.rank} of {context.world_size}: the process group failed ({message})",
                "every rank to keep training",
                fix="look above for the error of the rank that stopped first (it probably caused this)"
            ) from None
        raise
    finally:
        distributed.stop(context)


def _prepare_run(config: TrainConfig, out_dir: Path, context: RankContext, resume: bool):
    """Rank 0's look at the run directory: (the run's config, its resume state or None)."""
    resume_path = out_dir / RESUME_FILE
    if resume and not resume_path.exists():
        raise DMMError(f"--resume given but {str(resume_path)!r} does not exist",
                       "a run directory written by 'cli.py train'", fix="drop --resume to start a new run")
    if not resume and (out_dir / MODEL_FILE).exists():
        raise DMMError(f"--out {str(out_dir)!r} already holds a model.pt", "a new run directory, or --resume",
                       fix="pass --resume to continue it or choose another --out")
    resume_state = load_resume_point(resume_path) if resume else None
    if resume_state is not None:
        trained_on = int(resume_state.get("world_size", 1))
        if trained_on != context.world_size:
            how = "torchrun with --nnodes x --nproc_per_node" if trained_on > 1 else "one process (no torchrun)"
            raise DMMError(
                f"the run in {str(out_dir)!r} was trained on {trained_on} rank(s) and this job has "
                f"{context.world_size}",
                "the same world size, since its resume point holds one sampler and RNG state per rank",
                fix=f"resume it with {how} = {trained_on}, or start a new run"
            )
        # The run's own config wins: resuming with other hyperparameters would not be "exact".
        saved = TrainConfig(**resume_state["train_config"])
        # How often to save changes no result: this command's choice applies.
        config = dataclasses.replace(saved, steps=config.steps, dist_timeout_s=config.dist_timeout_s,
                                     checkpoint_minutes=config.checkpoint_minutes)
        config.validate()
    else:
        config = dataclasses.replace(config, warmup_steps=config.resolved_warmup())
    if config.emulate_ranks > 1 and context.distributed:
        raise DMMError(f"--emulate-ranks {config.emulate_ranks} under torchrun ({context.world_size} ranks)",
                       "--emulate-ranks only in one process, which then plays every rank",
                       fix="drop --emulate-ranks, or run in one process without torchrun")
    distributed.split_batch(config.batch_size, context.world_size * config.emulate_ranks)
    return config, resume_state


def _train(config: TrainConfig, out_dir: Path, context: RankContext, *, resume: bool, progress: bool,
           log_every: int, on_step: Callable[[int], None] | None,
           report: Callable[[str], None] | None) -> Path | None:
    # Set-up: the run's config (its own when resumed), the data, the threads, the learner and the run's records.
    requested_threads = config.threads  # this command's --threads (None: choose)
    config, resume_state = distributed.on_main(context, lambda: _prepare_run(config, out_dir, context, resume))
    dataset = _load_dataset(config, out_dir, context, resume_state, progress)
    preset = preset_for_dataset(config.preset, dataset)
    training_dataset, heldout = _hold_out(config, dataset, preset)
    config = _choose_threads(config, requested_threads, resume_state, progress)
    learner = Learner(config, preset, training_dataset, context)
    step = 0
    if resume_state is not None:
        learner.restore(resume_state)
        step = int(resume_state["step"])
    run = TrainingRun(config, out_dir, context, learner, dataset=dataset, preset=preset, heldout=heldout,
                      resume_state=resume_state, progress=progress, log_every=log_every)
    learner.distribute()
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # A resume point at the last step is written after the final evaluation: such a run is finished.
    finished = resume_state is not None and step >= config.steps
    run.begin(step, finished)
    try:
        learner.model.train()
        loss = float("nan")
        while step < config.steps:
            loss = learner.gradient_step()
            _require_finite(loss, step + 1, context)
            step += 1
            run.after_step(step, loss)
            if on_step is not None:
                on_step(step)
        if not finished:
            run.finish(step, loss)
    except KeyboardInterrupt:
        run.tracker.close()
        # What the file holds, not what the run last finished saving: an interrupt can land between the resume
        # point's rename and the bookkeeping after it.
        kept = _step_on_disk(out_dir / RESUME_FILE) if context.is_main else None
        raise _interrupted_error(step, run.kept_step if kept is None else kept, out_dir, config) from None
    if not context.is_main:
        return None
    if finished:  # nothing was trained or written
        if report is not None:
            report(f"{out_dir} already finished at step {step}; nothing to do (pass a larger --steps with "
                   "--resume to train further)")
        return out_dir / MODEL_FILE
    plot_metrics(run.records, out_dir / PLOT_FILE)
    if report is not None:
        report(f"wrote {out_dir / MODEL_FILE}")
    return out_dir / MODEL_FILE


def _load_dataset(config: TrainConfig, out_dir: Path, context: RankContext, resume_state: dict | None,
                  progress: bool):
    """The run's dataset on every rank, checked against the preset, the resume point and rank 0's copy."""

    def load_here():
        dataset = resolve_dataset(config.dataset, progress=progress, preset=config.preset)
        _check_dataset_matches(dataset, preset_for_dataset(config.preset, dataset))
        if resume_state is not None and resume_state["dataset_hash"] != dataset.content_hash:
            raise DMMError(
                f"dataset {dataset.dataset_id!r} content hash {dataset.content_hash[:12]}",
                f"{resume_state['dataset_hash'][:12]}, the dataset the run in {str(out_dir)!r} was trained on",
                fix="resume with the same dataset"
            )
        return dataset

    # Each node's first rank loads (and, for the embedded default, generates) the dataset before the
    # others on its node read it, so no two processes write the same dataset at once.
    first = distributed.on_every_rank(context, lambda: load_here() if context.local_rank == 0 else None)
    dataset = distributed.on_every_rank(context, lambda: first if first is not None else load_here())
    hashes = distributed.gather(context, dataset.content_hash)

    def same_dataset_as_rank_0():
        if dataset.content_hash != hashes[0]:
            raise DMMError(f"dataset {dataset.dataset_id!r} here has content hash {dataset.content_hash[:12]}, "
                           f"rank 0's has {hashes[0][:12]}", "the same dataset on every node",
                           fix="copy rank 0's dataset to every node")

    distributed.on_every_rank(context, same_dataset_as_rank_0)
    return dataset


def _hold_out(config: TrainConfig, dataset, preset):
    """(the episodes to train on, the held-out episodes).

    Without a simulator, evaluation is offline, on episodes held out of training (dmm_train/offline_eval.py);
    with one, nothing is held out.
    """
    if preset.env_id is not None:
        return dataset, ()
    from dmm_train.offline_eval import heldout_split

    _check_actions_in_range(dataset)
    if config.report_episodes:
        raise DMMError(f"--report-episodes {config.report_episodes} for a dataset with no simulator "
                       f"({dataset.dataset_id!r} names no env)",
                       "0, since report evaluations play episodes (the periodic evaluation is offline)",
                       fix="pass --report-episodes 0")
    training_dataset, heldout = dataset, ()
    if config.eval_episodes:
        kept, heldout = heldout_split(dataset.episodes)
        training_dataset = dataclasses.replace(dataset, episodes=kept)
    return training_dataset, heldout


def _choose_threads(config: TrainConfig, requested_threads: int | None, resume_state: dict | None,
                    progress: bool) -> TrainConfig:
    """The config with the torch thread count this process now uses."""
    # Torch's results depend on its thread count (its reductions split by thread), so a resumed run keeps the
    # count it was trained with unless --threads says otherwise; a new run takes the free cores.
    kept = config.threads if resume_state is not None and requested_threads is None else None
    choice = setup_threads(requested_threads if kept is None else kept,
                           source="the run's count, kept for exact resume" if kept is not None else "--threads")
    if progress:
        print(choice.line(), file=sys.stderr, flush=True)
    return dataclasses.replace(config, threads=choice.threads)


def _require_finite(loss: float, at_step: int, context: RankContext) -> None:
    if not math.isfinite(loss):  # the global loss: every rank stops here, at the same step
        error = DMMError(f"training loss became {loss} at step {at_step}", "a finite loss",
                         fix="check the dataset for NaN/inf values or lower the learning rate")
        raise distributed.quiet_off_main(context, error)


class Learner:
    """What a gradient step reads and changes on this process: the model, its optimizer and schedule, and one
    window sampler per rank it plays (its own rank, or every rank under --emulate-ranks). When it plays several
    ranks, ``shard_rng`` holds each one's torch RNG state (that rank's dropout stream).

    Built in a fixed order, since the global RNGs are seeded and drawn from on the way: every rank builds the
    same initial model, then takes its own dropout stream.
    """

    def __init__(self, config: TrainConfig, preset, training_dataset, context: RankContext):
        from dmm_train.sampler import WindowSampler

        self.context = context
        self.batch_size, self.grad_clip = config.batch_size, config.grad_clip
        self.device = context.device(config.device)
        self.ranks = context.world_size * config.emulate_ranks  # ranks taking a share of the global batch
        self.rank_batch = distributed.split_batch(config.batch_size, self.ranks)
        # The ranks this process draws windows for: its own, or all of them when it plays every rank.
        self.played = list(range(config.emulate_ranks)) if config.emulate_ranks > 1 else [context.rank]

        _seed_everything(config.seed)  # every rank builds the same initial model
        self.model_config = ModelConfig.from_preset(preset, model=config.model)
        self.model = build_policy(self.model_config).to(self.device)
        set_scan_impl(self.model, config.scan)
        self.network = self.model  # what the step runs: the model, under torchrun wrapped by `distribute`
        self.optimizer, self.scheduler = make_optimizer(self.model, config)
        self.samplers = [
            WindowSampler(training_dataset, self.model_config.context_len, preset.rtg_scale,
                          seed=distributed.rank_seed(config.seed, r))
            for r in self.played
        ]
        if context.rank > 0:
            _seed_everything(distributed.rank_seed(config.seed, context.rank))  # this rank's dropout stream
        self.shard_rng = None
        if len(self.played) > 1:
            self.shard_rng = [_torch_rng(self.device)] + [
                _fresh_torch_rng(distributed.rank_seed(config.seed, r), self.device) for r in self.played[1:]
            ]

    def restore(self, resume_state: dict) -> None:
        """Back to a resume point: the weights, optimizer and schedule, and the played ranks' samplers and RNGs."""
        self.model.load_state_dict(resume_state["model_state"])
        self.optimizer.load_state_dict(resume_state["optimizer_state"])
        self.scheduler.load_state_dict(resume_state["scheduler_state"])
        rank_states = _rank_states(resume_state)
        for sampler, rank in zip(self.samplers, self.played, strict=True):
            sampler.set_state(rank_states[rank]["sampler_state"])
        _set_rng_state(rank_states[self.played[0]]["rng_state"])
        if self.shard_rng is not None:
            self.shard_rng = [rank_states[rank]["rng_state"] for rank in self.played]

    def distribute(self) -> None:
        """Under torchrun, wrap the model in DistributedDataParallel (which starts from rank 0's weights)."""
        if not self.context.distributed:
            return
        from torch.nn.parallel import DistributedDataParallel

        self.network = DistributedDataParallel(
            self.model, device_ids=[self.context.local_rank] if self.device.startswith("cuda") else None)

    def gradient_step(self) -> float:
        """One gradient step on the global batch, each played rank's share drawn from its sampler; the global loss."""
        if self.ranks == 1:
            batch = batch_to_tensors(self.samplers[0].sample(self.batch_size), self.device)
            return train_step(self.network, self.optimizer, self.scheduler, batch, self.grad_clip)
        batches = [batch_to_tensors(sampler.sample(self.rank_batch), self.device) for sampler in self.samplers]
        return sharded_train_step(self.network, self.optimizer, self.scheduler, batches, self.grad_clip,
                                  self.context, self.shard_rng)

    def rank_states(self) -> list[dict]:
        """The played ranks' sampler and RNG states, for a resume point."""
        states = [{"sampler_state": sampler.get_state(), "rng_state": _rng_state(self.device)}
                  for sampler in self.samplers]
        if self.shard_rng is not None:
            for state, torch_state in zip(states, self.shard_rng, strict=True):
                state["rng_state"] = {**state["rng_state"], **torch_state}
        return states


class TrainingRun:
    """The periodic work around the steps: the metrics records, the progress line, resume points (every
    ``checkpoint_every`` steps, at least every ``checkpoint_minutes``, at every evaluation and at the end),
    the periodic evaluation (closed-loop, or offline without a simulator) and best.pt.

    Every rank holds one, since a resume point is a collective; only rank 0 keeps records, evaluates and writes.
    """

    def __init__(self, config: TrainConfig, out_dir: Path, context: RankContext, learner: Learner, *, dataset,
                 preset, heldout: tuple, resume_state: dict | None, progress: bool,
                 log_every: int):
        self.config, self.out_dir, self.context, self.learner = config, out_dir, context, learner
        self.dataset, self.preset, self.heldout = dataset, preset, heldout
        self.offline = preset.env_id is None
        self.resumed, self.progress, self.log_every = resume_state is not None, progress, log_every
        self.evaluates = bool(config.eval_episodes or config.report_episodes)
        self.metrics_path = out_dir / METRICS_FILE
        self.records: list[dict] = []
        self.best: dict | None = None  # the best selection evaluation so far: step and score
        self.clock = RunClock()
        self.kept_step: int | None = None  # the step of the resume point on disk
        if resume_state is not None:
            self.best = resume_state.get("best")
            self.clock = RunClock(resume_state.get("clock"))
            self.kept_step = int(resume_state["step"])
            if context.is_main:
                # Records written after the last resume point belong to the lost tail of the run.
                self.records = [r for r in _read_metrics(self.metrics_path) if r["step"] <= self.kept_step]
        self.facts = policy_facts(learner.model_config, preset, dataset)
        self.train_config_dict = dataclasses.asdict(config)
        self.last_saved = 0.0  # when the last resume point was written, or training began (`begin`)
        self.tracker: Progress | None = None  # the progress line, opened by `begin`

    def begin(self, step: int, finished: bool) -> None:
        """Say what is trained on what, and open the progress line."""
        self.last_saved = time.perf_counter()  # time-based resume points count from here
        config, preset, dataset, learner = self.config, self.preset, self.dataset, self.learner
        if self.progress:
            origin = "resuming at step " + str(step) if self.resumed else "training"
            sharing = (f", {learner.ranks} ranks x {learner.rank_batch} windows" if learner.ranks > 1 else "")
            print(
                f"{origin}: {config.model} on {preset.name}, {dataset.dataset_id} ({len(dataset.episodes)} episodes, "
                f"{dataset.total_steps} steps), {config.steps} steps, batch {config.batch_size}{sharing}, "
                f"out {self.out_dir}",
                file=sys.stderr, flush=True,
            )
            if preset.name != preset_name_given(config.preset) or self.offline:
                print(_preset_line(preset, len(self.heldout)), file=sys.stderr, flush=True)
        self.tracker = Progress("train", config.steps, start=step, enabled=self.progress and not finished)

    def after_step(self, step: int, loss: float) -> None:
        """After each step: the log record, the progress line, and an evaluation or resume point when due.

        The last step's evaluation and resume point are `finish`'s.
        """
        config = self.config
        if self.context.is_main and (step % self.log_every == 0 or step == config.steps):
            self.records.append({"step": step, "loss": loss, "lr": self.learner.scheduler.get_last_lr()[0],
                                 "train_seconds": self.clock.train_seconds()})
        self.tracker.update(step, self._progress_text(loss))
        last = step >= config.steps
        evaluation_due = bool(config.eval_every) and self.evaluates and step % config.eval_every == 0 and not last
        if evaluation_due and self.context.is_main:
            self.evaluate(step)
        if (evaluation_due or step % config.checkpoint_every == 0 or self.resume_point_due(step)) and not last:
            self.save_resume_point(step)

    def finish(self, step: int, loss: float) -> None:
        """After the last step: the final evaluation, the last progress line and the final resume point."""
        if self.evaluates and self.context.is_main:
            self.evaluate(step)
        self.tracker.update(step, self._progress_text(loss), force=True)
        self.tracker.close()
        self.save_resume_point(step)

    def _progress_text(self, loss: float) -> str:
        return f"loss {loss:.4f}  lr {self.learner.scheduler.get_last_lr()[0]:.2e}"

    def metadata(self, at_step: int) -> dict:
        return checkpoint_metadata(model=self.learner.model, train_config=self.train_config_dict, facts=self.facts,
                                   dataset_id=self.dataset.dataset_id, dataset_hash=self.dataset.content_hash,
                                   step=at_step, world_size=self.context.world_size)

    def resume_point_due(self, at_step: int) -> bool:
        """A resume point by time: at least every ``checkpoint_minutes``, so that a slow run loses little."""
        context = self.context
        if not self.config.checkpoint_minutes or (context.distributed and at_step % TIME_CHECK_STEPS):
            return False
        late = time.perf_counter() - self.last_saved >= self.config.checkpoint_minutes * 60.0
        if context.distributed:  # any rank late: all save, together
            late = bool(distributed.all_reduce_sum(context, torch.tensor([float(late)], device=self.learner.device))
                        .item())
        return late

    def save_resume_point(self, at_step: int) -> None:
        """Every rank's sampler and RNG state gathered; rank 0 writes resume.pt, metrics.jsonl and model.pt."""
        learner = self.learner
        rank_states = [state for part in distributed.gather(self.context, learner.rank_states()) for state in part]
        self.last_saved = time.perf_counter()
        if not self.context.is_main:
            return
        atomic_torch_save(
            {
                "step": at_step,
                "train_config": self.train_config_dict,
                "dataset_hash": self.dataset.content_hash,
                "model_state": learner.model.state_dict(),
                "optimizer_state": learner.optimizer.state_dict(),
                "scheduler_state": learner.scheduler.state_dict(),
                "world_size": self.context.world_size,
                "rank_states": rank_states,
                "best": self.best,
                "clock": self.clock.state(),
            },
            self.out_dir / RESUME_FILE,
        )
        _write_metrics(self.metrics_path, self.records)
        save_model(self.out_dir, learner.model, self.metadata(at_step))
        self.kept_step = at_step

    def evaluate(self, at_step: int) -> None:
        """Rank 0: the selection evaluation (best.pt) and, if asked, the report evaluation at every target."""
        started = time.perf_counter()
        self.tracker.close()  # the training progress line ends before the evaluation's output
        record: dict = {"step": at_step}
        if self.config.eval_episodes and self.offline:
            self._select_offline(at_step, record)
        elif self.config.eval_episodes:
            self._select_closed_loop(at_step, record)
        if self.config.report_episodes:
            self._report(at_step, record)
        seconds = time.perf_counter() - started
        self.clock.add_eval(seconds)
        record["eval_seconds"] = seconds
        self.records.append(record)

    def _select_offline(self, at_step: int, record: dict) -> None:
        """The held-out action error; best.pt when it is the lowest so far."""
        from dmm_train.offline_eval import evaluate_offline

        result = evaluate_offline(self.learner.model, self.facts, self.heldout,
                                  dataset_returns=self.dataset.episode_returns, device=self.learner.device)
        record["offline"] = result.to_dict()
        # Lower is better: best.pt is the checkpoint that imitates the held-out episodes best.
        improved = self.best is None or result.action_rmse < self.best["action_rmse"]
        if improved:
            self.best = {"step": at_step, "action_rmse": result.action_rmse}
            save_model(self.out_dir, self.learner.model,
                       {**self.metadata(at_step), "selection": {"offline": result.to_dict()}}, stem=BEST_STEM)
        if self.progress:
            print(f"eval step {at_step} (offline): {result.line()}" + ("  (best so far: best.pt)" if improved else ""),
                  file=sys.stderr, flush=True)

    def _select_closed_loop(self, at_step: int, record: dict) -> None:
        """The selection episodes at the first target; best.pt when they score the best so far."""
        episodes = self.config.eval_episodes
        result = self._play(self.preset.target_returns[0], episodes, SELECTION_EVAL_SEED, f"eval step {at_step}")
        record.update({
            "target_return": result.target_return, "return_mean": result.return_mean,
            "return_std": result.return_std, "normalized_mean": result.normalized_mean,
            "eval_seed": SELECTION_EVAL_SEED, "eval_episodes": episodes,
        })
        improved = self.best is None or result.score_mean > _best_score(self.best)
        if improved:
            self.best = {"step": at_step, "score": result.score_mean}
            selection = {"target_return": result.target_return, "normalized_mean": result.normalized_mean,
                         "return_mean": result.return_mean, "episodes": episodes,
                         "env_seeds": [SELECTION_EVAL_SEED, SELECTION_EVAL_SEED + episodes]}
            save_model(self.out_dir, self.learner.model, {**self.metadata(at_step), "selection": selection},
                       stem=BEST_STEM)
        if self.progress:
            score = ("" if result.normalized_mean is None else f"  normalised {result.normalized_mean:.1f}")
            print(
                f"eval step {at_step}: return {result.return_mean:.1f} ± {result.return_std:.1f}{score}"
                + ("  (best so far: best.pt)" if improved else ""),
                file=sys.stderr, flush=True,
            )

    def _report(self, at_step: int, record: dict) -> None:
        """The report episodes (seeds disjoint from the selection's) at every target return."""
        record["report"] = []
        for target in self.preset.target_returns:
            result = self._play(target, self.config.report_episodes, REPORT_EVAL_SEED,
                                f"report step {at_step}, target {target:g}")
            record["report"].append({
                "target_return": result.target_return, "return_mean": result.return_mean,
                "return_std": result.return_std, "normalized_mean": result.normalized_mean,
            })
        record["report_seed"], record["report_episodes"] = REPORT_EVAL_SEED, self.config.report_episodes

    def _play(self, target: float, episodes: int, seed: int, label: str):
        """Closed-loop episodes of the model at ``target``; env seeds seed + i."""
        from dmm_train.evaluate import evaluate_policy

        return evaluate_policy(self.learner.model, self.facts, target_return=target, episodes=episodes, seed=seed,
                               device=self.learner.device, progress_label=label if self.progress else None)


def preset_name_given(name: str) -> str | None:
    """The preset a command named (None for auto and data, which the data decides)."""
    return None if name in PRESET_CHOICES else name


def _preset_line(preset, heldout_episodes: int) -> str:
    """How a preset the data decided was chosen, and how the run will be evaluated."""
    if preset.name != "data":
        return f"preset {preset.name} (the dataset's env {preset.env_id})"
    evaluation = (f"closed-loop evaluation in {preset.env_id}, raw returns (no reference scores)" if preset.env_id
                  else f"no simulator: evaluation offline on {heldout_episodes} held-out episodes")
    targets = ", ".join(f"{value:g}" for value in preset.target_returns)
    return (f"preset derived from the data: dims {preset.state_dim}/{preset.act_dim}, rtg_scale {preset.rtg_scale:g}, "
            f"target returns {targets} (best episode, then its 75th percentile and median); {evaluation}")


def _best_score(best: dict) -> float:
    """The closed-loop score best.pt was chosen on (the normalised score, else the raw return)."""
    return float(best["score"] if "score" in best else best["normalized_mean"])  # the key of older resume points


def _step_on_disk(path: Path) -> int | None:
    """The step of the resume point at ``path``; None when there is none or it cannot be read."""
    if not path.is_file():
        return None
    try:
        return int(load_plain_data(path, "resume point", "start a new run", legacy_numpy=True)["step"])
    except (DMMError, KeyError, TypeError, ValueError):
        return None


def _interrupted_error(step: int, kept_step: int | None, out_dir: Path, config: TrainConfig) -> DMMError:
    """Ctrl-C (or SIGTERM) during training: where it stopped, what is kept, and how to go on."""
    if kept_step is None:
        return DMMError(f"training interrupted at step {step}, before its first resume point (written every "
                        f"{config.checkpoint_every} steps or {config.checkpoint_minutes:g} minutes), nothing kept",
                        f"training to run to --steps {config.steps}", fix="rerun the same command to start again")
    return DMMError(f"training interrupted at step {step}: {str(out_dir / RESUME_FILE)!r} holds step {kept_step}",
                    f"training to run to --steps {config.steps}",
                    fix="continue with the same command plus --resume")
