"""Integer arithmetic of the numerics contract, in one place.

- :func:`dyadic` turns a positive real multiplier into ``M * 2^-S`` with
  ``2^30 <= M < 2^31``, so the relative error is below ``2^-31``.
- :func:`requantize` computes ``clamp((acc * M + 2^(S-1)) >> S, lo, hi)`` in
  int64 with an arithmetic shift, i.e. ``floor(acc * M / 2^S + 1/2)``:
  rounding half toward +infinity (TVM's ``UPWARD``, TFLite's single rounding).

How ``S`` outside ``[1, 63]`` is handled:

- ``S >= 64``: ``|acc * M| < 2^62 <= 2^(S-1)`` for an int32 ``acc`` (the range
  analysis proves ``acc`` fits int32), so ``acc * M + 2^(S-1)`` lies in
  ``(0, 2^S)`` and the result is exactly 0. Kernels return 0 without shifting.
- ``S <= 0`` (a multiplier of at least ``2^30``): no rounding is needed; the
  result is ``acc * M * 2^-S``, computed with a left shift, and the range
  analysis must prove it fits int64 before the clamp.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from intq.errors import NumericsError

MULTIPLIER_BITS = 31
"""``M < 2^31``: a positive int32, as TFLite and TVM's QNN use."""


@dataclass(frozen=True)
class Dyadic:
    """A dyadic number ``multiplier * 2^-shift``."""

    multiplier: int
    shift: int

    @property
    def value(self) -> float:
        """The real value (exact in float64 for ``|shift| < 1000``)."""
        return math.ldexp(self.multiplier, -self.shift)


def dyadic(real: float) -> Dyadic:
    """The closest ``M * 2^-S`` to ``real > 0`` with ``2^30 <= M < 2^31``."""
    if not (math.isfinite(real) and real > 0):
        raise NumericsError(f"a requantization multiplier must be positive and finite, got {real}")
    mantissa, exponent = math.frexp(real)  # real = mantissa * 2^exponent, 0.5 <= mantissa < 1
    multiplier = round(mantissa * (1 << MULTIPLIER_BITS))  # exact scaling by a power of two
    if multiplier == 1 << MULTIPLIER_BITS:  # rounded up to the next power of two
        multiplier >>= 1
        exponent += 1
    return Dyadic(multiplier, MULTIPLIER_BITS - exponent)


def common_shift(*reals: float) -> tuple[list[int], int]:
    """Multipliers ``M_i < 2^31`` sharing one shift ``S`` with ``M_i * 2^-S ~= reals[i]``.

    The largest real gets full 31-bit precision; smaller ones fewer bits
    (their absolute error is the same ``2^-(S+1)``). Used where one rounding
    serves several terms, as in a residual addition.
    """
    largest = dyadic(max(reals))
    shift = largest.shift
    multipliers = [round(math.ldexp(r, shift)) for r in reals]
    return multipliers, shift


def count_divisors(ratio: float, length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The dyadic ``M[c] * 2^-S[c]`` of ``ratio / c`` for every count ``c`` in ``0..length``:
    a masked mean's division by its run-time count ``c`` as a table of multipliers. Entry 0
    repeats entry 1 (a row with nothing kept sums to 0, which any multiplier keeps)."""
    if length < 1:
        raise NumericsError(f"a count table needs a length of at least 1, got {length}")
    pairs = [dyadic(ratio / c) for c in range(1, length + 1)]
    pairs.insert(0, pairs[0])
    return tuple(d.multiplier for d in pairs), tuple(d.shift for d in pairs)


def shift_round(product: np.ndarray, shift: np.ndarray | int) -> np.ndarray:
    """``(product + 2^(S-1)) >> S`` elementwise for int64 ``product`` (``S`` may be an array).

    ``S >= 64`` gives 0 and ``S <= 0`` a left shift (see the module docstring).
    """
    product = np.asarray(product, dtype=np.int64)
    shift = np.broadcast_to(np.asarray(shift, dtype=np.int64), product.shape)
    right = np.clip(shift, 1, 63)
    rounded = (product + np.left_shift(np.int64(1), right - 1)) >> right
    left = product << np.clip(-shift, 0, 62)
    out = np.where(shift >= 1, rounded, left)
    return np.where(shift >= 64, np.int64(0), out)


def requantize(
    acc: np.ndarray,
    multiplier: np.ndarray | int,
    shift: np.ndarray | int,
    lo: int,
    hi: int,
) -> np.ndarray:
    """``clamp((acc * M + 2^(S-1)) >> S, lo, hi)`` in int64 (``M``, ``S`` broadcast)."""
    product = np.asarray(acc, dtype=np.int64) * np.asarray(multiplier, dtype=np.int64)
    return np.clip(shift_round(product, shift), lo, hi)


def round_half_up(x: np.ndarray | float) -> np.ndarray:
    """``floor(x + 1/2)``: the rounding :func:`requantize` implements, for float inputs."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5)


def storage_dtype(bits: int, signed: bool) -> np.dtype:
    """The narrowest numpy integer type holding ``bits``-bit values (4-bit values use 8)."""
    for width in (8, 16, 32, 64):
        if bits <= width:
            return np.dtype(f"{'int' if signed else 'uint'}{width}")
    raise NumericsError(f"no integer type holds {bits} bits")


def clip_bounds(low: float, high: float, dtype: np.dtype | type) -> tuple[int, int]:
    """The integer bounds ``lo <= hi`` that every backend clamps a ``dtype`` integer ``Clip``
    of float bounds ``[low, high]`` to, as ``min(max(x, lo), hi)``.

    ``ceil(low)`` and ``floor(high)`` (the integers inside the bounds), each saturated to
    ``dtype``'s range (an infinite bound is that range's end). When they cross (``min >
    max``, or two bounds with no integer between them) both are ``hi``: every value becomes
    the max, as ONNX's ``Clip`` and ``np.clip`` say. With ``lo <= hi`` the order in which a
    backend applies the two clamps no longer matters.
    """
    info = np.iinfo(dtype)
    bottom, top = int(info.min), int(info.max)

    def saturated(bound: float, rounding: Callable[[float], int]) -> int:
        if math.isnan(bound):
            raise NumericsError("a Clip bound is NaN")
        if math.isinf(bound):
            return top if bound > 0 else bottom
        return min(max(rounding(bound), bottom), top)

    lo, hi = saturated(low, math.ceil), saturated(high, math.floor)
    return min(lo, hi), hi
