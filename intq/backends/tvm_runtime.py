"""The TVM backend's targets, compiled executable, artifacts (library + manifest) and loader.

:func:`intq.backends.tvm.compile_tvm` builds a :class:`TvmExecutable`; this module holds
what runs and saves it, and :func:`load_tvm`, which needs TVM's runtime and the manifest
only (no IR graph), as a device-side loader would.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from intq.artifacts import LAYER_TABLE, MAX_ARTIFACT_BYTES, SHA256
from intq.backends import tvm_threads
from intq.backends.base import (
    Content,
    KernelTime,
    check_artifact_path,
    check_declared_size,
    check_profile_runs,
    kernel_times,
    no_graph_for_vectors,
    remove_stale_temporaries,
    save_artifact,
    temporary_prefix,
)
from intq.errors import ArtifactError, IntqError
from intq.inspection import layer_table
from intq.ir.graph import Graph, Value
from intq.ir.types import DType, TensorType
from intq.schema import (
    boolean,
    equal,
    integer,
    list_of,
    mapping,
    number,
    obj,
    one_of,
    optional,
    parse_json,
    string,
    validate,
)
from intq.semantics.feeds import Feeds, IndexTable, check_feeds, index_tables
from intq.signing import SIGNATURE_SUFFIX
from intq.vectors import write_golden_vectors

MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".json"
"""A library's manifest is named for it with this added: ``model.so.json``."""

SUFFIXES = (".so", ".tar")
"""What a TVM artifact's library is named: a shared object, or a .tar of object files."""
ARTIFACT = "a shared object (.tar of objects for a cross target) and a manifest"
"""What :meth:`TvmExecutable.save` writes, in a few words."""


DEFAULT_SPIN_COUNT = 0
"""How many rounds an idle worker of TVM's thread pool busy-waits for the next parallel
region before it sleeps, unless ``TVM_THREAD_POOL_SPIN_COUNT`` says otherwise. TVM's own
default (300000 rounds of ``sched_yield``) keeps a waiting worker on its core, taking it from
whatever else needs it (``benchmarks/tvm_threads.py`` measures both)."""

POOL_DEFAULTS = {
    "TVM_THREAD_POOL_SPIN_COUNT": str(DEFAULT_SPIN_COUNT),
    # TVM pins each pool thread, the caller's too, to one CPU. With one thread that pins the
    # calling Python thread to CPU 0 for good: two such processes on a 2-core machine then
    # share CPU 0 while CPU 1 idles. Unpinned, the OS places them.
    "TVM_BIND_THREADS": "0",
}
"""The thread-pool settings intq gives TVM where the environment names none (TVM reads them
once, when its pool starts)."""


def _tvm() -> Any:
    """Import TVM on first use (``import intq`` must not pay for it), with intq's thread-pool
    defaults set before TVM's pool starts (:data:`POOL_DEFAULTS`)."""
    for name, value in POOL_DEFAULTS.items():
        os.environ.setdefault(name, value)
    import tvm
    from tvm import relax  # noqa: F401  (registers the Relax namespace)

    return tvm


_SCOPE_LOG = re.compile(
    rb"^\[[\d:]+\] \S*executable\.cc:\d+: Warning: Scope (?:Saving|Loaded):.*\n?", re.M
)

_T = TypeVar("_T")


def without_scope_log(call: Callable[[], _T]) -> _T:
    """``call()`` with the ``Scope Saving:`` / ``Scope Loaded:`` lines TVM's VM executable
    writes on each save and load removed from stderr; anything else written meanwhile is
    passed on when the call returns.

    TVM 0.27 logs one such warning per constant once a VM has run on the executable (running
    fills its table of memory scopes), with no log level or hook to turn them off: its C++
    ``LOG(WARNING)`` writes straight to ``std::cerr``. So file descriptor 2 is pointed at a
    temporary file around the call, and the lines are filtered out of it afterwards (what
    other threads write to stderr meanwhile is delayed until the call returns, not lost).
    """
    sys.stderr.flush()
    try:
        original = os.dup(2)
    except OSError:  # no stderr to clean: nothing would be printed
        return call()
    try:
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                return call()
            finally:
                os.dup2(original, 2)
                capture.seek(0)
                rest = memoryview(_SCOPE_LOG.sub(b"", capture.read()))
                while rest:
                    rest = rest[os.write(2, rest) :]
    finally:
        os.close(original)


# ----- targets ------------------------------------------------------------------------------------


def host_target() -> dict[str, Any]:
    """The LLVM target of this machine: its CPU name (``znver3`` here) and core count."""
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}


