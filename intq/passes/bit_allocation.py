"""Mixed-precision bit allocation: the integer linear program of HAWQ-V3.

Each quantizable layer ``i`` has candidate weight bit widths (say 4 and 8) and, for each
candidate ``b``, a cost to minimise (the perturbation ``Ω_i(b)``; HAWQ-V3 uses
``tr(H_i) / n_i * ||Q_b(W_i) - W_i||²``) and resource costs: model size in bits, BOPs, and
optionally a measured latency. :func:`allocate_bits` picks one candidate per layer that
minimises the total perturbation under any combination of size, BOPs and latency budgets::

    layers = [LayerCosts.from_counts(name, omega[name], params=p[name], macs=m[name]) ...]
    allocation = allocate_bits(layers, Budget(size_mb=1.5), ties=[["conv1", "shortcut"]],
                               pins={"stem": 8, "fc": 8})
    config = QuantConfig(layer_bits=allocation.layer_bits(activations=8))

The program has one binary ``x[g, b]`` per decision ``g`` and allowed bit width ``b``:

    minimise    sum Ω[g, b] x[g, b]
    subject to  sum_b x[g, b] = 1                      (exactly one width per decision)
                sum cost_d[g, b] x[g, b] <= budget_d    (each given budget d)

Ties are handled by *merging*: layers tied together (transitively: overlapping ties join) form
one decision whose costs are the sums of theirs, so a tie holds by construction and the
program shrinks. Pins keep only the pinned width as a variable of its decision.

It is solved with ``scipy.optimize.milp`` (HiGHS), each row shifted by every decision's
cheapest choice and scaled to coefficients in [0, 1] so that HiGHS's absolute tolerances mean
the same for bits, BOPs and milliseconds. A total within a relative :data:`RELATIVE_TOLERANCE`
(1e-9) over its budget meets it. HiGHS is given twice that slack, and its answer is checked
in double precision: one that is over after all (a cost below HiGHS's tolerances) is cut off,
with every choice that agrees with it where it pays more than the cheapest, and the program
solved again. So budgets hold exactly as :data:`RELATIVE_TOLERANCE` says. The perturbation
is optimal up to HiGHS's dual tolerance (1e-10 of the largest scaled ``Ω`` difference), that
is within about ``1e-9 * max(optimum, spread)`` where ``spread`` sums each layer's largest
minus smallest ``Ω``. Among allocations of equal perturbation, which comes back is unspecified.

Activation widths (``allocate_bits(..., activations=[ActivationCosts(...)])``) add a second
kind of decision, one width per activation tensor shared by the layers reading it, and a
binary per layer and allowed (weight, activation) pair that the equalities of
:class:`_PairProgram` make the product of the layer's two choices, so that BOPs
``macs * w * a`` and pair latencies stay linear. Without activations the program is exactly
the one above.

Without a binding budget the answer needs no solver: every decision takes its
least-perturbation width (ties towards more bits). And with ties and pins but no other
budget, the smallest achievable size, BOPs or latency is the sum of each decision's cheapest
choice, exactly; :class:`InfeasibleBudgetError` reports those minima.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array, csr_array, vstack

from intq.errors import IntqError, NumericsError
from intq.passes.precision import LayerBits

BITS_PER_MB = 8 * 2**20
"""Bits in one megabyte (2^20 bytes), the unit of :attr:`Budget.size_mb`."""

RELATIVE_TOLERANCE = 1e-9
"""A total within this relative margin over its budget meets it (double-precision sums)."""

# HiGHS options for the scaled program (coefficients in [0, 1]). The defaults (1e-7 primal and
# dual tolerance, 1e-4 relative gap) blur choices that differ by a millionth of the largest
# coefficient (Ω of 1.0 against 1.0000001), and HiGHS drops matrix entries under 1e-9 as zero.
# mip_feasibility_tolerance stays at 1e-7: tighter, HiGHS re-solves after presolve and prints
# a debug line to stdout; the float check below catches what it lets through.
_HIGHS_OPTIONS = {
    "mip_abs_gap": 0.0,
    "mip_feasibility_tolerance": 1e-7,
    "primal_feasibility_tolerance": 1e-10,
    "dual_feasibility_tolerance": 1e-10,
    "small_matrix_value": 1e-12,
}
_MAX_CUTS = 50


@dataclass(frozen=True)
class LayerCosts:
    """The costs of each candidate weight bit width of one layer.

    Every map goes from bit width to cost; the candidates are the keys of ``perturbation``
    and every map must have exactly those keys. ``perturbation`` is ``Ω`` (to minimise),
    ``size_bits`` the layer's weight storage in bits, ``bops`` its bit operations, and
    ``latency_ms`` (optional) its measured latency. Costs must be finite and non-negative.
    ``name`` is the layer's original node name, the key of
    :attr:`intq.QuantConfig.layer_bits`.

    With activation candidates (:class:`ActivationCosts`), ``pair_bops`` and
    ``pair_latency_ms`` map each allowed ``(weight bits, input activation bits)`` pair to its
    cost instead; a pair left out cannot be chosen (say, one whose accumulator could
    overflow int32). ``bops`` and ``latency_ms`` then stay the costs at the default
    activation width, used when no activation decision covers the layer.
    """

    name: str
    perturbation: Mapping[int, float]
    size_bits: Mapping[int, float]
    bops: Mapping[int, float]
    latency_ms: Mapping[int, float] | None = None
    pair_bops: Mapping[tuple[int, int], float] | None = None
    pair_latency_ms: Mapping[tuple[int, int], float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise IntqError(f"a layer's name must be a non-empty string, got {self.name!r}")
        if not self.perturbation:
            raise IntqError("the layer has no candidate bit widths", node=self.name)
        candidates = set(self.perturbation)
        for b in candidates:
            # bool is an int; True as a bit width is a bug, not a 1-bit candidate.
            if isinstance(b, bool) or not isinstance(b, int | np.integer) or b <= 0:
                raise IntqError(f"candidate bit width {b!r} is not a positive int", node=self.name)
        maps = {"perturbation": self.perturbation, "size_bits": self.size_bits, "bops": self.bops}
        if self.latency_ms is not None:
            maps["latency_ms"] = self.latency_ms
        for label, costs in maps.items():
            if set(costs) != candidates:
                raise IntqError(
                    f"{label} has bit widths {sorted(costs)} but the candidates (the keys of"
                    f" perturbation) are {sorted(candidates)}",
                    node=self.name,
                    hint="give every cost map the same bit widths",
                )
            for b, value in costs.items():
                if not math.isfinite(value) or value < 0:
                    raise NumericsError(
                        f"{label}[{b}] = {value!r}: costs must be finite and non-negative",
                        node=self.name,
                    )
            # Own copies with plain int keys and float values: the caller's dicts may change.
            object.__setattr__(self, label, {int(b): float(v) for b, v in costs.items()})
        pairs = {"pair_bops": self.pair_bops, "pair_latency_ms": self.pair_latency_ms}
        for label, pair_costs in pairs.items():
            if pair_costs is None:
                continue
            if label == "pair_latency_ms" and set(pair_costs) != set(self.pair_bops or {}):
                raise IntqError(
                    "pair_latency_ms must have the (weight, activation) pairs of pair_bops",
                    node=self.name,
                )
            for (w, a), value in pair_costs.items():
                if w not in candidates or not isinstance(a, int | np.integer) or a <= 0:
                    raise IntqError(
                        f"{label} has the pair ({w!r}, {a!r}): its weight bits must be a"
                        f" candidate {sorted(candidates)} and its activation bits positive",
                        node=self.name,
                    )
                if not math.isfinite(value) or value < 0:
                    raise NumericsError(
                        f"{label}[{w}, {a}] = {value!r}: costs must be finite and non-negative",
                        node=self.name,
                    )
            copy = {(int(w), int(a)): float(v) for (w, a), v in pair_costs.items()}
            object.__setattr__(self, label, copy)

    @classmethod
    def from_counts(
        cls,
        name: str,
        perturbation: Mapping[int, float],
        *,
        params: int,
        macs: int,
        activation_bits: int = 8,
        latency_ms: Mapping[int, float] | None = None,
        pairs: Sequence[tuple[int, int]] | None = None,
        pair_latency_ms: Mapping[tuple[int, int], float] | None = None,
    ) -> LayerCosts:
        """Costs of a conv or linear layer from its weight count and multiply-accumulates.

        Size is ``params * b`` bits and BOPs ``macs * b * activation_bits`` for each
        candidate ``b`` (the keys of ``perturbation``); for each allowed ``(w, a)`` of
        ``pairs``, BOPs ``macs * w * a``.
        """
        return cls(
            name,
            perturbation,
            size_bits={b: float(params * b) for b in perturbation},
            bops={b: float(macs * b * activation_bits) for b in perturbation},
            latency_ms=latency_ms,
            pair_bops=None if pairs is None else {(w, a): float(macs * w * a) for w, a in pairs},
            pair_latency_ms=pair_latency_ms,
        )

    @property
    def candidates(self) -> tuple[int, ...]:
        """The candidate bit widths, ascending."""
        return tuple(sorted(self.perturbation))

    def cost(self, dimension: str, bits: int) -> float:
        """The cost at ``bits`` in a budget's unit (``size_mb``, ``bops`` or ``latency_ms``)."""
        if dimension == "size_mb":
            return self.size_bits[bits] / BITS_PER_MB
        if dimension == "bops":
            return self.bops[bits]
        if dimension == "latency_ms":
            if self.latency_ms is None:
                raise IntqError("the layer has no latency table", node=self.name)
            return self.latency_ms[bits]
        raise ValueError(f"unknown cost dimension {dimension!r}")


