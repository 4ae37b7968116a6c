"""The baselines (Decision Mamba, Decision Transformer, BC) in the DMM harness: sizes, causality,
DMamba's conv, DT's timesteps and padding mask, and train / eval / resume / export through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cli
from contract.errors import DMMError
from dmm_train.baselines import (
    BehaviorCloning,
    DecisionMamba,
    DecisionTransformer,
    MambaConvBlock,
    build_policy,
    policy_actions,
)
from dmm_train.checkpoint import load_checkpoint
from dmm_train.config import MODEL_KINDS, ModelConfig, get_preset
from dmm_train.minari_reader import load_dataset
from dmm_train.model import DecisionMetaMamba, SelectiveSSM, count_parameters
from dmm_train.recipes import collect
from dmm_train.sampler import WindowSampler
from tests.helpers import write_checkpoint

EXACT = 1e-6  # float32 reordering only; a leak from another token is orders of magnitude larger

# Hopper sizes. DT: kzl's 727,695 less its dead weights: wte (vocab 1 x 128), predict_state
# (128 x 11 + 11) and predict_return (128 + 1). DMamba: DMM less its 3 DSMs (3 x 6 x 64 x 64)
# and the shared LN_1 (2 x 64), plus 3 depthwise convs (64 x 4 weights + 64 biases).
# BC: 11 -> 256 -> 256 -> 3.
EXPECTED_PARAMS = {
    "dmm": 123_587,
    "dmamba": 123_587 - 3 * 6 * 64 * 64 - 2 * 64 + 3 * (64 * 4 + 64),
    "dt": 727_695 - 128 - (128 * 11 + 11) - (128 + 1),
    "bc": (11 * 256 + 256) + (256 * 256 + 256) + (256 * 3 + 3),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """These models and batches are tiny: on a shared 2-core machine torch's thread pool only adds
    contention (a 20-step run took 10x longer with 2 threads than with 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build(kind: str, **overrides):
    torch.manual_seed(0)
    return build_policy(ModelConfig.from_preset(get_preset("hopper"), model=kind, **overrides)).eval()


def window(model, batch: int = 2, seed: int = 0):
    """A realistic window for ``model``: states (B, K, S), actions (B, K, Adim), rtg (B, K, 1), timesteps (B, K)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    steps = config.context_len
    states = torch.randn(batch, steps, config.state_dim, generator=generator)
    actions = torch.rand(batch, steps, config.act_dim, generator=generator) * 2 - 1
    rtg = 3.6 - torch.rand(batch, steps, 1, generator=generator).cumsum(1) * 0.003
    timesteps = (torch.arange(steps) + 40).repeat(batch, 1)
    return states, actions, rtg, timesteps


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_parameter_counts(kind):
    model = build(kind)
    assert count_parameters(model) == EXPECTED_PARAMS[kind]
    assert {"dmm": DecisionMetaMamba, "dmamba": DecisionMamba, "dt": DecisionTransformer,
            "bc": BehaviorCloning}[kind] is type(model)


def test_kind_defaults_follow_the_official_codes():
    hopper = get_preset("hopper")
    dt = ModelConfig.from_preset(hopper, model="dt")
    assert (dt.context_len, dt.d_model, dt.n_layer, dt.n_head, dt.max_ep_len) == (20, 128, 3, 1, 1000)
    assert build("dt").embed_timestep.weight.shape == (1000, 128)
    assert ModelConfig.from_preset(hopper, model="dmamba").context_len == 8
    assert ModelConfig.from_preset(hopper, model="bc").context_len == 1
    # The shared-DSM quirk of the official antmaze code is DMM's only.
    assert not ModelConfig.from_preset(get_preset("antmaze"), model="dmamba").share_dsm_across_layers
    with pytest.raises(DMMError, match="unknown model 'gpt'"):
        ModelConfig.from_preset(hopper, model="gpt")


@torch.no_grad()
@pytest.mark.parametrize("kind", ["dmamba", "dt", "bc"])
def test_action_at_step_t_ignores_a_t_and_everything_later(kind):
    model = build(kind, context_len=8)
    states, actions, rtg, timesteps = window(model)
    t = 4
    changed_states, changed_actions, changed_rtg = states.clone(), actions.clone(), rtg.clone()
    changed_actions[:, t:] = -changed_actions[:, t:]  # a_t is a placeholder in evaluation
    changed_states[:, t + 1:] += 1.0
    changed_rtg[:, t + 1:] -= 0.5
    before = policy_actions(model, states, actions, rtg, timesteps)
    after = policy_actions(model, changed_states, changed_actions, changed_rtg, timesteps)
    difference = (before[:, : t + 1] - after[:, : t + 1]).abs().max().item()
    assert difference < EXACT, f"{kind}: the future moved step <= {t} by {difference:.2e}"
    if kind != "bc":  # the sequence models do read the past
        assert (before[:, t + 1:] - after[:, t + 1:]).abs().max().item() > 1e-4


def test_dmamba_block_is_dmms_block_plus_a_causal_depthwise_conv_of_width_4():
    block = build("dmamba").ssm[0]
    assert isinstance(block, MambaConvBlock) and isinstance(block, SelectiveSSM)
    conv = block.conv1d
    assert conv.weight.shape == (64, 1, 4) and conv.groups == 64 and conv.bias.shape == (64,)
    names = set(dict(block.named_parameters()))
    assert names - set(dict(SelectiveSSM(64, 16, 4).named_parameters())) == {"conv1d.weight", "conv1d.bias"}

    x = torch.randn(2, 24, 64, requires_grad=True)  # (B, L, D)
    out = block.causal_conv(x)
    reference = block.causal_conv_reference(x)
    assert (out - reference).abs().max().item() < EXACT  # the fast form against Mamba's Conv1d
    grads = torch.autograd.grad(out.square().sum(), (x, conv.weight, conv.bias))
    reference_grads = torch.autograd.grad(reference.square().sum(), (x, conv.weight, conv.bias))
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        assert torch.allclose(grad, reference_grad, atol=1e-4, rtol=1e-4)
    x, out = x.detach(), out.detach()
    t, channel = 10, 7
    expected = (conv.weight[channel, 0] * x[:, t - 3: t + 1, channel]).sum(-1) + conv.bias[channel]  # oldest first
    assert torch.allclose(out[:, t, channel], expected, atol=EXACT)
    assert torch.allclose(out[:, 1, channel], (conv.weight[channel, 0, 2:] * x[:, :2, channel]).sum(-1)
                          + conv.bias[channel], atol=EXACT)  # zeros before the sequence start
    bumped = x.clone()
    bumped[:, t, channel] += 1.0
    with torch.no_grad():
        moved = (block.causal_conv(bumped) - out).abs() > 1e-7  # (B, L, D)
    assert moved[:, :t].sum() == 0 and moved[:, t + 4:].sum() == 0  # causal, kernel 4
    assert moved[:, :, :channel].sum() == 0 and moved[:, :, channel + 1:].sum() == 0  # depthwise


@torch.no_grad()
def test_dmamba_block_with_an_identity_conv_is_the_dmm_block():
    """The same SelectiveSSM weights and scan; only the conv sits between in_proj and the SiLU."""
    block = build("dmamba").ssm[0]
    block.conv1d.weight.zero_()
    block.conv1d.weight[:, 0, -1] = 1.0  # passes x_t through
    block.conv1d.bias.zero_()
    plain = SelectiveSSM(64, 16, 4)
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("conv1d")})
    u = torch.randn(3, 24, 64)
    assert (block(u) - plain(u)).abs().max().item() < EXACT


@torch.no_grad()
def test_dt_timestep_embedding_is_read_and_clipped():
    model = build("dt")
    states, actions, rtg, timesteps = window(model)
    base = policy_actions(model, states, actions, rtg, timesteps)
    assert (base - policy_actions(model, states, actions, rtg, timesteps + 1)).abs().max().item() > 1e-4
    # As kzl's get_batch: steps past the table read its last row.
    late = torch.full_like(timesteps, 5000)
    last_row = torch.full_like(timesteps, 999)
    assert torch.equal(policy_actions(model, states, actions, rtg, late),
                       policy_actions(model, states, actions, rtg, last_row))
    with pytest.raises(DMMError, match="timesteps"):
        model(states, actions, rtg)


@torch.no_grad()
def test_dt_padding_mask_hides_left_padding():
    """With the mask, a left-padded window acts as the real steps alone, whatever the padding holds."""
    model = build("dt")
    states, actions, rtg, timesteps = window(model, batch=1)
    pad = 7
    mask = torch.ones(1, 20)
    mask[:, :pad] = 0.0
    padded = policy_actions(model, states, actions, rtg, timesteps, mask)[:, pad:]
    alone = policy_actions(model, states[:, pad:], actions[:, pad:], rtg[:, pad:], timesteps[:, pad:])
    assert (padded - alone).abs().max().item() < 1e-5

    junk_states, junk_actions, junk_rtg = states.clone(), actions.clone(), rtg.clone()
    junk_states[:, :pad] = 3.0
    junk_actions[:, :pad] = -10.0  # the trainer's action padding
    junk_rtg[:, :pad] = 0.0
    masked = policy_actions(model, junk_states, junk_actions, junk_rtg, timesteps, mask)[:, pad:]
    unmasked = policy_actions(model, junk_states, junk_actions, junk_rtg, timesteps)[:, pad:]
    assert (masked - padded).abs().max().item() < 1e-5
    assert (unmasked - padded).abs().max().item() > 1e-4  # so the mask is what hides it


@torch.no_grad()
def test_dt_state_token_tail_equals_the_full_last_block():
    model = build("dt")
    states, actions, rtg, timesteps = window(model, batch=3, seed=5)
    mask = torch.ones(3, 20)
    mask[1, :6] = 0.0
    tokens = model.embed_tokens(states, actions, rtg, timesteps)  # (B, 60, D)
    full = model.mix(tokens, mask)[:, 1::3]  # (B, 20, D)
    tail = model.mix(tokens, mask, keep=slice(1, None, 3))  # (B, 20, D)
    assert (full - tail).abs().max().item() < EXACT


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory):
    return collect("Hopper-v5", "test/baselines-hopper-v0", policy="random", episodes=12, seed=2,
                   out=tmp_path_factory.mktemp("datasets"))


def test_sampler_timesteps_are_episode_steps_and_zero_on_padding(dataset_path):
    sampler = WindowSampler(load_dataset(dataset_path), context_len=20, rtg_scale=1000.0)
    episode, start = np.array([0, 1, 2]), np.array([0, 3, 9])
    batch = sampler.windows(episode, start)
    assert batch.timesteps.dtype == np.int64 and batch.timesteps.shape == (3, 20)
    for row, first in enumerate(start):
        real = batch.mask[row] > 0
        assert np.array_equal(batch.timesteps[row, real], first + np.arange(real.sum()))
        assert np.all(batch.timesteps[row, ~real] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_train_then_eval_through_the_cli(kind, dataset_path, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--model", kind, "--dataset", str(dataset_path), "--steps", "20",
                     "--batch-size", "16", "--eval-episodes", "1", "--checkpoint-every", "10", "--out", str(out),
                     "--quiet"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "model.json").read_text())
    assert record["model"] == kind == record["model_config"]["model"] == record["train_config"]["model"]
    assert record["n_params"] == EXPECTED_PARAMS[kind] and record["step"] == 20
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 20 and "normalized_mean" in metrics[-1]
    assert isinstance(load_checkpoint(out).model, type(build(kind)))
    capsys.readouterr()

    code = cli.main(["eval", "--checkpoint", str(out), "--episodes", "2", "--target", "3600", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model"] == kind and report["step"] == 20
    (result,) = report["results"]
    assert len(result["returns"]) == 2 and all(n > 0 for n in result["lengths"])


@pytest.mark.slow
def test_a_resumed_dt_run_equals_an_uninterrupted_one(dataset_path, tmp_path):
    common = ["train", "--model", "dt", "--dataset", str(dataset_path), "--batch-size", "8",
              "--checkpoint-every", "4", "--eval-episodes", "0", "--seed", "3", "--quiet"]
    assert cli.main([*common, "--steps", "12", "--out", str(tmp_path / "straight")]) == 0
    assert cli.main([*common, "--steps", "8", "--out", str(tmp_path / "resumed")]) == 0
    assert load_checkpoint(tmp_path / "resumed").step == 8
    # --model is ignored on resume: the run keeps its own settings.
    assert cli.main([*common[:2], "dmm", *common[3:], "--steps", "12", "--out", str(tmp_path / "resumed"),
                     "--resume"]) == 0
    straight, resumed = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert resumed.step == 12 and resumed.model_config.model == "dt"
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_checkpoint_round_trip_of_a_baseline_and_of_an_old_dmm_checkpoint(tmp_path):
    path = write_checkpoint(tmp_path / "dt", model_kind="dt")
    loaded = load_checkpoint(path)
    assert isinstance(loaded.model, DecisionTransformer) and loaded.metadata["model"] == "dt"
    torch.manual_seed(0)
    fresh = build_policy(ModelConfig.from_preset(get_preset("hopper"), model="dt"))
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in fresh.state_dict().items())

    # A DMM checkpoint written before the model kinds existed has none of their keys.
    payload = torch.load(write_checkpoint(tmp_path / "dmm"), weights_only=True)
    payload.pop("model")
    for key in ("model", "conv_kernel", "n_head", "max_ep_len"):
        payload["model_config"].pop(key)
    torch.save(payload, tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt")
    assert isinstance(old.model, DecisionMetaMamba) and old.model_config.model == "dmm"

    payload["model_config"]["model"] = "rnn"
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(DMMError, match="kind 'rnn'"):
        load_checkpoint(tmp_path / "future.pt")


def test_export_refuses_a_baseline_checkpoint(tmp_path, capsys):
    path = write_checkpoint(tmp_path / "bc", model_kind="bc")
    code = cli.main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "bc")])
    error = capsys.readouterr().err
    assert code == 1 and error.count("\n") == 1 and "'bc' baseline" in error and "'dmm'" in error
    assert not (tmp_path / "bc.onnx").exists()


def test_unknown_model_is_one_line(capsys):
    assert cli.main(["train", "--model", "gpt", "--steps", "1"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "'gpt'" in error and "dmamba" in error
