"""Block-mass estimators and sla.selection against loops written from their definitions.

Scoring window of query block a (block size bs, offset off = Nk − Nq):
  non-causal: its own queries; causal: queries max(0, a·bs − bs + 1) .. a·bs.
Scoreable key blocks: those with an unpadded key and, causal, whose last key ≤ a·bs + off.
"""

from __future__ import annotations

import math

import pytest
import torch

import sparse_linear_attn as sla
from sparse_linear_attn.errors import ParameterError, UnknownNameError
from sparse_linear_attn.estimators import estimate, get_estimator, unregister_estimator
from sparse_linear_attn.selection import choose_blocks, visible_per_tile

F64 = torch.float64


def rand(B, H, Hkv, nq, nk, D=6, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, nq, D, generator=g, dtype=dtype),
        torch.randn(B, Hkv, nk, D, generator=g, dtype=dtype),
    )


def padding(B, nk, seed=1, p=0.25):
    kpm = torch.rand(B, nk, generator=torch.Generator().manual_seed(seed)) < p
    kpm[:, 0] = False
    return kpm


def window(a, bs, nq, causal):
    if causal:
        return list(range(max(0, a * bs - bs + 1), a * bs + 1))
    return list(range(a * bs, min((a + 1) * bs, nq)))


def keys_of(b, bs, nk, kpm, batch):
    return [j for j in range(b * bs, min((b + 1) * bs, nk)) if kpm is None or not bool(kpm[batch, j])]


def scoreable(a, b, bs, nq, nk, causal, kpm, batch):
    if not keys_of(b, bs, nk, kpm, batch):
        return False
    return not causal or min((b + 1) * bs, nk) - 1 <= a * bs + nk - nq


