"""``hybrid`` — exact attention on a ``topk_block`` selection plus a compressed estimate of the rest.

Both parts share one softmax. Keys the selection leaves out are compressed into *pseudo-keys*:
a group ``G`` of unselected keys enters as one key with

    logit  scale·q·mean(k_G) + log|G|,    value  mean(v_G)        (padded keys excluded)

and the output is the log-sum-exp merge of the exact part and the compressed part (Scatterbrain's
sparse + low-rank sharing one normaliser). Equivalently: exact softmax attention in which every
unselected key of ``G`` is scored with the group's mean score ``scale·q·mean(k_G)`` — so the
returned weights ``(B, H, Nq, Nk)`` are those of real keys and ``out = weights·v`` exactly.
``remainder="none"`` drops the compressed part (``topk_block`` exactly); ``density=1`` selects
every reachable block (``full`` exactly).

**Groups.** Keys are cut into chunks of ``remainder_block`` keys (dividing ``block_size``).
For each query block, the chunks outside its local zone are grouped walking away from the
diagonal — to the left over ``[0, left_end)``, and, non-causal, to the right over
``[right_start, end)`` — H-Transformer-1D's coarsening:

    level 0 takes remainder_near groups of 1 chunk, then one more if needed so that the rest
    is aligned to 2 chunks; level 1 takes remainder_near groups of 2 chunks (+1 to align to 4);
    level ℓ groups of 2^ℓ chunks, aligned to multiples of 2^ℓ; … until the sequence ends.

``remainder_near=None`` keeps every chunk its own group. In key blocks: ``left_end = d + 1 −
max(local_blocks, 1)`` and ``right_start = d + local_blocks`` (``d`` the row's diagonal block);
causal, ``left_end = min(d + 1 − local_blocks, c)`` with ``c`` the blocks complete at the row's
first query, so that every pseudo-key is made of keys that every query of the row sees (the
compressed part is strictly causal too). Selected keys inside a group are left out of it (they
are exact); a group left empty is dropped.

Cost: the selection and its exact part as ``topk_block``, plus O(B·H·N·S·(D + Dv)) for ``S``
pseudo-keys per query: ``S ≈ remainder_near·log₂(Nk / (remainder_near·remainder_block))``
(O(N·log N) overall), or ``Nk / remainder_block`` with ``remainder_near=None`` (quadratic with
a small constant). Group sums come from dyadic tables of chunk sums, O(N·D) memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..backends.math import masked_softmax
from ..backends.partial import merge_partials
from ..backends.workers import default_workers, run_tasks
from ..estimators import block_sums, num_blocks
from ..inputs import causal_offset, repeat_kv
from ..registry import Impl, Param, Supports, VariantSpec, add, int_at_least, one_of
from ..selection import Selection, diagonal_blocks, ratio, visible_per_tile
from .block_sparse import block_attention
from .topk_block import check_selection_params, selection_params, topk_selection

#: Query rows × pseudo-keys of the compressed part computed at once without autograd.
COMPRESSED_ELEMENTS = 1 << 22


def _none_or_positive(value: Any) -> str | None:
    if value is None:
        return None
    return int_at_least(1)(value)


def _check_params(p: Mapping[str, Any]) -> str | None:
    problem = check_selection_params(p)
    if problem:
        return problem
    r = p["remainder_block"]
    if r is not None and (r > p["block_size"] or p["block_size"] % r):
        return (
            f"remainder_block={r} must divide block_size={p['block_size']} (compression as fine as a block or "
            "finer); accepted: a divisor of block_size, or None for block_size"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Groups: the fast, vectorised form, then the naive one.


@dataclass(frozen=True)
class Groups:
    """The pseudo-key groups of every query block, as dyadic (level, unit) slots.

    ``level``/``unit`` int64 ``(nq_blocks, S)``: slot ``s`` of row ``a`` covers chunks
    ``[unit·2^level, (unit+1)·2^level)``; ``valid`` bool ``(nq_blocks, S)`` marks real slots.
    Slots run left side first (level by level, nearest first), then the right side.
    ``left``/``right`` int64 ``(nq_blocks, levels + 1)``: the chunk where each level starts
    (the left side walks down, the right side up). ``width``: slots per level and side
    (``near + 1``; without coarsening one level of ``chunks`` slots, slot = chunk).
    """

    level: torch.Tensor
    unit: torch.Tensor
    valid: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    width: int
    levels: int
    left_slots: int
    chunk: int
    chunks: int
    coarsen: bool


def region_bounds(
    nq: int, nk: int, block_size: int, *, causal: bool, local_blocks: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left_end, right_start)`` int64 ``(nq_blocks,)`` in key blocks (module docstring); causal
    rows have ``right_start = nk_blocks`` (no right side)."""
    bs = block_size
    nkb = num_blocks(nk, bs)
    d = diagonal_blocks(nq, nk, bs, device)
    if causal:
        first = torch.arange(num_blocks(nq, bs), device=device) * bs + causal_offset(nq, nk)
        last_key = torch.clamp((torch.arange(nkb, device=device) + 1) * bs, max=nk) - 1
        complete = (last_key[None, :] <= first[:, None]).sum(-1)
        left = torch.minimum(d + 1 - local_blocks, complete).clamp_min(0)
        return left, torch.full_like(left, nkb)
    left = (d + 1 - max(local_blocks, 1)).clamp_min(0)
    return left, (d + local_blocks).clamp_max(nkb)


