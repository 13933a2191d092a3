"""Learned rounding: integer weights chosen to reproduce each layer's float outputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from onnx_models import bit_exact, conv_node, f32, make_model

import intq
from intq.config import load_config
from intq.errors import IntqError
from intq.inspection import layer_sqnr, layer_table, rounding_labels
from intq.ir import DType, Graph, TensorType
from intq.passes import Calibrate, Integerize, PassManager
from intq.passes.learned_rounding import (
    PATCHES,
    InputGrams,
    LearnedRounding,
    RoundedWeights,
    channel_steps,
    reconstruct,
)
from intq.semantics.numpy_eval import evaluate, run_graph


@pytest.mark.parametrize(
    ("group", "stride", "dilation", "pads"),
    [
        (1, 1, 1, (1, 1, 1, 1)),
        (2, 2, 1, (0, 1, 2, 0)),
        (4, 1, 2, (2, 2, 2, 2)),
        (8, 2, 1, (1,) * 4),
    ],
)
def test_conv_rows_times_the_weight_matrix_are_the_conv(group, stride, dilation, pads):
    """The rows and the weight matrix multiply to the convolution: padding, strides,
    dilation and groups (depthwise included) in the same column order."""
    rng = np.random.default_rng(0)
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (2, 8, 7, 6)))
    w = g.add_constant(rng.normal(size=(8, 8 // group, 3, 3)).astype(np.float32), "w")
    attrs = {"group": group, "strides": (stride,) * 2, "dilations": (dilation,) * 2, "pads": pads}
    conv = g.add("Conv", [x, w], attrs, name="conv")
    data = rng.normal(size=(2, 8, 7, 6)).astype(np.float32)
    rule = PATCHES["Conv"]
    rows = rule.rows(conv, data).astype(np.float64)
    matrix = rule.matrix(conv, w.const.astype(np.float64))
    out = conv.output.type.shape
    got = np.matmul(rows, matrix.transpose(0, 2, 1))  # (G, N * positions, Cout / G)
    want = evaluate(conv, [data.astype(np.float64), w.const.astype(np.float64)])[0]
    want = want.reshape(2, group, 8 // group, -1).transpose(1, 0, 3, 2).reshape(got.shape)
    assert out[1] == 8
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rule.weight(conv, matrix), w.const)


@pytest.mark.parametrize("op", ["Gemm", "GemmT", "MatMul"])
def test_dense_rows_times_the_weight_matrix_are_the_product(op):
    rng = np.random.default_rng(1)
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (5, 3)))
    shape = (4, 3) if op == "GemmT" else (3, 4)
    w = g.add_constant(rng.normal(size=shape).astype(np.float32), "w")
    attrs = {"transB": int(op == "GemmT")} if op != "MatMul" else {}
    node = g.add(op[:4] if op != "MatMul" else op, [x, w], attrs, name="dense")
    data = rng.normal(size=(5, 3)).astype(np.float32)
    rule = PATCHES[node.op]
    matrix = rule.matrix(node, w.const)
    np.testing.assert_allclose(
        rule.rows(node, data)[0] @ matrix[0].T,
        data @ (w.const.T if op == "GemmT" else w.const),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(rule.weight(node, matrix), w.const)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(1, 40),
    st.sampled_from([2, 4, 8]),
    st.integers(0, 2**32 - 1),
)
def test_reconstruct_with_uncorrelated_inputs_is_nearest_rounding(groups, rows, size, bits, seed):
    """With a diagonal H an input's rounding error cannot be compensated on the others: the
    result is exactly round-to-nearest, clamped to the symmetric range."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(groups, rows, size)) * rng.uniform(0.1, 3)
    h = np.zeros((groups, size, size))
    h[:, np.arange(size), np.arange(size)] = rng.uniform(0.5, 4, size=(groups, size))
    qmax = (1 << (bits - 1)) - 1
    steps = np.abs(w).max(axis=-1) * rng.uniform(0.5, 1.0) / qmax
    q = reconstruct(w, h, steps, qmax)
    np.testing.assert_array_equal(q, np.clip(np.rint(w / steps[..., None]), -qmax, qmax))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 30), st.sampled_from([2, 3, 4, 8]), st.integers(0, 2**32 - 1))
