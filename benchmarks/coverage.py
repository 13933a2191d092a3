"""Coverage: which common architectures convert integer-only, as they are, on every backend.

Run from the repository root (the ``dev`` extra installed)::

    .venv/bin/python -m benchmarks.coverage                    # the whole corpus
    .venv/bin/python -m benchmarks.coverage --models hf-vit,unet --targets reference,onnxruntime
    .venv/bin/python -m benchmarks.coverage --fast --json out/coverage.json
    .venv/bin/python -m benchmarks.coverage --latency --markdown out/coverage.md

For every entry of :mod:`examples.corpus` (Hugging Face CNNs, ViTs and BERTs built from their
configs, compact versions of the classic CNN families, detection and segmentation shapes,
random seeded weights, small inputs) and the real-weight models of :mod:`examples.zoo`, one row:

* **onnx**: ``torch.onnx.export`` (TorchScript exporter, opset 17, Hugging Face text models
  with symbolic ``batch`` / ``sequence`` dims) then ``intq.from_onnx``;
* **torch**: ``intq.from_torch`` on the module (``torch.export``);
* **quantize**: ``intq.quantize`` of the ONNX import (the torch import where the ONNX one
  failed) with the default ``QuantConfig``, calibrated on 16 samples like the example input;
* **reference / onnxruntime / tvm**: ``intq.compile`` for each target and one run;
* **exact**: every backend's outputs equal the reference interpreter's, bit for bit (an
  output of a float op after the output ``Dequantize``, a classifier's Softmax, within 1e-3
  of its largest magnitude: each backend has its own float ``exp``);
* **fidelity**: cosine similarity of the reference interpreter's outputs to the FP32 module's
  on 4 held-out samples (the worst of them); for the real-weight image models also top-1
  agreement with FP32 on real photo crops;
* **ORT int8**: for the real-weight models, the same measures for ONNX Runtime's own
  ``quantize_static`` model (QDQ, per-channel, u8 activations with reduce_range, MinMax) on
  the same calibration samples;
* **TVM/FP32** (``--latency``): intq TVM's median time per run on one test sample over ONNX
  Runtime FP32's, one thread each, in interleaved rounds in this process (the text table also
  shows both times in ms);
* **fallbacks**: intq TVM's kernels that run without their own schedule
  (``TvmExecutable.fallbacks``; 0 when every kernel has one);
* **islands**: ops left in float inside the integer graph (always 0: intq is integer-only).

A failing cell shows ``FAIL``; the row's note names the obstacle (the missing op, the
refusal). The last line counts the rows that convert integer-only and are bit-exact on all
backends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from tqdm import tqdm

import intq
from benchmarks.machine import cpu_description, load_average
from benchmarks.ort_latency import open_session, session_options
from benchmarks.tvm_latency import timed_rounds
from examples import corpus
from intq.ir import Graph
from intq.ops import Trait
from intq.passes.calibration import CALIBRATION_METHODS
from intq.passes.integer_only import census
from intq.progress import show_progress

TARGETS = ("reference", "onnxruntime", "tvm")
CALIBRATION_SAMPLES = 16
TEST_SAMPLES = 4
CLASSIFIER_SAMPLES = 48
OPSET = 17
LATENCY_ROUNDS = 50
"""Interleaved rounds of intq TVM and ORT FP32 per model for ``--latency``."""
COLUMNS = ("onnx", "torch", "quantize", *TARGETS, "exact")


@dataclass
class Row:
    """One model's way through intq: each step ``ok``, ``FAIL`` or ``-`` (not reached)."""

    name: str
    family: str
    steps: dict[str, str] = field(default_factory=dict)
    fidelity: float | None = None
    top1: float | None = None
    ort_fidelity: float | None = None
    """The same measures for ONNX Runtime's own ``quantize_static`` model (real weights)."""
    ort_top1: float | None = None
    islands: int | None = None
    tvm_ms: float | None = None
    """intq TVM's median time per run on one test sample, one thread (``--latency``)."""
    fp32_ms: float | None = None
    """ONNX Runtime FP32's, on the same sample, one intra-op thread."""
    fallbacks: int | None = None
    """intq TVM's kernels without their own schedule (``TvmExecutable.fallbacks``)."""
    note: str = ""
    seconds: float = 0.0

    @property
    def converts(self) -> bool:
        """Integer-only, no float island, bit-exact on every backend that ran."""
        return self.steps.get("exact") == "ok" and self.islands == 0

    def fail(self, step: str, err: BaseException) -> None:
        self.steps[step] = "FAIL"
        self.note = "; ".join(filter(None, (self.note, f"{step}: {describe(err)}")))


