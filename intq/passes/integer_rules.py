"""One integer lowering rule per float op (:data:`LOWERINGS`), run by
:class:`~intq.passes.integer_lowering.Lowering`; :mod:`intq.passes.integerize` lists what
each op becomes."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from intq.errors import NumericsError, UnsupportedOpError
from intq.ir.graph import Node, Value
from intq.ir.types import DType, QuantParams
from intq.ops import Trait, ops_with
from intq.passes.integer_lowering import (
    Accumulator,
    Affine,
    Count,
    CountMean,
    Lowering,
    Product,
    Sum,
    bias_reader,
    channel_quant,
    keep_mask,
    multiplicative_keep,
    output_attrs,
    scale_count,
    scale_of,
)
from intq.passes.precision import quantize_weights
from intq.semantics.kernels import elementwise_table, layernorm_constants
from intq.semantics.numerics import common_shift, dyadic, storage_dtype
from intq.semantics.numpy_eval import (
    EVAL,
    average_pool_counts,
    average_pool_extra,
    resize_linear_taps,
    resize_nearest_index,
    resized_axes,
)
from intq.tables import RuleTable

# ----- one rule per float op -------------------------------------------------------------------

Rule = Callable[[Lowering, Node], None]
LOWERINGS: RuleTable[Rule] = RuleTable()
"""Float op -> the rule that lowers it into the integer graph."""
_rule = LOWERINGS.register


def _bias(node: Node, index: int) -> np.ndarray | None:
    value = node.inputs[index] if index < len(node.inputs) else None
    return None if value is None else np.asarray(value.const, np.float64).reshape(-1)


@_rule("Conv")
def _conv(low: Lowering, node: Node) -> None:
    x = low.materialize(node.inputs[0])  # type: ignore[arg-type]
    w, b = low.linear(node, x, 0, _bias(node, 2))
    acc = low.emit(node, "QConv", [x, w, b], **node.attrs)
    low.pending[node.output] = Accumulator(acc)


@_rule("ConvTranspose")
def _conv_transpose(low: Lowering, node: Node) -> None:
    x = low.materialize(node.inputs[0])  # type: ignore[arg-type]
    w, b = low.linear(node, x, 1, _bias(node, 2))
    acc = low.emit(node, "QConvTranspose", [x, w, b], **node.attrs)
    low.pending[node.output] = Accumulator(acc)


@_rule("Gemm")
def _gemm(low: Lowering, node: Node) -> None:
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
def _matmul(low: Lowering, node: Node) -> None:
    b_value = node.inputs[1]
    a = low.materialize(node.inputs[0])  # type: ignore[arg-type]
    if b_value is None or b_value.const is None:
        # Two activations (attention's Q K^T and P V): int32 products at s_a * s_b.
        other = low.materialize(b_value)  # type: ignore[arg-type]
        low.pending[node.output] = Accumulator(low.emit(node, "QBatchMatMul", [a, other]))
        return
    if b_value.type.rank != 2:
        raise UnsupportedOpError("MatMul with a constant B of rank != 2", node=node.label())
    bias = bias_reader(node)
    w, b = low.linear(node, a, 1, None if bias is None else bias[1])
    acc = low.emit(node, "QMatMul", [a, w] if b is None else [a, w, b])
    if bias is None:
        low.pending[node.output] = Accumulator(acc)
    else:  # the bias Add is folded in: it becomes the accumulator
        low.absorbed.add(bias[0])
        low.pending[bias[0].output] = Accumulator(acc)


@_rule("Relu", "Clip")
def _activation(low: Lowering, node: Node) -> None:
    source = node.inputs[0]
    assert source is not None
    high_real = math.inf if node.op == "Relu" else node.attrs["max"]
    # min > max makes every value max (ONNX): a clamp to [max, max].
    low_real = 0.0 if node.op == "Relu" else min(node.attrs["min"], high_real)
    if source in low.counts:
        _clamped_count(low, node, low.counts[source], low_real, high_real)
        return
    _clamped(low, node, source, low_real, high_real)


def _clamped_count(
    low: Lowering, node: Node, count: Count, low_real: float, high_real: float
) -> None:
    """A masked mean's ``clamp(count, min=eps)`` (``0 < eps <= 1``, so no division by 0):
    ``max(count, 1)`` on the raw integer count. The same quotient: where the count is 0 the
    masked sum is 0 too. A bound <= 0 changes nothing."""
    if high_real < count.length or low_real > 1:
        raise UnsupportedOpError(
            f"{node.op} of a mask's count to [{low_real:g}, {high_real:g}]: only a lower bound"
            " of at most 1 (a guard against dividing by 0) is supported",
            node=node.label(),
        )
    if low_real <= 0:
        low.counts[node.output] = count
        return
    value = low.emit(node, "Clip", [count.value], min=1.0, max=math.inf)
    low.counts[node.output] = Count(value, count.length)


def _clamped(low: Lowering, node: Node, source: Value, low_real: float, high_real: float) -> None:
    """``node``'s output: ``source`` clamped to ``[low_real, high_real]``, in the pending
    rescale of ``source`` when ``node`` is its only reader, else as an integer ``Clip``."""
    # Fuse into the pending rescale only when the activation is its sole reader.
    if source in low.pending and len(source.uses()) == 1 and not source.is_graph_output:
        # Unsigned when clamped at 0 (Max(x, 0) too), unless a pre-quantized model says.
        unsigned = low_real >= 0 and low.model.activation(node.output) is None
        quant = low.activation_quant(node.output, non_negative=True if unsigned else None)
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
    scale = scale_of(x)
    bounds = {"min": math.floor(low_real / scale + 0.5) if low_real > -math.inf else -math.inf}
    bounds["max"] = math.floor(high_real / scale + 0.5) if high_real < math.inf else math.inf
    low.ints[node.output] = low.emit(node, "Clip", [x], **bounds)


@_rule("Min", "Max")
def _min_max(low: Lowering, node: Node) -> None:
    """With a scalar constant, a clamp (``Max(x, 0)`` is a ReLU, fused like one); otherwise
    both operands rescaled to the output's calibrated quantization (a constant quantized to
    it), then the integer ``Min``/``Max``: rounding is monotone, so the extreme of the rounded
    operands is the rounded extreme."""
    a, b = node.inputs
    assert a is not None and b is not None
    for x, c in ((a, b), (b, a)):
        bound = _scalar(c) if c.is_const and not x.is_const else None
        fused = x in low.pending and len(x.uses()) == 1 and not x.is_graph_output
        # A bound the unfused operand cannot represent (a cap below its whole range) takes
        # the general path: the output's own scale holds it.
        if bound is not None and (fused or _representable(low.materialize(x), bound)):
            if node.op == "Max":
                _clamped(low, node, x, bound, math.inf)
            else:
                _clamped(low, node, x, -math.inf, bound)
            return
    quant = low.activation_quant(node.output)
    parts = []
    for value in (a, b):
        pending = low.pending.get(value)
        if value.const is not None:
            codes = np.clip(
                np.rint(np.asarray(value.const, np.float64) / quant.scale[0]),
                quant.qmin,
                quant.qmax,
            )
            part = low.dst.add_constant(
                codes.astype(storage_dtype(quant.bits, quant.signed)), value.name
            )
            part.type = part.type.with_quant(quant)
        elif pending is not None:  # rescaled straight to the output's quantization
            part = pending.finish(low, quant, quant.qmin, quant.qmax, node.label())
        else:
            part = low.materialize(value)
            if part.type.quant != quant:
                part = Accumulator(part).finish(low, quant, quant.qmin, quant.qmax, node.label())
        parts.append(part)
    low.ints[node.output] = low.emit(node, node.op, parts)


def _representable(x: Value, real: float) -> bool:
    """Whether ``real`` rounds to a code of integer ``x``'s quantization."""
    quant = x.type.quant
    assert quant is not None
    return quant.qmin <= math.floor(real / quant.scale[0] + 0.5) <= quant.qmax


