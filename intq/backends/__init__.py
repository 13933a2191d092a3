"""Backends: turn an IR graph into an executable for one runtime, and reopen saved ones.

:data:`TARGETS` is the one table of backends: each backend declares one
:class:`~intq.backends.base.Backend` record (its compile and load functions, its artifact's
suffixes). :func:`compile` and :func:`load` dispatch through it; every backend's executable
has ``.run(inputs)`` and ``.save(path)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from intq.artifacts import MAX_ARTIFACT_BYTES, envelope_target, read_artifact_bytes
from intq.backends import tvm_runtime
from intq.backends.base import Backend, Executable
from intq.backends.onnxruntime import ONNXRUNTIME
from intq.backends.reference import REFERENCE
from intq.backends.tvm_runtime import load_tvm
from intq.errors import ArtifactError, IntqError
from intq.ir.graph import Graph
from intq.passes.range_analysis import prove_no_overflow
from intq.signing import load_public_keys, verify_files

# The TVM compiler is imported on first use: its schedules import TVM, an optional heavy
# dependency that `import intq` must not pull in (the runtime module imports TVM only when a
# library is loaded or run).


def _compile_tvm(graph: Graph, **options: Any) -> Executable:
    from intq.backends.tvm import compile_tvm

    return compile_tvm(graph, **options)


def _load_tvm(path: Path, files: Mapping[str, bytes]) -> Executable:
    """A TVM library with its manifest (``files``: both, read and checked by :func:`load`)."""
    return load_tvm(path, files)


TVM = Backend(
    "tvm",
    _compile_tvm,
    _load_tvm,
    tvm_runtime.SUFFIXES,
    tvm_runtime.ARTIFACT,
    (tvm_runtime.MANIFEST_SUFFIX,),
)
"""The TVM backend's record (:mod:`intq.backends.tvm`, :mod:`intq.backends.tvm_runtime`)."""

TARGETS: dict[str, Backend] = {b.name: b for b in (REFERENCE, ONNXRUNTIME, TVM)}
"""Target name -> backend record. A new backend adds its record here."""


def compile(graph: Graph, target: str = "reference", **options: Any) -> Executable:
    """Compile ``graph`` for ``target``; returns an executable with ``.run`` and ``.save``.

    The graph is verified first (:func:`intq.ir.verify`): every node's output types are what
    its shape rule gives, each within ``intq.limits.MAX_TENSOR_BYTES``, so no backend runs a
    node whose declared type hides the tensor it would allocate (hand-written or edited IR
    text declaring ``i8[1,2]`` for an Expand to 2^40 elements).

    An integer graph must then pass the overflow proof, whatever the target
    (:func:`~intq.passes.range_analysis.prove_no_overflow`): a layer whose int32 accumulator
    or int64 product could overflow raises :class:`~intq.errors.NumericsError` naming it.
    """
    backend = TARGETS.get(target)
    if backend is None:
        raise IntqError(
            f"unknown target {target!r}", hint=f"the targets are: {', '.join(sorted(TARGETS))}"
        )
    # The one gate, before any target's compiler sees the graph: the verifier, then for an
    # integer graph the overflow proof, refusing (naming the layer) on every target alike.
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


def artifact_files(
    path: str | Path, trusted_keys: Any = None
) -> tuple[Path, Backend, dict[str, bytes]]:
    """The artifact at ``path``: its backend and the bytes of all its files (suffix added
    to the name -> bytes; ``""`` is ``path`` itself), each read once.

    With ``trusted_keys`` (public keys: :func:`intq.signing.load_public_keys`) the
    signature is checked first, before anything in the files is parsed, and must cover
    every file the backend reads (:func:`intq.signing.verify_files`).
    """
    path, data = read_artifact_bytes(path)
    files = {"": data}
    if trusted_keys is not None:
        files = verify_files(path, data, load_public_keys(trusted_keys), MAX_ARTIFACT_BYTES)
    target = artifact_target(path, data)
    backend = TARGETS.get(target)
    if backend is None:
        raise ArtifactError(
            f"{path} was written for target {target!r}, which this intq cannot load",
            hint=f"loadable targets: {', '.join(sorted(TARGETS))}",
        )
    for suffix in backend.companions:
        if suffix in files:
            continue
        if trusted_keys is not None:
            raise ArtifactError(
                f"the signature of {path} does not cover {path.name + suffix}",
                hint="save it again with sign_key=KEY (--sign-key KEY.pem), which signs every file",
            )
        companion = path.with_name(path.name + suffix)
        if not companion.is_file():
            raise ArtifactError(
                f"{path} needs {companion.name} next to it ({backend.artifact}), and there is none",
                hint="save() writes both; keep them together",
            )
        files[suffix] = read_artifact_bytes(companion)[1]
    return path, backend, files


def load(path: str | Path, trusted_keys: Any = None) -> Executable:
    """Reopen an artifact written by ``exe.save`` / ``intq compile``; returns an executable.

    The checksum and format version are verified first: a modified, damaged or
    other-version file raises :class:`ArtifactError`. A checksum detects damage, not
    tampering. ``trusted_keys`` (Ed25519 public keys, their bytes or PEM files) requires a
    signature by one of them over every file of the artifact (``exe.save(path,
    sign_key=...)``), checked before anything is parsed or loaded: an unsigned, wrongly
    signed or altered artifact is refused (:mod:`intq.signing`).
    """
    path, backend, files = artifact_files(path, trusted_keys)
    try:
        return backend.load(path, files)
    except ArtifactError:
        raise
    except IntqError as err:
        raise ArtifactError(f"{path}: {err}") from None


__all__ = [
    "TARGETS",
    "Backend",
    "Executable",
    "artifact_files",
    "artifact_target",
    "compile",
    "load",
]