def parse_target(target: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """A target dict from ``None`` (the host), a dict, or its JSON text; checked by TVM."""
    if target is None:
        return host_target()
    if isinstance(target, str):
        try:
            target = json.loads(target)
        except json.JSONDecodeError as err:
            raise IntqError(
                f"the TVM target {target!r} is not JSON: {err}",
                hint='write it as a JSON object, e.g. {"kind": "llvm", "mcpu": "znver3"}',
            ) from err
    if not isinstance(target, Mapping) or "kind" not in target:
        raise IntqError(
            f"a TVM target must be an object with a 'kind', got {target!r}",
            hint='e.g. {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}',
        )
    spec = dict(target)
    if isinstance(spec.get("mattr"), str):  # "+neon,+dotprod" is how people write it
        spec["mattr"] = [a for a in spec["mattr"].split(",") if a]
    try:
        _tvm().target.Target(spec)
    except Exception as err:  # TVM raises its own error types from the FFI
        raise IntqError(
            f"TVM rejects the target {spec}: {str(err).strip().splitlines()[-1]}",
            hint="see tvm.target.Target for the keys of each kind",
        ) from err
    return spec


def is_host(spec: Mapping[str, Any]) -> bool:
    """True when code for ``spec`` runs on this machine's CPU (an x86-64 LLVM target)."""
    if spec.get("kind") != "llvm":
        return False
    triple = str(spec.get("mtriple", ""))
    return not triple or triple.startswith("x86_64")


def links_here(spec: Mapping[str, Any]) -> bool:
    """True when this machine links the module into a shared object: x86-64 CPU code, or
    CUDA kernels (PTX/cubin embedded) with their x86-64 host code."""
    return is_host(spec) or spec.get("kind") == "cuda"


def _dtype(value: Value) -> str:
    return str(value.type.dtype.numpy)


def _input(node: Any) -> Value:
    value = node.inputs[0]
    assert value is not None
    return value


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output as the manifest describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    quantization: dict[str, Any] | None = None
    indices: tuple[IndexTable, ...] = ()  # the tables an integer input indexes

    def value(self) -> Value:
        """An IR value with this name and type (what :func:`check_feeds` reads)."""
        return Value(self.name, TensorType(DType.from_numpy(np.dtype(self.dtype)), self.shape))

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "quantization": self.quantization,
        }
        if self.indices:  # written only where there are some: older readers take the rest
            data["indices"] = [asdict(t) for t in self.indices]
        return data

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> TensorSpec:
        indices = tuple(IndexTable(**t) for t in data.get("indices", ()))
        return TensorSpec(
            data["name"], tuple(data["shape"]), data["dtype"], data.get("quantization"), indices
        )


