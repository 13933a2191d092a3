"""Sentence-transformers' masked mean pooling, integer-only: ``QMask``, the raw count and
``QDivCount`` (a sum divided by a run-time count through a compile-time multiplier table).

The error bound (asserted below): with ``q = acc * s_sum / (c * s_out)`` the exact quotient
in output units, ``QDivCount`` gives ``clamp(q)`` within ``1/2 + |q| 2^-30`` (the rounding
half up and the dyadic multiplier's relative error). Against the float mean of unrounded
activations ``x`` quantized at ``s_x`` (no clipping), each kept value is within ``s_x / 2``,
so their mean is too: the pooled output is within ``s_out / 2 + s_x / 2 + |mean| 2^-30``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import intq
from intq.errors import NumericsError, UnsupportedOpError
from intq.ir import DType, Graph, QuantParams, TensorType, verify
from intq.passes.integer_only import census
from intq.passes.range_analysis import analyze_ranges
from intq.semantics import kernels
from intq.semantics.numerics import count_divisors

SCALES = st.floats(2.0**-20, 2.0**4, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 512),
    SCALES,
    st.floats(0.05, 20.0),
    st.data(),
)
def test_divide_by_count_is_the_quotient_within_half_a_step(length, s_sum, spread, data):
    s_out = s_sum * spread
    counts = np.asarray(data.draw(st.lists(st.integers(0, length), min_size=1, max_size=16)))
    top = length * 2**15  # a 16-bit activation summed over every position
    acc = np.asarray(
        data.draw(st.lists(st.integers(-top, top), min_size=len(counts), max_size=len(counts)))
    )
    multipliers, shifts = count_divisors(s_sum / s_out, length)
    lo, hi = -(2**15), 2**15 - 1
    got = kernels.divide_by_count(
        kernels.NumpyOps(), acc.astype(np.int64), counts, multipliers, shifts, lo, hi
    )
    for a, c, y in zip(acc.tolist(), counts.tolist(), got.tolist()):
        q = Fraction(a) * Fraction(s_sum) / (max(c, 1) * Fraction(s_out))
        bound = Fraction(1, 2) + abs(q) * Fraction(2) ** -30
        assert abs(y - min(max(q, lo), hi)) <= bound, (a, c, y, float(q))


def test_count_table_repeats_count_one_for_nothing_kept():
    multipliers, shifts = count_divisors(0.75, 4)
    assert len(multipliers) == len(shifts) == 5
    assert (multipliers[0], shifts[0]) == (multipliers[1], shifts[1])
    for c in range(1, 5):
        assert math.ldexp(multipliers[c], -shifts[c]) == pytest.approx(0.75 / c, rel=2**-30)


def _pool_graph(
    batch: int, length: int, hidden: int, s_x: float, s_out: float, table: int | None = None
) -> Graph:
    """QMask -> QReduceSum, the mask's count -> Clip(min=1), QDivCount, on a 16-bit input
    (``table``: the counts the multiplier table covers, ``length`` unless given)."""
    g = Graph("pool")
    x = g.add_input(
        "x", TensorType(DType.I16, (batch, length, hidden), QuantParams(16, True, (s_x,)))
    )
    mask = g.add_input("mask", TensorType(DType.I64, (batch, length)))
    column = g.add("Unsqueeze", [mask], {"axes": (2,)}).output
    flag = g.add("Cast", [column], {"to": "bool"}).output
    keep = g.add("Cast", [flag], {"to": "u8"}).output
    kept = g.add("QMask", [x, keep]).output
    total = g.add("QReduceSum", [kept], {"axes": (1,), "keepdims": 0}).output
    count = g.add("QReduceSum", [keep], {"axes": (1,), "keepdims": 0}).output
    count = g.add("Clip", [count], {"min": 1.0}).output
    multipliers, shifts = count_divisors(s_x / s_out, table or length)
    attrs = {"multiplier": multipliers, "shift": shifts, "bits": 16, "signed": 1}
    attrs |= {"scale": s_out, "lo": -(2**15), "hi": 2**15 - 1}
    mean = g.add("QDivCount", [total, count], attrs).output
    g.set_outputs([g.add("Dequantize", [mean]).output])
    verify(g)
    return g


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 12), st.floats(1.0, 4.0), st.data())
def test_masked_mean_is_the_float_mean_within_the_bound(batch, length, spread, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    x = rng.normal(0, 3, (batch, length, 8))
    mask = rng.integers(0, 2, (batch, length))
    s_x = float(np.abs(x).max()) / (2**15 - 1)
    s_out = s_x * spread
    g = _pool_graph(batch, length, 8, s_x, s_out)
    q = np.rint(x / s_x).astype(np.int16)
    got = intq.compile(g, "reference").run({"x": q, "mask": mask})[g.outputs[0].name]
    keep = mask[..., None].astype(np.float64)
    want = (x * keep).sum(1) / np.maximum(keep.sum(1), 1e-9)
    bound = s_out / 2 + s_x / 2 + np.abs(want) * 2.0**-30
    assert np.all(np.abs(got - want) <= bound * (1 + 1e-6) + 1e-12)


def _backends() -> list[str]:
    return [t for t in ("onnxruntime", "tvm") if t in intq.backends.TARGETS]


def test_the_pool_is_bit_exact_on_every_backend_at_the_extremes():
    g = _pool_graph(4, 16, 8, 0.01, 0.013)
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 2, (4, 16))
    mask[0] = 0  # nothing kept: the sum is 0, divided by max(0, 1)
    mask[1] = 1
    mask[2] = 5  # a non-zero mask value keeps its position
    feeds = [
        {"x": np.full((4, 16, 8), 2**15 - 1, np.int16), "mask": mask},
        {"x": np.full((4, 16, 8), -(2**15), np.int16), "mask": mask},
        {"x": rng.integers(-(2**15), 2**15, (4, 16, 8)).astype(np.int16), "mask": mask},
    ]
    name = g.outputs[0].name
    ref = intq.compile(g, "reference")
    for target in _backends():
        exe = intq.compile(g, target)
        for f in feeds:
            np.testing.assert_array_equal(exe.run(f)[name], ref.run(f)[name], err_msg=target)
    assert np.all(ref.run(feeds[0])[name][0] == 0)


def test_a_count_outside_the_table_is_refused_by_the_range_analysis():
    g = _pool_graph(1, 4, 2, 0.01, 0.01, table=2)
    with pytest.raises(NumericsError, match="outside the table's 0..2"):
        analyze_ranges(g)


# ----- models: Linear -> masked mean pool, from ONNX and from PyTorch ---------------------------


class _MeanPool(nn.Module):
    """sentence-transformers' pooling after one dense layer (``expand`` as its older form)."""

    def __init__(self, expand: bool = False) -> None:
        super().__init__()
        self.dense = nn.Linear(8, 16)
        self.expand = expand

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.dense(x)
        m = attention_mask.unsqueeze(-1)
        if self.expand:
            m = m.expand(h.size())
        m = m.to(h.dtype)
        return (h * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)


