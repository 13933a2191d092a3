"""Mixed precision: pick 4 or 8 weight bits per layer to meet a budget (HAWQ-V3), and with
``MixedPrecision(activation_bits=(8, 16))`` each layer's input activation width too.

    config = intq.QuantConfig(mixed_precision=intq.MixedPrecision(size_mb=1.5))
    int_graph = intq.quantize(graph, calibration_batches, config)

:func:`plan_bits` runs the steps, and :func:`intq.quantize` calls it when the config has a
:class:`MixedPrecision`:

1. **Sensitivity** ``Ω_i(b)`` of every quantizable layer (Conv/Gemm/MatMul with constant
   weights) at every candidate width, by the Hessian trace or by quantizing one layer at a
   time (:mod:`intq.passes.sensitivity`, which states the loss and why).
2. **Costs** per layer and width: weight size ``params * b`` bits (biases are int32 whatever
   the choice and are left out), BOPs ``macs * b * activation_bits`` per sample, and latency
   from a per-layer table measured on ONNX Runtime (:func:`measure_latency`; a
   :class:`LatencyTable` saves to and loads from JSON, see its docstring for the format).
   With activation candidates, each layer's input traced to where its width is set
   (:func:`intq.passes.precision.activation_sites`), its ``Ω`` per width measured with its
   calibrated quantizer (:func:`activation_choice`), and BOPs ``macs * w * a`` per pair.
3. **Ties** derived from the graph (:func:`derive_ties`) and **pins** (the first and last
   layer at the widest candidate by default).
4. The **ILP** (:func:`intq.passes.bit_allocation.allocate_bits`) and its answer as
   ``QuantConfig.layer_bits``.

What the integer kernels require of ties: nothing. ``QAdd`` rescales each operand with its
own dyadic multiplier and ``Concat`` requantizes each input to the output scale, so operands
of any weight precision (and any scale) meet exactly. The ties are HAWQ-V3's choice, kept as
the default (``ties=True``): layers whose outputs are added or concatenated share one weight
precision, so the branches of a residual block carry errors of the same order and hardware
that adds or concatenates in the layers' own precision (the paper's W4A4 kernels) can run
the graph. ``ties=False`` lifts them and gives the ILP a larger search space.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from intq.backends.base import atomic_write
from intq.backends.onnxruntime import compile_onnxruntime
from intq.errors import ArtifactError, IntqError
from intq.ir.graph import Graph, Node
from intq.ops import Trait
from intq.passes import PREPARE, Integerize, lowering_pipeline, pipeline
from intq.passes.bit_allocation import (
    ActivationCosts,
    Allocation,
    Budget,
    LayerCosts,
    allocate_bits,
)
from intq.passes.calibration import ClipRule, collect_stats
from intq.passes.integer_lowering import is_wide, provably_non_negative
from intq.passes.precision import (
    ACTIVATION_BITS,
    ActivationSite,
    LayerBits,
    QuantLayer,
    activation_sites,
    quantizable_layers,
    quantize_weights,
)

SENSITIVITY_METHODS = ("hessian", "direct")
LOSSES = ("kl", "mse")
"""The sensitivity losses (:mod:`intq.passes.sensitivity` says which and why)."""
LATENCY_FORMAT = "intq-latency-table"
LATENCY_VERSION = 1

Batch = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class MixedPrecision:
    """What to optimise for: a budget and how to measure sensitivity.

    Budgets (any combination; ``None`` leaves one free): ``size_mb`` weight storage in MB
    (2^20 bytes), ``bops`` bit operations per sample, ``latency_ms`` the sum of the layers'
    latencies from ``latency_table`` (a :class:`LatencyTable` or the path of its JSON file;
    measured on ONNX Runtime when not given). ``candidates`` are the weight widths to choose
    from; ``sensitivity`` is ``"hessian"`` (Hutchinson trace, HAWQ-V3) or ``"direct"`` (one
    layer quantized at a time); ``loss`` is ``"kl"`` (to the FP32 softmax) or ``"mse"`` (to
    the FP32 outputs). ``ties`` ties layers added or concatenated together; ``pin_first_last``
    keeps the first and last layer at the widest candidate; ``pins`` fixes more layers
    (original node name -> bits). ``tol`` and ``max_iterations`` stop Hutchinson's
    iterations; ``seed`` draws its vectors. ``report`` (a path prefix) writes
    ``PREFIX.txt`` (the table) and ``PREFIX.png`` (the plot) of the choice.

    ``activation_bits`` are the candidate widths of each layer's input activation (e.g.
    ``(8, 16)``; 4 to 8 and 16 are supported). Empty (the default), or the one width
    ``QuantConfig.activation_bits``, keeps every activation at ``QuantConfig.activation_bits``
    and the weights-only program. Otherwise each layer takes a (weight bits, input activation
    bits) pair: the layers reading one tensor share its width, BOPs count
    ``macs * w * a``, each activation's ``Ω`` is measured by quantizing it alone with its
    calibrated scale, and ``pin_first_last`` keeps the first and last layer's input at 8 bits
    or more (docs/mixed-precision.md says how and why).
    """

    size_mb: float | None = None
    bops: float | None = None
    latency_ms: float | None = None
    candidates: tuple[int, ...] = (4, 8)
    sensitivity: str = "hessian"
    loss: str = "kl"
    ties: bool = True
    pin_first_last: bool = True
    pins: Mapping[str, int] = field(default_factory=dict)
    latency_table: LatencyTable | str | Path | None = None
    tol: float = 2e-2
    max_iterations: int = 64
    seed: int = 0
    report: str | Path | None = None
    activation_bits: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.sensitivity not in SENSITIVITY_METHODS:
            raise IntqError(
                f"unknown sensitivity method {self.sensitivity!r}",
                hint=f"use one of {', '.join(SENSITIVITY_METHODS)}",
            )
        if self.loss not in LOSSES:
            raise IntqError(f"unknown sensitivity loss {self.loss!r}", hint=f"use one of {LOSSES}")
        candidates = tuple(sorted(set(self.candidates)))
        if not candidates or any(not isinstance(b, int) or not 2 <= b <= 8 for b in candidates):
            raise IntqError(
                f"candidate weight bits must be ints in [2, 8], got {self.candidates!r}"
            )
        object.__setattr__(self, "candidates", candidates)
        activations = tuple(sorted(set(self.activation_bits)))
        if any(isinstance(a, bool) or a not in ACTIVATION_BITS for a in activations):
            raise IntqError(
                f"candidate activation bits must be among {ACTIVATION_BITS},"
                f" got {self.activation_bits!r}",
                hint="for example 8 and 16: 16 bits where the budget allows",
            )
        object.__setattr__(self, "activation_bits", activations)
        self.budget()  # validates the budget values

    def activation_candidates(self, default: int) -> tuple[int, ...]:
        """The activation widths to choose from, or ``()`` when activations stay at
        ``default`` (``QuantConfig.activation_bits``): no candidates, or only that one."""
        return () if self.activation_bits in ((), (default,)) else self.activation_bits

    def budget(self) -> Budget:
        """The budgets as the ILP takes them."""
        return Budget(self.size_mb, self.bops, self.latency_ms)


# ----- latency --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyTable:
    """Measured latency of each layer alone at each weight width, in milliseconds.

    Saved as JSON (:meth:`save`, :meth:`load`), for reuse with ``MixedPrecision(
    latency_table=PATH)`` or ``intq quantize --latency-table PATH``::

        {"format": "intq-latency-table", "version": 1,
         "backend": "onnxruntime", "unit": "ms", "batch": 1, "activation_bits": 8,
         "repeats": 20,
         "layers": {"<original node name>": {"4": 0.141, "8": 0.139}, ...}}

    Each entry is the median wall time of ``repeats`` runs of a graph holding only that
    layer, integer-only (input ``Quantize``, the ``QConv``/``QGemm``/``QMatMul``, output
    ``Dequantize``), at the model's batch size. A table written by hand in this format works
    as well. With activation candidates, an optional ``"pairs"`` table holds the layers'
    latencies at other input activation widths, keyed ``"<weight bits>x<activation bits>"``
    (``{"conv1": {"4x16": 0.2, "8x16": 0.21}}``); a pair at ``activation_bits`` reads
    ``layers``.
    """

    layers: Mapping[str, Mapping[int, float]]
    backend: str = "onnxruntime"
    batch: int = 1
    activation_bits: int = 8
    repeats: int = 0
    pairs: Mapping[str, Mapping[tuple[int, int], float]] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON (atomically); returns the path."""
        data = {
            "format": LATENCY_FORMAT,
            "version": LATENCY_VERSION,
            "backend": self.backend,
            "unit": "ms",
            "batch": self.batch,
            "activation_bits": self.activation_bits,
            "repeats": self.repeats,
            "layers": {n: {str(b): ms for b, ms in t.items()} for n, t in self.layers.items()},
        }
        if self.pairs:
            data["pairs"] = {
                n: {f"{w}x{a}": ms for (w, a), ms in t.items()} for n, t in self.pairs.items()
            }
        return atomic_write(path, (json.dumps(data, indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        """Read a table :meth:`save` wrote; :class:`ArtifactError` on a bad file."""
        try:
            data = json.loads(Path(path).read_bytes().decode("utf-8"))
        except (OSError, ValueError) as err:  # also not UTF-8 (UnicodeDecodeError), bad JSON
            raise ArtifactError(f"cannot read latency table {path}: {err}") from None
        except RecursionError:  # json recurses once per level of nesting
            raise ArtifactError(f"{path}: JSON nested too deeply for a latency table") from None
        if not isinstance(data, dict) or data.get("format") != LATENCY_FORMAT:
            raise ArtifactError(
                f'{path} is not an intq latency table (no "format": "{LATENCY_FORMAT}")'
            )
        if data.get("version") != LATENCY_VERSION or data.get("unit", "ms") != "ms":
            raise ArtifactError(
                f"{path}: unsupported version {data.get('version')!r} or unit"
                f" {data.get('unit')!r} (this intq reads version {LATENCY_VERSION}, ms)"
            )
        layers: dict[str, dict[int, float]] = {}
        try:
            for name, table in data["layers"].items():
                layers[name] = {int(b): float(ms) for b, ms in table.items()}
                if not all(math.isfinite(v) and v >= 0 for v in layers[name].values()):
                    raise ValueError(f"layer {name!r} has a negative or non-finite latency")
        except (KeyError, AttributeError, TypeError, ValueError) as err:
            raise ArtifactError(f"{path}: malformed layers: {err}") from None
        pairs: dict[str, dict[tuple[int, int], float]] = {}
        try:
            for name, table in data.get("pairs", {}).items():
                pairs[name] = {}
                for key, ms in table.items():
                    w, a = key.split("x")
                    pairs[name][(int(w), int(a))] = float(ms)
                if not all(math.isfinite(v) and v >= 0 for v in pairs[name].values()):
                    raise ValueError(f"layer {name!r} has a negative or non-finite latency")
        except (AttributeError, TypeError, ValueError) as err:
            raise ArtifactError(
                f'{path}: malformed pairs (keys are "<weight>x<activation>" bits): {err}'
            ) from None
        counts = {}
        for key, default in (("batch", 1), ("activation_bits", 8), ("repeats", 0)):
            value = data.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ArtifactError(f"{path}: {key}: expected a count, got {value!r:.40}")
            counts[key] = value
        return cls(
            layers,
            str(data.get("backend", "")),
            counts["batch"],
            counts["activation_bits"],
            counts["repeats"],
            pairs,
        )

    def for_layer(self, name: str, candidates: Sequence[int]) -> dict[int, float]:
        """The latencies of layer ``name`` at ``candidates``; an error names what is missing."""
        table = self.layers.get(name)
        missing = [b for b in candidates if table is None or b not in table]
        if missing:
            raise IntqError(
                f"the latency table has no entry for {missing} bits",
                node=name,
                hint="measure the table for this model (MixedPrecision(latency_table=None)"
                " measures one) with these candidate widths",
            )
        assert table is not None
        return {b: table[b] for b in candidates}

    def for_pairs(
        self, name: str, pairs: Sequence[tuple[int, int]]
    ) -> dict[tuple[int, int], float]:
        """The latencies of layer ``name`` at ``(weight, activation)`` bits ``pairs``."""
        out = {}
        for w, a in pairs:
            if a == self.activation_bits:
                out[(w, a)] = self.for_layer(name, [w])[w]
                continue
            ms = self.pairs.get(name, {}).get((w, a))
            if ms is None:
                raise IntqError(
                    f"the latency table has no entry for {w}-bit weights with {a}-bit inputs",
                    node=name,
                    hint="measure the table with these activation candidates"
                    " (MixedPrecision(latency_table=None) measures one)",
                )
            out[(w, a)] = ms
        return out


def measure_latency(
    graph: Graph,
    candidates: Sequence[int] = (4, 8),
    *,
    activation_bits: int = 8,
    repeats: int = 20,
    layers: Sequence[QuantLayer] | None = None,
    seed: int = 0,
    activation_candidates: Sequence[int] = (),
) -> LatencyTable:
    """Time each quantizable layer of the float ``graph`` alone on ONNX Runtime (one thread)
    at every candidate weight width, and at each of ``activation_candidates`` other than
    ``activation_bits`` for its input and output (:attr:`LatencyTable.pairs`); see
    :class:`LatencyTable` for what is timed."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[int, float]] = {}
    pairs: dict[str, dict[tuple[int, int], float]] = {}
    layers = quantizable_layers(graph) if layers is None else layers
    for layer in layers:
        node = _node(graph, layer.name)
        x = node.inputs[0]
        assert x is not None
        sub = graph.extract([x.name], [node.output.name])
        feed = {x.name: rng.standard_normal(x.type.shape).astype(x.type.dtype.numpy)}
        out[layer.name] = {}
        pipeline(PREPARE)(sub)
        widths = [activation_bits, *(a for a in activation_candidates if a != activation_bits)]
        for a in widths:
            for b in candidates:
                lowering = Integerize(weight_bits=b, activation_bits=a)
                int_graph = lowering_pipeline([feed], lowering, progress=False)(sub).graph
                ms = _median_ms(compile_onnxruntime(int_graph, threads=1), feed, repeats)
                if a == activation_bits:
                    out[layer.name][b] = ms
                else:
                    pairs.setdefault(layer.name, {})[(b, a)] = ms
    batch = graph.inputs[0].type.shape[0] if graph.inputs and graph.inputs[0].type.rank else 1
    return LatencyTable(out, "onnxruntime", batch, activation_bits, repeats, pairs)


def _median_ms(exe: Any, feed: Batch, repeats: int) -> float:
    """The median wall time of ``repeats`` runs of ``exe`` on ``feed`` after a warm-up, ms."""
    exe.run(feed)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        exe.run(feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def _node(graph: Graph, name: str) -> Node:
    for node in graph:
        if node.label() == name:
            return node
    raise IntqError("no node has this name", node=name)


# ----- ties and pins ----------------------------------------------------------------------------


def derive_ties(graph: Graph, layers: Sequence[QuantLayer] | None = None) -> list[list[str]]:
    """Groups of layers that share a precision: for each residual ``Add`` and each ``Concat``,
    the nearest quantizable layers feeding its operands (looking back through activations and
    data movement, not through other adds). A group needs two or more layers: an identity
    shortcut ties nothing."""
    layers = quantizable_layers(graph) if layers is None else layers
    names = {layer.name for layer in layers}
    ties = []
    for node in graph:
        if node.op not in ("Add", "Concat"):
            continue
        group: list[str] = []
        for operand in node.inputs:
            producer = operand.producer if operand is not None else None
            while producer is not None and producer.opdef.has(Trait.PASS_THROUGH):
                source = producer.inputs[0]
                producer = source.producer if source is not None else None
            if producer is not None and producer.label() in names:
                if producer.label() not in group:
                    group.append(producer.label())
        if len(group) > 1:
            ties.append(group)
    return ties


# ----- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixedPrecisionPlan:
    """What :func:`plan_bits` measured and chose.

    ``perturbation`` is ``Ω`` per layer and width; ``traces`` the Hessian traces (``None``
    for the direct method); ``allocation`` the ILP's answer with its totals. With activation
    candidates, ``sites`` are the activations chosen for (named by ``value``) and
    ``activation_perturbation`` their ``Ω`` per width.
    """

    layers: tuple[QuantLayer, ...]
    perturbation: dict[str, dict[int, float]]
    traces: dict[str, float] | None
    allocation: Allocation
    ties: list[list[str]]
    pins: dict[str, int]
    method: str
    iterations: int | None = None
    latency: LatencyTable | None = None
    sites: tuple[ActivationSite, ...] = ()
    activation_perturbation: dict[str, dict[int, float]] = field(default_factory=dict)

    def layer_bits(self, activations: int = 8, weights: int = 8) -> dict[str, LayerBits]:
        """The choice as :attr:`intq.QuantConfig.layer_bits` (:func:`place_activations`)."""
        return place_activations(self.allocation, self.sites, activations, weights)

    def table(self) -> str:
        """The chosen bits per layer with Ω, costs (and trace), then the ties and pins."""
        lines = [f"mixed precision: sensitivity {self.method}", self.allocation.table()]
        if self.traces is not None:
            lines.append("")
            lines.append(
                f"Hessian trace / parameter count (Hutchinson, {self.iterations} iterations):"
            )
            width = max(len(layer.name) for layer in self.layers)
            for layer in self.layers:
                average = self.traces[layer.name] / layer.params
                lines.append(f"  {layer.name.ljust(width)}  {average:.4g}")
        lines += [f"tie: {', '.join(group)}" for group in self.ties]
        lines += [f"pin: {name} = {bits}" for name, bits in sorted(self.pins.items())]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """A PNG: bits per layer (bars), Ω at each candidate and weight size (log scale)."""
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [layer.name for layer in self.layers]
        bits = [self.allocation.bits[n] for n in names]
        index = np.arange(len(names))
        fig, (top, middle, bottom) = plt.subplots(
            3, 1, figsize=(max(8.0, 0.25 * len(names)), 9), sharex=True
        )
        top.bar(index, bits, color=["tab:orange" if b < 8 else "tab:blue" for b in bits])
        top.set_ylabel("weight bits")
        top.set_title(
            f"{self.method} sensitivity: {self.allocation.size_mb:.3g} MB,"
            f" {self.allocation.bops:.3g} BOPs, total Ω {self.allocation.perturbation:.3g}"
        )
        for b in sorted({b for table in self.perturbation.values() for b in table}):
            values = [max(self.perturbation[n][b], 1e-30) for n in names]
            middle.semilogy(index, values, marker="o", markersize=3, label=f"Ω at {b} bits")
        middle.set_ylabel("perturbation Ω")
        middle.legend(fontsize=8)
        sizes = [
            layer.params * self.allocation.bits[layer.name] / 8 / 1024 for layer in self.layers
        ]
        bottom.bar(index, sizes, color="tab:gray")
        bottom.set_yscale("log")
        bottom.set_ylabel("weight KiB (chosen)")
        bottom.set_xticks(index)
        bottom.set_xticklabels(names, rotation=90, fontsize=6)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        return atomic_write(path, buffer.getvalue())

    def save_report(self, prefix: str | Path) -> list[Path]:
        """Write ``PREFIX.txt`` (:meth:`table`), ``PREFIX.png`` (:meth:`plot`) and, when a
        latency table was used, ``PREFIX.latency.json`` (reusable); returns the paths."""
        prefix = Path(prefix)
        base = prefix.with_suffix("") if prefix.suffix in (".txt", ".png") else prefix
        paths = [
            atomic_write(base.with_name(base.name + ".txt"), (self.table() + "\n").encode()),
            self.plot(base.with_name(base.name + ".png")),
        ]
        if self.latency is not None:
            paths.append(self.latency.save(base.with_name(base.name + ".latency.json")))
        return paths


def place_activations(
    allocation: Allocation,
    sites: Sequence[ActivationSite],
    activations: int = 8,
    weights: int = 8,
) -> dict[str, LayerBits]:
    """An allocation as :attr:`intq.QuantConfig.layer_bits`: each layer's weight bits with
    ``activations``-bit outputs, except where an activation was chosen: every node that sets
    its width (:attr:`ActivationSite.keys`) then produces that many bits (a node that is not
    a layer gets ``weights``, which it does not read)."""
    bits = allocation.layer_bits(activations)
    for site in sites:
        a = allocation.activations[site.value]
        for key in site.keys:
            bits[key] = LayerBits(bits[key].weights if key in bits else weights, a)
    return bits


def plan_bits(
    graph: Graph,
    batches: Sequence[Batch],
    mp: MixedPrecision,
    *,
    activation_bits: int = 8,
    fixed: Mapping[str, int] | None = None,
    progress: bool | None = None,
    clip: ClipRule | None = None,
    fixed_activations: Mapping[str, int] | None = None,
) -> MixedPrecisionPlan:
    """Measure sensitivity and costs of the prepared float ``graph`` and solve the ILP.

    ``fixed`` pins layers the caller has already decided (``QuantConfig.layer_bits``);
    ``fixed_activations`` names the nodes whose output width the caller decided, whose
    activations are then left out of the choice. ``clip`` is how activation thresholds come
    from calibration statistics (``QuantConfig.calibration``; MSE when not given), for the
    activations' sensitivity.
    Raises :class:`~intq.passes.bit_allocation.InfeasibleBudgetError` for a budget no choice
    meets, naming the smallest feasible one.
    """
    # Imported here: the sensitivity needs torch, which `import intq` does not load.
    from intq.passes.sensitivity import (
        direct_perturbations,
        hessian_perturbations,
        hessian_traces,
    )

    layers = quantizable_layers(graph)
    if not layers:
        raise IntqError(
            "mixed precision needs quantizable layers (Conv/Gemm/MatMul with constant"
            " weights) and the model has none"
        )
    names = {layer.name for layer in layers}
    pins = dict(mp.pins)
    if mp.pin_first_last:
        pins.setdefault(layers[0].name, mp.candidates[-1])
        pins.setdefault(layers[-1].name, mp.candidates[-1])
    pins.update({n: b for n, b in (fixed or {}).items() if n in names})
    unknown = sorted(set(mp.pins) - names)
    if unknown:
        raise IntqError(
            f"MixedPrecision.pins names layers that are not quantizable layers: {unknown}",
            hint="use original node names of Conv/Gemm/MatMul nodes: "
            + ", ".join(sorted(names)[:3]),
        )
    iterations = None
    traces = None
    if mp.sensitivity == "hessian":
        estimate = hessian_traces(
            graph,
            batches,
            layers,
            loss=mp.loss,
            tol=mp.tol,
            min_iterations=min(8, mp.max_iterations),
            max_iterations=mp.max_iterations,
            seed=mp.seed,
            progress=progress,
        )
        traces, iterations = estimate.traces, estimate.iterations
        perturbation = hessian_perturbations(graph, layers, traces, mp.candidates)
    else:
        perturbation = direct_perturbations(
            graph, batches, layers, mp.candidates, loss=mp.loss, progress=progress
        )
    latency = None
    if mp.latency_ms is not None or mp.latency_table is not None:
        latency = _latency_table(graph, mp, layers, activation_bits)
    a_candidates = mp.activation_candidates(activation_bits)
    choice = ActivationChoice((), {}, (), {})
    if a_candidates:
        choice = activation_choice(
            graph, batches, layers, mp, a_candidates, clip, fixed_activations, progress
        )
    sites = list(choice.sites)
    a_perturbation = choice.perturbation
    activations = list(choice.activations)
    read = {name for site in sites for name in site.readers}
    costs = []
    for layer in layers:
        pairs = None
        pair_latency = None
        if layer.name in read:
            pairs = choice.pairs[layer.name]
            if latency is not None:
                pair_latency = latency.for_pairs(layer.name, pairs)
        costs.append(
            LayerCosts.from_counts(
                layer.name,
                perturbation[layer.name],
                params=layer.params,
                macs=layer.macs,
                activation_bits=activation_bits,
                latency_ms=None
                if latency is None
                else latency.for_layer(layer.name, mp.candidates),
                pairs=pairs,
                pair_latency_ms=pair_latency,
            )
        )
    ties = derive_ties(graph, layers) if mp.ties else []
    allocation = allocate_bits(costs, mp.budget(), ties=ties, pins=pins, activations=activations)
    return MixedPrecisionPlan(
        tuple(layers),
        perturbation,
        traces,
        allocation,
        ties,
        pins,
        mp.sensitivity,
        iterations,
        latency,
        tuple(sites),
        a_perturbation,
    )


# ----- activation candidates -------------------------------------------------------------------

ACCUMULATOR_HEADROOM = 2**30
"""A (weight, activation) pair is offered only when ``max_c sum|q_w[c]| * 2^a`` stays below
this: half of int32, the rest left to the bias, so that the range analysis can prove the
accumulator (it refuses the graph otherwise)."""


@dataclass(frozen=True)
class ActivationChoice:
    """The activation side of the program: the ``sites`` chosen for, their ``Ω`` per width
    (``perturbation``, by site value), their :class:`ActivationCosts` (with the widths the
    pins allow) and each reading layer's allowed (weight, activation) ``pairs``."""

    sites: tuple[ActivationSite, ...]
    perturbation: dict[str, dict[int, float]]
    activations: tuple[ActivationCosts, ...]
    pairs: dict[str, list[tuple[int, int]]]


def activation_choice(
    graph: Graph,
    batches: Sequence[Batch],
    layers: Sequence[QuantLayer],
    mp: MixedPrecision,
    candidates: Sequence[int],
    clip: ClipRule | None = None,
    fixed_activations: Mapping[str, int] | None = None,
    progress: bool | None = None,
) -> ActivationChoice:
    """Sites, sensitivities and allowed pairs for activation ``candidates`` (see
    :class:`MixedPrecision` and :func:`plan_bits`, which calls this)."""
    sites = _choosable_sites(graph, layers, fixed_activations or {})
    omega = _activation_perturbations(graph, batches, sites, candidates, mp, clip, progress)
    ends = {layers[0].name, layers[-1].name} if mp.pin_first_last else set()
    activations = []
    for site in sites:
        widths = tuple(candidates)
        if ends & set(site.readers) and any(a >= 8 for a in widths):
            widths = tuple(a for a in widths if a >= 8)  # as HAWQ-V3 keeps the ends at 8
        activations.append(
            ActivationCosts(site.value, {a: omega[site.value][a] for a in widths}, site.readers)
        )
    read = {name for site in sites for name in site.readers}
    pairs = {
        layer.name: _allowed_pairs(graph, layer, mp.candidates, candidates)
        for layer in layers
        if layer.name in read
    }
    return ActivationChoice(tuple(sites), omega, tuple(activations), pairs)


def _choosable_sites(
    graph: Graph, layers: Sequence[QuantLayer], fixed: Mapping[str, int]
) -> list[ActivationSite]:
    """The activations whose width the plan may choose: not a transformer's wide value (kept
    at ``wide_bits`` whatever is asked) and none of whose nodes the caller fixed."""
    out = []
    for site in activation_sites(graph, list(layers)):
        values = [graph[site.value]]
        for key in site.keys:
            found = graph.find(key)
            if found is not None and found.producer is None:
                values.append(found)  # a graph input
        values += [n.output for n in graph if n.name in site.keys]
        if any(is_wide(v) for v in values) or any(k in fixed for k in site.keys):
            continue
        out.append(site)
    return out


def _allowed_pairs(
    graph: Graph, layer: QuantLayer, weights: Sequence[int], activations: Sequence[int]
) -> list[tuple[int, int]]:
    """The (weight, activation) pairs whose accumulator keeps within
    :data:`ACCUMULATOR_HEADROOM` (the weight integers are the lowering's own)."""
    w = graph[layer.weight].const
    assert w is not None
    pairs = []
    for wb in weights:
        q, _ = quantize_weights(w, wb, layer.axis)
        taps = np.moveaxis(np.abs(q.astype(np.int64)), layer.axis, 0)
        largest = int(taps.reshape(taps.shape[0], -1).sum(axis=1).max(initial=0))
        pairs += [(wb, a) for a in activations if largest << a < ACCUMULATOR_HEADROOM]
    return pairs


def _activation_perturbations(
    graph: Graph,
    batches: Sequence[Batch],
    sites: Sequence[ActivationSite],
    candidates: Sequence[int],
    mp: MixedPrecision,
    clip: ClipRule | None,
    progress: bool | None,
) -> dict[str, dict[int, float]]:
    """``Ω`` of each site's activation at each width: the loss with it alone quantized by
    its calibrated quantizer. With Hessian weight sensitivities, twice that: their ``Ω`` is
    ``ΔWᵀHΔW`` in expectation, twice the second-order loss increase, so both are in one unit."""
    from intq.passes.sensitivity import ActivationQuantizer, activation_perturbations

    if not sites:
        return {}
    rule = clip or ClipRule("mse")
    inputs = {v.name for v in graph.inputs}
    names = [site.value for site in sites if site.value not in inputs]
    stats = collect_stats(graph, batches, names, progress=progress)
    quantizers = {}
    for site in sites:
        value = graph[site.value]
        signed = not provably_non_negative(value)
        thresholds = {
            a: stats[site.value].clip(rule.method, a, signed, rule.percentile) for a in candidates
        }
        quantizers[site.value] = ActivationQuantizer(thresholds, signed)
    measured = activation_perturbations(
        graph, batches, quantizers, candidates, loss=mp.loss, progress=progress
    )
    factor = 2.0 if mp.sensitivity == "hessian" else 1.0
    return {n: {a: factor * v for a, v in table.items()} for n, table in measured.items()}


def _latency_table(
    graph: Graph, mp: MixedPrecision, layers: Sequence[QuantLayer], activation_bits: int
) -> LatencyTable:
    table = mp.latency_table
    if isinstance(table, LatencyTable):
        return table
    if table is not None:
        return LatencyTable.load(table)
    return measure_latency(
        graph,
        mp.candidates,
        activation_bits=activation_bits,
        layers=layers,
        activation_candidates=mp.activation_candidates(activation_bits),
    )


def as_list(batches: Iterable[Batch]) -> list[Batch]:
    """The calibration batches in memory: mixed precision reads them more than once."""
    return list(batches)


__all__ = [
    "ActivationChoice",
    "LatencyTable",
    "MixedPrecision",
    "MixedPrecisionPlan",
    "derive_ties",
    "activation_choice",
    "measure_latency",
    "place_activations",
    "plan_bits",
]
