"""Integerization: lower a calibrated float graph to an integer-only graph (HAWQ-V3).

The lowering walks the float graph in order and builds a new graph in which
every value between the input ``Quantize`` and the output ``Dequantize`` is
an integer with its scale in its type. One rule per float op, in
:data:`intq.passes.integer_rules.LOWERINGS`; the lowering's state is in
:mod:`intq.passes.integer_lowering`.

- Conv, ConvTranspose, Gemm and MatMul (constant weights) become ``QConv``/
  ``QConvTranspose``/``QGemm``/``QMatMul``: weights per output channel, symmetric, narrow
  range; bias int32 at ``s_x * s_w[c]``; int32 accumulation.
- An accumulator stays *pending* until a consumer needs an activation: a
  following ReLU or ReLU6 then sets the clamp of the one ``Requantize``
  (``lo = 0``, unsigned output), so the activation costs nothing and the
  tensor is quantized once per fused conv+BN+activation.
- A residual ``Add`` (or a ``Sub``: ``Mb < 0``) of two activations, broadcasting, is pending
  too and becomes one ``QAdd`` ``(a*Ma + b*Mb + 2^(S-1)) >> S`` with the following ReLU's
  clamp.
- MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Slice, zero Pad
  work on the integers unchanged; Concat first requantizes its inputs to one
  scale; average pools and ReduceMean sum in int32 and put ``1/N`` in the dyadic
  multiplier (ReduceSum keeps the input's scale).
- A nearest Resize is one ``Gather`` per resized axis, of the constant input indices the
  float semantics computes: data movement, so the input's scale travels.
- A linear Resize is one ``QResize``: the float semantics' positions and its weights in
  ``(31 - bits) // axes`` fractional bits, an int32 accumulator pending like a conv's.
- An elementwise function (an op with ``Trait.ELEMENTWISE``: Sigmoid, Tanh, HardSwish...)
  of an 8-bit input becomes ``QLookup``, its exactly rounded 256-entry table, evaluated by
  the reference semantics at every input code.
- A ``Mul`` of two activations (SiLU, gates) is pending too and becomes one ``QMul``
  ``(a*b*M + 2^(S-1)) >> S`` (broadcasting) with the following ReLU's clamp.
- A PRelu (LeakyRelu) with a constant slope becomes one ``QPRelu``: the rescaling of its
  8- or 16-bit input, times the slope of the element's channel where it is negative.
- Masked mean pooling (an activation times a 0/1 mask cast from an integer input, summed,
  divided by the mask's clamped sum): ``QMask``, an int32 ``QReduceSum``, the raw count
  (``QReduceSum`` of the keep mask, ``max(count, 1)``) and a pending ``QDivCount``, the
  requantization whose multiplier the count looks up in a compile-time table.
- Min/Max with a scalar constant is a clamp (fused like a ReLU); of two activations (or a
  constant tensor) both operands are rescaled to the output's scale, then integer Min/Max.
- An AveragePool with padding zero-``Pad``s its input; where the divisor varies by position
  (``count_include_pad=0``, ceil_mode) the window sums go to a pending ``QDivCount`` whose
  count is a compile-time constant per position.
- An L2 norm ``Sqrt(ReduceSum(x * x))`` is one ``QReduceL2`` (a division-free square root),
  and a ``Div`` of two activations whose divisor is non-negative one ``QDiv`` (a
  division-free reciprocal).
- Arithmetic on raw integers (token ids: ``Equal``, ``Not``, ``Cast``, ``CumSum``, ``Add``,
  ``Sub``, ``Mul`` with integer constants, ``GatherElements`` of a constant) is the same op
  in the integer graph, exact (position ids).
- Graph outputs are dequantized once, straight from the int32 accumulator
  when they come from a Gemm (no 8-bit rounding of the logits). A trailing
  Softmax runs after that dequantization, outside the integer region.

Activation scales come from calibration statistics (``TensorStats``) of the
float tensors, or from a pre-quantized model's own scales (``ModelQuantization``: a QDQ
model's QuantizeLinear/DequantizeLinear pairs, its weights' per-channel scales); a tensor
is unsigned when its producer is provably non-negative (ReLU, ReLU6, Softmax) or the model
quantizes it to uint8 with zero point 0, and graph inputs are unsigned when every
calibration value was non-negative.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from intq.errors import IntqError, PassError
from intq.ir.graph import Graph, Value
from intq.ops import OPS, KernelSpec
from intq.passes.bias_correction import BIAS_CORRECTIONS, InputMeans
from intq.passes.calibration import CALIBRATION_METHODS, CalibrationStats, ClipChoices, ClipRule
from intq.passes.integer_lowering import Lowering, Stats
from intq.passes.integer_rules import LOWERINGS
from intq.passes.learned_rounding import ROUNDINGS, RoundedWeights
from intq.passes.manager import Pass, PassResult
from intq.passes.model_quantization import ModelQuantization
from intq.passes.precision import LayerBits


def kernel_specs() -> dict[str, KernelSpec]:
    """The integer kernels' variant specs, keyed as ``QuantConfig.kernels`` is."""
    return {opdef.kernel.key: opdef.kernel for opdef in OPS.values() if opdef.kernel}


