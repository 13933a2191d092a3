"""Rule tables: one dictionary per concern, keyed by op name, filled by a decorator.

Reference kernels, integer lowerings and range rules each live in one table
next to the code that reads it, so adding an op means one entry per concern.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from intq.errors import UnsupportedOpError

if TYPE_CHECKING:
    from intq.ir.graph import Node

Rule = TypeVar("Rule", bound=Callable[..., object])


class RuleTable(dict[str, Rule]):
    """Op name -> rule; ``@table.register("A", "B")`` adds one function under several names."""

    def rule_for(self, node: Node, what: str) -> Rule:
        """The rule for ``node``'s op, or an :class:`UnsupportedOpError` naming the node and
        listing the ops that have one (``what``: "integer lowering", ...)."""
        rule = self.get(node.op)
        if rule is None:
            raise UnsupportedOpError(
                f"{node.op} has no {what}",
                node=node.label(),
                hint="these ops have one: " + ", ".join(sorted(self)),
            )
        return rule

    def register(self, *names: str) -> Callable[[Rule], Rule]:
        """Decorator adding the function under each of ``names`` (each at most once)."""

        def add(fn: Rule) -> Rule:
            for name in names:
                if name in self:
                    raise ValueError(f"{name} registered twice")
                self[name] = fn
            return fn

        return add
