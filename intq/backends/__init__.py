"""Backends: turn an IR graph into an executable for one runtime, and reopen saved ones.

:data:`TARGETS` is the one table of backends: each backend declares one
:class:`~intq.backends.base.Backend` record (its compile and load functions, its artifact's
suffixes). :func:`compile` and :func:`load` dispatch through it; every backend's executable
has ``.run(inputs)`` and ``.save(path)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from intq.artifacts import envelope_target, read_artifact_bytes
from intq.backends import tvm_runtime
from intq.backends.base import Backend, Executable
from intq.backends.onnxruntime import ONNXRUNTIME
from intq.backends.reference import REFERENCE
from intq.backends.tvm_runtime import load_tvm
from intq.errors import ArtifactError, IntqError
from intq.ir.graph import Graph
from intq.passes.range_analysis import prove_no_overflow

# The TVM compiler is imported on first use: its schedules import TVM, an optional heavy
# dependency that `import intq` must not pull in (the runtime module imports TVM only when a
# library is loaded or run).


def _compile_tvm(graph: Graph, **options: Any) -> Executable:
    from intq.backends.tvm import compile_tvm

    return compile_tvm(graph, **options)


def _load_tvm(path: Path, data: bytes) -> Executable:
    """A TVM library with its manifest, which holds the library's sha256 (the library's bytes
    are read again there, next to the manifest)."""
    return load_tvm(path)


TVM = Backend(
    "tvm",
    _compile_tvm,
    _load_tvm,
    tvm_runtime.SUFFIXES,
    tvm_runtime.ARTIFACT,
)
"""The TVM backend's record (:mod:`intq.backends.tvm`, :mod:`intq.backends.tvm_runtime`)."""

TARGETS: dict[str, Backend] = {b.name: b for b in (REFERENCE, ONNXRUNTIME, TVM)}
"""Target name -> backend record. A new backend adds its record here."""


def compile(graph: Graph, target: str = "reference", **options: Any) -> Executable:
    """Compile ``graph`` for ``target``; returns an executable with ``.run`` and ``.save``.

    An integer graph must pass the overflow proof first, whatever the target
    (:func:`~intq.passes.range_analysis.prove_no_overflow`): a layer whose int32 accumulator
    or int64 product could overflow raises :class:`~intq.errors.NumericsError` naming it.
    """
    backend = TARGETS.get(target)
    if backend is None:
        raise IntqError(
            f"unknown target {target!r}", hint=f"the targets are: {', '.join(sorted(TARGETS))}"
        )
    # The one overflow gate, before any target's compiler sees the graph: an integer graph the
    # range analysis cannot prove is refused (naming the layer) on every target alike.
    prove_no_overflow(graph)
    return backend.compile(graph, **options)


def artifact_target(path: Path, data: bytes) -> str:
    """Which target wrote the artifact: from its header or metadata, else its suffix."""
    target = envelope_target(path, data)
    if target is not None:
        return target
    for backend in TARGETS.values():
        if path.suffix in backend.suffixes:
            return backend.name
    raise ArtifactError(
        f"{path} is not an intq artifact",
        hint="intq.load reads what exe.save / intq compile wrote: "
        + ", ".join(s for b in TARGETS.values() for s in b.suffixes),
    )


def load(path: str | Path) -> Executable:
    """Reopen an artifact written by ``exe.save`` / ``intq compile``; returns an executable.

    The checksum and format version are verified first: a modified, damaged or
    other-version file raises :class:`ArtifactError`.
    """
    path, data = read_artifact_bytes(path)
    target = artifact_target(path, data)
    backend = TARGETS.get(target)
    if backend is None:
        raise ArtifactError(
            f"{path} was written for target {target!r}, which this intq cannot load",
            hint=f"loadable targets: {', '.join(sorted(TARGETS))}",
        )
    try:
        return backend.load(path, data)
    except ArtifactError:
        raise
    except IntqError as err:
        raise ArtifactError(f"{path}: {err}") from None


__all__ = ["TARGETS", "Backend", "Executable", "artifact_target", "compile", "load"]
