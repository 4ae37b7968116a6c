"""Training under torchrun (DistributedDataParallel on gloo, two real processes on the CPU): the same
parameters as one process playing both ranks, files written by rank 0 alone, a checkpoint like any
other, exact resume after SIGKILL, a failing rank ending the job with one error; and the one-process
path untouched (a process group of one gives bitwise the same parameters as no group at all)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import cli
from contract.errors import DMMError
from dmm_train import distributed
from dmm_train.baselines import build_policy
from dmm_train.checkpoint import load_checkpoint
from dmm_train.config import ModelConfig, TrainConfig, get_preset
from dmm_train.train import train
from tests.helpers import assert_one_line_error

REPO_ROOT = Path(__file__).resolve().parent.parent
TWO_RANK_ARGS = ["--steps", "60", "--batch-size", "16", "--checkpoint-every", "5", "--eval-episodes", "0",
                 "--seed", "5", "--quiet"]
# The scan's state matrix and skip: their gradients come through the fused C scan's autograd Function.
BEHIND_THE_SCAN = ("A_log", "Dskip")

THREADS_OUTLIVED = "process group threads outlived the run"
# Runs cli.py under torchrun with each rank in its own working directory, as if on its own node:
# a relative --out or --dataset then names a different place on each rank. After the run it
# fails the rank if gloo's threads are still alive: a group kept past the run leaves them to
# the interpreter's shutdown, where one of them can abort a run that succeeded (SIGABRT).
RANK_ENTRY = textwrap.dedent(f"""
    import os
    import sys

    separator = sys.argv.index("--")
    repo, *rank_dirs = sys.argv[1:separator]
    os.chdir(rank_dirs[int(os.environ["RANK"])])
    sys.path.insert(0, repo)
    import cli

    code = cli.main(sys.argv[separator + 1:])
    tasks = "/proc/self/task"  # Linux: a folder per thread of this process, with the thread's name in comm
    names = []
    if os.path.isdir(tasks):
        names = [open(f"{{tasks}}/{{task}}/comm").read().strip() for task in os.listdir(tasks)]
    if any("gloo" in name for name in names):
        print("{THREADS_OUTLIVED}: " + ", ".join(names), file=sys.stderr, flush=True)
        code = code or 70
    sys.exit(code)
