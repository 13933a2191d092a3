"""One small converter per ONNX op, keyed by ``(op_type, opset range)``.

A converter gets a :class:`ConvertContext` for one ONNX node and returns the
IR values of the node's outputs. It folds ONNX's constant operands (shapes,
axes, bounds) into canonical IR attributes; ``ctx.emit`` folds nodes whose
inputs are all constants, which turns exporters' Shape/Gather/Concat chains
into constants.

Adding an op: write a converter and add it to :data:`CONVERTERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from intq.errors import ModelImportError, ShapeError, UnsupportedOpError
from intq.ir.graph import Graph, Value
from intq.ir.types import DType, TensorType
from intq.passes.constant_folding import fold_node, foldable

MAX_OPSET = 22
"""Newest default-domain opset the converters were written against."""


MAX_TENSOR_BYTES = 1 << 33
"""The largest tensor (8 GiB) a model may declare: an initializer, a graph input or any value
a node computes. Larger ones are refused from their declared shape, before anything is
allocated, so a hostile or corrupt file cannot exhaust memory."""


def check_size(shape: Sequence[int], dtype: DType, what: str, *, node: str = "") -> None:
    """Refuse a tensor of ``shape`` and ``dtype`` larger than :data:`MAX_TENSOR_BYTES`."""
    elements = 1
    for dim in shape:
        elements *= int(dim)
    nbytes = elements * dtype.numpy.itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise ShapeError(
            f"{what} of shape {list(shape)} ({dtype.value}) would take {nbytes:.3g} bytes,"
            f" more than intq's limit of {MAX_TENSOR_BYTES} bytes",
            node=node,
            hint="check the model's shapes (a corrupt or hostile file can declare any size),"
            " or raise intq.frontends.onnx_ops.MAX_TENSOR_BYTES",
        )


def tensor_data(tensor: onnx.TensorProto, what: str, *, node: str = "") -> np.ndarray:
    """The data of an in-file ``TensorProto``, checked before anything is allocated.

    The element type must be one intq supports, the dims non-negative and within
    :data:`MAX_TENSOR_BYTES`, and the stored data exactly as long as the dims say. External
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

    def emit(self, op: str, inputs: Sequence[Value | None], **attrs: Any) -> list[Value]:
        """Add IR node ``op`` for this ONNX node, folded to constants when possible."""
        # Every IR op a converter emits has one output: the ONNX node's first.
        name = self.node.output[0] if self.node.output and self.node.output[0] else self.name
        node = self.graph.add(op, list(inputs), attrs, name=self.name, out_names=[name])
        for value in node.outputs:  # before folding allocates it (an Expand to 10^12...)
            check_size(value.type.shape, value.type.dtype, f"the output of {op}", node=self.name)
        if foldable(node):
            return fold_node(self.graph, node)
        return list(node.outputs)

    def emit1(self, op: str, inputs: Sequence[Value | None], **attrs: Any) -> Value:
        """:meth:`emit` for a one-output op."""
        return self.emit(op, inputs, **attrs)[0]

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

CONVERTERS: dict[str, list[tuple[int, int, Converter]]] = {}
"""ONNX op type -> ``(first opset, last opset, converter)`` entries."""


def _converter(
    op_type: str, since: int = 1, until: int = MAX_OPSET
) -> Callable[[Converter], Converter]:
    def register(fn: Converter) -> Converter:
        CONVERTERS.setdefault(op_type, []).append((since, until, fn))
        return fn

    return register


def find_converter(op_type: str, opset: int) -> Converter | None:
    """The converter for ``op_type`` at ``opset``, or None."""
    for since, until, fn in CONVERTERS.get(op_type, ()):
        if since <= opset <= until:
            return fn
    return None


def supported_ops() -> list[str]:
    """``"Op (opsets a-b)"`` for every ONNX op intq converts."""
    rows = []
    for op_type, entries in sorted(CONVERTERS.items()):
        low = min(e[0] for e in entries)
        high = max(e[1] for e in entries)
        rows.append(f"{op_type} ({low}-{high})")
    return rows


def _ints(array: np.ndarray | None) -> tuple[int, ...]:
    return () if array is None else tuple(int(x) for x in np.asarray(array).reshape(-1))


