"""The TVM backend's transformer kernels: 16-bit activations on ``vpdpbusd`` as byte planes,
bit-exact with the reference interpreter and chosen from the target's features."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from int_graphs import full_range, int_input, requantized
from test_tvm_backend import ZEN3, ZEN4, assembly, assert_same, full_range_weights, host_runs
from torch import nn

import intq
from intq.backends.tvm import compile_tvm
from intq.ir import Graph, QuantParams, verify


def wide_dense(
    signed: bool, seed: int = 0, rows: int = 4, cin: int = 19, cout: int = 24, bias: bool = True
) -> Graph:
    """A ``QMatMul`` of a 16-bit activation ``[2, rows, cin]`` (signed or not) by full-range
    8-bit weights, with a bias: its int32 accumulator and its requantization both outputs."""
    rng = np.random.default_rng(seed)
    g = Graph()
    x = int_input(g, "x", (2, rows, cin), signed, scale=0.001, bits=16)
    w = full_range_weights(g, rng, (cin, cout), 1)
    inputs = [x, w]
    if bias:
        b = g.add_constant(rng.integers(-(2**24), 2**24, cout).astype(np.int32), "b")
        b.type = b.type.with_quant(
            QuantParams(32, True, tuple(0.001 * s for s in w.type.quant.scale), axis=0)
        )
        inputs.append(b)
    acc = g.op("QMatMul", *inputs)
    g.set_outputs([acc, requantized(g, acc, 20.0, True)])
    verify(g)
    return g


ZEN4_RUNS = host_runs(ZEN4)


@pytest.mark.skipif(ZEN4_RUNS is not None, reason=f"a znver4 module cannot run here: {ZEN4_RUNS}")
@settings(max_examples=8, deadline=None)
@example(seed=0, signed=True, rows=4, cin=384, cout=8, bias=True)  # MiniLM's hidden size
@given(
    seed=st.integers(0, 2**16),
    signed=st.booleans(),
    rows=st.sampled_from([1, 3, 4]),
    cin=st.sampled_from([1, 4, 19, 64]),  # groups of 4 with and without a tail
    cout=st.sampled_from([5, 8, 24]),
    bias=st.booleans(),
)
def test_byte_plane_dense_is_bit_exact(seed, signed, rows, cin, cout, bias):
    """Both 16-bit extremes, alternating extremes (every plane byte 0 or 255) and random
    full-range activations against full-range weights: the planes' accumulators and the
    uint32 combination with the offset bias give the reference's int32 sums exactly, even
    where ``256 * acc_hi`` alone may pass int32."""
    g = wide_dense(signed, seed, rows, cin, cout, bias)
    exe = compile_tvm(g, ZEN4)
    assert set(exe.kernel_paths.values()) == {"vnni"}
    shape = g.inputs[0].type.shape
    dtype = np.int16 if signed else np.uint16
    rng = np.random.default_rng(seed)
    for value in (np.iinfo(dtype).max, np.iinfo(dtype).min):
        assert_same(g, exe, {"x": np.full(shape, value, dtype)})
    extremes = np.where(np.indices(shape).sum(0) % 2 == 0, np.iinfo(dtype).max, np.iinfo(dtype).min)
    assert_same(g, exe, {"x": extremes.astype(dtype)})
    assert_same(g, exe, {"x": full_range(rng, shape, signed, bits=16)})


@pytest.mark.parametrize("signed", [True, False])
def test_byte_planes_only_on_vnni_targets(signed):
    """The target decides, not the host: ``znver4`` reduces 16-bit activations as byte
    planes with ``vpdpbusd`` (no ``vpmaddwd``); ``znver3`` keeps ``vpmaddwd`` on int16 for
    signed activations and the generic kernel for unsigned ones."""
    g = wide_dense(signed)
    zen4 = compile_tvm(g, ZEN4)
    asm4 = assembly(zen4)
    assert set(zen4.kernel_paths.values()) == {"vnni"}
    assert "vpdpbusd\t%ymm" in asm4 and "vpmaddwd" not in asm4
    zen3 = compile_tvm(g, ZEN3)
    assert "vpdpbusd" not in assembly(zen3)
    assert set(zen3.kernel_paths.values()) == ({"vpmaddwd"} if signed else set())
    assert all(kind == applied for kind, applied in zen4.schedules.values())


class _EncoderLayer(nn.Module):
    """One small post-norm BERT layer: projections, attention with a softmax, residual
    LayerNorms and a GELU feed-forward, as an exporter writes them."""

    def __init__(self, width: int = 32, heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (p(x).reshape(b, t, self.heads, -1).transpose(1, 2) for p in self.qkv)
        scores = q @ k.transpose(-1, -2) / (c // self.heads) ** 0.5
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
        h = self.norm1(x + self.out(context))
        return self.norm2(h + self.down(nn.functional.gelu(self.up(h))))


def _encoder(tmp_path) -> tuple[Graph, list[dict[str, np.ndarray]]]:
    x = torch.randn(2, 16, 32)
    torch.onnx.export(
        _EncoderLayer().eval(),
        (x,),
        str(tmp_path / "layer.onnx"),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
    )
    model = onnx.load(str(tmp_path / "layer.onnx"))
    model.ir_version = 8
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(size=(2, 16, 32)).astype(np.float32)} for _ in range(3)]
    return intq.quantize(intq.from_onnx(model), batches), batches


def test_encoder_layer_kernels_are_scheduled_and_bit_exact(tmp_path):
    """A transformer layer's integer kernels (LayerNorm, GELU, softmax and attention fused
    by Relax; the dense layers) all take their own schedule, none a fallback, for the host
    and for explicit VNNI and AVX2 targets (16-bit activations on byte planes with VNNI), and
    the host's module is bit-exact with the reference, also on inputs 8x the calibration's."""
    graph, batches = _encoder(tmp_path)
    ops = {n.op for n in graph}
    assert {"QLayerNorm", "QGelu", "QSoftmax", "QBatchMatMul"} <= ops
    for target in (None, ZEN4, ZEN3):
        exe = compile_tvm(graph, target)
        fallbacks = {name: s for name, s in exe.schedules.items() if s[0] != s[1]}
        assert not fallbacks
        assert "fused" in {kind for kind, _ in exe.schedules.values()}
        if target is ZEN4:
            assert set(exe.kernel_paths.values()) == {"vnni"}
        if target is None:
            for feed in [*batches, {"x": 8 * batches[0]["x"]}]:
                assert_same(graph, exe, feed)