@_rule("Add")
def _add(low: Lowering, node: Node) -> None:
    if node in low.absorbed:
        return
    if _raw_arithmetic(low, node):
        return
    x, y = node.inputs
    assert x is not None and y is not None
    for scores, mask in ((x, y), (y, x)):
        if mask in low.affine:  # attention scores + an additive 0/-inf mask: a keep mask
            low.masked[node.output] = (scores, keep_mask(low, node, low.affine[mask]))
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
def _scale_by_constant(low: Lowering, node: Node) -> None:
    if node.op == "Mul" and _raw_arithmetic(low, node):
        return
    x, c = node.inputs
    assert x is not None and c is not None
    if node.op == "Div" and c in low.counts:
        _mean_by_count(low, node, x, low.counts[c])
        return
    if node.op == "Mul" and x is c and _l2_norm(low, node, x):
        return
    if node.op == "Mul":
        for value, flags in ((x, c), (c, x)):
            if flags in low.affine and value not in low.affine and not value.is_const:
                _masked(low, node, value, low.affine[flags])
                return
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
    if factor is not None and factor > 0 and (x in low.ints or x in low.pending):
        # A requantization by the factor (a pending sum is rounded first: DeiT's mean of
        # its two heads' logits).
        low.pending[node.output] = Accumulator(low.materialize(x), factor)
        return
    if node.op == "Mul" and not x.is_const and x not in low.affine and c not in low.affine:
        # Two activations, or one and a constant this cannot fold (quantized per tensor).
        low.pending[node.output] = Product(low.materialize(x), low.materialize(c))
        return
    if node.op == "Div" and not x.is_const and not c.is_const:
        if x not in low.affine and c not in low.affine:
            _divide(low, node, x, c)
            return
    raise UnsupportedOpError(
        f"{node.op} in the integer path: only a positive constant scaling an accumulator"
        " (folded into its requantization) or a product is supported",
        node=node.label(),
    )


