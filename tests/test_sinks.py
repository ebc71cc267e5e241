"""sliding_window's ``sinks`` against a float64 reference whose mask is written here:

query i sees key j  iff  i' − window ≤ j ≤ i' + window (causal: ≤ i')  or  j < sinks (causal: and j ≤ i')
with i' = i + Nk − Nq
"""

from __future__ import annotations

import pytest
import torch
from _env import flex_compiles
from _reference import random_qkv as rand
from _reference import softmax_attention

import sparse_linear_attn as sla
from sparse_linear_attn import registry
from sparse_linear_attn.errors import ParameterError
from sparse_linear_attn.inputs import make_call

F64 = torch.float64


def mask(nq, nk, *, causal, window, sinks):
    m = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        ii = i + nk - nq
        for j in range(nk):
            band = ii - window <= j <= (ii if causal else ii + window)
            sink = j < sinks and (not causal or j <= ii)
            m[i, j] = band or sink
    return m


CASES = [
    # nq, nk, window, sinks, causal, H, Hkv, padding
    (200, 200, 20, 4, True, 4, 2, False),  # interior tiles (bmm with log-sum-exp) and edges
    (200, 200, 20, 4, False, 2, 2, True),
    (70, 150, 9, 3, True, 2, 1, True),  # Nq < Nk
    (150, 70, 9, 3, True, 2, 2, False),  # Nq > Nk: early queries see nothing
    (50, 50, 0, 60, False, 2, 1, False),  # sinks wider than the sequence
    (64, 64, 100, 2, True, 2, 2, False),  # the band already holds the sinks
]


@pytest.mark.parametrize("backend", ["torch", "math"])
@pytest.mark.parametrize("nq,nk,window,sinks,causal,H,Hkv,pad", CASES)
def test_sinks_match_the_definition(backend, nq, nk, window, sinks, causal, H, Hkv, pad):
    q, k, v = rand(2, H, Hkv, nq, nk)
    kpm = (torch.rand(2, nk, generator=torch.Generator().manual_seed(1)) < 0.3) if pad else None
    m = mask(nq, nk, causal=causal, window=window, sinks=sinks)
    assert torch.equal(sla.dense_mask("sliding_window", nq, nk, causal=causal, window=window, sinks=sinks), m)
    kw = dict(window=window, sinks=sinks, causal=causal, key_padding_mask=kpm)
    out = sla.attention(q, k, v, "sliding_window", backend=backend, **kw)
    full = m[None, None] if kpm is None else m[None, None] & ~kpm[:, None, None, :]
    ref = softmax_attention(q, k, v, full)[0]
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    want = float(m.sum(-1).double().mean())
    spec = registry.get("sliding_window")
    assert spec.visible_keys(nq, nk, causal=causal, window=window, sinks=sinks) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("nq,nk,window,sinks,causal,H,Hkv,pad", CASES[:4])
def test_sinks_gradients_and_bfloat16(nq, nk, window, sinks, causal, H, Hkv, pad):
    q, k, v = (t.requires_grad_() for t in rand(1, H, Hkv, nq, nk, dtype=F64, seed=2))
    kpm = (torch.rand(1, nk, generator=torch.Generator().manual_seed(1)) < 0.3) if pad else None
    m = mask(nq, nk, causal=causal, window=window, sinks=sinks)[None, None]
    full = m if kpm is None else m & ~kpm[:, None, None, :]
    g = torch.randn(1, H, nq, 5, dtype=F64, generator=torch.Generator().manual_seed(3))
    out = sla.attention(q, k, v, "sliding_window", window=window, sinks=sinks, causal=causal, key_padding_mask=kpm)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(softmax_attention(q, k, v, full)[0], (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    outb = sla.attention(qb, kb, vb, "sliding_window", window=window, sinks=sinks, causal=causal, key_padding_mask=kpm)
    assert outb.dtype == torch.bfloat16
    # Two bfloat16 roundings (input and output): a bfloat16 accumulation would be ~3× off.
    torch.testing.assert_close(outb.double(), softmax_attention(qb, kb, vb, full)[0], atol=1e-3, rtol=8e-3)


def test_sinks_zero_is_the_plain_window_and_xformers_rules_itself_out():
    q, k, v = rand(1, 2, 2, 100, 100)
    a = sla.attention(q, k, v, "sliding_window", window=7, causal=True)
    b = sla.attention(q, k, v, "sliding_window", window=7, sinks=0, causal=True)
    assert torch.equal(a, b)
    impl = registry.get("sliding_window").impls["xformers"]
    call = make_call(q, k, v, causal=True, key_padding_mask=None, return_weights=False)
    assert "sink" in impl.rules_out(call, {"window": 7, "sinks": 2})
    assert impl.rules_out(call, {"window": 7, "sinks": 0}) is None


def test_bad_sinks():
    q, k, v = rand(1, 1, 1, 8, 8)
    for bad, why in ((-1, "expected an int >= 0"), (1.5, "expected an int >= 0, got float")):
        with pytest.raises(ParameterError, match=f"invalid sinks={bad!r}: {why}"):
            sla.attention(q, k, v, "sliding_window", window=2, sinks=bad)


def test_sinks_on_flex():
    reason = flex_compiles()
    if reason:
        pytest.skip(reason)
    q, k, v = rand(2, 4, 2, 200, 300, D=16, Dv=16)
    kpm = torch.rand(2, 300, generator=torch.Generator().manual_seed(1)) < 0.2
    for causal, pad in ((True, None), (False, kpm)):
        m = mask(200, 300, causal=causal, window=40, sinks=5)[None, None]
        full = m if pad is None else m & ~pad[:, None, None, :]
        with torch.no_grad():
            out = sla.attention(q, k, v, "sliding_window", window=40, sinks=5, causal=causal, key_padding_mask=pad,
                                backend="flex")  # fmt: skip
        torch.testing.assert_close(out.double(), softmax_attention(q, k, v, full)[0], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_sinks_with_dropout_stay_tiled(grad):
    # Dropout with sinks runs the tiled path (band and sinks merged by their undropped
    # log-sum-exp), not the dense math backend: no (Nq, Nk) tensor. The conformance suite holds
    # its values to math's under the same seed.
    from _trace import LargestTensor

    n = 1024
    q, k, v = (t.requires_grad_(grad) for t in rand(1, 2, 1, n, n, D=16, Dv=16))
    with torch.set_grad_enabled(grad), LargestTensor() as mode:
        out = sla.attention(q, k, v, "sliding_window", window=64, sinks=4, causal=True, dropout_p=0.2)
        if grad:
            out.sum().backward()
    assert mode.largest < n * n // 4, mode.largest
