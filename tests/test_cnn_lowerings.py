"""The integer lowerings of the CNN ops users bring most: ReduceMean/ReduceSum as an int32
sum, elementwise functions as exactly rounded tables, products of two activations.

Each small model is imported, quantized and run on the reference, ONNX Runtime and TVM,
which must agree bit for bit; the integer graph must hold the expected integer op.
"""

# ruff: noqa: E501  (IR text: one node per line)

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
from hypothesis import example, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from onnx_models import bit_exact, conv_node, f32, make_model, op_names, quantized

import intq
from intq.backends import TARGETS
from intq.ops import Trait, ops_with
from intq.passes.range_analysis import analyze_ranges
from intq.semantics.numpy_eval import evaluate

# ----- ReduceMean / ReduceSum ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "axes", "keepdims"),
    [("ReduceMean", (2, 3), 0), ("ReduceMean", (2, 3), 1), ("ReduceSum", (1,), 0)],
)
def test_reduce_is_an_int32_sum_on_every_backend(op, axes, keepdims):
    """``x.mean((2, 3))`` (PyTorch's classifier pooling) and a channel sum: one ``QReduceSum``,
    the mean's ``1/N`` in the requantization; close to the float result."""
    rng = np.random.default_rng(1)
    conv, weights = conv_node("c", "x", 2, 3, rng)
    axes_const = numpy_helper.from_array(np.asarray(axes, np.int64), "axes")
    relu = helper.make_node("Relu", ["c"], ["r"])
    reduce = helper.make_node(op, ["r", "axes"], ["y"], keepdims=keepdims)
    shape = (1, 2, 5, 4)
    full = [1 if i in axes else d for i, d in enumerate((1, 3, 5, 4))]
    out = full if keepdims else [d for i, d in enumerate((1, 3, 5, 4)) if i not in axes]
    model = make_model(
        [conv, relu, reduce],
        [f32("x", shape)],
        [f32("y", out)],
        [*weights, axes_const],
        opset=18,
    )
    graph, feeds = quantized(model, shape)
    assert "QReduceSum" in op_names(graph)
    got = bit_exact(graph, feeds[:1])["y"]
    want = intq.compile(intq.from_onnx(model), target="reference").run({"x": feeds[0]})["y"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=0.05 * float(np.abs(want).max()) + 1e-3)


def test_reduce_sum_refuses_an_int32_overflow():
    """The range analysis bounds ``N * x``: 2^17 positions of 16-bit values cannot fit int32."""
    text = """
    graph main(%x: i16[1,1,512,256] q(bits=16, signed, scale=0.5)) {
      %s = QReduceSum(%x) {axes=[2, 3], keepdims=1, mean=1} : i32[1,1,1,1] q(bits=32, signed, scale=3.814697265625e-06) @"pool"
      return %s
    }
    """
    graph = intq.ir.from_text(text)
    with pytest.raises(intq.NumericsError, match="sum of 131072 values") as err:
        analyze_ranges(graph)
    assert "pool" in str(err.value)


# ----- AveragePool with padding -------------------------------------------------------------


def _avgpool_model(shape, out, **attrs):
    """``x -> AveragePool(x)``, the attributes as given."""
    pool = helper.make_node("AveragePool", ["x"], ["y"], **attrs)
    return make_model([pool], [f32("x", shape)], [f32("y", out)])


@pytest.mark.parametrize(
    ("attrs", "out"),
    [
        ({"pads": [1, 1, 1, 1], "count_include_pad": 0}, (2, 3, 6, 5)),  # PoolFormer's mixer
        ({"pads": [1, 1, 1, 1], "count_include_pad": 1}, (2, 3, 6, 5)),
        ({"pads": [0, 1, 1, 0], "strides": [2, 2], "ceil_mode": 1}, (2, 3, 3, 3)),
    ],
)
def test_a_padded_average_pool_is_bit_exact_on_every_backend(attrs, out):
    """A zero ``Pad`` and window sums; where the divisor varies by position (the borders of
    ``count_include_pad=0``, ceil_mode's partial windows) one ``QDivCount`` whose count is a
    compile-time constant per position: the multiplier ``s_x / (c s_out)`` of each count, no
    run-time division."""
    shape = (2, 3, 6, 5)
    model = _avgpool_model(shape, out, kernel_shape=[3, 3], **attrs)
    graph, feeds = quantized(model, shape)
    names = op_names(graph)
    assert "Pad" in names and "QAveragePool" in names
    varying = attrs.get("count_include_pad", 0) == 0 or attrs.get("ceil_mode", 0)
    assert ("QDivCount" in names) == bool(varying)
    got = bit_exact(graph, feeds)["y"]
    want = intq.compile(intq.from_onnx(model), target="reference").run({"x": feeds[0]})["y"]
    np.testing.assert_allclose(got, want, atol=0.02 * float(np.abs(want).max()))


