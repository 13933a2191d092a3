"""Bias correction: the mean output shift of weight rounding, removed from integer biases."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from onnx_models import bit_exact, conv_node, f32, make_model

import intq
from intq.ir import DType, Graph, TensorType
from intq.passes.bias_correction import MEAN_INPUTS, InputMeans, corrected_bias
from intq.passes.range_analysis import analyze_ranges
from intq.semantics.numpy_eval import evaluate, run_graph


@pytest.mark.parametrize(
    ("group", "stride", "dilation", "pads"),
    [(1, 1, 1, (1, 1, 1, 1)), (2, 2, 1, (0, 1, 2, 0)), (4, 1, 2, (2, 2, 2, 2))],
)
def test_conv_mean_input_gives_the_mean_output_of_any_weight(group, stride, dilation, pads):
    """sum(dW * E[x]) per output channel is the mean of conv(x, dW) over batch and positions:
    padding, strides, dilation and groups included."""
    rng = np.random.default_rng(0)
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (2, 4, 7, 6)))
    w = g.add_constant(rng.normal(size=(8, 4 // group, 3, 3)).astype(np.float32), "w")
    attrs = {"group": group, "strides": (stride,) * 2, "dilations": (dilation,) * 2, "pads": pads}
    conv = g.add("Conv", [x, w], attrs, name="conv")
    g.set_outputs([conv.output])
    data = (rng.normal(size=(2, 4, 7, 6)) + 1.5).astype(np.float32)
    sums, count = MEAN_INPUTS["Conv"](conv, data)
    mean = sums / count
    assert mean.shape == w.const.shape
    got = np.sum(w.const.astype(np.float64) * mean, axis=(1, 2, 3))
    want = evaluate(conv, [data.astype(np.float64), w.const.astype(np.float64)])[0]
    # The interpreter returns the declared float32: its rounding is the tolerance.
    np.testing.assert_allclose(got, want.mean(axis=(0, 2, 3), dtype=np.float64), rtol=1e-5)


@pytest.mark.parametrize("op", ["Gemm", "GemmT", "MatMul"])
def test_dense_mean_input_gives_the_mean_output(op):
    rng = np.random.default_rng(1)
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (5, 3)))
    shape = (4, 3) if op == "GemmT" else (3, 4)
    w = g.add_constant(rng.normal(size=shape).astype(np.float32), "w")
    attrs = {"transB": int(op == "GemmT")} if op != "MatMul" else {}
    node = g.add(op[:4] if op != "MatMul" else op, [x, w], attrs, name="dense")
    data = rng.normal(size=(5, 3)) + 2.0
    sums, count = MEAN_INPUTS[node.op](node, data)
    axis = 0 if op == "GemmT" else 1
    bias = corrected_bias(None, np.zeros(shape), w.const, axis, sums / count)
    weight = w.const.T if op == "GemmT" else w.const
    np.testing.assert_allclose(-bias, (data @ weight).mean(axis=0), rtol=1e-6)


def two_convs() -> tuple:
    rng = np.random.default_rng(2)
    c1, w1 = conv_node("c1", "x", 3, 8, rng)
    c2, w2 = conv_node("c2", "r", 8, 4, rng)
    relu = helper.make_node("Relu", ["c1"], ["r"])
    model = make_model([c1, relu, c2], [f32("x", (1, 3, 6, 6))], [f32("c2", (1, 4, 6, 6))])
    model.graph.initializer.extend([*w1, *w2])
    batches = [{"x": (rng.normal(size=(1, 3, 6, 6)) + 1.0).astype(np.float32)} for _ in range(12)]
    return model, batches


def test_bias_correction_removes_the_mean_output_error_and_stays_bit_exact():
    model, batches = two_convs()
    graph = intq.from_onnx(model)

    def mean_error(correct: bool) -> float:
        config = intq.QuantConfig(
            weight_bits=4,
            calibration="minmax",
            bias_correction=correct,
            rounding="nearest",  # learned rounding leaves little mean shift to remove
            progress=False,
        )
        quantized = intq.quantize(graph, batches, config)
        diffs = [
            run_graph(quantized, b)["c2"].astype(np.float64) - run_graph(graph, b)["c2"]
            for b in batches
        ]
        per_channel = np.mean(diffs, axis=(0, 1, 3, 4))
        if correct:
            analyze_ranges(quantized)  # the corrected biases keep the overflow proof
            bit_exact(quantized, [b["x"] for b in batches[:2]])
        return float(np.linalg.norm(per_channel))

    assert mean_error(True) < 0.5 * mean_error(False)


def test_calibrate_keeps_mean_inputs_only_when_asked():
    model, batches = two_convs()
    graph = intq.from_onnx(model)
    calibrate = intq.passes.Calibrate(batches, False, corrects=lambda name: True)
    intq.passes.PassManager([calibrate])(graph)
    means = graph.analysis(InputMeans)
    assert means is not None and sorted(v.name for v in means) == ["c1", "c2"]
    plain = intq.from_onnx(model)
    intq.passes.PassManager([intq.passes.Calibrate(batches, False)])(plain)
    assert plain.analysis(InputMeans) is None


def test_auto_corrects_the_layers_under_8_bits_only():
    """The default ``auto``: the 4-bit layer's bias is corrected as with ``True``, the 8-bit
    layer's is left as with ``False``; calibration keeps the means of the 4-bit layer only."""
    model, batches = two_convs()
    graph = intq.from_onnx(model)

    def biases(correct: bool | str) -> dict[str, np.ndarray]:
        config = intq.QuantConfig(
            layer_bits={"Conv_0": intq.LayerBits(4, 8)},
            calibration="minmax",
            bias_correction=correct,
            rounding="nearest",
            progress=False,
        )
        quantized = intq.quantize(graph, batches, config)
        return {n.label(): n.inputs[2].const for n in quantized if n.op == "QConv"}

    auto, every, none = biases("auto"), biases(True), biases(False)
    np.testing.assert_array_equal(auto["Conv_0"], every["Conv_0"])
    assert not np.array_equal(auto["Conv_0"], none["Conv_0"])
    np.testing.assert_array_equal(auto["Conv_2"], none["Conv_2"])
    assert not np.array_equal(every["Conv_2"], none["Conv_2"])
    assert intq.QuantConfig().bias_correction == "auto"
    calibrate = intq.passes.Calibrate(batches, False, corrects=lambda name: name == "Conv_0")
    intq.passes.PassManager([calibrate])(graph)
    means = graph.analysis(InputMeans)
    assert means is not None and [v.name for v in means] == ["c1"]


def test_unknown_bias_correction_is_refused():
    with pytest.raises(intq.IntqError, match="unknown bias correction 'yes'"):
        intq.QuantConfig(bias_correction="yes")
