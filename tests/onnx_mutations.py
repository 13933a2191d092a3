"""Mutations of real ONNX models, shared by the Hypothesis fuzz tests (tests/test_fuzz.py)
and the hostile-input cases (tests/hostile_importer.py).

A mutation draws its choices from a :class:`Chooser`: :class:`DrawChooser` wraps Hypothesis'
``data.draw`` (shrinkable, labelled), :class:`RandomChooser` a ``random.Random`` (a hostile
case is one seed). Two families:

- :func:`mutate`: structural damage of any kind (dims, dtypes, cycles, rewiring, attributes
  of wrong types and values, opsets, op types, external data). Some mutated models are still
  valid; the importer must import them or refuse them with an ``IntqError``.
- :func:`inject_fault`: one fault the strict import validation must refuse, naming the node
  or tensor: a value defined twice, a graph input listed twice, an unknown dtype enum, an
  attribute out of range, a name that is not UTF-8. :data:`FAULTS` lists them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import onnx
from onnx import TensorProto, helper

T = TypeVar("T")


class Chooser(Protocol):
    """Where a mutation's random choices come from."""

    def pick(self, items: Sequence[T], label: str) -> T:
        """One of ``items``."""
        ...

    def integer(self, low: int, high: int, label: str) -> int:
        """An integer in ``[low, high]``."""
        ...


class DrawChooser:
    """Choices drawn from a Hypothesis ``st.data()`` object (labelled, so they shrink)."""

    def __init__(self, data: Any):
        self.data = data

    def pick(self, items: Sequence[T], label: str) -> T:
        """One of ``items``, drawn."""
        from hypothesis import strategies as st

        return self.data.draw(st.sampled_from(list(items)), label=label)

    def integer(self, low: int, high: int, label: str) -> int:
        """An integer in ``[low, high]``, drawn."""
        from hypothesis import strategies as st

        return self.data.draw(st.integers(low, high), label=label)


