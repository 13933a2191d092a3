"""Integerization: lower a calibrated float graph to an integer-only graph (HAWQ-V3).

The lowering walks the float graph in order and builds a new graph in which
every value between the input ``Quantize`` and the output ``Dequantize`` is
an integer with its scale in its type. One rule per float op, in
:data:`LOWERINGS`.

- Conv, Gemm and MatMul (constant weights) become ``QConv``/``QGemm``/
  ``QMatMul``: weights per output channel, symmetric, narrow range; bias int32
  at ``s_x * s_w[c]``; int32 accumulation.
- An accumulator stays *pending* until a consumer needs an activation: a
  following ReLU or ReLU6 then sets the clamp of the one ``Requantize``
  (``lo = 0``, unsigned output), so the activation costs nothing and the
  tensor is quantized once per fused conv+BN+activation.
- A residual ``Add`` (or a ``Sub``: ``Mb < 0``) of two activations, broadcasting, is pending
  too and becomes one ``QAdd`` ``(a*Ma + b*Mb + 2^(S-1)) >> S`` with the following ReLU's
  clamp.
- MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Slice, zero Pad
  work on the integers unchanged; Concat first requantizes its inputs to one
  scale; average pools and ReduceMean sum in int32 and put ``1/N`` in the dyadic
  multiplier (ReduceSum keeps the input's scale).
- An elementwise function (an op with ``Trait.ELEMENTWISE``: Sigmoid, Tanh, HardSwish...)
  of an 8-bit input becomes ``QLookup``, its exactly rounded 256-entry table, evaluated by
  the reference semantics at every input code.
- A ``Mul`` of two activations (SiLU, gates) is pending too and becomes one ``QMul``
  ``(a*b*M + 2^(S-1)) >> S`` (broadcasting) with the following ReLU's clamp.
- Graph outputs are dequantized once, straight from the int32 accumulator
  when they come from a Gemm (no 8-bit rounding of the logits). A trailing
  Softmax runs after that dequantization, outside the integer region.

Activation scales come from calibration statistics (``TensorStats``) of the
float tensors; a tensor is unsigned when its producer is provably
non-negative (ReLU, ReLU6, Softmax), and graph inputs are unsigned when every
calibration value was non-negative.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

from intq.errors import IntqError, NumericsError, PassError, UnsupportedOpError
from intq.ir.graph import Graph, Node, Value
from intq.ir.types import DType, QuantParams
from intq.ops import OPS, KernelSpec, Trait, ops_with
from intq.passes.calibration import CLIP_METHODS, CalibrationStats
from intq.passes.manager import Pass, PassResult
from intq.passes.precision import LayerBits, quantize_weights
from intq.semantics.kernels import elementwise_table, layernorm_constants
from intq.semantics.numerics import common_shift, dyadic, storage_dtype
from intq.semantics.numpy_eval import EVAL
from intq.tables import RuleTable


class Stats(Protocol):
    """What the lowering needs of a tensor's calibration statistics."""

    @property
    def min(self) -> float: ...

    def clip(self, method: str, bits: int, signed: bool, percentile: float = ...) -> float: ...


# ----- values that are not materialized yet -----------------------------------------------------


class Pending(Protocol):
    """An integer result waiting for its output scale and clamp."""

    def finish(self, lowering: _Lowering, quant: QuantParams, lo: int, hi: int, name: str) -> Value:
        """Emit the rescaling to ``quant`` clamped to ``[lo, hi]``; returns the new value."""
        ...


@dataclass
class Accumulator:
    """An int32 accumulator (QConv, QGemm, QMatMul, average pools)."""

    acc: Value
    factor: float = 1.0
    """A constant the accumulator was multiplied by (attention's ``1/sqrt(d)``): it lives
    in the requantization multiplier."""

    @property
    def scale(self) -> float:
        """The real value of one unit (per-tensor accumulators)."""
        return _scale(self.acc) * self.factor

    def finish(self, lowering: _Lowering, quant: QuantParams, lo: int, hi: int, name: str) -> Value:
        q = self.acc.type.quant
        assert q is not None
        pairs = [dyadic(s * self.factor / quant.scale[0]) for s in q.scale]
        node = lowering.dst.add(
            "Requantize",
            [self.acc],
            {
                "multiplier": tuple(d.multiplier for d in pairs),
                "shift": tuple(d.shift for d in pairs),
                "axis": q.axis if q.axis is not None else -1,
                **({"factor": self.factor} if self.factor != 1.0 else {}),
                **_output_attrs(quant, lo, hi),
            },
            name=name,
        )
        return node.output


