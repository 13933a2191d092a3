"""Calibration: streaming value statistics of a float graph, and clipping thresholds from them.

:func:`collect_stats` runs the float graph in the reference interpreter over
calibration batches and feeds every tensor of interest into a
:class:`TensorStats`. A :class:`TensorStats` keeps min, max, count and a
fixed-size histogram of ``|x|``, so its memory does not grow with the number
of samples, and :meth:`TensorStats.clip` turns it into the clipping threshold
``T`` of symmetric quantization (``scale = T / qmax``) by min/max, a
percentile, or the threshold of least expected squared error.

The histogram covers ``[0, upper]`` with ``upper`` a power of two and a
power-of-two number of bins, so every bin edge is exact in binary: when a
batch exceeds ``upper`` the range doubles and pairs of bins merge, and the
result is bit-identical to binning all the data at the final range at once.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import ClassVar, Final

import numpy as np
from tqdm import tqdm

from intq.errors import IntqError, NumericsError
from intq.ir.graph import Graph, Node, Value, ValueMap
from intq.passes.bias_correction import MeanInputs
from intq.passes.learned_rounding import GramInputs
from intq.passes.manager import Pass
from intq.progress import show_progress
from intq.semantics.feeds import check_feeds
from intq.semantics.numpy_eval import run_graph

CLIP_METHODS: Final = ("minmax", "percentile", "mse")
"""The clipping methods :meth:`TensorStats.clip` accepts."""

CALIBRATION_METHODS: Final = ("auto", *CLIP_METHODS)
"""The calibration methods ``QuantConfig`` accepts: ``auto`` picks one of :data:`CLIP_METHODS`
per tensor (:mod:`intq.passes.auto_clip`)."""

DEFAULT_BINS: Final = 2048
"""Histogram bins of a :class:`TensorStats` unless told otherwise."""

MIN_THRESHOLD: Final = 1e-8
"""The smallest threshold :meth:`TensorStats.clip` returns, so a constant-zero tensor still
gets a valid (positive) scale. A tensor whose data are not all zero but stay below it is
refused by the integer lowering, naming it: every value would quantize to 0."""

# The MSE search starts at this fraction of the range: below it, a threshold spans so few
# histogram bins that the bins cannot tell the rounding error apart from the clipping error.
_MSE_MIN_FRACTION: Final = 2.0**-8


def qmax(bits: int, signed: bool) -> int:
    """The largest integer of a ``bits``-wide symmetric range: ``2^(b-1)-1`` or ``2^b-1``."""
    top = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    if not 1 <= bits <= 64 or top < 1:
        kind = "signed" if signed else "unsigned"
        raise IntqError(f"cannot quantize to {bits} {kind} bits: the range holds no positive value")
    return top


def _pow2_ceil(value: float) -> float:
    """The smallest power of two ``>= value`` (``value > 0``)."""
    mantissa, exponent = math.frexp(value)
    if exponent > 1023:
        raise NumericsError(f"values of magnitude {value:g} are too large to calibrate")
    return value if mantissa == 0.5 else math.ldexp(1.0, exponent)


class TensorStats:
    """Streaming statistics of one float tensor over many batches, in constant memory.

    Keeps min, max, the element count, the count of exact zeros and a histogram
    of ``|x|`` (positive and negative values apart, so unsigned tensors can
    drop the negative side) with ``bins`` bins over ``[0, upper]``. Bin 0 is
    ``[0, w]`` and bin ``i`` is ``(i*w, (i+1)*w]`` with ``w = upper / bins``.
    """

    __slots__ = ("_bins", "_count", "_max", "_min", "_neg", "_pos", "_upper", "_zeros")

    def __init__(self, bins: int = DEFAULT_BINS):
        # A power of two keeps every bin edge exact, so merging bins equals re-binning.
        # At most 2^20 keeps bin numbers exact in float32 (update relies on that).
        if not 2 <= bins <= 2**20 or bins & (bins - 1):
            raise IntqError(f"histogram bins must be a power of two in [2, 2^20], got {bins}")
        self._bins = bins
        self._pos = np.zeros(bins, np.int64)  # x >= 0, by |x|
        self._neg = np.zeros(bins, np.int64)  # x < 0, by |x|
        self._zeros = 0
        self._count = 0
        self._min = math.inf
        self._max = -math.inf
        self._upper = 0.0  # 0 until a non-zero value arrives; all counts sit in bin 0 till then

    # ----- accumulating --------------------------------------------------------

    def update(self, array: np.ndarray) -> None:
        """Add the values of ``array`` (any shape) to the statistics.

        Raises :class:`NumericsError` on NaN or Inf, leaving the statistics unchanged.
        """
        a = np.atleast_1d(array)  # a rank-0 tensor's arithmetic would give numpy scalars
        if a.dtype.kind not in "fiub":
            raise IntqError(f"cannot calibrate an array of dtype {a.dtype}")
        if a.size == 0:
            return
        # Any layout: elementwise work keeps it, and only the final bin numbers are flattened.
        x = a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise NumericsError(
                "calibration data contains NaN or Inf",
                hint="clean the data (e.g. np.nan_to_num) or drop the sample",
            )
        peak = max(-lo, hi)
        if peak > self._upper:
            self._grow(_pow2_ceil(peak))
        bins = self._bins
        if self._upper == 0.0:
            self._pos[0] += x.size  # all zeros so far: bin 0 at any range
            self._zeros += x.size
        else:
            # x * bins / upper is exact, as that factor is a power of two; float32 holds it
            # unless the range is tiny, and then float64 does. A product that underflows is
            # below one bin either way.
            factor = bins / self._upper
            narrow = x.dtype == np.float32 and factor < 2.0**127
            dtype = np.dtype(np.float32 if narrow else np.float64)
            # Bin i holds |x| in (i*w, (i+1)*w], bin 0 holds 0 too. One bincount does both
            # signs: ceil(|s|) carries the sign of x, offset by bins, so -k -> bins - k and
            # +k -> bins + k (0 and -0 -> bins); bins keeps every integer exact in float32.
            # In place, as big temporaries cost page faults as much as arithmetic.
            code = np.multiply(x, np.array(factor, dtype), dtype=dtype)
            np.abs(code, out=code)
            np.ceil(code, out=code)
            np.copysign(code, x, out=code)
            code += bins
            index = code.astype(np.intp).ravel(order="K")  # a view: astype kept the layout
            counts = np.bincount(index, minlength=2 * bins + 1)
            self._pos[1:] += counts[bins + 2 :]
            self._pos[0] += counts[bins] + counts[bins + 1]
            self._neg += counts[bins - 1 :: -1]
            # Code `bins` is exact zeros, and values that underflowed below 2^-149 of a bin:
            # zero at any resolution a quantizer can have. Cheaper than counting them apart.
            self._zeros += int(counts[bins])
        self._count += x.size
        self._min = min(self._min, lo)
        self._max = max(self._max, hi)

    def _grow(self, upper: float) -> None:
        """Widen the range to ``upper`` (a larger power of two), merging bins ``2^k`` at a time."""
        if self._upper > 0.0:
            shift = math.frexp(upper)[1] - math.frexp(self._upper)[1]
            self._pos = self._merge(self._pos, shift)
            self._neg = self._merge(self._neg, shift)
        self._upper = upper

    def _merge(self, hist: np.ndarray, shift: int) -> np.ndarray:
        out = np.zeros_like(hist)
        if (1 << shift) >= self._bins:
            out[0] = hist.sum()
        else:
            out[: self._bins >> shift] = hist.reshape(-1, 1 << shift).sum(axis=1)
        return out

    # ----- reading ---------------------------------------------------------------

    @property
    def count(self) -> int:
        """How many values were recorded."""
        return self._count

    @property
    def min(self) -> float:
        """The smallest value recorded."""
        self._require_data()
        return self._min

    @property
    def max(self) -> float:
        """The largest value recorded."""
        self._require_data()
        return self._max

    @property
    def absmax(self) -> float:
        """The largest magnitude recorded."""
        self._require_data()
        return max(-self._min, self._max)

    @property
    def zeros(self) -> int:
        """How many recorded values were zero (or below 2^-149 of a bin width: zero to any
        quantizer)."""
        return self._zeros

    @property
    def bins(self) -> int:
        """The number of histogram bins."""
        return self._bins

    @property
    def upper(self) -> float:
        """The histogram's range ``[0, upper]``: a power of two, 0 while every value was 0."""
        return self._upper

    @property
    def bin_width(self) -> float:
        """The width of one histogram bin."""
        return self._upper / self._bins

    @property
    def histogram(self) -> np.ndarray:
        """Counts of ``|x|`` per bin (a copy)."""
        return self._pos + self._neg

    def _require_data(self) -> None:
        if self._count == 0:
            raise IntqError(
                "no values recorded yet", hint="call update() with calibration data first"
            )

    def _side(self, signed: bool) -> tuple[np.ndarray, int, float]:
        """The histogram, exact-zero count and top of the values a quantizer sees.

        Unsigned tensors hold ReLU outputs: negatives can only be zero there, so they count
        as exact zeros.
        """
        if signed:
            return self._pos + self._neg, self._zeros, self.absmax
        negatives = int(self._neg.sum())
        hist = self._pos.copy()
        hist[0] += negatives
        return hist, self._zeros + negatives, max(0.0, self._max)

    def top(self, signed: bool) -> float:
        """The largest magnitude a ``signed`` (or unsigned: ``max(x, 0)``) quantizer sees."""
        self._require_data()
        return self.absmax if signed else max(0.0, self._max)

    # ----- thresholds --------------------------------------------------------------

    def clip(self, method: str, bits: int, signed: bool, percentile: float = 99.99) -> float:
        """The clipping threshold ``T`` of symmetric quantization: ``scale = T / qmax``.

        ``"minmax"`` is the largest magnitude; ``"percentile"`` that percentile of the
        magnitudes, interpolated within its histogram bin; ``"mse"`` the histogram bin edge
        minimising :meth:`expected_error`. Unsigned tensors use only ``max(x, 0)``. The
        result is always positive and finite, at least :data:`MIN_THRESHOLD`.
        """
        if method not in CLIP_METHODS:
            raise IntqError(
                f"unknown clipping method {method!r}",
                hint="use one of " + ", ".join(repr(m) for m in CLIP_METHODS),
            )
        top_q = qmax(bits, signed)
        if not 0.0 <= percentile <= 100.0:
            raise IntqError(f"percentile must be in [0, 100], got {percentile}")
        self._require_data()
        hist, zeros, top = self._side(signed)
        if top <= 0.0:
            return MIN_THRESHOLD
        if method == "minmax":
            threshold = top
        elif method == "percentile":
            threshold = self._percentile(hist, top, percentile)
        else:
            threshold = self._mse(hist, zeros, top, top_q)
        return max(float(threshold), MIN_THRESHOLD)

    def _percentile(self, hist: np.ndarray, top: float, percentile: float) -> float:
        cdf = np.cumsum(hist)
        total = int(cdf[-1])
        # The target rank t lies in bin b holding the ceil(t)-th smallest value; a t below
        # one still means that first value (0.5 keeps the division below away from empty bins).
        rank = min(max(percentile / 100.0 * total, 0.5), float(total))
        b = int(np.searchsorted(cdf, rank, side="left"))
        before = int(cdf[b - 1]) if b else 0
        width = self.bin_width
        return min(top, (b + (rank - before) / int(hist[b])) * width)

    def _mse(self, hist: np.ndarray, zeros: int, top: float, top_q: int) -> float:
        width = self.bin_width
        edges = np.arange(1, self._bins + 1) * width
        edges = edges[(edges >= top * _MSE_MIN_FRACTION) & (edges < top)]
        candidates = np.append(edges, top)
        errors = self._errors(candidates, hist, zeros, top, top_q)
        return float(candidates[int(np.argmin(errors))])

    def expected_error(self, threshold: float, bits: int, signed: bool) -> float:
        """The mean squared quantization error the histogram predicts for ``threshold``.

        Each bin stands for its centre (at most the top value): a value ``v <= T`` costs
        ``scale^2 / 12`` of rounding (exact zeros cost nothing), one above costs ``(v - T)^2``
        of clipping. This is what ``clip("mse", ...)`` minimises.
        """
        self._require_data()
        hist, zeros, top = self._side(signed)
        errors = self._errors(np.array([float(threshold)]), hist, zeros, top, qmax(bits, signed))
        return float(errors[0])

    def _errors(
        self, thresholds: np.ndarray, hist: np.ndarray, zeros: int, top: float, top_q: int
    ) -> np.ndarray:
        """:meth:`expected_error` of every threshold at once: O(bins + thresholds)."""
        # Exact zeros form a leading pseudo-bin at 0 of their own: never clipped, never rounded.
        centres = np.minimum((np.arange(self._bins) + 0.5) * self.bin_width, top)
        reps = np.concatenate(([0.0], centres))
        counts = np.concatenate(([float(zeros)], hist.astype(np.float64)))
        counts[1] -= zeros
        rounding = counts.copy()
        rounding[0] = 0.0
        inside_sums = np.concatenate(([0.0], np.cumsum(rounding)))  # [j]: sum over reps[:j]

        def suffix(v: np.ndarray) -> np.ndarray:
            # [j]: sum over reps[j:], summed from the end rather than as total - prefix: the
            # tail is often tiny next to the total, and the subtraction would cancel it away.
            return np.append(np.cumsum(v[::-1])[::-1], 0.0)

        s0, s1, s2 = suffix(counts), suffix(counts * reps), suffix(counts * reps * reps)
        t = np.asarray(thresholds, np.float64)
        j = np.searchsorted(reps, t, side="right")  # reps[:j] <= t < reps[j:]
        # sum over the tail of count * (rep - t)^2, expanded; rounding can dip just below 0.
        clipped = np.maximum(s2[j] - 2.0 * t * s1[j] + t * t * s0[j], 0.0)
        inside = inside_sums[j]
        scale = t / top_q
        return (inside * scale * scale / 12.0 + clipped) / self._count

    def __repr__(self) -> str:
        if self._count == 0:
            return "TensorStats(empty)"
        return (
            f"TensorStats(count={self._count}, min={self._min:g}, max={self._max:g},"
            f" upper={self._upper:g}, bins={self._bins})"
        )