def graph_specs(graph: Graph) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs with the quantization their ``Quantize`` applies; outputs with the scale
    their ``Dequantize`` multiplies by (or their own quantization, for integer outputs)."""
    inputs = []
    for v in graph.inputs:
        quant = None
        readers = [n for n in v.consumers() if n.op == "Quantize"]
        if readers:
            q = readers[0].output.type.quant
            assert q is not None
            quant = {
                "op": "quantize",
                "formula": "clamp(round_half_even(float32(x) / scale), qmin, qmax); NaN -> 0",
                "scale": float(np.float32(readers[0].attrs["scale"])),
                "bits": q.bits,
                "signed": q.signed,
                "qmin": q.qmin,
                "qmax": q.qmax,
                "dtype": _dtype(readers[0].output),
            }
        inputs.append(TensorSpec(v.name, v.type.shape, _dtype(v), quant, index_tables(v)))
    outputs = []
    for v in graph.outputs:
        quant = None
        producer = v.producer
        if producer is not None and producer.op == "Dequantize":
            q = _input(producer).type.quant
            assert q is not None
            quant = {
                "op": "dequantize",
                "formula": "float32(q) * scale[c]",
                "scale": list(q.scale),
                "axis": q.axis,
                "bits": q.bits,
                "signed": q.signed,
            }
        elif v.type.quant is not None:
            q = v.type.quant
            quant = {
                "op": "integer",
                "scale": list(q.scale),
                "axis": q.axis,
                "bits": q.bits,
                "signed": q.signed,
            }
        outputs.append(TensorSpec(v.name, v.type.shape, _dtype(v), quant))
    return inputs, outputs


def check_inputs(specs: Sequence[TensorSpec], inputs: Feeds) -> dict[str, np.ndarray]:
    """``inputs`` matched to the module's inputs (names, shapes, dtypes; see :func:`check_feeds`).

    The module quantizes its float inputs itself (the graph's ``Quantize`` ops are compiled
    into it), so checking is all the preparation an input needs, here or on a remote device.
    """
    return check_feeds([s.value() for s in specs], inputs, {s.name: s.indices for s in specs})


def device_arguments(
    specs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray], device: Any
) -> list[Any]:
    """Checked ``feeds`` as TVM tensors on ``device`` (local or an RPC session's), in the
    order of ``specs``: the arguments of the module's entry function."""
    tvm = _tvm()
    # np.require, not ascontiguousarray: that makes a rank-0 input 1-d, which the VM refuses.
    return [tvm.runtime.tensor(np.require(feeds[s.name], requirements="C"), device) for s in specs]


def named_outputs(specs: Sequence[TensorSpec], results: Any) -> dict[str, np.ndarray]:
    """The entry function's results (a tuple of tensors, or one tensor) as name -> array,
    copied to this machine; ``Dequantize`` outputs are already float, as the graph says."""
    if hasattr(results, "numpy"):  # a single tensor, not a tuple of them
        results = (results,)
    return {s.name: results[i].numpy() for i, s in enumerate(specs)}


class HostCall:
    """An executable's entry function on this machine's CPU, its arguments allocated once.

    On the small models of the coverage corpus a whole VM run takes 20-190 us, while
    ``tvm.runtime.tensor(array)`` costs 20-35 us per input and ``tensor.numpy()`` about 12 us
    per output, nearly all of it Python and FFI bookkeeping rather than copying. So the inputs
    live in TVM tensors allocated once (TVM's kernels require 64-byte aligned data, which a
    numpy array need not have: no zero-copy input), and each run fills them through numpy
    views of them (DLPack) with one ``np.copyto`` each. Each output is copied out through
    such a view: never handed out as it is, because an output may be a view of an input
    tensor (a reshape of an input is one) that the next run overwrites, or of a constant.

    Runs are serialized by a lock (the inputs are shared, and the VM holds one call's
    registers at a time), so one executable may be run from several threads.
    """

    def __init__(self, specs: Sequence[TensorSpec], function: Any, device: Any) -> None:
        self.specs = list(specs)
        self.function = function
        self.device = device
        self.tensors: list[Any] = []
        self.views: list[np.ndarray] = []
        self.lock = threading.Lock()

    def __call__(self, inputs: Feeds) -> list[np.ndarray]:
        """The entry function's results on ``inputs`` (checked as :func:`check_inputs`
        does), in order, as numpy arrays of their own."""
        feeds = check_inputs(self.specs, inputs)
        with self.lock:
            if len(self.tensors) != len(self.specs):  # the first run, its feeds checked
                empty = _tvm().runtime.empty
                self.tensors = [empty(s.shape, s.dtype, self.device) for s in self.specs]
                self.views = [np.from_dlpack(t) for t in self.tensors]
            for spec, view in zip(self.specs, self.views):
                np.copyto(view, feeds[spec.name], casting="no")
            results = self.function(*self.tensors)
            if hasattr(results, "numpy"):  # a single tensor, not a tuple of them
                results = (results,)
            return [np.from_dlpack(r).copy() for r in results]


# ----- the manifest's schema (intq.schema) ---------------------------------------------------

_DTYPES = tuple(d.numpy.name for d in DType)
_NAME = string(1024)
_IDENTIFIER = string(256, pattern=r"[A-Za-z_][A-Za-z0-9_.]*")
_SCALE = number(0.0)
_QUANTIZATION = obj(
    {
        "op": string(choices=("quantize", "dequantize", "integer")),
        "scale": one_of(_SCALE, list_of(_SCALE, 1 << 20, 1), what="a scale or a list of them"),
        "bits": integer(1, 64),
        "signed": boolean,
    },
    {
        "formula": string(),
        "axis": optional(integer(0, 31), "an axis"),
        "qmin": integer(),
        "qmax": integer(),
        "dtype": string(choices=_DTYPES),
    },
)
_TENSOR = obj(
    {
        "name": _NAME,
        "shape": list_of(integer(0, 2**31 - 1), 32),
        "dtype": string(choices=_DTYPES),
    },
    {
        "quantization": optional(_QUANTIZATION, "a quantization"),
        "indices": list_of(obj({"node": _NAME, "table": _NAME, "size": integer(1, 2**62)}), 10_000),
    },
)
_OPTION = one_of(
    string(),
    integer(),
    boolean,
    list_of(string(), 256),
    what="a string, an integer, a boolean or a list of strings",
)
_TARGET = obj(
    {"kind": _IDENTIFIER},
    extra=one_of(_OPTION, mapping(_IDENTIFIER, _OPTION, 256), what="a target option"),
)
MANIFEST = obj(
    {
        "format": equal("intq-tvm"),
        "version": equal(MANIFEST_VERSION),
        "target": _TARGET,
        "inputs": list_of(_TENSOR, 10_000),
        "outputs": list_of(_TENSOR, 10_000, 1),
        "sha256": SHA256,
    },
    {
        "entry": _IDENTIFIER,
        "runtime": string(),
        "kernels": mapping(_NAME, list_of(_NAME, 100_000), 100_000),
        "layers": optional(LAYER_TABLE, "a per-layer table"),
        "schedules": mapping(_NAME, list_of(string(), 2, 2), 100_000),
    },
)
"""What a TVM manifest holds (:mod:`intq.schema`); every field is checked on reading."""

_MANIFEST_HINT = "compile it again; save() writes the manifest next to the library"


TUNED_SCHEDULES = ("tuned",)
"""What :attr:`TvmExecutable.schedules` says of a kernel scheduled from MetaSchedule records
(:mod:`intq.backends.tvm_tuning`): its own schedule, not a fallback."""


class ScheduleFallbackWarning(UserWarning):
    """Some kernels of a TVM build run without their own schedule (a plainer one, or TVM's
    default loops: often many times slower); :attr:`TvmExecutable.fallbacks` lists them."""


def fallback_summary(fallbacks: Mapping[str, tuple[str, str]], limit: int = 5) -> str:
    """``fallbacks`` (:attr:`TvmExecutable.fallbacks`) in one line: how many, and the first
    ``limit`` as ``prim func (kind -> what ran)``."""
    shown = [f"{name} ({kind} -> {applied})" for name, (kind, applied) in fallbacks.items()]
    more = f" and {len(shown) - limit} more" if len(shown) > limit else ""
    return f"{len(shown)} kernels without their own schedule: {', '.join(shown[:limit])}{more}"


class TvmExecutable:
    """A graph compiled by TVM: runs on the Relax VM (host targets) and saves as a library."""

    target = "tvm"

    def __init__(
        self,
        executable: Any,
        tvm_target: Mapping[str, Any],
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        graph: Graph | None = None,
        compile_seconds: float = 0.0,
    ):
        self.executable = executable
        self.tvm_target = dict(tvm_target)
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.graph = graph
        self.compile_seconds = compile_seconds
        self.schedules: dict[str, tuple[str, str]] = {}
        """Prim func -> (kernel kind, the schedule that applied), from :func:`compile_tvm`
        (and the manifest of a loaded library); see :attr:`fallbacks`."""
        self.kernel_paths: dict[str, str] = {}
        """Prim func -> what each conv and dense kernel's inner product runs as (``"vnni"``,
        ``"byte"``, ``"vpmaddwd"``, ``"vector"`` or ``"fallback"``:
        :data:`~intq.backends.tvm_schedules.KERNEL_PATHS`), from :func:`compile_tvm`."""
        self.kernel_nodes: dict[str, list[str]] = {}
        """Prim func -> the graph nodes it computes (saved in the manifest)."""
        self.path: Path | None = None
        """The library this executable was loaded from (:func:`load_tvm`); None when compiled."""
        self.artifact: TvmArtifact | None = None
        """The checked bytes and manifest it was loaded from (:func:`load_tvm`)."""
        self.saved_layers: list[dict[str, Any]] | None = None
        """The per-layer table read from a loaded library's manifest (None when compiled, or
        when the manifest predates it)."""
        self._vm: Any = None
        self._pool: tvm_threads.ThreadPolicy | None = None
        """The process's thread-pool policy, once a CPU VM exists."""
        self._call: HostCall | None = None
        """What :meth:`run` calls on a CPU VM (None for a GPU module)."""

    @property
    def fallbacks(self) -> dict[str, tuple[str, str]]:
        """The kernels that run without their own schedule: prim func -> (kernel kind, the
        plainer schedule that applied instead, ``"none"`` for TVM's default loops), from
        :attr:`schedules`. Empty when every kernel has its hand (or tuned) schedule."""
        return {
            name: (kind, applied)
            for name, (kind, applied) in self.schedules.items()
            if applied != kind and applied not in TUNED_SCHEDULES
        }

    @property
    def input_names(self) -> list[str]:
        """Names of the inputs ``run`` expects."""
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """Names of the outputs ``run`` returns."""
        return [s.name for s in self.outputs]

    @property
    def layers(self) -> list[dict[str, Any]]:
        """The per-layer table (bits and scales): of the graph when compiled, from the
        manifest when loaded (``save`` stores it there)."""
        if self.graph is not None:
            return layer_table(self.graph)
        if self.saved_layers is None:
            raise ArtifactError(
                f"{self.path}'s manifest holds no per-layer table (an earlier intq wrote it)",
                hint="compile the model again to save the table with the library",
            )
        return self.saved_layers

    def vm(self) -> Any:
        """The Relax virtual machine on this CPU (created on first use)."""
        if self._vm is None:
            device = self._local_device()
            try:
                vm = _tvm().relax.VirtualMachine(self.executable, device)
                main = vm["main"]
            except Exception as err:  # the FFI's error: no VM executable in the library
                if self.path is None:
                    raise
                raise self._mismatch(str(err).strip().splitlines()[-1]) from None
            if self.tvm_target.get("kind") != "cuda":  # runs on the CPU's thread pool
                self._pool = tvm_threads.policy(_tvm())
                self._call = HostCall(self.inputs, main, device)
            self._vm = vm
        return self._vm

    def _local_device(self) -> Any:
        """:meth:`device`, which must exist on this machine (else a clear error)."""
        device = self.device()
        if not device.exist:
            raise IntqError(
                f"a module compiled for {self.tvm_target} cannot run on this machine",
                hint="save it with .save('model.tar') and run it on the device",
            )
        return device

    def device(self) -> Any:
        """The TVM device the module runs on (a CUDA GPU for CUDA targets, else the CPU).

        The CPU only counts as present for x86-64 targets: an AArch64 module cannot run here.
        """
        tvm = _tvm()
        if self.tvm_target.get("kind") == "cuda":
            return tvm.cuda(0)
        if is_host(self.tvm_target):
            return tvm.cpu()
        return tvm.device("ext_dev", 0)  # never present: no such device on this machine

    def run(self, inputs: Feeds) -> dict[str, np.ndarray]:
        """Run on ``inputs`` (name -> array, or one array for a single-input model); returns
        output name -> array."""
        vm = self.vm()
        if self._call is not None:
            return self._run_on_host(self._call, inputs)
        feeds = check_inputs(self.inputs, inputs)
        device = self.device()
        if self.path is None:
            return named_outputs(
                self.outputs, vm["main"](*device_arguments(self.inputs, feeds, device))
            )
        try:
            results = vm["main"](*device_arguments(self.inputs, feeds, device))
            count = 1 if hasattr(results, "numpy") else len(results)
        except Exception as err:  # TVM's checks of the arguments, from the FFI
            raise self._mismatch(str(err).strip().splitlines()[-1]) from None
        if count != len(self.outputs):
            raise self._mismatch(
                f"it returns {count} outputs, the manifest lists {len(self.outputs)}"
            )
        return named_outputs(self.outputs, results)

    def _run_on_host(self, call: HostCall, inputs: Feeds) -> dict[str, np.ndarray]:
        """:meth:`run` on this machine's CPU (:class:`HostCall`)."""
        assert self._pool is not None
        self._pool.before_run()
        if self.path is None:
            return dict(zip(self.output_names, call(inputs)))
        try:
            results = call(inputs)
        except IntqError:  # the feeds' own check
            raise
        except Exception as err:  # TVM's checks of the arguments, from the FFI
            raise self._mismatch(str(err).strip().splitlines()[-1]) from None
        if len(results) != len(self.outputs):
            raise self._mismatch(
                f"it returns {len(results)} outputs, the manifest lists {len(self.outputs)}"
            )
        return dict(zip(self.output_names, results))

    def _mismatch(self, what: str) -> ArtifactError:
        """The refusal of a loaded library that does not compute what its manifest says."""
        return ArtifactError(
            f"{self.path} does not take or give the tensors its manifest"
            f" {_manifest_path(self.path or Path())} describes: {what}",
            hint="keep a library with the manifest saved with it; compile it again",
        )

    def profile(self, inputs: Feeds, runs: int = 10, warmup: int = 2) -> list[KernelTime]:
        """Time every call the VM makes (kernels and its own builtins, such as allocations)
        over ``runs`` runs on ``inputs`` after ``warmup`` untimed ones; slowest first.

        Runs on a VM of its own with an instrument around each call, so :meth:`run` stays
        uninstrumented. Each call is timed from Python (a few microseconds), so the rows add
        up to more than a plain run takes, most visibly for the many small builtins.
        """
        check_profile_runs(runs, warmup)
        feeds = check_inputs(self.inputs, inputs)
        device = self._local_device()
        vm = _tvm().relax.VirtualMachine(self.executable, device)
        arguments = device_arguments(self.inputs, feeds, device)
        run: dict[str, tuple[int, float]] = {}
        started = [0]

        def instrument(func: Any, name: str, before: bool, result: Any, *args: Any) -> int:
            now = time.perf_counter_ns()
            if before:
                started[0] = now
            else:
                calls, ms = run.get(name, (0, 0.0))
                run[name] = (calls + 1, ms + (now - started[0]) / 1e6)
            return 0  # VMInstrumentReturnKind.kNoOp: carry on

        vm.set_instrument(instrument)
        runs_seen = []
        for index in range(warmup + runs):
            run = {}
            vm["main"](*arguments)
            if index >= warmup:
                runs_seen.append(run)
        return kernel_times(runs_seen, self.kernel_nodes)

    def golden_vectors(
        self, inputs: Feeds, out_dir: str | Path, *, overwrite: bool = False
    ) -> Path:
        """Write every integer node's inputs and outputs on ``inputs`` into ``out_dir``, as
        the reference interpreter computes them (:mod:`intq.vectors`; the TVM build is bit
        exact with it); returns ``out_dir``. A library loaded from disk has no graph and
        refuses."""
        if self.graph is None:
            raise no_graph_for_vectors(f"the TVM library {self.path}")
        return write_golden_vectors(self.graph, inputs, out_dir, overwrite=overwrite)

    def manifest(self) -> dict[str, Any]:
        """What a device-side loader needs: entry point, tensors, how to (de)quantize."""
        return {
            "format": "intq-tvm",
            "version": MANIFEST_VERSION,
            "entry": "main",
            "runtime": "tvm.relax.VirtualMachine",
            "target": self.tvm_target,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "kernels": self.kernel_nodes,
            "layers": self.layers if self.graph is not None else self.saved_layers,
            "schedules": {name: list(pair) for name, pair in self.schedules.items()},
        }

    def save(self, path: str | Path, *, sign_key: Any = None) -> Path:
        """Write the library and ``<path>.json`` (its manifest), and with ``sign_key`` a
        signature over both (:mod:`intq.signing`).

        A host target writes a shared object (``.so``, or ``.tar`` of its object files); a
        cross target needs a ``.tar`` name and writes its object files there, for the
        device's toolchain to link. Another suffix is refused
        (:func:`~intq.backends.base.check_artifact_path`). Nothing is placed until every
        file is written in full: a failure anywhere (no linker, a full disk, a file size
        limit, even LLVM ending the exporting process) leaves no file of this save behind.
        Returns the library's path.
        """
        path = check_artifact_path(path, "tvm", SUFFIXES, ARTIFACT)
        cross = not links_here(self.tvm_target)
        if cross and path.suffix != ".tar":
            raise ArtifactError(
                f"{path}: a module for {self.tvm_target} is saved as a .tar of object files",
                hint=f"save it as {path.with_suffix('.tar')}; no cross linker is needed",
            )
        directory = path.parent if str(path.parent) else Path(".")
        staging: Path | None = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path, (MANIFEST_SUFFIX, SIGNATURE_SUFFIX))
            staging = Path(
                tempfile.mkdtemp(prefix=temporary_prefix(path), suffix=".tmp", dir=directory)
            )
            staged = staging / ("lib.tar" if path.suffix == ".tar" else "lib.so")
            _export(self.executable, staged, path)
            library = staged.read_bytes()
            manifest = {**self.manifest(), "sha256": hashlib.sha256(library).hexdigest()}
            files: dict[str, Content] = {
                "": staged,
                MANIFEST_SUFFIX: json.dumps(manifest, indent=2).encode(),
            }
            return save_artifact(path, files, sign_key)
        except OSError as err:
            raise ArtifactError(
                f"cannot write {path}: {err.strerror or err}",
                hint="check that the directory exists, is writable and has room",
            ) from None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)


