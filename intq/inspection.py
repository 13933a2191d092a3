"""What a user reads about a converted model: per-layer bits and scales, per-layer error.

- :func:`layer_table` lists every integer layer (``QConv``, ``QGemm``, ``QMatMul``,
  ``QAdd``, pools) with its input, weight and output bits and scales, and the clipping rule
  that set its output's scale (``calibration="auto"`` chooses one per tensor).
- :func:`layer_sqnr` runs the float graph and the integer graph side by side on calibration
  data and measures, per layer, the signal-to-quantization-noise ratio of the layer's output
  (``10 log10(sum f^2 / sum (f - q)^2)`` over all samples), worst first: the layer that
  hurts accuracy most is at the top.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from intq.ir.graph import Graph, Node, Value
from intq.ir.types import QuantParams
from intq.ops import Trait
from intq.passes import PREPARE, pipeline
from intq.passes.calibration import ClipChoices
from intq.passes.learned_rounding import RoundedWeights
from intq.progress import show_progress
from intq.semantics.numpy_eval import run_graph


def _scale_text(quant: QuantParams | None) -> str:
    if quant is None:
        return "-"
    low, high = min(quant.scale), max(quant.scale)
    return f"{low:.3g}" if low == high else f"{low:.3g}..{high:.3g}"


def _bits_text(quant: QuantParams | None) -> str:
    if quant is None:
        return "-"
    return f"{'s' if quant.signed else 'u'}{quant.bits}"


def _result(node: Node) -> Value:
    """The layer's output as the next layer sees it: after its Requantize, if any."""
    out = node.output
    consumers = out.consumers()
    if len(consumers) == 1 and consumers[0].op in ("Requantize", "Dequantize"):
        return consumers[0].output
    return out


def clip_labels(graph: Graph) -> dict[str, str]:
    """Layer name -> the clipping rule (``minmax``, ``p99.99``, ``mse``) that set the scale of
    its output, for the layers of an integer graph fresh from ``quantize`` (the rules are not
    saved in artifacts: a loaded graph has none)."""
    choices = graph.analysis(ClipChoices)
    if choices is None:
        return {}
    labels = {}
    for node in graph:
        rule = choices.get(_result(node)) or choices.get(node.output)
        if rule is not None:
            labels[node.label()] = rule.label
    return labels


def rounding_labels(graph: Graph) -> dict[str, str]:
    """Layer name -> its weights' output SQNR on the calibration data with nearest and with
    learned rounding (``"18.3 -> 30.3 dB"``), for the layers of an integer graph fresh from
    ``quantize`` that learned theirs (:mod:`intq.passes.learned_rounding`)."""
    learned = graph.analysis(RoundedWeights)
    if learned is None:
        return {}
    labels = {}
    for node in graph:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        entry = learned.get(weight) if weight is not None else None
        if entry is not None:
            before, after = (
                -10 * math.log10(max(e, 1e-30)) for e in (entry.nearest_error, entry.learned_error)
            )
            labels[node.label()] = f"{before:.1f} -> {after:.1f} dB"
    return labels


def layer_table(graph: Graph) -> list[dict[str, Any]]:
    """One row per integer layer: name, op, input/weight/output bits and scales, and the
    clipping rule of its output (``-`` where none is known: an accumulator output, a graph
    read from an artifact)."""
    clips = clip_labels(graph)
    rounding = rounding_labels(graph)
    rows = []
    for node in graph:
        if not node.opdef.has(Trait.LAYER):
            continue
        x = node.inputs[0]
        weight = node.inputs[1] if node.opdef.weight_axis is not None else None
        out = _result(node)
        rows.append(
            {
                "layer": node.label(),
                "op": node.op,
                "input": f"{_bits_text(x.type.quant if x else None)}"
                f" @ {_scale_text(x.type.quant if x else None)}",
                "weights": "-"
                if weight is None
                else f"{_bits_text(weight.type.quant)} @ {_scale_text(weight.type.quant)}",
                "output": f"{_bits_text(out.type.quant)} @ {_scale_text(out.type.quant)}"
                if out.type.quant is not None
                else f"{out.type.dtype.value} (float)",
                "clip": clips.get(node.label(), "-"),
                "rounding": rounding.get(node.label(), "nearest"),
            }
        )
    return rows


def table(rows: list[dict[str, Any]], keys: list[str] | None = None) -> str:
    """Rows of dicts as an aligned text table."""
    if not rows:
        return "(none)"
    keys = keys or list(rows[0])
    cells = [[str(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def real_value(value: Value, array: np.ndarray) -> np.ndarray:
    """The real numbers an integer tensor stands for (``scale * q``); floats unchanged."""
    quant = value.type.quant
    if quant is None or value.type.dtype.is_float:
        return array.astype(np.float64)
    scale = np.asarray(quant.scale, dtype=np.float64)
    if quant.axis is not None:
        shape = [1] * array.ndim
        shape[quant.axis] = len(quant.scale)
        scale = scale.reshape(shape)
    return array.astype(np.float64) * scale


@dataclass
class _Energy:
    signal: float = 0.0
    noise: float = 0.0
    op: str = ""

    @property
    def sqnr(self) -> float:
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)


def _last_outputs(graph: Graph, run: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """label -> (value, array) of the last node carrying each label."""
    seen: dict[str, tuple[Node, np.ndarray]] = {}

    def record(node: Node, outputs: list[np.ndarray]) -> None:
        seen[node.label()] = (node, outputs[0])

    run(graph, feeds, on_node=record)
    return seen


def layer_sqnr(
    float_graph: Graph,
    int_graph: Graph,
    batches: Iterable[Mapping[str, np.ndarray]],
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Per-layer SQNR (dB) of ``int_graph`` against ``float_graph`` over ``batches``, worst
    first, with the clipping rule of each layer's output (``clip``). Layers are matched by
    their original node names; ``float_graph`` should be the
    float graph ``quantize`` started from (BatchNorm folding keeps the names)."""
    prepared = float_graph.copy()
    pipeline(PREPARE)(prepared)
    energy: dict[str, _Energy] = {}
    items = tqdm(batches, desc="per-layer SQNR", unit="batch", disable=not show_progress(progress))
    for feeds in items:
        want = _last_outputs(prepared, run_graph, feeds)
        got = _last_outputs(int_graph, run_graph, feeds)
        for label, (node, array) in got.items():
            if label not in want or node.opdef.has(Trait.BOUNDARY):
                continue
            reference = want[label][1]
            if not node.output.type.dtype.is_float and node.output.type.quant is None:
                continue
            if reference.shape != array.shape or not np.issubdtype(reference.dtype, np.floating):
                continue
            actual = real_value(node.output, array)
            entry = energy.setdefault(label, _Energy(op=want[label][0].op))
            entry.signal += float(np.sum(reference.astype(np.float64) ** 2))
            entry.noise += float(np.sum((reference - actual) ** 2))
    order = [n.label() for n in int_graph]
    clips = clip_labels(int_graph)
    rounding = rounding_labels(int_graph)
    rows = [
        {
            "layer": label,
            "op": e.op,
            "sqnr_db": e.sqnr,
            "position": order.index(label),
            "clip": clips.get(label, "-"),
            "rounding": rounding.get(label, "-"),
        }
        for label, e in energy.items()
    ]
    rows.sort(key=lambda r: (r["sqnr_db"], r["position"]))
    return rows


__all__ = [
    "clip_labels",
    "layer_sqnr",
    "layer_table",
    "real_value",
    "rounding_labels",
    "table",
]
