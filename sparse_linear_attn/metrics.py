"""The measures the whole project reports: the relative error of an output and the attention
mass a pattern keeps (recall)."""

from __future__ import annotations

import math

import torch


def relative_error(approx: torch.Tensor, exact: torch.Tensor, *, per_head: bool = False) -> torch.Tensor:
    """``‖approx − exact‖_F / ‖exact‖_F`` computed in float64.

    With ``per_head=True`` the norms are taken over the last two dims separately for each
    leading index, giving a ``(B, H)`` tensor for ``(B, H, N, D)`` inputs. Returns a float64
    tensor (0-dim by default). Where ``exact`` is all zeros the error is 0 if ``approx`` is too,
    else ``inf``.
    """
    if approx.shape != exact.shape:
        raise ValueError(
            f"relative_error needs tensors of one shape, got {tuple(approx.shape)} and {tuple(exact.shape)}"
        )
    a = approx.detach().to(torch.float64)
    e = exact.detach().to(a.device, torch.float64)
    diff = a - e
    if per_head:
        if a.dim() < 2:
            raise ValueError(f"per_head=True needs at least 2 dims, got shape {tuple(a.shape)}")
        num = torch.linalg.vector_norm(diff.flatten(-2), dim=-1)
        den = torch.linalg.vector_norm(e.flatten(-2), dim=-1)
    else:
        num = torch.linalg.vector_norm(diff)
        den = torch.linalg.vector_norm(e)
    zero = den == 0
    out = num / torch.where(zero, torch.ones_like(den), den)
    return torch.where(zero, torch.where(num == 0, 0.0, float("inf")).to(out), out)


def attention_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    computed: torch.Tensor | None,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    chunk_bytes: int = 64 << 20,
) -> torch.Tensor:
    """The exact softmax mass that falls inside the entries a variant computes, per query row.

    ``recall_i = Σ_{j ∈ C_i ∩ V_i} p_ij`` with ``p_ij = e^{s_ij} / Σ_{j ∈ V_i} e^{s_ij}``,
    ``s = q·kᵀ·scale`` (default ``1/√D``), ``V_i`` the keys query ``i`` may see (bottom-right
    causal, unpadded) and ``C_i`` the computed entries. 1 means the pattern holds all of the
    row's attention; an exact sparse variant's output error comes from the ``1 − recall_i``
    it drops.

    q ``(B, H, Nq, D)``, k ``(B, Hkv, Nk, D)`` with ``H % Hkv == 0``; ``key_padding_mask`` bool
    ``(B, Nk)``, True = padded. ``rows``: int64 query indices to evaluate (None: all ``Nq``);
    ``computed``: bool broadcastable to ``(B, H, R, Nk)`` for those ``R`` rows (None: every
    visible key, recall 1). Returns float64 ``(B, H, R)``; a row that sees no key has nothing
    to miss and gets 1. Computed in float64 in chunks of rows, each holding about
    ``chunk_bytes`` of scores: O(R·Nk·D) time, no ``Nq×Nk`` buffer.
    """
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[-1] != D or H % Hkv:
        raise ValueError(f"attention_recall needs q (B, H, Nq, D) and k (B, Hkv, Nk, D), H % Hkv == 0; got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")  # fmt: skip
    device = q.device
    rows = torch.arange(Nq, device=device) if rows is None else torch.as_tensor(rows, device=device).long()
    R = rows.numel()
    if computed is not None and computed.dtype != torch.bool:
        raise ValueError(f"computed must be a bool mask, got {computed.dtype}")
    if computed is not None and computed.shape[-2] not in (1, R):
        raise ValueError(f"computed has {computed.shape[-2]} rows, expected {R} (one per evaluated row) or 1")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kk = k.detach().to(torch.float64).repeat_interleave(H // Hkv, dim=1)
    pad = None if key_padding_mask is None else key_padding_mask.to(device)[:, None, None, :]
    out = torch.empty(B, H, R, dtype=torch.float64, device=device)
    step = max(1, chunk_bytes // max(1, B * H * Nk * 8))
    cols = torch.arange(Nk, device=device)
    for r0 in range(0, R, step):
        idx = rows[r0 : r0 + step]
        s = torch.matmul(q.detach()[:, :, idx].to(torch.float64), kk.transpose(-1, -2)) * scale
        vis = torch.ones(1, 1, idx.numel(), Nk, dtype=torch.bool, device=device)
        if causal:
            vis = vis & (cols[None, :] <= idx[:, None] + (Nk - Nq))
        if pad is not None:
            vis = vis & ~pad
        s = s.masked_fill(~vis, float("-inf"))
        total = torch.logsumexp(s, dim=-1)
        if computed is None:
            inside = total
        else:
            c = computed if computed.shape[-2] == 1 else computed[..., r0 : r0 + idx.numel(), :]
            inside = torch.logsumexp(s.masked_fill(~c.to(device), float("-inf")), dim=-1)
        seen = torch.isfinite(total)
        rec = torch.exp(inside - torch.where(seen, total, torch.zeros_like(total)))
        out[:, :, r0 : r0 + idx.numel()] = torch.where(seen, rec, torch.ones_like(rec))
    return out
