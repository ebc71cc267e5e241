"""The dispatch table: what auto picks, and errors that say why a backend was ruled out."""

import pytest
import torch
from _reference import visible

import sparse_linear_attn as sla
from sparse_linear_attn import registry
from sparse_linear_attn.backends import BACKENDS, backend_table, select_backend
from sparse_linear_attn.inputs import make_call


def call(dtype=torch.float32, weights=False, grad=False, kpm=None):
    q = torch.randn(1, 2, 8, 4, dtype=dtype, requires_grad=grad)
    return make_call(q, q, q, causal=False, key_padding_mask=kpm, return_weights=weights)


def test_auto_picks_sdpa_then_math_for_weights():
    full = registry.get("full")
    assert select_backend(full, call(), {}) == "torch"
    assert select_backend(full, call(torch.bfloat16, grad=True), {}) == "torch"
    assert select_backend(full, call(weights=True), {}) == "math"
    assert select_backend(registry.get("additive"), call(), {}) == "module"


def test_explicit_backend_errors_give_reason():
    full = registry.get("full")
    with pytest.raises(ValueError, match=r"backend 'xformers' cannot run this 'full' call: runs on cuda only, not cpu"):
        select_backend(full, call(torch.float16), {}, "xformers")


def test_table_is_readable_and_consistent():
    text = backend_table()
    for name in ("torch", "math", "flex", "xformers"):
        assert name in text
    assert BACKENDS["math"].weights and not BACKENDS["torch"].weights
    assert BACKENDS["flex"].rules_out(call(grad=True)) is not None  # no backward on CPU


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(5, 5), (3, 7), (7, 3)])
def test_dense_mask_of_full(causal, nq, nk):
    m = sla.dense_mask("full", nq, nk, causal=causal)
    assert m.dtype == torch.bool and m.shape == (nq, nk)
    assert torch.equal(m, visible(nq, nk, causal=causal)[0, 0])


def test_dense_mask_errors():
    with pytest.raises(ValueError, match="nq must be a positive int"):
        sla.dense_mask("full", 0, 4)
    with pytest.raises(ValueError, match="no dense mask"):
        sla.dense_mask("additive", 4, 4)
