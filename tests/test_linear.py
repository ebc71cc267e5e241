"""``linear`` / ``performer`` against an explicit quadratic reference written here.

The reference builds φ(Q), φ(K) from the formulas (float64), forms ``A = φ(Q)φ(K)ᵀ``, masks
it (bottom-right causal, key padding), normalises rows (zero rows stay zero) and multiplies
by V. Both backends (``torch``: chunkwise / sums-once, with and without autograd; ``math``:
quadratic) must match it.
"""

from __future__ import annotations

import math

import pytest
import torch

import sparse_linear_attn as sla
from sparse_linear_attn import feature_maps as fm
from sparse_linear_attn.errors import BackendUnavailableError, ParameterError, UnknownNameError
from sparse_linear_attn.variants import linear as linear_mod

MAPS = ["elu", "relu", "favor", "taylor"]


def phi(name: str, x: torch.Tensor, scale: float, num_features: int = 32, seed: int = 0) -> torch.Tensor:
    x = x.to(torch.float64)
    if name == "elu":
        return torch.where(x > 0, x + 1, torch.exp(x))
    if name == "relu":
        return torch.where(x > 0, x, torch.zeros_like(x))
    xs = x * math.sqrt(scale)
    if name == "taylor":
        outer = torch.einsum("...i,...j->...ij", xs, xs).flatten(-2) / math.sqrt(2)
        return torch.cat([torch.ones_like(xs[..., :1]), xs, outer], dim=-1)
    if name == "favor":
        w = fm.orthogonal_gaussian_projection(x.shape[-1], num_features, seed)
        return torch.exp(xs @ w.T - (xs * xs).sum(-1, keepdim=True) / 2) / math.sqrt(num_features)
    raise AssertionError(name)


def reference(q, k, v, name, *, causal=False, kpm=None, scale=None, num_features=32, seed=0, phi_fn=None):
    """Explicit masked, normalised φ(Q)φ(K)ᵀ V in float64; returns (out, weights)."""
    H, Hkv = q.shape[1], k.shape[1]
    nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = 1 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1).to(torch.float64)
    f = phi_fn or (lambda x: phi(name, x, scale, num_features, seed))
    a = f(q) @ f(k).transpose(-1, -2)
    if causal:
        i = torch.arange(nq)[:, None]
        j = torch.arange(nk)[None, :]
        a = a * (j <= i + nk - nq)
    if kpm is not None:
        a = a * (~kpm)[:, None, None, :]
    den = a.sum(-1, keepdim=True)
    w = torch.where(den > 0, a / torch.where(den > 0, den, 1.0), 0.0)
    return w @ v, w


