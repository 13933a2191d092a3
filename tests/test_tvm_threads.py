"""TVM's thread pool shrinks while other work holds the cores (intq.backends.tvm_threads).

The policy reads ``/proc/stat``: the first test checks how it reads it, the second runs a real
TVM module in a process of its own (the pool's size is fixed when TVM starts it) on two CPUs,
one of them taken by a spinning competitor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from intq.backends.tvm_threads import busy_seconds

_STAT = """cpu  900 0 300 5000 100 0 0 0 0 0
cpu0 400 0 100 2500 50 0 0 20 0 0
cpu1 500 0 200 2500 50 0 0 0 0 0
intr 12345
ctxt 999
"""


def test_busy_time_counts_every_field_but_idle_and_iowait() -> None:
    tick = os.sysconf("SC_CLK_TCK")
    assert busy_seconds([0], _STAT) == pytest.approx(520 / tick)  # user, system and steal
    assert busy_seconds([0, 1], _STAT) == pytest.approx(1220 / tick)
    assert busy_seconds([0, 7], _STAT) is None  # a CPU the file does not list: no estimate


_CHILD = """
import json, os, sys, time
import numpy as np
import intq
from intq.backends import tvm_runtime, tvm_threads
from onnx_models import conv_node, f32, make_model, quantized

rng = np.random.default_rng(0)
c1, w1 = conv_node("c1", "x", 3, 16, rng)
c2, w2 = conv_node("c2", "c1", 16, 16, rng)
model = make_model([c1, c2], [f32("x", [1, 3, 64, 64])], [f32("c2", [1, 16, 64, 64])], w1 + w2)
graph, feeds = quantized(model, (1, 3, 64, 64))
exe = intq.compile(graph, target="tvm")
x = feeds[0]
policy = tvm_threads.policy(tvm_runtime._tvm())
first = exe.run(x)
end = time.monotonic() + 3 * tvm_threads.WINDOW_S + 1.0
while time.monotonic() < end:
    out = exe.run(x)
    assert all(np.array_equal(first[k], out[k]) for k in first)
after = sorted(os.sched_getaffinity(0))  # TVM must not have pinned the caller
result = {"most": policy.most, "last": policy.threads, "cpus": policy.cpus, "after": after}
print(json.dumps(result))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="the policy reads /proc/stat")
def test_a_busy_core_leaves_the_pool_one_thread() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    pair = set(cpus[:2])
    root = Path(__file__).resolve().parents[1]
    paths = os.pathsep.join([str(root), str(root / "tests")])
    env = {**os.environ, "TVM_NUM_THREADS": "2", "PYTHONPATH": paths}
    spin = f"import os; os.sched_setaffinity(0, {{{cpus[0]}}})\nwhile True: pass"
    competitor = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)
        child = subprocess.run(
            [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {pair})\n" + _CHILD],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        competitor.kill()
        competitor.wait()
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["most"] == 2
    assert result["cpus"] == result["after"] == sorted(pair)
    assert result["last"] == 1, result  # the competitor holds one of the two CPUs
