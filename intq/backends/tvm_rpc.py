"""Run and time a TVM module on a remote device through a TVM RPC tracker.

The scale-out path for edge fleets: devices run ``python -m tvm.exec.rpc_server --tracker
HOST:PORT --key KEY`` and register with one tracker (``python -m tvm.exec.rpc_tracker``);
:func:`remote_bench` asks the tracker for a free device with a key, uploads the library,
loads it there, runs it once for its outputs and times it. ``intq bench ARTIFACT
--rpc-tracker HOST:PORT --rpc-key KEY`` is the command-line form.

How the Relax VM runs over RPC (TVM 0.27):

- the library is uploaded as bytes (``session.upload``) and loaded by the device
  (``session.load_module``); a ``.so`` must be linked for the device already, a ``.tar``
  of object files (what :meth:`TvmExecutable.save` writes for a cross target) is linked by
  the device itself, with its C++ compiler (``$CXX`` or ``g++``);
- ``relax.VirtualMachine(remote_module, session.cpu())`` builds the VM on the device;
- calling ``vm["main"](...)`` directly returns an ``RPCObjectRef`` for the tuple of
  outputs, which cannot be indexed from here, so the stateful API is used:
  ``vm.set_input`` with tensors already on the device, ``vm.invoke_stateful``,
  ``vm.get_outputs`` (tensors on the device, copied back with ``.numpy()``);
- timings come from TVM's ``time_evaluator`` on the VM's ``invoke_stateful``, run on the
  device (``number=1``, so one time per run): they exclude the network and Python.

:class:`tvm.rpc.TrackerSession` has no deadlines (connecting retries for 60 s, a request
for a busy or unknown key waits forever), so :func:`request_server` speaks the tracker's
three messages itself with ``tvm.rpc.base``'s framing, under one deadline, and checks the
key against the tracker's summary first.
"""

from __future__ import annotations

import gc
import socket
import struct
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from intq.backends.tvm_runtime import (
    TvmArtifact,
    TvmExecutable,
    _tvm,
    check_inputs,
    device_arguments,
    links_here,
    named_outputs,
    read_tvm_artifact,
)
from intq.errors import IntqError, RemoteError

DEFAULT_TIMEOUT = 10.0
"""Seconds to wait for the tracker to answer and hand out a free device."""

MAX_TIMEOUT = 86_400.0
"""The longest wait a timeout may ask for (a day)."""

_START_TRACKER = (
    "start one: python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}"
    " (it needs `pip install tornado`)"
)
_START_SERVER = (
    "start one on the device: python -m tvm.exec.rpc_server --tracker {tracker} --key {key}"
)


def parse_tracker(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9190`` for IPv6) as ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise IntqError(
            f"an RPC tracker address is HOST:PORT, got {text!r}", hint="e.g. 10.0.0.5:9190"
        )
    return host, int(port)


@dataclass(frozen=True, eq=False)
class RemoteResult:
    """What :func:`remote_bench` measured on one device."""

    outputs: dict[str, np.ndarray]
    """The outputs of the first run, copied back (the same arrays ``exe.run`` returns)."""
    times_ms: tuple[float, ...]
    """One time per timed run in milliseconds, measured on the device."""
    key: str
    tracker: str

    def percentiles(self) -> dict[str, float]:
        """``p50``, ``p90`` and ``p99`` of :attr:`times_ms`."""
        return {f"p{p}": float(np.percentile(self.times_ms, p)) for p in (50, 90, 99)}