def _l2_norm(low: Lowering, node: Node, x: Value) -> bool:
    """``Sqrt(ReduceSum(Mul(x, x)))`` (ONNX's ReduceL2, ``torch.norm``, F.normalize's norm, as
    the frontends import them): one ``QReduceL2`` at the norm's calibrated (unsigned) scale,
    the sum of squares in int64 and a division-free square root; the ReduceSum and Sqrt are
    absorbed. False when ``node`` does not start the pattern."""
    uses = node.output.uses()
    if len(uses) != 1 or node.output.is_graph_output or uses[0].node.op != "ReduceSum":
        return False
    total = uses[0].node
    roots = total.output.uses()
    if len(roots) != 1 or total.output.is_graph_output or roots[0].node.op != "Sqrt":
        return False
    sqrt = roots[0].node
    source = low.materialize(x)
    if scale_count(source) != 1:
        return False
    out = low.activation_quant(sqrt.output, non_negative=True)
    step = dyadic(scale_of(source) / out.scale[0])
    if step.shift < 2:
        raise NumericsError(
            f"an L2 norm whose scale is over 2^29 times its input's (shift {step.shift})",
            node=sqrt.label(),
            hint="report this model: the calibrated norm is far smaller than its inputs",
        )
    axes = total.attrs["axes"]
    norm = low.emit(
        sqrt,
        "QReduceL2",
        [source],
        axes=axes,
        multiplier=step.multiplier,
        shift=step.shift,
        **output_attrs(out, out.qmin, out.qmax),
    )
    if not total.attrs["keepdims"]:
        norm = low.dst.add(
            "Reshape", [norm], {"shape": sqrt.output.type.shape}, name=sqrt.label()
        ).output
    low.absorbed.update((total, sqrt))
    low.ints[sqrt.output] = norm
    return True


def _divide(low: Lowering, node: Node, x: Value, c: Value) -> None:
    """A quotient of two activations (``x / max(||x||, eps)``, GRN's ``Gx / (mean(Gx) +
    eps)``): one ``QDiv`` by a division-free reciprocal, for a divisor that calibration saw
    non-negative (a norm, a mean of norms). A divisor that rounds to 0 counts as one step."""
    stats = low.stats.get(c)
    if stats is not None and stats.min < 0:
        raise UnsupportedOpError(
            f"Div by an activation that calibration saw reach {stats.min:g}: the integer"
            " quotient needs a non-negative divisor",
            node=node.label(),
            hint="integer division of activations supports norms and their means",
        )
    a, b = low.materialize(x), low.materialize(c)
    if scale_count(a) != 1 or scale_count(b) != 1:
        raise UnsupportedOpError("Div of per-channel activations", node=node.label())
    out = low.activation_quant(node.output)
    step = dyadic(scale_of(a) / (scale_of(b) * out.scale[0]))
    if step.shift < 1:
        raise NumericsError(
            f"a quotient whose scale ratio exceeds 2^30 (shift {step.shift})",
            node=node.label(),
            hint="report this model",
        )
    low.ints[node.output] = low.emit(
        node,
        "QDiv",
        [a, b],
        multiplier=step.multiplier,
        shift=step.shift,
        **output_attrs(out, out.qmin, out.qmax),
    )


