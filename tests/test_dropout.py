"""Attention dropout (``dropout_p``): the positional mask, the tiled paths against a float64
reference that drops the same weights, the expectation over seeds, gradients, modules and layers."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from _reference import softmax_attention
from _trace import LargestTensor
from torch import nn

import sparse_linear_attn as sla
from sparse_linear_attn.backends.dropout import Dropout, draw_seed
from sparse_linear_attn.errors import ParameterError

F64 = torch.float64
M32 = 2**32 - 1

#: The exact variants that drop weights inside their own tiles, with patterns that exercise them.
CASES = [
    ("full", {}),
    ("dot_product", {}),
    ("sliding_window", {"window": 3}),
    ("block_sparse", {"block_size": 4}),
    ("block_sparse", {"block_size": 4, "pattern": "bigbird", "num_random_blocks": 1}),
]


def lowbias32(x: int) -> int:
    """Wellons' lowbias32 on Python ints (exact arithmetic, then truncated to 32 bits)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def keep_reference(p: float, seed: int, row: int, col: int) -> bool:
    """The documented mask: lowbias32(h_row ⊕ h_col) ≥ p·2³², on plain Python integers."""
    h_row = lowbias32(lowbias32((row & M32) ^ (seed & M32)) ^ ((row >> 32) & M32))
    h_col = lowbias32((col & M32) ^ lowbias32(((seed >> 32) & M32) ^ 0x9E3779B9))
    return lowbias32(h_row ^ h_col) >= min(M32, round(p * 2**32))


def dense_keep(p: float, seed: int, B: int, H: int, nq: int, nk: int) -> torch.Tensor:
    """Bool (B, H, nq, nk) from the integer reference (rows (b·H + h)·nq + i)."""
    out = torch.empty(B, H, nq, nk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                row = (b * H + h) * nq + i
                for j in range(nk):
                    out[b, h, i, j] = keep_reference(p, seed, row, j)
    return out


def qkv(B=2, H=4, Hkv=2, nq=19, nk=19, D=8, Dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, nq, D, generator=g, dtype=F64),
        torch.randn(B, Hkv, nk, D, generator=g, dtype=F64),
        torch.randn(B, Hkv, nk, Dv, generator=g, dtype=F64),
    )


# ---------------------------------------------------------------------------------------------
# The mask itself.


def test_keep_is_the_documented_hash():
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 2**62, (64,), generator=g)
    cols = torch.randint(0, 2**31, (64,), generator=g)
    for p, seed in ((0.1, 0), (0.5, 2**63 - 5), (0.9, 123456789)):
        got = Dropout(p, seed).keep(rows[:, None], cols[None, :])
        for a in range(0, 64, 7):
            for b in range(0, 64, 5):
                assert bool(got[a, b]) == keep_reference(p, seed, int(rows[a]), int(cols[b])), (p, seed, a, b)


def test_int64_hash_of_other_devices_gives_the_same_bits():
    # Off the CPU, keep() hashes with torch int64 ops (split multiplications, no overflow); the
    # CPU path uses numpy uint32. Both must be lowbias32 exactly.
    from sparse_linear_attn.backends import dropout as dropout_module

    x = torch.cat([torch.tensor([0, 1, M32, 2**31]), torch.randint(0, 2**32, (500,))])
    assert [int(y) for y in dropout_module._mix32(x)] == [lowbias32(int(y)) for y in x]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_independence(p):
    n_rows, n_cols = 2048, 512
    keep = Dropout(p, 99).keep(torch.arange(n_rows)[:, None], torch.arange(n_cols)[None, :]).to(F64)
    n = keep.numel()
    # Binomial: the kept fraction lies within 5 standard deviations of 1 - p.
    assert abs(keep.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)

    def corr(a, b):
        return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()

    # Neighbouring rows, keys, and the same positions under another seed are uncorrelated:
    # |r| < 5/√n for independent samples.
    other = Dropout(p, 100).keep(torch.arange(n_rows)[:, None], torch.arange(n_cols)[None, :]).to(F64)
    for a, b in ((keep[1:], keep[:-1]), (keep[:, 1:], keep[:, :-1]), (keep, other)):
        assert abs(corr(a, b)) < 5 / math.sqrt(a.numel()), corr(a, b)


