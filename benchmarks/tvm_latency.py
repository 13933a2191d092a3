"""TVM integer-only latency against intq's ONNX Runtime model and ORT FP32, plus one GEMM.

Run from the repository root (the ``dev`` extra installed)::

    .venv/bin/python -m benchmarks.tvm_latency               # 30 interleaved rounds
    .venv/bin/python -m benchmarks.tvm_latency --runs 10 --json out/tvm_latency.json

For EfficientNet-Lite0 (224x224) and the ResNet-18-shaped network (112x112), batch 1, and
the quantized all-MiniLM-L6-v2 (2 sentences x 16 tokens; ``--no-minilm`` leaves it out):

* **ORT FP32**: the exported float model in an ONNX Runtime CPU session;
* **intq ORT**: ``intq.quantize`` (default ``QuantConfig``, 8 calibration crops of real
  photos, as ``ort_latency.py`` makes them) then ``intq.compile(..., target="onnxruntime")``;
* **intq TVM**: the same integer graph through ``intq.compile(..., target="tvm")`` for this
  machine (``--tvm-target`` to override), run on TVM's Relax VM;
* **ORT quantize_dynamic** (MiniLM): ONNX Runtime's own int8 model of the float one
  (``quantize_dynamic``, int8 weights, activations quantized at run time; LayerNorm,
  softmax and GELU stay float), what users pick for BERT-style models;
* **intq TVM, 7-bit weights** (the CNNs): quantized with ``weight_bits=7`` instead, whose
  weights cannot saturate ``vpmaddubsw``, so on a target without VNNI the convs take TVM's
  byte kernel (8-bit weights take ``vpmaddwd``; with VNNI both take ``vpdpbusd``, see
  ``benchmarks/vnni_latency.py``; ``benchmarks/efficientnet_agreement.py`` measures what
  the seventh bit costs in agreement with FP32).

Then, per model, where intq TVM's time goes: ``exe.profile`` (each kernel call timed on an
instrumented VM) summed by kind: 1x1 convs, kxk convs, depthwise convs, matmuls, Relax ops
fused by TVM, the VM's own calls, and the rest (quantize, adds, pools, layout changes).

Each row names the kernel paths intq TVM's conv and dense kernels took
(``exe.kernel_paths``: ``vnni``, ``byte``, ``vpmaddwd``, ...). The two integer models must
agree bit for bit on the timed input (checked, printed). Each round runs every variant once
in turn, so load from elsewhere spreads over all of them; rows
report the median and 90th percentile and the median as a ratio to FP32's. Compile time is
the wall time of each ``intq.compile`` call (TVM: lowering, scheduling, LLVM). TVM runs
with ``TVM_NUM_THREADS`` = ``--threads`` and ``TVM_THREAD_POOL_SPIN_COUNT=0`` (idle workers
block, like the ORT sessions' ``spin=False``).

The GEMM micro-benchmark (``--gemm M,K,N``, default 128x768x768, a BERT-base projection):
intq TVM's ``QMatMul`` kernel (uint8 x int8 -> int32: without VNNI the tensorized
``vpmaddwd`` schedule for full-range weights, the byte kernel for the same weights halved
to 7 bits; with VNNI ``vpdpbusd`` for both; each row names its kernel path),
ORT ``MatMulInteger`` with u8 x s8 operands (its fast ``vpmaddubsw`` kernel, exact only for
7-bit weights) and u8 x u8 (exact at full range, what intq's ORT backend uses), and ORT
FP32 ``MatMul`` (the float peak of this machine), each as GOPS = 2*M*K*N / time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import intq
from benchmarks.machine import cpu_description, load_average
from benchmarks.ort_latency import (
    MODELS,
    ModelSpec,
    batches,
    open_session,
    photo_crops,
    session_options,
)
from intq.ir import DType, Graph, Node, QuantParams, TensorType

TVM = "intq TVM"
ORT_DYNAMIC = "ORT quantize_dynamic"
TVM_W7 = "intq TVM, 7-bit weights"
"""The CNNs quantized with ``weight_bits=7`` as well: their weights cannot saturate
``vpmaddubsw``, so TVM takes its byte kernel without VNNI (the default 8-bit weights take
``vpmaddwd`` there; with VNNI both take ``vpdpbusd``)."""
TARGET_LINE = (
    "target: intq TVM integer-only no slower than intq ORT integer-only, <= 0.75x ORT FP32"
)
CALIBRATION_CROPS = 8


def progress(message: str) -> None:
    """One progress line on stderr (stdout carries only the report)."""
    print(f"[tvm-latency] {message}", file=sys.stderr, flush=True)


def timed_rounds(
    runners: dict[str, Callable[[], object]], warmup: int, runs: int
) -> dict[str, list[float]]:
    """Wall times (ms) of each runner over ``runs`` interleaved rounds, after warm-up."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            start = time.perf_counter_ns()
            run()
            times[name].append((time.perf_counter_ns() - start) / 1e6)
    return times


