"""Backends: turn an IR graph into an executable for one runtime.

``compile(graph, target)`` picks the backend from :data:`TARGETS`; every
backend's executable has ``.run(inputs)`` and ``.save(path)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from intq.backends.base import Executable
from intq.backends.onnxruntime import compile_onnxruntime
from intq.backends.reference import compile_reference
from intq.backends.tvm import compile_tvm
from intq.errors import IntqError
from intq.ir.graph import Graph

TARGETS: dict[str, Callable[..., Executable]] = {
    "reference": compile_reference,
    "onnxruntime": compile_onnxruntime,
    "tvm": compile_tvm,
}
"""Target name -> compile function. Later backends add their entry here."""


def compile(graph: Graph, target: str = "reference", **options: Any) -> Executable:
    """Compile ``graph`` for ``target``; returns an executable with ``.run`` and ``.save``."""
    backend = TARGETS.get(target)
    if backend is None:
        raise IntqError(
            f"unknown target {target!r}", hint=f"the targets are: {', '.join(sorted(TARGETS))}"
        )
    return backend(graph, **options)


__all__ = ["TARGETS", "Executable", "compile"]
