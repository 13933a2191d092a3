"""The ONNX Runtime backend: an integer-only intq graph as a standard ONNX model.

Only default-domain ONNX ops (opset 21), so the ``.onnx`` file runs on plain
ONNX Runtime with no intq at run time. Each IR op has one lowering in
:data:`LOWER`. The choices, measured on this x86 AVX2 CPU without VNNI
(``benchmarks/ort_integer_ops_probe.py``):

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
  one with an int32 ``ReduceSum`` (exact: the range analysis proves the sum
  fits int32).
- ``Quantize``/``Dequantize`` are ``QuantizeLinear``/``DequantizeLinear``, which
  compute exactly what the reference does (float32 division, round half to
  even; float32 product).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from intq.backends.base import atomic_write, check_feeds
from intq.errors import ArtifactError, NumericsError, UnsupportedOpError
from intq.ir.graph import Graph, Node, Value
from intq.ir.types import DType
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


class _Builder:
    """Collects ONNX nodes and initializers while the IR graph is lowered."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.names: set[str] = {v.name for v in graph.values()}
        self.offset_u8: dict[str, str] = {}

    def fresh(self, base: str) -> str:
        """A tensor name not used yet."""
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}.{i}"
        self.names.add(name)
        return name

    def const(self, array: np.ndarray, base: str) -> str:
        """An initializer holding ``array``; returns its name."""
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, node: Node, **attrs: object) -> str:
        """Add one ONNX node with one output named from ``base``; returns the output name."""
        out = self.fresh(base)
        self.add(op_type, inputs, [out], node, **attrs)
        return out

    def add(
        self, op_type: str, inputs: list[str], outputs: list[str], node: Node, **attrs: object
    ) -> None:
        """Add one ONNX node writing ``outputs``."""
        name = self.fresh(f"{node.label()}/{op_type}")
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))

    def as_u8(self, value: Value, node: Node) -> tuple[str, int]:
        """``value`` as uint8 for the u8 x u8 kernels, and its zero point.

        Unsigned 8-bit values are used as they are; signed ones (8 bits or fewer) are
        offset by 128, with a zero point of 128, once per value.
        """
        dtype = value.type.dtype
        if dtype is DType.U8:
            return value.name, 0
        if dtype is not DType.I8:
            raise UnsupportedOpError(
                f"{node.op} on {value.type} activations in the ONNX Runtime backend",
                node=node.label(),
                hint="the ONNX Runtime backend runs 8-bit activations (4 to 8 bits)",
            )
        if value.const is not None:
            data = value.const.astype(np.int16) + 128
            return self.const(data.astype(np.uint8), value.name + ".u8"), 128
        if value.name not in self.offset_u8:
            wide = self.op("Cast", [value.name], value.name + ".i16", node, to=TensorProto.INT16)
            shifted = self.op(
                "Add", [wide, self.const(np.int16(128), "c128")], value.name + ".p", node
            )
            self.offset_u8[value.name] = self.op(
                "Cast", [shifted], value.name + ".u8", node, to=TensorProto.UINT8
            )
        return self.offset_u8[value.name], 128

    def zero_point(self, zp: int) -> str:
        return self.const(np.uint8(zp), "zp")

    def shift_round(
        self, product: str, shifts: list[int], shape: tuple[int, ...], node: Node
    ) -> str:
        """``(product + 2^(S-1)) >> S`` on int64 ``product`` with per-channel ``shifts``
        broadcast as ``shape``; see the module docstring for the exact formulation."""
        s = np.asarray(shifts, np.int64)
        add = np.where(
            s >= 1, np.left_shift(np.uint64(1), np.maximum(s - 1, 0).astype(np.uint64)), 0
        )
        add = add.astype(np.uint64) + np.uint64(1 << 63)
        back = np.where(
            s <= 63, np.left_shift(np.uint64(1), (63 - np.minimum(s, 63)).astype(np.uint64)), 0
        )
        as_u64 = self.op("Cast", [product], f"{product}.u64", node, to=TensorProto.UINT64)
        biased = self.op(
            "Add", [as_u64, self.const(add.reshape(shape), "round")], f"{product}.b", node
        )
        shift_by = self.const(np.minimum(s, 64).astype(np.uint64).reshape(shape), "shift")
        shifted = self.op("BitShift", [biased, shift_by], f"{product}.s", node, direction="RIGHT")
        signed = self.op("Cast", [shifted], f"{product}.i64", node, to=TensorProto.INT64)
        offset = self.const(
            back.astype(np.int64).reshape(shape) if back.ndim else np.int64(back), "unbias"
        )
        return self.op("Sub", [signed, offset], f"{product}.r", node)

    def clamp_cast(self, x: str, node: Node, out: Value) -> None:
        """Clamp int64 ``x`` to the node's ``[lo, hi]`` and cast into ``out``."""
        lo = self.const(np.int64(node.attrs["lo"]), "lo")
        hi = self.const(np.int64(node.attrs["hi"]), "hi")
        clipped = self.op("Clip", [x, lo, hi], f"{out.name}.clip", node)
        self.add("Cast", [clipped], [out.name], node, to=_ONNX_TYPE[out.type.dtype])


