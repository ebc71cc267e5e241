"""Greedy generation from a small Transformer built with ``sla.MultiheadAttention``, with and
without a decoding cache, for each variant.

    PYTHONPATH=. python3 examples/generate.py [--new-tokens 64] [--dtype float32] [--threads 1]

The model (random weights, fixed seed) is a stack of pre-norm blocks: RoPE self-attention
through the chosen variant, then an MLP. Two prompts of different lengths are left-padded into
one batch. *Uncached* generation runs the whole sequence through the model for every new
token; *cached* generation runs the prompt once (filling one ``sla.Cache`` per layer) and then
one token per step. The script checks that both produce the same tokens and prints tokens/s.
``topk_block`` and ``hybrid`` are the exception: their cached steps select key blocks per query
from pooled keys (docs/decoding.md), not as the one-shot call does, so for them the script prints
the share of tokens that agree and does not require all of them.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import sparse_linear_attn as sla

VARIANTS = {
    "full": {"variant": "full"},
    "sliding_window": {"variant": "sliding_window", "window": 16},
    "block_sparse": {"variant": "block_sparse", "block_size": 16, "pattern": "longformer"},
    "linear": {"variant": "linear", "chunk_size": 16},
    "performer": {"variant": "performer", "num_features": 64, "chunk_size": 16},
    "topk_block": {"variant": "topk_block", "block_size": 16, "density": 0.5},
    "hybrid": {"variant": "hybrid", "block_size": 16, "density": 0.5},
}
APPROXIMATE = {"topk_block", "hybrid"}  # cached steps approximate the one-shot selection


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, attention: dict):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = sla.MultiheadAttention(
            dim, heads, num_kv_heads=kv_heads, batch_first=True, positional="rope", attention=attention
        )
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, key_padding_mask=None, cache=None):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False, cache=cache)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(
        self, attention: dict, vocab: int = 96, dim: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, {**attention, "causal": True}) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, key_padding_mask=None, caches=None):
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, key_padding_mask, None if caches is None else caches[i])
        return self.head(x)

    def make_caches(self, batch: int, max_len: int):
        return [block.attn.make_cache(batch, max_len=max_len) for block in self.blocks]


@torch.no_grad()
def generate_uncached(model, prompt, pad, new_tokens):
    tokens, mask = prompt, pad
    for _ in range(new_tokens):
        nxt = model(tokens, key_padding_mask=mask)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
        mask = torch.cat([mask, torch.zeros_like(nxt, dtype=torch.bool)], dim=1)
    return tokens[:, prompt.shape[1] :]


@torch.no_grad()
def generate_cached(model, prompt, pad, new_tokens):
    caches = model.make_caches(prompt.shape[0], max_len=prompt.shape[1] + new_tokens)
    logits = model(prompt, key_padding_mask=pad, caches=caches)  # the prompt once; the padding is kept
    out = []
    for _ in range(new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, caches=caches)  # one token per step
    return torch.cat(out, dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=24, help="length of the longer prompt")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, help="torch intra-op threads")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 96, (2, args.prompt), generator=gen)
    pad = torch.zeros(2, args.prompt, dtype=torch.bool)
    pad[1, : args.prompt // 3] = True  # the second prompt is shorter: left-padded
    print(f"batch 2, prompts of {args.prompt} and {args.prompt - args.prompt // 3} tokens, {args.new_tokens} new, "
          f"{args.dtype}, {torch.get_num_threads()} thread(s)")  # fmt: skip
    print(f"{'variant':16} {'same tokens':>11} {'uncached tok/s':>15} {'cached tok/s':>13} {'speed-up':>9}")
    failed = []
    for name in args.variants:
        torch.manual_seed(1)
        model = TinyLM(VARIANTS[name]).to(dtype).eval()
        t0 = time.perf_counter()
        slow = generate_uncached(model, prompt, pad, args.new_tokens)
        t1 = time.perf_counter()
        fast = generate_cached(model, prompt, pad, args.new_tokens)
        t2 = time.perf_counter()
        same = torch.equal(slow, fast)
        if not same and name not in APPROXIMATE:
            failed.append(name)
        agree = str(same) if name not in APPROXIMATE else f"{(slow == fast).double().mean().item():.0%}"
        n = 2 * args.new_tokens
        print(f"{name:16} {agree:>11} {n / (t1 - t0):15.1f} {n / (t2 - t1):13.1f} {(t1 - t0) / (t2 - t1):8.1f}x")
    if failed:
        raise SystemExit(f"cached generation differs from uncached generation for: {', '.join(failed)}")


if __name__ == "__main__":
    main()