def remote_bench(
    model: TvmExecutable | TvmArtifact | str | Path,
    tracker: str | tuple[str, int],
    key: str,
    inputs: Mapping[str, np.ndarray],
    *,
    repeat: int = 50,
    warmup: int = 5,
    timeout: float = DEFAULT_TIMEOUT,
    session_timeout: float = 0.0,
) -> RemoteResult:
    """Run ``model`` on a device with ``key`` from ``tracker`` and time it there.

    ``model`` is a compiled :class:`TvmExecutable` (exported to a temporary directory
    first), one loaded from an artifact, or an artifact's path (its checksum is verified
    before it is uploaded). ``inputs`` are checked as ``exe.run`` checks them. The first
    run gives the outputs; ``warmup`` more runs are untimed; then ``repeat`` runs are timed
    one by one by TVM's ``time_evaluator`` on the device. ``timeout`` bounds the wait for
    the tracker and for a free device; ``session_timeout`` (0: none) makes the server end
    the session after that many seconds. Every failure is a :class:`RemoteError`.
    """
    if repeat < 1 or warmup < 0:
        raise IntqError("repeat must be at least 1 and warmup at least 0")
    if not 0 < timeout <= MAX_TIMEOUT:  # inf overflows the socket's time_t
        raise IntqError(
            f"the RPC timeout must be positive and at most {MAX_TIMEOUT:g} s, got {timeout}"
        )
    host, port = parse_tracker(tracker) if isinstance(tracker, str) else tracker
    artifact = _artifact(model)
    feeds = check_inputs(artifact.inputs, inputs)
    session = _connect(host, port, key, timeout, session_timeout)
    problem: IntqError | None = None
    try:
        outputs, times = _measure(session, artifact, feeds, key, repeat, warmup)
    except Exception as err:  # TVM's RPC errors arrive as FFI exceptions of many types
        problem = _detached(err, key)
    # Freeing the last remote object closes the session, and the server goes back to the
    # tracker. VirtualMachine.get_outputs leaves the VM in a reference cycle (its recursive
    # inner function's closure holds the VM), so only the cycle collector frees it: without
    # the collect the device stays busy until some later one. The error raised below holds
    # no traceback into the frames that held remote objects, so a caller holding on to it
    # does not keep the device either.
    del session
    gc.collect()
    if problem is not None:
        raise problem
    return RemoteResult(outputs, tuple(times), key, f"{host}:{port}")


def _artifact(model: TvmExecutable | TvmArtifact | str | Path) -> TvmArtifact:
    if isinstance(model, TvmArtifact):
        return model
    if isinstance(model, str | Path):
        return read_tvm_artifact(model)
    if model.artifact is not None:  # loaded: the bytes it was loaded from, as checked
        return model.artifact
    # As save() would write it: a .so where this machine links, else object files for the
    # device to link. The bytes are read before the temporary directory goes.
    name = "model.so" if links_here(model.tvm_target) else "model.tar"
    with tempfile.TemporaryDirectory(prefix="intq-rpc-") as tmp:
        return read_tvm_artifact(model.save(Path(tmp) / name))


def request_server(host: str, port: int, key: str, timeout: float) -> tuple[str, int, str]:
    """Ask the tracker at ``host:port`` for a free server with ``key``; returns its address
    and the match key to connect with. Waits at most ``timeout`` seconds in all."""
    from tvm.rpc import base

    where = f"{host}:{port}"
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise RemoteError(
            f"no RPC tracker answers at {where}: {err.strerror or err}",
            hint=_START_TRACKER.format(port=port),
        ) from None
    servers: list[Any] | None = None
    with sock:
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
                raise RemoteError(
                    f"{where} is not a TVM RPC tracker", hint=_START_TRACKER.format(port=port)
                )
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            code, summary = base.recvjson(sock)
            servers = [s for s in summary["server_info"] if s.get("key") == f"server:{key}"]
            if not servers:
                keys = sorted(
                    {str(s.get("key", "")).partition(":")[2] for s in summary["server_info"]}
                )
                raise RemoteError(
                    f"the RPC tracker at {where} has no server with key {key!r}"
                    f" (its keys: {', '.join(keys) or 'none'})",
                    hint=_START_SERVER.format(tracker=where, key=key),
                )
            base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", 1])
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            code, (url, server_port, matchkey) = base.recvjson(sock)
        except TimeoutError:
            if servers is None:
                raise RemoteError(
                    f"the RPC tracker at {where} did not answer within {timeout:g} s",
                    hint="check that HOST:PORT is the tracker's (not a server's) address",
                ) from None
            raise RemoteError(
                f"no server with key {key!r} became free within {timeout:g} s"
                f" ({len(servers)} registered with the tracker at {where}, all busy)",
                hint="wait for the other sessions to end, or allow longer (--rpc-timeout)",
            ) from None
        except (OSError, ValueError, TypeError, KeyError, struct.error) as err:
            raise RemoteError(
                f"the RPC tracker at {where} broke off or answered nonsense: {err}",
                hint="check that HOST:PORT is a TVM RPC tracker of the same TVM version",
            ) from None
    if code != base.TrackerCode.SUCCESS:
        raise RemoteError(f"the RPC tracker at {where} refused the request for {key!r}")
    return str(url), int(server_port), str(matchkey)


