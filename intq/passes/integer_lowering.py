"""The integer lowering's state: values waiting for their scale, and the lowering itself.

:class:`Lowering` walks a calibrated float graph and builds the integer graph; each float
op's rule (:mod:`intq.passes.integer_rules`) reads and extends its tables. A result that
needs an output scale stays *pending* (:class:`Accumulator`, :class:`Sum`, :class:`Product`)
until a reader asks for it, so that a following ReLU becomes the clamp of the one rescale.
:mod:`intq.passes.integerize` describes the lowering as a whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from intq.errors import IntqError, NumericsError, UnsupportedOpError
from intq.ir.graph import Graph, Node, Value
from intq.ir.types import QuantParams
from intq.ops import Trait
from intq.passes.bias_correction import corrected_bias
from intq.passes.calibration import AUTO_FALLBACK, MIN_THRESHOLD, ClipChoices, ClipRule
from intq.passes.learned_rounding import Rounded, RoundedWeights
from intq.passes.model_quantization import ModelQuantization
from intq.passes.precision import quantize_weights
from intq.semantics.numerics import common_shift, count_divisors, dyadic, storage_dtype
from intq.tables import RuleTable

if TYPE_CHECKING:
    from intq.passes.integerize import Integerize


class Stats(Protocol):
    """What the lowering needs of a tensor's calibration statistics."""

    @property
    def min(self) -> float: ...

    def top(self, signed: bool) -> float: ...

    def clip(self, method: str, bits: int, signed: bool, percentile: float = ...) -> float: ...


# ----- values that are not materialized yet -----------------------------------------------------


class Pending(Protocol):
    """An integer result waiting for its output scale and clamp."""

    def finish(self, lowering: Lowering, quant: QuantParams, lo: int, hi: int, name: str) -> Value:
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
        return scale_of(self.acc) * self.factor

    def finish(self, lowering: Lowering, quant: QuantParams, lo: int, hi: int, name: str) -> Value:
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
                **output_attrs(quant, lo, hi),
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

    def finish(self, lowering: Lowering, quant: QuantParams, lo: int, hi: int, name: str) -> Value:
        s_out = quant.scale[0]
        (ma, mb), shift = common_shift(scale_of(self.a) / s_out, scale_of(self.b) / s_out)
        if self.subtract:
            mb = -mb
        node = lowering.dst.add(
            "QAdd",
            [self.a, self.b],
            {
                "multiplier_a": ma,
                "multiplier_b": mb,
                "shift": shift,
                **output_attrs(quant, lo, hi),
            },
            name=name,
        )
        return node.output


@dataclass
class Product:
    """A product of two integer activations (SiLU's ``x * sigmoid(x)``, a gate)."""

    a: Value
    b: Value

    def finish(self, lowering: Lowering, quant: QuantParams, lo: int, hi: int, name: str) -> Value:
        step = dyadic(scale_of(self.a) * scale_of(self.b) / quant.scale[0])
        node = lowering.dst.add(
            "QMul",
            [self.a, self.b],
            {"multiplier": step.multiplier, "shift": step.shift, **output_attrs(quant, lo, hi)},
            name=name,
        )
        return node.output


@dataclass(frozen=True)
class Count:
    """How many positions a 0/1 mask keeps along the reduced axes: a raw int32 ``value`` of
    the integer graph in ``0..length`` (``length`` the reduced size, known at compile time)."""

    value: Value
    length: int


@dataclass
class CountMean:
    """A masked sum divided by its run-time count (sentence-transformers' mean pooling):
    one ``QDivCount``, whose multiplier for each count ``c`` is ``s_sum / (c s_out)``."""

    total: Accumulator
    count: Count

    def finish(self, lowering: Lowering, quant: QuantParams, lo: int, hi: int, name: str) -> Value:
        multipliers, shifts = count_divisors(self.total.scale / quant.scale[0], self.count.length)
        node = lowering.dst.add(
            "QDivCount",
            [self.total.acc, self.count.value],
            {"multiplier": multipliers, "shift": shifts, **output_attrs(quant, lo, hi)},
            name=name,
        )
        return node.output


def output_attrs(quant: QuantParams, lo: int, hi: int) -> dict[str, int | float]:
    return {
        "bits": quant.bits,
        "signed": int(quant.signed),
        "scale": quant.scale[0],
        "lo": lo,
        "hi": hi,
    }


def scale_count(value: Value) -> int:
    """How many scales ``value`` has (1: per tensor)."""
    q = value.type.quant
    assert q is not None
    return 1 if q.axis is None else len(q.scale)


def scale_of(value: Value) -> float:
    q = value.type.quant
    assert q is not None and q.axis is None
    return q.scale[0]


# ----- the lowering --------------------------------------------------------------------------