def describe(err: BaseException) -> str:
    """An error in one line: its type, its first line, the node it names."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    node = getattr(err, "node", None)
    where = f" [{node}]" if node and str(node) not in text else ""
    return f"{type(err).__name__}: {text[:160]}{where}"


def samples(inputs: dict[str, torch.Tensor], count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``count`` inputs shaped like ``inputs``: normal floats, token ids, the same masks."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        sample = {}
        for name, x in inputs.items():
            if x.dtype.is_floating_point:
                sample[name] = torch.randn(x.shape, generator=gen).numpy()
            elif name == "input_ids":
                sample[name] = torch.randint(3, corpus.VOCAB, x.shape, generator=gen).numpy()
            else:
                sample[name] = x.numpy()
        out.append(sample)
    return out


def export_onnx(
    module: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    dynamic: Sequence[str],
    path: Path,
    opset: int = OPSET,
) -> None:
    names = list(inputs)
    axes = {n: {0: "batch", 1: "sequence"} for n in dynamic}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, tuple(inputs.values()), str(path), dynamo=False, opset_version=opset,
            input_names=names, output_names=["output"], dynamic_axes=axes or None,
            training=torch.onnx.TrainingMode.PRESERVE,
        )  # fmt: skip
    proto = onnx.load(str(path))
    proto.ir_version = 8
    onnx.save(proto, str(path))


Outputs = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def torch_fp32(module: torch.nn.Module) -> Outputs:
    """The FP32 outputs of ``module`` on one input dict, in order."""

    def run(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*(torch.from_numpy(v) for v in batch.values()))
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]

    return run


def onnx_fp32(path: Path) -> Outputs:
    """The FP32 outputs of ONNX file ``path`` under ONNX Runtime, in order."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, batch)


def ort_int8(path: Path, calib: Sequence[dict[str, np.ndarray]], out_dir: Path) -> Outputs:
    """ONNX Runtime's own int8 model of ``path``: ``quant_pre_process`` then ``quantize_static``
    (QDQ, per-channel weights, u8 activations, reduce_range: its x86 setting), MinMax ranges
    on the same calibration samples as intq."""
    import onnxruntime.quantization as ortq

    class Reader(ortq.CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    path, out_dir = path.resolve(), out_dir.resolve()
    prepared, quantized = out_dir / f"{path.stem}.pre.onnx", out_dir / f"{path.stem}.qdq.onnx"
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # in out_dir: a failing symbolic shape inference leaves a file in the cwd
            with contextlib.chdir(out_dir):
                ortq.quant_pre_process(str(path), str(prepared))
        except Exception:  # symbolic shape inference fails on some exports: quantize as is
            prepared = path
        ortq.quantize_static(
            str(prepared), str(quantized), Reader(), quant_format=ortq.QuantFormat.QDQ,
            per_channel=True, reduce_range=True, activation_type=ortq.QuantType.QUInt8,
            weight_type=ortq.QuantType.QInt8, calibrate_method=ortq.CalibrationMethod.MinMax,
        )  # fmt: skip
    proto = onnx.load(str(quantized))
    proto.ir_version = min(proto.ir_version, 10)  # onnx stamps IR 14, ONNX Runtime reads 13
    onnx.save(proto, str(quantized))
    return onnx_fp32(quantized)


def fidelity(got: Sequence[Sequence[np.ndarray]], want: Sequence[Sequence[np.ndarray]]) -> float:
    """The worst cosine similarity of any output on any sample."""
    return min(cosine(g, w) for gs, ws in zip(got, want) for g, w in zip(gs, ws))


def agreement(got: Sequence[Sequence[np.ndarray]], want: Sequence[Sequence[np.ndarray]]) -> float:
    """The fraction of samples whose first output's top class is FP32's."""
    return float(np.mean([np.argmax(g[0]) == np.argmax(w[0]) for g, w in zip(got, want)]))


def agree(want: np.ndarray, got: np.ndarray, float_tail: bool) -> bool:
    """Bit for bit; an output a float op computes after the output ``Dequantize`` (a
    classifier's Softmax) within 1e-3 of its largest magnitude: each backend has its own
    float ``exp`` (a recogniser's Softmax over 18385 classes differed by 4e-4 on TVM, its
    integer input bit-exact)."""
    if float_tail:
        bound = 1e-3 * float(np.abs(want).max(initial=0.0))
        return want.shape == got.shape and bool(np.abs(got - want).max(initial=0.0) <= bound)
    return np.array_equal(want, got)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))


