"""Activation layouts of the TVM backend: NCHW (the graph's own) and NHWC (channels last).

The CPU conv, depthwise and pool schedules vectorize over channels, so the lowering keeps 4-D
activations between those kernels NHWC (:class:`intq.backends.tvm_lowering.Lowerer`). This
module holds what both layouts share: the two permutations, where an NCHW axis or shape lies
in NHWC, how a kernel reads one element in either layout, and the TE transpose between them.
TVM itself is imported only when a transpose is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

NCHW_TO_NHWC = (0, 2, 3, 1)
"""The permutation taking an NCHW tensor to NHWC."""
NHWC_TO_NCHW = (0, 3, 1, 2)
"""The permutation taking an NHWC tensor back to NCHW."""


def nhwc_axis(axis: int) -> int:
    """Where NCHW axis ``axis`` is in NHWC."""
    return NCHW_TO_NHWC.index(axis)


def nhwc_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The NHWC shape of the NCHW ``shape``."""
    return tuple(shape[p] for p in NCHW_TO_NHWC)


def reader(nhwc: bool) -> Callable[..., Any]:
    """``at(x, n, c, spatial)``: the element of batch ``n``, channel ``c`` and position
    ``spatial`` of a TE tensor ``x`` stored NHWC (``nhwc``) or NCHW."""
    if nhwc:
        return lambda x, n, c, spatial: x[(n, *spatial, c)]
    return lambda x, n, c, spatial: x[(n, c, *spatial)]


def permute_te(perm: tuple[int, ...]) -> Callable[..., Any]:
    """The TE function ``x -> x`` with its axes permuted by ``perm`` (numpy's ``transpose``)."""
    from tvm import te

    def fn(x: Any) -> Any:
        shape = [x.shape[p] for p in perm]

        def body(*i: Any) -> Any:
            index = [0] * len(perm)
            for k, p in enumerate(perm):
                index[p] = i[k]
            return x(*index)

        return te.compute(shape, body, name="layout")

    return fn


__all__ = ["NCHW_TO_NHWC", "NHWC_TO_NCHW", "nhwc_axis", "nhwc_shape", "permute_te", "reader"]
