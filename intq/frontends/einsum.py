"""Einsum as the IR ops both frontends already produce: Transpose, Reshape, MatMul, ReduceSum.

A two-operand equation sorts its labels into four kinds: *batch* (in both operands and the
output), *contracted* (in both, not in the output), *free* (in one operand and the output)
and *summed* (in one operand only: a ``ReduceSum`` first). Each operand is transposed to
``[batch..., free..., contracted...]`` (the right one to ``[batch..., contracted...,
free...]``), its free and contracted dims flattened into one each, and one batched
``MatMul`` gives ``[batch..., M, N]``; a Reshape and a Transpose put the output in the
equation's order. Attention's ``"bhlk,bhtk->bhlt"`` is a Transpose of ``k`` and a MatMul,
which the integer lowering makes a QBatchMatMul; an equation with a constant operand and no
batch label keeps that operand on the right as a 2-D weight, which becomes a QMatMul.

One operand: a ``ReduceSum`` of the labels the output drops, then a Transpose. Refused with
:class:`~intq.errors.UnsupportedOpError` naming the equation: more than two operands, a
label repeated within one operand (a diagonal), and a contracted label of different sizes
(broadcast then summed). Nodes whose inputs are constants fold (``emit`` does it), so
nothing of this reaches a constant weight at run time.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from intq.errors import UnsupportedOpError
from intq.frontends.normalization import Emit
from intq.ir.graph import Value

Label = str
"""One letter of the equation, or ``"...k"`` for the k-th dim of the ellipsis from the right."""


def _unsupported(equation: str, why: str, node: str) -> UnsupportedOpError:
    return UnsupportedOpError(
        f"einsum {equation!r}: {why}",
        node=node,
        hint="einsum of one or two operands without a label repeated within an operand is"
        " supported; rewrite the rest with matmul, transpose and sum",
    )


def _term(term: str, rank: int, equation: str, node: str) -> list[Label]:
    """The labels of one operand's (or the output's) subscripts; ``rank`` sizes ``...``."""
    if term.count("...") > 1 or "." in term.replace("...", ""):
        raise _unsupported(equation, f"malformed subscripts {term!r}", node)
    head, dots, tail = term.partition("...")
    for letter in head + tail:
        if letter not in string.ascii_letters:
            raise _unsupported(equation, f"subscript {letter!r} is not a letter", node)
    if not dots:
        return list(head)
    width = rank - len(head) - len(tail)
    if width < 0:
        raise _unsupported(equation, f"{term!r} has more labels than rank {rank}", node)
    return [*head, *(f"...{k}" for k in reversed(range(width))), *tail]


def parse(
    equation: str, ranks: Sequence[int], node: str = ""
) -> tuple[list[list[Label]], list[Label]]:
    """The labels of each operand and of the output of ``equation`` (spaces ignored; without
    ``->`` the output is the labels used once, ellipsis first then alphabetical, as numpy)."""
    text = equation.replace(" ", "")
    lhs, arrow, rhs = text.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise _unsupported(equation, f"{len(terms)} subscripts for {len(ranks)} operands", node)
    operands = [_term(t, r, equation, node) for t, r in zip(terms, ranks)]
    for term, labels, rank in zip(terms, operands, ranks):
        if len(labels) != rank:
            raise _unsupported(equation, f"{term!r} does not match its operand's rank", node)
        if len(set(labels)) != len(labels):
            raise _unsupported(equation, f"a label repeated within {term!r} (a diagonal)", node)
    used = [label for labels in operands for label in labels]
    dots = sorted({lb for lb in used if lb.startswith("...")}, key=lambda lb: -int(lb[3:]))
    if arrow:
        out = _term(rhs, len(dots) + len(rhs.replace("...", "")), equation, node)
    else:
        out = dots + sorted(lb for lb in set(used) if used.count(lb) == 1 and lb not in dots)
    if len(set(out)) != len(out):
        raise _unsupported(equation, "a label repeated in the output", node)
    if missing := [lb for lb in out if lb not in used]:
        raise _unsupported(equation, f"output label {missing[0]!r} is in no operand", node)
    return operands, out


@dataclass
class _Plan:
    """The nodes of a decomposition, planned on shapes before any is emitted, so the last one
    can carry the source node's output name and identity transposes and reshapes are skipped.

    A step is ``(slot written, op, slots read, attributes)``; the slots are ``"a"``, ``"b"``
    (the operands, then their rewrites) and ``"y"`` (the product)."""

    shapes: dict[str, tuple[int, ...]]
    steps: list[tuple[str, str, tuple[str, ...], dict[str, object]]] = field(default_factory=list)

    def transpose(self, slot: str, labels: list[Label], order: list[Label]) -> None:
        perm = tuple(labels.index(lb) for lb in order)
        if perm != tuple(range(len(perm))):
            self.steps.append((slot, "Transpose", (slot,), {"perm": perm}))
            self.shapes[slot] = tuple(self.shapes[slot][p] for p in perm)

    def reshape(self, slot: str, shape: Sequence[int]) -> None:
        shape = tuple(int(d) for d in shape)
        if self.shapes[slot] != shape:
            self.steps.append((slot, "Reshape", (slot,), {"shape": shape}))
            self.shapes[slot] = shape

    def sum_out(self, slot: str, labels: list[Label], keep: set[Label]) -> list[Label]:
        """Sum ``slot`` over its labels outside ``keep``; returns the labels left."""
        axes = tuple(i for i, lb in enumerate(labels) if lb not in keep)
        if axes:
            self.steps.append((slot, "ReduceSum", (slot,), {"axes": axes, "keepdims": 0}))
            self.shapes[slot] = tuple(d for i, d in enumerate(self.shapes[slot]) if i not in axes)
        return [lb for lb in labels if lb in keep]

    def dims(self, slot: str, labels: list[Label], group: list[Label]) -> list[int]:
        return [self.shapes[slot][labels.index(lb)] for lb in group]

    def run(self, emit: Emit, values: dict[str, Value], result: str) -> Value:
        """Emit the steps; the last one's output is named after the source node."""
        for i, (out, op, ins, attrs) in enumerate(self.steps):
            suffix = "" if i == len(self.steps) - 1 else f".einsum{i}"
            values[out] = emit(op, [values[s] for s in ins], suffix, **attrs)
        return values[result]


