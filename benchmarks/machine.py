"""Facts about the machine a benchmark ran on, recorded in every result.

The memory-bandwidth probe matters: decoding one token reads every weight once, so decode speed on a
CPU is bounded by bandwidth, and a projection to another device needs this machine's figure.
"""

from __future__ import annotations

import os
import platform
import time
from functools import lru_cache

import numpy as np

INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "fma", "neon", "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16", "sme")


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and value.strip():
            model = value.strip()
        if key in ("flags", "features"):
            flags |= set(value.split())
    return {"model": model, "machine": platform.machine(), "flags": sorted(f for f in flags if f in INTERESTING_FLAGS), "logical_cores": os.cpu_count()}


def memory_gib() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        return None
    return None


@lru_cache(maxsize=1)
def memory_bandwidth_gbs(size_mb: int = 256, repeats: int = 5) -> float:
    """Best-of-N single-thread copy bandwidth (bytes read + written per second), in GB/s."""
    src = np.ones(size_mb * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return round(2 * src.nbytes / best / 1e9, 2)


def machine_facts(probe_bandwidth: bool = True) -> dict:
    facts = {"cpu": cpu_info(), "memory_gib": memory_gib(), "os": platform.platform(), "python": platform.python_version()}
    if probe_bandwidth:
        facts["memory_bandwidth_gbs"] = memory_bandwidth_gbs()
    return facts
