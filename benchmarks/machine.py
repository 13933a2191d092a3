"""What every benchmark reports about the machine it ran on (imported by the scripts here)."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path


def cpu_description() -> str:
    """CPU model, core count and whether it has the VNNI dot-product instructions that ONNX
    Runtime's int8 kernels want."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    if not flags:
        return model
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {os.cpu_count()} cores, {simd}, " + (
        f"VNNI ({', '.join(vnni)})" if vnni else "no VNNI"
    )


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none): other work skews timings."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")
