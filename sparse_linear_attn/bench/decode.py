"""``sla-bench decode``: per-token latency and cache memory of incremental decoding vs context length.

For each variant, batch size and context length ``n``, a cache is filled with ``n`` positions
of random keys and values, then one-token steps are timed. Caches of the ``kv`` and
``block_select`` families (``full``, ``dot_product``, ``topk_block``, ``hybrid``) are filled with
``load_state_dict`` (a quadratic prefill would only cost time; ``block_select`` caches rebuild
their pooled keys and sums from the keys); every other cache runs its own chunked prefill. The caches of
all lengths of one (variant, batch) exist together and are timed in interleaved rounds, so that
load on a shared machine hits every length alike (in alternating order): each round times
``--steps`` steps per length and keeps their median; the figure is the best round. Cache memory is ``cache.nbytes``
(the state tensors, allocated capacity included). Each round adds ``--steps`` positions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .spec import BenchVariant, parse_seq_lens, parse_variant_spec

DEFAULT_DECODE_VARIANTS = (
    "full",
    "sliding_window:window=256",
    "block_sparse",
    "linear",
    "performer:num_features=256",
    "topk_block",
    "hybrid",
)
#: Cache families filled by loading random keys (their state is the keys, or derived from them).
KEY_LOADED_FAMILIES = ("kv", "block_select")
#: Positions per prefill call while filling a cache.
PREFILL_CHUNK = 4096


def add_decode_parser(sub: Any) -> None:
    d = sub.add_parser(
        "decode",
        help="per-token latency and cache memory of incremental decoding vs context length",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    d.add_argument("--variants", nargs="+", metavar="SPEC", help="variant specs name[:key=value,...]")
    d.add_argument("--contexts", default="1k,2k,4k,8k,16k,32k,64k", help="context lengths (comma list, k/m)")
    d.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    d.add_argument("--heads", type=int, default=4, help="query heads (default 4)")
    d.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    d.add_argument("--head-dim", type=int, default=64)
    d.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    d.add_argument("--device", default="cpu")
    d.add_argument("--steps", type=int, default=16, help="one-token steps timed per round and length")
    d.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the best round's median counts")
    d.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", help="write one JSON line per point to OUT/decode.jsonl")


def _pressure() -> str:
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return "n/a"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fill(cache, n: int, *, heads: int, gen: torch.Generator) -> None:
    """Bring ``cache`` to ``n`` positions of random tokens (see the module docstring)."""
    import sparse_linear_attn as sla

    B, Hkv, D, Dv = cache.batch, cache.kv_heads, cache.head_dim, cache.value_dim
    f = dict(dtype=cache.dtype, device=cache.device)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(**f)

    if cache.family in KEY_LOADED_FAMILIES:
        cache.load_state_dict(
            {
                "variant": cache.variant,
                "seq_len": n,
                "k": rand(B, Hkv, n, D),
                "v": rand(B, Hkv, n, Dv),
                "pad": torch.zeros(B, n, dtype=torch.bool, device=cache.device),
            }
        )
        return
    with torch.no_grad():
        for s in range(0, n, PREFILL_CHUNK):
            t = min(PREFILL_CHUNK, n - s)
            sla.attention(
                rand(B, heads, t, D), rand(B, Hkv, t, D), rand(B, Hkv, t, Dv), cache.variant, causal=True,
                cache=cache, **cache.params,
            )  # fmt: skip


def measure(
    variant: BenchVariant,
    contexts: list[int],
    batch: int,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    steps: int,
    rounds: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Per-token latency (best round's median, ms) and cache bytes at each context length."""
    import sparse_linear_attn as sla

    gen = torch.Generator().manual_seed(seed)
    caches = {}
    for n in contexts:
        cache = sla.make_cache(
            variant.name, batch=batch, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, device=device,
            max_len=n + steps * rounds, **variant.params,
        )  # fmt: skip
        fill(cache, n, heads=heads, gen=gen)
        caches[n] = cache

    def token(h: int) -> torch.Tensor:
        return torch.randn(batch, h, 1, head_dim, generator=gen).to(dtype=dtype, device=device)

    tokens = [(token(heads), token(kv_heads), token(kv_heads)) for _ in range(steps)]
    best: dict[int, float] = {n: float("inf") for n in contexts}
    with torch.no_grad():
        for r in range(rounds):
            # Alternate the order, so that a drift of the machine's speed within a round does
            # not favour the first lengths.
            for n in contexts if r % 2 == 0 else contexts[::-1]:
                cache, times = caches[n], []
                for q, k, v in tokens:
                    _sync(device)
                    t0 = time.perf_counter()
                    sla.attention(
                        q, k, v, variant.name, causal=True, cache=cache, backend=variant.backend, **variant.params
                    )
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                best[n] = min(best[n], statistics.median(times))
    return [
        {
            "variant": variant.label,
            "batch": batch,
            "context": n,
            "ms_per_token": best[n] * 1e3,
            "cache_bytes": caches[n].nbytes,
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "dtype": str(dtype).replace("torch.", ""),
            "device": str(device),
            "threads": torch.get_num_threads(),
        }
        for n in contexts
    ]


