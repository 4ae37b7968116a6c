"""Baselines in the DMM harness: Decision Mamba, Decision Transformer, behaviour cloning.

Glossary (docs/model.md#symbols): B batch, T timesteps in the window (K), L = 3T tokens, D width,
N d_state, R dt_rank, C conv kernel, H attention heads, S state dim, Adim action dim.

Every policy maps a window of (rtg, state, action) to the actions predicted at the state tokens,
(B, T, Adim), so that one sampler, trainer, evaluation and checkpoint serve every kind and the
comparison with DMM is the models' alone: `build_policy` builds a kind from its ModelConfig,
`policy_actions` hands it the inputs it reads. What each kind is, and its deviations from the
upstream code on purpose: docs/model.md#baselines.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from contract.errors import DMMError
from dmm_train.config import ModelConfig
from dmm_train.model import (
    LINEAR_INIT_STD,
    STATE_TOKENS,
    DecisionMetaMamba,
    SelectiveSSM,
    TokenEmbeddings,
    interleave_tokens,
)


def _init_linears(modules, std: float = LINEAR_INIT_STD) -> None:
    """N(0, std) weights and zero biases for every Linear in ``modules`` (official DMM / GPT-2 init)."""
    for module in modules:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------- Decision Mamba


class MambaConvBlock(SelectiveSSM):
    """Mamba-1 block, expand 1, with Mamba's depthwise causal conv1d on the x branch.

    The parameters are `SelectiveSSM`'s plus conv1d (weight (D, 1, C), bias (D,)).
    """

    def __init__(self, d_model: int, d_state: int, dt_rank: int, conv_kernel: int):
        super().__init__(d_model, d_state, dt_rank)
        self.conv_kernel = conv_kernel
        self.conv1d = nn.Conv1d(d_model, d_model, conv_kernel, groups=d_model, bias=True)

    def causal_conv(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D); output t reads x_{t-C+1} .. x_t of its own channel, zeros before the start."""
        # `causal_conv_reference` computed as a depthwise channels-last Conv2d over a (1, L) image, as
        # DenseSequenceMixer.forward_conv does: (B, L, D) memory already is NHWC, so no layout copies;
        # forward + backward took about half the time of Conv1d on the transposed input (B=64, L=24).
        batch, length, d_model = x.shape
        padded = F.pad(x, (0, 0, self.conv_kernel - 1, 0))  # (B, L+C-1, D), zeros on the left
        image = padded.unsqueeze(1).permute(0, 3, 1, 2)  # (B, D, 1, L+C-1) view, channels-last memory
        kernel = self.conv1d.weight.unsqueeze(2)  # (D, 1, 1, C)
        out = F.conv2d(image, kernel, self.conv1d.bias, groups=d_model)  # (B, D, 1, L), channels-last memory
        return out.permute(0, 2, 3, 1).reshape(batch, length, d_model)  # (B, L, D)

    def causal_conv_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Mamba's form: Conv1d over (B, D, L) padded by C-1 on the left. x: (B, L, D) -> (B, L, D)."""
        padded = F.pad(x.transpose(1, 2), (self.conv_kernel - 1, 0))  # (B, D, L+C-1)
        return self.conv1d(padded).transpose(1, 2)  # (B, L, D)

    def forward(self, u: torch.Tensor, keep: slice | None = None) -> torch.Tensor:
        """u: (B, L, D), LN_2-normalised -> (B, L, D), or (B, L', D) at the tokens ``keep`` selects."""
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, L, D) each
        x = F.silu(self.causal_conv(x))  # (B, L, D): Mamba's order, conv then SiLU
        delta_pre, b_in, c_in = self._selection(x, fused_delta=True)  # (B, L, D), (B, L, N) x2
        return self._scan_out(x, z, delta_pre, b_in, c_in, keep)

    def step(self, u_t: torch.Tensor, h: torch.Tensor):
        raise NotImplementedError(
            "the Decision Mamba baseline has no step form (its conv would need a cache of its own); "
            "use the sequence form, as the official sliding-window evaluation does"
        )


