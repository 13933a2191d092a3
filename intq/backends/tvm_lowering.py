"""The TVM backend's lowering: one rule per IR op, adding Relax bindings for it.

Each IR op has one lowering in :data:`LOWER`, which adds Relax bindings to the
``relax.BlockBuilder`` of a :class:`Lowerer`: the integer kernels as tensor-expression (TE)
functions (``bb.emit_te``; their compute is in :mod:`intq.backends.tvm_kernels`), data
movement as Relax ops. Weights, biases and per-channel requantization constants are
``relax.const`` values baked into the module, so the compiled module's only inputs are the
graph's inputs. :func:`intq.backends.tvm.to_relax` drives it over a graph.

- **Fusion.** A ``QConv``/``QGemm``/``QMatMul`` whose int32 accumulator is read
  only by one ``Requantize`` (or ``Dequantize``) becomes one TE function: the
  accumulation and the requantization epilogue in one loop nest, so the int32
  tensor never reaches memory.
- **Layouts.** With ``channels_last``, 4-D activations between the CNN kernels are stored
  NHWC (:mod:`intq.backends.tvm_layout`); a value keeps the layout its producer chose.
- **Quantize** divides in float32 and rounds half to even (``nearbyint``), as
  the reference and ONNX ``QuantizeLinear`` do, saturating; NaN gives 0, tested
  before the clamp (docs/numerics.md); ``Dequantize`` multiplies in float32.
- **Transformer kernels** (``QSoftmax``, ``QGelu``, ``QLayerNorm``) and products of
  activations (``QMul``) are the reference's own code (:mod:`intq.semantics.kernels`),
  emitted op by op as Relax int64 ops (:class:`_RelaxOps`). Tables (``QLookup``) are one
  TE kernel on the 8-bit codes (:func:`~intq.backends.tvm_kernels.lookup_te`).

Every kernel keeps the compute it is given here, so a schedule
(:mod:`intq.backends.tvm_schedules`) can only reorder it. TVM is imported when a
:class:`Lowerer` is made and inside the rules, never when this module is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from intq.backends.tvm_kernels import (
    ConvShape,
    Rescale,
    avgpool_te,
    bias_input,
    conv_te,
    conv_transpose_nhwc_te,
    conv_transpose_te,
    conv_transpose_weights,
    dense_te,
    depthwise_nhwc_te,
    dequantize_te,
    dtype_of,
    global_avgpool_te,
    input_of,
    isnan,
    lookup_te,
    maxpool_te,
    nearbyint,
    nhwc_conv_transpose,
    offset_bias,
    packed_conv_te,
    packed_dense_te,
    packed_weights,
    pairs_exactly,
    reduction_depth,
    rescale_te,
)
from intq.backends.tvm_layout import (
    NCHW_TO_NHWC,
    NHWC_TO_NCHW,
    nhwc_axis,
    nhwc_shape,
    permute_te,
)
from intq.errors import UnsupportedOpError
from intq.ir.graph import Graph, Node, Value
from intq.ir.types import DType
from intq.ops import OPS, Trait, ops_with
from intq.semantics.kernels import (
    divide,
    divide_by_count,
    l2_norm,
    lookup_offset,
    mask,
    multiply,
    prelu,
    resize_linear,
    resize_taps,
    run_node,
)
from intq.semantics.numerics import clip_bounds
from intq.tables import RuleTable

# ----- op facts -----------------------------------------------------------------------------------

_LAYERS = tuple(op for op in ops_with(Trait.ACCUMULATOR) if OPS[op].weight_axis is not None)
"""The layers with constant weights (QConv, QConvTranspose, QGemm, QMatMul): one kernel each,
its int32 accumulator fused into a lone reading epilogue."""


def _channels_last_kernel(node: Node) -> bool:
    """True for the convolutions with an NHWC kernel: depthwise, one group of operands
    ``pmaddwd`` reduces exactly (see :func:`~intq.backends.tvm_kernels.pairs_exactly`), and
    the one-group transposed convs of :func:`~intq.backends.tvm_kernels.nhwc_conv_transpose`."""
    if node.op == "QConvTranspose":
        return nhwc_conv_transpose(node)
    if node.op != "QConv" or input_of(node).type.rank != 4:
        return False
    conv = ConvShape.of(node)
    return conv.depthwise or (conv.group == 1 and pairs_exactly(node))


def _dense_weights(node: Node) -> np.ndarray:
    """The constant weights of a ``QGemm``/``QMatMul`` as ``[N, K]``, as the dense kernels
    read them (both operands contiguous along K)."""
    w = input_of(node, 1)
    assert w.const is not None
    # Output channels on axis 0 (QGemm with transB) is already [N, K].
    weight_axis = node.opdef.weight_axis
    assert weight_axis is not None
    nk = w.const if weight_axis(node) == 0 else w.const.T
    return np.ascontiguousarray(nk)


# ----- the lowerer --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """A TE function the schedules know: its kind and the facts a schedule needs."""

    kind: str  # a key of tvm_schedules.SCHEDULES
    nodes: tuple[str, ...] = ()  # the labels of the nodes it computes (identical prim funcs
    # are shared); none for the Relax ops TVM fuses


class Lowerer:
    """Walks the graph in order and adds one or a few Relax bindings per node.

    With ``channels_last``, 4-D activations between the CNN kernels are stored NHWC
    (channels innermost: what the conv and depthwise schedules vectorize over); a value
    keeps the layout its producer chose, and a consumer asks for the one it needs with
    :meth:`value` (NCHW, the graph's own) or :meth:`value_nhwc`, which transpose once
    and remember it.
    """

    def __init__(
        self, graph: Graph, channels_last: bool = False, vnni: bool = False, llvm: bool = False
    ):
        from tvm import relax

        self.relax = relax
        self.graph = graph
        self.channels_last = channels_last
        self.vnni = vnni  # the target has vpdpbusd: every 8-bit conv/dense reduces bytes
        self.llvm = llvm  # LLVM compiles the kernels for a CPU: its intrinsics may be called
        self.bb = relax.BlockBuilder()
        self.env: dict[str, Any] = {}  # value name -> its Relax expression, as stored
        self.nhwc: set[str] = set()  # the values stored NHWC
        self.transposed: dict[str, Any] = {}  # value name -> its other layout, once asked
        self.kernels: dict[str, Kernel] = {}  # prim func name -> what it computes
        # Accumulators read by exactly one Requantize/Dequantize: fused into that reader.
        self.deferred: dict[str, Node] = {}
        for node in graph:
            out = node.outputs[0] if node.outputs else None
            if node.op in _LAYERS and out is not None and not out.is_graph_output:
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
        return nhwc_axis(axis) if self.is_nhwc(value) else axis

    def _transpose(self, value: Value, perm: tuple[int, ...]) -> Any:
        if value.name not in self.transposed:
            source = self.value(value) if perm == NCHW_TO_NHWC else self.env[value.name]
            self.transposed[value.name] = self.emit_te(
                permute_te(perm), [source], f"layout_{_label_name(value.name)}", value.name
            )
        return self.transposed[value.name]

    def const(self, array: np.ndarray) -> Any:
        """A Relax constant."""
        array = np.require(array, requirements="C")  # as ascontiguousarray, but keeps rank 0
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


def _label_name(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def _func_name(node: Node) -> str:
    return f"{node.op.lower()}_{_label_name(node.label())}"[:60] or node.op.lower()


Lowering = Callable[[Lowerer, Node], None]
LOWER: RuleTable[Lowering] = RuleTable()
"""IR op -> the function adding its Relax bindings."""
_lower = LOWER.register


# ----- accumulators -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Accumulator:
    """How one ``QConv``/``QGemm``/``QMatMul`` computes its int32 accumulator."""

    fn: Callable[..., Any]  # TE: args -> int32 accumulator
    args: list[Any]  # Relax expressions: input, weights[, bias]
    kind: str  # the schedule's kernel kind
    nhwc: bool  # the accumulator (a 4-D conv output) is NHWC
    shape: tuple[int, ...] | None = None  # the graph's shape of a result the kernel
    # computes with another (a 1-D conv's, computed with height 1)


def _packed_operands(
    lw: Lowerer, node: Node, w: np.ndarray, bias: list[Any]
) -> tuple[int, Any, list[Any]]:
    """The reduction depth of the tensorized ``node`` with weights ``w`` (``[outputs,
    inputs, *taps]``), its packed weights, and its bias arguments (the byte kernel's
    :func:`offset_bias` where it needs one); with :attr:`Lowerer.vnni` every 8-bit one
    reduces bytes (``vpdpbusd`` is exact for any int8 weights)."""
    depth = reduction_depth(node, w, lw.vnni)
    if depth == 4 and (bias or input_of(node).type.dtype is DType.I8):
        bias = [lw.const(offset_bias(node, w))]
    return depth, lw.const(packed_weights(w, depth)), bias


def _accumulator(lw: Lowerer, node: Node) -> _Accumulator:
    """The TE function computing ``node``'s int32 accumulator, its arguments and kind."""
    x, w = input_of(node, 0), input_of(node, 1)
    b = bias_input(node)
    bias = [lw.value(b)] if b is not None else []
    if lw.channels_last and node.op == "QConvTranspose" and _channels_last_kernel(node):
        assert w.const is not None
        weights = lw.const(conv_transpose_weights(w.const, node.attrs["strides"]))
        args = [lw.value_nhwc(x), weights, *bias]
        return _Accumulator(conv_transpose_nhwc_te(node), args, "conv_transpose", True)
    if lw.channels_last and _channels_last_kernel(node):
        assert w.const is not None
        x_nhwc = lw.value_nhwc(x)
        if ConvShape.of(node).depthwise:
            weights = np.ascontiguousarray(w.const[:, 0].transpose(1, 2, 0))  # [kh, kw, C]
            return _Accumulator(
                depthwise_nhwc_te(node), [x_nhwc, lw.const(weights), *bias], "depthwise", True
            )
        depth, weights, bias = _packed_operands(lw, node, w.const, bias)
        return _Accumulator(packed_conv_te(node, depth), [x_nhwc, weights, *bias], "conv", True)
    if node.op == "QConvTranspose":
        args = [lw.value(x), lw.value(w), *bias]
        return _Accumulator(conv_transpose_te(node), args, "generic", False)
    if node.op == "QConv" and x.type.rank == 3:  # a 1-D conv: a 2-D one of height 1
        conv = ConvShape.of(node)
        assert w.const is not None
        rows = lw.relax.ShapeExpr(list(conv.as_2d(x.type.shape)))
        tall = lw.bb.emit(lw.relax.op.reshape(lw.value(x), rows))
        weights = lw.const(w.const.reshape(conv.as_2d(w.type.shape)))
        fn, kind = conv_te(node)
        return _Accumulator(fn, [tall, weights, *bias], kind, False, node.output.type.shape)
    if node.op == "QConv":
        fn, kind = conv_te(node)
        return _Accumulator(fn, [lw.value(x), lw.value(w), *bias], kind, False)
    if pairs_exactly(node):
        shape = x.type.shape
        rows = lw.relax.ShapeExpr([int(np.prod(shape[:-1])), shape[-1]])
        a = lw.bb.emit(lw.relax.op.reshape(lw.value(x), rows))
        depth, weights, bias = _packed_operands(lw, node, _dense_weights(node), bias)
        return _Accumulator(packed_dense_te(node, depth), [a, weights, *bias], "dense", False)
    weights = lw.const(_dense_weights(node))
    return _Accumulator(dense_te(node), [lw.value(x), weights, *bias], "generic", False)


@_lower(*_LAYERS)
def _accumulate(lw: Lowerer, node: Node) -> None:
    if node.output.name in lw.deferred:
        return  # computed inside its reader's kernel
    acc = _accumulator(lw, node)
    lw.bind(node, _in_shape(lw, acc, lw.emit_node(acc.fn, acc.args, node, acc.kind)), acc.nhwc)


def _in_shape(lw: Lowerer, acc: _Accumulator, expr: Any) -> Any:
    """``expr``, computed by ``acc``'s kernel (or its fused epilogue), in the graph's shape."""
    if acc.shape is None:
        return expr
    return lw.bb.emit(lw.relax.op.reshape(expr, lw.relax.ShapeExpr(list(acc.shape))))


# ----- epilogues and elementwise integer ops ------------------------------------------------------


def _fused(
    lw: Lowerer,
    node: Node,
    epilogue: Callable[..., Any],
    constants: Sequence[np.ndarray],
) -> None:
    """Bind ``epilogue(acc, *constants)``, fused with the accumulator's kernel if deferred."""
    x = input_of(node)
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

    result = lw.emit_node(fn, [*acc.args, *extra], producer, acc.kind)
    lw.bind(node, _in_shape(lw, acc, result), nhwc=acc.nhwc)


@_lower("Requantize")
def _requantize(lw: Lowerer, node: Node) -> None:
    attrs = node.attrs
    x = input_of(node)
    rescale = Rescale.of(attrs["multiplier"], attrs["shift"])
    axis = lw.channel_axis(x, attrs["axis"]) if len(attrs["multiplier"]) > 1 else 0
    fn, constants = rescale_te(rescale, attrs["lo"], attrs["hi"], dtype_of(node.output), axis)
    _fused(lw, node, fn, constants)


@_lower("Dequantize")
def _dequantize(lw: Lowerer, node: Node) -> None:
    q = input_of(node).type.quant
    assert q is not None
    scales = np.asarray(q.scale, np.float32)
    axis = lw.channel_axis(input_of(node), q.axis) if q.axis is not None else 0
    fn, constants = dequantize_te(scales, axis)
    _fused(lw, node, fn, constants)


@_lower("Quantize")
def _quantize(lw: Lowerer, node: Node) -> None:
    from tvm import te, tirx

    q = node.output.type.quant
    assert q is not None
    scale = float(np.float32(node.attrs["scale"]))
    out = dtype_of(node.output)

    def fn(x: Any) -> Any:
        def body(*i: Any) -> Any:
            # float32 division then round half to even, as the reference (never x * (1/s)).
            real = x(*i).astype("float32")
            scaled = nearbyint(real / tirx.const(scale, "float32"), lw.llvm)
            low, high = tirx.const(q.qmin, "float32"), tirx.const(q.qmax, "float32")
            clamped = tirx.max(tirx.min(scaled, high), low)
            # NaN quantizes to 0 as on every backend: LLVM's min/max would return the other
            # operand (here the range's top), so NaN is tested for before the clamp's result.
            zero = tirx.const(0, "float32")
            return tirx.Select(isnan(real), zero, clamped).astype(out)

        return te.compute(x.shape, body, name="quantize")

    lw.bind(node, lw.emit_node(fn, [lw.value(input_of(node))], node, "elementwise"))


@_lower("QAdd")
def _qadd(lw: Lowerer, node: Node) -> None:
    from tvm import te, tirx

    attrs = node.attrs
    ma, mb, shift = attrs["multiplier_a"], attrs["multiplier_b"], attrs["shift"]
    lo, hi, out = attrs["lo"], attrs["hi"], dtype_of(node.output)

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
        shape = nhwc_shape(shape)
    args = [lw.in_layout(input_of(node, 0), nhwc), lw.in_layout(input_of(node, 1), nhwc)]
    lw.bind(node, lw.emit_node(fn, args, node, "elementwise"), nhwc=nhwc)


def _elementwise_nhwc(lw: Lowerer, node: Node) -> bool:
    """True when the elementwise ``node`` should run NHWC: an input already is, and every
    input is 4-D like the output, so that the same permutation of each keeps numpy's
    broadcasting (a squeeze-excitation block's ``[N, C, 1, 1]`` scale of an ``[N, C, H, W]``
    activation is ``[N, 1, 1, C]`` of ``[N, H, W, C]``: no transposes of the activation)."""
    inputs = [v for v in node.inputs if v is not None]
    return (
        node.output.type.rank == 4
        and all(v.type.rank == 4 for v in inputs)
        and any(lw.is_nhwc(v) for v in inputs)
    )


def _broadcast(t: Any, index: tuple[Any, ...]) -> Any:
    """``t`` read at the output ``index`` under numpy broadcasting (size-1 dims repeat)."""
    trailing = index[len(index) - len(t.shape) :]
    return t(*(0 if int(d) == 1 else i for d, i in zip(t.shape, trailing)))


# ----- pools --------------------------------------------------------------------------------------


def _bind_pool(lw: Lowerer, node: Node, fn: Callable[..., Any], source: Any, nhwc: bool) -> None:
    """Bind a pool's kernel: the NHWC pool schedule vectorizes over channels."""
    lw.bind(node, lw.emit_node(fn, [source], node, "pool" if nhwc else "elementwise"), nhwc=nhwc)


@_lower("QGlobalAveragePool")
def _qglobal_avgpool(lw: Lowerer, node: Node) -> None:
    source, nhwc = lw.stored(input_of(node))
    _bind_pool(lw, node, global_avgpool_te(node, nhwc), source, nhwc)


@_lower("QAveragePool")
def _qavgpool(lw: Lowerer, node: Node) -> None:
    source, nhwc = lw.stored(input_of(node))
    _bind_pool(lw, node, avgpool_te(node, nhwc), source, nhwc)


@_lower("QReduceSum")
def _qreduce_sum(lw: Lowerer, node: Node) -> None:
    """An int32 sum (the range analysis proves it fits), on the layout the input is stored
    in when the kept axes keep their order there (an NHWC input stays NHWC with keepdims)."""
    x = input_of(node)
    axes, keep = list(node.attrs["axes"]), bool(node.attrs["keepdims"])
    source, nhwc = lw.stored(x)
    kept = [a for a in range(x.type.rank) if a not in axes]
    if nhwc and not keep and sorted(kept, key=nhwc_axis) != kept:
        source, nhwc = lw.value(x), False
    if nhwc:
        axes = [nhwc_axis(a) for a in axes]
    op = lw.relax.op
    wide = lw.bb.emit(op.astype(source, "int32"))
    lw.bind(node, lw.bb.emit(op.sum(wide, axis=axes, keepdims=keep)), nhwc=nhwc and keep)


@_lower("MaxPool")
def _maxpool(lw: Lowerer, node: Node) -> None:
    source, nhwc = lw.stored(input_of(node))
    _bind_pool(lw, node, maxpool_te(node, nhwc), source, nhwc)


# ----- clamps and data movement -------------------------------------------------------------------


@_lower("Clip", "Relu")
def _clip(lw: Lowerer, node: Node) -> None:
    from tvm import te, tirx

    x_type = input_of(node).type
    dtype = dtype_of(node.output)
    low, high = (0.0, np.inf) if node.op == "Relu" else (node.attrs["min"], node.attrs["max"])
    if x_type.dtype.is_integer:
        low, high = clip_bounds(low, high, x_type.dtype.numpy)
    else:
        # min > max: every value becomes max, as the reference's np.clip (the clamps below
        # apply max last, so lo <= hi makes their order irrelevant).
        high = float(np.float32(min(high, 3.4e38)))
        low = min(float(np.float32(max(low, -3.4e38))), high)

    def fn(x: Any) -> Any:
        lo_, hi_ = tirx.const(low, dtype), tirx.const(high, dtype)
        return te.compute(x.shape, lambda *i: tirx.max(tirx.min(x(*i), hi_), lo_), name="clip")

    source, nhwc = lw.stored(input_of(node))  # elementwise: any layout
    lw.bind(node, lw.emit_node(fn, [source], node, "elementwise"), nhwc=nhwc)


@_lower("Min", "Max")
def _min_max(lw: Lowerer, node: Node) -> None:
    """Two integers of one quantization (broadcasting as numpy): Relax ``minimum`` /
    ``maximum`` on the stored type."""
    a, b = (lw.value(input_of(node, i)) for i in (0, 1))
    fn = lw.relax.op.minimum if node.op == "Min" else lw.relax.op.maximum
    lw.bind(node, lw.bb.emit(fn(a, b)))


@_lower("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(lw: Lowerer, node: Node) -> None:
    shape = lw.relax.ShapeExpr(list(node.output.type.shape))
    lw.bind(node, lw.bb.emit(lw.relax.op.reshape(lw.value(input_of(node)), shape)))


@_lower("Identity")
def _identity(lw: Lowerer, node: Node) -> None:
    lw.bind(node, lw.value(input_of(node)))


@_lower("Transpose")
def _transpose(lw: Lowerer, node: Node) -> None:
    perm = list(node.attrs["perm"])
    lw.bind(node, lw.bb.emit(lw.relax.op.permute_dims(lw.value(input_of(node)), perm)))


@_lower("Concat")
def _concat(lw: Lowerer, node: Node) -> None:
    inputs = [v for v in node.inputs if v is not None]
    axis = node.attrs["axis"] % node.output.type.rank
    nhwc = node.output.type.rank == 4 and all(lw.is_nhwc(v) for v in inputs)
    parts = [lw.in_layout(v, nhwc) for v in inputs]
    expr = lw.relax.op.concat(lw.relax.Tuple(parts), axis=nhwc_axis(axis) if nhwc else axis)
    lw.bind(node, lw.bb.emit(expr), nhwc=nhwc)


@_lower("Expand")
def _expand(lw: Lowerer, node: Node) -> None:
    shape = lw.relax.ShapeExpr(list(node.output.type.shape))
    lw.bind(node, lw.bb.emit(lw.relax.op.broadcast_to(lw.value(input_of(node)), shape)))


@_lower("Cast")
def _cast(lw: Lowerer, node: Node) -> None:
    lw.bind(node, lw.bb.emit(lw.relax.op.astype(lw.value(input_of(node)), dtype_of(node.output))))


@_lower("Softmax")
def _softmax(lw: Lowerer, node: Node) -> None:
    # A float op after the output Dequantize: close to, not bit-equal with, numpy's exp.
    x = lw.value(input_of(node))
    lw.bind(node, lw.bb.emit(lw.relax.op.nn.softmax(x, axis=node.attrs["axis"])))


@_lower("Slice")
def _slice(lw: Lowerer, node: Node) -> None:
    from tvm import te

    x_type = input_of(node).type
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

    shape = node.output.type.shape
    source, nhwc = lw.stored(input_of(node))
    if nhwc:  # the same slice of the NHWC tensor (YOLO's C2f splits between NHWC convs)
        shape = nhwc_shape(shape)
        first, step = list(nhwc_shape(first)), list(nhwc_shape(step))

    def fn(x: Any) -> Any:
        return te.compute(
            shape,
            lambda *i: x(*[first[d] + i[d] * step[d] for d in range(len(i))]),
            name="slice",
        )

    lw.bind(node, lw.emit_node(fn, [source], node, "elementwise"), nhwc=nhwc)


@_lower("Pad")
def _pad(lw: Lowerer, node: Node) -> None:
    from tvm import te, tirx

    if node.attrs["mode"] != "constant" or any(p < 0 for p in node.attrs["pads"]):
        raise UnsupportedOpError(
            f"Pad mode {node.attrs['mode']!r} with pads {list(node.attrs['pads'])} in TVM",
            node=node.label(),
            hint="the TVM backend lowers constant padding with non-negative pads",
        )
    x_type = input_of(node).type
    rank = x_type.rank
    before = node.attrs["pads"][:rank]
    dtype = dtype_of(node.output)
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

    lw.bind(node, lw.emit_node(fn, [lw.value(input_of(node))], node, "elementwise"))


# ----- transformers -------------------------------------------------------------------------------


@_lower("QBatchMatMul")
def _qbatch_matmul(lw: Lowerer, node: Node) -> None:
    """Two activations, int32 products and sums (numpy batching)."""
    op = lw.relax.op
    a, b = (lw.bb.emit(op.astype(lw.value(input_of(node, i)), "int32")) for i in (0, 1))
    lw.bind(node, lw.bb.emit(op.matmul(a, b, out_dtype="int32")))


@_lower("Gather")
def _gather(lw: Lowerer, node: Node) -> None:
    data, indices = input_of(node, 0), input_of(node, 1)
    axis = node.attrs["axis"] % data.type.rank
    # A 1-D index of an NHWC tensor (nearest upsampling as a Gather per spatial axis) keeps
    # its rank: the same take along the axis where it is stored, no transposes.
    nhwc = indices.type.rank == 1 and lw.is_nhwc(data)
    table = lw.value_nhwc(data) if nhwc else lw.value(data)
    index = lw.value(indices)
    if indices.const is None or (np.asarray(indices.const) < 0).any():
        # A negative index counts from the end, as in ONNX (TVM's "clip" would take row 0).
        dtype = indices.type.dtype.numpy
        size = lw.const(np.asarray(data.type.shape[axis], dtype))
        negative = lw.relax.op.less(index, lw.const(np.asarray(0, dtype)))
        index = lw.bb.emit(lw.relax.op.where(negative, lw.relax.op.add(index, size), index))
    # "clip": an index outside the table can never read outside it, even in a device-side
    # loader that skips intq's input checks (TVM's "fast" mode does not check at all).
    axis = nhwc_axis(axis) if nhwc else axis
    take = lw.bb.emit(lw.relax.op.take(table, index, axis=axis, mode="clip"))
    if indices.type.rank == 0:  # a scalar index: its axis goes (Relax keeps it)
        take = lw.bb.emit(lw.relax.op.reshape(take, node.output.type.shape))
    lw.bind(node, take, nhwc=nhwc)


@_lower("Add", "Sub", "Mul", "Equal")
def _raw_arithmetic(lw: Lowerer, node: Node) -> None:
    """Index arithmetic on raw integers (position ids from token ids): the same Relax op,
    exact (the range analysis proves the results fit their dtype)."""
    fn = {
        "Add": lw.relax.op.add,
        "Sub": lw.relax.op.subtract,
        "Mul": lw.relax.op.multiply,
        "Equal": lw.relax.op.equal,
    }[node.op]
    lw.bind(node, lw.bb.emit(fn(*(lw.value(input_of(node, i)) for i in (0, 1)))))


@_lower("GatherElements")
def _gather_elements(lw: Lowerer, node: Node) -> None:
    """Raw integers moved by raw indices (proven inside the axis): Relax ``gather_elements``
    of the data cut to the indices' extent on the other axes."""
    op, axis = lw.relax.op, node.attrs["axis"]
    data, index = input_of(node, 0), input_of(node, 1)
    source = lw.value(data)
    ends = [
        d if i == axis else n for i, (n, d) in enumerate(zip(index.type.shape, data.type.shape))
    ]
    if ends != list(data.type.shape):
        source = lw.bb.emit(op.strided_slice(source, list(range(len(ends))), [0] * len(ends), ends))
    lw.bind(node, lw.bb.emit(op.gather_elements(source, lw.value(index), axis=axis)))


@_lower("CumSum")
def _cumsum(lw: Lowerer, node: Node) -> None:
    """A running sum of raw integers: Relax ``cumsum`` in the value's dtype (``reverse``
    flips the axis before and after)."""
    op, axis = lw.relax.op, node.attrs["axis"]
    x = lw.value(input_of(node))
    if node.attrs["reverse"]:
        x = lw.bb.emit(op.flip(x, axis))
    total = lw.bb.emit(
        op.cumsum(
            x, axis=axis, dtype=dtype_of(node.output), exclusive=bool(node.attrs["exclusive"])
        )
    )
    if node.attrs["reverse"]:
        total = lw.bb.emit(op.flip(total, axis))
    lw.bind(node, total)


@_lower("Not")
def _not(lw: Lowerer, node: Node) -> None:
    """``x == 0`` on the flag as a byte: TVM lowers ``logical_not`` of a fused ``equal`` to a
    bitwise not of its byte (254 and 255 where 0 and 1 are meant)."""
    op = lw.relax.op
    byte = lw.bb.emit(op.astype(lw.value(input_of(node)), "uint8"))
    lw.bind(node, lw.bb.emit(op.equal(byte, lw.const(np.zeros((), np.uint8)))))


class _RelaxOps:
    """:class:`intq.semantics.kernels.IntOps` as Relax int64 ops: the transformer kernels are the
    reference's own code (:mod:`intq.semantics.kernels`), emitted op by op. ``>>`` on int64 is the
    arithmetic shift; run-time shifts are capped at 63 (the kernels shift non-negative
    values there, for which 63 already gives 0)."""

    def __init__(self, lw: Lowerer):
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
        # "clip" never changes an index the kernels give (always inside the table) and
        # keeps TVM from warning that "fast" mode trusts them.
        return self._emit(self.op.take(self.const(table), index, axis=0, mode="clip"))

    def take(self, x: Any, index: np.ndarray, axis: int) -> Any:
        return self._emit(self.op.take(x, self.const(index), axis=axis, mode="clip"))

    def div(self, a: Any, b: Any) -> Any:
        return self._emit(self.op.floor_divide(a, b))


@_lower("QLookup")
def _qlookup(lw: Lowerer, node: Node) -> None:
    """:func:`~intq.semantics.kernels.lookup` as one TE kernel (:func:`lookup_te`), on the
    stored layout."""
    x = input_of(node)
    source, nhwc = lw.stored(x)  # elementwise: any layout
    # The entries lie within the output's clamp (the op's check): they fit its dtype.
    table = lw.const(np.asarray(node.attrs["table"], node.output.type.dtype.numpy))
    fn = lookup_te(lookup_offset(x.type.dtype.numpy))
    lw.bind(node, lw.emit_node(fn, [source, table], node, "elementwise"), nhwc=nhwc)


@_lower("QMul")
def _qmul(lw: Lowerer, node: Node) -> None:
    """:func:`~intq.semantics.kernels.multiply` as Relax int64 ops (broadcasting as numpy)."""
    attrs = node.attrs
    nhwc = _elementwise_nhwc(lw, node)
    a, b = (
        lw.bb.emit(lw.relax.op.astype(lw.in_layout(input_of(node, i), nhwc), "int64"))
        for i in (0, 1)
    )
    result = multiply(
        _RelaxOps(lw), a, b, attrs["multiplier"], attrs["shift"], attrs["lo"], attrs["hi"]
    )
    lw.bind(node, lw.bb.emit(lw.relax.op.astype(result, dtype_of(node.output))), nhwc=nhwc)


@_lower("QReduceL2")
def _qreduce_l2(lw: Lowerer, node: Node) -> None:
    """:func:`~intq.semantics.kernels.l2_norm` as Relax int64 ops, in the graph's layout."""
    a = node.attrs
    x = _int64(lw, input_of(node))
    result = l2_norm(_RelaxOps(lw), x, a["axes"], a["multiplier"], a["shift"], a["lo"], a["hi"])
    _store(lw, node, result)


@_lower("QDiv")
def _qdiv(lw: Lowerer, node: Node) -> None:
    """:func:`~intq.semantics.kernels.divide` as Relax int64 ops (broadcasting as numpy)."""
    attrs = node.attrs
    a, b = (_int64(lw, input_of(node, i)) for i in (0, 1))
    result = divide(
        _RelaxOps(lw), a, b, attrs["multiplier"], attrs["shift"], attrs["lo"], attrs["hi"]
    )
    _store(lw, node, result)


@_lower("QMask")
def _qmask(lw: Lowerer, node: Node) -> None:
    """:func:`~intq.semantics.kernels.mask` as a Relax int64 multiply (broadcasting)."""
    x, keep = (_int64(lw, input_of(node, i)) for i in (0, 1))
    _store(lw, node, mask(_RelaxOps(lw), x, keep))


@_lower("QDivCount")
def _qdiv_count(lw: Lowerer, node: Node) -> None:
    """:func:`~intq.semantics.kernels.divide_by_count` as Relax int64 ops: each count
    ``take``s its multiplier, rounding term and shift from constant tables."""
    attrs = node.attrs
    acc, count = (_int64(lw, input_of(node, i)) for i in (0, 1))
    result = divide_by_count(
        _RelaxOps(lw), acc, count, attrs["multiplier"], attrs["shift"], attrs["lo"], attrs["hi"]
    )
    _store(lw, node, result)


@_lower("QPRelu")
def _qprelu(lw: Lowerer, node: Node) -> None:
    """:func:`~intq.semantics.kernels.prelu` as Relax int64 ops on the stored layout (the
    slopes along wherever the channel axis is stored): between NHWC convs a CNN's PReLU
    needs no transposes, and its fused loops vectorize over the channels (MTCNN)."""
    a = node.attrs
    x = input_of(node)
    source, nhwc = lw.stored(x)
    # One slope (a LeakyRelu) has no axis (-1).
    axis = lw.channel_axis(x, a["axis"]) if len(a["multiplier_neg"]) > 1 else a["axis"]
    result = prelu(
        _RelaxOps(lw),
        lw.bb.emit(lw.relax.op.astype(source, "int64")),
        a["multiplier_pos"],
        a["multiplier_neg"],
        axis,
        x.type.rank,
        a["shift"],
        a["lo"],
        a["hi"],
    )
    lw.bind(node, lw.bb.emit(lw.relax.op.astype(result, dtype_of(node.output))), nhwc=nhwc)


def _int64(lw: Lowerer, value: Value) -> Any:
    return lw.bb.emit(lw.relax.op.astype(lw.value(value), "int64"))


@_lower("QResize")
def _qresize(lw: Lowerer, node: Node) -> None:
    """:func:`~intq.semantics.kernels.resize_linear` as Relax int64 ``take``, ``multiply`` and
    ``add`` (the graph's layout), cast to the int32 accumulator."""
    x = input_of(node)
    taps = resize_taps(node.attrs)
    result = resize_linear(_RelaxOps(lw), _int64(lw, x), taps, x.type.rank, node.attrs["frac_bits"])
    _store(lw, node, result)


def _store(lw: Lowerer, node: Node, result: Any) -> None:
    lw.bind(node, lw.bb.emit(lw.relax.op.astype(result, dtype_of(node.output))))


@_lower(*ops_with(Trait.KERNEL))
def _transformer_kernel(lw: Lowerer, node: Node) -> None:
    keep = node.inputs[1] if len(node.inputs) > 1 else None
    x = _int64(lw, input_of(node))
    mask = None if keep is None else _int64(lw, keep)
    _store(lw, node, run_node(_RelaxOps(lw), node, x, mask))


__all__ = ["LOWER", "Kernel", "Lowerer"]
