"""``calibration="auto"``: choose each tensor's clipping rule by the error it causes downstream.

No single clipping rule suits every model: ImageNet MobileNetV2 wants a percentile,
EfficientNet-Lite0 min/max, a random-weight network the MSE clip. The tensor's own squared
error (what ``mse`` minimises) is a poor judge, because what matters is how the error moves
the layers that read the tensor: a clipped outlier that a convolution multiplies by a large
weight costs more than many small rounding errors spread over channels it averages.

:class:`AutoClip` runs after ``calibrate``. For every calibrated float tensor it measures,
on half of a few calibration batches (a reservoir, :data:`AUTO_BATCHES`), each candidate rule of
:data:`~intq.passes.calibration.AUTO_CANDIDATES`: the tensor is quantized and dequantized at
the candidate's threshold (at the width and signedness the lowering will give it), each
consumer node is evaluated on it with its other inputs in float, and the candidate's cost is
the sum over consumers and batches of the relative squared error of the consumer's output
(``sum (y_q - y)^2 / sum y^2`` per batch); a graph output also counts its own relative error. The
cheapest candidate wins (ties go to the earlier candidate, min/max first).

Choosing tensor by tensor is greedy, so the model as a whole has the last word, on the other
half of the batches (judged on the batches it was fitted to, the per-tensor plan would look
better than it is): the integer graph of the per-tensor choices runs beside the integer
graphs of each single rule of :data:`_UNIFORM` (min/max, the 99.99 percentile, MSE) for
every tensor, and the plan whose outputs are closest to the float ones (cosine distance,
summed over batches and outputs: the measure the benchmarks report) is stored on the graph
as :class:`~intq.passes.calibration.ClipChoices` for ``integerize``. So ``auto`` is at worst
the best single rule on those batches, and better where the per-tensor choices help.

Memory stays bounded: one batch's live tensors at a time, plus per tensor and candidate one
running sum. The work is one consumer evaluation per distinct candidate threshold, four
lowerings, and four integer forward passes per reservoir batch.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field, replace
from typing import ClassVar, Final

import numpy as np
from tqdm import tqdm

from intq.errors import IntqError, PassError
from intq.ir.graph import Graph, Value
from intq.passes.calibration import (
    AUTO_CANDIDATES,
    CalibrationStats,
    ClipChoices,
    ClipRule,
    TensorStats,
    qmax,
)
from intq.passes.integer_lowering import Lowering, is_wide, provably_non_negative
from intq.passes.integer_rules import LOWERINGS
from intq.passes.integerize import Integerize
from intq.passes.manager import Pass
from intq.progress import show_progress
from intq.semantics.feeds import check_feeds
from intq.semantics.numpy_eval import evaluate, run_graph

Batch = Mapping[str, np.ndarray]

AUTO_BATCHES: Final = 16
"""How many calibration batches (a uniform reservoir sample) ``auto`` uses: half to choose
each tensor's rule, half to judge the choices against single rules."""

_UNIFORM: Final = (ClipRule("minmax"), ClipRule("percentile", 99.99), ClipRule("mse"))
"""The single rules the per-tensor choices must beat on the model's outputs, or give way to."""

# Candidate thresholds closer than this (relatively) give the same quantization grid for
# practical purposes: measured once.
_SAME_THRESHOLD: Final = 1e-3


def reservoir(
    batches: Iterable[Batch], size: int = AUTO_BATCHES, seed: int = 0
) -> tuple[Iterable[Batch], list[Batch]]:
    """``batches`` to read once as before, and a list that holds, once they were read, a
    uniform sample of ``size`` of them (Algorithm R, seeded: the same data, the same sample).

    A sized collection is sampled at once and passed through unchanged (so its length still
    shows in progress bars); any other iterable is wrapped in a generator that fills the
    list as it goes, keeping at most ``size`` batches in memory.
    """
    rng = np.random.default_rng(seed)
    if isinstance(batches, Sized) and isinstance(batches, Sequence):
        count = len(batches)
        picks = sorted(rng.choice(count, size=min(size, count), replace=False).tolist())
        return batches, [batches[i] for i in picks]
    kept: list[Batch] = []

    def tee() -> Iterator[Batch]:
        for index, batch in enumerate(batches):
            if index < size:
                kept.append(batch)
            else:
                slot = int(rng.integers(0, index + 1))
                if slot < size:
                    kept[slot] = batch
            yield batch

    return tee(), kept


