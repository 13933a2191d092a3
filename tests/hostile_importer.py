"""Hostile inputs to the importer, the config reader and the command line (area ``importer``).

Four sources of cases, drawn in turn (see tests/hostile.py for the harness):

- **malformed models**: small real models (a CNN, an MLP, a token model) with one fault the
  strict import validation must refuse, injected at a random place
  (:func:`onnx_mutations.inject_fault`): a value defined twice, an input listed twice, an
  unknown dtype enum, a window attribute out of range, a name that is not UTF-8, external
  data behind a NUL byte, a 5,000-character name or a symlink loop. Accepting one is a
  failure; so is a refusal that names neither the node nor the tensor.
- **foreign exceptions**, models: the same models with 1-3 random structural mutations
  (:func:`onnx_mutations.mutate`); whatever imports is verified, quantized, run on the
  reference and ONNX Runtime (bit for bit the same) and saved to ``.onnx`` and ``.intq``.
- **foreign exceptions**, configs: random TOML documents giving each known key values of
  random wrong types, ranges, nesting depths and encodings; a refusal must name the file
  (and the key, when one key is wrong).
- **foreign exceptions**, the command line: random argument vectors per subcommand, a
  working command with 1-3 arguments swapped for hostile ones (odd paths, directories,
  empty files, files of the wrong kind, odd ``--input-shape`` strings, negative and huge
  numbers, unknown targets). Exit code 3 (internal error) fails the case, and so does a
  nonzero exit without a message on stderr.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import random
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import hostile
import numpy as np
import onnx
from hostile import Case
from onnx import TensorProto, helper, numpy_helper
from onnx_models import make_model
from onnx_mutations import FAULTS, SYMLINK_LOOP, RandomChooser, inject_fault, mutate

import intq
import intq.cli
import intq.config
from intq.passes.integer_only import census

MALFORMED = "malformed models"
FOREIGN = "foreign exceptions"


# ----- the models ---------------------------------------------------------------------------


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _cnn() -> onnx.ModelProto:
    """Conv, Relu, MaxPool, a SAME-padded strided Conv, AveragePool, Flatten, Gemm: integer
    to the end, so both backends must give the same bits."""
    rng = np.random.default_rng(1)
    w = lambda *shape: (rng.standard_normal(shape) * 0.3).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["image", "c1.w", "c1.b"], ["c1"], "/stem/conv", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], "/stem/relu"),
        helper.make_node(
            "MaxPool", ["r1"], ["p1"], "/stem/pool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node(
            "Conv", ["p1", "c2.w"], ["c2"], "/block/conv", strides=[2, 2], auto_pad="SAME_UPPER"
        ),
        helper.make_node("AveragePool", ["c2"], ["p2"], "/block/pool", kernel_shape=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["flat"], "/head/flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["probs"], "/head/fc", transB=1),
    ]
    inits = [
        _const("c1.w", w(4, 1, 3, 3)),
        _const("c1.b", w(4)),
        _const("c2.w", w(6, 4, 3, 3)),
        _const("fc.w", w(5, 6)),
        _const("fc.b", w(5)),
    ]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [2, 1, 8, 8])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, [2, 5])
    return make_model(nodes, [x], [y], inits)


def _mlp() -> onnx.ModelProto:
    """Reshape, MatMul, Add, Gelu-like Sigmoid/Mul, Concat, Transpose, ReduceMean, Cast."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Reshape", ["features", "shape"], ["rows"], "/in/reshape"),
        helper.make_node("MatMul", ["rows", "fc1.w"], ["h"], "/fc1/matmul"),
        helper.make_node("Add", ["h", "fc1.b"], ["hb"], "/fc1/add"),
        helper.make_node("Sigmoid", ["hb"], ["gate"], "/act/sigmoid"),
        helper.make_node("Mul", ["hb", "gate"], ["act"], "/act/mul"),
        helper.make_node("Concat", ["act", "rows"], ["both"], "/mix/concat", axis=1),
        helper.make_node("Transpose", ["both"], ["t"], "/mix/transpose", perm=[1, 0]),
        helper.make_node("ReduceMean", ["t"], ["mean"], "/mix/mean", axes=[0], keepdims=0),
        helper.make_node("Cast", ["mean"], ["out"], "/out/cast", to=TensorProto.FLOAT),
    ]
    inits = [
        _const("shape", np.array([3, 4], np.int64)),
        _const("fc1.w", rng.standard_normal((4, 6)).astype(np.float32)),
        _const("fc1.b", rng.standard_normal(6).astype(np.float32)),
    ]
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, [3, 2, 2])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [3])
    return make_model(nodes, [x], [y], inits, opset=13)


