"""Passes: Before/Expected text, numerical equivalence, the manager and pipeline strings."""

from __future__ import annotations

import itertools
import textwrap
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

import intq
from intq.ir import DType, Graph, TensorType, Value, from_text, to_text, verify
from intq.passes import (
    PASSES,
    ConstantFolding,
    DeadCodeElimination,
    FoldBatchNorm,
    FuseTransformer,
    Pass,
    PassManager,
    parse_pipeline,
    pipeline,
)
from intq.passes.fuse_transformer import RULES as FUSE_RULES
from intq.passes.rewrite import apply_rules


def check_pass(pass_: Pass, before: str, expected: str, *, modified: bool = True) -> None:
    """Run ``pass_`` on the ``before`` text and compare with ``expected`` text."""
    graph = from_text(textwrap.dedent(before))
    verify(graph)
    result = pass_(graph)
    verify(result.graph)
    assert to_text(result.graph) == textwrap.dedent(expected).lstrip("\n")
    assert result.modified is modified


def test_dce_removes_dead_chains_and_constants():
    check_pass(
        DeadCodeElimination(),
        """
        graph main(%x: f32[2], %unused: f32[2]) {
          %c = const f32[2] [1.0, 2.0]
          %dead1 = Add(%x, %c) : f32[2]
          %dead2 = Relu(%dead1) : f32[2]
          %y = Neg(%x) : f32[2] @"neg"
          return %y
        }
        """,
        """
        graph main(%x: f32[2], %unused: f32[2]) {
          %y = Neg(%x) : f32[2] @"neg"
          return %y
        }
        """,
    )


def test_dce_reports_no_change():
    text = """
        graph main(%x: f32[2]) {
          %y = Neg(%x) : f32[2]
          return %y
        }
        """
    check_pass(DeadCodeElimination(), text, text, modified=False)


def test_constant_folding_folds_shape_chains():
    check_pass(
        PassManager([ConstantFolding(), DeadCodeElimination()]),
        """
        graph main(%x: f32[2,3]) {
          %i = const i64[1] [1]
          %shape = Shape(%x) {end=2, start=0} : i64[2]
          %dim = Gather(%shape, %i) {axis=0} : i64[1]
          %twice = Add(%dim, %dim) : i64[1]
          %y = Relu(%x) : f32[2,3]
          return %y, %twice
        }
        """,
        """
        graph main(%x: f32[2,3]) {
          %twice = const i64[1] [6]
          %y = Relu(%x) : f32[2,3]
          return %y, %twice
        }
        """,
    )


def test_constant_folding_respects_max_bytes():
    text = """
        graph main(%x: f32[2]) {
          %c = const f32[1] [1.0]
          %big = Expand(%c) {shape=[64]} : f32[64]
          return %big
        }
        """
    check_pass(ConstantFolding(max_bytes=16), text, text, modified=False)


def bn_params(g: Graph, rng: np.random.Generator, channels: int) -> list[Value]:
    """Constants for BatchNormalization's scale, bias, mean and variance."""
    params = [
        rng.uniform(0.5, 2, channels),
        rng.normal(size=channels),
        rng.normal(size=channels),
        rng.uniform(0.1, 3, channels),
    ]
    return [g.add_constant(p.astype(np.float32), n) for p, n in zip(params, "sbmv")]


