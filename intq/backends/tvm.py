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
  :mod:`intq.numerics`). ``>>`` on int64 is LLVM's ``ashr``, the arithmetic
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

    kind: str  # "conv", "dense" (packed, tensorized), "depthwise", "generic", "elementwise"
    node: str  # the IR node's label, for errors and tuning records


class _Lowerer:
    """Walks the graph in order and adds one or a few Relax bindings per node."""

    def __init__(self, graph: Graph):
        from tvm import relax

        self.relax = relax
        self.graph = graph
        self.bb = relax.BlockBuilder()
        self.env: dict[str, Any] = {}
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
        """The Relax expression holding ``value`` (constants become ``relax.const``)."""
        assert value is not None
        if value.name not in self.env:
            assert value.const is not None, value.name
            self.env[value.name] = self.const(value.const)
        return self.env[value.name]

    def const(self, array: np.ndarray) -> Any:
        """A Relax constant."""
        array = np.ascontiguousarray(array)
        # The dtype explicitly: relax.const narrows int64 arrays to int32 by default.
        return self.relax.const(array, dtype=str(array.dtype))

    def emit_te(self, fn: Callable[..., Any], args: Sequence[Any], node: Node, kind: str) -> Any:
        """Bind ``fn`` applied to ``args`` as one TE prim func named after ``node``."""
        hint = _func_name(node)
        var = self.bb.emit_te(fn, *args, primfunc_name_hint=hint)
        call = self.bb.lookup_binding(var)
        self.kernels[call.args[0].name_hint] = Kernel(kind, node.label())
        return var

    def bind(self, node: Node, expr: Any) -> None:
        """Record ``expr`` as the value of ``node``'s output."""
        self.env[node.output.name] = expr


def _func_name(node: Node) -> str:
    label = "".join(c if c.isalnum() else "_" for c in node.label()).strip("_")
    return f"{node.op.lower()}_{label}"[:60] or node.op.lower()


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


