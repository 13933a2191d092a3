"""Recognise how exporters write GELU and LayerNorm, and fuse them into one op each.

The integer lowering has one kernel per op (``QGelu``, ``QLayerNorm``), so the
float graph must say ``Gelu`` and ``LayerNormalization``, whatever the
exporter wrote. Rules (:data:`RULES`, applied in one sweep in graph order):

- ``gelu-erf``: ``x * 0.5 * (erf(x / sqrt2) + 1)``, the products in any order
  and bracketing, ``Div`` by sqrt2 or ``Mul`` by 1/sqrt2, becomes ``Gelu(x)``.
- ``gelu-tanh``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 Pow(x, 3))))``
  becomes ``Gelu(x, approximate="tanh")``.
- ``layernorm``: ``(x - mean(x)) / Sqrt(mean(square) + eps)``, the square
  ``Pow(x - mean, 2)`` or ``(x - mean) * (x - mean)``, both means over the last
  axis keeping it, becomes ``LayerNormalization(x, 1, 0)``; refused (in favour
  of ``layernorm-gamma``) when the quotient's one reader scales it per channel.
- ``layernorm-gamma``: that times a per-channel constant ``gamma`` becomes
  ``LayerNormalization(x, gamma, 0)``; refused (in favour of
  ``layernorm-gamma-beta``) when its one reader adds a per-channel constant.
- ``layernorm-gamma-beta``: that plus a per-channel constant ``beta`` becomes
  ``LayerNormalization(x, gamma, beta)``.
- ``safe-softmax``: ``Where(IsNaN(s), 0, s)`` of a ``Softmax`` output ``s`` becomes ``s``.
  torch's ONNX export of ``scaled_dot_product_attention`` writes it after the softmax of
  scores masked with ``-inf``, for rows masked entirely (0/0); the integer softmax never
  makes NaN, and calibration refuses a float model that does.
- ``finite-mask``: ``Where(keep, x, -inf)`` (x a constant) becomes ``Where(keep, x, m)``, ``m``
  float32's lowest finite value, as Hugging Face's own float masks: an additive attention
  mask that removes the same positions, and that calibration can check for overflow.

Per channel means C elements (C the last axis) broadcast along the other axes:
``[C]``, ``[1, C]``... The scalar factors of a product multiply (``x * 0.25 * 2``
is the 0.5); products other nodes also read stay for them. The operands of a
product include the factors of any product feeding it, so neither a GELU of a
product nor a cube written ``x * x * x`` is recognised. Constants are compared
with a relative tolerance of 1e-3 (exporters print 1.4142135 or 0.70710677).
The fused node is named after the root's label, as are LayerNorm's new gamma
and beta constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from intq.ir.graph import Graph, Node, Value
from intq.passes.manager import Pass
from intq.passes.rewrite import (
    AnyOf,
    Const,
    Match,
    Op,
    Rewrite,
    Rule,
    Tree,
    Var,
    apply_rules,
    expect_close,
    scalar,
)


def _plus_one_times_half_x(inner: Op) -> Tree:
    """``x * 0.5 * (inner + 1)``: the factors other than ``x`` and the sum are bound as "half"."""
    plus_one = Op("Add", inner, Const("one"), commutative=True)
    # The sum first: it binds x, so that Var("x") tries one operand, not each.
    return Tree("Mul", plus_one, Var("x"), rest="half", shared=True)


def _product(m: Match, rest: str, want: float, what: str) -> str | None:
    """The reason the scalar factors bound as ``rest`` do not multiply to ``want``."""
    product = 1.0
    for value in m[rest]:
        factor = scalar(value)
        if factor is None:
            return f"{what}: factor %{value.name} is not a one-element constant"
        product *= factor
    return expect_close(what, product, want)


GELU_ERF = _plus_one_times_half_x(
    Op(
        "Erf",
        AnyOf(
            Op("Div", Var("x"), Const("sqrt2")),
            Op("Mul", Var("x"), Const("rsqrt2"), commutative=True),
        ),
    )
)
"""``x * 0.5 * (erf(x / sqrt2) + 1)``."""

_CUBIC = Tree("Mul", Op("Pow", Var("x"), Const("three")), rest="k", shared=True)
GELU_TANH = _plus_one_times_half_x(
    Op(
        "Tanh",
        Tree("Mul", Op("Add", Var("x"), _CUBIC, commutative=True), rest="c", shared=True),
    )
)
"""``x * 0.5 * (tanh(c * (x + k * Pow(x, 3))) + 1)``."""


def _check_gelu(m: Match) -> str | None:
    return _product(m, "half", 0.5, "the product's constant") or expect_close(
        "the constant added to erf/tanh", scalar(m["one"]), 1.0
    )


def _check_gelu_erf(m: Match) -> str | None:
    if m["sqrt2"] is not None:
        scale = expect_close("the divisor of erf's x", scalar(m["sqrt2"]), math.sqrt(2))
    else:
        scale = expect_close("the factor of erf's x", scalar(m["rsqrt2"]), 1 / math.sqrt(2))
    return _check_gelu(m) or scale


def _check_gelu_tanh(m: Match) -> str | None:
    return (
        _check_gelu(m)
        or _product(m, "c", math.sqrt(2 / math.pi), "tanh's factor")
        or _product(m, "k", 0.044715, "the cube's factor")
        or expect_close("the exponent of the cube", scalar(m["three"]), 3.0)
    )


def _gelu(approximate: str) -> Rewrite:
    """The rewrite to ``Gelu(x, approximate)``, named after the root."""

    def rewrite(graph: Graph, m: Match) -> list[Value]:
        root = m.root
        attrs = {"approximate": approximate}
        return [graph.add("Gelu", [m["x"]], attrs, name=root.label(), before=root).output]

    return rewrite


_MEAN = Op("ReduceMean", Var("mean_of"), name="mean")
_CENTRED = Op("Sub", Var("x"), _MEAN, name="centred")
_SQUARE = AnyOf(
    Op("Pow", _CENTRED, Const("two"), name="square"),
    Op("Mul", _CENTRED, _CENTRED, name="square"),
)
_STD = Op(
    "Sqrt", Op("Add", Op("ReduceMean", _SQUARE, name="variance"), Const("eps"), commutative=True)
)
LAYERNORM = Op("Div", _CENTRED, _STD, name="normed")
"""``(x - mean(x)) / Sqrt(mean(square) + eps)``."""
LAYERNORM_GAMMA = Op("Mul", LAYERNORM, Const("gamma"), commutative=True, name="scaled")
"""``LAYERNORM * gamma``."""
LAYERNORM_GAMMA_BETA = Op("Add", LAYERNORM_GAMMA, Const("beta"), commutative=True)
"""``LAYERNORM * gamma + beta``."""


def _last_axis(mean: Node, what: str) -> str | None:
    """The reason ``mean`` is not a mean over the last axis that keeps it."""
    x = mean.inputs[0]
    assert x is not None  # the pattern bound it
    axes = tuple(mean.attrs.get("axes") or ())
    if axes not in ((x.type.rank - 1,), (-1,)):
        return f"the {what} is over axes {list(axes)}, not the last axis ({x.type.rank - 1})"
    if not mean.attrs.get("keepdims", 1):
        return f"the {what} does not keep the reduced axis"
    return None


def _check_core(m: Match) -> str | None:
    x, mean_of, eps = m["x"], m["mean_of"], m["eps"]
    if mean_of is not x:
        return f"the mean subtracted from %{x.name} is the mean of %{mean_of.name}"
    if m["two"] is not None:  # Pow(d, two); the other square is Mul(d, d)
        reason = expect_close("the exponent of the square", scalar(m["two"]), 2.0)
        if reason is not None:
            return reason
    if scalar(eps) is None:
        return f"eps %{eps.name} is not a one-element constant"
    return _last_axis(m["mean"], "mean") or _last_axis(m["variance"], "variance")


def _per_channel(const: Value, value: Value) -> bool:
    """Whether ``const`` holds one number per channel of ``value``'s last axis (C elements,
    broadcast along the other axes: a [C, 1] constant would scale rows, a [1, 1, 1, C] one
    add an axis)."""
    assert const.const is not None
    shape, size = const.const.shape, value.type.shape[-1]
    return (
        const.const.size == size and len(shape) <= value.type.rank and shape[-1:] in ((), (size,))
    )


def _check_channel(m: Match, name: str, value: Value) -> str | None:
    const = m[name]
    if _per_channel(const, value):
        return None
    return (
        f"{name} %{const.name} of shape {list(const.type.shape)} is not one number per channel"
        f" of the last axis ({value.type.shape[-1]})"
    )


def _absorbed(value: Value, op: str, rule: str) -> str | None:
    """Why a LayerNorm must not end at ``value``: its one reader is ``op`` with a per-channel
    constant, which the larger ``rule`` fuses when the sweep reaches it."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output or uses[0].node.op != op:
        return None
    reader = uses[0].node
    other = reader.inputs[1 - uses[0].index]
    if other is None or not other.is_const or not _per_channel(other, value):
        return None
    return f"{reader.label()} goes on with a per-channel {op}: {rule} fuses it there"


