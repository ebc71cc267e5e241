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
  drawn from ``seed`` (deterministic; with ``causal=True`` drawn among past blocks).

Block positions are bottom-right aligned like ``causal``: query block ``a`` sits at key block
``a + Nk_blocks − Nq_blocks``. With ``causal=True`` the causal mask is applied inside tiles, so
diagonal tiles are lower-triangular and nothing leaks from the future. Lengths that are not a
multiple of ``block_size`` work: the last blocks are short, their missing keys never get weight.
Shapes ``(batch, heads, seq, head_dim)``: q ``(B, H, Nq, D)``, k ``(B, Hkv, Nk, D)``,
v ``(B, Hkv, Nk, Dv)``.

Cost of the ``torch`` backend: O(B·H·nnz_blocks·block_size²·D) time. Query blocks are sorted
by how many key blocks they see and processed in bounded groups; each group gathers only its
active key tiles (``GROUP_ELEMENTS`` elements at a time), so memory never holds an ``Nq×Nk``
tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..backends.flex import block_mask_from_layout, cached_block_mask, flex_prefer_cuda, flex_run
from ..backends.math import dense_attention
from ..errors import ParameterError, UnknownNameError, unknown_name_message
from ..inputs import causal_offset, full_visibility
from ..registry import Impl, Param, Supports, VariantSpec, add, int_at_least

#: Elements of the gathered key (and value) tiles built at once; bounds working memory.
GROUP_ELEMENTS = 1 << 21

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


def pattern_layout(
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
    """The bool ``(nq_blocks, nk_blocks)`` layout of a named pattern (see the module docstring)."""
    if not isinstance(pattern, str) or pattern not in PATTERNS:
        raise UnknownNameError(unknown_name_message("block_sparse pattern", str(pattern), PATTERNS))
    a = torch.arange(nq_blocks)[:, None] + (nk_blocks - nq_blocks)  # aligned query block
    b = torch.arange(nk_blocks)[None, :]
    d = a - b  # > 0: key block in the past

    def need(name: str, value: int, limit: int, what: str) -> None:
        if value > limit:
            raise ParameterError(
                f"block_sparse pattern {pattern!r}: {name}={value} does not fit the sequence, which "
                f"has {nk_blocks} key block(s) of block_size; accepted: {name} <= {limit} ({what})."
            )

    if pattern == "local":
        return d.abs() < num_local_blocks
    if pattern == "strided":
        need("stride", stride, nk_blocks, "the number of key blocks")
        return (d.abs() < stride) | (d % stride == 0)
    if pattern == "fixed":
        need("num_local_blocks", num_local_blocks, nk_blocks, "the number of key blocks")
        if num_global_blocks > num_local_blocks:
            raise ParameterError(
                f"block_sparse pattern 'fixed': num_global_blocks={num_global_blocks} must be <= "
                f"num_local_blocks={num_local_blocks} (summary blocks are the last ones of each chunk)."
            )
        same_chunk = torch.div(a, num_local_blocks, rounding_mode="floor") == b // num_local_blocks
        summary = (b % num_local_blocks) >= num_local_blocks - num_global_blocks
        return same_chunk | summary
    need("num_global_blocks", num_global_blocks, nk_blocks, "the number of key blocks")
    if pattern == "bigbird":
        need("num_random_blocks", num_random_blocks, nk_blocks, "the number of key blocks")
    layout = (d.abs() < num_local_blocks) | (b < num_global_blocks) | (a < num_global_blocks)
    if pattern == "bigbird":
        gen = torch.Generator().manual_seed(seed)
        for row in range(nq_blocks):
            # Random blocks come from those not already visible (and, causal, not in the future).
            allowed = ~layout[row]
            if causal:
                allowed &= b[0] <= a[row, 0]
            choices = allowed.nonzero().flatten()
            if len(choices):
                pick = torch.randperm(len(choices), generator=gen)[: num_random_blocks]
                layout[row, choices[pick]] = True
    return layout


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
    return pattern_layout(params.get("pattern") or "local", nqb, nkb, causal=causal,
                          **{n: params[n] for n in names if n in params})


def block_sparse_mask(nq: int, nk: int, *, causal: bool = False, **params) -> torch.Tensor:
    """Bool ``(nq, nk)`` or ``(H, nq, nk)``: the element mask of the layout (causal applied by the caller)."""
    layout = resolve_layout(nq, nk, causal=causal, **params)
    bs = params["block_size"]
    return layout.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :nq, :nk]


def block_sparse_reference(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, **params):
    """Dense masked softmax over the expanded layout: the ``math`` backend (O(Nq·Nk))."""
    nq, nk = q.shape[2], k.shape[2]
    pattern = block_sparse_mask(nq, nk, causal=causal, heads=q.shape[1], **params).to(q.device)
    mask = full_visibility(nq, nk, causal=causal, key_padding_mask=key_padding_mask, pattern=pattern)
    return dense_attention(q, k, v, scale=scale, mask=mask, return_weights=return_weights)