# ---------------------------------------------------------------------------------------------
# Every path drops exactly the weights of the reference.


def reference(q, k, v, name, params, *, causal, key_padding_mask, p, seed, scale=None):
    """Float64 masked softmax, the documented mask applied, rescaled by 1/(1 − p)."""
    B, H, nq, _ = q.shape
    nk = k.shape[2]
    vis = sla.testing.reference_visibility(name, params, nq, nk, causal=causal, key_padding_mask=key_padding_mask)
    if scale is None:
        scale = 1.0 if name == "dot_product" else q.shape[-1] ** -0.5
    _, w = softmax_attention(q, k, v, vis, scale=scale)
    w = w * dense_keep(p, seed, B, H, nq, nk) / (1 - p)
    return w @ v.double().repeat_interleave(H // k.shape[1], dim=1)


@pytest.mark.parametrize("shape", [(19, 19), (11, 23), (23, 11)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name,params", CASES)
def test_every_backend_drops_the_reference_weights(name, params, causal, shape):
    nq, nk = shape
    q, k, v = qkv(nq=nq, nk=nk)
    kpm = torch.rand(2, nk, generator=torch.Generator().manual_seed(3)) < 0.25
    torch.manual_seed(11)
    seed = draw_seed()
    expected = reference(q, k, v, name, params, causal=causal, key_padding_mask=kpm, p=0.3, seed=seed)
    for backend in ("torch", "math"):
        for grad in (False, True):
            inputs = [t.clone().requires_grad_(grad) for t in (q, k, v)]
            torch.manual_seed(11)  # dispatch draws the call's seed first
            with torch.set_grad_enabled(grad):
                out = sla.attention(
                    *inputs, name, causal=causal, key_padding_mask=kpm, dropout_p=0.3, backend=backend, **params
                )
            torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12, msg=f"{backend} grad={grad}")


@pytest.mark.parametrize("name,params", [CASES[0], CASES[2], CASES[3]])
def test_gradients_through_recomputed_tiles_match_finite_differences(name, params):
    # The tiled paths recompute each checkpointed group in backward: only if the recomputation
    # drops what the forward dropped do the analytic gradients match finite differences.
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=2, Hkv=1, nq=10, nk=10, D=3, Dv=2))
    kpm = torch.zeros(1, 10, dtype=torch.bool)
    kpm[0, 4] = True

    def f(q, k, v):
        torch.manual_seed(5)
        return sla.attention(q, k, v, name, causal=True, key_padding_mask=kpm, dropout_p=0.4, **params)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, fast_mode=True)


def test_gqa_and_per_head_layouts_drop_per_query_head():
    q, k, v = qkv(B=1, H=4, Hkv=1, nq=16, nk=16)
    layout = torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(2)) < 0.6
    layout[:, torch.arange(4), torch.arange(4)] = True
    params = {"block_size": 4, "layout": layout}
    torch.manual_seed(4)
    seed = draw_seed()
    expected = reference(q, k, v, "block_sparse", params, causal=False, key_padding_mask=None, p=0.5, seed=seed)
    torch.manual_seed(4)
    out = sla.attention(q, k, v, "block_sparse", dropout_p=0.5, **params)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Statistics: dropout is unbiased, and its variance is that of independent Bernoulli masks.


