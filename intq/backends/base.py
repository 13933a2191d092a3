"""What every backend shares: the executable interface, the backend record, atomic writes,
and the rows of a per-kernel profile."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from intq import limits
from intq.errors import ArtifactError, IntqError
from intq.inspection import layer_table
from intq.ir.graph import Graph
from intq.semantics.feeds import Feeds
from intq.signing import SIGNATURE_SUFFIX, load_private_key, sign_files
from intq.vectors import write_golden_vectors


class Executable(Protocol):
    """A compiled graph: run it, or save it as an artifact."""

    target: str

    @property
    def input_names(self) -> list[str]: ...

    @property
    def output_names(self) -> list[str]: ...

    def run(self, inputs: Feeds) -> dict[str, np.ndarray]:
        """Run on ``inputs`` (name -> array; a single-input model also takes the bare array);
        returns output name -> array."""
        ...

    @property
    def layers(self) -> list[dict[str, Any]]:
        """The per-layer table: each integer layer's input, weight and output bits and scales
        (:func:`intq.inspection.layer_table`)."""
        ...

    def save(self, path: str | Path, *, sign_key: Any = None) -> Path:
        """Write the artifact atomically; returns its path. With ``sign_key`` (an Ed25519
        private key: :func:`intq.signing.load_private_key`) also a signature over all its
        files, which ``intq.load(path, trusted_keys=...)`` checks."""
        ...

    def golden_vectors(
        self, inputs: Feeds, out_dir: str | Path, *, overwrite: bool = False
    ) -> Path:
        """Write every integer node's inputs and outputs on ``inputs`` into ``out_dir``
        (:mod:`intq.vectors`); returns ``out_dir``. Needs the integer graph: an artifact
        loaded without it refuses."""
        ...


@dataclass(frozen=True)
class Backend:
    """One backend as ``intq.compile`` and ``intq.load`` see it: its entry in
    :data:`intq.backends.TARGETS`. Adding a backend means declaring one of these."""

    name: str
    """The target name: ``intq.compile(graph, target=name)``, ``intq compile --target``."""
    compile: Callable[..., Executable]
    """``compile(graph, **options)``: the graph as an executable."""
    load: Callable[[Path, Mapping[str, bytes]], Executable]
    """``load(path, files)``: the executable reopened from an artifact's path and the bytes
    of its files (suffix added to the name -> bytes; ``""`` is the artifact itself), read
    once by :func:`intq.backends.load` and checked there when signed."""
    suffixes: tuple[str, ...]
    """The artifact's usual file suffixes: how ``intq.load`` places a file whose envelope
    does not name its target."""
    artifact: str
    """What ``save`` writes, in a few words (for ``intq compile --help``)."""
    companions: tuple[str, ...] = ()
    """The artifact's other files, as suffixes added to its name (a TVM library's
    manifest: ``".json"``); a signature covers them too."""

    def check_path(self, path: str | Path) -> Path:
        """``path`` as the name of this backend's artifact (:func:`check_artifact_path`)."""
        return check_artifact_path(path, self.name, self.suffixes, self.artifact)


def check_artifact_path(
    path: str | Path, target: str, suffixes: Sequence[str], artifact: str
) -> Path:
    """``path`` as the name of a ``target`` artifact: refused (:class:`ArtifactError`,
    before anything is written) unless it ends in one of ``suffixes``, since a file named
    for another kind of artifact misleads its readers and ``intq.load`` places a file by its
    suffix when its envelope does not say."""
    path = check_file_name(Path(path))
    if path.suffix not in suffixes:
        raise ArtifactError(
            f"{path}: a {target} artifact is {artifact}, named {' or '.join(suffixes)}",
            hint=f"save it as {path.with_suffix(suffixes[0]).name}",
        )
    return path


