"""Resource limits: huge or missing tensors are refused from their declared shape, before
anything is allocated (peak traced memory stays small), with an error naming the tensor."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import f32, make_model

import intq
from intq.frontends.onnx_context import MAX_TENSOR_BYTES

GIB = 1 << 30
SMALL = 64 << 20
"""Peak traced allocation allowed while refusing a model (the models themselves are tiny)."""


def refused(
    action: Callable[[], object], error: type[intq.IntqError], match: str
) -> intq.IntqError:
    """``action`` raises ``error`` matching ``match`` while allocating less than ``SMALL``."""
    tracemalloc.start()
    try:
        with pytest.raises(error, match=match) as info:
            action()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < SMALL, f"allocated {peak} bytes before refusing"
    return info.value


def add_of(initializer: TensorProto, shape) -> onnx.ModelProto:
    """y = x + initializer."""
    node = helper.make_node("Add", ["x", initializer.name], ["y"], name="/add")
    return make_model([node], [f32("x", shape)], [f32("y", shape)], [initializer])


def declared(name: str, dims, raw: bytes = b"", floats=None) -> TensorProto:
    """A float initializer declaring ``dims`` but holding only ``raw`` / ``floats``."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims))
    if floats is not None:
        tensor.float_data.extend(floats)
    else:
        tensor.raw_data = raw
    return tensor


def test_the_limit_is_far_below_a_trillion_elements():
    assert 10**12 * 4 > MAX_TENSOR_BYTES >= GIB


def test_initializer_of_a_trillion_elements(tmp_path):
    model = add_of(declared("w", [10**6, 10**6], raw=b"\0" * 16), [10**6, 10**6])
    err = refused(lambda: intq.from_onnx(model), intq.ShapeError, "initializer 'w'.*limit")
    assert "[1000000, 1000000]" in err.message


def test_one_gib_initializer_whose_raw_data_is_missing():
    model = add_of(declared("w", [256, 1024, 1024], raw=b"\0" * 100), [256, 1024, 1024])
    refused(
        lambda: intq.from_onnx(model),
        intq.ModelImportError,
        "initializer 'w'.*needs 1073741824 bytes of data, the file holds 100",
    )


def test_one_gib_initializer_whose_typed_data_is_missing():
    model = add_of(declared("w", [256, 1024, 1024], floats=[1.0, 2.0]), [256, 1024, 1024])
    refused(lambda: intq.from_onnx(model), intq.ModelImportError, "needs 268435456 values")


def test_negative_dims_are_refused():
    model = add_of(declared("w", [-1, 4], raw=b""), [2, 4])
    refused(lambda: intq.from_onnx(model), intq.ModelImportError, "negative dimensions")


def _external(tmp_path, dims, offset: str, length: str | None) -> onnx.ModelProto:
    (tmp_path / "w.bin").write_bytes(np.arange(16, dtype=np.float32).tobytes())
    tensor = declared("w", dims)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = [("location", "w.bin"), ("offset", offset)]
    if length is not None:
        entries.append(("length", length))
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return add_of(tensor, dims)


def test_one_gib_external_initializer_beyond_the_file(tmp_path):
    model = _external(tmp_path, [256, 1024, 1024], "0", None)
    onnx.save(model, tmp_path / "m.onnx")
    refused(
        lambda: intq.from_onnx(tmp_path / "m.onnx"),
        intq.ModelImportError,
        "1073741824 bytes at offset 0 of a 64-byte file",
    )


def test_external_offset_beyond_the_file(tmp_path):
    model = _external(tmp_path, [4], str(2**40), "16")
    onnx.save(model, tmp_path / "m.onnx")
    refused(lambda: intq.from_onnx(tmp_path / "m.onnx"), intq.ModelImportError, "64-byte file")


def test_external_data_within_the_file_is_read(tmp_path):
    model = _external(tmp_path, [4], "16", "16")
    onnx.save(model, tmp_path / "m.onnx")
    graph = intq.from_onnx(tmp_path / "m.onnx")
    out = intq.compile(graph).run({"x": np.zeros(4, np.float32)})
    assert out["y"].tolist() == [4.0, 5.0, 6.0, 7.0]


