"""Fuzzing: mutated models, mutated IR text and odd calibration data never crash intq.

Every input must end in a result or an :class:`intq.IntqError` subclass with a message:
never another exception type, never a hang (each case runs under a time limit). The
models are the packaged digits CNN and ResNet-18-shaped ONNX files (tests/conftest.py).

The "ci" Hypothesis profile runs a bounded number of cases per test; ``make fuzz`` runs the
"fuzz" profile (many more) on this file.
"""

from __future__ import annotations

import contextlib
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx_mutations import DrawChooser, mutate

import intq
from intq.ir import from_text, to_text

CASE_SECONDS = 10
"""Time limit of one fuzz case: anything slower counts as a hang."""

_SETTINGS = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Hang(Exception):
    """A fuzz case ran past :data:`CASE_SECONDS` (not an ``IntqError``, so it fails the test)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread when the block runs longer than ``seconds``."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"the case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def ends_well(action: Callable[[], Any]) -> Any:
    """Run ``action``: it returns or raises an ``IntqError`` with a message, in bounded time."""
    with time_limit(CASE_SECONDS):
        try:
            return action()
        except intq.IntqError as err:
            assert err.message.strip(), f"{type(err).__name__} without a message"
            assert err.node is None or isinstance(err.node, str)
            return err


# ----- the ONNX frontend on mutated real models ---------------------------------------------


def _mutated_model_case(model_path: Path, data: st.DataObject, *, with_weights: bool) -> None:
    model = onnx.load(model_path)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        mutate(model, DrawChooser(data))
    with tempfile.TemporaryDirectory() as tmp:
        if with_weights:  # a small real external-data file next to the model
            (Path(tmp) / "weights.bin").write_bytes(np.arange(64, dtype=np.uint8).tobytes())
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model.SerializeToString())
        result = ends_well(lambda: intq.from_onnx(path))
    if isinstance(result, intq.ir.Graph):
        intq.ir.verify(result)
        _quantize_and_run(result, data)


def _quantize_and_run(graph: intq.ir.Graph, data: st.DataObject) -> None:
    """A graph that imported also quantizes and runs, or says why not, in bounded time."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    if any(not v.type.dtype.is_float or v.type.size > 1 << 16 for v in graph.inputs):
        return
    feeds = {
        v.name: rng.standard_normal(v.type.shape).astype(v.type.dtype.numpy) for v in graph.inputs
    }
    ends_well(lambda: intq.compile(graph).run(feeds))
    result = ends_well(lambda: intq.quantize(graph, [feeds]))
    if not isinstance(result, intq.ir.Graph):
        return
    want = ends_well(lambda: intq.compile(result).run(feeds))
    got = ends_well(lambda: intq.compile(result, target="onnxruntime", threads=1).run(feeds))
    if isinstance(want, dict) and isinstance(got, dict):  # both ran: bit for bit the same
        for name, array in want.items():
            np.testing.assert_array_equal(got[name], array, err_msg=name)


@pytest.fixture(scope="module")
def digits_path(digits_model) -> Path:
    """The digits CNN's ONNX file (a plain path, so failing cases print short)."""
    return Path(digits_model.path)


@_SETTINGS
@given(data=st.data())
def test_mutated_digits_model(digits_path, data):
    _mutated_model_case(digits_path, data, with_weights=True)


@settings(_SETTINGS, max_examples=max(5, settings.default.max_examples // 5))
@given(data=st.data())
def test_mutated_resnet_model(resnet18_model, data):
    _mutated_model_case(Path(resnet18_model.path), data, with_weights=False)


@_SETTINGS
@given(data=st.data())
def test_flipped_bytes(digits_path, data):
    raw = bytearray(digits_path.read_bytes())
    flips = data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8))
    for position in flips:
        raw[position] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(raw)))
    if data.draw(st.booleans()):
        raw = raw[:cut]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(bytes(raw))
        ends_well(lambda: intq.from_onnx(path))


# ----- the IR text parser on mutated texts --------------------------------------------------

_TEXT_PIECES = [
    "%",
    "%x",
    "%conv",
    "=",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "->",
    '@"n"',
    '"',
    "const",
    "return",
    "graph",
    'b64"AAAA"',
    "q(bits=8, signed, scale=0.5)",
    "q(",
    "i32",
    "f32[1,2]",
    "u8",
    "-1",
    "0",
    "1e999",
    "nan",
    "-inf",
    "99999999999999999999",
    "Conv",
    "Requantize",
    "QAdd",
    "Reshape",
    "_",
    "\n",
    "#",
    "\\",
    "\x00",
    "é",
]


