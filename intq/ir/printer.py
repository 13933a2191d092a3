"""The textual IR: every value with its dtype, shape and scale.

Example::

    graph main(%x: f32[1,3,8,8]) {
      %w = const f32[4,3,3,3] b64"AACAPwAA..."
      %shape = const i64[2] [1, -1]
      %y = Conv(%x, %w) {dilations=[1, 1], group=1, pads=[1, 1, 1, 1], strides=[1, 1]}
        : f32[1,4,8,8] @"/conv/Conv"    (one line in real output)
      %q = Requantize(%y) : u8[1,4,8,8] q(bits=8, unsigned, scale=0.0235)
      return %y
    }

Constants with few elements are written as a flat list, larger ones as the
base64 of their little-endian bytes, so printing then parsing gives back the
same graph, bit for bit (:func:`intq.ir.parser.from_text`). Larger 4-bit
quantized constants (INT4 weights, held one per byte in memory) are written
as ``i4"..."``: base64 of the values packed two per byte (:mod:`intq.ir.int4`). Pass
``elide_above`` to abbreviate large constants for reading; such text does not
parse.
"""

from __future__ import annotations

import base64
import json
import re
from typing import TYPE_CHECKING

import numpy as np

from intq.ir.int4 import fits_int4, pack_int4, packed_int4

if TYPE_CHECKING:  # the graph prints itself with to_text, so the printer reads it lazily
    from intq.ir.graph import AttrValue, Graph, Node, Value
    from intq.ir.types import QuantParams, TensorType

INLINE_LIMIT = 16
"""Constants with at most this many elements print as a literal list."""

_BARE_NAME = re.compile(r"[A-Za-z0-9_.$]+\Z")


def format_name(name: str) -> str:
    """``%name``, quoted when it has characters outside ``[A-Za-z0-9_.$]``."""
    return f"%{name}" if _BARE_NAME.match(name) else f"%{json.dumps(name)}"


def format_float(x: float) -> str:
    """The shortest text that parses back to the same double."""
    return repr(float(x))


def format_quant(q: QuantParams) -> str:
    """``q(bits=8, signed, narrow, axis=0, scale=[...])``: the parameters' own text form."""
    return str(q)


def format_type(t: TensorType) -> str:
    """``i8[1,16,8,8] q(...)``: the type's own text form."""
    return str(t)


def format_attr(value: AttrValue) -> str:
    """An attribute value: int, float, JSON string, or ``[...]`` list of them."""
    if isinstance(value, tuple):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    if isinstance(value, float):
        return format_float(value)
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def _nan_payload(array: np.ndarray) -> bool:
    """Whether ``array`` holds a NaN that ``nan`` would not spell bit for bit."""
    if array.dtype.kind != "f" or not np.isnan(array).any():
        return False
    nans = array[np.isnan(array)]
    canonical = np.full(nans.shape, np.nan, array.dtype)
    return nans.tobytes() != canonical.tobytes()


def format_data(array: np.ndarray, elide_above: int | None = None) -> str:
    """A constant's data: a flat literal list or ``b64"..."`` of little-endian bytes."""
    if elide_above is not None and array.size > elide_above:
        return "<...>"
    if array.size <= INLINE_LIMIT and not _nan_payload(array):
        flat = array.reshape(-1)
        if array.dtype.kind == "f":
            items = [format_float(x) for x in flat.tolist()]
        else:
            items = [str(int(x)) for x in flat.tolist()]
        return "[" + ", ".join(items) + "]"
    raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return 'b64"' + base64.b64encode(raw).decode("ascii") + '"'


def format_node(node: Node) -> str:
    """One node's line, without indentation."""
    outs = ", ".join(format_name(v.name) for v in node.outputs)
    ins = ", ".join("_" if v is None else format_name(v.name) for v in node.inputs)
    text = f"{outs} = {node.op}({ins})"
    if node.attrs:
        attrs = ", ".join(f"{k}={format_attr(v)}" for k, v in sorted(node.attrs.items()))
        text += " {" + attrs + "}"
    text += " : " + ", ".join(format_type(v.type) for v in node.outputs)
    if node.name:
        text += f" @{json.dumps(node.name)}"
    return text


def format_constant(value: Value, elide_above: int | None = None) -> str:
    """One constant's line, without indentation."""
    assert value.const is not None
    data = format_data(value.const, elide_above)
    signed = packed_int4(value.type)
    if data.startswith("b64") and signed is not None and fits_int4(value.const, signed):
        data = 'i4"' + base64.b64encode(pack_int4(value.const)).decode("ascii") + '"'
    return f"{format_name(value.name)} = const {format_type(value.type)} {data}"


def to_text(graph: Graph, *, elide_above: int | None = None) -> str:
    """The graph as text. With ``elide_above``, larger constants print as ``<...>``."""
    params = ", ".join(f"{format_name(v.name)}: {format_type(v.type)}" for v in graph.inputs)
    lines = [f"graph {format_name(graph.name)[1:]}({params}) {{"]
    lines += [f"  {format_constant(v, elide_above)}" for v in graph.constants]
    lines += [f"  {format_node(n)}" for n in graph.nodes]
    lines.append("  return " + ", ".join(format_name(v.name) for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"
