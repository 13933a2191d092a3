"""``smooth-layernorm``: SmoothQuant migration of LayerNorm outputs into the MatMuls reading
them. The rewrite is exact in float, leaves the residual readers on the original LayerNorm,
flattens the outlier channels, and the 8-bit integer result is bit-exact across backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import intq
from intq.errors import IntqError
from intq.passes import PREPARE, pipeline
from intq.passes.smooth_layernorm import SmoothLayerNorm, smoothing

WIDTH = 16


class _PostLNBlock(nn.Module):
    """A BERT-style post-LN encoder block behind an embedding LayerNorm whose channel 3 is
    an outlier (large gamma and beta, as BERT's outlier dimensions)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_ln = nn.LayerNorm(WIDTH)
        self.q, self.k, self.v = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.dense = nn.Linear(WIDTH, WIDTH)
        self.ln1 = nn.LayerNorm(WIDTH)
        self.ffn_in, self.ffn_out = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)
        self.ln2 = nn.LayerNorm(WIDTH)
        with torch.no_grad():
            for ln in (self.embed_ln, self.ln1):
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.uniform_(-0.2, 0.2)
                ln.weight[3], ln.bias[3] = 12.0, -6.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed_ln(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        p = torch.softmax(q @ k.transpose(-1, -2) * WIDTH**-0.5, dim=-1)
        h = self.ln1(h + self.dense(p @ v))
        return self.ln2(h + self.ffn_out(nn.functional.gelu(self.ffn_in(h))))


@pytest.fixture(scope="module")
def block(tmp_path_factory) -> intq.ir.Graph:
    import onnx

    path = tmp_path_factory.mktemp("smooth") / "block.onnx"
    x = torch.randn(2, 6, WIDTH)
    torch.onnx.export(_PostLNBlock().eval(), (x,), str(path), dynamo=False, opset_version=17)
    model = onnx.load(str(path))
    model.ir_version = 8
    graph = intq.from_onnx(model)
    pipeline(PREPARE)(graph)
    return graph


def _batches(graph: intq.ir.Graph, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    (x,) = graph.inputs
    return [{x.name: rng.normal(size=x.type.shape).astype(np.float32)} for _ in range(count)]


def _smoothed(graph: intq.ir.Graph, **options) -> intq.ir.Graph:
    copy = graph.copy()
    SmoothLayerNorm(_batches(graph, 4, 0), **options)(copy)
    intq.ir.verify(copy)
    return copy


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_the_rewrite_is_exact_in_float(block, alpha):
    smoothed = _smoothed(block, alpha=alpha)
    want, got = intq.compile(block, "reference"), intq.compile(smoothed, "reference")
    for feed in _batches(block, 3, 1):
        (a,), (b,) = want.run(feed).values(), got.run(feed).values()
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_matmuls_read_a_rescaled_copy_and_the_residual_keeps_the_original(block):
    smoothed = _smoothed(block)
    layernorms = [n for n in smoothed if n.op == "LayerNormalization"]
    # The embedding LN and ln1 each feed MatMuls and a residual Add: split in two. ln2 (the
    # output) feeds no MatMul: left alone.
    assert len(layernorms) == 5
    copies = [n for n in layernorms if n.name.endswith(".smooth")]
    assert len(copies) == 2
    for copy in copies:
        readers = {u.node.op for u in copy.output.uses()}
        assert readers == {"MatMul"}
        original = next(n for n in layernorms if copy.name == n.name + ".smooth")
        assert {u.node.op for u in original.output.uses()} == {"Add"}
        assert copy.inputs[0] is original.inputs[0]
    assert sum(len(c.output.uses()) for c in copies) == 4  # Q, K, V and the FFN's input


def test_the_outlier_channel_is_flattened(block):
    """The rescaled LayerNorm outputs' channel ranges are far more even than the originals'
    (alpha 1: every channel the same range)."""
    batches = _batches(block, 4, 0)
    smoothed = _smoothed(block, alpha=1.0)
    spreads = {}
    for graph, key in ((block, "before"), (smoothed, "after")):
        ln = next(n for n in graph if n.op == "LayerNormalization" and len(n.output.uses()) > 1)
        if key == "after":
            ln = next(n for n in graph if n.name.endswith(".smooth"))
        graph.set_outputs([*graph.outputs, ln.output])
        exe = intq.compile(graph, "reference")
        values = np.concatenate([exe.run(f)[ln.output.name].reshape(-1, WIDTH) for f in batches])
        peak = np.abs(values).max(axis=0)
        spreads[key] = peak.max() / peak.min()
    assert spreads["before"] > 10
    assert spreads["after"] < 1.01


def test_factors_follow_smoothquant():
    low, high = np.array([-1.0, -8.0, 0.0]), np.array([1.0, 8.0, 0.0])
    weights = [np.array([[2.0, -1.0], [0.5, 0.25], [3.0, 1.0]])]
    s = smoothing(low, high, weights, alpha=0.5, shift=False)
    raw = np.sqrt(np.array([1.0, 8.0]) / np.array([2.0, 0.5]))
    np.testing.assert_allclose(s.factor[:2], raw / np.sqrt(raw.prod()))
    assert s.factor[2] == 1.0  # a constant channel keeps its scale
    shifted = smoothing(np.array([1.0, -3.0]), np.array([5.0, 1.0]), [np.ones((2, 1))], 1.0, True)
    np.testing.assert_array_equal(shifted.shift, [3.0, -1.0])


@pytest.fixture(scope="module")
def block_8bit(block):
    config = intq.QuantConfig(wide_bits=8, smooth="layernorm", calibration="minmax")
    return intq.quantize(block, _batches(block, 4, 0), config)


def test_8bit_smoothed_block_is_bit_exact_on_onnxruntime(block_8bit, block):
    reference = intq.compile(block_8bit, "reference")
    ort = intq.compile(block_8bit, "onnxruntime")
    for feed in _batches(block, 2, 2):
        want, got = reference.run(feed), ort.run(feed)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


class _Projection(nn.Module):
    """The embedding LayerNorm (outlier channel 3) and the query projection reading it."""

    def __init__(self) -> None:
        super().__init__()
        block = _PostLNBlock()
        self.ln, self.q = block.embed_ln, block.q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(self.ln(x))


def test_8bit_smoothing_lowers_the_projection_error(tmp_path):
    """A MatMul reading an 8-bit LayerNorm output with an outlier channel follows FP32 far
    more closely with the migration than without it."""
    import onnx

    path = tmp_path / "projection.onnx"
    x = torch.randn(2, 6, WIDTH)
    torch.onnx.export(_Projection().eval(), (x,), str(path), dynamo=False, opset_version=17)
    model = onnx.load(str(path))
    model.ir_version = 8
    graph = intq.from_onnx(model)
    calib, test = _batches(graph, 4, 0), _batches(graph, 3, 3)
    fp32 = intq.compile(graph, "reference")
    errors = {}
    for bits, smooth in ((16, "off"), (8, "off"), (8, "layernorm")):
        config = intq.QuantConfig(wide_bits=bits, smooth=smooth, calibration="minmax")
        exe = intq.compile(intq.quantize(graph, calib, config), "reference")
        errors[bits, smooth] = np.mean(
            [np.abs(exe.run(f)[k] - want).mean() for f in test for k, want in fp32.run(f).items()]
        )
    # The 16-bit LayerNorm output is the floor (the weights' rounding); the migration
    # recovers more than 40% of what 8 bits lose above it (56% measured).
    floor = errors[16, "off"]
    assert errors[8, "layernorm"] - floor < 0.6 * (errors[8, "off"] - floor)


def test_unknown_smooth_mode_is_refused():
    with pytest.raises(IntqError, match="unknown smooth mode 'all'"):
        intq.QuantConfig(smooth="all")
    with pytest.raises(IntqError, match="smooth_alpha"):
        intq.QuantConfig(smooth_alpha=1.5)


def test_config_file_and_cli_flag_set_the_smoothing(tmp_path):
    from intq.cli import _config, build_parser
    from intq.config import load_config

    good = tmp_path / "good.toml"
    good.write_text('wide_bits = 8\nsmooth = "layernorm"\nsmooth_alpha = 0.75\n')
    config = load_config(good)
    assert (config.wide_bits, config.smooth, config.smooth_alpha) == (8, "layernorm", 0.75)
    bad = tmp_path / "bad.toml"
    bad.write_text("smooth_alpha = 2.0\n")
    with pytest.raises(IntqError, match="smooth_alpha: expected a value in .0, 1., got 2.0"):
        load_config(bad)
    args = build_parser().parse_args(
        ["quantize", "m.onnx", "-o", "m.intq", "--smooth", "layernorm"]
    )
    assert _config(args).smooth == "layernorm"


def test_calibration_read_once_sees_every_batch(block, block_8bit):
    """A generator is read once: the batches the smoothing reads go on to calibration, so the
    result equals that of the same batches as a list."""
    config = intq.QuantConfig(wide_bits=8, smooth="layernorm", calibration="minmax")
    streamed = intq.quantize(block, iter(_batches(block, 4, 0)), config)
    assert str(streamed) == str(block_8bit)


def test_at_wide_bits_16_the_matmuls_read_8_bit_copies(block):
    """The rescaled copies take the layers' 8-bit width; the residual stream stays 16-bit."""
    config = intq.QuantConfig(smooth="layernorm", calibration="minmax")
    quantized = intq.quantize(block, _batches(block, 4, 0), config)
    widths = {n.name: n.output.type.dtype.name for n in quantized if n.op == "QLayerNorm"}
    copies = {name for name in widths if name.endswith(".smooth")}
    assert len(copies) == 2 and {widths[c] for c in copies} == {"I8"}
    assert {w for name, w in widths.items() if name not in copies} == {"I16"}
    for node in quantized:
        if node.op == "QMatMul" and node.inputs[0].producer.name in copies:
            assert node.inputs[0].type.dtype.bits == 8
    reference, ort = intq.compile(quantized, "reference"), intq.compile(quantized, "onnxruntime")
    feed = _batches(block, 1, 5)[0]
    for name, want in reference.run(feed).items():
        np.testing.assert_array_equal(ort.run(feed)[name], want)