_EXIT_HANDLER: Any = None
"""The ``on_exit`` handler of an export child (kept alive: C holds a pointer to it)."""


def _end_quickly(parent: int) -> None:
    """In a forked export child: end with the parent (``PR_SET_PDEATHSIG``), and let an
    ``exit()`` from LLVM end the process at once (``_exit``) with its status.

    Without the second, ``exit()`` runs the exit handlers of every library the parent had
    loaded, and ONNX Runtime's wait on a condition variable of a thread the fork did not
    copy: the child never ends."""
    global _EXIT_HANDLER
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    with contextlib.suppress(AttributeError):
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent is gone already
        os._exit(1)
    handler = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p)(
        lambda status, _: os._exit(status or 1)
    )
    with contextlib.suppress(AttributeError):  # glibc's; exit handlers run last-first
        libc.on_exit(handler, None)
        _EXIT_HANDLER = handler


def _export(executable: Any, staged: Path, path: Path) -> None:
    """``executable.export_library(staged)`` in a child process (forked: it shares the
    compiled module), its intermediate files in ``staged``'s directory.

    LLVM ends the process that writes an object file when the write fails (``LLVM ERROR:
    IO failure on output stream: File too large``, on a full disk or a file size limit):
    in this process, nothing after it would run, no temporary would be removed and the
    caller would get no error. In a child, the failure is the child's exit status, and its
    message (its stderr) becomes the :class:`ArtifactError`.
    """
    workspace = staged.with_name("work")
    workspace.mkdir()
    sys.stdout.flush()
    sys.stderr.flush()
    # The child's stderr is a pipe, not a file: a file size limit that stops the export
    # must not stop its message too.
    reader, writer = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: export, say how it went by the exit status, never return
        status = 1
        try:
            os.close(reader)
            os.dup2(writer, 2)
            _end_quickly(parent)
            executable.export_library(str(staged), workspace_dir=str(workspace))
            status = 0
        except BaseException as err:
            os.write(2, f"\n{type(err).__name__}: {str(err).strip()}\n".encode(errors="replace"))
        finally:
            os._exit(status)
    os.close(writer)
    chunks = []
    try:
        with os.fdopen(reader, "rb") as pipe:
            while chunk := pipe.read(1 << 16):  # until the child exits (TVM logs a lot)
                chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
    except BaseException:  # interrupted: stop the child before its files are removed
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    output = _SCOPE_LOG.sub(b"", b"".join(chunks))
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and staged.is_file():
        if output.strip():  # what TVM printed besides its scope log, as it would have
            sys.stderr.write(output.decode(errors="replace"))
        return
    lines = [line for line in output.decode(errors="replace").splitlines() if line.strip()]
    if os.WIFSIGNALED(status):
        reason = f"the exporting process was killed by signal {os.WTERMSIG(status)}"
    else:
        reason = lines[-1].strip() if lines else f"exit status {os.WEXITSTATUS(status)}"
    raise ArtifactError(
        f"TVM could not export {path}: {reason}",
        hint="check that the directory has room (and the file size limit, ulimit -f); for a"
        " cross target, save as .tar (object files, no linker needed)",
    )


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name + MANIFEST_SUFFIX)


