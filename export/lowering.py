"""Lower a `DecisionMetaMamba` to lean ONNX graphs, node by node, from the model's own weights.

Glossary (docs/model.md#symbols): B batch, K timesteps in the window, L tokens processed, D d_model,
N d_state, W DSM window, R dt_rank, S state dim, Adim action dim, nl n_layer, F the width
of the x_proj output (D + 2N, or 3D + 2N augmented).

Why a second lowering instead of tracing `model.forward` / `model.step`: on a batch-1
CPU step ONNX Runtime's cost is mostly per node and per broadcast
span, so the node count and the tensor layout *are* the latency. A traced window forward
has about 1200 nodes (a 3K-token Python scan with per-token slicing); this builder writes
about 200 (window) and 150 (stream). The maths is the same as `dmm_train.model` and every
number comes from the model's parameters (read here, never copied into a second module);
tests/test_export_onnx.py holds both graphs to `model.forward` and `model.step` within 1e-5.
Only ops of `export.trt_ops.TRT_SUPPORTED_OPS`, static shapes, no Loop / Scan / If. How the graphs
are made lean, and how stream mode removes an invalid a_{t-1} token exactly:
docs/design.md#what-makes-the-graphs-lean.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from dmm_train.model import DecisionMetaMamba

PRODUCER = "dmm-deploy"
MIN_OPSET = 17  # LayerNormalization
MAX_OPSET = 21  # the newest opset the builder's ops were checked at (ORT 1.32 and TensorRT 10.x accept it)


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float32).numpy()


def _np64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float64).numpy()


class GraphBuilder:
    """Collects nodes and initializers; constants are initializers (not Constant nodes), named once."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self._used_names: set[str] = set()

    def const(self, name: str, array: np.ndarray) -> str:
        """A float32 (or int64, by dtype) initializer; the same name twice must mean the same array."""
        if name not in self.initializers:
            array = np.asarray(array)
            dtype = np.int64 if array.dtype.kind in "iu" else np.float32
            self.initializers[name] = numpy_helper.from_array(np.array(array, dtype=dtype, order="C"), name)
        return name

    def ints(self, values) -> str:
        """An int64 1-D initializer (shapes, axes, split sizes), shared by value."""
        values = [int(v) for v in values]
        return self.const("i64[" + ",".join(map(str, values)) + "]", np.array(values, dtype=np.int64))

    def scalar_index(self, value: int) -> str:
        return self.const(f"i64({int(value)})", np.array(int(value), dtype=np.int64))

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, **attrs) -> str | list[str]:
        """Append one node; returns its output name (or names when ``outputs`` > 1)."""
        if name in self._used_names:
            raise ValueError(f"duplicate node name {name!r}")
        self._used_names.add(name)
        names = [name] if outputs == 1 else [f"{name}:{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, **attrs))
        return names[0] if outputs == 1 else names

    def model(self, graph_name: str, inputs: list[tuple[str, tuple[int, ...]]],
              outputs: list[tuple[str, tuple[int, ...]]], doc: str,
              metadata: dict[str, str]) -> onnx.ModelProto:
        """Wrap the nodes as a model; float32 I/O of the given static shapes."""
        graph = helper.make_graph(
            self.nodes, graph_name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in outputs],
            initializer=list(self.initializers.values()),
        )
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name=PRODUCER, doc_string=doc)
        # The oldest IR that carries this opset: what older TensorRT parsers and ORT builds accept.
        model.ir_version = helper.find_min_ir_version_for(opsets)
        helper.set_model_props(model, metadata)
        return model


class _Weights:
    """The model's parameters as graph constants, named after the parameters (shared modules once)."""

    def __init__(self, g: GraphBuilder, model: DecisionMetaMamba):
        self.g = g
        self.names = {id(p): name for name, p in model.named_parameters()}

    def __call__(self, parameter: torch.Tensor, tag: str, array: np.ndarray) -> str:
        """``array`` is derived from ``parameter`` (transposed, folded); ``tag`` names the derivation."""
        return self.g.const(f"{self.names[id(parameter)]}{tag}", array)