@settings(max_examples=40, deadline=None)
@given(
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    strides=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    pads=st.tuples(*(st.integers(0, 3) for _ in range(4))),
    include=st.integers(0, 1),
    ceil=st.integers(0, 1),
    bits=st.integers(4, 8),
    seed=st.integers(0, 2**16),
)
@example(kernel=(1, 1), strides=(1, 1), pads=(0, 0, 0, 0), include=0, ceil=0, bits=4, seed=47)
def test_a_padded_average_pool_is_within_half_a_step_of_the_float_pool(
    kernel, strides, pads, include, ceil, bits, seed
):
    """Against the float pool of the float input, the integer pool errs by at most the
    input's rounding (a mean of errors of at most ``s_x / 2``) plus the output's
    half step (and the multipliers' ``2^-30`` relative error), at every position: the
    divisor of each, whatever its count, is exact."""
    pads = tuple(min(p, k - 1) for p, k in zip(pads, kernel * 2))  # ONNX: pads below kernel
    shape = (1, 2, 7, 6)
    sizes = [
        (d + pads[i] + pads[i + 2] - k + (s - 1 if ceil else 0)) // s + 1
        for i, (d, k, s) in enumerate(zip(shape[2:], kernel, strides))
    ]
    for i, d in enumerate(shape[2:]):  # ceil_mode: the last window must start inside
        if ceil and (sizes[i] - 1) * strides[i] >= d + pads[i]:
            sizes[i] -= 1
    attrs = {"kernel_shape": list(kernel), "strides": list(strides), "pads": list(pads)}
    attrs.update(count_include_pad=include, ceil_mode=ceil)
    model = _avgpool_model(shape, (1, 2, *sizes), **attrs)
    data = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    # min/max: the bound is the rounding's; a clipping rule (auto's choice) may cut the peak.
    config = intq.QuantConfig(activation_bits=bits, calibration="minmax")
    graph = intq.quantize(intq.from_onnx(model), [{"x": data}], config)
    got = intq.compile(graph, target="reference").run({"x": data})["y"].astype(np.float64)
    want = intq.compile(intq.from_onnx(model), target="reference").run({"x": data})["y"]
    (quantize,) = [node for node in graph if node.op == "Quantize"]
    steps = [node.attrs["scale"] for node in graph if node.op in ("QDivCount", "Requantize")]
    step_out = steps[0] if steps else 0.0  # a uniform pool is dequantized from its sums
    bound = quantize.attrs["scale"] / 2 + step_out / 2
    err = np.abs(got - want.astype(np.float64))
    assert err.max() <= bound * (1 + 1e-5) + 1e-6 * float(np.abs(want).max()), (err.max(), bound)


# ----- elementwise functions as tables ------------------------------------------------------


def test_hardswish_and_sigmoid_cnn_is_bit_exact_on_every_backend():
    """conv -> HardSwish -> conv -> HardSigmoid, and a Sigmoid output: each function one
    ``QLookup`` of the requantized 8-bit accumulator; the Sigmoid's output is unsigned."""
    rng = np.random.default_rng(2)
    c1, w1 = conv_node("c1", "x", 2, 4, rng)
    c2, w2 = conv_node("c2", "h", 4, 3, rng)
    nodes = [
        c1,
        helper.make_node("HardSwish", ["c1"], ["h"]),
        c2,
        helper.make_node("HardSigmoid", ["c2"], ["g"], alpha=1 / 6),
        helper.make_node("Sigmoid", ["g"], ["y"]),
    ]
    shape = (1, 2, 6, 5)
    model = make_model(nodes, [f32("x", shape)], [f32("y", (1, 3, 6, 5))], [*w1, *w2], opset=14)
    graph, feeds = quantized(model, shape)
    tables = [node for node in graph if node.op == "QLookup"]
    assert len(tables) == 3
    assert tables[-1].output.type.dtype is intq.ir.DType.U8
    got = bit_exact(graph, feeds)["y"]
    want = intq.compile(intq.from_onnx(model), target="reference").run({"x": feeds[0]})["y"]
    np.testing.assert_allclose(got, want, atol=0.03)