""")


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory) -> Path:
    from dmm_train.recipes import collect

    store = tmp_path_factory.mktemp("minari")
    return Path(collect("Hopper-v5", "test/ddp-hopper-v0", policy="random", episodes=8, seed=3, out=store))


def rank_dirs(root: Path, dataset: Path | None, *, dataset_on: tuple[int, ...] = (0, 1)) -> list[Path]:
    """One working directory per rank; ``dataset`` linked as ./dataset in those of ``dataset_on``."""
    directories = []
    for rank in range(2):
        directory = root / f"rank{rank}"
        directory.mkdir(parents=True)
        if dataset is not None and rank in dataset_on:
            (directory / "dataset").symlink_to(dataset)
        directories.append(directory)
    return directories


def torchrun_command(entry: Path, directories: list[Path], args: list[str]) -> list[str]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return [*torchrun, str(entry), str(REPO_ROOT), *map(str, directories), "--", "train", *args]


def worker_environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_torchrun(entry, directories, args, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(entry, directories, args), cwd=REPO_ROOT, env=worker_environment(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, dataset_path):
    """A finished 2-rank run (fused scan) in rank 0's directory; rank 1's directory beside it."""
    root = tmp_path_factory.mktemp("two-ranks")
    entry = root / "rank_entry.py"
    entry.write_text(RANK_ENTRY)
    directories = rank_dirs(root, dataset_path)
    arguments = ["--dataset", "dataset", "--out", "run", "--scan", "fused", *TWO_RANK_ARGS]
    result = run_torchrun(entry, directories, [argument for argument in arguments if argument != "--quiet"])
    assert result.returncode == 0, result.stderr
    return {"entry": entry, "dirs": directories, "run": directories[0] / "run", "result": result}


def state_of(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run).model.state_dict()


def one_process_config(dataset: Path, **changes) -> TrainConfig:
    base = TrainConfig(dataset=str(dataset), steps=60, batch_size=16, checkpoint_every=5, eval_episodes=0, seed=5,
                       scan="fused")
    return dataclasses.replace(base, **changes)


@pytest.mark.slow
def test_two_ranks_take_the_steps_of_one_process_playing_both(two_rank_run, dataset_path, tmp_path):
    torch.set_num_threads(1)
    emulated = train(one_process_config(dataset_path, emulate_ranks=2), tmp_path / "emulated", progress=False)
    plain = train(one_process_config(dataset_path), tmp_path / "plain", progress=False)
    torch.manual_seed(5)  # the run's seed: its initial weights
    initial = build_policy(ModelConfig.from_preset(get_preset("hopper"))).state_dict()
    two_ranks, one_process = state_of(two_rank_run["run"]), state_of(emulated)
    for name, tensor in two_ranks.items():
        assert torch.allclose(tensor, one_process[name], rtol=1e-5, atol=1e-6), name
    # Not vacuous: a plain one-process run of the same batch size draws other windows.
    assert any(not torch.allclose(tensor, state_of(plain)[name]) for name, tensor in two_ranks.items())
    # Gradients came through the fused scan's autograd Function to the parameters behind it: they moved
    # well beyond what AdamW's weight decay alone moves a parameter in 60 steps (lr * decay * |p| a step).
    behind = [name for name in two_ranks if name.endswith(BEHIND_THE_SCAN)]
    assert len(behind) == 6
    for name in behind:
        decay_alone = 60 * 1e-4 * 1e-4 * initial[name].abs().max()
        assert (two_ranks[name] - initial[name]).abs().max() > 10 * decay_alone, name

    losses = [json.loads(line) for line in (two_rank_run["run"] / "metrics.jsonl").read_text().splitlines()]
    emulated_losses = [json.loads(line) for line in (tmp_path / "emulated" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1]["step"] == 60
    assert losses[-1]["loss"] == pytest.approx(emulated_losses[-1]["loss"], rel=1e-5)


@pytest.mark.slow
def test_no_gloo_thread_outlives_the_run(two_rank_run):
    """The group ends with the run on both ranks. It once outlived destroy_process_group (kept by
    default arguments of a module DDP imports), and a gloo thread freeing a tensor during the
    interpreter's shutdown then aborted a finished run, about one time in twenty."""
    assert two_rank_run["result"].returncode == 0
    assert THREADS_OUTLIVED not in two_rank_run["result"].stderr


@pytest.mark.slow
def test_rank_0_alone_writes_a_checkpoint_that_loads_and_exports(two_rank_run, tmp_path):
    from export.onnx_export import export_checkpoint

    run = two_rank_run["run"]
    assert sorted(path.name for path in run.iterdir()) == [
        ".lock", "metrics.jsonl", "model.json", "model.pt", "resume.pt", "training.png"]  # .lock: rank 0's
    assert sorted(path.name for path in two_rank_run["dirs"][1].iterdir()) == ["dataset"]  # rank 1 wrote nothing
    record = json.loads((run / "model.json").read_text())
    assert record["world_size"] == 2 and record["step"] == 60 and record["train_config"]["batch_size"] == 16
    stderr = two_rank_run["result"].stderr
    # Rank 0 alone prints: one start line, one progress line per update, one "wrote".
    assert stderr.count("training: dmm on hopper") == 1 and "2 ranks x 8 windows" in stderr
    assert two_rank_run["result"].stdout.count("wrote ") == 1

    loaded = load_checkpoint(run)
    assert loaded.step == 60 and loaded.model_config.model == "dmm"
    onnx_path, manifest_path = export_checkpoint(run / "model.pt", out=tmp_path / "ddp-policy")
    assert onnx_path.stat().st_size > 0 and json.loads(manifest_path.read_text())["parity"]


