"""Quantized distillation: how much closer to FP32 does training on the FP32 model's outputs
bring the post-training integer models, and how long does it take?

Run from the repository root (the ``dev`` extra installed)::

    .venv/bin/python -m benchmarks.distillation                 # every row
    .venv/bin/python -m benchmarks.distillation --rows digits resnet18 --steps 40
    .venv/bin/python -m benchmarks.distillation --quick         # a few steps each: a smoke run

Rows (each distilled with ``intq.QuantConfig(distill=intq.DistillConfig(...))`` on unlabelled
samples, its held-out part chosen by the distillation itself; evaluated on other samples):

* EfficientNet-Lite0 (ImageNet weights), 4-bit weights / 8-bit activations, the first and
  last layer at 8 bits: top-1 agreement with FP32 on real photo crops;
* the ResNet-18-shaped network (seeded weights), W4A8: top-1 agreement with FP32 on crops;
* all-MiniLM-L6-v2, W4A8 (16-bit residual stream, as ``wide_bits`` keeps it): cosine of
  the mean-pooled sentence embeddings to FP32's over unseen sentences;
* the digits CNN, W4A4: accuracy on the held-out digits, next to FP32's.

The crops are random crops and flips of the photos scikit-learn ships (``examples.zoo``):
the distillation's crops and the evaluation's are two different draws. Integer graphs are
evaluated with the ONNX Runtime backend (bit exact with the reference interpreter), FP32
with an ONNX Runtime session of the exported model. The time is the distillation's own
(``DistillHistory.seconds``: lowering, reference runs and torch's forward and backward), with
torch at ``--threads`` threads.
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
from benchmarks.machine import cpu_description, load_average
from examples import zoo
from intq.distillation import DistillConfig, DistillHistory
from intq.passes import PREPARE, pipeline
from intq.passes.precision import LayerBits, quantizable_layers


@dataclass
class Row:
    """One model's post-training and distilled numbers."""

    model: str
    setting: str
    metric: str
    fp32: float | None
    post_training: float
    distilled: float
    goal: str
    steps: int
    samples: int
    seconds: float
    held_out: list[tuple[int, float]]


def _ort_fp32(path: Path) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)[0]


def _int_runner(graph: intq.ir.Graph) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    exe = intq.compile(graph, target="onnxruntime")
    return lambda feeds: next(iter(exe.run(feeds).values()))


def _first_last_8bit(graph: intq.ir.Graph) -> dict[str, LayerBits]:
    prepared = graph.copy()
    pipeline(PREPARE)(prepared)
    layers = quantizable_layers(prepared)
    return {layers[0].name: LayerBits(8, 8), layers[-1].name: LayerBits(8, 8)}


def _distill(
    graph: intq.ir.Graph, data: list, config: intq.QuantConfig, distill: DistillConfig
) -> tuple[intq.ir.Graph, intq.ir.Graph, DistillHistory]:
    post = intq.quantize(graph, data, config)
    # From the post-training graph (its scales are the start): calibration's automatic clip
    # choice, which takes minutes on the image models, runs once.
    distilled = intq.distill(graph, post, data, distill, quant=config)
    history = distilled.analysis(DistillHistory)
    assert history is not None
    return post, distilled, history


def _agreement(run: Callable, fp32: Callable, feeds: list[dict[str, np.ndarray]]) -> float:
    hits = [int(np.argmax(run(f)) == np.argmax(fp32(f))) for f in feeds]
    return float(np.mean(hits))


