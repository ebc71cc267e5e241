"""What an attention call computes: ``sla.selection`` and the :class:`Selection` it returns.

Data-dependent variants (``topk_block``, ``hybrid``) choose key blocks from the inputs; their
selection is a bool ``block_mask (B, Hkv, nq_blocks, nk_blocks)`` shared by the query heads of
each key/value head. ``Selection.dense()`` expands it to the ``(B, H, Nq, Nk)`` entries computed
exactly (causal element by element inside diagonal tiles, padded keys excluded), and
``density`` / ``compressed_density`` say what share of the reachable entries (those not
excluded by causality or padding) the call computes exactly and through compressed pseudo-keys.
Static exact variants get a Selection too (from their dense mask), so benchmarks count every
variant's cost alike.

The block rules shared by the selecting variants live here:

* :func:`visible_per_tile` — entries of each (query block, key block) tile that causality and
  padding leave visible, in closed form (no dense mask);
* :func:`forced_blocks` — blocks kept whatever the scores: ``sink_blocks`` at the start,
  ``local_blocks`` around the diagonal and, with strict causality, every key block not complete
  at the block's first query (it cannot be scored without looking past that query);
* :func:`choose_blocks` — the budget: ``density`` (a fraction of each row's reachable blocks)
  or ``mass`` (the fewest blocks whose estimated mass reaches that share).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from . import registry
from .errors import ParameterError
from .estimators import num_blocks, scoreable_blocks
from .inputs import causal_offset, check_flag, check_inputs, full_visibility
from .patterns import layout_elements

#: Block size of the ``block_mask`` of a static variant without a ``block_size`` parameter.
STATIC_BLOCK = 64


@dataclass(frozen=True)
class Selection:
    """The entries an attention call computes.

    ``block_mask`` bool ``(B, Hkv, nq_blocks, nk_blocks)``: the tiles computed exactly (only
    reachable ones). ``density``: entries computed exactly / reachable entries;
    ``compressed_density``: compressed pseudo-key entries (one per query and pseudo-key) /
    reachable entries, 0 without a remainder. ``scores``: the estimator's scores
    ``(B, Hkv, nq_blocks, nk_blocks)`` when the selection came from one. ``dense()`` → bool
    ``(B, H, Nq, Nk)`` of exactly the entries computed exactly (O(Nq·Nk): for tests and plots).
    """

    block_mask: torch.Tensor
    block_size: int
    density: float
    compressed_density: float
    nq: int
    nk: int
    heads: int
    causal: bool
    key_padding_mask: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    #: Static variants whose pattern is not block-aligned: the element mask itself,
    #: broadcastable to ``(B, H, Nq, Nk)``.
    elements: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """Bool ``(B, H, Nq, Nk)``: True where the entry is computed exactly."""
        B, Hkv = self.block_mask.shape[:2]
        H = self.heads
        if self.elements is not None:
            return self.elements.expand(B, H, self.nq, self.nk).clone()
        m = layout_elements(self.block_mask.repeat_interleave(H // Hkv, dim=1), self.block_size, self.nq, self.nk)
        vis = full_visibility(
            self.nq, self.nk, causal=self.causal, key_padding_mask=self.key_padding_mask, device=m.device
        )
        return m & vis if vis is not None else m.clone()

    def __repr__(self) -> str:
        return (
            f"Selection(block_mask={tuple(self.block_mask.shape)}, block_size={self.block_size}, "
            f"density={self.density:.4f}, compressed_density={self.compressed_density:.4f})"
        )


def key_prefix_counts(nk: int, key_padding_mask: torch.Tensor | None, device=None) -> torch.Tensor:
    """``P (B|1, Nk + 1)`` int64: ``P[:, x]`` unpadded keys among the first ``x``."""
    if key_padding_mask is None:
        return torch.arange(nk + 1, device=device)[None]
    keep = (~key_padding_mask).to(torch.int64)
    return torch.nn.functional.pad(keep.cumsum(-1), (1, 0))


def visible_per_tile(
    nq: int, nk: int, block_size: int, *, causal: bool, key_padding_mask: torch.Tensor | None = None, device=None
) -> torch.Tensor:
    """Int64 ``(B|1, nq_blocks, nk_blocks)``: entries of each tile visible under causality
    (bottom-right, element by element) and padding; ragged last blocks counted as they are.

    In closed form from prefix counts of unpadded keys: O(B·nq_blocks·nk_blocks), no dense mask.
    """
    if key_padding_mask is not None:
        device = key_padding_mask.device
    bs = block_size
    nqb, nkb = num_blocks(nq, bs), num_blocks(nk, bs)
    P = key_prefix_counts(nk, key_padding_mask, device)  # (B|1, nk+1)
    q_lo = torch.arange(nqb, device=device)[:, None] * bs
    q_hi = torch.clamp(q_lo + bs, max=nq)  # exclusive
    k_lo = torch.arange(nkb, device=device)[None, :] * bs
    k_hi = torch.clamp(k_lo + bs, max=nk)
    P_lo = P[:, k_lo[0]][:, None, :]  # (B, 1, nkb)
    P_hi = P[:, k_hi[0]][:, None, :]
    if not causal:
        return (q_hi - q_lo)[None] * (P_hi - P_lo)
    # Query i sees keys j < x_i = i + off + 1; the tile's count is Σ_i (P[clamp(x_i, lo, hi)] − P[lo]).
    off = causal_offset(nq, nk)
    s, e = q_lo + off + 1, q_hi + off  # x over [s, e] inclusive
    CP = torch.nn.functional.pad(P.cumsum(-1), (1, 0))  # CP[y] = Σ_{x<y} P[x]
    n_low = (torch.minimum(e, k_lo - 1) - s + 1).clamp_min(0)
    n_high = (e - torch.maximum(s, k_hi + 1) + 1).clamp_min(0)
    m_lo, m_hi = torch.maximum(s, k_lo), torch.minimum(e, k_hi)
    has_mid = m_lo <= m_hi
    mid_lo = m_lo.clamp(0, nk + 1).expand(nqb, nkb).reshape(-1)
    mid_hi = (m_hi + 1).clamp(0, nk + 1).expand(nqb, nkb).reshape(-1)
    mid = (CP[:, mid_hi] - CP[:, mid_lo]).view(-1, nqb, nkb)
    total = n_low[None] * P_lo + torch.where(has_mid[None], mid, 0) + n_high[None] * P_hi
    return total - (q_hi - q_lo)[None] * P_lo


def diagonal_blocks(nq: int, nk: int, block_size: int, device=None) -> torch.Tensor:
    """Int64 ``(nq_blocks,)``: the key block holding the (aligned) position of each query
    block's last query, clamped to the key blocks."""
    bs = block_size
    nqb, nkb = num_blocks(nq, bs), num_blocks(nk, bs)
    last = torch.clamp((torch.arange(nqb, device=device) + 1) * bs, max=nq) - 1 + causal_offset(nq, nk)
    return torch.div(last, bs, rounding_mode="floor").clamp(0, nkb - 1)


