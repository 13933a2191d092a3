"""One small converter per ATen op, in the explicit table :data:`ATEN_CONVERTERS`.

A converter gets a :class:`TorchContext` for one node of the ``torch.export`` graph (its
arguments bound by schema name, tensors as IR values) and returns the IR values of the
node's outputs, as the IR ops the ONNX frontend produces (:mod:`intq.frontends.onnx_ops`),
so ``intq.quantize`` and the backends work unchanged. ``ctx.emit`` folds nodes whose inputs
are all constants. The importer, :mod:`intq.frontends.torch_import`, walks the graph and
calls them.

Adding an op: write a converter and register it under its ATen overloads with ``@_aten``.
Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from intq.errors import UnsupportedOpError
from intq.frontends.blocks import Blocks, Constant, Emit, fold, unfold
from intq.frontends.einsum import einsum
from intq.frontends.normalization import group_norm, l2_norm
from intq.ir.graph import Graph, Value
from intq.ir.types import DType, TensorType
from intq.ops.shape_rules import global_window
from intq.passes.constant_folding import fold_node, foldable


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

    def emit(
        self, op: str, inputs: Sequence[Value | None], suffix: str = "", **attrs: Any
    ) -> Value:
        """Add IR node ``op`` for this ATen op, folded to a constant when its inputs are; its
        output is named after the ATen op's, plus ``suffix`` (an intermediate node)."""
        node = self.graph.add(
            op, list(inputs), attrs, name=self.name, out_names=[self.out_name + suffix]
        )
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
@_aten("aten.conv1d.padding", "aten.conv2d.padding", "aten.conv3d.padding")
def _conv(ctx: TorchContext) -> Result:
    x, w = ctx.value("input"), ctx.value("weight")
    spatial = w.type.rank - 2
    strides = _pairs(ctx.args["stride"], spatial)
    dilations = _pairs(ctx.args["dilation"], spatial)
    padding = ctx.args["padding"]
    if padding == "valid":
        begins = ends = (0,) * spatial
    elif padding == "same":  # torch puts the odd pixel at the end (stride 1 only)
        total = [d * (k - 1) for d, k in zip(dilations, w.type.shape[2:])]
        begins = tuple(t // 2 for t in total)
        ends = tuple(t - b for t, b in zip(total, begins))
    else:
        begins = ends = _pairs(padding, spatial)
    return ctx.emit(
        "Conv",
        [x, w, ctx.args.get("bias")],
        strides=strides,
        pads=begins + ends,
        dilations=dilations,
        group=int(ctx.args["groups"]),
    )


@_aten("aten.index.Tensor")
def _index(ctx: TorchContext) -> Result:
    """``x[i0, i1, ...]`` with constant index tensors for the leading axes (a mask builder's
    ``mask[batch_idx, kv_idx]``): one Gather from ``x`` flattened over those axes, at the
    flat positions of the broadcast indices."""
    x = ctx.value("self")
    indices = ctx.args["indices"]
    if not indices or any(not isinstance(i, Value) or i.const is None for i in indices):
        raise ctx.unsupported("indices that are not constant tensors, or a None (slice)")
    lead = x.type.shape[: len(indices)]
    arrays = np.broadcast_arrays(*(np.asarray(i.const) for i in indices))
    if arrays[0].dtype == bool:
        raise ctx.unsupported("a boolean index")
    positions = np.ravel_multi_index([np.mod(a, n) for a, n in zip(arrays, lead)], lead)
    flat = ctx.emit("Reshape", [x], shape=(int(np.prod(lead)), *x.type.shape[len(indices) :]))
    index = ctx.graph.add_constant(positions.astype(np.int64), f"{ctx.name}.positions")
    return ctx.emit("Gather", [flat, index], axis=0)


@_aten("aten.arange.default", "aten.arange.start", "aten.arange.start_step")
def _arange(ctx: TorchContext) -> Result:
    """A constant at the captured shapes (position ids, mask builders' index ranges)."""
    given = [ctx.args[k] for k in ("start", "end", "step") if k in ctx.args]
    if not all(isinstance(b, (int, float)) for b in given):
        raise ctx.unsupported("a bound computed at run time")
    assert ctx.out_type is not None
    start, end, step = (*given, 1)[:3] if len(given) > 1 else (0, given[0], 1)
    data = np.arange(start, end, step).astype(ctx.out_type.dtype.numpy)
    return ctx.graph.add_constant(data, ctx.name)


@_aten("aten.conv_transpose1d.default", "aten.conv_transpose2d.input")
@_aten("aten.conv_transpose3d.input")
def _conv_transpose(ctx: TorchContext) -> Result:
    x, w = ctx.value("input"), ctx.value("weight")
    spatial = w.type.rank - 2
    padding = _pairs(ctx.args["padding"], spatial)
    return ctx.emit(
        "ConvTranspose",
        [x, w, ctx.args.get("bias")],
        strides=_pairs(ctx.args["stride"], spatial),
        pads=padding + padding,
        output_padding=_pairs(ctx.args["output_padding"], spatial),
        dilations=_pairs(ctx.args["dilation"], spatial),
        group=int(ctx.args["groups"]),
    )


def _blocks(ctx: TorchContext, image: Sequence[int]) -> Blocks:
    padding = _pairs(ctx.args["padding"], len(image))
    return Blocks(
        tuple(int(n) for n in image),
        _pairs(ctx.args["kernel_size"], len(image)),
        _pairs(ctx.args["stride"], len(image)),
        _pairs(ctx.args["dilation"], len(image)),
        padding + padding,
    )


def _block_emitters(ctx: TorchContext) -> tuple[Emit, Constant]:
    def constant(array: np.ndarray, suffix: str) -> Value:
        return ctx.graph.add_constant(array, ctx.name + suffix)

    return ctx.emit, constant


@_aten("aten.im2col.default")
def _im2col(ctx: TorchContext) -> Result:
    """``nn.Unfold`` (see :mod:`intq.frontends.blocks`)."""
    x = ctx.value("self")
    geometry = _blocks(ctx, x.type.shape[2:])
    return unfold(*_block_emitters(ctx), x, geometry, ctx.name)


@_aten("aten.col2im.default")
def _col2im(ctx: TorchContext) -> Result:
    """``nn.Fold`` (see :mod:`intq.frontends.blocks`)."""
    x = ctx.value("self")
    geometry = _blocks(ctx, ctx.args["output_size"])
    return fold(*_block_emitters(ctx), x, geometry, ctx.name)


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


@_aten("aten.einsum.default")
def _einsum(ctx: TorchContext) -> Result:
    """Transpose, Reshape, batched MatMul and ReduceSum (:mod:`intq.frontends.einsum`)."""
    operands = ctx.args.get("tensors")
    if not isinstance(operands, (list, tuple)) or not all(isinstance(v, Value) for v in operands):
        raise ctx.unsupported(f"operands must be tensors, got {operands!r}")
    equation = str(ctx.args["equation"])
    return einsum(ctx.emit, equation, list(operands), node=ctx.name)


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


def _param(ctx: TorchContext, key: str) -> np.ndarray | None:
    """Optional tensor argument ``key`` as constant data (a normalization's weight, bias)."""
    value = ctx.args.get(key)
    if value is None:
        return None
    if not isinstance(value, Value) or value.const is None:
        raise ctx.unsupported(f"{key} must be a constant tensor")
    return np.asarray(value.const)


def _group_norm(ctx: TorchContext, x: Value, groups: int) -> Value:
    """``x`` through :func:`intq.frontends.normalization.group_norm` with the op's weight,
    bias and eps."""
    gamma, beta = _param(ctx, "weight"), _param(ctx, "bias")
    eps = float(ctx.args["eps"])
    return group_norm(ctx.graph, ctx.emit, x, groups, gamma, beta, eps, node=ctx.name)


@_aten("aten.group_norm.default")
def _groupnorm(ctx: TorchContext) -> Result:
    return _group_norm(ctx, ctx.value("input"), int(ctx.args["num_groups"]))


@_aten("aten.native_group_norm.default")
def _native_groupnorm(ctx: TorchContext) -> Result:
    y = _group_norm(ctx, ctx.value("input"), int(ctx.args["group"]))
    return [y, None, None]  # the mean / rstd outputs exist for the backward pass


@_aten("aten.instance_norm.default")
def _instancenorm(ctx: TorchContext) -> Result:
    """Statistics of each sample and channel (``use_input_stats``), else the running ones: an
    inference batch norm."""
    x = ctx.value("input")
    if not ctx.args.get("use_input_stats"):
        ctx.args = {**ctx.args, "training": False}
        result = _batchnorm(ctx)
        return result[0] if isinstance(result, list) else result
    return _group_norm(ctx, x, x.type.shape[1] if x.type.rank >= 2 else 0)


@_aten("aten._native_batch_norm_legit.no_stats")
def _batchnorm_batch_stats(ctx: TorchContext) -> Result:
    """Batch norm by the batch's own statistics (``training=True``, no running stats): of a
    constant, computed here (weight standardization: ``F.batch_norm`` of a conv weight viewed
    as ``[1, C_out, -1]``); of one sample, an instance norm."""
    x = ctx.value("input")
    if x.type.rank < 2:
        raise ctx.unsupported(f"batch norm of {x.type}")
    if x.const is not None:
        data = np.asarray(x.const, np.float64)
        axes = (0, *range(2, data.ndim))
        mean = data.mean(axis=axes, keepdims=True)
        var = data.var(axis=axes, keepdims=True)
        y = (data - mean) / np.sqrt(var + float(ctx.args["eps"]))
        channel = (1, -1) + (1,) * (data.ndim - 2)
        gamma, beta = _param(ctx, "weight"), _param(ctx, "bias")
        if gamma is not None:
            y = y * gamma.reshape(channel)
        if beta is not None:
            y = y + beta.reshape(channel)
        out = ctx.graph.add_constant(y.astype(x.type.dtype.numpy), ctx.out_name)
        return [out, None, None]
    if x.type.shape[0] != 1:
        raise ctx.unsupported("batch norm by the statistics of a batch of more than one sample")
    return [_group_norm(ctx, x, x.type.shape[1]), None, None]


@_aten("aten.relu.default", "aten.relu_.default")
def _relu(ctx: TorchContext) -> Result:
    return ctx.emit("Relu", [ctx.value("self")])


@_aten("aten.hardtanh.default", "aten.hardtanh_.default", "aten.clamp.default")
@_aten("aten.clamp_min.default")
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


@_aten("aten.hardswish.default", "aten.hardswish_.default")
def _hardswish(ctx: TorchContext) -> Result:
    """``x * relu6(x + 3) / 6``: ONNX's HardSwish."""
    return ctx.emit("HardSwish", [ctx.value("self")])


@_aten("aten.hardsigmoid.default", "aten.hardsigmoid_.default")
def _hardsigmoid(ctx: TorchContext) -> Result:
    """``relu6(x + 3) / 6``: HardSigmoid with alpha 1/6 (ONNX's default is 0.2)."""
    return ctx.emit("HardSigmoid", [ctx.value("self")], alpha=1.0 / 6.0, beta=0.5)


@_aten("aten.prelu.default", "aten._prelu_kernel.default")
def _prelu(ctx: TorchContext) -> Result:
    """torch's slope is one per channel (dim 1) or one in all; the IR's broadcasts as numpy."""
    x, slope = ctx.value("self"), ctx.value("weight")
    if slope.type.size == 1:
        shape: tuple[int, ...] = ()
    elif slope.type.rank == 1 and x.type.rank >= 2:
        shape = (slope.type.shape[0],) + (1,) * (x.type.rank - 2)
    else:
        return ctx.emit("PRelu", [x, slope])
    if slope.const is not None:
        slope = ctx.graph.add_constant(slope.const.reshape(shape), slope.name + ".per_channel")
    else:
        slope = ctx.emit("Reshape", [slope], shape=shape)
    return ctx.emit("PRelu", [x, slope])


@_aten("aten.leaky_relu.default", "aten.leaky_relu_.default")
def _leaky_relu(ctx: TorchContext) -> Result:
    """PRelu by a scalar slope, as the ONNX frontend converts LeakyRelu."""
    x = ctx.value("self")
    return ctx.emit("PRelu", [x, ctx.scalar(float(ctx.args["negative_slope"]), x)])


@_aten("aten.minimum.default", "aten.maximum.default")
def _min_max(ctx: TorchContext) -> Result:
    op = "Min" if ctx.target.startswith("aten.minimum") else "Max"
    return ctx.emit(op, [ctx.value("self"), ctx.value("other")])


@_aten("aten.softplus.default")
def _softplus(ctx: TorchContext) -> Result:
    """``softplus(beta x) / beta``. torch returns ``x`` where ``beta x > threshold``; at the
    default 20 the two differ by ``exp(-20)``, below float32's resolution there."""
    x = ctx.value("self")
    beta, threshold = float(ctx.args["beta"]), float(ctx.args["threshold"])
    scaled = x if beta == 1.0 else ctx.emit("Mul", [x, ctx.scalar(beta, x)])
    y = ctx.emit("Softplus", [scaled])
    if threshold < 20.0:
        cut = ctx.emit("Greater", [scaled, ctx.scalar(threshold, x)])
        y = ctx.emit("Where", [cut, scaled, y])
    return y if beta == 1.0 else ctx.emit("Div", [y, ctx.scalar(beta, x)])


@_aten("aten.mish.default")
def _mish(ctx: TorchContext) -> Result:
    return ctx.emit("Mish", [ctx.value("self")])


_ARITH = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}


