"""The dense masked-and-biased exact path used by the multi-head layer.

``softmax(q kᵀ·scale + bias, where visible) v`` for exact variants when a call carries what
``sla.attention`` does not take: an arbitrary ``attn_mask``, a float (additive) mask, an ALiBi
bias, or attention dropout. O(Nq·Nk) time and memory (the mask itself is that size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends.math import masked_softmax
from ..backends.sdpa import masked_sdpa
from ..inputs import repeat_kv


def split_float_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float additive mask as ``(visible, bias)``: ``-inf`` entries become invisible, the
    finite rest the bias (``None`` when it is all zeros, i.e. the mask was a boolean one)."""
    hidden = torch.isneginf(mask)
    if torch.isnan(mask).any() or torch.isposinf(mask).any():
        raise ValueError("a float attention mask must hold finite values or -inf, got NaN or +inf")
    finite = mask.masked_fill(hidden, 0.0)
    bias = finite if bool(finite.ne(0).any()) else None
    return ~hidden, bias


def masked_biased_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    visible: torch.Tensor | None,
    bias: torch.Tensor | None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact attention with a bool ``visible`` mask and a finite float ``bias``, both
    broadcastable to ``(B, H, Nq, Nk)``. Shapes q ``(B, H, Nq, D)``, k/v ``(B, Hkv, Nk, D/Dv)``.

    A query that sees no key gets a zero row (never NaN). Without ``return_weights`` it runs
    through SDPA (fused kernels, attention dropout); with it, through an explicit softmax in
    float32 at least, returning the (dropped-out) weights as ``nn.MultiheadAttention`` does.
    """
    H = q.shape[1]
    k, v = repeat_kv(k, H), repeat_kv(v, H)
    if return_weights:
        work = torch.promote_types(q.dtype, torch.float32)
        scores = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias.to(work)
        weights = masked_softmax(scores, visible)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.matmul(weights, v.to(work)).to(q.dtype)
        return out, weights.to(q.dtype)
    if visible is None:
        attn_mask = None if bias is None else bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale), None
    return masked_sdpa(q, k, v, mask=visible, scale=scale, bias=bias, dropout_p=dropout_p), None
