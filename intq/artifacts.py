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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from intq.errors import ArtifactError, IntqError
from intq.schema import Invalid, decimal, list_of, obj, parse_fields, parse_json, string

if TYPE_CHECKING:
    import onnx

FORMAT_VERSION = 1
"""Bumped whenever a payload's meaning changes; loading refuses other versions."""

MAX_ARTIFACT_BYTES = 1 << 31
"""Larger files are refused before they are read (protobuf's own limit is 2 GiB)."""

_MAGIC = b"# intq-artifact "
MAX_HEADER = 1024
"""Longest header line of a text artifact (intq writes about 120 bytes)."""

TARGET_NAME = string(64, pattern=r"[A-Za-z0-9_.-]+")
"""A target's name as an envelope records it."""
SHA256 = string(64, pattern=r"[0-9a-f]{64}")
"""A sha256 as lowercase hex."""
VERSION = decimal(0, 10**6)
"""A format version as a header or metadata field holds it."""

_HEADER_FIELDS = {"format": VERSION, "target": TARGET_NAME, "sha256": SHA256}

MAX_LAYERS = 100_000
"""Most rows a saved per-layer table may have."""

LAYER_TABLE = list_of(
    obj(
        {key: string() for key in ("layer", "op", "input", "weights", "output")},
        {"clip": string(), "rounding": string()},
    ),
    MAX_LAYERS,
)
"""The per-layer table (:func:`intq.inspection.layer_table`) as an artifact stores it."""


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


def _header(data: bytes, path: Path) -> tuple[dict[str, Any], int]:
    """The checked fields of a text artifact's header line and where its payload starts."""
    hint = (
        "intq.load reads files written by exe.save / intq compile; read hand-written"
        " textual IR with intq.ir.from_text"
    )
    if not has_header(data):
        raise ArtifactError(f"{path} has no valid intq artifact header", hint=hint)
    end = data.find(b"\n", 0, MAX_HEADER + 1)
    if end < 0:
        raise ArtifactError(
            f"{path}: the intq artifact header has no end of line in its first {MAX_HEADER} bytes",
            hint=hint,
        )
    try:
        line = data[len(_MAGIC) : end].decode("ascii")
    except UnicodeDecodeError:
        raise ArtifactError(f"{path}: the intq artifact header is not ASCII", hint=hint) from None
    fields = parse_fields(line, path, "the intq artifact header", _HEADER_FIELDS, hint=hint)
    return fields, end + 1


def open_text(data: bytes, path: Path) -> str:
    """The verified textual IR of a ``.intq`` artifact's bytes."""
    fields, start = _header(data, path)
    _check_version(path, fields["format"])
    payload = data[start:]
    if _sha256(payload) != fields["sha256"]:
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


_METADATA_HINT = "recompile the model (intq compile ...) or copy the file again"


def onnx_metadata(model: onnx.ModelProto, path: Path) -> dict[str, Any]:
    """The verified intq metadata of an ONNX artifact: ``intq.format`` and ``intq.target``,
    ``intq.layers`` parsed (:data:`LAYER_TABLE`), ``intq.sha256``."""
    meta: dict[str, str] = {}
    for prop in model.metadata_props:
        if prop.key.startswith("intq.") and prop.key in meta:
            raise ArtifactError(
                f"{path}: the metadata entry {prop.key} appears twice", hint=_METADATA_HINT
            )
        meta[prop.key] = prop.value
    if "intq.format" not in meta:
        raise ArtifactError(
            f"{path} is an ONNX model but not an intq artifact (no intq metadata)",
            hint="convert it first: intq compile MODEL.onnx --calib CALIB.npz -o OUT.onnx",
        )
    fields = {"intq.format": VERSION, "intq.target": TARGET_NAME, "intq.sha256": SHA256}
    checked = _metadata_fields(meta, path, fields)
    _check_version(path, checked["intq.format"])
    if _onnx_digest(model) != checked["intq.sha256"]:
        raise _tampered(path)
    layers = parse_json(
        meta.get("intq.layers", "").encode(),
        path,
        "metadata entry intq.layers (per-layer table)",
        LAYER_TABLE,
        hint=_METADATA_HINT,
    )
    return {**checked, "intq.layers": layers}


def _metadata_fields(meta: dict[str, str], path: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """The metadata entries ``fields`` names, each present and checked."""
    out = {}
    for key, rule in fields.items():
        if key not in meta:
            raise ArtifactError(
                f"{path}: the intq metadata entry {key} is missing", hint=_METADATA_HINT
            )
        try:
            out[key] = rule(meta[key], key)
        except Invalid as err:
            raise ArtifactError(
                f"{path}: the intq metadata entry {err.at} {err.reason}", hint=_METADATA_HINT
            ) from None
    return out


def check_self_contained(model: onnx.ModelProto, path: Path) -> None:
    """Refuse an artifact whose tensors name external data: intq writes every tensor into
    the file, and a session would otherwise read whatever file the entry names."""
    import onnx

    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
            raise ArtifactError(
                f"{path}: the tensor {tensor.name!r} keeps its data in an external file;"
                " intq artifacts hold all their data",
                hint=_METADATA_HINT,
            )


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``graph`` and of its subgraphs: initializers and attribute values
    (a stack, not recursion: a file may nest subgraphs deeply)."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)


def open_onnx(data: bytes, path: Path) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """The verified model of an ``.onnx`` artifact's bytes and its per-layer table."""
    model = parse_onnx(data, path)
    layers: list[dict[str, Any]] = onnx_metadata(model, path)["intq.layers"]
    check_self_contained(model, path)
    return model, layers


# ----- which target wrote it ------------------------------------------------------------


def envelope_target(path: Path, data: bytes) -> str | None:
    """The target an artifact's envelope names: a text header's, or an ``.onnx`` file's
    metadata (verified); None for a file with neither, which only its suffix can place."""
    if has_header(data):
        return str(_header(data, path)[0]["target"])
    if path.suffix == ".onnx":
        return str(onnx_metadata(parse_onnx(data, path), path)["intq.target"])
    return None


__all__ = [
    "FORMAT_VERSION",
    "LAYER_TABLE",
    "MAX_ARTIFACT_BYTES",
    "check_self_contained",
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
