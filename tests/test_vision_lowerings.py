"""The integer lowerings of the ops detection, segmentation and face models bring: Resize
(nearest and linear), ConvTranspose, PRelu (and LeakyRelu), Min and Max.

For each op: a Hypothesis property against the float op with the error bound the lowering
states (docs/numerics.md), and a small model run on the reference, ONNX Runtime and TVM,
which must agree bit for bit, its integer graph holding the expected integer ops and every
computed integer inside its proven interval.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from onnx_models import bit_exact, conv_node, f32, make_model, op_names, quantized

import intq
from intq.ops.float_ops import NEAREST_MODES, RESIZE_COORDINATES
from intq.passes.integer_only import census
from intq.passes.range_analysis import analyze_ranges
from intq.semantics.numpy_eval import EVAL, run_graph


def _within_proven_ranges(graph, feed: dict[str, np.ndarray]) -> None:
    """Every integer the reference computes on ``feed`` lies in its proven interval."""
    ranges = analyze_ranges(graph)
    seen: dict[str, np.ndarray] = {}

    def record(node, outputs):
        for value, array in zip(node.outputs, outputs):
            if value in ranges:
                seen[value.name] = array
                low, high = ranges[value]
                assert low <= int(array.min()) and int(array.max()) <= high, node.label()

    run_graph(graph, feed, on_node=record)
    assert seen


def _float(model) -> intq.ir.Graph:
    return intq.from_onnx(model)


def _checked(model, graph, feeds, output: str, tolerance: float) -> None:
    """``graph`` (``model`` quantized) stays within its proven ranges, is bit-exact on every
    backend and within ``tolerance`` of the output's largest magnitude of the float model."""
    _within_proven_ranges(graph, {"x": feeds[2]})
    got = bit_exact(graph, feeds)[output]
    want = intq.compile(_float(model)).run({"x": feeds[0]})[output]
    np.testing.assert_allclose(got, want, atol=tolerance * float(np.abs(want).max()))


def _resize_graph(shape, sizes, mode, transform, nearest_mode) -> intq.ir.Graph:
    attrs = f'coordinate_transformation_mode="{transform}", mode="{mode}"'
    if mode == "nearest":
        attrs += f', nearest_mode="{nearest_mode}"'
    dims = ",".join(map(str, shape))
    out = ",".join(map(str, sizes))
    sizes_text = ", ".join(map(str, sizes))
    return intq.ir.from_text(
        f"graph main(%x: f32[{dims}]) {{\n"
        f"  %y = Resize(%x) {{{attrs}, sizes=[{sizes_text}]}} : f32[{out}]\n"
        "  return %y\n}"
    )


def _input_grid(graph, x: np.ndarray) -> tuple[np.ndarray, float]:
    """``x`` as the integer graph's input ``Quantize`` sees it (dequantized again), and its
    scale."""
    (q,) = [node for node in graph if node.op == "Quantize"]
    quant = q.output.type.quant
    scale = np.float32(q.attrs["scale"])
    codes = np.rint(x.astype(np.float32) / scale).clip(quant.qmin, quant.qmax)
    return (codes * scale).astype(np.float32), float(scale)


# ----- Resize nearest -----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    out_h=st.integers(1, 13),
    out_w=st.integers(1, 13),
    transform=st.sampled_from(RESIZE_COORDINATES),
    nearest_mode=st.sampled_from(NEAREST_MODES),
    seed=st.integers(0, 2**16),
)
def test_nearest_resize_moves_the_quantized_input(
    h, w, out_h, out_w, transform, nearest_mode, seed
):
    """A nearest Resize is data movement: the integer model's output is the float Resize of
    the quantized input, exactly, so within half an input step of the float model on data
    inside the calibrated range."""
    graph = _resize_graph((1, 2, h, w), (1, 2, out_h, out_w), "nearest", transform, nearest_mode)
    x = np.random.default_rng(seed).standard_normal((1, 2, h, w)).astype(np.float32)
    lowered = intq.quantize(graph, [{"x": x}], intq.QuantConfig(calibration="minmax"))
    assert "Resize" not in op_names(lowered)
    on_grid, scale = _input_grid(lowered, x)
    got = intq.compile(lowered).run({"x": x})["y"]
    reference = intq.compile(graph)
    np.testing.assert_array_equal(got, reference.run({"x": on_grid})["y"])
    want = reference.run({"x": x})["y"]
    assert np.abs(got - want).max() <= scale / 2 * (1 + 1e-5)


