"""The TVM backend's CNN kernels beyond conv/dense: each one's own schedule, bit-exact with
the reference interpreter, and a build that reports the kernels left without one."""

from __future__ import annotations

import numpy as np
import pytest
from int_graphs import adversarial, int_input, qconv, requantized
from onnx import helper, numpy_helper
from onnx_models import conv_node, f32, make_model, quantized

import intq
from intq.backends import TARGETS
from intq.cli import main as cli

pytestmark = pytest.mark.skipif("tvm" not in TARGETS, reason="TVM is not installed")


def _upsampler(
    channels: int, outputs: int, k: int, stride: int, pad: int, output_padding: int, seed: int
) -> tuple[intq.ir.Graph, np.ndarray]:
    """A float ``ConvTranspose`` (one group, no dilation) with bias, then ReLU, on a 5x6
    image; and its input."""
    rng = np.random.default_rng(seed)
    g = intq.ir.Graph()
    x = g.add_input("x", intq.ir.TensorType(intq.ir.DType.F32, (1, channels, 5, 6)))
    w = g.add_constant(rng.standard_normal((channels, outputs, k, k)).astype(np.float32), "w")
    b = g.add_constant(rng.standard_normal(outputs).astype(np.float32), "b")
    y = g.op(
        "ConvTranspose",
        x,
        w,
        b,
        strides=(stride, stride),
        pads=(pad,) * 4,
        output_padding=(output_padding,) * 2,
        name="up",
    )
    g.set_outputs([g.op("Relu", y, name="relu")])
    return g, rng.standard_normal((1, channels, 5, 6)).astype(np.float32)


def _assert_exact(graph: intq.ir.Graph, exe, feeds: list[np.ndarray]) -> None:
    reference = intq.compile(graph, target="reference")
    for feed in feeds:
        want, got = reference.run({"x": feed}), exe.run({"x": feed})
        for name, array in want.items():
            np.testing.assert_array_equal(got[name], array, err_msg=name)


@pytest.mark.parametrize(
    ("channels", "outputs", "k", "stride", "pad", "output_padding"),
    [
        (8, 16, 2, 2, 0, 0),  # the decoders' upsampling: one tap per output and axis
        (4, 8, 3, 2, 1, 1),  # a tap count the stride does not divide: padded taps
        (3, 3, 4, 2, 1, 0),  # output channels no vector width divides
        (5, 5, 3, 1, 1, 0),  # stride 1: every tap
        (2, 1, 5, 3, 2, 2),  # a single output channel, stride 3
    ],
)
def test_conv_transpose_runs_its_own_nhwc_schedule_bit_exactly(
    channels, outputs, k, stride, pad, output_padding
):
    graph, x = _upsampler(channels, outputs, k, stride, pad, output_padding, seed=k + stride)
    int_graph = intq.quantize(graph, [{"x": x}], intq.QuantConfig(calibration="minmax"))
    exe = intq.compile(int_graph, target="tvm")
    kinds = {kind: applied for kind, applied in exe.schedules.values()}
    assert kinds.get("conv_transpose") == "conv_transpose", exe.schedules
    assert "generic" not in kinds  # the NCHW gather over every tap is not used
    assert not exe.fallbacks
    _assert_exact(int_graph, exe, [x, x * 3, *adversarial(x)])


