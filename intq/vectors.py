"""Golden vectors: every integer node's inputs and outputs on one run, for hardware teams.

``exe.golden_vectors(inputs, out_dir)`` (the reference, ONNX Runtime and TVM executables
compiled in this process; a loaded ``.intq`` artifact) and ``intq vectors model.intq
--inputs in.npz -o DIR`` run the integer graph on ``inputs`` with the reference interpreter
(:mod:`intq.semantics.numpy_eval`, the oracle every backend matches bit for bit) and write
``DIR``. A hardware implementation of one node is correct when, fed that node's inputs, it
produces that node's outputs exactly.

Which nodes
    ``Quantize`` and ``Dequantize`` (``Trait.BOUNDARY``: the float boundary), and every node
    whose op has ``Trait.INTEGER`` and that reads or writes a quantized tensor: the integer
    kernels (``QConv``, ``Requantize``, ``QSoftmax``...) and data movement on integers
    (``MaxPool``, ``Flatten``, ``Concat``...). Float nodes (a float tail after the output
    ``Dequantize``, the float ops of a graph not quantized) are left out.

The directory (format ``intq-golden-vectors``, version 1)
    ``vectors.json``, the manifest, and one ``.npz`` per node, named
    ``node<index, 4 digits>_<op>.npz`` (``node0003_QConv.npz``), where ``index`` is the node's
    position in the graph (``graph.nodes[index]`` of the ``.intq`` artifact). Each ``.npz``
    (``numpy.load``; no pickles) holds arrays ``in0``, ``in1``, ... (the node's inputs in
    order, constants such as weights and biases included, so each file is a self-contained
    test case) and ``out0``, ``out1``, ... (its outputs). An omitted optional input has no
    array. Arrays have exactly the dtype and shape the manifest states.

The manifest, ``vectors.json`` (UTF-8 JSON)::

    {
      "format": "intq-golden-vectors",
      "version": 1,
      "graph": "main_graph",                # the graph's name
      "inputs": ["input"],                  # the graph's input names, in order
      "outputs": ["logits"],                # the graph's output names, in order
      "nodes": [                            # the chosen nodes, in graph order
        {
          "index": 1,                       # position in the graph's node list
          "op": "QConv",                    # the IR op
          "name": "/features/features.0/Conv",  # node.label(): the source node it came from
          "file": "node0001_QConv.npz",
          "inputs": [                       # one entry per input position
            {"key": "in0", "value": "input.q", "constant": false, "dtype": "uint8",
             "shape": [8, 1, 8, 8],
             "quant": {"bits": 8, "signed": false, "narrow": false, "axis": null,
                       "scale": [0.00392156862745098]}},
            {"key": "in1", "value": "features.0.weight.bn", "constant": true,
             "dtype": "int8", "shape": [16, 1, 3, 3],
             "quant": {"bits": 8, "signed": true, "narrow": true, "axis": 0,
                       "scale": [0.0239, ...]}},          # one scale per output channel
            ...
          ],
          "outputs": [{"key": "out0", "dtype": "int32", ...}],   # the accumulator
          "attrs": {"dilations": [1, 1], "group": 1, "pads": [1, 1, 1, 1],
                    "strides": [1, 1]}
        },
        {
          "index": 2, "op": "Requantize", "name": "/features/features.2/Relu", ...,
          "attrs": {"axis": 1, "bits": 8, "factor": 1.0, "hi": 255, "lo": 0,
                    "multiplier": [1401674502, ...], "scale": 0.0183..., "shift": [38, ...],
                    "signed": 0}
        },
        ...
      ]
    }

An omitted optional input's entry is ``{"key": null, "omitted": true}``.

- ``value`` is the IR value's name; ``constant`` says whether it is a constant of the graph
  (weights, biases, tables).
- ``quant`` is ``null`` for a tensor without quantization (a float graph input, an
  accumulator without one); otherwise ``real = scale[c] * q`` with zero point 0, ``scale`` a
  list of one per-tensor scale (``axis`` null) or one scale per channel along ``axis``;
  ``narrow`` drops the most negative value (weights). See ``docs/numerics.md``.
- ``attrs`` are the node's IR attributes exactly as the interpreter reads them, with their
  IR names, sorted by name: integers, floats (shortest round-trip decimal), strings, and
  lists of them (IR tuples). A non-finite float is written as the string ``"inf"``,
  ``"-inf"`` or ``"nan"``, since JSON has no such numbers. What each attribute means is the
  op's definition in ``intq/ops/integer_ops.py`` and its kernel in
  ``intq/semantics/numpy_eval.py`` (requantization ``y = clamp((acc*M + 2^(S-1)) >> S, lo,
  hi)`` with ``M`` = ``multiplier``, ``S`` = ``shift``).

Tensors are integers between the boundary nodes; ``Quantize``'s input and ``Dequantize``'s
output are the float32 tensors on the float side. Flags such as ``signed`` are the ints 0
and 1, as in the IR. To replay a node in Python: ``intq.load("model.intq").graph.nodes[index]``
run by ``intq.semantics.numpy_eval.evaluate(node, [in0, in1, ...])`` (``None`` where an
input is omitted) returns ``[out0, ...]`` bit for bit.

Writing is atomic: everything goes into a temporary sibling directory, renamed to ``DIR``
once complete, so a half-written set never exists under that name. An existing non-empty
``DIR`` is refused unless ``overwrite=True`` (``--force``), which replaces it whole.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from intq.errors import ArtifactError, IntqError
from intq.ir import Graph, Node, Value
from intq.ops import Trait
from intq.semantics.feeds import Feeds, check_feeds
from intq.semantics.numpy_eval import run_graph

FORMAT = "intq-golden-vectors"
"""The manifest's ``format`` field."""