def test_nearest_upsampling_is_bit_exact_on_every_backend():
    """conv -> ReLU -> 2x nearest upsampling (Resize-13 by scales, asymmetric floor, as YOLO
    and FPN export it) -> conv: one Gather per resized axis, unsigned codes moved as they
    are; the same integers on every backend."""
    rng = np.random.default_rng(11)
    c1, w1 = conv_node("c1", "x", 2, 3, rng)
    c2, w2 = conv_node("c2", "up", 3, 2, rng)
    scales = numpy_helper.from_array(np.asarray([1, 1, 2, 2], np.float32), "scales")
    nodes = [
        c1,
        helper.make_node("Relu", ["c1"], ["r"]),
        helper.make_node(
            "Resize",
            ["r", "", "scales"],
            ["up"],
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        ),
        c2,
    ]
    shape = (1, 2, 3, 5)
    model = make_model(nodes, [f32("x", shape)], [f32("c2", (1, 2, 6, 10))], [*w1, *w2, scales])
    graph, feeds = quantized(model, shape)
    gathers = [node for node in graph if node.op == "Gather"]
    assert [g.attrs["axis"] for g in gathers] == [2, 3]
    assert gathers[-1].output.type.dtype is intq.ir.DType.U8
    _checked(model, graph, feeds, "c2", 0.03)


# ----- Resize linear ------------------------------------------------------------------------------


def test_linear_resize_is_one_qresize_of_fixed_point_taps():
    """A 2x bilinear upsampling (half_pixel) of an 8-bit input: two axes, so ``F = (31 - 8)
    // 2 = 11``; per axis the float semantics' positions (clamped at the ends, where both
    taps are one input and weigh 1/2) and weights ``frac * 2^11``; the accumulator's scale is
    ``s_x * 2^-22``."""
    graph = _resize_graph((1, 1, 2, 2), (1, 1, 4, 4), "linear", "half_pixel", "floor")
    x = np.asarray([[[[0.0, 1.0], [2.0, -3.0]]]], np.float32)
    lowered = intq.quantize(graph, [{"x": x}], intq.QuantConfig(calibration="minmax"))
    assert op_names(lowered) == ["Quantize", "QResize", "Dequantize"]
    (node,) = [n for n in lowered if n.op == "QResize"]
    a = node.attrs
    assert a["axes"] == (2, 3) and a["frac_bits"] == 11 and a["sizes"] == (1, 1, 4, 4)
    assert a["low"] == (0, 0, 0, 1) * 2 and a["high"] == (1, 1, 1, 1) * 2
    assert a["weight"] == (0, 512, 1536, 1024) * 2
    s_x = node.inputs[0].type.quant.scale[0]
    assert node.output.type.quant.scale == (s_x * 2.0**-22,)
    assert node.output.type.dtype is intq.ir.DType.I32
    text = intq.ir.to_text(lowered)
    assert intq.ir.to_text(intq.ir.from_text(text)) == text


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    out_h=st.integers(1, 13),
    out_w=st.integers(1, 13),
    transform=st.sampled_from(RESIZE_COORDINATES),
    bits=st.sampled_from([8, 16]),
    seed=st.integers(0, 2**16),
)
def test_linear_resize_is_within_its_fixed_point_bound(h, w, out_h, out_w, transform, bits, seed):
    """``QResize`` is the float linear Resize with each weight rounded to ``F`` fractional
    bits. Each axis' pair of weights still sums to 1, so its error is
    ``|w - w_F| |x_high - x_low| <= 2^-(F+1) (max - min)``, and the next axis' convex
    combination does not grow it: on every input code, within
    ``axes (max - min) s_x 2^-(F+1)`` of the float Resize of the dequantized codes (float32
    weights: a relative ``2^-23`` on top). Through its one ``Requantize`` (with a ReLU's
    clamp) the model is within that plus half an output step of the float model on the
    quantized input, clamped to the output's range."""
    graph = _resize_graph((2, 2, h, w), (2, 2, out_h, out_w), "linear", transform, "floor")
    (y,) = graph.outputs
    relu = graph.op("Relu", y, name="act")
    graph.set_outputs([relu])
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 2, h, w)).astype(np.float32)
    config = intq.QuantConfig(calibration="minmax", activation_bits=bits)
    lowered = intq.quantize(graph, [{"x": x}], config)
    nodes = [n for n in lowered if n.op == "QResize"]
    if not nodes:  # nothing resized: the input moves as it is
        assert (h, w) == (out_h, out_w) and "Resize" not in op_names(lowered)
        return
    (node,) = nodes
    axes, frac_bits = len(node.attrs["axes"]), node.attrs["frac_bits"]
    quant = node.inputs[0].type.quant
    assert frac_bits == (31 - quant.bits) // axes
    assert "Relu" not in op_names(lowered)  # in the Requantize's clamp

    codes = rng.integers(quant.qmin, quant.qmax + 1, (2, 2, h, w))
    (acc,) = EVAL["QResize"](node, codes.astype(node.inputs[0].type.dtype.numpy))
    assert acc.dtype == np.int32
    float_resize = next(n for n in graph if n.op == "Resize")
    real = codes * quant.scale[0]
    (want,) = EVAL["Resize"](float_resize, real)  # float64 data, the float32 positions
    spread = float(real.max() - real.min())
    bound = axes * spread * 2.0 ** -(frac_bits + 1) + axes * 2.0**-23 * float(np.abs(real).max())
    error = np.abs(acc * node.output.type.quant.scale[0] - want)
    assert error.max() <= bound * (1 + 1e-9) + 1e-12

    on_grid, _ = _input_grid(lowered, x)
    got = intq.compile(lowered).run({"x": x})[relu.name]
    exact = intq.compile(graph).run({"x": on_grid})[relu.name].astype(np.float64)
    (requantize,) = [n for n in lowered if n.op == "Requantize"]
    # The clamp to the calibrated range (of the float data, which the quantized input may
    # pass by half a step) moves both results alike: clamping never grows a difference.
    r = requantize.attrs
    exact = exact.clip(r["lo"] * r["scale"], r["hi"] * r["scale"])
    spread = float(on_grid.max() - on_grid.min())
    bound = (
        axes * spread * 2.0 ** -(frac_bits + 1)
        + requantize.attrs["scale"] / 2
        + axes * 2.0**-23 * float(np.abs(on_grid).max())
    )
    assert np.abs(got - exact).max() <= bound * (1 + 1e-6) + 1e-7


