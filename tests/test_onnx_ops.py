"""Conformance of every ONNX op intq converts: intq's reference interpreter vs ONNX Runtime.

Each test builds a one-node (or tiny) ONNX model with ``onnx.helper``, runs it on ONNX Runtime's
CPU provider and through ``intq.from_onnx`` + the reference backend, and requires identical
output dtypes and shapes, equal ints/bools and floats within ``rtol=1e-5``.

Operands are given as plain arrays (graph inputs fed at run time), :class:`Init` (initializers:
constants the converters fold into attributes) or ``None`` (an omitted optional input).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import intq
from intq.frontends.onnx_context import MAX_OPSET
from intq.frontends.onnx_ops import CONVERTERS, supported_ops

_ORT_ERRORS = ort.capi.onnxruntime_pybind11_state

FAST = settings(max_examples=25, deadline=None)
"""Hypothesis settings of the property tests (2-core CI: keep the file well under a minute)."""


@dataclass(frozen=True)
class Init:
    """An operand stored as an initializer (a compile-time constant)."""

    array: np.ndarray


Operand = np.ndarray | Init | None

# Every (op type, opset) pair a test converts, to check at the end that all converters ran.
_EXERCISED: set[tuple[str, int]] = set()


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def randf(*shape: int, seed: int = 0, low: float = -3.0, high: float = 3.0) -> np.ndarray:
    """A float32 array of uniform values."""
    return _rng(seed).uniform(low, high, shape).astype(np.float32)


def randi(
    *shape: int, seed: int = 0, low: int = -9, high: int = 9, dtype: Any = np.int64
) -> np.ndarray:
    """An integer array of values in ``[low, high]``."""
    return _rng(seed).integers(low, high, shape, endpoint=True).astype(dtype)


def make_model(
    op_type: str,
    inputs: Sequence[Operand],
    *,
    opset: int,
    outputs: int = 1,
    domain: str = "",
    name: str = "node0",
    **attrs: Any,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-node model and the feeds of its graph inputs."""
    names, graph_inputs, inits, feeds = [], [], [], {}
    for i, operand in enumerate(inputs):
        if operand is None:
            names.append("")
            continue
        key = f"in{i}"
        names.append(key)
        if isinstance(operand, Init):
            inits.append(numpy_helper.from_array(np.asarray(operand.array), key))
        else:
            array = np.asarray(operand)
            elem = helper.np_dtype_to_tensor_dtype(array.dtype)
            graph_inputs.append(helper.make_tensor_value_info(key, elem, array.shape))
            feeds[key] = array
    out_names = [f"out{i}" for i in range(outputs)]
    node = helper.make_node(op_type, names, out_names, name=name, domain=domain, **attrs)
    graph = helper.make_graph(
        [node], "g", graph_inputs, [onnx.ValueInfoProto(name=n) for n in out_names], inits
    )
    opsets = [helper.make_opsetid("", opset)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=opsets)
    # onnx 1.23 stamps IR version 14, which this onnxruntime refuses: use the oldest that fits.
    try:
        model.ir_version = max(3, helper.find_min_ir_version_for(opsets[:1]))
    except ValueError:  # opsets 2-5 are missing from onnx's table; they came with IR 3
        model.ir_version = 3
    return model, feeds


def run_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of ``model`` on ONNX Runtime's CPU provider (graph optimisations off)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def run_intq(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of ``model`` imported by intq and run by the reference interpreter."""
    graph = intq.from_onnx(model)
    return intq.compile(graph, target="reference").run(dict(feeds))


def assert_same(got: np.ndarray, want: np.ndarray, what: str = "") -> None:
    """Same dtype and shape; equal ints/bools, floats within rtol 1e-5 (atol scaled by range)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != ORT's {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != ORT's {want.shape}"
    if want.dtype.kind == "f":
        # The range leaves out infinities and the type's extremes (MaxPool's empty windows).
        typical = want[np.abs(want) < np.finfo(want.dtype).max]
        scale = float(np.max(np.abs(typical))) if typical.size else 1.0
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, scale), err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


def check(
    op_type: str, inputs: Sequence[Operand], *, opset: int, outputs: int = 1, **attrs: Any
) -> dict[str, np.ndarray]:
    """Build the one-node model, run it on both, compare every output; returns ORT's."""
    model, feeds = make_model(op_type, inputs, opset=opset, outputs=outputs, **attrs)
    want = run_ort(model, feeds)
    got = run_intq(model, feeds)
    assert sorted(got) == sorted(want)
    for key in want:
        assert_same(got[key], want[key], f"{op_type}-{opset} {attrs} output {key}")
    _EXERCISED.add((op_type, opset))
    return want


# ----- elementwise ------------------------------------------------------------------------

UNARY_FLOAT = ["Sigmoid", "Tanh", "Erf", "Sqrt", "Exp", "Neg", "Abs", "Relu"]


@pytest.mark.parametrize("opset", [9, 13])
@pytest.mark.parametrize("op", UNARY_FLOAT)
def test_unary_float(op: str, opset: int) -> None:
    """Float unary functions, over a range that reaches saturation."""
    x = randf(2, 3, 5, low=-6, high=6)
    if op == "Sqrt":
        x = np.abs(x)
    check(op, [x], opset=opset)


@pytest.mark.parametrize(
    ("op", "dtype"),
    [
        ("Neg", np.int32),
        ("Neg", np.int64),
        ("Abs", np.int32),
        ("Abs", np.int64),
        ("Abs", np.int8),
        ("Relu", np.int32),
        ("Relu", np.int8),
    ],
)
def test_unary_int(op: str, dtype: Any) -> None:
    """Integer Neg/Abs/Relu (Relu takes ints from opset 14)."""
    check(op, [randi(3, 4, dtype=dtype)], opset=14)


def test_sqrt_negative_is_nan() -> None:
    """Sqrt of negative values is NaN in both."""
    check("Sqrt", [np.array([-1.0, 0.0, 4.0], np.float32)], opset=13)


@pytest.mark.parametrize("opset", [9, 13, 20])
def test_isnan(opset: int) -> None:
    """IsNaN (what a Hugging Face softmax's fully masked rows are checked with)."""
    check("IsNaN", [np.array([np.nan, 0.0, -np.inf, 4.0], np.float32)], opset=opset)


