"""Import a model quantized in QDQ format as a float graph plus the model's own quantization.

ONNX Runtime's ``quantize_static`` (QDQ format) and PyTorch's PT2E export leave a float model
with ``QuantizeLinear -> DequantizeLinear`` pairs on the activations it quantizes and a
``DequantizeLinear`` after each weight stored as integers. The importer hands those nodes to
:class:`QdqImport`, which turns them back into the float graph and records what they say in
a :class:`~intq.passes.model_quantization.ModelQuantization` stored on the graph:

- An activation pair ``DequantizeLinear(QuantizeLinear(x))`` becomes ``x`` itself, and the
  pair's scale and zero point become ``x``'s :class:`ActivationRange`. Both nodes must be per
  tensor with equal constant parameters, and every reader of the quantized integers a
  ``DequantizeLinear``.
- A pair that clamps at zero (a uint8 zero point of 0) on a value that is not provably
  non-negative gets a ``Relu``: ONNX Runtime removes a ReLU whose output such a pair
  quantizes, so the clamp is all that is left of it.
- A ``DequantizeLinear`` of constants (a weight, a bias) is evaluated like any node on
  constants (:mod:`intq.frontends.onnx_fold`); for the weight of a Conv, Gemm or MatMul its
  scales are recorded (:class:`WeightScales`) when its integers minus the zero point lie in
  intq's narrow signed range, so the lowering reproduces exactly those integers.
- Zero points other than those intq can keep (int8 or uint8 with ``z = 0``, uint8 with
  ``z = 128``) are replaced by the symmetric range covering the model's range; one
  :class:`QdqApproximationWarning` per model says how many tensors that concerns.
- A model quantized otherwise (``quantize_dynamic``: ``DynamicQuantizeLinear``,
  ``MatMulInteger``, ``ConvInteger``; the QOperator format: ``QLinearConv``,
  ``QLinearMatMul``...) is refused by :func:`refuse_other_quantization` with one error.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from intq.errors import UnsupportedOpError
from intq.ir.graph import Graph, Value
from intq.passes.integer_lowering import provably_non_negative
from intq.passes.model_quantization import (
    ActivationRange,
    ModelEntry,
    ModelQuantization,
    WeightScales,
)
from intq.passes.precision import WEIGHT_BITS

QUANTIZE = "QuantizeLinear"
DEQUANTIZE = "DequantizeLinear"

DYNAMIC_OPS = frozenset(
    {
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "DynamicQuantizeLSTM",
        "QAttention",
    }
)
"""Ops that ``quantize_dynamic`` leaves (default and ``com.microsoft`` domains)."""

QOPERATOR_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
        "QLinearConcat",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QLinearWhere",
        "QLinearReduceMean",
        "QEmbedLayerNormalization",
    }
)
"""Ops of ONNX Runtime's QOperator format (default and ``com.microsoft`` domains)."""

_WEIGHT_READERS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
"""ONNX op -> the input that holds its weight."""


class QdqApproximationWarning(UserWarning):
    """A QDQ model's quantization that intq cannot keep exactly (a nonzero activation zero
    point, weights outside the narrow signed range): intq uses the nearest it has."""


def refuse_other_quantization(nodes: Sequence[onnx.NodeProto]) -> None:
    """Raise one :class:`UnsupportedOpError` for a model quantized dynamically or in the
    QOperator format, naming its first such node."""
    for index, node in enumerate(nodes):
        if node.op_type in DYNAMIC_OPS:
            how = "dynamically (onnxruntime.quantization.quantize_dynamic)"
        elif node.op_type in QOPERATOR_OPS:
            how = "in QOperator format"
        else:
            continue
        raise UnsupportedOpError(
            f"this model is already quantized {how}: {node.op_type} is not a float op intq"
            " can convert",
            node=node.name or f"{node.op_type}_{index}",
            hint="export the float model and give it to intq with calibration data, or"
            " quantize it with quantize_static(..., quant_format=QuantFormat.QDQ), whose QDQ"
            " models intq imports with their own scales",
        )


@dataclass(frozen=True)
class _Pair:
    """A ``QuantizeLinear`` whose integers only ``DequantizeLinear`` nodes read."""

    node: str
    value: Value
    """What every ``DequantizeLinear`` of the pair stands for: ``x``, or its ReLU."""
    scale: float
    zero_point: int
    dtype: np.dtype


