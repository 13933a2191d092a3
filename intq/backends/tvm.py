"""The Apache TVM backend: an integer-only intq graph as a compiled Relax module.

:func:`compile_tvm` is the driver: :func:`to_relax` lowers the graph (one rule per IR op, in
:mod:`intq.backends.tvm_lowering`, over the TE kernels of :mod:`intq.backends.tvm_kernels`);
on CPU targets :func:`fuse_relax_ops` fuses the remaining Relax ops, the schedules of
:mod:`intq.backends.tvm_schedules` (or MetaSchedule records, :mod:`intq.backends.tvm_tuning`)
tile and vectorize the integer kernels without changing their compute, and ``tvm.compile``
builds the module through Relax's ``default_build`` pipeline (no automatic fusion: the
kernels arrive fused and scheduled). It runs on ``relax.VirtualMachine``.

The executable, its artifacts and the loader live in :mod:`intq.backends.tvm_runtime`
(re-exported here): :meth:`TvmExecutable.save` writes a shared object (host targets) or a
``.tar`` of object files (cross targets, no cross linker needed) plus a JSON manifest;
:func:`load_tvm` reopens a host artifact.

``import intq`` imports neither this module nor TVM: :mod:`intq.backends` imports the TVM
backend when a graph is first compiled for it or an artifact of it is loaded.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from intq.backends.tvm_kernels import dtype_of
from intq.backends.tvm_lowering import LOWER, Kernel, Lowerer
from intq.backends.tvm_runtime import (
    ScheduleFallbackWarning,
    TensorSpec,
    TvmExecutable,
    _tvm,
    fallback_summary,
    graph_specs,
    host_target,
    load_tvm,
    parse_target,
)
from intq.backends.tvm_schedules import Isa, schedule_module
from intq.backends.tvm_tuning import tune_with_database
from intq.errors import IntqError
from intq.ir.graph import Graph
from intq.passes.range_analysis import value_ranges


def to_relax(
    graph: Graph, channels_last: bool = True, vnni: bool = False, llvm: bool = True
) -> tuple[Any, dict[str, Kernel]]:
    """The Relax ``IRModule`` computing ``graph`` and the kernels it holds (by prim func name);
    ``channels_last`` keeps CNN activations NHWC between the kernels that want it; ``vnni``
    (the target has ``vpdpbusd``, :class:`~intq.backends.tvm_schedules.Isa`) packs every
    8-bit conv and dense 4 byte channels deep; ``llvm`` (a CPU target) lets the kernels call
    LLVM's intrinsics where TVM's own do not vectorize."""
    lw = Lowerer(graph, channels_last, vnni, llvm)
    relax = lw.relax
    params = [relax.Var(v.name, relax.TensorType(v.type.shape, dtype_of(v))) for v in graph.inputs]
    with lw.bb.function("main", params):
        with lw.bb.dataflow():
            for value, var in zip(graph.inputs, params):
                lw.env[value.name] = var
            for node in graph:
                LOWER.rule_for(node, "TVM lowering")(lw, node)
            outputs = lw.bb.emit_output(relax.Tuple([lw.value(v) for v in graph.outputs]))
        lw.bb.emit_func_output(outputs)
    return lw.bb.get(), lw.kernels


OPAQUE = 8
"""Relax's ``kOpaque`` op pattern: ``FuseOps`` leaves a prim func marked so alone."""


def fuse_relax_ops(mod: Any, kernels: Mapping[str, Kernel]) -> tuple[Any, dict[str, Kernel]]:
    """Legalize the Relax ops (the transformer kernels' int64 arithmetic, data movement) to
    TIR and fuse each chain of them into one prim func (``FuseOps``/``FuseTIR``), so that a
    LayerNorm is a few loops instead of dozens of kernel calls, each with its own output
    allocation. intq's own TE kernels are marked opaque and stay as they are. Returns the
    module and the kernels, with the fused prim funcs as ``fused`` ones."""
    from tvm import relax, tirx

    mod = relax.transform.AnnotateTIROpPattern()(relax.transform.LegalizeOps()(mod))
    for gv in mod.get_global_vars():
        if gv.name_hint in kernels:
            mod.update_func(gv, mod[gv].with_attr("op_pattern", OPAQUE))
    mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(mod))
    fused = {
        gv.name_hint: Kernel("fused")
        for gv in mod.get_global_vars()
        if isinstance(mod[gv], tirx.PrimFunc) and gv.name_hint not in kernels
    }
    return mod, {**kernels, **fused}


