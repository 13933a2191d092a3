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

from intq.ir.graph import Graph, Node
from intq.passes.manager import Pass


@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Remove nodes and constants whose results nobody uses."""

    name: ClassVar[str] = "dce"

    def apply(self, graph: Graph) -> bool:
        # Walking backwards meets a node's readers before the node: it is dead when every
        # reader is. Removed at once: one Graph.remove per node made removing the 7,000
        # unread nodes of a 20,000-node graph take seconds.
        dead: set[Node] = set()
        outputs = {id(v) for v in graph.outputs}
        for node in reversed(graph.nodes):
            if all(
                id(v) not in outputs and all(use.node in dead for use in v.uses())
                for v in node.outputs
            ):
                dead.add(node)
        modified = bool(dead)
        if dead:
            graph.remove_nodes(dead)
        for const in graph.constants:
            if not const.uses() and not const.is_graph_output:
                graph.remove_constant(const)
                modified = True
        return modified
