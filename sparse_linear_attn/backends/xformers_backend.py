"""xformers' ``memory_efficient_attention`` (CUDA only, fp16/bf16).

xformers is imported lazily, on the first call that asks for it, with its import-time
warnings silenced: on a machine without CUDA it warns at import, and users who did not ask
for xformers must never see that. Layout: xformers takes ``(B, N, H, D)``.
"""

from __future__ import annotations

import logging
import warnings
from functools import lru_cache


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
    bias = None
    if causal:
        bias = ops.fmha.attn_bias.LowerTriangularFromBottomRightMask()
    out = ops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, scale=scale)
    if H != Hkv:
        out = out.reshape(out.shape[0], out.shape[1], H, out.shape[-1])
    out = out.transpose(1, 2)
    if causal and q.shape[2] > k.shape[2]:
        # Bottom-right alignment leaves the first Nq - Nk queries with no key: zeros, not NaN.
        out = out.clone()
        out[:, :, : q.shape[2] - k.shape[2]] = 0
    return out, None
