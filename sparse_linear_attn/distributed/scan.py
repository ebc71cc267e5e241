"""``scan`` — ``linear`` / ``performer``: each chunk's state, one exchange, and a prefix sum.

Linear attention is a sum over keys (:mod:`sparse_linear_attn.variants.linear`)::

    out_i = φ(q_i)ᵀ S_i / φ(q_i)ᵀ z_i,     [S_i, z_i] = Σ_{j visible to i} φ(k_j) [v_jᵀ, 1]

so a chunk of positions ``[a, a + c)`` needs, besides its own keys, one state ``(M, Dv + 1)``
per key/value head: the sum over every key before ``a`` (causal) or over every key (non-causal).

* causal — each rank computes the state of each of its chunks; one differentiable all-gather
  hands every chunk's state to every rank; each chunk adds up the states of the chunks before
  it in global order (an exclusive prefix sum, in float32 at least) and runs the library's own
  chunkwise kernel from that state (``linear_causal_continue``). Backward: the all-gather's
  gradient is a reduce-scatter, so each chunk's state receives the sum of the gradients of all
  later chunks' prefixes — the suffix sum.
* non-causal — one differentiable all-reduce of each rank's state gives the total; each query
  then needs one product with it (backward: an all-reduce of the state's gradient).

FAVOR+ (``performer``, ``feature_map="favor"``) shifts key features by one max over a head's
keys; the ranks all-reduce their maxima so that every rank maps its keys as the whole call
does. With ``redraw=True`` under autograd, rank 0 draws the projection's seed for everyone.

Cost per rank: the single-process kernel on ``N/W`` positions plus O(N/W·M·(D + Dv)) for the
chunk states. Communication per rank: ``(W−1)·chunks·|state|`` bytes (causal; ``|state| =
B·Hkv·M·(Dv + 1)`` floats of the work dtype, ``chunks`` = 1 or 2 per rank) or
``2(W−1)/W·|state|`` (non-causal), independent of ``N``; backward the same again.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from ..feature_maps import FeatureContext, FeatureMap, get_feature_map
from ..variants.linear import apply_state, key_state, linear_causal_continue
from . import comm
from .plan import Setup

#: The feature map a variant fixes (variants not listed take their ``feature_map`` parameter).
FEATURE_MAP = {"performer": "favor"}
#: Key positions mapped at once while summing a chunk's state (bounds the working memory).
BLOCK = 4096


def rules_out(setup: Setup) -> str | None:
    return None


def _features(setup: Setup, k, key_padding_mask) -> tuple[FeatureMap, FeatureContext]:
    """The feature map and a context equal on every rank to the whole call's."""
    p = setup.params
    fmap = get_feature_map(FEATURE_MAP.get(setup.variant) or p["feature_map"])
    seed = p["seed"]
    if p["redraw"] and setup.grad:
        # As the single-process call draws it, from torch's generator; rank 0's draw wins.
        drawn = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        seed = comm.gather_ints(setup.g, [drawn])[0][0]
    ctx = fmap.prepare(
        k,
        scale=setup.scale,
        num_features=p["num_features"],
        seed=seed,
        key_padding_mask=key_padding_mask,
        work_dtype=setup.work_dtype,
    )
    if ctx.key_max is not None:
        key_max = comm.all_reduce(setup.g, ctx.key_max.to(setup.g.device), op=dist.ReduceOp.MAX).to(k.device)
        ctx = replace(ctx, key_max=key_max, key_shift=torch.where(torch.isfinite(key_max), key_max, 0.0))
    return fmap, ctx


def run(setup: Setup, q, k, v, key_padding_mask):
    """This rank's output shard of ``linear``/``performer`` over the whole sequence."""
    g, work = setup.g, setup.work_dtype
    fmap, ctx = _features(setup, k, key_padding_mask)
    grad = setup.grad and torch.is_grad_enabled()
    if not setup.causal:
        mine = key_state(k, v, fmap, ctx, key_padding_mask, work, step=BLOCK)
        total = comm.all_reduce_diff(g, mine) if grad else comm.all_reduce(g, mine)
        return apply_state(q, total, fmap, ctx, work, step=BLOCK)
    states = torch.stack(
        [
            key_state(
                k[:, :, c.local : c.local + c.length],
                v[:, :, c.local : c.local + c.length],
                fmap,
                ctx,
                None if key_padding_mask is None else key_padding_mask[:, c.local : c.local + c.length],
                work,
                step=BLOCK,
            )
            for c in setup.chunks
        ]
    )
    every = comm.gather_diff(g, states) if grad else comm.all_gather(g, states)  # (W, chunks, ...)
    order = sorted((c.start, r, i) for r in range(g.world) for i, c in enumerate(setup.layout.chunks(r)))
    ranked = torch.stack([every[r, i] for _, r, i in order])
    before = torch.cat([torch.zeros_like(ranked[:1]), ranked[:-1].cumsum(0)])  # exclusive prefix sums
    where = {(r, i): at for at, (_, r, i) in enumerate(order)}
    outs = []
    for i, c in enumerate(setup.chunks):
        sl = slice(c.local, c.local + c.length)
        out, _ = linear_causal_continue(
            q[:, :, sl],
            k[:, :, sl],
            v[:, :, sl],
            before[where[(g.rank, i)]],
            fmap=fmap,
            ctx=ctx,
            key_padding_mask=None if key_padding_mask is None else key_padding_mask[:, sl],
            chunk_size=setup.params["chunk_size"],
        )
        outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