def fake_quantize(x: np.ndarray, threshold: float, bits: int, signed: bool) -> np.ndarray:
    """``x`` quantized symmetrically to ``bits`` at clipping ``threshold`` and dequantized,
    in ``x``'s dtype: what the integer graph's value stands for."""
    top = qmax(bits, signed)
    scale = threshold / top
    q = np.clip(np.rint(x / scale), -top if signed else 0, top)
    return (q * scale).astype(x.dtype, copy=False)


@dataclass
class _Candidates:
    """One tensor's distinct candidate thresholds and their accumulated costs."""

    bits: int
    signed: bool
    rules: list[list[ClipRule]]  # rules[k]: the candidates giving thresholds[k]
    thresholds: list[float]
    cost: np.ndarray = field(init=False)  # [k]: sum over batches and consumers

    def __post_init__(self) -> None:
        self.cost = np.zeros(len(self.thresholds))

    def add(self, reference: np.ndarray, outputs: Sequence[np.ndarray]) -> None:
        """Add one consumer's relative squared error on one batch, for each threshold's
        ``outputs``: per batch, so that a batch of large values does not outvote the rest
        (what a per-sample measure such as cosine or top-1 agreement sees)."""
        ref = reference.astype(np.float64, copy=False)
        signal = max(float(np.sum(ref * ref)), np.finfo(np.float64).tiny)
        for k, out in enumerate(outputs):
            diff = out.astype(np.float64, copy=False) - ref
            self.cost[k] += float(np.sum(diff * diff)) / signal

    def best(self) -> ClipRule:
        """The cheapest rule (the first of equals; a consumer that overflowed to Inf or NaN on
        a candidate rules it out)."""
        return self.rules[int(np.argmin(np.nan_to_num(self.cost, nan=np.inf)))][0]


