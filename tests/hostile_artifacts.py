"""Hostile saved artifacts: what ``intq.load``, ``intq inspect/run/bench`` and ``exe.save``
meet when the files on disk are not what intq wrote, or when writing them fails.

The artifacts are real: two tiny CNNs, A and B (same input and output, other weights),
quantized and saved by every backend (``.intq``, ``.onnx``, TVM ``.so`` + manifest), unsigned
and signed, built once per process into a cache directory keyed by the seed drawn from the
case source's random generator (:func:`_cache`). Each case copies what it needs into its own
directory and mutates it there:

- **foreign exceptions**: TVM manifests with fields dropped, retyped, deeply nested, not
  UTF-8, duplicated, truncated; ``.intq`` headers with odd, long, missing or repeated fields;
  ``.onnx`` metadata and graphs changed and resealed with a recomputed checksum (as anyone
  can); layer tables of every wrong shape; flipped bytes and truncations of every file.
- **memory**: manifests declaring tensors of 2^40 elements, fed to ``intq bench``, which
  allocates random inputs of the declared shapes.
- **files left behind**: saves of every backend that fail (a file size limit at any byte,
  so LLVM's "File too large" too; unwritable and unnameable paths), and saves killed at a
  random moment, followed by a save to the same path: only the artifact's files may remain.
- **trust**: a signed TVM artifact whose library is swapped for the other model's or for a
  library whose constructor leaves a mark, with a recomputed checksum, re-signed by another
  key or with an edited signature; signature files mutated; wrong keys. Loading with
  ``trusted_keys`` must refuse each before the library is loaded: the mark must not appear.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hostile
from hostile import Case

KINDS = ("reference", "onnxruntime", "tvm")
NAMES = {"reference": "m.intq", "onnxruntime": "m.onnx", "tvm": "m.so"}
SHAPE = (2, 1, 8, 8)

# ----- the artifacts, built once per process ------------------------------------------------

_CACHES: dict[int, Path] = {}

_CONSTRUCTOR_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void leave_a_mark(void) {
    const char *path = getenv("INTQ_HOSTILE_MARK");
    if (path) { FILE *f = fopen(path, "w"); if (f) { fputs("constructor ran\n", f); fclose(f); } }
}
"""


def _model(seed: int, width: int) -> Any:
    """A tiny CNN: Conv(1->width, 3x3) -> Relu -> Flatten -> Gemm(10), input x [2,1,8,8]."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((width, 1, 3, 3)) * 0.3).astype("f4"), "w")
    b = numpy_helper.from_array((rng.standard_normal(width) * 0.1).astype("f4"), "b")
    fc = numpy_helper.from_array((rng.standard_normal((10, width * 64)) * 0.1).astype("f4"), "fc")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (2, 10))],
        [w, b, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _cache(seed: int) -> Path:
    """The directory of this seed's artifacts (built on first use, removed at exit)::

    A/ B/            m.intq m.onnx m.so m.so.json, unsigned
    A-signed/ B-signed/   the same, each with its .sig (key.pem)
    key.pem key.pub.pem other.pem other.pub.pem   Ed25519 keys (other: not trusted)
    x.npy, A.npz B.npz   an input and each model's reference output on it
    mark.so          a shared object whose constructor writes $INTQ_HOSTILE_MARK (if cc)
    """
    if seed in _CACHES:
        return _CACHES[seed]
    import numpy as np

    import intq
    from intq.signing import write_key_pair

    root = Path(tempfile.mkdtemp(prefix=f"intq-hostile-artifacts-{seed}-"))
    atexit.register(shutil.rmtree, root, True)
    write_key_pair(root / "key.pem")
    write_key_pair(root / "other.pem")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    np.save(root / "x.npy", x)
    for name, width in (("A", 4), ("B", 2)):
        batches = [{"x": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(2)]
        graph = intq.quantize(intq.from_onnx(_model(seed + len(name) + width, width)), batches)
        for kind in KINDS:
            options = {"schedule": False} if kind == "tvm" else {}  # a fast compile
            exe = intq.compile(graph, target=kind, **options)
            exe.save(root / name / NAMES[kind])
            exe.save(root / f"{name}-signed" / NAMES[kind], sign_key=root / "key.pem")
        want = intq.compile(graph, target="reference").run({"x": x})
        np.savez(root / f"{name}.npz", **want)
    source = root / "mark.c"
    source.write_text(_CONSTRUCTOR_C)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["cc", "-shared", "-fPIC", "-o", str(root / "mark.so"), str(source)],
            check=True,
            capture_output=True,
            timeout=60,
        )
    _CACHES[seed] = root
    return root


# ----- helpers the cases share --------------------------------------------------------------


def _copy(cache: Path, source: str, kind: str, directory: Path) -> Path:
    """The artifact of ``kind`` from ``cache/source`` copied into ``directory`` (all its
    files: manifest, signature); returns the copy's path."""
    name = NAMES[kind]
    for path in (cache / source).iterdir():
        if path.name == name or path.name.startswith(name + "."):
            shutil.copy(path, directory / path.name)
    return directory / name