@pytest.mark.parametrize("align_corners", [False, True])
def test_bilinear_resizes_are_bit_exact_on_every_backend(align_corners):
    """conv -> ReLU -> 2x bilinear upsampling (by scales, as ``F.interpolate(...,
    scale_factor=2, mode="bilinear", align_corners=...)`` exports it) -> conv -> a linear
    Resize to an arbitrary smaller size (by sizes) -> conv: each Resize one ``QResize``,
    requantized once (the first unsigned: a mean of non-negative codes), the same integers
    on every backend."""
    rng = np.random.default_rng(15)
    transform = "align_corners" if align_corners else "pytorch_half_pixel"
    c1, w1 = conv_node("c1", "x", 2, 3, rng)
    c2, w2 = conv_node("c2", "up", 3, 3, rng)
    c3, w3 = conv_node("c3", "down", 3, 2, rng)
    scales = numpy_helper.from_array(np.asarray([1, 1, 2, 2], np.float32), "scales")
    sizes = numpy_helper.from_array(np.asarray([2, 3, 5, 7], np.int64), "sizes")
    nodes = [
        c1,
        helper.make_node("Relu", ["c1"], ["r"]),
        helper.make_node(
            "Resize",
            ["r", "", "scales"],
            ["up"],
            mode="linear",
            coordinate_transformation_mode=transform,
        ),
        c2,
        helper.make_node(
            "Resize",
            ["c2", "", "", "sizes"],
            ["down"],
            mode="linear",
            coordinate_transformation_mode="align_corners" if align_corners else "half_pixel",
        ),
        c3,
    ]
    shape = (2, 2, 3, 5)
    model = make_model(
        nodes, [f32("x", shape)], [f32("c3", (2, 2, 5, 7))], [*w1, *w2, *w3, scales, sizes]
    )
    graph, feeds = quantized(model, shape)
    layers = [node for node in graph if node.op == "QResize"]
    assert [n.attrs["axes"] for n in layers] == [(2, 3), (2, 3)]
    assert "Resize" not in op_names(graph)
    first = layers[0].output.consumers()
    assert [n.op for n in first] == ["Requantize"]
    assert first[0].output.type.dtype is intq.ir.DType.U8
    # Four 8-bit roundings deep (each Resize's own error is below 2^-11 of its range).
    _checked(model, graph, feeds, "c3", 0.05)


