"""Declarative rewrites: patterns, rules, and the driver that applies them.

A :class:`Rule` is a pattern, a ``check`` that returns the reason a match
must not be rewritten (or ``None``), and a ``rewrite`` that builds the
replacement. The matcher (:class:`Op`, :class:`Tree`, :class:`Var`,
:class:`Const`, :class:`Opt`, :class:`AnyOf`) and the worklist driver
(:func:`apply_rules`) know nothing of particular rules; passes such as
BatchNorm folding are lists of rules.

Example: ``Op("BatchNormalization", Op("Conv", Var("x"), Const("w"), Opt(Const("b")),
name="conv"), Const("scale"), ...)`` binds the Conv node as ``m["conv"]`` and its
weight as ``m["w"]``.

Matching backtracks: a pattern yields every way a value fits it
(:meth:`Pattern.solutions`), so commutative operands (``Op(...,
commutative=True)``), alternatives (:class:`AnyOf`) and the operands of a tree
of associative ops (:class:`Tree`) are tried in each arrangement until the
whole pattern fits. A name used twice must bind the same value (:class:`Var`)
or the same node (an ``Op`` ``name``).

Inner op patterns by default match only values read by nodes of the match
alone (and not returned by the graph), so removing the matched nodes never
breaks another reader; ``shared=True`` lifts that for one pattern. The driver
tells a rule's ``trace`` both the check's reason and such a value with other
readers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from intq.ir.graph import Graph, Node, Value


class Match:
    """What a pattern bound: nodes and values by name, and the root node.

    ``matched`` lists every node of the match, each after the matched nodes it
    reads; ``private`` the inner values that only nodes of the match may read.
    """

    def __init__(self, root: Node):
        self.root = root
        self.nodes: dict[str, Node] = {}
        self.values: dict[str, Value | None] = {}
        self.rests: dict[str, tuple[Value | None, ...]] = {}
        self.matched: list[Node] = []
        self.private: list[Value] = []

    def copy(self) -> Match:
        """An independent copy: extending it leaves this match as it is."""
        other = Match(self.root)
        other.nodes = dict(self.nodes)
        other.values = dict(self.values)
        other.rests = dict(self.rests)
        other.matched = list(self.matched)
        other.private = list(self.private)
        return other

    def __getitem__(self, name: str) -> Any:
        if name in self.nodes:
            return self.nodes[name]
        if name in self.rests:
            return self.rests[name]
        return self.values[name]

    def const(self, name: str) -> Any:
        """The constant data bound to ``name`` (``None`` for an absent optional input)."""
        value = self.values[name]
        return None if value is None else value.const

    def record(self, node: Node, *, private: bool) -> None:
        """Add ``node`` to the match (once); ``private``: only the match may read its outputs."""
        if any(n is node for n in self.matched):
            return
        self.matched.append(node)
        if private:
            self.private.extend(node.outputs)

    def leak(self) -> str | None:
        """Why the matched nodes could not all go: a private value another node reads or the
        graph returns (``None`` when there is none)."""
        inside = {id(n) for n in self.matched}
        for value in self.private:
            if value.is_graph_output:
                return f"%{value.name} is returned by the graph"
            for reader in value.consumers():
                if id(reader) not in inside:
                    return f"%{value.name} is also read by {reader.label()}"
        return None


class Pattern:
    """Matches one value (an input of the node above it in the pattern).

    Subclasses implement :meth:`solutions`, or, when a value fits in at most one
    way, :meth:`match`.
    """

    def solutions(self, value: Value | None, m: Match) -> Iterator[Match]:
        """Each way ``value`` fits, as an extended copy of ``m`` (``m`` itself is not changed)."""
        if type(self).match is Pattern.match:
            raise NotImplementedError(f"{type(self).__name__} implements neither method")
        trial = m.copy()
        if self.match(value, trial):
            yield trial

    def match(self, value: Value | None, m: Match) -> bool:
        """Bind into ``m`` the first way ``value`` fits and return True; False leaves ``m``."""
        if type(self).solutions is Pattern.solutions:
            raise NotImplementedError(f"{type(self).__name__} implements neither method")
        for found in self.solutions(value, m):
            m.__dict__.update(found.__dict__)
            return True
        return False


def _bind(m: Match, name: str, value: Value | None) -> Match | None:
    """``m`` with ``name`` bound to ``value``; ``None`` if it is bound to another value."""
    if name in m.values:
        return m if m.values[name] is value else None
    m = m.copy()
    m.values[name] = value
    return m


@dataclass(frozen=True)
class Var(Pattern):
    """Any present value, bound as ``name``; a second use of the name must be the same value."""

    name: str

    def solutions(self, value: Value | None, m: Match) -> Iterator[Match]:
        found = None if value is None else _bind(m, self.name, value)
        if found is not None:
            yield found


@dataclass(frozen=True)
class Const(Pattern):
    """A constant value, bound as ``name``."""

    name: str

    def solutions(self, value: Value | None, m: Match) -> Iterator[Match]:
        if value is not None and value.is_const:
            yield from Var(self.name).solutions(value, m)


@dataclass(frozen=True)
class Opt(Pattern):
    """An optional input: absent (bound as ``None``) or matching ``pattern``."""

    pattern: Pattern

    def solutions(self, value: Value | None, m: Match) -> Iterator[Match]:
        if value is not None:
            yield from self.pattern.solutions(value, m)
            return
        m = m.copy()
        for name in _names(self.pattern):
            m.values.setdefault(name, None)
        yield m


@dataclass(frozen=True)
class AnyOf(Pattern):
    """The value matches one of ``patterns``, tried in order.

    Names only the other alternatives bind are bound to ``None``, so a check can
    tell which alternative matched.
    """

    patterns: tuple[Pattern, ...]

    def __init__(self, *patterns: Pattern):
        object.__setattr__(self, "patterns", patterns)

    def solutions(self, value: Value | None, m: Match) -> Iterator[Match]:
        names = {name for p in self.patterns for name in _names(p)}
        for pattern in self.patterns:
            for found in pattern.solutions(value, m):
                missing = names - found.values.keys()
                if missing:
                    found = found.copy()
                    found.values.update(dict.fromkeys(missing))
                yield found


class NodePattern(Pattern):
    """A pattern rooted at a node: what a :class:`Rule` matches (its ``ops`` index the rule)."""

    @property
    def ops(self) -> tuple[str, ...]:
        """The op names a root node may have."""
        raise NotImplementedError

    def node_solutions(self, node: Node, m: Match) -> Iterator[Match]:
        """Each way the pattern fits with ``node`` as its root (outputs readable by anyone)."""
        raise NotImplementedError

    def match_node(self, node: Node, m: Match) -> bool:
        """Bind into ``m`` the first complete match rooted at ``node`` (one whose private
        values no other node reads) and return True; False leaves ``m`` as it was."""
        for found in self.node_solutions(node, m):
            if found.leak() is None:
                m.__dict__.update(found.__dict__)
                return True
        return False


def _inputs(
    patterns: Sequence[Pattern], values: Sequence[Value | None], m: Match
) -> Iterator[Match]:
    """Each way ``values`` match ``patterns`` pairwise, left to right."""
    if not patterns:
        yield m
        return
    for found in patterns[0].solutions(values[0], m):
        yield from _inputs(patterns[1:], values[1:], found)


@dataclass(frozen=True)
class Op(NodePattern):
    """A node of op ``op`` (or one of several) whose inputs match ``inputs`` in order.

    Inputs beyond the patterns given are not looked at; missing inputs are
    ``None`` (use :class:`Opt`). ``commutative=True`` (two input patterns) also
    tries them against the node's inputs swapped. ``name`` binds the node; the
    same name elsewhere in the pattern must be the same node. ``shared=True``
    lets an inner node's outputs have readers outside the match (the node is
    then kept while they read it).
    """

    op: str | tuple[str, ...]
    inputs: tuple[Pattern, ...] = ()
    name: str | None = None
    shared: bool = False
    commutative: bool = False

    def __init__(
        self,
        op: str | tuple[str, ...],
        *inputs: Pattern,
        name: str | None = None,
        shared: bool = False,
        commutative: bool = False,
    ):
        if commutative and len(inputs) != 2:
            raise ValueError(f"a commutative {op} pattern needs two inputs, not {len(inputs)}")
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "shared", shared)
        object.__setattr__(self, "commutative", commutative)

    @property
    def ops(self) -> tuple[str, ...]:
        """The op names this pattern accepts."""
        return (self.op,) if isinstance(self.op, str) else self.op

    def solutions(self, value: Value | None, m: Match) -> Iterator[Match]:
        if value is None or value.producer is None:
            return
        yield from self._solutions(value.producer, m, private=not self.shared)

    def node_solutions(self, node: Node, m: Match) -> Iterator[Match]:
        yield from self._solutions(node, m, private=False)

    def _solutions(self, node: Node, m: Match, *, private: bool) -> Iterator[Match]:
        if node.op not in self.ops:
            return
        if self.name is not None:
            if self.name in m.nodes:
                if m.nodes[self.name] is not node:
                    return
            else:
                m = m.copy()
                m.nodes[self.name] = node
        values = [node.inputs[i] if i < len(node.inputs) else None for i in range(len(self.inputs))]
        orders = [values]
        if self.commutative and values[0] is not values[1]:
            orders.append(values[::-1])
        for order in orders:
            for found in _inputs(self.inputs, order, m):
                found = found.copy()
                found.record(node, private=private)
                yield found


@dataclass(frozen=True)
class Tree(NodePattern):
    """A tree of ``op`` nodes (an associative, commutative op such as ``Mul`` or ``Add``)
    whose operands, in any order and any bracketing, match ``leaves``.

    The tree is every ``op`` node reachable from the root through operands that
    are ``op`` outputs, except values the graph returns (those are operands;
    an inner ``Tree`` does not match a value the graph returns). Each pattern
    in ``leaves`` takes one operand, tried in order, so the most selective
    should come first; the operands left over are bound, in order, as a tuple
    to ``rest`` (without ``rest`` there must be none). ``shared=True`` lets the
    tree's inner nodes (and, for an inner ``Tree``, its root) have readers
    outside the match; they are kept while those read them.
    """

    op: str
    leaves: tuple[Pattern, ...] = ()
    rest: str | None = None
    shared: bool = False

    def __init__(self, op: str, *leaves: Pattern, rest: str | None = None, shared: bool = False):
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "leaves", leaves)
        object.__setattr__(self, "rest", rest)
        object.__setattr__(self, "shared", shared)

    @property
    def ops(self) -> tuple[str, ...]:
        """The op name of the tree's nodes."""
        return (self.op,)

    def solutions(self, value: Value | None, m: Match) -> Iterator[Match]:
        if value is None or value.producer is None or value.is_graph_output:
            return
        yield from self._solutions(value.producer, m, root_private=not self.shared)

    def node_solutions(self, node: Node, m: Match) -> Iterator[Match]:
        yield from self._solutions(node, m, root_private=False)

    def _solutions(self, root: Node, m: Match, *, root_private: bool) -> Iterator[Match]:
        if root.op != self.op:
            return
        nodes: list[Node] = []
        operands: list[Value | None] = []
        self._flatten(root, nodes, operands)
        for found, used in self._assign(0, operands, (), m):
            rest = tuple(v for i, v in enumerate(operands) if i not in used)
            if rest and self.rest is None:
                continue
            found = found.copy()
            if self.rest is not None:
                found.rests[self.rest] = rest
            for node in nodes:
                found.record(node, private=root_private if node is root else not self.shared)
            yield found

    def _flatten(self, node: Node, nodes: list[Node], operands: list[Value | None]) -> None:
        """Append the tree's nodes (each after the tree nodes it reads) and its operands."""
        for value in node.inputs:
            inner = None if value is None or value.is_graph_output else value.producer
            if inner is not None and inner.op == self.op:
                self._flatten(inner, nodes, operands)
            else:
                operands.append(value)
        nodes.append(node)

    def _assign(
        self, index: int, operands: list[Value | None], used: tuple[int, ...], m: Match
    ) -> Iterator[tuple[Match, tuple[int, ...]]]:
        """Each way leaf patterns ``index..`` take distinct operands not in ``used``."""
        if index == len(self.leaves):
            yield m, used
            return
        for i, value in enumerate(operands):
            if i not in used:
                for found in self.leaves[index].solutions(value, m):
                    yield from self._assign(index + 1, operands, (*used, i), found)