def forced_blocks(
    nq: int,
    nk: int,
    block_size: int,
    *,
    causal: bool,
    sink_blocks: int,
    local_blocks: int,
    strict: bool = True,
    device=None,
) -> torch.Tensor:
    """Bool ``(nq_blocks, nk_blocks)``: blocks kept whatever the scores (reachability not applied).

    ``sink_blocks`` first key blocks; ``local_blocks`` around the diagonal block ``d``
    (:func:`diagonal_blocks`): causal ``d − local_blocks < b ≤ d``, else ``|b − d| < local_blocks``;
    causal and ``strict``: every key block not complete at the block's first query.
    """
    nkb = num_blocks(nk, block_size)
    d = diagonal_blocks(nq, nk, block_size, device)[:, None]
    b = torch.arange(nkb, device=device)[None, :]
    local = ((b <= d) & (b > d - local_blocks)) if causal else ((b - d).abs() < local_blocks)
    forced = local | (b < sink_blocks)
    if causal and strict:
        forced = forced | ~scoreable_blocks(nq, nk, block_size, True, device=device)
    return forced


def choose_blocks(
    scores: torch.Tensor,
    reachable: torch.Tensor,
    forced: torch.Tensor,
    *,
    density: float | None,
    mass: float | None,
) -> torch.Tensor:
    """The selected blocks, bool like ``scores`` ``(B, Hkv, nqb, nkb)``.

    ``reachable`` ``(B|1, 1, nqb, nkb)``; ``forced`` broadcastable: kept wherever reachable and
    counted toward the budget. The other reachable blocks are taken by descending score (ties:
    lower column first) until the row holds ``max(1, ⌈density·R⌉)`` blocks (``R`` its reachable
    blocks), or — ``mass`` — until the forced blocks' share plus the taken ones' reaches
    ``mass`` of the row's total score (a row whose total is 0 keeps only its forced blocks). Every
    row with a reachable block keeps at least one.
    """
    reachable = reachable.expand_as(scores)
    keep = forced & reachable
    cand = reachable & ~keep
    s = scores.masked_fill(~cand, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True)
    ranked_ok = torch.isfinite(order.values)
    n_keep = keep.sum(-1, keepdim=True)
    if mass is None:
        assert density is not None, "choose_blocks needs density or mass"
        R = reachable.sum(-1, keepdim=True)
        budget = torch.ceil(R.double() * float(density) - 1e-9).long().clamp_min(1)
        budget = torch.minimum(budget, R)
        extra = (budget - n_keep).clamp_min(0)
        rank = torch.arange(s.shape[-1], device=s.device)
        take = (rank < extra) & ranked_ok
    else:
        p = scores.masked_fill(~reachable, 0.0).double()
        total = p.sum(-1, keepdim=True)
        share = torch.where(total > 0, p / torch.where(total > 0, total, 1.0), 0.0)
        have = (share * keep).sum(-1, keepdim=True)
        got = share.gather(-1, order.indices).masked_fill(~ranked_ok, 0.0)
        before = have + got.cumsum(-1) - got  # share held before taking this candidate
        # A row without any estimated mass has nothing to rank by: forced blocks (or one) only.
        take = (before < float(mass) - 1e-12) & ranked_ok & (total > 0)
        # At least one block: a row with nothing forced takes its best candidate.
        first = torch.zeros_like(take)
        first[..., 0] = True
        take = take | (first & ranked_ok & (n_keep == 0))
    picked = torch.zeros_like(keep).scatter(-1, order.indices, take)
    return keep | picked


