"""Helpers shared by the backend tests: integer single-layer graphs and hostile inputs."""

from __future__ import annotations

import numpy as np

from intq.ir import DType, Graph, QuantParams, TensorType, Value
from intq.semantics.numerics import dyadic


def adversarial(x: np.ndarray) -> list[np.ndarray]:
    """All-max, all-min and alternating extremes, far outside any calibrated range."""
    big = np.float32(1e6)
    alternating = np.where(np.indices(x.shape).sum(axis=0) % 2 == 0, big, -big)
    return [np.full_like(x, big), np.full_like(x, -big), alternating.astype(np.float32)]


def shifted_batches(x: np.ndarray, count: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        {"input": np.roll(x, tuple(rng.integers(-16, 16, 2)), axis=(2, 3))} for _ in range(count)
    ]


def int_input(g: Graph, name: str, shape, signed: bool, scale: float = 0.05, bits: int = 8):
    """A quantized graph input of ``bits`` bits, stored in 8 or (above 8 bits) 16."""
    if bits <= 8:
        dtype = DType.I8 if signed else DType.U8
    else:
        dtype = DType.I16 if signed else DType.U16
    return g.add_input(name, TensorType(dtype, tuple(shape), QuantParams(bits, signed, (scale,))))


def weight(g: Graph, data: np.ndarray, scales, axis: int):
    w = g.add_constant(data.astype(np.int8), "w")
    quant = QuantParams(8, True, tuple(scales), axis=axis, narrow=True)
    w.type = w.type.with_quant(quant)
    return w


def full_range(rng: np.random.Generator, shape, signed: bool, bits: int = 8) -> np.ndarray:
    """Integers over the whole ``bits``-bit range, a third of them the maximum and a fifth
    the minimum; stored as 8-bit integers, or 16-bit above 8 bits."""
    low, high = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    values = rng.integers(low, high, size=shape)
    values.reshape(-1)[::3] = (
        high - 1
    )  # many extremes: saturating kernels (vpmaddubsw) fail on them
    values.reshape(-1)[1::5] = low
    if bits > 8:
        return values.astype(np.int16 if signed else np.uint16)
    return values.astype(np.int8 if signed else np.uint8)


def qconv(
    g: Graph,
    rng,
    x,
    out_channels: int,
    group: int,
    kernel: int,
    stride: int,
    pad: int,
    bias: bool,
    weight_max: int = 127,
):
    """A ``QConv`` of ``x`` with narrow int8 weights over their full range, or up to
    ``weight_max`` in magnitude (64: what 7-bit weights reach, the TVM backend's byte
    kernel) and, if ``bias``, an int32 bias: its int32 accumulator."""
    channels = x.type.shape[1]
    w_shape = (out_channels, channels // group, kernel, kernel)
    w_data = full_range(rng, w_shape, True).clip(-weight_max, weight_max)
    w = weight(g, w_data, rng.uniform(0.001, 0.1, out_channels), 0)
    inputs = [x, w]
    if bias:
        acc_scales = tuple(0.05 * s for s in w.type.quant.scale)
        b = g.add_constant(rng.integers(-(2**20), 2**20, out_channels).astype(np.int32), "b")
        b.type = b.type.with_quant(QuantParams(32, True, acc_scales, axis=0))
        inputs.append(b)
    return g.op("QConv", *inputs, group=group, strides=(stride, stride), pads=(pad,) * 4)


def requantized(g: Graph, acc, out_scale: float, signed: bool):
    q = acc.type.quant
    pairs = [dyadic(s / out_scale) for s in q.scale]
    lo, hi = (-128, 127) if signed else (0, 255)
    return g.op(
        "Requantize",
        acc,
        multiplier=tuple(p.multiplier for p in pairs),
        shift=tuple(p.shift for p in pairs),
        axis=q.axis if q.axis is not None else -1,
        bits=8,
        signed=int(signed),
        scale=out_scale,
        lo=lo,
        hi=hi,
    )


def qadd_and_pools(ra: float, rb: float) -> tuple[Graph, Value, Value, list[Value]]:
    """A signed and an unsigned 8-bit input ``a``, ``b`` (1x3x4x4) and integer ops on them:
    their ``QAdd`` at an output scale set by ``ra``/``rb``, a 2x2 ``QAveragePool`` of ``b``
    and a ``QGlobalAveragePool`` of ``a``. Returns the graph, ``a``, ``b`` and those values."""
    from intq.semantics.numerics import common_shift

    g = Graph()
    a = int_input(g, "a", (1, 3, 4, 4), True, 0.1)
    b = int_input(g, "b", (1, 3, 4, 4), False, 0.1)
    out_scale = 0.1 / max(ra, rb)
    (ma, mb), shift = common_shift(0.1 / out_scale, 0.1 / out_scale)
    s = g.op(
        "QAdd",
        a,
        b,
        multiplier_a=ma,
        multiplier_b=mb,
        shift=shift,
        bits=8,
        signed=1,
        scale=out_scale,
        lo=-128,
        hi=127,
    )
    pooled = g.op("QAveragePool", b, kernel_shape=(2, 2), strides=(2, 2))
    return g, a, b, [s, pooled, g.op("QGlobalAveragePool", a)]