@dataclass(frozen=True)
class Budget:
    """Upper bounds on the whole model; ``None`` leaves a dimension free.

    ``size_mb`` is the weight storage in MB (2^20 bytes), ``bops`` the total bit operations,
    ``latency_ms`` the sum of the layers' latencies.
    """

    size_mb: float | None = None
    bops: float | None = None
    latency_ms: float | None = None

    def __post_init__(self) -> None:
        for dimension, value in self.given().items():
            if not math.isfinite(value):
                raise NumericsError(f"{dimension} budget {value!r} is not finite")
            if value < 0:
                raise IntqError(f"{dimension} budget {value!r} is negative")

    def given(self) -> dict[str, float]:
        """The budgets that are set: dimension (a field name) -> bound."""
        values = {"size_mb": self.size_mb, "bops": self.bops, "latency_ms": self.latency_ms}
        return {d: float(v) for d, v in values.items() if v is not None}


@dataclass(frozen=True)
class ActivationCosts:
    """One activation decision: a tensor that the layers ``readers`` read, and the
    perturbation ``Ω`` (to minimise) of each candidate width (the keys). Its readers share
    the width; their BOPs and latency at each width are their ``pair_*`` costs."""

    name: str
    perturbation: Mapping[int, float]
    readers: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.perturbation:
            raise IntqError("the activation has no candidate bit widths", node=self.name)
        if not self.readers:
            raise IntqError("the activation has no reading layers", node=self.name)
        for a, value in self.perturbation.items():
            if isinstance(a, bool) or not isinstance(a, int | np.integer) or a <= 0:
                raise IntqError(f"activation width {a!r} is not a positive int", node=self.name)
            if not math.isfinite(value) or value < 0:
                raise NumericsError(
                    f"perturbation[{a}] = {value!r}: must be finite and non-negative",
                    node=self.name,
                )
        object.__setattr__(
            self, "perturbation", {int(a): float(v) for a, v in self.perturbation.items()}
        )
        object.__setattr__(self, "readers", tuple(self.readers))

    @property
    def candidates(self) -> tuple[int, ...]:
        """The candidate widths, ascending."""
        return tuple(sorted(self.perturbation))

    def least_perturbation(self) -> int:
        """The width of least perturbation; of equals, the widest."""
        return min(self.perturbation, key=lambda a: (self.perturbation[a], -a))


