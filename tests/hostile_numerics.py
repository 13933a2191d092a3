"""Hostile numerics: values no calibration saw, constants that overflow, ranges too small.

Every case here is of the class "backends disagree": the reference interpreter, ONNX Runtime
and TVM must give the same bits, or all refuse alike (the same ``IntqError``, naming the
layer). The sources, drawn round-robin by :func:`cases`:

- ``codes``: textual IR ``Quantize -> [integer Clip] -> Dequantize`` of random width
  (2..16 bits), signedness, scale (normal float32 from 1e-30 to 1e30), rank (0..4) and
  clip bounds (inside, beyond the dtype, min > max, infinite, fractional), fed NaN, +-Inf,
  denormals, +-1e38, -0.0, negatives into unsigned inputs and exact half steps at random
  positions; the three backends against each other and against the documented contract
  (docs/numerics.md: NaN -> 0, saturation, round half to even).
- ``graphs``: random small CNNs (``tests/random_graphs.py``), quantized with random widths
  and calibration, fed such hostile arrays; reference and ONNX Runtime (and TVM in the
  long run, ``n > 12``, which also draws encoder layers with random kernel variants).
- ``overflow``: a quantized Gemm/MatMul/Conv as IR text whose bias is pushed to int32's
  ends, or whose output scale is made far finer than its accumulator's (an int64 product
  that overflows): every target must refuse, naming the layer; a harmless mutation must
  compile on every target.
- ``tiny``: models calibrated on data of magnitude 1e-6 .. 1e-38: refused naming the
  tensor when below what intq quantizes, never an all-zero integer output where the float
  model's is not.
- ``shapes``: rank-0 inputs through a quantized model, and ``QReduceSum`` over an axis of
  size 0 (sum or mean) in IR text: the backends agree, or all refuse.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hostile
import numpy as np
from hostile import Case

KIND = "backends disagree"
TARGETS = ("reference", "onnxruntime", "tvm")
_F32 = np.finfo(np.float32)


# ----- hostile values -------------------------------------------------------------------------


def hostile_array(
    gen: np.random.Generator, shape: tuple[int, ...], scale: float, step: float | None = None
) -> np.ndarray:
    """Gaussian data of magnitude ``scale`` with hostile values at random positions: NaN,
    +-Inf, +-1e38, float32's extremes, denormals, -0.0, large negatives (into an unsigned
    input) and, given the quantizer's ``step``, exact half steps (ties of the rounding)."""
    x = gen.standard_normal(shape) * scale
    pool = [
        np.nan,
        np.inf,
        -np.inf,
        1e38,
        -1e38,
        float(_F32.max),
        -float(_F32.max),
        1e-40,
        -1e-45,
        float(_F32.tiny),
        -0.0,
        -1000.0 * scale,
    ]
    if step is not None:
        pool += [(k + 0.5) * step for k in range(-4, 4)]
    size = int(np.prod(shape))
    if size:
        flat = x.reshape(-1)
        count = int(gen.integers(1, size + 1))
        where = gen.choice(size, count, replace=False)
        flat[where] = gen.choice(np.asarray(pool, np.float64), count)
    return np.asarray(x, np.float32)


def contract_codes(x: np.ndarray, scale: float, qmin: int, qmax: int) -> np.ndarray:
    """The documented input quantization, written out: NaN -> 0, else
    ``clamp(round_half_even(float32(x) / float32(scale)), qmin, qmax)``."""
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.rint(x.astype(np.float32) / np.float32(scale))
    return np.clip(np.where(np.isnan(q), 0, q), qmin, qmax).astype(np.int64)


# ----- running on every target ----------------------------------------------------------------


def _compile(graph: Any, target: str) -> Any:
    import intq

    options = {"threads": 1} if target == "onnxruntime" else {}
    return intq.compile(graph, target=target, **options)


