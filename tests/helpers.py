"""Shared test helpers: real checkpoints, datasets and exported engines on disk, and the one-line error check.

Fixtures built from these live in conftest.py; test modules import helpers from here, never from
each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from contract.deployment import PolicyFacts
from contract.manifest import MODES, manifest_path_for
from dmm_train.baselines import build_policy
from dmm_train.checkpoint import checkpoint_metadata, save_model
from dmm_train.config import ModelConfig, TrainConfig, get_preset

REPO_ROOT = Path(__file__).resolve().parent.parent


def preset_facts(preset, model, state_mean, state_std) -> PolicyFacts:
    """The deployment facts of ``model`` with a named preset's env, targets and references."""
    return PolicyFacts(preset=preset.name, env_id=preset.env_id, state_dim=model.config.state_dim,
                       act_dim=model.config.act_dim, context_len=model.config.context_len, state_mean=state_mean,
                       state_std=state_std, rtg_scale=preset.rtg_scale, target_returns=preset.target_returns,
                       ref_min_score=preset.ref_min_score, ref_max_score=preset.ref_max_score)


def write_checkpoint(directory, *, seed: int = 0, preset: str = "hopper", model_kind: str = "dmm"):
    """A model.pt of a freshly initialised model (DMM, or the baseline ``model_kind``) with plausible
    Hopper normalisation stats."""
    torch.manual_seed(seed)
    env_preset = get_preset(preset)
    model = build_policy(ModelConfig.from_preset(env_preset, model=model_kind)).eval()
    rng = np.random.default_rng(seed)
    state_mean = rng.normal(0.0, 0.5, env_preset.state_dim).astype(np.float32)
    state_std = rng.uniform(0.2, 2.0, env_preset.state_dim).astype(np.float32)
    metadata = checkpoint_metadata(
        model=model, train_config=dataclasses.asdict(TrainConfig(preset=preset, model=model_kind)),
        facts=preset_facts(env_preset, model, state_mean, state_std),
        dataset_id="fixture/untrained", dataset_hash="0" * 64, step=0,
    )
    return save_model(directory, model, metadata)


_ENGINES: dict[str, dict[str, Path]] = {}


def export_engines(checkpoint_path: Path, directory: Path) -> dict[str, Path]:
    """mode -> .onnx (manifest beside it) of ``checkpoint_path``, exported once per test session."""
    from export.onnx_export import export_checkpoint

    key = str(checkpoint_path)
    if key not in _ENGINES:
        _ENGINES[key] = {mode: export_checkpoint(checkpoint_path, mode=mode, out=directory / f"hopper-{mode}")[0]
                         for mode in MODES}
    return _ENGINES[key]


def copy_engine(engine: Path, directory: Path) -> Path:
    """A private copy of an engine and its manifest, free to damage."""
    target = directory / engine.name
    shutil.copy(engine, target)
    shutil.copy(manifest_path_for(engine), manifest_path_for(target))
    return target


def edit_manifest(engine: Path, **changes) -> None:
    path = manifest_path_for(engine)
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def assert_one_line_error(capsys, code: int, *fragments: str) -> str:
    captured = capsys.readouterr()
    assert code != 0
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in captured.err, (fragment, captured.err)
    return captured.err


_CACHE: dict[str, tuple] = {}


def dataset_checkpoint(tmp_path_factory):
    """(checkpoint path, dataset directory): a real random-policy Hopper-v5 Minari dataset and a seeded,
    untrained hopper checkpoint whose metadata names that dataset (id, content hash, normalisation).
    """
    if "pair" not in _CACHE:
        import torch

        from dmm_train.config import ModelConfig, TrainConfig, get_preset
        from dmm_train.minari_reader import load_dataset
        from dmm_train.model import DecisionMetaMamba
        from dmm_train.recipes import collect

        root = tmp_path_factory.mktemp("precision")
        dataset_dir = collect("Hopper-v5", "test/precision-hopper-v0", policy="random", episodes=40, seed=3,
                              out=root / "store")
        dataset = load_dataset(dataset_dir)
        preset = get_preset("hopper")
        torch.manual_seed(0)
        model = DecisionMetaMamba(ModelConfig.from_preset(preset)).eval()
        metadata = checkpoint_metadata(
            model=model, train_config=dataclasses.asdict(TrainConfig(preset="hopper")),
            facts=preset_facts(preset, model, dataset.state_mean, dataset.state_std),
            dataset_id=dataset.dataset_id, dataset_hash=dataset.content_hash, step=0,
        )
        _CACHE["pair"] = (save_model(root / "run", model, metadata), dataset_dir)
    return _CACHE["pair"]


