"""Property tests of the integer arithmetic: dyadic multipliers, requantization, alignment."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import intq
from intq.ir import DType, Graph, QuantParams, TensorType, verify
from intq.semantics.numerics import common_shift, dyadic, requantize, round_half_up, shift_round

INT32 = st.integers(-(2**31), 2**31 - 1)
SCALES = st.floats(2.0**-40, 2.0**10, allow_nan=False, allow_infinity=False)


def exact_round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


@settings(max_examples=300, deadline=None)
@given(SCALES)
def test_dyadic_relative_error_below_2_pow_minus_30(real):
    d = dyadic(real)
    assert 2**30 <= d.multiplier < 2**31
    error = abs(Fraction(d.multiplier, 1) * Fraction(2) ** -d.shift - Fraction(real))
    assert error < Fraction(real) * Fraction(2) ** -30


@settings(max_examples=300, deadline=None)
@given(INT32, st.integers(1, 2**31 - 1), st.integers(-20, 90))
def test_requantize_is_round_half_up_when_the_multiplier_is_exact(acc, multiplier, shift):
    # The real multiplier M * 2^-S is itself dyadic, so the result must be exact.
    real = Fraction(multiplier) * Fraction(2) ** -shift
    want = exact_round_half_up(acc * real)
    if shift <= 0 and abs(want) >= 2**62:
        return  # out of the range the range analysis allows for S <= 0
    got = int(requantize(np.array([acc]), multiplier, shift, -(2**63), 2**63 - 1)[0])
    assert got == want


@settings(max_examples=300, deadline=None)
@given(INT32, SCALES)
def test_requantize_is_within_one_lsb_for_any_real(acc, real):
    # The multiplier's relative error is below 2^-31, so for results below 2^24 (any 8- or
    # 16-bit output, with room to spare) it moves the product by far less than one LSB.
    d = dyadic(real)
    exact = exact_round_half_up(acc * Fraction(real))
    if abs(exact) >= 2**24:
        return
    got = int(requantize(np.array([acc]), d.multiplier, d.shift, -(2**63), 2**63 - 1)[0])
    assert abs(got - exact) <= 1


@settings(max_examples=200, deadline=None)
@given(st.integers(-128, 127), st.integers(-128, 127), SCALES, SCALES)
def test_residual_alignment_with_one_rounding(a, b, ra, rb):
    (ma, mb), shift = common_shift(ra, rb)
    assert 0 <= ma < 2**31 and 0 <= mb < 2**31
    got = int(shift_round(np.array([a * ma + b * mb]), shift)[0])
    exact = exact_round_half_up(a * Fraction(ra) + b * Fraction(rb))
    assert abs(got - exact) <= 1


def test_requantize_clamps_and_rounds_ties_up():
    acc = np.array([-3, -1, 1, 3, 1000, -1000])
    # multiplier 1/2: -1.5 -> -1, -0.5 -> 0, 0.5 -> 1, 1.5 -> 2 (half toward +infinity)
    got = requantize(acc, 1 << 30, 31, -128, 127)
    assert got.tolist() == [-1, 0, 1, 2, 127, -128]
    assert round_half_up(np.array([-1.5, -0.5, 0.5])).tolist() == [-1.0, 0.0, 1.0]


def test_dyadic_refuses_non_positive():
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(intq.NumericsError):
            dyadic(bad)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 255), min_size=16, max_size=16),
    st.floats(2.0**-10, 1.0),
    st.floats(2.0**-10, 1.0),
)
def test_global_average_pool_is_the_rounded_mean(values, s_in, s_out):
    g = Graph()
    x = g.add_input("x", TensorType(DType.U8, (1, 1, 4, 4), QuantParams(8, False, (s_in,))))
    acc = g.op("QGlobalAveragePool", x)
    assert acc.type.quant.scale == (s_in / 16,)
    d = dyadic(s_in / 16 / s_out)
    y = g.op(
        "Requantize",
        acc,
        multiplier=(d.multiplier,),
        shift=(d.shift,),
        bits=8,
        signed=0,
        scale=s_out,
        lo=0,
        hi=255,
    )
    g.set_outputs([y])
    verify(g)
    data = np.array(values, np.uint8).reshape(1, 1, 4, 4)
    got = int(intq.compile(g).run({"x": data})[y.name].item())
    exact = min(
        255, exact_round_half_up(Fraction(sum(values), 16) * Fraction(s_in) / Fraction(s_out))
    )
    assert abs(got - exact) <= 1


def test_requantize_rule_refuses_a_wrong_multiplier():
    g = Graph()
    x = g.add_input("x", TensorType(DType.I32, (4,), QuantParams(32, True, (0.5,))))
    with pytest.raises(intq.ShapeError, match="does not match the scale ratio"):
        g.op(
            "Requantize",
            x,
            name="rq",
            multiplier=(1 << 30,),
            shift=(30,),
            bits=8,
            signed=1,
            scale=1.0,
            lo=-128,
            hi=127,
        )
