"""Fold inference-mode BatchNormalization into the preceding Conv, ConvTranspose or Gemm,
and turn one that cannot fold into a depthwise 1x1 Conv.

Rules (HAWQ-V3 folds BN before quantizing, so weights carry its scale):

- ``conv-bn``: ``BatchNormalization(Conv(x, W, b))`` where the Conv output has
  no other reader and ``W``, ``b`` and the BN parameters are constants becomes
  ``Conv(x, W', b')`` with ``k = scale / sqrt(var + eps)``,
  ``W'[c] = W[c] * k[c]`` and ``b' = (b - mean) * k + B``.
- ``gemm-bn``: ``BatchNormalization(Gemm(x, W, c))`` folds the same way into
  ``W``'s output columns (``transB`` respected) and ``c``; ``alpha`` folds
  into ``W`` and ``beta`` into ``c``. Refused when ``c`` varies per row.
- ``convtranspose-bn``: ``BatchNormalization(ConvTranspose(x, W, b))`` folds the same way;
  ConvTranspose's weight is ``[C_in, C_out / group, k...]``, so ``k`` scales axis 1 of each
  group's block.
- ``bn-depthwise``: any other BatchNormalization with constant parameters (DenseNet's
  pre-activation ``BN -> ReLU -> Conv``, a BatchNorm1d after a Linear) is the per-channel
  affine ``k[c] x + shift[c]``, written as a Conv with ``group = C`` and a ``[C, 1, 1...]``
  weight ``k``, bias ``shift``: the integer lowering, range analysis and backends handle it
  as any depthwise conv. Its 8-bit per-channel weight quantization is exact up to the
  rounding of ``k`` (each channel's one weight becomes ``+-127`` at scale ``|k[c]| / 127``).
  A rank-4 input takes the Conv as it is; any other rank is reshaped to ``[N, C, -1, 1]``
  around it (``[N, C]`` becomes ``[N, C, 1, 1]``): every backend lowers 2-D convolutions.
- ``norm-affine-depthwise``: ``Add(Mul(y, gamma), beta)`` with one constant per channel
  (``[C, 1, 1]``) of a LayerNormalization's output ``y``, or of a Reshape of one (torch's
  export of ``GroupNorm``: InstanceNormalization of ``[N, G, -1]``, then the affine), is the
  same depthwise Conv: after a normalization there is no layer to fold ``gamma`` into, and
  the Conv quantizes it per channel.
- Arithmetic is in float64, stored in the weights' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from intq.ir.graph import Graph, Node, Value
from intq.passes.manager import Pass
from intq.passes.rewrite import Const, Match, Op, Opt, Rule, Var, apply_rules


def _bn_pattern(producer: str | None, bias: str = "b") -> Op:
    inner = (
        Var("x")
        if producer is None
        else Op(producer, Var("x"), Const("w"), Opt(Const(bias)), name="producer")
    )
    return Op(
        "BatchNormalization",
        inner,
        Const("scale"),
        Const("shift"),
        Const("mean"),
        Const("var"),
    )


def _bn_factors(m: Match) -> tuple[np.ndarray, np.ndarray]:
    """``(k, shift)`` with ``BN(y) = k * y + shift`` per channel, in float64."""
    scale, shift, mean, var = (
        np.asarray(m.const(n), np.float64) for n in ("scale", "shift", "mean", "var")
    )
    k = scale / np.sqrt(var + m.root.attrs["epsilon"])
    return k, shift - mean * k


def _rebuild(
    graph: Graph, m: Match, weight: np.ndarray, bias: np.ndarray, **attrs: object
) -> Value:
    """The producer again, with new constant weight and bias, where the BN was."""
    producer: Node = m["producer"]
    w = graph.add_constant(weight, m["w"].name + ".bn")
    b = graph.add_constant(bias, (producer.name or producer.op.lower()) + ".bias.bn")
    merged: dict[str, Any] = {**producer.attrs, **attrs}
    node = graph.add(producer.op, [m["x"], w, b], merged, name=producer.name, before=m.root)
    return node.output


def _fold_conv(graph: Graph, m: Match) -> list[Value]:
    k, shift = _bn_factors(m)
    w = m.const("w")
    b = m.const("b")
    b = np.zeros(k.shape) if b is None else b.astype(np.float64)
    weight = w.astype(np.float64) * k.reshape((-1,) + (1,) * (w.ndim - 1))
    return [_rebuild(graph, m, weight.astype(w.dtype), (b * k + shift).astype(w.dtype))]


def _fold_conv_transpose(graph: Graph, m: Match) -> list[Value]:
    k, shift = _bn_factors(m)
    w = m.const("w")
    b = m.const("b")
    b = np.zeros(k.shape) if b is None else b.astype(np.float64)
    group = m["producer"].attrs["group"]
    per_group = w.shape[1]
    # [C_in, C_out / g, ...] as [g, C_in / g, C_out / g, ...]; output channel g * (C_out / g) + j
    blocks = w.astype(np.float64).reshape((group, -1, *w.shape[1:]))
    factors = k.reshape((group, 1, per_group) + (1,) * (w.ndim - 2))
    weight = (blocks * factors).reshape(w.shape)
    return [_rebuild(graph, m, weight.astype(w.dtype), (b * k + shift).astype(w.dtype))]


def _depthwise(graph: Graph, m: Match) -> list[Value]:
    """The BN as a Conv with one weight per channel."""
    k, shift = _bn_factors(m)
    return [_channel_affine(graph, m.root, m["x"], k, shift)]


def _channel_affine(graph: Graph, bn: Node, x: Value, k: np.ndarray, shift: np.ndarray) -> Value:
    """``k[c] x + shift[c]`` over axis 1 of ``x`` as a depthwise 2-D Conv placed before
    ``bn`` (``x`` reshaped to ``[N, C, -1, 1]`` unless it has rank 4)."""
    dtype = x.type.dtype.numpy
    shape = x.type.shape
    name = bn.name or "batchnorm"
    source = x
    if x.type.rank != 4:  # the TVM backend's convolutions are 2-D
        flat = (shape[0], shape[1], int(np.prod(shape[2:], dtype=np.int64)), 1)
        source = graph.add("Reshape", [x], {"shape": flat}, name=bn.name, before=bn).output
    spatial = source.type.rank - 2
    w = graph.add_constant(k.reshape((-1, 1) + (1,) * spatial).astype(dtype), name + ".scale")
    b = graph.add_constant(shift.astype(dtype), name + ".shift")
    attrs = {
        "strides": (1,) * spatial,
        "pads": (0,) * (2 * spatial),
        "dilations": (1,) * spatial,
        "group": shape[1],
    }
    y = graph.add("Conv", [source, w, b], attrs, name=bn.name, before=bn).output
    if source is not x:
        y = graph.add("Reshape", [y], {"shape": shape}, name=bn.name, before=bn).output
    return y


def _channel_vector(value: Value, x: Value) -> np.ndarray | None:
    """The constant ``value`` as one entry per channel of ``x`` (axis 1), when it broadcasts
    to ``x`` varying along that axis only."""
    c = value.const
    shape = x.type.shape
    if c is None or c.ndim > len(shape) or x.type.rank < 3:
        return None
    dims = (1,) * (len(shape) - c.ndim) + c.shape
    if dims[1] != shape[1] or any(d != 1 for i, d in enumerate(dims) if i != 1):
        return None
    return np.asarray(c, np.float64).reshape(-1)


def _normalized(x: Value) -> bool:
    """``x`` is a LayerNormalization's output, or a Reshape of one (a decomposed GroupNorm)."""
    producer = x.producer
    if producer is not None and producer.op == "Reshape" and producer.inputs[0] is not None:
        producer = producer.inputs[0].producer
    return producer is not None and producer.op == "LayerNormalization"