@dataclass(frozen=True)
class Allocation:
    """The chosen bit width of each layer and the totals it costs.

    ``optimal`` is ``False`` when the solver stopped at its time limit with a feasible but
    not proven optimal choice. ``latency_ms`` is ``None`` unless every layer has a latency
    table. With activation decisions, ``activations`` maps each activation decision's name to
    its chosen width and ``input_bits`` each layer they cover to its input's width;
    ``perturbation`` then sums the weights' and the activations' ``Ω``.
    """

    bits: dict[str, int]
    perturbation: float
    size_mb: float
    bops: float
    latency_ms: float | None
    optimal: bool = True
    layers: tuple[LayerCosts, ...] = field(default=(), repr=False, compare=False)
    activations: dict[str, int] = field(default_factory=dict)
    input_bits: dict[str, int] = field(default_factory=dict)
    activation_layers: tuple[ActivationCosts, ...] = field(default=(), repr=False, compare=False)

    def layer_bits(self, activations: int = 8) -> dict[str, LayerBits]:
        """The weight choice as :attr:`intq.QuantConfig.layer_bits`, with
        ``activations``-bit outputs (the activation choice needs the graph to place:
        :meth:`intq.mixed_precision.MixedPrecisionPlan.layer_bits`)."""
        return {name: LayerBits(b, activations) for name, b in self.bits.items()}

    def _layer_bops(self, layer: LayerCosts) -> float:
        a = self.input_bits.get(layer.name)
        if a is None or layer.pair_bops is None:
            return layer.bops[self.bits[layer.name]]
        return layer.pair_bops[(self.bits[layer.name], a)]

    def _layer_latency(self, layer: LayerCosts) -> float:
        a = self.input_bits.get(layer.name)
        if a is None or layer.pair_latency_ms is None:
            return layer.cost("latency_ms", self.bits[layer.name])
        return layer.pair_latency_ms[(self.bits[layer.name], a)]

    def table(self) -> str:
        """An aligned text table: layer, bits, Ω, size, BOPs, latency; totals last. With
        activation decisions, also each layer's input activation bits, and then each
        activation's width and ``Ω``."""
        with_latency = self.latency_ms is not None
        with_inputs = bool(self.input_bits)
        header = (
            ["layer", "bits"]
            + (["in bits"] if with_inputs else [])
            + ["Ω", "size MB", "BOPs"]
            + (["latency ms"] if with_latency else [])
        )
        rows = []
        for layer in self.layers:
            b = self.bits[layer.name]
            row = [layer.name, str(b)]
            if with_inputs:
                row.append(str(self.input_bits.get(layer.name, "")))
            row.append(f"{layer.perturbation[b]:.4g}")
            row += [f"{layer.cost('size_mb', b):.4g}", f"{self._layer_bops(layer):.4g}"]
            if with_latency:
                row.append(f"{self._layer_latency(layer):.4g}")
            rows.append(row)
        total = ["total", ""] + ([""] if with_inputs else [])
        total += [f"{self.perturbation:.4g}", f"{self.size_mb:.4g}", f"{self.bops:.4g}"]
        if self.latency_ms is not None:
            total.append(f"{self.latency_ms:.4g}")
        widths = [max(len(r[c]) for r in [header, *rows, total]) for c in range(len(header))]

        def line(cells: list[str]) -> str:
            # Names to the left, numbers to the right.
            first = cells[0].ljust(widths[0])
            return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        lines = [line(header), rule, *map(line, rows), rule, line(total)]
        if self.activation_layers:
            width = max(len(act.name) for act in self.activation_layers)
            lines += ["", "activations (read by):"]
            for act in self.activation_layers:
                a = self.activations[act.name]
                lines.append(
                    f"  {act.name.ljust(width)}  {a:>2} bits  Ω {act.perturbation[a]:.4g}"
                    f"  ({', '.join(act.readers)})"
                )
        return "\n".join(lines)


