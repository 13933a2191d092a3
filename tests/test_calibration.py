"""Calibration: streaming statistics, clipping thresholds, and collecting them over a graph."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import intq
from intq.ir import DType, Graph, TensorType
from intq.passes.calibration import (
    CLIP_METHODS,
    MIN_THRESHOLD,
    TensorStats,
    collect_stats,
    qmax,
)

# Magnitudes from 2^-10 up, or exactly 0: thresholds then sit well above MIN_THRESHOLD, so
# exact comparisons hold. `wide` goes down to subnormals and up to 2^100 for robustness checks.
moderate = hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-1e4, 1e4, width=32)).map(
    lambda a: np.where(np.abs(a) < 2.0**-10, np.float32(0), a)
)
wide = hnp.arrays(
    np.float32,
    st.integers(1, 300),
    elements=st.floats(-(2.0**100), 2.0**100, width=32, allow_nan=False, allow_infinity=False),
)
bits = st.sampled_from([2, 3, 4, 8, 16])


def stats_of(*arrays: np.ndarray, bins: int = 2048) -> TensorStats:
    stats = TensorStats(bins)
    for a in arrays:
        stats.update(a)
    return stats


def reference_error(stats: TensorStats, thresholds: np.ndarray, nbits: int) -> np.ndarray:
    """expected_error for signed values, written the obvious way: a bins x thresholds matrix."""
    width, top, q = stats.bin_width, stats.absmax, qmax(nbits, True)
    counts = stats.histogram.astype(np.float64)
    counts[0] -= stats.zeros  # exact zeros cost nothing
    reps = np.minimum((np.arange(stats.bins) + 0.5) * width, top)[:, None]
    t = thresholds[None, :]
    rounding = np.where(reps <= t, (t / q) ** 2 / 12, 0.0)
    clipping = np.where(reps > t, (reps - t) ** 2, 0.0)
    return (counts[:, None] * (rounding + clipping)).sum(axis=0) / stats.count


# ----- TensorStats: properties ------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(data=moderate, draw=st.data())
def test_streaming_over_any_split_equals_one_batch(data: np.ndarray, draw: st.DataObject):
    cuts = sorted(draw.draw(st.lists(st.integers(0, data.size), max_size=6)))
    chunks = np.split(data, cuts)  # empty chunks included: they must change nothing
    one, streamed = stats_of(data), stats_of(*chunks)
    assert (streamed.min, streamed.max) == (float(data.min()), float(data.max()))
    assert streamed.count == one.count == data.size
    assert streamed.absmax == one.absmax == float(np.abs(data).max())
    # Power-of-two range and bins: growing and merging is exactly binning at the final range.
    assert streamed.upper == one.upper
    np.testing.assert_array_equal(streamed.histogram, one.histogram)
    for method in CLIP_METHODS:
        assert streamed.clip(method, 8, True) == one.clip(method, 8, True)
    # Smallest magnitudes first: the range grows at nearly every chunk.
    rising = stats_of(*np.split(data[np.argsort(np.abs(data), kind="stable")], cuts))
    assert (rising.upper, rising.zeros) == (one.upper, one.zeros)
    np.testing.assert_array_equal(rising.histogram, one.histogram)


@settings(max_examples=50, deadline=None)
@given(
    batches=st.lists(
        st.tuples(wide, st.integers(-40, 20)).map(lambda ae: ae[0] * np.float32(2.0 ** ae[1])),
        min_size=1,
        max_size=6,
    ),
)
def test_histogram_keeps_every_value_as_the_range_grows(batches: list[np.ndarray]):
    stats = TensorStats()
    seen = 0
    for batch in batches:
        stats.update(batch)
        seen += batch.size
        assert stats.count == seen == int(stats.histogram.sum())
        if stats.absmax == 0:
            assert stats.upper == 0
        else:  # the smallest power of two holding every value
            assert stats.upper / 2 < stats.absmax <= stats.upper
            assert math.frexp(stats.upper)[0] == 0.5


@settings(max_examples=50, deadline=None)
@given(data=moderate, p=st.floats(0, 100))
def test_percentile_is_within_a_bin_of_the_sample_percentile(data: np.ndarray, p: float):
    stats = stats_of(data)
    got = stats.clip("percentile", 8, True, percentile=p)
    values = np.sort(np.abs(data).astype(np.float64))
    if values[-1] == 0:
        assert got == MIN_THRESHOLD
        return
    width = stats.bin_width
    assert got <= stats.absmax
    # The histogram finds the bin of the k-th smallest magnitude, k = ceil(p% of n) ...
    n = values.size
    k = min(max(math.ceil(p / 100 * n), 1), n)
    assert abs(got - values[k - 1]) <= width * (1 + 1e-9)
    # ... and np.percentile interpolates between neighbours of it: the two agree within a
    # bin plus the gap between those neighbours (nothing when the data are dense).
    gap = values[min(k, n - 1)] - values[max(k - 2, 0)]
    assert abs(got - np.percentile(values, p)) <= width * (1 + 1e-9) + gap


@settings(max_examples=50, deadline=None)
@given(
    p=st.floats(0, 100),
    scale=st.floats(1e-3, 1e3),
    n=st.integers(4096, 20000),
    seed=st.integers(0, 2**32 - 1),
)
def test_percentile_on_dense_data_is_within_one_bin(p: float, scale: float, n: int, seed: int):
    # Magnitudes evenly spread, closer together than a bin: here "within one bin" is exact.
    rng = np.random.default_rng(seed)
    data = (np.linspace(0, scale, n) * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    stats = stats_of(*np.array_split(rng.permutation(data), 3))
    expected = np.percentile(np.abs(data), p)
    assert abs(stats.clip("percentile", 8, True, percentile=p) - expected) <= stats.bin_width


@settings(max_examples=50, deadline=None)
@given(data=moderate, nbits=bits, signed=st.booleans(), bins=st.sampled_from([64, 2048]))
def test_mse_threshold_beats_minmax_and_every_bin_edge(
    data: np.ndarray, nbits: int, signed: bool, bins: int
):
    stats = stats_of(data, bins=bins)
    best = stats.clip("mse", nbits, signed)
    top = stats.clip("minmax", nbits, signed)
    assert 0 < best <= top
    assert stats.expected_error(best, nbits, signed) <= stats.expected_error(top, nbits, signed)
    if not signed or stats.absmax == 0:
        return
    # Against an independent, non-vectorised evaluation of the same formula.
    edges = np.arange(1, bins + 1) * stats.bin_width
    edges = np.append(edges[(edges >= top / 128) & (edges <= top)], [top, best])
    ref = reference_error(stats, edges, nbits)
    mine = np.array([stats.expected_error(t, nbits, True) for t in edges])
    # The vectorised form expands sum(count * (v - T)^2); when v - T is tiny next to v that
    # cancels to ~1e-9 relative, far below any difference that matters for choosing T.
    np.testing.assert_allclose(mine, ref, rtol=1e-6, atol=1e-300)
    assert ref[-1] <= ref.min() * (1 + 1e-6)


@settings(max_examples=50, deadline=None)
@given(
    data=st.one_of(wide, moderate),
    method=st.sampled_from(CLIP_METHODS),
    nbits=bits,
    signed=st.booleans(),
    p=st.floats(0, 100),
)
def test_clip_is_always_positive_and_finite(
    data: np.ndarray, method: str, nbits: int, signed: bool, p: float
):
    threshold = stats_of(data).clip(method, nbits, signed, percentile=p)
    assert math.isfinite(threshold) and threshold >= MIN_THRESHOLD
    assert math.isfinite(threshold / qmax(nbits, signed)) and threshold / qmax(nbits, signed) > 0


@settings(max_examples=50, deadline=None)
@given(data=moderate, nbits=bits)
def test_minmax_is_absmax(data: np.ndarray, nbits: int):
    stats = stats_of(data)
    assert stats.clip("minmax", nbits, True) == max(stats.absmax, MIN_THRESHOLD)
    assert stats.clip("minmax", nbits, False) == max(stats.max, MIN_THRESHOLD)


# ----- TensorStats: units -------------------------------------------------------------------


def test_unsigned_thresholds_ignore_negative_values():
    stats = stats_of(np.array([-100.0, -50.0, 0.0, 1.0, 2.0, 3.0, -0.0], np.float32))
    assert stats.zeros == 2
    assert stats.clip("minmax", 8, False) == 3.0
    assert stats.clip("minmax", 8, True) == 100.0
    for method in CLIP_METHODS:
        assert stats.clip(method, 8, False) <= 3.0
    negative = stats_of(np.array([-3.0, -1.0], np.float32))
    assert all(negative.clip(m, 8, False) == MIN_THRESHOLD for m in CLIP_METHODS)


def test_constant_zero_tensor_gets_a_tiny_positive_threshold():
    stats = stats_of(np.zeros((4, 4), np.float32), np.zeros(3, np.float32))
    assert (stats.count, stats.absmax, stats.upper, stats.zeros) == (19, 0.0, 0.0, 19)
    for method in CLIP_METHODS:
        assert stats.clip(method, 8, True) == MIN_THRESHOLD
    # Zeros recorded before the range existed stay counted once the range appears.
    stats.update(np.array([0.75], np.float32))
    assert stats.upper == 1.0 and int(stats.histogram[0]) == 19 and stats.count == 20


def test_mse_clips_a_rare_outlier_and_is_fast():
    rng = np.random.default_rng(0)
    data = np.append(rng.standard_normal(100_000), 1000.0).astype(np.float32)
    stats = stats_of(data)
    # At 8 bits the outlier's rounding cost (spread over 1e5 values) still outweighs clipping
    # it fully, so the optimum lies between; at 4 bits rounding dominates and it is clipped.
    threshold = stats.clip("mse", 8, True)
    assert 100 < threshold < stats.absmax
    assert stats.expected_error(threshold, 8, True) < stats.expected_error(1000.0, 8, True)
    assert 3 < stats.clip("mse", 4, True) < 10
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        stats.clip("mse", 8, True)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.010, f"mse search took {min(timings) * 1e3:.2f} ms"


def test_clip_rejects_bad_arguments():
    stats = stats_of(np.ones(3, np.float32))
    with pytest.raises(intq.IntqError, match="unknown clipping method 'kl'") as info:
        stats.clip("kl", 8, True)
    assert all(m in str(info.value) for m in CLIP_METHODS)
    with pytest.raises(intq.IntqError, match="percentile"):
        stats.clip("percentile", 8, True, percentile=101)
    with pytest.raises(intq.IntqError, match="1 signed bits"):
        stats.clip("minmax", 1, True)
    with pytest.raises(intq.IntqError, match="no values recorded"):
        TensorStats().clip("minmax", 8, True)
    with pytest.raises(intq.IntqError, match="power of two"):
        TensorStats(1000)


def test_update_rejects_nan_and_keeps_the_stats_unchanged():
    stats = stats_of(np.ones(3, np.float32))
    with pytest.raises(intq.NumericsError, match="NaN or Inf"):
        stats.update(np.array([1.0, np.nan], np.float32))
    assert stats.count == 3 and int(stats.histogram.sum()) == 3


# ----- collect_stats --------------------------------------------------------------------------


def relu_graph() -> Graph:
    """x -> Relu -> Mul by 2: two tracked node outputs."""
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (2, 3)))
    y = g.op("Relu", x, name="relu")
    two = g.add_constant(np.full((2, 3), 2.0, np.float32), "two")
    g.set_outputs([g.op("Mul", y, two, name="double")])
    return g


def batch(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((2, 3)).astype(np.float32)}


def test_collect_stats_records_inputs_and_float_node_outputs():
    batches = [batch(i) for i in range(4)]
    stats = collect_stats(relu_graph(), batches, progress=False)
    assert list(stats) == ["x", "relu", "double"]
    everything = np.stack([b["x"] for b in batches])
    assert stats["x"].count == stats["relu"].count == everything.size
    assert stats["x"].min == float(everything.min())
    assert stats["relu"].min == 0.0 and stats["relu"].max == float(everything.max())
    assert stats["double"].max == 2 * float(everything.max())
    only = collect_stats(relu_graph(), batches, names=["double"], progress=False)
    assert list(only) == ["x", "double"]  # inputs are always recorded
    with pytest.raises(intq.IntqError, match="no value of that name"):
        collect_stats(relu_graph(), batches, names=["nope"], progress=False)
    with pytest.raises(intq.IntqError, match="constant"):
        collect_stats(relu_graph(), batches, names=["two"], progress=False)


def test_nan_in_an_input_names_the_input_and_batch():
    bad = batch(1)
    bad["x"][0, 1] = np.nan
    with pytest.raises(intq.NumericsError, match=r"batch 1: input 'x' contains 1 NaN"):
        collect_stats(relu_graph(), [batch(0), bad], progress=False)


@pytest.mark.parametrize("op", ["Div", "Exp"])
def test_inf_in_an_intermediate_names_the_node(op: str):
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (3,)))
    batches = [{"x": np.array([1.0, -2.0, 3.0], np.float32)}]
    if op == "Div":  # x / 0 is Inf on every batch
        y = g.op("Div", x, g.add_constant(np.zeros(3, np.float32), "zero"), name="/model/div")
    else:  # exp(100) overflows float32, on the second batch only
        y = g.op("Exp", x, name="/model/exp")
        batches.append({"x": np.array([1.0, 100.0, 3.0], np.float32)})
    g.set_outputs([g.op("Relu", y, name="after")])
    index = len(batches) - 1
    with pytest.raises(intq.NumericsError, match=rf"batch {index}: .* contains \d+ Inf") as info:
        collect_stats(g, batches, progress=False)
    assert info.value.node == f"/model/{op.lower()}"
    assert f"/model/{op.lower()}" in str(info.value)


def test_no_batches_is_an_error():
    with pytest.raises(intq.IntqError, match="no calibration batches"):
        collect_stats(relu_graph(), [], progress=False)
    with pytest.raises(intq.IntqError, match="no calibration batches"):
        collect_stats(relu_graph(), (b for b in []), progress=False)


def test_a_generator_is_consumed_once_and_lazily() -> None:
    produced: list[int] = []

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for i in range(5):
            produced.append(i)
            yield batch(i)

    stats = collect_stats(relu_graph(), batches(), progress=False)
    assert produced == [0, 1, 2, 3, 4] and stats["x"].count == 5 * 6

    class OnlyOnce:
        iterated = 0

        def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
            OnlyOnce.iterated += 1
            assert OnlyOnce.iterated == 1, "iterated twice"
            return iter([batch(0), batch(1)])

    assert collect_stats(relu_graph(), OnlyOnce(), progress=False)["relu"].count == 12

    # Lazily: a bad batch stops the run before the generator is asked for the next one.
    produced.clear()

    def failing() -> Iterator[dict[str, np.ndarray]]:
        for i in range(5):
            produced.append(i)
            yield {"x": np.full((2, 3), np.inf, np.float32)} if i == 2 else batch(i)

    with pytest.raises(intq.NumericsError, match="batch 2"):
        collect_stats(relu_graph(), failing(), progress=False)
    assert produced == [0, 1, 2]


def test_shape_errors_carry_the_batch_index() -> None:
    bad = {"x": np.zeros((3, 2), np.float32)}
    with pytest.raises(intq.ShapeError, match=r"calibration batch 1: input 'x' has shape"):
        collect_stats(relu_graph(), [batch(0), bad], progress=False)
    with pytest.raises(intq.IntqError, match="batch 0 is a ndarray"):
        not_a_batch: list = [np.zeros((2, 3), np.float32)]
        collect_stats(relu_graph(), not_a_batch, progress=False)


def test_progress_bar_only_when_asked_or_on_a_terminal(capsys: pytest.CaptureFixture[str]):
    batches = [batch(i) for i in range(3)]
    collect_stats(relu_graph(), batches)  # stderr is captured: not a TTY
    collect_stats(relu_graph(), batches, progress=False)
    assert capsys.readouterr() == ("", "")
    collect_stats(relu_graph(), batches, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "calibrating" in err and "3/3" in err
    collect_stats(relu_graph(), iter(batches), progress=True)  # no len: a count, no total
    assert "calibrating" in capsys.readouterr().err