BINARY_FLOAT = ["Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "Greater"]


@st.composite
def broadcast_shapes(draw: st.DrawFn, arity: int = 2) -> list[tuple[int, ...]]:
    """``arity`` shapes that broadcast together (ranks 0-4, some dims 1, ranks may differ)."""
    rank = draw(st.integers(0, 4))
    full = draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    shapes = []
    for _ in range(arity):
        keep = draw(st.integers(0, rank))
        shape = [1 if draw(st.booleans()) else d for d in full[rank - keep :]]
        shapes.append(tuple(shape))
    return shapes


@FAST
@given(
    op=st.sampled_from([*BINARY_FLOAT, "And", "Or"]),
    dtype=st.sampled_from(["f32", "i32", "i64"]),
    shapes=broadcast_shapes(),
    opset=st.sampled_from([7, 13, 14]),
    seed=st.integers(0, 2**16),
)
def test_binary_broadcast(
    op: str, dtype: str, shapes: list[tuple[int, ...]], opset: int, seed: int
) -> None:
    """Broadcasting binary ops on float, int32 and int64 (bool for And/Or)."""
    (sa, sb), rng = shapes, _rng(seed)
    a: np.ndarray
    b: np.ndarray
    if op in ("Equal", "Less", "Greater") and opset < 11:
        opset = 11  # Equal takes floats, Less/Greater ints, from opset 9-11
    if op in ("And", "Or"):
        a, b = rng.random(sa) < 0.5, rng.random(sb) < 0.5
    elif dtype == "f32" or op == "Pow":
        a, b = randf(*sa, seed=seed), randf(*sb, seed=seed + 1)
        if op == "Pow":
            a = np.abs(a) + np.float32(0.1)  # no NaNs from fractional powers of negatives
        if op in ("Equal", "Less", "Greater"):
            b = np.where(rng.random(sb) < 0.3, a.reshape(-1)[0], b).astype(np.float32)
    else:
        np_dtype = np.int32 if dtype == "i32" else np.int64
        a, b = randi(*sa, seed=seed, dtype=np_dtype), randi(*sb, seed=seed + 1, dtype=np_dtype)
        if op == "Div":
            b = np.where(b == 0, np_dtype(3), b).astype(np_dtype)
    check(op, [a, b], opset=opset)


@pytest.mark.parametrize("op", ["And", "Or"])
def test_logical(op: str) -> None:
    """And/Or on broadcast bool tensors."""
    rng = _rng(7)
    check(op, [rng.random((2, 3, 4)) < 0.5, rng.random((3, 1)) < 0.5], opset=7)


# intq's Pow takes a float base (integer exponents: test_pow_integer_exponent).
@pytest.mark.parametrize(
    ("op", "dtype"),
    [
        (op, dt)
        for op in BINARY_FLOAT
        for dt in (np.float32, np.int32, np.int64)
        if op != "Pow" or dt == np.float32
    ],
)
def test_binary_each(op: str, dtype: Any) -> None:
    """Every arithmetic/comparison op once per dtype, deterministically (with ties)."""
    a = randf(2, 3, 4) if dtype == np.float32 else randi(2, 3, 4, dtype=dtype)
    b = randf(3, 1, seed=1) if dtype == np.float32 else randi(3, 1, seed=1, low=1, dtype=dtype)
    if op == "Pow":
        a = np.abs(a)
    b[0, 0] = a[0, 0, 0]
    check(op, [a, b], opset=13)


def test_div_int64_truncates_toward_zero() -> None:
    """ONNX integer Div truncates toward zero (numpy's ``//`` floors)."""
    a = np.array([7, -7, 7, -7, 0, 1, -1, 9, -9, -(2**40) - 3, 2**62 + 1], np.int64)
    b = np.array([2, 2, -2, -2, 5, -3, 3, 4, 4, 7, -3], np.int64)
    out = check("Div", [a, b], opset=14)["out0"]
    truncated = [
        abs(x) // abs(y) * (1 if (x < 0) == (y < 0) else -1)
        for x, y in zip(a.tolist(), b.tolist(), strict=True)
    ]
    np.testing.assert_array_equal(out, truncated)
    np.testing.assert_array_equal(out[:9], [3, -3, -3, 3, 0, 0, 0, 2, -2])


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul"])
def test_int32_arith_wraps(op: str) -> None:
    """int32 arithmetic wraps around on overflow in both."""
    big = np.array([2**31 - 1, -(2**31), 2**30 + 7, -5], np.int32)
    check(op, [big, np.array([2, 3, -4, 2**31 - 1], np.int32)], opset=14)


def test_div_int32_truncates_toward_zero() -> None:
    """Same with int32 and broadcasting a negative scalar divisor."""
    check("Div", [randi(3, 4, dtype=np.int32, low=-50, high=50), np.array(-7, np.int32)], opset=13)


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_pow_integer_exponent(dtype: Any) -> None:
    """Float base, integer exponent (negative bases allowed)."""
    check("Pow", [randf(2, 3), np.array([0, 1, 2], dtype)], opset=15)


def test_equal_bool() -> None:
    """Equal on bool tensors (opset 11+)."""
    rng = _rng(3)
    check("Equal", [rng.random((3, 4)) < 0.5, rng.random((4,)) < 0.5], opset=11)


def test_not() -> None:
    """Logical Not."""
    check("Not", [_rng(1).random((2, 3)) < 0.5], opset=1)


@FAST
@given(
    shapes=broadcast_shapes(3),
    dtype=st.sampled_from([np.float32, np.int64]),
    seed=st.integers(0, 2**16),
)
def test_where_broadcast(shapes: list[tuple[int, ...]], dtype: Any, seed: int) -> None:
    """Where with all three operands broadcast."""
    cond = _rng(seed).random(shapes[0]) < 0.5
    x = randf(*shapes[1], seed=seed).astype(dtype)
    y = randf(*shapes[2], seed=seed + 1).astype(dtype)
    check("Where", [cond, x, y], opset=16)


@pytest.mark.parametrize(
    ("op", "opset", "attrs"),
    [
        ("HardSigmoid", 6, {}),
        ("HardSigmoid", 13, {"alpha": 1 / 6, "beta": 0.5}),
        ("HardSwish", 14, {}),
    ],
)
def test_hard_activations(op: str, opset: int, attrs: dict[str, Any]) -> None:
    """HardSigmoid (default and MobileNetV3's alpha) and HardSwish, through both kinks."""
    check(op, [randf(3, 17, low=-5, high=5)], opset=opset, **attrs)


@pytest.mark.parametrize("approximate", [None, "none", "tanh"])
def test_gelu(approximate: str | None) -> None:
    """Gelu (opset 20), exact and tanh approximations."""
    x = randf(4, 16, low=-5, high=5)
    attrs: dict[str, Any] = {} if approximate is None else {"approximate": approximate}
    model, _ = make_model("Gelu", [x], opset=20, **attrs)
    try:
        run_ort(model, {"in0": x})
    except (_ORT_ERRORS.NotImplemented, _ORT_ERRORS.InvalidGraph, _ORT_ERRORS.Fail) as err:
        pytest.skip(f"this onnxruntime cannot run Gelu-20: {err}")
    check("Gelu", [x], opset=20, **attrs)


@pytest.mark.parametrize(
    ("opset", "attrs"),
    [
        (6, {"min": -1.0, "max": 2.5}),
        (6, {}),
        (6, {"min": 0.0}),
        (10, {"max": 0.5}),
        (10, {"min": -0.5, "max": 6.0}),
    ],
)
def test_clip_attrs(opset: int, attrs: dict[str, Any]) -> None:
    """Clip with bounds as attributes (opsets 6-10)."""
    check("Clip", [randf(3, 4)], opset=opset, **attrs)


@pytest.mark.parametrize("opset", [11, 12, 13])
@pytest.mark.parametrize(
    ("low", "high"),
    [(-1.0, 2.5), (None, 0.5), (0.0, None), (None, None), (1.0, 1.0), (2.0, 1.0)],
)
def test_clip_inputs(opset: int, low: float | None, high: float | None) -> None:
    """Clip with bounds as (optional) inputs (opsets 11+); min > max gives max everywhere."""
    bound = [None if v is None else Init(np.array(v, np.float32)) for v in (low, high)]
    while bound and bound[-1] is None:
        bound.pop()
    check("Clip", [randf(3, 4), *bound], opset=opset)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.int8, np.uint8])
def test_clip_int(dtype: Any) -> None:
    """Integer Clip (opset 12+)."""
    x = randi(3, 5, low=0 if dtype == np.uint8 else -20, high=40, dtype=dtype)
    check("Clip", [x, Init(np.array(3, dtype)), Init(np.array(17, dtype))], opset=13)


CASTS = [
    (np.float32, TensorProto.INT32),
    (np.float32, TensorProto.INT64),
    (np.float32, TensorProto.BOOL),
    (np.float32, TensorProto.DOUBLE),
    (np.float32, TensorProto.FLOAT16),
    (np.int64, TensorProto.FLOAT),
    (np.int64, TensorProto.INT32),
    (np.int64, TensorProto.INT8),
    (np.int32, TensorProto.INT64),
    (np.bool_, TensorProto.FLOAT),
    (np.bool_, TensorProto.INT64),
    (np.int8, TensorProto.FLOAT),
    (np.uint8, TensorProto.INT32),
    (np.float64, TensorProto.FLOAT),
]


@pytest.mark.parametrize("opset", [6, 13, 19])
@pytest.mark.parametrize(("src", "to"), CASTS)
def test_cast(src: Any, to: int, opset: int) -> None:
    """Cast between float, int and bool (floats to int truncate; int narrowing wraps)."""
    if src == np.bool_:
        x = _rng(0).random((3, 4)) < 0.5
    elif np.dtype(src).kind == "f":
        x = randf(3, 4, low=-100, high=100).astype(src)
        x[0, :2] = [0.0, -0.0]
    else:
        info = np.iinfo(src)
        x = randi(3, 4, low=max(info.min, -1000), high=min(info.max, 1000), dtype=src)
    check("Cast", [x], opset=opset, to=to)


# ----- convolution and pooling ----------------------------------------------------------


def _pads_for(draw: st.DrawFn, spatial: int, limit: Sequence[int]) -> list[int]:
    """Begin and end pads, each below ``limit[i] + 1``."""
    begin = [draw(st.integers(0, limit[i])) for i in range(spatial)]
    end = [draw(st.integers(0, limit[i])) for i in range(spatial)]
    return begin + end


@st.composite
def conv_cases(draw: st.DrawFn) -> dict[str, Any]:
    """A valid Conv: 1-d or 2-d, groups (incl. depthwise), strides, pads, dilations, auto_pad."""
    spatial = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = group > 1 and draw(st.booleans())
    c_per_group = 1 if depthwise else draw(st.integers(1, 3))
    m = group * (1 if depthwise else draw(st.integers(1, 2)))
    kernel = [draw(st.integers(1, 3)) for _ in range(spatial)]
    strides = [draw(st.integers(1, 3)) for _ in range(spatial)]
    dilations = [draw(st.integers(1, 2)) for _ in range(spatial)]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    if auto_pad.startswith("SAME"):
        # ORT refuses SAME_* with dilations ("Dilation not supported for AutoPadType::SAME_*").
        dilations = [1] * spatial
    pads = _pads_for(draw, spatial, [2] * spatial) if auto_pad == "NOTSET" else [0] * 2 * spatial
    sizes = []
    for i in range(spatial):
        span = dilations[i] * (kernel[i] - 1) + 1
        least = max(1, span - pads[i] - pads[i + spatial])
        sizes.append(draw(st.integers(least, least + 5)))
    attrs: dict[str, Any] = {"group": group} if group > 1 or draw(st.booleans()) else {}
    if auto_pad != "NOTSET":
        attrs["auto_pad"] = auto_pad
    elif any(pads) or draw(st.booleans()):
        attrs["pads"] = pads
    if any(s != 1 for s in strides) or draw(st.booleans()):
        attrs["strides"] = strides
    if any(d != 1 for d in dilations) or draw(st.booleans()):
        attrs["dilations"] = dilations
    if draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    return {
        "x": (draw(st.integers(1, 2)), c_per_group * group, *sizes),
        "w": (m, c_per_group, *kernel),
        "bias": draw(st.booleans()),
        "attrs": attrs,
        "opset": draw(st.sampled_from([1, 11, 22])),
    }