def test_a_kernel_without_its_own_schedule_is_reported(monkeypatch, tmp_path, capsys):
    """A kernel whose schedule does not apply (here the dense one given to the transposed
    conv) runs on the plain elementwise schedule, still bit-exact, and says so: a warning at
    compile time, ``exe.fallbacks``, the saved manifest and ``intq bench --profile``."""
    from intq.backends import tvm_schedules
    from intq.backends.tvm import ScheduleFallbackWarning

    graph, x = _upsampler(8, 16, 2, 2, 0, 0, seed=0)
    int_graph = intq.quantize(graph, [{"x": x}], intq.QuantConfig(calibration="minmax"))
    monkeypatch.setitem(tvm_schedules.SCHEDULES, "conv_transpose", tvm_schedules.schedule_dense)
    with pytest.warns(ScheduleFallbackWarning, match="1 kernels without their own schedule"):
        exe = intq.compile(int_graph, target="tvm")
    ((name, (kind, applied)),) = exe.fallbacks.items()
    assert (kind, applied) == ("conv_transpose", "elementwise")
    assert name.startswith("qconvtranspose")
    _assert_exact(int_graph, exe, [x, *adversarial(x)])

    path = exe.save(tmp_path / "up.so")
    again = intq.load(path)
    assert again.fallbacks == exe.fallbacks
    assert cli(["bench", str(path), "--profile", "--repeat", "2", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "fallback: 1 kernels without their own schedule" in out
    assert "elementwise (fallback)" in out


def test_a_build_with_every_schedule_says_so_in_the_profile(tmp_path, capsys):
    graph, x = _upsampler(8, 16, 2, 2, 0, 0, seed=1)
    int_graph = intq.quantize(graph, [{"x": x}], intq.QuantConfig(calibration="minmax"))
    path = intq.compile(int_graph, target="tvm").save(tmp_path / "up.so")
    assert cli(["bench", str(path), "--profile", "--repeat", "2", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "ran its own schedule (no fallback)" in out and "(fallback)" not in out


def test_prelu_between_nhwc_convs_needs_no_transposes():
    """conv -> PRelu (a slope per channel) -> conv -> LeakyRelu, as in MTCNN: each ``QPRelu``
    runs on the convs' NHWC layout, its slopes along the stored channel axis, so the only
    layout changes are the graph input's and output's; bit-exact, every kernel on its own
    schedule."""
    rng = np.random.default_rng(3)
    c1, w1 = conv_node("c1", "x", 3, 8, rng)
    c2, w2 = conv_node("c2", "p", 8, 4, rng)
    slopes = np.asarray([0.25, -0.5, 0.0, 1.5, 0.1, 0.2, 0.3, 0.7], np.float32)
    slope = numpy_helper.from_array(slopes.reshape(8, 1, 1), "slope")
    nodes = [
        c1,
        helper.make_node("PRelu", ["c1", "slope"], ["p"]),
        c2,
        helper.make_node("LeakyRelu", ["c2"], ["y"], alpha=0.1),  # one slope, no axis
    ]
    shape = (1, 3, 6, 7)
    model = make_model(nodes, [f32("x", shape)], [f32("y", (1, 4, 6, 7))], [*w1, *w2, slope])
    graph, feeds = quantized(model, shape)
    assert [node.op for node in graph].count("QPRelu") == 2
    exe = intq.compile(graph, target="tvm")
    layouts = [name for name in exe.kernel_nodes if name.startswith("layout_")]
    assert len(layouts) == 2, layouts  # the input to NHWC, the output back
    assert not exe.fallbacks
    _assert_exact(graph, exe, feeds)


def test_squeeze_excitation_scales_the_nhwc_activation_in_place():
    """conv -> global average pool -> 1x1 conv -> HardSigmoid -> Mul by the conv's output
    -> conv (MobileNetV3's SE block): the broadcasting ``QMul`` of ``[N, C, 1, 1]`` by
    ``[N, C, H, W]`` runs NHWC like its inputs, so the only layout changes are the graph
    input's and output's; bit-exact, every kernel on its own schedule."""
    rng = np.random.default_rng(5)
    c1, w1 = conv_node("c1", "x", 3, 8, rng)
    squeeze = numpy_helper.from_array(
        (rng.standard_normal((8, 8, 1, 1)) * 0.3).astype(np.float32), "se.w"
    )
    c3, w3 = conv_node("c3", "scaled", 8, 4, rng)
    nodes = [
        c1,
        helper.make_node("GlobalAveragePool", ["c1"], ["pooled"]),
        helper.make_node("Conv", ["pooled", "se.w"], ["se"]),
        helper.make_node("HardSigmoid", ["se"], ["gate"], alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["c1", "gate"], ["scaled"]),
        c3,
    ]
    shape = (1, 3, 6, 7)
    model = make_model(nodes, [f32("x", shape)], [f32("c3", (1, 4, 6, 7))], [*w1, squeeze, *w3])
    graph, feeds = quantized(model, shape)
    assert "QMul" in [node.op for node in graph]
    exe = intq.compile(graph, target="tvm")
    layouts = [name for name in exe.kernel_nodes if name.startswith("layout_")]
    assert len(layouts) == 2, layouts
    assert not exe.fallbacks
    _assert_exact(graph, exe, feeds)


def test_a_table_lookup_is_one_kernel_on_the_stored_layout_over_every_code():
    """``QLookup`` of a graph input (int8 codes to uint8) and of an NHWC conv's requantized
    uint8 output (to int8): one kernel each, its node named (as Relax ops it was three
    kernels, a ``take`` among them, with int64 tensors between them), and every one of the
    256 codes of each table gives the reference's entry."""
    rng = np.random.default_rng(6)
    g = intq.ir.Graph()
    x = int_input(g, "x", (1, 4, 8, 8), True)
    codes = [
        dict(table=tuple(int(v) for v in rng.integers(0, 256, 256)), bits=8, signed=0),
        dict(table=tuple(int(v) for v in rng.integers(-128, 128, 256)), bits=8, signed=1),
    ]
    clamps = [dict(scale=0.1, lo=0, hi=255), dict(scale=0.1, lo=-128, hi=127)]
    direct = g.op("QLookup", x, **codes[0], **clamps[0])
    conv = requantized(g, qconv(g, rng, x, 16, 1, 1, 1, 0, True), 0.02, False)
    after_conv = g.op("QLookup", conv, **codes[1], **clamps[1])
    g.set_outputs([direct, after_conv])
    intq.ir.verify(g)
    exe = intq.compile(g, target="tvm")
    tables = [n.label() for n in g if n.op == "QLookup"]
    lookups = [nodes for name, nodes in exe.kernel_nodes.items() if name.startswith("qlookup")]
    assert sorted(lookups) == sorted([label] for label in tables)
    assert not any(name.startswith("take") for name in exe.schedules) and not exe.fallbacks
    every_code = np.arange(-128, 128, dtype=np.int8).reshape(1, 4, 8, 8)
    reference = intq.compile(g, target="reference")
    for feed in (every_code, every_code[..., ::-1]):
        want, got = reference.run({"x": feed}), exe.run({"x": feed})
        for name, array in want.items():
            assert got[name].dtype == array.dtype
            np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_channel_slices_and_nearest_upsampling_stay_nhwc():
    """conv -> a channel Slice (YOLO's C2f split) -> nearest 2x Resize (a Gather per spatial
    axis) -> conv, as an FPN neck: both run on the convs' NHWC layout, so the only layout
    changes are the graph input's and output's; bit-exact, every kernel on its own schedule."""
    rng = np.random.default_rng(7)
    c1, w1 = conv_node("c1", "x", 3, 8, rng)
    c2, w2 = conv_node("c2", "up", 4, 4, rng)
    consts = [
        numpy_helper.from_array(np.asarray(v, np.int64), n)
        for n, v in (("starts", [2]), ("ends", [6]), ("axes", [1]))
    ]
    scales = numpy_helper.from_array(np.asarray([1, 1, 2, 2], np.float32), "scales")
    nodes = [
        c1,
        helper.make_node("Slice", ["c1", "starts", "ends", "axes"], ["half"]),
        helper.make_node("Resize", ["half", "", "scales"], ["up"], mode="nearest"),
        c2,
    ]
    shape = (1, 3, 5, 6)
    model = make_model(
        nodes, [f32("x", shape)], [f32("c2", (1, 4, 10, 12))], [*w1, *w2, *consts, scales]
    )
    graph, feeds = quantized(model, shape)
    ops = [node.op for node in graph]
    assert "Slice" in ops and ops.count("Gather") == 2, ops
    exe = intq.compile(graph, target="tvm")
    layouts = [name for name in exe.kernel_nodes if name.startswith("layout_")]
    assert len(layouts) == 2, layouts
    assert not exe.fallbacks
    _assert_exact(graph, exe, feeds)
