"""A PyTorch interpreter of the float intq IR, so that autograd can differentiate a graph.

The mixed-precision sensitivity (:mod:`intq.passes.sensitivity`) needs gradients and
Hessian-vector products of a loss with respect to each layer's weights; the numpy reference
interpreter (:mod:`intq.backends.reference`) cannot give them. This module runs the same
float graph with torch ops, one rule per IR op in :data:`TORCH`, with the semantics of the
reference kernels (float32 in, float32 out; ONNX padding and pooling conventions).

    outputs = run_torch(graph, {"input": x}, weights={"conv.weight": w_leaf})

``weights`` replaces graph constants by name with tensors of the caller's (typically leaves
with ``requires_grad=True``); every other constant is used as a constant tensor. Integer ops
(QConv, Requantize...) have no rule: this runs float graphs only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from intq.errors import IntqError
from intq.ir.graph import Graph, Node
from intq.ir.types import DType
from intq.semantics.numpy_eval import resize_coordinates
from intq.tables import RuleTable

Tensor = torch.Tensor
TorchRule = Callable[..., Tensor]

TORCH: RuleTable[TorchRule] = RuleTable()
"""Op name -> ``rule(node, *inputs) -> output`` (single-output ops only)."""
_rule = TORCH.register

_TORCH_DTYPE = {
    DType.F32: torch.float32,
    DType.F64: torch.float64,
    DType.F16: torch.float16,
    DType.I8: torch.int8,
    DType.U8: torch.uint8,
    DType.I16: torch.int16,
    DType.I32: torch.int32,
    DType.I64: torch.int64,
    DType.BOOL: torch.bool,
}


def _out_dtype(node: Node) -> torch.dtype:
    return _TORCH_DTYPE[node.output.type.dtype]


# ----- elementwise ----------------------------------------------------------------------

_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": torch.div,
    "Pow": torch.pow,
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "And": torch.logical_and,
    "Or": torch.logical_or,
}


@_rule(*_BINARY)
def _binary(node: Node, a: Tensor, b: Tensor) -> Tensor:
    if node.op == "Div" and not a.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return _BINARY[node.op](a, b)


_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Relu": torch.relu,
    "Identity": lambda x: x,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
}


@_rule(*_UNARY)
def _unary(node: Node, x: Tensor) -> Tensor:
    return _UNARY[node.op](x)


@_rule("HardSigmoid")
def _hardsigmoid(node: Node, x: Tensor) -> Tensor:
    return torch.clamp(node.attrs["alpha"] * x + node.attrs["beta"], 0.0, 1.0)


@_rule("HardSwish")
def _hardswish(node: Node, x: Tensor) -> Tensor:
    return x * torch.clamp(x / 6 + 0.5, 0.0, 1.0)


@_rule("Gelu")
def _gelu(node: Node, x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh" if node.attrs["approximate"] == "tanh" else "none")


@_rule("Clip")
def _clip(node: Node, x: Tensor) -> Tensor:
    low, high = node.attrs["min"], node.attrs["max"]
    return torch.clamp(x, None if low == -math.inf else low, None if high == math.inf else high)


@_rule("Where")
def _where(node: Node, cond: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return torch.where(cond, x, y)


@_rule("CumSum")
def _cumsum(node: Node, x: Tensor) -> Tensor:
    axis = node.attrs["axis"]
    data = torch.flip(x, (axis,)) if node.attrs["reverse"] else x
    total = torch.cumsum(data, dim=axis)
    if node.attrs["exclusive"]:
        total = total - data
    return torch.flip(total, (axis,)) if node.attrs["reverse"] else total


@_rule("Cast")
def _cast(node: Node, x: Tensor) -> Tensor:
    return x.to(_out_dtype(node))


# ----- linear algebra ---------------------------------------------------------------------


def _split_pads(pads: Sequence[int]) -> list[int]:
    """ONNX ``(begin..., end...)`` pads as F.pad's ``(last_begin, last_end, ...)``."""
    spatial = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(spatial)):
        out += [pads[i], pads[i + spatial]]
    return out


