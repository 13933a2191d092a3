"""Import a PyTorch module into the IR: ``intq.from_torch(module, example_inputs)``.

The module is captured with ``torch.export`` (ATen ops with static shapes), then every ATen
op is turned into the IR ops the ONNX frontend produces, so ``intq.quantize`` and the
backends work unchanged. One small converter per ATen op, in :data:`ATEN_CONVERTERS`.

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

import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from intq.errors import IntqError, ModelImportError, ShapeError, UnsupportedOpError
from intq.ir.graph import Graph, Value
from intq.ir.types import DType, TensorType
from intq.ir.verifier import verify
from intq.passes.constant_folding import fold_node, foldable
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
    import inspect

    import onnx
    import torch

    from intq.frontends.onnx_import import from_onnx

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
    import inspect

    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return params[:count] if len(params) >= count else [f"input_{i}" for i in range(count)]


# ----- the converter table ---------------------------------------------------------------


@dataclass
class TorchContext:
    """What a converter sees: the fx node, its arguments bound by name, the graph."""

    graph: Graph
    target: str
    name: str
    args: dict[str, Any]
    out_type: TensorType | None
    out_name: str
    module_type: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def value(self, key: str) -> Value:
        """Argument ``key``, which must be a tensor."""
        value = self.args.get(key)
        if not isinstance(value, Value):
            raise self.unsupported(f"argument {key!r} must be a tensor, got {value!r}")
        return value

    def emit(self, op: str, inputs: Sequence[Value | None], **attrs: Any) -> Value:
        """Add IR node ``op`` for this ATen op, folded to a constant when its inputs are."""
        node = self.graph.add(op, list(inputs), attrs, name=self.name, out_names=[self.out_name])
        if foldable(node):
            return fold_node(self.graph, node)[0]
        return node.output

    def scalar(self, number: Any, like: Value) -> Value:
        """A 0-d constant of ``like``'s dtype (for ``x * 2.0`` and friends)."""
        return self.graph.add_constant(np.array(number, dtype=like.type.dtype.numpy), "scalar")

    def operand(self, key: str, like: Value) -> Value:
        """Argument ``key`` as a tensor: a Python number becomes a constant like ``like``."""
        value = self.args.get(key)
        if isinstance(value, Value):
            return value
        if isinstance(value, (bool, int, float)):
            return self.scalar(value, like)
        raise self.unsupported(f"argument {key!r} = {value!r}")

    def unsupported(self, why: str) -> UnsupportedOpError:
        """An error for a feature of this op that intq does not handle."""
        where = f" in {self.module_type}" if self.module_type else ""
        return UnsupportedOpError(
            f"ATen op {self.target}{where}: {why}",
            node=self.name,
            hint="rewrite this part of the model, or export it to ONNX and use intq.from_onnx",
        )


Result = Value | list[Value | None] | None
TorchConverter = Callable[[TorchContext], Result]

ATEN_CONVERTERS: dict[str, TorchConverter] = {}
"""ATen overload (``aten.conv2d.default``) -> converter."""


def _aten(*targets: str) -> Callable[[TorchConverter], TorchConverter]:
    def register(fn: TorchConverter) -> TorchConverter:
        for target in targets:
            ATEN_CONVERTERS[target] = fn
        return fn

    return register


def supported_aten_ops() -> list[str]:
    """The ATen overloads :func:`from_torch` converts."""
    return sorted(ATEN_CONVERTERS)


def _pairs(values: Sequence[int] | int, spatial: int) -> tuple[int, ...]:
    if isinstance(values, int):
        return (values,) * spatial
    values = tuple(int(v) for v in values)
    return values * spatial if len(values) == 1 else values