def test_reconstruct_beats_nearest_on_correlated_inputs(size, bits, seed):
    """On inputs with correlated rows, the output error of the reconstructed integers is
    never above nearest rounding's at the same steps (by more than float noise), and every
    integer is inside the symmetric range."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, size)) @ rng.normal(size=(size, size))
    h = (x.T @ x)[None]
    w = rng.normal(size=(1, 5, size))
    qmax = (1 << (bits - 1)) - 1
    steps = np.abs(w).max(axis=-1) / qmax
    q = reconstruct(w, h, steps, qmax)
    assert np.all(np.abs(q) <= qmax) and np.all(q == np.rint(q))
    nearest = np.clip(np.rint(w / steps[..., None]), -qmax, qmax)

    def error(ints: np.ndarray) -> float:
        d = ints * steps[..., None] - w
        return float(np.einsum("gck,gkl,gcl->", d, h, d))

    assert error(q) <= error(nearest) * 1.0001 + 1e-9


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 50), st.sampled_from([2, 4, 8]), st.integers(0, 2**32 - 1))
def test_channel_steps_never_err_more_than_the_largest_magnitude(size, bits, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, size=(2, 3, size))
    diag = rng.uniform(0.1, 2, size=(2, size))
    qmax = (1 << (bits - 1)) - 1
    steps = channel_steps(w, diag, qmax)

    def error(step: np.ndarray) -> np.ndarray:
        q = np.clip(np.rint(w / step[..., None]), -qmax, qmax) * step[..., None]
        return ((q - w) ** 2 * diag[:, None]).sum(-1)

    assert np.all(error(steps) <= error(np.abs(w).max(axis=-1) / qmax) + 1e-12)


def correlated_convs() -> tuple:
    """Two 3x3 convs over smooth (strongly correlated) images, where rounding errors of
    neighbouring taps can cancel."""
    rng = np.random.default_rng(3)
    c1, w1 = conv_node("c1", "x", 3, 16, rng)
    c2, w2 = conv_node("c2", "r", 16, 8, rng)
    relu = helper.make_node("Relu", ["c1"], ["r"])
    model = make_model([c1, relu, c2], [f32("x", (1, 3, 10, 10))], [f32("c2", (1, 8, 10, 10))])
    model.graph.initializer.extend([*w1, *w2])

    def image() -> np.ndarray:
        coarse = rng.normal(size=(1, 3, 4, 4))
        return np.kron(coarse, np.ones((1, 1, 3, 3)))[:, :, :10, :10].astype(np.float32)

    return model, [{"x": image()} for _ in range(24)]


def test_learned_rounding_brings_4_bit_outputs_closer_and_stays_bit_exact():
    model, batches = correlated_convs()
    graph = intq.from_onnx(model)
    train, held_out = batches[:16], batches[16:]

    def error(rounding: str) -> tuple[float, intq.ir.Graph]:
        config = intq.QuantConfig(
            weight_bits=4, calibration="minmax", rounding=rounding, progress=False
        )
        quantized = intq.quantize(graph, train, config)
        diffs = [run_graph(quantized, b)["c2"] - run_graph(graph, b)["c2"] for b in held_out]
        return float(np.mean(np.square(diffs))), quantized

    nearest, _ = error("nearest")
    learned, graph_learned = error("auto")  # the default learns layers under 8 bits
    assert learned < 0.7 * nearest
    bit_exact(graph_learned, [b["x"] for b in held_out[:2]])


def test_the_layer_tables_show_the_weights_sqnr_before_and_after():
    model, batches = correlated_convs()
    graph = intq.from_onnx(model)
    config = intq.QuantConfig(weight_bits=4, calibration="minmax", progress=False)
    quantized = intq.quantize(graph, batches[:8], config)
    labels = rounding_labels(quantized)
    assert sorted(labels) == ["Conv_0", "Conv_2"]
    for text in labels.values():
        before, after = (float(part.split()[0]) for part in text.split(" -> "))
        assert after >= before
    rows = layer_sqnr(graph, quantized, batches[:2], progress=False)
    shown = [r["rounding"] for r in rows if r["layer"] in labels]
    assert shown and shown == [labels[r["layer"]] for r in rows if r["layer"] in labels]
    table = {r["layer"]: r for r in layer_table(quantized)}
    assert table["Conv_0"]["rounding"] == labels["Conv_0"]


def test_eight_bit_layers_round_to_nearest_by_default():
    model, batches = correlated_convs()
    graph = intq.from_onnx(model)
    lowering = intq.QuantConfig().lowering()
    assert lowering.rounding == "auto" and not lowering.learns("Conv_0")
    default = intq.quantize(graph, batches, intq.QuantConfig(progress=False))
    nearest = intq.quantize(graph, batches, intq.QuantConfig(rounding="nearest", progress=False))
    for a, b in zip(default.constants, nearest.constants):
        np.testing.assert_array_equal(a.const, b.const)
    learned = intq.quantize(
        graph, batches[:8], intq.QuantConfig(rounding="learned", progress=False)
    )
    assert any(
        not np.array_equal(a.const, b.const) for a, b in zip(learned.constants, nearest.constants)
    )


def test_the_passes_store_grams_and_rounded_weights_for_learned_layers_only():
    model, batches = correlated_convs()
    graph = intq.from_onnx(model)
    lowering = Integerize(
        weight_bits=8, layer_bits={"Conv_2": intq.LayerBits(4, 8)}, rounding="auto"
    )
    PassManager([Calibrate(batches, False, learns=lowering.learns)])(graph)
    grams = graph.analysis(InputGrams)
    assert grams is not None and [v.name for v in grams] == ["c2"]  # the output of Conv_2
    (entry,) = grams.values()
    gram = entry.matrix
    assert gram.shape == (1, 16 * 9, 16 * 9) and entry.rows == 24 * 10 * 10
    np.testing.assert_allclose(gram[0], gram[0].T)
    PassManager([LearnedRounding(lowering, False)])(graph)
    rounded = graph.analysis(RoundedWeights)
    assert rounded is not None and [v.name for v in rounded] == ["c2.w"]
    (entry,) = rounded.values()
    assert entry.learned_error <= entry.nearest_error
    assert np.abs(entry.q).max() <= 7


def test_learned_rounding_needs_the_grams():
    model, _ = correlated_convs()
    graph = intq.from_onnx(model)
    with pytest.raises(intq.PassError, match="Gram matrices"):
        PassManager([LearnedRounding(Integerize(), False)])(graph)


def test_rounding_is_checked_in_python_toml_and_cli(tmp_path, capsys):
    with pytest.raises(IntqError, match="unknown rounding 'up'") as err:
        intq.QuantConfig(rounding="up")
    assert "auto, nearest, learned" in (err.value.hint or "")
    path = tmp_path / "cfg.toml"
    path.write_text('rounding = "learned"\n')
    assert load_config(path).rounding == "learned"
    path.write_text('rounding = "sideways"\n')
    with pytest.raises(IntqError, match="rounding"):
        load_config(path)
    from intq.cli import main

    with pytest.raises(SystemExit):
        main(["quantize", "m.onnx", "--rounding", "sideways", "-o", str(tmp_path / "m.intq")])
    assert "invalid choice" in capsys.readouterr().err
