"""The numpy semantics of every IR op, in one table, and the interpreter that runs them.

This is the oracle of the project: every backend must agree with it (bit
for bit on integer graphs) and every test compares against it. Each entry of
:data:`EVAL` takes the node (for its attributes and output types) and the
input arrays, and returns the output arrays. Float ops compute in the
tensor's own dtype (float32 for ONNX models), as ONNX Runtime does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import scipy.special
from numpy.lib.stride_tricks import sliding_window_view

from intq import limits
from intq.errors import IntqError, NumericsError, ShapeError
from intq.ir.graph import Graph, Node
from intq.ir.types import QuantParams
from intq.ops import Trait, ops_with
from intq.semantics import kernels
from intq.semantics.feeds import check_feeds
from intq.semantics.numerics import clip_bounds, requantize, shift_round
from intq.tables import RuleTable

Array = np.ndarray
Kernel = Callable[..., list[Array]]

EVAL: RuleTable[Kernel] = RuleTable()
"""Op name -> ``kernel(node, *inputs) -> outputs``."""
_kernel = EVAL.register


def _out_dtype(node: Node, index: int = 0) -> np.dtype:
    return node.outputs[index].type.dtype.numpy


# ----- elementwise ----------------------------------------------------------------


@_kernel("Add", "Sub", "Mul", "Div")
def _arith(node: Node, a: Array, b: Array) -> list[Array]:
    if node.op == "Div" and a.dtype.kind in "iu":
        if np.any(b == 0):
            raise IntqError("integer division by zero", node=node.label())
        # ONNX integer division truncates toward zero; numpy's // floors.
        q = np.abs(a.astype(np.int64)) // np.abs(b.astype(np.int64))
        return [(np.sign(a) * np.sign(b) * q).astype(a.dtype)]
    fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[node.op]
    return [fn(a, b).astype(a.dtype, copy=False)]


@_kernel("Pow")
def _pow(node: Node, a: Array, b: Array) -> list[Array]:
    return [np.power(a, b.astype(a.dtype)).astype(a.dtype, copy=False)]


@_kernel("Equal", "Less", "Greater", "And", "Or")
def _compare(node: Node, a: Array, b: Array) -> list[Array]:
    fn = {
        "Equal": np.equal,
        "Less": np.less,
        "Greater": np.greater,
        "And": np.logical_and,
        "Or": np.logical_or,
    }[node.op]
    return [fn(a, b)]


@_kernel("CumSum")
def _cumsum(node: Node, x: Array) -> list[Array]:
    axis = node.attrs["axis"]
    data = np.flip(x, axis) if node.attrs["reverse"] else x
    total = np.cumsum(data, axis=axis, dtype=x.dtype)
    if node.attrs["exclusive"]:
        total = total - data
    return [np.flip(total, axis) if node.attrs["reverse"] else total]


@_kernel("Not")
def _not(node: Node, x: Array) -> list[Array]:
    return [np.logical_not(x)]


@_kernel("IsNaN")
def _isnan(node: Node, x: Array) -> list[Array]:
    return [np.isnan(x)]


@_kernel("Where")
def _where(node: Node, cond: Array, x: Array, y: Array) -> list[Array]:
    return [np.where(cond, x, y)]


_UNARY: dict[str, Callable[[Array], Array]] = {
    "Sigmoid": scipy.special.expit,
    "Tanh": np.tanh,
    "Erf": scipy.special.erf,
    "Sqrt": np.sqrt,
    "Exp": np.exp,
    "Neg": np.negative,
    "Abs": np.abs,
    "Relu": lambda x: np.maximum(x, np.zeros((), x.dtype)),
    "Identity": lambda x: x,
}


@_kernel(*_UNARY)
def _unary(node: Node, x: Array) -> list[Array]:
    return [np.asarray(_UNARY[node.op](x)).astype(x.dtype, copy=False)]


@_kernel("HardSigmoid", "HardSwish")
def _hard(node: Node, x: Array) -> list[Array]:
    t = x.dtype.type
    alpha, beta = (
        (t(node.attrs["alpha"]), t(node.attrs["beta"]))
        if node.op == "HardSigmoid"
        else (t(1 / 6), t(0.5))
    )
    gate = np.clip(alpha * x + beta, t(0), t(1))
    return [(gate if node.op == "HardSigmoid" else x * gate).astype(x.dtype, copy=False)]


@_kernel("Gelu")
def _gelu(node: Node, x: Array) -> list[Array]:
    if node.attrs["approximate"] == "tanh":
        inner = np.sqrt(2 / np.pi).astype(x.dtype) * (x + x.dtype.type(0.044715) * x**3)
        y = x.dtype.type(0.5) * x * (1 + np.tanh(inner))
    else:
        y = x.dtype.type(0.5) * x * (1 + scipy.special.erf(x / np.sqrt(x.dtype.type(2))))
    return [y.astype(x.dtype, copy=False)]


@_kernel("Clip")
def _clip(node: Node, x: Array) -> list[Array]:
    low, high = node.attrs["min"], node.attrs["max"]
    if x.dtype.kind in "iu":
        lo, hi = clip_bounds(low, high, x.dtype)
        return [np.clip(x, x.dtype.type(lo), x.dtype.type(hi))]
    # min > max: every value becomes max (ONNX), which np.clip gives too.
    return [np.clip(x, x.dtype.type(low), x.dtype.type(high))]


@_kernel("Cast")
def _cast(node: Node, x: Array) -> list[Array]:
    return [x.astype(_out_dtype(node))]


# ----- linear algebra --------------------------------------------------------------


def _windows(
    x: Array,
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    out_shape: Sequence[int],
) -> Array:
    """A strided view ``(N, C, *out_shape, *kernel)`` of the (already padded) input."""
    spatial = len(kernel)
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    view = sliding_window_view(x, span, axis=tuple(range(2, 2 + spatial)))
    positions = [slice(0, (o - 1) * s + 1, s) for o, s in zip(out_shape, strides)]
    taps = [slice(None, None, d) for d in dilations]
    index = (slice(None), slice(None), *positions, *taps)
    return view[index]


def _pad_spatial(
    x: Array, pads: Sequence[int], fill: float | int, extra: Sequence[int] = ()
) -> Array:
    spatial = x.ndim - 2
    extra = tuple(extra) or (0,) * spatial
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + spatial] + extra[i]) for i in range(spatial)]
    if not any(a or b for a, b in width):
        return x
    return np.pad(x, width, constant_values=fill)


@_kernel("Conv")
def _conv(node: Node, x: Array, w: Array, b: Array | None = None) -> list[Array]:
    return [_convolve(node, x, w, b).astype(_out_dtype(node), copy=False)]


def _convolve(node: Node, x: Array, w: Array, b: Array | None) -> Array:
    """Convolution in the inputs' float type, or exactly (in float64) for integer inputs."""
    attrs = node.attrs
    out_shape = node.outputs[0].type.shape
    spatial = x.ndim - 2
    group = attrs["group"]
    n, c = x.shape[:2]
    m = w.shape[0]
    kernel = w.shape[2:]
    positions = math.prod(out_shape[2:])
    taps = math.prod(kernel)
    exact = x.dtype.kind in "iu"
    acc_dtype = _exact_product_dtype(x.dtype, w, (c // group) * taps) if exact else x.dtype
    pointwise = all(k == 1 for k in kernel) and not any(attrs["pads"])
    if exact and group == 1 and pointwise and all(s == 1 for s in attrs["strides"]):
        # A 1x1 convolution is one product of the weights and the input as it lies: no
        # window copy, no transposes (half of an integer EfficientNet's convolution time).
        flat = x.reshape(n, c, positions).astype(acc_dtype, copy=False)
        matrix = w.reshape(m, c).astype(acc_dtype)
        # One plain GEMM per sample: OpenBLAS runs a broadcast (stacked) matmul slower.
        y = np.stack([matrix @ flat[i] for i in range(n)]).reshape(out_shape)
        return _add_bias(y.astype(_ACC_EXACT, copy=False), b, m, spatial)
    patches = _windows(
        _pad_spatial(x, attrs["pads"], 0),
        kernel,
        attrs["strides"],
        attrs["dilations"],
        out_shape[2:],
    )
    if exact and c == group:
        y = _depthwise(patches, w, out_shape, acc_dtype)
        return _add_bias(y.astype(_ACC_EXACT, copy=False), b, m, spatial)
    # (N, G, C/G, O..., K...) -> (N, G, O, C/G * K): one matmul per group.
    patches = patches.reshape(n, group, c // group, positions, taps)
    patches = patches.transpose(0, 1, 3, 2, 4).reshape(n, group, positions, (c // group) * taps)
    weights = w.reshape(group, m // group, (c // group) * taps).transpose(0, 2, 1)
    y = np.matmul(patches.astype(acc_dtype, copy=False), weights.astype(acc_dtype, copy=False))
    y = y.transpose(0, 1, 3, 2).reshape(out_shape)
    if exact:
        y = y.astype(_ACC_EXACT, copy=False)
    return _add_bias(y, b, m, spatial)


def _add_bias(y: Array, b: Array | None, m: int, spatial: int) -> Array:
    if b is None:
        return y
    return y + b.reshape((1, m) + (1,) * spatial).astype(y.dtype, copy=False)


def _exact_product_dtype(x_dtype: np.dtype, w: Array, terms: int) -> np.dtype:
    """The float type in which sums of ``terms`` products of integers of ``x_dtype`` by
    ``w``'s are exact: float32 when every partial sum stays below 2^24 (its integers are all
    exact; 4-bit weights by 8-bit activations over any real layer), float64 otherwise (below
    2^53, as the int32 accumulator's range is). BLAS sums in any order: exact either way."""
    info = np.iinfo(x_dtype)
    top = max(abs(int(info.min)), int(info.max)) * float(np.abs(w).max(initial=0)) * terms
    return np.dtype(np.float32 if top < 2**24 else _ACC_EXACT)


def _depthwise(patches: Array, w: Array, out_shape: Sequence[int], acc_dtype: np.dtype) -> Array:
    """A depthwise (one input channel per group) integer convolution, exactly in
    ``acc_dtype``: one multiply-add of the whole output per kernel tap. The grouped matmul
    would run one tiny matrix product per channel after copying every window (im2col), most
    of an integer EfficientNet's run; exact integer sums are the same in any order."""
    m, spatial = w.shape[0], w.ndim - 2
    per = m // patches.shape[1]  # a channel multiplier: output o reads input channel o // per
    weights = w.astype(acc_dtype).reshape(m, -1)
    y = np.zeros(out_shape, acc_dtype)
    channel = (1, m) + (1,) * spatial
    for k, tap in enumerate(np.ndindex(*w.shape[2:])):
        window = patches[(Ellipsis, *tap)].astype(acc_dtype)
        if per > 1:
            window = np.repeat(window, per, axis=1)
        y += window * weights[:, k].reshape(channel)
    return y


@_kernel("Gemm")
def _gemm(node: Node, a: Array, b: Array, c: Array | None = None) -> list[Array]:
    attrs = node.attrs
    a = a.T if attrs["transA"] else a
    b = b.T if attrs["transB"] else b
    y = a @ b
    if attrs["alpha"] != 1.0:
        y = y * a.dtype.type(attrs["alpha"])
    if c is not None:
        y = y + (c if attrs["beta"] == 1.0 else c * c.dtype.type(attrs["beta"]))
    return [y.astype(_out_dtype(node), copy=False)]


@_kernel("MatMul")
def _matmul(node: Node, a: Array, b: Array) -> list[Array]:
    return [np.matmul(a, b).astype(_out_dtype(node), copy=False)]


@_kernel("BatchNormalization")
def _batchnorm(
    node: Node, x: Array, scale: Array, bias: Array, mean: Array, var: Array
) -> list[Array]:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    eps = x.dtype.type(node.attrs["epsilon"])
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return [(y * scale.reshape(shape) + bias.reshape(shape)).astype(x.dtype, copy=False)]


@_kernel("LayerNormalization")
def _layernorm(node: Node, x: Array, scale: Array, bias: Array | None = None) -> list[Array]:
    axes = tuple(range(node.attrs["axis"], x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=axes, keepdims=True)
    y = centered / np.sqrt(var + x.dtype.type(node.attrs["epsilon"])) * scale
    if bias is not None:
        y = y + bias
    return [y.astype(x.dtype, copy=False)]


@_kernel("Softmax")
def _softmax(node: Node, x: Array) -> list[Array]:
    axis = node.attrs["axis"]
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return [(e / e.sum(axis=axis, keepdims=True)).astype(x.dtype, copy=False)]


# ----- integer ops -----------------------------------------------------------------------

# Integer products and sums are computed in float64 with BLAS: exact while every partial sum
# stays below 2^53, which holds with a wide margin for 16-bit operands and any K < 2^21, and
# far faster than numpy's int64 matmul. Results are checked against int32 before use.
_ACC_EXACT = np.float64
_EXACT_LIMIT = 2.0**53


def _int32(node: Node, acc: Array) -> Array:
    """``acc`` as int32, or a NumericsError naming the node when it does not fit."""
    if acc.size:
        low, high = float(acc.min()), float(acc.max())
        if max(abs(low), abs(high)) >= _EXACT_LIMIT or low < -(2**31) or high > 2**31 - 1:
            raise NumericsError(
                f"int32 accumulator overflow: values reach [{low:.0f}, {high:.0f}]",
                node=node.label(),
                hint="the range analysis should have refused this layer; please report it",
            )
    return acc.astype(np.int64).astype(np.int32)


def _quant_of(node: Node, index: int = 0) -> QuantParams:
    value = node.inputs[index]
    assert value is not None and value.type.quant is not None
    return value.type.quant


def _per_channel(values: Sequence[int | float], axis: int, ndim: int, dtype: type) -> Array:
    """``values`` shaped to broadcast along ``axis`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    if len(values) > 1:
        shape[axis] = len(values)
    return np.asarray(values, dtype=dtype).reshape(shape)


@_kernel("Quantize")
def _quantize(node: Node, x: Array) -> list[Array]:
    q = node.outputs[0].type.quant
    assert q is not None
    # As ONNX QuantizeLinear: divide in float32, round half to even, saturate (so +-Inf and
    # anything the division sends past float32's range saturate too). NaN has no order, so
    # it is given the code 0 explicitly: a cast of NaN to an integer is undefined in C, and
    # each backend's clamp would otherwise pick a different end of the range.
    with np.errstate(over="ignore", invalid="ignore"):  # float64 1e300 is float32 Inf
        scaled = np.rint(x.astype(np.float32) / np.float32(node.attrs["scale"]))
    clamped = np.clip(np.where(np.isnan(scaled), np.float32(0), scaled), q.qmin, q.qmax)
    return [clamped.astype(_out_dtype(node))]


@_kernel("Dequantize")
def _dequantize(node: Node, x: Array) -> list[Array]:
    q = _quant_of(node)
    scale = _per_channel(q.scale, q.axis or 0, x.ndim, np.float32)
    return [x.astype(np.float32) * scale]


@_kernel("QConv")
def _qconv(node: Node, x: Array, w: Array, b: Array | None = None) -> list[Array]:
    return [_int32(node, _convolve(node, x, w, b))]


@_kernel("QGemm")
def _qgemm(node: Node, a: Array, b: Array, c: Array | None = None) -> list[Array]:
    b = b.T if node.attrs["transB"] else b
    y = a.astype(_ACC_EXACT) @ b.astype(_ACC_EXACT)
    if c is not None:
        y = y + c.astype(_ACC_EXACT)
    return [_int32(node, y)]


@_kernel("QMatMul", "QBatchMatMul")
def _qmatmul(node: Node, a: Array, b: Array, c: Array | None = None) -> list[Array]:
    y = a.astype(_ACC_EXACT) @ b.astype(_ACC_EXACT)
    if c is not None:
        y = y + c.astype(_ACC_EXACT)
    return [_int32(node, y)]


@_kernel("QGlobalAveragePool")
def _qglobal_avgpool(node: Node, x: Array) -> list[Array]:
    return [_int32(node, x.astype(np.int64).sum(axis=tuple(range(2, x.ndim)), keepdims=True))]


@_kernel("QReduceSum")
def _qreduce_sum(node: Node, x: Array) -> list[Array]:
    axes = tuple(node.attrs["axes"])
    total = x.astype(np.int64).sum(axis=axes, keepdims=bool(node.attrs["keepdims"]))
    return [_int32(node, np.asarray(total))]


@_kernel("QAveragePool")
def _qavgpool(node: Node, x: Array) -> list[Array]:
    kernel = node.attrs["kernel_shape"]
    out = node.outputs[0].type.shape[2:]
    win = _windows(x.astype(np.int64), kernel, node.attrs["strides"], (1,) * len(kernel), out)
    return [_int32(node, win.sum(axis=tuple(range(-len(kernel), 0))))]


@_kernel("Requantize")
def _requantize(node: Node, x: Array) -> list[Array]:
    attrs = node.attrs
    axis = attrs["axis"]
    multiplier = _per_channel(attrs["multiplier"], axis, x.ndim, np.int64)
    shift = _per_channel(attrs["shift"], axis, x.ndim, np.int64)
    y = requantize(x, multiplier, shift, attrs["lo"], attrs["hi"])
    return [y.astype(_out_dtype(node))]


@_kernel("QAdd")
def _qadd(node: Node, a: Array, b: Array) -> list[Array]:
    attrs = node.attrs
    total = a.astype(np.int64) * attrs["multiplier_a"] + b.astype(np.int64) * attrs["multiplier_b"]
    y = np.clip(shift_round(total, attrs["shift"]), attrs["lo"], attrs["hi"])
    return [y.astype(_out_dtype(node))]


@_kernel("QLookup")
def _qlookup(node: Node, x: Array) -> list[Array]:
    table = np.asarray(node.attrs["table"], np.int64)
    ops = kernels.NumpyOps(node.label())
    y = kernels.lookup(ops, x.astype(np.int64), table, kernels.lookup_offset(x.dtype))
    return [y.astype(_out_dtype(node))]


@_kernel("QReduceL2")
def _qreduce_l2(node: Node, x: Array) -> list[Array]:
    attrs = node.attrs
    ops = kernels.NumpyOps(node.label())
    y = kernels.l2_norm(
        ops,
        x.astype(np.int64),
        attrs["axes"],
        attrs["multiplier"],
        attrs["shift"],
        attrs["lo"],
        attrs["hi"],
    )
    return [y.astype(_out_dtype(node))]


def _requantized_pair(kernel: Callable[..., Array]) -> Callable[[Node, Array, Array], list[Array]]:
    """The numpy rule of an op whose kernel takes two integer operands and the requantization
    attributes (``QMul``: :func:`kernels.multiply`, ``QDiv``: :func:`kernels.divide`)."""

    def run(node: Node, a: Array, b: Array) -> list[Array]:
        attrs = node.attrs
        y = kernel(
            kernels.NumpyOps(node.label()),
            a.astype(np.int64),
            b.astype(np.int64),
            *(attrs[k] for k in ("multiplier", "shift", "lo", "hi")),
        )
        return [y.astype(_out_dtype(node))]

    return run


_kernel("QDiv")(_requantized_pair(kernels.divide))
_kernel("QMul")(_requantized_pair(kernels.multiply))


@_kernel("QMask")
def _qmask(node: Node, x: Array, keep: Array) -> list[Array]:
    ops = kernels.NumpyOps(node.label())
    y = kernels.mask(ops, x.astype(np.int64), keep.astype(np.int64))
    return [y.astype(_out_dtype(node))]


@_kernel("QDivCount")
def _qdiv_count(node: Node, acc: Array, count: Array) -> list[Array]:
    attrs = node.attrs
    length = len(attrs["multiplier"]) - 1
    if count.size and (count.min() < 0 or count.max() > length):
        raise NumericsError(
            f"a count in [{count.min()}, {count.max()}] is outside the table's 0..{length}",
            node=node.label(),
        )
    ops = kernels.NumpyOps(node.label())
    y = kernels.divide_by_count(
        ops,
        acc.astype(np.int64),
        count.astype(np.int64),
        attrs["multiplier"],
        attrs["shift"],
        attrs["lo"],
        attrs["hi"],
    )
    return [y.astype(_out_dtype(node))]


@_kernel("QPRelu")
def _qprelu(node: Node, x: Array) -> list[Array]:
    a = node.attrs
    ops = kernels.NumpyOps(node.label())
    y = kernels.prelu(
        ops,
        x.astype(np.int64),
        a["multiplier_pos"],
        a["multiplier_neg"],
        a["axis"],
        x.ndim,
        a["shift"],
        a["lo"],
        a["hi"],
    )
    return [y.astype(_out_dtype(node))]


# ----- transformer kernels (written once in intq.kernels) -------------------------------


@_kernel(*ops_with(Trait.KERNEL))
def _transformer_kernel(node: Node, x: Array, keep: Array | None = None) -> list[Array]:
    ops = kernels.NumpyOps(node.label())
    mask = None if keep is None else keep.astype(np.int64)
    return [kernels.run_node(ops, node, x.astype(np.int64), mask).astype(_out_dtype(node))]


# ----- pooling ----------------------------------------------------------------------


def _ceil_extra(node: Node, x: Array) -> tuple[int, ...]:
    """End padding beyond ``pads`` that ceil_mode windows reach into."""
    return _ceil_extra_of(node, x.shape[2:])


def _ceil_extra_of(node: Node, sizes: Sequence[int]) -> tuple[int, ...]:
    attrs = node.attrs
    spatial = len(sizes)
    dilations = attrs.get("dilations") or (1,) * spatial
    out = node.outputs[0].type.shape[2:]
    extra = []
    for i in range(spatial):
        span = dilations[i] * (attrs["kernel_shape"][i] - 1) + 1
        padded = sizes[i] + attrs["pads"][i] + attrs["pads"][i + spatial]
        extra.append(max(0, (out[i] - 1) * attrs["strides"][i] + span - padded))
    return tuple(extra)


@_kernel("MaxPool")
def _maxpool(node: Node, x: Array) -> list[Array]:
    attrs = node.attrs
    # The type's lowest finite value, as ONNX Runtime: a window lying wholly in the padding
    # (possible with dilations) gives -FLT_MAX, not -inf.
    fill = np.finfo(x.dtype).min if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    padded = _pad_spatial(x, attrs["pads"], fill, _ceil_extra(node, x))
    win = _windows(
        padded,
        attrs["kernel_shape"],
        attrs["strides"],
        attrs["dilations"],
        node.outputs[0].type.shape[2:],
    )
    axes = tuple(range(-len(attrs["kernel_shape"]), 0))
    return [win.max(axis=axes)]


@_kernel("AveragePool")
def _avgpool(node: Node, x: Array) -> list[Array]:
    attrs = node.attrs
    kernel, strides = attrs["kernel_shape"], attrs["strides"]
    out = node.outputs[0].type.shape[2:]
    extra = _ceil_extra(node, x)
    ones = (1,) * len(kernel)
    axes = tuple(range(-len(kernel), 0))
    total = _windows(_pad_spatial(x, attrs["pads"], 0, extra), kernel, strides, ones, out)
    total = total.sum(axis=axes, dtype=np.float64)
    return [(total / average_pool_counts(node)).astype(x.dtype)]


def average_pool_counts(node: Node) -> np.ndarray:
    """The divisor of each output position of ``AveragePool`` ``node``, ``(1, 1, *out)``
    int64: the real elements its window covers, plus the declared padding with
    ``count_include_pad``; the extra end padding that ceil_mode adds never counts. Known at
    compile time: the float semantics and the integer lowering (a count per position) share
    it."""
    attrs = node.attrs
    source = node.inputs[0]
    assert source is not None
    kernel, strides = attrs["kernel_shape"], attrs["strides"]
    out = node.outputs[0].type.shape[2:]
    inside = np.ones((1, 1, *source.type.shape[2:]), np.int64)
    counted = _pad_spatial(inside, attrs["pads"], 1 if attrs["count_include_pad"] else 0)
    counted = _pad_spatial(counted, (0,) * (2 * len(kernel)), 0, average_pool_extra(node))
    ones = (1,) * len(kernel)
    return _windows(counted, kernel, strides, ones, out).sum(axis=tuple(range(-len(kernel), 0)))


def average_pool_extra(node: Node) -> tuple[int, ...]:
    """The end padding beyond ``pads`` that the ceil_mode windows of pool ``node`` reach."""
    source = node.inputs[0]
    assert source is not None
    return _ceil_extra_of(node, source.type.shape[2:])


@_kernel("GlobalAveragePool")
def _global_avgpool(node: Node, x: Array) -> list[Array]:
    axes = tuple(range(2, x.ndim))
    return [x.mean(axis=axes, keepdims=True, dtype=np.float64).astype(x.dtype)]


# ----- reductions -------------------------------------------------------------------


@_kernel("ReduceMean", "ReduceSum", "ReduceMax")
def _reduce(node: Node, x: Array) -> list[Array]:
    reducers: dict[str, Callable[..., Array]] = {
        "ReduceMean": np.mean,
        "ReduceSum": np.sum,
        "ReduceMax": np.max,
    }
    fn = reducers[node.op]
    axes = tuple(node.attrs["axes"])
    y = fn(x, axis=axes, keepdims=bool(node.attrs["keepdims"]))
    return [np.asarray(y).astype(x.dtype, copy=False)]


# ----- data movement ------------------------------------------------------------------


@_kernel("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(node: Node, x: Array) -> list[Array]:
    return [x.reshape(node.outputs[0].type.shape)]


@_kernel("Transpose")
def _transpose(node: Node, x: Array) -> list[Array]:
    return [np.transpose(x, node.attrs["perm"])]


@_kernel("Concat")
def _concat(node: Node, *xs: Array) -> list[Array]:
    return [np.concatenate(xs, axis=node.attrs["axis"])]


@_kernel("Slice")
def _slice(node: Node, x: Array) -> list[Array]:
    index = [slice(None)] * x.ndim
    attrs = node.attrs
    for start, end, axis, step in zip(
        attrs["starts"], attrs["ends"], attrs["axes"], attrs["steps"]
    ):
        # A canonical end of -dim - 1 with a negative step means "through index 0".
        index[axis] = slice(start, None if end < 0 else end, step)
    return [x[tuple(index)]]


def _check_indices(node: Node, indices: Array, size: int) -> None:
    """Every index of a gather along ``node``'s axis (of ``size``) lies in ``[-size, size)``."""
    if indices.size and (indices.min() < -size or indices.max() >= size):
        bad = indices[(indices < -size) | (indices >= size)].reshape(-1)[0]
        raise ShapeError(
            f"{node.op} index {bad} out of range for axis {node.attrs['axis']} of size {size}",
            node=node.label(),
        )


@_kernel("Gather")
def _gather(node: Node, data: Array, indices: Array) -> list[Array]:
    axis = node.attrs["axis"]
    _check_indices(node, indices, data.shape[axis])
    return [np.take(data, indices.astype(np.int64), axis=axis)]


@_kernel("GatherElements")
def _gather_elements(node: Node, data: Array, indices: Array) -> list[Array]:
    axis = node.attrs["axis"]
    size = data.shape[axis]
    _check_indices(node, indices, size)
    index = np.where(indices < 0, indices + size, indices).astype(np.int64)
    # The data's other axes may be longer than the indices': only their leading part is read.
    view = data[tuple(slice(0, n) if i != axis else slice(None) for i, n in enumerate(index.shape))]
    return [np.take_along_axis(view, index, axis=axis)]


@_kernel("Expand")
def _expand(node: Node, x: Array) -> list[Array]:
    return [np.broadcast_to(x, node.attrs["shape"]).copy()]


@_kernel("Pad")
def _pad(node: Node, x: Array) -> list[Array]:
    pads, rank = node.attrs["pads"], x.ndim
    # Negative pads crop: slice first, then pad by the positive parts.
    crop = tuple(slice(max(0, -pads[i]), x.shape[i] - max(0, -pads[i + rank])) for i in range(rank))
    width = [(max(0, pads[i]), max(0, pads[i + rank])) for i in range(rank)]
    mode = node.attrs["mode"]
    if mode == "constant":
        return [np.pad(x[crop], width, constant_values=x.dtype.type(node.attrs["value"]))]
    return [np.pad(x[crop], width, mode=mode)]


@_kernel("Shape")
def _shape(node: Node, *_: Array) -> list[Array]:
    # Shapes are static: the input's type says it all, so constant folding needs no data.
    shape = node.inputs[0].type.shape  # type: ignore[union-attr]
    return [np.array(shape[node.attrs["start"] : node.attrs["end"]], dtype=np.int64)]


@_kernel("ConstantOfShape")
def _constant_of_shape(node: Node) -> list[Array]:
    return [np.full(node.attrs["shape"], node.attrs["value"], dtype=_out_dtype(node))]


# ----- float ops the ONNX importer added for real models -----------------------------------


@_kernel("Min", "Max")
def _min_max(node: Node, a: Array, b: Array) -> list[Array]:
    return [(np.minimum if node.op == "Min" else np.maximum)(a, b)]


@_kernel("PRelu")
def _prelu(node: Node, x: Array, slope: Array) -> list[Array]:
    return [np.where(x < 0, x * slope, x).astype(x.dtype, copy=False)]


def _softplus_of(x: Array) -> Array:
    # As ONNX Runtime: log1p(exp(-|x|)) + max(x, 0) never overflows.
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


@_kernel("Softplus")
def _softplus(node: Node, x: Array) -> list[Array]:
    return [_softplus_of(x).astype(x.dtype, copy=False)]


@_kernel("Mish")
def _mish(node: Node, x: Array) -> list[Array]:
    return [(x * np.tanh(_softplus_of(x))).astype(x.dtype, copy=False)]


def resize_coordinates(out: int, size: int, scale: float, transform: str) -> np.ndarray:
    """The input coordinate (float32, as ONNX Runtime) of each of ``out`` output positions
    along an axis of ``size`` resized by ``scale``."""
    x = np.arange(out, dtype=np.float32)
    s = np.float32(scale)
    half = np.float32(0.5)
    if transform == "half_pixel":
        return (x + half) / s - half
    if transform == "pytorch_half_pixel":
        return (x + half) / s - half if out > 1 else np.zeros(out, np.float32)
    if transform == "align_corners":
        if out == 1:
            return np.zeros(out, np.float32)
        return x * np.float32(size - 1) / np.float32(out - 1)
    return x / s  # asymmetric


def _nearest_index(coords: np.ndarray, size: int, mode: str) -> np.ndarray:
    if mode == "floor":
        index = np.floor(coords)
    elif mode == "ceil":
        index = np.ceil(coords)
    elif mode == "round_prefer_ceil":
        index = np.floor(coords + np.float32(0.5))
    else:  # round_prefer_floor
        index = np.ceil(coords - np.float32(0.5))
    return np.clip(index, 0, size - 1).astype(np.int64)


def resized_axes(
    attrs: Mapping[str, object], shape: Sequence[int]
) -> list[tuple[int, int, int, float]]:
    """``(axis, size, out, scale)`` of each axis a Resize with ``attrs`` changes, in the order
    it resizes them (an axis of unchanged size and scale 1 is left as it is)."""
    sizes, scales = attrs["sizes"], attrs["scales"]
    assert isinstance(sizes, tuple) and isinstance(scales, tuple)
    return [
        (axis, size, out, scale)
        for axis, (size, out, scale) in enumerate(zip(shape, sizes, scales))
        if not (size == out and scale == 1.0)
    ]


def resize_nearest_index(
    size: int, out: int, scale: float, transform: str, nearest_mode: str
) -> np.ndarray:
    """The input index (int64) each of ``out`` output positions of a nearest Resize reads
    along an axis of ``size``: the float semantics and the integer lowering (a ``Gather``
    per axis) share it."""
    return _nearest_index(resize_coordinates(out, size, scale, transform), size, nearest_mode)


def _linear_positions(
    size: int, out: int, scale: float, transform: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two input positions (int64) each of ``out`` output positions of a linear Resize
    reads along an axis of ``size``, and the weight of the second (float32; ``1 - frac`` is
    the first's). At the clamped ends both positions are one and both weights ``1/2``."""
    coords = np.clip(resize_coordinates(out, size, scale, transform), 0, size - 1)
    low = np.minimum(coords.astype(np.int64), size - 1)
    high = np.minimum(low + 1, size - 1)
    frac = np.where(low == high, np.float32(0.5), coords - low.astype(np.float32))
    return low, high, frac.astype(np.float32)


def resize_linear_taps(
    size: int, out: int, scale: float, transform: str, frac_bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(low, high, weight)`` (int64) of one axis of a linear Resize in ``frac_bits``-bit
    fixed point: the float semantics' positions, and its weight of ``high`` rounded to the
    nearest multiple of ``2^-F`` (``weight / 2^F`` within ``2^-(F+1)`` of it; the weight of
    ``low`` is ``2^F - weight``, so each pair sums to ``2^F`` exactly). The integer
    lowering computes them once and every backend reads the same integers."""
    low, high, frac = _linear_positions(size, out, scale, transform)
    weight = np.rint(frac.astype(np.float64) * 2.0**frac_bits).astype(np.int64)
    return low, high, weight


@_kernel("QResize")
def _qresize(node: Node, x: Array) -> list[Array]:
    ops = kernels.NumpyOps(node.label())
    taps = kernels.resize_taps(node.attrs)
    y = kernels.resize_linear(ops, x.astype(np.int64), taps, x.ndim, node.attrs["frac_bits"])
    return [_int32(node, y)]


@_kernel("Resize")
def _resize(node: Node, x: Array) -> list[Array]:
    attrs = node.attrs
    y = x
    transform = attrs["coordinate_transformation_mode"]
    for axis, size, out, scale in resized_axes(attrs, x.shape):
        if attrs["mode"] == "nearest":
            index = resize_nearest_index(size, out, scale, transform, attrs["nearest_mode"])
            y = np.take(y, index, axis=axis)
            continue
        low, high, frac = _linear_positions(size, out, scale, transform)
        shape = [1] * x.ndim
        shape[axis] = out
        w_high = frac.reshape(shape).astype(x.dtype)
        w_low = np.where(low == high, np.float32(0.5), 1 - frac).reshape(shape).astype(x.dtype)
        y = np.take(y, low, axis=axis) * w_low + np.take(y, high, axis=axis) * w_high
    return [np.ascontiguousarray(y).astype(x.dtype, copy=False)]


@_kernel("ConvTranspose")
def _conv_transpose(node: Node, x: Array, w: Array, b: Array | None = None) -> list[Array]:
    return [_transposed(node, x, w, b).astype(_out_dtype(node), copy=False)]


@_kernel("QConvTranspose")
def _qconv_transpose(node: Node, x: Array, w: Array, b: Array | None = None) -> list[Array]:
    return [_int32(node, _transposed(node, x, w, b))]


def _transposed(node: Node, x: Array, w: Array, b: Array | None) -> Array:
    """Transposed convolution in the inputs' float type, or exactly in float64 for integer
    inputs."""
    attrs = node.attrs
    group = attrs["group"]
    strides, dilations, pads = attrs["strides"], attrs["dilations"], attrs["pads"]
    spatial = x.ndim - 2
    n, c = x.shape[:2]
    kernel = w.shape[2:]
    m_per = w.shape[1]
    full = [
        (x.shape[2 + i] - 1) * strides[i]
        + dilations[i] * (kernel[i] - 1)
        + 1
        + attrs["output_padding"][i]
        for i in range(spatial)
    ]
    acc = x.dtype if x.dtype.kind == "f" else _ACC_EXACT
    y = np.zeros((n, group, m_per, *full), acc)
    xg = x.reshape(n, group, c // group, *x.shape[2:]).astype(acc, copy=False)
    wg = w.reshape(group, c // group, m_per, *kernel).astype(acc, copy=False)
    for tap in np.ndindex(*kernel):
        # Every input position i adds x[i] * w[tap] at output i * stride + tap * dilation.
        part = np.einsum(
            "ngc...,gcm->ngm...", xg, wg[(slice(None), slice(None), slice(None), *tap)]
        )
        index = tuple(
            slice(t * d, t * d + (size - 1) * s + 1, s)
            for t, d, s, size in zip(tap, dilations, strides, x.shape[2:])
        )
        y[(slice(None), slice(None), slice(None), *index)] += part
    y = y.reshape(n, group * m_per, *full)
    crop = tuple(slice(pads[i], full[i] - pads[i + spatial]) for i in range(spatial))
    y = y[(slice(None), slice(None), *crop)]
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * spatial).astype(acc, copy=False)
    return np.ascontiguousarray(y)


# ----- the interpreter ------------------------------------------------------------------

NodeHook = Callable[[Node, Sequence[Array]], None]


def evaluate(node: Node, inputs: Sequence[Array | None]) -> list[Array]:
    """Run one node on numpy inputs; checks the results against the declared types."""
    kernel = EVAL.get(node.op)
    if kernel is None:
        raise IntqError(f"the reference interpreter has no kernel for {node.op}", node=node.label())
    # Trailing omitted optional inputs are dropped; inner ones stay as None.
    args = list(inputs)
    while args and args[-1] is None:
        args.pop()
    with np.errstate(all="ignore"):
        outputs = kernel(node, *args)
    for value, array in zip(node.outputs, outputs):
        want = value.type
        if array.shape != want.shape or array.dtype != want.dtype.numpy:
            raise IntqError(
                f"{node.op} computed {array.dtype}{list(array.shape)} where its type says {want}"
                " (a bug in intq: please report it with this model)",
                node=node.label(),
            )
    return outputs


def run_graph(
    graph: Graph,
    feeds: Mapping[str, Array],
    *,
    on_node: NodeHook | None = None,
) -> dict[str, Array]:
    """Run ``graph`` on ``feeds`` (input name -> array); returns output name -> array.

    ``on_node(node, outputs)`` is called after each node (calibration uses it).
    Intermediate arrays are freed after their last reader, so memory stays at
    the graph's live set, not its total.
    """
    for node in graph.nodes:  # before anything is allocated; a verified graph's types are
        for value in node.outputs:  # what each node computes (intq.compile verifies)
            limits.check_size(
                value.type.shape,
                value.type.dtype.numpy.itemsize,
                f"the output %{value.name} of {node.op}",
                node=node.label(),
            )
    env: dict[str, Array] = dict(check_feeds(graph.inputs, feeds))
    for value in graph.constants:
        assert value.const is not None
        env[value.name] = value.const
    keep = {v.name for v in graph.outputs}
    remaining = {name: 0 for name in env}
    for node in graph.nodes:
        for operand in node.inputs:
            if operand is not None:
                remaining[operand.name] = remaining.get(operand.name, 0) + 1
    for node in graph.nodes:
        inputs = [None if v is None else env[v.name] for v in node.inputs]
        outputs = evaluate(node, inputs)
        for value, array in zip(node.outputs, outputs):
            env[value.name] = array
        if on_node is not None:
            on_node(node, outputs)
        for operand in node.inputs:
            if operand is None:
                continue
            remaining[operand.name] -= 1
            if remaining[operand.name] == 0 and operand.name not in keep and not operand.is_const:
                del env[operand.name]
    return {v.name: env[v.name] for v in graph.outputs}


__all__ = ["EVAL", "evaluate", "run_graph"]
