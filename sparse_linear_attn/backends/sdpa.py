"""Exact attention through ``torch.nn.functional.scaled_dot_product_attention``.

SDPA chooses its own kernel (FlashAttention / memory-efficient / cuDNN on CUDA, a flash
kernel on CPU). Two conventions differ from ours and are handled here:

* SDPA's ``is_causal`` is top-left aligned; ours is bottom-right, so ``Nq != Nk`` causal calls
  pass an explicit mask;
* some SDPA kernels return NaN for a query that sees no key. :func:`masked_sdpa` lets such
  rows see every key (so every kernel computes something finite) and then zeroes their output,
  which also zeroes their gradient. Every masked SDPA call in the library goes through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..inputs import causal_mask


def open_empty_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(allowed, seen)`` for a bool mask (True = visible) over the last dim: rows that see no
    key are opened to every key in ``allowed``; ``seen`` (the mask's ``any`` over keys, keepdim)
    is what the caller multiplies the output by, so those rows come out as zeros."""
    seen = mask.any(dim=-1, keepdim=True)
    return mask | ~seen, seen


def masked_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """SDPA with a bool ``mask`` (True = visible) broadcastable to ``(B, H, Nq, Nk)`` and an
    optional finite additive ``bias``; a row that sees no key gives zeros, never NaN.
    q ``(B, H, Nq, D)``, k/v ``(B, Hkv, Nk, ·)`` (grouped-query heads allowed)."""
    allowed, seen = open_empty_rows(mask)
    attn_mask = allowed if bias is None else bias.to(q.dtype).masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out * seen.to(out.dtype)


def full_sdpa(q, k, v, *, causal, key_padding_mask, scale, return_weights=False):
    nq, nk = q.shape[2], k.shape[2]
    if causal and nq == 1 and nk >= 1:
        causal = False  # bottom-right: one query (a decoding step) sees every key; no mask needed
    if key_padding_mask is None and (not causal or nq == nk):
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out, None
    mask = None
    if causal:
        mask = causal_mask(nq, nk, device=q.device)[None, None]
    if key_padding_mask is not None:
        kp = ~key_padding_mask[:, None, None, :]
        mask = kp if mask is None else mask & kp
    assert mask is not None
    return masked_sdpa(q, k, v, mask=mask, scale=scale), None
