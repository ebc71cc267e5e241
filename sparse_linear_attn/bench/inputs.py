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

Everything is drawn in float32 on the CPU from a seeded generator (so the same seed gives the
same inputs on any device), then moved to the benchmark's device and dtype.
"""

from __future__ import annotations

import math

import torch

INPUT_KINDS = ("random", "local", "peaked", "real")
LOCAL_LENGTH = 32.0
PEAKED_MATCHES = 4


def _smooth_noise(gen: torch.Generator, shape: tuple[int, ...], length: float) -> torch.Tensor:
    """Unit-variance noise along dim -2 with correlation exp(-|i-j|/length) (an AR(1) process,
    computed by FFT convolution with its impulse response rather than a length-N loop)."""
    *lead, n, d = shape
    rho = math.exp(-1.0 / length)
    taps = min(n, int(12 * length) + 1)
    kernel = rho ** torch.arange(taps, dtype=torch.float64)
    kernel = (kernel / kernel.square().sum().sqrt()).float()
    white = torch.randn(*lead, n + taps, d, generator=gen)
    size = n + 2 * taps
    spec = torch.fft.rfft(white, n=size, dim=-2) * torch.fft.rfft(kernel, n=size)[:, None]
    out = torch.fft.irfft(spec, n=size, dim=-2)[..., taps : taps + n, :]
    return out.contiguous()


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
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, n, head_dim)
    if kind == "random":
        q = torch.randn(shape, generator=gen)
        k = torch.randn(shape, generator=gen)
    elif kind == "local":
        # q_i·k_j·/√D ≈ √D·ρ^|i−j| in expectation: a self-logit of ~√D that fades over ~LOCAL_LENGTH.
        k = _smooth_noise(gen, shape, LOCAL_LENGTH)
        q = k + 0.3 * torch.randn(shape, generator=gen)
    elif kind == "peaked":
        k = torch.randn(shape, generator=gen)
        # Matches drawn uniformly among the keys each query may see (j <= i when causal).
        u = torch.rand(batch, heads, n, PEAKED_MATCHES, generator=gen)
        limit = torch.arange(1, n + 1).view(1, 1, n, 1) if causal else torch.full((1, 1, 1, 1), n)
        idx = (u * limit).long().clamp_max(n - 1)
        flat = idx.reshape(batch, heads, n * PEAKED_MATCHES, 1).expand(-1, -1, -1, head_dim)
        picked = torch.gather(k, 2, flat).view(batch, heads, n, PEAKED_MATCHES, head_dim)
        # Logit of a matched key ≈ (3/√P)·‖k‖²/√D = 1.5·√D (P = 4), far above the O(1) others.
        q = 3.0 * picked.sum(dim=3) / math.sqrt(PEAKED_MATCHES) + 0.5 * torch.randn(shape, generator=gen)
    else:
        raise ValueError(
            f"unknown synthetic input kind {kind!r}; accepted: random, local, peaked (real: see bench.real)"
        )
    v = torch.randn(shape, generator=gen)
    return q * temperature, k, v
