"""Accuracy measures of one benchmark point besides the output error: which entries an exact
variant computes, the attention mass they hold (recall), and the ``oracle`` selection.

Recall and the oracle need the exact softmax rows, ``O(N)`` each; they are evaluated on
``R`` evenly spaced query rows per (batch, head) (all rows when ``N ≤ R``), a stratified sample
whose mean and 5th percentile estimate those over all rows, at ``O(R·N·D)`` cost and bounded
memory at any N. The math is :func:`sparse_linear_attn.metrics.attention_recall`; this module
only decides which entries a variant computes:

* static exact patterns (``sliding_window``, ``block_sparse``, user ``mask_fn`` variants): the
  rows of ``sla.dense_mask`` (``O(N²)``, built up to ``DENSE_MASK_ENTRIES`` entries, N = 16K);
* data-dependent ones (``topk_block``, ``hybrid``): the entries their selection keeps for these
  inputs, from ``sla.selection(q, k, variant, ...)`` — its ``block_mask`` expanded for the
  sampled rows only (never the ``(B, H, N, N)`` dense form);
* ``full`` and other variants without a pattern: every visible key, recall 1 by definition.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import sparse_linear_attn as sla

from .. import registry
from ..metrics import attention_recall

#: Most entries of a dense pattern mask built to find a static variant's computed entries
#: (N = 16K): a ``mask_fn`` may hold int64 index grids of the same size while it builds it.
DENSE_MASK_ENTRIES = 1 << 28
#: Bytes per entry a ``mask_fn`` may hold at its peak (int64 index grids and the bool result).
MASK_FN_BYTES_PER_ENTRY = 17


def sample_rows(n: int, count: int, device=None) -> torch.Tensor:
    """``min(n, count)`` evenly spaced query indices ``⌊(i + ½)·n / count⌋`` (all rows when n ≤ count)."""
    if n <= count:
        return torch.arange(n, device=device)
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * n / count).long().to(device)


def recall_stats(recall: torch.Tensor) -> dict[str, float]:
    """``recall_mean`` and ``recall_p5`` (5th percentile) over every evaluated row and head."""
    flat = recall.flatten().double()
    return {"recall_mean": float(flat.mean()), "recall_p5": float(torch.quantile(flat, 0.05))}


def is_data_dependent(name: str) -> bool:
    """Whether the variant chooses its entries from the inputs (it has a selection function)."""
    return bool(getattr(registry.get(name), "data_dependent", False))


@dataclass
class Computed:
    """The entries a call computes exactly, on the evaluated rows.

    ``mask``: bool broadcastable to ``(B, H, R, Nk)``, or None for every visible key.
    ``density``/``compressed_density``: from the selection (data-dependent variants), else None
    (static patterns have closed-form counts, see :mod:`.flops`).
    """

    mask: torch.Tensor | None
    how: str
    density: float | None = None
    compressed_density: float | None = None
    #: The ``sla.selection`` result of a data-dependent variant.
    selection: Any = None


def _selection_rows(sel: Any, rows: torch.Tensor, heads: int, nk: int) -> torch.Tensor:
    """Rows ``rows`` of ``sel.dense()`` without building it: its block mask expanded for them."""
    elements = getattr(sel, "elements", None)
    if elements is not None:
        return elements[..., rows.to(elements.device), :]
    bm = sel.block_mask  # (B, Hkv, nq_blocks, nk_blocks)
    bs = int(sel.block_size)
    m = bm[:, :, rows.to(bm.device) // bs, :]  # (B, Hkv, R, nkb)
    m = m.repeat_interleave(bs, dim=-1)[..., :nk]
    return m.repeat_interleave(heads // m.shape[1], dim=1)


def _mask_key(name: str, params: Mapping[str, Any], n: int, nk: int, causal: bool, rows: torch.Tensor):
    """Cache key of a static pattern's rows, or None when a parameter is a tensor (a layout)."""
    if any(isinstance(v, torch.Tensor) for v in params.values()):
        return None
    return (name, json.dumps(dict(params), sort_keys=True, default=str), n, nk, causal, tuple(rows.tolist()))


