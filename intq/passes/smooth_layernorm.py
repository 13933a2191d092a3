"""Migrate LayerNorm outputs' outlier channels into the weights that read them (SmoothQuant,
with Outlier Suppression+'s per-channel shift), as an exact float rewrite before calibration.

A transformer's LayerNorm output ``y = gamma * n + beta`` has a few channels whose range is
tens of times the others' (BERT's outlier dimensions, made by large ``gamma``/``beta``): one
8-bit scale per tensor then leaves the ordinary channels a handful of levels. Per channel
``j`` the pass picks a shift ``c_j`` (the midpoint of the channel's calibrated range) and a
factor ``s_j = max|y_j - c_j|^alpha / max|W_j|^(1 - alpha)`` (``W_j`` the weight rows channel
``j`` meets, over every consumer), and rewrites

    y'  = (gamma / s) * n + (beta - c) / s          the LayerNorm's own gamma and beta
    W'  = diag(s) W,   b' = b + c W                 each consumer's weight rows and bias

so that ``y' W' + b' = y W + b`` exactly in real arithmetic: the integer lowering then sees
an ordinary LayerNorm and ordinary MatMuls, and its results stay exact by construction.

Rules (:data:`CONSUMERS`; one per way a reader can absorb the factors):

- ``matmul``: ``MatMul(y, W)`` with a constant 2-D ``W`` ``[C, N]``: rows scaled by ``s``.
- ``matmul-bias``: that followed by its one reader ``Add(., b)`` with a constant ``b`` of
  ``N`` elements: also ``b + c W`` (only then is the shift ``c`` used; without a bias for
  every consumer, ``c = 0``).

Which values may be rescaled: a reader that absorbs neither (BERT's post-LN residual
``Add``, which reads the LayerNorm output too, the graph output, a next LayerNorm) must see
the original ``y``: per-channel factors do not commute with the residual sum's next
LayerNorm (``LN(h / s) != LN(h) / s``). So the LayerNorm is split: the absorbing readers read
a rescaled copy (a second ``LayerNormalization`` of the same input, calibrated on its own),
the others keep the original. The copy costs one more LayerNorm per block, small beside the
projections it feeds. ``intq.quantize`` lowers the copies (:func:`smoothed_copies`) at the
layers' activation width, 8 bits, even where ``wide_bits`` widens the other LayerNorm outputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from intq.ir.graph import Graph, Node, Value
from intq.passes.calibration import collect_stats
from intq.passes.manager import Pass

SUFFIX = ".smooth"
"""Appended to a LayerNorm's name to name its rescaled copy (:func:`smoothed_copies`)."""


def smoothed_copies(graph: Graph) -> frozenset[str]:
    """The names of the rescaled LayerNorm copies in ``graph``: only MatMuls read them, so
    the lowering may keep them at the layers' activation width (8 bits) where a
    transformer's other LayerNorm outputs are widened."""
    return frozenset(
        n.name for n in graph if n.op == "LayerNormalization" and n.name.endswith(SUFFIX)
    )


@dataclass(frozen=True)
class Consumer:
    """A reader of a LayerNorm output that absorbs per-channel factors: its MatMul, weight
    ``[C, N]`` and, when the MatMul's one reader adds a constant bias, that ``Add``."""

    matmul: Node
    weight: Value
    bias_add: Node | None
    bias: Value | None


def consumer(node: Node, index: int) -> Consumer | None:
    """``node`` reading a LayerNorm output at input ``index`` as a :class:`Consumer`, or
    ``None`` when it cannot absorb per-channel factors (the rules ``matmul``,
    ``matmul-bias``)."""
    if node.op != "MatMul" or index != 0:
        return None
    weight = node.inputs[1]
    if weight is None or weight.const is None or weight.const.ndim != 2:
        return None
    out = node.output
    uses = out.uses()
    if len(uses) == 1 and not out.is_graph_output and uses[0].node.op == "Add":
        add = uses[0].node
        other = add.inputs[1 - uses[0].index]
        n = weight.const.shape[1]
        if other is not None and other.const is not None and other.const.size == n:
            if other.const.shape[-1:] == (n,):
                return Consumer(node, weight, add, other)
    return Consumer(node, weight, None, None)


@dataclass(frozen=True)
class Smoothing:
    """The per-channel shift ``c`` and factor ``s`` chosen for one LayerNorm."""

    shift: np.ndarray
    factor: np.ndarray


def smoothing(
    low: np.ndarray, high: np.ndarray, weights: Sequence[np.ndarray], alpha: float, shift: bool
) -> Smoothing:
    """SmoothQuant's factors for a LayerNorm output whose channel ``j`` spans
    ``[low_j, high_j]`` on the calibration data, read by ``weights`` (each ``[C, N]``).

    ``alpha`` 1 flattens every channel to the same range (RepQuant's per-channel scales,
    folded), 0 leaves activations alone and equalises weight rows. A channel that is
    constant, or meets only zero weights, keeps ``s_j = 1``."""
    c = (low + high) / 2 if shift else np.zeros_like(low)
    x_max = np.maximum(np.abs(high - c), np.abs(low - c))
    w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    usable = (x_max > 0) & (w_max > 0)
    s = np.ones_like(x_max)
    s[usable] = x_max[usable] ** alpha / w_max[usable] ** (1 - alpha)
    # Only ratios between channels matter for the activation's scale; normalising by the
    # geometric mean keeps the rescaled LayerNorm's gamma and the weights near their sizes.
    s[usable] /= np.exp(np.log(s[usable]).mean())
    return Smoothing(c, s)


