"""Hostile inputs against intq's limits: hangs, memory blowups, and .npz/.npy data files.

Each generator draws varied cases with ``rng``:

- **hangs**: zero-size dimensions in random positions of a model's declared input shape, of
  ``input_shapes`` / ``--input-shape``, and of calibration batches (a batch of 0 samples
  never fills); graphs of one wide Concat with random fan-out (the importer, the IR printer,
  the parser and the verifier must be linear in graph size); integers of thousands of digits
  in IR text, artifact headers, ``--input-shape`` and ``.npy`` headers.
- **memory**: ConstantOfShape / Expand / Pad / Reshape to shapes of 2^34..2^44 bytes, as ONNX
  models, as IR text whose declared types tell the truth or hide the size, compiled and run
  on every backend; archives whose headers declare more than their data, zip bombs.
- **malformed models** (data files): truncated, mutated, non-zip and ``.npy`` archives, object
  arrays, odd dtypes, duplicate and foreign members, given as calibration data to
  ``intq.convert`` and to the CLI's ``--calib`` and ``--inputs``.

A case ends OK or REFUSED; where the input is invalid by definition (a zero-size input, a
header that lies) a case that is not refused raises, which the harness counts as FOREIGN.
CLI cases run ``intq.cli.main`` in the child: exit 3 (an internal error) is FOREIGN, exit 1
or 2 with a message is a refusal.
"""

from __future__ import annotations

import contextlib
import io
import random
import struct
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from hostile import Case

BUDGET_SECONDS = 20.0
"""A big-graph case must finish its import, print, parse and verify in this long (the
harness's limit is 30 s; the figures in docs/security.md are a few seconds at full size)."""


class NotRefused(AssertionError):
    """An input that must be refused was accepted (counted as FOREIGN by the harness)."""


# ----- building blocks ----------------------------------------------------------------------


