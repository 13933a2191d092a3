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

OPS = OpTable()

_MOVES = (Trait.INTEGER, Trait.MOVEMENT, Trait.PASS_THROUGH)
"""The traits of the ops that move values without arithmetic (Reshape, Slice, MaxPool...)."""

INF = float("inf")


# ----- helpers ----------------------------------------------------------------


def _axis(axis: int, rank: int, what: str = "axis") -> int:
    """``axis`` made non-negative; raises when out of range."""
    if not -rank <= axis < rank:
        raise ShapeError(f"{what} {axis} out of range for rank {rank}")
    return axis % rank


def _axes(axes: Sequence[int], rank: int) -> tuple[int, ...]:
    normal = tuple(sorted(_axis(a, rank) for a in axes))
    if len(set(normal)) != len(normal):
        raise ShapeError(f"repeated axes in {tuple(axes)}")
    return normal


def _broadcast(*types: TensorType) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*(t.shape for t in types)))
    except ValueError:
        shapes = " and ".join(str(list(t.shape)) for t in types)
        raise ShapeError(f"shapes {shapes} do not broadcast") from None


def _need_float(ctx: InferContext, *indices: int) -> None:
    for i in indices:
        if ctx.has(i) and not ctx.type(i).dtype.is_float:
            raise ShapeError(f"{ctx.op} input {i} must be a float tensor, got {ctx.type(i)}")


def _need_same_dtype(ctx: InferContext, *indices: int) -> DType:
    dtypes = {ctx.type(i).dtype for i in indices if ctx.has(i)}
    if len(dtypes) != 1:
        got = ", ".join(str(ctx.type(i)) for i in indices if ctx.has(i))
        raise ShapeError(f"{ctx.op} inputs must share one dtype, got {got}")
    return dtypes.pop()


def _need_numeric(ctx: InferContext, index: int) -> None:
    if ctx.type(index).dtype is DType.BOOL:
        raise ShapeError(f"{ctx.op} input {index} must be numeric, got {ctx.type(index)}")


def _moved(ctx: InferContext, shape: tuple[int, ...] | None = None) -> list[TensorType]:
    """Data movement: the input's dtype, and its per-tensor quantization travels along."""
    t = ctx.type(0)
    quant = t.quant if t.quant is not None and t.quant.axis is None else None
    return [TensorType(t.dtype, t.shape if shape is None else shape, quant)]


def _same_type(ctx: InferContext, shape: tuple[int, ...] | None = None) -> list[TensorType]:
    t = ctx.type(0)
    return [TensorType(t.dtype, t.shape if shape is None else shape)]


def _spatial_defaults(
    attrs: dict[str, Any], spatial: int, names: Sequence[tuple[str, int, int]]
) -> dict[str, Any]:
    """Fill empty ``(name, fill, count multiplier)`` tuples of per-spatial-axis attributes."""
    for name, fill, times in names:
        if not attrs[name]:
            attrs[name] = (fill,) * (spatial * times)
        if len(attrs[name]) != spatial * times:
            raise ShapeError(f"{name} has {len(attrs[name])} entries, expected {spatial * times}")
        if name == "pads" and any(p < 0 for p in attrs[name]):
            raise ShapeError(f"pads must be >= 0, got {list(attrs[name])}")
    return attrs