@contextlib.contextmanager
def one_torch_thread():
    """Batch-1 forwards: threads only add OpenMP waits on a busy 2-core CI box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def c_compiler() -> str:
    """The C compiler the native backend would use; the calling test is skipped where there is none."""
    import os

    import pytest

    found = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if not found:
        pytest.skip("no C compiler on this machine (the C target compiles on first use)")
    return found


_C_EXPORTS: dict[str, Path] = {}


def export_c(checkpoint_path: Path, directory: Path) -> Path:
    """hopper-c.c (hopper-c.h and hopper-c.json beside it; API prefix hopper_) of ``checkpoint_path``, exported
    once per test session under the default NAME."""
    from export.c_source import export_c_checkpoint

    c_compiler()
    key = str(checkpoint_path)
    if key not in _C_EXPORTS:
        _C_EXPORTS[key] = export_c_checkpoint(checkpoint_path, out=directory / "hopper-c")[0]
    return _C_EXPORTS[key]


def copy_c_export(c_path: Path, directory: Path) -> Path:
    """A private copy of NAME.c, NAME.h and NAME.json, free to damage."""
    for suffix in (".c", ".h", ".json"):
        shutil.copy(c_path.with_suffix(suffix), directory / c_path.with_suffix(suffix).name)
    return directory / c_path.name
def trained_checkpoint(tmp_path_factory, *, train_steps: int = 400, dataset_steps: int = 6000):
    """(checkpoint path, dataset directory): DMM trained for ``train_steps`` official steps on a small
    embedded hopper-medium dataset (the medium SAC policy's rollouts): a policy that hops, whose
    episodes differ in length from seed to seed, as a trained checkpoint's do.
    """
    key = f"trained-{train_steps}-{dataset_steps}"
    if key not in _CACHE:
        from dmm_train.config import TrainConfig
        from dmm_train.recipes import collect_recipe
        from dmm_train.train import train

        root = tmp_path_factory.mktemp("trained")
        dataset_dir = collect_recipe("hopper-medium", steps=dataset_steps, out=root / "store", progress=False)
        config = TrainConfig(preset="hopper", dataset=str(dataset_dir), steps=train_steps, seed=0, eval_episodes=0,
                             checkpoint_every=train_steps)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # torch's OpenMP pool on a loaded 2-core machine: 10x slower steps
        try:
            _CACHE[key] = (train(config, root / "run", progress=False), dataset_dir)
        finally:
            torch.set_num_threads(threads)
    return _CACHE[key]


def gpu_runtime_usable() -> tuple[bool, str]:
    """Whether plans can be built and run here: TensorRT and a GPU (`export.trt_build.tensorrt_status`), and
    pycuda, which the TensorRT backend runs on (the GPU may have answered through cuda-python alone)."""
    from export.trt_build import tensorrt_status
    from runtime.cuda_support import CudaUnavailable, import_pycuda

    usable, why = tensorrt_status()
    if not usable:
        return False, why
    try:
        import_pycuda()
    except CudaUnavailable as unavailable:
        return False, f"{unavailable}; the TensorRT backend runs on pycuda"
    return True, why


def run_json(capsys, *args: str) -> dict:
    """``cli.py run ARGS --json``: its exit must be 0; the JSON record of its last line."""
    import cli

    code = cli.main(["run", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])