def cover(
    name: str,
    out_dir: Path,
    targets: Sequence[str] = TARGETS,
    step: Callable[[str], None] = lambda _: None,
    config: intq.QuantConfig | None = None,
    latency: bool = False,
) -> Row:
    """Run corpus entry ``name`` through every step, quantized with ``config`` (the default
    ``QuantConfig`` without a progress bar when ``None``); never raises for an intq failure."""
    entry = corpus.CORPUS[name]
    row = Row(name, entry.family)
    start = time.perf_counter()
    module, inputs = corpus.build(name)
    if entry.samples is not None:
        calib = entry.samples(CALIBRATION_SAMPLES, 1)
        tests = entry.samples(TEST_SAMPLES if not entry.classifier else CLASSIFIER_SAMPLES, 2)
    else:
        calib = samples(inputs, CALIBRATION_SAMPLES, seed=1)
        tests = samples(inputs, TEST_SAMPLES, seed=2)
    shapes = {k: tuple(v.shape) for k, v in inputs.items()}

    graph: Graph | None = None
    step("onnx")
    path = module if isinstance(module, Path) else out_dir / f"{name}.onnx"
    try:
        if not isinstance(module, Path):
            export_onnx(module, inputs, entry.dynamic, path, entry.opset)
        graph = intq.from_onnx(path, input_shapes=shapes)
        row.steps["onnx"] = "ok"
    except intq.IntqError as err:
        row.fail("onnx", err)
    except Exception as err:  # the exporter's failure, not intq's
        row.steps["onnx"] = "-"
        row.note = f"torch.onnx.export: {describe(err)}"
    if isinstance(module, Path):
        fp32 = onnx_fp32(path)
    else:
        step("torch")
        fp32 = torch_fp32(module)
        try:
            torch_graph = intq.from_torch(
                module, tuple(inputs.values()), input_names=list(inputs), fallback=False
            )
            row.steps["torch"] = "ok"
            graph = graph or torch_graph
        except intq.IntqError as err:
            row.fail("torch", err)
    if graph is None:
        return _finish(row, start)
    step("quantize")
    try:
        int_graph = intq.quantize(graph, calib, config or intq.QuantConfig(progress=False))
        row.steps["quantize"] = "ok"
    except intq.IntqError as err:
        row.fail("quantize", err)
        return _finish(row, start)
    row.islands = len(census(int_graph).violations)
    outputs: dict[str, list[dict[str, np.ndarray]]] = {}
    for target in targets:
        step(target)
        try:
            exe = intq.compile(int_graph, target=target)
            outputs[target] = [exe.run(t) for t in tests]
            row.steps[target] = "ok"
            if target == "tvm":
                row.fallbacks = len(exe.fallbacks)
            if latency and target == "tvm" and path.exists():
                step("latency")
                session = open_session(path, session_options(1, spin=False))
                runners = {
                    "tvm": partial(exe.run, tests[0]),
                    "fp32": partial(session.run, None, tests[0]),
                }
                times = timed_rounds(runners, warmup=2, runs=LATENCY_ROUNDS)
                row.tvm_ms, row.fp32_ms = (float(np.median(times[k])) for k in runners)
        except intq.IntqError as err:
            row.fail(target, err)
    if "reference" in outputs:
        ref = outputs["reference"]
        expected = [fp32(t) for t in tests]
        got = [list(r.values()) for r in ref]
        row.fidelity = fidelity(got, expected)
        if entry.classifier:
            row.top1 = agreement(got, expected)
        if entry.family == "packaged":
            step("ORT int8")
            try:
                ort_run = ort_int8(path, calib, out_dir)
                ort = [ort_run(t) for t in tests]
                row.ort_fidelity = fidelity(ort, expected)
                row.ort_top1 = agreement(ort, expected) if entry.classifier else None
            except Exception as err:  # ORT's own tool failing on the model: shown
                row.note = "; ".join(filter(None, (row.note, f"ORT int8: {describe(err)}")))
        tail = {
            v.name for v in int_graph.outputs if v.producer and v.producer.opdef.has(Trait.TAIL)
        }
        exact = all(
            all(agree(a[k], b[k], k in tail) for a, b in zip(ref, results) for k in a)
            for results in outputs.values()
        )
        ran_all = len(outputs) == len(targets)
        row.steps["exact"] = "ok" if exact and ran_all else "FAIL" if not exact else "-"
        if not exact and not row.note:
            row.note = "backends disagree with the reference interpreter"
    return _finish(row, start)