def test_external_trillion_element_initializer(tmp_path):
    model = _external(tmp_path, [10**6, 10**6], "0", str(4 * 10**12))
    onnx.save(model, tmp_path / "m.onnx")
    refused(lambda: intq.from_onnx(tmp_path / "m.onnx"), intq.ShapeError, "limit")


def test_graph_input_of_a_trillion_elements():
    node = helper.make_node("Relu", ["x"], ["y"], name="/relu")
    model = make_model([node], [f32("x", [10**6, 10**6])], [f32("y", [10**6, 10**6])])
    refused(lambda: intq.from_onnx(model), intq.ShapeError, "input 'x'.*limit")


def test_expand_of_a_constant_to_a_huge_shape():
    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    shape = numpy_helper.from_array(np.array([10**6, 10**6], np.int64), "shape")
    node = helper.make_node("Expand", ["one", "shape"], ["y"], name="/expand")
    model = make_model([node], [], [f32("y", None)], [one, shape])
    err = refused(lambda: intq.from_onnx(model), intq.ShapeError, "output of Expand.*limit")
    assert err.node == "/expand"


def test_constant_of_shape_to_a_huge_shape():
    shape = numpy_helper.from_array(np.array([10**6, 10**6], np.int64), "shape")
    node = helper.make_node("ConstantOfShape", ["shape"], ["y"], name="/fill")
    model = make_model([node], [], [f32("y", None)], [shape])
    err = refused(lambda: intq.from_onnx(model), intq.ShapeError, "ConstantOfShape.*limit")
    assert err.node == "/fill"


def test_constant_of_shape_int64_fill_to_a_huge_shape():
    shape = numpy_helper.from_array(np.array([10**7, 10**6], np.int64), "shape")
    fill = numpy_helper.from_array(np.array([2**62 + 1], np.int64), "v")
    node = helper.make_node("ConstantOfShape", ["shape"], ["y"], name="/fill", value=fill)
    model = make_model([node], [], [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    model.graph.initializer.append(shape)
    refused(lambda: intq.from_onnx(model), intq.ShapeError, "limit")


def test_reshape_to_a_huge_shape():
    x = numpy_helper.from_array(np.ones((2, 3), np.float32), "c")
    shape = numpy_helper.from_array(np.array([10**6, 10**6], np.int64), "shape")
    node = helper.make_node("Reshape", ["c", "shape"], ["y"], name="/reshape")
    model = make_model([node], [], [f32("y", None)], [x, shape])
    err = refused(lambda: intq.from_onnx(model), intq.ShapeError, "cannot reshape")
    assert err.node == "/reshape"


def test_pad_of_a_constant_by_a_huge_amount():
    c = numpy_helper.from_array(np.ones((2, 2), np.float32), "c")
    pads = numpy_helper.from_array(np.array([0, 0, 10**6, 10**6], np.int64), "pads")
    node = helper.make_node("Pad", ["c", "pads"], ["y"], name="/pad")
    model = make_model([node], [], [f32("y", None)], [c, pads])
    refused(lambda: intq.from_onnx(model), intq.ShapeError, "output of Pad.*limit")


def test_constant_node_with_external_data_is_refused(tmp_path):
    """numpy_helper.to_array would read any file a Constant's tensor names."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    value = TensorProto(name="v", data_type=TensorProto.FLOAT, dims=[4])
    value.data_location = TensorProto.EXTERNAL
    entry = value.external_data.add()
    entry.key, entry.value = "location", str(secret)
    node = helper.make_node("Constant", [], ["y"], name="/const", value=value)
    model = make_model([node], [], [f32("y", [4])])
    with pytest.raises(intq.ModelImportError, match="external data") as info:
        intq.from_onnx(model)
    assert info.value.node == "/const"


def test_constant_of_shape_value_must_be_one_element():
    shape = numpy_helper.from_array(np.array([2], np.int64), "shape")
    fill = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "v")
    node = helper.make_node("ConstantOfShape", ["shape"], ["y"], name="/fill", value=fill)
    model = make_model([node], [], [f32("y", [2])], [shape])
    with pytest.raises(intq.ModelImportError, match="one element"):
        intq.from_onnx(model)
