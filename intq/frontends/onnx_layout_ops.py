"""ONNX converters of the data-movement ops (Reshape, Slice, Pad, Split, Tile...) and of the
ops imported for real models' sake (PRelu, Resize, ConvTranspose...), in
:data:`CONVERTERS`, which :mod:`intq.frontends.onnx_ops` joins with its own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from intq.errors import ModelImportError, ShapeError
from intq.frontends.blocks import Blocks, fold
from intq.frontends.onnx_context import (
    ConvertContext,
    ConverterTable,
    check_size,
    explicit_pads,
    ints,
    tensor_data,
    window_geometry,
)
from intq.ir.graph import Value
from intq.ir.types import DType

CONVERTERS = ConverterTable()
"""ONNX op type -> the converters of this module."""
converter = CONVERTERS.register


# ----- data movement --------------------------------------------------------------------


@converter("Reshape", 5)
def _reshape(ctx: ConvertContext) -> list[Value]:
    shape = ints(ctx.const(1, "shape"))
    if ctx.attr("allowzero", 0) and 0 in shape:
        raise ctx.unsupported("allowzero=1 with a 0 in the shape")
    return ctx.emit("Reshape", ctx.inputs[:1], shape=shape)


@converter("Flatten", 1)
def _flatten(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("Flatten", ctx.inputs, axis=ctx.attr("axis", 1))


@converter("Transpose", 1)
def _transpose(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("Transpose", ctx.inputs, perm=tuple(ctx.attr("perm", [])))


@converter("Concat", 4)
def _concat(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("Concat", ctx.inputs, axis=ctx.attr("axis"))


@converter("Slice", 1, 9)
def _slice_attrs(ctx: ConvertContext) -> list[Value]:
    return ctx.emit(
        "Slice",
        ctx.inputs[:1],
        starts=tuple(ctx.attr("starts")),
        ends=tuple(ctx.attr("ends")),
        axes=tuple(ctx.attr("axes", [])),
    )


@converter("Slice", 10)
def _slice(ctx: ConvertContext) -> list[Value]:
    # ONNX uses INT64 extremes for "to the end"; clamp so they fit the attributes.
    def clamped(index: int, what: str) -> tuple[int, ...]:
        return tuple(int(np.clip(v, -(1 << 62), 1 << 62)) for v in ints(ctx.const(index, what)))

    return ctx.emit(
        "Slice",
        ctx.inputs[:1],
        starts=clamped(1, "starts"),
        ends=clamped(2, "ends"),
        axes=ints(ctx.const(3, "axes")),
        steps=ints(ctx.const(4, "steps")),
    )


@converter("Squeeze", 1, 12)
@converter("Unsqueeze", 1, 12)
def _squeeze_attr(ctx: ConvertContext) -> list[Value]:
    return ctx.emit(ctx.node.op_type, ctx.inputs[:1], axes=tuple(ctx.attr("axes", [])))


@converter("Squeeze", 13)
@converter("Unsqueeze", 13)
def _squeeze(ctx: ConvertContext) -> list[Value]:
    return ctx.emit(ctx.node.op_type, ctx.inputs[:1], axes=ints(ctx.const(1, "axes")))


@converter("Gather", 1)
def _gather(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("Gather", ctx.inputs, axis=ctx.attr("axis", 0))


@converter("Expand", 8)
def _expand(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("Expand", ctx.inputs[:1], shape=ints(ctx.const(1, "shape")))


@converter("Pad", 2, 10)
def _pad_attrs(ctx: ConvertContext) -> list[Value]:
    return ctx.emit(
        "Pad",
        ctx.inputs[:1],
        pads=tuple(ctx.attr("pads")),
        mode=ctx.attr("mode", "constant"),
        value=ctx.attr("value", 0.0),
    )


@converter("Pad", 11)
def _pad(ctx: ConvertContext) -> list[Value]:
    rank = ctx.input(0).type.rank
    pads = ints(ctx.const(1, "pads"))
    axes = ints(ctx.const(3, "axes")) or tuple(range(rank))
    if len(pads) != 2 * len(axes):
        raise ShapeError(f"Pad has {len(pads)} pads for {len(axes)} axes", node=ctx.name)
    full = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        full[axis % rank], full[axis % rank + rank] = pads[i], pads[i + len(axes)]
    value = ctx.const(2, "constant_value")
    mode = ctx.attr("mode", "constant")
    if mode == "wrap":
        raise ctx.unsupported("mode='wrap'")
    return ctx.emit(
        "Pad",
        ctx.inputs[:1],
        pads=tuple(full),
        mode=mode,
        value=0.0 if value is None or value.size == 0 else float(value.reshape(-1)[0]),
    )


@converter("Shape", 1)
def _shape(ctx: ConvertContext) -> list[Value]:
    rank = ctx.input(0).type.rank
    start = ctx.attr("start", 0)
    end = ctx.attr("end", rank)
    return ctx.emit(
        "Shape",
        ctx.inputs,
        start=max(0, start + rank if start < 0 else start),
        end=min(rank, end + rank if end < 0 else end),
    )


@converter("Constant", 1)
def _constant(ctx: ConvertContext) -> list[Value]:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in ctx.attrs:
            raw = ctx.attrs[key]
            if key == "value":
                array = tensor_data(raw, "Constant's value", node=ctx.name)
            else:
                array = np.array(raw, dtype=np.float32 if "float" in key else np.int64)
            DType.from_numpy(array.dtype)  # refuses strings and other unsupported types
            return [ctx.graph.add_constant(array, ctx.node.output[0])]
    raise ctx.unsupported(f"attributes {sorted(ctx.attrs)} (sparse or string constants)")


@converter("ConstantOfShape", 9)
def _constant_of_shape(ctx: ConvertContext) -> list[Value]:
    fill = ctx.attrs.get("value")
    if fill is not None:
        array = tensor_data(fill, "ConstantOfShape's value", node=ctx.name)
    else:
        array = np.zeros(1, np.float32)
    if array.size != 1:
        raise ModelImportError(
            f"ConstantOfShape's value must hold one element, it holds {array.size}", node=ctx.name
        )
    dtype = DType.from_numpy(array.dtype)
    value, shape = array.reshape(-1)[0], ints(ctx.const(0, "shape"))
    if any(d < 0 for d in shape):
        raise ShapeError(f"ConstantOfShape to negative dimensions {list(shape)}", node=ctx.name)
    check_size(shape, dtype, "ConstantOfShape's output", node=ctx.name)
    if array.dtype.kind in "iu" and float(value) != int(value):
        # The IR op's value is a float attribute: an int64 beyond 2**53 would be rounded
        # (INT64_MAX even wraps to INT64_MIN). The op folds anyway, so build the constant.
        return [ctx.graph.add_constant(np.full(shape, value, array.dtype), ctx.node.output[0])]
    return ctx.emit(
        "ConstantOfShape",
        [],
        shape=shape,
        value=float(value),
        dtype=dtype.value,
    )


# ----- ops the importer added for real models (Split, PRelu, Resize, ConvTranspose...) -------


def _step(
    ctx: ConvertContext, op: str, inputs: Sequence[Value | None], out: str = "", **attrs: Any
) -> Value:
    """One IR node of a multi-node conversion, its output named ``out`` or after the op (the
    ONNX node's output name is for the last one, :meth:`ConvertContext.emit`'s default)."""
    return ctx.emit1(op, inputs, out_name=out or op.lower(), **attrs)


def _split(ctx: ConvertContext, sizes: Sequence[int]) -> list[Value]:
    x = ctx.input(0)
    axis = ctx.attr("axis", 0)
    if not -x.type.rank <= axis < x.type.rank:
        raise ShapeError(f"Split axis {axis} out of range for rank {x.type.rank}", node=ctx.name)
    axis %= x.type.rank
    count = len(ctx.node.output)
    dim = x.type.shape[axis]
    if not sizes:
        parts = ctx.attr("num_outputs", count)
        if parts != count or parts < 1:
            raise ShapeError(f"Split num_outputs={parts} but {count} outputs", node=ctx.name)
        chunk = -(-dim // parts)
        sizes = [min(chunk, max(0, dim - i * chunk)) for i in range(parts)]
        if "num_outputs" not in ctx.attrs and dim % parts:
            raise ShapeError(f"Split of {dim} into {parts} equal parts", node=ctx.name)
    if len(sizes) != count or sum(sizes) != dim or any(s < 0 for s in sizes):
        raise ShapeError(
            f"Split sizes {list(sizes)} for {count} outputs do not add up to {dim}", node=ctx.name
        )
    outputs, start = [], 0
    for size, name in zip(sizes, ctx.node.output):
        outputs.append(
            _step(
                ctx,
                "Slice",
                [x],
                name or "split",
                starts=(start,),
                ends=(start + size,),
                axes=(axis,),
            )
        )
        start += size
    return outputs


@converter("Split", 2, 12)
def _split_attr(ctx: ConvertContext) -> list[Value]:
    return _split(ctx, tuple(ctx.attr("split", [])))


@converter("Split", 13)
def _split_input(ctx: ConvertContext) -> list[Value]:
    return _split(ctx, ints(ctx.const(1, "split")))


@converter("PRelu", 7)
def _prelu(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("PRelu", ctx.inputs[:2])


@converter("LeakyRelu", 6)
def _leaky_relu(ctx: ConvertContext) -> list[Value]:
    x = ctx.input(0)
    alpha = ctx.graph.add_constant(
        np.array(ctx.attr("alpha", 0.01), x.type.dtype.numpy), f"{ctx.name}.alpha"
    )
    return ctx.emit("PRelu", [x, alpha])


@converter("Min", 8)
@converter("Max", 8)
def _min_max(ctx: ConvertContext) -> list[Value]:
    """ONNX's n-ary Min/Max as a chain of binary ones."""
    operands = [v for v in ctx.inputs if v is not None]
    if not operands:
        raise ModelImportError(f"{ctx.node.op_type} needs at least one input", node=ctx.name)
    if len(operands) == 1:
        return [operands[0]]
    acc = operands[0]
    for operand in operands[1:-1]:
        acc = _step(ctx, ctx.node.op_type, [acc, operand])
    return ctx.emit(ctx.node.op_type, [acc, operands[-1]])