def _masked(low: Lowering, node: Node, value: Value, mask: Affine) -> None:
    """An activation times a 0/1 mask ``m`` (or ``1 - m``) of a raw integer input: one
    ``QMask``, the removed positions 0, the activation's quantization kept (exact)."""
    keep = multiplicative_keep(low, node, mask)
    if keep is None:
        raise UnsupportedOpError(
            f"Mul of an activation by a mask {mask.a:g} * m + {mask.b:g}: only m or 1 - m"
            " (a 0/1 mask) is supported",
            node=node.label(),
        )
    x = low.materialize(value)
    if scale_count(x) != 1 or x.type.shape != node.output.type.shape:
        raise UnsupportedOpError(
            f"Mul of a {x.type} activation by a {keep.type.shape} mask: the mask must"
            " broadcast to the activation, which must have one scale",
            node=node.label(),
        )
    low.ints[node.output] = low.emit(node, "QMask", [x, keep])


def _mean_by_count(low: Lowering, node: Node, x: Value, count: Count) -> None:
    """A sum divided by a mask's count: pending as one ``QDivCount`` (a requantization whose
    multiplier each count looks up in a compile-time table), no run-time division."""
    pending = low.pending.get(x)
    if isinstance(pending, Accumulator) and scale_count(pending.acc) == 1:
        total = pending
    elif x in low.ints and low.ints[x].type.quant is not None and scale_count(low.ints[x]) == 1:
        total = Accumulator(low.ints[x])
    else:
        raise UnsupportedOpError(
            "Div by a mask's count in the integer path: only a per-tensor sum divided",
            node=node.label(),
        )
    if np.broadcast_shapes(total.acc.type.shape, count.value.type.shape) != total.acc.type.shape:
        raise UnsupportedOpError(
            f"Div of a {total.acc.type.shape} sum by a {count.value.type.shape} count that does"
            " not broadcast to it",
            node=node.label(),
        )
    low.pending[node.output] = CountMean(total, count)


def _fold_channel_scale(low: Lowering, node: Node, x: Value, c: Value) -> bool:
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
    axis = 1 if layer.op in ("QConv", "QConvTranspose") else acc.type.rank - 1
    gamma = _channel_vector(np.asarray(c.const, np.float64), x.type.shape, axis)
    w_axis = layer.opdef.weight_axis(layer)
    if gamma is None or w_axis is None:
        return False
    x_q, w, b = (*layer.inputs, None)[:3]
    assert x_q is not None and w is not None and w.const is not None
    if w.const.shape[w_axis] != len(gamma):  # a grouped transposed conv's shared scales
        return False
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
    new_w.type = new_w.type.with_quant(channel_quant(w_quant.bits, scales, w_axis, narrow=True))
    inputs = [x_q, new_w]
    if b is not None:
        assert b.const is not None
        low.dst.remove_constant(b)
        s_x = scale_of(x_q)
        new_b = low.dst.add_constant((b.const * sign).astype(np.int32), b.name)
        new_b.type = new_b.type.with_quant(channel_quant(32, tuple(s_x * s for s in scales), 0))
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


def raw(low: Lowering, value: Value | None) -> Value | None:
    """The integer graph's value for ``value`` when it is a raw integer or bool tensor (a
    token id, an attention mask and what is computed from them: no scale), else None."""
    source = low.ints.get(value) if value is not None else None
    return source if source is not None and source.type.quant is None else None


@_rule("PRelu")
def _prelu(low: Lowering, node: Node) -> None:
    """One ``QPRelu``: the slope (a constant, per tensor or varying along one axis) times the
    rescaling on the negative side, the rescaling alone on the other, one rounding."""
    source, slope = node.inputs
    assert source is not None
    if slope is None or slope.const is None:
        raise UnsupportedOpError("PRelu with a computed slope", node=node.label())
    x = low.materialize(source)
    c = np.asarray(slope.const, np.float64)
    dims = (1,) * (x.type.rank - c.ndim) + c.shape
    varying = [i for i, d in enumerate(dims) if d != 1]
    if len(varying) > 1:
        raise UnsupportedOpError(
            f"PRelu with a slope {list(c.shape)} varying along more than one axis",
            node=node.label(),
        )
    slopes = [float(v) for v in c.reshape(-1)]
    out = low.activation_quant(node.output)
    ratio = scale_of(x) / out.scale[0]
    magnitudes, shift = common_shift(ratio, *(abs(a) * ratio for a in slopes))
    negatives = tuple(int(math.copysign(m, a)) for m, a in zip(magnitudes[1:], slopes))
    low.ints[node.output] = low.emit(
        node,
        "QPRelu",
        [x],
        slope=tuple(slopes),
        multiplier_pos=magnitudes[0],
        multiplier_neg=negatives,
        shift=shift,
        axis=varying[0] if varying else -1,
        **output_attrs(out, out.qmin, out.qmax),
    )


