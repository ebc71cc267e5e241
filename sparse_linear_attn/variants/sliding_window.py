"""``sliding_window`` — exact softmax attention inside a band of ``window`` keys on each side.

    query i sees key j  iff  i' − window ≤ j ≤ i' + window        (causal: i' − window ≤ j ≤ i')
                         or  j < sinks                             (causal: and j ≤ i')
    with i' = i + Nk − Nq  (bottom-right alignment, as for ``causal`` everywhere)

    out_i = Σ_j softmax_j(q_i·k_j·scale over the visible j) v_j

This is FlashAttention's ``window_size=(window, window)`` / ``(window, 0)`` and xformers'
``LocalAttentionFromBottomRightMask(window_left=window, window_right=window or 0)``: a causal
window of ``window`` sees ``window + 1`` keys (itself and ``window`` before it). Shapes
``(batch, heads, seq, head_dim)``: q ``(B, H, Nq, D)``, k ``(B, Hkv, Nk, D)``, v ``(B, Hkv, Nk, Dv)``.

Cost of the ``torch`` backend: O(B·H·Nq·(T + window·(1 or 2))·D) time with query tiles of
``T = TILE`` rows (``TILE_GRAD`` with grad), and working memory bounded by tiling: tile ``t``
sees one contiguous key span of ``T + window_left + window_right`` keys, and tiles run a
bounded group at a time, so neither an ``Nq×Nk`` nor a whole-sequence ``Nq×2·window`` score
tensor exists. The band mask ``(T, span)`` is the same for every tile, so it is built once and
broadcast. Without grad, interior tiles read k/v in place (overlapping ``as_strided`` spans);
on CPU in float32/64 they run through :func:`~sparse_linear_attn.backends.tiles.tile_attention`
(``baddbmm → softmax → bmm`` per head, written straight into the output), elsewhere through
SDPA. With grad, each group copies its spans (``unfold``, bounded by ``GROUP_ELEMENTS``), runs
SDPA and is recomputed in backward. Only tiles at the sequence edges, and calls with a key
padding mask, need a per-tile mask (and run through SDPA). With attention dropout every group
copies its spans and runs :func:`~sparse_linear_attn.backends.dropout.dropout_attention`
(explicit tile weights, the positional mask of the ``math`` backend), with or without grad.

``sinks`` (StreamingLLM's attention sinks) adds the first keys to every query's window. The
band is then computed with each query's log-sum-exp (``tile_attention``'s, or explicit scores
where SDPA ran) and merged with the attention over the sink keys outside the band — an
O(Nq·sinks) part — by :func:`~sparse_linear_attn.backends.partial.merge_partials`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..backends.dropout import Dropout, dense_rows, dropout_attention, query_rows
from ..backends.flex import block_mask_from_layout, cached_block_mask, flex_run, flex_skip_in_auto
from ..backends.math import dense_attention
from ..backends.partial import merge_partials, partial_attention
from ..backends.sdpa import masked_sdpa
from ..backends.tiles import tile_attention, use_bmm_tiles
from ..backends.xformers_backend import no_key_padding, sliding_window_xformers
from ..inputs import causal_offset, full_visibility
from ..registry import Impl, Param, Supports, VariantSpec, add, int_at_least

#: Query rows per tile: 32 without grad, where k/v are read in place and smaller tiles waste
#: fewer band entries (docs/sparse.md); 64 with grad, where spans are copied and 64 copies less.
TILE = 32
TILE_GRAD = 64
#: Elements of the gathered key (and value) copies built at once; bounds working memory.
GROUP_ELEMENTS = 1 << 23
#: Score elements of one ``tile_attention`` call (one head, some tiles), in one reused buffer.
SCORE_ELEMENTS = 1 << 19


def sliding_window_mask(nq: int, nk: int, *, causal: bool = False, window: int = 256, sinks: int = 0) -> torch.Tensor:
    """Bool ``(nq, nk)``: True where query ``i`` may see key ``j`` (the definition above). O(nq·nk)."""
    # Compare (nq, 1) against (1, nk) bounds: only the bool result is (nq, nk), never an int64 one
    # (which would be 8× the mask: 2 GiB at 16K).
    i = torch.arange(nq)[:, None] + causal_offset(nq, nk)
    j = torch.arange(nk)[None, :]
    band = (j >= i - window) & (j <= (i if causal else i + window))
    return band | ((j < sinks) & ((j <= i) if causal else True))


def sliding_window_visible_keys(nq: int, nk: int, *, causal: bool = False, window: int = 256, sinks: int = 0) -> float:
    """Average keys per query of the band and the sinks, edges included, in O(Nq) without a mask."""
    i = torch.arange(nq, dtype=torch.float64) + causal_offset(nq, nk)
    lo = (i - window).clamp_min(0)
    hi = (i if causal else i + window).clamp_max(nk - 1)
    band = (hi - lo + 1).clamp_min(0)
    # Sinks [0, s) (causal: those ≤ i) that the band [lo, hi] does not already hold.
    s = torch.full_like(i, float(min(sinks, nk)))
    if causal:
        s = torch.minimum(s, i + 1).clamp_min(0)
    inside = (torch.minimum(s - 1, hi) - lo + 1).clamp_min(0)
    return float((band + s - inside).mean())


def sliding_window_reference(
    q, k, v, *, causal, key_padding_mask, scale, return_weights=False, window, sinks=0, dropout=None
):
    """Dense masked softmax: the ``math`` backend (O(Nq·Nk)), the one that returns weights."""
    nq, nk = q.shape[2], k.shape[2]
    mask = full_visibility(
        nq,
        nk,
        causal=causal,
        key_padding_mask=key_padding_mask,
        pattern=sliding_window_mask(nq, nk, causal=causal, window=window, sinks=sinks).to(q.device),
    )
    return dense_attention(q, k, v, scale=scale, mask=mask, return_weights=return_weights, dropout=dropout)


def _span(t: torch.Tensor, start: int, stop: int, fill) -> torch.Tensor:
    """``t[:, :, start:stop]`` along dim 2, positions outside ``[0, t.shape[2])`` set to ``fill``."""
    n = t.shape[2]
    lo = min(max(start, 0), n)
    hi = min(max(stop, lo), n)
    left = min(max(0, -start), stop - start)
    right = (stop - start) - left - (hi - lo)
    body = t[:, :, lo:hi]
    if left == 0 and right == 0:
        return body
    parts = []
    for size, piece in ((left, None), (hi - lo, body), (right, None)):
        if piece is not None:
            parts.append(piece)
        elif size:
            parts.append(torch.full((*t.shape[:2], size, *t.shape[3:]), fill, dtype=t.dtype, device=t.device))
    return torch.cat(parts, dim=2)


def _tile_group(q, k, v, kpm, band, t0, g, *, T, wl, wr, offset, scale, lse=False, dropout: Dropout | None = None):
    """Attention of query tiles ``t0 .. t0+g-1`` over their key spans: ``(B, H, g·T, Dv)``;
    with ``lse``, ``(out, lse (B, H, g·T))`` through explicit scores (float32 at least)."""
    B, H, nq, D = q.shape
    Hkv, nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    L = band.shape[1]
    qs = _span(q, t0 * T, (t0 + g) * T, 0.0)
    start = t0 * T + offset - wl
    stop = (t0 + g) * T + offset + wr  # = start + (g - 1)·T + L
    # unfold gives tile spans as a strided view; the reshape below makes the bounded copy.
    ks = _span(k, start, stop, 0.0).unfold(2, L, T)  # (B, Hkv, g, D, L)
    vs = _span(v, start, stop, 0.0).unfold(2, L, T)
    q4 = qs.reshape(B, H, g, T, D).transpose(1, 2).reshape(B * g, H, T, D)
    k4 = ks.permute(0, 2, 1, 4, 3).reshape(B * g, Hkv, L, D)
    v4 = vs.permute(0, 2, 1, 4, 3).reshape(B * g, Hkv, L, Dv)
    edge = start < 0 or stop > nk
    j = start + torch.arange(g, device=q.device)[:, None] * T + torch.arange(L, device=q.device)  # (g, L) keys
    mask = band
    if edge or kpm is not None:
        # Per-tile mask: keys outside [0, Nk) or padded never get weight.
        ok = ((j >= 0) & (j < nk))[None]  # (1, g, L)
        if kpm is not None:
            ok = ok & ~_span(kpm[:, None, :], start, stop, True)[:, 0].unfold(1, L, T)  # (B, g, L)
        mask = (band & ok[:, :, None, :]).expand(B, g, T, L).reshape(B * g, 1, T, L)
    if dropout is not None:
        # Rows beyond Nq (the last tile's padding) are dropped by the caller.
        i = (t0 * T + torch.arange(g * T, device=q.device)).view(1, g, 1, T, 1)
        b = torch.arange(B, device=q.device).view(B, 1, 1, 1, 1)
        h = torch.arange(H, device=q.device).view(1, 1, H, 1, 1)
        rows = query_rows(b, h, i, heads=H, nq=nq).reshape(B * g, H, T, 1)
        cols = j[None].expand(B, g, L).reshape(B * g, 1, 1, L)
        res = dropout_attention(q4, k4, v4, scale=scale, mask=mask, dropout=dropout, rows=rows, cols=cols,
                                return_lse=lse)  # fmt: skip
        if lse:
            out, row_lse = res
            row_lse = row_lse.reshape(B, g, H, T).transpose(1, 2).reshape(B, H, g * T)
        else:
            out = res
    elif lse:
        out, row_lse = partial_attention(q4, k4, v4, scale=scale, mask=mask)
        row_lse = row_lse.reshape(B, g, H, T).transpose(1, 2).reshape(B, H, g * T)
    elif mask is not band:
        out = masked_sdpa(q4, k4, v4, mask=mask, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=band, scale=scale, enable_gqa=H != Hkv)
    out = out.reshape(B, g, H, T, Dv).transpose(1, 2).reshape(B, H, g * T, Dv)
    return (out, row_lse) if lse else out


def _interior_group_into(out, q, k, v, band, t0, g, *, T, wl, offset, scale, bias=None, scores=None, lse=None):
    """No-grad fast path for tiles whose spans lie inside the sequence: no copies at all.

    Tile spans overlap, so they are an ``as_strided`` view of ``k``/``v`` (tiles as the batch
    dim, stride ``T`` rows), read in place; output goes straight to ``out``. With ``bias`` (the
    band as an additive mask) each head runs through :func:`tile_attention`'s ``bmm``s (CPU,
    float32/64), as many tiles at a time as the ``scores`` buffer holds, writing each query's
    log-sum-exp into ``lse (B, H, Nq)`` when given; else all heads through one SDPA call per
    batch row.
    """
    B, H = q.shape[:2]
    Hkv, D, Dv = k.shape[1], k.shape[3], v.shape[3]
    L = band.shape[1]
    start = t0 * T + offset - wl
    if bias is not None:
        for b in range(B):
            for h in range(H):
                kh, vh = k[b, h // (H // Hkv)], v[b, h // (H // Hkv)]
                ks = kh.as_strided(
                    (g, L, D),
                    (T * kh.stride(0), kh.stride(0), kh.stride(1)),
                    kh.storage_offset() + start * kh.stride(0),
                )
                vs = vh.as_strided(
                    (g, L, Dv),
                    (T * vh.stride(0), vh.stride(0), vh.stride(1)),
                    vh.storage_offset() + start * vh.stride(0),
                )
                qs = q[b, h, t0 * T : (t0 + g) * T].unflatten(0, (g, T))
                outs = out[b, h, t0 * T : (t0 + g) * T].view(g, T, Dv)
                step = max(1, scores.numel() // (T * L))
                for i in range(0, g, step):
                    j = min(g, i + step)
                    res = tile_attention(qs[i:j], ks[i:j], vs[i:j], scale=scale, bias=bias, out=outs[i:j],
                                         scores=scores, return_lse=lse is not None)  # fmt: skip
                    if lse is not None:
                        lse[b, h, (t0 + i) * T : (t0 + j) * T] = res[1].flatten()
        return
    for b in range(B):
        kb, vb = k[b], v[b]
        ks = kb.as_strided(
            (g, Hkv, L, D),
            (T * kb.stride(1), kb.stride(0), kb.stride(1), kb.stride(2)),
            kb.storage_offset() + start * kb.stride(1),
        )
        vs = vb.as_strided(
            (g, Hkv, L, Dv),
            (T * vb.stride(1), vb.stride(0), vb.stride(1), vb.stride(2)),
            vb.storage_offset() + start * vb.stride(1),
        )
        qs = q[b, :, t0 * T : (t0 + g) * T].unflatten(1, (g, T)).transpose(0, 1)  # (g, H, T, D) view
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=band, scale=scale, enable_gqa=H != Hkv)
        out[b, :, t0 * T : (t0 + g) * T].unflatten(1, (g, T)).copy_(o.transpose(0, 1))


def sliding_window_torch(
    q, k, v, *, causal, key_padding_mask, scale, return_weights=False, window, sinks=0, tile=None, dropout=None
):  # fmt: skip
    """Tiled exact sliding-window attention (see the module docstring for cost and memory);
    with ``sinks``, the band's part and the sinks' part merged by their log-sum-exp."""
    if sinks:
        out, band_lse = _band(q, k, v, key_padding_mask, causal=causal, scale=scale, window=window, tile=tile,
                              lse=True, dropout=dropout)  # fmt: skip
        sink_out, sink_lse = _sink_part(q, k, v, key_padding_mask, causal=causal, scale=scale, window=window,
                                        sinks=sinks, dropout=dropout)  # fmt: skip
        out, _ = merge_partials(out.to(sink_out.dtype), band_lse, sink_out, sink_lse)
        return out.to(q.dtype), None
    band = _band(q, k, v, key_padding_mask, causal=causal, scale=scale, window=window, tile=tile, dropout=dropout)
    return band, None


def _sink_part(q, k, v, kpm, *, causal, scale, window, sinks, dropout: Dropout | None = None):
    """Attention over the first ``sinks`` keys that the band does not hold (causal: at or before
    the query): ``(out, lse)``, O(Nq·sinks); with ``dropout``, those keys' weights dropped as the
    whole row's are (same hash of row and key)."""
    nq, nk = q.shape[2], k.shape[2]
    s = min(sinks, nk)
    i = torch.arange(nq, device=q.device)[:, None] + causal_offset(nq, nk)
    j = torch.arange(s, device=q.device)[None, :]
    outside = (j < i - window) | (j > (i if causal else i + window))
    mask = (outside & (j <= i)) if causal else outside
    mask = mask[None, None]
    if kpm is not None:
        mask = mask & ~kpm[:, None, None, :s]
    if dropout is not None:
        B, H = q.shape[:2]
        rows = dense_rows(B, H, nq, q.device)
        return dropout_attention(q, k[:, :, :s], v[:, :, :s], scale=scale, mask=mask, dropout=dropout, rows=rows,
                                 cols=j[None, None], return_lse=True)  # fmt: skip
    return partial_attention(q, k[:, :, :s], v[:, :, :s], scale=scale, mask=mask)