# ----- collecting ---------------------------------------------------------------------------


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f"


def _nonfinite(array: np.ndarray) -> str | None:
    """``None`` when every value is finite, else which of NaN/Inf occur and how often."""
    finite = np.isfinite(array)
    if finite.all():
        return None
    nan = int(np.count_nonzero(np.isnan(array)))
    inf = int(array.size - np.count_nonzero(finite)) - nan
    parts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
    return " and ".join(p for p in parts if p)


def collect_stats(
    graph: Graph,
    batches: Iterable[Mapping[str, np.ndarray]],
    names: Collection[str] | None = None,
    *,
    progress: bool | None = None,
    observe: Callable[[Value, np.ndarray], None] | None = None,
) -> dict[str, TensorStats]:
    """Run the float ``graph`` over calibration ``batches``; return value name -> statistics.

    Each batch maps input names to arrays, as ``run`` takes them. Statistics are kept for the
    float graph inputs and for the node outputs named in ``names`` (every float node output
    when ``None``). ``batches`` is iterated once, lazily, so a generator works. A progress bar
    goes to stderr when ``progress`` is true, or when it is ``None`` and stderr is a terminal.
    ``observe(value, array)``, when given, sees every float input and node output of every
    batch (bias correction's mean inputs gather there).

    Raises :class:`IntqError` for no batches or an unknown name, :class:`NumericsError` for NaN
    or Inf in an input or an intermediate value (naming the batch and the node), and the
    interpreter's :class:`ShapeError` for mismatched inputs, with the batch index added.
    """
    tracked = _tracked_outputs(graph, names)
    tracked_set = set(tracked)
    inputs = [v for v in graph.inputs if _is_float(v.type.dtype.numpy)]
    stats: dict[str, TensorStats] = {v.name: TensorStats() for v in inputs}
    stats.update((name, TensorStats()) for name in tracked)
    float_outputs = {
        node: [(i, v.name) for i, v in enumerate(node.outputs) if _is_float(v.type.dtype.numpy)]
        for node in graph.nodes
    }
    total = len(batches) if isinstance(batches, Sized) else None
    show = show_progress(progress)
    index = -1

    def on_node(node: Node, outputs: Sequence[np.ndarray]) -> None:
        # Every float output is checked, tracked or not, so the error names the node where
        # the NaN or Inf first appears rather than some later reader of it.
        for i, name in float_outputs.get(node, ()):
            bad = _nonfinite(outputs[i])
            if bad is not None:
                raise NumericsError(
                    f"calibration batch {index}: output %{name} of {node.op} contains {bad}",
                    node=node.label(),
                    hint="the float model overflows or divides by zero on this batch: check"
                    " the batch's values and this node's inputs",
                )
            if name in tracked_set:
                stats[name].update(outputs[i])
            if observe is not None:
                observe(node.outputs[i], outputs[i])

    with tqdm(
        batches, desc="calibrating", total=total, disable=not show, file=sys.stderr, unit="batch"
    ) as bar:
        for index, batch in enumerate(bar):  # on_node reads index for its messages
            if not isinstance(batch, Mapping):
                raise IntqError(
                    f"calibration batch {index} is a {type(batch).__name__},"
                    " not a mapping of input name -> array",
                    hint="pass an iterable of dicts such as {'x': array}",
                )
            try:
                feeds = check_feeds(graph.inputs, batch)
                for value in inputs:
                    bad = _nonfinite(feeds[value.name])
                    if bad is not None:
                        raise NumericsError(
                            f"calibration batch {index}: input {value.name!r} contains {bad}",
                            hint="clean the calibration data (e.g. np.nan_to_num) or drop"
                            " the sample",
                        )
                    stats[value.name].update(feeds[value.name])
                    if observe is not None:
                        observe(value, feeds[value.name])
                run_graph(graph, feeds, on_node=on_node)
            except NumericsError:
                raise
            except IntqError as err:
                # Same type, node and hint, with the batch that triggered it.
                raise type(err)(
                    f"calibration batch {index}: {err.message}", node=err.node, hint=err.hint
                ) from err
    if index < 0:
        raise IntqError(
            "no calibration batches: the calibration data is empty",
            hint="pass at least one batch, a dict of input name -> array"
            " (a generator that was already consumed yields nothing)",
        )
    for name, tensor_stats in stats.items():
        if tensor_stats.count == 0:  # a zero-size dimension: no value to take a range from
            empty = graph.find(name)
            producer = empty.producer if empty is not None else None
            raise IntqError(
                f"the calibration batches give no values for %{name}: it has a zero-size"
                f" dimension ({empty.type if empty is not None else '?'})",
                node=producer.label() if producer is not None else None,
                hint="calibrate with samples that give every tensor at least one element",
            )
    return stats