@_aten("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default")
def _conv(ctx: TorchContext) -> Result:
    x, w = ctx.value("input"), ctx.value("weight")
    spatial = w.type.rank - 2
    if isinstance(ctx.args["padding"], str):
        raise ctx.unsupported(f"padding={ctx.args['padding']!r}; give explicit padding")
    padding = _pairs(ctx.args["padding"], spatial)
    return ctx.emit(
        "Conv",
        [x, w, ctx.args.get("bias")],
        strides=_pairs(ctx.args["stride"], spatial),
        pads=padding + padding,
        dilations=_pairs(ctx.args["dilation"], spatial),
        group=int(ctx.args["groups"]),
    )


@_aten("aten.linear.default")
def _linear(ctx: TorchContext) -> Result:
    """Gemm for 2-D input, else MatMul by the transposed weight plus the bias (as ONNX)."""
    x, w, bias = ctx.value("input"), ctx.value("weight"), ctx.args.get("bias")
    if x.type.rank == 2:
        return ctx.emit("Gemm", [x, w, bias], transB=1)
    if w.const is not None:
        wt = ctx.graph.add_constant(np.ascontiguousarray(w.const.T), w.name + ".T")
    else:
        wt = ctx.emit("Transpose", [w], perm=(1, 0))
    y = ctx.emit("MatMul", [x, wt])
    return y if bias is None else ctx.emit("Add", [y, bias])


@_aten("aten.matmul.default", "aten.mm.default", "aten.bmm.default")
def _matmul(ctx: TorchContext) -> Result:
    return ctx.emit(
        "MatMul", [ctx.value("self"), ctx.value("other" if "other" in ctx.args else "mat2")]
    )


@_aten("aten.addmm.default")
def _addmm(ctx: TorchContext) -> Result:
    return ctx.emit(
        "Gemm",
        [ctx.value("mat1"), ctx.value("mat2"), ctx.value("self")],
        alpha=float(ctx.args["alpha"]),
        beta=float(ctx.args["beta"]),
    )


@_aten("aten._native_batch_norm_legit_no_training.default", "aten.batch_norm.default")
def _batchnorm(ctx: TorchContext) -> Result:
    x = ctx.value("input")
    if ctx.args.get("training"):
        raise ctx.unsupported("batch norm in training mode")
    channels = x.type.shape[1]
    weight = ctx.args.get("weight")
    bias = ctx.args.get("bias")
    if weight is None:
        weight = ctx.graph.add_constant(np.ones(channels, x.type.dtype.numpy), "bn_scale")
    if bias is None:
        bias = ctx.graph.add_constant(np.zeros(channels, x.type.dtype.numpy), "bn_bias")
    y = ctx.emit(
        "BatchNormalization",
        [x, weight, bias, ctx.value("running_mean"), ctx.value("running_var")],
        epsilon=float(ctx.args["eps"]),
    )
    if ctx.target.startswith("aten.batch_norm"):
        return y
    return [y, None, None]  # the mean / invstd outputs exist only in training


@_aten("aten.layer_norm.default")
def _layernorm(ctx: TorchContext) -> Result:
    x = ctx.value("input")
    shape = tuple(ctx.args["normalized_shape"])
    weight, bias = ctx.args.get("weight"), ctx.args.get("bias")
    if weight is None:
        weight = ctx.graph.add_constant(np.ones(shape, x.type.dtype.numpy), "ln_scale")
    return ctx.emit(
        "LayerNormalization",
        [x, weight, bias],
        axis=x.type.rank - len(shape),
        epsilon=float(ctx.args["eps"]),
    )


@_aten("aten.relu.default", "aten.relu_.default")
def _relu(ctx: TorchContext) -> Result:
    return ctx.emit("Relu", [ctx.value("self")])


@_aten("aten.hardtanh.default", "aten.hardtanh_.default", "aten.clamp.default")
def _clip(ctx: TorchContext) -> Result:
    low = ctx.args.get("min_val", ctx.args.get("min"))
    high = ctx.args.get("max_val", ctx.args.get("max"))
    if isinstance(low, Value) or isinstance(high, Value):
        raise ctx.unsupported("tensor bounds")
    return ctx.emit(
        "Clip",
        [ctx.value("self")],
        min=-np.inf if low is None else float(low),
        max=np.inf if high is None else float(high),
    )