def _layer_norm(g: GraphBuilder, w: _Weights, x: str, norm: torch.nn.LayerNorm, name: str) -> str:
    scale = w(norm.weight, "", _np(norm.weight))  # (D,)
    bias = w(norm.bias, "", _np(norm.bias))  # (D,)
    return g.op("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=float(norm.eps))


def _embedding_matrix(model: DecisionMetaMamba, order: tuple[str, ...]) -> np.ndarray:
    """(sum of token input widths + 1, 3D): block-diagonal embedding weights, the biases as the last row.

    A block input [u_1 | u_2 | u_3 | 1] times it gives the three embedded tokens side by
    side; ``order`` names which token goes first ("rtg", "state", "action").
    """
    D = model.config.d_model
    linears = {"rtg": model.embed_return, "state": model.embed_state, "action": model.embed_action}
    widths = [linears[token].in_features for token in order]
    matrix = np.zeros((sum(widths) + 1, 3 * D), dtype=np.float32)  # (F_in + 1, 3D)
    row = 0
    for slot, token in enumerate(order):
        linear = linears[token]
        matrix[row:row + widths[slot], slot * D:(slot + 1) * D] = _np(linear.weight).T  # (width, D)
        matrix[-1, slot * D:(slot + 1) * D] = _np(linear.bias)  # (D,)
        row += widths[slot]
    return matrix



def _folded_x_proj(ssm, augmented: bool) -> tuple[np.ndarray, np.ndarray]:
    """x_proj with dt_proj folded in: W (D, F) and bias (F,) with ``x @ W + bias`` =

    [delta_pre | Bm | Cm] (F = D + 2N), or with ``augmented`` [delta_pre | Bm | Cm | x | Dskip * x]
    (F = 3D + 2N), where delta_pre = dt_proj(dt) before the softplus. The fold is a float64
    product of the two weights (about 1e-7 relative from the two-step float32 form); the
    identity and diag(Dskip) blocks reproduce x and Dskip * x exactly (one nonzero product per
    output). The Dskip block saves a node where tokens are few (stream) and costs more MatMul
    time than that where they are many (window). The int8 stream graph is built without the
    blocks, so that x_proj's input Q/DQ stays out of the recurrence.
    """
    D, N, R = ssm.d_model, ssm.d_state, ssm.dt_rank
    x_weight = _np64(ssm.x_proj.weight)  # (R + 2N, D)
    blocks = [
        (_np64(ssm.dt_proj.weight) @ x_weight[:R]).T,  # (D, D): x -> dt_proj(x_proj(x)[:R]) without bias
        x_weight[R:R + N].T,  # (D, N) -> Bm
        x_weight[R + N:].T,  # (D, N) -> Cm
    ]
    if augmented:
        blocks += [np.eye(D), np.diag(_np64(ssm.Dskip))]  # (D, D) x2 -> x, Dskip * x
    weight = np.concatenate(blocks, axis=1)  # (D, F)
    bias = np.concatenate([_np64(ssm.dt_proj.bias), np.zeros(weight.shape[1] - D)])  # (F,)
    return weight.astype(np.float32), bias.astype(np.float32)


def _softplus(g: GraphBuilder, x: str, name: str) -> str:
    """log(1 + exp(x)) as Exp, Add, Log: element-wise as the input.

    ONNX Runtime's CPU Softplus kernel is scalar (several times slower than the three
    vectorised ops, BENCHMARKS.md#design-measurements). Against torch's softplus (threshold 20) the difference
    is at most about 1e-7 absolute; exp overflows for x > 88 (delta = inf, non-finite actions
    that the export parity check and the runtime's finiteness check both catch), far beyond
    any trained dt_proj pre-activation.
    """
    one = g.const("1.0", np.array(1.0, dtype=np.float32))
    return g.op("Log", [g.op("Add", [g.op("Exp", [x], f"{name}/exp"), one], f"{name}/1p")], name)


def _A(w, ssm) -> str:
    """A = -exp(A_log) transposed to (N, D), computed by torch in float32 exactly as the model does."""
    return w(ssm.A_log, ":A.T", _np(-torch.exp(ssm.A_log)).T)


# Layout of the SSM tensors in the graph: (B, T, N, D), the channel axis D innermost, and every
# per-token row (delta, x, ...) kept as (B, T, D) until it meets the (N, D) axes. ONNX Runtime's
# CPU broadcasting then runs over contiguous spans of D = 64 floats; in the model's (B, T, D, N)
# layout with (..., 1) columns it walks spans of 16 or of 1 element, an order of magnitude
# slower per op (BENCHMARKS.md#design-measurements).


def _ssm_front(g, w, p, ssm, u2, B, T, D, N, token_mask: str | None = None, augmented: bool = False):
    """The Mamba block up to the scan inputs, over T tokens.

    u2: (B, T, D), LN_2 output; token_mask: (B, T, 1) multiplying delta (stream mode's
    skipped a-token), or None; augmented: x_proj as in `_folded_x_proj`. Returns a dict of
    (B, T, D) rows sz = silu(z), x, delta = softplus(dt_proj(dt)) and dx = delta * x, of
    (B, T, N) rows b = Bm and c = Cm, and when ``augmented`` skip = Dskip * x (B, T, D).
    """
    in_weight = w(ssm.in_proj.weight, ".T", _np(ssm.in_proj.weight).T)  # (D, 2D)
    xz = g.op("MatMul", [u2, in_weight], f"{p}/in_proj")  # (B, T, 2D)
    gate = g.op("Sigmoid", [xz], f"{p}/sigmoid")  # (B, T, 2D)
    silu = g.op("Mul", [xz, gate], f"{p}/silu")  # (B, T, 2D): silu(x) (Mamba's conv is removed) and silu(z)
    x, sz = g.op("Split", [silu, g.ints([D, D])], f"{p}/split_xz", outputs=2, axis=2)  # (B, T, D) x2
    weight, bias = _folded_x_proj(ssm, augmented)
    tag = "+dt_proj" + ("+eye+Dskip" if augmented else "")
    proj = g.op("MatMul", [x, w(ssm.x_proj.weight, tag, weight)], f"{p}/x_proj")  # (B, T, F)
    proj = g.op("Add", [proj, w(ssm.dt_proj.bias, f"+zeros({bias.size - D})", bias)], f"{p}/x_proj_bias")  # (B, T, F)
    if augmented:
        delta_pre, b, c, x, skip = g.op("Split", [proj, g.ints([D, N, N, D, D])], f"{p}/split_proj",
                                        outputs=5, axis=2)  # (B, T, D), (B, T, N) x2, (B, T, D) x2
    else:
        delta_pre, b, c = g.op("Split", [proj, g.ints([D, N, N])], f"{p}/split_proj", outputs=3,
                               axis=2)  # (B, T, D), (B, T, N), (B, T, N)
        skip = None
    delta = _softplus(g, delta_pre, f"{p}/delta")  # (B, T, D)
    if token_mask is not None:
        delta = g.op("Mul", [delta, token_mask], f"{p}/delta_masked")  # (B, T, D)
    dx = g.op("Mul", [delta, x], f"{p}/delta_x")  # (B, T, D)
    return {"sz": sz, "x": x, "delta": delta, "dx": dx, "skip": skip, "b": b, "c": c}


def _skip(g, w, p, ssm, front, x: str | None = None) -> str:
    """Dskip * x (x: (..., D), default the front's x rows), unless x_proj already made it."""
    if front["skip"] is not None and x is None:
        return front["skip"]
    x = front["x"] if x is None else x
    return g.op("Mul", [x, w(ssm.Dskip, "", _np(ssm.Dskip))], f"{p}/skip")  # (..., D)


def _scan_and_output(g, w, p, ssm, h, hidden, front, B, T, D, N):
    """Sequential recurrence over T tokens from state ``h`` (None: zeros), then the gated residual output.

    front: `_ssm_front`'s tensors; hidden (B, T, D) the residual stream; h (B, 1, N, D) or None.
    Returns the new residual stream (B, T, D) and the last state (B, 1, N, D).
    """
    delta_r = g.op("Unsqueeze", [front["delta"], g.ints([2])], f"{p}/delta_r")  # (B, T, 1, D)
    dA = g.op("Exp", [g.op("Mul", [delta_r, _A(w, ssm)], f"{p}/delta_A")], f"{p}/dA")  # (B, T, N, D)
    dx_r = g.op("Unsqueeze", [front["dx"], g.ints([2])], f"{p}/delta_x_r")  # (B, T, 1, D)
    b_c = g.op("Unsqueeze", [front["b"], g.ints([3])], f"{p}/b_c")  # (B, T, N, 1)
    dBx = g.op("Mul", [b_c, dx_r], f"{p}/dBx")  # (B, T, N, D): delta_t * Bm_t * x_t
    if T > 1:
        dA_t = g.op("Split", [dA, g.ints([1] * T)], f"{p}/split_dA", outputs=T, axis=1)  # T x (B, 1, N, D)
        dBx_t = g.op("Split", [dBx, g.ints([1] * T)], f"{p}/split_dBx", outputs=T, axis=1)  # T x (B, 1, N, D)
    else:
        dA_t, dBx_t = [dA], [dBx]
    states = []
    for t in range(T):
        if h is None:  # h_{-1} = 0: h_0 = dBx_0 exactly, as in the reference loop
            h = dBx_t[t]
        else:
            decayed = g.op("Mul", [dA_t[t], h], f"{p}/h{t}_decay")  # (B, 1, N, D)
            h = g.op("Add", [decayed, dBx_t[t]], f"{p}/h{t}")  # (B, 1, N, D)
        states.append(h)
    H = g.op("Concat", states, f"{p}/states", axis=1) if T > 1 else states[0]  # (B, T, N, D)
    c_r = g.op("Unsqueeze", [front["c"], g.ints([2])], f"{p}/c_r")  # (B, T, 1, N)
    y = g.op("MatMul", [c_r, H], f"{p}/y_C")  # (B, T, 1, D): <h_t, Cm_t>
    y = g.op("Reshape", [y, g.ints([B, T, D])], f"{p}/y")  # (B, T, D)
    y = g.op("Add", [y, _skip(g, w, p, ssm, front)], f"{p}/y_skip")  # (B, T, D): + Dskip * x_t
    gated = g.op("Mul", [y, front["sz"]], f"{p}/gate")  # (B, T, D): y * silu(z)
    out_w = w(ssm.out_proj.weight, ".T", _np(ssm.out_proj.weight).T)  # (D, D)
    out = g.op("MatMul", [gated, out_w], f"{p}/out_proj")  # (B, T, D)
    return g.op("Add", [hidden, out], f"{p}/residual"), h


def _last_token_ssm(g, w, p, ssm, hidden, front, B, L, D, N):
    """The Mamba block's residual output at token L-1 only, from the exact parallel form.

    y_{L-1} = <h_{L-1}, Cm_{L-1}> with h_{L-1} = sum_j exp(A * G_j) * delta_j x_j Bm_j and
    G_j = sum_{j<k<L} delta_k, evaluated as
        y_{L-1}[d] = sum_j delta_j[d] x_j[d] * sum_n exp(A[d, n] G_j[d]) (Bm_j[n] Cm_{L-1}[n]),
    so the only (B, L, N, D) tensors are the exponent and its exp; the inner sum over n is
    one batched MatMul. G comes from one MatMul with a constant strictly-upper 0/1 matrix:
    sums of positive terms, never a difference of cumulative sums, so no cancellation.
    ``front`` as from `_ssm_front`; returns the residual stream at token L-1, (B, D).
    """
    later = g.const(f"later({L})", np.triu(np.ones((L, L), dtype=np.float32), k=1))  # (L, L): 1 where k > j
    G = g.op("MatMul", [later, front["delta"]], f"{p}/later_delta")  # (B, L, D): sum of the deltas after j
    G_r = g.op("Unsqueeze", [G, g.ints([2])], f"{p}/later_delta_r")  # (B, L, 1, D)
    decay = g.op("Exp", [g.op("Mul", [G_r, _A(w, ssm)], f"{p}/later_delta_A")], f"{p}/decay")  # (B, L, N, D)
    c_last = g.op("Gather", [front["c"], g.ints([L - 1])], f"{p}/C_last", axis=1)  # (B, 1, N)
    bc = g.op("Mul", [front["b"], c_last], f"{p}/B_C_last")  # (B, L, N): Bm_j[n] Cm_{L-1}[n]
    bc_r = g.op("Unsqueeze", [bc, g.ints([2])], f"{p}/B_C_last_r")  # (B, L, 1, N)
    inner = g.op("MatMul", [bc_r, decay], f"{p}/decay_B_C")  # (B, L, 1, D)
    inner = g.op("Reshape", [inner, g.ints([B, L, D])], f"{p}/decay_B_C_rows")  # (B, L, D)
    terms = g.op("Mul", [inner, front["dx"]], f"{p}/terms")  # (B, L, D)
    y = g.op("ReduceSum", [terms, g.ints([1])], f"{p}/y_C", keepdims=0)  # (B, D)
    last_index = g.scalar_index(L - 1)
    x_last = g.op("Gather", [front["x"], last_index], f"{p}/x_last", axis=1)  # (B, D)
    y = g.op("Add", [y, _skip(g, w, p, ssm, front, x_last)], f"{p}/y_skip")  # (B, D)
    sz_last = g.op("Gather", [front["sz"], last_index], f"{p}/silu_z_last", axis=1)  # (B, D)
    gated = g.op("Mul", [y, sz_last], f"{p}/gate")  # (B, D)
    out_w = w(ssm.out_proj.weight, ".T", _np(ssm.out_proj.weight).T)  # (D, D)
    out = g.op("MatMul", [gated, out_w], f"{p}/out_proj")  # (B, D)
    hidden_last = g.op("Gather", [hidden, last_index], f"{p}/hidden_last", axis=1)  # (B, D)
    return g.op("Add", [hidden_last, out], f"{p}/residual")  # (B, D)


def _dense(g, w, p, dsm, windows, B, T, D, W):
    """windows (B, T*W, D), each token's W inputs oldest first -> DSM outputs (B, T, D)."""
    flat = g.op("Reshape", [windows, g.ints([B, T, W * D])], f"{p}/flatten")  # (B, T, W*D)
    dsm_w = w(dsm.lin.weight, ".T", _np(dsm.lin.weight).T)  # (W*D, D): lin.weight[o, w*D + i]
    return g.op("MatMul", [flat, dsm_w], f"{p}/dense")  # (B, T, D)


def _head(g, w, model, hidden_last):
    """hidden (B, D) at the last state token -> action (B, Adim) = tanh(head(LN_f(hidden)))."""
    normed = _layer_norm(g, w, hidden_last, model.ln_f, "ln_f")  # (B, D)
    head_w = w(model.action_head.weight, "", _np(model.action_head.weight))  # (Adim, D)
    head_b = w(model.action_head.bias, "", _np(model.action_head.bias))  # (Adim,)
    logits = g.op("Gemm", [normed, head_w, head_b], "head", transB=1)  # (B, Adim)
    return g.op("Tanh", [logits], "action")  # (B, Adim)


def _check(model: DecisionMetaMamba, batch: int, opset: int) -> None:
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch {batch!r}; expected a positive integer")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset}; expected {MIN_OPSET}..{MAX_OPSET}")
    if model.training:
        raise ValueError("the model is in training mode (dropout on); call model.eval() first")