class QdqImport:
    """The QDQ nodes of one model's import: pairs seen so far and what they record."""

    def __init__(self, graph: Graph, nodes: Sequence[onnx.NodeProto]):
        self.graph = graph
        self.pairs: dict[str, _Pair] = {}  # QuantizeLinear output -> its pair
        self.entries: dict[Value, ModelEntry] = {}
        self.approximated: list[str] = []
        self.seen: set[str] = set()  # the QDQ op types imported as pairs
        self.weights: set[str] = set()  # ONNX tensors read as a Conv/Gemm/MatMul weight
        for node in nodes:
            index = _WEIGHT_READERS.get(node.op_type)
            if index is not None and len(node.input) > index:
                self.weights.add(node.input[index])

    # ----- activations ------------------------------------------------------------------

    def quantize(self, node: onnx.NodeProto, name: str, inputs: list[Value | None]) -> None:
        """A ``QuantizeLinear`` of a computed value: remembered until its dequantizations."""
        x = inputs[0]
        assert x is not None
        scale, zero_point, dtype = _parameters(node, name, inputs)
        info = np.iinfo(dtype)
        found = ActivationRange.affine(scale, zero_point, int(info.min), int(info.max))
        target = x
        if found.lo >= 0 and x.producer is not None and not provably_non_negative(x):
            # ONNX Runtime dropped the ReLU this pair's clamp at zero stands for.
            relu = self.graph.add(
                "Relu", [x], name=name, out_names=[self.graph.unique_name(f"{x.name}.relu")]
            )
            target = relu.output
        previous = self.entries.get(target)
        if isinstance(previous, ActivationRange):  # quantized twice: one range covers both
            merged = previous.covering(found)
            if merged.exact is None and previous.exact is not None:
                self.approximated.append(x.name)
            found = merged
        elif found.exact is None:
            self.approximated.append(x.name)
        self.entries[target] = found
        self.pairs[node.output[0]] = _Pair(name, target, scale, zero_point, dtype)
        self.seen.add(QUANTIZE)

    def dequantize(self, node: onnx.NodeProto, name: str, inputs: list[Value | None]) -> Value:
        """The value a ``DequantizeLinear`` of a pair's integers stands for."""
        pair = self.pairs[node.input[0]]
        scale, zero_point, dtype = _parameters(node, name, [pair.value, *inputs[1:]])
        if (scale, zero_point, dtype) != (pair.scale, pair.zero_point, pair.dtype):
            raise UnsupportedOpError(
                f"DequantizeLinear with scale {scale:g} and zero point {zero_point} of the"
                f" integers QuantizeLinear {pair.node!r} made with scale {pair.scale:g} and zero"
                f" point {pair.zero_point}",
                node=name,
                hint="intq imports QDQ pairs whose two nodes have the same parameters",
            )
        self.seen.add(DEQUANTIZE)
        return pair.value

    def reads_integers(self, node: onnx.NodeProto, name: str, tensor: str) -> UnsupportedOpError:
        """The error for a node other than ``DequantizeLinear`` reading a pair's integers."""
        return UnsupportedOpError(
            f"{node.op_type} reads the integer output of QuantizeLinear"
            f" {self.pairs[tensor].node!r} (%{tensor}); intq imports QuantizeLinear only"
            " followed by DequantizeLinear (QDQ format)",
            node=name,
            hint="quantize the model with quantize_static(..., quant_format=QuantFormat.QDQ)",
        )

    # ----- weights ---------------------------------------------------------------------

    def dequantized_constant(
        self, node: onnx.NodeProto, name: str, inputs: list[Value | None], value: Value
    ) -> None:
        """Record the scales of a weight ``value`` that a ``DequantizeLinear`` of constants
        computed, when the model's integers are ones intq's weights can be."""
        if node.output[0] not in self.weights:
            return  # a bias or another constant: its dequantized values are all it means
        q = inputs[0].const if inputs[0] is not None else None
        scale = inputs[1].const if len(inputs) > 1 and inputs[1] is not None else None
        if q is None or scale is None or q.dtype.kind not in "iu" or node_attr(node, "block_size"):
            self.approximated.append(value.name)
            return
        bits = q.dtype.itemsize * 8
        zp_value = inputs[2] if len(inputs) > 2 else None
        zp = np.zeros(1, np.int64) if zp_value is None else np.asarray(zp_value.const, np.int64)
        scales = np.asarray(scale, np.float64).reshape(-1)
        axis = node_attr(node, "axis", 1) % max(q.ndim, 1) if scales.size > 1 else None
        shape = [1] * q.ndim
        if axis is not None:
            shape[axis] = -1
        levels = q.astype(np.int64) - zp.reshape(shape if zp.size > 1 else [1] * q.ndim)
        top = (1 << (bits - 1)) - 1
        if bits not in WEIGHT_BITS or levels.size == 0 or np.abs(levels).max() > top:
            self.approximated.append(value.name)
            return
        self.entries[value] = WeightScales(bits, tuple(float(s) for s in scales), axis)

    # ----- the result ------------------------------------------------------------------

    def result(self, graph: Graph) -> ModelQuantization | None:
        """The model's quantization for the values still in ``graph`` (None for a float
        model); warns once when some of it could not be kept exactly."""
        if not self.entries and not self.approximated:
            return None
        if self.approximated:
            count = len(self.approximated)
            shown = ", ".join(repr(n) for n in self.approximated[:3])
            more = f" and {count - 3} more" if count > 3 else ""
            warnings.warn(
                f"{count} of the model's quantized tensors ({shown}{more}) have a"
                " quantization intq cannot keep exactly (a nonzero zero point, such as ONNX"
                " Runtime's default asymmetric uint8 activations, or weights outside the"
                " narrow signed range): intq uses the symmetric range covering each, which"
                " may cost up to one bit there. Quantize with ActivationSymmetric=True (or"
                " int8 activations, QuantType.QInt8) to keep every scale",
                QdqApproximationWarning,
                stacklevel=4,
            )
        return ModelQuantization({v: e for v, e in self.entries.items() if graph.find(v.name) is v})