def agree(graph: Any, feeds: list[dict[str, np.ndarray]], targets: tuple[str, ...], what: str):
    """Compile ``graph`` for every target and run each feed: the same bits as the reference,
    or every target refusing with the same message (re-raised: the case is REFUSED). Returns
    the reference's outputs."""
    import intq

    exes: dict[str, Any] = {}
    refusals: dict[str, intq.IntqError] = {}
    for target in targets:
        try:
            exes[target] = _compile(graph, target)
        except intq.IntqError as err:
            refusals[target] = err
    if refusals:
        messages = {str(err) for err in refusals.values()}
        if exes or len(messages) > 1:
            raise hostile.Disagreement(
                f"{what}: {', '.join(exes) or 'no target'} compiled, while "
                + "; ".join(f"{t} refused: {str(e).splitlines()[0]}" for t, e in refusals.items())
            )
        raise next(iter(refusals.values()))
    wants = []
    for index, feed in enumerate(feeds):
        results: dict[str, Any] = {}
        for target, exe in exes.items():
            try:
                results[target] = exe.run(feed)
            except intq.IntqError as err:
                results[target] = err
        errors = {t: r for t, r in results.items() if isinstance(r, intq.IntqError)}
        if errors:
            if len(errors) < len(results):
                raise hostile.Disagreement(
                    f"{what}, feed {index}: "
                    + "; ".join(f"{t} refused: {str(e).splitlines()[0]}" for t, e in errors.items())
                    + f"; {', '.join(t for t in results if t not in errors)} ran"
                )
            raise next(iter(errors.values()))
        want = results["reference"]
        for target, got in results.items():
            hostile.same_bits(got, want, f"{what} on {target}, feed {index}")
        wants.append(want)
    return wants


# ----- source 1: the input quantizer, alone or before an integer Clip -------------------------


def _clip_bounds_draw(rng: random.Random, qmin: int, qmax: int) -> tuple[float, float]:
    """Clip bounds in integer units: ordinary, beyond the dtype, crossed, infinite, fractional."""
    roll = rng.random()
    if roll < 0.25:  # min > max
        hi = rng.randint(qmin, qmax)
        return float(hi + rng.randint(1, 300)), float(hi)
    if roll < 0.4:  # both beyond one end of the range
        far = float(rng.choice([qmax + rng.randint(1, 10**6), qmin - rng.randint(1, 10**6)]))
        return (far, far + rng.randint(0, 10)) if far > 0 else (far - rng.randint(0, 10), far)
    if roll < 0.55:
        return -math.inf, float(rng.randint(qmin, qmax))
    if roll < 0.7:
        return float(rng.randint(qmin, qmax)), math.inf
    if roll < 0.8:  # no integer between the bounds
        k = rng.randint(qmin, qmax - 1)
        return k + 0.25, k + 0.75
    a, b = sorted(rng.randint(qmin, qmax) for _ in range(2))
    return float(a) + rng.choice([0.0, 0.5]), float(b) - rng.choice([0.0, 0.5])


def codes_text(rng: random.Random) -> tuple[str, tuple[int, ...], float]:
    """IR text of ``Quantize -> [Clip] -> Dequantize``; its input shape and the scale."""
    from intq.ir import DType, Graph, TensorType, to_text

    bits = rng.randint(2, 16)
    signed = rng.random() < 0.5
    scale = float(np.float32(10.0 ** rng.uniform(-30, 30)))
    rank = rng.randint(0, 4)
    shape = tuple(rng.randint(1, 5) for _ in range(rank))
    g = Graph("codes")
    dtype = rng.choice([DType.F32, DType.F32, DType.F16, DType.F64])
    x = g.add_input("x", TensorType(dtype, shape))
    q = g.op("Quantize", x, bits=bits, signed=int(signed), scale=scale, name="x.q")
    if rng.random() < 0.6:
        quant = q.type.quant
        lo, hi = _clip_bounds_draw(rng, quant.qmin, quant.qmax)
        q = g.op("Clip", q, min=lo, max=hi, name="clip")
    g.set_outputs([g.op("Dequantize", q, name="y")])
    return to_text(g), shape, scale


