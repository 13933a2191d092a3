"""intq.quantize: integer-only CNNs that keep their accuracy, with proofs and clear refusals."""

from __future__ import annotations

import numpy as np
import pytest

import intq
from examples import zoo
from intq.ir import DType, Graph, QuantParams, TensorType, from_text, to_text, verify
from intq.passes.integer_only import census, check_integer_only
from intq.passes.range_analysis import analyze_ranges


@pytest.fixture(scope="module")
def digits_split():
    return zoo._digits_split()


def digits_accuracy(exe, x: np.ndarray, y: np.ndarray, batch: int = 8) -> float:
    n = len(x) // batch * batch
    preds = [exe.run({"input": x[i : i + batch]})["logits"].argmax(1) for i in range(0, n, batch)]
    return float(np.mean(np.concatenate(preds) == y[:n]))


def calibration_batches(x: np.ndarray, count: int = 256, batch: int = 8):
    # A generator: quantize must read the calibration data once, streaming.
    return ({"input": x[i : i + batch]} for i in range(0, count, batch))


def test_digits_cnn_keeps_its_accuracy_in_int8(digits_model, digits_split):
    x_train, x_test, _, y_test = digits_split
    graph = intq.from_onnx(digits_model.path)
    float_acc = digits_accuracy(intq.compile(graph), x_test, y_test)
    quantized = intq.quantize(graph, calibration_batches(x_train))
    int_acc = digits_accuracy(intq.compile(quantized), x_test, y_test)
    assert float_acc > 0.95
    assert int_acc >= float_acc - 0.005, (float_acc, int_acc)
    # INT4 weights with INT8 activations: reported, held to a looser bound.
    int4 = intq.quantize(graph, calibration_batches(x_train), intq.QuantConfig(weight_bits=4))
    int4_acc = digits_accuracy(intq.compile(int4), x_test, y_test)
    print(f"digits: float {float_acc:.4f}, int8 {int_acc:.4f}, int4 weights {int4_acc:.4f}")
    assert int4_acc >= float_acc - 0.05


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_every_calibration_method_gives_an_integer_only_graph(digits_model, digits_split, method):
    graph = intq.from_onnx(digits_model.path)
    config = intq.QuantConfig(calibration=method)
    quantized = intq.quantize(graph, calibration_batches(digits_split[0], 64), config)
    result = check_integer_only(quantized)
    assert result.ops["Quantize"] == 1 and result.ops["Dequantize"] == 1
    assert {"QConv", "QGemm", "Requantize"} <= set(result.ops)
    assert not any(op in result.ops for op in ("Conv", "Gemm", "BatchNormalization", "Relu"))


@pytest.mark.parametrize("fixture", ["resnet18_model", "efficientnet_model"])
def test_real_cnns_become_integer_only_and_agree(fixture, request):
    model = request.getfixturevalue(fixture)
    graph = intq.from_onnx(model.path)
    x = model.inputs["input"]
    rng = np.random.default_rng(0)
    batches = [
        {"input": np.roll(x, tuple(rng.integers(-16, 16, 2)), axis=(2, 3))} for _ in range(3)
    ]
    quantized = intq.quantize(graph, batches, intq.QuantConfig(calibration="percentile"))
    verify(quantized)
    ops = check_integer_only(quantized).ops
    assert ops["Quantize"] == 1 and ops["Dequantize"] == 1
    want = intq.compile(graph).run(model.inputs)["logits"]
    got = intq.compile(quantized).run(model.inputs)["logits"]
    assert got.argmax() == want.argmax()
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99
    # The quantized graph is a graph like any other: it prints and parses back.
    text = to_text(quantized)
    assert to_text(from_text(text)) == text


def test_quantize_leaves_the_float_graph_alone(digits_model, digits_split):
    graph = intq.from_onnx(digits_model.path)
    before = to_text(graph)
    intq.quantize(graph, calibration_batches(digits_split[0], 16))
    assert to_text(graph) == before


