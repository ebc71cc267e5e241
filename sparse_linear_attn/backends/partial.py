"""Softmax attention over a part of the keys, with its log-sum-exp, and the merge of parts.

Attention over keys split into parts ``P₁ … P_m`` (blocks of a ring, an exact part and a
compressed one, a cache and new tokens) is the log-sum-exp merge of the attention over each part:

    oₚ = Σ_{j∈P} e^{sⱼ − ℓₚ} vⱼ,   ℓₚ = log Σ_{j∈P} e^{sⱼ}         (sⱼ = q·kⱼ·scale)
    o  = Σₚ e^{ℓₚ − ℓ} oₚ,          ℓ  = log Σₚ e^{ℓₚ}

A part in which a query sees no key has ``ℓₚ = −∞`` and ``oₚ = 0`` and drops out of the merge;
a query that sees no key in any part keeps ``o = 0`` (never NaN). Everything here is plain
differentiable torch, free of communication and caches, so the single-process, decoding and
distributed paths share it. Shapes ``(batch, heads, seq, head_dim)``.
"""

from __future__ import annotations

import torch

from ..inputs import repeat_kv


def partial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over these keys only, and each row's log-sum-exp.

    q ``(B, H, Nq, D)``, k ``(B, Hkv, Nk, D)``, v ``(B, Hkv, Nk, Dv)`` with ``H % Hkv == 0``;
    ``mask`` bool broadcastable to ``(B, H, Nq, Nk)``, True = visible. Returns ``out``
    ``(B, H, Nq, Dv)`` and ``lse`` ``(B, H, Nq)`` in float32 (float64 stays float64); rows that
    see no key get ``out = 0`` and ``lse = −inf``. Cost O(Nq·Nk·(D + Dv)) time and an
    ``Nq×Nk`` score block in memory: callers pass blocks, not whole sequences.
    """
    work = torch.promote_types(q.dtype, torch.float32)
    H = q.shape[1]
    k, v = repeat_kv(k, H).to(work), repeat_kv(v, H).to(work)
    s = torch.matmul(q.to(work), k.transpose(-1, -2))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        s = s * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        seen = torch.isfinite(lse)
        # Rows that see nothing: subtract 0 instead of -inf so that exp gives 0, not NaN.
        p = torch.exp(s - torch.where(seen, lse, torch.zeros_like(lse))[..., None])
        return torch.matmul(p, v), lse
    # Without autograd: one pass of exp over the score block, reused in place (a fresh block per
    # step costs more than the arithmetic on it), and the normaliser applied to the output.
    s.mul_(scale)
    if mask is not None:
        s.masked_fill_(mask.logical_not(), float("-inf"))
    top = s.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # unseen rows: exp(-inf) = 0
    p = s.sub_(top).exp_()
    total = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v).div_(torch.where(total > 0, total, torch.ones_like(total)))
    return out, (top + total.log()).squeeze(-1)


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, *, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over the union of two disjoint key parts, from each part's ``(out, lse)``.

    ``out_*`` ``(..., Nq, Dv)``, ``lse_*`` ``(..., Nq)``; ``−inf`` marks a part a row does not
    see. Returns ``(out, lse)`` of the union, in the inputs' dtype. ``inplace`` (no autograd):
    the result is written into ``out_a`` and ``out_b`` is overwritten, so no output-sized
    buffer is allocated.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    seen = torch.isfinite(lse)
    ref = torch.where(seen, lse, torch.zeros_like(lse))
    # exp(−inf − ref) = 0 drops a part a row does not see; rows unseen in both stay 0 (ref = 0).
    wa = torch.exp(lse_a - ref)[..., None]
    wb = torch.exp(lse_b - ref)[..., None]
    if inplace:
        return out_a.mul_(wa).add_(out_b.mul_(wb)), lse
    return out_a * wa + out_b * wb, lse