def run_codes(directory: Path, text: str, shape: tuple[int, ...], scale: float, seed: int):
    """The quantizer's codes on hostile values: every backend the same bits, and those bits
    the documented contract's."""
    from intq.ir import from_text

    graph = from_text(text)
    gen = np.random.default_rng(seed)
    dtype = graph.inputs[0].type.dtype.numpy  # f16 and f64 too: quantized from float32
    with np.errstate(over="ignore"):  # 1e38 is Inf in float16
        feeds = [{"x": hostile_array(gen, shape, scale * 50, scale).astype(dtype)} for _ in "abc"]
    wants = agree(graph, feeds, TARGETS, "Quantize on hostile values")
    quantize = next(n for n in graph if n.op == "Quantize")
    clip = next((n for n in graph if n.op == "Clip"), None)
    quant = quantize.output.type.quant
    for feed, want in zip(feeds, wants):
        codes = contract_codes(feed["x"], scale, quant.qmin, quant.qmax)
        if clip is not None:
            from intq.semantics.numerics import clip_bounds

            dtype = quantize.output.type.dtype.numpy
            lo, hi = clip_bounds(clip.attrs["min"], clip.attrs["max"], dtype)
            codes = np.minimum(np.maximum(codes, lo), hi)
        expected = codes.astype(np.float32) * np.float32(scale)
        hostile.same_bits(want, {"y": expected}, "the reference against docs/numerics.md")


# ----- source 2: random quantized CNNs on hostile inputs --------------------------------------


def run_graph(
    directory: Path, seed: int, options: dict[str, Any], transformer: bool, with_tvm: bool
):
    """A random small CNN (or encoder layer) quantized with ``options``, fed hostile arrays
    on every backend."""
    from random_graphs import random_model, random_transformer

    import intq

    model, shape, ops = (random_transformer if transformer else random_model)(seed)
    gen = np.random.default_rng(seed + 7)
    scale = 10.0 ** gen.uniform(-2, 2)
    non_negative = gen.random() < 0.4

    def sample() -> np.ndarray:
        x = gen.standard_normal(shape) * scale
        return (np.abs(x) if non_negative else x).astype(np.float32)

    config = intq.QuantConfig(progress=False, **options)
    graph = intq.quantize(intq.from_onnx(model), [{"x": sample()} for _ in range(2)], config)
    quantize = next(n for n in graph if n.op == "Quantize")
    step = float(quantize.attrs["scale"])
    feeds = [{"x": hostile_array(gen, shape, scale, step)} for _ in range(3)]
    targets = TARGETS if with_tvm else TARGETS[:2]
    agree(graph, feeds, targets, f"random graph {seed} ({' '.join(ops)}, {options})")


# ----- source 3: overflowing constants in IR text ---------------------------------------------


