"""How much each quantizable layer suffers from fewer weight bits: the ``Ω`` of HAWQ-V3.

A *quantizable layer* is what the integer lowering turns into ``QConv``/``QGemm``/``QMatMul``:
a Conv, Gemm or MatMul whose weight (input 1) is a constant
(:func:`intq.passes.precision.quantizable_layers`).
Two ways to measure its sensitivity, both on unlabelled calibration batches:

- :func:`hessian_traces` (HAWQ-V3): the trace of the Hessian of a loss with respect to the
  layer's weights, by Hutchinson's method ``tr(H) = E[vᵀ H v]`` with Rademacher ``v``,
  through PyTorch autograd over the float graph (:mod:`intq.semantics.torch_eval`). Then
  ``Ω_i(b) = tr(H_i) / n_i * ||Q_b(W_i) - W_i||²`` (:func:`hessian_perturbations`), ``Q_b``
  being the very weight quantizer of the lowering (:func:`intq.passes.precision.quantize_weights`).
- :func:`direct_perturbations`: quantize one layer at a time to ``b`` bits (the others stay
  float) and measure the same loss on the calibration set. Costs ``layers x candidates``
  forward passes and no autograd; it sees effects beyond second order.

The loss, since calibration data has no labels (``loss=``):

- ``"kl"`` (default, for classifiers): ``KL(p_fp32 || softmax(z(W)))`` per sample, the
  FP32 model's own softmax as the target, over the last axis of every float output. At the
  FP32 weights it is 0 with zero gradient, and its Hessian there is the Fisher information
  (positive semi-definite), so ``½ ΔWᵀ H ΔW`` is exactly the second-order KL increase a
  quantization error ``ΔW`` causes: the quantity the ILP should spend bits on. Cross-entropy
  to the FP32 argmax would ignore how confident the model was and has a non-zero gradient
  and an indefinite Hessian at the FP32 weights, so its trace is a poorer proxy.
- ``"mse"`` (for embeddings, regressions): the mean squared error to the FP32 outputs;
  also zero with zero gradient at the FP32 weights, its Hessian the Gauss-Newton ``2JᵀJ``.

The estimator. At the FP32 weights both losses have zero gradient in the outputs ``z``,
so their Hessian in layer ``i``'s weights is exactly the Gauss-Newton matrix
``H_i = J_iᵀ A J_i`` (``J_i = ∂z/∂W_i``, ``A`` the loss's Hessian in ``z``, positive
semi-definite). Factor ``A = B Bᵀ`` in closed form (see :func:`_factor_times`); then
Hutchinson's identity ``tr(M) = E[uᵀ M u]`` for Rademacher ``u`` applied to
``M = Bᵀ J_i J_iᵀ B`` gives ``tr(H_i) = E ||J_iᵀ B u||²``: one ordinary backward pass of
``B u`` through the graph per iteration yields every layer's estimate, each from its own
gradient block (no cross-layer terms, unlike drawing one ``v`` over all weights for a
Hessian-vector product), always non-negative, and without second derivatives (a third of
the cost of a double backward). Each iteration takes the next calibration batch (cycling);
iterations stop when every layer's running mean changes by less than ``tol`` relative to
itself (after ``min_iterations``), or at ``max_iterations``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from intq.errors import IntqError
from intq.ir.graph import Graph
from intq.passes.precision import QuantLayer, quantize_weights
from intq.progress import show_progress
from intq.semantics.torch_eval import run_torch

LOSSES = ("kl", "mse")
Batch = Mapping[str, np.ndarray]


def fake_quantized(weight: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """``Q_b(W)``: the weight quantized as the lowering does, then back to reals (float32)."""
    q, scales = quantize_weights(weight, bits, axis)
    shape = [1] * weight.ndim
    shape[axis] = -1
    return (q.astype(np.float64) * np.asarray(scales).reshape(shape)).astype(weight.dtype)


def weight_error(weight: np.ndarray, bits: int, axis: int) -> float:
    """``||Q_b(W) - W||²`` in float64."""
    diff = fake_quantized(weight, bits, axis).astype(np.float64) - weight.astype(np.float64)
    return float(np.sum(diff * diff))


# ----- the loss --------------------------------------------------------------------------------

Loss = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


def _float_outputs(graph: Graph) -> list[str]:
    names = [v.name for v in graph.outputs if v.type.dtype.numpy.kind == "f"]
    if not names:
        raise IntqError("the graph has no float output to measure sensitivity on")
    return names


def _log_probs(graph: Graph, name: str, out: torch.Tensor) -> torch.Tensor:
    producer = graph[name].producer
    if producer is not None and producer.op == "Softmax":  # already probabilities
        return torch.log(out.clamp_min(1e-30))
    return torch.log_softmax(out, dim=-1)


def make_loss(graph: Graph, reference: Mapping[str, torch.Tensor], loss: str) -> Loss:
    """The loss of a run's outputs against the FP32 ``reference`` outputs of the same batch."""
    if loss not in LOSSES:
        raise IntqError(f"unknown sensitivity loss {loss!r}", hint=f"use one of {LOSSES}")
    names = _float_outputs(graph)
    if loss == "mse":
        return lambda outs: sum(  # type: ignore[return-value]
            torch.mean((outs[n] - reference[n]) ** 2) for n in names
        )
    targets = {n: _log_probs(graph, n, reference[n]) for n in names}

    def kl(outs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for n in names:
            logq = _log_probs(graph, n, outs[n])
            logp = targets[n]
            rows = logp.numel() // logp.shape[-1]
            total = total + (logp.exp() * (logp - logq)).sum().double() / rows
        return total

    return kl


def _need_batches(batches: Sequence[Batch]) -> None:
    if not batches:
        raise IntqError(
            "no calibration batches to measure sensitivity on",
            hint="pass at least one input dict",
        )


# ----- Hutchinson ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson's estimates: layer name -> ``tr(H_i)``, and how many iterations it took."""

    traces: dict[str, float]
    iterations: int
    converged: bool


def hessian_traces(
    graph: Graph,
    batches: Sequence[Batch],
    layers: Sequence[QuantLayer],
    *,
    loss: str = "kl",
    tol: float = 2e-2,
    min_iterations: int = 8,
    max_iterations: int = 64,
    seed: int = 0,
    progress: bool | None = None,
) -> TraceEstimate:
    """Each layer's Hessian trace ``tr(H_i)`` of ``loss`` at the float weights (Hutchinson).

    ``graph`` is a float graph (after ``fold-batchnorm``: the folded weights are the ones
    quantized); ``batches`` are input dicts. See the module docstring for the loss, the
    estimator and the stopping rule.
    """
    _need_batches(batches)
    if loss not in LOSSES:
        raise IntqError(f"unknown sensitivity loss {loss!r}", hint=f"use one of {LOSSES}")
    if not 0 < tol < 1 or not 1 <= min_iterations <= max_iterations:
        raise IntqError(
            f"need 0 < tol < 1 and 1 <= min_iterations <= max_iterations, got tol={tol},"
            f" min_iterations={min_iterations}, max_iterations={max_iterations}"
        )
    names = _float_outputs(graph)
    params = {
        layer.name: torch.from_numpy(np.array(graph[layer.weight].const)).requires_grad_(True)
        for layer in layers
    }
    weights = {layer.weight: params[layer.name] for layer in layers}
    leaves = list(params.values())
    generator = torch.Generator().manual_seed(seed)
    sums = dict.fromkeys(params, 0.0)
    means = dict.fromkeys(params, 0.0)
    converged = False
    iteration = 0
    with tqdm(
        total=max_iterations,
        desc="Hessian traces",
        disable=not show_progress(progress),
        file=sys.stderr,
    ) as bar:
        for iteration in range(1, max_iterations + 1):
            batch = batches[(iteration - 1) % len(batches)]
            outs = run_torch(graph, batch, weights)
            # H = J^T A J at the FP32 weights (the loss's gradient in the outputs is 0 there),
            # A = B B^T; tr(H_i) = E ||J_i^T B u||^2 for Rademacher u: one backward pass.
            directions = [_factor_times(graph, n, outs[n].detach(), loss, generator) for n in names]
            grads = torch.autograd.grad(
                [outs[n] for n in names], leaves, grad_outputs=directions, allow_unused=True
            )
            previous = dict(means)
            for name, g in zip(params, grads):
                sums[name] += 0.0 if g is None else float((g.double() ** 2).sum())
                means[name] = sums[name] / iteration
            bar.update(1)
            if iteration >= min_iterations and _settled(previous, means, tol):
                converged = True
                break
    return TraceEstimate(dict(means), iteration, converged)


def _rademacher(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1


def _factor_times(
    graph: Graph, name: str, out: torch.Tensor, loss: str, generator: torch.Generator
) -> torch.Tensor:
    """``B u`` for a Rademacher ``u``, where ``B B^T`` is the loss's Hessian in output ``name``
    at the FP32 outputs ``out``.

    KL (mean over rows) of softmax ``p``: per row ``A = diag(p) - p p^T = D^½ P D^½`` with
    ``P = I - s s^T``, ``s = sqrt(p)`` a unit vector (P a projection), so ``B = D^½ P / sqrt(R)``
    over ``R`` rows and ``B u = sqrt(p) * (u - s (s.u)) / sqrt(R)``. MSE (mean over ``N``
    elements): ``A = 2 I / N``, ``B u = sqrt(2 / N) u``. When the output is already a softmax,
    the Jacobian is taken to it and ``A = diag(1/p) - 1 1^T``, ``B u = (u - s (s.u)) / s``
    per row, over ``sqrt(R)``.
    """
    u = _rademacher(out.shape, generator)
    if loss == "mse":
        return (u * math.sqrt(2.0 / out.numel())).to(out.dtype)
    producer = graph[name].producer
    probs_out = producer is not None and producer.op == "Softmax"
    p = out.double() if probs_out else torch.softmax(out.double(), dim=-1)
    rows = p.numel() // p.shape[-1]
    s = torch.sqrt(p)
    projected = u - s * (s * u).sum(dim=-1, keepdim=True)
    scaled = projected / s.clamp_min(1e-30) if probs_out else s * projected
    return (scaled / math.sqrt(rows)).to(out.dtype)


def _settled(previous: Mapping[str, float], current: Mapping[str, float], tol: float) -> bool:
    """Every running mean moved by less than ``tol`` of itself (tiny ones: of the largest)."""
    floor = 1e-6 * max((abs(v) for v in current.values()), default=0.0)
    return all(abs(current[n] - previous[n]) <= tol * max(abs(current[n]), floor) for n in current)


def hessian_perturbations(
    graph: Graph,
    layers: Sequence[QuantLayer],
    traces: Mapping[str, float],
    candidates: Sequence[int],
) -> dict[str, dict[int, float]]:
    """``Ω_i(b) = tr(H_i) / n_i * ||Q_b(W_i) - W_i||²`` for every layer and candidate."""
    out = {}
    for layer in layers:
        w = graph[layer.weight].const
        assert w is not None
        average = traces[layer.name] / layer.params
        out[layer.name] = {b: average * weight_error(w, b, layer.axis) for b in candidates}
    return out


# ----- one layer at a time -------------------------------------------------------------------


def direct_perturbations(
    graph: Graph,
    batches: Sequence[Batch],
    layers: Sequence[QuantLayer],
    candidates: Sequence[int],
    *,
    loss: str = "kl",
    progress: bool | None = None,
) -> dict[str, dict[int, float]]:
    """``Ω_i(b)``: the mean ``loss`` over ``batches`` with only layer ``i``'s weights
    quantized to ``b`` bits (the rest of the graph in float)."""
    _need_batches(batches)
    with torch.no_grad():
        references = [run_torch(graph, batch) for batch in batches]
        losses = [make_loss(graph, ref, loss) for ref in references]
        out: dict[str, dict[int, float]] = {}
        total = len(layers) * len(candidates)
        with tqdm(
            total=total, desc="sensitivity", disable=not show_progress(progress), file=sys.stderr
        ) as bar:
            for layer in layers:
                w = graph[layer.weight].const
                assert w is not None
                out[layer.name] = {}
                for b in candidates:
                    swapped = {layer.weight: torch.from_numpy(fake_quantized(w, b, layer.axis))}
                    values = [
                        float(fn(run_torch(graph, batch, swapped)))
                        for fn, batch in zip(losses, batches)
                    ]
                    out[layer.name][b] = max(math.fsum(values) / len(values), 0.0)
                    bar.update(1)
    return out


# ----- activations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationQuantizer:
    """How the lowering would quantize one activation tensor at each width: its clipping
    ``thresholds`` (bits -> ``T``, from its calibration statistics and clip rule) and whether
    it is ``signed``; :meth:`apply` is that quantizer, back to reals."""

    thresholds: Mapping[int, float]
    signed: bool

    def apply(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        """``s * clamp(floor(x / s + 1/2), lo, hi)`` with ``s = T / qmax``: the lowering's
        round-half-up quantizer of this tensor at ``bits``."""
        qmax = (1 << (bits - 1)) - 1 if self.signed else (1 << bits) - 1
        lo = -qmax - 1 if self.signed else 0
        scale = self.thresholds[bits] / qmax
        q = torch.clamp(torch.floor(x.double() / scale + 0.5), lo, qmax)
        return (q * scale).to(x.dtype)


def activation_perturbations(
    graph: Graph,
    batches: Sequence[Batch],
    quantizers: Mapping[str, ActivationQuantizer],
    candidates: Sequence[int],
    *,
    loss: str = "kl",
    progress: bool | None = None,
) -> dict[str, dict[int, float]]:
    """``Ω_t(a)``: the mean ``loss`` over ``batches`` with only activation ``t`` (a value name
    of ``quantizers``) quantized to ``a`` bits by its calibrated quantizer, weights and every
    other tensor float. Clipping and rounding both count, as the deployed model sees them."""
    _need_batches(batches)
    with torch.no_grad():
        references = [run_torch(graph, batch) for batch in batches]
        losses = [make_loss(graph, ref, loss) for ref in references]
        out: dict[str, dict[int, float]] = {}
        with tqdm(
            total=len(quantizers) * len(candidates),
            desc="activation sensitivity",
            disable=not show_progress(progress),
            file=sys.stderr,
        ) as bar:
            for name, quantizer in quantizers.items():
                out[name] = {}
                for a in candidates:
                    change = {name: lambda x, a=a, qz=quantizer: qz.apply(x, a)}
                    values = [
                        float(fn(run_torch(graph, batch, transform=change)))
                        for fn, batch in zip(losses, batches)
                    ]
                    out[name][a] = max(math.fsum(values) / len(values), 0.0)
                    bar.update(1)
    return out


__all__ = [
    "LOSSES",
    "ActivationQuantizer",
    "activation_perturbations",
    "TraceEstimate",
    "direct_perturbations",
    "fake_quantized",
    "hessian_perturbations",
    "hessian_traces",
    "make_loss",
    "weight_error",
]