def _conv_te(node: Node) -> tuple[Callable[..., Any], str]:
    """The TE function ``(x, w[, b]) -> int32 acc`` of a 2-D ``QConv``, and its kernel kind."""
    from tvm import te, tirx

    attrs = node.attrs
    x_type, w_type = _input(node, 0).type, _input(node, 1).type
    if x_type.rank != 4:
        raise UnsupportedOpError(
            f"QConv with {x_type.rank - 2} spatial dimensions in the TVM backend",
            node=node.label(),
            hint="the TVM backend lowers 2-D convolutions (NCHW); use the onnxruntime target",
        )
    n, c, h, w = x_type.shape
    m, cg, kh, kw = w_type.shape
    group = attrs["group"]
    top, left, bottom, right = attrs["pads"]
    sh, sw = attrs["strides"]
    dh, dw = attrs["dilations"]
    out_shape = node.output.type.shape
    per_group = m // group
    depthwise = cg == 1 and group == c == m
    if group == 1 and _pairs_exactly(node):
        return _packed_conv_te(node), "conv"

    def fn(x: Any, wt: Any, *bias: Any) -> Any:
        if top or left or bottom or right:
            zero = tirx.const(0, x.dtype)
            padded = te.compute(
                (n, c, h + top + bottom, w + left + right),
                lambda b, ch, i, j: tirx.if_then_else(
                    tirx.all(i >= top, i < h + top, j >= left, j < w + left),
                    x[b, ch, i - top, j - left],
                    zero,
                ),
                name="pad",
            )
        else:
            padded = x
        ry = te.reduce_axis((0, kh), name="ry")
        rx = te.reduce_axis((0, kw), name="rx")
        if depthwise:

            def body(b: Any, k: Any, i: Any, j: Any) -> Any:
                return te.sum(
                    padded[b, k, i * sh + ry * dh, j * sw + rx * dw].astype("int32")
                    * wt[k, 0, ry, rx].astype("int32"),
                    axis=[ry, rx],
                )

        else:
            rc = te.reduce_axis((0, cg), name="rc")

            def body(b: Any, k: Any, i: Any, j: Any) -> Any:
                channel = rc if group == 1 else (k // per_group) * cg + rc
                return te.sum(
                    padded[b, channel, i * sh + ry * dh, j * sw + rx * dw].astype("int32")
                    * wt[k, rc, ry, rx].astype("int32"),
                    axis=[rc, ry, rx],
                )

        acc = te.compute(out_shape, body, name="acc")
        if bias:
            (b_,) = bias
            acc = te.compute(out_shape, lambda b, k, i, j: acc[b, k, i, j] + b_[k], name="bias")
        return acc

    return fn, "depthwise" if depthwise else "generic"


LANES = 8
"""int32 lanes of one AVX2 register: output channels computed together."""


def _pairs_exactly(node: Node) -> bool:
    """True when ``pmaddwd`` on int16 computes ``node`` exactly: 8-bit activations and weights.

    ``pmaddwd`` multiplies int16 pairs and adds each pair in int32. With
    ``|x| <= 255`` and ``|w| <= 127`` a pair sums to at most ``2 * 255 * 127 < 2^16``,
    so nothing saturates or wraps (unlike ``pmaddubsw``, whose int16 pair sums
    saturate at full range); the int32 accumulation is what the range analysis proved.
    """
    x, w = _input(node, 0).type.dtype, _input(node, 1)
    return x in (DType.I8, DType.U8) and w.type.dtype is DType.I8 and w.const is not None


def _packed_weights(w: np.ndarray) -> np.ndarray:
    """``[M, C, ...]`` int8 weights as int16 ``[ceil(M/8), ceil(C/2), ..., 8, 2]``, zero-padded:
    one ``pmaddwd`` reads 8 output channels x 2 input channels contiguously."""
    m, c = w.shape[:2]
    mo, c2 = -(-m // LANES), -(-c // 2)
    padded = np.zeros((mo * LANES, c2 * 2, *w.shape[2:]), np.int16)
    padded[:m, :c] = w
    spatial = w.ndim - 2
    blocks = padded.reshape(mo, LANES, c2, 2, *w.shape[2:])
    # (mo, mi, c2, t, *k) -> (mo, c2, *k, mi, t)
    order = (0, 2, *range(4, 4 + spatial), 1, 3)
    return np.ascontiguousarray(blocks.transpose(order))


def _packed_conv_te(node: Node) -> Callable[..., Any]:
    """``QConv`` (one group, 8-bit) with channel pairs packed for ``pmaddwd``.

    ``pack[n, c2, h, w, t]`` is the zero-padded input as int16, channels ``2*c2 + t``;
    ``dot[n, mo, i, j, mi]`` accumulates output channel ``8*mo + mi``; the result is
    read back into NCHW (an index map the schedule inlines into the epilogue).
    """
    from tvm import te, tirx

    attrs = node.attrs
    n, c, h, w = _input(node, 0).type.shape
    m, _, kh, kw = _input(node, 1).type.shape
    top, left, bottom, right = attrs["pads"]
    sh, sw = attrs["strides"]
    dh, dw = attrs["dilations"]
    out_shape = node.output.type.shape
    oh, ow = out_shape[2:]
    mo, c2 = -(-m // LANES), -(-c // 2)

    def fn(x: Any, wp: Any, *bias: Any) -> Any:
        zero = tirx.const(0, "int16")

        def pack(b: Any, cc: Any, i: Any, j: Any, t: Any) -> Any:
            ch = cc * 2 + t
            inside = tirx.all(i >= top, i < h + top, j >= left, j < w + left, ch < c)
            ci = tirx.min(ch, c - 1)
            yi = tirx.max(tirx.min(i - top, h - 1), 0)
            xi = tirx.max(tirx.min(j - left, w - 1), 0)
            return tirx.if_then_else(inside, x[b, ci, yi, xi].astype("int16"), zero)

        packed = te.compute((n, c2, h + top + bottom, w + left + right, 2), pack, name="pack")
        rc = te.reduce_axis((0, c2), name="rc")
        ry = te.reduce_axis((0, kh), name="ry")
        rx = te.reduce_axis((0, kw), name="rx")
        rt = te.reduce_axis((0, 2), name="rt")
        dot = te.compute(
            (n, mo, oh, ow, LANES),
            lambda b, ko, i, j, ki: te.sum(
                packed[b, rc, i * sh + ry * dh, j * sw + rx * dw, rt].astype("int32")
                * wp[ko, rc, ry, rx, ki, rt].astype("int32"),
                axis=[rc, ry, rx, rt],
            ),
            name="dot",
        )
        if bias:
            (b_,) = bias
            return te.compute(
                out_shape,
                lambda b, k, i, j: dot[b, k // LANES, i, j, k % LANES] + b_[k],
                name="acc",
            )
        return te.compute(
            out_shape, lambda b, k, i, j: dot[b, k // LANES, i, j, k % LANES], name="acc"
        )

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
        if bias:
            (b_,) = bias
            acc = te.compute(out_shape, lambda *i: acc(*i) + b_[i[-1]], name="bias")
        return acc

    return fn


def _packed_dense_te(node: Node) -> Callable[..., Any]:
    """``QGemm``/``QMatMul`` (8-bit) with K pairs packed for ``pmaddwd`` (see the conv)."""
    from tvm import te, tirx

    a_shape = _input(node, 0).type.shape
    rows, k_dim = int(np.prod(a_shape[:-1])), a_shape[-1]
    out_shape = node.output.type.shape
    n_dim = out_shape[-1]
    no, k2 = -(-n_dim // LANES), -(-k_dim // 2)

    def fn(a: Any, wp: Any, *bias: Any) -> Any:
        zero = tirx.const(0, "int16")

        def pack(r: Any, kk: Any, t: Any) -> Any:
            k = kk * 2 + t
            index = []
            rest = r
            for d in reversed(a_shape[:-1]):
                index.append(rest % d)
                rest = rest // d
            element = a[(*reversed(index), tirx.min(k, k_dim - 1))].astype("int16")
            return tirx.if_then_else(k < k_dim, element, zero)

        packed = te.compute((rows, k2, 2), pack, name="pack")
        rk = te.reduce_axis((0, k2), name="rk")
        rt = te.reduce_axis((0, 2), name="rt")
        dot = te.compute(
            (rows, no, LANES),
            lambda r, jo, ji: te.sum(
                packed[r, rk, rt].astype("int32") * wp[jo, rk, ji, rt].astype("int32"),
                axis=[rk, rt],
            ),
            name="dot",
        )

        def read(*i: Any) -> Any:
            row = 0
            for d, size in zip(i[:-1], out_shape[:-1]):
                row = row * size + d
            value = dot[row, i[-1] // LANES, i[-1] % LANES]
            return value + bias[0][i[-1]] if bias else value

        return te.compute(out_shape, read, name="acc")

    return fn


def _dense_weights(node: Node) -> np.ndarray:
    w = _input(node, 1)
    assert w.const is not None
    nk = w.const if node.op == "QGemm" and node.attrs.get("transB") else w.const.T
    return np.ascontiguousarray(nk)


def _accumulator(lw: _Lowerer, node: Node) -> tuple[Callable[..., Any], list[Any], str]:
    """The TE function computing ``node``'s int32 accumulator, its arguments and kind."""
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if node.op == "QConv":
        fn, kind = _conv_te(node)
        w = _input(node, 1)
        weights = lw.value(w)
        if kind == "conv":
            assert w.const is not None  # _pairs_exactly checked it
            weights = lw.const(_packed_weights(w.const))
        args = [lw.value(_input(node, 0)), weights]
    elif _pairs_exactly(node):
        fn, kind = _packed_dense_te(node), "dense"
        args = [lw.value(_input(node, 0)), lw.const(_packed_weights(_dense_weights(node)))]
    else:
        fn, kind = _dense_te(node), "generic"
        args = [lw.value(_input(node, 0)), lw.const(_dense_weights(node))]
    if bias is not None:
        args.append(lw.value(bias))
    return fn, args, kind


@_lower(*_ACCUMULATORS)
def _accumulate(lw: _Lowerer, node: Node) -> None:
    if node.output.name in lw.deferred:
        return  # computed inside its reader's kernel
    fn, args, kind = _accumulator(lw, node)
    lw.bind(node, lw.emit_te(fn, args, node, kind))


@dataclass(frozen=True)
class _Rescale:
    """Per-channel int64 constants of ``((x * M') << L + R) >> S'`` (module docstring)."""

    multiplier: np.ndarray
    left: np.ndarray
    rounding: np.ndarray
    right: np.ndarray

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

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.multiplier, self.left, self.rounding, self.right


def _rescale_te(
    rescale: _Rescale, lo: int, hi: int, out_dtype: str, axis: int
) -> tuple[Callable[..., Any], list[np.ndarray]]:
    """``clamp(((x * M') << L + R) >> S', lo, hi)`` per element; returns the TE function
    ``(x, *channel_constants) -> y`` and the per-channel constant arrays it reads.

    A constant the same for every channel is an immediate; a left shift of 0 everywhere
    (every ``S >= 1``) or no rounding anywhere is left out.
    """
    from tvm import te, tirx

    # Every S in [32, 63] (or >= 64: M' = 0), as for nearly every conv: floor(p / 2^S) is
    # floor(floor(p / 2^32) / 2^(S-32)), and p >> 32 fits int32 (|acc * M| < 2^62), so the
    # shift and the clamp run on 32-bit lanes: the high half of the product, then vpsrad.
    high = bool(np.all((rescale.right >= 32) | (rescale.multiplier == 0)))
    right = np.where(rescale.right >= 32, rescale.right - 32, 0).astype(np.int32)
    arrays = rescale.arrays()
    if high:
        arrays = (rescale.multiplier, rescale.left, rescale.rounding, right)
    same = [len(set(a.tolist())) == 1 for a in arrays]
    needed = [True, bool(rescale.left.any()), bool(rescale.right.any()), bool(rescale.right.any())]
    channel_index = {}
    constants: list[np.ndarray] = []
    for k, (array, uniform, need) in enumerate(zip(arrays, same, needed)):
        if need and not uniform:
            channel_index[k] = len(constants)
            constants.append(array)

    def fn(x: Any, *channel: Any) -> Any:
        def at(i: tuple[Any, ...], k: int, dtype: str = "int64") -> Any:
            if k in channel_index:
                return channel[channel_index[k]][i[axis]].astype(dtype)
            return tirx.const(int(arrays[k][0]), dtype)

        def body(*i: Any) -> Any:
            value = x(*i).astype("int64") * at(i, 0)
            if high:
                top = ((value + at(i, 2)) >> tirx.const(32, "int64")).astype("int32")
                shifted = top >> at(i, 3, "int32")
                low, high_ = tirx.const(lo, "int32"), tirx.const(hi, "int32")
                return tirx.max(tirx.min(shifted, high_), low).astype(out_dtype)
            if needed[1]:
                value = value << at(i, 1)
            if needed[2]:
                value = (value + at(i, 2)) >> at(i, 3)
            low, high_ = tirx.const(lo, "int64"), tirx.const(hi, "int64")
            return tirx.max(tirx.min(value, high_), low).astype(out_dtype)

        return te.compute(x.shape, body, name="requantize")

    return fn, constants


def _fused(
    lw: _Lowerer, node: Node, epilogue: Callable[..., Any], constants: Sequence[np.ndarray]
) -> None:
    """Bind ``epilogue(acc, *constants)``, fused with the accumulator's kernel if deferred."""
    x = _input(node)
    extra = [lw.const(c) for c in constants]
    producer = lw.deferred.get(x.name)
    if producer is None:
        lw.bind(node, lw.emit_te(epilogue, [lw.value(x), *extra], node, "elementwise"))
        return
    acc_fn, args, kind = _accumulator(lw, producer)
    count = len(args)

    def fn(*tensors: Any) -> Any:
        return epilogue(acc_fn(*tensors[:count]), *tensors[count:])

    lw.bind(node, lw.emit_te(fn, [*args, *extra], producer, kind))


@_lower("Requantize")
def _requantize(lw: _Lowerer, node: Node) -> None:
    attrs = node.attrs
    rescale = _Rescale.of(attrs["multiplier"], attrs["shift"])
    axis = attrs["axis"] if len(attrs["multiplier"]) > 1 else 0
    fn, constants = _rescale_te(rescale, attrs["lo"], attrs["hi"], _dtype(node.output), axis)
    _fused(lw, node, fn, constants)


@_lower("Dequantize")
def _dequantize(lw: _Lowerer, node: Node) -> None:
    from tvm import te, tirx

    q = _input(node).type.quant
    assert q is not None
    scales = np.asarray(q.scale, np.float32)
    axis = q.axis if q.axis is not None else 0
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

    lw.bind(node, lw.emit_te(fn, [lw.value(_input(node))], node, "elementwise"))


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

    args = [lw.value(_input(node, 0)), lw.value(_input(node, 1))]
    lw.bind(node, lw.emit_te(fn, args, node, "elementwise"))


def _broadcast(t: Any, index: tuple[Any, ...]) -> Any:
    """``t`` read at the output ``index`` under numpy broadcasting (size-1 dims repeat)."""
    trailing = index[len(index) - len(t.shape) :]
    return t(*(0 if int(d) == 1 else i for d, i in zip(t.shape, trailing)))


@_lower("QGlobalAveragePool")
def _qglobal_avgpool(lw: _Lowerer, node: Node) -> None:
    from tvm import te

    x_type = _input(node).type
    spatial = x_type.shape[2:]
    out_shape = node.output.type.shape

    def fn(x: Any) -> Any:
        axes = [te.reduce_axis((0, d), name=f"r{k}") for k, d in enumerate(spatial)]
        return te.compute(
            out_shape,
            lambda n, c, *_: te.sum(x[(n, c, *axes)].astype("int32"), axis=axes),
            name="pool",
        )

    lw.bind(node, lw.emit_te(fn, [lw.value(_input(node))], node, "elementwise"))


@_lower("QAveragePool")
def _qavgpool(lw: _Lowerer, node: Node) -> None:
    from tvm import te

    kernel, strides = node.attrs["kernel_shape"], node.attrs["strides"]
    out_shape = node.output.type.shape

    def fn(x: Any) -> Any:
        axes = [te.reduce_axis((0, k), name=f"r{d}") for d, k in enumerate(kernel)]

        def body(n: Any, c: Any, *o: Any) -> Any:
            index = [o[d] * strides[d] + axes[d] for d in range(len(kernel))]
            return te.sum(x[(n, c, *index)].astype("int32"), axis=axes)

        return te.compute(out_shape, body, name="pool")

    lw.bind(node, lw.emit_te(fn, [lw.value(_input(node))], node, "elementwise"))


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
    out_shape = node.output.type.shape
    dtype = _dtype(node.output)
    lowest = _lowest(x_type.dtype.numpy)
    sizes = x_type.shape[2:]

    def fn(x: Any) -> Any:
        axes = [te.reduce_axis((0, k), name=f"r{d}") for d, k in enumerate(kernel)]

        def body(n: Any, c: Any, *o: Any) -> Any:
            index = [o[d] * strides[d] + axes[d] * dilations[d] - pads[d] for d in range(spatial)]
            inside = tirx.all(*[tirx.all(i >= 0, i < s) for i, s in zip(index, sizes)])
            clamped = [tirx.max(tirx.min(i, s - 1), 0) for i, s in zip(index, sizes)]
            element = tirx.if_then_else(inside, x[(n, c, *clamped)], tirx.const(lowest, dtype))
            return te.max(element, axis=axes)

        return te.compute(out_shape, body, name="maxpool")

    lw.bind(node, lw.emit_te(fn, [lw.value(_input(node))], node, "elementwise"))


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

    lw.bind(node, lw.emit_te(fn, [lw.value(_input(node))], node, "elementwise"))


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
    parts = [lw.value(v) for v in node.inputs]
    expr = lw.relax.op.concat(lw.relax.Tuple(parts), axis=node.attrs["axis"])
    lw.bind(node, lw.bb.emit(expr))


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

    lw.bind(node, lw.emit_te(fn, [lw.value(_input(node))], node, "elementwise"))


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

    lw.bind(node, lw.emit_te(fn, [lw.value(_input(node))], node, "elementwise"))


# ----- module, compile, run ---------------------------------------------------------------------


def to_relax(graph: Graph) -> tuple[Any, dict[str, Kernel]]:
    """The Relax ``IRModule`` computing ``graph`` and the kernels it holds (by prim func name)."""
    lw = _Lowerer(graph)
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
    mod, kernels = to_relax(graph)
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
    """:class:`intq.kernels.IntOps` as Relax int64 ops: the transformer kernels are the
    reference's own code (:mod:`intq.kernels`), emitted op by op. ``>>`` on int64 is the
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
    from intq import kernels

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