@dataclass
class Sum:
    """A residual addition of two integer tensors (``a - b`` with ``subtract``)."""

    a: Value
    b: Value
    subtract: bool = False

    def finish(self, lowering: _Lowering, quant: QuantParams, lo: int, hi: int, name: str) -> Value:
        s_out = quant.scale[0]
        (ma, mb), shift = common_shift(_scale(self.a) / s_out, _scale(self.b) / s_out)
        if self.subtract:
            mb = -mb
        node = lowering.dst.add(
            "QAdd",
            [self.a, self.b],
            {
                "multiplier_a": ma,
                "multiplier_b": mb,
                "shift": shift,
                **_output_attrs(quant, lo, hi),
            },
            name=name,
        )
        return node.output


@dataclass
class Product:
    """A product of two integer activations (SiLU's ``x * sigmoid(x)``, a gate)."""

    a: Value
    b: Value

    def finish(self, lowering: _Lowering, quant: QuantParams, lo: int, hi: int, name: str) -> Value:
        step = dyadic(_scale(self.a) * _scale(self.b) / quant.scale[0])
        node = lowering.dst.add(
            "QMul",
            [self.a, self.b],
            {"multiplier": step.multiplier, "shift": step.shift, **_output_attrs(quant, lo, hi)},
            name=name,
        )
        return node.output


def _output_attrs(quant: QuantParams, lo: int, hi: int) -> dict[str, int | float]:
    return {
        "bits": quant.bits,
        "signed": int(quant.signed),
        "scale": quant.scale[0],
        "lo": lo,
        "hi": hi,
    }


def _scale_count(value: Value) -> int:
    """How many scales ``value`` has (1: per tensor)."""
    q = value.type.quant
    assert q is not None
    return 1 if q.axis is None else len(q.scale)


def _scale(value: Value) -> float:
    q = value.type.quant
    assert q is not None and q.axis is None
    return q.scale[0]


# ----- the lowering --------------------------------------------------------------------------