def check_declared_size(path: Path, what: str, shape: Sequence[int], itemsize: int) -> None:
    """Refuse an artifact that declares a tensor (``what``, of ``shape``) larger than
    :data:`intq.limits.MAX_TENSOR_BYTES`, before anything of that size is allocated
    (``intq bench`` makes random inputs of the declared shapes)."""
    nbytes = limits.tensor_bytes(shape, itemsize)
    limit = limits.MAX_TENSOR_BYTES  # read now: a caller may have raised it
    if nbytes > limit:
        raise ArtifactError(
            f"{path}: {what} of shape {list(shape)} would take {nbytes:.3g} bytes,"
            f" more than intq's limit of {limit}",
            hint="recompile the model (intq compile ...); an artifact's shapes come from it",
        )


@dataclass(frozen=True)
class KernelTime:
    """One row of a per-kernel profile (``.profile(inputs)`` of the TVM and ONNX Runtime
    executables): a kernel, the graph nodes it computes, and its time per run."""

    kernel: str
    """The runtime's name for it: a TVM prim func or VM builtin, an ONNX Runtime node."""
    nodes: tuple[str, ...]
    """The intq graph nodes it computes (TVM shares one prim func among identical nodes; a
    layout change names the value it transposes); empty for the runtime's own calls."""
    calls: int
    """Calls per run."""
    ms: float
    """Median over the runs of its time in one run, all its calls together."""


def check_profile_runs(runs: int, warmup: int) -> None:
    """Refuse a profile of fewer than one timed run or a negative warm-up."""
    if runs < 1 or warmup < 0:
        raise IntqError(f"profile needs runs >= 1 and warmup >= 0, not {runs} and {warmup}")


def kernel_times(
    runs: Sequence[Mapping[str, tuple[int, float]]], nodes: Mapping[str, Sequence[str]]
) -> list[KernelTime]:
    """The profile of ``runs`` (each: kernel -> (calls, ms) in that run), slowest first;
    ``nodes`` names the graph nodes of each kernel it knows."""
    names = {name for run in runs for name in run}
    rows = [
        KernelTime(
            name,
            tuple(nodes.get(name, ())),
            max(run.get(name, (0, 0.0))[0] for run in runs),
            float(np.median([run.get(name, (0, 0.0))[1] for run in runs])),
        )
        for name in names
    ]
    return sorted(rows, key=lambda row: (-row.ms, row.kernel))


