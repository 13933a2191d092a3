"""The one-call API: ``intq.convert`` (import, calibrate, quantize, compile) and ``intq.load``.

exe = intq.convert("model.onnx", calibration_data, target="onnxruntime")
exe = intq.convert(torch_module, dataloader, target="reference")
exe.save("model_int8.onnx")
exe = intq.load("model_int8.onnx")
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from intq.artifacts import has_header, open_text, read_artifact_bytes
from intq.backends import compile, load
from intq.backends.base import Executable
from intq.data import calibration_batches, first_batch_shapes
from intq.distillation import DistillConfig, distill_graph
from intq.errors import ModelImportError, ShapeError
from intq.frontends import from_onnx, from_torch
from intq.frontends.onnx_import import (
    declared_inputs,
    is_static,
    load_model,
    resolve_input_shapes,
)
from intq.ir.graph import Graph
from intq.ir.parser import from_text
from intq.quantization import QuantConfig, quantize


def import_model(
    model: Any,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    example_inputs: Any = None,
) -> Graph:
    """A float IR graph from an ONNX path or ``ModelProto``, a ``.intq`` text file, a torch
    module (with ``example_inputs``) or a graph (copied)."""
    if isinstance(model, Graph):
        return model.copy()
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.suffix == ".intq":
            path, data = read_artifact_bytes(path)
            if has_header(data):
                return from_text(open_text(data, path))  # checks the checksum first
            try:
                return from_text(data.decode())
            except UnicodeDecodeError:
                raise ModelImportError(f"{path} is not a textual IR file") from None
        return from_onnx(path, input_shapes=input_shapes)
    if type(model).__name__ == "ModelProto":
        return from_onnx(model, input_shapes=input_shapes)
    if hasattr(model, "forward") and hasattr(model, "modules"):
        if example_inputs is None:
            raise ShapeError(
                "a torch module needs example inputs to fix its shapes",
                hint="pass example_inputs=..., or calibration data whose first batch has the"
                " shape you will run with",
            )
        return from_torch(model, example_inputs)
    raise ModelImportError(
        f"cannot convert a {type(model).__name__}",
        hint="pass an .onnx path, an onnx.ModelProto, a torch.nn.Module or an intq graph",
    )


def _import_onnx(
    model: Any, input_shapes: Mapping[str, Sequence[int]] | None, data: Any
) -> tuple[Graph, Any]:
    """An ONNX model (a path or a ``ModelProto``) whose symbolic dims the first calibration
    batch fixes where ``input_shapes`` does not; and the data (its first item put back)."""
    if isinstance(model, (str, os.PathLike)):
        proto, base_dir = load_model(model), Path(model).resolve().parent
    else:
        proto, base_dir = model, Path.cwd()
    declared = declared_inputs(proto)
    observed: dict[str, tuple[int, ...]] = {}
    if data is not None and not all(is_static(dims) for dims in declared.values()):
        ranks = {name: None if dims is None else len(dims) for name, dims in declared.items()}
        observed, data = first_batch_shapes(data, ranks)
    shapes = resolve_input_shapes(declared, input_shapes or {}, observed)
    return from_onnx(proto, shapes, base_dir=base_dir), data


def _is_onnx(model: Any) -> bool:
    if isinstance(model, (str, os.PathLike)):
        return Path(model).suffix != ".intq"
    return type(model).__name__ == "ModelProto"


def _first_batch_as_example(data: Any) -> tuple[Any, Any]:
    """For a torch module: the first calibration item as example inputs, and the data with
    that item put back (the data may be a one-shot iterator)."""
    if isinstance(data, (str, os.PathLike, np.ndarray, Mapping)):
        raise ShapeError(
            "a torch module needs example inputs to fix its batch size, and this calibration"
            " data is one block of samples",
            hint="pass example_inputs=(a tensor of the batch shape you will run,), or give"
            " the calibration data as a DataLoader / list of batches (its first batch is used)",
        )
    iterator = iter(data)
    try:
        first = next(iterator)
    except StopIteration:
        raise ShapeError("the calibration data is empty") from None
    return _example_of(first), itertools.chain([first], iterator)


def _example_of(item: Any) -> Any:
    if isinstance(item, Mapping):
        return {k: _tensor(v) for k, v in item.items()}
    if isinstance(item, (tuple, list)):
        return (_tensor(item[0]),)  # (inputs, labels) from a DataLoader
    return (_tensor(item),)


def _tensor(x: Any) -> Any:
    import torch

    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def convert(
    model: Any,
    calibration_data: Any = None,
    target: str = "onnxruntime",
    config: QuantConfig | None = None,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    example_inputs: Any = None,
    **target_options: Any,
) -> Executable:
    """Import ``model``, calibrate on ``calibration_data``, quantize with ``config`` and
    compile for ``target``; returns the executable (``.run``, ``.save``).

    ``model``: an ``.onnx`` path, an ``onnx.ModelProto``, a ``torch.nn.Module`` (its shapes
    come from ``example_inputs``, else from the first batch of a DataLoader or list) or an IR graph.
    ``calibration_data``: a list of input dicts, a numpy array (single-input models), a
    torch ``DataLoader`` or an ``.npz`` path (see :func:`intq.data.calibration_batches`);
    ``None`` for a pre-quantized (QDQ) ONNX model, which brings its own ranges.
    An ONNX model's symbolic dimensions (``batch_size``, ``sequence_length``) are fixed by
    ``input_shapes`` (``{"input_ids": (1, 128)}``) where given, else by the first calibration
    batch (a block of samples, such as one array, gives batches of one sample).
    The executable's ``float_graph`` and ``int_graph`` attributes hold the imported and the
    integer graphs.
    """
    if hasattr(model, "forward") and hasattr(model, "modules") and example_inputs is None:
        example_inputs, calibration_data = _first_batch_as_example(calibration_data)
    if _is_onnx(model):
        graph, calibration_data = _import_onnx(model, input_shapes, calibration_data)
    else:
        graph = import_model(model, input_shapes, example_inputs)
    batches = None
    if calibration_data is not None:
        batches = calibration_batches(calibration_data, graph.inputs)
    int_graph = quantize(graph, batches, config or QuantConfig())
    exe = compile(int_graph, target=target, **target_options)
    exe.float_graph = graph  # type: ignore[attr-defined]
    exe.int_graph = int_graph  # type: ignore[attr-defined]
    return exe


def distill(
    model: Any,
    int_graph: Graph,
    data: Any,
    config: DistillConfig | None = None,
    *,
    quant: QuantConfig | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    example_inputs: Any = None,
) -> Graph:
    """Train ``int_graph`` (what ``intq.quantize`` made of ``model`` with ``quant``) on the
    FP32 ``model``'s outputs over the unlabelled ``data``; returns the distilled integer
    graph, re-integerized and proved (:mod:`intq.distillation`), carrying its
    :class:`~intq.distillation.DistillHistory`.

    ``model`` and ``data`` in any form :func:`convert` takes; ``quant`` (default
    ``QuantConfig()``) gives the lowering's options (kernels, widths of the layers
    ``int_graph`` does not show). ``QuantConfig(distill=...)`` does the same inside
    :func:`intq.quantize` and :func:`convert`.
    """
    if hasattr(model, "forward") and hasattr(model, "modules") and example_inputs is None:
        example_inputs, data = _first_batch_as_example(data)
    if _is_onnx(model):
        graph, data = _import_onnx(model, input_shapes, data)
    else:
        graph = import_model(model, input_shapes, example_inputs)
    batches = list(calibration_batches(data, graph.inputs))
    lowering = (quant or QuantConfig()).lowering()
    return distill_graph(graph, int_graph, batches, config or DistillConfig(), lowering)


__all__ = ["convert", "distill", "import_model", "load"]
