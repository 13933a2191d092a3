"""Saved artifacts: a versioned, checksummed envelope, and ``intq.load`` to reopen them.

Two formats, one rule: the artifact says what it is (format version, target) and carries
the sha256 of its payload; loading recomputes the checksum and refuses a file whose
checksum, version or target does not match, with an :class:`ArtifactError` saying which.

- ``reference`` (``.intq``): textual IR after one header line (a comment to the IR parser)::

      # intq-artifact format=1 target=reference sha256=<hex of the UTF-8 payload>

- ``onnxruntime`` (``.onnx``): a standard ONNX model; ``metadata_props`` hold
  ``intq.format``, ``intq.target``, ``intq.layers`` (JSON: per-layer bits and scales) and
  ``intq.sha256``: of the whole model serialized deterministically without that last entry
  (graph, opsets, IR version, the other metadata). Plain ONNX Runtime ignores the metadata.

Nothing is unpickled: the payloads are text and protobuf. A new backend plugs in with one
entry in :data:`FORMATS` (its loader and file suffixes).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from intq.errors import ArtifactError, IntqError

if TYPE_CHECKING:
    import onnx

    from intq.backends.base import Executable
    from intq.ir.graph import Graph

FORMAT_VERSION = 1
"""Bumped whenever a payload's meaning changes; loading refuses other versions."""

MAX_ARTIFACT_BYTES = 1 << 31
"""Larger files are refused before they are read (protobuf's own limit is 2 GiB)."""

_HEADER = re.compile(
    rb"# intq-artifact format=(?P<version>\d+) target=(?P<target>[A-Za-z0-9_.-]+)"
    rb" sha256=(?P<digest>[0-9a-f]{64})\n"
)
_MAGIC = b"# intq-artifact "


def _sha256(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for i, part in enumerate(parts):
        if i:
            digest.update(b"\0")
        digest.update(part)
    return digest.hexdigest()


def _check_version(path: Path, version: int) -> None:
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} is an intq artifact of format version {version}; this intq reads"
            f" version {FORMAT_VERSION}",
            hint="recompile the model with this version of intq (intq compile ...)",
        )


def _tampered(path: Path) -> ArtifactError:
    return ArtifactError(
        f"{path} does not match its checksum: the file was modified or damaged after intq wrote it",
        hint="do not edit artifacts; recompile the model (intq compile ...) or copy it again",
    )


# ----- reference: textual IR ------------------------------------------------------------


def seal_text(text: str, target: str = "reference") -> bytes:
    """The bytes of a ``.intq`` artifact holding the textual IR ``text``."""
    payload = text.encode()
    header = f"# intq-artifact format={FORMAT_VERSION} target={target} sha256={_sha256(payload)}\n"
    return header.encode() + payload


def open_text(data: bytes, path: Path) -> str:
    """The verified textual IR of a ``.intq`` artifact's bytes."""
    match = _HEADER.match(data)
    if match is None:
        raise ArtifactError(
            f"{path} has no valid intq artifact header",
            hint="intq.load reads files written by exe.save / intq compile; read hand-written"
            " textual IR with intq.ir.from_text",
        )
    _check_version(path, int(match["version"]))
    payload = data[match.end() :]
    if _sha256(payload) != match["digest"].decode():
        raise _tampered(path)
    try:
        return payload.decode()
    except UnicodeDecodeError:
        raise _tampered(path) from None


def _load_reference(path: Path, data: bytes) -> Executable:
    from intq.backends.reference import compile_reference
    from intq.ir.parser import from_text

    return compile_reference(from_text(open_text(data, path)))


# ----- onnxruntime: ONNX with metadata ----------------------------------------------------


def _onnx_digest(model: onnx.ModelProto) -> str:
    """sha256 of the whole model except its ``intq.sha256`` entry."""
    import onnx

    unsealed = onnx.ModelProto()
    unsealed.CopyFrom(model)
    kept = [p for p in unsealed.metadata_props if p.key != "intq.sha256"]
    del unsealed.metadata_props[:]
    unsealed.metadata_props.extend(kept)
    return _sha256(unsealed.SerializeToString(deterministic=True))


def seal_onnx(model: onnx.ModelProto, graph: Graph, target: str = "onnxruntime") -> bytes:
    """The serialized ``model`` with intq's metadata: format, target, the per-layer table,
    and the sha256 of everything else in the file."""
    import onnx

    from intq.inspection import layer_table

    sealed = onnx.ModelProto()
    sealed.CopyFrom(model)
    entries = {
        "intq.format": str(FORMAT_VERSION),
        "intq.target": target,
        "intq.layers": json.dumps(layer_table(graph), separators=(",", ":")),
    }
    kept = [p for p in sealed.metadata_props if not p.key.startswith("intq.")]
    del sealed.metadata_props[:]
    sealed.metadata_props.extend(kept)
    for key, value in entries.items():
        sealed.metadata_props.add(key=key, value=value)
    sealed.metadata_props.add(key="intq.sha256", value=_onnx_digest(sealed))
    return sealed.SerializeToString(deterministic=True)


