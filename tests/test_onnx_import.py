"""The importer as a whole: constants folded by onnx's evaluator, one report of what is missing."""

from __future__ import annotations

import subprocess
import sys
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
    node = helper.make_node("Constant", [], ["c"], name="/sneaky", value=tensor)
    nodes = [node, helper.make_node("Add", ["x", "c"], ["y"], name="/add")]
    model = model_of(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    with pytest.raises(intq.ModelImportError, match="'/sneaky'.*external data"):
        intq.from_onnx(model)


# ----- one report of everything missing ------------------------------------------------------


def missing_ops_model() -> onnx.ModelProto:
    """Five Hardmax, one Sigmoid-free custom op and a Range on runtime values, around
    supported ops; the Range on constants folds and is not reported."""
    nodes = [helper.make_node("Relu", ["x"], ["h0"], name="/relu")]
    for i in range(5):
        nodes.append(helper.make_node("Hardmax", [f"h{i}"], [f"h{i + 1}"], name=f"/act{i}"))
    nodes += [
        helper.make_node("FusedGemm", ["h5", "h5"], ["g"], name="/fused", domain="com.microsoft"),
        helper.make_node("Range", ["zero", "four", "one"], ["r"], name="/const_range"),
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0, name="/max"),
        helper.make_node("Range", ["zero", "m", "onef"], ["rr"], name="/runtime_range"),
        helper.make_node("Add", ["g", "x"], ["y"], name="/add"),
    ]
    inits = [
        numpy_helper.from_array(np.array(v, np.float32), k)
        for k, v in [("zero", 0.0), ("four", 4.0), ("one", 1.0), ("onef", 1.0)]
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2]),
        helper.make_tensor_value_info("r", TensorProto.FLOAT, [4]),
        helper.make_tensor_value_info("rr", TensorProto.FLOAT, None),
    ]
    model = model_of(nodes, [x], outputs, inits, opset=17)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def test_every_missing_op_is_reported_at_once_with_its_nodes_and_count():
    with pytest.raises(intq.UnsupportedOpError) as info:
        intq.from_onnx(missing_ops_model())
    err = info.value
    assert err.node is None
    assert "3 ops are not supported, in 7 nodes" in err.message
    assert "Hardmax (opset 17) x5 ('/act0', '/act1', '/act2' and 2 more)" in err.message
    assert "FusedGemm from domain 'com.microsoft' x1 ('/fused')" in err.message
    assert "Range (opset 17) x1 ('/runtime_range')" in err.message
    assert "/const_range" not in err.message
    assert err.hint is not None and "ai.onnx" in err.hint and "Conv (1-22)" in err.hint


def test_inspect_prints_the_census_with_a_status_per_op(tmp_path):
    path = tmp_path / "missing.onnx"
    onnx.save(missing_ops_model(), path)
    done = subprocess.run(
        [sys.executable, "-m", "intq.cli", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[1:]}
    assert rows["Hardmax"] == ["5", "unsupported"]
    assert rows["FusedGemm"] == ["(com.microsoft)", "1", "unsupported"]
    assert rows["Range"] == ["2", "unsupported"]
    assert rows["Relu"] == ["1", "supported"]
    assert "3 ops are not supported" in done.stderr

    path = tmp_path / "folded.onnx"
    onnx.save(position_model(), path)
    done = subprocess.run(
        [sys.executable, "-m", "intq.cli", "inspect", str(path), "--input-shape", "x=2,6"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[1:9]}
    assert rows["Range"] == ["2", "folded"] and rows["Log"] == ["1", "folded"]
    assert rows["Reshape"] == ["1", "supported"]
    assert "graph g:" in done.stdout


def test_a_bicubic_resize_of_constant_position_embeddings_folds():
    """A feature a converter refuses (cubic Resize) is computed by onnx on constants."""
    table = np.random.default_rng(0).normal(size=(1, 4, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Resize", ["pos", "", "scales"], ["grid"], mode="cubic", name="/pos"),
        helper.make_node("Add", ["x", "grid"], ["y"], name="/add"),
    ]
    model = model_of(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [
            numpy_helper.from_array(table, "pos"),
            numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        ],
        opset=13,
    )
    graph = intq.from_onnx(model)
    assert [n.op for n in graph] == ["Add"]
    x = np.zeros((1, 4, 6, 6), np.float32)
    got = intq.compile(graph, target="reference").run({"x": x})["y"]
    np.testing.assert_allclose(got, run_ort(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)
