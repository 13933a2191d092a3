"""The ONNX Runtime backend: the lowered ONNX model run by an ONNX Runtime CPU session.

:func:`compile_onnxruntime` lowers a graph (:func:`intq.backends.onnx_lowering.to_onnx`)
and opens a session on it; the executable saves a standard ``.onnx`` file sealed with
intq's metadata (:mod:`intq.artifacts`), which :func:`load_onnxruntime` reopens without
the IR graph. Also here: ONNX Runtime's per-node profile and :func:`onnx_census`, the
integer-only check of an exported model. :data:`ONNXRUNTIME` is the backend's record.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from intq.artifacts import open_onnx, seal_onnx
from intq.backends.base import (
    Backend,
    GraphExecutable,
    KernelTime,
    check_declared_size,
    check_profile_runs,
    kernel_times,
    no_graph_for_vectors,
    save_artifact,
)
from intq.backends.onnx_lowering import to_onnx
from intq.errors import ArtifactError, NumericsError
from intq.inspection import layer_table
from intq.ir.graph import Graph, Value
from intq.ir.types import DType, TensorType
from intq.semantics.feeds import Feeds, check_feeds

_INPUT_QUANTIZER = frozenset({"Cast", "IsNaN", "Where"})
"""The float ops the input quantizer runs before its ``QuantizeLinear``."""


def onnx_census(model: onnx.ModelProto, *, allow_division: bool = False) -> dict[str, int]:
    """The op census of an exported model; raises :class:`NumericsError` when a float op
    sits between the input ``QuantizeLinear`` and the output ``DequantizeLinear``, or an
    integer ``Div``/``Mod`` divides at run time (unless ``allow_division``: a dividing
    kernel variant was chosen; the counts still show them).

    The same rule as :func:`intq.passes.integer_only.census`, on the ONNX file itself:
    a node may read floats only after a ``DequantizeLinear``, or, on the way from a graph
    input into its ``QuantizeLinear``, be one of the input quantizer's own ops (the
    ``Cast`` to float32 and the ``IsNaN``/``Where`` that give NaN the code 0).
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    elem = {
        v.name: v.type.tensor_type.elem_type
        for v in (*graph.value_info, *graph.input, *graph.output)
    }
    elem.update({t.name: t.data_type for t in graph.initializer})
    floats = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16}
    after: set[str] = set()
    constants = {t.name for t in graph.initializer}
    before = {v.name for v in graph.input}  # graph inputs and what the input quantizer made
    counts: dict[str, int] = {}
    bad = []
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.domain not in ("", "ai.onnx"):
            bad.append(f"{node.op_type} {node.name!r} is outside the default domain")
        if node.op_type == "QuantizeLinear":
            continue
        read = [n for n in node.input if n and n not in constants]
        if node.op_type in _INPUT_QUANTIZER and read and all(n in before for n in read):
            before.update(node.output)
            continue
        if node.op_type == "DequantizeLinear":
            after.update(node.output)
            continue
        float_inputs = [n for n in node.input if n and elem.get(n) in floats]
        float_outputs = [n for n in node.output if elem.get(n) in floats]
        if float_inputs and all(n in after for n in float_inputs):
            after.update(node.output)
        elif float_inputs or float_outputs:
            bad.append(f"{node.op_type} {node.name!r} computes in float")
        elif node.op_type in ("Div", "Mod") and not allow_division:
            bad.append(f"{node.op_type} {node.name!r} divides at run time")
    if bad:
        raise NumericsError("the exported model is not integer-only:\n  " + "\n  ".join(bad[:20]))
    return counts


class OnnxRuntimeExecutable(GraphExecutable):
    """An intq graph lowered to ONNX and run by an ONNX Runtime CPU session."""

    target = "onnxruntime"

    def __init__(self, graph: Graph, model: onnx.ModelProto, threads: int | None = None):
        import onnxruntime as ort

        super().__init__(graph)
        self.model = model
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    def run(self, inputs: Feeds) -> dict[str, np.ndarray]:
        """Run on ``inputs`` (name -> array, or one array for a single-input model); returns
        output name -> array."""
        feeds = check_feeds(self.graph.inputs, inputs)
        results = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, results))

    def profile(self, inputs: Feeds, runs: int = 10, warmup: int = 2) -> list[KernelTime]:
        """Per-node times over ``runs`` runs (see :func:`profile_session`); slowest first."""
        feeds = check_feeds(self.graph.inputs, inputs)
        return profile_session(self.session, self.model, feeds, runs, warmup)

    def save(self, path: str | Path, *, sign_key: Any = None) -> Path:
        """Write the ``.onnx`` file (atomically) with intq's checksummed metadata
        (:mod:`intq.artifacts`); plain ONNX Runtime runs it. The name must end in ``.onnx``.
        ``sign_key`` also writes a signature (:mod:`intq.signing`)."""
        path = ONNXRUNTIME.check_path(path)
        data = seal_onnx(self.model, layer_table(self.graph))
        if len(data) >= 2**31:
            raise ArtifactError("the model exceeds protobuf's 2 GB limit")
        return save_artifact(path, {"": data}, sign_key)