class RandomChooser:
    """Choices from a ``random.Random``: one seed, one mutated model."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, items: Sequence[T], label: str) -> T:
        """One of ``items``."""
        return self.rng.choice(list(items))

    def integer(self, low: int, high: int, label: str) -> int:
        """An integer in ``[low, high]``."""
        return self.rng.randint(low, high)


def _flip(choose: Chooser, label: str) -> bool:
    return bool(choose.integer(0, 1, label))


ATTR_SWAPS = [
    helper.make_attribute("x", 1.5),
    helper.make_attribute("x", 3),
    helper.make_attribute("x", -7),
    helper.make_attribute("x", 1 << 40),
    helper.make_attribute("x", "SAME_UPPER"),
    helper.make_attribute("x", b"\xff\xfe"),
    helper.make_attribute("x", [1, 2]),
    helper.make_attribute("x", [0, -1, 2, 3, 4, 5]),
    helper.make_attribute("x", [1.0, 2.5]),
    helper.make_attribute("x", ["a", "b"]),
    helper.make_attribute("x", helper.make_tensor("t", TensorProto.FLOAT, [2], [1.0, 2.0])),
    helper.make_attribute("x", [], attr_type=onnx.AttributeProto.INTS),
]
"""Replacement attribute values of every ONNX attribute type (wrong types for most slots)."""

HUGE_DIMS = [0, 1, 3, 10**6, 10**12, 2**31, 2**62, -1, -(2**40)]
"""Dimensions and integer attribute values at and beyond every boundary."""

UNKNOWN_DTYPES = [29, 64, 99, 1000, 2**31 - 1, -1]
"""Element-type enums no ONNX release defines (onnx 1.23 defines 0 ... 28)."""

_OP_TYPES = [
    "Conv",
    "Gemm",
    "Relu",
    "Add",
    "MaxPool",
    "Reshape",
    "Expand",
    "ConstantOfShape",
    "Concat",
    "Softmax",
    "Transpose",
    "Slice",
    "Pad",
    "Loop",
    "If",
    "Nope",
    "",
]


def value_names(model: onnx.ModelProto) -> list[str]:
    """Every tensor name of ``model`` (initializers, inputs, node outputs), plus an empty
    name and one that is defined nowhere."""
    g = model.graph
    return (
        [i.name for i in g.initializer]
        + [i.name for i in g.input]
        + [o for n in g.node for o in n.output]
        + ["", "nowhere"]
    )


MUTATIONS = [
    "remove_initializer",
    "initializer_dims",
    "initializer_raw_truncated",
    "initializer_dtype",
    "input_dims",
    "input_dtype",
    "cycle",
    "duplicate_output",
    "rewire_input",
    "drop_input",
    "attribute_type",
    "attribute_value",
    "remove_attribute",
    "opset",
    "op_type",
    "remove_node",
    "domain",
    "graph_output",
    "external_data",
]
"""The kinds of :func:`mutate`."""

EXTERNAL_LOCATIONS = ["weights.bin", "../weights.bin", "/etc/passwd", "", "missing.bin"]
"""External-data locations :func:`mutate` draws (a directory may hold ``weights.bin``)."""


def mutate(model: onnx.ModelProto, choose: Chooser, kind: str | None = None) -> str:
    """Apply one structural mutation (``kind``, else drawn from :data:`MUTATIONS`) to
    ``model`` in place; returns its kind."""
    g = model.graph
    kind = kind or choose.pick(MUTATIONS, "mutation")
    pick = choose.pick
    nodes = list(g.node)
    if kind == "remove_initializer" and g.initializer:
        del g.initializer[choose.integer(0, len(g.initializer) - 1, "initializer")]
    elif kind == "initializer_dims" and g.initializer:
        t = pick(list(g.initializer), "initializer")
        rank = choose.integer(0, 4, "rank")
        t.ClearField("dims")
        t.dims.extend(pick(HUGE_DIMS, "dim") for _ in range(rank))
    elif kind == "initializer_raw_truncated" and g.initializer:
        t = pick(list(g.initializer), "initializer")
        cut = choose.integer(0, 64, "cut")
        t.raw_data = t.raw_data[: max(0, len(t.raw_data) - cut)]
    elif kind == "initializer_dtype" and g.initializer:
        pick(list(g.initializer), "initializer").data_type = choose.integer(0, 26, "dtype")
    elif kind == "input_dims" and g.input:
        dims = pick(list(g.input), "input").type.tensor_type.shape.dim
        for d in dims:
            if _flip(choose, "change dim"):
                if _flip(choose, "symbolic"):
                    d.dim_param = "N"
                else:
                    d.dim_value = pick(HUGE_DIMS, "dim")
        if _flip(choose, "extra dim"):
            dims.add().dim_value = choose.integer(0, 4, "dim")
    elif kind == "input_dtype" and g.input:
        pick(list(g.input), "input").type.tensor_type.elem_type = choose.integer(0, 26, "dtype")
    elif kind == "cycle" and len(nodes) >= 2:
        i = choose.integer(0, len(nodes) - 2, "from")
        j = choose.integer(i + 1, len(nodes) - 1, "to")
        if nodes[i].input:
            nodes[i].input[0] = nodes[j].output[0]
    elif kind == "duplicate_output" and nodes:
        pick(nodes, "node").output[0] = pick(value_names(model), "name")
    elif kind == "rewire_input" and nodes:
        node = pick(nodes, "node")
        if node.input:
            index = choose.integer(0, len(node.input) - 1, "index")
            node.input[index] = pick(value_names(model), "name")
        else:
            node.input.append(pick(value_names(model), "name"))
    elif kind == "drop_input" and nodes:
        node = pick(nodes, "node")
        if node.input:
            del node.input[choose.integer(0, len(node.input) - 1, "index")]
    elif kind in ("attribute_type", "attribute_value", "remove_attribute") and nodes:
        _mutate_attribute(pick(nodes, "node"), choose, kind)
    elif kind == "opset":
        version = choose.integer(-3, 30, "version")
        domain = pick(["", "ai.onnx", "com.microsoft", "ai.onnx.ml"], "domain")
        del model.opset_import[:]
        if _flip(choose, "keep an opset"):
            model.opset_import.append(helper.make_opsetid(domain, version))
    elif kind == "op_type" and nodes:
        pick(nodes, "node").op_type = pick(_OP_TYPES, "op_type")
    elif kind == "remove_node" and nodes:
        del g.node[choose.integer(0, len(nodes) - 1, "node")]
    elif kind == "domain" and nodes:
        pick(nodes, "node").domain = pick(["com.microsoft", "ai.onnx", "x"], "domain")
    elif kind == "graph_output" and g.output:
        pick(list(g.output), "output").name = pick(value_names(model), "name")
    elif kind == "external_data" and g.initializer:
        set_external(
            pick(list(g.initializer), "initializer"),
            pick(EXTERNAL_LOCATIONS, "location"),
            pick(["0", "7", "-4", "x", str(2**40)], "offset"),
            pick(["0", "16", "-1", "1e3", str(2**40)], "length"),
        )
    return kind


def _mutate_attribute(node: onnx.NodeProto, choose: Chooser, kind: str) -> None:
    if not node.attribute:
        return
    index = choose.integer(0, len(node.attribute) - 1, "attribute")
    if kind == "remove_attribute":
        del node.attribute[index]
        return
    old = node.attribute[index]
    new = onnx.AttributeProto()
    if kind == "attribute_type":
        new.CopyFrom(choose.pick(ATTR_SWAPS, "attribute"))
    else:  # the same type, another value
        new.CopyFrom(old)
        if new.type == onnx.AttributeProto.INTS:
            del new.ints[:]
            new.ints.extend(choose.pick(HUGE_DIMS, "int") for _ in range(choose.integer(0, 6, "n")))
        elif new.type == onnx.AttributeProto.INT:
            new.i = choose.pick(HUGE_DIMS, "int")
        elif new.type == onnx.AttributeProto.FLOAT:
            new.f = choose.pick([0.0, -1.0, float("nan"), float("inf"), 1e30], "float")
        elif new.type == onnx.AttributeProto.STRING:
            new.s = choose.pick([b"", b"NOPE", b"\xff\xfe", b"SAME_LOWER", b"x" * 5000], "string")
    new.name = old.name
    node.attribute[index].CopyFrom(new)


def set_external(tensor: onnx.TensorProto, location: str, offset: str, length: str) -> None:
    """Make ``tensor``'s data external: ``location``, ``offset`` and ``length`` as given."""
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