class _Lowering:
    def __init__(self, src: Graph, stats: Mapping[Value, Stats], options: Integerize):
        self.src = src
        self.stats = stats
        self.options = options
        self.dst = Graph(src.name)
        self.ints: dict[Value, Value] = {}
        self.pending: dict[Value, Pending] = {}
        self.floats: dict[Value, Value] = {}
        self.absorbed: set[Node] = set()
        self.affine: dict[Value, Affine] = {}
        self.masked: dict[Value, tuple[Value, Value]] = {}

    # ----- scales ---------------------------------------------------------------------

    def activation_quant(self, value: Value, non_negative: bool | None = None) -> QuantParams:
        """The calibrated quantization of float tensor ``value``."""
        stats = self.stats.get(value)
        if stats is None:
            raise IntqError(f"no calibration statistics for %{value.name}", node=_origin(value))
        if non_negative is None:
            non_negative = _provably_non_negative(value)
        producer = value.producer
        bits = self.options.bits(producer.name if producer else value.name).activations
        if _wide(value):
            bits = max(bits, self.options.wide_bits)
        threshold = stats.clip(
            self.options.calibration, bits, not non_negative, self.options.percentile
        )
        qmax = (1 << bits) - 1 if non_negative else (1 << (bits - 1)) - 1
        return QuantParams(bits, not non_negative, (threshold / qmax,))

    # ----- materializing -------------------------------------------------------------

    def materialize(self, value: Value) -> Value:
        """The integer form of float value ``value`` (requantizing a pending result)."""
        if value in self.ints:
            return self.ints[value]
        if value in self.pending:
            quant = self.activation_quant(value)
            result = self.pending.pop(value).finish(
                self, quant, quant.qmin, quant.qmax, _origin(value)
            )
            self.ints[value] = result
            return result
        if value in self.floats:
            raise UnsupportedOpError(
                f"%{value.name} is computed in float after dequantization and feeds an integer op",
                node=_origin(value),
                hint="only a model's final ops (such as Softmax) can stay in float",
            )
        if value.is_const:
            return self.constant_activation(value)
        raise IntqError(f"no integer value for %{value.name}", node=_origin(value))

    def constant_activation(self, value: Value) -> Value:
        """A constant operand of an activation op (e.g. an added vector), quantized per tensor."""
        data = np.asarray(value.const, np.float64)
        bits = self.options.activation_bits
        qmax = (1 << (bits - 1)) - 1
        scale = float(np.abs(data).max()) / qmax or 1.0
        q = np.clip(np.rint(data / scale), -qmax, qmax).astype(storage_dtype(bits, True))
        const = self.dst.add_constant(q, value.name)
        const.type = const.type.with_quant(QuantParams(bits, True, (scale,)))
        self.ints[value] = const
        return const

    def dequantized(self, value: Value) -> Value:
        """``value`` as float32 at the output boundary (from the int32 accumulator if pending)."""
        if value in self.floats:
            return self.floats[value]
        pending = self.pending.get(value)
        # Straight from the int32 accumulator, unless a constant factor waits in it (the
        # Dequantize has only the accumulator's own scale).
        if isinstance(pending, Accumulator) and pending.factor == 1.0:
            source = pending.acc
        else:
            source = self.materialize(value)
        out = self.dst.add("Dequantize", [source], name=_origin(value)).output
        self.floats[value] = out
        return out

    # ----- driving ---------------------------------------------------------------------

    def run(self) -> Graph:
        for value in self.src.inputs:
            self.input(value)
        for node in self.src:
            LOWERINGS.rule_for(node, "integer lowering")(self, node)
        outputs = []
        for value in self.src.outputs:
            out = self.dequantized(value)
            if out.name != value.name:  # users key results by the model's output names
                taken = self.dst.find(value.name)
                if taken is not None:
                    self.dst.rename(taken, self.dst.unique_name(value.name + ".int"))
                self.dst.rename(out, value.name)
            outputs.append(out)
        self.dst.set_outputs(outputs)
        return self.dst

    def input(self, value: Value) -> None:
        if value.type.dtype.is_integer:  # token ids, attention masks: used as they are
            self.ints[value] = self.dst.add_input(value.name, value.type)
            return
        stats = self.stats.get(value)
        non_negative = stats is not None and stats.min >= 0
        quant = self.activation_quant(value, non_negative)
        x = self.dst.add_input(value.name, value.type)
        q = self.dst.add(
            "Quantize",
            [x],
            {"bits": quant.bits, "signed": int(quant.signed), "scale": quant.scale[0]},
            name=value.name,
            out_names=[value.name + ".q"],
        )
        self.ints[value] = q.output

    def emit(self, node: Node, op: str, inputs: Sequence[Value | None], **attrs: object) -> Value:
        """Add ``op`` to the new graph under ``node``'s name."""
        return self.dst.add(
            op, inputs, attrs, name=node.label(), out_names=[node.output.name]
        ).output

    def linear(
        self, node: Node, x: Value, axis: int, bias: np.ndarray | None, alpha: float = 1.0
    ) -> tuple[Value, Value | None]:
        """The constant weight (input 1, times ``alpha``) per channel along ``axis``, and
        the float ``bias`` as int32 at ``s_x * s_w[c]``.

        A BatchNorm with a tiny gamma leaves a channel with tiny weights but a real bias;
        its weight scale is raised until the bias fits comfortably in int32 (below 2^30).
        """
        value = node.inputs[1]
        if value is None or value.const is None:
            raise UnsupportedOpError(
                f"{node.op} needs constant weights in the integer path", node=node.label()
            )
        bits = self.options.bits(node.label()).weights
        s_x = _scale(x)
        floor = None if bias is None else np.abs(bias) / (s_x * 2.0**30)
        q, scales = quantize_weights(value.const * alpha, bits, axis, floor)
        w = self.dst.add_constant(q, value.name)
        w.type = w.type.with_quant(_channel_quant(bits, scales, axis, narrow=True))
        if bias is None:
            return w, None
        acc_scales = tuple(s_x * s for s in scales)
        b_q = np.rint(bias / np.asarray(acc_scales)).astype(np.int32)
        b = self.dst.add_constant(b_q, f"{node.label()}.bias")
        b.type = b.type.with_quant(_channel_quant(32, acc_scales, 0))
        return w, b


def _channel_quant(
    bits: int, scales: tuple[float, ...], axis: int, narrow: bool = False
) -> QuantParams:
    """Per-channel parameters, or per-tensor when every channel has the same scale."""
    if len(set(scales)) == 1:
        return QuantParams(bits, True, scales[:1], narrow=narrow)
    return QuantParams(bits, True, scales, axis=axis, narrow=narrow)


def _origin(value: Value) -> str:
    return value.producer.label() if value.producer is not None else value.name


def _provably_non_negative(value: Value) -> bool:
    node = value.producer
    if node is None:
        return False
    if node.opdef.is_non_negative(node.attrs):
        return True
    if node.opdef.has(Trait.MOVEMENT):
        source = node.inputs[0]
        return source is not None and _provably_non_negative(source)
    return False


def _wide(value: Value) -> bool:
    """A transformer value kept at ``wide_bits``: the residual stream (the input of a
    LayerNorm, and the operands of additions feeding one) and the LayerNorm and GELU
    outputs that dense layers read (8 bits lose BERT's outlier channels there)."""
    producer = value.producer
    if producer is not None and producer.opdef.has(Trait.WIDE):
        return True
    for use in value.uses():
        reader = use.node
        if reader.op == "LayerNormalization":
            return True
        if reader.op == "Add" and any(
            u.node.op in ("LayerNormalization", "Add") and _wide(reader.output)
            for u in reader.output.uses()
        ):
            return True
    return False


@dataclass(frozen=True)
class Affine:
    """A float value that is ``a * source + b`` of a raw integer ``source`` (an attention
    mask on its way to becoming additive): kept symbolic, never computed in float."""

    source: Value
    a: float
    b: float


