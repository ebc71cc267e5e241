"""``full`` — exact scaled dot-product attention, and ``dot_product``, its unscaled form.

    out = softmax(Q Kᵀ · scale + mask) V,    scale = 1/√D by default

Shapes ``(batch, heads, seq, head_dim)``: q ``(B, H, Nq, D)``, k ``(B, Hkv, Nk, D)``,
v ``(B, Hkv, Nk, Dv)``. Cost O(Nq·Nk·D) time; memory O(Nq + Nk) on the fused ``torch`` (SDPA)
and ``xformers`` backends, O(Nq·Nk) on ``math`` (which returns the weights).

Attention dropout (``dropout_p``): on CUDA the ``torch`` backend keeps SDPA's fused kernels,
which draw their own mask; elsewhere (SDPA's CPU kernels would build the N×N weights for it)
it runs query tiles of :data:`DROPOUT_TILE_ELEMENTS` scores through
:func:`~sparse_linear_attn.backends.dropout.dropout_attention`, recomputed in backward, with
the positional mask the ``math`` backend uses too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..backends.dropout import Dropout, dropout_attention, query_rows
from ..backends.math import dense_attention
from ..backends.sdpa import full_sdpa, masked_sdpa
from ..backends.xformers_backend import full_xformers, no_key_padding
from ..inputs import causal_mask, causal_offset, full_visibility
from ..registry import Impl, Supports, VariantSpec, add

#: Scores (batch · heads · queries · keys) of one query tile of the CPU dropout path.
DROPOUT_TILE_ELEMENTS = 1 << 21


def full_reference(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, dropout=None):
    """Dense masked softmax: the ``math`` backend and the definition the others must match."""
    mask = full_visibility(q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    return dense_attention(q, k, v, scale=scale, mask=mask, return_weights=return_weights, dropout=dropout)


def _dropout_tile(q, k, v, key_padding_mask, start: int, *, nq: int, causal: bool, scale: float, dropout: Dropout):
    """Queries ``start .. start + q.shape[2]`` of the whole call, over every key, with dropout."""
    B, H, T, _ = q.shape
    nk = k.shape[2]
    dev = q.device
    i = torch.arange(start, start + T, device=dev)
    j = torch.arange(nk, device=dev)
    mask = (j[None, :] <= i[:, None] + causal_offset(nq, nk))[None, None] if causal else None
    if key_padding_mask is not None:
        kp = ~key_padding_mask[:, None, None, :]
        mask = kp if mask is None else mask & kp
    b = torch.arange(B, device=dev)[:, None, None, None]
    h = torch.arange(H, device=dev)[None, :, None, None]
    rows = query_rows(b, h, i[:, None], heads=H, nq=nq)
    return dropout_attention(q, k, v, scale=scale, mask=mask, dropout=dropout, rows=rows, cols=j)


def full_dropout(q, k, v, *, causal, key_padding_mask, scale, dropout: Dropout) -> torch.Tensor:
    """Exact attention with dropout: SDPA's fused dropout on CUDA, else query tiles (module docstring)."""
    B, H, nq, _ = q.shape
    nk = k.shape[2]
    if q.device.type == "cuda":
        if key_padding_mask is None and (not causal or nq == nk):
            gqa = H != k.shape[1]
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=scale, dropout_p=dropout.p, enable_gqa=gqa
            )
        mask = causal_mask(nq, nk, device=q.device)[None, None] if causal else None
        if key_padding_mask is not None:
            kp = ~key_padding_mask[:, None, None, :]
            mask = kp if mask is None else mask & kp
        assert mask is not None
        return masked_sdpa(q, k, v, mask=mask, scale=scale, dropout_p=dropout.p)
    T = max(1, min(nq, DROPOUT_TILE_ELEMENTS // max(1, B * H * nk)))
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    kw = dict(nq=nq, causal=causal, scale=scale, dropout=dropout)
    pieces = []
    for s in range(0, nq, T):
        args = (q[:, :, s : s + T], k, v, key_padding_mask, s)
        # Checkpointed: backward recomputes one tile's weights (the same mask, a hash of the
        # position) instead of keeping every tile's, which together would be N×N.
        pieces.append(
            checkpoint(_dropout_tile, *args, use_reentrant=False, **kw) if grad else _dropout_tile(*args, **kw)
        )
    return torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]


def full_torch(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, dropout=None):
    """The ``torch`` backend: SDPA, or :func:`full_dropout` when ``dropout`` is given."""
    if dropout is None:
        return full_sdpa(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    return full_dropout(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, dropout=dropout), None


def full_visible_keys(nq: int, nk: int, *, causal: bool) -> float:
    """Average keys per query: ``Nk``, or under bottom-right causal ``mean_i clamp(i + Nk − Nq + 1, 0, Nk)``."""
    if not causal:
        return float(nk)
    off = causal_offset(nq, nk)
    first = max(0, -off)  # queries before this see nothing
    # Queries first..nq-1 see i + off + 1 keys (never more than nk, since i + off <= nk - 1).
    seen = sum(range(first + off + 1, nq + off + 1))
    return seen / nq


IMPLS = {
    "torch": Impl(full_torch, dropout=True),
    "xformers": Impl(full_xformers, rules_out=no_key_padding),
    "math": Impl(full_reference, dropout=True, double_backward=True),
}

add(
    VariantSpec(
        name="full",
        summary="exact softmax(QKᵀ·scale)V over every key (causal: bottom-right aligned)",
        exact=True,
        cost="O(N²·D)",
        supports=Supports(dropout=True),
        impls=dict(IMPLS),
        visible_keys=full_visible_keys,
        cache_family="kv",
    )
)

add(
    VariantSpec(
        name="dot_product",
        summary="exact dot-product attention softmax(QKᵀ)V, unscaled (scale=1 unless given)",
        exact=True,
        cost="O(N²·D)",
        supports=Supports(dropout=True),
        impls=dict(IMPLS),
        default_scale=1.0,
        visible_keys=full_visible_keys,
        cache_family="kv",
    )
)
