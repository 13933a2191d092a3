"""The range analysis refuses ops it has no rule for, and its intervals are sound.

(That every integer op has a rule is checked with the other rule tables in
``tests/test_rule_tables.py``.)

- On random quantized graphs (tests/test_differential.py's generator) and adversarial
  inputs, every integer value the reference interpreter computes lies inside the interval
  the analysis proved for it.
"""

from __future__ import annotations

import numpy as np
import pytest
from random_graphs import random_case

import intq
from intq.passes.range_analysis import RULES, analyze_ranges
from intq.semantics.numpy_eval import run_graph


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
        bound = intervals[graph[name]]
        assert bound[0] <= low and high <= bound[1], f"seed {seed}: %{name} {low, high} {bound}"
