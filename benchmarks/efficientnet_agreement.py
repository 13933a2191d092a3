"""EfficientNet-Lite0: how closely do intq's integer-only graphs and ONNX Runtime's static
quantization follow the FP32 model, on the same real photo crops?

Run from the repository root (the ``dev`` extra installed)::

    .venv/bin/python -m benchmarks.efficientnet_agreement            # full run
    .venv/bin/python -m benchmarks.efficientnet_agreement --quick    # smoke run, about a minute
    .venv/bin/python -m benchmarks.efficientnet_agreement --json out/bench/agreement.json

What runs, every executable on the same evaluation crops:

* the FP32 model in an ONNX Runtime CPU session: the reference every other row is compared to;
* intq INT8 (``intq.quantize``, integer-only) calibrated with ``minmax``, ``percentile``,
  ``mse`` and ``auto`` (the default: a rule per tensor), then intq with 7-bit and with 4-bit
  weights / 8-bit activations using the INT8 method that agreed best (7 bits: what the TVM
  backend's byte kernel needs on AVX2); intq graphs run in intq's numpy reference interpreter;
* ONNX Runtime's ``quantize_static`` on the same FP32 model (after ``quant_pre_process``): QDQ
  format, per-channel weights, s8s8 and u8s8 (``reduce_range=True``), calibrated with MinMax,
  Entropy and Percentile on the same calibration crops as intq; each ORT model also runs a
  second time with graph optimizations off, which evaluates its QDQ nodes in float (a separate
  table: it tells calibration error apart from what ORT's integer CPU kernels add).

Metrics per row, against the FP32 logits: top-1 agreement on all crops, top-1 agreement on the
crops where FP32 is confident (max softmax > 0.5), mean cosine similarity of the logits, and
the median wall time per image of the executable as run here (batch 1; see
:func:`measure_latency`).

The evaluation crops and the calibration crops are two different random draws (different
seeds) from the same photos: scikit-learn's ``china.jpg`` and ``flower.jpg`` and, when
scikit-image is installed, its bundled ``astronaut``, ``coffee``, ``chelsea``, ``rocket`` and
``motorcycle_left`` photos. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    create_calibrator,
    quant_pre_process,
    quantize_static,
    save_tensors_data,
)
from PIL import Image

import intq
from benchmarks.machine import cpu_description, load_average
from examples import zoo
from intq.passes.integer_only import Census, census, check_integer_only

SIZE = zoo.EFFNET_SIZE
"""Input side of the exported model (224)."""

# The Lite models' TF preprocessing: (x - 127) / 128 (see examples.zoo.efficientnet_lite0).
MEAN_RGB = 127.0
STDDEV_RGB = 128.0

CROP_FRACTION = (0.4, 1.0)
"""Crop side as a fraction of the photo's short side (uniform)."""

LATENCY_ROUNDS = 3
"""Rounds of the latency pass (see :func:`measure_latency`)."""

INTQ_LATENCY_CROPS = 4
"""Crops per latency round for intq rows: the reference interpreter is slow, and its latency is
not a deployment number anyway."""

CONFIDENT = 0.5
"""A crop is "confident" when the FP32 model's max softmax probability exceeds this."""

PERCENTILE = 99.99
"""The percentile used by intq's and by ONNX Runtime's percentile calibration alike."""

ORT_MAX_IR_VERSION = 13
"""The newest ONNX IR version onnxruntime 1.31 loads; onnx 1.23 stamps 14 on new models."""

INTQ_METHODS = ("minmax", "percentile", "mse", "auto")


@dataclass(frozen=True)
class OrtCalibration:
    """One ONNX Runtime calibration setting.

    ``calibrator_options`` set means the script runs ``create_calibrator`` itself with those
    options (``quantize_static`` does not pass them through) and hands the ranges to
    ``quantize_static`` through its calibration cache.
    """

    label: str
    method: CalibrationMethod
    extra_options: Mapping[str, Any] = field(default_factory=dict)
    calibrator_options: Mapping[str, Any] | None = None