_FLOAT64 = {
    "Sigmoid": scipy.special.expit,
    "Tanh": np.tanh,
    "Erf": scipy.special.erf,
    "Exp": np.exp,
    "Neg": np.negative,
    "Abs": np.abs,
    "HardSigmoid": lambda x: np.clip(0.2 * x + 0.5, 0, 1),
    "HardSwish": lambda x: x * np.clip(x * (1 / 6) + 0.5, 0, 1),
    "Softplus": lambda x: np.logaddexp(0.0, x),
    "Mish": lambda x: x * np.tanh(np.logaddexp(0.0, x)),
}
"""Each tabled function in float64, written independently of intq's semantics."""


def test_every_tabled_op_is_checked():
    assert sorted(_FLOAT64) == sorted(ops_with(Trait.ELEMENTWISE))


@settings(max_examples=40, deadline=None)
@given(
    op=st.sampled_from(sorted(_FLOAT64)),
    log_scale=st.floats(-2.5, 1.5),
    non_negative=st.booleans(),
    bits=st.integers(4, 8),
    seed=st.integers(0, 2**16),
)
def test_a_table_is_the_function_exactly_rounded(op, log_scale, non_negative, bits, seed):
    """For every input code ``q``: ``out = clamp(floor(f(q s_in) / s_out + 1/2))``, the
    float function of the dequantized input rounded (half up) to the output grid."""
    graph = intq.ir.from_text(
        f"graph main(%x: f32[256]) {{\n  %y = {op}(%x) : f32[256]\n  return %y\n}}"
    )
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(256) * 10.0**log_scale
    data = np.abs(data) if non_negative else data
    if op == "Exp":  # a float model whose exp overflows float32 (x > 88.7) is refused
        data = np.minimum(data, 80.0)
    data = data.astype(np.float32)
    config = intq.QuantConfig(activation_bits=bits)
    lowered = intq.quantize(graph, [{"x": data}], config)
    (table,) = [node for node in lowered if node.op == "QLookup"]
    x = table.inputs[0]
    first = -128 if x.type.dtype is intq.ir.DType.I8 else 0
    codes = np.arange(first, first + 256).astype(x.type.dtype.numpy)
    (got,) = evaluate(table, [codes])
    with np.errstate(over="ignore"):
        real = _FLOAT64[op](codes.astype(np.float64) * x.type.quant.scale[0])
        want = np.floor(real / table.attrs["scale"] + 0.5)
    want = np.clip(want, table.attrs["lo"], table.attrs["hi"])
    np.testing.assert_array_equal(got.astype(np.int64), want.astype(np.int64))
    assert got.dtype == table.output.type.dtype.numpy


def test_a_16_bit_input_is_refused_naming_the_layer():
    """A transformer's residual stream is 16-bit: no 65536-entry tables."""
    graph = intq.ir.from_text(
        """
        graph main(%x: f32[2,4]) {
          %g = const f32[4] [1.0, 1.0, 1.0, 1.0]
          %t = Tanh(%x) : f32[2,4] @"act"
          %n = LayerNormalization(%x, %g) {axis=-1} : f32[2,4]
          return %t, %n
        }
        """
    )
    data = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    with pytest.raises(intq.UnsupportedOpError, match="only 8-bit inputs are tabled") as err:
        intq.quantize(graph, [{"x": data}])
    assert "act" in str(err.value)
    assert "wide_bits=8" in err.value.hint
    narrow = intq.quantize(graph, [{"x": data}], intq.QuantConfig(wide_bits=8))
    assert "QLookup" in {node.op for node in narrow}


# ----- products of two activations ------------------------------------------------------------


