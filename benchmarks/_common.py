"""Helpers shared by the benchmark scripts: round-robin timing and what the machine was doing.

The scripts run as ``python3 benchmarks/<name>.py``, so this folder is on ``sys.path`` and they
import ``from _common import ...``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Minimum time (s) of each function, run round-robin so that load changes hit all alike;
    each runs once first (warm-up, and compilation for compiled ones)."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def proc_status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset ``VmHWM`` (peak RSS) to the current RSS and return that RSS in bytes: the peak
    read after a call, minus this, is the call's extra peak memory."""
    before = proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return before


def cpu_pressure() -> str:
    """The "some" line of ``/proc/pressure/cpu`` (share of time runnable tasks waited), or n/a."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().strip()
    except OSError:
        return "n/a"


def machine_load() -> str:
    """Load average and CPU pressure in one line, printed before and after a measurement."""
    some = cpu_pressure().split()[1] if cpu_pressure() != "n/a" else "n/a"
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, /proc/pressure/cpu some {some}"