class _Text:
    """IR text with a short repr, so a failing case does not print 30 kB of base64."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"<the digits CNN's integer IR, {len(self.text)} characters>"


@pytest.fixture(scope="module")
def digits_text(digits_model) -> _Text:
    """The digits CNN as IR text, integer-only (exercises the q(...) syntax too)."""
    graph = intq.from_onnx(digits_model.path)
    batches = [{"input": digits_model.inputs["input"]}]
    return _Text(to_text(intq.quantize(graph, batches)))


@_SETTINGS
@given(data=st.data())
def test_mutated_ir_text(digits_text, data):
    text = digits_text.text
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        start = data.draw(st.integers(0, len(text)), label="start")
        kind = data.draw(st.sampled_from(["delete", "insert", "replace", "duplicate_line"]))
        if kind == "delete":
            end = data.draw(st.integers(start, min(len(text), start + 40)))
            text = text[:start] + text[end:]
        elif kind == "insert":
            text = text[:start] + data.draw(st.sampled_from(_TEXT_PIECES)) + text[start:]
        elif kind == "replace":
            piece = data.draw(st.one_of(st.sampled_from(_TEXT_PIECES), st.text(max_size=3)))
            text = text[:start] + piece + text[start + len(piece) :]
        else:
            lines = text.split("\n")
            i = data.draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[data.draw(st.integers(0, len(lines) - 1))])
            text = "\n".join(lines)
    result = ends_well(lambda: from_text(text))
    if isinstance(result, intq.ir.Graph):
        ends_well(lambda: intq.ir.verify(result))


@_SETTINGS
@given(text=st.text(max_size=200))
def test_random_ir_text(text):
    ends_well(lambda: from_text(text))
    ends_well(lambda: from_text("graph g(%x: f32[2]) {\n" + text + "\n}"))


# ----- intq.quantize on odd calibration data --------------------------------------------------

_ODD_ARRAYS = st.sampled_from(
    [
        "normal",
        "zeros",
        "constant",
        "nan",
        "inf",
        "huge",
        "tiny",
        "negative",
        "float64",
        "int",
        "bool",
        "wrong_shape",
        "scalar",
        "object",
        "string",
    ]
)


def _odd_array(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> Any:
    normal = rng.standard_normal(shape).astype(np.float32)
    return {
        "normal": normal,
        "zeros": np.zeros(shape, np.float32),
        "constant": np.full(shape, 3.25, np.float32),
        "nan": np.where(normal > 1, np.nan, normal).astype(np.float32),
        "inf": np.where(normal > 1, np.inf, normal).astype(np.float32),
        "huge": normal * np.float32(3e38),
        "tiny": normal * np.float32(1e-42),
        "negative": -np.abs(normal),
        "float64": normal.astype(np.float64),
        "int": (normal * 10).astype(np.int64),
        "bool": normal > 0,
        "wrong_shape": normal.reshape(-1)[:-1],
        "scalar": np.float32(1.0),
        "object": np.array([None, 1], dtype=object),
        "string": "not an array",
    }[kind]


@pytest.fixture(scope="module")
def digits_graph(digits_model):
    return intq.from_onnx(digits_model.path)


@_SETTINGS
@given(
    kinds=st.lists(_ODD_ARRAYS, max_size=4),
    extra=st.sampled_from([None, "unknown_input", "not_a_mapping", "missing_input"]),
    calibration=st.sampled_from(["minmax", "percentile", "mse"]),
    weight_bits=st.integers(2, 8),
    activation_bits=st.sampled_from([4, 8, 16]),
    percentile=st.sampled_from([99.99, 50.0, 100.0, 1e-9]),
    seed=st.integers(0, 2**16),
)
def test_odd_calibration_data(
    digits_graph, kinds, extra, calibration, weight_bits, activation_bits, percentile, seed
):
    rng = np.random.default_rng(seed)
    shape = digits_graph.inputs[0].type.shape
    with np.errstate(over="ignore"):  # "huge" overflows to inf on purpose
        batches: list[Any] = [{"input": _odd_array(kind, shape, rng)} for kind in kinds]
    if extra == "unknown_input":
        batches.append({"input": rng.standard_normal(shape).astype(np.float32), "other": 1})
    elif extra == "not_a_mapping":
        batches.append(rng.standard_normal(shape).astype(np.float32))
    elif extra == "missing_input":
        batches.append({})
    config = intq.QuantConfig(
        weight_bits=weight_bits,
        activation_bits=activation_bits,
        calibration=calibration,
        percentile=percentile,
    )
    result = ends_well(lambda: intq.quantize(digits_graph, iter(batches), config))
    if isinstance(result, intq.ir.Graph):
        x = rng.standard_normal(shape).astype(np.float32)
        ends_well(lambda: intq.compile(result).run({"input": x}))


# ----- the crashes fuzzing found, one regression test each --------------------------------------


def _conv_model(**attrs) -> onnx.ModelProto:
    w = onnx.numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="/conv", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _refused(model: onnx.ModelProto, error: type[intq.IntqError], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        intq.from_onnx(model)
    assert info.value.node == "/conv"


def test_attribute_of_the_wrong_type():
    """Was a TypeError: float strides, or auto_pad given as a float."""
    _refused(_conv_model(strides=1.5), intq.ModelImportError, "'strides'.*FLOAT.*INTS")
    _refused(_conv_model(auto_pad=2.0), intq.ModelImportError, "'auto_pad'.*FLOAT.*STRING")


def test_missing_required_attribute():
    """Was a TypeError: a MaxPool without kernel_shape."""
    model = _conv_model()
    model.graph.node[0].op_type = "MaxPool"
    del model.graph.node[0].input[1:]
    _refused(model, intq.ModelImportError, "needs attribute 'kernel_shape'")


def test_zero_stride_and_negative_padding():
    """Was a ZeroDivisionError (strides 0); negative pads are refused too."""
    out_of_range = intq.ModelImportError
    _refused(_conv_model(strides=[0, 0]), out_of_range, "'strides' of Conv .*: 0 is below 1")
    _refused(_conv_model(dilations=[1, 0]), out_of_range, "'dilations' .*: 0 is below 1")
    _refused(_conv_model(pads=[0, -1, 0, 0]), out_of_range, "'pads' .*: -1 is below 0")


def test_attribute_given_twice():
    model = _conv_model(group=1)
    model.graph.node[0].attribute.append(helper.make_attribute("group", 1))
    _refused(model, intq.ModelImportError, "'group' is given twice")


def test_node_with_too_few_inputs():
    """Was an IndexError: attributes were canonicalised before the arity was checked."""
    model = _conv_model()
    model.graph.node[0].op_type = "Flatten"
    del model.graph.node[0].input[:]
    _refused(model, intq.IntqError, "Flatten takes 1 inputs, got 0")


def test_names_that_are_not_utf8(tmp_path):
    """Was a node name of type bytes in the error: protobuf lets invalid UTF-8 through."""
    raw = _conv_model().SerializeToString().replace(b"/conv", b"\xafconv")
    path = tmp_path / "model.onnx"
    path.write_bytes(raw)
    with pytest.raises(intq.ModelImportError, match="not valid UTF-8"):
        intq.from_onnx(path)


@pytest.mark.parametrize("item", ["1e999", "300", "1.5", "-129"])
def test_constant_values_outside_their_dtype(item):
    """Was an OverflowError (1e999 into an integer constant); values must fit the dtype."""
    text = f"graph g() {{\n  %c = const i8[2] [1, {item}]\n  return %c\n}}"
    with pytest.raises(intq.ParseError, match="is not a value of i8"):
        from_text(text)


@_SETTINGS
@given(
    calibration=st.one_of(st.sampled_from(["minmax", "kl", ""]), st.text(max_size=5)),
    weight_bits=st.integers(-2, 40),
    activation_bits=st.integers(-2, 40),
    percentile=st.floats(allow_nan=True, allow_infinity=True),
)
def test_odd_quant_config(calibration, weight_bits, activation_bits, percentile):
    ends_well(
        lambda: intq.QuantConfig(
            weight_bits=weight_bits,
            activation_bits=activation_bits,
            calibration=calibration,
            percentile=percentile,
            layer_bits={"/conv": intq.LayerBits(weight_bits, activation_bits)},
        )
    )


def test_deeply_nested_attribute_list():
    """Was a RecursionError: the parser recursed once per "[" of an attribute value."""
    nested = "[" * 5000 + "]" * 5000
    text = f"graph g(%x: f32[2]) {{\n  %y = Relu(%x) {{a={nested}}} : f32[2]\n  return %y\n}}"
    with pytest.raises(intq.ParseError, match="attribute lists do not nest"):
        from_text(text)


def test_calibration_batches_without_values(digits_model):
    """Was "no values recorded yet / call update()", an internal message, then a message
    naming the tensor with a zero-size dimension; a zero-size input is now refused where its
    shape is given (calibrating on zero samples could wait forever for a batch)."""
    with pytest.raises(intq.ShapeError, match="input_shapes gives input 'input'.*at least 1"):
        intq.from_onnx(digits_model.path, input_shapes={"input": (0, 1, 8, 8)})
    graph = intq.ir.from_text(
        "graph g(%input: f32[0,1,8,8]) {\n  %y = Relu(%input) : f32[0,1,8,8]\n  return %y\n}"
    )
    batches = [{"input": np.zeros((0, 1, 8, 8), np.float32)}]
    with pytest.raises(intq.ShapeError, match="input 'input' has type f32\\[0,1,8,8\\]"):
        intq.quantize(graph, batches)
