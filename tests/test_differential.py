"""Differential testing: random small float graphs, quantized, agree bit for bit between the
reference interpreter and every other backend.

The graphs come from tests/random_graphs.py (random convs with groups, strides, dilations and
padding, Gemm and MatMul heads, residual adds, max/average/global pools, ReLU/ReLU6, Concat;
random weight scales, 4..8-bit weights and activations, random calibration method). Each is
imported, quantized and run on fresh and on adversarial inputs. A new backend joins by its
name in ``BACKENDS`` (those not in ``intq.backends.TARGETS`` skip).

Encoder layers (attention, LayerNorm, GELU; random kernel variants) run a tenth as many.
``INTQ_DIFFERENTIAL_GRAPHS`` sets the number of graphs per backend (``make fuzz`` runs many
more); TVM, whose every graph is an LLVM compile (about a second here), runs the first
``INTQ_DIFFERENTIAL_TVM_GRAPHS`` of them (130 by default).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from random_graphs import random_case

import intq
from intq.backends import TARGETS

GRAPHS = int(os.environ.get("INTQ_DIFFERENTIAL_GRAPHS", "520"))
BACKENDS = {
    "onnxruntime": GRAPHS,
    "tvm": min(GRAPHS, int(os.environ.get("INTQ_DIFFERENTIAL_TVM_GRAPHS", "130"))),
}
"""Backends compared with the reference, and how many graphs each runs (those not in
``intq.backends.TARGETS`` skip)."""


@pytest.mark.parametrize(
    ("seed", "backend"),
    [(seed, backend) for backend, count in BACKENDS.items() for seed in range(count)],
)
def test_random_graph_is_bit_exact(seed, backend):
    _check(seed, backend, transformer=False)


@pytest.mark.parametrize(
    ("seed", "backend"),
    [(seed, backend) for backend, count in BACKENDS.items() for seed in range(count // 10)],
)
def test_random_transformer_is_bit_exact(seed, backend):
    _check(seed, backend, transformer=True)


def _check(seed: int, backend: str, transformer: bool) -> None:
    if backend not in TARGETS:
        pytest.skip(f"backend {backend} is not available here")
    graph, config, ops, feeds = random_case(seed, transformer)
    reference = intq.compile(graph, target="reference")
    # One thread: the session is made for four tiny runs, and opens faster without a pool.
    other = intq.compile(
        graph, target=backend, **({"threads": 1} if backend == "onnxruntime" else {})
    )
    for feed in feeds:
        want = reference.run({"x": feed})
        got = other.run({"x": feed})
        for name, array in want.items():
            assert got[name].dtype == array.dtype and got[name].shape == array.shape
            np.testing.assert_array_equal(got[name], array, err_msg=f"seed {seed}: {ops}, {config}")


def test_maxpool_ceil_mode_whose_last_window_is_dropped():
    """ceil_mode drops a window starting past the input; ONNX shape inference did not, and
    ONNX Runtime refused the exported file once a Flatten and a MatMulInteger followed."""
    w = numpy_helper.from_array(np.linspace(-1, 1, 18, dtype=np.float32).reshape(6, 3), "w")
    nodes = [
        helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[1, 1], strides=[2, 2], ceil_mode=1),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w"], ["y"]),
    ]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 6])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x_info], [y_info], [w]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((1, 1, 4, 6)).astype(np.float32)} for _ in range(2)]
    graph = intq.quantize(intq.from_onnx(model), batches)
    feed = {"x": rng.standard_normal((1, 1, 4, 6)).astype(np.float32)}
    want = intq.compile(graph).run(feed)["y"]
    np.testing.assert_array_equal(intq.compile(graph, target="onnxruntime").run(feed)["y"], want)
