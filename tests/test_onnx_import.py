"""The importer as a whole: constants folded by onnx's evaluator, one report of what is missing."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import IR_VERSION

import intq


def model_of(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_VERSION
    return model


def i64(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.int64), name)


def run_ort(model: onnx.ModelProto, feeds: dict) -> dict:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


# ----- constants folded with onnx's evaluator ---------------------------------------------


def position_model() -> onnx.ModelProto:
    """Range/Mod/Log on shape-derived constants, feeding a Reshape and an Add."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="/shape"),
        helper.make_node("Gather", ["shape", "one"], ["n"], name="/n"),
        helper.make_node("Range", ["zero", "n", "one"], ["positions"], name="/positions/Range"),
        helper.make_node("Mod", ["positions", "three"], ["phase"], name="/phase/Mod"),
        helper.make_node("Cast", ["phase"], ["phase_f"], to=TensorProto.FLOAT, name="/cast"),
        helper.make_node("Add", ["phase_f", "onef"], ["phase_1"], name="/plus_one"),
        helper.make_node("Log", ["phase_1"], ["bias"], name="/bias/Log"),
        helper.make_node("Add", ["x", "bias"], ["biased"], name="/add"),
        helper.make_node("Gather", ["shape", "zeros1"], ["batch"], name="/batch"),
        helper.make_node("Range", ["two", "four", "onei"], ["tail"], name="/tail/Range"),
        helper.make_node("Mod", ["tail", "five"], ["tail5"], name="/tail/Mod"),
        helper.make_node("Concat", ["batch", "tail5"], ["target"], axis=0, name="/target"),
        helper.make_node("Reshape", ["biased", "target"], ["y"], name="/reshape"),
    ]
    inits = [
        i64("zero", 0),
        i64("one", 1),
        i64("onei", 1),
        i64("three", 3),
        i64("two", 2),
        i64("four", 4),
        i64("five", 5),
        i64("zeros1", [0]),
        numpy_helper.from_array(np.array(1.0, np.float32), "onef"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return model_of(nodes, [x], [y], inits)


def test_constant_range_mod_log_fold_and_match_onnxruntime():
    model = position_model()
    graph = intq.from_onnx(model, input_shapes={"x": (2, 6)})
    assert {n.op for n in graph} <= {"Add", "Reshape", "Identity"}
    x = np.random.default_rng(0).normal(size=(2, 6)).astype(np.float32)
    got = intq.compile(graph, target="reference").run({"x": x})["y"]
    want = run_ort(model, {"x": x})["y"]
    assert got.shape == want.shape == (2, 2, 3)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_folded_output_over_the_size_limit_is_refused_before_it_is_built():
    nodes = [helper.make_node("Range", ["a", "b", "c"], ["r"], name="/huge/Range")]
    nodes.append(helper.make_node("Reshape", ["x", "r"], ["y"], name="/use"))
    model = model_of(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [i64("a", 0), i64("b", 10**12), i64("c", 1)],
    )
    tracemalloc.start()
    try:
        with pytest.raises(intq.ShapeError, match="'/huge/Range'.*more than intq's limit"):
            intq.from_onnx(model)
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()


def test_evaluator_errors_name_the_node():
    nodes = [helper.make_node("Range", ["a", "b", "c"], ["r"], name="/zero_step/Range")]
    nodes.append(helper.make_node("Reshape", ["x", "r"], ["y"], name="/use"))
    model = model_of(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [i64("a", 0), i64("b", 4), i64("c", 0)],
    )
    with pytest.raises(intq.ModelImportError, match="'/zero_step/Range'"):
        intq.from_onnx(model)


def test_random_ops_are_never_folded():
    nodes = [
        helper.make_node("RandomNormal", [], ["noise"], shape=[2], name="/noise"),
        helper.make_node("Add", ["x", "noise"], ["y"], name="/add"),
    ]
    model = model_of(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    with pytest.raises(intq.UnsupportedOpError, match="RandomNormal"):
        intq.from_onnx(model)


def test_a_tensor_attribute_with_external_data_is_refused():
    tensor = numpy_helper.from_array(np.zeros(3, np.float32), "t")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    tensor.ClearField("raw_data")
    node = helper.make_node("Unknown_like", [], ["c"], name="/sneaky")
    node.op_type = "EyeLike"  # any op without a converter, given a tensor attribute
    node.attribute.append(helper.make_attribute("value", tensor))
    nodes = [node, helper.make_node("Add", ["x", "c"], ["y"], name="/add")]
    model = model_of(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    with pytest.raises(intq.ModelImportError, match="'/sneaky'.*external data"):
        intq.from_onnx(model)
