"""Registry, describe, user registration and the errors that name what was wrong."""

import math
import subprocess
import sys

import pytest
import torch
from _reference import softmax_attention, visible
from torch import nn

import sparse_linear_attn as sla


@pytest.fixture
def clean_registry():
    before = set(sla.available_variants())
    yield
    for name in set(sla.available_variants()) - before:
        sla.unregister_variant(name)


def qkv(B=1, H=2, N=8, D=4):
    return torch.randn(B, H, N, D), torch.randn(B, H, N, D), torch.randn(B, H, N, D)


def test_builtins_listed_sorted_and_described():
    names = sla.available_variants()
    assert names == sorted(names)
    assert {"full", "dot_product", "additive"} <= set(names)
    info = sla.describe("full")
    assert info.name == "full" and info.exact is True and "N²" in info.cost
    assert info.causal and info.cross_attention and info.key_padding and info.weights
    assert set(info.backends) >= {"torch", "math", "xformers"}
    add = sla.describe("additive")
    assert add.build_only and add.params["hidden_dim"][0] == 64 and add.params["head_dim"][1]
    assert "additive" in str(add)


def test_unknown_variant_names_closest():
    with pytest.raises(ValueError, match=r"unknown variant 'ful'.*'full'"):
        sla.attention(*qkv(), "ful")
    with pytest.raises(ValueError, match="dot_product"):
        sla.describe("dotproduct")
    with pytest.raises(ValueError, match="Known: additive, .*full"):
        sla.build({"variant": "zzzzzz"})


def test_unknown_parameter_names_it_and_lists_accepted():
    with pytest.raises(TypeError, match=r"'windw'.*Accepted parameters: none"):
        sla.attention(*qkv(), "full", windw=3)
    with pytest.raises(ValueError, match=r"'hiden_dim' \(did you mean 'hidden_dim'\?\).*head_dim, hidden_dim"):
        sla.build({"variant": "additive", "hiden_dim": 3})
    with pytest.raises(ValueError, match=r"invalid hidden_dim=0: expected an int >= 1"):
        sla.build({"variant": "additive", "hidden_dim": 0})
    with pytest.raises(ValueError, match=r"invalid head_dim='8'"):
        sla.build({"variant": "additive", "head_dim": "8"})


def test_unknown_or_unfit_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'tourch'.*'torch'"):
        sla.attention(*qkv(), "full", backend="tourch")
    with pytest.raises(ValueError, match=r"'xformers'.*cuda only, not cpu"):
        sla.attention(*qkv(), "full", backend="xformers")
    with pytest.raises(ValueError, match=r"has no 'flex' backend; it has: torch, xformers, math"):
        sla.attention(*qkv(), "full", backend="flex")
    with pytest.raises(ValueError, match="unknown backend"):
        sla.build({"variant": "full", "backend": "nope"})


def test_learned_variants_have_only_the_module_backend():
    with pytest.raises(ValueError, match="only backend is 'module'"):
        sla.build({"variant": "additive", "backend": "torch"})


def test_attention_refuses_learned_variants():
    with pytest.raises(ValueError, match=r"learned parameters.*sla\.build"):
        sla.attention(*qkv(), "additive", head_dim=4)


def test_register_function_variant(clean_registry):
    @sla.register_variant("scaled_twice", summary="full attention at twice the scale", exact=True, cost="O(N²·D)")
    def scaled_twice(q, k, v, *, causal, key_padding_mask, scale, factor: float = 2.0):
        return sla.attention(q, k, v, "full", causal=causal, key_padding_mask=key_padding_mask, scale=scale * factor)

    assert "scaled_twice" in sla.available_variants()
    info = sla.describe("scaled_twice")
    assert info.params["factor"][0] == 2.0 and info.summary.startswith("full attention")
    q, k, v = qkv(H=4)
    kv = k[:, :2], v[:, :2]  # grouped-query: the user function receives expanded heads
    out = sla.build({"variant": "scaled_twice", "causal": True, "factor": 3.0})(q, *kv)
    ref, _ = softmax_attention(q, *kv, visible(8, 8, causal=True), scale=3.0 / math.sqrt(4))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already registered"):
        sla.register_variant("scaled_twice")(scaled_twice)
    with pytest.raises(TypeError, match="'alpha'"):
        sla.attention(q, k, v, "scaled_twice", alpha=1)
    with pytest.raises(ValueError, match="does not support return_weights"):
        sla.attention(q, k, v, "scaled_twice", return_weights=True)

    @sla.register_variant("scaled_twice", overwrite=True)
    def replaced(q, k, v, *, causal, key_padding_mask, scale):
        return torch.zeros_like(q)

    assert torch.count_nonzero(sla.attention(q, k, v, "scaled_twice")) == 0


