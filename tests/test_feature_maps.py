"""The feature maps themselves: their kernels, FAVOR+'s projection, the registry."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_linear_attn import feature_maps as fm
from sparse_linear_attn.errors import UnknownNameError


def test_taylor_kernel_is_second_order_exp():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    scale = 0.3
    ctx = fm.FeatureContext(scale=scale)
    taylor = fm.get_feature_map("taylor")
    got = taylor(q, ctx, is_query=True) @ taylor(k, ctx, is_query=False).T
    s = q @ k.T * scale
    torch.testing.assert_close(got, 1 + s + s * s / 2)
    assert taylor.dim(5, 0) == 1 + 5 + 25 == got.new_empty(taylor(q, ctx, is_query=True).shape).shape[-1]


def test_elu_and_relu_ignore_scale():
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)[None]
    for name, want in (("elu", torch.where(x > 0, x + 1, torch.exp(x))), ("relu", x.clamp(min=0))):
        f = fm.get_feature_map(name)
        for scale in (0.1, 1.0):
            torch.testing.assert_close(f(x, fm.FeatureContext(scale=scale), is_query=True), want)


def test_orthogonal_projection_blocks_and_seed():
    d, m = 8, 20
    w = fm.orthogonal_gaussian_projection(d, m, seed=5)
    assert w.shape == (m, d)
    assert torch.equal(w, fm.orthogonal_gaussian_projection(d, m, seed=5))
    assert not torch.allclose(w, fm.orthogonal_gaussian_projection(d, m, seed=6))
    for start in range(0, m, d):
        block = w[start : start + d]
        unit = block / block.norm(dim=1, keepdim=True)
        torch.testing.assert_close(unit @ unit.T, torch.eye(len(block), dtype=torch.float64), atol=1e-12, rtol=0)
    # Row lengths are chi(d)-distributed: E‖w‖² = d.
    many = fm.orthogonal_gaussian_projection(d, 4096, seed=0)
    assert abs(float((many * many).sum(1).mean()) - d) < 0.5


def test_favor_estimates_softmax_kernel_without_bias():
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.3 for _ in range(2))
    scale = 1 / math.sqrt(6)
    exact = torch.exp(x @ y.T * scale)
    fav = fm.get_feature_map("favor")
    k = y[None, None]
    ctx = fav.prepare(k, scale=scale, num_features=20000, seed=0, key_padding_mask=None, work_dtype=torch.float64)
    fx = fav(x[None, None], ctx, is_query=True)[0, 0]
    fy = fav(k, ctx, is_query=False)[0, 0]
    est = fx @ fy.T
    # The stabilising shifts rescale every entry of a row alike: compare row-normalised kernels.
    torch.testing.assert_close(est / est.sum(1, keepdim=True), exact / exact.sum(1, keepdim=True), rtol=2e-2, atol=0)


def test_registry_errors_and_registration():
    with pytest.raises(UnknownNameError, match=r"unknown feature map 'favour'.*Did you mean 'favor'"):
        fm.get_feature_map("favour")
    with pytest.raises(UnknownNameError, match="string"):
        fm.get_feature_map(3)
    with pytest.raises(ValueError, match="non-empty"):
        fm.register_feature_map("", lambda x: x)
    with pytest.raises(TypeError, match="function or a FeatureMap"):
        fm.register_feature_map("test_bad", 42)
    fm.register_feature_map("test_square", lambda x: x * x, doc="x²")
    try:
        f = fm.get_feature_map("test_square")
        assert f.doc == "x²" and f.dim(4, 0) == 4
        fm.register_feature_map("test_square", lambda x: x.abs(), overwrite=True)
        assert (
            float(fm.get_feature_map("test_square")(torch.tensor([-2.0]), fm.FeatureContext(1.0), is_query=True)) == 2.0
        )
    finally:
        fm.unregister_feature_map("test_square")
    assert "test_square" not in fm.available_feature_maps()


@pytest.mark.parametrize("name", ["elu", "relu", "taylor", "favor"])
def test_in_place_apply_matches_call(name):
    x = torch.tensor([[-30.0, -1.0, -0.0, 0.0, 1e-8, 2.0, 50.0, 3.0]], dtype=torch.float32)[None, None]
    f = fm.get_feature_map(name)
    ctx = f.prepare(x, scale=0.5, num_features=8, seed=0, key_padding_mask=None, work_dtype=torch.float32)
    want = f(x.clone(), ctx, is_query=True)
    # (elu: exp(-30) = 9e-14 where elu(-30) + 1 rounds to 0 in float32, hence the atol.)
    torch.testing.assert_close(f.apply_(x.clone(), ctx, is_query=True), want, rtol=1e-6, atol=1e-12)