@_aten("aten.relu6.default")
def _relu6(ctx: TorchContext) -> Result:
    return ctx.emit("Clip", [ctx.value("self")], min=0.0, max=6.0)


@_aten("aten.sigmoid.default", "aten.tanh.default", "aten.sqrt.default", "aten.exp.default")
@_aten("aten.neg.default", "aten.abs.default", "aten.erf.default")
def _unary(ctx: TorchContext) -> Result:
    return ctx.emit(ctx.target.split(".")[1].capitalize(), [ctx.value("self")])


@_aten("aten.gelu.default")
def _gelu(ctx: TorchContext) -> Result:
    return ctx.emit("Gelu", [ctx.value("self")], approximate=ctx.args["approximate"])


@_aten("aten.silu.default")
def _silu(ctx: TorchContext) -> Result:
    x = ctx.value("self")
    return ctx.emit("Mul", [x, ctx.emit("Sigmoid", [x])])


_ARITH = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}


@_aten("aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.div.Tensor")
@_aten("aten.add.Scalar", "aten.sub.Scalar", "aten.mul.Scalar", "aten.div.Scalar")
def _arith(ctx: TorchContext) -> Result:
    x = ctx.value("self")
    other = ctx.operand("other", x)
    op = _ARITH[ctx.target.split(".")[1]]
    if ctx.args.get("rounding_mode") is not None:
        raise ctx.unsupported(f"rounding_mode={ctx.args['rounding_mode']!r}")
    alpha = ctx.args.get("alpha", 1)
    if alpha != 1:
        other = ctx.emit("Mul", [other, ctx.scalar(alpha, other)])
    return ctx.emit(op, [x, other])


@_aten("aten.rsub.Scalar", "aten.rsub.Tensor")
def _rsub(ctx: TorchContext) -> Result:
    x = ctx.value("self")
    if ctx.args.get("alpha", 1) != 1:
        raise ctx.unsupported("alpha != 1")
    return ctx.emit("Sub", [ctx.operand("other", x), x])


@_aten("aten.max_pool2d.default", "aten.max_pool1d.default")
def _maxpool(ctx: TorchContext) -> Result:
    x = ctx.value("self")
    spatial = x.type.rank - 2
    kernel = _pairs(ctx.args["kernel_size"], spatial)
    stride = ctx.args["stride"]
    padding = _pairs(ctx.args["padding"], spatial)
    return ctx.emit(
        "MaxPool",
        [x],
        kernel_shape=kernel,
        strides=_pairs(stride, spatial) if stride else kernel,
        pads=padding + padding,
        dilations=_pairs(ctx.args["dilation"], spatial),
        ceil_mode=int(bool(ctx.args["ceil_mode"])),
    )


@_aten("aten.avg_pool2d.default", "aten.avg_pool1d.default")
def _avgpool(ctx: TorchContext) -> Result:
    x = ctx.value("self")
    spatial = x.type.rank - 2
    if ctx.args.get("divisor_override") is not None:
        raise ctx.unsupported("divisor_override")
    kernel = _pairs(ctx.args["kernel_size"], spatial)
    stride = ctx.args["stride"]
    padding = _pairs(ctx.args["padding"], spatial)
    return ctx.emit(
        "AveragePool",
        [x],
        kernel_shape=kernel,
        strides=_pairs(stride, spatial) if stride else kernel,
        pads=padding + padding,
        ceil_mode=int(bool(ctx.args["ceil_mode"])),
        count_include_pad=int(bool(ctx.args["count_include_pad"])),
    )


