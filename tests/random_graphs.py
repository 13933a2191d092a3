"""Random small float models as ONNX, quantized: the differential tests' generator.

Each seed builds one ONNX model, a CNN (random convs with groups, strides, dilations and
padding, Gemm and MatMul heads, residual adds and subtractions, max/average/global pools and
ReduceMean, per-channel LayerScale, ReLU/ReLU6, Concat, tabled functions such as Sigmoid and
HardSwish, products of two activations: SiLU, exported HardSwish, squeeze-excite gates) or
an encoder layer (projections, multi-head attention with Softmax, residual adds,
LayerNorm and GELU, each as the op or decomposed as exporters write it), with random weight
scales; then :func:`random_case` quantizes it with 4..8-bit weights and activations, a random
calibration method, random kernel variants and residual width on random calibration batches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import intq

TABLED = (
    "Sigmoid",
    "Tanh",
    "Erf",
    "Exp",
    "Neg",
    "Abs",
    "HardSigmoid",
    "HardSwish",
    "Softplus",
    "Mish",
)
"""The elementwise functions the integer lowering tables (``QLookup``)."""


@dataclass
class _Builder:
    """Grows a random ONNX graph on NCHW tensors, one op at a time."""

    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    ops: list[str] = field(default_factory=list)

    def name(self, stem: str) -> str:
        return f"{stem}{len(self.nodes)}_{len(self.initializers)}"

    def const(self, array: np.ndarray, stem: str) -> str:
        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"/{out}/{op}", **attrs))
        self.shapes[out] = shape
        self.ops.append(op)
        return out

    def weights(self, shape: tuple[int, ...]) -> np.ndarray:
        scale = 10.0 ** self.rng.uniform(-2, 0.5)
        w = self.rng.standard_normal(shape) * scale
        if self.rng.random() < 0.2:  # a dead output channel: all-zero weights
            w[0] = 0
        return w.astype(np.float32)

    def activation(self, x: str) -> str:
        roll = self.rng.random()
        if roll < 0.4:
            return self.node("Relu", [x], self.shapes[x])
        if roll < 0.6:
            low = self.const(np.array(0, np.float32), "lo")
            high = self.const(np.array(6, np.float32), "hi")
            return self.node("Clip", [x, low, high], self.shapes[x])
        return x

    def conv(self, x: str, cout: int | None = None, same: bool = False) -> str:
        n, cin, h, w = self.shapes[x]
        groups = [g for g in range(1, cin + 1) if cin % g == 0]
        group = int(self.rng.choice(groups)) if cout is None else 1
        if cout is None:
            cout = group * int(self.rng.integers(1, 4))
        if same:
            kernel, stride, dilation, pads = [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]
        else:  # each spatial axis on its own: 1..3 taps, stride 1..2, dilation 1..2
            kernel = [int(k) for k in self.rng.integers(1, 4, 2)]
            stride = [int(s) for s in self.rng.integers(1, 3, 2)]
            dilation = [int(self.rng.integers(1, 3)) if k > 1 else 1 for k in kernel]
            pads = [int(self.rng.integers(0, kernel[i % 2])) for i in range(4)]
        out = []
        for i, size in enumerate((h, w)):
            span = dilation[i] * (kernel[i] - 1) + 1
            out.append((size + pads[i] + pads[i + 2] - span) // stride[i] + 1)
        if min(out) < 1:
            kernel, stride, dilation, pads, out = [1, 1], [1, 1], [1, 1], [0, 0, 0, 0], [h, w]
        inputs = [x, self.const(self.weights((cout, cin // group, *kernel)), "w")]
        if self.rng.random() < 0.8:
            inputs.append(self.const(self.weights((cout,)), "b"))
        return self.node(
            "Conv",
            inputs,
            (n, cout, *out),
            kernel_shape=kernel,
            strides=stride,
            dilations=dilation,
            pads=pads,
            group=group,
        )

    def residual(self, x: str) -> str:
        branch = self.activation(self.conv(x, cout=self.shapes[x][1], same=True))
        branch = self.conv(branch, cout=self.shapes[x][1], same=True)
        first, second = (x, branch) if self.rng.random() < 0.5 else (branch, x)
        return self.node(
            "Sub" if self.rng.random() < 0.2 else "Add", [first, second], self.shapes[x]
        )

    def pool(self, x: str) -> str:
        n, c, h, w = self.shapes[x]
        kernel = int(self.rng.integers(1, min(3, h, w) + 1))
        stride = int(self.rng.integers(1, 3))
        if self.rng.random() < 0.5:  # MaxPool, maybe padded
            pad = int(self.rng.integers(0, kernel // 2 + 1))
            ceil = int(self.rng.random() < 0.3)
            dims = []
            for d in (h, w):
                span = d + 2 * pad - kernel
                size = (-(-span // stride) if ceil else span // stride) + 1
                dims.append(size - 1 if ceil and (size - 1) * stride >= d + pad else size)
            return self.node(
                "MaxPool",
                [x],
                (n, c, *dims),
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad] * 4,
                ceil_mode=ceil,
            )
        oh, ow = ((d - kernel) // stride + 1 for d in (h, w))
        return self.node(
            "AveragePool", [x], (n, c, oh, ow), kernel_shape=[kernel, kernel], strides=[stride] * 2
        )

    def concat(self, x: str) -> str:
        n, c, h, w = self.shapes[x]
        other = self.activation(self.conv(x, cout=int(self.rng.integers(1, 4)), same=True))
        parts = [x, other] if self.rng.random() < 0.5 else [other, x]
        return self.node("Concat", parts, (n, c + self.shapes[other][1], h, w), axis=1)

    def function(self, x: str) -> str:
        """An elementwise function (an integer table), maybe HardSigmoid with PyTorch's
        alpha."""
        op = str(self.rng.choice(TABLED))
        attrs = {"alpha": 1 / 6} if op == "HardSigmoid" and self.rng.random() < 0.5 else {}
        return self.node(op, [x], self.shapes[x], **attrs)

    def product(self, x: str) -> str:
        """SiLU ``x * sigmoid(x)``, an exported HardSwish ``x * hardsigmoid(x)`` or a
        squeeze-excite gate ``x * sigmoid(conv1x1(mean(x)))`` (broadcast over H, W)."""
        n, c = self.shapes[x][:2]
        roll = self.rng.random()
        if roll < 0.6:
            gate = self.node("Sigmoid" if roll < 0.3 else "HardSigmoid", [x], self.shapes[x])
        else:
            axes = self.const(np.array([2, 3]), "axes")
            pooled = self.node("ReduceMean", [x, axes], (n, c, 1, 1), keepdims=1)
            fc = [
                pooled,
                self.const(self.weights((c, c, 1, 1)), "se"),
                self.const(self.weights((c,)), "seb"),
            ]
            squeezed = self.node("Conv", fc, (n, c, 1, 1), kernel_shape=[1, 1])
            gate = self.node("Sigmoid", [squeezed], self.shapes[squeezed])
        first, second = (x, gate) if self.rng.random() < 0.5 else (gate, x)
        return self.node("Mul", [first, second], self.shapes[x])

    def head(self, x: str) -> str:
        n, c, h, w = self.shapes[x]
        roll = self.rng.random()
        if roll < 0.35:
            x = self.node("GlobalAveragePool", [x], (n, c, 1, 1))
            x = self.node("Flatten", [x], (n, c), axis=1)
            features = c
        elif roll < 0.55:  # PyTorch's x.mean((2, 3))
            axes = self.const(np.array([2, 3]), "axes")
            x = self.node("ReduceMean", [x, axes], (n, c), keepdims=0)
            features = c
        else:
            features = c * h * w
            x = self.node("Flatten", [x], (n, features), axis=1)
        for _ in range(int(self.rng.integers(1, 3))):
            out = int(self.rng.integers(1, 9))
            if self.rng.random() < 0.5:
                trans = int(self.rng.random() < 0.7)
                w = self.const(self.weights((out, features) if trans else (features, out)), "fc")
                inputs = [x, w]
                if self.rng.random() < 0.8:
                    inputs.append(self.const(self.weights((out,)), "fcb"))
                x = self.node("Gemm", inputs, (n, out), transB=trans)
            else:
                w = self.const(self.weights((features, out)), "mm")
                x = self.node("MatMul", [x, w], (n, out))
            x = self.activation(x)
            features = out
        return x


def random_model(seed: int) -> tuple[onnx.ModelProto, tuple[int, ...], list[str]]:
    """A random small CNN: its ONNX model, input shape and op list."""
    rng = np.random.default_rng(seed)
    shape = (
        int(rng.integers(1, 3)),
        int(rng.integers(1, 5)),
        int(rng.integers(3, 9)),
        int(rng.integers(3, 9)),
    )
    b = _Builder(rng)
    b.shapes["x"] = shape
    x = "x"
    for _ in range(int(rng.integers(1, 5))):
        step = rng.choice(
            ["conv", "residual", "pool", "concat", "relu", "function", "product"],
            p=[0.3, 0.15, 0.15, 0.1, 0.1, 0.1, 0.1],
        )
        if step == "conv":
            x = b.conv(x)
            if rng.random() < 0.25:  # LayerScale: a per-channel constant, any sign
                gamma = b.weights((1, b.shapes[x][1], 1, 1))
                x = b.node("Mul", [x, b.const(gamma, "gamma")], b.shapes[x])
            x = b.activation(x)
        elif step == "residual":
            x = b.residual(x)
            if rng.random() < 0.6:
                x = b.node("Relu", [x], b.shapes[x])
        elif step == "pool":
            x = b.pool(x)
        elif step == "concat":
            x = b.concat(x)
        elif step == "function":
            x = b.function(b.conv(x))
        elif step == "product":
            x = b.product(b.conv(x))
        else:
            x = b.node("Relu", [x], b.shapes[x])
    if rng.random() < 0.6:
        x = b.head(x)
    if x == "x":  # at least one op
        x = b.activation(b.conv(x))
    graph = helper.make_graph(
        b.nodes,
        f"random{seed}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, b.shapes[x])],
        b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])  # HardSwish
    model.ir_version = 8
    return model, shape, b.ops


def _dense(b: _Builder, x: str, out: int) -> str:
    """``x @ W + bias`` on the last axis (a transformer's projection)."""
    shape = b.shapes[x]
    y = b.node("MatMul", [x, b.const(b.weights((shape[-1], out)), "w")], (*shape[:-1], out))
    return b.node("Add", [b.const(b.weights((out,)), "bias"), y], b.shapes[y])


def _layernorm(b: _Builder, x: str) -> str:
    """LayerNormalization, or the decomposed form an exporter writes (fused back by intq)."""
    shape, c = b.shapes[x], b.shapes[x][-1]
    gamma = b.const((1 + b.weights((c,))).astype(np.float32), "gamma")
    beta = b.const(b.weights((c,)), "beta")
    if b.rng.random() < 0.5:
        return b.node("LayerNormalization", [x, gamma, beta], shape, axis=-1, epsilon=1e-5)
    row = (*shape[:-1], 1)
    axes = b.const(np.array([-1]), "axes")
    mean = b.node("ReduceMean", [x, axes], row, keepdims=1)
    centred = b.node("Sub", [x, mean], shape)
    square = b.node("Mul", [centred, centred], shape)
    var = b.node("ReduceMean", [square, axes], row, keepdims=1)
    eps = b.node("Add", [var, b.const(np.array(1e-5, np.float32), "eps")], row)
    std = b.node("Sqrt", [eps], row)
    normed = b.node("Div", [centred, std], shape)
    scaled = b.node("Mul", [normed, gamma], shape)
    return b.node("Add", [scaled, beta], shape)


def _gelu(b: _Builder, x: str) -> str:
    """Gelu, or x * 0.5 * (1 + erf(x / sqrt2)) as exporters write it."""
    shape = b.shapes[x]
    if b.rng.random() < 0.5:
        return b.node("Gelu", [x], shape)
    scaled = b.node("Div", [x, b.const(np.array(np.sqrt(2), np.float32), "sqrt2")], shape)
    erf = b.node("Erf", [scaled], shape)
    plus = b.node("Add", [erf, b.const(np.array(1, np.float32), "one")], shape)
    product = b.node("Mul", [x, plus], shape)
    return b.node("Mul", [product, b.const(np.array(0.5, np.float32), "half")], shape)


def random_transformer(seed: int) -> tuple[onnx.ModelProto, tuple[int, ...], list[str]]:
    """A random small pre-LN-free encoder layer (BERT order): attention, residual, LayerNorm,
    GELU feed-forward, residual, LayerNorm; random widths, 1 or 2 heads."""
    rng = np.random.default_rng(seed)
    batch, tokens = int(rng.integers(1, 3)), int(rng.integers(2, 9))
    heads = int(rng.integers(1, 3))
    width = heads * int(rng.integers(2, 9))
    shape = (batch, tokens, width)
    b = _Builder(rng)
    b.shapes["x"] = shape
    x = _layernorm(b, "x") if rng.random() < 0.5 else "x"
    d = width // heads

    def split(t: str) -> str:  # [B, T, H*d] -> [B, H, T, d]
        r = b.node(
            "Reshape",
            [t, b.const(np.array([batch, tokens, heads, d]), "s")],
            (batch, tokens, heads, d),
        )
        return b.node("Transpose", [r], (batch, heads, tokens, d), perm=[0, 2, 1, 3])

    q, k, v = (split(_dense(b, x, width)) for _ in range(3))
    kt = b.node("Transpose", [k], (batch, heads, d, tokens), perm=[0, 1, 3, 2])
    scores = b.node("MatMul", [q, kt], (batch, heads, tokens, tokens))
    scale = b.const(np.array(1 / np.sqrt(d), np.float32), "scale")
    scores = b.node("Mul", [scores, scale], b.shapes[scores])
    probs = b.node("Softmax", [scores], b.shapes[scores], axis=-1)
    context = b.node("MatMul", [probs, v], (batch, heads, tokens, d))
    merged = b.node("Transpose", [context], (batch, tokens, heads, d), perm=[0, 2, 1, 3])
    merged = b.node("Reshape", [merged, b.const(np.array(shape), "s")], shape)
    attended = _layernorm(b, b.node("Add", [_dense(b, merged, width), x], shape))
    hidden = _gelu(b, _dense(b, attended, int(rng.integers(2, 17))))
    out = _layernorm(b, b.node("Add", [_dense(b, hidden, width), attended], shape))
    graph = helper.make_graph(
        b.nodes,
        f"transformer{seed}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)],
        b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])  # Gelu
    model.ir_version = 9
    return model, shape, b.ops


