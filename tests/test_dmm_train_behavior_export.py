"""Exporting SAC snapshots of any env into the shipped-file names the recipes read."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from contract.errors import DMMError
from dmm_train.behavior import MlpPolicy, export_policies, policy_prefix
from dmm_train.recipes import POLICY_DIR, replay_rollouts
from dmm_train.rollouts import rollout_episodes


def write_run(run, env_id: str, steps: int) -> list:
    """A run directory as 'train' leaves it: two snapshots and SB3's replay buffer layout (real rollouts)."""
    run.mkdir()
    actor = MlpPolicy.load(POLICY_DIR / "hopper_medium.npz")
    for step in (100, 200):
        shutil.copy(POLICY_DIR / "hopper_medium.npz", run / f"sac_{step}.npz")
    rollouts = rollout_episodes(env_id, actor, n_steps=steps, seed=4)
    np.savez(run / "replay.npz",
             observations=np.concatenate([r.observations[:-1] for r in rollouts]),
             next_observations=np.concatenate([r.observations[1:] for r in rollouts]),
             actions=np.concatenate([r.actions for r in rollouts]),
             rewards=np.concatenate([r.rewards for r in rollouts]),
             dones=np.concatenate([r.terminations | r.truncations for r in rollouts]).astype(np.float32),
             timeouts=np.concatenate([r.truncations for r in rollouts]).astype(np.float32))
    return rollouts


def test_export_names_the_files_after_the_env(tmp_path):
    rollouts = write_run(tmp_path / "run", "Hopper-v5", 120)
    out = tmp_path / "out"
    export_policies(tmp_path / "run", 100, 200, out_dir=out, episodes=1, env="Hopper-v5", expert_label="best")
    assert sorted(p.name for p in out.iterdir()) == ["hopper_best.npz", "hopper_medium.npz",
                                                     "hopper_medium_replay.npz"]
    assert MlpPolicy.load(out / "hopper_best.npz").metadata["sac_steps"] == 200
    replayed = replay_rollouts(out / "hopper_medium_replay.npz")
    assert sum(len(r) for r in replayed) == 100
    assert np.allclose(replayed[0].observations[:-1], rollouts[0].observations[:-1][: len(replayed[0])], atol=1e-6)
    assert replayed[-1].truncations[-1]


def test_export_errors(tmp_path):
    assert (policy_prefix("Walker2d-v5"), policy_prefix("halfcheetah")) == ("walker2d", "halfcheetah")
    with pytest.raises(DMMError, match="expected one of Hopper-v5"):
        policy_prefix("Ant-v5")
    (tmp_path / "run").mkdir()
    with pytest.raises(DMMError, match="no sac_100.npz"):
        export_policies(tmp_path / "run", 100, None, out_dir=tmp_path / "out", env="hopper")
