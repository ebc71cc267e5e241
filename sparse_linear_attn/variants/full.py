"""``full`` — exact scaled dot-product attention, and ``dot_product``, its unscaled form.

    out = softmax(Q Kᵀ · scale + mask) V,    scale = 1/√D by default

Shapes ``(batch, heads, seq, head_dim)``: q ``(B, H, Nq, D)``, k ``(B, Hkv, Nk, D)``,
v ``(B, Hkv, Nk, Dv)``. Cost O(Nq·Nk·D) time; memory O(Nq + Nk) on the fused ``torch`` (SDPA)
and ``xformers`` backends, O(Nq·Nk) on ``math`` (which returns the weights).
"""

from __future__ import annotations

from ..backends.math import dense_attention
from ..backends.sdpa import full_sdpa
from ..backends.xformers_backend import full_xformers, no_key_padding
from ..inputs import causal_offset, full_visibility
from ..registry import Impl, Supports, VariantSpec, add


def full_reference(q, k, v, *, causal, key_padding_mask, scale, return_weights=False):
    """Dense masked softmax: the ``math`` backend and the definition the others must match."""
    mask = full_visibility(q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    return dense_attention(q, k, v, scale=scale, mask=mask, return_weights=return_weights)


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
    "torch": Impl(full_sdpa),
    "xformers": Impl(full_xformers, rules_out=no_key_padding),
    "math": Impl(full_reference),
}

add(
    VariantSpec(
        name="full",
        summary="exact softmax(QKᵀ·scale)V over every key (causal: bottom-right aligned)",
        exact=True,
        cost="O(N²·D)",
        supports=Supports(),
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
        supports=Supports(),
        impls=dict(IMPLS),
        default_scale=1.0,
        visible_keys=full_visible_keys,
        cache_family="kv",
    )
)
