"""Import an ONNX model into the IR: ``intq.from_onnx(path_or_model, input_shapes)``.

- The file is parsed defensively: a truncated or corrupt file, a cycle, an
  undefined or twice-defined tensor, an unknown op or domain each raise a
  :class:`~intq.errors.ModelImportError` naming the node.
- External data is read only from files inside the model's directory (a
  location escaping it, also through a symlink, is refused) and only within
  the file's size.
- No tensor over ``onnx_ops.MAX_TENSOR_BYTES`` is accepted, judged from its
  declared shape before anything is allocated, and an initializer's data must
  be as long as its dims say.
- Symbolic input dimensions must be given in ``input_shapes``; with static
  inputs, the exporters' shape computations fold to constants as the nodes
  are converted, so the IR is fully static.
- Every IR node keeps its ONNX node's name (``Op_i`` for unnamed nodes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from intq.artifacts import parse_onnx
from intq.errors import IntqError, ModelImportError, ShapeError, UnsupportedOpError
from intq.frontends.onnx_ops import (
    MAX_OPSET,
    ConvertContext,
    check_size,
    find_converter,
    onnx_dtype,
    supported_ops,
    tensor_data,
)
from intq.ir.graph import Graph, Value
from intq.ir.types import TensorType
from intq.ir.verifier import verify
from intq.passes.dce import DeadCodeElimination

_DEFAULT_DOMAINS = ("", "ai.onnx")


def from_onnx(
    model: str | os.PathLike[str] | onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Graph:
    """Convert an ONNX model (a path or a ``ModelProto``) into an IR graph.

    ``input_shapes`` fixes the shape of inputs (by name) whose dimensions are
    symbolic, or overrides declared ones. External data of a ``ModelProto``
    is resolved relative to the current directory; pass a path instead to
    resolve it next to the model file.
    """
    if isinstance(model, onnx.ModelProto):
        proto, base_dir = model, Path.cwd()
    else:
        proto, base_dir = _load(Path(model)), Path(model).resolve().parent
    return _Importer(proto, base_dir, dict(input_shapes or {})).run()


def _load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ModelImportError(f"no model file at {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ModelImportError(f"cannot read {path}: {err.strerror}") from None
    return parse_onnx(
        data, path, ModelImportError, "re-export the model, or check that the download completed"
    )


def read_external(tensor: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """The data of a tensor stored in an external file inside ``base_dir``."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    what = f"external data of initializer {tensor.name!r}"
    root = base_dir.resolve()
    target = (root / location).resolve()
    if not location or os.path.isabs(location) or not target.is_relative_to(root):
        raise ModelImportError(
            f"{what} points to {location!r}, outside the model's directory {root}",
            hint="external data files must sit in the model's directory or below it",
        )
    if not target.is_file():
        raise ModelImportError(f"{what}: file {location!r} not found next to the model")
    ir_dtype = onnx_dtype(tensor.data_type, node=tensor.name)
    dtype = ir_dtype.numpy
    shape = tuple(tensor.dims)
    if any(d < 0 for d in shape):
        raise ModelImportError(f"{what} has negative dimensions {list(shape)}")
    check_size(shape, ir_dtype, what)
    expected = math.prod(shape) * dtype.itemsize
    try:
        offset = int(info.get("offset", 0))
        length = int(info.get("length", expected))
    except ValueError:
        raise ModelImportError(f"{what}: offset or length is not an integer") from None
    size = target.stat().st_size
    if offset < 0 or length != expected or offset + length > size:
        raise ModelImportError(
            f"{what}: {length} bytes at offset {offset} of a {size}-byte file, but the tensor"
            f" {list(shape)} needs {expected} bytes"
        )
    with open(target, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)