def _affine_check(m: Match) -> str | None:
    x = m["x"]
    if not _normalized(x):
        return "the scaled tensor is no normalization's output"
    if _channel_vector(m["s"], x) is None or _channel_vector(m["b"], x) is None:
        return "the scale or shift is not one constant per channel (axis 1)"
    if x.type.dtype.numpy != m["s"].type.dtype.numpy:
        return "the scale's dtype differs from the tensor's"
    return None


def _affine(graph: Graph, m: Match) -> list[Value]:
    x = m["x"]
    k, shift = _channel_vector(m["s"], x), _channel_vector(m["b"], x)
    assert k is not None and shift is not None
    return [_channel_affine(graph, m.root, x, k, shift)]


_AFFINE = Op(
    "Add",
    Op("Mul", Var("x"), Const("s"), commutative=True, name="mul"),
    Const("b"),
    commutative=True,
)


def _depthwise_check(m: Match) -> str | None:
    if m["x"].type.rank < 2:
        return "BatchNormalization of a tensor without a channel axis"
    if not m["x"].type.dtype.is_float:
        return "BatchNormalization of a non-float tensor"
    return None


def _gemm_check(m: Match) -> str | None:
    c = m.const("c")
    if c is not None and c.ndim == 2 and c.shape[0] != 1:
        return "the Gemm bias varies per row; BN scales per column"
    return None


def _fold_gemm(graph: Graph, m: Match) -> list[Value]:
    k, shift = _bn_factors(m)
    attrs = m["producer"].attrs
    w, c = m.const("w"), m.const("c")
    n = k.shape[0]
    columns = k.reshape(-1, 1) if attrs["transB"] else k.reshape(1, -1)
    weight = w.astype(np.float64) * attrs["alpha"] * columns
    c = np.zeros(n) if c is None else np.broadcast_to(c.astype(np.float64) * attrs["beta"], (1, n))
    bias = c.reshape(n) * k + shift
    return [_rebuild(graph, m, weight.astype(w.dtype), bias.astype(w.dtype), alpha=1.0, beta=1.0)]


RULES = (
    Rule("conv-bn", _bn_pattern("Conv", "b"), _fold_conv),
    Rule("gemm-bn", _bn_pattern("Gemm", "c"), _fold_gemm, _gemm_check),
    Rule("convtranspose-bn", _bn_pattern("ConvTranspose"), _fold_conv_transpose),
    Rule("bn-depthwise", _bn_pattern(None), _depthwise, _depthwise_check),
    Rule("norm-affine-depthwise", _AFFINE, _affine, _affine_check),
)
"""Tried in order at each BatchNormalization: a fold into the producer first."""


@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it; any
    other becomes a depthwise 1x1 Conv."""

    name: ClassVar[str] = "fold-batchnorm"

    def apply(self, graph: Graph) -> bool:
        return apply_rules(graph, RULES) > 0