@pytest.mark.parametrize("name,params", CASES[:1] + CASES[2:4])
def test_expectation_over_seeds_is_the_output_without_dropout(name, params):
    p, seeds, batch = 0.3, 20, 20
    q, k, v = qkv(B=1, H=2, Hkv=2, nq=12, nk=12, D=4, Dv=3)
    # Positive values: masks correlated across keys (a whole row dropped at once, say) then
    # raise the variance instead of averaging out against values of the other sign.
    v = v.abs() + 0.5
    exact, w = sla.attention(q, k, v, name, causal=True, return_weights=True, backend="math", **params)
    # Every batch row draws its own mask (rows differ), and so does every seed: n samples.
    qb, kb, vb = (t.expand(batch, -1, -1, -1) for t in (q, k, v))
    samples = []
    for s in range(seeds):
        torch.manual_seed(s)
        samples.append(sla.attention(qb, kb, vb, name, causal=True, dropout_p=p, backend="torch", **params))
    samples = torch.cat(samples)
    n = seeds * batch
    # out_id = Σ_j w_ij z_j v_jd / (1 − p) with z_j ~ Bernoulli(1 − p) independent:
    # E = exact,  Var = p/(1 − p) · Σ_j w_ij² v_jd².
    var = (p / (1 - p) * (w**2) @ (v**2))[0]
    exact = exact[0]
    live = var > 1e-12  # rows with one visible key (or none) have no variance
    m = int(live.sum())
    # Bonferroni over the m elements, family-wise error 1e-4: each mean within z standard errors.
    z = statistics.NormalDist().inv_cdf(1 - 1e-4 / (2 * m))
    err = (samples.mean(0) - exact).abs()
    assert (err[live] <= z * (var[live] / n).sqrt()).all(), (err[live] / (var[live] / n).sqrt()).max()
    assert (err[~live] < 1e-12).all()
    # The sample variance over the theoretical one, averaged: 1 within a few of its standard
    # errors (√(2/(n − 1)) each for near-normal samples; correlated masks inflate it a lot).
    ratio = (samples.var(0)[live] / var[live]).mean().item()
    assert abs(ratio - 1) < 5 * math.sqrt(2 / (n - 1)), ratio


def test_same_seed_same_output_other_seed_other_output():
    q, k, v = qkv()
    runs = []
    for s in (1, 1, 2):
        torch.manual_seed(s)
        runs.append(sla.attention(q, k, v, "sliding_window", window=4, dropout_p=0.2))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])
    # dropout_p=0 is no dropout, and draws nothing from the generator.
    torch.manual_seed(1)
    a = sla.attention(q, k, v, "sliding_window", window=4, dropout_p=0.0)
    after = torch.rand(())
    torch.manual_seed(1)
    torch.testing.assert_close(a, sla.attention(q, k, v, "sliding_window", window=4))
    assert torch.equal(after, torch.rand(()))


# ---------------------------------------------------------------------------------------------
# No dense weights on the tiled paths.


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize(
    "name,params,n",
    [("full", {}, 1024), ("sliding_window", {"window": 16}, 2048), ("block_sparse", {"block_size": 32}, 2048)],
)
def test_no_n_by_n_tensor_with_dropout(name, params, n, grad, monkeypatch):
    from sparse_linear_attn.variants import full

    # full's query tiles: 32 rows of 1024; sliding_window's band and block_sparse's three local
    # blocks cover 1/20 of N² at 2048. Any N×N tensor, or a sixteenth of one, shows.
    monkeypatch.setattr(full, "DROPOUT_TILE_ELEMENTS", 1 << 15)
    q, k, v = (torch.randn(1, 1, n, 16, requires_grad=grad) for _ in range(3))
    with torch.set_grad_enabled(grad), LargestTensor() as mode:
        out = sla.attention(q, k, v, name, causal=True, dropout_p=0.1, **params)
        if grad:
            out.sum().backward()
    assert mode.largest <= n * n // 16, mode.largest


# ---------------------------------------------------------------------------------------------
# Modules and layers: training drops, eval does not.


def test_built_module_applies_its_dropout_in_training_only():
    q, k, v = qkv()
    layer = sla.build({"variant": "block_sparse", "block_size": 4, "dropout": 0.25})
    assert layer.config.dropout == 0.25 and "dropout=0.25" in repr(layer)
    plain = sla.attention(q, k, v, "block_sparse", block_size=4)
    layer.eval()
    torch.testing.assert_close(layer(q, k, v), plain)
    torch.testing.assert_close(layer(q, k, v), layer(q, k, v))
    layer.train()
    torch.manual_seed(3)
    trained = layer(q, k, v)
    torch.manual_seed(3)
    torch.testing.assert_close(trained, sla.attention(q, k, v, "block_sparse", block_size=4, dropout_p=0.25))
    assert not torch.allclose(trained, plain)
    torch.testing.assert_close(layer(q, k, v, dropout_p=0.0), plain)  # an explicit dropout_p wins