def _cli(*argv: Any) -> str:
    """Run the ``intq`` command in this process: its stdout; exit 1 becomes the IntqError it
    printed, and exit 3 (an internal error) a foreign exception with its traceback."""
    import intq
    from intq.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    if code == 1:
        raise intq.IntqError(err.getvalue().strip().removeprefix("intq: error: ") or "exit 1")
    if code != 0:
        raise RuntimeError(f"intq {argv[0]} exited {code}:\n{err.getvalue()[-2000:]}")
    return out.getvalue()


def _inputs(cache: Path) -> dict[str, Any]:
    import numpy as np

    return {"x": np.load(cache / "x.npy")}


def _want(cache: Path, model: str) -> dict[str, Any]:
    import numpy as np

    with np.load(cache / f"{model}.npz") as archive:
        return {k: archive[k] for k in archive.files}


def _load_and_run(path: Path, cache: Path, trusted: Any = None) -> None:
    """``intq.load`` the artifact and run it: on the real input, and on inputs of the shapes
    its manifest declares (when it declares other, small ones)."""
    import numpy as np

    import intq
    from intq.backends.tvm_runtime import TensorSpec

    exe = intq.load(path, trusted_keys=trusted)
    specs = getattr(exe, "inputs", None) or exe.graph.inputs
    feeds = _inputs(cache)
    declared = {}
    for spec in specs:
        value = spec.value() if isinstance(spec, TensorSpec) else spec
        shape, dtype = value.type.shape, np.dtype(value.type.dtype.numpy)
        if float(np.prod(shape, dtype=np.float64)) * dtype.itemsize < 1 << 24:
            declared[value.name] = np.zeros(shape, dtype)
    with contextlib.suppress(intq.ShapeError):  # the manifest may name other inputs
        exe.run(feeds)
    if declared and len(declared) == len(specs):
        exe.run(declared)


def _entry(path: Path, cache: Path, directory: Path, rng: random.Random) -> Callable[[], Any]:
    """One of the ways a user meets an artifact, drawn by ``rng``."""
    import numpy as np

    inputs = directory / "in.npz"
    np.savez(inputs, **_inputs(cache))
    choices: list[Callable[[], Any]] = [
        lambda: _load_and_run(path, cache),
        lambda: _cli("inspect", path),
        lambda: _cli("run", path, "--inputs", inputs, "-o", directory / "out.npz", "--quiet"),
        lambda: _cli("bench", path, "--repeat", 1, "--warmup", 0),
    ]
    return rng.choice(choices)


def _reseal_onnx(model: Any) -> bytes:
    """An ONNX artifact with its ``intq.sha256`` recomputed, as anyone who edits it can."""
    import onnx

    kept = [(p.key, p.value) for p in model.metadata_props if p.key != "intq.sha256"]
    unsealed = onnx.ModelProto()
    unsealed.CopyFrom(model)
    del unsealed.metadata_props[:]
    for key, value in kept:
        unsealed.metadata_props.add(key=key, value=value)
    digest = hashlib.sha256(unsealed.SerializeToString(deterministic=True)).hexdigest()
    unsealed.metadata_props.add(key="intq.sha256", value=digest)
    return unsealed.SerializeToString(deterministic=True)