def _layernorms(graph: Graph) -> list[tuple[Node, list[Consumer]]]:
    """The LayerNorms over the last axis with constant gamma/beta and at least one consumer
    that absorbs factors, each with those consumers."""
    found = []
    for node in graph:
        if node.op != "LayerNormalization":
            continue
        gamma, beta = (*node.inputs[1:], None)[:2]
        rank = node.output.type.rank
        if gamma is None or gamma.const is None or (beta is not None and beta.const is None):
            continue
        if node.attrs.get("axis", -1) not in (-1, rank - 1):
            continue
        size = node.output.type.shape[-1]
        consumers = [
            c
            for use in node.output.uses()
            if (c := consumer(use.node, use.index)) is not None
            and c.weight.const is not None
            and c.weight.const.shape[0] == size
        ]
        if consumers:
            found.append((node, consumers))
    return found


def _channel_range(
    graph: Graph, values: Sequence[Value], batches: Iterable[Mapping[str, np.ndarray]]
) -> dict[Value, tuple[np.ndarray, np.ndarray]]:
    """Per last-axis channel min and max of ``values`` over the calibration ``batches``."""
    wanted = set(values)
    ranges: dict[Value, tuple[np.ndarray, np.ndarray]] = {}

    def observe(value: Value, array: np.ndarray) -> None:
        if value not in wanted:
            return
        flat = np.asarray(array, np.float64).reshape(-1, array.shape[-1])
        low, high = flat.min(axis=0), flat.max(axis=0)
        if value in ranges:
            low, high = np.minimum(low, ranges[value][0]), np.maximum(high, ranges[value][1])
        ranges[value] = (low, high)

    collect_stats(graph, batches, names=[v.name for v in values], observe=observe)
    return ranges


def _rescale(graph: Graph, node: Node, consumers: list[Consumer], smooth: Smoothing) -> None:
    """Give ``consumers`` a copy of LayerNorm ``node`` rescaled by ``smooth``, and fold the
    inverse into their weights and biases."""
    x, gamma, beta = (*node.inputs, None)[:3]
    assert x is not None and gamma is not None and gamma.const is not None
    size = node.output.type.shape[-1]
    c, s = smooth.shift, smooth.factor
    g = np.asarray(gamma.const, np.float64).reshape(size)
    b = np.zeros(size) if beta is None else np.asarray(beta.const, np.float64).reshape(size)
    dtype = gamma.const.dtype
    label = node.label()
    new_gamma = graph.add_constant((g / s).astype(dtype), f"{label}.smooth.gamma")
    new_beta = graph.add_constant(((b - c) / s).astype(dtype), f"{label}.smooth.beta")
    copy = graph.add(
        "LayerNormalization",
        [x, new_gamma, new_beta],
        dict(node.attrs),
        name=label + SUFFIX,
        after=node,
    )
    for user in consumers:
        w = user.weight.const
        assert w is not None
        mm_label = user.matmul.label()
        scaled = graph.add_constant((w * s[:, None]).astype(w.dtype), f"{mm_label}.smooth.w")
        user.matmul.set_input(0, copy.output)
        user.matmul.set_input(1, scaled)
        if user.bias_add is None or user.bias is None or not c.any():
            continue
        assert user.bias.const is not None
        bias = user.bias.const
        shifted = (bias + (c @ w.astype(np.float64)).reshape(bias.shape)).astype(bias.dtype)
        new_bias = graph.add_constant(shifted, f"{user.bias_add.label()}.smooth.b")
        user.bias_add.set_input(user.bias_add.inputs.index(user.bias), new_bias)


@dataclass(frozen=True)
class SmoothLayerNorm(Pass):
    """Migrate LayerNorm outputs' per-channel ranges into the MatMul weights reading them
    (the module docstring gives the rules and why the residual readers keep the original).

    ``batches`` (read once) calibrate each channel's range in float; ``alpha`` is
    SmoothQuant's migration strength; ``shift`` also centres each channel (the midpoint
    moves into the consumers' biases) where every absorbing consumer has a constant bias.
    """

    name: ClassVar[str] = "smooth-layernorm"
    batches: Iterable[Mapping[str, np.ndarray]] = field(default=(), repr=False, compare=False)
    alpha: float = 0.5
    shift: bool = True

    def apply(self, graph: Graph) -> bool:
        found = _layernorms(graph)
        if not found:
            return False
        ranges = _channel_range(graph, [node.output for node, _ in found], self.batches)
        for node, consumers in found:
            low, high = ranges[node.output]
            shift = self.shift and all(c.bias_add is not None for c in consumers)
            weights = [np.asarray(c.weight.const, np.float64) for c in consumers]
            _rescale(graph, node, consumers, smoothing(low, high, weights, self.alpha, shift))
        graph.remove_nodes(
            [n for n, _ in found if not n.output.uses() and not n.output.is_graph_output]
        )
        for const in graph.constants:  # the replaced weights, gammas and biases
            if not const.uses() and not const.is_graph_output:
                graph.remove_constant(const)
        return True
