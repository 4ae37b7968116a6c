"""Training end to end: the CLI on the embedded default, checkpoints, exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
from contract.errors import DMMError
from dmm_train.checkpoint import FORMAT_VERSION, load_checkpoint
from dmm_train.config import REPORT_EVAL_SEED, SELECTION_EVAL_SEED, TrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def minari_store(tmp_path_factory):
    """A private Minari store holding a small real Hopper-v5 dataset written from rollouts."""
    from dmm_train.recipes import collect

    store = tmp_path_factory.mktemp("minari")
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(store)
    try:
        path = collect("Hopper-v5", "test/hopper-random-v0", policy="random", episodes=40, seed=3)
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH")
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    return store, Path(path)


def run_cli(args: list[str], store: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "MINARI_DATASETS_PATH": str(store), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "cli.py", *args], cwd=REPO_ROOT, env=environment,
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.slow
def test_train_on_embedded_default_writes_checkpoint_and_records(tmp_path):
    from dmm_train.recipes import DEFAULT_DATASET_ID, collect_recipe

    store = tmp_path / "store"
    out = tmp_path / "run"
    # The embedded default at a small budget (its 1M steps take minutes): train finds it by id.
    collect_recipe("hopper-medium", steps=2000, out=store, progress=False)
    result = run_cli(["train", "--steps", "20", "--out", str(out), "--eval-episodes", "1"], store)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "model.json").read_text())
    assert record["n_params"] == 123_587
    assert record["format_version"] == FORMAT_VERSION
    assert record["step"] == 20
    assert record["dataset"]["id"] == DEFAULT_DATASET_ID == "dmm-deploy/hopper-medium-v0"
    assert len(record["dataset"]["content_hash"]) == 64
    # The warmup scales with a short run: min(10,000, 10% of --steps), recorded as a number.
    assert record["train_config"]["learning_rate"] == 1e-4 and record["train_config"]["warmup_steps"] == 2
    assert record["world_size"] == 1
    assert len(record["state_mean"]) == 11 and record["rtg_scale"] == 1000.0
    for name in ("model.pt", "resume.pt", "metrics.jsonl", "training.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 20 and "normalized_mean" in metrics[-1]
    loaded = load_checkpoint(out)
    assert loaded.step == 20 and loaded.env_id == "Hopper-v5"
    assert "train: 20/20 steps" in result.stderr  # progress was shown


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, minari_store):
    store, dataset_path = minari_store
    common = ["--dataset", str(dataset_path), "--steps", "150", "--batch-size", "16",
              "--checkpoint-every", "10", "--eval-episodes", "0", "--quiet", "--seed", "5"]
    reference = tmp_path / "reference"
    assert run_cli(["train", *common, "--out", str(reference)], store).returncode == 0

    interrupted = tmp_path / "interrupted"
    environment = {**os.environ, "MINARI_DATASETS_PATH": str(store), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "cli.py", "train", *common, "--out", str(interrupted)],
        cwd=REPO_ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        # model.json is the last file of a checkpoint (resume.pt, then model.pt, then model.json):
        # polling resume.pt alone could kill the run before its model.pt caught up.
        record_file = interrupted / "model.json"
        if record_file.exists() and json.loads(record_file.read_text())["step"] >= 20:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = load_checkpoint(interrupted).step
    assert 20 <= killed_at < 150  # what was on disk at the kill is a whole, loadable checkpoint

    result = run_cli(["train", *common, "--out", str(interrupted), "--resume"], store)
    assert result.returncode == 0, result.stderr
    expected = load_checkpoint(reference).model.state_dict()
    resumed = load_checkpoint(interrupted).model.state_dict()
    assert load_checkpoint(interrupted).step == 150
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name
    steps_logged = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == sorted(set(steps_logged))  # no duplicated tail from the killed run


def test_resume_without_a_run_is_refused(tmp_path, capsys):
    assert cli.main(["train", "--steps", "5", "--out", str(tmp_path / "none"), "--resume"]) == 1
    error = capsys.readouterr().err
    assert "--resume" in error and "does not exist" in error and error.count("\n") == 1


def test_checkpoint_of_another_format_version_is_refused(tmp_path, checkpoint_path):
    payload = torch.load(checkpoint_path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp_path / "model.pt")
    with pytest.raises(DMMError, match="format version"):
        load_checkpoint(tmp_path / "model.pt")


def test_corrupt_checkpoint_is_refused(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DMMError, match="could not be read"):
        load_checkpoint(tmp_path / "model.pt")


def test_warmup_defaults_to_a_tenth_of_a_short_run_and_the_official_10k_beyond():
    assert TrainConfig(steps=2000).resolved_warmup() == 200  # leaves the warmup at 10% of the run
    assert TrainConfig().resolved_warmup() == 10_000  # the official budget: the official warmup
    assert TrainConfig(steps=300_000).resolved_warmup() == 10_000
    assert TrainConfig(steps=2000, warmup_steps=0).resolved_warmup() == 0
    with pytest.raises(DMMError, match="warmup_steps=-1"):
        TrainConfig(warmup_steps=-1).validate()


def test_the_optimizer_ramps_over_the_resolved_warmup_from_any_config():
    """make_optimizer takes a config as the user gives it (warmup unset: its default), as bench/train_speed.py
    does, and ramps the learning rate linearly over the resolved warmup."""
    from dmm_train.train import make_optimizer

    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = make_optimizer(model, TrainConfig(steps=2000))  # warmup 200
    rates = []
    for _ in range(201):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-4 / 200) and rates[99] == pytest.approx(1e-4 / 2)
    assert rates[199] == rates[200] == pytest.approx(1e-4)


@pytest.mark.slow
def test_periodic_evaluation_keeps_the_best_checkpoint_chosen_on_selection_seeds(tmp_path, minari_store):
    from dmm_train.train import train
    from export.onnx_export import export_checkpoint

    _, dataset_path = minari_store
    config = TrainConfig(dataset=str(dataset_path), steps=6, batch_size=8, eval_every=2, eval_episodes=2,
                         report_episodes=1, checkpoint_every=100, warmup_steps=3, seed=1)
    run = tmp_path / "run"
    train(config, run, progress=False, log_every=1)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval_seconds" in r]
    assert [r["step"] for r in evaluations] == [2, 4, 6]
    for record in evaluations:
        assert record["eval_seed"] == SELECTION_EVAL_SEED and record["eval_episodes"] == 2
        assert record["report_seed"] == REPORT_EVAL_SEED and record["report_episodes"] == 1
        assert [r["target_return"] for r in record["report"]] == [3600.0, 7200.0, 36000.0, 72000.0]
    assert SELECTION_EVAL_SEED >= REPORT_EVAL_SEED + 10_000  # the two seed ranges are disjoint
    scores = [r["normalized_mean"] for r in evaluations]
    chosen = evaluations[scores.index(max(scores))]  # the first of the best scores

    best = json.loads((run / "best.json").read_text())
    assert best["step"] == chosen["step"] and best["selection"]["normalized_mean"] == chosen["normalized_mean"]
    assert best["selection"]["env_seeds"] == [SELECTION_EVAL_SEED, SELECTION_EVAL_SEED + 2]
    loaded = load_checkpoint(run / "best.pt")
    assert loaded.step == chosen["step"] and loaded.metadata["selection"] == best["selection"]
    assert torch.load(run / "resume.pt", weights_only=True)["best"] == {
        "step": chosen["step"], "score": chosen["normalized_mean"]}
    if chosen["step"] != 6:  # best.pt holds other weights than the last checkpoint
        last = load_checkpoint(run).model.state_dict()
        assert any(not torch.equal(tensor, last[name]) for name, tensor in loaded.model.state_dict().items())
    onnx_path, _ = export_checkpoint(run / "best.pt", out=tmp_path / "best-policy")
    assert onnx_path.stat().st_size > 0


def test_a_run_directory_in_use_refuses_a_second_trainer_and_a_killed_one_leaves_no_lock(tmp_path, minari_store):
    """Two processes on one run (a requeued job still running, a command started twice) would interleave
    their checkpoints: the second is refused with who holds it; a holder killed with SIGKILL releases it."""
    store, _ = minari_store
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom contract.files import directory_lock\n"
         f"with directory_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(600)\n"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run_cli(["train", "--dataset", "test/hopper-random-v0", "--steps", "4", "--eval-episodes", "0",
                          "--out", str(out)], store)
        assert result.returncode != 0
        assert f"is in use by another training run (process {holder.pid})" in result.stderr
        assert "pass another --out" in result.stderr and not (out / "model.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    result = run_cli(["train", "--dataset", "test/hopper-random-v0", "--steps", "4", "--eval-episodes", "0",
                      "--out", str(out)], store)
    assert result.returncode == 0, result.stderr
    assert (out / "model.pt").exists()
