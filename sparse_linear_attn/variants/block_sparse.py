"""``block_sparse`` — exact softmax attention over the union of allowed ``block_size`` tiles.

    query i sees key j  iff  layout[i // block_size, j // block_size]
                             (and, with causal=True, j ≤ i + Nk − Nq, applied element by element)

The layout is a bool ``(Nq_blocks, Nk_blocks)`` tensor — or ``(H, Nq_blocks, Nk_blocks)`` per
head — given as ``layout=`` or built from a named ``pattern=`` (see :data:`PATTERNS`):

* ``local``: the own block and ``num_local_blocks − 1`` blocks on each side;
* ``strided`` (Child et al. 2019): ``local`` with ``num_local_blocks = stride``, plus every
  block a multiple of ``stride`` blocks away;
* ``fixed`` (Child et al. 2019): blocks in the same chunk of ``num_local_blocks`` blocks, plus
  the last ``num_global_blocks`` blocks of every chunk ("summary" blocks), seen by all;
* ``longformer``: ``local`` plus ``num_global_blocks`` global blocks at the start, which see
  and are seen by every block;
* ``bigbird``: ``longformer`` plus ``num_random_blocks`` random key blocks per query block,
  drawn from ``seed`` (deterministic; with ``causal=True`` drawn among past blocks, each query
  block from a generator of its own, so that its row does not depend on the sequence length).

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
group.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..backends.flex import block_mask_from_layout, cached_block_mask, flex_run, flex_skip_in_auto
from ..backends.math import dense_attention
from ..backends.tiles import tile_attention, use_bmm_tiles
from ..errors import ParameterError, UnknownNameError, unknown_name_message
from ..inputs import causal_offset, full_visibility
from ..registry import Impl, Param, Supports, VariantSpec, add, int_at_least

#: Elements of the gathered key (and value) tiles built at once, on CPU without autograd. Small
#: on purpose: a group's copies should stay in cache and under glibc's mmap threshold (32 MiB),
#: above which every group's buffers are freshly mapped and page-faulted in. At 2²³ those faults
#: and cache misses cost more than the tile gathers themselves (bigbird, N=16384: 233 ms at 2²³,
#: 144 ms at 2²⁰, same process; see docs/sparse.md).
GROUP_ELEMENTS = 1 << 20
#: With autograd each group is a checkpointed node: fewer, larger ones measured faster.
GRAD_GROUP_ELEMENTS = 1 << 22
#: On accelerators (unmeasured here) larger groups mean fewer kernel launches.
DEVICE_GROUP_ELEMENTS = 1 << 23
#: Rows of one width needed to give them a group of their own with a shared constant mask.
MIN_UNIFORM_ROWS = 8

PATTERNS = ("bigbird", "fixed", "local", "longformer", "strided")

#: Which parameters each named pattern reads.
PATTERN_PARAMS = {
    "local": ("num_local_blocks",),
    "strided": ("stride",),
    "fixed": ("num_local_blocks", "num_global_blocks"),
    "longformer": ("num_local_blocks", "num_global_blocks"),
    "bigbird": ("num_local_blocks", "num_global_blocks", "num_random_blocks", "seed"),
}


def _blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def pattern_layout(*args, **kwargs) -> torch.Tensor:
    """The bool ``(nq_blocks, nk_blocks)`` layout of a named pattern (see the module docstring).

    ``pattern_layout(pattern, nq_blocks, nk_blocks, *, causal=False, num_local_blocks=3,
    num_global_blocks=1, num_random_blocks=2, stride=4, seed=0)``; cached, returns a copy.
    """
    return _pattern_layout(*args, **kwargs).clone()


@lru_cache(maxsize=64)
def _pattern_layout(
    pattern: str,
    nq_blocks: int,
    nk_blocks: int,
    *,
    causal: bool = False,
    num_local_blocks: int = 3,
    num_global_blocks: int = 1,
    num_random_blocks: int = 2,
    stride: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    if not isinstance(pattern, str) or pattern not in PATTERNS:
        raise UnknownNameError(unknown_name_message("block_sparse pattern", str(pattern), PATTERNS))

    def need(name: str, value: int, limit: int, what: str) -> None:
        if value > limit:
            raise ParameterError(
                f"block_sparse pattern {pattern!r}: {name}={value} does not fit the sequence, which "
                f"has {nk_blocks} key block(s) of block_size; accepted: {name} <= {limit} ({what})."
            )

    if pattern == "strided":
        need("stride", stride, nk_blocks, "the number of key blocks")
    if pattern == "fixed":
        need("num_local_blocks", num_local_blocks, nk_blocks, "the number of key blocks")
        if num_global_blocks > num_local_blocks:
            raise ParameterError(
                f"block_sparse pattern 'fixed': num_global_blocks={num_global_blocks} must be <= "
                f"num_local_blocks={num_local_blocks} (summary blocks are the last ones of each chunk)."
            )
    if pattern in ("longformer", "bigbird"):
        need("num_global_blocks", num_global_blocks, nk_blocks, "the number of key blocks")
    if pattern == "bigbird":
        need("num_random_blocks", num_random_blocks, nk_blocks, "the number of key blocks")
    a = torch.arange(nq_blocks) + (nk_blocks - nq_blocks)  # aligned query blocks
    return pattern_rule(
        pattern,
        a,
        nk_blocks,
        causal=causal,
        num_local_blocks=num_local_blocks,
        num_global_blocks=num_global_blocks,
        num_random_blocks=num_random_blocks,
        stride=stride,
        seed=seed,
    )


def pattern_rule(
    pattern: str,
    query_blocks: torch.Tensor,
    nk_blocks: int,
    *,
    causal: bool = False,
    num_local_blocks: int = 3,
    num_global_blocks: int = 1,
    num_random_blocks: int = 2,
    stride: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    """Rows of a named pattern: bool ``(len(query_blocks), nk_blocks)``, True where (aligned)
    query block ``a`` sees key block ``b``.

    Each row depends on ``a`` and ``b`` only, never on the number of blocks (with ``causal``;
    non-causal bigbird draws its random blocks among all ``nk_blocks``), so a decoding cache can
    ask for the row of one new query block and get the row of the one-shot call's layout. No
    check that the parameters fit the sequence: :func:`pattern_layout` does those.
    """
    a = query_blocks[:, None]
    b = torch.arange(nk_blocks)[None, :]
    d = a - b  # > 0: key block in the past
    if pattern == "local":
        return d.abs() < num_local_blocks
    if pattern == "strided":
        return (d.abs() < stride) | (d % stride == 0)
    if pattern == "fixed":
        same_chunk = torch.div(a, num_local_blocks, rounding_mode="floor") == b // num_local_blocks
        summary = (b % num_local_blocks) >= num_local_blocks - num_global_blocks
        return same_chunk | summary
    layout = (d.abs() < num_local_blocks) | (b < num_global_blocks) | (a < num_global_blocks)
    if pattern == "bigbird" and num_random_blocks > 0:
        # Random blocks come from those not already visible (and, causal, not in the future):
        # the num_random_blocks highest of a seeded uniform draw over the allowed ones. Causal
        # rows draw from a generator of their own (seeded by seed and the row), over blocks
        # 0..a only, so that a row is the same whatever the sequence length.
        if causal:
            score = torch.full(layout.shape, -1.0)
            for r, row in enumerate(query_blocks.tolist()):
                if row >= 0:
                    m = min(row + 1, nk_blocks)
                    score[r, :m] = torch.rand(m, generator=_row_generator(seed, row))
        else:
            score = torch.rand(layout.shape, generator=torch.Generator().manual_seed(seed))
        allowed = ~layout & ((b <= a) if causal else torch.ones_like(layout))
        score = score.masked_fill(~allowed, -1.0)
        top, idx = score.topk(min(num_random_blocks, nk_blocks), dim=-1)
        layout = layout.scatter(1, idx, top >= 0) | layout
    return layout


def _row_generator(seed: int, row: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


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
    nqb, nkb = _blocks(nq, bs), _blocks(nk, bs)
    if params.get("layout") is not None:
        return check_layout(params["layout"], nqb, nkb, heads)
    names = ("num_local_blocks", "num_global_blocks", "num_random_blocks", "stride", "seed")
    return _pattern_layout(
        params.get("pattern") or "local", nqb, nkb, causal=causal, **{n: params[n] for n in names if n in params}
    )


def layout_rows(query_blocks: torch.Tensor, nk_blocks: int, **params) -> torch.Tensor:
    """Rows ``query_blocks`` of the causal layout of a call with ``Nq == Nk``, over key blocks
    ``0 .. nk_blocks − 1``: bool ``(len, nk_blocks)`` or ``(H, len, nk_blocks)`` for a per-head
    ``layout``. For a named pattern a row does not depend on the sequence length (see
    :func:`pattern_rule`), so a decoding step gets the rows the one-shot call uses; a given
    ``layout`` must be square and cover the blocks asked for.
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
    layout = resolve_layout(nq, nk, causal=causal, **params)
    bs = params["block_size"]
    return layout.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :nq, :nk]


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