def test_silu_squeeze_excite_and_exported_hardswish_are_bit_exact_on_every_backend():
    """SiLU ``x * sigmoid(x)``, HardSwish as exported ``x * hardsigmoid(x)`` and a
    squeeze-excite gate ``x * sigmoid(fc(mean(x)))`` broadcast over H and W: each product one
    ``QMul`` of two 8-bit activations."""
    rng = np.random.default_rng(3)
    c1, w1 = conv_node("c1", "x", 2, 4, rng)
    c2, w2 = conv_node("c2", "silu", 4, 4, rng)
    fc = numpy_helper.from_array((rng.standard_normal((4, 4, 1, 1)) * 0.5).astype(np.float32), "fc")
    axes = numpy_helper.from_array(np.asarray([2, 3], np.int64), "axes")
    nodes = [
        c1,
        helper.make_node("Sigmoid", ["c1"], ["s"]),
        helper.make_node("Mul", ["c1", "s"], ["silu"]),
        c2,
        helper.make_node("HardSigmoid", ["c2"], ["hs"], alpha=1 / 6),
        helper.make_node("Mul", ["hs", "c2"], ["hswish"]),
        helper.make_node("ReduceMean", ["hswish", "axes"], ["pooled"], keepdims=1),
        helper.make_node("Conv", ["pooled", "fc"], ["squeezed"]),
        helper.make_node("Sigmoid", ["squeezed"], ["gate"]),
        helper.make_node("Mul", ["hswish", "gate"], ["y"]),
    ]
    shape = (2, 2, 5, 6)
    model = make_model(
        nodes, [f32("x", shape)], [f32("y", (2, 4, 5, 6))], [*w1, *w2, fc, axes], opset=18
    )
    graph, feeds = quantized(model, shape)
    products = [node for node in graph if node.op == "QMul"]
    assert len(products) == 3
    assert products[-1].inputs[1].type.shape == (2, 4, 1, 1)
    got = bit_exact(graph, feeds)["y"]
    want = intq.compile(intq.from_onnx(model), target="reference").run({"x": feeds[0]})["y"]
    np.testing.assert_allclose(got, want, atol=0.05 * float(np.abs(want).max()))


def test_a_product_then_relu_is_one_clamped_qmul():
    """A ReLU after a product lives in the QMul's clamp (unsigned output)."""
    graph = intq.ir.from_text(
        """
        graph main(%x: f32[2,3], %g: f32[2,3]) {
          %p = Mul(%x, %g) : f32[2,3]
          %y = Relu(%p) : f32[2,3] @"act"
          return %y
        }
        """
    )
    rng = np.random.default_rng(0)
    batches = [
        {
            "x": rng.standard_normal((2, 3)).astype(np.float32),
            "g": rng.standard_normal((2, 3)).astype(np.float32),
        }
    ]
    lowered = intq.quantize(graph, batches)
    (product,) = [node for node in lowered if node.op == "QMul"]
    assert product.attrs["lo"] == 0 and product.output.type.dtype is intq.ir.DType.U8
    assert "Relu" not in op_names(lowered)
    feed = batches[0]
    want = np.maximum(feed["x"] * feed["g"], 0)
    got = intq.compile(lowered).run(feed)["y"]
    np.testing.assert_allclose(got, want, atol=0.05)
    for target in ("onnxruntime", "tvm"):
        if target in TARGETS:
            np.testing.assert_array_equal(intq.compile(lowered, target=target).run(feed)["y"], got)


def test_a_rescaled_product_beyond_int64_is_refused_naming_the_layer():
    """``|a b| M 2^-S`` for a multiplier of 2^32 (``S = -2``) could reach 2^63."""
    text = """
    graph main(%a: i16[4] q(bits=16, signed, scale=0.5), %b: i16[4] q(bits=16, signed, scale=0.5)) {
      %p = QMul(%a, %b) {bits=8, hi=127, lo=-128, multiplier=1073741824, scale=5.820766091346741e-11, shift=-2, signed=1} : i8[4] q(bits=8, signed, scale=5.820766091346741e-11) @"gate"
      return %p
    }
    """
    graph = intq.ir.from_text(text)
    with pytest.raises(intq.NumericsError, match="the rescaled product") as err:
        analyze_ranges(graph)
    assert "gate" in str(err.value)


# ----- sums and differences of activations ------------------------------------------------------


@pytest.mark.parametrize("op", ["Add", "Sub"])
def test_broadcast_add_and_sub_of_activations_are_bit_exact_on_every_backend(op):
    """``x +- mean(x)`` over H, W (a [N, C, 1, 1] operand broadcast): one ``QAdd``, a
    difference with a negative multiplier."""
    rng = np.random.default_rng(4)
    conv, weights = conv_node("c", "x", 2, 3, rng)
    axes = numpy_helper.from_array(np.asarray([2, 3], np.int64), "axes")
    nodes = [
        conv,
        helper.make_node("ReduceMean", ["c", "axes"], ["m"], keepdims=1),
        helper.make_node(op, ["c", "m"], ["y"]),
    ]
    shape = (2, 2, 4, 5)
    model = make_model(
        nodes, [f32("x", shape)], [f32("y", (2, 3, 4, 5))], [*weights, axes], opset=18
    )
    graph, feeds = quantized(model, shape)
    (add,) = [node for node in graph if node.op == "QAdd"]
    assert (add.attrs["multiplier_b"] < 0) == (op == "Sub")
    got = bit_exact(graph, feeds)["y"]
    want = intq.compile(intq.from_onnx(model), target="reference").run({"x": feeds[0]})["y"]
    np.testing.assert_allclose(got, want, atol=0.03 * float(np.abs(want).max()))


