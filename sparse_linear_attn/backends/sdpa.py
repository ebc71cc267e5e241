"""Exact full attention through ``torch.nn.functional.scaled_dot_product_attention``.

SDPA chooses its own kernel (FlashAttention / memory-efficient / cuDNN on CUDA, a flash
kernel on CPU). Two conventions differ from ours and are handled here:

* SDPA's ``is_causal`` is top-left aligned; ours is bottom-right, so ``Nq != Nk`` causal calls
  pass an explicit mask;
* some SDPA kernels return NaN for a query that sees no key. Such rows are made to see every
  key (so every kernel computes something finite) and their output is then zeroed, which also
  zeroes their gradient.
"""

from __future__ import annotations

import torch.nn.functional as F

from ..inputs import causal_mask


def full_sdpa(q, k, v, *, causal, key_padding_mask, scale, return_weights=False):
    nq, nk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if key_padding_mask is None and (not causal or nq == nk):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
        return out, None
    mask = None
    if causal:
        mask = causal_mask(nq, nk, device=q.device)[None, None]
    if key_padding_mask is not None:
        kp = ~key_padding_mask[:, None, None, :]
        mask = kp if mask is None else mask & kp
    visible = mask.any(dim=-1, keepdim=True)  # (B or 1, 1, Nq or 1, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~visible, scale=scale, enable_gqa=gqa)
    return out * visible.to(out.dtype), None