@dataclass(frozen=True)
class ClipRule:
    """One way to turn a tensor's statistics into its clipping threshold: a
    :meth:`TensorStats.clip` method and, for ``percentile``, its percentile."""

    method: str
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.method not in CLIP_METHODS:
            raise IntqError(
                f"unknown clipping method {self.method!r}",
                hint="use one of " + ", ".join(repr(m) for m in CLIP_METHODS),
            )

    def threshold(self, stats: TensorStats, bits: int, signed: bool) -> float:
        """The clipping threshold this rule gives ``stats`` at ``bits`` bits."""
        return stats.clip(self.method, bits, signed, self.percentile)

    @property
    def label(self) -> str:
        """A short name for reports: ``minmax``, ``p99.99``, ``mse``."""
        return f"p{self.percentile:g}" if self.method == "percentile" else self.method


AUTO_CANDIDATES: Final = (
    ClipRule("minmax"),
    ClipRule("percentile", 99.9),
    ClipRule("percentile", 99.99),
    ClipRule("percentile", 99.999),
    ClipRule("mse"),
)
"""The rules ``calibration="auto"`` chooses among, per tensor; ties go to the first."""

AUTO_FALLBACK: Final = ClipRule("mse")
"""The rule ``auto`` uses for a tensor it could not measure (statistics without data)."""


