"""The declarative rewrite engine: patterns, checks with reasons, the driver."""

from __future__ import annotations

import textwrap

import numpy as np

import intq
from intq.ir import Graph, from_text, to_text, verify
from intq.passes.rewrite import Const, Match, Op, Opt, Rule, Var, apply_rules

NEG_NEG = """
graph main(%x: f32[2]) {
  %a = Neg(%x) : f32[2]
  %b = Neg(%a) : f32[2]
  %c = Relu(%b) : f32[2]
  return %c
}
"""


def drop_double_negation(graph: Graph, m: Match):
    return [m["x"]]


DOUBLE_NEG = Rule("neg-neg", Op("Neg", Op("Neg", Var("x"))), drop_double_negation)


def parse(text: str) -> Graph:
    graph = from_text(textwrap.dedent(text).strip() + "\n")
    verify(graph)
    return graph


def test_rule_fires_and_removes_matched_nodes():
    graph = parse(NEG_NEG)
    assert apply_rules(graph, [DOUBLE_NEG]) == 1
    verify(graph)
    assert to_text(graph) == "graph main(%x: f32[2]) {\n  %c = Relu(%x) : f32[2]\n  return %c\n}\n"


def test_inner_nodes_with_other_readers_block_the_match_unless_shared():
    text = NEG_NEG.replace("return %c", "return %c, %a")
    graph = parse(text)
    assert apply_rules(graph, [DOUBLE_NEG]) == 0
    shared = Rule("neg-neg", Op("Neg", Op("Neg", Var("x"), shared=True)), drop_double_negation)
    assert apply_rules(graph, [shared]) == 1
    verify(graph)
    # The shared inner Neg stays: the graph still returns it.
    assert [n.op for n in graph] == ["Neg", "Relu"]


def test_check_reason_is_traced_and_blocks_the_rewrite():
    graph = parse(NEG_NEG)
    refusing = Rule("neg-neg", DOUBLE_NEG.pattern, drop_double_negation, lambda m: "not today")
    seen = []
    assert apply_rules(graph, [refusing], trace=lambda r, n, why: seen.append((r.name, why))) == 0
    assert seen == [("neg-neg", "not today")]


def test_repeated_variable_must_bind_the_same_value():
    graph = parse(
        """
        graph main(%x: f32[2], %y: f32[2]) {
          %s = Add(%x, %y) : f32[2]
          %d = Add(%x, %x) : f32[2]
          return %s, %d
        }
        """
    )
    doubled = []

    def double(g: Graph, m: Match):
        doubled.append(m.root.outputs[0].name)
        two = g.add_constant(np.array([2.0, 2.0], np.float32), "two")
        return [g.add("Mul", [m["v"], two], before=m.root).output]

    assert apply_rules(graph, [Rule("x+x", Op("Add", Var("v"), Var("v")), double)]) == 1
    assert doubled == ["d"]
    verify(graph)
    assert [v.name for v in graph.outputs] == ["s", "d"]
    x = np.array([1.0, -2.0], np.float32)
    out = intq.compile(graph).run({"x": x, "y": x})
    np.testing.assert_array_equal(out["d"], 2 * x)


def test_optional_and_constant_inputs():
    graph = parse(
        """
        graph main(%x: f32[1,1,3,3]) {
          %w = const f32[1,1,1,1] [2.0]
          %y = Conv(%x, %w) {dilations=[1, 1], group=1, pads=[0, 0, 0, 0], strides=[1, 1]}
            : f32[1,1,3,3]
          return %y
        }
        """
    )
    seen: list[object] = []

    def record(g: Graph, m: Match):
        seen.append((m.const("w").tolist(), m.const("b")))
        return None  # decline: nothing changes

    pattern = Op("Conv", Var("x"), Const("w"), Opt(Const("b")))
    assert apply_rules(graph, [Rule("conv", pattern, record)]) == 0
    assert seen == [([[[[2.0]]]], None)]
    # A graph input is not a constant.
    neg = parse(NEG_NEG).nodes[0]
    assert not Op("Neg", Const("c")).match_node(neg, Match(neg))
    assert Op("Neg", Var("c")).match_node(neg, Match(neg))