@FAST
@given(case=conv_cases(), seed=st.integers(0, 2**16), const_weight=st.booleans())
def test_conv(case: dict[str, Any], seed: int, const_weight: bool) -> None:
    """Conv over its attribute space against ORT."""
    x, w = randf(*case["x"], seed=seed), randf(*case["w"], seed=seed + 1)
    inputs: list[Operand] = [x, Init(w) if const_weight else w]
    if case["bias"]:
        inputs.append(Init(randf(case["w"][0], seed=seed + 2)))
    check("Conv", inputs, opset=case["opset"], **case["attrs"])


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_conv_same_odd_padding(auto_pad: str) -> None:
    """SAME_* with an odd total padding: the extra pad goes to the end (UPPER) or start."""
    x, w = randf(1, 2, 6, 7), randf(3, 2, 2, 4, seed=1)
    check("Conv", [x, Init(w)], opset=11, auto_pad=auto_pad, strides=[1, 2])


@st.composite
def pool_cases(draw: st.DrawFn, op: str) -> dict[str, Any]:
    """A valid MaxPool/AveragePool configuration (pads below the kernel, as ORT requires)."""
    spatial = draw(st.sampled_from([1, 2]))
    kernel = [draw(st.integers(1, 3)) for _ in range(spatial)]
    strides = [draw(st.integers(1, 3)) for _ in range(spatial)]
    dilations = [draw(st.integers(1, 2)) if op == "MaxPool" else 1 for _ in range(spatial)]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    if auto_pad.startswith("SAME"):
        # ORT computes SAME pads of pools from the undilated kernel, so its output is not
        # ceil(size / stride) as the spec requires (intq follows the spec): no dilations. And
        # it refuses strides above the kernel there ("padding values must be non-negative",
        # the needed total padding being negative), which the spec allows (no padding).
        dilations = [1] * spatial
        strides = [min(s, k) for s, k in zip(strides, kernel, strict=True)]
    if auto_pad == "NOTSET":
        pads = _pads_for(draw, spatial, [k - 1 for k in kernel])
    else:
        pads = [0] * 2 * spatial
    sizes = []
    for i in range(spatial):
        span = dilations[i] * (kernel[i] - 1) + 1
        least = max(1, span - pads[i] - pads[i + spatial])
        sizes.append(draw(st.integers(least, least + 5)))
    attrs: dict[str, Any] = {"kernel_shape": kernel}
    if auto_pad != "NOTSET":
        attrs["auto_pad"] = auto_pad
    elif any(pads) or draw(st.booleans()):
        attrs["pads"] = pads
    if any(s != 1 for s in strides) or draw(st.booleans()):
        attrs["strides"] = strides
    if any(d != 1 for d in dilations):
        attrs["dilations"] = dilations
    if draw(st.booleans()):
        attrs["ceil_mode"] = 1
    if op == "AveragePool" and draw(st.booleans()):
        attrs["count_include_pad"] = 1
    opset = draw(st.sampled_from([11, 12, 19, 22] if op == "MaxPool" else [11, 19, 22]))
    return {
        "x": (draw(st.integers(1, 2)), draw(st.integers(1, 3)), *sizes),
        "attrs": attrs,
        "opset": opset,
    }


@FAST
@given(case=pool_cases("MaxPool"), seed=st.integers(0, 2**16))
def test_maxpool(case: dict[str, Any], seed: int) -> None:
    """MaxPool: kernel, strides, pads, dilations, ceil_mode, auto_pad."""
    check("MaxPool", [randf(*case["x"], seed=seed)], opset=case["opset"], **case["attrs"])


@FAST
@given(case=pool_cases("AveragePool"), seed=st.integers(0, 2**16))
def test_averagepool(case: dict[str, Any], seed: int) -> None:
    """AveragePool: kernel, strides, pads, ceil_mode, count_include_pad, auto_pad."""
    check("AveragePool", [randf(*case["x"], seed=seed)], opset=case["opset"], **case["attrs"])


def test_maxpool_window_in_padding() -> None:
    """A dilated window that lies wholly in the padding gives the type's lowest value (ORT)."""
    check(
        "MaxPool",
        [randf(1, 1, 1)],
        opset=11,
        kernel_shape=[2],
        pads=[1, 1],
        strides=[2],
        dilations=[2],
    )
    check(
        "MaxPool",
        [randf(1, 2, 3, 1)],
        opset=12,
        kernel_shape=[2, 2],
        pads=[1, 1, 1, 1],
        dilations=[3, 2],
    )


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_maxpool_int8(dtype: Any) -> None:
    """Integer MaxPool (opset 12+): padding never wins, even against the type's minimum."""
    x = randi(1, 2, 5, 5, low=np.iinfo(dtype).min, high=np.iinfo(dtype).max, dtype=dtype)
    check("MaxPool", [x], opset=12, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])


@pytest.mark.parametrize("opset", [8, 10])
def test_pools_old_opsets(opset: int) -> None:
    """MaxPool-8 and AveragePool-7/10 (before ceil_mode / dilations existed)."""
    x = randf(1, 2, 6, 5)
    check("MaxPool", [x], opset=opset, kernel_shape=[2, 3], strides=[2, 1], pads=[1, 0, 0, 2])
    check(
        "AveragePool",
        [x],
        opset=opset - 1,
        kernel_shape=[3, 2],
        pads=[1, 1, 1, 0],
        count_include_pad=1,
    )


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 4, 7), (1, 2, 3, 2, 2)])
def test_global_average_pool(shape: tuple[int, ...]) -> None:
    """GlobalAveragePool over 1-3 spatial dims."""
    check("GlobalAveragePool", [randf(*shape)], opset=1)


# ----- linear algebra and normalisation -----------------------------------------------


GEMM_CASES = [
    (1.0, 1.0, "1d"),
    (0.5, 2.0, "1d"),
    (1.0, 1.0, "2d"),
    (-1.5, 0.25, "col"),
    (2.0, 1.0, "scalar"),
    (1.0, 1.0, None),
]


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(
    ("opset", "alpha", "beta", "bias"),
    # C is optional from opset 11.
    [(o, *c) for o in (7, 11, 13) for c in GEMM_CASES if o >= 11 or c[2] is not None],
)
def test_gemm(
    opset: int, trans_a: int, trans_b: int, alpha: float, beta: float, bias: str | None
) -> None:
    """Gemm with transA/transB/alpha/beta and 1-D, 2-D, column, scalar or no bias."""
    m, k, n = 3, 4, 5
    a = randf(*((k, m) if trans_a else (m, k)))
    b = randf(*((n, k) if trans_b else (k, n)), seed=1)
    shapes = {"1d": (n,), "2d": (m, n), "col": (m, 1), "scalar": ()}
    inputs: list[Operand] = [a, b if opset == 13 else Init(b)]
    if bias is not None:
        inputs.append(Init(randf(*shapes[bias], seed=2)))
    check("Gemm", inputs, opset=opset, alpha=alpha, beta=beta, transA=trans_a, transB=trans_b)


@pytest.mark.parametrize(
    ("sa", "sb"),
    [
        ((3, 4), (4, 5)),
        ((2, 3, 4), (2, 4, 5)),
        ((2, 3, 4), (4, 5)),
        ((4,), (4, 5)),
        ((3, 4), (4,)),
        ((4,), (4,)),
        ((2, 1, 3, 4), (5, 4, 2)),
        ((5,), (2, 3, 5, 4)),
        ((1, 3, 4), (6, 4, 2)),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.int64])
def test_matmul(sa: tuple[int, ...], sb: tuple[int, ...], dtype: Any) -> None:
    """MatMul: 2-D, batched, broadcast batch dims, 1-D operands on either side."""
    a = randf(*sa) if dtype == np.float32 else randi(*sa, dtype=dtype)
    b = randf(*sb, seed=1) if dtype == np.float32 else randi(*sb, seed=1, dtype=dtype)
    check("MatMul", [a, b], opset=13)


@pytest.mark.parametrize("opset", [9, 14, 15])
@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 5), (1, 3, 4, 4), (1, 3, 2, 2, 2)])
def test_batchnorm(opset: int, shape: tuple[int, ...]) -> None:
    """Inference-mode BatchNormalization over axis 1 of rank 2-5 inputs."""
    c = shape[1]
    params = [
        randf(c, seed=1),
        randf(c, seed=2),
        randf(c, seed=3),
        randf(c, seed=4, low=0.1, high=2.0),
    ]
    check("BatchNormalization", [randf(*shape), *map(Init, params)], opset=opset, epsilon=1e-3)


