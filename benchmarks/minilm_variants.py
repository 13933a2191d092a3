"""all-MiniLM-L6-v2: how close are intq's integer-only encoders (per kernel variant) and ONNX
Runtime's quantized models to FP32, on real varied sentences?

Run from the repository root (the ``dev`` extra installed)::

    .venv/bin/python -m benchmarks.minilm_variants            # about 3 minutes here
    .venv/bin/python -m benchmarks.minilm_variants --quick    # fewer sentences

The model is the packaged MiniLM export (static batch 2, sequence 16, ``examples.zoo``).
Sentences below are two disjoint sets: the calibration set and the evaluation set. The metric
is the cosine similarity of the mean-pooled sentence embeddings (what sentence-transformers
computes) to the FP32 ones, over the evaluation sentences; also the number of run-time
divisions and of float ops inside the integer region (intq: the integer-only census; ORT's
files: nodes other than integer kernels, quantize/dequantize and data movement).

Rows: intq INT8 (8-bit weights and attention operands, 16-bit residual stream and
LayerNorm/GELU outputs) with the default kernels (softmax and LayerNorm ``divfree``, GELU
``poly``: the most accurate division-free choice) and each variant for all three ops:
``divfree``, ``shift`` (I-ViT, with I-BERT's integer square root for LayerNorm),
``lut`` (tables; LayerNorm divfree) and ``poly`` (I-BERT's i-exp / i-GELU / isqrt); the default
kernels with SmoothQuant's LayerNorm migration and with 8-bit activations everywhere
(:data:`WIDTHS`); then ONNX
Runtime's ``quantize_dynamic`` (int8 weights, float activations) and ``quantize_static`` (QDQ,
MinMax calibration on the same calibration sentences), run by ONNX Runtime.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

import intq
from benchmarks.machine import cpu_description
from examples import zoo
from intq.passes.integer_only import census

CALIBRATION = (
    "The train to the airport leaves every twenty minutes.",
    "She planted tomatoes, basil and three kinds of peppers this spring.",
    "Quarterly revenue rose by eight percent despite higher costs.",
    "The museum reopens on Monday after a long renovation.",
    "Can you send me the slides before the meeting?",
    "A sudden storm flooded the lower streets of the old town.",
    "The compiler rejected the program because of a missing semicolon.",
    "Our cat sleeps on the warm laptop whenever nobody is looking.",
    "Researchers measured the melting rate of the glacier for a decade.",
    "He ordered a coffee with oat milk and a cinnamon roll.",
    "The orchestra tuned their instruments before the concert began.",
    "Battery life improved a lot with the latest firmware update.",
    "Please keep the door closed so the heat stays inside.",
    "The referee stopped the match after the second injury.",
    "Vaccines train the immune system to recognise a pathogen.",
    "I lost my keys somewhere between the bakery and the bus stop.",
)
EVALUATION = (
    "The quick brown fox jumps over the lazy dog.",
    "Integer-only inference runs on tiny chips.",
    "My grandmother makes the best apple pie in the village.",
    "The stock market fell sharply after the announcement.",
    "Photosynthesis converts light into chemical energy.",
    "We missed the last ferry and had to stay overnight.",
    "The new library has a quiet room for studying.",
    "Heavy snow closed the mountain pass for three days.",
    "The software crashed when the file was too large.",
    "Children were playing football in the park until sunset.",
    "The recipe calls for two eggs and a cup of flour.",
    "Astronomers discovered a planet orbiting a distant star.",
    "The hotel room had a view of the harbour.",
    "Traffic was slow because of roadworks on the bridge.",
    "She finished the marathon in under four hours.",
    "The committee will vote on the proposal next week.",
    "A small bug in the parser caused the whole build to fail.",
    "The bakery opens at six and sells out by noon.",
    "Rain is expected throughout the weekend in the north.",
    "He learned to play the guitar by watching videos.",
    "The bridge was painted bright red last summer.",
    "Electric cars need fewer repairs than petrol ones.",
    "The dog barked at the postman every single morning.",
    "Their startup builds sensors for farms and greenhouses.",
)

VARIANTS = {
    "default (divfree, GELU poly)": {},
    "divfree": {"softmax": "divfree", "gelu": "divfree", "layernorm": "divfree"},
    "shift (I-ViT)": {"softmax": "shift", "gelu": "shift", "layernorm": "isqrt"},
    "lut": {"softmax": "lut", "gelu": "lut", "layernorm": "divfree"},
    "poly (I-BERT)": {"softmax": "poly", "gelu": "poly", "layernorm": "isqrt"},
}

WIDTHS: dict[str, dict] = {
    "default, smooth=layernorm": {"smooth": "layernorm"},
    "wide_bits=8": {"wide_bits": 8},
    "wide_bits=8, smooth=layernorm": {"wide_bits": 8, "smooth": "layernorm"},
}
"""Rows with the default kernels at other widths: ``wide_bits=8`` quantizes the residual
stream and the LayerNorm/GELU outputs to 8 bits; ``smooth`` migrates the LayerNorm outputs'
outlier channels into the MatMuls reading them first (``intq.passes.smooth_layernorm``)."""


def batches(model: zoo.ZooModel, sentences: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
    """``sentences`` tokenized as the packaged model expects, two at a time."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(zoo._minilm_folder()))
    batch, seq = model.inputs["input_ids"].shape
    out = []
    for i in range(0, len(sentences) - batch + 1, batch):
        enc = tok(
            list(sentences[i : i + batch]),
            padding="max_length",
            max_length=seq,
            truncation=True,
            return_tensors="np",
        )
        out.append({k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
    return out


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / m.sum(1)


def cosines(run, reference: list[np.ndarray], feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    out = []
    for want, feed in zip(reference, feeds):
        a, b = want, pooled(run(feed), feed["attention_mask"])
        out.extend((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
    return np.asarray(out)


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 calibration, 6 evaluation")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer warns about pre-processing
    with tempfile.TemporaryDirectory() as tmp:
        model = zoo.minilm(tmp)
        calib = batches(model, CALIBRATION[:4] if args.quick else CALIBRATION)
        evaluation = batches(model, EVALUATION[:6] if args.quick else EVALUATION)
        fp32 = ort_session(model.path)
        reference = [pooled(fp32(f), f["attention_mask"]) for f in evaluation]
        graph = intq.from_onnx(model.path)
        rows = []
        configs = {name: {"kernels": variant} for name, variant in VARIANTS.items()}
        for name, config in {**configs, **WIDTHS}.items():
            start = time.perf_counter()
            quantized = intq.quantize(graph, calib, intq.QuantConfig(**config))
            exe = intq.compile(quantized, "onnxruntime")
            elapsed = time.perf_counter() - start
            c = cosines(lambda f, e=exe: e.run(f)["last_hidden_state"], reference, evaluation)
            counts = census(quantized, allow_division=True)
            rows.append((f"intq {name}", c, counts.divisions, 0, f"{elapsed:.0f} s"))
        rows += ort_rows(model.path, calib, evaluation, reference, Path(tmp))
    print(f"machine: {cpu_description()}")
    print(f"{len(calib) * 2} calibration sentences, {len(evaluation) * 2} evaluation sentences\n")
    header = f"{'model':<36} {'mean cos':>9} {'min cos':>8} {'divisions':>9} {'float ops':>9}"
    print(header + "  quantize+compile")
    print("-" * (len(header) + 18))
    for name, c, divisions, floats, elapsed in rows:
        print(f"{name:<36} {c.mean():>9.4f} {c.min():>8.4f} {divisions:>9} {floats:>9}  {elapsed}")


NOT_FLOAT = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "Reshape",
    "Transpose",
    "Unsqueeze",
    "Gather",
    "Cast",
}
"""Op types of the ORT-quantized files that do not compute in float (integer kernels,
the quantization boundary, data movement and the mask's casts)."""


def ort_rows(path: Path, calib, evaluation, reference, tmp: Path) -> list[tuple]:
    """ONNX Runtime's own quantizers on the same model and sentences."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib)

        def get_next(self):
            return next(self.items, None)

    rows = []
    for name, build in (
        ("ORT quantize_dynamic (u8s8)", lambda out: quantize_dynamic(path, out)),
        (
            "ORT quantize_static (QDQ s8s8)",
            lambda out: quantize_static(
                path,
                out,
                Reader(),
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
            ),
        ),
    ):
        out = tmp / f"{name.split()[1]}.onnx"
        start = time.perf_counter()
        build(out)
        elapsed = time.perf_counter() - start
        model = onnx.load(str(out))
        floats = sum(n.op_type not in NOT_FLOAT for n in model.graph.node)
        c = cosines(ort_session(out), reference, evaluation)
        rows.append((name, c, 0, floats, f"{elapsed:.0f} s"))
    return rows


if __name__ == "__main__":
    main()