def computed_entries(
    name: str,
    params: Mapping[str, Any],
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool,
    rows: torch.Tensor,
    scale: float,
    cache: MutableMapping[Any, torch.Tensor] | None = None,
) -> Computed | str:
    """What a variant computes exactly on ``rows``, or a string saying why it is not known.

    Data-dependent variants come first: ``hybrid`` is not exact as a whole (its remainder is
    compressed) but its selected blocks are, and their recall is what its exact part keeps.

    ``cache``: a mapping kept across calls (a sweep keeps one) for the rows of static patterns,
    which do not depend on the inputs: building a dense mask at N = 16K takes seconds, and a
    sweep over several input kinds would build the same one for each."""
    spec = registry.get(name)
    B, H, N, _ = q.shape
    Nk = k.shape[2]
    if is_data_dependent(name):
        selection = getattr(sla, "selection", None)
        if selection is None:
            return "data-dependent variant, but this version has no sla.selection"
        sel = selection(q, k, name, causal=causal, scale=scale, **dict(params))
        return Computed(
            _selection_rows(sel, rows, H, Nk),
            "sla.selection (the entries chosen for these inputs)",
            float(sel.density),
            float(getattr(sel, "compressed_density", 0.0) or 0.0),
            sel,
        )
    if not spec.exact or spec.module is not None:
        return "not an exact pattern: no computed entries"
    if spec.mask_fn is None:
        return Computed(None, "every visible key")
    per_head = 1
    if isinstance(params.get("layout"), torch.Tensor) and params["layout"].dim() == 3:
        per_head = params["layout"].shape[0]
    entries = per_head * N * Nk
    if entries > DENSE_MASK_ENTRIES:
        return f"dense mask of {entries:.3g} entries over the limit of {DENSE_MASK_ENTRIES:.3g} (N = 16K)"
    key = None if cache is None else _mask_key(name, params, N, Nk, causal, rows)
    if cache is not None and key is not None and key in cache:
        return Computed(cache[key].to(q.device), "sla.dense_mask")
    from .memory import available_bytes

    if MASK_FN_BYTES_PER_ENTRY * entries > available_bytes(torch.device("cpu")) // 2:
        return "dense mask skipped: building it would take over half the available memory"
    mask = sla.dense_mask(name, N, Nk, causal=causal, **dict(params))
    picked = mask[..., rows.to(mask.device), :].clone()  # the rows only: the N×N mask is freed
    del mask
    if cache is not None and key is not None:
        cache[key] = picked
    return Computed(picked.to(q.device), "sla.dense_mask")


def row_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool,
    rows: torch.Tensor,
    scale: float,
    chunk_bytes: int = 64 << 20,
) -> torch.Tensor:
    """Exact float64 softmax weights ``p (B, H, R, Nk)`` of ``rows`` (0 where a key is not
    visible; all 0 in a row that sees no key), for :func:`recall_of` to share across variants.

    ``p_ij = e^{s_ij − lse_i}``, ``s = q·kᵀ·scale``, bottom-right causal; grouped-query ``k``.
    ``O(R·Nk·D)`` time in chunks of rows of about ``chunk_bytes`` of scores; holds ``8·B·H·R·Nk``
    bytes (400 MB for 12 heads, 256 rows, N = 16K)."""
    B, H, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    kk = k.detach().to(torch.float64).repeat_interleave(H // Hkv, dim=1)
    rows = rows.to(q.device)
    out = torch.empty(B, H, rows.numel(), Nk, dtype=torch.float64, device=q.device)
    step = max(1, chunk_bytes // max(1, B * H * Nk * 8))
    cols = torch.arange(Nk, device=q.device)
    for r0 in range(0, rows.numel(), step):
        idx = rows[r0 : r0 + step]
        s = torch.matmul(q.detach()[:, :, idx].to(torch.float64), kk.transpose(-1, -2)) * scale
        if causal:
            s.masked_fill_(cols[None, :] > idx[:, None] + (Nk - Nq), float("-inf"))
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        # A row with no visible key has lse = -inf; its weights are 0 (exp(-inf - 0)).
        out[:, :, r0 : r0 + idx.numel()] = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0))
    return out


def recall_of(
    computed: Computed,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool,
    rows: torch.Tensor,
    scale: float,
    weights: torch.Tensor | None = None,
) -> dict[str, float]:
    """``recall_mean``/``recall_p5`` of the computed entries on ``rows``.

    ``weights``: :func:`row_weights` of the same ``q, k, causal, rows, scale``, computed once
    for every variant of a benchmark point (the recall is then a masked sum, not a new pass
    over the scores); None computes the recall through :func:`attention_recall`."""
    if computed.mask is None:
        return {"recall_mean": 1.0, "recall_p5": 1.0}  # every visible key: all the mass
    if weights is None:
        return recall_stats(attention_recall(q, k, computed.mask, scale=scale, causal=causal, rows=rows))
    mask = torch.broadcast_to(computed.mask.to(weights.device), weights.shape)
    rec = torch.empty(weights.shape[:-1], dtype=torch.float64, device=weights.device)
    for b in range(weights.shape[0]):  # one head at a time: no second B·H·R·Nk buffer
        for h in range(weights.shape[1]):
            p = weights[b, h]
            inside = (p * mask[b, h]).sum(-1)
            rec[b, h] = torch.where(p.sum(-1) > 0, inside, 1.0)  # a row that sees no key misses nothing
    return recall_stats(rec)


#: Bins per decade of the weight histogram that places the oracle's threshold.
ORACLE_BINS_PER_DECADE = 400
#: Smallest weight the histogram resolves (weights below it are never worth an entry).
ORACLE_MIN_LOG10 = -40


