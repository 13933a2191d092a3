"""The reference backend: a graph run by the numpy interpreter (:mod:`intq.semantics`), saved
as textual IR."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from intq.artifacts import open_text, seal_text
from intq.backends.base import Backend, GraphExecutable, check_declared_size, save_artifact
from intq.ir.graph import Graph
from intq.ir.parser import from_text
from intq.ir.printer import to_text
from intq.passes.range_analysis import prove_no_overflow
from intq.semantics.feeds import Feeds, check_feeds
from intq.semantics.numpy_eval import run_graph


class ReferenceExecutable(GraphExecutable):
    """A graph run by the reference interpreter; saves as textual IR."""

    target = "reference"

    def run(self, inputs: Feeds) -> dict[str, np.ndarray]:
        """Run on ``inputs`` (name -> array, or one array for a single-input model); returns
        output name -> array."""
        # Named here (a bare array becomes {name: array}); run_graph takes names only.
        return run_graph(self.graph, check_feeds(self.graph.inputs, inputs))

    def save(self, path: str | Path, *, sign_key: Any = None) -> Path:
        """Write the graph as textual IR (atomically) after a header with the format version
        and the payload's sha256 (:mod:`intq.artifacts`); returns the path. The name must
        end in ``.intq`` (:meth:`Backend.check_path`). ``sign_key`` also writes a
        signature (:mod:`intq.signing`)."""
        path = REFERENCE.check_path(path)
        return save_artifact(path, {"": seal_text(to_text(self.graph))}, sign_key)


def compile_reference(graph: Graph) -> ReferenceExecutable:
    """The reference backend's compile: nothing to do but wrap the graph."""
    return ReferenceExecutable(graph)


def load_reference(path: Path, files: Mapping[str, bytes]) -> ReferenceExecutable:
    """Reopen the ``.intq`` artifact read from ``path`` (checksum verified first); its inputs
    must fit the per-tensor limit (:func:`~intq.backends.base.check_declared_size`).

    The graph is verified as :func:`intq.compile` verifies it: anyone can write a valid
    checksum, so the text's declared types are not trusted to be what its nodes compute."""
    graph = from_text(open_text(files[""], path))
    prove_no_overflow(graph)  # the verifier, then the overflow proof: as intq.compile
    for value in graph.inputs:
        what = f"input {value.name!r}"
        check_declared_size(path, what, value.type.shape, value.type.dtype.numpy.itemsize)
    return compile_reference(graph)


REFERENCE = Backend(
    "reference", compile_reference, load_reference, (".intq",), "a .intq graph (textual IR)"
)
"""The reference backend's record in :data:`intq.backends.TARGETS`."""


__all__ = ["REFERENCE", "ReferenceExecutable", "compile_reference", "load_reference"]
