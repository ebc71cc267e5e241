"""Attention dropout whose mask is a function of position, the same on every path that computes it.

Dropout on attention weights (SDPA's and FlashAttention's ``dropout_p``) zeroes each weight
with probability ``p`` and rescales the rest, so the output is unbiased::

    P = softmax(q·kᵀ·scale, masked),    P̃ᵢⱼ = Pᵢⱼ · keepᵢⱼ / (1 − p),    out = P̃ V

``keep`` is not drawn from a random stream: it is a hash of ``(seed, row, j)``, with
``row = (b·H + h)·Nq + i`` (batch ``b``, query head ``h``, query ``i``) and ``j`` the key — a
counter-based generator, as FlashAttention's Philox. Any tiling computes the same ``keep``, so

* the tiled ``torch`` paths and the dense ``math`` reference drop the same weights (tests compare
  them exactly), and the result does not depend on tile or group sizes;
* the recomputation of a checkpointed tile in the backward pass drops what the forward dropped;
* one ``seed`` per call is drawn from torch's default generator (:func:`draw_seed`), so
  ``torch.manual_seed`` makes a run reproducible.

``keep`` is ``lowbias32(h_row ⊕ h_col) ≥ p·2³²`` where ``h_row``, ``h_col`` hash the row and
key with the seed (lowbias32: Wellons' 32-bit integer hash). Everything is int64 arithmetic
that never overflows (multiplications are split in 16-bit halves), so it gives the same bits on
every device. Cost: about twenty elementwise int64 operations per weight, on the tile being
computed; no N×N tensor beyond what the caller's tile already is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch

from .math import masked_softmax

_M32 = 0xFFFFFFFF


_LOWBIAS = (0x7FEB352D, 0x846CA68B)


def _mul32(x, m: int):
    """``(x · m) mod 2³²`` for ``0 ≤ x < 2³²`` (int64 tensor or int) without overflowing int64."""
    low = x * (m & 0xFFFF)  # < 2⁴⁸
    high = ((x * (m >> 16)) & 0xFFFF) << 16  # only the low 16 bits survive the shift mod 2³²
    return (low + high) & _M32


def _mix32(x):
    """lowbias32 (C. Wellons, hash-prospector) on int64 tensors or ints holding 32-bit values:
    a bijection of 32-bit values with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, _LOWBIAS[0])
    x = x ^ (x >> 15)
    x = _mul32(x, _LOWBIAS[1])
    return x ^ (x >> 16)


def _mix32_numpy(x: np.ndarray) -> np.ndarray:
    """:func:`_mix32` in place on a uint32 array, whose arithmetic wraps mod 2³² by definition.

    The CPU path: torch's integer shifts and 64-bit multiplies are not vectorised there, and
    cost ten times numpy's on the same array (docs/sparse.md)."""
    x ^= x >> 16
    x *= np.uint32(_LOWBIAS[0])
    x ^= x >> 15
    x *= np.uint32(_LOWBIAS[1])
    x ^= x >> 16
    return x