def _mask(batch: int = 3, length: int = 6) -> np.ndarray:
    mask = np.ones((batch, length), np.int64)
    mask[1, 4:] = 0  # padding at the end, as a tokenizer batch has
    mask[2, 1:] = 0
    return mask


def _feeds(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(3, 6, 8)).astype(np.float32), "attention_mask": _mask()}


def _from_onnx(module: nn.Module, path) -> intq.ir.Graph:
    import onnx

    feeds = _feeds(0)
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    torch.onnx.export(
        module, args, str(path), dynamo=False, opset_version=17, input_names=list(feeds)
    )
    model = onnx.load(str(path))
    model.ir_version = 8
    return intq.from_onnx(model)


def _from_torch(module: nn.Module, path) -> intq.ir.Graph:
    feeds = _feeds(0)
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    return intq.from_torch(module, args, input_names=list(feeds))


@pytest.mark.parametrize("expand", [False, True], ids=["unsqueeze", "expand"])
@pytest.mark.parametrize("source", [_from_onnx, _from_torch], ids=["onnx", "torch"])
def test_mean_pooling_is_integer_only_and_bit_exact(source, expand, tmp_path):
    torch.manual_seed(0)
    module = _MeanPool(expand).eval()
    graph = source(module, tmp_path / "pool.onnx")
    quantized = intq.quantize(graph, [_feeds(s) for s in range(1, 9)])
    result = census(quantized)
    assert result.violations == [] and result.divisions == 0
    assert {"QMask", "QDivCount"} <= set(result.ops) and result.float_tail == []
    feeds = _feeds(42)
    ref = intq.compile(quantized, "reference").run(feeds)
    (name,) = ref
    with torch.no_grad():
        want = module(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    out_scale = next(n for n in quantized if n.op == "QDivCount").attrs["scale"]
    # The dense layer's own rounding comes on top of the pool's bound: a few output steps.
    assert np.abs(ref[name] - want).max() < 4 * out_scale
    for target in _backends():
        got = intq.compile(quantized, target).run(feeds)
        np.testing.assert_array_equal(got[name], ref[name], err_msg=target)


def _quantize(module: nn.Module) -> None:
    args = tuple(torch.from_numpy(v) for v in _feeds(0).values())
    graph = intq.from_torch(module, args, input_names=["x", "attention_mask"])
    intq.quantize(graph, [_feeds(1)])


def test_a_scaled_mask_is_refused():
    class Scaled(_MeanPool):
        def forward(self, x, attention_mask):
            m = attention_mask.unsqueeze(-1).float() * 2
            return (self.dense(x) * m).sum(1)

    with pytest.raises(UnsupportedOpError, match="only m or 1 - m"):
        _quantize(Scaled().eval())


def test_a_count_clamped_above_one_is_refused():
    class Clamped(_MeanPool):
        def forward(self, x, attention_mask):
            m = attention_mask.unsqueeze(-1).float()
            return (self.dense(x) * m).sum(1) / torch.clamp(m.sum(1), min=2.5)

    with pytest.raises(UnsupportedOpError, match="lower bound of at most 1"):
        _quantize(Clamped().eval())