def _tokens() -> onnx.ModelProto:
    """Gather of int64 token ids, LayerNormalization, MatMul, Softmax, Slice."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], "/embed/gather"),
        helper.make_node(
            "LayerNormalization", ["emb", "ln.g", "ln.b"], ["norm"], "/embed/norm", axis=-1
        ),
        helper.make_node("MatMul", ["norm", "proj.w"], ["logits"], "/proj/matmul"),
        helper.make_node("Softmax", ["logits"], ["attn"], "/proj/softmax", axis=-1),
        helper.make_node("Slice", ["attn", "start", "end", "axis"], ["head"], "/out/slice"),
    ]
    inits = [
        _const("table", rng.standard_normal((10, 8)).astype(np.float32)),
        _const("ln.g", np.ones(8, np.float32)),
        _const("ln.b", np.zeros(8, np.float32)),
        _const("proj.w", rng.standard_normal((8, 8)).astype(np.float32)),
        _const("start", np.array([0], np.int64)),
        _const("end", np.array([4], np.int64)),
        _const("axis", np.array([-1], np.int64)),
    ]
    x = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])
    y = helper.make_tensor_value_info("head", TensorProto.FLOAT, [2, 5, 4])
    return make_model(nodes, [x], [y], inits, opset=17)


def _vision() -> onnx.ModelProto:
    """ConvTranspose, BatchNormalization, LeakyRelu, Resize, a reflecting Pad, Split,
    Concat, Transpose, Clip, Gather on an axis, ReduceMean: integer to the end."""
    rng = np.random.default_rng(4)
    w = lambda *shape: (rng.standard_normal(shape) * 0.3).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node(
            "ConvTranspose",
            ["pixels", "up.w"],
            ["up"],
            "/up/convt",
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            output_padding=[1, 1],
        ),
        helper.make_node(
            "BatchNormalization", ["up", "bn.s", "bn.b", "bn.m", "bn.v"], ["bn"], "/up/bn"
        ),
        helper.make_node("LeakyRelu", ["bn"], ["act"], "/up/act", alpha=0.1),
        helper.make_node("Resize", ["act", "", "scales"], ["down"], "/down/resize", mode="nearest"),
        helper.make_node("Pad", ["down", "pads"], ["padded"], "/down/pad", mode="reflect"),
        helper.make_node("Split", ["padded", "split"], ["a", "b"], "/mix/split", axis=1),
        helper.make_node("Concat", ["b", "a"], ["swapped"], "/mix/concat", axis=1),
        helper.make_node("Transpose", ["swapped"], ["nhwc"], "/mix/transpose", perm=[0, 2, 3, 1]),
        helper.make_node("Clip", ["nhwc", "lo", "hi"], ["clipped"], "/mix/clip"),
        helper.make_node("Gather", ["clipped", "rows"], ["picked"], "/out/gather", axis=1),
        helper.make_node("ReduceMean", ["picked"], ["pooled"], "/out/mean", axes=[2], keepdims=1),
    ]
    inits = [
        _const("up.w", w(2, 2, 3, 3)),
        _const("bn.s", np.abs(w(2)) + 0.5),
        _const("bn.b", w(2)),
        _const("bn.m", w(2)),
        _const("bn.v", np.abs(w(2)) + 0.5),
        _const("scales", np.array([1, 1, 0.5, 0.5], np.float32)),
        _const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
        _const("split", np.array([1, 1], np.int64)),
        _const("lo", np.array(-1.0, np.float32)),
        _const("hi", np.array(1.0, np.float32)),
        _const("rows", np.array([0, 2, 4], np.int64)),
    ]
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 2, 6, 6])
    y = helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 3, 1, 2])
    return make_model(nodes, [x], [y], inits, opset=13)


@functools.cache
def _qdq_bytes() -> bytes:
    """The CNN quantized by ONNX Runtime in QDQ format (per-channel int8 weights, symmetric
    int8 activations), as intq imports pre-quantized models."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(5)
            shape = (2, 1, 8, 8)
            self.batches = iter([{"image": rng.standard_normal(shape).astype(np.float32)}] * 2)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the model, once per call
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "cnn.onnx", Path(tmp) / "qdq.onnx"
        source.write_bytes(_cnn().SerializeToString())
        quantize_static(
            source,
            target,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": True},
        )
        root.setLevel(level)
        return target.read_bytes()


