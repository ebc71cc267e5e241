"""Closed-form visible-key counts (used for FLOPs at any N) against the dense masks they replace."""

import pytest
import torch

import sparse_linear_attn as sla
from sparse_linear_attn import registry

CASES = [
    ("full", {}),
    ("dot_product", {}),
    ("sliding_window", {"window": 5}),
    ("sliding_window", {"window": 0}),
    ("block_sparse", {"block_size": 8}),
    ("block_sparse", {"block_size": 8, "pattern": "bigbird", "seed": 3}),
    ("block_sparse", {"block_size": 7, "pattern": "fixed", "num_local_blocks": 3}),
    ("block_sparse", {"block_size": 4, "pattern": "strided"}),
    ("block_sparse", {"block_size": 6, "pattern": "longformer"}),
]


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("nq,nk", [(40, 40), (33, 50), (50, 33), (37, 37)])
@pytest.mark.parametrize("causal", [False, True])
def test_visible_keys_equal_the_dense_mask_count(name, params, nq, nk, causal):
    spec = registry.get(name)
    want = float(sla.dense_mask(name, nq, nk, causal=causal, **params).sum(-1).double().mean())
    got = spec.visible_keys(nq, nk, causal=causal, **spec.resolve_params(params))
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_per_head_layout_is_averaged_over_heads():
    layout = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) < 0.5
    spec = registry.get("block_sparse")
    for causal in (False, True):
        want = float(
            sla.dense_mask("block_sparse", 33, 50, causal=causal, block_size=8, layout=layout).sum(-1).double().mean()
        )
        got = spec.visible_keys(33, 50, causal=causal, **spec.resolve_params({"block_size": 8, "layout": layout}))
        assert got == pytest.approx(want, rel=1e-12)


def test_counts_at_long_lengths_need_no_dense_mask():
    # N = 256K: a dense bool mask would be 64 GiB; the closed forms answer at once.
    n = 1 << 18
    spec = registry.get("block_sparse")
    k = spec.visible_keys(n, n, causal=True, **spec.resolve_params({"pattern": "local"}))
    # local, 3 blocks of 64 causal: 2 full blocks behind plus the diagonal, minus the first rows' edge.
    assert 128 < k <= 2 * 64 + 64.5
    assert registry.get("sliding_window").visible_keys(n, n, causal=True, window=256) == pytest.approx(257, rel=1e-3)
