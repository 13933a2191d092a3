"""The integer-only check: the op census, and no float op inside the integer region.

Rules:

- ``Quantize`` takes float inputs and ``Dequantize`` makes float outputs: they are the
  boundary (the ``BOUNDARY`` trait) and always allowed.
- Any other node touching a float value is allowed only *after* the
  boundary: when every float it reads comes (transitively) from a
  ``Dequantize`` — e.g. a final Softmax on the dequantized logits.
- An integer ``Div`` is a runtime division (the ``DIVIDES`` trait), and so is a
  transformer kernel (``QSoftmax``, ``QGelu``, ``QLayerNorm``) in a dividing variant (its
  op's ``KernelSpec.dividing``); they are listed in ``Census.division_nodes`` and refused
  unless ``allow_division`` declares them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

from intq.errors import NumericsError
from intq.ir.graph import Graph, Node
from intq.ops import Trait
from intq.passes.manager import Pass


@dataclass(frozen=True)
class Census:
    """How many nodes of each op, and which nodes break the integer-only rule."""

    ops: dict[str, int]
    violations: list[str] = field(default_factory=list)
    divisions: int = 0
    float_tail: list[str] = field(default_factory=list)
    division_nodes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The census as an aligned two-column text table."""
        width = max((len(op) for op in self.ops), default=2)
        return "\n".join(f"{op:<{width}}  {n}" for op, n in sorted(self.ops.items()))


def census(graph: Graph, *, allow_division: bool = False) -> Census:
    """The op census of ``graph`` and its integer-only violations."""
    after_boundary: set[str] = set()
    violations: list[str] = []
    tail: list[str] = []
    dividing: list[str] = []
    for node in graph:
        if node.opdef.has(Trait.BOUNDARY):
            if all(v.type.dtype.is_float for v in node.outputs):  # the way out
                after_boundary.update(v.name for v in node.outputs)
            continue
        floats = [
            v for v in (*node.inputs, *node.outputs) if v is not None and v.type.dtype.is_float
        ]
        float_inputs = [v for v in node.inputs if v is not None and v.type.dtype.is_float]
        if floats:
            if float_inputs and all(v.name in after_boundary for v in float_inputs):
                after_boundary.update(v.name for v in node.outputs)
                tail.append(_describe(node))
            else:
                violations.append(f"{_describe(node)} computes in float")
            continue
        if node.opdef.divides(node.attrs):
            dividing.append(_describe(node))
            if not allow_division:
                violations.append(f"{_describe(node)} divides at run time")
    ops = Counter(node.op for node in graph)
    return Census(dict(ops), violations, len(dividing), tail, dividing)


def check_integer_only(graph: Graph, *, allow_division: bool = False) -> Census:
    """The census; raises :class:`NumericsError` listing the violations, if any."""
    result = census(graph, allow_division=allow_division)
    if result.violations:
        shown = "\n  ".join(result.violations[:20])
        more = len(result.violations) - 20
        raise NumericsError(
            f"the graph is not integer-only:\n  {shown}"
            + (f"\n  ... and {more} more" if more > 0 else ""),
            hint="every op between Quantize and Dequantize must compute on integers",
        )
    return result


@dataclass(frozen=True)
class CheckIntegerOnly(Pass):
    """Refuse a graph that computes in float between its ``Quantize`` and ``Dequantize``
    nodes, or that divides at run time unless ``allow_division`` (listing every offender)."""

    name: ClassVar[str] = "check-integer-only"
    allow_division: bool = False

    def apply(self, graph: Graph) -> bool:
        check_integer_only(graph, allow_division=self.allow_division)
        return False


def _describe(node: Node) -> str:
    return f"{node.op} {node.label()!r}"