@dataclass(frozen=True)
class TvmArtifact:
    """A saved library's verified bytes and its manifest, without loading (running) it.

    What a loader needs, here or on another machine: :func:`load_tvm` loads ``library``
    into this process; :func:`intq.backends.tvm_rpc.remote_bench` uploads it to a device.
    """

    path: Path
    library: bytes
    target: dict[str, Any]
    entry: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    kernels: dict[str, list[str]]
    """Prim func -> the graph nodes it computes (for profiles of a loaded library)."""
    layers: list[dict[str, Any]] | None = None
    """The per-layer table (:func:`intq.inspection.layer_table`); None in older manifests."""
    schedules: dict[str, list[str]] = field(default_factory=dict)
    """Prim func -> [kernel kind, the schedule that applied]; empty in older manifests."""

    @property
    def needs_linker(self) -> bool:
        """True for a ``.tar`` of object files: whoever loads it links it first (TVM's
        ``load_module`` runs the machine's C++ compiler, ``$CXX`` or ``g++``)."""
        return self.path.suffix == ".tar"


def read_tvm_artifact(path: str | Path) -> TvmArtifact:
    """Read a library written by :meth:`TvmExecutable.save` and its manifest, checking the
    manifest (:data:`MANIFEST`) and the library's sha256; any target (a cross ``.tar`` too).
    Signatures are checked by :func:`intq.backends.artifact_files`, which reads the files
    once for :func:`tvm_artifact`."""
    path = Path(path)
    files = {}
    for suffix in ("", MANIFEST_SUFFIX):
        name = path.with_name(path.name + suffix)
        try:
            size = name.stat().st_size
            if size > MAX_ARTIFACT_BYTES:
                raise ArtifactError(f"{name} is {size} bytes, more than intq reads")
            files[suffix] = name.read_bytes()
        except OSError as err:
            raise ArtifactError(
                f"cannot read {name}: {err.strerror or err}",
                hint="save() writes the library and its manifest (.json) side by side;"
                " keep the two together",
            ) from None
    return tvm_artifact(path, files)


