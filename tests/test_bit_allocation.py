"""The HAWQ-V3 bit-allocation ILP against brute force, its budgets, ties, pins and errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from intq.errors import IntqError, NumericsError
from intq.passes import bit_allocation
from intq.passes.bit_allocation import (
    BITS_PER_MB,
    Allocation,
    Budget,
    InfeasibleBudgetError,
    LayerCosts,
    allocate_bits,
)
from intq.passes.precision import LayerBits

DIMENSIONS = ("size_mb", "bops", "latency_ms")
COSTS = st.floats(0.0, 1e3, allow_nan=False, allow_infinity=False)


def over(total: float, bound: float) -> bool:
    return total > bound + 1e-9 * max(abs(bound), abs(total))


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-300)


def optimal(perturbation: float, best: float, layers) -> bool:
    """Equal within 1e-9 relative, or within 1e-9 of the spread of Ω (the module's promise)."""
    spread = math.fsum(
        max(la.perturbation.values()) - min(la.perturbation.values()) for la in layers
    )
    return perturbation >= best and perturbation - best <= 1e-9 * max(best, spread)


def components(names: list[str], ties: list[list[str]]) -> dict[str, int]:
    """Layer name -> index of its tie component (a plain fixed point, independent of the module)."""
    label = {name: i for i, name in enumerate(names)}
    changed = True
    while changed:
        changed = False
        for tie in ties:
            low = min(label[n] for n in tie)
            for n in tie:
                if label[n] != low:
                    label[n], changed = low, True
    return label


@st.composite
def problems(draw):
    """2-8 layers with random costs, random ties (same candidates) and consistent pins."""
    n = draw(st.integers(2, 8))
    with_latency = draw(st.booleans())
    layers = []
    for i in range(n):
        candidates = draw(st.sampled_from([(4, 8), (2, 4, 8)]))

        def costs(scale: float, cs=candidates) -> dict[int, float]:
            return {b: draw(COSTS) * scale for b in cs}

        layers.append(
            LayerCosts(
                f"layer{i}",
                perturbation=costs(1.0),
                size_bits=costs(1e4),
                bops=costs(1e7),
                latency_ms=costs(1e-3) if with_latency else None,
            )
        )
    names = [layer.name for layer in layers]
    by_name = {layer.name: layer for layer in layers}
    ties = []
    for _ in range(draw(st.integers(0, 3))):
        tie = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
        if len({by_name[t].candidates for t in tie}) == 1:
            ties.append(tie)
    component = components(names, ties)
    pins: dict[str, int] = {}
    pinned_components: dict[int, int] = {}
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        bits = pinned_components.get(component[name])
        if bits is None:
            bits = draw(st.sampled_from(by_name[name].candidates))
            pinned_components[component[name]] = bits
        pins[name] = bits
    return layers, ties, pins


def assignments(layers, ties, pins):
    """Every choice of one candidate per layer that respects the ties and pins."""
    component = components([layer.name for layer in layers], ties)
    for choice in itertools.product(*(layer.candidates for layer in layers)):
        bits = {layer.name: b for layer, b in zip(layers, choice)}
        if any(bits[name] != b for name, b in pins.items()):
            continue
        shared: dict[int, int] = {}
        if all(shared.setdefault(component[name], b) == b for name, b in bits.items()):
            yield bits


def totals(layers, bits) -> dict[str, float]:
    out = {
        "perturbation": math.fsum(layer.perturbation[bits[layer.name]] for layer in layers),
        "size_mb": math.fsum(layer.size_bits[bits[layer.name]] for layer in layers) / BITS_PER_MB,
        "bops": math.fsum(layer.bops[bits[layer.name]] for layer in layers),
    }
    if all(layer.latency_ms is not None for layer in layers):
        out["latency_ms"] = math.fsum(layer.latency_ms[bits[layer.name]] for layer in layers)
    return out


def check_allocation(allocation: Allocation, layers, ties, pins, budget: Budget) -> None:
    assert set(allocation.bits) == {layer.name for layer in layers}
    for tie in ties:
        assert len({allocation.bits[name] for name in tie}) == 1
    for name, b in pins.items():
        assert allocation.bits[name] == b
    got = totals(layers, allocation.bits)
    assert close(allocation.perturbation, got["perturbation"])
    for d, bound in budget.given().items():
        assert not over(getattr(allocation, d), bound)
        assert close(getattr(allocation, d), got[d])


@settings(max_examples=300, deadline=None)
@given(problems(), st.data())
def test_matches_brute_force(problem, data):
    layers, ties, pins = problem
    choices = [totals(layers, bits) for bits in assignments(layers, ties, pins)]
    dims = [d for d in DIMENSIONS if d in choices[0]]
    lows = {d: min(c[d] for c in choices) for d in dims}
    highs = {d: max(c[d] for c in choices) for d in dims}
    given_dims = data.draw(st.lists(st.sampled_from(dims), unique=True), label="budgets")
    # Budgets from a little below the smallest total to a little above the largest.
    where = {d: data.draw(st.floats(-0.2, 1.1), label=d) for d in given_dims}
    budget = Budget(**{d: max(lows[d] + where[d] * (highs[d] - lows[d]), 0.0) for d in where})
    bounds = budget.given()

    feasible = [c for c in choices if not any(over(c[d], b) for d, b in bounds.items())]
    if feasible:
        allocation = allocate_bits(layers, budget, ties=ties, pins=pins)
        check_allocation(allocation, layers, ties, pins, budget)
        best = min(c["perturbation"] for c in feasible)
        assert optimal(allocation.perturbation, best, layers)
    else:
        with pytest.raises(InfeasibleBudgetError) as caught:
            allocate_bits(layers, budget, ties=ties, pins=pins)
        error = caught.value
        assert error.requested == bounds
        assert set(error.smallest) == set(bounds)
        for d in bounds:
            assert close(error.smallest[d], lows[d])
            label = {"size_mb": "size", "bops": "BOPs", "latency_ms": "latency"}[d]
            assert f"{label} budget {bounds[d]:.6g}" in str(error)
            assert f"{error.smallest[d]:.6g}" in str(error)
        assert set(error.infeasible) == {d for d in bounds if over(lows[d], bounds[d])}

    # A budget at exactly the smallest reachable total is feasible, and reaches it.
    for d in dims:
        at_minimum = Budget(**{d: lows[d]})
        allocation = allocate_bits(layers, at_minimum, ties=ties, pins=pins)
        check_allocation(allocation, layers, ties, pins, at_minimum)
        # Any total within the tolerance over the minimum fits; the cheapest is no further.
        assert math.isclose(getattr(allocation, d), lows[d], rel_tol=2e-9)
        best = min(c["perturbation"] for c in choices if not over(c[d], lows[d]))
        assert optimal(allocation.perturbation, best, layers)


def fixed_problem(n: int = 12, seed: int = 7) -> list[LayerCosts]:
    """HAWQ-shaped costs: fewer bits perturb more and cost less, sizes and MACs vary widely."""
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(n):
        params = int(rng.integers(500, 500_000))
        omega = {b: float(rng.uniform(0.5, 2.0) * params * 4.0**-b) for b in (2, 4, 8)}
        layers.append(
            LayerCosts.from_counts(
                f"conv{i}", omega, params=params, macs=params * int(rng.integers(1, 3000))
            )
        )
    return layers


FIXED = fixed_problem()
FIXED_TIES, FIXED_PINS = [["conv3", "conv4"]], {"conv0": 8, "conv11": 8}
# Each total ranges from all layers at 2 bits to all at 8 (costs grow with bits), pins at 8.
FIXED_RANGE = {
    d: tuple(
        math.fsum(layer.cost(d, FIXED_PINS.get(layer.name, b)) for layer in FIXED) for b in (2, 8)
    )
    for d in ("size_mb", "bops")
}


@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_a_looser_budget_never_perturbs_more(s1, s2, b1, b2):
    def budget(s: float, b: float) -> Budget:
        (s_lo, s_hi), (b_lo, b_hi) = FIXED_RANGE["size_mb"], FIXED_RANGE["bops"]
        return Budget(size_mb=s_lo + s * (s_hi - s_lo), bops=b_lo + b * (b_hi - b_lo))

    tight, loose = budget(min(s1, s2), min(b1, b2)), budget(max(s1, s2), max(b1, b2))
    ties, pins = FIXED_TIES, FIXED_PINS
    try:
        tight_allocation = allocate_bits(FIXED, tight, ties=ties, pins=pins)
    except InfeasibleBudgetError:
        assume(False)
    loose_allocation = allocate_bits(FIXED, loose, ties=ties, pins=pins)
    assert loose_allocation.perturbation <= tight_allocation.perturbation * (1 + 1e-9)
    for single in (Budget(size_mb=loose.size_mb), Budget(bops=loose.bops)):
        # Dropping a budget loosens it too.
        assert allocate_bits(FIXED, single, ties=ties, pins=pins).perturbation <= (
            loose_allocation.perturbation * (1 + 1e-9)
        )


def test_moderate_problem_meets_its_budget():
    layers = fixed_problem(200, seed=1)
    layers = [
        LayerCosts(
            la.name, *({b: m[b] for b in (4, 8)} for m in (la.perturbation, la.size_bits, la.bops))
        )
        for la in layers
    ]
    low = math.fsum(layer.cost("size_mb", 4) for layer in layers)
    high = math.fsum(layer.cost("size_mb", 8) for layer in layers)
    budget = Budget(size_mb=low + 0.4 * (high - low))
    allocation = allocate_bits(layers, budget, pins={"conv0": 8, "conv199": 8})
    check_allocation(allocation, layers, [], {"conv0": 8, "conv199": 8}, budget)
    assert allocation.optimal
    assert set(allocation.bits.values()) == {4, 8}


# ----- the answer, its table, and the way to the quantizer -----------------------------------


def two_layers(latency: bool = True) -> list[LayerCosts]:
    return [
        LayerCosts(
            "stem",
            perturbation={4: 5.0, 8: 1.0},
            size_bits={4: 4 * 2**20, 8: 8 * 2**20},
            bops={4: 400.0, 8: 800.0},
            latency_ms={4: 0.5, 8: 0.9} if latency else None,
        ),
        LayerCosts(
            "fc",
            perturbation={4: 3.0, 8: 0.0},
            size_bits={4: 2 * 2**20, 8: 4 * 2**20},
            bops={4: 100.0, 8: 200.0},
            latency_ms={4: 0.3, 8: 0.2} if latency else None,  # unpacking 4 bits: slower
        ),
    ]


def test_no_budget_is_the_least_perturbation_choice():
    allocation = allocate_bits(two_layers(), Budget())
    assert allocation.bits == {"stem": 8, "fc": 8}
    assert (allocation.perturbation, allocation.size_mb, allocation.bops) == (1.0, 1.5, 1000.0)
    assert allocation.latency_ms == pytest.approx(1.1)
    assert allocation.optimal


def test_budgets_pick_the_cheaper_perturbation():
    # 1.25 MB: one layer must drop to 4 bits; fc loses 3, stem 4, so fc drops.
    allocation = allocate_bits(two_layers(), Budget(size_mb=1.25))
    assert allocation.bits == {"stem": 8, "fc": 4}
    # A latency of 1.0 ms forces stem down instead, and then fc fits at 8 bits.
    allocation = allocate_bits(two_layers(), Budget(size_mb=1.25, latency_ms=1.0))
    assert allocation.bits == {"stem": 4, "fc": 8}
    assert allocation.perturbation == 5.0


def test_table_and_layer_bits():
    allocation = allocate_bits(two_layers(), Budget(size_mb=1.25))
    lines = allocation.table().splitlines()
    assert lines[0].split() == ["layer", "bits", "Ω", "size", "MB", "BOPs", "latency", "ms"]
    assert lines[2].split() == ["stem", "8", "1", "1", "800", "0.9"]
    assert lines[3].split() == ["fc", "4", "3", "0.25", "100", "0.3"]
    assert lines[-1].split() == ["total", "4", "1.25", "900", "1.2"]
    assert len({len(line) for line in lines}) == 1  # aligned
    assert "latency" not in allocate_bits(two_layers(latency=False), Budget()).table()
    assert allocation.layer_bits(activations=8) == {
        "stem": LayerBits(8, 8),
        "fc": LayerBits(4, 8),
    }


def test_from_counts():
    layer = LayerCosts.from_counts("c", {4: 2.0, 8: 1.0}, params=10, macs=100, activation_bits=6)
    assert layer.size_bits == {4: 40.0, 8: 80.0}
    assert layer.bops == {4: 2400.0, 8: 4800.0}
    assert layer.candidates == (4, 8)


def test_ties_and_pins_are_obeyed_against_the_cheaper_choice():
    # Without the tie fc would drop alone; tied, both drop (only 4 + 4 fits, stem pinned away).
    layers = two_layers()
    allocation = allocate_bits(layers, Budget(size_mb=1.25), ties=[["stem", "fc"]])
    assert allocation.bits == {"stem": 4, "fc": 4}
    allocation = allocate_bits(layers, Budget(size_mb=1.25), pins={"fc": 8})
    assert allocation.bits == {"stem": 4, "fc": 8}


def test_an_answer_over_budget_in_floats_is_cut_off(monkeypatch):
    # Stand in for HiGHS returning, within its tolerance, a choice that is over the budget.
    real_milp = bit_allocation.milp
    calls = []

    def first_answer_over_budget(c, **kwargs):
        result = real_milp(c, **kwargs)
        if not calls:
            result.x = np.array([0.0, 1.0, 0.0, 1.0])  # both at 8 bits: 1.5 MB
        calls.append(kwargs["constraints"].A.shape[0])
        return result

    monkeypatch.setattr(bit_allocation, "milp", first_answer_over_budget)
    allocation = allocate_bits(two_layers(), Budget(size_mb=1.25))
    assert allocation.bits == {"stem": 8, "fc": 4}
    assert calls == [3, 4]  # two one-each rows + the size row, then one cut more


# ----- infeasible budgets ---------------------------------------------------------------------


def test_infeasible_size_reports_the_smallest_model():
    with pytest.raises(InfeasibleBudgetError) as caught:
        allocate_bits(two_layers(), Budget(size_mb=1.2, bops=10_000.0), pins={"stem": 8})
    error = caught.value
    assert isinstance(error, IntqError)
    assert error.requested == {"size_mb": 1.2, "bops": 10_000.0}
    assert error.smallest == {"size_mb": 1.25, "bops": 900.0}
    assert error.infeasible == ("size_mb",)
    assert (
        "size budget 1.2 MB is infeasible: the smallest model with these ties and pins is 1.25 MB"
        in str(error)
    )
    assert "BOPs budget 10000 alone is met (the fewest BOPs: 900)" in str(error)


def test_budgets_feasible_alone_but_not_together():
    # 0.75 MB needs both layers at 4 bits (0.8 ms); 0.75 ms needs fc at 8 bits.
    with pytest.raises(InfeasibleBudgetError) as caught:
        allocate_bits(two_layers(), Budget(size_mb=0.75, latency_ms=0.75))
    error = caught.value
    assert error.infeasible == ()
    assert str(error).startswith("the budgets cannot all be met at once")
    assert "latency budget 0.75 ms alone is met (the lowest latency: 0.7 ms)" in str(error)


def test_infeasible_latency_and_bops_messages():
    with pytest.raises(
        InfeasibleBudgetError,
        match=r"latency budget 0.5 ms is infeasible: "
        r"the lowest latency with these ties and pins is 0.7 ms",
    ):
        allocate_bits(two_layers(), Budget(latency_ms=0.5))
    with pytest.raises(
        InfeasibleBudgetError,
        match=r"BOPs budget 100 is infeasible: the fewest"
        r" BOPs with these ties and pins is 500",
    ):
        allocate_bits(two_layers(), Budget(bops=100.0))


# ----- validation -----------------------------------------------------------------------------


def test_validation_errors():
    layers = two_layers()
    cases = [
        (lambda: allocate_bits([], Budget()), IntqError, "no layers to allocate bits to"),
        (
            lambda: allocate_bits([layers[0], layers[0]], Budget()),
            IntqError,
            "node 'stem': two layers have this name",
        ),
        (
            lambda: allocate_bits(layers, Budget(), ties=[["stem", "head"]]),
            IntqError,
            "node 'head': a tie names a layer that is not among the layers",
        ),
        (
            lambda: allocate_bits(layers, Budget(), ties=["stem"]),
            IntqError,
            "each tie is a sequence of layer names, got the string 'stem'",
        ),
        (
            lambda: allocate_bits(layers, Budget(), pins={"head": 8}),
            IntqError,
            "node 'head': a pin names a layer that is not among the layers",
        ),
        (
            lambda: allocate_bits(layers, Budget(), pins={"fc": 2}),
            IntqError,
            "node 'fc': pinned to 2 bits, which is not a candidate (4, 8)",
        ),
        (
            lambda: allocate_bits(
                layers, Budget(), ties=[["stem", "fc"]], pins={"stem": 4, "fc": 8}
            ),
            IntqError,
            "tied layers are pinned to different bit widths",
        ),
        (
            lambda: allocate_bits(two_layers(latency=False), Budget(latency_ms=1.0)),
            IntqError,
            "node 'stem': a latency budget is set but this layer has no latency table",
        ),
        (
            lambda: allocate_bits(layers, Budget(size_mb=1.0), time_limit_s=0),
            IntqError,
            "time_limit_s must be positive",
        ),
    ]
    three = LayerCosts("three", {2: 1.0, 4: 0.5, 8: 0.0}, {2: 2, 4: 4, 8: 8}, {2: 1, 4: 2, 8: 3})
    cases.append(
        (
            lambda: allocate_bits([*layers, three], Budget(), ties=[["fc", "three"]]),
            IntqError,
            "node 'fc': tied to 'three' but their candidate bit widths differ: (4, 8) vs (2, 4, 8)",
        )
    )
    for call, kind, message in cases:
        with pytest.raises(kind) as caught:
            call()
        assert message in str(caught.value), str(caught.value)
        assert not isinstance(caught.value, InfeasibleBudgetError)


def test_layer_and_budget_validation_errors():
    ok = {4: 1.0, 8: 2.0}
    with pytest.raises(IntqError, match="node 'x': the layer has no candidate bit widths"):
        LayerCosts("x", {}, {}, {})
    with pytest.raises(IntqError, match="non-empty string"):
        LayerCosts("", ok, ok, ok)
    with pytest.raises(IntqError, match=r"size_bits has bit widths \[4\] but the candidates"):
        LayerCosts("x", ok, {4: 1.0}, ok)
    with pytest.raises(IntqError, match=r"latency_ms has bit widths \[4, 6\]"):
        LayerCosts("x", ok, ok, ok, latency_ms={4: 1.0, 6: 1.0})
    with pytest.raises(IntqError, match="candidate bit width True is not a positive int"):
        LayerCosts("x", {True: 1.0}, {True: 1.0}, {True: 1.0})
    with pytest.raises(IntqError, match="candidate bit width 0 is not a positive int"):
        LayerCosts("x", {0: 1.0}, {0: 1.0}, {0: 1.0})
    with pytest.raises(NumericsError, match=r"node 'x': perturbation\[4\] = -1.0: costs must be"):
        LayerCosts("x", {4: -1.0, 8: 0.0}, ok, ok)
    with pytest.raises(NumericsError, match=r"bops\[8\] = nan"):
        LayerCosts("x", ok, ok, {4: 1.0, 8: float("nan")})
    with pytest.raises(NumericsError, match=r"size_bits\[4\] = inf"):
        LayerCosts("x", ok, {4: math.inf, 8: 1.0}, ok)
    with pytest.raises(NumericsError, match="size_mb budget nan is not finite"):
        Budget(size_mb=float("nan"))
    with pytest.raises(IntqError, match="bops budget -1.0 is negative"):
        Budget(bops=-1.0)


def test_layer_costs_own_their_maps():
    costs = {4: 1.0, 8: 2.0}
    layer = LayerCosts("x", costs, dict(costs), dict(costs))
    costs[4] = 100.0
    assert layer.perturbation[4] == 1.0
