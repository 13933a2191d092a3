"""What a graph's run-time inputs must be: every input given, shapes exact, dtypes compatible,
indices inside their tables. Every executable and the interpreters check feeds here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from intq.errors import ShapeError
from intq.ir.graph import Value

Feeds = Mapping[str, np.ndarray] | np.ndarray
"""What ``run`` takes: input name -> array, or the bare array of a single-input model."""


def check_feeds(inputs: Sequence[Value], feeds: Feeds) -> dict[str, np.ndarray]:
    """Match ``feeds`` to the graph inputs: every input given, shapes exact, dtypes compatible.

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
        _check_indices(value, array)
        out[name] = array
    return out


def _check_indices(value: Value, array: np.ndarray) -> None:
    """Token ids and other indices fed to a ``Gather`` must lie in its table."""
    for use in value.uses():
        node = use.node
        if node.op != "Gather" or use.index != 1 or not array.size:
            continue
        table = node.operand(0)
        if table is None:
            continue
        size = table.type.shape[node.attrs["axis"]]
        low, high = int(array.min()), int(array.max())
        if low < -size or high >= size:
            raise ShapeError(
                f"input {value.name!r} holds index {low if low < -size else high}, outside"
                f" [{-size}, {size - 1}] of {table.name!r}",
                node=node.label(),
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
