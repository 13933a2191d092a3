"""The TVM backend's transformer kernels (LayerNorm, GELU, softmax and attention fused by
Relax, run row by row; the dense layers): scheduled for every target, none falling back,
and bit-exact with the reference interpreter."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from int_graphs import full_range, int_input, requantized
from test_tvm_backend import ZEN3, ZEN4, assert_same, full_range_weights, host_runs
from torch import nn

import intq
from intq.backends.tvm import compile_tvm
from intq.ir import Graph, verify


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
    and for explicit VNNI and AVX2 targets (16-bit activations on vpmaddwd, 8-bit ones on
    vpdpbusd with VNNI), and the host's module is bit-exact with the reference, also on
    inputs 8x the calibration's."""
    graph, batches = _encoder(tmp_path)
    ops = {n.op for n in graph}
    assert {"QLayerNorm", "QGelu", "QSoftmax", "QBatchMatMul"} <= ops
    for target in (None, ZEN4, ZEN3):
        exe = compile_tvm(graph, target)
        fallbacks = {name: s for name, s in exe.schedules.items() if s[0] != s[1]}
        assert not fallbacks
        assert "fused" in {kind for kind, _ in exe.schedules.values()}
        if target is ZEN4:
            assert set(exe.kernel_paths.values()) == {"vnni", "vpmaddwd"}
        if target is ZEN3:  # 8-bit weights without VNNI: vpmaddwd for every dense
            assert set(exe.kernel_paths.values()) == {"vpmaddwd"}
        if target is None:
            for feed in [*batches, {"x": 8 * batches[0]["x"]}]:
                assert_same(graph, exe, feed)


ZEN4_RUNS = host_runs(ZEN4)


@pytest.mark.skipif(ZEN4_RUNS is not None, reason=f"a znver4 module cannot run here: {ZEN4_RUNS}")
@pytest.mark.parametrize(("bits", "path"), [(8, "vnni"), (16, "vpmaddwd")])
@pytest.mark.parametrize("cout", [48, 40])  # 6 blocks of 8 (the AVX-512 tile), 5 blocks
def test_wide_dense_tile_is_bit_exact(bits, path, cout):
    """The AVX-512 dense tile (4 rows x 6 blocks of 8 columns) on 8-bit activations
    (``vpdpbusd``) and 16-bit ones (``vpmaddwd``), full-range weights, at both ends of the
    activation range and on random full-range values."""
    rng = np.random.default_rng(cout)
    g = Graph()
    x = int_input(g, "x", (8, 19), True, scale=0.001, bits=bits)
    w = full_range_weights(g, rng, (19, cout), 1)
    acc = g.op("QMatMul", x, w)
    g.set_outputs([acc, requantized(g, acc, 20.0, True)])
    verify(g)
    exe = compile_tvm(g, ZEN4)
    assert set(exe.kernel_paths.values()) == {path}
    dtype = np.int8 if bits == 8 else np.int16
    for value in (np.iinfo(dtype).max, np.iinfo(dtype).min):
        assert_same(g, exe, {"x": np.full((8, 19), value, dtype)})
    assert_same(g, exe, {"x": full_range(rng, (8, 19), True, bits=bits)})
