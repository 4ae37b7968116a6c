"""A checkpoint stays exportable: 'cli.py export --fp16 / --int8' without its training dataset.

The checkpoint records the November default, dmm-deploy/hopper-medium-v0 as the 100k-step content
that id no longer names. With that dataset missing from the store, or the store holding the id's
other content, export says so in one line, calibrates and judges on closed-loop rollouts of the
policy in Hopper-v5 (real MuJoCo, real ONNX Runtime) and records what it used in the manifest.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import cli
from contract.manifest import manifest_path_for
from dmm_train.baselines import build_policy
from dmm_train.checkpoint import checkpoint_metadata, save_model
from dmm_train.config import ModelConfig, TrainConfig, get_preset
from dmm_train.recipes import collect
from tests.helpers import preset_facts

RETIRED_ID = "dmm-deploy/hopper-medium-v0"
RETIRED_HASH = "a9386828075fa2304e0b5833833522220f25045664696d7fe423945044ddf1fa"  # 100k steps, commit 8c0f0f7
FAST = ["--score-episodes", "2", "--no-engine"]


@pytest.fixture(scope="module")
def november_checkpoint(tmp_path_factory):
    """A seeded hopper DMM checkpoint whose metadata names the retired 100k-step hopper-medium-v0."""
    torch.manual_seed(0)
    preset = get_preset("hopper")
    model = build_policy(ModelConfig.from_preset(preset, model="dmm")).eval()
    rng = np.random.default_rng(0)
    facts = preset_facts(preset, model, rng.normal(0.0, 0.5, preset.state_dim),
                         rng.uniform(0.2, 2.0, preset.state_dim))
    metadata = checkpoint_metadata(
        model=model, train_config=dataclasses.asdict(TrainConfig(preset="hopper")), facts=facts,
        dataset_id=RETIRED_ID, dataset_hash=RETIRED_HASH, step=0,
    )
    return save_model(tmp_path_factory.mktemp("november"), model, metadata)


def export(capsys, checkpoint, *args: str) -> tuple[int, str]:
    code = cli.main(["export", "--checkpoint", str(checkpoint), *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_export_calibrates_on_closed_loop_rollouts_when_the_dataset_is_missing(
        capsys, monkeypatch, tmp_path, november_checkpoint, precision):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "empty-store"))
    out = tmp_path / f"november-{precision}"
    extra = ["--calibration-windows", "32"] if precision == "int8" else []
    code, printed = export(capsys, november_checkpoint, f"--{precision}", "--out", str(out), *FAST, *extra)
    assert code == 0, printed
    notices = [line for line in printed.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1, printed
    assert f"the training dataset '{RETIRED_ID}' is not found here" in notices[0]
    # It says which commit made the content, and how to regenerate it.
    assert "git checkout 8c0f0f7 && python cli.py collect --recipe hopper-medium" in notices[0]
    assert "calibrating and judging on closed-loop rollouts of the policy in Hopper-v5" in notices[0]
    onnx_path = out.with_suffix(".onnx")
    assert onnx_path.is_file()
    raw = json.loads(manifest_path_for(onnx_path).read_text())
    assert raw["precision"] == precision
    source = raw["accuracy"]["calibration_source"]
    assert source.startswith("closed-loop rollouts:") and "Hopper-v5" in source and "not found here" in source
    assert raw["exporter"]["precision_pass"]["calibration_source"] == source
    described = raw["exporter"]["precision_pass"]["dataset"]
    assert described["calibration_episodes"] >= 1 and described["heldout_episodes"] >= 1
    assert described["calibration_steps"] + described["heldout_steps"] >= 1000
    assert "not used" in raw["exporter"]["polygraphy"]["source"]


def test_export_does_not_calibrate_on_other_content_under_the_same_id(capsys, monkeypatch, tmp_path,
                                                                     november_checkpoint):
    store = tmp_path / "store"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(store))
    # The id now names other content: here a few random episodes stand in for the 1M-step dataset.
    collect("Hopper-v5", RETIRED_ID, policy="random", episodes=3, seed=1, out=store)
    out = tmp_path / "other-content"
    code, printed = export(capsys, november_checkpoint, "--fp16", "--out", str(out), *FAST)
    assert code == 0, printed
    notice = next(line for line in printed.splitlines() if line.startswith("notice:"))
    assert f"the training dataset '{RETIRED_ID}' here has content hash" in notice
    assert f"not the {RETIRED_HASH[:12]}... the checkpoint was trained on" in notice and "8c0f0f7" in notice
    raw = json.loads(manifest_path_for(out.with_suffix(".onnx")).read_text())
    assert raw["accuracy"]["calibration_source"].startswith("closed-loop rollouts:")


def test_export_uses_a_recording_given_with_dataset(capsys, tmp_path, november_checkpoint):
    recording = collect("Hopper-v5", "test/recording-v0", policy="random", episodes=6, seed=2,
                        out=tmp_path / "store")
    out = tmp_path / "recorded"
    code, printed = export(capsys, november_checkpoint, "--fp16", "--dataset", str(recording), "--out", str(out),
                           *FAST)
    assert code == 0, printed
    assert f"notice: --dataset '{recording}' has content hash" in printed and "as given" in printed
    raw = json.loads(manifest_path_for(out.with_suffix(".onnx")).read_text())
    source = raw["accuracy"]["calibration_source"]
    assert source.startswith("the dataset test/recording-v0") and "given with --dataset" in source