def image_row(
    name: str, builder: Callable, cache: Path, args: argparse.Namespace, steps: int
) -> Row:
    model = builder(cache)
    graph = intq.from_onnx(model.path)
    crops = args.train_crops or TRAIN_CROPS[name]
    train = zoo.photo_crops(model, crops, seed=11)
    evaluation = zoo.photo_crops(model, args.eval_crops, seed=12)
    data = [{"input": train[i : i + 1]} for i in range(len(train))]
    feeds = [{"input": evaluation[i : i + 1]} for i in range(len(evaluation))]
    layer_bits = _first_last_8bit(graph) if name.startswith("EfficientNet") else {}
    config = intq.QuantConfig(weight_bits=4, activation_bits=8, layer_bits=layer_bits)
    distill = DistillConfig(
        steps=steps,
        batch=args.batch,
        lr=args.lr,
        eval_every=max(1, steps // 4),
        threads=args.threads,
        progress=args.progress,
    )
    post, distilled, history = _distill(graph, data, config, distill)
    fp32 = _ort_fp32(model.path)
    setting = "W4A8, first/last 8-bit" if layer_bits else "W4A8"
    goal = ">= 0.80" if layer_bits else ">= 0.90"
    return Row(
        name,
        setting,
        f"top-1 agreement with FP32 ({len(feeds)} crops)",
        None,
        _agreement(_int_runner(post), fp32, feeds),
        _agreement(_int_runner(distilled), fp32, feeds),
        goal,
        steps,
        len(data),
        history.seconds,
        history.evaluations,
    )


def minilm_row(cache: Path, args: argparse.Namespace, steps: int) -> Row:
    from benchmarks.minilm_variants import CALIBRATION, EVALUATION, batches, pooled

    model = zoo.minilm(cache)
    graph = intq.from_onnx(model.path)
    data = batches(model, CALIBRATION)
    feeds = batches(model, EVALUATION)
    config = intq.QuantConfig(weight_bits=4, activation_bits=8)
    distill = DistillConfig(
        steps=steps,
        batch=2,
        loss="cosine",
        eval_every=max(1, steps // 4),
        threads=args.threads,
        progress=args.progress,
    )
    post, distilled, history = _distill(graph, data, config, distill)
    fp32 = _ort_fp32(model.path)

    def cosine(run: Callable) -> float:
        values = []
        for feed in feeds:
            a = pooled(fp32(feed), feed["attention_mask"])
            b = pooled(run(feed), feed["attention_mask"])
            values.extend((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
        return float(np.mean(values))

    return Row(
        "all-MiniLM-L6-v2",
        "W4A8 (16-bit residual)",
        f"mean-pooled cosine ({2 * len(feeds)} sentences)",
        None,
        cosine(_int_runner(post)),
        cosine(_int_runner(distilled)),
        ">= 0.99",
        steps,
        2 * len(data),
        history.seconds,
        history.evaluations,
    )


def digits_row(cache: Path, args: argparse.Namespace, steps: int) -> Row:
    model = zoo.digits_cnn(cache)
    graph = intq.from_onnx(model.path)
    x_train, x_test, _, y_test = zoo._digits_split()
    batch = model.inputs["input"].shape[0]
    data = [{"input": x_train[i : i + batch]} for i in range(0, 320, batch)]
    tests = [
        (x_test[i : i + batch], y_test[i : i + batch])
        for i in range(0, len(x_test) - batch + 1, batch)
    ]
    config = intq.QuantConfig(weight_bits=4, activation_bits=4)
    distill = DistillConfig(
        steps=steps,
        batch=4,
        eval_every=max(1, steps // 4),
        threads=args.threads,
        progress=args.progress,
    )
    post, distilled, history = _distill(graph, data, config, distill)

    def accuracy(run: Callable) -> float:
        return float(np.mean(np.concatenate([run({"input": x}).argmax(-1) == y for x, y in tests])))

    return Row(
        "digits CNN",
        "W4A4",
        f"accuracy on {batch * len(tests)} held-out digits",
        accuracy(_ort_fp32(model.path)),
        accuracy(_int_runner(post)),
        accuracy(_int_runner(distilled)),
        "within 1 point of FP32",
        steps,
        batch * len(data),
        history.seconds,
        history.evaluations,
    )


STEPS = {"efficientnet": 80, "resnet18": 40, "minilm": 40, "digits": 200}
TRAIN_CROPS = {"EfficientNet-Lite0": 48, "ResNet-18-shaped": 32}  # the recorded runs'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--steps", type=int, help="steps for every row (default: per row)")
    parser.add_argument("--batch", type=int, default=4, help="image samples per step")
    parser.add_argument("--train-crops", type=int, help="image rows' samples (default: per row)")
    parser.add_argument("--eval-crops", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=DistillConfig.lr, help="image rows' lr")
    parser.add_argument("--quick", action="store_true", help="3 steps, 16 crops: a smoke run")
    parser.add_argument("--progress", action="store_true", default=None)
    parser.add_argument("--cache", type=Path, default=Path("out/zoo"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.train_crops, args.eval_crops = 3, 16, 16
    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_description()}; load average {load_average():.1f}", flush=True)
    rows: list[Row] = []
    began = time.perf_counter()
    for key in args.rows:
        steps = args.steps or STEPS[key]
        if key == "efficientnet":
            row = image_row("EfficientNet-Lite0", zoo.efficientnet_lite0, args.cache, args, steps)
        elif key == "resnet18":
            row = image_row("ResNet-18-shaped", zoo.resnet18_like, args.cache, args, steps)
        elif key == "minilm":
            row = minilm_row(args.cache, args, steps)
        else:
            row = digits_row(args.cache, args, steps)
        rows.append(row)
        fp32 = f"FP32 {row.fp32:.4f}, " if row.fp32 is not None else ""
        print(
            f"{row.model:20s} {row.setting:24s} {row.metric}: {fp32}post-training"
            f" {row.post_training:.4f} -> distilled {row.distilled:.4f} (goal {row.goal});"
            f" {row.steps} steps on {row.samples} samples in {row.seconds:.0f} s",
            flush=True,
        )
    print(f"total {time.perf_counter() - began:.0f} s; load average {load_average():.1f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