class ClipChoices(ValueMap[ClipRule]):
    """The clipping rule of each tensor. On a float graph, what ``auto-clip`` chose
    (:class:`~intq.passes.auto_clip.AutoClip`); on an integer graph, the rule that set each
    calibrated value's scale (stored by ``integerize``, read by the layer table)."""


class CalibrationStats(ValueMap[TensorStats]):
    """The calibration statistics of a float graph's tensors, stored on the graph by
    :class:`Calibrate` for :class:`~intq.passes.integerize.Integerize`."""


@dataclass(frozen=True)
class Calibrate(Pass):
    """Run the float graph over the calibration ``batches`` (read once) and keep every float
    tensor's statistics on the graph (:class:`CalibrationStats`) for ``integerize``.

    Changes nothing in the graph. ``batches`` and ``progress`` are the arguments of
    :func:`collect_stats`; the batches are data, not an option a pipeline string can spell.
    ``corrects`` (a layer name -> bool, the lowering's :meth:`Integerize.corrects`) also keeps
    the mean inputs of the weighted layers it names
    (:class:`~intq.passes.bias_correction.InputMeans`) for ``integerize`` to correct their bias;
    ``learns`` (a layer name -> bool, the lowering's :meth:`Integerize.learns`) the Gram
    matrices of the inputs of the layers it names
    (:class:`~intq.passes.learned_rounding.InputGrams`) for ``learned-rounding``.
    """

    name: ClassVar[str] = "calibrate"
    batches: Iterable[Mapping[str, np.ndarray]] = field(default=(), repr=False, compare=False)
    progress: bool | None = None
    corrects: Callable[[str], bool] | None = field(default=None, repr=False, compare=False)
    learns: Callable[[str], bool] | None = field(default=None, repr=False, compare=False)

    def apply(self, graph: Graph) -> bool:
        corrects = self.corrects
        means = None
        if corrects is not None:
            means = MeanInputs(n for n in graph.nodes if corrects(n.label()))
        learns = self.learns
        grams = None
        if learns is not None:
            grams = GramInputs(graph.nodes, {n.label() for n in graph if learns(n.label())})
        observers = [o.observe for o in (means, grams) if o is not None]

        def observe(value: Value, array: np.ndarray) -> None:
            for observer in observers:
                observer(value, array)

        stats = collect_stats(
            graph, self.batches, progress=self.progress, observe=observe if observers else None
        )
        graph.store_analysis(CalibrationStats({graph[name]: s for name, s in stats.items()}))
        for gathered in (means, grams):
            if gathered is not None:
                graph.store_analysis(gathered.result())
        return False