def test_register_module_variant(clean_registry):
    @sla.register_variant("gated", cost="O(N²·D)")
    class Gated(nn.Module):
        """full attention times a learned gate"""

        def __init__(self, init: float = 0.5):
            super().__init__()
            self.gate = nn.Parameter(torch.tensor(init))

        def forward(self, q, k, v, *, causal, key_padding_mask, scale):
            return self.gate * sla.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)

    info = sla.describe("gated")
    assert info.build_only and info.params == {"init": (0.5, "user parameter")}
    layer = sla.build({"variant": "gated", "init": 0.25})
    assert [n for n, _ in layer.named_parameters()] == ["impl.gate"]
    q, k, v = qkv()
    torch.testing.assert_close(layer(q, k, v), 0.25 * sla.attention(q, k, v))
    with pytest.raises(ValueError, match="sla.build"):
        sla.attention(q, k, v, "gated")


def test_register_rejects_non_callables_and_bad_names():
    with pytest.raises(TypeError, match="function or an nn.Module subclass"):
        sla.register_variant("x_not_callable")(42)
    with pytest.raises(ValueError, match="non-empty name"):
        sla.register_variant("")


@pytest.mark.parametrize(
    "q,k,v,kpm,match",
    [
        ((2, 8, 4), (2, 8, 4), (2, 8, 4), None, r"must have 4 dims .*got shape \(2, 8, 4\)"),
        ((1, 2, 8, 4), (2, 2, 8, 4), (2, 2, 8, 4), None, "batch sizes differ"),
        ((1, 3, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4), None, "not a multiple of key/value heads"),
        ((1, 2, 8, 4), (1, 2, 8, 5), (1, 2, 8, 4), None, "head_dim differ"),
        ((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 7, 4), None, "sequence lengths differ"),
        ((1, 2, 8, 4), (1, 1, 8, 4), (1, 2, 8, 4), None, "k and v head counts differ"),
        ((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4), torch.zeros(1, 8), "dtype torch.bool"),
        ((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4), torch.zeros(1, 7, dtype=torch.bool), r"\(B, Nk\) = \(1, 8\)"),
    ],
)
def test_shape_errors_state_received_and_expected(q, k, v, kpm, match):
    with pytest.raises(ValueError, match=match):
        sla.attention(torch.randn(q), torch.randn(k), torch.randn(v), key_padding_mask=kpm)


def test_dtype_errors():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="share one dtype"):
        sla.attention(q, q.double(), q)
    with pytest.raises(ValueError, match="floating-point"):
        sla.attention(q.long(), q.long(), q.long())
    with pytest.raises(ValueError, match="scale must be a finite number"):
        sla.attention(q, q, q, scale=float("nan"))


@pytest.mark.cuda
def test_device_mismatch_error():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="one device"):
        sla.attention(q, q.cuda(), q)


