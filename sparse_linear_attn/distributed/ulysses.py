"""``ulysses`` — any variant: trade sequence shards for head shards, run whole sequences, trade back.

One all-to-all turns each rank's ``(B, H, N/W, ·)`` q/k/v shards into ``(B, H/W, N, ·)``: the
whole sequence for ``H/W`` of the heads (DeepSpeed-Ulysses). The variant's own single-process
call runs on it unchanged — any variant, any parameters, exactly the whole call's result for
those heads — and a second all-to-all brings the output back to sequence shards. The key
padding mask is all-gathered (``B·N`` bytes).

Heads must divide by ``W``. Key/value heads are split too when ``W`` divides ``Hkv``;
otherwise each is repeated ``W / gcd(Hkv, W)`` times first, so that every rank gets the
key/value heads its query heads use (more bytes, same result). Variants whose query heads in
one group share a decision (:data:`GROUP_COUPLED`: one block selection per key/value head)
need ``W`` to divide ``Hkv``, so that no group is split. Per-head parameters
(:data:`HEAD_PARAMS`) are sliced to the rank's heads. All ranks need equal shard lengths.

Cost per rank: the single-process call on ``H/W`` heads of length ``N``; communication per rank
``(W−1)/W`` of its q, k, v and output shards, each way in backward.
"""

from __future__ import annotations

import math

import torch

from .. import api
from . import comm
from .plan import Setup, global_mask

#: Variants whose query heads sharing a key/value head share one selection.
GROUP_COUPLED = frozenset({"topk_block", "hybrid"})
#: Parameters that may hold one entry per query head along their first dim, when they have
#: that many dims.
HEAD_PARAMS = {"block_sparse": {"layout": 3}}


def _kv_repeat(setup: Setup) -> int:
    w = setup.g.world
    return w // math.gcd(setup.kv_heads, w)


def rules_out(setup: Setup) -> str | None:
    w = setup.g.world
    if setup.heads % w:
        return f"it splits the heads over the ranks: heads={setup.heads} must be divisible by the world size {w}"
    if len(set(setup.layout.lengths)) != 1:
        return f"its all-to-all needs equal shard lengths on every rank, got {list(setup.layout.lengths)}"
    if setup.spec.data_dependent and setup.variant not in GROUP_COUPLED:
        # Whether its selection couples heads is unknown: a head group's call could differ.
        return (
            f"{setup.variant!r} chooses what it computes from the inputs, and ulysses knows which "
            f"heads share a selection for {', '.join(sorted(GROUP_COUPLED))} only"
        )
    if setup.variant in GROUP_COUPLED and setup.kv_heads % w:
        return (
            f"{setup.variant!r} shares one selection among the query heads of a key/value head, so "
            f"kv_heads={setup.kv_heads} must be divisible by the world size {w}"
        )
    return None


def _to_heads(g, x: torch.Tensor) -> torch.Tensor:
    """``(B, h, n, F)`` sequence shard → ``(W·n, B, h/W, F)``: rank-major sequence, my head group."""
    B, h, n, f = x.shape
    parts = x.reshape(B, g.world, h // g.world, n, f).permute(1, 3, 0, 2, 4)  # (W, n, B, h/W, F)
    return parts


def _head_params(setup: Setup) -> dict:
    params = dict(setup.params)
    per = setup.heads // setup.g.world
    for name, ndim in HEAD_PARAMS.get(setup.variant, {}).items():
        val = params.get(name)
        if isinstance(val, (list, tuple)):
            val = torch.tensor(val)
        if isinstance(val, torch.Tensor) and val.dim() == ndim:
            params[name] = val[setup.g.rank * per : (setup.g.rank + 1) * per]
    return params


def run(setup: Setup, q, k, v, key_padding_mask):
    g = setup.g
    w, n = g.world, setup.n
    B, H, _, D = q.shape
    Dv = v.shape[-1]
    rep = _kv_repeat(setup)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    hq, hk = H // w, k.shape[1] // w
    # One message per pair of ranks: q and k/v of a head group travel together.
    qs = _to_heads(g, q).reshape(w, -1)
    kvs = _to_heads(g, torch.cat([k, v], dim=-1)).reshape(w, -1)
    sent = torch.cat([qs, kvs], dim=1)
    got = comm.all_to_all_diff(g, sent) if sent.requires_grad else comm.all_to_all(g, sent)
    lay = setup.layout
    order = None if lay.in_order else lay.order().to(q.device)

    def in_global_order(x: torch.Tensor, dim: int) -> torch.Tensor:
        return x if order is None else x.index_select(dim, order)

    qh = in_global_order(got[:, : qs.shape[1]].reshape(w * n, B, hq, D), 0).permute(1, 2, 0, 3)
    kvh = in_global_order(got[:, qs.shape[1] :].reshape(w * n, B, hk, D + Dv), 0).permute(1, 2, 0, 3)
    out = api.attention(
        qh,
        kvh[..., :D],
        kvh[..., D:],
        setup.variant,
        causal=setup.causal,
        key_padding_mask=global_mask(setup, key_padding_mask),
        scale=setup.scale,
        **_head_params(setup),
    )  # (B, H/W, N, Dv)
    if order is not None:  # global order → rank-major
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        out = out.index_select(2, back)
    # Each rank's part of the sequence goes home.
    ranked = out.reshape(B, hq, w, n, Dv).permute(2, 0, 1, 3, 4)  # (W, B, H/W, n, Dv)
    home = comm.all_to_all_diff(g, ranked) if ranked.requires_grad else comm.all_to_all(g, ranked)
    return home.permute(1, 0, 2, 3, 4).reshape(B, H, n, Dv)