MASK_FLOOR = -1000.0
"""An additive mask value at or below this removes a position (``exp(-1000)`` is 0)."""


def _keep_mask(low: _Lowering, node: Node, mask: Affine) -> Value:
    """The 0/1 ``keep`` tensor (u8) of an additive mask ``a * m + b`` of a 0/1 input ``m``.

    ``m`` counts as 1 when non-zero. Either ``b = 0`` and ``a + b <= -1000`` (drop where
    ``m`` is set) or ``b <= -1000`` and ``a + b = 0`` (keep where ``m`` is set, as BERT's
    ``(1 - m) * -10000``).
    """
    keep_if_set = mask.b <= MASK_FLOOR and abs(mask.a + mask.b) < 1e-6
    drop_if_set = abs(mask.b) < 1e-6 and mask.a + mask.b <= MASK_FLOOR
    if not (keep_if_set or drop_if_set):
        raise UnsupportedOpError(
            f"an additive mask {mask.a:g} * m + {mask.b:g} is neither 0 nor <= {MASK_FLOOR:g}"
            " for m in {0, 1}",
            node=node.label(),
            hint="integer attention supports 0/1 masks that keep or remove positions",
        )
    name = node.label()
    flag = low.dst.add("Cast", [mask.source], {"to": "bool"}, name=name).output
    if drop_if_set:
        flag = low.dst.add("Not", [flag], name=name).output
    return low.dst.add("Cast", [flag], {"to": "u8"}, name=name).output


def _bias_reader(node: Node) -> tuple[Node, np.ndarray] | None:
    """The ``Add`` of a constant bias vector that alone reads ``node``'s output, if any."""
    out = node.output
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output or uses[0].node.op != "Add":
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].index]
    n = out.type.shape[-1]
    if other is None or other.const is None or other.const.size != n:
        return None
    if other.type.rank > 1 and other.type.shape[-1] != n:
        return None
    return add, np.asarray(other.const, np.float64).reshape(n)


# ----- one rule per float op -------------------------------------------------------------------

Lowering = Callable[[_Lowering, Node], None]
LOWERINGS: RuleTable[Lowering] = RuleTable()
"""Float op -> the rule that lowers it into the integer graph."""
_rule = LOWERINGS.register


def _bias(node: Node, index: int) -> np.ndarray | None:
    value = node.inputs[index] if index < len(node.inputs) else None
    return None if value is None else np.asarray(value.const, np.float64).reshape(-1)


@_rule("Conv")
def _conv(low: _Lowering, node: Node) -> None:
    x = low.materialize(node.inputs[0])  # type: ignore[arg-type]
    w, b = low.linear(node, x, 0, _bias(node, 2))
    acc = low.emit(node, "QConv", [x, w, b], **node.attrs)
    low.pending[node.output] = Accumulator(acc)


@_rule("Gemm")
def _gemm(low: _Lowering, node: Node) -> None:
    attrs = node.attrs
    if attrs["transA"]:
        raise UnsupportedOpError("Gemm with transA=1 in the integer path", node=node.label())
    x = low.materialize(node.inputs[0])  # type: ignore[arg-type]
    c = node.inputs[2].const if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if c is not None:
        n = node.output.type.shape[1]
        if c.ndim == 2 and c.shape[0] != 1:
            raise UnsupportedOpError("Gemm bias varying per row", node=node.label())
        c = np.broadcast_to(np.asarray(c, np.float64).reshape(-1), (n,)) * attrs["beta"]
    w, b = low.linear(node, x, 0 if attrs["transB"] else 1, c, alpha=attrs["alpha"])
    acc = low.emit(node, "QGemm", [x, w, b], transB=attrs["transB"])
    low.pending[node.output] = Accumulator(acc)


@_rule("MatMul")
def _matmul(low: _Lowering, node: Node) -> None:
    b_value = node.inputs[1]
    a = low.materialize(node.inputs[0])  # type: ignore[arg-type]
    if b_value is None or b_value.const is None:
        # Two activations (attention's Q K^T and P V): int32 products at s_a * s_b.
        other = low.materialize(b_value)  # type: ignore[arg-type]
        low.pending[node.output] = Accumulator(low.emit(node, "QBatchMatMul", [a, other]))
        return
    if b_value.type.rank != 2:
        raise UnsupportedOpError("MatMul with a constant B of rank != 2", node=node.label())
    bias = _bias_reader(node)
    w, b = low.linear(node, a, 1, None if bias is None else bias[1])
    acc = low.emit(node, "QMatMul", [a, w] if b is None else [a, w, b])
    if bias is None:
        low.pending[node.output] = Accumulator(acc)
    else:  # the bias Add is folded in: it becomes the accumulator
        low.absorbed.add(bias[0])
        low.pending[bias[0].output] = Accumulator(acc)