# ----- one-to-one ops -----------------------------------------------------------

_SAME_NAME = [
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Equal",
    "Less",
    "Greater",
    "And",
    "Or",
    "Not",
    "Where",
    "Sigmoid",
    "Tanh",
    "Erf",
    "Sqrt",
    "Exp",
    "Neg",
    "Abs",
    "Relu",
    "MatMul",
    "GlobalAveragePool",
]


def _same(ctx: ConvertContext) -> list[Value]:
    return ctx.emit(ctx.node.op_type, ctx.inputs)


for _op in _SAME_NAME:
    _converter(_op, 7 if _op in ("Add", "Sub", "Mul", "Div", "Pow") else 1)(_same)


@_converter("Identity")
@_converter("Dropout", 7)
def _identity(ctx: ConvertContext) -> list[Value]:
    """Inference-time identity (Dropout's mask output is refused)."""
    if ctx.node.op_type == "Dropout":
        ctx.only_first_output()
        training = ctx.const(2, "training_mode")
        if training is not None and bool(training):
            raise ctx.unsupported("training_mode=True")
    return [ctx.input(0)]


@_converter("Gelu", 20)
def _gelu(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("Gelu", ctx.inputs[:1], approximate=ctx.attr("approximate", "none"))


@_converter("Clip", 6, 10)
def _clip_attrs(ctx: ConvertContext) -> list[Value]:
    return ctx.emit(
        "Clip", ctx.inputs[:1], min=ctx.attr("min", -np.inf), max=ctx.attr("max", np.inf)
    )


@_converter("Clip", 11)
def _clip_inputs(ctx: ConvertContext) -> list[Value]:
    low, high = ctx.const(1, "min"), ctx.const(2, "max")
    return ctx.emit(
        "Clip",
        ctx.inputs[:1],
        min=-np.inf if low is None else float(low),
        max=np.inf if high is None else float(high),
    )


@_converter("Cast", 6)
def _cast(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("Cast", ctx.inputs, to=onnx_dtype(ctx.attr("to"), node=ctx.name).value)


# ----- convolution, pooling -------------------------------------------------------


def _resolve_auto_pad(
    ctx: ConvertContext,
    x: TensorType,
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> tuple[int, ...]:
    """Explicit ``pads`` from ONNX's ``auto_pad`` (or the ``pads`` attribute)."""
    spatial = len(kernel)
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        return tuple(ctx.attr("pads", [0] * 2 * spatial))
    if auto_pad == "VALID":
        return (0,) * (2 * spatial)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ctx.unsupported(f"auto_pad={auto_pad!r}")
    begin, end = [], []
    for i in range(spatial):
        size = x.shape[2 + i]
        out = -(-size // strides[i])
        total = max(0, (out - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return tuple(begin + end)


@_converter("Conv", 1)
def _conv(ctx: ConvertContext) -> list[Value]:
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
    pads = _resolve_auto_pad(ctx, x.type, kernel, strides, dilations)
    return ctx.emit(
        "Conv",
        ctx.inputs,
        strides=strides,
        pads=pads,
        dilations=dilations,
        group=ctx.attr("group", 1),
    )


def _pool_attrs(ctx: ConvertContext, dilations: bool) -> dict[str, Any]:
    kernel = tuple(ctx.attr("kernel_shape"))
    spatial = len(kernel)
    strides = tuple(ctx.attr("strides", [1] * spatial))
    dil = tuple(ctx.attr("dilations", [1] * spatial))
    attrs: dict[str, Any] = {
        "kernel_shape": kernel,
        "strides": strides,
        "pads": _resolve_auto_pad(ctx, ctx.input(0).type, kernel, strides, dil),
        "ceil_mode": ctx.attr("ceil_mode", 0),
    }
    if dilations:
        attrs["dilations"] = dil
    elif any(d != 1 for d in dil):
        raise ctx.unsupported("dilated average pooling")
    return attrs


@_converter("MaxPool", 8)
def _maxpool(ctx: ConvertContext) -> list[Value]:
    ctx.only_first_output()
    if ctx.attr("storage_order", 0):
        raise ctx.unsupported("storage_order=1")
    return ctx.emit("MaxPool", ctx.inputs, **_pool_attrs(ctx, True))


@_converter("AveragePool", 7)
def _avgpool(ctx: ConvertContext) -> list[Value]:
    attrs = _pool_attrs(ctx, False)
    attrs["count_include_pad"] = ctx.attr("count_include_pad", 0)
    return ctx.emit("AveragePool", ctx.inputs, **attrs)


# ----- linear algebra, normalisation --------------------------------------------------


@_converter("Gemm", 7)
def _gemm(ctx: ConvertContext) -> list[Value]:
    return ctx.emit(
        "Gemm",
        ctx.inputs,
        alpha=ctx.attr("alpha", 1.0),
        beta=ctx.attr("beta", 1.0),
        transA=ctx.attr("transA", 0),
        transB=ctx.attr("transB", 0),
    )


@_converter("BatchNormalization", 9)
def _batchnorm(ctx: ConvertContext) -> list[Value]:
    ctx.only_first_output()
    if ctx.attr("training_mode", 0):
        raise ctx.unsupported("training_mode=1")
    return ctx.emit("BatchNormalization", ctx.inputs, epsilon=ctx.attr("epsilon", 1e-5))


@_converter("LayerNormalization", 17)
def _layernorm(ctx: ConvertContext) -> list[Value]:
    ctx.only_first_output()
    return ctx.emit(
        "LayerNormalization",
        ctx.inputs,
        axis=ctx.attr("axis", -1),
        epsilon=ctx.attr("epsilon", 1e-5),
    )


@_converter("Softmax", 1, 12)
def _softmax_flat(ctx: ConvertContext) -> list[Value]:
    """Before opset 13 Softmax normalises over all dims from ``axis`` (flattened)."""
    x = ctx.input(0)
    axis = ctx.attr("axis", 1) % max(x.type.rank, 1)
    if axis == x.type.rank - 1:
        return ctx.emit("Softmax", [x], axis=axis)
    rows = int(np.prod(x.type.shape[:axis]))
    flat = ctx.graph.op("Reshape", x, name=ctx.name, shape=(rows, -1))
    soft = ctx.graph.op("Softmax", flat, name=ctx.name, axis=1)
    return ctx.emit("Reshape", [soft], shape=x.type.shape)


@_converter("Softmax", 13)
def _softmax(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("Softmax", ctx.inputs, axis=ctx.attr("axis", -1))


# ----- hard activations (MobileNetV3's HardSigmoid and HardSwish) ----------------------


@_converter("HardSigmoid", 6)
def _hard_sigmoid(ctx: ConvertContext) -> list[Value]:
    """``clip(alpha x + beta, 0, 1)``."""
    return ctx.emit(
        "HardSigmoid", ctx.inputs[:1], alpha=ctx.attr("alpha", 0.2), beta=ctx.attr("beta", 0.5)
    )


@_converter("HardSwish", 14)
def _hard_swish(ctx: ConvertContext) -> list[Value]:
    """``x * clip(x / 6 + 1/2, 0, 1)``."""
    return ctx.emit("HardSwish", ctx.inputs[:1])


# ----- reductions ---------------------------------------------------------------------


def _reduce(ctx: ConvertContext, axes: tuple[int, ...]) -> list[Value]:
    if not axes and ctx.attr("noop_with_empty_axes", 0):
        return [ctx.input(0)]
    return ctx.emit(ctx.node.op_type, ctx.inputs[:1], axes=axes, keepdims=ctx.attr("keepdims", 1))


for _op, _last_attr_opset in (("ReduceMean", 17), ("ReduceMax", 17), ("ReduceSum", 12)):
    _converter(_op, 1, _last_attr_opset)(lambda ctx: _reduce(ctx, tuple(ctx.attr("axes", []))))
    _converter(_op, _last_attr_opset + 1)(lambda ctx: _reduce(ctx, _ints(ctx.const(1, "axes"))))


# ----- data movement --------------------------------------------------------------------


@_converter("Reshape", 5)
def _reshape(ctx: ConvertContext) -> list[Value]:
    shape = _ints(ctx.const(1, "shape"))
    if ctx.attr("allowzero", 0) and 0 in shape:
        raise ctx.unsupported("allowzero=1 with a 0 in the shape")
    return ctx.emit("Reshape", ctx.inputs[:1], shape=shape)


@_converter("Flatten", 1)
def _flatten(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("Flatten", ctx.inputs, axis=ctx.attr("axis", 1))


@_converter("Transpose", 1)
def _transpose(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("Transpose", ctx.inputs, perm=tuple(ctx.attr("perm", [])))


@_converter("Concat", 4)
def _concat(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("Concat", ctx.inputs, axis=ctx.attr("axis"))


@_converter("Slice", 1, 9)
def _slice_attrs(ctx: ConvertContext) -> list[Value]:
    return ctx.emit(
        "Slice",
        ctx.inputs[:1],
        starts=tuple(ctx.attr("starts")),
        ends=tuple(ctx.attr("ends")),
        axes=tuple(ctx.attr("axes", [])),
    )


@_converter("Slice", 10)
def _slice(ctx: ConvertContext) -> list[Value]:
    # ONNX uses INT64 extremes for "to the end"; clamp so they fit the attributes.
    def clamped(index: int, what: str) -> tuple[int, ...]:
        return tuple(int(np.clip(v, -(1 << 62), 1 << 62)) for v in _ints(ctx.const(index, what)))

    return ctx.emit(
        "Slice",
        ctx.inputs[:1],
        starts=clamped(1, "starts"),
        ends=clamped(2, "ends"),
        axes=_ints(ctx.const(3, "axes")),
        steps=_ints(ctx.const(4, "steps")),
    )


@_converter("Squeeze", 1, 12)
@_converter("Unsqueeze", 1, 12)
def _squeeze_attr(ctx: ConvertContext) -> list[Value]:
    return ctx.emit(ctx.node.op_type, ctx.inputs[:1], axes=tuple(ctx.attr("axes", [])))


@_converter("Squeeze", 13)
@_converter("Unsqueeze", 13)
def _squeeze(ctx: ConvertContext) -> list[Value]:
    return ctx.emit(ctx.node.op_type, ctx.inputs[:1], axes=_ints(ctx.const(1, "axes")))


@_converter("Gather", 1)
def _gather(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("Gather", ctx.inputs, axis=ctx.attr("axis", 0))


@_converter("Expand", 8)
def _expand(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("Expand", ctx.inputs[:1], shape=_ints(ctx.const(1, "shape")))


@_converter("Pad", 2, 10)
def _pad_attrs(ctx: ConvertContext) -> list[Value]:
    return ctx.emit(
        "Pad",
        ctx.inputs[:1],
        pads=tuple(ctx.attr("pads")),
        mode=ctx.attr("mode", "constant"),
        value=ctx.attr("value", 0.0),
    )


@_converter("Pad", 11)
def _pad(ctx: ConvertContext) -> list[Value]:
    rank = ctx.input(0).type.rank
    pads = _ints(ctx.const(1, "pads"))
    axes = _ints(ctx.const(3, "axes")) or tuple(range(rank))
    if len(pads) != 2 * len(axes):
        raise ShapeError(f"Pad has {len(pads)} pads for {len(axes)} axes", node=ctx.name)
    full = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        full[axis % rank], full[axis % rank + rank] = pads[i], pads[i + len(axes)]
    value = ctx.const(2, "constant_value")
    mode = ctx.attr("mode", "constant")
    if mode == "wrap":
        raise ctx.unsupported("mode='wrap'")
    return ctx.emit(
        "Pad",
        ctx.inputs[:1],
        pads=tuple(full),
        mode=mode,
        value=0.0 if value is None or value.size == 0 else float(value.reshape(-1)[0]),
    )


@_converter("Shape", 1)
def _shape(ctx: ConvertContext) -> list[Value]:
    rank = ctx.input(0).type.rank
    start = ctx.attr("start", 0)
    end = ctx.attr("end", rank)
    return ctx.emit(
        "Shape",
        ctx.inputs,
        start=max(0, start + rank if start < 0 else start),
        end=min(rank, end + rank if end < 0 else end),
    )


@_converter("Constant", 1)
def _constant(ctx: ConvertContext) -> list[Value]:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in ctx.attrs:
            raw = ctx.attrs[key]
            if key == "value":
                array = tensor_data(raw, "Constant's value", node=ctx.name)
            else:
                array = np.array(raw, dtype=np.float32 if "float" in key else np.int64)
            DType.from_numpy(array.dtype)  # refuses strings and other unsupported types
            return [ctx.graph.add_constant(array, ctx.node.output[0])]
    raise ctx.unsupported(f"attributes {sorted(ctx.attrs)} (sparse or string constants)")


@_converter("ConstantOfShape", 9)
def _constant_of_shape(ctx: ConvertContext) -> list[Value]:
    fill = ctx.attrs.get("value")
    if fill is not None:
        array = tensor_data(fill, "ConstantOfShape's value", node=ctx.name)
    else:
        array = np.zeros(1, np.float32)
    if array.size != 1:
        raise ModelImportError(
            f"ConstantOfShape's value must hold one element, it holds {array.size}", node=ctx.name
        )
    dtype = DType.from_numpy(array.dtype)
    value, shape = array.reshape(-1)[0], _ints(ctx.const(0, "shape"))
    if any(d < 0 for d in shape):
        raise ShapeError(f"ConstantOfShape to negative dimensions {list(shape)}", node=ctx.name)
    check_size(shape, dtype, "ConstantOfShape's output", node=ctx.name)
    if array.dtype.kind in "iu" and float(value) != int(value):
        # The IR op's value is a float attribute: an int64 beyond 2**53 would be rounded
        # (INT64_MAX even wraps to INT64_MIN). The op folds anyway, so build the constant.
        return [ctx.graph.add_constant(np.full(shape, value, array.dtype), ctx.node.output[0])]
    return ctx.emit(
        "ConstantOfShape",
        [],
        shape=shape,
        value=float(value),
        dtype=dtype.value,
    )


# ----- ops the importer added for real models (Split, PRelu, Resize, ConvTranspose...) -------


def _step(
    ctx: ConvertContext, op: str, inputs: Sequence[Value | None], out: str = "", **attrs: Any
) -> Value:
    """One IR node of a multi-node conversion (output named ``out``, or after the op),
    size-checked and folded like :meth:`ConvertContext.emit`."""
    node = ctx.graph.add(op, list(inputs), attrs, name=ctx.name, out_names=[out or op.lower()])
    check_size(node.output.type.shape, node.output.type.dtype, f"the output of {op}", node=ctx.name)
    return fold_node(ctx.graph, node)[0] if foldable(node) else node.output


def _split(ctx: ConvertContext, sizes: Sequence[int]) -> list[Value]:
    x = ctx.input(0)
    axis = ctx.attr("axis", 0)
    if not -x.type.rank <= axis < x.type.rank:
        raise ShapeError(f"Split axis {axis} out of range for rank {x.type.rank}", node=ctx.name)
    axis %= x.type.rank
    count = len(ctx.node.output)
    dim = x.type.shape[axis]
    if not sizes:
        parts = ctx.attr("num_outputs", count)
        if parts != count or parts < 1:
            raise ShapeError(f"Split num_outputs={parts} but {count} outputs", node=ctx.name)
        chunk = -(-dim // parts)
        sizes = [min(chunk, max(0, dim - i * chunk)) for i in range(parts)]
        if "num_outputs" not in ctx.attrs and dim % parts:
            raise ShapeError(f"Split of {dim} into {parts} equal parts", node=ctx.name)
    if len(sizes) != count or sum(sizes) != dim or any(s < 0 for s in sizes):
        raise ShapeError(
            f"Split sizes {list(sizes)} for {count} outputs do not add up to {dim}", node=ctx.name
        )
    outputs, start = [], 0
    for size, name in zip(sizes, ctx.node.output):
        outputs.append(
            _step(
                ctx,
                "Slice",
                [x],
                name or "split",
                starts=(start,),
                ends=(start + size,),
                axes=(axis,),
            )
        )
        start += size
    return outputs


@_converter("Split", 2, 12)
def _split_attr(ctx: ConvertContext) -> list[Value]:
    return _split(ctx, tuple(ctx.attr("split", [])))


@_converter("Split", 13)
def _split_input(ctx: ConvertContext) -> list[Value]:
    return _split(ctx, _ints(ctx.const(1, "split")))


@_converter("PRelu", 7)
def _prelu(ctx: ConvertContext) -> list[Value]:
    return ctx.emit("PRelu", ctx.inputs[:2])


@_converter("LeakyRelu", 6)
def _leaky_relu(ctx: ConvertContext) -> list[Value]:
    x = ctx.input(0)
    alpha = ctx.graph.add_constant(
        np.array(ctx.attr("alpha", 0.01), x.type.dtype.numpy), f"{ctx.name}.alpha"
    )
    return ctx.emit("PRelu", [x, alpha])


@_converter("Min", 8)
@_converter("Max", 8)
def _min_max(ctx: ConvertContext) -> list[Value]:
    """ONNX's n-ary Min/Max as a chain of binary ones."""
    operands = [v for v in ctx.inputs if v is not None]
    if not operands:
        raise ModelImportError(f"{ctx.node.op_type} needs at least one input", node=ctx.name)
    if len(operands) == 1:
        return [operands[0]]
    acc = operands[0]
    for operand in operands[1:-1]:
        acc = _step(ctx, ctx.node.op_type, [acc, operand])
    return ctx.emit(ctx.node.op_type, [acc, operands[-1]])


@_converter("Softplus", 1)
@_converter("Mish", 18)
def _softplus(ctx: ConvertContext) -> list[Value]:
    return ctx.emit(ctx.node.op_type, ctx.inputs[:1])


@_converter("Tile", 6)
def _tile(ctx: ConvertContext) -> list[Value]:
    """``Tile`` as Reshape to ``(1, d0, 1, d1...)``, Expand to ``(r0, d0, r1, d1...)`` and
    Reshape to ``(r0 * d0, ...)``: data movement the integer lowering already knows."""
    x = ctx.input(0)
    repeats = _ints(ctx.const(1, "repeats"))
    shape = x.type.shape
    if len(repeats) != len(shape) or any(r < 0 for r in repeats):
        raise ShapeError(f"Tile repeats {list(repeats)} do not fit {list(shape)}", node=ctx.name)
    spread = tuple(d for dim in shape for d in (1, dim))
    grown = tuple(d for r, dim in zip(repeats, shape) for d in (r, dim))
    check_size(grown, x.type.dtype, "the output of Tile", node=ctx.name)
    flat = _step(ctx, "Reshape", [x], shape=spread)
    wide = _step(ctx, "Expand", [flat], shape=grown)
    return ctx.emit("Reshape", [wide], shape=tuple(r * d for r, d in zip(repeats, shape)))


@_converter("DepthToSpace", 1)
def _depth_to_space(ctx: ConvertContext) -> list[Value]:
    """Reshape, Transpose, Reshape, as the ONNX definition (modes DCR and CRD)."""
    x = ctx.input(0)
    if x.type.rank != 4:
        raise ctx.unsupported(f"input of rank {x.type.rank} (4-D NCHW only)")
    b = ctx.attr("blocksize")
    n, c, h, w = x.type.shape
    if b < 1 or c % (b * b):
        raise ShapeError(f"DepthToSpace blocksize {b} does not divide {c} channels", node=ctx.name)
    if ctx.attr("mode", "DCR") == "DCR":
        split, perm = (n, b, b, c // (b * b), h, w), (0, 3, 4, 1, 5, 2)
    else:
        split, perm = (n, c // (b * b), b, b, h, w), (0, 1, 4, 2, 5, 3)
    moved = _step(ctx, "Transpose", [_step(ctx, "Reshape", [x], shape=split)], perm=perm)
    return ctx.emit("Reshape", [moved], shape=(n, c // (b * b), h * b, w * b))


@_converter("SpaceToDepth", 1)
def _space_to_depth(ctx: ConvertContext) -> list[Value]:
    x = ctx.input(0)
    if x.type.rank != 4:
        raise ctx.unsupported(f"input of rank {x.type.rank} (4-D NCHW only)")
    b = ctx.attr("blocksize")
    n, c, h, w = x.type.shape
    if b < 1 or h % b or w % b:
        raise ShapeError(f"SpaceToDepth blocksize {b} does not divide {h}x{w}", node=ctx.name)
    split = _step(ctx, "Reshape", [x], shape=(n, c, h // b, b, w // b, b))
    moved = _step(ctx, "Transpose", [split], perm=(0, 3, 5, 1, 2, 4))
    return ctx.emit("Reshape", [moved], shape=(n, c * b * b, h // b, w // b))


def _resize_node(
    ctx: ConvertContext, scales: np.ndarray | None, sizes: np.ndarray | None, **modes: str
) -> list[Value]:
    x = ctx.input(0)
    mode = ctx.attr("mode", "nearest")
    if mode not in ("nearest", "linear"):
        raise ctx.unsupported(f"mode={mode!r} (nearest and linear are supported)")
    if ctx.attr("antialias", 0) and mode == "linear":
        raise ctx.unsupported("antialias=1")
    if ctx.attr("axes") is not None or ctx.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise ctx.unsupported("axes or keep_aspect_ratio_policy")
    scale_list = (
        () if scales is None or scales.size == 0 else tuple(float(s) for s in scales.reshape(-1))
    )
    size_list = _ints(sizes) if sizes is not None and sizes.size else ()
    return ctx.emit("Resize", [x], mode=mode, scales=scale_list, sizes=size_list, **modes)


def _upsample(ctx: ConvertContext, scales: np.ndarray | None) -> list[Value]:
    """Upsample and Resize-10: asymmetric coordinates, nearest rounding down when upsampling
    (ONNX Runtime rounds up when downsampling: refused)."""
    if scales is None:
        raise ModelImportError(f"{ctx.node.op_type} needs scales", node=ctx.name)
    if ctx.attr("mode", "nearest") == "nearest" and np.any(scales < 1):
        raise ctx.unsupported("nearest downsampling (scales below 1)")
    return _resize_node(
        ctx, scales, None, coordinate_transformation_mode="asymmetric", nearest_mode="floor"
    )


@_converter("Upsample", 7, 8)
def _upsample_attr(ctx: ConvertContext) -> list[Value]:
    return _upsample(ctx, np.array(ctx.attr("scales"), np.float32))


@_converter("Upsample", 9, 9)
@_converter("Resize", 10, 10)
def _upsample_input(ctx: ConvertContext) -> list[Value]:
    return _upsample(ctx, ctx.const(1, "scales"))


@_converter("Resize", 11)
def _resize(ctx: ConvertContext) -> list[Value]:
    transform = ctx.attr("coordinate_transformation_mode", "half_pixel")
    if transform in ("tf_crop_and_resize", "tf_half_pixel_for_nearest", "half_pixel_symmetric"):
        raise ctx.unsupported(f"coordinate_transformation_mode={transform!r}")
    return _resize_node(
        ctx,
        ctx.const(2, "scales"),
        ctx.const(3, "sizes"),
        coordinate_transformation_mode=transform,
        nearest_mode=ctx.attr("nearest_mode", "round_prefer_floor"),
    )


@_converter("ConvTranspose", 1)
def _conv_transpose(ctx: ConvertContext) -> list[Value]:
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
    extra = tuple(ctx.attr("output_padding", [0] * spatial))
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    wanted = ctx.attr("output_shape")
    if wanted is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        wanted = [x.type.shape[2 + i] * strides[i] for i in range(spatial)]
    if wanted is not None:
        wanted = list(wanted)[-spatial:]
        begin, end = [], []
        for i in range(spatial):
            full = (x.type.shape[2 + i] - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1
            total = full + extra[i] - wanted[i]
            if total < 0:
                raise ctx.unsupported(f"output_shape {wanted} larger than the unpadded output")
            small, large = total // 2, total - total // 2
            # As ONNX Runtime: SAME_UPPER puts the larger half at the end, SAME_LOWER and an
            # explicit output_shape at the start.
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        pads = tuple(begin + end)
    elif auto_pad in ("NOTSET", "VALID"):
        pads = (
            tuple(ctx.attr("pads", [0] * 2 * spatial))
            if auto_pad == "NOTSET"
            else (0,) * 2 * spatial
        )
    else:
        raise ctx.unsupported(f"auto_pad={auto_pad!r}")
    return ctx.emit(
        "ConvTranspose",
        ctx.inputs,
        strides=strides,
        pads=pads,
        dilations=dilations,
        output_padding=extra,
        group=ctx.attr("group", 1),
    )