@_rule("Cast")
def _cast(low: Lowering, node: Node) -> None:
    x = node.inputs[0]
    assert x is not None
    source = raw(low, x)
    if source is not None and node.output.type.dtype is DType.BOOL:
        # A mask made boolean, carried on as 0/1 bytes: TVM vectorizes the moves of bytes
        # (Expand, Gather), not of booleans.
        flag = low.dst.add("Cast", [source], {"to": "bool"}, name=node.label()).output
        low.ints[node.output] = low.emit(node, "Cast", [flag], to="u8")
        return
    if x.type.dtype.is_float and node.output.type.dtype.is_float:  # float to float: a no-op
        _alias(low, x, node.output)
        return
    if source is not None and node.output.type.dtype.is_integer:
        # Index arithmetic on raw integers (position ids): the same Cast, exact (the range
        # analysis proves the value fits the new dtype).
        low.ints[node.output] = low.emit(node, "Cast", [source], to=node.attrs["to"])
        return
    if source is None or not node.output.type.dtype.is_float:
        raise UnsupportedOpError("Cast in the integer path", node=node.label())
    low.affine[node.output] = Affine(source, 1.0, 0.0)


def _alias(low: Lowering, x: Value, out: Value) -> None:
    """``out`` is ``x`` in the integer graph (whatever form ``x`` has there)."""
    for table in (low.ints, low.pending, low.affine, low.floats):
        if x in table:
            table[out] = table[x]  # type: ignore[assignment]
            return
    low.ints[out] = low.materialize(x)


def _raw_arithmetic(low: Lowering, node: Node) -> bool:
    """``Add``, ``Sub``, ``Mul`` or ``Equal`` of raw integer tensors (token ids, a mask and
    what is computed from them, no scale) and integer constants: the same op in the integer
    graph, exact index arithmetic, as the attention mask's ``Cast``/``Expand``/``Gather`` are
    (RoBERTa's position ids ``cumsum(ids != pad) * (ids != pad) + pad``). The range analysis
    proves every result fits its dtype. False when no operand is a raw integer tensor."""
    operands = [raw(low, value) for value in node.inputs]
    if all(v is None for v in operands):
        return False
    inputs = []
    for value, source in zip(node.inputs, operands):
        assert value is not None
        if source is None and value.const is not None and value.type.dtype.is_integer:
            source = low.dst.add_constant(value.const, value.name)
        if source is None:
            raise UnsupportedOpError(
                f"{node.op} of a raw integer tensor (token ids, a mask) and %{value.name}, which"
                " is neither a raw integer tensor nor an integer constant",
                node=node.label(),
                hint="integer index arithmetic supports raw integer tensors and constants",
            )
        inputs.append(source)
    low.ints[node.output] = low.emit(node, node.op, inputs)
    return True


@_rule("Equal")
def _equal(low: Lowering, node: Node) -> None:
    """A comparison of token ids (``input_ids == pad``): :func:`_raw_arithmetic`."""
    if not _raw_arithmetic(low, node):
        raise UnsupportedOpError(
            "Equal in the integer path: only of raw integer tensors (token ids, masks)",
            node=node.label(),
        )


@_rule("Not", "CumSum")
def _raw_unary(low: Lowering, node: Node) -> None:
    """``Not`` of a raw flag, ``CumSum`` of raw integers (the running count of real tokens):
    the same op in the integer graph, exact."""
    source = raw(low, node.inputs[0])
    if source is None:
        raise UnsupportedOpError(
            f"{node.op} in the integer path: only of a raw integer tensor (token ids, masks)",
            node=node.label(),
        )
    if node.op == "Not" and source.type.dtype is not DType.BOOL:  # a flag carried as u8
        source = low.dst.add("Cast", [source], {"to": "bool"}, name=node.label()).output
    low.ints[node.output] = low.emit(node, node.op, [source], **node.attrs)


