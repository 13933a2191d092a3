"""The verifier as a pass: a pipeline's last step, so its result is checked whether or not
the manager verifies after every pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from intq.ir.graph import Graph
from intq.ir.verifier import verify
from intq.passes.manager import Pass


@dataclass(frozen=True)
class Verify(Pass):
    """Check the IR (:func:`intq.ir.verify`); changes nothing."""

    name: ClassVar[str] = "verify"

    def apply(self, graph: Graph) -> bool:
        verify(graph)
        return False
