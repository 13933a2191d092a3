"""The declarative rewrite engine: patterns, checks with reasons, the driver."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np
import pytest

import intq
from intq.ir import Graph, from_text, to_text, verify
from intq.passes.rewrite import (
    AnyOf,
    Const,
    Match,
    Op,
    Opt,
    Pattern,
    Rule,
    Tree,
    Var,
    apply_rules,
    expect_close,
    scalar,
)

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


def test_commutative_operands_match_in_either_order():
    graph = parse(
        """
        graph main(%x: f32[2]) {
          %c = const f32[] [3.0]
          %n = Neg(%x) : f32[2]
          %a = Add(%c, %n) : f32[2]
          %b = Add(%n, %c) : f32[2]
          return %a, %b
        }
        """
    )
    a, b = (graph[name].producer for name in "ab")
    plain = Op("Add", Op("Neg", Var("x"), shared=True), Const("c"))
    either = Op("Add", Op("Neg", Var("x"), shared=True), Const("c"), commutative=True)
    assert not plain.match_node(a, Match(a)) and plain.match_node(b, Match(b))
    for node in (a, b):
        m = Match(node)
        assert either.match_node(node, m)
        assert m["x"] is graph["x"] and m["c"] is graph["c"]
    with pytest.raises(ValueError, match="two inputs"):
        Op("Add", Var("x"), commutative=True)


def test_matching_backtracks_until_the_whole_pattern_fits():
    # Mul(Neg(x), x): the first order binds x to Neg(x), then Neg's input must be Neg(x) too;
    # only the swapped order fits.
    graph = parse(
        """
        graph main(%x: f32[2]) {
          %n = Neg(%x) : f32[2]
          %y = Mul(%n, %x) : f32[2]
          return %y
        }
        """
    )
    root = graph["y"].producer
    m = Match(root)
    assert Op("Mul", Var("v"), Op("Neg", Var("v")), commutative=True).match_node(root, m)
    assert m["v"] is graph["x"] and m.matched == [graph["n"].producer, root]


def test_any_of_tries_alternatives_and_binds_the_others_names_to_none():
    graph = parse(
        """
        graph main(%x: f32[2]) {
          %two = const f32[] [2.0]
          %p = Pow(%x, %two) : f32[2]
          %a = Neg(%p) : f32[2]
          %q = Mul(%x, %x) : f32[2]
          %b = Neg(%q) : f32[2]
          %r = Relu(%x) : f32[2]
          %c = Neg(%r) : f32[2]
          return %a, %b, %c
        }
        """
    )
    square = AnyOf(Op("Pow", Var("x"), Const("exponent")), Op("Mul", Var("x"), Var("x")))
    for name, exponent in (("a", graph["two"]), ("b", None)):
        node = graph[name].producer
        m = Match(node)
        assert Op("Neg", square).match_node(node, m)
        assert m["x"] is graph["x"] and m["exponent"] is exponent
    c = graph["c"].producer
    assert not Op("Neg", square).match_node(c, Match(c))


PRODUCT = """
graph main(%x: f32[2], %y: f32[2]) {
  %half = const f32[] [0.5]
  %two = const f32[] [2.0]
  %a = Mul(%half, %x) : f32[2]
  %b = Mul(%y, %two) : f32[2]
  %p = Mul(%a, %b) : f32[2]
  return %p
}
"""


def test_tree_matches_operands_in_any_order_and_bracketing():
    graph = parse(PRODUCT)
    root = graph["p"].producer
    m = Match(root)
    assert Tree("Mul", Var("u"), Op("Neg", Var("v")), rest="k").match_node(root, m) is False
    assert Tree("Mul", Const("c"), Var("u"), rest="k").match_node(root, m)
    # The first operands that fit, in tree order: %half is a constant; %x is the next one.
    assert m["c"] is graph["half"] and m["u"] is graph["x"]
    assert m["k"] == (graph["y"], graph["two"])
    assert [n.output.name for n in m.matched] == ["a", "b", "p"]
    # Without ``rest`` every operand must be taken.
    assert not Tree("Mul", Var("u"), Var("v")).match_node(root, Match(root))
    assert Tree("Mul", Var("u"), Var("v"), Const("c"), Const("d")).match_node(root, Match(root))


def test_tree_operands_returned_by_the_graph_or_read_elsewhere():
    graph = parse(PRODUCT.replace("return %p", "return %p, %a"))
    root = graph["p"].producer
    # %a is returned: it is an operand, not part of the tree.
    m = Match(root)
    assert Tree("Mul", Var("a"), rest="k").match_node(root, m)
    assert m["a"] is graph["a"] and m["k"] == (graph["y"], graph["two"])
    graph = parse(
        PRODUCT.replace(
            "%p = Mul(%a, %b) : f32[2]", "%p = Mul(%a, %b) : f32[2]\n  %n = Neg(%b) : f32[2]"
        ).replace("return %p", "return %p, %n")
    )
    root = graph["p"].producer
    # %b is read by %n: the tree takes it only when shared.
    assert not Tree("Mul", rest="all").match_node(root, Match(root))
    m = Match(root)
    assert Tree("Mul", rest="all", shared=True).match_node(root, m)
    assert m["all"] == tuple(graph[name] for name in ("half", "x", "y", "two"))


def test_shared_nodes_stay_while_read_and_go_once_unread():
    graph = parse(
        PRODUCT.replace(
            "%p = Mul(%a, %b) : f32[2]", "%p = Mul(%a, %b) : f32[2]\n  %n = Neg(%b) : f32[2]"
        ).replace("return %p", "return %p, %n")
    )

    def neg_x(g: Graph, m: Match):
        return [g.add("Neg", [m["x"]], before=m.root).output]

    pattern = Tree("Mul", Var("x"), rest="k", shared=True)

    def at_p(m: Match):
        return None if m.root.output.name == "p" else "not %p"

    assert apply_rules(graph, [Rule("product", pattern, neg_x, at_p)]) == 1
    verify(graph)
    # %a went with the product; %b stays for %n.
    assert [n.output.name for n in graph] == ["b", "p", "n"]
    graph = parse(PRODUCT)
    assert apply_rules(graph, [Rule("product", pattern, neg_x, at_p)]) == 1
    assert [n.output.name for n in graph] == ["p"]


def test_a_value_read_twice_inside_the_match_is_private():
    graph = parse(
        """
        graph main(%x: f32[2]) {
          %n = Neg(%x) : f32[2]
          %y = Add(%n, %n) : f32[2]
          %z = Relu(%y) : f32[2]
          return %z
        }
        """
    )
    neg = Op("Neg", Var("x"), name="neg")
    matched = []

    def drop(g: Graph, m: Match):
        matched.append([n.op for n in m.matched])
        return [m["x"]]

    assert apply_rules(graph, [Rule("double", Op("Add", neg, neg), drop)]) == 1
    assert matched == [["Neg", "Add"]]  # the Neg once, before the Add that reads it
    assert [n.op for n in graph] == ["Relu"]


def test_a_value_with_other_readers_is_traced_as_the_reason():
    graph = parse(
        """
        graph main(%x: f32[2]) {
          %a = Neg(%x) : f32[2]
          %b = Neg(%a) : f32[2]
          %c = Relu(%b) : f32[2]
          %d = Abs(%a) : f32[2]
          return %c, %d
        }
        """
    )
    seen = []

    def trace(rule: Rule, node, why: str):
        seen.append((rule.name, node.output.name, why))

    assert apply_rules(graph, [DOUBLE_NEG], trace=trace) == 0
    assert seen == [("neg-neg", "b", "%a is also read by Abs -> %d")]
    graph = parse(NEG_NEG.replace("return %c", "return %c, %a"))
    seen.clear()
    assert apply_rules(graph, [DOUBLE_NEG], trace=trace) == 0
    assert seen == [("neg-neg", "b", "%a is returned by the graph")]


def test_the_driver_tries_each_way_a_pattern_fits_until_the_check_passes():
    graph = parse(
        """
        graph main(%x: f32[2]) {
          %half = const f32[] [0.5]
          %two = const f32[] [2.0]
          %p = Mul(%half, %two) : f32[]
          return %p
        }
        """
    )
    picked, seen = [], []

    def rewrite(g: Graph, m: Match):
        picked.append(m["c"].name)
        return None

    def trace(rule: Rule, node, why: str):
        seen.append(why)

    def two(m: Match):
        return None if scalar(m["c"]) == 2 else f"%{m['c'].name} is not 2"

    apply_rules(
        graph, [Rule("times-two", Tree("Mul", Const("c"), rest="k"), rewrite, two)], trace=trace
    )
    assert picked == ["two"] and seen == []
    never = Rule(
        "never", Tree("Mul", Const("c"), rest="k"), rewrite, lambda m: f"not %{m['c'].name}"
    )
    apply_rules(graph, [never], trace=trace)
    assert seen == ["not %half"]  # the first refusal is the one reported


def test_a_pattern_that_only_implements_match_still_works():
    @dataclass(frozen=True)
    class Input(Pattern):
        """A graph input, bound as ``name`` (one way to fit at most)."""

        name: str

        def match(self, value, m):
            if value is None or value.producer is not None or value.is_const:
                return False
            m.values[self.name] = value
            return True

    graph = parse(NEG_NEG)
    node = graph["a"].producer
    m = Match(node)
    assert Op("Neg", Input("i")).match_node(node, m) and m["i"] is graph["x"]
    node = graph["b"].producer
    assert not Op("Neg", Input("i")).match_node(node, Match(node))


def test_scalar_constants_and_their_reasons():
    graph = parse(
        """
        graph main(%x: f32[2]) {
          %h = const f32[1,1] [0.49]
          %v = const f32[2] [0.5, 0.5]
          %one = const i64[] [1]
          %y = Neg(%x) : f32[2]
          return %y
        }
        """
    )
    assert scalar(graph["h"]) == pytest.approx(0.49) and scalar(graph["one"]) == 1.0
    assert scalar(graph["v"]) is None and scalar(graph["x"]) is None and scalar(None) is None
    assert expect_close("the half", 0.5004, 0.5) is None
    assert expect_close("the half", scalar(graph["h"]), 0.5) == "the half is 0.49, not 0.5"
    assert expect_close("the half", None, 0.5) == "the half is not a one-element constant"
