"""``intq.quantize``: calibrate a float graph and turn it into an integer-only graph.

    config = intq.QuantConfig(calibration="percentile", percentile=99.99)
    int_graph = intq.quantize(graph, calibration_batches, config)

The steps: clean the float graph (``fold-batchnorm,fold-pad,fold-constants,dce``),
collect calibration statistics over the batches, lower to integers
(:mod:`intq.passes.integerize`), prove that nothing overflows
(:mod:`intq.passes.range_analysis`), check that the result is integer-only
(:mod:`intq.passes.integer_only`) and verify the IR.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from intq.errors import IntqError
from intq.ir.graph import Graph
from intq.ir.verifier import verify
from intq.mixed_precision import MixedPrecision, plan_bits
from intq.passes import pipeline
from intq.passes.calibration import collect_stats
from intq.passes.integer_only import check_integer_only
from intq.passes.integerize import LayerBits, LoweringOptions, integerize
from intq.passes.range_analysis import analyze_ranges
from intq.semantics.kernels import GELU_VARIANTS, LAYERNORM_VARIANTS, SOFTMAX_VARIANTS, divides

CALIBRATION_METHODS = ("minmax", "percentile", "mse")
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
ACTIVATION_BITS = (4, 5, 6, 7, 8, 16)
PREPARE = "fold-batchnorm,fold-pad,fold-constants,fuse-transformer,dce"
"""The float clean-up pipeline run before calibration."""


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize.

    ``weight_bits`` and ``activation_bits`` apply to every layer unless
    ``layer_bits`` names the layer (its original node name) with its own
    :class:`LayerBits`. ``calibration`` picks the activation range:
    ``minmax``, ``percentile`` (of ``|x|``, with ``percentile``), or ``mse``
    (the clipping that minimises the expected squared error). ``mixed_precision`` (a
    :class:`intq.MixedPrecision`) chooses each layer's weight bits to meet a budget
    (:mod:`intq.mixed_precision`); layers named in ``layer_bits`` keep their widths.

    Transformers: ``softmax``, ``gelu`` and ``layernorm`` pick each integer kernel's
    variant (:mod:`intq.semantics.kernels`: ``divfree``, ``shift``, ``lut``, ``poly``; LayerNorm
    ``divfree`` or ``isqrt``); the defaults (softmax and LayerNorm ``divfree``, GELU
    ``poly``: I-BERT's erf polynomial, which never divides) measured the most accurate
    division-free combination on MiniLM (``benchmarks/minilm_variants.py``).

    ``wide_bits`` (16 by default) is the width of a transformer's residual stream and of
    the LayerNorm and GELU outputs the dense layers read: at 8 bits BERT's outlier
    channels swamp the rest (MiniLM's pooled cosine to FP32 drops from 0.996 to 0.97).
    The range analysis still proves every int32 accumulator.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    calibration: str = "minmax"
    percentile: float = 99.99
    layer_bits: Mapping[str, LayerBits] = field(default_factory=dict)
    progress: bool | None = None
    wide_bits: int = 16
    softmax: str = "divfree"
    gelu: str = "poly"
    layernorm: str = "divfree"
    mixed_precision: MixedPrecision | None = None

    def __post_init__(self) -> None:
        for what, value, allowed in (
            ("softmax", self.softmax, SOFTMAX_VARIANTS),
            ("gelu", self.gelu, GELU_VARIANTS),
            ("layernorm", self.layernorm, LAYERNORM_VARIANTS),
        ):
            if value not in allowed:
                raise IntqError(
                    f"unknown {what} variant {value!r}", hint=f"use one of {', '.join(allowed)}"
                )
        if self.wide_bits not in (8, 12, 16):
            raise IntqError(f"wide_bits must be 8, 12 or 16, got {self.wide_bits}")
        if self.calibration not in CALIBRATION_METHODS:
            raise IntqError(
                f"unknown calibration method {self.calibration!r}",
                hint=f"use one of {', '.join(CALIBRATION_METHODS)}",
            )
        if not 0 < self.percentile <= 100:
            raise IntqError(f"percentile must be in (0, 100], got {self.percentile}")
        default = LayerBits(self.weight_bits, self.activation_bits)
        for name, bits in [("default", default), *self.layer_bits.items()]:
            if bits.weights not in WEIGHT_BITS or bits.activations not in ACTIVATION_BITS:
                raise IntqError(
                    f"layer {name!r}: {bits.weights}-bit weights / {bits.activations}-bit"
                    " activations are not supported",
                    hint=f"weights take {WEIGHT_BITS}, activations {ACTIVATION_BITS} bits",
                )

    def lowering(self) -> LoweringOptions:
        """The options the integer lowering reads."""
        return LoweringOptions(
            self.weight_bits,
            self.activation_bits,
            self.calibration,
            self.percentile,
            dict(self.layer_bits),
            self.wide_bits,
            self.softmax,
            self.gelu,
            self.layernorm,
        )

    @property
    def divides(self) -> bool:
        """Whether a chosen kernel variant divides at run time."""
        return (
            divides("QSoftmax", self.softmax)
            or divides("QGelu", self.gelu)
            or divides("QLayerNorm", self.layernorm)
        )


def quantize(
    graph: Graph,
    calibration_data: Iterable[Mapping[str, np.ndarray]],
    config: QuantConfig | None = None,
) -> Graph:
    """An integer-only graph computing ``graph``, calibrated on ``calibration_data``.

    ``calibration_data`` is an iterable of input dicts (name -> array), read
    once (held in memory with ``mixed_precision``, which reads it again to measure
    sensitivity); ``graph`` is not modified.
    """
    config = config or QuantConfig()
    prepared = graph.copy()
    pipeline(PREPARE)(prepared)
    layers = {node.label() for node in prepared}
    unknown = sorted(set(config.layer_bits) - layers)
    if unknown:
        examples = ", ".join(sorted(n.label() for n in prepared if n.op in ("Conv", "Gemm"))[:3])
        raise IntqError(
            f"layer_bits names layers the model does not have: {unknown}",
            hint=f"use the original node names, as `intq inspect --ir` prints them: {examples}",
        )
    lowering = config.lowering()
    if config.mixed_precision is not None:
        calibration_data = list(calibration_data)
        plan = plan_bits(
            prepared,
            calibration_data,
            config.mixed_precision,
            activation_bits=config.activation_bits,
            fixed={name: bits.weights for name, bits in config.layer_bits.items()},
            progress=config.progress,
        )
        if config.mixed_precision.report is not None:
            plan.save_report(config.mixed_precision.report)
        chosen = plan.layer_bits(config.activation_bits)
        lowering = replace(lowering, layer_bits={**chosen, **config.layer_bits})
    stats = collect_stats(prepared, calibration_data, progress=config.progress)
    result = integerize(prepared, stats, lowering)
    analyze_ranges(result)
    check_integer_only(result, allow_division=config.divides)
    verify(result)
    return result
