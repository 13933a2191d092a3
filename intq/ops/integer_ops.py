"""Shape, dtype and scale rules of the integer ops.

Integer values carry their quantization parameters in their type, and these
rules derive them, so the verifier checks that scales stay consistent through
the graph:

- ``Quantize`` (float -> int) and ``Dequantize`` (int -> float) are the only
  ops that cross the float boundary.
- ``QConv``, ``QConvTranspose``, ``QGemm``, ``QMatMul`` accumulate in int32; the
  accumulator's scale is ``s_x * s_w[c]`` per output channel.
- ``QAveragePool``, ``QGlobalAveragePool`` and ``QReduceSum`` (with ``mean``) sum in
  int32; the accumulator's scale is ``s_x / N`` (the division lives in the scale, so it
  costs nothing); a plain ``QReduceSum`` keeps ``s_x``.
- ``Requantize``, ``QAdd`` and ``QMul`` (a product of two activations) are the dyadic
  rescalings: their attributes hold ``M`` and ``S`` and the output scale, and the rule
  checks that ``M * 2^-S`` is within ``2^-30`` (relative) of ``s_in / s_out``
  (``s_a * s_b / s_out`` for ``QMul``).
- ``QMask`` zeroes the masked positions of an activation (its scale kept); ``QDivCount`` is
  the requantization of a masked sum by a run-time count: one ``(M, S)`` per count from a
  compile-time table, ``M[c] * 2^-S[c]`` within ``2^-30`` of ``s_in / (c * s_out)``.
- ``QLookup`` is an elementwise function of an 8-bit input as a 256-entry table.
- ``QPRelu`` is a PRelu and its rescaling: one multiplier for ``x >= 0``, one per channel
  (the slope times it) for ``x < 0``, one shared shift.
- ``QResize`` is a linear Resize in ``F``-bit fixed point: an int32 accumulator at
  ``s_x * 2^-(F * axes)``, requantized once like a convolution's.
- ``QReduceL2`` is an L2 norm at its output scale (a division-free square root) and
  ``QDiv`` a quotient of two activations (a division-free reciprocal), each one rescaling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from intq.errors import NumericsError, ShapeError
from intq.ir.types import DType, QuantParams, TensorType
from intq.ops.float_ops import OPS as FLOAT_OPS
from intq.ops.float_ops import conv_shape, conv_transpose_shape
from intq.ops.schema import Attr, InferContext, KernelSpec, OpTable, Trait
from intq.semantics.kernels import (
    GELU_DIVIDING,
    GELU_VARIANTS,
    LAYERNORM_DIVIDING,
    LAYERNORM_VARIANTS,
    SOFTMAX_DIVIDING,
    SOFTMAX_OUT_BITS,
    SOFTMAX_VARIANTS,
    check_layernorm_size,
    check_softmax_size,
)
from intq.semantics.numerics import storage_dtype

OPS = OpTable()

_WEIGHTED = (Trait.INTEGER, Trait.ACCUMULATOR, Trait.LAYER)
"""The traits of the layers with constant quantized weights (QConv, QGemm, QMatMul)."""

SOFTMAX_KERNEL = KernelSpec("softmax", SOFTMAX_VARIANTS, "divfree", SOFTMAX_DIVIDING)
GELU_KERNEL = KernelSpec("gelu", GELU_VARIANTS, "poly", GELU_DIVIDING)
LAYERNORM_KERNEL = KernelSpec("layernorm", LAYERNORM_VARIANTS, "divfree", LAYERNORM_DIVIDING)
# The defaults: softmax and LayerNorm ``divfree``, GELU ``poly`` (I-BERT's erf polynomial,
# which never divides) measured the most accurate division-free combination on MiniLM
# (benchmarks/minilm_variants.py).

DYADIC_TOLERANCE = 2.0**-30
"""Largest relative error allowed between ``M * 2^-S`` and the real multiplier it stands for."""

_OUTPUT_ATTRS = {
    "bits": Attr("int"),
    "signed": Attr("int"),
    "scale": Attr("float"),
    "lo": Attr("int"),
    "hi": Attr("int"),
}


def _quant(ctx: InferContext, index: int) -> QuantParams:
    t = ctx.type(index)
    if t.quant is None or not t.dtype.is_integer:
        raise ShapeError(f"{ctx.op} input {index} must be a quantized integer tensor, got {t}")
    return t.quant


def _per_tensor(ctx: InferContext, index: int) -> float:
    q = _quant(ctx, index)
    if q.axis is not None:
        raise ShapeError(f"{ctx.op} input {index} must have one scale, got per-channel {q.axis}")
    return q.scale[0]


def _channel_scales(q: QuantParams, axis: int, size: int) -> tuple[float, ...]:
    """Scales along ``axis`` (a per-tensor scale repeated)."""
    if q.axis is None:
        return (q.scale[0],) * size
    if q.axis != axis:
        raise ShapeError(f"per-channel scales on axis {q.axis}, expected axis {axis}")
    return q.scale


def _accumulator(shape: tuple[int, ...], scales: Sequence[float], axis: int) -> TensorType:
    quant = (
        QuantParams(32, True, (scales[0],))
        if len(set(scales)) == 1
        else QuantParams(32, True, tuple(scales), axis=axis)
    )
    return TensorType(DType.I32, shape, quant)


_FLOAT32_NORMAL = float(np.finfo(np.float32).tiny)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _float32_scale(ctx: InferContext) -> None:
    """Refuse a ``scale`` attribute that is not a normal float32 number: every backend
    quantizes (divides) and dequantizes (multiplies) in float32, and a scale that rounds to
    0 or Inf there, or to a subnormal that a backend may flush to 0, would give each its own
    answer."""
    scale = ctx["scale"]
    if not _FLOAT32_NORMAL <= abs(scale) <= _FLOAT32_MAX:
        raise ShapeError(
            f"{ctx.op}'s scale {scale:g} is not a normal float32 number (between"
            f" {_FLOAT32_NORMAL:g} and {_FLOAT32_MAX:g}), which every backend computes with"
        )


def _output(ctx: InferContext, shape: tuple[int, ...]) -> TensorType:
    """The type an ``_OUTPUT_ATTRS`` op produces: its bits, signedness, scale; clamp checked."""
    bits, signed = ctx["bits"], bool(ctx["signed"])
    _float32_scale(ctx)
    quant = QuantParams(bits, signed, (ctx["scale"],))
    if not quant.qmin <= ctx["lo"] <= ctx["hi"] <= quant.qmax:
        raise ShapeError(
            f"clamp [{ctx['lo']}, {ctx['hi']}] outside the {bits}-bit range"
            f" [{quant.qmin}, {quant.qmax}]"
        )
    return TensorType(DType.from_numpy(storage_dtype(bits, signed)), shape, quant)


def _check_dyadic(multiplier: int, shift: int, real: float, what: str) -> None:
    if not 0 < multiplier < 1 << 31:
        raise ShapeError(f"{what}: multiplier {multiplier} outside (0, 2^31)")
    value = math.ldexp(multiplier, -shift)
    if abs(value - real) > DYADIC_TOLERANCE * real:
        raise ShapeError(
            f"{what}: {multiplier} * 2^-{shift} = {value!r} does not match the scale ratio {real!r}"
        )


# ----- the float boundary ----------------------------------------------------------------


@OPS.op(
    "Quantize",
    attrs={"bits": Attr("int"), "signed": Attr("int"), "scale": Attr("float")},
    traits=(Trait.INTEGER, Trait.BOUNDARY),
)
def _quantize(ctx: InferContext) -> list[TensorType]:
    """``clamp(round_half_even(x / scale))`` (ONNX QuantizeLinear): the graph's way in."""
    x = ctx.type(0)
    if not x.dtype.is_float:
        raise ShapeError(f"Quantize takes a float tensor, got {x}")
    bits, signed = ctx["bits"], bool(ctx["signed"])
    _float32_scale(ctx)
    quant = QuantParams(bits, signed, (ctx["scale"],))
    return [TensorType(DType.from_numpy(storage_dtype(bits, signed)), x.shape, quant)]