def compile_tvm(
    graph: Graph,
    tvm_target: str | Mapping[str, Any] | None = None,
    schedule: bool = True,
    *,
    tune_trials: int = 0,
    tuning_db: str | Path | None = None,
    progress: bool | None = None,
) -> TvmExecutable:
    """Lower ``graph`` to Relax, schedule its integer kernels and compile it for ``tvm_target``.

    ``tvm_target`` is a TVM target dict (or its JSON); ``None`` means this machine.
    ``schedule=False`` keeps TVM's default (naive) loops: slow, for checking schedules.
    ``tuning_db`` is a MetaSchedule database directory: kernels it has records for use
    the best one; ``tune_trials > 0`` first tunes the depthwise and generic kernels it has
    none for (that many candidates each, measured here; see
    :mod:`intq.backends.tvm_tuning`). ``progress`` shows a tuning progress bar (``None``:
    on a terminal).
    """
    value_ranges(graph)  # the overflow proof, as the other backends: refuses before compiling
    tvm = _tvm()
    spec = parse_target(tvm_target)
    if (tuning_db is not None or tune_trials) and not (schedule and spec["kind"] == "llvm"):
        raise IntqError(
            f"MetaSchedule tuning applies to scheduled llvm targets, not kind {spec['kind']!r}"
            f" with schedule={schedule}",
            hint="drop tune_trials/tuning_db (--tune-trials/--tuning-db) for this target",
        )
    start = time.perf_counter()
    cuda = spec["kind"] == "cuda"
    target = tvm.target.Target(spec, host=host_target()) if cuda else tvm.target.Target(spec)
    # The kernels follow the target's own features (mcpu/mattr), not this machine's:
    # vpdpbusd packing only where the scheduled module will tensorize with it.
    vnni = schedule and Isa.of(target).vnni
    # NHWC for the CPU schedules; the GPU's default schedules take the graph as it is.
    cpu = spec["kind"] == "llvm"
    mod, kernels = to_relax(graph, channels_last=cpu, vnni=vnni, llvm=cpu)
    report: dict[str, str] = {}
    paths: dict[str, str] = {}
    if cuda:
        # GPU kernels need their loops bound to threads: dlight's default GPU schedules
        # (integer kernels as they are; a tuned GPU schedule is future work).
        from tvm.s_tir import dlight

        with target:
            mod = dlight.ApplyDefaultSchedule(
                dlight.gpu.Reduction(), dlight.gpu.GeneralReduction(), dlight.gpu.Fallback()
            )(mod)
    elif schedule and spec["kind"] == "llvm":
        mod, kernels = fuse_relax_ops(mod, kernels)
        hand = kernels
        if tuning_db is not None or tune_trials:
            mod, tuned = tune_with_database(
                mod, kernels, target, tuning_db, tune_trials, progress=progress
            )
            report.update(tuned)
            hand = {name: k for name, k in kernels.items() if name not in tuned}
        mod = schedule_module(mod, hand, target, report=report, paths=paths)
    try:
        executable = tvm.compile(mod, target=target, relax_pipeline="default_build")
    except Exception as err:
        raise IntqError(
            f"TVM failed to compile the graph for {spec}: {str(err).strip().splitlines()[-1]}",
            hint="report it with the model; try schedule=False to rule out the schedules",
        ) from err
    inputs, outputs = graph_specs(graph)
    exe = TvmExecutable(executable, spec, inputs, outputs, graph, time.perf_counter() - start)
    exe.schedules = {name: (kernels[name].kind, applied) for name, applied in report.items()}
    exe.kernel_paths = paths
    exe.kernel_nodes = {name: list(k.nodes) for name, k in kernels.items() if k.nodes}
    if exe.fallbacks:
        warnings.warn(
            f"TVM build for {spec}: {fallback_summary(exe.fallbacks)}; they run on plainer"
            " loops (exe.fallbacks; the debug log of intq.backends.tvm_schedules says why)."
            " Report it with the model",
            ScheduleFallbackWarning,
            stacklevel=2,
        )
    return exe


__all__ = [
    "LOWER",
    "ScheduleFallbackWarning",
    "TensorSpec",
    "TvmExecutable",
    "compile_tvm",
    "fuse_relax_ops",
    "host_target",
    "load_tvm",
    "parse_target",
    "to_relax",
]
