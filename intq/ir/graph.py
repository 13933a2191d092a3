"""The graph: values, nodes, and one safe mutation model.

A :class:`Value` is produced by exactly one node, or is a graph input, or a
constant (an initializer). Every value keeps its *use list*: the
``(node, input index)`` pairs that read it. :meth:`Value.uses` returns a
snapshot, so rewriting while iterating over it is safe, and
:meth:`Value.replace_all_uses_with` is the one way to redirect readers.

A :class:`Graph` keeps its nodes in a list in topological order. Iterating a
graph iterates a snapshot of that list and skips nodes removed meanwhile, so
passes may add and remove nodes while they walk the graph. There is no
"recompile" step after a mutation. Analyses (the proven integer ranges, say) may store
their result on the graph as a side table keyed by value (:meth:`Graph.store_analysis`);
any mutation invalidates it, so a reader never sees a stale result.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from intq.errors import IntqError, ShapeError, VerificationError
from intq.ir.printer import to_text
from intq.ir.types import TensorType

if TYPE_CHECKING:
    from intq.ops.registry import OpDef

AnalysisT = TypeVar("AnalysisT")
Entry = TypeVar("Entry")

AttrValue = int | float | str | tuple[int, ...] | tuple[float, ...] | tuple[str, ...]
"""Node attributes are immutable scalars or tuples; tensors are constant values instead."""


@dataclass(frozen=True, slots=True)
class Use:
    """One reader of a value: input ``index`` of ``node``."""

    node: Node
    index: int


class Value:
    """An SSA value: a name, a type, and either a producer, a graph-input slot or a constant."""

    __slots__ = ("_const", "_graph", "_index", "_producer", "_type", "_uses", "name")

    def __init__(self, name: str, type: TensorType, const: np.ndarray | None = None):
        self.name = name
        self._type = type
        self._producer: Node | None = None
        self._index = 0
        self._uses: dict[tuple[Node, int], None] = {}
        self._graph: Graph | None = None
        self._const: np.ndarray | None = None
        if const is not None:
            self.const = const

    @property
    def type(self) -> TensorType:
        """The value's type (dtype, shape, quantization)."""
        return self._type

    @type.setter
    def type(self, new: TensorType) -> None:
        if self._const is not None and (new.dtype, new.shape) != (
            self._type.dtype,
            self._type.shape,
        ):
            raise ShapeError(f"cannot change the dtype or shape of constant {self.name!r}")
        self._type = new
        if self._graph is not None:
            self._graph._touch()

    @property
    def const(self) -> np.ndarray | None:
        """The constant's data (read-only), or ``None`` for a computed value."""
        return self._const

    @const.setter
    def const(self, array: np.ndarray) -> None:
        array = np.array(array, copy=True) if array.flags.writeable else array
        array.flags.writeable = False
        got = TensorType.of(array)
        if (got.dtype, got.shape) != (self._type.dtype, self._type.shape):
            raise ShapeError(
                f"constant {self.name!r}: data of type {got} does not match declared {self._type}"
            )
        self._const = array
        if self._graph is not None:
            self._graph._touch()

    @property
    def is_const(self) -> bool:
        """True when the value is a constant (initializer)."""
        return self._const is not None

    @property
    def producer(self) -> Node | None:
        """The node computing this value, or ``None`` for inputs and constants."""
        return self._producer

    @property
    def index(self) -> int:
        """Which output of the producer this value is."""
        return self._index

    @property
    def graph(self) -> Graph | None:
        """The graph the value belongs to."""
        return self._graph

    def uses(self) -> tuple[Use, ...]:
        """A snapshot of the ``(node, input index)`` pairs reading this value."""
        return tuple(Use(node, index) for node, index in self._uses)

    def is_read_by(self, node: Node, index: int) -> bool:
        """Whether input ``index`` of ``node`` is recorded as reading this value (in constant
        time: the verifier asks it for every input, and a value may have 10^5 readers)."""
        return (node, index) in self._uses

    def consumers(self) -> tuple[Node, ...]:
        """The distinct nodes reading this value, in use order."""
        return tuple(dict.fromkeys(node for node, _ in self._uses))

    @property
    def is_graph_output(self) -> bool:
        """True when the graph returns this value."""
        return self._graph is not None and any(v is self for v in self._graph._outputs)

    def replace_all_uses_with(self, new: Value, *, graph_outputs: bool = True) -> None:
        """Make every reader of this value read ``new`` instead.

        With ``graph_outputs`` (the default) graph outputs that are this value
        become ``new`` as well; ``new`` then takes this value's name so the
        graph's output names, which users key their results by, do not change.
        """
        if new is self:
            return
        for use in self.uses():
            use.node.set_input(use.index, new)
        graph = self._graph
        if graph_outputs and graph is not None and self.is_graph_output:
            graph._outputs = [new if v is self else v for v in graph._outputs]
            graph._touch()
            if new.name != self.name:
                old_name = self.name
                graph.rename(self, graph.unique_name(old_name + "_replaced"))
                if graph.find(old_name) is None:
                    graph.rename(new, old_name)

    def __repr__(self) -> str:
        return f"Value(%{self.name}: {self._type})"


