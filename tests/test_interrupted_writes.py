"""Writes never destroy what the user had: a kill between the files of one export leaves a set `run`
accepts, a second export to the same NAME is refused naming the first, a symlink at any output is
replaced (its target untouched), a killed writer's temporary is removed by the next write, and a
histogram that cannot be written does not lose the run's results.

A kill is a real SIGKILL of a child process at a chosen rename: the child wraps ``os.replace`` (the
one call every write ends in) so that it kills itself there, as a power cut or ``kill -9`` would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import cli
from contract.errors import DMMError
from contract.files import directory_lock, sha256_file
from contract.manifest import manifest_path_for, read_manifest
from export.polygraphy_check import data_loader_paths
from tests.helpers import REPO_ROOT, assert_one_line_error, run_json, write_checkpoint

# Runs in a child: os.replace kills the process at the rename chosen by kill_at ("first": the first
# rename of any write; -1: instead of committing a set's journal; n >= 0: after the journal and n
# member renames), then the test's code runs.
KILLING_REPLACE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    kill_at, real_replace, members, committed = {kill_at!r}, os.replace, [0], [False]

    def replace(source, target, *args, **kwargs):
        if kill_at == "first":
            os.kill(os.getpid(), signal.SIGKILL)
        if os.path.basename(str(target)).endswith(".set.json"):
            if kill_at < 0:
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(source, target, *args, **kwargs)
            committed[0] = True
            return
        if committed[0]:
            if members[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            members[0] += 1
        real_replace(source, target, *args, **kwargs)

    os.replace = replace
""")


def run_killed(code: str, kill_at) -> None:
    """Run ``code`` in a child whose ``os.replace`` SIGKILLs it at ``kill_at``; assert it was killed."""
    script = KILLING_REPLACE.format(root=str(REPO_ROOT), kill_at=kill_at) + textwrap.dedent(code)
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr


def export_files(onnx_path):
    """The four files of a batch-1 ONNX export: graph, manifest, data loader script and its inputs."""
    return (onnx_path, manifest_path_for(onnx_path), *data_loader_paths(onnx_path))


def temporaries(directory) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.endswith(".tmp"))


@pytest.mark.parametrize("kill_at", [-1, 0, 2])
def test_a_kill_between_the_renames_of_an_export_leaves_a_set_that_run_accepts(
        capsys, checkpoint_path, engines, tmp_path, kill_at):
    # The old export: the window graph, under the name the stream export is about to take.
    old = tmp_path / engines["window"].name
    for source, target in zip(export_files(engines["window"]), export_files(old), strict=True):
        target.write_bytes(source.read_bytes())
    old_hashes = [sha256_file(path) for path in export_files(old)]

    run_killed(f"""
        from export.onnx_export import export_checkpoint
        export_checkpoint({str(checkpoint_path)!r}, mode="stream", out={str(old)!r})
    """, kill_at)

    if kill_at < 0:
        # Killed before the commit: the old set, whole; the staged files are orphans of a dead writer.
        assert [sha256_file(path) for path in export_files(old)] == old_hashes
        assert temporaries(tmp_path)
        assert run_json(capsys, "--engine", str(old), "--episodes", "1")["mode"] == "window"
        return
    # Killed after the commit, with some members renamed and some not: `run` finishes the set first.
    assert list(tmp_path.glob(".*.set.json"))
    assert run_json(capsys, "--engine", str(old), "--episodes", "1")["mode"] == "stream"
    manifest = read_manifest(manifest_path_for(old))
    assert manifest.mode == "stream" and manifest.onnx_sha256 == sha256_file(old)
    onnx_file, manifest_file, _, inputs_file = export_files(old)  # (the loader script may read the same)
    assert all(sha256_file(path) != old_hashes[index]
               for index, path in ((0, onnx_file), (1, manifest_file), (3, inputs_file)))
    assert not list(tmp_path.glob(".*.set.json")) and not temporaries(tmp_path)


def test_orphan_temporaries_of_a_killed_export_are_removed_by_the_next_one(checkpoint_path, tmp_path):
    out = tmp_path / "hopper"
    run_killed(f"""
        from export.onnx_export import export_checkpoint
        export_checkpoint({str(checkpoint_path)!r}, mode="stream", out={str(out)!r})
    """, -1)
    assert len(temporaries(tmp_path)) == 5  # every member and the journal staged, nothing committed
    assert not (tmp_path / "hopper.onnx").exists()

    assert cli.main(["export", "--checkpoint", str(checkpoint_path), "--mode", "stream", "--out", str(out)]) == 0
    assert not temporaries(tmp_path)
    assert read_manifest(tmp_path / "hopper.json").onnx_sha256 == sha256_file(tmp_path / "hopper.onnx")