def build_window_graph(model: DecisionMetaMamba, *, batch: int = 1,
                       opset: int = MIN_OPSET) -> onnx.ModelProto:
    """The official sliding-window forward as one graph.

    states (B, K, S), actions (B, K, Adim), rtg (B, K, 1) -> action (B, Adim), equal to
    ``model(states, actions, rtg)[:, -1]`` (the prediction at the last state token).
    """
    _check(model, batch, opset)
    cfg = model.config
    B, K, S, Adim = batch, cfg.context_len, cfg.state_dim, cfg.act_dim
    D, N, W = cfg.d_model, cfg.d_state, cfg.dsm_window
    L = 3 * K - 1  # tokens R_1, s_1, a_1, ..., R_K, s_K: the placeholder a_K cannot reach s_K
    g = GraphBuilder(opset)
    w = _Weights(g, model)

    ones = g.const(f"ones({B},{K},1)", np.ones((B, K, 1), dtype=np.float32))
    block = g.op("Concat", ["rtg", "states", "actions", ones], "embed/block", axis=2)  # (B, K, 1+S+Adim+1)
    embed_w = w(model.embed_return.weight, "+embed_state+embed_action",
                _embedding_matrix(model, ("rtg", "state", "action")))  # (1+S+Adim+1, 3D)
    tokens = g.op("MatMul", [block, embed_w], "embed/linear")  # (B, K, 3D): [R_k | s_k | a_k] per step
    tokens = g.op("Reshape", [tokens, g.ints([B, 3 * K, D])], "embed/interleave")  # (B, 3K, D)
    tokens = g.op("Slice", [tokens, g.ints([0]), g.ints([L]), g.ints([1])],
                  "embed/drop_last_action")  # (B, L, D)
    hidden = _layer_norm(g, w, tokens, model.embed_ln, "embed/ln")  # (B, L, D); dropout is off in eval

    # DSM windows by one Gather from the zero-left-padded LN_1 output: padded row W-1+s is token s.
    pad = g.const(f"zeros({B},{W - 1},{D})", np.zeros((B, W - 1, D), dtype=np.float32))
    window_rows = g.const(f"dsm_rows(L={L},W={W})", np.arange(L)[:, None] + np.arange(W)[None, :])  # (L, W)
    for index in range(cfg.n_layer):
        norm_mixer, dsm, norm_ssm, ssm = model._layer(index)  # the model's own layer wiring (shared norms)
        p = f"layer{index}"
        u1 = _layer_norm(g, w, hidden, norm_mixer, f"{p}/ln_1")  # (B, L, D)
        padded = g.op("Concat", [pad, u1], f"{p}/dsm/pad", axis=1)  # (B, W-1+L, D): zeros after LN_1
        windows = g.op("Gather", [padded, window_rows], f"{p}/dsm/windows", axis=1)  # (B, L, W, D)
        mixed = _dense(g, w, f"{p}/dsm", dsm, windows, B, L, D, W)  # (B, L, D)
        hidden = g.op("Add", [hidden, mixed], f"{p}/dsm_residual")  # (B, L, D)
        u2 = _layer_norm(g, w, hidden, norm_ssm, f"{p}/ln_2")  # (B, L, D)
        front = _ssm_front(g, w, f"{p}/ssm", ssm, u2, B, L, D, N)
        if index < cfg.n_layer - 1:
            hidden, _ = _scan_and_output(g, w, f"{p}/ssm", ssm, None, hidden, front, B, L, D, N)  # (B, L, D)
        else:
            hidden = _last_token_ssm(g, w, f"{p}/ssm", ssm, hidden, front, B, L, D, N)  # (B, D)
    _head(g, w, model, hidden)

    inputs = [("states", (B, K, S)), ("actions", (B, K, Adim)), ("rtg", (B, K, 1))]
    return g.model("dmm_window", inputs, [("action", (B, Adim))],
                   doc=f"Decision MetaMamba, window mode (K={K}); built by export/lowering.py",
                   metadata={"mode": "window", "lowering": "export.lowering"})