# ----- constant multiplies ------------------------------------------------------------------------


def test_layerscale_folds_into_the_layer_and_a_mask_multiply_is_a_qmul():
    """DINOv2's LayerScale ``gamma * (x W + b)`` (one negative and one zero channel) folds
    into the layer's weight scales: no extra op, exact signs. A constant multiplying a value
    that is no accumulator (after a MaxPool) is a ``QMul`` by the 8-bit constant."""
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bias")
    gamma = numpy_helper.from_array(np.array([0.5, -0.02, 0.0, 1e-3], np.float32), "gamma")
    mask = numpy_helper.from_array(np.array([[[1.0, 0.0, 1.0, 1.0]]], np.float32), "mask")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["lin"]),
        helper.make_node("Mul", ["lin", "gamma"], ["scaled"]),
        helper.make_node("Relu", ["scaled"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[1]),
        helper.make_node("Mul", ["mask", "p"], ["y"]),
    ]
    shape = (2, 3, 6)
    model = make_model(nodes, [f32("x", shape)], [f32("y", (2, 3, 4))], [w, bias, gamma, mask])
    graph, feeds = quantized(model, shape)
    ops = op_names(graph)
    assert ops.count("QMul") == 1 and ops.count("QMatMul") == 1
    (layer,) = [node for node in graph if node.op == "QMatMul"]
    weights = layer.inputs[1]
    assert np.all(weights.const[:, 2] == 0)  # gamma 0: the channel vanishes
    got = bit_exact(graph, feeds)["y"]
    want = intq.compile(intq.from_onnx(model), target="reference").run({"x": feeds[0]})["y"]
    np.testing.assert_allclose(got, want, atol=0.02 * float(np.abs(want).max()) + 1e-6)


def test_a_scaled_accumulator_at_the_graph_output_keeps_its_factor():
    """``(x W) * 0.5`` as the graph's output: the factor lives in a requantization, not lost
    by dequantizing the int32 accumulator with its own scale (it came out doubled)."""
    graph = intq.ir.from_text(
        """
        graph main(%x: f32[2,3]) {
          %half = const f32[] [0.5]
          %w = const f32[3,2] [1.0, 2.0, -1.0, 0.5, 0.25, 1.0]
          %m = MatMul(%x, %w) : f32[2,2]
          %y = Mul(%m, %half) : f32[2,2]
          return %y
        }
        """
    )
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    lowered = intq.quantize(graph, [{"x": x}])
    want = intq.compile(graph).run({"x": x})["y"]
    got = bit_exact(lowered, [x])["y"]
    np.testing.assert_allclose(got, want, atol=0.01 * float(np.abs(want).max()))


# ----- normalizations without a layer to fold into -------------------------------------------


def _bn(name: str, x: str, c: int, rng: np.random.Generator) -> tuple:
    params = [
        rng.uniform(0.5, 2.0, c),
        rng.normal(size=c) * 0.5,
        rng.normal(size=c) * 0.5,
        rng.uniform(0.2, 2.0, c),
    ]
    inits = [
        numpy_helper.from_array(p.astype(np.float32), f"{name}.{k}") for p, k in zip(params, "sbmv")
    ]
    node = helper.make_node("BatchNormalization", [x, *(i.name for i in inits)], [name])
    return node, inits


