"""What a newcomer trips over on a fresh clone: each trip of the first-run list, as a user meets it."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import cli
from contract.manifest import manifest_path_for, read_manifest
from dmm_train.checkpoint import load_checkpoint
from dmm_train.config import TrainConfig
from tests.helpers import REPO_ROOT, c_compiler, copy_engine, write_checkpoint

SETUP_HINTS = ("bash scripts/setup.sh", ".venv/bin/python cli.py", "source .venv/bin/activate")


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """A small real Hopper-v5 Minari dataset of random rollouts."""
    from dmm_train.recipes import collect

    store = tmp_path_factory.mktemp("store")
    return Path(collect("Hopper-v5", "test/newcomer-hopper-v0", policy="random", episodes=10, seed=3, out=store))


def short_config(dataset: Path, **changes) -> TrainConfig:
    settings = {"dataset": str(dataset), "steps": 4, "batch_size": 8, "eval_episodes": 0, "warmup_steps": 1,
                "threads": 1, **changes}
    return TrainConfig(**settings)


def run_cli_with(python_args: list[str], cli_args: list[str], environment: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python_args, "cli.py", *cli_args], cwd=REPO_ROOT, env=environment,
                          capture_output=True, text=True, timeout=300)


def assert_setup_line(result: subprocess.CompletedProcess, package: str) -> None:
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert f"lacks the package {package!r}" in result.stderr
    for hint in SETUP_HINTS:
        assert hint in result.stderr, (hint, result.stderr)


# -- a Python without the project's packages ---------------------------------------------------

def test_a_python_without_click_gets_one_line_with_the_setup_command():
    # -S: no site-packages, so cli.py's own top-level import of click fails, as in a bare system Python.
    result = run_cli_with(["-S"], ["train", "--steps", "1"], {**os.environ, "PYTHONPATH": ""})
    assert_setup_line(result, "click")


def test_a_python_without_torch_gets_one_line_with_the_setup_command(tmp_path):
    # The environment's packages without torch: click and the configs import, the train command's torch does not.
    import click

    site_packages = Path(click.__file__).resolve().parents[1]
    visible = tmp_path / "site"
    visible.mkdir()
    for entry in site_packages.iterdir():
        if not entry.name.startswith("torch"):
            (visible / entry.name).symlink_to(entry)
    result = run_cli_with(["-S"], ["train", "--steps", "1"], {**os.environ, "PYTHONPATH": str(visible)})
    assert_setup_line(result, "torch")


def test_the_quick_start_says_to_use_the_environment():
    quick_start = (REPO_ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "source .venv/bin/activate" in quick_start and ".venv/bin/python cli.py" in quick_start


# -- export -------------------------------------------------------------------------------------

def test_export_without_checkpoint_says_which_and_the_c_target_has_its_own_name(tmp_path, monkeypatch, capsys):
    c_compiler()
    monkeypatch.chdir(tmp_path)
    write_checkpoint(tmp_path / "runs" / "hopper-seed0")
    assert cli.main(["export", "--no-engine"]) == 0
    assert cli.main(["export", "--target", "c"]) == 0  # the ONNX export's hopper.json is not in its way
    captured = capsys.readouterr()
    chosen = [line for line in captured.err.splitlines() if line.startswith("exporting ")]
    assert len(chosen) == 2
    for line in chosen:
        assert str(Path("runs") / "hopper-seed0" / "model.pt") in line
        assert "(step 0, dataset fixture/untrained)" in line and "--checkpoint" in line
    assert read_manifest(tmp_path / "hopper.json").engine.get("target") != "c"
    c_manifest = read_manifest(manifest_path_for(tmp_path / "hopper-c.c"))
    assert c_manifest.engine["target"] == "c" and c_manifest.engine["symbol_prefix"] == "hopper"
    header = (tmp_path / "hopper-c.h").read_text()
    assert "hopper_step(" in header and "HOPPER_TARGET_RETURN" in header  # the README's API, unchanged


def test_generated_export_files_are_ignored_by_git():
    names = ["hopper-c.c", "hopper-c.h", "hopper-c.json", "hopper.json", "hopper.onnx"]
    result = subprocess.run(["git", "check-ignore", *names], cwd=REPO_ROOT, capture_output=True, text=True)
    assert sorted(result.stdout.split()) == sorted(names)


def test_parity_labels_graphs_of_one_mode_by_their_files(capsys, checkpoint_path, engines, tmp_path):
    copy = copy_engine(engines["window"], tmp_path)  # the same file name in another directory
    code = cli.main(["parity", "--checkpoint", str(checkpoint_path), "--onnx", str(engines["window"]),
                     "--onnx", str(copy), "--steps", "3"])
    assert code == 0
    table = capsys.readouterr().out
    assert str(engines["window"]) in table and str(copy) in table
    assert "#0" not in table and "#1" not in table


# -- train and eval -----------------------------------------------------------------------------

class _Interrupt:
    """on_step: Ctrl-C after the given step, as the user presses it."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def __call__(self, step: int) -> None:
        if step == self.at_step:
            raise KeyboardInterrupt