def _stream_selections(W: int) -> tuple[np.ndarray, np.ndarray]:
    """(3W + W-1, W+2) 0/1 matrices over ext = [c_0 .. c_{W-2}, a, R, s] (DSM cache, then the step's tokens).

    Rows 0..3W-1 are the DSM windows of a, R, s (oldest first), rows 3W.. the next cache.
    keep: a_{t-1} is a token; skip: as if it had never been fed (its window rows are
    irrelevant then and copy the keep ones).
    """
    a, r, s = W - 1, W, W + 1  # positions of the step's tokens in ext
    cache = list(range(W - 1))
    keep_seq = cache + [a, r, s]  # the effective sequence, oldest first
    skip_seq = cache + [r, s]

    def rows(windows_of: list[list[int]], seq: list[int]) -> np.ndarray:
        chosen = [i for window in windows_of for i in window] + seq[-(W - 1):]
        matrix = np.zeros((len(chosen), W + 2), dtype=np.float32)
        matrix[np.arange(len(chosen)), chosen] = 1.0
        return matrix

    keep_windows = [keep_seq[i - W + 1:i + 1] for i in (W - 1, W, W + 1)]  # windows ending at a, R, s
    skip_windows = [keep_windows[0], skip_seq[:W], skip_seq[1:W + 1]]  # a's is unused; R's, s's
    return rows(keep_windows, keep_seq), rows(skip_windows, skip_seq)


