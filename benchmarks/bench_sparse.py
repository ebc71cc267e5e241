"""Issue 3's CPU targets for exact sparse attention, as ratios measured in one run.

    PYTHONPATH=. python3 benchmarks/bench_sparse.py             # everything (~2-3 min on 2 cores)
    PYTHONPATH=. python3 benchmarks/bench_sparse.py --no-flex   # skip the compiled Flex baselines
    PYTHONPATH=. python3 benchmarks/bench_sparse.py --memory-only

Prints, for B=1, H=8, N=16384, D=64, float32, causal, window=256:
* full causal ``F.scaled_dot_product_attention`` time / ``sliding_window`` (backend auto) time
  (target ≥ 17), and compiled FlexAttention (same mask) time / sliding_window time (target ≥ 1);
* compiled FlexAttention time / ``block_sparse`` bigbird (block_size 64, backend auto) time on
  the same layout (target ≥ 1);
* at N=65536, the extra peak memory of one sliding_window call over its output size (target
  ≤ 4), measured in a fresh subprocess as peak RSS (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the call) minus RSS before the call, with glibc's mmap
  threshold lowered so freed buffers go back to the OS at once. The output itself is counted
  in the "extra".

Timings are the minimum of ``--repeats`` runs (compile time excluded: each compiled function is
run once before timing). Times on a shared machine are noisy; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _common import best_times, proc_status_bytes, reset_peak_rss  # benchmarks/_common.py (this folder is on sys.path)

import sparse_linear_attn as sla
from sparse_linear_attn.variants.block_sparse import resolve_layout


def flex_sliding(q, k, v, window):
    """Compiled FlexAttention, same mask: the library's ``flex`` backend (BlockMask with full
    tiles marked, so Flex skips the mask function inside the band)."""
    return lambda: sla.attention(q, k, v, "sliding_window", window=window, causal=True, backend="flex")


def flex_layout(q, k, v, layout, block_size):
    """Compiled FlexAttention on the same block layout (``flex`` backend, BlockMask from the layout)."""
    return lambda: sla.attention(
        q, k, v, "block_sparse", layout=layout, block_size=block_size, causal=True, backend="flex"
    )


def memory_child(n: int, window: int) -> None:
    torch.manual_seed(0)
    B, H, D = 1, 8, 64
    with torch.no_grad():
        small = torch.randn(1, 2, 1024, 16)
        sla.attention(small, small, small, "sliding_window", window=window, causal=True)  # load kernels
        q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
        before = reset_peak_rss()
        out = sla.attention(q, k, v, "sliding_window", window=window, causal=True)
        peak = proc_status_bytes("VmHWM")
    out_bytes = out.numel() * out.element_size()
    extra = peak - before
    print(
        f"memory N={n}: output {out_bytes / 2**20:.0f} MiB, extra peak RSS {extra / 2**20:.0f} MiB "
        f"= {extra / out_bytes:.2f}x output, output included (target <= 4)"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--memory-n", type=int, default=65536)
    ap.add_argument("--_memory-child", dest="memory_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_n, args.window)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )
    if not args.memory_only:
        torch.manual_seed(0)
        B, H, N, D, w = 1, 8, args.n, 64, args.window
        q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
        with torch.no_grad():
            print(f"B={B} H={H} N={N} D={D} float32 causal window={w}; min of {args.repeats} round-robin runs")
            fns = {
                "sliding": lambda: sla.attention(q, k, v, "sliding_window", window=w, causal=True),
                "full": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            }
            if not args.no_flex:
                fns["flex"] = flex_sliding(q, k, v, w)
            t = best_times(fns, args.repeats)
            t_full, t_sw = t["full"], t["sliding"]
            print(f"  full causal SDPA        {t_full * 1e3:9.1f} ms")
            print(
                f"  sliding_window (auto)   {t_sw * 1e3:9.1f} ms   full/sliding = {t_full / t_sw:5.1f}x (target >= 17)"
            )
            if not args.no_flex:
                print(
                    f"  flex compiled (same)    {t['flex'] * 1e3:9.1f} ms   "
                    f"flex/sliding = {t['flex'] / t_sw:5.2f}x (target >= 1)"
                )
            bs = 64
            layout = resolve_layout(N, N, causal=True, pattern="bigbird", block_size=bs)
            density = float((layout & torch.tril(torch.ones_like(layout))).float().mean())
            fns = {
                "bigbird": lambda: sla.attention(q, k, v, "block_sparse", pattern="bigbird", block_size=bs, causal=True)
            }
            if not args.no_flex:
                fns["flex"] = flex_layout(q, k, v, layout, bs)
            t = best_times(fns, args.repeats)
            print(
                f"  block_sparse bigbird bs=64 (auto) {t['bigbird'] * 1e3:9.1f} ms   "
                f"(causal block density {density:.3f})"
            )
            if not args.no_flex:
                print(
                    f"  flex compiled (same layout)       {t['flex'] * 1e3:9.1f} ms   "
                    f"flex/block_sparse = {t['flex'] / t['bigbird']:5.2f}x (target >= 1)"
                )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_memory-child",
        "--memory-n",
        str(args.memory_n),
        "--window",
        str(args.window),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print("  " + (res.stdout.strip() or res.stderr.strip()[-2000:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