_LABELS = {
    "size_mb": ("size", " MB", "the smallest model"),
    "bops": ("BOPs", "", "the fewest BOPs"),
    "latency_ms": ("latency", " ms", "the lowest latency"),
}


class InfeasibleBudgetError(IntqError):
    """No choice of bit widths meets the budget under the given ties and pins.

    ``requested`` maps each given budget dimension (``size_mb``, ``bops``, ``latency_ms``)
    to its bound, ``smallest`` to the smallest total reachable under the ties and pins with
    that dimension alone, and ``infeasible`` names the dimensions whose smallest total is
    already over the bound (empty when each budget alone can be met but not all together).
    """

    def __init__(self, requested: Mapping[str, float], smallest: Mapping[str, float]):
        self.requested = dict(requested)
        self.smallest = dict(smallest)
        self.infeasible = tuple(d for d in requested if _over(smallest[d], requested[d]))
        parts = []
        for d, bound in self.requested.items():
            label, unit, least = _LABELS[d]
            low = self.smallest[d]
            if d in self.infeasible:
                parts.append(
                    f"{label} budget {bound:.6g}{unit} is infeasible: {least} with these ties"
                    f" and pins is {low:.6g}{unit}"
                )
            else:
                parts.append(
                    f"{label} budget {bound:.6g}{unit} alone is met ({least}: {low:.6g}{unit})"
                )
        if not self.infeasible:
            parts.insert(0, "the budgets cannot all be met at once")
        super().__init__(
            "; ".join(parts),
            hint="loosen the budget, add smaller candidate bit widths, or drop pins or ties",
        )


def _over(total: float, bound: float) -> bool:
    """Whether ``total`` exceeds ``bound`` by more than the relative float tolerance."""
    return total > bound + RELATIVE_TOLERANCE * max(abs(bound), abs(total))


@dataclass(frozen=True)
class _Decision:
    """One decision of the program: a set of tied layers and the widths allowed for them."""

    members: tuple[LayerCosts, ...]
    allowed: tuple[int, ...]

    def cost(self, dimension: str, bits: int) -> float:
        if dimension == "perturbation":
            return math.fsum(layer.perturbation[bits] for layer in self.members)
        return math.fsum(layer.cost(dimension, bits) for layer in self.members)

    def least_perturbation(self) -> int:
        """The allowed width of least perturbation; of equals, the widest."""
        return min(self.allowed, key=lambda b: (self.cost("perturbation", b), -b))


def allocate_bits(
    layers: Sequence[LayerCosts],
    budget: Budget,
    *,
    ties: Sequence[Sequence[str]] = (),
    pins: Mapping[str, int] | None = None,
    activations: Sequence[ActivationCosts] = (),
    time_limit_s: float = 10.0,
) -> Allocation:
    """The least-perturbation choice of one candidate bit width per layer within ``budget``.

    ``activations`` adds activation decisions: each picks one width for a tensor its
    readers share, and a layer read through one takes a ``(weight, activation)`` pair of its
    ``pair_*`` costs (:func:`_allocate_pairs` states the program).

    ``ties`` are groups of layer names that must share one bit width (e.g. a residual
    shortcut and its main branch; overlapping groups join), ``pins`` fix a layer's width
    (e.g. first and last layer at 8). Raises :class:`InfeasibleBudgetError` when no choice
    meets the budget, and :class:`~intq.errors.IntqError` for unknown layer names, pins to a
    width that is not a candidate, tied layers with different candidates, or a latency
    budget when a layer has no latency table. Without any budget the answer is simply the
    least-perturbation choice. ``time_limit_s`` bounds the solver; if it runs out with a
    feasible choice in hand, that choice comes back with ``optimal=False``.
    """
    decisions = _decisions(layers, ties, pins or {})
    requested = budget.given()
    if "latency_ms" in requested:
        for layer in layers:
            if layer.latency_ms is None:
                raise IntqError(
                    "a latency budget is set but this layer has no latency table",
                    node=layer.name,
                    hint="give every layer latency_ms, or drop Budget.latency_ms",
                )
    if not time_limit_s > 0:
        raise IntqError(f"time_limit_s must be positive, got {time_limit_s!r}")
    if activations:
        return _allocate_pairs(layers, decisions, activations, requested, time_limit_s)

    # Each budget alone is separable over the decisions, so its minimum is exact and cheap;
    # a budget below it is infeasible whatever the others say.
    smallest = {
        d: math.fsum(min(g.cost(d, b) for b in g.allowed) for g in decisions) for d in requested
    }
    if any(_over(smallest[d], requested[d]) for d in requested):
        raise InfeasibleBudgetError(requested, smallest)

    # The least-perturbation choice (ties towards more bits) is optimal whenever it fits.
    greedy = [g.least_perturbation() for g in decisions]
    allocation = _allocation(layers, decisions, greedy, optimal=True)
    if not _misses(allocation, requested):
        return allocation
    return _solve(layers, decisions, requested, smallest, time_limit_s)