def test_a_killed_checkpoint_write_leaves_the_old_checkpoint_and_its_temporary_goes_with_the_next(tmp_path):
    write_checkpoint(tmp_path, seed=0)
    before = sha256_file(tmp_path / "model.pt")
    run_killed(f"""
        from tests.helpers import write_checkpoint
        from pathlib import Path
        write_checkpoint(Path({str(tmp_path)!r}), seed=1)
    """, "first")
    assert sha256_file(tmp_path / "model.pt") == before
    assert [name for name in temporaries(tmp_path) if name.startswith(".model.pt.")]  # the killed writer's

    write_checkpoint(tmp_path, seed=1)
    assert sha256_file(tmp_path / "model.pt") != before and not temporaries(tmp_path)


def test_a_second_export_to_the_same_name_is_refused_naming_the_first(capsys, checkpoint_path, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {str(REPO_ROOT)!r})
            from pathlib import Path
            from contract.manifest import export_lock
            with export_lock(Path({str(tmp_path / "hopper.onnx")!r})):
                print("held", flush=True)
                sys.stdin.read()  # until the test closes it
        """)], cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for target in (["--mode", "stream"], ["--target", "c"]):
            code = cli.main(["export", "--checkpoint", str(checkpoint_path), *target,
                             "--out", str(tmp_path / "hopper")])
            assert_one_line_error(capsys, code, "hopper", "another export", f"process {holder.pid}", "--out")
        assert not [path for path in tmp_path.iterdir() if not path.name.startswith(".")]  # nothing written
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # The kernel released the lock with its holder: the same export now goes through.
    assert cli.main(["export", "--checkpoint", str(checkpoint_path), "--mode", "stream",
                     "--out", str(tmp_path / "hopper")]) == 0
    assert (tmp_path / "hopper.onnx").is_file()


def plant_links(paths, victim_dir):
    """A symlink at each path, to a file of its own in ``victim_dir``; returns the victims and their bytes."""
    victims = {}
    for index, path in enumerate(paths):
        victim = victim_dir / f"victim-{index}"
        victim.write_bytes(b"the user's file")
        path.symlink_to(victim)
        victims[victim] = victim.read_bytes()
    return victims


def assert_replaced_not_written_through(paths, victims):
    for path in paths:
        assert path.is_file() and not path.is_symlink(), path
    for victim, content in victims.items():
        assert victim.read_bytes() == content, victim


def test_a_symlink_at_an_export_member_is_replaced_not_written_through(checkpoint_path, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    onnx_path = tmp_path / "out" / "hopper.onnx"
    victims = plant_links(export_files(onnx_path), tmp_path / "elsewhere")
    assert cli.main(["export", "--checkpoint", str(checkpoint_path), "--mode", "stream",
                     "--out", str(onnx_path.with_suffix(""))]) == 0
    assert_replaced_not_written_through(export_files(onnx_path), victims)


def test_a_symlink_at_a_checkpoint_is_replaced_not_written_through(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").mkdir()
    targets = [tmp_path / "run" / "model.pt", tmp_path / "run" / "model.json"]
    victims = plant_links(targets, tmp_path / "elsewhere")
    write_checkpoint(tmp_path / "run")
    assert_replaced_not_written_through(targets, victims)


def test_a_symlink_at_a_run_directory_lock_is_refused_and_its_target_untouched(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("the user's file")
    (run / ".lock").symlink_to(victim)
    with pytest.raises(DMMError) as refused, directory_lock(run):
        pass
    assert "symlink" in str(refused.value) and "\n" not in str(refused.value)
    assert victim.read_text() == "the user's file"


def test_a_histogram_goes_to_exactly_its_path_and_replaces_a_symlink(capsys, engines, tmp_path):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"the user's picture")
    linked = tmp_path / "linked.png"
    linked.symlink_to(victim)
    plain = tmp_path / "latency"  # no suffix: matplotlib alone would have written latency.png
    for histogram in (linked, plain):
        report = run_json(capsys, "--engine", str(engines["stream"]), "--episodes", "1",
                          "--histogram", str(histogram))
        assert histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not histogram.is_symlink()
        assert report["histogram"] == str(histogram) and report.get("histogram_error") is None
    assert victim.read_bytes() == b"the user's picture"
    assert not (tmp_path / "latency.png").exists()


def test_a_histogram_path_that_is_a_directory_is_refused_after_the_results(capsys, engines, tmp_path):
    directory = tmp_path / "plots"
    directory.mkdir()
    code = cli.main(["run", "--engine", str(engines["stream"]), "--episodes", "1", "--histogram", str(directory)])
    captured = capsys.readouterr()
    assert captured.out.startswith("episode seed 0: return ")  # the results stand
    assert code == 1 and captured.err.startswith("error: cannot write ") and captured.err.count("\n") == 1
    assert str(directory) in captured.err and "directory" in captured.err
    # With --json every human line goes to stderr: there the order shows.
    code = cli.main(["run", "--engine", str(engines["stream"]), "--episodes", "1", "--histogram", str(directory),
                     "--json"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 1 and lines[0].startswith("episode seed 0: return ")  # the results first
    assert lines[-1].startswith("error: ") and "directory" in lines[-1]  # then the one line
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in captured.err
    assert '"histogram_error"' in captured.out  # the JSON record is printed too
    assert list(directory.iterdir()) == [] and not (tmp_path / "plots.png").exists()