def naive_scores(name, q, k, *, bs, causal, kpm, scale, stride=2):
    B, H, nq, _ = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    nqb, nkb = -(-nq // bs), -(-nk // bs)
    out = torch.zeros(B, Hkv, nqb, nkb, dtype=F64)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            for a in range(nqb):
                blocks = [c for c in range(nkb) if scoreable(a, c, bs, nq, nk, causal, kpm, b)]
                if not blocks:
                    continue
                win = window(a, bs, nq, causal)
                kbar = {c: k[b, hk, keys_of(c, bs, nk, kpm, b)].mean(0) for c in blocks}
                logn = {c: math.log(len(keys_of(c, bs, nk, kpm, b))) for c in blocks}
                if name == "mean_pool":
                    qbar = q[b, h, win].mean(0)
                    s = torch.stack([scale * qbar @ kbar[c] + logn[c] for c in blocks])
                    p = torch.softmax(s, 0)
                elif name == "key_pool":
                    p = torch.zeros(len(blocks), dtype=F64)
                    for t in win:
                        s = torch.stack([scale * q[b, h, t] @ kbar[c] + logn[c] for c in blocks])
                        p += torch.softmax(s, 0) / len(win)
                elif name == "oracle":
                    keys = [j for c in blocks for j in keys_of(c, bs, nk, kpm, b)]
                    p = torch.zeros(len(blocks), dtype=F64)
                    for t in win:
                        w = torch.softmax(scale * k[b, hk, keys] @ q[b, h, t], 0)
                        for i, c in enumerate(blocks):
                            p[i] += sum(float(w[keys.index(j)]) for j in keys_of(c, bs, nk, kpm, b)) / len(win)
                elif name == "antidiagonal":
                    S = stride
                    first = a * bs - bs + 1 if causal else a * bs  # window index 0 is this query
                    p = torch.zeros(len(blocks), dtype=F64)
                    rows = 0
                    for r in range(bs // S):
                        cells, logits = [], []
                        for c in blocks:
                            for g in range(c * bs // S, (c + 1) * bs // S):
                                pairs = []
                                for m in range(S):
                                    t, j = first + r * S + S - 1 - m, g * S + m
                                    ok_q = 0 <= t < nq and (not causal or t <= a * bs)
                                    if ok_q and j < nk and (kpm is None or not bool(kpm[b, j])):
                                        pairs.append(scale * float(q[b, h, t] @ k[b, hk, j]))
                                if pairs:
                                    cells.append(c)
                                    logits.append(sum(pairs) / len(pairs) + math.log(len(pairs)))
                        if not cells:
                            continue
                        rows += 1
                        w = torch.softmax(torch.tensor(logits, dtype=F64), 0)
                        for i, c in enumerate(cells):
                            p[blocks.index(c)] += float(w[i])
                    p = p / max(rows, 1)
                for i, c in enumerate(blocks):
                    out[b, hk, a, c] += p[i]
    return out


CASES = [
    # nq, nk, bs, causal, H, Hkv, padding
    (23, 23, 4, True, 2, 1, False),
    (23, 23, 4, False, 2, 2, True),
    (14, 27, 4, True, 2, 2, True),  # Nq < Nk: bottom-right
    (27, 14, 4, True, 4, 2, False),  # Nq > Nk: early queries see nothing
    (16, 16, 8, False, 1, 1, False),
]


@pytest.mark.parametrize("name", ["mean_pool", "key_pool", "oracle", "antidiagonal"])
@pytest.mark.parametrize("nq,nk,bs,causal,H,Hkv,pad", CASES)
def test_estimators_match_their_definitions(name, nq, nk, bs, causal, H, Hkv, pad):
    q, k = rand(2, H, Hkv, nq, nk)
    kpm = padding(2, nk) if pad else None
    got = estimate(name, q, k, block_size=bs, causal=causal, key_padding_mask=kpm, scale=0.7, stride=2)
    want = naive_scores(name, q, k, bs=bs, causal=causal, kpm=kpm, scale=0.7, stride=2)
    assert got.dtype == torch.float32  # one precision, one selection, whatever the inputs
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)


def test_estimators_chunk_without_changing_results(monkeypatch):
    from sparse_linear_attn import estimators

    q, k = rand(1, 2, 1, 37, 37, seed=5)
    whole = {n: estimate(n, q, k, block_size=4, causal=True, key_padding_mask=None, scale=0.5, stride=2)
             for n in ("key_pool", "oracle", "antidiagonal")}  # fmt: skip
    monkeypatch.setattr(estimators, "CHUNK_ELEMENTS", 1)  # one query block per chunk
    for n, ref in whole.items():
        got = estimate(n, q, k, block_size=4, causal=True, key_padding_mask=None, scale=0.5, stride=2)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk,bs", [(23, 23, 4), (14, 27, 4), (27, 14, 5), (9, 9, 16)])
def test_visible_per_tile_counts_the_dense_mask(causal, nq, nk, bs, pad):
    kpm = padding(3, nk, p=0.4) if pad else None
    got = visible_per_tile(nq, nk, bs, causal=causal, key_padding_mask=kpm)
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    dense = ((j <= i + nk - nq) if causal else torch.ones(nq, nk, dtype=torch.bool))[None]
    if pad:
        dense = dense & ~kpm[:, None, :]
    nqb, nkb = -(-nq // bs), -(-nk // bs)
    want = torch.zeros(dense.shape[0], nqb, nkb, dtype=torch.int64)
    for a in range(nqb):
        for b in range(nkb):
            want[:, a, b] = dense[:, a * bs : (a + 1) * bs, b * bs : (b + 1) * bs].sum((1, 2))
    assert torch.equal(got, want)


def test_density_budget_keeps_forced_then_the_best_scored():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 3, 6, 10, generator=g, dtype=F64)
    reachable = torch.rand(2, 1, 6, 10, generator=g) < 0.8
    reachable[0, 0, 2] = False  # a row that reaches nothing keeps nothing
    forced = torch.zeros(6, 10, dtype=torch.bool)
    forced[:, 0] = True
    forced[1, 1:6] = True  # more forced than the budget: all kept
    for density in (0.1, 0.35, 1.0):
        keep = choose_blocks(scores, reachable, forced, density=density, mass=None)
        for b in range(2):
            for h in range(3):
                for a in range(6):
                    R = reachable[b, 0, a]
                    f = forced[a] & R
                    k = keep[b, h, a]
                    assert not (k & ~R).any()
                    assert (k | ~f).all()
                    budget = 0 if R.sum() == 0 else min(int(R.sum()), max(1, math.ceil(density * int(R.sum()))))
                    assert int(k.sum()) == max(budget, int(f.sum()))
                    picked, left = k & ~f, R & ~k
                    if picked.any() and left.any():
                        assert scores[b, h, a][picked].min() >= scores[b, h, a][left].max()


def test_mass_budget_keeps_the_fewest_blocks_reaching_the_share():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(1, 2, 5, 12, generator=g, dtype=F64) ** 3
    reachable = torch.ones(1, 1, 5, 12, dtype=torch.bool)
    forced = torch.zeros(5, 12, dtype=torch.bool)
    forced[:, 3] = True
    for mass in (0.3, 0.6, 0.9, 1.0):
        keep = choose_blocks(scores, reachable, forced, density=None, mass=mass)
        for h in range(2):
            for a in range(5):
                s = scores[0, h, a] / scores[0, h, a].sum()
                k = keep[0, h, a]
                assert k[3]
                assert float(s[k].sum()) >= mass - 1e-9
                picked = k.clone()
                picked[3] = False
                if picked.any():  # dropping the weakest pick falls short
                    weakest = torch.where(picked, s, torch.inf).argmin()
                    assert float(s[k].sum() - s[weakest]) < mass
                    assert s[picked].min() >= s[~k].max() if (~k).any() else True


def test_mass_budget_keeps_one_block_when_nothing_is_forced():
    scores = torch.tensor([[[[0.0, 0.0, 0.0]]]], dtype=F64)
    keep = choose_blocks(scores, torch.ones(1, 1, 1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.bool),
                         density=None, mass=0.5)  # fmt: skip
    assert int(keep.sum()) == 1


@pytest.mark.parametrize("causal", [False, True])
def test_selection_density_counts_its_dense_entries(causal):
    q, k = rand(2, 4, 2, 30, 37, dtype=torch.float32)
    kpm = padding(2, 37)
    sel = sla.selection(q, k, "topk_block", causal=causal, key_padding_mask=kpm, block_size=4, density=0.3)
    dense = sel.dense()
    assert dense.shape == (2, 4, 30, 37) and dense.dtype == torch.bool
    i, j = torch.arange(30)[:, None], torch.arange(37)[None, :]
    reach = ((j <= i + 7) if causal else torch.ones(30, 37, dtype=torch.bool))[None, None] & ~kpm[:, None, None]
    assert not (dense & ~reach).any()
    assert sel.density == pytest.approx(float(dense.sum()) / float(reach.expand_as(dense).sum()))
    assert sel.compressed_density == 0.0
    # Query heads of one kv head share the selection.
    assert torch.equal(dense[:, 0], dense[:, 1]) and torch.equal(dense[:, 2], dense[:, 3])


def test_selection_of_static_variants_is_their_dense_mask():
    q, k = rand(1, 2, 2, 40, 40, dtype=torch.float32)
    sel = sla.selection(q, k, "sliding_window", causal=True, window=5)
    mask = sla.dense_mask("sliding_window", 40, 40, causal=True, window=5)
    assert torch.equal(sel.dense(), mask.expand(1, 2, 40, 40))
    causal_entries = 40 * 41 / 2
    assert sel.density == pytest.approx(float(mask.sum()) / causal_entries)
    full = sla.selection(q, k, "full", causal=True)
    assert full.density == 1.0 and bool(full.block_mask.all())
    lay = torch.rand(5, 5, generator=torch.Generator().manual_seed(0)) < 0.5
    bsel = sla.selection(q, k, "block_sparse", layout=lay, block_size=8)
    assert torch.equal(bsel.block_mask[0, 0], lay) and bsel.block_size == 8


def test_selection_refuses_variants_without_a_pattern_and_dense_mask_refuses_data_dependent_ones():
    q, k = rand(1, 2, 2, 8, 8, dtype=torch.float32)
    with pytest.raises(ParameterError, match="no selection; variants with one:.*topk_block"):
        sla.selection(q, k, "linear")
    with pytest.raises(ValueError, match=r"sla.selection\(q, k, 'topk_block'"):
        sla.dense_mask("topk_block", 8, 8)


def test_register_estimator_is_used_and_checked():
    calls = []

    @sla.register_estimator("last_block")
    def last_block(q, k, *, block_size, causal, key_padding_mask, scale):
        calls.append(block_size)
        B, Hkv = q.shape[0], k.shape[1]
        nqb, nkb = -(-q.shape[2] // block_size), -(-k.shape[2] // block_size)
        s = torch.zeros(B, Hkv, nqb, nkb)
        s[..., -1] = 1.0
        return s

    try:
        assert "last_block" in sla.available_estimators()
        q, k = rand(1, 2, 1, 32, 32, dtype=torch.float32)
        sel = sla.selection(q, k, "topk_block", block_size=4, density=0.25, sink_blocks=0, estimator="last_block")
        assert calls == [4]
        assert bool(sel.block_mask[..., -1].all())  # the estimator's favourite, besides the diagonal
        with pytest.raises(ValueError, match="already registered"):
            sla.register_estimator("last_block", last_block)
        sla.register_estimator("bad_shape", lambda q, k, **kw: torch.zeros(1, 1, 2, 2), overwrite=True)
        with pytest.raises(ValueError, match=r"estimator 'bad_shape' returned shape \(1, 1, 2, 2\); expected"):
            sla.selection(q, k, "topk_block", block_size=4, estimator="bad_shape")
        sla.register_estimator("negative", lambda q, k, **kw: -torch.ones(1, 1, 8, 8), overwrite=True)
        with pytest.raises(ValueError, match="NaN or negative"):
            sla.selection(q, k, "topk_block", block_size=4, estimator="negative")
    finally:
        for name in ("last_block", "bad_shape", "negative"):
            if name in sla.available_estimators():
                unregister_estimator(name)


def test_unknown_estimator_names_the_closest():
    with pytest.raises(UnknownNameError, match="Did you mean 'key_pool'"):
        get_estimator("keypool")
    q, k = rand(1, 1, 1, 8, 8, dtype=torch.float32)
    with pytest.raises(UnknownNameError, match="unknown estimator 'mean'.*Known: antidiagonal, key_pool"):
        sla.selection(q, k, "topk_block", estimator="mean")


@pytest.mark.parametrize("budget", [{"density": 0.3}, {"mass": 0.6}])
@pytest.mark.parametrize("nq,nk,bs,causal,H,Hkv,pad", CASES)
def test_selection_composes_scores_reachability_and_forced_blocks_as_defined(nq, nk, bs, causal, H, Hkv, pad, budget):
    # sla.selection's block_mask against one built here: the estimator's definition
    # (naive_scores), reachability and the forced blocks from loops over positions, and the
    # budget rule of choose_blocks (tested on its own above).
    q, k = rand(2, H, Hkv, nq, nk, dtype=torch.float32)
    kpm = padding(2, nk) if pad else None
    sinks, local = 1, 2
    sel = sla.selection(q, k, "topk_block", causal=causal, key_padding_mask=kpm, scale=0.7, block_size=bs,
                        estimator="key_pool", sink_blocks=sinks, local_blocks=local, **budget)  # fmt: skip
    nqb, nkb, off = -(-nq // bs), -(-nk // bs), nk - nq
    scores = naive_scores("key_pool", q.double(), k.double(), bs=bs, causal=causal, kpm=kpm, scale=0.7)
    reach = torch.zeros(2, 1, nqb, nkb, dtype=torch.bool)
    forced = torch.zeros(nqb, nkb, dtype=torch.bool)
    for a in range(nqb):
        queries = range(a * bs, min((a + 1) * bs, nq))
        d = min(max((queries[-1] + off) // bs, 0), nkb - 1)  # the block holding the last query's position
        for c in range(nkb):
            keys = range(c * bs, min((c + 1) * bs, nk))
            for b in range(2):
                reach[b, 0, a, c] = any(
                    (kpm is None or not bool(kpm[b, j])) and (not causal or j <= i + off) for i in queries for j in keys
                )
            local_c = d - local < c <= d if causal else abs(c - d) < local
            incomplete = causal and keys[-1] > queries[0] + off  # not complete at the first query
            forced[a, c] = c < sinks or local_c or incomplete
            if incomplete:
                scores[:, :, a, c] = 0.0  # only complete past blocks carry a score
    want = choose_blocks(scores.float(), reach, forced, density=budget.get("density"), mass=budget.get("mass"))
    assert torch.equal(sel.block_mask, want)


@pytest.mark.parametrize("causal", [False, True])
def test_static_selection_block_mask_and_density_from_the_dense_mask(causal):
    # Reduced at the mask's own shape (shared by batch and heads), counted as if expanded.
    q, k = rand(2, 4, 2, 30, 37, dtype=torch.float32)
    kpm = padding(2, 37)
    sel = sla.selection(q, k, "sliding_window", causal=causal, key_padding_mask=kpm, window=3)
    bs = sel.block_size
    dense = sel.dense()  # (B, H, Nq, Nk): the pattern, causality and padding
    nqb, nkb = -(-30 // bs), -(-37 // bs)
    want = torch.zeros(2, 2, nqb, nkb, dtype=torch.bool)
    for a in range(nqb):
        for c in range(nkb):
            tile = dense[:, :, a * bs : (a + 1) * bs, c * bs : (c + 1) * bs]  # (B, H, ·, ·)
            want[:, :, a, c] = tile.reshape(2, 2, -1).any(-1)  # query heads 2h, 2h+1 share kv head h
    assert torch.equal(sel.block_mask, want)
    i, j = torch.arange(30)[:, None], torch.arange(37)[None, :]
    reach = ((j <= i + 7) if causal else torch.ones(30, 37, dtype=torch.bool))[None, None] & ~kpm[:, None, None]
    assert sel.density == pytest.approx(float(dense.sum()) / float(reach.expand(2, 4, 30, 37).sum()))
