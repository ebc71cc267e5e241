"""The compiled FlexAttention backend of sliding_window and block_sparse.

Each distinct shape/mask compiles once (seconds on CPU), so these tests are few and small. They
compare Flex with the pure-PyTorch path and with a float64 reference whose mask is written
here from the definition. Skipped where FlexAttention cannot compile.
"""

from __future__ import annotations

import pytest
import torch
from _env import flex_compiles
from _reference import pattern_attention

import sparse_linear_attn as sla
from sparse_linear_attn.backends import flex as flex_backend


@pytest.fixture(autouse=True)
def needs_flex():
    reason = flex_compiles()
    if reason:
        pytest.skip(reason)


def reference(q, k, v, mask, key_padding_mask=None):
    return pattern_attention(q, k, v, mask, key_padding_mask)[0]


def test_sliding_window_flex_matches_definition_and_torch_path():
    B, H, Hkv, nq, nk, w = 2, 4, 2, 200, 260, 37  # GQA, cross-attention, ragged vs 128 tiles
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(B, H, nq, 16, generator=g),
        torch.randn(B, Hkv, nk, 16, generator=g),
        torch.randn(B, Hkv, nk, 16, generator=g),
    )
    kpm = torch.rand(B, nk, generator=g) < 0.2
    kpm[1, :] = True  # batch 1: every key padded -> zero rows
    with torch.no_grad():
        out = sla.attention(q, k, v, "sliding_window", window=w, causal=True, key_padding_mask=kpm, backend="flex")
        ref_torch = sla.attention(
            q, k, v, "sliding_window", window=w, causal=True, key_padding_mask=kpm, backend="torch"
        )
    i = torch.arange(nq)[:, None] + nk - nq
    j = torch.arange(nk)[None, :]
    mask = (j >= i - w) & (j <= i)
    ref = reference(q, k, v, mask, kpm)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out, ref_torch, atol=2e-6, rtol=1e-5)
    assert out[1].abs().max() == 0


def test_block_sparse_flex_per_head_causal_ragged_and_cached():
    B, H, n, bs = 1, 2, 200, 64  # 200 = 3·64 + 8: ragged last block
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, n, 16, generator=g) for _ in range(3))
    layout = torch.rand(H, 4, 4, generator=g) < 0.5
    layout[:, 1] = False  # a block row that sees nothing -> zeros
    flex_backend.clear_cache()
    with torch.no_grad():
        out = sla.attention(q, k, v, "block_sparse", layout=layout, block_size=bs, causal=True, backend="flex")
        assert len(flex_backend._MASKS) == 1
        again = sla.attention(
            q, k, v, "block_sparse", layout=layout.clone(), block_size=bs, causal=True, backend="flex"
        )
        assert len(flex_backend._MASKS) == 1  # same layout content: the BlockMask is reused
        torch_path = sla.attention(q, k, v, "block_sparse", layout=layout, block_size=bs, causal=True, backend="torch")
    ii = torch.arange(n)[:, None]
    jj = torch.arange(n)[None, :]
    mask = layout[:, ii // bs, jj // bs] & (jj <= ii)
    ref = reference(q, k, v, mask)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(again, out)
    torch.testing.assert_close(torch_path, out, atol=2e-6, rtol=1e-5)
    assert out[:, :, 64:128].abs().max() == 0


def test_flex_has_no_cpu_backward_and_auto_falls_back():
    q, k, v = (torch.randn(1, 2, 64, 16, requires_grad=True) for _ in range(3))
    with pytest.raises(ValueError, match="no backward on cpu"):
        sla.attention(q, k, v, "sliding_window", window=4, backend="flex")
    out = sla.attention(q, k, v, "sliding_window", window=4)  # auto -> torch path
    out.sum().backward()
    assert q.grad is not None


def test_full_graph_cache_is_an_error_for_flex_and_a_fallback_for_auto(monkeypatch):
    # Past the graph limit torch would run Flex unfused (an N×N score matrix); instead explicit
    # flex raises and auto moves on to the next backend. Auto picks Flex on CUDA only, so here
    # the flex impl is given a preference that allows it on CPU.
    from sparse_linear_attn import registry
    from sparse_linear_attn.registry import Impl

    spec = registry.get("sliding_window")
    monkeypatch.setitem(
        spec.impls,
        "flex",
        Impl(spec.impls["flex"].fn, skip_in_auto=lambda call, params: flex_backend.cache_full_reason()),
    )
    monkeypatch.setattr(flex_backend, "MAX_COMPILED_GRAPHS", 1)
    monkeypatch.setattr(flex_backend, "_FULL_AT", None)
    g = torch.Generator().manual_seed(2)
    shapes = [(1, 2, n, 16) for n in (72, 88)]  # at most one compiles, the other needs a second graph
    with torch.no_grad():
        with pytest.raises(flex_backend.FlexCacheFull, match="MAX_COMPILED_GRAPHS"):
            for shape in shapes:
                q = torch.randn(shape, generator=g)
                sla.attention(q, q, q, "sliding_window", window=5, causal=True, backend="flex")
        assert flex_backend.cache_full_reason() is not None
        q, k, v = (torch.randn(1, 2, 104, 16, generator=g) for _ in range(3))
        out = sla.attention(q, k, v, "sliding_window", window=5, causal=True)  # auto: not flex any more
    i, j = torch.arange(104)[:, None], torch.arange(104)[None, :]
    torch.testing.assert_close(out.double(), reference(q, k, v, (j >= i - 5) & (j <= i)), atol=2e-6, rtol=1e-5)
    call = sla.inputs.make_call(q, k, v, causal=True, key_padding_mask=None, return_weights=False)
    assert sla.backends.dispatch.select_backend(spec, call, {"window": 5}) == "torch"


def test_auto_retries_without_flex_when_the_cache_fills_during_the_call(monkeypatch):
    from sparse_linear_attn import registry
    from sparse_linear_attn.registry import Impl

    def full_now(*args, **kwargs):
        monkeypatch.setattr(flex_backend, "_FULL_AT", flex_backend.MAX_COMPILED_GRAPHS)
        raise flex_backend.FlexCacheFull("full")

    spec = registry.get("sliding_window")
    monkeypatch.setitem(
        spec.impls, "flex", Impl(full_now, skip_in_auto=lambda call, params: flex_backend.cache_full_reason())
    )
    monkeypatch.setattr(flex_backend, "_FULL_AT", None)
    q, k, v = (torch.randn(1, 2, 50, 8, generator=torch.Generator().manual_seed(3)) for _ in range(3))
    out = sla.attention(q, k, v, "sliding_window", window=3)
    i, j = torch.arange(50)[:, None], torch.arange(50)[None, :]
    torch.testing.assert_close(out.double(), reference(q, k, v, (j - i).abs() <= 3), atol=2e-6, rtol=1e-5)
    with pytest.raises(flex_backend.FlexCacheFull):
        sla.attention(q, k, v, "sliding_window", window=3, backend="flex")
