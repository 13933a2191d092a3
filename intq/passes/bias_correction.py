"""Bias correction: remove the mean output shift that weight quantization causes.

Rounding a layer's weights to ``W_q`` changes its output by ``(W_q - W) x``; over the data
that error has a mean, per output channel, which the following layers see as a bias shift
(Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", the empirical variant). Its expectation is linear in the input's mean:
``E[(W_q - W) x] = sum (W_q - W) * E[x]`` over the weight's input taps, so it needs, per
weighted layer, only the mean input each weight element multiplies: :class:`MeanInputs`
gathers it while ``calibrate`` runs (streaming sums, the size of the weights), and the
lowering subtracts the shift from the float bias before rounding it to int32
(:func:`corrected_bias`).

Only integer biases change, so the graph stays bit-exact across backends and the range
analysis proves the corrected biases like any others.

:data:`MEAN_INPUTS` holds one rule per weighted op: the sum over the batch (and the output
positions) of the input each weight element reads, shaped to broadcast against the weight,
and how many terms that sum has. A convolution's zero padding counts as zeros, so the border
taps' means are exact.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import numpy as np

from intq.ir.graph import Node, Value, ValueMap
from intq.tables import RuleTable

MeanRule = Callable[[Node, np.ndarray], tuple[np.ndarray, int]]

BIAS_CORRECTIONS = ("auto", True, False)
"""``auto``: the layers with weights narrower than 8 bits (where rounding shifts outputs the
most); ``True``: every layer; ``False``: none."""

MEAN_INPUTS: RuleTable[MeanRule] = RuleTable()
"""Weighted op -> ``(node, input) -> (sum of the input each weight element reads, count)``."""


@MEAN_INPUTS.register("Conv")
def _conv_taps(node: Node, x: np.ndarray) -> tuple[np.ndarray, int]:
    attrs = node.attrs
    w = node.inputs[1]
    assert w is not None and w.const is not None
    kernel = w.const.shape[2:]
    spatial = len(kernel)
    out = node.output.type.shape[2:]
    pads, strides, dilations = attrs["pads"], attrs["strides"], attrs["dilations"]
    width = [(0, 0), (0, 0), *((pads[i], pads[i + spatial]) for i in range(spatial))]
    padded = np.pad(x.astype(np.float64), width)
    sums = np.zeros((x.shape[1], *kernel))
    for tap in itertools.product(*(range(k) for k in kernel)):
        window: tuple[slice, ...] = tuple(
            slice(t * d, t * d + (o - 1) * s + 1, s)
            for t, d, o, s in zip(tap, dilations, out, strides)
        )
        reads = padded[(slice(None), slice(None), *window)]
        at: tuple[slice | int, ...] = (slice(None), *tap)
        sums[at] = reads.sum(axis=(0, *range(2, 2 + spatial)))
    # Output channel c of group g reads input channels g * C/G ... (g + 1) * C/G - 1.
    groups, cout = attrs["group"], w.const.shape[0]
    per_group = x.shape[1] // groups
    channels = np.arange(cout)[:, None] // (cout // groups) * per_group + np.arange(per_group)
    return sums[channels], x.shape[0] * math.prod(out)


@MEAN_INPUTS.register("Gemm")
def _gemm_rows(node: Node, x: np.ndarray) -> tuple[np.ndarray, int]:
    sums = x.astype(np.float64).sum(axis=0)  # transA is refused by the lowering
    return (sums[None, :] if node.attrs["transB"] else sums[:, None]), x.shape[0]


@MEAN_INPUTS.register("MatMul")
def _matmul_rows(node: Node, x: np.ndarray) -> tuple[np.ndarray, int]:
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return rows.sum(axis=0)[:, None], rows.shape[0]


class InputMeans(ValueMap[np.ndarray]):
    """Per weighted layer (keyed by its output value), the mean input each weight element
    reads over the calibration data, broadcastable against the weight: what bias correction
    needs (stored by ``calibrate`` when asked)."""


class MeanInputs:
    """Streaming sums of :data:`MEAN_INPUTS` for every weighted node with a constant weight
    that reads a float activation; :meth:`observe` takes each tensor as calibration computes
    it."""

    def __init__(self, nodes: Iterable[Node]):
        self._readers: dict[Value, list[Node]] = {}
        for node in nodes:
            x, w = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
            if node.op in MEAN_INPUTS and x is not None and w is not None and w.is_const:
                self._readers.setdefault(x, []).append(node)
        self._sums: dict[Node, np.ndarray] = {}
        self._counts: dict[Node, int] = {}

    def observe(self, value: Value, array: np.ndarray) -> None:
        """Add ``array``, one batch of ``value``, to the sums of the layers reading it."""
        for node in self._readers.get(value, ()):
            sums, count = MEAN_INPUTS[node.op](node, array)
            if node in self._sums:
                self._sums[node] += sums
                self._counts[node] += count
            else:
                self._sums[node], self._counts[node] = sums, count

    def result(self) -> InputMeans:
        """The means so far, keyed by each layer's output value."""
        return InputMeans({n.output: s / self._counts[n] for n, s in self._sums.items()})


def corrected_bias(
    bias: np.ndarray | None,
    weight: np.ndarray,
    dequantized: np.ndarray,
    axis: int,
    mean_input: np.ndarray,
) -> np.ndarray:
    """``bias`` (zeros where ``None``) less the mean output shift of replacing ``weight`` by
    ``dequantized``, per output channel along ``axis``, for inputs of mean ``mean_input``."""
    error = (dequantized.astype(np.float64) - weight.astype(np.float64)) * mean_input
    shift = np.moveaxis(error, axis, 0).reshape(weight.shape[axis], -1).sum(axis=1)
    base = np.zeros(weight.shape[axis]) if bias is None else np.asarray(bias, np.float64)
    return base - shift


__all__ = ["MEAN_INPUTS", "InputMeans", "MeanInputs", "corrected_bias"]
