"""Calibration data in the forms users have it, as batches the model takes.

:func:`calibration_batches` accepts a list (or any iterable) of input dicts, a numpy array
for a single-input model, a dict of arrays, a torch ``DataLoader`` (or any iterable of
tensors, ``(inputs, labels)`` pairs or dicts), or the path of an ``.npz`` archive with one
array per input. Samples are on the first axis; they are regrouped into batches of the
model's batch size (a last partial batch is dropped). Wrong names, per-sample shapes or
dtypes raise :class:`~intq.errors.ShapeError` naming the input and saying what to pass.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from intq.errors import ArtifactError, ShapeError
from intq.ir.graph import Value


def _to_numpy(x: Any) -> Any:
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor
        return x.detach().cpu().numpy()
    return x


def _inputs_text(inputs: Sequence[Value]) -> str:
    return ", ".join(f"{v.name}: {v.type}" for v in inputs)


def _as_dict(item: Any, inputs: Sequence[Value], index: int) -> dict[str, np.ndarray]:
    """One item of calibration data as name -> array."""
    item = _to_numpy(item)
    if isinstance(item, Mapping):
        return {str(k): np.asarray(_to_numpy(v)) for k, v in item.items()}
    if isinstance(item, np.ndarray):
        if len(inputs) != 1:
            raise ShapeError(
                f"calibration item {index} is one array, but the model has {len(inputs)} inputs",
                hint="pass dicts mapping each input name to an array: " + _inputs_text(inputs),
            )
        return {inputs[0].name: item}
    if isinstance(item, (tuple, list)) and item:
        # A DataLoader's (inputs, labels) pair, or positional inputs.
        arrays = [np.asarray(_to_numpy(x)) for x in item]
        if len(inputs) == 1:
            return {inputs[0].name: arrays[0]}
        if len(arrays) >= len(inputs):
            return {v.name: a for v, a in zip(inputs, arrays)}
    raise ShapeError(
        f"calibration item {index} is a {type(item).__name__}, not an array or a dict of arrays",
        hint="pass a list of dicts {input name: array}, a numpy array (one input), a torch"
        " DataLoader, or an .npz path; the inputs are " + _inputs_text(inputs),
    )


def _check(arrays: dict[str, np.ndarray], inputs: Sequence[Value], where: str) -> None:
    names = {v.name for v in inputs}
    unknown = sorted(set(arrays) - names)
    missing = [v.name for v in inputs if v.name not in arrays]
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"no data for input(s) {missing}")
        if unknown:
            parts.append(f"unknown input name(s) {unknown}")
        raise ShapeError(
            f"{where}: {'; '.join(parts)}",
            hint="name the calibration arrays after the model's inputs: " + _inputs_text(inputs),
        )
    for value in inputs:
        array = arrays[value.name]
        want = value.type.shape[1:]
        if array.ndim == len(value.type.shape) - 1 and array.shape == want:
            array = array[None]  # a single sample without its batch axis
            arrays[value.name] = array
        if tuple(array.shape[1:]) != tuple(want):
            raise ShapeError(
                f"{where}: input {value.name!r} has samples of shape {list(array.shape[1:])}"
                f" (array {list(array.shape)}), the model takes {list(want)} per sample",
                hint=f"pass arrays of shape [N, {', '.join(map(str, want))}] for"
                f" {value.name!r}, samples on the first axis",
            )
        target = value.type.dtype.numpy
        if array.dtype.kind != target.kind and not (
            array.dtype.kind in "iu" and target.kind in "iu"
        ):
            raise ShapeError(
                f"{where}: input {value.name!r} has dtype {array.dtype}, the model takes {target}",
                hint=f"convert it with .astype(np.{target})",
            )
        if array.dtype.kind in "iu" and target.kind in "iu":
            converted = array.astype(target)
            if not np.array_equal(converted, array):
                raise ShapeError(
                    f"{where}: input {value.name!r} holds values that do not fit {target}"
                )
            arrays[value.name] = converted
        else:
            arrays[value.name] = array.astype(target, copy=False)


def _rebatch(
    items: Iterable[dict[str, np.ndarray]], inputs: Sequence[Value]
) -> Iterator[dict[str, np.ndarray]]:
    batch = inputs[0].type.shape[0] if inputs[0].type.shape else 1
    pending: dict[str, list[np.ndarray]] = {v.name: [] for v in inputs}
    count = 0
    produced = 0
    for arrays in items:
        counts = {len(a) for a in arrays.values()}
        if len(counts) != 1:
            raise ShapeError(
                "calibration inputs hold different numbers of samples: "
                + ", ".join(f"{k}: {len(a)}" for k, a in arrays.items()),
                hint="give every input the same number of samples",
            )
        for name, array in arrays.items():
            pending[name].append(array)
        count += counts.pop()
        while count >= batch:
            joined = {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in pending.items()}
            yield {k: a[:batch] for k, a in joined.items()}
            produced += 1
            pending = {k: [a[batch:]] for k, a in joined.items()}
            count -= batch
    if produced == 0:
        raise ShapeError(
            f"the calibration data holds {count} samples, fewer than one batch of {batch}",
            hint=f"give at least {batch} samples (the model's batch size), better a few hundred",
        )


def calibration_batches(data: Any, inputs: Sequence[Value]) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the model's batch size (name -> array) from ``data`` in any accepted form
    (see the module docstring), checked against the graph ``inputs``."""
    if isinstance(data, (str, os.PathLike)):
        yield from _rebatch([_npz(Path(data), inputs)], inputs)
        return
    data = _to_numpy(data)
    if isinstance(data, np.ndarray):
        if len(inputs) != 1:
            raise ShapeError(
                f"calibration data is one array, but the model has {len(inputs)} inputs",
                hint="pass a list of dicts mapping each input name to an array: "
                + _inputs_text(inputs),
            )
        data = {inputs[0].name: data}
    if isinstance(data, Mapping):
        arrays = {str(k): np.asarray(_to_numpy(v)) for k, v in data.items()}
        _check(arrays, inputs, "calibration data")
        yield from _rebatch([arrays], inputs)
        return
    if not isinstance(data, Iterable):
        raise ShapeError(
            f"calibration data of type {type(data).__name__} is not supported",
            hint="pass a list of dicts, a numpy array, a torch DataLoader or an .npz path",
        )

    def items() -> Iterator[dict[str, np.ndarray]]:
        for index, item in enumerate(data):
            arrays = _as_dict(item, inputs, index)
            _check(arrays, inputs, f"calibration item {index}")
            yield arrays

    yield from _rebatch(items(), inputs)


