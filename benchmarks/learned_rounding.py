"""Learned rounding: 4-bit weights rounded to nearest against learned from unlabelled data.

Run from the repository root (the ``dev`` extra installed)::

    .venv/bin/python -m benchmarks.learned_rounding                    # both models
    .venv/bin/python -m benchmarks.learned_rounding --models resnet18 --calib-crops 64
    .venv/bin/python -m benchmarks.learned_rounding --quick            # 8 + 16 crops: a smoke run

Rows: EfficientNet-Lite0 (ImageNet weights) with 4-bit weights and 8-bit activations, the
first and last layer at 8 bits, the ResNet-18-shaped network (seeded weights) at W4A8, and
all-MiniLM-L6-v2 at W4A8 (16-bit residual stream, the default ``wide_bits``);
each quantized by ``intq.quantize`` with the defaults but for the widths, once with
``rounding="nearest"`` and once with the default ``rounding="auto"`` (learned rounding for
the 4-bit layers), on the same calibration crops; both with the default bias correction
of the layers under 8 bits. Each integer graph runs on ONNX Runtime
(bit exact with the reference interpreter) over other crops, scored by top-1 agreement with
the FP32 model (all crops, and the crops where FP32 is confident: max softmax > 0.5);
MiniLM calibrates on the 16 sentences of ``minilm_variants.py`` and is scored by the mean
cosine of its mean-pooled embeddings to FP32's on the 24 others. The
time is ``intq.quantize``'s, calibration included. ONNX Runtime's ``quantize_static`` has
no 4-bit convolution weights, so it has no row here (its INT8 rows are in
``efficientnet_agreement.py``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import intq
from benchmarks.distillation import _first_last_8bit, _int_runner, _ort_fp32
from benchmarks.machine import cpu_description, load_average
from examples import zoo


@dataclass
class Row:
    """One model and rounding: agreement with FP32 and the quantization time."""

    model: str
    rounding: str
    agreement: float
    confident: float
    confident_crops: int
    seconds: float


MODELS: dict[str, tuple[str, Callable]] = {
    "efficientnet": ("EfficientNet-Lite0, W4A8 (first/last 8-bit)", zoo.efficientnet_lite0),
    "resnet18": ("ResNet-18-shaped, W4A8", zoo.resnet18_like),
    "minilm": ("all-MiniLM-L6-v2, W4A8 (16-bit residual)", zoo.minilm),
}


def _probabilities(x: np.ndarray) -> np.ndarray:
    """``x`` as class probabilities: as it is where the model ends in a softmax, else the
    softmax of its logits."""
    if np.all(x >= 0) and np.allclose(x.sum(axis=-1), 1.0, atol=1e-3):
        return x
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def minilm_rows(cache: Path, args: argparse.Namespace) -> list[Row]:
    from benchmarks.minilm_variants import CALIBRATION, EVALUATION, batches, pooled

    label, builder = MODELS["minilm"]
    model = builder(cache)
    graph = intq.from_onnx(model.path)
    fp32 = _ort_fp32(model.path)
    data, feeds = batches(model, CALIBRATION), batches(model, EVALUATION)
    rows = []
    for rounding in ("nearest", "auto"):
        config = intq.QuantConfig(weight_bits=4, rounding=rounding, progress=args.progress)
        began = time.perf_counter()
        quantized = intq.quantize(graph, data, config)
        seconds = time.perf_counter() - began
        run = _int_runner(quantized)
        cosines = []
        for feed in feeds:
            a = pooled(fp32(feed), feed["attention_mask"])
            b = pooled(run(feed), feed["attention_mask"])
            norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
            cosines.extend((a * b).sum(-1) / norms)
        rows.append(Row(label, rounding, float(np.mean(cosines)), float("nan"), 0, seconds))
        print(f"  {label}, rounding={rounding}: {rows[-1].agreement:.4f}", flush=True)
    return rows


def rows_for(key: str, cache: Path, args: argparse.Namespace) -> list[Row]:
    if key == "minilm":
        return minilm_rows(cache, args)
    label, builder = MODELS[key]
    model = builder(cache)
    graph = intq.from_onnx(model.path)
    calib = zoo.photo_crops(model, args.calib_crops, seed=11)
    evaluation = zoo.photo_crops(model, args.eval_crops, seed=12)
    data = [{"input": calib[i : i + 1]} for i in range(len(calib))]
    feeds = [{"input": evaluation[i : i + 1]} for i in range(len(evaluation))]
    fp32 = _ort_fp32(model.path)
    teacher = [fp32(f) for f in feeds]
    confident = [float(_probabilities(t).max()) > 0.5 for t in teacher]
    layer_bits = _first_last_8bit(graph) if key == "efficientnet" else {}
    rows = []
    for rounding in ("nearest", "auto"):
        config = intq.QuantConfig(
            weight_bits=4, layer_bits=layer_bits, rounding=rounding, progress=args.progress
        )
        began = time.perf_counter()
        quantized = intq.quantize(graph, data, config)
        seconds = time.perf_counter() - began
        run = _int_runner(quantized)
        hits = [int(np.argmax(run(f)) == np.argmax(t)) for f, t in zip(feeds, teacher)]
        sure = [h for h, c in zip(hits, confident) if c]
        rows.append(
            Row(
                label,
                rounding,
                float(np.mean(hits)),
                float(np.mean(sure)) if sure else float("nan"),
                len(sure),
                seconds,
            )
        )
        print(f"  {label}, rounding={rounding}: {rows[-1].agreement:.3f}", flush=True)
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| model | rounding | top-1 agreement, all crops (MiniLM: mean cosine) | confident crops"
        " | quantize s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        name = "nearest" if r.rounding == "nearest" else "learned (default `auto`)"
        sure = f"{r.confident:.3f} ({r.confident_crops})" if r.confident_crops else ""
        lines.append(f"| {r.model} | {name} | {r.agreement:.4f} | {sure} | {r.seconds:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--calib-crops", type=int, default=64)
    parser.add_argument("--eval-crops", type=int, default=96)
    parser.add_argument("--quick", action="store_true", help="8 calibration, 16 evaluation crops")
    parser.add_argument("--progress", action="store_true", default=None)
    parser.add_argument("--cache", type=Path, default=Path("out/zoo"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.calib_crops, args.eval_crops = 8, 16
    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_description()}; load average {load_average():.1f}", flush=True)
    rows = [row for key in args.models for row in rows_for(key, args.cache, args)]
    print(table(rows))
    print(f"load average after: {load_average():.1f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
