"""Remote measurement through a real TVM RPC tracker and server, started here on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import intq
from intq.backends.tvm_rpc import remote_bench
from intq.cli import main
from intq.ir import DType, Graph, TensorType

KEY = "intq-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the server forks per session
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _registered(port: int) -> bool:
    from tvm import rpc

    # connect_tracker retries a refused connection for a minute: _wait checked it listens.
    summary = rpc.connect_tracker("127.0.0.1", port).summary()
    return any(s["key"] == f"server:{KEY}" for s in summary["server_info"])


def _wait(procs: list[subprocess.Popen[bytes]], logs: Path, ready: Callable[[], bool]) -> None:
    """Poll ``ready`` for up to a minute; fail with the processes' logs if one exits."""
    deadline = time.monotonic() + 60
    while not ready():
        exited = [p.args for p in procs if p.poll() is not None]
        if exited or time.monotonic() > deadline:
            text = "\n".join(f"--- {f.name}\n{f.read_text()}" for f in logs.glob("*.log"))
            pytest.fail(f"the RPC tracker or server did not start (exited: {exited})\n{text}")
        time.sleep(0.1)


def small_cnn() -> tuple[Graph, Any, dict[str, np.ndarray]]:
    """A quantized residual CNN with two outputs (logits and pooled features), compiled."""
    rng = np.random.default_rng(0)
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (1, 4, 8, 8)))
    w1 = g.add_constant(rng.normal(size=(4, 4, 3, 3)).astype(np.float32) * 0.2, "w1")
    w2 = g.add_constant(rng.normal(size=(4, 4, 3, 3)).astype(np.float32) * 0.2, "w2")
    fc = g.add_constant(rng.normal(size=(4, 10)).astype(np.float32), "fc")
    a = g.op("Relu", g.op("Conv", x, w1, name="conv1", pads=(1, 1, 1, 1)), name="relu1")
    b = g.op("Conv", a, w2, name="conv2", pads=(1, 1, 1, 1))
    y = g.op("Relu", g.op("Add", b, x, name="add"), name="relu2")
    pooled = g.op("Flatten", g.op("GlobalAveragePool", y, name="pool"), name="flat")
    g.set_outputs([g.op("Gemm", pooled, fc, name="fc"), pooled])
    batches = [{"x": rng.normal(size=(1, 4, 8, 8)).astype(np.float32)} for _ in range(8)]
    quantized = intq.quantize(g, batches)
    return quantized, intq.compile(quantized, target="tvm"), batches[0]


@dataclass(frozen=True)
class Remote:
    """A running tracker with one server registered under :data:`KEY`, and a model."""

    address: str
    port: int
    graph: Graph
    exe: Any
    feeds: dict[str, np.ndarray]


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    """Starts ``tvm.exec.rpc_tracker`` and ``tvm.exec.rpc_server`` on loopback (compiling the
    model while the tracker starts), waits until the server has registered, and stops both
    process groups at the end, whatever happened."""
    logs = tmp_path_factory.mktemp("rpc")
    port, server_port = free_port(), free_port()
    procs = []
    try:
        tracker_args = ["--host=127.0.0.1", f"--port={port}", f"--port-end={port + 1}"]
        procs.append(_start(["tvm.exec.rpc_tracker", *tracker_args], logs / "tracker.log"))
        graph, exe, feeds = small_cnn()
        # A server that finds no tracker yet retries only every 5 s: start it once the
        # tracker listens.
        _wait(procs, logs, lambda: _listening(port))
        server_args = [
            f"--tracker=127.0.0.1:{port}",
            f"--key={KEY}",
            "--host=127.0.0.1",
            f"--port={server_port}",
            f"--port-end={server_port + 1}",
        ]
        procs.append(_start(["tvm.exec.rpc_server", *server_args], logs / "server.log"))
        _wait(procs, logs, lambda: _registered(port))
        yield Remote(f"127.0.0.1:{port}", port, graph, exe, feeds)
    finally:
        for proc in reversed(procs):
            _stop(proc)


def test_remote_outputs_are_bit_exact_and_times_ordered(remote):
    exe, feeds = remote.exe, remote.feeds
    result = remote_bench(exe, remote.address, KEY, feeds, repeat=30, warmup=2, timeout=20)
    want = exe.run(feeds)
    assert list(result.outputs) == list(want) and len(want) == 2
    for name, array in want.items():
        got = result.outputs[name]
        assert got.dtype == array.dtype and got.shape == array.shape, name
        np.testing.assert_array_equal(got, array, err_msg=name)
    assert len(result.times_ms) == 30 and min(result.times_ms) > 0
    p = result.percentiles()
    assert 0 < p["p50"] <= p["p90"] <= p["p99"]