def _channel_shape(value: Value, axis: int, count: int) -> tuple[int, ...]:
    shape = [1] * value.type.rank
    if count > 1:
        shape[axis] = count
    return tuple(shape)


Lowering = Callable[[_Builder, Node], None]
LOWER: RuleTable[Lowering] = RuleTable()
"""IR op -> the function writing its ONNX nodes."""
_lower = LOWER.register


@_lower("Quantize")
def _quantize(b: _Builder, node: Node) -> None:
    out = node.output
    quant = out.type.quant
    assert quant is not None
    zp = b.const(np.zeros((), out.type.dtype.numpy), "zp")
    scale = b.const(np.float32(node.attrs["scale"]), "scale")
    if quant.bits == out.type.dtype.bits:
        b.add("QuantizeLinear", [node.inputs[0].name, scale, zp], [out.name], node)  # type: ignore[union-attr]
        return
    full = b.op("QuantizeLinear", [node.inputs[0].name, scale, zp], out.name + ".full", node)  # type: ignore[union-attr]
    lo = b.const(np.asarray(quant.qmin, out.type.dtype.numpy), "lo")
    hi = b.const(np.asarray(quant.qmax, out.type.dtype.numpy), "hi")
    b.add("Clip", [full, lo, hi], [out.name], node)


@_lower("Dequantize")
def _dequantize(b: _Builder, node: Node) -> None:
    x = node.inputs[0]
    assert x is not None and x.type.quant is not None
    q = x.type.quant
    scale = b.const(np.asarray(q.scale if q.axis is not None else q.scale[0], np.float32), "scale")
    attrs = {"axis": q.axis} if q.axis is not None else {}
    b.add("DequantizeLinear", [x.name, scale], [node.output.name], node, **attrs)


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
    x, w = node.inputs[0], node.inputs[1]
    assert x is not None and w is not None
    x_u8, x_zp = b.as_u8(x, node)
    w_u8, w_zp = b.as_u8(w, node)
    attrs = node.attrs
    acc = b.op(
        "ConvInteger",
        [x_u8, w_u8, b.zero_point(x_zp), b.zero_point(w_zp)],
        node.output.name + ".acc",
        node,
        strides=list(attrs["strides"]),
        pads=list(attrs["pads"]),
        dilations=list(attrs["dilations"]),
        group=attrs["group"],
    )
    _add_bias(b, acc, node, node.inputs[2] if len(node.inputs) > 2 else None, 1)


@_lower("QGemm", "QMatMul")
def _qmatmul(b: _Builder, node: Node) -> None:
    a, w = node.inputs[0], node.inputs[1]
    assert a is not None and w is not None and w.const is not None
    a_u8, a_zp = b.as_u8(a, node)
    weights = w.const.T if node.attrs.get("transB") else w.const
    w_u8 = b.const((weights.astype(np.int16) + 128).astype(np.uint8), w.name + ".u8")
    acc = b.op(
        "MatMulInteger",
        [a_u8, w_u8, b.zero_point(a_zp), b.zero_point(128)],
        node.output.name + ".acc",
        node,
    )
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    _add_bias(b, acc, node, bias, node.output.type.rank - 1)


@_lower("QGlobalAveragePool")
def _qglobal_avgpool(b: _Builder, node: Node) -> None:
    x = node.inputs[0]
    assert x is not None
    wide = b.op("Cast", [x.name], x.name + ".i32", node, to=TensorProto.INT32)
    axes = b.const(np.arange(2, x.type.rank, dtype=np.int64), "axes")
    b.add("ReduceSum", [wide, axes], [node.output.name], node, keepdims=1)


