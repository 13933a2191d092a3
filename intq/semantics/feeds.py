"""What a graph's run-time inputs must be: every input given, shapes exact, dtypes compatible,
indices inside their tables. Every executable and the interpreters check feeds here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from intq.errors import ShapeError
from intq.ir.graph import Value


def check_feeds(inputs: Sequence[Value], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Match ``feeds`` to the graph inputs: every input given, shapes exact, dtypes compatible.

    Arrays of another float width (numpy's default float64 for an f32 input)
    are converted; integer arrays are converted when no value changes. Anything
    else raises :class:`ShapeError` naming the input.
    """
    expected = {v.name: v for v in inputs}
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
        table = node.inputs[0]
        if node.op != "Gather" or use.index != 1 or table is None or not array.size:
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


__all__ = ["check_feeds"]