@_rule("Conv")
def _conv(node: Node, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    attrs = node.attrs
    spatial = x.ndim - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    pads = attrs["pads"]
    if any(pads):
        x = F.pad(x, _split_pads(pads))
    return conv(x, w, b, attrs["strides"], 0, attrs["dilations"], attrs["group"])


@_rule("Gemm")
def _gemm(node: Node, a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
    attrs = node.attrs
    a = a.T if attrs["transA"] else a
    b = b.T if attrs["transB"] else b
    y = a @ b
    if attrs["alpha"] != 1.0:
        y = y * attrs["alpha"]
    if c is not None:
        y = y + (c if attrs["beta"] == 1.0 else c * attrs["beta"])
    return y


@_rule("MatMul")
def _matmul(node: Node, a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a, b)


@_rule("BatchNormalization")
def _batchnorm(
    node: Node, x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor
) -> Tensor:
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, node.attrs["epsilon"])


@_rule("LayerNormalization")
def _layernorm(node: Node, x: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    shape = x.shape[node.attrs["axis"] :]
    return F.layer_norm(x, shape, scale, bias, node.attrs["epsilon"])


@_rule("Softmax")
def _softmax(node: Node, x: Tensor) -> Tensor:
    return torch.softmax(x, node.attrs["axis"])


# ----- pooling ------------------------------------------------------------------------------


def _ceil_extra(node: Node, x: Tensor) -> list[int]:
    """End padding beyond ``pads`` that ceil_mode windows reach into (as the reference)."""
    attrs = node.attrs
    spatial = x.ndim - 2
    dilations = attrs.get("dilations") or (1,) * spatial
    out = node.output.type.shape[2:]
    extra = []
    for i in range(spatial):
        span = dilations[i] * (attrs["kernel_shape"][i] - 1) + 1
        padded = x.shape[2 + i] + attrs["pads"][i] + attrs["pads"][i + spatial]
        extra.append(max(0, (out[i] - 1) * attrs["strides"][i] + span - padded))
    return extra


def _pool_pads(node: Node, x: Tensor) -> list[int]:
    spatial = x.ndim - 2
    pads = list(node.attrs["pads"])
    extra = _ceil_extra(node, x)
    return _split_pads(pads[:spatial] + [p + e for p, e in zip(pads[spatial:], extra)])


@_rule("MaxPool")
def _maxpool(node: Node, x: Tensor) -> Tensor:
    attrs = node.attrs
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[x.ndim - 2]
    padded = F.pad(x, _pool_pads(node, x), value=torch.finfo(x.dtype).min)
    return pool(padded, attrs["kernel_shape"], attrs["strides"], 0, attrs["dilations"])


@_rule("AveragePool")
def _avgpool(node: Node, x: Tensor) -> Tensor:
    attrs = node.attrs
    spatial = x.ndim - 2
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    kernel, strides = attrs["kernel_shape"], attrs["strides"]
    total = pool(F.pad(x, _pool_pads(node, x)), kernel, strides, 0) * math.prod(kernel)
    # The divisor counts real elements, plus declared padding with count_include_pad.
    inside = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    pads = list(attrs["pads"])
    counted = F.pad(inside, _split_pads(pads), value=1.0 if attrs["count_include_pad"] else 0.0)
    extra = _ceil_extra(node, x)
    counted = F.pad(counted, _split_pads([0] * spatial + extra))
    count = pool(counted, kernel, strides, 0) * math.prod(kernel)
    return total / count


@_rule("GlobalAveragePool")
def _global_avgpool(node: Node, x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)


@_rule("ReduceMean", "ReduceSum", "ReduceMax")
def _reduce(node: Node, x: Tensor) -> Tensor:
    axes = tuple(node.attrs["axes"])
    keep = bool(node.attrs["keepdims"])
    if node.op == "ReduceMax":
        return torch.amax(x, dim=axes, keepdim=keep)
    fn = torch.mean if node.op == "ReduceMean" else torch.sum
    return fn(x, dim=axes, keepdim=keep)


# ----- data movement ---------------------------------------------------------------------------


@_rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(node: Node, x: Tensor) -> Tensor:
    return x.reshape(node.output.type.shape)


@_rule("Transpose")
def _transpose(node: Node, x: Tensor) -> Tensor:
    return x.permute(*node.attrs["perm"])


@_rule("Concat")
def _concat(node: Node, *xs: Tensor) -> Tensor:
    return torch.cat(xs, dim=node.attrs["axis"])


@_rule("Slice")
def _slice(node: Node, x: Tensor) -> Tensor:
    attrs = node.attrs
    for start, end, axis, step in zip(
        attrs["starts"], attrs["ends"], attrs["axes"], attrs["steps"]
    ):
        # A canonical end of -dim - 1 with a negative step means "through index 0".
        kept = range(*slice(start, None if end < 0 else end, step).indices(x.shape[axis]))
        x = torch.index_select(x, axis, torch.tensor(list(kept), dtype=torch.int64))
    return x


@_rule("GatherElements")
def _gather_elements(node: Node, data: Tensor, indices: Tensor) -> Tensor:
    axis = node.attrs["axis"]
    index = indices.to(torch.int64) % data.shape[axis]
    view = data[tuple(slice(0, n) if i != axis else slice(None) for i, n in enumerate(index.shape))]
    return torch.gather(view, axis, index)


@_rule("Gather")
def _gather(node: Node, data: Tensor, indices: Tensor) -> Tensor:
    axis = node.attrs["axis"]
    flat = indices.reshape(-1).to(torch.int64) % data.shape[axis]
    picked = torch.index_select(data, axis, flat)
    shape = (*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :])
    return picked.reshape(shape)


@_rule("Expand")
def _expand(node: Node, x: Tensor) -> Tensor:
    return x.expand(*node.attrs["shape"]).clone()


@_rule("Pad")
def _pad(node: Node, x: Tensor) -> Tensor:
    pads, rank = node.attrs["pads"], x.ndim
    # Negative pads crop: slice first, then pad by the positive parts (as the reference).
    crop = tuple(slice(max(0, -pads[i]), x.shape[i] - max(0, -pads[i + rank])) for i in range(rank))
    x = x[crop]
    width: list[int] = []
    for i in reversed(range(rank)):
        width += [max(0, pads[i]), max(0, pads[i + rank])]
    while width and not any(width[-2:]):  # F.pad's other modes take only the dims they pad
        width = width[:-2]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[node.attrs["mode"]]
    if not width:
        return x
    if mode == "constant":
        return F.pad(x, width, value=node.attrs["value"])
    return F.pad(x, width, mode=mode)


# ----- float ops the ONNX importer added for real models -------------------------------------


@_rule("Min", "Max")
def _min_max(node: Node, a: Tensor, b: Tensor) -> Tensor:
    return torch.minimum(a, b) if node.op == "Min" else torch.maximum(a, b)


@_rule("PRelu")
def _prelu(node: Node, x: Tensor, slope: Tensor) -> Tensor:
    return torch.where(x < 0, x * slope, x)


@_rule("Softplus")
def _softplus(node: Node, x: Tensor) -> Tensor:
    return F.softplus(x)


@_rule("Mish")
def _mish(node: Node, x: Tensor) -> Tensor:
    return F.mish(x)


@_rule("Resize")
def _resize(node: Node, x: Tensor) -> Tensor:
    """The reference's per-axis nearest or linear interpolation, with torch ops."""
    attrs = node.attrs
    y = x
    for axis, (size, out, scale) in enumerate(zip(x.shape, attrs["sizes"], attrs["scales"])):
        if size == out and scale == 1.0:
            continue
        coords = torch.from_numpy(
            resize_coordinates(out, size, scale, attrs["coordinate_transformation_mode"])
        )
        if attrs["mode"] == "nearest":
            mode = attrs["nearest_mode"]
            if mode == "floor":
                index = torch.floor(coords)
            elif mode == "ceil":
                index = torch.ceil(coords)
            elif mode == "round_prefer_ceil":
                index = torch.floor(coords + 0.5)
            else:
                index = torch.ceil(coords - 0.5)
            y = torch.index_select(y, axis, index.clamp(0, size - 1).to(torch.int64))
            continue
        coords = coords.clamp(0, size - 1)
        low = torch.clamp(coords.to(torch.int64), max=size - 1)
        high = torch.clamp(low + 1, max=size - 1)
        same = low == high
        frac = torch.where(same, torch.tensor(0.5), coords - low.to(torch.float32))
        shape = [1] * x.ndim
        shape[axis] = out
        w_high = frac.reshape(shape).to(x.dtype)
        w_low = torch.where(same, torch.tensor(0.5), 1 - frac).reshape(shape).to(x.dtype)
        y = torch.index_select(y, axis, low) * w_low + torch.index_select(y, axis, high) * w_high
    return y


@_rule("ConvTranspose")
def _conv_transpose(node: Node, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    attrs = node.attrs
    spatial = x.ndim - 2
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]
    # Unpadded, then ONNX's (possibly asymmetric) pads cropped and output_padding appended.
    y = conv(x, w, None, attrs["strides"], 0, 0, attrs["group"], attrs["dilations"])
    pads, extra = attrs["pads"], attrs["output_padding"]
    if any(extra):
        y = F.pad(y, _split_pads([0] * spatial + list(extra)))
    crop = tuple(slice(pads[i], y.shape[2 + i] - pads[i + spatial]) for i in range(spatial))
    y = y[(slice(None), slice(None), *crop)]
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * spatial)
    return y