def _check_layernorm(m: Match) -> str | None:
    return _check_core(m) or _absorbed(m.root.output, "Mul", "layernorm-gamma")


def _check_layernorm_gamma(m: Match) -> str | None:
    return (
        _check_core(m)
        or _check_channel(m, "gamma", m["normed"].output)
        or _absorbed(m.root.output, "Add", "layernorm-gamma-beta")
    )


def _check_layernorm_gamma_beta(m: Match) -> str | None:
    return (
        _check_core(m)
        or _check_channel(m, "gamma", m["normed"].output)
        or _check_channel(m, "beta", m["scaled"].output)
    )


def _channels(m: Match, name: str, size: int, default: float) -> np.ndarray:
    """The per-channel constant bound as ``name`` as a float32 [C], or ``default`` everywhere."""
    value = m.values.get(name)
    data = np.full(size, default) if value is None else value.const
    return np.asarray(data, np.float32).reshape(size)


def _fuse_layernorm(graph: Graph, m: Match) -> list[Value]:
    x: Value = m["x"]
    size, label = x.type.shape[-1], m.root.label()
    gamma = graph.add_constant(_channels(m, "gamma", size, 1.0), f"{label}.gamma")
    beta = graph.add_constant(_channels(m, "beta", size, 0.0), f"{label}.beta")
    attrs = {"axis": x.type.rank - 1, "epsilon": scalar(m["eps"])}
    node = graph.add("LayerNormalization", [x, gamma, beta], attrs, name=label, before=m.root)
    return [node.output]


