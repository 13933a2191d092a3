"""Helpers shared by the tests that build small ONNX models by hand, quantize them and run
them on every backend."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import intq
from intq.backends import TARGETS

IR_VERSION = 8


def make_model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_VERSION
    return model


def f32(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def conv_node(name: str, x: str, cin: int, cout: int, rng: np.random.Generator) -> tuple:
    """A 3x3 ``Conv`` (padding 1) of ``x`` with random weights and bias: the node and its
    initializers."""
    w = numpy_helper.from_array(
        (rng.standard_normal((cout, cin, 3, 3)) * 0.3).astype(np.float32), f"{name}.w"
    )
    b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, f"{name}.b")
    node = helper.make_node("Conv", [x, w.name, b.name], [name], pads=[1, 1, 1, 1])
    return node, [w, b]


def quantized(model, shape: tuple[int, ...], seed: int = 0, **config):
    """``model`` (one input ``x`` of ``shape``) imported and quantized on three batches of
    normal data; returns the integer graph and feeds: the first calibration batch (accuracy
    is compared there), then fresh batches at 1x and 3x the spread."""
    rng = np.random.default_rng(seed)
    batches = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(3)]
    graph = intq.quantize(intq.from_onnx(model), batches, intq.QuantConfig(**config))
    feeds = [batches[0]["x"], *(rng.standard_normal(shape).astype(np.float32) * k for k in (1, 3))]
    return graph, feeds


def bit_exact(graph, feeds) -> dict[str, np.ndarray]:
    """Runs ``graph`` on every backend; all must equal the reference. Returns the reference's
    outputs on the first feed."""
    reference = intq.compile(graph, target="reference")
    for target in ("onnxruntime", "tvm"):
        if target not in TARGETS:
            continue
        compiled = intq.compile(graph, target=target)
        for feed in feeds:
            want = reference.run({"x": feed})
            got = compiled.run({"x": feed})
            for name, array in want.items():
                np.testing.assert_array_equal(got[name], array, err_msg=f"{target}: {name}")
    return reference.run({"x": feeds[0]})


def op_names(graph) -> list[str]:
    return [node.op for node in graph]
