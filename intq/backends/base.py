"""What every backend shares: the executable interface, input checks, atomic writes, and
the rows of a per-kernel profile."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from intq.errors import ArtifactError, IntqError, ShapeError
from intq.ir.graph import Graph, Value


class Executable(Protocol):
    """A compiled graph: run it, or save it as an artifact."""

    target: str

    @property
    def input_names(self) -> list[str]: ...

    @property
    def output_names(self) -> list[str]: ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on ``inputs`` (name -> array); returns output name -> array."""
        ...

    def save(self, path: str | Path) -> Path:
        """Write the artifact atomically; returns its path."""
        ...


@dataclass(frozen=True)
class KernelTime:
    """One row of a per-kernel profile (``.profile(inputs)`` of the TVM and ONNX Runtime
    executables): a kernel, the graph nodes it computes, and its time per run."""

    kernel: str
    """The runtime's name for it: a TVM prim func or VM builtin, an ONNX Runtime node."""
    nodes: tuple[str, ...]
    """The intq graph nodes it computes (TVM shares one prim func among identical nodes; a
    layout change names the value it transposes); empty for the runtime's own calls."""
    calls: int
    """Calls per run."""
    ms: float
    """Median over the runs of its time in one run, all its calls together."""


def check_profile_runs(runs: int, warmup: int) -> None:
    """Refuse a profile of fewer than one timed run or a negative warm-up."""
    if runs < 1 or warmup < 0:
        raise IntqError(f"profile needs runs >= 1 and warmup >= 0, not {runs} and {warmup}")


def kernel_times(
    runs: Sequence[Mapping[str, tuple[int, float]]], nodes: Mapping[str, Sequence[str]]
) -> list[KernelTime]:
    """The profile of ``runs`` (each: kernel -> (calls, ms) in that run), slowest first;
    ``nodes`` names the graph nodes of each kernel it knows."""
    names = {name for run in runs for name in run}
    rows = [
        KernelTime(
            name,
            tuple(nodes.get(name, ())),
            max(run.get(name, (0, 0.0))[0] for run in runs),
            float(np.median([run.get(name, (0, 0.0))[1] for run in runs])),
        )
        for name in names
    ]
    return sorted(rows, key=lambda row: (-row.ms, row.kernel))


class GraphExecutable:
    """What executables built from an IR graph share: the graph and its input/output names."""

    target = ""

    def __init__(self, graph: Graph):
        self.graph = graph

    @property
    def input_names(self) -> list[str]:
        """Names of the inputs ``run`` expects."""
        return [v.name for v in self.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        """Names of the outputs ``run`` returns."""
        return [v.name for v in self.graph.outputs]


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    A crash or a full disk leaves either the old file or none, never half
    of a new one.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # mkstemp makes the file private (0600); give it the usual permissions.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        raise ArtifactError(f"cannot write {path}: {err.strerror or err}") from err
    return path
