"""Issue 11's accuracy figures for topk_block and hybrid (docs/accuracy.md), as markdown tables.

    PYTHONPATH=. python3 benchmarks/adaptive_accuracy.py              # everything (~15-30 min on 2 cores)
    PYTHONPATH=. python3 benchmarks/adaptive_accuracy.py --part e2e   # or: recall

``e2e``: all-MiniLM-L6-v2 at N = 512, every layer's attention replaced (non-causal, as trained),
cosine of mean-pooled sentence embeddings against the exact model on 4 chunks of stdlib text
(:func:`sparse_linear_attn.bench.real.encode`); *cost* is the share of the score entries computed,
exact plus compressed (``Selection.density + compressed_density``), averaged over every call.

``recall``: attention-mass recall of each estimator's selection — the exact softmax mass inside
the entries computed exactly, per query row; mean and 5th percentile over rows and heads — on
sla-bench's ``local`` and ``peaked`` inputs (causal, strict selection) and on ``real`` Q/K/V
(layer 3 of the model, non-causal and causal), N = 2048, D = 64 (real: 32), block 64,
density 0.125.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import sparse_linear_attn as sla
from sparse_linear_attn.bench import real
from sparse_linear_attn.bench.inputs import make_inputs

ESTIMATORS = {
    "mean_pool": {},
    "key_pool": {"estimator": "key_pool"},
    "antidiagonal": {"estimator": "antidiagonal", "stride": 4},
    "oracle": {"estimator": "oracle"},
}

#: (label, variant, params) of the end-to-end table.
E2E = [
    ("sliding_window, 64 each side", "sliding_window", {"window": 64}),
    *[
        (f"topk_block {name}, bs 16, density 0.25", "topk_block", {"block_size": 16, "density": 0.25, **p})
        for name, p in ESTIMATORS.items()
    ],
    ("hybrid, bs 16, density 0.2", "hybrid", {"block_size": 16, "density": 0.2}),
    ("hybrid oracle, bs 16, density 0.2", "hybrid", {"block_size": 16, "density": 0.2, "estimator": "oracle"}),
    ("hybrid key_pool, bs 8, mass 0.55, near 2", "hybrid",
     {"block_size": 8, "mass": 0.55, "estimator": "key_pool", "remainder_near": 2}),
    ("hybrid mean_pool, bs 4, mass 0.62, local 2, near 1", "hybrid",
     {"block_size": 4, "mass": 0.62, "local_blocks": 2, "remainder_near": 1}),
    ("hybrid mean_pool, bs 2, mass 0.68, local 4, near 1", "hybrid",
     {"block_size": 2, "mass": 0.68, "local_blocks": 4, "remainder_near": 1}),
    ("hybrid key_pool, bs 2, mass 0.68, local 4, near 1", "hybrid",
     {"block_size": 2, "mass": 0.68, "estimator": "key_pool", "local_blocks": 4, "remainder_near": 1}),
]  # fmt: skip


def estimator_share(variant: str, params: dict, n: int, head_dim: int) -> float:
    """The estimator's logit FLOPs over full attention's (``4·N²·D``), non-causal."""
    from sparse_linear_attn import registry
    from sparse_linear_attn.bench.flops import estimator_flops

    spec = registry.get(variant)
    if not spec.data_dependent:
        return 0.0
    p = spec.resolve_params(params)
    flops = estimator_flops(p["estimator"], p, batch=1, heads=1, nq=n, nk=n, head_dim=head_dim, causal=False)
    return (flops or 0.0) / (4.0 * n * n * head_dim)


def e2e(n: int = 512, chunks: int = 4) -> None:
    ids = real._chunks(n, chunks, offset=7919)
    with torch.no_grad():
        exact = real.mean_pool(real.encode(ids))
    head_dim = real.real_shape()[3]
    print(f"| {'configuration':52s} | cosine mean | cosine min | cost (entries) | estimator FLOPs |")
    print(f"|{'-' * 54}|-------------|------------|----------------|-----------------|")
    for label, variant, params in E2E:
        costs = []

        def attn(q, k, v, pad, variant=variant, params=params, costs=costs):
            sel = sla.selection(q, k, variant, key_padding_mask=pad, **params)
            costs.append(sel.density + sel.compressed_density)
            return sla.attention(q, k, v, variant, key_padding_mask=pad, **params)

        with torch.no_grad():
            approx = real.mean_pool(real.encode(ids, attn=attn))
        cos = F.cosine_similarity(approx.double(), exact.double(), dim=-1)
        cost = sum(costs) / len(costs)
        est = estimator_share(variant, params, n, head_dim)
        print(
            f"| {label:52s} | {float(cos.mean()):.4f}      | {float(cos.min()):.4f}     | {cost:.3f}          "
            f"| {est:.3f}           |",
            flush=True,
        )


def recall_stats(q, k, *, causal: bool, params: dict) -> tuple[float, float]:
    """Mean and 5th percentile over rows of the exact softmax mass inside the selection."""
    sel = sla.selection(q, k, "topk_block", causal=causal, **params)
    _, w = sla.attention(q, k, k, "full", causal=causal, return_weights=True)
    r = (w * sel.dense()).sum(-1).flatten().double()
    seen = w.sum(-1).flatten() > 0
    r = r[seen]
    return float(r.mean()), float(torch.quantile(r, 0.05))


def recall(n: int = 2048, density: float = 0.125, block_size: int = 64) -> None:
    cases = []
    for kind in ("local", "peaked"):
        q, k, _ = make_inputs(kind, 1, 8, n, 64, causal=True)
        cases.append((f"{kind}, causal", q, k, True))
    q, k, _, _ = real.real_qkv(n, layer=3)
    cases.append(("real, non-causal", q, k, False))
    cases.append(("real, causal", q, k, True))
    print(f"| inputs            | {' | '.join(f'{e:^19s}' for e in ESTIMATORS)} |")
    print(f"|-------------------|{'|'.join(['---------------------'] * len(ESTIMATORS))}|")
    with torch.no_grad():
        for label, q, k, causal in cases:
            cells = []
            for p in ESTIMATORS.values():
                mean, p5 = recall_stats(q, k, causal=causal, params=dict(block_size=block_size, density=density, **p))
                cells.append(f"{mean:.3f} (p5 {p5:.3f})  ")
            print(f"| {label:17s} | {' | '.join(cells)} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "e2e", "recall"), default="all")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--configs", default=None, help="JSON list of [label, variant, params] replacing the e2e table")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.configs:
        E2E[:] = [tuple(c) for c in json.loads(args.configs)]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {when}")
    if args.part in ("all", "e2e"):
        e2e()
    if args.part in ("all", "recall"):
        print()
        recall()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