@_rule("GatherElements")
def _gather_elements(low: Lowering, node: Node) -> None:
    """A constant raw integer tensor indexed by raw integers (RoBERTa's buffered token type
    ids gathered by its position ids): the same op, data movement; the range analysis proves
    every index inside the axis."""
    data, index = node.inputs
    source = raw(low, index)
    if data is None or data.const is None or not data.type.dtype.is_integer or source is None:
        raise UnsupportedOpError(
            "GatherElements in the integer path: only of an integer constant by raw integer"
            " indices",
            node=node.label(),
        )
    table = low.dst.add_constant(data.const, data.name)
    low.ints[node.output] = low.emit(node, "GatherElements", [table, source], **node.attrs)


@_rule("And")
def _and(low: Lowering, node: Node) -> None:
    """A mask combined with an all-true constant (the causal or sliding-window part of a
    Hugging Face mask builder, at a bidirectional model's fixed shapes): a broadcast."""
    for x, c in (node.inputs, node.inputs[::-1]):
        source = raw(low, x)
        if source is not None and c is not None and c.const is not None and c.const.all():
            shape = node.output.type.shape
            low.ints[node.output] = (
                source
                if source.type.shape == shape
                else low.emit(node, "Expand", [source], shape=shape)
            )
            return
    raise UnsupportedOpError(
        "And in the integer path: only a mask and an all-true constant", node=node.label()
    )


@_rule("Where")
def _where(low: Lowering, node: Node) -> None:
    """``Where(keep, 0, -inf)``: an additive attention mask of a boolean ``keep``, kept
    symbolic as ``a * keep + b`` (``-inf`` stands as -1e30: a removed position either way)."""
    cond, x, y = node.inputs
    source, hi, lo = raw(low, cond), _scalar(x), _scalar(y)
    if source is None or hi is None or lo is None:
        raise UnsupportedOpError(
            "Where in the integer path: only an additive attention mask Where(mask, 0, -inf)",
            node=node.label(),
        )
    hi, lo = max(hi, -1e30), max(lo, -1e30)
    low.affine[node.output] = Affine(source, hi - lo, lo)


@_rule("Sub")
def _sub(low: Lowering, node: Node) -> None:
    if _raw_arithmetic(low, node):
        return
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
def _gather(low: Lowering, node: Node) -> None:
    """An embedding lookup: the table quantized per tensor, the lookup moves integers."""
    table, index = node.inputs
    if table is not None and table.const is None and index is not None and index.const is not None:
        # Constant positions of an activation (a ViT's class token) or of a raw mask (a mask
        # builder's batch and key indexing): data movement, the scale kept.
        indices = low.dst.add_constant(index.const, index.name)
        source = low.materialize(table)
        low.ints[node.output] = low.emit(node, "Gather", [source, indices], **node.attrs)
        return
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
def _global_avgpool(low: Lowering, node: Node) -> None:
    x = low.materialize(node.inputs[0])  # type: ignore[arg-type]
    low.pending[node.output] = Accumulator(low.emit(node, "QGlobalAveragePool", [x]))


