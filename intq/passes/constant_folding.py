"""Constant folding.

Rules:

- A node whose inputs are all constants is evaluated with the reference
  interpreter and replaced by constants holding its outputs.
- ``Shape`` folds whatever its input is, because shapes are static.
- Outputs keep their value names, so graph outputs and later references to
  them by name are unchanged.
- A node whose folded outputs would exceed ``max_bytes`` in total is left
  alone (it would bloat the artifact; e.g. an ``Expand`` of a scalar).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from intq.ir.graph import Graph, Node, Value
from intq.ops import Trait
from intq.passes.manager import Pass
from intq.semantics.numpy_eval import evaluate


def foldable(node: Node) -> bool:
    """True when ``node``'s outputs are known at compile time."""
    if node.opdef.has(Trait.FOLDED):  # Shape: its result is in its input's type
        return True
    return all(v is None or v.is_const for v in node.inputs)


def fold_node(graph: Graph, node: Node) -> list[Value]:
    """Replace ``node`` by constants of its outputs; returns the new constants."""
    results = evaluate(node, [None if v is None else v.const for v in node.inputs])
    names = [v.name for v in node.outputs]
    constants = []
    for value, array in zip(node.outputs, results):
        const = graph.add_constant(array, value.name + ".folded")
        const.type = value.type  # keep quantization parameters, if any
        value.replace_all_uses_with(const)
        constants.append(const)
    graph.remove(node)
    for const, name in zip(constants, names):
        if graph.find(name) is None:
            graph.rename(const, name)
    return constants


@dataclass(frozen=True)
class ConstantFolding(Pass):
    """Evaluate nodes whose inputs are constants (see the module docstring)."""

    name: ClassVar[str] = "fold-constants"
    max_bytes: int = 1 << 28

    def apply(self, graph: Graph) -> bool:
        modified = False
        for node in graph:
            if foldable(node) and sum(v.type.nbytes for v in node.outputs) <= self.max_bytes:
                fold_node(graph, node)
                modified = True
        return modified