def make(b=2, h=4, hkv=2, nq=29, nk=29, d=8, dv=6, dtype=torch.float64, gen_seed=0, mag=1.0):
    g = torch.Generator().manual_seed(gen_seed)
    q = (torch.randn(b, h, nq, d, generator=g, dtype=torch.float64) * mag).to(dtype)
    k = (torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64) * mag).to(dtype)
    v = torch.randn(b, hkv, nk, dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def padding(b, nk, seed=1):
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(b, nk, generator=g) < 0.25
    kpm[:, 0] = False
    return kpm


SHAPES = {
    "self": dict(nq=29, nk=29),
    "cross_more_keys": dict(nq=13, nk=29),  # causal: every query also sees the first 16 keys
    "cross_more_queries": dict(nq=29, nk=13),  # causal: the first 16 queries see nothing
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", MAPS)
def test_forward_matches_quadratic_reference(name, causal, shape):
    q, k, v = make(**SHAPES[shape])
    kpm = padding(2, k.shape[2])
    ref, ref_w = reference(q, k, v, name, causal=causal, kpm=kpm)
    kw = dict(causal=causal, key_padding_mask=kpm, feature_map=name, num_features=32)
    for chunk in (1, 5, 64):  # 5 does not divide 29; 64 is larger than the sequence
        with torch.no_grad():
            fast = sla.attention(q, k, v, "linear", backend="torch", chunk_size=chunk, **kw)
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-10)
    out, w = sla.attention(q, k, v, "linear", backend="math", return_weights=True, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(w, ref_w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["elu", "favor", "taylor"])
def test_gradients_match_reference(name, causal):
    q, k, v = make(nq=23, nk=23)
    kpm = padding(2, 23)
    g = torch.randn(2, 4, 23, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = {}
    for label in ("ref", "torch", "math"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        if label == "ref":
            out, _ = reference(qq, kk, vv, name, causal=causal, kpm=kpm)
        else:
            out = sla.attention(
                qq,
                kk,
                vv,
                "linear",
                causal=causal,
                key_padding_mask=kpm,
                feature_map=name,
                num_features=32,
                chunk_size=5,
                backend=label,
            )
        (out * g).sum().backward()
        grads[label] = (qq.grad, kk.grad, vv.grad)
    for label in ("torch", "math"):
        for got, want in zip(grads[label], grads["ref"]):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_many_groups_and_float32(monkeypatch):
    # A tiny workspace forces one chunk per group: the running state crosses many groups.
    monkeypatch.setattr(linear_mod, "GROUP_ELEMENTS", 1)
    monkeypatch.setattr(linear_mod, "GRAD_GROUP_ELEMENTS", 1)
    q, k, v = make(b=1, h=4, hkv=1, nq=100, nk=111, d=16, dv=16, dtype=torch.float32)
    kpm = padding(1, 111)
    ref, _ = reference(q, k, v, "elu", causal=True, kpm=kpm)
    with torch.no_grad():
        out = sla.attention(q, k, v, "linear", causal=True, key_padding_mask=kpm, chunk_size=8)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    qq = q.clone().requires_grad_()
    out_g = sla.attention(qq, k, v, "linear", causal=True, key_padding_mask=kpm, chunk_size=8)
    torch.testing.assert_close(out_g.detach().double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["elu", "favor"])
def test_half_precision_accumulates_in_float32(name, dtype):
    # 4096 keys of bf16 would lose most of the normaliser if it were summed in bf16.
    q, k, v = make(b=1, h=2, hkv=2, nq=512, nk=512, d=16, dv=16, dtype=dtype, mag=2.0)
    ref, _ = reference(q.double(), k.double(), v.double(), name, causal=True, num_features=32)
    with torch.no_grad():
        out = sla.attention(q, k, v, "linear", causal=True, feature_map=name, num_features=32)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    # bf16 has an 8-bit mantissa: the error of rounding the output itself is ~4e-3.
    assert sla.relative_error(out, ref) < (8e-3 if dtype == torch.bfloat16 else 2e-3)


def test_favor_large_logits_stay_finite():
    # Unstabilised, exp(w·k) would overflow float32 (and any float16) here.
    q, k, v = make(b=1, h=2, hkv=2, nq=64, nk=64, d=16, dv=8, dtype=torch.float16, mag=30.0)
    for causal in (False, True):
        with torch.no_grad():
            out = sla.attention(q, k, v, "performer", causal=causal)
        assert torch.isfinite(out).all()
        assert out.abs().max() <= v.abs().max() + 1e-2  # a convex combination of values


def test_return_weights_consistent_with_output():
    q, k, v = make(nq=17, nk=21)
    kpm = padding(2, 21)
    out, w = sla.attention(q, k, v, "linear", causal=True, key_padding_mask=kpm, return_weights=True)
    assert w.shape == (2, 4, 17, 21)
    torch.testing.assert_close(out, w @ v.repeat_interleave(2, dim=1))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 17, dtype=torch.float64))
    fast = sla.attention(q, k, v, "linear", causal=True, key_padding_mask=kpm)
    torch.testing.assert_close(fast, out)
    with pytest.raises(BackendUnavailableError, match="weights"):
        sla.attention(q, k, v, "linear", return_weights=True, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "math"])
def test_nothing_visible_gives_zeros_not_nan(backend):
    q, k, v = make(nq=9, nk=5)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1] = True  # batch 1: every key padded
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out = sla.attention(
        qq, kk, vv, "linear", causal=True, key_padding_mask=kpm, backend=backend, feature_map="favor", num_features=16
    )
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    assert (out[0, :, :4] == 0).all()  # bottom-right: queries 0..3 see no key
    assert out[0, :, 4:].abs().sum() > 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (qq, kk, vv))
    # ReLU features can all vanish: a query with no positive coordinate gets zeros.
    q2 = -q.abs()
    with torch.no_grad():
        z = sla.attention(q2, k, v, "linear", feature_map="relu", backend=backend)
    assert torch.isfinite(z).all() and (z == 0).all()


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("nq,nk", [(24, 24), (16, 24), (24, 16)])
def test_no_future_leak(name, nq, nk):
    q, k, v = make(b=1, nq=nq, nk=nk)
    off = nk - nq
    t = nq // 2  # queries <= t see keys <= t + off only
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + off + 1 :] += torch.randn_like(k2[:, :, t + off + 1 :])
    v2[:, :, t + off + 1 :] += 5.0
    for backend in ("torch", "math"):
        kw = dict(causal=True, feature_map=name, num_features=16, chunk_size=5, backend=backend)
        with torch.no_grad():
            a = sla.attention(q, k, v, "linear", **kw)
            b = sla.attention(q, k2, v2, "linear", **kw)
        torch.testing.assert_close(a[:, :, : t + 1], b[:, :, : t + 1], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(a[:, :, t + 1 :], b[:, :, t + 1 :])
        # And through the backward pass: query t's output has no gradient from later keys.
        kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
        out = sla.attention(q, kk, vv, "linear", **kw)
        out[:, :, t].sum().backward()
        assert (kk.grad[:, :, t + off + 1 :] == 0).all() and (vv.grad[:, :, t + off + 1 :] == 0).all()
        assert kk.grad[:, :, : t + off + 1].abs().sum() > 0


def softmax_attention(q, k, v):
    return sla.attention(q, k, v, "full", backend="math")


def test_favor_error_falls_with_num_features_and_is_seeded():
    q, k, v = make(b=1, h=4, hkv=4, nq=64, nk=64, d=16, dv=16, mag=0.7)
    exact = softmax_attention(q, k, v)
    errs = {}
    for m in (8, 64, 512, 4096):
        errs[m] = (
            sum(
                float(sla.relative_error(sla.attention(q, k, v, "performer", num_features=m, seed=s), exact))
                for s in range(3)
            )
            / 3
        )
    # Positive random features converge slowly (their variance grows like exp(‖q + k‖²)), but
    # steadily: each 8× more features must help.
    assert errs[4096] < errs[512] < errs[64] < errs[8], errs
    assert errs[4096] < 0.4 * errs[8], errs
    a = sla.attention(q, k, v, "performer", num_features=64, seed=7)
    b = sla.attention(q, k, v, "performer", num_features=64, seed=7)
    c = sla.attention(q, k, v, "performer", num_features=64, seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(a, sla.attention(q, k, v, "linear", feature_map="favor", num_features=64, seed=7))


def test_favor_redraw_only_when_training():
    q, k, v = make(b=1, h=2, hkv=2, nq=16, nk=16, d=8, dv=8)
    with torch.no_grad():
        a = sla.attention(q, k, v, "performer", num_features=16, redraw=True)
    assert torch.equal(a, sla.attention(q, k, v, "performer", num_features=16))
    qq = q.clone().requires_grad_()
    torch.manual_seed(0)
    b = sla.attention(qq, k, v, "performer", num_features=16, redraw=True)
    c = sla.attention(qq, k, v, "performer", num_features=16, redraw=True)
    assert not torch.allclose(b, c)
    torch.manual_seed(0)
    torch.testing.assert_close(b, sla.attention(qq, k, v, "performer", num_features=16, redraw=True))


def test_taylor_beats_elu_on_small_logits():
    q, k, v = make(b=1, h=4, hkv=4, nq=64, nk=64, d=16, dv=16, mag=0.5)
    exact = softmax_attention(q, k, v)
    err_taylor = float(sla.relative_error(sla.attention(q, k, v, "linear", feature_map="taylor"), exact))
    err_elu = float(sla.relative_error(sla.attention(q, k, v, "linear", feature_map="elu"), exact))
    assert err_taylor < 0.2 * err_elu, (err_taylor, err_elu)


def test_user_feature_map_registry():
    @sla.register_feature_map("test_softplus")
    def softplus(x, scale):
        return torch.nn.functional.softplus(x * scale)

    try:
        q, k, v = make(nq=19, nk=19)
        ref, _ = reference(
            q, k, v, "", causal=True, phi_fn=lambda x: torch.nn.functional.softplus(x * (1 / math.sqrt(8)))
        )
        out = sla.attention(q, k, v, "linear", feature_map="test_softplus", causal=True, chunk_size=4)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
        assert "test_softplus" in fm.available_feature_maps()
        with pytest.raises(ValueError, match="already registered"):
            fm.register_feature_map("test_softplus", softplus)
    finally:
        fm.unregister_feature_map("test_softplus")
    with pytest.raises(UnknownNameError):
        sla.attention(q, k, v, "linear", feature_map="test_softplus")


def test_bad_parameters_are_explained():
    q, k, v = make(nq=8, nk=8)
    with pytest.raises(UnknownNameError, match=r"unknown feature map 'eluu'.*Did you mean 'elu'.*Known: elu, favor"):
        sla.attention(q, k, v, "linear", feature_map="eluu")
    with pytest.raises(UnknownNameError, match="Did you mean 'taylor'"):
        sla.build({"variant": "linear", "feature_map": "tailor"})
    with pytest.raises(ParameterError, match="chunk_size=0"):
        sla.attention(q, k, v, "linear", chunk_size=0)
    with pytest.raises(ParameterError, match="num_features"):
        sla.attention(q, k, v, "performer", num_features=2.5)
    with pytest.raises(ParameterError, match="redraw"):
        sla.attention(q, k, v, "performer", redraw="yes")
    with pytest.raises(ParameterError, match="feature_map"):
        sla.attention(q, k, v, "performer", feature_map="elu")  # performer is favor by definition


def test_build_and_describe():
    layer = sla.build({"variant": "performer", "num_features": 32, "causal": True, "seed": 3})
    q, k, v = make(nq=12, nk=12)
    torch.testing.assert_close(
        layer(q, k, v), reference(q, k, v, "favor", causal=True, num_features=32, seed=3)[0], rtol=1e-9, atol=1e-10
    )
    info = sla.describe("linear")
    assert info.params["feature_map"][0] == "elu" and info.params["chunk_size"][0] == 64
    assert not info.exact and info.backends == ("torch", "math")


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("variant", ["linear", "performer"])
def test_chunk_size_beyond_the_sequence_is_clamped(variant, grad):
    # chunk_size=10**6 at N=100 once built a C×C causal block (a terabyte); it must cost what C=N does.
    from _trace import LargestTensor

    q, k, v = make(b=1, h=2, hkv=2, nq=100, nk=100, d=8, dv=8)
    kw = dict(causal=True, backend="torch", **({"num_features": 16} if variant == "performer" else {}))
    ref = reference(q, k, v, "elu" if variant == "linear" else "favor", causal=True, num_features=16)[0]
    for t in (q, k, v):
        t.requires_grad_(grad)
    with torch.set_grad_enabled(grad), LargestTensor() as mode:
        out = sla.attention(q, k, v, variant, chunk_size=10**6, **kw)
        if grad:
            out.sum().backward()
    torch.testing.assert_close(out.detach(), ref, rtol=1e-9, atol=1e-10)
    for t in (q, k, v):
        t.grad = None
    with torch.set_grad_enabled(grad), LargestTensor() as at_n:
        out = sla.attention(q, k, v, variant, chunk_size=100, **kw)
        if grad:
            out.sum().backward()
    assert mode.largest == at_n.largest, (mode.largest, at_n.largest)  # what C = N costs, no more


@pytest.mark.parametrize(
    "variant,params", [("performer", {}), ("linear", {"feature_map": "favor"}), ("linear", {"feature_map": "taylor"})]
)
def test_negative_scale_with_a_root_taking_feature_map_is_refused_up_front(variant, params):
    q, k, v = make(nq=8, nk=8)
    with pytest.raises(ParameterError, match=r"scale=-1.0.*scale >= 0"):
        sla.build({"variant": variant, "scale": -1.0, **params})
    with pytest.raises(ParameterError, match=r"scale=-1.0.*scale >= 0"):
        sla.attention(q, k, v, variant, scale=-1.0, **params)
    # Maps that do not scale their input take any scale; zero is allowed for every map.
    out = sla.attention(q, k, v, "linear", scale=-1.0, feature_map="elu")
    torch.testing.assert_close(out, reference(q, k, v, "elu", causal=False)[0], rtol=1e-9, atol=1e-10)
    # scale 0: every query's features are alike, so every key weighs the same — the mean of v.
    out = sla.attention(q, k, v, variant, scale=0.0, **params)
    mean_v = v.mean(2, keepdim=True).repeat_interleave(q.shape[1] // v.shape[1], 1).expand_as(out)
    torch.testing.assert_close(out, mean_v, rtol=1e-9, atol=1e-10)
