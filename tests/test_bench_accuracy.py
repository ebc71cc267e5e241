"""Recall, the oracle, knob sweeps and the frontier plot of ``sla-bench``, against independent
float64 computations (tests/_reference.py) on tiny sizes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _reference import softmax_attention, visible

import sparse_linear_attn as sla
from sparse_linear_attn.bench import accuracy
from sparse_linear_attn.bench.cli import main
from sparse_linear_attn.bench.runner import read_results
from sparse_linear_attn.bench.spec import (
    ORACLE_DENSITIES,
    parse_variant_specs,
    variants_from_entry,
)
from sparse_linear_attn.errors import ParameterError

TINY = ["--heads", "2", "--head-dim", "8", "--repeats", "1", "--warmup", "0", "--no-plot"]


def _qk(B=2, H=4, Hkv=2, nq=24, nk=24, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, nq, D, generator=g) * 1.5, torch.randn(B, Hkv, nk, D, generator=g)


# ---------------------------------------------------------------------------------------------
# Recall: the exact softmax mass inside the computed entries.


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(24, 24), (16, 24)])
def test_attention_recall_against_float64_weights(causal, nq, nk):
    q, k = _qk(nq=nq, nk=nk)
    B, H = q.shape[:2]
    pad = torch.zeros(B, nk, dtype=torch.bool)
    pad[1, -5:] = True
    computed = torch.rand(B, H, nq, nk, generator=torch.Generator().manual_seed(3)) < 0.4
    vis = visible(nq, nk, causal=causal, key_padding_mask=pad, batch=B)
    _, w = softmax_attention(q, k, k, vis)  # float64 weights over the visible keys
    expect = (w * computed).sum(-1)
    got = sla.attention_recall(q, k, computed, causal=causal, key_padding_mask=pad)
    assert got.dtype == torch.float64 and got.shape == (B, H, nq)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    # A subset of rows, in small chunks: the same values for those rows.
    rows = torch.tensor([0, 5, 6, nq - 1])
    sub = sla.attention_recall(
        q, k, computed[:, :, rows], causal=causal, key_padding_mask=pad, rows=rows, chunk_bytes=1
    )
    torch.testing.assert_close(sub, expect[:, :, rows], rtol=1e-12, atol=1e-12)
    # Every visible key computed: all the mass.
    assert torch.allclose(sla.attention_recall(q, k, None, causal=causal), torch.ones(B, H, nq, dtype=torch.float64))


def test_attention_recall_edge_rows_and_errors():
    q, k = _qk(B=1, H=1, Hkv=1, nq=4, nk=4)
    pad = torch.tensor([[True, True, True, True]])  # every key padded: nothing to miss
    assert torch.equal(sla.attention_recall(q, k, torch.zeros(1, 1, 4, 4, dtype=torch.bool), key_padding_mask=pad),
                       torch.ones(1, 1, 4, dtype=torch.float64))  # fmt: skip
    assert float(sla.attention_recall(q, k, torch.zeros(4, 4, dtype=torch.bool)).max()) == 0.0
    with pytest.raises(ValueError, match="bool"):
        sla.attention_recall(q, k, torch.ones(4, 4))
    with pytest.raises(ValueError, match="rows"):
        sla.attention_recall(q, k, torch.ones(3, 4, dtype=torch.bool))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(24, 24), (30, 24)])
def test_row_weights_are_the_float64_softmax_rows(causal, nq, nk):
    q, k = _qk(B=2, H=4, Hkv=2, nq=nq, nk=nk)
    rows = torch.tensor([0, 3, 5, 11, nq - 1])  # with nq > nk, causal rows 0..5 see no key
    _, w = softmax_attention(q, k, k, visible(nq, nk, causal=causal), scale=0.4)
    # Chunks of one row each exercise the row loop.
    got = accuracy.row_weights(q, k, causal=causal, rows=rows, scale=0.4, chunk_bytes=1)
    assert got.dtype == torch.float64 and got.shape == (2, 4, 5, nk)
    assert torch.allclose(got, w[:, :, rows], rtol=1e-12, atol=1e-15)
    assert not got.isnan().any()


@pytest.mark.parametrize("causal", [False, True])
def test_recall_from_shared_weights_matches_an_independent_sum(causal):
    q, k = _qk(B=2, H=4, Hkv=2, nq=30, nk=24)
    rows = torch.tensor([0, 4, 7, 12, 20, 29])  # causal rows 0..5 see nothing: recall 1
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 4, rows.numel(), 24, generator=g) < 0.3
    _, w = softmax_attention(q, k, k, visible(30, 24, causal=causal), scale=0.4)
    seen = visible(30, 24, causal=causal)[:, :, rows].any(-1)
    expect = torch.where(seen, (w[:, :, rows] * mask).sum(-1), 1.0)
    weights = accuracy.row_weights(q, k, causal=causal, rows=rows, scale=0.4)
    for m in (mask, mask[:1, :1]):  # per (batch, head) and broadcast over them
        e = expect if m is mask else torch.where(seen, (w[:, :, rows] * m).sum(-1), 1.0)
        c = accuracy.Computed(m, "test")
        got = accuracy.recall_of(c, q, k, causal=causal, rows=rows, scale=0.4, weights=weights)
        assert got["recall_mean"] == pytest.approx(float(e.mean()), rel=1e-12)
        assert got["recall_p5"] == pytest.approx(float(torch.quantile(e.flatten(), 0.05)), rel=1e-12)
        # The same as the path that recomputes the scores.
        assert accuracy.recall_of(c, q, k, causal=causal, rows=rows, scale=0.4) == pytest.approx(got, rel=1e-12)


def test_sweep_recall_is_the_same_with_and_without_shared_weights(tmp_path, monkeypatch):
    from sparse_linear_attn.bench import runner

    args = ["run", "--variants", "sliding_window:window=[3,9]", "--seq-lens", "40", *TINY, "--causal"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    calls = []
    monkeypatch.setattr(accuracy, "row_weights", lambda *a, **kw: calls.append(1))  # never called
    monkeypatch.setattr(runner, "ROW_WEIGHTS_MAX_BYTES", 0)
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert not calls
    a, b = (read_results(tmp_path / d / "results.jsonl") for d in "ab")
    assert [r["label"] for r in a] == [r["label"] for r in b] and len(a) == 2
    for ra, rb in zip(a, b):
        assert 0 < ra["recall_mean"] < 1
        assert ra["recall_mean"] == pytest.approx(rb["recall_mean"], rel=1e-12)
        assert ra["recall_p5"] == pytest.approx(rb["recall_p5"], rel=1e-12)


def test_recall_of_static_patterns_matches_an_independent_mask():
    q, k = _qk(B=1, H=2, Hkv=2, nq=40, nk=40)
    rows = accuracy.sample_rows(40, 7)
    assert rows.tolist() == [2, 8, 14, 20, 25, 31, 37]
    for causal in (False, True):
        c = accuracy.computed_entries("sliding_window", {"window": 3}, q, k, causal=causal, rows=rows, scale=0.5)
        i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
        band = ((j - i).abs() <= 3) & ((j <= i) if causal else True)
        _, w = softmax_attention(q, k, k, visible(40, 40, causal=causal), scale=0.5)
        expect = (w * band)[:, :, rows].sum(-1)
        weights = accuracy.row_weights(q, k, causal=causal, rows=rows, scale=0.5)
        for wts in (None, weights):
            got = accuracy.recall_of(c, q, k, causal=causal, rows=rows, scale=0.5, weights=wts)
            assert got["recall_mean"] == pytest.approx(float(expect.mean()), rel=1e-12)
            assert got["recall_p5"] == pytest.approx(float(torch.quantile(expect.flatten(), 0.05)), rel=1e-12)
    full = accuracy.computed_entries("full", {}, q, k, causal=True, rows=rows, scale=0.5)
    assert accuracy.recall_of(full, q, k, causal=True, rows=rows, scale=0.5) == {"recall_mean": 1.0, "recall_p5": 1.0}
    assert isinstance(accuracy.computed_entries("linear", {}, q, k, causal=False, rows=rows, scale=0.5), str)


class _FakeSelection:
    """What sla.selection returns (block_mask, block_size, density, ...), for a test variant."""

    def __init__(self, block_mask, block_size, nq, nk, causal, heads):
        self.block_mask, self.block_size, self.elements = block_mask, block_size, None
        self.nq, self.nk, self.causal, self.heads = nq, nk, causal, heads
        dense = self.dense()
        vis = visible(nq, nk, causal=causal)
        self.density = float(dense.sum() / (vis.sum() * dense.shape[1]))
        self.compressed_density = 0.0

    def dense(self):  # the obvious expansion, independent of accuracy._selection_rows
        B, Hkv, nqb, nkb = self.block_mask.shape
        g = self.heads // Hkv
        out = torch.zeros(B, self.heads, self.nq, self.nk, dtype=torch.bool)
        for b in range(B):
            for h in range(self.heads):
                for i in range(self.nq):
                    for j in range(self.nk):
                        out[b, h, i, j] = bool(self.block_mask[b, h // g, i // self.block_size, j // self.block_size])
        return out & visible(self.nq, self.nk, causal=self.causal)


def _fake_select(q, k, causal, bs=4, keep=2):
    """Per query block, the ``keep`` key blocks of largest pooled score (data-dependent)."""
    B, Hkv, nk, D = k.shape
    qp = q.view(B, Hkv, -1, q.shape[2], D).mean(2)
    nqb, nkb = math.ceil(q.shape[2] / bs), math.ceil(nk / bs)
    sq = torch.stack([qp[:, :, i * bs : (i + 1) * bs].mean(2) for i in range(nqb)], 2)
    sk = torch.stack([k[:, :, j * bs : (j + 1) * bs].mean(2) for j in range(nkb)], 2)
    scores = sq @ sk.transpose(-1, -2)
    top = scores.topk(keep, dim=-1).indices
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    return _FakeSelection(mask, bs, q.shape[2], nk, causal, q.shape[1])


@pytest.fixture
def data_dependent_variant(monkeypatch):
    """A data-dependent exact variant: sla.selection's blocks, computed by masked softmax."""
    from sparse_linear_attn import registry

    def run(q, k, v, *, causal, key_padding_mask, scale):
        sel = _fake_select(q, k, causal)
        out, _ = softmax_attention(q, k, v, sel.dense(), scale=scale)
        return out.to(q.dtype)

    sla.register_variant("bench_dd", exact=True)(run)

    def selection(q, k, variant, *, causal=False, scale=None, **params):
        assert variant == "bench_dd"
        return _fake_select(q, k, causal)

    # VariantSpec.selection_fn is what marks a variant as data-dependent.
    monkeypatch.setattr(
        registry.get("bench_dd"), "selection_fn", lambda q, k, *, causal, **kw: _fake_select(q, k, causal)
    )
    monkeypatch.setattr(sla, "selection", selection, raising=False)
    yield "bench_dd"
    sla.unregister_variant("bench_dd")


