"""The ONNX Runtime backend's lowering: an integer-only intq graph as a standard ONNX model.

Only default-domain ONNX ops (opset 21), so the ``.onnx`` file runs on plain
ONNX Runtime with no intq at run time. Each IR op has one lowering in
:data:`LOWER`; the transformer kernels, tables and products of activations are written
once against the ``IntOps`` vocabulary (:mod:`intq.semantics.kernels`), which
:class:`_OnnxOps` emits as ONNX nodes. :func:`to_onnx` runs the table;
:mod:`intq.backends.onnxruntime` runs and saves the model. The choices, measured on
this x86 AVX2 CPU without VNNI (``benchmarks/ort_integer_ops_probe.py``):

- Integer convolutions and matrix products run as ``ConvInteger`` and
  ``MatMulInteger`` with **uint8 x uint8** operands: signed values are stored
  offset by 128 with a zero point of 128. That kernel is exact over the full
  8-bit range and as fast as any other here; the u8 x s8 kernel, a little
  faster for MatMul, saturates its 16-bit sums when both operands use their
  full range (``vpmaddubsw``) and would need 7-bit weights.
- Requantization ``(acc*M + 2^(S-1)) >> S`` needs an arithmetic shift, and
  ONNX's ``BitShift`` is unsigned-only. It is computed exactly as
  ``((uint64(acc*M) + 2^(S-1) + 2^63) >> S) - 2^(63-S)``: adding ``2^63`` makes
  every value non-negative (``|acc*M + 2^(S-1)| < 2^63`` is what the range
  analysis proves), where the logical shift is the floor division the
  arithmetic shift computes, and subtracting the shifted offset restores the
  sign (wrapping uint64/int64 casts, as ONNX Runtime implements them).
  ``S >= 64`` gives 0 (offset 0) and ``S <= 0`` folds ``2^-S`` into ``M``.
- Average pools sum with ``ConvInteger`` against a kernel of ones; the global
  one and ``QReduceSum`` with an int32 ``ReduceSum`` (exact: the range analysis proves
  the sum fits int32).
- 4-bit weights are saved packed two per byte as ONNX ``INT4`` initializers (opset 21)
  and widened by integer ``Cast``/``Add`` to the offset uint8 the kernels read; ONNX
  Runtime has no 4-bit integer conv or matmul, so they run as 8-bit ones, exactly.
- A 16-bit activation into ``QConv``, ``QGemm`` or ``QMatMul`` runs the 8-bit kernel
  once per byte plane (``x = 256 (hi - 128) + lo``), the two int32 sums joined in int64
  (:func:`_wide_product`); a ``QBatchMatMul`` with a 16-bit operand is an ``int32``
  ``MatMul`` (the range analysis proves its accumulator fits).
- ``Quantize``/``Dequantize`` are ``QuantizeLinear``/``DequantizeLinear``, which
  compute exactly what the reference does (float32 division, round half to
  even, saturation; float32 product). NaN, which ``QuantizeLinear`` sends to the
  range's bottom, is first replaced by 0 (``IsNaN``, ``Where``): it quantizes to 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from intq.errors import IntqError, UnsupportedOpError
from intq.ir.graph import Graph, Node, Value
from intq.ir.int4 import fits_int4, pack_int4
from intq.ir.types import DType
from intq.ops import Trait, ops_with
from intq.passes.range_analysis import ValueRanges, value_ranges
from intq.semantics import kernels
from intq.semantics.numerics import clip_bounds
from intq.tables import RuleTable

OPSET = 21
IR_VERSION = 10
"""ONNX Runtime 1.31 reads IR versions up to 13; opset 21 needs 10."""

_ONNX_TYPE = {
    DType.F32: TensorProto.FLOAT,
    DType.F64: TensorProto.DOUBLE,
    DType.F16: TensorProto.FLOAT16,
    DType.I8: TensorProto.INT8,
    DType.U8: TensorProto.UINT8,
    DType.I16: TensorProto.INT16,
    DType.U16: TensorProto.UINT16,
    DType.I32: TensorProto.INT32,
    DType.U32: TensorProto.UINT32,
    DType.I64: TensorProto.INT64,
    DType.U64: TensorProto.UINT64,
    DType.BOOL: TensorProto.BOOL,
}


OFFSET = 128
"""Signed 8-bit activations are stored as uint8 ``q + 128`` with zero point 128."""


class _Builder:
    """Collects ONNX nodes and initializers while the IR graph is lowered.

    ``stored`` maps an IR value to the ONNX tensor holding it and that tensor's
    zero point: signed 8-bit activations live offset by 128 in uint8, which is
    what the u8 x u8 kernels read, so no conversion runs between layers.
    """

    def __init__(self, graph: Graph, intervals: ValueRanges):
        self.graph = graph
        self.intervals = intervals
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.names: set[str] = {v.name for v in graph.values()}
        self.stored: dict[str, tuple[str, int]] = {}

    def fresh(self, base: str) -> str:
        """A tensor name not used yet."""
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}.{i}"
        self.names.add(name)
        return name

    def const(self, array: npt.ArrayLike, base: str) -> str:
        """An initializer holding ``array``; returns its name."""
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, node: Node, **attrs: Any) -> str:
        """Add one ONNX node with one output named from ``base``; returns the output name."""
        out = self.fresh(base)
        self.add(op_type, inputs, [out], node, **attrs)
        return out

    def add(
        self, op_type: str, inputs: list[str], outputs: list[str], node: Node, **attrs: Any
    ) -> None:
        """Add one ONNX node writing ``outputs``."""
        name = self.fresh(f"{node.label()}/{op_type}")
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))

    # ----- how values are stored ------------------------------------------------------

    @staticmethod
    def offset(value: Value) -> bool:
        """True for the values stored offset by 128: signed 8-bit activations."""
        return value.type.dtype is DType.I8 and value.const is None

    def tensor(self, value: Value) -> tuple[str, int]:
        """The ONNX tensor holding ``value`` and its zero point."""
        return self.stored.get(value.name, (value.name, 0))

    def output(self, value: Value) -> tuple[str, int]:
        """Where to write ``value``: the tensor name and its zero point."""
        if not self.offset(value):
            return value.name, 0
        name = self.fresh(value.name + ".u8")
        self.stored[value.name] = (name, OFFSET)
        return name, OFFSET

    def storage_type(self, value: Value, zero_point: int) -> int:
        """The ONNX element type of ``value`` as stored."""
        return TensorProto.UINT8 if zero_point else _ONNX_TYPE[value.type.dtype]

    def u8(self, value: Value, node: Node) -> tuple[str, int]:
        """``value`` as uint8 for the u8 x u8 kernels, and its zero point."""
        name, zp = self.tensor(value)
        if value.type.dtype is DType.U8 or zp:
            return name, zp
        if value.type.dtype is DType.I8 and value.const is not None:
            return self.weight_u8(value, value.const, node), OFFSET
        raise UnsupportedOpError(
            f"{node.op} on {value.type} in the ONNX Runtime backend",
            node=node.label(),
            hint="the ONNX Runtime backend runs 8-bit (or narrower) activations and weights; "
            "16-bit activations only into QConv, QGemm, QMatMul and QBatchMatMul",
        )

    def weight_u8(self, value: Value, weights: np.ndarray, node: Node) -> str:
        """Signed constant ``weights`` (``value``'s data, maybe transposed) offset to uint8.

        4-bit weights are stored as an ONNX INT4 initializer, two per byte, and widened by
        ``Cast`` to int16, ``+ 128``, ``Cast`` to uint8: integer ops on a constant, which
        ONNX Runtime folds once when it loads the model.
        """
        quant = value.type.quant
        if quant is not None and quant.bits <= 4 and fits_int4(weights, signed=True):
            packed = self.fresh(value.name + ".i4")
            self.initializers.append(
                helper.make_tensor(
                    packed, TensorProto.INT4, weights.shape, pack_int4(weights), raw=True
                )
            )
            wide = self.op("Cast", [packed], value.name + ".i16", node, to=TensorProto.INT16)
            moved = self.op("Add", [wide, self.const(np.int16(OFFSET), "offset")], wide + "+", node)
            return self.op("Cast", [moved], value.name + ".u8", node, to=TensorProto.UINT8)
        data = (weights.astype(np.int16) + OFFSET).astype(np.uint8)
        return self.const(data, value.name + ".u8")

    def convert(self, source: str, target: str, delta: int, to: int, node: Node) -> None:
        """``target = cast(source + delta)`` through int16: moves between int8 and offset uint8."""
        wide = self.op("Cast", [source], target + ".i16", node, to=TensorProto.INT16)
        moved = self.op("Add", [wide, self.const(np.int16(delta), "delta")], target + ".d", node)
        self.add("Cast", [moved], [target], node, to=to)

    def zero_point(self, zp: int) -> str:
        """A uint8 zero-point constant."""
        return self.const(np.uint8(zp), "zp")

    # ----- requantization --------------------------------------------------------------

    def shift_round(
        self,
        product: str,
        shifts: list[int],
        minus: npt.ArrayLike,
        shape: tuple[int, ...],
        node: Node,
    ) -> str:
        """``(product - minus + 2^(S-1)) >> S`` for int64 ``product``, per channel as ``shape``.

        ``minus`` removes input zero points (``zp * M``) for free: it joins the constant
        added in uint64 (see the module docstring for the exact formulation).
        """
        s = np.asarray(shifts, np.int64)
        minus = np.broadcast_to(np.asarray(minus, np.int64).reshape(-1), s.shape)
        one = np.uint64(1)
        rounding = np.where(s >= 1, one << np.maximum(s - 1, 0).astype(np.uint64), 0)
        added = (
            rounding.astype(np.uint64) + np.uint64(1 << 63) - np.asarray(minus).astype(np.uint64)
        )
        back = np.where(s <= 63, one << (63 - np.minimum(s, 63)).astype(np.uint64), 0)
        as_u64 = self.op("Cast", [product], f"{product}.u64", node, to=TensorProto.UINT64)
        biased = self.op(
            "Add", [as_u64, self.const(added.reshape(shape), "round")], f"{product}.b", node
        )
        shift_by = self.const(np.minimum(s, 64).astype(np.uint64).reshape(shape), "shift")
        shifted = self.op("BitShift", [biased, shift_by], f"{product}.s", node, direction="RIGHT")
        self.back = back.astype(np.int64).reshape(shape)
        return self.op("Cast", [shifted], f"{product}.i64", node, to=TensorProto.INT64)

    def finish(self, shifted: str, node: Node, magnitude: int) -> None:
        """Undo the uint64 offset, clamp to ``[lo, hi]`` and store the node's output.

        ``magnitude`` bounds ``|result|`` before the clamp (from the range analysis).
        """
        out = node.output
        name, zp = self.output(out)
        unbias = self.const(self.back - zp, "unbias")
        value = self.op("Sub", [shifted, unbias], f"{name}.r", node)
        lo = self.const(np.int64(node.attrs["lo"] + zp), "lo")
        hi = self.const(np.int64(node.attrs["hi"] + zp), "hi")
        if magnitude + zp < 2**31:
            clipped = self.op("Clip", [value, lo, hi], f"{name}.clip", node)
        else:
            # ONNX Runtime 1.31's int64 Clip, Max and Min are wrong beyond +-2^31 on this
            # AVX2 CPU (3221225471 clipped to [0, 255] gave 0); comparisons and Where are
            # exact, if slower.
            below = self.op("Less", [value, lo], f"{name}.below", node)
            raised = self.op("Where", [below, lo, value], f"{name}.raised", node)
            above = self.op("Greater", [raised, hi], f"{name}.above", node)
            clipped = self.op("Where", [above, hi, raised], f"{name}.clip", node)
        self.add("Cast", [clipped], [name], node, to=self.storage_type(out, zp))

    def magnitude(self, value: Value) -> int:
        """The largest ``|x|`` the range analysis allows for integer ``value``."""
        low, high = self.intervals.get(value, _dtype_range(value))
        return max(abs(low), abs(high))


def _dtype_range(value: Value) -> tuple[int, int]:
    info = np.iinfo(value.type.dtype.numpy)
    return int(info.min), int(info.max)


def _channel_shape(value: Value, axis: int, count: int) -> tuple[int, ...]:
    shape = [1] * value.type.rank
    if count > 1:
        shape[axis] = count
    return tuple(shape)


Lowering = Callable[[_Builder, Node], None]
LOWER: RuleTable[Lowering] = RuleTable()
"""IR op -> the function writing its ONNX nodes."""
_lower = LOWER.register


def _input(node: Node, index: int = 0) -> Value:
    value = node.inputs[index]
    assert value is not None
    return value


@_lower("Quantize")
def _quantize(b: _Builder, node: Node) -> None:
    out = node.output
    quant = out.type.quant
    assert quant is not None
    name, zp = b.output(out)
    zero = b.const(np.asarray(zp, np.uint8 if zp else out.type.dtype.numpy), "zp")
    scale = b.const(np.float32(node.attrs["scale"]), "scale")
    x = _input(node).name
    if _input(node).type.dtype is not DType.F32:  # divided in float32, as the reference
        x = b.op("Cast", [x], name + ".f32", node, to=TensorProto.FLOAT)
    # QuantizeLinear saturates NaN to the range's bottom: give it the code 0 first.
    nan = b.op("IsNaN", [x], name + ".nan", node)
    x = b.op("Where", [nan, b.const(np.float32(0), "zero"), x], name + ".real", node)
    if quant.bits == out.type.dtype.bits:
        b.add("QuantizeLinear", [x, scale, zero], [name], node)
        return
    full = b.op("QuantizeLinear", [x, scale, zero], name + ".full", node)
    stored = np.uint8 if zp else out.type.dtype.numpy
    if np.dtype(stored).itemsize == 1:
        lo = b.const(np.asarray(quant.qmin + zp, stored), "lo")
        hi = b.const(np.asarray(quant.qmax + zp, stored), "hi")
        b.add("Clip", [full, lo, hi], [name], node)
        return
    # ONNX Runtime has no 16-bit Clip: clamp a 12-bit value (say) in int32.
    wide = b.op("Cast", [full], name + ".i32", node, to=TensorProto.INT32)
    lo, hi = (b.const(np.int32(v), k) for v, k in ((quant.qmin, "lo"), (quant.qmax, "hi")))
    clipped = b.op("Clip", [wide, lo, hi], name + ".clip", node)
    b.add("Cast", [clipped], [name], node, to=_ONNX_TYPE[out.type.dtype])


@_lower("Dequantize")
def _dequantize(b: _Builder, node: Node) -> None:
    x = _input(node)
    q = x.type.quant
    assert q is not None
    name, zp = b.tensor(x)
    scale = b.const(np.asarray(q.scale if q.axis is not None else q.scale[0], np.float32), "scale")
    inputs = [name, scale] + ([b.zero_point(zp)] if zp else [])
    attrs = {"axis": q.axis} if q.axis is not None else {}
    b.add("DequantizeLinear", inputs, [node.output.name], node, **attrs)


def _add_bias(b: _Builder, acc: str, node: Node, bias: Value | None, axis: int) -> None:
    out = node.output.name
    if bias is None:
        b.add("Identity", [acc], [out], node)
        return
    assert bias.const is not None
    shape = _channel_shape(node.output, axis, bias.type.size)
    b.add("Add", [acc, b.const(bias.const.reshape(shape), bias.name)], [out], node)


@_lower("QConv")
def _qconv(b: _Builder, node: Node) -> None:
    x, w = _input(node, 0), _input(node, 1)
    attrs = node.attrs
    geometry = {
        "strides": list(attrs["strides"]),
        "pads": list(attrs["pads"]),
        "dilations": list(attrs["dilations"]),
        "group": attrs["group"],
    }
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    w_u8, w_zp = b.u8(w, node)
    if x.type.dtype in _WIDE:
        assert w.const is not None

        def conv(byte: str, zp: int, base: str) -> str:
            inputs = [byte, w_u8, b.zero_point(zp), b.zero_point(w_zp)]
            return b.op("ConvInteger", inputs, base, node, **geometry)

        _wide_product(b, x, w.const, 0, conv, node, bias, 1)
        return
    x_u8, x_zp = b.u8(x, node)
    acc = b.op(
        "ConvInteger",
        [x_u8, w_u8, b.zero_point(x_zp), b.zero_point(w_zp)],
        node.output.name + ".acc",
        node,
        **geometry,
    )
    _add_bias(b, acc, node, bias, 1)


@_lower("QConvTranspose")
def _qconv_transpose(b: _Builder, node: Node) -> None:
    """A ``ConvInteger`` (ONNX Runtime has no integer transposed convolution): the input with
    ``stride - 1`` zeros (its zero point) stuffed between elements, the weights flipped and
    regrouped to ``(M, C / group, k...)``, each side padded by ``dilation * (k - 1)`` less the
    transposed conv's pads (plus ``output_padding`` at the end); a pad that would be negative
    crops the int32 result instead. Data movement and one exact integer convolution."""
    x, w = _input(node, 0), _input(node, 1)
    assert w.const is not None
    x_u8, x_zp = b.u8(x, node)
    attrs = node.attrs
    group, strides, dilations = attrs["group"], attrs["strides"], attrs["dilations"]
    shape = x.type.shape
    spatial = len(shape) - 2
    out = node.output.name
    if any(s > 1 for s in strides):
        # (N, C, H, W) -> (N, C, H, 1, W, 1) -> pad each new axis to its stride with the zero
        # point -> (N, C, H s, W s) -> drop the trailing s - 1 zeros.
        split = [*shape[:2], *(d for size in shape[2:] for d in (size, 1))]
        pads = [0] * len(split) * 2
        for i, s in enumerate(strides):
            pads[len(split) + 3 + 2 * i] = s - 1
        tall = b.op(
            "Reshape", [x_u8, b.const(np.asarray(split, np.int64), "shape")], out + ".split", node
        )
        value = b.const(np.asarray(x_zp, np.uint8), "zp")
        padded = b.op(
            "Pad",
            [tall, b.const(np.asarray(pads, np.int64), "pads"), value],
            out + ".stuffed",
            node,
        )
        merged = [*shape[:2], *(size * s for size, s in zip(shape[2:], strides))]
        flat = b.op(
            "Reshape", [padded, b.const(np.asarray(merged, np.int64), "shape")], out + ".flat", node
        )
        ends = [(size - 1) * s + 1 for size, s in zip(shape[2:], strides)]
        x_u8 = b.op(
            "Slice",
            [
                flat,
                b.const(np.zeros(spatial, np.int64), "starts"),
                b.const(np.asarray(ends, np.int64), "ends"),
                b.const(np.arange(2, 2 + spatial, dtype=np.int64), "axes"),
            ],
            out + ".dilated",
            node,
        )
    c, per_group = w.const.shape[:2]
    kernel = w.const.shape[2:]
    regrouped = w.const.reshape(group, c // group, per_group, *kernel).swapaxes(1, 2)
    flipped = np.flip(
        regrouped.reshape(group * per_group, c // group, *kernel), tuple(range(2, 2 + spatial))
    )
    w_u8 = b.weight_u8(w, np.ascontiguousarray(flipped), node)
    conv_pads: list[tuple[int, int]] = []
    crop: list[tuple[int, int]] = []
    for i in range(spatial):
        reach = dilations[i] * (kernel[i] - 1)
        begin = reach - attrs["pads"][i]
        end = reach - attrs["pads"][i + spatial] + attrs["output_padding"][i]
        conv_pads.append((max(0, begin), max(0, end)))
        crop.append((max(0, -begin), max(0, -end)))
    acc = b.op(
        "ConvInteger",
        [x_u8, w_u8, b.zero_point(x_zp), b.zero_point(OFFSET)],
        out + ".acc",
        node,
        dilations=list(dilations),
        group=group,
        pads=[p[0] for p in conv_pads] + [p[1] for p in conv_pads],
    )
    if any(a or z for a, z in crop):
        full = [size + a + z for size, (a, z) in zip(node.output.type.shape[2:], crop)]
        acc = b.op(
            "Slice",
            [
                acc,
                b.const(np.asarray([a for a, _ in crop], np.int64), "starts"),
                b.const(np.asarray([f - z for f, (_, z) in zip(full, crop)], np.int64), "ends"),
                b.const(np.arange(2, 2 + spatial, dtype=np.int64), "axes"),
            ],
            out + ".cropped",
            node,
        )
    _add_bias(b, acc, node, node.inputs[2] if len(node.inputs) > 2 else None, 1)


@_lower("QGemm", "QMatMul")
def _qmatmul(b: _Builder, node: Node) -> None:
    a = _input(node, 0)
    w = _input(node, 1)
    assert w.const is not None
    weights = np.ascontiguousarray(w.const.T if node.attrs.get("transB") else w.const)
    w_u8 = b.weight_u8(w, weights, node)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    channel_axis = node.output.type.rank - 1
    if a.type.dtype in _WIDE:

        def matmul(byte: str, zp: int, base: str) -> str:
            inputs = [byte, w_u8, b.zero_point(zp), b.zero_point(OFFSET)]
            return b.op("MatMulInteger", inputs, base, node)

        _wide_product(b, a, weights, -1, matmul, node, bias, channel_axis)
        return
    a_u8, a_zp = b.u8(a, node)
    acc = b.op(
        "MatMulInteger",
        [a_u8, w_u8, b.zero_point(a_zp), b.zero_point(OFFSET)],
        node.output.name + ".acc",
        node,
    )
    _add_bias(b, acc, node, bias, channel_axis)


_WIDE = (DType.I16, DType.U16)
"""Activations that reach the u8 x u8 kernels as two byte planes (:func:`_wide_product`)."""

BytePlaneProduct = Callable[[str, int, str], str]
"""``(uint8 plane, its zero point, output base name) -> int32 accumulator`` of one plane."""


def _byte_planes(b: _Builder, x: Value, node: Node) -> list[tuple[str, int]]:
    """16-bit ``x`` as two uint8 planes with zero points, high byte first.

    ``x + 2^15 = 256 hi + lo`` (``hi``, ``lo`` bytes), so ``x = 256 (hi - 128) + lo``;
    unsigned ``x = 256 hi + lo``. A zero in ``x`` is ``hi = zp``, ``lo = 0``: exactly what
    ``ConvInteger`` pads each plane with (its input zero point), so the planes' padded
    sums add up to the padded sum of ``x``.
    """
    name, _ = b.tensor(x)
    base = node.output.name
    signed = x.type.dtype is DType.I16
    wide = b.op("Cast", [name], base + ".i32", node, to=TensorProto.INT32)
    if signed:
        wide = b.op("Add", [wide, b.const(np.int32(1 << 15), "half")], base + ".biased", node)
    u32 = b.op("Cast", [wide], base + ".u32", node, to=TensorProto.UINT32)
    hi = b.op(
        "BitShift", [u32, b.const(np.uint32(8), "eight")], base + ".hi16", node, direction="RIGHT"
    )
    lo = b.op("BitwiseAnd", [u32, b.const(np.uint32(255), "low_byte")], base + ".lo16", node)
    return [
        (b.op("Cast", [part], part + ".u8", node, to=TensorProto.UINT8), zp)
        for part, zp in ((hi, OFFSET if signed else 0), (lo, 0))
    ]


_PLANE_MAX = 255
"""The largest ``|byte - zp|`` of either plane: ``hi - 128`` in [-128, 127], ``lo`` in [0, 255]."""


def _wide_product(
    b: _Builder,
    x: Value,
    weights: np.ndarray,
    w_axis: int,
    product: BytePlaneProduct,
    node: Node,
    bias: Value | None,
    channel_axis: int,
) -> None:
    """A 16-bit activation times 8-bit ``weights`` as two exact u8 x u8 products, one per
    byte plane of ``x`` (:func:`_byte_planes`), joined with the bias in int64.

    Exact: each plane's int32 sum is bounded by ``255 * sum|w|`` over the weights of one
    output channel (axis ``w_axis`` of ``weights``), checked here to fit int32; the int64 join
    ``256 p_hi + p_lo + bias`` cannot overflow (``|.| < 2^41``) and equals the accumulator
    the range analysis proved to fit int32, so the final ``Cast`` to int32 is exact too.
    """
    taps = np.moveaxis(np.abs(weights.astype(np.int64)), w_axis, 0)
    bound = _PLANE_MAX * int(taps.reshape(taps.shape[0], -1).sum(axis=1).max(initial=0))
    if bound >= 2**31:
        raise UnsupportedOpError(
            f"{node.op} on {x.type} in the ONNX Runtime backend: a byte plane's int32 sum "
            f"can reach {bound}",
            node=node.label(),
            hint="use fewer activation bits for this layer, or split its reduction",
        )
    out = node.output.name
    partial = [
        b.op("Cast", [product(byte, zp, byte + ".acc")], byte + ".i64", node, to=TensorProto.INT64)
        for byte, zp in _byte_planes(b, x, node)
    ]
    high = b.op("Mul", [partial[0], b.const(np.int64(256), "byte")], out + ".high", node)
    total = b.op("Add", [high, partial[1]], out + ".total", node)
    if bias is not None:
        assert bias.const is not None
        shape = _channel_shape(node.output, channel_axis, bias.type.size)
        b_i64 = b.const(bias.const.astype(np.int64).reshape(shape), bias.name + ".i64")
        total = b.op("Add", [total, b_i64], out + ".biased", node)
    b.add("Cast", [total], [out], node, to=TensorProto.INT32)


@_lower("QBatchMatMul")
def _qbatch_matmul(b: _Builder, node: Node) -> None:
    """Two activations: ``MatMulInteger`` on 8-bit ones; an ``int32`` ``MatMul`` where one
    is wider (exact: the range analysis proved the accumulator fits int32)."""
    operands = [_input(node, i) for i in (0, 1)]
    if any(v.type.dtype in _WIDE for v in operands):
        a_i32, b_i32 = (_centred(b, v, node, np.int32) for v in operands)
        b.add("MatMul", [a_i32, b_i32], [node.output.name], node)
        return
    (a_u8, a_zp), (b_u8, b_zp) = (b.u8(v, node) for v in operands)
    b.add(
        "MatMulInteger",
        [a_u8, b_u8, b.zero_point(a_zp), b.zero_point(b_zp)],
        [node.output.name],
        node,
    )


@_lower("Gather")
def _gather(b: _Builder, node: Node) -> None:
    """An embedding lookup (a constant table, offset like every int8 activation), or the data
    movement of a nearest Resize, a class token or a mask (an activation or a raw integer
    tensor, however it is stored)."""
    data, index = _input(node, 0), b.tensor(_input(node, 1))[0]
    table = b.u8(data, node)[0] if data.const is not None else b.tensor(data)[0]
    out, _ = b.output(node.output)
    b.add("Gather", [table, index], [out], node, axis=node.attrs["axis"])


@_lower("Cast", "Not")
def _mask_flag(b: _Builder, node: Node) -> None:
    """The 0/1 attention keep mask: ``Cast`` to bool or u8, and ``Not``."""
    name = b.tensor(_input(node))[0]
    if node.op == "Not":
        b.add("Not", [name], [node.output.name], node)
        return
    b.add("Cast", [name], [node.output.name], node, to=_ONNX_TYPE[node.output.type.dtype])


@_lower("Add", "Sub", "Mul", "Equal")
def _raw_arithmetic(b: _Builder, node: Node) -> None:
    """Index arithmetic on raw integers (position ids from token ids): the same ONNX op, exact
    (the range analysis proves the results fit their dtype)."""
    inputs = [b.tensor(_input(node, i))[0] for i in (0, 1)]
    b.add(node.op, inputs, [node.output.name], node)


@_lower("GatherElements")
def _gather_elements(b: _Builder, node: Node) -> None:
    """Raw integers moved by raw indices: ONNX ``GatherElements`` (the data cut to the
    indices' extent on the other axes, as the IR allows and ONNX does not)."""
    data, index = _input(node, 0), _input(node, 1)
    name = _leading(b, node, data, index.type.shape, node.attrs["axis"])
    b.add(
        "GatherElements",
        [name, b.tensor(index)[0]],
        [node.output.name],
        node,
        axis=node.attrs["axis"],
    )


def _leading(b: _Builder, node: Node, data: Value, shape: tuple[int, ...], axis: int) -> str:
    """``data`` cut to ``shape`` on every axis but ``axis``."""
    name = b.tensor(data)[0]
    ends = [d if i == axis else n for i, (n, d) in enumerate(zip(shape, data.type.shape))]
    if list(ends) == list(data.type.shape):
        return name
    starts = b.const(np.zeros(len(ends), np.int64), f"{node.output.name}.starts")
    stops = b.const(np.asarray(ends, np.int64), f"{node.output.name}.ends")
    return b.op("Slice", [name, starts, stops], f"{node.output.name}.data", node)


@_lower("CumSum")
def _cumsum(b: _Builder, node: Node) -> None:
    """A running sum of raw integers (the count of real tokens): ONNX ``CumSum``, in int64
    for the types ONNX Runtime's kernel lacks (its int32 and int64 run as they are)."""
    x = _input(node)
    name = b.tensor(x)[0]
    native = x.type.dtype in (DType.I32, DType.I64)
    if not native:
        name = b.op("Cast", [name], f"{node.output.name}.i64", node, to=TensorProto.INT64)
    axis = b.const(np.asarray(node.attrs["axis"], np.int64), f"{node.output.name}.axis")
    attrs = {"exclusive": node.attrs["exclusive"], "reverse": node.attrs["reverse"]}
    if native:
        b.add("CumSum", [name, axis], [node.output.name], node, **attrs)
        return
    total = b.op("CumSum", [name, axis], f"{node.output.name}.sum", node, **attrs)
    b.add("Cast", [total], [node.output.name], node, to=_ONNX_TYPE[node.output.type.dtype])


# ----- the transformer kernels: intq.semantics.kernels run on ONNX nodes -----------------


class _OnnxOps:
    """:class:`intq.semantics.kernels.IntOps` writing int64 ONNX nodes (tensor names as handles).

    The shifts follow the module docstring: an arithmetic shift by a constant through
    uint64 with a ``2^63`` offset, run-time shifts with ``BitShift`` on non-negative
    values; comparisons and ``Where`` instead of int64 ``Max``/``Min``/``Clip``.
    """

    def __init__(self, b: _Builder, node: Node):
        self.b, self.node = b, node
        self.base = node.output.name

    def _op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        return self.b.op(op_type, inputs, f"{self.base}.{op_type.lower()}", self.node, **attrs)

    def _cast(self, x: str, to: int) -> str:
        return self._op("Cast", [x], to=to)

    def const(self, value: npt.ArrayLike) -> str:
        return self.b.const(np.asarray(value, np.int64), "k")

    def add(self, a: str, b: str) -> str:
        return self._op("Add", [a, b])

    def sub(self, a: str, b: str) -> str:
        return self._op("Sub", [a, b])

    def mul(self, a: str, b: str) -> str:
        return self._op("Mul", [a, b])

    def sra(self, x: str, shift: npt.ArrayLike) -> str:
        s = np.asarray(shift, np.int64)
        if not s.any():
            return x
        as_u64 = self._cast(x, TensorProto.UINT64)
        biased = self._op("Add", [as_u64, self.b.const(np.uint64(1 << 63), "offset")])
        shifted = self._op(
            "BitShift", [biased, self.b.const(s.astype(np.uint64), "shift")], direction="RIGHT"
        )
        back = self._cast(shifted, TensorProto.INT64)
        return self._op("Sub", [back, self.const(np.left_shift(np.int64(1), 63 - s))])

    def _shift_var(self, x: str, shift: str, direction: str) -> str:
        amount = self._cast(self._op("Min", [shift, self.const(63)]), TensorProto.UINT64)
        shifted = self._op(
            "BitShift", [self._cast(x, TensorProto.UINT64), amount], direction=direction
        )
        return self._cast(shifted, TensorProto.INT64)

    def srl_var(self, x: str, shift: str) -> str:
        return self._shift_var(x, shift, "RIGHT")

    def shl_var(self, x: str, shift: str) -> str:
        return self._shift_var(x, shift, "LEFT")

    def less(self, a: str, b: str) -> str:
        return self._cast(self._op("Less", [a, b]), TensorProto.INT64)

    def where(self, cond: str, a: str, b: str) -> str:
        return self._op("Where", [self._cast(cond, TensorProto.BOOL), a, b])

    def _axes(self, axis: int) -> str:
        return self.b.const(np.asarray([axis], np.int64), "axes")

    def reduce_max(self, x: str, axis: int) -> str:
        return self._op("ReduceMax", [x, self._axes(axis)], keepdims=1)

    def reduce_sum(self, x: str, axis: int) -> str:
        return self._op("ReduceSum", [x, self._axes(axis)], keepdims=1)

    def count_at_least(self, x: str, thresholds: np.ndarray) -> str:
        column = self._op("Unsqueeze", [x, self._axes(-1)])
        flags = self._op("GreaterOrEqual", [column, self.const(thresholds)])
        return self._op(
            "ReduceSum", [self._cast(flags, TensorProto.INT64), self._axes(-1)], keepdims=0
        )

    def gather(self, table: np.ndarray, index: str) -> str:
        return self._op("Gather", [self.const(table), index], axis=0)

    def take(self, x: str, index: np.ndarray, axis: int) -> str:
        return self._op("Gather", [x, self.const(index)], axis=axis)

    def div(self, a: str, b: str) -> str:
        return self._op("Div", [a, b])


def _centred(b: _Builder, value: Value, node: Node, wide: type = np.int64) -> str:
    """``value`` as int64 (or the ``wide`` numpy integer type) with its zero point removed."""
    name, zp = b.tensor(value)
    dtype = np.dtype(wide)
    suffix = f".i{8 * dtype.itemsize}"
    cast = b.op(
        "Cast", [name], value.name + suffix, node, to=helper.np_dtype_to_tensor_dtype(dtype)
    )
    if not zp:
        return cast
    return b.op("Sub", [cast, b.const(dtype.type(zp), "zp")], value.name + ".centred", node)


def _store(b: _Builder, result: str, node: Node) -> None:
    """Write the kernel's int64 ``result`` (already clamped) as the node's output."""
    out = node.output
    name, zp = b.output(out)
    if zp:
        result = b.op("Add", [result, b.const(np.int64(zp), "zp")], name + ".shifted", node)
    b.add("Cast", [result], [name], node, to=b.storage_type(out, zp))


@_lower(*ops_with(Trait.KERNEL))
def _transformer_kernel(b: _Builder, node: Node) -> None:
    keep = node.inputs[1] if len(node.inputs) > 1 else None
    x = _centred(b, _input(node), node)
    mask = None if keep is None else _centred(b, keep, node)
    _store(b, kernels.run_node(_OnnxOps(b, node), node, x, mask), node)


@_lower("QLookup")
def _qlookup(b: _Builder, node: Node) -> None:
    """One ``Gather``: the stored codes index the table directly (an int8 stored offset by
    128 is its own index), whose entries hold the output's stored codes."""
    x = _input(node)
    name, zp = b.tensor(x)
    out_name, out_zp = b.output(node.output)
    table = np.asarray(node.attrs["table"], np.int64) + out_zp
    index = b.op("Cast", [name], x.name + ".i64", node, to=TensorProto.INT64)
    offset = kernels.lookup_offset(x.type.dtype.numpy) - zp
    result = kernels.lookup(_OnnxOps(b, node), index, table, offset)
    b.add("Cast", [result], [out_name], node, to=b.storage_type(node.output, out_zp))


def _requantized_pair(kernel: Callable[..., Any]) -> Lowering:
    """The lowering of an op whose kernel takes two integer operands and the requantization
    attributes, in int64 (``QMul``: :func:`~intq.semantics.kernels.multiply`; ``QDiv``:
    :func:`~intq.semantics.kernels.divide`, Newton's reciprocal of the normalised divisor as
    ``Mul``/``BitShift``, no ``Div``)."""

    def lower(b: _Builder, node: Node) -> None:
        attrs = node.attrs
        a, c = (_centred(b, _input(node, i), node) for i in (0, 1))
        limits = (attrs[k] for k in ("multiplier", "shift", "lo", "hi"))
        _store(b, kernel(_OnnxOps(b, node), a, c, *limits), node)

    return lower


_lower("QMul")(_requantized_pair(kernels.multiply))
_lower("QDiv")(_requantized_pair(kernels.divide))


@_lower("QReduceL2")
def _qreduce_l2(b: _Builder, node: Node) -> None:
    """:func:`~intq.semantics.kernels.l2_norm` in int64: ``ReduceSum`` of the squares, the
    leading-bit count and Newton's inverse square root as ``Mul``/``BitShift``, no division."""
    a = node.attrs
    x = _centred(b, _input(node), node)
    result = kernels.l2_norm(
        _OnnxOps(b, node), x, a["axes"], a["multiplier"], a["shift"], a["lo"], a["hi"]
    )
    _store(b, result, node)


@_lower("QMask")
def _qmask(b: _Builder, node: Node) -> None:
    """:func:`~intq.semantics.kernels.mask` in int64: the stored codes less their zero
    point times the 0/1 keep, stored at the output's zero point (a removed int8 is 128)."""
    x, keep = (_centred(b, _input(node, i), node) for i in (0, 1))
    _store(b, kernels.mask(_OnnxOps(b, node), x, keep), node)


@_lower("QDivCount")
def _qdiv_count(b: _Builder, node: Node) -> None:
    """:func:`~intq.semantics.kernels.divide_by_count`: each count ``Gather``s its multiplier,
    rounding term and shift from constant tables; int64 ``Mul``/``Add``, the arithmetic
    shift by a run-time amount through a ``2^62`` offset and a logical ``BitShift``."""
    attrs = node.attrs
    acc, count = (_centred(b, _input(node, i), node) for i in (0, 1))
    result = kernels.divide_by_count(
        _OnnxOps(b, node), acc, count, attrs["multiplier"], attrs["shift"], attrs["lo"], attrs["hi"]
    )
    _store(b, result, node)


@_lower("QPRelu")
def _qprelu(b: _Builder, node: Node) -> None:
    a = node.attrs
    x = _input(node)
    result = kernels.prelu(
        _OnnxOps(b, node),
        _centred(b, x, node),
        a["multiplier_pos"],
        a["multiplier_neg"],
        a["axis"],
        x.type.rank,
        a["shift"],
        a["lo"],
        a["hi"],
    )
    _store(b, result, node)


@_lower("QResize")
def _qresize(b: _Builder, node: Node) -> None:
    """:func:`~intq.semantics.kernels.resize_linear`: per axis two ``Gather`` of constant
    positions, integer ``Mul`` by the constant weights and an ``Add`` (int64, exact; the
    range analysis proves the result fits the int32 accumulator it is cast to)."""
    x = _input(node)
    result = kernels.resize_linear(
        _OnnxOps(b, node),
        _centred(b, x, node),
        kernels.resize_taps(node.attrs),
        x.type.rank,
        node.attrs["frac_bits"],
    )
    _store(b, result, node)


@_lower("QGlobalAveragePool")
def _qglobal_avgpool(b: _Builder, node: Node) -> None:
    x = _input(node)
    name, zp = b.tensor(x)
    wide = b.op("Cast", [name], x.name + ".i32", node, to=TensorProto.INT32)
    axes = b.const(np.arange(2, x.type.rank, dtype=np.int64), "axes")
    if not zp:
        b.add("ReduceSum", [wide, axes], [node.output.name], node, keepdims=1)
        return
    total = b.op("ReduceSum", [wide, axes], node.output.name + ".sum", node, keepdims=1)
    count = int(np.prod(x.type.shape[2:]))
    b.add("Sub", [total, b.const(np.int32(count * zp), "zp_sum")], [node.output.name], node)


@_lower("QReduceSum")
def _qreduce_sum(b: _Builder, node: Node) -> None:
    """An int32 ``ReduceSum`` (exact: the range analysis proves the sum fits int32), less
    ``N * zp`` for a value stored offset."""
    x = _input(node)
    name, zp = b.tensor(x)
    axes = node.attrs["axes"]
    wide = b.op("Cast", [name], x.name + ".i32", node, to=TensorProto.INT32)
    keep = node.attrs["keepdims"]
    axes_const = b.const(np.asarray(axes, np.int64), "axes")
    if not zp:
        b.add("ReduceSum", [wide, axes_const], [node.output.name], node, keepdims=keep)
        return
    total = b.op("ReduceSum", [wide, axes_const], node.output.name + ".sum", node, keepdims=keep)
    count = int(np.prod([x.type.shape[a] for a in axes]))
    b.add("Sub", [total, b.const(np.int32(count * zp), "zp_sum")], [node.output.name], node)


@_lower("QAveragePool")
def _qavgpool(b: _Builder, node: Node) -> None:
    x = _input(node)
    x_u8, x_zp = b.u8(x, node)
    channels = x.type.shape[1]
    kernel = tuple(node.attrs["kernel_shape"])
    ones = b.const(np.ones((channels, 1, *kernel), np.uint8), "ones")
    b.add(
        "ConvInteger",
        [x_u8, ones, b.zero_point(x_zp), b.zero_point(0)],
        [node.output.name],
        node,
        strides=list(node.attrs["strides"]),
        group=channels,
    )


@_lower("Requantize")
def _requantize(b: _Builder, node: Node) -> None:
    x = _input(node)
    name, zp = b.tensor(x)
    attrs = node.attrs
    # S <= 0: no rounding; 2^-S joins the multiplier (the range analysis bounds the product).
    multipliers = np.asarray(
        [m << max(0, -s) for m, s in zip(attrs["multiplier"], attrs["shift"])], np.int64
    )
    shifts = [max(0, s) for s in attrs["shift"]]
    shape = _channel_shape(x, attrs["axis"], len(multipliers))
    wide = b.op("Cast", [name], x.name + ".i64", node, to=TensorProto.INT64)
    m = b.const(multipliers.reshape(shape), "multiplier")
    product = b.op("Mul", [wide, m], node.output.name + ".prod", node)
    minus = multipliers * zp
    top = b.magnitude(x)
    magnitude = max((top * int(m) >> s) + 1 for m, s in zip(multipliers, shifts))
    b.finish(b.shift_round(product, shifts, minus, shape, node), node, magnitude)


@_lower("QAdd")
def _qadd(b: _Builder, node: Node) -> None:
    attrs = node.attrs
    shift = attrs["shift"]
    scale_up = 1 << max(0, -shift)
    terms, minus, top = [], 0, 0
    for value, multiplier in (
        (_input(node, 0), attrs["multiplier_a"]),
        (_input(node, 1), attrs["multiplier_b"]),
    ):
        name, zp = b.tensor(value)
        wide = b.op("Cast", [name], value.name + ".i64", node, to=TensorProto.INT64)
        m = multiplier * scale_up
        terms.append(
            b.op("Mul", [wide, b.const(np.int64(m), "multiplier")], value.name + ".m", node)
        )
        minus += m * zp
        top += b.magnitude(value) * abs(m)
    total = b.op("Add", terms, node.output.name + ".sum", node)
    magnitude = (top >> max(0, shift)) + 1
    b.finish(b.shift_round(total, [max(0, shift)], np.int64(minus), (), node), node, magnitude)


@_lower("Min", "Max")
def _min_max(b: _Builder, node: Node) -> None:
    """In int32 (ONNX Runtime has no 8-bit Min and Max), each input moved to the output's
    storage zero point (a constant is stored as it is, an int8 activation offset)."""
    out = node.output
    name, zp = b.output(out)
    parts = []
    for value in (_input(node, 0), _input(node, 1)):
        stored, value_zp = b.tensor(value)
        wide = b.op("Cast", [stored], value.name + ".i32", node, to=TensorProto.INT32)
        if value_zp != zp:
            delta = b.const(np.int32(zp - value_zp), "delta")
            wide = b.op("Add", [wide, delta], value.name + ".moved", node)
        parts.append(wide)
    result = b.op(node.op, parts, name + ".i32", node)
    b.add("Cast", [result], [name], node, to=b.storage_type(out, zp))


@_lower("Clip", "Relu")
def _clip(b: _Builder, node: Node) -> None:
    x = _input(node)
    name, zp = b.tensor(x)
    out, _ = b.output(node.output)
    if x.type.dtype.is_float:
        if node.op == "Relu":
            b.add("Relu", [name], [out], node)
            return
        # min > max: every value becomes max, as the reference's np.clip.
        high_f = np.float32(node.attrs["max"])
        lo = np.asarray(min(np.float32(node.attrs["min"]), high_f), np.float32)
        hi = np.asarray(high_f, np.float32)
    else:
        low, high = (0.0, np.inf) if node.op == "Relu" else (node.attrs["min"], node.attrs["max"])
        stored = np.uint8 if zp else x.type.dtype.numpy
        lo_i, hi_i = clip_bounds(low, high, x.type.dtype.numpy)
        if np.dtype(stored).itemsize == 2:
            # ONNX Runtime has no 16-bit Clip: clamp in int32 (exact, it holds both ranges).
            wide = b.op("Cast", [name], out + ".i32", node, to=TensorProto.INT32)
            bounds = [b.const(np.int32(lo_i), "lo"), b.const(np.int32(hi_i), "hi")]
            clipped = b.op("Clip", [wide, *bounds], out + ".clip", node)
            b.add("Cast", [clipped], [out], node, to=_ONNX_TYPE[x.type.dtype])
            return
        lo, hi = np.asarray(lo_i + zp, stored), np.asarray(hi_i + zp, stored)
    b.add("Clip", [name, b.const(lo, "lo"), b.const(hi, "hi")], [out], node)


def _moving(op_type: str, const_input: str | None = None) -> Lowering:
    """Data movement: the same op on however the values are stored (zero points travel)."""

    def lower(b: _Builder, node: Node) -> None:
        names = ["" if v is None else b.tensor(v)[0] for v in node.inputs]
        attrs = dict(node.attrs)
        if const_input is not None:
            names.append(b.const(np.asarray(attrs.pop(const_input), np.int64), const_input))
        out, _ = b.output(node.output)
        b.add(op_type, names, [out], node, **attrs)

    return lower


for _op in ("Flatten", "Transpose", "Concat", "Identity", "Softmax"):
    LOWER[_op] = _moving(_op)


@_lower("MaxPool")
def _maxpool(b: _Builder, node: Node) -> None:
    """MaxPool, with ``ceil_mode`` spelled as end padding.

    With ``ceil_mode=1`` a last window that would start past the input is dropped (ONNX,
    PyTorch and ONNX Runtime's kernel agree), but ONNX shape inference keeps it, so ONNX
    Runtime refused the file when a Flatten and a MatMulInteger followed (found by
    tests/test_differential.py). Floor mode with the end padding that yields the IR's output
    size computes the same windows; each holds an input element, so padding never wins.
    """
    attrs = dict(node.attrs)
    if attrs["ceil_mode"]:
        x = _input(node)
        spatial = len(attrs["kernel_shape"])
        pads = list(attrs["pads"])
        for i in range(spatial):
            span = attrs["dilations"][i] * (attrs["kernel_shape"][i] - 1) + 1
            reach = x.type.shape[2 + i] + pads[i] + pads[i + spatial] - span
            target = node.output.type.shape[2 + i]
            pads[i + spatial] += max(0, (target - 1) * attrs["strides"][i] - reach)
        attrs["pads"], attrs["ceil_mode"] = tuple(pads), 0
    out, _ = b.output(node.output)
    if _input(node).type.dtype in _WIDE:
        _wide_maxpool(b, node, attrs, out)
        return
    b.add("MaxPool", [b.tensor(_input(node))[0]], [out], node, **attrs)


def _wide_maxpool(b: _Builder, node: Node, attrs: dict[str, Any], out: str) -> None:
    """MaxPool of 16-bit integers, which ONNX Runtime's MaxPool (8-bit integers and floats
    only) refuses: the window maximum as an elementwise ``Max`` of one strided ``Slice`` per
    kernel tap over the input padded with a value below every 16-bit integer, in int32.
    Exact, and integer-only; ``attrs`` are in floor mode (ceil mode already spelled as end
    padding), so every window holds an input element and the padding never wins."""
    x = _input(node)
    name, zp = b.tensor(x)
    assert zp == 0, "16-bit activations are stored as they are"
    spatial = len(attrs["kernel_shape"])
    dilations = attrs.get("dilations") or (1,) * spatial
    strides = attrs.get("strides") or (1,) * spatial
    pads = attrs.get("pads") or (0,) * (2 * spatial)
    wide = b.op("Cast", [name], x.name + ".i32", node, to=TensorProto.INT32)
    onnx_pads = [0, 0, *pads[:spatial], 0, 0, *pads[spatial:]]
    padded = b.op(
        "Pad",
        [
            wide,
            b.const(np.asarray(onnx_pads, np.int64), "pads"),
            b.const(np.int32(-(1 << 16)), "low"),
        ],
        x.name + ".padded",
        node,
        mode="constant",
    )
    size = node.output.type.shape[2:]
    axes = b.const(np.arange(2, 2 + spatial, dtype=np.int64), "axes")
    steps = b.const(np.asarray(strides, np.int64), "steps")
    taps = []
    for tap in itertools.product(*(range(k) for k in attrs["kernel_shape"])):
        starts = [t * d for t, d in zip(tap, dilations)]
        ends = [s0 + (n - 1) * st + 1 for s0, n, st in zip(starts, size, strides)]
        taps.append(
            b.op(
                "Slice",
                [
                    padded,
                    b.const(np.asarray(starts, np.int64), "starts"),
                    b.const(np.asarray(ends, np.int64), "ends"),
                    axes,
                    steps,
                ],
                x.name + ".tap",
                node,
            )
        )
    top = b.op("Max", taps, node.output.name + ".max", node) if len(taps) > 1 else taps[0]
    b.add("Cast", [top], [out], node, to=_ONNX_TYPE[node.output.type.dtype])


LOWER["Reshape"] = _moving("Reshape", "shape")
LOWER["Squeeze"] = _moving("Squeeze", "axes")
LOWER["Unsqueeze"] = _moving("Unsqueeze", "axes")
LOWER["Expand"] = _moving("Expand", "shape")


@_lower("Slice")
def _slice(b: _Builder, node: Node) -> None:
    attrs = node.attrs
    ends = [e if e >= 0 else -(1 << 62) for e in attrs["ends"]]  # "through index 0"
    names = [
        b.const(np.asarray(v, np.int64), k)
        for k, v in (
            ("starts", attrs["starts"]),
            ("ends", ends),
            ("axes", attrs["axes"]),
            ("steps", attrs["steps"]),
        )
    ]
    out, _ = b.output(node.output)
    b.add("Slice", [b.tensor(_input(node))[0], *names], [out], node)


@_lower("Pad")
def _pad(b: _Builder, node: Node) -> None:
    x = _input(node)
    name, zp = b.tensor(x)
    pads = b.const(np.asarray(node.attrs["pads"], np.int64), "pads")
    stored = np.dtype(np.uint8 if zp else x.type.dtype.numpy)
    out, _ = b.output(node.output)
    if stored.itemsize == 2:  # ONNX Runtime has no 16-bit Pad: padded in int32
        wide = b.fresh(name + ".i32")
        b.add("Cast", [name], [wide], node, to=TensorProto.INT32)
        value = b.const(np.asarray(node.attrs["value"] + zp, np.int32), "value")
        padded = b.fresh(out + ".i32")
        b.add("Pad", [wide, pads, value], [padded], node, mode=node.attrs["mode"])
        b.add("Cast", [padded], [out], node, to=_ONNX_TYPE[node.output.type.dtype])
        return
    value = b.const(np.asarray(node.attrs["value"] + zp, stored), "value")
    b.add("Pad", [name, pads, value], [out], node, mode=node.attrs["mode"])


def _check_names(graph: Graph) -> None:
    """Refuse names ONNX cannot store: its strings are UTF-8, which has no lone surrogates
    (Python lets them into a ``str``: ``"\\udc80"`` in IR text, bytes decoded with
    ``surrogateescape``)."""
    named = [("graph", graph.name)]
    named += [("input", v.name) for v in graph.inputs]
    for node in graph:
        named.append(("node", node.name))
        named += [("value", v.name) for v in node.outputs]
    for what, name in named:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            shown = name.encode("utf-8", "backslashreplace").decode()
            raise IntqError(
                f"{what} name '{shown}' is not"
                " text UTF-8 can encode (it holds a lone surrogate), so ONNX cannot store it",
                hint="rename it: node and tensor names must be valid Unicode text",
            ) from None


def to_onnx(graph: Graph) -> onnx.ModelProto:
    """The ONNX model computing ``graph`` (integer-only graphs and their float boundary)."""
    _check_names(graph)
    b = _Builder(graph, value_ranges(graph))
    node_of_input = Node("Input", [], [], name="input")
    for value in graph.inputs:
        if b.offset(value):  # an int8 graph input: to offset uint8 once
            name, _ = b.output(value)
            b.convert(value.name, name, OFFSET, TensorProto.UINT8, node_of_input)
    for node in graph:
        LOWER.rule_for(node, "ONNX Runtime lowering")(b, node)
    node_of_output = Node("Output", [], [], name="output")
    for value in graph.outputs:
        name, zp = b.tensor(value)
        if zp:  # an int8 graph output: back from offset uint8
            b.convert(name, value.name, -zp, TensorProto.INT8, node_of_output)
    # Only constants the ONNX nodes read: weights travel as their own uint8 / reshaped copies.
    read = {name for node in b.nodes for name in node.input}
    for value in graph.constants:
        if value.name in read and value.const is not None:
            b.initializers.append(numpy_helper.from_array(value.const, value.name))
    model = helper.make_model(
        helper.make_graph(
            b.nodes,
            graph.name,
            [_info(v) for v in graph.inputs],
            [_info(v) for v in graph.outputs],
            b.initializers,
        ),
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="intq",
    )
    model.ir_version = IR_VERSION
    return model


def _info(value: Value) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(value.name, _ONNX_TYPE[value.type.dtype], value.type.shape)


__all__ = ["IR_VERSION", "LOWER", "OFFSET", "OPSET", "to_onnx"]