def _reseal_text(payload: bytes, fields: str | None = None) -> bytes:
    digest = hashlib.sha256(payload).hexdigest()
    header = fields if fields is not None else f"format=1 target=reference sha256={digest}"
    return b"# intq-artifact " + header.replace("{sha}", digest).encode() + b"\n" + payload


# ----- hostile JSON -------------------------------------------------------------------------

_SENTINEL = "@@hostile@@"

# Raw JSON tokens a value can be replaced with: other types, huge and odd numbers, strings
# that are not text, nesting deeper than any parser's stack.
_RAW_VALUES = [
    "null",
    "true",
    "0",
    "-1",
    "3.5",
    "1e400",
    "NaN",
    "-Infinity",
    "9" * 25,
    "1" * 5000,
    '"x"',
    '""',
    '"\\u0000"',
    '"\\udc80"',
    '"' + "z" * 200_000 + '"',
    "[]",
    "{}",
    "[1, 2, 3]",
    '{"a": 1}',
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 20_000 + "1" + "}" * 20_000,
    "[" * 40 + "]" * 40,
    "[" + ",".join(["2147483647"] * 8) + "]",
]


def _paths(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield at
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*at, key))
    elif isinstance(value, list):
        for i, item in enumerate(value[:4]):
            yield from _paths(item, (*at, i))