class GraphExecutable:
    """What executables built from an IR graph share: the graph and its input/output names."""

    target = ""

    def __init__(self, graph: Graph):
        self.graph = graph

    @property
    def input_names(self) -> list[str]:
        """Names of the inputs ``run`` expects."""
        return [v.name for v in self.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        """Names of the outputs ``run`` returns."""
        return [v.name for v in self.graph.outputs]

    @property
    def layers(self) -> list[dict[str, Any]]:
        """The per-layer table of the graph: each integer layer's bits and scales."""
        return layer_table(self.graph)

    def golden_vectors(
        self, inputs: Feeds, out_dir: str | Path, *, overwrite: bool = False
    ) -> Path:
        """Write every integer node's inputs and outputs on ``inputs`` into ``out_dir``, as
        the reference interpreter computes them (the format of :mod:`intq.vectors`);
        returns ``out_dir``. An existing non-empty ``out_dir`` is refused unless
        ``overwrite``."""
        return write_golden_vectors(self.graph, inputs, out_dir, overwrite=overwrite)


def no_graph_for_vectors(what: str) -> IntqError:
    """The refusal of ``golden_vectors`` by an executable loaded without its IR graph."""
    return IntqError(
        f"{what} holds compiled code, not the integer graph golden vectors are computed from",
        hint="write them from the .intq artifact of the same model (intq quantize, or"
        " intq compile --target reference), or from the executable intq.compile returned",
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


Content = bytes | Path
"""What :func:`write_files` places: bytes to write, or a file already staged beside the
target (renamed into place)."""

_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[a-z0-9_]{8}\.tmp")
"""The name of a temporary a save stages: ``.<target name>.<pid>.<random>.tmp``."""


def temporary_prefix(target: Path) -> str:
    """The prefix of this process's temporaries for ``target`` (:data:`_TEMPORARY`)."""
    return f".{target.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: Path, companions: Iterable[str] = ()) -> list[Path]:
    """Remove what a killed save to ``path`` (or to ``path`` + one of ``companions``) left
    behind: temporaries named for it whose writing process is gone. A live process's are
    kept, so that two saves at once do not undo each other; returns what was removed."""
    names = {path.name + c for c in ("", *companions)}
    directory = path.parent if str(path.parent) else Path(".")
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or match["name"] not in names or _alive(int(match["pid"])):
            continue
        stale = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def check_file_name(path: Path) -> Path:
    """``path``, refused (:class:`ArtifactError`) when the file system cannot name it: a NUL
    character, or characters that do not encode (a lone surrogate)."""
    try:
        encoded = os.fsencode(path)
    except UnicodeEncodeError:
        raise ArtifactError(
            f"{str(path)!a} cannot be a file name: it holds a lone surrogate",
            hint="name the file in plain text",
        ) from None
    if b"\0" in encoded:
        raise ArtifactError(
            f"{str(path)!a} cannot be a file name: it holds a NUL character",
            hint="name the file in plain text",
        )
    return path


def write_files(path: str | Path, files: Mapping[str, Content], remove: Sequence[str] = ()) -> Path:
    """Write one artifact's files: ``files`` maps a suffix added to ``path``'s name (``""``
    for ``path`` itself, ``".json"`` for a manifest) to its content; ``remove`` names
    suffixes of files that no longer belong with it (a signature of an earlier save).

    Every file is written in full to a temporary beside its target before any is renamed
    into place, in the order given, so a failure while writing (a full disk, a file size
    limit, an interrupt) leaves the previous files as they were, and its temporaries are
    removed (a ``finally``). Temporaries a killed save to the same path left are removed
    first (:func:`remove_stale_temporaries`); readers never look at them. Returns ``path``.
    """
    path = check_file_name(Path(path))
    directory = path.parent if str(path.parent) else Path(".")
    temporaries: list[Path] = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path, [*files, *remove])
        staged: list[tuple[Path, Path]] = []
        for suffix, content in files.items():
            target = path.with_name(path.name + suffix)
            if isinstance(content, Path):
                staged.append((content, target))
                continue
            fd, name = tempfile.mkstemp(
                prefix=temporary_prefix(target), suffix=".tmp", dir=directory
            )
            temporaries.append(Path(name))
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            # mkstemp makes the file private (0600); give it the usual permissions.
            os.chmod(name, 0o666 & ~_umask())
            staged.append((Path(name), target))
        for suffix in remove:
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        for source, target in staged:
            os.replace(source, target)
    except OSError as err:
        raise ArtifactError(
            f"cannot write {path}: {err.strerror or err}",
            hint="check that the directory exists, is writable and has room",
        ) from None
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)  # renamed ones are gone already
    return path


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename
    (:func:`write_files`): a crash or a full disk leaves either the old file or none, never
    half of a new one."""
    return write_files(path, {"": data})


def save_artifact(path: Path, files: Mapping[str, Content], sign_key: Any = None) -> Path:
    """Write an artifact's files (:func:`write_files`), with a signature file
    (``<path>.sig``, :mod:`intq.signing`) over all of them when ``sign_key`` is given; an
    unsigned save removes the signature an earlier save left, which no longer matches."""
    if sign_key is None:
        return write_files(path, files, remove=[SIGNATURE_SUFFIX])
    contents = {s: c if isinstance(c, bytes) else c.read_bytes() for s, c in files.items()}
    signature = sign_files(contents, load_private_key(sign_key))
    return write_files(path, {**files, SIGNATURE_SUFFIX: signature})
