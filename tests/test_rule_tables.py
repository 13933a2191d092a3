"""Every rule table covers every op that needs an entry in it.

An op states its facts once, on its definition (``intq/ops``: traits, weight axis, kernel
variants); each concern keeps one table keyed by op name. An op added without an entry in
one of these tables fails exactly the test below that names the table, with the op as its
parameter:

======================================  =====================================================
table                                   ops that need an entry
======================================  =====================================================
numpy semantics (the oracle)            every op
torch semantics (autograd)              every float op but the ``FOLDED`` ones
range rules (the overflow proof)        every ``INTEGER`` op
ONNX Runtime and TVM lowerings          every op an integer graph holds: ``INTEGER``,
                                        ``BOUNDARY`` and ``TAIL`` ops
======================================  =====================================================

The ``INTEGER`` trait itself is checked against the type rules: an op whose rule carries a
quantized input's scale through to its output must say so. The frontends' converter tables
are checked against the op lists the README publishes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import intq
from intq.backends.onnx_lowering import LOWER as ONNXRUNTIME_LOWERING
from intq.backends.tvm_lowering import LOWER as TVM_LOWERING
from intq.frontends.onnx_ops import supported_ops
from intq.ops import OPS, Trait, integer_ops, ops_with
from intq.ops.schema import REQUIRED, OpDef
from intq.passes.range_analysis import RULES
from intq.semantics.numpy_eval import EVAL
from intq.semantics.torch_eval import TORCH

README = Path(__file__).resolve().parent.parent / "README.md"

FLOAT_OPS = {name: opdef for name, opdef in OPS.items() if name not in integer_ops.OPS}
"""The float (ONNX-like) op families."""

IN_INTEGER_GRAPHS = sorted(
    {*ops_with(Trait.INTEGER), *ops_with(Trait.BOUNDARY), *ops_with(Trait.TAIL)}
)
"""The ops an integer-only graph may hold: what every backend must lower."""


def _missing(table: str, op: str, why: str) -> str:
    return f"op {op} has no entry in {table} ({why}): add one, or fix the op's traits"


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_has_numpy_semantics(op):
    assert op in EVAL, _missing(
        "intq.semantics.numpy_eval.EVAL", op, "the reference interpreter is the oracle"
    )


@pytest.mark.parametrize(
    "op", sorted(name for name, d in FLOAT_OPS.items() if not d.has(Trait.FOLDED))
)
def test_every_float_op_has_torch_semantics(op):
    assert op in TORCH, _missing(
        "intq.semantics.torch_eval.TORCH", op, "the sensitivity differentiates float graphs"
    )


@pytest.mark.parametrize("op", ops_with(Trait.INTEGER))
def test_every_integer_op_has_a_range_rule(op):
    assert op in RULES, _missing(
        "intq.passes.range_analysis.RULES", op, "the overflow proof refuses ops it cannot bound"
    )


@pytest.mark.parametrize("op", IN_INTEGER_GRAPHS)
def test_every_integer_graph_op_has_an_onnxruntime_lowering(op):
    assert op in ONNXRUNTIME_LOWERING, _missing(
        "the ONNX Runtime lowering", op, "integer graphs hold it"
    )


@pytest.mark.parametrize("op", IN_INTEGER_GRAPHS)
def test_every_integer_graph_op_has_a_tvm_lowering(op):
    assert op in TVM_LOWERING, _missing("the TVM lowering", op, "integer graphs hold it")


def test_the_tables_hold_no_unknown_op():
    for name, table in [
        ("numpy semantics", EVAL),
        ("torch semantics", TORCH),
        ("range rules", RULES),
        ("ONNX Runtime lowering", ONNXRUNTIME_LOWERING),
        ("TVM lowering", TVM_LOWERING),
    ]:
        assert set(table) <= set(OPS), f"{name} has rules for ops that do not exist"


# ----- the traits hold what the type rules say ---------------------------------------------

_SAMPLE_ATTRS = {
    "kernel_shape": (2, 2),
    "shape": (2, 16),
    "perm": (0, 1, 3, 2),
    "axes": (0,),
    "starts": (0,),
    "ends": (1,),
    "pads": (0,) * 8,
    "axis": 1,
    "to": "i8",
}
"""Values for required attributes, so that most ops' type rules can be probed."""


