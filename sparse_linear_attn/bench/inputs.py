"""Synthetic benchmark inputs. The approximation error of a variant depends on them, so every
record says which kind was used.

* ``random``  — Gaussian q, k, v; q is multiplied by ``temperature``, so logits scale with it
  (kernelized attention degrades sharply as ‖q‖·‖k‖ grows).
* ``local``   — keys follow a smooth random process along the sequence (exponential
  correlation length ``LOCAL_LENGTH``) and each query resembles its own key, so the logit
  ``q_i·k_j`` decays with ``|i − j|``: attention mass concentrates near the diagonal, as in
  language models.
* ``peaked``  — each query is a strong copy of ``PEAKED_MATCHES`` keys (at or before it when
  causal) plus noise: a few keys take almost all the mass (retrieval-like).
* ``real``    — Q, K, V captured from all-MiniLM-L6-v2 on real text (see :mod:`.real`).

Everything is drawn in float32 on the CPU, ``CHUNK`` positions at a time, each chunk from its
own generator seeded by ``(seed, kind, stream, chunk index)``: the same seed gives the same
inputs on any device, the inputs at N are a prefix of those at a longer N (except ``peaked``
without causality, whose matches are drawn over the whole sequence), and memory beyond the
three outputs stays bounded (a few MiB per chunk) at any N.
"""

from __future__ import annotations

import hashlib
import math

import torch

INPUT_KINDS = ("random", "local", "peaked", "real")
LOCAL_LENGTH = 32.0
PEAKED_MATCHES = 4
#: Positions drawn per chunk.
CHUNK = 2048


def _gen(seed: int, kind: str, stream: str, chunk: int) -> torch.Generator:
    h = hashlib.sha256(f"{seed}/{kind}/{stream}/{chunk}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def _chunks(n: int):
    for c in range(math.ceil(n / CHUNK)):
        yield c, c * CHUNK, min(n, (c + 1) * CHUNK)


def _randn(out: torch.Tensor, seed: int, kind: str, stream: str, scale: float = 1.0, add: bool = False) -> None:
    """Fill (or add to) ``out (B, H, N, D)`` chunk by chunk with N(0, scale²) noise."""
    B, H, n, D = out.shape
    for c, lo, hi in _chunks(n):
        x = torch.randn(B, H, CHUNK, D, generator=_gen(seed, kind, stream, c))[:, :, : hi - lo]
        if scale != 1.0:
            x.mul_(scale)
        if add:
            out[:, :, lo:hi] += x
        else:
            out[:, :, lo:hi] = x


def _smooth_noise(out: torch.Tensor, seed: int, kind: str, length: float) -> None:
    """Fill ``out (B, H, N, D)`` with unit-variance noise along dim -2 correlated as
    exp(-|i-j|/length): white noise convolved with the AR(1) impulse response ρ^t, truncated
    at ``12·length`` taps and normalised, one chunk at a time by FFT (each chunk also reads the
    white noise of the previous one, for the taps that reach back into it)."""
    B, H, n, D = out.shape
    rho = math.exp(-1.0 / length)
    taps = int(12 * length) + 1
    kernel = rho ** torch.arange(taps, dtype=torch.float64)
    kernel = (kernel / kernel.square().sum().sqrt()).float()
    size = CHUNK + taps
    kspec = torch.fft.rfft(kernel, n=size)[:, None]
    prev = None
    for c, lo, hi in _chunks(n):
        white = torch.randn(B, H, CHUNK, D, generator=_gen(seed, kind, "white", c))
        if prev is None:
            prev = torch.randn(B, H, CHUNK, D, generator=_gen(seed, kind, "white", c - 1))
        x = torch.cat([prev[:, :, CHUNK - (taps - 1) :], white], dim=2)  # (B, H, taps-1+CHUNK, D)
        y = torch.fft.irfft(torch.fft.rfft(x, n=size, dim=-2) * kspec, n=size, dim=-2)
        out[:, :, lo:hi] = y[:, :, taps - 1 : taps - 1 + (hi - lo)]
        prev = white


def make_inputs(
    kind: str,
    batch: int,
    heads: int,
    n: int,
    head_dim: int,
    *,
    temperature: float = 1.0,
    causal: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 CPU tensors q, k, v of shape ``(batch, heads, n, head_dim)`` for a synthetic kind."""
    if kind not in ("random", "local", "peaked"):
        raise ValueError(
            f"unknown synthetic input kind {kind!r}; accepted: random, local, peaked (real: see bench.real)"
        )
    shape = (batch, heads, n, head_dim)
    q, k, v = torch.empty(shape), torch.empty(shape), torch.empty(shape)
    if kind == "random":
        _randn(q, seed, kind, "q")
        _randn(k, seed, kind, "k")
    elif kind == "local":
        # q_i·k_j·/√D ≈ √D·ρ^|i−j| in expectation: a self-logit of ~√D that fades over ~LOCAL_LENGTH.
        _smooth_noise(k, seed, kind, LOCAL_LENGTH)
        q.copy_(k)
        _randn(q, seed, kind, "q", scale=0.3, add=True)
    else:
        _randn(k, seed, kind, "k")
        # Matches drawn uniformly among the keys each query may see (j <= i when causal).
        P = PEAKED_MATCHES
        for c, lo, hi in _chunks(n):
            u = torch.rand(batch, heads, CHUNK, P, generator=_gen(seed, kind, "u", c))[:, :, : hi - lo]
            limit = torch.arange(lo + 1, hi + 1).view(1, 1, -1, 1) if causal else torch.full((1, 1, 1, 1), n)
            idx = (u * limit).long().clamp_max(n - 1)
            flat = idx.reshape(batch, heads, (hi - lo) * P, 1).expand(-1, -1, -1, head_dim)
            picked = torch.gather(k, 2, flat).view(batch, heads, hi - lo, P, head_dim)
            # Logit of a matched key ≈ (3/√P)·‖k‖²/√D = 1.5·√D (P = 4), far above the O(1) others.
            q[:, :, lo:hi] = 3.0 * picked.sum(dim=3) / math.sqrt(P)
        _randn(q, seed, kind, "q", scale=0.5, add=True)
    _randn(v, seed, kind, "v")
    if temperature != 1.0:
        q.mul_(temperature)
    return q, k, v


def input_bytes(batch: int, heads: int, n: int, head_dim: int) -> int:
    """Memory :func:`make_inputs` holds at its peak: the three float32 outputs plus one chunk's work."""
    chunk = batch * heads * (CHUNK + int(12 * LOCAL_LENGTH) + 1) * head_dim * 4
    return 3 * batch * heads * n * head_dim * 4 + 8 * chunk