class Node:
    """One operation: an op name, input values, attributes and output values.

    ``name`` is where the node came from (the ONNX node name or the PyTorch
    module path); errors about the node show it.
    """

    __slots__ = ("_graph", "_inputs", "_outputs", "attrs", "name", "op")

    def __init__(
        self,
        op: str,
        inputs: Sequence[Value | None],
        outputs: Sequence[Value],
        attrs: Mapping[str, Any] | None = None,
        name: str = "",
    ):
        self.op = op
        self.name = name
        # Values are AttrValues (the registry checks their kinds); typed Any so that rules
        # can index a tuple attribute without a cast at every use.
        self.attrs: dict[str, Any] = dict(attrs or {})
        self._graph: Graph | None = None
        self._inputs: list[Value | None] = []
        for index, value in enumerate(inputs):
            self._inputs.append(value)
            if value is not None:
                value._uses[(self, index)] = None
        self._outputs = tuple(outputs)
        for index, value in enumerate(self._outputs):
            if value._producer is not None or value._graph is not None:
                raise VerificationError(f"value %{value.name} already has a producer", node=name)
            value._producer = self
            value._index = index

    @property
    def inputs(self) -> tuple[Value | None, ...]:
        """The input values (``None`` for an omitted optional input)."""
        return tuple(self._inputs)

    @property
    def arity(self) -> int:
        """How many inputs the node has (omitted optional ones included)."""
        return len(self._inputs)

    def operand(self, index: int) -> Value | None:
        """Input ``index`` (``None`` when omitted), without copying the input list as
        :attr:`inputs` does: a reader visiting each use of a Concat of 50,000 inputs."""
        return self._inputs[index]

    @property
    def outputs(self) -> tuple[Value, ...]:
        """The output values."""
        return self._outputs

    @property
    def output(self) -> Value:
        """The single output of a one-output node."""
        if len(self._outputs) != 1:
            raise IntqError(f"{self.op} has {len(self._outputs)} outputs, not one", node=self.name)
        return self._outputs[0]

    @property
    def graph(self) -> Graph | None:
        """The graph holding the node, ``None`` once removed."""
        return self._graph

    @property
    def opdef(self) -> OpDef:
        """The registry entry of this node's op."""
        from intq.ops.registry import get_op

        return get_op(self.op, node=self.name)

    def set_input(self, index: int, value: Value | None) -> None:
        """Replace input ``index``, keeping the use lists right."""
        old = self._inputs[index]
        if old is not None:
            del old._uses[(self, index)]
        self._inputs[index] = value
        if value is not None:
            value._uses[(self, index)] = None
        if self._graph is not None:
            self._graph._touch()

    def label(self) -> str:
        """How errors refer to the node: its origin name, else op and first output."""
        return self.name or f"{self.op} -> %{self._outputs[0].name if self._outputs else '?'}"

    def _detach(self) -> None:
        for index in range(len(self._inputs)):
            self.set_input(index, None)

    def __repr__(self) -> str:
        ins = ", ".join("_" if v is None else f"%{v.name}" for v in self._inputs)
        outs = ", ".join(f"%{v.name}" for v in self._outputs)
        return f"Node({outs} = {self.op}({ins}) @{self.name!r})"


