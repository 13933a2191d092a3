"""Textual IR: print -> parse -> print is the identity; parse errors point at the token."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import intq
from intq.ir import DType, Graph, QuantParams, TensorType, from_text, to_text, verify


def roundtrip(graph: Graph) -> Graph:
    text = to_text(graph)
    parsed = from_text(text)
    verify(parsed)
    assert to_text(parsed) == text
    return parsed


def test_expected_text_of_a_small_graph():
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (1, 2, 4, 4)))
    w = g.add_constant(np.ones((3, 2, 1, 1), np.float32), "w")
    y = g.op("Conv", x, w, name="/conv/Conv")
    z = g.op("Clip", y, name="relu6", min=0.0, max=6.0)
    g.set_outputs([g.op("Reshape", z, name="flat", shape=(1, -1))])
    assert to_text(g) == (
        "graph main(%x: f32[1,2,4,4]) {\n"
        "  %w = const f32[3,2,1,1] [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]\n"
        '  %"/conv/Conv" = Conv(%x, %w) {dilations=[1, 1], group=1, pads=[0, 0, 0, 0],'
        ' strides=[1, 1]} : f32[1,3,4,4] @"/conv/Conv"\n'
        '  %relu6 = Clip(%"/conv/Conv") {max=6.0, min=0.0} : f32[1,3,4,4] @"relu6"\n'
        '  %flat = Reshape(%relu6) {shape=[1, 48]} : f32[1,48] @"flat"\n'
        "  return %flat\n"
        "}\n"
    )
    roundtrip(g)


def test_quantized_types_and_special_values_roundtrip():
    g = Graph("quantized model")
    x = g.add_input("input:0", TensorType(DType.F32, (2, 3)))
    x.type = x.type.with_quant(QuantParams(8, True, (0.0123456789012345,)))
    w = g.add_constant(np.array([[np.inf, -np.inf, np.nan], [-0.0, 1e-38, 3.4e38]], np.float32))
    w.type = w.type.with_quant(QuantParams(4, True, (0.5, 0.25), axis=0, narrow=True))
    u = g.add_constant(np.arange(40, dtype=np.uint8).reshape(5, 8), "u")
    b = g.add_constant(np.array([True, False]), "mask")
    s = g.op("Add", x, w, name='weird "name"\n')
    g.set_outputs([s, u, b])
    parsed = roundtrip(g)
    assert parsed.name == "quantized model"
    assert parsed["input:0"].type.quant == QuantParams(8, True, (0.0123456789012345,))
    restored = parsed.constants[0].const
    assert restored is not None
    np.testing.assert_array_equal(restored, w.const)
    assert parsed.nodes[0].name == 'weird "name"\n'


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        st.sampled_from([np.float32, np.float64, np.int8, np.uint8, np.int32, np.int64, np.bool_]),
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
    )
)
def test_constants_roundtrip_bit_for_bit(array):
    g = Graph()
    c = g.add_constant(array, "c")
    g.set_outputs([c])
    parsed = from_text(to_text(g))
    got = parsed["c"].const
    assert got is not None and got.dtype == array.dtype and got.shape == array.shape
    assert got.tobytes() == np.ascontiguousarray(array).tobytes()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "graph main(%x: f32[2]) {\n  %y = Relu(%z) : f32[2]\n  return %y\n}",
            "undefined value %z",
        ),
        ("graph main(%x: f33[2]) {\n  return %x\n}", "unknown dtype 'f33'"),
        ("graph main(%x: f32[2]) {\n  %x = Relu(%x) : f32[2]\n  return %x\n}", "redefinition"),
        ("graph main(%x: f32[2]) {\n  %y = Frob(%x) : f32[2]\n  return %y\n}", "unknown IR op"),
        ("graph main(%x: f32[2]) {\n  %y = Relu(%x) : f32[2]\n", "or 'return'"),
        ('graph main() {\n  %c = const f32[2] b64"AAAA"\n  return %c\n}', "3 bytes"),
        ("graph main(%x: f32[2] q(bits=8, signed, scale=-1.0)) {\n  return %x\n}", "positive"),
    ],
)
def test_parse_errors_show_line_and_caret(text, message):
    with pytest.raises(intq.ParseError, match=message) as info:
        from_text(text)
    assert "^" in str(info.value) and "line " in str(info.value)


def test_parse_error_caret_points_at_the_token():
    text = "graph main(%x: f32[2]) {\n  %y = Relu(%nope) : f32[2]\n  return %y\n}"
    with pytest.raises(intq.ParseError) as info:
        from_text(text)
    lines = str(info.value).splitlines()
    source, caret = lines[-2], lines[-1]
    assert source[caret.index("^") :].startswith("%nope")


def test_verifier_runs_on_parsed_text():
    text = "graph main(%x: f32[2]) {\n  %y = Relu(%x) : f32[3]\n  return %y\n}"
    graph = from_text(text)
    with pytest.raises(intq.VerificationError, match="f32\\[3\\]"):
        verify(graph)


def test_nan_payloads_and_signs_survive_the_round_trip():
    """``nan`` in the text is the canonical quiet NaN: others (a payload, a sign bit) go b64."""
    odd = np.frombuffer(np.array([0x7FF8000000000001], np.uint64).tobytes(), np.float64)
    for array in (odd.reshape(()), np.array([np.nan, -np.nan, 1.0], np.float32)):
        g = Graph()
        g.set_outputs([g.add_constant(array, "c")])
        got = from_text(to_text(g))["c"].const
        assert got is not None and got.tobytes() == array.tobytes()