def test_batchnorm_runtime_params() -> None:
    """BatchNormalization with its parameters as graph inputs (no folding)."""
    params = [
        randf(4, seed=1),
        randf(4, seed=2),
        randf(4, seed=3),
        randf(4, seed=4, low=0.1, high=2.0),
    ]
    check("BatchNormalization", [randf(2, 4, 3), *params], opset=15)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((2, 3, 8), -1), ((2, 3, 8), 1), ((4, 6), 0), ((2, 3, 4, 5), -2), ((2, 3, 8), 2)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm(shape: tuple[int, ...], axis: int, bias: bool) -> None:
    """LayerNormalization (opset 17) over trailing axes from ``axis``, with/without bias."""
    norm = shape[axis % len(shape) :]
    inputs: list[Operand] = [randf(*shape), Init(randf(*norm, seed=1))]
    if bias:
        inputs.append(Init(randf(*norm, seed=2)))
    check("LayerNormalization", inputs, opset=17, axis=axis, epsilon=1e-4)


def test_layernorm_default_attrs() -> None:
    """LayerNormalization with default axis/epsilon and runtime scale/bias."""
    check("LayerNormalization", [randf(3, 7), randf(7, seed=1), randf(7, seed=2)], opset=18)


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 4, 3, 3), (2, 2, 2, 3, 2)])
@pytest.mark.parametrize("opset", [6, 17, 22])
def test_instancenorm(shape: tuple[int, ...], opset: int) -> None:
    """InstanceNormalization: per sample and channel over the spatial axes, then the affine."""
    c = shape[1]
    scale, bias = Init(randf(c, seed=1)), Init(randf(c, seed=2))
    check("InstanceNormalization", [randf(*shape), scale, bias], opset=opset, epsilon=1e-3)


def test_instancenorm_unit_affine_on_a_grouped_tensor() -> None:
    """What torch exports for ``GroupNorm``: InstanceNormalization of ``[N, G, -1]`` with unit
    scale and zero bias (the affine follows as Mul and Add)."""
    ones, zeros = Init(np.ones(4, np.float32)), Init(np.zeros(4, np.float32))
    check("InstanceNormalization", [randf(2, 4, 24), ones, zeros], opset=17)


@pytest.mark.parametrize(("shape", "groups"), [((2, 6, 4, 4), 3), ((1, 4, 5), 1), ((2, 4, 3), 4)])
@pytest.mark.parametrize("opset", [18, 21])
def test_groupnorm(shape: tuple[int, ...], groups: int, opset: int) -> None:
    """GroupNormalization: opset 18's scale and bias have one entry per group, 21's one per
    channel."""
    n = groups if opset == 18 else shape[1]
    scale, bias = Init(randf(n, seed=1)), Init(randf(n, seed=2))
    check(
        "GroupNormalization",
        [randf(*shape), scale, bias],
        opset=opset,
        num_groups=groups,
        epsilon=1e-4,
    )


@pytest.mark.parametrize("opset", [1, 11])
@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((2, 3, 4), None),
        ((2, 3, 4), 1),
        ((2, 3, 4), 0),
        ((2, 3, 4), 2),
        ((2, 3, 4), -1),
        ((2, 3, 4), -2),
        ((5,), None),
        ((2, 2, 3, 2), 2),
    ],
)
def test_softmax_flatten(opset: int, shape: tuple[int, ...], axis: int | None) -> None:
    """Softmax before opset 13 normalises over all dims from ``axis`` (default 1), flattened."""
    attrs = {} if axis is None else {"axis": axis}
    if len(shape) == 1 and axis is None:
        attrs = {"axis": 0}
    check("Softmax", [randf(*shape, low=-8, high=8)], opset=opset, **attrs)


@pytest.mark.parametrize("axis", [None, 0, 1, -1, -3])
def test_softmax_13(axis: int | None) -> None:
    """Softmax from opset 13 normalises along one axis (default -1)."""
    attrs = {} if axis is None else {"axis": axis}
    check("Softmax", [randf(3, 4, 5, low=-8, high=8)], opset=13, **attrs)


# ----- reductions ------------------------------------------------------------------------

REDUCE_ATTR_OPSET = {"ReduceMean": 13, "ReduceMax": 13, "ReduceSum": 11, "ReduceL2": 17}
REDUCE_INPUT_OPSET = {"ReduceMean": 18, "ReduceMax": 18, "ReduceSum": 13, "ReduceL2": 18}
AXES_CASES = [None, (1,), (-1,), (0, 2), (-3, -1), (0, 1, 2)]


@pytest.mark.parametrize("keepdims", [None, 0, 1])
@pytest.mark.parametrize("axes", AXES_CASES)
@pytest.mark.parametrize("op", list(REDUCE_ATTR_OPSET))
def test_reduce_axes_attr(op: str, axes: tuple[int, ...] | None, keepdims: int | None) -> None:
    """Reductions with ``axes`` as an attribute (ReduceSum <13, ReduceMean/Max <18)."""
    attrs: dict[str, Any] = {} if keepdims is None else {"keepdims": keepdims}
    if axes is not None:
        attrs["axes"] = list(axes)
    check(op, [randf(2, 3, 4)], opset=REDUCE_ATTR_OPSET[op], **attrs)
    check(op, [randf(2, 3, 4)], opset=1, **attrs)


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("axes", AXES_CASES)
@pytest.mark.parametrize("op", list(REDUCE_INPUT_OPSET))
def test_reduce_axes_input(op: str, axes: tuple[int, ...] | None, keepdims: int) -> None:
    """Reductions with ``axes`` as an input (ReduceSum from 13, ReduceMean/Max from 18)."""
    inputs: list[Operand] = [randf(2, 3, 4)]
    if axes is not None:
        inputs.append(Init(np.array(axes, np.int64)))
    check(op, inputs, opset=REDUCE_INPUT_OPSET[op], keepdims=keepdims)


@pytest.mark.parametrize("op", list(REDUCE_INPUT_OPSET))
@pytest.mark.parametrize("empty_axes", [False, True])
def test_reduce_noop_with_empty_axes(op: str, empty_axes: bool) -> None:
    """``noop_with_empty_axes=1`` without axes is the identity."""
    inputs: list[Operand] = [randf(2, 3)]
    if empty_axes:
        inputs.append(Init(np.zeros(0, np.int64)))
    check(op, inputs, opset=REDUCE_INPUT_OPSET[op], noop_with_empty_axes=1)
    check(op, inputs, opset=REDUCE_INPUT_OPSET[op], noop_with_empty_axes=0, keepdims=0)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMax", "ReduceMean"])
def test_reduce_int(op: str, dtype: Any) -> None:
    """Integer reductions (ReduceMean of ints truncates toward zero)."""
    x = randi(3, 4, 5, low=-50, high=50, dtype=dtype)
    check(op, [x], opset=REDUCE_ATTR_OPSET[op], axes=[1], keepdims=0)


def test_reduce_l2_is_sqrt_of_a_sum_of_squares() -> None:
    """ReduceL2 imports as Mul, ReduceSum and Sqrt (ConvNeXt-V2's GRN, F.normalize)."""
    model, _ = make_model("ReduceL2", [randf(2, 3, 4)], opset=17, axes=[1, 2], keepdims=1)
    graph = intq.from_onnx(model)
    assert [n.op for n in graph.nodes] == ["Mul", "ReduceSum", "Sqrt"]


# ----- data movement ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "target"),
    [
        ((2, 3, 4), (6, 4)),
        ((2, 3, 4), (-1,)),
        ((2, 3, 4), (0, -1)),
        ((2, 3, 4), (4, 0, 2)),
        ((6,), (1, 2, 1, 3)),
        ((1, 1), ()),
        ((2, 3, 4), (0, 0, 0)),
    ],
)
@pytest.mark.parametrize("opset", [5, 14])
def test_reshape(shape: tuple[int, ...], target: tuple[int, ...], opset: int) -> None:
    """Reshape with 0 (copy) and -1 (inferred) entries."""
    x = randf(*shape) if shape != (1, 1) else np.ones((1, 1), np.float32)
    check("Reshape", [x, Init(np.array(target, np.int64))], opset=opset)


def test_reshape_allowzero() -> None:
    """Reshape-14 with allowzero=1 and no 0 in the shape is a plain reshape."""
    check("Reshape", [randf(2, 3, 4), Init(np.array([4, -1], np.int64))], opset=14, allowzero=1)


@pytest.mark.parametrize("axis", [None, 0, 1, 2, 3, -1, -2, -3])
@pytest.mark.parametrize("opset", [1, 13])
def test_flatten(axis: int | None, opset: int) -> None:
    """Flatten at every axis in ``[-r, r]`` (negative axes count from the back, from opset 11)."""
    opset = 11 if axis is not None and axis < 0 and opset < 11 else opset
    attrs = {} if axis is None else {"axis": axis}
    check("Flatten", [randf(2, 3, 4)], opset=opset, **attrs)