def tvm_artifact(path: Path, files: Mapping[str, bytes]) -> TvmArtifact:
    """The artifact of the library ``path`` from its files' bytes (``""``: the library,
    ``".json"``: the manifest): every manifest field checked against :data:`MANIFEST`, each
    tensor within :data:`~intq.frontends.onnx_context.MAX_TENSOR_BYTES`, and the library's
    sha256 against the manifest's. Refusals are :class:`ArtifactError` naming the field."""
    manifest_path = _manifest_path(path)
    document = parse_json(
        files[MANIFEST_SUFFIX], manifest_path, "manifest", lambda v, at: v, hint=_MANIFEST_HINT
    )
    if (
        not isinstance(document, dict)
        or document.get("format") != "intq-tvm"
        or document.get("version") != MANIFEST_VERSION
    ):
        raise ArtifactError(
            f"{manifest_path} is not an intq TVM manifest (version {MANIFEST_VERSION})",
            hint=_MANIFEST_HINT,
        )
    manifest = validate(document, manifest_path, "manifest", MANIFEST, hint=_MANIFEST_HINT)
    for role in ("inputs", "outputs"):
        for i, spec in enumerate(manifest[role]):
            itemsize = np.dtype(spec["dtype"]).itemsize
            what = f"manifest field {role}[{i}].shape"
            check_declared_size(manifest_path, what, spec["shape"], itemsize)
    library = files[""]
    if hashlib.sha256(library).hexdigest() != manifest["sha256"]:
        raise ArtifactError(
            f"{path} does not match the checksum in {manifest_path.name}: it was modified or"
            " damaged after intq wrote it",
            hint="compile it again; a library is loaded (its code run) only when it matches",
        )
    return TvmArtifact(
        path,
        library,
        manifest["target"],
        manifest.get("entry", "main"),
        [TensorSpec.from_json(s) for s in manifest["inputs"]],
        [TensorSpec.from_json(s) for s in manifest["outputs"]],
        manifest.get("kernels", {}),
        manifest.get("layers"),
        manifest.get("schedules", {}),
    )


