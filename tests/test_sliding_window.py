"""sliding_window against a float64 dense reference whose mask is written here from the definition:

query i sees key j iff i' − w ≤ j ≤ i' + w (causal: i' − w ≤ j ≤ i'), i' = i + Nk − Nq.
"""

from __future__ import annotations

import pytest
import torch
from _reference import pattern_attention, strided_qkv
from _trace import LargestTensor

import sparse_linear_attn as sla
from sparse_linear_attn.backends.dispatch import select_backend
from sparse_linear_attn.inputs import make_call
from sparse_linear_attn.registry import get
from sparse_linear_attn.variants import sliding_window as sw


def window_mask(nq, nk, w, causal):
    m = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        ii = i + nk - nq
        lo, hi = ii - w, (ii if causal else ii + w)
        for j in range(max(0, lo), min(nk, hi + 1)):
            m[i, j] = True
    return m


def reference(q, k, v, mask, key_padding_mask=None, scale=None):
    """float64 masked softmax (tests/_reference.py); rows with nothing visible are zero."""
    return pattern_attention(q, k, v, mask, key_padding_mask, scale)


def rand(B, H, Hkv, nq, nk, D=16, Dv=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, nq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, nk, Dv, generator=g).to(dtype)
    return q, k, v


CASES = [
    # nq, nk, window, causal, H, Hkv, key padding
    (200, 200, 17, True, 4, 2, False),
    (200, 200, 17, False, 2, 2, True),
    (70, 300, 40, True, 2, 1, True),  # cross-attention, Nq < Nk
    (300, 70, 5, True, 2, 2, False),  # Nq > Nk: the first queries see nothing
    (300, 70, 5, False, 2, 2, True),
    (130, 130, 0, True, 2, 2, False),  # window 0: each query sees only itself
    (50, 50, 1000, False, 2, 2, False),  # window wider than the sequence
    (129, 129, 64, True, 4, 1, True),  # multi-query, tile boundaries
    (150, 400, 30, True, 4, 2, False),  # cross-attention through the copy-free interior path
    (400, 400, 30, False, 4, 1, False),
]


def test_non_contiguous_inputs():
    # (B, N, H, D) projections viewed as (B, H, N, D): the copy-free path reads them by stride.
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 300, 4, 16, generator=g).transpose(1, 2)
    k = torch.randn(2, 300, 2, 16, generator=g).transpose(1, 2)
    v = torch.randn(2, 300, 2, 8, generator=g).transpose(1, 2)
    out = sla.attention(q, k, v, "sliding_window", window=40, causal=True)
    ref, _ = reference(q, k, v, window_mask(300, 300, 40, True))
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "math"])
@pytest.mark.parametrize("nq,nk,w,causal,H,Hkv,pad", CASES)
def test_forward_matches_definition(backend, nq, nk, w, causal, H, Hkv, pad):
    q, k, v = rand(2, H, Hkv, nq, nk)
    kpm = (torch.rand(2, nk, generator=torch.Generator().manual_seed(1)) < 0.3) if pad else None
    out = sla.attention(q, k, v, "sliding_window", window=w, causal=causal, key_padding_mask=kpm, backend=backend)
    ref, _ = reference(q, k, v, window_mask(nq, nk, w, causal), kpm)
    assert out.shape == (2, H, nq, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_match_reference(causal):
    nq, nk, w = 150, 150, 23
    q, k, v = rand(1, 4, 2, nq, nk, dtype=torch.float64)
    kpm = torch.zeros(1, nk, dtype=torch.bool)
    kpm[0, 40:60] = True
    for t in (q, k, v):
        t.requires_grad_(True)
    out = sla.attention(q, k, v, "sliding_window", window=w, causal=causal, key_padding_mask=kpm, backend="auto")
    ref, _ = reference(q, k, v, window_mask(nq, nk, w, causal), kpm)
    cot = torch.randn_like(ref)
    g = torch.autograd.grad(out, (q, k, v), cot)
    gr = torch.autograd.grad(ref, (q, k, v), cot)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_bf16_close_to_float64():
    q, k, v = rand(1, 2, 2, 256, 256, D=32, Dv=32, dtype=torch.bfloat16)
    out = sla.attention(q, k, v, "sliding_window", window=31, causal=True)
    ref, _ = reference(q, k, v, window_mask(256, 256, 31, True))
    assert out.dtype == torch.bfloat16
    assert float(sla.relative_error(out, ref)) < 1e-2


@pytest.mark.parametrize("backend", ["torch", "math"])
def test_no_future_leak(backend):
    nq = nk = 160
    q, k, v = rand(1, 2, 2, nq, nk)
    base = sla.attention(q, k, v, "sliding_window", window=20, causal=True, backend=backend)
    t = 97
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1 :] += 100.0
    v2[:, :, t + 1 :] *= -50.0
    out = sla.attention(q, k2, v2, "sliding_window", window=20, causal=True, backend=backend)
    torch.testing.assert_close(out[:, :, : t + 1], base[:, :, : t + 1], atol=1e-6, rtol=0)
    assert (out[:, :, t + 1 :] - base[:, :, t + 1 :]).abs().max() > 1e-2  # the perturbation is visible later


