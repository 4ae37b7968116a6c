"""Which nodes of a lowered graph are Linear layers, and the precision a graph records.

Shared by the fp16 pass (`export.precision`) and the Q/DQ pass (`calibration.qdq`), so
both read one table. It works on ``onnx.ModelProto`` objects by attribute access alone
and imports neither onnx nor anything else of the project.

The lowering (`export.lowering`) writes every projection of the model as one MatMul (the
head as a Gemm) whose second input is an initializer named after the model parameter it
comes from (``ssm.0.in_proj.weight.T``, ``dsm.1.lin.weight.T``, ...). Those are the Linear
layers, and `linear_nodes` names their role from the node name:

    role      node                 weight (K x N)             notes
    embed     embed/linear         block-diagonal embeddings  bias folded in as the last row (input 1)
    dsm       layer{i}/dsm/dense   DSM lin, (W*D, D)
    in_proj   layer{i}/ssm/in_proj (D, 2D)
    x_proj    layer{i}/ssm/x_proj  x_proj with dt_proj folded in; in stream mode augmented with
                                   an identity and a diag(Dskip) block (x and Dskip * x pass through)
    out_proj  layer{i}/ssm/out_proj (D, D)
    head      head (Gemm)          (Adim, D), transB

Every other MatMul is not a Linear layer and stays float32 in every precision
(docs/design.md#precision).
"""

from __future__ import annotations

# Node-name suffix -> role of a Linear layer (see the module docstring).
LINEAR_ROLES = {
    "embed/linear": "embed",
    "/dsm/dense": "dsm",
    "/ssm/in_proj": "in_proj",
    "/ssm/x_proj": "x_proj",
    "/ssm/out_proj": "out_proj",
    "head": "head",
}
ALL_ROLES = tuple(dict.fromkeys(LINEAR_ROLES.values()))
FP16_ROLES = ALL_ROLES
# int8 on the per-layer projections only (docs/deployment.md#qdq-placement). The embedding
# carries its bias as a constant-1 column of its input, which a per-tensor activation scale
# would round (1 becomes k * scale, up to half a step off), and its K = S + Adim + 2 and the
# head's N = Adim are too small for int8 tensor cores anyway (ModelOpt leaves GEMMs with K or
# N < 16 unquantized for that reason); they stay float32.
INT8_ROLES = ("dsm", "in_proj", "x_proj", "out_proj")

# Ops that move data and compute nothing: a TensorRT layer built from them carries no precision of
# its own. The casts and Q/DQ pairs of a precision pass are what change a tensor's type.
DATA_MOVEMENT_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Split", "Concat", "Gather", "Transpose", "Slice",
                               "Identity", "Flatten", "Expand", "Shape", "Constant"})
PRECISION_OPS = frozenset({"Cast", "QuantizeLinear", "DequantizeLinear"})

ONNX_FLOAT = 1  # onnx.TensorProto.FLOAT
PRECISION_KEY = "precision"  # the graph's metadata_props entry


def role_of(node_name: str) -> str | None:
    for suffix, role in LINEAR_ROLES.items():
        if node_name == suffix or node_name.endswith(suffix):
            return role
    return None


def linear_nodes(proto) -> dict[str, str]:
    """Node name -> role for every Linear layer of a lowered graph (see the module docstring).

    A Linear layer is a MatMul / Gemm whose second input is a float initializer derived from
    a model weight (its name holds ".weight"). Such a node with no known role means the
    lowering changed without this table: a bug, raised rather than guessed about.
    """
    initializers = {init.name: init for init in proto.graph.initializer}
    found = {}
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = initializers.get(node.input[1])
        if weight is None or weight.data_type != ONNX_FLOAT or ".weight" not in weight.name:
            continue
        role = role_of(node.name)
        if role is None:
            raise ValueError(f"MatMul {node.name!r} reads the weight {weight.name!r} but has no role in "
                             "contract.graph_roles.LINEAR_ROLES; add it there (and decide its precision)")
        found[node.name] = role
    if not found:
        raise ValueError("no Linear layers found; expected a graph built by export.lowering")
    return found


def set_precision_metadata(proto, precision: str) -> None:
    """Record ``precision`` in the graph's metadata_props (replacing an earlier entry)."""
    kept = [(entry.key, entry.value) for entry in proto.metadata_props if entry.key != PRECISION_KEY]
    del proto.metadata_props[:]
    for key, value in [*kept, (PRECISION_KEY, precision)]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def precision_pins(proto, linears) -> dict[str, list[str]]:
    """What a graph computes in fp32 whatever its precision, for checking a built plan's layers.

    ``linears``: the Linear layers' node names (`linear_nodes` of the fp32 graph; a lowered graph
    keeps them). Returns ``fp32``: every computing node outside the Linear layers and the precision
    ops (LayerNorm, softplus's Exp/Add/Log, exp(delta * A), the recurrence, the selection MatMuls,
    the gates, the head's Tanh); ``neutral``: the data-movement nodes (`DATA_MOVEMENT_OPS`).
    """
    linears = set(linears)
    pins: dict[str, list[str]] = {"fp32": [], "neutral": []}
    for node in proto.graph.node:
        if node.name in linears or node.op_type in PRECISION_OPS:
            continue
        pins["neutral" if node.op_type in DATA_MOVEMENT_OPS else "fp32"].append(node.name)
    return pins
