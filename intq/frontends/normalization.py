"""GroupNorm, InstanceNorm and the L2 norm as the IR ops both frontends already produce.

``L2(x) = Sqrt(ReduceSum(Mul(x, x), axes))`` (ONNX ``ReduceL2``, ``torch.linalg.vector_norm``
with ``ord=2``, ``F.normalize``'s norm): float IR with numpy and torch semantics. The integer
lowering matches the three ops as one ``QReduceL2`` (a division-free square root), and the
division by the norm that usually follows as a ``QDiv`` (a division-free reciprocal).

``GroupNorm(x)`` over ``G`` groups of an ``[N, C, ...]`` tensor normalizes each group of
``C / G`` channels over those channels and every spatial position: ``Reshape(x, [N, G, -1])``,
``LayerNormalization`` over the last axis with unit ``gamma`` and no ``beta``, ``Reshape``
back, then the per-channel affine ``gamma[c] y + beta[c]`` as an inference
``BatchNormalization`` with mean 0 and variance 1 (``fold-batchnorm`` makes it a depthwise
1x1 Conv). InstanceNorm is GroupNorm with ``G = C``. The integer lowering then needs nothing
new: QLayerNorm and QConv.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from intq.errors import ShapeError
from intq.ir.graph import Graph, Value


class Emit(Protocol):
    """A frontend's node builder: op ``op`` of ``inputs``, its output named after the source
    node plus ``suffix`` (the last node's output: ``suffix=""``)."""

    def __call__(self, op: str, inputs: list[Value | None], suffix: str, **attrs: object) -> Value:
        """Add one node; returns its output (folded to a constant when its inputs are)."""
        ...


def group_norm(
    graph: Graph,
    emit: Emit,
    x: Value,
    groups: int,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    *,
    node: str = "",
) -> Value:
    """``x`` normalized per sample over each of ``groups`` channel groups, then scaled by the
    per-channel ``gamma`` and shifted by ``beta`` (``None``: 1 and 0)."""
    shape = x.type.shape
    if x.type.rank < 2 or groups < 1 or shape[1] % groups:
        raise ShapeError(
            f"a normalization over {groups} groups needs [N, C, ...] with C divisible by it,"
            f" got {x.type}",
            node=node,
        )
    channels = shape[1]
    dtype = x.type.dtype.numpy
    grouped = (shape[0], groups, int(np.prod(shape[1:], dtype=np.int64)) // groups)
    flat = x if shape == grouped else emit("Reshape", [x], ".grouped", shape=grouped)
    unit = graph.add_constant(np.ones(grouped[2], dtype), (node or "norm") + ".unit")
    affine = not ((gamma is None or np.all(gamma == 1.0)) and (beta is None or np.all(beta == 0.0)))
    y = emit(
        "LayerNormalization",
        [flat, unit],
        ".normalized" if affine or shape != grouped else "",
        axis=2,
        epsilon=float(eps),
    )
    if shape != grouped:
        y = emit("Reshape", [y], ".ungrouped" if affine else "", shape=shape)
    if not affine:
        return y

    def vector(values: np.ndarray | None, default: float, what: str) -> Value:
        data = np.full(channels, default) if values is None else np.asarray(values).reshape(-1)
        return graph.add_constant(data.astype(dtype), (node or "norm") + what)

    params = [
        vector(gamma, 1.0, ".scale"),
        vector(beta, 0.0, ".bias"),
        vector(None, 0.0, ".mean"),
        vector(None, 1.0, ".var"),
    ]
    return emit("BatchNormalization", [y, *params], "", epsilon=0.0)


def l2_norm(emit: Emit, x: Value, axes: tuple[int, ...], keepdims: bool) -> Value:
    """``sqrt(sum(x^2, axes))``: Mul, ReduceSum and Sqrt (ONNX's ReduceL2)."""
    squares = emit("Mul", [x, x], ".squares")
    total = emit("ReduceSum", [squares], ".sum_squares", axes=axes, keepdims=int(keepdims))
    return emit("Sqrt", [total], "")