@pytest.mark.slow
def test_resuming_with_another_world_size_is_refused(two_rank_run, capsys):
    run = two_rank_run["run"]
    before = (run / "resume.pt").stat().st_mtime_ns
    code = cli.main(["train", "--dataset", str(two_rank_run["dirs"][0] / "dataset"), "--out", str(run),
                     "--resume", *TWO_RANK_ARGS])
    assert_one_line_error(capsys, code, "trained on 2 rank(s)", "this job has 1", "same world size")
    assert (run / "resume.pt").stat().st_mtime_ns == before


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
def test_two_rank_run_killed_then_resumed_equals_the_uninterrupted_run(two_rank_run, dataset_path, tmp_path):
    directories = rank_dirs(tmp_path, dataset_path)
    command = torchrun_command(two_rank_run["entry"], directories,
                               ["--dataset", "dataset", "--out", "run", "--scan", "fused", *TWO_RANK_ARGS])
    launcher = subprocess.Popen(command, cwd=REPO_ROOT, env=worker_environment(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    record_file = directories[0] / "run" / "model.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and launcher.poll() is None:
        # model.json is the last file of a checkpoint; see test_sigkill_then_resume_equals_uninterrupted_run.
        if record_file.exists() and json.loads(record_file.read_text())["step"] >= 10:
            break
        time.sleep(0.02)
    # The whole job at once, as a scheduler kills it: the workers (torchrun starts them in their own
    # sessions), then the launcher.
    workers = children_of(launcher.pid)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert launcher.returncode == -signal.SIGKILL and len(workers) == 2, "the run finished before it was killed"
    killed_at = load_checkpoint(directories[0] / "run").step
    assert 10 <= killed_at < 60

    result = run_torchrun(two_rank_run["entry"], directories,
                          ["--dataset", "dataset", "--out", "run", "--scan", "fused", "--resume", *TWO_RANK_ARGS])
    assert result.returncode == 0, result.stderr
    resumed, uninterrupted = state_of(directories[0] / "run"), state_of(two_rank_run["run"])
    for name, tensor in uninterrupted.items():
        assert torch.equal(tensor, resumed[name]), name
    steps = [json.loads(line)["step"] for line in (directories[0] / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 60


@pytest.mark.slow
def test_a_rank_that_fails_ends_the_job_with_one_error(two_rank_run, dataset_path, tmp_path):
    directories = rank_dirs(tmp_path, dataset_path, dataset_on=(0,))  # rank 1's "node" lacks the dataset
    started = time.monotonic()
    result = run_torchrun(two_rank_run["entry"], directories,
                          ["--dataset", "dataset", "--out", "run", "--dist-timeout", "60", *TWO_RANK_ARGS],
                          timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - started < 100  # ended by the ranks' agreement, not by a timeout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: rank 1 of 2: ") and "dataset" in errors[0]
    assert "[rank0]" not in result.stderr and "[rank1]" not in result.stderr  # no worker traceback
    assert THREADS_OUTLIVED not in result.stderr  # the failed run's frames did not keep the group
    assert not (directories[0] / "run").exists() and not (directories[1] / "run").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(("model", "scan"), [("dmm", "fused"), ("dmm", "loop"), ("dt", "auto")])
def test_a_process_group_of_one_trains_bitwise_like_no_group(model, scan, dataset_path, tmp_path, monkeypatch):
    """torchrun --nproc_per_node 1: DDP over gloo around the model, rank 0's streams = the one-process ones."""
    config = TrainConfig(dataset=str(dataset_path), model=model, scan=scan, steps=4, batch_size=8, eval_episodes=0,
                         checkpoint_every=2, seed=2)
    plain = state_of(train(config, tmp_path / "plain", progress=False))
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    grouped = train(config, tmp_path / "grouped", progress=False)
    assert not torch.distributed.is_initialized()  # the trainer closed the group it opened
    assert json.loads((tmp_path / "grouped" / "model.json").read_text())["world_size"] == 1
    for name, tensor in plain.items():
        assert torch.equal(tensor, state_of(grouped)[name]), name


def test_rank_streams_and_batch_split():
    assert distributed.rank_seed(7, 0) == 7  # rank 0 draws the one-process streams
    seeds = {distributed.rank_seed(7, rank) for rank in range(1, 5)} | {distributed.rank_seed(8, 1)}
    assert len(seeds) == 5 and all(0 <= seed < 2**32 for seed in seeds)
    assert distributed.rank_seed(7, 3) == distributed.rank_seed(7, 3)
    assert distributed.split_batch(64, 4) == 16
    with pytest.raises(DMMError, match=r"--batch-size 30 over 4 ranks.*--batch-size 28 or 32"):
        distributed.split_batch(30, 4)


def test_emulated_ranks_refuse_a_batch_they_cannot_share(dataset_path, tmp_path, capsys):
    code = cli.main(["train", "--dataset", str(dataset_path), "--steps", "2", "--batch-size", "10",
                     "--emulate-ranks", "4", "--out", str(tmp_path / "run"), "--quiet"])
    assert_one_line_error(capsys, code, "--batch-size 10 over 4 ranks", "divisible")
    assert not (tmp_path / "run").exists()
