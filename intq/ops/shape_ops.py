"""Shape and dtype rules of the float (ONNX-like) ops that move or gather values: pooling,
reductions and data movement (the IR conventions are those of :mod:`intq.ops.float_ops`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from intq.errors import ShapeError
from intq.ir.types import DType, TensorType
from intq.ops.schema import Attr, InferContext, OpTable, Trait
from intq.ops.shape_rules import (
    MOVES,
    broadcast_shape,
    moved,
    need_float,
    need_numeric,
    need_same_dtype,
    normal_axes,
    normal_axis,
    same_type,
    spatial_defaults,
    window_out,
)

OPS = OpTable()


# ----- pooling -----------------------------------------------------------------


def _pool_canon(attrs: dict[str, Any], types: Sequence[TensorType | None]) -> dict[str, Any]:
    spatial = len(attrs["kernel_shape"])
    names = [("strides", 1, 1), ("pads", 0, 2)]
    if "dilations" in attrs:
        names.append(("dilations", 1, 1))
    return spatial_defaults(attrs, spatial, names)


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
        out = window_out(size, kernel[i], strides[i], total, dilations[i], bool(ctx["ceil_mode"]))
        if ctx["ceil_mode"] and (out - 1) * strides[i] >= size + begin:
            out -= 1  # the last window would start in the end padding
        dims.append(out)
    if ctx.op == "MaxPool":  # a max of quantized values keeps their scale
        return moved(ctx, (*x.shape[:2], *dims))
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
    traits=MOVES,
)
def _maxpool(ctx: InferContext) -> list[TensorType]:
    """Max over windows; padding never wins."""
    need_numeric(ctx, 0)
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
    need_float(ctx, 0)
    return _pool_out(ctx)


@OPS.op("GlobalAveragePool")
def _global_avgpool(ctx: InferContext) -> list[TensorType]:
    """Mean over all spatial axes, keeping them as size 1."""
    x = ctx.type(0)
    need_float(ctx, 0)
    if x.rank < 3:
        raise ShapeError(f"GlobalAveragePool needs rank >= 3, got {x}")
    return same_type(ctx, (*x.shape[:2], *(1,) * (x.rank - 2)))


# ----- reductions ----------------------------------------------------------------


def _reduce_canon(attrs: dict[str, Any], types: Sequence[TensorType | None]) -> dict[str, Any]:
    if types[0] is None:
        return attrs
    rank = types[0].rank
    axes = attrs["axes"] or tuple(range(rank))
    return {**attrs, "axes": normal_axes(axes, rank)}


_REDUCE_ATTRS = {"axes": Attr("ints", ()), "keepdims": Attr("int", 1)}


@OPS.op("ReduceMean", attrs=_REDUCE_ATTRS, canonicalize=_reduce_canon)
@OPS.op("ReduceSum", attrs=_REDUCE_ATTRS, canonicalize=_reduce_canon)
@OPS.op("ReduceMax", attrs=_REDUCE_ATTRS, canonicalize=_reduce_canon)
def _reduction(ctx: InferContext) -> list[TensorType]:
    """Reduce over ``axes`` (all when empty), keeping them as size 1 with ``keepdims``."""
    need_numeric(ctx, 0)
    x = ctx.type(0)
    axes = set(ctx["axes"])
    if ctx["keepdims"]:
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    else:
        shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    return same_type(ctx, shape)


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


@OPS.op("Reshape", attrs={"shape": Attr("ints")}, canonicalize=_reshape_canon, traits=MOVES)
def _reshape(ctx: InferContext) -> list[TensorType]:
    """Same data, new shape (``0`` copies a dim and ``-1`` is inferred when built)."""
    shape = tuple(ctx["shape"])
    if any(d < 0 for d in shape) or math.prod(shape) != ctx.type(0).size:
        raise ShapeError(f"cannot reshape {list(ctx.type(0).shape)} to {list(shape)}")
    return moved(ctx, shape)


def _flatten_canon(attrs: dict[str, Any], types: Sequence[TensorType | None]) -> dict[str, Any]:
    """``axis`` is in ``[-r, r]``; a negative one counts from the back (-1 is r - 1, not r)."""
    x, axis = types[0], attrs["axis"]
    if x is None:
        return attrs
    return {
        **attrs,
        "axis": normal_axis(axis, x.rank + 1) if axis >= 0 else normal_axis(axis, x.rank),
    }


@OPS.op("Flatten", attrs={"axis": Attr("int", 1)}, canonicalize=_flatten_canon, traits=MOVES)
def _flatten(ctx: InferContext) -> list[TensorType]:
    """Flatten to 2-D: dims before ``axis`` and dims from it."""
    x, axis = ctx.type(0), ctx["axis"]
    return moved(ctx, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))


@OPS.op(
    "Transpose",
    attrs={"perm": Attr("ints", ())},
    canonicalize=lambda a, t: (
        {**a, "perm": a["perm"] or tuple(reversed(range(t[0].rank)))} if t[0] else a
    ),
    traits=MOVES,
)
def _transpose(ctx: InferContext) -> list[TensorType]:
    """Permute axes."""
    x, perm = ctx.type(0), ctx["perm"]
    if sorted(perm) != list(range(x.rank)):
        raise ShapeError(f"Transpose perm {list(perm)} is not a permutation of rank {x.rank}")
    return moved(ctx, tuple(x.shape[p] for p in perm))


@OPS.op(
    "Concat",
    inputs=(1, 1 << 16),
    attrs={"axis": Attr("int")},
    canonicalize=lambda a, t: {**a, "axis": normal_axis(a["axis"], t[0].rank)} if t[0] else a,
    traits=(Trait.INTEGER,),
)
def _concat(ctx: InferContext) -> list[TensorType]:
    """Join along ``axis``."""
    need_same_dtype(ctx, *range(len(ctx)))
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
    return moved(ctx, (*first[:axis], total, *first[axis + 1 :]))


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
        axis = normal_axis(axis, x.rank)
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
    traits=MOVES,
)
def _slice(ctx: InferContext) -> list[TensorType]:
    """Strided slice; bounds are clamped when built (with a negative step, an end of
    ``-dim - 1`` means "through index 0", as in Python)."""
    shape = list(ctx.type(0).shape)
    for start, end, axis, step in zip(ctx["starts"], ctx["ends"], ctx["axes"], ctx["steps"]):
        span = end - start if step > 0 else start - max(end, -1)
        shape[axis] = max(0, -(-span // abs(step)))
    return moved(ctx, tuple(shape))


def _squeeze_canon(attrs: dict[str, Any], types: Sequence[TensorType | None]) -> dict[str, Any]:
    x = types[0]
    if x is None:
        return attrs
    axes = attrs["axes"] or tuple(i for i, d in enumerate(x.shape) if d == 1)
    return {"axes": normal_axes(axes, x.rank)}


@OPS.op("Squeeze", attrs={"axes": Attr("ints", ())}, canonicalize=_squeeze_canon, traits=MOVES)
def _squeeze(ctx: InferContext) -> list[TensorType]:
    """Drop size-1 ``axes``."""
    x = ctx.type(0)
    for a in ctx["axes"]:
        if x.shape[a] != 1:
            raise ShapeError(f"Squeeze axis {a} has size {x.shape[a]}, not 1")
    return moved(ctx, tuple(d for i, d in enumerate(x.shape) if i not in ctx["axes"]))


@OPS.op(
    "Unsqueeze",
    attrs={"axes": Attr("ints")},
    canonicalize=lambda a, t: (
        {"axes": normal_axes(a["axes"], t[0].rank + len(a["axes"]))} if t[0] else a
    ),
    traits=MOVES,
)
def _unsqueeze(ctx: InferContext) -> list[TensorType]:
    """Insert size-1 ``axes`` (positions in the output)."""
    shape = list(ctx.type(0).shape)
    for a in ctx["axes"]:
        shape.insert(a, 1)
    return moved(ctx, tuple(shape))


@OPS.op(
    "Gather",
    inputs=2,
    attrs={"axis": Attr("int", 0)},
    canonicalize=lambda a, t: {**a, "axis": normal_axis(a["axis"], t[0].rank)} if t[0] else a,
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
    return moved(ctx, (*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))


@OPS.op(
    "GatherElements",
    inputs=2,
    attrs={"axis": Attr("int", 0)},
    canonicalize=lambda a, t: {**a, "axis": normal_axis(a["axis"], t[0].rank)} if t[0] else a,
    traits=(Trait.INTEGER,),
)
def _gather_elements(ctx: InferContext) -> list[TensorType]:
    """``out[i][j]... = data[..., indices[i][j]..., ...]`` along ``axis`` (numpy's
    ``take_along_axis``; negative indices count from the end): the shape of ``indices``."""
    data, indices = ctx.type(0), ctx.type(1)
    if indices.dtype not in (DType.I32, DType.I64):
        raise ShapeError(f"GatherElements indices must be i32 or i64, got {indices}")
    if indices.rank != data.rank or any(
        i != ctx["axis"] and n > d for i, (n, d) in enumerate(zip(indices.shape, data.shape))
    ):
        raise ShapeError(f"GatherElements indices {indices} do not fit the data {data}")
    return moved(ctx, indices.shape)


@OPS.op(
    "Expand",
    attrs={"shape": Attr("ints")},
    canonicalize=lambda a, t: (
        {"shape": broadcast_shape(t[0], TensorType(t[0].dtype, a["shape"]))} if t[0] else a
    ),
    traits=MOVES,
)
def _expand(ctx: InferContext) -> list[TensorType]:
    """Broadcast to ``shape`` (the full output shape once built)."""
    shape = tuple(ctx["shape"])
    if broadcast_shape(ctx.type(0), TensorType(ctx.type(0).dtype, shape)) != shape:
        raise ShapeError(f"cannot expand {list(ctx.type(0).shape)} to {list(shape)}")
    return moved(ctx, shape)


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
    return moved(ctx, shape)


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
