"""Dead-code elimination.

Rules:

- A node none of whose outputs is read by another node or returned by the
  graph is removed; removal cascades to the nodes feeding it.
- A constant nobody reads is removed.
- Graph inputs stay even when unused: they are the model's interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from intq.ir.graph import Graph
from intq.passes.manager import Pass


@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Remove nodes and constants whose results nobody uses."""

    name: ClassVar[str] = "dce"

    def apply(self, graph: Graph) -> bool:
        modified = False
        # Walking backwards frees a node's producers before they are visited.
        for node in reversed(graph.nodes):
            if all(not v.uses() and not v.is_graph_output for v in node.outputs):
                graph.remove(node)
                modified = True
        for const in graph.constants:
            if not const.uses() and not const.is_graph_output:
                graph.remove_constant(const)
                modified = True
        return modified