@_lower("QAveragePool")
def _qavgpool(b: _Builder, node: Node) -> None:
    x = node.inputs[0]
    assert x is not None
    x_u8, x_zp = b.as_u8(x, node)
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
    x = node.inputs[0]
    assert x is not None
    attrs = node.attrs
    shifts = list(attrs["shift"])
    # S <= 0: no rounding; 2^-S joins the multiplier (the range analysis bounds the product).
    multipliers = [m << max(0, -s) for m, s in zip(attrs["multiplier"], shifts)]
    shifts = [max(0, s) for s in shifts]
    shape = _channel_shape(x, attrs["axis"], len(multipliers))
    wide = b.op("Cast", [x.name], x.name + ".i64", node, to=TensorProto.INT64)
    m = b.const(np.asarray(multipliers, np.int64).reshape(shape), "multiplier")
    product = b.op("Mul", [wide, m], node.output.name + ".prod", node)
    b.clamp_cast(b.shift_round(product, shifts, shape, node), node, node.output)


@_lower("QAdd")
def _qadd(b: _Builder, node: Node) -> None:
    a, c = node.inputs[0], node.inputs[1]
    assert a is not None and c is not None
    attrs = node.attrs
    shift = attrs["shift"]
    scale_up = 1 << max(0, -shift)
    terms = []
    for value, multiplier in ((a, attrs["multiplier_a"]), (c, attrs["multiplier_b"])):
        wide = b.op("Cast", [value.name], value.name + ".i64", node, to=TensorProto.INT64)
        m = b.const(np.int64(multiplier * scale_up), "multiplier")
        terms.append(b.op("Mul", [wide, m], value.name + ".scaled", node))
    total = b.op("Add", terms, node.output.name + ".sum", node)
    b.clamp_cast(b.shift_round(total, [max(0, shift)], (), node), node, node.output)


@_lower("Clip")
def _clip(b: _Builder, node: Node) -> None:
    x = node.inputs[0]
    assert x is not None
    dtype = x.type.dtype.numpy
    if x.type.dtype.is_float:
        lo, hi = np.float32(node.attrs["min"]), np.float32(node.attrs["max"])
    else:
        info = np.iinfo(dtype)
        low, high = node.attrs["min"], node.attrs["max"]
        lo = np.asarray(info.min if low == -np.inf else max(info.min, int(np.ceil(low))), dtype)
        hi = np.asarray(info.max if high == np.inf else min(info.max, int(np.floor(high))), dtype)
    b.add("Clip", [x.name, b.const(lo, "lo"), b.const(hi, "hi")], [node.output.name], node)


def _same(op_type: str, **fixed: object) -> Lowering:
    def lower(b: _Builder, node: Node) -> None:
        names = ["" if v is None else v.name for v in node.inputs]
        b.add(op_type, names, [node.output.name], node, **{**node.attrs, **fixed})

    return lower


def _with_const_input(op_type: str, attr: str, dtype: type = np.int64) -> Lowering:
    """An op whose ONNX form takes the IR attribute ``attr`` as a constant input."""

    def lower(b: _Builder, node: Node) -> None:
        x = node.inputs[0]
        assert x is not None
        value = b.const(np.asarray(node.attrs[attr], dtype), attr)
        b.add(op_type, [x.name, value], [node.output.name], node)

    return lower


LOWER["MaxPool"] = _same("MaxPool")
LOWER["Flatten"] = _same("Flatten")
LOWER["Transpose"] = _same("Transpose")
LOWER["Concat"] = _same("Concat")
LOWER["Identity"] = _same("Identity")
LOWER["Softmax"] = _same("Softmax")
LOWER["Relu"] = _same("Relu")
LOWER["Reshape"] = _with_const_input("Reshape", "shape")
LOWER["Squeeze"] = _with_const_input("Squeeze", "axes")
LOWER["Unsqueeze"] = _with_const_input("Unsqueeze", "axes")
LOWER["Expand"] = _with_const_input("Expand", "shape")


