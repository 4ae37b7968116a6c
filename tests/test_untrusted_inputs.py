"""Files from others never run code: checkpoints and resume points load as plain data, export names
cannot inject into generated files, a manifest never decides what gymnasium imports, and the native
cache loads only the library it built.
"""

from __future__ import annotations

import ast
import ctypes
import json
import runpy
import shutil
import textwrap

import numpy as np
import pytest
import torch

import cli
from contract.errors import DMMError
from contract.files import sha256_file
from contract.manifest import read_manifest
from tests.helpers import REPO_ROOT, assert_one_line_error, c_compiler, copy_engine, edit_manifest


class Payload:
    """Pickled, it runs code on load: it writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def plain_checkpoint(checkpoint_path) -> dict:
    return torch.load(checkpoint_path, weights_only=True)


def write_payload_checkpoint(checkpoint_path, directory, marker):
    directory.mkdir(parents=True, exist_ok=True)
    payload = plain_checkpoint(checkpoint_path)
    payload["preset"] = Payload(marker)  # a value every loader reads
    torch.save(payload, directory / "model.pt")
    return directory / "model.pt"


@pytest.mark.parametrize("command", ["eval", "export", "export-c", "run"])
def test_checkpoint_whose_pickle_runs_code_is_refused(checkpoint_path, tmp_path, capsys, command):
    marker = tmp_path / "marker"
    model = write_payload_checkpoint(checkpoint_path, tmp_path / "run", marker)
    argv = {"eval": ["eval", "--checkpoint", str(model), "--episodes", "1"],
            "export": ["export", "--checkpoint", str(model), "--out", str(tmp_path / "policy"), "--no-engine"],
            "export-c": ["export", "--checkpoint", str(model), "--target", "c", "--out", str(tmp_path / "policy")],
            "run": ["run", "--engine", str(model), "--episodes", "1"]}[command]
    code = cli.main(argv)
    assert not marker.exists()
    assert_one_line_error(capsys, code, "model.pt", "needs code to load", "exec", "refused")
    assert not list(tmp_path.glob("policy*"))


def test_resume_point_whose_pickle_runs_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"step": 3, "train_config": {}, "note": Payload(marker)}, run / "resume.pt")
    code = cli.main(["train", "--out", str(run), "--resume", "--steps", "5", "--quiet"])
    assert not marker.exists()
    assert_one_line_error(capsys, code, "resume.pt", "needs code to load", "refused")


def test_resume_point_of_earlier_runs_loads_and_only_their_numpy_array(tmp_path):
    """Resume points written before the RNG states were plain data hold numpy's uint32 RNG key: that
    array, and no other kind, is still accepted."""
    from dmm_train.train import RESUME_KEYS, _set_rng_state, load_resume_point

    base = {key: {} for key in RESUME_KEYS}
    np.random.seed(11)
    legacy = {**base, "step": 0, "sampler_state": {}, "rng_state": {
        "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": (3, tuple(range(625)), None)}}
    torch.save(legacy, tmp_path / "resume.pt")
    expected = np.random.rand(3)
    np.random.seed(0)
    _set_rng_state(load_resume_point(tmp_path / "resume.pt")["rng_state"])
    np.testing.assert_array_equal(np.random.rand(3), expected)

    torch.save({**legacy, "extra": np.array([object()], dtype=object)}, tmp_path / "resume.pt")
    with pytest.raises(DMMError, match="needs code to load"):
        load_resume_point(tmp_path / "resume.pt")


def test_committed_resume_points_load_as_plain_data():
    """The quality runs resume from the resume points committed under bench/results."""
    from dmm_train.train import _rank_states, _set_rng_state, load_resume_point

    committed = sorted((REPO_ROOT / "bench" / "results").rglob("resume.pt"))
    assert committed
    for path in committed:
        state = load_resume_point(path)
        for rank in _rank_states(state):
            _set_rng_state(rank["rng_state"])
            assert np.random.get_state()[2] == rank["rng_state"]["numpy"][2]


@pytest.mark.parametrize("key", ["model_config", "dataset", "model_state"])
def test_checkpoint_missing_a_key_is_one_line(checkpoint_path, tmp_path, capsys, key):
    payload = plain_checkpoint(checkpoint_path)
    payload.pop(key)
    torch.save(payload, tmp_path / "model.pt")
    code = cli.main(["eval", "--checkpoint", str(tmp_path / "model.pt"), "--episodes", "1"])
    assert_one_line_error(capsys, code, "model.pt", f"lacks {key}")


def test_checkpoint_with_a_wrong_config_is_one_line(checkpoint_path, tmp_path, capsys):
    payload = plain_checkpoint(checkpoint_path)
    payload["model_config"]["no_such_field"] = 1
    torch.save(payload, tmp_path / "model.pt")
    code = cli.main(["eval", "--checkpoint", str(tmp_path / "model.pt"), "--episodes", "1"])
    assert_one_line_error(capsys, code, "model.pt", "no_such_field")


@pytest.mark.parametrize("name", ['a"""b', "-x", "a\nb", "a'b", "a\\b", ".hidden", "x" * 101])
@pytest.mark.parametrize("target", ["onnx", "c"])
def test_export_name_that_could_inject_is_refused_at_the_start(checkpoint_path, tmp_path, monkeypatch, capsys,
                                                                name, target):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["export", "--checkpoint", str(checkpoint_path), "--target", target, "--out", name,
                     "--no-engine"] if target == "onnx" else
                    ["export", "--checkpoint", str(checkpoint_path), "--target", target, "--out", name])
    assert_one_line_error(capsys, code, "export name", "expected 1 to 100 letters")
    assert list(tmp_path.iterdir()) == []