def _band(q, k, v, key_padding_mask, *, causal, scale, window, tile=None, lse=False, dropout=None):
    """The band's attention ``(B, H, Nq, Dv)``, or ``(out, lse)`` with each query's log-sum-exp."""
    B, H, nq, _ = q.shape
    Hkv, nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    T = tile or (TILE_GRAD if grad else TILE)
    # A window wider than the sequence sees nothing more: clamp so the span stays ≤ T + 2·Nk.
    wl = min(window, nk - 1)
    wr = 0 if causal else min(window, nq - 1)
    L = T + wl + wr
    r = torch.arange(T, device=q.device)[:, None]
    c = torch.arange(L, device=q.device)[None, :]
    band = (c >= r) & (c <= r + wl + wr)  # the same for every tile
    offset = causal_offset(nq, nk)
    n_tiles = -(-nq // T)
    per_tile = B * max(H, Hkv) * L * max(q.shape[3], Dv)
    if dropout is not None:
        # A group's explicit weights and their int64 mask hash: a few times its (T, L) scores.
        per_tile = max(per_tile, 4 * B * H * T * L)
    group = max(1, min(n_tiles, GROUP_ELEMENTS // per_tile))
    kw = dict(T=T, wl=wl, wr=wr, offset=offset, scale=scale)
    # Tiles [first, last) have their whole key span inside [0, Nk) and all their queries: the
    # band alone masks them. Edge tiles go in groups of their own, so that only those build a
    # per-tile mask (every op counts when other processes share the cores).
    first = min(n_tiles, max(0, -(-(wl - offset) // T)))
    last = max(first, min(n_tiles, (nk - offset - T - wr) // T + 1, nq // T))
    groups = []
    for lo, hi in ((0, first), (first, last), (last, n_tiles)):
        groups += [(t0, min(group, hi - t0)) for t0 in range(lo, hi, group)]
    if grad or dropout is not None:
        # With grad, recompute each group in the backward pass instead of keeping its gathered
        # k/v copies (and weights), so training memory stays O(N·D) as well. Dropout's mask is a
        # hash of the position, so the recomputation drops what the forward dropped.
        kw_group = dict(kw, lse=lse, dropout=dropout)
        pieces = [
            checkpoint(_tile_group, q, k, v, key_padding_mask, band, t0, g, use_reentrant=False, **kw_group)
            if grad
            else _tile_group(q, k, v, key_padding_mask, band, t0, g, **kw_group)
            for t0, g in groups
        ]
        if lse:
            return torch.cat([p[0] for p in pieces], 2)[:, :, :nq], torch.cat([p[1] for p in pieces], 2)[:, :, :nq]
        return torch.cat(pieces, dim=2)[:, :, :nq]
    out = q.new_empty(B, H, nq, Dv)
    row_lse = q.new_empty(B, H, nq, dtype=torch.promote_types(q.dtype, torch.float32)) if lse else None
    if use_bmm_tiles(q, grad) and key_padding_mask is None and last > first:
        # bmm tiles go head by head, so they take the whole interior at once (in score-buffer
        # sized steps): grouping across heads would multiply the calls by B·H.
        bias = torch.zeros(band.shape, dtype=q.dtype, device=q.device).masked_fill_(~band, float("-inf"))
        scores = q.new_empty(max(1, min(last - first, SCORE_ELEMENTS // (T * L))) * T * L)
        _interior_group_into(
            out, q, k, v, band, first, last - first, T=T, wl=wl, offset=offset, scale=scale, bias=bias, scores=scores,
            lse=row_lse,
        )  # fmt: skip
        groups = [(t0, g) for t0, g in groups if not first <= t0 < last]
    for t0, g in groups:
        if key_padding_mask is None and first <= t0 and t0 + g <= last and not lse:
            _interior_group_into(out, q, k, v, band, t0, g, T=T, wl=wl, offset=offset, scale=scale)
            continue
        piece = _tile_group(q, k, v, key_padding_mask, band, t0, g, lse=lse, **kw)
        stop = min(nq, (t0 + g) * T)
        if lse:
            piece, piece_lse = piece
            assert row_lse is not None
            row_lse[:, :, t0 * T : stop] = piece_lse[:, :, : stop - t0 * T]
        out[:, :, t0 * T : stop] = piece[:, :, : stop - t0 * T]
    return (out, row_lse) if lse else out


def _block_layouts(nq, nk, block, wl, wr, device, sinks=0, causal=False):
    """Tiles ``(nq_blocks, nk_blocks)`` with any / all entries inside the band or the sinks
    (ragged edges partial)."""
    qb = torch.arange(-(-nq // block), device=device)[:, None]
    kb = torch.arange(-(-nk // block), device=device)[None, :]
    off = causal_offset(nq, nk)
    q_lo, q_hi = qb * block, torch.clamp((qb + 1) * block, max=nq) - 1
    k_lo, k_hi = kb * block, torch.clamp((kb + 1) * block, max=nk) - 1
    d_min, d_max = k_lo - q_hi - off, k_hi - q_lo - off  # range of j − i' over the tile
    any_v = (d_max >= -wl) & (d_min <= wr)
    full = (d_min >= -wl) & (d_max <= wr)
    if sinks:
        # Sink keys j < sinks, seen by every query (causal: by those at or after them).
        any_v |= (k_lo < sinks) & ((k_lo <= q_hi + off) if causal else True)
        full |= (k_hi < sinks) & ((k_hi <= q_lo + off) if causal else True)
    full &= ((qb + 1) * block <= nq) & ((kb + 1) * block <= nk)
    return any_v, full


#: Flex tile size for sliding_window (its default, good on CPU and GPU).
FLEX_BLOCK = 128


def sliding_window_flex(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, window, sinks=0):
    """Compiled FlexAttention with a BlockMask built from the band's tile layout (cached)."""
    nq, nk = q.shape[2], k.shape[2]
    wl, wr = window, (0 if causal else window)
    off = causal_offset(nq, nk)
    kpm = key_padding_mask

    def mask_mod(b, h, q_idx, kv_idx):
        d = kv_idx - q_idx - off
        keep = (d >= -wl) & (d <= wr)
        if sinks:
            keep = keep | ((kv_idx < sinks) & (d <= 0) if causal else kv_idx < sinks)
        if kpm is not None:
            keep = keep & ~kpm[b, kv_idx]
        return keep

    def build():
        any_v, full = _block_layouts(nq, nk, FLEX_BLOCK, wl, wr, q.device, sinks, causal)
        if kpm is not None:
            full = torch.zeros_like(full)  # padding is only known element-wise
        return block_mask_from_layout(any_v[None, None], full[None, None], mask_mod, nq, nk, FLEX_BLOCK)

    key = None if kpm is not None else ("sliding_window", nq, nk, wl, wr, sinks, causal, str(q.device))
    return flex_run(q, k, v, block_mask=cached_block_mask(key, build), scale=scale), None


def _xformers_rules_out(call, params) -> str | None:
    if params.get("sinks", 0):
        return "xformers' local-attention bias has no sink keys (sinks > 0); the torch and flex backends do"
    return no_key_padding(call, params)


add(
    VariantSpec(
        name="sliding_window",
        summary="exact softmax attention over keys within `window` of the query (causal: window+1 keys)",
        exact=True,
        cost="O(N·window·D)",
        params={
            "window": Param(
                "window",
                256,
                "keys seen on each side: i−window ≤ j ≤ i+window (causal: i−window ≤ j ≤ i); "
                "FlashAttention window_size=(window, window) / (window, 0)",
                int_at_least(0),
            ),
            "sinks": Param(
                "sinks",
                0,
                "first keys visible to every query (causal: to those at or after them); StreamingLLM's attention sinks",
                int_at_least(0),
            ),
        },
        supports=Supports(dropout=True),
        impls={
            "torch": Impl(sliding_window_torch, dropout=True),
            "flex": Impl(sliding_window_flex, skip_in_auto=flex_skip_in_auto),
            "xformers": Impl(sliding_window_xformers, rules_out=_xformers_rules_out),
            "math": Impl(sliding_window_reference, dropout=True, double_backward=True),
        },
        mask_fn=sliding_window_mask,
        visible_keys=sliding_window_visible_keys,
        cache_family="window",
        # Inside the sequence, none, one key, and wider than the sequence; sinks in and past it.
        examples=(
            {"window": 5},
            {"window": 0},
            {"window": 1},
            {"window": 50},
            {"window": 3, "sinks": 2},
            {"window": 0, "sinks": 50},
        ),  # fmt: skip
    )
)
