"""How an IR op is described: arity, attributes, canonical form, shape rule, traits.

An :class:`OpDef` holds one op's arity, its attributes (with defaults), an
optional ``canonicalize`` hook that makes attributes explicit (so the IR
text always spells out strides, pads, axes...), and ``infer``, the shape and
dtype rule, which also rejects illegal dtypes. Its :class:`Trait` set and the
optional ``weight_axis``, ``non_negative_if`` and ``kernel`` entries are the facts
that passes and backends read about an op, instead of keeping lists of op names: a new
op states them once, here. The semantics of each op live in
:mod:`intq.semantics.numpy_eval`, one table entry per op; ``tests/test_rule_tables.py``
checks that every rule table covers every op that needs an entry.

Each op family defines its entries in its own module with :class:`OpTable`;
:mod:`intq.ops.registry` joins those tables explicitly (no registration by import).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from intq import limits
from intq.errors import ShapeError, VerificationError
from intq.ir.types import TensorType

if TYPE_CHECKING:
    from intq.ir.graph import AttrValue, Node, Value


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
AttrTest = Callable[[Mapping[str, Any]], bool]
WeightAxis = Callable[["Node"], "int | None"]


class Trait(enum.Enum):
    """A fact about an op that passes and backends act on. The value says what it means."""

    INTEGER = (
        "may compute on integers inside the integer region: the range analysis, the ONNX"
        " Runtime and the TVM lowerings each have a rule for it"
    )
    MOVEMENT = "moves values without arithmetic: an integer input keeps its per-tensor scale"
    PASS_THROUGH = (
        "one data input whose values it only moves, clamps or zero-pads: a layer's bit width"
        " reaches through it (mixed-precision ties)"
    )
    CONVEX = (
        "each output is a weighted mean of its input's values (weights >= 0 summing to 1):"
        " non-negative where the input is"
    )
    ACTIVATION = "an elementwise clamp that the integer lowering fuses into the rescale"
    NON_NEGATIVE = "its output is >= 0 for every input"
    WIDE = "feeds a transformer's residual stream and dense layers: quantized at wide_bits"
    BOUNDARY = "crosses between float and integer (Quantize, Dequantize)"
    ACCUMULATOR = "accumulates integer products or sums in int32"
    LAYER = "its integer result is a layer's output: a row of the per-layer table"
    DIVIDES = "divides at run time (an integer Div)"
    TAIL = (
        "may run in float after the output dequantization (a classifier's final Softmax):"
        " the backends lower it in float"
    )
    KERNEL = "computed by intq.semantics.kernels in a chosen variant (its OpDef.kernel)"
    FOLDED = "depends on shapes only: always folded to a constant before a graph runs"
    ELEMENTWISE = (
        "a pure function of each element, with no attribute that depends on the shape: an"
        " integer lowering may table it (one entry per input code)"
    )


@dataclass(frozen=True)
class KernelSpec:
    """An op computed by :mod:`intq.semantics.kernels` in one of several variants.

    ``key`` names it in ``QuantConfig.kernels`` (``{"softmax": "shift"}``); ``dividing``
    lists the variants that divide at run time (the integer-only census counts them).
    """

    key: str
    variants: tuple[str, ...]
    default: str
    dividing: tuple[str, ...] = ()


@dataclass(frozen=True)
class OpDef:
    """One op: arity, attributes, canonical form, shape/dtype rule and traits."""

    name: str
    infer: InferRule
    min_inputs: int
    max_inputs: int
    attrs: Mapping[str, Attr] = field(default_factory=dict)
    canonicalize: Canonicalize | None = None
    doc: str = ""
    traits: frozenset[Trait] = frozenset()
    weight_axis: WeightAxis | None = None
    """For a layer whose input 1 may be constant weights: ``weight_axis(node)``, the weights'
    output-channel axis (along which they are quantized per channel), or None when this
    node's form has no such axis (a Gemm with ``transA``)."""
    non_negative_if: AttrTest | None = None
    """For an op whose output is >= 0 only for some attributes (Clip with ``min >= 0``)."""
    kernel: KernelSpec | None = None

    def has(self, trait: Trait) -> bool:
        """Whether this op has ``trait``."""
        return trait in self.traits

    def is_non_negative(self, attrs: Mapping[str, Any]) -> bool:
        """Whether the output is >= 0 for every input, given the node's attributes."""
        if Trait.NON_NEGATIVE in self.traits:
            return True
        return self.non_negative_if is not None and bool(self.non_negative_if(attrs))

    def divides(self, attrs: Mapping[str, Any]) -> bool:
        """Whether a node of this op with ``attrs`` divides at run time."""
        if Trait.DIVIDES in self.traits:
            return True
        return self.kernel is not None and attrs.get("variant") in self.kernel.dividing

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
        """The output types for these inputs and attributes; errors name ``node``. Each must
        fit ``intq.limits.MAX_TENSOR_BYTES``: every node a front end, pass or the verifier
        builds or checks passes here, so no graph holds a value a backend could not
        allocate (an Expand or ConstantOfShape to 2^40 elements is refused here)."""
        try:
            types = self.infer(InferContext(self.name, inputs, attrs))
            for type_ in types:
                limits.check_size(
                    type_.shape,
                    type_.dtype.numpy.itemsize,
                    f"the output of {self.name} ({type_.dtype.value})",
                )
            return types
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
        traits: Sequence[Trait] = (),
        weight_axis: WeightAxis | None = None,
        non_negative_if: AttrTest | None = None,
        kernel: KernelSpec | None = None,
    ) -> Callable[[InferRule], InferRule]:
        """Register ``name`` with the decorated function as its shape rule."""
        low, high = (inputs, inputs) if isinstance(inputs, int) else inputs

        def register(rule: InferRule) -> InferRule:
            if name in self:
                raise ValueError(f"op {name} registered twice")
            self[name] = OpDef(
                name,
                rule,
                low,
                high,
                dict(attrs or {}),
                canonicalize,
                (rule.__doc__ or "").strip(),
                frozenset(traits) | ({Trait.KERNEL} if kernel else set()),
                weight_axis,
                non_negative_if,
                kernel,
            )
            return rule

        return register
