"""Solve time of the HAWQ-V3 bit-allocation ILP on random 50-, 200- and 1000-layer problems.

Run from the repository root::

    .venv/bin/python -m benchmarks.ilp_solve_time              # 3 repeats per problem
    .venv/bin/python -m benchmarks.ilp_solve_time --repeats 5 --seed 1

Each problem is HAWQ-shaped: per layer a weight count (500 to 2M) and MACs, ``Ω(b)``
falling about 4x per extra bit with random per-layer sensitivity, size ``params * b`` bits and
BOPs ``MACs * b * 8``. The first and last layers are pinned to 8 bits and every fourth layer
is tied to the one before it (a residual shortcut and its branch). Budgets sit 40% of the way
from the smallest to the largest model (size alone; then size and BOPs at 40% and 50%), for
candidates (4, 8) and (2, 4, 8). The time is the whole :func:`allocate_bits` call (building
the program, HiGHS, the float check), median over the repeats; solve times are not asserted
anywhere in the tests.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np

from intq.passes.bit_allocation import Budget, LayerCosts, allocate_bits


def problem(n: int, candidates: tuple[int, ...], rng: np.random.Generator) -> list[LayerCosts]:
    layers = []
    for i in range(n):
        params = int(rng.integers(500, 2_000_000))
        sensitivity = float(rng.lognormal(0.0, 2.0))
        omega = {
            b: sensitivity * params * 4.0**-b * float(rng.uniform(0.8, 1.25)) for b in candidates
        }
        macs = params * int(rng.integers(1, 3000))
        layers.append(LayerCosts.from_counts(f"layer{i}", omega, params=params, macs=macs))
    return layers


def between(layers: list[LayerCosts], dimension: str, where: float, pins: dict[str, int]) -> float:
    """The total ``where`` of the way from every layer at its fewest bits to its most."""
    low, high = (
        math.fsum(
            layer.cost(dimension, pins.get(layer.name, pick(layer.candidates))) for layer in layers
        )
        for pick in (min, max)
    )
    return low + where * (high - low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(
        f"{'layers':>6}  {'candidates':<10}  {'budget':<12}  {'variables':>9}  "
        f"{'median s':>9}  {'max s':>7}  optimal  bits used"
    )
    for n in (50, 200, 1000):
        for candidates in ((4, 8), (2, 4, 8)):
            rng = np.random.default_rng(args.seed)
            layers = problem(n, candidates, rng)
            pins = {layers[0].name: 8, layers[-1].name: 8}
            ties = [[layers[i - 1].name, layers[i].name] for i in range(4, n - 1, 4)]
            budgets = {
                "size": Budget(size_mb=between(layers, "size_mb", 0.4, pins)),
                "size+BOPs": Budget(
                    size_mb=between(layers, "size_mb", 0.4, pins),
                    bops=between(layers, "bops", 0.5, pins),
                ),
            }
            for label, budget in budgets.items():
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    allocation = allocate_bits(layers, budget, ties=ties, pins=pins)
                    times.append(time.perf_counter() - start)
                variables = (n - len(ties) - len(pins)) * len(candidates) + len(pins)
                used = sorted(set(allocation.bits.values()))
                print(
                    f"{n:>6}  {candidates!s:<10}  {label:<12}  {variables:>9}  "
                    f"{statistics.median(times):>9.3f}  {max(times):>7.3f}  "
                    f"{allocation.optimal!s:<7}  {used}"
                )


if __name__ == "__main__":
    main()