@_rule("ReduceMean", "ReduceSum")
def _reduce_sum(low: Lowering, node: Node) -> None:
    """An int32 sum over the axes; a mean's ``1/N`` lives in the accumulator's scale. The
    sum of a 0/1 mask (a masked mean's denominator) is its raw int32 count."""
    source = node.inputs[0]
    if node.op == "ReduceSum" and source in low.affine:
        keep = multiplicative_keep(low, node, low.affine[source])
        if keep is None:
            raise UnsupportedOpError("ReduceSum of a mask other than m or 1 - m", node=node.label())
        axes = node.attrs["axes"]
        count = low.emit(node, "QReduceSum", [keep], axes=axes, keepdims=node.attrs["keepdims"])
        length = math.prod(keep.type.shape[a] for a in axes)
        low.counts[node.output] = Count(count, length)
        return
    x = low.materialize(source)  # type: ignore[arg-type]
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
def _avgpool(low: Lowering, node: Node) -> None:
    """Window sums in int32 (``QAveragePool``) of the input zero-padded by ``pads`` and the
    extra end padding of ceil_mode. Where every window has the same divisor ``N``, its
    ``1/N`` lives in the requantization. Where the divisor varies (``count_include_pad=0``
    at the borders, PoolFormer's token mixer; ceil_mode's partial windows) it is a
    compile-time count per output position, and the requantization one ``QDivCount``: each
    position's multiplier ``s_x / (c s_out)`` looked up by its count ``c``, no run-time
    division. Within half an output step of the float pool of the quantized input (plus
    the multipliers' ``2^-30`` relative error)."""
    attrs = node.attrs
    x = low.materialize(node.inputs[0])  # type: ignore[arg-type]
    spatial = len(attrs["kernel_shape"])
    extra = average_pool_extra(node)
    pads = (
        0,
        0,
        *attrs["pads"][:spatial],
        0,
        0,
        *(p + e for p, e in zip(attrs["pads"][spatial:], extra)),
    )
    if any(pads):
        x = low.dst.add(
            "Pad", [x], {"pads": pads, "mode": "constant", "value": 0.0}, name=node.label()
        ).output
    size = math.prod(attrs["kernel_shape"])
    counts = average_pool_counts(node)
    uniform = bool((counts == size).all())
    acc = low.emit(
        node,
        "QAveragePool",
        [x],
        kernel_shape=attrs["kernel_shape"],
        strides=attrs["strides"],
        mean=int(uniform),
    )
    if uniform:
        low.pending[node.output] = Accumulator(acc)
        return
    count = low.dst.add_constant(counts.astype(np.int32), f"{node.label()}.count")
    low.pending[node.output] = CountMean(Accumulator(acc), Count(count, size))


@_rule(*ops_with(Trait.MOVEMENT))
def _movement(low: Lowering, node: Node) -> None:
    x = low.materialize(node.inputs[0])  # type: ignore[arg-type]
    low.ints[node.output] = low.emit(node, node.op, [x], **node.attrs)


@_rule("Pad")
def _pad(low: Lowering, node: Node) -> None:
    if node.attrs["mode"] == "constant" and node.attrs["value"] != 0.0:
        raise UnsupportedOpError(
            "Pad with a non-zero constant in the integer path", node=node.label()
        )
    _movement(low, node)


@_rule("Resize")
def _resize(low: Lowering, node: Node) -> None:
    """Nearest: pure data movement, one ``Gather`` of constant indices per resized axis (the
    indices the float semantics computes), so the output keeps the input's scale. Linear:
    one ``QResize`` (:func:`_resize_linear`)."""
    attrs = node.attrs
    if attrs["mode"] not in ("nearest", "linear"):
        raise UnsupportedOpError(
            f"Resize mode {attrs['mode']!r} in the integer path", node=node.label()
        )
    x = low.materialize(node.inputs[0])  # type: ignore[arg-type]
    axes = resized_axes(attrs, x.type.shape)
    if attrs["mode"] == "linear" and axes:
        _resize_linear(low, node, x, axes)
        return
    transform, rounding = attrs["coordinate_transformation_mode"], attrs["nearest_mode"]
    for i, (axis, size, out, scale) in enumerate(axes):
        index = resize_nearest_index(size, out, scale, transform, rounding)
        const = low.dst.add_constant(index, f"{node.label()}.index{axis}")
        if i == len(axes) - 1:
            x = low.emit(node, "Gather", [x, const], axis=axis)
        else:
            x = low.dst.add("Gather", [x, const], {"axis": axis}, name=node.label()).output
    low.ints[node.output] = x


def _resize_linear(
    low: Lowering, node: Node, x: Value, axes: list[tuple[int, int, int, float]]
) -> None:
    """One ``QResize``: per resized axis, the float semantics' two input positions and its
    weights in ``F = (31 - bits) // axes`` fractional bits (computed here, once, for every
    backend). Each axis' weights are >= 0 and sum to ``2^F``, so a ``bits``-bit input stays
    below ``2^(bits + F * axes) <= 2^31`` in magnitude: the int32 accumulator cannot
    overflow. It is pending at ``s_x * 2^-(F * axes)``, so its one ``Requantize`` (with a
    following ReLU's clamp) is the only rounding: within ``axes * (max - min) * 2^-(F+1)``
    of the float Resize of the quantized input, plus half an output step."""
    quant = x.type.quant
    assert quant is not None
    frac_bits = (31 - quant.bits) // len(axes)
    if frac_bits < 1:
        raise UnsupportedOpError(
            f"a linear Resize of {len(axes)} axes of a {quant.bits}-bit input in int32",
            node=node.label(),
            hint="resize fewer axes at once or use fewer activation bits",
        )
    transform = node.attrs["coordinate_transformation_mode"]
    taps = [
        resize_linear_taps(size, out, scale, transform, frac_bits) for _, size, out, scale in axes
    ]
    acc = low.emit(
        node,
        "QResize",
        [x],
        axes=tuple(axis for axis, *_ in axes),
        sizes=tuple(node.attrs["sizes"]),
        low=tuple(int(i) for t in taps for i in t[0]),
        high=tuple(int(i) for t in taps for i in t[1]),
        weight=tuple(int(w) for t in taps for w in t[2]),
        frac_bits=frac_bits,
    )
    low.pending[node.output] = Accumulator(acc)


