"""``calibration="auto"``: per-tensor clipping rules chosen by their consumers' output error."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import intq
from intq.inspection import clip_labels, layer_sqnr, layer_table
from intq.ir import DType, Graph, TensorType
from intq.passes import AutoClip, Calibrate, Integerize, PassManager
from intq.passes.auto_clip import fake_quantize, reservoir
from intq.passes.calibration import (
    AUTO_CANDIDATES,
    CALIBRATION_METHODS,
    ClipChoices,
    ClipRule,
    qmax,
)
from intq.semantics.numpy_eval import run_graph


def outlier_mlp() -> Graph:
    """x -> MatMul -> Relu -> MatMul: the hidden activation gets a rare huge outlier."""
    rng = np.random.default_rng(0)
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (16, 32)))
    w1 = g.add_constant(rng.normal(size=(32, 64)).astype(np.float32) * 0.2, "w1")
    w2 = g.add_constant(rng.normal(size=(64, 8)).astype(np.float32) * 0.2, "w2")
    h = g.op("Relu", g.op("MatMul", x, w1, name="fc1"), name="relu")
    g.set_outputs([g.op("MatMul", h, w2, name="fc2")])
    return g


def outlier_batches(count: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(size=(16, 32)).astype(np.float32)} for _ in range(count)]
    batches[3]["x"][5, 7] = 1000.0  # one value far out: min/max would waste the range on it
    return batches


def relative_error(graph: Graph, quantized: Graph, batches: list[dict[str, np.ndarray]]) -> float:
    err = ref = 0.0
    for feed in batches:
        want = run_graph(graph, feed)["fc2"].astype(np.float64)
        got = run_graph(quantized, feed)["fc2"].astype(np.float64)
        err += float(np.sum((got - want) ** 2))
        ref += float(np.sum(want**2))
    return err / ref


def test_auto_is_the_default_and_a_known_method():
    assert intq.QuantConfig().calibration == "auto"
    assert CALIBRATION_METHODS[0] == "auto"
    with pytest.raises(intq.IntqError, match="use one of auto"):
        intq.QuantConfig(calibration="best")


def test_auto_clips_an_outlier_and_the_report_says_so():
    graph, batches = outlier_mlp(), outlier_batches()
    auto = intq.quantize(graph, batches, intq.QuantConfig(progress=False))
    minmax = intq.quantize(graph, batches, intq.QuantConfig(calibration="minmax", progress=False))
    labels = clip_labels(auto)
    assert labels["relu"] != "minmax"  # the hidden activation's outlier is clipped
    assert clip_labels(minmax)["relu"] == "minmax"
    # Held-out data without outliers: clipping the outlier pays where the layers read it.
    held_out = outlier_batches(12)[8:]
    assert relative_error(graph, auto, held_out) < 0.5 * relative_error(graph, minmax, held_out)
    rows = {r["layer"]: r for r in layer_table(auto)}
    assert rows["fc1"]["clip"] == labels["relu"]  # fc1's output is the Relu's, fused
    sqnr = {r["layer"]: r for r in layer_sqnr(graph, auto, batches[:2], progress=False)}
    assert sqnr["fc1"]["clip"] == labels["relu"]


def test_auto_clip_pass_stores_a_candidate_per_tensor():
    graph, batches = outlier_mlp(), outlier_batches()
    lowering = Integerize(calibration="auto")
    manager = PassManager([Calibrate(batches, False), AutoClip(batches[:4], lowering, False)])
    manager(graph)
    choices = graph.analysis(ClipChoices)
    assert choices is not None
    assert {v.name for v in choices} == {"x", "fc1", "relu", "fc2"}
    assert all(rule in AUTO_CANDIDATES for rule in choices.values())
    # Only the input and the ReLU's output get scales: fc1's accumulator is clamped by the
    # ReLU, fc2's is dequantized as it is. The others are neither measured nor simulated.
    stats = graph.analysis(intq.passes.calibration.CalibrationStats)
    assert {v.name for v in AutoClip(lowering=lowering)._scaled_values(graph, stats)} == {
        "x",
        "relu",
    }


def test_auto_clip_needs_the_statistics():
    with pytest.raises(intq.PassError, match="run the calibrate pass first"):
        AutoClip(outlier_batches(4))(outlier_mlp())


def test_auto_without_choices_falls_back_to_mse():
    graph, batches = outlier_mlp(), outlier_batches()
    manager = PassManager([Calibrate(batches, False), Integerize(calibration="auto")])
    quantized = manager(graph).graph
    assert set(clip_labels(quantized).values()) == {"mse"}


def test_a_clip_rule_names_itself():
    assert ClipRule("percentile", 99.9).label == "p99.9"
    assert ClipRule("mse").label == "mse"
    with pytest.raises(intq.IntqError, match="unknown clipping method"):
        ClipRule("auto")


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(-1e3, 1e3, width=32)),
    st.floats(1e-3, 1e3),
    st.sampled_from([2, 4, 8, 16]),
    st.booleans(),
)
@example(np.array([513.0], np.float32), 512.8410786391254, 16, True)  # CI found it
def test_fake_quantize_is_a_clipped_rounding_to_the_grid(x, threshold, bits, signed):
    got = fake_quantize(x, threshold, bits, signed)
    top = qmax(bits, signed)
    scale = threshold / top
    codes = got.astype(np.float64) / scale
    assert got.dtype == x.dtype
    # In codes: float32 rounds the scale and the product, half an ulp each.
    tol = 1e-6 + top * 2.0**-22
    np.testing.assert_allclose(codes, np.rint(codes), atol=tol)  # on the grid
    assert codes.max() <= top + tol and codes.min() >= (-top if signed else 0) - tol
    inside = (x >= (-threshold if signed else 0)) & (x <= threshold)
    # Within the range, at most half a step from the value (float32 rounding aside).
    assert np.all(np.abs(got - x)[inside] <= scale * 0.5 * (1 + 1e-4) + 1e-6 * threshold)


@given(st.integers(0, 40), st.integers(1, 10), st.booleans())
def test_reservoir_keeps_a_bounded_sample_and_passes_everything_through(count, size, as_list):
    batches = [{"x": np.full(1, i, np.float32)} for i in range(count)]
    source = batches if as_list else iter(batches)
    seen, kept = reservoir(source, size)
    assert [b["x"][0] for b in seen] == list(range(count))
    assert len(kept) == min(size, count)
    ids = [int(b["x"][0]) for b in kept]
    assert len(set(ids)) == len(ids) and all(0 <= i < count for i in ids)
