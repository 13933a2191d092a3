"""Evaluate ONNX nodes whose inputs are all constants with onnx's own reference evaluator.

Exporters compute position ids, masks and resized position embeddings with ops intq has no
converter for (Range, Mod, Log, Min, Resize...), but on constants only: once the input shapes
are fixed, their results are constants too. The importer hands such a node here before it
refuses the op, and gets its outputs as arrays.

Rules:

- Only deterministic default-domain nodes without subgraphs fold (never ``RandomNormal``).
- The outputs' types come from onnx's shape inference on a one-node model, before anything
  is evaluated: each must be static and within ``intq.limits.MAX_TENSOR_BYTES``, so a
  ``Range(0, 10**12)`` is refused without allocating it. A node whose output size onnx
  cannot tell in advance is not folded (the importer reports it as unsupported).
- A tensor attribute may not use external data (the evaluator would open any path it names).
- Anything the evaluator or the inference raises becomes a ``ModelImportError`` naming the
  node.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from intq.errors import IntqError, ModelImportError
from intq.frontends.onnx_context import check_size, onnx_dtype
from intq.ir.types import DType

_NONDETERMINISTIC = frozenset(
    {
        "Bernoulli",
        "Dropout",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)
_EVALUATED_SINCE = {"QuantizeLinear": 19, "DequantizeLinear": 19}
"""Ops onnx's evaluator implements only from a later opset, whose meaning on the integer
types of earlier opsets is unchanged (19 added float8 types): evaluated at that opset (a QDQ
model's weights, ``DequantizeLinear`` of int8 constants, at opset 13 to 18)."""
_SUBGRAPH = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
_TENSORS = (onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS)


def can_fold(node: onnx.NodeProto, inputs: Sequence[np.ndarray | bool | None]) -> bool:
    """Whether ``node`` may be evaluated here: ``inputs`` holds its inputs' constant data
    (``None`` for an omitted optional input, ``False`` for one computed at run time)."""
    if node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC:
        return False
    if any(a.type in _SUBGRAPH for a in node.attribute):
        return False
    return all(x is not False for x in inputs)


def fold(
    node: onnx.NodeProto, name: str, opset: int, inputs: Sequence[np.ndarray | None]
) -> list[np.ndarray | None] | None:
    """The outputs of ``node`` (``None`` for an omitted one) computed from the constant
    ``inputs``, or ``None`` when onnx cannot tell the outputs' sizes before computing them."""
    _check_attributes(node, name)
    model = _one_node_model(node, max(opset, _EVALUATED_SINCE.get(node.op_type, 0)), inputs)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as err:  # onnx raises InferenceError, ValueError, RuntimeError...
        raise ModelImportError(
            f"{node.op_type} on constants: onnx's shape inference refuses it: {_first_line(err)}",
            node=name,
            hint="the node's attributes or constant inputs are malformed; re-export the model",
        ) from None
    types = {info.name: info.type.tensor_type for info in inferred.graph.output}
    for out in node.output:
        if not out:
            continue
        ttype = types.get(out)
        if ttype is None or not ttype.HasField("shape") or not ttype.elem_type:
            return None
        dims = ttype.shape.dim
        if not all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
            return None
        dtype = onnx_dtype(ttype.elem_type, node=name)
        shape = [d.dim_value for d in dims]
        check_size(shape, dtype, f"the output of {node.op_type} (folded)", node=name)
    try:
        # onnx.reference imports a kernel module per op: only when a node needs it.
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(model)
        with np.errstate(all="ignore"):
            results = evaluator.run(None, {})
    except IntqError:
        raise
    except Exception as err:  # the evaluator's kernels raise whatever numpy raises
        raise ModelImportError(
            f"{node.op_type} on constants cannot be evaluated: {_first_line(err)}",
            node=name,
            hint="onnx's reference evaluator refuses the node's constant inputs or attributes",
        ) from None
    wanted = [o for o in node.output if o]
    by_name = dict(zip(wanted, results))
    arrays: list[np.ndarray | None] = []
    for out in node.output:
        if not out:
            arrays.append(None)
            continue
        array = np.asarray(by_name[out])
        try:
            dtype = DType.from_numpy(array.dtype)
        except IntqError:
            raise ModelImportError(
                f"{node.op_type} on constants gives {array.dtype} values, which intq does not"
                " support",
                node=name,
            ) from None
        check_size(array.shape, dtype, f"the output of {node.op_type} (folded)", node=name)
        arrays.append(array)
    return arrays


def _check_attributes(node: onnx.NodeProto, name: str) -> None:
    for attribute in node.attribute:
        if attribute.type not in _TENSORS:
            continue
        tensors = (
            [attribute.t] if attribute.type == onnx.AttributeProto.TENSOR else attribute.tensors
        )
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
                raise ModelImportError(
                    f"attribute {attribute.name!r} of {node.op_type} uses external data,"
                    " which only initializers may",
                    node=name,
                )


def _one_node_model(
    node: onnx.NodeProto, opset: int, inputs: Sequence[np.ndarray | None]
) -> onnx.ModelProto:
    """``node`` alone, its constant inputs as initializers (renamed ``c0``, ``c1``...)."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    initializers = []
    del copy.input[:]
    for i, (name, array) in enumerate(zip(node.input, inputs)):
        if not name or array is None:
            copy.input.append("")
            continue
        copy.input.append(f"c{i}")
        initializers.append(numpy_helper.from_array(np.asarray(array), f"c{i}"))
    outputs = [onnx.ValueInfoProto(name=o) for o in node.output if o]
    graph = helper.make_graph([copy], "fold", [], outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = onnx.IR_VERSION  # never saved nor given to onnxruntime
    return model


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
