"""intq TVM's CNN latency with and without the VNNI (``vpdpbusd``) kernels, beside ONNX Runtime.

Run from the repository root, on a host with AVX512-VNNI or AVX-VNNI (the ``dev`` extra
installed)::

    .venv/bin/python -m benchmarks.vnni_latency                 # 20 interleaved rounds
    .venv/bin/python -m benchmarks.vnni_latency --runs 40 --json out/vnni_latency.json

For EfficientNet-Lite0 (224x224, ImageNet weights), the ResNet-18-shaped network (112x112)
and a MobileNetV2 (width 1.0, 224x224, seeded weights with BN statistics measured on photo
crops, as the ResNet's), batch 1, one thread:

* **ORT FP32**: the float model in an ONNX Runtime CPU session;
* **ORT QDQ u8s8**: ONNX Runtime's own ``quant_pre_process`` + ``quantize_static`` (QDQ,
  per-channel, MinMax; ``benchmarks/ort_latency.py`` builds it), on the same 8 crops;
* **intq TVM, AVX2 kernels**: ``intq.quantize`` (8-bit weights, the default) compiled for
  this machine's CPU with VNNI taken out of the target (``"mattr": ["-avx512vnni",
  "-avxvnni"]``): the kernels intq chose before it had VNNI ones (``vpmaddwd`` on int16 for
  full-range 8-bit weights);
* **intq TVM, VNNI kernels**: the same graph for this machine's CPU as it is: the convs and
  dense layers on ``vpdpbusd``.

The two TVM models must agree bit for bit with each other and with intq's ONNX Runtime model
on the timed input (checked, printed). Each round runs every variant once in turn, so load
from elsewhere spreads over all of them; the table gives medians (and 90th percentiles).
The 1-minute load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np
import torch
from torch import nn

import intq
from benchmarks.machine import cpu_description, load_average
from benchmarks.ort_latency import (
    MODELS,
    ModelSpec,
    batches,
    open_session,
    ort_quantize,
    photo_crops,
    session_options,
)
from benchmarks.tvm_latency import CALIBRATION_CROPS, timed_rounds
from examples import zoo

MOBILENET_SIZE = 224


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True):
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        layers = [_conv_bn(cin, mid, 1)] if expand != 1 else []
        layers += [_conv_bn(mid, mid, 3, stride, groups=mid), _conv_bn(mid, cout, 1, relu=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2 at width 1.0 (Sandler et al., table 2): 17 inverted residual blocks,
    ReLU6, a 1280-channel head and a 1000-class classifier."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
    SETTINGS += ((6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(_InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(_conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(
            torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
        )


def _mobilenet_module() -> nn.Module:
    zoo._seed_everything()
    net = MobileNetV2()
    zoo._calibrate_batchnorm(net, MOBILENET_SIZE)
    return net.eval()


def mobilenet_v2(out_dir: Path | str) -> zoo.ZooModel:
    """:class:`MobileNetV2` exported at 1x3x224x224 (``input`` -> ``logits``), BN kept."""
    path = Path(out_dir) / "mobilenet_v2_224.onnx"
    x = zoo._to_nchw((zoo._photo(MOBILENET_SIZE) - zoo._IMAGENET_MEAN) / zoo._IMAGENET_STD)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with zoo._single_thread():
            net = _mobilenet_module()
            zoo._export(net, (torch.from_numpy(x),), path, ["input"], ["logits"], True)
    return zoo.ZooModel("mobilenet_v2", path, {"input": x}, "MobileNetV2 1.0, seeded weights")


SPECS = {
    **{spec.name: spec for spec in MODELS},
    "mobilenet_v2": ModelSpec(
        "mobilenet_v2",
        "MobileNetV2",
        mobilenet_v2,
        _mobilenet_module,
        MOBILENET_SIZE,
        zoo._IMAGENET_MEAN,
        zoo._IMAGENET_STD,
    ),
}

AVX2 = "intq TVM, AVX2 kernels"
VNNI = "intq TVM, VNNI kernels"


def progress(message: str) -> None:
    """One progress line on stderr (stdout carries only the report)."""
    print(f"[vnni-latency] {message}", file=sys.stderr, flush=True)


def targets() -> dict[str, dict[str, object]]:
    """This machine's TVM target with and without VNNI."""
    from intq.backends.tvm import host_target

    host = {**host_target(), "num-cores": 1}
    return {AVX2: {**host, "mattr": ["-avx512vnni", "-avxvnni"]}, VNNI: host}


