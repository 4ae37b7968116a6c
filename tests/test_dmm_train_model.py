"""The model: parameter counts (fidelity to the official code), and step form == sequence form."""

from __future__ import annotations

import pytest
import torch

from contract.tolerances import max_abs
from dmm_train.config import ModelConfig, get_preset
from dmm_train.model import DecisionMetaMamba, count_parameters

STEP_TOLERANCE = max_abs("step-vs-sequence")  # docs/design.md#tolerances


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


def test_dsm_convolution_equals_the_official_unfold_window_in_values_and_gradients():
    torch.manual_seed(3)
    mixer = build("hopper").dsm[0]
    u = torch.randn(4, 24, 64, requires_grad=True)  # (B, L, D)
    fast = mixer.forward_conv(u)
    fast_grads = torch.autograd.grad(fast.square().sum(), (u, mixer.lin.weight))
    reference = mixer.forward_window(u)
    reference_grads = torch.autograd.grad(reference.square().sum(), (u, mixer.lin.weight))
    difference = (fast - reference).abs().max().item()
    assert difference < 1e-5, f"conv vs window max abs {difference:.2e}"
    for name, a, b in zip(("input", "weight"), fast_grads, reference_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), f"{name} grad max abs {(a - b).abs().max():.2e}"


def test_dsm_window_is_causal_and_reads_the_last_w_tokens_oldest_first():
    mixer = build("hopper").dsm[0]
    u = torch.randn(1, 10, 64)  # (B, L, D)
    out = mixer.forward_window(u)
    t = 7
    expected = mixer.lin(u[0, t - 5: t + 1].reshape(-1))  # window [t-5 .. t], flattened w * D + d
    assert torch.allclose(out[0, t], expected, atol=1e-6)
    changed = u.clone()
    changed[0, t + 1:] += 1.0  # the future must not matter
    assert torch.equal(mixer.forward_window(changed)[0, : t + 1], out[0, : t + 1])


@torch.no_grad()
def test_state_token_tail_equals_the_full_sequence_at_the_state_tokens():
    model = build("hopper")
    states, actions, rtg = random_trajectory(model, 8, seed=4)
    tokens = model.embed_tokens(states, actions, rtg)  # (1, 24, D)
    full = model.mix(tokens)[:, 1::3]  # (1, 8, D)
    tail = model.mix(tokens, keep=slice(1, None, 3))  # (1, 8, D)
    assert (full - tail).abs().max().item() < 1e-6