@_lower("Slice")
def _slice(b: _Builder, node: Node) -> None:
    x = node.inputs[0]
    assert x is not None
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
    b.add("Slice", [x.name, *names], [node.output.name], node)


@_lower("Pad")
def _pad(b: _Builder, node: Node) -> None:
    x = node.inputs[0]
    assert x is not None
    pads = b.const(np.asarray(node.attrs["pads"], np.int64), "pads")
    value = b.const(np.asarray(node.attrs["value"], x.type.dtype.numpy), "value")
    b.add("Pad", [x.name, pads, value], [node.output.name], node, mode=node.attrs["mode"])


def to_onnx(graph: Graph) -> onnx.ModelProto:
    """The ONNX model computing ``graph`` (integer-only graphs and their float boundary)."""
    b = _Builder(graph)
    for node in graph:
        lower = LOWER.get(node.op)
        if lower is None:
            raise UnsupportedOpError(
                f"{node.op} has no ONNX Runtime lowering",
                node=node.label(),
                hint="the backend lowers: " + ", ".join(sorted(LOWER)),
            )
        lower(b, node)
    # Only constants the ONNX nodes read: weights travel as their own uint8 / reshaped copies.
    read = {name for node in b.nodes for name in node.input}
    for value in graph.constants:
        if value.name in read:
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


def onnx_census(model: onnx.ModelProto) -> dict[str, int]:
    """The op census of an exported model; raises :class:`NumericsError` when a float op
    sits between the input ``QuantizeLinear`` and the output ``DequantizeLinear``.

    The same rule as :func:`intq.passes.integer_only.census`, on the ONNX file itself:
    a node may read floats only after a ``DequantizeLinear``.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    elem = {
        v.name: v.type.tensor_type.elem_type
        for v in (*graph.value_info, *graph.input, *graph.output)
    }
    elem.update({t.name: t.data_type for t in graph.initializer})
    floats = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16}
    after: set[str] = set()
    counts: dict[str, int] = {}
    bad = []
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.domain not in ("", "ai.onnx"):
            bad.append(f"{node.op_type} {node.name!r} is outside the default domain")
        if node.op_type == "QuantizeLinear":
            continue
        if node.op_type == "DequantizeLinear":
            after.update(node.output)
            continue
        float_inputs = [n for n in node.input if n and elem.get(n) in floats]
        float_outputs = [n for n in node.output if elem.get(n) in floats]
        if float_inputs and all(n in after for n in float_inputs):
            after.update(node.output)
        elif float_inputs or float_outputs:
            bad.append(f"{node.op_type} {node.name!r} computes in float")
        elif node.op_type in ("Div", "Mod"):
            bad.append(f"{node.op_type} {node.name!r} divides at run time")
    if bad:
        raise NumericsError("the exported model is not integer-only:\n  " + "\n  ".join(bad[:20]))
    return counts


def _info(value: Value) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(value.name, _ONNX_TYPE[value.type.dtype], value.type.shape)


class OnnxRuntimeExecutable:
    """An intq graph lowered to ONNX and run by an ONNX Runtime CPU session."""

    target = "onnxruntime"

    def __init__(self, graph: Graph, model: onnx.ModelProto, threads: int | None = None):
        import onnxruntime as ort

        self.graph = graph
        self.model = model
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    @property
    def input_names(self) -> list[str]:
        """Names of the inputs :meth:`run` expects."""
        return [v.name for v in self.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        """Names of the outputs :meth:`run` returns."""
        return [v.name for v in self.graph.outputs]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on ``inputs`` (name -> array); returns output name -> array."""
        feeds = check_feeds(self.graph.inputs, inputs)
        results = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, results))

    def save(self, path: str | Path) -> Path:
        """Write the ``.onnx`` file (atomically); plain ONNX Runtime runs it."""
        data = self.model.SerializeToString()
        if len(data) >= 2**31:
            raise ArtifactError("the model exceeds protobuf's 2 GB limit")
        return atomic_write(path, data)


def compile_onnxruntime(graph: Graph, threads: int | None = None) -> OnnxRuntimeExecutable:
    """Lower ``graph`` to ONNX and open an ONNX Runtime session on it."""
    return OnnxRuntimeExecutable(graph, to_onnx(graph), threads)


__all__ = ["LOWER", "OnnxRuntimeExecutable", "compile_onnxruntime", "onnx_census", "to_onnx"]