def _decisions(
    layers: Sequence[LayerCosts], ties: Sequence[Sequence[str]], pins: Mapping[str, int]
) -> list[_Decision]:
    """Validate the names and merge tied layers into decisions (union-find)."""
    if not layers:
        raise IntqError("no layers to allocate bits to", hint="pass at least one LayerCosts")
    by_name: dict[str, LayerCosts] = {}
    for layer in layers:
        if layer.name in by_name:
            raise IntqError("two layers have this name", node=layer.name)
        by_name[layer.name] = layer

    parent = {name: name for name in by_name}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for tie in ties:
        if isinstance(tie, str):
            # A bare string is a sequence of one-letter names: certainly a missing bracket.
            raise IntqError(f"each tie is a sequence of layer names, got the string {tie!r}")
        for name in tie:
            if name not in by_name:
                raise IntqError("a tie names a layer that is not among the layers", node=name)
        for a, b in itertools.pairwise(tie):
            if by_name[a].candidates != by_name[b].candidates:
                raise IntqError(
                    f"tied to {b!r} but their candidate bit widths differ:"
                    f" {by_name[a].candidates} vs {by_name[b].candidates}",
                    node=a,
                    hint="give tied layers the same candidates",
                )
            parent[root(a)] = root(b)

    for name, bits in pins.items():
        if name not in by_name:
            raise IntqError("a pin names a layer that is not among the layers", node=name)
        if bits not in by_name[name].perturbation:
            raise IntqError(
                f"pinned to {bits} bits, which is not a candidate {by_name[name].candidates}",
                node=name,
            )

    groups: dict[str, list[LayerCosts]] = {}
    for layer in layers:
        groups.setdefault(root(layer.name), []).append(layer)
    decisions = []
    for members in groups.values():
        pinned = {(m.name, pins[m.name]) for m in members if m.name in pins}
        if len({b for _, b in pinned}) > 1:
            raise IntqError(
                f"tied layers are pinned to different bit widths: {sorted(pinned)}",
                node=members[0].name,
            )
        allowed = (next(iter(pinned))[1],) if pinned else members[0].candidates
        decisions.append(_Decision(tuple(members), allowed))
    return decisions


def _allocation(
    layers: Sequence[LayerCosts], decisions: list[_Decision], choice: list[int], *, optimal: bool
) -> Allocation:
    """The :class:`Allocation` of one width per decision, with totals summed in layer order."""
    bits = {m.name: b for g, b in zip(decisions, choice) for m in g.members}
    ordered = [bits[layer.name] for layer in layers]
    with_latency = all(layer.latency_ms is not None for layer in layers)

    def total(dimension: str) -> float:
        return math.fsum(layer.cost(dimension, b) for layer, b in zip(layers, ordered))

    return Allocation(
        bits={layer.name: b for layer, b in zip(layers, ordered)},
        perturbation=math.fsum(layer.perturbation[b] for layer, b in zip(layers, ordered)),
        size_mb=total("size_mb"),
        bops=total("bops"),
        latency_ms=total("latency_ms") if with_latency else None,
        optimal=optimal,
        layers=tuple(layers),
    )


def _misses(allocation: Allocation, requested: Mapping[str, float]) -> bool:
    """Whether the allocation exceeds any requested budget."""
    totals = {
        "size_mb": allocation.size_mb,
        "bops": allocation.bops,
        "latency_ms": allocation.latency_ms,
    }
    return any(_over(totals[d] or 0.0, bound) for d, bound in requested.items())


