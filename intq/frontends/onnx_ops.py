"""One small converter per ONNX op, keyed by ``(op_type, opset range)``.

A converter gets a :class:`ConvertContext` for one ONNX node and returns the
IR values of the node's outputs. It folds ONNX's constant operands (shapes,
axes, bounds) into canonical IR attributes; ``ctx.emit`` folds nodes whose
inputs are all constants, which turns exporters' Shape/Gather/Concat chains
into constants.

Adding an op: write a converter in this module or :mod:`intq.frontends.onnx_layout_ops`;
:data:`CONVERTERS` joins both tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from intq.frontends.einsum import einsum
from intq.frontends.normalization import Emit, group_norm, l2_norm
from intq.frontends.onnx_context import (
    ConvertContext,
    Converter,
    ConverterTable,
    explicit_pads,
    ints,
    onnx_dtype,
    window_geometry,
    window_lengths,
)
from intq.frontends.onnx_layout_ops import CONVERTERS as LAYOUT_CONVERTERS
from intq.ir.graph import Value
from intq.ir.types import TensorType
from intq.ops.shape_rules import global_window

_CORE = ConverterTable()
converter = _CORE.register


# ----- one-to-one ops -----------------------------------------------------------

_SAME_NAME = [
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Equal",
    "Less",
    "Greater",
    "And",
    "Or",
    "Not",
    "IsNaN",
    "Where",
    "Sigmoid",
    "Tanh",
    "Erf",
    "Sqrt",
    "Exp",
    "Neg",
    "Abs",
    "Relu",
    "MatMul",
    "GlobalAveragePool",
]


def _same(ctx: ConvertContext) -> list[Value]:
    return ctx.emit(ctx.node.op_type, ctx.inputs)


_SINCE = {"Add": 7, "Sub": 7, "Mul": 7, "Div": 7, "Pow": 7, "IsNaN": 9}
"""The first opset of the ``_SAME_NAME`` ops whose converters do not start at opset 1."""

for _op in _SAME_NAME:
    converter(_op, _SINCE.get(_op, 1))(_same)


@converter("Identity")
@converter("Dropout", 7)
def _identity(ctx: ConvertContext) -> list[Value]:
    """Inference-time identity (Dropout's mask output is refused)."""
    if ctx.node.op_type == "Dropout":
        ctx.only_first_output()
        training = ctx.const(2, "training_mode")
        if training is not None and bool(training):
            raise ctx.unsupported("training_mode=True")
    return [ctx.input(0)]


@converter("GatherElements", 11)
def _gather_elements(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("GatherElements", ctx.inputs[:2], axis=ctx.attr("axis", 0))


@converter("CumSum", 11)
def _cumsum(ctx: ConvertContext) -> list[Value]:
    """``axis`` from its constant input (position ids: the running count of real tokens)."""
    axis = ctx.const(1, "axis")
    if axis is None or np.asarray(axis).size != 1:
        raise ctx.unsupported("a computed or non-scalar axis")
    return ctx.emit(
        "CumSum",
        ctx.inputs[:1],
        axis=int(np.asarray(axis).reshape(())),
        exclusive=ctx.attr("exclusive", 0),
        reverse=ctx.attr("reverse", 0),
    )


@converter("Gelu", 20)
def _gelu(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("Gelu", ctx.inputs[:1], approximate=ctx.attr("approximate", "none"))


@converter("Clip", 6, 10)
def _clip_attrs(ctx: ConvertContext) -> list[Value]:
    return ctx.emit(
        "Clip", ctx.inputs[:1], min=ctx.attr("min", -np.inf), max=ctx.attr("max", np.inf)
    )


@converter("Clip", 11)
def _clip_inputs(ctx: ConvertContext) -> list[Value]:
    low, high = ctx.const(1, "min"), ctx.const(2, "max")
    return ctx.emit(
        "Clip",
        ctx.inputs[:1],
        min=-np.inf if low is None else float(low),
        max=np.inf if high is None else float(high),
    )


@converter("Cast", 6)
def _cast(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("Cast", ctx.inputs, to=onnx_dtype(ctx.attr("to"), node=ctx.name).value)


# ----- convolution, pooling -------------------------------------------------------


def _resolve_auto_pad(
    ctx: ConvertContext,
    x: TensorType,
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> tuple[int, ...]:
    """Explicit ``pads`` from ONNX's ``auto_pad`` (or the ``pads`` attribute)."""
    spatial = len(kernel)
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        return explicit_pads(ctx, spatial)
    if auto_pad == "VALID":
        return (0,) * (2 * spatial)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ctx.unsupported(f"auto_pad={auto_pad!r}")
    begin, end = [], []
    for i in range(spatial):
        size = x.shape[2 + i]
        out = -(-size // strides[i])
        total = max(0, (out - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return tuple(begin + end)


@converter("Conv", 1)
def _conv(ctx: ConvertContext) -> list[Value]:
    x, kernel, strides, dilations = window_geometry(ctx)
    pads = _resolve_auto_pad(ctx, x.type, kernel, strides, dilations)
    return ctx.emit(
        "Conv",
        ctx.inputs,
        strides=strides,
        pads=pads,
        dilations=dilations,
        group=ctx.attr("group", 1),
    )


def _pool_attrs(ctx: ConvertContext, dilations: bool) -> dict[str, Any]:
    kernel = tuple(ctx.attr("kernel_shape"))
    spatial = len(kernel)
    strides = tuple(ctx.attr("strides", [1] * spatial))
    dil = tuple(ctx.attr("dilations", [1] * spatial))
    window_lengths(ctx, ctx.input(0), spatial, kernel_shape=kernel, strides=strides, dilations=dil)
    attrs: dict[str, Any] = {
        "kernel_shape": kernel,
        "strides": strides,
        "pads": _resolve_auto_pad(ctx, ctx.input(0).type, kernel, strides, dil),
        "ceil_mode": ctx.attr("ceil_mode", 0),
    }
    if dilations:
        attrs["dilations"] = dil
    elif any(d != 1 for d in dil):
        raise ctx.unsupported("dilated average pooling")
    return attrs


@converter("MaxPool", 8)
def _maxpool(ctx: ConvertContext) -> list[Value]:
    ctx.only_first_output()
    if ctx.attr("storage_order", 0):
        raise ctx.unsupported("storage_order=1")
    return ctx.emit("MaxPool", ctx.inputs, **_pool_attrs(ctx, True))


@converter("AveragePool", 7)
def _avgpool(ctx: ConvertContext) -> list[Value]:
    attrs = _pool_attrs(ctx, False)
    sizes = ctx.input(0).type.shape[2:]
    if global_window(sizes, attrs["kernel_shape"], attrs["pads"], attrs["ceil_mode"]):
        return ctx.emit("GlobalAveragePool", ctx.inputs)
    attrs["count_include_pad"] = ctx.attr("count_include_pad", 0)
    return ctx.emit("AveragePool", ctx.inputs, **attrs)


# ----- linear algebra, normalisation --------------------------------------------------


@converter("Gemm", 7)
def _gemm(ctx: ConvertContext) -> list[Value]:
    return ctx.emit(
        "Gemm",
        ctx.inputs,
        alpha=ctx.attr("alpha", 1.0),
        beta=ctx.attr("beta", 1.0),
        transA=ctx.attr("transA", 0),
        transB=ctx.attr("transB", 0),
    )


@converter("Einsum", 12)
def _einsum(ctx: ConvertContext) -> list[Value]:
    """Transpose, Reshape, batched MatMul and ReduceSum (:mod:`intq.frontends.einsum`)."""
    operands = [ctx.input(i) for i in range(len(ctx.inputs))]
    return [einsum(_emitter(ctx), ctx.attr("equation"), operands, node=ctx.name)]


@converter("BatchNormalization", 9)
def _batchnorm(ctx: ConvertContext) -> list[Value]:
    ctx.only_first_output()
    if ctx.attr("training_mode", 0):
        raise ctx.unsupported("training_mode=1")
    return ctx.emit("BatchNormalization", ctx.inputs, epsilon=ctx.attr("epsilon", 1e-5))


@converter("LayerNormalization", 17)
def _layernorm(ctx: ConvertContext) -> list[Value]:
    ctx.only_first_output()
    return ctx.emit(
        "LayerNormalization",
        ctx.inputs,
        axis=ctx.attr("axis", -1),
        epsilon=ctx.attr("epsilon", 1e-5),
    )


def _emitter(ctx: ConvertContext) -> Emit:
    """``ctx.emit1`` as the shared decompositions call it: intermediate outputs named after the
    node's output plus a suffix, the last one (``suffix=""``) after the output itself."""

    def emit(op: str, inputs: list[Value | None], suffix: str, **attrs: Any) -> Value:
        out_name = ctx.node.output[0] + suffix if suffix else ""
        return ctx.emit1(op, inputs, out_name=out_name, **attrs)

    return emit


def _group_norm(
    ctx: ConvertContext, groups: int, gamma: np.ndarray | None, beta: np.ndarray | None
) -> list[Value]:
    x = ctx.input(0)
    eps = ctx.attr("epsilon", 1e-5)
    return [group_norm(ctx.graph, _emitter(ctx), x, groups, gamma, beta, eps, node=ctx.name)]


@converter("InstanceNormalization", 6)
def _instancenorm(ctx: ConvertContext) -> list[Value]:
    """GroupNorm with one group per channel (:mod:`intq.frontends.normalization`)."""
    channels = ctx.input(0).type.shape[1] if ctx.input(0).type.rank >= 2 else 0
    return _group_norm(ctx, channels, ctx.const(1, "scale"), ctx.const(2, "B"))


@converter("GroupNormalization", 18, 20)
def _groupnorm_per_group(ctx: ConvertContext) -> list[Value]:
    """Opset 18: ``scale`` and ``bias`` hold one entry per group, shared by its channels."""
    groups = ctx.attr("num_groups")
    channels = ctx.input(0).type.shape[1] if ctx.input(0).type.rank >= 2 else 0
    gamma, beta = ctx.const(1, "scale"), ctx.const(2, "bias")
    if groups < 1 or channels % groups:
        raise ctx.unsupported(f"{channels} channels in {groups} groups")
    per_channel = [None if v is None else np.repeat(v, channels // groups) for v in (gamma, beta)]
    return _group_norm(ctx, groups, *per_channel)


@converter("GroupNormalization", 21)
def _groupnorm(ctx: ConvertContext) -> list[Value]:
    """Opset 21: ``scale`` and ``bias`` per channel; ``stash_type`` (the precision of the
    statistics) is float32 or wider in every intq evaluation."""
    return _group_norm(ctx, ctx.attr("num_groups"), ctx.const(1, "scale"), ctx.const(2, "bias"))


@converter("Softmax", 1, 12)
def _softmax_flat(ctx: ConvertContext) -> list[Value]:
    """Before opset 13 Softmax normalises over all dims from ``axis`` (flattened)."""
    x = ctx.input(0)
    axis = ctx.attr("axis", 1) % max(x.type.rank, 1)
    if axis == x.type.rank - 1:
        return ctx.emit("Softmax", [x], axis=axis)
    rows = int(np.prod(x.type.shape[:axis]))
    flat = ctx.graph.op("Reshape", x, name=ctx.name, shape=(rows, -1))
    soft = ctx.graph.op("Softmax", flat, name=ctx.name, axis=1)
    return ctx.emit("Reshape", [soft], shape=x.type.shape)


@converter("Softmax", 13)
def _softmax(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("Softmax", ctx.inputs, axis=ctx.attr("axis", -1))


# ----- hard activations (MobileNetV3's HardSigmoid and HardSwish) ----------------------


@converter("HardSigmoid", 6)
def _hard_sigmoid(ctx: ConvertContext) -> list[Value]:
    """``clip(alpha x + beta, 0, 1)``."""
    return ctx.emit(
        "HardSigmoid", ctx.inputs[:1], alpha=ctx.attr("alpha", 0.2), beta=ctx.attr("beta", 0.5)
    )


@converter("HardSwish", 14)
def _hard_swish(ctx: ConvertContext) -> list[Value]:
    """``x * clip(x / 6 + 1/2, 0, 1)``."""
    return ctx.emit("HardSwish", ctx.inputs[:1])


# ----- reductions ---------------------------------------------------------------------


def _reduce(ctx: ConvertContext, axes: tuple[int, ...]) -> list[Value]:
    if not axes and ctx.attr("noop_with_empty_axes", 0):
        return [ctx.input(0)]
    return ctx.emit(ctx.node.op_type, ctx.inputs[:1], axes=axes, keepdims=ctx.attr("keepdims", 1))


for _op, _last_attr_opset in (("ReduceMean", 17), ("ReduceMax", 17), ("ReduceSum", 12)):
    converter(_op, 1, _last_attr_opset)(lambda ctx: _reduce(ctx, tuple(ctx.attr("axes", []))))
    converter(_op, _last_attr_opset + 1)(lambda ctx: _reduce(ctx, ints(ctx.const(1, "axes"))))


def _reduce_l2(ctx: ConvertContext, axes: tuple[int, ...]) -> list[Value]:
    """``Sqrt(ReduceSum(x * x))`` (:func:`intq.frontends.normalization.l2_norm`)."""
    x = ctx.input(0)
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):  # no reduction: sqrt(x^2), as ORT computes
            return ctx.emit("Abs", [x])
        axes = tuple(range(x.type.rank))
    axes = tuple(sorted(a % max(x.type.rank, 1) for a in axes))
    return [l2_norm(_emitter(ctx), x, axes, bool(ctx.attr("keepdims", 1)))]


converter("ReduceL2", 1, 17)(lambda ctx: _reduce_l2(ctx, tuple(ctx.attr("axes", []))))
converter("ReduceL2", 18)(lambda ctx: _reduce_l2(ctx, ints(ctx.const(1, "axes"))))


CONVERTERS = _CORE.joined(LAYOUT_CONVERTERS)
"""ONNX op type -> ``(first opset, last opset, converter)`` entries: every converter."""


def find_converter(op_type: str, opset: int) -> Converter | None:
    """The converter for ``op_type`` at ``opset``, or None."""
    for since, until, fn in CONVERTERS.get(op_type, ()):
        if since <= opset <= until:
            return fn
    return None


def supported_ops() -> list[str]:
    """``"Op (opsets a-b)"`` for every ONNX op intq converts."""
    rows = []
    for op_type, entries in sorted(CONVERTERS.items()):
        low = min(e[0] for e in entries)
        high = max(e[1] for e in entries)
        rows.append(f"{op_type} ({low}-{high})")
    return rows
