"""Import an ONNX model into the IR: ``intq.from_onnx(path_or_model, input_shapes)``.

- The file is parsed defensively: a truncated or corrupt file, a cycle, an
  undefined tensor, an unknown op or domain each raise a
  :class:`~intq.errors.ModelImportError` naming the node; before anything is converted,
  :mod:`intq.frontends.onnx_validate` refuses names that are not UTF-8, a value defined
  twice, a graph input listed twice, unknown dtype enums and attribute values out of range.
- External data is read only from files inside the model's directory (a
  location escaping it, also through a symlink, is refused) and only within
  the file's size.
- No tensor over ``intq.limits.MAX_TENSOR_BYTES`` is accepted, judged from its
  declared shape before anything is allocated, and an initializer's data must
  be as long as its dims say.
- Symbolic input dimensions (``batch_size``, ``sequence_length``) are fixed
  by :func:`resolve_input_shapes` from ``input_shapes`` (and, in
  ``intq.convert`` and the CLI, from the calibration data); a dimension name
  shared by several inputs gets one value. With static inputs, the
  exporters' shape computations fold to constants as the nodes are
  converted, so the IR is fully static.
- A node intq has no converter for whose inputs are all constants is evaluated
  by onnx's reference evaluator (:mod:`intq.frontends.onnx_fold`) and becomes
  a constant.
- A model quantized in QDQ format imports as its float graph plus its own quantization
  (:mod:`intq.frontends.onnx_qdq`), stored on the graph for ``intq.quantize``; a model
  quantized dynamically or in QOperator format is refused with one error.
- Every IR node keeps its ONNX node's name (``Op_i`` for unnamed nodes).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from intq.artifacts import parse_onnx
from intq.errors import IntqError, ModelImportError, ShapeError, UnsupportedOpError, unsupported_ops
from intq.frontends.onnx_context import (
    MAX_OPSET,
    ConvertContext,
    check_size,
    onnx_dtype,
    tensor_data,
)
from intq.frontends.onnx_fold import can_fold, fold
from intq.frontends.onnx_ops import find_converter, supported_ops
from intq.frontends.onnx_qdq import DEQUANTIZE, QUANTIZE, QdqImport, refuse_other_quantization
from intq.frontends.onnx_validate import check_strings, validate
from intq.ir.graph import Graph, Value
from intq.ir.types import TensorType
from intq.ir.verifier import verify
from intq.passes.dce import DeadCodeElimination

_DEFAULT_DOMAINS = ("", "ai.onnx")


def from_onnx(
    model: str | os.PathLike[str] | onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    base_dir: str | os.PathLike[str] | None = None,
) -> Graph:
    """Convert an ONNX model (a path or a ``ModelProto``) into an IR graph.

    ``input_shapes`` fixes the shape of inputs (by name) whose dimensions are
    symbolic, or overrides declared ones; a dimension name it fixes is fixed for
    every input that uses it. External data of a ``ModelProto`` is resolved
    relative to ``base_dir`` (default: the current directory); a path resolves it
    next to the model file.
    """
    if isinstance(model, onnx.ModelProto):
        proto, root = model, Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        proto, root = load_model(model), Path(model).resolve().parent
    shapes = resolve_input_shapes(declared_inputs(proto), input_shapes or {})
    return _Importer(proto, root, shapes).run()


@dataclass(frozen=True)
class OpUse:
    """One op type of an ONNX model: how many nodes use it and whether intq converts it."""

    op: str
    """The op type (with its domain when not ``ai.onnx``)."""
    count: int
    status: str
    """``supported``, ``folded`` (no converter, but every node of it computes on constants
    and was evaluated at import) or ``unsupported``."""


@dataclass(frozen=True)
class Survey:
    """The op census of an ONNX model, and its import: the graph, or the error it raised."""

    ops: list[OpUse]
    graph: Graph | None
    error: IntqError | None


def survey(
    proto: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]],
    base_dir: str | os.PathLike[str],
) -> Survey:
    """Import ``proto`` (with the static ``input_shapes`` of :func:`resolve_input_shapes`)
    and count its op types with a support status each, also when the import fails."""
    importer = _Importer(proto, Path(base_dir), {k: tuple(v) for k, v in input_shapes.items()})
    graph: Graph | None = None
    error: IntqError | None = None
    try:
        graph = importer.run()
    except IntqError as err:
        error = err
    opset = importer.opset
    counts = Counter(
        (n.op_type, n.domain if n.domain not in _DEFAULT_DOMAINS else "") for n in proto.graph.node
    )
    ops = []
    for (op_type, domain), count in sorted(counts.items()):
        if domain:
            ops.append(OpUse(f"{op_type} ({domain})", count, "unsupported"))
        elif find_converter(op_type, opset) is not None or op_type in importer.qdq.seen:
            ops.append(OpUse(op_type, count, "supported"))
        elif (
            op_type in importer.folded and f"{op_type} (opset {opset})" not in importer.unsupported
        ):
            ops.append(OpUse(op_type, count, "folded"))
        else:
            ops.append(OpUse(op_type, count, "unsupported"))
    return Survey(ops, graph, error)


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The parsed ONNX file at ``path`` (external data is read later, on import)."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ModelImportError(f"no model file at {path}")
        data = path.read_bytes()
    except (OSError, ValueError) as err:  # a name too long for the file system, a NUL byte
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ModelImportError(f"cannot read {_short(str(path))}: {reason}") from None
    return parse_onnx(
        data, path, ModelImportError, "re-export the model, or check that the download completed"
    )


def read_external(tensor: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """The data of a tensor stored in an external file inside ``base_dir``."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    what = f"external data of initializer {tensor.name!r}"
    shown = _short(location)
    if "\x00" in location:
        raise ModelImportError(
            f"{what} points to {shown}, a name with a NUL byte: no file has one",
            hint="the model file is corrupt; re-export it",
        )
    root = base_dir.resolve()
    try:
        target = (root / location).resolve()
        inside = target.is_relative_to(root)
        found = inside and target.is_file()
    except (OSError, RuntimeError) as err:  # a name too long for the file system, a loop
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "a symlink loop"
        raise ModelImportError(
            f"{what} points to {shown}, which cannot be resolved: {reason}",
            hint="external data files must sit in the model's directory or below it",
        ) from None
    if not location or os.path.isabs(location) or not inside:
        raise ModelImportError(
            f"{what} points to {shown}, outside the model's directory {root}",
            hint="external data files must sit in the model's directory or below it",
        )
    if not found:
        raise ModelImportError(f"{what}: file {shown} not found next to the model")
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
    try:
        size = target.stat().st_size
        if offset < 0 or length != expected or offset + length > size:
            raise ModelImportError(
                f"{what}: {length} bytes at offset {offset} of a {size}-byte file, but the"
                f" tensor {list(shape)} needs {expected} bytes"
            )
        with open(target, "rb") as f:
            f.seek(offset)
            raw = f.read(length)
    except OSError as err:
        raise ModelImportError(f"{what}: cannot read {shown}: {err.strerror or err}") from None
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)