def _solve(
    layers: Sequence[LayerCosts],
    decisions: list[_Decision],
    requested: Mapping[str, float],
    smallest: Mapping[str, float],
    time_limit_s: float,
) -> Allocation:
    """Solve the program with HiGHS, cutting off any answer that misses a budget in floats."""
    columns = [(g, b) for g, decision in enumerate(decisions) for b in decision.allowed]
    n = len(columns)
    col_of = {gb: j for j, gb in enumerate(columns)}

    def excess(dimension: str) -> np.ndarray:
        # Each choice's cost over its decision's cheapest: the cheapest is exactly 0, so a
        # budget at the minimum is no rounding away from feasible.
        lows = [min(d.cost(dimension, b) for b in d.allowed) for d in decisions]
        return np.array([decisions[g].cost(dimension, b) - lows[g] for g, b in columns])

    def scaled(row: np.ndarray) -> tuple[np.ndarray, float]:
        # Coefficients in [0, 1]: HiGHS's absolute tolerances then mean the same for bits,
        # BOPs and milliseconds.
        scale = float(row.max())
        return (row / scale if scale > 0 else row), scale

    objective, _ = scaled(excess("perturbation"))
    excesses = {d: excess(d) for d in requested}
    rows: list[np.ndarray] = []
    upper: list[float] = []
    for d, bound in requested.items():
        row, scale = scaled(excesses[d])
        if scale == 0:
            continue  # every choice costs the same here, and the minimum fits (checked)
        rows.append(row)
        # Twice what _over accepts: HiGHS's feasible set must hold every choice that fits in
        # floats, even one at the edge of the tolerance; the exact check below rejects the rest.
        slack = bound + 2 * RELATIVE_TOLERANCE * abs(bound) - smallest[d]
        upper.append(max(slack / scale, 0.0))
    one_each = coo_array(
        (np.ones(n), ([g for g, _ in columns], np.arange(n))), shape=(len(decisions), n)
    )

    cuts: list[np.ndarray] = []
    deadline = time.monotonic() + time_limit_s
    for _ in range(_MAX_CUTS + 1):
        matrix = vstack([one_each, csr_array(np.array(rows + cuts).reshape(-1, n))]).tocsr()
        lower = np.concatenate([np.ones(len(decisions)), np.full(len(rows) + len(cuts), -np.inf)])
        upper_all = np.concatenate(
            [np.ones(len(decisions)), upper, [cut.sum() - 1.0 for cut in cuts]]
        )
        options = {
            "time_limit": max(deadline - time.monotonic(), 1e-3),
            "mip_rel_gap": 0.0,
            **_HIGHS_OPTIONS,
        }
        with warnings.catch_warnings():
            # milp hands the options it does not know to HiGHS verbatim, with a warning.
            warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
            result = milp(
                objective,
                integrality=np.ones(n),
                bounds=Bounds(0.0, 1.0),
                constraints=LinearConstraint(matrix, lower, upper_all),
                options=options,
            )
        if result.status == 2:
            raise InfeasibleBudgetError(requested, smallest)
        if result.x is None:
            raise IntqError(
                f"the solver found no allocation within {time_limit_s} s ({result.message})",
                hint="raise time_limit_s, or loosen the budget",
            )
        x = np.asarray(result.x)
        choice = []
        for g, decision in enumerate(decisions):
            picks = [x[col_of[(g, b)]] for b in decision.allowed]
            choice.append(decision.allowed[int(np.argmax(picks))])
        allocation = _allocation(layers, decisions, choice, optimal=result.status == 0)
        missed = [d for d in requested if _misses(allocation, {d: requested[d]})]
        if not missed:
            return allocation
        # Over in floats though not for HiGHS (a cost below its tolerances). Every choice
        # that agrees with this one wherever it pays more than the cheapest costs at least
        # as much, so forbid that combination, and solve again.
        chosen = np.array([col_of[(g, b)] for g, b in enumerate(choice)])
        paying = chosen[excesses[missed[0]][chosen] > 0]
        cut = np.zeros(n)
        cut[paying] = 1.0
        cuts.append(cut)
    raise NumericsError(
        f"the solver kept returning allocations just over the budget ({_MAX_CUTS} cut off)",
        hint="loosen the budget by a relative 1e-6",
    )


# ----- weight and activation decisions ---------------------------------------------------------


_Column = tuple[str, int, int, int]
"""A binary of the program with activation decisions: ``(kind, index, w, a)``: ``("x", g, w,
0)``, ``("y", t, 0, a)`` or ``("z", i, w, a)`` (:class:`_PairProgram`)."""


@dataclass(frozen=True)
class _PairProgram:
    """The program with activation decisions, as columns of binaries.

    ``x[g, w]`` picks weight decision ``g``'s width, ``y[t, a]`` activation ``t``'s, and
    ``z[i, w, a]`` covered layer ``i``'s pair. Equalities: one ``x`` per decision, one ``y``
    per activation, and for each covered layer ``sum_a z[i, w, a] = x[g(i), w]`` for every
    ``w`` and ``sum_w z[i, w, a] = y[t(i), a]`` for every ``a``, which make ``z`` exactly the
    product ``x * y`` (and rule out a pair the layer does not allow). Size is linear in ``x``,
    BOPs and latency in ``z`` (or ``x`` for an uncovered layer), ``Ω`` in ``x`` and ``y``.
    """

    columns: list[_Column]
    equalities: csr_array
    rhs: np.ndarray
    costs: dict[str, np.ndarray]