def test_recall_and_density_of_a_data_dependent_variant(data_dependent_variant, tmp_path):
    q, k = _qk(B=1, H=4, Hkv=2, nq=24, nk=24)
    rows = torch.tensor([1, 9, 14, 23])
    for causal in (False, True):
        sel = _fake_select(q, k, causal)
        c = accuracy.computed_entries("bench_dd", {}, q, k, causal=causal, rows=rows, scale=0.3)
        assert c.how.startswith("sla.selection") and c.density == pytest.approx(sel.density)
        _, w = softmax_attention(q, k, k, visible(24, 24, causal=causal), scale=0.3)
        expect = (w * sel.dense())[:, :, rows].sum(-1)
        weights = accuracy.row_weights(q, k, causal=causal, rows=rows, scale=0.3)
        for wts in (None, weights):
            got = accuracy.recall_of(c, q, k, causal=causal, rows=rows, scale=0.3, weights=wts)
            assert got["recall_mean"] == pytest.approx(float(expect.mean()), rel=1e-12)
    # Through a sweep: density from the selection, FLOPs from it, recall recorded.
    assert main(["run", "--variants", "bench_dd", "--seq-lens", "24", "--out", str(tmp_path), *TINY]) == 0
    (rec,) = read_results(tmp_path / "results.jsonl")
    assert rec["status"] == "ok" and 0 < rec["density"] < 1 and rec["compressed_density"] == 0.0
    assert rec["recall_method"].startswith("sla.selection") and 0 < rec["recall_mean"] < 1
    reach = (24 + 1) / 2 if rec["causal"] else 24
    assert rec["flops"] == pytest.approx(2 * 1 * 2 * 24 * rec["density"] * reach * 16)