ORT_CALIBRATIONS = {
    "minmax": OrtCalibration("minmax", CalibrationMethod.MinMax),
    # quantize_static's defaults: 128 histogram bins and 128 quantized bins, which leaves the
    # KL search a single candidate, the full range: the same ranges as MinMax.
    "entropy": OrtCalibration("entropy", CalibrationMethod.Entropy),
    # TensorRT-style KL calibration: a 2048-bin histogram searched down to 128 bins.
    "entropy2048": OrtCalibration(
        "entropy 2048 bins", CalibrationMethod.Entropy, calibrator_options={"num_bins": 2048}
    ),
    # ORT's default percentile is 99.999; use intq's so the two are comparable.
    "percentile": OrtCalibration(
        f"percentile {PERCENTILE:g}",
        CalibrationMethod.Percentile,
        extra_options={"CalibPercentile": PERCENTILE},
    ),
}

# (label, activation type, weight type, reduce_range)
ORT_FORMATS = (
    ("s8s8", QuantType.QInt8, QuantType.QInt8, False),
    ("u8s8", QuantType.QUInt8, QuantType.QInt8, True),
)


Runner = Callable[[np.ndarray], np.ndarray]
"""Runs one executable: a ``[1, 3, 224, 224]`` float32 image -> its ``[1, 1000]`` logits."""


# --------------------------------------------------------------------------------------------
# Photos and crops
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Crop:
    """Where one crop comes from: photo, square box (top, left, side) and horizontal flip."""

    photo: str
    top: int
    left: int
    side: int
    flip: bool


def load_photos() -> dict[str, np.ndarray]:
    """The real photos, name -> uint8 HWC RGB array, all shipped inside installed packages.

    scikit-learn's two sample photos always; scikit-image's bundled photos when it is installed
    (its ``skimage.data`` loaders read files inside the wheel, they do not download these).
    """
    from sklearn.datasets import load_sample_image

    photos = {name: load_sample_image(f"{name}.jpg") for name in ("china", "flower")}
    try:
        import skimage.data as skdata
    except ImportError:
        progress("scikit-image is not installed: using scikit-learn's 2 photos only")
        return photos
    photos["astronaut"] = skdata.astronaut()
    photos["coffee"] = skdata.coffee()
    photos["chelsea"] = skdata.chelsea()
    photos["rocket"] = skdata.rocket()
    photos["motorcycle_left"] = skdata.stereo_motorcycle()[0]
    for name, img in photos.items():
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"photo {name!r}: expected uint8 HxWx3, got {img.dtype} {img.shape}")
    return photos


def draw_crops(photos: Mapping[str, np.ndarray], count: int, seed: int) -> list[Crop]:
    """``count`` random square crops, photos taken in turn, reproducible from ``seed``.

    Each crop's side is uniform in 40-100% of the photo's short side, its position uniform over
    the positions where it fits, and it is mirrored horizontally with probability 1/2.
    """
    rng = np.random.default_rng(seed)
    names = sorted(photos)
    crops = []
    for i in range(count):
        name = names[i % len(names)]
        h, w, _ = photos[name].shape
        short = min(h, w)
        side = round(float(rng.uniform(*CROP_FRACTION)) * short)
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crops.append(Crop(name, top, left, side, bool(rng.random() < 0.5)))
    return crops


def render(photos: Mapping[str, np.ndarray], crops: Sequence[Crop]) -> np.ndarray:
    """The crops as the model's input: float32 ``[N, 3, 224, 224]``, normalised ``(x-127)/128``.

    Resized with PIL's bilinear filter, like ``examples.zoo`` does for its sample input.
    """
    out = np.empty((len(crops), 3, SIZE, SIZE), np.float32)
    for i, c in enumerate(crops):
        patch = photos[c.photo][c.top : c.top + c.side, c.left : c.left + c.side]
        if c.flip:
            patch = patch[:, ::-1]
        img = Image.fromarray(np.ascontiguousarray(patch))
        resized = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        hwc = (np.asarray(resized, np.float32) - MEAN_RGB) / STDDEV_RGB
        out[i] = hwc.transpose(2, 0, 1)
    return out