def _names(pattern: Pattern) -> Iterable[str]:
    """The value names a pattern binds."""
    if isinstance(pattern, (Var, Const)):
        yield pattern.name
    elif isinstance(pattern, Opt):
        yield from _names(pattern.pattern)
    elif isinstance(pattern, AnyOf):
        for inner in pattern.patterns:
            yield from _names(inner)
    elif isinstance(pattern, Op):
        for inner in pattern.inputs:
            yield from _names(inner)
    elif isinstance(pattern, Tree):
        for inner in pattern.leaves:
            yield from _names(inner)


def scalar(value: Value | None) -> float | None:
    """The number a one-element constant holds (any shape, any dtype), else ``None``."""
    if value is None or value.const is None or value.const.size != 1:
        return None
    return float(np.asarray(value.const).reshape(()))


def expect_close(what: str, got: float | None, want: float, rel: float = 1e-3) -> str | None:
    """A check's reason when ``got`` is not within ``rel`` (relative) of ``want``: ``None``
    when it is, else "``what`` is 0.49, not 0.5" (or "is not a one-element constant")."""
    if got is None:
        return f"{what} is not a one-element constant"
    if abs(got - want) <= rel * abs(want):
        return None
    return f"{what} is {got:.6g}, not {want:.6g}"


Check = Callable[[Match], "str | None"]
Rewrite = Callable[[Graph, Match], "Sequence[Value] | None"]


