"""The op registry: every IR op by name, joined from the per-family tables."""

from __future__ import annotations

from intq.errors import UnsupportedOpError
from intq.ops import float_ops, integer_ops, shape_ops
from intq.ops.schema import OpDef, Trait

OPS: dict[str, OpDef] = {**float_ops.OPS, **shape_ops.OPS, **integer_ops.OPS}
"""Every IR op. A new family adds its table here."""


def get_op(name: str, *, node: str = "") -> OpDef:
    """The definition of IR op ``name``; raises :class:`UnsupportedOpError` when unknown."""
    try:
        return OPS[name]
    except KeyError:
        raise UnsupportedOpError(
            f"unknown IR op {name!r}",
            node=node,
            hint=f"the IR ops are: {', '.join(sorted(OPS))}",
        ) from None


def ops_with(trait: Trait) -> tuple[str, ...]:
    """The names of the ops that have ``trait``, sorted (to register one rule for all)."""
    return tuple(sorted(name for name, opdef in OPS.items() if opdef.has(trait)))