def _walk(start: torch.Tensor, near: int, nc: int, *, down: bool):
    """One side's dyadic walk for every row: per level, ``(units, valid)`` of its ``near + 1``
    slots, and the chunk where each level starts."""
    W = near + 1
    j = torch.arange(W, device=start.device)[None, :]
    cur, level, slots, starts = start.clone(), 0, [], []
    while True:
        starts.append(cur.clone())
        u = cur >> level
        if down:
            e = torch.where(u > near, near + ((u - near) & 1), u)  # then u − e is even
            slots.append(((u[:, None] - 1 - j).clamp_min(0), j < e[:, None]))
            cur = (u - e) << level
            done = bool((cur == 0).all())
        else:
            # A row that reached the end stays there (its cur may not be aligned any more).
            avail = torch.where(cur >= nc, 0, (-(-nc // (1 << level)) - u).clamp_min(0))
            e = torch.where(avail > near, near + ((u + near) & 1), avail)  # then u + e is even
            slots.append((u[:, None] + j, j < e[:, None]))
            cur = torch.where(cur >= nc, cur, (u + e) << level)
            done = bool((cur >= nc).all())
        level += 1
        if done:
            return slots, starts


def remainder_groups(
    nq: int, nk: int, block_size: int, *, causal: bool, local_blocks: int, chunk: int, near: int | None, device=None
) -> Groups:
    """The groups of the module docstring for every query block, vectorised over rows."""
    cpb = block_size // chunk
    nc = num_blocks(nk, chunk)
    left_b, right_b = region_bounds(nq, nk, block_size, causal=causal, local_blocks=local_blocks, device=device)
    left_end, right_start = torch.clamp(left_b * cpb, max=nc), torch.clamp(right_b * cpb, max=nc)
    nqb = left_end.shape[0]
    if near is None:
        c = torch.arange(nc, device=device)[None, :].expand(nqb, nc)
        valid = (c < left_end[:, None]) | (c >= right_start[:, None])
        return Groups(torch.zeros_like(c), c, valid, left_end[:, None], right_start[:, None], nc, 1, nc, chunk, nc,
                      False)  # fmt: skip
    W = near + 1
    left, lstarts = _walk(left_end, near, nc, down=True)
    right, rstarts = ([], []) if causal else _walk(right_start, near, nc, down=False)
    levels = max(len(left), len(right))
    lstarts += [torch.zeros_like(left_end)] * (levels + 1 - len(lstarts))
    rstarts += [torch.full_like(left_end, nc)] * (levels + 1 - len(rstarts))
    lv = [torch.full((nqb, W), lvl, device=device) for side in (left, right) for lvl in range(len(side))]
    valid = torch.cat([ok for _, ok in left + right], 1)
    unit = torch.cat([u for u, _ in left + right], 1) * valid  # unused slots read unit 0
    return Groups(
        level=torch.cat(lv, 1), unit=unit, valid=valid, left=torch.stack(lstarts, 1),
        right=torch.stack(rstarts, 1), width=W, levels=levels, left_slots=len(left) * W, chunk=chunk, chunks=nc,
        coarsen=True,
    )  # fmt: skip


def slot_of_chunk(groups: Groups, rows: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
    """The slot of chunk ``chunks[i]`` in row ``rows[i]`` (int64, −1 where the chunk is in no group)."""
    if not groups.coarsen:
        return torch.where(groups.valid[rows, chunks], chunks, -1)
    left, right = groups.left[rows], groups.right[rows]  # (n, levels + 1)
    c, W = chunks[:, None], groups.width
    # Left side: level ℓ covers [left[ℓ+1], left[ℓ]); its slots run from the diagonal outwards.
    lvl = (left[:, 1:] > c).sum(1)
    start = left.gather(1, lvl[:, None])[:, 0]
    slot_l = lvl * W + (start >> lvl) - 1 - (chunks >> lvl)
    # Right side: level ℓ covers [right[ℓ], right[ℓ+1]).
    rlvl = (right[:, 1:] <= c).sum(1)
    rstart = right.gather(1, rlvl[:, None])[:, 0]
    slot_r = groups.left_slots + rlvl * W + (chunks >> rlvl) - (rstart >> rlvl)
    return torch.where(chunks < left[:, 0], slot_l, torch.where(chunks >= right[:, 0], slot_r, -1))


def remainder_groups_naive(
    nq: int, nk: int, block_size: int, *, causal: bool, local_blocks: int, chunk: int, near: int | None
) -> list[list[tuple[int, int]]]:
    """Per query block, the key ranges ``[start, stop)`` of its groups, walked with plain loops
    from the module docstring's rules (the reference for :func:`remainder_groups`)."""
    bs, off = block_size, causal_offset(nq, nk)
    nkb, nc = num_blocks(nk, bs), num_blocks(nk, chunk)
    cpb = bs // chunk
    rows = []
    for a in range(num_blocks(nq, bs)):
        last_q = min((a + 1) * bs, nq) - 1
        d = min(max((last_q + off) // bs, 0), nkb - 1)
        if causal:
            complete = sum(1 for b in range(nkb) if min((b + 1) * bs, nk) - 1 <= a * bs + off)
            left, right = max(0, min(d + 1 - local_blocks, complete)), nkb
        else:
            left, right = max(0, d + 1 - max(local_blocks, 1)), min(nkb, d + local_blocks)
        left, right = min(left * cpb, nc), min(right * cpb, nc)
        ranges = []
        if near is None:
            ranges = [(c, c + 1) for c in range(nc) if c < left or c >= right]
        else:
            cur, size, taken = left, 1, 0
            while cur > 0:
                if taken >= near and cur % (2 * size) == 0:
                    size, taken = size * 2, 0
                    continue
                ranges.append((cur - size, cur))
                cur, taken = cur - size, taken + 1
            cur, size, taken = right, 1, 0
            while cur < nc:
                if taken >= near and cur % (2 * size) == 0:
                    size, taken = size * 2, 0
                    continue
                ranges.append((cur, cur + size))
                cur, taken = cur + size, taken + 1
        rows.append([(s * chunk, min(e * chunk, nk)) for s, e in ranges])
    return rows


# ---------------------------------------------------------------------------------------------
# Pseudo-keys and the compressed part.


def _dyadic(t: torch.Tensor, levels: int) -> tuple[torch.Tensor, list[int]]:
    """Sums of ``t (..., n, E)`` over aligned runs of ``2^ℓ`` rows for ℓ < levels, concatenated
    along dim −2 and followed by one zero row (index −1); and the offset of each level."""
    n = t.shape[-2]
    size = 1 << max(0, (n - 1).bit_length())
    t = F.pad(t, (0, 0, 0, size - n))
    tables, offsets, at = [t], [0], t.shape[-2]
    for _ in range(1, levels):
        t = t.unflatten(-2, (-1, 2)).sum(-2) if t.shape[-2] > 1 else t
        offsets.append(at)
        at += t.shape[-2]
        tables.append(t)
    tables.append(torch.zeros_like(t[..., :1, :]))  # a zero row last, read by unused slots
    return torch.cat(tables, -2), offsets


@dataclass(frozen=True)
class ChunkSums:
    """Per chunk of ``groups.chunk`` keys: the sums of unpadded keys ``kk (B, Hkv, nc, D)``,
    values ``vv (…, Dv)`` and their count ``cc (B, nc)``; and the same summed over aligned runs
    of ``2^ℓ`` chunks for every level (``tk``, ``tv``, ``tc``; level ℓ starts at ``offsets[ℓ]``).
    O(N·(D + Dv)) memory."""

    kk: torch.Tensor
    vv: torch.Tensor
    cc: torch.Tensor
    tk: torch.Tensor
    tv: torch.Tensor
    tc: torch.Tensor
    offsets: torch.Tensor


def chunk_sums(k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, groups: Groups) -> ChunkSums:
    """The :class:`ChunkSums` of ``k``, ``v`` for ``groups`` (float32 at least)."""
    B, Hkv, nk, D = k.shape
    r = groups.chunk
    work = torch.promote_types(k.dtype, torch.float32)
    keep = None if key_padding_mask is None else (~key_padding_mask).to(work)
    kk = block_sums(k.to(work), r, keep)
    vv = block_sums(v.to(work), r, keep)
    ones = torch.ones(B, 1, nk, 1, dtype=work, device=k.device)
    cc = block_sums(ones, r, keep)[:, 0, :, 0]
    levels = groups.levels if groups.coarsen else 1
    tk, offsets = _dyadic(kk, levels)
    tv, _ = _dyadic(vv, levels)
    tc, _ = _dyadic(cc[..., None], levels)
    return ChunkSums(kk, vv, cc, tk, tv, tc[..., 0], torch.tensor(offsets, device=k.device))


def pseudo_keys(
    sums: ChunkSums, block_mask: torch.Tensor, groups: Groups, block_size: int, a0: int = 0, a1: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums of keys and values of the groups of query blocks ``a0 … a1 − 1``, selected keys
    removed: ``ksum (B, Hkv, rows, S', D)``, ``vsum (…, Dv)`` and ``counts (B, Hkv, rows, S')``
    (0 for empty or unused slots), ``S'`` the slots up to the last one these rows use.

    Group sums are read from the dyadic tables; then the chunks of selected blocks that fall
    inside a group are subtracted from it. O(B·Hkv·rows·S·(D + Dv)).
    """
    a1 = groups.level.shape[0] if a1 is None else a1
    B, Hkv, nc, D = sums.kk.shape
    Dv = sums.vv.shape[-1]
    # Slots past the last one any of these rows uses are dropped (early rows use few levels);
    # unused slots before it read the tables' last row, which is all zeros.
    valid = groups.valid[a0:a1]
    used = valid.any(0).nonzero()
    S = int(used.max()) + 1 if used.numel() else 1
    index = torch.where(valid[:, :S], sums.offsets[groups.level[a0:a1, :S]] + groups.unit[a0:a1, :S], -1)
    rows = index.shape[0]
    flat = index.reshape(-1)
    ksum = sums.tk[:, :, flat].reshape(-1, D)
    vsum = sums.tv[:, :, flat].reshape(-1, Dv)
    counts = sums.tc[:, flat].view(B, 1, rows, S).expand(B, Hkv, rows, S).reshape(-1)
    # Remove the selected blocks' chunks from the groups they fall in.
    cpb = block_size // groups.chunk
    b, h, a, blk = block_mask[:, :, a0:a1].nonzero(as_tuple=True)
    if b.numel():
        c = (blk[:, None] * cpb + torch.arange(cpb, device=blk.device)).reshape(-1)
        b, h, a = (x.repeat_interleave(cpb) for x in (b, h, a))
        ok = c < nc
        b, h, a, c = b[ok], h[ok], a[ok], c[ok]
        slot = slot_of_chunk(groups, a + a0, c)
        ok = slot >= 0
        b, h, a, c, slot = b[ok], h[ok], a[ok], c[ok], slot[ok]
        target = ((b * Hkv + h) * rows + a) * S + slot
        # In place on the freshly gathered sums (autograd allows it: they are no leaf or view).
        ksum.index_add_(0, target, sums.kk[b, h, c], alpha=-1)
        vsum.index_add_(0, target, sums.vv[b, h, c], alpha=-1)
        counts = counts.index_add(0, target, sums.cc[b, c], alpha=-1)
    return ksum.view(B, Hkv, rows, S, D), vsum.view(B, Hkv, rows, S, Dv), counts.view(B, Hkv, rows, S)


def compressed_rows(q, ksum, vsum, counts, scale):
    """Softmax of query rows ``q (n, T, D)`` over their pseudo-keys, given as key and value sums
    ``(n, S, ·)`` and key counts ``(n, S)`` (logit ``scale·q·mean(k) + log count``; a group of
    count 0 is absent; without autograd the sums are divided in place): ``(out, lse)``, a row
    without any pseudo-key zeros and −inf."""
    live = counts > 0.5
    n = counts.clamp_min(1.0)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, ksum, vsum))
    if grad:
        kbar, vbar = ksum / n[..., None], vsum / n[..., None]
    else:  # in place: fresh multi-MB buffers cost a page fault per page on some VMs
        kbar, vbar = ksum.div_(n[..., None]), vsum.div_(n[..., None])
    s = torch.baddbmm(
        torch.where(live, n.log(), float("-inf"))[:, None, :], q, kbar.transpose(1, 2), alpha=scale
    )  # (n, T, S)
    if not grad:
        # In place, as tile_attention: lse = max s − log(max p) (max p ≥ 1/S, well conditioned).
        top = s.amax(-1)
        torch.softmax(s, dim=-1, out=s)
        out, lse = torch.bmm(s, vbar), top - s.amax(-1).log()
        seen = live.any(-1)[:, None]
        if not bool(seen.all()):  # rows without any pseudo-key gave NaN: zeros and −inf
            out.masked_fill_(~seen[..., None], 0.0)
            lse.masked_fill_(~seen, float("-inf"))
        return out, lse
    # Unnormalised: p = exp(s − max), out = p·v / Σp, lse = max + log Σp. A row without any
    # pseudo-key has max −inf: shifted by 0 instead, its p is 0 (no NaN forward or backward).
    top = s.amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, 0.0)
    p = torch.exp(s - top)
    total = p.sum(-1, keepdim=True)
    seen = total > 0
    safe = torch.where(seen, total, 1.0)
    out = torch.bmm(p, vbar) / safe
    return out, torch.where(seen, top + safe.log(), float("-inf")).squeeze(-1)


def _compressed_chunk(qc, kk, vv, cc, tk, tv, tc, offsets, *, block_mask, groups, block_size, a0, a1, scale):
    # Pseudo-keys of query blocks a0 … a1 − 1 and the attention of their queries ``qc``
    # (B, Hkv, rows, G·bs, D) over them; the tensors come as arguments so that a checkpoint
    # recomputes this from them.
    ksum, vsum, counts = pseudo_keys(ChunkSums(kk, vv, cc, tk, tv, tc, offsets), block_mask, groups, block_size, a0, a1)
    B, Hkv, rows, S, D = ksum.shape
    out, lse = compressed_rows(
        qc.reshape(-1, qc.shape[-2], D), ksum.reshape(-1, S, D), vsum.reshape(-1, S, vsum.shape[-1]),
        counts.reshape(-1, S), scale,
    )  # fmt: skip
    return out.view(B, Hkv, rows, -1, out.shape[-1]), lse.view(B, Hkv, rows, -1)


def compressed_part(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    block_mask: torch.Tensor,
    groups: Groups,
    *,
    scale: float,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over its block's pseudo-keys: ``(out (B, H, Nq, Dv), lse (B, H, Nq))``
    in the work dtype (float32 at least); rows with no pseudo-key have ``lse = −inf``, ``out = 0``.

    A group ``G`` of unselected, unpadded keys is one pseudo-key with logit ``scale·q·mean(k_G) +
    log|G|`` and value ``mean(v_G)``. O(B·H·Nq·S·(D + Dv)) time; query blocks go in chunks of
    :data:`COMPRESSED_ELEMENTS` (their pseudo-keys built per chunk), checkpointed with autograd,
    so memory stays O(N·(D + Dv)) beyond the output.
    """
    B, H, nq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G, bs = H // Hkv, block_size
    nqb, S = groups.level.shape
    sums = chunk_sums(k, v, key_padding_mask, groups)
    work = sums.kk.dtype
    qp = q.to(work) if nq == nqb * bs else F.pad(q.to(work), (0, 0, 0, nqb * bs - nq))
    # Rows (b, kv head, query block) each hold the G·bs queries of that block and kv head.
    qr = qp.view(B, Hkv, G, nqb, bs, D).permute(0, 1, 3, 2, 4, 5).reshape(B, Hkv, nqb, G * bs, D)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    step = max(1, COMPRESSED_ELEMENTS // max(1, B * Hkv * S * max(D, Dv, G * bs)))
    # Large CPU calls without autograd run their chunks on single-threaded workers
    # (backends/workers.py), at least one chunk each.
    large = q.device.type == "cpu" and not grad and B * H * nq * S >= COMPRESSED_ELEMENTS
    workers = default_workers() if large else 1
    step = min(step, -(-nqb // workers))
    starts = range(0, nqb, step)
    tensors = (sums.kk, sums.vv, sums.cc, sums.tk, sums.tv, sums.tc, sums.offsets)

    def chunk(a0: int) -> tuple[torch.Tensor, torch.Tensor]:
        run = partial(_compressed_chunk, block_mask=block_mask, groups=groups, block_size=bs, a0=a0,
                      a1=min(nqb, a0 + step), scale=scale)  # fmt: skip
        if grad:
            return checkpoint(run, qr[:, :, a0 : a0 + step], *tensors, use_reentrant=False)
        return run(qr[:, :, a0 : a0 + step], *tensors)

    if grad or len(starts) == 1:
        parts = [chunk(a0) for a0 in starts]
        out, lse = (
            parts[0] if len(parts) == 1 else (torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2))
        )
    else:
        # Chunks written into one output, not concatenated (each task its own query blocks).
        out, lse = qr.new_empty(B, Hkv, nqb, G * bs, Dv), qr.new_empty(B, Hkv, nqb, G * bs)

        def run_chunk(i: int, _: None) -> None:
            a0 = starts[i]
            out[:, :, a0 : a0 + step], lse[:, :, a0 : a0 + step] = chunk(a0)

        run_tasks(run_chunk, len(starts), lambda: None, workers=workers)
    # (B, Hkv, nqb, G·bs, ·) -> (B, H, Nq, ·)
    out = out.view(B, Hkv, nqb, G, bs, Dv).permute(0, 1, 3, 2, 4, 5).reshape(B, H, nqb * bs, Dv)[:, :, :nq]
    lse = lse.view(B, Hkv, nqb, G, bs).permute(0, 1, 3, 2, 4).reshape(B, H, nqb * bs)[:, :, :nq]
    return out, lse


def compressed_part_naive(q, k, v, key_padding_mask, block_mask, ranges, *, scale, block_size):
    """:func:`compressed_part` from group key ranges, with loops: each group's unselected,
    unpadded keys give one pseudo-key ``(mean k, mean v, log count)``; float64 ``(out, lse)``."""
    B, H, nq, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G, bs = H // Hkv, block_size
    out = torch.zeros(B, H, nq, Dv, dtype=torch.float64)
    lse = torch.full((B, H, nq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for hk in range(Hkv):
            for a, row in enumerate(ranges):
                keys = []
                for start, stop in row:
                    members = [
                        j for j in range(start, stop)
                        if not bool(block_mask[b, hk, a, j // bs])
                        and (key_padding_mask is None or not bool(key_padding_mask[b, j]))
                    ]  # fmt: skip
                    if members:
                        keys.append(members)
                if not keys:
                    continue
                kbar = torch.stack([k[b, hk, m].double().mean(0) for m in keys])
                vbar = torch.stack([v[b, hk, m].double().mean(0) for m in keys])
                logn = torch.tensor([float(len(m)) for m in keys], dtype=torch.float64).log()
                for h in range(hk * G, (hk + 1) * G):
                    qs = q[b, h, a * bs : min((a + 1) * bs, nq)].double()
                    s = qs @ kbar.T * scale + logn
                    lse[b, h, a * bs : a * bs + qs.shape[0]] = torch.logsumexp(s, -1)
                    out[b, h, a * bs : a * bs + qs.shape[0]] = torch.softmax(s, -1) @ vbar
    return out, lse


# ---------------------------------------------------------------------------------------------
# The variant.


def _groups_for(nq, nk, params, causal, device) -> Groups:
    return remainder_groups(
        nq, nk, params["block_size"], causal=causal, local_blocks=params["local_blocks"],
        chunk=params["remainder_block"] or params["block_size"], near=params["remainder_near"], device=device,
    )  # fmt: skip


def hybrid_selection(q, k, *, causal, key_padding_mask, scale, remainder, remainder_block, remainder_near, **params):
    """The selection of a ``hybrid`` call: ``topk_block``'s, with ``compressed_density`` counted
    from the non-empty groups (one pseudo-key entry per query of the row)."""
    sel = topk_selection(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale, **params)
    if remainder == "none":
        return sel
    B, H, nq, _ = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    bs = sel.block_size
    groups = _groups_for(nq, nk, dict(params, remainder_block=remainder_block, remainder_near=remainder_near),
                         causal, q.device)  # fmt: skip
    # Group sizes only: the pseudo-key sums of 1-dim zero keys and values.
    z = torch.zeros(B, Hkv, nk, 1, device=q.device)
    counts = pseudo_keys(chunk_sums(z, z, key_padding_mask, groups), sel.block_mask, groups, bs)[2]
    queries = torch.clamp(nq - torch.arange(counts.shape[2], device=q.device) * bs, max=bs)  # per query block
    entries = float(((counts > 0.5).sum(-1) * queries).sum()) * (H // Hkv)
    visible = visible_per_tile(nq, nk, bs, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    reachable = float(visible.expand(B, -1, -1).sum()) * H
    return Selection(
        block_mask=sel.block_mask, block_size=bs, density=sel.density, compressed_density=ratio(entries, reachable),
        nq=nq, nk=nk, heads=H, causal=causal, key_padding_mask=key_padding_mask, scores=sel.scores,
    )  # fmt: skip


def hybrid_reference(
    q, k, v, *, causal, key_padding_mask, scale, return_weights=False, remainder, remainder_block, remainder_near,
    **params,
):  # fmt: skip
    """Dense masked softmax in which each unselected key of a group is scored with the group's
    mean score: the ``math`` backend (O(Nq·Nk)), the one that returns weights."""
    sel = topk_selection(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale, **params)
    B, H, nq, _ = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    G, bs = H // Hkv, params["block_size"]
    work = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(work), repeat_kv(k, H).to(work).transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    mask = sel.dense()
    if remainder != "none":
        ranges = remainder_groups_naive(
            nq, nk, bs, causal=causal, local_blocks=params["local_blocks"], chunk=remainder_block or bs,
            near=remainder_near,
        )  # fmt: skip
        # group[b, h, i, j]: the group of key j in query i's row (−1: none); selected and padded keys excluded.
        group = torch.full((B, Hkv, nq, nk), -1, dtype=torch.int64, device=q.device)
        unselected = ~sel.block_mask.repeat_interleave(bs, -1)[..., :nk]  # (B, Hkv, nqb, Nk)
        if key_padding_mask is not None:
            unselected = unselected & ~key_padding_mask[:, None, None, :]
        for a, row in enumerate(ranges):
            rows = slice(a * bs, min((a + 1) * bs, nq))
            for g, (start, stop) in enumerate(row):
                member = unselected[:, :, a, start:stop]  # (B, Hkv, len)
                group[:, :, rows, start:stop] = torch.where(member, g, -1)[:, :, None, :]
        group = group.repeat_interleave(G, dim=1)
        grouped = group >= 0
        idx = group.clamp_min(0)
        sums = torch.zeros_like(s).scatter_add_(-1, idx, s * grouped)
        sizes = torch.zeros_like(s).scatter_add_(-1, idx, grouped.to(s.dtype))
        mean = sums.gather(-1, idx) / sizes.gather(-1, idx).clamp_min(1.0)
        s = torch.where(grouped, mean, s)
        mask = mask | grouped
    weights = masked_softmax(s, mask)
    out = torch.matmul(weights, repeat_kv(v, H).to(work)).to(q.dtype)
    return out, (weights.to(q.dtype) if return_weights else None)


def hybrid_torch(
    q, k, v, *, causal, key_padding_mask, scale, return_weights=False, remainder, remainder_block, remainder_near,
    **params,
):  # fmt: skip
    """The selection; its exact part through block_sparse's tiled kernel, with each query's
    log-sum-exp; the pseudo-keys' part (:func:`compressed_part`); their log-sum-exp merge."""
    sel = topk_selection(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale, **params)
    bs = sel.block_size
    kw = dict(block_size=bs, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if remainder == "none":
        return block_attention(q, k, v, sel.block_mask, **kw), None
    out_exact, lse_exact = block_attention(q, k, v, sel.block_mask, return_lse=True, **kw)
    full = dict(params, remainder_block=remainder_block, remainder_near=remainder_near)
    groups = _groups_for(q.shape[2], k.shape[2], full, causal, q.device)
    out_rest, lse_rest = compressed_part(q, k, v, key_padding_mask, sel.block_mask, groups, scale=scale, block_size=bs)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    out_exact = out_exact.to(out_rest.dtype)
    # Without autograd, merged in place: no third output-sized buffer.
    inplace = not grad and out_exact.is_contiguous() and out_rest.is_contiguous()
    out, _ = merge_partials(out_exact, lse_exact, out_rest, lse_rest, inplace=inplace)
    return out.to(q.dtype), None


def hybrid_params() -> dict[str, Param]:
    params = selection_params()
    params.update(
        remainder=Param(
            "remainder",
            "block_mean",
            "'block_mean': unselected keys enter as group-mean pseudo-keys in the same softmax; 'none': topk_block",
            one_of("block_mean", "none"),
        ),
        remainder_block=Param(
            "remainder_block",
            None,
            "keys per finest pseudo-key; divides block_size (None: block_size)",
            _none_or_positive,
        ),
        remainder_near=Param(
            "remainder_near",
            8,
            "finest pseudo-keys on each side before they double in size (and again every remainder_near); "
            "None: no coarsening (quadratic compressed part)",
            _none_or_positive,
        ),
    )
    return params


add(
    VariantSpec(
        name="hybrid",
        summary="topk_block's exact blocks plus the rest as group-mean pseudo-keys in one softmax (Scatterbrain-like)",
        exact=False,
        cost="estimator + O(nnz_blocks·block_size²·D + N·S·D), S ≈ remainder_near·log(N)",
        params=hybrid_params(),
        supports=Supports(),
        impls={"torch": Impl(hybrid_torch), "math": Impl(hybrid_reference)},
        check_params=_check_params,
        selection_fn=hybrid_selection,
        cache_family="block_select",
        examples=(
            {"block_size": 4, "density": 0.3},
            {"block_size": 4, "density": 0.25, "remainder_block": 2, "remainder_near": 2, "estimator": "key_pool"},
            {"block_size": 8, "mass": 0.6, "remainder_block": 2, "remainder_near": 1, "sink_blocks": 0},
            {"block_size": 4, "density": 0.3, "remainder": "none"},
        ),
    )
)