def _qdq() -> onnx.ModelProto:
    """QuantizeLinear/DequantizeLinear pairs around every Conv and Gemm of the CNN."""
    return onnx.load_from_string(_qdq_bytes())


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "cnn": _cnn,
    "mlp": _mlp,
    "tokens": _tokens,
    "vision": _vision,
    "qdq": _qdq,
}
"""The small real models every model case starts from, by name."""


def _feeds(graph: intq.ir.Graph, seed: int) -> dict[str, np.ndarray]:
    """Random inputs for ``graph``: normal floats, token ids within the table."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in graph.inputs:
        if v.type.dtype.is_float:
            feeds[v.name] = rng.standard_normal(v.type.shape).astype(v.type.dtype.numpy)
        else:
            feeds[v.name] = rng.integers(0, 10, v.type.shape).astype(v.type.dtype.numpy)
    return feeds


def _write_model(directory: Path, raw: bytes) -> Path:
    """``raw`` as ``model.onnx`` with what its external data may name: a real
    ``weights.bin`` and a symlink that points to itself."""
    (directory / "weights.bin").write_bytes(np.arange(64, dtype=np.uint8).tobytes())
    os.symlink(SYMLINK_LOOP, directory / SYMLINK_LOOP)
    path = directory / "model.onnx"
    path.write_bytes(raw)
    return path


# ----- malformed models: the strict validation refuses, naming the node or tensor -----------


def import_fault(directory: Path, raw: bytes, fault: str) -> None:
    """Import a model with one injected fault: it must be refused, naming where."""
    path = _write_model(directory, raw)
    try:
        graph = intq.from_onnx(path)
    except intq.IntqError as err:
        text = str(err)
        if err.node is None and not re.search(r"'[^']*'", text):
            raise AssertionError(f"{fault}: the refusal names no node or tensor: {text}") from None
        raise
    raise AssertionError(f"{fault}: accepted a malformed model ({len(graph.nodes)} nodes)")


# ----- foreign exceptions: mutated models, end to end --------------------------------------


WRAPPED = re.compile(r"failed with [A-Z]\w*(Error|Exception|Warning)\b")
"""How the pass manager words a foreign exception it wraps into a PassError: still a bug."""


@contextlib.contextmanager
def no_wrapped_foreign() -> Iterator[None]:
    """Let IntqErrors through, except a PassError wrapping a foreign exception (a bug the
    wrapper would otherwise count as a refusal)."""
    try:
        yield
    except intq.IntqError as err:
        if WRAPPED.search(err.message):
            raise AssertionError(f"a wrapped foreign exception: {err}") from err
        raise


def import_mutated(directory: Path, raw: bytes, seed: int) -> None:
    """Import a mutated model; whatever imports is quantized, run on two backends (the same
    bits) and saved."""
    with no_wrapped_foreign():
        _import_mutated(directory, raw, seed)


def _import_mutated(directory: Path, raw: bytes, seed: int) -> None:
    graph = intq.from_onnx(_write_model(directory, raw))
    intq.ir.verify(graph)
    if any(v.type.size > 1 << 16 for v in graph.inputs):
        return  # valid, but too large to run here in bounded time
    feeds = _feeds(graph, seed)
    intq.compile(graph).run(feeds)
    quantized = intq.quantize(graph, [feeds, _feeds(graph, seed + 1)], _QUIET)
    want = intq.compile(quantized).run(feeds)
    exe = intq.compile(quantized, target="onnxruntime", threads=1)
    got = exe.run(feeds)
    if not census(quantized).float_tail:  # float ops after the output dequantization may
        # round differently (exp in Softmax): the contract is on the integer graph
        hostile.same_bits(
            {k: np.ascontiguousarray(v) for k, v in got.items()},
            {k: np.ascontiguousarray(v) for k, v in want.items()},
            "onnxruntime vs reference",
        )
    exe.save(directory / "out.onnx")
    intq.compile(quantized).save(directory / "out.intq")


_QUIET = intq.QuantConfig(progress=False, calibration="minmax")


def _model_cases(rng: random.Random, index: int) -> Case:
    name = rng.choice(sorted(MODELS))
    model = MODELS[name]()
    choose = RandomChooser(rng)
    if index % 2 == 0:
        fault = rng.choice(FAULTS)
        return Case(
            MALFORMED, f"{name}: {fault}", import_fault, (inject_fault(model, choose, fault), fault)
        )
    kinds = [mutate(model, choose) for _ in range(rng.randint(1, 3))]
    if index % 4 == 1:  # the survey of intq inspect, the CLI's shape resolution, compile
        argv = rng.choice(
            [
                ["inspect", "model.onnx"],
                ["inspect", "model.onnx", "--ir"],
                ["inspect", "model.onnx", "--input-shape", "x=2"],
                ["compile", "model.onnx", "--calib", "calib.npz", "-o", "out.onnx"],
            ]
        )
        name = f"intq {' '.join(argv)} ({name} mutated: {', '.join(kinds)})"
        return Case(FOREIGN, name, run_cli, (argv, model.SerializeToString()))
    return Case(
        FOREIGN,
        f"{name} mutated: {', '.join(kinds)}",
        import_mutated,
        (model.SerializeToString(), index),
    )


# ----- foreign exceptions: TOML configs -----------------------------------------------------

_TOML_VALUES = [
    "0",
    "-1",
    "8",
    "4",
    "9223372036854775807",
    "-9223372036854775808",
    "nan",
    "inf",
    "-inf",
    "-0.0",
    "1e308",
    "2.5",
    "99.99",
    "5e-324",
    '"big"',
    '""',
    '"auto"',
    '"minmax"',
    '"hessian"',
    '"shift"',
    '"\\u0000"',
    '"' + "x" * 5000 + '"',
    '"é"',
    "true",
    "false",
    "[]",
    "[4, 8]",
    "[1, 2, 3]",
    '["a"]',
    "[[4]]",
    '[4, "8"]',
    "[4.0, 8.0]",
    "{}",
    "{ a = 1 }",
    '{ "/stem/conv" = 4 }',
    "1979-05-27T07:32:00Z",
    "07:32:00",
    "1979-05-27",
]
"""TOML values of every type, at and beyond the ranges the keys take."""

_TOML_KEYS: dict[str, list[str]] = {
    "": [
        "weight_bits",
        "activation_bits",
        "calibration",
        "percentile",
        "wide_bits",
        "bias_correction",
        "layer_bits",
        "kernels",
        "mixed_precision",
        "nope",
    ],
    "layer_bits": ["weights", "activations", "bits"],
    "kernels": ["softmax", "gelu", "layernorm", "conv"],
    "mixed_precision": [
        "size_mb",
        "bops",
        "latency_ms",
        "candidates",
        "sensitivity",
        "loss",
        "ties",
        "pin_first_last",
        "pins",
        "latency_table",
        "tol",
        "max_iterations",
        "seed",
        "report",
        "budget",
    ],
}
"""The keys of each config table (plus one unknown key each)."""

DEEP = 10_000
"""How deeply the nested configs nest."""


def _deep_value(rng: random.Random) -> str:
    """A value nested :data:`DEEP` levels: arrays, inline tables or both."""
    kind = rng.choice(["arrays", "tables", "mixed"])
    if kind == "arrays":
        return "[" * DEEP + "1" + "]" * DEEP
    if kind == "tables":
        return "{ a = " * DEEP + "1" + " }" * DEEP
    return "[{ a = " * (DEEP // 2) + "1" + " }]" * (DEEP // 2)


def toml_document(rng: random.Random) -> tuple[bytes, list[str]]:
    """A random config file (its bytes) and the keys it sets, each ``table.key``."""
    entries: list[tuple[str, str, str]] = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        table = rng.choice(sorted(_TOML_KEYS))
        key = rng.choice(_TOML_KEYS[table])
        roll = rng.random()
        if roll < 0.1:
            value = _deep_value(rng)
        elif roll < 0.15:  # a dotted key 10^4 deep: a table in a table in ...
            key, value = key + ".a" * DEEP, "1"
        else:
            value = rng.choice(_TOML_VALUES)
        entries.append((table, key, value))
    lines = [f"{k} = {v}" for t, k, v in entries if not t]
    for table in sorted({t for t, _, _ in entries if t}):
        header = f'{table}."/stem/conv"' if table == "layer_bits" else table
        lines.append(f"[{header}]")
        lines += [f"{k} = {v}" for t, k, v in entries if t == table]
    text = "\n".join(lines) + "\n"
    encoding = rng.choice(["utf-8"] * 6 + ["utf-16", "latin-1 byte", "bom", "nul", "cut"])
    if encoding == "utf-16":
        data = text.encode("utf-16")
    elif encoding == "latin-1 byte":
        data = text.encode().replace(b"=", b"= \xe9", 1)
    elif encoding == "bom":
        data = b"\xef\xbb\xbf" + text.encode()
    elif encoding == "nul":
        data = text.encode().replace(b"\n", b"\x00\n", 1)
    elif encoding == "cut":
        data = text.encode()[: rng.randint(0, len(text))]
    else:
        data = text.encode()
    return data, [f"{t}.{k}" if t else k for t, k, _ in entries]


def load_toml(directory: Path, data: bytes, keys: list[str]) -> None:
    """Read a random config: accepted, or refused naming the file (and the key, when the
    file parses and sets one key)."""
    path = directory / "cfg.toml"
    path.write_bytes(data)
    try:
        intq.config.load_config(path)
    except intq.IntqError as err:
        if "cfg.toml" not in str(err):
            raise AssertionError(f"the refusal does not name the file: {err}") from None
        whole_file = re.search(r"TOML|UTF-8|nest", err.message)
        field = keys[0].split(".")[-1].split(".")[0] if keys else ""
        if len(keys) == 1 and not whole_file and field and field not in err.message:
            raise AssertionError(f"the refusal does not name {field!r}: {err}") from None
        raise


def _toml_case(rng: random.Random, index: int) -> Case:
    data, keys = toml_document(rng)
    shown = ", ".join(k[:40] for k in keys)
    return Case(FOREIGN, f"config: {shown} ({len(data)} bytes)", load_toml, (data, keys))


# ----- foreign exceptions: the command line -------------------------------------------------


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@functools.cache
def cli_files() -> dict[str, bytes]:
    """The files every command-line case starts from: models, data, artifacts, and files of
    the wrong kind (built once in the parent process)."""
    rng = np.random.default_rng(0)
    cnn = _cnn()
    image = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    calib = rng.standard_normal((8, 1, 8, 8)).astype(np.float32)
    graph = intq.from_onnx(cnn)
    quantized = intq.quantize(graph, [{"image": calib[:2]}, {"image": calib[2:4]}], _QUIET)
    files = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        intq.compile(quantized).save(tmp / "model.intq")
        intq.compile(quantized, target="onnxruntime").save(tmp / "int8.onnx")
        files["model.intq"] = (tmp / "model.intq").read_bytes()
        files["int8.onnx"] = (tmp / "int8.onnx").read_bytes()
    other = make_model(
        [helper.make_node("Relu", ["image"], ["probs"], "/relu")],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 1, 4, 4])],
    )
    scalar = make_model(
        [helper.make_node("Relu", ["image"], ["probs"], "/relu")],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [])],
    )
    files.update(
        {
            "model.onnx": cnn.SerializeToString(),
            "mlp.onnx": _mlp().SerializeToString(),
            "other.onnx": other.SerializeToString(),
            "scalar.onnx": scalar.SerializeToString(),
            "calib.npz": _npz(image=calib),
            "scalar.npz": _npz(image=np.float32(1.5)),
            "in.npz": _npz(image=image),
            "wrong.npz": _npz(image=image.astype(np.float64), extra=image),
            "empty": b"",
            "empty.onnx": b"",
            "empty.npz": b"",
            "empty.intq": b"",
            "empty.toml": b"",
            "notes.txt": b"not a model\n",
            "latency.json": b'{"layers": {"/stem/conv": {"4": "fast"}}',
            "deep.json": b"[" * 100_000 + b"]" * 100_000,
            "counts.json": b'{"format": "intq-latency-table", "version": 1, "layers": {},'
            b' "batch": "x"}',
            "file.txt": b"a file, not a directory\n",
            "cfg.toml": b'weight_bits = 8\ncalibration = "minmax"\n',
        }
    )
    return files


_LONG = "l" * 300 + ".onnx"
"""A file name longer than any file system's limit (255 bytes)."""
_NOT_UTF8 = "\udcffmodel.onnx"
"""A file name that is not UTF-8, as Python spells argv bytes it cannot decode."""