# ----- ConvTranspose ------------------------------------------------------------------------------


def _scatter(x, w, b, strides, pads, dilations, output_padding, group) -> np.ndarray:
    """A 2-D transposed convolution by loops, in float64, written from its definition: input
    ``(i, j)`` adds ``x * w[tap]`` at output ``(i, j) * stride + tap * dilation - pad``."""
    n, c, h, wd = x.shape
    per_group, kh, kw = w.shape[1:]
    cg = c // group
    full = [
        (size - 1) * s + d * (k - 1) + 1 + p
        for size, s, d, k, p in zip((h, wd), strides, dilations, (kh, kw), output_padding)
    ]
    y = np.zeros((n, group * per_group, *full))
    for ch in range(c):
        g = ch // cg
        for m in range(per_group):
            for ty in range(kh):
                for tx in range(kw):
                    for i in range(h):
                        for j in range(wd):
                            oy = i * strides[0] + ty * dilations[0]
                            ox = j * strides[1] + tx * dilations[1]
                            y[:, g * per_group + m, oy, ox] += x[:, ch, i, j] * w[ch, m, ty, tx]
    y = y[:, :, pads[0] : full[0] - pads[2], pads[1] : full[1] - pads[3]]
    return y + (0 if b is None else b.reshape(1, -1, 1, 1))


