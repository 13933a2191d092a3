"""The integer lowering, Before/Expected: a float graph and its calibration data in, the
integer graph's text out (every value's dtype, shape and scale printed), as the pass
manager runs ``calibrate`` then ``integerize``.

The expected scales follow from the data by hand: symmetric min/max ranges
(``s = max|x| / 127``, or ``/ 255`` when provably non-negative), per-channel weights
(``s_w[c] = max|w[c]| / 127``) and dyadic multipliers ``M * 2^-S`` of each scale ratio.
"""

# ruff: noqa: E501  (one IR node per line: the text form is compared as printed)

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

import intq
from intq.ir import from_text, to_text, verify
from intq.passes import Calibrate, Integerize, PassManager


def check_integerize(
    before: str, batches: Sequence[Mapping[str, np.ndarray]], expected: str, **options: object
) -> None:
    """Calibrate the ``before`` text on ``batches``, integerize, and compare with
    ``expected`` text; the result must verify."""
    graph = from_text(textwrap.dedent(before))
    manager = PassManager(
        [Calibrate(batches, progress=False), Integerize(**options)],  # type: ignore[arg-type]
        verify_each=True,
    )
    result = manager(graph)
    verify(result.graph)
    assert result.modified
    assert to_text(result.graph) == textwrap.dedent(expected).lstrip("\n")


def test_integerize_needs_calibration_statistics():
    graph = from_text("graph main(%x: f32[2]) {\n  %y = Relu(%x) : f32[2]\n  return %y\n}")
    with pytest.raises(intq.PassError, match="run the calibrate pass first"):
        Integerize()(graph)


def test_integerize_fuses_conv_and_relu():
    """Conv + ReLU: per-channel int8 weights, an int32 bias at ``s_x * s_w[c]``, one Requantize
    whose clamp is the ReLU (unsigned output).

    x in [-1, 4]: ``s_x = 4/127``; the weights' channels ``1`` and ``-0.5`` both map to
    ``+-127``; the bias 0.25 is ``0.25 / (s_x * s_w[1]) = 2016``; ReLU's output peaks at 4:
    ``s = 4/255``."""
    check_integerize(
        """
        graph main(%x: f32[1,1,2,2]) {
          %w = const f32[2,1,1,1] [1.0, -0.5]
          %b = const f32[2] [0.0, 0.25]
          %conv = Conv(%x, %w, %b) : f32[1,2,2,2] @"conv"
          %y = Relu(%conv) : f32[1,2,2,2] @"relu"
          return %y
        }
        """,
        [{"x": np.array([[[[-1.0, 2.0], [3.0, 4.0]]]], np.float32)}],
        """
        graph main(%x: f32[1,1,2,2]) {
          %w = const i8[2,1,1,1] q(bits=8, signed, narrow, axis=0, scale=[0.007874015748031496, 0.003937007874015748]) [127, -127]
          %conv.bias = const i32[2] q(bits=32, signed, axis=0, scale=[0.00024800049600099197, 0.00012400024800049599]) [0, 2016]
          %x.q = Quantize(%x) {bits=8, scale=0.031496062992125984, signed=1} : i8[1,1,2,2] q(bits=8, signed, scale=0.031496062992125984) @"x"
          %conv = QConv(%x.q, %w, %conv.bias) {dilations=[1, 1], group=1, pads=[0, 0, 0, 0], strides=[1, 1]} : i32[1,2,2,2] q(bits=32, signed, axis=1, scale=[0.00024800049600099197, 0.00012400024800049599]) @"conv"
          %relu = Requantize(%conv) {axis=1, bits=8, factor=1.0, hi=255, lo=0, multiplier=[1086457100, 1086457100], scale=0.01568627450980392, shift=[36, 37], signed=0} : u8[1,2,2,2] q(bits=8, unsigned, scale=0.01568627450980392) @"relu"
          %y = Dequantize(%relu) : f32[1,2,2,2] @"relu"
          return %y
        }
        """,
    )


