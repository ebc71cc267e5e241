"""The explicit reference path: dense masked softmax. O(Nq·Nk) time and memory.

Exact variants use it as their ``math`` backend (the one that returns weights) with their
pattern given as a dense mask. It computes in float32 at least (float64 stays float64) and
returns results in the input dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..inputs import repeat_kv

if TYPE_CHECKING:
    from .dropout import Dropout


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim where ``mask`` is True; rows with nothing visible give zeros.

    The -inf fill of a fully masked row is replaced by 0 before the softmax so that neither the
    forward nor the backward pass sees a NaN; the row is then multiplied by 0.
    """
    if mask is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(~mask, float("-inf"))
    visible = mask.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~visible, 0.0)
    return torch.softmax(scores, dim=-1) * visible


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None,
    return_weights: bool,
    dropout: Dropout | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``softmax(q kᵀ·scale masked) v`` with ``mask`` bool, broadcastable to ``(B, H, Nq, Nk)``.

    With ``dropout`` (:class:`~sparse_linear_attn.backends.dropout.Dropout`) the weights are
    dropped out and rescaled before ``v``, and the returned weights are those dropped-out ones
    (as ``nn.MultiheadAttention`` returns them)."""
    H = q.shape[1]
    k, v = repeat_kv(k, H), repeat_kv(v, H)
    work = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * scale
    weights = masked_softmax(scores, mask)
    if dropout is not None:
        weights = dropout.apply_dense(weights)
    out = torch.matmul(weights, v.to(work)).to(q.dtype)
    return out, (weights.to(q.dtype) if return_weights else None)
