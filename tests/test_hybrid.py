"""hybrid against a float64 reference written here from its definition: one softmax over the
exact entries of ``sla.selection(...).dense()`` and one pseudo-key per group of unselected keys
(logit scale·q·mean(k) + log|G|, value mean(v), padded keys excluded).

Groups of query block a (chunks of r keys, d its diagonal block, L = local_blocks, c the key
blocks complete at its first query): causal, chunks [0, min(d+1−L, c)·bs/r) walking down;
non-causal, also [(d+L)·bs/r, end) walking up; at each level `near` groups of 2^level chunks,
then one more if the rest is not aligned to 2^(level+1); near=None: one group per chunk.
"""

from __future__ import annotations

import math

import pytest
import torch
from _reference import random_padding as padding
from _reference import random_qkv as rand

import sparse_linear_attn as sla
from sparse_linear_attn.errors import ParameterError
from sparse_linear_attn.variants import hybrid as hy

F64 = torch.float64
BACKENDS = [b for b in ("torch", "math") if b in sla.describe("hybrid").backends]


def group_ranges(nq, nk, bs, causal, L, r, near):
    off, nkb, nc = nk - nq, -(-nk // bs), -(-nk // r)
    rows = []
    for a in range(-(-nq // bs)):
        d = min(max((min((a + 1) * bs, nq) - 1 + off) // bs, 0), nkb - 1)
        sides = []
        if causal:
            c = sum(min((b + 1) * bs, nk) - 1 <= a * bs + off for b in range(nkb))
            sides.append((min(nc, max(0, min(d + 1 - L, c)) * bs // r), -1))
        else:
            sides.append((min(nc, max(0, d + 1 - max(L, 1)) * bs // r), -1))
            sides.append((min(nc, min(nkb, d + L) * bs // r), +1))
        ranges = []
        for cur, step in sides:
            size = taken = 0
            size = 1
            while (cur > 0) if step < 0 else (cur < nc):
                if near is not None and taken >= near and cur % (2 * size) == 0:
                    size, taken = 2 * size, 0
                    continue
                lo, hi = (cur - size, cur) if step < 0 else (cur, cur + size)
                ranges.append((lo * r, min(hi * r, nk)))
                cur, taken = (lo if step < 0 else hi), taken + 1
        rows.append(ranges)
    return rows


def reference(q, k, v, sel, kpm, *, causal, bs, L, r, near, scale):
    """(out, weights over real keys) in float64, with loops; differentiable."""
    B, H, nq, _ = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    exact = sel.dense()
    rows = group_ranges(nq, nk, bs, causal, L, r, near)
    out = [[[None] * nq for _ in range(H)] for _ in range(B)]
    weights = torch.zeros(B, H, nq, nk, dtype=F64)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            for i in range(nq):
                a = i // bs
                keys = [j for j in range(nk) if exact[b, h, i, j]]
                logits = [scale * (q[b, h, i] @ k[b, hk, j]) for j in keys]
                values = [v[b, hk, j] for j in keys]
                members = []
                for lo, hi in rows[a]:
                    m = [j for j in range(lo, hi) if not sel.block_mask[b, hk, a, j // bs]
                         and (kpm is None or not kpm[b, j])]  # fmt: skip
                    if m:
                        logits.append(scale * (q[b, h, i] @ k[b, hk, m].mean(0)) + math.log(len(m)))
                        values.append(v[b, hk, m].mean(0))
                        members.append(m)
                if not logits:
                    out[b][h][i] = torch.zeros(v.shape[-1], dtype=F64)
                    continue
                p = torch.softmax(torch.stack(logits), 0)
                out[b][h][i] = (p[:, None] * torch.stack(values)).sum(0)
                p = p.detach()
                for pi, j in zip(p[: len(keys)], keys):
                    weights[b, h, i, j] = pi
                for pi, m in zip(p[len(keys) :], members):
                    weights[b, h, i, m] = pi / len(m)
    return torch.stack([torch.stack([torch.stack(r) for r in bh]) for bh in out]), weights


CASES = [
    # nq, nk, bs, causal, H, Hkv, padding, params
    (40, 40, 4, True, 4, 2, False, {"density": 0.3}),
    (37, 37, 4, False, 2, 2, True, {"density": 0.25, "remainder_block": 2, "remainder_near": 2}),
    (21, 45, 4, True, 2, 1, True, {"mass": 0.5, "estimator": "key_pool", "remainder_block": 1, "remainder_near": 3}),
    (45, 21, 4, True, 2, 2, False, {"density": 0.3, "local_blocks": 2, "remainder_near": None}),
    (33, 33, 8, False, 3, 1, True, {"density": 0.3, "sink_blocks": 0, "local_blocks": 0, "remainder_block": 2,
                                     "remainder_near": 1}),
    (40, 40, 4, True, 2, 2, True, {"density": 0.3, "selection": "block", "remainder_block": 2}),
]  # fmt: skip


def _kw(bs, causal, kpm, params):
    return dict(causal=causal, key_padding_mask=kpm, block_size=bs, **params)


def _group_args(bs, params):
    near = params.get("remainder_near", 8)
    return dict(L=params.get("local_blocks", 1), r=params.get("remainder_block") or bs, near=near)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq,nk,bs,causal,H,Hkv,pad,params", CASES)
def test_forward_and_weights_match_the_definition(backend, nq, nk, bs, causal, H, Hkv, pad, params):
    q, k, v = rand(2, H, Hkv, nq, nk)
    kpm = padding(2, nk) if pad else None
    kw = _kw(bs, causal, kpm, params)
    sel = sla.selection(q, k, "hybrid", **kw)
    assert 0 < sel.density < 1 and sel.compressed_density > 0
    scale = 1 / math.sqrt(8)
    ref, ref_w = reference(q, k, v, sel, kpm, causal=causal, bs=bs, scale=scale, **_group_args(bs, params))
    out = sla.attention(q, k, v, "hybrid", backend=backend, **kw)
    assert out.shape == (2, H, nq, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=3e-6, rtol=1e-5)
    if backend == "math":
        out, w = sla.attention(q, k, v, "hybrid", backend=backend, return_weights=True, **kw)
        torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(w.double() @ v.double().repeat_interleave(H // Hkv, 1), ref, atol=3e-6, rtol=1e-5)


@pytest.mark.parametrize("nq,nk,bs,causal,H,Hkv,pad,params", CASES)
def test_compressed_density_counts_the_pseudo_key_entries(nq, nk, bs, causal, H, Hkv, pad, params):
    q, k, _ = rand(2, H, Hkv, nq, nk)
    kpm = padding(2, nk) if pad else None
    sel = sla.selection(q, k, "hybrid", **_kw(bs, causal, kpm, params))
    g = _group_args(bs, params)
    rows = group_ranges(nq, nk, bs, causal, g["L"], g["r"], g["near"])
    entries = 0
    for b in range(2):
        for hk in range(Hkv):
            for a, ranges in enumerate(rows):
                live = sum(
                    any(not sel.block_mask[b, hk, a, j // bs] and (kpm is None or not kpm[b, j]) for j in range(lo, hi))
                    for lo, hi in ranges
                )
                entries += live * (min((a + 1) * bs, nq) - a * bs) * (H // Hkv)
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    reach = ((j <= i + nk - nq) if causal else torch.ones(nq, nk, dtype=torch.bool))[None]
    if kpm is not None:
        reach = reach & ~kpm[:, None]
    assert sel.compressed_density == pytest.approx(entries / (float(reach.expand(2, nq, nk).sum()) * H))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq,nk,bs,causal,H,Hkv,pad,params", [c[:4] + (2, 1) + c[6:] for c in CASES[:4]])
def test_gradients_match_the_reference(backend, nq, nk, bs, causal, H, Hkv, pad, params):
    q, k, v = (t.requires_grad_() for t in rand(1, H, Hkv, nq, nk, dtype=F64, seed=1))
    kpm = padding(1, nk) if pad else None
    kw = _kw(bs, causal, kpm, params)
    sel = sla.selection(q, k, "hybrid", **kw)
    gout = torch.randn(1, H, nq, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    out = sla.attention(q, k, v, "hybrid", backend=backend, scale=0.4, **kw)
    got = torch.autograd.grad(out, (q, k, v), gout)
    ref, _ = reference(q, k, v, sel, kpm, causal=causal, bs=bs, scale=0.4, **_group_args(bs, params))
    want = torch.autograd.grad(ref, (q, k, v), gout)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["mean_pool", "key_pool", "antidiagonal", "oracle"])
def test_strict_causality_through_every_estimator(backend, estimator):
    q, k, v = rand(1, 2, 1, 40, 40, dtype=F64, seed=4)
    kw = dict(causal=True, block_size=4, density=0.3, estimator=estimator, stride=2, remainder_block=2,
              remainder_near=2, backend=backend)  # fmt: skip
    out = sla.attention(q, k, v, "hybrid", **kw)
    for t in (6, 13, 16, 27):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        g = torch.Generator().manual_seed(t)
        for x in (q2, k2, v2):
            x[:, :, t + 1 :] = 5.0 * torch.randn(x[:, :, t + 1 :].shape, generator=g, dtype=F64)
        out2 = sla.attention(q2, k2, v2, "hybrid", **kw)
        torch.testing.assert_close(out2[:, :, : t + 1], out[:, :, : t + 1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_remainder_none_is_topk_block_and_density_one_is_full(backend, causal):
    q, k, v = rand(2, 4, 2, 30, 37, dtype=F64)
    kpm = padding(2, 37)
    kw = dict(causal=causal, key_padding_mask=kpm, block_size=4)
    none = sla.attention(q, k, v, "hybrid", remainder="none", density=0.3, backend=backend, **kw)
    topk = sla.attention(q, k, v, "topk_block", density=0.3, backend=backend, **kw)
    torch.testing.assert_close(none, topk, atol=1e-12, rtol=1e-10)
    sel = sla.selection(q, k, "hybrid", remainder="none", density=0.3, **kw)
    assert sel.compressed_density == 0.0
    dense = sla.attention(q, k, v, "hybrid", density=1.0, remainder_block=2, backend=backend, **kw)
    full = sla.attention(q, k, v, "full", causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(dense, full, atol=1e-12, rtol=1e-10)
    assert sla.selection(q, k, "hybrid", density=1.0, **kw).compressed_density == 0.0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("near", [None, 1, 2, 3])
@pytest.mark.parametrize("nq,nk,bs,r", [(37, 37, 4, 1), (64, 211, 8, 2), (200, 64, 4, 4), (50, 50, 8, 8)])
def test_vectorised_groups_are_the_naive_ones(causal, near, nq, nk, bs, r):
    for L in (0, 1, 2):
        g = hy.remainder_groups(nq, nk, bs, causal=causal, local_blocks=L, chunk=r, near=near)
        naive = hy.remainder_groups_naive(nq, nk, bs, causal=causal, local_blocks=L, chunk=r, near=near)
        assert [sorted(x) for x in naive] == [sorted(x) for x in group_ranges(nq, nk, bs, causal, L, r, near)]
        nc = -(-nk // r)
        for a, ranges in enumerate(naive):
            ok = g.valid[a]
            fast = sorted((int(u) << int(lv)) * r for u, lv in zip(g.unit[a][ok], g.level[a][ok]))
            assert fast == sorted(lo for lo, _ in ranges)
            slots = hy.slot_of_chunk(g, torch.full((nc,), a), torch.arange(nc))
            for c in range(nc):
                inside = [lo for lo, hi in ranges if lo <= c * r < hi]
                s = int(slots[c])
                assert (s >= 0) == bool(inside)
                if s >= 0:
                    assert (int(g.unit[a, s]) << int(g.level[a, s])) * r == inside[0]


def test_coarsening_makes_the_pseudo_keys_grow_logarithmically():
    # remainder_near pseudo-keys per level and side, one level per doubling: S ≈ near·log2(N).
    counts = {}
    for n in (1 << 12, 1 << 14, 1 << 16):
        g = hy.remainder_groups(n, n, 64, causal=True, local_blocks=1, chunk=64, near=8)
        counts[n] = int(g.valid.sum(1).max())
        assert counts[n] <= 9 * (math.log2(n // 64 / 8) + 2)
    assert counts[1 << 16] - counts[1 << 14] <= 2 * 9 + 1
    flat = hy.remainder_groups(1 << 14, 1 << 14, 64, causal=True, local_blocks=1, chunk=64, near=None)
    assert int(flat.valid.sum(1).max()) == (1 << 14) // 64 - 1


BAD = [
    ({"remainder": "mean"}, "invalid remainder='mean': expected one of 'block_mean', 'none'"),
    ({"remainder_block": 3, "block_size": 4}, "remainder_block=3 must divide block_size=4"),
    ({"remainder_block": 8, "block_size": 4}, "remainder_block=8 must divide block_size=4"),
    ({"remainder_block": 0}, "invalid remainder_block=0: expected an int >= 1"),
    ({"remainder_near": 0}, "invalid remainder_near=0: expected an int >= 1"),
    ({"density": 0.2, "mass": 0.5}, "give one budget"),
    ({"density": 2}, r"invalid density=2: expected a number in \(0, 1\]"),
]


@pytest.mark.parametrize("params,match", BAD)
def test_bad_parameters_name_what_is_accepted(params, match):
    q, k, v = rand(1, 1, 1, 8, 8)
    with pytest.raises(ParameterError, match=match):
        sla.attention(q, k, v, "hybrid", **params)
    with pytest.raises(ParameterError, match=match):
        sla.selection(q, k, "hybrid", **params)


@pytest.mark.parametrize("grad", [False, True])
def test_chunked_compressed_part_equals_one_chunk(monkeypatch, grad):
    # Many chunks of query blocks (each building its own pseudo-keys) give what one chunk gives.
    q, k, v = (t.requires_grad_(grad) for t in rand(2, 4, 2, 45, 45, dtype=F64, seed=6))
    kw = dict(causal=True, block_size=4, density=0.3, remainder_block=2, remainder_near=2, backend="torch")
    whole = sla.attention(q, k, v, "hybrid", **kw)
    monkeypatch.setattr(hy, "COMPRESSED_ELEMENTS", 1)  # one query block per chunk
    chunked = sla.attention(q, k, v, "hybrid", **kw)
    torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=0)
    if grad:
        g = torch.randn(whole.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
        a = torch.autograd.grad(whole, (q, k, v), g)
        b = torch.autograd.grad(chunked, (q, k, v), g)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-12, rtol=0)