_LOGIC = {
    **dict.fromkeys(("__and__", "bitwise_and", "logical_and"), "And"),
    **dict.fromkeys(("__or__", "bitwise_or", "logical_or"), "Or"),
    **{"eq": "Equal", "lt": "Less", "gt": "Greater"},
}


@_aten(*(f"aten.{name}.Tensor" for name in _LOGIC))
@_aten("aten.eq.Scalar", "aten.lt.Scalar", "aten.gt.Scalar", "aten.ne.Tensor", "aten.ne.Scalar")
def _logic(ctx: TorchContext) -> Result:
    """Masks and their comparisons: ``And``/``Or`` of bool tensors, ``Equal``/``Less``/
    ``Greater`` (``ne`` as ``Not(Equal)``), a Python number as a constant of ``self``'s dtype."""
    x = ctx.value("self")
    other = ctx.operand("other", x)
    name = ctx.target.split(".")[1]
    if name == "ne":
        return ctx.emit("Not", [ctx.emit("Equal", [x, other])])
    return ctx.emit(_LOGIC[name], [x, other])


@_aten("aten.where.self", "aten.where.ScalarOther", "aten.where.ScalarSelf", "aten.where.Scalar")
def _where(ctx: TorchContext) -> Result:
    """``torch.where(mask, a, b)``; a Python number takes the dtype torch gives the result."""
    assert ctx.out_type is not None
    like = Value("like", TensorType(ctx.out_type.dtype, ()))
    x, other = ctx.operand("self", like), ctx.operand("other", like)
    return ctx.emit("Where", [ctx.value("condition"), x, other])


