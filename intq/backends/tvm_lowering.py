"""The Apache TVM backend: an integer-only intq graph as a compiled Relax module.

Each IR op has one lowering in :data:`LOWER`, which adds Relax bindings to a
``relax.BlockBuilder``: the integer kernels as tensor-expression (TE) functions
(``bb.emit_te``), data movement as Relax ops. Weights, biases and per-channel
requantization constants are ``relax.const`` values baked into the module, so
the compiled module's only inputs are the graph's inputs.

- **Fusion.** A ``QConv``/``QGemm``/``QMatMul`` whose int32 accumulator is read
  only by one ``Requantize`` (or ``Dequantize``) becomes one TE function: the
  accumulation and the requantization epilogue in one loop nest, so the int32
  tensor never reaches memory.
- **Requantization** is the reference's arithmetic in int64, per channel
  ``((acc * M') << L + R) >> S'`` then the clamp: ``S`` in ``[1, 63]`` gives
  ``M' = M, L = 0, R = 2^(S-1), S' = S``; ``S <= 0`` gives ``L = -S`` and no
  rounding; ``S >= 64`` gives ``M' = 0`` (the result is exactly 0, see
  :mod:`intq.semantics.numerics`). ``>>`` on int64 is LLVM's ``ashr``, the arithmetic
  shift. One formula for all channels, so per-channel shifts need no branch.
- **Quantize** divides in float32 and rounds half to even (``nearbyint``), as
  the reference and ONNX ``QuantizeLinear`` do; ``Dequantize`` multiplies in
  float32.
- **Schedules** for the integer kernels live in :mod:`intq.backends.tvm_schedules`;
  every kernel keeps the compute above, so a schedule can only reorder it.

The module compiles with ``tvm.compile`` through Relax's ``default_build``
pipeline (no automatic fusion: the kernels arrive fused and scheduled) and
runs on ``relax.VirtualMachine``. The executable, its artifacts and the loader
live in :mod:`intq.backends.tvm_runtime` (re-exported here):
:meth:`TvmExecutable.save` writes a shared object (host targets) or a ``.tar``
of object files (cross targets, no cross linker needed) plus a JSON manifest;
:func:`load_tvm` reopens a host artifact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from intq.backends.tvm_runtime import (
    TensorSpec,
    TvmExecutable,
    _tvm,
    graph_specs,
    host_target,
    load_tvm,
    parse_target,
)
from intq.errors import IntqError, UnsupportedOpError
from intq.ir.graph import Graph, Node, Value
from intq.ir.types import DType
from intq.tables import RuleTable

# ----- the lowering -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """A TE function the schedules know: its kind and the facts a schedule needs."""

    kind: str  # a key of tvm_schedules.SCHEDULES
    nodes: tuple[str, ...] = ()  # the labels of the nodes it computes (identical prim funcs
    # are shared); none for the Relax ops TVM fuses


class _Lowerer:
    """Walks the graph in order and adds one or a few Relax bindings per node.

    With ``channels_last``, 4-D activations between the CNN kernels are stored NHWC
    (channels innermost: what the conv and depthwise schedules vectorize over); a value
    keeps the layout its producer chose, and a consumer asks for the one it needs with
    :meth:`value` (NCHW, the graph's own) or :meth:`value_nhwc`, which transpose once
    and remember it.
    """

    def __init__(self, graph: Graph, channels_last: bool = False):
        from tvm import relax

        self.relax = relax
        self.graph = graph
        self.channels_last = channels_last
        self.bb = relax.BlockBuilder()
        self.env: dict[str, Any] = {}  # value name -> its Relax expression, as stored
        self.nhwc: set[str] = set()  # the values stored NHWC
        self.transposed: dict[str, Any] = {}  # value name -> its other layout, once asked
        self.kernels: dict[str, Kernel] = {}  # prim func name -> what it computes
        # Accumulators read by exactly one Requantize/Dequantize: fused into that reader.
        self.deferred: dict[str, Node] = {}
        for node in graph:
            out = node.outputs[0] if node.outputs else None
            if node.op in _ACCUMULATORS and out is not None and not out.is_graph_output:
                readers = out.consumers()
                if len(readers) == 1 and readers[0].op in ("Requantize", "Dequantize"):
                    self.deferred[out.name] = node

    def value(self, value: Value | None) -> Any:
        """The Relax expression holding ``value`` in the graph's layout (NCHW for 4-D);
        constants become ``relax.const``."""
        assert value is not None
        if value.name not in self.env:
            assert value.const is not None, value.name
            self.env[value.name] = self.const(value.const)
        if value.name in self.nhwc:
            return self._transpose(value, NHWC_TO_NCHW)
        return self.env[value.name]

    def value_nhwc(self, value: Value) -> Any:
        """The Relax expression holding the 4-D ``value`` as NHWC."""
        if value.name in self.nhwc:
            return self.env[value.name]
        return self._transpose(value, NCHW_TO_NHWC)

    def in_layout(self, value: Value, nhwc: bool) -> Any:
        """``value`` as NHWC if ``nhwc``, else in the graph's layout."""
        return self.value_nhwc(value) if nhwc else self.value(value)

    def stored(self, value: Value) -> tuple[Any, bool]:
        """``value`` as it is stored, and whether that is NHWC (for layout-agnostic ops)."""
        nhwc = self.is_nhwc(value)
        return self.in_layout(value, nhwc), nhwc

    def is_nhwc(self, value: Value) -> bool:
        """True when ``value`` is (or, fused into its reader, will be) stored NHWC."""
        producer = self.deferred.get(value.name)
        if producer is not None:
            return self.channels_last and _channels_last_kernel(producer)
        return value.name in self.nhwc

    def channel_axis(self, value: Value, axis: int) -> int:
        """Where ``value``'s axis ``axis`` (in the graph's layout) is stored."""
        return _nhwc_axis(axis) if self.is_nhwc(value) else axis

    def _transpose(self, value: Value, perm: tuple[int, ...]) -> Any:
        if value.name not in self.transposed:
            source = self.value(value) if perm == NCHW_TO_NHWC else self.env[value.name]
            self.transposed[value.name] = self.emit_te(
                _permute_te(perm), [source], f"layout_{_label_name(value.name)}", value.name
            )
        return self.transposed[value.name]

    def const(self, array: np.ndarray) -> Any:
        """A Relax constant."""
        array = np.ascontiguousarray(array)
        # The dtype explicitly: relax.const narrows int64 arrays to int32 by default.
        return self.relax.const(array, dtype=str(array.dtype))

    def emit_te(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any],
        hint: str,
        label: str,
        kind: str = "elementwise",
    ) -> Any:
        """Bind ``fn`` applied to ``args`` as one TE prim func named ``hint`` (a kernel of
        ``kind`` for the schedules; ``label`` names its node in logs and profiles)."""
        var = self.bb.emit_te(fn, *args, primfunc_name_hint=hint)
        name = self.bb.lookup_binding(var).args[0].name_hint
        shared = self.kernels.get(name)  # the BlockBuilder reuses an identical prim func
        self.kernels[name] = Kernel(kind, (*shared.nodes, label) if shared else (label,))
        return var

    def emit_node(self, fn: Callable[..., Any], args: Sequence[Any], node: Node, kind: str) -> Any:
        """:meth:`emit_te` named after ``node``."""
        return self.emit_te(fn, args, _func_name(node), node.label(), kind)

    def bind(self, node: Node, expr: Any, nhwc: bool = False) -> None:
        """Record ``expr`` as the value of ``node``'s output (stored NHWC if ``nhwc``)."""
        self.env[node.output.name] = expr
        if nhwc:
            self.nhwc.add(node.output.name)


NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)


def _nhwc_axis(axis: int) -> int:
    """Where NCHW axis ``axis`` is in NHWC."""
    return NCHW_TO_NHWC.index(axis)


def _permute_te(perm: tuple[int, ...]) -> Callable[..., Any]:
    from tvm import te

    def fn(x: Any) -> Any:
        shape = [x.shape[p] for p in perm]

        def body(*i: Any) -> Any:
            index = [0] * len(perm)
            for k, p in enumerate(perm):
                index[p] = i[k]
            return x(*index)

        return te.compute(shape, body, name="layout")

    return fn


def _label_name(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def _func_name(node: Node) -> str:
    return f"{node.op.lower()}_{_label_name(node.label())}"[:60] or node.op.lower()


Lowering = Callable[[_Lowerer, Node], None]
LOWER: RuleTable[Lowering] = RuleTable()
"""IR op -> the function adding its Relax bindings."""
_lower = LOWER.register

_ACCUMULATORS = ("QConv", "QGemm", "QMatMul")


def _input(node: Node, index: int = 0) -> Value:
    value = node.inputs[index]
    assert value is not None
    return value


def _dtype(value: Value) -> str:
    return str(value.type.dtype.numpy)


# ----- integer kernels as tensor expressions ----------------------------------------------------


@dataclass(frozen=True)
class _ConvShape:
    """The geometry of a 2-D ``QConv``."""

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
    def of(node: Node) -> _ConvShape:
        x_type, w_type = _input(node, 0).type, _input(node, 1).type
        if x_type.rank != 4:
            raise UnsupportedOpError(
                f"QConv with {x_type.rank - 2} spatial dimensions in the TVM backend",
                node=node.label(),
                hint="the TVM backend lowers 2-D convolutions; use the onnxruntime target",
            )
        attrs = node.attrs
        (n, c, h, w), (m, cg, kh, kw) = x_type.shape, w_type.shape
        top, left, bottom, right = attrs["pads"]
        sh, sw = attrs["strides"]
        dh, dw = attrs["dilations"]
        oh, ow = node.output.type.shape[2:]
        return _ConvShape(
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


def _channels_last_kernel(node: Node) -> bool:
    """True for the convolutions with an NHWC kernel: depthwise, and one group of operands
    ``pmaddwd`` reduces exactly (see :func:`_pairs_exactly`)."""
    if node.op != "QConv" or _input(node).type.rank != 4:
        return False
    conv = _ConvShape.of(node)
    return conv.depthwise or (conv.group == 1 and _pairs_exactly(node))


def _padded_nhwc(
    x: Any, conv: _ConvShape, channels: int, dtype: str | None = None, offset: int = 0
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


def _conv_te(node: Node) -> tuple[Callable[..., Any], str]:
    """The TE function ``(x, w[, b]) -> int32 acc`` of a 2-D ``QConv`` in NCHW (any groups
    and operand widths), and its kernel kind."""
    from tvm import te, tirx

    conv = _ConvShape.of(node)
    top, left, bottom, right = conv.pads
    out_shape = node.output.type.shape
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


def _depthwise_nhwc_te(node: Node) -> Callable[..., Any]:
    """Depthwise ``QConv`` on NHWC: ``(x, w[kh, kw, C][, b]) -> int32 acc`` (NHWC), the
    channels innermost so that a vector holds neighbouring channels of one pixel."""
    from tvm import te

    conv = _ConvShape.of(node)
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


def _pairs_exactly(node: Node) -> bool:
    """True when ``pmaddwd`` on int16 computes ``node`` exactly: 8-bit weights and 8-bit or
    signed 16-bit activations.

    ``pmaddwd`` multiplies int16 pairs exactly and adds each pair in int32. With
    ``|x| <= 2^15`` and ``|w| <= 2^7`` a pair sums to at most ``2^23``, so nothing
    saturates or wraps (unlike ``pmaddubsw``, whose int16 pair sums saturate at full
    8-bit range); the int32 accumulation is what the range analysis proved.
    Unsigned 16-bit activations (up to 65535) are not int16, so they take the generic path.
    """
    x, w = _input(node, 0).type.dtype, _input(node, 1)
    return x in (DType.I8, DType.U8, DType.I16) and w.type.dtype is DType.I8 and w.const is not None


BYTE_OFFSET = 128
"""Added to int8 activations to make them the unsigned operand of ``pmaddubsw``."""


def _reduction_depth(node: Node, w: np.ndarray) -> int:
    """Input channels per int32 lane of one step of the tensorized conv or dense of ``node``
    with int8 weights ``w`` (``[outputs, inputs, *taps]``): 4 (``pmaddubsw`` on bytes, then
    ``pmaddwd`` by ones) where that is exact, else 2 (``pmaddwd`` on int16).

    ``pmaddubsw`` multiplies unsigned by signed bytes and adds each pair *with int16
    saturation*, so it is exact only if no pair of packed weights can reach past int16 with
    activations in ``[0, 255]`` (int8 activations are offset by :data:`BYTE_OFFSET`; see
    :func:`_offset_bias`): ``255 * (w_a + w_b) <= 32767`` over each pair's positive weights
    and ``255 * (|w_a| + |w_b|) <= 32768`` over its negative ones. Weights of 7 bits or
    fewer always pass; full-range 8-bit weights almost never do. Every partial sum must
    also fit int32 (it does unless a channel reduces more than ~65000 inputs).
    """
    x, b = _input(node, 0).type.dtype, _bias(node)
    if x not in (DType.I8, DType.U8) or (b is not None and b.const is None):
        return 2
    pairs = _packed_weights(w, 4).reshape(-1, 2).astype(np.int64)
    positive, negative = np.maximum(pairs, 0).sum(1), np.maximum(-pairs, 0).sum(1)
    if 255 * positive.max() > 2**15 - 1 or 255 * negative.max() > 2**15:
        return 2
    reach = 255 * np.abs(w.astype(np.int64)).reshape(len(w), -1).sum(1)
    reach += np.abs(_offset_bias(node, w).astype(np.int64))
    return 4 if reach.max() < 2**31 else 2


def _operand(node: Node, depth: int) -> tuple[str, int]:
    """The dtype and offset of the activations the tensorized kernel reads: int16 for
    ``pmaddwd``; uint8 for ``pmaddubsw``, int8 offset by :data:`BYTE_OFFSET`."""
    if depth == 2:
        return "int16", 0
    return "uint8", BYTE_OFFSET if _input(node).type.dtype is DType.I8 else 0


def _offset_bias(node: Node, w: np.ndarray) -> np.ndarray:
    """The int32 bias of the byte kernel: ``sum(x * w) = sum((x + 128) * w) - 128 * sum(w)``
    for int8 activations, so ``bias - 128 * sum(w)`` per output channel (the bias itself, or
    zeros, for uint8 ones), with ``w`` as in :func:`_reduction_depth`."""
    b = _bias(node)
    bias = np.zeros(len(w), np.int64)
    if b is not None:
        assert b.const is not None  # _reduction_depth takes constant biases only
        bias += b.const.astype(np.int64)
    if _input(node, 0).type.dtype is DType.I8:
        bias = bias - BYTE_OFFSET * w.astype(np.int64).reshape(len(w), -1).sum(1)
    return bias.astype(np.int32)


def _packed_weights(w: np.ndarray, depth: int = 2) -> np.ndarray:
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


def _packed_conv_te(node: Node, depth: int) -> Callable[..., Any]:
    """``QConv`` (one group, :func:`_pairs_exactly`) on NHWC, ``depth`` input channels at a
    time (:func:`_reduction_depth`).

    ``padded[n, y, x, c]`` is the input with the conv's zero padding and a channel count
    that ``depth`` divides: as int16 for ``pmaddwd`` (a pair is then one 32-bit broadcast
    from memory), as uint8 for ``pmaddubsw`` (int8 offset by :data:`BYTE_OFFSET`, padding
    included: the bias takes the offset back out); ``dot[n, i, j, mo, mi]`` accumulates
    output channel ``8*mo + mi`` from channels ``depth*rc + rt``; the result is read back as
    NHWC ``[n, i, j, m]`` (an index map the schedule inlines into the epilogue).
    """
    from tvm import te

    conv = _ConvShape.of(node)
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


def _dense_te(node: Node) -> Callable[..., Any]:
    """The TE function ``(a, w_nk[, bias]) -> int32 acc`` of ``QGemm``/``QMatMul``.

    The weights arrive pre-transposed to ``[N, K]`` (see :func:`_dense_weights`), so
    the reduction reads both operands contiguously.
    """
    from tvm import te

    out_shape = node.output.type.shape
    k_dim = _input(node, 0).type.shape[-1]

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


def _packed_dense_te(node: Node, depth: int) -> Callable[..., Any]:
    """``QGemm``/``QMatMul`` (:func:`_pairs_exactly`) reducing ``depth`` values of K at a
    time (:func:`_reduction_depth`).

    The input arrives as ``[rows, K]`` (a Relax reshape, free) and is widened to int16 (or
    offset to uint8, as for the conv) with K padded to a multiple of ``depth``;
    ``dot[r, jo, ji]`` accumulates output column ``8*jo + ji``.
    """
    from tvm import te, tirx

    a_shape = _input(node, 0).type.shape
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


def _dense_weights(node: Node) -> np.ndarray:
    w = _input(node, 1)
    assert w.const is not None
    nk = w.const if node.op == "QGemm" and node.attrs.get("transB") else w.const.T
    return np.ascontiguousarray(nk)


@dataclass(frozen=True)
class _Accumulator:
    """How one ``QConv``/``QGemm``/``QMatMul`` computes its int32 accumulator."""

    fn: Callable[..., Any]  # TE: args -> int32 accumulator
    args: list[Any]  # Relax expressions: input, weights[, bias]
    kind: str  # the schedule's kernel kind
    nhwc: bool  # the accumulator (a 4-D conv output) is NHWC


def _bias(node: Node) -> Value | None:
    """The int32 bias input of a ``QConv``/``QGemm``/``QMatMul``, if it has one."""
    return node.inputs[2] if len(node.inputs) > 2 else None


def _packed_operands(
    lw: _Lowerer, node: Node, w: np.ndarray, bias: list[Any]
) -> tuple[int, Any, list[Any]]:
    """The reduction depth of the tensorized ``node`` with weights ``w`` (``[outputs,
    inputs, *taps]``), its packed weights, and its bias arguments (the byte kernel's
    :func:`_offset_bias` where it needs one)."""
    depth = _reduction_depth(node, w)
    if depth == 4 and (bias or _input(node).type.dtype is DType.I8):
        bias = [lw.const(_offset_bias(node, w))]
    return depth, lw.const(_packed_weights(w, depth)), bias


def _accumulator(lw: _Lowerer, node: Node) -> _Accumulator:
    """The TE function computing ``node``'s int32 accumulator, its arguments and kind."""
    x, w = _input(node, 0), _input(node, 1)
    b = _bias(node)
    bias = [lw.value(b)] if b is not None else []
    if lw.channels_last and _channels_last_kernel(node):
        assert w.const is not None
        x_nhwc = lw.value_nhwc(x)
        if _ConvShape.of(node).depthwise:
            weights = np.ascontiguousarray(w.const[:, 0].transpose(1, 2, 0))  # [kh, kw, C]
            return _Accumulator(
                _depthwise_nhwc_te(node), [x_nhwc, lw.const(weights), *bias], "depthwise", True
            )
        depth, weights, bias = _packed_operands(lw, node, w.const, bias)
        return _Accumulator(_packed_conv_te(node, depth), [x_nhwc, weights, *bias], "conv", True)
    if node.op == "QConv":
        fn, kind = _conv_te(node)
        return _Accumulator(fn, [lw.value(x), lw.value(w), *bias], kind, False)
    if _pairs_exactly(node):
        shape = x.type.shape
        rows = lw.relax.ShapeExpr([int(np.prod(shape[:-1])), shape[-1]])
        a = lw.bb.emit(lw.relax.op.reshape(lw.value(x), rows))
        depth, weights, bias = _packed_operands(lw, node, _dense_weights(node), bias)
        return _Accumulator(_packed_dense_te(node, depth), [a, weights, *bias], "dense", False)
    weights = lw.const(_dense_weights(node))
    return _Accumulator(_dense_te(node), [lw.value(x), weights, *bias], "generic", False)


@_lower(*_ACCUMULATORS)
def _accumulate(lw: _Lowerer, node: Node) -> None:
    if node.output.name in lw.deferred:
        return  # computed inside its reader's kernel
    acc = _accumulator(lw, node)
    lw.bind(node, lw.emit_node(acc.fn, acc.args, node, acc.kind), nhwc=acc.nhwc)


@dataclass(frozen=True)
class _Rescale:
    """Per-channel int64 constants of ``((x * M') << L + R) >> S'`` (module docstring)."""

    multiplier: np.ndarray
    left: np.ndarray
    rounding: np.ndarray
    right: np.ndarray

    @property
    def high(self) -> bool:
        """Every channel's ``S'`` is in ``[32, 63]`` (or ``M' = 0``): nearly every conv."""
        return bool(np.all((self.right >= 32) | (self.multiplier == 0)))

    @staticmethod
    def of(multipliers: Sequence[int], shifts: Sequence[int]) -> _Rescale:
        m = np.asarray(multipliers, np.int64)
        s = np.asarray(shifts, np.int64)
        zero = s >= 64
        right = np.where((s >= 1) & ~zero, s, 0)
        rounding = np.where(right >= 1, np.left_shift(1, np.maximum(right - 1, 0)), 0)
        return _Rescale(
            # M < 2^31 and shifts < 64 are int32: x * M is then int32 x int32 -> int64,
            # which LLVM emits as one vpmuldq per 4 lanes instead of a 64-bit multiply.
            multiplier=np.where(zero, 0, m).astype(np.int32),
            left=np.where(s <= 0, np.minimum(-s, 62), 0).astype(np.int32),
            rounding=rounding.astype(np.int64),
            right=right.astype(np.int32),
        )


def _rescale_te(
    rescale: _Rescale, lo: int, hi: int, out_dtype: str, axis: int
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


def _fused(
    lw: _Lowerer,
    node: Node,
    epilogue: Callable[..., Any],
    constants: Sequence[np.ndarray],
) -> None:
    """Bind ``epilogue(acc, *constants)``, fused with the accumulator's kernel if deferred."""
    x = _input(node)
    extra = [lw.const(c) for c in constants]
    producer = lw.deferred.get(x.name)
    if producer is None:
        source, nhwc = lw.stored(x)
        lw.bind(node, lw.emit_node(epilogue, [source, *extra], node, "elementwise"), nhwc=nhwc)
        return
    acc = _accumulator(lw, producer)
    count = len(acc.args)

    def fn(*tensors: Any) -> Any:
        return epilogue(acc.fn(*tensors[:count]), *tensors[count:])

    lw.bind(node, lw.emit_node(fn, [*acc.args, *extra], producer, acc.kind), nhwc=acc.nhwc)


@_lower("Requantize")
def _requantize(lw: _Lowerer, node: Node) -> None:
    attrs = node.attrs
    x = _input(node)
    rescale = _Rescale.of(attrs["multiplier"], attrs["shift"])
    axis = lw.channel_axis(x, attrs["axis"]) if len(attrs["multiplier"]) > 1 else 0
    fn, constants = _rescale_te(rescale, attrs["lo"], attrs["hi"], _dtype(node.output), axis)
    _fused(lw, node, fn, constants)


@_lower("Dequantize")
def _dequantize(lw: _Lowerer, node: Node) -> None:
    from tvm import te, tirx

    q = _input(node).type.quant
    assert q is not None
    scales = np.asarray(q.scale, np.float32)
    axis = lw.channel_axis(_input(node), q.axis) if q.axis is not None else 0
    if len(scales) == 1:

        def fn(x: Any) -> Any:
            s = tirx.const(float(scales[0]), "float32")
            return te.compute(x.shape, lambda *i: x(*i).astype("float32") * s, name="dequantize")

        _fused(lw, node, fn, [])
        return

    def per_channel(x: Any, s: Any) -> Any:
        return te.compute(
            x.shape, lambda *i: x(*i).astype("float32") * s[i[axis]], name="dequantize"
        )

    _fused(lw, node, per_channel, [scales])


@_lower("Quantize")
def _quantize(lw: _Lowerer, node: Node) -> None:
    from tvm import te, tirx

    q = node.output.type.quant
    assert q is not None
    scale = float(np.float32(node.attrs["scale"]))
    out = _dtype(node.output)

    def fn(x: Any) -> Any:
        def body(*i: Any) -> Any:
            # float32 division then round half to even, as the reference (never x * (1/s)).
            scaled = tirx.nearbyint(x(*i).astype("float32") / tirx.const(scale, "float32"))
            low, high = tirx.const(q.qmin, "float32"), tirx.const(q.qmax, "float32")
            return tirx.max(tirx.min(scaled, high), low).astype(out)

        return te.compute(x.shape, body, name="quantize")

    lw.bind(node, lw.emit_node(fn, [lw.value(_input(node))], node, "elementwise"))


@_lower("QAdd")
def _qadd(lw: _Lowerer, node: Node) -> None:
    from tvm import te, tirx

    attrs = node.attrs
    ma, mb, shift = attrs["multiplier_a"], attrs["multiplier_b"], attrs["shift"]
    lo, hi, out = attrs["lo"], attrs["hi"], _dtype(node.output)

    shape = node.output.type.shape

    def fn(a: Any, b: Any) -> Any:
        def body(*i: Any) -> Any:
            total = _broadcast(a, i).astype("int64") * tirx.const(ma, "int64") + _broadcast(
                b, i
            ).astype("int64") * tirx.const(mb, "int64")
            if shift >= 64:
                rounded = tirx.const(0, "int64")
            elif shift >= 1:
                rounded = (total + tirx.const(1 << (shift - 1), "int64")) >> tirx.const(
                    shift, "int64"
                )
            else:
                rounded = total << tirx.const(min(-shift, 62), "int64")
            low, high = tirx.const(lo, "int64"), tirx.const(hi, "int64")
            return tirx.max(tirx.min(rounded, high), low).astype(out)

        return te.compute(shape, body, name="qadd")

    nhwc = _elementwise_nhwc(lw, node)
    if nhwc:
        shape = _nhwc_shape(shape)
    args = [lw.in_layout(_input(node, 0), nhwc), lw.in_layout(_input(node, 1), nhwc)]
    lw.bind(node, lw.emit_node(fn, args, node, "elementwise"), nhwc=nhwc)


def _elementwise_nhwc(lw: _Lowerer, node: Node) -> bool:
    """True when the elementwise ``node`` should run NHWC: an input already is, and every
    input has the output's 4-D shape (no broadcasting to remap)."""
    inputs = [v for v in node.inputs if v is not None]
    shape = node.output.type.shape
    return (
        len(shape) == 4
        and all(v.type.shape == shape for v in inputs)
        and any(lw.is_nhwc(v) for v in inputs)
    )


def _nhwc_shape(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(shape[p] for p in NCHW_TO_NHWC)


def _spatial_input(lw: _Lowerer, node: Node) -> tuple[Any, bool, Callable[..., Any]]:
    """A pool's input as stored (NCHW or NHWC), whether it is NHWC, and ``at(x, n, c,
    spatial)``, which reads ``x`` in that layout."""
    source, nhwc = lw.stored(_input(node))
    return source, nhwc, _reader(nhwc)


def _reader(nhwc: bool) -> Callable[..., Any]:
    if nhwc:
        return lambda x, n, c, spatial: x[(n, *spatial, c)]
    return lambda x, n, c, spatial: x[(n, c, *spatial)]


def _bind_pool(lw: _Lowerer, node: Node, fn: Callable[..., Any], source: Any, nhwc: bool) -> None:
    """Bind a pool's kernel: the NHWC pool schedule vectorizes over channels."""
    lw.bind(node, lw.emit_node(fn, [source], node, "pool" if nhwc else "elementwise"), nhwc=nhwc)


def _pool_compute(node: Node, nhwc: bool, body: Callable[..., Any], name: str) -> Any:
    """The TE compute of ``body(n, c, spatial)`` over ``node``'s output in the chosen layout."""
    from tvm import te

    shape = node.output.type.shape
    if nhwc:
        return te.compute(_nhwc_shape(shape), lambda n, i, j, c: body(n, c, (i, j)), name=name)
    return te.compute(shape, lambda n, c, *o: body(n, c, o), name=name)


def _broadcast(t: Any, index: tuple[Any, ...]) -> Any:
    """``t`` read at the output ``index`` under numpy broadcasting (size-1 dims repeat)."""
    trailing = index[len(index) - len(t.shape) :]
    return t(*(0 if int(d) == 1 else i for d, i in zip(t.shape, trailing)))


@_lower("QGlobalAveragePool")
def _qglobal_avgpool(lw: _Lowerer, node: Node) -> None:
    from tvm import te

    spatial = _input(node).type.shape[2:]
    source, nhwc, at = _spatial_input(lw, node)

    def fn(x: Any) -> Any:
        axes = [te.reduce_axis((0, d), name=f"r{k}") for k, d in enumerate(spatial)]
        body = lambda n, c, _: te.sum(at(x, n, c, axes).astype("int32"), axis=axes)  # noqa: E731
        return _pool_compute(node, nhwc, body, "pool")

    _bind_pool(lw, node, fn, source, nhwc)


@_lower("QAveragePool")
def _qavgpool(lw: _Lowerer, node: Node) -> None:
    from tvm import te

    kernel, strides = node.attrs["kernel_shape"], node.attrs["strides"]
    source, nhwc, at = _spatial_input(lw, node)

    def fn(x: Any) -> Any:
        axes = [te.reduce_axis((0, k), name=f"r{d}") for d, k in enumerate(kernel)]

        def body(n: Any, c: Any, o: Sequence[Any]) -> Any:
            index = [o[d] * strides[d] + axes[d] for d in range(len(kernel))]
            return te.sum(at(x, n, c, index).astype("int32"), axis=axes)

        return _pool_compute(node, nhwc, body, "pool")

    _bind_pool(lw, node, fn, source, nhwc)


def _lowest(dtype: np.dtype) -> int | float:
    return float(np.finfo(dtype).min) if dtype.kind == "f" else int(np.iinfo(dtype).min)


@_lower("MaxPool")
def _maxpool(lw: _Lowerer, node: Node) -> None:
    from tvm import te, tirx

    x_type = _input(node).type
    attrs = node.attrs
    kernel, strides, pads = attrs["kernel_shape"], attrs["strides"], attrs["pads"]
    spatial = len(kernel)
    dilations = attrs.get("dilations") or (1,) * spatial
    dtype = _dtype(node.output)
    lowest = _lowest(x_type.dtype.numpy)
    sizes = x_type.shape[2:]
    source, nhwc, at = _spatial_input(lw, node)

    def fn(x: Any) -> Any:
        axes = [te.reduce_axis((0, k), name=f"r{d}") for d, k in enumerate(kernel)]

        def body(n: Any, c: Any, o: Sequence[Any]) -> Any:
            index = [o[d] * strides[d] + axes[d] * dilations[d] - pads[d] for d in range(spatial)]
            inside = tirx.all(*[tirx.all(i >= 0, i < s) for i, s in zip(index, sizes)])
            clamped = [tirx.max(tirx.min(i, s - 1), 0) for i, s in zip(index, sizes)]
            element = tirx.if_then_else(inside, at(x, n, c, clamped), tirx.const(lowest, dtype))
            return te.max(element, axis=axes)

        return _pool_compute(node, nhwc, body, "maxpool")

    _bind_pool(lw, node, fn, source, nhwc)


@_lower("Clip", "Relu")
def _clip(lw: _Lowerer, node: Node) -> None:
    from tvm import te, tirx

    x_type = _input(node).type
    dtype = _dtype(node.output)
    low, high = (0.0, np.inf) if node.op == "Relu" else (node.attrs["min"], node.attrs["max"])
    if x_type.dtype.is_integer:
        info = np.iinfo(x_type.dtype.numpy)
        low = info.min if low == -np.inf else max(info.min, int(np.ceil(low)))
        high = info.max if high == np.inf else min(info.max, int(np.floor(high)))
    else:
        low = float(np.float32(max(low, -3.4e38)))
        high = float(np.float32(min(high, 3.4e38)))

    def fn(x: Any) -> Any:
        lo_, hi_ = tirx.const(low, dtype), tirx.const(high, dtype)
        return te.compute(x.shape, lambda *i: tirx.max(tirx.min(x(*i), hi_), lo_), name="clip")

    source, nhwc = lw.stored(_input(node))  # elementwise: any layout
    lw.bind(node, lw.emit_node(fn, [source], node, "elementwise"), nhwc=nhwc)


@_lower("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(lw: _Lowerer, node: Node) -> None:
    shape = lw.relax.ShapeExpr(list(node.output.type.shape))
    lw.bind(node, lw.bb.emit(lw.relax.op.reshape(lw.value(_input(node)), shape)))


@_lower("Identity")
def _identity(lw: _Lowerer, node: Node) -> None:
    lw.bind(node, lw.value(_input(node)))


@_lower("Transpose")
def _transpose(lw: _Lowerer, node: Node) -> None:
    perm = list(node.attrs["perm"])
    lw.bind(node, lw.bb.emit(lw.relax.op.permute_dims(lw.value(_input(node)), perm)))


@_lower("Concat")
def _concat(lw: _Lowerer, node: Node) -> None:
    inputs = [v for v in node.inputs if v is not None]
    axis = node.attrs["axis"] % node.output.type.rank
    nhwc = node.output.type.rank == 4 and all(lw.is_nhwc(v) for v in inputs)
    parts = [lw.in_layout(v, nhwc) for v in inputs]
    expr = lw.relax.op.concat(lw.relax.Tuple(parts), axis=_nhwc_axis(axis) if nhwc else axis)
    lw.bind(node, lw.bb.emit(expr), nhwc=nhwc)


@_lower("Expand")
def _expand(lw: _Lowerer, node: Node) -> None:
    shape = lw.relax.ShapeExpr(list(node.output.type.shape))
    lw.bind(node, lw.bb.emit(lw.relax.op.broadcast_to(lw.value(_input(node)), shape)))


@_lower("Cast")
def _cast(lw: _Lowerer, node: Node) -> None:
    lw.bind(node, lw.bb.emit(lw.relax.op.astype(lw.value(_input(node)), _dtype(node.output))))


@_lower("Softmax")
def _softmax(lw: _Lowerer, node: Node) -> None:
    # A float op after the output Dequantize: close to, not bit-equal with, numpy's exp.
    x = lw.value(_input(node))
    lw.bind(node, lw.bb.emit(lw.relax.op.nn.softmax(x, axis=node.attrs["axis"])))


@_lower("Slice")
def _slice(lw: _Lowerer, node: Node) -> None:
    from tvm import te

    x_type = _input(node).type
    first = [0] * x_type.rank
    step = [1] * x_type.rank
    attrs = node.attrs
    for start, end, axis, stride in zip(
        attrs["starts"], attrs["ends"], attrs["axes"], attrs["steps"]
    ):
        # The reference's slice: a canonical end < 0 with a negative step means "through 0".
        picked = np.arange(x_type.shape[axis])[slice(start, None if end < 0 else end, stride)]
        first[axis] = int(picked[0]) if picked.size else 0
        step[axis] = stride

    def fn(x: Any) -> Any:
        return te.compute(
            node.output.type.shape,
            lambda *i: x(*[first[d] + i[d] * step[d] for d in range(len(i))]),
            name="slice",
        )

    lw.bind(node, lw.emit_node(fn, [lw.value(_input(node))], node, "elementwise"))


@_lower("Pad")
def _pad(lw: _Lowerer, node: Node) -> None:
    from tvm import te, tirx

    if node.attrs["mode"] != "constant" or any(p < 0 for p in node.attrs["pads"]):
        raise UnsupportedOpError(
            f"Pad mode {node.attrs['mode']!r} with pads {list(node.attrs['pads'])} in TVM",
            node=node.label(),
            hint="the TVM backend lowers constant padding with non-negative pads",
        )
    x_type = _input(node).type
    rank = x_type.rank
    before = node.attrs["pads"][:rank]
    dtype = _dtype(node.output)
    fill = node.attrs["value"]

    def fn(x: Any) -> Any:
        def body(*i: Any) -> Any:
            inside = tirx.all(
                *[
                    tirx.all(i[d] >= before[d], i[d] < before[d] + x_type.shape[d])
                    for d in range(rank)
                ]
            )
            index = [
                tirx.max(tirx.min(i[d] - before[d], x_type.shape[d] - 1), 0) for d in range(rank)
            ]
            return tirx.if_then_else(inside, x(*index), tirx.const(fill, dtype))

        return te.compute(node.output.type.shape, body, name="pad")

    lw.bind(node, lw.emit_node(fn, [lw.value(_input(node))], node, "elementwise"))


# ----- module, compile, run ---------------------------------------------------------------------


def to_relax(graph: Graph, channels_last: bool = True) -> tuple[Any, dict[str, Kernel]]:
    """The Relax ``IRModule`` computing ``graph`` and the kernels it holds (by prim func name);
    ``channels_last`` keeps CNN activations NHWC between the kernels that want it."""
    lw = _Lowerer(graph, channels_last)
    relax = lw.relax
    params = [relax.Var(v.name, relax.TensorType(v.type.shape, _dtype(v))) for v in graph.inputs]
    with lw.bb.function("main", params):
        with lw.bb.dataflow():
            for value, var in zip(graph.inputs, params):
                lw.env[value.name] = var
            for node in graph:
                LOWER.rule_for(node, "TVM lowering")(lw, node)
            outputs = lw.bb.emit_output(relax.Tuple([lw.value(v) for v in graph.outputs]))
        lw.bb.emit_func_output(outputs)
    return lw.bb.get(), lw.kernels


OPAQUE = 8
"""Relax's ``kOpaque`` op pattern: ``FuseOps`` leaves a prim func marked so alone."""


def fuse_relax_ops(mod: Any, kernels: Mapping[str, Kernel]) -> tuple[Any, dict[str, Kernel]]:
    """Legalize the Relax ops (the transformer kernels' int64 arithmetic, data movement) to
    TIR and fuse each chain of them into one prim func (``FuseOps``/``FuseTIR``), so that a
    LayerNorm is a few loops instead of dozens of kernel calls, each with its own output
    allocation. intq's own TE kernels are marked opaque and stay as they are. Returns the
    module and the kernels, with the fused prim funcs as ``fused`` ones."""
    from tvm import relax, tirx

    mod = relax.transform.AnnotateTIROpPattern()(relax.transform.LegalizeOps()(mod))
    for gv in mod.get_global_vars():
        if gv.name_hint in kernels:
            mod.update_func(gv, mod[gv].with_attr("op_pattern", OPAQUE))
    mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(mod))
    fused = {
        gv.name_hint: Kernel("fused")
        for gv in mod.get_global_vars()
        if isinstance(mod[gv], tirx.PrimFunc) and gv.name_hint not in kernels
    }
    return mod, {**kernels, **fused}


def compile_tvm(
    graph: Graph,
    tvm_target: str | Mapping[str, Any] | None = None,
    schedule: bool = True,
    *,
    tune_trials: int = 0,
    tuning_db: str | Path | None = None,
    progress: bool | None = None,
) -> TvmExecutable:
    """Lower ``graph`` to Relax, schedule its integer kernels and compile it for ``tvm_target``.

    ``tvm_target`` is a TVM target dict (or its JSON); ``None`` means this machine.
    ``schedule=False`` keeps TVM's default (naive) loops: slow, for checking schedules.
    ``tuning_db`` is a MetaSchedule database directory: kernels it has records for use
    the best one; ``tune_trials > 0`` first tunes the depthwise and generic kernels it has
    none for (that many candidates each, measured here; see
    :mod:`intq.backends.tvm_tuning`). ``progress`` shows a tuning progress bar (``None``:
    on a terminal).
    """
    from intq.backends.tvm_schedules import schedule_module

    tvm = _tvm()
    spec = parse_target(tvm_target)
    if (tuning_db is not None or tune_trials) and not (schedule and spec["kind"] == "llvm"):
        raise IntqError(
            f"MetaSchedule tuning applies to scheduled llvm targets, not kind {spec['kind']!r}"
            f" with schedule={schedule}",
            hint="drop tune_trials/tuning_db (--tune-trials/--tuning-db) for this target",
        )
    start = time.perf_counter()
    # NHWC for the CPU schedules; the GPU's default schedules take the graph as it is.
    mod, kernels = to_relax(graph, channels_last=spec["kind"] == "llvm")
    report: dict[str, str] = {}
    if spec["kind"] == "cuda":
        # GPU kernels need their loops bound to threads: dlight's default GPU schedules
        # (integer kernels as they are; a tuned GPU schedule is future work).
        from tvm.s_tir import dlight

        target = tvm.target.Target(spec, host=host_target())
        with target:
            mod = dlight.ApplyDefaultSchedule(
                dlight.gpu.Reduction(), dlight.gpu.GeneralReduction(), dlight.gpu.Fallback()
            )(mod)
    else:
        target = tvm.target.Target(spec)
        if schedule and spec["kind"] == "llvm":
            mod, kernels = fuse_relax_ops(mod, kernels)
            hand = kernels
            if tuning_db is not None or tune_trials:
                from intq.backends.tvm_tuning import tune_with_database

                mod, tuned = tune_with_database(
                    mod, kernels, target, tuning_db, tune_trials, progress=progress
                )
                report.update(tuned)
                hand = {name: k for name, k in kernels.items() if name not in tuned}
            mod = schedule_module(mod, hand, target, report=report)
    try:
        executable = tvm.compile(mod, target=target, relax_pipeline="default_build")
    except Exception as err:
        raise IntqError(
            f"TVM failed to compile the graph for {spec}: {str(err).strip().splitlines()[-1]}",
            hint="report it with the model; try schedule=False to rule out the schedules",
        ) from err
    inputs, outputs = graph_specs(graph)
    exe = TvmExecutable(executable, spec, inputs, outputs, graph, time.perf_counter() - start)
    exe.schedules = {name: (kernels[name].kind, applied) for name, applied in report.items()}
    exe.kernel_nodes = {name: list(k.nodes) for name, k in kernels.items() if k.nodes}
    return exe


# ----- transformers ---------------------------------------------------------------------------


@_lower("QBatchMatMul")
def _qbatch_matmul(lw: _Lowerer, node: Node) -> None:
    """Two activations, int32 products and sums (numpy batching)."""
    op = lw.relax.op
    a, b = (lw.bb.emit(op.astype(lw.value(_input(node, i)), "int32")) for i in (0, 1))
    lw.bind(node, lw.bb.emit(op.matmul(a, b, out_dtype="int32")))


@_lower("Gather")
def _gather(lw: _Lowerer, node: Node) -> None:
    table, index = (lw.value(_input(node, i)) for i in (0, 1))
    # "clip": an index outside the table can never read outside it, even in a device-side
    # loader that skips intq's input checks (TVM's "fast" mode does not check at all).
    take = lw.relax.op.take(table, index, axis=node.attrs["axis"], mode="clip")
    lw.bind(node, lw.bb.emit(take))


@_lower("Not")
def _not(lw: _Lowerer, node: Node) -> None:
    lw.bind(node, lw.bb.emit(lw.relax.op.logical_not(lw.value(_input(node)))))


class _RelaxOps:
    """:class:`intq.semantics.kernels.IntOps` as Relax int64 ops: the transformer kernels are the
    reference's own code (:mod:`intq.semantics.kernels`), emitted op by op. ``>>`` on int64 is the
    arithmetic shift; run-time shifts are capped at 63 (the kernels shift non-negative
    values there, for which 63 already gives 0)."""

    def __init__(self, lw: _Lowerer):
        self.lw, self.op = lw, lw.relax.op

    def _emit(self, expr: Any) -> Any:
        return self.lw.bb.emit(expr)

    def const(self, value: Any) -> Any:
        return self.lw.const(np.asarray(value, np.int64))

    def add(self, a: Any, b: Any) -> Any:
        return self._emit(self.op.add(a, b))

    def sub(self, a: Any, b: Any) -> Any:
        return self._emit(self.op.subtract(a, b))

    def mul(self, a: Any, b: Any) -> Any:
        return self._emit(self.op.multiply(a, b))

    def sra(self, x: Any, shift: Any) -> Any:
        return self._emit(self.op.right_shift(x, self.const(shift)))

    def _capped(self, shift: Any) -> Any:
        return self._emit(self.op.minimum(shift, self.const(63)))

    def srl_var(self, x: Any, shift: Any) -> Any:
        return self._emit(self.op.right_shift(x, self._capped(shift)))

    def shl_var(self, x: Any, shift: Any) -> Any:
        return self._emit(self.op.left_shift(x, self._capped(shift)))

    def less(self, a: Any, b: Any) -> Any:
        return self._emit(self.op.astype(self._emit(self.op.less(a, b)), "int64"))

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        flag = self._emit(self.op.not_equal(cond, self.const(0)))
        return self._emit(self.op.where(flag, a, b))

    def reduce_max(self, x: Any, axis: int) -> Any:
        return self._emit(self.op.max(x, axis=[axis], keepdims=True))

    def reduce_sum(self, x: Any, axis: int) -> Any:
        return self._emit(self.op.sum(x, axis=[axis], keepdims=True))

    def count_at_least(self, x: Any, thresholds: np.ndarray) -> Any:
        column = self._emit(self.op.expand_dims(x, axis=[-1]))
        flags = self._emit(self.op.greater_equal(column, self.const(thresholds)))
        counts = self._emit(self.op.astype(flags, "int64"))
        return self._emit(self.op.sum(counts, axis=[-1], keepdims=False))

    def gather(self, table: np.ndarray, index: Any) -> Any:
        return self._emit(self.op.take(self.const(table), index, axis=0))

    def div(self, a: Any, b: Any) -> Any:
        return self._emit(self.op.floor_divide(a, b))


def _int64(lw: _Lowerer, value: Value) -> Any:
    return lw.bb.emit(lw.relax.op.astype(lw.value(value), "int64"))


def _store(lw: _Lowerer, node: Node, result: Any) -> None:
    lw.bind(node, lw.bb.emit(lw.relax.op.astype(result, _dtype(node.output))))


@_lower("QSoftmax", "QGelu", "QLayerNorm")
def _transformer_kernel(lw: _Lowerer, node: Node) -> None:
    from intq.semantics import kernels

    keep = node.inputs[1] if len(node.inputs) > 1 else None
    x = _int64(lw, _input(node))
    mask = None if keep is None else _int64(lw, keep)
    _store(lw, node, kernels.run_node(_RelaxOps(lw), node, x, mask))


__all__ = [
    "LOWER",
    "TensorSpec",
    "TvmExecutable",
    "compile_tvm",
    "host_target",
    "load_tvm",
    "parse_target",
    "to_relax",
]
