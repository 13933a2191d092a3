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
import math
import os
import tokenize
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.lib import format as npy_format

from intq import limits
from intq.errors import ArtifactError, IntqError, ShapeError
from intq.ir.graph import Value


def _to_numpy(x: Any) -> Any:
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor
        return x.detach().cpu().numpy()
    return x


def _inputs_text(inputs: Sequence[Value]) -> str:
    return ", ".join(f"{v.name}: {v.type}" for v in inputs)


def _as_dict(item: Any, names: Sequence[str], index: int, described: str) -> dict[str, np.ndarray]:
    """One item of calibration data as name -> array (``described``: the inputs, for hints)."""
    item = _to_numpy(item)
    if isinstance(item, Mapping):
        return {str(k): np.asarray(_to_numpy(v)) for k, v in item.items()}
    if isinstance(item, np.ndarray):
        if len(names) != 1:
            raise ShapeError(
                f"calibration item {index} is one array, but the model has {len(names)} inputs",
                hint="pass dicts mapping each input name to an array: " + described,
            )
        return {names[0]: item}
    if isinstance(item, (tuple, list)) and item:
        # A DataLoader's (inputs, labels) pair, or positional inputs.
        arrays = [np.asarray(_to_numpy(x)) for x in item]
        if len(names) == 1:
            return {names[0]: arrays[0]}
        if len(arrays) >= len(names):
            return dict(zip(names, arrays))
    raise ShapeError(
        f"calibration item {index} is a {type(item).__name__}, not an array or a dict of arrays",
        hint="pass a list of dicts {input name: array}, a numpy array (one input), a torch"
        " DataLoader, or an .npz path; the inputs are " + described,
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
        want = value.type.shape[1:]  # a rank-0 input's samples are scalars too
        single = array.ndim == len(value.type.shape) - 1 and array.shape == want
        if single or array.ndim == 0:
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
    scalars = {v.name for v in inputs if not v.type.shape}  # inputs without a batch axis
    if scalars and batch != 1:
        raise ShapeError(
            f"input {sorted(scalars)[0]!r} is a scalar, without the batch axis of"
            f" {inputs[0].name!r} (batch {batch}): the model's inputs share no sample axis",
            hint="pass calibration batches as a list of dicts {input name: array} of the"
            " exact shapes the model takes",
        )
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
            yield {k: a[0] if k in scalars else a[:batch] for k, a in joined.items()}
            produced += 1
            pending = {k: [a[batch:]] for k, a in joined.items()}
            count -= batch
    if produced == 0:
        raise ShapeError(
            f"the calibration data holds {count} samples, fewer than one batch of {batch}",
            hint=f"give at least {batch} samples (the model's batch size), better a few hundred",
        )


def _no_empty_inputs(inputs: Sequence[Value]) -> None:
    """Refuse inputs with a zero-size dimension: they hold no samples, and regrouping data
    into batches of zero samples would never end."""
    for value in inputs:
        if 0 in value.type.shape:
            raise ShapeError(
                f"input {value.name!r} has type {value.type}: a zero-size dimension holds no"
                " samples to calibrate on",
                hint="give the model the input shape you will run with (input_shapes=...),"
                " every dimension at least 1",
            )


def calibration_batches(data: Any, inputs: Sequence[Value]) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the model's batch size (name -> array) from ``data`` in any accepted form
    (see the module docstring), checked against the graph ``inputs``."""
    _no_empty_inputs(inputs)
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
            arrays = _as_dict(item, [v.name for v in inputs], index, _inputs_text(inputs))
            _check(arrays, inputs, f"calibration item {index}")
            yield arrays

    yield from _rebatch(items(), inputs)


def first_batch_shapes(
    data: Any, inputs: Mapping[str, int | None]
) -> tuple[dict[str, tuple[int, ...]], Any]:
    """The shapes of the first batch ``data`` gives a model whose inputs have the ranks
    ``inputs`` (name -> rank, None when the model does not say), and the data to calibrate
    with instead of ``data`` (a one-shot iterator's first item is put back).

    These fix an ONNX model's symbolic dimensions. An iterable of batches (a DataLoader, a
    list of dicts) gives its first batch's shapes; a block of samples (an array, a dict of
    arrays, an ``.npz``) has no batch size of its own and gives batches of one sample. A
    sample without its batch axis counts as a batch of one. Inputs the data does not hold are
    left out (the checks of :func:`calibration_batches` report them).
    """
    names = list(inputs)
    described = ", ".join(names)
    found: dict[str, tuple[int, ...]] | None = None
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        # The archive's headers say the shapes: no data is read (calibration_batches reads it).
        found = {k: m.shape for k, m in npz_members(path).items()} if path.is_file() else {}
    else:
        data = _to_numpy(data)
        block: Mapping[str, Any] | None = None
        if isinstance(data, np.ndarray):
            block = {names[0]: data} if len(names) == 1 else {}
        elif isinstance(data, Mapping):
            block = data
        if block is not None:
            found = {str(k): np.shape(_to_numpy(v)) for k, v in block.items()}
    if found is not None:
        return {
            k: (1, *s[1:]) if len(s) == inputs[k] or inputs[k] is None else (1, *s)
            for k, s in found.items()
            if k in inputs
        }, data
    if not isinstance(data, Iterable):
        return {}, data  # calibration_batches says what is wrong with it
    iterator = iter(data)
    try:
        first = next(iterator)
    except StopIteration:
        return {}, []
    arrays = _as_dict(first, names, 0, described)
    shapes = {
        k: a.shape if a.ndim == inputs[k] or inputs[k] is None else (1, *a.shape)
        for k, a in arrays.items()
        if k in inputs
    }
    return shapes, itertools.chain([first], iterator)


def model_batches(data: Any, inputs: Sequence[Value]) -> Iterable[dict[str, np.ndarray]]:
    """``data`` as batches for ``inputs``, in any form :func:`calibration_batches` accepts.

    Input dicts that already hold exactly the inputs' shapes (judged by the first) are
    returned as they are, unchecked and not regrouped: that is the form ``intq.quantize``
    always took, and a graph whose inputs have no common sample axis (``x[2, 3]`` with
    ``y[3]``) has no other. So is an empty list or iterator (calibration says it is empty)."""
    _no_empty_inputs(inputs)
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


# ----- .npz archives, read defensively ------------------------------------------------------

_CHUNK = 1 << 24
"""Bytes read from an archive member at a time."""
_INFLATE = 1032
"""The most deflate can expand its input (258 bytes from 2 bits)."""
_NPZ_HINT = "save it with numpy.savez(path, input_name=array, ...)"
_DTYPE_KINDS = "biuf"
"""Array kinds an archive may hold: bool, signed and unsigned integers, floats. Object arrays
(pickles), strings, structured and complex dtypes are refused before any data is read."""


@dataclass(frozen=True)
class NpzMember:
    """One array of an ``.npz`` archive as its header declares it (nothing read yet)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    info: zipfile.ZipInfo
    offset: int  # where the data starts in the member's uncompressed stream

    @property
    def nbytes(self) -> int:
        """The bytes the data takes, from the declared shape and dtype."""
        return math.prod(self.shape) * self.dtype.itemsize


