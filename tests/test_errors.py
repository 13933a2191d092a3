"""Bad input gets intq's own error, naming the node or input, and saying what to do."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import f32, make_model

import intq
from intq.ir import from_text


def linear_model() -> onnx.ModelProto:
    """y = x @ w + b, with w and b initializers."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")
    b = numpy_helper.from_array(np.ones(3, np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"], name="/fc/MatMul"),
        helper.make_node("Add", ["xw", "b"], ["y"], name="/fc/Add"),
    ]
    return make_model(nodes, [f32("x", [2, 4])], [f32("y", [2, 3])], [w, b])


# ----- unreadable files ----------------------------------------------------------------------


def test_truncated_file(tmp_path):
    path = tmp_path / "model.onnx"
    data = linear_model().SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(intq.ModelImportError, match="not a valid ONNX file.*truncated"):
        intq.from_onnx(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00\xff this is not protobuf \xff" * 10)
    with pytest.raises(intq.ModelImportError):
        intq.from_onnx(path)


def test_missing_file(tmp_path):
    with pytest.raises(intq.ModelImportError, match="no model file"):
        intq.from_onnx(tmp_path / "nope.onnx")


# ----- unsupported content --------------------------------------------------------------------


def test_unsupported_op_names_node_opset_and_lists_supported_ops():
    nodes = [helper.make_node("Det", ["x"], ["y"], name="/blocks.3/head/Det")]
    model = make_model(nodes, [f32("x", [2, 4, 4])], [f32("y", [2])])
    with pytest.raises(intq.UnsupportedOpError) as info:
        intq.from_onnx(model)
    text = str(info.value)
    assert "/blocks.3/head/Det" in text and "Det (opset 17)" in text
    assert "Conv (1-" in text and "Softmax" in text
    assert info.value.node == "/blocks.3/head/Det"


def test_custom_domain_is_refused():
    node = helper.make_node("FusedGemm", ["x", "x"], ["y"], name="fused", domain="com.microsoft")
    model = make_model([node], [f32("x", [2, 2])], [f32("y", [2, 2])])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(intq.UnsupportedOpError, match="node 'fused'.*com.microsoft"):
        intq.from_onnx(model)


def test_too_new_opset():
    with pytest.raises(intq.UnsupportedOpError, match="opset 99"):
        intq.from_onnx(make_model([], [f32("x", [1])], [f32("x", [1])], opset=99))


# ----- malformed graphs ----------------------------------------------------------------------


def test_cycle_is_refused():
    nodes = [
        helper.make_node("Relu", ["b"], ["a"], name="first"),
        helper.make_node("Relu", ["a"], ["b"], name="second"),
    ]
    model = make_model(nodes, [f32("x", [2])], [f32("a", [2])])
    with pytest.raises(intq.ModelImportError, match="cycle"):
        intq.from_onnx(model)


def test_tensor_produced_twice():
    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="one"),
        helper.make_node("Neg", ["x"], ["y"], name="two"),
    ]
    with pytest.raises(intq.ModelImportError, match="node 'two'.*also an output of node 'one'"):
        intq.from_onnx(make_model(nodes, [f32("x", [2])], [f32("y", [2])]))


def test_undefined_input_names_the_node():
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="adder")]
    with pytest.raises(intq.ModelImportError, match="node 'adder'.*'ghost' is not defined"):
        intq.from_onnx(make_model(nodes, [f32("x", [2])], [f32("y", [2])]))