def model_rows(
    spec: ModelSpec, work: Path, threads: int, tvm_target: str | None, warmup: int, runs: int
) -> dict[str, object]:
    """Compile ``spec`` both ways, check they agree, time all three; returns the results."""
    fp32_path = spec.builder(work).path
    crops = photo_crops(spec, CALIBRATION_CROPS + 1, seed=0)
    x = crops[-1:]
    progress(f"{spec.name}: quantizing ...")
    graph, graph_w7 = (
        intq.quantize(
            intq.from_onnx(fp32_path),
            [{"input": b} for b in batches(crops[:-1], 1)],
            intq.QuantConfig(progress=False, weight_bits=bits),
        )
        for bits in (8, 7)
    )
    ort_path = work / f"{spec.name}_intq.onnx"
    return measure(
        spec.label,
        {TVM: graph, TVM_W7: graph_w7},
        fp32_path,
        ort_path,
        {"input": x},
        tvm_target,
        threads,
        warmup,
        runs,
    )


def minilm_rows(
    work: Path, threads: int, tvm_target: str | None, warmup: int, runs: int
) -> dict[str, object]:
    """The quantized all-MiniLM-L6-v2 (2 sentences x 16 tokens, intq's default config,
    calibrated on its example batch), the same three ways."""
    from examples import zoo

    model = zoo.minilm(work / "zoo")
    progress("MiniLM: quantizing ...")
    graph = intq.quantize(
        intq.from_onnx(model.path), [model.inputs], intq.QuantConfig(progress=False)
    )
    label, ort_path = "MiniLM-L6 (2x16 tokens)", work / "minilm_intq.onnx"
    dynamic = ort_dynamic(model.path, work / "minilm_ort_dynamic.onnx")
    return measure(
        label,
        {TVM: graph},
        model.path,
        ort_path,
        model.inputs,
        tvm_target,
        threads,
        warmup,
        runs,
        {ORT_DYNAMIC: dynamic},
    )


