"""The range analysis covers every integer op, and its intervals are sound.

- Every op of the integer op table (except ``Dequantize``, which leaves the integer region)
  and every float op whose type rule carries quantization through (data movement, MaxPool,
  Concat, Pad, ReLU, Clip...) has a rule in ``RULES``: a new integer op (the transformer
  kernels, say) without one fails here, before any model needs it.
- On random quantized graphs (tests/test_differential.py's generator) and adversarial
  inputs, every integer value the reference interpreter computes lies inside the interval
  the analysis proved for it.
"""

from __future__ import annotations

import numpy as np
import pytest
from random_graphs import random_case

import intq
from intq.ops import float_ops, integer_ops
from intq.ops.schema import REQUIRED
from intq.passes.range_analysis import RULES, analyze_ranges
from intq.semantics.numpy_eval import run_graph

_SAMPLE_ATTRS = {
    "kernel_shape": (2, 2),
    "shape": (2, 16),
    "perm": (0, 1, 3, 2),
    "axes": (0,),
    "starts": (0,),
    "ends": (1,),
    "pads": (0,) * 8,
    "axis": 1,
    "to": "i8",
}
"""Values for required attributes, so that most ops' type rules can be probed."""


def _carries_quantization(opdef) -> bool:
    """True when the op, given quantized int8 inputs, gives a quantized result."""
    graph = intq.ir.Graph()
    quant = intq.ir.QuantParams(8, True, (0.5,))
    x = graph.add_input("x", intq.ir.TensorType(intq.ir.DType.I8, (1, 2, 4, 4), quant))
    indices = graph.add_input("i", intq.ir.TensorType(intq.ir.DType.I64, (2,)))
    required = [k for k, a in opdef.attrs.items() if a.default is REQUIRED]
    attrs = {k: _SAMPLE_ATTRS[k] for k in required if k in _SAMPLE_ATTRS}
    probes = [
        ([x] * max(opdef.min_inputs, 1), attrs),
        ([x] * max(opdef.min_inputs, 1), {**attrs, "shape": (1, 2, 4, 4)}),
        ([x, indices], {k: v for k, v in attrs.items() if k != "shape"}),
    ]
    for inputs, sample in probes:
        try:
            full = opdef.complete_attrs(sample, inputs=inputs)
            types = opdef.infer_types(inputs, full)
        except intq.IntqError:
            continue  # the probe does not fit this op's inputs
        if any(t.quant is not None for t in types):
            return True
    return False


def integer_ops_in_registry() -> set[str]:
    """Every op that can produce a quantized integer value in an integer-only graph."""
    ops = {name for name in integer_ops.OPS if name != "Dequantize"}
    ops |= {name for name, opdef in float_ops.OPS.items() if _carries_quantization(opdef)}
    return ops


def test_the_detection_finds_the_known_integer_ops():
    found = integer_ops_in_registry()
    known = {"QConv", "QGemm", "QMatMul", "Requantize", "QAdd", "Quantize", "MaxPool", "Concat"}
    known |= {"Pad", "Clip", "Relu", "Gather"}
    assert known | set(float_ops.DATA_MOVEMENT) <= found


@pytest.mark.parametrize("op", sorted(integer_ops_in_registry()))
def test_every_integer_op_has_a_range_rule(op):
    assert RULES.get(op) is not None, (
        f"integer op {op} has no rule in intq.passes.range_analysis.RULES: the overflow proof"
        " would refuse every graph using it"
    )


def test_an_op_without_a_rule_is_refused(digits_model):
    graph = intq.quantize(intq.from_onnx(digits_model.path), [digits_model.inputs])
    node = next(n for n in graph if n.op == "MaxPool")
    saved = RULES.pop("MaxPool")
    try:
        with pytest.raises(intq.NumericsError, match="no rule for integer op MaxPool") as info:
            analyze_ranges(graph)
        assert info.value.node == node.label()
    finally:
        RULES["MaxPool"] = saved


@pytest.mark.parametrize("seed", range(30))
def test_intervals_contain_every_computed_value(seed):
    graph, _, _, feeds = random_case(seed)
    intervals = analyze_ranges(graph)
    seen: dict[str, tuple[int, int]] = {}

    def record(node, outputs) -> None:
        for value, array in zip(node.outputs, outputs):
            if value.type.dtype.is_integer and array.size:
                low, high = seen.get(value.name, (int(np.min(array)), int(np.max(array))))
                seen[value.name] = (min(low, int(np.min(array))), max(high, int(np.max(array))))

    for feed in feeds:
        run_graph(graph, {"x": feed}, on_node=record)
    for name, (low, high) in seen.items():
        bound = intervals[name]
        assert bound[0] <= low and high <= bound[1], f"seed {seed}: %{name} {low, high} {bound}"
