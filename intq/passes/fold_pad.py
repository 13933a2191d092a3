"""Fold a zero ``Pad`` into the convolution or max pool that reads it.

Rule ``pad-conv``: ``Conv(Pad(x, pads, constant 0), W, b)`` where the Pad
pads only the spatial axes by non-negative amounts and has no other reader
becomes ``Conv(x, W, b)`` with the pads added to the Conv's own. Exporters
write TensorFlow's asymmetric "SAME" padding this way (EfficientNet-Lite).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from intq.ir.graph import Graph, Value
from intq.passes.manager import Pass
from intq.passes.rewrite import Match, Op, Rule, Var, apply_rules


def _check(m: Match) -> str | None:
    pad = m["pad"]
    pads, rank = pad.attrs["pads"], pad.inputs[0].type.rank
    if pad.attrs["mode"] != "constant" or pad.attrs["value"] != 0.0:
        return "only zero constant padding folds into a convolution"
    if any(pads[i] or pads[i + rank] for i in (0, 1)) or min(pads) < 0:
        return "the Pad touches the batch or channel axis, or crops"
    return None


def _fold(graph: Graph, m: Match) -> list[Value]:
    pad, conv = m["pad"], m.root
    rank = pad.inputs[0].type.rank
    spatial = rank - 2
    extra = pad.attrs["pads"]
    pads = tuple(
        conv.attrs["pads"][i] + extra[2 + i % spatial + (rank if i >= spatial else 0)]
        for i in range(2 * spatial)
    )
    node = graph.add(
        "Conv",
        [m["x"], *conv.inputs[1:]],
        {**conv.attrs, "pads": pads},
        name=conv.name,
        before=conv,
    )
    return [node.output]


RULES = (Rule("pad-conv", Op("Conv", Op("Pad", Var("x"), name="pad")), _fold, _check),)


@dataclass(frozen=True)
class FoldPad(Pass):
    """Fold zero Pads into the Conv that reads them."""

    name: ClassVar[str] = "fold-pad"

    def apply(self, graph: Graph) -> bool:
        return apply_rules(graph, RULES) > 0