def ort_dynamic(fp32_path: Path, out: Path) -> Path:
    """ONNX Runtime's ``quantize_dynamic`` model of ``fp32_path`` (int8 weights, QInt8),
    written to ``out``."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process, on every call
    quantize_dynamic(str(fp32_path), str(out), weight_type=QuantType.QInt8)
    return out


def kernel_kind(node: Node | None, kernel: str) -> str:
    """What a profiled TVM kernel computes, coarsely: the rows of the "time goes" line."""
    if node is None:  # the VM's own calls, Relax ops fused by TVM, layout changes
        for prefix, kind in (("vm.", "VM calls"), ("fused", "fused ops")):
            if kernel.startswith(prefix):
                return kind
        return "other"
    if node.op == "QConv":
        channels, kernel_hw = node.inputs[0].type.shape[1], node.inputs[1].type.shape[2:]
        if node.attrs.get("group", 1) == channels > 1:
            return "depthwise"
        return "conv 1x1" if all(k == 1 for k in kernel_hw) else "conv kxk"
    return "matmul" if node.op in ("QGemm", "QMatMul") else "other"


def time_by_kind(
    graph: Graph, exe: object, feeds: dict[str, np.ndarray], runs: int
) -> dict[str, float]:
    """intq TVM's time per run (ms) by kernel kind, from ``exe.profile``, largest first."""
    nodes: dict[str, Node] = {}
    for node in graph:  # the first node of a name: a conv's Requantize shares its name
        nodes.setdefault(node.label(), node)
    kinds: dict[str, float] = {}
    for row in exe.profile(feeds, runs=runs):
        kind = kernel_kind(nodes.get(row.nodes[0]) if row.nodes else None, row.kernel)
        kinds[kind] = kinds.get(kind, 0.0) + row.ms
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def measure(
    label: str,
    graphs: dict[str, Graph],
    fp32_path: Path,
    ort_path: Path,
    feeds: dict[str, np.ndarray],
    tvm_target: str | None,
    threads: int,
    warmup: int,
    runs: int,
    ort_models: dict[str, Path] | None = None,
) -> dict[str, object]:
    """Compile the first of ``graphs`` (variant name -> graph; the first is :data:`TVM`)
    for ONNX Runtime (saved at ``ort_path``) and each for TVM, timing each compile; check
    every TVM model against intq's ONNX Runtime model of its graph on ``feeds``; time the
    TVM models, the first one's ONNX Runtime model, the FP32 model and ``ort_models`` (name ->
    ONNX file, ONNX Runtime's own quantized models) in interleaved rounds;
    then profile the first TVM model by kernel kind."""
    progress(f"{label}: compiling for ONNX Runtime and TVM ...")
    graph = graphs[TVM]
    start = time.perf_counter()
    ort_exe = intq.compile(graph, target="onnxruntime")
    ort_exe.save(ort_path)
    compiles = {"intq ORT": time.perf_counter() - start}
    tvm_exes = {}
    for name, variant in graphs.items():
        start = time.perf_counter()
        tvm_exes[name] = intq.compile(variant, target="tvm", tvm_target=tvm_target)
        compiles[name] = time.perf_counter() - start
    opts = session_options(threads, spin=False)
    fp32 = open_session(fp32_path, opts)
    int_ort = open_session(ort_path, opts)
    ort_exes = {
        name: ort_exe if name == TVM else intq.compile(variant, target="onnxruntime")
        for name, variant in graphs.items()
    }
    same = all(
        np.array_equal(a, b)
        for name, exe in tvm_exes.items()
        for a, b in zip(ort_exes[name].run(feeds).values(), exe.run(feeds).values())
    )
    progress(f"{label}: timing {runs} rounds (bit-exact: {same}) ...")
    runners: dict[str, Callable[[], object]] = {
        "ORT FP32": lambda: fp32.run(None, feeds),
        "intq ORT": lambda: int_ort.run(None, feeds),
    }
    for name, path in (ort_models or {}).items():
        runners[name] = partial(open_session(path, opts).run, None, feeds)
    for name, exe in tvm_exes.items():
        runners[name] = partial(exe.run, feeds)
    times = timed_rounds(runners, warmup, runs)
    return {
        "model": label,
        "bit_exact": bool(same),
        "compile_s": compiles,
        "median_ms": {k: float(np.median(v)) for k, v in times.items()},
        "p90_ms": {k: float(np.percentile(v, 90)) for k, v in times.items()},
        "tvm_ms_by_kind": time_by_kind(graph, tvm_exes[TVM], feeds, runs),
        "kernel_paths": {
            name: sorted(set(exe.kernel_paths.values())) for name, exe in tvm_exes.items()
        },
    }


# ----- the GEMM micro-benchmark ---------------------------------------------------------------


