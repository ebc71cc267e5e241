"""``block_sparse`` — exact softmax attention over the union of allowed ``block_size`` tiles.

    query i sees key j  iff  layout[i // block_size, j // block_size]
                             (and, with causal=True, j ≤ i + Nk − Nq, applied element by element)

The layout is a bool ``(Nq_blocks, Nk_blocks)`` tensor — or ``(H, Nq_blocks, Nk_blocks)`` per
head — given as ``layout=`` or built from a named ``pattern=`` (local, strided, fixed,
longformer, bigbird: see :mod:`sparse_linear_attn.patterns`).

Block positions are bottom-right aligned like ``causal``: query block ``a`` sits at key block
``a + Nk_blocks − Nq_blocks``. With ``causal=True`` the causal mask is applied inside tiles, so
diagonal tiles are lower-triangular and nothing leaks from the future. Lengths that are not a
multiple of ``block_size`` work: the last blocks are short, their missing keys never get weight.
Shapes ``(batch, heads, seq, head_dim)``: q ``(B, H, Nq, D)``, k ``(B, Hkv, Nk, D)``,
v ``(B, Hkv, Nk, Dv)``.

Cost of the ``torch`` backend: O(B·H·nnz_blocks·block_size²·D) time. Query blocks are sorted
by how many key blocks they see and processed in bounded groups; each group gathers only its
active key tiles (:func:`group_budget` elements at a time), so memory never holds an ``Nq×Nk``
tensor. The attention of a group runs through SDPA, or, on CPU without grad in float32/64,
through :func:`~sparse_linear_attn.backends.tiles.tile_attention` with buffers reused by every
group. With attention dropout a group runs through
:func:`~sparse_linear_attn.backends.dropout.dropout_attention` (explicit tile weights with the
positional mask of the ``math`` backend), under a per-group mask.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..backends.dropout import Dropout, dropout_attention, query_rows
from ..backends.flex import cached_block_mask, flex_run, flex_skip_in_auto, layout_block_mask
from ..backends.math import dense_attention
from ..backends.partial import partial_attention
from ..backends.sdpa import masked_sdpa, open_empty_rows
from ..backends.tiles import tile_attention, use_bmm_tiles
from ..backends.workers import run_tasks
from ..errors import ParameterError, unknown_name_message
from ..estimators import num_blocks
from ..inputs import causal_offset, full_visibility
from ..patterns import PATTERNS, layout_elements, pattern_rule, shared_pattern_layout
from ..registry import SEED_RANGE, Impl, Param, Supports, VariantSpec, add, int_at_least

#: Elements of the gathered key (and value) tiles built at once, on CPU without autograd. Small
#: on purpose: a group's copies should stay in cache and under glibc's mmap threshold (32 MiB),
#: above which every group's buffers are freshly mapped and page-faulted in (docs/sparse.md).
GROUP_ELEMENTS = 1 << 20
#: With autograd each group is a checkpointed node: fewer, larger ones measured faster.
GRAD_GROUP_ELEMENTS = 1 << 22
#: On accelerators (unmeasured here) larger groups mean fewer kernel launches.
DEVICE_GROUP_ELEMENTS = 1 << 23
#: Gathered key-tile elements of a CPU call without autograd from which its groups run on
#: single-threaded workers, one per torch thread (:mod:`~sparse_linear_attn.backends.workers`).
#: Below it torch's own threads were as fast or faster (docs/sparse.md): the hand-over, fresh
#: per-worker buffers and the caller's OpenMP threads still spinning cost more than they save.
PARALLEL_ELEMENTS = 1 << 26
#: Rows of one width needed to give them a group of their own with a shared constant mask.
MIN_UNIFORM_ROWS = 8


def check_layout(layout: Any, nq_blocks: int, nk_blocks: int, heads: int | None = None) -> torch.Tensor:
    """Validate a user layout (bool tensor or nested lists of bools) and return it as a tensor."""
    expected = f"(Nq_blocks, Nk_blocks) = ({nq_blocks}, {nk_blocks}) or (H, {nq_blocks}, {nk_blocks})"
    if isinstance(layout, (list, tuple)):
        try:
            layout = torch.tensor(layout)
        except Exception as e:  # ragged lists
            raise ParameterError(f"block_sparse layout: could not read the nested list as a tensor: {e}") from None
    if not isinstance(layout, torch.Tensor):
        raise ParameterError(f"block_sparse layout must be a bool tensor {expected}, got {type(layout).__name__}")
    if layout.dtype != torch.bool:
        raise ParameterError(f"block_sparse layout must have dtype torch.bool, got {layout.dtype}")
    if layout.dim() not in (2, 3) or tuple(layout.shape[-2:]) != (nq_blocks, nk_blocks):
        raise ParameterError(
            f"block_sparse layout has shape {tuple(layout.shape)}; for these lengths and block_size "
            f"it must be {expected}"
        )
    if layout.dim() == 3 and heads is not None and layout.shape[0] != heads:
        raise ParameterError(
            f"block_sparse per-head layout has {layout.shape[0]} heads but q has {heads}; expected {expected}"
        )
    return layout


def resolve_layout(nq: int, nk: int, *, causal: bool, heads: int | None = None, **params) -> torch.Tensor:
    """The block layout ``(nqb, nkb)`` or ``(H, nqb, nkb)`` for a call, from ``layout`` or ``pattern``."""
    bs = params["block_size"]
    nqb, nkb = num_blocks(nq, bs), num_blocks(nk, bs)
    if params.get("layout") is not None:
        return check_layout(params["layout"], nqb, nkb, heads)
    names = ("num_local_blocks", "num_global_blocks", "num_random_blocks", "stride", "seed")
    return shared_pattern_layout(
        params.get("pattern") or "local", nqb, nkb, causal=causal, **{n: params[n] for n in names if n in params}
    )


def layout_rows(query_blocks: torch.Tensor, nk_blocks: int, **params) -> torch.Tensor:
    """Rows ``query_blocks`` of the causal layout of a call with ``Nq == Nk``, over key blocks
    ``0 .. nk_blocks − 1``: bool ``(len, nk_blocks)`` or ``(H, len, nk_blocks)`` for a per-head
    ``layout``. For a named pattern a row does not depend on the sequence length
    (:func:`~sparse_linear_attn.patterns.pattern_rule`), so a decoding step gets the rows the
    one-shot call uses; a given ``layout`` must be square and cover the blocks asked for.
    """
    lay = params.get("layout")
    if lay is not None:
        lay = torch.as_tensor(lay)
        return lay[..., query_blocks.to(lay.device), :nk_blocks].cpu()
    names = ("num_local_blocks", "num_global_blocks", "num_random_blocks", "stride", "seed")
    return pattern_rule(
        params.get("pattern") or "local",
        query_blocks,
        nk_blocks,
        causal=True,
        **{n: params[n] for n in names if n in params},
    )


def block_sparse_mask(nq: int, nk: int, *, causal: bool = False, **params) -> torch.Tensor:
    """Bool ``(nq, nk)`` or ``(H, nq, nk)``: the element mask of the layout (causal applied by the caller)."""
    return layout_elements(resolve_layout(nq, nk, causal=causal, **params), params["block_size"], nq, nk)


def _clamped_sum(lo: torch.Tensor, hi: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """``Σ_{t=lo}^{hi−1} clamp(t, 0, cap)`` elementwise (int64), in closed form."""

    def upto(T):  # Σ_{t=0}^{T−1} clamp(t, 0, cap)
        T = T.clamp_min(0)
        return torch.where(T <= cap + 1, T * (T - 1) // 2, cap * (cap + 1) // 2 + (T - cap - 1) * cap)

    return upto(hi) - upto(lo)


def block_sparse_visible_keys(nq: int, nk: int, *, causal: bool = False, **params) -> float:
    """Average keys per query (over queries and heads) that the layout lets through, causal
    applied element by element, ragged edges included: O(nq_blocks·nk_blocks), no dense mask."""
    layout = resolve_layout(nq, nk, causal=causal, **params)
    bs = params["block_size"]
    nqb, nkb = layout.shape[-2:]
    q_lo = torch.arange(nqb, dtype=torch.int64)[:, None] * bs
    q_hi = (q_lo + bs).clamp_max(nq)
    k_lo = torch.arange(nkb, dtype=torch.int64)[None, :] * bs
    k_len = (nk - k_lo).clamp_max(bs)
    if causal:
        # Row i sees clamp(i + off − k_lo + 1, 0, k_len) keys of key block b.
        shift = causal_offset(nq, nk) - k_lo + 1
        per_tile = _clamped_sum(q_lo + shift, q_hi + shift, k_len)
    else:
        per_tile = (q_hi - q_lo) * k_len
    total = (layout.to(torch.int64) * per_tile).sum(dim=(-2, -1))
    return float(total.double().mean()) / nq


def block_sparse_reference(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, dropout=None, **params):
    """Dense masked softmax over the expanded layout: the ``math`` backend (O(Nq·Nk))."""
    nq, nk = q.shape[2], k.shape[2]
    pattern = block_sparse_mask(nq, nk, causal=causal, heads=q.shape[1], **params).to(q.device)
    mask = full_visibility(nq, nk, causal=causal, key_padding_mask=key_padding_mask, pattern=pattern)
    return dense_attention(q, k, v, scale=scale, mask=mask, return_weights=return_weights, dropout=dropout)


def _row_plan(layout: torch.Tensor, causal: bool, nq: int, nk: int, bs: int):
    """Rows (query blocks, or ``head·nqb + block`` for per-head layouts), sorted so that rows of
    one width (and one kind, see below) are contiguous: ``(order, counts, cols, simple)``.

    ``cols[r]`` lists row ``r``'s key blocks, visible ones first in column order. ``simple[r]``
    is True where the row's only partial tile is, under ``causal`` with ``Nq == Nk``, its
    diagonal one, placed last: such rows of equal width share one constant mask.
    """
    nqb, nkb = layout.shape[-2:]
    lay = layout.to(torch.bool)
    a = torch.arange(nqb)[:, None]
    if causal:
        # Tiles entirely in the future are dropped here; the diagonal ones are masked in _group.
        first_key = torch.arange(nkb)[None, :] * bs
        lay = lay & (first_key <= torch.clamp((a + 1) * bs, max=nq) - 1 + causal_offset(nq, nk))
    lay = lay.expand(*lay.shape[:-2], nqb, nkb).reshape(-1, nkb)
    counts = lay.sum(-1)
    cols = torch.argsort(lay.to(torch.int8), dim=-1, descending=True, stable=True)
    last = cols.gather(1, (counts - 1).clamp(min=0)[:, None])[:, 0]
    block = torch.arange(lay.shape[0]) % nqb
    simple = (last == block) if (causal and nq == nk) else torch.zeros_like(counts, dtype=torch.bool)
    order = torch.argsort(counts * 2 + simple.to(counts.dtype), stable=True)
    return order, counts, cols, simple


def group_budget(device: torch.device, grad: bool) -> int:
    """Elements of gathered tiles per group (see :data:`GROUP_ELEMENTS`)."""
    if device.type != "cpu":
        return DEVICE_GROUP_ELEMENTS
    return GRAD_GROUP_ELEMENTS if grad else GROUP_ELEMENTS


def _diagonal_mask(c: int, bs: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive ``(bs, c·bs)`` mask: ``c − 1`` visible tiles, then the causal diagonal tile.

    Additive (0 / −inf in the query dtype) because SDPA would otherwise convert a bool mask
    on every call; every row keeps its diagonal element, so no row is all −inf.
    """
    r = torch.arange(bs, device=device)
    mask = torch.zeros(bs, c * bs, dtype=dtype, device=device)
    mask[:, (c - 1) * bs :].masked_fill_(r[None, :] > r[:, None], float("-inf"))
    return mask


