"""Passes: Before/Expected text, numerical equivalence, the manager and pipeline strings."""

from __future__ import annotations

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
    Pass,
    PassManager,
    parse_pipeline,
    pipeline,
)


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
    rng = np.random.default_rng(3)
    graph = conv_bn_graph(rng, True)
    conv_out = graph["conv"]
    graph.set_outputs([*graph.outputs, conv_out])
    assert not FoldBatchNorm()(graph).modified


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