def block_sparse_reference(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, **params):
    """Dense masked softmax over the expanded layout: the ``math`` backend (O(Nq·Nk))."""
    nq, nk = q.shape[2], k.shape[2]
    pattern = block_sparse_mask(nq, nk, causal=causal, heads=q.shape[1], **params).to(q.device)
    mask = full_visibility(nq, nk, causal=causal, key_padding_mask=key_padding_mask, pattern=pattern)
    return dense_attention(q, k, v, scale=scale, mask=mask, return_weights=return_weights)


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


def _group(
    q,
    k,
    v,
    kpm,
    rows,
    counts,
    cols,
    *,
    bs,
    causal,
    scale,
    nq,
    nk,
    per_head,
    mask_kind,
    fix_empty,
    diagonal=None,
    bufs=None,
    bmm=False,
):
    """Attention of one group of rows over their gathered key tiles.

    Returns ``(out, qidx)``: ``out (B·g·H', bs, Dv)`` and the rows of ``q.view(-1, bs, D)`` it
    belongs to. Shared layout: ``rows`` are query blocks and all heads run together
    (grouped-query heads share their key tiles, ``H' = H``). Per-head layout: ``rows`` are flat
    ``head·nqb + block`` indices (``H' = 1``). Tiles are gathered with ``index_select`` on whole
    ``(bs, D)`` tiles, straight into SDPA's layout. With ``bmm`` (CPU, no grad, float32/64)
    the attention runs through :func:`tile_attention` instead of SDPA.
    """
    B, H, nqp, D = q.shape
    Hkv, nkp, Dv = k.shape[1], k.shape[2], v.shape[3]
    nqb, nkb = nqp // bs, nkp // bs
    dev = q.device
    g = rows.shape[0]
    c = int(counts[rows].max())
    kb = cols[rows, :c]  # (g, c) key blocks of each row, visible ones first
    a = rows % nqb
    bi = torch.arange(B, device=dev)[:, None, None]
    if per_head:
        h = (rows // nqb)[None, :, None]  # (1, g, 1)
        hk = h // (H // Hkv)
    else:
        h = torch.arange(H, device=dev)[None, None, :]
        hk = torch.arange(Hkv, device=dev)[None, None, :]
    qidx = ((bi * H + h) * nqb + a[None, :, None]).flatten()  # (B·g·H')
    kidx = (((bi * Hkv + hk) * nkb)[..., None] + kb[None, :, None, :]).flatten()  # (B·g·Hk'·c)
    hq_, hk_ = h.shape[-1], hk.shape[-1]
    qg = q.reshape(-1, bs * D).index_select(0, qidx).view(B * g, hq_, bs, D)
    # Without autograd the caller lends reusable buffers: they stay warm in cache.
    fits = bufs is not None and bufs[0].shape[0] >= kidx.shape[0]
    kbuf, vbuf = (bufs[0][: kidx.shape[0]], bufs[1][: kidx.shape[0]]) if fits else (None, None)
    kg = torch.index_select(k.reshape(-1, bs * D), 0, kidx, out=kbuf).view(B * g, hk_, c * bs, D)
    vg = torch.index_select(v.reshape(-1, bs * Dv), 0, kidx, out=vbuf).view(B * g, hk_, c * bs, Dv)
    mask = visible = None
    if mask_kind == "diagonal":
        # Every tile but the last is wholly visible; the last is the causal diagonal. SDPA gets
        # the (bs, c·bs) row mask; tile_attention adds just the (bs, bs) triangle to the last tile.
        mask = diagonal if diagonal is not None else _diagonal_mask(1 if bmm else c, bs, q.dtype, dev)
    elif mask_kind == "general":
        ar = torch.arange(bs, device=dev)
        j = (kb[:, :, None] * bs + ar).flatten(1)  # (g, c·bs) key positions
        used = (torch.arange(c, device=dev)[None, :] < counts[rows][:, None]).repeat_interleave(bs, 1)
        # Unused slots and keys past the end get a position no query may see.
        j = j.masked_fill(~used | (j >= nk), nk + nqp + nkp)
        limit = (a[:, None] * bs + ar + causal_offset(nq, nk)) if causal else torch.full((g, 1), nk - 1, device=dev)
        mask = (j[:, None, :] <= limit[:, :, None])[None]  # (1, g, bs|1, c·bs)
        if kpm is not None:
            mask = mask & ~kpm[:, j.clamp(max=nkp - 1)][:, :, None, :]
        if fix_empty:
            # A query seeing no key would make some kernels return NaN: let it see everything,
            # then zero its output (and so its gradient).
            visible = mask.any(-1, keepdim=True)
            mask = mask | ~visible
        mask = mask.expand(B, g, mask.shape[2], c * bs).reshape(B * g, 1, mask.shape[2], c * bs)
    if bmm:
        # Query heads that share a key/value head are stacked, so each gathered tile is read once.
        rep, n, L = hq_ // hk_, B * g * hk_, c * bs
        bias = keep = None
        if mask_kind == "diagonal":
            bias = mask if rep == 1 else mask.repeat(rep, 1)
        elif mask_kind == "general":
            keep = mask[:, :, None].expand(B * g, hk_, rep, bs, L).reshape(n, rep * bs, L)
        out = tile_attention(
            qg.reshape(n, rep * bs, D),
            kg.reshape(n, L, D),
            vg.reshape(n, L, Dv),
            scale=scale,
            bias=bias,
            keep=keep,
            scores=bufs[2] if fits else None,
        ).view(B * g, hq_, bs, Dv)
    else:
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale, enable_gqa=hq_ != hk_)
    if visible is not None:
        out = out * visible.expand(B, g, bs, 1).reshape(B * g, 1, bs, 1).to(out.dtype)
    return out.reshape(B * g * hq_, bs * Dv), qidx