SAFE_SOFTMAX = Op("Where", Op("IsNaN", Var("s")), Const("zero"), Var("s"))


def _check_safe_softmax(m: Match) -> str | None:
    producer = m["s"].producer
    if producer is None or producer.op != "Softmax":
        return f"%{m['s'].name} is not a Softmax output"
    return expect_close("the replacement of NaN", scalar(m["zero"]), 0.0)


FINITE_MASK = Op("Where", Var("keep"), Const("x"), Const("drop"))


def _check_finite_mask(m: Match) -> str | None:
    drop = scalar(m["drop"])
    return None if drop == -math.inf else "the removed positions are not -inf"


def _finite_mask(graph: Graph, m: Match) -> list[Value]:
    lowest = np.asarray(np.finfo(np.float32).min, m["drop"].const.dtype)
    drop = graph.add_constant(lowest, f"{m.root.label()}.lowest")
    inputs = [m["keep"], m["x"], drop]
    return [graph.add("Where", inputs, name=m.root.label(), before=m.root).output]


RULES = (
    Rule("gelu-erf", GELU_ERF, _gelu("none"), _check_gelu_erf),
    Rule("gelu-tanh", GELU_TANH, _gelu("tanh"), _check_gelu_tanh),
    Rule("layernorm", LAYERNORM, _fuse_layernorm, _check_layernorm),
    Rule("layernorm-gamma", LAYERNORM_GAMMA, _fuse_layernorm, _check_layernorm_gamma),
    Rule(
        "layernorm-gamma-beta", LAYERNORM_GAMMA_BETA, _fuse_layernorm, _check_layernorm_gamma_beta
    ),
    Rule("safe-softmax", SAFE_SOFTMAX, lambda graph, m: [m["s"]], _check_safe_softmax),
    Rule("finite-mask", FINITE_MASK, _finite_mask, _check_finite_mask),
)
"""The rules of ``fuse-transformer``, in the order they are tried at a node."""


@dataclass(frozen=True)
class FuseTransformer(Pass):
    """Fuse decomposed GELU and LayerNorm into ``Gelu`` and ``LayerNormalization``, and drop
    the NaN guard exporters write after a softmax.

    Rules (:data:`RULES`): ``gelu-erf``, ``gelu-tanh``, ``layernorm``,
    ``layernorm-gamma``, ``layernorm-gamma-beta``, ``safe-softmax``, ``finite-mask``; the
    module docstring says what each matches.
    """

    name: ClassVar[str] = "fuse-transformer"

    def apply(self, graph: Graph) -> bool:
        # One sweep: the ops made are no rule's input, so another round could only find a
        # pattern that overlapped one fused in this round.
        return apply_rules(graph, RULES, max_rounds=1) > 0