#: Scratch lent to every group of one worker without autograd: (q tiles, k tiles, v tiles, scores).
_Buffers = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]


@dataclass
class _TilePlan:
    """What every group of one call shares (see :func:`block_attention`)."""

    bs: int
    nq: int
    nk: int
    causal: bool
    scale: float
    # "shared": layout (nqb, nkb), rows are query blocks, every batch row and head at once;
    # "head": layout (H, nqb, nkb), rows are head·nqb + block, one head each;
    # "batch_kv": layout (B, Hkv, nqb, nkb), rows are (b·Hkv + kv head)·nqb + block, each with
    # the query heads of its kv head (they share the gathered tiles).
    rows: str
    counts: torch.Tensor  # (rows,) visible key blocks of each row
    cols: torch.Tensor  # (rows, nkb) key blocks of each row, visible ones first
    # A query can end up seeing nothing (padding, a causal offset off the block grid): such
    # rows are opened to every key and zeroed afterwards (backends.sdpa.open_empty_rows).
    fix_empty: bool
    bmm: bool  # run tiles through tile_attention (CPU, no grad, float32/64) instead of SDPA
    lse: bool = False  # also return each query's log-sum-exp (float32 at least; −inf: no key)
    dropout: Dropout | None = None  # attention dropout: groups run dropout_attention