_PATHS = [
    "model.onnx",
    "mlp.onnx",
    "other.onnx",
    "scalar.onnx",
    "model.intq",
    "int8.onnx",
    "empty.onnx",
    "empty.intq",
    "empty",
    "dir",
    "dir.onnx",
    "notes.txt",
    "calib.npz",
    "in.npz",
    "cfg.toml",
    "missing.onnx",
    "loop.onnx",
    _LONG,
    "file.txt/x.onnx",
    _NOT_UTF8,
    "",
    ".",
]
"""Paths a command may be given where it expects a file (created by :func:`run_cli`)."""

_OUTPUTS = [
    "out.onnx",
    "out.intq",
    "out.so",
    "out.tar",
    "out.png",
    "out.npz",
    "out",
    "out.ONNX",
    "dir",
    "dir.onnx",
    "nodir/sub/out.onnx",
    "file.txt/out.onnx",
    "l" * 300 + ".intq",
    "\udcffout.intq",
    "model.onnx",
]
"""Paths a command may be given to write."""

_SHAPES = [
    "image=2,1,8,8",
    "image=",
    "=2,1,8,8",
    "image=2,,8,8",
    "image=-1,1,8,8",
    "image=0,1,8,8",
    "image=99999999999,1,8,8",
    "image=1e3",
    "nope=2",
    "image=2,1,8,8=2",
    "image= 2,1,8,8",
    "image=٢,1,8,8",
    "image=" + ",".join(["1"] * 5000),
    "image=" + "9" * 5000,
]
"""``--input-shape`` strings, most of them wrong."""

