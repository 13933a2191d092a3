"""Recognise how exporters write GELU and LayerNorm, and fuse them into one op each.

The integer lowering has one kernel per op (``QGelu``, ``QLayerNorm``), so the
float graph must say ``Gelu`` and ``LayerNormalization``, whatever the
exporter wrote:

- ``gelu-erf``: ``x * (erf(x / sqrt2) + 1) * 0.5`` in any order of the
  products (``Div`` by sqrt2 or ``Mul`` by 1/sqrt2) becomes ``Gelu(x)``.
- ``gelu-tanh``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``
  (``Pow(x, 3)`` or ``x * x * x``) becomes ``Gelu(x, approximate="tanh")``.
- ``layernorm``: ``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)``, over
  the last axis, with an optional ``* gamma`` and ``+ beta``, becomes
  ``LayerNormalization(x, gamma, beta)``.

Matching looks through products and sums in any operand order; inner values
other nodes also read are kept for them. Constants are compared with a
relative tolerance of 1e-3 (exporters print 1.4142135 or 0.70710677).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from intq.ir.graph import Graph, Node, Value
from intq.passes.manager import Pass

_TOL = 1e-3


def _scalar(value: Value | None) -> float | None:
    if value is None or value.const is None or value.const.size != 1:
        return None
    return float(np.asarray(value.const).reshape(()))


def _close(got: float | None, want: float) -> bool:
    return got is not None and abs(got - want) <= _TOL * abs(want)


def _private(value: Value | None, op: str | tuple[str, ...]) -> Node | None:
    """The producer of ``value`` if it is an ``op`` read by one node only."""
    if value is None or value.producer is None or value.is_graph_output:
        return None
    node = value.producer
    ops = (op,) if isinstance(op, str) else op
    if node.op not in ops or len(value.uses()) != 1:
        return None
    return node


def _factors(value: Value, nodes: list[Node], top: bool = True) -> list[Value]:
    """The operands of a tree of ``Mul`` rooted at ``value`` (its nodes appended to ``nodes``;
    an inner product other nodes also read, such as a shared ``x * 0.5``, stays in the graph)."""
    node = value.producer
    if node is None or node.op != "Mul" or (not top and value.is_graph_output):
        return [value]
    nodes.append(node)
    out: list[Value] = []
    for operand in node.inputs:
        assert operand is not None
        out.extend(_factors(operand, nodes, top=False))
    return out


def _split(factors: list[Value]) -> tuple[float, list[Value]]:
    """The product of the scalar constants among ``factors``, and the other factors."""
    constant, rest = 1.0, []
    for f in factors:
        c = _scalar(f)
        if c is None:
            rest.append(f)
        else:
            constant *= c
    return constant, rest


def _plus_one(value: Value, inner_op: str, nodes: list[Node]) -> Node | None:
    """``inner_op(...) + 1`` (either order): returns the inner node."""
    add = _private(value, "Add")
    if add is None:
        return None
    for a, b in (add.inputs, add.inputs[::-1]):
        inner = _private(a, inner_op)
        if inner is not None and _close(_scalar(b), 1.0):
            nodes += [add, inner]
            return inner
    return None


def _scaled_by(value: Value | None, x: Value, factor: float, nodes: list[Node]) -> bool:
    """``value`` is ``x * factor`` (a ``Mul``, or a ``Div`` by ``1 / factor``)."""
    node = _private(value, ("Mul", "Div"))
    if node is None:
        return False
    a, b = node.inputs
    if node.op == "Div":
        ok = a is x and _close(_scalar(b), 1 / factor)
    else:
        ok = (a is x and _close(_scalar(b), factor)) or (b is x and _close(_scalar(a), factor))
    if ok:
        nodes.append(node)
    return ok


def _half_x_times_one_plus(node: Node, inner_op: str) -> Iterator[tuple[Value, Node, list[Node]]]:
    """Each way ``node`` is ``0.5 * x * (inner_op(...) + 1)``: ``x``, the inner node and the
    nodes matched so far."""
    nodes: list[Node] = []
    constant, rest = _split(_factors(node.output, nodes))
    if len(rest) != 2 or not _close(constant, 0.5):
        return
    for x, other in (rest, rest[::-1]):
        inner: list[Node] = []
        found = _plus_one(other, inner_op, inner)
        if found is not None:
            yield x, found, nodes + inner


def _gelu_erf(node: Node) -> tuple[Value, str, list[Node]] | None:
    for x, erf, nodes in _half_x_times_one_plus(node, "Erf"):
        if _scaled_by(erf.inputs[0], x, 1 / math.sqrt(2), nodes):
            return x, "none", nodes
    return None


def _cube(value: Value | None, x: Value, nodes: list[Node]) -> bool:
    pow_node = _private(value, "Pow")
    if pow_node is not None and pow_node.inputs[0] is x and _close(_scalar(pow_node.inputs[1]), 3):
        nodes.append(pow_node)
        return True
    if value is None:
        return False
    inner: list[Node] = []
    factors = _factors(value, inner, top=False)
    if len(factors) == 3 and all(f is x for f in factors):
        nodes += inner
        return True
    return False


def _gelu_tanh(node: Node) -> tuple[Value, str, list[Node]] | None:
    for x, tanh, nodes in _half_x_times_one_plus(node, "Tanh"):
        arg: list[Node] = []
        c, terms = _split(_factors(tanh.inputs[0], arg, top=False))  # type: ignore[arg-type]
        add = _private(terms[0], "Add") if len(terms) == 1 else None
        if add is None or not _close(c, math.sqrt(2 / math.pi)):
            continue
        for a, b in (add.inputs, add.inputs[::-1]):
            cubic: list[Node] = []
            k, cube = _split(_factors(b, cubic, top=False))  # type: ignore[arg-type]
            if a is x and len(cube) == 1 and _close(k, 0.044715) and _cube(cube[0], x, cubic):
                return x, "tanh", nodes + arg + [add] + cubic
    return None


def _mean_of(value: Value | None, nodes: list[Node]) -> Value | None:
    """``ReduceMean(v)`` over the last axis, keeping dims: returns ``v``."""
    node = _private(value, "ReduceMean")
    if node is None:
        return None
    x = node.inputs[0]
    assert x is not None
    axes = node.attrs.get("axes") or ()
    if tuple(axes) not in ((x.type.rank - 1,), (-1,)) or not node.attrs.get("keepdims", 1):
        return None
    nodes.append(node)
    return x


def _layernorm(node: Node) -> tuple[Value, float, list[Node]] | None:
    """``Div(x - mean, Sqrt(mean((x - mean)^2) + eps))`` rooted at the ``Div``."""
    centred, std = node.inputs
    if centred is None or centred.producer is None or centred.producer.op != "Sub":
        return None
    sub = centred.producer
    x, mean = sub.inputs
    if x is None or centred.is_graph_output:
        return None
    nodes = [sub]
    if _mean_of(mean, nodes) is not x:
        return None
    sqrt = _private(std, "Sqrt")
    add = _private(sqrt.inputs[0] if sqrt else None, "Add")
    if sqrt is None or add is None:
        return None
    nodes += [sqrt, add]
    for var, eps_value in (add.inputs, add.inputs[::-1]):
        eps = _scalar(eps_value)
        inner: list[Node] = []
        squared = _private(_mean_of(var, inner), ("Pow", "Mul"))
        if eps is None or squared is None:
            continue
        a, b = squared.inputs
        readers = {id(u.node) for u in centred.uses()}  # the square and this Div, no other
        square = b is centred if squared.op == "Mul" else _close(_scalar(b), 2.0)
        if a is centred and square and readers == {id(squared), id(node)}:
            return x, eps, nodes + inner + [squared]
    return None


def _affine(value: Value, op: str) -> tuple[Node, Value] | None:
    """The sole reader of ``value`` if it is ``op`` with a constant per-channel operand."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output:
        return None
    reader = uses[0].node
    if reader.op != op:
        return None
    other = reader.inputs[1 - uses[0].index]
    if other is None or other.const is None:
        return None
    # One factor per channel of the last axis, broadcast along the others: a [C, 1] or a
    # higher-rank constant of C elements would scale rows, or change the value's shape.
    shape, size = other.const.shape, value.type.shape[-1]
    if other.const.size != size or len(shape) > value.type.rank or shape[-1:] not in ((), (size,)):
        return None
    return reader, other


