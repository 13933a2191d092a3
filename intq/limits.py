"""The resource limits every layer checks before it allocates: the size of one tensor.

The limit is read when a check runs, so raising :data:`MAX_TENSOR_BYTES` (``intq.limits.
MAX_TENSOR_BYTES = 1 << 34``) takes effect for every later import, parse, compile and run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from intq.errors import ShapeError

MAX_TENSOR_BYTES = 1 << 33
"""The largest tensor (8 GiB) intq creates or reads: an initializer, a graph input, any value
a node computes (at import, when a graph is built or parsed, and when it runs on any backend)
and any array of a calibration or input archive. Larger ones are refused from their declared
shape, before anything is allocated, so a hostile or corrupt file cannot exhaust memory."""

MAX_RANK = 64
"""The most dimensions a tensor may have: numpy's own limit, so every backend's."""

HINT = (
    "check the shapes (a corrupt or hostile file can declare any size), or raise"
    " intq.limits.MAX_TENSOR_BYTES"
)


def tensor_bytes(shape: Sequence[int], itemsize: int) -> int:
    """The bytes of a tensor of ``shape`` (exact: Python integers do not overflow)."""
    return math.prod(int(d) for d in shape) * itemsize


def check_size(
    shape: Sequence[int], itemsize: int, what: str, *, node: str | None = None, hint: str = HINT
) -> None:
    """Refuse a tensor of ``shape`` and elements of ``itemsize`` bytes larger than
    :data:`MAX_TENSOR_BYTES`, naming it as ``what``."""
    if len(shape) > MAX_RANK:
        raise ShapeError(
            f"{what} has {len(shape)} dimensions, more than the {MAX_RANK} numpy supports",
            node=node or None,
            hint=hint,
        )
    nbytes = tensor_bytes(shape, itemsize)
    if nbytes > MAX_TENSOR_BYTES:
        dims = ", ".join(_number(int(d)) for d in shape)
        raise ShapeError(
            f"{what} of shape [{dims}] would take {_number(nbytes)} bytes, more than intq's"
            f" limit of {MAX_TENSOR_BYTES} bytes",
            node=node or None,
            hint=hint,
        )


def _number(n: int) -> str:
    """``n`` for a message: exact when short, else its magnitude (a hostile header can hold a
    dimension of 4,000 digits, which neither ``str`` nor a float format takes)."""
    if abs(n) < 10**15:
        return str(n)
    return f"~10^{int(n.bit_length() * 0.30103)}" if abs(n) >= 10**300 else f"{float(n):.3g}"


__all__ = ["MAX_RANK", "MAX_TENSOR_BYTES", "check_size", "tensor_bytes"]
