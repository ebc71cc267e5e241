"""How far cached decoding of ``topk_block`` / ``hybrid`` is from the one-shot call (docs/decoding.md).

    PYTHONPATH=. python3 benchmarks/decode_selection.py                       # local and real, 1K/4K/16K
    PYTHONPATH=. python3 benchmarks/decode_selection.py --inputs local --lengths 1k,4k --out OUT

A ``block_select`` cache selects key blocks per query from pooled keys (Quest-style); the one-shot
call selects per query block from its estimator. For each input, length ``n`` and variant this
runs, in float32, B=1, causal:

* the cached outputs: a prefill of ``n − steps`` tokens, then ``steps`` one-token steps (any split
  gives the same outputs — tests/test_decoding_adaptive.py);
* the one-shot call ``sla.attention(q, k, v, variant, causal=True, **params)`` and exact full
  causal attention;

and prints the relative errors ``‖a − b‖ / ‖b‖`` over every query (cached vs one-shot, cached vs
full, one-shot vs full), the exact attention mass each keeps per query row (mean and 5th
percentile over rows, on ``--rows`` evenly spaced query positions per head: the share of full
attention's weights inside the computed entries; hybrid's pseudo-keys not counted) and how the
two selections overlap: the share of the one-shot call's blocks that the steps select too
(summed over queries and kv heads), the mean Jaccard index per query, and the blocks each keeps
per query.

Inputs: ``local`` (sla-bench's: attention decays with distance; H=4, D=64) and ``real`` (Q/K/V
of all-MiniLM-L6-v2 layer 3 on CPython's bundled text, 12 heads of 32; MiniLM is a
*bidirectional* encoder, so these are real per-token statistics run here as a causal stream,
not a causal model's; beyond 512 tokens, 512-token segments are concatenated). Deterministic:
machine load changes the run time, not the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from _common import cpu_pressure  # benchmarks/_common.py (this folder is on sys.path)

import sparse_linear_attn as sla
from sparse_linear_attn.bench.inputs import make_inputs
from sparse_linear_attn.bench.spec import parse_seq_lens, parse_variant_spec

DEFAULT_VARIANTS = (
    "topk_block:block_size=64,density=0.1",
    "topk_block:block_size=64,mass=0.9",
    "topk_block:block_size=16,density=0.25",
    "hybrid:block_size=64,density=0.1",
)


def inputs(kind: str, n: int, *, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    if kind == "real":
        from sparse_linear_attn.bench.real import real_qkv

        q, k, v, note = real_qkv(n, layer=3)
        return q, k, v, note + " (bidirectional encoder, run as a causal stream)"
    q, k, v = make_inputs(kind, 1, heads, n, head_dim, causal=True)
    return q, k, v, f"{kind}: sla-bench synthetic inputs"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def mass_recall(q, k, rows: torch.Tensor, keep: torch.Tensor, bs: int, scale: float) -> torch.Tensor:
    """Share of each query row's exact causal softmax mass inside its kept blocks: ``(B·H·rows,)``.

    ``rows`` (R,) query positions; ``keep`` bool ``(B, Hkv, R, blocks)``."""
    H, Hkv, n = q.shape[1], k.shape[1], k.shape[2]
    kk = k.repeat_interleave(H // Hkv, 1).double()
    s = torch.matmul(q[:, :, rows].double(), kk.transpose(-1, -2)) * scale  # (B, H, R, n)
    j = torch.arange(n)
    s = s.masked_fill(j[None, :] > rows[:, None], float("-inf"))
    p = torch.softmax(s, -1)
    kept = keep.repeat_interleave(H // Hkv, 1).repeat_interleave(bs, -1)[..., :n]
    width = kept.shape[-1]
    return (p[..., :width] * kept).sum(-1).flatten()


def measure(kind, n, spec, q, k, v, *, steps: int, rows: int) -> dict:
    variant, params = spec.name, dict(spec.params)
    bs = params["block_size"]
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    scale = 1 / D**0.5
    t0 = time.perf_counter()
    with torch.no_grad():
        full = sla.attention(q, k, v, "full", causal=True)
        one_shot = sla.attention(q, k, v, variant, causal=True, **params)
        cache = sla.make_cache(variant, batch=B, kv_heads=Hkv, head_dim=D, value_dim=v.shape[-1], max_len=n, **params)
        p = n - steps
        outs = [sla.attention(q[:, :, :p], k[:, :, :p], v[:, :, :p], variant, causal=True, cache=cache, **params)]
        for t in range(p, n):
            sl = slice(t, t + 1)
            outs.append(
                sla.attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], variant, causal=True, cache=cache, **params)
            )
        cached = torch.cat(outs, 2)
        step = cache.step_selection(q, 0)  # (B, Hkv, n, blocks)
        sel = sla.selection(q, k, variant, causal=True, **params)
        one = sel.block_mask[:, :, torch.arange(n) // bs]  # each query's row, (B, Hkv, n, blocks)
    both = (step & one).sum(-1).double()
    union = (step | one).sum(-1).double()
    picks = torch.linspace(0, n - 1, min(rows, n)).round().long().unique()
    recall_step = mass_recall(q, k, picks, step[:, :, picks], bs, scale)
    recall_one = mass_recall(q, k, picks, one[:, :, picks], bs, scale)
    return {
        "inputs": kind,
        "n": n,
        "variant": spec.label,
        "err_cached_vs_one_shot": rel(cached, one_shot),
        "err_cached_vs_full": rel(cached, full),
        "err_one_shot_vs_full": rel(one_shot, full),
        "mass_cached_mean": float(recall_step.mean()),
        "mass_cached_p5": float(recall_step.quantile(0.05)),
        "mass_one_shot_mean": float(recall_one.mean()),
        "mass_one_shot_p5": float(recall_one.quantile(0.05)),
        "overlap_of_one_shot_blocks": float(both.sum() / one.sum()),
        "jaccard_mean": float((both / union.clamp_min(1)).mean()),
        "blocks_cached": float(step.sum(-1).double().mean()),
        "blocks_one_shot": float(one.sum(-1).double().mean()),
        "density_one_shot": sel.density,
        "seconds": time.perf_counter() - t0,
        "heads": H,
        "kv_heads": Hkv,
        "head_dim": D,
        "steps": steps,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", nargs="+", default=["local", "real"], choices=["local", "peaked", "random", "real"])
    ap.add_argument("--lengths", default="1k,4k,16k")
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    ap.add_argument("--heads", type=int, default=4, help="synthetic inputs (real: the model's 12)")
    ap.add_argument("--head-dim", type=int, default=64, help="synthetic inputs (real: the model's 32)")
    ap.add_argument("--steps", type=int, default=64, help="one-token steps at the end of each sequence")
    ap.add_argument("--rows", type=int, default=256, help="query rows per head for the attention-mass figures")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", help="write OUT/decode_selection.jsonl")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [parse_variant_spec(s) for s in args.variants]
    lengths = parse_seq_lens(args.lengths)
    out = None
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        out = Path(args.out) / "decode_selection.jsonl"
    print(f"# {' '.join(['python3', *sys.argv])}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"# cpu pressure before: {cpu_pressure()}; threads {torch.get_num_threads()}, torch {torch.__version__}")
    cols = ("err c/1", "err c/full", "err 1/full", "mass c", "mass 1", "overlap", "jaccard", "blk c", "blk 1")
    print(f"{'inputs':6} {'n':>6} {'variant':40} " + " ".join(f"{c:>10}" for c in cols))
    for kind in args.inputs:
        for n in lengths:
            q, k, v, note = inputs(kind, n, heads=args.heads, head_dim=args.head_dim)
            print(f"# {note}")
            for spec in specs:
                r = measure(kind, n, spec, q, k, v, steps=min(args.steps, n - 1), rows=args.rows)
                vals = (r["err_cached_vs_one_shot"], r["err_cached_vs_full"], r["err_one_shot_vs_full"],
                        r["mass_cached_mean"], r["mass_one_shot_mean"], r["overlap_of_one_shot_blocks"],
                        r["jaccard_mean"], r["blocks_cached"], r["blocks_one_shot"])  # fmt: skip
                print(f"{kind:6} {n:6d} {spec.label:40} " + " ".join(f"{x:10.4f}" for x in vals), flush=True)
                if out is not None:
                    with out.open("a") as f:
                        f.write(json.dumps({**r, "note": note}) + "\n")
    print(f"# cpu pressure after: {cpu_pressure()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