def _allocate_pairs(
    layers: Sequence[LayerCosts],
    decisions: list[_Decision],
    activations: Sequence[ActivationCosts],
    requested: Mapping[str, float],
    time_limit_s: float,
) -> Allocation:
    """Weight and activation widths together (see :class:`_PairProgram` for the program).

    The least-perturbation choice of every decision is returned when it meets the budgets;
    the smallest total of each budget is no longer a sum of per-decision minima (a layer's
    BOPs couple its two decisions), so it is solved for, and a budget below it raises
    :class:`InfeasibleBudgetError` with it.
    """
    decision_of = {m.name: g for g, d in enumerate(decisions) for m in d.members}
    by_name = {layer.name: layer for layer in layers}
    activation_of: dict[str, int] = {}
    for t, act in enumerate(activations):
        for reader in act.readers:
            layer = by_name.get(reader)
            if layer is None:
                raise IntqError(
                    "an activation's reader is not among the layers",
                    node=act.name,
                    hint=f"its readers: {', '.join(act.readers)}",
                )
            if reader in activation_of:
                raise IntqError("the layer reads two activation decisions", node=reader)
            if layer.pair_bops is None:
                raise IntqError(
                    "the layer reads an activation decision but has no pair_bops",
                    node=reader,
                    hint="build it with LayerCosts.from_counts(..., pairs=...)",
                )
            if "latency_ms" in requested and layer.pair_latency_ms is None:
                raise IntqError(
                    "a latency budget is set but this layer has no pair_latency_ms",
                    node=reader,
                )
            activation_of[reader] = t
    covered = [layer for layer in layers if layer.name in activation_of]

    columns: list[_Column] = []
    for g, d in enumerate(decisions):
        columns += [("x", g, w, 0) for w in d.allowed]
    for t, act in enumerate(activations):
        columns += [("y", t, 0, a) for a in act.candidates]
    for i, layer in enumerate(covered):
        g, t = decision_of[layer.name], activation_of[layer.name]
        assert layer.pair_bops is not None
        columns += [
            ("z", i, w, a)
            for w in decisions[g].allowed
            for a in activations[t].candidates
            if (w, a) in layer.pair_bops
        ]
    col = {c: j for j, c in enumerate(columns)}
    n = len(columns)
    rows: list[dict[int, float]] = []
    for g, d in enumerate(decisions):
        rows.append({col[("x", g, w, 0)]: 1.0 for w in d.allowed})
    for t, act in enumerate(activations):
        rows.append({col[("y", t, 0, a)]: 1.0 for a in act.candidates})
    for i, layer in enumerate(covered):
        g, t = decision_of[layer.name], activation_of[layer.name]
        pairs = [c for c in columns if c[0] == "z" and c[1] == i]
        for w in decisions[g].allowed:
            row = {col[c]: 1.0 for c in pairs if c[2] == w}
            row[col[("x", g, w, 0)]] = -1.0
            rows.append(row)
        for a in activations[t].candidates:
            row = {col[c]: 1.0 for c in pairs if c[3] == a}
            row[col[("y", t, 0, a)]] = -1.0
            rows.append(row)
    entries = [(r, j, v) for r, row in enumerate(rows) for j, v in row.items()]
    equalities = coo_array(
        ([v for _, _, v in entries], ([r for r, _, _ in entries], [j for _, j, _ in entries])),
        shape=(len(rows), n),
    ).tocsr()
    rhs = np.array(
        [1.0] * (len(decisions) + len(activations))
        + [0.0] * (len(rows) - len(decisions) - len(activations))
    )

    def column_cost(dimension: str, c: _Column) -> float:
        kind, index, w, a = c
        if kind == "x":
            d = decisions[index]
            if dimension in ("perturbation", "size_mb"):
                return d.cost(dimension, w)
            # BOPs and latency of the members no activation decision covers.
            free = [m for m in d.members if m.name not in activation_of]
            return math.fsum(m.cost(dimension, w) for m in free)
        if kind == "y":
            return activations[index].perturbation[a] if dimension == "perturbation" else 0.0
        layer = covered[index]
        if dimension == "bops":
            assert layer.pair_bops is not None
            return layer.pair_bops[(w, a)]
        if dimension == "latency_ms":
            assert layer.pair_latency_ms is not None
            return layer.pair_latency_ms[(w, a)]
        return 0.0

    dims = ["perturbation", *requested]
    costs = {d: np.array([column_cost(d, c) for c in columns]) for d in dims}
    program = _PairProgram(columns, equalities, rhs, costs)

    def allocation(x: np.ndarray, optimal: bool) -> Allocation:
        chosen = [columns[j] for j in np.flatnonzero(x > 0.5)]
        weight = {g: w for kind, g, w, _ in chosen if kind == "x"}
        act = {t: a for kind, t, _, a in chosen if kind == "y"}
        return _pair_allocation(layers, decisions, activations, activation_of, weight, act, optimal)

    # The least-perturbation choice of every decision, when its pairs are allowed and it fits.
    greedy_w = {g: d.least_perturbation() for g, d in enumerate(decisions)}
    greedy_a = {t: act.least_perturbation() for t, act in enumerate(activations)}
    allowed = all(
        (greedy_w[decision_of[layer.name]], greedy_a[activation_of[layer.name]])
        in (layer.pair_bops or {})
        for layer in covered
    )
    if allowed:
        greedy = _pair_allocation(
            layers, decisions, activations, activation_of, greedy_w, greedy_a, True
        )
        if not _misses(greedy, requested):
            return greedy

    smallest: dict[str, float] = {}
    for dim in requested:
        x = _solve_pairs(program, dim, {}, time_limit_s)
        if x is None:
            raise IntqError(
                "no choice of widths satisfies the ties, pins and allowed pairs",
                hint="drop pins or ties, or allow more activation widths",
            )
        smallest[dim] = getattr(allocation(x, True), dim)
    if any(_over(smallest[d], requested[d]) for d in requested):
        raise InfeasibleBudgetError(requested, smallest)
    cuts: list[np.ndarray] = []
    for _ in range(_MAX_CUTS + 1):
        x = _solve_pairs(program, "perturbation", requested, time_limit_s, cuts)
        if x is None:
            raise InfeasibleBudgetError(requested, smallest)
        result = allocation(x, True)
        if not _misses(result, requested):
            return result
        # Over in floats though not for HiGHS: forbid this exact choice and solve again.
        cut = np.zeros(n)
        cut[[j for j, c in enumerate(columns) if c[0] != "z" and x[j] > 0.5]] = 1.0
        cuts.append(cut)
    raise NumericsError(
        f"the solver kept returning allocations just over the budget ({_MAX_CUTS} cut off)",
        hint="loosen the budget by a relative 1e-6",
    )