def _tracked_outputs(graph: Graph, names: Collection[str] | None) -> list[str]:
    """The node outputs to record, in graph order; checks that ``names`` exist and are float."""
    computed = [v for node in graph.nodes for v in node.outputs]
    if names is None:
        return [v.name for v in computed if _is_float(v.type.dtype.numpy)]
    wanted = set(names)
    input_names = {v.name for v in graph.inputs}
    for name in sorted(wanted - input_names):
        value = graph.find(name)
        if value is None:
            raise IntqError(
                f"cannot calibrate %{name}: the graph has no value of that name",
                hint="names must be graph inputs or node outputs of the graph being calibrated",
            )
        if value.is_const:
            raise IntqError(
                f"cannot calibrate constant %{name}: its range is known without data",
                hint="compute a constant's threshold from its values directly",
            )
        if not _is_float(value.type.dtype.numpy):
            raise IntqError(f"cannot calibrate %{name}: its type {value.type} is not float")
    return [v.name for v in computed if v.name in wanted]


__all__ = [
    "AUTO_CANDIDATES",
    "AUTO_FALLBACK",
    "CALIBRATION_METHODS",
    "CLIP_METHODS",
    "ClipChoices",
    "ClipRule",
    "Calibrate",
    "CalibrationStats",
    "DEFAULT_BINS",
    "MIN_THRESHOLD",
    "TensorStats",
    "collect_stats",
    "qmax",
]
