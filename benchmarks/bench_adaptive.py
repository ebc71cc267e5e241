"""Issue 11's CPU targets for content-adaptive attention, as ratios measured in one run.

    PYTHONPATH=. python3 benchmarks/bench_adaptive.py                 # everything (several minutes on 2 cores)
    PYTHONPATH=. python3 benchmarks/bench_adaptive.py --no-flex       # skip the compiled Flex baseline
    PYTHONPATH=. python3 benchmarks/bench_adaptive.py --memory-only

For B=1, H=8, N=16384, D=64, float32, causal, ``local`` inputs (sla-bench's), block_size 64:

* full causal ``F.scaled_dot_product_attention`` / ``topk_block`` (density 0.1, backend auto,
  the whole call: estimator, selection and the tiled kernel) — target ≥ 6;
* compiled FlexAttention on the *same* block mask (the call's selection turned into a
  BlockMask before timing; compile excluded) / ``topk_block`` — target ≥ 1;
* the estimator alone / ``topk_block`` — target ≤ 0.15;
* full causal SDPA / ``hybrid`` (density 0.1, default remainder) — target ≥ 4;
* at N=65536 (fresh subprocess per variant), the extra peak memory of one call against the
  target ``4 × output + (N/block_size)²`` (the selection's bool ``block_mask`` is ``B·Hkv``
  times that many bytes; its float scores 4× more), measured as peak RSS (``VmHWM`` reset just
  before the call) minus RSS before it, with glibc's mmap threshold lowered so freed buffers
  return to the OS at once.

Timings are the minimum over ``--repeats`` rounds that run every function once each, in turn
(so a change of machine load hits all alike); the ratios come from one run. Load is printed
before and after (``/proc/pressure/cpu``, load average). On a shared machine read the ratios,
not the milliseconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _common import (  # benchmarks/_common.py (this folder is on sys.path)
    best_times,
    machine_load,
    proc_status_bytes,
    reset_peak_rss,
)

import sparse_linear_attn as sla
from sparse_linear_attn.backends.flex import compiled_flex
from sparse_linear_attn.bench.inputs import make_inputs
from sparse_linear_attn.estimators import estimate
from sparse_linear_attn.variants.topk_block import selection_block_mask


def memory_child(variant: str, n: int, block_size: int, density: float) -> None:
    B, H, D = 1, 8, 64
    kw = dict(causal=True, block_size=block_size, density=density)
    with torch.no_grad():
        small = make_inputs("local", 1, 2, 1024, 16, causal=True)
        sla.attention(*small, variant, **kw)  # load kernels
        q, k, v = make_inputs("local", B, H, n, D, causal=True)
        before = reset_peak_rss()
        out = sla.attention(q, k, v, variant, **kw)
        peak = proc_status_bytes("VmHWM")
    out_bytes = out.numel() * out.element_size()
    sel_bytes = (n // block_size) ** 2
    extra = peak - before
    target = 4 * out_bytes + sel_bytes
    print(
        f"memory {variant} N={n}: output {out_bytes / 2**20:.0f} MiB, (N/bs)² = {sel_bytes / 2**20:.1f} MiB; "
        f"extra peak RSS {extra / 2**20:.0f} MiB = {extra / out_bytes:.2f}x output "
        f"(target <= 4x output + (N/bs)² = {target / 2**20:.0f} MiB: {'met' if extra <= target else 'NOT met'})"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--memory-n", type=int, default=65536)
    ap.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.memory_n, args.block_size, args.density)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {when}")
    print("before: " + machine_load())
    bs, dens = args.block_size, args.density
    if not args.memory_only:
        B, H, N, D = 1, 8, args.n, 64
        q, k, v = make_inputs("local", B, H, N, D, causal=True)
        kw = dict(causal=True, block_size=bs, density=dens)
        scale = 1 / D**0.5
        with torch.no_grad():
            sel = sla.selection(q, k, "topk_block", **kw)
            est = sla.describe("topk_block").params["estimator"][0]
            fns = {
                "full": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                "topk": lambda: sla.attention(q, k, v, "topk_block", **kw),
                "estimator": lambda: estimate(
                    est, q, k, block_size=bs, causal=True, key_padding_mask=None, scale=scale
                ),
                "hybrid": lambda: sla.attention(q, k, v, "hybrid", **kw),
            }
            if not args.no_flex:
                block_mask = selection_block_mask(sel, H, q.device)
                flex = compiled_flex()
                fns["flex"] = lambda: flex(q, k, v, block_mask=block_mask, scale=scale)
            print(
                f"B={B} H={H} N={N} D={D} float32 causal, local inputs, block_size={bs}, density={dens} "
                f"(selection density {sel.density:.4f}); min of {args.repeats} round-robin rounds"
            )
            t = best_times(fns, args.repeats)
        ms = {name: v * 1e3 for name, v in t.items()}
        print(f"  full causal SDPA          {ms['full']:9.1f} ms")
        ratio = t["full"] / t["topk"]
        print(f"  topk_block (auto)         {ms['topk']:9.1f} ms   full/topk = {ratio:5.2f}x (target >= 6)")
        print(
            f"  estimator {est:15s} {ms['estimator']:9.1f} ms   estimator/topk = "
            f"{t['estimator'] / t['topk']:5.3f} (target <= 0.15)"
        )
        if "flex" in t:
            print(
                f"  flex compiled, same mask  {ms['flex']:9.1f} ms   flex/topk = {t['flex'] / t['topk']:5.2f}x "
                "(target >= 1)"
            )
        ratio = t["full"] / t["hybrid"]
        print(f"  hybrid (auto)             {ms['hybrid']:9.1f} ms   full/hybrid = {ratio:5.2f}x (target >= 4)")
        print("after: " + machine_load())
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    for variant in ("topk_block", "hybrid"):
        cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", variant, "--memory-n", str(args.memory_n),
               "--block-size", str(bs), "--density", str(dens)]  # fmt: skip
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print("  " + (res.stdout.strip() or res.stderr.strip()[-2000:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