# --------------------------------------------------------------------------------------------
# Running and scoring
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One executable: what it is, how it scored against FP32, and how long it took."""

    name: str
    backend: str
    weights: str
    activations: str
    calibration: str
    build_s: float = 0.0
    """Wall time to build the executable (calibration, quantization, session creation)."""
    eval_s: float = 0.0
    """Wall time of the pass over all evaluation crops."""
    ms_per_image: float | None = None
    """Median milliseconds per image from the interleaved latency pass; None if not timed."""
    top1: int = 0
    top1_confident: int = 0
    cosine: float = 0.0
    integer_only: str = ""
    float_simulation: bool = False
    """An ORT QDQ model run with graph optimizations off: QDQ computed in float."""
    logits: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    runner: Runner | None = field(default=None, repr=False)


def progress(message: str) -> None:
    """One progress line on stderr (stdout carries only the report)."""
    print(f"[agreement] {message}", file=sys.stderr, flush=True)


def evaluate(row: Row, runner: Runner, images: np.ndarray) -> None:
    """Run ``runner`` on every image (batch 1); store the logits ``[N, classes]`` in ``row``."""
    start = time.perf_counter()
    row.logits = np.stack(
        [np.asarray(runner(images[i : i + 1]), np.float32).reshape(-1) for i in range(len(images))]
    )
    row.eval_s = time.perf_counter() - start
    row.runner = runner


def measure_latency(rows: Sequence[Row], images: np.ndarray, rounds: int = LATENCY_ROUNDS) -> None:
    """Median wall time per image of every row that has a runner.

    In each of ``rounds`` rounds every executable in turn gets one untimed warm-up run, then
    one timed run per image. Taking turns spreads any load from elsewhere on the machine over
    all rows; whole blocks per executable (rather than alternating image by image) keep one
    executable's caches and still-spinning worker threads (ONNX Runtime's, OpenBLAS's) from
    being billed to the next.
    """
    timed = [r for r in rows if r.runner is not None]
    times: dict[int, list[float]] = {id(r): [] for r in timed}
    for _ in range(rounds):
        for r in timed:
            assert r.runner is not None
            r.runner(images[:1])
            for i in range(len(images)):
                start = time.perf_counter()
                r.runner(images[i : i + 1])
                times[id(r)].append(time.perf_counter() - start)
    for r in timed:
        r.ms_per_image = 1000.0 * float(np.median(times[id(r)]))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def score(row: Row, reference: np.ndarray, confident: np.ndarray) -> None:
    """Fill ``row``'s agreement metrics from its logits against the FP32 ``reference`` logits."""
    same = row.logits.argmax(axis=1) == reference.argmax(axis=1)
    row.top1 = int(same.sum())
    row.top1_confident = int(same[confident].sum())
    a = row.logits.astype(np.float64)
    b = reference.astype(np.float64)
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    row.cosine = float(cos.mean())