@dataclass(frozen=True)
class AutoClip(Pass):
    """Choose each calibrated tensor's clipping rule among
    :data:`~intq.passes.calibration.AUTO_CANDIDATES` by its consumers' output error on
    ``batches`` (a few calibration batches, :func:`reservoir`); stores
    :class:`~intq.passes.calibration.ClipChoices` for ``integerize``. Changes nothing in
    the graph. ``lowering`` gives each tensor's width, as the lowering will; ``progress`` as
    for :func:`~intq.passes.calibration.collect_stats`."""

    name: ClassVar[str] = "auto-clip"
    batches: Sequence[Batch] = field(default=(), repr=False, compare=False)
    lowering: Integerize | None = field(default=None, repr=False, compare=False)
    progress: bool | None = None

    def requires(self, graph: Graph) -> None:
        if graph.analysis(CalibrationStats) is None:
            raise PassError(
                "auto-clip chooses among thresholds of the calibration statistics: run the"
                " calibrate pass first"
            )

    def apply(self, graph: Graph) -> bool:
        stats = graph.analysis(CalibrationStats)
        assert stats is not None
        scaled = self._scaled_values(graph, stats)
        candidates = {v: self._candidates(graph, v, s) for v, s in stats.items() if v in scaled}
        measured = {v: c for v, c in candidates.items() if len(c.thresholds) > 1}
        show = show_progress(self.progress)
        # Choose on half the batches, judge on the other half: judged on the batches it was
        # fitted to, the per-tensor plan would look better than it is.
        choose = list(self.batches[::2])
        judge = list(self.batches[1::2]) or choose
        with tqdm(
            total=len(choose) + len(judge),
            desc="choosing clips",
            disable=not show,
            file=sys.stderr,
            unit="batch",
        ) as bar:
            for batch in choose:
                self._measure(graph, batch, measured)
                bar.update()
            local = {v: c.best() if v in measured else c.rules[0][0] for v, c in candidates.items()}
            # The whole model's outputs judge the per-tensor choices against each rule alone.
            plans = [local, *({v: rule for v in candidates} for rule in _UNIFORM)]
            options = replace(self.lowering or Integerize(), calibration="auto")
            lowered = [Lowering(graph, stats, options, None, p).run(LOWERINGS) for p in plans]
            cost = np.zeros(len(plans))
            for batch in judge:
                cost += self._plan_errors(graph, batch, lowered)
                bar.update()
        best = plans[int(np.argmin(np.nan_to_num(cost, nan=np.inf)))]
        choices = {v: best.get(v, AUTO_CANDIDATES[0]) for v in stats}
        graph.store_analysis(ClipChoices(choices))
        return False

    def _scaled_values(self, graph: Graph, stats: Mapping[Value, TensorStats]) -> set[Value]:
        """The tensors the lowering gives a calibrated scale (a dry lowering, without data:
        a conv's output that a ReLU clamps is never quantized itself); all calibrated ones
        when the dry lowering fails (``integerize`` then reports why)."""
        options = replace(self.lowering or Integerize(), calibration="minmax")
        dry = Lowering(graph, stats, options)
        try:
            dry.run(LOWERINGS)
        except IntqError:
            return set(stats)
        return set(dry.clips)

    @staticmethod
    def _plan_errors(graph: Graph, batch: Batch, lowered: Sequence[Graph]) -> np.ndarray:
        """Per integer graph in ``lowered`` (one per plan), the cosine distance (``1 - cos``,
        summed over outputs) of its outputs to the float graph's on ``batch``: the real
        lowering, weights, fused activations and shared scales included."""
        feeds = check_feeds(graph.inputs, batch)
        reference = run_graph(graph, feeds)
        errors = np.zeros(len(lowered))
        for k, int_graph in enumerate(lowered):
            got = run_graph(int_graph, feeds)
            for name, want in reference.items():
                errors[k] += _cosine_distance(got[name], want)
        return errors

    def _candidates(self, graph: Graph, value: Value, stats: TensorStats) -> _Candidates:
        """The distinct thresholds of the candidates at the width and sign the lowering gives
        ``value`` (an input is unsigned when no calibration value was negative)."""
        producer = value.producer
        bits = 8
        if self.lowering is not None:
            bits = self.lowering.bits(producer.name if producer else value.name).activations
            if is_wide(value) and self.lowering.widened(producer.name if producer else value.name):
                bits = max(bits, self.lowering.wide_bits)
        signed = stats.min < 0 if producer is None else not provably_non_negative(value)
        rules: list[list[ClipRule]] = []
        thresholds: list[float] = []
        for rule in AUTO_CANDIDATES:
            t = rule.threshold(stats, bits, signed)
            for k, seen in enumerate(thresholds):
                if abs(t - seen) <= _SAME_THRESHOLD * max(t, seen):
                    rules[k].append(rule)
                    break
            else:
                rules.append([rule])
                thresholds.append(t)
        return _Candidates(bits, signed, rules, thresholds)

    def _measure(self, graph: Graph, batch: Batch, measured: Mapping[Value, _Candidates]) -> None:
        """Run ``graph`` on one batch, adding every candidate's consumer errors."""
        env: dict[Value, np.ndarray] = {}
        feeds = check_feeds(graph.inputs, batch)
        for value in graph.inputs:
            env[value] = feeds[value.name]
        remaining: dict[Value, int] = {}
        for node in graph.nodes:
            for operand in node.inputs:
                if operand is not None and not operand.is_const:
                    remaining[operand] = remaining.get(operand, 0) + 1
        outputs = set(graph.outputs)
        for value in graph.inputs:
            if value in measured and value in outputs:
                self._own_error(measured[value], env[value])
        for node in graph.nodes:
            args = [None if v is None else (v.const if v.is_const else env[v]) for v in node.inputs]
            results = evaluate(node, args)
            for value, array in zip(node.outputs, results):
                env[value] = array
                if value in measured and value in outputs:
                    self._own_error(measured[value], array)
            seen: set[Value] = set()
            for operand in node.inputs:
                if operand is None or operand not in measured or operand in seen:
                    continue
                seen.add(operand)  # an operand read twice (x * x) is quantized in both places
                cand = measured[operand]
                trials = []
                for t in cand.thresholds:
                    q = fake_quantize(env[operand], t, cand.bits, cand.signed)
                    trial = [q if v is operand else a for v, a in zip(node.inputs, args)]
                    trials.append(evaluate(node, trial)[0])
                cand.add(results[0], trials)
            for operand in node.inputs:
                if operand is None or operand.is_const:
                    continue
                remaining[operand] -= 1
                if remaining[operand] == 0 and operand not in outputs:
                    del env[operand]

    @staticmethod
    def _own_error(cand: _Candidates, array: np.ndarray) -> None:
        """A graph output's own relative error counts as one more consumer's."""
        cand.add(array, [fake_quantize(array, t, cand.bits, cand.signed) for t in cand.thresholds])


def _cosine_distance(got: np.ndarray, want: np.ndarray) -> float:
    a, b = got.ravel().astype(np.float64), want.ravel().astype(np.float64)
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms == 0.0:
        return 0.0 if np.array_equal(a, b) else 1.0
    return 1.0 - float(a @ b) / norms


__all__ = ["AUTO_BATCHES", "AutoClip", "fake_quantize", "reservoir"]