@pytest.mark.parametrize("perm", [None, (0, 2, 1, 3), (3, 2, 1, 0), (1, 0, 3, 2), (0, 1, 2, 3)])
def test_transpose(perm: tuple[int, ...] | None) -> None:
    """Transpose with explicit and default (reversing) perm."""
    attrs: dict[str, Any] = {} if perm is None else {"perm": list(perm)}
    check("Transpose", [randf(2, 3, 4, 5)], opset=13, **attrs)
    check("Transpose", [randi(2, 3, 4, 5)], opset=1, **attrs)


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
@pytest.mark.parametrize("opset", [4, 13])
def test_concat(axis: int, opset: int) -> None:
    """Concat of three inputs (one an initializer) along any axis."""
    opset = 11 if axis < 0 and opset < 11 else opset  # negative axes exist from opset 11
    shapes = [[2, 3, 4], [2, 3, 4], [2, 3, 4]]
    for i, s in enumerate(shapes):
        s[axis] = i + 1
    inputs: list[Operand] = [
        randf(*shapes[0]),
        Init(randf(*shapes[1], seed=1)),
        randf(*shapes[2], seed=2),
    ]
    check("Concat", inputs, opset=opset, axis=axis)


def test_concat_int64_single() -> None:
    """Concat of int64 tensors, and of a single input."""
    check("Concat", [randi(2, 3), randi(2, 1, seed=1)], opset=13, axis=1)
    check("Concat", [randi(2, 3)], opset=13, axis=0)


INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)

SLICE_CASES = [
    # starts, ends, axes, steps
    ([1], [3], None, None),
    ([0, 1], [2, 4], [0, 2], None),
    ([-3], [-1], [1], None),
    ([-100], [100], [2], None),
    ([2], [INT64_MAX], [-1], None),
    ([1, 0], [INT64_MAX, -1], [-2, 0], None),
    ([5], [2], [1], None),  # empty
    ([3], [0], [2], [-1]),
    ([-1], [INT64_MIN], [2], [-1]),
    ([-1], [-100], [1], [-2]),
    ([100], [-100], [2], [-3]),
    ([0, 4], [3, 0], [0, 2], [2, -2]),
    ([1], [1], [1], [-1]),  # empty
    ([0], [5], [1], [3]),
    ([INT64_MIN], [INT64_MAX], [0], [1]),
    ([-5, 7], [2, -7], [2, 1], [-1, -1]),
]


@pytest.mark.parametrize(("starts", "ends", "axes", "steps"), SLICE_CASES)
@pytest.mark.parametrize("opset", [10, 13])
def test_slice_inputs(
    starts: list[int], ends: list[int], axes: list[int] | None, steps: list[int] | None, opset: int
) -> None:
    """Slice-10/13 with negative, out-of-range and INT64-extreme bounds and negative steps."""
    if opset == 10 and axes is not None and min(axes) < 0:
        opset = 11  # negative Slice axes exist from opset 11
    x = randf(3, 5, 6)
    inputs: list[Operand] = [x, Init(np.array(starts, np.int64)), Init(np.array(ends, np.int64))]
    if axes is not None or steps is not None:
        inputs.append(None if axes is None else Init(np.array(axes, np.int64)))
    if steps is not None:
        inputs.append(Init(np.array(steps, np.int64)))
    check("Slice", inputs, opset=opset)


_BOUND = st.one_of(st.integers(-8, 8), st.sampled_from([INT64_MIN, INT64_MAX, -(2**40), 2**40]))


@FAST
@given(
    data=st.data(),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    opset=st.sampled_from([11, 13]),
)
def test_slice_random(data: st.DataObject, shape: list[int], opset: int) -> None:
    """Slice-11/13 with random bounds (incl. INT64 extremes), axes (negative too) and steps."""
    rank = len(shape)
    axes = data.draw(
        st.lists(
            st.integers(-rank, rank - 1), min_size=1, max_size=rank, unique_by=lambda a: a % rank
        )
    )
    n = len(axes)
    starts = data.draw(st.lists(_BOUND, min_size=n, max_size=n))
    ends = data.draw(st.lists(_BOUND, min_size=n, max_size=n))
    steps = data.draw(st.lists(st.sampled_from([-3, -2, -1, 1, 2, 3]), min_size=n, max_size=n))
    # ORT reads an end of INT64_MAX (or INT32_MAX) with a negative step as "through index 0";
    # the spec clamps it to dim - 1 (an empty slice), and so does ONNX's own shape inference.
    ends = [INT64_MIN if e == INT64_MAX and s < 0 else e for e, s in zip(ends, steps, strict=True)]
    ints = [Init(np.array(v, np.int64)) for v in (starts, ends, axes, steps)]
    check("Slice", [randf(*shape), *ints], opset=opset)


@pytest.mark.parametrize(
    ("starts", "ends", "axes", "steps"), [c for c in SLICE_CASES if c[3] is None]
)
def test_slice_attrs(
    starts: list[int], ends: list[int], axes: list[int] | None, steps: list[int] | None
) -> None:
    """Slice-1 (opset 9) with bounds as attributes."""
    if axes is not None and min(axes) < 0:
        axes = [a % 3 for a in axes]  # Slice-1 has no negative axes
    attrs: dict[str, Any] = {"starts": starts, "ends": ends}
    if axes is not None:
        attrs["axes"] = axes
    check("Slice", [randf(3, 5, 6)], opset=9, **attrs)


@pytest.mark.parametrize(
    ("shape", "axes"),
    [
        ((1, 3, 1, 2), None),
        ((1, 3, 1, 2), (0,)),
        ((1, 3, 1, 2), (-2, 0)),
        ((3, 1), (1,)),
        ((1,), None),
    ],
)
def test_squeeze(shape: tuple[int, ...], axes: tuple[int, ...] | None) -> None:
    """Squeeze with axes as attribute (opset 11) and input (13), and without axes."""
    x = randf(*shape)
    attrs: dict[str, Any] = {} if axes is None else {"axes": list(axes)}
    check("Squeeze", [x], opset=11, **attrs)
    inputs: list[Operand] = [x] if axes is None else [x, Init(np.array(axes, np.int64))]
    check("Squeeze", inputs, opset=13)


@pytest.mark.parametrize(
    ("shape", "axes"),
    [
        ((3, 2), (0,)),
        ((3, 2), (-1,)),
        ((3, 2), (0, 3)),
        ((3, 2), (1, -1)),
        ((), (0,)),
        ((4,), (0, 3, -3)),
    ],
)
def test_unsqueeze(shape: tuple[int, ...], axes: tuple[int, ...]) -> None:
    """Unsqueeze with axes (positions in the output) as attribute (opset 11) and input (13)."""
    x = randf(*shape)
    check("Unsqueeze", [x], opset=11, axes=list(axes))
    check("Unsqueeze", [x, Init(np.array(axes, np.int64))], opset=13)


@pytest.mark.parametrize(
    ("axis", "indices"),
    [(0, [0, -1, 2]), (1, [[-5, 4], [0, -1]]), (-1, [3, -6, 0]), (2, -2), (0, []), (-2, [[1]])],
)
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
@pytest.mark.parametrize("const", [True, False])
def test_gather(axis: int, indices: Any, dtype: Any, const: bool) -> None:
    """Gather along any axis with negative, scalar, empty and nested indices (empty ones as a
    constant only: a zero-size graph input is refused)."""
    idx = np.array(indices, dtype)
    data = randf(4, 5, 6)
    check("Gather", [data, Init(idx) if const or idx.size == 0 else idx], opset=13, axis=axis)
    check("Gather", [randi(4, 5, 6), Init(idx)], opset=1, axis=axis)


@pytest.mark.parametrize(
    ("shape", "target"),
    [
        ((3, 1), (3, 4)),
        ((3, 1), (2, 1, 6)),
        ((1,), (2, 3)),
        ((), (2, 2)),
        ((2, 3), (1, 1)),
        ((4, 1, 2), (1, 3, 1)),
        ((2, 3), (4, 1, 1)),
    ],
)
def test_expand(shape: tuple[int, ...], target: tuple[int, ...]) -> None:
    """Expand, whose output is the broadcast of input and shape (which may be smaller)."""
    x = randf(*shape)
    check("Expand", [x, Init(np.array(target, np.int64))], opset=13)
    check("Expand", [randi(*shape), Init(np.array(target, np.int64))], opset=8)