def ort_session(path: Path, optimize: bool = True) -> ort.InferenceSession:
    """A CPU session with the default thread pool (all cores) and quiet logging.

    ``optimize=False`` turns graph optimizations off: QDQ pairs are then not fused into
    ONNX Runtime's integer kernels but run as written (DequantizeLinear, float op,
    QuantizeLinear), which shows what the quantization parameters alone cost.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_runner(session: ort.InferenceSession) -> Runner:
    """``images -> logits`` for a session with one input and one output."""
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


# --------------------------------------------------------------------------------------------
# intq
# --------------------------------------------------------------------------------------------


def calibration_label(method: str) -> str:
    """How a calibration method is shown in the table."""
    return f"percentile {PERCENTILE:g}" if method == "percentile" else method


def intq_row(
    graph: intq.ir.Graph,
    calibration: np.ndarray,
    images: np.ndarray,
    method: str,
    weight_bits: int,
) -> tuple[Row, intq.ir.Graph]:
    """Quantize ``graph`` with intq, check it is integer-only, and run it on ``images``."""
    label = f"intq W{weight_bits}A8 {method}"
    progress(f"{label}: calibrating on {len(calibration)} crops and lowering ...")
    start = time.perf_counter()
    config = intq.QuantConfig(
        calibration=method,
        percentile=PERCENTILE,
        weight_bits=weight_bits,
        activation_bits=8,
        progress=False,
    )
    batches = ({"input": calibration[i : i + 1]} for i in range(len(calibration)))
    qgraph = intq.quantize(graph, batches, config)
    result = check_integer_only(qgraph)  # raises NumericsError if any op computes in float
    exe = intq.compile(qgraph, target="reference")
    tail = f", float tail: {', '.join(result.float_tail)}" if result.float_tail else ""
    row = Row(
        name=f"intq W{weight_bits}A8",
        backend="intq reference interpreter (numpy)",
        weights=f"int{weight_bits} per-ch sym",
        activations="u8/s8 sym",
        calibration=calibration_label(method),
        build_s=time.perf_counter() - start,
        integer_only=f"passed ({len(result.violations)} violations,"
        f" {result.divisions} runtime divisions{tail})",
    )
    progress(f"{label}: quantized in {row.build_s:.0f} s; running {len(images)} crops ...")
    evaluate(row, lambda x: exe.run({"input": x})["logits"], images)
    return row, qgraph


# --------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------


class CropReader(CalibrationDataReader):
    """ONNX Runtime calibration reader over the calibration crops, one image per batch."""

    def __init__(self, input_name: str, images: np.ndarray):
        self.input_name = input_name
        self.images = images
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch, or ``None`` when all crops were read."""
        if self._next >= len(self.images):
            return None
        batch = self.images[self._next : self._next + 1]
        self._next += 1
        return {self.input_name: batch}

    def rewind(self) -> None:
        """Start over from the first crop."""
        self._next = 0

    def __len__(self) -> int:
        return len(self.images)


def clamp_ir_version(path: Path) -> int:
    """Lower ``path``'s IR version to what onnxruntime loads, if needed; returns the stamped one.

    onnxruntime 1.31 rejects IR 14, which onnx 1.23 stamps on models it builds. The graphs
    here use nothing newer than IR 8 (the exporter's stamp), so only the number changes.
    """
    model = onnx.load(str(path))
    stamped = int(model.ir_version)
    if stamped > ORT_MAX_IR_VERSION:
        model.ir_version = ORT_MAX_IR_VERSION
        onnx.save(model, str(path))
    return stamped


def preprocess(model_path: Path, work_dir: Path) -> Path:
    """ONNX Runtime's recommended ``quant_pre_process`` (shape inference, graph optimisation).

    Runs offline. Cached in ``work_dir`` next to the exported model; rebuilt when the model
    file is newer.
    """
    out = work_dir / f"{model_path.stem}.ort_preprocessed.onnx"
    if out.exists() and out.stat().st_mtime >= model_path.stat().st_mtime:
        return out
    progress("ORT: quant_pre_process (symbolic shape inference + graph optimisation) ...")
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.onnx")
    with contextlib.redirect_stdout(sys.stderr):
        quant_pre_process(str(model_path), str(tmp))
    stamped = clamp_ir_version(tmp)
    if stamped > ORT_MAX_IR_VERSION:
        progress(f"ORT: pre-processed model was stamped IR {stamped}; set to {ORT_MAX_IR_VERSION}")
    os.replace(tmp, out)
    return out


