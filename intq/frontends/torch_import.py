"""Import a PyTorch module into the IR: ``intq.from_torch(module, example_inputs)``.

The module is captured with ``torch.export`` (ATen ops with static shapes), then every ATen
op is turned into the IR ops the ONNX frontend produces, so ``intq.quantize`` and the
backends work unchanged. One small converter per ATen op, in the table
:data:`intq.frontends.torch_ops.ATEN_CONVERTERS`; this module drives ``torch.export`` and
builds the graph.

- Node names are module paths (``layer3.1.conv2``), from ``torch.export``'s
  ``nn_module_stack``: a module that runs one op gives the op its path; a module that runs
  several (an attention block, a residual block's add) names each ``path/op``.
- Constants keep their ``state_dict`` names (``layer3.1.conv2.weight``).
- A module that ``torch.export`` cannot capture (data-dependent control flow...) is
  exported by ``torch.onnx.export`` and imported by :func:`intq.from_onnx` instead, with a
  warning: node names are then the ONNX exporter's.
- The module is exported in eval mode (and its modes restored afterwards).
"""

from __future__ import annotations

import inspect
import operator
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from intq.errors import IntqError, ModelImportError, ShapeError, UnsupportedOpError, unsupported_ops
from intq.frontends.onnx_import import from_onnx
from intq.frontends.torch_ops import ATEN_CONVERTERS, TorchContext, supported_aten_ops
from intq.ir.graph import Graph, Value
from intq.ir.types import DType, TensorType
from intq.ir.verifier import verify
from intq.passes.dce import DeadCodeElimination


class TorchExportFallbackWarning(UserWarning):
    """``torch.export`` could not capture a module; intq went through ONNX instead."""