def block_counts(block_mask: torch.Tensor, visible: torch.Tensor, heads: int) -> tuple[float, float]:
    """``(entries computed, entries reachable)`` summed over batch and query heads."""
    Hkv = block_mask.shape[1]
    computed = (block_mask.to(torch.int64) * visible[:, None]).sum() * (heads // Hkv)
    reachable = visible.expand(block_mask.shape[0], -1, -1).sum() * heads
    return float(computed), float(reachable)


def ratio(part: float, whole: float) -> float:
    """``part / whole``, 0 when nothing is reachable."""
    return part / whole if whole > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# The public call.


def _static_selection(spec, q, k, *, causal, key_padding_mask, params) -> Selection:
    B, H, nq, _ = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    pattern = None
    if spec.mask_fn is not None:
        kw = dict(params)
        if "layout" in spec.params:  # per-head layouts are checked against the head count
            kw["heads"] = H
        pattern = spec.mask_fn(nq, nk, causal=causal, **kw).to(q.device)
    elements = full_visibility(nq, nk, causal=causal, key_padding_mask=key_padding_mask, pattern=pattern,
                               device=q.device)  # fmt: skip
    if elements is None:
        elements = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=q.device)
    reach = full_visibility(nq, nk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)

    def total(m: torch.Tensor) -> float:  # m's sum expanded to (B, H, nq, nk), without expanding it
        return float(m.sum()) * (B * H * nq * nk // m.numel())  # each dim is whole or broadcast

    computed = total(elements)
    reachable = total(reach) if reach is not None else float(B * H * nq * nk)
    bs = params.get("block_size", STATIC_BLOCK)
    nqb, nkb = num_blocks(nq, bs), num_blocks(nk, bs)
    # Tiles at the mask's own (B|1, H|1) shape: a pattern shared by batch rows and heads is
    # reduced once, and only the small block mask is expanded.
    e = elements.reshape((1,) * (4 - elements.dim()) + tuple(elements.shape))
    e = torch.nn.functional.pad(e, (0, nkb * bs - nk, 0, nqb * bs - nq))
    tiles = e.view(e.shape[0], e.shape[1], nqb, bs, nkb, bs).any(5).any(3).expand(B, H, nqb, nkb)
    block_mask = tiles.reshape(B, Hkv, H // Hkv, nqb, nkb).any(2)
    return Selection(block_mask=block_mask, block_size=bs, density=ratio(computed, reachable), compressed_density=0.0,
                     nq=nq, nk=nk, heads=H, causal=causal, key_padding_mask=key_padding_mask,
                     elements=elements)  # fmt: skip


def selection(
    q: torch.Tensor,
    k: torch.Tensor,
    variant: str,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    **params: Any,
) -> Selection:
    """What ``sla.attention(q, k, v, variant, causal=..., key_padding_mask=..., **params)``
    computes exactly, as a :class:`Selection`.

    q ``(B, H, Nq, D)``, k ``(B, Hkv, Nk, D)``; ``scale`` as in ``sla.attention`` (the
    estimators use it). Data-dependent variants run their estimator and budget (no attention);
    static exact variants (``full``, ``sliding_window``, ``block_sparse``, …) derive it from their
    dense mask (O(Nq·Nk)), with tiles of their ``block_size`` or :data:`STATIC_BLOCK`.
    Variants that are neither (``linear``, ``performer``) have no selection and raise.
    """
    spec = registry.get(variant)
    causal = check_flag("causal", causal)
    check_inputs(q, k, k, key_padding_mask)
    resolved = spec.resolve_params(params)
    if spec.selection_fn is not None:
        with torch.no_grad():
            return spec.selection_fn(
                q, k, causal=causal, key_padding_mask=key_padding_mask, scale=spec.resolve_scale(scale, q.shape[-1]),
                **resolved,
            )  # fmt: skip
    if not spec.exact or spec.module is not None:
        raise ParameterError(
            f"variant {variant!r} computes no exact pattern of softmax attention, so it has no selection; "
            f"variants with one: {', '.join(selectable_variants())}"
        )
    with torch.no_grad():
        return _static_selection(spec, q, k, causal=causal, key_padding_mask=key_padding_mask, params=resolved)


def selectable_variants() -> list[str]:
    """Variants ``selection`` accepts: exact patterns and data-dependent selections."""
    out = []
    for name in registry.available_variants():
        spec = registry.get(name)
        if spec.selection_fn is not None or (spec.exact and spec.module is None):
            out.append(name)
    return out


def check_fraction(value: Any) -> str | None:
    """Param check: None or a number in (0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "expected a number in (0, 1] or None"
    if not 0 < value <= 1:
        return "expected a number in (0, 1]"
    return None