class Lowering:
    """The state of one integer lowering: the new graph and, for every float value of the
    source, its integer form, its pending rescale or its float form after the boundary."""

    def __init__(
        self,
        src: Graph,
        stats: Mapping[Value, Stats],
        options: Integerize,
        model: ModelQuantization | None = None,
        choices: Mapping[Value, ClipRule] | None = None,
        means: Mapping[Value, np.ndarray] | None = None,
        rounded: Mapping[Value, Rounded] | None = None,
    ):
        self.src = src
        self.stats = stats
        self.options = options
        self.choices = choices if choices is not None else {}
        self.clips: dict[Value, ClipRule] = {}  # the rule that set each calibrated scale
        self.means = means if means is not None else {}  # bias correction's mean inputs
        self.rounded = rounded if rounded is not None else {}  # learned rounding's integers
        self.learned: dict[Value, Rounded] = {}  # the weights of dst that took them
        self.model = model if model is not None else ModelQuantization({})
        self.dst = Graph(src.name)
        self.ints: dict[Value, Value] = {}
        self.pending: dict[Value, Pending] = {}
        self.floats: dict[Value, Value] = {}
        self.absorbed: set[Node] = set()
        self.affine: dict[Value, Affine] = {}
        self.masked: dict[Value, tuple[Value, Value]] = {}
        self.counts: dict[Value, Count] = {}

    # ----- scales ---------------------------------------------------------------------

    def activation_quant(self, value: Value, non_negative: bool | None = None) -> QuantParams:
        """The quantization of float tensor ``value``: the model's own where a pre-quantized
        model states it (:class:`ModelQuantization`), else from its calibration statistics.

        ``non_negative`` forces unsigned (True) or signed (False); ``None`` lets the model's
        quantization decide, else whether the value is provably non-negative.
        """
        producer = value.producer
        bits = self.options.bits(producer.name if producer else value.name).activations
        if is_wide(value) and self.options.widened(producer.name if producer else value.name):
            bits = max(bits, self.options.wide_bits)
        if bits > 8:
            bits = max(8, min(bits, operand_bits(value)))
        model = self.model.activation(value)
        if model is not None:
            if non_negative is None and model.exact is None:
                # A range intq cannot keep: unsigned where intq knows the value is
                # non-negative, which halves the step of the covering range.
                non_negative = model.lo >= 0 or provably_non_negative(value)
            return model.quant(bits, None if non_negative is None else not non_negative)
        stats = self.stats.get(value)
        if stats is None:
            if self.model:
                raise IntqError(
                    f"no quantization for %{value.name}: the pre-quantized model does not"
                    " quantize it (no QuantizeLinear/DequantizeLinear pair) and no calibration"
                    " data was given",
                    node=origin(value),
                    hint="pass calibration data: it fills the values the model left in float",
                )
            raise IntqError(f"no calibration statistics for %{value.name}", node=origin(value))
        if non_negative is None:
            non_negative = provably_non_negative(value)
        rule = self.clip_rule(value)
        self.clips[value] = rule
        top = stats.top(not non_negative)
        if 0.0 < top < MIN_THRESHOLD:
            # The threshold would be floored to MIN_THRESHOLD and every value round to 0: a
            # model that runs and answers zeros. Refused rather than warned about, since the
            # artifact would be wrong whoever reads the warning.
            raise NumericsError(
                f"%{value.name}'s calibration data reach only {top:.3g}, below the smallest"
                f" range intq quantizes ({MIN_THRESHOLD:g}): every value would quantize to 0",
                node=origin(value),
                hint="scale the calibration and run-time data up (normalise the model's"
                " inputs to about unit range), or rescale the layer's weights",
            )
        threshold = stats.clip(rule.method, bits, not non_negative, rule.percentile)
        qmax = (1 << bits) - 1 if non_negative else (1 << (bits - 1)) - 1
        return QuantParams(bits, not non_negative, (threshold / qmax,))

    def clip_rule(self, value: Value) -> ClipRule:
        """How ``value``'s threshold comes from its statistics: ``auto``'s choice for it, or
        the configured method."""
        if self.options.calibration == "auto":
            return self.choices.get(value, AUTO_FALLBACK)
        return ClipRule(self.options.calibration, self.options.percentile)

    # ----- materializing -------------------------------------------------------------

    def materialize(self, value: Value) -> Value:
        """The integer form of float value ``value`` (requantizing a pending result)."""
        if value in self.ints:
            return self.ints[value]
        if value in self.pending:
            quant = self.activation_quant(value)
            result = self.pending.pop(value).finish(
                self, quant, quant.qmin, quant.qmax, origin(value)
            )
            self.ints[value] = result
            return result
        if value in self.floats:
            raise UnsupportedOpError(
                f"%{value.name} is computed in float after dequantization and feeds an integer op",
                node=origin(value),
                hint="only a model's final ops (such as Softmax) can stay in float",
            )
        if value.is_const:
            return self.constant_activation(value)
        raise IntqError(f"no integer value for %{value.name}", node=origin(value))

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
        out = self.dst.add("Dequantize", [source], name=origin(value)).output
        self.floats[value] = out
        return out

    # ----- driving ---------------------------------------------------------------------

    def run(self, rules: RuleTable[Callable[[Lowering, Node], None]]) -> Graph:
        """Lower every node of the source graph by its rule in ``rules``; returns the new graph."""
        for value in self.src.inputs:
            self.input(value)
        for node in self.src:
            if node in self.absorbed:  # lowered with the node that matched it
                continue
            rules.rule_for(node, "integer lowering")(self, node)
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
        self.dst.store_analysis(
            ClipChoices({self.ints[v]: rule for v, rule in self.clips.items() if v in self.ints})
        )
        self.dst.store_analysis(RoundedWeights(self.learned))
        return self.dst

    def input(self, value: Value) -> None:
        if value.type.dtype.is_integer:  # token ids, attention masks: used as they are
            self.ints[value] = self.dst.add_input(value.name, value.type)
            return
        stats = self.stats.get(value)
        model = self.model.activation(value)
        if model is not None:  # the model's signedness: a uint8 input clamps negatives
            quant = self.activation_quant(value)
        else:
            quant = self.activation_quant(value, stats is not None and stats.min >= 0)
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
        the float ``bias`` as int32 at ``s_x * s_w[c]``, less the mean shift the weights'
        rounding causes where bias correction has the layer's mean input (a layer without a
        bias then gets one).

        A BatchNorm with a tiny gamma leaves a channel with tiny weights but a real bias;
        its weight scale is raised until the bias fits comfortably in int32 (below 2^30).

        A grouped transposed convolution has ``groups * channels`` biases for its weights'
        ``channels`` scales along ``axis``: output channel ``g * channels + j`` has scale
        ``s_x * s_w[j]``, and the floor of ``s_w[j]`` serves every group's bias.
        """
        value = node.inputs[1]
        if value is None or value.const is None:
            raise UnsupportedOpError(
                f"{node.op} needs constant weights in the integer path", node=node.label()
            )
        bits = self.options.bits(node.label()).weights
        s_x = scale_of(x)
        channels = value.const.shape[axis]
        floor = None
        if bias is not None:
            floor = (np.abs(bias) / (s_x * 2.0**30)).reshape(-1, channels).max(axis=0)
        # A pre-quantized model's own scales reproduce its integers (alpha would change them).
        model = self.model.weight(value)
        given = None
        if model is not None and alpha == 1.0:
            given = model.channel_scales(value.const.shape, axis, bits)
        learned = self.rounded.get(value) if self.options.learns(node.label()) else None
        if learned is not None and not (given is None and alpha == 1.0 and _holds(learned, floor)):
            learned = None
        if learned is not None:
            q, scales = learned.q.astype(storage_dtype(bits, True)), learned.scales
        else:
            q, scales = quantize_weights(value.const * alpha, bits, axis, floor, given)
        w = self.dst.add_constant(q, value.name)
        if learned is not None:
            self.learned[w] = learned  # the integer graph's own record, for the layer table
        w.type = w.type.with_quant(channel_quant(bits, scales, axis, narrow=True))
        corrects = given is None and self.options.corrects(node.label())
        mean = self.means.get(node.output) if corrects else None
        if mean is not None:  # a pre-quantized model's own integers and biases stay as they are
            shape = [1] * q.ndim
            shape[axis] = -1
            dequantized = q * np.asarray(scales).reshape(shape)
            bias = corrected_bias(bias, value.const * alpha, dequantized, axis, mean)
        if bias is None:
            return w, None
        acc_scales = tuple(s_x * s for s in scales) * (bias.size // channels)
        b_q = np.rint(bias / np.asarray(acc_scales)).astype(np.int32)
        b = self.dst.add_constant(b_q, f"{node.label()}.bias")
        b.type = b.type.with_quant(channel_quant(32, acc_scales, 0))
        return w, b


def _holds(learned: Rounded, floor: np.ndarray | None) -> bool:
    """Whether learned steps leave room for the layer's bias (at least ``floor``; else the
    lowering raises the steps and rounds to nearest)."""
    return floor is None or bool(np.all(np.asarray(learned.scales) >= floor))


def channel_quant(
    bits: int, scales: tuple[float, ...], axis: int, narrow: bool = False
) -> QuantParams:
    """Per-channel parameters, or per-tensor when every channel has the same scale."""
    if len(set(scales)) == 1:
        return QuantParams(bits, True, scales[:1], narrow=narrow)
    return QuantParams(bits, True, scales, axis=axis, narrow=narrow)


def origin(value: Value) -> str:
    return value.producer.label() if value.producer is not None else value.name


def provably_non_negative(value: Value) -> bool:
    node = value.producer
    if node is None:
        return False
    if node.opdef.is_non_negative(node.attrs):
        return True
    if node.opdef.has(Trait.MOVEMENT) or node.opdef.has(Trait.CONVEX):
        source = node.inputs[0]
        return source is not None and provably_non_negative(source)
    return False


def is_wide(value: Value) -> bool:
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
            u.node.op in ("LayerNormalization", "Add") and is_wide(reader.output)
            for u in reader.output.uses()
        ):
            return True
    return False


INT32_MAX = (1 << 31) - 1
SOFTMAX_MAX = 255
"""The largest QSoftmax output (its probabilities are u8)."""


def operand_bits(value: Value) -> int:
    """The widest activation width at which every product of two activations that reads
    ``value`` (attention's ``Q K^T`` and ``P V``, through reshapes, transposes and constant
    scalings) keeps its int32 accumulator provably in range, however the inputs fall.

    A signed ``b``-bit operand reaches ``2^(b-1)`` in magnitude; the other operand has the
    same width, or is a softmax's u8 probabilities. 32 where no such product reads it.
    """
    widest = 32
    for reader in _matmul_readers(value, set()):
        a, b = reader.inputs
        depth = a.type.shape[-1] if a is not None else None
        if not isinstance(depth, int) or depth <= 0:
            continue  # unknown depth: the range analysis decides
        budget = INT32_MAX // depth
        if any(v is not None and _from_softmax(v) for v in (a, b)):
            fits = (budget // SOFTMAX_MAX).bit_length()  # 2^(b-1) <= budget / 255
        else:
            fits = (budget.bit_length() - 1) // 2 + 1  # 4^(b-1) <= budget
        widest = min(widest, fits)
    return widest


def _passes_along(node: Node) -> bool:
    """Whether ``node`` carries its input to a product unchanged but for movement or a
    constant factor (the export's ``sqrt(scale)`` on Q and K)."""
    if node.opdef.has(Trait.MOVEMENT):
        return True
    return node.op in ("Mul", "Div") and any(v is not None and v.is_const for v in node.inputs)


def _matmul_readers(value: Value, seen: set[Value]) -> list[Node]:
    """The two-activation ``MatMul`` nodes reached from ``value`` along :func:`_passes_along`."""
    if value in seen:
        return []
    seen.add(value)
    found: list[Node] = []
    for use in value.uses():
        node = use.node
        if node.op == "MatMul" and all(v is not None and not v.is_const for v in node.inputs):
            found.append(node)
        elif _passes_along(node):
            found.extend(_matmul_readers(node.output, seen))
    return found


def _from_softmax(value: Value) -> bool:
    """Whether ``value`` is a softmax's output, seen through data movement."""
    producer = value.producer
    while producer is not None and producer.opdef.has(Trait.MOVEMENT):
        source = producer.inputs[0]
        producer = source.producer if source is not None else None
    return producer is not None and producer.op == "Softmax"


@dataclass(frozen=True)
class Affine:
    """A float value that is ``a * source + b`` of a raw integer ``source`` (an attention
    mask on its way to becoming additive): kept symbolic, never computed in float."""

    source: Value
    a: float
    b: float


MASK_FLOOR = -1000.0
"""An additive mask value at or below this removes a position (``exp(-1000)`` is 0)."""


def keep_mask(low: Lowering, node: Node, mask: Affine) -> Value:
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
    return _keep_flags(low, node, mask.source, keep_if_set)


def multiplicative_keep(low: Lowering, node: Node, mask: Affine) -> Value | None:
    """The 0/1 ``keep`` tensor (u8) of a multiplicative mask of a 0/1 input ``m``: ``m``
    itself (``a = 1, b = 0``) or ``1 - m``; None for any other ``a * m + b``.

    ``m`` counts as 1 when non-zero, as in :func:`keep_mask`."""
    if abs(mask.a - 1) < 1e-6 and abs(mask.b) < 1e-6:
        return _keep_flags(low, node, mask.source, keep_if_set=True)
    if abs(mask.a + 1) < 1e-6 and abs(mask.b - 1) < 1e-6:
        return _keep_flags(low, node, mask.source, keep_if_set=False)
    return None


def _keep_flags(low: Lowering, node: Node, source: Value, keep_if_set: bool) -> Value:
    """u8 ``source != 0`` (or ``== 0``) under ``node``'s name."""
    name = node.label()
    flag = low.dst.add("Cast", [source], {"to": "bool"}, name=name).output
    if not keep_if_set:
        flag = low.dst.add("Not", [flag], name=name).output
    return low.dst.add("Cast", [flag], {"to": "u8"}, name=name).output


def bias_reader(node: Node) -> tuple[Node, np.ndarray] | None:
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