class _Importer:
    def __init__(self, proto: onnx.ModelProto, base_dir: Path, shapes: dict[str, Sequence[int]]):
        self.proto = proto
        self.base_dir = base_dir
        self.shapes = shapes
        self.graph = Graph(proto.graph.name or "main")
        self.values: dict[str, Value | None] = {"": None}
        self.opset = self._opset()

    def _opset(self) -> int:
        versions = {o.domain: o.version for o in self.proto.opset_import}
        version = next((versions[d] for d in _DEFAULT_DOMAINS if d in versions), None)
        if version is None:
            raise ModelImportError("the model declares no default-domain (ai.onnx) opset")
        if version > MAX_OPSET:
            raise UnsupportedOpError(
                f"opset {version} is newer than the newest intq supports ({MAX_OPSET})",
                hint=f"export with opset_version<={MAX_OPSET}",
            )
        return version

    def run(self) -> Graph:
        g = self.proto.graph
        _check_strings(g)
        for tensor in g.initializer:
            self._initializer(tensor)
        if g.sparse_initializer:
            raise UnsupportedOpError("sparse initializers are not supported")
        unknown = sorted(set(self.shapes) - {i.name for i in g.input})
        if unknown:
            raise ShapeError(
                f"input_shapes names unknown inputs {unknown}",
                hint="the model's inputs are " + ", ".join(i.name for i in g.input),
            )
        for info in g.input:
            if info.name not in self.values:
                self._input(info)
        for index in _topological_order(g.node):
            self._node(g.node[index], index)
        outputs = []
        for info in g.output:
            value = self.values.get(info.name)
            if value is None:
                raise ModelImportError(f"graph output {info.name!r} is never computed")
            outputs.append(self._named_output(value, info.name))
        self.graph.set_outputs(outputs)
        DeadCodeElimination()(self.graph)
        verify(self.graph)
        return self.graph

    def _initializer(self, tensor: onnx.TensorProto) -> None:
        if tensor.name in self.values:
            raise ModelImportError(f"initializer {tensor.name!r} is defined twice")
        what = f"initializer {tensor.name!r}"
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            array = read_external(tensor, self.base_dir)
        else:
            array = tensor_data(tensor, what)
        self.values[tensor.name] = self.graph.add_constant(array, tensor.name)

    def _input(self, info: onnx.ValueInfoProto) -> None:
        ttype = info.type.tensor_type
        if not info.type.HasField("tensor_type"):
            raise UnsupportedOpError(f"input {info.name!r} is not a tensor")
        dtype = onnx_dtype(ttype.elem_type, node=info.name)
        if info.name in self.shapes:
            shape = tuple(int(d) for d in self.shapes[info.name])
        else:
            dims = ttype.shape.dim
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
            if not ttype.HasField("shape") or -1 in shape:
                symbolic = [d.dim_param or "?" for d in dims]
                raise ShapeError(
                    f"input {info.name!r} has symbolic dimensions {symbolic}",
                    hint=f"pass input_shapes={{{info.name!r}: (...)}} with the shape you will run",
                )
        check_size(shape, dtype, f"input {info.name!r}")
        try:
            self.values[info.name] = self.graph.add_input(info.name, TensorType(dtype, shape))
        except IntqError as err:
            raise ShapeError(f"input {info.name!r}: {err.message}") from None

    def _node(self, node: onnx.NodeProto, index: int) -> None:
        name = node.name or f"{node.op_type}_{index}"
        if node.domain not in _DEFAULT_DOMAINS:
            raise UnsupportedOpError(
                f"{node.op_type} from domain {node.domain!r} is not supported",
                node=name,
                hint="intq converts standard ONNX (ai.onnx) ops only",
            )
        converter = find_converter(node.op_type, self.opset)
        if converter is None:
            raise UnsupportedOpError(
                f"{node.op_type} (opset {self.opset}) is not supported",
                node=name,
                hint="supported ONNX ops (opsets): " + ", ".join(supported_ops()),
            )
        missing = [n for n in node.input if n not in self.values]
        if missing:
            raise ModelImportError(f"input {missing[0]!r} is not defined anywhere", node=name)
        inputs = [self.values[n] for n in node.input]
        ctx = ConvertContext(self.graph, node, name, self.opset, inputs)
        try:
            outputs = converter(ctx)
        except IntqError as err:
            if err.node is None:
                raise type(err)(err.message, node=name, hint=err.hint) from None
            raise
        for onnx_name, value in zip(node.output, outputs):
            if onnx_name:
                self.values[onnx_name] = value

    def _named_output(self, value: Value, name: str) -> Value:
        """Keep the ONNX output name: users key their results by it."""
        if value.name == name:
            return value
        taken = self.graph.find(name)
        if taken is not None:
            self.graph.rename(taken, self.graph.unique_name(name))
        return self.graph.add("Identity", [value], name=name, out_names=[name]).output


def _check_strings(g: onnx.GraphProto) -> None:
    """Refuse names that are not text: ONNX is proto2, whose parser lets invalid UTF-8 through
    as ``bytes``, and every later message and lookup expects ``str``."""
    named = [*g.initializer, *g.input, *g.output, *g.value_info]
    strings = [(item.name, "a tensor name") for item in named]
    for node in g.node:
        strings += [(node.name, "a node name"), (node.op_type, "an op type")]
        strings += [(node.domain, "a domain")]
        strings += [(name, "a tensor name") for name in [*node.input, *node.output]]
        strings += [(a.name, "an attribute name") for a in node.attribute]
    for text, what in strings:
        if not isinstance(text, str):
            raise ModelImportError(
                f"{what} is not valid UTF-8 ({bytes(text)[:40]!r}); the file is corrupt",
                hint="re-export the model, or check that the download completed",
            )


def _topological_order(nodes: Sequence[onnx.NodeProto]) -> list[int]:
    """Node indices in dependency order; refuses cycles and twice-defined tensors."""
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if not out:
                continue
            if out in producer:
                raise ModelImportError(
                    f"tensor {out!r} is produced twice", node=node.name or f"{node.op_type}_{i}"
                )
            producer[out] = i
    order: list[int] = []
    state = [0] * len(nodes)  # 0 new, 1 on the stack, 2 done
    for root in range(len(nodes)):
        stack = [(root, 0)]
        while stack:
            i, next_input = stack.pop()
            if next_input == 0:
                if state[i] == 2:
                    continue
                state[i] = 1
            deps = [producer[n] for n in nodes[i].input if n in producer]
            if next_input < len(deps):
                stack.append((i, next_input + 1))
                dep = deps[next_input]
                if state[dep] == 1:
                    raise ModelImportError(
                        "the graph has a cycle", node=nodes[dep].name or nodes[dep].op_type
                    )
                if state[dep] == 0:
                    stack.append((dep, 0))
            else:
                state[i] = 2
                order.append(i)
    return order