@_aten("aten.gather.default")
def _gather_elements(ctx: TorchContext) -> Result:
    """``torch.gather``: ONNX's GatherElements (RoBERTa picks its token-type embedding ids)."""
    x = ctx.value("self")
    return ctx.emit(
        "GatherElements", [x, ctx.value("index")], axis=int(ctx.args["dim"]) % x.type.rank
    )


@_aten("aten.cumsum.default")
def _cumsum(ctx: TorchContext) -> Result:
    """A running sum (RoBERTa's and MPNet's position ids count the real tokens), in the dtype
    torch gives it: integers sum in int64 unless ``dtype`` says otherwise."""
    x = ctx.value("self")
    assert ctx.out_type is not None
    if ctx.out_type.dtype != x.type.dtype:
        x = ctx.emit("Cast", [x], ".cast", to=ctx.out_type.dtype.value)
    return ctx.emit("CumSum", [x], axis=int(ctx.args["dim"]) % x.type.rank, exclusive=0, reverse=0)


@_aten("aten.logical_not.default", "aten.bitwise_not.default")
def _logical_not(ctx: TorchContext) -> Result:
    x = ctx.value("self")
    if x.type.dtype is not DType.BOOL:
        raise ctx.unsupported(f"bitwise not of {x.type.dtype.name.lower()}")
    return ctx.emit("Not", [x])


