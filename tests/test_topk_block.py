"""topk_block against a float64 dense masked softmax over ``sla.selection(...).dense()``, its
strict causality through every estimator, its equivalences and its parameter errors."""

from __future__ import annotations

import pytest
import torch
from _env import flex_compiles
from _reference import random_padding as padding
from _reference import random_qkv as rand
from _reference import softmax_attention

import sparse_linear_attn as sla
from sparse_linear_attn.errors import ParameterError, UnknownNameError

F64 = torch.float64
ESTIMATORS = ["mean_pool", "key_pool", "antidiagonal", "oracle"]
BACKENDS = [b for b in ("torch", "math") if b in sla.describe("topk_block").backends]


def reference(q, k, v, sel, scale=None):
    return softmax_attention(q, k, v, sel.dense(), scale=scale)[0]


CASES = [
    # nq, nk, bs, causal, H, Hkv, padding, params
    (40, 40, 4, True, 4, 2, False, {"density": 0.3}),
    (37, 37, 4, False, 2, 2, True, {"density": 0.25, "estimator": "key_pool"}),  # ragged
    (21, 45, 4, True, 2, 1, True, {"mass": 0.6, "estimator": "antidiagonal", "stride": 2}),  # Nq < Nk
    (45, 21, 4, True, 2, 2, False, {"density": 0.4, "estimator": "oracle", "local_blocks": 2}),  # Nq > Nk
    (33, 33, 5, True, 3, 1, True, {"density": 0.3, "sink_blocks": 0, "local_blocks": 0}),  # odd block size
    (32, 32, 4, False, 2, 2, False, {"mass": 0.5, "sink_blocks": 2}),
    (40, 40, 4, True, 2, 2, True, {"density": 0.2, "selection": "block"}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq,nk,bs,causal,H,Hkv,pad,params", CASES)
def test_forward_is_the_dense_softmax_over_its_selection(backend, nq, nk, bs, causal, H, Hkv, pad, params):
    q, k, v = rand(2, H, Hkv, nq, nk)
    kpm = padding(2, nk) if pad else None
    kw = dict(causal=causal, key_padding_mask=kpm, block_size=bs, **params)
    sel = sla.selection(q, k, "topk_block", **kw)
    assert 0 < sel.density < 1
    out = sla.attention(q, k, v, "topk_block", backend=backend, **kw)
    assert out.shape == (2, H, nq, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, k, v, sel), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq,nk,bs,causal,H,Hkv,pad,params", CASES[:5])
def test_gradients_match_the_reference(backend, nq, nk, bs, causal, H, Hkv, pad, params):
    q, k, v = (t.requires_grad_() for t in rand(2, H, Hkv, nq, nk, dtype=F64, seed=1))
    kpm = padding(2, nk) if pad else None
    kw = dict(causal=causal, key_padding_mask=kpm, block_size=bs, scale=0.4, **params)
    sel = sla.selection(q, k, "topk_block", **kw)
    g = torch.randn(2, H, nq, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    out = sla.attention(q, k, v, "topk_block", backend=backend, **kw)
    got = torch.autograd.grad(out, (q, k, v), g)
    ref = reference(q, k, v, sel, scale=0.4)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_accumulates_in_float32(backend):
    q, k, v = rand(1, 4, 2, 48, 48, D=16, dtype=torch.bfloat16)
    kw = dict(causal=True, block_size=8, density=0.4)
    sel = sla.selection(q, k, "topk_block", **kw)
    out = sla.attention(q, k, v, "topk_block", backend=backend, **kw)
    assert out.dtype == torch.bfloat16
    # Two bfloat16 roundings (input and output): a bfloat16 accumulation would be ~3× off.
    torch.testing.assert_close(out.double(), reference(q, k, v, sel), atol=1e-3, rtol=8e-3)


def _perturbed_after(t, q, k, v, seed):
    g = torch.Generator().manual_seed(seed)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, t + 1 :] = 5.0 * torch.randn(x[:, :, t + 1 :].shape, generator=g, dtype=x.dtype)
    return q2, k2, v2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("nq,nk", [(40, 40), (30, 43)])
def test_strict_causality_through_every_estimator(backend, estimator, nq, nk):
    # Changing every input after position t changes no output at or before t: not the tiles,
    # not the selection (queries of a block that come after t included).
    q, k, v = rand(1, 2, 1, nq, nk, dtype=F64, seed=4)
    kw = dict(causal=True, block_size=4, density=0.3, estimator=estimator, stride=2, backend=backend)
    out = sla.attention(q, k, v, "topk_block", **kw)
    off = nk - nq
    for t in (5, 13, 17, 26):  # inside blocks, and at a block's first query
        q2, k2, v2 = _perturbed_after(t, q, k, v, seed=t)
        # Perturb keys/values after the position of query t, queries after t.
        k2[:, :, : t + off + 1], v2[:, :, : t + off + 1] = k[:, :, : t + off + 1], v[:, :, : t + off + 1]
        out2 = sla.attention(q2, k2, v2, "topk_block", **kw)
        torch.testing.assert_close(out2[:, :, : t + 1], out[:, :, : t + 1], atol=1e-12, rtol=0)


def test_block_selection_leaks_within_a_block():
    # The opt-out is documented as leaking; this shows the causality test above would catch it.
    q, k, v = rand(1, 1, 1, 40, 40, dtype=F64, seed=5)
    kw = dict(causal=True, block_size=8, density=0.25, sink_blocks=0, selection="block")
    out = sla.attention(q, k, v, "topk_block", **kw)
    q2 = q.clone()
    q2[0, 0, 35] = 40.0 * k[0, 0, 10]  # a later query of block 4 pulls block 1 into the selection
    out2 = sla.attention(q2, k, v, "topk_block", **kw)
    assert not torch.allclose(out2[:, :, 32:35], out[:, :, 32:35])
    strict = sla.attention(q2, k, v, "topk_block", **dict(kw, selection="strict"))
    torch.testing.assert_close(
        strict[:, :, :35], sla.attention(q, k, v, "topk_block", **dict(kw, selection="strict"))[:, :, :35]
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_density_one_is_full_attention(backend, causal):
    q, k, v = rand(2, 4, 2, 30, 37, dtype=F64)
    kpm = padding(2, 37)
    kw = dict(causal=causal, key_padding_mask=kpm)
    sel = sla.selection(q, k, "topk_block", block_size=4, density=1.0, **kw)
    assert sel.density == 1.0
    out = sla.attention(q, k, v, "topk_block", block_size=4, density=1.0, backend=backend, **kw)
    torch.testing.assert_close(out, sla.attention(q, k, v, "full", **kw), atol=1e-12, rtol=1e-10)


def test_return_weights_are_the_softmax_over_the_selection():
    q, k, v = rand(1, 2, 2, 24, 24, dtype=F64)
    sel = sla.selection(q, k, "topk_block", causal=True, block_size=4, density=0.3)
    out, w = sla.attention(q, k, v, "topk_block", causal=True, block_size=4, density=0.3, return_weights=True)
    ref_out, ref_w = softmax_attention(q, k, v, sel.dense())
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(out, ref_out)
    assert torch.equal(w > 0, sel.dense())


def test_every_row_keeps_a_block_and_a_query_seeing_nothing_gets_zeros():
    q, k, v = rand(1, 2, 2, 24, 12, dtype=F64)  # Nq > Nk, causal: the first 12 queries see nothing
    kpm = torch.zeros(1, 12, dtype=torch.bool)
    kpm[0, 4:8] = True
    for backend in BACKENDS:
        out = sla.attention(q, k, v, "topk_block", causal=True, key_padding_mask=kpm, block_size=4,
                            density=0.01, sink_blocks=0, local_blocks=0, backend=backend)  # fmt: skip
        assert torch.isfinite(out).all() and not out[:, :, :12].any()
    sel = sla.selection(q, k, "topk_block", causal=True, key_padding_mask=kpm, block_size=4, density=0.01,
                        sink_blocks=0, local_blocks=0)  # fmt: skip
    rows = sel.block_mask.sum(-1)
    assert (rows[..., 3:] >= 1).all() and not rows[..., :3].any()  # rows 0-2 hold only queries that see nothing


BAD = [
    ({"density": 0.2, "mass": 0.5}, "give one budget, density= or mass=, not both"),
    ({"density": 0.0}, r"invalid density=0.0: expected a number in \(0, 1\]"),
    ({"density": 1.5}, r"invalid density=1.5: expected a number in \(0, 1\]"),
    ({"density": "half"}, r"invalid density='half': expected a number in \(0, 1\] or None"),
    ({"mass": -0.1}, r"invalid mass=-0.1: expected a number in \(0, 1\]"),
    ({"block_size": 0}, "invalid block_size=0: expected an int >= 1"),
    ({"block_size": 2.5}, "invalid block_size=2.5: expected an int >= 1, got float"),
    ({"sink_blocks": -1}, "invalid sink_blocks=-1: expected an int >= 0"),
    ({"local_blocks": True}, "invalid local_blocks=True: expected an int >= 0, got bool"),
    ({"stride": 0}, "invalid stride=0: expected an int >= 1"),
    ({"estimator": "antidiagonal", "block_size": 6, "stride": 4}, "needs stride dividing block_size"),
    ({"selection": "causal"}, "invalid selection='causal': expected one of 'strict', 'block'"),
    ({"budget": 0.1}, "unknown parameter.*'budget'.*Accepted parameters: block_size, density, mass"),
]


@pytest.mark.parametrize("params,match", BAD)
def test_bad_parameters_name_what_is_accepted(params, match):
    q, k, v = rand(1, 1, 1, 8, 8)
    with pytest.raises(ParameterError, match=match):
        sla.attention(q, k, v, "topk_block", **params)
    with pytest.raises(ParameterError, match=match):
        sla.selection(q, k, "topk_block", **params)
    with pytest.raises(ParameterError, match=match):
        sla.build({"variant": "topk_block", **params})


def test_unknown_estimator_is_an_unknown_name():
    q, k, v = rand(1, 1, 1, 8, 8)
    with pytest.raises(UnknownNameError, match="unknown estimator 'orcale'. Did you mean 'oracle'"):
        sla.attention(q, k, v, "topk_block", estimator="orcale")


def test_described_and_built_from_a_config():
    info = sla.describe("topk_block")
    assert info.exact and set(info.params) >= {"block_size", "density", "mass", "sink_blocks", "local_blocks",
                                               "estimator", "stride", "selection"}  # fmt: skip
    layer = sla.build({"variant": "topk_block", "block_size": 4, "density": 0.5, "causal": True})
    q, k, v = rand(1, 2, 2, 16, 16)
    sel = sla.selection(q, k, "topk_block", causal=True, block_size=4, density=0.5)
    torch.testing.assert_close(layer(q, k, v).double(), reference(q, k, v, sel), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "variant,estimator,grad",
    [
        ("topk_block", "mean_pool", False),
        ("topk_block", "mean_pool", True),
        ("topk_block", "key_pool", False),
        ("topk_block", "antidiagonal", False),
        ("hybrid", "mean_pool", False),
        ("hybrid", "mean_pool", True),
    ],
)
def test_no_tensor_of_n_squared_elements(variant, estimator, grad):
    # Every allocation (forward and backward) stays far below Nq·Nk: the selection is
    # (N/bs)², estimators and the compressed part are chunked, the tiles bounded per group.
    from _trace import LargestTensor

    n = 4096
    q, k, v = (t.requires_grad_(grad) for t in rand(1, 2, 1, n, n, D=16, Dv=16))
    with LargestTensor() as mode:
        out = sla.attention(q, k, v, variant, causal=True, block_size=64, density=0.1, estimator=estimator)
        if grad:
            out.sum().backward()
    assert mode.largest < n * n // 4, mode.largest


@pytest.mark.parametrize("causal", [False, True])
def test_flex_block_mask_from_the_selection(causal):
    # The GPU path, checked on CPU without grad: a BlockMask built from the selection computes
    # exactly its dense entries (GQA, key padding, ragged lengths, Nq != Nk).
    reason = flex_compiles()
    if reason:
        pytest.skip(reason)
    q, k, v = rand(2, 4, 2, 100, 130, D=16, Dv=16)
    kpm = padding(2, 130)
    kw = dict(causal=causal, key_padding_mask=kpm, block_size=16, density=0.4)
    sel = sla.selection(q, k, "topk_block", **kw)
    with torch.no_grad():
        out = sla.attention(q, k, v, "topk_block", backend="flex", **kw)
    torch.testing.assert_close(out.double(), reference(q, k, v, sel), atol=2e-6, rtol=1e-5)
