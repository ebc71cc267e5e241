"""A short demo: build every registered variant from a config and report its output error
against exact attention on the same inputs (``python -m sparse_linear_attn.demo``)."""

from __future__ import annotations

import argparse
import time

import torch

import sparse_linear_attn as sla


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--causal", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    B, H, N, D = 1, args.heads, args.seq_len, args.head_dim
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    exact = sla.attention(q, k, v, "full", causal=args.causal, backend="math")
    print(f"B={B} H={H} N={N} D={D} causal={args.causal}  (error = ‖out − exact‖/‖exact‖)")
    print(f"{'variant':16} {'exact':>5} {'cost':>16} {'ms':>9} {'rel. error':>11}")
    for name in sla.available_variants():
        info = sla.describe(name)
        params = {"head_dim": D} if "head_dim" in info.params else {}
        layer = sla.build({"variant": name, "causal": args.causal, **params})
        with torch.no_grad():
            t0 = time.perf_counter()
            out = layer(q, k, v)
            ms = (time.perf_counter() - t0) * 1e3
        ref = (
            exact
            if name != "dot_product"
            else sla.attention(q, k, v, "dot_product", causal=args.causal, backend="math")
        )
        err = float(sla.relative_error(out, ref))
        note = "" if info.exact else "  (approximation / different score)"
        print(f"{name:16} {str(info.exact):>5} {info.cost:>16} {ms:9.1f} {err:11.2e}{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