def _block_dense(block_mask, bs, heads, nq, nk, causal):
    """``(B, H, nq, nk)`` entries of a block mask, by plain loops, minus what causality hides."""
    B, Hkv = block_mask.shape[:2]
    out = torch.zeros(B, heads, nq, nk, dtype=torch.bool)
    for b in range(B):
        for h in range(heads):
            for i in range(nq):
                for j in range(nk):
                    out[b, h, i, j] = bool(block_mask[b, h // (heads // Hkv), i // bs, j // bs])
    return out & visible(nq, nk, causal=causal)


def _pseudo_key_entries(block_mask, bs, heads, nq, nk, causal, params):
    """Query × pseudo-key entries of ``hybrid``: per query block, the groups of its remainder
    (the plain-loop ``remainder_groups_naive``) holding at least one unselected key."""
    from sparse_linear_attn.variants.hybrid import remainder_groups_naive

    chunk, near = params.get("remainder_block") or bs, params.get("remainder_near", 8)
    ranges = remainder_groups_naive(nq, nk, bs, causal=causal, local_blocks=params.get("local_blocks", 1),
                                    chunk=chunk, near=near)  # fmt: skip
    B, Hkv = block_mask.shape[:2]
    total = 0
    for b in range(B):
        for g in range(Hkv):
            for a, row in enumerate(ranges):
                queries = min((a + 1) * bs, nq) - a * bs
                for start, stop in row:
                    if any(not bool(block_mask[b, g, a, j // bs]) for j in range(start, stop)):
                        total += queries * (heads // Hkv)
    return total


def _scoreable_pairs(n, bs):
    """(query block, key block) pairs a strictly causal estimator scores: key block complete at
    the query block's first query."""
    nb = -(-n // bs)
    return sum(1 for a in range(nb) for c in range(nb) if min((c + 1) * bs, n) - 1 <= a * bs)


@pytest.mark.parametrize(
    "variant,params,per_pair",
    [
        ("topk_block", {"block_size": 8, "density": 0.4}, lambda bs, D: 2 * D),  # mean_pool: q̄·k̄
        ("topk_block", {"block_size": 8, "mass": 0.6, "estimator": "key_pool"}, lambda bs, D: 2 * bs * D),
        ("hybrid", {"block_size": 8, "density": 0.3, "remainder_near": 2}, lambda bs, D: 2 * D),
        (
            "hybrid",
            {"block_size": 8, "density": 0.5, "remainder_block": 4, "estimator": "antidiagonal", "stride": 4},
            lambda bs, D: 2 * bs * bs * D / 4,
        ),
    ],
)
def test_bench_records_of_topk_block_and_hybrid(variant, params, per_pair, tmp_path):
    """The real data-dependent variants through a sweep: density and compressed density of the
    selection these inputs get, recall against float64 weights on the sampled rows, the error of
    the call with these parameters, FLOPs from the entries plus the estimator."""
    from sparse_linear_attn.bench.inputs import make_inputs

    N, H, D, bs = 48, 2, 8, params["block_size"]
    spec = variant + ":" + ",".join(f"{k}={v}" for k, v in params.items())
    args = ["run", "--variants", spec, "--seq-lens", str(N), "--causal", "--inputs", "peaked", "--recall-rows", "20",
            "--reference-dtype", "float64", "--out", str(tmp_path), *TINY]  # fmt: skip
    assert main(args) == 0
    (rec,) = read_results(tmp_path / "results.jsonl")
    assert rec["status"] == "ok", rec["reason"]
    q, k, v = make_inputs("peaked", 1, H, N, D, causal=True)
    sel = sla.selection(q, k, variant, causal=True, **params)
    vis = visible(N, N, causal=True)
    dense = _block_dense(sel.block_mask, bs, H, N, N, True)
    assert torch.equal(dense, sel.dense())
    density = float(dense.sum()) / (float(vis.sum()) * H)
    assert rec["density"] == pytest.approx(density, rel=1e-12) and 0 < density < 1
    compressed = 0.0
    if variant == "hybrid":
        compressed = _pseudo_key_entries(sel.block_mask, bs, H, N, N, True, params) / (float(vis.sum()) * H)
        assert compressed > 0
    assert rec["compressed_density"] == pytest.approx(compressed, rel=1e-12, abs=1e-15)
    # Recall: float64 weights over the visible keys, summed over the chosen entries, on the 20 rows.
    rows = accuracy.sample_rows(N, 20)
    _, w = softmax_attention(q, k, v, vis)
    mass = (w * dense)[:, :, rows].sum(-1)
    assert rec["recall_rows"] == 20
    assert rec["recall_mean"] == pytest.approx(float(mass.mean()), rel=1e-9)
    assert rec["recall_p5"] == pytest.approx(float(torch.quantile(mass.flatten(), 0.05)), rel=1e-9)
    # The error is the call's with these parameters: topk_block is a masked softmax over them.
    exact, _ = softmax_attention(q, k, v, vis)
    if variant == "topk_block":
        approx, _ = softmax_attention(q, k, v, dense)
    else:
        approx = sla.attention(q.double(), k.double(), v.double(), variant, causal=True, backend="math", **params)
    err = float((approx - exact).norm() / exact.norm())
    assert rec["rel_error_vs_full"] == pytest.approx(err, rel=1e-4) and err > 1e-3
    # FLOPs: 2·(D + Dv) per computed entry, exact or compressed, plus the estimator's logits.
    entries = (density + compressed) * float(vis.sum()) * H
    estimator = H * _scoreable_pairs(N, bs) * per_pair(bs, D)
    assert rec["flops"] == pytest.approx(2 * entries * 2 * D + estimator, rel=1e-12)
    # Forward and backward: the entries 3.5 times (backward 2.5× forward), the estimator once
    # (it runs without autograd).
    from sparse_linear_attn.bench.flops import count_flops

    both = count_flops(variant, params, batch=1, heads=H, nq=N, nk=N, head_dim=D, v_dim=D, causal=True,
                       backward=True, selection=sel)  # fmt: skip
    assert both["flops"] == pytest.approx(3.5 * 2 * entries * 2 * D + estimator, rel=1e-12)


def test_hybrid_densities_whose_forced_blocks_exceed_the_budget_compute_the_same(tmp_path):
    """Sink and diagonal blocks count toward the budget and are kept whatever it is: with 4 blocks
    of 64 at N = 256 (causal) they already exceed ⌈0.3·R⌉ in every row, so density 0.1 and 0.3 are
    one call; with blocks of 16 the budget decides (the bench passes the parameter through)."""
    from sparse_linear_attn.bench.inputs import make_inputs

    q, k, _ = make_inputs("local", 1, 2, 256, 16, causal=True)
    d = {x: sla.selection(q, k, "hybrid", causal=True, density=x) for x in (0.1, 0.3)}
    assert torch.equal(d[0.1].block_mask, d[0.3].block_mask) and d[0.1].density == d[0.3].density > 0.6
    args = ["run", "--variants", "hybrid:block_size=[16,64],density=[0.1,0.3]", "--seq-lens", "256", "--causal",
            "--out", str(tmp_path), *TINY]  # fmt: skip
    assert main(args) == 0
    by = {(json.loads(r["params"])["block_size"], json.loads(r["params"])["density"]): r
          for r in read_results(tmp_path / "results.jsonl")}  # fmt: skip
    assert by[(64, 0.1)]["density"] == by[(64, 0.3)]["density"]
    assert by[(64, 0.1)]["rel_error_vs_full"] == by[(64, 0.3)]["rel_error_vs_full"]
    assert by[(16, 0.1)]["density"] < by[(16, 0.3)]["density"]
    assert by[(16, 0.1)]["rel_error_vs_full"] > by[(16, 0.3)]["rel_error_vs_full"]


# ---------------------------------------------------------------------------------------------
# The oracle: the entries of largest exact weight, across rows and heads.


def _brute_oracle(q, k, v, t, causal, rows):
    """The selection of every visible weight >= t (and each row's largest), from float64 weights."""
    vis = visible(q.shape[2], k.shape[2], causal=causal)
    exact, w = softmax_attention(q, k, v, vis)
    num = den = 0.0
    masses, kept, reach = [], 0, 0
    g = q.shape[1] // k.shape[1]
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in rows.tolist():
                row = w[b, h, i]
                keep = [j for j in range(k.shape[2]) if vis[0, 0, i, j] and (row[j] >= t or j == int(row.argmax()))]
                p = row[keep]
                out = (p[:, None] * v[b, h // g, keep].double()).sum(0) / p.sum()
                num += float((out - exact[b, h, i]).square().sum())
                den += float(exact[b, h, i].square().sum())
                masses.append(float(p.sum()))
                kept += len(keep)
                reach += int(vis[0, 0, i].sum())
    return math.sqrt(num / den), masses, kept / reach, w[:, :, rows][vis.expand_as(w)[:, :, rows]]


@pytest.mark.parametrize("causal", [False, True])
def test_oracle_against_brute_force(causal):
    q, k = _qk(B=1, H=2, Hkv=1, nq=20, nk=20, seed=4)
    v = torch.randn(1, 1, 20, 8, generator=torch.Generator().manual_seed(5))
    rows = torch.tensor([0, 3, 7, 12, 19])
    got = accuracy.oracle(q, k, v, [0.1, 0.3, 1.0], scale=1 / math.sqrt(8), causal=causal, rows=rows, chunk_bytes=1)
    for d in (0.1, 0.3, 1.0):
        t = got[d]["threshold"]
        err, masses, dens, weights = _brute_oracle(q, k, v, t, causal, rows)
        assert got[d]["rel_error"] == pytest.approx(err, rel=1e-9, abs=1e-12)
        assert got[d]["recall_mean"] == pytest.approx(sum(masses) / len(masses), rel=1e-12)
        assert got[d]["density"] == pytest.approx(dens)
        # The threshold is the tightest histogram edge that keeps the budget: one bin higher keeps less.
        budget = d * weights.numel()
        assert int((weights >= t).sum()) >= budget > int((weights >= t * 10 ** (1 / 400)).sum()) or d == 1.0
    assert got[1.0]["rel_error"] < 1e-12 and got[1.0]["recall_mean"] == pytest.approx(1.0)
    # No selection of as many entries holds more mass: a window of 2 at the oracle's density or less.
    sw = accuracy.computed_entries("sliding_window", {"window": 2}, q, k, causal=causal, rows=rows, scale=8**-0.5)
    sw_recall = sla.attention_recall(q, k, sw.mask, causal=causal, rows=rows, scale=8**-0.5)
    vis = visible(20, 20, causal=causal)[0, 0, rows]
    sw_density = float((sw.mask & vis).sum() / vis.sum())
    orc = accuracy.oracle(q, k, v, [sw_density], scale=8**-0.5, causal=causal, rows=rows)[sw_density]
    assert orc["density"] >= sw_density and orc["recall_mean"] >= float(sw_recall.mean())


def test_oracle_on_sampled_rows_estimates_the_whole_output():
    from sparse_linear_attn.bench.inputs import make_inputs

    q, k, v = make_inputs("local", 1, 2, 512, 16, seed=2)
    scale = 0.25
    every = accuracy.oracle(q, k, v, [1 / 16], scale=scale, causal=True, rows=torch.arange(512))[1 / 16]
    some = accuracy.oracle(q, k, v, [1 / 16], scale=scale, causal=True, rows=accuracy.sample_rows(512, 64))[1 / 16]
    assert some["rel_error"] == pytest.approx(every["rel_error"], rel=0.15)
    assert some["recall_mean"] == pytest.approx(every["recall_mean"], abs=0.03)


# ---------------------------------------------------------------------------------------------
# Knob sweeps.


def test_sweep_expansion_of_specs_and_study_entries():
    sw = parse_variant_specs("sliding_window:window=[32,64,128,256]")
    assert [v.label for v in sw] == [f"sliding_window:window={w}" for w in (32, 64, 128, 256)]
    assert all(v.sweep == ("window",) and v.params == {"window": w} for v, w in zip(sw, (32, 64, 128, 256)))
    cross = parse_variant_specs("block_sparse:block_size=[16,32],pattern=[local, bigbird],num_local_blocks=2")
    assert [(v.params["block_size"], v.params["pattern"]) for v in cross] == [
        (16, "local"), (16, "bigbird"), (32, "local"), (32, "bigbird"),
    ]  # fmt: skip
    assert all(v.params["num_local_blocks"] == 2 and v.sweep == ("block_size", "pattern") for v in cross)
    assert [v.backend for v in parse_variant_specs("full:backend=[torch,math]")] == ["torch", "math"]
    # A list of lists is a value (a layout), not a sweep.
    (lay,) = parse_variant_specs("block_sparse:block_size=4,layout=[[1,0],[1,1]]")
    assert lay.params["layout"] == [[1, 0], [1, 1]] and lay.sweep == ()
    # Study mappings sweep the same way.
    entry = {"variant": "sliding_window", "window": [8, 16]}
    assert [v.label for v in variants_from_entry(entry)] == ["sliding_window:window=8", "sliding_window:window=16"]
    oracle = parse_variant_specs("oracle")
    assert [v.params["density"] for v in oracle] == list(ORACLE_DENSITIES)
    assert [v.label for v in parse_variant_specs("oracle:density=[0.1,0.5]")] == [
        "oracle:density=0.1",
        "oracle:density=0.5",
    ]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("sliding_window:window=[]", "sweeps nothing"),
        ("sliding_window:window=[32,64,32]", "repeats the value 32"),
        ("sliding_window:window=[32,64", "not closed"),
        ("sliding_window:window=[32,-1]", r"setting window=-1: invalid window=-1"),
        ("sliding_window:window=[32,x]", "setting window='x'"),
        ("sliding_window:windw=[32,64]", "did you mean 'window'"),
        ("oracle:density=[0.1,1.5]", r"density must be a number in \(0, 1\]"),
        ("oracle:density=0.1,backend=torch", "takes no backend"),
        ("sliding_window:window=8,window=[8,16]", "given twice"),
    ],
)
def test_bad_sweep_lists_say_what_is_wrong(spec, message):
    with pytest.raises(ParameterError, match=message):
        parse_variant_specs(spec)


def test_sweeps_in_a_run_each_point_its_own_record_and_resume(tmp_path, capsys):
    args = ["run", "--variants", "full", "sliding_window:window=[2,4]", "--seq-lens", "16", "--out", str(tmp_path)]
    assert main([*args, *TINY]) == 0
    recs = read_results(tmp_path / "results.jsonl")
    assert [r["label"] for r in recs] == ["full", "sliding_window:window=2", "sliding_window:window=4"]
    assert [r["sweep"] for r in recs] == [[], ["window"], ["window"]]
    assert [json.loads(r["params"]) for r in recs[1:]] == [{"window": 2}, {"window": 4}]
    # Resuming with one more value measures only that one.
    args[3] = "sliding_window:window=[2,4,8]"
    assert main([*args, *TINY, "--resume"]) == 0
    again = read_results(tmp_path / "results.jsonl")
    assert [r["label"] for r in again] == [*(r["label"] for r in recs), "sliding_window:window=8"]
    assert [r["timestamp"] for r in again[:3]] == [r["timestamp"] for r in recs]
    # A bad list on the command line: one clear line, exit status 2, nothing measured.
    capsys.readouterr()
    assert main(["run", "--variants", "sliding_window:window=[]", "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "sweeps nothing" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# New columns and the frontier plot.


def test_run_records_density_recall_worst_head_and_oracle(tmp_path, monkeypatch):
    built = []
    dense_mask = sla.dense_mask

    def counting(name, *args, **kw):
        built.append((name, kw.get("window")))
        return dense_mask(name, *args, **kw)

    monkeypatch.setattr(sla, "dense_mask", counting)
    args = ["run", "--variants", "full", "sliding_window:window=[2,8]", "linear", "oracle:density=[0.25,0.5]",
            "--seq-lens", "32", "--causal", "--inputs", "local,peaked", "--out", str(tmp_path), *TINY]  # fmt: skip
    assert main(args) == 0
    # A static pattern's mask does not depend on the inputs: built once for both kinds.
    assert sorted(built) == [("sliding_window", 2), ("sliding_window", 8)]
    recs = read_results(tmp_path / "results.jsonl")
    assert {r["inputs"] for r in recs} == {"local", "peaked"} and len(recs) == 2 * 6
    by = {(r["inputs"], r["label"]): r for r in recs}
    for kind in ("local", "peaked"):
        full, lin = by[(kind, "full")], by[(kind, "linear")]
        assert full["density"] == 1.0 and full["recall_mean"] == full["recall_p5"] == 1.0
        assert lin["density"] is None and lin["recall_mean"] is None
        assert lin["rel_error_worst_head"] >= lin["rel_error_vs_full"] > 0
        w2, w8 = by[(kind, "sliding_window:window=2")], by[(kind, "sliding_window:window=8")]
        # Causal window w: min(i + 1, w + 1) keys of the i + 1 a row may see.
        expect = sum(min(i + 1, 3) for i in range(32)) / sum(i + 1 for i in range(32))
        assert w2["density"] == pytest.approx(expect)
        assert 0 < w2["recall_p5"] <= w2["recall_mean"] < w8["recall_mean"] <= 1
        assert w2["rel_error_vs_full"] > w8["rel_error_vs_full"]
        # Recall against an independent float64 computation on the same inputs.
        from sparse_linear_attn.bench.inputs import make_inputs

        q, k, v = make_inputs(kind, 1, 2, 32, 8, causal=True)
        i, j = torch.arange(32)[:, None], torch.arange(32)[None, :]
        _, w = softmax_attention(q, k, v, visible(32, 32, causal=True))
        mass = (w * ((j <= i) & (j >= i - 2))).sum(-1)
        assert w2["recall_mean"] == pytest.approx(float(mass.mean()), rel=1e-6)
        o25, o50 = by[(kind, "oracle:density=0.25")], by[(kind, "oracle:density=0.5")]
        assert o25["status"] == "ok" and o25["time_ms_median"] is None and o25["backend"] == "oracle"
        assert o25["rel_error_vs_full"] > o50["rel_error_vs_full"] and o25["recall_mean"] < o50["recall_mean"]
        assert o25["density"] == pytest.approx(0.25, abs=0.05) and o25["flops"] > 0


def _rec(variant, n, params, t, err, *, sweep=(), density=None, inputs="local", **extra):
    label = variant + (":" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) if params else "")
    return {"variant": variant, "params": json.dumps(params, sort_keys=True), "label": label, "sweep": list(sweep),
            "backend_requested": "auto", "n": n, "batch": 1, "heads": 2, "head_dim": 8, "dtype": "float32",
            "device": "cpu", "causal": False, "backward": False, "inputs": inputs, "temperature": 1.0, "seed": 0,
            "status": "ok", "time_ms_median": t, "flops": None if t is None else 1e6 * t, "density": density,
            "compressed_density": None if density is None else 0.0, "rel_error_vs_full": err,
            "env": {"device_name": "test CPU", "torch": "x"}, **extra}  # fmt: skip


def test_frontier_plot_from_a_small_results_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from sparse_linear_attn.bench.plot import frontier_lines

    recs = []
    for n in (1024, 4096):
        recs.append(_rec("full", n, {}, 10.0 * n / 1024, 1e-7, density=1.0))
        for w in (256, 32, 64):  # out of order: lines are ordered by the knob
            recs.append(_rec("sliding_window", n, {"window": w}, w / 32, 32 / w / (1024 / n), sweep=["window"],
                             density=2 * w / n))  # fmt: skip
        for bs, nl in ((32, 2), (64, 2), (32, 3), (64, 3)):  # knob block_size, a line per num_local_blocks
            recs.append(_rec("block_sparse", n, {"block_size": bs, "num_local_blocks": nl}, bs / 16, 0.5 / nl,
                             sweep=["block_size", "num_local_blocks"], density=bs * nl / n))  # fmt: skip
        # A plain spec beside a swept one of the same variant: a line (a point) of its own, no knob.
        recs.append(_rec("block_sparse", n, {"pattern": "bigbird"}, 5.0, 0.3, density=0.2))
        for m in (64, 128):  # no `sweep` (an older file): the varying parameter is the knob
            recs.append(_rec("performer", n, {"num_features": m}, 3.0, 0.9))
        recs.append(_rec("linear", n, {}, 1.0, 0.95))
        for d in (0.1, 0.5):
            recs.append(_rec("oracle", n, {"density": d}, None, 0.2 * (1 - d), sweep=["density"], density=d))
        recs.append(_rec("sliding_window", n, {"window": 8}, None, None, status="oom"))
    recs.append(_rec("full", 1024, {}, 12.0, 1e-7, density=1.0, inputs="peaked"))
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")

    lines = frontier_lines([r for r in recs if r["inputs"] == "local" and r["status"] == "ok"])
    assert lines["block_sparse:pattern=bigbird"][0] is None
    knob, sw = lines["sliding_window (window)"]
    assert knob == "window" and [json.loads(r["params"])["window"] for r in sw if r["n"] == 1024] == [32, 64, 256]
    assert set(lines) >= {
        "block_sparse:num_local_blocks=2 (block_size)",
        "block_sparse:num_local_blocks=3 (block_size)",
        *("performer (num_features)", "linear", "oracle (density)", "full"),
    }

    assert main(["frontier", str(path), "--x", "time", "flops", "density", "--out", str(tmp_path / "f")]) == 0
    names = sorted(p.name for p in (tmp_path / "f").iterdir())
    assert names == sorted(
        f"frontier_{x}_{kind}.png" for x in ("time", "flops", "density") for kind in ("local", "peaked")
    )
    for p in (tmp_path / "f").iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 20000
    # No end-to-end cosine in the file: a clear error, not an empty figure.
    capsys.readouterr()
    assert main(["frontier", str(path), "--y", "cosine", "--out", str(tmp_path / "g")]) == 2
    assert "cosine" in capsys.readouterr().err


def test_real_inputs_per_layer_errors_and_own_texts(tmp_path):
    from sparse_linear_attn.bench import real

    if real.missing_reason():
        pytest.skip(real.missing_reason())
    docs = [
        "Attention lets every token look at every other token, which costs time quadratic in the length.",
        "Sliding windows keep the nearest keys only. Block-sparse patterns keep a few tiles of the matrix.",
        "Linear attention replaces the softmax kernel by a feature map, so sums over keys factor out.",
    ]
    texts = tmp_path / "docs.txt"
    texts.write_text("\n\n".join(docs * 3) + "\n")
    assert real.read_documents(texts) == docs * 3  # one document per paragraph
    tok = real.load_model()[2]
    first = tok.encode(docs[0], add_special_tokens=False).ids
    assert real.token_stream(10, texts)[: len(first) + 1] == (*first, tok.token_to_id("[SEP]"))
    out = tmp_path / "out"
    args = ["run", "--inputs", "real", "--texts", str(texts), "--variants", "full", "sliding_window:window=2",
            "--seq-lens", "24", "--repeats", "1", "--warmup", "0", "--no-plot", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    full, sw = read_results(out / "results.jsonl")
    assert full["texts"].startswith("docs.txt (sha256 ") and "docs.txt" in full["error_note"]
    assert len(full["layer_rel_errors"]) == len(sw["layer_rel_errors"]) == 6
    assert max(full["layer_rel_errors"]) < 1e-5 < min(sw["layer_rel_errors"])
    assert sw["layer_rel_errors"][3] == pytest.approx(sw["rel_error_vs_full"])  # layer 3 is the timed one
    assert full["e2e_cosine"] > 0.99999 and "docs.txt" in full["e2e_note"] and sw["e2e_cosine"] < full["e2e_cosine"]
    # The same Q/K/V as a direct capture from that text.
    q, _, _, _ = real.real_qkv(24, layer=3, texts=texts)
    sw_direct = sla.attention(*real.real_qkv(24, layer=3, texts=texts)[:3], "sliding_window", window=2)
    ref = sla.attention(*(t.double() for t in real.real_qkv(24, layer=3, texts=texts)[:3]), "full")
    assert float(sla.relative_error(sw_direct, ref)) == pytest.approx(sw["rel_error_vs_full"], rel=1e-5)
    # Text too short for N: the points say so; nothing crashes.
    assert main([*args[:-1], str(tmp_path / "short"), "--seq-lens", "4096"]) == 0
    (short, _) = read_results(tmp_path / "short" / "results.jsonl")
    assert short["status"] == "error" and "tokens" in short["reason"]