def test_residual_block_with_relu_fuses_into_one_qadd():
    rng = np.random.default_rng(0)
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (1, 4, 6, 6)))
    w1 = g.add_constant(rng.normal(size=(4, 4, 3, 3)).astype(np.float32) * 0.2, "w1")
    w2 = g.add_constant(rng.normal(size=(4, 4, 3, 3)).astype(np.float32) * 0.2, "w2")
    a = g.op("Relu", g.op("Conv", x, w1, name="conv1", pads=(1, 1, 1, 1)), name="relu1")
    b = g.op("Conv", a, w2, name="conv2", pads=(1, 1, 1, 1))
    y = g.op("Relu", g.op("Add", b, x, name="add"), name="relu2")
    g.set_outputs([g.op("GlobalAveragePool", y, name="pool")])
    batches = [{"x": rng.normal(size=(1, 4, 6, 6)).astype(np.float32)} for _ in range(8)]
    quantized = intq.quantize(g, batches)
    ops = [n.op for n in quantized]
    assert ops.count("QAdd") == 1 and "Relu" not in ops
    qadd = next(n for n in quantized if n.op == "QAdd")
    assert qadd.attrs["lo"] == 0 and not qadd.output.type.quant.signed  # ReLU in the clamp
    feed = batches[0]
    want = intq.compile(g).run(feed)["pool"]
    got = intq.compile(quantized).run(feed)["pool"]
    np.testing.assert_allclose(got, want, atol=0.05 * float(np.abs(want).max()))


def test_range_analysis_refuses_an_accumulator_that_could_overflow():
    # 8-bit activations times full-range 8-bit weights over K = 2^18 can reach 2^32.
    k = 1 << 18
    g = Graph()
    x = g.add_input("x", TensorType(DType.U8, (1, k), QuantParams(8, False, (0.01,))))
    w = g.add_constant(np.full((k, 2), 127, np.int8), "w")
    w.type = w.type.with_quant(QuantParams(8, True, (0.01,), narrow=True))
    g.op("QMatMul", x, w, name="/huge/MatMul")
    with pytest.raises(intq.NumericsError, match="node '/huge/MatMul'.*outside int32") as info:
        analyze_ranges(g)
    assert "fewer" in str(info.value)


def test_an_overflow_over_a_16_bit_input_names_wide_bits():
    """A dense layer reading a transformer's 16-bit residual stream: the way out is a
    narrower stream, and the message says so in Python and config-file terms."""
    k = 1 << 10
    g = Graph()
    x = g.add_input("x", TensorType(DType.I16, (1, k), QuantParams(16, True, (0.01,))))
    w = g.add_constant(np.full((k, 2), 127, np.int8), "w")
    w.type = w.type.with_quant(QuantParams(8, True, (0.01,), narrow=True))
    g.op("QMatMul", x, w, name="/encoder/dense/MatMul")
    with pytest.raises(intq.NumericsError, match="/encoder/dense/MatMul.*outside int32") as info:
        analyze_ranges(g)
    assert "wide_bits=12 or 8" in str(info.value)
    assert "wide_bits = 12" in str(info.value)


def test_range_analysis_bounds_a_small_layer():
    g = Graph()
    x = g.add_input("x", TensorType(DType.I8, (1, 3), QuantParams(8, True, (0.1,))))
    w = g.add_constant(np.array([[1, -2], [3, 4], [-5, 6]], np.int8), "w")
    w.type = w.type.with_quant(QuantParams(8, True, (0.5,), narrow=True))
    acc = g.op("QMatMul", x, w, name="mm")
    intervals = analyze_ranges(g)
    # x in [-128, 127]. Column 0, w = (1, 3, -5): [-128*4 - 127*5, 127*4 + 128*5];
    # column 1, w = (-2, 4, 6): [-128*10 - 127*2, 127*10 + 128*2]. The union:
    assert intervals[acc] == (-128 * 10 - 127 * 2, 127 * 10 + 128 * 2)