def _window_out(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil: bool) -> int:
    """Output length of a sliding window (ONNX/PyTorch rule, incl. ceil_mode)."""
    if kernel < 1 or stride < 1 or dilation < 1 or pad < 0:
        raise ShapeError(
            f"window {kernel}, stride {stride} and dilation {dilation} must be >= 1"
            f" and padding {pad} >= 0"
        )
    span = size + pad - dilation * (kernel - 1) - 1
    if span < 0:
        raise ShapeError(f"window of {kernel} (dilation {dilation}) does not fit input of {size}")
    if not ceil:
        return span // stride + 1
    return -(-span // stride) + 1


# ----- elementwise --------------------------------------------------------------


@OPS.op("Add", inputs=2)
@OPS.op("Sub", inputs=2)
@OPS.op("Mul", inputs=2)
@OPS.op("Div", inputs=2, traits=(Trait.DIVIDES,))
def _arith(ctx: InferContext) -> list[TensorType]:
    """Broadcasting arithmetic on two tensors of one numeric dtype.

    Integer ``Div`` truncates toward zero (ONNX) and counts as a runtime
    division in the integer-only census.
    """
    dtype = _need_same_dtype(ctx, 0, 1)
    _need_numeric(ctx, 0)
    return [TensorType(dtype, _broadcast(ctx.type(0), ctx.type(1)))]


@OPS.op("Pow", inputs=2)
def _pow(ctx: InferContext) -> list[TensorType]:
    """``x ** y`` with broadcasting; float base."""
    _need_float(ctx, 0)
    _need_numeric(ctx, 1)
    return [TensorType(ctx.type(0).dtype, _broadcast(ctx.type(0), ctx.type(1)))]


@OPS.op("Equal", inputs=2)
@OPS.op("Less", inputs=2)
@OPS.op("Greater", inputs=2)
def _compare(ctx: InferContext) -> list[TensorType]:
    """Broadcasting comparison; bool result."""
    _need_same_dtype(ctx, 0, 1)
    return [TensorType(DType.BOOL, _broadcast(ctx.type(0), ctx.type(1)))]


@OPS.op("And", inputs=2)
@OPS.op("Or", inputs=2)
def _logical(ctx: InferContext) -> list[TensorType]:
    """Broadcasting logic on bool tensors."""
    if {ctx.type(0).dtype, ctx.type(1).dtype} != {DType.BOOL}:
        raise ShapeError(f"{ctx.op} takes bool tensors, got {ctx.type(0)}, {ctx.type(1)}")
    return [TensorType(DType.BOOL, _broadcast(ctx.type(0), ctx.type(1)))]


@OPS.op("Not", traits=(Trait.INTEGER,))
def _not(ctx: InferContext) -> list[TensorType]:
    """Logical not of a bool tensor."""
    if ctx.type(0).dtype is not DType.BOOL:
        raise ShapeError(f"Not takes a bool tensor, got {ctx.type(0)}")
    return _same_type(ctx)


@OPS.op("Where", inputs=3)
def _where(ctx: InferContext) -> list[TensorType]:
    """``cond ? x : y`` with broadcasting."""
    if ctx.type(0).dtype is not DType.BOOL:
        raise ShapeError(f"Where's condition must be bool, got {ctx.type(0)}")
    dtype = _need_same_dtype(ctx, 1, 2)
    return [TensorType(dtype, _broadcast(ctx.type(0), ctx.type(1), ctx.type(2)))]


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
    _need_float(ctx, 0)
    if ctx.op == "Gelu" and ctx["approximate"] not in ("none", "tanh"):
        raise ShapeError(f"Gelu approximate must be 'none' or 'tanh', got {ctx['approximate']!r}")
    return _same_type(ctx)


@OPS.op("Relu", traits=(Trait.INTEGER, Trait.ACTIVATION, Trait.NON_NEGATIVE, Trait.PASS_THROUGH))
@OPS.op("Neg", traits=_TABLED)
@OPS.op("Abs", traits=_TABLED)
@OPS.op("Identity", traits=_MOVES)
def _numeric_unary(ctx: InferContext) -> list[TensorType]:
    """Elementwise function of any numeric tensor."""
    if ctx.op != "Identity":
        _need_numeric(ctx, 0)
    # Identity and Relu keep a quantized input's scale; Neg and Abs would change its sign range.
    return _moved(ctx) if ctx.op in ("Identity", "Relu") else _same_type(ctx)


@OPS.op(
    "Clip",
    attrs={"min": Attr("float", -INF), "max": Attr("float", INF)},
    traits=(Trait.INTEGER, Trait.ACTIVATION, Trait.PASS_THROUGH),
    non_negative_if=lambda attrs: attrs["min"] >= 0,
)
def _clip(ctx: InferContext) -> list[TensorType]:
    """Clamp to ``[min, max]`` (constant bounds; ReLU6 is ``Clip(0, 6)``). With min > max
    every value becomes max, as ONNX (from Clip-11) and ``np.clip`` say."""
    _need_numeric(ctx, 0)
    return _moved(ctx)


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
    return _spatial_defaults(
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
    _need_same_dtype(ctx, 0, 1)
    _need_float(ctx, 0)
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
        _window_out(
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
    dtype = _need_same_dtype(ctx, 0, 1, 2)
    if a.rank != 2 or b.rank != 2:
        raise ShapeError(f"Gemm takes 2-D inputs, got {a}, {b}")
    m, k = a.shape[::-1] if ctx["transA"] else a.shape
    k2, n = b.shape[::-1] if ctx["transB"] else b.shape
    if k != k2:
        raise ShapeError(f"Gemm inner dimensions differ: {k} vs {k2}")
    if ctx.has(2) and _broadcast(ctx.type(2), TensorType(dtype, (m, n))) != (m, n):
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
    dtype = _need_same_dtype(ctx, 0, 1)
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
    _need_float(ctx, 0, 1, 2, 3, 4)
    if x.rank < 2:
        raise ShapeError(f"BatchNormalization needs rank >= 2, got {x}")
    for i in range(1, 5):
        if ctx.type(i).shape != (x.shape[1],):
            raise ShapeError(
                f"BatchNormalization parameter {i} must have shape [{x.shape[1]}],"
                f" got {ctx.type(i)}"
            )
    return _same_type(ctx)


@OPS.op(
    "LayerNormalization",
    inputs=(2, 3),
    attrs={"axis": Attr("int", -1), "epsilon": Attr("float", 1e-5)},
    canonicalize=lambda a, t: {**a, "axis": _axis(a["axis"], t[0].rank)} if t[0] else a,
    traits=(Trait.WIDE,),
)
def _layernorm(ctx: InferContext) -> list[TensorType]:
    """Normalise over axes ``axis..`` then ``* scale + B``."""
    x = ctx.type(0)
    _need_float(ctx, 0, 1, 2)
    normalized = x.shape[ctx["axis"] :]
    for i in (1, 2):
        if ctx.has(i) and _broadcast(ctx.type(i), TensorType(x.dtype, normalized)) != normalized:
            raise ShapeError(
                f"LayerNormalization parameter {ctx.type(i)} does not fit {list(normalized)}"
            )
    return _same_type(ctx)


@OPS.op(
    "Softmax",
    attrs={"axis": Attr("int", -1)},
    canonicalize=lambda a, t: {**a, "axis": _axis(a["axis"], t[0].rank)} if t[0] else a,
    traits=(Trait.NON_NEGATIVE, Trait.TAIL),
)
def _softmax(ctx: InferContext) -> list[TensorType]:
    """Softmax along ``axis``."""
    _need_float(ctx, 0)
    return _same_type(ctx)


# ----- pooling -----------------------------------------------------------------


def _pool_canon(attrs: dict[str, Any], types: Sequence[TensorType | None]) -> dict[str, Any]:
    spatial = len(attrs["kernel_shape"])
    names = [("strides", 1, 1), ("pads", 0, 2)]
    if "dilations" in attrs:
        names.append(("dilations", 1, 1))
    return _spatial_defaults(attrs, spatial, names)


def _pool_out(ctx: InferContext) -> list[TensorType]:
    x = ctx.type(0)
    kernel = ctx["kernel_shape"]
    spatial = len(kernel)
    if x.rank != spatial + 2:
        raise ShapeError(f"{ctx.op} with a {spatial}-d kernel needs rank {spatial + 2}, got {x}")
    pads, strides = ctx["pads"], ctx["strides"]
    dilations = ctx.attrs.get("dilations") or (1,) * spatial
    dims = []
    for i in range(spatial):
        size, begin = x.shape[2 + i], pads[i]
        total = begin + pads[i + spatial]
        out = _window_out(size, kernel[i], strides[i], total, dilations[i], bool(ctx["ceil_mode"]))
        if ctx["ceil_mode"] and (out - 1) * strides[i] >= size + begin:
            out -= 1  # the last window would start in the end padding
        dims.append(out)
    if ctx.op == "MaxPool":  # a max of quantized values keeps their scale
        return _moved(ctx, (*x.shape[:2], *dims))
    return [TensorType(x.dtype, (*x.shape[:2], *dims))]


@OPS.op(
    "MaxPool",
    attrs={
        "kernel_shape": Attr("ints"),
        "strides": Attr("ints", ()),
        "pads": Attr("ints", ()),
        "dilations": Attr("ints", ()),
        "ceil_mode": Attr("int", 0),
    },
    canonicalize=_pool_canon,
    traits=_MOVES,
)
def _maxpool(ctx: InferContext) -> list[TensorType]:
    """Max over windows; padding never wins."""
    _need_numeric(ctx, 0)
    return _pool_out(ctx)


@OPS.op(
    "AveragePool",
    attrs={
        "kernel_shape": Attr("ints"),
        "strides": Attr("ints", ()),
        "pads": Attr("ints", ()),
        "ceil_mode": Attr("int", 0),
        "count_include_pad": Attr("int", 0),
    },
    canonicalize=_pool_canon,
)
def _avgpool(ctx: InferContext) -> list[TensorType]:
    """Mean over windows; padding counts only with ``count_include_pad``."""
    _need_float(ctx, 0)
    return _pool_out(ctx)


@OPS.op("GlobalAveragePool")
def _global_avgpool(ctx: InferContext) -> list[TensorType]:
    """Mean over all spatial axes, keeping them as size 1."""
    x = ctx.type(0)
    _need_float(ctx, 0)
    if x.rank < 3:
        raise ShapeError(f"GlobalAveragePool needs rank >= 3, got {x}")
    return _same_type(ctx, (*x.shape[:2], *(1,) * (x.rank - 2)))


# ----- reductions ----------------------------------------------------------------


def _reduce_canon(attrs: dict[str, Any], types: Sequence[TensorType | None]) -> dict[str, Any]:
    if types[0] is None:
        return attrs
    rank = types[0].rank
    axes = attrs["axes"] or tuple(range(rank))
    return {**attrs, "axes": _axes(axes, rank)}


_REDUCE_ATTRS = {"axes": Attr("ints", ()), "keepdims": Attr("int", 1)}


@OPS.op("ReduceMean", attrs=_REDUCE_ATTRS, canonicalize=_reduce_canon)
@OPS.op("ReduceSum", attrs=_REDUCE_ATTRS, canonicalize=_reduce_canon)
@OPS.op("ReduceMax", attrs=_REDUCE_ATTRS, canonicalize=_reduce_canon)
def _reduction(ctx: InferContext) -> list[TensorType]:
    """Reduce over ``axes`` (all when empty), keeping them as size 1 with ``keepdims``."""
    _need_numeric(ctx, 0)
    x = ctx.type(0)
    axes = set(ctx["axes"])
    if ctx["keepdims"]:
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    else:
        shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    return _same_type(ctx, shape)


# ----- data movement --------------------------------------------------------------


def _reshape_canon(attrs: dict[str, Any], types: Sequence[TensorType | None]) -> dict[str, Any]:
    x = types[0]
    if x is None:
        return attrs
    shape = [x.shape[i] if d == 0 and i < x.rank else d for i, d in enumerate(attrs["shape"])]
    if shape.count(-1) > 1:
        raise ShapeError(f"Reshape shape {attrs['shape']} has more than one -1")
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        if known == 0 or x.size % known:
            raise ShapeError(f"cannot reshape {list(x.shape)} to {list(attrs['shape'])}")
        shape[shape.index(-1)] = x.size // known
    return {**attrs, "shape": tuple(shape)}


@OPS.op("Reshape", attrs={"shape": Attr("ints")}, canonicalize=_reshape_canon, traits=_MOVES)
def _reshape(ctx: InferContext) -> list[TensorType]:
    """Same data, new shape (``0`` copies a dim and ``-1`` is inferred when built)."""
    shape = tuple(ctx["shape"])
    if any(d < 0 for d in shape) or math.prod(shape) != ctx.type(0).size:
        raise ShapeError(f"cannot reshape {list(ctx.type(0).shape)} to {list(shape)}")
    return _moved(ctx, shape)


def _flatten_canon(attrs: dict[str, Any], types: Sequence[TensorType | None]) -> dict[str, Any]:
    """``axis`` is in ``[-r, r]``; a negative one counts from the back (-1 is r - 1, not r)."""
    x, axis = types[0], attrs["axis"]
    if x is None:
        return attrs
    return {**attrs, "axis": _axis(axis, x.rank + 1) if axis >= 0 else _axis(axis, x.rank)}


@OPS.op("Flatten", attrs={"axis": Attr("int", 1)}, canonicalize=_flatten_canon, traits=_MOVES)
def _flatten(ctx: InferContext) -> list[TensorType]:
    """Flatten to 2-D: dims before ``axis`` and dims from it."""
    x, axis = ctx.type(0), ctx["axis"]
    return _moved(ctx, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))


@OPS.op(
    "Transpose",
    attrs={"perm": Attr("ints", ())},
    canonicalize=lambda a, t: (
        {**a, "perm": a["perm"] or tuple(reversed(range(t[0].rank)))} if t[0] else a
    ),
    traits=_MOVES,
)
def _transpose(ctx: InferContext) -> list[TensorType]:
    """Permute axes."""
    x, perm = ctx.type(0), ctx["perm"]
    if sorted(perm) != list(range(x.rank)):
        raise ShapeError(f"Transpose perm {list(perm)} is not a permutation of rank {x.rank}")
    return _moved(ctx, tuple(x.shape[p] for p in perm))


@OPS.op(
    "Concat",
    inputs=(1, 1 << 16),
    attrs={"axis": Attr("int")},
    canonicalize=lambda a, t: {**a, "axis": _axis(a["axis"], t[0].rank)} if t[0] else a,
    traits=(Trait.INTEGER,),
)
def _concat(ctx: InferContext) -> list[TensorType]:
    """Join along ``axis``."""
    _need_same_dtype(ctx, *range(len(ctx)))
    axis = ctx["axis"]
    first = ctx.type(0).shape
    total = 0
    for i in range(len(ctx)):
        shape = ctx.type(i).shape
        if len(shape) != len(first) or any(
            a != b for d, (a, b) in enumerate(zip(shape, first)) if d != axis
        ):
            raise ShapeError(
                f"Concat inputs {list(first)} and {list(shape)} differ off axis {axis}"
            )
        total += shape[axis]
    quants = {ctx.type(i).quant for i in range(len(ctx))}
    if len(quants) > 1:
        raise ShapeError("Concat inputs must share their quantization; requantize them first")
    return _moved(ctx, (*first[:axis], total, *first[axis + 1 :]))


def _slice_canon(attrs: dict[str, Any], types: Sequence[TensorType | None]) -> dict[str, Any]:
    x = types[0]
    if x is None:
        return attrs
    starts, ends = attrs["starts"], attrs["ends"]
    axes = attrs["axes"] or tuple(range(len(starts)))
    steps = attrs["steps"] or (1,) * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ShapeError("Slice starts, ends, axes and steps differ in length")
    out: dict[str, list[int]] = {"starts": [], "ends": [], "axes": [], "steps": []}
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, x.rank)
        dim = x.shape[axis]
        if step == 0:
            raise ShapeError("Slice step must not be 0")
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            # "Through index 0" is spelled -dim - 1 (as in Python slicing), not -1: -1 would
            # read as dim - 1 when canonicalised again, so the form would not be a fixpoint.
            end = -dim - 1 if end == -1 else end
        for key, v in zip(("starts", "ends", "axes", "steps"), (start, end, axis, step)):
            out[key].append(v)
    if len(set(out["axes"])) != len(out["axes"]):
        raise ShapeError(f"Slice repeats an axis: {axes}")
    return {key: tuple(v) for key, v in out.items()}


@OPS.op(
    "Slice",
    attrs={
        "starts": Attr("ints"),
        "ends": Attr("ints"),
        "axes": Attr("ints", ()),
        "steps": Attr("ints", ()),
    },
    canonicalize=_slice_canon,
    traits=_MOVES,
)
def _slice(ctx: InferContext) -> list[TensorType]:
    """Strided slice; bounds are clamped when built (with a negative step, an end of
    ``-dim - 1`` means "through index 0", as in Python)."""
    shape = list(ctx.type(0).shape)
    for start, end, axis, step in zip(ctx["starts"], ctx["ends"], ctx["axes"], ctx["steps"]):
        span = end - start if step > 0 else start - max(end, -1)
        shape[axis] = max(0, -(-span // abs(step)))
    return _moved(ctx, tuple(shape))


def _squeeze_canon(attrs: dict[str, Any], types: Sequence[TensorType | None]) -> dict[str, Any]:
    x = types[0]
    if x is None:
        return attrs
    axes = attrs["axes"] or tuple(i for i, d in enumerate(x.shape) if d == 1)
    return {"axes": _axes(axes, x.rank)}


@OPS.op("Squeeze", attrs={"axes": Attr("ints", ())}, canonicalize=_squeeze_canon, traits=_MOVES)
def _squeeze(ctx: InferContext) -> list[TensorType]:
    """Drop size-1 ``axes``."""
    x = ctx.type(0)
    for a in ctx["axes"]:
        if x.shape[a] != 1:
            raise ShapeError(f"Squeeze axis {a} has size {x.shape[a]}, not 1")
    return _moved(ctx, tuple(d for i, d in enumerate(x.shape) if i not in ctx["axes"]))


@OPS.op(
    "Unsqueeze",
    attrs={"axes": Attr("ints")},
    canonicalize=lambda a, t: {"axes": _axes(a["axes"], t[0].rank + len(a["axes"]))} if t[0] else a,
    traits=_MOVES,
)
def _unsqueeze(ctx: InferContext) -> list[TensorType]:
    """Insert size-1 ``axes`` (positions in the output)."""
    shape = list(ctx.type(0).shape)
    for a in ctx["axes"]:
        shape.insert(a, 1)
    return _moved(ctx, tuple(shape))


@OPS.op(
    "Gather",
    inputs=2,
    attrs={"axis": Attr("int", 0)},
    canonicalize=lambda a, t: {**a, "axis": _axis(a["axis"], t[0].rank)} if t[0] else a,
    traits=(Trait.INTEGER,),
)
def _gather(ctx: InferContext) -> list[TensorType]:
    """Take ``indices`` along ``axis`` (negative indices count from the end)."""
    data, indices = ctx.type(0), ctx.type(1)
    if indices.dtype not in (DType.I32, DType.I64):
        raise ShapeError(f"Gather indices must be i32 or i64, got {indices}")
    axis = ctx["axis"]
    const = ctx.const(1)
    if (
        const is not None
        and const.size
        and (const.min() < -data.shape[axis] or const.max() >= data.shape[axis])
    ):
        raise ShapeError(f"Gather indices out of range for axis {axis} of size {data.shape[axis]}")
    return _moved(ctx, (*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))


@OPS.op(
    "Expand",
    attrs={"shape": Attr("ints")},
    canonicalize=lambda a, t: (
        {"shape": _broadcast(t[0], TensorType(t[0].dtype, a["shape"]))} if t[0] else a
    ),
    traits=_MOVES,
)
def _expand(ctx: InferContext) -> list[TensorType]:
    """Broadcast to ``shape`` (the full output shape once built)."""
    shape = tuple(ctx["shape"])
    if _broadcast(ctx.type(0), TensorType(ctx.type(0).dtype, shape)) != shape:
        raise ShapeError(f"cannot expand {list(ctx.type(0).shape)} to {list(shape)}")
    return _moved(ctx, shape)


@OPS.op(
    "Pad",
    attrs={"pads": Attr("ints"), "mode": Attr("str", "constant"), "value": Attr("float", 0.0)},
    traits=(Trait.INTEGER, Trait.PASS_THROUGH),
)
def _pad(ctx: InferContext) -> list[TensorType]:
    """Pad every axis by ``pads = (begin..., end...)`` (negative crops) with ``mode``
    ``constant`` (filled with ``value``), ``reflect`` or ``edge``."""
    x, pads = ctx.type(0), ctx["pads"]
    if len(pads) != 2 * x.rank:
        raise ShapeError(f"Pad needs {2 * x.rank} pads for rank {x.rank}, got {len(pads)}")
    if ctx["mode"] not in ("constant", "reflect", "edge"):
        raise ShapeError(f"Pad mode must be constant, reflect or edge, got {ctx['mode']!r}")
    shape = tuple(d + pads[i] + pads[i + x.rank] for i, d in enumerate(x.shape))
    if any(d < 0 for d in shape):
        raise ShapeError(f"Pad {list(pads)} crops {list(x.shape)} below zero")
    return _moved(ctx, shape)


@OPS.op(
    "Shape", attrs={"start": Attr("int", 0), "end": Attr("int", 1 << 62)}, traits=(Trait.FOLDED,)
)
def _shape(ctx: InferContext) -> list[TensorType]:
    """The input's shape (dims ``start:end``) as i64; always folds to a constant."""
    dims = ctx.type(0).shape[ctx["start"] : ctx["end"]]
    return [TensorType(DType.I64, (len(dims),))]


@OPS.op(
    "ConstantOfShape",
    inputs=0,
    attrs={"shape": Attr("ints"), "value": Attr("float", 0.0), "dtype": Attr("str", "f32")},
    traits=(Trait.FOLDED,),
)
def _constant_of_shape(ctx: InferContext) -> list[TensorType]:
    """A tensor of ``shape`` filled with ``value``; always folds to a constant."""
    try:
        dtype = DType(ctx["dtype"])
    except ValueError:
        raise ShapeError(f"unknown dtype {ctx['dtype']!r}") from None
    return [TensorType(dtype, tuple(ctx["shape"]))]


# ----- float ops the ONNX importer added for real models (no integer lowering yet) ----------


@OPS.op("Min", inputs=2)
@OPS.op("Max", inputs=2)
def _min_max(ctx: InferContext) -> list[TensorType]:
    """Broadcasting elementwise minimum / maximum of two tensors of one numeric dtype (ONNX's
    n-ary Min and Max are chains of these)."""
    dtype = _need_same_dtype(ctx, 0, 1)
    _need_numeric(ctx, 0)
    return [TensorType(dtype, _broadcast(ctx.type(0), ctx.type(1)))]


@OPS.op("PRelu", inputs=2)
def _prelu(ctx: InferContext) -> list[TensorType]:
    """``x < 0 ? x * slope : x``; ``slope`` broadcasts to ``x`` (LeakyRelu: a scalar slope)."""
    _need_float(ctx, 0)
    _need_same_dtype(ctx, 0, 1)
    x = ctx.type(0)
    if _broadcast(x, ctx.type(1)) != x.shape:
        raise ShapeError(f"PRelu slope {ctx.type(1)} does not broadcast to {x}")
    return _same_type(ctx)


@OPS.op("Softplus")
@OPS.op("Mish")
def _softplus(ctx: InferContext) -> list[TensorType]:
    """``Softplus(x) = log(1 + exp(x))``; ``Mish(x) = x * tanh(Softplus(x))``."""
    _need_float(ctx, 0)
    return _same_type(ctx)


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
)
def _resize(ctx: InferContext) -> list[TensorType]:
    """Resize every axis to ``sizes`` by ``scales`` (ONNX Resize without roi, cubic or
    antialias): ``nearest`` or separable ``linear`` interpolation (bilinear on NCHW)."""
    _need_numeric(ctx, 0)
    for key, allowed in (
        ("mode", RESIZE_MODES),
        ("coordinate_transformation_mode", RESIZE_COORDINATES),
        ("nearest_mode", NEAREST_MODES),
    ):
        if ctx[key] not in allowed:
            raise ShapeError(f"Resize {key} must be one of {', '.join(allowed)}, got {ctx[key]!r}")
    if ctx["mode"] == "linear":
        _need_float(ctx, 0)
    sizes = tuple(ctx["sizes"])
    if any(d < 0 for d in sizes):
        raise ShapeError(f"Resize to negative sizes {list(sizes)}")
    return _same_type(ctx, sizes)


def _conv_transpose_canon(
    attrs: dict[str, Any], types: Sequence[TensorType | None]
) -> dict[str, Any]:
    w = types[1] if len(types) > 1 else None
    if w is None:
        return attrs
    return _spatial_defaults(
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
)
def _conv_transpose(ctx: InferContext) -> list[TensorType]:
    """N-d transposed convolution, NC[D]HW; weight ``(C, M / group, k...)``; each spatial
    size is ``(in - 1) * stride + dilation * (k - 1) + 1 + output_padding - pads``."""
    _need_same_dtype(ctx, 0, 1)
    _need_float(ctx, 0)
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
    return [TensorType(x.dtype, (x.shape[0], m, *dims))]