@pytest.mark.parametrize(
    ("pads", "mode", "value"),
    [
        ([1, 0, 2, 0, 1, 3], "constant", 1.5),
        ([0, 0, 0, 0, 0, 0], "constant", None),
        ([1, 2, 1, 1, 2, 0], "reflect", None),
        ([2, 0, 1, 0, 3, 2], "edge", None),
        ([-1, 0, 1, 0, 2, -2], "constant", -2.0),
        ([0, -1, 0, 0, 0, -3], "constant", None),
        # Negative pads crop before reflecting (ORT refuses reflections wider than the cropped
        # axis minus one, which the spec leaves undefined, so none are drawn).
        ([-1, 0, 1, 1, 2, -2], "reflect", None),
        ([1, -2, 0, -1, 2, 3], "edge", None),
    ],
)
@pytest.mark.parametrize("opset", [2, 11, 13, 18])
def test_pad(pads: list[int], mode: str, value: float | None, opset: int) -> None:
    """Pad with constant/reflect/edge modes and negative (cropping) pads, attrs and inputs."""
    x = randf(3, 4, 5)
    attrs: dict[str, Any] = {} if mode == "constant" and value is None else {"mode": mode}
    if opset < 11:
        attrs["pads"] = pads
        if value is not None:
            attrs["value"] = value
        check("Pad", [x], opset=opset, **attrs)
        return
    inputs: list[Operand] = [x, Init(np.array(pads, np.int64))]
    if value is not None:
        inputs.append(Init(np.array(value, np.float32)))
    check("Pad", inputs, opset=opset, **attrs)


@pytest.mark.parametrize(
    ("axes", "pads", "mode"),
    [
        ([1], [2, 1], "constant"),
        ([-1, 0], [1, 2, 0, 1], "reflect"),
        ([2, 0], [1, 0, 2, 1], "edge"),
        ([0, -2], [-1, 1, 1, -2], "constant"),
    ],
)
def test_pad_axes(axes: list[int], pads: list[int], mode: str) -> None:
    """Pad-18 with an ``axes`` input (pads only for those axes, negative axes allowed)."""
    inputs: list[Operand] = [
        randf(3, 4, 5),
        Init(np.array(pads, np.int64)),
        Init(np.array(0.5, np.float32)),
        Init(np.array(axes, np.int64)),
    ]
    check("Pad", inputs, opset=18, mode=mode)


def test_pad_int() -> None:
    """Constant Pad of an int64 tensor with an int64 value."""
    inputs: list[Operand] = [
        randi(2, 3),
        Init(np.array([1, 0, 0, 2], np.int64)),
        Init(np.array(-7, np.int64)),
    ]
    check("Pad", inputs, opset=13)


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (None, None),
        (1, None),
        (None, 2),
        (-2, None),
        (None, -1),
        (1, -1),
        (-10, 10),
        (3, 1),
        (0, -10),
        (10, None),
    ],
)
def test_shape(start: int | None, end: int | None) -> None:
    """Shape with start/end (opset 15), clamped to ``[0, rank]``; plain Shape at opset 1."""
    x = randf(2, 3, 4, 5)
    attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    check("Shape", [x], opset=15, **attrs)
    if not attrs:
        check("Shape", [x], opset=1)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("value", numpy_helper.from_array(randf(2, 3), "v")),
        ("value", numpy_helper.from_array(randi(4), "v")),
        ("value", numpy_helper.from_array(np.array(True), "v")),
        ("value_float", 2.5),
        ("value_floats", [1.0, -2.0]),
        ("value_int", -3),
        ("value_ints", [4, 5, 6]),
    ],
)
def test_constant(key: str, value: Any) -> None:
    """Constant from a tensor (opset 9) and from the scalar/list attributes (opset 13)."""
    opset = 9 if key == "value" else 13
    model, feeds = make_model("Constant", [], opset=opset, **{key: value})
    want, got = run_ort(model, feeds), run_intq(model, feeds)
    assert_same(got["out0"], want["out0"], f"Constant {key}")
    _EXERCISED.add(("Constant", opset))