def _always(m: Match) -> str | None:
    return None


@dataclass(frozen=True)
class Rule:
    """``pattern`` -> ``rewrite(graph, match)``, when ``check(match)`` gives no reason not to.

    ``rewrite`` inserts new nodes before ``match.root`` and returns the values
    replacing the root's outputs, in order, or ``None`` to decline.
    """

    name: str
    pattern: NodePattern
    rewrite: Rewrite
    check: Check = field(default=_always)


Trace = Callable[[Rule, Node, str], None]
"""Called with (rule, root node, reason) when a rule's pattern fit but the rule was refused:
by its check, or because a value the match would remove has other readers."""


def apply_rules(
    graph: Graph, rules: Sequence[Rule], *, trace: Trace | None = None, max_rounds: int = 16
) -> int:
    """Apply ``rules`` until none fires (or ``max_rounds``); returns the number of rewrites.

    Each round visits the nodes in order and tries their rules in order; a rule
    fires on the first way its pattern fits that is neither refused by its check
    nor leaves a private value read elsewhere. The root's outputs keep their
    names; matched nodes nobody reads any more are removed.
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
                if _fire(graph, rule, node, trace):
                    fired += 1
                    break
        total += fired
        if not fired:
            break
    return total


def _fire(graph: Graph, rule: Rule, node: Node, trace: Trace | None) -> bool:
    """Try ``rule`` at ``node``; True when it rewrote the graph."""
    refused: str | None = None
    for m in rule.pattern.node_solutions(node, Match(node)):
        reason = m.leak() or rule.check(m)
        if reason is not None:
            refused = refused or reason
            continue
        replacements = rule.rewrite(graph, m)
        if replacements is None:
            return False
        _replace_root(graph, m, replacements)
        return True
    if refused is not None and trace is not None:
        trace(rule, node, refused)
    return False


def _replace_root(graph: Graph, m: Match, replacements: Sequence[Value]) -> None:
    root = m.root
    names = [v.name for v in root.outputs]
    for old, new in zip(root.outputs, replacements, strict=True):
        old.replace_all_uses_with(new)
    # Readers first (the match lists each node after those it reads); again until none is freed.
    pending = list(dict.fromkeys([root, *reversed(m.matched)]))
    freed = True
    while freed:
        freed = False
        for node in pending:
            if node.graph is graph and not any(v.uses() or v.is_graph_output for v in node.outputs):
                graph.remove(node)
                freed = True
    for new, name in zip(replacements, names):
        if graph.find(name) is None and new.producer is not None:
            graph.rename(new, name)