def _exact_rows(q, k, v, b, h, idx, *, scale, causal):
    """Exact float64 weights ``p (R, Nk)`` (0 where not visible) and outputs ``(R, Dv)`` of some rows."""
    H, N = q.shape[1], q.shape[2]
    Hkv, Nk = k.shape[1], k.shape[2]
    kk = k[b, h // (H // Hkv)].to(torch.float64)
    vv = v[b, h // (H // Hkv)].to(torch.float64)
    s = (q[b, h, idx].to(torch.float64) @ kk.T) * scale
    if causal:
        cols = torch.arange(Nk, device=q.device)
        vis = cols[None, :] <= idx[:, None] + (Nk - N)
    else:
        vis = torch.ones_like(s, dtype=torch.bool)
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1).nan_to_num_(0.0)
    return p, vis, vv


def oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    densities: Sequence[float],
    *,
    scale: float,
    causal: bool,
    rows: torch.Tensor,
    chunk_bytes: int = 64 << 20,
) -> dict[float, dict[str, float]]:
    """The best selection of entries at each density: the entries of largest exact attention
    weight anywhere (any row, any head), as many as ``density`` × the reachable entries, with
    every row keeping at least its largest one; each row's kept weights renormalised.

    Taking entries by weight across rows maximises the attention mass kept for a given number
    of computed entries: no selection of as many entries — a window, blocks, a per-row top-k,
    any allocation across rows and heads — keeps more, so its mean recall bounds every
    variant's at that density. Its output error is the error of that selection, a reference
    rather than a bound (renormalisation can favour other choices).

    Evaluated on ``rows`` of every (batch, head), which stand for the whole: the threshold
    weight comes from a histogram of those rows' weights (``ORACLE_BINS_PER_DECADE`` bins per
    decade; the entries kept are counted exactly). Returns, per density ``d``: ``rel_error``
    (of the output on ``rows`` against exact attention on the same rows:
    ``√(Σ‖o − e‖² / Σ‖e‖²)``), ``recall_mean``, ``recall_p5`` and ``density`` (entries kept /
    reachable entries, ``d`` up to the histogram's resolution) and ``threshold`` (the smallest
    weight kept besides each row's largest). Float64; two passes over the
    rows' scores, memory bounded by ``chunk_bytes`` per chunk of rows; O(R·N·D·(1 + #densities)).
    """
    B, H, N, D = q.shape
    Nk = k.shape[2]
    ds = [float(d) for d in densities]
    step = max(1, chunk_bytes // max(1, Nk * 32))
    bins = -ORACLE_MIN_LOG10 * ORACLE_BINS_PER_DECADE
    hist = torch.zeros(bins + 1, dtype=torch.float64)
    reach = 0

    def chunks():
        for b in range(B):
            for h in range(H):
                for r0 in range(0, rows.numel(), step):
                    idx = rows[r0 : r0 + step].to(q.device)
                    yield (*_exact_rows(q, k, v, b, h, idx, scale=scale, causal=causal), b, h, idx)

    # Pass 1: how many visible entries have each weight (log10 bins, bin 0 = the largest).
    for p, vis, _, _, _, _ in chunks():
        reach += int(vis.sum())
        lg = torch.log10(p[vis].clamp_min(10.0**ORACLE_MIN_LOG10))
        pos = (-lg * ORACLE_BINS_PER_DECADE).long().clamp_(0, bins)
        hist += torch.bincount(pos.cpu(), minlength=bins + 1).double()
    cum = hist.cumsum(0)
    thresholds = {}
    for d in ds:
        last = int(torch.searchsorted(cum, torch.tensor(d * reach, dtype=torch.float64)).clamp(max=bins))
        thresholds[d] = 10.0 ** (-(last + 1) / ORACLE_BINS_PER_DECADE)  # keep every weight in bins 0..last
    # Pass 2: the outputs of each selection.
    num = dict.fromkeys(ds, 0.0)
    kept = dict.fromkeys(ds, 0)
    recalls: dict[float, list[torch.Tensor]] = {d: [] for d in ds}
    den = 0.0
    for p, vis, vv, _, _, _ in chunks():
        exact = p @ vv
        den += float(exact.square().sum())
        seen = vis.any(-1)
        top = p.argmax(-1, keepdim=True)
        for d in ds:
            keep = (p >= thresholds[d]) & vis
            keep.scatter_(-1, top, seen[:, None])
            pm = p * keep
            mass = pm.sum(-1)
            approx = (pm @ vv) / torch.where(mass > 0, mass, 1.0)[:, None]
            num[d] += float((approx - exact).square().sum())
            kept[d] += int(keep.sum())
            recalls[d].append(torch.where(seen, mass, 1.0))
    result: dict[float, dict[str, float]] = {}
    for d in ds:
        result[d] = {
            "rel_error": math.sqrt(num[d] / den) if den > 0 else 0.0,
            "density": kept[d] / reach if reach else 0.0,
            "threshold": thresholds[d],
            **recall_stats(torch.cat(recalls[d])),
        }
    return result