def ort_calibrate(
    prepared: Path, reader: CropReader, setting: OrtCalibration, cache: Path, tmp_dir: Path
) -> None:
    """Calibrate with ``create_calibrator`` and ``setting.calibrator_options``; save to ``cache``.

    All tensors are calibrated (a superset of those ``quantize_static`` asks for).
    """
    with contextlib.redirect_stdout(sys.stderr):
        calibrator = create_calibrator(
            prepared,
            None,
            augmented_model_path=str(tmp_dir / f"augmented_{cache.stem}.onnx"),
            calibrate_method=setting.method,
            extra_options=dict(setting.calibrator_options or {}),
        )
        calibrator.collect_data(reader)
        save_tensors_data(calibrator.compute_data(), cache)


def ort_rows(
    prepared: Path,
    calibration: np.ndarray,
    images: np.ndarray,
    settings: Sequence[str],
    out_dir: Path,
) -> Iterator[Row]:
    """``quantize_static`` for each calibration setting x format; run each model on ``images``.

    Yields two rows per model: as ONNX Runtime runs it (QDQ fused into its integer kernels),
    then with graph optimizations off (QDQ evaluated in float). The calibrated ranges do not
    depend on the target types, so each setting calibrates once (ORT's own
    ``calibration_cache_path``, in a temporary directory) and both formats reuse it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    input_name = ort_session(prepared).get_inputs()[0].name
    with tempfile.TemporaryDirectory(prefix="agreement-calib-") as tmp:
        for key in settings:
            setting = ORT_CALIBRATIONS[key]
            cache = Path(tmp) / f"{key}.json"
            for fmt, act, wt, reduce_range in ORT_FORMATS:
                label = f"ORT {fmt} {setting.label}"
                progress(f"{label}: quantize_static on {len(calibration)} crops ...")
                start = time.perf_counter()
                reader = CropReader(input_name, calibration)
                if setting.calibrator_options is not None and not cache.exists():
                    ort_calibrate(prepared, reader, setting, cache, Path(tmp))
                out = out_dir / f"efficientnet_lite0_qdq_{fmt}_{key}.onnx"
                # The histogram calibrators print to stdout; keep stdout for the report.
                with contextlib.redirect_stdout(sys.stderr):
                    quantize_static(
                        str(prepared),
                        str(out),
                        reader,
                        quant_format=QuantFormat.QDQ,
                        per_channel=True,
                        reduce_range=reduce_range,
                        activation_type=act,
                        weight_type=wt,
                        calibrate_method=setting.method,
                        extra_options=dict(setting.extra_options),
                        calibration_cache_path=str(cache),
                    )
                clamp_ir_version(out)
                quantized = time.perf_counter() - start
                for optimize in (True, False):
                    start = time.perf_counter()
                    session = ort_session(out, optimize=optimize)
                    row = Row(
                        name=f"ORT QDQ {fmt}",
                        backend="onnxruntime CPU" + ("" if optimize else ", optimizations off"),
                        weights="int7 per-ch sym" if reduce_range else "int8 per-ch sym",
                        activations=f"{'int8' if act == QuantType.QInt8 else 'uint8'} asym",
                        calibration=setting.label,
                        build_s=quantized + time.perf_counter() - start,
                        float_simulation=not optimize,
                    )
                    evaluate(row, ort_runner(session), images)
                    if not optimize:
                        row.runner = None  # not a deployment configuration: not timed
                    yield row


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def table(rows: Sequence[Row], n: int, n_confident: int, timed: bool = True) -> str:
    """The rows as an aligned plain-text table."""

    def pct(k: int, total: int) -> str:
        return f"{k}/{total} {100.0 * k / total:5.1f}%" if total else "n/a"

    header = [
        "executable",
        "weights",
        "activations",
        "calibration",
        "top-1 agree",
        f"top-1 confident (n={n_confident})",
        "cos(logits)",
        "ms/img",
        "build s",
    ]
    body = [
        [
            r.name,
            r.weights,
            r.activations,
            r.calibration,
            pct(r.top1, n),
            pct(r.top1_confident, n_confident),
            f"{r.cosine:.5f}",
            "-" if r.ms_per_image is None else f"{r.ms_per_image:.1f}",
            f"{r.build_s:.1f}",
        ]
        for r in rows
    ]
    if not timed:
        header, body = header[:-2], [line[:-2] for line in body]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]

    def fmt(line: Sequence[str]) -> str:
        cells = [
            c.rjust(w) if i >= 4 else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body)])


def best_method(rows: Sequence[Row]) -> str:
    """The intq INT8 calibration method with the best top-1 agreement (then cosine)."""
    best = max(rows, key=lambda r: (r.top1, r.cosine))
    return best.calibration.split()[0]


def report(
    args: argparse.Namespace,
    rows: Sequence[Row],
    photos: Mapping[str, np.ndarray],
    n_confident: int,
    int8_census: Census,
    int8_method: str,
    best: str,
    elapsed: float,
) -> str:
    """The plain-text report printed to stdout."""
    n = len(rows[0].logits)
    main_rows = [r for r in rows if not r.float_simulation]
    sim_rows = [r for r in rows if r.float_simulation]
    intq_rows = [r for r in rows if r.integer_only]
    lines = [
        "EfficientNet-Lite0 (ImageNet weights): agreement of quantized executables with FP32",
        f"photos: {', '.join(sorted(photos))}",
        f"evaluation: {n} random crops (seed {args.seed}); calibration: {args.calib_crops}"
        f" other crops (seed {args.seed + 1});",
        f"  crop side {CROP_FRACTION[0]:.0%}-{CROP_FRACTION[1]:.0%} of the photo's short side,"
        f" random position and horizontal flip, bilinear resize to {SIZE}, (x-127)/128",
        f"reference: the FP32 ONNX model in onnxruntime {ort.__version__};"
        f" confident crops (FP32 max softmax > {CONFIDENT}): {n_confident} of {n}",
        f"CPU: {cpu_description()}; load average (1 min) at start {args.load_start:.2f},"
        f" at end {load_average():.2f}",
        "",
        table(main_rows, n, n_confident),
        "",
        "top-1 agree: argmax equal to FP32's. cos(logits): mean cosine similarity with the FP32"
        " logits.",
        "ms/img: median wall time per image, batch 1, the executables taking turns in"
        f" {LATENCY_ROUNDS} rounds of {args.latency_crops}",
        f"  crops for ORT, then of {min(args.latency_crops, INTQ_LATENCY_CROPS)} crops for"
        " intq (timed after ORT: its numpy runs would slow ORT's).",
        "  NOTE: intq rows run in intq's numpy reference interpreter (the correctness oracle,"
        " not a fast",
        "  backend): their ms/img is NOT a deployment latency. ORT rows: CPU provider, default"
        " threads.",
        "build s: calibration + quantization + session creation.",
        "intq: weights symmetric narrow-range per output channel; activations symmetric (zero"
        " point 0), uint8 where",
        "  provably non-negative (after ReLU6), int8 elsewhere; int32 accumulators, dyadic"
        " requantization.",
        f"intq W7A8 and W4A8 use the INT8 calibration with the best top-1 agreement here ({best}).",
        "ORT: quant_pre_process, then quantize_static(QDQ, per_channel=True); u8s8 with"
        f" reduce_range=True; CalibPercentile={PERCENTILE:g}.",
    ]
    if any(r.calibration.startswith("entropy") for r in rows):
        lines += [
            "ORT entropy: with quantize_static's defaults (a 128-bin histogram searched for 128"
            " quantized bins) the",
            "  KL search has one candidate, the full range, so it gives minmax's ranges."
            " 'entropy 2048 bins' runs",
            "  create_calibrator(num_bins=2048) itself (quantize_static does not pass num_bins)"
            " and hands the",
            "  ranges to quantize_static through calibration_cache_path.",
        ]
    if sim_rows:
        lines += [
            "",
            "The same ORT models with graph optimizations off (ORT_DISABLE_ALL): QDQ is"
            " evaluated as written,",
            "DequantizeLinear -> float op -> QuantizeLinear, instead of ONNX Runtime's fused"
            " integer kernels.",
            "A gap to the table above is the CPU kernels' doing (e.g. s8s8 on x86 without VNNI),"
            " not calibration's.",
            "",
            table(sim_rows, n, n_confident, timed=False),
        ]
    lines += [
        "",
        "intq integer-only check (intq.passes.integer_only.check_integer_only):",
        *(f"  {r.name} {r.calibration}: {r.integer_only}" for r in intq_rows),
        "",
        f"intq op census, W8A8 graph ({int8_method}):",
        *(f"  {line}" for line in int8_census.table().splitlines()),
        "",
        f"total wall time: {elapsed:.0f} s",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="Top-1 agreement with the FP32 model of EfficientNet-Lite0 quantized by intq"
        " and by ONNX Runtime, on real photo crops."
    )
    parser.add_argument("--crops", type=int, default=None, help="evaluation crops (default 96)")
    parser.add_argument(
        "--calib-crops", type=int, default=None, help="calibration crops (default 32)"
    )
    parser.add_argument(
        "--latency-crops",
        type=int,
        default=None,
        help="crops timed per round of the latency pass (default 16, intq rows at most"
        f" {INTQ_LATENCY_CROPS})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 16 crops, 8 calibration crops, 4 latency crops, minmax only",
    )
    parser.add_argument("--seed", type=int, default=0, help="evaluation crop seed (calib: +1)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("out/bench"),
        help="where the exported and ORT-quantized models are kept (default out/bench)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.crops is None:
        args.crops = 16 if args.quick else 96
    if args.calib_crops is None:
        args.calib_crops = 8 if args.quick else 32
    if args.latency_crops is None:
        args.latency_crops = 4 if args.quick else 16
    args.latency_crops = min(args.latency_crops, args.crops)
    if args.crops < 1 or args.calib_crops < 1 or args.latency_crops < 1:
        parser.error("--crops, --calib-crops and --latency-crops must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the report; returns the exit status."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    args.load_start = load_average()
    intq_methods = ("minmax",) if args.quick else INTQ_METHODS
    ort_settings = ("minmax",) if args.quick else tuple(ORT_CALIBRATIONS)

    photos = load_photos()
    eval_crops = draw_crops(photos, args.crops, args.seed)
    calib_crops = draw_crops(photos, args.calib_crops, args.seed + 1)
    images = render(photos, eval_crops)
    calibration = render(photos, calib_crops)
    progress(
        f"{len(photos)} photos, {len(images)} evaluation crops, {len(calibration)} calibration"
        f" crops (seeds {args.seed} / {args.seed + 1})"
    )

    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = zoo.efficientnet_lite0(args.work_dir)

    # The FP32 reference.
    start = time.perf_counter()
    session = ort_session(model.path)
    fp32 = Row("FP32", "onnxruntime CPU", "fp32", "fp32", "-", time.perf_counter() - start)
    evaluate(fp32, ort_runner(session), images)
    ref = fp32.logits
    confident = softmax(ref).max(axis=1) > CONFIDENT
    n_confident = int(confident.sum())
    score(fp32, ref, confident)
    rows = [fp32]
    progress(f"FP32: done, {n_confident} of {len(ref)} crops confident")

    # intq: INT8 with each calibration method, then INT4 weights with the best one.
    graph = intq.from_onnx(model.path)
    int8_rows: list[Row] = []
    int8_graph: intq.ir.Graph | None = None
    for method in intq_methods:
        row, qgraph = intq_row(graph, calibration, images, method, weight_bits=8)
        int8_graph = int8_graph or qgraph
        int8_rows.append(row)
    for row in int8_rows:
        score(row, ref, confident)
        progress(f"{row.name} {row.calibration}: top-1 {row.top1}/{len(ref)}, cos {row.cosine:.4f}")
    best = best_method(int8_rows)
    rows += int8_rows
    for weight_bits in (7, 4):  # 7: the TVM backend's byte kernel (vpmaddubsw) on AVX2
        row, _ = intq_row(graph, calibration, images, best, weight_bits=weight_bits)
        score(row, ref, confident)
        progress(f"intq W{weight_bits}A8 {best}: top-1 {row.top1}/{len(ref)}, cos {row.cosine:.4f}")
        rows.append(row)

    # ONNX Runtime's static quantization of the same FP32 model.
    prepared = preprocess(model.path, args.work_dir)
    for row in ort_rows(prepared, calibration, images, ort_settings, args.work_dir / "ort"):
        score(row, ref, confident)
        kind = " (optimizations off)" if row.float_simulation else ""
        progress(
            f"{row.name} {row.calibration}{kind}: top-1 {row.top1}/{len(ref)}, cos {row.cosine:.4f}"
        )
        rows.append(row)

    # Latency: ONNX Runtime rows first and apart from intq's, whose numpy runs leave the
    # machine slower for a while (spinning BLAS threads, caches), then the intq rows.
    ort_timed = [r for r in rows if not r.integer_only and r.runner is not None]
    progress(
        f"latency: {len(ort_timed)} ORT sessions x {args.latency_crops} crops x {LATENCY_ROUNDS}"
    )
    measure_latency(ort_timed, images[: args.latency_crops])
    intq_timed = [r for r in rows if r.integer_only]
    intq_crops = min(args.latency_crops, INTQ_LATENCY_CROPS)
    progress(f"latency: {len(intq_timed)} intq graphs x {intq_crops} crops x {LATENCY_ROUNDS}")
    measure_latency(intq_timed, images[:intq_crops])
    elapsed = time.perf_counter() - t0

    assert int8_graph is not None
    int8_census = census(int8_graph)
    print(
        report(args, rows, photos, n_confident, int8_census, intq_methods[0], best, elapsed),
        flush=True,
    )
    if args.json is not None:
        write_json(args, rows, photos, eval_crops, calib_crops, n_confident, int8_census, elapsed)
        progress(f"wrote {args.json}")
    return 0


def write_json(
    args: argparse.Namespace,
    rows: Sequence[Row],
    photos: Mapping[str, np.ndarray],
    eval_crops: Sequence[Crop],
    calib_crops: Sequence[Crop],
    n_confident: int,
    int8_census: Census,
    elapsed: float,
) -> None:
    """Write the configuration, the crops, every row's metrics and the census as JSON."""
    n = len(eval_crops)
    data = {
        "benchmark": "efficientnet_agreement",
        "config": {
            "crops": args.crops,
            "calib_crops": args.calib_crops,
            "latency_crops": args.latency_crops,
            "quick": args.quick,
            "seed": args.seed,
            "calib_seed": args.seed + 1,
            "percentile": PERCENTILE,
            "confident_threshold": CONFIDENT,
        },
        "environment": {
            "cpu": cpu_description(),
            "python": platform.python_version(),
            "intq": intq.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "photos": {name: list(img.shape) for name, img in photos.items()},
        "eval_crops": [asdict(c) for c in eval_crops],
        "calib_crops": [asdict(c) for c in calib_crops],
        "confident_crops": n_confident,
        "rows": [
            {
                "executable": r.name,
                "backend": r.backend,
                "weights": r.weights,
                "activations": r.activations,
                "calibration": r.calibration,
                "float_simulation": r.float_simulation,
                "top1_agree": r.top1 / n,
                "top1_agree_count": r.top1,
                "top1_agree_confident": r.top1_confident / n_confident if n_confident else None,
                "top1_agree_confident_count": r.top1_confident,
                "cosine": r.cosine,
                "ms_per_image_median": r.ms_per_image,
                "build_s": r.build_s,
                "eval_s": r.eval_s,
                "integer_only": r.integer_only or None,
            }
            for r in rows
        ],
        "intq_int8_census": int8_census.ops,
        "load_average_1min": {"start": args.load_start, "end": load_average()},
        "wall_s": elapsed,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