@OPS.op("Dequantize", traits=(Trait.BOUNDARY,))
def _dequantize(ctx: InferContext) -> list[TensorType]:
    """``q * scale`` in float32 (per-channel scales broadcast on their axis): the way out."""
    _quant(ctx, 0)
    return [TensorType(DType.F32, ctx.type(0).shape)]


# ----- accumulating ops ---------------------------------------------------------------------


def _weights(ctx: InferContext, index: int, axis: int) -> tuple[float, ...]:
    w = ctx.type(index)
    q = _quant(ctx, index)
    if w.dtype not in (DType.I8, DType.I16):
        raise ShapeError(f"{ctx.op} weights must be i8 or i16, got {w}")
    return _channel_scales(q, axis, w.shape[axis])


def _check_bias(ctx: InferContext, index: int, scales: Sequence[float]) -> None:
    if not ctx.has(index):
        return
    b = ctx.type(index)
    if b.dtype is not DType.I32 or b.shape != (len(scales),):
        raise ShapeError(f"{ctx.op} bias must be i32[{len(scales)}], got {b}")
    got = _channel_scales(_quant(ctx, index), 0, len(scales))
    if any(abs(g - s) > 1e-12 * s for g, s in zip(got, scales)):
        raise ShapeError(f"{ctx.op} bias scales must be input scale x weight scales")


def _activation(ctx: InferContext, index: int) -> float:
    if ctx.type(index).dtype not in (DType.I8, DType.U8, DType.I16, DType.U16):
        raise ShapeError(f"{ctx.op} input {index} must be 8- or 16-bit, got {ctx.type(index)}")
    return _per_tensor(ctx, index)


