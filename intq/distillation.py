"""Quantized distillation: train the integer model to follow its FP32 teacher, without labels.

    config = intq.QuantConfig(weight_bits=4, distill=intq.DistillConfig(steps=200))
    int_graph = intq.quantize(graph, unlabelled_batches, config)

After post-training quantization, the student (the integer model) is trained on the
teacher's (the float model's) outputs over the unlabelled calibration data (Polino et al.,
"Model compression via distillation and quantization"): its float weights and biases, and
its quantization step sizes (activation thresholds and per-channel weight steps, as in LSQ)
are learned with a straight-through estimator. The trained model is then lowered again by
the very lowering that made it (:class:`intq.passes.integerize.Integerize`), proved by the
range analysis and checked integer-only: the result is an ordinary integer graph, bit exact
on every backend.

The forward pass of training *is* the integer model: every step lowers the current
parameters and runs the integer graph in the reference interpreter; each activation the
lowering quantizes takes, in the torch graph that carries the gradients, exactly the integer
value times its scale (:mod:`intq.distill_training`, and ``docs/distillation.md`` for why).

The torch part is imported on first use: ``import intq`` does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from intq.errors import IntqError, NumericsError
from intq.ir.graph import Graph, Value
from intq.passes import CheckIntegerOnly, PassManager, RangeAnalysis, Verify
from intq.passes.calibration import MIN_THRESHOLD, CalibrationStats
from intq.passes.integerize import Integerize
from intq.passes.model_quantization import ModelQuantization, WeightScales

DISTILL_LOSSES = ("kl", "mse", "cosine")
"""``kl``: temperature-scaled KL to the teacher's softmax (classifiers); ``mse`` (relative
to the teacher's mean square) and ``cosine`` (one minus the cosine along the last axis):
embeddings and other real-valued outputs."""

TRAINABLE = ("weights", "scales", "rounding")
"""What distillation may train: ``weights`` (float weights and biases, through the STE),
``scales`` (activation thresholds and weight steps, LSQ), ``rounding`` (the rounding direction
of each weight, the weights themselves kept: AdaRound's search space, by the same STE)."""


@dataclass(frozen=True)
class DistillConfig:
    """How to distill (see :mod:`intq.distillation`).

    ``steps`` optimizer steps, each on ``batch`` of the model's own batches (accumulated;
    under ``torchrun`` split between the processes, so ``batch`` must divide by their
    number). Adam, with learning rate ``lr`` for weights and biases, ``scale_lr`` for the
    logarithms of the step sizes and ``rounding_lr`` for the rounding variables.
    ``loss``: one of :data:`DISTILL_LOSSES`; ``temperature`` for ``kl``. ``train``: a
    subset of :data:`TRAINABLE` (``weights`` and ``rounding`` exclude each other).

    ``holdout`` of the batches (at least one) is never trained on: every ``eval_every``
    steps the integer model's agreement with the teacher on it (top-1 for ``kl``, mean
    cosine otherwise) is measured, and the best parameters are the result (ties go to the
    lower held-out loss; the post-training model when no step beats it). ``checkpoint`` (a
    file path) is written every ``checkpoint_every`` steps; ``resume`` continues from it.
    ``seed`` fixes the split and the order of the batches, so a resumed run ends where an
    uninterrupted one does. ``progress``: a bar with the running loss (``None``: when
    standard error is a terminal). ``threads``: torch's intra-op threads and (where
    ``threadpoolctl`` is installed) numpy's BLAS threads while training (``None``: their
    settings); one is fastest for small models on a busy machine.
    """

    steps: int = 200
    lr: float = 1e-5
    scale_lr: float = 1e-3
    rounding_lr: float = 1e-2
    loss: str = "kl"
    temperature: float = 2.0
    train: tuple[str, ...] = ("weights", "scales")
    batch: int = 4
    holdout: float = 0.25
    eval_every: int = 25
    checkpoint: str | Path | None = None
    checkpoint_every: int = 50
    resume: bool = False
    seed: int = 0
    progress: bool | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.loss not in DISTILL_LOSSES:
            raise IntqError(
                f"unknown distillation loss {self.loss!r}",
                hint=f"use one of {', '.join(DISTILL_LOSSES)}",
            )
        train = tuple(self.train)
        unknown = sorted(set(train) - set(TRAINABLE))
        if unknown or not train:
            raise IntqError(
                f"distillation cannot train {unknown or 'nothing'}",
                hint=f"train is a non-empty subset of {', '.join(TRAINABLE)}",
            )
        if "weights" in train and "rounding" in train:
            raise IntqError(
                "train names both 'weights' and 'rounding'",
                hint="'weights' learns the weights (and so their rounding); 'rounding' keeps"
                " the weights and learns only which way each rounds: choose one",
            )
        object.__setattr__(self, "train", train)
        if self.steps < 0:
            raise IntqError(f"DistillConfig.steps must be at least 0, got {self.steps}")
        for name in ("batch", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise IntqError(
                    f"DistillConfig.{name} must be at least 1, got {getattr(self, name)}"
                )
        if not 0 < self.holdout < 1:
            raise IntqError(f"DistillConfig.holdout must be in (0, 1), got {self.holdout}")
        if self.lr <= 0 or self.scale_lr < 0 or self.temperature <= 0:
            raise IntqError("DistillConfig: lr and temperature must be positive, scale_lr >= 0")
        if self.resume and self.checkpoint is None:
            raise IntqError(
                "resume needs the checkpoint to resume from",
                hint="give checkpoint=PATH (--checkpoint PATH), the file an earlier run wrote",
            )


@dataclass(frozen=True)
class LearnedRange:
    """A learned activation range, in the shape of the lowering's ``Stats``: ``clip`` returns
    the learned threshold whatever the calibration method (``scale = threshold / qmax``);
    ``min`` is the calibrated minimum, which decides an input's signedness."""

    min: float
    threshold: float

    def top(self, signed: bool) -> float:
        """The range's end: the learned threshold stands for the data's largest magnitude."""
        return self.threshold

    def clip(self, method: str, bits: int, signed: bool, percentile: float = 99.99) -> float:
        """The learned threshold (the method does not apply: training chose it)."""
        return max(self.threshold, MIN_THRESHOLD)


@dataclass(frozen=True)
class Parameters:
    """The trained state as the lowering reads it, by float value name: the float weights and
    biases (``weights``), each activation's threshold (``thresholds``) and each layer
    weight's per-channel steps with their axis and width (``steps``)."""

    weights: Mapping[str, Any]
    thresholds: Mapping[str, float]
    minimums: Mapping[str, float]
    steps: Mapping[str, tuple[tuple[float, ...], int, int]]

    def apply(self, prepared: Graph) -> Graph:
        """A copy of the prepared float graph with these weights, carrying these ranges
        (:class:`CalibrationStats` of :class:`LearnedRange`) and weight steps (as a
        pre-quantized model's :class:`ModelQuantization`), ready for ``integerize``."""
        graph = prepared.copy()
        for name, array in self.weights.items():
            value = graph.find(name)
            assert value is not None and value.const is not None
            value.const = array
        ranges: dict[Value, LearnedRange] = {}
        for name, threshold in self.thresholds.items():
            value = graph.find(name)
            assert value is not None
            ranges[value] = LearnedRange(self.minimums[name], threshold)
        steps: dict[Value, WeightScales] = {}
        for name, (scales, axis, bits) in self.steps.items():
            value = graph.find(name)
            assert value is not None
            steps[value] = WeightScales(bits, scales, axis)
        graph.store_analysis(CalibrationStats(ranges))  # type: ignore[arg-type]
        graph.store_analysis(ModelQuantization(steps))
        return graph


def learned_lowering(lowering: Integerize) -> Integerize:
    """The lowering options for trained parameters: the thresholds are the learned ones (no
    clipping rule applies), bias correction is off (training moved the biases itself) and
    weights round to nearest (the trained weights are the rounding's result)."""
    return replace(lowering, calibration="minmax", bias_correction=False, rounding="nearest")


def reintegerize(prepared: Graph, params: Parameters, lowering: Integerize) -> Graph:
    """The integer graph of the trained ``params``: the lowering, the overflow proof (which
    refuses, naming the layer, a learned scale whose integers could overflow), the
    integer-only check and the verifier, as ``intq.quantize`` runs them."""
    options = learned_lowering(lowering)
    manager = PassManager(
        [options, RangeAnalysis(), CheckIntegerOnly(allow_division=options.divides), Verify()]
    )
    try:
        return manager(params.apply(prepared)).graph
    except NumericsError as err:
        raise NumericsError(
            f"the distilled model cannot be proved: {err.message}",
            node=err.node,
            hint="its learned weight steps make this layer's integers too large: distill with a"
            " smaller scale_lr, or without 'scales' in train (the post-training steps stay)"
            + (f"; or {err.hint}" if err.hint else ""),
        ) from None


@dataclass
class DistillHistory:
    """What a distillation run measured: ``(step, mean training loss)`` per step and
    ``(step, held-out agreement)`` per evaluation (top-1 agreement for ``kl``, mean cosine
    otherwise; step 0 is the post-training model); ``best_step`` is the step whose
    parameters were kept. Stored on the distilled integer graph."""

    metric: str
    losses: list[tuple[int, float]] = field(default_factory=list)
    evaluations: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0
    seconds: float = 0.0

    @property
    def baseline(self) -> float:
        """The post-training model's held-out agreement."""
        return self.evaluations[0][1]

    @property
    def best(self) -> float:
        """The kept parameters' held-out agreement."""
        return dict(self.evaluations)[self.best_step]


def distill_prepared(
    prepared: Graph,
    batches: Sequence[Mapping[str, Any]],
    lowering: Integerize,
    config: DistillConfig,
    *,
    stats: Mapping[Value, Any],
    choices: Mapping[Value, Any] | None = None,
    start: Graph | None = None,
) -> Graph:
    """Distill the integer lowering of the prepared float graph ``prepared`` against
    ``prepared`` itself on ``batches`` (the model's batch shapes); returns the re-integerized
    graph, carrying its :class:`DistillHistory`.

    The starting point is the lowering of ``prepared`` with its calibration ``stats`` and
    ``auto``'s ``choices``; where ``start`` (the post-training integer graph) is given, its
    scales win for the values it has under the same names.
    """
    from intq.distill_training import train

    batches = list(batches)
    if len(batches) < 2:
        raise IntqError(
            f"distillation needs at least 2 batches of data (one held out), got {len(batches)}",
            hint="pass more unlabelled samples, or drop distill",
        )
    params, history = train(prepared, batches, lowering, config, stats, choices, start)
    graph = reintegerize(prepared, params, lowering)
    graph.store_analysis(history)
    return graph


def distill_graph(
    graph: Graph,
    int_graph: Graph,
    batches: Sequence[Mapping[str, Any]],
    config: DistillConfig,
    lowering: Integerize,
) -> Graph:
    """Distill ``int_graph``, the post-training lowering of the float ``graph`` with
    ``lowering``'s options, on ``batches``; the core of :func:`intq.distill`.

    ``graph`` is cleaned up as ``intq.quantize`` does and calibrated on ``batches`` (for the
    values ``int_graph`` does not name); each layer keeps the weight width ``int_graph``
    gives it (so a mixed-precision plan stays as it is), and ``int_graph``'s scales are the
    starting point.
    """
    from intq.passes import PREPARE, Calibrate, pipeline
    from intq.passes.precision import LayerBits, quantizable_layers

    prepared = graph.copy()
    pipeline(PREPARE)(prepared)
    batches = list(batches)
    Calibrate(batches, config.progress)(prepared)
    stats = prepared.analysis(CalibrationStats)
    assert stats is not None
    layer_bits = dict(lowering.layer_bits)
    for layer in quantizable_layers(prepared):
        weight = int_graph.find(layer.weight)
        quant = weight.type.quant if weight is not None and weight.is_const else None
        if quant is not None and layer.name not in layer_bits:
            layer_bits[layer.name] = LayerBits(quant.bits, lowering.bits(layer.name).activations)
    options = replace(lowering, layer_bits=layer_bits)
    return distill_prepared(prepared, batches, options, config, stats=stats, start=int_graph)


__all__ = [
    "DISTILL_LOSSES",
    "TRAINABLE",
    "DistillConfig",
    "DistillHistory",
    "LearnedRange",
    "Parameters",
    "distill_graph",
    "distill_prepared",
    "learned_lowering",
    "reintegerize",
]