@converter("Softplus", 1)
@converter("Mish", 18)
def _softplus(ctx: ConvertContext) -> list[Value]:
    return ctx.emit(ctx.node.op_type, ctx.inputs[:1])


@converter("Tile", 6)
def _tile(ctx: ConvertContext) -> list[Value]:
    """``Tile`` as Reshape to ``(1, d0, 1, d1...)``, Expand to ``(r0, d0, r1, d1...)`` and
    Reshape to ``(r0 * d0, ...)``: data movement the integer lowering already knows."""
    x = ctx.input(0)
    repeats = ints(ctx.const(1, "repeats"))
    shape = x.type.shape
    if len(repeats) != len(shape) or any(r < 0 for r in repeats):
        raise ShapeError(f"Tile repeats {list(repeats)} do not fit {list(shape)}", node=ctx.name)
    spread = tuple(d for dim in shape for d in (1, dim))
    grown = tuple(d for r, dim in zip(repeats, shape) for d in (r, dim))
    check_size(grown, x.type.dtype, "the output of Tile", node=ctx.name)
    flat = _step(ctx, "Reshape", [x], shape=spread)
    wide = _step(ctx, "Expand", [flat], shape=grown)
    return ctx.emit("Reshape", [wide], shape=tuple(r * d for r, d in zip(repeats, shape)))


