"""How many threads TVM's pool gives a run: all it has while the cores are free, fewer while
other processes keep them busy.

TVM splits each parallel loop into one equal chunk per pool thread and waits for every chunk
before the next loop starts. A model is a few dozen such loops per run, so when another process
holds one of two cores, each loop waits for the thread that is off its core, and two threads
ran EfficientNet-Lite0 many times slower than one (``benchmarks/tvm_threads.py``). One thread
never waits for another.

:class:`ThreadPolicy` measures, every :data:`WINDOW_S` at most, how much of the CPUs this
process may use was busy with *other* work over the last window: ``/proc/stat``'s busy time
on those CPUs minus this process's own CPU time. It then gives TVM's pool the cores that were
left free, at least one and at most the pool's size at start (``TVM_NUM_THREADS``, else TVM's
own default). It reads what a container's cpuset allows, not the whole host. Where there is
no ``/proc/stat`` the pool keeps its size.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

WINDOW_S: Final = 0.2
"""The shortest window the policy measures over (``/proc/stat`` counts in 10 ms ticks)."""

_STAT = Path("/proc/stat")
_IDLE_FIELDS = (3, 4)  # idle, iowait: the CPU was free for anyone


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def busy_seconds(cpus: Sequence[int], text: str) -> float | None:
    """The busy (not idle) time of ``cpus`` in ``text``, a ``/proc/stat``, in seconds."""
    wanted, busy, seen = {f"cpu{c}" for c in cpus}, 0, 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name in wanted:
            ticks = [int(t) for t in rest.split()[:8]]
            busy += sum(ticks) - sum(ticks[i] for i in _IDLE_FIELDS)
            seen += 1
    if seen != len(wanted):
        return None
    return busy / os.sysconf("SC_CLK_TCK")


class ThreadPolicy:
    """Resizes TVM's thread pool before a run to the cores other work left free
    (``adaptive = False`` keeps the pool at its size)."""

    def __init__(self, tvm: Any) -> None:
        self.adaptive = True
        self.most = int(tvm.runtime.num_threads())
        self.threads = self.most
        self.cpus = allowed_cpus()
        self._configure = tvm.get_global_func("runtime.config_threadpool")
        self._last: tuple[float, float, float] | None = None

    def sample(self) -> tuple[float, float, float] | None:
        """``(wall, busy seconds of our CPUs, our own CPU seconds)`` now, if measurable."""
        try:
            busy = busy_seconds(self.cpus, _STAT.read_text())
        except OSError:
            return None
        return None if busy is None else (time.monotonic(), busy, time.process_time())

    def before_run(self) -> int:
        """Adjust the pool if a window has passed; returns the threads the run will use."""
        if self.most <= 1 or not self.adaptive:
            return self.threads
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < WINDOW_S:
            return self.threads
        current = self.sample()
        if current is None:
            return self.threads
        if self._last is not None:
            wall = current[0] - self._last[0]
            others = (current[1] - self._last[1]) - (current[2] - self._last[2])
            free = len(self.cpus) - max(others, 0.0) / wall
            self.resize(max(1, min(self.most, int(free + 0.5))))
        self._last = current
        return self.threads

    def resize(self, threads: int) -> None:
        """Give the pool ``threads`` threads (TVM restarts its workers: ~0.1 ms)."""
        if threads != self.threads:
            self._configure(1, threads)  # 1: TVM's default affinity mode (its "big" cores)
            self.threads = threads


_POLICY: ThreadPolicy | None = None


def policy(tvm: Any) -> ThreadPolicy:
    """The process's policy: TVM has one thread pool per process."""
    global _POLICY
    if _POLICY is None:
        _POLICY = ThreadPolicy(tvm)
    return _POLICY