_DECONV = st.fixed_dictionaries(
    {
        "group": st.sampled_from([1, 2]),
        "per_group": st.integers(1, 3),
        "k": st.integers(1, 4),
        "stride": st.integers(1, 3),
        "dilation": st.integers(1, 2),
        "pad": st.integers(0, 3),
        "output_padding": st.integers(0, 2),
        "bias": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


def _deconv_graph(p, h=3, w=4) -> tuple[intq.ir.Graph, np.ndarray] | None:
    """A float ConvTranspose graph for the drawn parameters ``p`` and its input, or None when
    they leave no output or an output_padding not below the stride."""
    group, k, s, d, pad, op = (
        p[key] for key in ("group", "k", "stride", "dilation", "pad", "output_padding")
    )
    out_h, out_w = ((size - 1) * s + d * (k - 1) + 1 + op - 2 * pad for size in (h, w))
    if op >= s or out_h < 1 or out_w < 1:
        return None
    rng = np.random.default_rng(p["seed"])
    c, m = 2 * group, p["per_group"] * group
    g = intq.ir.Graph()
    x = g.add_input("x", intq.ir.TensorType(intq.ir.DType.F32, (2, c, h, w)))
    weights = g.add_constant(rng.standard_normal((c, p["per_group"], k, k)).astype(np.float32), "w")
    inputs = [x, weights]
    if p["bias"]:
        inputs.append(g.add_constant(rng.standard_normal(m).astype(np.float32), "b"))
    y = g.op(
        "ConvTranspose",
        *inputs,
        group=group,
        strides=(s, s),
        dilations=(d, d),
        pads=(pad,) * 4,
        output_padding=(op, op),
        name="deconv",
    )
    g.set_outputs([y])
    return g, rng.standard_normal((2, c, h, w)).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(p=_DECONV)
def test_integer_conv_transpose_is_the_exact_sum_and_within_its_bound(p):
    """``QConvTranspose`` is the exact int32 transposed convolution of the codes (checked
    against loops over its definition); dequantized straight from the accumulator, the
    integer model is off the float one only by the operands' rounding: per output
    ``sum(|w| s_x / 2 + |x| s_w / 2 + s_x s_w / 4) + s_x s_w / 2`` (bias) over the products
    it sums, here bounded over all of an output channel's weights."""
    built = _deconv_graph(p)
    if built is None:
        return
    graph, x = built
    lowered = intq.quantize(graph, [{"x": x}], intq.QuantConfig(calibration="minmax"))
    (layer,) = [node for node in lowered if node.op == "QConvTranspose"]
    codes_value, w_q = layer.inputs[0], layer.inputs[1]
    bias = layer.inputs[2] if len(layer.inputs) > 2 else None
    codes = np.random.default_rng(p["seed"]).integers(-128, 128, codes_value.type.shape)
    (acc,) = intq.semantics.numpy_eval.evaluate(
        layer, [codes.astype(np.int8), w_q.const, None if bias is None else bias.const]
    )
    a = layer.attrs
    want = _scatter(
        codes,
        w_q.const.astype(np.float64),
        None if bias is None else bias.const,
        a["strides"],
        a["pads"],
        a["dilations"],
        a["output_padding"],
        a["group"],
    )
    np.testing.assert_array_equal(acc, want)
    assert acc.dtype == np.int32

    name = graph.outputs[0].name
    got = intq.compile(lowered).run({"x": x})[name]
    exact = intq.compile(graph).run({"x": x})[name].astype(np.float64)
    s_x = codes_value.type.quant.scale[0]
    s_w = np.asarray(w_q.type.quant.scale)
    s_w = np.broadcast_to(s_w, (w_q.type.shape[1],))
    w = graph.find("w").const.astype(np.float64)
    cg = w.shape[0] // p["group"]
    bounds = []
    for m in range(w.shape[1] * p["group"]):
        g, j = divmod(m, w.shape[1])
        taps = np.abs(w[g * cg : (g + 1) * cg, j])
        sw = s_w[j]
        bounds.append(
            taps.sum() * s_x / 2
            + taps.size * (np.abs(x).max() * sw / 2 + s_x * sw / 4)
            + s_x * sw / 2
        )
    bound = np.asarray(bounds).reshape(1, -1, 1, 1) * (1 + 1e-6) + 1e-6
    assert (np.abs(got - exact) <= bound).all()


def test_upsampling_decoder_with_transposed_convs_is_bit_exact_on_every_backend():
    """A segmentation decoder: conv -> ReLU -> ConvTranspose (stride 2, output_padding 1) ->
    ReLU -> grouped ConvTranspose (dilation 2, pads beyond its reach, so the ONNX Runtime
    lowering crops) -> conv: each transposed conv one ``QConvTranspose`` whose accumulator
    is requantized once, the ReLU in its clamp."""
    rng = np.random.default_rng(12)
    c1, w1 = conv_node("c1", "x", 2, 4, rng)
    d1 = numpy_helper.from_array(
        (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "d1.w"
    )
    b1 = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32) * 0.1, "d1.b")
    d2 = numpy_helper.from_array(
        (rng.standard_normal((4, 2, 2, 2)) * 0.3).astype(np.float32), "d2.w"
    )
    c2, w2 = conv_node("c2", "up2", 4, 2, rng)
    nodes = [
        c1,
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node(
            "ConvTranspose",
            ["r1", "d1.w", "d1.b"],
            ["up1"],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            output_padding=[1, 1],
        ),
        helper.make_node("Relu", ["up1"], ["r2"]),
        helper.make_node("Pad", ["r2", "pads"], ["r2p"]),
        helper.make_node(
            "ConvTranspose", ["r2p", "d2.w"], ["up2"], group=2, dilations=[2, 2], pads=[3, 2, 2, 3]
        ),
        c2,
    ]
    pads = numpy_helper.from_array(np.asarray([0, 0, 0, 0, 0, 1, 0, 0], np.int64), "pads")
    shape = (1, 2, 3, 4)
    model = make_model(
        nodes, [f32("x", shape)], [f32("c2", (1, 2, 7, 8))], [*w1, d1, b1, d2, *w2, pads]
    )
    graph, feeds = quantized(model, shape)
    layers = [node for node in graph if node.op == "QConvTranspose"]
    assert len(layers) == 2
    assert "Relu" not in op_names(graph)
    _checked(model, graph, feeds, "c2", 0.03)


# ----- PRelu and LeakyRelu ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    channels=st.integers(1, 4),
    slopes=st.lists(st.floats(-1.5, 3.0), min_size=4, max_size=4),
    log_scale=st.floats(-2, 1.5),
    bits=st.sampled_from([8, 16]),
    seed=st.integers(0, 2**16),
)
def test_qprelu_rounds_the_float_prelu_once(channels, slopes, log_scale, bits, seed):
    """For every input code ``q`` of channel ``c``: ``|y s_out - prelu(q s_x)| <= s_out / 2 +
    |q| s_out 2^-S`` wherever the clamp does not bind: one rounding of the float PRelu of the
    dequantized input, the shared shift's multiplier error on top."""
    slope = np.asarray(slopes[:channels], np.float32).reshape(channels, 1, 1)
    g = intq.ir.Graph()
    x = g.add_input("x", intq.ir.TensorType(intq.ir.DType.F32, (2, channels, 3, 3)))
    g.set_outputs([g.op("PRelu", x, g.add_constant(slope, "slope"), name="act")])
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal((2, channels, 3, 3)) * 10.0**log_scale).astype(np.float32)
    lowered = intq.quantize(g, [{"x": data}], intq.QuantConfig(activation_bits=bits))
    (node,) = [n for n in lowered if n.op == "QPRelu"]
    quant = node.inputs[0].type.quant
    codes = rng.integers(quant.qmin, quant.qmax + 1, (64, channels, 1, 1))
    codes[0], codes[1], codes[2] = quant.qmin, quant.qmax, 0
    # The node's kernel on more codes than its input's shape holds (it broadcasts per channel).
    (got,) = EVAL["QPRelu"](node, codes.astype(node.inputs[0].type.dtype.numpy))
    real = codes * quant.scale[0]
    real = np.where(real < 0, real * slope.astype(np.float64), real)
    s_out, lo, hi = node.attrs["scale"], node.attrs["lo"], node.attrs["hi"]
    free = (real / s_out >= lo) & (real / s_out <= hi)
    error = np.abs(got * s_out - real)[free]
    bound = s_out / 2 + np.abs(codes).astype(np.float64) * s_out * 2.0 ** -node.attrs["shift"]
    assert (error <= np.broadcast_to(bound, got.shape)[free] * (1 + 1e-9)).all()
    assert (got >= lo).all() and (got <= hi).all()