@dataclass(frozen=True)
class FuseTransformer(Pass):
    """Fuse decomposed GELU and LayerNorm into ``Gelu`` and ``LayerNormalization``."""

    name: ClassVar[str] = "fuse-transformer"

    def apply(self, graph: Graph) -> bool:
        changed = False
        for node in graph:
            if node.graph is not graph:  # removed by an earlier fusion in this sweep
                continue
            if node.op == "Mul":
                found = _gelu_erf(node) or _gelu_tanh(node)
                if found is not None:
                    x, approximate, nodes = found
                    self._replace(graph, node, nodes, "Gelu", [x], {"approximate": approximate})
                    changed = True
            elif node.op == "Div":
                ln = _layernorm(node)
                if ln is not None:
                    x, eps, nodes = ln
                    self._fuse_layernorm(graph, node, nodes, x, eps)
                    changed = True
        return changed

    def _fuse_layernorm(
        self, graph: Graph, div: Node, nodes: list[Node], x: Value, eps: float
    ) -> None:
        size = x.type.shape[-1]
        root, gamma, beta = div, np.ones(size, np.float32), np.zeros(size, np.float32)
        scaled = _affine(root.output, "Mul")
        if scaled is not None:
            root, g = scaled
            gamma = np.asarray(g.const, np.float32).reshape(size)
            nodes = [*nodes, div]
            shifted = _affine(root.output, "Add")
            if shifted is not None:
                nodes.append(root)
                root, b = shifted
                beta = np.asarray(b.const, np.float32).reshape(size)
        else:
            nodes = list(nodes)
        g_value = graph.add_constant(gamma, graph.unique_name(f"{root.label()}.gamma"))
        b_value = graph.add_constant(beta, graph.unique_name(f"{root.label()}.beta"))
        attrs = {"axis": x.type.rank - 1, "epsilon": eps}
        self._replace(graph, root, nodes, "LayerNormalization", [x, g_value, b_value], attrs)

    @staticmethod
    def _replace(
        graph: Graph, root: Node, nodes: list[Node], op: str, inputs: list[Value], attrs: dict
    ) -> None:
        fused = graph.add(op, inputs, attrs, name=root.label(), before=root)
        name = root.output.name
        root.output.replace_all_uses_with(fused.output)
        dead = {id(n): n for n in (root, *nodes)}
        while dead:  # remove readers before what they read
            free = [n for n in dead.values() if not any(v.uses() for v in n.outputs)]
            if not free:
                break
            for node in free:
                graph.remove(node)
                del dead[id(node)]
        if graph.find(name) is None:
            graph.rename(fused.output, name)
