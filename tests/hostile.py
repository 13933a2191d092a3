"""Hostile inputs, each run in a child process under a time and an address-space limit.

A *case* is one crafted or mutated input fed to one intq entry point: a module-level
function (so that a child process can find it) and its picklable arguments, tagged with the
*class* of failure it probes. The harness runs every case in a fresh process forked from a
server that has imported intq once, so that a case that hangs is killed, a case that tries
to allocate terabytes meets ``RLIMIT_AS`` instead of the machine, and a case that crashes
the interpreter is counted rather than taking the test run with it. Each ends in one
:class:`Outcome`; the bad ones are what the README promises never happen.

    results = run_cases(case_list)
    print(table(results))
    assert not failures(results)

``tests/test_hostile*.py`` run a few cases per class in ``make test``; ``make fuzz`` runs many
more through ``python tests/hostile.py --cases N``.
"""

from __future__ import annotations

import argparse
import enum
import multiprocessing
import os
import random
import resource
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

CASE_SECONDS = 30.0
"""Wall-clock limit of one case: a case still running then is a hang."""

CASE_MEMORY = 3 << 30
"""Address space one case may add to what the process held when it started (3 GiB)."""


class Outcome(enum.Enum):
    """How one case ended."""

    OK = "ok"  # a result
    REFUSED = "refused"  # an IntqError with a message
    FOREIGN = "foreign exception"  # any other exception escaped intq
    HANG = "hang"  # still running after CASE_SECONDS
    MEMORY = "memory blowup"  # MemoryError, or killed when the address space ran out
    CRASH = "crash"  # the process died on a signal
    DISAGREE = "backend disagreement"  # raised Disagreement
    LEFTOVER = "files left behind"  # raised LeftBehind

    @property
    def bad(self) -> bool:
        """Whether this outcome breaks intq's promise on hostile input."""
        return self not in (Outcome.OK, Outcome.REFUSED)


class Disagreement(AssertionError):
    """Raised by a case whose backends (or a backend and the reference) gave different bits."""


class LeftBehind(AssertionError):
    """Raised by a case that found files intq should have removed."""


@dataclass(frozen=True)
class Case:
    """One hostile input: ``run(directory, *args)`` in a fresh, empty ``directory``."""

    kind: str  # the class of failure it probes ("numerics", "hangs", "memory", ...)
    name: str
    run: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Result:
    """How ``case`` ended, in how long, with the message or traceback when it matters."""

    case: Case
    outcome: Outcome
    seconds: float
    detail: str = ""


@dataclass
class Limits:
    """What one case may use, and what the fork server imports once for all cases."""

    seconds: float = CASE_SECONDS
    memory: int = CASE_MEMORY
    preload: Sequence[str] = field(
        default_factory=lambda: ["intq", "numpy", "onnx", "onnxruntime", "tvm", "torch"]
    )


def _address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(conn: Connection, case: Case, directory: str, memory: int) -> None:
    """Run one case and send back (outcome name, detail)."""
    import intq  # imported by the fork server already: this costs nothing

    limit = _address_space() + memory
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        case.run(Path(directory), *case.args)
        reply = (Outcome.OK.name, "")
    except intq.IntqError as err:
        if err.message.strip():
            reply = (Outcome.REFUSED.name, str(err).splitlines()[0][:300])
        else:
            reply = (Outcome.FOREIGN.name, f"{type(err).__name__} without a message")
    except MemoryError:
        reply = (Outcome.MEMORY.name, traceback.format_exc(limit=-3))
    except Disagreement as err:
        reply = (Outcome.DISAGREE.name, str(err)[:2000])
    except LeftBehind as err:
        reply = (Outcome.LEFTOVER.name, str(err)[:2000])
    except BaseException:  # anything else escaping intq is the finding
        reply = (Outcome.FOREIGN.name, traceback.format_exc(limit=-6))
    conn.send(reply)
    conn.close()


def _context(preload: Sequence[str]) -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    return context


def run_case(case: Case, limits: Limits | None = None) -> Result:
    """Run ``case`` in a child process of its own; never raises for what the case does."""
    limits = limits or Limits()
    context = _context(limits.preload)
    with tempfile.TemporaryDirectory(prefix="intq-hostile-") as directory:
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_child, args=(sender, case, directory, limits.memory))
        start = time.perf_counter()
        process.start()
        sender.close()
        ready = receiver.poll(limits.seconds)
        seconds = time.perf_counter() - start
        if not ready:
            process.kill()
            process.join()
            return Result(case, Outcome.HANG, seconds, f"still running after {limits.seconds} s")
        try:
            name, detail = receiver.recv()
        except EOFError:  # died before replying
            process.join()
            code = process.exitcode
            if code is not None and code < 0:
                outcome = Outcome.MEMORY if -code == 9 else Outcome.CRASH
                return Result(case, outcome, seconds, f"killed by signal {-code}")
            return Result(case, Outcome.CRASH, seconds, f"exited with {code} before replying")
        process.join()
        return Result(case, Outcome[name], seconds, detail)