def _check_tar(artifact: TvmArtifact) -> None:
    """Refuse a ``.tar`` library whose members are not plain files with plain names:
    unpacking it must not write anywhere but the directory it is unpacked in."""
    try:
        with tarfile.open(fileobj=io.BytesIO(artifact.library)) as archive:
            members = archive.getmembers()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ArtifactError(f"{artifact.path} is not a valid .tar ({err})") from None
    for member in members:
        if not member.isfile() or "/" in member.name or member.name.startswith("."):
            raise ArtifactError(
                f"{artifact.path}: the member {member.name!r} is not a plain object file",
                hint="a TVM .tar artifact holds object files only; compile it again",
            )


def load_library(artifact: TvmArtifact) -> Any:
    """The TVM module in ``artifact``'s library bytes, loaded (its code run) from a private
    copy of exactly those bytes, so that what was checked is what runs even if the file
    changes meanwhile. A ``.tar`` is linked there first (the machine's C++ compiler)."""
    tvm = _tvm()
    tar = artifact.path.suffix == ".tar"
    if tar:
        _check_tar(artifact)
    with tempfile.TemporaryDirectory(prefix="intq-load-") as private:  # mode 0700
        copy = Path(private) / ("lib.tar" if tar else "lib.so")
        copy.write_bytes(artifact.library)
        try:
            return without_scope_log(lambda: tvm.runtime.load_module(str(copy)))
        except Exception as err:  # TVM's loader errors come from the FFI
            raise ArtifactError(
                f"TVM cannot load {artifact.path}: {str(err).strip().splitlines()[-1]}",
                hint="compile it again for this machine",
            ) from None