def test_constant_feeding_an_op() -> None:
    """A Constant node feeding an Add with a graph input (tiny two-node model)."""
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(randf(3, seed=5))),
        helper.make_node("Add", ["x", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [onnx.ValueInfoProto(name="y")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    feeds = {"x": randf(2, 3)}
    assert_same(run_intq(model, feeds)["y"], run_ort(model, feeds)["y"], "Constant+Add")


@pytest.mark.parametrize(
    "value",
    [
        None,
        np.array([2.5], np.float32),
        np.array([-7], np.int64),
        np.array([3], np.int32),
        np.array([True]),
        np.array([2**53 + 1], np.int64),
        np.array([INT64_MAX], np.int64),
        np.array([INT64_MIN + 1], np.int64),
        np.array([1.25], np.float64),
    ],
)
@pytest.mark.parametrize("shape", [(2, 3), (0,), ()])
def test_constant_of_shape(value: np.ndarray | None, shape: tuple[int, ...]) -> None:
    """ConstantOfShape with each value dtype (default float 0), including empty shapes."""
    attrs = {} if value is None else {"value": numpy_helper.from_array(value)}
    check("ConstantOfShape", [Init(np.array(shape, np.int64))], opset=9, **attrs)
    check("ConstantOfShape", [Init(np.array(shape, np.int64))], opset=20, **attrs)


def test_constant_of_shape_from_shape() -> None:
    """ConstantOfShape fed by Shape of a graph input: the usual exporter idiom, folded."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node(
            "ConstantOfShape", ["s"], ["y"], value=numpy_helper.from_array(np.array([1], np.int64))
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [onnx.ValueInfoProto(name="y")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    feeds = {"x": randf(2, 3)}
    assert_same(run_intq(model, feeds)["y"], run_ort(model, feeds)["y"], "Shape+ConstantOfShape")


@pytest.mark.parametrize(
    ("opset", "dtype"),
    # ORT's Identity-1 kernel has no bool type.
    [
        (o, d)
        for o in (1, 13, 16, 19, 21)
        for d in (np.float32, np.int64, np.bool_)
        if o > 1 or d != np.bool_
    ],
)
def test_identity(opset: int, dtype: Any) -> None:
    """Identity of float, int and bool tensors."""
    check(
        "Identity",
        [(randf(2, 3) > 0).astype(dtype) if dtype == np.bool_ else randf(2, 3).astype(dtype)],
        opset=opset,
    )


@pytest.mark.parametrize(
    ("opset", "extra", "attrs"),
    [
        (7, [], {"ratio": 0.3}),
        (10, [], {}),
        (12, [Init(np.array(0.5, np.float32))], {}),
        (13, [Init(np.array(0.2, np.float32)), Init(np.array(False))], {"seed": 3}),
        (13, [None, Init(np.array(False))], {}),
        (22, [], {}),
    ],
)
def test_dropout(opset: int, extra: list[Operand], attrs: dict[str, Any]) -> None:
    """Inference-mode Dropout is the identity."""
    check("Dropout", [randf(3, 4), *extra], opset=opset, **attrs)


# ----- refusals ----------------------------------------------------------------------------


# ----- ops added for real models (Split, PRelu, Resize, ConvTranspose...) -------------------


@pytest.mark.parametrize(
    ("opset", "shape", "axis", "split", "outputs"),
    [
        (11, (4, 6), 1, [2, 4], 2),
        (11, (4, 6), 0, None, 2),
        (2, (3, 6), -1, [1, 2, 3], 3),
        (13, (4, 6), 1, [1, 5], 2),
        (13, (2, 3, 4), -1, None, 2),
        (18, (4, 7), 1, None, 3),
        (18, (4, 6), 1, [3, 3], 2),
    ],
)
def test_split(
    opset: int, shape: tuple[int, ...], axis: int, split: list[int] | None, outputs: int
) -> None:
    """Split with sizes as attribute (up to 12), as input (13+) or by num_outputs (18+)."""
    x = randf(*shape)
    attrs: dict[str, Any] = {"axis": axis}
    inputs: list[Operand] = [x]
    if split is not None and opset < 13:
        attrs["split"] = split
    elif split is not None:
        inputs.append(Init(np.array(split, np.int64)))
    elif opset >= 18:
        attrs["num_outputs"] = outputs
    check("Split", inputs, opset=opset, outputs=outputs, **attrs)


@pytest.mark.parametrize(
    "slope", [np.array([0.25], np.float32), randf(3, 1, 1, seed=2), randf(4, seed=3)]
)
@pytest.mark.parametrize("const", [True, False])
def test_prelu(slope: np.ndarray, const: bool) -> None:
    """PRelu with a scalar, per-channel and last-axis slope (constant or fed)."""
    check("PRelu", [randf(2, 3, 5, 4), Init(slope) if const else slope], opset=16)


@pytest.mark.parametrize("alpha", [None, 0.2])
@pytest.mark.parametrize("opset", [6, 16])
def test_leaky_relu(alpha: float | None, opset: int) -> None:
    attrs = {} if alpha is None else {"alpha": alpha}
    check("LeakyRelu", [randf(3, 4)], opset=opset, **attrs)


@pytest.mark.parametrize("op", ["Min", "Max"])
@pytest.mark.parametrize("arity", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_min_max(op: str, arity: int, dtype: Any) -> None:
    """n-ary Min/Max with broadcasting, float and int (opset 13)."""
    shapes = [(2, 3, 4), (3, 1), (4,)][:arity]
    inputs = [randf(*s, seed=i).astype(dtype) for i, s in enumerate(shapes)]
    check(op, inputs, opset=13)
    if arity == 2 and dtype == np.float32:
        check(op, [inputs[0], Init(inputs[1])], opset=8)


@pytest.mark.parametrize(("op", "opset"), [("Softplus", 1), ("Softplus", 13), ("Mish", 18)])
def test_softplus_mish(op: str, opset: int) -> None:
    check(op, [randf(4, 25, low=-30, high=30)], opset=opset)


@pytest.mark.parametrize(
    ("shape", "repeats"), [((2, 3), (1, 2)), ((2, 1, 3), (3, 2, 1)), ((4,), (0,)), ((), ())]
)
def test_tile(shape: tuple[int, ...], repeats: tuple[int, ...]) -> None:
    check("Tile", [randf(*shape), Init(np.array(repeats, np.int64))], opset=13)
    check("Tile", [randi(*shape), Init(np.array(repeats, np.int64))], opset=6)


@pytest.mark.parametrize("mode", [None, "DCR", "CRD"])
def test_depth_to_space(mode: str | None) -> None:
    attrs: dict[str, Any] = {"blocksize": 2} if mode is None else {"blocksize": 2, "mode": mode}
    check("DepthToSpace", [randf(2, 8, 3, 2)], opset=1 if mode is None else 13, **attrs)


def test_space_to_depth() -> None:
    check("SpaceToDepth", [randf(2, 3, 4, 6)], opset=13, blocksize=2)
    check("SpaceToDepth", [randf(1, 2, 6, 3)], opset=1, blocksize=3)


RESIZE_TRANSFORMS = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"]


@pytest.mark.parametrize("transform", RESIZE_TRANSFORMS)
@pytest.mark.parametrize(
    "nearest_mode", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
)
@pytest.mark.parametrize("scales", [(1, 1, 2, 2), (1, 1, 3, 1.5), (1, 1, 0.5, 0.75)])
def test_resize_nearest(transform: str, nearest_mode: str, scales: tuple[float, ...]) -> None:
    """Nearest Resize with constant scales, every transform and rounding (opset 13)."""
    x = randf(2, 3, 4, 4)
    check(
        "Resize",
        [x, Init(np.array([], np.float32)), Init(np.array(scales, np.float32))],
        opset=13,
        mode="nearest",
        coordinate_transformation_mode=transform,
        nearest_mode=nearest_mode,
    )


@pytest.mark.parametrize("transform", RESIZE_TRANSFORMS)
@pytest.mark.parametrize("scales", [(1, 1, 2, 2), (1, 1, 3, 1.5), (1, 1, 0.5, 0.75)])
@pytest.mark.parametrize("opset", [11, 19])
def test_resize_linear(transform: str, scales: tuple[float, ...], opset: int) -> None:
    """Bilinear Resize on NCHW with constant scales."""
    x = randf(1, 2, 4, 5)
    check(
        "Resize",
        [x, Init(np.array([], np.float32)), Init(np.array(scales, np.float32))],
        opset=opset,
        mode="linear",
        coordinate_transformation_mode=transform,
    )


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_sizes(mode: str) -> None:
    """Resize to constant sizes (the scales ONNX Runtime derives from them)."""
    x = randf(1, 2, 3, 5)
    sizes = Init(np.array([1, 2, 7, 4], np.int64))
    check("Resize", [x, None, None, sizes], opset=13, mode=mode)


def test_resize_10_and_upsample() -> None:
    """Resize-10 and Upsample: asymmetric nearest (and linear) upsampling."""
    x = randf(1, 2, 3, 4)
    scales = np.array([1, 1, 2, 3], np.float32)
    check("Resize", [x, Init(scales)], opset=10)
    check("Resize", [x, Init(scales)], opset=10, mode="linear")
    check("Upsample", [x, Init(scales)], opset=9)
    check("Upsample", [x], opset=7, scales=[1.0, 1.0, 2.0, 2.0])
    check("Upsample", [x], opset=8, scales=[1.0, 1.0, 3.0, 2.0], mode="nearest")


@st.composite
def conv_transpose_cases(draw: st.DrawFn) -> dict[str, Any]:
    spatial = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2]))
    c = group * draw(st.integers(1, 2))
    m_per = draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(spatial)]
    strides = [draw(st.integers(1, 3)) for _ in range(spatial)]
    dilations = [draw(st.integers(1, 2)) for _ in range(spatial)]
    extra = [draw(st.integers(0, s - 1)) for s in strides]
    sizes = [draw(st.integers(1, 5)) for _ in range(spatial)]
    full = [(n - 1) * s + d * (k - 1) + 1 for n, s, d, k in zip(sizes, strides, dilations, kernel)]
    pads = [draw(st.integers(0, max(0, (f - 1) // 2))) for f in full] * 2
    return {
        "x": (1, c, *sizes),
        "w": (c, m_per, *kernel),
        "bias": draw(st.booleans()),
        "attrs": {
            "strides": strides,
            "dilations": dilations,
            "pads": pads,
            "output_padding": extra,
            "group": group,
        },
    }


@FAST
@given(case=conv_transpose_cases(), seed=st.integers(0, 2**16))
def test_conv_transpose(case: dict[str, Any], seed: int) -> None:
    """ConvTranspose: strides, pads, output_padding, groups, dilations, with and without bias."""
    w = randf(*case["w"], seed=seed + 1)
    inputs: list[Operand] = [randf(*case["x"], seed=seed), Init(w)]
    if case["bias"]:
        inputs.append(Init(randf(w.shape[1] * case["attrs"]["group"], seed=seed + 2)))
    check("ConvTranspose", inputs, opset=11, **case["attrs"])


@pytest.mark.parametrize(
    "attrs",
    [
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
        {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
        {"output_shape": [7, 8], "strides": [2, 2]},
        {"output_shape": [6, 7], "strides": [2, 2]},
        {"auto_pad": "SAME_UPPER", "strides": [3, 1]},
        {"auto_pad": "VALID", "strides": [1, 2]},
    ],
)
def test_conv_transpose_output_shape_and_auto_pad(attrs: dict[str, Any]) -> None:
    check("ConvTranspose", [randf(1, 2, 3, 4), Init(randf(2, 3, 3, 2, seed=1))], opset=1, **attrs)


@pytest.mark.parametrize(
    ("op", "inputs", "opset", "attrs"),
    [
        ("PRelu", [randf(2, 3, 4), Init(randf(3, 1, seed=1))], 16, {}),
        ("Min", [randf(2, 3), randf(3, seed=1)], 13, {}),
        ("Max", [randf(2, 3), randf(3, seed=1)], 13, {}),
        ("Softplus", [randf(3, 9, low=-30, high=30)], 13, {}),
        ("Mish", [randf(3, 9, low=-30, high=30)], 18, {}),
        (
            "Resize",
            [randf(1, 2, 4, 5), None, Init(np.array([1, 1, 1.5, 0.6], np.float32))],
            13,
            {"mode": "linear"},
        ),
        (
            "Resize",
            [randf(1, 2, 4, 5), None, Init(np.array([1, 1, 2, 3], np.float32))],
            13,
            {"mode": "nearest", "coordinate_transformation_mode": "asymmetric"},
        ),
        (
            "ConvTranspose",
            [randf(1, 4, 3, 5), Init(randf(4, 3, 3, 2, seed=1)), Init(randf(6, seed=2))],
            11,
            {"strides": [2, 3], "pads": [1, 0, 0, 1], "output_padding": [1, 2], "group": 2},
        ),
    ],
)
def test_torch_semantics_of_the_added_ops_match_the_reference(
    op: str, inputs: list[Operand], opset: int, attrs: dict[str, Any]
) -> None:
    """The torch rules (for the sensitivity's autograd) compute what the numpy oracle does."""
    torch = pytest.importorskip("torch")
    from intq.semantics.torch_eval import run_torch

    model, feeds = make_model(op, inputs, opset=opset, **attrs)
    graph = intq.from_onnx(model)
    want = intq.compile(graph, target="reference").run(feeds)["out0"]
    got = run_torch(graph, {k: torch.from_numpy(v) for k, v in feeds.items()})["out0"]
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-5)


def _import(model: onnx.ModelProto) -> None:
    intq.from_onnx(model)


def test_unsupported_op_names_node_and_lists_supported() -> None:
    """An op intq lacks raises UnsupportedOpError naming the node and op, listing what works."""
    assert "Det" not in CONVERTERS
    model, _ = make_model("Det", [randf(2, 3, 3)], opset=14, name="my_det")
    with pytest.raises(intq.UnsupportedOpError) as info:
        _import(model)
    err = info.value
    assert err.node == "my_det"
    assert "my_det" in str(err) and "Det" in str(err)
    assert err.hint is not None
    for entry in supported_ops():
        assert entry in err.hint
    assert "Conv (1-22)" in err.hint


def test_unsupported_domain() -> None:
    """An op from another domain (com.microsoft) is refused, naming the node and the domain."""
    model, _ = make_model(
        "FastGelu", [randf(2, 3)], opset=13, domain="com.microsoft", name="ms_gelu"
    )
    with pytest.raises(intq.UnsupportedOpError) as info:
        _import(model)
    text = str(info.value)
    assert "ms_gelu" in text and "FastGelu" in text and "com.microsoft" in text


def test_unsupported_opset_of_supported_op() -> None:
    """A known op at an opset no converter covers (Gelu before 20 does not exist) is refused."""
    model, _ = make_model("Gelu", [randf(2, 3)], opset=17, name="early_gelu")
    with pytest.raises(intq.UnsupportedOpError, match="early_gelu"):
        _import(model)


@pytest.mark.parametrize(
    ("op", "inputs", "outputs", "attrs"),
    [
        ("Dropout", [randf(2, 3), Init(np.array(0.5, np.float32)), Init(np.array(True))], 1, {}),
        ("Dropout", [randf(2, 3)], 2, {}),
        ("MaxPool", [randf(1, 1, 4, 4)], 2, {"kernel_shape": [2, 2]}),
        ("AveragePool", [randf(1, 1, 5, 5)], 1, {"kernel_shape": [2, 2], "dilations": [2, 2]}),
        ("Pad", [randf(3, 4), Init(np.array([1, 1, 1, 1], np.int64))], 1, {"mode": "wrap"}),
    ],
)
def test_unsupported_features(
    op: str, inputs: list[Operand], outputs: int, attrs: dict[str, Any]
) -> None:
    """Features of supported ops that intq refuses (training outputs, wrap padding...)."""
    model, _ = make_model(op, inputs, opset=19, outputs=outputs, name="feature_node", **attrs)
    with pytest.raises(intq.UnsupportedOpError, match="feature_node"):
        _import(model)


# ----- Einsum ----------------------------------------------------------------------------

EINSUM_CASES = [
    ("bhlk,bhtk->bhlt", [(2, 3, 4, 5), (2, 3, 6, 5)]),  # attention's Q K^T
    ("bhlt,bhtv->bhlv", [(2, 3, 4, 6), (2, 3, 6, 5)]),  # and P V
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("ij,kj->ki", [(3, 4), (5, 4)]),
    ("bij,jk->bik", [(2, 3, 4), (4, 5)]),
    ("abc,cd->dba", [(2, 3, 4), (4, 5)]),
    ("ijk,jl->il", [(2, 3, 4), (3, 5)]),  # k summed out of one operand first
    ("bij,bjk->ik", [(2, 3, 4), (2, 4, 5)]),  # a batch label contracted
    ("bk,bk->b", [(3, 4), (3, 4)]),
    ("ij,ij->", [(3, 4), (3, 4)]),
    ("i,j->ij", [(3,), (4,)]),
    ("bhwc,bhcd->bhdw", [(1, 2, 3, 4), (1, 2, 4, 5)]),
    ("bhlk,bhtk->bhlt", [(2, 1, 4, 5), (2, 3, 6, 5)]),  # a batch dim broadcast
    ("...ij,...jk->...ik", [(2, 3, 4), (2, 4, 5)]),
    ("bxij,bjk", [(2, 3, 4, 5), (2, 5, 6)]),  # implicit output: labels used once, sorted
    ("ij->ji", [(3, 4)]),
    ("bij->bj", [(2, 3, 4)]),
    ("bij->", [(2, 3, 4)]),
    ("ij->ij", [(3, 4)]),
]


@pytest.mark.parametrize(("equation", "shapes"), EINSUM_CASES)
def test_einsum(equation: str, shapes: list[tuple[int, ...]]) -> None:
    """Transpose, Reshape, MatMul and ReduceSum compute what ONNX Runtime's Einsum does."""
    inputs = [randf(*shape, seed=i) for i, shape in enumerate(shapes)]
    check("Einsum", inputs, opset=12, equation=equation)


@pytest.mark.parametrize("constant", [0, 1])
def test_einsum_constant_operand_is_a_weight(constant: int) -> None:
    """A constant operand without batch labels ends as MatMul's 2-D B (a QMatMul weight),
    whichever side of the equation it is on."""
    shapes = [(2, 3, 4), (4, 5)] if constant == 1 else [(4, 5), (2, 3, 4)]
    equation = "bij,jk->bik" if constant == 1 else "jk,bij->bki"
    inputs: list[Operand] = [randf(*s, seed=i) for i, s in enumerate(shapes)]
    inputs[constant] = Init(inputs[constant])  # type: ignore[arg-type]
    check("Einsum", inputs, opset=17, equation=equation)
    graph = intq.from_onnx(make_model("Einsum", inputs, opset=17, equation=equation)[0])
    (matmul,) = [n for n in graph.nodes if n.op == "MatMul"]
    assert matmul.inputs[1].const is not None and matmul.inputs[1].type.rank == 2


@pytest.mark.parametrize(
    ("equation", "shapes", "why"),
    [
        ("ii->i", [(3, 3)], "repeated within"),
        ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)], "3 operands"),
        ("ij,jk->ik", [(2, 3), (1, 4)], "contracted label 'j' has sizes 3 and 1"),
    ],
)
def test_einsum_unsupported(equation: str, shapes: list[tuple[int, ...]], why: str) -> None:
    """Diagonals, three operands and broadcast contractions are refused, naming the equation."""
    model, _ = make_model(
        "Einsum", [randf(*s) for s in shapes], opset=12, name="einsum_node", equation=equation
    )
    with pytest.raises(intq.UnsupportedOpError, match=why) as error:
        _import(model)
    assert equation in str(error.value) and "einsum_node" in str(error.value)


