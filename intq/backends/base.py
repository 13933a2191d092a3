"""What every backend shares: the executable interface, the backend record, atomic writes,
and the rows of a per-kernel profile."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from intq.errors import ArtifactError, IntqError
from intq.inspection import layer_table
from intq.ir.graph import Graph
from intq.semantics.feeds import Feeds
from intq.vectors import write_golden_vectors


class Executable(Protocol):
    """A compiled graph: run it, or save it as an artifact."""

    target: str

    @property
    def input_names(self) -> list[str]: ...

    @property
    def output_names(self) -> list[str]: ...

    def run(self, inputs: Feeds) -> dict[str, np.ndarray]:
        """Run on ``inputs`` (name -> array; a single-input model also takes the bare array);
        returns output name -> array."""
        ...

    @property
    def layers(self) -> list[dict[str, Any]]:
        """The per-layer table: each integer layer's input, weight and output bits and scales
        (:func:`intq.inspection.layer_table`)."""
        ...

    def save(self, path: str | Path) -> Path:
        """Write the artifact atomically; returns its path."""
        ...

    def golden_vectors(
        self, inputs: Feeds, out_dir: str | Path, *, overwrite: bool = False
    ) -> Path:
        """Write every integer node's inputs and outputs on ``inputs`` into ``out_dir``
        (:mod:`intq.vectors`); returns ``out_dir``. Needs the integer graph: an artifact
        loaded without it refuses."""
        ...


@dataclass(frozen=True)
class Backend:
    """One backend as ``intq.compile`` and ``intq.load`` see it: its entry in
    :data:`intq.backends.TARGETS`. Adding a backend means declaring one of these."""

    name: str
    """The target name: ``intq.compile(graph, target=name)``, ``intq compile --target``."""
    compile: Callable[..., Executable]
    """``compile(graph, **options)``: the graph as an executable."""
    load: Callable[[Path, bytes], Executable]
    """``load(path, data)``: the executable reopened from an artifact's path and bytes
    (read by :func:`intq.artifacts.read_artifact_bytes`)."""
    suffixes: tuple[str, ...]
    """The artifact's usual file suffixes: how ``intq.load`` places a file whose envelope
    does not name its target."""
    artifact: str
    """What ``save`` writes, in a few words (for ``intq compile --help``)."""

    def check_path(self, path: str | Path) -> Path:
        """``path`` as the name of this backend's artifact (:func:`check_artifact_path`)."""
        return check_artifact_path(path, self.name, self.suffixes, self.artifact)


def check_artifact_path(
    path: str | Path, target: str, suffixes: Sequence[str], artifact: str
) -> Path:
    """``path`` as the name of a ``target`` artifact: refused (:class:`ArtifactError`,
    before anything is written) unless it ends in one of ``suffixes``, since a file named
    for another kind of artifact misleads its readers and ``intq.load`` places a file by its
    suffix when its envelope does not say."""
    path = Path(path)
    if path.suffix not in suffixes:
        raise ArtifactError(
            f"{path}: a {target} artifact is {artifact}, named {' or '.join(suffixes)}",
            hint=f"save it as {path.with_suffix(suffixes[0]).name}",
        )
    return path


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

    @property
    def layers(self) -> list[dict[str, Any]]:
        """The per-layer table of the graph: each integer layer's bits and scales."""
        return layer_table(self.graph)

    def golden_vectors(
        self, inputs: Feeds, out_dir: str | Path, *, overwrite: bool = False
    ) -> Path:
        """Write every integer node's inputs and outputs on ``inputs`` into ``out_dir``, as
        the reference interpreter computes them (the format of :mod:`intq.vectors`);
        returns ``out_dir``. An existing non-empty ``out_dir`` is refused unless
        ``overwrite``."""
        return write_golden_vectors(self.graph, inputs, out_dir, overwrite=overwrite)


def no_graph_for_vectors(what: str) -> IntqError:
    """The refusal of ``golden_vectors`` by an executable loaded without its IR graph."""
    return IntqError(
        f"{what} holds compiled code, not the integer graph golden vectors are computed from",
        hint="write them from the .intq artifact of the same model (intq quantize, or"
        " intq compile --target reference), or from the executable intq.compile returned",
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