def test_integer_only_checker_names_float_ops():
    text = """graph main(%x: f32[4]) {
  %q = Quantize(%x) {bits=8, scale=0.1, signed=1} : i8[4] q(bits=8, signed, scale=0.1)
  %d = Dequantize(%q) : f32[4]
  %s = Sigmoid(%d) : f32[4] @"/head/Sigmoid"
  %q2 = Quantize(%s) {bits=8, scale=0.01, signed=0} : u8[4] q(bits=8, unsigned, scale=0.01)
  %out = Dequantize(%q2) : f32[4]
  return %out
}
"""
    graph = from_text(text)
    # The Sigmoid sits after a Dequantize, but its result goes back into integers.
    result = census(graph)
    assert result.float_tail == ["Sigmoid '/head/Sigmoid'"]
    pure = from_text(text.replace("%q2 = Quantize(%s)", "%q2 = Quantize(%x)"))
    assert check_integer_only(pure).ops["Quantize"] == 2
    before_quantize = from_text(
        """graph main(%x: f32[4]) {
  %s = Sigmoid(%x) : f32[4] @"/pre/Sigmoid"
  %q = Quantize(%s) {bits=8, scale=0.1, signed=1} : i8[4] q(bits=8, signed, scale=0.1)
  %d = Dequantize(%q) : f32[4]
  return %d
}
"""
    )
    with pytest.raises(intq.NumericsError, match="Sigmoid '/pre/Sigmoid' computes in float"):
        check_integer_only(before_quantize)


def test_unsupported_op_in_the_integer_path_names_the_node():
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (2, 4)))
    g.set_outputs([g.op("Tanh", g.op("Sqrt", x, name="/sqrt"), name="/act/Tanh")])
    batches = [{"x": np.ones((2, 4), np.float32)}]
    with pytest.raises(intq.UnsupportedOpError, match="node '/sqrt': Sqrt has no integer lowering"):
        intq.quantize(g, batches)


def test_bad_configs_are_refused():
    with pytest.raises(intq.IntqError, match="unknown calibration method 'kl'"):
        intq.QuantConfig(calibration="kl")
    with pytest.raises(intq.IntqError, match="1-bit weights / 8-bit activations"):
        intq.QuantConfig(weight_bits=1)
    with pytest.raises(intq.IntqError, match="layer 'conv1'"):
        intq.QuantConfig(layer_bits={"conv1": intq.LayerBits(weights=9)})


def test_activation_with_a_shared_input_is_not_fused():
    rng = np.random.default_rng(0)
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (1, 2, 4, 4)))
    w = g.add_constant(rng.normal(size=(2, 2, 1, 1)).astype(np.float32), "w")
    conv = g.op("Conv", x, w, name="conv")
    g.set_outputs([g.op("Add", conv, g.op("Relu", conv, name="relu"), name="add")])
    batches = [{"x": rng.normal(size=(1, 2, 4, 4)).astype(np.float32)} for _ in range(4)]
    quantized = intq.quantize(g, batches)
    assert [n.op for n in quantized] == [
        "Quantize",
        "QConv",
        "Requantize",
        "Clip",
        "QAdd",
        "Dequantize",
    ]
    want = intq.compile(g).run(batches[0])["add"]
    got = intq.compile(quantized).run(batches[0])["add"]
    np.testing.assert_allclose(got, want, atol=0.05 * float(np.abs(want).max()))


def test_layer_bits_must_name_real_layers(digits_model, digits_split):
    graph = intq.from_onnx(digits_model.path)
    config = intq.QuantConfig(layer_bits={"/no/such/Conv": intq.LayerBits(weights=4)})
    with pytest.raises(intq.IntqError, match="does not have: \\['/no/such/Conv'\\]") as info:
        intq.quantize(graph, calibration_batches(digits_split[0], 16), config)
    assert "/features/features.0/Conv" in str(info.value)
    first_conv = intq.QuantConfig(
        layer_bits={"/features/features.0/Conv": intq.LayerBits(weights=4)}
    )
    quantized = intq.quantize(graph, calibration_batches(digits_split[0], 16), first_conv)
    bits = {n.label(): n.inputs[1].type.quant.bits for n in quantized if n.op == "QConv"}
    assert bits == {"/features/features.0/Conv": 4, "/features/features.4/Conv": 8}