def _solve_pairs(
    program: _PairProgram,
    objective: str,
    requested: Mapping[str, float],
    time_limit_s: float,
    cuts: Sequence[np.ndarray] = (),
) -> np.ndarray | None:
    """Minimise ``objective`` over the program within ``requested`` (each row's bound less
    its known minimum, scaled to [0, 1] as :func:`_solve` does); ``None`` when infeasible."""
    n = len(program.columns)

    def scaled(row: np.ndarray) -> tuple[np.ndarray, float]:
        scale = float(np.abs(row).max(initial=0.0))
        return (row / scale if scale > 0 else row), scale

    c, _ = scaled(program.costs[objective])
    blocks = [program.equalities]
    lower = [program.rhs]
    upper = [program.rhs]
    for d, bound in requested.items():
        row, scale = scaled(program.costs[d])
        if scale == 0:
            continue
        blocks.append(csr_array(row.reshape(1, n)))
        lower.append(np.array([-np.inf]))
        # The costs are not shifted here (the choices of a layer are spread over columns), so
        # the slack is relative to the bound; the float check in the caller rejects the rest.
        upper.append(np.array([(bound + 2 * RELATIVE_TOLERANCE * abs(bound)) / scale]))
    for cut in cuts:
        blocks.append(csr_array(cut.reshape(1, n)))
        lower.append(np.array([-np.inf]))
        upper.append(np.array([cut.sum() - 1.0]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
        result = milp(
            c,
            integrality=np.ones(n),
            bounds=Bounds(0.0, 1.0),
            constraints=LinearConstraint(
                vstack(blocks).tocsr(), np.concatenate(lower), np.concatenate(upper)
            ),
            options={"time_limit": time_limit_s, "mip_rel_gap": 0.0, **_HIGHS_OPTIONS},
        )
    if result.status == 2 or result.x is None:
        return None
    return np.asarray(result.x)


def _pair_allocation(
    layers: Sequence[LayerCosts],
    decisions: list[_Decision],
    activations: Sequence[ActivationCosts],
    activation_of: Mapping[str, int],
    weight: Mapping[int, int],
    act: Mapping[int, int],
    optimal: bool,
) -> Allocation:
    """The :class:`Allocation` of a weight width per decision and a width per activation."""
    bits = {m.name: weight[g] for g, d in enumerate(decisions) for m in d.members}
    bits = {layer.name: bits[layer.name] for layer in layers}
    input_bits = {name: act[t] for name, t in activation_of.items()}
    partial = Allocation(
        bits,
        0.0,
        0.0,
        0.0,
        None,
        optimal,
        tuple(layers),
        {a.name: act[t] for t, a in enumerate(activations)},
        input_bits,
        tuple(activations),
    )
    with_latency = all(
        layer.latency_ms is not None
        or (layer.name in activation_of and layer.pair_latency_ms is not None)
        for layer in layers
    )
    perturbation = math.fsum(
        [layer.perturbation[bits[layer.name]] for layer in layers]
        + [a.perturbation[act[t]] for t, a in enumerate(activations)]
    )
    return Allocation(
        bits,
        perturbation,
        math.fsum(layer.cost("size_mb", bits[layer.name]) for layer in layers),
        math.fsum(partial._layer_bops(layer) for layer in layers),
        math.fsum(partial._layer_latency(layer) for layer in layers) if with_latency else None,
        optimal,
        tuple(layers),
        partial.activations,
        input_bits,
        tuple(activations),
    )


__all__ = [
    "BITS_PER_MB",
    "RELATIVE_TOLERANCE",
    "ActivationCosts",
    "Allocation",
    "Budget",
    "InfeasibleBudgetError",
    "LayerCosts",
    "allocate_bits",
]
