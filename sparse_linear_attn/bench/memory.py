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
from typing import Any

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


# ---------------------------------------------------------------------------------------------
# Predicting memory before allocating it. On a CPU the kernel's OOM killer ends the process
# instead of raising, so a point that would not fit must be refused before it runs.

MiB = 1 << 20


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text)


def _cgroup_headroom() -> int | None:
    """Bytes this process's memory cgroup (v2 or v1) still allows, or None without a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            limit = _read_int(f"/sys/fs/cgroup{path}/memory.max")
            used = _read_int(f"/sys/fs/cgroup{path}/memory.current")
        elif "memory" in controllers.split(","):
            limit = _read_int(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
            used = _read_int(f"/sys/fs/cgroup/memory{path}/memory.usage_in_bytes")
        else:
            continue
        if limit is not None and used is not None and limit < 1 << 60:
            room = max(0, limit - used)
            best = room if best is None else min(best, room)
    return best


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can take: free CUDA memory, or on the CPU the smaller of the
    kernel's ``MemAvailable`` and what the process's memory cgroup still allows."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            import psutil

            avail = psutil.virtual_memory().available
        except ImportError:
            avail = 8 << 30
    room = _cgroup_headroom()
    return avail if room is None else min(avail, room)


def _feature_dim(name: str, params: dict[str, Any], head_dim: int) -> int:
    fmap = "favor" if name == "performer" else str(params.get("feature_map", "elu"))
    if fmap == "favor":
        return int(params.get("num_features", 256))
    if fmap == "taylor":
        return 1 + head_dim + head_dim * head_dim
    return head_dim


def predict_call_bytes(
    name: str,
    params: dict[str, Any],
    backend: str,
    *,
    batch: int,
    heads: int,
    n: int,
    head_dim: int,
    elem: int,
    backward: bool,
    device_type: str = "cpu",
) -> tuple[int, str]:
    """An upper estimate of the memory one call of a variant takes beyond its inputs, and which
    model gave it. ``elem``: bytes per element of the inputs' dtype.

    The models, per variant and backend (B·H·N·D = ``t``, work dtype ≥ float32):

    * ``math`` (any variant): the dense scores, probabilities and mask, ``3·B·H·N²`` work
      elements (twice that with backward);
    * ``full``/``dot_product`` on ``torch`` (fused SDPA) and ``xformers``: output and row
      statistics, ``2·t``, plus the kernel's per-thread blocks;
    * ``sliding_window``/``block_sparse`` on ``torch``: output plus the bounded groups of
      gathered key/value tiles and score tiles (their ``GROUP_ELEMENTS`` budgets);
    * ``linear``/``performer`` on ``torch``: the query and key features ``2·B·H·N·M`` and
      ``[v, 1]`` in the work dtype, plus the output;
    * ``flex``: output plus the block mask and the compiled kernel's buffers;
    * ``additive``: output plus its bounded ``(chunk, N, hidden)`` tanh tensor;
    * anything else (user variants): the output only (said so in ``how``) — a user variant
      that allocates O(N²) is not predicted.

    With ``backward`` the gradients of q, k, v (``3·t``) and the saved activations (the
    forward's working set again) are added. Constant terms cover small-N overheads; the terms
    in N are what keep a long sweep from being killed.
    """
    B, H, N, D = batch, heads, n, head_dim
    work = max(elem, 4)
    t = B * H * N * D
    out = t * elem
    if backend == "math":
        fwd, how = out + 3 * B * H * N * N * work + 16 * MiB, "math: dense N×N scores, probabilities and mask"
    elif name in ("full", "dot_product") and backend in ("torch", "xformers"):
        fwd, how = 2 * out + t * work // D + 16 * MiB, "fused kernel: output and row statistics"
    elif name in ("sliding_window", "block_sparse") and backend == "torch":
        fwd, how = 3 * out + 64 * MiB, "tiled: output, bounded tile groups"
    elif name in ("linear", "performer") and backend == "torch":
        m = _feature_dim(name, params, D)
        fwd = out + B * H * N * (2 * m + 2 * (D + 1)) * work + 64 * MiB
        how = f"kernelized: features 2·N·M (M={m}) and [v, 1]"
    elif backend == "flex":
        blocks = -(-N // 128)
        fwd, how = 3 * out + 2 * B * H * blocks * blocks * 4 + 256 * MiB, "flex: output, block mask, compiled buffers"
    elif name == "additive":
        fwd, how = 2 * out + (1 << 22) * work * 3 + 64 * MiB, "additive: output, bounded tanh chunk"
    else:
        fwd, how = 2 * out + 64 * MiB, "no memory model for this variant: output only"
    if backward:
        return 2 * fwd + 3 * t * elem, how + "; backward: saved activations and gradients"
    return fwd, how
