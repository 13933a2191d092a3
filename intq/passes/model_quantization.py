"""The quantization a pre-quantized model brings with it, per value: :class:`ModelQuantization`.

A model quantized by ONNX Runtime's ``quantize_static`` (QDQ format) states a scale and zero
point for each activation it quantizes and per-channel integers for each weight. The ONNX
front end (:mod:`intq.frontends.onnx_qdq`) turns them into this side table on the float
graph; ``intq.quantize`` carries it to the graph it lowers, and the integer lowering takes an
activation's scale (:meth:`ActivationRange.quant`) and a layer's weight scales
(:meth:`WeightScales.channel_scales`) from it instead of from calibration.

Zero points: intq has zero point 0 only. An affine range ``real = s * (q - z)`` whose shifted
integer range ``[qmin - z, qmax - z]`` is intq's signed ``[-2^(b-1), 2^(b-1) - 1]`` or unsigned
``[0, 2^b - 1]`` (int8 with ``z = 0``, uint8 with ``z = 0``, uint8 with ``z = 128``) is kept
exactly; any other zero point is replaced by the symmetric range covering the model's real
range ``[s * (qmin - z), s * (qmax - z)]`` (:attr:`ActivationRange.exact` is then ``None``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from intq.ir.graph import Graph, Value, ValueMap
from intq.ir.types import QuantParams
from intq.passes.calibration import MIN_THRESHOLD
from intq.passes.precision import ACTIVATION_BITS


@dataclass(frozen=True)
class ActivationRange:
    """The model's quantization of one activation: the real range ``[lo, hi]`` it represents,
    and ``exact``, the same quantization in intq's terms (zero point 0) when one exists.

    It has what the lowering's ``Stats`` protocol asks of calibration statistics (``min``,
    ``clip``), so a value the model quantizes inexactly is lowered as a calibrated one whose
    range is the model's.
    """

    lo: float
    hi: float
    exact: QuantParams | None = None

    @classmethod
    def affine(cls, scale: float, zero_point: int, qmin: int, qmax: int) -> ActivationRange:
        """The range of ``real = scale * (q - zero_point)`` for integers ``q`` in
        ``[qmin, qmax]`` (the storage type's range, which ``QuantizeLinear`` saturates to)."""
        low, high = qmin - zero_point, qmax - zero_point
        exact = None
        for bits in ACTIVATION_BITS:
            if (low, high) == (-(1 << (bits - 1)), (1 << (bits - 1)) - 1):
                exact = QuantParams(bits, True, (scale,))
            elif (low, high) == (0, (1 << bits) - 1):
                exact = QuantParams(bits, False, (scale,))
        return cls(scale * low, scale * high, exact)

    def covering(self, other: ActivationRange) -> ActivationRange:
        """One range for a value the model quantizes twice: ``self`` when both agree, else the
        range covering both (no longer exact)."""
        if other == self:
            return self
        return ActivationRange(min(self.lo, other.lo), max(self.hi, other.hi))

    @property
    def min(self) -> float:
        """The smallest real value the model represents."""
        return self.lo

    def top(self, signed: bool) -> float:
        """The largest magnitude of the model's range a ``signed`` (or unsigned) value holds."""
        return float(max(-self.lo, self.hi) if signed else max(self.hi, 0.0))

    def clip(self, method: str, bits: int, signed: bool, percentile: float = 99.99) -> float:
        """The symmetric threshold covering the model's range (``scale = T / qmax``); the
        calibration ``method`` does not apply, the model fixed the range."""
        return max(self.top(signed), MIN_THRESHOLD)

    def quant(self, bits: int, signed: bool | None = None) -> QuantParams:
        """intq's quantization of the value at ``bits`` (``signed``: ``None`` lets the model
        choose): the model's own when it is exact at that width and signedness, else the
        symmetric range covering ``[lo, hi]``."""
        exact = self.exact
        if exact is not None and exact.bits == bits and signed in (None, exact.signed):
            return exact
        if signed is None:
            signed = self.lo < 0
        top = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        return QuantParams(bits, signed, (self.clip("minmax", bits, signed) / top,))


@dataclass(frozen=True)
class WeightScales:
    """The model's integers for one weight: ``bits`` wide (signed, narrow range, zero point 0
    once its zero point is subtracted), per channel along ``axis`` (``None``: one scale)."""

    bits: int
    scales: tuple[float, ...]
    axis: int | None

    def channel_scales(self, shape: tuple[int, ...], axis: int, bits: int) -> np.ndarray | None:
        """The per-channel scales that make intq's weight quantizer reproduce the model's
        integers for a weight of ``shape`` quantized along ``axis`` at ``bits``; ``None`` when
        they do not apply (a narrower width than the model's, or another channel axis)."""
        if bits < self.bits:
            return None
        channels = shape[axis]
        if self.axis is None or len(self.scales) == 1:
            return np.full(channels, self.scales[0])
        if self.axis % len(shape) != axis or len(self.scales) != channels:
            return None
        return np.asarray(self.scales, np.float64)


ModelEntry = ActivationRange | WeightScales


class ModelQuantization(ValueMap[ModelEntry]):
    """The quantization a pre-quantized model states, per float value of its graph: an
    :class:`ActivationRange` per quantized activation, :class:`WeightScales` per weight
    constant. Stored on the graph by the ONNX front end, read by the integer lowering."""

    def activation(self, value: Value) -> ActivationRange | None:
        """The model's range of activation ``value``, if it states one."""
        entry = self.get(value)
        return entry if isinstance(entry, ActivationRange) else None

    def weight(self, value: Value) -> WeightScales | None:
        """The model's weight integers of constant ``value``, if it states them."""
        entry = self.get(value)
        return entry if isinstance(entry, WeightScales) else None

    def copied_to(self, copy: Graph) -> ModelQuantization:
        """The same table on ``copy``, a :meth:`Graph.copy` of the graph it describes (whose
        values have the same names)."""
        entries = {}
        for value, entry in self.items():
            twin = copy.find(value.name)
            if twin is not None:
                entries[twin] = entry
        return ModelQuantization(entries)

    def surviving(self, graph: Graph) -> ModelQuantization:
        """The entries of values still in ``graph`` after passes rewrote it in place: a value
        a rewrite replaced (a weight folded with a BatchNorm) loses its entry, as the model's
        quantization no longer describes it."""
        return ModelQuantization({v: e for v, e in self.items() if graph.find(v.name) is v})


__all__ = ["ActivationRange", "ModelEntry", "ModelQuantization", "WeightScales"]