class ValueMap(Mapping[Value, Entry], Generic[Entry]):
    """A side table keyed by value, read-only once built: what an analysis stores on a graph
    (:meth:`Graph.store_analysis`), one subclass per analysis."""

    def __init__(self, entries: Mapping[Value, Entry]):
        self._entries = dict(entries)

    def __getitem__(self, value: Value) -> Entry:
        return self._entries[value]

    def __iter__(self) -> Iterator[Value]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class Graph:
    """A dataflow graph: inputs, constants, nodes in topological order, outputs."""

    def __init__(self, name: str = "main"):
        self.name = name
        self._inputs: list[Value] = []
        self._outputs: list[Value] = []
        self._constants: dict[str, Value] = {}
        self._nodes: list[Node] = []
        self._names: dict[str, Value] = {}
        self._counter = itertools.count()
        self._revision = 0
        self._analyses: dict[type, tuple[int, object]] = {}

    # ----- reading -------------------------------------------------------

    @property
    def inputs(self) -> tuple[Value, ...]:
        """The graph inputs, in order."""
        return tuple(self._inputs)

    @property
    def outputs(self) -> tuple[Value, ...]:
        """The graph outputs, in order."""
        return tuple(self._outputs)

    @property
    def constants(self) -> tuple[Value, ...]:
        """The constants (initializers), in insertion order."""
        return tuple(self._constants.values())

    @property
    def nodes(self) -> tuple[Node, ...]:
        """A snapshot of the nodes in topological order."""
        return tuple(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        """Iterate a snapshot of the nodes, skipping those removed meanwhile."""
        for node in tuple(self._nodes):
            if node._graph is self:
                yield node

    def __len__(self) -> int:
        return len(self._nodes)

    def find(self, name: str) -> Value | None:
        """The value called ``name``, or ``None``."""
        return self._names.get(name)

    def __getitem__(self, name: str) -> Value:
        value = self._names.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def values(self) -> Iterator[Value]:
        """All values: inputs, constants, then node outputs in order."""
        yield from self._inputs
        yield from self._constants.values()
        for node in self._nodes:
            yield from node._outputs

    # ----- analyses --------------------------------------------------------

    def _touch(self) -> None:
        self._revision += 1

    def analysis(self, kind: type[AnalysisT]) -> AnalysisT | None:
        """The stored result of analysis ``kind`` (a side table keyed by value, such as the
        proven integer ranges), or None when none was stored or the graph changed since.

        Every mutation through the graph's API invalidates stored results. Editing a node's
        ``attrs`` dict in place is not tracked: rewrite by replacing the node instead.
        """
        stored = self._analyses.get(kind)
        if stored is None or stored[0] != self._revision:
            return None
        result = stored[1]
        assert isinstance(result, kind)
        return result

    def store_analysis(self, result: object) -> None:
        """Keep ``result`` under its type until the graph next changes."""
        self._analyses[type(result)] = (self._revision, result)

    # ----- naming --------------------------------------------------------

    def unique_name(self, base: str) -> str:
        """A value name not yet used in this graph, derived from ``base``."""
        if base and base not in self._names:
            return base
        base = base or "v"
        while True:
            name = f"{base}.{next(self._counter)}"
            if name not in self._names:
                return name

    def rename(self, value: Value, name: str) -> None:
        """Give ``value`` a new, unused name."""
        if value._graph is not self:
            raise VerificationError(f"%{value.name} is not in graph {self.name!r}")
        if name in self._names and self._names[name] is not value:
            raise VerificationError(f"value name %{name} is already taken")
        del self._names[value.name]
        if value.is_const:
            self._constants = {
                (name if k == value.name else k): v for k, v in self._constants.items()
            }
        value.name = name
        self._names[name] = value
        self._touch()

    def _register(self, value: Value) -> None:
        if value._graph is not None:
            raise VerificationError(f"value %{value.name} already belongs to a graph")
        if value.name in self._names:
            raise VerificationError(f"duplicate value name %{value.name}")
        value._graph = self
        self._names[value.name] = value
        self._touch()

    def _unregister(self, value: Value) -> None:
        if self._names.get(value.name) is value:
            del self._names[value.name]
        value._graph = None
        self._touch()

    # ----- building ------------------------------------------------------

    def add_input(self, name: str, type: TensorType) -> Value:
        """Append a graph input."""
        value = Value(name, type)
        self._register(value)
        self._inputs.append(value)
        return value

    def add_constant(self, array: np.ndarray, name: str = "const") -> Value:
        """Add a constant (initializer) holding ``array``; the name is made unique."""
        array = np.asarray(array)
        value = Value(self.unique_name(name), TensorType.of(array), array)
        self._register(value)
        self._constants[value.name] = value
        return value

    def set_outputs(self, outputs: Iterable[Value]) -> None:
        """Set the graph outputs."""
        outputs = list(outputs)
        for value in outputs:
            if value._graph is not self:
                raise VerificationError(f"output %{value.name} is not in graph {self.name!r}")
        self._outputs = outputs
        self._touch()

    def add(
        self,
        op: str,
        inputs: Sequence[Value | None],
        attrs: Mapping[str, Any] | None = None,
        *,
        name: str = "",
        out_names: Sequence[str] | None = None,
        out_types: Sequence[TensorType] | None = None,
        before: Node | None = None,
        after: Node | None = None,
    ) -> Node:
        """Create a node and insert it (at the end, or ``before``/``after`` a node).

        Attributes are checked and completed with their defaults from the op
        registry; output types are inferred unless ``out_types`` is given.
        """
        from intq.ops.registry import get_op

        opdef = get_op(op, node=name)
        opdef.check_arity(len(inputs), node=name)  # canonicalisation reads the inputs' types
        full_attrs = opdef.complete_attrs(attrs or {}, node=name, inputs=inputs)
        for value in inputs:
            if value is not None and value._graph is not self:
                raise VerificationError(
                    f"input %{value.name} of {op} is not in graph {self.name!r}", node=name
                )
        if out_types is None:
            out_types = opdef.infer_types(inputs, full_attrs, node=name)
        if out_names is None:
            out_names = [name or op.lower()] * len(out_types)
        if len(out_names) != len(out_types):
            raise VerificationError(
                f"{op} makes {len(out_types)} outputs but {len(out_names)} names were given",
                node=name,
            )
        outputs = [Value(self.unique_name(n), t) for n, t in zip(out_names, out_types)]
        node = Node(op, inputs, outputs, full_attrs, name)
        self.insert(node, before=before, after=after)
        return node

    def op(self, op: str, *inputs: Value | None, name: str = "", **attrs: AttrValue) -> Value:
        """Shorthand for :meth:`add` of a one-output node; returns the output value."""
        return self.add(op, list(inputs), attrs, name=name).output

    def insert(self, node: Node, *, before: Node | None = None, after: Node | None = None) -> None:
        """Insert a constructed node at the end, or ``before`` / ``after`` another node."""
        if node._graph is not None:
            raise VerificationError("node already belongs to a graph", node=node.label())
        if before is not None and after is not None:
            raise VerificationError("give at most one of before= and after=", node=node.label())
        for value in node._outputs:
            self._register(value)
        node._graph = self
        if before is not None:
            self._nodes.insert(self._position(before), node)
        elif after is not None:
            self._nodes.insert(self._position(after) + 1, node)
        else:
            self._nodes.append(node)
        self._touch()

    def _position(self, node: Node) -> int:
        if node._graph is not self:
            raise VerificationError("anchor node is not in this graph", node=node.label())
        return self._nodes.index(node)

    # ----- removing ------------------------------------------------------

    def remove(self, node: Node) -> None:
        """Remove ``node``; its outputs must have no readers left."""
        if node._graph is not self:
            raise VerificationError("node is not in this graph", node=node.label())
        for value in node._outputs:
            if value._uses or value.is_graph_output:
                readers = ", ".join(n.label() for n in value.consumers()) or "graph outputs"
                raise VerificationError(
                    f"cannot remove {node.op}: output %{value.name} is still read by {readers}",
                    node=node.label(),
                )
        node._detach()
        self._nodes.remove(node)
        node._graph = None
        self._touch()
        for value in node._outputs:
            self._unregister(value)

    def remove_nodes(self, nodes: Iterable[Node]) -> None:
        """Remove ``nodes`` at once, in time linear in the graph (one :meth:`remove` per node
        searches the node list each time). Their outputs may be read only by each other."""
        gone = set(nodes)
        for node in gone:
            if node._graph is not self:
                raise VerificationError("node is not in this graph", node=node.label())
            for value in node._outputs:
                readers = [n for n, _ in value._uses if n not in gone]
                if readers or value.is_graph_output:
                    names = ", ".join(n.label() for n in readers) or "graph outputs"
                    raise VerificationError(
                        f"cannot remove {node.op}: output %{value.name} is still read by {names}",
                        node=node.label(),
                    )
        for node in gone:
            node._detach()
        self._nodes = [node for node in self._nodes if node not in gone]
        for node in gone:
            node._graph = None
            for value in node._outputs:
                self._unregister(value)
        self._touch()

    def remove_constant(self, value: Value) -> None:
        """Remove an unused constant."""
        if value._uses or value.is_graph_output:
            raise VerificationError(f"constant %{value.name} is still in use")
        del self._constants[value.name]
        self._unregister(value)

    def remove_input(self, value: Value) -> None:
        """Remove an unused graph input."""
        if value._uses or value.is_graph_output:
            raise VerificationError(f"input %{value.name} is still in use")
        self._inputs.remove(value)
        self._unregister(value)

    # ----- whole-graph operations --------------------------------------------

    def sort(self) -> None:
        """Put the nodes in topological order (stable); raise on a cycle."""
        pending = {node: 0 for node in self._nodes}
        for node in self._nodes:
            pending[node] = sum(1 for v in node._inputs if v is not None and v._producer in pending)
        ready = [node for node in self._nodes if pending[node] == 0]
        order: list[Node] = []
        position = {node: i for i, node in enumerate(self._nodes)}
        import heapq

        heap = [(position[n], i, n) for i, n in enumerate(ready)]
        heapq.heapify(heap)
        tie = itertools.count(len(heap))
        while heap:
            _, _, node = heapq.heappop(heap)
            order.append(node)
            for out in node._outputs:
                for reader, _ in out._uses:
                    if reader in pending:
                        pending[reader] -= 1
                        if pending[reader] == 0:
                            heapq.heappush(heap, (position[reader], next(tie), reader))
        if len(order) != len(self._nodes):
            stuck = [n.label() for n in self._nodes if n not in set(order)][:5]
            raise VerificationError(f"the graph has a cycle through {', '.join(stuck)}")
        self._nodes = order
        self._touch()

    def copy(self) -> Graph:
        """A structural copy (constant data is shared; it is read-only)."""
        return self.extract([v.name for v in self._inputs], [v.name for v in self._outputs])

    def extract(self, inputs: Sequence[str], outputs: Sequence[str]) -> Graph:
        """The subgraph computing ``outputs`` from ``inputs`` as a new graph.

        Values named in ``inputs`` become the new graph's inputs; everything
        else the outputs need (nodes and constants) is copied. Raises when an
        output depends on a graph input that is not among ``inputs``.
        """
        sub = Graph(self.name)
        mapping: dict[Value, Value] = {}
        for name in inputs:
            value = self[name]
            mapping[value] = sub.add_input(name, value.type)
        wanted = [self[name] for name in outputs]
        needed: set[Node] = set()
        stack = [v for v in wanted if v not in mapping]
        seen: set[Value] = set()
        while stack:
            value = stack.pop()
            if value in seen or value in mapping:
                continue
            seen.add(value)
            if value.is_const:
                continue
            if value._producer is None:
                raise VerificationError(
                    f"output depends on graph input %{value.name}, which is not an input of the"
                    " extracted subgraph"
                )
            needed.add(value._producer)
            stack.extend(v for v in value._producer._inputs if v is not None)

        def copy_of(value: Value | None) -> Value | None:
            if value is None:
                return None
            if value not in mapping:
                assert value.const is not None
                const = Value(value.name, value.type, value.const)
                sub._register(const)
                sub._constants[const.name] = const
                mapping[value] = const
            return mapping[value]

        for node in self._nodes:
            if node not in needed:
                continue
            ins = [copy_of(v) for v in node._inputs]
            outs = [Value(v.name, v.type) for v in node._outputs]
            sub.insert(Node(node.op, ins, outs, node.attrs, node.name))
            mapping.update(zip(node._outputs, outs))
        for value in wanted:
            copy_of(value)
        sub.set_outputs(mapping[v] for v in wanted)
        sub._counter = itertools.count(next(self._counter))
        return sub

    def __str__(self) -> str:
        return to_text(self)

    def __repr__(self) -> str:
        return (
            f"Graph({self.name!r}: {len(self._inputs)} inputs, {len(self._constants)} constants,"
            f" {len(self._nodes)} nodes, {len(self._outputs)} outputs)"
        )