def _mutate_json(document: Any, rng: random.Random, prefer: str | None = None) -> tuple[bytes, str]:
    """``document`` as JSON bytes with one hostile change; and what changed."""
    document = copy.deepcopy(document)
    paths = [p for p in _paths(document) if p]
    if prefer is not None:
        paths = [p for p in paths if p[0] == prefer] or paths
    path = rng.choice(paths)
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    how = rng.choice(["drop", "replace", "replace", "replace", "bytes"])
    if how == "drop":
        del parent[last]
        return json.dumps(document).encode(), f"drop {path}"
    if how == "replace":
        raw = rng.choice(_RAW_VALUES)
        parent[last] = _SENTINEL
        text = json.dumps(document).replace(json.dumps(_SENTINEL), raw, 1)
        return text.encode(), f"{path} = {raw[:30]}"
    data = json.dumps(document, indent=2).encode()
    what = rng.choice(["not utf-8", "bom", "truncate", "duplicate", "top"])
    at = rng.randrange(len(data))
    if what == "not utf-8":
        return data[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80"]) + data[at:], what
    if what == "bom":
        return b"\xef\xbb\xbf" + data, what
    if what == "truncate":
        return data[:at], f"truncated at {at}"
    if what == "duplicate":
        return data.replace(b"{", b'{"format": "intq-tvm", ', 1), what
    return rng.choice([b"[]", b"null", b"1", b'"intq-tvm"', b""]), what


# ----- foreign exceptions: manifests, headers, metadata, layer tables, bytes ------------------


def _manifest(directory: Path, root: str, draw: int, prefer: str | None) -> None:
    rng = random.Random(draw)
    cache = Path(root)
    path = _copy(cache, "A", "tvm", directory)
    manifest = path.with_name(path.name + ".json")
    data, _ = _mutate_json(json.loads(manifest.read_text()), rng, prefer)
    manifest.write_bytes(data)
    _entry(path, cache, directory, rng)()


def _header(directory: Path, root: str, draw: int) -> None:
    rng = random.Random(draw)
    cache = Path(root)
    path = _copy(cache, "A", "reference", directory)
    data = path.read_bytes()
    payload = data[data.index(b"\n") + 1 :]
    fields = rng.choice(
        [
            "format=" + "1" * 5000 + " target=reference sha256={sha}",
            "format=99999999999 target=reference sha256={sha}",
            "format=-1 target=reference sha256={sha}",
            "format=1 target=reference sha256={sha} extra=1",
            "format=1 format=1 target=reference sha256={sha}",
            "format=1 sha256={sha}",
            "format=1  target=reference sha256={sha}",
            "format=1\ttarget=reference sha256={sha}",
            "target=reference format=1 sha256={sha}",
            "format=1 target=tvm sha256={sha}",
            "format=1 target=onnxruntime sha256={sha}",
            "format=1 target=nope sha256={sha}",
            "format=1 target= sha256={sha}",
            "format=1 target=" + "r" * 5000 + " sha256={sha}",
            "format=1 target=référence sha256={sha}",
            "format=1 target=reference sha256=" + "A" * 64,
            "format=1 target=reference sha256=" + "0" * 5000,
            "format=1 target=reference sha256={sha}\r",
            "=1 target=reference sha256={sha}",
            "format=1 target=reference sha256",
            "format=1 target=reference sha256={sha}" + " " * 2000,
        ]
    )
    mutated = _reseal_text(payload, fields)
    if rng.random() < 0.2:
        mutated = mutated.replace(b"\n", b"", 1)  # no end of the header line
    path.write_bytes(mutated)
    entry = rng.choice(
        [
            lambda: _load_and_run(path, cache),
            lambda: _cli("inspect", path),
            lambda: _cli("inspect", path, "--ir"),
            lambda: _import_model(path),
        ]
    )
    entry()


def _payload(directory: Path, root: str, draw: int) -> None:
    """A ``.intq`` artifact whose graph text was edited and resealed (as anyone can)."""
    rng = random.Random(draw)
    cache = Path(root)
    path = _copy(cache, "A", "reference", directory)
    data = path.read_bytes()
    payload = data[data.index(b"\n") + 1 :]
    # (5,000-digit integers in IR text are the parser's: tests/hostile_limits.py.)
    dim = rng.choice([b"1099511627776", b"1" * 40, b"-2", b"0", b"2147483648", b"x"])
    payload = payload.replace(b"f32[2,1,8,8]", b"f32[" + dim + b",1,8,8]", 1)
    path.write_bytes(_reseal_text(payload))
    _entry(path, cache, directory, rng)()


def _import_model(path: Path) -> Any:
    from intq.api import import_model

    return import_model(path)


def _layer_rows(rng: random.Random) -> str:
    row = {"layer": "conv", "op": "QConv", "input": "s8", "weights": "s8", "output": "u8"}
    return rng.choice(
        [
            "[1, 2, 3]",
            "{}",
            '"layers"',
            "[[]]",
            "[null]",
            json.dumps([{**row, "op": 5}]),
            json.dumps([{k: v for k, v in row.items() if k != "layer"}]),
            json.dumps([{**row, "extra": [1]}]),
            json.dumps([{**row, "layer": {"a": 1}}]),
            json.dumps([row] * 200_000),
            "[" * 50_000 + "]" * 50_000,
            json.dumps([{**row, "layer": "x" * 100_000}]),
            "",
            "not json",
        ]
    )


def _metadata(directory: Path, root: str, draw: int) -> None:
    import onnx
    from onnx import TensorProto

    rng = random.Random(draw)
    cache = Path(root)
    path = _copy(cache, "A", "onnxruntime", directory)
    model = onnx.load_from_string(path.read_bytes())
    meta = {p.key: p for p in model.metadata_props}
    change = rng.choice(["layers", "format", "target", "duplicate", "drop", "graph", "graph"])
    if change == "layers":
        meta["intq.layers"].value = _layer_rows(rng)
    elif change == "format":
        meta["intq.format"].value = rng.choice(["1" * 5000, "-1", "", "1.0", "٣", " 1", "2"])
    elif change == "target":
        meta["intq.target"].value = rng.choice(["", "tvm", "reference", "x" * 5000, "a b", "\0"])
    elif change == "duplicate":
        model.metadata_props.add(key="intq.layers", value="[]")
    elif change == "drop":
        key = rng.choice(["intq.layers", "intq.target", "intq.format"])
        kept = [(p.key, p.value) for p in model.metadata_props if p.key != key]
        del model.metadata_props[:]
        for k, v in kept:
            model.metadata_props.add(key=k, value=v)
    else:
        graph = model.graph
        what = rng.choice(["symbolic", "elem", "external", "negative", "no graph", "huge"])
        dim = graph.input[0].type.tensor_type.shape.dim[0]
        if what == "symbolic":
            dim.dim_param = "batch"
        elif what == "elem":
            graph.input[0].type.tensor_type.elem_type = rng.choice([0, 99, 16, TensorProto.STRING])
        elif what == "external":
            tensor = graph.initializer[0]
            tensor.data_location = TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            tensor.external_data.add(key="location", value="/etc/hostname")
        elif what == "negative":
            dim.dim_value = -5
        elif what == "no graph":
            model.ClearField("graph")
        else:
            dim.dim_value = 1 << 40
    path.write_bytes(_reseal_onnx(model))
    _entry(path, cache, directory, rng)()


def _bytes(directory: Path, root: str, draw: int) -> None:
    rng = random.Random(draw)
    cache = Path(root)
    kind = rng.choice(KINDS)
    signed = rng.random() < 0.4
    path = _copy(cache, "A-signed" if signed else "A", kind, directory)
    files = sorted(p for p in directory.iterdir() if p.name.startswith(path.name))
    victim = rng.choice(files)
    data = bytearray(victim.read_bytes())
    if rng.random() < 0.5 and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    else:
        del data[rng.randrange(len(data) + 1) :]
    victim.write_bytes(bytes(data))
    if signed:
        _expect_refusal(
            lambda: _load_and_run(path, cache, trusted=cache / "key.pub.pem"),
            f"{victim.name} changed",
        )
    else:
        _entry(path, cache, directory, rng)()


# ----- memory: declared shapes ----------------------------------------------------------------


def _huge_manifest(directory: Path, root: str, draw: int) -> None:
    rng = random.Random(draw)
    cache = Path(root)
    path = _copy(cache, "A", "tvm", directory)
    manifest_path = path.with_name(path.name + ".json")
    manifest = json.loads(manifest_path.read_text())
    spec = manifest[rng.choice(["inputs", "outputs"])][0]
    spec["shape"] = rng.choice(
        [[1 << 20, 1 << 20], [2**31 - 1] * 4, [65536] * 3, [1 << 30, 8], [0, 1 << 31]]
    )
    spec["dtype"] = rng.choice(["float32", "int64", "uint8"])
    manifest_path.write_text(json.dumps(manifest))
    rng.choice(
        [
            lambda: _cli("bench", path, "--repeat", 1, "--warmup", 0),
            lambda: _load_and_run(path, cache),
            lambda: _cli("inspect", path),
        ]
    )()


# ----- files left behind: failing and killed saves --------------------------------------------


def _executable(cache: Path, kind: str) -> Any:
    import intq

    graph = intq.load(cache / "A" / "m.intq").graph
    options = {"schedule": False} if kind == "tvm" else {}
    return intq.compile(graph, target=kind, **options)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _failing_save(directory: Path, root: str, draw: int) -> None:
    import intq

    rng = random.Random(draw)
    cache = Path(root)
    kind = rng.choice(KINDS)
    exe = _executable(cache, kind)
    sign = cache / "key.pem" if rng.random() < 0.5 else None
    out = directory / "out"
    out.mkdir()
    if rng.random() < 0.5:  # an earlier artifact at the path, which must survive a failure
        _copy(cache, "B-signed" if rng.random() < 0.5 else "B", kind, out)
    name = NAMES[kind]
    how = rng.choice(["size limit", "size limit", "size limit", "path"])
    target = out / name
    if how == "path":
        bad = rng.choice(["parent is a file", "is a directory", "long", "nul", "surrogate"])
        if bad == "parent is a file":
            (out / "file").write_bytes(b"")
            target = out / "file" / name
        elif bad == "is a directory":
            shutil.rmtree(out)
            out.mkdir()
            (out / name).mkdir()
        elif bad == "long":
            target = out / ("n" * 300 + Path(name).suffix)
        elif bad == "nul":
            target = out / ("m\0" + name)
        else:
            target = out / ("m\ud800" + name)
    before = _snapshot(out)
    full = sum(p.stat().st_size for p in (cache / "A-signed").iterdir() if p.name.startswith(name))
    limit = rng.randrange(0, full) if how == "size limit" else resource.RLIM_INFINITY
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails instead
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    refusal: intq.ArtifactError | None = None
    try:
        exe.save(target, sign_key=sign)
    except intq.ArtifactError as err:
        refusal = err
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    if refusal is None:
        hostile.nothing_left(out, {name, name + ".json", name + ".sig"})
        _load_and_run(target, cache, trusted=cache / "key.pub.pem" if sign else None)
        return
    after = _snapshot(out)
    if after != before:
        changed = sorted(set(after) ^ set(before) | {k for k in after if after[k] != before.get(k)})
        raise hostile.LeftBehind(f"a failed save ({how}) changed {changed} in {out}")
    hostile.nothing_left(out, before)
    raise refusal


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _killed_save(directory: Path, root: str, draw: int) -> None:
    """A save killed at a random moment (and stale temporaries of a dead process), then a
    save to the same path: only the artifact's files remain, and it loads and agrees."""
    import numpy as np

    import intq

    rng = random.Random(draw)
    cache = Path(root)
    kind = rng.choice(KINDS)
    exe = _executable(cache, kind)
    out = directory / "out"
    out.mkdir()
    name = NAMES[kind]
    target = out / name
    sign = cache / "key.pem" if rng.random() < 0.5 else None
    pid = os.fork()
    if pid == 0:  # the save to kill
        try:
            exe.save(target, sign_key=sign)
        finally:
            os._exit(0)
    time.sleep(rng.uniform(0, 0.5 if kind == "tvm" else 0.05))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    dead = _dead_pid()
    companions = [".json"] if kind == "tvm" else []
    for stale in (name, *(name + c for c in companions), name + ".sig"):  # as a save names them
        (out / f".{stale}.{dead}.abcd1234.tmp").write_bytes(b"half")
    (out / f".{name}.{dead}.efgh5678.tmp").mkdir()
    (out / f".{name}.{dead}.efgh5678.tmp" / "lib.so").write_bytes(b"half")
    exe.save(target, sign_key=sign)
    hostile.nothing_left(out, {name, name + ".json", name + ".sig" if sign else name})
    loaded = intq.load(target, trusted_keys=cache / "key.pub.pem" if sign else None)
    got = loaded.run(_inputs(cache))
    hostile.same_bits(
        {k: np.asarray(v) for k, v in got.items()}, _want(cache, "A"), f"{kind} re-saved"
    )


# ----- trust: swapped libraries, signatures ---------------------------------------------------


class Trusted(AssertionError):
    """A signed load accepted what its signature does not cover (counted as foreign)."""


def _expect_refusal(call: Callable[[], Any], what: str) -> None:
    import intq

    try:
        call()
    except intq.ArtifactError:
        raise
    except intq.IntqError as err:
        raise Trusted(f"{what}: refused, but not as an ArtifactError: {err}") from None
    raise Trusted(f"{what}: a load with trusted keys accepted it")


def _swapped_library(directory: Path, root: str, draw: int) -> None:
    rng = random.Random(draw)
    cache = Path(root)
    signed = rng.random() < 0.75
    path = _copy(cache, "A-signed" if signed else "A", "tvm", directory)
    mark = directory / "mark"
    library = cache / "mark.so"
    if not library.is_file() or rng.random() < 0.5:
        library = cache / "B" / "m.so"
    shutil.copy(library, path)
    manifest_path = path.with_name(path.name + ".json")
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest, indent=2))
    how = "checksum recomputed"
    if signed:
        how = rng.choice(["checksum recomputed", "re-signed by another key", "statement edited"])
        if how == "re-signed by another key":
            from intq.signing import load_private_key, sign_files

            files = {"": path.read_bytes(), ".json": manifest_path.read_bytes()}
            key = load_private_key(cache / "other.pem")
            path.with_name(path.name + ".sig").write_bytes(sign_files(files, key))
        elif how == "statement edited":
            sig_path = path.with_name(path.name + ".sig")
            document = json.loads(sig_path.read_text())
            document["files"] = {
                "": manifest["sha256"],
                ".json": hashlib.sha256(manifest_path.read_bytes()).hexdigest(),
            }
            sig_path.write_text(json.dumps(document))
    os.environ["INTQ_HOSTILE_MARK"] = str(mark)
    try:
        if signed:
            trusted = [cache / "key.pub.pem"]
            if rng.random() < 0.3 and how != "re-signed by another key":
                trusted.append(cache / "other.pub.pem")  # more keys: still none that signed it
            _expect_refusal(
                lambda: _load_and_run(path, cache, trusted=trusted),
                f"{library.name} swapped in ({how})",
            )
        else:
            _load_and_run(path, cache)  # trusted by design: docs/security.md says so
    finally:
        del os.environ["INTQ_HOSTILE_MARK"]
        if signed and mark.exists():
            raise Trusted(f"{library.name} swapped in ({how}): its constructor ran in intq.load")