VERSION = 1
"""The manifest's ``version`` field: bumped whenever the layout or a field's meaning changes."""

MANIFEST = "vectors.json"
"""The manifest's file name inside the vectors directory."""


def is_vector_node(node: Node) -> bool:
    """Whether ``node`` gets golden vectors: ``Quantize`` and ``Dequantize``, and integer
    ops on quantized tensors (``Trait.INTEGER`` alone also marks float ops that may run on
    integers, such as ``Relu`` and ``MaxPool``: a float graph's are left out)."""
    opdef = node.opdef
    if opdef.has(Trait.BOUNDARY):
        return True
    values = [v for v in (*node.inputs, *node.outputs) if v is not None]
    return opdef.has(Trait.INTEGER) and any(v.type.quant is not None for v in values)


def vector_file(index: int, node: Node) -> str:
    """The ``.npz`` file name of the node at ``index``: ``node0003_QConv.npz``."""
    return f"node{index:04d}_{node.op}.npz"


def json_attr(value: Any) -> Any:
    """An IR attribute value as JSON: tuples as lists, non-finite floats as strings."""
    if isinstance(value, tuple | list):
        return [json_attr(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, np.generic):
        return json_attr(value.item())
    return value


def tensor_entry(key: str, value: Value) -> dict[str, Any]:
    """The manifest's description of one input or output tensor."""
    ty = value.type
    quant = None
    if ty.quant is not None:
        q = ty.quant
        quant = {
            "bits": q.bits,
            "signed": q.signed,
            "narrow": q.narrow,
            "axis": q.axis,
            "scale": list(q.scale),
        }
    return {
        "key": key,
        "value": value.name,
        "constant": value.is_const,
        "dtype": ty.dtype.numpy.name,
        "shape": list(ty.shape),
        "quant": quant,
    }


def node_entry(index: int, node: Node) -> dict[str, Any]:
    """The manifest's entry of the node at ``index``."""
    inputs: list[dict[str, Any]] = [
        {"key": None, "omitted": True} if v is None else tensor_entry(f"in{i}", v)
        for i, v in enumerate(node.inputs)
    ]
    return {
        "index": index,
        "op": node.op,
        "name": node.label(),
        "file": vector_file(index, node),
        "inputs": inputs,
        "outputs": [tensor_entry(f"out{i}", v) for i, v in enumerate(node.outputs)],
        "attrs": {k: json_attr(v) for k, v in sorted(node.attrs.items())},
    }


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(
            f"{out_dir} exists and is not a directory", hint="give a directory name for -o"
        )
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ArtifactError(
            f"{out_dir} exists and is not empty",
            hint="give a new directory, or replace it with overwrite=True (--force)",
        )


def write_golden_vectors(
    graph: Graph, inputs: Feeds, out_dir: str | Path, *, overwrite: bool = False
) -> Path:
    """Run ``graph`` on ``inputs`` and write the golden vectors of its integer nodes into
    ``out_dir`` (the format of this module's docstring), atomically; returns ``out_dir``.

    Refuses (:class:`IntqError`) a graph without integer nodes, and (:class:`ArtifactError`)
    an existing non-empty ``out_dir`` unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    positions = {id(node): i for i, node in enumerate(graph.nodes)}
    chosen = [node for node in graph.nodes if is_vector_node(node)]
    if not chosen:
        raise IntqError(
            f"graph {graph.name} has no integer nodes: golden vectors describe integer kernels",
            hint="quantize the model first (intq.quantize / intq quantize)",
        )
    _check_destination(out_dir, overwrite)
    feeds = check_feeds(graph.inputs, inputs)
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
    except OSError as err:
        raise ArtifactError(f"cannot write {out_dir}: {err.strerror or err}") from err
    try:
        _fill(graph, feeds, tmp, positions)
        _install(tmp, out_dir.resolve(), overwrite)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"cannot write {out_dir}: {err.strerror or err}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _fill(graph: Graph, feeds: dict[str, np.ndarray], tmp: Path, positions: dict[int, int]) -> None:
    """Run the graph, writing each chosen node's ``.npz`` as it is computed, then the
    manifest, into ``tmp``."""
    # Every computed array stays until the run ends: a node's npz needs its inputs, which
    # the interpreter may already have freed when the hook is called.
    arrays: dict[str, np.ndarray] = dict(feeds)
    for value in graph.constants:
        assert value.const is not None
        arrays[value.name] = value.const
    entries: list[dict[str, Any]] = []

    def record(node: Node, outputs: Sequence[np.ndarray]) -> None:
        for value, array in zip(node.outputs, outputs):
            arrays[value.name] = array
        if not is_vector_node(node):
            return
        index = positions[id(node)]
        saved = {f"in{i}": arrays[v.name] for i, v in enumerate(node.inputs) if v is not None}
        saved.update({f"out{i}": array for i, array in enumerate(outputs)})
        _write(tmp / vector_file(index, node), _npz_bytes(saved))
        entries.append(node_entry(index, node))

    run_graph(graph, feeds, on_node=record)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "graph": graph.name,
        "inputs": [v.name for v in graph.inputs],
        "outputs": [v.name for v in graph.outputs],
        "nodes": entries,
    }
    text = json.dumps(manifest, indent=1, allow_nan=False) + "\n"
    _write(tmp / MANIFEST, text.encode())


def _install(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the complete ``tmp`` to ``out_dir``; an existing ``out_dir`` (empty, or with
    ``overwrite``) is moved aside first and removed after."""
    mask = os.umask(0)
    os.umask(mask)
    # mkdtemp makes the directory private (0700); give it the usual permissions.
    os.chmod(tmp, 0o777 & ~mask)
    old: Path | None = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old / out_dir.name, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest of a vectors directory, its format and version checked."""
    path = Path(out_dir) / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ArtifactError(f"cannot read the golden vectors manifest {path}: {err}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ArtifactError(
            f"{path} is not an {FORMAT} manifest of version {VERSION}",
            hint="write the vectors again with this intq (intq vectors ...)",
        )
    return manifest


__all__ = [
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "is_vector_node",
    "json_attr",
    "node_entry",
    "read_manifest",
    "tensor_entry",
    "vector_file",
    "write_golden_vectors",
]