def _short(text: str, limit: int = 80) -> str:
    """``text`` quoted, cut to ``limit`` characters with its length (a 5,000-character name
    should not fill the screen)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


# ----- symbolic input dimensions ------------------------------------------------------------

Dim = int | str | None
"""A declared input dimension: a size, a ``dim_param`` name, or None (neither)."""


def declared_inputs(proto: onnx.ModelProto) -> dict[str, tuple[Dim, ...] | None]:
    """The graph inputs that are not initializers, with their declared dims (None: no shape)."""
    g = proto.graph
    check_strings(g)  # the first reader of the names
    initialized = {t.name for t in g.initializer}
    declared: dict[str, tuple[Dim, ...] | None] = {}
    for info in g.input:
        if info.name in initialized or not info.type.HasField("tensor_type"):
            continue  # the import refuses an input that is not a tensor, naming it
        ttype = info.type.tensor_type
        if not ttype.HasField("shape"):
            declared[info.name] = None
            continue
        declared[info.name] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in ttype.shape.dim
        )
    return declared


def is_static(dims: tuple[Dim, ...] | None) -> bool:
    """Whether declared ``dims`` are all sizes."""
    return dims is not None and all(isinstance(d, int) for d in dims)


def dims_text(dims: Sequence[Dim]) -> str:
    """``[batch, 3, 224, 224]``: sizes as numbers, named dims by name, unnamed ones as ``?``."""
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def resolve_input_shapes(
    declared: Mapping[str, tuple[Dim, ...] | None],
    given: Mapping[str, Sequence[int]],
    observed: Mapping[str, Sequence[int]] | None = None,
    *,
    cli: bool = False,
) -> dict[str, tuple[int, ...]]:
    """A static shape for every input whose declared shape is not static, and every one in
    ``given``.

    ``given`` (``input_shapes``) wins; ``observed`` (the shapes of the first calibration batch)
    fixes the rest. A dimension name gets one value across inputs: data that disagrees on it
    is refused naming both inputs. ``cli`` spells the hints as ``--input-shape`` options.
    """
    observed = observed or {}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ShapeError(
            f"{_option(cli)} names unknown inputs {unknown}",
            hint="the model's inputs are " + ", ".join(declared),
        )
    bound: dict[str, tuple[int, str]] = {}  # dim name -> (size, the input that fixed it)

    def bind(sources: Mapping[str, Sequence[int]], override: bool) -> None:
        for name, shape in sources.items():
            dims = declared.get(name)
            if dims is None or len(dims) != len(shape):
                continue  # a new rank (given) or data the checks below refuse
            for dim, size in zip(dims, shape):
                if not isinstance(dim, str):
                    continue
                size = int(size)
                if dim in bound and bound[dim][0] != size:
                    other = bound[dim][1]
                    if not override and other in given:
                        continue  # input_shapes wins; the data check reports the data
                    what = f"{_option(cli)} gives" if override else "the calibration data gives"
                    raise ShapeError(
                        f"dimension {dim!r} is {bound[dim][0]} for input {other!r} but {size}"
                        f" for input {name!r} ({what} both); one name means one size",
                        hint=f"give both inputs the same {dim!r}, e.g. with "
                        + _spell(cli, name, [bound[dim][0] if d == dim else d for d in dims]),
                    )
                bound.setdefault(dim, (size, name))

    for name, shape in given.items():
        _no_empty_dims(name, shape, f"{_option(cli)} gives", cli)
    for name, shape in observed.items():
        _no_empty_dims(name, shape, "the first calibration batch gives", cli)
    bind({k: tuple(v) for k, v in given.items()}, True)
    bind({k: v for k, v in observed.items() if k not in given}, False)
    shapes = {name: tuple(int(d) for d in shape) for name, shape in given.items()}
    for name, dims in declared.items():
        if name in shapes or is_static(dims):
            continue
        seen = observed.get(name)
        if dims is None:
            if seen is None:
                raise ShapeError(
                    f"input {name!r} declares no shape",
                    hint=f"give the shape you will run with {_spell(cli, name, ['...'])}",
                )
            shapes[name] = tuple(int(d) for d in seen)
            continue
        if seen is not None and len(seen) != len(dims):
            raise ShapeError(
                f"the calibration data for input {name!r} has shape {list(seen)}, the model"
                f" takes rank {len(dims)}: {dims_text(dims)}",
                hint="samples go on the first axis; or fix the shape with "
                + _spell(cli, name, dims),
            )
        resolved: list[int] = []
        for i, dim in enumerate(dims):
            if isinstance(dim, int):
                resolved.append(dim)
            elif isinstance(dim, str) and dim in bound:
                resolved.append(bound[dim][0])
            elif seen is not None:
                resolved.append(int(seen[i]))
            else:
                free = [("?" if d is None else d) for d in dims if not isinstance(d, int)]
                raise ShapeError(
                    f"input {name!r} has symbolic dimensions {free} (shape {dims_text(dims)})"
                    " that nothing fixes",
                    hint="pass the shape you will run: "
                    + _spell(cli, name, dims)
                    + " with the names replaced by sizes"
                    + ("" if cli else ", or calibration data to intq.convert"),
                )
        shapes[name] = tuple(resolved)
    return shapes


def _no_empty_dims(name: str, shape: Sequence[int], what: str, cli: bool) -> None:
    """Refuse a dimension below 1 for input ``name``: a zero-size input holds no sample to
    calibrate or run on (and a batch of 0 samples never fills)."""
    if any(int(d) < 1 for d in shape):
        raise ShapeError(
            f"{what} input {name!r} the shape {list(shape)}: every dimension must be at"
            " least 1 (a zero-size input holds no samples)",
            hint="give the shape you will run with, "
            + _spell(cli, name, [max(int(d), 1) for d in shape]),
        )


def _option(cli: bool) -> str:
    return "--input-shape" if cli else "input_shapes"


def _spell(cli: bool, name: str, dims: Sequence[Dim]) -> str:
    """How the user fixes ``name``'s shape: ``input_shapes={'x': (1, seq)}`` or
    ``--input-shape x=1,seq``."""
    parts = ["?" if d is None else str(d) for d in dims]
    if cli:
        return f"--input-shape {name}={','.join(parts)}"
    inner = ", ".join(parts) + ("," if len(parts) == 1 else "")
    return f"input_shapes={{{name!r}: ({inner})}}"


class _Importer:
    def __init__(self, proto: onnx.ModelProto, base_dir: Path, shapes: dict[str, tuple[int, ...]]):
        self.proto = proto
        self.base_dir = base_dir
        self.shapes = shapes
        self.graph = Graph(proto.graph.name or "main")
        self.values: dict[str, Value | None] = {"": None}
        self.opset = self._opset()
        self.unsupported: dict[str, list[str]] = {}  # op -> the nodes intq cannot convert
        self.folded: set[str] = set()  # op types without a converter, folded on constants
        self.qdq = QdqImport(self.graph, proto.graph.node)

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
        validate(g)
        for tensor in g.initializer:
            self._initializer(tensor)
        if g.sparse_initializer:
            raise UnsupportedOpError("sparse initializers are not supported")
        for info in g.input:
            if info.name not in self.values:
                self._input(info)
        refuse_other_quantization(g.node)
        for index in _topological_order(g.node):
            node = g.node[index]
            name = node.name or f"{node.op_type}_{index}"
            try:
                missing = self._node(node, name)
            except IntqError:
                if not self.unsupported:
                    raise
                continue  # the nodes after an unsupported one are only surveyed
            if missing is not None:
                self.unsupported.setdefault(missing, []).append(name)
        if self.unsupported:
            raise self._report()
        outputs = []
        for info in g.output:
            value = self.values.get(info.name)
            if value is None:
                if info.name in self.qdq.pairs:
                    raise UnsupportedOpError(
                        f"graph output {info.name!r} is the integer output of a QuantizeLinear",
                        hint="intq's models return floats: end the model with its DequantizeLinear",
                    )
                raise ModelImportError(f"graph output {info.name!r} is never computed")
            outputs.append(self._named_output(value, info.name))
        self.graph.set_outputs(outputs)
        DeadCodeElimination()(self.graph)
        verify(self.graph)
        model_quantization = self.qdq.result(self.graph)
        if model_quantization is not None:  # after the last mutation, which would drop it
            self.graph.store_analysis(model_quantization)
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
            shape = self.shapes[info.name]
        else:  # resolve_input_shapes gave every input that is not static a shape
            shape = tuple(d.dim_value for d in ttype.shape.dim)
        check_size(shape, dtype, f"input {info.name!r}")
        if any(d == 0 for d in shape):
            raise ShapeError(
                f"input {info.name!r} has shape {list(shape)}: a zero-size dimension holds"
                " no samples to calibrate or run on",
                hint="fix the input's shape with "
                + _spell(False, info.name, [max(d, 1) for d in shape]),
            )
        try:
            self.values[info.name] = self.graph.add_input(info.name, TensorType(dtype, shape))
        except IntqError as err:
            raise ShapeError(f"input {info.name!r}: {err.message}") from None

    def _node(self, node: onnx.NodeProto, name: str) -> str | None:
        """Convert one node; returns its op (as the report names it) when intq has no
        converter for it, and nothing computes its outputs."""
        if node.domain not in _DEFAULT_DOMAINS:
            return f"{node.op_type} from domain {node.domain!r}"
        if node.op_type == DEQUANTIZE and node.input and node.input[0] in self.qdq.pairs:
            rest = [self.values.get(n) for n in node.input[1:]]
            self.values[node.output[0]] = self.qdq.dequantize(node, name, [None, *rest])
            return None
        converter = find_converter(node.op_type, self.opset)
        missing = [n for n in node.input if n not in self.values]
        quantized = [n for n in missing if n in self.qdq.pairs]
        if quantized:
            raise self.qdq.reads_integers(node, name, quantized[0])
        if missing:
            if self.unsupported and converter is None:
                return f"{node.op_type} (opset {self.opset})"
            raise ModelImportError(f"input {missing[0]!r} is not defined anywhere", node=name)
        inputs = [self.values[n] for n in node.input]
        constants = [None if v is None else False if v.const is None else v.const for v in inputs]
        if node.op_type == QUANTIZE and inputs and inputs[0] is not None and not inputs[0].is_const:
            self.qdq.quantize(node, name, inputs)  # the first half of a QDQ pair
            return None
        if converter is None:
            if can_fold(node, constants) and self._fold(node, name, inputs):
                self.folded.add(node.op_type)
                computed = self.values.get(node.output[0])
                if node.op_type == DEQUANTIZE and computed is not None:  # a weight, say
                    self.qdq.dequantized_constant(node, name, inputs, computed)
                return None
            return f"{node.op_type} (opset {self.opset})"
        ctx = ConvertContext(self.graph, node, name, self.opset, inputs)
        try:
            outputs = converter(ctx)
        except UnsupportedOpError:
            # A feature intq lacks (a bicubic Resize of position embeddings) on constants:
            # onnx computes it.
            if can_fold(node, constants) and self._fold(node, name, inputs):
                return None
            raise
        except IntqError as err:
            if err.node is None:
                raise type(err)(err.message, node=name, hint=err.hint) from None
            raise
        for onnx_name, value in zip(node.output, outputs):
            if onnx_name:
                self.values[onnx_name] = value
        return None

    def _report(self) -> UnsupportedOpError:
        """One error listing every op intq cannot convert, with a few of its nodes each."""
        custom = any(" from domain " in op for op in self.unsupported)
        hint = "supported ONNX ops (opsets): " + ", ".join(supported_ops())
        if custom:
            hint = "intq converts standard ONNX (ai.onnx) ops only; " + hint
        return unsupported_ops(self.unsupported, hint)

    def _fold(self, node: onnx.NodeProto, name: str, inputs: list[Value | None]) -> bool:
        """Evaluate a node intq has no converter for on its constant inputs; False when onnx
        cannot tell its output sizes in advance."""
        arrays = fold(node, name, self.opset, [None if v is None else v.const for v in inputs])
        if arrays is None:
            return False
        for onnx_name, array in zip(node.output, arrays):
            if onnx_name and array is not None:
                self.values[onnx_name] = self.graph.add_constant(array, onnx_name)
        return True

    def _named_output(self, value: Value, name: str) -> Value:
        """Keep the ONNX output name: users key their results by it."""
        if value.name == name:
            return value
        taken = self.graph.find(name)
        if taken is not None:
            self.graph.rename(taken, self.graph.unique_name(name))
        return self.graph.add("Identity", [value], name=name, out_names=[name]).output


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
    # Each node's producers, listed once: a node is popped once per input, and listing them
    # on every pop made a Concat of 50,000 inputs take minutes.
    deps_of: dict[int, list[int]] = {}
    for root in range(len(nodes)):
        stack = [(root, 0)]
        while stack:
            i, next_input = stack.pop()
            if next_input == 0:
                if state[i] == 2:
                    continue
                state[i] = 1
            deps = deps_of.get(i)
            if deps is None:
                deps = deps_of[i] = [producer[n] for n in nodes[i].input if n in producer]
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
                del deps_of[i]
    return order