def _group_mask(plan: _TilePlan, kpm, rows, kb, nqp: int, nkp: int, kv_heads: int) -> torch.Tensor:
    """Bool ``(g, B|1, bs|1, c·bs)``: which gathered keys each query of the group may see."""
    bs, nk, dev = plan.bs, plan.nk, rows.device
    g, c = kb.shape
    a = rows % (nqp // bs)
    ar = torch.arange(bs, device=dev)
    j = (kb[:, :, None] * bs + ar).flatten(1)  # (g, c·bs) key positions
    used = (torch.arange(c, device=dev)[None, :] < plan.counts[rows][:, None]).repeat_interleave(bs, 1)
    # Unused slots and keys past the end get a position no query may see.
    j = j.masked_fill(~used | (j >= nk), nk + nqp + nkp)
    if plan.causal:
        limit = a[:, None] * bs + ar + causal_offset(plan.nq, nk)
    else:
        limit = torch.full((g, 1), nk - 1, device=dev)
    mask = (j[:, None, :] <= limit[:, :, None])[:, None]
    if kpm is not None:
        j = j.clamp(max=nkp - 1)
        if plan.rows == "batch_kv":  # each row belongs to one batch row
            b = rows // (nqp // bs) // kv_heads
            mask = mask & ~kpm[b[:, None], j][:, None, None, :]
        else:
            mask = mask & ~kpm[:, j].transpose(0, 1)[:, :, None, :]
    return mask


def _group_heads(plan: _TilePlan, rows, B: int, H: int, Hkv: int, nqb: int):
    """``(batch, query heads, kv heads)`` index tensors of the given rows, broadcastable to
    ``(B', g, H')`` and ``(B', g, Hk')`` (``B' = 1`` when each row has its own batch row)."""
    dev = rows.device
    if plan.rows == "batch_kv":
        bk = rows // nqb  # b·Hkv + kv head
        hk = (bk % Hkv)[None, :, None]
        return (bk // Hkv)[None, :, None], hk * (H // Hkv) + torch.arange(H // Hkv, device=dev), hk
    bi = torch.arange(B, device=dev)[:, None, None]
    if plan.rows == "head":
        h = (rows // nqb)[None, :, None]  # (1, g, 1)
        return bi, h, h // (H // Hkv)
    return bi, torch.arange(H, device=dev)[None, None, :], torch.arange(Hkv, device=dev)[None, None, :]


def _row_entries(rows: str, B: int, H: int, Hkv: int) -> tuple[int, int, int]:
    """``(B', H', Hk')``: batch rows, query heads and kv heads each row of this kind serves."""
    return {"shared": (B, H, Hkv), "head": (B, 1, 1), "batch_kv": (1, H // Hkv, 1)}[rows]


def _tile_indices(plan: _TilePlan, rows, widths, B: int, H: int, Hkv: int, nqb: int, nkb: int):
    """The tiles every row gathers, row after row, for the whole call at once.

    ``rows`` (R,) in processing order, ``widths`` (R,) key blocks gathered for each (a row is
    padded to the widest of its group). Returns ``(qidx, kidx)``: rows of ``q.view(-1, bs·D)``,
    ``(R, B', H')`` flattened, and rows of ``k.view(-1, bs·D)`` (also of ``v``), each row's
    ``(B', Hk', width)`` after the previous row's. O(gathered tiles) memory.
    """
    dev = rows.device
    R = rows.shape[0]
    bi, h, hk = _group_heads(plan, rows, B, H, Hkv, nqb)
    qidx = ((bi * H + h) * nqb + (rows % nqb)[None, :, None]).transpose(0, 1).reshape(-1)
    kbase = ((bi * Hkv + hk) * nkb).expand(bi.shape[0], R, hk.shape[-1]).transpose(0, 1).reshape(R, -1)
    per_row = kbase.shape[1] * widths
    row = torch.repeat_interleave(torch.arange(R, device=dev), per_row)
    at = torch.arange(row.shape[0], device=dev) - (torch.cumsum(per_row, 0) - per_row)[row]
    w = widths[row]
    kidx = kbase[row, at // w] + plan.cols[rows[row], at % w]
    return qidx, kidx


def _group(
    plan: _TilePlan, q, k, v, kpm, rows, qidx, kidx, c: int, mask_kind: str | None, diagonal=None, out=None, lse=None,
    bufs: _Buffers | None = None,
):  # fmt: skip
    """Attention of one group of rows over their gathered key tiles.

    Returns ``(out, lse)``: ``out (g·B'·H', bs·Dv)``, each query's log-sum-exp ``(g·B'·H', bs)``
    when ``plan.lse`` (else None), for the rows ``qidx`` of ``q.view(-1, bs, D)``, in that order
    (:func:`_tile_indices`); written into ``out`` (and ``lse``) when given. Shared layout: ``rows``
    are query blocks and all batch rows and heads run together (grouped-query heads share their
    key tiles, ``H' = H``). Per-head layout: ``rows`` are flat ``head·nqb + block`` indices
    (``H' = 1``). Per (batch, kv head): ``rows`` are flat ``(b·Hkv + kv head)·nqb + block``
    indices with the kv head's query heads (``B' = 1``, ``H' = H/Hkv``). ``kidx`` lists each
    row's ``c`` key tiles (``(B', Hk', c)`` per row), gathered with ``index_select`` on whole
    ``(bs, D)`` tiles straight into the kernel's layout. ``mask_kind``: ``None`` (every gathered
    key visible), ``"diagonal"`` (all visible but the last tile, the causal diagonal;
    ``diagonal`` is its prebuilt additive mask) or ``"general"`` (a mask built per row).
    ``bufs``: scratch for the gathered tiles and the scores, reused by every group of a worker
    (no autograd); each needs at least this group's rows.
    """
    bs = plan.bs
    B, H, nqp, D = q.shape
    Hkv, nkp, Dv = k.shape[1], k.shape[2], v.shape[3]
    nqb = nqp // bs
    dev = q.device
    g = rows.shape[0]
    nb, hq_, hk_ = _row_entries(plan.rows, B, H, Hkv)
    # Without autograd the caller lends reusable buffers: they stay warm in cache.
    qbuf, kbuf, vbuf = (
        (bufs[0][: qidx.shape[0]], bufs[1][: kidx.shape[0]], bufs[2][: kidx.shape[0]]) if bufs else (None,) * 3
    )
    qg = torch.index_select(q.reshape(-1, bs * D), 0, qidx, out=qbuf).view(g * nb, hq_, bs, D)
    kg = torch.index_select(k.reshape(-1, bs * D), 0, kidx, out=kbuf).view(g * nb, hk_, c * bs, D)
    vg = torch.index_select(v.reshape(-1, bs * Dv), 0, kidx, out=vbuf).view(g * nb, hk_, c * bs, Dv)
    L = c * bs
    gqa = hq_ != hk_
    mask = piece_lse = None
    if mask_kind == "general":
        kb = plan.cols[rows, :c]  # (g, c) key blocks of each row, visible ones first
        mask = _group_mask(plan, kpm, rows, kb, nqp, nkp, Hkv)
        mask = mask.expand(g, nb, mask.shape[2], L).reshape(g * nb, 1, mask.shape[2], L)
    if plan.dropout is not None:
        # Global rows (b·H + h)·Nq + i and key positions of the gathered tiles, for the mask hash;
        # padding rows and slots (i ≥ Nq, unused or j ≥ Nk) are masked or dropped anyway.
        bi, h, _ = _group_heads(plan, rows, B, H, Hkv, nqb)
        i = ((rows % nqb)[:, None] * bs + torch.arange(bs, device=dev)).view(1, g, 1, bs, 1)
        qrows = query_rows(bi[..., None, None], h[..., None, None], i, heads=H, nq=plan.nq)
        qrows = qrows.expand(nb, g, hq_, bs, 1).transpose(0, 1)
        j = (plan.cols[rows, :c][:, :, None] * bs + torch.arange(bs, device=dev)).flatten(1)  # (g, c·bs)
        piece = dropout_attention(
            qg, kg, vg, scale=plan.scale, mask=mask, dropout=plan.dropout,
            rows=qrows.reshape(g * nb, hq_, bs, 1), cols=j[:, None].expand(g, nb, L).reshape(g * nb, 1, 1, L),
        )  # fmt: skip
    elif plan.bmm:
        # Query heads that share a key/value head are stacked, so each gathered tile is read once.
        rep, n = hq_ // hk_, g * nb * hk_
        bias = keep = seen = None
        if mask_kind == "diagonal":
            # Just the (bs, bs) triangle, added to the last tile's scores.
            bias = diagonal if diagonal is not None else _diagonal_mask(1, bs, q.dtype, dev)
            bias = bias if rep == 1 else bias.repeat(rep, 1)
        elif mask is not None:
            if plan.fix_empty:  # tile_attention needs a visible key in every row
                mask, seen = open_empty_rows(mask)
            keep = mask[:, :, None].expand(g * nb, hk_, rep, bs, L).reshape(n, rep * bs, L)
        result = tile_attention(
            qg.reshape(n, rep * bs, D), kg.reshape(n, L, D), vg.reshape(n, L, Dv), scale=plan.scale, bias=bias,
            keep=keep, scores=bufs[3] if bufs is not None else None, return_lse=plan.lse,
            out=None if out is None else out.view(n, rep * bs, Dv),
        )  # fmt: skip
        if isinstance(result, tuple):  # plan.lse
            piece, piece_lse = result[0].view(g * nb, hq_, bs, Dv), result[1].view(g * nb, hq_, bs)
        else:
            piece = result.view(g * nb, hq_, bs, Dv)
        if seen is not None:
            piece = piece.mul_(seen.to(piece.dtype))
            if piece_lse is not None:
                piece_lse = piece_lse.masked_fill_(~seen[..., 0], float("-inf"))
    elif plan.lse:
        # Explicit scores, to keep each row's log-sum-exp (rows seeing nothing: 0 and −inf).
        if mask_kind == "diagonal":
            mask = (diagonal if diagonal is not None else _diagonal_mask(c, bs, q.dtype, dev)) == 0
        piece, piece_lse = partial_attention(qg, kg, vg, scale=plan.scale, mask=mask)
        piece = piece.to(q.dtype)
    elif mask is not None and plan.fix_empty:
        piece = masked_sdpa(qg, kg, vg, mask=mask, scale=plan.scale)
    else:
        # A general mask with no empty row, the (bs, c·bs) additive mask of a diagonal group, or none.
        if mask_kind == "diagonal":
            mask = diagonal if diagonal is not None else _diagonal_mask(c, bs, q.dtype, dev)
        piece = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=plan.scale, enable_gqa=gqa)
    piece = piece.reshape(-1, bs * Dv)
    piece_lse = None if piece_lse is None else piece_lse.reshape(-1, bs)
    if out is not None and piece.data_ptr() != out.data_ptr():
        out.copy_(piece)
    if lse is not None and piece_lse is not None:
        lse.copy_(piece_lse)
    return piece, piece_lse


def _groups(widths: list[int], simple: list[bool], *, blocks_per_group: int, uniform_ok: bool, causal: bool):
    """``(start, stop, mask_kind)`` for consecutive groups of the sorted rows.

    Rows are sorted by (width, kind). A group grows while its rows, padded to its widest, stay
    within ``blocks_per_group`` key blocks, and — where a shared constant mask can serve
    (``mask_kind`` None or ``"diagonal"``) — within one width and kind. Runs shorter than
    :data:`MIN_UNIFORM_ROWS` join a ``"general"`` group: fewer, larger ops beat a constant mask.
    Rows that see no block are skipped (their output stays zero).
    """
    n_rows = len(widths)
    start = next((r for r, n in enumerate(widths) if n > 0), n_rows)
    while start < n_rows:
        c0, s0 = widths[start], simple[start]
        run = start + 1
        while run < n_rows and run - start < MIN_UNIFORM_ROWS and (widths[run], simple[run]) == (c0, s0):
            run += 1
        uniform = uniform_ok and (s0 or not causal) and run - start >= min(MIN_UNIFORM_ROWS, n_rows - start)
        stop = start + 1
        while (
            stop < n_rows
            and (stop + 1 - start) * widths[stop] <= blocks_per_group
            and (not uniform or (widths[stop], simple[stop]) == (c0, s0))
        ):
            stop += 1
        yield start, stop, (("diagonal" if causal else None) if uniform else "general")
        start = stop


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    *,
    block_size: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    return_lse: bool = False,
    dropout: Dropout | None = None,
) -> Any:
    """Exact softmax attention over the ``block_size`` tiles a block layout allows: the tiled
    kernel of the ``torch`` backend (see the module docstring for the math and the cost).
    ``dropout``: attention dropout on each tile's weights (positional mask, as ``math``'s).

    q ``(B, H, Nq, D)``, k ``(B, Hkv, Nk, D)``, v ``(B, Hkv, Nk, Dv)``; ``layout`` bool
    ``(Nq_blocks, Nk_blocks)``, per head ``(H, Nq_blocks, Nk_blocks)``, or per batch row and kv
    head ``(B, Hkv, Nq_blocks, Nk_blocks)`` (a data-dependent selection: the query heads of a kv
    head share its layout, so each gathered K/V tile serves all of them). Returns ``out``
    ``(B, H, Nq, Dv)``; a query that sees no key gets a zero row. With ``return_lse``, returns
    ``(out, lse)`` with each query's log-sum-exp ``(B, H, Nq)`` in float32 at least (``−inf``
    where it sees no key), for merging with attention over other keys
    (:func:`~sparse_linear_attn.backends.partial.merge_partials`).
    """
    B, H, nq, D = q.shape
    Hkv, nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    bs = block_size
    dev = q.device
    rows = {2: "shared", 3: "head", 4: "batch_kv"}[layout.dim()]
    order, counts, cols, simple = _row_plan(layout.cpu(), causal, nq, nk, bs)
    widths, kinds = counts[order].tolist(), simple[order].tolist()
    nqb, nkb = num_blocks(nq, bs), num_blocks(nk, bs)
    # Ragged lengths: pad to whole blocks (padded keys are masked out, padded queries dropped).
    # Tiles are gathered from (B·H·blocks, bs·D) views, so the inputs are made contiguous once.
    qp = (F.pad(q, (0, 0, 0, nqb * bs - nq)) if nq % bs else q).contiguous()
    kp = (F.pad(k, (0, 0, 0, nkb * bs - nk)) if nk % bs else k).contiguous()
    vp = (F.pad(v, (0, 0, 0, nkb * bs - nk)) if nk % bs else v).contiguous()
    kpm = key_padding_mask
    if kpm is not None and nk % bs:
        kpm = F.pad(kpm, (0, nkb * bs - nk), value=True)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    off = causal_offset(nq, nk)
    plan = _TilePlan(
        bs=bs, nq=nq, nk=nk, causal=causal, scale=scale, rows=rows, counts=counts.to(dev), cols=cols.to(dev),
        fix_empty=kpm is not None or (causal and (off % bs != 0 or nq > nk)),
        bmm=use_bmm_tiles(q, grad) and dropout is None, lse=return_lse, dropout=dropout,
    )  # fmt: skip
    budget = group_budget(dev, grad)
    # Elements per key block of one row: its k and v tiles (all kv heads when shared) and, with
    # bmm, its (bs, bs) score tiles (all query heads); the budget bounds the largest of them.
    # With dropout, a group's explicit weights and their int64 mask hash: several (bs, bs) per tile.
    tile_dim = max(D, Dv, bs if plan.bmm else 0, 4 * bs if dropout is not None else 0)
    # Per (batch, kv head) rows count all three, k, v and score tiles: their groups were
    # measured ~12 % faster kept that small (a selection's rows reuse few tiles; see docs/adaptive.md).
    per_block = {
        "shared": B * bs * tile_dim * max(H, Hkv),
        "head": B * bs * tile_dim,
        "batch_kv": bs * (D + Dv + ((H // Hkv) * bs if plan.bmm else 0) + (4 * bs if dropout is not None else 0)),
    }[rows]
    groups = list(
        _groups(
            widths, kinds, blocks_per_group=budget // per_block, causal=causal,
            # Dropout groups build their mask per row ("general"): their weights are explicit anyway.
            uniform_ok=kpm is None and (nk % bs == 0 or (causal and nq == nk)) and dropout is None,
        )
    )  # fmt: skip
    work = torch.promote_types(q.dtype, torch.float32)
    if not groups:
        # No query sees any block: zeros, still in the graph (zero gradients); empty sums, as
        # 0·sum would turn a non-finite input into NaN.
        out = q.new_zeros(B, H, nq, Dv)
        if grad:
            out = out + (qp.narrow(-1, 0, 0).sum() + kp.narrow(-1, 0, 0).sum() + vp.narrow(-1, 0, 0).sum())
        if not return_lse:
            return out
        return out, torch.full((B, H, nq), float("-inf"), dtype=work, device=dev)
    # Every group's gather indices at once, row after row in processing order; group i takes
    # q_at[i]:q_at[i+1] of qidx and k_at[i]:k_at[i+1] of kidx. Rows that see no block come
    # first in the order and are skipped: their output rows are zeroed.
    first = groups[0][0]
    padded = [widths[stop - 1] for _, stop, _ in groups]  # rows are sorted by width
    sizes = [stop - start for start, stop, _ in groups]
    nb, hq_, hk_ = _row_entries(rows, B, H, Hkv)
    row_widths = torch.repeat_interleave(torch.tensor(padded), torch.tensor(sizes)).to(dev)
    qidx, kidx = _tile_indices(plan, order[first:].to(dev), row_widths, B, H, Hkv, nqb, nkb)
    q_at, k_at = [0], [0]
    for n, c in zip(sizes, padded):
        q_at.append(q_at[-1] + n * nb * hq_)
        k_at.append(k_at[-1] + n * nb * hk_ * c)
    unseen = None
    if first:
        seen = torch.zeros(B * H * nqb, dtype=torch.bool, device=dev)
        seen[qidx] = True
        unseen = (~seen).nonzero()[:, 0]
    if grad:
        pieces, lses = [], []
        for (start, stop, kind), c, q0, q1, k0, k1 in zip(groups, padded, q_at, q_at[1:], k_at, k_at[1:]):
            # Recomputed in backward: the gathered tiles are not kept for the whole sequence.
            piece, piece_lse = checkpoint(
                _group, plan, qp, kp, vp, kpm, order[start:stop].to(dev), qidx[q0:q1], kidx[k0:k1], c, kind,
                use_reentrant=False,
            )  # fmt: skip
            pieces.append(piece)
            lses.append(piece_lse)
        out = q.new_zeros(B * H * nqb, bs * Dv).index_copy(0, qidx, torch.cat(pieces))
        lse = None
        if return_lse:
            lse = torch.full((B * H * nqb, bs), float("-inf"), dtype=work, device=dev)
            lse = lse.index_copy(0, qidx, torch.cat(lses))
    else:
        # A group whose output rows follow each other writes them in place (a view of out);
        # the others go through a worker's buffer and index_copy_. Fresh output-sized memory
        # costs a page fault per page, so out is the only one.
        jumps = torch.cat([qidx.new_zeros(1), (qidx[1:] != qidx[:-1] + 1).cumsum(0)])
        at = torch.tensor(q_at, device=dev)
        in_place = (jumps[at[1:] - 1] == jumps[at[:-1]]).tolist()
        first_row = qidx[at[:-1]].tolist()
        most_q = max(b - a for a, b in zip(q_at, q_at[1:]))
        most_k = max(b - a for a, b in zip(k_at, k_at[1:]))
        most_s = max(n * nb * hq_ * bs * c * bs for n, c in zip(sizes, padded)) if plan.bmm else 0
        out = q.new_empty(B * H * nqb, bs * Dv)
        lse = torch.empty(B * H * nqb, bs, dtype=work, device=dev) if return_lse else None
        scattered = not all(in_place)
        diagonals = {}  # additive diagonal masks by the tiles they cover, shared by the workers
        for (_, _, kind), c in zip(groups, padded):
            if kind == "diagonal" and (1 if plan.bmm else c) not in diagonals:
                diagonals[1 if plan.bmm else c] = _diagonal_mask(1 if plan.bmm else c, bs, q.dtype, dev)

        def scratch():
            # Each worker's own buffers, as large as the largest group needs: they stay warm.
            bufs = (qp.new_empty(most_q, bs * D), qp.new_empty(most_k, bs * D), qp.new_empty(most_k, bs * Dv),
                    qp.new_empty(most_s) if plan.bmm else None)  # fmt: skip
            obuf = q.new_empty(most_q, bs * Dv) if scattered else None
            lbuf = torch.empty(most_q, bs, dtype=work, device=dev) if scattered and return_lse else None
            return bufs, obuf, lbuf

        def run_group(i, state):
            bufs, obuf, lbuf = state
            start, stop, kind = groups[i]
            q0, q1, c = q_at[i], q_at[i + 1], padded[i]
            if in_place[i]:
                r0, r1 = first_row[i], first_row[i] + q1 - q0
                dest, dest_lse = out[r0:r1], (None if lse is None else lse[r0:r1])
            else:
                dest, dest_lse = obuf[: q1 - q0], (None if lbuf is None else lbuf[: q1 - q0])
            _group(
                plan, qp, kp, vp, kpm, order[start:stop].to(dev), qidx[q0:q1], kidx[k_at[i] : k_at[i + 1]], c, kind,
                diagonals.get(1 if plan.bmm else c) if kind == "diagonal" else None, out=dest, lse=dest_lse,
                bufs=bufs,
            )  # fmt: skip
            if not in_place[i]:  # rows of different groups never overlap: workers write apart
                out.index_copy_(0, qidx[q0:q1], dest)
                if lse is not None and dest_lse is not None:
                    lse.index_copy_(0, qidx[q0:q1], dest_lse)

        # On CPU, large calls run their groups on single-threaded workers (backends/workers.py).
        parallel = dev.type == "cpu" and k_at[-1] * bs * D >= PARALLEL_ELEMENTS
        run_tasks(run_group, len(groups), scratch, workers=None if parallel else 1)
        if unseen is not None:
            out.index_fill_(0, unseen, 0.0)
            if lse is not None:
                lse.index_fill_(0, unseen, float("-inf"))
    out = out.view(B, H, nqb * bs, Dv)[:, :, :nq]
    if lse is None:
        return out
    return out, lse.view(B, H, nqb * bs)[:, :, :nq]


def block_sparse_torch(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, dropout=None, **params):
    """Exact block-sparse attention gathering only the active tiles (see the module docstring)."""
    layout = resolve_layout(q.shape[2], k.shape[2], causal=causal, heads=q.shape[1], **params)
    out = block_attention(
        q, k, v, layout, block_size=params["block_size"], causal=causal, key_padding_mask=key_padding_mask,
        scale=scale, dropout=dropout,
    )  # fmt: skip
    return out, None


def _layout_key(layout) -> tuple | None:
    # By content, not id(): a freed tensor's id can be reused by a different layout.
    if layout is None:
        return None
    t = torch.as_tensor(layout).to("cpu", torch.bool).contiguous()
    return ("layout", tuple(t.shape), hashlib.sha1(t.numpy().tobytes()).hexdigest())


def block_sparse_flex(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, **params):
    """Compiled FlexAttention with a BlockMask built straight from the layout (cached)."""
    B, H, nq, _ = q.shape
    nk = k.shape[2]
    bs = params["block_size"]
    kpm = key_padding_mask

    def build():
        layout = resolve_layout(nq, nk, causal=causal, heads=H, **params).to(q.device)
        lay = layout[None] if layout.dim() == 3 else layout[None, None]  # (1, H|1, nqb, nkb)
        return layout_block_mask(lay, nq, nk, bs, causal=causal, key_padding_mask=kpm)

    names = ("block_size", "pattern", "num_local_blocks", "num_global_blocks", "num_random_blocks", "stride", "seed")
    key = None
    if kpm is None:
        key = (
            "block_sparse",
            nq,
            nk,
            H,
            causal,
            str(q.device),
            _layout_key(params.get("layout")),
            *(params.get(n) for n in names),
        )
    return flex_run(q, k, v, block_mask=cached_block_mask(key, build), scale=scale), None


def _check_params(p: Mapping[str, Any]) -> str | None:
    if p["layout"] is not None and p["pattern"] is not None:
        return "give either pattern= or layout=, not both"
    if p["pattern"] is not None and p["pattern"] not in PATTERNS:
        return unknown_name_message("pattern", str(p["pattern"]), PATTERNS)
    if p["pattern"] == "fixed" and p["num_global_blocks"] > p["num_local_blocks"]:
        return (
            f"pattern 'fixed' needs num_global_blocks <= num_local_blocks, got "
            f"{p['num_global_blocks']} > {p['num_local_blocks']}"
        )
    if p["layout"] is not None:
        lay = p["layout"]
        if isinstance(lay, torch.Tensor) and lay.dtype != torch.bool:
            return (
                f"layout must have dtype torch.bool (shape (Nq_blocks, Nk_blocks) or (H, ...)), got dtype {lay.dtype}"
            )
        if isinstance(lay, torch.Tensor) and lay.dim() not in (2, 3):
            return f"layout must have 2 or 3 dims (Nq_blocks, Nk_blocks) or (H, ...), got shape {tuple(lay.shape)}"
        if not isinstance(lay, (torch.Tensor, list, tuple)):
            return f"layout must be a bool tensor (Nq_blocks, Nk_blocks) or (H, ...), got {type(lay).__name__}"
    return None


def _pattern_name(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in PATTERNS:
        return unknown_name_message("pattern", str(value), PATTERNS).rstrip(".")
    return None


add(
    VariantSpec(
        name="block_sparse",
        summary="exact softmax attention over allowed block_size tiles (layout or named pattern)",
        exact=True,
        cost="O(nnz_blocks·block_size²·D)",
        params={
            "block_size": Param("block_size", 64, "tile size of the layout, in tokens", int_at_least(1)),
            "pattern": Param(
                "pattern",
                None,
                f"named layout: {', '.join(PATTERNS)} (None: 'local' unless a layout is given)",
                _pattern_name,
            ),
            "layout": Param("layout", None, "bool (Nq_blocks, Nk_blocks) or (H, Nq_blocks, Nk_blocks) tensor"),
            "num_local_blocks": Param(
                "num_local_blocks",
                3,
                "local/longformer/bigbird: own block and n−1 on each side; fixed: chunk length",
                int_at_least(1),
            ),
            "num_global_blocks": Param(
                "num_global_blocks",
                1,
                "fixed: summary blocks per chunk; longformer/bigbird: global blocks at the start",
                int_at_least(0),
            ),
            "num_random_blocks": Param(
                "num_random_blocks", 2, "bigbird: random key blocks per query block", int_at_least(0)
            ),
            "stride": Param("stride", 4, "strided: local width and stride, in blocks", int_at_least(1)),
            "seed": Param("seed", 0, "bigbird: seed of the random blocks", SEED_RANGE),
        },
        supports=Supports(dropout=True),
        impls={
            "torch": Impl(block_sparse_torch, dropout=True),
            "flex": Impl(block_sparse_flex, skip_in_auto=flex_skip_in_auto),
            "math": Impl(block_sparse_reference, dropout=True, double_backward=True),
        },
        mask_fn=block_sparse_mask,
        visible_keys=block_sparse_visible_keys,
        check_params=_check_params,
        cache_family="block_sparse",
        # Each named pattern, block sizes that do and do not divide N = 16, 24, 40. (A per-head
        # layout depends on N, so it has no example here; tests/test_block_sparse.py covers it.)
        examples=(
            {"block_size": 4, "pattern": "local", "num_local_blocks": 2},
            {"block_size": 8, "pattern": "strided", "stride": 2},
            {"block_size": 5, "pattern": "fixed", "num_local_blocks": 2, "num_global_blocks": 1},
            {"block_size": 6, "pattern": "longformer", "num_local_blocks": 1, "num_global_blocks": 1},
            {"block_size": 4, "pattern": "bigbird", "num_local_blocks": 1, "num_random_blocks": 2, "seed": 3},
        ),
    )
)
