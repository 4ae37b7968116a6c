"""The training loop: official DMM hyperparameters, progress, periodic evaluation,
atomic checkpoints and exact resume, for every model kind (``TrainConfig.model``).

A run directory holds:
- model.pt / model.json: the latest weights and everything later stages need;
- resume.pt: the full training state (written every ``checkpoint_every`` steps);
- metrics.jsonl: one JSON record per logged step or evaluation;
- training.png: loss and score curves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from contract.errors import DMMError, describe_error
from dmm_train.baselines import build_policy, policy_actions, set_scan_impl
from dmm_train.checkpoint import (
    MODEL_FILE,
    RESUME_FILE,
    atomic_torch_save,
    atomic_write_bytes,
    checkpoint_metadata,
    save_model,
)
from dmm_train.config import ModelConfig, TrainConfig, get_preset
from dmm_train.progress import Progress

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"


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
    warmup = max(config.warmup_steps, 1)
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


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_dataset(spec: str | None, progress: bool = True, preset: str = "hopper"):
    """Load the dataset named by ``spec``, or the embedded default of ``preset`` (generated on first use)."""
    from dmm_train.minari_reader import load_dataset
    from dmm_train.recipes import ensure_default_dataset

    if spec is None:
        spec = str(ensure_default_dataset(preset, progress=progress))
    return load_dataset(spec)


def _check_dataset_matches(dataset, preset) -> None:
    if dataset.state_dim != preset.state_dim or dataset.act_dim != preset.act_dim:
        raise DMMError(
            f"dataset {dataset.dataset_id!r} has state/action dims {dataset.state_dim}/{dataset.act_dim}; "
            f"preset {preset.name!r} expects {preset.state_dim}/{preset.act_dim}; "
            "pass the --preset that matches the dataset's environment"
        )


RESUME_KEYS = ("train_config", "dataset_hash", "model_state", "optimizer_state", "scheduler_state",
               "sampler_state", "rng_state", "step")


def load_resume_point(path: Path) -> dict:
    """resume.pt, checked to be a resume point of this trainer; a damaged one is one DMMError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for a damaged file
        raise DMMError(f"resume point {str(path)!r} could not be read ({describe_error(error)}); expected the "
                       "resume.pt 'cli.py train' writes; start a new run (the run's model.pt is kept)") from None
    missing = [key for key in RESUME_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise DMMError(f"resume point {str(path)!r} lacks {', '.join(missing)}; expected the resume.pt "
                       "'cli.py train' writes; start a new run in another --out")
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
        raise DMMError(f"training log {str(path)!r} is not a metrics.jsonl of 'cli.py train' (damaged or another "
                       "file); move it away to resume (the log restarts), or start a new run")
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
) -> Path:
    """Train a policy of the kind ``config.model`` (DMM by default); returns the path of model.pt."""
    config.validate()
    out_dir = Path(out_dir)
    preset = get_preset(config.preset)
    resume_path = out_dir / RESUME_FILE
    if resume and not resume_path.exists():
        raise DMMError(
            f"--resume given but {str(resume_path)!r} does not exist; expected a run directory written by "
            "'cli.py train'; drop --resume to start a new run"
        )
    if not resume and (out_dir / MODEL_FILE).exists():
        raise DMMError(
            f"{str(out_dir)!r} already holds a model.pt; pass --resume to continue it or choose another --out"
        )

    resume_state = load_resume_point(resume_path) if resume else None
    if resume_state is not None:
        # The run's own config wins: resuming with other hyperparameters would not be "exact".
        saved = TrainConfig(**resume_state["train_config"])
        config = dataclasses.replace(saved, steps=config.steps)
    dataset = resolve_dataset(config.dataset, progress=progress, preset=preset.name)
    _check_dataset_matches(dataset, preset)
    if resume_state is not None and resume_state["dataset_hash"] != dataset.content_hash:
        raise DMMError(
            f"dataset {dataset.dataset_id!r} has content hash {dataset.content_hash[:12]}; the run in "
            f"{str(out_dir)!r} was trained on {resume_state['dataset_hash'][:12]}; resume with the same dataset"
        )

    from dmm_train.sampler import WindowSampler

    _seed_everything(config.seed)
    model_config = ModelConfig.from_preset(preset, model=config.model)
    model = build_policy(model_config).to(config.device)
    set_scan_impl(model, config.scan)
    optimizer, scheduler = make_optimizer(model, config)
    sampler = WindowSampler(dataset, model_config.context_len, preset.rtg_scale, seed=config.seed)
    step = 0
    metrics_path = out_dir / METRICS_FILE
    records: list[dict] = []
    if resume_state is not None:
        model.load_state_dict(resume_state["model_state"])
        optimizer.load_state_dict(resume_state["optimizer_state"])
        scheduler.load_state_dict(resume_state["scheduler_state"])
        sampler.set_state(resume_state["sampler_state"])
        _set_rng_state(resume_state["rng_state"])
        step = int(resume_state["step"])
        # Records written after the last resume point belong to the lost tail of the run.
        records = [r for r in _read_metrics(metrics_path) if r["step"] <= step]
    out_dir.mkdir(parents=True, exist_ok=True)

    ref_min = dataset.ref_min_score if dataset.ref_min_score is not None else preset.ref_min_score
    ref_max = dataset.ref_max_score if dataset.ref_max_score is not None else preset.ref_max_score
    train_config_dict = dataclasses.asdict(config)

    def metadata(at_step: int) -> dict:
        return checkpoint_metadata(
            model=model, train_config=train_config_dict, preset=preset.name, env_id=preset.env_id,
            state_mean=dataset.state_mean, state_std=dataset.state_std, rtg_scale=preset.rtg_scale,
            target_returns=preset.target_returns, ref_min_score=ref_min, ref_max_score=ref_max,
            dataset_id=dataset.dataset_id, dataset_hash=dataset.content_hash, step=at_step,
            state_min=dataset.state_min, state_max=dataset.state_max,
        )

    def save_resume_point(at_step: int) -> None:
        atomic_torch_save(
            {
                "step": at_step,
                "train_config": train_config_dict,
                "dataset_hash": dataset.content_hash,
                "model_state": model.state_dict(),
                "optimizer_state": optimizer.state_dict(),
                "scheduler_state": scheduler.state_dict(),
                "sampler_state": sampler.get_state(),
                "rng_state": _rng_state(),
            },
            resume_path,
        )
        _write_metrics(metrics_path, records)
        save_model(out_dir, model, metadata(at_step))

    def run_evaluation(at_step: int) -> None:
        from dmm_train.evaluate import evaluate_policy

        result = evaluate_policy(
            model, env_id=preset.env_id, state_mean=dataset.state_mean, state_std=dataset.state_std,
            rtg_scale=preset.rtg_scale, target_return=preset.target_returns[0],
            episodes=config.eval_episodes, seed=config.seed + 10_000, ref_min_score=ref_min,
            ref_max_score=ref_max, device=config.device,
        )
        records.append({
            "step": at_step, "target_return": result.target_return, "return_mean": result.return_mean,
            "return_std": result.return_std, "normalized_mean": result.normalized_mean,
        })
        if progress:
            print(
                f"eval step {at_step}: return {result.return_mean:.1f} ± {result.return_std:.1f}  "
                f"normalised {result.normalized_mean:.1f}",
                file=sys.stderr, flush=True,
            )

    if progress:
        origin = "resuming at step " + str(step) if resume_state is not None else "training"
        print(
            f"{origin}: {config.model} on {preset.name}, {dataset.dataset_id} ({len(dataset.episodes)} episodes, "
            f"{dataset.total_steps} steps), {config.steps} steps, out {out_dir}",
            file=sys.stderr, flush=True,
        )
    tracker = Progress("train", config.steps, start=step, enabled=progress)
    model.train()
    loss = float("nan")
    while step < config.steps:
        batch = batch_to_tensors(sampler.sample(config.batch_size), config.device)
        loss = train_step(model, optimizer, scheduler, batch, config.grad_clip)
        if not math.isfinite(loss):
            raise DMMError(
                f"training loss became {loss} at step {step + 1}; expected a finite loss; "
                "check the dataset for NaN/inf values or lower the learning rate"
            )
        step += 1
        if step % log_every == 0 or step == config.steps:
            records.append({"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0]})
        tracker.update(step, f"loss {loss:.4f}  lr {scheduler.get_last_lr()[0]:.2e}")
        if config.eval_every and config.eval_episodes and step % config.eval_every == 0 and step < config.steps:
            run_evaluation(step)
        if step % config.checkpoint_every == 0 and step < config.steps:
            save_resume_point(step)
        if on_step is not None:
            on_step(step)

    if config.eval_episodes:
        run_evaluation(step)
    tracker.update(step, f"loss {loss:.4f}  lr {scheduler.get_last_lr()[0]:.2e}", force=True)
    tracker.close()
    save_resume_point(step)
    plot_metrics(records, out_dir / PLOT_FILE)
    return out_dir / MODEL_FILE