@_rule("Concat")
def _concat(low: Lowering, node: Node) -> None:
    quant = low.activation_quant(node.output)
    parts = []
    for value in node.inputs:
        x = low.materialize(value)  # type: ignore[arg-type]
        if x.type.quant != quant:
            x = Accumulator(x).finish(low, quant, quant.qmin, quant.qmax, node.label())
        parts.append(x)
    low.ints[node.output] = low.emit(node, "Concat", parts, axis=node.attrs["axis"])


@_rule("Softmax")
def _softmax(low: Lowering, node: Node) -> None:
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
    per_tensor = isinstance(pending, Accumulator) and scale_count(pending.acc) == 1
    if isinstance(pending, Accumulator) and per_tensor and variant != "lut":
        # The int32 scores themselves: no rounding before the exponent.
        x, scale = pending.acc, pending.scale
    else:
        if variant == "lut":
            x = _rescaled(low, source, _signed_quant(low, source, 8), node)
        else:
            x = low.materialize(source)
        scale = scale_of(x)
    inputs = [x] if keep is None else [x, keep]
    low.ints[node.output] = low.emit(node, "QSoftmax", inputs, variant=variant, scale=scale)


def _signed_quant(low: Lowering, value: Value, bits: int) -> QuantParams:
    """Signed ``bits``-bit parameters covering ``value``'s calibrated range."""
    calibrated = low.activation_quant(value, non_negative=False)
    threshold = calibrated.scale[0] * ((1 << (calibrated.bits - 1)) - 1)
    return QuantParams(bits, True, (threshold / ((1 << (bits - 1)) - 1),))


def _rescaled(low: Lowering, value: Value, quant: QuantParams, node: Node) -> Value:
    """``value`` as an integer with exactly ``quant`` (requantized when it differs)."""
    pending = low.pending.get(value)
    if isinstance(pending, Accumulator):
        return pending.finish(low, quant, quant.qmin, quant.qmax, node.label())
    x = low.materialize(value)
    if x.type.quant == quant:
        return x
    return Accumulator(x).finish(low, quant, quant.qmin, quant.qmax, node.label())


@_rule("Gelu")
def _gelu(low: Lowering, node: Node) -> None:
    source = node.inputs[0]
    assert source is not None
    variant = low.options.variant("QGelu")
    x = _rescaled(low, source, _signed_quant(low, source, 8 if variant == "lut" else 16), node)
    out = low.activation_quant(node.output, non_negative=False)
    low.ints[node.output] = low.emit(
        node, "QGelu", [x], variant=variant, **output_attrs(out, out.qmin, out.qmax)
    )


@_rule(*ops_with(Trait.ELEMENTWISE))
def _tabled(low: Lowering, node: Node) -> None:
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
            hint="a 16-bit input (a transformer's residual stream) has no table: quantize with"
            " wide_bits=8 (in a --config file: wide_bits = 8)",
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
        node, "QLookup", [x], table=tuple(table.tolist()), **output_attrs(out, out.qmin, out.qmax)
    )


@_rule("LayerNormalization")
def _layernorm(low: Lowering, node: Node) -> None:
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
    if np.all(g == g[0]) and np.all(b == b[0]):  # a GroupNorm's unit gamma: one entry
        g, b = g[:1], b[:1]
    out = low.activation_quant(node.output, non_negative=False)
    constants = layernorm_constants(
        g.tolist(), b.tolist(), node.attrs["epsilon"], scale_of(x), out.scale[0], size
    )
    low.ints[node.output] = low.emit(
        node,
        "QLayerNorm",
        [x],
        variant=low.options.variant("QLayerNorm"),
        **constants,
        **output_attrs(out, out.qmin, out.qmax),
    )