_INTS = ["-1", "0", "3", "9", "64", str(2**70), "8.5", "x", ""]
_FLOATS = ["nan", "inf", "-inf", "-1", "0", "100", "1e400", "5e-324", "x"]
_BUDGETS = ["nan", "inf", "-1", "0", "1e-300", "1e300", "x"]

_FLAGS: dict[str, list[str]] = {
    "--calib": ["calib.npz", "in.npz", "scalar.npz", *_PATHS],
    "--config": ["cfg.toml", "empty.toml", *_PATHS],
    "--input-shape": _SHAPES,
    "--weight-bits": _INTS,
    "--activation-bits": _INTS,
    "--percentile": _FLOATS,
    "--calibration": ["mse", "percentile", "kl", "AUTO", ""],
    "--size-mb": _BUDGETS,
    "--bops": _BUDGETS,
    "--latency-ms": _BUDGETS,
    "--latency-table": ["latency.json", "deep.json", "counts.json", *_PATHS],
    "--sensitivity": ["direct", "nope"],
    "--mp-report": ["nodir/sub/mp", "dir", "file.txt/mp", "mp"],
    "--target": ["reference", "onnxruntime", "tvm", "cuda", "", "ONNXRUNTIME"],
    "--tvm-target": ["{", "[]", '{"kind": 5}', "nope", '{"kind": "llvm", "mcpu": "nope"}'],
    "--tune-trials": ["-1", "0", str(10**9)],
    "--tuning-db": ["dir", "notes.txt", "nodir/db"],
    "--inputs": ["in.npz", "calib.npz", "wrong.npz", "scalar.npz", *_PATHS],
    "--repeat": ["-1", "0", "1", "x"],
    "--warmup": ["-1", "0", "x"],
    "--top": ["-1", "0", str(10**12), "x"],
    "--fp32": ["model.onnx", "other.onnx", "mlp.onnx", "scalar.onnx", *_PATHS],
    "--rpc-tracker": ["", ":", "host", "h:-1", "h:99999", "127.0.0.1:1", "[::1]:1", "h:0x10"],
    "--rpc-key": ["k", ""],
    "--rpc-timeout": ["-1", "nan", "0", "inf", "0.5"],
    "-o": _OUTPUTS,
}
"""Each flag's hostile values."""