def test_additive_drops_its_weights_like_the_reference():
    layer = sla.build({"variant": "additive", "head_dim": 8, "hidden_dim": 6, "dropout": 0.3}).double()
    q, k, v = qkv(B=1, H=2, Hkv=1, nq=9, nk=11)
    _, w = layer(q, k, v, return_weights=True, dropout_p=0.0)
    torch.manual_seed(8)
    seed = draw_seed()
    expected = (w * dense_keep(0.3, seed, 1, 2, 9, 11) / 0.7) @ v.repeat_interleave(2, dim=1)
    torch.manual_seed(8)
    torch.testing.assert_close(layer(q, k, v), expected, rtol=1e-10, atol=1e-12)
    layer.eval()
    torch.testing.assert_close(layer(q, k, v), w @ v.repeat_interleave(2, dim=1))


@pytest.mark.parametrize(
    "attention", [{"variant": "sliding_window", "window": 4}, {"variant": "block_sparse", "block_size": 4}]
)
def test_stock_encoder_layer_with_dropout_runs_a_patterned_variant_on_its_own_path(attention, monkeypatch):
    torch.manual_seed(0)
    stock = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)  # dropout 0.1 everywhere
    assert stock.self_attn.dropout == 0.1
    model = sla.swap_attention(stock, attention)
    assert model.self_attn.dropout == 0.1
    x = torch.randn(2, 24, 16)

    def no_dense(*args, **kwargs):
        raise AssertionError("the dense O(N²) path ran")

    monkeypatch.setattr(sla.MultiheadAttention, "_attend_dense", no_dense)
    model.train()
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # The same layer with the dense reference backend drops the same attention weights.
    reference_model = sla.swap_attention(
        nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True), {**attention, "backend": "math"}
    )
    reference_model.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    torch.testing.assert_close(out, reference_model(x), rtol=1e-5, atol=1e-6)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    assert not torch.allclose(model(x), out)


def test_full_layer_keeps_matching_torch_in_eval_and_drops_in_training():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=True).double()
    ours = sla.MultiheadAttention.from_torch(mha)
    x = torch.randn(2, 7, 16, dtype=F64)
    mha.eval()
    ours.eval()
    torch.testing.assert_close(ours(x, x, x)[0], mha(x, x, x)[0])
    ours.train()
    a, b = ours(x, x, x, need_weights=False)[0], ours(x, x, x, need_weights=False)[0]
    assert not torch.allclose(a, b)
    # Returned weights are the dropped-out ones (as nn.MultiheadAttention returns them): each is
    # 0 or the eval weight / (1 − p), about half dropped, and the output is those weights · V.
    out, w = ours(x, x, x, average_attn_weights=False)
    ours.eval()
    w_eval = ours(x, x, x, average_attn_weights=False)[1]
    kept = w != 0
    torch.testing.assert_close(w[kept], w_eval[kept] / 0.5)
    assert 0.35 < 1 - kept.double().mean() < 0.65
    v = torch.nn.functional.linear(x, mha.in_proj_weight[32:], mha.in_proj_bias[32:])  # (B, N, E)
    heads = (w @ v.view(2, 7, 4, 4).transpose(1, 2)).transpose(1, 2).reshape(2, 7, 16)
    torch.testing.assert_close(out, ours.out_proj(heads))


# ---------------------------------------------------------------------------------------------
# Errors.


