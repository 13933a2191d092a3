"""MetaSchedule tuning against the hand schedules, on one integer kernel.

Run from the repository root (the ``dev`` extra installed)::

    .venv/bin/python -m benchmarks.tvm_tuning --kernel depthwise --trials 64
    .venv/bin/python -m benchmarks.tvm_tuning --kernel matmul16 --trials 64 --db out/tuning

The kernels (batch 1, requantized to 8 bits in the same kernel):

* ``depthwise``: a 3x3 stride-2 depthwise ``QConv`` on 1x96x56x56 int8 (MobileNet's
  shape), the hand schedule's ``depthwise`` kind;
* ``matmul16``: a ``QMatMul`` 128x768 uint16 activations x 768x768 int8 weights (a
  BERT-base projection with unsigned 16-bit activations), the hand schedule's ``generic``
  kind (``vpmaddwd`` needs int16: signed 16-bit activations take the tensorized one).

Three compiles of the same graph, each timed: the hand schedules; ``--trials`` MetaSchedule
candidates into the database ``--db`` (a fresh temporary one by default; the hand
schedule is measured and recorded first); and a compile that only applies the database.
The tuned and hand-scheduled kernels must agree bit for bit with the reference
interpreter (checked). Latency: ``--runs`` interleaved rounds of both, median and 90th
percentile. TVM runs with ``TVM_NUM_THREADS`` = ``--threads`` and
``TVM_THREAD_POOL_SPIN_COUNT=0``, and so do MetaSchedule's measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_description, load_average
from benchmarks.tvm_latency import timed_rounds
from intq.ir import DType, Graph, QuantParams, TensorType, verify
from intq.semantics.numerics import dyadic


def progress(message: str) -> None:
    """One progress line on stderr (stdout carries only the report)."""
    print(f"[tvm-tuning] {message}", file=sys.stderr, flush=True)


def _requantized(g: Graph, acc, out_scale: float):
    pairs = [dyadic(s / out_scale) for s in acc.type.quant.scale]
    return g.op(
        "Requantize",
        acc,
        multiplier=tuple(p.multiplier for p in pairs),
        shift=tuple(p.shift for p in pairs),
        axis=acc.type.quant.axis if acc.type.quant.axis is not None else -1,
        bits=8,
        signed=1,
        scale=out_scale,
        lo=-128,
        hi=127,
    )


def _weight(g: Graph, data: np.ndarray, scales: np.ndarray, axis: int):
    w = g.add_constant(data.astype(np.int8), "w")
    w.type = w.type.with_quant(QuantParams(8, True, tuple(scales), axis=axis, narrow=True))
    return w


def kernel_graph(kind: str) -> tuple[Graph, dict[str, np.ndarray], float]:
    """The one-kernel graph, a full-range input and the kernel's operation count."""
    rng = np.random.default_rng(0)
    g = Graph()
    if kind == "depthwise":
        c, hw = 96, 56
        x = g.add_input("x", TensorType(DType.I8, (1, c, hw, hw), QuantParams(8, True, (0.05,))))
        w = _weight(g, rng.integers(-127, 128, (c, 1, 3, 3)), rng.uniform(0.001, 0.1, c), 0)
        acc = g.op("QConv", x, w, group=c, strides=(2, 2), pads=(1,) * 4, name="/dw")
        feeds = {"x": rng.integers(-128, 128, (1, c, hw, hw)).astype(np.int8)}
        ops = 2.0 * c * (hw // 2) ** 2 * 9
    else:
        m, k, n = 128, 768, 768
        x = g.add_input("x", TensorType(DType.U16, (m, k), QuantParams(16, False, (1e-4,))))
        w = _weight(g, rng.integers(-127, 128, (k, n)), rng.uniform(0.001, 0.01, n), 1)
        acc = g.op("QMatMul", x, w, name="/proj")
        # x < 2^12: the int32 accumulator provably fits (768 * 2^12 * 127 < 2^31).
        feeds = {"x": rng.integers(0, 2**12, (m, k)).astype(np.uint16)}
        ops = 2.0 * m * k * n
    g.set_outputs([_requantized(g, acc, 0.5)])
    verify(g)
    return g, feeds, ops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=["depthwise", "matmul16"], default="depthwise")
    parser.add_argument("--trials", type=int, default=64, help="MetaSchedule candidates")
    parser.add_argument("--db", type=Path, help="tuning database (default: a fresh one)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

    import intq
    from intq.backends.tvm import compile_tvm

    graph, feeds, ops = kernel_graph(args.kernel)
    db = args.db or Path(tempfile.mkdtemp(prefix="intq-tuning-"))
    compiles: dict[str, float] = {}

    def timed_compile(label: str, **options):
        progress(f"compiling: {label} ...")
        start = time.perf_counter()
        exe = compile_tvm(graph, **options)
        compiles[label] = time.perf_counter() - start
        return exe

    hand = timed_compile("hand schedules")
    tuned = timed_compile(f"tune {args.trials} trials", tune_trials=args.trials, tuning_db=db)
    reused = timed_compile("apply the database", tuning_db=db)
    # The kernel itself tuned (the NHWC layout changes around it stay hand-scheduled).
    assert [s for _, s in tuned.schedules.values()].count("tuned") == 1, tuned.schedules
    out = graph.outputs[0].name
    want = intq.compile(graph, target="reference").run(feeds)[out]
    exact = {
        name: bool(np.array_equal(exe.run(feeds)[out], want))
        for name, exe in (("hand", hand), ("tuned", tuned), ("reused", reused))
    }
    progress(f"bit-exact vs the reference: {exact}; timing {args.runs} rounds ...")
    times = timed_rounds(
        {"hand schedule": lambda: hand.run(feeds), "MetaSchedule": lambda: reused.run(feeds)},
        args.warmup,
        args.runs,
    )
    records = (db / "database_tuning_record.json").read_text().splitlines()
    result = {
        "machine": cpu_description(),
        "load_average": load_average(),
        "kernel": args.kernel,
        "trials": args.trials,
        "records": len(records),
        "compile_s": compiles,
        "bit_exact": exact,
        "median_ms": {k: float(np.median(v)) for k, v in times.items()},
        "p90_ms": {k: float(np.percentile(v, 90)) for k, v in times.items()},
    }
    print(f"{cpu_description()}, load {result['load_average']:.2f}, {args.threads} threads")
    print(f"kernel {args.kernel}; database {db} ({len(records)} records)")
    for label, seconds in compiles.items():
        print(f"  compile, {label:<22} {seconds:8.1f} s")
    for name, median in result["median_ms"].items():
        gops = ops / (median * 1e-3) / 1e9
        print(
            f"  {name:<15} median {median:8.3f} ms  p90 {result['p90_ms'][name]:8.3f} ms"
            f"  {gops:6.1f} GOPS (model call)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(exact.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