def _promoted(ctx: TorchContext, x: Value, suffix: str) -> Value:
    """``x`` in the dtype torch's type promotion gives the result (``int64 * int32`` is
    int64, an integer divided is float): IR arithmetic takes operands of one dtype."""
    want = ctx.out_type.dtype if ctx.out_type is not None else x.type.dtype
    return x if x.type.dtype == want else ctx.emit("Cast", [x], suffix, to=want.value)


@_aten("aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.div.Tensor")
@_aten("aten.add.Scalar", "aten.sub.Scalar", "aten.mul.Scalar", "aten.div.Scalar")
def _arith(ctx: TorchContext) -> Result:
    x = _promoted(ctx, ctx.value("self"), ".self")
    other = _promoted(ctx, ctx.operand("other", x), ".other")
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
    if global_window(x.type.shape[2:], kernel, padding, bool(ctx.args["ceil_mode"])):
        return ctx.emit("GlobalAveragePool", [x])
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


@_aten("aten.linalg_vector_norm.default")
def _vector_norm(ctx: TorchContext) -> Result:
    """``ord=2``: ``sqrt(sum(x^2))`` (:func:`intq.frontends.normalization.l2_norm`); torch.norm
    with ``p=2`` and F.normalize's norm export this."""
    x = ctx.value("self")
    if float(ctx.args.get("ord", 2)) != 2.0:
        raise ctx.unsupported(f"ord={ctx.args.get('ord')!r} (only the L2 norm, ord=2)")
    if ctx.args.get("dtype") is not None:
        raise ctx.unsupported("dtype=")
    dims = ctx.args.get("dim")
    dims = [dims] if isinstance(dims, int) else dims
    rank = max(x.type.rank, 1)
    axes = tuple(range(x.type.rank)) if not dims else tuple(sorted(int(d) % rank for d in dims))
    return l2_norm(ctx.emit, x, axes, bool(ctx.args.get("keepdim")))