def from_torch(
    module: Any,
    example_inputs: Any,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    fallback: bool = True,
) -> Graph:
    """Convert a PyTorch ``module`` into an IR graph, with shapes fixed by ``example_inputs``.

    ``example_inputs`` is a tensor, a tuple of tensors (positional arguments of
    ``forward``) or a dict (keyword arguments); numpy arrays are accepted too. Inputs
    are named after ``forward``'s parameters unless ``input_names`` is given; outputs are
    ``output`` (one) or ``output_0, output_1, ...`` unless ``output_names`` is given.
    With ``fallback``, a module ``torch.export`` cannot capture goes through
    ``torch.onnx.export`` and :func:`intq.from_onnx`, with a
    :class:`TorchExportFallbackWarning`.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ModelImportError(
            f"from_torch expects a torch.nn.Module, got {type(module).__name__}",
            hint="pass the model object itself; for a file use intq.from_onnx or intq.convert",
        )
    args, kwargs = _example_inputs(example_inputs)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        try:
            with torch.no_grad():
                program = torch.export.export(module, args, kwargs)
        except Exception as err:
            if not fallback:
                raise ModelImportError(
                    f"torch.export cannot capture {type(module).__name__}: {_first_line(err)}",
                    hint="make forward traceable (no data-dependent Python control flow), or"
                    " pass fallback=True to go through torch.onnx.export",
                ) from None
            warnings.warn(
                f"torch.export cannot capture {type(module).__name__} ({_first_line(err)});"
                " falling back to torch.onnx.export -> intq.from_onnx, so node names are the"
                " ONNX exporter's rather than module paths",
                TorchExportFallbackWarning,
                stacklevel=2,
            )
            return _via_onnx(module, args, kwargs, input_names, output_names)
    finally:
        for m, training in modes.items():
            m.train(training)
    try:
        return _Importer(program, input_names, output_names).run()
    except UnsupportedOpError:
        # The exported program keeps composite ops (batch_norm, dropout, flatten...), which
        # is faster to get; an op without a converter may decompose into ones that have one.
        decomposed = program.run_decompositions({})
        return _Importer(decomposed, input_names, output_names).run()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _example_inputs(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    import torch

    def tensor(x: Any, what: str) -> Any:
        if isinstance(x, torch.Tensor):
            return x
        if isinstance(x, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(x))
        raise ShapeError(
            f"example input {what} is a {type(x).__name__}, not a tensor",
            hint="pass a tensor, a tuple of tensors, or a dict of tensors (numpy arrays work)",
        )

    if isinstance(example, Mapping):
        return (), {k: tensor(v, repr(k)) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return tuple(tensor(x, str(i)) for i, x in enumerate(example)), {}
    return (tensor(example, "0"),), {}


def _via_onnx(
    module: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
) -> Graph:
    """The fallback: ``torch.onnx.export`` (TorchScript tracer) and ``from_onnx``."""
    import torch

    if kwargs:
        params = list(inspect.signature(module.forward).parameters)
        args = (*args, *(kwargs[p] for p in params if p in kwargs))
    names = list(input_names or _forward_names(module, len(args)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    args,
                    str(path),
                    dynamo=False,
                    opset_version=17,
                    input_names=names,
                    output_names=list(output_names) if output_names else None,
                    do_constant_folding=True,
                )
        except Exception as err:
            raise ModelImportError(
                f"neither torch.export nor torch.onnx.export can capture"
                f" {type(module).__name__}: {_first_line(err)}",
                hint="simplify forward (static shapes, no data-dependent control flow)",
            ) from None
        proto = onnx.load(str(path))
        proto.ir_version = min(proto.ir_version, 8)
        return from_onnx(proto)


def _forward_names(module: Any, count: int) -> list[str]:
    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return params[:count] if len(params) >= count else [f"input_{i}" for i in range(count)]


# ----- the importer ----------------------------------------------------------------------


def _ir_type(val: Any, what: str) -> TensorType:
    import torch

    if not isinstance(val, torch.Tensor):
        raise UnsupportedOpError(f"{what} is a {type(val).__name__}, not a tensor")
    try:
        dtype = DType.from_numpy(torch.empty((), dtype=val.dtype).numpy().dtype)
        shape = tuple(int(d) for d in val.shape)
    except (TypeError, RuntimeError, IntqError):
        raise UnsupportedOpError(
            f"{what}: dtype {val.dtype} or a symbolic shape is not supported",
            hint="use float32 / integer tensors with fixed shapes",
        ) from None
    return TensorType(dtype, shape)


_MISSING = object()
"""The value of an fx node intq could not convert (reported), and of what it feeds."""


def _reads_missing(args: Any) -> bool:
    return any(a is _MISSING or (isinstance(a, (list, tuple)) and _reads_missing(a)) for a in args)


def _bind(node: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in, fx nodes as IR values."""
    import torch

    def convert(arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            return values.get(arg.name)
        if isinstance(arg, (list, tuple)):
            return [convert(a) for a in arg]
        return arg

    schema = node.target._schema
    bound: dict[str, Any] = {}
    positional = [a for a in schema.arguments if not a.kwarg_only]
    for arg, given in zip(positional, node.args):
        bound[arg.name] = convert(given)
    for key, given in node.kwargs.items():
        bound[key] = convert(given)
    for arg in schema.arguments:
        if arg.name not in bound and arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


class _Importer:
    def __init__(
        self,
        program: Any,
        input_names: Sequence[str] | None,
        output_names: Sequence[str] | None,
    ):
        self.program = program
        self.input_names = list(input_names) if input_names else None
        self.output_names = list(output_names) if output_names else None
        self.graph = Graph("main")
        self.values: dict[str, Any] = {}
        self.labels = self._labels()
        self.unsupported: dict[str, list[str]] = {}  # ATen op -> the nodes that use it

    def _labels(self) -> dict[str, tuple[str, str]]:
        """fx node name -> (node label, module type): module paths, made unique per node."""
        paths: dict[str, tuple[str, str]] = {}
        count: dict[str, int] = {}
        for node in self.program.graph_module.graph.nodes:
            if node.op != "call_function" or node.target is operator.getitem:
                continue
            stack = node.meta.get("nn_module_stack") or {}
            path, kind = next(reversed(stack.values()), ("", ""))
            kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
            paths[node.name] = (path, kind.rsplit(".", 1)[-1])
            count[path] = count.get(path, 0) + 1
        labels = {}
        for name, (path, kind) in paths.items():
            if not path:
                labels[name] = (name, "")
            elif count[path] == 1:
                labels[name] = (path, kind)
            else:
                labels[name] = (f"{path}/{name}", kind)
        return labels

    def run(self) -> Graph:
        import torch

        signature = self.program.graph_signature
        specs = {spec.arg.name: spec for spec in signature.input_specs}
        user = list(signature.user_inputs)
        names = self.input_names or user
        if len(names) != len(user):
            raise ShapeError(
                f"input_names has {len(names)} names, the module takes {len(user)} tensors",
                hint=f"the module's inputs are {user}",
            )
        rename = dict(zip(user, names))
        state = self.program.state_dict
        constants = self.program.constants
        output_node = None
        for node in self.program.graph_module.graph.nodes:
            if node.op == "placeholder":
                spec = specs[node.name]
                if node.name in rename:
                    what = f"input {rename[node.name]!r}"
                    ttype = _ir_type(node.meta.get("val"), what)
                    self.values[node.name] = self.graph.add_input(rename[node.name], ttype)
                    continue
                tensor = state.get(spec.target)
                if tensor is None:
                    tensor = constants.get(spec.target)
                if not isinstance(tensor, torch.Tensor):
                    raise UnsupportedOpError(
                        f"module input {spec.target!r} ({spec.kind.name}) is not a tensor"
                    )
                array = tensor.detach().cpu().contiguous().numpy().copy()
                self.values[node.name] = self.graph.add_constant(array, spec.target)
            elif node.op == "call_function":
                if node.target is operator.getitem:
                    self._getitem(node)
                else:
                    self._convert(node)
            elif node.op == "output":
                output_node = node
            else:
                raise UnsupportedOpError(f"fx node {node.name} of kind {node.op}")
        if self.unsupported:
            raise unsupported_ops(
                self.unsupported,
                hint="rewrite this part of the model with supported ops, or export the model"
                " to ONNX and use intq.from_onnx; supported ATen ops: "
                + ", ".join(op.removeprefix("aten.") for op in supported_aten_ops()),
            )
        assert output_node is not None
        self._outputs(output_node)
        DeadCodeElimination()(self.graph)
        verify(self.graph)
        return self.graph

    def _getitem(self, node: Any) -> None:
        source, index = node.args
        results = self.values.get(source.name)
        if results is _MISSING:  # downstream of an op already reported
            self.values[node.name] = _MISSING
            return
        picked = results[index] if isinstance(results, list) else None
        if picked is None:
            label = self.labels.get(source.name, (source.name, ""))[0]
            raise UnsupportedOpError(
                f"output {index} of {source.target} is used; intq supports only its first",
                node=label,
            )
        self.values[node.name] = picked

    def _convert(self, node: Any) -> None:
        target = str(node.target)
        label, kind = self.labels[node.name]
        converter = ATEN_CONVERTERS.get(target)
        args = _bind(node, self.values)
        if _reads_missing(args.values()):  # downstream of an op already reported
            self.values[node.name] = _MISSING
            return
        if converter is None:
            folded = self._fold(node)
            if folded is None:
                where = f" (in {kind})" if kind else ""
                self.unsupported.setdefault(f"ATen op {target}{where}", []).append(label)
            self.values[node.name] = _MISSING if folded is None else folded
            return
        val = node.meta.get("val")
        import torch

        out_type = _ir_type(val, f"output of {target}") if isinstance(val, torch.Tensor) else None
        ctx = TorchContext(self.graph, target, label, args, out_type, node.name, kind)
        try:
            result = converter(ctx)
        except IntqError as err:
            if err.node is None:
                raise type(err)(err.message, node=label, hint=err.hint) from None
            raise
        if isinstance(result, Value) and out_type is not None:
            if result.type.shape != out_type.shape or result.type.dtype != out_type.dtype:
                raise ShapeError(
                    f"{target} gave {result.type} in intq but {out_type} in PyTorch", node=label
                )
        self.values[node.name] = result

    def _fold(self, node: Any) -> Value | list[Value | None] | None:
        """The op evaluated by PyTorch itself when every tensor it reads is a constant (a
        mask builder's ``new_ones``, a ``linspace``): constants; ``None`` otherwise."""
        import torch

        constant = True

        def tensor(arg: Any) -> Any:
            nonlocal constant
            if isinstance(arg, torch.fx.Node):
                value = self.values.get(arg.name)
                if not isinstance(value, Value) or value.const is None:
                    constant = False
                    return None
                return torch.from_numpy(np.array(value.const))
            if isinstance(arg, (list, tuple)):
                return type(arg)(tensor(a) for a in arg)
            return arg

        args = [tensor(a) for a in node.args]
        kwargs = {k: tensor(v) for k, v in node.kwargs.items()}
        if not constant:
            return None
        try:
            with torch.no_grad():
                result = node.target(*args, **kwargs)
        except Exception:  # not evaluable here (a device, an out= argument): reported
            return None
        results = result if isinstance(result, (list, tuple)) else [result]
        if not all(isinstance(r, torch.Tensor) for r in results):
            return None
        label = self.labels[node.name][0]
        values = [self.graph.add_constant(r.detach().numpy().copy(), label) for r in results]
        return values[0] if not isinstance(result, (list, tuple)) else list(values)

    def _outputs(self, node: Any) -> None:
        import torch

        results = node.args[0]
        results = list(results) if isinstance(results, (list, tuple)) else [results]
        values = []
        for item in results:
            value = self.values.get(item.name) if isinstance(item, torch.fx.Node) else None
            if not isinstance(value, Value):
                raise UnsupportedOpError(f"module output {item} is not a tensor")
            values.append(value)
        names = self.output_names or (
            ["output"] if len(values) == 1 else [f"output_{i}" for i in range(len(values))]
        )
        if len(names) != len(values):
            raise ShapeError(
                f"output_names has {len(names)} names, the module returns {len(values)} tensors"
            )
        outputs = []
        for value, name in zip(values, names):
            if value.producer is None or value.is_graph_output or value in outputs:
                # An input, a constant or a repeated output: an Identity carries the name.
                taken = self.graph.find(name)
                if taken is not None:
                    self.graph.rename(taken, self.graph.unique_name(name + ".0"))
                value = self.graph.add("Identity", [value], name=name, out_names=[name]).output
            else:
                taken = self.graph.find(name)
                if taken is not None and taken is not value:
                    self.graph.rename(taken, self.graph.unique_name(name + ".0"))
                self.graph.rename(value, name)
            outputs.append(value)
        self.graph.set_outputs(outputs)


__all__ = [
    "ATEN_CONVERTERS",
    "TorchExportFallbackWarning",
    "from_torch",
    "supported_aten_ops",
]
