"""`full` and `dot_product` against a plain float64 masked softmax written in the tests."""

import math

import pytest
import torch
from _reference import softmax_attention, visible

import sparse_linear_attn as sla

SHAPES = [  # (H, Hkv, Nq, Nk)
    (4, 4, 16, 16),
    (4, 2, 12, 20),  # grouped-query, cross-attention with Nk > Nq
    (4, 1, 20, 12),  # multi-query, Nq > Nk: causal leaves the first 8 queries with no key
]


def make(H, Hkv, Nq, Nk, D=8, Dv=6, B=2, dtype=torch.float64, grad=False):
    q = torch.randn(B, H, Nq, D, dtype=dtype, requires_grad=grad)
    k = torch.randn(B, Hkv, Nk, D, dtype=dtype, requires_grad=grad)
    v = torch.randn(B, Hkv, Nk, Dv, dtype=dtype, requires_grad=grad)
    return q, k, v


def padding(B, Nk):
    kpm = torch.zeros(B, Nk, dtype=torch.bool)
    kpm[0, -3:] = True  # last keys padded in the first sequence
    kpm[1, :2] = True  # first keys padded in the second
    return kpm


@pytest.mark.parametrize("backend", ["auto", "torch", "math"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pad", [False, True])
def test_forward_and_grad_match_reference(backend, shape, causal, pad):
    H, Hkv, Nq, Nk = shape
    q, k, v = make(*shape, grad=True)
    kpm = padding(2, Nk) if pad else None
    out = sla.attention(q, k, v, "full", causal=causal, key_padding_mask=kpm, backend=backend)
    mask = visible(Nq, Nk, causal=causal, key_padding_mask=kpm, batch=2)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref, _ = softmax_attention(qr, kr, vr, mask)
    assert out.shape == (2, H, Nq, 6) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    # Gradients against autograd through the independent reference.
    g = torch.randn_like(ref)
    out.backward(g)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    H_, Hkv_ = qr.shape[1], kr.shape[1]
    kk, vv = kr.repeat_interleave(H_ // Hkv_, 1), vr.repeat_interleave(H_ // Hkv_, 1)
    s = (qr @ kk.transpose(-1, -2)) / math.sqrt(8)
    row = mask.any(-1, keepdim=True)
    p = torch.softmax(torch.where(mask, s, -torch.inf).where(row, 0.0), -1) * row
    (p @ vv).backward(g)
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float64, 1e-10)])
@pytest.mark.parametrize("backend", ["torch", "math"])
def test_dtypes(dtype, tol, backend):
    q, k, v = make(4, 2, 33, 33, D=16, Dv=16, dtype=dtype)
    out = sla.attention(q, k, v, "full", causal=True, backend=backend)
    ref, _ = softmax_attention(q, k, v, visible(33, 33, causal=True))
    assert out.dtype == dtype
    rel = float(sla.relative_error(out, ref))
    assert rel < tol, rel


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = make(2, 2, 6, 5, grad=True)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1] = True  # the whole second sequence is padding
    for backend in ("torch", "math"):
        out = sla.attention(q, k, v, "full", key_padding_mask=kpm, backend=backend)
        assert torch.isfinite(out).all()
        assert torch.count_nonzero(out[1]) == 0
        assert torch.count_nonzero(out[0]) > 0
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        q.grad = k.grad = v.grad = None
    # Causal with Nq > Nk: the first Nq - Nk queries see nothing.
    out, w = sla.attention(q, k, v, "full", causal=True, return_weights=True)
    assert torch.count_nonzero(out[:, :, :1]) == 0 and torch.count_nonzero(w[:, :, :1]) == 0
    torch.testing.assert_close(w[:, :, 1:].sum(-1), torch.ones(2, 2, 5, dtype=torch.float64))


def test_weights_match_reference_and_output():
    q, k, v = make(4, 2, 10, 14)
    kpm = padding(2, 14)
    out, w = sla.attention(q, k, v, "full", causal=True, key_padding_mask=kpm, return_weights=True)
    ref, pref = softmax_attention(q, k, v, visible(10, 14, causal=True, key_padding_mask=kpm, batch=2))
    assert w.shape == (2, 4, 10, 14)
    torch.testing.assert_close(w, pref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_weights_need_a_backend_that_returns_them():
    q, k, v = make(2, 2, 4, 4)
    with pytest.raises(ValueError, match="does not return attention weights"):
        sla.attention(q, k, v, "full", backend="torch", return_weights=True)


def test_dot_product_is_unscaled_unless_scale_given():
    q, k, v = make(2, 2, 9, 9)
    out = sla.attention(q, k, v, "dot_product")
    ref, _ = softmax_attention(q, k, v, scale=1.0)
    torch.testing.assert_close(out, ref)
    out = sla.attention(q, k, v, "dot_product", scale=0.3)
    ref, _ = softmax_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, ref)
    # full with an explicit scale
    out = sla.attention(q, k, v, "full", scale=0.7)
    ref, _ = softmax_attention(q, k, v, scale=0.7)
    torch.testing.assert_close(out, ref)
    # and the default really is 1/sqrt(D): a wrong default would differ by far more than tolerance
    assert float(sla.relative_error(sla.attention(q, k, v, "full"), softmax_attention(q, k, v)[0])) < 1e-12


def test_causal_does_not_leak_future():
    q, k, v = make(2, 2, 16, 16)
    out = sla.attention(q, k, v, "full", causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 10:] += 5.0
    v2[:, :, 10:] -= 3.0
    out2 = sla.attention(q, k2, v2, "full", causal=True)
    torch.testing.assert_close(out[:, :, :10], out2[:, :, :10], rtol=0, atol=0)
    assert not torch.allclose(out[:, :, 10:], out2[:, :, 10:])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "xformers"])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_backends(backend, causal):
    if backend == "xformers":
        pytest.importorskip("xformers")
    q, k, v = (t.cuda().to(torch.bfloat16) for t in make(4, 2, 64, 80, D=64, Dv=64))
    out = sla.attention(q, k, v, "full", causal=causal, backend=backend)
    ref, _ = softmax_attention(q, k, v, visible(64, 80, causal=causal))
    assert float(sla.relative_error(out, ref)) < 2e-2


def test_xformers_causal_bias_is_bottom_right():
    # The CUDA kernel cannot run here; the bias the library hands it can be materialized.
    pytest.importorskip("xformers")
    from sparse_linear_attn.backends.xformers_backend import causal_bias

    for nq, nk in [(10, 10), (7, 12), (12, 7), (1, 9)]:
        got = causal_bias().materialize((nq, nk), dtype=torch.float32, device="cpu") == 0
        assert torch.equal(got, visible(nq, nk, causal=True)[0, 0]), (nq, nk)