@_rule("Relu", "Clip")
def _activation(low: _Lowering, node: Node) -> None:
    source = node.inputs[0]
    assert source is not None
    low_real = 0.0 if node.op == "Relu" else node.attrs["min"]
    high_real = math.inf if node.op == "Relu" else node.attrs["max"]
    # Fuse into the pending rescale only when the activation is its sole reader.
    if source in low.pending and len(source.uses()) == 1 and not source.is_graph_output:
        quant = low.activation_quant(node.output)
        scale = quant.scale[0]
        lo = (
            quant.qmin
            if low_real == -math.inf
            else max(quant.qmin, math.floor(low_real / scale + 0.5))
        )
        hi = (
            quant.qmax
            if high_real == math.inf
            else min(quant.qmax, math.floor(high_real / scale + 0.5))
        )
        pending = low.pending.pop(source)
        low.ints[node.output] = pending.finish(low, quant, lo, hi, node.label())
        return
    # Already an integer (after a MaxPool, say): clamp in integer units, keeping the scale.
    x = low.materialize(source)
    scale = _scale(x)
    bounds = {"min": math.floor(low_real / scale + 0.5) if low_real > -math.inf else -math.inf}
    bounds["max"] = math.floor(high_real / scale + 0.5) if high_real < math.inf else math.inf
    low.ints[node.output] = low.emit(node, "Clip", [x], **bounds)


@_rule("Add")
def _add(low: _Lowering, node: Node) -> None:
    if node in low.absorbed:
        return
    x, y = node.inputs
    assert x is not None and y is not None
    for scores, mask in ((x, y), (y, x)):
        if mask in low.affine:  # attention scores + an additive 0/-inf mask: a keep mask
            low.masked[node.output] = (scores, _keep_mask(low, node, low.affine[mask]))
            return
    a, b = low.materialize(x), low.materialize(y)
    try:
        np.broadcast_shapes(a.type.shape, b.type.shape)
    except ValueError:
        raise UnsupportedOpError("Add of shapes that do not broadcast", node=node.label()) from None
    low.pending[node.output] = Sum(a, b)


def _scalar(value: Value | None) -> float | None:
    if value is None or value.const is None or value.const.size != 1:
        return None
    return float(np.asarray(value.const).reshape(()))


@_rule("Mul", "Div")
def _scale_by_constant(low: _Lowering, node: Node) -> None:
    x, c = node.inputs
    assert x is not None and c is not None
    if node.op == "Mul" and (_scalar(x) is not None or (x.is_const and not c.is_const)):
        x, c = c, x
    factor = _scalar(c)
    if factor is not None and node.op == "Div":
        factor = 1.0 / factor if factor else None
    if factor is not None and x in low.affine:  # a mask on its way: stay symbolic
        mask = low.affine[x]
        low.affine[node.output] = Affine(mask.source, mask.a * factor, mask.b * factor)
        return
    pending = low.pending.get(x)
    if factor is not None and factor > 0 and isinstance(pending, Accumulator):
        low.pending[node.output] = Accumulator(pending.acc, pending.factor * factor)
        return
    if node.op == "Mul" and c.is_const and _fold_channel_scale(low, node, x, c):
        return
    if node.op == "Mul" and not x.is_const and x not in low.affine and c not in low.affine:
        # Two activations, or one and a constant this cannot fold (quantized per tensor).
        low.pending[node.output] = Product(low.materialize(x), low.materialize(c))
        return
    raise UnsupportedOpError(
        f"{node.op} in the integer path: only a positive constant scaling an accumulator"
        " (folded into its requantization) or a product is supported",
        node=node.label(),
    )


def _fold_channel_scale(low: _Lowering, node: Node, x: Value, c: Value) -> bool:
    """A per-output-channel constant (LayerScale's ``gamma``) times a layer's pending
    accumulator, folded into the layer's weight and bias scales, and so into the dyadic
    multipliers of its requantization: the integer weights only change sign where ``gamma``
    is negative (and vanish where it is 0). False when the pattern does not fit."""
    pending = low.pending.get(x)
    layer = pending.acc.producer if isinstance(pending, Accumulator) else None
    if layer is None or layer.opdef.weight_axis is None or len(x.uses()) != 1:
        return False
    if x.is_graph_output or c.const is None:
        return False
    acc = pending.acc  # type: ignore[union-attr]
    axis = 1 if layer.op == "QConv" else acc.type.rank - 1
    gamma = _channel_vector(np.asarray(c.const, np.float64), x.type.shape, axis)
    w_axis = layer.opdef.weight_axis(layer)
    if gamma is None or w_axis is None:
        return False
    x_q, w, b = (*layer.inputs, None)[:3]
    assert x_q is not None and w is not None and w.const is not None
    sign = np.sign(gamma)
    w_quant, shape = w.type.quant, [1] * w.type.rank
    assert w_quant is not None
    shape[w_axis] = len(gamma)
    old = np.broadcast_to(np.asarray(w_quant.scale), gamma.shape)
    scales = tuple(float(s * abs(g)) if g else float(s) for s, g in zip(old, gamma))
    weights = (w.const * sign.reshape(shape)).astype(w.const.dtype)
    low.dst.remove(layer)
    low.dst.remove_constant(w)
    new_w = low.dst.add_constant(weights, w.name)
    new_w.type = new_w.type.with_quant(_channel_quant(w_quant.bits, scales, w_axis, narrow=True))
    inputs = [x_q, new_w]
    if b is not None:
        assert b.const is not None
        low.dst.remove_constant(b)
        s_x = _scale(x_q)
        new_b = low.dst.add_constant((b.const * sign).astype(np.int32), b.name)
        new_b.type = new_b.type.with_quant(_channel_quant(32, tuple(s_x * s for s in scales), 0))
        inputs.append(new_b)
    refolded = low.dst.add(
        layer.op, inputs, layer.attrs, name=layer.name, out_names=[acc.name]
    ).output
    low.pending[node.output] = Accumulator(refolded, pending.factor)  # type: ignore[union-attr]
    return True


