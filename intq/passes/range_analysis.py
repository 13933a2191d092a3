"""Range analysis: prove that no integer accumulator or product can overflow.

Interval arithmetic over the integer ops, one rule per op in :data:`RULES`.
Intervals start at the clamp ranges of quantized values (and the exact
extremes of constants) and follow each op:

- ``QConv``/``QConvTranspose``/``QGemm``/``QMatMul``: per output channel, the worst case of
  ``sum(w * x) + b`` over the input interval (zero padding included) must fit
  int32.
- ``QGlobalAveragePool``/``QAveragePool``/``QReduceSum``: ``N * x`` must fit int32.
- ``Requantize``: ``acc * M`` (and for ``S <= 0`` the left shift) must fit int64.
- ``QAdd``: ``a * Ma + b * Mb + 2^(S-1)`` must fit int64 (``Mb < 0`` for a Sub).
- ``QMul``: ``a * b`` must fit int32 and ``a * b * M + 2^(S-1)`` stay below 2^62.
- ``QPRelu``: ``x * M + 2^(S-1)`` (``M`` the larger side's) must stay below 2^62.
- ``QMask``: the input's interval and 0.
- ``QDivCount``: the count inside its table's ``0..L``, and ``acc * M[c] + 2^(S[c]-1)`` below
  2^62 for every count.
- ``QLookup``: its table's smallest and largest entries.
- ``QReduceL2``: the sum of squares ``N max(x^2)`` below 2^62. ``QDiv``: a dividend of at
  most 16 bits.
- ``QResize``: per axis a combination of two inputs with weights >= 0 summing to ``2^F``,
  so ``[lo, hi] * 2^(F * axes)``, which must fit int32 (every partial result lies inside).
- Data movement keeps the interval; Concat joins them; Clip intersects; Min and Max take
  the smaller or larger bounds.
- Raw integer index arithmetic (``Add``, ``Sub``, ``Mul``, ``CumSum``, ``Cast`` of token ids
  and masks: position ids): interval arithmetic, which must fit the result's dtype.

A value that could overflow raises :class:`~intq.errors.NumericsError` naming
the layer, the bound and what to do. An integer op without a rule is refused
too, so a new op cannot slip past the proof.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from intq.errors import NumericsError
from intq.ir.graph import Graph, Node, Value, ValueMap
from intq.ir.types import DType
from intq.ir.verifier import verify
from intq.ops import Trait, ops_with
from intq.passes.manager import Pass
from intq.semantics.kernels import GELU_SIGMOID, check_exp_range
from intq.semantics.numerics import clip_bounds
from intq.tables import RuleTable

Interval = tuple[int, int]
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
INT62 = (-(2**62) + 1, 2**62 - 1)

Rule = Callable[[Node, list[Interval | None]], Interval]
RULES: RuleTable[Rule] = RuleTable()
"""Integer op -> ``rule(node, input intervals) -> output interval`` (raises on overflow)."""
_rule = RULES.register


def _fits(node: Node, interval: Interval, bounds: Interval, what: str, hint: str) -> Interval:
    if interval[0] < bounds[0] or interval[1] > bounds[1]:
        width = {INT32: 32, INT62: 62}.get(bounds, 64)
        raise NumericsError(
            f"{what} can reach [{interval[0]}, {interval[1]}], outside int{width}",
            node=node.label(),
            hint=hint,
        )
    return interval


def _clamp(node: Node) -> Interval:
    return node.attrs["lo"], node.attrs["hi"]


@_rule("Quantize")
def _quantize(node: Node, ins: list[Interval | None]) -> Interval:
    q = node.outputs[0].type.quant
    assert q is not None
    return q.qmin, q.qmax


WIDE_HINT = (
    "its input is 16-bit (a transformer's residual stream at wide_bits=16): quantize with a"
    " narrower stream, wide_bits=12 or 8 (in a --config file: wide_bits = 12)"
)
"""What to do when an accumulator over a wide (16-bit) activation cannot be proven to fit."""


def _hint(node: Node, narrow: str) -> str:
    """``narrow``, or :data:`WIDE_HINT` where an input of ``node`` is a 16-bit activation."""
    wide = (DType.I16, DType.U16)
    if any(v is not None and v.type.dtype in wide for v in node.inputs):
        return WIDE_HINT
    return narrow


def _dot_bound(
    node: Node, x: Interval, w: np.ndarray, axis: int, bias: Interval | None
) -> Interval:
    """Worst case of ``sum(w * x)`` per output channel (``axis`` of ``w``), plus the bias."""
    lo, hi = min(x[0], 0), max(x[1], 0)  # zero padding may enter any tap
    per_channel = np.moveaxis(w.astype(np.int64), axis, 0).reshape(w.shape[axis], -1)
    positive = np.where(per_channel > 0, per_channel, 0).sum(axis=1)
    negative = np.where(per_channel < 0, per_channel, 0).sum(axis=1)
    top = positive * hi + negative * lo
    bottom = positive * lo + negative * hi
    b_lo, b_hi = bias or (0, 0)
    interval = (int(bottom.min()) + b_lo, int(top.max()) + b_hi)
    return _fits(
        node,
        interval,
        INT32,
        "the int32 accumulator",
        _hint(node, "use fewer activation or weight bits for this layer, or split its reduction"),
    )


def _const(node: Node, index: int) -> np.ndarray:
    value = node.inputs[index]
    if value is None or value.const is None:
        raise NumericsError(
            f"{node.op} weights must be constant to bound the accumulator", node=node.label()
        )
    return value.const


@_rule("QConv")
def _qconv(node: Node, ins: list[Interval | None]) -> Interval:
    return _dot_bound(node, ins[0], _const(node, 1), 0, ins[2] if len(ins) > 2 else None)  # type: ignore[arg-type]


@_rule("QConvTranspose")
def _qconv_transpose(node: Node, ins: list[Interval | None]) -> Interval:
    """Per output channel of a group (axis 1 of the weights), every input channel and tap:
    a superset of the products any output sums, in every group."""
    return _dot_bound(node, ins[0], _const(node, 1), 1, ins[2] if len(ins) > 2 else None)  # type: ignore[arg-type]


@_rule("QGemm")
def _qgemm(node: Node, ins: list[Interval | None]) -> Interval:
    axis = 0 if node.attrs["transB"] else 1
    return _dot_bound(node, ins[0], _const(node, 1), axis, ins[2] if len(ins) > 2 else None)  # type: ignore[arg-type]


@_rule("QMatMul")
def _qmatmul(node: Node, ins: list[Interval | None]) -> Interval:
    return _dot_bound(node, ins[0], _const(node, 1), 1, ins[2] if len(ins) > 2 else None)  # type: ignore[arg-type]


def _magnitude(interval: Interval | None) -> int:
    assert interval is not None
    return max(abs(interval[0]), abs(interval[1]))


@_rule("QBatchMatMul")
def _qbatch_matmul(node: Node, ins: list[Interval | None]) -> Interval:
    a = node.inputs[0]
    assert a is not None
    bound = a.type.shape[-1] * _magnitude(ins[0]) * _magnitude(ins[1])
    return _fits(
        node,
        (-bound, bound),
        INT32,
        "the int32 accumulator of two activations",
        _hint(node, "use fewer activation bits for the two operands"),
    )


@_rule(*ops_with(Trait.KERNEL))
def _kernel(node: Node, ins: list[Interval | None]) -> Interval:
    """The kernels' intermediates are bounded in :mod:`intq.semantics.kernels` given input widths
    (checked by the op's type rule) and these scale conditions."""
    x = node.inputs[0]
    assert x is not None and x.type.quant is not None
    try:
        if node.op == "QSoftmax" and node.attrs["variant"] != "lut":
            check_exp_range(node.attrs["scale"], "softmax")
        elif node.op == "QGelu" and node.attrs["variant"] in ("shift", "divfree"):
            check_exp_range(x.type.quant.scale[0] * GELU_SIGMOID, "GELU")
    except NumericsError as err:
        raise NumericsError(str(err), node=node.label(), hint="report this model") from None
    if node.op == "QSoftmax":  # the only kernel without a clamp: its output is u8
        return 0, 255
    return _clamp(node)


@_rule("Cast", "Not")
def _flag(node: Node, ins: list[Interval | None]) -> Interval:
    """Attention masks: integers cast to bool and back (0 or 1). A raw integer cast to a wider
    or narrower integer type (position ids) keeps its interval, which must fit the type."""
    if node.op == "Not" or node.attrs["to"] == "bool":
        return 0, 1
    x = ins[0]
    assert x is not None
    if node.attrs["to"] == "u8" and x[0] >= 0 and x[1] <= 1:
        return x
    return _in_dtype(node, x, "the cast value")


def _in_dtype(node: Node, interval: Interval, what: str) -> Interval:
    """``interval`` when it fits the dtype of ``node``'s output, else a refusal."""
    info = np.iinfo(node.output.type.dtype.numpy)
    if interval[0] < int(info.min) or interval[1] > int(info.max):
        raise NumericsError(
            f"{what} can reach [{interval[0]}, {interval[1]}], outside"
            f" {node.output.type.dtype.value}",
            node=node.label(),
            hint="integer index arithmetic must fit its dtype: bound the token ids' inputs",
        )
    return interval


@_rule("Add", "Sub", "Mul")
def _raw_arithmetic(node: Node, ins: list[Interval | None]) -> Interval:
    """Raw integer arithmetic (position ids): interval arithmetic, within the dtype (Python
    integers: the bound itself cannot overflow)."""
    a, b = ins[0], ins[1]
    assert a is not None and b is not None
    if node.op == "Add":
        interval = (a[0] + b[0], a[1] + b[1])
    elif node.op == "Sub":
        interval = (a[0] - b[1], a[1] - b[0])
    else:
        products = [x * y for x in a for y in b]
        interval = (min(products), max(products))
    return _in_dtype(node, interval, f"the {node.op}")


@_rule("GatherElements")
def _gather_elements(node: Node, ins: list[Interval | None]) -> Interval:
    """The data's interval; every index must lie inside the axis, ``0 <= i < size`` (no
    backend checks it at run time, and TVM's kernel takes no negative index)."""
    data = node.inputs[0]
    assert data is not None and ins[1] is not None and ins[0] is not None
    size = data.type.shape[node.attrs["axis"]]
    if ins[1][0] < 0 or ins[1][1] >= size:
        raise NumericsError(
            f"the indices can reach [{ins[1][0]}, {ins[1][1]}], outside the axis of {size}",
            node=node.label(),
            hint="GatherElements in the integer path needs indices proven inside the data",
        )
    return ins[0]


@_rule("Equal")
def _equal(node: Node, ins: list[Interval | None]) -> Interval:
    return 0, 1


@_rule("CumSum")
def _cumsum(node: Node, ins: list[Interval | None]) -> Interval:
    """A running sum of up to ``L`` values in ``[lo, hi]`` (``L`` the axis' length; none for
    the first exclusive sum): ``[min(0, L lo), max(0, L hi)]``, within the dtype."""
    x = ins[0]
    source = node.inputs[0]
    assert x is not None and source is not None
    length = source.type.shape[node.attrs["axis"]] if source.type.rank else 1
    interval = (min(0, length * x[0], x[0]), max(0, length * x[1], x[1]))
    return _in_dtype(node, interval, f"the running sum of {length} values")


@_rule("QGlobalAveragePool", "QAveragePool", "QReduceSum")
def _pool_sum(node: Node, ins: list[Interval | None]) -> Interval:
    x = ins[0]
    assert x is not None
    source = node.inputs[0]
    assert source is not None
    if node.op == "QGlobalAveragePool":
        count = int(np.prod(source.type.shape[2:]))
    elif node.op == "QReduceSum":
        count = int(np.prod([source.type.shape[a] for a in node.attrs["axes"]]))
    else:
        count = int(np.prod(node.attrs["kernel_shape"]))
    return _fits(
        node,
        (count * x[0], count * x[1]),
        INT32,
        f"the sum of {count} values",
        "pool over fewer elements or use fewer activation bits",
    )


@_rule("QResize")
def _qresize(node: Node, ins: list[Interval | None]) -> Interval:
    """Each axis' weights are >= 0 and sum to ``2^F``: every output (and every partial
    result, axis after axis) is a convex combination of inputs times ``2^(F * axes)``."""
    x = ins[0]
    assert x is not None
    gain = 1 << (node.attrs["frac_bits"] * len(node.attrs["axes"]))
    return _fits(
        node,
        (x[0] * gain, x[1] * gain),
        INT32,
        "the interpolated int32 accumulator",
        "use fewer activation bits for the Resize's input, or report this model",
    )


@_rule("Requantize")
def _requantize(node: Node, ins: list[Interval | None]) -> Interval:
    x = ins[0]
    assert x is not None
    magnitude = max(abs(x[0]), abs(x[1]))
    for m, s in zip(node.attrs["multiplier"], node.attrs["shift"]):
        if s >= 64:  # exactly 0 without computing, given |x * M| < 2^62 (intq.semantics.numerics)
            product = magnitude * m
            bound = (-(2**62) + 1, 2**62 - 1)
        else:
            product = magnitude * m * (2 ** max(0, -s)) + (2 ** (s - 1) if s >= 1 else 0)
            bound = INT64
        _fits(node, (-product, product), bound, "the requantization product", "report this model")
    return _clamp(node)


@_rule("QAdd")
def _qadd(node: Node, ins: list[Interval | None]) -> Interval:
    a, b = ins[0], ins[1]
    assert a is not None and b is not None
    shift = node.attrs["shift"]
    total = (
        max(abs(a[0]), abs(a[1])) * abs(node.attrs["multiplier_a"])
        + max(abs(b[0]), abs(b[1])) * abs(node.attrs["multiplier_b"])
        + (2 ** (shift - 1) if shift >= 1 else 0)
    )
    _fits(node, (-total, total), INT64, "the aligned residual sum", "report this model")
    return _clamp(node)


@_rule("QMul")
def _qmul(node: Node, ins: list[Interval | None]) -> Interval:
    """``|a b|`` fits int32 and ``|a b| M 2^max(0, -S) + 2^(S-1)`` stays below 2^62 (what
    :func:`intq.semantics.kernels.multiply` needs for its rounding shift)."""
    product = _magnitude(ins[0]) * _magnitude(ins[1])
    _fits(
        node,
        (-product, product),
        INT32,
        "the product of two activations",
        "use fewer activation bits for the two operands",
    )
    shift = node.attrs["shift"]
    total = product * node.attrs["multiplier"] * 2 ** max(0, -shift) + (
        2 ** (shift - 1) if 1 <= shift < 63 else 0
    )
    _fits(node, (-total, total), INT62, "the rescaled product", "report this model")
    return _clamp(node)


@_rule("QReduceL2")
def _qreduce_l2(node: Node, ins: list[Interval | None]) -> Interval:
    """The sum of squares ``N max(x^2)`` stays below 2^62 (:func:`intq.semantics.kernels.l2_norm`
    normalises it there; every later intermediate is bounded by the kernel)."""
    source = node.inputs[0]
    assert source is not None
    count = int(np.prod([source.type.shape[a] for a in node.attrs["axes"]]))
    square = count * _magnitude(ins[0]) ** 2
    _fits(
        node,
        (0, square),
        INT62,
        f"the sum of {count} squares",
        "reduce over fewer elements or use fewer activation bits",
    )
    return _clamp(node)


@_rule("QDiv")
def _qdiv(node: Node, ins: list[Interval | None]) -> Interval:
    """``|a| <= 2^15``, so ``|a w| < 2^46`` in :func:`intq.semantics.kernels.divide` (the
    divisor is normalised whatever its value: one below 1 counts as 1)."""
    a = ins[0]
    if _magnitude(a) > 2**15:
        assert a is not None
        raise NumericsError(
            f"the dividend can reach [{a[0]}, {a[1]}], beyond 16 bits",
            node=node.label(),
            hint="use at most 16 activation bits for the dividend",
        )
    return _clamp(node)


@_rule("QPRelu")
def _qprelu(node: Node, ins: list[Interval | None]) -> Interval:
    """``|x| max|M| 2^max(0, -S) + 2^(S-1)`` stays below 2^62 (what
    :func:`intq.semantics.kernels.prelu` needs for its rounding shift)."""
    a = node.attrs
    shift = a["shift"]
    largest = max(abs(a["multiplier_pos"]), *(abs(m) for m in a["multiplier_neg"]))
    total = _magnitude(ins[0]) * largest * 2 ** max(0, -shift) + (
        2 ** (shift - 1) if 1 <= shift < 63 else 0
    )
    _fits(node, (-total, total), INT62, "the rescaled PRelu", "report this model")
    return _clamp(node)


@_rule("QMask")
def _qmask(node: Node, ins: list[Interval | None]) -> Interval:
    x = ins[0]
    assert x is not None
    return min(x[0], 0), max(x[1], 0)


@_rule("QDivCount")
def _qdiv_count(node: Node, ins: list[Interval | None]) -> Interval:
    acc, count = ins[0], ins[1]
    assert acc is not None and count is not None
    length = len(node.attrs["multiplier"]) - 1
    if count[0] < 0 or count[1] > length:
        raise NumericsError(
            f"the count can reach [{count[0]}, {count[1]}], outside the table's 0..{length}",
            node=node.label(),
            hint="report this model: the count should be a reduction of a 0/1 mask",
        )
    magnitude = max(abs(acc[0]), abs(acc[1]))
    top = max(
        magnitude * m + (1 << (s - 1))
        for m, s in zip(node.attrs["multiplier"], node.attrs["shift"])
    )
    _fits(
        node,
        (-top, top),
        INT62,
        "the sum times its count's multiplier",
        "sum fewer positions or use fewer activation bits",
    )
    return _clamp(node)


@_rule("QLookup")
def _qlookup(node: Node, ins: list[Interval | None]) -> Interval:
    table = node.attrs["table"]
    return min(table), max(table)


@_rule(*ops_with(Trait.MOVEMENT), "Gather")
def _same(node: Node, ins: list[Interval | None]) -> Interval:
    x = ins[0]
    assert x is not None
    return x


@_rule("Relu")
def _relu(node: Node, ins: list[Interval | None]) -> Interval:
    x = ins[0]
    assert x is not None
    return max(x[0], 0), max(x[1], 0)


@_rule("Pad")
def _pad(node: Node, ins: list[Interval | None]) -> Interval:
    x = ins[0]
    assert x is not None
    return min(x[0], 0), max(x[1], 0)


@_rule("Clip")
def _clip(node: Node, ins: list[Interval | None]) -> Interval:
    x = ins[0]
    assert x is not None
    lo, hi = clip_bounds(node.attrs["min"], node.attrs["max"], node.output.type.dtype.numpy)
    return min(max(x[0], lo), hi), min(max(x[1], lo), hi)  # a monotone map of x's ends


@_rule("Min", "Max")
def _min_max(node: Node, ins: list[Interval | None]) -> Interval:
    a, b = ins[0], ins[1]
    assert a is not None and b is not None
    pick = min if node.op == "Min" else max
    return pick(a[0], b[0]), pick(a[1], b[1])


@_rule("Concat")
def _concat(node: Node, ins: list[Interval | None]) -> Interval:
    present = [i for i in ins if i is not None]
    return min(i[0] for i in present), max(i[1] for i in present)


class ValueRanges(ValueMap[Interval]):
    """The proven interval of every integer value of one graph.

    Stored on the graph by :func:`value_ranges` until the graph changes, so that the
    backends reuse the proof instead of repeating it.
    """


def analyze_ranges(graph: Graph) -> ValueRanges:
    """The proven interval of every integer value; raises :class:`NumericsError` on a possible
    overflow. Recomputes: :func:`value_ranges` reuses a result stored on the graph."""
    intervals: dict[Value, Interval] = {}

    def interval_of(value: Value | None) -> Interval | None:
        if value is None:
            return None
        if value in intervals:
            return intervals[value]
        if value.type.dtype is DType.BOOL:
            return (0, 1)
        if not value.type.dtype.is_integer:
            return None
        if value.const is not None:
            data = value.const
            found = (int(data.min()), int(data.max())) if data.size else (0, 0)
        elif value.type.quant is not None:  # an integer graph input: its declared range
            found = (value.type.quant.qmin, value.type.quant.qmax)
        else:
            info = np.iinfo(value.type.dtype.numpy)
            found = (int(info.min), int(info.max))
        intervals[value] = found
        return found

    for node in graph:
        if not any(v.type.dtype.is_integer for v in node.outputs):
            continue  # Dequantize and the float tail
        rule = RULES.get(node.op)
        if rule is None:
            raise NumericsError(
                f"the range analysis has no rule for integer op {node.op}",
                node=node.label(),
                hint="add a rule to intq.passes.range_analysis.RULES",
            )
        ins = [interval_of(v) for v in node.inputs]
        if not node.opdef.has(Trait.BOUNDARY) and ins and ins[0] is None:
            raise NumericsError(f"no interval for the input of {node.op}", node=node.label())
        intervals[node.outputs[0]] = rule(node, ins)
    return ValueRanges(intervals)


def value_ranges(graph: Graph) -> ValueRanges:
    """The proven intervals of ``graph``: stored on it by an earlier analysis of the same
    graph unchanged, else computed (and stored). Raises on a possible overflow."""
    ranges = graph.analysis(ValueRanges)
    if ranges is None:
        ranges = analyze_ranges(graph)
        graph.store_analysis(ranges)
    return ranges


def prove_no_overflow(graph: Graph) -> ValueRanges | None:
    """The gate every backend's compile passes through (:func:`intq.backends.compile`, and
    loading a ``.intq`` artifact), whoever built the graph (``intq.quantize``, textual IR,
    the Python API): the verifier (every declared type is what its op gives, so the proof
    reads true widths and scales), then, for an integer graph, the overflow proof. Returns
    the proven intervals (``None`` for a float graph, which has no integer arithmetic to
    prove); raises :class:`VerificationError` or :class:`NumericsError` naming the layer."""
    verify(graph)
    if not any(v.type.quant is not None for v in graph.values()):
        return None
    return value_ranges(graph)


@dataclass(frozen=True)
class RangeAnalysis(Pass):
    """Prove that no integer accumulator or product of the graph can overflow (refusing the
    layer that could, by name) and keep the intervals on the graph for the backends."""

    name: ClassVar[str] = "range-analysis"

    def apply(self, graph: Graph) -> bool:
        value_ranges(graph)
        return False
