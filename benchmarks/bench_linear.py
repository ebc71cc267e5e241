"""Linear attention against exact causal SDPA on the CPU: speed ratios and peak memory.

    PYTHONPATH=. python3 benchmarks/bench_linear.py            # N=16384 timings + N=65536 memory
    PYTHONPATH=. python3 benchmarks/bench_linear.py --quick    # N=4096 / 16384, a smoke run

Targets (issue 4, B=1, H=8, D=64, float32, causal): ``linear`` (elu) at least 30× faster than
``F.scaled_dot_product_attention(is_causal=True)`` at N=16384; at N=65536 the extra peak
memory of one ``linear`` call at most 4× the size of its output.

Timings: every configuration runs in interleaved rounds within one process (so load from
elsewhere hits all of them), and the best and median times are printed; the ratio uses the
best of each. ``/proc/pressure/cpu`` (avg10) is printed before and after as a load gauge.
Memory is measured in a fresh subprocess that only builds the inputs and runs the one
call: a thread samples the resident set size (``/proc/self/statm``) every 0.5 ms, and the
figure reported is ``peak − RSS before the call`` (inputs already allocated). glibc may keep
freed blocks, so this overstates rather than understates the extra memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

import sparse_linear_attn as sla

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples RSS in a thread while the ``with`` block runs (torch ops release the GIL)."""

    def __enter__(self):
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def psi() -> str:
    """Linux CPU pressure (share of time some task waited for a CPU): load from elsewhere."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().split()[1]
    except OSError:
        return "n/a"


def inputs(n: int, heads: int, dim: int):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, heads, n, dim, generator=g) for _ in range(3))


def memory_child(n: int, heads: int, dim: int, variant_kw: dict) -> dict:
    q, k, v = inputs(n, heads, dim)
    with torch.no_grad():
        # Warm the allocator and thread pool on a short call so their one-time cost is not counted.
        sla.attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], "linear", causal=True, **variant_kw)
        with PeakRSS() as m:
            out = sla.attention(q, k, v, "linear", causal=True, **variant_kw)
    out_bytes = out.numel() * out.element_size()
    return {"n": n, "extra_peak_bytes": m.extra, "output_bytes": out_bytes, "ratio": m.extra / out_bytes}


def measure_memory(n: int, heads: int, dim: int, variant_kw: dict) -> dict:
    cmd = [sys.executable, __file__, "--_memory-child", json.dumps([n, heads, dim, variant_kw])]
    # The child imports this checkout's package, however the parent found it.
    root = os.path.dirname(os.path.abspath(sla.__file__ + "/.."))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384, help="sequence length of the timing comparison")
    ap.add_argument("--mem-n", type=int, default=65536, help="sequence length of the memory measurement")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--quick", action="store_true", help="N=4096 timings, N=16384 memory")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--_memory-child", dest="child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        n, heads, dim, kw = json.loads(args.child)
        print(json.dumps(memory_child(n, heads, dim, kw)))
        return 0
    if args.quick:
        args.n, args.mem_n = 4096, 16384
    if args.threads:
        torch.set_num_threads(args.threads)
    n, h, d = args.n, args.heads, args.dim
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(f"B=1 H={h} N={n} D={d} float32, {args.repeats} interleaved rounds; CPU pressure {psi()}")
    q, k, v = inputs(n, h, d)
    configs = [
        ("sdpa causal (exact)", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), 1),
        ("linear elu, chunk 64", lambda: sla.attention(q, k, v, "linear", causal=True), 3),
        ("linear relu", lambda: sla.attention(q, k, v, "linear", causal=True, feature_map="relu"), 3),
        (
            "performer favor M=64",
            lambda: sla.attention(q, k, v, "linear", causal=True, feature_map="favor", num_features=64),
            2,
        ),
        (
            "performer favor M=256",
            lambda: sla.attention(q, k, v, "linear", causal=True, feature_map="favor", num_features=256),
            1,
        ),
        ("linear elu non-causal", lambda: sla.attention(q, k, v, "linear", causal=False), 3),
    ]
    times: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    with torch.no_grad():
        for _, fn, _ in configs:
            fn()  # warm-up (thread pools, first touch of buffers)
        # Rounds interleave every configuration so that a burst of load from elsewhere on a
        # shared machine hits all of them, not one; short calls run a few times per round.
        for _ in range(args.repeats):
            for label, fn, per_round in configs:
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    fn()
                    times[label].append(time.perf_counter() - t0)
    t_sdpa = min(times["sdpa causal (exact)"])
    rows = [(label, min(ts), sorted(ts)[len(ts) // 2]) for label, ts in times.items()]
    print(f"{'':26} {'best ms':>9} {'median ms':>10} {'SDPA / this (best)':>19}")
    for label, t, med in rows:
        print(f"{label:26} {t * 1e3:9.1f} {med * 1e3:10.1f} {t_sdpa / t:18.1f}x")
    elu_ratio = t_sdpa / rows[1][1]
    print(
        f"TARGET linear(elu) causal >= 30x faster than SDPA causal at N={n}: {elu_ratio:.1f}x "
        f"-> {'MET' if elu_ratio >= 30 else 'NOT MET'}"
    )
    print(f"CPU pressure after timings: {psi()}")
    mem = measure_memory(args.mem_n, h, d, {})
    print(
        f"memory N={args.mem_n}: extra peak RSS {mem['extra_peak_bytes'] / 2**20:.0f} MiB, output "
        f"{mem['output_bytes'] / 2**20:.0f} MiB, ratio {mem['ratio']:.2f} "
        f"-> {'MET' if mem['ratio'] <= 4 else 'NOT MET'} (target <= 4x the output)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
