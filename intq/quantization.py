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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain, islice
from typing import Any

from intq.data import model_batches
from intq.distillation import DistillConfig, distill_prepared
from intq.errors import IntqError
from intq.ir.graph import Graph
from intq.ir.verifier import verify
from intq.mixed_precision import MixedPrecision, plan_bits
from intq.passes import (
    PREPARE,
    DumpHook,
    PassManager,
    SmoothLayerNorm,
    lowering_pipeline,
    pipeline,
)
from intq.passes.calibration import (
    AUTO_FALLBACK,
    CALIBRATION_METHODS,
    CalibrationStats,
    ClipChoices,
    ClipRule,
)
from intq.passes.integerize import Integerize
from intq.passes.model_quantization import ModelQuantization
from intq.passes.precision import ACTIVATION_BITS, WEIGHT_BITS, WIDE_BITS, LayerBits
from intq.passes.smooth_layernorm import smoothed_copies

SMOOTH_MODES = ("off", "layernorm")
"""``QuantConfig.smooth``: ``layernorm`` migrates LayerNorm outputs' outlier channels into the
MatMuls reading them (:mod:`intq.passes.smooth_layernorm`) before calibration."""

SMOOTH_BATCHES = 32
"""Calibration batches the smoothing reads its channel ranges from (the first ones; all of
them go on to calibration), so that its memory stays bounded."""


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize.

    ``weight_bits`` and ``activation_bits`` apply to every layer unless
    ``layer_bits`` names the layer (its original node name) with its own
    :class:`LayerBits`. ``calibration`` picks the activation range: ``auto`` (the default)
    chooses per tensor among min/max, the 99.9/99.99/99.999 percentiles and the MSE clip by
    the error each causes in the layers reading the tensor, measured on a few calibration
    batches, and keeps these choices where the whole integer model follows FP32 more closely
    with them than with any single rule, on other calibration batches
    (:mod:`intq.passes.auto_clip`); or one rule for every tensor: ``minmax``,
    ``percentile`` (of ``|x|``, with ``percentile``), or ``mse`` (the clipping that
    minimises the tensor's own expected squared error). ``bias_correction`` removes from
    each Conv/Gemm/MatMul's integer bias the mean output shift its weights' rounding causes,
    from the layer's mean input over the calibration data
    (:mod:`intq.passes.bias_correction`; only integer biases change): ``auto`` (the default)
    for the layers narrower than 8 bits, ``True`` for every layer, ``False`` for none.
    ``rounding``: ``auto`` (the default) learns the integer weights of every layer narrower
    than 8 bits from the calibration data, each layer's weights chosen to reproduce its
    float outputs rather than rounded to nearest (:mod:`intq.passes.learned_rounding`);
    ``learned`` does it for 8-bit layers too, ``nearest`` for none; ``distill`` starts from
    the learned integers. ``mixed_precision`` (a :class:`intq.MixedPrecision`) chooses each
    layer's weight bits (and, with its ``activation_bits`` candidates, input activation
    bits) to meet a budget (:mod:`intq.mixed_precision`); layers named in ``layer_bits``
    keep their widths.

    Transformers: ``kernels`` picks integer kernels' variants by kernel name
    (:mod:`intq.semantics.kernels`): ``{"softmax": ..., "gelu": ..., "layernorm": ...}`` with
    ``divfree``, ``shift``, ``lut`` or ``poly`` (LayerNorm ``divfree`` or ``isqrt``); a kernel
    not named keeps its default (softmax and LayerNorm ``divfree``, GELU ``poly``: I-BERT's
    erf polynomial, which never divides), the most accurate division-free combination
    measured on MiniLM (``benchmarks/minilm_variants.py``).

    ``wide_bits`` (16 by default) is the width of a transformer's residual stream and of
    the LayerNorm and GELU outputs the dense layers read: at 8 bits BERT's outlier
    channels swamp the rest (MiniLM's pooled cosine to FP32 drops from 0.998 to 0.65).
    The range analysis still proves every int32 accumulator.

    ``smooth="layernorm"`` (off by default) migrates LayerNorm outputs' outlier channels into
    the MatMuls reading them before calibration (SmoothQuant with a per-channel shift,
    strength ``smooth_alpha``; :mod:`intq.passes.smooth_layernorm`): an exact float rewrite,
    calibrated on the first :data:`SMOOTH_BATCHES` batches, after which those MatMuls read
    their LayerNorm outputs at ``activation_bits`` (8) whatever ``wide_bits`` is, at little
    loss (MiniLM: 0.9975 against 0.9978, where 8-bit LayerNorm outputs without it give
    0.986). The residual stream keeps ``wide_bits``: it cannot be rescaled.

    ``distill`` (a :class:`intq.DistillConfig`) then trains the integer model on the FP32
    model's outputs over the calibration data (no labels): weights, biases and step sizes,
    by a straight-through estimator whose forward pass is the integer model itself, and
    lowers the result again (:mod:`intq.distillation`). With ``mixed_precision`` it distills
    the planned widths.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    calibration: str = "auto"
    percentile: float = 99.99
    layer_bits: Mapping[str, LayerBits] = field(default_factory=dict)
    progress: bool | None = None
    wide_bits: int = 16
    kernels: Mapping[str, str] = field(default_factory=dict)
    mixed_precision: MixedPrecision | None = None
    bias_correction: bool | str = "auto"
    distill: DistillConfig | None = None
    rounding: str = "auto"
    smooth: str = "off"
    smooth_alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.smooth not in SMOOTH_MODES:
            raise IntqError(
                f"unknown smooth mode {self.smooth!r}", hint=f"use one of {', '.join(SMOOTH_MODES)}"
            )
        if not 0 <= self.smooth_alpha <= 1:
            raise IntqError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.wide_bits not in WIDE_BITS:
            raise IntqError(
                f"wide_bits must be one of {', '.join(map(str, WIDE_BITS))}, got {self.wide_bits}"
            )
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
        self.lowering()  # checks the kernel names and variants

    def lowering(self) -> Integerize:
        """The integer lowering pass these settings configure."""
        return Integerize(
            self.weight_bits,
            self.activation_bits,
            self.calibration,
            self.percentile,
            dict(self.layer_bits),
            self.wide_bits,
            dict(self.kernels),
            self.bias_correction,
            self.rounding,
        )

    @property
    def divides(self) -> bool:
        """Whether a chosen kernel variant divides at run time."""
        return self.lowering().divides


def quantize(
    graph: Graph,
    calibration_data: Any = None,
    config: QuantConfig | None = None,
    *,
    verify_each: bool = False,
    dump: DumpHook | None = None,
) -> Graph:
    """An integer-only graph computing ``graph``, calibrated on ``calibration_data``.

    A graph imported from a pre-quantized model (a QDQ ONNX model) carries the model's own
    quantization (:class:`~intq.passes.model_quantization.ModelQuantization`): its
    activation scales and weight integers are used as they are, and ``calibration_data`` may
    be omitted; when given, it only fills the values the model did not quantize.

    ``calibration_data`` is in any form :func:`intq.convert` takes (input dicts, a numpy
    array for a single-input model, a dict of arrays, a torch ``DataLoader``, an ``.npz``
    path: :func:`intq.data.calibration_batches`), read once (held in memory with
    ``mixed_precision``, which reads it again to measure sensitivity); input dicts of the
    graph's exact input shapes are used as they are. ``graph`` is not modified. The steps
    run under one pass manager (:func:`lowering_pipeline`): ``verify_each`` verifies the IR
    after each and ``dump`` is called after each, as for :func:`intq.passes.pipeline`.
    """
    config = config or QuantConfig()
    # A hand-written or edited graph may declare types its nodes do not compute (an Expand
    # to 2^40 elements typed i8[1,2]): the checks below and the calibration trust them.
    verify(graph)
    model = graph.analysis(ModelQuantization)
    if calibration_data is None and model is None:
        raise IntqError(
            "no calibration data: a float model needs samples of its inputs to choose its"
            " activation ranges",
            hint="pass calibration data (a list of input dicts, an array, a DataLoader or an"
            " .npz path); only a pre-quantized (QDQ) model brings its own ranges",
        )
    if calibration_data is not None:
        calibration_data = model_batches(calibration_data, graph.inputs)
    prepared = graph.copy()
    carried = model.copied_to(prepared) if model is not None else None
    pipeline(PREPARE, verify_each=verify_each, dump=dump)(prepared)
    if config.smooth != "off" and calibration_data is not None:
        if isinstance(calibration_data, Sequence):
            head = list(calibration_data[:SMOOTH_BATCHES])
        else:  # read once: the batches read here go on to calibration
            rest = iter(calibration_data)
            head = list(islice(rest, SMOOTH_BATCHES))
            calibration_data = chain(head, rest)
        smooth = SmoothLayerNorm(head, alpha=config.smooth_alpha)
        PassManager([smooth], verify_each=verify_each, dump=dump)(prepared)
    narrow = smoothed_copies(prepared)
    layers = {node.label() for node in prepared}
    unknown = sorted(set(config.layer_bits) - layers)
    if unknown:
        examples = ", ".join(
            sorted(n.label() for n in prepared if n.opdef.weight_axis is not None)[:3]
        )
        raise IntqError(
            f"layer_bits names layers the model does not have: {unknown}",
            hint=f"use the original node names, as `intq inspect --ir` prints them: {examples}",
        )
    lowering = replace(config.lowering(), narrow=narrow)
    if config.mixed_precision is not None:
        if calibration_data is None:
            raise IntqError(
                "mixed precision measures each layer's sensitivity on calibration data,"
                " and none was given",
                hint="pass calibration data, or drop mixed_precision",
            )
        calibration_data = list(calibration_data)
        plan = plan_bits(
            prepared,
            calibration_data,
            config.mixed_precision,
            activation_bits=config.activation_bits,
            fixed={name: bits.weights for name, bits in config.layer_bits.items()},
            progress=config.progress,
            clip=AUTO_FALLBACK
            if config.calibration == "auto"
            else ClipRule(config.calibration, config.percentile),
            fixed_activations={n: b.activations for n, b in config.layer_bits.items()},
        )
        if config.mixed_precision.report is not None:
            plan.save_report(config.mixed_precision.report)
        chosen = plan.layer_bits(config.activation_bits, config.weight_bits)
        lowering = replace(lowering, layer_bits={**chosen, **config.layer_bits})
    if carried is not None:
        # The clean-up rewrote the graph in place: values it kept keep their entries.
        prepared.store_analysis(carried.surviving(prepared))
    if config.distill is not None:
        if calibration_data is None or carried is not None:
            raise IntqError(
                "distillation trains on the float model's outputs over calibration data, and"
                + (
                    " none was given"
                    if calibration_data is None
                    else " this model is pre-quantized"
                ),
                hint="pass unlabelled samples of a float model as calibration data, or drop"
                " distill",
            )
        calibration_data = list(calibration_data)
    manager = lowering_pipeline(
        calibration_data, lowering, progress=config.progress, verify_each=verify_each, dump=dump
    )
    int_graph = manager(prepared).graph
    if config.distill is None:
        return int_graph
    stats = prepared.analysis(CalibrationStats)
    assert stats is not None and calibration_data is not None
    return distill_prepared(
        prepared,
        calibration_data,
        lowering,
        config.distill,
        stats=stats,
        choices=prepared.analysis(ClipChoices),
        start=int_graph,
    )