def _connect(host: str, port: int, key: str, timeout: float, session_timeout: float) -> Any:
    from tvm import rpc

    url, server_port, matchkey = request_server(host, port, key, timeout)
    try:
        return rpc.connect(url, server_port, matchkey, session_timeout=session_timeout)
    except Exception as err:  # FFI errors
        raise RemoteError(
            f"cannot open a session with the server {url}:{server_port} (key {key!r}) that"
            f" the tracker at {host}:{port} gave: {_cause(err)}",
            hint="the device must be reachable from here on that port"
            " (rpc_server --host, or --custom-addr for the address it reports)",
        ) from None


def _measure(
    session: Any,
    artifact: TvmArtifact,
    feeds: Mapping[str, np.ndarray],
    key: str,
    repeat: int,
    warmup: int,
) -> tuple[dict[str, np.ndarray], list[float]]:
    tvm = _tvm()
    name = "model.tar" if artifact.needs_linker else "model.so"
    try:
        session.upload(bytearray(artifact.library), name)
    except Exception as err:
        raise RemoteError(
            f"uploading {artifact.path.name} to {key!r} failed: {_cause(err)}"
        ) from None
    try:
        module = session.load_module(name)
    except Exception as err:
        built_for = artifact.target.get("mtriple") or "x86-64"
        if artifact.needs_linker:
            hint = (
                "the device links a .tar's object files with its own C++ compiler: it needs"
                " g++ (or rpc_server started with CXX set), and objects compiled for its CPU"
                f" (these are for {built_for}; set --tvm-target)"
            )
        else:
            hint = (
                f"the library holds code for {built_for}; compile for the device"
                " (--tvm-target) and save a .tar, which the device links itself"
            )
        raise RemoteError(f"{key!r} cannot load the module: {_cause(err)}", hint=hint) from None
    kind = artifact.target.get("kind")
    if kind not in ("llvm", "cuda"):
        raise RemoteError(f"intq runs only llvm and cuda modules remotely, not {kind!r}")
    device = session.cuda(0) if kind == "cuda" else session.cpu(0)
    if not device.exist:
        raise RemoteError(
            f"the server with key {key!r} has no {kind} device",
            hint="use the key of a device with one (a GPU for a cuda module)",
        )
    try:
        vm = tvm.relax.VirtualMachine(module, device)
        vm.set_input(artifact.entry, *device_arguments(artifact.inputs, feeds, device))
        vm.invoke_stateful(artifact.entry)
        outputs = named_outputs(artifact.outputs, vm.get_outputs(artifact.entry))
        for _ in range(warmup):
            vm.invoke_stateful(artifact.entry)
        timer = vm.time_evaluator("invoke_stateful", device, number=1, repeat=repeat)
        times = [float(t) * 1e3 for t in timer(artifact.entry).results]
    except Exception as err:
        raise RemoteError(f"running the module on {key!r} failed: {_cause(err)}") from None
    return outputs, times


def _detached(err: Exception, key: str) -> IntqError:
    """``err`` again, without its traceback (which holds the frames' remote objects)."""
    if isinstance(err, IntqError):
        return type(err)(err.message, node=err.node, hint=err.hint)
    return RemoteError(f"the session with {key!r} failed: {_cause(err)}")


_NOISE = ("RPCError:", "Compilation error:", "Command line:", "collect2:")


def _cause(err: BaseException) -> str:
    """The line of a TVM error that says what went wrong: an RPC error wraps the device's
    error in a header, and a failed link ends with the linker's command line."""
    lines = [line.strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line and not line.startswith(_NOISE)]
    telling = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    return (telling or lines or [type(err).__name__])[-1]


__all__ = ["DEFAULT_TIMEOUT", "RemoteResult", "parse_tracker", "remote_bench", "request_server"]