@OPS.op(
    "QConv",
    inputs=(2, 3),
    attrs=FLOAT_OPS["Conv"].attrs,
    canonicalize=FLOAT_OPS["Conv"].canonicalize,
    traits=_WEIGHTED,
    weight_axis=lambda node: 0,
)
def _qconv(ctx: InferContext) -> list[TensorType]:
    """Integer convolution (Conv's attributes), int32 accumulation, bias at ``s_x * s_w``."""
    s_x = _activation(ctx, 0)
    scales = tuple(s_x * s for s in _weights(ctx, 1, 0))
    _check_bias(ctx, 2, scales)
    return [_accumulator(conv_shape(ctx), scales, 1)]


@OPS.op(
    "QConvTranspose",
    inputs=(2, 3),
    attrs=FLOAT_OPS["ConvTranspose"].attrs,
    canonicalize=FLOAT_OPS["ConvTranspose"].canonicalize,
    traits=_WEIGHTED,
    weight_axis=lambda node: 1,
)
def _qconv_transpose(ctx: InferContext) -> list[TensorType]:
    """Integer transposed convolution (ConvTranspose's attributes), int32 accumulation.

    Weights ``(C, M / group, k...)`` are quantized along axis 1, one scale per output channel
    of a group shared by every group (output channel ``g * M / group + j`` has ``s_w[j]``);
    bias int32 at ``s_x * s_w``.
    """
    s_x = _activation(ctx, 0)
    scales = tuple(s_x * s for s in _weights(ctx, 1, 1)) * ctx["group"]
    _check_bias(ctx, 2, scales)
    return [_accumulator(conv_transpose_shape(ctx), scales, 1)]


@OPS.op(
    "QGemm",
    inputs=(2, 3),
    attrs={"transB": Attr("int", 0)},
    traits=_WEIGHTED,
    weight_axis=lambda node: 1 - node.attrs["transB"],
)
def _qgemm(ctx: InferContext) -> list[TensorType]:
    """``A @ op(B) + C`` on integers, int32 accumulation; B per-output-column scales."""
    a, b = ctx.type(0), ctx.type(1)
    if a.rank != 2 or b.rank != 2:
        raise ShapeError(f"QGemm takes 2-D inputs, got {a}, {b}")
    s_a = _activation(ctx, 0)
    k2, n = b.shape[::-1] if ctx["transB"] else b.shape
    if a.shape[1] != k2:
        raise ShapeError(f"QGemm inner dimensions differ: {a.shape[1]} vs {k2}")
    scales = tuple(s_a * s for s in _weights(ctx, 1, 0 if ctx["transB"] else 1))
    _check_bias(ctx, 2, scales)
    return [_accumulator((a.shape[0], n), scales, 1)]


@OPS.op(
    "QMatMul",
    inputs=(2, 3),
    traits=_WEIGHTED,
    weight_axis=lambda node: 1,
)
def _qmatmul(ctx: InferContext) -> list[TensorType]:
    """``A @ B + C`` on integers, int32 accumulation; B 2-D with per-column (or one) scales,
    optional bias C int32 at ``s_a * s_b[n]``."""
    a, b = ctx.type(0), ctx.type(1)
    if b.rank != 2 or a.rank < 2 or a.shape[-1] != b.shape[0]:
        raise ShapeError(f"QMatMul takes [..., K] @ [K, N], got {a}, {b}")
    s_a = _activation(ctx, 0)
    scales = tuple(s_a * s for s in _weights(ctx, 1, 1))
    _check_bias(ctx, 2, scales)
    return [_accumulator((*a.shape[:-1], b.shape[1]), scales, a.rank - 1)]


@OPS.op("QGlobalAveragePool", traits=(Trait.INTEGER, Trait.ACCUMULATOR, Trait.LAYER))
def _qglobal_avgpool(ctx: InferContext) -> list[TensorType]:
    """Sum over the spatial axes in int32; the scale ``s_x / N`` makes it the mean."""
    x = ctx.type(0)
    if x.rank < 3:
        raise ShapeError(f"QGlobalAveragePool needs rank >= 3, got {x}")
    count = math.prod(x.shape[2:])
    shape = (*x.shape[:2], *(1,) * (x.rank - 2))
    return [_accumulator(shape, (_activation(ctx, 0) / count,), 1)]


