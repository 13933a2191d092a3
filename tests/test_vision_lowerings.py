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
from intq.passes.range_analysis import analyze_ranges
from intq.semantics.numpy_eval import run_graph


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
    _within_proven_ranges(graph, {"x": feeds[2]})
    got = bit_exact(graph, feeds)["c2"]
    want = intq.compile(_float(model)).run({"x": feeds[0]})["c2"]
    np.testing.assert_allclose(got, want, atol=0.03 * float(np.abs(want).max()))


def test_linear_resize_is_refused_until_lowered():
    graph = _resize_graph((1, 1, 2, 2), (1, 1, 4, 4), "linear", "half_pixel", "floor")
    x = np.ones((1, 1, 2, 2), np.float32)
    with pytest.raises(intq.UnsupportedOpError, match="Resize mode 'linear'"):
        intq.quantize(graph, [{"x": x}])