_QUANT_FLAGS = [
    "--calib",
    "--config",
    "--input-shape",
    "--weight-bits",
    "--activation-bits",
    "--percentile",
    "--calibration",
    "--size-mb",
    "--bops",
    "--latency-ms",
    "--latency-table",
    "--sensitivity",
    "--mp-report",
    "-o",
]

COMMANDS: dict[str, tuple[list[str], list[str]]] = {
    "compile": (
        ["model.onnx", "--calib", "calib.npz", "-o", "out.onnx", "--calibration", "minmax"],
        [*_QUANT_FLAGS, "--target", "--tvm-target", "--tune-trials", "--tuning-db"],
    ),
    "quantize": (
        ["model.onnx", "--calib", "calib.npz", "-o", "out.intq", "--calibration", "minmax"],
        _QUANT_FLAGS,
    ),
    "run": (["model.intq", "--inputs", "in.npz", "-o", "out.npz"], ["--inputs", "-o"]),
    "vectors": (["model.intq", "--inputs", "in.npz", "-o", "vec"], ["--inputs", "-o"]),
    "inspect": (["model.onnx"], ["--input-shape"]),
    "bench": (
        ["int8.onnx", "--repeat", "2", "--warmup", "1"],
        [
            "--fp32",
            "--inputs",
            "--repeat",
            "--warmup",
            "--top",
            "--rpc-tracker",
            "--rpc-key",
            "--rpc-timeout",
        ],
    ),
    "report": (
        ["model.onnx", "--calib", "calib.npz", "-o", "report.png", "--calibration", "minmax"],
        [*_QUANT_FLAGS, "--top"],
    ),
}
"""Each subcommand: a working argument vector, and the flags a case may change or add."""


