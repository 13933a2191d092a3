"""Fold inference-mode BatchNormalization into the preceding Conv or Gemm.

Rules (HAWQ-V3 folds BN before quantizing, so weights carry its scale):

- ``BatchNormalization(Conv(x, W, b))`` where the Conv output has no other
  reader and ``W`` (and ``b``) are constants becomes ``Conv(x, W', b')`` with
  ``k = scale / sqrt(var + eps)``, ``W'[c] = W[c] * k[c]``,
  ``b' = (b - mean) * k + B``.
- ``BatchNormalization(Gemm(x, W, c))`` over the Gemm's output columns folds
  the same way into ``W``'s output columns (``transB`` respected) and ``c``;
  ``alpha`` is folded into ``W`` and ``beta`` into ``c``.
- Anything else is left alone. Arithmetic is in float64, stored in the
  weights' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from intq.ir.graph import Graph, Node, Value
from intq.passes.manager import Pass


def _bn_factors(bn: Node) -> tuple[np.ndarray, np.ndarray] | None:
    """``(k, shift)`` with ``BN(y) = k * y + shift`` per channel, or None if not constant."""
    params = bn.inputs[1:5]
    if not all(v is not None and v.is_const for v in params):
        return None
    scale, bias, mean, var = (np.asarray(v.const, np.float64) for v in params)  # type: ignore[union-attr]
    k = scale / np.sqrt(var + bn.attrs["epsilon"])
    return k, bias - mean * k


def _sole_producer(bn: Node, op: str) -> Node | None:
    x = bn.inputs[0]
    if x is None or x.producer is None or x.producer.op != op:
        return None
    if len(x.uses()) != 1 or x.is_graph_output:
        return None
    return x.producer


def _const(value: Value | None) -> np.ndarray | None:
    return None if value is None else value.const


@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold BatchNormalization into the Conv or Gemm that feeds it."""

    name: ClassVar[str] = "fold-batchnorm"

    def apply(self, graph: Graph) -> bool:
        modified = False
        for bn in graph:
            if bn.op != "BatchNormalization":
                continue
            factors = _bn_factors(bn)
            if factors is None:
                continue
            conv = _sole_producer(bn, "Conv")
            gemm = _sole_producer(bn, "Gemm")
            if conv is not None:
                modified |= self._fold_conv(graph, bn, conv, *factors)
            elif gemm is not None and bn.outputs[0].type.rank == 2:
                modified |= self._fold_gemm(graph, bn, gemm, *factors)
        return modified

    @staticmethod
    def _fold_conv(graph: Graph, bn: Node, conv: Node, k: np.ndarray, shift: np.ndarray) -> bool:
        w = _const(conv.inputs[1])
        has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
        b = _const(conv.inputs[2]) if has_bias else np.zeros(k.shape)
        if w is None or b is None:
            return False
        shape = (-1,) + (1,) * (w.ndim - 1)
        new_w = (w.astype(np.float64) * k.reshape(shape)).astype(w.dtype)
        new_b = (b.astype(np.float64) * k + shift).astype(w.dtype)
        inputs = [conv.inputs[0], graph.add_constant(new_w, conv.inputs[1].name + ".bn")]  # type: ignore[union-attr]
        inputs.append(graph.add_constant(new_b, (conv.name or "conv") + ".bias.bn"))
        _replace(graph, bn, conv, inputs)
        return True

    @staticmethod
    def _fold_gemm(graph: Graph, bn: Node, gemm: Node, k: np.ndarray, shift: np.ndarray) -> bool:
        w = _const(gemm.inputs[1])
        has_bias = len(gemm.inputs) > 2 and gemm.inputs[2] is not None
        c = _const(gemm.inputs[2]) if has_bias else np.zeros(k.shape)
        if w is None or c is None:
            return False
        attrs = gemm.attrs
        n = bn.outputs[0].type.shape[1]
        columns = k.reshape(-1, 1) if attrs["transB"] else k.reshape(1, -1)
        new_w = (w.astype(np.float64) * attrs["alpha"] * columns).astype(w.dtype)
        if c.ndim == 2 and c.shape[0] != 1:
            return False  # a per-row bias cannot fold into a per-column one
        c_full = np.broadcast_to(c.astype(np.float64) * attrs["beta"], (1, n))
        new_c = (c_full.reshape(n) * k + shift).astype(w.dtype)
        inputs = [gemm.inputs[0], graph.add_constant(new_w, gemm.inputs[1].name + ".bn")]  # type: ignore[union-attr]
        inputs.append(graph.add_constant(new_c, (gemm.name or "gemm") + ".bias.bn"))
        attrs = {**attrs, "alpha": 1.0, "beta": 1.0}
        _replace(graph, bn, gemm, inputs, attrs)
        return True


def _replace(
    graph: Graph, bn: Node, producer: Node, inputs: list[Value | None], attrs: dict | None = None
) -> None:
    """Put a copy of ``producer`` with new inputs where ``bn`` was; drop both."""
    out = bn.outputs[0]
    name = out.name
    new = graph.add(
        producer.op,
        inputs,
        attrs or producer.attrs,
        name=producer.name or bn.name,
        before=bn,
        out_names=[name + ".folded"],
    )
    out.replace_all_uses_with(new.output)
    graph.remove(bn)
    graph.remove(producer)
    if graph.find(name) is None:
        graph.rename(new.output, name)