def run_cases(cases: Iterable[Case], limits: Limits | None = None) -> list[Result]:
    """Run every case, one child process each."""
    return [run_case(case, limits) for case in cases]


def failures(results: Iterable[Result]) -> list[Result]:
    """The results with a bad outcome."""
    return [r for r in results if r.outcome.bad]


def tally(results: Iterable[Result]) -> dict[str, Counter[Outcome]]:
    """Outcome counts per case class."""
    counts: dict[str, Counter[Outcome]] = {}
    for result in results:
        counts.setdefault(result.case.kind, Counter())[result.outcome] += 1
    return counts


def table(results: Sequence[Result]) -> str:
    """A per-class table of outcome counts and the slowest case, as the fuzz run prints it."""
    columns = list(Outcome)
    header = ["class", *(o.value for o in columns), "slowest s"]
    rows = []
    for kind, counts in sorted(tally(results).items()):
        slowest = max(r.seconds for r in results if r.case.kind == kind)
        rows.append([kind, *(str(counts[o]) for o in columns), f"{slowest:.1f}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report(results: Sequence[Result]) -> str:
    """The failures, one paragraph each: what a failing test prints."""
    return "\n\n".join(
        f"[{r.case.kind}] {r.case.name}: {r.outcome.value} after {r.seconds:.1f} s\n{r.detail}"
        for r in failures(results)
    )


# ----- helpers for writing cases ------------------------------------------------------------


def nothing_left(directory: Path, expected: Iterable[str] = ()) -> None:
    """Raise :class:`LeftBehind` if ``directory`` holds files other than ``expected``."""
    extra = sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and p.name not in set(expected)
    )
    if extra:
        raise LeftBehind(f"left in {directory}: {', '.join(extra[:10])}")


def same_bits(outputs: dict[str, Any], reference: dict[str, Any], what: str) -> None:
    """Raise :class:`Disagreement` unless both mappings hold bit-identical arrays."""
    import numpy as np

    for name, want in reference.items():
        got = outputs[name]
        if got.dtype != want.dtype or got.shape != want.shape:
            raise Disagreement(
                f"{what}: output {name!r} is {got.dtype}{got.shape}, "
                f"the reference {want.dtype}{want.shape}"
            )
        # 1-d first: a rank-0 array cannot be viewed as bytes.
        got_bytes, want_bytes = got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8)
        if not np.array_equal(got_bytes, want_bytes):
            diff = np.flatnonzero(got_bytes != want_bytes)
            raise Disagreement(f"{what}: output {name!r} differs at {diff.size} bytes")


# ----- the fuzz run (make fuzz) -------------------------------------------------------------

CaseSource = Callable[[random.Random, int], Iterator[Case]]
"""``source(rng, n)``: up to ``n`` cases of one area, drawn with ``rng``."""


def sources() -> dict[str, CaseSource]:
    """Every area's case source, by module: each ``tests/hostile_*.py`` defines ``cases``."""
    found: dict[str, CaseSource] = {}
    here = Path(__file__).parent
    for path in sorted(here.glob("hostile_*.py")):
        module = __import__(path.stem)
        found[path.stem.removeprefix("hostile_")] = module.cases
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``--cases`` cases of every area and print the per-class table; 1 on any failure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200, help="cases per area")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--area", action="append", help="only these areas (repeatable)")
    args = parser.parse_args(argv)
    results: list[Result] = []
    for area, source in sources().items():
        if args.area and area not in args.area:
            continue
        start = time.perf_counter()
        batch = run_cases(source(random.Random(args.seed), args.cases))
        results += batch
        print(f"{area}: {len(batch)} cases in {time.perf_counter() - start:.0f} s", flush=True)
    print(table(results))
    bad = failures(results)
    if bad:
        print("\n" + report(results))
    return 1 if bad else 0


if __name__ == "__main__":
    # Run as the module ``hostile``, not ``__main__``, so that parent, children and the
    # ``hostile_*`` modules share one set of classes.
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import hostile

    sys.exit(hostile.main())
