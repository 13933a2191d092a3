"""Strict validation of an ONNX graph before any of it is converted.

A model file is untrusted input, and ONNX Runtime and the converters each assume a
well-formed graph. :func:`validate` refuses, with a
:class:`~intq.errors.ModelImportError` naming the node (or the tensor):

- names, op types, domains and string attributes that are not UTF-8 (ONNX is proto2, whose
  parser lets invalid UTF-8 through as ``bytes``);
- a value defined twice: two initializers, an initializer or a graph input that a node also
  computes, two nodes computing one tensor, a graph input listed twice (an initializer may
  also be listed as an input: that is how IR version 3 gives inputs defaults);
- element-type enums that no ONNX version defines, in inputs, outputs, value infos,
  initializers, tensor attributes and type attributes (``Cast``'s ``to``...);
- attribute values out of range, per :data:`ATTRIBUTE_RULES` (strides, dilations and kernel
  sizes below 1, negative pads, a group below 1, an unknown ``auto_pad``), and attributes
  the op's schema does not declare, as ONNX Runtime does.

Attribute *types* and required attributes are checked per node as it is converted
(:func:`intq.frontends.onnx_context.ConvertContext`), where the opset is known.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import helper

from intq.errors import ModelImportError

_CORRUPT = "the model file is malformed or corrupt; re-export it"

DTYPE_ENUMS = frozenset(onnx.TensorProto.DataType.values())
"""The element-type enums the installed onnx defines (0, UNDEFINED, included)."""


def node_label(node: onnx.NodeProto, index: int) -> str:
    """How errors name a node: its name, else ``OpType_index`` (as the importer does)."""
    return node.name or f"{node.op_type}_{index}"


def validate(g: onnx.GraphProto) -> None:
    """Refuse the first malformation of ``g`` (see the module docstring)."""
    check_strings(g)
    check_definitions(g)
    check_dtypes(g)
    for index, node in enumerate(g.node):
        check_attributes(node, node_label(node, index))


# ----- text ---------------------------------------------------------------------------------


def check_strings(g: onnx.GraphProto) -> None:
    """Refuse names and string attributes that are not text: every later message and
    lookup expects ``str``."""
    for kind, items in (("initializer", g.initializer), ("graph input", g.input)):
        for i, item in enumerate(items):
            _text(item.name, f"the name of {kind} {i}")
    for kind, infos in (("graph output", g.output), ("value info", g.value_info)):
        for i, info in enumerate(infos):
            _text(info.name, f"the name of {kind} {i}")
    for index, node in enumerate(g.node):
        op = node.op_type if isinstance(node.op_type, str) else "?"
        where = f"node {index} ({op})"
        _text(node.op_type, f"the op type of node {index}")
        _text(node.name, f"the name of {where}")
        _text(node.domain, f"the domain of {where}")
        for name in [*node.input, *node.output]:
            _text(name, f"a tensor name of {where}")
        for attribute in node.attribute:
            _text(attribute.name, f"an attribute name of {where}")
            values = [attribute.s] if attribute.type == onnx.AttributeProto.STRING else []
            if attribute.type == onnx.AttributeProto.STRINGS:
                values = list(attribute.strings)
            for value in values:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    raise ModelImportError(
                        f"attribute {attribute.name!r} is not valid UTF-8 text ({value[:40]!r})",
                        node=node_label(node, index),
                        hint=_CORRUPT,
                    ) from None


def _text(text: str | bytes, what: str) -> None:
    if not isinstance(text, str):
        raise ModelImportError(f"{what} is not valid UTF-8 ({bytes(text)[:40]!r})", hint=_CORRUPT)


# ----- every value defined once -------------------------------------------------------------


def check_definitions(g: onnx.GraphProto) -> None:
    """Refuse a value defined twice, and a graph input listed twice."""
    defined: dict[str, str] = {}  # tensor -> what defines it, for the message
    for tensor in g.initializer:
        if tensor.name in defined:
            raise ModelImportError(f"initializer {tensor.name!r} is defined twice", hint=_CORRUPT)
        defined[tensor.name] = "an initializer"
    listed: set[str] = set()
    for info in g.input:
        if info.name in listed:
            raise ModelImportError(f"graph input {info.name!r} is listed twice", hint=_CORRUPT)
        listed.add(info.name)
        defined.setdefault(info.name, "a graph input")  # an initializer's default is fine
    for index, node in enumerate(g.node):
        label = node_label(node, index)
        for out in node.output:
            if not out:
                continue  # an optional output left out
            if out in defined:
                raise ModelImportError(
                    f"tensor {out!r} is an output of this node and also {defined[out]}:"
                    " every value is defined once",
                    node=label,
                    hint=_CORRUPT,
                )
            defined[out] = f"an output of node {label!r}"


# ----- element types ------------------------------------------------------------------------

DTYPE_ATTRIBUTES = frozenset({"to", "dtype", "output_dtype", "stash_type"})
"""Integer attributes that hold an element-type enum (Cast's ``to``, EyeLike's ``dtype``,
QuantizeLinear's ``output_dtype``, LayerNormalization's ``stash_type``...)."""


def check_dtypes(g: onnx.GraphProto) -> None:
    """Refuse element-type enums that ONNX does not define, wherever a type is declared."""
    for kind, infos in (("graph input", g.input), ("graph output", g.output)):
        for info in infos:
            if info.type.HasField("tensor_type"):
                _known(info.type.tensor_type.elem_type, f"{kind} {info.name!r}")
    for info in g.value_info:
        if info.type.HasField("tensor_type"):
            _known(info.type.tensor_type.elem_type, f"value info {info.name!r}")
    for tensor in g.initializer:
        _known(tensor.data_type, f"initializer {tensor.name!r}")
    for index, node in enumerate(g.node):
        label = node_label(node, index)
        for attribute in node.attribute:
            what = f"attribute {attribute.name!r} of {node.op_type}"
            if attribute.type == onnx.AttributeProto.INT and attribute.name in DTYPE_ATTRIBUTES:
                _known(attribute.i, what, node=label)
            elif attribute.type == onnx.AttributeProto.TENSOR:
                _known(attribute.t.data_type, what, node=label)
            elif attribute.type == onnx.AttributeProto.TENSORS:
                for tensor in attribute.tensors:
                    _known(tensor.data_type, what, node=label)


def _known(enum: int, what: str, *, node: str | None = None) -> None:
    if enum not in DTYPE_ENUMS:
        raise ModelImportError(
            f"{what} has element type {enum}, which no ONNX version defines"
            f" (onnx {onnx.__version__} knows 0 to {max(DTYPE_ENUMS)})",
            node=node,
            hint=_CORRUPT,
        )


# ----- attribute values ---------------------------------------------------------------------

WINDOW_OPS = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"})
"""Ops with a sliding window: kernel, strides, dilations, pads."""

AUTO_PAD = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


@dataclass(frozen=True)
class AttributeRule:
    """What the values of attribute ``name`` of the ``ops`` must be: ``check`` returns why a
    value is out of range, or None."""

    ops: frozenset[str]
    name: str
    check: Callable[[Any], str | None]


def _each_at_least(low: int) -> Callable[[Any], str | None]:
    def check(values: Any) -> str | None:
        values = list(values) if isinstance(values, Sequence) else [values]
        bad = [v for v in values if v < low]
        return f"{bad[0]} is below {low}" if bad else None

    return check


def _one_of(choices: Sequence[str]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        text = value.decode() if isinstance(value, bytes) else value
        return None if text in choices else f"{text[:40]!r} is not one of {', '.join(choices)}"

    return check


ATTRIBUTE_RULES = [
    AttributeRule(WINDOW_OPS, "strides", _each_at_least(1)),
    AttributeRule(WINDOW_OPS, "dilations", _each_at_least(1)),
    AttributeRule(WINDOW_OPS, "kernel_shape", _each_at_least(1)),
    AttributeRule(WINDOW_OPS, "pads", _each_at_least(0)),
    AttributeRule(WINDOW_OPS, "output_padding", _each_at_least(0)),
    AttributeRule(WINDOW_OPS, "output_shape", _each_at_least(1)),
    AttributeRule(frozenset({"Conv", "ConvTranspose"}), "group", _each_at_least(1)),
    AttributeRule(WINDOW_OPS, "auto_pad", _one_of(AUTO_PAD)),
]
"""Range rules of attribute values, by op and attribute name."""

_RULES = {(op, rule.name): rule for rule in ATTRIBUTE_RULES for op in rule.ops}


def check_attributes(node: onnx.NodeProto, label: str) -> None:
    """Refuse values that :data:`ATTRIBUTE_RULES` rules out, and attributes the op's schema
    (at any opset) does not declare."""
    declared = _declared_attributes(node.op_type, node.domain)
    for attribute in node.attribute:
        if declared is not None and attribute.name not in declared:
            raise ModelImportError(
                f"{node.op_type} has no attribute {attribute.name!r}",
                node=label,
                hint=f"{node.op_type}'s attributes are: {', '.join(sorted(declared)) or 'none'}",
            )
        rule = _RULES.get((node.op_type, attribute.name))
        if rule is None:
            continue
        try:
            value = helper.get_attribute_value(attribute)
        except (ValueError, TypeError):
            continue  # the converter's type check refuses it, naming the declared type
        if isinstance(value, (int, bytes, str)) or (
            isinstance(value, list) and all(isinstance(v, int) for v in value)
        ):
            why = rule.check(value)
            if why is not None:
                raise ModelImportError(
                    f"attribute {attribute.name!r} of {node.op_type} is out of range: {why}",
                    node=label,
                    hint=_CORRUPT,
                )


def _declared_attributes(op_type: str, domain: str) -> frozenset[str] | None:
    """Every attribute name any opset's schema of ``op_type`` declares; None when onnx has no
    schema for it (a custom op: its converter, if any, judges)."""
    if domain not in ("", "ai.onnx"):
        return None
    return _schema_attributes().get(op_type)


@functools.cache
def _schema_attributes() -> dict[str, frozenset[str]]:
    names: dict[str, set[str]] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        if schema.domain in ("", "ai.onnx"):
            names.setdefault(schema.name, set()).update(schema.attributes)
    return {op: frozenset(attributes) for op, attributes in names.items()}