def parse_onnx(data: bytes, path: Path) -> onnx.ModelProto:
    """An ONNX model from ``data``, or an :class:`ArtifactError` naming ``path``."""
    from intq.frontends.onnx_import import parse_model

    return parse_model(
        data, path, ArtifactError, hint="recompile the model, or copy the file again"
    )


def onnx_metadata(model: onnx.ModelProto, path: Path) -> dict[str, str]:
    """The verified intq metadata of an ONNX artifact."""
    meta = {p.key: p.value for p in model.metadata_props}
    if "intq.format" not in meta:
        raise ArtifactError(
            f"{path} is an ONNX model but not an intq artifact (no intq metadata)",
            hint="convert it first: intq compile MODEL.onnx --calib CALIB.npz -o OUT.onnx",
        )
    try:
        version = int(meta["intq.format"])
    except ValueError:
        raise _tampered(path) from None
    _check_version(path, version)
    if _onnx_digest(model) != meta.get("intq.sha256"):
        raise _tampered(path)
    try:
        json.loads(meta.get("intq.layers", ""))
    except ValueError:
        raise _tampered(path) from None
    return meta


def _load_onnxruntime(path: Path, data: bytes) -> Executable:
    from intq.backends.onnxruntime import LoadedOnnxExecutable

    model = parse_onnx(data, path)
    meta = onnx_metadata(model, path)
    return LoadedOnnxExecutable(model, json.loads(meta["intq.layers"]))


# ----- dispatch -------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactFormat:
    """How to reopen one target's artifacts: ``load(path, data)`` and the usual suffixes."""

    load: Callable[[Path, bytes], Executable]
    suffixes: tuple[str, ...]


def _load_tvm(path: Path, data: bytes) -> Executable:
    """A TVM library with its manifest (which holds the library's sha256)."""
    from intq.backends.tvm_runtime import load_tvm

    return load_tvm(path)


FORMATS: dict[str, ArtifactFormat] = {
    "reference": ArtifactFormat(_load_reference, (".intq",)),
    "onnxruntime": ArtifactFormat(_load_onnxruntime, (".onnx",)),
    "tvm": ArtifactFormat(_load_tvm, (".so", ".tar")),
}
"""Target -> artifact format. A backend with its own artifact adds one entry here."""


def artifact_target(path: Path, data: bytes) -> str:
    """Which target wrote the artifact: from its header or metadata, else its suffix."""
    if data.startswith(_MAGIC):
        match = _HEADER.match(data)
        if match is None:
            raise ArtifactError(f"{path} has a damaged intq artifact header")
        return match["target"].decode()
    if path.suffix == ".onnx":
        meta = onnx_metadata(parse_onnx(data, path), path)
        return meta.get("intq.target", "onnxruntime")
    for target, fmt in FORMATS.items():
        if path.suffix in fmt.suffixes:
            return target
    raise ArtifactError(
        f"{path} is not an intq artifact",
        hint="intq.load reads what exe.save / intq compile wrote: "
        + ", ".join(s for f in FORMATS.values() for s in f.suffixes),
    )


def read_artifact_bytes(path: str | Path) -> tuple[Path, bytes]:
    """The bytes of an artifact file, refusing missing, unreadable and oversized files."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no artifact at {path}", hint="check the path")
    size = path.stat().st_size
    if size > MAX_ARTIFACT_BYTES:
        raise ArtifactError(f"{path} is {size} bytes, more than intq reads ({MAX_ARTIFACT_BYTES})")
    try:
        return path, path.read_bytes()
    except OSError as err:
        raise ArtifactError(f"cannot read {path}: {err.strerror or err}") from None


def load(path: str | Path) -> Executable:
    """Reopen an artifact written by ``exe.save`` / ``intq compile``; returns an executable.

    The checksum and format version are verified first: a modified, damaged or
    other-version file raises :class:`ArtifactError`.
    """
    path, data = read_artifact_bytes(path)
    target = artifact_target(path, data)
    fmt = FORMATS.get(target)
    if fmt is None:
        raise ArtifactError(
            f"{path} was written for target {target!r}, which this intq cannot load",
            hint=f"loadable targets: {', '.join(sorted(FORMATS))}",
        )
    try:
        return fmt.load(path, data)
    except ArtifactError:
        raise
    except IntqError as err:
        raise ArtifactError(f"{path}: {err}") from None


def describe(meta: dict[str, Any]) -> str:
    """One line about an artifact's metadata (for ``intq inspect``)."""
    return f"intq artifact: format {meta.get('intq.format')}, target {meta.get('intq.target')}"


__all__ = [
    "FORMATS",
    "FORMAT_VERSION",
    "ArtifactFormat",
    "load",
    "open_text",
    "seal_onnx",
    "seal_text",
]