def _float_layer(gen: np.random.Generator, op: str, k: int) -> tuple[Any, tuple[int, ...]]:
    from onnx import TensorProto, helper, numpy_helper

    if op == "Conv":
        shape = (1, k, 3, 3)
        w = gen.standard_normal((2, k, 3, 3)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="layer", pads=[1, 1, 1, 1])
        out = (1, 2, 3, 3)
    elif op == "Gemm":
        shape = (2, k)
        w = gen.standard_normal((k, 3)).astype(np.float32)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="layer")
        out = (2, 3)
    else:
        shape = (2, k)
        w = gen.standard_normal((k, 3)).astype(np.float32)
        node = helper.make_node("MatMul", ["x", "w"], ["m"], name="layer")
        out = (2, 3)
    channels = out[1]
    bias = numpy_helper.from_array(gen.standard_normal(channels).astype(np.float32) * 0.1, "b")
    nodes = [node]
    if op == "MatMul":
        nodes.append(helper.make_node("Add", ["m", "b"], ["y"], name="bias"))
    nodes.append(helper.make_node("Relu", ["y"], ["r"], name="relu"))
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, out)],
        [numpy_helper.from_array(w, "w"), bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model, shape


_CONST = re.compile(r"^(\s*%(?P<name>\S+) = const (?P<type>\S+) .*?)\[(?P<data>[^\[\]]*)\]\s*$")
_REQUANTIZE = re.compile(r"multiplier=\[(?P<m>[^\]]*)\].*?shift=\[(?P<s>[^\]]*)\]")


def overflow_text(rng: random.Random) -> tuple[str, str, bool, tuple[int, ...]]:
    """A quantized layer as IR text, mutated: (text, the layer's label, whether it can
    overflow, the input shape). Mutations: the int32 bias pushed near int32's ends (with
    full-range weights), or the output scale made 2^55..2^70 finer (a left-shifting
    requantization whose int64 product overflows); a harmless one keeps a small bias or
    makes the output scale only 2^1..2^8 finer."""
    import intq
    from intq.ir import to_text
    from intq.semantics.numerics import dyadic

    gen = np.random.default_rng(rng.getrandbits(32))
    op = rng.choice(["Gemm", "MatMul", "Conv"])
    model, shape = _float_layer(gen, op, rng.randint(2, 64))
    data = [{"x": gen.standard_normal(shape).astype(np.float32)} for _ in range(2)]
    config = intq.QuantConfig(calibration="minmax", progress=False)
    graph = intq.quantize(intq.from_onnx(model), data, config)
    layer = next(n for n in graph if n.op in ("QGemm", "QMatMul", "QConv")).label()
    lines = to_text(graph).splitlines()
    mutation = rng.choice(["bias", "bias", "scale", "harmless", "finer"])
    for i, line in enumerate(lines):
        match = _CONST.match(line)
        if match and match["type"].startswith("i32") and mutation in ("bias", "harmless"):
            count = len(match["data"].split(","))
            if mutation == "bias":
                edge = (1 << 31) - 1 - rng.randint(0, 1000)
                values = [rng.choice([edge, -edge - 1]) for _ in range(count)]
            else:
                values = [rng.randint(-1000, 1000) for _ in range(count)]
            lines[i] = f"{match.group(1)}[{', '.join(map(str, values))}]"
        elif match and match["type"].startswith("i8") and mutation == "bias":
            count = len(match["data"].split(","))
            values = [rng.choice([127, -127]) for _ in range(count)]
            lines[i] = f"{match.group(1)}[{', '.join(map(str, values))}]"
    if mutation in ("scale", "finer"):  # the Requantize after the layer, made 2^k finer
        requantize = next(n for n in graph if n.op == "Requantize")
        i = next(i for i, line in enumerate(lines) if "Requantize(" in line)
        old = re.search(r" scale=([0-9.e+-]+)", lines[i])
        assert old is not None
        # 2^55 and more: |acc| >= 2^10 (127 codes by a weight of 8 or more) times M >= 2^30
        # times 2^(k-31) passes 2^63. 2^8 and less keeps a right shift: harmless.
        factor = 2.0 ** (rng.randint(55, 70) if mutation == "scale" else rng.randint(1, 8))
        new_scale = float(old[1]) / factor
        req = _REQUANTIZE.search(lines[i])
        assert req is not None
        pairs = [
            dyadic(int(m) * 2.0 ** -int(s) * factor)
            for m, s in zip(req["m"].split(","), req["s"].split(","))
        ]
        multipliers = ", ".join(str(d.multiplier) for d in pairs)
        shifts = ", ".join(str(d.shift) for d in pairs)
        line = re.sub(r"multiplier=\[[^\]]*\]", f"multiplier=[{multipliers}]", lines[i])
        lines[i] = re.sub(r"shift=\[[^\]]*\]", f"shift=[{shifts}]", line)
        text = "\n".join(lines).replace(f"scale={old[1]}", f"scale={new_scale!r}")
        return text, requantize.label(), mutation == "scale", shape
    return "\n".join(lines), layer, mutation == "bias", shape


def run_overflow(
    directory: Path, text: str, layer: str, overflows: bool, shape: tuple[int, ...], tvm: bool
):
    """Every target refuses the graph that can overflow, naming ``layer`` (the one gate), and
    compiles the harmless one alike."""
    import intq
    from intq.ir import from_text

    targets = TARGETS if (tvm or overflows) else TARGETS[:2]
    gen = np.random.default_rng(len(text))
    feeds = [{"x": hostile_array(gen, shape, 1.0)}]
    try:
        agree(from_text(text), feeds, targets, f"layer {layer}")
    except intq.NumericsError as err:
        if err.node != layer:
            message = f"the refusal names {err.node!r}, not {layer!r}: {err}"
            raise hostile.Disagreement(message) from None
        raise
    if overflows:
        raise hostile.Disagreement(f"layer {layer} can overflow int32 but every target compiled")


# ----- source 4: activations too small to quantize --------------------------------------------


def run_tiny(directory: Path, seed: int, exponent: float):
    """Calibration data of magnitude ``10^-exponent``: refused naming the tensor, or a model
    whose integer output is not all zero where the float one is not."""
    from onnx import numpy_helper

    import intq

    gen = np.random.default_rng(seed)
    model, shape = _float_layer(gen, str(gen.choice(["Gemm", "MatMul", "Conv"])), 4)
    for init in model.graph.initializer:  # no bias: the outputs are as tiny as the inputs
        if init.name == "b":
            init.CopyFrom(numpy_helper.from_array(np.zeros(init.dims, np.float32), "b"))
    magnitude = 10.0**-exponent
    data = [{"x": (gen.standard_normal(shape) * magnitude).astype(np.float32)} for _ in range(2)]
    config = intq.QuantConfig(calibration="minmax", progress=False)
    try:
        graph = intq.quantize(intq.from_onnx(model), data, config)
    except intq.NumericsError as err:
        if "below the smallest range" not in err.message or not err.node:
            raise hostile.Disagreement(f"refused without naming the tiny tensor: {err}") from None
        raise
    floats = intq.compile(intq.from_onnx(model)).run(data[0])
    ints = agree(graph, data[:1], TARGETS[:2], f"activations of 1e-{exponent:g}")[0]
    for name, value in floats.items():
        if np.any(value != 0) and not np.any(ints[name] != 0):
            raise hostile.Disagreement(
                f"activations of 1e-{exponent:g}: the integer output {name!r} is all zero,"
                f" the float one reaches {np.abs(value).max():g}"
            )


# ----- source 5: rank-0 inputs, reductions over empty axes ------------------------------------


def run_rank0(directory: Path, seed: int, tvm: bool):
    """A quantized model of a scalar input, fed hostile scalars."""
    from onnx import TensorProto, helper, numpy_helper

    import intq

    gen = np.random.default_rng(seed)
    c = numpy_helper.from_array(np.float32(gen.uniform(-3, 3)), "c")
    ops = [helper.make_node("Mul", ["x", "c"], ["m"], name="mul")]
    ops.append(helper.make_node(str(gen.choice(["Relu", "Sigmoid", "Abs"])), ["m"], ["y"]))
    graph = helper.make_graph(
        ops,
        "scalar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [c],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    data = [{"x": np.float32(gen.standard_normal())} for _ in range(3)]
    config = intq.QuantConfig(calibration="minmax", progress=False)
    quantized = intq.quantize(intq.from_onnx(model), data, config)
    feeds = [{"x": hostile_array(gen, (), 1.0)} for _ in range(4)]
    agree(quantized, feeds, TARGETS if tvm else TARGETS[:2], "a rank-0 input")


def empty_reduce_text(rng: random.Random) -> tuple[str, tuple[int, ...]]:
    """``Quantize -> QReduceSum`` over an axis of size 0 (sum or mean) ``-> Dequantize``."""
    from intq.ir import DType, Graph, TensorType, to_text

    shape = [rng.randint(1, 3) for _ in range(rng.randint(1, 3))]
    empty = rng.randrange(len(shape))
    shape[empty] = 0
    axes = sorted({empty, *(rng.randrange(len(shape)) for _ in range(rng.randint(0, 2)))})
    g = Graph("empty")
    x = g.add_input("x", TensorType(DType.F32, tuple(shape)))
    q = g.op("Quantize", x, bits=8, signed=1, scale=0.05, name="x.q")
    mean = int(rng.random() < 0.5)
    try:
        s = g.op("QReduceSum", q, axes=axes, keepdims=rng.randint(0, 1), mean=mean, name="sum")
    except Exception:  # a mean over nothing: refused when built; keep the sum (mean=0)
        s = g.op("QReduceSum", q, axes=axes, keepdims=0, mean=0, name="sum")
    g.set_outputs([g.op("Dequantize", s, name="y")])
    text = to_text(g)
    if mean and "mean=1" not in text:  # the text a hand-written file would hold
        text = text.replace("mean=0", "mean=1")
    return text, tuple(shape)


def run_empty_reduce(directory: Path, text: str, shape: tuple[int, ...], tvm: bool):
    """A reduction over no elements: the backends agree (0), or all refuse alike."""
    from intq.ir import from_text

    feeds = [{"x": np.zeros(shape, np.float32)}]
    agree(from_text(text), feeds, TARGETS if tvm else TARGETS[:2], "a reduction over no elements")


# ----- the source -----------------------------------------------------------------------------


def _codes_case(rng: random.Random, long: bool) -> Case:
    text, shape, scale = codes_text(rng)
    return Case(KIND, "quantizer codes", run_codes, (text, shape, scale, rng.getrandbits(32)))


def _graph_case(rng: random.Random, long: bool) -> Case:
    seed = rng.randrange(10**6)
    options: dict[str, Any] = {
        "weight_bits": rng.randint(4, 8),
        "activation_bits": rng.randint(4, 8),
        "calibration": rng.choice(["minmax", "percentile", "mse"]),
    }
    transformer = long and rng.random() < 0.25  # an encoder layer: seconds to quantize
    if transformer:
        from intq.semantics import kernels

        options["kernels"] = {
            "softmax": rng.choice(kernels.SOFTMAX_VARIANTS),
            "gelu": rng.choice(kernels.GELU_VARIANTS),
            "layernorm": rng.choice(kernels.LAYERNORM_VARIANTS),
        }
        options["wide_bits"] = rng.choice([8, 12, 16])
    what = "encoder layer" if transformer else "CNN"
    tvm = long and not transformer and rng.random() < 0.2  # an encoder's compile: > 30 s
    return Case(KIND, f"random {what} {seed}", run_graph, (seed, options, transformer, tvm))


def _overflow_case(rng: random.Random, long: bool) -> Case:
    text, layer, overflows, shape = overflow_text(rng)
    what = "overflowing" if overflows else "harmless"
    return Case(KIND, f"{what} IR constants", run_overflow, (text, layer, overflows, shape, long))


def _tiny_case(rng: random.Random, long: bool) -> Case:
    exponent = rng.choice([6.0, 7.5, 9.0, 12.0, 20.0, 29.0, 33.0, 36.0, 38.0])
    return Case(KIND, f"activations of 1e-{exponent:g}", run_tiny, (rng.randrange(10**6), exponent))


def _shapes_case(rng: random.Random, long: bool) -> Case:
    if rng.random() < 0.5:
        return Case(KIND, "rank-0 input", run_rank0, (rng.randrange(10**6), long))
    text, shape = empty_reduce_text(rng)
    return Case(KIND, f"reduction over {shape}", run_empty_reduce, (text, shape, long))


SOURCES: tuple[Callable[[random.Random, bool], Case], ...] = (
    _codes_case,
    _overflow_case,
    _graph_case,
    _tiny_case,
    _shapes_case,
    _codes_case,
)
"""Drawn in turn; the quantizer's codes twice, as they are the cheapest and most varied."""


def cases(rng: random.Random, n: int) -> Iterator[Case]:
    """``n`` numerics cases. TVM compiles only the tiny graphs (quantizer codes; the overflow
    gate, which refuses before compiling) unless ``n > 12``, when it also compiles some
    random CNNs, harmless layers, rank-0 models and empty reductions."""
    long = n > 12
    for i in range(n):
        yield SOURCES[i % len(SOURCES)](rng, long)
