"""The one exception hierarchy of intq.

Every error intq raises on purpose is an :class:`IntqError`. Errors about a
particular node carry the node's original name (the ONNX node name or the
PyTorch module path) so a user can find it in their own model, and end with
what to do about it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class IntqError(Exception):
    """Base class of every error intq raises on purpose.

    ``node`` is the original name of the node the error is about (``None``
    when it is about the model as a whole); ``hint`` says what to do.
    """

    def __init__(self, message: str, *, node: str | None = None, hint: str | None = None):
        self.node = node
        self.hint = hint
        self.message = message
        text = message
        if node is not None:
            text = f"node {node!r}: {text}"
        if hint:
            text = f"{text}\n  hint: {hint}"
        super().__init__(text)


class ModelImportError(IntqError):
    """A model file could not be read: corrupt, malformed, or unsafe to load."""


class UnsupportedOpError(ModelImportError):
    """The model uses an operator (or an opset of it) that intq cannot convert."""


def unsupported_ops(unsupported: Mapping[str, Sequence[str]], hint: str) -> UnsupportedOpError:
    """One error listing every op an importer cannot convert (op -> its nodes' names), the
    most frequent first, with a few node names each."""
    if len(unsupported) == 1:
        ((op, names),) = unsupported.items()
        if len(names) == 1:
            return UnsupportedOpError(f"{op} is not supported", node=names[0], hint=hint)
    total = sum(len(names) for names in unsupported.values())
    parts = []
    for op, names in sorted(unsupported.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(repr(n) for n in names[:_SHOWN])
        more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
        parts.append(f"{op} x{len(names)} ({shown}{more})")
    kinds = "op is" if len(unsupported) == 1 else f"{len(unsupported)} ops are"
    return UnsupportedOpError(
        f"{kinds} not supported, in {total} nodes: " + "; ".join(parts), hint=hint
    )


_SHOWN = 3
"""Node names an unsupported-ops error shows per op."""


class ShapeError(IntqError):
    """Shapes or dtypes do not fit: at import, in a pass, or at run time."""


class NumericsError(IntqError):
    """A value range, NaN or overflow that makes a computation unsafe."""


class VerificationError(IntqError):
    """The IR verifier found a broken invariant (a bug in a pass or a hand-written graph)."""


class ParseError(IntqError):
    """The textual IR could not be parsed; the message shows the line and a caret."""


class PassError(IntqError):
    """A pass failed or a pipeline string is invalid; names the pass and those before it."""


class ArtifactError(IntqError):
    """A saved artifact could not be written or read back."""


class RemoteError(IntqError):
    """A remote device could not be reached or used: no RPC tracker, no server with the key,
    none free in time, or the device failed to load or run the module."""


__all__ = [
    "ArtifactError",
    "IntqError",
    "ModelImportError",
    "NumericsError",
    "ParseError",
    "PassError",
    "RemoteError",
    "ShapeError",
    "UnsupportedOpError",
    "VerificationError",
]