def _ort_matmul(
    path: Path, a_type: int, b: np.ndarray, integer: bool, b_zero_point: int | None
) -> Path:
    m_name, out_type = ("MatMulInteger", TensorProto.INT32) if integer else ("MatMul", a_type)
    inputs = ["a", "b"] + (["", "bz"] if b_zero_point is not None else [])
    inits = [numpy_helper.from_array(b, "b")]
    if b_zero_point is not None:
        inits.append(numpy_helper.from_array(np.asarray(b_zero_point, b.dtype), "bz"))
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node(m_name, inputs, ["y"])],
            "gemm",
            [helper.make_tensor_value_info("a", a_type, None)],
            [helper.make_tensor_value_info("y", out_type, None)],
            inits,
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def _tvm_matmul(a_u8: np.ndarray, w_s8: np.ndarray, tvm_target: str | None) -> tuple[Any, str]:
    """The Relax VM of intq's ``QMatMul`` of uint8 ``a_u8``-shaped input by ``w_s8``,
    checked against numpy, and its kernel path (``exe.kernel_paths``)."""
    g = Graph("gemm")
    a = g.add_input("a", TensorType(DType.U8, a_u8.shape, QuantParams(8, False, (0.02,))))
    w = g.add_constant(w_s8, "w")
    n = w_s8.shape[1]
    w.type = w.type.with_quant(QuantParams(8, True, (0.01,) * n, axis=1, narrow=True))
    g.set_outputs([g.op("QMatMul", a, w)])
    exe = intq.compile(g, target="tvm", tvm_target=tvm_target)
    want = a_u8.astype(np.int64) @ w_s8.astype(np.int64)
    assert np.array_equal(exe.run({"a": a_u8})[g.outputs[0].name], want)
    (path,) = set(exe.kernel_paths.values())
    return exe.vm(), path