def test_prelu_and_leaky_relu_are_bit_exact_on_every_backend():
    """A face-model block: conv -> PRelu (a slope per channel, one negative, one zero) ->
    conv -> LeakyRelu (one slope): each a ``QPRelu``, the same integers on every backend."""
    rng = np.random.default_rng(13)
    c1, w1 = conv_node("c1", "x", 2, 4, rng)
    c2, w2 = conv_node("c2", "p", 4, 3, rng)
    slope = numpy_helper.from_array(
        np.asarray([0.25, -0.5, 0.0, 1.5], np.float32).reshape(4, 1, 1), "slope"
    )
    nodes = [
        c1,
        helper.make_node("PRelu", ["c1", "slope"], ["p"]),
        c2,
        helper.make_node("LeakyRelu", ["c2"], ["y"], alpha=0.1),
    ]
    shape = (2, 2, 4, 5)
    model = make_model(nodes, [f32("x", shape)], [f32("y", (2, 3, 4, 5))], [*w1, *w2, slope])
    graph, feeds = quantized(model, shape)
    layers = [node for node in graph if node.op == "QPRelu"]
    assert [len(n.attrs["slope"]) for n in layers] == [4, 1]
    assert layers[0].attrs["multiplier_neg"][1] < 0 and layers[0].attrs["multiplier_neg"][2] == 0
    _checked(model, graph, feeds, "y", 0.03)