def test_saved_so_and_a_tar_the_device_links(remote, tmp_path):
    """A .so artifact by path; a .tar of object files, which the device links (as it would a
    cross target's) with its own compiler."""
    exe, feeds = remote.exe, remote.feeds
    want = exe.run(feeds)
    for name in ("model.so", "model.tar"):
        path = exe.save(tmp_path / name)
        result = remote_bench(path, remote.address, KEY, feeds, repeat=3, warmup=0, timeout=20)
        for output, array in want.items():
            np.testing.assert_array_equal(result.outputs[output], array, err_msg=name)
    loaded = intq.load(tmp_path / "model.so")  # TVM cannot re-export it: its file is sent
    result = remote_bench(loaded, remote.address, KEY, feeds, repeat=3, timeout=20)
    for output, array in want.items():
        np.testing.assert_array_equal(result.outputs[output], array, err_msg=output)


def test_cli_bench_over_rpc(remote, tmp_path, capsys):
    path = remote.exe.save(tmp_path / "model.so")
    rpc = ["--rpc-tracker", remote.address, "--rpc-key", KEY, "--rpc-timeout", "20"]
    assert main(["bench", str(path), *rpc, "--repeat", "10", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "timed on the device" in out and f"(tvm, remote {KEY})" in out
    row = next(line for line in out.splitlines() if "remote" in line and "model.so" in line)
    p50, p90, p99 = (float(v) for v in row.split()[-3:])
    assert 0 < p50 <= p90 <= p99

    onnx = intq.compile(remote.graph, target="onnxruntime").save(tmp_path / "model.onnx")
    assert main(["bench", str(onnx), *rpc]) == 1
    assert "runs TVM artifacts only" in capsys.readouterr().err
    assert main(["bench", str(path), "--rpc-tracker", remote.address]) == 1
    assert "go together" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["bench", str(path), "--rpc-tracker", "no-port", "--rpc-key", KEY])
    assert usage.value.code == 2


def test_unknown_key_dead_tracker_and_busy_device_fail_fast(remote, tmp_path, capsys):
    exe, feeds = remote.exe, remote.feeds
    start = time.monotonic()
    with pytest.raises(intq.RemoteError, match="no server with key 'nobody'") as err:
        remote_bench(exe, remote.address, "nobody", feeds, timeout=2)
    assert f"rpc_server --tracker {remote.address} --key nobody" in (err.value.hint or "")
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(intq.RemoteError, match="no RPC tracker answers") as err:
        remote_bench(exe, dead, KEY, feeds, timeout=2)
    assert "tvm.exec.rpc_tracker" in (err.value.hint or "")
    path = exe.save(tmp_path / "model.so")
    assert main(["bench", str(path), "--rpc-tracker", dead, "--rpc-key", KEY]) == 1
    assert capsys.readouterr().err.startswith("intq: error: no RPC tracker answers")
    # Well under the timeouts' sum (2 + 2 + the CLI's 10 s): nothing waited for its
    # timeout where the answer was already known. Loose enough for a busy 2-core CI machine.
    assert time.monotonic() - start < 12

    from tvm import rpc

    held = rpc.connect_tracker("127.0.0.1", remote.port).request(KEY)  # the only server
    with pytest.raises(intq.RemoteError, match="became free within 1 s"):
        remote_bench(exe, remote.address, KEY, feeds, timeout=1)
    del held  # the server returns to the tracker for the tests after this one


def test_a_module_the_device_cannot_link_is_a_remote_error(remote):
    """An AArch64 .tar on this x86-64 server: the device's linker refuses it, and the error
    says that the device links the objects itself."""
    from intq.backends.tvm import compile_tvm

    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": "+neon"}
    exe = compile_tvm(remote.graph, tvm_target=arm)
    with pytest.raises(intq.RemoteError, match=f"{KEY!r} cannot load the module") as err:
        remote_bench(exe, remote.address, KEY, remote.feeds, timeout=20)
    assert "Command line" not in err.value.message  # the linker's complaint, not its command
    assert "C++ compiler" in (err.value.hint or "") and "aarch64" in (err.value.hint or "")
    # The failed session was closed: the server is free again at once.
    assert remote_bench(remote.exe, remote.address, KEY, remote.feeds, repeat=2, timeout=5)
