"""The TVM backend's integer kernels as tensor expressions (TE): what each one computes.

Every function here builds the TE compute of one kernel from a node's types and attributes;
none knows the lowering's rule table, its Relax expressions or the schedules
(:mod:`intq.backends.tvm_lowering` binds the kernels, :mod:`intq.backends.tvm_schedules`
reorders their loops and can change no arithmetic).

- **Accumulators** (``QConv``, ``QConvTranspose``, ``QGemm``, ``QMatMul``): the int32 sums of
  products, with the bias. A generic NCHW conv, transposed conv and dense; a depthwise conv
  on NHWC; and the tensorized ones, which read packed int8 weights (:func:`packed_weights`)
  and reduce 2 (``pmaddwd`` on int16) or 4 (``pmaddubsw`` on bytes) input channels per int32
  lane, where :func:`pairs_exactly` and :func:`reduction_depth` show that this is exact
  (always, for 4 byte channels, with VNNI's ``vpdpbusd``).
- **Requantization** (:func:`rescale_te`) is the reference's arithmetic in int64, per channel
  ``((acc * M') << L + R) >> S'`` then the clamp: ``S`` in ``[1, 63]`` gives
  ``M' = M, L = 0, R = 2^(S-1), S' = S``; ``S <= 0`` gives ``L = -S`` and no
  rounding; ``S >= 64`` gives ``M' = 0`` (the result is exactly 0, see
  :mod:`intq.semantics.numerics`). ``>>`` on int64 is LLVM's ``ashr``, the arithmetic
  shift. One formula for all channels, so per-channel shifts need no branch.
  :func:`dequantize_te` multiplies in float32. Both are epilogues: the lowering fuses them
  into the accumulator they read.
- **Pools** (global and windowed average, max) on NCHW or NHWC (:mod:`intq.backends.tvm_layout`).

TVM is imported inside the functions, when a kernel is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from intq.backends.tvm_layout import nhwc_shape, reader
from intq.errors import UnsupportedOpError
from intq.ir.graph import Node, Value
from intq.ir.types import DType


def input_of(node: Node, index: int = 0) -> Value:
    """Input ``index`` of ``node``, which must be there."""
    value = node.inputs[index]
    assert value is not None
    return value


def dtype_of(value: Value) -> str:
    """The numpy name of ``value``'s dtype (``"int8"``), as TVM spells dtypes."""
    return str(value.type.dtype.numpy)


def bias_input(node: Node) -> Value | None:
    """The int32 bias input of a ``QConv``/``QGemm``/``QMatMul``, if it has one."""
    return node.inputs[2] if len(node.inputs) > 2 else None


# ----- convolutions and dense products ------------------------------------------------------------