def test_an_interrupted_run_says_what_is_kept_and_how_to_resume(small_dataset, tmp_path):
    from contract.errors import DMMError
    from dmm_train.train import train

    # No step-based resume point before the end: the one on disk came from --checkpoint-minutes.
    config = short_config(small_dataset, steps=8, checkpoint_every=1000, checkpoint_minutes=1e-9)
    run = tmp_path / "run"
    with pytest.raises(DMMError) as caught:
        train(config, run, progress=False, on_step=_Interrupt(3))
    message = str(caught.value)
    assert "interrupted at step 3" in message and "holds step 3" in message and "--resume" in message
    assert load_checkpoint(run).step == 3

    with pytest.raises(DMMError) as caught:
        train(short_config(small_dataset, steps=8, checkpoint_every=1000, checkpoint_minutes=0), tmp_path / "other",
              progress=False, on_step=_Interrupt(3))
    assert "interrupted at step 3, before its first resume point" in str(caught.value)


def test_resume_of_a_finished_run_writes_nothing_and_says_so(small_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["train", "--dataset", str(small_dataset), "--steps", "2", "--batch-size", "8", "--eval-episodes",
              "0", "--warmup", "1", "--threads", "1", "--quiet", "--out", str(run)]
    assert cli.main(common) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'model.pt'}"
    written = (run / "model.pt").stat().st_mtime_ns
    assert cli.main([*common, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "already finished at step 2; nothing to do" in out and "wrote" not in out
    assert (run / "model.pt").stat().st_mtime_ns == written


def test_eval_shows_progress_per_target(capsys, checkpoint_path):
    assert cli.main(["eval", "--checkpoint", str(checkpoint_path), "--episodes", "2", "--target", "3600"]) == 0
    captured = capsys.readouterr()
    assert "eval target 3600: " in captured.err and "2/2 episodes done" in captured.err
    assert captured.out.startswith("target 3600: return")


def test_the_training_progress_line_ends_before_the_evaluation_output(small_dataset, tmp_path, monkeypatch):
    """On a terminal the progress line is redrawn in place; what follows it starts on a line of its own."""
    from dmm_train.train import train

    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    terminal = os.fdopen(slave, "w")
    monkeypatch.setattr(sys, "stderr", terminal)
    try:
        train(short_config(small_dataset, eval_every=2, eval_episodes=1), tmp_path / "run", log_every=1)
    finally:
        monkeypatch.undo()
        terminal.close()
        reader.join(timeout=10)
        os.close(master)
    text = b"".join(chunks).decode()
    assert "eval step 2" in text and "1/1 episodes done" in text
    # The training line (loss, lr) is closed by a newline before the evaluation's own output starts.
    assert re.search(r"lr [0-9.e+-]+\x1b\[K\r?\n\r?eval step 2", text), repr(text[-2000:])
    assert not re.search(r"lr [0-9.e+-]+(\x1b\[K)?eval step", text)


def test_sigterm_stops_training_like_ctrl_c_and_the_run_resumes(small_dataset, tmp_path):
    """A scheduler's SIGTERM (preemption, kill): one line saying what is kept, then --resume continues."""
    import signal
    import time

    run = tmp_path / "run"
    command = [sys.executable, "cli.py", "train", "--dataset", str(small_dataset), "--steps", "100000",
               "--batch-size", "8", "--eval-episodes", "0", "--threads", "1", "--checkpoint-every", "5",
               "--out", str(run)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not (run / "resume.pt").exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert (run / "resume.pt").exists(), process.communicate(timeout=60)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=240)  # a hang guard
    finally:
        process.kill()
    last = err.strip().splitlines()[-1]
    assert process.returncode == 1 and last.startswith("error: training interrupted at step ")
    assert "holds step" in last and "--resume" in last and "Traceback" not in err
    kept = int(last.split("holds step ")[1].split(";")[0])
    assert kept > 0 and torch.load(run / "resume.pt", weights_only=True)["step"] == kept  # what the file holds
    resumed = run_cli_with([], ["train", "--dataset", str(small_dataset), "--steps", str(kept + 2), "--batch-size",
                                "8", "--eval-episodes", "0", "--threads", "1", "--out", str(run), "--resume"],
                           {**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(run).step == kept + 2