def test_standalone_batchnorm_is_a_depthwise_qconv_bit_exact_on_every_backend():
    """DenseNet's pre-activation ``BN -> ReLU -> Conv`` after a concatenation, and a
    BatchNorm1d on ``[N, C]``: no layer to fold into, so each is a depthwise QConv."""
    rng = np.random.default_rng(7)
    c1, w1 = conv_node("c1", "x", 3, 4, rng)
    bn1, p1 = _bn("bn1", "cat", 7, rng)
    c2, w2 = conv_node("c2", "r", 7, 4, rng)
    bn2, p2 = _bn("bn2", "flat", 4 * 5 * 5, rng)
    nodes = [
        c1,
        helper.make_node("Concat", ["x", "c1"], ["cat"], axis=1),
        bn1,
        helper.make_node("Relu", ["bn1"], ["r"]),
        c2,
        helper.make_node("Flatten", ["c2"], ["flat"]),
        bn2,
        helper.make_node("Relu", ["bn2"], ["y"]),
    ]
    shape = (2, 3, 5, 5)
    model = make_model(
        nodes, [f32("x", shape)], [f32("y", (2, 100))], [*w1, *p1, *w2, *p2], opset=14
    )
    graph, feeds = quantized(model, shape)
    ops = op_names(graph)
    assert ops.count("QConv") == 4 and "BatchNormalization" not in ops
    depthwise = [n for n in graph if n.op == "QConv" and n.attrs["group"] > 1]
    assert [n.attrs["group"] for n in depthwise] == [7, 100]
    # One 8-bit weight per channel: +-127, the channel's scale |k| / 127.
    assert all(set(np.abs(n.inputs[1].const).reshape(-1)) == {127} for n in depthwise)
    got = bit_exact(graph, feeds)["y"]
    want = intq.compile(intq.from_onnx(model), target="reference").run({"x": feeds[0]})["y"]
    np.testing.assert_allclose(got, want, atol=0.05 * np.ptp(want))