def test_importing_and_running_on_cpu_never_imports_xformers():
    code = (
        "import sys, torch, warnings; warnings.simplefilter('error');"
        "import sparse_linear_attn as sla;"
        "q = torch.randn(1, 2, 8, 4); sla.attention(q, q, q); sla.attention(q, q, q, causal=True);"
        "print('xformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False" and out.stderr == ""


def test_xformers_import_is_quiet_when_installed():
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        pytest.skip("xformers is not installed")
    code = (
        "import sys, warnings; warnings.simplefilter('error');"
        "from sparse_linear_attn.backends.xformers_backend import xops; xops();"
        "print('xformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True" and out.stderr == "", out.stderr


@pytest.mark.parametrize("name", ["full", "sliding_window", "block_sparse", "linear", "performer"])
def test_empty_inputs_give_empty_or_zero_outputs(name):
    # Empty batch, no queries, no keys: shapes as for any other call; no key visible -> zeros.
    for B, Nq, Nk in ((0, 5, 5), (1, 0, 5), (2, 4, 0)):
        q = torch.randn(B, 2, Nq, 8, requires_grad=True)
        k, v = torch.randn(B, 1, Nk, 8), torch.randn(B, 1, Nk, 6)
        out = sla.attention(q, k, v, name, causal=True)
        assert out.shape == (B, 2, Nq, 6) and torch.count_nonzero(out) == 0
        out.sum().backward()
        assert q.grad.shape == q.shape
    # Queries that see no key give zeros even when their own values are not finite.
    q = torch.full((1, 2, 3, 8), float("inf"))
    assert torch.count_nonzero(sla.attention(q, torch.randn(1, 1, 0, 8), torch.randn(1, 1, 0, 6), name)) == 0


def test_causal_must_be_a_bool():
    import numpy as np

    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"causal must be True or False, got 'false' \(str\)"):
        sla.attention(q, q, q, "sliding_window", window=2, causal="false")
    with pytest.raises(TypeError, match="causal must be True or False"):
        sla.attention(q, q, q, causal=1)
    torch.testing.assert_close(sla.attention(q, q, q, causal=np.bool_(True)), sla.attention(q, q, q, causal=True))


def test_module_variant_without_docstring_is_not_described_as_nn_module(clean_registry):
    @sla.register_variant("undocumented")
    class Undocumented(nn.Module):
        def forward(self, q, k, v, *, causal, key_padding_mask, scale):
            return v

    assert sla.describe("undocumented").summary == "user variant"


@pytest.mark.parametrize("variant,extra", [("performer", {}), ("block_sparse", {"pattern": "bigbird"})])
def test_seed_range_is_checked_up_front(variant, extra):
    q, k, v = qkv(N=16)
    for bad in (2**64, -1):
        with pytest.raises(ValueError, match=r"invalid seed=.*\[0, 18446744073709551615\]"):
            sla.build({"variant": variant, "seed": bad, **extra})
        with pytest.raises(ValueError, match=r"invalid seed"):
            sla.attention(q, k, v, variant, seed=bad, **extra)
    if extra:
        extra["block_size"] = 4
    out = sla.attention(q, k, v, variant, seed=2**64 - 1, **extra)  # the largest seed is accepted
    assert out.shape == q.shape[:3] + v.shape[-1:] and torch.isfinite(out).all()


def test_head_dim_zero_is_a_shape_error():
    z = torch.randn(1, 2, 5, 0)
    q = torch.randn(1, 2, 5, 3)
    for name in ("full", "dot_product", "sliding_window", "block_sparse", "linear", "performer"):
        with pytest.raises(ValueError, match=r"head_dim.*at least 1.*\(1, 2, 5, 0\)"):
            sla.attention(z, z, z, name)
        # An empty value dim is legal (the output has no elements), and the weights are still real.
        assert sla.attention(q, q, z, name).shape == (1, 2, 5, 0)
    _, w = sla.attention(q, q, z, "full", return_weights=True)
    torch.testing.assert_close(w, sla.attention(q, q, q, "full", return_weights=True)[1])


@pytest.mark.parametrize("cfg", [{1: 2}, {"variant": "full", 3: 4}, {"variant": "full", None: 1}])
def test_non_string_config_keys_are_named(cfg):
    with pytest.raises(ValueError, match=r"config keys must be strings"):
        sla.build(cfg)
    with pytest.raises(ValueError, match=r"parameter names must be strings"):
        sla.AttentionConfig("full", params={k: v for k, v in cfg.items() if k != "variant"})


def test_backend_none_is_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend must be a name.*got None"):
        sla.attention(q, k, v, backend=None)
    with pytest.raises(ValueError, match=r"'backend' must be a string, got None"):
        sla.build({"variant": "full", "backend": None})


@pytest.mark.parametrize("value", ["no", None, 1, 0.0])
def test_flags_must_be_bools(value):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"return_weights must be True or False"):
        sla.attention(q, k, v, return_weights=value)
    with pytest.raises(ValueError, match=r"return_weights must be True or False"):
        sla.build({"variant": "full"})(q, k, v, return_weights=value)
    with pytest.raises(ValueError, match=r"causal must be True or False"):
        sla.attention(q, k, v, causal=value)
    with pytest.raises(ValueError, match=r"causal must be True or False"):
        sla.dense_mask("sliding_window", 4, 4, causal=value, window=1)


def test_second_order_gradients_where_describe_promises_them():
    # describe(name).second_order lists the backends whose backward is differentiable; each
    # promise is checked here on the CPU for every registered variant.
    from sparse_linear_attn.backends.dispatch import BACKENDS

    for name in sla.available_variants():
        info = sla.describe(name)
        for backend in info.second_order:
            if BACKENDS[backend].devices is not None and "cpu" not in BACKENDS[backend].devices:
                continue
            q = torch.randn(1, 2, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            q.requires_grad_()
            # The second derivative itself, against finite differences of the first.
            assert torch.autograd.gradgradcheck(
                lambda x, name=name, backend=backend: sla.attention(x, x, x, name, causal=True, backend=backend), (q,)
            ), (name, backend)
    for name in ("full", "dot_product", "sliding_window", "block_sparse"):
        info = sla.describe(name)
        assert "math" in info.second_order and "torch" not in info.second_order
        assert "second-order gradients: backend='math'" in str(info)