def _conv_model(shape: list[int | str], cout: int = 2):
    """y = Relu(Conv3x3(x)) for an input ``x`` of ``shape`` (NCHW; names are symbolic)."""
    from onnx import TensorProto, helper, numpy_helper

    cin = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else 1
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((cout, cin, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _cli(*argv: str) -> None:
    """Run the intq command in this process: exit 0 returns, exit 1 or 2 is a refusal, and
    anything else (3: an internal error) raises with what it printed."""
    import intq
    from intq.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code if isinstance(exit_.code, int) else 2
    text = err.getvalue().strip()
    if code == 0:
        return
    if code in (1, 2) and text:
        errors = [line for line in text.splitlines() if "error:" in line]
        raise intq.IntqError((errors or text.splitlines())[0])
    raise AssertionError(f"intq {' '.join(argv)[:200]} exited {code}:\n{text[-1500:]}")


def _refused(action, *what: str) -> None:
    """Run ``action``; it must raise an IntqError (which propagates, as the refusal)."""
    import intq

    try:
        action()
    except intq.IntqError:
        raise
    raise NotRefused(f"accepted: {' '.join(what)}")


def _zero_shape(rng: random.Random, rank: int = 4) -> list[int]:
    """An NCHW-like shape with zeros in random positions (at least one)."""
    shape = [rng.choice([1, 2, 3]), rng.choice([1, 3]), rng.randint(1, 6), rng.randint(1, 6)]
    for i in rng.sample(range(rank), rng.randint(1, rank)):
        shape[i] = 0
    return shape[:rank]


# ----- hangs: zero-size dimensions ---------------------------------------------------------


def zero_dims_declared(directory: Path, shape: list[int], form: str) -> None:
    """A model declaring a zero-size input dimension, converted with calibration data."""
    import intq

    model = _conv_model(shape)
    data = np.zeros(shape, np.float32)
    calibration = {"array": data, "list": [{"x": data}], "dict": {"x": data}}[form]
    _refused(lambda: intq.convert(model, calibration, target="reference"), "shape", str(shape))


def zero_dims_given(directory: Path, shape: list[int], form: str) -> None:
    """A symbolic model whose ``input_shapes`` (API) or ``--input-shape`` (CLI) has a zero."""
    import intq

    model = _conv_model(["N", 1, "H", "W"])
    calib = np.random.default_rng(0).standard_normal((4, 1, 5, 5)).astype(np.float32)
    if form == "api":
        _refused(
            lambda: intq.convert(model, calib, target="reference", input_shapes={"x": shape}),
            "input_shapes",
            str(shape),
        )
        return
    import onnx

    onnx.save(model, directory / "m.onnx")
    np.savez(directory / "c.npz", x=calib)
    dims = ",".join(map(str, shape))
    _refused(
        lambda: _cli(
            "compile", str(directory / "m.onnx"), "--calib", str(directory / "c.npz"),
            "--input-shape", f"x={dims}", "-o", str(directory / "o.intq"), "--quiet",
        ),
        "--input-shape",
        dims,
    )  # fmt: skip


def zero_dims_data(directory: Path, shape: list[int], form: str) -> None:
    """A symbolic model calibrated on data with zero-size dimensions (or zero samples)."""
    import intq

    model = _conv_model(["N", shape[1] or 1, "H", "W"])
    data = np.zeros(shape, np.float32)
    if form == "npz":
        np.savez(directory / "c.npz", x=data)
        calibration: object = directory / "c.npz"
    elif form == "cli":
        import onnx

        onnx.save(model, directory / "m.onnx")
        np.savez(directory / "c.npz", x=data)
        _refused(
            lambda: _cli(
                "compile", str(directory / "m.onnx"), "--calib", str(directory / "c.npz"),
                "-o", str(directory / "o.intq"), "--quiet",
            ),
            "calibration data",
            str(shape),
        )  # fmt: skip
        return
    else:
        calibration = {"array": data, "list": [{"x": data}]}[form]
    _refused(lambda: intq.convert(model, calibration, target="reference"), "data", str(shape))


def zero_dims_text(directory: Path, shape: list[int], target: str) -> None:
    """IR text whose input has zero-size dimensions: quantized (refused), and as an integer
    graph compiled and run (a result or a refusal, never a hang)."""
    import intq
    from intq.ir import from_text

    dims = ",".join(map(str, shape))
    float_text = f"graph g(%x: f32[{dims}]) {{\n  %y = Relu(%x) : f32[{dims}]\n  return %y\n}}"
    graph = from_text(float_text)
    data = [{"x": np.zeros(shape, np.float32)}]
    with contextlib.suppress(intq.IntqError):
        intq.quantize(graph, data)
        raise NotRefused(f"quantize accepted a zero-size input {shape}")
    q = "q(bits=8, signed, scale=0.1)"
    int_text = (
        f"graph g(%x: f32[{dims}]) {{\n"
        f"  %x.q = Quantize(%x) {{bits=8, scale=0.1, signed=1}} : i8[{dims}] {q}\n"
        f"  %y = Dequantize(%x.q) : f32[{dims}]\n  return %y\n}}"
    )
    exe = intq.compile(from_text(int_text), target=target)
    out = exe.run({"x": np.zeros(shape, np.float32)})
    if out["y"].shape != tuple(shape):
        raise AssertionError(f"{target} returned {out['y'].shape} for {shape}")


# ----- hangs: graph size --------------------------------------------------------------------


def _fan_model(n: int, sources: int, rng_seed: int):
    """A Concat of ``n`` inputs drawn from ``sources`` Relu outputs of one input (fan-out
    ``n / sources`` each, shuffled), so both a wide node and a value with many readers."""
    from onnx import TensorProto, helper

    rng = random.Random(rng_seed)
    nodes = [helper.make_node("Relu", ["x"], [f"r{i}"], name=f"relu{i}") for i in range(sources)]
    inputs = [f"r{rng.randrange(sources)}" for _ in range(n)] if sources > 1 else ["x"] * n
    nodes.append(helper.make_node("Concat", inputs, ["y"], axis=0, name="cat"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _timed(what: str, action):
    """``action()``, which must finish within :data:`BUDGET_SECONDS`."""
    start = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - start
    if seconds > BUDGET_SECONDS:
        raise AssertionError(f"{what} took {seconds:.1f} s")
    return result


def wide_graph(directory: Path, n: int, sources: int, seed: int, steps: str) -> None:
    """A Concat of ``n`` inputs from ``sources`` values imported, and for ``steps`` "all"
    also printed, parsed, verified and run on the reference: each in time linear in ``n``."""
    import intq
    from intq.ir import from_text, to_text, verify

    model = _fan_model(n, sources, seed)
    what = f"a Concat of {n} inputs from {sources} values"
    graph = _timed(f"importing {what}", lambda: intq.from_onnx(model))
    if steps == "import":
        return
    parsed = _timed(f"printing and parsing {what}", lambda: from_text(to_text(graph)))
    _timed(f"verifying {what}", lambda: verify(parsed))
    exe = intq.compile(parsed, target="reference")
    out = _timed(f"running {what}", lambda: exe.run({"x": np.ones((1, 2), np.float32)}))
    if out["y"].shape != (n, 2):
        raise AssertionError(f"Concat of {n} gave {out['y'].shape}")


def deep_graph(directory: Path, n: int, seed: int) -> None:
    """A chain of ``n`` nodes (Relu, Neg, Abs at random), each also read by a random earlier
    node's Add: imported, printed, parsed, verified and run, in time linear in ``n``."""
    from onnx import TensorProto, helper

    import intq
    from intq.ir import from_text, to_text, verify

    rng = random.Random(seed)
    nodes, names = [], ["x"]
    for i in range(n):
        if i % 7 == 6:  # an Add of the chain and a random earlier value: long-range uses
            inputs = [names[-1], names[rng.randrange(len(names))]]
            nodes.append(helper.make_node("Add", inputs, [f"v{i}"], name=f"add{i}"))
        else:
            op = rng.choice(["Relu", "Neg", "Abs"])
            nodes.append(helper.make_node(op, [names[-1]], [f"v{i}"], name=f"{op}{i}"))
        names.append(f"v{i}")
    nodes.append(helper.make_node("Identity", [names[-1]], ["y"], name="out"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    what = f"a chain of {n} nodes"
    graph = _timed(f"importing {what}", lambda: intq.from_onnx(model))
    parsed = _timed(f"printing and parsing {what}", lambda: from_text(to_text(graph)))
    _timed(f"verifying {what}", lambda: verify(parsed))
    exe = intq.compile(parsed, target="reference")
    _timed(f"running {what}", lambda: exe.run({"x": np.ones((1, 2), np.float32)}))


def wide_text(directory: Path, n: int, sources: int, seed: int) -> None:
    """IR text of a Concat of ``n`` operands (from ``sources`` values) parsed and verified."""
    from intq.ir import from_text, verify

    rng = random.Random(seed)
    lines = ["graph g(%x: f32[1,2]) {"]
    lines += [f'  %r{i} = Relu(%x) : f32[1,2] @"relu{i}"' for i in range(sources)]
    operands = ", ".join(f"%r{rng.randrange(sources)}" for _ in range(n))
    lines += [f"  %y = Concat({operands}) {{axis=0}} : f32[{n},2]", "  return %y", "}"]
    text = "\n".join(lines)
    graph = _timed(f"parsing a Concat of {n} operands", lambda: from_text(text))
    _timed(f"verifying a Concat of {n} operands", lambda: verify(graph))


# ----- hangs: integers of thousands of digits --------------------------------------------------


def long_integer(directory: Path, where: str, digits: int, seed: int) -> None:
    """An integer of ``digits`` digits where intq reads one (or, for ``blanks`` and
    ``comments``, that many blank lines or comments before a bad character): must be refused
    cleanly and quickly."""
    import intq
    from intq.ir import from_text

    big = str(random.Random(seed).randint(1, 9)) + "7" * (digits - 1)
    q = "q(bits=8, signed, scale=0.1)"
    texts = {
        "shape": f"graph g(%x: f32[1,{big}]) {{\n  return %x\n}}",
        "attribute": "graph g(%x: f32[1,4]) {\n"
        f"  %y = Flatten(%x) {{axis={big}}} : f32[1,4]\n  return %y\n}}",
        "constant": "graph g(%x: i32[2]) {\n"
        f"  %c = const i32[2] [1, {big}]\n  %y = Add(%x, %c) : i32[2]\n  return %y\n}}",
        "quant": f"graph g(%x: f32[2]) {{\n  %x.q = Quantize(%x) {{bits=8, scale=0.1, signed=1}}"
        f" : i8[2] q(bits={big}, signed, scale=0.1)\n  %y = Dequantize(%x.q) : f32[2]\n"
        "  return %y\n}",
        "quant_axis": f"graph g(%x: f32[2]) {{\n  %x.q = Quantize(%x) {{bits=8, scale=0.1,"
        f" signed=1}} : i8[2] {q.replace('signed,', f'signed, axis={big},')}\n"
        "  return %x\n}",
    }
    texts["blanks"] = "graph g(%x: f32[1]) {" + " \n\t" * digits + "@"  # bad after blanks
    texts["comments"] = "graph g(%x: f32[1]) {" + "# #\n" * digits + "@"
    if where in texts:
        _refused(lambda: from_text(texts[where]), where, f"{digits} digits")
    elif where == "header":
        from intq.artifacts import seal_text

        sealed = seal_text("graph g(%x: f32[1]) {\n  return %x\n}")
        path = directory / "m.intq"
        path.write_bytes(sealed.replace(b"format=1 ", f"format={big} ".encode(), 1))
        _refused(lambda: intq.load(path), "header", f"{digits} digits")
    elif where == "cli":
        import onnx

        onnx.save(_conv_model(["N", 1, 4, 4]), directory / "m.onnx")
        _refused(
            lambda: _cli("inspect", str(directory / "m.onnx"), "--input-shape", f"x={big},1,4,4"),
            "--input-shape",
            f"{digits} digits",
        )
    elif where == "npy_header":
        path = directory / "c.npz"
        _write_npz(path, {"x": _npy_bytes(f"({big}, 1, 4, 4)", "<f4", b"")})
        _refused(lambda: _convert(path), "npy header", f"{digits} digits")
    else:
        raise ValueError(where)


def long_list(directory: Path, where: str, count: int) -> None:
    """IR text with a list of ``count`` items where intq reads one: a constant's values, an
    attribute, a shape (a rank of thousands), a per-channel scale list. Refused (or, when
    small enough, parsed) in memory bounded well below the harness's limit."""
    from intq.ir import from_text

    items = ", ".join(["1"] * count)
    texts = {
        "constant": f"graph g(%x: i8[{count}]) {{\n  %c = const i8[{count}] [{items}]\n"
        "  return %c\n}",
        "attribute": "graph g(%x: f32[1]) {\n"
        f"  %y = Reshape(%x) {{shape=[{items}]}} : f32[1]\n  return %y\n}}",
        "rank": f"graph g(%x: f32[{items}]) {{\n  return %x\n}}",
        "scales": f"graph g(%x: f32[{count}]) {{\n  %x.q = Quantize(%x) {{bits=8, scale=0.1,"
        f" signed=1}} : i8[{count}] q(bits=8, signed, axis=0, scale=[{items}])\n"
        "  return %x\n}",
    }
    if (
        count > 1 << 20
        or (where == "rank" and count > 64)
        or (where == "constant" and count > 1 << 16)
    ):
        _refused(lambda: from_text(texts[where]), where, f"{count} items")
    else:
        import intq

        with contextlib.suppress(intq.IntqError):
            from_text(texts[where])


# ----- memory: huge shapes through shape ops ---------------------------------------------------


def _huge_dims(rng: random.Random, nbytes: int, itemsize: int) -> list[int]:
    """A shape of about ``nbytes`` (far above the limit), split over 2-4 dimensions."""
    elements = max(nbytes // itemsize, 1)
    rank = rng.randint(2, 4)
    dims = [1] * rank
    left = elements
    for i in range(rank - 1):
        d = max(2, round(left ** (1 / (rank - i)) * rng.uniform(0.5, 2.0)))
        dims[i] = d
        left = max(left // d, 2)
    dims[-1] = left
    return dims


def huge_text(directory: Path, op: str, dims: list[int], honest: bool, target: str) -> None:
    """Integer IR text with an Expand / Pad / Reshape / ConstantOfShape to ``dims``, declared
    truthfully (``honest``) or as a small type: parse, compile and run must refuse it."""
    import intq
    from intq.ir import from_text

    q = "q(bits=8, signed, scale=0.1)"
    shape = ", ".join(map(str, dims))
    rank = len(dims)
    small = ",".join(["1"] * rank)
    if op == "Expand":
        body = f"%e = Expand(%x.q) {{shape=[{shape}]}}"
    elif op == "Pad":
        pads = [0] * rank + [d - 1 for d in dims]
        body = f"%e = Pad(%x.q) {{pads=[{', '.join(map(str, pads))}]}}"
    elif op == "Reshape":  # reshaping a small tensor to a huge one: the sizes disagree
        body = f"%e = Reshape(%x.q) {{shape=[{shape}]}}"
    else:  # ConstantOfShape feeds an Add: it must never be built
        body = f'%k = ConstantOfShape() {{dtype="i8", shape=[{shape}]}} : i8[{small}]\n  '
        body += "%e = Add(%x.q, %k)"
    out = ",".join(map(str, dims)) if honest else small
    text = (
        f"graph g(%x: f32[{small}]) {{\n"
        f"  %x.q = Quantize(%x) {{bits=8, scale=0.1, signed=1}} : i8[{small}] {q}\n"
        f"  {body} : i8[{out}] {q}\n"
        f"  %y = Dequantize(%e) : f32[{out}]\n  return %y\n}}"
    )

    def run() -> None:
        if target == "load":  # a sealed .intq artifact: anyone can write a valid checksum
            from intq.artifacts import seal_text

            (directory / "m.intq").write_bytes(seal_text(text))
            exe = intq.load(directory / "m.intq")
        else:
            exe = intq.compile(from_text(text), target=target)
        exe.run({"x": np.zeros([1] * rank, np.float32)})

    _refused(run, op, str(dims), target)


def huge_float_text(directory: Path, op: str, dims: list[int]) -> None:
    """Float IR text with a shape op to ``dims`` declared small, quantized (constant folding
    and calibration run the graph): refused before anything is built."""
    import intq
    from intq.ir import from_text

    shape = ", ".join(map(str, dims))
    small = ",".join(["1"] * len(dims))
    body = {
        "Expand": f"%e = Expand(%x) {{shape=[{shape}]}}",
        "ConstantOfShape": f"%k = ConstantOfShape() {{shape=[{shape}]}} : f32[{small}]\n"
        "  %e = Add(%x, %k)",
        "Pad": f"%e = Pad(%x) {{pads=[{', '.join(['0'] * len(dims) + [str(d) for d in dims])}]}}",
    }[op]
    text = f"graph g(%x: f32[{small}]) {{\n  {body} : f32[{small}]\n  return %e\n}}"
    data = [{"x": np.ones([1] * len(dims), np.float32)}]
    _refused(lambda: intq.quantize(from_text(text), data), op, str(dims))


def huge_onnx(directory: Path, op: str, dims: list[int], how: str, target: str) -> None:
    """An ONNX model whose ConstantOfShape / Expand / Tile / Pad / Reshape reaches ``dims``
    through a shape computed in the graph (Shape of the input times a constant) or given as
    an initializer, converted and run on ``target``."""
    from onnx import TensorProto, helper, numpy_helper

    import intq

    rank = len(dims)
    nodes = []
    inits = []
    if how == "computed":  # Shape(x) * factor: folded at import once x's shape is static
        inits.append(numpy_helper.from_array(np.array(dims, np.int64), "factor"))
        nodes += [
            helper.make_node("Shape", ["x"], ["s"], name="shape"),
            helper.make_node("Mul", ["s", "factor"], ["target"], name="mul"),
        ]
    else:
        inits.append(numpy_helper.from_array(np.array(dims, np.int64), "target"))
    if op == "ConstantOfShape":
        nodes += [
            helper.make_node("ConstantOfShape", ["target"], ["k"], name="cos"),
            helper.make_node("Add", ["x", "k"], ["y"], name="add"),
        ]
    elif op == "Expand":
        nodes.append(helper.make_node("Expand", ["x", "target"], ["y"], name="expand"))
    elif op == "Tile":
        nodes.append(helper.make_node("Tile", ["x", "target"], ["y"], name="tile"))
    elif op == "Pad":
        inits.append(numpy_helper.from_array(np.zeros(rank, np.int64), "zeros"))
        nodes += [
            helper.make_node("Concat", ["zeros", "target"], ["pads"], axis=0, name="pads"),
            helper.make_node("Pad", ["x", "pads"], ["y"], name="pad"),
        ]
    else:
        nodes.append(helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1] * rank)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = [{"x": np.ones([1] * rank, np.float32)}]
    _refused(lambda: intq.convert(model, data, target=target), op, how, str(dims))


# ----- .npz / .npy archives -----------------------------------------------------------------


def _npy_bytes(shape: str, descr: str, data: bytes, fortran: bool = False) -> bytes:
    """An .npy file (format 1.0) whose header says ``shape`` and ``descr``, then ``data``."""
    header = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape}, }}"
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + data


def _write_npz(path: Path, members: dict[str, bytes], compress: bool = False) -> None:
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name + ".npy", data)


def _raw_zip(path: Path, payload: bytes, method: int, crc: int, size: int) -> None:
    """A zip of one member ``x.npy`` whose stored ``payload`` (deflated when ``method`` is 8)
    the zip's headers say inflates to ``size`` bytes with ``crc``: both may lie."""
    name = b"x.npy"
    local = struct.pack(
        "<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(payload), size, len(name), 0
    )
    central = struct.pack(
        "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(payload), size,
        len(name), 0, 0, 0, 0, 0, 0,
    )  # fmt: skip
    body = local + name + payload
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central) + len(name), len(body), 0)
    path.write_bytes(body + central + name + end)


def _bomb(path: Path, declared: str, inflated: int) -> None:
    """A deflated member whose header declares ``declared`` and whose stream inflates to
    ``inflated`` zero bytes (written in chunks: the file stays small)."""
    header = _npy_bytes(declared, "<f4", b"")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    parts = [compressor.compress(header)]
    crc = zlib.crc32(header)
    left = inflated
    while left > 0:
        piece = chunk[: min(left, len(chunk))]
        parts.append(compressor.compress(piece))
        crc = zlib.crc32(piece, crc)
        left -= len(piece)
    parts.append(compressor.flush())
    _raw_zip(path, b"".join(parts), 8, crc, len(header) + inflated)


def _forged(path: Path, elements: int, deflate: bool) -> None:
    """A member whose header declares ``elements`` float32 values (under the size limit) and
    whose zip headers claim the matching size, over 64 bytes of real data."""
    data = _npy_bytes(f"({elements},)", "<f4", bytes(64))
    header_length = len(data) - 64
    payload = zlib.compress(data, 9)[2:-4] if deflate else data
    _raw_zip(path, payload, 8 if deflate else 0, zlib.crc32(data), header_length + 4 * elements)


def _archive(path: Path, kind: str, rng: random.Random) -> None:
    """Write a hostile calibration archive of ``kind`` for an input x[1, 1, 4, 4]."""
    good = rng.random() < 0.5
    sample = np.random.default_rng(rng.randrange(1 << 30)).standard_normal((4, 1, 4, 4))
    sample = sample.astype(np.float32)
    buffer = io.BytesIO()
    (np.savez_compressed if good else np.savez)(buffer, x=sample)
    valid = buffer.getvalue()
    if kind == "declared_huge":  # 10 GB declared, 64 bytes stored
        dims = rng.choice(["(10000000000,)", "(50000, 50000)", "(100000, 1, 4, 4, 2000)"])
        _write_npz(path, {"x": _npy_bytes(dims, "<f4", bytes(64))}, compress=good)
    elif kind == "declared_more":  # a few more bytes declared than stored
        stored = bytes(256 - rng.randint(1, 255))
        _write_npz(path, {"x": _npy_bytes("(4, 1, 4, 4)", "<f4", stored)}, compress=good)
    elif kind == "declared_less":
        _write_npz(path, {"x": _npy_bytes("(4, 1, 4, 4)", "<f4", bytes(256 + rng.randint(1, 99)))})
    elif kind == "bomb":  # inflates far beyond its size; the header says so
        inflated = rng.choice([16, 32, 64]) << 20
        _bomb(path, f"({(10 << 30) // 4},)", inflated)
    elif kind == "bomb_lying":  # the header declares a small array, the stream inflates more
        _bomb(path, "(4, 1, 4, 4)", rng.choice([1, 8, 32]) << 20)
    elif kind == "forged_size":  # 1-2 GiB declared consistently, 64 bytes of data
        _forged(path, rng.choice([1 << 28, 3 << 27, 1 << 29]), rng.random() < 0.5)
    elif kind == "truncated":
        path.write_bytes(valid[: rng.randrange(1, len(valid))])
    elif kind == "flipped":  # random bytes of the archive changed
        data = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
    elif kind == "header_mutation":  # the .npy header's text mutated
        header = _npy_bytes("(4, 1, 4, 4)", "<f4", b"")
        text = bytearray(header[10:])
        for _ in range(rng.randint(1, 4)):
            text[rng.randrange(len(text))] = rng.choice(b"(),:'{}[]-0123456789aZ\n\x00\xff ")
        data = header[:10] + bytes(text) + sample.tobytes()
        _write_npz(path, {"x": data}, compress=good)
    elif kind == "header_length":  # the header length field lies
        raw = bytearray(_npy_bytes("(4, 1, 4, 4)", "<f4", sample.tobytes()))
        raw[8:10] = struct.pack("<H", rng.choice([0, 1, 65535, rng.randrange(65536)]))
        _write_npz(path, {"x": bytes(raw)})
    elif kind == "not_zip":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))))
    elif kind == "npy":
        np.save(path.with_suffix(".npy"), sample)
        path.with_suffix(".npy").rename(path)
    elif kind == "object":
        objects = np.empty(4, object)
        objects[:] = [{"a": 1}, None, "s", 3]
        buffer = io.BytesIO()
        np.savez(buffer, x=objects)
        path.write_bytes(buffer.getvalue())
    elif kind == "dtype":
        descr = rng.choice(
            ["<c8", "<U4", "|S4", "|V4", "<M8[s]", "<m8[s]", "|O", "[('a', '<f4')]", "<f16"]
        )
        _write_npz(path, {"x": _npy_bytes("(4, 1, 4, 4)", descr, bytes(4 * 16 * 16))})
    elif kind == "negative":
        _write_npz(path, {"x": _npy_bytes("(-4, 1, 4, 4)", "<f4", b"")})
    elif kind == "duplicate":
        with zipfile.ZipFile(path, "w") as archive, contextlib.suppress(UserWarning):
            import warnings

            warnings.simplefilter("ignore")
            archive.writestr("x.npy", _npy_bytes("(4, 1, 4, 4)", "<f4", sample.tobytes()))
            archive.writestr("x.npy", _npy_bytes("(4, 1, 4, 4)", "<f4", bytes(256)))
    elif kind == "foreign_member":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x.npy", _npy_bytes("(4, 1, 4, 4)", "<f4", sample.tobytes()))
            archive.writestr(rng.choice(["notes.txt", "dir/", "x"]), b"hello")
    elif kind == "encrypted_flag":
        data = bytearray(valid)
        for marker in (b"PK\x03\x04", b"PK\x01\x02"):
            at = data.find(marker)
            offset = 6 if marker == b"PK\x03\x04" else 8
            data[at + offset] |= 1
        path.write_bytes(bytes(data))
    elif kind == "empty":
        np.savez(path)
    elif kind == "version":
        raw = bytearray(_npy_bytes("(4, 1, 4, 4)", "<f4", sample.tobytes()))
        raw[6:8] = bytes([rng.choice([0, 3, 9, 255]), rng.randrange(256)])
        _write_npz(path, {"x": bytes(raw)})
    else:
        raise ValueError(kind)


