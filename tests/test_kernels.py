"""The transformer kernels (intq.semantics.kernels): error bounds against the float functions, per
variant, and bit-exact agreement of the ONNX Runtime lowering with the reference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
from hypothesis import given
from hypothesis import strategies as st

import intq
from intq.errors import NumericsError
from intq.ir import DType, Graph, QuantParams, TensorType
from intq.semantics import kernels

OPS = kernels.NumpyOps()

# Max |error| of a probability (output unit 2^-8 = 0.0039), per variant: the rounding
# to 8 bits plus the exponent's error (linear remainder 6%, quadratic 0.3%).
SOFTMAX_ERROR = {"divfree": 0.006, "poly": 0.006, "lut": 0.006, "shift": 0.03}
# Max |error| of GELU beyond the output rounding (half a unit), in absolute terms: the
# sigmoid form x * sigmoid(1.702 x) is itself 0.020 off erf-GELU, I-BERT's erf polynomial
# 0.018; the table is exactly rounded. Plus the 14-bit fixed point of the sigmoid / erf
# factor: |x| 2^-13 at most. Measured over input ranges 0.5-20: 0.0203 / 0.0232 / 0.0181 / 0.
GELU_ERROR = {"divfree": 0.021, "shift": 0.024, "poly": 0.019, "lut": 1e-9}


def _rows(seed: int, rows: int, size: int, spread: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, spread, (rows, size)) + rng.normal(0, spread, (rows, 1))


@given(
    seed=st.integers(0, 2**16),
    size=st.integers(1, 64),
    spread=st.floats(0.1, 8),
    bits=st.sampled_from([8, 16, 24]),
    variant=st.sampled_from(kernels.SOFTMAX_VARIANTS),
)
def test_softmax_error_monotonicity_and_row_sums(seed, size, spread, bits, variant):
    if variant == "lut":
        bits = 8
    x = _rows(seed, 4, size, spread)
    scale = max(np.abs(x).max(), 1e-3) / (2 ** (bits - 1) - 1)
    q = np.round(x / scale).astype(np.int64)
    out = kernels.softmax(OPS, q, None, scale, variant, -1, size)
    assert out.min() >= 0 and out.max() <= 255
    want = scipy.special.softmax(q * scale, axis=-1)
    assert np.abs(out / 256 - want).max() <= SOFTMAX_ERROR[variant]
    # Monotone along each row: a larger input never gets a smaller probability.
    order = np.argsort(q, axis=-1, kind="stable")
    assert (np.diff(np.take_along_axis(out, order, -1), axis=-1) >= 0).all()
    # Rows sum to 1 within half a unit per element (each is rounded once), plus saturation.
    assert (np.abs(out.sum(-1) - 256) <= size / 2 + 1).all()


def test_softmax_keep_mask_drops_positions_and_keeps_full_rows():
    x = np.array([[1000, 0, -1000, 5], [3, 3, 3, 3]], np.int64)
    keep = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], np.int64)
    out = kernels.softmax(OPS, x, keep, 0.01, "divfree", -1, 4)
    assert out[0, 2] == 0 and out[0, 3] == 0
    np.testing.assert_allclose(out[0, :2] / 256, scipy.special.softmax([10, 0]), atol=0.006)
    assert (out[1] == 64).all()  # nothing kept: the whole row, as float with -1e4 gives


@given(
    seed=st.integers(0, 2**16),
    in_range=st.floats(0.5, 20),
    variant=st.sampled_from(kernels.GELU_VARIANTS),
)
def test_gelu_error_within_stated_bound(seed, in_range, variant):
    bits = 8 if variant == "lut" else 16
    in_scale = in_range / (2 ** (bits - 1) - 1)
    q = np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), 1 if bits == 8 else 37, dtype=np.int64)
    real = kernels._gelu_float(q * in_scale)
    out_scale = max(np.abs(real).max(), 1e-3) / 127
    out = kernels.gelu(OPS, q, in_scale, bits, out_scale, -128, 127, variant)
    assert out.min() >= -128 and out.max() <= 127
    slack = 0 if variant == "lut" else in_range * 2.0**-13
    assert (np.abs(out * out_scale - real) - out_scale / 2).max() <= GELU_ERROR[variant] + slack


@given(
    seed=st.integers(0, 2**16),
    size=st.sampled_from([1, 2, 16, 384, 768, 1024]),
    offset=st.floats(-100, 100),
    spread=st.floats(1e-3, 50),
    variant=st.sampled_from(kernels.LAYERNORM_VARIANTS),
)
def test_layernorm_within_one_unit_of_float(seed, size, offset, spread, variant):
    rng = np.random.default_rng(seed)
    x = rng.normal(offset, spread, (3, size))
    in_scale = np.abs(x).max() / 32767
    q = np.round(x / in_scale).astype(np.int64)
    gamma, beta = rng.normal(1, 0.5, size), rng.normal(0, 0.5, size)
    xr = q * in_scale
    var = xr.var(-1, keepdims=True)
    want = (xr - xr.mean(-1, keepdims=True)) / np.sqrt(var + 1e-12) * gamma + beta
    out_scale = max(np.abs(want).max(), 1e-3) / 127
    c = kernels.layernorm_constants(gamma, beta, 1e-12, in_scale, out_scale)
    out = kernels.layernorm(
        OPS, q, size, c["eps"], c["multiplier"], c["shift"], c["bias"], -128, 127, variant
    )
    # A row with (numerically) zero variance has no defined normalisation: skip its check.
    defined = (var[:, 0] * size / in_scale**2) > 1
    assert np.abs(out - want / out_scale)[defined].max(initial=0) <= 1.0


def test_extreme_inputs_stay_inside_int64():
    """Full-range 16-bit inputs, the widest rows and the finest admitted scales: NumpyOps
    checks every intermediate and raises on an int64 overflow."""
    x = np.full((2, 768), 32767, np.int64)
    x[1, ::2] = -32768
    c = kernels.layernorm_constants(np.full(768, 50.0), np.zeros(768), 1e-5, 1e-6, 1e-3)
    for variant in kernels.LAYERNORM_VARIANTS:
        kernels.layernorm(
            OPS, x, 768, c["eps"], c["multiplier"], c["shift"], c["bias"], -128, 127, variant
        )
    scores = np.array([[2**31 - 1, -(2**31), 0] * 100], np.int64)
    for variant in ("divfree", "shift", "poly"):
        kernels.softmax(OPS, scores, None, 1e-7, variant, -1, 300)
    wide = np.array([-32768, 32767, 0, 1, -1], np.int64)
    for variant in ("divfree", "shift", "poly"):
        kernels.gelu(OPS, wide, 1e-5, 16, 1e-3, -128, 127, variant)


def test_long_rows_of_8_bit_inputs_stay_inside_int64_and_one_unit_of_float():
    """A GroupNorm's row (C/G channels times every position) of 8-bit inputs, up to the
    longest admitted, full range; one affine entry stands for the whole row."""
    size = kernels.layernorm_max_size(8)
    assert size == 41285 and kernels.layernorm_max_size(16) == 1024
    x = np.full((2, size), 127, np.int64)
    x[1, ::2] = -128
    rng = np.random.default_rng(0)
    x = np.concatenate([x, rng.integers(-128, 128, (2, size))])
    in_scale, out_scale = 0.01, 4.0 / 127
    c = kernels.layernorm_constants([1.0], [0.0], 1e-5, in_scale, out_scale, size)
    xr = x * in_scale
    want = (xr - xr.mean(-1, keepdims=True)) / np.sqrt(xr.var(-1, keepdims=True) + 1e-5)
    for variant in kernels.LAYERNORM_VARIANTS:
        out = kernels.layernorm(
            OPS, x, size, c["eps"], c["multiplier"], c["shift"], c["bias"], -128, 127, variant, 8
        )
        assert np.abs(out - want / out_scale).max() <= 1.0


def test_limits_are_refused():
    with pytest.raises(NumericsError, match="1024"):
        kernels.check_layernorm_size(2048)
    with pytest.raises(NumericsError, match="8-bit inputs supports up to 41285"):
        kernels.check_layernorm_size(41286, 8)
    with pytest.raises(NumericsError, match="2\\^14"):
        kernels.check_softmax_size(1 << 15)
    with pytest.raises(NumericsError, match="too fine"):
        kernels.check_exp_range(1e-12, "softmax")


# ----- the ONNX Runtime lowering agrees bit for bit ---------------------------------------


def _single_op(op: str, dtype: DType, shape, in_scale: float, **attrs):
    g = Graph()
    quant = QuantParams(dtype.bits, True, (in_scale,))
    x = g.add_input("x", TensorType(dtype, tuple(shape), quant))
    g.set_outputs([g.op(op, x, **attrs)])
    return g


def _bit_exact(graph: Graph, x: np.ndarray) -> None:
    want = intq.compile(graph, target="reference").run({"x": x})
    got = intq.compile(graph, target="onnxruntime").run({"x": x})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


@given(
    seed=st.integers(0, 2**16),
    variant=st.sampled_from(kernels.SOFTMAX_VARIANTS),
    size=st.integers(1, 40),
)
def test_qsoftmax_lowering_is_bit_exact(seed, variant, size):
    rng = np.random.default_rng(seed)
    dtype = DType.I8 if variant == "lut" else DType.I32
    info = np.iinfo(dtype.numpy)
    scale = 0.05 if variant == "lut" else float(rng.uniform(1e-5, 1e-2))
    g = _single_op("QSoftmax", dtype, (3, size), scale, variant=variant, scale=scale)
    low, high = (info.min, info.max) if rng.random() < 0.3 else (-2000, 2000)
    _bit_exact(g, rng.integers(low, high, (3, size), endpoint=True).astype(dtype.numpy))


@given(seed=st.integers(0, 2**16), variant=st.sampled_from(kernels.GELU_VARIANTS))
def test_qgelu_lowering_is_bit_exact(seed, variant):
    rng = np.random.default_rng(seed)
    dtype = DType.I8 if variant == "lut" else DType.I16
    scale = float(rng.uniform(1e-4, 0.1))
    attrs = dict(variant=variant, bits=8, signed=1, scale=float(rng.uniform(0.01, 0.1)))
    g = _single_op("QGelu", dtype, (64,), scale, lo=-128, hi=127, **attrs)
    info = np.iinfo(dtype.numpy)
    _bit_exact(g, rng.integers(info.min, info.max, 64, endpoint=True).astype(dtype.numpy))


@given(
    seed=st.integers(0, 2**16),
    variant=st.sampled_from(kernels.LAYERNORM_VARIANTS),
    size=st.sampled_from([1, 3, 64, 384]),
)
def test_qlayernorm_lowering_is_bit_exact(seed, variant, size):
    rng = np.random.default_rng(seed)
    in_scale = float(rng.uniform(1e-4, 0.01))
    c = kernels.layernorm_constants(
        rng.normal(1, 1, size), rng.normal(0, 1, size), 1e-12, in_scale, 0.05
    )
    g = _single_op(
        "QLayerNorm",
        DType.I16,
        (2, size),
        in_scale,
        variant=variant,
        bits=8,
        signed=1,
        scale=0.05,
        lo=-128,
        hi=127,
        **c,
    )
    x = rng.integers(-32768, 32767, (2, size), endpoint=True).astype(np.int16)
    x[1] = x[1, :1]  # a constant row: zero variance
    _bit_exact(g, x)


# ----- and so does the TVM lowering (the same kernels emitted as Relax ops) -----------------

CASES = [("QSoftmax", v) for v in kernels.SOFTMAX_VARIANTS]
CASES += [("QGelu", v) for v in kernels.GELU_VARIANTS]
CASES += [("QLayerNorm", v) for v in kernels.LAYERNORM_VARIANTS]


@pytest.mark.parametrize(("op", "variant"), CASES)
def test_kernels_on_tvm_are_bit_exact(op, variant):
    if "tvm" not in intq.backends.TARGETS:
        pytest.skip("TVM is not installed")
    rng = np.random.default_rng(len(op) + len(variant))
    if op == "QSoftmax":
        dtype = DType.I8 if variant == "lut" else DType.I32
        scale = 0.05 if variant == "lut" else 1e-4
        graph = _single_op(op, dtype, (4, 24), scale, variant=variant, scale=scale)
        shape = (4, 24)
    elif op == "QGelu":
        dtype = DType.I8 if variant == "lut" else DType.I16
        attrs = dict(variant=variant, bits=8, signed=1, scale=0.03, lo=-128, hi=127)
        graph, shape = _single_op(op, dtype, (256,), 2e-3, **attrs), (256,)
    else:
        dtype, shape = DType.I16, (3, 96)
        c = kernels.layernorm_constants(
            rng.normal(1, 1, 96), rng.normal(0, 1, 96), 1e-12, 1e-3, 0.05
        )
        attrs = dict(variant=variant, bits=8, signed=1, scale=0.05, lo=-128, hi=127, **c)
        graph = _single_op(op, dtype, shape, 1e-3, **attrs)
    info = np.iinfo(dtype.numpy)
    x = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype.numpy)
    if op == "QLayerNorm":
        x[2] = x[2, :1]  # a constant row
    want = intq.compile(graph, target="reference").run({"x": x})
    got = intq.compile(graph, target="tvm").run({"x": x})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


# ----- the L2 norm and the quotient (no run-time division) ---------------------------------------


@given(
    seed=st.integers(0, 2**16),
    bits=st.integers(2, 16),
    size=st.sampled_from([1, 2, 7, 64, 1000]),
    log_ratio=st.floats(-6, 1),
    sparse=st.booleans(),
)
def test_l2_norm_within_half_a_unit_of_the_exact_norm(seed, bits, size, log_ratio, sparse):
    """``l2_norm`` against ``sqrt(sum(x^2)) M 2^-S`` in float64: within ``1/2 + 2^-26 n``
    output units (the rounding and the square root's relative error), 0 for a zero row."""
    rng = np.random.default_rng(seed)
    top = 1 << (bits - 1)
    x = rng.integers(-top, top, (4, size), endpoint=False)
    if sparse:  # mostly zeros, a zero row, a single full-range element
        x = np.where(rng.random(x.shape) < 0.9, 0, x)
        x[0] = 0
        x[1, 0] = -top
    step = intq.semantics.numerics.dyadic(10.0**log_ratio)
    got = kernels.l2_norm(OPS, x.astype(np.int64), [1], step.multiplier, step.shift, 0, 1 << 40)
    exact = np.sqrt((x.astype(np.float64) ** 2).sum(1, keepdims=True))
    exact = exact * step.multiplier / 2.0**step.shift
    assert got.shape == (4, 1)
    assert (np.abs(got - exact) <= 0.5 + 2.0**-26 * exact + 1e-9).all()
    assert (got[exact == 0] == 0).all()


def test_l2_norm_of_full_range_16_bit_rows_stays_inside_int64():
    """Over two axes of 16-bit extremes (``sum(x^2)`` near 2^46): NumpyOps checks every
    intermediate; the result is the exact norm rounded."""
    x = np.full((2, 3, 40, 40), -32768, np.int64)
    x[1] = 32767
    step = intq.semantics.numerics.dyadic(1 / 64)
    got = kernels.l2_norm(OPS, x, [2, 3], step.multiplier, step.shift, 0, 65535)
    exact = np.sqrt((x.astype(np.float64) ** 2).sum((2, 3), keepdims=True)) / 64
    np.testing.assert_array_equal(got, np.floor(exact + 0.5))


@given(
    seed=st.integers(0, 2**16),
    a_bits=st.integers(2, 16),
    b_bits=st.integers(1, 16),
    log_ratio=st.floats(-8, 6),
)
def test_divide_within_half_a_unit_of_the_exact_quotient(seed, a_bits, b_bits, log_ratio):
    """``divide`` against ``a M / (max(b, 1) 2^S)`` in float64: within ``1/2 + 2^-27 |q|``
    output units (the rounding and the reciprocal's relative error); a divisor of 0 counts as
    one step."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-(1 << (a_bits - 1)), 1 << (a_bits - 1), (5, 6), endpoint=True)
    b = rng.integers(0, 1 << b_bits, (5, 1))
    b[0] = 0
    step = intq.semantics.numerics.dyadic(10.0**log_ratio)
    lo, hi = -(1 << 40), 1 << 40
    got = kernels.divide(OPS, a, b, step.multiplier, step.shift, lo, hi)
    exact = a / np.maximum(b, 1) * step.multiplier / 2.0**step.shift
    assert got.shape == a.shape
    assert (np.abs(got - exact) <= 0.5 + 2.0**-27 * np.abs(exact) + 1e-9).all()


@given(seed=st.integers(0, 2**16), size=st.sampled_from([1, 5, 300]))
def test_qreduce_l2_and_qdiv_lowerings_are_bit_exact(seed, size):
    """The ONNX Runtime lowering of both kernels equals the reference on random and
    extreme 16-bit inputs (``x / ||x||`` of a row)."""
    rng = np.random.default_rng(seed)
    g = Graph()
    x = g.add_input("x", TensorType(DType.I16, (3, size), QuantParams(16, True, (1e-3,))))
    norm_scale = 1e-3 * np.sqrt(size) * 32768 / 65535
    ratio = intq.semantics.numerics.dyadic(1e-3 / norm_scale)
    out = dict(bits=16, signed=0, scale=norm_scale, lo=0, hi=65535)
    norm = g.op("QReduceL2", x, axes=(1,), multiplier=ratio.multiplier, shift=ratio.shift, **out)
    q = intq.semantics.numerics.dyadic(1e-3 / (norm_scale * 2**-15))
    out = dict(bits=16, signed=1, scale=2**-15, lo=-32768, hi=32767)
    g.set_outputs([g.op("QDiv", x, norm, multiplier=q.multiplier, shift=q.shift, **out), norm])
    data = rng.integers(-32768, 32767, (3, size), endpoint=True).astype(np.int16)
    data[1] = 0
    data[2, 0] = -32768
    _bit_exact(g, data)
