"""Attention over parts of the keys, merged by log-sum-exp, equals attention over all of them."""

import pytest
import torch
from _reference import masked_lse, softmax_attention

from sparse_linear_attn.backends.partial import merge_partials, partial_attention

F64 = torch.float64


@pytest.mark.parametrize("cut", [1, 7, 12])
def test_parts_merge_to_the_whole(cut):
    g = torch.Generator().manual_seed(cut)
    q = torch.randn(2, 4, 9, 8, dtype=F64, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 13, 8, dtype=F64, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 13, 5, dtype=F64, generator=g, requires_grad=True)
    mask = torch.rand(2, 1, 9, 13, generator=g) > 0.3
    mask[:, :, 0] = False  # a row that sees nothing anywhere
    mask[:, :, 1, :cut] = False  # a row that sees nothing in the first part
    scale = 0.4
    ref, _ = softmax_attention(q, k, v, mask, scale=scale)
    oa, la = partial_attention(q, k[:, :, :cut], v[:, :, :cut], scale=scale, mask=mask[..., :cut])
    ob, lb = partial_attention(q, k[:, :, cut:], v[:, :, cut:], scale=scale, mask=mask[..., cut:])
    out, lse = merge_partials(oa, la, ob, lb)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, masked_lse(q, k, mask.expand(2, 4, 9, 13), scale), atol=1e-12, rtol=0)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0])) and torch.isneginf(lse[:, :, 0]).all()
    # Gradients flow through the merge as through the whole softmax, and stay finite.
    w = torch.randn(out.shape, dtype=F64, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_half_inputs_accumulate_in_float32():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    out, lse = partial_attention(q, k, v, scale=0.25)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    ref, _ = softmax_attention(q, k, v, scale=0.25)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_without_autograd_the_same_values():
    # The no-grad path works in place on the score block; it must give the same numbers.
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 9, 8, dtype=F64, generator=g)
    k = torch.randn(2, 2, 13, 8, dtype=F64, generator=g)
    v = torch.randn(2, 2, 13, 5, dtype=F64, generator=g)
    mask = torch.rand(2, 1, 9, 13, generator=g) > 0.4
    mask[:, :, 0] = False
    ref, _ = softmax_attention(q, k, v, mask, scale=0.3)
    with torch.no_grad():
        out, lse = partial_attention(q, k, v, scale=0.3, mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, masked_lse(q, k, mask.expand(2, 4, 9, 13), 0.3), atol=1e-12, rtol=0)
    assert torch.isneginf(lse[:, :, 0]).all() and not out.isnan().any()


def test_inplace_merge_writes_into_the_first_part():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 5, 4, dtype=F64, generator=g)
    k = torch.randn(1, 2, 9, 4, dtype=F64, generator=g)
    v = torch.randn(1, 2, 9, 3, dtype=F64, generator=g)
    mask = torch.rand(1, 1, 5, 9, generator=g) > 0.4
    mask[:, :, 0] = False  # a row that sees nothing
    oa, la = partial_attention(q, k[:, :, :4], v[:, :, :4], scale=0.5, mask=mask[..., :4])
    ob, lb = partial_attention(q, k[:, :, 4:], v[:, :, 4:], scale=0.5, mask=mask[..., 4:])
    want, want_lse = merge_partials(oa, la, ob, lb)
    got, lse = merge_partials(oa, la, ob, lb, inplace=True)
    assert got.data_ptr() == oa.data_ptr()
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=0, rtol=0)