@_aten("aten.softmax.int", "aten._softmax.default")
def _softmax(ctx: TorchContext) -> Result:
    if ctx.args.get("dtype") is not None:
        raise ctx.unsupported("dtype=")
    return ctx.emit("Softmax", [ctx.value("self")], axis=int(ctx.args["dim"]))


@_aten("aten.scaled_dot_product_attention.default")
def _attention(ctx: TorchContext) -> Result:
    """``softmax(q k^T * scale + mask) v``: MatMul, Mul, Add, Softmax, MatMul, the pattern
    the integer attention lowering recognises (as an exported BERT's eager attention)."""
    q, k, v = ctx.value("query"), ctx.value("key"), ctx.value("value")
    if ctx.args.get("is_causal"):
        raise ctx.unsupported("is_causal=True; pass the causal mask as attn_mask")
    if float(ctx.args.get("dropout_p") or 0.0) != 0.0:
        raise ctx.unsupported(f"dropout_p={ctx.args['dropout_p']}")
    if ctx.args.get("enable_gqa"):
        raise ctx.unsupported("enable_gqa=True")
    mask = ctx.args.get("attn_mask")
    if mask is not None and not isinstance(mask, Value):
        raise ctx.unsupported(f"attn_mask={mask!r}")
    if (
        mask is not None
        and mask.const is not None
        and mask.const.dtype == bool
        and mask.const.all()
    ):
        mask = None  # keeps every position (a bidirectional model's mask at fixed shapes)
    if mask is not None and not mask.type.dtype.is_float:  # True keeps: 0, else the lowest
        keep, drop = ctx.scalar(0.0, q), ctx.scalar(np.finfo(np.float32).min, q)
        mask = ctx.emit("Where", [mask, keep, drop])
    scale = ctx.args.get("scale")
    scale = 1.0 / float(np.sqrt(q.type.shape[-1])) if scale is None else float(scale)
    perm = list(range(k.type.rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    scores = ctx.emit("MatMul", [q, ctx.emit("Transpose", [k], perm=tuple(perm))])
    scores = ctx.emit("Mul", [scores, ctx.scalar(scale, scores)])
    if mask is not None:
        scores = ctx.emit("Add", [scores, mask])
    weights = ctx.emit("Softmax", [scores], axis=scores.type.rank - 1)
    return ctx.emit("MatMul", [weights, v])


def _resize(ctx: TorchContext, mode: str, coordinates: str) -> Result:
    """torch's upsample: ``output_size`` gives sizes; ``scale_factors`` the scales it maps
    coordinates by (``1 / scale``, not ``in / out``, as torch does when it is given)."""
    x = ctx.value("input")
    assert ctx.out_type is not None
    factors = ctx.args.get("scale_factors")
    if ctx.args.get("output_size") is None and factors:
        scales = (1.0, 1.0, *(float(f) for f in _pairs(factors, x.type.rank - 2)))
        return ctx.emit(
            "Resize",
            [x],
            mode=mode,
            scales=scales,
            sizes=ctx.out_type.shape,
            coordinate_transformation_mode=coordinates,
            nearest_mode="floor",
        )
    return ctx.emit(
        "Resize",
        [x],
        mode=mode,
        sizes=ctx.out_type.shape,
        coordinate_transformation_mode=coordinates,
        nearest_mode="floor",
    )


@_aten("aten.upsample_nearest2d.vec", "aten.upsample_nearest1d.vec")
def _upsample_nearest(ctx: TorchContext) -> Result:
    """torch's nearest: ``floor(out_index * in / out)``, ONNX's asymmetric + floor."""
    return _resize(ctx, "nearest", "asymmetric")


@_aten("aten.upsample_bilinear2d.vec", "aten.upsample_linear1d.vec")
def _upsample_linear(ctx: TorchContext) -> Result:
    corners = bool(ctx.args.get("align_corners"))
    return _resize(ctx, "linear", "align_corners" if corners else "half_pixel")


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


def _slices(ctx: TorchContext, sizes: Sequence[int]) -> Result:
    """One Slice per piece of ``self`` along ``dim``: split's, chunk's outputs."""
    x = ctx.value("self")
    dim = int(ctx.args.get("dim", 0)) % x.type.rank
    if sum(sizes) != x.type.shape[dim]:
        raise ctx.unsupported(f"sizes {list(sizes)} do not add up to {x.type.shape[dim]}")
    pieces: list[Value | None] = []
    start = 0
    for size in sizes:
        pieces.append(
            ctx.emit("Slice", [x], starts=(start,), ends=(start + size,), axes=(dim,), steps=(1,))
        )
        start += size
    return pieces


@_aten("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default")
def _split(ctx: TorchContext) -> Result:
    x = ctx.value("self")
    length = x.type.shape[int(ctx.args.get("dim", 0)) % x.type.rank]
    if ctx.target == "aten.split_with_sizes.default":
        return _slices(ctx, [int(s) for s in ctx.args["split_sizes"]])
    if ctx.target == "aten.chunk.default":
        step = -(-length // int(ctx.args["chunks"]))  # torch's chunk: ceil-sized pieces
    else:
        step = int(ctx.args["split_size"])
    if step <= 0:
        raise ctx.unsupported(f"pieces of size {step}")
    return _slices(ctx, [min(step, length - s) for s in range(0, length, step)] or [0])


@_aten("aten.unbind.int")
def _unbind(ctx: TorchContext) -> Result:
    x = ctx.value("self")
    dim = int(ctx.args.get("dim", 0)) % x.type.rank
    pieces: list[Value | None] = []
    for i in range(x.type.shape[dim]):
        index = ctx.graph.add_constant(np.array(i, np.int64), "index")
        pieces.append(ctx.emit("Gather", [x, index], axis=dim))
    return pieces


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


@_aten("aten._to_copy.default", "aten.to.dtype", "aten.type_as.default")
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


__all__ = ["ATEN_CONVERTERS", "Result", "TorchContext", "TorchConverter", "supported_aten_ops"]
