"""Fold inference-mode BatchNormalization into the preceding Conv or Gemm.

Rules (HAWQ-V3 folds BN before quantizing, so weights carry its scale):

- ``conv-bn``: ``BatchNormalization(Conv(x, W, b))`` where the Conv output has
  no other reader and ``W``, ``b`` and the BN parameters are constants becomes
  ``Conv(x, W', b')`` with ``k = scale / sqrt(var + eps)``,
  ``W'[c] = W[c] * k[c]`` and ``b' = (b - mean) * k + B``.
- ``gemm-bn``: ``BatchNormalization(Gemm(x, W, c))`` folds the same way into
  ``W``'s output columns (``transB`` respected) and ``c``; ``alpha`` folds
  into ``W`` and ``beta`` into ``c``. Refused when ``c`` varies per row.
- Arithmetic is in float64, stored in the weights' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from intq.ir.graph import Graph, Node, Value
from intq.passes.manager import Pass
from intq.passes.rewrite import Const, Match, Op, Opt, Rule, Var, apply_rules


def _bn_pattern(producer: str, bias: str) -> Op:
    inner = Op(producer, Var("x"), Const("w"), Opt(Const(bias)), name="producer")
    return Op(
        "BatchNormalization",
        inner,
        Const("scale"),
        Const("shift"),
        Const("mean"),
        Const("var"),
    )


def _bn_factors(m: Match) -> tuple[np.ndarray, np.ndarray]:
    """``(k, shift)`` with ``BN(y) = k * y + shift`` per channel, in float64."""
    scale, shift, mean, var = (
        np.asarray(m.const(n), np.float64) for n in ("scale", "shift", "mean", "var")
    )
    k = scale / np.sqrt(var + m.root.attrs["epsilon"])
    return k, shift - mean * k


def _rebuild(
    graph: Graph, m: Match, weight: np.ndarray, bias: np.ndarray, **attrs: object
) -> Value:
    """The producer again, with new constant weight and bias, where the BN was."""
    producer: Node = m["producer"]
    w = graph.add_constant(weight, m["w"].name + ".bn")
    b = graph.add_constant(bias, (producer.name or producer.op.lower()) + ".bias.bn")
    merged: dict[str, Any] = {**producer.attrs, **attrs}
    node = graph.add(producer.op, [m["x"], w, b], merged, name=producer.name, before=m.root)
    return node.output


def _fold_conv(graph: Graph, m: Match) -> list[Value]:
    k, shift = _bn_factors(m)
    w = m.const("w")
    b = m.const("b")
    b = np.zeros(k.shape) if b is None else b.astype(np.float64)
    weight = w.astype(np.float64) * k.reshape((-1,) + (1,) * (w.ndim - 1))
    return [_rebuild(graph, m, weight.astype(w.dtype), (b * k + shift).astype(w.dtype))]


def _gemm_check(m: Match) -> str | None:
    c = m.const("c")
    if c is not None and c.ndim == 2 and c.shape[0] != 1:
        return "the Gemm bias varies per row; BN scales per column"
    return None


def _fold_gemm(graph: Graph, m: Match) -> list[Value]:
    k, shift = _bn_factors(m)
    attrs = m["producer"].attrs
    w, c = m.const("w"), m.const("c")
    n = k.shape[0]
    columns = k.reshape(-1, 1) if attrs["transB"] else k.reshape(1, -1)
    weight = w.astype(np.float64) * attrs["alpha"] * columns
    c = np.zeros(n) if c is None else np.broadcast_to(c.astype(np.float64) * attrs["beta"], (1, n))
    bias = c.reshape(n) * k + shift
    return [_rebuild(graph, m, weight.astype(w.dtype), bias.astype(w.dtype), alpha=1.0, beta=1.0)]


RULES = (
    Rule("conv-bn", _bn_pattern("Conv", "b"), _fold_conv),
    Rule("gemm-bn", _bn_pattern("Gemm", "c"), _fold_gemm, _gemm_check),
)


@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold BatchNormalization into the Conv or Gemm that feeds it."""

    name: ClassVar[str] = "fold-batchnorm"

    def apply(self, graph: Graph) -> bool:
        return apply_rules(graph, RULES) > 0
