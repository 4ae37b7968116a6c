"""The model: parameter counts (fidelity to the official code), and step form == sequence form."""

from __future__ import annotations

import pytest
import torch

from dmm_train.config import ModelConfig, get_preset
from dmm_train.model import DecisionMetaMamba, count_parameters

STEP_TOLERANCE = 1e-5


def build(preset: str, **overrides) -> DecisionMetaMamba:
    torch.manual_seed(0)
    return DecisionMetaMamba(ModelConfig.from_preset(get_preset(preset), **overrides)).eval()


@pytest.mark.parametrize(("preset", "expected"), [("hopper", 123_587), ("walker2d", 124_358), ("halfcheetah", 124_358)])
def test_parameter_count_matches_official_code(preset, expected):
    assert count_parameters(build(preset)) == expected


def test_per_layer_norms_add_two_norms_per_extra_layer():
    shared = count_parameters(build("hopper"))
    per_layer = count_parameters(build("hopper", per_layer_norms=True))
    assert per_layer - shared == 2 * 2 * 2 * 64  # 2 extra layers x (LN_1, LN_2) x (weight, bias) x D


def test_shared_dsm_is_one_registered_trainable_module():
    model = build("hopper", share_dsm_across_layers=True)
    assert len(model.dsm) == 1
    assert count_parameters(model) == 123_587 - 2 * 6 * 64 * 64
    assert all(p.requires_grad for p in model.dsm.parameters())


def test_official_init_of_the_layer_stack():
    model = build("hopper")
    ssm = model.ssm[0]
    assert torch.equal(ssm.dt_proj.bias, torch.zeros(64))  # so the initial delta is softplus(0)
    assert torch.allclose(-torch.exp(ssm.A_log[5]), -torch.arange(1, 17, dtype=torch.float32))
    assert torch.equal(ssm.Dskip, torch.ones(64))
    assert abs(model.dsm[1].lin.weight.std().item() - 0.02) < 0.002
    # The action head keeps PyTorch's default init (uniform in +-1/sqrt(D)), not N(0, 0.02).
    assert model.action_head.weight.abs().max().item() > 0.06


def random_trajectory(model: DecisionMetaMamba, steps: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    states = torch.randn(1, steps, config.state_dim, generator=generator)  # (1, T, S)
    actions = torch.rand(1, steps, config.act_dim, generator=generator) * 2 - 1  # (1, T, Adim)
    rtg = 3.6 - torch.rand(1, steps, 1, generator=generator).cumsum(1) * 0.003  # (1, T, 1)
    return states, actions, rtg


def stream_hidden(model: DecisionMetaMamba, states, actions, rtg) -> torch.Tensor:
    """Feed the interleaved tokens one at a time through `step`; returns hidden (1, 3T, D)."""
    dsm_cache, ssm_state = model.init_cache(1)
    outputs = []
    for t in range(states.shape[1]):
        tokens = (model.embed_rtg(rtg[:, t]), model.embed_observation(states[:, t]), model.embed_act(actions[:, t]))
        for token in tokens:
            hidden, dsm_cache, ssm_state = model.step(token, dsm_cache, ssm_state)
            outputs.append(hidden)
    return torch.stack(outputs, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("steps", [8, 1000], ids=["window-3K-tokens", "episode-1000-steps"])
def test_step_form_equals_sequence_form(steps):
    model = build("hopper")
    model.set_scan_impl("loop")
    states, actions, rtg = random_trajectory(model, steps)
    sequence = model.mix(model.embed_tokens(states, actions, rtg))  # (1, 3T, D)
    stepped = stream_hidden(model, states, actions, rtg)
    difference = (sequence - stepped).abs().max().item()
    print(f"step vs sequence over {3 * steps} tokens: max abs diff {difference:.2e}")
    assert difference < STEP_TOLERANCE
    predicted_sequence = model(states, actions, rtg)  # (1, T, Adim)
    predicted_stepped = model.predict_action(stepped[:, 1::3])
    assert (predicted_sequence - predicted_stepped).abs().max().item() < STEP_TOLERANCE


@torch.no_grad()
def test_step_does_not_write_its_inputs():
    model = build("hopper")
    dsm_cache, ssm_state = model.init_cache(2)
    dsm_cache = dsm_cache + 0.5
    ssm_state = ssm_state + 0.25
    before = (dsm_cache.clone(), ssm_state.clone())
    token = model.embed_observation(torch.randn(2, 11))
    _, new_dsm, new_ssm = model.step(token, dsm_cache, ssm_state)
    assert torch.equal(dsm_cache, before[0]) and torch.equal(ssm_state, before[1])
    assert new_dsm.shape == (3, 2, 5, 64) and new_ssm.shape == (3, 2, 64, 16)
    assert not torch.equal(new_ssm, ssm_state)


def test_state_token_output_ignores_the_current_action():
    """Causality: the action predicted at s_t cannot see a_t (it is a placeholder in evaluation)."""
    model = build("hopper")
    states, actions, rtg = random_trajectory(model, 8)
    changed = actions.clone()
    changed[:, -1] = -actions[:, -1]
    with torch.no_grad():
        assert torch.equal(model(states, actions, rtg)[:, -1], model(states, changed, rtg)[:, -1])


def test_dropout_only_in_training_mode():
    model = build("hopper")
    states, actions, rtg = random_trajectory(model, 8)
    with torch.no_grad():
        assert torch.equal(model(states, actions, rtg), model(states, actions, rtg))
        model.train()
        assert not torch.equal(model(states, actions, rtg), model(states, actions, rtg))
