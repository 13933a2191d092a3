"""Sanity checks for the test-side model zoo: every model runs in onnxruntime as exported."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ALL_MODEL_FIXTURES

from examples.zoo import (
    IR_VERSION,
    OPSET,
    ZooModel,
    digits_accuracy,
    digits_labels,
    run_onnxruntime,
)

EXPECTED_OUTPUTS: dict[str, dict[str, tuple[int, ...]]] = {
    "minilm_model": {"last_hidden_state": (2, 16, 384)},
    "efficientnet_model": {"logits": (1, 1000)},
    "resnet18_model": {"logits": (1, 1000)},
    "digits_model": {"logits": (8, 10)},
}

EXPECTED_INPUTS: dict[str, dict[str, tuple[tuple[int, ...], type]]] = {
    "minilm_model": {"input_ids": ((2, 16), np.int64), "attention_mask": ((2, 16), np.int64)},
    "efficientnet_model": {"input": ((1, 3, 224, 224), np.float32)},
    "resnet18_model": {"input": ((1, 3, 112, 112), np.float32)},
    "digits_model": {"input": ((8, 1, 8, 8), np.float32)},
}


@pytest.mark.parametrize("fixture", ALL_MODEL_FIXTURES)
def test_zoo_model_runs_in_onnxruntime(fixture: str, request: pytest.FixtureRequest) -> None:
    model: ZooModel = request.getfixturevalue(fixture)
    assert model.path.is_file()
    assert {k: (v.shape, v.dtype.type) for k, v in model.inputs.items()} == EXPECTED_INPUTS[fixture]

    outs = run_onnxruntime(model)
    assert {k: v.shape for k, v in outs.items()} == EXPECTED_OUTPUTS[fixture]
    for name, value in outs.items():
        assert np.isfinite(value).all(), name
        # A constant output would mean the sample input is not exercising the network.
        assert value.std() > 1e-3, name


@pytest.mark.parametrize("fixture", ALL_MODEL_FIXTURES)
def test_zoo_model_is_static_and_self_contained(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    model: ZooModel = request.getfixturevalue(fixture)
    proto = onnx.load(str(model.path), load_external_data=False)
    assert proto.ir_version == IR_VERSION
    assert {(o.domain or "ai.onnx", o.version) for o in proto.opset_import} == {("ai.onnx", OPSET)}
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    # Inputs are static; the exporter may declare output dims symbolic (intq infers them).
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), value.name


def test_digits_model_is_accurate(digits_model: ZooModel) -> None:
    assert digits_accuracy(digits_model) > 0.9
    logits = run_onnxruntime(digits_model)["logits"]
    # The 8 held-out samples are part of a >90% test set: allow at most one miss.
    assert (logits.argmax(1) == digits_labels(digits_model)).sum() >= 7


def test_efficientnet_recognises_the_photo(efficientnet_model: ZooModel) -> None:
    # china.jpg is a Chinese temple: ImageNet 698 "palace" or 442 "bell cote" in the top 3
    # shows the weights and the (x-127)/128 preprocessing are wired correctly.
    logits = run_onnxruntime(efficientnet_model)["logits"][0]
    assert {698, 442} & set(np.argsort(logits)[-3:].tolist())


def test_minilm_padding_is_masked(minilm_model: ZooModel) -> None:
    # Real sentences padded to 16 tokens: both rows must contain padding, so the mask matters.
    mask = minilm_model.inputs["attention_mask"]
    assert (mask == 0).any(axis=1).all()
    assert (minilm_model.inputs["input_ids"][mask == 0] == 0).all()
