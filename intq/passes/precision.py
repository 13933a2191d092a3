"""Bit widths and weights: what a layer's precision is, which layers have quantizable
weights, and how the lowering quantizes them.

A *quantizable layer* is a node whose op states a ``weight_axis`` (Conv, Gemm, MatMul) and
whose weight (input 1) is a constant: the integer lowering turns it into ``QConv`` /
``QGemm`` / ``QMatMul`` with per-channel weights along that axis. The mixed-precision
sensitivity, the ILP and the lowering all read the layers and the weight quantizer here, so
they agree on what is quantized and how.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from intq.ir.graph import Graph, Node
from intq.ops import Trait
from intq.semantics.numerics import storage_dtype

WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
"""The weight widths the lowering supports."""
ACTIVATION_BITS = (4, 5, 6, 7, 8, 16)
"""The activation widths the lowering supports."""
WIDE_BITS = (8, 12, 16)
"""The widths a transformer's residual stream may take (``QuantConfig.wide_bits``)."""


@dataclass(frozen=True)
class LayerBits:
    """Bit widths of one layer: its weights and the activation it produces."""

    weights: int = 8
    activations: int = 8


@dataclass(frozen=True)
class QuantLayer:
    """One quantizable layer: its node name, weight constant and counts.

    ``axis`` is the weight's output-channel axis (the per-channel quantization axis);
    ``params`` the weight's element count; ``macs`` its multiply-accumulates per sample
    (the output's first axis is the batch).
    """

    name: str
    op: str
    weight: str
    axis: int
    params: int
    macs: int


def weight_axis(node: Node) -> int | None:
    """The output-channel axis of ``node``'s constant weight, or None when it has none."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    axis_of = node.opdef.weight_axis
    if w is None or w.const is None or axis_of is None:
        return None
    return axis_of(node)


def quantizable_layers(graph: Graph) -> list[QuantLayer]:
    """The layers with constant weights (Conv, Gemm, MatMul), in graph order."""
    layers = []
    for node in graph:
        axis = weight_axis(node)
        if axis is None:
            continue
        w = node.inputs[1]
        assert w is not None and w.const is not None
        out = node.output.type
        reduce = w.const.size // w.const.shape[axis]  # inputs feeding one output element
        batch = out.shape[0] if out.rank > 1 else 1
        layers.append(
            QuantLayer(
                node.label(), node.op, w.name, axis, int(w.const.size), out.size // batch * reduce
            )
        )
    return layers


@dataclass(frozen=True)
class ActivationSite:
    """A quantized activation that quantizable layers read, and where its width is set.

    ``value`` is the tensor the layers' integer kernels read; ``keys`` the names whose
    :attr:`LayerBits.activations` decide its width: the nodes from the readers back through
    ops that only move or clamp values (ReLU, Clip, pools, reshapes) to the first one that
    computes (or the graph input's name), since the lowering quantizes whichever of them it
    materializes with its producer's width. ``readers`` are the layers (original node names)
    that read it, which so share one activation width.
    """

    value: str
    keys: tuple[str, ...]
    readers: tuple[str, ...]


def activation_sites(graph: Graph, layers: list[QuantLayer]) -> list[ActivationSite]:
    """The input activation of each layer in ``layers``, grouped by where its width is set,
    in the order of the layers first reading each; a layer whose chain passes a node without
    a name (so no ``layer_bits`` key can reach it) is left out."""
    by_name = {node.label(): node for node in graph}
    sites: dict[str, tuple[str, list[str], list[str]]] = {}
    for layer in layers:
        x = by_name[layer.name].inputs[0]
        keys: list[str] = []
        named = True
        while x is not None:
            producer = x.producer
            if producer is None:  # a graph input: the lowering keys it by its own name
                keys.append(x.name)
                break
            named = named and bool(producer.name)
            keys.append(producer.name)
            if not producer.opdef.has(Trait.PASS_THROUGH):
                break
            x = producer.inputs[0]
        if x is None or not named:
            continue
        value = by_name[layer.name].inputs[0]
        assert value is not None
        site = keys[-1]  # the computing node (or input) every chain through it ends at
        entry = sites.setdefault(site, (value.name, [], []))
        entry[1].extend(k for k in keys if k not in entry[1])
        entry[2].append(layer.name)
    return [
        ActivationSite(value, tuple(keys), tuple(readers))
        for value, keys, readers in sites.values()
    ]


def quantize_weights(
    w: np.ndarray,
    bits: int,
    axis: int,
    min_scales: np.ndarray | None = None,
    scales: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[float, ...]]:
    """Symmetric narrow-range per-channel quantization along ``axis``: ``(q, scales)``.

    ``scales`` gives the channel scales instead of taking them from each channel's largest
    magnitude: a pre-quantized model's own (:class:`~intq.passes.model_quantization.WeightScales`),
    with which its dequantized weights round back to exactly its integers. ``min_scales``
    raises channel scales where needed (a BatchNorm with a tiny gamma leaves a channel with
    tiny weights but a real bias, which must still fit int32).
    """
    qmax = (1 << (bits - 1)) - 1
    if scales is None:
        moved = np.moveaxis(w.astype(np.float64), axis, 0).reshape(w.shape[axis], -1)
        absmax = np.abs(moved).max(axis=1)
        # An all-zero channel gets any valid scale; borrow the layer's smallest real one.
        fallback = absmax[absmax > 0].min() if np.any(absmax > 0) else 1.0
        scales = np.where(absmax > 0, absmax, fallback) / qmax
    else:
        scales = np.asarray(scales, np.float64).reshape(w.shape[axis])
    if min_scales is not None:
        scales = np.maximum(scales, min_scales)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scales.reshape(shape)), -qmax, qmax)
    return q.astype(storage_dtype(bits, True)), tuple(float(s) for s in scales)


__all__ = [
    "ACTIVATION_BITS",
    "ActivationSite",
    "WEIGHT_BITS",
    "WIDE_BITS",
    "LayerBits",
    "QuantLayer",
    "activation_sites",
    "quantizable_layers",
    "quantize_weights",
    "weight_axis",
]