def conv_bn_graph(rng: np.random.Generator, bias: bool) -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (2, 3, 6, 6)))
    w = g.add_constant(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    inputs = [x, w] + ([g.add_constant(rng.normal(size=4).astype(np.float32), "b")] if bias else [])
    conv = g.op("Conv", *inputs, name="conv", pads=(1, 1, 1, 1))
    consts = bn_params(g, rng, 4)
    bn = g.op("BatchNormalization", conv, *consts, name="bn", epsilon=1e-3)
    g.set_outputs([g.op("Relu", bn, name="relu")])
    return g


@pytest.mark.parametrize("bias", [True, False])
def test_fold_batchnorm_into_conv_is_equivalent(bias):
    rng = np.random.default_rng(1)
    graph = conv_bn_graph(rng, bias)
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    before = intq.compile(graph.copy()).run({"x": x})["relu"]
    result = pipeline("fold-batchnorm,dce", verify_each=True)(graph)
    assert result.modified
    assert [n.op for n in graph] == ["Conv", "Relu"]
    assert graph.nodes[0].name == "conv"
    after = intq.compile(graph).run({"x": x})["relu"]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_fold_batchnorm_into_gemm_is_equivalent(trans_b):
    rng = np.random.default_rng(2)
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (3, 5)))
    w = rng.normal(size=(5, 4)).astype(np.float32)
    wv = g.add_constant(w.T.copy() if trans_b else w, "w")
    c = g.add_constant(rng.normal(size=4).astype(np.float32), "c")
    y = g.op("Gemm", x, wv, c, name="fc", transB=trans_b, alpha=0.5, beta=2.0)
    consts = bn_params(g, rng, 4)
    g.set_outputs([g.op("BatchNormalization", y, *consts, name="bn")])
    feed = {"x": rng.normal(size=(3, 5)).astype(np.float32)}
    before = intq.compile(g.copy()).run(feed)["bn"]
    assert pipeline("fold-batchnorm,dce")(g).modified
    assert [n.op for n in g] == ["Gemm"] and [v.name for v in g.outputs] == ["bn"]
    np.testing.assert_allclose(intq.compile(g).run(feed)["bn"], before, rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_leaves_shared_conv_outputs_alone():
    """The Conv keeps its weights (another reader sees its output); the BN becomes a
    depthwise Conv of its own."""
    rng = np.random.default_rng(3)
    graph = conv_bn_graph(rng, True)
    conv_out = graph["conv"]
    graph.set_outputs([*graph.outputs, conv_out])
    weights = graph.nodes[0].inputs[1]
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    before = intq.compile(graph.copy()).run({"x": x})
    assert pipeline("fold-batchnorm,dce", verify_each=True)(graph).modified
    assert [n.op for n in graph] == ["Conv", "Conv", "Relu"]
    assert graph.nodes[0].inputs[1] is weights and graph.nodes[1].attrs["group"] == 4
    after = intq.compile(graph).run({"x": x})
    for name, value in before.items():
        np.testing.assert_allclose(after[name], value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "ops"),
    [
        ((3, 4), ["Reshape", "Conv", "Reshape", "Relu"]),
        ((2, 4, 7), ["Reshape", "Conv", "Reshape", "Relu"]),
        ((2, 4, 5, 5), ["Conv", "Relu"]),
        ((1, 4, 2, 3, 3), ["Reshape", "Conv", "Reshape", "Relu"]),
    ],
)
def test_standalone_batchnorm_becomes_a_depthwise_conv(shape, ops):
    """DenseNet's BN -> ReLU, a BatchNorm1d on [N, C]: no producer to fold into."""
    rng = np.random.default_rng(4)
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, shape))
    bn = g.op("BatchNormalization", x, *bn_params(g, rng, 4), name="bn", epsilon=1e-3)
    g.set_outputs([g.op("Relu", bn, name="relu")])
    feed = {"x": rng.normal(size=shape).astype(np.float32)}
    before = intq.compile(g.copy()).run(feed)["relu"]
    assert pipeline("fold-batchnorm,dce", verify_each=True)(g).modified
    assert [n.op for n in g] == ops
    conv = next(n for n in g if n.op == "Conv")
    assert conv.attrs["group"] == 4 and conv.inputs[1].type.shape[:2] == (4, 1)
    np.testing.assert_allclose(intq.compile(g).run(feed)["relu"], before, rtol=1e-5, atol=1e-5)


def test_standalone_batchnorm_on_n_c_is_reshaped_to_rank_4():
    check_pass(
        FoldBatchNorm(),
        """
        graph main(%x: f32[3,2]) {
          %s = const f32[2] [2.0, 0.5]
          %b = const f32[2] [1.0, -1.0]
          %m = const f32[2] [0.0, 1.0]
          %v = const f32[2] [1.0, 4.0]
          %bn = BatchNormalization(%x, %s, %b, %m, %v) {epsilon=0.0} : f32[3,2] @"bn"
          return %bn
        }
        """,
        """
        graph main(%x: f32[3,2]) {
          %s = const f32[2] [2.0, 0.5]
          %b = const f32[2] [1.0, -1.0]
          %m = const f32[2] [0.0, 1.0]
          %v = const f32[2] [1.0, 4.0]
          %bn.scale = const f32[2,1,1,1] [2.0, 0.25]
          %bn.shift = const f32[2] [1.0, -1.25]
          %bn.0 = Reshape(%x) {shape=[3, 2, 1, 1]} : f32[3,2,1,1] @"bn"
          %bn.1 = Conv(%bn.0, %bn.scale, %bn.shift) {dilations=[1, 1], group=2, pads=[0, 0, 0, 0], strides=[1, 1]} : f32[3,2,1,1] @"bn"
          %bn = Reshape(%bn.1) {shape=[3, 2]} : f32[3,2] @"bn"
          return %bn
        }
        """,  # noqa: E501
    )


