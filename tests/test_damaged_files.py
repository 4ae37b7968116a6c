"""Every file the project reads, missing, truncated, of random bytes or of another kind: one clear line.

One test per kind of file (datasets, checkpoints, resume points, training metrics, manifests,
graphs, plans, shipped policies and the replay log). Each damages a real file written by the
project and asserts a DMMError whose message is a single line naming the file, never a traceback
from a library. (A TensorRT timing cache is opaque: only TensorRT itself can judge one; its
rejection is handled in the builder, on the GPU.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from contract.errors import DMMError
from contract.manifest import manifest_path_for, read_manifest
from tests.helpers import copy_engine

DAMAGES = ("missing", "truncated", "random", "other-kind")


def damage(path: Path, how: str) -> None:
    """Damage ``path`` in place: remove it, cut it in half, fill it with random bytes, or write a foreign file."""
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: max(len(data) // 2, 1)])
    elif how == "random":
        path.write_bytes(np.random.default_rng(7).integers(0, 256, max(path.stat().st_size, 64), np.uint8).tobytes())
    else:  # a file of another kind under the expected name: a small JSON / text document
        path.write_text('{"kind": "something-else", "format_version": 99}\n')


def assert_one_clear_line(call, *fragments: str) -> str:
    with pytest.raises(DMMError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    from dmm_train.recipes import collect

    return collect("Hopper-v5", "test/damage-hopper-v0", policy="random", episodes=4, seed=0,
                   out=tmp_path_factory.mktemp("store"))


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("part", ["metadata", "episodes"])
def test_damaged_dataset(dataset_dir, tmp_path, how, part):
    from dmm_train.minari_reader import load_dataset

    copy = tmp_path / "dataset"
    shutil.copytree(dataset_dir, copy)
    data = copy / "data"
    target = data / "metadata.json" if part == "metadata" else next(p for p in data.iterdir() if p.suffix != ".json")
    damage(target, how)
    assert_one_clear_line(lambda: load_dataset(copy), str(copy) if part == "metadata" or how != "missing" else "")


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_checkpoint(checkpoint_path, tmp_path, how):
    from dmm_train.checkpoint import load_checkpoint

    copy = tmp_path / "model.pt"
    shutil.copy(checkpoint_path, copy)
    damage(copy, how)
    assert_one_clear_line(lambda: load_checkpoint(copy), "model.pt")


@pytest.fixture(scope="module")
def short_run(dataset_dir, tmp_path_factory):
    from dmm_train.config import TrainConfig
    from dmm_train.train import train

    out = tmp_path_factory.mktemp("run") / "run"
    train(TrainConfig(dataset=str(dataset_dir), steps=4, checkpoint_every=2, eval_every=0, eval_episodes=0),
          out, progress=False)
    return out


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["resume.pt", "metrics.jsonl"])
def test_damaged_resume_point(short_run, dataset_dir, tmp_path, how, name):
    from dmm_train.config import TrainConfig
    from dmm_train.train import train

    copy = tmp_path / "run"
    shutil.copytree(short_run, copy)
    damage(copy / name, how)
    config = TrainConfig(dataset=str(dataset_dir), steps=6, checkpoint_every=2, eval_every=0, eval_episodes=0)
    if name == "metrics.jsonl" and how in ("missing", "truncated"):
        # The log is advisory: lines cut by a kill are dropped and the run resumes.
        train(config, copy, resume=True, progress=False)
        return
    assert_one_clear_line(lambda: train(config, copy, resume=True, progress=False), name)


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_manifest(engines, tmp_path, how):
    engine = copy_engine(engines["window"], tmp_path)
    manifest = manifest_path_for(engine)
    damage(manifest, how)
    assert_one_clear_line(lambda: read_manifest(manifest), manifest.name)


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_graph(engines, tmp_path, how):
    from runtime.loading import load_backend

    engine = copy_engine(engines["stream"], tmp_path)
    damage(engine, how)
    assert_one_clear_line(lambda: load_backend(engine).close(), engine.name)


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_plan(engines, tmp_path, how):
    # A plan is judged against its manifest's sha256 before TensorRT is involved.
    from contract.files import sha256_bytes
    from contract.manifest import write_manifest
    from runtime.loading import load_backend
    from runtime.tensorrt_support import PLAN_KIND

    plan = tmp_path / "hopper.plan"
    data = np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes()
    plan.write_bytes(data)
    manifest = read_manifest(manifest_path_for(engines["window"]))
    engine = {"kind": PLAN_KIND, "tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7",
              "plan_sha256": sha256_bytes(data), "plan_bytes": len(data),
              "io": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype}
                     for s in (*manifest.inputs, *manifest.outputs)]}
    import dataclasses

    write_manifest(dataclasses.replace(manifest, engine=engine), manifest_path_for(plan))
    damage(plan, how)
    assert_one_clear_line(lambda: load_backend(plan).close(), plan.name)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["hopper_medium.npz", "hopper_medium_replay.npz"])
def test_damaged_shipped_policy_or_replay_log(tmp_path, how, name):
    from dmm_train.behavior import POLICY_DIR, MlpPolicy
    from dmm_train.recipes import replay_rollouts

    copy = tmp_path / name
    shutil.copy(POLICY_DIR / name, copy)
    damage(copy, how)
    read = MlpPolicy.load if name == "hopper_medium.npz" else replay_rollouts
    assert_one_clear_line(lambda: read(copy), name)
