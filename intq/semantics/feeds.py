"""What a graph's run-time inputs must be: every input given, shapes exact, dtypes compatible,
indices inside their tables. Every executable and the interpreters check feeds here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from intq.errors import ShapeError
from intq.ir.graph import Value

Feeds = Mapping[str, np.ndarray] | np.ndarray
"""What ``run`` takes: input name -> array, or the bare array of a single-input model."""


def check_feeds(
    inputs: Sequence[Value],
    feeds: Feeds,
    tables: Mapping[str, Sequence[IndexTable]] | None = None,
) -> dict[str, np.ndarray]:
    """Match ``feeds`` to the graph inputs: every input given, shapes exact, dtypes compatible,
    indices inside the tables they index (``tables`` per input name, for inputs without the
    graph around them: a loaded artifact's; else read from each input's uses).

    ``feeds`` maps input names to arrays; a single-input graph also takes the bare array.
    Arrays of another float width (numpy's default float64 for an f32 input)
    are converted; integer arrays are converted when no value changes. Anything
    else raises :class:`ShapeError` naming the input.
    """
    expected = {v.name: v for v in inputs}
    if not isinstance(feeds, Mapping):
        feeds = _single_input(inputs, feeds)
    unknown = sorted(set(feeds) - set(expected))
    missing = [name for name in expected if name not in feeds]
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing inputs {missing}")
        if unknown:
            parts.append(f"unknown inputs {unknown}")
        raise ShapeError(
            "; ".join(parts),
            hint="the model's inputs are " + ", ".join(f"{v.name}: {v.type}" for v in inputs),
        )
    out = {}
    for name, value in expected.items():
        array = np.asarray(feeds[name])
        want = value.type
        if array.shape != want.shape:
            raise ShapeError(
                f"input {name!r} has shape {list(array.shape)},"
                f" the model expects {list(want.shape)}",
                hint="convert the model with input_shapes= set to the shape you will run with",
            )
        target = want.dtype.numpy
        if array.dtype != target:
            same_kind = array.dtype.kind == target.kind == "f" or (
                array.dtype.kind in "iu" and target.kind in "iu"
            )
            converted = array.astype(target) if same_kind else None
            if converted is None or (target.kind in "iu" and not np.array_equal(converted, array)):
                raise ShapeError(
                    f"input {name!r} has dtype {array.dtype}, the model expects {target}",
                    hint=f"pass the array as .astype(np.{target})",
                )
            array = converted
        _check_indices(name, array, index_tables(value) if tables is None else tables[name])
        out[name] = array
    return out


@dataclass(frozen=True)
class IndexTable:
    """A table that an integer input indexes (the data of a ``Gather`` reading it): the
    node, the table's name and its length along the gathered axis."""

    node: str
    table: str
    size: int


def index_tables(value: Value) -> tuple[IndexTable, ...]:
    """The tables graph input ``value`` indexes (what :func:`check_feeds` checks its
    values against)."""
    found = []
    for use in value.uses():
        node = use.node
        table = node.operand(0) if node.op == "Gather" and use.index == 1 else None
        if table is not None:
            found.append(IndexTable(node.label(), table.name, table.type.shape[node.attrs["axis"]]))
    return tuple(found)


def _check_indices(name: str, array: np.ndarray, tables: Sequence[IndexTable]) -> None:
    """Token ids and other indices fed to a ``Gather`` must lie in its table."""
    if not tables or not array.size:
        return
    low, high = int(array.min()), int(array.max())
    for table in tables:
        size = table.size
        if low < -size or high >= size:
            raise ShapeError(
                f"input {name!r} holds index {low if low < -size else high}, outside"
                f" [{-size}, {size - 1}] of {table.table!r}",
                node=table.node,
                hint="token ids must come from the model's own tokenizer / vocabulary",
            )


def _single_input(inputs: Sequence[Value], feed: object) -> dict[str, np.ndarray]:
    """A bare array (numpy, or anything with ``__array__``: a torch tensor) as the feed of a
    single-input graph; anything else, or several inputs, raises :class:`ShapeError`."""
    described = ", ".join(f"{v.name}: {v.type}" for v in inputs)
    if not (isinstance(feed, np.ndarray) or hasattr(feed, "__array__")):
        raise ShapeError(
            f"inputs must be a dict of input name -> array, not a {type(feed).__name__}",
            hint=f"pass {{name: array}} for the model's inputs: {described}",
        )
    if len(inputs) != 1:
        raise ShapeError(
            f"one array given, but the model takes {len(inputs)} inputs:"
            f" {', '.join(v.name for v in inputs)}",
            hint=f"pass a dict naming each input: {described}",
        )
    return {inputs[0].name: np.asarray(feed)}


__all__ = ["Feeds", "check_feeds"]