# ----- Min and Max --------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    op=st.sampled_from(["Min", "Max"]),
    spread=st.tuples(st.floats(-1.5, 1.5), st.floats(-1.5, 1.5)),
    constant=st.sampled_from([None, "scalar", "tensor"]),
    seed=st.integers(0, 2**16),
)
def test_min_max_are_within_half_an_input_step_and_half_an_output_step(op, spread, constant, seed):
    """Both operands rescaled to the output's scale (rounding is monotone, so the extreme of
    the rounded operands is the rounded extreme): off the float op by at most
    ``max(s_a, s_b) / 2 + s_out / 2`` with min-max calibration; a scalar constant is a clamp
    of the other operand, in its own scale (``s_a / 2`` and the constant's rounding)."""
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((2, 3, 4)) * 10.0 ** spread[0]).astype(np.float32)
    b = (rng.standard_normal((2, 3, 4)) * 10.0 ** spread[1]).astype(np.float32)
    g = intq.ir.Graph()
    x = g.add_input("a", intq.ir.TensorType(intq.ir.DType.F32, a.shape))
    feeds = {"a": a}
    if constant == "scalar":
        other = g.add_constant(np.float32(b[0, 0, 0]), "c")
    elif constant == "tensor":
        other = g.add_constant(b[0, :, :1], "c")  # [3, 1], broadcast
    else:
        other = g.add_input("b", intq.ir.TensorType(intq.ir.DType.F32, b.shape))
        feeds["b"] = b
    g.set_outputs([g.op(op, x, other, name="m")])
    lowered = intq.quantize(g, [feeds], intq.QuantConfig(calibration="minmax"))
    ops = op_names(lowered)
    assert op in ops or (constant == "scalar" and "Clip" in ops)
    name = g.outputs[0].name
    got = intq.compile(lowered).run(feeds)[name]
    want = intq.compile(g).run(feeds)[name]
    s_in = max(n.attrs["scale"] for n in lowered if n.op == "Quantize")
    (s_out,) = [n.inputs[0].type.quant.scale[0] for n in lowered if n.op == "Dequantize"]
    # A Clip in the input's units: its rounding and the bound's. Else the operands' rounding
    # and the rescale's (a constant rounds once, to the output's step).
    bound = s_in if "Clip" in ops else s_in / 2 + s_out / 2
    assert np.abs(got - want).max() <= bound * (1 + 1e-5) + 1e-7


def test_min_max_of_activations_and_constants_are_bit_exact_on_every_backend():
    """``Max`` of two convolutions (both accumulators rescaled straight to the output's
    scale), ``Min`` with a per-channel constant, ``Max(x, 0)`` as an integer clamp and
    ``Min(conv, 0.5)`` fused into the conv's requantization (as a ReLU6's top is exported)."""
    rng = np.random.default_rng(14)
    c1, w1 = conv_node("c1", "x", 2, 3, rng)
    c2, w2 = conv_node("c2", "x", 2, 3, rng)
    c3, w3 = conv_node("c3", "r", 3, 2, rng)
    cap = numpy_helper.from_array(np.asarray([0.5, 1.0, 2.0], np.float32).reshape(3, 1, 1), "cap")
    zero = numpy_helper.from_array(np.asarray(0.0, np.float32), "zero")
    top = numpy_helper.from_array(np.asarray(0.5, np.float32), "top")
    nodes = [
        c1,
        c2,
        helper.make_node("Max", ["c1", "c2"], ["m"]),
        helper.make_node("Min", ["m", "cap"], ["n"]),
        helper.make_node("Max", ["n", "zero"], ["r"]),
        c3,
        helper.make_node("Min", ["c3", "top"], ["y"]),
    ]
    shape = (2, 2, 4, 5)
    model = make_model(
        nodes, [f32("x", shape)], [f32("y", (2, 2, 4, 5))], [*w1, *w2, *w3, cap, zero, top]
    )
    graph, feeds = quantized(model, shape)
    ops = op_names(graph)
    assert ops.count("Max") == 1 and ops.count("Min") == 1 and ops.count("Clip") == 1
    (out,) = [n for n in graph if n.op == "Dequantize"]
    last = out.inputs[0].producer
    assert last.op == "Requantize" and last.inputs[0].producer.op == "QConv"
    assert last.attrs["hi"] == round(0.5 / last.attrs["scale"])  # the cap, in the clamp
    _checked(model, graph, feeds, "y", 0.05)


# ----- L2 norms and quotients of activations ------------------------------------------------------


def test_normalize_by_the_l2_norm_is_bit_exact_on_every_backend():
    """``F.normalize(x, dim=-1)`` as exported (``x / Expand(Clip(ReduceL2(x), eps))``,
    SwiftFormer's attention): one ``QReduceL2`` (division-free square root) and one ``QDiv``
    (division-free reciprocal), no float op and no run-time division."""
    rng = np.random.default_rng(5)
    conv, weights = conv_node("c", "x", 2, 3, rng)
    eps = numpy_helper.from_array(np.asarray(1e-12, np.float32), "eps")
    shape = numpy_helper.from_array(np.asarray([2, 3, 4, 6], np.int64), "shape")
    nodes = [
        conv,
        helper.make_node("ReduceL2", ["c"], ["n"], axes=[-1], keepdims=1),
        helper.make_node("Clip", ["n", "eps"], ["clipped"]),
        helper.make_node("Expand", ["clipped", "shape"], ["wide"]),
        helper.make_node("Div", ["c", "wide"], ["y"]),
    ]
    model = make_model(
        nodes, [f32("x", (2, 2, 4, 6))], [f32("y", (2, 3, 4, 6))], [*weights, eps, shape]
    )
    graph, feeds = quantized(model, (2, 2, 4, 6))
    names = op_names(graph)
    assert "QReduceL2" in names and "QDiv" in names
    assert census(graph).divisions == 0 and not census(graph).violations
    _checked(model, graph, feeds, "y", 0.03)


