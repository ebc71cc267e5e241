"""Peak memory of one call.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
  allocated before the call (so inputs do not count; the output does).
* CPU: the process's resident set size sampled every ``interval`` seconds by a thread during
  the call (plus once right after it, while the output is alive), minus the RSS just before.
  glibc keeps freed blocks in its heap and raises its mmap threshold dynamically, which would
  hide a call's allocations inside memory freed by an earlier one. So, on glibc and for the
  measured call only, the heap is trimmed (``malloc_trim(0)``) and ``M_MMAP_THRESHOLD`` /
  ``M_TRIM_THRESHOLD`` are set to 128 KiB, which makes every buffer above that its own mapping,
  counted when touched; afterwards they are set to 32 / 64 MiB, the values glibc's dynamic
  threshold reaches in a loop of large allocations, so the *timed* calls run with the allocator
  behaviour a long-running process has. A sampled peak can miss a spike shorter than the
  interval: treat small values as lower bounds.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from contextlib import contextmanager
from functools import lru_cache

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def set_malloc_thresholds(mmap_threshold: int, trim_threshold: int, *, trim: bool = False) -> bool:
    """Set glibc's mmap and trim thresholds (optionally trimming the heap first). True if done."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    try:
        if trim:
            libc.malloc_trim(0)
        ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
        ok &= libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
        return bool(ok)
    except (AttributeError, OSError):
        return False


def timing_malloc_thresholds() -> bool:
    """The steady state of glibc's dynamic thresholds in a loop of large allocations."""
    return set_malloc_thresholds(32 << 20, 64 << 20)


def rss_bytes() -> int:
    """Current resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import psutil  # macOS / Windows

        return psutil.Process().memory_info().rss


class _Sampler(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = rss_bytes()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self.peak = max(self.peak, rss_bytes())
        self._halt.set()
        self.join()
        return self.peak


class PeakMemory:
    """Result holder of :func:`measure_peak`: ``bytes`` (peak minus baseline) and ``method``."""

    bytes: int | None = None
    method: str = ""


@contextmanager
def measure_peak(device: torch.device, interval: float = 0.0005):
    """``with measure_peak(dev) as m: out = f()`` -> ``m.bytes`` extra bytes at the peak."""
    m = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield m
        torch.cuda.synchronize(device)
        m.bytes = torch.cuda.max_memory_allocated(device) - base
        m.method = "cuda max_memory_allocated"
        return
    pinned = set_malloc_thresholds(128 << 10, 128 << 10, trim=True)
    base = rss_bytes()
    sampler = _Sampler(interval)
    sampler.start()
    try:
        yield m
    finally:
        peak = sampler.stop()
        if pinned:
            timing_malloc_thresholds()
    m.bytes = max(0, peak - base)
    m.method = f"sampled RSS every {interval * 1e3:g} ms" + ("" if pinned else " (malloc thresholds not pinned)")