def load_tvm(path: str | Path, files: Mapping[str, bytes] | None = None) -> TvmExecutable:
    """Reopen a host library written by :meth:`TvmExecutable.save` (with its manifest):
    from ``files`` (the library's and the manifest's bytes, as :func:`intq.load` read and
    checked them) or, without, read from ``path``."""
    path = Path(path)
    artifact = read_tvm_artifact(path) if files is None else tvm_artifact(path, files)
    if not links_here(artifact.target):
        raise ArtifactError(
            f"{path} holds code for {artifact.target}, not this machine",
            hint="load it on the device it was compiled for",
        )
    module = load_library(artifact)
    if not module.implements_function("vm_load_executable"):
        raise ArtifactError(
            f"{path} holds no Relax VM executable: it is not a library intq compiled (its"
            " checksum in the manifest was recomputed, or the manifest belongs elsewhere)",
            hint="compile the model again; sign artifacts, sign_key=KEY (--sign-key KEY.pem), and"
            " load them with trusted_keys=KEYS (--trusted-key PUB.pem) to refuse a swapped"
            " library before it is loaded",
        )
    exe = TvmExecutable(module, artifact.target, artifact.inputs, artifact.outputs)
    exe.path = path
    exe.artifact = artifact
    exe.kernel_nodes = artifact.kernels
    exe.saved_layers = artifact.layers
    exe.schedules = {name: (kind, applied) for name, (kind, applied) in artifact.schedules.items()}
    return exe


__all__ = [
    "MANIFEST_VERSION",
    "ScheduleFallbackWarning",
    "TUNED_SCHEDULES",
    "fallback_summary",
    "graph_specs",
    "TensorSpec",
    "TvmArtifact",
    "TvmExecutable",
    "host_target",
    "is_host",
    "links_here",
    "check_inputs",
    "device_arguments",
    "load_library",
    "load_tvm",
    "MANIFEST",
    "MANIFEST_SUFFIX",
    "named_outputs",
    "tvm_artifact",
    "parse_target",
    "read_tvm_artifact",
    "without_scope_log",
]