def test_fully_masked_rows_are_zero_and_finite():
    q, k, v = rand(1, 2, 2, 100, 100)
    kpm = torch.zeros(1, 100, dtype=torch.bool)
    kpm[0, :60] = True  # queries 0..59 with window 10 (causal) see only padded keys
    for t in (q, k, v):
        t.requires_grad_(True)
    out = sla.attention(q, k, v, "sliding_window", window=10, causal=True, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert out[:, :, :60].abs().max() == 0
    assert out[:, :, 60:].abs().max() > 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_weights_are_the_band():
    q, k, v = rand(1, 2, 1, 40, 40)
    out, w = sla.attention(q, k, v, "sliding_window", window=3, causal=False, return_weights=True)
    ref, p = reference(q, k, v, window_mask(40, 40, 3, False))
    torch.testing.assert_close(w.double(), p, atol=1e-6, rtol=1e-5)
    assert (w[..., ~window_mask(40, 40, 3, False)] == 0).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("nq,nk,causal", [(33, 33, True), (20, 45, False), (45, 20, True)])
def test_dense_mask_is_the_definition(nq, nk, causal):
    assert torch.equal(
        sla.dense_mask("sliding_window", nq, nk, causal=causal, window=4), window_mask(nq, nk, 4, causal)
    )


@pytest.mark.parametrize("grad", [True, False])
def test_never_builds_quadratic_or_whole_band_tensors(monkeypatch, grad):
    # Every tensor any op produces on the torch path (forward and backward with grad; the
    # in-place bmm tiles without) stays no larger than q itself: far below N×N and below the
    # whole-sequence N×2w band (B·H·N·2w).
    monkeypatch.setattr(sw, "GROUP_ELEMENTS", 1 << 15)
    monkeypatch.setattr(sw, "SCORE_ELEMENTS", 1 << 15)
    B, H, N, D, w = 1, 2, 4096, 16, 64
    q, k, v = rand(B, H, H, N, N, D=D, Dv=D)
    for t in (q, k, v):
        t.requires_grad_(grad)
    with LargestTensor() as mode:
        out = sla.attention(q, k, v, "sliding_window", window=w, causal=False, backend="torch")
        if grad:
            out.sum().backward()
    assert mode.largest <= B * H * N * D
    assert mode.largest < B * H * N * 2 * w


def test_auto_uses_torch_on_cpu_and_when_grad_needed():
    spec = get("sliding_window")
    q, k, v = rand(1, 2, 2, 64, 64)
    call = make_call(q, k, v, causal=True, key_padding_mask=None, return_weights=False)
    assert select_backend(spec, call, {"window": 8}) == "torch"
    q.requires_grad_(True)
    call = make_call(q, k, v, causal=True, key_padding_mask=None, return_weights=False)
    assert select_backend(spec, call, {"window": 8}) == "torch"
    call = make_call(q, k, v, causal=True, key_padding_mask=None, return_weights=True)
    assert select_backend(spec, call, {"window": 8}) == "math"


def test_build_from_config():
    layer = sla.build({"variant": "sliding_window", "window": 5, "causal": True})
    q, k, v = rand(1, 2, 2, 50, 50)
    ref, _ = reference(q, k, v, window_mask(50, 50, 5, True))
    torch.testing.assert_close(layer(q, k, v).double(), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("bad", [-1, 2.5, "8", True])
def test_bad_window_is_a_clear_error(bad):
    q, k, v = rand(1, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="window"):
        sla.attention(q, k, v, "sliding_window", window=bad)


def test_unknown_parameter_suggests_window():
    q, k, v = rand(1, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="did you mean 'window'"):
        sla.attention(q, k, v, "sliding_window", windw=3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk,H,Hkv", [(1000, 1000, 8, 2), (300, 1000, 4, 4), (1000, 300, 4, 1)])
def test_xformers_and_flex_match_torch_path_on_cuda(causal, nq, nk, H, Hkv):
    import importlib.util

    q, k, v = (t.cuda() for t in rand(2, H, Hkv, nq, nk, D=64, Dv=64, dtype=torch.bfloat16))
    ref, _ = reference(q.cpu(), k.cpu(), v.cpu(), window_mask(nq, nk, 100, causal))
    backends = ["torch", "flex"] + (["xformers"] if importlib.util.find_spec("xformers") else [])
    for backend in backends:
        out = sla.attention(q, k, v, "sliding_window", window=100, causal=causal, backend=backend)
        assert torch.isfinite(out).all(), backend
        assert float(sla.relative_error(out.cpu(), ref)) < 2e-2, backend


@pytest.mark.parametrize("causal", [False, True])
def test_xformers_bias_we_pass_encodes_the_same_window(causal):
    # The CUDA kernel cannot run here, but xformers can materialize the bias this library hands
    # it: its visible entries must be exactly the window of the definition, for square,
    # cross-attention (both ways) and degenerate shapes — the off-by-one users trip over.
    pytest.importorskip("xformers")
    from sparse_linear_attn.backends.xformers_backend import sliding_window_bias

    for nq, nk in [(10, 10), (7, 12), (12, 7), (1, 9), (9, 1)]:
        for w in (0, 1, 3, 20):
            bias = sliding_window_bias(w, causal)
            visible = bias.materialize((nq, nk), dtype=torch.float32, device="cpu") == 0
            assert torch.equal(visible, window_mask(nq, nk, w, causal)), (nq, nk, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_grouped_query_inputs_without_grad(dtype):
    # (B, N, H, D) tensors viewed as (B, H, N, D), as models often pass them: the in-place
    # interior tiles read them through their strides, batch by batch and kv head by kv head.
    B, H, Hkv, n, w = 2, 4, 2, 300, 40
    q, k, v = strided_qkv(B, H, Hkv, n, dtype=dtype, seed=5)
    for causal in (True, False):
        out = sla.attention(q, k, v, "sliding_window", window=w, causal=causal)
        ref, _ = reference(q, k, v, window_mask(n, n, w, causal))
        tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(out.double(), ref, **tol)


@pytest.mark.parametrize("score_elements", [1, 3 * 32 * 72])
def test_score_buffer_smaller_than_a_group(monkeypatch, score_elements):
    # The bmm tiles of a group run a few (or one) at a time through one reused score buffer.
    monkeypatch.setattr(sw, "SCORE_ELEMENTS", score_elements)
    q, k, v = rand(2, 2, 1, 400, 400, seed=9)
    out = sla.attention(q, k, v, "sliding_window", window=40, causal=True)
    ref, _ = reference(q, k, v, window_mask(400, 400, 40, True))
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