def cli_argv(rng: random.Random) -> list[str]:
    """A working command with 1-3 of its arguments swapped for hostile ones."""
    command = rng.choice(sorted(COMMANDS))
    base, flags = COMMANDS[command]
    argv = [command, *base]
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.25:  # the positional file
            argv[1] = rng.choice(_PATHS)
        elif roll < 0.3:
            argv.append(
                rng.choice(["--ir", "--quiet", "--profile", "--force", "--bias-correction"])
            )
        else:
            flag = rng.choice(flags)
            value = rng.choice(_FLAGS[flag])
            if flag in argv and flag != "--input-shape":
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
    if "--target" in argv and argv[argv.index("--target") + 1] == "tvm":
        # A TVM build takes longer than a case may: keep only the ones refused before it.
        if "--tvm-target" not in argv:
            argv += ["--tvm-target", rng.choice(_FLAGS["--tvm-target"])]
    if "--rpc-tracker" in argv and "--rpc-key" not in argv:
        argv += ["--rpc-key", "k"]
    return argv


def _prepare(directory: Path) -> None:
    for name, data in cli_files().items():
        (directory / name).write_bytes(data)
    for name in ("dir", "dir.onnx"):
        (directory / name).mkdir()
    (directory / _NOT_UTF8).write_bytes(cli_files()["model.onnx"])
    os.symlink("loop.onnx", directory / "loop.onnx")


