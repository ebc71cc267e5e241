"""Bahdanau attention against a float64 reference computed in the test from its parameters."""

import pytest
import torch
from _reference import visible

import sparse_linear_attn as sla
import sparse_linear_attn.variants.additive as additive_mod


def reference(layer, q, k, v, mask, scale=1.0):
    m = layer.impl
    q, k, v = (t.double() for t in (q, k, v))
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    wq, wk, b, w = (p.double() for p in (m.w_q, m.w_k, m.bias, m.w))
    # score[b,h,i,j] = sum_a w_a tanh((Wq q_i)_a + (Wk k_j)_a + b_a)
    hidden = torch.einsum("bhid,ad->bhia", q, wq)[:, :, :, None] + torch.einsum("bhjd,ad->bhja", k, wk)[:, :, None] + b
    s = torch.tanh(hidden) @ w * scale
    mask = mask.expand_as(s)
    row = mask.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~mask, -torch.inf).where(row, 0.0), -1) * row
    return p @ v, p


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(4, 4, 9, 9), (4, 2, 7, 11), (2, 1, 11, 6)])
def test_matches_reference_with_padding_and_grads(causal, shape, monkeypatch):
    # A tiny chunk budget forces many query chunks (and the checkpointed path under autograd).
    monkeypatch.setattr(additive_mod, "CHUNK_ELEMENTS", 64)
    H, Hkv, Nq, Nk = shape
    layer = sla.build({"variant": "additive", "head_dim": 5, "hidden_dim": 7, "causal": causal}).double()
    with torch.no_grad():
        layer.impl.bias.normal_()
    q = torch.randn(2, H, Nq, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Hkv, Nk, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Hkv, Nk, 3, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(2, Nk, dtype=torch.bool)
    kpm[1, -2:] = True
    mask = visible(Nq, Nk, causal=causal, key_padding_mask=kpm, batch=2)
    out = layer(q, k, v, key_padding_mask=kpm)
    ref, pref = reference(layer, q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    out2, w = layer(q, k, v, key_padding_mask=kpm, return_weights=True)
    torch.testing.assert_close(w, pref, rtol=1e-10, atol=1e-12)

    g = torch.randn_like(ref)
    out.backward(g)
    got = [t.grad.clone() for t in (q, k, v)] + [p.grad.clone() for p in layer.parameters()]
    for t in (q, k, v, *layer.parameters()):
        t.grad = None
    ref, _ = reference(layer, q, k, v, mask)
    ref.backward(g)
    want = [t.grad for t in (q, k, v)] + [p.grad for p in layer.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_scale_multiplies_scores_and_default_is_one():
    layer = sla.build({"variant": "additive", "head_dim": 4, "hidden_dim": 6, "scale": 3.0}).double()
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    mask = visible(5, 5, causal=False)
    torch.testing.assert_close(layer(q, k, v), reference(layer, q, k, v, mask, scale=3.0)[0])
    layer1 = sla.build({"variant": "additive", "head_dim": 4, "hidden_dim": 6}).double()
    layer1.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer1(q, k, v), reference(layer, q, k, v, mask, scale=1.0)[0])


def test_fully_masked_and_head_dim_mismatch():
    layer = sla.build({"variant": "additive", "head_dim": 4})
    q = torch.randn(2, 2, 3, 4)
    kpm = torch.tensor([[False, False, False], [True, True, True]])
    out = layer(q, q, q, key_padding_mask=kpm)
    assert torch.isfinite(out).all() and torch.count_nonzero(out[1]) == 0
    with pytest.raises(ValueError, match="built with head_dim=4 but q has head_dim 8"):
        layer(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))


def test_bfloat16_runs_close_to_float64():
    layer = sla.build({"variant": "additive", "head_dim": 8, "hidden_dim": 8})
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    ref, _ = reference(layer, q, k, v, visible(16, 16, causal=False))
    out = layer.to(torch.bfloat16)(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    assert float(sla.relative_error(out, ref)) < 3e-2