ARCHIVES = [
    "declared_huge", "declared_more", "declared_less", "bomb", "bomb_lying", "forged_size",
    "truncated",
    "flipped", "header_mutation", "header_length", "not_zip", "npy", "object", "dtype",
    "negative", "duplicate", "foreign_member", "encrypted_flag", "empty", "version",
]  # fmt: skip
INVALID = set(ARCHIVES) - {"flipped", "truncated", "header_mutation"}
"""Kinds that are never a valid archive (a flipped byte may miss everything that matters,
and a mutated header may still spell a valid one)."""


def _convert(path: Path) -> None:
    import intq

    intq.convert(_conv_model(["N", 1, 4, 4]), path, target="reference")


def archive_case(directory: Path, kind: str, consumer: str, seed: int) -> None:
    """A hostile archive given to ``intq.convert`` as calibration data, or to the CLI as
    ``--calib`` (compile) or ``--inputs`` (run): a result or a refusal, never more memory
    than its declared, limited size. Archives that are invalid by construction must be
    refused."""
    import intq

    rng = random.Random(seed)
    path = directory / "data.npz"
    _archive(path, kind, rng)
    if consumer == "convert":
        action = lambda: _convert(path)  # noqa: E731
    elif consumer == "calib":
        import onnx

        onnx.save(_conv_model(["N", 1, 4, 4]), directory / "m.onnx")
        action = lambda: _cli(  # noqa: E731
            "compile", str(directory / "m.onnx"), "--calib", str(path),
            "-o", str(directory / "o.intq"), "--quiet",
        )  # fmt: skip
    else:
        model = directory / "m.intq"
        intq.convert(
            _conv_model([4, 1, 4, 4]), [{"x": np.ones((4, 1, 4, 4), np.float32)}], "reference"
        ).save(model)
        action = lambda: _cli(  # noqa: E731
            "run", str(model), "--inputs", str(path), "-o", str(directory / "out.npz"), "--quiet"
        )
    if kind in INVALID:
        _refused(action, "archive", kind)
    else:
        action()


