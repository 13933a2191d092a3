"""The IR's mutation API: use lists, replace_all_uses_with, safe rewriting, the verifier."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import intq
from intq.ir import DType, Graph, TensorType, Value, verify
from intq.passes import DeadCodeElimination

F4 = TensorType(DType.F32, (4,))
UNARY = ["Relu", "Neg", "Abs", "Sigmoid", "Tanh"]
BINARY = ["Add", "Sub", "Mul"]


def chain() -> tuple[Graph, Value, Value, Value]:
    """x -> Relu -> Neg -> output."""
    g = Graph()
    x = g.add_input("x", F4)
    r = g.op("Relu", x, name="relu")
    n = g.op("Neg", r, name="neg")
    g.set_outputs([n])
    return g, x, r, n


def test_use_lists_follow_set_input_and_removal():
    g, x, r, n = chain()
    assert [(u.node.op, u.index) for u in x.uses()] == [("Relu", 0)]
    neg = n.producer
    assert neg is not None
    neg.set_input(0, x)
    assert r.uses() == () and len(x.uses()) == 2
    g.remove(r.producer)  # type: ignore[arg-type]
    assert [u.node.op for u in x.uses()] == ["Neg"]
    assert g.find("relu") is None
    verify(g)


def test_uses_is_a_snapshot():
    g, x, r, _ = chain()
    uses = x.uses()
    identity = g.add("Identity", [x], before=r.producer).output
    for use in uses:  # rewriting while iterating the snapshot
        use.node.set_input(use.index, identity)
    assert [u.node.op for u in uses] == ["Relu"]
    assert [u.node.op for u in x.uses()] == ["Identity"]
    verify(g)


def test_replace_all_uses_with_keeps_graph_output_names():
    g, _, r, n = chain()
    assert n.is_graph_output
    replacement = g.op("Abs", r, name="abs")
    n.replace_all_uses_with(replacement)
    assert [v.name for v in g.outputs] == ["neg"]
    assert g.outputs[0] is replacement
    DeadCodeElimination()(g)
    verify(g)
    assert [node.op for node in g] == ["Relu", "Abs"]


def test_remove_refuses_a_node_still_in_use():
    g, _, r, _ = chain()
    with pytest.raises(intq.VerificationError, match="still read by neg"):
        g.remove(r.producer)  # type: ignore[arg-type]


def test_iteration_tolerates_insertions_and_removals():
    g, _, _, _ = chain()
    for node in g:
        out = node.output
        identity = g.add("Identity", [out], after=node).output
        for use in out.uses():
            if use.node is not identity.producer:
                use.node.set_input(use.index, identity)
        if out.is_graph_output:
            g.set_outputs([identity if v is out else v for v in g.outputs])
    verify(g)
    assert [node.op for node in g] == ["Relu", "Identity", "Neg", "Identity"]
    for node in g:
        if node.op == "Identity":
            node.output.replace_all_uses_with(node.inputs[0])  # type: ignore[arg-type]
            g.remove(node)
    verify(g)
    assert [node.op for node in g] == ["Relu", "Neg"]


def test_sort_restores_topological_order_and_detects_cycles():
    g, x, r, n = chain()
    late = g.add("Abs", [x], name="early")
    g._nodes.remove(late)
    g._nodes.insert(0, late)  # already first: fine
    relu = r.producer
    g._nodes.remove(relu)  # type: ignore[arg-type]
    g._nodes.append(relu)  # type: ignore[arg-type]
    with pytest.raises(intq.VerificationError, match="before it is defined"):
        verify(g)
    g.sort()
    verify(g)
    relu.set_input(0, n)  # type: ignore[union-attr]
    with pytest.raises(intq.VerificationError, match="cycle"):
        g.sort()


def test_extract_subgraph():
    g, _, _, _ = chain()
    sub = g.extract(["relu"], ["neg"])
    verify(sub)
    assert [v.name for v in sub.inputs] == ["relu"] and [node.op for node in sub] == ["Neg"]
    feed = np.array([-1, 2, -3, 4], np.float32)
    assert np.array_equal(intq.compile(sub).run({"relu": feed})["neg"], -feed)
    with pytest.raises(intq.VerificationError, match="graph input %x"):
        g.extract([], ["neg"])


def test_verifier_catches_broken_invariants():
    g, x, r, n = chain()
    n._type = TensorType(DType.F32, (5,))
    with pytest.raises(intq.VerificationError, match="has type f32\\[5\\]"):
        verify(g)
    g, x, r, n = chain()
    neg = n.producer
    neg._inputs[0] = x  # bypass set_input: the use list is now wrong
    with pytest.raises(intq.VerificationError, match="missing from its use list"):
        verify(g)
    g, x, r, n = chain()
    r.producer.attrs["bogus"] = 1  # type: ignore[union-attr]
    with pytest.raises(intq.VerificationError, match="no attribute 'bogus'"):
        verify(g)


def test_illegal_dtype_is_rejected_with_node_name():
    g = Graph()
    x = g.add_input("x", TensorType(DType.I32, (4,)))
    with pytest.raises(intq.ShapeError, match="node 'sig'.*must be a float"):
        g.op("Sigmoid", x, name="sig")


# ----- random rewrites keep the verifier green and the semantics unchanged ---------------


@st.composite
def random_graph(draw: st.DrawFn) -> Graph:
    g = Graph()
    values = [g.add_input("x", F4), g.add_input("y", F4)]
    for i in range(draw(st.integers(1, 12))):
        if draw(st.booleans()):
            op = draw(st.sampled_from(UNARY))
            values.append(g.op(op, draw(st.sampled_from(values)), name=f"n{i}"))
        else:
            op = draw(st.sampled_from(BINARY))
            a, b = draw(st.sampled_from(values)), draw(st.sampled_from(values))
            values.append(g.op(op, a, b, name=f"n{i}"))
    g.set_outputs([values[-1], draw(st.sampled_from(values[2:]))])
    return g


def insert_identity(g: Graph, value: Value) -> None:
    anchor = value.producer
    identity = (
        g.add("Identity", [value], after=anchor)
        if anchor
        else g.add("Identity", [value], before=g.nodes[0])
    )
    value.replace_all_uses_with(identity.output)
    identity.set_input(0, value)


def bypass_identities(g: Graph) -> None:
    for node in g:
        if node.op == "Identity":
            node.output.replace_all_uses_with(node.inputs[0])  # type: ignore[arg-type]
            g.remove(node)


def duplicate(g: Graph, value: Value) -> None:
    node = value.producer
    if node is None:
        return
    twin = g.add(node.op, node.inputs, node.attrs, name=node.name, after=node)
    for use in value.uses()[::2]:
        use.node.set_input(use.index, twin.output)


def add_dead_node(g: Graph, value: Value) -> None:
    g.add("Relu", [value], name="dead")


REWRITES = [insert_identity, duplicate, add_dead_node]


@settings(max_examples=60, deadline=None)
@given(
    random_graph(), st.lists(st.tuples(st.sampled_from(REWRITES), st.integers(0, 100)), max_size=8)
)
def test_random_rewrites_keep_the_graph_valid_and_equivalent(graph, rewrites):
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(size=4).astype(np.float32), "y": rng.normal(size=4).astype(np.float32)}
    before = intq.compile(graph.copy()).run(feeds)
    names = [v.name for v in graph.outputs]
    for rewrite, pick in rewrites:
        candidates = list(graph.values())
        rewrite(graph, candidates[pick % len(candidates)])
        verify(graph)
    bypass_identities(graph)
    verify(graph)
    DeadCodeElimination()(graph)
    verify(graph)
    assert [v.name for v in graph.outputs] == names
    after = intq.compile(graph).run(feeds)
    for name in names:
        np.testing.assert_array_equal(after[name], before[name])
    assert intq.ir.to_text(intq.ir.from_text(intq.ir.to_text(graph))) == intq.ir.to_text(graph)
