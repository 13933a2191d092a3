"""Saved artifacts' envelope: a format version, the target that wrote it, a sha256.

Two envelopes, one rule: the artifact says what it is (format version, target) and carries
the sha256 of its payload; opening it recomputes the checksum and refuses a file whose
checksum or version does not match, with an :class:`ArtifactError` saying which.

- Text (``.intq``): the payload after one header line (a comment to the IR parser)::

      # intq-artifact format=1 target=reference sha256=<hex of the UTF-8 payload>

- ONNX (``.onnx``): a standard ONNX model; ``metadata_props`` hold ``intq.format``,
  ``intq.target``, ``intq.layers`` (JSON: per-layer bits and scales) and ``intq.sha256``:
  of the whole model serialized deterministically without that last entry (graph, opsets,
  IR version, the other metadata). Plain ONNX Runtime ignores the metadata.

The ONNX envelope lives here rather than beside the ONNX Runtime backend because loading
reads an ``.onnx`` file's metadata to learn which target wrote it before any backend is
chosen, and because it needs nothing but ``onnx`` (imported by the functions that use it,
so that this module stays cheap to import). This module knows no backend: the backends
seal and open their payloads with it, and :func:`intq.backends.load` picks the backend
from :func:`envelope_target`. Nothing is unpickled: the payloads are text and protobuf.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from intq.errors import ArtifactError, IntqError

if TYPE_CHECKING:
    import onnx

FORMAT_VERSION = 1
"""Bumped whenever a payload's meaning changes; loading refuses other versions."""

MAX_ARTIFACT_BYTES = 1 << 31
"""Larger files are refused before they are read (protobuf's own limit is 2 GiB)."""

_HEADER = re.compile(
    rb"# intq-artifact format=(?P<version>\d{1,9}) target=(?P<target>[A-Za-z0-9_.-]+)"
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


# ----- text: one header line -----------------------------------------------------------


def has_header(data: bytes) -> bool:
    """True when ``data`` starts like a text artifact (its header may still be damaged)."""
    return data.startswith(_MAGIC)


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


# ----- ONNX: metadata in the model ------------------------------------------------------


def _onnx_digest(model: onnx.ModelProto) -> str:
    """sha256 of the whole model except its ``intq.sha256`` entry."""
    import onnx

    unsealed = onnx.ModelProto()
    unsealed.CopyFrom(model)
    kept = [p for p in unsealed.metadata_props if p.key != "intq.sha256"]
    del unsealed.metadata_props[:]
    unsealed.metadata_props.extend(kept)
    return _sha256(unsealed.SerializeToString(deterministic=True))


def seal_onnx(
    model: onnx.ModelProto, layers: Sequence[dict[str, Any]], target: str = "onnxruntime"
) -> bytes:
    """The serialized ``model`` with intq's metadata: format, target, the per-layer table
    ``layers`` (:func:`intq.inspection.layer_table` of the graph the model computes), and the
    sha256 of everything else in the file."""
    import onnx

    sealed = onnx.ModelProto()
    sealed.CopyFrom(model)
    entries = {
        "intq.format": str(FORMAT_VERSION),
        "intq.target": target,
        "intq.layers": json.dumps(list(layers), separators=(",", ":")),
    }
    kept = [p for p in sealed.metadata_props if not p.key.startswith("intq.")]
    del sealed.metadata_props[:]
    sealed.metadata_props.extend(kept)
    for key, value in entries.items():
        sealed.metadata_props.add(key=key, value=value)
    sealed.metadata_props.add(key="intq.sha256", value=_onnx_digest(sealed))
    return sealed.SerializeToString(deterministic=True)


def parse_onnx(
    data: bytes,
    path: Path,
    error: type[IntqError] = ArtifactError,
    hint: str = "recompile the model, or copy the file again",
) -> onnx.ModelProto:
    """An ONNX model from ``data`` (read from ``path``), or ``error`` naming ``path``: an
    artifact's by default; the ONNX importer passes its own error and hint."""
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise error(
            f"{path} is not a valid ONNX file ({err}); it may be truncated or corrupt",
            hint=hint,
        ) from None
    if not model.HasField("graph"):
        raise error(f"{path} holds no ONNX graph; it is not an ONNX model")
    return model


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


def open_onnx(data: bytes, path: Path) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """The verified model of an ``.onnx`` artifact's bytes and its per-layer table."""
    model = parse_onnx(data, path)
    layers: list[dict[str, Any]] = json.loads(onnx_metadata(model, path)["intq.layers"])
    return model, layers


# ----- which target wrote it ------------------------------------------------------------


def envelope_target(path: Path, data: bytes) -> str | None:
    """The target an artifact's envelope names: a text header's, or an ``.onnx`` file's
    metadata (verified); None for a file with neither, which only its suffix can place."""
    if has_header(data):
        match = _HEADER.match(data)
        if match is None:
            raise ArtifactError(f"{path} has a damaged intq artifact header")
        return match["target"].decode()
    if path.suffix == ".onnx":
        return onnx_metadata(parse_onnx(data, path), path).get("intq.target", "onnxruntime")
    return None


__all__ = [
    "FORMAT_VERSION",
    "MAX_ARTIFACT_BYTES",
    "envelope_target",
    "has_header",
    "onnx_metadata",
    "open_onnx",
    "open_text",
    "parse_onnx",
    "read_artifact_bytes",
    "seal_onnx",
    "seal_text",
]
