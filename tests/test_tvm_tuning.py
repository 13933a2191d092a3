"""MetaSchedule tuning of the TVM backend: bit-exact, kept in a database, reused without tuning.

The tuning test measures real candidates on this machine (~50 s on 2 cores: MetaSchedule's
builder and runner start fresh worker processes for every batch); the others are fast.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from int_graphs import full_range, int_input, requantized, weight

import intq
from intq.backends.tvm import TvmExecutable, compile_tvm
from intq.ir import Graph, verify

RECORDS = "database_tuning_record.json"


def depthwise_and_clip() -> Graph:
    """A 3x3 stride-2 depthwise ``QConv`` (requantized in the same kernel) and a ``Clip``:
    one kernel tuning handles and one it leaves to the hand schedules."""
    rng = np.random.default_rng(0)
    g = Graph()
    x = int_input(g, "x", (1, 8, 12, 12), True)
    w = weight(g, full_range(rng, (8, 1, 3, 3), True).clip(-127), rng.uniform(0.001, 0.1, 8), 0)
    acc = g.op("QConv", x, w, group=8, strides=(2, 2), pads=(1,) * 4, name="/dw")
    y = requantized(g, acc, 3.0, True)
    g.set_outputs([g.op("Clip", y, min=-50.0, max=60.0)])
    verify(g)
    return g


def assert_bit_exact(graph: Graph, exe: TvmExecutable) -> None:
    rng = np.random.default_rng(1)
    for _ in range(3):
        feeds = {"x": full_range(rng, (1, 8, 12, 12), True)}
        want = intq.compile(graph, target="reference").run(feeds)
        got = exe.run(feeds)
        for name, array in want.items():
            np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_tuned_kernels_are_bit_exact_and_their_records_are_reused(tmp_path):
    graph = depthwise_and_clip()
    db = tmp_path / "tuning"
    exe = compile_tvm(graph, tune_trials=3, tuning_db=db, progress=False)
    assert_bit_exact(graph, exe)
    kinds = sorted(exe.schedules.values())
    # The depthwise kernel tuned; the Clip and the NHWC layout changes hand-scheduled.
    assert kinds.count(("depthwise", "tuned")) == 1
    assert all(applied == kind for kind, applied in kinds if kind != "depthwise")
    # The hand schedule's record plus up to 3 tuned candidates, each with its time.
    lines = (db / RECORDS).read_text().splitlines()
    assert 2 <= len(lines) <= 4
    assert all(json.loads(line)[1][1] for line in lines)
    assert (db / "database_workload.json").read_text().strip()

    # Later compiles apply the records and measure nothing, whether or not they may tune.
    for trials in (0, 3):
        again = compile_tvm(graph, tune_trials=trials, tuning_db=db, progress=False)
        assert sorted(again.schedules.values()) == kinds
        assert (db / RECORDS).read_text().splitlines() == lines
        assert again.compile_seconds < 30
    assert_bit_exact(graph, again)


def test_tuning_option_errors(tmp_path):
    graph = depthwise_and_clip()
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(intq.IntqError, match="is a file, not a directory") as err:
        compile_tvm(graph, tune_trials=2, tuning_db=a_file)
    assert "directory" in (err.value.hint or "")
    with pytest.raises(intq.IntqError, match="cannot create the tuning database"):
        compile_tvm(graph, tune_trials=2, tuning_db=a_file / "db")
    with pytest.raises(intq.IntqError, match="no tuning database") as err:
        compile_tvm(graph, tuning_db=tmp_path / "missing")
    assert "--tune-trials" in (err.value.hint or "")
    with pytest.raises(intq.IntqError, match="needs a database directory"):
        compile_tvm(graph, tune_trials=2)
    with pytest.raises(intq.IntqError, match="measures every candidate on this machine"):
        compile_tvm(
            graph,
            tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu"},
            tune_trials=2,
            tuning_db=tmp_path / "arm",
        )
    with pytest.raises(intq.IntqError, match="scheduled llvm targets"):
        compile_tvm(graph, schedule=False, tuning_db=tmp_path / "db")


def test_compile_command_rejects_tuning_flags_for_other_targets(digits_model, tmp_path, capsys):
    from examples import zoo
    from intq.cli import main

    calib = tmp_path / "calib.npz"
    np.savez(calib, input=zoo._digits_split()[0][:16])
    out = str(tmp_path / "m.onnx")  # the default target's suffix
    argv = ["compile", str(digits_model.path), "--calib", str(calib), "-o", out]
    assert main([*argv, "--tune-trials", "4", "--tuning-db", str(tmp_path / "db")]) == 1
    assert "apply to --target tvm only" in capsys.readouterr().err
