"""Hostile inputs of every class end well: a result or an IntqError, bounded in time and memory.

Each ``tests/hostile_*.py`` module is one area's source of cases (see ``tests/hostile.py``);
this runs a few of each here and ``make fuzz`` runs many more. The first tests check that the
harness itself tells the outcomes apart.
"""

from __future__ import annotations

import random
from pathlib import Path

import hostile
import numpy as np
import pytest
from hostile import Case, Outcome

import intq

CASES_PER_AREA = 12


def _returns(directory: Path) -> int:
    return 1


def _refuses(directory: Path) -> None:
    raise intq.IntqError("refused on purpose")


def _escapes(directory: Path) -> None:
    raise ValueError("a foreign exception")


def _hangs(directory: Path) -> None:
    while True:
        pass


def _allocates(directory: Path, nbytes: int) -> None:
    np.ones(nbytes, np.uint8)


def _disagrees(directory: Path) -> None:
    raise hostile.Disagreement("the backends differ")


def _dies(directory: Path) -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


@pytest.mark.parametrize(
    ("run", "args", "outcome"),
    [
        (_returns, (), Outcome.OK),
        (_refuses, (), Outcome.REFUSED),
        (_escapes, (), Outcome.FOREIGN),
        (_hangs, (), Outcome.HANG),
        (_allocates, (16 << 30,), Outcome.MEMORY),
        (_disagrees, (), Outcome.DISAGREE),
        (_dies, (), Outcome.CRASH),
    ],
)
def test_the_harness_tells_outcomes_apart(run, args, outcome):
    result = hostile.run_case(Case("harness", run.__name__, run, args), hostile.Limits(seconds=5))
    assert result.outcome is outcome, result.detail
    assert result.outcome.bad == (outcome not in (Outcome.OK, Outcome.REFUSED))


@pytest.mark.parametrize("area", sorted(hostile.sources()))
def test_hostile_inputs_end_well(area):
    results = hostile.run_cases(hostile.sources()[area](random.Random(0), CASES_PER_AREA))
    assert results, f"area {area} gave no cases"
    print(hostile.table(results))
    assert not hostile.failures(results), hostile.report(results)