@functools.lru_cache(maxsize=1)  # each seed's backends run one after another
def random_case(seed: int, transformer: bool = False):
    """The quantized graph of seed ``seed`` (a CNN, or an encoder layer with ``transformer``:
    random kernel variants and residual width too), its config, and the feeds to compare on."""
    model, shape, ops = (random_transformer if transformer else random_model)(seed)
    rng = np.random.default_rng(seed + 1_000_000)
    scale = 10.0 ** rng.uniform(-1, 1)
    non_negative = rng.random() < 0.3

    def sample() -> np.ndarray:
        x = rng.standard_normal(shape) * scale
        return (np.abs(x) if non_negative else x).astype(np.float32)

    kernels: dict[str, str] = {}
    wide_bits = 16
    if transformer:
        kernels = {
            "softmax": str(rng.choice(intq.semantics.kernels.SOFTMAX_VARIANTS)),
            "gelu": str(rng.choice(intq.semantics.kernels.GELU_VARIANTS)),
            "layernorm": str(rng.choice(intq.semantics.kernels.LAYERNORM_VARIANTS)),
        }
        wide_bits = int(rng.choice([8, 12, 16]))
    config = intq.QuantConfig(
        weight_bits=int(rng.integers(4, 9)),
        activation_bits=int(rng.integers(4, 9)),
        calibration=str(rng.choice(["auto", "minmax", "percentile", "mse"])),
        kernels=kernels,
        wide_bits=wide_bits,
    )
    graph = intq.quantize(intq.from_onnx(model), [{"x": sample()} for _ in range(3)], config)
    big = np.float32(1e6)
    alternating = np.where(np.indices(shape).sum(axis=0) % 2 == 0, big, -big)
    feeds = [sample(), sample() * 4, np.full(shape, big), alternating.astype(np.float32)]
    return graph, config, ops, feeds