def _channel_vector(c: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    """The entries of constant ``c`` along ``axis`` of ``shape`` when ``c`` broadcasts to it
    varying along that axis only, else None."""
    if c.ndim > len(shape):
        return None
    dims = (1,) * (len(shape) - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(dims) if i != axis) or dims[axis] != shape[axis]:
        return None
    return c.reshape(-1)


@_rule("Cast")
def _cast(low: _Lowering, node: Node) -> None:
    x = node.inputs[0]
    assert x is not None
    source = low.ints.get(x)
    if source is None or source.type.quant is not None or not node.output.type.dtype.is_float:
        raise UnsupportedOpError("Cast in the integer path", node=node.label())
    low.affine[node.output] = Affine(source, 1.0, 0.0)


@_rule("Sub")
def _sub(low: _Lowering, node: Node) -> None:
    x, y = node.inputs
    if x in low.affine and _scalar(y) is not None:
        m = low.affine[x]
        low.affine[node.output] = Affine(m.source, m.a, m.b - _scalar(y))  # type: ignore[operator]
    elif y in low.affine and _scalar(x) is not None:
        m = low.affine[y]
        low.affine[node.output] = Affine(m.source, -m.a, _scalar(x) - m.b)  # type: ignore[operator]
    elif x in low.affine or y in low.affine:
        raise UnsupportedOpError(
            "Sub of an attention mask and a tensor in the integer path", node=node.label()
        )
    else:  # a difference of activations: a QAdd with a negative multiplier
        a, b = low.materialize(x), low.materialize(y)  # type: ignore[arg-type]
        low.pending[node.output] = Sum(a, b, subtract=True)


@_rule("Gather")
def _gather(low: _Lowering, node: Node) -> None:
    """An embedding lookup: the table quantized per tensor, the lookup moves integers."""
    table, index = node.inputs
    if table is None or table.const is None or index not in low.ints:
        raise UnsupportedOpError(
            "Gather in the integer path needs a constant table and integer indices",
            node=node.label(),
        )
    bits = low.options.bits(node.label()).weights
    q, scales = quantize_weights(table.const.reshape(1, -1), bits, 0)
    const = low.dst.add_constant(q.reshape(table.const.shape), table.name)
    const.type = const.type.with_quant(QuantParams(bits, True, scales, narrow=True))
    low.ints[node.output] = low.emit(node, "Gather", [const, low.ints[index]], **node.attrs)


@_rule("GlobalAveragePool")
def _global_avgpool(low: _Lowering, node: Node) -> None:
    x = low.materialize(node.inputs[0])  # type: ignore[arg-type]
    low.pending[node.output] = Accumulator(low.emit(node, "QGlobalAveragePool", [x]))


@_rule("ReduceMean", "ReduceSum")
def _reduce_sum(low: _Lowering, node: Node) -> None:
    """An int32 sum over the axes; a mean's ``1/N`` lives in the accumulator's scale."""
    x = low.materialize(node.inputs[0])  # type: ignore[arg-type]
    acc = low.emit(
        node,
        "QReduceSum",
        [x],
        axes=node.attrs["axes"],
        keepdims=node.attrs["keepdims"],
        mean=int(node.op == "ReduceMean"),
    )
    low.pending[node.output] = Accumulator(acc)


@_rule("AveragePool")
def _avgpool(low: _Lowering, node: Node) -> None:
    attrs = node.attrs
    if any(attrs["pads"]) or attrs["ceil_mode"]:
        raise UnsupportedOpError(
            "AveragePool with padding or ceil_mode in the integer path", node=node.label()
        )
    x = low.materialize(node.inputs[0])  # type: ignore[arg-type]
    acc = low.emit(
        node, "QAveragePool", [x], kernel_shape=attrs["kernel_shape"], strides=attrs["strides"]
    )
    low.pending[node.output] = Accumulator(acc)


@_rule(*ops_with(Trait.MOVEMENT))
def _movement(low: _Lowering, node: Node) -> None:
    x = low.materialize(node.inputs[0])  # type: ignore[arg-type]
    low.ints[node.output] = low.emit(node, node.op, [x], **node.attrs)


@_rule("Pad")
def _pad(low: _Lowering, node: Node) -> None:
    if node.attrs["mode"] == "constant" and node.attrs["value"] != 0.0:
        raise UnsupportedOpError(
            "Pad with a non-zero constant in the integer path", node=node.label()
        )
    _movement(low, node)


@_rule("Concat")
def _concat(low: _Lowering, node: Node) -> None:
    quant = low.activation_quant(node.output)
    parts = []
    for value in node.inputs:
        x = low.materialize(value)  # type: ignore[arg-type]
        if x.type.quant != quant:
            x = Accumulator(x).finish(low, quant, quant.qmin, quant.qmax, node.label())
        parts.append(x)
    low.ints[node.output] = low.emit(node, "Concat", parts, axis=node.attrs["axis"])


@_rule("Softmax")
def _softmax(low: _Lowering, node: Node) -> None:
    source = node.inputs[0]
    assert source is not None
    axis = node.attrs["axis"]
    if node.output.is_graph_output or axis not in (-1, source.type.rank - 1):
        # A classifier's last op: it runs in float after the output dequantization.
        x = low.dequantized(source)
        low.floats[node.output] = low.emit(node, "Softmax", [x], axis=axis)
        return
    source, keep = low.masked.get(source, (source, None))
    variant = low.options.variant("QSoftmax")
    pending = low.pending.get(source)
    per_tensor = isinstance(pending, Accumulator) and _scale_count(pending.acc) == 1
    if isinstance(pending, Accumulator) and per_tensor and variant != "lut":
        # The int32 scores themselves: no rounding before the exponent.
        x, scale = pending.acc, pending.scale
    else:
        if variant == "lut":
            x = _rescaled(low, source, _signed_quant(low, source, 8), node)
        else:
            x = low.materialize(source)
        scale = _scale(x)
    inputs = [x] if keep is None else [x, keep]
    low.ints[node.output] = low.emit(node, "QSoftmax", inputs, variant=variant, scale=scale)


def _signed_quant(low: _Lowering, value: Value, bits: int) -> QuantParams:
    """Signed ``bits``-bit parameters covering ``value``'s calibrated range."""
    calibrated = low.activation_quant(value, non_negative=False)
    threshold = calibrated.scale[0] * ((1 << (calibrated.bits - 1)) - 1)
    return QuantParams(bits, True, (threshold / ((1 << (bits - 1)) - 1),))


def _rescaled(low: _Lowering, value: Value, quant: QuantParams, node: Node) -> Value:
    """``value`` as an integer with exactly ``quant`` (requantized when it differs)."""
    pending = low.pending.get(value)
    if isinstance(pending, Accumulator):
        return pending.finish(low, quant, quant.qmin, quant.qmax, node.label())
    x = low.materialize(value)
    if x.type.quant == quant:
        return x
    return Accumulator(x).finish(low, quant, quant.qmin, quant.qmax, node.label())


@_rule("Gelu")
def _gelu(low: _Lowering, node: Node) -> None:
    source = node.inputs[0]
    assert source is not None
    variant = low.options.variant("QGelu")
    x = _rescaled(low, source, _signed_quant(low, source, 8 if variant == "lut" else 16), node)
    out = low.activation_quant(node.output, non_negative=False)
    low.ints[node.output] = low.emit(
        node, "QGelu", [x], variant=variant, **_output_attrs(out, out.qmin, out.qmax)
    )


@_rule(*ops_with(Trait.ELEMENTWISE))
def _tabled(low: _Lowering, node: Node) -> None:
    """An elementwise function of an 8-bit input: its exactly rounded 256-entry table,
    evaluated by the reference semantics at every input code (a pending accumulator is
    requantized to its calibrated width first)."""
    source = node.inputs[0]
    assert source is not None
    x = low.materialize(source)
    quant = x.type.quant
    if quant is None or quant.axis is not None or x.type.dtype not in (DType.I8, DType.U8):
        raise UnsupportedOpError(
            f"{node.op} of a {x.type} input in the integer path: only 8-bit inputs are tabled",
            node=node.label(),
            hint="a 16-bit input (a transformer's residual stream) is not supported yet;"
            " give the layer before it 8-bit activations",
        )
    out = low.activation_quant(node.output)
    kernel = EVAL[node.op]
    try:
        table = elementwise_table(
            lambda v: kernel(node, v)[0],
            quant.scale[0],
            quant.bits,
            quant.signed,
            out.scale[0],
            out.qmin,
            out.qmax,
        )
    except NumericsError as err:
        raise UnsupportedOpError(f"{node.op} cannot be tabled: {err}", node=node.label()) from None
    low.ints[node.output] = low.emit(
        node, "QLookup", [x], table=tuple(table.tolist()), **_output_attrs(out, out.qmin, out.qmax)
    )


@_rule("LayerNormalization")
def _layernorm(low: _Lowering, node: Node) -> None:
    x_value, gamma, beta = (*node.inputs, None, None)[:3]
    if node.attrs["axis"] not in (-1, node.output.type.rank - 1):
        raise UnsupportedOpError(
            "LayerNormalization over more than the last axis", node=node.label()
        )
    if gamma is None or gamma.const is None or (beta is not None and beta.const is None):
        raise UnsupportedOpError(
            "LayerNormalization with non-constant gamma/beta", node=node.label()
        )
    x = low.materialize(x_value)  # type: ignore[arg-type]
    if x.type.dtype.bits > 16:
        raise UnsupportedOpError("LayerNormalization of a >16-bit input", node=node.label())
    size = x.type.shape[-1]
    g = np.asarray(gamma.const, np.float64).reshape(size)
    b = np.zeros(size) if beta is None else np.asarray(beta.const, np.float64).reshape(size)
    out = low.activation_quant(node.output, non_negative=False)
    constants = layernorm_constants(
        g.tolist(), b.tolist(), node.attrs["epsilon"], _scale(x), out.scale[0]
    )
    low.ints[node.output] = low.emit(
        node,
        "QLayerNorm",
        [x],
        variant=low.options.variant("QLayerNorm"),
        **constants,
        **_output_attrs(out, out.qmin, out.qmax),
    )


def kernel_specs() -> dict[str, KernelSpec]:
    """The integer kernels' variant specs, keyed as ``QuantConfig.kernels`` is."""
    return {opdef.kernel.key: opdef.kernel for opdef in OPS.values() if opdef.kernel}


@dataclass(frozen=True)
class Integerize(Pass):
    """Lower the calibrated float graph to an integer-only graph (a new graph).

    Reads the :class:`CalibrationStats` that ``calibrate`` stored on the graph. The options
    are :class:`intq.QuantConfig`'s: default widths, the clipping method, per-layer widths by
    original node name, the transformer's residual width and the kernel variants
    (``{"softmax": "shift"}``; the others keep their defaults).
    """

    name: ClassVar[str] = "integerize"
    weight_bits: int = 8
    activation_bits: int = 8
    calibration: str = "minmax"
    percentile: float = 99.99
    layer_bits: Mapping[str, LayerBits] = field(default_factory=dict)
    wide_bits: int = 16
    kernels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.calibration not in CLIP_METHODS:
            raise IntqError(
                f"unknown calibration method {self.calibration!r}",
                hint=f"use one of {', '.join(CLIP_METHODS)}",
            )
        specs = kernel_specs()
        for key, variant in self.kernels.items():
            spec = specs.get(key)
            if spec is None:
                raise IntqError(
                    f"unknown kernel {key!r}", hint=f"the kernels are: {', '.join(sorted(specs))}"
                )
            if variant not in spec.variants:
                raise IntqError(
                    f"unknown {key} variant {variant!r}",
                    hint=f"use one of {', '.join(spec.variants)}",
                )

    def bits(self, node_name: str) -> LayerBits:
        """The bit widths of the layer named ``node_name``."""
        return self.layer_bits.get(node_name) or LayerBits(self.weight_bits, self.activation_bits)

    def variant(self, op: str) -> str:
        """The chosen variant of kernel op ``op`` (``QSoftmax``...)."""
        spec = OPS[op].kernel
        assert spec is not None
        return self.kernels.get(spec.key, spec.default)

    @property
    def divides(self) -> bool:
        """Whether a chosen kernel variant divides at run time."""
        return any(
            self.kernels.get(key, spec.default) in spec.dividing
            for key, spec in kernel_specs().items()
        )

    def requires(self, graph: Graph) -> None:
        if graph.analysis(CalibrationStats) is None:
            raise PassError(
                "integerize needs the graph's calibration statistics: run the calibrate pass"
                " first (intq.quantize runs both)"
            )

    def run(self, graph: Graph) -> PassResult:
        stats = graph.analysis(CalibrationStats)
        assert stats is not None
        return PassResult(_Lowering(graph, stats, self).run(), True)


def integerize(graph: Graph, stats: Mapping[Value, Stats], options: Integerize) -> Graph:
    """The integer-only graph computing ``graph`` with the calibrated ``stats`` (the lowering
    of :class:`Integerize`, for callers that hold statistics of their own)."""
    return _Lowering(graph, stats, options).run()