@pytest.mark.parametrize("group", [1, 2])
def test_fold_batchnorm_into_conv_transpose_is_equivalent(group):
    rng = np.random.default_rng(5)
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (2, 4, 5, 5)))
    w = g.add_constant(rng.normal(size=(4, 6 // group, 3, 3)).astype(np.float32), "w")
    y = g.op("ConvTranspose", x, w, name="up", strides=(2, 2), group=group)
    bn = g.op("BatchNormalization", y, *bn_params(g, rng, 6), name="bn")
    g.set_outputs([bn])
    feed = {"x": rng.normal(size=(2, 4, 5, 5)).astype(np.float32)}
    before = intq.compile(g.copy()).run(feed)["bn"]
    assert pipeline("fold-batchnorm,dce", verify_each=True)(g).modified
    assert [n.op for n in g] == ["ConvTranspose"]
    np.testing.assert_allclose(intq.compile(g).run(feed)["bn"], before, rtol=1e-4, atol=1e-4)


def test_pipeline_strings_parse_and_print():
    passes = parse_pipeline(" fold-batchnorm , fold-constants{max_bytes=1024},dce", PASSES)
    assert passes == [FoldBatchNorm(), ConstantFolding(max_bytes=1024), DeadCodeElimination()]
    assert ",".join(map(str, passes)) == "fold-batchnorm,fold-constants{max_bytes=1024},dce"
    with pytest.raises(intq.PassError, match="unknown pass 'nope'.*dce"):
        parse_pipeline("dce,nope", PASSES)
    with pytest.raises(intq.PassError, match="no option 'bits'"):
        parse_pipeline("dce{bits=4}", PASSES)
    with pytest.raises(intq.PassError, match="max_bytes='lots'"):
        parse_pipeline("fold-constants{max_bytes=lots}", PASSES)


@dataclass(frozen=True)
class BreakTypes(Pass):
    """A buggy pass: changes a value's type behind the op's back."""

    name: ClassVar[str] = "break-types"

    def apply(self, graph: Graph) -> bool:
        value = graph.nodes[0].output
        value.type = TensorType(DType.F32, (7,))
        return True


@dataclass(frozen=True)
class Crash(Pass):
    """A pass with an internal bug."""

    name: ClassVar[str] = "crash"

    def apply(self, graph: Graph) -> bool:
        raise KeyError("oops")


def small_graph() -> Graph:
    return from_text("graph main(%x: f32[2]) {\n  %y = Neg(%x) : f32[2]\n  return %y\n}")


def test_verify_each_names_the_pass_that_broke_the_ir():
    manager = PassManager([DeadCodeElimination(), BreakTypes()], verify_each=True)
    with pytest.raises(intq.VerificationError, match="after pass break-types.*passes run: dce"):
        manager(small_graph())


def test_internal_errors_name_the_pass_and_those_before():
    with pytest.raises(intq.PassError, match="pass crash failed with KeyError.*after: dce"):
        PassManager([DeadCodeElimination(), Crash()])(small_graph())


def test_dump_hook_sees_every_pass():
    seen = []
    manager = pipeline("dce,fold-constants", dump=lambda p, g, r: seen.append((str(p), r.modified)))
    manager(small_graph())
    assert seen == [("dce", False), ("fold-constants", False)]


# ----- fuse-transformer: Before/Expected text for each exporter form, and near-misses ---------


def check_fusion(before: str, expected: str | None) -> None:
    """Run ``fuse-transformer`` on ``before`` and compare with ``expected`` (``None``: unchanged),
    then check on the reference interpreter that the graph computes what it did.

    Both texts go through the parser and the printer, so their lines may be wrapped or indented.
    """
    graph = from_text(before)
    verify(graph)
    want = to_text(graph) if expected is None else to_text(from_text(expected))
    feeds = {
        v.name: np.random.default_rng(0).normal(size=v.type.shape).astype(np.float32)
        for v in graph.inputs
    }
    outputs = intq.compile(graph.copy(), "reference").run(feeds)
    result = FuseTransformer()(graph)
    verify(result.graph)
    assert to_text(result.graph) == want, before
    assert result.modified is (expected is not None)
    fused = intq.compile(graph, "reference").run(feeds)
    for name, array in outputs.items():
        np.testing.assert_allclose(fused[name], array, rtol=1e-3, atol=1e-3, err_msg=name)


GELU_CONSTS = """
  %sqrt2 = const f32[] [1.4142135]
  %rsqrt2 = const f32[] [0.70710677]
  %half = const f32[] [0.5]
  %one = const f32[] [1.0]
  %three = const f32[] [3.0]
  %k = const f32[] [0.044715]
  %c = const f32[] [0.7978845608]
"""


def gelu_graph(body: str, consts: str = "", returns: str = "%z") -> str:
    """``x: f32[2,4]``, the GELU constants and ``consts``, ``body`` computing ``%y``, then
    ``%z = Neg(%y)``; returns ``returns``."""
    return (
        f"graph main(%x: f32[2,4]) {{{GELU_CONSTS}{consts}\n{body}\n"
        f"%z = Neg(%y) : f32[2,4]\nreturn {returns}\n}}\n"
    )


def gelu_fused(approximate: str = "none", consts: str = "", returns: str = "%z") -> str:
    """What :func:`gelu_graph` becomes: ``%y = Gelu(%x)`` named after the root Mul."""
    body = f'%y = Gelu(%x) {{approximate="{approximate}"}} : f32[2,4] @"root"'
    return gelu_graph(body, consts, returns)


def products(x: str, half: str, other: str) -> list[str]:
    """Each way to write ``%y = x * half * other`` as two ``Mul`` (the outer one named "root"):
    each pair first, each operand order."""
    forms = []
    for a, b, c in ((x, half, other), (x, other, half), (half, other, x)):
        for first in (f"{a}, {b}", f"{b}, {a}"):
            for second in (f"%p, {c}", f"{c}, %p"):
                forms.append(f'%p = Mul({first}) : f32[2,4]\n%y = Mul({second}) : f32[2,4] @"root"')
    return forms


def test_gelu_erf_is_fused_in_every_operand_order():
    scales = ("Div(%x, %sqrt2)", "Mul(%x, %rsqrt2)", "Mul(%rsqrt2, %x)")
    pluses = ("Add(%e, %one)", "Add(%one, %e)")
    for scale, plus, product in itertools.product(scales, pluses, products("%x", "%half", "%a")):
        body = f"%s = {scale} : f32[2,4]\n%e = Erf(%s) : f32[2,4]\n%a = {plus} : f32[2,4]\n"
        check_fusion(gelu_graph(body + product), gelu_fused())


TANH_ARG = """
%cube = Pow(%x, %three) : f32[2,4]
%kc = Mul(%k, %cube) : f32[2,4]
%inner = Add(%x, %kc) : f32[2,4]
%arg = Mul(%c, %inner) : f32[2,4]
%t = Tanh(%arg) : f32[2,4]
%a = Add(%t, %one) : f32[2,4]
"""


def test_gelu_tanh_is_fused_in_every_operand_order():
    swaps = [
        ("Mul(%k, %cube)", "Mul(%cube, %k)"),
        ("Add(%x, %kc)", "Add(%kc, %x)"),
        ("Mul(%c, %inner)", "Mul(%inner, %c)"),
        ("Add(%t, %one)", "Add(%one, %t)"),
    ]
    for flips in itertools.product((False, True), repeat=len(swaps)):
        arg = TANH_ARG
        for (plain, swapped), flip in zip(swaps, flips):
            arg = arg.replace(plain, swapped) if flip else arg
        for product in products("%x", "%half", "%a"):
            check_fusion(gelu_graph(arg + product), gelu_fused("tanh"))


GELU_ERF = """
%s = Div(%x, %sqrt2) : f32[2,4]
%e = Erf(%s) : f32[2,4]
%a = Add(%e, %one) : f32[2,4]
%p = Mul(%x, %half) : f32[2,4]
%y = Mul(%p, %a) : f32[2,4] @"root"
"""


def test_gelu_constants_match_within_a_relative_1e3_and_may_be_split():
    short = "%s2 = const f32[] [1.414]"  # how some exporters print sqrt(2)
    check_fusion(gelu_graph(GELU_ERF.replace("%sqrt2", "%s2"), short), gelu_fused(consts=short))
    # x * 0.25 * 2 * (1 + erf(...)): the scalar factors multiply to the 0.5.
    split = "%quarter = const f32[] [0.25]\n%two = const f32[] [2.0]"
    body = GELU_ERF.replace(
        "%p = Mul(%x, %half)", "%q = Mul(%x, %quarter) : f32[2,4]\n%p = Mul(%q, %two)"
    )
    check_fusion(gelu_graph(body, split), gelu_fused(consts=split))


def test_gelu_keeps_a_product_other_nodes_read():
    # x * 0.5 is also read by %w: the GELU is fused, the product stays for %w.
    body = GELU_ERF + "%w = Neg(%p) : f32[2,4]"
    fused = '%p = Mul(%x, %half) : f32[2,4]\n%y = Gelu(%x) {approximate="none"} : f32[2,4] @"root"'
    check_fusion(
        gelu_graph(body, returns="%z, %w"),
        gelu_graph(fused + "\n%w = Neg(%p) : f32[2,4]", returns="%z, %w"),
    )


def test_gelu_root_returned_by_the_graph_keeps_its_name():
    check_fusion(gelu_graph(GELU_ERF, returns="%y, %z"), gelu_fused(returns="%y, %z"))


GELU_NEAR_MISSES = {
    "0.49 instead of 0.5": (GELU_ERF.replace("%half)", "%h)"), "%h = const f32[] [0.49]"),
    "x / 2 instead of x / sqrt2": (
        GELU_ERF.replace("%sqrt2)", "%two)"),
        "%two = const f32[] [2.0]",
    ),
    "erf + 2": (GELU_ERF.replace("%one)", "%two)"), "%two = const f32[] [2.0]"),
    "a 0.5 tensor, not a scalar": (
        GELU_ERF.replace("%half)", "%h)"),
        "%h = const f32[4] [0.5, 0.5, 0.5, 0.5]",
    ),
    "erf of another value": (
        "%w = Neg(%x) : f32[2,4]\n" + GELU_ERF.replace("Div(%x,", "Div(%w,"),
        "",
    ),
    "erf read twice": (GELU_ERF + "%e2 = Neg(%e) : f32[2,4]", ""),
    "erf + 1 read twice": (GELU_ERF + "%a2 = Neg(%a) : f32[2,4]", ""),
    "x / sqrt2 read twice": (GELU_ERF + "%s2 = Neg(%s) : f32[2,4]", ""),
    "tanh: 0.04 x^3": (
        TANH_ARG.replace("%k,", "%k4,") + products("%x", "%half", "%a")[0],
        "%k4 = const f32[] [0.04]",
    ),
    "tanh: x^2": (
        TANH_ARG.replace("%three)", "%two)") + products("%x", "%half", "%a")[0],
        "%two = const f32[] [2.0]",
    ),
    "tanh: 0.8 (x + ...)": (
        TANH_ARG.replace("%c,", "%c8,") + products("%x", "%half", "%a")[0],
        "%c8 = const f32[] [0.8]",
    ),
    "tanh: x^3 read twice": (
        TANH_ARG + products("%x", "%half", "%a")[0] + "\n%w = Neg(%cube) : f32[2,4]",
        "",
    ),
}


@pytest.mark.parametrize("case", GELU_NEAR_MISSES)
def test_gelu_near_misses_are_left_alone(case):
    body, consts = GELU_NEAR_MISSES[case]
    check_fusion(gelu_graph(body, consts), None)


LN_CONSTS = """
  %two = const f32[] [2.0]
  %eps = const f32[] [0.0009765625]
  %gamma = const f32[4] [0.5, 1.0, 1.5, 2.0]
  %beta = const f32[4] [0.25, 0.5, 0.75, 1.0]
"""
LN = """
%mean = ReduceMean(%x) {axes=[2], keepdims=1} : f32[2,3,1]
%d = Sub(%x, %mean) : f32[2,3,4]
%sq = Pow(%d, %two) : f32[2,3,4]
%var = ReduceMean(%sq) {axes=[2], keepdims=1} : f32[2,3,1]
%ve = Add(%var, %eps) : f32[2,3,1]
%std = Sqrt(%ve) : f32[2,3,1]
%n = Div(%d, %std) : f32[2,3,4] @"div"
"""
GAMMA = '%s = Mul(%n, %gamma) : f32[2,3,4] @"mul"\n'
BETA = '%y = Add(%s, %beta) : f32[2,3,4] @"add"\n'


def ln_graph(body: str, consts: str = "", returns: str = "%z") -> str:
    """``x: f32[2,3,4]``, the LayerNorm constants and ``consts``, ``body`` computing ``%y``,
    then ``%z = Neg(%y)``; returns ``returns``."""
    return (
        f"graph main(%x: f32[2,3,4]) {{{LN_CONSTS}{consts}\n{body}\n"
        f"%z = Neg(%y) : f32[2,3,4]\nreturn {returns}\n}}\n"
    )


def ln_fused(
    root: str,
    gamma: str = "[1.0, 1.0, 1.0, 1.0]",
    beta: str = "[0.0, 0.0, 0.0, 0.0]",
    out: str = "%y",
    after: str = "",
) -> str:
    """:func:`ln_graph` fused: ``LayerNormalization`` named after ``root``, with gamma and beta
    constants named after it."""
    consts = f"%{root}.gamma = const f32[4] {gamma}\n%{root}.beta = const f32[4] {beta}"
    body = (
        f"{out} = LayerNormalization(%x, %{root}.gamma, %{root}.beta) "
        f'{{axis=2, epsilon=0.0009765625}} : f32[2,3,4] @"{root}"\n{after}'
    )
    return ln_graph(body, consts)


def test_layernorm_is_fused_in_every_form():
    squares = ("Pow(%d, %two)", "Mul(%d, %d)")
    eps_adds = ("Add(%var, %eps)", "Add(%eps, %var)")
    gammas = (GAMMA, GAMMA.replace("%n, %gamma", "%gamma, %n"))
    betas = (BETA, BETA.replace("%s, %beta", "%beta, %s"))
    g, b = "[0.5, 1.0, 1.5, 2.0]", "[0.25, 0.5, 0.75, 1.0]"
    for square, eps_add in itertools.product(squares, eps_adds):
        core = LN.replace("Pow(%d, %two)", square).replace("Add(%var, %eps)", eps_add)
        check_fusion(ln_graph(core.replace("%n =", "%y =")), ln_fused("div"))
        for gamma in gammas:
            check_fusion(ln_graph(core + gamma.replace("%s =", "%y =")), ln_fused("mul", g))
            for beta in betas:
                check_fusion(ln_graph(core + gamma + beta), ln_fused("add", g, b))
        # beta alone is not absorbed: the LayerNorm ends at the Div, the Add stays.
        for beta in betas:
            after = beta.replace("%s", "%n")
            check_fusion(ln_graph(core + after), ln_fused("div", out="%n", after=after))


def test_layernorm_without_origin_names_is_named_by_its_root_label():
    before = ln_graph(
        LN.replace(' @"div"', "") + GAMMA.replace(' @"mul"', "") + BETA.replace(' @"add"', "")
    )
    expected = """
    graph main(%x: f32[2,3,4]) {
      %two = const f32[] [2.0]
      %eps = const f32[] [0.0009765625]
      %gamma = const f32[4] [0.5, 1.0, 1.5, 2.0]
      %beta = const f32[4] [0.25, 0.5, 0.75, 1.0]
      %"Add -> %y.gamma" = const f32[4] [0.5, 1.0, 1.5, 2.0]
      %"Add -> %y.beta" = const f32[4] [0.25, 0.5, 0.75, 1.0]
      %y = LayerNormalization(%x, %"Add -> %y.gamma", %"Add -> %y.beta")
        {axis=2, epsilon=0.0009765625} : f32[2,3,4] @"Add -> %y"
      %z = Neg(%y) : f32[2,3,4]
      return %z
    }
    """
    check_fusion(before, expected)


def test_layernorm_gamma_and_beta_may_broadcast_from_leading_ones():
    consts = (
        "%g3 = const f32[1,1,4] [0.5, 1.0, 1.5, 2.0]\n%b2 = const f32[1,4] [0.25, 0.5, 0.75, 1.0]"
    )
    body = LN + GAMMA.replace("%gamma", "%g3") + BETA.replace("%beta", "%b2")
    check_fusion(
        ln_graph(body, consts),
        ln_fused("add", "[0.5, 1.0, 1.5, 2.0]", "[0.25, 0.5, 0.75, 1.0]").replace(
            LN_CONSTS, LN_CONSTS + consts + "\n"
        ),
    )


def test_layernorm_stops_before_a_value_other_nodes_read():
    g = "[0.5, 1.0, 1.5, 2.0]"
    # The scaled value is read twice: gamma is absorbed, beta is not.
    check_fusion(
        ln_graph(LN + GAMMA + BETA + "%w = Neg(%s) : f32[2,3,4]", returns="%z, %w"),
        ln_fused("mul", g, out="%s", after=BETA + "%w = Neg(%s) : f32[2,3,4]\n").replace(
            "return %z", "return %z, %w"
        ),
    )
    # The normalised value is read twice: the LayerNorm ends at the Div.
    check_fusion(
        ln_graph(LN + GAMMA + BETA + "%w = Neg(%n) : f32[2,3,4]", returns="%z, %w"),
        ln_fused("div", out="%n", after=GAMMA + BETA + "%w = Neg(%n) : f32[2,3,4]\n").replace(
            "return %z", "return %z, %w"
        ),
    )
    # The LayerNorm's value is returned by the graph: it keeps its name.
    check_fusion(
        ln_graph(LN + GAMMA + BETA, returns="%y, %z"),
        ln_fused("add", g, "[0.25, 0.5, 0.75, 1.0]").replace("return %z", "return %y, %z"),
    )


LN_NEAR_MISSES = {
    "the mean over axis 1": LN.replace(
        "ReduceMean(%x) {axes=[2]", "ReduceMean(%x) {axes=[1]"
    ).replace("f32[2,3,1]\n%d", "f32[2,1,4]\n%d"),
    "the variance over axis 1": LN.replace(
        "ReduceMean(%sq) {axes=[2], keepdims=1} : f32[2,3,1]",
        "ReduceMean(%sq) {axes=[1], keepdims=1} : f32[2,1,4]",
    )
    .replace("Add(%var, %eps) : f32[2,3,1]", "Add(%var, %eps) : f32[2,1,4]")
    .replace("Sqrt(%ve) : f32[2,3,1]", "Sqrt(%ve) : f32[2,1,4]"),
    "the mean of another value": "%w = Neg(%x) : f32[2,3,4]\n"
    + LN.replace("ReduceMean(%x)", "ReduceMean(%w)"),
    "x - mean read a third time": LN + "%w = Neg(%d) : f32[2,3,4]",
    "the mean read twice": LN + "%w = Neg(%mean) : f32[2,3,1]",
    "the square root read twice": LN + "%w = Neg(%std) : f32[2,3,1]",
    "a cube, not a square": LN.replace("Pow(%d, %two)", "Pow(%d, %three)"),
    "twice, not a square": LN.replace("Pow(%d, %two)", "Mul(%d, %two)"),
    "d to the d": LN.replace("Pow(%d, %two)", "Pow(%d, %d)"),
    "eps outside the square root": LN.replace(
        "%ve = Add(%var, %eps) : f32[2,3,1]\n%std = Sqrt(%ve)",
        "%ve = Sqrt(%var) : f32[2,3,1]\n%std = Add(%ve, %eps)",
    ),
    "eps per channel": LN.replace(
        "Add(%var, %eps) : f32[2,3,1]", "Add(%var, %e4) : f32[2,3,4]"
    ).replace("Sqrt(%ve) : f32[2,3,1]", "Sqrt(%ve) : f32[2,3,4]"),
}


@pytest.mark.parametrize("case", LN_NEAR_MISSES)
def test_layernorm_near_misses_are_left_alone(case):
    consts = "%three = const f32[] [3.0]\n%e4 = const f32[4] [0.001, 0.001, 0.001, 0.001]"
    check_fusion(ln_graph(LN_NEAR_MISSES[case].replace("%n =", "%y ="), consts), None)


def test_layernorm_mean_without_keepdims_is_left_alone():
    # Over the last axis of a [4,4,4] input, the un-kept mean still broadcasts (along axis 0).
    text = """
    graph main(%x: f32[4,4,4]) {
      %eps = const f32[] [0.0009765625]
      %mean = ReduceMean(%x) {axes=[2], keepdims=0} : f32[4,4]
      %d = Sub(%x, %mean) : f32[4,4,4]
      %sq = Mul(%d, %d) : f32[4,4,4]
      %var = ReduceMean(%sq) {axes=[2], keepdims=0} : f32[4,4]
      %ve = Add(%var, %eps) : f32[4,4]
      %std = Sqrt(%ve) : f32[4,4]
      %y = Div(%d, %std) : f32[4,4,4]
      return %y
    }
    """
    check_fusion(text, None)


def test_layernorm_gamma_must_scale_the_last_axis_only():
    # A [4,1] factor scales rows, a [1,1,1,4] one adds an axis: the LayerNorm ends at the Div.
    for gamma, out in (("f32[4,1]", "f32[2,4,4]"), ("f32[1,1,1,4]", "f32[1,2,4,4]")):
        before = f"""
        graph main(%x: f32[2,4,4]) {{
          %eps = const f32[] [0.0009765625]
          %g = const {gamma} [0.5, 1.0, 1.5, 2.0]
          %mean = ReduceMean(%x) {{axes=[2], keepdims=1}} : f32[2,4,1]
          %d = Sub(%x, %mean) : f32[2,4,4]
          %sq = Mul(%d, %d) : f32[2,4,4]
          %var = ReduceMean(%sq) {{axes=[2], keepdims=1}} : f32[2,4,1]
          %ve = Add(%var, %eps) : f32[2,4,1]
          %std = Sqrt(%ve) : f32[2,4,1]
          %n = Div(%d, %std) : f32[2,4,4] @"div"
          %y = Mul(%n, %g) : {out}
          return %y
        }}
        """
        expected = f"""
        graph main(%x: f32[2,4,4]) {{
          %eps = const f32[] [0.0009765625]
          %g = const {gamma} [0.5, 1.0, 1.5, 2.0]
          %div.gamma = const f32[4] [1.0, 1.0, 1.0, 1.0]
          %div.beta = const f32[4] [0.0, 0.0, 0.0, 0.0]
          %n = LayerNormalization(%x, %div.gamma, %div.beta) {{axis=2, epsilon=0.0009765625}}
            : f32[2,4,4] @"div"
          %y = Mul(%n, %g) : {out}
          return %y
        }}
        """
        check_fusion(before, expected)


def traced(text: str) -> list[tuple[str, str, str]]:
    """``(rule, root label, reason)`` for each refusal of the fuse-transformer rules on ``text``."""
    seen: list[tuple[str, str, str]] = []
    apply_rules(
        from_text(text),
        FUSE_RULES,
        trace=lambda rule, node, why: seen.append((rule.name, node.label(), why)),
        max_rounds=1,
    )
    return seen


GELU_REASONS = {
    "0.49 instead of 0.5": "the product's constant is 0.49, not 0.5",
    "x / 2 instead of x / sqrt2": "the divisor of erf's x is 2, not 1.41421",
    "erf + 2": "the constant added to erf/tanh is 2, not 1",
    "a 0.5 tensor, not a scalar": "the product's constant: factor %h is not a one-element constant",
    "erf read twice": "%e is also read by Neg -> %e2",
    "tanh: 0.04 x^3": "the cube's factor is 0.04, not 0.044715",
    "tanh: x^2": "the exponent of the cube is 2, not 3",
    "tanh: 0.8 (x + ...)": "tanh's factor is 0.8, not 0.797885",
}


@pytest.mark.parametrize("case", GELU_REASONS)
def test_gelu_near_misses_say_why(case):
    body, consts = GELU_NEAR_MISSES[case]
    rule = "gelu-tanh" if case.startswith("tanh") else "gelu-erf"
    assert traced(gelu_graph(body, consts)) == [(rule, "root", GELU_REASONS[case])]


LN_REASONS = {
    "the mean over axis 1": "the mean is over axes [1], not the last axis (2)",
    "the variance over axis 1": "the variance is over axes [1], not the last axis (2)",
    "the mean of another value": "the mean subtracted from %x is the mean of %w",
    "x - mean read a third time": "%d is also read by Neg -> %w",
    "a cube, not a square": "the exponent of the square is 3, not 2",
    "eps per channel": "eps %e4 is not a one-element constant",
}


@pytest.mark.parametrize("case", LN_REASONS)
def test_layernorm_near_misses_say_why(case):
    consts = "%three = const f32[] [3.0]\n%e4 = const f32[4] [0.001, 0.001, 0.001, 0.001]"
    text = ln_graph(LN_NEAR_MISSES[case].replace("%n =", "%y ="), consts)
    assert traced(text) == [("layernorm", "div", LN_REASONS[case])]


def test_layernorm_ends_at_the_last_per_channel_mul_and_add():
    assert traced(ln_graph(LN + GAMMA + BETA)) == [
        ("layernorm", "div", "mul goes on with a per-channel Mul: layernorm-gamma fuses it there"),
        (
            "layernorm-gamma",
            "mul",
            "add goes on with a per-channel Add: layernorm-gamma-beta fuses it there",
        ),
    ]
    # A [4, 1] gamma is not per channel: the LayerNorm ends at the Div, nothing is refused.
    consts = "%g41 = const f32[4,1] [0.5, 1.0, 1.5, 2.0]"
    text = ln_graph(LN + GAMMA.replace("%gamma", "%g41").replace("%s =", "%y ="), consts)
    text = text.replace("f32[2,3,4]) {", "f32[2,4,4]) {").replace("f32[2,3,", "f32[2,4,")
    assert traced(text) == []
