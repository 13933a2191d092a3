"""MetaSchedule tuning of the TVM backend's kernels, kept in a persistent database.

:func:`tune_with_database` takes the Relax module of :func:`intq.backends.tvm.to_relax`
before the hand schedules run. For every kernel of a kind in ``kinds`` (by default
the ones the hand schedules handle worst: ``generic`` grouped or 16-bit convolutions
and matmuls, and ``depthwise``) that has no record for this target yet, it

1. measures the hand schedule of :mod:`intq.backends.tvm_schedules` and commits it
   as the first record, so the search starts from it and the best record is never
   slower than it (up to measurement noise);
2. runs MetaSchedule's evolutionary search for ``trials`` candidates, every one
   built and timed on this machine (``LocalBuilder``/``LocalRunner``).

Then every kernel whose workload has a record for this target in the database --
tuned now or by an earlier compile, of any kind -- is replaced by the best record's
schedule; the others are left to the hand schedules. A compile with ``trials=0``
only reads the database, so tuning once and compiling often costs nothing more.

The database is MetaSchedule's ``JSONDatabase``: ``database_workload.json`` (the
kernels, matched structurally: same shapes, dtypes and constants) and
``database_tuning_record.json`` (one line per measured candidate, its trace and
time), plus MetaSchedule's logs under ``logs/``. Records of other targets are
ignored. A schedule only reorders the fixed compute, so a tuned kernel computes
exactly what the hand-scheduled one does (the tests check it bit for bit).

Two traps of TVM 0.27 on a small machine, and what this module does about them:

- ``LocalBuilder``'s default build function imports ``tvm.s_tir.tensor_intrin``,
  which parses the TVMScript of every bundled intrinsic (CUDA, ROCm, Arm, Hexagon,
  x86): ~56 s on this 2-core machine. Its popen workers run it inside the build's
  30 s timeout, in a pool that is created anew for every batch, so every candidate
  timed out. :func:`_local_builder` passes a build function without that import
  (building an already scheduled module needs no intrinsic registered).
- ``TuneContext`` imports the same package in this process (~56 s more).
  :func:`_cpu_intrinsics_only` registers only the x86 intrinsics (~1 s), which are
  all that MetaSchedule's rules for an x86 LLVM target look up.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import sys
import types
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from intq.backends.tvm_runtime import is_host
from intq.backends.tvm_schedules import SCHEDULES, Isa, register_intrinsics
from intq.errors import IntqError
from intq.progress import show_progress

log = logging.getLogger(__name__)

TUNED_KINDS = ("depthwise", "generic")
"""Kernel kinds tuned by default: those whose hand schedule is only loop-level."""

BUILD_TIMEOUT_S = 60.0
"""Per-candidate build limit (MetaSchedule's default is 30 s; a loaded 2-core
machine builds a candidate in well under a second once the import is gone)."""

_FAILED_S = 1e9
"""MetaSchedule records a candidate that failed to build or run at 1e10 s."""


# ----- the database ----------------------------------------------------------------------------


def open_database(path: str | Path, create: bool) -> Any:
    """MetaSchedule's ``JSONDatabase`` in directory ``path``; ``create`` makes the directory.

    Raises :class:`IntqError` when ``path`` cannot hold a database (a file, no write
    permission) or, without ``create``, does not exist.
    """
    from tvm.s_tir import meta_schedule as ms

    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise IntqError(
            f"the tuning database {directory} is a file, not a directory",
            hint="give a directory (it is created if missing)",
        )
    if not directory.exists():
        if not create:
            raise IntqError(
                f"no tuning database at {directory}",
                hint="tune first: tune_trials=N (--tune-trials N) creates it",
            )
        try:
            directory.mkdir(parents=True)
        except OSError as err:
            raise IntqError(
                f"cannot create the tuning database {directory}: {err.strerror}",
                hint="give a directory you can write to",
            ) from None
    if create and not _writable(directory):
        raise IntqError(
            f"the tuning database {directory} is not writable",
            hint="give a directory you can write to, or tune_trials=0 to only read it",
        )
    try:
        return ms.database.JSONDatabase(work_dir=str(directory), module_equality="structural")
    except Exception as err:  # TVM's own error types, from the FFI
        raise IntqError(
            f"cannot read the tuning database {directory}: {str(err).strip().splitlines()[-1]}",
            hint="its JSON files were written by another TVM version or are damaged;"
            " move the directory away to start a new one",
        ) from err


def _writable(directory: Path) -> bool:
    # os.access says yes to root even on a read-only file system: try it.
    probe = directory / f".intq-write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    return True


def _workload(func: Any) -> Any:
    """The one-function module MetaSchedule keys ``func`` by: named ``main`` whatever the
    layer was called, so equal layers of different models share their records."""
    import tvm

    func = func.with_attr("global_symbol", "main").with_attr("tirx.noalias", True)
    return tvm.IRModule({"main": func})


def _best_record(database: Any, workload: Any, target: Any) -> Any | None:
    """The fastest successful record of ``workload`` measured on ``target``.

    (``Database.query_tuning_record`` ignores the target: records of another CPU would
    be applied here.)"""
    if not database.has_workload(workload):
        return None
    entry = database.commit_workload(workload)  # the stored entry; adds nothing
    for record in database.get_top_k(entry, len(database)):
        times = [float(t) for t in record.run_secs or ()]
        if times and max(times) < _FAILED_S and str(record.target) == str(target):
            return record
    return None


# ----- building and measuring ------------------------------------------------------------------


def _cpu_intrinsics_only() -> None:
    """Make ``import tvm.s_tir.tensor_intrin`` cost ~1 s instead of ~56 s in this process.

    The package's ``__init__`` registers every bundled intrinsic by parsing its TVMScript;
    MetaSchedule's ``TuneContext`` imports it only for that side effect. When nothing has
    imported it yet, an empty package with the real ``__path__`` stands in for it and only
    the x86 module runs: its submodules still import normally
    (``from tvm.s_tir.tensor_intrin.cuda import ...`` in dlight works unchanged)."""
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        import tvm.s_tir

        package = types.ModuleType(name, "x86 tensor intrinsics only (intq.backends.tvm_tuning)")
        package.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
        package.__package__ = name
        sys.modules[name] = package
        tvm.s_tir.tensor_intrin = package
    importlib.import_module(f"{name}.x86")


def _local_builder() -> Any:
    """A ``LocalBuilder`` whose workers build without importing every tensor intrinsic."""
    from tvm.s_tir import meta_schedule as ms

    # Nested so that cloudpickle sends it by value: the worker need not import intq.
    def build(mod: Any, target: Any, _params: Any) -> Any:
        # MetaSchedule's default_build without its `import tvm.s_tir.tensor_intrin`.
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        return tvm_build(mod, target=target)

    return ms.builder.LocalBuilder(f_build=build, timeout_sec=BUILD_TIMEOUT_S)


def _hand_schedule(workload: Any, kind: str, isa: Isa) -> Any | None:
    """A traced schedule of ``workload`` by the hand schedule of ``kind`` (or the
    elementwise one, as :func:`~intq.backends.tvm_schedules.schedule_module` falls back)."""
    from tvm import s_tir

    for name in dict.fromkeys((kind, "elementwise")):
        sch = s_tir.Schedule(workload)
        try:
            SCHEDULES[name](sch, isa)
        except Exception as err:  # a schedule primitive refused: try the next one
            log.debug("hand schedule %s does not apply: %s", name, err)
            continue
        return sch
    return None


def _seed_hand_schedules(
    database: Any, jobs: list[tuple[Any, str]], target: Any, builder: Any, runner: Any
) -> None:
    """Measure the hand schedule of each ``(workload, kind)`` and commit it as a record."""
    from tvm.s_tir import meta_schedule as ms

    isa = Isa.of(target)
    seeds = []
    for workload, kind in jobs:
        sch = _hand_schedule(workload, kind, isa)
        if sch is not None:
            seeds.append((workload, sch))
    if not seeds:
        return
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch in seeds])
    inputs, measured = [], []
    for (workload, sch), result in zip(seeds, built):
        if result.error_msg:
            log.warning("the hand schedule failed to build for tuning: %s", result.error_msg)
            continue
        args = ms.arg_info.ArgInfo.from_prim_func(workload["main"])
        inputs.append(ms.runner.RunnerInput(result.artifact_path, "cpu", args))
        measured.append((workload, sch, args, result.artifact_path))
    for (workload, sch, args, artifact), future in zip(measured, runner.run(inputs)):
        result = future.result()
        shutil.rmtree(os.path.dirname(artifact), ignore_errors=True)
        if result.error_msg:
            log.warning("the hand schedule failed to run for tuning: %s", result.error_msg)
            continue
        entry = database.commit_workload(workload)
        record = ms.database.TuningRecord(sch.trace, entry, result.run_secs, target, args)
        database.commit_tuning_record(record)


def _progress_callback(bar: Any) -> Any:
    """A MetaSchedule measure callback advancing the tqdm ``bar`` by each measured batch."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, *args: Any) -> None:
            _scheduler, _task_id, candidates, _builds, _runs = args
            bar.update(len(candidates))

    return Progress()


