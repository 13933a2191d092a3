"""The fast part of the coverage corpus (``benchmarks/coverage.py`` runs all of it): common
architectures as users bring them go through both importers, quantization and every backend,
integer-only, bit-exact with the reference interpreter and close to FP32.

The entries (``fast=True`` in :mod:`examples.corpus`): a Hugging Face ResNet, ViT and BERT
built from configs (the BERT through its ONNX export with symbolic batch and sequence dims,
the transformers mask builder and torch's attention export), a sentence-transformers style
mean-pooled BERT, a MobileNetV3 (HardSwish, squeeze-excite), a SqueezeNet, a YOLO-style
detector (SiLU, Split, nearest upsampling) and MTCNN's O-Net with its real weights (PReLU).
"""

from __future__ import annotations

import pytest

from benchmarks.coverage import COLUMNS, cover
from examples import corpus

FAST = [name for name, entry in corpus.CORPUS.items() if entry.fast]


@pytest.mark.parametrize("name", FAST)
def test_a_corpus_model_converts_integer_only_and_bit_exact(name, tmp_path):
    row = cover(name, tmp_path)
    assert row.note == "", row.note
    assert all(row.steps[column] == "ok" for column in COLUMNS), row.steps
    assert row.islands == 0 and row.converts
    # Random-weight models sit near 0.999 and O-Net near 0.9999 on the example samples.
    assert row.fidelity is not None and row.fidelity > 0.98, row.fidelity


def test_the_corpus_is_broad():
    families = {entry.family for entry in corpus.CORPUS.values()}
    assert {"cnn", "vit", "text", "dense", "packaged"} <= families
    assert len(corpus.CORPUS) >= 30
    assert sum(entry.family == "packaged" for entry in corpus.CORPUS.values()) >= 6
