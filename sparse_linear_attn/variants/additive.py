"""``additive`` — Bahdanau (additive) attention, with learned parameters.

    score(q_i, k_j) = scale · wᵀ tanh(W_q q_i + W_k k_j + b),    out = softmax_j(score + mask) V

``W_q, W_k: (hidden_dim, head_dim)``, ``b, w: (hidden_dim,)``, shared across heads; ``scale``
defaults to 1 (the scores are not dot products). Shapes ``(B, H, Nq, D)`` / ``(B, Hkv, Nk, D)`` /
``(B, Hkv, Nk, Dv)`` with ``D == head_dim``. Cost O(B·H·Nq·Nk·hidden_dim) time. The
``(chunk, Nk, hidden)`` tanh tensor is built one query chunk at a time so that memory stays
bounded (about ``chunk_elements`` floats), and under autograd each chunk is recomputed in the
backward pass rather than stored. Attention dropout drops each chunk's softmax weights with the
positional mask of :mod:`sparse_linear_attn.backends.dropout`. Available through ``sla.build`` only.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..backends.dropout import Dropout, query_rows
from ..backends.math import masked_softmax
from ..inputs import causal_offset
from ..registry import Param, Supports, VariantSpec, add, int_at_least

#: Elements of the (chunk, Nk, hidden) tanh tensor built at once.
CHUNK_ELEMENTS = 1 << 22


class AdditiveAttention(nn.Module):
    """Bahdanau attention over ``(B, H, N, D)`` tensors; see the module docstring for the math."""

    def __init__(self, head_dim: int = 64, hidden_dim: int = 64):
        super().__init__()
        self.head_dim = head_dim
        self.hidden_dim = hidden_dim
        self.w_q = nn.Parameter(torch.empty(hidden_dim, head_dim))
        self.w_k = nn.Parameter(torch.empty(hidden_dim, head_dim))
        self.bias = nn.Parameter(torch.zeros(hidden_dim))
        self.w = nn.Parameter(torch.empty(hidden_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.head_dim)
        nn.init.uniform_(self.w_q, -bound, bound)
        nn.init.uniform_(self.w_k, -bound, bound)
        nn.init.uniform_(self.w, -1.0 / math.sqrt(self.hidden_dim), 1.0 / math.sqrt(self.hidden_dim))
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, hidden_dim={self.hidden_dim}"

    def forward(self, q, k, v, *, causal=False, key_padding_mask=None, scale=None, return_weights=False, dropout=None):
        if q.shape[-1] != self.head_dim:
            raise ValueError(
                f"additive attention was built with head_dim={self.head_dim} but q has head_dim "
                f"{q.shape[-1]} (shape {tuple(q.shape)}); build it with head_dim={q.shape[-1]}"
            )
        scale = 1.0 if scale is None else scale
        B, H, Nq, _ = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        G = H // Hkv
        dtype = q.dtype
        # Project once, then group query heads onto their kv head so k is never copied per group.
        pq = (q @ self.w_q.to(dtype).t()).view(B, Hkv, G, Nq, self.hidden_dim)
        pk = (k @ self.w_k.to(dtype).t() + self.bias.to(dtype))[:, :, None]  # (B, Hkv, 1, Nk, hid)
        vg = v[:, :, None]  # (B, Hkv, 1, Nk, Dv)
        pad = None if key_padding_mask is None else ~key_padding_mask[:, None, None, None, :]
        chunk = max(1, CHUNK_ELEMENTS // max(1, B * H * Nk * self.hidden_dim))
        use_ckpt = torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v, self.w_q, self.w_k, self.w, self.bias)
        )
        outs, weights = [], []
        for s in range(0, Nq, chunk):
            e = min(Nq, s + chunk)
            args = (pq[:, :, :, s:e], pk, vg, self.w.to(dtype))

            def step(a, b, c, d, s=s, e=e):
                return self._chunk(a, b, c, d, s, e, Nq, Nk, causal, pad, scale, dropout)

            if use_ckpt and not return_weights:
                o, _ = checkpoint(step, *args, use_reentrant=False)
            else:
                o, w = step(*args)
                if return_weights:
                    weights.append(w)
            outs.append(o)
        out = torch.cat(outs, dim=3).reshape(B, H, Nq, v.shape[-1])
        if return_weights:
            return out, torch.cat(weights, dim=3).reshape(B, H, Nq, Nk)
        return out

    def _chunk(self, pq, pk, vg, w, s, e, nq, nk, causal, pad, scale, dropout: Dropout | None):
        scores = torch.tanh(pq[..., :, None, :] + pk[..., None, :, :]) @ w * scale  # (B,Hkv,G,c,Nk)
        mask = None
        if causal:
            i = torch.arange(s, e, device=pq.device)[:, None]
            mask = torch.arange(nk, device=pq.device)[None, :] <= i + causal_offset(nq, nk)
        if pad is not None:
            mask = pad if mask is None else mask & pad
        # Softmax in float32 at least (bf16 scores lose too much), float64 stays float64.
        p = masked_softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), mask)
        if dropout is not None:
            B, Hkv, G = pq.shape[:3]
            dev = pq.device
            b = torch.arange(B, device=dev).view(B, 1, 1, 1, 1)
            h = (torch.arange(Hkv, device=dev).view(Hkv, 1) * G + torch.arange(G, device=dev)).view(1, Hkv, G, 1, 1)
            i = torch.arange(s, e, device=dev).view(1, 1, 1, e - s, 1)
            p = dropout.apply(p, query_rows(b, h, i, heads=Hkv * G, nq=nq), torch.arange(nk, device=dev))
        p = p.to(vg.dtype)
        return p @ vg, p


add(
    VariantSpec(
        name="additive",
        summary="Bahdanau additive attention wᵀtanh(W_q q + W_k k + b), learned (use sla.build)",
        # Its scores are not QKᵀ, so it is no approximation of (and no exact) softmax attention.
        exact=False,
        cost="O(N²·hidden_dim)",
        params={
            "head_dim": Param("head_dim", 64, "size D of q and k (the learned projections' input)", int_at_least(1)),
            "hidden_dim": Param("hidden_dim", 64, "size of the tanh layer", int_at_least(1)),
        },
        supports=Supports(dropout=True),
        module=AdditiveAttention,
        default_scale=1.0,
        cache_family="kv",
        examples=({"head_dim": 8, "hidden_dim": 4},),
    )
)
