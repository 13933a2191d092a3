"""``make demo``: intq's main job on the example models, with a table of results.

For each CNN of the example zoo (:mod:`examples.zoo`: a CNN trained on scikit-learn digits,
EfficientNet-Lite0 with its ImageNet weights, a ResNet-18-shaped network) the demo runs
``intq.convert`` on the ONNX export for each backend (ONNX Runtime: a standard ``.onnx``
file; the numpy reference: a ``.intq`` graph; TVM when it is installed as a target),
calibrating on real data, checks each bit for bit against the reference interpreter, and
compares it with the FP32 model: fidelity, latency, size, integer-only op census. MiniLM's
``BertModel`` goes the PyTorch way: ``intq.convert`` on the torch module (``from_torch``), to
an integer-only transformer. Run from the repository's root (it needs the ``dev`` extra)::

    python -m examples.demo [--out DIR] [--models digits_cnn,efficientnet_lite0]
                            [--targets onnxruntime,reference]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import intq
from examples import zoo
from intq.backends import TARGETS
from intq.backends.onnxruntime import onnx_census
from intq.ir import Graph
from intq.passes.integer_only import check_integer_only
from intq.progress import show_progress

CNNS = ("digits_cnn", "efficientnet_lite0", "resnet18_like")
CONFIG = intq.QuantConfig()
"""intq's defaults, as a user who sets nothing gets them (``progress`` unset: calibration
shows its bar on a terminal only)."""


def calibration_text(config: intq.QuantConfig) -> str:
    """How ``config`` calibrates, as the demo prints it: ``percentile 99.99``, ``minmax``."""
    if config.calibration == "percentile":
        return f"percentile {config.percentile:g}"
    return config.calibration


def ms_text(ms: float) -> str:
    """A latency in ms with the digits that matter: ``8.4``, ``0.21``, ``0.043``."""
    if ms >= 1:
        return f"{ms:.1f}"
    if ms >= 0.1:
        return f"{ms:.2f}"
    return f"{ms:.3f}" if ms >= 0.001 else "<0.001"


class Steps:
    """One progress bar per model, over its slow steps (export, FP32 runs, convert, and per
    target: compile, check, time), saying which one runs; shown only on a terminal
    (:func:`intq.progress.show_progress`), so logs and pipes get the table alone."""

    def __init__(self, name: str, total: int):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, desc=f"  {name}", unit="step", leave=False,
            disable=not show_progress(None),
        )  # fmt: skip
        self.started = False

    def __call__(self, step: str) -> None:
        """Mark the previous step done and show ``step`` as the one running."""
        if self.started:
            self.bar.update()
        self.started = True
        self.bar.set_postfix_str(step)

    def close(self) -> None:
        """The last step is done: remove the bar."""
        self.bar.update()
        self.bar.close()


def _median_ms(fn: Callable[[], object], repeat: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def _data(name: str, model: zoo.ZooModel) -> tuple[list[dict], list[np.ndarray], np.ndarray | None]:
    """Calibration batches, evaluation inputs and (for digits) their labels."""
    if name == "digits_cnn":
        x_train, x_test, _, y_test = zoo._digits_split()
        n = len(x_test) // 8 * 8
        calib = [{"input": x_train[i : i + 8]} for i in range(0, 256, 8)]
        return calib, [x_test[i : i + 8] for i in range(0, n, 8)], y_test[:n]
    calib = [{"input": c[None]} for c in zoo.photo_crops(model, 24, seed=1)]
    return calib, [c[None] for c in zoo.photo_crops(model, 24, seed=2)], None


def _census_text(counts: dict[str, int], skip: tuple[str, ...]) -> str:
    """The three most frequent ops and the total, e.g. ``ConvInteger 49, Add 120, ... (600)``."""
    kept = {op: n for op, n in counts.items() if op not in skip}
    top = sorted(kept.items(), key=lambda item: -item[1])[:3]
    return ", ".join(f"{op} {n}" for op, n in top) + f" ({sum(kept.values())} ops)"


def _cnn_rows(name: str, out: Path, targets: list[str]) -> list[dict[str, str]]:
    """One row per target: the model converted by ``intq.convert``, against FP32."""
    import onnxruntime as ort

    step = Steps(name, 3 + 2 * len(targets))
    step("export the model, load its data")
    model = zoo.ALL_BUILDERS[name](out)
    calib, evaluation, labels = _data(name, model)
    step("run and time FP32")
    fp32 = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    float_out = np.concatenate([fp32.run(None, {"input": x})[0] for x in evaluation])
    x = evaluation[0]
    fp32_ms = _median_ms(lambda: fp32.run(None, {"input": x}))
    rows = []
    step(f"intq.convert: calibrate ({calibration_text(CONFIG)}), integerize, {targets[0]}")
    first = intq.convert(model.path, calib, target=targets[0], config=CONFIG)
    int_graph = first.int_graph
    oracle = intq.compile(int_graph)  # the reference interpreter: what every backend must equal
    checked = evaluation[:2]
    want = [oracle.run({"input": x})["logits"] for x in checked]
    first_out: np.ndarray | None = None
    for target in targets:
        step(f"compile for {target}, save")
        exe = first if target == targets[0] else intq.compile(int_graph, target=target)
        int_path = _save(exe, target, model.path)
        step(f"{target}: check against the reference, time")
        exact = all(
            np.array_equal(exe.run({"input": x})["logits"], w) for x, w in zip(checked, want)
        )
        if first_out is None:
            # Bit-exact backends score the same: the fidelity is measured once, on the first.
            first_out = np.concatenate([exe.run({"input": x})["logits"] for x in evaluation])
            int_out = first_out
            cosine = np.mean(
                np.sum(float_out * int_out, 1)
                / (np.linalg.norm(float_out, axis=1) * np.linalg.norm(int_out, axis=1))
            )
            if labels is not None:
                fidelity = (
                    f"accuracy {np.mean(float_out.argmax(1) == labels):.1%}"
                    f" -> {np.mean(int_out.argmax(1) == labels):.1%}"
                )
            else:
                fidelity = f"top-1 agree {np.mean(float_out.argmax(1) == int_out.argmax(1)):.0%}"
            fidelity = f"{fidelity}, cosine {cosine:.3f}"
            shown = fidelity
        else:
            shown = f"same as {targets[0]}" if exact else "differs (see = reference)"
        int_ms = _median_ms(lambda exe=exe, x=x: exe.run({"input": x}), _repeat(target))
        ops = _census(exe, target, int_graph)
        rows.append(_row(name, target, shown, exact, fp32_ms, int_ms, model.path, int_path, ops))
    step.close()
    return rows


def _artifact_suffix(target: str) -> str:
    """The end of the name of a ``target`` artifact the demo writes: the suffix the target's
    backend record declares first (what ``intq.load`` recognises), after ``_int8``."""
    return "_int8" + TARGETS[target].suffixes[0]


def _save(exe: Any, target: str, model_path: Path, tag: str = "") -> Path:
    """Save ``exe`` next to its FP32 model, named for the target's artifact kind."""
    return exe.save(model_path.with_name(model_path.stem + tag + _artifact_suffix(target)))


