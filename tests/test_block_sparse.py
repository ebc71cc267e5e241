"""block_sparse against a float64 dense reference whose mask is written here from the definition:

    query i sees key j iff layout[(h,) i // bs, j // bs] (and j ≤ i + Nk − Nq when causal,
    element by element),

and the named patterns against layouts written here from their descriptions.
"""

from __future__ import annotations

import pytest
import torch
from _reference import pattern_attention, strided_qkv
from _trace import LargestTensor

import sparse_linear_attn as sla
from sparse_linear_attn.patterns import pattern_layout
from sparse_linear_attn.variants import block_sparse as bs_mod


def element_mask(layout, nq, nk, bs, causal):
    lay = layout if layout.dim() == 3 else layout[None]
    m = torch.zeros(lay.shape[0], nq, nk, dtype=torch.bool)
    for h in range(lay.shape[0]):
        for i in range(nq):
            for j in range(nk):
                m[h, i, j] = bool(lay[h, i // bs, j // bs]) and (not causal or j <= i + nk - nq)
    return m if layout.dim() == 3 else m[0]


def reference(q, k, v, mask, key_padding_mask=None):
    return pattern_attention(q, k, v, mask, key_padding_mask)[0]


def rand(B, H, Hkv, nq, nk, D=16, Dv=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, nq, D, generator=g).to(dtype),
        torch.randn(B, Hkv, nk, D, generator=g).to(dtype),
        torch.randn(B, Hkv, nk, Dv, generator=g).to(dtype),
    )


def rand_layout(shape, seed=0, p=0.4):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


CASES = [
    # nq, nk, block_size, causal, H, Hkv, key padding, per-head layout
    (96, 96, 16, True, 4, 2, False, False),
    (100, 100, 16, False, 2, 2, True, True),  # ragged: 100 = 6·16 + 4
    (70, 300, 32, True, 2, 1, True, False),  # cross-attention, Nq < Nk
    (300, 70, 32, True, 2, 2, False, True),  # Nq > Nk
    (64, 64, 64, False, 2, 2, False, False),  # a single block
    (50, 50, 7, True, 3, 3, True, False),  # odd block size
]


@pytest.mark.parametrize("backend", ["torch", "math"])
@pytest.mark.parametrize("nq,nk,bs,causal,H,Hkv,pad,per_head", CASES)
def test_layout_forward_matches_definition(backend, nq, nk, bs, causal, H, Hkv, pad, per_head):
    nqb, nkb = -(-nq // bs), -(-nk // bs)
    layout = rand_layout((H, nqb, nkb) if per_head else (nqb, nkb))
    q, k, v = rand(2, H, Hkv, nq, nk)
    kpm = (torch.rand(2, nk, generator=torch.Generator().manual_seed(3)) < 0.3) if pad else None
    out = sla.attention(
        q, k, v, "block_sparse", layout=layout, block_size=bs, causal=causal, key_padding_mask=kpm, backend=backend
    )
    ref = reference(q, k, v, element_mask(layout, nq, nk, bs, causal), kpm)
    assert out.shape == (2, H, nq, 8)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("blocks", [0, 5])
@pytest.mark.parametrize("nq,nk,bs,causal,H,Hkv,pad,per_head", CASES)
def test_many_small_groups_share_buffers(monkeypatch, nq, nk, bs, causal, H, Hkv, pad, per_head, blocks):
    # A small group budget splits the rows into many groups of different widths and mask kinds
    # (one row each, or about `blocks` key blocks each, so that rows of different widths share a
    # group) that reuse one set of buffers (no autograd) or are checkpointed one by one.
    monkeypatch.setattr(bs_mod, "GROUP_ELEMENTS", blocks * 2 * bs * 16 * max(H, Hkv))
    monkeypatch.setattr(bs_mod, "GRAD_GROUP_ELEMENTS", 3 * bs * 16 * H)
    nqb, nkb = -(-nq // bs), -(-nk // bs)
    layout = rand_layout((H, nqb, nkb) if per_head else (nqb, nkb), seed=7, p=0.5)
    q, k, v = rand(2, H, Hkv, nq, nk, seed=1)
    kpm = (torch.rand(2, nk, generator=torch.Generator().manual_seed(4)) < 0.3) if pad else None
    ref = reference(q, k, v, element_mask(layout, nq, nk, bs, causal), kpm)
    with torch.no_grad():
        out = sla.attention(q, k, v, "block_sparse", layout=layout, block_size=bs, causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    q, k, v = (t.double().requires_grad_(True) for t in (q, k, v))
    out = sla.attention(q, k, v, "block_sparse", layout=layout, block_size=bs, causal=causal, key_padding_mask=kpm)
    ref = reference(q, k, v, element_mask(layout, nq, nk, bs, causal), kpm)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
    cot = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(ref, (q, k, v), cot)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_causal_uniform_rows_use_one_diagonal_mask(monkeypatch):
    # bigbird with Nq == Nk: most rows have the same width and end on their diagonal tile, so
    # they run in groups with the shared additive diagonal mask; small groups, many of them.
    monkeypatch.setattr(bs_mod, "GROUP_ELEMENTS", 4 * 16 * 16 * 2 * 6)
    n, bs = 16 * 40, 16
    q, k, v = rand(1, 2, 2, n, n, seed=2)
    layout = pattern_layout("bigbird", n // bs, n // bs, causal=True, seed=3)
    with torch.no_grad():
        out = sla.attention(q, k, v, "block_sparse", pattern="bigbird", seed=3, block_size=bs, causal=True)
    ref = reference(q, k, v, element_mask(layout, n, n, bs, True))
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("grad", [True, False])
def test_never_builds_quadratic_tensors(monkeypatch, grad):
    # bigbird at N=4096: every tensor any op produces (gathered tiles, score tiles, masks; and
    # the backward with grad) stays no larger than q itself, far below N×N.
    monkeypatch.setattr(bs_mod, "GROUP_ELEMENTS", 1 << 15)
    monkeypatch.setattr(bs_mod, "GRAD_GROUP_ELEMENTS", 1 << 15)
    B, H, N, D = 1, 2, 4096, 16
    q, k, v = rand(B, H, H, N, N, D=D, Dv=D)
    for t in (q, k, v):
        t.requires_grad_(grad)
    with LargestTensor() as mode:
        out = sla.attention(q, k, v, "block_sparse", pattern="bigbird", block_size=64, causal=True, backend="torch")
        if grad:
            out.sum().backward()
    assert mode.largest <= B * H * N * D


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_match_reference(causal):
    nq = nk = 90
    bs = 16
    layout = rand_layout((6, 6), seed=5)
    q, k, v = rand(1, 4, 2, nq, nk, dtype=torch.float64)
    kpm = torch.zeros(1, nk, dtype=torch.bool)
    kpm[0, 20:35] = True
    for t in (q, k, v):
        t.requires_grad_(True)
    out = sla.attention(q, k, v, "block_sparse", layout=layout, block_size=bs, causal=causal, key_padding_mask=kpm)
    ref = reference(q, k, v, element_mask(layout, nq, nk, bs, causal), kpm)
    cot = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(ref, (q, k, v), cot)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_bf16_close_to_float64():
    q, k, v = rand(1, 2, 2, 256, 256, D=32, Dv=32, dtype=torch.bfloat16)
    out = sla.attention(q, k, v, "block_sparse", pattern="bigbird", block_size=32, causal=True)
    layout = pattern_layout("bigbird", 8, 8, causal=True)
    ref = reference(q, k, v, element_mask(layout, 256, 256, 32, True))
    assert out.dtype == torch.bfloat16
    assert float(sla.relative_error(out, ref)) < 1e-2


def named_layout(pattern, nb, causal, nl=3, ng=1, stride=4):
    """The named patterns written out from their descriptions (self-attention, nb blocks)."""
    m = torch.zeros(nb, nb, dtype=torch.bool)
    for a in range(nb):
        for b in range(nb):
            if pattern == "local":
                m[a, b] = abs(a - b) < nl
            elif pattern == "strided":
                m[a, b] = abs(a - b) < stride or (a - b) % stride == 0
            elif pattern == "fixed":
                m[a, b] = a // nl == b // nl or b % nl >= nl - ng
            elif pattern in ("longformer", "bigbird"):
                m[a, b] = abs(a - b) < nl or a < ng or b < ng
    return m


@pytest.mark.parametrize("pattern", ["local", "strided", "fixed", "longformer"])
def test_named_patterns(pattern):
    assert torch.equal(pattern_layout(pattern, 12, 12), named_layout(pattern, 12, False))
    mask = sla.dense_mask("block_sparse", 12 * 8, 12 * 8, causal=True, block_size=8, pattern=pattern)
    assert torch.equal(mask, element_mask(named_layout(pattern, 12, True), 96, 96, 8, True))


def test_bigbird_random_blocks_are_seeded_and_causal():
    base = named_layout("bigbird", 16, True)
    a = pattern_layout("bigbird", 16, 16, causal=True, num_random_blocks=2, seed=7)
    assert torch.equal(a, pattern_layout("bigbird", 16, 16, causal=True, num_random_blocks=2, seed=7))
    assert not torch.equal(a, pattern_layout("bigbird", 16, 16, causal=True, num_random_blocks=2, seed=8))
    extra = a & ~base
    assert (extra.sum(-1) <= 2).all() and extra.sum() > 0
    assert not torch.triu(extra, diagonal=1).any()  # causal: random blocks come from the past


@pytest.mark.parametrize("pattern", ["local", "strided", "fixed", "longformer", "bigbird"])
@pytest.mark.parametrize("backend", ["torch", "math"])
def test_no_future_leak(pattern, backend):
    # Element-wise causality inside diagonal tiles: perturbing keys/values after t leaves
    # outputs up to t unchanged, even for t in the middle of a block.
    nq = nk = 128
    q, k, v = rand(1, 2, 2, nq, nk)
    kw = dict(pattern=pattern, block_size=16, causal=True, backend=backend)
    base = sla.attention(q, k, v, "block_sparse", **kw)
    t = 75
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1 :] += 100.0
    v2[:, :, t + 1 :] *= -50.0
    out = sla.attention(q, k2, v2, "block_sparse", **kw)
    torch.testing.assert_close(out[:, :, : t + 1], base[:, :, : t + 1], atol=1e-6, rtol=0)
    assert (out[:, :, t + 1 :] - base[:, :, t + 1 :]).abs().max() > 1e-2


def test_rows_seeing_no_block_are_zero_and_finite():
    layout = torch.ones(4, 4, dtype=torch.bool)
    layout[1] = False
    q, k, v = rand(1, 2, 2, 64, 64)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = sla.attention(q, k, v, "block_sparse", layout=layout, block_size=16)
    assert out[:, :, 16:32].abs().max() == 0 and out[:, :, 32:].abs().max() > 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_empty_layout_gives_zeros_that_stay_in_the_graph():
    q, k, v = rand(1, 2, 2, 64, 64)
    q[0, 0, 0, 0] = float("inf")  # must not turn the zeros into NaN
    for t in (q, k, v):
        t.requires_grad_(True)
    out = sla.attention(q, k, v, "block_sparse", layout=torch.zeros(4, 4, dtype=torch.bool), block_size=16)
    assert out.requires_grad and out.abs().max() == 0
    out.sum().backward()
    assert all(t.grad is not None and t.grad.abs().max() == 0 for t in (q, k, v))


def test_weights_follow_the_layout():
    layout = rand_layout((4, 4), seed=2)
    layout[:, 0] = True
    q, k, v = rand(1, 2, 1, 40, 40)
    _, w = sla.attention(q, k, v, "block_sparse", layout=layout, block_size=10, return_weights=True)
    assert (w[..., ~element_mask(layout, 40, 40, 10, False)] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 40))


def test_layout_as_nested_list_from_a_config():
    layer = sla.build({"variant": "block_sparse", "block_size": 16, "layout": [[True, False], [True, True]]})
    q, k, v = rand(1, 2, 2, 32, 32)
    ref = reference(q, k, v, element_mask(torch.tensor([[True, False], [True, True]]), 32, 32, 16, False))
    torch.testing.assert_close(layer(q, k, v).double(), ref, atol=2e-6, rtol=1e-5)


def test_default_is_local_pattern():
    q, k, v = rand(1, 2, 2, 256, 256)
    torch.testing.assert_close(
        sla.attention(q, k, v, "block_sparse"), sla.attention(q, k, v, "block_sparse", pattern="local")
    )


# ----------------------------------------------------------------------------------------- errors


def _call(**params):
    q, k, v = rand(1, 2, 2, 64, 64)
    return sla.attention(q, k, v, "block_sparse", **params)


@pytest.mark.parametrize(
    "params,match",
    [
        (dict(block_size=0), "block_size"),
        (dict(block_size=2.0), "block_size"),
        (dict(pattern="bigbrid"), "(?i)did you mean 'bigbird'"),
        (dict(pattern="loacl"), "Known: bigbird, fixed, local, longformer, strided"),
        (dict(layout=torch.ones(3, 4, dtype=torch.bool), block_size=16), r"shape \(3, 4\).*\(4, 4\)"),
        (dict(layout=torch.ones(4, 4), block_size=16), "dtype torch.bool"),
        (dict(layout=torch.ones(3, 4, 4, dtype=torch.bool), block_size=16), "3 heads but q has 2"),
        (dict(layout=torch.ones(4, 4, dtype=torch.bool), pattern="local", block_size=16), "either pattern= or layout="),
        (dict(pattern="longformer", num_global_blocks=5, block_size=16), "num_global_blocks=5 does not fit"),
        (dict(pattern="strided", stride=9, block_size=16), "stride=9 does not fit"),
        (
            dict(pattern="fixed", num_local_blocks=2, num_global_blocks=3, block_size=16),
            "num_global_blocks <= num_local_blocks",
        ),
        (dict(pattern="bigbird", num_random_blocks=7, block_size=16), "num_random_blocks=7 does not fit"),
        (dict(window=3), "unknown parameter"),
    ],
)
def test_errors_say_what_was_received_and_accepted(params, match):
    with pytest.raises(ValueError, match=match):
        _call(**params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_grouped_query_inputs_without_grad(dtype):
    B, H, Hkv, n, bs = 2, 4, 2, 320, 32
    q, k, v = strided_qkv(B, H, Hkv, n, dtype=dtype, seed=6)
    layout = pattern_layout("bigbird", n // bs, n // bs, causal=True, seed=4)
    out = sla.attention(q, k, v, "block_sparse", pattern="bigbird", seed=4, block_size=bs, causal=True)
    ref = reference(q, k, v, element_mask(layout, n, n, bs, True))
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref, **tol)
