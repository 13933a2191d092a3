"""What every ONNX converter works with: the :class:`ConvertContext` of one node, the
attribute checks, tensor size limits and data reading, and the :class:`ConverterTable` each
converter module fills (:mod:`intq.frontends.onnx_ops` joins them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from intq import limits
from intq.errors import ModelImportError, ShapeError, UnsupportedOpError
from intq.ir.graph import Graph, Value
from intq.ir.types import DType
from intq.passes.constant_folding import fold_node, foldable

MAX_OPSET = 22
"""Newest default-domain opset the converters were written against."""

MAX_TENSOR_BYTES = limits.MAX_TENSOR_BYTES
"""Kept for old imports; the limit is :data:`intq.limits.MAX_TENSOR_BYTES` (set that one)."""


def check_size(shape: Sequence[int], dtype: DType, what: str, *, node: str = "") -> None:
    """Refuse a tensor of ``shape`` and ``dtype`` larger than ``intq.limits.MAX_TENSOR_BYTES``
    (see :func:`intq.limits.check_size`)."""
    limits.check_size(shape, dtype.numpy.itemsize, f"{what} ({dtype.value})", node=node)


def tensor_data(tensor: onnx.TensorProto, what: str, *, node: str = "") -> np.ndarray:
    """The data of an in-file ``TensorProto``, checked before anything is allocated.

    The element type must be one intq supports, the dims non-negative and within
    ``intq.limits.MAX_TENSOR_BYTES``, and the stored data exactly as long as the dims say. External
    data is refused here (only initializers may use it, read by ``onnx_import.read_external``
    within the model's directory): ``numpy_helper.to_array`` would open any path it names.
    """
    dtype = onnx_dtype(tensor.data_type, node=node)
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
        raise ModelImportError(f"{what} uses external data, which only initializers may", node=node)
    if tensor.HasField("segment"):
        raise UnsupportedOpError(f"{what} is a segment of a tensor", node=node)
    dims = tuple(tensor.dims)
    if any(d < 0 for d in dims):
        raise ModelImportError(f"{what} has negative dimensions {list(dims)}", node=node)
    check_size(dims, dtype, what, node=node)
    elements = int(np.prod(dims, dtype=object)) if dims else 1
    if tensor.HasField("raw_data"):
        stored, wanted, unit = len(tensor.raw_data), elements * dtype.numpy.itemsize, "bytes"
    else:
        field = helper.tensor_dtype_to_field(tensor.data_type)
        stored, wanted, unit = len(getattr(tensor, field)), elements, "values"
    if stored != wanted:
        raise ModelImportError(
            f"{what} of shape {list(dims)} needs {wanted} {unit} of data, the file holds {stored}",
            node=node,
            hint="the model file is truncated or corrupt; re-export it",
        )
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError) as err:
        raise ModelImportError(f"cannot read {what}: {err}", node=node) from None


def onnx_dtype(elem_type: int, *, node: str = "") -> DType:
    """The IR dtype of an ONNX ``TensorProto`` element type."""
    if elem_type not in onnx.TensorProto.DataType.values():
        raise ModelImportError(
            f"element type {elem_type} is not one ONNX defines",
            node=node,
            hint="the model file is malformed or corrupt; re-export it",
        )
    try:
        return DType.from_numpy(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, ShapeError):
        name = onnx.TensorProto.DataType.Name(elem_type) if elem_type else "UNDEFINED"
        raise UnsupportedOpError(f"element type {name} is not supported", node=node) from None


@dataclass
class ConvertContext:
    """What a converter sees: the ONNX node, its inputs as IR values, the graph."""

    graph: Graph
    node: onnx.NodeProto
    name: str
    opset: int
    inputs: list[Value | None]
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.attrs = _checked_attributes(self.node, self.name, self.opset)

    def attr(self, key: str, default: Any = None) -> Any:
        """ONNX attribute ``key`` (bytes decoded to str), or ``default``."""
        value = self.attrs.get(key, default)
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, list):
            return [v.decode() if isinstance(v, bytes) else v for v in value]
        return value

    def input(self, index: int) -> Value:
        """Input ``index``, which must be present."""
        value = self.optional(index)
        if value is None:
            raise ModelImportError(f"{self.node.op_type} needs input {index}", node=self.name)
        return value

    def optional(self, index: int) -> Value | None:
        """Input ``index``, or ``None`` when omitted."""
        return self.inputs[index] if index < len(self.inputs) else None

    def const(self, index: int, what: str) -> np.ndarray | None:
        """The constant data of optional input ``index``; raises if it is computed at run time."""
        value = self.optional(index)
        if value is None:
            return None
        if value.const is None:
            raise ShapeError(
                f"{self.node.op_type}'s {what} (input {index}, %{value.name}) is computed at run"
                " time; intq needs static shapes",
                node=self.name,
                hint="give every graph input a fixed shape with input_shapes=..., so shape"
                " computations fold to constants",
            )
        return value.const

    def emit(
        self, op: str, inputs: Sequence[Value | None], *, out_name: str = "", **attrs: Any
    ) -> list[Value]:
        """Add IR node ``op`` for this ONNX node, size-checked and folded to constants when
        possible. Its output is named ``out_name`` (an intermediate node of a multi-node
        conversion), else after the ONNX node's first output."""
        # Every IR op a converter emits has one output: the ONNX node's first.
        name = self.node.output[0] if self.node.output and self.node.output[0] else self.name
        # The shape rule refuses an output over intq.limits.MAX_TENSOR_BYTES, before folding
        # would allocate it (an Expand to 10^12 elements).
        node = self.graph.add(op, list(inputs), attrs, name=self.name, out_names=[out_name or name])
        if foldable(node):
            return fold_node(self.graph, node)
        return list(node.outputs)

    def emit1(
        self, op: str, inputs: Sequence[Value | None], *, out_name: str = "", **attrs: Any
    ) -> Value:
        """:meth:`emit` for a one-output op."""
        return self.emit(op, inputs, out_name=out_name, **attrs)[0]

    def unsupported(self, why: str) -> UnsupportedOpError:
        """An error for a feature of this node that intq does not handle."""
        return UnsupportedOpError(
            f"{self.node.op_type} (opset {self.opset}): {why}", node=self.name
        )

    def only_first_output(self) -> None:
        """Refuse when an optional extra output (BN's mean, MaxPool's indices...) is used."""
        if any(self.node.output[1:]):
            raise self.unsupported("only the first output is supported (training outputs, indices)")


def _checked_attributes(node: onnx.NodeProto, name: str, opset: int) -> dict[str, Any]:
    """The node's attribute values, each of the type the ONNX schema declares for it.

    A model file is untrusted: an attribute of the wrong type (``strides`` as a float), given
    twice, unreadable, or a required one missing would otherwise surface as a TypeError deep
    in a converter.
    """
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        schema = None
    declared = schema.attributes if schema is not None else {}
    kind = onnx.AttributeProto.AttributeType.Name
    values: dict[str, Any] = {}
    for attribute in node.attribute:
        if attribute.name in values:
            raise ModelImportError(f"attribute {attribute.name!r} is given twice", node=name)
        expected = declared.get(attribute.name)
        if expected is not None and attribute.type != expected.type:
            got = (
                kind(attribute.type)
                if attribute.type in onnx.AttributeProto.AttributeType.values()
                else attribute.type
            )
            raise ModelImportError(
                f"attribute {attribute.name!r} of {node.op_type} is {got},"
                f" ONNX declares it {kind(expected.type)}",
                node=name,
                hint="the model file is malformed; re-export it",
            )
        try:
            values[attribute.name] = helper.get_attribute_value(attribute)
        except (ValueError, TypeError) as err:
            raise ModelImportError(
                f"attribute {attribute.name!r} cannot be read: {err}", node=name
            ) from None
    for key, attr in declared.items():
        if attr.required and key not in values:
            raise ModelImportError(
                f"{node.op_type} needs attribute {key!r}, which is missing", node=name
            )
    return values


Converter = Callable[[ConvertContext], list[Value]]


class ConverterTable(dict[str, list[tuple[int, int, Converter]]]):
    """ONNX op type -> ``(first opset, last opset, converter)`` entries, filled with
    :meth:`register`; each converter module keeps one, and :mod:`intq.frontends.onnx_ops`
    joins them explicitly."""

    def register(
        self, op_type: str, since: int = 1, until: int = MAX_OPSET
    ) -> Callable[[Converter], Converter]:
        """Decorator adding the function for ``op_type`` at opsets ``since..until``."""

        def add(fn: Converter) -> Converter:
            self.setdefault(op_type, []).append((since, until, fn))
            return fn

        return add

    def joined(self, other: ConverterTable) -> ConverterTable:
        """Both tables' entries in one table."""
        out = ConverterTable({k: list(v) for k, v in self.items()})
        for op_type, entries in other.items():
            out.setdefault(op_type, []).extend(entries)
        return out


def window_geometry(
    ctx: ConvertContext,
) -> tuple[Value, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """A convolution's input, kernel, strides and dilations (Conv, ConvTranspose); a
    ``kernel_shape`` attribute must agree with the weight's."""
    x, w = ctx.input(0), ctx.input(1)
    spatial = w.type.rank - 2
    kernel = tuple(w.type.shape[2:])
    if ctx.attr("kernel_shape") and tuple(ctx.attr("kernel_shape")) != kernel:
        raise ShapeError(
            f"kernel_shape {ctx.attr('kernel_shape')} differs from the weight's {list(kernel)}",
            node=ctx.name,
        )
    strides = tuple(ctx.attr("strides", [1] * spatial))
    dilations = tuple(ctx.attr("dilations", [1] * spatial))
    window_lengths(ctx, x, spatial, strides=strides, dilations=dilations)
    return x, kernel, strides, dilations


def window_lengths(ctx: ConvertContext, x: Value, spatial: int, **attrs: Sequence[int]) -> None:
    """Refuse a window over ``spatial`` axes of an input ``x`` without them, and window
    attributes (``strides=...``) without one value per spatial axis or below 1: ONNX's
    ``auto_pad`` arithmetic divides by them."""
    if spatial < 1 or x.type.rank != 2 + spatial:
        raise ShapeError(
            f"{ctx.node.op_type} of a {spatial}-d kernel needs a rank-{2 + spatial} input"
            f" (batch, channels, then one axis per kernel axis), got {x.type}",
            node=ctx.name,
        )
    for key, values in attrs.items():
        if len(values) != spatial:
            raise ShapeError(
                f"{key} {list(values)} gives {len(values)} values for {spatial} spatial axes",
                node=ctx.name,
            )
        if any(v < 1 for v in values):
            raise ShapeError(f"{key} {list(values)}: each must be at least 1", node=ctx.name)


def explicit_pads(ctx: ConvertContext, spatial: int) -> tuple[int, ...]:
    """A window's ``pads`` attribute (all 0 when absent): a begin and an end per axis."""
    pads = tuple(ctx.attr("pads", [0] * 2 * spatial))
    if len(pads) != 2 * spatial:
        raise ShapeError(
            f"pads {list(pads)} gives {len(pads)} values; {spatial} spatial axes take"
            f" {2 * spatial} (the begins, then the ends)",
            node=ctx.name,
        )
    return pads


def ints(array: np.ndarray | None) -> tuple[int, ...]:
    """A constant operand as a tuple of ints (``()`` when absent)."""
    return () if array is None else tuple(int(x) for x in np.asarray(array).reshape(-1))