def closing_line(out: Path, targets: list[str]) -> str:
    """The demo's last line: where the artifacts are (one glob per target) and what opens them."""
    globs = ", ".join(f"{out}/*{_artifact_suffix(t)}" for t in targets)
    manifests = " (each .so with its .so.json manifest beside it)" if "tvm" in targets else ""
    plain = "plain onnxruntime runs the .onnx files; " if "onnxruntime" in targets else ""
    return f"The integer-only models are {globs}{manifests}: {plain}intq.load reopens any of them."


def _repeat(target: str) -> int:
    """Timed runs: the numpy reference is an oracle, not a runtime: a few runs are enough."""
    return 3 if target == "reference" else 15


def _census(exe: Any, target: str, int_graph: Graph, allow_division: bool = False) -> str:
    """The integer-only op census of what ``target`` runs: the exported ONNX file itself for
    ONNX Runtime (``onnx_census`` raises unless it is integer-only), else the IR graph."""
    if target == "onnxruntime":
        counts = onnx_census(exe.model, allow_division=allow_division)
        return _census_text(counts, ("QuantizeLinear", "DequantizeLinear"))
    result = check_integer_only(int_graph, allow_division=allow_division)
    ops = _census_text(result.ops, ("Quantize", "Dequantize"))
    if result.divisions:
        ops += f", {result.divisions} dividing kernels"
    return ops


def _row(
    model: str,
    target: str,
    fidelity: str,
    exact: bool,
    fp32_ms: float,
    int_ms: float,
    fp32_path: Path,
    int_path: Path,
    ops: str,
) -> dict[str, str]:
    """One row of the demo's table."""
    return {
        "model": model,
        "target": target,
        "fidelity vs FP32": fidelity,
        "= reference": "bit-exact" if exact else "MISMATCH",
        "FP32 ms": ms_text(fp32_ms),
        "int ms": f"{ms_text(int_ms)} ({int_ms / fp32_ms:.2f}x)",
        "size MB": f"{_mb(fp32_path)} -> {_mb(int_path)}",
        "integer-only op census": ops,
    }


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f}"


