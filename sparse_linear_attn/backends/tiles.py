"""Attention over a batch of small tiles through explicit ``bmm``s (the tiled CPU paths).

    out = softmax(q·kᵀ·scale + bias, masked where not keep) · v        per tile

``sliding_window`` and ``block_sparse`` cut attention into tiles of 32–64 queries over a few
hundred keys. For such tiles on CPU, ``baddbmm → softmax → bmm`` is faster and steadier than
the fused SDPA kernel (figures in docs/sparse.md). The score tile is materialised, so it is
used only where that is cheap and safe: on CPU, without autograd (which would keep every
tile's probabilities), in float32/float64 (half precisions keep SDPA, which accumulates in
float32). Callers bound the tiles per call, so the scores stay cache-sized.
"""

from __future__ import annotations

import torch


def use_bmm_tiles(t: torch.Tensor, grad: bool) -> bool:
    """Whether the tiled paths should use :func:`tile_attention` for ``t`` (see the module docstring)."""
    return not grad and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def tile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    bias: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q·kᵀ·scale + bias)·v`` for ``n`` tiles at once.

    q ``(n, Tq, D)``, k ``(n, L, D)``, v ``(n, L, Dv)`` — any strides a ``bmm`` accepts, so
    overlapping ``as_strided`` key spans are read in place. ``bias``: additive float ``(Tq, Lb)``
    added to the last ``Lb ≤ L`` keys of every tile (``-inf`` hides a key). ``keep``: bool
    broadcastable to ``(n, Tq, L)``, False hides a key. Every query must keep at least one key.
    Writes into ``out`` ``(n, Tq, Dv)`` when given. ``scores``: a float buffer used for the
    scores when it holds at least ``n·Tq·L`` elements (a caller looping over groups lends the
    same one, which stays in cache). With ``return_lse`` also each row's log-sum-exp of its
    (scaled, biased) scores ``(n, Tq)``, for merging with attention over other keys
    (:mod:`sparse_linear_attn.backends.partial`). Cost O(n·Tq·L·(D + Dv)) time, O(n·Tq·L) memory.
    """
    n, tq, L = q.shape[0], q.shape[1], k.shape[1]
    if scores is not None and scores.numel() >= n * tq * L:
        s = scores[: n * tq * L].view(n, tq, L)
    else:
        s = q.new_empty(n, tq, L)
    torch.baddbmm(s, q, k.transpose(1, 2), beta=0, alpha=scale, out=s)  # beta=0: s is only written
    if bias is not None:
        s[:, :, L - bias.shape[-1] :] += bias
    if keep is not None:
        s.masked_fill_(~keep, float("-inf"))
    top = s.amax(-1) if return_lse else None
    # In place: a second score-sized buffer per call cost ~15% (allocation and page faults).
    torch.softmax(s, dim=-1, out=s)
    o = torch.bmm(s, v, out=out)
    if top is None:
        return o
    # lse = s_j − log p_j for any key j; at the largest score p_j ≥ 1/L, so the log is well
    # conditioned, and two reading passes replace a spelled-out softmax.
    return o, top - s.amax(-1).log()