_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,  # numpy's header checks, a header's int of 5,000 digits
    TypeError,
    SyntaxError,
    RecursionError,
    zipfile.BadZipFile,  # a bad CRC, a truncated central directory
    zlib.error,
    NotImplementedError,
    RuntimeError,
    tokenize.TokenError,  # numpy's fallback parse of a header it takes for Python 2's
)
"""What zipfile, zlib and numpy's header reader raise on a damaged archive."""


def _bad(path: Path, what: str, why: str) -> ArtifactError:
    return ArtifactError(f"{what} {path}: {why}", hint=_NPZ_HINT)


def _member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, what: str, size_on_disk: int
) -> NpzMember:
    """The header of one archive member, checked against the limits and its stored size."""
    member = f"member {info.filename!r}"
    if not info.filename.endswith(".npy") or info.is_dir():
        raise _bad(path, what, f"{member} is not an .npy array")
    if info.flag_bits & 0x1:
        raise _bad(path, what, f"{member} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _bad(path, what, f"{member} uses compression method {info.compress_type}")
    # The sizes the zip directory states, against what the file can hold: deflate expands at
    # most 1032-fold, so a member claiming more (to have an array of that size allocated
    # for 64 bytes of data) is corrupt, whatever its .npy header says.
    most = info.compress_size * (1 if info.compress_type == zipfile.ZIP_STORED else _INFLATE)
    if info.compress_size > size_on_disk or info.file_size > most + 1024:
        raise _bad(
            path,
            what,
            f"{member} claims {info.file_size} bytes from {info.compress_size} stored bytes"
            f" in a {size_on_disk}-byte file: the file is corrupt",
        )
    with archive.open(info) as stream:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise _bad(path, what, f"{member} is in .npy format version {version}")
        offset = stream.tell()
    name = info.filename.removesuffix(".npy")
    if dtype.hasobject or dtype.kind not in _DTYPE_KINDS or dtype.names or dtype.subdtype:
        raise _bad(
            path,
            what,
            f"array {name!r} has dtype {dtype}; intq reads bool, integer and float arrays only"
            " (no objects or pickles)",
        )
    if any(d < 0 for d in shape):
        raise _bad(path, what, f"array {name!r} declares negative dimensions {list(shape)}")
    found = NpzMember(name, tuple(shape), dtype, fortran, info, offset)
    limits.check_size(found.shape, found.dtype.itemsize, f"array {name!r} of {what} {path}")
    if info.file_size != offset + found.nbytes:
        raise _bad(
            path,
            what,
            f"array {name!r} declares shape {list(shape)} ({dtype}, {found.nbytes} bytes), but"
            f" its member holds {max(info.file_size - offset, 0)} bytes of data: the file is"
            " truncated or corrupt",
        )
    return found


def npz_members(path: Path, what: str = "calibration data") -> dict[str, NpzMember]:
    """The arrays of the ``.npz`` archive at ``path`` as their headers declare them (name ->
    :class:`NpzMember`), every one checked before any data is read: a bool, integer or float
    dtype, a shape within ``intq.limits.MAX_TENSOR_BYTES``, and a stored (uncompressed) size
    that is exactly what the shape needs, so a header declaring 10 GB over 64 bytes of data or
    a zip bomb is refused without inflating it. ``what`` names the file in errors."""
    if not path.is_file():
        raise ArtifactError(f"no {what} file at {path}", hint="check the path")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(npy_format.MAGIC_PREFIX))
        if magic == npy_format.MAGIC_PREFIX:
            raise _bad(path, what, "this is an .npy file (one array); intq reads .npz archives")
        if not zipfile.is_zipfile(path):
            raise _bad(path, what, "not an .npz archive (a zip file of .npy arrays)")
        with zipfile.ZipFile(path) as archive:
            members: dict[str, NpzMember] = {}
            for info in archive.infolist():
                member = _member(archive, info, path, what, path.stat().st_size)
                if member.name in members:
                    raise _bad(path, what, f"array {member.name!r} is stored twice")
                members[member.name] = member
            return members
    except IntqError:
        raise
    except _READ_ERRORS as err:
        raise _bad(path, what, f"cannot read it ({type(err).__name__}: {err})") from None