@_aten("aten.adaptive_avg_pool2d.default", "aten._adaptive_avg_pool2d.default")
@_aten("aten.adaptive_avg_pool1d.default")
def _adaptive_avgpool(ctx: TorchContext) -> Result:
    x = ctx.value("self")
    sizes = x.type.shape[2:]
    out = _pairs(ctx.args["output_size"], len(sizes))
    if all(o == 1 for o in out):
        return ctx.emit("GlobalAveragePool", [x])
    if any(s % o for s, o in zip(sizes, out)):
        raise ctx.unsupported(f"output size {list(out)} does not divide the input {list(sizes)}")
    kernel = tuple(s // o for s, o in zip(sizes, out))
    return ctx.emit("AveragePool", [x], kernel_shape=kernel, strides=kernel)


def _reduce(op: str) -> TorchConverter:
    def convert(ctx: TorchContext) -> Result:
        x = ctx.value("self")
        dims = ctx.args.get("dim")
        if ctx.args.get("dtype") is not None:
            raise ctx.unsupported("dtype=")
        axes = tuple(range(x.type.rank)) if not dims else tuple(int(d) for d in dims)
        return ctx.emit(op, [x], axes=axes, keepdims=int(bool(ctx.args.get("keepdim"))))

    return convert


_aten("aten.mean.dim")(_reduce("ReduceMean"))
_aten("aten.sum.dim_IntList")(_reduce("ReduceSum"))
_aten("aten.amax.default")(_reduce("ReduceMax"))


@_aten("aten.softmax.int", "aten._softmax.default")
def _softmax(ctx: TorchContext) -> Result:
    if ctx.args.get("dtype") is not None:
        raise ctx.unsupported("dtype=")
    return ctx.emit("Softmax", [ctx.value("self")], axis=int(ctx.args["dim"]))


@_aten("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")
@_aten("aten.flatten.using_ints", "aten.expand.default")
def _reshape(ctx: TorchContext) -> Result:
    """Reshapes take the static output shape torch.export recorded (no -1 left to resolve)."""
    assert ctx.out_type is not None
    x = ctx.value("self")
    if ctx.target == "aten.expand.default":
        return ctx.emit("Expand", [x], shape=ctx.out_type.shape)
    return ctx.emit("Reshape", [x], shape=ctx.out_type.shape)


@_aten("aten.permute.default")
def _permute(ctx: TorchContext) -> Result:
    x = ctx.value("self")
    return ctx.emit("Transpose", [x], perm=tuple(int(d) % x.type.rank for d in ctx.args["dims"]))


@_aten("aten.transpose.int", "aten.t.default")
def _transpose(ctx: TorchContext) -> Result:
    x = ctx.value("self")
    perm = list(range(x.type.rank))
    a, b = (ctx.args["dim0"], ctx.args["dim1"]) if "dim0" in ctx.args else (0, 1)
    a, b = a % max(x.type.rank, 1), b % max(x.type.rank, 1)
    perm[a], perm[b] = perm[b], perm[a]
    return ctx.emit("Transpose", [x], perm=tuple(perm))


@_aten("aten.unsqueeze.default")
def _unsqueeze(ctx: TorchContext) -> Result:
    x = ctx.value("self")
    return ctx.emit("Unsqueeze", [x], axes=(int(ctx.args["dim"]) % (x.type.rank + 1),))


@_aten("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def _squeeze(ctx: TorchContext) -> Result:
    x = ctx.value("self")
    dims = ctx.args.get("dim", [i for i, d in enumerate(x.type.shape) if d == 1])
    dims = [dims] if isinstance(dims, int) else dims
    axes = tuple(int(d) % x.type.rank for d in dims if x.type.shape[int(d)] == 1)
    return ctx.emit("Squeeze", [x], axes=axes) if axes else x


@_aten("aten.cat.default")
def _cat(ctx: TorchContext) -> Result:
    tensors = [t for t in ctx.args["tensors"] if isinstance(t, Value)]
    rank = tensors[0].type.rank
    return ctx.emit("Concat", tensors, axis=int(ctx.args["dim"]) % rank)


@_aten("aten.slice.Tensor")
def _slice(ctx: TorchContext) -> Result:
    x = ctx.value("self")
    dim = int(ctx.args["dim"]) % x.type.rank
    start, end = ctx.args.get("start"), ctx.args.get("end")
    start = 0 if start is None else int(start)
    end = x.type.shape[dim] if end is None else min(int(end), x.type.shape[dim])
    return ctx.emit(
        "Slice", [x], starts=(start,), ends=(end,), axes=(dim,), steps=(int(ctx.args["step"]),)
    )


@_aten("aten.select.int")
def _select(ctx: TorchContext) -> Result:
    x = ctx.value("self")
    index = ctx.graph.add_constant(np.array(int(ctx.args["index"]), np.int64), "index")
    return ctx.emit("Gather", [x, index], axis=int(ctx.args["dim"]) % x.type.rank)


@_aten("aten.embedding.default")
def _embedding(ctx: TorchContext) -> Result:
    return ctx.emit("Gather", [ctx.value("weight"), ctx.value("indices")], axis=0)


@_aten("aten.pad.default", "aten.constant_pad_nd.default")
def _pad(ctx: TorchContext) -> Result:
    """torch pads the last dimension first, as (begin, end) pairs; ONNX wants all begins."""
    x = ctx.value("self" if "self" in ctx.args else "input")
    mode = ctx.args.get("mode", "constant")
    if mode != "constant":
        raise ctx.unsupported(f"mode={mode!r}")
    pad = [int(p) for p in ctx.args["pad"]]
    begins, ends = [0] * x.type.rank, [0] * x.type.rank
    for i in range(len(pad) // 2):
        axis = x.type.rank - 1 - i
        begins[axis], ends[axis] = pad[2 * i], pad[2 * i + 1]
    value = ctx.args.get("value")
    return ctx.emit(
        "Pad", [x], pads=tuple(begins + ends), value=0.0 if value is None else float(value)
    )


@_aten("aten._to_copy.default", "aten.to.dtype")
def _to(ctx: TorchContext) -> Result:
    x = ctx.value("self")
    assert ctx.out_type is not None
    if ctx.out_type.dtype == x.type.dtype:
        return x
    return ctx.emit("Cast", [x], to=ctx.out_type.dtype.value)


@_aten("aten.clone.default", "aten.contiguous.default", "aten.alias.default")
@_aten("aten.detach.default", "aten.lift_fresh_copy.default")
def _identity(ctx: TorchContext) -> Result:
    return ctx.value("self")


@_aten("aten.dropout.default", "aten.feature_dropout.default")
def _dropout(ctx: TorchContext) -> Result:
    if ctx.args.get("train"):
        raise ctx.unsupported("dropout in training mode")
    return ctx.value("input")


@_aten("aten._assert_tensor_metadata.default", "aten._assert_scalar.default")
def _assertion(ctx: TorchContext) -> Result:
    """Shape/dtype assertions: the IR's types already say it."""
    return None


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

    def _labels(self) -> dict[str, tuple[str, str]]:
        """fx node name -> (node label, module type): module paths, made unique per node."""
        import operator

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
        import operator

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
        assert output_node is not None
        self._outputs(output_node)
        DeadCodeElimination()(self.graph)
        verify(self.graph)
        return self.graph

    def _getitem(self, node: Any) -> None:
        source, index = node.args
        results = self.values.get(source.name)
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
        where = f" (in {kind})" if kind else ""
        if converter is None:
            raise UnsupportedOpError(
                f"ATen op {target}{where} is not supported",
                node=label,
                hint="rewrite this part of the model with supported ops, or export the model"
                " to ONNX and use intq.from_onnx; supported ATen ops: "
                + ", ".join(op.removeprefix("aten.") for op in supported_aten_ops()),
            )
        val = node.meta.get("val")
        import torch

        out_type = _ir_type(val, f"output of {target}") if isinstance(val, torch.Tensor) else None
        ctx = TorchContext(
            self.graph, target, label, _bind(node, self.values), out_type, node.name, kind
        )
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


__all__ = ["ATEN_CONVERTERS", "TorchExportFallbackWarning", "from_torch", "supported_aten_ops"]