# ----- the source ---------------------------------------------------------------------------

TARGETS = ["reference", "onnxruntime", "tvm"]


def cases(rng: random.Random, n: int) -> Iterator[Case]:
    """Up to ``n`` cases over all generators, round robin; big graphs grow with ``n`` (a few
    thousand nodes in ``make test``'s n=12, up to 50,000 in the fuzz run)."""
    full = n > 12
    # TVM compiles take seconds each: a few in the fuzz run, none in the n=12 run.
    targets = TARGETS if full else TARGETS[:2]
    biggest = 50_000 if full else 3_000

    def zero_declared() -> Case:
        shape = _zero_shape(rng)
        form = rng.choice(["array", "list", "dict"])
        return Case("hangs", f"zero dims declared {shape} ({form})", zero_dims_declared,
                    (shape, form))  # fmt: skip

    def zero_given() -> Case:
        shape = _zero_shape(rng)
        if rng.random() < 0.3:  # negative sizes too
            shape[rng.randrange(4)] = -rng.randint(1, 5)
        form = rng.choice(["api", "cli"])
        return Case("hangs", f"zero dims given {shape} ({form})", zero_dims_given, (shape, form))

    def zero_data() -> Case:
        shape = _zero_shape(rng)
        form = rng.choice(["array", "list", "npz", "cli"])
        return Case("hangs", f"zero dims in data {shape} ({form})", zero_dims_data, (shape, form))

    def zero_text() -> Case:
        shape = _zero_shape(rng, rng.randint(1, 4))
        target = rng.choice(targets)
        return Case("hangs", f"zero dims in IR text {shape} on {target}", zero_dims_text,
                    (shape, target))  # fmt: skip

    def wide() -> Case:
        n_inputs = rng.randint(biggest // 4, biggest)
        sources = rng.choice([1, 2, rng.randint(2, 100), n_inputs])
        seed = rng.randrange(1 << 30)
        form = rng.choice(["import", "all", "text"])
        if form == "text":
            return Case("hangs", f"Concat of {n_inputs} from {sources} (text)", wide_text,
                        (n_inputs, sources, seed))  # fmt: skip
        if form == "all":  # every step, at up to 20,000 nodes
            n_inputs = min(n_inputs, 20_000)
            sources = min(sources, n_inputs)
        return Case("hangs", f"Concat of {n_inputs} from {sources} (ONNX, {form})", wide_graph,
                    (n_inputs, sources, seed, form))  # fmt: skip

    def deep() -> Case:
        length = rng.randint(biggest // 8, biggest // 2)
        return Case("hangs", f"chain of {length} nodes", deep_graph,
                    (length, rng.randrange(1 << 30)))  # fmt: skip

    def digits() -> Case:
        where = rng.choice(
            ["shape", "attribute", "constant", "quant", "quant_axis", "header", "cli",
             "npy_header", "blanks", "comments"]
        )  # fmt: skip
        count = rng.choice([25, 400, 4301, 5000, 20000])
        return Case("hangs", f"{count}-digit integer in {where}", long_integer,
                    (where, count, rng.randrange(1 << 30)))  # fmt: skip

    def lists() -> Case:
        where = rng.choice(["constant", "attribute", "rank", "scales"])
        count = rng.choice([65, 1000, 70_000, 1_500_000 if full else 300_000])
        return Case("memory", f"list of {count} items in IR text ({where})", long_list,
                    (where, count))  # fmt: skip

    def huge() -> Case:
        op = rng.choice(["Expand", "Pad", "Reshape", "ConstantOfShape"])
        dims = _huge_dims(rng, 1 << rng.randint(34, 44), 1)
        honest = rng.random() < 0.5
        target = rng.choice([*targets, "load"])
        return Case("memory", f"{op} to {dims} in IR text ({'true' if honest else 'small'}"
                    f" type) on {target}", huge_text, (op, dims, honest, target))  # fmt: skip

    def huge_float() -> Case:
        op = rng.choice(["Expand", "Pad", "ConstantOfShape"])
        dims = _huge_dims(rng, 1 << rng.randint(34, 44), 4)
        return Case("memory", f"float {op} to {dims} quantized", huge_float_text, (op, dims))

    def onnx_huge() -> Case:
        op = rng.choice(["ConstantOfShape", "Expand", "Tile", "Pad", "Reshape"])
        dims = _huge_dims(rng, 1 << rng.randint(34, 44), 4)
        how = rng.choice(["computed", "initializer"])
        target = rng.choice(targets)
        return Case("memory", f"ONNX {op} to {dims} ({how}) on {target}", huge_onnx,
                    (op, dims, how, target))  # fmt: skip

    def archive() -> Case:
        kind = rng.choice(ARCHIVES)
        consumer = rng.choice(["convert", "calib", "inputs"])
        big = ("declared_huge", "bomb", "bomb_lying", "forged_size")
        klass = "memory" if kind in big else "malformed models"
        return Case(klass, f"archive {kind} as {consumer}", archive_case,
                    (kind, consumer, rng.randrange(1 << 30)))  # fmt: skip

    makers = [
        zero_declared, zero_given, zero_data, zero_text, wide, digits, huge, huge_float,
        onnx_huge, archive, deep, lists, digits, archive, wide, archive,
    ]  # fmt: skip
    for i in range(n):
        yield makers[i % len(makers)]()
