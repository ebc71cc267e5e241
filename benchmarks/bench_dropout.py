"""What attention dropout costs on the CPU training paths, as ratios measured in one run.

    PYTHONPATH=. python3 benchmarks/bench_dropout.py --threads 1  # a few minutes on 2 busy cores
    PYTHONPATH=. python3 benchmarks/bench_dropout.py --memory-only

Prints, for B=1, H=4, N=4096, D=64, float32, causal, one training step (forward + backward of
``out.sum()``), the minimum of ``--repeats`` round-robin runs:

* ``sliding_window`` (window 256) and ``block_sparse`` (bigbird, block 64) with ``dropout_p`` 0
  and 0.1, and their ratio;
* ``full`` with ``dropout_p=0.1`` on the library's query tiles against SDPA's own dropout (which
  on CPU computes through the N×N weights) and against SDPA without dropout.

Then, in fresh subprocesses, the peak RSS of one ``full`` training step with dropout at
``--memory-n`` (default 8192): SDPA's dropout against the tiled path (peak RSS ``VmHWM`` reset
through ``/proc/self/clear_refs`` just before the step, minus RSS before it).

Timings on a shared machine are noisy; the ratios are what to read. ``/proc/pressure/cpu`` is
printed before and after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from _common import (  # benchmarks/_common.py (this folder is on sys.path)
    best_times,
    cpu_pressure,
    proc_status_bytes,
    reset_peak_rss,
)

import sparse_linear_attn as sla


def step(fn, q, k, v):
    def run():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).sum().backward()

    return run


def memory_child(n: int, which: str) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 64, requires_grad=True) for _ in range(3))
    small = [t[:, :, :256].detach().requires_grad_() for t in (q, k, v)]
    sla.attention(*small, causal=True, dropout_p=0.1).sum().backward()  # load kernels
    F.scaled_dot_product_attention(*small, is_causal=True, dropout_p=0.1).sum().backward()
    before = reset_peak_rss()
    if which == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1)
    else:
        out = sla.attention(q, k, v, "full", causal=True, dropout_p=0.1)
    out.sum().backward()
    extra = proc_status_bytes("VmHWM") - before
    print(f"{which}: extra peak RSS {extra / 2**20:.0f} MiB (one head's N×N float32: {n * n * 4 / 2**20:.0f} MiB)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--memory-n", type=int, default=8192)
    ap.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_n, args.memory_child)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print(f"cpu pressure before: {cpu_pressure()}")
    if not args.memory_only:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 4, args.n, 64, requires_grad=True) for _ in range(3))
        print(f"B=1 H=4 N={args.n} D=64 float32 causal, forward+backward; min of {args.repeats} round-robin runs")
        for name, params in (
            ("sliding_window", {"window": 256}),
            ("block_sparse", {"pattern": "bigbird", "block_size": 64}),
        ):
            fns = {
                p: step(
                    lambda q, k, v, p=p, name=name, params=params: sla.attention(
                        q, k, v, name, causal=True, dropout_p=p, **params
                    ),
                    q,
                    k,
                    v,
                )
                for p in (0.0, 0.1)
            }
            t = best_times(fns, args.repeats)
            print(
                f"  {name:15} no dropout {t[0.0] * 1e3:8.1f} ms   dropout 0.1 {t[0.1] * 1e3:8.1f} ms   "
                f"ratio {t[0.1] / t[0.0]:.2f}x"
            )
        fns = {
            "tiles": step(lambda q, k, v: sla.attention(q, k, v, causal=True, dropout_p=0.1), q, k, v),
            "sdpa_dropout": step(
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1), q, k, v
            ),
            "sdpa": step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v),
        }
        t = best_times(fns, args.repeats)
        print(
            f"  full            dropout 0.1 tiles {t['tiles'] * 1e3:8.1f} ms   SDPA dropout 0.1 "
            f"{t['sdpa_dropout'] * 1e3:8.1f} ms   SDPA no dropout {t['sdpa'] * 1e3:8.1f} ms   "
            f"tiles/SDPA-dropout {t['tiles'] / t['sdpa_dropout']:.2f}x"
        )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    for which in ("sdpa", "tiles"):
        cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", which, "--memory-n", str(args.memory_n)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print(f"  memory N={args.memory_n}, full train step, " + (res.stdout.strip() or res.stderr.strip()[-2000:]))
    print(f"cpu pressure after: {cpu_pressure()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