class DecisionMamba(TokenEmbeddings):
    """The paper's ablation: (rtg, state, action) tokens -> Mamba layers with their conv -> action."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        d_model = config.d_model
        self._add_token_embeddings(config)
        # DMM's stack without LN_1 and the DSM: one LN_2 shared by every layer (official default).
        n_norms = config.n_layer if config.per_layer_norms else 1
        self.norm_ssm = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_norms))
        self.ssm = nn.ModuleList(
            MambaConvBlock(d_model, config.d_state, config.dt_rank, config.conv_kernel)
            for _ in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.action_head = nn.Linear(d_model, config.act_dim)
        _init_linears(self.ssm.modules())

    def set_scan_impl(self, impl: str) -> None:
        """Select the selective-scan implementation: "auto", "fused" or "loop"."""
        for block in self.ssm:
            block.scan_impl = impl

    def mix(self, tokens: torch.Tensor, keep: slice | None = None) -> torch.Tensor:
        """tokens: (B, L, D) -> hidden (B, L, D) after LN_f, or (B, L', D) at ``keep`` (as DMM's `mix`)."""
        hidden = tokens
        last = self.config.n_layer - 1
        for index, ssm in enumerate(self.ssm):
            norm = self.norm_ssm[index if self.config.per_layer_norms else 0]
            if index == last and keep is not None:
                hidden = hidden[:, keep] + ssm(norm(hidden), keep=keep)  # (B, L', D)
            else:
                hidden = hidden + ssm(norm(hidden))  # (B, L, D)
        return self.ln_f(hidden)

    def forward(self, states: torch.Tensor, actions: torch.Tensor, rtg: torch.Tensor) -> torch.Tensor:
        """states (B, T, S), actions (B, T, Adim), rtg (B, T, 1) -> predicted actions (B, T, Adim)."""
        hidden = self.mix(self.embed_tokens(states, actions, rtg), keep=STATE_TOKENS)  # (B, T, D)
        return torch.tanh(self.action_head(hidden))  # (B, T, Adim)


# --------------------------------------------------------------------------- Decision Transformer


class CausalSelfAttention(nn.Module):
    """GPT-2 attention: one qkv projection, scaled dot product over allowed keys, output projection."""

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, keep: slice | None = None) -> torch.Tensor:
        """x: (B, L, D); allowed: bool, broadcastable to (B, H, L, L), True where query i may read key j
        -> (B, L, D), or (B, L', D) for the queries ``keep`` selects (every key is still read)."""
        batch, _, d_model = x.shape
        q, k, v = self.c_attn(x).split(d_model, dim=-1)  # (B, L, D) each
        if keep is not None:
            q, allowed = q[:, keep], allowed[..., keep, :]  # (B, L', D), (..., L', L)
        heads = [
            t.reshape(batch, t.shape[1], self.n_head, d_model // self.n_head).transpose(1, 2)  # (B, H, L|L', D/H)
            for t in (q, k, v)
        ]
        # Scale 1/sqrt(D/H) and dropout on the attention weights, as GPT-2's `_attn`.
        out = F.scaled_dot_product_attention(
            *heads, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L', D/H)
        out = out.transpose(1, 2).reshape(batch, q.shape[1], d_model)  # (B, L', D)
        return self.resid_dropout(self.c_proj(out))  # (B, L', D)


class GPTBlock(nn.Module):
    """Pre-LN GPT-2 block: h + attn(ln_1(h)), then h + mlp(ln_2(h)); the MLP is D -> 4D -> D."""

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(d_model, 4 * d_model),
            act=nn.ReLU(),  # kzl's --activation_function relu
            c_proj=nn.Linear(4 * d_model, d_model),
            dropout=nn.Dropout(dropout),
        ))

    def forward(self, hidden: torch.Tensor, allowed: torch.Tensor, keep: slice | None = None) -> torch.Tensor:
        """hidden: (B, L, D) -> (B, L, D), or (B, L', D) at the tokens ``keep`` selects."""
        residual = hidden if keep is None else hidden[:, keep]  # (B, L|L', D)
        hidden = residual + self.attn(self.ln_1(hidden), allowed, keep)  # (B, L|L', D)
        return hidden + self.mlp(self.ln_2(hidden))  # (B, L|L', D)


class DecisionTransformer(TokenEmbeddings):
    """kzl's Decision Transformer: timestep-embedded (rtg, state, action) tokens -> GPT-2 blocks -> action."""

    reads_timesteps = True  # `policy_actions` passes timesteps and the padding mask

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        d_model = config.d_model
        self.embed_timestep = nn.Embedding(config.max_ep_len, d_model)
        self._add_token_embeddings(config)  # embed_dropout is GPT-2's embd_pdrop, on inputs_embeds
        self.blocks = nn.ModuleList(
            GPTBlock(d_model, config.n_head, config.embed_dropout) for _ in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.action_head = nn.Linear(d_model, config.act_dim)
        _init_linears(self.blocks.modules())

    @staticmethod
    def attention_mask(padding_mask: torch.Tensor | None, n_tokens: int, device) -> torch.Tensor:
        """Allowed (query, key) pairs: (L, L) causal, or (B, 1, L, L) with left padding masked out.

        padding_mask: (B, T), 1 on real steps and 0 on padding, or None (all real).
        """
        causal = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=device).tril()  # (L, L)
        if padding_mask is None:
            return causal
        key_real = (padding_mask > 0.5).repeat_interleave(3, dim=1)  # (B, L): a step's 3 tokens share its flag
        # The diagonal keeps every softmax row non-empty; only padded queries need it.
        itself = torch.eye(n_tokens, dtype=torch.bool, device=device)  # (L, L)
        return (causal & (key_real[:, None, :] | itself))[:, None]  # (B, 1, L, L)

    def embed_tokens(  # DT's tokens also read the timesteps
        self, states: torch.Tensor, actions: torch.Tensor, rtg: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """states (B, T, S), actions (B, T, Adim), rtg (B, T, 1), timesteps (B, T) -> tokens (B, 3T, D)."""
        # kzl's get_batch clips timesteps at max_ep_len - 1 ("padding cutoff").
        time = self.embed_timestep(timesteps.clamp(0, self.config.max_ep_len - 1))  # (B, T, D)
        tokens = interleave_tokens(
            self.embed_return(rtg) + time, self.embed_state(states) + time, self.embed_action(actions) + time
        )  # (B, 3T, D)
        return self._embed(tokens)  # (B, 3T, D)

    def mix(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None,
            keep: slice | None = None) -> torch.Tensor:
        """tokens: (B, L, D) -> hidden (B, L, D) after LN_f, or (B, L', D) at the tokens ``keep`` selects.

        With ``keep`` the last block runs its queries, MLP and residual there only (as DMM's
        `mix`): the same values at those tokens, without the work for outputs nobody reads.
        """
        allowed = self.attention_mask(padding_mask, tokens.shape[1], tokens.device)
        hidden = tokens
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            hidden = block(hidden, allowed, keep=keep if index == last else None)  # (B, L, D) or (B, L', D)
        return self.ln_f(hidden)

    def forward(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rtg: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """states (B, T, S), actions (B, T, Adim), rtg (B, T, 1), timesteps (B, T) int64 steps in the episode,
        padding_mask (B, T) or None -> predicted actions (B, T, Adim)."""
        if timesteps is None:
            raise DMMError("the Decision Transformer got no timesteps", "(B, T) episode step indices",
                           fix="call it through dmm_train.baselines.policy_actions")
        hidden = self.mix(self.embed_tokens(states, actions, rtg, timesteps), padding_mask, keep=STATE_TOKENS)
        return torch.tanh(self.action_head(hidden))  # state tokens -> (B, T, Adim)

# --------------------------------------------------------------------------- behaviour cloning


class BehaviorCloning(nn.Module):
    """MLP on each normalised state: n_layer x (Linear, ReLU, Dropout), then Linear + tanh."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        layers: list[nn.Module] = []
        width = config.state_dim
        for _ in range(config.n_layer):
            layers += [nn.Linear(width, config.d_model), nn.ReLU(), nn.Dropout(config.embed_dropout)]
            width = config.d_model
        layers += [nn.Linear(width, config.act_dim), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, states: torch.Tensor, actions: torch.Tensor, rtg: torch.Tensor) -> torch.Tensor:
        """states (B, T, S) -> (B, T, Adim), one action per state; actions and rtg are not read."""
        return self.net(states)  # (B, T, Adim)


# --------------------------------------------------------------------------- one interface

POLICY_CLASSES: dict[str, type[nn.Module]] = {
    "dmm": DecisionMetaMamba,
    "dmamba": DecisionMamba,
    "dt": DecisionTransformer,
    "bc": BehaviorCloning,
}

# How each kind is named in tables and logs.
DISPLAY_NAMES = {"dmm": "DMM", "dmamba": "DMamba", "dt": "DT", "bc": "BC"}


def build_policy(config: ModelConfig) -> nn.Module:
    """A freshly initialised policy of the kind ``config.model`` names."""
    config.validate()
    return POLICY_CLASSES[config.model](config)


def policy_actions(
    model: nn.Module,
    states: torch.Tensor,
    actions: torch.Tensor,
    rtg: torch.Tensor,
    timesteps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Actions at the state tokens, (B, T, Adim), for any kind.

    states (B, T, S), actions (B, T, Adim), rtg (B, T, 1); timesteps (B, T) int64 and mask
    (B, T) (1 real, 0 padding) go only to the kinds that read them (DT); DMM, like the
    official code, gets no mask and no timesteps.
    """
    # A DistributedDataParallel wrapper is called like its module but does not carry its attributes.
    if getattr(getattr(model, "module", model), "reads_timesteps", False):
        return model(states, actions, rtg, timesteps=timesteps, padding_mask=mask)
    return model(states, actions, rtg)


def set_scan_impl(model: nn.Module, impl: str) -> None:
    """Select the selective scan of a kind that has one (dmm, dmamba); the others have no scan."""
    if hasattr(model, "set_scan_impl"):
        model.set_scan_impl(impl)