def _table(rows: list[dict[str, str]]) -> str:
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    lines = [" | ".join(k.ljust(widths[k]) for k in keys)]
    lines.append("-+-".join("-" * widths[k] for k in keys))
    lines += [" | ".join(r[k].ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def _minilm_rows(out: Path, targets: list[str]) -> list[dict[str, str]]:
    """MiniLM's ``BertModel`` as a torch module, through ``intq.convert`` (``from_torch``),
    integer-only (Shiftmax, GELU, LayerNorm kernels); fidelity is the cosine of the
    mean-pooled sentence embeddings to ORT FP32 on the bundled sentences."""
    import onnxruntime as ort

    step = Steps("minilm", 3 + 2 * len(targets))
    step("export the model")
    model = zoo.minilm(out)
    feeds = model.inputs
    step("run and time FP32")
    fp32 = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    want = fp32.run(None, feeds)[0]
    fp32_ms = _median_ms(lambda: fp32.run(None, feeds))
    mask = feeds["attention_mask"][..., None].astype(np.float32)
    step(f"intq.convert from PyTorch: calibrate ({calibration_text(CONFIG)}), integerize")
    first = intq.convert(zoo.minilm_module(), [feeds], targets[0], CONFIG)
    oracle = intq.compile(first.int_graph).run(feeds)
    rows = []
    for target in targets:
        step(f"compile for {target}, save")
        exe = first if target == targets[0] else intq.compile(first.int_graph, target=target)
        int_path = _save(exe, target, model.path, "_torch")
        step(f"{target}: check against the reference, time")
        got = exe.run(feeds)
        exact = all(np.array_equal(got[k], oracle[k]) for k in oracle)
        hidden = next(iter(got.values()))
        a, b = (hidden * mask).sum(1) / mask.sum(1), (want * mask).sum(1) / mask.sum(1)
        cosine = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        int_ms = _median_ms(lambda exe=exe: exe.run(feeds), _repeat(target))
        # A dividing kernel variant is allowed by CONFIG, and counted.
        ops = _census(exe, target, first.int_graph, CONFIG.divides)
        fidelity = f"pooled cosine {cosine.min():.4f}"
        label = "minilm (from PyTorch)"
        rows.append(
            _row(label, target, fidelity, exact, fp32_ms, int_ms, model.path, int_path, ops)
        )
    step.close()
    return rows


def _torch_line(out: Path) -> str:
    """EfficientNet-Lite0 as a PyTorch module through ``intq.from_torch``, against PyTorch."""
    import torch

    step = Steps("from_torch", 2)
    step("torch.export the EfficientNet-Lite0 module, import it")
    model = zoo.efficientnet_lite0(out)
    module = zoo.efficientnet_lite0_module()
    x = model.inputs["input"]
    start = time.perf_counter()
    graph = intq.from_torch(
        module, (torch.from_numpy(x),), input_names=["input"], output_names=["logits"]
    )
    seconds = time.perf_counter() - start
    step("run it on the reference interpreter")
    got = intq.compile(graph).run({"input": x})["logits"]
    step.close()
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    error = float(np.abs(got - want).max()) / float(np.ptp(want))
    example = next(n.label() for n in graph if n.op == "Conv" and "_blocks" in n.label())
    return (
        f"from_torch: the EfficientNet-Lite0 torch module -> {len(graph.nodes)} IR nodes named"
        f" by module path (e.g. {example}) in {seconds:.1f} s; reference vs PyTorch max error"
        f" {error:.1e} of the output range"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="where to write models")
    parser.add_argument(
        "--models", default=",".join((*CNNS, "minilm")), help=f"a subset of {(*CNNS, 'minilm')}"
    )
    parser.add_argument(
        "--targets",
        default=",".join(t for t in ("onnxruntime", "tvm", "reference") if t in TARGETS),
        help=f"a subset of {sorted(TARGETS)}",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in (*CNNS, "minilm")]
    if unknown:
        parser.error(f"unknown models {unknown}")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if any(t not in TARGETS for t in targets):
        parser.error(f"unknown targets {[t for t in targets if t not in TARGETS]}")
    print(
        f"intq {intq.__version__}: intq.convert = ONNX or PyTorch -> calibrate -> integer-only"
        f" INT8 -> {', '.join(targets)}, against the FP32 model"
    )
    rows = []
    for name in names:
        print(f"  {name}: calibration {calibration_text(CONFIG)} ...", flush=True)
        if name in CNNS:
            rows.extend(_cnn_rows(name, args.out, targets))
        elif name == "minilm":
            rows.extend(_minilm_rows(args.out, targets))
    if rows:
        print()
        print(_table(rows))
    if "efficientnet_lite0" in names:
        print()
        print(_torch_line(args.out))

    print()
    print(closing_line(args.out, targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
