"""Incremental decoding: prefill + token steps with a cache equal the one-shot causal call.

For every variant with a cache, a sequence of 37 tokens is fed as a prefill of 0, 1,
block − 1, block or 36 tokens followed by one-token steps, and as random chunk splits; the
concatenated outputs must equal ``sla.attention(q, k, v, variant, causal=True)`` over the whole
sequence (float64 to 1e-10, float32 to 1e-5). The exact variants are also checked against an
independent masked softmax (tests/_reference.py). Caches whose steps approximate the one-shot
call (``Cache.exact`` False: ``topk_block``, ``hybrid``) are held here only to giving the same
outputs and state for every split; tests/test_decoding_adaptive.py holds them to what must be
exact. Then: cache state after one prefill equals
the state after token steps; left-padded batches stay masked; ``reorder``; refusals (another
variant's call, other parameters, past ``max_len``); memory and preallocation.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _decoding import assert_close, decode

import sparse_linear_attn as sla
from sparse_linear_attn import feature_maps as fm
from sparse_linear_attn.errors import CacheError, ParameterError, ShapeError
from sparse_linear_attn.patterns import pattern_layout
from tests._reference import pattern_attention, softmax_attention

B, H, HKV, N, D, DV = 2, 4, 2, 37, 8, 6
BLOCK = 8  # the "block" of the prefill lengths: block_size / chunk_size of the cases below

_lower = torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) < 0.5
USER_LAYOUT = _lower | torch.eye(5, dtype=torch.bool)
PER_HEAD_LAYOUT = torch.stack([USER_LAYOUT, USER_LAYOUT.T, torch.eye(5, dtype=torch.bool), ~USER_LAYOUT])

CASES = {
    "full": ("full", {}),
    "dot_product": ("dot_product", {}),
    "window5": ("sliding_window", {"window": 5}),
    "window0": ("sliding_window", {"window": 0}),
    "window_wide": ("sliding_window", {"window": 50}),
    "bs_local": ("block_sparse", {"block_size": BLOCK, "num_local_blocks": 2}),
    "bs_strided": ("block_sparse", {"block_size": BLOCK, "pattern": "strided", "stride": 2}),
    "bs_fixed": ("block_sparse", {"block_size": BLOCK, "pattern": "fixed", "num_local_blocks": 2}),
    "bs_longformer": ("block_sparse", {"block_size": BLOCK, "pattern": "longformer", "num_local_blocks": 2}),
    "bs_bigbird": ("block_sparse", {"block_size": BLOCK, "pattern": "bigbird", "num_random_blocks": 1, "seed": 3}),
    "bs_layout": ("block_sparse", {"block_size": BLOCK, "layout": USER_LAYOUT}),
    "bs_per_head": ("block_sparse", {"block_size": BLOCK, "layout": PER_HEAD_LAYOUT}),
    "elu": ("linear", {"chunk_size": BLOCK}),
    "relu": ("linear", {"feature_map": "relu", "chunk_size": BLOCK}),
    "favor": ("linear", {"feature_map": "favor", "num_features": 16, "chunk_size": BLOCK}),
    "taylor": ("linear", {"feature_map": "taylor", "chunk_size": BLOCK}),
    "performer": ("performer", {"num_features": 16, "seed": 2, "chunk_size": BLOCK}),
}
if "sinks" in sla.describe("sliding_window").params:  # attention sinks (issue 11), once they exist
    CASES["window_sinks"] = ("sliding_window", {"window": 4, "sinks": 3})
    CASES["window0_sinks"] = ("sliding_window", {"window": 0, "sinks": 2})

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


pytestmark = pytest.mark.usefixtures("one_thread")


def qkv(batch=B, n=N, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, H, n, D, generator=g).to(dtype),
        torch.randn(batch, HKV, n, D, generator=g).to(dtype),
        torch.randn(batch, HKV, n, DV, generator=g).to(dtype),
    )


def prefill_then_steps(prefill: int, n: int = N) -> list[int]:
    return ([prefill] if prefill else []) + [1] * (n - prefill)


# ---------------------------------------------------------------------------------------------
# Outputs equal the one-shot causal call.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_then_token_steps_equal_one_shot(case, dtype):
    variant, params = CASES[case]
    q, k, v = qkv(dtype=dtype)
    with torch.no_grad():
        ref = sla.attention(q, k, v, variant, causal=True, **params)
        for prefill in (0, 1, BLOCK - 1, BLOCK, N - 1):
            out, cache = decode(variant, params, q, k, v, prefill_then_steps(prefill))
            assert out.dtype == dtype and out.shape == (B, H, N, DV)
            assert cache.seq_len == N
            assert_close(out, ref, TOL[dtype])


@pytest.mark.parametrize("case", list(CASES))
def test_random_chunk_splits_equal_one_shot(case):
    variant, params = CASES[case]
    q, k, v = qkv()
    ref = sla.attention(q, k, v, variant, causal=True, **params)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        cuts = sorted(torch.randperm(N - 1, generator=g)[:6].add(1).tolist())
        splits = [b - a for a, b in zip([0, *cuts], [*cuts, N])]
        out, _ = decode(variant, params, q, k, v, splits)
        assert_close(out, ref, 1e-10)


def _registry_examples(exact: bool):
    """Every registered variant whose cache is ``exact`` (or not), with each parameter set of
    its spec's ``examples`` (those the conformance suite runs) and its defaults: variants added
    later are covered without a line here."""
    from sparse_linear_attn import registry
    from sparse_linear_attn.decoding import FAMILIES

    out = []
    for name in sla.available_variants():
        spec = registry.get(name)
        family = FAMILIES.get(spec.cache_family or "")
        if family is None or family.exact != exact or spec.module is not None:
            continue
        for i, params in enumerate([{}, *spec.examples]):
            out.append(pytest.param(name, dict(params), id=f"{name}-{i}"))
    return out


@pytest.mark.parametrize("variant, params", _registry_examples(exact=True))
def test_every_cached_variant_and_its_examples_decode_like_one_shot(variant, params):
    q, k, v = qkv(n=29)
    ref = sla.attention(q, k, v, variant, causal=True, **params)
    for splits in ([29], [1] * 29, [5, 1, 1, 13, 9]):
        out, _ = decode(variant, params, q, k, v, splits)
        assert_close(out, ref, 1e-10)


@pytest.mark.parametrize("variant, params", _registry_examples(exact=False))
def test_every_approximate_cache_gives_one_output_and_state_whatever_the_split(variant, params):
    # A cache whose steps approximate the one-shot call (Cache.exact False: a per-query block
    # selection) is not held to it here — its own tests measure and bound the gap — but
    # chunked prefill and token steps are still the same call: every split of the sequence
    # into calls gives the same outputs and the same state.
    q, k, v = qkv(n=29)
    kpm = torch.zeros(B, 29, dtype=torch.bool)
    kpm[0, :3] = True
    ref, one = decode(variant, params, q, k, v, [29], kpm=kpm)
    assert torch.isfinite(ref).all() and torch.all(ref[0, :, :3] == 0)
    for splits in ([1] * 29, [5, 1, 1, 13, 9]):
        out, cache = decode(variant, params, q, k, v, splits, kpm=kpm)
        assert_close(out, ref, 1e-10)
        _states_close(cache.state_dict(), one.state_dict(), 1e-10)


EXACT = [c for c, (variant, _) in CASES.items() if sla.describe(variant).exact]


@pytest.mark.parametrize("case", EXACT)
def test_exact_variants_equal_an_independent_masked_softmax(case):
    variant, params = CASES[case]
    q, k, v = qkv()
    scale = 1.0 if variant == "dot_product" else 1 / math.sqrt(D)
    causal = torch.ones(N, N).tril().bool()
    if variant in ("full", "dot_product"):
        mask = causal
    elif variant == "sliding_window":
        i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
        mask = causal & ((i - j <= params["window"]) | (j < params.get("sinks", 0)))
    elif "layout" in params:
        lay = params["layout"]
        mask = lay.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)[..., :N, :N] & causal
    else:
        names = ("num_local_blocks", "num_global_blocks", "num_random_blocks", "stride", "seed")
        lay = pattern_layout(
            params.get("pattern") or "local", 5, 5, causal=True, **{n: params[n] for n in names if n in params}
        )
        mask = lay.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:N, :N] & causal
    ref, _ = pattern_attention(q, k, v, mask, scale=scale)
    out, _ = decode(variant, params, q, k, v, [3, 1, 9, 1, 1, 16, 1, 5])
    assert_close(out, ref, 1e-10)


def test_additive_module_steps_equal_its_one_shot_call():
    layer = sla.build({"variant": "additive", "head_dim": D, "hidden_dim": 5, "causal": True}).double()
    q, k, v = qkv()
    with torch.no_grad():
        ref = layer(q, k, v)
        cache = layer.make_cache(B, HKV, D, DV, dtype=torch.float64, max_len=N)
        outs = [layer(q[:, :, :BLOCK], k[:, :, :BLOCK], v[:, :, :BLOCK], cache=cache)]
        for t in range(BLOCK, N):
            outs.append(layer(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], cache=cache))
    assert_close(torch.cat(outs, 2), ref, 1e-10)


def test_module_make_cache_uses_its_config_and_needs_causal():
    layer = sla.build({"variant": "sliding_window", "window": 3, "causal": True})
    cache = layer.make_cache(1, HKV, D, DV)
    assert cache.variant == "sliding_window" and cache.params["window"] == 3
    q, k, v = qkv(batch=1, dtype=torch.float32)
    with torch.no_grad():
        out = torch.cat(
            [layer(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], cache=cache) for t in range(N)], 2
        )
        assert_close(out, layer(q, k, v), 1e-5)
    with pytest.raises(CacheError, match="causal=False"):
        sla.build({"variant": "full"}).make_cache(1, HKV, D)


def test_a_user_feature_map_decodes_too():
    fm.register_feature_map("test_decode_softplus", lambda x: torch.nn.functional.softplus(x))
    try:
        params = {"feature_map": "test_decode_softplus", "chunk_size": 4}
        q, k, v = qkv()
        out, _ = decode("linear", params, q, k, v, [5, 1, 1, 30])
        assert_close(out, sla.attention(q, k, v, "linear", causal=True, **params), 1e-10)
    finally:
        fm.unregister_feature_map("test_decode_softplus")


def test_favor_running_max_keeps_steps_equal_when_later_keys_grow():
    # Key norms grow along the sequence, so every step raises FAVOR+'s running max: the state is
    # rescaled again and again, and must still give the one-shot call (stabilised over all keys).
    q, k, v = qkv()
    k = k * torch.linspace(0.2, 4.0, N, dtype=torch.float64)[None, None, :, None]
    params = {"num_features": 16, "chunk_size": 4}
    ref = sla.attention(q, k, v, "performer", causal=True, **params)
    out, cache = decode("performer", params, q, k, v, prefill_then_steps(3))
    assert_close(out, ref, 1e-10)
    # The running max is the one-shot stabiliser at the end.
    ctx = fm.get_feature_map("favor").prepare(
        k, scale=1 / math.sqrt(D), num_features=16, seed=0, key_padding_mask=None, work_dtype=torch.float64
    )
    torch.testing.assert_close(cache.key_max, ctx.key_max, rtol=0, atol=0)


def test_feature_map_extend_matches_prepare_over_all_keys():
    # φ(k) under the context of a stream, times the accumulated factors, equals φ(k) under one
    # prepare over every key: the rescale is exactly the change of the common factor.
    fav = fm.get_feature_map("favor")
    k = torch.randn(2, 3, 20, 8, dtype=torch.float64) * torch.linspace(0.5, 3, 20, dtype=torch.float64)[:, None]
    kw = dict(scale=0.3, num_features=12, seed=1, work_dtype=torch.float64)
    whole = fav.prepare(k, key_padding_mask=None, **kw)
    ctx = fav.prepare(k[:, :, :0], key_padding_mask=None, **kw)
    sums = torch.zeros(2, 3, 12, dtype=torch.float64)
    for s, e in ((0, 4), (4, 5), (5, 13), (13, 20)):
        ctx, factor = fav.extend(ctx, k[:, :, s:e], key_padding_mask=None)
        sums = sums * factor[..., 0] + fav(k[:, :, s:e], ctx, is_query=False).sum(2)
    torch.testing.assert_close(sums, fav(k, whole, is_query=False).sum(2), rtol=1e-12, atol=0)
    for name in ("elu", "relu", "taylor"):
        m = fm.get_feature_map(name)
        c = m.prepare(k, key_padding_mask=None, **kw)
        assert m.extend(c, k, key_padding_mask=None) == (c, None)


# ---------------------------------------------------------------------------------------------
# State.


def _states_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, torch.Tensor):
            assert x.shape == y.shape, name
            if x.dtype == torch.bool or x.numel() == 0:
                assert torch.equal(x, y), name
            else:
                assert_close(x, y, tol)
        else:
            assert x == y, name


@pytest.mark.parametrize("case", list(CASES))
def test_state_after_one_prefill_equals_state_after_token_steps(case):
    variant, params = CASES[case]
    q, k, v = qkv()
    _, one = decode(variant, params, q, k, v, [N])
    _, steps = decode(variant, params, q, k, v, [1] * N)
    _, mixed = decode(variant, params, q, k, v, [BLOCK - 1, 1, 20, 9])
    _states_close(one.state_dict(), steps.state_dict(), 1e-10)
    _states_close(one.state_dict(), mixed.state_dict(), 1e-10)


@pytest.mark.parametrize("case", ["full", "window5", "bs_bigbird", "favor"])
def test_state_dict_round_trip_and_reset(case):
    variant, params = CASES[case]
    q, k, v = qkv()
    ref = sla.attention(q, k, v, variant, causal=True, **params)
    _, cache = decode(variant, params, q[:, :, :20], k[:, :, :20], v[:, :, :20], [20])
    saved = {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in cache.state_dict().items()}
    fresh = sla.make_cache(variant, batch=B, kv_heads=HKV, head_dim=D, value_dim=DV, dtype=torch.float64, **params)
    fresh.load_state_dict(saved)
    assert fresh.seq_len == 20
    sl = slice(20, N)
    out = sla.attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], variant, causal=True, cache=fresh, **params)
    assert_close(out, ref[:, :, 20:], 1e-10)
    cache.reset()
    assert cache.seq_len == 0
    out, _ = decode(variant, params, q, k, v, [4, 33], cache=cache)
    assert_close(out, ref, 1e-10)
    with pytest.raises(CacheError, match="saved from"):
        fresh.load_state_dict({**saved, "variant": "other"})


# ---------------------------------------------------------------------------------------------
# Padding and beam search.


@pytest.mark.parametrize("case", list(CASES))
def test_left_padded_prompts_stay_masked_while_decoding(case):
    variant, params = CASES[case]
    q, k, v = qkv()
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[0, :5] = True  # row 0's prompt is left-padded by 5
    kpm[1, 9] = True  # and a hole inside row 1's prompt
    ref = sla.attention(q, k, v, variant, causal=True, key_padding_mask=kpm, **params)
    prompt = 12
    # The mask is given with the prompt only; steps pass none (the cache keeps the prompt's).
    cache = sla.make_cache(variant, batch=B, kv_heads=HKV, head_dim=D, value_dim=DV, dtype=torch.float64, **params)
    first = sla.attention(
        q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], variant, causal=True,
        key_padding_mask=kpm[:, :prompt], cache=cache, **params,
    )  # fmt: skip
    rest, _ = decode(variant, params, q[:, :, prompt:], k[:, :, prompt:], v[:, :, prompt:], [1] * (N - prompt),
                     cache=cache)  # fmt: skip
    assert_close(torch.cat([first, rest], 2), ref, 1e-10)
    assert torch.all(first[0, :, :5] == 0)  # queries that see only padding: zero rows, not NaN
    # Masks given with every chunk, padding included in later chunks.
    kpm[1, 30] = True
    ref = sla.attention(q, k, v, variant, causal=True, key_padding_mask=kpm, **params)
    out, _ = decode(variant, params, q, k, v, [prompt, 1, 7, 1, 16], kpm=kpm)
    assert_close(out, ref, 1e-10)


@pytest.mark.parametrize("case", ["full", "window5", "bs_fixed", "bs_per_head", "elu", "performer"])
def test_reorder_selects_and_reorders_batch_rows(case):
    variant, params = CASES[case]
    q, k, v = qkv(batch=3)
    index = torch.tensor([2, 0, 0, 1])
    ref = sla.attention(q[index], k[index], v[index], variant, causal=True, **params)
    prompt = 11
    out_a, cache = decode(variant, params, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], [prompt])
    cache.reorder(index)
    assert cache.batch == 4
    sl = slice(prompt, N)
    out_b, _ = decode(variant, params, q[index][:, :, sl], k[index][:, :, sl], v[index][:, :, sl], [1] * (N - prompt),
                      cache=cache)  # fmt: skip
    assert_close(torch.cat([out_a[index], out_b], 2), ref, 1e-10)
    with pytest.raises(CacheError, match="rows are 0..3"):
        cache.reorder([0, 4])
    with pytest.raises(CacheError, match="1-D integer"):
        cache.reorder(torch.tensor([[0]]))


# ---------------------------------------------------------------------------------------------
# Refusals.


def test_a_cache_refuses_another_variants_call():
    q, k, v = qkv(batch=1)
    cache = sla.make_cache("full", batch=1, kv_heads=HKV, head_dim=D, value_dim=DV, dtype=torch.float64)
    with pytest.raises(CacheError, match=r"made for variant 'full', but the call runs 'sliding_window'"):
        sla.attention(q, k, v, "sliding_window", window=4, causal=True, cache=cache)
    win = sla.make_cache("sliding_window", batch=1, kv_heads=HKV, head_dim=D, value_dim=DV, dtype=torch.float64,
                         window=4)  # fmt: skip
    with pytest.raises(CacheError, match=r"other parameters: window=4 \(call: 5\)"):
        sla.attention(q, k, v, "sliding_window", window=5, causal=True, cache=win)
    with pytest.raises(CacheError, match="causal=True"):
        sla.attention(q, k, v, "full", cache=cache)
    with pytest.raises(CacheError, match="return_weights"):
        sla.attention(q, k, v, "full", causal=True, return_weights=True, cache=cache)
    with pytest.raises(CacheError, match=r"\(batch, kv_heads, head_dim, value_dim\) = \(1, 2, 8, 8\)"):
        sla.attention(q, k, torch.randn(1, HKV, N, D, dtype=torch.float64), "full", causal=True, cache=cache)
    with pytest.raises(CacheError, match="float32 on cpu; the cache holds float64"):
        sla.attention(q.float(), k.float(), v.float(), "full", causal=True, cache=cache)
    with pytest.raises(CacheError, match="same new tokens"):
        sla.attention(q[:, :, :2], k[:, :, :3], v[:, :, :3], "full", causal=True, cache=cache)
    with pytest.raises(CacheError, match="no_grad"):
        sla.attention(q.requires_grad_(), k, v, "full", causal=True, cache=cache)
    with pytest.raises(ParameterError, match="sla.Cache"):
        sla.attention(q, k, v, "full", causal=True, cache="not a cache")
    assert cache.seq_len == 0  # refused calls change nothing


@pytest.mark.parametrize("case", ["full", "window5", "bs_local", "elu"])
def test_a_step_past_max_len_is_refused(case):
    variant, params = CASES[case]
    q, k, v = qkv()
    out, cache = decode(variant, params, q[:, :, :10], k[:, :, :10], v[:, :, :10], [8, 1], max_len=10)
    with pytest.raises(CacheError, match="would pass this cache's limit of 10 positions"):
        sla.attention(q[:, :, 9:11], k[:, :, 9:11], v[:, :, 9:11], variant, causal=True, cache=cache, **params)
    assert cache.seq_len == 9
    last = sla.attention(q[:, :, 9:10], k[:, :, 9:10], v[:, :, 9:10], variant, causal=True, cache=cache, **params)
    ref = sla.attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], variant, causal=True, **params)
    assert_close(torch.cat([out, last], 2), ref, 1e-10)
    with pytest.raises(CacheError, match="limit of 10"):
        sla.attention(q[:, :, 10:11], k[:, :, 10:11], v[:, :, 10:11], variant, causal=True, cache=cache, **params)


def test_block_sparse_user_layout_bounds_the_length_and_must_be_square():
    params = CASES["bs_layout"][1]
    q, k, v = qkv(n=41)
    _, cache = decode("block_sparse", params, q[:, :, :40], k[:, :, :40], v[:, :, :40], [40])
    with pytest.raises(CacheError, match="layout covers 5 blocks of 8"):
        sla.attention(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], "block_sparse", causal=True, cache=cache, **params)
    with pytest.raises(CacheError, match="square layout"):
        sla.make_cache("block_sparse", batch=1, kv_heads=1, head_dim=D, block_size=8, layout=torch.ones(3, 4).bool())
    cache = sla.make_cache("block_sparse", batch=1, kv_heads=HKV, head_dim=D, value_dim=DV, dtype=torch.float64,
                           block_size=BLOCK, layout=PER_HEAD_LAYOUT)  # fmt: skip
    q2 = torch.randn(1, 2, 3, D, dtype=torch.float64)
    with pytest.raises(CacheError, match="per-head layout has 4 heads but q has 2"):
        sla.attention(q2, k[:1, :, :3], v[:1, :, :3], "block_sparse", causal=True, cache=cache, block_size=BLOCK,
                      layout=PER_HEAD_LAYOUT)  # fmt: skip


def test_make_cache_checks_its_arguments():
    with pytest.raises(CacheError, match="has no decoding cache. Variants with one: .*full"):

        @sla.register_variant("test_no_cache")
        def _plain(q, k, v, *, causal, key_padding_mask, scale):
            return q

        try:
            sla.make_cache("test_no_cache", batch=1, kv_heads=1, head_dim=4)
        finally:
            sla.unregister_variant("test_no_cache")
    with pytest.raises(ParameterError, match="batch must be a positive int"):
        sla.make_cache("full", batch=0, kv_heads=1, head_dim=4)
    with pytest.raises(ParameterError, match="max_len must be a positive int or None"):
        sla.make_cache("full", batch=1, kv_heads=1, head_dim=4, max_len=-3)
    with pytest.raises(ParameterError, match="floating-point"):
        sla.make_cache("full", batch=1, kv_heads=1, head_dim=4, dtype=torch.int32)
    with pytest.raises(ParameterError, match="did you mean 'window'"):
        sla.make_cache("sliding_window", batch=1, kv_heads=1, head_dim=4, windw=3)
    with pytest.raises(sla.errors.UnknownNameError, match="Did you mean 'full'"):
        sla.make_cache("fulll", batch=1, kv_heads=1, head_dim=4)
    cache = sla.make_cache({"variant": "sliding_window", "window": 3, "causal": True}, batch=1, kv_heads=1, head_dim=4)
    assert cache.params["window"] == 3 and isinstance(cache, sla.Cache)
    # A non-causal config is refused, as a module built from it is.
    with pytest.raises(CacheError, match="causal=False"):
        sla.make_cache({"variant": "sliding_window", "window": 3}, batch=1, kv_heads=1, head_dim=4)
    with pytest.raises(CacheError, match="causal=False"):
        sla.build({"variant": "sliding_window", "window": 3}).make_cache(1, 1, 4)


# ---------------------------------------------------------------------------------------------
# Memory.


def test_kv_cache_is_preallocated_with_max_len_and_grows_geometrically_without():
    q, k, v = qkv(batch=1, n=300, dtype=torch.float32)
    cache = sla.make_cache("full", batch=1, kv_heads=HKV, head_dim=D, value_dim=DV, max_len=300)
    ptr, nbytes = cache.k.data_ptr(), cache.nbytes
    assert nbytes == 300 * HKV * (D + DV) * 4 + 300
    with torch.no_grad():
        decode("full", {}, q, k, v, [1] * 300, cache=cache)
    assert cache.k.data_ptr() == ptr and cache.nbytes == nbytes  # never reallocated
    grown, seen = sla.make_cache("full", batch=1, kv_heads=HKV, head_dim=D, value_dim=DV), set()
    for t in range(300):
        sla.attention(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], "full", causal=True, cache=grown)
        seen.add(grown.k.data_ptr())
    assert len(seen) <= 4  # 64, 128, 256, 512 positions
    assert grown.capacity < 2 * 300


@pytest.mark.parametrize("case", ["window5", "elu", "favor", "performer"])
def test_window_and_recurrent_memory_does_not_grow_with_length(case):
    variant, params = CASES[case]
    q, k, v = qkv(n=200, dtype=torch.float32)
    _, cache = decode(variant, params, q[:, :, :10], k[:, :, :10], v[:, :, :10], [10])
    small = cache.nbytes
    decode(variant, params, q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], [1] * 40 + [150], cache=cache)
    assert cache.seq_len == 200 and cache.nbytes == small
    if variant == "sliding_window":
        assert small == B * HKV * params["window"] * (D + DV) * 4 + B * params["window"]
    else:
        m = D if params.get("feature_map", "favor" if variant == "performer" else "elu") == "elu" else 16
        assert cache.state.shape == (B, HKV, m, DV + 1) and cache.state.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Layout rows do not depend on the length.


@pytest.mark.parametrize("pattern", ["local", "strided", "fixed", "longformer", "bigbird"])
def test_causal_pattern_rows_do_not_depend_on_the_length(pattern):
    kw = dict(causal=True, num_local_blocks=2, num_global_blocks=1, num_random_blocks=2, stride=2, seed=5)
    big = pattern_layout(pattern, 40, 40, **kw)
    for n in (3, 7, 17, 39):
        assert torch.equal(pattern_layout(pattern, n, n, **kw), big[:n, :n]), n
    # And a chunk of query blocks (bottom-right aligned, as a prefill continuing a cache) sees the same rows.
    assert torch.equal(pattern_layout(pattern, 6, 20, **kw), big[14:20, :20])


def test_full_decoding_matches_softmax_reference_with_grouped_heads():
    q, k, v = qkv()
    ref, _ = softmax_attention(q, k, v, torch.ones(N, N).tril().bool())
    out, _ = decode("full", {}, q, k, v, prefill_then_steps(BLOCK))
    assert_close(out, ref, 1e-10)


# ---------------------------------------------------------------------------------------------
# sla.MultiheadAttention: positions continue from the cache.

MHA_VARIANTS = {
    "full": {"variant": "full"},
    "window": {"variant": "sliding_window", "window": 3},
    "block_sparse": {"variant": "block_sparse", "block_size": 2, "pattern": "local", "num_local_blocks": 2},
    "linear": {"variant": "linear", "chunk_size": 4},
    "performer": {"variant": "performer", "num_features": 8, "chunk_size": 4},
}
if "sinks" in sla.describe("sliding_window").params:
    MHA_VARIANTS["window_sinks"] = {"variant": "sliding_window", "window": 3, "sinks": 2}


def _layer(name, positional, batch_first=True):
    torch.manual_seed(3)
    layer = sla.MultiheadAttention(
        16, 4, num_kv_heads=2, batch_first=batch_first, positional=positional,
        attention={**MHA_VARIANTS[name], "causal": True},
    )  # fmt: skip
    return layer.double().eval()


@pytest.mark.parametrize("positional", [None, "rope", "sinusoidal", "alibi"])
@pytest.mark.parametrize("name", list(MHA_VARIANTS))
def test_multihead_cached_steps_equal_the_uncached_call(name, positional):
    if positional == "alibi" and not sla.describe(MHA_VARIANTS[name]["variant"]).exact:
        pytest.skip("ALiBi needs an exact variant")
    layer = _layer(name, positional)
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    kpm = torch.zeros(2, 23, dtype=torch.bool)
    kpm[1, :4] = True  # row 1 left-padded
    with torch.no_grad():
        ref, _ = layer(x, x, x, key_padding_mask=kpm, need_weights=False)
        cache = layer.make_cache(2, max_len=23)
        outs = [layer(x[:, :6], x[:, :6], x[:, :6], key_padding_mask=kpm[:, :6], need_weights=False, cache=cache)[0]]
        for t in range(6, 23):
            xt = x[:, t : t + 1]
            outs.append(layer(xt, xt, xt, need_weights=False, cache=cache)[0])
    assert cache.seq_len == 23
    assert_close(torch.cat(outs, 1), ref, 1e-10)


def test_multihead_cache_with_sequence_first_layout():
    layer = _layer("window", "rope", batch_first=False)
    x = torch.randn(11, 2, 16, dtype=torch.float64)  # (L, B, E)
    with torch.no_grad():
        ref, _ = layer(x, x, x, need_weights=False)
        cache = layer.make_cache(2)
        out = torch.cat(
            [layer(x[s:e], x[s:e], x[s:e], need_weights=False, cache=cache)[0] for s, e in ((0, 4), (4, 5), (5, 11))]
        )
    assert_close(out, ref, 1e-10)


def test_multihead_cached_call_refusals():
    layer = _layer("full", None)
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    cache = layer.make_cache(1)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"need_weights=True \(pass need_weights=False\)"):
            layer(x, x, x, cache=cache)
        with pytest.raises(ValueError, match="attn_mask"):
            layer(x, x, x, need_weights=False, attn_mask=torch.zeros(3, 3, dtype=torch.bool), cache=cache)
        with pytest.raises(ShapeError, match="same new tokens"):
            layer(x, x[:, :2], x[:, :2], need_weights=False, cache=cache)
        with pytest.raises(CacheError, match="made for variant 'full', but the call runs 'linear'"):
            _layer("linear", None)(x, x, x, need_weights=False, cache=cache)
        noncausal = sla.MultiheadAttention(16, 4, batch_first=True).double()
        with pytest.raises(CacheError, match="causal=False"):
            noncausal.make_cache(1)
        with pytest.raises(ValueError, match="non-causal attention config"):
            noncausal(x, x, x, need_weights=False, cache=cache)
    with pytest.raises(CacheError, match="no_grad"):
        layer(x, x, x, need_weights=False, cache=cache)  # weights require grad outside no_grad
    assert cache.seq_len == 0
    linear_cache = _layer("linear", None).make_cache(1)
    with pytest.raises(CacheError, match="keeps no keys"):
        linear_cache.append(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))


# ---------------------------------------------------------------------------------------------
# sla-bench decode (figures live in docs/decoding.md; here only that it runs and records).


def test_sla_bench_decode_records_latency_and_cache_memory(tmp_path, capsys):
    from sparse_linear_attn.bench.cli import main

    argv = ["decode", "--variants", "full", "sliding_window:window=16", "performer:num_features=8",
            "topk_block:block_size=16", "--contexts", "64,256", "--batch", "1", "2", "--heads", "2", "--head-dim",
            "8", "--steps", "2", "--rounds", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "cpu pressure before" in printed and "ms/token" in printed
    rows = [json.loads(line) for line in (tmp_path / "decode.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 2 * 2
    by = {(r["variant"], r["batch"], r["context"]): r for r in rows}
    assert all(r["ms_per_token"] > 0 for r in rows)
    # full keeps every key (its cache grows with the context, preallocated to context + steps);
    # the ring and the recurrent state do not grow.
    assert by[("full", 1, 256)]["cache_bytes"] == 2 * 2 * (256 + 2) * 8 * 4 + (256 + 2)
    assert by[("full", 1, 256)]["cache_bytes"] > 3 * by[("full", 1, 64)]["cache_bytes"]
    # topk_block keeps every key too (in whole blocks of 16), plus a pooled key per block.
    topk = by[("topk_block:block_size=16", 1, 256)]["cache_bytes"]
    # k and v (2 kv heads × 272 positions × 8), padding flags, pooled keys and counts of 17 blocks.
    assert topk == 2 * 2 * 272 * 8 * 4 + 272 + 2 * 17 * 8 * 4 + 17 * 4
    for label in ("sliding_window:window=16", "performer:num_features=8"):
        assert by[(label, 2, 64)]["cache_bytes"] == by[(label, 2, 256)]["cache_bytes"]
        assert by[(label, 2, 64)]["cache_bytes"] == 2 * by[(label, 1, 64)]["cache_bytes"]
    assert main(["decode", "--variants", "full", "--steps", "0"]) == 2
    pytest.importorskip("matplotlib")  # last: the checks above hold without it
    assert (tmp_path / "decode.png").stat().st_size > 0
