"""Atomic writes leave artifacts with ordinary permissions: a checkpoint, graph or manifest written
by the trainer is readable by the service user that runs it, and a rewrite keeps a chosen mode.
A run directory's lock names its live holder, and nobody once released."""

from __future__ import annotations

import os
import stat

from contract.files import NEW_FILE_MODE, atomic_write_bytes, directory_lock, lock_holder


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_file_mode_is_what_open_gives_under_this_umask(tmp_path):
    with open(tmp_path / "plain", "wb"):
        pass
    assert NEW_FILE_MODE == mode_of(tmp_path / "plain")
    assert NEW_FILE_MODE & 0o044  # readable by group/others under the usual umask, not the temp file's 0600


def test_a_written_artifact_is_not_private_and_a_rewrite_keeps_its_mode(tmp_path, checkpoint_path, engines):
    for artifact in (checkpoint_path, checkpoint_path.with_suffix(".json"), engines["stream"],
                     engines["stream"].with_suffix(".json")):
        assert mode_of(artifact) == NEW_FILE_MODE, artifact

    target = tmp_path / "hopper.onnx"
    atomic_write_bytes(target, b"first")
    os.chmod(target, 0o640)  # the user narrows it
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second" and mode_of(target) == 0o640
    assert [path.name for path in tmp_path.iterdir()] == ["hopper.onnx"]  # no temporary file left


def test_lock_holder_names_the_live_holder_and_nobody_once_released(tmp_path):
    run = tmp_path / "run"
    assert lock_holder(run) is None  # no directory, no lock file
    with directory_lock(run):
        (run / "metrics.jsonl").write_text("")
        assert lock_holder(run) == os.getpid()
    assert lock_holder(run) is None