def _row_plan(layout: torch.Tensor, causal: bool, nq: int, nk: int, bs: int):
    """Rows (query blocks, or ``head·nqb + block`` for per-head layouts) sorted by how many key
    blocks they see, their counts, and their key blocks (visible first, in column order)."""
    nqb, nkb = layout.shape[-2:]
    lay = layout.to(torch.bool)
    if causal:
        # Tiles entirely in the future are dropped here; the diagonal ones are masked in _group.
        a = torch.arange(nqb)[:, None]
        first_key = torch.arange(nkb)[None, :] * bs
        lay = lay & (first_key <= torch.clamp((a + 1) * bs, max=nq) - 1 + causal_offset(nq, nk))
    lay = lay.reshape(-1, nkb)
    counts = lay.sum(-1)
    order = torch.argsort(counts, stable=True)
    cols = torch.argsort(lay.to(torch.int8), dim=-1, descending=True, stable=True)
    return order, counts, cols


def _group(q, k, v, kpm, rows, counts, cols, *, bs, causal, scale, nq, nk, per_head):
    """Attention of one group of rows over their gathered key tiles.

    Shared layout: ``rows`` are query blocks and all heads run together (grouped-query heads
    share their key tiles); returns ``(B, H, g, bs, Dv)``. Per-head layout: ``rows`` are flat
    ``head·nqb + block`` indices; returns ``(B, g, bs, Dv)``.
    """
    B, H, nqp, D = q.shape
    Hkv, nkp, Dv = k.shape[1], k.shape[2], v.shape[3]
    nqb, nkb = nqp // bs, nkp // bs
    g = rows.shape[0]
    c = int(counts[rows].max())
    kb = cols[rows, :c]  # (g, c) key blocks of each row, visible ones first
    a = rows % nqb
    ar = torch.arange(bs, device=q.device)
    j = (kb[:, :, None] * bs + ar).flatten(1)  # (g, c·bs) key positions
    used = torch.arange(c, device=q.device)[None, :] < counts[rows][:, None]  # a row may see fewer than c
    mask = (used.repeat_interleave(bs, 1) & (j < nk))[:, None, :]  # (g, 1, c·bs)
    if causal:
        i = a[:, None] * bs + ar  # (g, bs) query positions
        mask = mask & (j[:, None, :] <= i[:, :, None] + causal_offset(nq, nk))
    mask = mask[None]  # (1, g, bs|1, c·bs)
    if kpm is not None:
        mask = mask & ~kpm[:, j][:, :, None, :]
    visible = None
    if not bool(mask.all()):
        visible = mask.any(-1, keepdim=True)  # (B|1, g, bs, 1)
        # A query seeing no key would make some kernels return NaN: let it see everything,
        # then zero its output (and so its gradient).
        mask = mask | ~visible
    if per_head:
        h = rows // nqb
        hk = (h // (H // Hkv))[:, None]
        qg = q.view(B, H, nqb, bs, D)[:, h, a]  # (B, g, bs, D)
        kg = k.view(B, Hkv, nkb, bs, D)[:, hk, kb].flatten(2, 3)  # (B, g, c·bs, D)
        vg = v.view(B, Hkv, nkb, bs, Dv)[:, hk, kb].flatten(2, 3)
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=None if visible is None else mask, scale=scale)
        return out if visible is None else out * visible.to(out.dtype)
    qg = q.view(B, H, nqb, bs, D)[:, :, a].transpose(1, 2).reshape(B * g, H, bs, D)
    kg = k.view(B, Hkv, nkb, bs, D)[:, :, kb].transpose(1, 2).reshape(B * g, Hkv, c * bs, D)
    vg = v.view(B, Hkv, nkb, bs, Dv)[:, :, kb].transpose(1, 2).reshape(B * g, Hkv, c * bs, Dv)
    if visible is not None:
        mask = mask.expand(B, g, mask.shape[2], c * bs).reshape(B * g, 1, -1, c * bs)
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=None if visible is None else mask,
                                         scale=scale, enable_gqa=H != Hkv)
    out = out.view(B, g, H, bs, Dv)
    if visible is not None:
        out = out * visible.expand(B, g, bs, 1)[:, :, None].to(out.dtype)
    return out.transpose(1, 2)