def safe_cover(
    name: str,
    out_dir: Path,
    targets: Sequence[str],
    bar: Any,
    config: intq.QuantConfig | None = None,
    latency: bool = False,
) -> Row:
    """:func:`cover`, with a crash (a bug in intq or in the corpus) shown as the row's note."""
    bar.set_postfix_str(name)

    def step(what: str) -> None:
        bar.set_postfix_str(f"{name}: {what}")

    try:
        return cover(name, out_dir, targets, step, config, latency)
    except Exception as err:
        row = Row(name, corpus.CORPUS[name].family, note=f"crash: {describe(err)}")
        return _finish(row, time.perf_counter())


def _finish(row: Row, start: float) -> Row:
    row.seconds = time.perf_counter() - start
    for column in COLUMNS:
        row.steps.setdefault(column, "-")
    return row


def _ort_text(row: Row) -> str:
    if row.ort_fidelity is None:
        return "-"
    top1 = "" if row.ort_top1 is None else f" / {row.ort_top1:.2f}"
    return f"{row.ort_fidelity:.4f}{top1}"


def _speed_text(row: Row) -> str:
    if row.tvm_ms is None or row.fp32_ms is None:
        return "-"
    return f"{row.tvm_ms / row.fp32_ms:.2f}"


def _ms_text(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.3f}"


def _count_text(count: int | None) -> str:
    return "-" if count is None else str(count)


def table(rows: Sequence[Row]) -> str:
    head = ["model", "family", *COLUMNS, "cosine", "top-1", "ORT int8", "TVM ms", "FP32 ms"]
    head += ["TVM/FP32", "fallbacks", "islands", "s", "obstacle"]
    body = [
        [
            r.name, r.family, *(r.steps[c] for c in COLUMNS),
            "-" if r.fidelity is None else f"{r.fidelity:.4f}",
            "-" if r.top1 is None else f"{r.top1:.2f}",
            _ort_text(r), _ms_text(r.tvm_ms), _ms_text(r.fp32_ms), _speed_text(r),
            _count_text(r.fallbacks), _count_text(r.islands), f"{r.seconds:.0f}", r.note,
        ]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    widths[-1] = 0
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths[:-1]) + "-+-" + "-" * 8)
    converted = sum(r.converts for r in rows)
    lines.append(
        f"\n{converted} of {len(rows)} models ({100 * converted / max(len(rows), 1):.0f}%) convert"
        " integer-only with no float island and are bit-exact on every backend"
    )
    return "\n".join(lines)


def markdown(rows: Sequence[Row]) -> str:
    """The table as Markdown (for benchmarks/README.md): one row per model, its steps, its
    fidelity and what stops it."""
    head = ["model", "family", *COLUMNS, "cosine", "top-1", "ORT int8", "TVM/FP32", "fallbacks"]
    head += ["obstacle"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"`{r.name}`", r.family, *(r.steps[c] for c in COLUMNS),
            "-" if r.fidelity is None else f"{r.fidelity:.4f}",
            "-" if r.top1 is None else f"{r.top1:.2f}", _ort_text(r), _speed_text(r),
            _count_text(r.fallbacks), r.note.replace("|", "/")[:200],
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma-separated corpus names (default: all)")
    parser.add_argument("--fast", action="store_true", help="only the make-test subset")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--latency",
        action="store_true",
        help="also time intq TVM against ONNX Runtime FP32 on one sample, one thread each",
    )
    parser.add_argument(
        "--calibration",
        choices=CALIBRATION_METHODS,
        help="QuantConfig's calibration (default: its default, auto)",
    )
    parser.add_argument(
        "--bias-correction",
        action=argparse.BooleanOptionalAction,
        help="QuantConfig's bias_correction (default: its default)",
    )
    args = parser.parse_args(argv)
    options = {"calibration": args.calibration, "bias_correction": args.bias_correction}
    config = intq.QuantConfig(progress=False, **{k: v for k, v in options.items() if v is not None})
    # One thread for TVM's pool too (read once, when the pool starts), for a fair ratio.
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    names = args.models.split(",") if args.models else list(corpus.CORPUS)
    if args.fast:
        names = [n for n in names if corpus.CORPUS[n].fast]
    unknown = [n for n in names if n not in corpus.CORPUS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(corpus.CORPUS)}")
    targets = args.targets.split(",")
    print(f"# intq coverage, {time.strftime('%Y-%m-%d')}, {cpu_description()}")
    print(f"# load average at start {load_average():.2f}; torch {torch.__version__}")
    print(f"# calibration {config.calibration}, bias correction {config.bias_correction}")
    rows: list[Row] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shown = show_progress(False if args.quiet else None)
        with tqdm(total=len(names), desc="coverage", disable=not shown, leave=False) as bar:
            for name in names:
                rows.append(safe_cover(name, Path(tmp), targets, bar, config, args.latency))
                bar.update()
    print(table(rows))
    print(f"# {len(rows)} models in {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