def _tune(
    database: Any,
    directory: Path,
    jobs: list[tuple[str, Any, str]],
    target: Any,
    trials: int,
    progress: bool | None,
) -> None:
    """Seed with the hand schedules, then MetaSchedule's search: ``trials`` per workload."""
    from tqdm import tqdm
    from tvm.s_tir import meta_schedule as ms

    _cpu_intrinsics_only()
    builder, runner = _local_builder(), ms.runner.LocalRunner()
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    level = ms_log.level
    # MetaSchedule prints its task tables to stdout at the level of this logger; its
    # files under logs/ keep everything.
    ms_log.setLevel(logging.WARNING)
    try:
        _seed_hand_schedules(database, [(w, kind) for _, w, kind in jobs], target, builder, runner)
        names = [name for name, _, _ in jobs]
        per_iter = min(trials, 16)
        # Evolving MetaSchedule's default population of 512 took ~70 s per batch of a
        # small depthwise kernel on this 2-core machine, however few the trials: a quick
        # tune evolves fewer.
        population = min(512, max(32, 16 * per_iter))
        loggers = ms.logging.get_loggers_from_work_dir(str(directory), names)
        tasks = [
            ms.TuneContext(
                mod=workload,
                target=target,
                space_generator="post-order-apply",
                search_strategy=ms.search_strategy.EvolutionarySearch(
                    population_size=population, init_min_unmeasured=min(50, population // 2)
                ),
                task_name=name,
                rand_state=index,
                num_threads=os.cpu_count() or 1,
                logger=logger,
            ).clone()
            for index, ((name, workload, _), logger) in enumerate(zip(jobs, loggers))
        ]
        # MetaSchedule's default cost model needs xgboost, which intq does not depend on;
        # without it the search ranks candidates at random (and still measures them all).
        cost_model = "xgb" if importlib.util.find_spec("xgboost") else "random"
        with tqdm(
            total=trials * len(jobs),
            desc="tuning",
            unit="trial",
            disable=not show_progress(progress),
            file=sys.stderr,
        ) as bar:
            ms.tune.tune_tasks(
                tasks=tasks,
                task_weights=[1.0] * len(tasks),
                work_dir=str(directory),
                max_trials_global=trials * len(tasks),
                max_trials_per_task=trials,
                num_trials_per_iter=per_iter,
                builder=builder,
                runner=runner,
                database=database,
                cost_model=cost_model,
                measure_callbacks=[
                    *ms.measure_callback.MeasureCallback.create("default"),
                    _progress_callback(bar),
                ],
                task_scheduler="round-robin",
            )
    finally:
        ms_log.setLevel(level)


# ----- the entry point -------------------------------------------------------------------------


def tune_with_database(
    mod: Any,
    kernels: Mapping[str, Any],
    target: Any,
    database_dir: str | Path | None,
    trials: int = 0,
    *,
    kinds: Collection[str] = TUNED_KINDS,
    progress: bool | None = None,
) -> tuple[Any, dict[str, str]]:
    """Tune the kernels of ``kinds`` that have no record yet (``trials`` candidates each,
    none when ``trials`` is 0), then schedule every kernel the database has a record for.

    ``mod`` and ``kernels`` are what :func:`intq.backends.tvm.to_relax` returns; ``target``
    a ``tvm.target.Target`` of this machine. Returns the module with those kernels
    scheduled and their names mapped to ``"tuned"``; the others are left unscheduled
    for :func:`~intq.backends.tvm_schedules.schedule_module`. A progress bar goes to
    stderr when ``progress`` is true, or when it is ``None`` and stderr is a terminal.
    """
    if trials < 0:
        raise IntqError(f"tune_trials must be >= 0, got {trials}", hint="0 only reads the database")
    if database_dir is None:
        raise IntqError(
            "tuning needs a database directory to keep its records in",
            hint="pass tuning_db=DIR (--tuning-db DIR); later compiles reuse the records",
        )
    if not is_host(dict(target.export())):
        raise IntqError(
            f"cannot tune for {target}: MetaSchedule measures every candidate on this machine",
            hint="tune for this machine's CPU (an x86-64 llvm target), or tune_trials=0",
        )
    database = open_database(database_dir, create=trials > 0)
    register_intrinsics()  # the hand schedules' traces tensorize with it
    workloads = {name: _workload(mod[name]) for name in kernels if _has_function(mod, name)}
    if trials > 0:
        import tvm

        jobs: list[tuple[str, Any, str]] = []
        for name, workload in workloads.items():
            kind = kernels[name].kind
            if kind not in kinds or _best_record(database, workload, target) is not None:
                continue
            if any(tvm.ir.structural_equal(workload, w) for _, w, _ in jobs):
                continue  # a repeated layer: one task for all of them
            jobs.append((name, workload, kind))
        if jobs:
            log.info(
                "tuning %d kernel(s), %d trials each, into %s", len(jobs), trials, database_dir
            )
            _tune(database, Path(database_dir), jobs, target, trials, progress)
    applied: dict[str, str] = {}
    for name, workload in workloads.items():
        record = _best_record(database, workload, target)
        if record is None:
            continue
        from tvm import s_tir

        sch = s_tir.Schedule(workload)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        scheduled = sch.mod["main"].without_attr("global_symbol")  # as to_relax made it
        mod.update_func(mod.get_global_var(name), scheduled)
        applied[name] = "tuned"
    log.info("%d of %d kernel(s) scheduled from %s", len(applied), len(workloads), database_dir)
    return mod, applied


def _has_function(mod: Any, name: str) -> bool:
    return any(gv.name_hint == name for gv in mod.get_global_vars())


__all__ = ["TUNED_KINDS", "open_database", "tune_with_database"]
