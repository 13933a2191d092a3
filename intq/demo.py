"""``make demo``: run intq's pipeline on the built-in example models and print a table.

For each packaged model (EfficientNet-Lite0 with its ImageNet weights, the all-MiniLM-L6-v2
sentence encoder, a ResNet-18-shaped CNN, a CNN trained on digits), the demo exports it to
ONNX, imports it into the IR, runs the graph-cleaning pipeline (BatchNorm folding, constant
folding, dead-code elimination), runs it in the reference interpreter and compares with ONNX
Runtime FP32 on a real input. The IR of each model is saved next to the ONNX file.

    python -m intq.demo [--out DIR] [--models efficientnet_lite0,minilm]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

import intq
from intq import examples
from intq.ir import to_text

PIPELINE = "fold-batchnorm,fold-constants,dce"


def _timed(fn: Callable[[], object], repeat: int = 3) -> tuple[object, float]:
    """``fn()``'s result and its best time in milliseconds over ``repeat`` runs."""
    best = float("inf")
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best * 1e3


def _row(name: str, build: Callable[[Path], examples.ZooModel], out: Path) -> dict[str, str]:
    import onnx
    import onnxruntime as ort

    model = build(out)
    onnx_nodes = len(onnx.load(str(model.path), load_external_data=False).graph.node)
    graph = intq.from_onnx(model.path)
    imported = len(graph.nodes)
    intq.passes.pipeline(PIPELINE, verify_each=True)(graph)
    exe = intq.compile(graph, target="reference")
    got, ref_ms = _timed(lambda: exe.run(model.inputs))
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    want, ort_ms = _timed(lambda: dict(zip(names, session.run(None, model.inputs))))
    assert isinstance(got, dict) and isinstance(want, dict)
    errors = []
    for key, expected in want.items():
        scale = max(float(np.ptp(expected)), 1e-12)
        errors.append(float(np.abs(got[key] - expected).max()) / scale)
    first = next(iter(want))
    agree = ""
    if want[first].ndim == 2:  # class logits: does the top-1 class agree?
        agree = f"{np.mean(got[first].argmax(-1) == want[first].argmax(-1)):.0%}"
    exe.save(model.path.with_suffix(".intq"))
    census = Counter(node.op for node in graph)
    top = ", ".join(f"{op} {n}" for op, n in census.most_common(4))
    return {
        "model": name,
        "ONNX nodes": str(onnx_nodes),
        "IR nodes": f"{imported} -> {len(graph.nodes)}",
        "max err / range": f"{max(errors):.1e}",
        "top-1 agree": agree or "-",
        "reference ms": f"{ref_ms:.0f}",
        "ORT FP32 ms": f"{ort_ms:.1f}",
        "main ops": top,
    }


def _table(rows: list[dict[str, str]]) -> str:
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    lines = [" | ".join(k.ljust(widths[k]) for k in keys)]
    lines.append("-+-".join("-" * widths[k] for k in keys))
    lines += [" | ".join(r[k].ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m intq.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="where to write models")
    parser.add_argument(
        "--models",
        default=",".join(examples.ALL_BUILDERS),
        help=f"comma-separated subset of: {', '.join(examples.ALL_BUILDERS)}",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in examples.ALL_BUILDERS]
    if unknown:
        parser.error(f"unknown models {unknown}")
    print(f"intq {intq.__version__}: import -> {PIPELINE} -> reference interpreter vs ONNX Runtime")
    rows = []
    for name in names:
        print(f"  {name} ...", flush=True)
        rows.append(_row(name, examples.ALL_BUILDERS[name], args.out))
    print()
    print(_table(rows))
    sample = args.out / "digits_cnn_b8_v2.intq"
    if sample.exists():
        print(f"\nThe digits CNN's IR ({sample}), large constants elided:\n")
        print(to_text(intq.ir.from_text(sample.read_text()), elide_above=4))
    print(
        "Integer-only quantization, the ONNX Runtime and TVM backends and mixed precision are"
        " the next milestones (see the README's roadmap)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
