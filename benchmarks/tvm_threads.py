"""intq TVM on one and two threads, quiet and next to a busy process: which thread-pool policy
degrades gracefully?

Run from the repository root (the ``dev`` extra installed)::

    .venv/bin/python -m benchmarks.tvm_threads                # EfficientNet-Lite0, ResNet-18-shaped
    .venv/bin/python -m benchmarks.tvm_threads --seconds 2 --models resnet18_like

Each model is quantized once (default ``QuantConfig``, 8 calibration crops of real photos) and
compiled for the host with ``intq.compile(..., target="tvm")``; the saved library then runs in
a fresh process per setting, because TVM reads its thread-pool settings once, when the pool
starts. A setting is a thread count (``TVM_NUM_THREADS`` 1 or 2), a pool policy, a spin policy
and a load:

* **pool**: ``fixed`` (the pool keeps its threads) or ``adaptive``, intq's default: before a
  run, the pool gets the cores other processes left free over the last 0.2 s
  (:class:`intq.backends.tvm_threads.ThreadPolicy`);
* **spin**: how long an idle pool worker busy-waits (``sched_yield`` in a loop) for the next
  parallel region before it sleeps: TVM's own default (300000 rounds) or intq's default
  (``intq.backends.tvm_runtime.DEFAULT_SPIN_COUNT``, which intq sets unless the environment
  already names ``TVM_THREAD_POOL_SPIN_COUNT``);
* **load**: quiet, or one other process spinning on a core for the whole measurement (what a
  deployment shares its two cores with: another model, a video decoder).

Each process runs the model for ``--seconds`` after a warm-up and reports the median and 90th
percentile per run; the ratio column is the median over the one-thread median under the same
load and spin policy. What to look for: two threads under load at most 1.1x one thread, and
faster than one thread when quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import intq
from benchmarks.machine import cpu_description, load_average
from benchmarks.ort_latency import MODELS, export_model, photo_crops
from intq.backends.tvm_runtime import DEFAULT_SPIN_COUNT

TVM_DEFAULT_SPIN = 300_000
"""The spin count of TVM's thread pool when ``TVM_THREAD_POOL_SPIN_COUNT`` is not set."""

SETTINGS = ((1, "fixed"), (2, "fixed"), (2, "adaptive"))
"""``(TVM_NUM_THREADS, pool policy)``: "fixed" keeps the pool's size, "adaptive" is intq's
default (:class:`intq.backends.tvm_threads.ThreadPolicy`)."""

_CHILD = """
import json, sys, time
import numpy as np
import intq
from intq.backends import tvm_runtime, tvm_threads
tvm_threads.policy(tvm_runtime._tvm()).adaptive = sys.argv[4] == "adaptive"
exe = intq.load(sys.argv[1])
feeds = dict(np.load(sys.argv[2]))
for _ in range(5):
    exe.run(feeds)
times, end = [], time.perf_counter() + float(sys.argv[3])
while time.perf_counter() < end or len(times) < 10:
    start = time.perf_counter()
    exe.run(feeds)
    times.append(time.perf_counter() - start)
print(json.dumps({"median": float(np.median(times)), "p90": float(np.percentile(times, 90)),
                  "runs": len(times)}))
"""


def build(name: str, work: Path) -> tuple[Path, Path]:
    """The model's TVM library and one input, saved under ``work``."""
    specs = {spec.name: spec for spec in MODELS}
    if name not in specs:
        raise SystemExit(f"unknown model {name!r}: choose from {', '.join(specs)}")
    spec = specs[name]
    fp32 = export_model(spec, 1, work)
    calib = [crop[None] for crop in photo_crops(spec, 8, seed=1)]
    graph = intq.quantize(intq.from_onnx(fp32), [{"input": b} for b in calib])
    library = Path(intq.compile(graph, target="tvm").save(work / f"{name}.so"))
    feeds = work / f"{name}.inputs.npz"
    np.savez(feeds, input=photo_crops(spec, 1, seed=2))
    return library, feeds


def run(
    library: Path, feeds: Path, threads: int, pool: str, spin: int, busy: bool, seconds: float
) -> dict:
    """One setting, in a fresh process (and a spinning competitor when ``busy``)."""
    env = {**os.environ, "TVM_NUM_THREADS": str(threads), "TVM_THREAD_POOL_SPIN_COUNT": str(spin)}
    competitor = None
    if busy:
        competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
    try:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(library), str(feeds), str(seconds), pool],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: Sequence[dict]) -> list[str]:
    """One line per setting, with the ratio to one thread under the same load and spin."""
    one = {(r["model"], r["spin"], r["busy"]): r["median"] for r in rows if r["threads"] == 1}
    header = ("model", "spin", "load", "threads", "pool", "median ms", "p90 ms", "vs 1 thread")
    body = [
        (
            r["model"],
            str(r["spin"]),
            "busy" if r["busy"] else "quiet",
            str(r["threads"]),
            r["pool"],
            f"{r['median'] * 1e3:.2f}",
            f"{r['p90'] * 1e3:.2f}",
            f"{r['median'] / one[(r['model'], r['spin'], r['busy'])]:.2f}x",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in (header, *body)
    ]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="efficientnet_lite0,resnet18_like")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per setting")
    parser.add_argument("--work-dir", type=Path, default=Path("out/bench/threads"))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    started, load = time.time(), load_average()
    for name in args.models.split(","):
        print(f"building {name} ...", file=sys.stderr)
        library, feeds = build(name, args.work_dir)
        for spin in sorted({TVM_DEFAULT_SPIN, DEFAULT_SPIN_COUNT}, reverse=True):
            for busy in (False, True):
                for threads, pool in SETTINGS:
                    result = run(library, feeds, threads, pool, spin, busy, args.seconds)
                    setting = {"model": name, "spin": spin, "busy": busy, "threads": threads}
                    rows.append({**setting, "pool": pool, **result})
                    print(f"  {rows[-1]}", file=sys.stderr)
    date = time.strftime("%Y-%m-%d", time.gmtime(started))
    print(f"CPU: {cpu_description()}; load average before: {load:.2f}; {date}, ", end="")
    print(f"{time.time() - started:.0f} s")
    print("\n".join(table(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