def model_batches(data: Any, inputs: Sequence[Value]) -> Iterable[dict[str, np.ndarray]]:
    """``data`` as batches for ``inputs``, in any form :func:`calibration_batches` accepts.

    Input dicts that already hold exactly the inputs' shapes (judged by the first) are
    returned as they are, unchecked and not regrouped: that is the form ``intq.quantize``
    always took, and a graph whose inputs have no common sample axis (``x[2, 3]`` with
    ``y[3]``) has no other. So is an empty list or iterator (calibration says it is empty)."""
    if isinstance(data, (Sequence, Iterator)) and not isinstance(data, (str, bytes)):
        if isinstance(data, Sequence):
            if not data or _exact(data[0], inputs):
                return data
        else:
            try:
                first = next(data)
            except StopIteration:
                return []
            data = itertools.chain([first], data)
            if _exact(first, inputs):
                return data
    return calibration_batches(data, inputs)


def _exact(item: Any, inputs: Sequence[Value]) -> bool:
    """True when ``item`` is an input dict holding exactly the inputs' names and shapes."""
    return (
        isinstance(item, Mapping)
        and set(item) == {v.name for v in inputs}
        and all(tuple(np.shape(item[v.name])) == v.type.shape for v in inputs)
    )


def _npz(path: Path, inputs: Sequence[Value]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ArtifactError(f"no calibration file at {path}", hint="check the path")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError) as err:
        raise ArtifactError(
            f"cannot read calibration data {path}: {err}",
            hint="save it with numpy.savez(path, input_name=array, ...)",
        ) from None
    if len(inputs) == 1 and len(arrays) == 1 and inputs[0].name not in arrays:
        (only,) = arrays
        raise ShapeError(
            f"{path} holds an array named {only!r}, the model's input is {inputs[0].name!r}",
            hint=f"save it as numpy.savez({str(path)!r}, {inputs[0].name}=array)",
        )
    if all(v.name in arrays for v in inputs):
        arrays = {v.name: arrays[v.name] for v in inputs}  # other arrays (labels) are ignored
    _check(arrays, inputs, str(path))
    return arrays


__all__ = ["calibration_batches", "model_batches"]
