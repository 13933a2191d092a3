"""Integer-only kernels: Shiftmax, ShiftGELU, integer LayerNorm; tables and products.

``QLookup`` (an elementwise function as an exactly rounded 256-entry table,
:func:`elementwise_table`, :func:`lookup`), ``QMul`` (a product of two activations and
one dyadic rescaling, :func:`multiply`), ``QPRelu`` (a slope per channel on the negative
side and the rescaling, :func:`prelu`), ``QResize`` (linear interpolation with fixed-point
weights, :func:`resize_linear`), ``QMask`` (:func:`mask`), ``QDivCount`` (a sum divided by
a run-time count through a table of multipliers, :func:`divide_by_count`), ``QReduceL2`` (an
L2 norm by the division-free inverse square root, :func:`l2_norm`) and ``QDiv`` (a quotient
of two activations by the division-free reciprocal, :func:`divide`) are written the same
way.

Each kernel is written **once**, against :class:`IntOps`, a small vocabulary
of int64 operations (add, multiply, shifts, compare-and-select, reductions,
table lookup, and a floor division that only the division variants use).
The reference interpreter runs a kernel with :class:`NumpyOps`; a backend
runs the same function with its own ``IntOps`` that emits its ops (ONNX
nodes, Relax expressions), so every backend computes the same integers by
construction and the tests check that it does.

All values are int64. Every kernel's intermediates are bounded below 2^62
for the input ranges the lowering admits (stated per kernel);
:class:`NumpyOps` checks each operation and raises :class:`NumericsError`
if one ever leaves int64.

Fixed-point conventions: ``x_fx`` holds ``x * 2^F``; ``>>`` is the
arithmetic shift (floor); rounding shifts add ``2^(s-1)`` first.

Variants (per op type, chosen in the quantization config):

============  ==================================================================
``shift``     I-ViT: base-2 exponent by multiply-and-shift, integer part as a
              shift, remainder by the linear ``2^-f ~= 1 - f/2``; normalisation
              with one integer division per row (softmax) / element (GELU).
``divfree``   the exponent with I-BERT's quadratic remainder; reciprocals and
              inverse square roots by Newton iterations after normalising with a
              leading-bit count: no runtime division at all.
``lut``       a 2^b-entry integer table for b <= 8 bit inputs (exp of
              ``x - max``; GELU itself), normalisation as ``divfree``.
``poly``      I-BERT: 2nd-order polynomial for the exponent remainder (i-exp)
              and for erf (i-GELU); integer division for the normalisation.
============  ==================================================================

LayerNorm has ``isqrt`` (integer square root by Newton with division, then one
division per row; I-BERT) and ``divfree`` (inverse square root by Newton).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from intq.errors import NumericsError
from intq.semantics.numerics import dyadic

if TYPE_CHECKING:
    from intq.ir.graph import Node

T = TypeVar("T")

SOFTMAX_VARIANTS = ("divfree", "shift", "lut", "poly")
GELU_VARIANTS = ("divfree", "shift", "lut", "poly")
LAYERNORM_VARIANTS = ("divfree", "isqrt")
SOFTMAX_DIVIDING = ("shift", "poly")
GELU_DIVIDING = ("shift",)
LAYERNORM_DIVIDING = ("isqrt",)
"""The variants that divide at run time (the op definitions state them for the census)."""

EXP_BITS = 16
"""Fractional bits of exponentials: ``exp(d) ~= e / 2^16`` for ``d <= 0``."""
SIGMOID_BITS = 14
"""Fractional bits of the sigmoid inside GELU (keeps ``x * sigma * M`` below 2^61)."""
NORM_BITS = 16
"""Fractional bits of the normalised values inside LayerNorm."""
SOFTMAX_OUT_BITS = 8
"""Softmax outputs are unsigned 8-bit probabilities at scale ``2^-8`` (1.0 saturates to 255)."""


class IntOps(Protocol[T]):
    """The int64 operations a kernel may use (``T``: a backend's tensor handle)."""

    def const(self, value: npt.ArrayLike) -> T: ...
    def add(self, a: T, b: T) -> T: ...
    def sub(self, a: T, b: T) -> T: ...
    def mul(self, a: T, b: T) -> T: ...
    def sra(self, x: T, shift: npt.ArrayLike) -> T:
        """``floor(x / 2^shift)`` for constant ``0 <= shift <= 62`` (scalar or per channel)."""
        ...

    def srl_var(self, x: T, shift: T) -> T:
        """``x >> shift`` for ``x >= 0`` and a run-time ``0 <= shift <= 63``."""
        ...

    def shl_var(self, x: T, shift: T) -> T:
        """``x << shift`` for ``x >= 0`` and a run-time shift; the result stays below 2^63."""
        ...

    def less(self, a: T, b: T) -> T:
        """1 where ``a < b`` else 0."""
        ...

    def where(self, cond: T, a: T, b: T) -> T:
        """``a`` where ``cond != 0`` else ``b``."""
        ...

    def reduce_max(self, x: T, axis: int) -> T: ...
    def reduce_sum(self, x: T, axis: int) -> T: ...
    def count_at_least(self, x: T, thresholds: np.ndarray) -> T:
        """How many of the ascending ``thresholds`` are ``<= x`` (a leading-bit count)."""
        ...

    def gather(self, table: np.ndarray, index: T) -> T:
        """``table[index]`` for ``0 <= index < len(table)``."""
        ...

    def take(self, x: T, index: np.ndarray, axis: int) -> T:
        """``x``'s entries at the constant 1-D ``index`` along ``axis`` (every index inside
        that axis): data movement."""
        ...

    def div(self, a: T, b: T) -> T:
        """``a // b`` for ``a >= 0``, ``b > 0``: the one run-time division."""
        ...


_LIMIT = 2.0**63


class NumpyOps:
    """:class:`IntOps` on numpy int64 arrays, checking every result stays inside int64."""

    def __init__(self, where: str = "kernel"):
        self.where_ = where

    def _checked(self, exact: np.ndarray, approx: np.ndarray, what: str) -> np.ndarray:
        if approx.size and float(np.abs(approx).max()) >= _LIMIT:
            raise NumericsError(f"int64 overflow in {what}", node=self.where_)
        return exact

    def const(self, value: npt.ArrayLike) -> np.ndarray:
        return np.asarray(value, np.int64)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self._checked(a + b, a.astype(np.float64) + b, "add")

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self._checked(a - b, a.astype(np.float64) - b, "sub")

    def mul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self._checked(a * b, a.astype(np.float64) * b, "mul")

    def sra(self, x: np.ndarray, shift: npt.ArrayLike) -> np.ndarray:
        return x >> np.asarray(shift, np.int64)

    def srl_var(self, x: np.ndarray, shift: np.ndarray) -> np.ndarray:
        return np.where(shift >= 63, 0, x >> np.minimum(shift, 62))

    def shl_var(self, x: np.ndarray, shift: np.ndarray) -> np.ndarray:
        approx = x.astype(np.float64) * np.exp2(shift.astype(np.float64))
        return self._checked(x << shift, approx, "shift left")

    def less(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a < b).astype(np.int64)

    def where(self, cond: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.where(cond != 0, a, b).astype(np.int64)

    def reduce_max(self, x: np.ndarray, axis: int) -> np.ndarray:
        return x.max(axis=axis, keepdims=True)

    def reduce_sum(self, x: np.ndarray, axis: int) -> np.ndarray:
        return self._checked(
            x.sum(axis=axis, keepdims=True),
            x.astype(np.float64).sum(axis=axis, keepdims=True),
            "sum",
        )

    def count_at_least(self, x: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
        return (x[..., None] >= thresholds).sum(axis=-1).astype(np.int64)

    def gather(self, table: np.ndarray, index: np.ndarray) -> np.ndarray:
        return np.asarray(table, np.int64)[index]

    def take(self, x: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
        return np.take(x, np.asarray(index, np.int64), axis=axis)

    def div(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a // b


# ----- helpers on top of IntOps ---------------------------------------------------------------


class _K(Generic[T]):
    """Derived operations shared by the kernels."""

    def __init__(self, ops: IntOps[T]):
        self.ops = ops

    def c(self, value: npt.ArrayLike) -> T:
        return self.ops.const(value)

    def round_shift(self, x: T, shift: npt.ArrayLike) -> T:
        """``floor(x / 2^s + 1/2)`` for constant ``s >= 1`` (per channel allowed)."""
        s = np.asarray(shift, np.int64)
        return self.ops.sra(self.ops.add(x, self.c(np.int64(1) << (s - 1))), s)

    def clamp(self, x: T, lo: int, hi: int) -> T:
        o = self.ops
        low = o.where(o.less(x, self.c(lo)), self.c(lo), x)
        return o.where(o.less(self.c(hi), low), self.c(hi), low)

    def maximum(self, a: T, b: T) -> T:
        return self.ops.where(self.ops.less(a, b), b, a)

    def absolute(self, x: T) -> T:
        o = self.ops
        return o.where(o.less(x, self.c(0)), o.sub(self.c(0), x), x)

    def floor_log2(self, x: T) -> T:
        """``floor(log2(x))`` for ``1 <= x < 2^62``."""
        powers = np.left_shift(np.int64(1), np.arange(1, 62, dtype=np.int64))
        return self.ops.count_at_least(x, powers)

    def sra_var(self, x: T, shift: T) -> T:
        """``floor(x / 2^shift)`` for signed ``|x| < 2^62`` and a run-time shift in [0, 62]."""
        o = self.ops
        bias = self.c(1 << 62)
        return o.sub(o.srl_var(o.add(x, bias), shift), o.srl_var(bias, shift))

    def reciprocal(self, m: T) -> T:
        """``y ~= 2^61 / m`` for ``2^30 <= m <= 2^31`` by Newton's method, division-free.

        Start from the chord ``48/17 - 32/17 m'`` (``m' = m / 2^31``, error <= 1/17),
        three iterations ``y += y (2^61 - m y) / 2^61``: relative error < 2^-29.
        """
        o = self.ops
        y = o.sub(
            self.c(round(48 / 17 * 2**30)), o.sra(o.mul(self.c(round(32 / 17 * 2**30)), m), 31)
        )
        for _ in range(3):
            err = o.sub(self.c(1 << 61), o.mul(m, y))  # |err| < 2^57 after the chord
            y = o.add(y, o.sra(o.mul(y, o.sra(err, 30)), 31))
        return y

    def exp_neg(self, d: T, scale: float, variant: str) -> T:
        """``exp(d * scale) * 2^EXP_BITS`` for ``d <= 0`` (already clamped, see ``exp_floor``).

        ``t = round(-d * scale * log2(e) * 2^F)`` by one multiply-and-shift; its integer
        part ``q`` becomes a right shift and its remainder ``f = r / 2^F`` in [0, 1) is
        approximated by ``2^-f ~= 1 - f/2`` (``shift``, error <= 6.1%) or, for any other
        variant, I-BERT's ``0.3585 (p + 1.353)^2 + 0.344`` with ``p = -f ln 2`` (error
        <= 0.3%).
        """
        o, F = self.ops, EXP_BITS
        step = dyadic(scale * math.log2(math.e))
        # t >= 0 in F fractional bits; |d| * M < 2^62 is what exp_floor guarantees.
        t = self.round_shift(o.mul(o.sub(self.c(0), d), self.c(step.multiplier)), step.shift - F)
        q = o.sra(t, F)
        r = o.sub(t, o.mul(q, self.c(1 << F)))
        if variant != "shift":
            ln2 = dyadic(math.log(2))
            p = self.round_shift(o.mul(r, self.c(ln2.multiplier)), ln2.shift)  # f ln2, F bits
            base = o.sub(self.c(round(1.353 * 2**F)), p)  # (1.353 - f ln2), F bits
            square = self.round_shift(o.mul(base, base), F)
            mantissa = o.add(
                self.round_shift(o.mul(square, self.c(round(0.3585 * 2**F))), F),
                self.c(round(0.344 * 2**F)),
            )
        else:
            mantissa = o.sub(self.c(1 << F), o.sra(r, 1))
        return o.srl_var(mantissa, q)


def exp_floor(scale: float) -> int:
    """The most negative ``d`` that matters: ``exp(d * scale) < 2^-(EXP_BITS+2)`` below it."""
    return -math.ceil((EXP_BITS + 2) * math.log(2) / scale)


def check_exp_range(scale: float, what: str) -> None:
    """Refuses scales for which the exponent's ``|d| * M`` could leave int64 (or which need
    a left shift: a unit worth more than 2^14)."""
    step = dyadic(scale * math.log2(math.e))
    if -exp_floor(scale) * step.multiplier >= 2**62 or step.shift - EXP_BITS < 1:
        raise NumericsError(f"{what}: the input scale {scale:g} is too fine for the exponent")


# ----- softmax --------------------------------------------------------------------------------


def softmax(
    ops: IntOps[T], x: T, keep: T | None, scale: float, variant: str, axis: int, size: int
) -> T:
    """Integer softmax of ``x`` (any integer width, scale ``scale``) along ``axis``.

    Returns unsigned ``SOFTMAX_OUT_BITS``-bit probabilities at scale ``2^-8``:
    ``out = round(2^8 e_i / sum_j e_j)`` clamped to 255, with ``e = exp(x - max)`` as
    :meth:`_K.exp_neg` (``lut``: a table over ``x - max`` for 8-bit ``x``).
    ``keep`` (0/1, broadcast to ``x``) drops positions (their ``e`` is 0); a row with
    nothing kept keeps everything, as a float softmax with an additive ``-10^4`` does.
    ``size`` is the length of ``axis``; rows sum to ``2^8`` within ``size / 2`` units.
    """
    k, o = _K(ops), ops
    if variant not in SOFTMAX_VARIANTS:
        raise NumericsError(f"unknown softmax variant {variant!r}")
    floor = exp_floor(scale)
    if keep is not None:
        any_kept = o.reduce_max(keep, axis)
        keep = o.where(any_kept, keep, o.const(1))
        x = o.where(keep, x, o.const(-(1 << 40)))
    d = o.sub(x, o.reduce_max(x, axis))
    if variant == "lut":
        index = o.sub(o.const(0), k.maximum(d, o.const(-255)))
        table = np.rint(np.exp(-np.arange(256) * scale) * 2**EXP_BITS).astype(np.int64)
        e = o.gather(table, index)
    else:
        check_exp_range(scale, "softmax")
        e = k.exp_neg(
            k.maximum(d, o.const(floor)), scale, "shift" if variant == "shift" else "poly"
        )
    if keep is not None:
        e = o.mul(e, keep)
    total = o.reduce_sum(e, axis)  # in [2^(F-1), size * 2^F]
    if variant in SOFTMAX_DIVIDING:
        bits = 40
        factor = o.div(o.const(1 << bits), total)
        out = k.round_shift(o.mul(e, factor), bits - SOFTMAX_OUT_BITS)
    else:
        lead = k.floor_log2(total)
        m = o.shl_var(total, o.sub(o.const(30), lead))  # in [2^30, 2^31)
        y = k.reciprocal(m)  # 2^61 / m
        # e / total * 2^8 = e * y * 2^(8 - 61 + 30 - lead) = e * y >> (23 + lead).
        half = o.srl_var(o.mul(e, y), o.add(lead, o.const(22)))
        out = o.sra(o.add(half, o.const(1)), 1)
    return k.clamp(out, 0, (1 << SOFTMAX_OUT_BITS) - 1)


def check_softmax_size(size: int) -> None:
    """Row sums stay below 2^30 (the reciprocal's normalisation) for rows up to 2^14."""
    if size > 1 << (30 - EXP_BITS):
        raise NumericsError(f"softmax rows of {size} > 2^14 elements are not supported")


# ----- GELU -----------------------------------------------------------------------------------

GELU_SIGMOID = 1.702
"""``gelu(x) ~= x * sigmoid(1.702 x)`` (I-ViT's ShiftGELU, max error 0.021 vs erf GELU)."""


def gelu(
    ops: IntOps[T],
    x: T,
    in_scale: float,
    in_bits: int,
    out_scale: float,
    lo: int,
    hi: int,
    variant: str,
) -> T:
    """Integer GELU of signed ``in_bits``-bit ``x`` (<= 16) to ``clamp(round(gelu / out_scale))``.

    - ``shift`` / ``divfree``: ``x * sigmoid(1.702 x)`` with ``sigmoid(z) = 1 / (1 + e)``,
      ``e = exp(-|z|)`` as :meth:`_K.exp_neg` (linear / quadratic remainder), mirrored for
      ``z < 0``; the reciprocal of ``1 + e`` in (1, 2] by one integer division (``shift``)
      or Newton (``divfree``).
    - ``poly``: I-BERT's i-GELU, ``x/2 (1 + erf(x/sqrt2))`` with
      ``erf(u) ~= sign(u) (-0.2888 (min(|u|, 1.769) - 1.769)^2 + 1)``; no division.
    - ``lut``: ``table[x]``, the exactly rounded GELU for every 8-bit input.
    """
    k, o, F = _K(ops), ops, SIGMOID_BITS
    if variant not in GELU_VARIANTS:
        raise NumericsError(f"unknown GELU variant {variant!r}")
    if variant == "lut":
        if in_bits > 8:
            raise NumericsError(f"the GELU table needs inputs of <= 8 bits, got {in_bits}")
        q = np.arange(-(1 << (in_bits - 1)), 1 << (in_bits - 1))
        real = _gelu_float(q * in_scale)
        table = np.clip(np.floor(real / out_scale + 0.5), lo, hi).astype(np.int64)
        return o.gather(table, o.add(x, o.const(1 << (in_bits - 1))))
    if variant == "poly":
        # u = min(|x| s / sqrt2, 1.769) in F bits; erf ~= sign * (1 - 0.2888 (u - 1.769)^2).
        to_u = dyadic(in_scale / math.sqrt(2))
        u = k.round_shift(o.mul(k.absolute(x), o.const(to_u.multiplier)), to_u.shift - F)
        u = o.where(o.less(o.const(round(1.769 * 2**F)), u), o.const(round(1.769 * 2**F)), u)
        gap = o.sub(u, o.const(round(1.769 * 2**F)))
        square = k.round_shift(o.mul(gap, gap), F)
        erf_abs = o.sub(
            o.const(1 << F), k.round_shift(o.mul(square, o.const(round(0.2888 * 2**F))), F)
        )
        erf = o.where(o.less(x, o.const(0)), o.sub(o.const(0), erf_abs), erf_abs)
        factor = o.add(o.const(1 << F), erf)  # 2 * Phi(x) in F bits, in [0, 2^(F+1)]
        step = dyadic(in_scale / out_scale / 2 ** (F + 1))
    else:
        z_scale = in_scale * GELU_SIGMOID
        check_exp_range(z_scale, "GELU")
        mag = k.maximum(o.sub(o.const(0), k.absolute(x)), o.const(exp_floor(z_scale)))
        e = o.sra(k.exp_neg(mag, z_scale, variant), EXP_BITS - F)  # exp(-|z|), F bits
        denominator = o.add(o.const(1 << F), e)  # in (2^F, 2^(F+1)]
        if variant == "shift":
            sig_pos = o.div(o.const(1 << (2 * F)), denominator)
        else:
            # 2^(2F) / v = (2^61 / (v << (30 - F))) >> (31 - F), v << (30 - F) in (2^30, 2^31].
            y = k.reciprocal(o.mul(denominator, o.const(1 << (30 - F))))
            sig_pos = k.round_shift(y, 31 - F)
        factor = o.where(o.less(x, o.const(0)), o.sub(o.const(1 << F), sig_pos), sig_pos)
        step = dyadic(in_scale / out_scale / 2**F)
    # x * factor < 2^15 * 2^15; times M < 2^31: below 2^61.
    y = k.round_shift(o.mul(o.mul(x, factor), o.const(step.multiplier)), step.shift)
    return k.clamp(y, lo, hi)


def _gelu_float(x: np.ndarray) -> np.ndarray:
    import scipy.special

    return 0.5 * x * (1.0 + scipy.special.erf(x / math.sqrt(2)))


# ----- LayerNorm ------------------------------------------------------------------------------


def layernorm_constants(
    gamma: Sequence[float],
    beta: Sequence[float],
    eps: float,
    in_scale: float,
    out_scale: float,
    size: int | None = None,
) -> dict[str, int | tuple[int, ...]]:
    """The integer attributes of ``QLayerNorm``: ``eps`` in units of ``V``, and per channel
    ``out = round((n M_c + B_c) / 2^S_c)`` standing for
    ``(gamma_c n / 2^16 + beta_c) / out_scale`` (``M_c`` signed, ``|M_c| < 2^31``, ``S_c <= 48``).
    ``size``: the row length, when one ``gamma`` and ``beta`` stand for all of it.
    """
    size = len(gamma) if size is None else size
    multipliers, shifts, biases = [], [], []
    for g, b in zip(gamma, beta):
        real = abs(g) / out_scale / 2**NORM_BITS
        shift = min(max(dyadic(real).shift, 1), 48) if real > 0 else 48
        m_c = round(math.ldexp(real, shift))
        multipliers.append(m_c if g >= 0 else -m_c)
        shifts.append(shift)
        biases.append(round(math.ldexp(b / out_scale, shift)))
    eps_units = min(round(eps * size**3 / in_scale**2), 1 << 40)
    return {
        "eps": eps_units,
        "multiplier": tuple(multipliers),
        "shift": tuple(shifts),
        "bias": tuple(biases),
    }


def layernorm(
    ops: IntOps[T],
    x: T,
    size: int,
    eps: int,
    multiplier: Sequence[int],
    shift: Sequence[int],
    bias: Sequence[int],
    lo: int,
    hi: int,
    variant: str,
    bits: int = 16,
) -> T:
    """Integer LayerNorm over the last axis (``size`` = C) of ``x`` (``bits`` <= 16, any sign).

    Without any division by C: ``d = C x - sum(x)`` and ``V = sum(d^2) + eps`` give
    ``(x - mean) / sqrt(var + eps') = d sqrt(C) / sqrt(V)``. The normalised value
    ``n = d R`` with ``R = 2^16 sqrt(C) / sqrt(V)`` comes from an integer square root and
    one division per row (``isqrt``) or Newton's inverse square root (``divfree``); the
    affine ``gamma, beta`` and output scale are one per-channel multiply-and-shift
    (:func:`layernorm_constants`; one entry each stands for every channel, as for a
    GroupNorm's unit ``gamma``). Bounds: ``|d| <= C 2^16``, ``V <= C^3 2^30 + eps < 2^61``
    for 16-bit inputs; 8-bit inputs take rows up to 41285 long (:func:`check_layernorm_size`).
    Error: within one output unit of the exactly rounded float LayerNorm of ``x``.
    """
    k, o = _K(ops), ops
    if variant not in LAYERNORM_VARIANTS:
        raise NumericsError(f"unknown LayerNorm variant {variant!r}")
    check_layernorm_size(size, bits)
    d = o.sub(o.mul(x, o.const(size)), o.reduce_sum(x, -1))
    v = o.add(o.reduce_sum(o.mul(d, d), -1), o.const(eps))
    v = o.where(o.less(v, o.const(1)), o.const(1), v)  # V = 0 only where every d is 0
    sqrt_c = math.sqrt(size)
    # Normalise: V = m / 4^h with m = V << 2h in [2^60, 2^62), so sqrt(V) = sqrt(m) / 2^h
    # keeps 30 significant bits however small the variance is.
    h = o.sra(o.sub(o.const(61), k.floor_log2(v)), 1)
    m = o.shl_var(v, o.add(h, h))
    if variant == "isqrt":
        # r = isqrt(m) in [2^30, 2^31); R = sqrt(C) 2^53 // r; n = d R 2^(h - 37).
        # |d| <= sqrt(V) = r / 2^h, so |d R| <= sqrt(C) 2^53 / 2^h <= 2^58.
        r = o.div(o.const(round(sqrt_c * 2**53)), _isqrt(k, m))
        n = k.sra_var(o.mul(d, r), o.sub(o.const(37), h))
    else:
        # 1/sqrt(V) = 2^h / sqrt(m) = y 2^(h - 61), so n = d sqrt(C) 2^16 y 2^(h - 61).
        # |d y| < C 2^47: shift by 37 - h >= 7 first (keeping 8 extra bits), then multiply
        # by sqrt(C) 2^12 and round away the 20 bits.
        y = _inverse_sqrt(k, m)
        scaled = k.sra_var(o.mul(d, y), o.sub(o.const(37), h))
        n = k.round_shift(o.mul(scaled, o.const(round(sqrt_c * 2**12))), 20)
    total = o.add(o.mul(n, o.const(list(multiplier))), o.const(list(bias)))
    return k.clamp(k.round_shift(total, np.asarray(shift, np.int64)), lo, hi)


def layernorm_max_size(bits: int) -> int:
    """The largest row :func:`layernorm` takes for ``bits``-bit inputs: the largest ``C`` with
    ``C^3 4^(bits - 1) <= 2^60`` (1024 for 16 bits, 41285 for 8)."""
    limit, unit = 1 << 60, 1 << (2 * (bits - 1))
    size = round((limit / unit) ** (1 / 3))
    while size**3 * unit > limit:
        size -= 1
    while (size + 1) ** 3 * unit <= limit:
        size += 1
    return size


def check_layernorm_size(size: int, bits: int = 16) -> None:
    """``V <= C^3 (range / 2)^2 + eps < 2^61`` (a variance is at most (range / 2)^2, 2^30 for
    16-bit inputs, 2^14 for 8-bit ones) keeps every LayerNorm intermediate inside int64:
    ``C <= layernorm_max_size(bits)``. The other bounds hold for any such row: ``|d| <= C
    2^bits``, ``sqrt(C) 2^53 < 2^62`` (``isqrt``), ``|n M| <= sqrt(C) 2^47 < 2^62``."""
    largest = layernorm_max_size(bits)
    if size > largest:
        raise NumericsError(
            f"integer LayerNorm of {bits}-bit inputs supports up to {largest} channels, got {size}"
        )


def _isqrt(k: _K[T], v: T) -> T:
    """``floor(sqrt(v))`` for ``1 <= v < 2^62``: Newton ``r = (r + v // r) / 2`` (I-BERT)
    from ``2^ceil((lead+1)/2) >= sqrt(v)``; from above it decreases monotonically, six
    steps reach the floor for 62-bit inputs, and a last step fixes an overshoot of one."""
    o = k.ops
    lead = k.floor_log2(v)
    r = o.shl_var(o.const(1), o.sra(o.add(lead, o.const(2)), 1))
    for _ in range(6):
        r = o.sra(o.add(r, o.div(v, r)), 1)
    over = o.less(v, o.mul(r, r))
    return o.sub(r, over)


def _inverse_sqrt(k: _K[T], m: T) -> T:
    """``y ~= 2^30 / sqrt(m / 2^62)`` for ``m`` in [2^60, 2^62), division-free.

    ``m' = m / 2^62`` in [1/4, 1): start from the chord ``7/3 - 4/3 m'`` (<= 18% high),
    five Newton steps ``y = y (3 - m' y^2) / 2``: relative error below 2^-28.
    """
    o = k.ops
    m30 = o.sra(m, 32)  # m' in 30 fractional bits
    y = o.sub(o.const(round(7 / 3 * 2**30)), o.sra(o.mul(o.const(round(4 / 3 * 2**30)), m30), 30))
    for _ in range(5):
        y2 = o.sra(o.mul(y, y), 30)
        t = o.sra(o.mul(m30, y2), 30)
        y = o.sra(o.mul(y, o.sub(o.const(3 << 30), t)), 31)
    return y


# ----- tables and products of activations ----------------------------------------------------


def elementwise_table(
    fn: Callable[[np.ndarray], np.ndarray],
    in_scale: float,
    in_bits: int,
    in_signed: bool,
    out_scale: float,
    lo: int,
    hi: int,
) -> np.ndarray:
    """The exactly rounded table of ``fn`` for every code of an 8-bit storage type:
    ``table[i] = clamp(floor(fn(q s_in) / s_out + 1/2), lo, hi)`` for ``q = i + qmin`` of the
    storage type (-128 for int8, 0 for uint8), ``fn`` evaluated in float64. Codes outside
    the input's ``in_bits`` range are tabled too (they never occur). Refuses a function
    that is NaN somewhere on the grid (a square root of negative codes)."""
    if in_bits > 8:
        raise NumericsError(f"a table needs an input of <= 8 bits, got {in_bits}")
    first = -128 if in_signed else 0
    with np.errstate(all="ignore"):  # exp overflows to inf, which the clamp takes to hi
        real = np.asarray(fn(np.arange(first, first + 256, dtype=np.float64) * in_scale))
        if np.isnan(real).any():
            raise NumericsError("the function is undefined (NaN) for some input codes")
        scaled = np.floor(real.astype(np.float64) / out_scale + 0.5)
    return np.clip(scaled, lo, hi).astype(np.int64)


def lookup_offset(dtype: npt.DTypeLike) -> int:
    """What takes an 8-bit code of ``dtype`` to its table index (128 for int8, 0 for uint8)."""
    return -int(np.iinfo(dtype).min)


def lookup(ops: IntOps[T], x: T, table: np.ndarray, offset: int) -> T:
    """``table[x + offset]``: an elementwise function of an 8-bit input as one gather
    (``offset`` takes the input's codes, however a backend stores them, to 0..255)."""
    index = x if offset == 0 else ops.add(x, ops.const(offset))
    return ops.gather(table, index)


def multiply(
    ops: IntOps[T], a: T, b: T, multiplier: int, shift: int, lo: int, hi: int, offset: int = 0
) -> T:
    """``clamp((a b M + 2^(S-1)) >> S, lo, hi) + offset`` with numpy broadcasting: a product
    of two activations and one dyadic rescaling (``S <= 0``: ``a b M 2^-S``, no rounding).
    ``offset`` is added after the clamp (a backend's storage zero point). The caller proves
    ``|a b| M 2^max(0, -S) < 2^62``."""
    k = _K(ops)
    product = ops.mul(ops.mul(a, b), ops.const(multiplier << max(0, -shift)))
    if shift >= 63:  # |p| < 2^62 <= 2^(S-1): exactly 0 (intq.semantics.numerics)
        rounded = ops.mul(product, ops.const(0))
    else:
        rounded = k.round_shift(product, shift) if shift >= 1 else product
    out = k.clamp(rounded, lo, hi)
    return out if offset == 0 else ops.add(out, ops.const(offset))


def mask(ops: IntOps[T], x: T, keep: T) -> T:
    """``x * keep`` for a 0/1 ``keep`` broadcasting to ``x``: the masked values of a masked
    mean (``QMask``), exact, in ``x``'s own units."""
    return ops.mul(x, keep)


def divide_by_count(
    ops: IntOps[T],
    acc: T,
    count: T,
    multipliers: Sequence[int],
    shifts: Sequence[int],
    lo: int,
    hi: int,
) -> T:
    """``clamp((acc M[c] + 2^(S[c]-1)) >> S[c], lo, hi)`` with ``c = count`` (broadcasting to
    ``acc``) indexing compile-time tables (:func:`intq.semantics.numerics.count_divisors`):
    a sum divided by a run-time count ``0 <= c < len(multipliers)``, as one requantization
    whose dyadic multiplier is looked up, no division. The caller proves
    ``|acc| max(M) + 2^(max(S)-1) < 2^62`` and every ``S`` in ``[1, 62]``."""
    k = _K(ops)
    s = np.asarray(shifts, np.int64)
    m = ops.gather(np.asarray(multipliers, np.int64), count)
    half = ops.gather(np.left_shift(np.int64(1), s - 1), count)
    product = ops.add(ops.mul(acc, m), half)
    return k.clamp(k.sra_var(product, ops.gather(s, count)), lo, hi)


def l2_norm(
    ops: IntOps[T], x: T, axes: Sequence[int], multiplier: int, shift: int, lo: int, hi: int
) -> T:
    """``clamp(round(sqrt(sum(x^2)) M / 2^S), lo, hi)`` over ``axes`` (kept as size 1): an
    integer L2 norm (``QReduceL2``) at the output scale, ``M 2^-S ~= s_x / s_out``, with no
    run-time division.

    ``V = sum(x^2)`` in int64 (the caller proves ``N max(x^2) < 2^62``). Normalised as in
    :func:`layernorm`: ``m = V 4^h`` in ``[2^60, 2^62)``, ``sqrt(V) = sqrt(m) / 2^h``; the
    division-free inverse square root ``y ~= 2^61 / sqrt(m)`` (relative error < 2^-28) gives
    ``t = (m >> 31) y ~= sqrt(m) 2^30`` and ``w = round(t / 2^31) ~= sqrt(m) / 2`` in
    ``[2^29, 2^30]``; the output is ``round(w M / 2^(S + h - 1))`` (``w M < 2^61``). The
    caller keeps ``S >= 2``. A zero row gives 0. Error: within ``1/2 + 2^-26 |n|`` output
    units of the exact norm ``n = sqrt(V) M 2^-S`` (the relative errors of ``y``, of
    ``m >> 31`` and of ``w``, each below ``2^-28``)."""
    k, o = _K(ops), ops
    v = o.mul(x, x)
    for axis in axes:
        v = o.reduce_sum(v, axis)
    positive = o.less(o.const(0), v)
    v = o.where(positive, v, o.const(1))
    h = o.sra(o.sub(o.const(61), k.floor_log2(v)), 1)
    m = o.shl_var(v, o.add(h, h))
    t = o.mul(o.sra(m, 31), _inverse_sqrt(k, m))
    w = k.round_shift(t, 31)
    amount = o.add(h, o.const(shift - 1))
    amount = o.where(o.less(o.const(62), amount), o.const(62), amount)
    product = o.add(o.mul(w, o.const(multiplier)), o.shl_var(o.const(1), o.sub(amount, o.const(1))))
    norm = k.sra_var(product, amount)
    return k.clamp(o.where(positive, norm, o.const(0)), lo, hi)


def divide(ops: IntOps[T], a: T, b: T, multiplier: int, shift: int, lo: int, hi: int) -> T:
    """``clamp(round(a M / (b 2^S)), lo, hi)`` for an activation ``a`` and a non-negative
    activation ``b`` broadcasting to it (``QDiv``: ``x / ||x||``, GRN's ``Gx / mean(Gx)``),
    ``M 2^-S ~= s_a / (s_b s_out)``, with no run-time division.

    ``b`` is normalised by its leading bit ``l``: ``b 2^(30-l)`` in ``[2^30, 2^31)``, whose
    division-free reciprocal ``r ~= 2^61 / (b 2^(30-l))`` (Newton, relative error < 2^-29)
    gives ``a / b = a r / 2^(31+l)``. ``w = round(r M / 2^31) < 2^31`` folds the multiplier in
    at full precision, and the output is ``round(a w / 2^(S + l))`` (``|a w| < 2^46`` for
    16-bit ``a``; shifts beyond 62 give 0, as the exact result is below 1/4). The caller
    keeps ``S >= 1``. A divisor that rounds to 0 (or below, which a non-negative one only
    reaches by rounding) is taken as one step: the float op's ``eps`` guard. Error: within
    ``1/2 + 2^-27 |q|`` output units of the exact quotient ``q = a M / (b 2^S)``."""
    k, o = _K(ops), ops
    b = o.where(o.less(b, o.const(1)), o.const(1), b)
    lead = k.floor_log2(b)
    normal = o.shl_var(b, o.sub(o.const(30), lead))
    w = k.round_shift(o.mul(k.reciprocal(normal), o.const(multiplier)), 31)
    amount = o.add(lead, o.const(shift))
    amount = o.where(o.less(o.const(62), amount), o.const(62), amount)
    product = o.add(o.mul(a, w), o.shl_var(o.const(1), o.sub(amount, o.const(1))))
    return k.clamp(k.sra_var(product, amount), lo, hi)


def prelu(
    ops: IntOps[T],
    x: T,
    multiplier_pos: int,
    multiplier_neg: Sequence[int],
    axis: int,
    rank: int,
    shift: int,
    lo: int,
    hi: int,
) -> T:
    """``clamp((x M + 2^(S-1)) >> S, lo, hi)`` with ``M = multiplier_pos`` where ``x >= 0``
    and ``M = multiplier_neg[c]`` (of any sign, per channel along ``axis`` of a rank-``rank``
    ``x``, or one) where ``x < 0``: a PRelu and its rescaling in one rounding, both sides
    sharing ``S`` (``S <= 0``: ``x M 2^-S``, no rounding). The caller proves
    ``|x M| 2^max(0, -S) < 2^62``."""
    k = _K(ops)
    up = 1 << max(0, -shift)
    shape = [1] * rank
    if len(multiplier_neg) > 1:
        shape[axis] = len(multiplier_neg)
    negative_side = np.asarray(multiplier_neg, np.int64).reshape(shape) * up
    m = ops.where(ops.less(x, k.c(0)), k.c(negative_side), k.c(multiplier_pos * up))
    product = ops.mul(x, m)
    if shift >= 63:  # |x M| < 2^62 <= 2^(S-1): exactly 0 (intq.semantics.numerics)
        rounded = ops.mul(product, k.c(0))
    else:
        rounded = k.round_shift(product, shift) if shift >= 1 else product
    return k.clamp(rounded, lo, hi)


@dataclass(frozen=True)
class ResizeTaps:
    """One axis of a linear ``QResize``: output position ``o`` reads input positions
    ``low[o]`` and ``high[o]`` with the fixed-point weights ``2^F - weight[o]`` and
    ``weight[o]`` (``0 <= weight <= 2^F``)."""

    axis: int
    low: np.ndarray
    high: np.ndarray
    weight: np.ndarray


def resize_taps(attrs: Mapping[str, object]) -> list[ResizeTaps]:
    """The taps of each resized axis of a ``QResize`` with ``attrs``: its ``low``, ``high``
    and ``weight`` attributes hold one entry per output position of each axis in ``axes``,
    the axes one after another (``sizes`` gives their lengths)."""
    axes, sizes = attrs["axes"], attrs["sizes"]
    assert isinstance(axes, tuple) and isinstance(sizes, tuple)
    taps, start = [], 0
    for axis in axes:
        end = start + sizes[axis]
        low, high, weight = (
            np.asarray(attrs[key][start:end], np.int64)  # type: ignore[index]
            for key in ("low", "high", "weight")
        )
        taps.append(ResizeTaps(axis, low, high, weight))
        start = end
    return taps


def resize_linear(ops: IntOps[T], x: T, taps: Sequence[ResizeTaps], rank: int, frac_bits: int) -> T:
    """Separable linear interpolation with ``F = frac_bits``-bit weights: per axis
    ``y[o] = x[low[o]] (2^F - w[o]) + x[high[o]] w[o]``, one axis after another, no rounding
    anywhere. The weights of each axis are >= 0 and sum to ``2^F``, so every intermediate of
    ``k`` axes lies in ``[min(x), max(x)] * 2^(F k)``: the caller proves that range fits."""
    k = _K(ops)
    one = 1 << frac_bits
    y = x
    for tap in taps:
        shape = [1] * rank
        shape[tap.axis] = len(tap.low)
        w_high = tap.weight.reshape(shape)
        low = ops.mul(ops.take(y, tap.low, tap.axis), k.c(one - w_high))
        high = ops.mul(ops.take(y, tap.high, tap.axis), k.c(w_high))
        y = ops.add(low, high)
    return y


# ----- one entry point for the backends ---------------------------------------------------------


def run_node(ops: IntOps[T], node: Node, x: T, keep: T | None = None) -> T:
    """The kernel of IR ``node`` (an op with the ``KERNEL`` trait) on its int64 input ``x`` (and
    ``keep`` mask), with ``ops``: what every backend calls, so they all read the node's
    attributes the same way. Returns the clamped int64 result."""
    attrs, source = node.attrs, node.inputs[0]
    assert source is not None and source.type.quant is not None
    if node.op == "QSoftmax":
        size = source.type.shape[-1]
        return softmax(ops, x, keep, attrs["scale"], attrs["variant"], -1, size)
    if node.op == "QGelu":
        quant = source.type.quant
        lo, hi = attrs["lo"], attrs["hi"]
        return gelu(ops, x, quant.scale[0], quant.bits, attrs["scale"], lo, hi, attrs["variant"])
    return layernorm(
        ops,
        x,
        source.type.shape[-1],
        attrs["eps"],
        attrs["multiplier"],
        attrs["shift"],
        attrs["bias"],
        attrs["lo"],
        attrs["hi"],
        attrs["variant"],
        source.type.quant.bits,
    )