def _mib(b: int) -> str:
    return f"{b / 2**20:.3f}" if b < 2**20 else f"{b / 2**20:.1f}"


def cmd_decode(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = args.variants or list(DEFAULT_DECODE_VARIANTS)
    variants = [parse_variant_spec(s) for s in specs]
    contexts = parse_seq_lens(args.contexts)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    kv_heads = args.kv_heads or args.heads
    for name, value in (("--steps", args.steps), ("--rounds", args.rounds), ("--heads", args.heads)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    out = None
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        out = Path(args.out) / "decode.jsonl"
    print(f"# sla-bench decode: heads={args.heads} kv_heads={kv_heads} head_dim={args.head_dim} {args.dtype} "
          f"{device} threads={torch.get_num_threads()} steps={args.steps} rounds={args.rounds}")  # fmt: skip
    print(f"# cpu pressure before: {_pressure()}")
    print(f"{'variant':40} {'B':>3} {'context':>8} {'ms/token':>9} {'cache MiB':>10}")
    records: list[dict[str, Any]] = []
    for variant in variants:
        for batch in args.batch:
            rows = measure(
                variant, contexts, batch, heads=args.heads, kv_heads=kv_heads, head_dim=args.head_dim, dtype=dtype,
                device=device, steps=args.steps, rounds=args.rounds, seed=args.seed,
            )  # fmt: skip
            for r in rows:
                print(f"{r['variant']:40} {batch:3d} {r['context']:8d} {r['ms_per_token']:9.3f} "
                      f"{_mib(r['cache_bytes']):>10}")  # fmt: skip
                if out is not None:
                    with out.open("a") as f:
                        f.write(json.dumps(r) + "\n")
            records += rows
            first, last = rows[0], rows[-1]
            print(f"#   {variant.label} B={batch}: {last['context']}/{first['context']} tokens -> time x"
                  f"{last['ms_per_token'] / first['ms_per_token']:.2f}, memory x"
                  f"{last['cache_bytes'] / first['cache_bytes']:.2f}")  # fmt: skip
    print(f"# cpu pressure after: {_pressure()}")
    if args.out:
        png = plot_decode(records, Path(args.out) / "decode.png")
        print(f"wrote {png}" if png else "note: matplotlib is not installed; no decode.png")
    return 0


def plot_decode(records: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Per-token time and cache memory against context length, one line per (variant, batch),
    from :func:`measure`'s records; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lines: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        lines.setdefault((r["variant"], r["batch"]), []).append(r)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    cmap = plt.get_cmap("tab10")
    names = list(dict.fromkeys(v for v, _ in lines))
    for (name, batch), rows in lines.items():
        rows = sorted(rows, key=lambda r: r["context"])
        x = [r["context"] for r in rows]
        style = dict(
            color=cmap(names.index(name) % 10), marker="o", ms=3, ls="-" if batch == min(b for _, b in lines) else "--"
        )
        ax_t.plot(x, [r["ms_per_token"] for r in rows], label=f"{name}, B={batch}", **style)
        ax_m.plot(x, [r["cache_bytes"] / 2**20 for r in rows], **style)
    first = records[0] if records else {}
    for ax, ylabel in ((ax_t, "ms per token (best round's median)"), (ax_m, "cache memory, MiB (cache.nbytes)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(
        f"sla-bench decode: heads={first.get('heads')} kv_heads={first.get('kv_heads')} "
        f"head_dim={first.get('head_dim')} {first.get('dtype')} {first.get('device')} threads={first.get('threads')}",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "DEFAULT_DECODE_VARIANTS",
    "KEY_LOADED_FAMILIES",
    "add_decode_parser",
    "cmd_decode",
    "fill",
    "measure",
    "plot_decode",
]