@converter("DepthToSpace", 1)
def _depth_to_space(ctx: ConvertContext) -> list[Value]:
    """Reshape, Transpose, Reshape, as the ONNX definition (modes DCR and CRD)."""
    x = ctx.input(0)
    if x.type.rank != 4:
        raise ctx.unsupported(f"input of rank {x.type.rank} (4-D NCHW only)")
    b = ctx.attr("blocksize")
    n, c, h, w = x.type.shape
    if b < 1 or c % (b * b):
        raise ShapeError(f"DepthToSpace blocksize {b} does not divide {c} channels", node=ctx.name)
    if ctx.attr("mode", "DCR") == "DCR":
        split, perm = (n, b, b, c // (b * b), h, w), (0, 3, 4, 1, 5, 2)
    else:
        split, perm = (n, c // (b * b), b, b, h, w), (0, 1, 4, 2, 5, 3)
    moved = _step(ctx, "Transpose", [_step(ctx, "Reshape", [x], shape=split)], perm=perm)
    return ctx.emit("Reshape", [moved], shape=(n, c // (b * b), h * b, w * b))


@converter("SpaceToDepth", 1)
def _space_to_depth(ctx: ConvertContext) -> list[Value]:
    x = ctx.input(0)
    if x.type.rank != 4:
        raise ctx.unsupported(f"input of rank {x.type.rank} (4-D NCHW only)")
    b = ctx.attr("blocksize")
    n, c, h, w = x.type.shape
    if b < 1 or h % b or w % b:
        raise ShapeError(f"SpaceToDepth blocksize {b} does not divide {h}x{w}", node=ctx.name)
    split = _step(ctx, "Reshape", [x], shape=(n, c, h // b, b, w // b, b))
    moved = _step(ctx, "Transpose", [split], perm=(0, 3, 5, 1, 2, 4))
    return ctx.emit("Reshape", [moved], shape=(n, c * b * b, h // b, w // b))


def _resize_node(
    ctx: ConvertContext, scales: np.ndarray | None, sizes: np.ndarray | None, **modes: str
) -> list[Value]:
    x = ctx.input(0)
    mode = ctx.attr("mode", "nearest")
    if mode not in ("nearest", "linear"):
        raise ctx.unsupported(f"mode={mode!r} (nearest and linear are supported)")
    if ctx.attr("antialias", 0) and mode == "linear":
        raise ctx.unsupported("antialias=1")
    if ctx.attr("axes") is not None or ctx.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise ctx.unsupported("axes or keep_aspect_ratio_policy")
    scale_list = (
        () if scales is None or scales.size == 0 else tuple(float(s) for s in scales.reshape(-1))
    )
    size_list = ints(sizes) if sizes is not None and sizes.size else ()
    return ctx.emit("Resize", [x], mode=mode, scales=scale_list, sizes=size_list, **modes)


def _upsample(ctx: ConvertContext, scales: np.ndarray | None) -> list[Value]:
    """Upsample and Resize-10: asymmetric coordinates, nearest rounding down when upsampling
    (ONNX Runtime rounds up when downsampling: refused)."""
    if scales is None:
        raise ModelImportError(f"{ctx.node.op_type} needs scales", node=ctx.name)
    if ctx.attr("mode", "nearest") == "nearest" and np.any(scales < 1):
        raise ctx.unsupported("nearest downsampling (scales below 1)")
    return _resize_node(
        ctx, scales, None, coordinate_transformation_mode="asymmetric", nearest_mode="floor"
    )


@converter("Upsample", 7, 8)
def _upsample_attr(ctx: ConvertContext) -> list[Value]:
    return _upsample(ctx, np.array(ctx.attr("scales"), np.float32))


@converter("Upsample", 9, 9)
@converter("Resize", 10, 10)
def _upsample_input(ctx: ConvertContext) -> list[Value]:
    return _upsample(ctx, ctx.const(1, "scales"))


@converter("Resize", 11)
def _resize(ctx: ConvertContext) -> list[Value]:
    transform = ctx.attr("coordinate_transformation_mode", "half_pixel")
    if transform in ("tf_crop_and_resize", "tf_half_pixel_for_nearest", "half_pixel_symmetric"):
        raise ctx.unsupported(f"coordinate_transformation_mode={transform!r}")
    return _resize_node(
        ctx,
        ctx.const(2, "scales"),
        ctx.const(3, "sizes"),
        coordinate_transformation_mode=transform,
        nearest_mode=ctx.attr("nearest_mode", "round_prefer_floor"),
    )


@converter("ConvTranspose", 1)
def _conv_transpose(ctx: ConvertContext) -> list[Value]:
    x, kernel, strides, dilations = window_geometry(ctx)
    spatial = len(kernel)
    extra = tuple(ctx.attr("output_padding", [0] * spatial))
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    wanted = ctx.attr("output_shape")
    if len(extra) != spatial or (wanted is not None and len(wanted) < spatial):
        raise ShapeError(
            f"output_padding {list(extra)} or output_shape {wanted} does not give one value"
            f" per spatial axis ({spatial})",
            node=ctx.name,
        )
    if wanted is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        wanted = [x.type.shape[2 + i] * strides[i] for i in range(spatial)]
    if wanted is not None:
        wanted = list(wanted)[-spatial:]
        begin, end = [], []
        for i in range(spatial):
            full = (x.type.shape[2 + i] - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1
            total = full + extra[i] - wanted[i]
            if total < 0:
                raise ctx.unsupported(f"output_shape {wanted} larger than the unpadded output")
            small, large = total // 2, total - total // 2
            # As ONNX Runtime: SAME_UPPER puts the larger half at the end, SAME_LOWER and an
            # explicit output_shape at the start.
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        pads = tuple(begin + end)
    elif auto_pad in ("NOTSET", "VALID"):
        pads = explicit_pads(ctx, spatial) if auto_pad == "NOTSET" else (0,) * 2 * spatial
    else:
        raise ctx.unsupported(f"auto_pad={auto_pad!r}")
    return ctx.emit(
        "ConvTranspose",
        ctx.inputs,
        strides=strides,
        pads=pads,
        dilations=dilations,
        output_padding=extra,
        group=ctx.attr("group", 1),
    )


@converter("Col2Im", 18)
def _col2im(ctx: ConvertContext) -> list[Value]:
    """``nn.Fold``: sliding blocks ``[N, C*prod(block), L]`` summed back into an image."""
    x = ctx.input(0)
    image, block = ints(ctx.const(1, "image_shape")), ints(ctx.const(2, "block_shape"))
    d = len(block)
    geometry = Blocks(
        image,
        block,
        tuple(ctx.attr("strides", [1] * d)),
        tuple(ctx.attr("dilations", [1] * d)),
        tuple(ctx.attr("pads", [0] * 2 * d)),
    )

    def emit(op: str, inputs: Sequence[Value | None], suffix: str, **attrs: Any) -> Value:
        return ctx.emit1(op, inputs, out_name=suffix.lstrip("."), **attrs)

    def constant(array: np.ndarray, suffix: str) -> Value:
        return ctx.graph.add_constant(array, ctx.name + suffix)

    return [fold(emit, constant, x, geometry, ctx.name)]
