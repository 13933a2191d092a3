"""Shape and dtype rules of the float (ONNX-like) ops.

The IR ops mirror ONNX ops with one difference: the IR is static, so every
shape-like operand (Reshape's shape, Slice's starts, reduction axes, Clip's
bounds...) is an attribute, and attributes are canonical: axes are
non-negative, defaults are spelled out, Reshape's shape is the final shape.
The ONNX frontend folds the constant inputs into these attributes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from intq.errors import ShapeError
from intq.ir.types import DType, TensorType
from intq.ops.schema import Attr, InferContext, OpTable, Trait
from intq.ops.shape_rules import (
    INF,
    MOVES,
    broadcast_shape,
    moved,
    need_float,
    need_numeric,
    need_same_dtype,
    normal_axis,
    same_type,
    spatial_defaults,
    window_out,
)

OPS = OpTable()


# ----- elementwise --------------------------------------------------------------


@OPS.op("Add", inputs=2, traits=(Trait.INTEGER,))
@OPS.op("Sub", inputs=2, traits=(Trait.INTEGER,))
@OPS.op("Mul", inputs=2, traits=(Trait.INTEGER,))
@OPS.op("Div", inputs=2, traits=(Trait.DIVIDES,))
def _arith(ctx: InferContext) -> list[TensorType]:
    """Broadcasting arithmetic on two tensors of one numeric dtype.

    Integer ``Div`` truncates toward zero (ONNX) and counts as a runtime
    division in the integer-only census. ``Add``, ``Sub`` and ``Mul`` of raw integers
    (position ids computed from token ids) stay in integer graphs, exact: the range
    analysis proves they fit their dtype.
    """
    dtype = need_same_dtype(ctx, 0, 1)
    need_numeric(ctx, 0)
    return [TensorType(dtype, broadcast_shape(ctx.type(0), ctx.type(1)))]


@OPS.op("Pow", inputs=2)
def _pow(ctx: InferContext) -> list[TensorType]:
    """``x ** y`` with broadcasting; float base."""
    need_float(ctx, 0)
    need_numeric(ctx, 1)
    return [TensorType(ctx.type(0).dtype, broadcast_shape(ctx.type(0), ctx.type(1)))]


@OPS.op("Equal", inputs=2, traits=(Trait.INTEGER,))
@OPS.op("Less", inputs=2)
@OPS.op("Greater", inputs=2)
def _compare(ctx: InferContext) -> list[TensorType]:
    """Broadcasting comparison; bool result."""
    need_same_dtype(ctx, 0, 1)
    return [TensorType(DType.BOOL, broadcast_shape(ctx.type(0), ctx.type(1)))]


@OPS.op("And", inputs=2)
@OPS.op("Or", inputs=2)
def _logical(ctx: InferContext) -> list[TensorType]:
    """Broadcasting logic on bool tensors."""
    if {ctx.type(0).dtype, ctx.type(1).dtype} != {DType.BOOL}:
        raise ShapeError(f"{ctx.op} takes bool tensors, got {ctx.type(0)}, {ctx.type(1)}")
    return [TensorType(DType.BOOL, broadcast_shape(ctx.type(0), ctx.type(1)))]


@OPS.op(
    "CumSum",
    attrs={"axis": Attr("int"), "exclusive": Attr("int", 0), "reverse": Attr("int", 0)},
    canonicalize=lambda a, t: {**a, "axis": a["axis"] % max(t[0].rank, 1)} if t and t[0] else a,
    traits=(Trait.INTEGER,),
)
def _cumsum(ctx: InferContext) -> list[TensorType]:
    """Running sums along ``axis`` (``exclusive``: without the element itself; ``reverse``:
    from the end), of a float or a raw (unquantized) integer tensor (position ids: the
    running count of non-padding tokens)."""
    x = ctx.type(0)
    need_numeric(ctx, 0)
    if x.quant is not None:
        raise ShapeError(f"CumSum of a quantized tensor {x}")
    if not 0 <= ctx["axis"] < max(x.rank, 1):
        raise ShapeError(f"CumSum axis {ctx['axis']} outside rank {x.rank}")
    return [TensorType(x.dtype, x.shape)]


@OPS.op("Not", traits=(Trait.INTEGER,))
def _not(ctx: InferContext) -> list[TensorType]:
    """Logical not of a bool tensor."""
    if ctx.type(0).dtype is not DType.BOOL:
        raise ShapeError(f"Not takes a bool tensor, got {ctx.type(0)}")
    return same_type(ctx)


@OPS.op("IsNaN")
def _isnan(ctx: InferContext) -> list[TensorType]:
    """Which elements of a float tensor are NaN; bool result."""
    if not ctx.type(0).dtype.is_float:
        raise ShapeError(f"IsNaN takes a float tensor, got {ctx.type(0)}")
    return [TensorType(DType.BOOL, ctx.type(0).shape)]


@OPS.op("Where", inputs=3)
def _where(ctx: InferContext) -> list[TensorType]:
    """``cond ? x : y`` with broadcasting."""
    if ctx.type(0).dtype is not DType.BOOL:
        raise ShapeError(f"Where's condition must be bool, got {ctx.type(0)}")
    dtype = need_same_dtype(ctx, 1, 2)
    return [TensorType(dtype, broadcast_shape(ctx.type(0), ctx.type(1), ctx.type(2)))]


_TABLED = (Trait.ELEMENTWISE,)
"""The float functions an 8-bit integer input tables exactly (``QLookup``)."""


@OPS.op("Sigmoid", traits=(*_TABLED, Trait.NON_NEGATIVE))
@OPS.op("Tanh", traits=_TABLED)
@OPS.op("Erf", traits=_TABLED)
@OPS.op("Sqrt")
@OPS.op("Exp", traits=(*_TABLED, Trait.NON_NEGATIVE))
@OPS.op("Gelu", attrs={"approximate": Attr("str", "none")}, traits=(Trait.WIDE,))
@OPS.op(
    "HardSigmoid",
    attrs={"alpha": Attr("float", 0.2), "beta": Attr("float", 0.5)},
    traits=(*_TABLED, Trait.NON_NEGATIVE),
)
@OPS.op("HardSwish", traits=_TABLED)
def _float_unary(ctx: InferContext) -> list[TensorType]:
    """Elementwise float function (HardSigmoid: ``clip(alpha x + beta, 0, 1)``; HardSwish:
    ``x * clip(x / 6 + 1/2, 0, 1)``, as ONNX)."""
    need_float(ctx, 0)
    if ctx.op == "Gelu" and ctx["approximate"] not in ("none", "tanh"):
        raise ShapeError(f"Gelu approximate must be 'none' or 'tanh', got {ctx['approximate']!r}")
    return same_type(ctx)


@OPS.op("Relu", traits=(Trait.INTEGER, Trait.ACTIVATION, Trait.NON_NEGATIVE, Trait.PASS_THROUGH))
@OPS.op("Neg", traits=_TABLED)
@OPS.op("Abs", traits=_TABLED)
@OPS.op("Identity", traits=MOVES)
def _numeric_unary(ctx: InferContext) -> list[TensorType]:
    """Elementwise function of any numeric tensor."""
    if ctx.op != "Identity":
        need_numeric(ctx, 0)
    # Identity and Relu keep a quantized input's scale; Neg and Abs would change its sign range.
    return moved(ctx) if ctx.op in ("Identity", "Relu") else same_type(ctx)


@OPS.op(
    "Clip",
    attrs={"min": Attr("float", -INF), "max": Attr("float", INF)},
    traits=(Trait.INTEGER, Trait.ACTIVATION, Trait.PASS_THROUGH),
    # min(min, max): with min > max every value is max, which may be negative.
    non_negative_if=lambda attrs: min(attrs["min"], attrs["max"]) >= 0,
)
def _clip(ctx: InferContext) -> list[TensorType]:
    """Clamp to ``[min, max]`` (constant bounds; ReLU6 is ``Clip(0, 6)``). With min > max
    every value becomes max, as ONNX (from Clip-11) and ``np.clip`` say."""
    need_numeric(ctx, 0)
    if math.isnan(ctx["min"]) or math.isnan(ctx["max"]):
        raise ShapeError(f"Clip's bounds must be numbers, got min={ctx['min']} max={ctx['max']}")
    return moved(ctx)


@OPS.op("Cast", attrs={"to": Attr("str")}, traits=(Trait.INTEGER,))
def _cast(ctx: InferContext) -> list[TensorType]:
    """Convert to dtype ``to`` (an IR dtype name such as ``f32`` or ``i64``)."""
    try:
        dtype = DType(ctx["to"])
    except ValueError:
        raise ShapeError(f"Cast to unknown dtype {ctx['to']!r}") from None
    return [TensorType(dtype, ctx.type(0).shape)]


# ----- linear algebra -------------------------------------------------------------


def _conv_canon(attrs: dict[str, Any], types: Sequence[TensorType | None]) -> dict[str, Any]:
    w = types[1] if len(types) > 1 else None
    if w is None:
        return attrs
    spatial = w.rank - 2
    return spatial_defaults(
        attrs, spatial, [("strides", 1, 1), ("pads", 0, 2), ("dilations", 1, 1)]
    )


@OPS.op(
    "Conv",
    inputs=(2, 3),
    attrs={
        "strides": Attr("ints", ()),
        "pads": Attr("ints", ()),
        "dilations": Attr("ints", ()),
        "group": Attr("int", 1),
    },
    canonicalize=_conv_canon,
    weight_axis=lambda node: 0,
)
def _conv(ctx: InferContext) -> list[TensorType]:
    """N-d convolution, NC[D]HW layout; pads are ``(begin..., end...)``."""
    need_same_dtype(ctx, 0, 1)
    need_float(ctx, 0)
    return [TensorType(ctx.type(0).dtype, conv_shape(ctx))]


def conv_shape(ctx: InferContext) -> tuple[int, ...]:
    """The output shape of a convolution (Conv's inputs and attributes); checks the geometry."""
    x, w = ctx.type(0), ctx.type(1)
    if x.rank < 3 or w.rank != x.rank:
        raise ShapeError(f"{ctx.op} needs input and weight of equal rank >= 3, got {x}, {w}")
    group = ctx["group"]
    if group < 1 or x.shape[1] != w.shape[1] * group or w.shape[0] % group:
        raise ShapeError(
            f"{ctx.op} with group={group}: input channels {x.shape[1]} and weight"
            f" {list(w.shape)} do not fit"
        )
    if ctx.has(2) and ctx.type(2).shape != (w.shape[0],):
        raise ShapeError(f"{ctx.op} bias must have shape [{w.shape[0]}], got {ctx.type(2)}")
    spatial = x.rank - 2
    pads = ctx["pads"]
    dims = [
        window_out(
            x.shape[2 + i],
            w.shape[2 + i],
            ctx["strides"][i],
            pads[i] + pads[i + spatial],
            ctx["dilations"][i],
            False,
        )
        for i in range(spatial)
    ]
    return (x.shape[0], w.shape[0], *dims)


@OPS.op(
    "Gemm",
    inputs=(2, 3),
    attrs={
        "alpha": Attr("float", 1.0),
        "beta": Attr("float", 1.0),
        "transA": Attr("int", 0),
        "transB": Attr("int", 0),
    },
    weight_axis=lambda node: None if node.attrs["transA"] else 1 - node.attrs["transB"],
)
def _gemm(ctx: InferContext) -> list[TensorType]:
    """``alpha * op(A) @ op(B) + beta * C`` for 2-D A and B, C broadcast."""
    a, b = ctx.type(0), ctx.type(1)
    dtype = need_same_dtype(ctx, 0, 1, 2)
    if a.rank != 2 or b.rank != 2:
        raise ShapeError(f"Gemm takes 2-D inputs, got {a}, {b}")
    m, k = a.shape[::-1] if ctx["transA"] else a.shape
    k2, n = b.shape[::-1] if ctx["transB"] else b.shape
    if k != k2:
        raise ShapeError(f"Gemm inner dimensions differ: {k} vs {k2}")
    if ctx.has(2) and broadcast_shape(ctx.type(2), TensorType(dtype, (m, n))) != (m, n):
        raise ShapeError(f"Gemm bias {ctx.type(2)} does not broadcast to [{m}, {n}]")
    return [TensorType(dtype, (m, n))]


@OPS.op(
    "MatMul",
    inputs=2,
    weight_axis=lambda node: (
        1 if node.inputs[1] is not None and node.inputs[1].type.rank == 2 else None
    ),
)
def _matmul(ctx: InferContext) -> list[TensorType]:
    """numpy ``matmul``: batched, broadcasting, 1-D operands promoted."""
    a, b = ctx.type(0), ctx.type(1)
    dtype = need_same_dtype(ctx, 0, 1)
    if a.rank == 0 or b.rank == 0:
        raise ShapeError("MatMul does not take scalars")
    ash = a.shape if a.rank > 1 else (1, *a.shape)
    bsh = b.shape if b.rank > 1 else (*b.shape, 1)
    if ash[-1] != bsh[-2]:
        raise ShapeError(f"MatMul inner dimensions differ: {list(a.shape)} @ {list(b.shape)}")
    try:
        batch = np.broadcast_shapes(ash[:-2], bsh[:-2])
    except ValueError:
        raise ShapeError(
            f"MatMul batch dims of {list(a.shape)} and {list(b.shape)} differ"
        ) from None
    shape = (*batch, ash[-2], bsh[-1])
    if a.rank == 1:
        shape = shape[:-2] + shape[-1:]
    if b.rank == 1:
        shape = shape[:-1]
    return [TensorType(dtype, shape)]


@OPS.op("BatchNormalization", inputs=5, attrs={"epsilon": Attr("float", 1e-5)})
def _batchnorm(ctx: InferContext) -> list[TensorType]:
    """Inference-mode batch norm over axis 1: ``(x - mean) / sqrt(var + eps) * scale + B``."""
    x = ctx.type(0)
    need_float(ctx, 0, 1, 2, 3, 4)
    if x.rank < 2:
        raise ShapeError(f"BatchNormalization needs rank >= 2, got {x}")
    for i in range(1, 5):
        if ctx.type(i).shape != (x.shape[1],):
            raise ShapeError(
                f"BatchNormalization parameter {i} must have shape [{x.shape[1]}],"
                f" got {ctx.type(i)}"
            )
    return same_type(ctx)


@OPS.op(
    "LayerNormalization",
    inputs=(2, 3),
    attrs={"axis": Attr("int", -1), "epsilon": Attr("float", 1e-5)},
    canonicalize=lambda a, t: {**a, "axis": normal_axis(a["axis"], t[0].rank)} if t[0] else a,
    traits=(Trait.WIDE,),
)
def _layernorm(ctx: InferContext) -> list[TensorType]:
    """Normalise over axes ``axis..`` then ``* scale + B``."""
    x = ctx.type(0)
    need_float(ctx, 0, 1, 2)
    normalized = x.shape[ctx["axis"] :]
    for i in (1, 2):
        if (
            ctx.has(i)
            and broadcast_shape(ctx.type(i), TensorType(x.dtype, normalized)) != normalized
        ):
            raise ShapeError(
                f"LayerNormalization parameter {ctx.type(i)} does not fit {list(normalized)}"
            )
    return same_type(ctx)


@OPS.op(
    "Softmax",
    attrs={"axis": Attr("int", -1)},
    canonicalize=lambda a, t: {**a, "axis": normal_axis(a["axis"], t[0].rank)} if t[0] else a,
    traits=(Trait.NON_NEGATIVE, Trait.TAIL),
)
def _softmax(ctx: InferContext) -> list[TensorType]:
    """Softmax along ``axis``."""
    need_float(ctx, 0)
    return same_type(ctx)


# ----- float ops the ONNX importer added for real models ----------------------------------------


@OPS.op("Min", inputs=2, traits=(Trait.INTEGER,))
@OPS.op("Max", inputs=2, traits=(Trait.INTEGER,))
def _min_max(ctx: InferContext) -> list[TensorType]:
    """Broadcasting elementwise minimum / maximum of two tensors of one numeric dtype (ONNX's
    n-ary Min and Max are chains of these). Quantized integers must share their per-tensor
    quantization, which the result keeps."""
    dtype = need_same_dtype(ctx, 0, 1)
    need_numeric(ctx, 0)
    shape = broadcast_shape(ctx.type(0), ctx.type(1))
    quants = {ctx.type(0).quant, ctx.type(1).quant}
    if quants == {None}:
        return [TensorType(dtype, shape)]
    (quant,) = quants if len(quants) == 1 else (None,)
    if quant is None or quant.axis is not None:
        raise ShapeError(f"{ctx.op} inputs must share one per-tensor quantization; requantize them")
    return [TensorType(dtype, shape, quant)]


@OPS.op("PRelu", inputs=2)
def _prelu(ctx: InferContext) -> list[TensorType]:
    """``x < 0 ? x * slope : x``; ``slope`` broadcasts to ``x`` (LeakyRelu: a scalar slope)."""
    need_float(ctx, 0)
    need_same_dtype(ctx, 0, 1)
    x = ctx.type(0)
    if broadcast_shape(x, ctx.type(1)) != x.shape:
        raise ShapeError(f"PRelu slope {ctx.type(1)} does not broadcast to {x}")
    return same_type(ctx)


@OPS.op("Softplus", traits=(*_TABLED, Trait.NON_NEGATIVE))
@OPS.op("Mish", traits=_TABLED)
def _softplus(ctx: InferContext) -> list[TensorType]:
    """``Softplus(x) = log(1 + exp(x))``; ``Mish(x) = x * tanh(Softplus(x))``."""
    need_float(ctx, 0)
    return same_type(ctx)


RESIZE_MODES = ("nearest", "linear")
RESIZE_COORDINATES = (
    "half_pixel",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
)
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _resize_canon(attrs: dict[str, Any], types: Sequence[TensorType | None]) -> dict[str, Any]:
    """Both ``scales`` and ``sizes`` explicit: sizes are ``floor(dim * scale)`` (as ONNX), and
    scales given by sizes are ``size / dim`` in float32 (as ONNX Runtime computes them)."""
    x = types[0]
    if x is None:
        return attrs
    scales, sizes = attrs["scales"], attrs["sizes"]
    if not scales and not sizes:
        raise ShapeError("Resize needs scales or sizes")
    if (scales and len(scales) != x.rank) or (sizes and len(sizes) != x.rank):
        raise ShapeError(f"Resize scales {scales} / sizes {sizes} do not fit rank {x.rank}")
    if not sizes:
        if any(not s > 0 for s in scales):
            raise ShapeError(f"Resize scales must be > 0, got {list(scales)}")
        # float32 products, as ONNX Runtime computes them
        sizes = tuple(int(np.float32(d) * np.float32(s)) for d, s in zip(x.shape, scales))
    if not scales:
        scales = tuple(
            float(np.float32(s) / np.float32(d)) if d else 1.0 for d, s in zip(x.shape, sizes)
        )
    return {**attrs, "scales": scales, "sizes": sizes}


@OPS.op(
    "Resize",
    attrs={
        "mode": Attr("str", "nearest"),
        "scales": Attr("floats", ()),
        "sizes": Attr("ints", ()),
        "coordinate_transformation_mode": Attr("str", "half_pixel"),
        "nearest_mode": Attr("str", "round_prefer_floor"),
    },
    canonicalize=_resize_canon,
    traits=(Trait.CONVEX,),
)
def _resize(ctx: InferContext) -> list[TensorType]:
    """Resize every axis to ``sizes`` by ``scales`` (ONNX Resize without roi, cubic or
    antialias): ``nearest`` or separable ``linear`` interpolation (bilinear on NCHW)."""
    need_numeric(ctx, 0)
    for key, allowed in (
        ("mode", RESIZE_MODES),
        ("coordinate_transformation_mode", RESIZE_COORDINATES),
        ("nearest_mode", NEAREST_MODES),
    ):
        if ctx[key] not in allowed:
            raise ShapeError(f"Resize {key} must be one of {', '.join(allowed)}, got {ctx[key]!r}")
    if ctx["mode"] == "linear":
        need_float(ctx, 0)
    sizes = tuple(ctx["sizes"])
    if any(d < 0 for d in sizes):
        raise ShapeError(f"Resize to negative sizes {list(sizes)}")
    return same_type(ctx, sizes)


def _conv_transpose_canon(
    attrs: dict[str, Any], types: Sequence[TensorType | None]
) -> dict[str, Any]:
    w = types[1] if len(types) > 1 else None
    if w is None:
        return attrs
    return spatial_defaults(
        attrs,
        w.rank - 2,
        [("strides", 1, 1), ("pads", 0, 2), ("dilations", 1, 1), ("output_padding", 0, 1)],
    )


@OPS.op(
    "ConvTranspose",
    inputs=(2, 3),
    attrs={
        "strides": Attr("ints", ()),
        "pads": Attr("ints", ()),
        "dilations": Attr("ints", ()),
        "output_padding": Attr("ints", ()),
        "group": Attr("int", 1),
    },
    canonicalize=_conv_transpose_canon,
    weight_axis=lambda node: 1,
)
def _conv_transpose(ctx: InferContext) -> list[TensorType]:
    """N-d transposed convolution, NC[D]HW; weight ``(C, M / group, k...)``; each spatial
    size is ``(in - 1) * stride + dilation * (k - 1) + 1 + output_padding - pads``."""
    need_same_dtype(ctx, 0, 1)
    need_float(ctx, 0)
    return [TensorType(ctx.type(0).dtype, conv_transpose_shape(ctx))]


def conv_transpose_shape(ctx: InferContext) -> tuple[int, ...]:
    """The output shape of a transposed convolution (ConvTranspose's inputs and attributes);
    checks the geometry."""
    x, w = ctx.type(0), ctx.type(1)
    group = ctx["group"]
    if x.rank < 3 or w.rank != x.rank:
        raise ShapeError(f"ConvTranspose needs input and weight of equal rank >= 3, got {x}, {w}")
    if group < 1 or x.shape[1] != w.shape[0] or w.shape[0] % group:
        raise ShapeError(
            f"ConvTranspose with group={group}: input channels {x.shape[1]} and weight"
            f" {list(w.shape)} do not fit"
        )
    m = w.shape[1] * group
    if ctx.has(2) and ctx.type(2).shape != (m,):
        raise ShapeError(f"ConvTranspose bias must have shape [{m}], got {ctx.type(2)}")
    spatial = x.rank - 2
    pads, strides, dilations = ctx["pads"], ctx["strides"], ctx["dilations"]
    dims = []
    for i in range(spatial):
        if strides[i] < 1 or dilations[i] < 1:
            raise ShapeError("ConvTranspose strides and dilations must be >= 1")
        if not 0 <= ctx["output_padding"][i] < strides[i]:
            raise ShapeError("ConvTranspose output_padding must be below the stride")
        size = (
            (x.shape[2 + i] - 1) * strides[i]
            + dilations[i] * (w.shape[2 + i] - 1)
            + 1
            + ctx["output_padding"][i]
            - pads[i]
            - pads[i + spatial]
        )
        if size < 1:
            raise ShapeError(f"ConvTranspose pads {list(pads)} leave no output")
        dims.append(size)
    return (x.shape[0], m, *dims)
