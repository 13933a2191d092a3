"""Declarative rewrites: patterns, rules, and the driver that applies them.

A :class:`Rule` is a pattern, a ``check`` that returns the reason a match
must not be rewritten (or ``None``), and a ``rewrite`` that builds the
replacement. The matcher (:class:`Op`, :class:`Var`, :class:`Const`,
:class:`Opt`) and the worklist driver (:func:`apply_rules`) know nothing of
particular rules; passes such as BatchNorm folding are lists of rules.

Example: ``Op("BatchNormalization", Op("Conv", Var("x"), Const("w"), Opt(Const("b")),
name="conv"), Const("scale"), ...)`` binds the Conv node as ``m["conv"]`` and its
weight as ``m["w"]``. Inner op patterns by default match only values read by
the matched subgraph alone, so removing the matched nodes never breaks
another reader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from intq.ir.graph import Graph, Node, Value


class Match:
    """What a pattern bound: nodes and values by name, and the root node."""

    def __init__(self, root: Node):
        self.root = root
        self.nodes: dict[str, Node] = {}
        self.values: dict[str, Value | None] = {}
        self.matched: list[Node] = []

    def __getitem__(self, name: str) -> Any:
        if name in self.nodes:
            return self.nodes[name]
        return self.values[name]

    def const(self, name: str) -> Any:
        """The constant data bound to ``name`` (``None`` for an absent optional input)."""
        value = self.values[name]
        return None if value is None else value.const


class Pattern:
    """Matches one value (an input of the node above it in the pattern)."""

    def match(self, value: Value | None, m: Match) -> bool:
        """Bind into ``m`` and return True when ``value`` fits."""
        raise NotImplementedError


@dataclass(frozen=True)
class Var(Pattern):
    """Any present value, bound as ``name``; a second use of the name must be the same value."""

    name: str

    def match(self, value: Value | None, m: Match) -> bool:
        if value is None:
            return False
        bound = m.values.setdefault(self.name, value)
        return bound is value


@dataclass(frozen=True)
class Const(Pattern):
    """A constant value, bound as ``name``."""

    name: str

    def match(self, value: Value | None, m: Match) -> bool:
        return value is not None and value.is_const and Var(self.name).match(value, m)


@dataclass(frozen=True)
class Opt(Pattern):
    """An optional input: absent (bound as ``None``) or matching ``pattern``."""

    pattern: Pattern

    def match(self, value: Value | None, m: Match) -> bool:
        if value is None:
            for name in _names(self.pattern):
                m.values.setdefault(name, None)
            return True
        return self.pattern.match(value, m)


@dataclass(frozen=True)
class Op(Pattern):
    """A node of op ``op`` (or one of several) whose inputs match ``inputs`` in order.

    Inputs beyond the patterns given are not looked at; missing inputs are
    ``None`` (use :class:`Opt`). ``shared=True`` lets an inner node's output
    have readers outside the match (the node is then kept after the rewrite).
    """

    op: str | tuple[str, ...]
    inputs: tuple[Pattern, ...] = ()
    name: str | None = None
    shared: bool = False

    def __init__(
        self,
        op: str | tuple[str, ...],
        *inputs: Pattern,
        name: str | None = None,
        shared: bool = False,
    ):
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "shared", shared)

    @property
    def ops(self) -> tuple[str, ...]:
        """The op names this pattern accepts."""
        return (self.op,) if isinstance(self.op, str) else self.op

    def match(self, value: Value | None, m: Match) -> bool:
        if value is None or value.producer is None:
            return False
        if not self.shared and (len(value.uses()) != 1 or value.is_graph_output):
            return False
        return self.match_node(value.producer, m)

    def match_node(self, node: Node, m: Match) -> bool:
        """Match this pattern with ``node`` as its root."""
        if node.op not in self.ops:
            return False
        if self.name is not None:
            if m.nodes.setdefault(self.name, node) is not node:
                return False
        inputs = node.inputs
        for index, pattern in enumerate(self.inputs):
            value = inputs[index] if index < len(inputs) else None
            if not pattern.match(value, m):
                return False
        if not self.shared:
            m.matched.append(node)
        return True


def _names(pattern: Pattern) -> Iterable[str]:
    if isinstance(pattern, (Var, Const)):
        yield pattern.name
    elif isinstance(pattern, Opt):
        yield from _names(pattern.pattern)
    elif isinstance(pattern, Op):
        for inner in pattern.inputs:
            yield from _names(inner)


Check = Callable[[Match], "str | None"]
Rewrite = Callable[[Graph, Match], "Sequence[Value] | None"]


def _always(m: Match) -> str | None:
    return None


@dataclass(frozen=True)
class Rule:
    """``pattern`` -> ``rewrite(graph, match)``, when ``check(match)`` gives no reason not to.

    ``rewrite`` inserts new nodes before ``match.root`` and returns the values
    replacing the root's outputs, in order.
    """

    name: str
    pattern: Op
    rewrite: Rewrite
    check: Check = field(default=_always)


Trace = Callable[[Rule, Node, str], None]
"""Called with (rule, root node, reason) when a rule matched but its check refused."""


def apply_rules(
    graph: Graph, rules: Sequence[Rule], *, trace: Trace | None = None, max_rounds: int = 16
) -> int:
    """Apply ``rules`` until none fires (or ``max_rounds``); returns the number of rewrites.

    The root's outputs keep their names; matched nodes nobody reads any more are removed.
    """
    by_op: dict[str, list[Rule]] = {}
    for rule in rules:
        for op in rule.pattern.ops:
            by_op.setdefault(op, []).append(rule)
    total = 0
    for _ in range(max_rounds):
        fired = 0
        for node in graph:
            for rule in by_op.get(node.op, ()):
                m = Match(node)
                if not rule.pattern.match_node(node, m):
                    continue
                reason = rule.check(m)
                if reason is not None:
                    if trace is not None:
                        trace(rule, node, reason)
                    continue
                replacements = rule.rewrite(graph, m)
                if replacements is None:
                    continue
                _replace_root(graph, m, replacements)
                fired += 1
                break
        total += fired
        if not fired:
            break
    return total


def _replace_root(graph: Graph, m: Match, replacements: Sequence[Value]) -> None:
    root = m.root
    names = [v.name for v in root.outputs]
    for old, new in zip(root.outputs, replacements, strict=True):
        old.replace_all_uses_with(new)
    # Inner nodes are recorded in post-order, so walking backwards frees each before its inputs.
    for node in [root, *reversed(m.matched)]:
        if node.graph is graph and not any(v.uses() or v.is_graph_output for v in node.outputs):
            graph.remove(node)
    for new, name in zip(replacements, names):
        if graph.find(name) is None and new.producer is not None:
            graph.rename(new, name)