def test_opset_too_new() -> None:
    """A model newer than MAX_OPSET is refused with a hint to re-export."""
    model, _ = make_model("Relu", [randf(2)], opset=MAX_OPSET + 1)
    with pytest.raises(intq.UnsupportedOpError, match="opset"):
        _import(model)


# ----- running sums and element gathers (position ids) --------------------------------------------


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    axis_seed=st.integers(0, 5),
    exclusive=st.integers(0, 1),
    reverse=st.integers(0, 1),
    dtype=st.sampled_from([np.int32, np.int64, np.float32]),
    seed=st.integers(0, 2**16),
)
def test_cumsum_matches_onnxruntime(shape, axis_seed, exclusive, reverse, dtype, seed):
    """CumSum-11/14 along any axis (negative too), exclusive and reverse, ints and floats."""
    rank = len(shape)
    axis = axis_seed % (2 * rank) - rank
    x = randi(*shape, seed=seed, dtype=dtype) if dtype != np.float32 else randf(*shape, seed=seed)
    axis_const = Init(np.asarray(axis, np.int64))
    for opset in (11, 14):
        check("CumSum", [x, axis_const], opset=opset, exclusive=exclusive, reverse=reverse)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements_matches_onnxruntime(axis):
    """GatherElements-11/13: indices smaller than the data on the other axes, negative ones."""
    data = randf(4, 5, seed=3)
    size = data.shape[axis]
    shape = (2, 3) if axis == 0 else (3, 2)
    index = randi(*shape, seed=4, low=-size, high=size - 1)
    for opset in (11, 13):
        check("GatherElements", [data, index], opset=opset, axis=axis)


@pytest.mark.parametrize(
    ("image", "block", "attrs"),
    [
        ((4, 6), (2, 2), {"strides": [2, 2]}),  # patches that tile the image
        ((5, 5), (3, 3), {}),
        ((7, 6), (3, 2), {"strides": [2, 2], "pads": [1, 0, 1, 1], "dilations": [1, 2]}),
    ],
)
def test_col2im_matches_onnxruntime(image, block, attrs):
    """Col2Im-18: tiling blocks (a transpose) and overlapping, strided, padded, dilated ones."""
    strides, pads = attrs.get("strides", [1, 1]), attrs.get("pads", [0, 0, 0, 0])
    dilations = attrs.get("dilations", [1, 1])
    counts = [
        (image[i] + pads[i] + pads[i + 2] - dilations[i] * (block[i] - 1) - 1) // strides[i] + 1
        for i in range(2)
    ]
    x = randf(2, 3 * block[0] * block[1], counts[0] * counts[1], seed=7)
    operands = [x, Init(np.asarray(image, np.int64)), Init(np.asarray(block, np.int64))]
    check("Col2Im", operands, opset=18, **attrs)


def test_every_converter_is_exercised(request: pytest.FixtureRequest) -> None:
    """Every converter in CONVERTERS ran through :func:`check` (needs the whole module)."""
    here = sys.modules[__name__]
    selected = {
        getattr(item, "originalname", item.name)
        for item in request.session.items
        if getattr(item, "module", None) is here
    }
    if {name for name in dir(here) if name.startswith("test_")} - selected:
        pytest.skip("meaningful only when every test of this module runs")
    seen_ops = {op for op, _ in _EXERCISED}
    missing = sorted(set(CONVERTERS) - seen_ops)
    assert not missing, f"ops never compared against ORT: {missing}"
    for op, entries in CONVERTERS.items():
        for since, until, _ in entries:
            assert any(o == op and since <= v <= until for o, v in _EXERCISED), (
                f"{op}'s converter for opsets {since}-{until} never ran"
            )