def test_dropout_errors_say_what_is_accepted():
    q, k, v = qkv()
    for bad in (1.0, -0.1, float("nan"), True, "0.1", None):
        with pytest.raises(ParameterError, match=r"dropout_p must be a number in \[0, 1\)"):
            sla.attention(q, k, v, dropout_p=bad)
    with pytest.raises(ValueError, match=r"'linear' does not support attention dropout.*describe.*full"):
        sla.attention(q, k, v, "linear", dropout_p=0.1)
    with pytest.raises(ValueError, match=r"'performer' does not support attention dropout \(config 'dropout'"):
        sla.build({"variant": "performer", "dropout": 0.1})
    with pytest.raises(ValueError, match=r"config 'dropout' must be a number in \[0, 1\)"):
        sla.build({"variant": "full", "dropout": 2})
    with pytest.raises(ValueError, match="no weight matrix to drop"):
        sla.MultiheadAttention(16, 2, attention="linear", dropout=0.1)
    with pytest.raises(ValueError, match="given twice"):
        sla.MultiheadAttention(16, 2, dropout=0.2, attention={"variant": "full", "dropout": 0.1})
    assert sla.MultiheadAttention(16, 2, attention={"variant": "full", "dropout": 0.1}).dropout == 0.1
    with pytest.raises(ValueError, match="has no attention dropout"):
        sla.attention(q.float(), k.float(), v.float(), "sliding_window", backend="flex", dropout_p=0.1)
    info = sla.describe("linear")
    assert not info.dropout and any("no attention dropout" in n for n in info.notes)
    assert "no attention dropout" in str(info)
    assert all(sla.describe(n).dropout for n in ("full", "dot_product", "sliding_window", "block_sparse"))
    assert "dropout" in str(sla.describe("sliding_window")).split("backends")[0]


def test_user_function_with_dropout_p_receives_it():
    seen = []

    def user(q, k, v, *, causal, key_padding_mask, scale, dropout_p):
        seen.append(dropout_p)
        return v

    sla.register_variant("_dropout_user")(user)
    try:
        assert sla.describe("_dropout_user").dropout and "dropout_p" not in sla.describe("_dropout_user").params
        q, k, v = qkv(H=2, Hkv=2)
        sla.attention(q, k, v, "_dropout_user", dropout_p=0.2)
        sla.attention(q, k, v, "_dropout_user")
        assert seen == [0.2, 0.0]
    finally:
        sla.unregister_variant("_dropout_user")


@pytest.mark.cuda
@pytest.mark.parametrize("name,params", CASES[:3])
def test_cuda_dropout_is_unbiased_and_reproducible(name, params):
    # On CUDA, full/dot_product keep SDPA's fused dropout (its own mask); the others the tiles.
    p, n = 0.3, 400
    q, k, v = (t.cuda().float() for t in qkv(B=1, H=2, Hkv=2, nq=12, nk=12, D=4, Dv=3))
    exact, w = sla.attention(q, k, v, name, causal=True, return_weights=True, backend="math", **params)
    samples = torch.stack([sla.attention(q, k, v, name, causal=True, dropout_p=p, **params) for _ in range(n)])
    var = p / (1 - p) * (w.double() ** 2) @ (v.double() ** 2)
    live = var > 1e-10
    z = statistics.NormalDist().inv_cdf(1 - 1e-4 / (2 * int(live.sum())))
    err = (samples.double().mean(0) - exact.double()).abs()
    assert (err[live] <= z * (var[live] / n).sqrt() + 1e-5).all()
    torch.manual_seed(3)
    a = sla.attention(q, k, v, name, dropout_p=p, **params)
    torch.manual_seed(3)
    assert torch.equal(a, sla.attention(q, k, v, name, dropout_p=p, **params))


def test_dropout_with_a_decoding_cache_is_refused_clearly():
    layer = sla.build({"variant": "sliding_window", "window": 4, "causal": True, "dropout": 0.1})
    cache = layer.make_cache(batch=1, kv_heads=2, head_dim=8, dtype=F64)
    q, k, v = qkv(B=1, H=2, Hkv=2, nq=3, nk=3, Dv=8)
    with pytest.raises(ValueError, match=r"does not apply to cached decoding.*eval\(\)"):
        layer(q, k, v, cache=cache)
    layer.eval()
    layer(q, k, v, cache=cache)  # eval: no dropout, decoding runs
    assert cache.seq_len == 3