def test_export_name_from_the_checkpoint_is_checked_too(checkpoint_path, tmp_path, monkeypatch, capsys):
    """Without --out, the checkpoint's preset names the export: a file's word, checked like --out."""
    payload = plain_checkpoint(checkpoint_path)
    payload["preset"] = 'h"""\nimport os'
    torch.save(payload, tmp_path / "model.pt")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    code = cli.main(["export", "--checkpoint", str(tmp_path / "model.pt"), "--no-engine"])
    assert_one_line_error(capsys, code, "export name", "contains")
    assert list((tmp_path / "out").iterdir()) == []


def test_directories_in_the_export_name_are_allowed():
    from contract.names import check_export_name

    assert check_export_name("out/-dir/hopper-v2.onnx", ".onnx") == "hopper-v2"
    assert check_export_name("hopper.v2", ".c") == "hopper.v2"


def test_generated_loader_docstring_cannot_be_closed(engines, tmp_path):
    """Text from a manifest or a message (env ids, dataset ids) enters the loader's docstring escaped."""
    from export.polygraphy_check import data_loader_files

    marker = tmp_path / "marker"
    manifest = read_manifest(engines["window"].with_suffix(".json"))
    feeds = [{spec.name: np.zeros(spec.shape, dtype=spec.dtype) for spec in manifest.inputs}]
    source = f'x"""\nopen({str(marker)!r}, "w").write("ran")\n"""\\ and "quotes\x00'
    _, files = data_loader_files(tmp_path / "hopper.onnx", manifest, feeds, source)
    for path, data in files.items():
        path.write_bytes(data)
    script = next(path for path in files if path.suffix == ".py")
    tree = ast.parse(script.read_text())
    docstring = ast.get_docstring(tree, clean=False)
    assert " ".join(source.split()) in " ".join(docstring.split())  # the text itself (wrapped to 110 columns)
    assert [type(node).__name__ for node in tree.body][:2] == ["Expr", "ImportFrom"]
    module = runpy.run_path(str(script))
    assert not marker.exists()
    assert len(list(module["load_data"]())) == 1


def test_generated_c_prefix_comes_from_a_checked_name():
    from contract.names import check_export_name
    from export.c_source import c_identifier

    assert c_identifier(check_export_name("hopper-c.v2")) == "hopper_c_v2"
    with pytest.raises(DMMError, match="export name"):
        check_export_name('x"\n#include')


def write_plant_module(directory, name, marker):
    """A module that, imported, writes ``marker`` and registers Hopper-v5 under another id."""
    (directory / f"{name}.py").write_text(textwrap.dedent(f"""
        import gymnasium
        open({str(marker)!r}, "w").write("imported")
        gymnasium.register("ImportedHopper-v0", entry_point="gymnasium.envs.mujoco.hopper_v5:HopperEnv",
                           max_episode_steps=1000)
    """))


def test_manifest_env_id_that_imports_a_module_is_refused_unless_named_on_the_command_line(
        engines, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker"
    module = f"plant_module_{tmp_path.name.replace('-', '_')}"
    write_plant_module(tmp_path, module, marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    engine = copy_engine(engines["window"], tmp_path)
    env_id = f"{module}:ImportedHopper-v0"
    edit_manifest(engine, env_id=env_id)

    code = cli.main(["run", "--engine", str(engine), "--episodes", "1"])
    assert not marker.exists()
    assert_one_line_error(capsys, code, repr(env_id), "registered gymnasium id", "--env")

    code = cli.main(["run", "--engine", str(engine), "--episodes", "1", "--env", env_id, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert marker.exists()  # the user's choice: gymnasium imported it
    assert json.loads(captured.out.strip().splitlines()[-1])["env_id"] == env_id


def test_checkpoint_env_id_that_imports_a_module_is_refused(checkpoint_path, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker"
    module = f"ckpt_module_{tmp_path.name.replace('-', '_')}"
    write_plant_module(tmp_path, module, marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    payload = plain_checkpoint(checkpoint_path)
    payload["env_id"] = f"{module}:ImportedHopper-v0"
    torch.save(payload, tmp_path / "model.pt")
    code = cli.main(["eval", "--checkpoint", str(tmp_path / "model.pt"), "--episodes", "1"])
    assert not marker.exists()
    assert_one_line_error(capsys, code, "registered gymnasium id")


ANSWER_C = "int answer(void) {{ return {value}; }}\n"


@pytest.mark.parametrize("planted", ["another library", "garbage", "no record"])
def test_native_cache_rebuilds_a_library_it_did_not_build(tmp_path, monkeypatch, planted):
    from runtime.native_build import build_shared_library

    c_compiler()
    monkeypatch.setenv("DMM_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "answer.c"
    source.write_text(ANSWER_C.format(value=42))
    flags = ("-O1", "-fPIC")
    library = build_shared_library([source], library_name="libanswer.so", subdir="test", flags=flags)
    record = library.with_name(library.name + ".sha256")
    built = sha256_file(library)
    assert record.read_text().strip() == built

    if planted == "another library":
        other = tmp_path / "other" / "answer.c"
        other.parent.mkdir()
        other.write_text(ANSWER_C.format(value=7))
        shutil.copy(build_shared_library([other], library_name="libanswer.so", subdir="other", flags=flags),
                    library)
    elif planted == "garbage":
        library.write_bytes(b"\x7fELF not a library")
    else:  # the library stays, its record goes: unverifiable, so rebuilt
        record.unlink()
        library.write_bytes(b"\x7fELF not a library")

    again = build_shared_library([source], library_name="libanswer.so", subdir="test", flags=flags)
    assert again == library
    assert sha256_file(again) == record.read_text().strip()
    assert ctypes.CDLL(str(again)).answer() == 42