def block_sparse_torch(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, **params):
    """Exact block-sparse attention gathering only the active tiles (see the module docstring)."""
    if return_weights:
        return block_sparse_reference(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, return_weights=True, **params
        )
    B, H, nq, D = q.shape
    Hkv, nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    bs = params["block_size"]
    layout = resolve_layout(nq, nk, causal=causal, heads=H, **params)
    per_head = layout.dim() == 3
    order, counts, cols, simple = _row_plan(layout.cpu(), causal, nq, nk, bs)
    counts_sorted, simple_sorted = counts[order].tolist(), simple[order].tolist()
    order, counts, cols = order.to(q.device), counts.to(q.device), cols.to(q.device)
    nqb, nkb = _blocks(nq, bs), _blocks(nk, bs)
    # Ragged lengths: pad to whole blocks (padded keys are masked out, padded queries dropped).
    # Tiles are gathered from (B·H·blocks, bs·D) views, so the inputs are made contiguous once.
    qp = (F.pad(q, (0, 0, 0, nqb * bs - nq)) if nq % bs else q).contiguous()
    kp = (F.pad(k, (0, 0, 0, nkb * bs - nk)) if nk % bs else k).contiguous()
    vp = (F.pad(v, (0, 0, 0, nkb * bs - nk)) if nk % bs else v).contiguous()
    kpm = key_padding_mask
    if kpm is not None and nk % bs:
        kpm = F.pad(kpm, (0, nkb * bs - nk), value=True)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    kw = dict(bs=bs, causal=causal, scale=scale, nq=nq, nk=nk, per_head=per_head)
    budget = group_budget(q.device, grad)
    bmm = use_bmm_tiles(q, grad)
    # Elements per key block of one row: its k and v tiles (all kv heads when shared) and, with
    # bmm, its (bs, bs) score tiles (all query heads); the budget bounds the largest of them.
    tile_dim = max(D, Dv, bs if bmm else 0)
    per_block = B * bs * tile_dim * (1 if per_head else max(H, Hkv))
    off = causal_offset(nq, nk)
    ragged = nk % bs != 0
    # A query can end up seeing nothing only with padding or a causal offset off the grid.
    fix_empty = kpm is not None or (causal and (off % bs != 0 or nq > nk))
    bufs = None  # gather buffers reused by every group (no autograd only)
    diagonals: dict[int, torch.Tensor] = {}  # additive diagonal masks by row width, built once
    n_rows = len(counts_sorted)
    start = next((r for r, n in enumerate(counts_sorted) if n > 0), n_rows)
    done, pieces = [], []
    if grad or start > 0:
        out = q.new_zeros(B * H * nqb, bs * Dv)  # rows that see no block stay zero
    else:
        out = q.new_empty(B * H * nqb, bs * Dv)  # every row is written below
    while start < n_rows:
        # Rows are sorted by (width, kind): grow the group within the budget and, where a
        # shared constant mask can serve, within one width and kind.
        c0, s0 = counts_sorted[start], simple_sorted[start]
        run = start + 1
        while run < n_rows and run - start < MIN_UNIFORM_ROWS and (counts_sorted[run], simple_sorted[run]) == (c0, s0):
            run += 1
        # Short runs are merged into a general group: fewer, larger ops beat a constant mask.
        uniform = (
            kpm is None
            and (not ragged or (causal and nq == nk))
            and (s0 or not causal)
            and run - start >= min(MIN_UNIFORM_ROWS, n_rows - start)
        )
        stop = start + 1
        while (
            stop < n_rows
            and (stop + 1 - start) * counts_sorted[stop] * per_block <= budget
            and (not uniform or (counts_sorted[stop] == c0 and simple_sorted[stop] == s0))
        ):
            stop += 1
        mask_kind = ("diagonal" if causal else None) if uniform else "general"
        rows = order[start:stop]
        gkw = dict(kw, mask_kind=mask_kind, fix_empty=fix_empty)
        if mask_kind == "diagonal" and not grad:
            mask_tiles = 1 if bmm else c0
            if mask_tiles not in diagonals:
                diagonals[mask_tiles] = _diagonal_mask(mask_tiles, bs, q.dtype, q.device)
            gkw["diagonal"] = diagonals[mask_tiles]
        if grad:
            # Recomputed in backward: the gathered tiles are not kept for the whole sequence.
            piece, qidx = checkpoint(_group, qp, kp, vp, kpm, rows, counts, cols, use_reentrant=False, **gkw)
            pieces.append(piece)
            done.append(qidx)
        else:
            if bufs is None:
                # Tiles gathered per group: within the budget, or one row when a row alone is
                # over, and never more than the call can need (a group pads its rows to its
                # widest, so every row at the widest bounds any group). With bmm, each gathered
                # tile meets one (bs, bs) score tile per query head sharing it.
                per_row, widest = B * (1 if per_head else Hkv), max(counts_sorted)
                tiles = min(max(budget // (bs * tile_dim), widest * per_row), (n_rows - start) * widest * per_row)
                scores = qp.new_empty(tiles * bs * bs * (1 if per_head else H // Hkv)) if bmm else None
                bufs = (qp.new_empty(tiles, bs * D), qp.new_empty(tiles, bs * Dv), scores)
            piece, qidx = _group(qp, kp, vp, kpm, rows, counts, cols, bufs=bufs, bmm=bmm, **gkw)
            out.index_copy_(0, qidx, piece)
        start = stop
    if grad and pieces:
        out = out.index_copy(0, torch.cat(done), torch.cat(pieces))
    elif grad:
        # No query sees any block: zeros, still in the graph (zero gradients); empty sums, as
        # 0·sum would turn a non-finite input into NaN.
        out = out + (qp.narrow(-1, 0, 0).sum() + kp.narrow(-1, 0, 0).sum() + vp.narrow(-1, 0, 0).sum())
    out = out.view(B, H, nqb * bs, Dv)
    return (out[:, :, :nq] if nq % bs else out), None


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
    off = causal_offset(nq, nk)
    kpm = key_padding_mask

    def build():
        layout = resolve_layout(nq, nk, causal=causal, heads=H, **params).to(q.device)
        lay = layout if layout.dim() == 3 else layout[None]
        nqb, nkb = lay.shape[-2:]
        qb = torch.arange(nqb, device=q.device)[:, None]
        kb = torch.arange(nkb, device=q.device)[None, :]
        whole = ((qb + 1) * bs <= nq) & ((kb + 1) * bs <= nk)
        any_v, full = lay.clone(), lay & whole
        if causal:
            q_lo, q_hi = qb * bs, torch.clamp((qb + 1) * bs, max=nq) - 1
            any_v &= kb * bs <= q_hi + off
            full &= torch.clamp((kb + 1) * bs, max=nk) - 1 <= q_lo + off
        if kpm is not None:
            full = torch.zeros_like(full)
        lay_c = lay.contiguous()
        per_head = lay.shape[0] > 1

        def mask_mod(b, h, q_idx, kv_idx):
            keep = lay_c[h if per_head else 0, q_idx // bs, kv_idx // bs]
            if causal:
                keep = keep & (kv_idx <= q_idx + off)
            if kpm is not None:
                keep = keep & ~kpm[b, kv_idx]
            return keep

        return block_mask_from_layout(any_v[None], full[None], mask_mod, nq, nk, bs)

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
            "seed": Param("seed", 0, "bigbird: seed of the random blocks", int_at_least(0)),
        },
        supports=Supports(),
        impls={
            "torch": Impl(block_sparse_torch),
            "flex": Impl(block_sparse_flex, skip_in_auto=flex_skip_in_auto),
            "math": Impl(block_sparse_reference),
        },
        mask_fn=block_sparse_mask,
        visible_keys=block_sparse_visible_keys,
        check_params=_check_params,
        cache_family="block_sparse",
    )
)
