"""xformers' ``memory_efficient_attention`` (CUDA only, fp16/bf16).

xformers is imported lazily, on the first call that asks for it, with its import-time
warnings silenced: on a machine without CUDA it warns at import, and users who did not ask
for xformers must never see that. Layout: xformers takes ``(B, N, H, D)``.
"""

from __future__ import annotations

import logging
import warnings
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def xops():
    """Import and return ``xformers.ops`` quietly."""
    logger = logging.getLogger("xformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import xformers.ops as ops
    finally:
        logger.setLevel(level)
    return ops


def no_key_padding(call, params) -> str | None:
    # A key padding mask would need a dense (B, H, Nq, Nk) bias tensor in xformers.
    return "key_padding_mask is not supported (it would need a dense bias)" if call.key_padding else None


def causal_bias():
    """The bias of causal ``full``: bottom-right aligned lower triangle, key ``j ≤ i + Nk − Nq``."""
    return xops().fmha.attn_bias.LowerTriangularFromBottomRightMask()


def sliding_window_bias(window: int, causal: bool):
    """The bias of ``sliding_window``: ``LocalAttentionFromBottomRightMask(window_left,
    window_right)`` lets query ``i`` see key ``j`` iff ``i − window_left ≤ j + (Nq − Nk) ≤ i +
    window_right``, our bottom-right aligned window with ``window_left = window`` and
    ``window_right = window`` (``0`` when causal)."""
    return xops().fmha.attn_bias.LocalAttentionFromBottomRightMask(
        window_left=window, window_right=0 if causal else window
    )


def full_xformers(q, k, v, *, causal, key_padding_mask, scale, return_weights=False):
    ops = xops()
    H, Hkv = q.shape[1], k.shape[1]
    qx = q.transpose(1, 2)
    kx = k.transpose(1, 2)
    vx = v.transpose(1, 2)
    if H != Hkv:
        # 5-D (B, N, G, Hq/G, D) layout: xformers groups query heads without copying k/v.
        B, Nq, _, D = qx.shape
        Nk = kx.shape[1]
        qx = qx.reshape(B, Nq, Hkv, H // Hkv, D)
        kx = kx[:, :, :, None].expand(B, Nk, Hkv, H // Hkv, D)
        vx = vx[:, :, :, None].expand(B, Nk, Hkv, H // Hkv, vx.shape[-1])
    bias = causal_bias() if causal else None
    out = ops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, scale=scale)
    if H != Hkv:
        out = out.reshape(out.shape[0], out.shape[1], H, out.shape[-1])
    out = out.transpose(1, 2)
    if causal and q.shape[2] > k.shape[2]:
        # Bottom-right alignment leaves the first Nq - Nk queries with no key: zeros, not NaN.
        out = out.clone()
        out[:, :, : q.shape[2] - k.shape[2]] = 0
    return out, None


def sliding_window_xformers(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, window, sinks=0):
    """``sliding_window`` through xformers' local-attention bias (CUDA, fp16/bf16), see
    :func:`sliding_window_bias`. Queries whose window holds no key get zeros, as everywhere in
    this library.
    """
    ops = xops()
    H, Hkv = q.shape[1], k.shape[1]
    nq, nk = q.shape[2], k.shape[2]
    right = 0 if causal else window
    qx, kx, vx = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if H != Hkv:
        B, D = qx.shape[0], qx.shape[-1]
        qx = qx.reshape(B, nq, Hkv, H // Hkv, D)
        kx = kx[:, :, :, None].expand(B, nk, Hkv, H // Hkv, D)
        vx = vx[:, :, :, None].expand(B, nk, Hkv, H // Hkv, vx.shape[-1])
    bias = sliding_window_bias(window, causal)
    out = ops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, scale=scale)
    if H != Hkv:
        out = out.reshape(out.shape[0], nq, H, out.shape[-1])
    out = out.transpose(1, 2)
    # Query i sees keys [i + off − window, i + off + right] ∩ [0, Nk); empty only at the ends.
    off = nk - nq
    first = max(0, min(nq, -(off + right)))  # queries before this see no key
    last = max(first, min(nq, nk - off + window))  # queries from here on see no key
    if first > 0 or last < nq:
        keep = torch.zeros(nq, 1, dtype=torch.bool, device=out.device)
        keep[first:last] = True
        out = torch.where(keep, out, 0.0)  # where, not a product: those rows may hold NaN
    return out, None