def test_integerize_aligns_a_residual_add():
    """A residual Add of a layer's output and its input: the layer is requantized, then one
    QAdd aligns both branches to the output scale with one shared shift, the ReLU in its
    clamp."""
    check_integerize(
        """
        graph main(%x: f32[1,2]) {
          %w = const f32[2,2] [1.0, 0.0, 0.0, 2.0]
          %mm = MatMul(%x, %w) : f32[1,2] @"fc"
          %add = Add(%mm, %x) : f32[1,2] @"add"
          %y = Relu(%add) : f32[1,2] @"relu"
          return %y
        }
        """,
        [{"x": np.array([[1.0, -2.0]], np.float32)}],
        """
        graph main(%x: f32[1,2]) {
          %w = const i8[2,2] q(bits=8, signed, narrow, axis=1, scale=[0.007874015748031496, 0.015748031496062992]) [127, 0, 0, 127]
          %x.q = Quantize(%x) {bits=8, scale=0.015748031496062992, signed=1} : i8[1,2] q(bits=8, signed, scale=0.015748031496062992) @"x"
          %mm = QMatMul(%x.q, %w) : i32[1,2] q(bits=32, signed, axis=1, scale=[0.00012400024800049599, 0.00024800049600099197]) @"fc"
          %fc = Requantize(%mm) {axis=1, bits=8, factor=1.0, hi=127, lo=-128, multiplier=[1082196484, 1082196484], scale=0.031496062992125984, shift=[38, 37], signed=1} : i8[1,2] q(bits=8, signed, scale=0.031496062992125984) @"fc"
          %relu = QAdd(%fc, %x.q) {bits=8, hi=255, lo=0, multiplier_a=1077969154, multiplier_b=538984577, scale=0.00784313725490196, shift=28, signed=0} : u8[1,2] q(bits=8, unsigned, scale=0.00784313725490196) @"relu"
          %y = Dequantize(%relu) : f32[1,2] @"relu"
          return %y
        }
        """,
    )


def test_integerize_requantizes_concat_inputs_to_one_scale():
    """Concat: each input requantized to the output's scale unless it already has it (``z``
    does); a ReLU of a graph input, with nothing pending to fuse into, is an integer Clip."""
    check_integerize(
        """
        graph main(%x: f32[1,2], %z: f32[1,2]) {
          %a = Relu(%x) : f32[1,2] @"relu_a"
          %y = Concat(%a, %z) {axis=1} : f32[1,4] @"cat"
          return %y
        }
        """,
        [{"x": np.array([[1.0, 2.0]], np.float32), "z": np.array([[-4.0, 4.0]], np.float32)}],
        """
        graph main(%x: f32[1,2], %z: f32[1,2]) {
          %x.q = Quantize(%x) {bits=8, scale=0.00784313725490196, signed=0} : u8[1,2] q(bits=8, unsigned, scale=0.00784313725490196) @"x"
          %z.q = Quantize(%z) {bits=8, scale=0.031496062992125984, signed=1} : i8[1,2] q(bits=8, signed, scale=0.031496062992125984) @"z"
          %a = Clip(%x.q) {max=inf, min=0.0} : u8[1,2] q(bits=8, unsigned, scale=0.00784313725490196) @"relu_a"
          %cat = Requantize(%a) {axis=-1, bits=8, factor=1.0, hi=127, lo=-128, multiplier=[2139062143], scale=0.031496062992125984, shift=[33], signed=1} : i8[1,2] q(bits=8, signed, scale=0.031496062992125984) @"cat"
          %y.int = Concat(%cat, %z.q) {axis=1} : i8[1,4] q(bits=8, signed, scale=0.031496062992125984) @"cat"
          %y = Dequantize(%y.int) : f32[1,4] @"cat"
          return %y
        }
        """,
    )


def test_integerize_folds_the_bias_add_into_the_matmul():
    """MatMul + Add of a constant vector: the bias joins the int32 accumulator, and the graph
    output is dequantized straight from it (no 8-bit rounding of the logits)."""
    check_integerize(
        """
        graph main(%x: f32[1,3]) {
          %w = const f32[3,2] [0.5, -1.0, 0.25, 1.0, 0.0, 2.0]
          %b = const f32[2] [0.1, -0.2]
          %mm = MatMul(%x, %w) : f32[1,2] @"fc"
          %y = Add(%mm, %b) : f32[1,2] @"fc.bias"
          return %y
        }
        """,
        [{"x": np.array([[1.0, -1.0, 2.0]], np.float32)}],
        """
        graph main(%x: f32[1,3]) {
          %w = const i8[3,2] q(bits=8, signed, narrow, axis=1, scale=[0.003937007874015748, 0.015748031496062992]) [127, -64, 64, 64, 0, 127]
          %fc.bias = const i32[2] q(bits=32, signed, axis=0, scale=[6.200012400024799e-05, 0.00024800049600099197]) [1613, -806]
          %x.q = Quantize(%x) {bits=8, scale=0.015748031496062992, signed=1} : i8[1,3] q(bits=8, signed, scale=0.015748031496062992) @"x"
          %mm = QMatMul(%x.q, %w, %fc.bias) : i32[1,2] q(bits=32, signed, axis=1, scale=[6.200012400024799e-05, 0.00024800049600099197]) @"fc"
          %y = Dequantize(%mm) : f32[1,2] @"fc.bias"
          return %y
        }
        """,
    )