def _parameters(
    node: onnx.NodeProto, name: str, inputs: list[Value | None]
) -> tuple[float, int, np.dtype]:
    """The per-tensor scale, zero point and integer type of a Q or DQ node of an activation."""
    scale_value = inputs[1] if len(inputs) > 1 else None
    zp_value = inputs[2] if len(inputs) > 2 else None
    if scale_value is None or scale_value.const is None:
        raise UnsupportedOpError(f"{node.op_type} with a computed scale", node=name)
    if zp_value is not None and zp_value.const is None:
        raise UnsupportedOpError(f"{node.op_type} with a computed zero point", node=name)
    if node_attr(node, "block_size"):
        raise UnsupportedOpError(f"blocked {node.op_type} of an activation", node=name)
    scale = np.asarray(scale_value.const)
    if scale.size != 1:
        raise UnsupportedOpError(
            f"{node.op_type} with {scale.size} scales: per-channel activation quantization",
            node=name,
            hint="intq quantizes activations per tensor; quantize the model with per-tensor"
            " activations (ONNX Runtime's default)",
        )
    if zp_value is not None:
        dtype = np.asarray(zp_value.const).dtype
        zero_point = int(np.asarray(zp_value.const).reshape(-1)[0])
    else:
        elem = node_attr(node, "output_dtype", 0) or onnx.TensorProto.UINT8
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        zero_point = 0
    if dtype.kind not in "iu" or dtype.itemsize > 2:
        raise UnsupportedOpError(
            f"{node.op_type} to {dtype}: intq imports 8- and 16-bit integer QDQ pairs",
            node=name,
        )
    value = float(scale.reshape(-1)[0])
    if not value > 0 or not np.isfinite(value):
        raise UnsupportedOpError(f"{node.op_type} with scale {value}", node=name)
    return value, zero_point, np.dtype(dtype)


def node_attr(node: onnx.NodeProto, key: str, default: int = 0) -> int:
    """An integer attribute of ``node``, or ``default``."""
    for attribute in node.attribute:
        if attribute.name == key:
            return int(onnx.helper.get_attribute_value(attribute))
    return default


__all__ = [
    "DYNAMIC_OPS",
    "QOPERATOR_OPS",
    "QdqApproximationWarning",
    "QdqImport",
    "refuse_other_quantization",
]
