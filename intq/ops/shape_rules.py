"""What the op families' shape rules share: axis normalisation, broadcasting, dtype checks,
the types of moved values, window geometry, and the traits of data movement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from intq.errors import ShapeError
from intq.ir.types import DType, TensorType
from intq.ops.schema import InferContext, Trait

MOVES = (Trait.INTEGER, Trait.MOVEMENT, Trait.PASS_THROUGH)
"""The traits of the ops that move values without arithmetic (Reshape, Slice, MaxPool...)."""

INF = float("inf")


def normal_axis(axis: int, rank: int, what: str = "axis") -> int:
    """``axis`` made non-negative; raises when out of range."""
    if not -rank <= axis < rank:
        raise ShapeError(f"{what} {axis} out of range for rank {rank}")
    return axis % rank


def normal_axes(axes: Sequence[int], rank: int) -> tuple[int, ...]:
    normal = tuple(sorted(normal_axis(a, rank) for a in axes))
    if len(set(normal)) != len(normal):
        raise ShapeError(f"repeated axes in {tuple(axes)}")
    return normal


def broadcast_shape(*types: TensorType) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*(t.shape for t in types)))
    except ValueError:
        shapes = " and ".join(str(list(t.shape)) for t in types)
        raise ShapeError(f"shapes {shapes} do not broadcast") from None


def need_float(ctx: InferContext, *indices: int) -> None:
    for i in indices:
        if ctx.has(i) and not ctx.type(i).dtype.is_float:
            raise ShapeError(f"{ctx.op} input {i} must be a float tensor, got {ctx.type(i)}")


def need_same_dtype(ctx: InferContext, *indices: int) -> DType:
    dtypes = {ctx.type(i).dtype for i in indices if ctx.has(i)}
    if len(dtypes) != 1:
        got = ", ".join(str(ctx.type(i)) for i in indices if ctx.has(i))
        raise ShapeError(f"{ctx.op} inputs must share one dtype, got {got}")
    return dtypes.pop()


def need_numeric(ctx: InferContext, index: int) -> None:
    if ctx.type(index).dtype is DType.BOOL:
        raise ShapeError(f"{ctx.op} input {index} must be numeric, got {ctx.type(index)}")


def moved(ctx: InferContext, shape: tuple[int, ...] | None = None) -> list[TensorType]:
    """Data movement: the input's dtype, and its per-tensor quantization travels along."""
    t = ctx.type(0)
    quant = t.quant if t.quant is not None and t.quant.axis is None else None
    return [TensorType(t.dtype, t.shape if shape is None else shape, quant)]


def same_type(ctx: InferContext, shape: tuple[int, ...] | None = None) -> list[TensorType]:
    t = ctx.type(0)
    return [TensorType(t.dtype, t.shape if shape is None else shape)]


def spatial_defaults(
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


def global_window(
    sizes: Sequence[int], kernel: Sequence[int], pads: Sequence[int], ceil: bool
) -> bool:
    """Whether an unpadded average pool has one window, over the whole input: the kernel as
    large as the input, or larger with ``ceil_mode`` (Hugging Face EfficientNet's pool of
    ``hidden_dim`` on a 7x7 map: PyTorch and ONNX average the part inside the input)."""
    if any(pads):
        return False
    return all(k == s or (ceil and k > s) for k, s in zip(kernel, sizes))


def window_out(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil: bool) -> int:
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