# ----- the interpreter ---------------------------------------------------------------------


def run_torch(
    graph: Graph,
    feeds: Mapping[str, Tensor | np.ndarray],
    weights: Mapping[str, Tensor] | None = None,
    transform: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
) -> dict[str, Tensor]:
    """Run the float ``graph`` with torch; returns output name -> tensor.

    ``feeds`` maps input names to tensors or arrays (batch shapes as the graph declares);
    ``weights`` replaces the constants it names (e.g. by leaves that require grad);
    ``transform`` maps graph inputs and node outputs to a function applied to the value as
    soon as it is computed, before any reader sees it (e.g. fake-quantizing one activation
    to measure its sensitivity). Raises :class:`~intq.errors.UnsupportedOpError` naming the
    node for an op without a torch rule.
    """
    env: dict[str, Tensor] = {}
    for value in graph.inputs:
        if value.name not in feeds:
            raise IntqError(f"missing input {value.name!r}", hint="feed every graph input")
        env[value.name] = torch.as_tensor(feeds[value.name])
    changes = transform or {}
    for name in changes.keys() & env.keys():
        env[name] = changes[name](env[name])
    overrides = weights or {}
    unknown = sorted(set(overrides) - {v.name for v in graph.constants})
    if unknown:
        raise IntqError(f"weights name constants the graph does not have: {unknown}")
    for value in graph.constants:
        assert value.const is not None
        env[value.name] = overrides.get(value.name, torch.from_numpy(np.array(value.const)))
    for node in graph.nodes:
        if len(node.outputs) != 1:
            raise IntqError(f"{node.op} has several outputs; run_torch runs one", node=node.label())
        rule = TORCH.rule_for(node, "torch rule")
        args: list[Tensor | None] = [None if v is None else env[v.name] for v in node.inputs]
        while args and args[-1] is None:
            args.pop()
        env[node.output.name] = rule(node, *args)
        change = changes.get(node.output.name)
        if change is not None:
            env[node.output.name] = change(env[node.output.name])
    return {v.name: env[v.name] for v in graph.outputs}


__all__ = ["TORCH", "run_torch"]