@dataclass(frozen=True)
class ConvShape:
    """The geometry of a 2-D ``QConv``, or of a 1-D one as a 2-D one of height 1 (input
    ``[N, C, 1, L]``, weights ``[M, C / group, 1, K]``: :func:`as_2d` reshapes them)."""

    n: int
    c: int
    h: int
    w: int
    m: int
    cg: int
    kh: int
    kw: int
    group: int
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    strides: tuple[int, int]
    dilations: tuple[int, int]
    out: tuple[int, int]  # output height, width

    @staticmethod
    def of(node: Node) -> ConvShape:
        x_type, w_type = input_of(node, 0).type, input_of(node, 1).type
        attrs = node.attrs
        if x_type.rank == 3:  # a 1-D conv: height 1, no padding, stride or dilation there
            (n, c, length), (m, cg, k) = x_type.shape, w_type.shape
            (left, right), (s,), (d,) = attrs["pads"], attrs["strides"], attrs["dilations"]
            (ol,) = node.output.type.shape[2:]
            return ConvShape(
                n=n,
                c=c,
                h=1,
                w=length,
                m=m,
                cg=cg,
                kh=1,
                kw=k,
                group=attrs["group"],
                pads=(0, left, 0, right),
                strides=(1, s),
                dilations=(1, d),
                out=(1, ol),
            )
        if x_type.rank != 4:
            raise UnsupportedOpError(
                f"QConv with {x_type.rank - 2} spatial dimensions in the TVM backend",
                node=node.label(),
                hint="the TVM backend lowers 1-D and 2-D convolutions; use the onnxruntime target",
            )
        (n, c, h, w), (m, cg, kh, kw) = x_type.shape, w_type.shape
        top, left, bottom, right = attrs["pads"]
        sh, sw = attrs["strides"]
        dh, dw = attrs["dilations"]
        oh, ow = node.output.type.shape[2:]
        return ConvShape(
            n,
            c,
            h,
            w,
            m,
            cg,
            kh,
            kw,
            attrs["group"],
            (top, left, bottom, right),
            (sh, sw),
            (dh, dw),
            (oh, ow),
        )

    def as_2d(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A 1-D conv's input, weight or output ``shape`` with the height 1 inserted (a 2-D
        conv's unchanged)."""
        return shape if len(shape) == 4 else (*shape[:2], 1, *shape[2:])

    @property
    def depthwise(self) -> bool:
        return self.cg == 1 and self.group == self.c == self.m

    @property
    def padded(self) -> bool:
        return any(self.pads)

    def window(self, i: Any, j: Any, ry: Any, rx: Any) -> tuple[Any, Any]:
        """The (padded) input row and column output ``(i, j)`` reads at tap ``(ry, rx)``."""
        return (
            i * self.strides[0] + ry * self.dilations[0],
            j * self.strides[1] + rx * self.dilations[1],
        )


def _padded_nhwc(
    x: Any, conv: ConvShape, channels: int, dtype: str | None = None, offset: int = 0
) -> Any:
    """``x + offset`` (NHWC) with the conv's zero padding (``offset`` there), ``channels``
    (>= C) channels and ``dtype`` (default: its own), or ``x`` itself when that changes
    nothing."""
    from tvm import te, tirx

    top, left, bottom, right = conv.pads
    dtype = dtype or x.dtype
    if not conv.padded and channels == conv.c and dtype == x.dtype and not offset:
        return x
    zero = tirx.const(offset, dtype)

    def body(b: Any, i: Any, j: Any, ch: Any) -> Any:
        inside = tirx.all(i >= top, i < conv.h + top, j >= left, j < conv.w + left, ch < conv.c)
        yi = tirx.max(tirx.min(i - top, conv.h - 1), 0)
        xi = tirx.max(tirx.min(j - left, conv.w - 1), 0)
        element = x[b, yi, xi, tirx.min(ch, conv.c - 1)]
        return tirx.if_then_else(inside, _as_operand(element, dtype, offset), zero)

    shape = (conv.n, conv.h + top + bottom, conv.w + left + right, channels)
    return te.compute(shape, body, name="pad")


def _as_operand(value: Any, dtype: str, offset: int) -> Any:
    """``value + offset`` as ``dtype``: what a tensorized kernel reads of one activation
    (the add in int32, and only where there is an offset)."""
    return (value.astype("int32") + offset).astype(dtype) if offset else value.astype(dtype)


def _plus_bias(acc: Any, bias: Any) -> Any:
    """``acc + bias`` in int32, as an unsigned add reinterpreted: the range analysis proved
    the sum fits int32, and an add that cannot carry LLVM's ``nsw`` flag keeps
    ``sext(acc + bias)`` a sign-extended int32, so the requantization's ``x * M'`` stays a
    32 x 32-bit product (vpmuldq) rather than a 64-bit one (three vpmuludq)."""
    from tvm import tirx

    return tirx.reinterpret("int32", acc.astype("uint32") + bias.astype("uint32"))


def _add_bias(acc: Any, bias: Sequence[Any], axis: int) -> Any:
    """``acc`` plus its per-channel int32 bias (channels along ``axis``) if it has one: a
    stage the schedules inline into the epilogue."""
    from tvm import te

    if not bias:
        return acc
    (b,) = bias
    return te.compute(acc.shape, lambda *i: _plus_bias(acc(*i), b[i[axis]]), name="bias")


def conv_te(node: Node) -> tuple[Callable[..., Any], str]:
    """The TE function ``(x, w[, b]) -> int32 acc`` of a 2-D ``QConv`` in NCHW (any groups
    and operand widths; a 1-D one on its operands and result of height 1), and its kernel
    kind."""
    from tvm import te, tirx

    conv = ConvShape.of(node)
    top, left, bottom, right = conv.pads
    out_shape = (conv.n, conv.m, *conv.out)
    per_group = conv.m // conv.group

    def fn(x: Any, wt: Any, *bias: Any) -> Any:
        padded = x
        if conv.padded:
            zero = tirx.const(0, x.dtype)
            padded = te.compute(
                (conv.n, conv.c, conv.h + top + bottom, conv.w + left + right),
                lambda b, ch, i, j: tirx.if_then_else(
                    tirx.all(i >= top, i < conv.h + top, j >= left, j < conv.w + left),
                    x[b, ch, i - top, j - left],
                    zero,
                ),
                name="pad",
            )
        rc = te.reduce_axis((0, conv.cg), name="rc")
        ry = te.reduce_axis((0, conv.kh), name="ry")
        rx = te.reduce_axis((0, conv.kw), name="rx")

        def body(b: Any, k: Any, i: Any, j: Any) -> Any:
            channel = rc if conv.group == 1 else (k // per_group) * conv.cg + rc
            return te.sum(
                padded[(b, channel, *conv.window(i, j, ry, rx))].astype("int32")
                * wt[k, rc, ry, rx].astype("int32"),
                axis=[rc, ry, rx],
            )

        return _add_bias(te.compute(out_shape, body, name="acc"), bias, 1)

    return fn, "generic"


def depthwise_nhwc_te(node: Node) -> Callable[..., Any]:
    """Depthwise ``QConv`` on NHWC: ``(x, w[kh, kw, C][, b]) -> int32 acc`` (NHWC), the
    channels innermost so that a vector holds neighbouring channels of one pixel."""
    from tvm import te

    conv = ConvShape.of(node)
    shape = (conv.n, *conv.out, conv.m)

    def fn(x: Any, wt: Any, *bias: Any) -> Any:
        padded = _padded_nhwc(x, conv, conv.c)
        ry = te.reduce_axis((0, conv.kh), name="ry")
        rx = te.reduce_axis((0, conv.kw), name="rx")
        acc = te.compute(
            shape,
            lambda b, i, j, k: te.sum(
                padded[(b, *conv.window(i, j, ry, rx), k)].astype("int32")
                * wt[ry, rx, k].astype("int32"),
                axis=[ry, rx],
            ),
            name="acc",
        )
        return _add_bias(acc, bias, 3)

    return fn


LANES = 8
"""int32 lanes of one AVX2 register: output channels computed together."""


def pairs_exactly(node: Node) -> bool:
    """True when ``pmaddwd`` on int16 computes ``node`` exactly: 8-bit weights and 8-bit or
    signed 16-bit activations.

    ``pmaddwd`` multiplies int16 pairs exactly and adds each pair in int32. With
    ``|x| <= 2^15`` and ``|w| <= 2^7`` a pair sums to at most ``2^23``, so nothing
    saturates or wraps (unlike ``pmaddubsw``, whose int16 pair sums saturate at full
    8-bit range); the int32 accumulation is what the range analysis proved.
    Unsigned 16-bit activations (up to 65535) are not int16, so they take the generic path.
    """
    x, w = input_of(node, 0).type.dtype, input_of(node, 1)
    return x in (DType.I8, DType.U8, DType.I16) and w.type.dtype is DType.I8 and w.const is not None


BYTE_OFFSET = 128
"""Added to int8 activations to make them the unsigned operand of ``pmaddubsw``."""


def reduction_depth(node: Node, w: np.ndarray, vnni: bool = False) -> int:
    """Input channels per int32 lane of one step of the tensorized conv or dense of ``node``
    with int8 weights ``w`` (``[outputs, inputs, *taps]``): 4 (bytes: ``vpdpbusd`` when
    ``vnni``, else ``pmaddubsw`` then ``pmaddwd`` by ones) where that is exact, else 2
    (``pmaddwd`` on int16).

    ``vpdpbusd`` (VNNI) multiplies unsigned by signed bytes and adds the four products of a
    lane straight into its int32 accumulator: exact for any int8 weights. ``pmaddubsw``
    adds each pair *with int16 saturation*, so without VNNI it is exact only if no pair of
    packed weights can reach past int16 with activations in ``[0, 255]`` (int8 activations
    are offset by :data:`BYTE_OFFSET`; see :func:`offset_bias`): ``255 * (w_a + w_b) <=
    32767`` over each pair's positive weights and ``255 * (|w_a| + |w_b|) <= 32768`` over
    its negative ones. Weights of 7 bits or fewer always pass; full-range 8-bit weights
    almost never do. Either way every partial sum must also fit int32 (it does unless a
    channel reduces more than ~65000 inputs).
    """
    x, b = input_of(node, 0).type.dtype, bias_input(node)
    if x not in (DType.I8, DType.U8) or (b is not None and b.const is None):
        return 2
    pairs = packed_weights(w, 4).reshape(-1, 2).astype(np.int64)
    positive, negative = np.maximum(pairs, 0).sum(1), np.maximum(-pairs, 0).sum(1)
    if not vnni and (255 * positive.max() > 2**15 - 1 or 255 * negative.max() > 2**15):
        return 2
    reach = 255 * np.abs(w.astype(np.int64)).reshape(len(w), -1).sum(1)
    reach += np.abs(offset_bias(node, w).astype(np.int64))
    return 4 if reach.max() < 2**31 else 2


def _operand(node: Node, depth: int) -> tuple[str, int]:
    """The dtype and offset of the activations the tensorized kernel reads: int16 for
    ``pmaddwd``; uint8 for ``pmaddubsw``, int8 offset by :data:`BYTE_OFFSET`."""
    if depth == 2:
        return "int16", 0
    return "uint8", BYTE_OFFSET if input_of(node).type.dtype is DType.I8 else 0


def offset_bias(node: Node, w: np.ndarray) -> np.ndarray:
    """The int32 bias of the byte kernel: ``sum(x * w) = sum((x + 128) * w) - 128 * sum(w)``
    for int8 activations, so ``bias - 128 * sum(w)`` per output channel (the bias itself, or
    zeros, for uint8 ones), with ``w`` as in :func:`reduction_depth`."""
    b = bias_input(node)
    bias = np.zeros(len(w), np.int64)
    if b is not None:
        assert b.const is not None  # reduction_depth takes constant biases only
        bias += b.const.astype(np.int64)
    if input_of(node, 0).type.dtype is DType.I8:
        bias = bias - BYTE_OFFSET * w.astype(np.int64).reshape(len(w), -1).sum(1)
    return bias.astype(np.int32)


def packed_weights(w: np.ndarray, depth: int = 2) -> np.ndarray:
    """``[M, C, *k]`` int8 weights packed as ``[ceil(M/8), *k, ceil(C/depth), 8, depth]``,
    zero-padded: one ``pmaddwd`` (depth 2) or ``pmaddubsw`` (depth 4) reads 8 output
    channels x ``depth`` input channels contiguously, and the reduction walks the taps,
    then the channel groups, as an NHWC input lies in memory."""
    m, c = w.shape[:2]
    mo, groups = -(-m // LANES), -(-c // depth)
    padded = np.zeros((mo * LANES, groups * depth, *w.shape[2:]), np.int8)
    padded[:m, :c] = w
    spatial = w.ndim - 2
    blocks = padded.reshape(mo, LANES, groups, depth, *w.shape[2:])
    # (mo, mi, groups, t, *k) -> (mo, *k, groups, mi, t)
    order = (0, *range(4, 4 + spatial), 2, 1, 3)
    return np.ascontiguousarray(blocks.transpose(order))


def packed_conv_te(node: Node, depth: int) -> Callable[..., Any]:
    """``QConv`` (one group, :func:`pairs_exactly`) on NHWC, ``depth`` input channels at a
    time (:func:`reduction_depth`).

    ``padded[n, y, x, c]`` is the input with the conv's zero padding and a channel count
    that ``depth`` divides: as int16 for ``pmaddwd`` (a pair is then one 32-bit broadcast
    from memory), as uint8 for ``pmaddubsw`` (int8 offset by :data:`BYTE_OFFSET`, padding
    included: the bias takes the offset back out); ``dot[n, i, j, mo, mi]`` accumulates
    output channel ``8*mo + mi`` from channels ``depth*rc + rt``; the result is read back as
    NHWC ``[n, i, j, m]`` (an index map the schedule inlines into the epilogue).
    """
    from tvm import te

    conv = ConvShape.of(node)
    shape = (conv.n, *conv.out, conv.m)
    mo, groups = -(-conv.m // LANES), -(-conv.c // depth)
    dtype, offset = _operand(node, depth)

    def fn(x: Any, wp: Any, *bias: Any) -> Any:
        padded = _padded_nhwc(x, conv, depth * groups, dtype, offset)
        ry = te.reduce_axis((0, conv.kh), name="ry")
        rx = te.reduce_axis((0, conv.kw), name="rx")
        rc = te.reduce_axis((0, groups), name="rc")
        rt = te.reduce_axis((0, depth), name="rt")
        dot = te.compute(
            (conv.n, *conv.out, mo, LANES),
            lambda b, i, j, ko, ki: te.sum(
                padded[(b, *conv.window(i, j, ry, rx), rc * depth + rt)].astype("int32")
                * wp[ko, ry, rx, rc, ki, rt].astype("int32"),
                axis=[ry, rx, rc, rt],
            ),
            name="dot",
        )

        def read(b: Any, i: Any, j: Any, k: Any) -> Any:
            value = dot[b, i, j, k // LANES, k % LANES]
            return _plus_bias(value, bias[0][k]) if bias else value

        return te.compute(shape, read, name="acc")

    return fn


def conv_transpose_te(node: Node) -> Callable[..., Any]:
    """The TE function ``(x, w[, b]) -> int32 acc`` of an N-d ``QConvTranspose`` in NC[D]HW,
    any groups: output ``o`` sums ``x[i] * w[tap]`` over the taps with
    ``o + pad = i * stride + tap * dilation`` for an input position ``i`` inside the input
    (the reference's scatter, read as a gather)."""
    from tvm import te, tirx

    x_type, w_type = input_of(node, 0).type, input_of(node, 1).type
    attrs = node.attrs
    spatial = x_type.rank - 2
    sizes, kernel = x_type.shape[2:], w_type.shape[2:]
    cg = x_type.shape[1] // attrs["group"]
    per_group = w_type.shape[1]
    strides, dilations, pads = attrs["strides"], attrs["dilations"], attrs["pads"]

    def fn(x: Any, wt: Any, *bias: Any) -> Any:
        rc = te.reduce_axis((0, cg), name="rc")
        taps = [te.reduce_axis((0, k), name=f"rk{d}") for d, k in enumerate(kernel)]

        def body(b: Any, m: Any, *o: Any) -> Any:
            channel = (m // per_group) * cg + rc
            inside, index = [], []
            for d in range(spatial):
                offset = o[d] + pads[d] - taps[d] * dilations[d]
                i = tirx.floordiv(offset, strides[d])
                inside += [tirx.floormod(offset, strides[d]) == 0, i >= 0, i < sizes[d]]
                index.append(tirx.max(tirx.min(i, sizes[d] - 1), 0))
            product = x[(b, channel, *index)].astype("int32") * wt[
                (channel, m % per_group, *taps)
            ].astype("int32")
            return te.sum(
                tirx.if_then_else(tirx.all(*inside), product, tirx.const(0, "int32")),
                axis=[rc, *taps],
            )

        acc = te.compute(node.output.type.shape, body, name="acc")
        return _add_bias(acc, bias, 1)

    return fn


def nhwc_conv_transpose(node: Node) -> bool:
    """True for the ``QConvTranspose`` nodes :func:`conv_transpose_nhwc_te` computes: 2-D,
    one group, no dilation, constant weights (decoder upsampling layers)."""
    if node.op != "QConvTranspose" or input_of(node).type.rank != 4:
        return False
    attrs = node.attrs
    return (
        attrs["group"] == 1
        and all(d == 1 for d in attrs["dilations"])
        and input_of(node, 1).const is not None
    )


def transposed_taps(kernel: int, stride: int) -> int:
    """Taps of a transposed conv that can reach one output along an axis: ``ceil(k / s)``
    (the taps of one stride phase: ``t = (o + pad) mod s + q * s``)."""
    return -(-kernel // stride)


def conv_transpose_weights(w: np.ndarray, strides: Sequence[int]) -> np.ndarray:
    """``[C, M, kh, kw]`` weights of a one-group ``QConvTranspose`` as ``[kh', kw', C, M]``,
    each tap axis zero-padded to a multiple of its stride (``kh' = s * ceil(kh / s)``): the
    output channels innermost, and every phase's taps inside the array (a padded tap adds
    zero)."""
    c, m, kh, kw = w.shape
    full = [s * transposed_taps(k, s) for k, s in zip((kh, kw), strides)]
    padded = np.zeros((c, m, *full), w.dtype)
    padded[:, :, :kh, :kw] = w
    return np.ascontiguousarray(padded.transpose(2, 3, 0, 1))


def conv_transpose_nhwc_te(node: Node) -> Callable[..., Any]:
    """A :func:`nhwc_conv_transpose` ``QConvTranspose`` on NHWC: ``(x, w[kh', kw', C, M]
    [, b]) -> int32 acc`` (NHWC), weights from :func:`conv_transpose_weights`.

    Output ``o`` (per axis) takes input ``i = (o + pad) // s - q`` through tap
    ``t = (o + pad) mod s + q * s`` for ``q < ceil(k / s)``: exactly the taps with
    ``o + pad = i * s + t``, so it reduces over ``ceil(k / s)`` taps per axis instead of
    :func:`conv_transpose_te`'s ``k`` of which all but those are masked (4x fewer products for
    the usual ``k = s = 2``); a tap beyond ``k`` reads a zero weight and an input outside the
    image adds nothing, so the sum is the same integers."""
    from tvm import te, tirx

    _, h, w, c = nhwc_shape(input_of(node).type.shape)
    kh, kw = input_of(node, 1).type.shape[2:]
    (sh, sw), (ph, pw) = node.attrs["strides"], node.attrs["pads"][:2]
    n, m, oh, ow = node.output.type.shape
    qh, qw = transposed_taps(kh, sh), transposed_taps(kw, sw)

    def fn(x: Any, wt: Any, *bias: Any) -> Any:
        ry = te.reduce_axis((0, qh), name="ry")
        rx = te.reduce_axis((0, qw), name="rx")
        rc = te.reduce_axis((0, c), name="rc")

        def body(b: Any, i: Any, j: Any, k: Any) -> Any:
            # i + pad >= 0, so floor and truncating division agree.
            ai, aj = i + ph, j + pw
            ii, jj = tirx.floordiv(ai, sh) - ry, tirx.floordiv(aj, sw) - rx
            ty, tx = tirx.floormod(ai, sh) + ry * sh, tirx.floormod(aj, sw) + rx * sw
            inside = tirx.all(ii >= 0, ii < h, jj >= 0, jj < w)
            source = x[b, tirx.max(tirx.min(ii, h - 1), 0), tirx.max(tirx.min(jj, w - 1), 0), rc]
            product = source.astype("int32") * wt[ty, tx, rc, k].astype("int32")
            return te.sum(
                tirx.if_then_else(inside, product, tirx.const(0, "int32")), axis=[ry, rx, rc]
            )

        acc = te.compute((n, oh, ow, m), body, name="acc")
        return _add_bias(acc, bias, 3)

    return fn


def dense_te(node: Node) -> Callable[..., Any]:
    """The TE function ``(a, w_nk[, bias]) -> int32 acc`` of ``QGemm``/``QMatMul``.

    The weights arrive pre-transposed to ``[N, K]`` (by the lowering), so
    the reduction reads both operands contiguously.
    """
    from tvm import te

    out_shape = node.output.type.shape
    k_dim = input_of(node, 0).type.shape[-1]

    def fn(a: Any, wt: Any, *bias: Any) -> Any:
        rk = te.reduce_axis((0, k_dim), name="rk")
        acc = te.compute(
            out_shape,
            lambda *i: te.sum(
                a[(*i[:-1], rk)].astype("int32") * wt[i[-1], rk].astype("int32"), axis=rk
            ),
            name="acc",
        )
        return _add_bias(acc, bias, -1)

    return fn


def packed_dense_te(node: Node, depth: int) -> Callable[..., Any]:
    """``QGemm``/``QMatMul`` (:func:`pairs_exactly`) reducing ``depth`` values of K at a
    time (:func:`reduction_depth`).

    The input arrives as ``[rows, K]`` (a Relax reshape, free) and is widened to int16 (or
    offset to uint8, as for the conv) with K padded to a multiple of ``depth``;
    ``dot[r, jo, ji]`` accumulates output column ``8*jo + ji``.
    """
    from tvm import te, tirx

    a_shape = input_of(node, 0).type.shape
    rows, k_dim = int(np.prod(a_shape[:-1])), a_shape[-1]
    out_shape = node.output.type.shape
    n_dim = out_shape[-1]
    no, groups = -(-n_dim // LANES), -(-k_dim // depth)
    dtype, offset = _operand(node, depth)

    def fn(a: Any, wp: Any, *bias: Any) -> Any:
        def pad(r: Any, k: Any) -> Any:
            value = _as_operand(a[r, tirx.min(k, k_dim - 1)], dtype, offset)
            return tirx.if_then_else(k < k_dim, value, tirx.const(offset, dtype))

        padded = te.compute((rows, depth * groups), pad, name="pad")
        rk = te.reduce_axis((0, groups), name="rk")
        rt = te.reduce_axis((0, depth), name="rt")
        dot = te.compute(
            (rows, no, LANES),
            lambda r, jo, ji: te.sum(
                padded[r, rk * depth + rt].astype("int32") * wp[jo, rk, ji, rt].astype("int32"),
                axis=[rk, rt],
            ),
            name="dot",
        )

        def read(*i: Any) -> Any:
            row = 0
            for d, size in zip(i[:-1], out_shape[:-1]):
                row = row * size + d
            value = dot[row, i[-1] // LANES, i[-1] % LANES]
            return _plus_bias(value, bias[0][i[-1]]) if bias else value

        return te.compute(out_shape, read, name="acc")

    return fn


# ----- requantization and dequantization epilogues ------------------------------------------------


@dataclass(frozen=True)
class Rescale:
    """Per-channel int64 constants of ``((x * M') << L + R) >> S'`` (the module docstring)."""

    multiplier: np.ndarray
    left: np.ndarray
    rounding: np.ndarray
    right: np.ndarray

    @property
    def high(self) -> bool:
        """Every channel's ``S'`` is in ``[32, 63]`` (or ``M' = 0``): nearly every conv."""
        return bool(np.all((self.right >= 32) | (self.multiplier == 0)))

    @staticmethod
    def of(multipliers: Sequence[int], shifts: Sequence[int]) -> Rescale:
        m = np.asarray(multipliers, np.int64)
        s = np.asarray(shifts, np.int64)
        zero = s >= 64
        right = np.where((s >= 1) & ~zero, s, 0)
        rounding = np.where(right >= 1, np.left_shift(1, np.maximum(right - 1, 0)), 0)
        return Rescale(
            # M < 2^31 and shifts < 64 are int32: x * M is then int32 x int32 -> int64,
            # which LLVM emits as one vpmuldq per 4 lanes instead of a 64-bit multiply.
            multiplier=np.where(zero, 0, m).astype(np.int32),
            left=np.where(s <= 0, np.minimum(-s, 62), 0).astype(np.int32),
            rounding=rounding.astype(np.int64),
            right=right.astype(np.int32),
        )


def rescale_te(
    rescale: Rescale, lo: int, hi: int, out_dtype: str, axis: int
) -> tuple[Callable[..., Any], list[np.ndarray]]:
    """``clamp(((x * M') << L + R) >> S', lo, hi)`` per element (per channel along
    ``axis``); returns the TE function ``(x, *channel_constants) -> y`` and the per-channel
    constant arrays it reads."""
    from tvm import te, tirx

    # Every S in [32, 63] (or >= 64: M' = 0), as for nearly every conv: the shift and the
    # clamp run on 32-bit lanes. With p = x * M' (|p| < 2^62) and q = p >> 32 (which fits
    # int32), for S >= 33 floor((p + 2^(S-1)) / 2^S) = (q + 2^(S-33)) >> (S-32) exactly
    # (the dropped low half is below one unit of q and cannot carry past a multiple of
    # 2^(S-32)), so the rounding is an int32 add on the high half; S = 32 rounds in int64.
    # With nothing added in int64, q = sext(x) * sext(M') >> 32 is LLVM's high-half
    # multiply of int32 lanes: two vpmuldq (even and odd lanes) and a blend per 8 lanes,
    # with no widening of x (see _plus_bias for how x keeps its bias in int32).
    s = rescale.right
    high = rescale.high
    low = np.where(s == 32, 1 << 31, 0).astype(np.int64)
    terms: dict[str, tuple[np.ndarray, str]]
    if high:
        terms = {
            "m": (rescale.multiplier, "int64"),
            "round_low": (low, "int64"),
            "round_high": (
                np.where(s >= 33, np.left_shift(1, np.maximum(s - 33, 0)), 0).astype(np.int32),
                "int32",
            ),
            "shift": (np.where(s >= 32, s - 32, 0).astype(np.int32), "int32"),
        }
    else:
        terms = {
            "m": (rescale.multiplier, "int64"),
            "left": (rescale.left, "int64"),
            "round": (rescale.rounding, "int64"),
            "shift": (rescale.right, "int64"),
        }
    # Terms that are 0 everywhere are left out; one value for every channel is an immediate.
    used = {k: v for k, v in terms.items() if k == "m" or v[0].any()}
    channel_index: dict[str, int] = {}
    constants: list[np.ndarray] = []
    for name, (array, _) in used.items():
        if array.size > 1 and len(set(array.tolist())) > 1:
            channel_index[name] = len(constants)
            constants.append(array)

    def fn(x: Any, *channel: Any) -> Any:
        def at(i: tuple[Any, ...], name: str) -> Any:
            array, dtype = used[name]
            if name in channel_index:
                return channel[channel_index[name]][i[axis]].astype(dtype)
            return tirx.const(int(array[0]), dtype)

        def body(*i: Any) -> Any:
            value = x(*i).astype("int64") * at(i, "m")
            if high:
                if "round_low" in used:
                    value = value + at(i, "round_low")
                top = (value >> tirx.const(32, "int64")).astype("int32")
                if "round_high" in used:
                    top = top + at(i, "round_high")
                if "shift" in used:
                    top = top >> at(i, "shift")
                low, high_ = tirx.const(lo, "int32"), tirx.const(hi, "int32")
                return tirx.max(tirx.min(top, high_), low).astype(out_dtype)
            if "left" in used:
                value = value << at(i, "left")
            if "round" in used:
                value = value + at(i, "round")
            if "shift" in used:
                value = value >> at(i, "shift")
            low, high_ = tirx.const(lo, "int64"), tirx.const(hi, "int64")
            return tirx.max(tirx.min(value, high_), low).astype(out_dtype)

        return te.compute(x.shape, body, name="requantize")

    return fn, constants


def lookup_te(offset: int) -> Callable[..., Any]:
    """:func:`~intq.semantics.kernels.lookup`, ``table[x + offset]``, as one TE kernel: the
    8-bit codes index the 256-entry table (a constant input, stored as the output) directly.

    As Relax ops (the reference's code on :class:`~intq.backends.tvm_lowering._RelaxOps`) it
    was three kernels with int64 tensors between them (widen and offset, ``take``, narrow):
    TVM marks a ``take`` opaque, so ``FuseOps`` fuses nothing into it. Every index is in the
    table: an 8-bit code plus ``offset`` (:func:`~intq.semantics.kernels.lookup_offset`)."""

    def fn(x: Any, table: Any) -> Any:
        from tvm import te

        def body(*i: Any) -> Any:
            return table[x(*i).astype("int32") + offset]

        return te.compute(x.shape, body, name="lookup")

    return fn


def nearbyint(x: Any, llvm: bool) -> Any:
    """``x`` rounded to an integer, half to even (the default rounding mode), as a float.

    For LLVM CPU targets, as LLVM's own ``llvm.nearbyint``: TVM 0.27's loop vectorizer has
    no rule for its ``tirx.nearbyint`` (nor ``tirx.isnan``: :func:`isnan`), so a loop holding
    one stayed scalar, and LLVM then vectorized the loop around it instead, loading every
    16 values with a gather: ``Quantize`` of a 3x64x64 image took 12.7 us (now ~1 us)."""
    from tvm import tirx

    if llvm:
        return tirx.call_llvm_pure_intrin(str(x.ty), "llvm.nearbyint", x)
    return tirx.nearbyint(x)


def isnan(x: Any) -> Any:
    """True where the float32 ``x`` is NaN (exponent all ones, mantissa not 0), tested on its
    bits: TVM 0.27 neither vectorizes ``tirx.isnan`` (see :func:`nearbyint`) nor keeps
    ``x != x`` (its simplifier folds it to false)."""
    from tvm import tirx

    magnitude = tirx.reinterpret("int32", x) & tirx.const(0x7FFFFFFF, "int32")
    return magnitude > tirx.const(0x7F800000, "int32")


def dequantize_te(scales: np.ndarray, axis: int) -> tuple[Callable[..., Any], list[np.ndarray]]:
    """``x * scale`` in float32, one scale per channel along ``axis`` when ``scales`` has
    several; returns the TE function ``(x, *channel_constants) -> y`` and the per-channel
    constant arrays it reads (none for one scale, an immediate)."""
    from tvm import te, tirx

    if len(scales) == 1:

        def fn(x: Any) -> Any:
            s = tirx.const(float(scales[0]), "float32")
            return te.compute(x.shape, lambda *i: x(*i).astype("float32") * s, name="dequantize")

        return fn, []

    def per_channel(x: Any, s: Any) -> Any:
        return te.compute(
            x.shape, lambda *i: x(*i).astype("float32") * s[i[axis]], name="dequantize"
        )

    return per_channel, [scales]


# ----- pools --------------------------------------------------------------------------------------


def _pool_compute(node: Node, nhwc: bool, body: Callable[..., Any], name: str) -> Any:
    """The TE compute of ``body(n, c, spatial)`` over ``node``'s output in the chosen layout."""
    from tvm import te

    shape = node.output.type.shape
    if nhwc:
        return te.compute(nhwc_shape(shape), lambda n, i, j, c: body(n, c, (i, j)), name=name)
    return te.compute(shape, lambda n, c, *o: body(n, c, o), name=name)


def _lowest(dtype: np.dtype) -> int | float:
    return float(np.finfo(dtype).min) if dtype.kind == "f" else int(np.iinfo(dtype).min)


def global_avgpool_te(node: Node, nhwc: bool) -> Callable[..., Any]:
    """The TE function ``x -> int32 sums`` of ``QGlobalAveragePool`` (the division is the
    ``Requantize`` after it), on NHWC (``nhwc``) or NCHW."""
    from tvm import te

    spatial = input_of(node).type.shape[2:]
    at = reader(nhwc)

    def fn(x: Any) -> Any:
        axes = [te.reduce_axis((0, d), name=f"r{k}") for k, d in enumerate(spatial)]
        body = lambda n, c, _: te.sum(at(x, n, c, axes).astype("int32"), axis=axes)  # noqa: E731
        return _pool_compute(node, nhwc, body, "pool")

    return fn


def avgpool_te(node: Node, nhwc: bool) -> Callable[..., Any]:
    """The TE function ``x -> int32 window sums`` of ``QAveragePool``, on NHWC or NCHW."""
    from tvm import te

    kernel, strides = node.attrs["kernel_shape"], node.attrs["strides"]
    at = reader(nhwc)

    def fn(x: Any) -> Any:
        axes = [te.reduce_axis((0, k), name=f"r{d}") for d, k in enumerate(kernel)]

        def body(n: Any, c: Any, o: Sequence[Any]) -> Any:
            index = [o[d] * strides[d] + axes[d] for d in range(len(kernel))]
            return te.sum(at(x, n, c, index).astype("int32"), axis=axes)

        return _pool_compute(node, nhwc, body, "pool")

    return fn


def maxpool_te(node: Node, nhwc: bool) -> Callable[..., Any]:
    """The TE function ``x -> window maxima`` of ``MaxPool`` (padding reads the dtype's
    lowest value), on NHWC or NCHW."""
    from tvm import te, tirx

    x_type = input_of(node).type
    attrs = node.attrs
    kernel, strides, pads = attrs["kernel_shape"], attrs["strides"], attrs["pads"]
    spatial = len(kernel)
    dilations = attrs.get("dilations") or (1,) * spatial
    dtype = dtype_of(node.output)
    lowest = _lowest(x_type.dtype.numpy)
    sizes = x_type.shape[2:]
    at = reader(nhwc)

    def fn(x: Any) -> Any:
        axes = [te.reduce_axis((0, k), name=f"r{d}") for d, k in enumerate(kernel)]

        def body(n: Any, c: Any, o: Sequence[Any]) -> Any:
            index = [o[d] * strides[d] + axes[d] * dilations[d] - pads[d] for d in range(spatial)]
            inside = tirx.all(*[tirx.all(i >= 0, i < s) for i, s in zip(index, sizes)])
            clamped = [tirx.max(tirx.min(i, s - 1), 0) for i, s in zip(index, sizes)]
            element = tirx.if_then_else(inside, at(x, n, c, clamped), tirx.const(lowest, dtype))
            return te.max(element, axis=axes)

        return _pool_compute(node, nhwc, body, "maxpool")

    return fn


__all__ = [
    "BYTE_OFFSET",
    "LANES",
    "ConvShape",
    "Rescale",
    "avgpool_te",
    "bias_input",
    "conv_te",
    "dense_te",
    "depthwise_nhwc_te",
    "dequantize_te",
    "dtype_of",
    "global_avgpool_te",
    "input_of",
    "maxpool_te",
    "offset_bias",
    "packed_conv_te",
    "packed_dense_te",
    "packed_weights",
    "pairs_exactly",
    "reduction_depth",
    "rescale_te",
]