def _signature(directory: Path, root: str, draw: int) -> None:
    rng = random.Random(draw)
    cache = Path(root)
    kind = rng.choice(KINDS)
    path = _copy(cache, "A-signed", kind, directory)
    sig_path = path.with_name(path.name + ".sig")
    trusted: Any = cache / "key.pub.pem"
    what = rng.choice(["json", "json", "flip", "remove", "other key", "key file", "foreign sig"])
    if what == "json":
        document = json.loads(sig_path.read_text())
        data, what = _mutate_json(document, rng)
        if data == sig_path.read_bytes():
            return
        sig_path.write_bytes(data)
    elif what == "flip":
        document = json.loads(sig_path.read_text())
        field = rng.choice(["signature", "key"])
        value = list(document[field])
        i = rng.randrange(len(value))
        value[i] = "0" if value[i] != "0" else "1"
        document[field] = "".join(value)
        sig_path.write_text(json.dumps(document))
        what = f"{field} changed"
    elif what == "remove":
        sig_path.unlink()
    elif what == "other key":
        trusted = [cache / "other.pub.pem"]
    elif what == "key file":
        bad = directory / "bad.pem"
        bad.write_bytes(
            rng.choice([b"", b"x" * 31, b"-----BEGIN PUBLIC KEY-----\nAAAA\n", os.urandom(64)])
        )
        trusted = rng.choice([bad, [bad], [], [cache / "key.pub.pem", bad]])
        if trusted == []:
            what = "no keys"
    else:
        other = "B-signed"
        shutil.copy(cache / other / sig_path.name, sig_path)
    import intq

    keys = trusted if isinstance(trusted, list) else [trusted]
    flags = [a for key in keys for a in ("--trusted-key", key)]
    try:
        if flags and rng.random() < 0.5:
            _cli(rng.choice(["inspect", "bench"]), path, *flags)
        else:
            _load_and_run(path, cache, trusted=trusted)
    except intq.IntqError:
        raise  # refused: what a signed load must do
    raise Trusted(f"{kind} signature ({what}): accepted")