def block_sparse_torch(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, **params):
    """Exact block-sparse attention gathering only the active tiles (see the module docstring)."""
    if return_weights:
        return block_sparse_reference(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                      scale=scale, return_weights=True, **params)
    B, H, nq, D = q.shape
    Hkv, nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    bs = params["block_size"]
    layout = resolve_layout(nq, nk, causal=causal, heads=H, **params)
    per_head = layout.dim() == 3
    order, counts, cols = _row_plan(layout.cpu(), causal, nq, nk, bs)
    counts_sorted = counts[order].tolist()
    order, counts, cols = order.to(q.device), counts.to(q.device), cols.to(q.device)
    nqb, nkb = _blocks(nq, bs), _blocks(nk, bs)
    # Ragged lengths: pad to whole blocks (padded keys are masked out, padded queries dropped).
    qp = F.pad(q, (0, 0, 0, nqb * bs - nq)) if nq % bs else q
    kp = F.pad(k, (0, 0, 0, nkb * bs - nk)) if nk % bs else k
    vp = F.pad(v, (0, 0, 0, nkb * bs - nk)) if nk % bs else v
    kpm = key_padding_mask
    if kpm is not None and nk % bs:
        kpm = F.pad(kpm, (0, nkb * bs - nk), value=True)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    kw = dict(bs=bs, causal=causal, scale=scale, nq=nq, nk=nk, per_head=per_head)
    # Elements gathered per key block of one row: k and v tiles (all kv heads when shared).
    per_block = B * bs * max(D, Dv) * (1 if per_head else max(H, Hkv))
    # Output rows: (B, H·nqb, bs, Dv) per head, (B, H, nqb, bs, Dv) shared; unseen rows stay zero.
    out = q.new_zeros((B, H * nqb, bs, Dv) if per_head else (B, H, nqb, bs, Dv))
    dim = 1 if per_head else 2
    done, pieces = [], []
    n_rows = len(counts_sorted)
    start = next((r for r, n in enumerate(counts_sorted) if n > 0), n_rows)
    while start < n_rows:
        # Rows are sorted by count, so a group's widest row is its last: grow within the budget.
        stop = start + 1
        while stop < n_rows and (stop + 1 - start) * counts_sorted[stop] * per_block <= GROUP_ELEMENTS:
            stop += 1
        rows = order[start:stop]
        if grad:
            # Recomputed in backward: the gathered tiles are not kept for the whole sequence.
            pieces.append(checkpoint(_group, qp, kp, vp, kpm, rows, counts, cols, use_reentrant=False, **kw))
            done.append(rows)
        else:
            out.index_copy_(dim, rows, _group(qp, kp, vp, kpm, rows, counts, cols, **kw))
        start = stop
    if grad and pieces:
        out = out.index_copy(dim, torch.cat(done), torch.cat(pieces, dim=dim))
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
        key = ("block_sparse", nq, nk, H, causal, str(q.device), _layout_key(params.get("layout")),
               *(params.get(n) for n in names))
    return flex_run(q, k, v, block_mask=cached_block_mask(key, build), scale=scale), None


def _check_params(p: Mapping[str, Any]) -> str | None:
    if p["layout"] is not None and p["pattern"] is not None:
        return "give either pattern= or layout=, not both"
    if p["pattern"] is not None and p["pattern"] not in PATTERNS:
        return unknown_name_message("pattern", str(p["pattern"]), PATTERNS)
    if p["pattern"] == "fixed" and p["num_global_blocks"] > p["num_local_blocks"]:
        return (f"pattern 'fixed' needs num_global_blocks <= num_local_blocks, got "
                f"{p['num_global_blocks']} > {p['num_local_blocks']}")
    if p["layout"] is not None:
        lay = p["layout"]
        if isinstance(lay, torch.Tensor) and lay.dtype != torch.bool:
            return f"layout must have dtype torch.bool (shape (Nq_blocks, Nk_blocks) or (H, ...)), got dtype {lay.dtype}"
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
            "pattern": Param("pattern", None,
                             f"named layout: {', '.join(PATTERNS)} (None: 'local' unless a layout is given)",
                             _pattern_name),
            "layout": Param("layout", None, "bool (Nq_blocks, Nk_blocks) or (H, Nq_blocks, Nk_blocks) tensor"),
            "num_local_blocks": Param("num_local_blocks", 3,
                                      "local/longformer/bigbird: own block and n−1 on each side; fixed: chunk length",
                                      int_at_least(1)),
            "num_global_blocks": Param("num_global_blocks", 1, "fixed: summary blocks per chunk; "
                                       "longformer/bigbird: global blocks at the start", int_at_least(0)),
            "num_random_blocks": Param("num_random_blocks", 2, "bigbird: random key blocks per query block",
                                       int_at_least(0)),
            "stride": Param("stride", 4, "strided: local width and stride, in blocks", int_at_least(1)),
            "seed": Param("seed", 0, "bigbird: seed of the random blocks", int_at_least(0)),
        },
        supports=Supports(),
        impls={
            "torch": Impl(block_sparse_torch),
            "flex": Impl(block_sparse_flex, prefer=flex_prefer_cuda),
            "math": Impl(block_sparse_reference),
        },
        mask_fn=block_sparse_mask,
        check_params=_check_params,
    )
)
