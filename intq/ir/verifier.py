"""The IR verifier: the invariants every pass must keep.

- SSA: every value is defined once (a graph input, a constant, or one node
  output) before it is used, and names are unique.
- Use lists are exact: each node input appears in its value's use list and
  every recorded use is a live input of a node of this graph.
- Each node's op is registered, its arity and attributes are legal and in
  canonical form, and the recorded output types are what the op's shape
  rule infers (which also rejects illegal dtypes).
"""

from __future__ import annotations

from intq.errors import IntqError, VerificationError
from intq.ir.graph import Graph, Node, Value
from intq.ir.printer import format_node
from intq.ir.types import TensorType


def verify(graph: Graph) -> None:
    """Raise :class:`VerificationError` naming the first broken invariant."""
    defined: set[int] = set()
    names: dict[str, Value] = {}

    def define(value: Value, where: str) -> None:
        if value.graph is not graph:
            raise VerificationError(f"{where} %{value.name} does not belong to the graph")
        if value.name in names:
            raise VerificationError(f"value name %{value.name} is defined twice")
        if graph.find(value.name) is not value:
            raise VerificationError(f"the name table does not map %{value.name} to its value")
        names[value.name] = value
        defined.add(id(value))

    for value in graph.inputs:
        if value.is_const or value.producer is not None:
            raise VerificationError(f"graph input %{value.name} has data or a producer")
        define(value, "input")
    for value in graph.constants:
        if value.const is None:
            raise VerificationError(f"constant %{value.name} has no data")
        if TensorType.of(value.const) != TensorType(value.type.dtype, value.type.shape):
            raise VerificationError(f"constant %{value.name}: data does not match {value.type}")
        define(value, "constant")

    for node in graph.nodes:
        try:
            if node.graph is not graph:
                raise VerificationError(
                    "a listed node does not point back to the graph", node=node.label()
                )
            for index, operand in enumerate(node.inputs):
                if operand is None:
                    continue
                if id(operand) not in defined:
                    raise VerificationError(
                        f"input {index} (%{operand.name}) is used before it is defined"
                        " (the nodes are not in topological order, or it is not in this graph)",
                        node=node.label(),
                    )
                if not operand.is_read_by(node, index):
                    raise VerificationError(
                        f"input {index} (%{operand.name}) is missing from its use list",
                        node=node.label(),
                    )
            for index, value in enumerate(node.outputs):
                if value.producer is not node or value.index != index:
                    raise VerificationError(
                        f"output %{value.name} does not point back to its node", node=node.label()
                    )
                define(value, "output")
            _check_node(node)
        except VerificationError as err:
            # Show the node as IR text, as a reader of the dump would see it.
            raise VerificationError(
                f"{err.message}\n  in: {format_node(node)}", node=err.node, hint=err.hint
            ) from None

    for value in graph.values():
        for use in value.uses():
            if (
                use.node.graph is not graph
                or use.index >= use.node.arity
                or use.node.operand(use.index) is not value
            ):
                raise VerificationError(f"%{value.name} has a dangling use by {use.node.label()}")
    for value in graph.outputs:
        if id(value) not in defined:
            raise VerificationError(f"graph output %{value.name} is not defined in the graph")


def _check_node(node: Node) -> None:
    try:
        opdef = node.opdef
        opdef.check_arity(len(node.inputs), node=node.label())
        canonical = opdef.complete_attrs(node.attrs, node=node.label(), inputs=node.inputs)
        if canonical != node.attrs:
            raise VerificationError(
                f"attributes {node.attrs} are not in canonical form {canonical}", node=node.label()
            )
        inferred = opdef.infer_types(node.inputs, node.attrs, node=node.label())
    except VerificationError:
        raise
    except IntqError as err:
        raise VerificationError(err.message, node=node.label(), hint=err.hint) from None
    if len(inferred) != len(node.outputs):
        raise VerificationError(
            f"{node.op} makes {len(inferred)} outputs, the node has {len(node.outputs)}",
            node=node.label(),
        )
    for value, want in zip(node.outputs, inferred):
        got = value.type
        if want.quant is None:
            got = TensorType(got.dtype, got.shape)
        if got != want:
            raise VerificationError(
                f"output %{value.name} has type {value.type}, but {node.op} gives {want}",
                node=node.label(),
            )