def draw_seed() -> int:
    """A 64-bit seed from torch's default (CPU) generator: ``torch.manual_seed`` fixes it."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


@dataclass(frozen=True)
class Dropout:
    """Dropout of attention weights with probability ``p`` (``0 < p < 1``), mask drawn from ``seed``."""

    p: float
    seed: int

    def keep(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Bool, broadcast of ``rows`` and ``cols`` (int64): True where weight ``(row, col)`` is kept.

        ``rows`` are global query rows ``(b·H + h)·Nq + i``, ``cols`` key positions ``j``; any
        shapes that broadcast (a tile's ``(…, T, 1)`` rows against its ``(…, 1, L)`` keys).
        Values outside ``[0, 2⁶³)`` are allowed (they hash to something; callers mask them).
        """
        s_lo, s_hi = self.seed & _M32, (self.seed >> 32) & _M32
        rows = rows.to(torch.int64)
        # Rows and keys are hashed once each (vectors); one more hash per weight mixes them.
        h_row = _mix32(_mix32((rows & _M32) ^ s_lo) ^ ((rows >> 32) & _M32))
        h_col = _mix32((cols.to(torch.int64) & _M32) ^ _mix32(s_hi ^ 0x9E3779B9))
        if rows.device.type == "cpu" and cols.device.type == "cpu":
            # Same bits through numpy's uint32, a few times faster than torch's int64 on CPU.
            mixed = _mix32_numpy(np.bitwise_xor(h_row.numpy().astype(np.uint32), h_col.numpy().astype(np.uint32)))
            return torch.from_numpy(mixed >= np.uint32(self._threshold()))
        return _mix32(h_row ^ h_col) >= self._threshold()

    def _threshold(self) -> int:
        return min(_M32, round(self.p * 2**32))

    def apply(self, weights: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``weights · keep / (1 − p)`` (differentiable in ``weights``)."""
        keep = self.keep(rows, cols)
        return torch.where(keep, weights * (1.0 / (1.0 - self.p)), torch.zeros((), dtype=weights.dtype))

    def apply_dense(self, weights: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` to a whole weight matrix ``(B, H, Nq, Nk)``."""
        B, H, nq, nk = weights.shape
        return self.apply(weights, dense_rows(B, H, nq, weights.device), torch.arange(nk, device=weights.device))


def query_rows(
    batch: torch.Tensor | int, head: torch.Tensor | int, i: torch.Tensor, *, heads: int, nq: int
) -> torch.Tensor:
    """The global row ``(b·H + h)·Nq + i`` that :meth:`Dropout.keep` hashes (broadcasting)."""
    return (batch * heads + head) * nq + i


def dense_rows(B: int, H: int, nq: int, device=None) -> torch.Tensor:
    """Rows ``(B, H, nq, 1)`` of a whole ``(B, H, Nq, Nk)`` weight matrix."""
    b = torch.arange(B, device=device)[:, None, None, None]
    h = torch.arange(H, device=device)[None, :, None, None]
    i = torch.arange(nq, device=device)[None, None, :, None]
    return query_rows(b, h, i, heads=H, nq=nq)


@overload
def dropout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None,
    dropout: Dropout,
    rows: torch.Tensor,
    cols: torch.Tensor,
    return_lse: Literal[False] = ...,
) -> torch.Tensor: ...
@overload
def dropout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None,
    dropout: Dropout,
    rows: torch.Tensor,
    cols: torch.Tensor,
    return_lse: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def dropout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None,
    dropout: Dropout,
    rows: torch.Tensor,
    cols: torch.Tensor,
    return_lse: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...
def dropout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None,
    dropout: Dropout,
    rows: torch.Tensor,
    cols: torch.Tensor,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(q·kᵀ·scale, where mask) ⊙ keep / (1 − p)) · v`` for one tile (or a batch of them).

    q ``(…, H, T, D)``, k ``(…, Hkv, L, D)``, v ``(…, Hkv, L, Dv)`` with ``H % Hkv == 0``;
    ``mask`` bool broadcastable to ``(…, H, T, L)`` (True = visible; a row seeing nothing gives
    zeros); ``rows`` broadcastable to ``(…, H, T, 1)`` and ``cols`` to ``(…, 1|H, 1, L)`` place
    the tile in the whole weight matrix (:func:`query_rows`, key positions). Computes in float32
    at least and returns ``(…, H, T, Dv)`` in q's dtype. Memory O(…·H·T·L): callers pass tiles.

    ``return_lse``: also each query's log-sum-exp of its visible *undropped* scores ``(…, H, T)``
    (−inf where it sees nothing), and the output in the work dtype, for merging with other parts
    of the row (:func:`~sparse_linear_attn.backends.partial.merge_partials`): dropout is linear in
    the weights, so rescaling each part's dropped output by ``exp(lse_part − lse)`` drops the
    union's weights.
    """
    H, Hkv = q.shape[-3], k.shape[-3]
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, dim=-3)
        v = v.repeat_interleave(H // Hkv, dim=-3)
    work = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * scale
    weights = dropout.apply(masked_softmax(scores, mask), rows, cols)
    out = torch.matmul(weights, v.to(work))
    if not return_lse:
        return out.to(q.dtype)
    if mask is None:
        return out, torch.logsumexp(scores, dim=-1)
    seen = mask.any(dim=-1)
    # Rows that see nothing: a finite stand-in inside logsumexp (no NaN gradient), then −inf.
    lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")).masked_fill(~seen[..., None], 0.0), dim=-1)
    return out, lse.masked_fill(~seen.expand_as(lse), float("-inf"))