def gemm_rows(
    shape: Sequence[int], work: Path, threads: int, tvm_target: str | None, warmup: int, runs: int
) -> dict[str, object]:
    """GOPS of one M x K x N integer GEMM in TVM and ORT, and ORT's FP32 MatMul."""
    m, k, n = shape
    rng = np.random.default_rng(0)
    a_u8 = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w_s8 = rng.integers(-127, 128, (k, n), dtype=np.int8)
    import tvm

    a_tvm = tvm.runtime.tensor(a_u8)
    vms = {}
    # 7-bit weights ([-64, 63]) take the byte kernel without VNNI; both take vpdpbusd with it.
    for name, w in (("intq TVM u8 x s8", w_s8), ("intq TVM u8 x s7", w_s8 // 2)):
        vm, path = _tvm_matmul(a_u8, w, tvm_target)
        vms[f"{name} ({path})"] = vm

    opts = session_options(threads, spin=False)
    u8s8 = open_session(
        _ort_matmul(work / "mm_u8s8.onnx", TensorProto.UINT8, w_s8, True, None), opts
    )
    w_u8 = (w_s8.astype(np.int16) + 128).astype(np.uint8)
    u8u8 = open_session(
        _ort_matmul(work / "mm_u8u8.onnx", TensorProto.UINT8, w_u8, True, 128), opts
    )
    f32 = open_session(
        _ort_matmul(work / "mm_f32.onnx", TensorProto.FLOAT, w_s8.astype(np.float32), False, None),
        opts,
    )
    a_f32 = a_u8.astype(np.float32)
    times = timed_rounds(
        {
            **{name: partial(vm["main"], a_tvm) for name, vm in vms.items()},
            "ORT MatMulInteger u8 x s8": lambda: u8s8.run(None, {"a": a_u8}),
            "ORT MatMulInteger u8 x u8": lambda: u8u8.run(None, {"a": a_u8}),
            "ORT MatMul FP32": lambda: f32.run(None, {"a": a_f32}),
        },
        warmup,
        runs,
    )
    ops = 2 * m * k * n
    return {
        "shape": [m, k, n],
        "gops": {name: ops / (float(np.median(t)) * 1e6) for name, t in times.items()},
        "best_gops": {name: ops / (float(np.min(t)) * 1e6) for name, t in times.items()},
        "median_ms": {name: float(np.median(t)) for name, t in times.items()},
    }


# ----- report ------------------------------------------------------------------------------------


def report(models: Sequence[dict], gemm: dict, threads: int) -> list[str]:
    """The markdown tables printed on stdout."""
    lines = [
        f"machine: {cpu_description()}; {threads} threads; load average"
        f" {load_average():.1f} at the end",
        TARGET_LINE,
        "",
        "| model | variant | median ms | p90 ms | vs FP32 | compile s |",
        "|---|---|---|---|---|---|",
    ]
    for row in models:
        base = row["median_ms"]["ORT FP32"]
        for name, median in row["median_ms"].items():
            compile_s = row["compile_s"].get(name)
            lines.append(
                f"| {row['model']} | {name} | {median:.1f} | {row['p90_ms'][name]:.1f}"
                f" | {median / base:.2f}x | {'' if compile_s is None else f'{compile_s:.1f}'} |"
            )
    lines += ["", "Where intq TVM's time goes (exe.profile, median ms per run by kernel kind):", ""]
    for row in models:
        total = sum(row["tvm_ms_by_kind"].values())
        kinds = ", ".join(
            f"{kind} {ms:.1f} ({100 * ms / total:.0f}%)"
            for kind, ms in row["tvm_ms_by_kind"].items()
        )
        lines.append(f"- {row['model']}: {kinds}")
    lines += [""]
    for row in models:
        med = row["median_ms"]
        paths = "; ".join(
            f"{name}: {', '.join(kinds) or 'none'}" for name, kinds in row["kernel_paths"].items()
        )
        lines.append(f"{row['model']}: kernel paths {paths}")
        if ORT_DYNAMIC in med:
            # A transformer: against ORT's own int8 model (the VNNI goal) and 0.75x FP32
            # (the AVX2 one).
            lines.append(
                f"{row['model']}: TVM = ORT integer bit for bit: {row['bit_exact']};"
                f" TVM <= {ORT_DYNAMIC}: {'yes' if med[TVM] <= med[ORT_DYNAMIC] else 'NO'};"
                f" TVM <= 0.75x FP32: {'yes' if med[TVM] <= 0.75 * med['ORT FP32'] else 'NO'}"
            )
            continue
        ok_ort = med[TVM] <= med["intq ORT"]
        verdicts = "; ".join(
            f"{name} <= 0.75x FP32: {'yes' if med[name] <= 0.75 * med['ORT FP32'] else 'NO'}"
            for name in med
            if name.startswith(TVM)
        )
        lines.append(
            f"{row['model']}: TVM = ORT integer bit for bit: {row['bit_exact']};"
            f" TVM <= intq ORT: {'yes' if ok_ort else 'NO'}; {verdicts}"
        )
    m, k, n = gemm["shape"]
    lines += [
        "",
        f"GEMM {m}x{k}x{n} (batch of {m} rows; best = the fastest round, least disturbed):",
        "",
        "| kernel | median ms | GOPS (median) | GOPS (best) |",
        "|---|---|---|---|",
    ]
    for name, gops in gemm["gops"].items():
        lines.append(
            f"| {name} | {gemm['median_ms'][name]:.2f} | {gops:.1f}"
            f" | {gemm['best_gops'][name]:.1f} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tvm-target", default=None, metavar="JSON")
    parser.add_argument("--gemm", default="128,768,768", metavar="M,K,N")
    parser.add_argument("--work-dir", type=Path, default=Path("out/tvm_latency"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-minilm", action="store_true", help="only the CNNs and the GEMM")
    args = parser.parse_args(argv)
    # TVM's thread pool: as many workers as ORT's intra-op threads, and, as ORT's sessions
    # here (spin=False), idle workers block instead of spinning: on 2 shared cores spinning
    # workers slowed every other variant (set before TVM starts its pool).
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    models = [
        model_rows(spec, args.work_dir, args.threads, args.tvm_target, args.warmup, args.runs)
        for spec in MODELS
    ]
    if not args.no_minilm:
        models.append(
            minilm_rows(args.work_dir, args.threads, args.tvm_target, args.warmup, args.runs)
        )
    shape = [int(v) for v in args.gemm.split(",")]
    progress(f"GEMM {shape} ...")
    gemm = gemm_rows(shape, args.work_dir, args.threads, args.tvm_target, args.warmup, args.runs)
    print("\n".join(report(models, gemm, args.threads)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"models": models, "gemm": gemm}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
