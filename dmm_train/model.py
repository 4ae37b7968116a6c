"""Decision MetaMamba in pure PyTorch: the one model module (the baselines in
`dmm_train.baselines` reuse its SelectiveSSM, scan and token interleaving).

Glossary (docs/model.md#symbols): B batch, T timesteps in the window (K), L = 3T tokens,
D d_model, N d_state, W DSM window, R dt_rank, S state dim, Adim action dim.

Two forms on the same weights:
- `DecisionMetaMamba.forward`: the sequence form, (B, T) windows of (rtg, state,
  action) -> actions predicted at the state tokens. Used in training and in the
  official sliding-window evaluation.
- `DecisionMetaMamba.step`: the functional step form, one embedded token in, the
  per-layer caches in and new caches out (no in-place writes), for streaming and export.
  Caches are stacked per layer: DSM inputs (n_layer, B, W-1, D) and SSM states
  (n_layer, B, D, N). Zero caches reproduce the causal zero padding of the sequence
  form, so stepping from the episode start equals `forward` over the whole history.

Deviations from the official code, on purpose:
- Mamba's CUDA kernels are replaced by `dmm_train.scan` (a fused CPU kernel and a
  plain loop reference); the maths is `selective_scan_ref`. As in Mamba's fused path,
  dt_proj's bias, the softplus and the z gate are handed to the scan.
- The sequence form computes the DSM as a channels-last convolution with the same
  weights (`DenseSequenceMixer.forward`); the step form keeps the explicit window.
- With ``share_dsm_across_layers`` the shared DSM is a registered, trained module; the
  official antmaze/kitchen code leaves it untrained by accident (see the spec).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmm_train.config import ModelConfig
from dmm_train.scan import selective_scan

# The official `_init_weights`: N(0, 0.02) weights, zero bias for every Linear in the stack.
LINEAR_INIT_STD = 0.02
# Token positions of the states in the interleaved [R1, s1, a1, R2, ...] sequence: the head reads these.
STATE_TOKENS = slice(1, None, 3)


def interleave_tokens(
    rtg_tokens: torch.Tensor, state_tokens: torch.Tensor, action_tokens: torch.Tensor
) -> torch.Tensor:
    """Three (B, T, D) token streams -> (B, 3T, D) in the order [R1, s1, a1, R2, s2, a2, ...]."""
    batch, steps, d_model = state_tokens.shape
    stacked = torch.stack((rtg_tokens, state_tokens, action_tokens), dim=2)  # (B, T, 3, D)
    return stacked.reshape(batch, 3 * steps, d_model)  # (B, 3T, D)


class DenseSequenceMixer(nn.Module):
    """Dense layer over a causal window of W tokens, mixing all channels.

    Equivalent to a full causal Conv1d(D, D, kernel W, no bias) on zero-left-padded
    input; `lin.weight[o, w * D + i]` weights input channel i of the token w places
    into the window (w = 0 is the oldest, w = W - 1 the current token).
    """

    def __init__(self, d_model: int, window: int):
        super().__init__()
        self.d_model = d_model
        self.window = window
        self.lin = nn.Linear(window * d_model, d_model, bias=False)
        self.impl = "conv"

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (B, L, D) -> (B, L, D), by `forward_conv` (default) or `forward_window` (reference)."""
        return self.forward_window(u) if self.impl == "window" else self.forward_conv(u)

    def forward_window(self, u: torch.Tensor) -> torch.Tensor:
        """The official form, verbatim: pad, unfold W-token windows, flatten, Linear. u: (B, L, D) -> (B, L, D)."""
        padded = F.pad(u, (0, 0, self.window - 1, 0))  # (B, L+W-1, D), zeros after LN_1
        windows = padded.unfold(1, self.window, 1)  # (B, L, D, W), last axis oldest first
        return self.lin(windows.transpose(2, 3).flatten(2))  # (B, L, W*D) -> (B, L, D)

    def forward_conv(self, u: torch.Tensor) -> torch.Tensor:
        """u: (B, L, D) -> (B, L, D), the same map as `forward_window` computed as a convolution."""
        # The same map as a causal convolution whose kernel is `lin.weight` viewed as
        # (D_out, W, D_in), run as a channels-last Conv2d over a (1, L) image: the memory
        # of (B, L, D) already is NHWC, so oneDNN needs no layout copies, and there is no
        # (B, L, W*D) window tensor nor unfold_backward: forward + backward took 1.9x less
        # time than unfold + Linear (and 1.5x less than a plain Conv1d) at the hopper preset.
        batch, length, d_model = u.shape
        padded = F.pad(u, (0, 0, self.window - 1, 0))  # (B, L+W-1, D), zeros after LN_1
        image = padded.unsqueeze(1).permute(0, 3, 1, 2)  # (B, D, 1, L+W-1) view, channels-last memory
        kernel = self.lin.weight.view(d_model, 1, self.window, d_model).permute(0, 3, 1, 2)  # (D, D, 1, W)
        out = F.conv2d(image, kernel)  # (B, D, 1, L), channels-last memory
        return out.permute(0, 2, 3, 1).reshape(batch, length, d_model)  # (B, L, D) view

    def step(self, u_t: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u_t: (B, D), cache: (B, W-1, D) last inputs, oldest first -> (B, D), new cache (B, W-1, D)."""
        window = torch.cat([cache, u_t[:, None, :]], dim=1)  # (B, W, D)
        out = self.lin(window.reshape(u_t.shape[0], self.window * self.d_model))  # (B, D)
        return out, window[:, 1:]


class SelectiveSSM(nn.Module):
    """Mamba-1 block with expand 1 and no depthwise conv (DMM's global mixer)."""

    def __init__(self, d_model: int, d_state: int, dt_rank: int):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.dt_rank = dt_rank
        self.in_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.x_proj = nn.Linear(d_model, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_model, bias=True)
        # S4D-real init: A = -[1..N] for every channel.
        a_init = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_model, 1)  # (D, N)
        self.A_log = nn.Parameter(torch.log(a_init))
        self.Dskip = nn.Parameter(torch.ones(d_model))
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.scan_impl = "auto"

    def _ssm_inputs(self, u: torch.Tensor, fused_delta: bool = False):
        """u: (..., D) -> x (..., D), z (..., D), delta (..., D), Bm (..., N), Cm (..., N).

        With ``fused_delta`` the third output is dt_proj(dt) without its bias and before
        the softplus, for a scan that applies both itself.
        """
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (..., D) each
        x = F.silu(x)  # Mamba's conv1d is removed in DMM
        return (x, z, *self._selection(x, fused_delta))

    def _selection(self, x: torch.Tensor, fused_delta: bool = False):
        """x: (..., D), the activated x branch -> delta (..., D), Bm (..., N), Cm (..., N) (see `_ssm_inputs`)."""
        dt, b_in, c_in = self.x_proj(x).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1
        )  # (..., R), (..., N), (..., N)
        if fused_delta:
            return F.linear(dt, self.dt_proj.weight), b_in, c_in  # delta pre-activation (..., D)
        delta = F.softplus(self.dt_proj(dt))  # (..., D)
        return delta, b_in, c_in

    def forward(self, u: torch.Tensor, keep: slice | None = None) -> torch.Tensor:
        """u: (B, L, D), already LN_2-normalised -> (B, L, D), or (B, L', D) at the tokens ``keep`` selects.

        The scan runs over every token either way (each state depends on all earlier
        ones); ``keep`` only skips out_proj where the caller needs no output.
        """
        x, z, delta_pre, b_in, c_in = self._ssm_inputs(u, fused_delta=True)  # (B, L, D) x3, (B, L, N) x2
        return self._scan_out(x, z, delta_pre, b_in, c_in, keep)

    def _scan_out(self, x, z, delta_pre, b_in, c_in, keep: slice | None = None) -> torch.Tensor:
        """x, z, delta_pre: (B, L, D); b_in, c_in: (B, L, N) -> out_proj(scan * silu(z)): (B, L, D) or (B, L', D)."""
        A = -torch.exp(self.A_log)  # (D, N)
        # softplus(delta_pre + dt_proj.bias) and the gate y * silu(z) happen inside the
        # scan (Mamba's selective_scan_fn options): no separate passes over (B, L, D).
        gated = selective_scan(
            x, delta_pre, A, b_in, c_in, self.Dskip, impl=self.scan_impl,
            z=z, delta_bias=self.dt_proj.bias, delta_softplus=True,
        )  # (B, L, D)
        if keep is not None:
            gated = gated[:, keep]  # (B, L', D)
        return self.out_proj(gated)  # (B, L, D) or (B, L', D)

    def step(self, u_t: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u_t: (B, D), h: (B, D, N) -> (B, D), new h (B, D, N)."""
        x, z, delta, b_in, c_in = self._ssm_inputs(u_t)  # (B, D) x3, (B, N) x2
        A = -torch.exp(self.A_log)  # (D, N)
        decay = torch.exp(delta[:, :, None] * A)  # (B, D, N)
        h_new = decay * h + delta[:, :, None] * b_in[:, None, :] * x[:, :, None]  # (B, D, N)
        y = (h_new * c_in[:, None, :]).sum(-1) + self.Dskip * x  # (B, D)
        return self.out_proj(y * F.silu(z)), h_new


class TokenEmbeddings(nn.Module):
    """The (rtg, state, action) token embeddings, embed LN and dropout that DMM and the baselines share.

    The attribute names are the checkpoints' parameter names, and their creation order fixes the
    seeded init: both stay as they were when each model built them itself.
    """

    def _add_token_embeddings(self, config: ModelConfig) -> None:
        self.embed_return = nn.Linear(1, config.d_model)
        self.embed_state = nn.Linear(config.state_dim, config.d_model)
        self.embed_action = nn.Linear(config.act_dim, config.d_model)
        self.embed_ln = nn.LayerNorm(config.d_model)
        self.embed_dropout = nn.Dropout(config.embed_dropout)

    def _embed(self, token: torch.Tensor) -> torch.Tensor:
        return self.embed_dropout(self.embed_ln(token))

    def embed_tokens(self, states: torch.Tensor, actions: torch.Tensor, rtg: torch.Tensor) -> torch.Tensor:
        """states (B, T, S), actions (B, T, Adim), rtg (B, T, 1) -> tokens (B, 3T, D) as [R1, s1, a1, ...]."""
        tokens = interleave_tokens(self.embed_return(rtg), self.embed_state(states), self.embed_action(actions))
        return self._embed(tokens)  # (B, 3T, D)


class DecisionMetaMamba(TokenEmbeddings):
    """DMM policy: (rtg, state, action) tokens -> DSM + selective SSM layers -> action."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        d_model = config.d_model
        self._add_token_embeddings(config)

        # Official default: one LN_1 and one LN_2 shared by every layer.
        n_norms = config.n_layer if config.per_layer_norms else 1
        self.norm_mixer = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_norms))
        self.norm_ssm = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_norms))
        n_dsm = 1 if config.share_dsm_across_layers else config.n_layer
        self.dsm = nn.ModuleList(DenseSequenceMixer(d_model, config.dsm_window) for _ in range(n_dsm))
        self.ssm = nn.ModuleList(
            SelectiveSSM(d_model, config.d_state, config.dt_rank) for _ in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.action_head = nn.Linear(d_model, config.act_dim)

        # Only the layer stack gets the official init; embeddings and head keep PyTorch's.
        for module in [*self.dsm.modules(), *self.ssm.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=LINEAR_INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # -- pieces shared by both forms -------------------------------------------------

    def _layer(self, index: int) -> tuple[nn.LayerNorm, DenseSequenceMixer, nn.LayerNorm, SelectiveSSM]:
        norm_index = index if self.config.per_layer_norms else 0
        dsm_index = 0 if self.config.share_dsm_across_layers else index
        return self.norm_mixer[norm_index], self.dsm[dsm_index], self.norm_ssm[norm_index], self.ssm[index]

    def set_scan_impl(self, impl: str) -> None:
        """Select the selective-scan implementation: "auto", "fused" or "loop"."""
        for block in self.ssm:
            block.scan_impl = impl

    def set_dsm_impl(self, impl: str) -> None:
        """Select the DSM's sequence form: "conv" (fast) or "window" (the official unfold + Linear)."""
        if impl not in ("conv", "window"):
            raise ValueError(f"DSM impl {impl!r}; expected conv or window")
        for mixer in self.dsm:
            mixer.impl = impl

    def embed_rtg(self, rtg: torch.Tensor) -> torch.Tensor:
        """rtg: (..., 1), already divided by the rtg scale -> (..., D)."""
        return self._embed(self.embed_return(rtg))

    def embed_observation(self, state: torch.Tensor) -> torch.Tensor:
        """state: (..., S), normalised -> (..., D)."""
        return self._embed(self.embed_state(state))

    def embed_act(self, action: torch.Tensor) -> torch.Tensor:
        """action: (..., Adim) -> (..., D)."""
        return self._embed(self.embed_action(action))

    def predict_action(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., D), after LN_f, at a state token -> (..., Adim) in [-1, 1]."""
        return torch.tanh(self.action_head(hidden))

    # -- sequence form ---------------------------------------------------------------

    def mix(self, tokens: torch.Tensor, keep: slice | None = None) -> torch.Tensor:
        """tokens: (B, L, D) embedded -> hidden (B, L, D) after LN_f.

        With ``keep`` (a slice of token positions) the last layer's out_proj, residual
        and LN_f run only there, returning (B, L', D): the same values at those tokens,
        without the work for outputs nobody reads (LN_f is per token).
        """
        hidden = tokens
        last = self.config.n_layer - 1
        for index in range(self.config.n_layer):
            norm_mixer, dsm, norm_ssm, ssm = self._layer(index)
            hidden = hidden + dsm(norm_mixer(hidden))  # (B, L, D)
            if index == last and keep is not None:
                hidden = hidden[:, keep] + ssm(norm_ssm(hidden), keep=keep)  # (B, L', D)
            else:
                hidden = hidden + ssm(norm_ssm(hidden))  # (B, L, D)
        return self.ln_f(hidden)

    def forward(self, states: torch.Tensor, actions: torch.Tensor, rtg: torch.Tensor) -> torch.Tensor:
        """states (B, T, S), actions (B, T, Adim), rtg (B, T, 1) -> predicted actions (B, T, Adim)."""
        hidden = self.mix(self.embed_tokens(states, actions, rtg), keep=STATE_TOKENS)  # (B, T, D)
        return self.predict_action(hidden)  # state tokens -> (B, T, Adim)

    # -- step form -------------------------------------------------------------------

    def init_cache(
        self, batch: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero caches: DSM inputs (n_layer, B, W-1, D) and SSM states (n_layer, B, D, N), float32."""
        config = self.config
        dsm_cache = torch.zeros(config.n_layer, batch, config.dsm_window - 1, config.d_model, device=device)
        ssm_state = torch.zeros(config.n_layer, batch, config.d_model, config.d_state, device=device)
        return dsm_cache, ssm_state

    def step(
        self, token: torch.Tensor, dsm_cache: torch.Tensor, ssm_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One embedded token through the stack.

        token: (B, D) from an `embed_*` method; dsm_cache: (n_layer, B, W-1, D);
        ssm_state: (n_layer, B, D, N). Returns hidden (B, D) after LN_f and the new
        caches (same shapes). Inputs are never written to.
        """
        hidden = token
        new_dsm, new_ssm = [], []
        for index in range(self.config.n_layer):
            norm_mixer, dsm, norm_ssm, ssm = self._layer(index)
            mixed, dsm_next = dsm.step(norm_mixer(hidden), dsm_cache[index])  # (B, D), (B, W-1, D)
            hidden = hidden + mixed
            out, state_next = ssm.step(norm_ssm(hidden), ssm_state[index])  # (B, D), (B, D, N)
            hidden = hidden + out
            new_dsm.append(dsm_next)
            new_ssm.append(state_next)
        return self.ln_f(hidden), torch.stack(new_dsm), torch.stack(new_ssm)

    def env_step(
        self, prev_action: torch.Tensor, prev_action_valid: torch.Tensor, rtg: torch.Tensor, state: torch.Tensor,
        dsm_cache: torch.Tensor, ssm_state: torch.Tensor, rows_valid: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One env step of the stream contract (docs/design.md#stream-mode): tokens a_{t-1}, R_t, s_t.

        prev_action (B, Adim); prev_action_valid (B, 1), 0 where there is no a_{t-1} (the
        episode's first step: that row skips the token); rtg (B, 1) already scaled; state
        (B, S) normalised; dsm_cache (n_layer, B, W-1, D); ssm_state (n_layer, B, D, N).
        Returns action (B, Adim) predicted at s_t and the new caches. The PyTorch backend,
        the export parity gate and the tests all call this one method. rows_valid: whether any
        row has a_{t-1}, when the caller already knows (a CUDA-graph capture cannot read a device
        tensor on the host); None reads it from prev_action_valid.
        """
        valid = prev_action_valid > 0.5  # (B, 1); the contract's input is 0 or 1
        if bool(valid.any()) if rows_valid is None else rows_valid:
            _, dsm_next, ssm_next = self.step(self.embed_act(prev_action), dsm_cache, ssm_state)
            keep = valid[None, :, :, None]  # (1, B, 1, 1): rows where a_{t-1} is a real token
            dsm_cache = torch.where(keep, dsm_next, dsm_cache)  # (n_layer, B, W-1, D)
            ssm_state = torch.where(keep, ssm_next, ssm_state)  # (n_layer, B, D, N)
        _, dsm_cache, ssm_state = self.step(self.embed_rtg(rtg), dsm_cache, ssm_state)
        hidden, dsm_cache, ssm_state = self.step(self.embed_observation(state), dsm_cache, ssm_state)
        return self.predict_action(hidden), dsm_cache, ssm_state  # (B, Adim), caches


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (shared modules counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
