"""How an IR op is described: arity, attributes, canonical form, shape rule.

An :class:`OpDef` holds one op's arity, its attributes (with defaults), an
optional ``canonicalize`` hook that makes attributes explicit (so the IR
text always spells out strides, pads, axes...), and ``infer``, the shape and
dtype rule, which also rejects illegal dtypes. The reference semantics of
each op live in :mod:`intq.semantics.numpy_eval`, one table entry per op.

Each op family defines its entries in its own module with :class:`OpTable`;
:mod:`intq.ops.registry` joins those tables explicitly (no registration by import).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from intq.errors import ShapeError, VerificationError
from intq.ir.types import TensorType

if TYPE_CHECKING:
    from intq.ir.graph import AttrValue, Value


REQUIRED: Any = object()
"""Default of an attribute that has no default."""

_KINDS: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, float),
    "str": lambda v: isinstance(v, str),
    "ints": lambda v: isinstance(v, tuple) and all(_KINDS["int"](x) for x in v),
    "floats": lambda v: isinstance(v, tuple) and all(isinstance(x, float) for x in v),
    "strs": lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v),
}


@dataclass(frozen=True)
class Attr:
    """An attribute's kind (``int``, ``float``, ``str``, ``ints``, ``floats``, ``strs``)
    and default."""

    kind: str
    default: Any = REQUIRED

    def coerce(self, value: Any) -> AttrValue:
        """Normalise ``value`` to this kind (lists become tuples, ints become floats)."""
        if self.kind == "float" and isinstance(value, (int, np.integer, np.floating)):
            value = float(value)
        elif self.kind == "int" and isinstance(value, np.integer):
            value = int(value)
        elif self.kind in ("ints", "floats", "strs") and isinstance(
            value, (list, tuple, np.ndarray)
        ):
            convert = {"ints": int, "floats": float, "strs": str}[self.kind]
            value = tuple(convert(x) for x in value)
        if not _KINDS[self.kind](value):
            raise TypeError(f"expected {self.kind}, got {value!r}")
        return value


class InferContext:
    """What a shape rule sees: input values (types and constant data) and attributes."""

    def __init__(self, op: str, inputs: Sequence[Value | None], attrs: Mapping[str, Any]):
        self.op = op
        self.inputs = inputs
        self.attrs = attrs

    def __len__(self) -> int:
        return len(self.inputs)

    def has(self, index: int) -> bool:
        """True when optional input ``index`` is present."""
        return index < len(self.inputs) and self.inputs[index] is not None

    def type(self, index: int) -> TensorType:
        """The type of input ``index`` (which must be present)."""
        value = self.inputs[index] if index < len(self.inputs) else None
        if value is None:
            raise ShapeError(f"{self.op} needs input {index}")
        return value.type

    def const(self, index: int) -> np.ndarray | None:
        """The constant data of input ``index``, or ``None`` when it is computed."""
        value = self.inputs[index] if index < len(self.inputs) else None
        return None if value is None else value.const

    def __getitem__(self, name: str) -> Any:
        return self.attrs[name]


InferRule = Callable[[InferContext], list[TensorType]]
Canonicalize = Callable[[dict[str, Any], Sequence[TensorType | None]], dict[str, Any]]


@dataclass(frozen=True)
class OpDef:
    """One op: arity, attributes, canonical form and shape/dtype rule."""

    name: str
    infer: InferRule
    min_inputs: int
    max_inputs: int
    attrs: Mapping[str, Attr] = field(default_factory=dict)
    canonicalize: Canonicalize | None = None
    doc: str = ""

    def check_arity(self, count: int, *, node: str = "") -> None:
        """Raise when ``count`` inputs do not fit this op."""
        if not self.min_inputs <= count <= self.max_inputs:
            want = (
                str(self.min_inputs)
                if self.min_inputs == self.max_inputs
                else f"{self.min_inputs} to {self.max_inputs}"
            )
            raise VerificationError(f"{self.name} takes {want} inputs, got {count}", node=node)

    def complete_attrs(
        self,
        attrs: Mapping[str, Any],
        *,
        node: str = "",
        inputs: Sequence[Value | None] = (),
    ) -> dict[str, AttrValue]:
        """Check attribute names and kinds, fill defaults, and canonicalise."""
        out: dict[str, Any] = {}
        for key in attrs:
            if key not in self.attrs:
                known = ", ".join(sorted(self.attrs)) or "none"
                raise VerificationError(
                    f"{self.name} has no attribute {key!r} (attributes: {known})", node=node
                )
        for key, spec in self.attrs.items():
            if key in attrs:
                try:
                    out[key] = spec.coerce(attrs[key])
                except TypeError as err:
                    raise VerificationError(
                        f"{self.name} attribute {key!r}: {err}", node=node
                    ) from None
            elif spec.default is REQUIRED:
                raise VerificationError(f"{self.name} needs attribute {key!r}", node=node)
            else:
                out[key] = spec.default
        if self.canonicalize is not None:
            types = [None if v is None else v.type for v in inputs]
            try:
                out = self.canonicalize(out, types)
            except ShapeError as err:
                raise ShapeError(err.message, node=node, hint=err.hint) from None
            out = {key: self.attrs[key].coerce(value) for key, value in out.items()}
        return out

    def infer_types(
        self, inputs: Sequence[Value | None], attrs: Mapping[str, AttrValue], *, node: str = ""
    ) -> list[TensorType]:
        """The output types for these inputs and attributes; errors name ``node``."""
        try:
            return self.infer(InferContext(self.name, inputs, attrs))
        except ShapeError as err:
            raise ShapeError(err.message, node=node, hint=err.hint) from None


class OpTable(dict[str, OpDef]):
    """A family's ops, filled with the :meth:`op` decorator on shape rules."""

    def op(
        self,
        name: str,
        *,
        inputs: int | tuple[int, int] = 1,
        attrs: Mapping[str, Attr] | None = None,
        canonicalize: Canonicalize | None = None,
    ) -> Callable[[InferRule], InferRule]:
        """Register ``name`` with the decorated function as its shape rule."""
        low, high = (inputs, inputs) if isinstance(inputs, int) else inputs

        def register(rule: InferRule) -> InferRule:
            if name in self:
                raise ValueError(f"op {name} registered twice")
            self[name] = OpDef(
                name, rule, low, high, dict(attrs or {}), canonicalize, (rule.__doc__ or "").strip()
            )
            return rule

        return register