def model_row(spec: ModelSpec, work: Path, warmup: int, runs: int) -> dict[str, object]:
    """Quantize ``spec`` both ways (intq, ORT), compile intq's for TVM with and without VNNI,
    check they agree, and time the four variants in interleaved rounds."""
    fp32_path = spec.builder(work).path
    crops = photo_crops(spec, CALIBRATION_CROPS + 1, seed=0)
    calib, feeds = batches(crops[:-1], 1), {"input": crops[-1:]}
    progress(f"{spec.name}: quantizing (intq, ORT) ...")
    graph = intq.quantize(
        intq.from_onnx(fp32_path), [{"input": b} for b in calib], intq.QuantConfig(progress=False)
    )
    qdq = ort_quantize(fp32_path, calib, work)["u8s8"]
    progress(f"{spec.name}: compiling ...")
    exes = {name: intq.compile(graph, target="tvm", tvm_target=t) for name, t in targets().items()}
    want = intq.compile(graph, target="onnxruntime").run(feeds)
    same = all(
        np.array_equal(want[k], v) for exe in exes.values() for k, v in exe.run(feeds).items()
    )
    paths = {name: sorted(set(exe.kernel_paths.values())) for name, exe in exes.items()}
    opts = session_options(1, spin=False)
    fp32, ort_qdq = open_session(fp32_path, opts), open_session(qdq, opts)
    runners: dict[str, Callable[[], object]] = {
        "ORT FP32": lambda: fp32.run(None, feeds),
        "ORT QDQ u8s8": lambda: ort_qdq.run(None, feeds),
        **{name: partial(exe.run, feeds) for name, exe in exes.items()},
    }
    progress(f"{spec.name}: timing {runs} rounds (bit-exact: {same}) ...")
    times = timed_rounds(runners, warmup, runs)
    return {
        "model": spec.label,
        "bit_exact": bool(same),
        "kernel_paths": paths,
        "median_ms": {k: float(np.median(v)) for k, v in times.items()},
        "p90_ms": {k: float(np.percentile(v, 90)) for k, v in times.items()},
    }


def report(rows: Sequence[dict[str, object]], loads: tuple[float, float]) -> str:
    """The Markdown table: medians (p90) per variant and the VNNI model against ORT QDQ."""
    names = list(rows[0]["median_ms"])  # type: ignore[arg-type]
    lines = [
        f"CPU: {cpu_description()}; one thread; load average {loads[0]:.2f} before,"
        f" {loads[1]:.2f} after",
        "",
        "| model | " + " | ".join(names) + " | VNNI / ORT QDQ | bit-exact |",
        "|---" * (len(names) + 3) + "|",
    ]
    for row in rows:
        med, p90 = row["median_ms"], row["p90_ms"]
        assert isinstance(med, dict) and isinstance(p90, dict)
        cells = [f"{med[n]:.2f} ({p90[n]:.2f})" for n in names]
        ratio = med[VNNI] / med["ORT QDQ u8s8"]
        lines.append(
            f"| {row['model']} | " + " | ".join(cells) + f" | {ratio:.2f}x | {row['bit_exact']} |"
        )
    lines.append("")
    lines.append("milliseconds per image, median (90th percentile)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=sorted(SPECS), default=list(SPECS))
    parser.add_argument("--work-dir", type=Path, default=Path("out/vnni_latency"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    before = load_average()
    rows = [model_row(SPECS[m], args.work_dir, args.warmup, args.runs) for m in args.models]
    loads = (before, load_average())
    print(report(rows, loads))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"load": loads, "rows": rows}, indent=2))
    return 0 if all(row["bit_exact"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