def test_global_response_norm_is_bit_exact_on_every_backend():
    """ConvNeXt V2's GRN, ``x * Gx / (mean_c(Gx) + eps)`` with ``Gx`` the L2 norm over H, W
    (then ``gamma * . + beta + x``): ``QReduceL2`` over two axes, ``QReduceSum``, ``QDiv`` of
    the norm by its mean, a ``QMul``."""
    rng = np.random.default_rng(6)
    conv, weights = conv_node("c", "x", 2, 4, rng)
    eps = numpy_helper.from_array(np.asarray(1e-6, np.float32), "eps")
    nodes = [
        conv,
        helper.make_node("ReduceL2", ["c"], ["g"], axes=[2, 3], keepdims=1),
        helper.make_node("ReduceMean", ["g"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Add", ["m", "eps"], ["d"]),
        helper.make_node("Div", ["g", "d"], ["n"]),
        helper.make_node("Mul", ["c", "n"], ["y"]),
    ]
    model = make_model(nodes, [f32("x", (2, 2, 5, 5))], [f32("y", (2, 4, 5, 5))], [*weights, eps])
    graph, feeds = quantized(model, (2, 2, 5, 5))
    assert {"QReduceL2", "QDiv", "QMul"} <= set(op_names(graph))
    _checked(model, graph, feeds, "y", 0.05)


# ----- Col2Im (nn.Fold) -----------------------------------------------------------------------


def _fold_model(channels, image, block, **attrs):
    """``x`` -> Conv -> Col2Im of its channels read as blocks over ``image``."""
    rng = np.random.default_rng(5)
    size = int(np.prod(block))
    strides = attrs.get("strides", [1, 1])
    pads = attrs.get("pads", [0, 0, 0, 0])
    dilations = attrs.get("dilations", [1, 1])
    counts = [
        (image[i] + pads[i] + pads[i + 2] - dilations[i] * (block[i] - 1) - 1) // strides[i] + 1
        for i in range(2)
    ]
    conv, weights = conv_node("c", "x", 2, channels * size, rng)
    shape_in = (1, 2, 1, counts[0] * counts[1])
    conv.attribute[0].ints[:] = [1, 1, 1, 1]  # 3x3, padding 1: a [1, L] map keeps its length
    consts = [
        numpy_helper.from_array(np.asarray([1, channels * size, -1], np.int64), "flat"),
        numpy_helper.from_array(np.asarray(image, np.int64), "image"),
        numpy_helper.from_array(np.asarray(block, np.int64), "block"),
    ]
    nodes = [
        conv,
        helper.make_node("Reshape", ["c", "flat"], ["cols"]),
        helper.make_node("Col2Im", ["cols", "image", "block"], ["y"], **attrs),
    ]
    model = make_model(
        nodes, [f32("x", shape_in)], [f32("y", (1, channels, *image))], weights + consts, opset=18
    )
    return model, shape_in


@pytest.mark.parametrize(
    ("image", "block", "attrs"),
    [
        ((4, 6), (2, 2), {"strides": [2, 2]}),  # patches that tile the image: a transpose
        ((5, 5), (3, 3), {}),  # every position, overlapping
        ((7, 6), (3, 2), {"strides": [2, 2], "pads": [1, 0, 1, 1], "dilations": [1, 2]}),
    ],
)
def test_col2im_is_bit_exact_on_every_backend(image, block, attrs):
    """A Conv's channels folded as blocks (its float semantics: tests/test_onnx_ops.py)."""
    model, shape = _fold_model(3, image, block, **attrs)
    graph, feeds = quantized(model, shape)
    names = op_names(graph)
    tiles = attrs.get("strides") == list(block) and "pads" not in attrs
    assert ("QConvTranspose" in names) != tiles, names
    _checked(model, graph, feeds, "y", 0.05)