def build_stream_graph(model: DecisionMetaMamba, *, batch: int = 1, opset: int = MIN_OPSET,
                       x_through_x_proj: bool = True) -> onnx.ModelProto:
    """One env step with explicit caches (contract/manifest.py, stream mode).

    prev_action (B, Adim), prev_action_valid (B, 1), rtg (B, 1), state (B, S),
    dsm_cache (nl, B, W-1, D), ssm_state (nl, B, D, N) -> action (B, Adim),
    dsm_cache_next, ssm_state_next (same shapes). Consumes the tokens a_{t-1} (skipped
    exactly where prev_action_valid == 0), R_t, s_t; equals three (or two) `model.step`
    calls and, from zero caches, `model.forward` over the whole history.

    x_through_x_proj: x_proj carries x and Dskip * x to the scan (`_folded_x_proj`, one node
    less per layer). The int8 export turns it off: Q/DQ on x_proj's input would otherwise
    reach the recurrence through the identity block, and the scan must see float x.
    """
    _check(model, batch, opset)
    cfg = model.config
    B, S, Adim, nl = batch, cfg.state_dim, cfg.act_dim, cfg.n_layer
    D, N, W = cfg.d_model, cfg.d_state, cfg.dsm_window
    T = 3  # tokens per call: a_{t-1}, R_t, s_t
    g = GraphBuilder(opset)
    w = _Weights(g, model)

    ones = g.const(f"ones({B},1)", np.ones((B, 1), dtype=np.float32))
    block = g.op("Concat", ["prev_action", "rtg", "state", ones], "embed/block", axis=1)  # (B, Adim+1+S+1)
    embed_w = w(model.embed_return.weight, "+embed_state+embed_action(a,R,s)",
                _embedding_matrix(model, ("action", "rtg", "state")))  # (Adim+1+S+1, 3D)
    tokens = g.op("MatMul", [block, embed_w], "embed/linear")  # (B, 3D): [a_{t-1} | R_t | s_t]
    tokens = g.op("Reshape", [tokens, g.ints([B, T, D])], "embed/tokens")  # (B, 3, D)
    hidden = _layer_norm(g, w, tokens, model.embed_ln, "embed/ln")  # (B, 3, D)

    # prev_action_valid in {0, 1} blends 0/1 selection matrices (exactly 0/1 again) and masks the
    # a-token's delta to 0 (exp(0 * A) = 1, delta * Bm * x = 0: the SSM state passes through).
    keep, skip = _stream_selections(W)
    valid3 = g.op("Reshape", ["prev_action_valid", g.ints([B, 1, 1])], "valid/b11")  # (B, 1, 1)
    select = g.op("Add", [g.const("dsm_select_skip", skip), g.op(
        "Mul", [valid3, g.const("dsm_select_keep-skip", keep - skip)], "valid/select_diff")],
        "valid/select")  # (B, 3W + W-1, W+2)
    token_mask = g.op("Concat", [valid3, g.const(f"ones({B},2,1)", np.ones((B, 2, 1), np.float32))],
                      "valid/token_mask", axis=1)  # (B, 3, 1): [valid, 1, 1] per token

    dsm_in = g.op("Reshape", ["dsm_cache", g.ints([nl * B, W - 1, D])], "cache/dsm_rows")  # (nl*B, W-1, D)
    dsm_in = g.op("Split", [dsm_in, g.ints([B] * nl)], "cache/dsm_layers", outputs=nl, axis=0) \
        if nl > 1 else dsm_in  # nl x (B, W-1, D)
    dsm_in = dsm_in if nl > 1 else [dsm_in]
    # The SSM state to the graph's (N, D) layout (see `_ssm_front`) by swapping the last two axes
    # only: ONNX Runtime's CPU Transpose has a fast path for that and is slow for a perm that
    # also moves the layer axis; the layer axis is split off by a Reshape instead.
    ssm_in = g.op("Reshape", ["ssm_state", g.ints([nl * B, 1, D, N])], "cache/ssm_rows")  # (nl*B, 1, D, N)
    ssm_in = g.op("Transpose", [ssm_in], "cache/ssm_nd", perm=[0, 1, 3, 2])  # (nl*B, 1, N, D)
    ssm_in = g.op("Split", [ssm_in, g.ints([B] * nl)], "cache/ssm_layers", outputs=nl, axis=0) \
        if nl > 1 else ssm_in  # nl x (B, 1, N, D)
    ssm_in = ssm_in if nl > 1 else [ssm_in]

    dsm_out, ssm_out = [], []
    for index in range(nl):
        norm_mixer, dsm, norm_ssm, ssm = model._layer(index)  # the model's own layer wiring (shared norms)
        p = f"layer{index}"
        u1 = _layer_norm(g, w, hidden, norm_mixer, f"{p}/ln_1")  # (B, 3, D)
        ext = g.op("Concat", [dsm_in[index], u1], f"{p}/dsm/ext", axis=1)  # (B, W+2, D)
        picked = g.op("MatMul", [select, ext], f"{p}/dsm/select")  # (B, 3W + W-1, D)
        windows, cache_next = g.op("Split", [picked, g.ints([T * W, W - 1])], f"{p}/dsm/split", outputs=2,
                                   axis=1)  # (B, 3W, D), (B, W-1, D)
        dsm_out.append(cache_next)
        mixed = _dense(g, w, f"{p}/dsm", dsm, windows, B, T, D, W)  # (B, 3, D)
        hidden = g.op("Add", [hidden, mixed], f"{p}/dsm_residual")  # (B, 3, D)
        u2 = _layer_norm(g, w, hidden, norm_ssm, f"{p}/ln_2")  # (B, 3, D)
        front = _ssm_front(g, w, f"{p}/ssm", ssm, u2, B, T, D, N, token_mask=token_mask,
                           augmented=x_through_x_proj)
        hidden, h_last = _scan_and_output(g, w, f"{p}/ssm", ssm, ssm_in[index], hidden, front,
                                          B, T, D, N)  # (B, 3, D), (B, 1, N, D)
        ssm_out.append(h_last)

    dsm_next = g.op("Concat", dsm_out, "cache/dsm_concat", axis=0) if nl > 1 else dsm_out[0]  # (nl*B, W-1, D)
    g.op("Reshape", [dsm_next, g.ints([nl, B, W - 1, D])], "dsm_cache_next")  # (nl, B, W-1, D)
    ssm_next = g.op("Concat", ssm_out, "cache/ssm_concat", axis=0) if nl > 1 else ssm_out[0]  # (nl*B, 1, N, D)
    ssm_next = g.op("Transpose", [ssm_next], "cache/ssm_dn", perm=[0, 1, 3, 2])  # (nl*B, 1, D, N)
    g.op("Reshape", [ssm_next, g.ints([nl, B, D, N])], "ssm_state_next")  # (nl, B, D, N)
    state_token = g.op("Gather", [hidden, g.scalar_index(T - 1)], "state_token", axis=1)  # (B, D) at s_t
    _head(g, w, model, state_token)

    inputs = [("prev_action", (B, Adim)), ("prev_action_valid", (B, 1)), ("rtg", (B, 1)), ("state", (B, S)),
              ("dsm_cache", (nl, B, W - 1, D)), ("ssm_state", (nl, B, D, N))]
    outputs = [("action", (B, Adim)), ("dsm_cache_next", (nl, B, W - 1, D)),
               ("ssm_state_next", (nl, B, D, N))]
    return g.model("dmm_stream", inputs, outputs,
                   doc="Decision MetaMamba, stream mode (one env step, explicit caches); built by "
                       "export/lowering.py",
                   metadata={"mode": "stream", "lowering": "export.lowering"})
