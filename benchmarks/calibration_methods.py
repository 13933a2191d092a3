"""Calibration methods side by side: how closely each follows FP32, and what it costs.

Run from the repository root (the ``dev`` extra installed)::

    .venv/bin/python -m benchmarks.calibration_methods
    .venv/bin/python -m benchmarks.calibration_methods --models resnet18-like,hf-mobilenet-v2
    .venv/bin/python -m benchmarks.calibration_methods --weight-bits 4 --methods minmax,auto

For every model and every ``QuantConfig(calibration=...)`` method (``minmax``, ``percentile``
99.99, ``mse``, ``auto``): ``intq.quantize`` on the calibration samples (its wall time is the
``quantize s`` column: import excluded, calibration and lowering included), then the integer
graph on ONNX Runtime (bit-exact with the reference interpreter, and much faster) against the
FP32 model on held-out samples: mean and worst cosine similarity of the first output and, for
classifiers, top-1 agreement.

Models: EfficientNet-Lite0 and the ResNet-18-shaped network of :mod:`examples.zoo` (crops of
the bundled photos: calibration seed 1, evaluation seed 2), and any entry of
:mod:`examples.corpus` (``mobilenet-v2-imagenet``: torchvision's ImageNet weights on photo
crops; the random-weight rows on normal noise, like :mod:`benchmarks.coverage`).
``--weight-bits 4`` keeps the first and last weighted layers at 8 bits (``layer_bits``). A
method ending in ``+bc`` (``auto+bc``) turns bias correction on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import intq
from benchmarks.coverage import cosine, export_onnx, onnx_fp32, samples, torch_fp32
from benchmarks.machine import cpu_description, load_average
from examples import corpus, zoo
from intq.ir import Graph
from intq.passes import PREPARE, pipeline
from intq.passes.precision import LayerBits

METHODS = ("minmax", "percentile", "mse", "auto")
ZOO = {"efficientnet-lite0": zoo.efficientnet_lite0, "resnet18-like": zoo.resnet18_like}
DEFAULT_MODELS = ("efficientnet-lite0", "resnet18-like", "mobilenet-v2-imagenet", "hf-mobilenet-v2")

Batch = dict[str, np.ndarray]


@dataclass
class Case:
    """One model: its float graph, FP32 outputs, calibration and evaluation samples."""

    name: str
    graph: Graph
    fp32: Callable[[Batch], list[np.ndarray]]
    calib: list[Batch]
    tests: list[Batch]
    classifier: bool


def zoo_case(name: str, out_dir: Path, calib: int, tests: int) -> Case:
    model = ZOO[name](out_dir)
    crops = [zoo.photo_crops(model, n, seed) for n, seed in ((calib, 1), (tests, 2))]
    batches = [[{"input": c[i : i + 1]} for i in range(len(c))] for c in crops]
    graph = intq.from_onnx(model.path)
    return Case(name, graph, onnx_fp32(model.path), batches[0], batches[1], True)


def corpus_case(name: str, out_dir: Path, calib: int, tests: int) -> Case:
    entry = corpus.CORPUS[name]
    module, inputs = corpus.build(name)
    if entry.samples is not None:
        calib_b, test_b = entry.samples(calib, 1), entry.samples(tests, 2)
    else:
        calib_b, test_b = samples(inputs, calib, seed=1), samples(inputs, tests, seed=2)
    path = module if isinstance(module, Path) else out_dir / f"{name}.onnx"
    if not isinstance(module, Path):
        export_onnx(module, inputs, entry.dynamic, path, entry.opset)
    shapes = {k: tuple(v.shape) for k, v in inputs.items()}
    graph = intq.from_onnx(path, input_shapes=shapes)
    fp32 = onnx_fp32(path) if isinstance(module, Path) else torch_fp32(module)
    return Case(name, graph, fp32, calib_b, test_b, entry.classifier)


def edge_layers(graph: Graph) -> list[str]:
    """The first and last weighted layers (original names), kept at 8 bits under W4A8."""
    prepared = graph.copy()
    pipeline(PREPARE)(prepared)
    weighted = [n.label() for n in prepared if n.opdef.weight_axis is not None]
    return sorted({weighted[0], weighted[-1]}) if weighted else []


def measure(case: Case, method: str, weight_bits: int) -> dict[str, float]:
    """Quantize ``case`` with ``method`` (``+bc``: with bias correction); its quantize time,
    mean cosine and top-1 agreement."""
    method, _, extra = method.partition("+")
    layer_bits = {}
    if weight_bits != 8:
        layer_bits = {name: LayerBits(8, 8) for name in edge_layers(case.graph)}
    config = intq.QuantConfig(
        calibration=method,
        weight_bits=weight_bits,
        layer_bits=layer_bits,
        progress=False,
        bias_correction=extra == "bc",
    )
    start = time.perf_counter()
    quantized = intq.quantize(case.graph, case.calib, config)
    seconds = time.perf_counter() - start
    exe = intq.compile(quantized, target="onnxruntime")
    cosines, agree = [], []
    for batch in case.tests:
        got = next(iter(exe.run(batch).values()))
        want = case.fp32(batch)[0]
        cosines.append(cosine(got, want))
        agree.append(float(np.argmax(got) == np.argmax(want)))
    return {
        "seconds": seconds,
        "cosine": float(np.mean(cosines)),
        "worst": float(np.min(cosines)),
        "top1": float(np.mean(agree)) if case.classifier else float("nan"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--calib", type=int, default=32, help="calibration samples (32)")
    parser.add_argument("--tests", type=int, default=64, help="evaluation samples (64)")
    parser.add_argument("--weight-bits", type=int, default=8)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    methods = args.methods.split(",")
    print(f"# calibration methods, {time.strftime('%Y-%m-%d')}, {cpu_description()}")
    print(
        f"# load average at start {load_average():.2f}; {args.calib} calibration and"
        f" {args.tests} evaluation samples; W{args.weight_bits}A8"
    )
    header = (
        f"{'model':24} {'method':11} {'top-1':>6} {'cosine':>8} {'worst':>8} {'quantize s':>10}"
    )
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            build = zoo_case if name in ZOO else corpus_case
            case = build(name, Path(tmp), args.calib, args.tests)
            for method in methods:
                r = measure(case, method, args.weight_bits)
                top1 = f"{r['top1']:.3f}" if case.classifier else "-"
                print(
                    f"{name:24} {method:11} {top1:>6} {r['cosine']:8.4f} {r['worst']:8.4f}"
                    f" {r['seconds']:10.1f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
