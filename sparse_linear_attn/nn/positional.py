"""Positional encodings as small reusable modules: RoPE, sinusoidal, ALiBi.

Attention itself is permutation-invariant over keys; a model that forgets a positional
encoding cannot tell "the token before" from "a token somewhere". Three common choices:

* :class:`RotaryEmbedding` (RoPE, Su et al. 2021) rotates each pair of channels of q and k by an
  angle proportional to the position, so that ``⟨R_m q, R_n k⟩`` depends only on ``m − n``.
  It acts on q and k *before* the attention variant, so it works with every variant
  (for linear attention it is applied before the feature map). Cost O(N·D).
* :class:`SinusoidalPositionalEncoding` (Vaswani et al. 2017) adds fixed absolute encodings
  to the inputs. Cost O(N·E).
* :class:`ALiBi` (Press et al. 2022) adds ``−slope_h · distance(i, j)`` to the scores of head
  ``h``. It needs a variant that can add a bias to its scores (the exact ones, through the
  dense path), and the bias is an ``(H, Nq, Nk)`` tensor: O(H·Nq·Nk) memory.

Positions of queries and keys follow the library's bottom-right alignment: with ``Nq``
queries and ``Nk`` keys, query ``i`` sits at position ``i + Nk − Nq`` (the same rule as
``causal=True``, so that decoding with a KV cache sees the right distances).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..inputs import causal_offset


def _check_dim(name: str, value: int, *, even: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if even and value % 2:
        raise ValueError(f"{name} must be even (channels are rotated in pairs), got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# RoPE


def rope_angles(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Angles ``(N, dim/2)``: ``positions[n] · base^(−2i/dim)`` in float64 for exactness."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    return positions.to(torch.float64)[:, None] * inv_freq[None, :]


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate channel pairs ``(x[..., i], x[..., i + D/2])`` of ``x (..., N, D)`` by ``rope_angles``.

    The "rotate half" layout (GPT-NeoX, LLaMA): pair ``i`` is channels ``i`` and ``i + D/2``.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head_dim (channels are rotated in pairs), got {d}")
    if positions.shape != (x.shape[-2],):
        raise ValueError(f"positions must have shape ({x.shape[-2]},), got {tuple(positions.shape)}")
    ang = rope_angles(positions, d, base)
    work = torch.promote_types(x.dtype, torch.float32)
    cos, sin = ang.cos().to(work), ang.sin().to(work)
    x1, x2 = x.to(work).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE for ``q (B, H, Nq, D)`` and ``k (B, Hkv, Nk, D)``; no learned parameters.

    ``forward(q, k, offset=0) -> (q_rot, k_rot)`` with keys at positions ``offset ..
    offset + Nk − 1`` and queries at the last ``Nq`` of them (bottom-right alignment); a decoding
    step passes ``offset = cache.seq_len``. Cost O((Nq + Nk)·D).
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.head_dim = _check_dim("head_dim", head_dim, even=True)
        if not (isinstance(base, (int, float)) and not isinstance(base, bool) and base > 1):
            raise ValueError(f"base must be a number > 1, got {base!r}")
        self.base = float(base)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"RotaryEmbedding(head_dim={self.head_dim}) got head_dim {x.shape[-1]}")
        return apply_rope(x, positions, self.base)

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        nq, nk = q.shape[-2], k.shape[-2]
        kpos = torch.arange(offset, offset + nk, device=k.device)
        qpos = torch.arange(nq, device=q.device) + offset + causal_offset(nq, nk)
        return self.rotate(q, qpos), self.rotate(k, kpos)


# ---------------------------------------------------------------------------------------------
# Sinusoidal


def sinusoidal_encoding(
    n: int, dim: int, *, base: float = 10000.0, offset: int = 0, device=None, dtype=torch.float32
) -> torch.Tensor:
    """``(n, dim)``: ``PE[p, 2i] = sin(p / base^(2i/dim))``, ``PE[p, 2i+1] = cos(...)`` (Vaswani)."""
    pos = torch.arange(offset, offset + n, dtype=torch.float64, device=device)[:, None]
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    ang = pos * inv[None, :]
    pe = torch.empty(n, dim, dtype=torch.float64, device=device)
    pe[:, 0::2] = ang.sin()
    pe[:, 1::2] = ang.cos()[:, : dim // 2]
    return pe.to(dtype)


class SinusoidalPositionalEncoding(nn.Module):
    """Adds fixed sinusoidal encodings to ``x``: ``(B, N, dim)`` (``batch_first=True``) or
    ``(N, B, dim)``. Use it once on the token embeddings (Vaswani et al.); no parameters."""

    def __init__(self, dim: int, base: float = 10000.0, batch_first: bool = True):
        super().__init__()
        self.dim = _check_dim("dim", dim)
        self.base = float(base)
        self.batch_first = batch_first

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, batch_first={self.batch_first}"

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"SinusoidalPositionalEncoding(dim={self.dim}) got input of shape {tuple(x.shape)}")
        n = x.shape[-2] if (self.batch_first or x.dim() == 2) else x.shape[0]
        pe = sinusoidal_encoding(n, self.dim, base=self.base, offset=offset, device=x.device, dtype=x.dtype)
        if x.dim() == 3 and not self.batch_first:
            pe = pe[:, None, :]
        return x + pe


# ---------------------------------------------------------------------------------------------
# ALiBi


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head slopes of Press et al.: ``2^(−8h/n)`` for ``h = 1..n`` when ``n`` is a power of
    two; otherwise those of the nearest lower power of two followed by every other slope of
    the next power of two (the reference implementation's rule)."""
    _check_dim("num_heads", num_heads)

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        lower = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(lower) + power_of_two(2 * lower)[0::2][: num_heads - lower]
    return torch.tensor(slopes, dtype=torch.float64)


class ALiBi(nn.Module):
    """Attention with linear biases: ``bias[h, i, j] = −slope_h · |pos(i) − j|``.

    ``pos(i) = i + Nk − Nq`` (bottom-right alignment). Causally masked, ``|pos(i) − j|`` is the
    paper's ``pos(i) − j``; without a causal mask the bias is symmetric in distance.
    ``forward(nq, nk) -> (H, nq, nk)`` float tensor to add to the scores: O(H·Nq·Nk).
    ``bias(q_positions, k_positions)`` gives it for explicit positions (decoding with a cache).
    """

    slopes: torch.Tensor

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = _check_dim("num_heads", num_heads)
        self.register_buffer("slopes", alibi_slopes(num_heads).float(), persistent=False)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"

    def forward(self, nq: int, nk: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
        device = self.slopes.device if device is None else device
        i = torch.arange(nq, device=device) + causal_offset(nq, nk)
        return self.bias(i, torch.arange(nk, device=device), dtype=dtype)

    def bias(self, q_positions: torch.Tensor, k_positions: torch.Tensor, *, dtype=torch.float32) -> torch.Tensor:
        """``(H, len(q_positions), len(k_positions))``: ``−slope_h · |q_pos − k_pos|``."""
        dist = (q_positions[:, None] - k_positions[None, :]).abs().to(dtype)
        return -self.slopes.to(device=dist.device, dtype=dtype)[:, None, None] * dist[None]


POSITIONAL = ("rope", "sinusoidal", "alibi")