def read_npz(path: Path, what: str = "calibration data") -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` archive at ``path`` (name -> array), each checked by
    :func:`npz_members` before it is read, and read straight into an array of the declared
    size; a member whose data does not inflate to what its header declares (a corrupt
    stream, a bad CRC) is refused naming it."""
    members = npz_members(path, what)
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name, member in members.items():
                flat = np.empty(math.prod(member.shape), member.dtype)
                view = flat.view(np.uint8)
                with archive.open(member.info) as stream:
                    stream.read(member.offset)  # the header, checked by npz_members
                    got = 0
                    while got < member.nbytes:  # in chunks: memory stays the array's size
                        chunk = stream.read(min(_CHUNK, member.nbytes - got))
                        if not chunk:
                            break
                        view[got : got + len(chunk)] = np.frombuffer(chunk, np.uint8)
                        got += len(chunk)
                    if got != member.nbytes or stream.read(1):
                        raise _bad(path, what, f"array {name!r} is truncated")
                order: Literal["C", "F"] = "F" if member.fortran else "C"
                arrays[name] = flat.reshape(member.shape, order=order)
    except IntqError:
        raise
    except _READ_ERRORS as err:
        raise _bad(path, what, f"cannot read it ({type(err).__name__}: {err})") from None
    return arrays


def _npz(path: Path, inputs: Sequence[Value]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ArtifactError(f"no calibration file at {path}", hint="check the path")
    arrays = read_npz(path)
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


__all__ = [
    "NpzMember",
    "calibration_batches",
    "first_batch_shapes",
    "model_batches",
    "npz_members",
    "read_npz",
]