def _shape(value: Value) -> tuple[int, ...]:
    return tuple(int(d) for d in value.type.shape)


def einsum(emit: Emit, equation: str, operands: Sequence[Value], *, node: str = "") -> Value:
    """``numpy.einsum(equation, *operands)`` built from Transpose, Reshape, MatMul and
    ReduceSum through ``emit`` (the last node is emitted with suffix ``""``; an identity
    equation returns its operand)."""
    if len(operands) not in (1, 2):
        raise _unsupported(equation, f"{len(operands)} operands (one or two are supported)", node)
    terms, out = parse(equation, [v.type.rank for v in operands], node)
    if len(operands) == 1:
        plan = _Plan({"a": _shape(operands[0])})
        labels = plan.sum_out("a", terms[0], set(out))
        plan.transpose("a", labels, out)
        return plan.run(emit, {"a": operands[0]}, "a")
    a, b = operands
    la, lb_ = terms
    sizes: dict[Label, int] = {}
    for value, labels in ((a, la), (b, lb_)):
        for label, dim in zip(labels, _shape(value)):
            if label in sizes and sizes[label] != dim and label not in out:
                raise _unsupported(
                    equation, f"contracted label {label!r} has sizes {sizes[label]} and {dim}", node
                )
            sizes[label] = max(sizes.get(label, 1), dim)
    # A constant operand goes on the right: a 2-D constant B is a weight (QMatMul).
    if a.const is not None and b.const is None:
        a, b, la, lb_ = b, a, lb_, la
    plan = _Plan({"a": _shape(a), "b": _shape(b)})
    la = plan.sum_out("a", la, set(lb_) | set(out))
    lb_ = plan.sum_out("b", lb_, set(la) | set(out))
    batch = [lb for lb in out if lb in la and lb in lb_]
    free_a = [lb for lb in out if lb in la and lb not in lb_]
    free_b = [lb for lb in out if lb in lb_ and lb not in la]
    contracted = [lb for lb in la if lb in lb_ and lb not in out]
    batch_a, batch_b = plan.dims("a", la, batch), plan.dims("b", lb_, batch)
    m_dims, n_dims = plan.dims("a", la, free_a), plan.dims("b", lb_, free_b)
    k = int(np.prod(plan.dims("a", la, contracted), dtype=np.int64))
    m, n = int(np.prod(m_dims, dtype=np.int64)), int(np.prod(n_dims, dtype=np.int64))
    plan.transpose("a", la, batch + free_a + contracted)
    plan.transpose("b", lb_, batch + contracted + free_b)
    if batch:
        plan.reshape("a", [*batch_a, m, k])
        plan.reshape("b", [*batch_b, k, n])
    else:  # A's free dims stay leading dims of a MatMul by a 2-D B (a weight if constant)
        plan.reshape("a", [*(m_dims or [1]), k])
        plan.reshape("b", [k, n])
    plan.steps.append(("y", "MatMul", ("a", "b"), {}))
    batch_y = [max(p, q) for p, q in zip(batch_a, batch_b)]
    plan.shapes["y"] = (*batch_y, m, n) if batch else (*(m_dims or [1]), n)
    plan.reshape("y", [*batch_y, *m_dims, *n_dims])
    plan.transpose("y", batch + free_a + free_b, out)
    return plan.run(emit, {"a": a, "b": b}, "y")