def _carries_quantization(opdef: OpDef) -> bool:
    """True when the op, given quantized int8 inputs, gives a quantized result."""
    graph = intq.ir.Graph()
    quant = intq.ir.QuantParams(8, True, (0.5,))
    x = graph.add_input("x", intq.ir.TensorType(intq.ir.DType.I8, (1, 2, 4, 4), quant))
    indices = graph.add_input("i", intq.ir.TensorType(intq.ir.DType.I64, (2,)))
    required = [k for k, a in opdef.attrs.items() if a.default is REQUIRED]
    attrs = {k: _SAMPLE_ATTRS[k] for k in required if k in _SAMPLE_ATTRS}
    probes = [
        ([x] * max(opdef.min_inputs, 1), attrs),
        ([x] * max(opdef.min_inputs, 1), {**attrs, "shape": (1, 2, 4, 4)}),
        ([x, indices], {k: v for k, v in attrs.items() if k != "shape"}),
    ]
    for inputs, sample in probes:
        try:
            full = opdef.complete_attrs(sample, inputs=inputs)
            types = opdef.infer_types(inputs, full)
        except intq.IntqError:
            continue  # the probe does not fit this op's inputs
        if any(t.quant is not None for t in types):
            return True
    return False


def test_the_probe_finds_the_known_integer_ops():
    found = {name for name, opdef in FLOAT_OPS.items() if _carries_quantization(opdef)}
    known = {"MaxPool", "Concat", "Pad", "Clip", "Relu", "Gather", "Reshape", "Transpose"}
    assert known <= found


@pytest.mark.parametrize("op", sorted(OPS))
def test_an_op_carrying_quantization_has_the_integer_trait(op):
    opdef = OPS[op]
    if opdef.has(Trait.BOUNDARY) or not _carries_quantization(opdef):
        return
    assert opdef.has(Trait.INTEGER), (
        f"{op}'s type rule gives quantized integers but the op lacks Trait.INTEGER: the range"
        " analysis and the backends would not know they must handle it"
    )


def test_trait_entries_are_consistent():
    for name, opdef in OPS.items():
        assert opdef.has(Trait.KERNEL) == (opdef.kernel is not None), name
        if opdef.kernel is not None:
            assert opdef.kernel.default in opdef.kernel.variants, name
            assert set(opdef.kernel.dividing) <= set(opdef.kernel.variants), name
        if opdef.has(Trait.MOVEMENT):
            assert opdef.has(Trait.PASS_THROUGH) and opdef.has(Trait.INTEGER), name
        if opdef.has(Trait.ACCUMULATOR) or opdef.has(Trait.KERNEL):
            assert opdef.has(Trait.INTEGER), name


# ----- the frontends against the README --------------------------------------------------


def _readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_the_readme_lists_exactly_the_onnx_converters():
    section = _readme_section("Supported ONNX ops")
    listed = re.findall(r"([A-Z][A-Za-z0-9]*) \((\d+-\d+)\)", section)
    assert [f"{op} ({opsets})" for op, opsets in listed] == supported_ops(), (
        "README.md's 'Supported ONNX ops' list differs from intq.frontends.onnx_ops.CONVERTERS"
    )


def test_the_readme_lists_exactly_the_aten_converters():
    from intq.frontends.torch_import import supported_aten_ops  # imports torch

    section = _readme_section("Supported PyTorch ops")
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    listed = [name.strip() for name in block.replace("\n", " ").split(",") if name.strip()]
    assert listed == [op.removeprefix("aten.") for op in supported_aten_ops()], (
        "README.md's 'Supported PyTorch ops' list differs from the ATen converter table"
    )