_NUMPY_OF_ORT = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class LoadedOnnxExecutable:
    """An ``.onnx`` artifact reopened by ``intq.load``: the session, without the IR graph.

    ``layers`` is the per-layer table (bits, scales) saved in the artifact's metadata.
    """

    target = "onnxruntime"

    def __init__(
        self, model: onnx.ModelProto, layers: list[dict[str, Any]], path: Path | None = None
    ):
        import onnxruntime as ort

        self.model = model
        self.layers = layers
        where = f"{path}: " if path is not None else ""
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # ORT raises its own exception types
            raise ArtifactError(f"{where}ONNX Runtime cannot open the artifact: {err}") from None
        self.inputs = []
        for info in self.session.get_inputs():
            # intq writes every input with a static shape and one of these types; anything
            # else was put there by someone else, and check_feeds could not match it.
            dims = list(info.shape)
            numpy_type = _NUMPY_OF_ORT.get(info.type)
            if numpy_type is None or not all(isinstance(d, int) and d >= 0 for d in dims):
                raise ArtifactError(
                    f"{where}input {info.name!r} is {info.type} of shape {dims}: an intq"
                    " artifact's inputs have static shapes and plain numeric types",
                    hint="recompile the model (intq compile ...)",
                )
            dtype = DType.from_numpy(np.dtype(numpy_type))
            check_declared_size(
                path or Path("artifact"),
                f"input {info.name!r}",
                dims,
                np.dtype(numpy_type).itemsize,
            )
            self.inputs.append(Value(info.name, TensorType(dtype, tuple(dims))))

    @property
    def input_names(self) -> list[str]:
        """Names of the inputs ``run`` expects."""
        return [v.name for v in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """Names of the outputs ``run`` returns."""
        return [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Feeds) -> dict[str, np.ndarray]:
        """Run on ``inputs`` (name -> array, or one array for a single-input model); returns
        output name -> array."""
        feeds = check_feeds(self.inputs, inputs)
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def profile(self, inputs: Feeds, runs: int = 10, warmup: int = 2) -> list[KernelTime]:
        """Per-node times over ``runs`` runs (see :func:`profile_session`); slowest first."""
        feeds = check_feeds(self.inputs, inputs)
        return profile_session(self.session, self.model, feeds, runs, warmup)

    def golden_vectors(
        self, inputs: Feeds, out_dir: str | Path, *, overwrite: bool = False
    ) -> Path:
        """Refused: a loaded ``.onnx`` artifact has no integer graph (:mod:`intq.vectors`)."""
        raise no_graph_for_vectors("a loaded .onnx artifact")

    def save(self, path: str | Path, *, sign_key: Any = None) -> Path:
        """Write the artifact again (atomically), metadata and checksum unchanged; signed
        with ``sign_key`` when given."""
        path = ONNXRUNTIME.check_path(path)
        return save_artifact(path, {"": self.model.SerializeToString()}, sign_key)


def profile_session(
    session: Any, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], runs: int, warmup: int
) -> list[KernelTime]:
    """ONNX Runtime's own per-node profile of ``model``, run like ``session`` (its options)
    in a second, profiling session: ``runs`` runs after ``warmup``, each node's time per run
    (the median). intq names an ONNX node ``<its graph node>/<op type>``, which gives the
    rows' ``nodes``; ONNX Runtime renames the nodes it fuses."""
    import onnxruntime as ort

    check_profile_runs(runs, warmup)
    # The session's own options object (ORT cannot copy one): set for the new session,
    # which copies them, then set back.
    options = session.get_session_options()
    before = options.enable_profiling, options.profile_file_prefix
    with tempfile.TemporaryDirectory(prefix="intq-profile-") as tmp:
        options.enable_profiling, options.profile_file_prefix = True, str(Path(tmp) / "ort")
        try:
            profiling = ort.InferenceSession(
                model.SerializeToString(), options, providers=session.get_providers()
            )
        finally:
            options.enable_profiling, options.profile_file_prefix = before
        for _ in range(warmup + runs):
            profiling.run(None, dict(feeds))
        events = json.loads(Path(profiling.end_profiling()).read_text())
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[
        warmup:
    ]
    per_run: list[dict[str, tuple[int, float]]] = [{} for _ in spans]
    suffix = "_kernel_time"
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith(suffix):
            continue
        for run, (start, end) in zip(per_run, spans):
            if start <= event["ts"] <= end:
                kernel = name[: -len(suffix)]
                calls, ms = run.get(kernel, (0, 0.0))
                run[kernel] = (calls + 1, ms + event["dur"] / 1e3)
                break
    nodes = {k: [k.rsplit("/", 1)[0]] for run in per_run for k in run if "/" in k}
    return kernel_times(per_run, nodes)


def compile_onnxruntime(graph: Graph, threads: int | None = None) -> OnnxRuntimeExecutable:
    """Lower ``graph`` to ONNX and open an ONNX Runtime session on it."""
    return OnnxRuntimeExecutable(graph, to_onnx(graph), threads)


def load_onnxruntime(path: Path, files: Mapping[str, bytes]) -> LoadedOnnxExecutable:
    """Reopen the ``.onnx`` artifact read from ``path`` (checksum verified first)."""
    model, layers = open_onnx(files[""], path)
    return LoadedOnnxExecutable(model, layers, path)


ONNXRUNTIME = Backend(
    "onnxruntime",
    compile_onnxruntime,
    load_onnxruntime,
    (".onnx",),
    "a standard .onnx file (plain ONNX Runtime runs it)",
)
"""The ONNX Runtime backend's record in :data:`intq.backends.TARGETS`."""


__all__ = [
    "ONNXRUNTIME",
    "LoadedOnnxExecutable",
    "OnnxRuntimeExecutable",
    "compile_onnxruntime",
    "load_onnxruntime",
    "onnx_census",
    "profile_session",
]
