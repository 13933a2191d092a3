"""Numerics on hostile input: one meaning for NaN and Inf on every backend, one overflow gate
for every target, tiny calibrated ranges refused by name, and the corner cases (crossed Clip
bounds, rank-0 inputs, reductions over nothing) agreeing across backends.

Each backend runs for real: the reference interpreter, an ONNX Runtime session and a TVM
module (one small compile per test that needs it). The generators behind ``make fuzz`` are in
``tests/hostile_numerics.py``.
"""

from __future__ import annotations

import math

import hostile
import numpy as np
import pytest
from hostile_numerics import TARGETS, agree, contract_codes, hostile_array
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import intq
from intq.artifacts import seal_text
from intq.ir import DType, Graph, TensorType, from_text, to_text
from intq.semantics.numerics import clip_bounds
from intq.semantics.numpy_eval import run_graph

HOSTILE = np.array(
    [np.nan, np.inf, -np.inf, -5.0, 1e38, -1e38, 1e-40, -0.0, 0.125, 0.375, -0.125, 3.0],
    np.float32,
)
"""NaN, +-Inf, a negative (into unsigned inputs), +-1e38, a denormal, -0.0, ties of the
rounding at scale 0.25 (0.125 = half a step: to even, 0; 0.375: 2) and an ordinary value."""

WIDTHS = [(8, True), (8, False), (4, True), (3, False), (12, True), (16, False)]
"""(bits, signed) of the inputs of :func:`_quantizers`: 8-bit, narrower, wider, both signs."""


def _quantizers(scale: float = 0.25) -> Graph:
    """One ``Quantize -> Dequantize`` per width of :data:`WIDTHS`, input ``x{i}``: a single
    compile covers them all."""
    g = Graph("quantizers")
    outputs = []
    for i, (bits, signed) in enumerate(WIDTHS):
        x = g.add_input(f"x{i}", TensorType(DType.F32, HOSTILE.shape))
        q = g.op("Quantize", x, bits=bits, signed=int(signed), scale=scale, name=f"q{i}")
        outputs.append(g.op("Dequantize", q, name=f"y{i}"))
    g.set_outputs(outputs)
    return g


def test_nan_inf_and_negatives_quantize_alike_on_every_backend():
    graph = _quantizers()
    feeds = {f"x{i}": HOSTILE for i in range(len(WIDTHS))}
    want = agree(graph, [feeds], TARGETS, "the quantizers")[0]
    for i, (bits, signed) in enumerate(WIDTHS):
        codes = want[f"y{i}"] / np.float32(0.25)
        qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        # NaN -> 0; +-Inf and +-1e38 saturate; a negative into unsigned clamps to 0.
        assert codes[0] == 0 and codes[1] == qmax and codes[2] == qmin, (bits, signed)
        assert codes[4] == qmax and codes[5] == qmin
        assert codes[3] == (-20 if signed and qmin <= -20 else qmin)
        # A denormal and -0.0 give 0; ties round to even (0.5 -> 0, 1.5 -> 2, -0.5 -> 0).
        assert list(codes[6:]) == [0, 0, 0, 2, 0, min(12, qmax)], (bits, signed)
        assert np.array_equal(codes, contract_codes(HOSTILE, 0.25, qmin, qmax))


def test_float16_and_float64_inputs_quantize_from_float32_on_every_backend():
    g = Graph("wide_and_narrow")
    outputs = []
    for name, dtype in (("h", DType.F16), ("d", DType.F64)):
        x = g.add_input(name, TensorType(dtype, HOSTILE.shape))
        q = g.op("Quantize", x, bits=8, signed=1, scale=0.25, name=f"{name}.q")
        outputs.append(g.op("Dequantize", q, name=f"{name}.y"))
    g.set_outputs(outputs)
    with np.errstate(over="ignore"):  # 1e38 is Inf in float16
        feeds = {"h": HOSTILE.astype(np.float16), "d": HOSTILE.astype(np.float64)}
    feeds["d"][3] = -1e300  # float32 -Inf once cast
    want = agree(g, [feeds], TARGETS, "float16 and float64 inputs")[0]
    for name in ("h", "d"):
        codes = contract_codes(feeds[name], 0.25, -128, 127)
        assert np.array_equal(want[f"{name}.y"], codes.astype(np.float32) * np.float32(0.25))
    assert want["d.y"][3] == -32.0 and want["h.y"][0] == 0


def test_nan_at_random_positions_of_a_random_cnn_agrees_on_every_backend():
    from random_graphs import random_model

    model, shape, _ = random_model(3)
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(2)]
    config = intq.QuantConfig(calibration="minmax", progress=False)
    graph = intq.quantize(intq.from_onnx(model), data, config)
    feeds = [{"x": hostile_array(rng, shape, 1.0, 0.01)} for _ in range(3)]
    assert np.isnan(feeds[0]["x"]).any() or np.isinf(feeds[0]["x"]).any()
    agree(graph, feeds, TARGETS, "random CNN 3")