# ----- faults the strict validation refuses -------------------------------------------------

FAULTS = [
    "initializer_and_node_output",
    "input_and_node_output",
    "two_node_outputs",
    "input_twice",
    "unknown_input_dtype",
    "unknown_initializer_dtype",
    "unknown_cast_dtype",
    "unknown_output_dtype",
    "window_attribute_out_of_range",
    "non_utf8_name",
    "non_utf8_attribute",
    "surrogate_like_name",
    "external_nul",
    "external_long_name",
    "external_symlink_loop",
]
"""The kinds of :func:`inject_fault`: each makes a model the import must refuse."""

SYMLINK_LOOP = "loop.bin"
"""The name :func:`inject_fault` uses for a symlink pointing to itself (the case creates it)."""


def inject_fault(model: onnx.ModelProto, choose: Chooser, kind: str) -> bytes:
    """``model`` with one fault of ``kind`` (see :data:`FAULTS`) injected at a random place,
    serialized: some faults (names that are not UTF-8) exist only as bytes."""
    g = model.graph
    pick = choose.pick
    nodes = list(g.node)
    node = pick(nodes, "node")
    corrupt: str | None = None  # a name whose first byte becomes 0xff in the file
    if kind == "initializer_and_node_output":
        node.output[0] = pick([t.name for t in g.initializer], "initializer")
    elif kind == "input_and_node_output":
        node.output[choose.integer(0, len(node.output) - 1, "output")] = pick(
            [i.name for i in g.input], "input"
        )
    elif kind == "two_node_outputs":
        other = pick([n for n in nodes if n is not node] or nodes, "other")
        node.output[0] = other.output[0]
    elif kind == "input_twice":
        info = pick(list(g.input), "input")
        twin = g.input.add()
        twin.CopyFrom(info)
        if _flip(choose, "other shape"):
            del twin.type.tensor_type.shape.dim[:]
            twin.type.tensor_type.shape.dim.add().dim_value = 7
    elif kind == "unknown_input_dtype":
        pick(list(g.input), "input").type.tensor_type.elem_type = pick(UNKNOWN_DTYPES, "dtype")
    elif kind == "unknown_initializer_dtype":
        pick(list(g.initializer), "initializer").data_type = pick(UNKNOWN_DTYPES, "dtype")
    elif kind == "unknown_cast_dtype":
        # A Cast of the node's first input into an unknown type, read by the node.
        source = node.input[0]
        cast = helper.make_node(
            "Cast", [source], [f"{source}.cast"], name=f"{node.name}/cast", to=0
        )
        cast.attribute[0].i = pick(UNKNOWN_DTYPES, "dtype")
        node.input[0] = cast.output[0]
        g.node.insert(list(g.node).index(node), cast)
    elif kind == "unknown_output_dtype":
        pick(list(g.output), "output").type.tensor_type.elem_type = pick(UNKNOWN_DTYPES, "dtype")
    elif kind == "window_attribute_out_of_range":
        window = [n for n in nodes if n.op_type in ("Conv", "MaxPool", "AveragePool")]
        node = pick(window or nodes, "window node")
        name = pick(["strides", "dilations", "kernel_shape", "group", "pads"], "attribute")
        value: Any = pick([[0, 0], [1, 0], [-1, 1], [1], [1, 1, 1], [2**62, 1], [], 0, -3], "value")
        if name == "group":
            value = pick([0, -1, -(2**40)], "group")
        elif name == "pads" and isinstance(value, list):
            value = [*value, *value] if value and min(value) < 0 else [-1, 0, 0, 0]
        if not isinstance(value, list) and name != "group":
            value = [value, value]
        _set_attribute(node, name, value)
        if name in ("strides", "dilations") and _flip(choose, "auto_pad"):
            _set_attribute(node, "auto_pad", pick(["SAME_UPPER", "SAME_LOWER"], "auto_pad"))
    elif kind == "non_utf8_name":
        corrupt = pick(
            [node.name, node.output[0], g.input[0].name, g.output[0].name, g.initializer[0].name]
            if g.initializer
            else [node.name, node.output[0], g.input[0].name, g.output[0].name],
            "name",
        )
    elif kind == "non_utf8_attribute":
        text = [a for a in node.attribute if a.type == onnx.AttributeProto.STRING]
        if text:
            pick(text, "attribute").s = b"\xff" + b"NOTSET"
        else:
            node.attribute.append(helper.make_attribute("auto_pad", b"\xc3\x28"))
            node.attribute[-1].type = onnx.AttributeProto.STRING
    elif kind == "surrogate_like_name":
        # CESU-8 / WTF-8 bytes of a lone surrogate (U+DC80): not valid UTF-8 either.
        corrupt = node.name
    elif kind in ("external_nul", "external_long_name", "external_symlink_loop"):
        location = {
            "external_nul": "weights\x00.bin",
            "external_long_name": "w" * 5000 + ".bin",
            "external_symlink_loop": SYMLINK_LOOP,
        }[kind]
        set_external(pick(list(g.initializer), "initializer"), location, "0", "16")
    else:
        raise ValueError(f"unknown fault {kind!r}")
    raw = model.SerializeToString()
    if corrupt:
        encoded = corrupt.encode()
        bad = b"\xed\xb2\x80" if kind == "surrogate_like_name" else b"\xff"
        # Same length, so every length prefix in the file stays right.
        raw = raw.replace(
            encoded,
            (bad + encoded)[: len(encoded)] if len(encoded) >= len(bad) else bad[: len(encoded)],
        )
    return raw


def _set_attribute(node: onnx.NodeProto, name: str, value: Any) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    if isinstance(value, list) and not value:
        node.attribute.append(helper.make_attribute(name, [], attr_type=onnx.AttributeProto.INTS))
    else:
        node.attribute.append(helper.make_attribute(name, value))