def run_cli(
    directory: Path, argv: list[str], model: bytes | None = None, config: bytes | None = None
) -> None:
    """``intq ARGV`` in ``directory`` (its files from :func:`cli_files`, ``model`` as
    ``model.onnx`` when given): exit code 3, a wrapped foreign exception, or a nonzero exit
    without a message fails the case; 1 and 2 count as refusals."""
    _prepare(directory)
    if model is not None:
        (directory / "model.onnx").write_bytes(model)
    if config is not None:
        (directory / "cfg.toml").write_bytes(config)
    # As a terminal in a UTF-8 locale: text that UTF-8 cannot encode fails to print.
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace")
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = intq.cli.main(argv)
            except SystemExit as exit:  # argparse: bad usage, or --help
                code = exit.code if isinstance(exit.code, int) else 2
    finally:
        os.chdir(cwd)
    err.flush()
    stderr = err.buffer.getvalue().decode("utf-8", "replace").strip()  # type: ignore[attr-defined]
    if code == 3:
        raise AssertionError(f"exit 3 (internal error):\n{stderr[-3000:]}")
    if code not in (0, 1, 2):
        raise AssertionError(f"exit {code}:\n{stderr[-3000:]}")
    if code and not stderr:
        raise AssertionError(f"exit {code} without a message")
    if WRAPPED.search(stderr):
        raise AssertionError(f"a wrapped foreign exception:\n{stderr[-3000:]}")
    if code:
        raise intq.IntqError(f"exit {code}: {stderr.splitlines()[-1]}")


def _cli_case(rng: random.Random, index: int) -> Case:
    argv = cli_argv(rng)
    shown = " ".join(a if len(a) < 40 else a[:20] + f"...({len(a)})" for a in argv)
    config = None
    if "cfg.toml" in argv and rng.random() < 0.5:  # a random config file, as --config
        config, keys = toml_document(rng)
        shown += f" (cfg.toml: {', '.join(k[:30] for k in keys)})"
    return Case(FOREIGN, f"intq {shown}", run_cli, (argv, None, config))


# ----- the source ---------------------------------------------------------------------------

_SOURCES = [_model_cases, _cli_case, _toml_case, _model_cases, _cli_case]
"""Drawn in turn: models (faults and mutations alternate; every other mutated model goes
through ``intq inspect``), the command line, configs."""


def cases(rng: random.Random, n: int) -> Iterator[Case]:
    """``n`` hostile cases of the importer area, drawn with ``rng``."""
    drawn: Counter[Callable[..., Case]] = Counter()  # each source numbers its own cases
    for index in range(n):
        source = _SOURCES[index % len(_SOURCES)]
        yield source(rng, drawn[source])
        drawn[source] += 1
