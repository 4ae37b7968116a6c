"""CLI smoke tests and the error contract: one line on stderr, non-zero exit, no traceback."""

from __future__ import annotations

import json

import pytest

import cli
from dmm_train.recipes import collect
from tests.helpers import assert_one_line_error


@pytest.fixture(scope="module")
def hopper_dataset(tmp_path_factory):
    return collect("Hopper-v5", "test/cli-hopper-v0", policy="random", episodes=5, seed=1,
                   out=tmp_path_factory.mktemp("datasets"))


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["train", "--steps", "0"], ["--steps 0", "positive"]),
        (["train", "--steps", "many"], ["'many'", "--steps"]),
        (["train", "--preset", "ant"], ["'ant'", "hopper"]),
        (["train", "--batch-size", "-3"], ["--batch-size -3"]),
        (["train", "--scan", "magic"], ["'magic'", "loop"]),
        (["eval", "--checkpoint", "no/such/model.pt"], ["no/such/model.pt", "does not exist"]),
        (["train", "--no-such-option"], ["--no-such-option"]),
    ],
)
def test_invalid_options_give_one_line(capsys, args, fragments):
    assert_one_line_error(capsys, cli.main(args), *fragments)


def test_unknown_remote_dataset_fails_fast_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    code = cli.main(["train", "--dataset", "nobody/nothing-v0", "--steps", "1", "--out", str(tmp_path / "r")])
    assert_one_line_error(capsys, code, "nobody/nothing-v0")


def test_dataset_dims_must_match_preset(capsys, tmp_path, hopper_dataset):
    code = cli.main(["train", "--dataset", str(hopper_dataset), "--preset", "walker2d", "--steps", "1",
                     "--out", str(tmp_path / "r")])
    assert_one_line_error(capsys, code, "11/3", "17/6", "--preset")


def test_eval_rejects_zero_episodes(capsys, checkpoint_path):
    assert_one_line_error(capsys, cli.main(["eval", "--checkpoint", str(checkpoint_path), "--episodes", "0"]),
                          "--episodes 0")


def test_eval_json_reports_every_target(capsys, checkpoint_path):
    code = cli.main(["eval", "--checkpoint", str(checkpoint_path), "--episodes", "2",
                     "--target", "3600", "--target", "7200", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["target_return"] for r in report["results"]] == [3600.0, 7200.0]
    for result in report["results"]:
        assert len(result["returns"]) == 2 and all(n > 0 for n in result["lengths"])
        expected = 100 * (result["return_mean"] + 20.272305) / (3234.3 + 20.272305)
        assert result["normalized_mean"] == pytest.approx(expected)


def test_collect_writes_a_dataset(capsys, tmp_path):
    code = cli.main(["collect", "--episodes", "2", "--seed", "4", "--out", str(tmp_path), "--dataset-id",
                     "test/collect-v0"])
    assert code == 0
    assert "test/collect-v0" in capsys.readouterr().out


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    output = capsys.readouterr().out
    listed = {line.split()[0] for line in output.split("Commands:", 1)[1].splitlines() if line.strip()}
    assert listed == set(cli.cli.commands), (listed, sorted(cli.cli.commands))
    for command in sorted(cli.cli.commands):  # and each command's own help runs
        assert cli.main([command, "--help"]) == 0, command
        assert "Usage:" in capsys.readouterr().out