@OPS.op(
    "QAveragePool",
    attrs={"kernel_shape": Attr("ints"), "strides": Attr("ints", ()), "mean": Attr("int", 1)},
    canonicalize=lambda a, t: {**a, "strides": a["strides"] or (1,) * len(a["kernel_shape"])},
    traits=(Trait.INTEGER, Trait.ACCUMULATOR, Trait.LAYER),
)
def _qavgpool(ctx: InferContext) -> list[TensorType]:
    """Window sums in int32 (no padding: a padded pool reads a ``Pad``); the scale
    ``s_x / N`` makes them means, or, with ``mean=0``, ``s_x`` the plain sums (divided by a
    count per position that varies: a ``QDivCount`` reads them)."""
    x = ctx.type(0)
    kernel, strides = ctx["kernel_shape"], ctx["strides"]
    if x.rank != len(kernel) + 2 or len(strides) != len(kernel):
        raise ShapeError(f"QAveragePool kernel {list(kernel)} does not fit {x}")
    dims = []
    for size, k, s in zip(x.shape[2:], kernel, strides):
        if k > size:
            raise ShapeError(f"window {k} larger than the input {size}")
        dims.append((size - k) // s + 1)
    count = math.prod(kernel) if ctx["mean"] else 1
    return [_accumulator((*x.shape[:2], *dims), (_activation(ctx, 0) / count,), 1)]


@OPS.op(
    "QReduceSum",
    attrs={"axes": Attr("ints"), "keepdims": Attr("int", 1), "mean": Attr("int", 0)},
    traits=(Trait.INTEGER, Trait.ACCUMULATOR, Trait.LAYER),
)
def _qreduce_sum(ctx: InferContext) -> list[TensorType]:
    """Sum over ``axes`` in int32 (kept as size 1 with ``keepdims``); the scale is ``s_x``,
    or ``s_x / N`` with ``mean`` (ReduceMean: the division lives in the scale). A raw
    (unquantized) 0/1 mask gives its raw int32 count (a masked mean's denominator)."""
    x = ctx.type(0)
    axes = ctx["axes"]
    if not axes or len(set(axes)) != len(axes) or not all(0 <= a < x.rank for a in axes):
        raise ShapeError(f"QReduceSum axes {list(axes)} do not fit {x}")
    count = math.prod(x.shape[a] for a in axes)
    if ctx["mean"] and count == 0:  # the float mean is NaN: no integer stands for it
        raise ShapeError(f"QReduceSum takes a mean over axes {list(axes)} of {x}: no elements")
    if ctx["keepdims"]:
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    else:
        shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    if x.quant is None:  # a raw 0/1 mask: how many positions it keeps, as a raw int32
        if not x.dtype.is_integer or x.dtype is DType.BOOL or ctx["mean"]:
            raise ShapeError(f"QReduceSum counts a raw integer mask, got {x}")
        return [TensorType(DType.I32, shape)]
    scale = _activation(ctx, 0) / (count if ctx["mean"] else 1)
    return [_accumulator(shape, (scale,), 0)]


@OPS.op(
    "QResize",
    attrs={
        "axes": Attr("ints"),
        "sizes": Attr("ints"),
        "low": Attr("ints"),
        "high": Attr("ints"),
        "weight": Attr("ints"),
        "frac_bits": Attr("int"),
    },
    traits=(Trait.INTEGER, Trait.ACCUMULATOR, Trait.LAYER),
)
def _qresize(ctx: InferContext) -> list[TensorType]:
    """Linear interpolation to ``sizes`` along ``axes`` (ascending), one after another
    (:func:`intq.semantics.kernels.resize_linear`): output position ``o`` of an axis sums
    ``x[low[o]] (2^F - weight[o]) + x[high[o]] weight[o]``, ``F = frac_bits``. ``low``,
    ``high`` and ``weight`` hold each axis' entries in turn. The input is a per-tensor
    activation of <= 16 bits; the result an int32 accumulator at ``s_x * 2^-(F * axes)``
    (the range analysis proves it fits)."""
    s_x = _activation(ctx, 0)
    x = ctx.type(0)
    axes, sizes, frac_bits = ctx["axes"], ctx["sizes"], ctx["frac_bits"]
    if len(sizes) != x.rank or any(d < 1 for d in sizes):
        raise ShapeError(f"QResize sizes {list(sizes)} do not fit {x}")
    if not axes or list(axes) != sorted(set(axes)) or not all(0 <= a < x.rank for a in axes):
        raise ShapeError(f"QResize axes {list(axes)} must be ascending axes of {x}")
    if any(sizes[a] != x.shape[a] for a in range(x.rank) if a not in axes):
        raise ShapeError(f"QResize changes the size of an axis outside {list(axes)}")
    if not 1 <= frac_bits <= 30:
        raise ShapeError(f"QResize frac_bits {frac_bits} outside [1, 30]")
    count = sum(sizes[a] for a in axes)
    start = 0
    for a in axes:
        end = start + sizes[a]
        for key in ("low", "high"):
            part = ctx[key][start:end]
            if len(part) != end - start or not all(0 <= i < x.shape[a] for i in part):
                raise ShapeError(f"QResize {key} indices outside axis {a} of {x}")
        start = end
    weights = ctx["weight"]
    if len(ctx["low"]) != count or len(ctx["high"]) != count or len(weights) != count:
        raise ShapeError(f"QResize needs {count} low and high indices and weights")
    if not all(0 <= w <= 1 << frac_bits for w in weights):
        raise ShapeError(f"QResize weights outside [0, 2^{frac_bits}]")
    scale = math.ldexp(s_x, -frac_bits * len(axes))
    return [_accumulator(tuple(sizes), (scale,), 0)]


# ----- rescaling --------------------------------------------------------------------------------


@OPS.op(
    "Requantize",
    attrs={
        "multiplier": Attr("ints"),
        "shift": Attr("ints"),
        "axis": Attr("int", -1),
        "factor": Attr("float", 1.0),
        **_OUTPUT_ATTRS,
    },
    traits=(Trait.INTEGER,),
)
def _requantize(ctx: InferContext) -> list[TensorType]:
    """``clamp((x * M[c] + 2^(S[c]-1)) >> S[c], lo, hi)`` in int64 (see intq.semantics.numerics).

    One ``(M, S)`` pair per tensor, or one per channel along ``axis`` matching
    the input's per-channel scales. ReLU and ReLU6 live in the clamp. ``factor`` is a
    constant the float graph multiplied the input by (attention's ``1/sqrt(d)``), folded
    into the multipliers: ``M * 2^-S`` stands for ``s_in * factor / s_out``.
    """
    x = ctx.type(0)
    q = _quant(ctx, 0)
    multipliers, shifts = ctx["multiplier"], ctx["shift"]
    if len(multipliers) != len(shifts) or not multipliers:
        raise ShapeError("Requantize needs one shift per multiplier")
    if len(multipliers) == 1:
        if q.axis is not None and len(set(q.scale)) > 1:
            raise ShapeError("a per-channel input needs per-channel multipliers")
        ins: tuple[float, ...] = (q.scale[0],)
    else:
        axis = ctx["axis"]
        if not 0 <= axis < x.rank or x.shape[axis] != len(multipliers):
            raise ShapeError(f"{len(multipliers)} multipliers do not fit axis {axis} of {x}")
        ins = _channel_scales(q, axis, len(multipliers))
    out = _output(ctx, x.shape)
    for c, (m, s, s_in) in enumerate(zip(multipliers, shifts, ins)):
        _check_dyadic(m, s, s_in * ctx["factor"] / ctx["scale"], f"channel {c}")
    return [out]


@OPS.op(
    "QAdd",
    inputs=2,
    attrs={
        "multiplier_a": Attr("int"),
        "multiplier_b": Attr("int"),
        "shift": Attr("int"),
        **_OUTPUT_ATTRS,
    },
    traits=(Trait.INTEGER, Trait.LAYER),
)
def _qadd(ctx: InferContext) -> list[TensorType]:
    """``clamp((a * Ma + b * Mb + 2^(S-1)) >> S, lo, hi)``: both branches aligned, one rounding.

    A multiplier is negative for a subtracted branch (``a - b``: ``Mb < 0``)."""
    s_a, s_b = _per_tensor(ctx, 0), _per_tensor(ctx, 1)
    a, b = ctx.type(0), ctx.type(1)
    try:
        shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ShapeError(f"QAdd input shapes do not broadcast: {a}, {b}") from None
    out = _output(ctx, shape)
    shift, scale = ctx["shift"], ctx["scale"]
    for m, s_in, name in ((ctx["multiplier_a"], s_a, "a"), (ctx["multiplier_b"], s_b, "b")):
        real = s_in / scale
        # One shared shift: the smaller branch has fewer multiplier bits, so its
        # error is bounded absolutely (2^-(S+1)) rather than relatively.
        if not -(1 << 31) < m < 1 << 31 or (
            abs(math.ldexp(abs(m), -shift) - real) > math.ldexp(1, -shift)
        ):
            raise ShapeError(f"QAdd multiplier of {name} does not match its scale ratio {real!r}")
    return [out]


@OPS.op(
    "QMul",
    inputs=2,
    attrs={"multiplier": Attr("int"), "shift": Attr("int"), **_OUTPUT_ATTRS},
    traits=(Trait.INTEGER, Trait.LAYER),
)
def _qmul(ctx: InferContext) -> list[TensorType]:
    """``clamp((a * b * M + 2^(S-1)) >> S, lo, hi)`` (:func:`intq.semantics.kernels.multiply`):
    a product of two per-tensor activations of <= 16 bits, broadcasting as numpy, and one
    dyadic rescaling with ``M * 2^-S ~= s_a * s_b / s_out``."""
    s_a, s_b = _activation(ctx, 0), _activation(ctx, 1)
    a, b = ctx.type(0), ctx.type(1)
    try:
        shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ShapeError(f"QMul input shapes do not broadcast: {a}, {b}") from None
    out = _output(ctx, shape)
    _check_dyadic(ctx["multiplier"], ctx["shift"], s_a * s_b / ctx["scale"], "QMul")
    return [out]


@OPS.op("QMask", inputs=2, traits=(Trait.INTEGER,))
def _qmask(ctx: InferContext) -> list[TensorType]:
    """``x * keep`` (:func:`intq.semantics.kernels.mask`): a per-tensor activation with the
    positions a raw 0/1 ``keep`` (broadcasting to it) removes set to 0, its type kept."""
    x, keep = ctx.type(0), ctx.type(1)
    _per_tensor(ctx, 0)
    if keep.quant is not None or not keep.dtype.is_integer:
        raise ShapeError(f"QMask keep must be a raw integer 0/1 tensor, got {keep}")
    try:
        fits = np.broadcast_shapes(keep.shape, x.shape) == x.shape
    except ValueError:
        fits = False
    if not fits:
        raise ShapeError(f"QMask keep {keep} does not broadcast to {x}")
    return [x]


@OPS.op(
    "QReduceL2",
    attrs={"axes": Attr("ints"), "multiplier": Attr("int"), "shift": Attr("int"), **_OUTPUT_ATTRS},
    traits=(Trait.INTEGER, Trait.LAYER),
)
def _qreduce_l2(ctx: InferContext) -> list[TensorType]:
    """``clamp(round(sqrt(sum(x^2)) M / 2^S), lo, hi)`` over ``axes``, kept as size 1
    (:func:`intq.semantics.kernels.l2_norm`): the L2 norm of a per-tensor activation at the
    output scale, ``M 2^-S ~= s_x / s_out`` with ``S >= 2``; no run-time division."""
    x = ctx.type(0)
    s_x = _activation(ctx, 0)
    axes = ctx["axes"]
    if not axes or any(not 0 <= a < x.rank for a in axes) or len(set(axes)) != len(axes):
        raise ShapeError(f"QReduceL2 axes {list(axes)} do not fit {x}")
    shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    out = _output(ctx, shape)
    if ctx["shift"] < 2:
        raise ShapeError(f"QReduceL2 shift {ctx['shift']} below 2")
    _check_dyadic(ctx["multiplier"], ctx["shift"], s_x / ctx["scale"], "QReduceL2")
    return [out]


@OPS.op(
    "QDiv",
    inputs=2,
    attrs={"multiplier": Attr("int"), "shift": Attr("int"), **_OUTPUT_ATTRS},
    traits=(Trait.INTEGER, Trait.LAYER),
)
def _qdiv(ctx: InferContext) -> list[TensorType]:
    """``clamp(round(a M / (max(b, 1) 2^S)), lo, hi)`` (:func:`intq.semantics.kernels.divide`):
    a per-tensor activation divided by a non-negative per-tensor one broadcasting to it
    (a norm, a mean of norms), ``M 2^-S ~= s_a / (s_b s_out)`` with ``S >= 1``, by a
    division-free reciprocal."""
    s_a, s_b = _activation(ctx, 0), _activation(ctx, 1)
    a, b = ctx.type(0), ctx.type(1)
    try:
        shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ShapeError(f"QDiv input shapes do not broadcast: {a}, {b}") from None
    if shape != a.shape:
        raise ShapeError(f"QDiv divisor {b} does not broadcast to the dividend {a}")
    out = _output(ctx, shape)
    if ctx["shift"] < 1:
        raise ShapeError(f"QDiv shift {ctx['shift']} below 1")
    _check_dyadic(ctx["multiplier"], ctx["shift"], s_a / (s_b * ctx["scale"]), "QDiv")
    return [out]


MAX_SHIFT = 62
"""``QDivCount``'s shifts lie in ``[1, 62]``: a run-time shift of a signed value below 2^62."""


@OPS.op(
    "QDivCount",
    inputs=2,
    attrs={"multiplier": Attr("ints"), "shift": Attr("ints"), **_OUTPUT_ATTRS},
    traits=(Trait.INTEGER,),
)
def _qdiv_count(ctx: InferContext) -> list[TensorType]:
    """``clamp((acc * M[c] + 2^(S[c]-1)) >> S[c], lo, hi)`` with ``c = count``
    (:func:`intq.semantics.kernels.divide_by_count`): a per-tensor sum divided by a raw
    integer count ``0 <= c <= L`` broadcasting to it, a masked mean's ``sum / count``.
    ``multiplier``/``shift`` hold one pair per count ``0..L``, each within ``2^-30`` of
    ``s_in / (c * s_out)`` (entry 0 repeats entry 1: nothing kept sums to 0)."""
    acc, count = ctx.type(0), ctx.type(1)
    s_in = _per_tensor(ctx, 0)
    if count.quant is not None or not count.dtype.is_integer or count.dtype is DType.BOOL:
        raise ShapeError(f"QDivCount count must be a raw integer tensor, got {count}")
    try:
        shape = np.broadcast_shapes(acc.shape, count.shape)
    except ValueError:
        raise ShapeError(f"QDivCount count {count} does not broadcast to {acc}") from None
    if shape != acc.shape:
        raise ShapeError(f"QDivCount count {count} does not broadcast to {acc}")
    multipliers, shifts = ctx["multiplier"], ctx["shift"]
    if len(multipliers) != len(shifts) or len(multipliers) < 2:
        raise ShapeError("QDivCount needs one multiplier and one shift per count 0..L")
    out = _output(ctx, acc.shape)
    for c, (m, s) in enumerate(zip(multipliers, shifts)):
        if not 1 <= s <= MAX_SHIFT:
            raise ShapeError(f"QDivCount shift {s} of count {c} outside [1, {MAX_SHIFT}]")
        _check_dyadic(m, s, s_in / (max(c, 1) * ctx["scale"]), f"count {c}")
    return [out]


@OPS.op(
    "QPRelu",
    attrs={
        "slope": Attr("floats"),
        "multiplier_pos": Attr("int"),
        "multiplier_neg": Attr("ints"),
        "shift": Attr("int"),
        "axis": Attr("int", -1),
        **_OUTPUT_ATTRS,
    },
    traits=(Trait.INTEGER, Trait.LAYER),
)
def _qprelu(ctx: InferContext) -> list[TensorType]:
    """``clamp((x * M + 2^(S-1)) >> S, lo, hi)``, ``M`` the positive side's
    ``multiplier_pos`` where ``x >= 0`` and ``multiplier_neg[c]`` where ``x < 0``
    (:func:`intq.semantics.kernels.prelu`): PRelu (LeakyRelu: one slope) of a per-tensor
    activation of <= 16 bits with one ``slope`` per channel along ``axis`` (or one), and its
    rescaling, one rounding. One shift for both sides: each ``M * 2^-S`` is within ``2^-S``
    of ``s_x / s_out`` (times the slope on the negative side), as ``QAdd``'s."""
    s_x = _activation(ctx, 0)
    x = ctx.type(0)
    slopes, negatives = ctx["slope"], ctx["multiplier_neg"]
    if len(slopes) != len(negatives) or not slopes:
        raise ShapeError("QPRelu needs one negative-side multiplier per slope")
    if len(slopes) > 1 and not (0 <= ctx["axis"] < x.rank and x.shape[ctx["axis"]] == len(slopes)):
        raise ShapeError(f"{len(slopes)} slopes do not fit axis {ctx['axis']} of {x}")
    out = _output(ctx, x.shape)
    shift, ratio = ctx["shift"], s_x / ctx["scale"]
    sides = [(ctx["multiplier_pos"], ratio, "x >= 0")]
    sides += [(m, a * ratio, f"slope {a!r}") for m, a in zip(negatives, slopes)]
    for m, real, name in sides:
        if not -(1 << 31) < m < 1 << 31 or abs(math.ldexp(m, -shift) - real) > math.ldexp(
            1, -shift
        ):
            raise ShapeError(f"QPRelu multiplier of {name} does not match its ratio {real!r}")
    return [out]


LOOKUP_SIZE = 256
"""A ``QLookup`` table has one entry per code of its 8-bit input's storage type."""


@OPS.op(
    "QLookup",
    attrs={"table": Attr("ints"), **_OUTPUT_ATTRS},
    traits=(Trait.INTEGER, Trait.LAYER),
)
def _qlookup(ctx: InferContext) -> list[TensorType]:
    """``table[x - qmin]`` (:func:`intq.semantics.kernels.lookup`): an elementwise function
    of an 8-bit per-tensor input, one entry per storage code (``qmin`` -128 for int8, 0 for
    uint8), each entry within ``[lo, hi]``."""
    x = ctx.type(0)
    _per_tensor(ctx, 0)
    if x.dtype not in (DType.I8, DType.U8):
        raise ShapeError(f"QLookup takes an 8-bit input, got {x}")
    table = ctx["table"]
    if len(table) != LOOKUP_SIZE:
        raise ShapeError(f"QLookup needs {LOOKUP_SIZE} table entries, got {len(table)}")
    out = _output(ctx, x.shape)
    if not ctx["lo"] <= min(table) <= max(table) <= ctx["hi"]:
        raise ShapeError(f"QLookup table entries outside the clamp [{ctx['lo']}, {ctx['hi']}]")
    return [out]


# ----- transformer ops ------------------------------------------------------------------------


@OPS.op("QBatchMatMul", inputs=2, traits=(Trait.INTEGER, Trait.ACCUMULATOR))
def _qbatch_matmul(ctx: InferContext) -> list[TensorType]:
    """``A @ B`` of two activations (numpy batching), int32 accumulation at ``s_a * s_b``.

    Attention's ``Q K^T`` and ``P V``: both operands per-tensor, 8-bit.
    """
    a, b = ctx.type(0), ctx.type(1)
    if a.rank < 2 or b.rank < 2 or a.shape[-1] != b.shape[-2]:
        raise ShapeError(f"QBatchMatMul takes [..., M, K] @ [..., K, N], got {a}, {b}")
    try:
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ShapeError(f"QBatchMatMul batch dimensions do not broadcast: {a}, {b}") from None
    scale = _activation(ctx, 0) * _activation(ctx, 1)
    return [_accumulator((*batch, a.shape[-2], b.shape[-1]), (scale,), 0)]


def _variant(ctx: InferContext, allowed: tuple[str, ...]) -> str:
    if ctx["variant"] not in allowed:
        raise ShapeError(f"{ctx.op} variant {ctx['variant']!r} is not one of {list(allowed)}")
    return str(ctx["variant"])


@OPS.op(
    "QSoftmax",
    inputs=(1, 2),
    attrs={"variant": Attr("str"), "scale": Attr("float"), "axis": Attr("int", -1)},
    traits=(Trait.INTEGER, Trait.NON_NEGATIVE),
    kernel=SOFTMAX_KERNEL,
)
def _qsoftmax(ctx: InferContext) -> list[TensorType]:
    """Integer softmax (:func:`intq.semantics.kernels.softmax`) along the last axis.

    Input: any per-tensor integer (the int32 attention scores) whose unit is worth
    ``scale`` (its type's scale times any constant folded in, such as ``1/sqrt(d)``);
    optional input 1: a 0/1 ``keep`` mask broadcasting to it. Output: u8 probabilities
    at scale ``2^-8``.
    """
    x = ctx.type(0)
    _per_tensor(ctx, 0)
    variant = _variant(ctx, SOFTMAX_VARIANTS)
    if ctx["axis"] not in (-1, x.rank - 1):
        raise ShapeError("QSoftmax works along the last axis")
    if variant == "lut" and x.dtype.bits > 8:
        raise ShapeError(f"the lut softmax needs an 8-bit input, got {x}")
    if ctx.has(1):
        keep = ctx.type(1)
        if not keep.dtype.is_integer or np.broadcast_shapes(keep.shape, x.shape) != x.shape:
            raise ShapeError(f"QSoftmax keep mask {keep} does not broadcast to {x}")
    check_softmax_size(x.shape[-1])
    quant = QuantParams(SOFTMAX_OUT_BITS, False, (2.0**-SOFTMAX_OUT_BITS,))
    return [TensorType(DType.U8, x.shape, quant)]


@OPS.op(
    "QGelu",
    attrs={"variant": Attr("str"), **_OUTPUT_ATTRS},
    traits=(Trait.INTEGER,),
    kernel=GELU_KERNEL,
)
def _qgelu(ctx: InferContext) -> list[TensorType]:
    """Integer GELU (:func:`intq.semantics.kernels.gelu`) of a signed per-tensor input
    of <= 16 bits."""
    x = ctx.type(0)
    _per_tensor(ctx, 0)
    if x.dtype not in (DType.I8, DType.I16):
        raise ShapeError(f"QGelu takes i8 or i16, got {x}")
    _variant(ctx, GELU_VARIANTS)
    return [_output(ctx, x.shape)]


@OPS.op(
    "QLayerNorm",
    attrs={
        "variant": Attr("str"),
        "eps": Attr("int"),
        "multiplier": Attr("ints"),
        "shift": Attr("ints"),
        "bias": Attr("ints"),
        **_OUTPUT_ATTRS,
    },
    traits=(Trait.INTEGER,),
    kernel=LAYERNORM_KERNEL,
)
def _qlayernorm(ctx: InferContext) -> list[TensorType]:
    """Integer LayerNorm over the last axis (:func:`intq.semantics.kernels.layernorm`).

    ``eps`` in integer units of the centred sums; ``multiplier``/``shift``/``bias`` are
    the per-channel affine ``gamma``, ``beta`` and output scale (``layernorm_affine``), or
    one entry each for every channel.
    """
    x = ctx.type(0)
    _per_tensor(ctx, 0)
    if x.dtype not in (DType.I8, DType.I16, DType.U8, DType.U16):
        raise ShapeError(f"QLayerNorm takes 8- or 16-bit integers, got {x}")
    _variant(ctx, LAYERNORM_VARIANTS)
    size = x.shape[-1]
    if not len(ctx["multiplier"]) == len(ctx["shift"]) == len(ctx["bias"]) in (1, size):
        raise ShapeError(f"QLayerNorm needs {size} multipliers, shifts and biases (or one each)")
    try:
        check_layernorm_size(size, x.quant.bits if x.quant is not None else x.dtype.bits)
    except NumericsError as err:
        raise ShapeError(str(err)) from None
    return [_output(ctx, x.shape)]