# ----- the source -----------------------------------------------------------------------------


def cases(rng: random.Random, n: int) -> Iterator[Case]:
    """``n`` cases over every class, the first of each kind before any repeats."""
    root = str(_cache(rng.getrandbits(31)))
    makers: list[Callable[[int], Case]] = [
        lambda d: Case(
            "foreign exceptions", f"TVM manifest mutation {d}", _manifest, (root, d, None)
        ),
        lambda d: Case("foreign exceptions", f".intq header {d}", _header, (root, d)),
        lambda d: Case("memory", f".intq graph resealed {d}", _payload, (root, d)),
        lambda d: Case("foreign exceptions", f".onnx metadata resealed {d}", _metadata, (root, d)),
        lambda d: Case(
            "foreign exceptions", f"TVM layer table {d}", _manifest, (root, d, "layers")
        ),
        lambda d: Case("foreign exceptions", f"flipped or cut bytes {d}", _bytes, (root, d)),
        lambda d: Case("files left behind", f"failing save {d}", _failing_save, (root, d)),
        lambda d: Case("trust", f"swapped library {d}", _swapped_library, (root, d)),
        lambda d: Case("trust", f"signature {d}", _signature, (root, d)),
        lambda d: Case("memory", f"huge declared tensor {d}", _huge_manifest, (root, d)),
        lambda d: Case("files left behind", f"killed save {d}", _killed_save, (root, d)),
    ]
    weights = [4, 2, 1, 3, 2, 3, 2, 2, 3, 1, 1]
    for i in range(n):
        maker = makers[i] if i < len(makers) else rng.choices(makers, weights)[0]
        yield maker(rng.getrandbits(32))
