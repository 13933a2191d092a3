"""Real models import, run in the reference interpreter as in ONNX Runtime, round-trip as text."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ALL_MODEL_FIXTURES

import intq
from examples.zoo import ZooModel, run_onnxruntime
from intq.ir import from_text, to_text, verify
from intq.passes import pipeline


def assert_close_to_range(got: np.ndarray, want: np.ndarray, tolerance: float = 1e-4) -> None:
    """Max abs error <= tolerance * the output's range (the issue's criterion)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = max(float(np.ptp(want)), 1e-6)
    error = float(np.abs(got.astype(np.float64) - want).max())
    assert error <= tolerance * scale, (
        f"max abs error {error:.3g} > {tolerance} x range {scale:.3g}"
    )


@pytest.mark.parametrize("fixture", ALL_MODEL_FIXTURES)
def test_reference_matches_onnxruntime(fixture, request):
    model: ZooModel = request.getfixturevalue(fixture)
    graph = intq.from_onnx(model.path)
    verify(graph)
    got = intq.compile(graph, target="reference").run(model.inputs)
    want = run_onnxruntime(model)
    assert set(got) == set(want)
    for name in want:
        assert_close_to_range(got[name], want[name])


@pytest.mark.parametrize("fixture", ALL_MODEL_FIXTURES)
def test_text_roundtrip_is_identity(fixture, request):
    model: ZooModel = request.getfixturevalue(fixture)
    graph = intq.from_onnx(model.path)
    text = to_text(graph)
    parsed = from_text(text)
    verify(parsed)
    assert to_text(parsed) == text


@pytest.mark.parametrize("fixture", ["efficientnet_model", "resnet18_model", "digits_model"])
def test_batchnorm_folding_keeps_cnn_outputs(fixture, request):
    model: ZooModel = request.getfixturevalue(fixture)
    graph = intq.from_onnx(model.path)
    before = intq.compile(graph.copy()).run(model.inputs)
    pipeline("fold-batchnorm,fold-constants,dce", verify_each=True)(graph)
    assert not any(node.op == "BatchNormalization" for node in graph)
    after = intq.compile(graph).run(model.inputs)
    for name in before:
        assert_close_to_range(after[name], before[name])


def test_node_names_come_from_onnx(resnet18_model):
    graph = intq.from_onnx(resnet18_model.path)
    names = {node.name for node in graph if node.op == "Conv"}
    assert any(name.startswith("/layer") for name in names), sorted(names)[:5]


def test_minilm_shape_chains_fold_to_static_graph(minilm_model):
    graph = intq.from_onnx(minilm_model.path)
    ops = {node.op for node in graph}
    assert "Shape" not in ops and "ConstantOfShape" not in ops
    assert {"MatMul", "Softmax", "Gather"} <= ops
    assert [v.name for v in graph.inputs] == ["input_ids", "attention_mask"]


def test_input_shapes_override(digits_model):
    graph = intq.from_onnx(digits_model.path, input_shapes={"input": (3, 1, 8, 8)})
    assert graph.inputs[0].type.shape == (3, 1, 8, 8)
    x = digits_model.inputs["input"][:3]
    full = intq.compile(intq.from_onnx(digits_model.path)).run(digits_model.inputs)
    part = intq.compile(graph).run({"input": x})
    name = graph.outputs[0].name
    np.testing.assert_allclose(part[name], full[name][:3], rtol=1e-5, atol=1e-5)