def test_nan_into_an_unsigned_input_gives_the_code_zero():
    rng = np.random.default_rng(1)
    model = _layer("Gemm", bias=True)
    data = [{"x": np.abs(rng.standard_normal((2, 4))).astype(np.float32)} for _ in range(2)]
    graph = intq.quantize(intq.from_onnx(model), data, intq.QuantConfig(progress=False))
    quantize = next(n for n in graph if n.op == "Quantize")
    assert not quantize.output.type.quant.signed
    x = np.array([[np.nan, -3.0, np.nan, 1.0], [-np.inf, np.nan, 0.0, np.nan]], np.float32)
    zeros = np.array([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    want = agree(graph, [{"x": x}], TARGETS[:2], "unsigned input")[0]
    # NaN and negatives read as 0 everywhere: the same outputs as zeros there.
    same = intq.compile(graph).run({"x": zeros})
    hostile.same_bits(want, same, "NaN and negatives as zeros")


# ----- the overflow gate ------------------------------------------------------------------------


def _layer(op: str, bias: bool) -> object:
    w = numpy_helper.from_array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), "w")
    b = numpy_helper.from_array(np.linspace(-0.1, 0.1, 3, dtype=np.float32), "b")
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], name="fc")],
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [w, b] if bias else [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def _overflowing_text() -> str:
    """A quantized Gemm whose int32 bias sits at int32's top: the accumulator can overflow."""
    rng = np.random.default_rng(2)
    data = [{"x": rng.standard_normal((2, 4)).astype(np.float32)}]
    config = intq.QuantConfig(calibration="minmax", progress=False)
    graph = intq.quantize(intq.from_onnx(_layer("Gemm", bias=True)), data, config)
    lines = to_text(graph).splitlines()
    at = next(i for i, line in enumerate(lines) if "const i32[3]" in line)
    lines[at] = lines[at][: lines[at].rindex("[")] + "[2147483000, 0, -2147483000]"
    return "\n".join(lines)


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_refuses_an_overflowing_layer_from_ir_text(target):
    graph = from_text(_overflowing_text())
    with pytest.raises(intq.NumericsError, match="int32 accumulator can reach") as info:
        intq.compile(graph, target=target)
    assert info.value.node == "fc"
    assert "fewer activation or weight bits" in (info.value.hint or "")


def test_loading_an_overflowing_reference_artifact_is_refused(tmp_path):
    path = tmp_path / "edited.intq"
    path.write_bytes(seal_text(_overflowing_text()))
    with pytest.raises(intq.IntqError, match="int32 accumulator can reach"):
        intq.load(path)


def test_an_ir_text_whose_types_contradict_its_ops_is_refused_before_compiling():
    text = _overflowing_text().replace("[2147483000, 0, -2147483000]", "[1, 2, 3]")
    # The Quantize declares 4 bits while its attribute says 8: the verifier, in the gate.
    text = text.replace("q(bits=8, signed, scale=", "q(bits=4, signed, scale=", 1)
    with pytest.raises(intq.VerificationError):
        intq.compile(from_text(text), target="onnxruntime")


def test_quantize_scales_that_are_not_normal_float32_are_refused():
    g = Graph("g")
    x = g.add_input("x", TensorType(DType.F32, (2,)))
    for scale in (1e-40, 1e39):
        with pytest.raises(intq.ShapeError, match="Quantize.s scale .* not a normal float32"):
            g.op("Quantize", x, bits=8, signed=1, scale=scale)


# ----- tiny calibrated ranges -------------------------------------------------------------------


def test_activations_too_small_to_quantize_are_refused_naming_the_tensor():
    rng = np.random.default_rng(3)
    data = [{"x": (rng.standard_normal((2, 4)) * 1e-29).astype(np.float32)} for _ in range(2)]
    top = max(float(np.abs(d["x"]).max()) for d in data)
    with pytest.raises(
        intq.NumericsError, match=f"reach only {top:.3g}, below the smallest"
    ) as info:
        intq.quantize(intq.from_onnx(_layer("MatMul", bias=False)), data)
    assert info.value.node == "x"
    assert "scale the calibration and run-time data up" in (info.value.hint or "")


def test_small_but_quantizable_activations_give_a_nonzero_output():
    rng = np.random.default_rng(4)
    data = [{"x": (rng.standard_normal((2, 4)) * 3e-8).astype(np.float32)} for _ in range(2)]
    model = _layer("MatMul", bias=False)
    graph = intq.quantize(intq.from_onnx(model), data, intq.QuantConfig(progress=False))
    got = intq.compile(graph).run(data[0])["y"]
    want = intq.compile(intq.from_onnx(model)).run(data[0])["y"]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


# ----- Clip with crossed bounds, rank 0, reductions over nothing --------------------------------


def test_an_integer_clip_with_min_above_max_gives_max_on_every_backend():
    text = """graph g(%x: f32[6]) {
  %q = Quantize(%x) {bits=8, scale=0.5, signed=1} : i8[6] q(bits=8, signed, scale=0.5)
  %c = Clip(%q) {max=-3.0, min=40.0} : i8[6] q(bits=8, signed, scale=0.5)
  %far = Clip(%c) {max=inf, min=500.0} : i8[6] q(bits=8, signed, scale=0.5)
  %y = Dequantize(%c) : f32[6]
  %z = Dequantize(%far) : f32[6]
  return %y, %z
}"""
    x = np.array([-100, -1.5, 0, 2, 30, np.nan], np.float32)
    want = agree(from_text(text), [{"x": x}], TARGETS, "crossed Clip bounds")[0]
    assert np.array_equal(want["y"], np.full(6, -1.5, np.float32))  # max = -3 codes
    assert np.array_equal(want["z"], np.full(6, 63.5, np.float32))  # 500 saturates at 127


def test_a_float_clip_with_min_above_max_quantizes_to_max():
    lo = numpy_helper.from_array(np.array(2.0, np.float32), "lo")
    hi = numpy_helper.from_array(np.array(-1.0, np.float32), "hi")
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Clip", ["h", "lo", "hi"], ["y"]),
        ],
        "clip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [lo, hi, w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    rng = np.random.default_rng(5)
    data = [{"x": rng.standard_normal((2, 4)).astype(np.float32)}]
    quantized = intq.quantize(intq.from_onnx(model), data, intq.QuantConfig(progress=False))
    got = agree(quantized, data, TARGETS[:2], "a float Clip with min > max")[0]["y"]
    np.testing.assert_allclose(got, -1.0, atol=0.01)


