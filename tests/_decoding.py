"""Feeding a sequence through a decoding cache, shared by the decoding tests."""

from __future__ import annotations

import torch

import sparse_linear_attn as sla


def decode(variant, params, q, k, v, splits, *, kpm=None, max_len=None, cache=None):
    """Feed the sequence chunk by chunk (lengths ``splits``); returns (outputs concatenated, cache)."""
    if cache is None:
        cache = sla.make_cache(
            variant, batch=q.shape[0], kv_heads=k.shape[1], head_dim=q.shape[-1], value_dim=v.shape[-1],
            dtype=q.dtype, max_len=max_len, **params,
        )  # fmt: skip
    outs, s = [], 0
    for n in splits:
        e = s + n
        mask = None if kpm is None else kpm[:, s:e]
        sl = slice(s, e)
        outs.append(
            sla.attention(
                q[:, :, sl],
                k[:, :, sl],
                v[:, :, sl],
                variant,
                causal=True,
                key_padding_mask=mask,
                cache=cache,
                **params,
            )  # fmt: skip
        )
        s = e
    return torch.cat(outs, dim=2), cache


def assert_close(a, b, tol):
    """Max absolute error within ``tol`` times the reference's largest magnitude (at least 1)."""
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * max(1.0, b.double().abs().max().item()), f"max error {err:.3g} > {tol:g}"