def test_shape_mismatch_names_the_node():
    w = numpy_helper.from_array(np.ones((5, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="/head/MatMul")]
    model = make_model(nodes, [f32("x", [2, 4])], [f32("y", [2, 3])], [w])
    with pytest.raises(intq.ShapeError, match="node '/head/MatMul'.*inner dimensions differ"):
        intq.from_onnx(model)


def test_symbolic_input_needs_input_shapes():
    model = linear_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(intq.ShapeError, match="symbolic dimensions.*batch") as info:
        intq.from_onnx(model)
    assert "input_shapes" in str(info.value)
    graph = intq.from_onnx(model, input_shapes={"x": (5, 4)})
    assert graph.outputs[0].type.shape == (5, 3)
    with pytest.raises(intq.ShapeError, match="unknown inputs \\['y'\\]"):
        intq.from_onnx(model, input_shapes={"y": (1, 4)})


def test_runtime_shape_computation_is_refused():
    nodes = [helper.make_node("Reshape", ["x", "s"], ["y"], name="/view")]
    inputs = [f32("x", [2, 4]), helper.make_tensor_value_info("s", TensorProto.INT64, [2])]
    with pytest.raises(intq.ShapeError, match="node '/view'.*computed at run time"):
        intq.from_onnx(make_model(nodes, inputs, [f32("y", [4, 2])]))


# ----- external data ---------------------------------------------------------------------------


def save_with_external(model: onnx.ModelProto, directory: Path) -> Path:
    path = directory / "model.onnx"
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    return path


def test_external_data_inside_the_directory_loads(tmp_path):
    path = save_with_external(linear_model(), tmp_path)
    graph = intq.from_onnx(path)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    y = intq.compile(graph).run({"x": x})["y"]
    np.testing.assert_allclose(y, x @ np.arange(12, dtype=np.float32).reshape(4, 3) + 1)


def redirect_external(path: Path, location: str) -> None:
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, path)


def test_external_data_escaping_the_directory_is_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = save_with_external(linear_model(), model_dir)
    redirect_external(path, "../secret.bin")
    with pytest.raises(intq.ModelImportError, match="outside the model's directory"):
        intq.from_onnx(path)
    redirect_external(path, str(tmp_path / "secret.bin"))
    with pytest.raises(intq.ModelImportError, match="outside the model's directory"):
        intq.from_onnx(path)


def test_external_data_symlink_escaping_is_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = save_with_external(linear_model(), model_dir)
    (model_dir / "link.bin").symlink_to(tmp_path / "secret.bin")
    redirect_external(path, "link.bin")
    with pytest.raises(intq.ModelImportError, match="outside the model's directory"):
        intq.from_onnx(path)


def test_external_data_longer_than_the_file_is_refused(tmp_path):
    path = save_with_external(linear_model(), tmp_path)
    weights = tmp_path / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:10])
    with pytest.raises(intq.ModelImportError, match="byte file"):
        intq.from_onnx(path)


# ----- run time -------------------------------------------------------------------------------


@pytest.fixture
def linear_exe():
    return intq.compile(intq.from_onnx(linear_model()))


def test_wrong_input_shape_at_run_time(linear_exe):
    with pytest.raises(intq.ShapeError, match="input 'x' has shape \\[3, 4\\].*expects \\[2, 4\\]"):
        linear_exe.run({"x": np.zeros((3, 4), np.float32)})


def test_missing_and_unknown_inputs(linear_exe):
    with pytest.raises(intq.ShapeError, match="missing inputs \\['x'\\].*unknown inputs \\['z'\\]"):
        linear_exe.run({"z": np.zeros((2, 4), np.float32)})


def test_input_dtypes(linear_exe):
    # float64 (numpy's default) converts to the model's float32 ...
    y64 = linear_exe.run({"x": np.ones((2, 4))})["y"]
    assert y64.dtype == np.float32
    # ... but integers for a float input are refused.
    with pytest.raises(intq.ShapeError, match="dtype int64.*expects float32"):
        linear_exe.run({"x": np.ones((2, 4), np.int64)})


# ----- artifacts -------------------------------------------------------------------------------


def test_reference_artifact_saves_atomically_and_reloads(tmp_path, linear_exe):
    path = linear_exe.save(tmp_path / "out" / "model.intq")
    assert path.exists()
    assert os.listdir(path.parent) == ["model.intq"]  # no temporary file left behind
    graph = from_text(path.read_text())
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(
        intq.compile(graph).run({"x": x})["y"], linear_exe.run({"x": x})["y"]
    )


def test_unwritable_artifact_path(tmp_path, linear_exe):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(intq.ArtifactError, match="cannot write"):
        linear_exe.save(blocker / "model.intq")


def test_unknown_target():
    graph = intq.from_onnx(linear_model())
    with pytest.raises(intq.IntqError, match="(?s)unknown target 'fpga'.*reference"):
        intq.compile(graph, target="fpga")
