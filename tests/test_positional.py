"""RoPE, sinusoidal and ALiBi modules against their definitions (computed here, independently)."""

import cmath
import math

import pytest
import torch

import sparse_linear_attn as sla
from sparse_linear_attn.nn.positional import alibi_slopes, apply_rope, sinusoidal_encoding


def test_rope_matches_complex_rotation():
    # Reference: pair i = (x[i], x[i + D/2]) as the complex number x[i] + j·x[i+D/2], times e^{j·p·θ_i}.
    torch.manual_seed(0)
    D, N = 8, 5
    x = torch.randn(N, D, dtype=torch.float64)
    pos = torch.arange(N) * 3 - 4
    got = apply_rope(x, pos)
    for n in range(N):
        for i in range(D // 2):
            theta = pos[n].item() * 10000.0 ** (-2 * i / D)
            z = complex(x[n, i], x[n, i + D // 2]) * cmath.exp(1j * theta)
            assert got[n, i].item() == pytest.approx(z.real, abs=1e-12)
            assert got[n, i + D // 2].item() == pytest.approx(z.imag, abs=1e-12)


def test_rope_inner_product_depends_only_on_offset():
    torch.manual_seed(1)
    D = 16
    rope = sla.RotaryEmbedding(D)
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)

    def dot(m, n):
        rq = rope.rotate(q[None], torch.tensor([m]))[0]
        rk = rope.rotate(k[None], torch.tensor([n]))[0]
        return float(rq @ rk)

    for delta in (0, 1, 7, -5):
        values = [dot(m, m - delta) for m in (0, 3, 50, 1000)]
        assert max(values) - min(values) < 1e-9, (delta, values)
    # ...and it does depend on the offset (the test would pass trivially for the identity map).
    assert abs(dot(10, 10) - dot(10, 3)) > 1e-3
    # Rotation preserves norms.
    assert float(rope.rotate(q[None], torch.tensor([17]))[0].norm()) == pytest.approx(float(q.norm()), rel=1e-12)


def test_rope_module_positions_bottom_right_and_shapes():
    torch.manual_seed(2)
    rope = sla.RotaryEmbedding(8)
    q = torch.randn(2, 4, 3, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 8, dtype=torch.float64)
    rq, rk = rope(q, k)
    assert rq.shape == q.shape and rk.shape == k.shape
    # Query i sits at position i + Nk - Nq = i + 4.
    torch.testing.assert_close(rq[:, :, 0], apply_rope(q[:, :, :1], torch.tensor([4]))[:, :, 0])
    torch.testing.assert_close(rk[:, :, 6], apply_rope(k[:, :, 6:7], torch.tensor([6]))[:, :, 0])


def test_rope_errors():
    with pytest.raises(ValueError, match="even"):
        sla.RotaryEmbedding(7)
    with pytest.raises(ValueError, match="head_dim"):
        sla.RotaryEmbedding(8).rotate(torch.randn(3, 4), torch.arange(3))


def test_sinusoidal_values_and_module():
    n, dim = 6, 10
    pe = sinusoidal_encoding(n, dim, dtype=torch.float64)
    for p in range(n):
        for i in range(0, dim, 2):
            w = p / 10000.0 ** (i / dim)
            assert pe[p, i].item() == pytest.approx(math.sin(w), abs=1e-12)
            assert pe[p, i + 1].item() == pytest.approx(math.cos(w), abs=1e-12)
    x = torch.randn(3, n, dim, dtype=torch.float64)
    torch.testing.assert_close(sla.SinusoidalPositionalEncoding(dim)(x), x + pe)
    seq_first = sla.SinusoidalPositionalEncoding(dim, batch_first=False)(x.transpose(0, 1))
    torch.testing.assert_close(seq_first.transpose(0, 1), x + pe)
    odd = sinusoidal_encoding(4, 5, dtype=torch.float64)
    assert odd.shape == (4, 5) and odd[3, 4].item() == pytest.approx(math.sin(3 / 10000.0 ** (4 / 5)))
    with pytest.raises(ValueError, match="dim=10"):
        sla.SinusoidalPositionalEncoding(dim)(torch.randn(2, 3, 4))


def test_alibi_slopes_follow_press_et_al():
    # Power of two: geometric sequence starting at 2^(-8/n) with that ratio.
    assert alibi_slopes(8).tolist() == [2.0 ** -(h + 1) for h in range(8)]
    assert alibi_slopes(4).tolist() == [2.0 ** -(2 * (h + 1)) for h in range(4)]
    # Not a power of two (the paper's code): slopes of 4 heads, then every other slope of 8 heads.
    assert alibi_slopes(6).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    assert len(alibi_slopes(12)) == 12 and len(set(alibi_slopes(12).tolist())) == 12


def test_alibi_bias_is_minus_slope_times_distance():
    H, nq, nk = 4, 3, 5
    alibi = sla.ALiBi(H)
    bias = alibi(nq, nk, dtype=torch.float64)
    slopes = alibi_slopes(H)
    assert bias.shape == (H, nq, nk)
    for h in range(H):
        for i in range(nq):
            for j in range(nk):
                distance = abs((i + nk - nq) - j)
                assert bias[h, i, j].item() == pytest.approx(-slopes[h].item() * distance, abs=1e-12)
    with pytest.raises(ValueError, match="num_heads"):
        sla.ALiBi(0)
