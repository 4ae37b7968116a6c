"""SAC training resumed from its last save: the step count and the replay buffer carry on, and the
exported replay log closes the episode that the resume cut (real SB3 SAC on Hopper-v5, a few hundred steps)."""

from __future__ import annotations

import numpy as np
import pytest

from contract.errors import DMMError
from dmm_train.behavior import LATEST_BUFFER, LATEST_MODEL, MlpPolicy, export_policies, train_sac
from dmm_train.recipes import replay_rollouts

pytest.importorskip("stable_baselines3", reason="the behavior extra (pip install -e '.[behavior]') is not installed")


def test_resume_continues_the_run_and_its_replay_buffer(tmp_path):
    run = tmp_path / "run"
    train_sac("Hopper-v5", 200, 0, run, snapshot_every=200, buffer_every=100)
    assert (run / LATEST_MODEL).is_file() and (run / LATEST_BUFFER).is_file()
    with np.load(run / "replay.npz") as log:
        first = {name: log[name].copy() for name in ("observations", "actions", "rewards")}
    assert len(first["rewards"]) == 200

    train_sac("Hopper-v5", 400, 0, run, snapshot_every=200, buffer_every=100, resume=True)
    with np.load(run / "replay.npz") as log:
        assert len(log["rewards"]) == 400  # SB3's step count went on from 200, not from 0
        for name, values in first.items():
            assert np.array_equal(log[name][:200], values), name
    assert MlpPolicy.load(run / "sac_400.npz").metadata["steps"] == 400

    export_policies(run, 400, None, out_dir=tmp_path / "out", episodes=1, env="Hopper-v5")
    lengths = np.cumsum([len(r) for r in replay_rollouts(tmp_path / "out" / "hopper_medium_replay.npz")])
    assert 200 in lengths and lengths[-1] == 400  # the episode running at the save point ends there

    with pytest.raises(DMMError, match="expected --steps above 400"):
        train_sac("Hopper-v5", 400, 0, run, snapshot_every=200, buffer_every=100, resume=True)
    with pytest.raises(DMMError, match="--resume"):
        train_sac("Hopper-v5", 400, 0, tmp_path / "empty", snapshot_every=200, buffer_every=100, resume=True)