@dataclass(frozen=True)
class Integerize(Pass):
    """Lower the calibrated float graph to an integer-only graph (a new graph).

    Reads the :class:`CalibrationStats` that ``calibrate`` stored on the graph, and the
    :class:`ModelQuantization` of a pre-quantized model, whose scales win for the values it
    quantizes (calibration, when given, fills the others). The options
    are :class:`intq.QuantConfig`'s: default widths, the clipping method (``auto`` takes each
    tensor's rule from the :class:`ClipChoices` that ``auto-clip`` stored, the MSE clip where
    there is none; the pass's own default stays ``minmax``, which needs no second look at
    the data), per-layer widths by
    original node name, the transformer's residual width and the kernel variants
    (``{"softmax": "shift"}``; the others keep their defaults), and ``bias_correction``: remove
    each weighted layer's mean output shift from weight rounding from its integer bias, with
    the :class:`~intq.passes.bias_correction.InputMeans` that ``calibrate`` stored
    (:mod:`intq.passes.bias_correction`; layers without means are left as they are).
    ``rounding`` (``nearest`` here, ``auto`` in ``QuantConfig``) says which layers take the
    integer weights ``learned-rounding`` chose (:class:`RoundedWeights`) instead of rounding
    to nearest (:meth:`learns`).
    ``narrow`` names nodes whose outputs keep their layer's activation width even where a
    transformer's values are widened to ``wide_bits`` (the LayerNorm copies that
    ``smooth-layernorm`` made for MatMuls to read at 8 bits).
    """

    name: ClassVar[str] = "integerize"
    weight_bits: int = 8
    activation_bits: int = 8
    calibration: str = "minmax"
    percentile: float = 99.99
    layer_bits: Mapping[str, LayerBits] = field(default_factory=dict)
    wide_bits: int = 16
    kernels: Mapping[str, str] = field(default_factory=dict)
    bias_correction: bool | str = False
    rounding: str = "nearest"
    narrow: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise IntqError(
                f"unknown bias correction {self.bias_correction!r}",
                hint='use true, false or "auto"',
            )
        if self.rounding not in ROUNDINGS:
            raise IntqError(
                f"unknown rounding {self.rounding!r}", hint=f"use one of {', '.join(ROUNDINGS)}"
            )
        if self.calibration not in CALIBRATION_METHODS:
            raise IntqError(
                f"unknown calibration method {self.calibration!r}",
                hint=f"use one of {', '.join(CALIBRATION_METHODS)}",
            )
        specs = kernel_specs()
        for key, variant in self.kernels.items():
            spec = specs.get(key)
            if spec is None:
                raise IntqError(
                    f"unknown kernel {key!r}", hint=f"the kernels are: {', '.join(sorted(specs))}"
                )
            if variant not in spec.variants:
                raise IntqError(
                    f"unknown {key} variant {variant!r}",
                    hint=f"use one of {', '.join(spec.variants)}",
                )

    def bits(self, node_name: str) -> LayerBits:
        """The bit widths of the layer named ``node_name``."""
        return self.layer_bits.get(node_name) or LayerBits(self.weight_bits, self.activation_bits)

    def learns(self, node_name: str) -> bool:
        """Whether the layer named ``node_name`` takes learned rounding: every layer for
        ``learned``, those with weights narrower than 8 bits for ``auto``."""
        if self.rounding == "auto":
            return self.bits(node_name).weights < 8
        return self.rounding == "learned"

    def corrects(self, node_name: str) -> bool:
        """Whether the layer named ``node_name`` has its bias corrected: every layer for
        ``True``, those with weights narrower than 8 bits for ``auto``."""
        if self.bias_correction == "auto":
            return self.bits(node_name).weights < 8
        return bool(self.bias_correction)

    def widened(self, node_name: str) -> bool:
        """Whether the output of the node named ``node_name``, a transformer value kept
        wide, takes ``wide_bits`` (every such value but those of :attr:`narrow`)."""
        return node_name not in self.narrow

    def variant(self, op: str) -> str:
        """The chosen variant of kernel op ``op`` (``QSoftmax``...)."""
        spec = OPS[op].kernel
        assert spec is not None
        return self.kernels.get(spec.key, spec.default)

    @property
    def divides(self) -> bool:
        """Whether a chosen kernel variant divides at run time."""
        return any(
            self.kernels.get(key, spec.default) in spec.dividing
            for key, spec in kernel_specs().items()
        )

    def requires(self, graph: Graph) -> None:
        if graph.analysis(CalibrationStats) is None and graph.analysis(ModelQuantization) is None:
            raise PassError(
                "integerize needs the graph's calibration statistics: run the calibrate pass"
                " first (intq.quantize runs both), or a pre-quantized model's quantization"
            )

    def run(self, graph: Graph) -> PassResult:
        stats = graph.analysis(CalibrationStats)
        model = graph.analysis(ModelQuantization)
        choices = graph.analysis(ClipChoices)
        means = graph.analysis(InputMeans) if self.bias_correction else None
        rounded = graph.analysis(RoundedWeights) if self.rounding != "nearest" else None
        lowering = Lowering(
            graph, stats if stats is not None else {}, self, model, choices, means, rounded
        )
        return PassResult(lowering.run(LOWERINGS), True)


def integerize(
    graph: Graph,
    stats: Mapping[Value, Stats],
    options: Integerize,
    choices: Mapping[Value, ClipRule] | None = None,
) -> Graph:
    """The integer-only graph computing ``graph`` with the calibrated ``stats`` (the lowering
    of :class:`Integerize`, for callers that hold statistics of their own; ``choices`` are
    ``auto``'s rules per tensor)."""
    return Lowering(graph, stats, options, None, choices).run(LOWERINGS)
