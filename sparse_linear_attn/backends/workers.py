"""Independent CPU tasks run on single-threaded workers: coarse-grained parallelism for tiled kernels.

A tiled kernel (``block_sparse``'s groups of gathered tiles) issues a few small aten ops per
group: a gather, ``baddbmm``, softmax, ``bmm``. Under torch's intra-op threads every one of them
opens and joins its own parallel region, and each join waits for the slowest thread; on a busy
machine a descheduled thread stalls every op, and even on a quiet one the small ops scale far
below the thread count. Handing whole groups to separate threads, each running its ops on one
intra-op thread, makes the call one fork and one join (docs/adaptive.md has the figures).

:func:`run_tasks` runs ``task(i, state)`` for ``i`` in ``0 … n−1`` on ``workers`` threads of a
process-wide pool whose threads run torch with one intra-op thread each. Tasks are handed out in
order, one at a time, so a worker slowed by other load takes fewer. ``state`` is one object per
worker (its scratch buffers), made on the worker by ``make_state``. Tasks must write disjoint
memory. The results are the same whatever the number of workers: each task is computed alone.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

S = TypeVar("S")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0
_local = threading.local()


def _init_worker(ready: threading.Barrier) -> None:
    # One intra-op thread here; get_num_threads also settles this thread's lazy thread
    # setup, which reads the process-wide count that the caller restores after the barrier.
    torch.set_num_threads(1)
    torch.get_num_threads()
    _local.worker = True
    ready.wait()


def _get_pool(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size, _pool_pid
    with _lock:
        if _pool is not None and _pool_size >= size and _pool_pid == os.getpid():
            return _pool
        # A smaller pool is left to idle, not shut down: a call on another thread may still be
        # handing it tasks. After a fork the parent's threads are gone: a new pool is started.
        # torch.set_num_threads also stores the count new threads start with: the caller's
        # count is put back once every worker has set its own.
        caller = torch.get_num_threads()
        ready = threading.Barrier(size + 1)
        pool = ThreadPoolExecutor(size, thread_name_prefix="sla-worker", initializer=_init_worker, initargs=(ready,))
        # A pool starts its threads as tasks arrive: one blocking task per thread starts them all.
        for _ in range(size):
            pool.submit(lambda: None)
        ready.wait()
        torch.set_num_threads(caller)
        _pool, _pool_size, _pool_pid = pool, size, os.getpid()
        return pool


# Above this many intra-op threads a call keeps torch's own parallelism: every worker holds the
# GIL for each op's dispatch, so many workers would queue on it, and only 1-2 threads were
# measured (docs/adaptive.md).
MAX_WORKERS = 8


def default_workers() -> int:
    """Workers for a call from this thread: torch's intra-op thread count, or 1 (run inline on
    torch's threads) inside a worker or above :data:`MAX_WORKERS` threads."""
    if getattr(_local, "worker", False):
        return 1
    n = torch.get_num_threads()
    return n if n <= MAX_WORKERS else 1


def run_tasks(task: Callable[[int, S], Any], n: int, make_state: Callable[[], S], workers: int | None = None) -> None:
    """Run ``task(i, state)`` for every ``i < n``; ``workers`` threads (default
    :func:`default_workers`), or inline in the caller when that is 1 or there is one task.
    An exception in a task is raised here after the others have stopped taking tasks."""
    workers = min(default_workers() if workers is None else workers, n)
    if workers <= 1:
        state = make_state()
        for i in range(n):
            task(i, state)
        return
    pool = _get_pool(workers)
    counter = itertools.count()  # next() on it is atomic under the GIL
    failed = threading.Event()

    def worker() -> None:
        state = make_state()
        while not failed.is_set():
            i = next(counter)
            if i >= n:
                return
            try:
                task(i, state)
            except BaseException:
                failed.set()
                raise

    futures = [pool.submit(worker) for _ in range(workers)]
    for f in futures:
        f.result()
