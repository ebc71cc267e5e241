"""Independent references for tests: written from the definitions, not from the library."""

from __future__ import annotations

import math

import torch


def visible(nq: int, nk: int, *, causal: bool, key_padding_mask=None, batch: int = 1) -> torch.Tensor:
    """Bool (B, 1, nq, nk): query i sees key j iff (not causal or j <= i + nk - nq) and j not padded."""
    m = torch.ones(batch, 1, nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            if causal and j > i + nk - nq:
                m[:, :, i, j] = False
    if key_padding_mask is not None:
        m &= ~key_padding_mask.cpu()[:, None, None, :]
    return m


def softmax_attention(q, k, v, mask=None, scale=None):
    """Plain float64 masked softmax attention; rows with no visible key give zeros.

    q (B,H,Nq,D), k/v (B,Hkv,Nk,·) with H % Hkv == 0; mask bool broadcastable to (B,H,Nq,Nk).
    Returns (out, weights) in float64, differentiable (grads reach the float64 copies' sources).
    """
    H, Hkv = q.shape[1], k.shape[1]
    q, k, v = q.cpu().double(), k.cpu().double(), v.cpu().double()
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if mask is None:
        p = torch.softmax(s, -1)
        return p @ v, p
    mask = mask.cpu().expand_as(s)
    row = mask.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~mask, -math.inf).masked_fill(~row, 0.0), -1) * row
    return p @ v, p


def pattern_attention(q, k, v, mask, key_padding_mask=None, scale=None):
    """``softmax_attention`` over a pattern mask (nq, nk) or per head (H, nq, nk), minus padded keys."""
    m = mask[None, None] if mask.dim() == 2 else mask[None]
    if key_padding_mask is not None:
        m = m & ~key_padding_mask.cpu()[:, None, None, :]
    return softmax_attention(q, k, v, m, scale=scale)


def strided_qkv(B, H, Hkv, n, D=16, Dv=8, dtype=torch.float32, seed=0):
    """q, k, v made ``(B, N, H, D)`` and viewed as ``(B, H, N, D)``, as models often pass them."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, n, H, D, generator=g, dtype=dtype).transpose(1, 2),
        torch.randn(B, n, Hkv, D, generator=g, dtype=dtype).transpose(1, 2),
        torch.randn(B, n, Hkv, Dv, generator=g, dtype=dtype).transpose(1, 2),
    )


def random_qkv(B, H, Hkv, nq, nk, D=8, Dv=5, dtype=torch.float32, seed=0):
    """Seeded q ``(B, H, nq, D)``, k ``(B, Hkv, nk, D)``, v ``(B, Hkv, nk, Dv)`` (grouped-query when
    ``Hkv < H``), drawn in float32 and cast, so every dtype gets the same values."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, nq, D, generator=g).to(dtype),
        torch.randn(B, Hkv, nk, D, generator=g).to(dtype),
        torch.randn(B, Hkv, nk, Dv, generator=g).to(dtype),
    )


def random_padding(B, nk, seed=3, p=0.3):
    """A seeded bool key padding mask ``(B, nk)``, True (padded) with probability ``p``."""
    return torch.rand(B, nk, generator=torch.Generator().manual_seed(seed)) < p


def masked_lse(q, k, mask, scale):
    """Float64 log-sum-exp of each query's visible scores ``(B, H, Nq)`` (−inf: sees nothing);
    ``mask`` bool broadcastable to ``(B, H, Nq, Nk)``, kv heads repeated for grouped queries."""
    H = q.shape[1]
    s = q.double() @ k.double().repeat_interleave(H // k.shape[1], 1).transpose(-1, -2) * scale
    return torch.logsumexp(s.masked_fill(~mask, -math.inf), -1)
