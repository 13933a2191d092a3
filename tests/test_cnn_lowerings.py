"""The integer lowerings of the CNN ops users bring most: ReduceMean/ReduceSum as an int32
sum, elementwise functions as exactly rounded tables, products of two activations.

Each small model is imported, quantized and run on the reference, ONNX Runtime and TVM,
which must agree bit for bit; the integer graph must hold the expected integer op.
"""

# ruff: noqa: E501  (IR text: one node per line)

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper
from onnx_models import f32, make_model

import intq
from intq.backends import TARGETS
from intq.passes.range_analysis import analyze_ranges


def _conv(name: str, x: str, cin: int, cout: int, rng: np.random.Generator) -> tuple:
    w = numpy_helper.from_array(
        (rng.standard_normal((cout, cin, 3, 3)) * 0.3).astype(np.float32), f"{name}.w"
    )
    b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, f"{name}.b")
    node = helper.make_node("Conv", [x, w.name, b.name], [name], pads=[1, 1, 1, 1])
    return node, [w, b]


def _quantized(model, shape: tuple[int, ...], seed: int = 0, **config):
    rng = np.random.default_rng(seed)
    batches = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(3)]
    graph = intq.quantize(intq.from_onnx(model), batches, intq.QuantConfig(**config))
    feeds = [rng.standard_normal(shape).astype(np.float32) * k for k in (1, 3)]
    return graph, feeds


def _bit_exact(graph, feeds) -> dict[str, np.ndarray]:
    """Runs ``graph`` on every backend; all must equal the reference. Returns its outputs."""
    reference = intq.compile(graph, target="reference")
    results = {}
    for target in ("onnxruntime", "tvm"):
        if target not in TARGETS:
            continue
        compiled = intq.compile(graph, target=target)
        for feed in feeds:
            want = reference.run({"x": feed})
            got = compiled.run({"x": feed})
            for name, array in want.items():
                np.testing.assert_array_equal(got[name], array, err_msg=f"{target}: {name}")
                results[name] = array
    return results


def _ops(graph) -> list[str]:
    return [node.op for node in graph]


# ----- ReduceMean / ReduceSum ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "axes", "keepdims"),
    [("ReduceMean", (2, 3), 0), ("ReduceMean", (2, 3), 1), ("ReduceSum", (1,), 0)],
)
def test_reduce_is_an_int32_sum_on_every_backend(op, axes, keepdims):
    """``x.mean((2, 3))`` (PyTorch's classifier pooling) and a channel sum: one ``QReduceSum``,
    the mean's ``1/N`` in the requantization; close to the float result."""
    rng = np.random.default_rng(1)
    conv, weights = _conv("c", "x", 2, 3, rng)
    axes_const = numpy_helper.from_array(np.asarray(axes, np.int64), "axes")
    relu = helper.make_node("Relu", ["c"], ["r"])
    reduce = helper.make_node(op, ["r", "axes"], ["y"], keepdims=keepdims)
    shape = (1, 2, 5, 4)
    full = [1 if i in axes else d for i, d in enumerate((1, 3, 5, 4))]
    out = full if keepdims else [d for i, d in enumerate((1, 3, 5, 4)) if i not in axes]
    model = make_model(
        [conv, relu, reduce],
        [f32("x", shape)],
        [f32("y", out)],
        [*weights, axes_const],
        opset=18,
    )
    graph, feeds = _quantized(model, shape)
    assert "QReduceSum" in _ops(graph)
    got = _bit_exact(graph, feeds[:1])["y"]
    want = intq.compile(intq.from_onnx(model), target="reference").run({"x": feeds[0]})["y"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=0.05 * float(np.abs(want).max()) + 1e-3)


def test_reduce_sum_refuses_an_int32_overflow():
    """The range analysis bounds ``N * x``: 2^17 positions of 16-bit values cannot fit int32."""
    text = """
    graph main(%x: i16[1,1,512,256] q(bits=16, signed, scale=0.5)) {
      %s = QReduceSum(%x) {axes=[2, 3], keepdims=1, mean=1} : i32[1,1,1,1] q(bits=32, signed, scale=3.814697265625e-06) @"pool"
      return %s
    }
    """
    graph = intq.ir.from_text(text)
    with pytest.raises(intq.NumericsError, match="sum of 131072 values") as err:
        analyze_ranges(graph)
    assert "pool" in str(err.value)