def test_clip_bounds_that_are_nan_are_refused():
    g = Graph("g")
    x = g.add_input("x", TensorType(DType.F32, (2,)))
    with pytest.raises(intq.ShapeError, match="bounds must be numbers"):
        g.op("Clip", x, min=math.nan, max=1.0)


@given(
    low=st.floats(allow_nan=False, width=32),
    high=st.floats(allow_nan=False, width=32),
    dtype=st.sampled_from([np.int8, np.uint8, np.int16, np.uint16, np.int32]),
    x=st.integers(-(2**31), 2**31 - 1),
)
def test_clip_bounds_are_ordered_in_range_and_keep_what_lies_inside(low, high, dtype, x):
    info = np.iinfo(dtype)
    x = int(np.clip(x, info.min, info.max))
    lo, hi = clip_bounds(low, high, dtype)
    assert info.min <= lo <= hi <= info.max
    clamped = min(max(x, lo), hi)
    assert clamped == max(min(x, hi), lo)  # the order of the two clamps no longer matters
    if low <= x <= high:
        assert clamped == x
    if low > high:
        assert clamped == hi  # every value becomes max (ONNX)


def test_a_rank0_input_runs_alike_on_every_backend():
    c = numpy_helper.from_array(np.float32(1.5), "c")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
        "scalar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [c],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    data = [{"x": np.float32(v)} for v in (0.5, -1.0, 2.0)]
    quantized = intq.quantize(intq.from_onnx(model), data, intq.QuantConfig(progress=False))
    feeds = [{"x": np.float32(v)} for v in (np.nan, np.inf, -2.0, 1.25)]
    want = agree(quantized, feeds, TARGETS, "a rank-0 input")
    assert want[0]["y"].shape == () and want[0]["y"] == 0 and want[2]["y"] == 0


def test_a_mean_over_an_empty_axis_is_refused_and_a_sum_is_zero():
    g = Graph("empty")
    x = g.add_input("x", TensorType(DType.F32, (2, 0, 3)))
    q = g.op("Quantize", x, bits=8, signed=1, scale=0.05)
    with pytest.raises(intq.ShapeError, match="mean over axes \\[1\\].*no elements"):
        g.op("QReduceSum", q, axes=[1], keepdims=0, mean=1)
    g.set_outputs([g.op("Dequantize", g.op("QReduceSum", q, axes=[1], keepdims=0, mean=0))])
    want = agree(g, [{"x": np.zeros((2, 0, 3), np.float32)}], TARGETS[:2], "an empty sum")
    assert np.array_equal(want[0][g.outputs[0].name], np.zeros((2, 3), np.float32))


def test_the_reference_quantizer_needs_no_floating_point_warning():
    graph = _quantizers()
    with np.errstate(all="raise"):  # NaN and Inf handled explicitly, not by a cast
        run_graph(graph, {f"x{i}": HOSTILE for i in range(len(WIDTHS))})