def test_integerize_computes_attention_softmax_on_the_int32_scores():
    """Attention: ``Q K^T`` of two activations (QBatchMatMul), the constant 0.5 folded into the
    softmax's scale, the integer softmax reading the int32 scores unrounded (u8
    probabilities at ``2^-8``), and ``P V``."""
    check_integerize(
        """
        graph main(%q: f32[1,2,2], %k: f32[1,2,2]) {
          %half = const f32[] [0.5]
          %s = MatMul(%q, %k) : f32[1,2,2] @"scores"
          %scaled = Mul(%s, %half) : f32[1,2,2] @"scale"
          %p = Softmax(%scaled) {axis=2} : f32[1,2,2] @"softmax"
          %o = MatMul(%p, %q) : f32[1,2,2] @"context"
          return %o
        }
        """,
        [
            {
                "q": np.array([[[1.0, -1.0], [0.5, 2.0]]], np.float32),
                "k": np.array([[[1.0, 0.0], [-1.0, 2.0]]], np.float32),
            }
        ],
        """
        graph main(%q: f32[1,2,2], %k: f32[1,2,2]) {
          %q.q = Quantize(%q) {bits=8, scale=0.015748031496062992, signed=1} : i8[1,2,2] q(bits=8, signed, scale=0.015748031496062992) @"q"
          %k.q = Quantize(%k) {bits=8, scale=0.015748031496062992, signed=1} : i8[1,2,2] q(bits=8, signed, scale=0.015748031496062992) @"k"
          %s = QBatchMatMul(%q.q, %k.q) : i32[1,2,2] q(bits=32, signed, scale=0.00024800049600099197) @"scores"
          %p = QSoftmax(%s) {axis=-1, scale=0.00012400024800049599, variant="divfree"} : u8[1,2,2] q(bits=8, unsigned, scale=0.00390625) @"softmax"
          %o.int = QBatchMatMul(%p, %q.q) : i32[1,2,2] q(bits=32, signed, scale=6.151574803149606e-05) @"context"
          %o = Dequantize(%o.int) : f32[1,2,2] @"context"
          return %o
        }
        """,
    )


def test_integerize_keeps_a_classifier_softmax_in_float():
    """A classifier's final Softmax runs in float after the output dequantization, which reads
    the Gemm's int32 accumulator."""
    check_integerize(
        """
        graph main(%x: f32[1,2]) {
          %w = const f32[2,3] [1.0, -1.0, 0.5, 0.25, 2.0, -2.0]
          %logits = Gemm(%x, %w) : f32[1,3] @"fc"
          %y = Softmax(%logits) {axis=1} : f32[1,3] @"softmax"
          return %y
        }
        """,
        [{"x": np.array([[1.0, -0.5]], np.float32)}],
        """
        graph main(%x: f32[1,2]) {
          %w = const i8[2,3] q(bits=8, signed, narrow, axis=1, scale=[0.007874015748031496, 0.015748031496062992, 0.015748031496062992]) [127, -64, 32, 32, 127, -127]
          %x.q = Quantize(%x) {bits=8, scale=0.007874015748031496, signed=1} : i8[1,2] q(bits=8, signed, scale=0.007874015748031496) @"x"
          %logits = QGemm(%x.q, %w, _) {transB=0} : i32[1,3] q(bits=32, signed, axis=1, scale=[6.200012400024799e-05, 0.00012400024800049599, 0.00012400024800049599]) @"fc"
          %fc = Dequantize(%logits) : f32[1,3] @"fc"
          %y = Softmax(%fc) {axis=1} : f32[1,3] @"softmax"
          return %y
        }
        """,
    )
