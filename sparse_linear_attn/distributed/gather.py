"""``allgather`` — any variant, with every rank holding the keys/values it may need.

Generic form: one differentiable all-gather of K/V (backward: a reduce-scatter of their
gradients), then, for each of this rank's query chunks ``[a, a + c)``, the variant's own
single-process call on those queries. The call is bottom-right aligned, so the keys handed to
it end where the chunk's aligned position ends:

* causal — keys ``[0, a + c)``: the chunk's rows are exactly those of the whole call;
* non-causal — keys ``[0, N)``, and the chunk is followed by ``N − a − c`` zero query rows
  (computed, then dropped), unless the variant's non-causal output does not depend on where a
  query sits (:data:`POSITION_FREE`), in which case all local queries go in one call.

This is exact for any variant whose output row depends only on its query, the keys and its
aligned position; the padding rows cost up to ``(W − 1)×`` a rank's share in the non-causal
case. Variants that select per query block (:data:`QUERY_BLOCKS`: ``topk_block``, ``hybrid``)
need chunks on block boundaries, and their strict causal selection also reads the block of
queries before a chunk (:data:`QUERY_CONTEXT`), which is fetched for it. Per-rank memory holds
the whole sequence's K/V.

``block_sparse`` fetches instead only the key blocks its layout needs: the whole call's layout
is built once (identically on every rank), each chunk takes its rows, asks the owners for the
key blocks those rows name, and runs the single-process call with ``layout=`` set to its rows
and those columns. The chunk's own blocks come last, so that bottom-right alignment puts its
queries on them (and, causal, every fetched block lies wholly in the past). Chunks must start
on a multiple of ``block_size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import api
from ..variants.block_sparse import resolve_layout
from . import comm
from .plan import Setup, global_mask

#: Variants whose non-causal output does not depend on where a query sits: all local queries
#: run in one call over all keys, without alignment padding.
POSITION_FREE = frozenset({"full", "dot_product", "linear", "performer"})
#: Variants that tile queries into ``block_size`` blocks (one selection per query block): a
#: chunk must start and end on block boundaries, so that its blocks are the whole call's.
QUERY_BLOCKS = frozenset({"topk_block", "hybrid"})
#: Of those, the ones whose strict causal selection scores a query block from the
#: ``block_size`` queries ending at its first query: a chunk's call is handed the block of
#: queries before the chunk too (fetched from its owner; its output rows are dropped).
QUERY_CONTEXT = frozenset({"topk_block", "hybrid"})


def _block_size(setup: Setup) -> int:
    return setup.params["block_size"]


def rules_out(setup: Setup) -> str | None:
    if setup.spec.data_dependent and setup.variant not in QUERY_BLOCKS:
        # Chunk calls would each select from their own keys and queries only.
        return (
            f"{setup.variant!r} chooses what it computes from the whole call's inputs, and allgather "
            f"knows how to split the selection of {', '.join(sorted(QUERY_BLOCKS))} only"
        )
    if setup.variant not in QUERY_BLOCKS and setup.variant != "block_sparse":
        return None
    bs = _block_size(setup)
    edges = {e for r in range(setup.g.world) for c in setup.layout.chunks(r) for e in (c.start, c.stop)}
    if setup.variant == "block_sparse":  # key blocks are fetched whole; the chunk's end may be ragged
        edges = {c.start for r in range(setup.g.world) for c in setup.layout.chunks(r)}
    bad = sorted(e for e in edges if e % bs and e != setup.total)
    if bad:
        what = "fetches whole key blocks" if setup.variant == "block_sparse" else "selects per query block"
        return (
            f"{setup.variant} {what}, so the chunks of the layout must start (and end) on multiples of "
            f"block_size={bs}; positions {bad} do not (shard lengths {list(setup.layout.lengths)})"
        )
    return None


def run(setup: Setup, q, k, v, key_padding_mask):
    if setup.variant == "block_sparse":
        return _run_blocks(setup, q, k, v, key_padding_mask)
    g, lay = setup.g, setup.layout
    D = k.shape[-1]
    kv = torch.cat([k, v], dim=-1).transpose(0, 2)  # (n, Hkv, B, D + Dv): sequence first
    whole = comm.gather_shards(g, kv, lay.lengths)
    if not lay.in_order:
        whole = whole.index_select(0, lay.order().to(q.device))
    whole = whole.transpose(0, 2)  # (B, Hkv, N, D + Dv)
    pad = global_mask(setup, key_padding_mask)
    N = setup.total
    kw = dict(causal=setup.causal, scale=setup.scale, **setup.params)
    if not setup.causal and setup.variant in POSITION_FREE:
        return api.attention(q, whole[..., :D], whole[..., D:], setup.variant, key_padding_mask=pad, **kw)
    context = _query_context(setup)
    before = _queries_before(setup, q, context)
    outs = []
    for i, c in enumerate(setup.chunks):
        end = c.stop if setup.causal else N
        qc = q[:, :, c.local : c.local + c.length]
        lead = 0
        if before is not None and before[i].shape[2]:
            lead = before[i].shape[2]
            qc = torch.cat([before[i], qc], dim=2)
        if end > c.stop:
            qc = F.pad(qc, (0, 0, 0, end - c.stop))
        o = api.attention(
            qc,
            whole[:, :, :end, :D],
            whole[:, :, :end, D:],
            setup.variant,
            key_padding_mask=None if pad is None else pad[:, :end],
            **kw,
        )
        outs.append(o[:, :, lead : lead + c.length])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _query_context(setup: Setup) -> int:
    """Query positions before each chunk that its call needs (see :data:`QUERY_CONTEXT`)."""
    strict = setup.params.get("selection", "strict") == "strict"
    return _block_size(setup) if setup.causal and strict and setup.variant in QUERY_CONTEXT else 0


def _queries_before(setup: Setup, q, context: int) -> list[torch.Tensor] | None:
    """For each of this rank's chunks, the ``context`` queries before it (fewer at the start of
    the sequence), from whichever ranks hold them; ``None`` when no call needs any. They only
    steer a selection, which has no gradient, so they travel without one."""
    if not context:
        return None
    needs = [
        [(max(0, c.start - context), c.start) for c in setup.layout.chunks(r) if c.start] for r in range(setup.g.world)
    ]
    plan = comm.fetch_plan(setup.layout, needs, setup.g.rank)
    (got,) = comm.fetch(setup.g, [q.detach()], plan)
    out, at = [], 0
    for c in setup.chunks:
        n = c.start - max(0, c.start - context)
        out.append(got[:, :, at : at + n])
        at += n
    return out


def _block_columns(setup: Setup, rank: int, layout: torch.Tensor) -> list[tuple[tuple[int, int], list[int]]]:
    """For each chunk of ``rank``: its query-block rows and the key blocks to hand the local
    call, in order (needed blocks outside the chunk, then the chunk's own blocks, then a short
    last block of the sequence if needed and not the chunk's)."""
    bs, N = _block_size(setup), setup.total
    nkb = -(-N // bs)
    out = []
    for c in setup.layout.chunks(rank):
        r0, r1 = c.start // bs, -(-c.stop // bs)
        used = layout[..., r0:r1, :].reshape(-1, nkb).any(0)
        if setup.causal:
            used[r1:] = False  # wholly in the future of every row of the chunk
        own = list(range(r0, r1))
        ragged = N % bs != 0 and (nkb - 1) not in own
        cols = [b for b in used.nonzero().flatten().tolist() if not (r0 <= b < r1) and not (ragged and b == nkb - 1)]
        cols += own
        if ragged and bool(used[nkb - 1]):
            cols.append(nkb - 1)
        out.append(((r0, r1), cols))
    return out


def _merge_ranges(cols: list[int], bs: int, n: int) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for b in cols:
        lo, hi = b * bs, min(n, (b + 1) * bs)
        if ranges and ranges[-1][1] == lo:
            ranges[-1] = (ranges[-1][0], hi)
        else:
            ranges.append((lo, hi))
    return ranges


def _run_blocks(setup: Setup, q, k, v, key_padding_mask):
    g, bs, N = setup.g, _block_size(setup), setup.total
    layout = resolve_layout(N, N, causal=setup.causal, heads=setup.heads, **setup.params).cpu()
    per_rank = [_block_columns(setup, r, layout) for r in range(g.world)]
    needs = [[rg for _, cols in chunks for rg in _merge_ranges(cols, bs, N)] for chunks in per_rank]
    plan = comm.fetch_plan(setup.layout, needs, g.rank)
    ks, vs = comm.fetch(g, [k, v], plan)
    pad = None
    if key_padding_mask is not None:
        (pad8,) = comm.fetch(g, [key_padding_mask.to(torch.uint8)], plan, dim=1)
        pad = pad8.bool()
    params = {name: val for name, val in setup.params.items() if name not in ("layout", "pattern")}
    outs, at = [], 0
    for c, ((r0, r1), cols) in zip(setup.chunks, per_rank[g.rank]):
        stop = at + sum(hi - lo for lo, hi in _merge_ranges(cols, bs, N))
        rows = layout[..., r0:r1, :].index_select(-1, torch.tensor(cols, dtype=torch.long))
        o = api.attention(
            q[:, :, c.local : c.local + c.length],
            ks[:, :, at:stop],
            vs[:, :, at:stop],
            "block_sparse",
            causal=setup.causal,
            key_padding_mask=None if pad is None else pad[:, at:stop],
            scale=setup.scale,
            layout=rows.to(q.device),
            **params,
        )
        outs.append(o)
        at = stop
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
