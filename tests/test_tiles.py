"""backends/tiles.py: tile_attention against a float64 softmax written here."""

from __future__ import annotations

import pytest
import torch

from sparse_linear_attn.backends.tiles import tile_attention, use_bmm_tiles


def reference(q, k, v, scale, visible):
    s = (q.double() @ k.double().transpose(1, 2)) * scale
    s = s.masked_fill(~visible, float("-inf"))
    return torch.softmax(s, -1) @ v.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overlapping_spans_bias_on_last_keys_keep_mask_buffers(dtype):
    g = torch.Generator().manual_seed(0)
    n, T, L, D, Dv, stride = 5, 8, 20, 6, 4, 8
    seq = torch.randn(stride * (n - 1) + L, D, generator=g, dtype=dtype)
    vseq = torch.randn(stride * (n - 1) + L, Dv, generator=g, dtype=dtype)
    k = seq.as_strided((n, L, D), (stride * D, D, 1))  # overlapping spans, read in place
    v = vseq.as_strided((n, L, Dv), (stride * Dv, Dv, 1))
    q = torch.randn(n, T, D, generator=g, dtype=dtype)
    tri = torch.ones(T, T, dtype=torch.bool).tril()  # causal triangle on the last T keys
    bias = torch.zeros(T, T, dtype=dtype).masked_fill(~tri, float("-inf"))
    keep = torch.rand(n, 1, L, generator=g) < 0.7
    keep[..., -T] = True  # every query keeps its diagonal key
    visible = torch.cat([torch.ones(T, L - T, dtype=torch.bool), tri], 1) & keep
    out = torch.full((n, T, Dv), float("nan"), dtype=dtype)
    scores = torch.full((n * T * L + 7,), float("nan"), dtype=dtype)  # reused buffer, stale contents
    got = tile_attention(q, k, v, scale=0.3, bias=bias, keep=keep, out=out, scores=scores)
    assert got.data_ptr() == out.data_ptr()
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got.double(), reference(q, k, v, 0.3, visible), **tol)
    # The same call with each row's log-sum-exp (for merging with attention over other keys).
    out2 = torch.full((n, T, Dv), float("nan"), dtype=dtype)
    got2, lse = tile_attention(q, k, v, scale=0.3, bias=bias, keep=keep, out=out2, scores=scores, return_lse=True)
    assert got2.data_ptr() == out2.data_ptr()
    torch.testing.assert_close(got2.double(), reference(q, k, v, 0.3, visible), **tol)
    s = ((q.double() @ k.double().transpose(1, 2)) * 0.3).masked_fill(~visible, float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), **tol)


def test_used_only_where_it_was_measured():
    x = torch.zeros(1)
    assert use_bmm_tiles(x, grad=False) and use_bmm_tiles(x.double(), grad=False)
    assert not use_bmm_tiles(x, grad=True)  # autograd would keep every probability tile
    assert not use_bmm_tiles(x.bfloat16(), grad=False)  # SDPA accumulates half precision in float32