def _groupnorm_model(groups: int) -> tuple:
    """conv -> GroupNorm -> ReLU -> conv, the GroupNorm as torch exports it: Reshape to
    ``[N, G, -1]``, InstanceNormalization with unit scale, Reshape back, Mul, Add."""
    rng = np.random.default_rng(8)
    c1, w1 = conv_node("c1", "x", 3, 8, rng)
    c2, w2 = conv_node("c2", "r", 8, 4, rng)
    consts = [
        numpy_helper.from_array(np.array([2, groups, -1], np.int64), "grouped"),
        numpy_helper.from_array(np.array([2, 8, 6, 6], np.int64), "ungrouped"),
        numpy_helper.from_array(np.ones(groups, np.float32), "ones"),
        numpy_helper.from_array(np.zeros(groups, np.float32), "zeros"),
        numpy_helper.from_array(rng.uniform(-2, 2, (8, 1, 1)).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.normal(size=(8, 1, 1)).astype(np.float32), "beta"),
    ]
    nodes = [
        c1,
        helper.make_node("Reshape", ["c1", "grouped"], ["g"]),
        helper.make_node("InstanceNormalization", ["g", "ones", "zeros"], ["n"], epsilon=1e-5),
        helper.make_node("Reshape", ["n", "ungrouped"], ["u"]),
        helper.make_node("Mul", ["u", "gamma"], ["m"]),
        helper.make_node("Add", ["m", "beta"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        c2,
        helper.make_node("GlobalAveragePool", ["c2"], ["y"]),
    ]
    shape = (2, 3, 6, 6)
    model = make_model(
        nodes, [f32("x", shape)], [f32("y", (2, 4, 1, 1))], [*w1, *w2, *consts], opset=17
    )
    return model, shape


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("wide_bits", [16, 8])
def test_groupnorm_is_a_qlayernorm_and_a_depthwise_qconv(groups, wide_bits):
    """Rows of 288 or 72 values through QLayerNorm (one affine entry for all of them), the
    per-channel affine a depthwise QConv. At ``wide_bits=16`` the QConv reads a 16-bit input,
    which the ONNX Runtime backend does not lower yet: reference and TVM only."""
    model, shape = _groupnorm_model(groups)
    graph, feeds = quantized(model, shape, wide_bits=wide_bits)
    ops = op_names(graph)
    assert ops.count("QLayerNorm") == 1 and ops.count("QConv") == 3
    norm = next(n for n in graph if n.op == "QLayerNorm")
    assert len(norm.attrs["multiplier"]) == 1
    reference = intq.compile(graph, target="reference")
    targets = ["tvm"] if wide_bits == 16 else ["onnxruntime", "tvm"]
    for target in (t for t in targets if t in TARGETS):
        compiled = intq.compile(graph, target=target)
        for feed in feeds:
            want = reference.run({"x": feed})["y"]
            np.testing.assert_array_equal(compiled.run({"x": feed})["y"], want, err_msg=target)
    got = reference.run({"x": feeds[0]})["y"]
    want = intq.compile(intq.from_onnx(model), target="reference").run({"x": feeds[0]})["y"]
    np.testing.assert_allclose(got, want, atol=0.05 * np.ptp(want))


def test_conv1d_model_is_bit_exact_on_every_backend():
    """Conv1d (padding 2, stride 2) -> ReLU -> grouped Conv1d (groups 2, asymmetric padding,
    dilation 2) -> depthwise Conv1d, as SqueezeBERT's and audio models' layers: each a 1-D
    ``QConv`` (on TVM a 2-D one of height 1), the same integers on every backend."""
    rng = np.random.default_rng(21)

    def conv1d(name, x, cin, cout, k, group=1, **attrs):
        w = numpy_helper.from_array(
            (rng.standard_normal((cout, cin // group, k)) * 0.3).astype(np.float32), f"{name}.w"
        )
        b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, f"{name}.b")
        node = helper.make_node("Conv", [x, w.name, b.name], [name], group=group, **attrs)
        return node, [w, b]

    c1, w1 = conv1d("c1", "x", 3, 4, 5, pads=[2, 2], strides=[2])
    c2, w2 = conv1d("c2", "r", 4, 6, 3, group=2, pads=[1, 3], dilations=[2])
    c3, w3 = conv1d("c3", "c2", 6, 6, 3, group=6, pads=[1, 1])
    nodes = [c1, helper.make_node("Relu", ["c1"], ["r"]), c2, c3]
    shape = (2, 3, 16)
    model = make_model(nodes, [f32("x", shape)], [f32("c3", (2, 6, 8))], [*w1, *w2, *w3])
    graph, feeds = quantized(model, shape)
    convs = [node for node in graph if node.op == "QConv"]
    assert [n.inputs[0].type.rank for n in convs] == [3, 3, 3]
    assert [n.attrs["group"] for n in convs] == [1, 2, 6]
    got = bit_exact(graph, feeds)["c3"]
    want = intq.compile(intq.from_onnx(model)).run({"x": feeds[0]})["c3"]
    np.testing.assert_allclose(got, want, atol=0.03 * float(np.abs(want).max()))


@pytest.mark.parametrize(
    "cin, cout, group, kernel, attrs, x_dtype",
    [
        (6, 6, 6, 3, {"pads": [1, 1, 1, 1]}, np.int8),  # depthwise
        (4, 8, 4, 3, {"pads": [0, 1, 2, 1], "strides": [2, 1]}, np.uint8),  # multiplier 2
        (5, 5, 5, 5, {"pads": [2, 2, 2, 2], "strides": [2, 2], "dilations": [1, 2]}, np.int8),
        (6, 10, 1, 1, {}, np.int8),  # pointwise
        (96, 8, 1, 1, {}, np.int16),  # pointwise, beyond float32's exact integers
        (6, 10, 1, 1, {"strides": [2, 2]}, np.int8),
        (6, 4, 2, 3, {"pads": [1, 0, 1, 0]}, np.int8),  # grouped
    ],
)
def test_the_interpreters_integer_convolution_is_the_float64_product(
    cin, cout, group, kernel, attrs, x_dtype
):
    # The reference interpreter convolves integers by the fastest exact route (depthwise tap
    # by tap, pointwise as one product, float32 where every partial sum is below 2^24); the
    # same node on float64 copies of the integers takes the grouped-matmul path in float64.
    from intq.semantics.numpy_eval import _convolve

    rng = np.random.default_rng(cin + cout + kernel)
    shape = (cout, cin // group, kernel, kernel)
    w = numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, **attrs)
    model = make_model([node], [f32("x", [2, cin, 11, 9])], [f32("y", None)], [w])
    (conv,) = [n for n in intq.from_onnx(model).nodes if n.op == "Conv"]
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, int(info.max) + 1, (2, cin, 11, 9)).astype(x_dtype)
    q = rng.integers(-7, 8, shape).astype(np.int8)
    bias = rng.integers(-(2**20), 2**20, cout).astype(np.int32)
    got = _convolve(conv, x, q, bias)
    want = _convolve(conv, x.astype(np.float64), q.astype(np.float64), bias.astype(np.float64))
    assert got.dtype == np.float64 and np.array_equal(got, want)
    assert np.abs(got - bias.reshape(-1, 1, 1)).max() > 2**9  # not trivially small
