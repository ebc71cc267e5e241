"""sla.MultiheadAttention against torch.nn.MultiheadAttention (the independent reference) and
against explicit float64 softmax attention written here."""

import copy
import math

import pytest
import torch
from torch import nn

import sparse_linear_attn as sla
from sparse_linear_attn import registry
from sparse_linear_attn.backends.math import dense_attention
from sparse_linear_attn.nn.positional import alibi_slopes

E, H = 16, 4
F64 = torch.float64


def pair(**kw):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, **kw).to(F64)
    ours = sla.MultiheadAttention(E, H, **kw).to(F64)
    ours.load_state_dict(ref.state_dict())  # strict: the same keys and shapes
    return ref, ours


def inputs(nq, nk, *, batch_first, B=2, kdim=E, vdim=E, same=False):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, nq, E, generator=g, dtype=F64)
    k = q if same else torch.randn(B, nk, kdim, generator=g, dtype=F64)
    v = q if same else torch.randn(B, nk, vdim, generator=g, dtype=F64)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    return q, k, v


def close(a, b, tol=1e-10):
    if a is None or b is None:
        assert a is None and b is None
        return
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "kw",
    [{}, {"bias": False}, {"kdim": 8, "vdim": 12}, {"add_bias_kv": True, "add_zero_attn": True}],
    ids=["packed", "no_bias", "kdim_vdim", "bias_kv"],
)
def test_state_dict_keys_and_shapes_match_torch(kw):
    ref = nn.MultiheadAttention(E, H, **kw)
    ours = sla.MultiheadAttention(E, H, **kw)
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    ref.load_state_dict(ours.state_dict())  # both directions, strict
    assert ours._qkv_same_embed_dim == ref._qkv_same_embed_dim


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize(
    "case", ["self", "cross", "kdim_vdim", "padding", "bool_mask", "float_mask", "causal", "mask3d", "bias_kv"]
)
def test_matches_torch(batch_first, need_weights, average, case):
    kw, nq, nk = {}, 5, 5
    if case in ("cross", "kdim_vdim"):
        nk = 7
    if case == "kdim_vdim":
        kw = {"kdim": 8, "vdim": 12}
    if case == "bias_kv":
        kw = {"add_bias_kv": True, "add_zero_attn": True}
    ref, ours = pair(batch_first=batch_first, **kw)
    q, k, v = inputs(
        nq,
        nk,
        batch_first=batch_first,
        kdim=kw.get("kdim", E),
        vdim=kw.get("vdim", E),
        same=case in ("self", "causal", "bias_kv"),
    )
    call = {"need_weights": need_weights, "average_attn_weights": average}
    g = torch.Generator().manual_seed(2)
    if case == "padding":
        call["key_padding_mask"] = torch.tensor([[False] * 5, [False, False, False, True, True]])
    if case == "bool_mask":
        m = torch.rand(nq, nk, generator=g) < 0.4
        m[:, 0] = False  # no query fully masked (torch gives NaN there, we give zeros)
        call["attn_mask"] = m
    if case == "float_mask":
        call["attn_mask"] = torch.randn(nq, nk, generator=g, dtype=F64)
        kpm = torch.zeros(2, nk, dtype=F64)
        kpm[0, -1] = float("-inf")
        call["key_padding_mask"] = kpm
    if case == "mask3d":
        m = torch.rand(2 * H, nq, nk, generator=g) < 0.4
        m[..., 0] = False
        call["attn_mask"] = m
    if case in ("causal", "bias_kv"):
        call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(nq, dtype=F64)
        # torch honours the hint with SDPA's top-left is_causal only when need_weights=False,
        # which hides the appended bias_k/zero keys there but not with need_weights=True; we
        # always treat appended keys as visible, so compare bias_kv on the explicit-mask path.
        call["is_causal"] = case == "causal"
    a_out, a_w = ref(q, k, v, **call)
    b_out, b_w = ours(q, k, v, **call)
    close(a_out, b_out)
    close(a_w, b_w)


def test_unbatched_input_matches_torch():
    ref, ours = pair()
    x = torch.randn(6, E, dtype=F64)
    kpm = torch.tensor([False] * 5 + [True])
    for a, b in zip(ref(x, x, x, key_padding_mask=kpm), ours(x, x, x, key_padding_mask=kpm)):
        close(a, b)


def test_gradients_match_torch():
    ref, ours = pair(batch_first=True)
    q, k, v = inputs(5, 5, batch_first=True, same=True)
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=F64)
    ref(q, k, v, attn_mask=mask, is_causal=True, need_weights=False)[0].square().sum().backward()
    ours(q, k, v, attn_mask=mask, is_causal=True, need_weights=False)[0].square().sum().backward()
    for (_, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
        close(a.grad, b.grad)


def reference_layer(layer, x, *, visible=None, bias=None, scale=None):
    """Explicit float64 multi-head attention from the layer's weights (self-attention)."""
    B, N, _ = x.shape
    Hq, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    w, b = layer.in_proj_weight, layer.in_proj_bias
    q = (x @ w[:E].T + b[:E]).view(B, N, Hq, D).transpose(1, 2)
    k = (x @ w[E : E + Hkv * D].T + b[E : E + Hkv * D]).view(B, N, Hkv, D).transpose(1, 2)
    v = (x @ w[E + Hkv * D :].T + b[E + Hkv * D :]).view(B, N, Hkv, D).transpose(1, 2)
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(D))
    if bias is not None:
        s = s + bias
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    out = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, E)
    return layer.out_proj(out)


def test_grouped_query_heads():
    torch.manual_seed(3)
    layer = sla.MultiheadAttention(E, H, num_kv_heads=2, batch_first=True).to(F64)
    nn.init.normal_(layer.in_proj_bias)
    assert layer.in_proj_weight.shape == (E + 2 * 2 * (E // H), E)
    x = torch.randn(2, 6, E, dtype=F64)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    close(layer(x, x, x, need_weights=False, is_causal=True)[0], reference_layer(layer, x, visible=causal))
    with pytest.raises(ValueError, match="num_kv_heads"):
        sla.MultiheadAttention(E, H, num_kv_heads=3)


def test_alibi_in_layer_matches_explicit_bias():
    torch.manual_seed(4)
    layer = sla.MultiheadAttention(E, H, batch_first=True, positional="alibi").to(F64)
    x = torch.randn(2, 6, E, dtype=F64)
    i = torch.arange(6)
    bias = -alibi_slopes(H)[:, None, None] * (i[:, None] - i[None, :]).abs()
    close(layer(x, x, x, need_weights=False)[0], reference_layer(layer, x, bias=bias))
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    close(layer(x, x, x, need_weights=False, is_causal=True)[0], reference_layer(layer, x, bias=bias, visible=causal))


def test_rope_in_layer_matches_rotated_reference():
    torch.manual_seed(5)
    layer = sla.MultiheadAttention(E, H, batch_first=True, positional="rope").to(F64)
    plain = sla.MultiheadAttention(E, H, batch_first=True).to(F64)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(1, 6, E, dtype=F64)
    a = layer(x, x, x, need_weights=False)[0]
    b = plain(x, x, x, need_weights=False)[0]
    assert (a - b).abs().max() > 1e-3  # RoPE changes the result...
    # ...but, being relative, not the attention among a set of identical tokens shifted in time.
    y = torch.randn(1, 1, E, dtype=F64).expand(1, 6, E)
    close(layer(y, y, y, need_weights=False)[0], plain(y, y, y, need_weights=False)[0], tol=1e-9)


# ---------------------------------------------------------------------------------------------
# Swapping inside torch's transformer layers.


def encoder(batch_first=True):
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=batch_first)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("training", [True, False])
def test_swap_in_transformer_encoder_equals_original(training):
    orig = encoder()
    swapped = sla.swap_attention(copy.deepcopy(orig), attention={"variant": "full"})
    assert all(isinstance(layer.self_attn, sla.MultiheadAttention) for layer in swapped.layers)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in swapped.modules())
    orig.train(training), swapped.train(training)
    x = torch.randn(3, 7, E)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    with torch.set_grad_enabled(training):
        for kwargs in ({"src_key_padding_mask": kpm}, {"mask": mask, "is_causal": True}, {}):
            a, b = orig(x, **kwargs), swapped(x, **kwargs)
            # torch's inference path zeroes padded positions (nested tensors); compare real tokens.
            keep = ~kpm if "src_key_padding_mask" in kwargs else torch.ones_like(kpm)
            torch.testing.assert_close(a[keep], b[keep], atol=2e-5, rtol=2e-5)


def test_swapped_variant_runs_in_eval_and_no_grad():
    calls = []

    def counting_full(q, k, v, *, causal, key_padding_mask, scale, return_weights=False):
        calls.append(causal)
        return dense_attention(q, k, v, scale=scale, mask=None, return_weights=return_weights)

    registry.add(
        registry.VariantSpec(
            "_test_counting",
            "test",
            True,
            "O(N²)",
            supports=registry.Supports(causal=False, key_padding=False),
            impls={"torch": registry.Impl(counting_full)},
        )
    )
    try:
        model = sla.swap_attention(encoder(), attention="_test_counting").eval()
        with torch.no_grad(), torch.inference_mode(False):
            model(torch.randn(2, 5, E))
        assert len(calls) == 2  # both layers ran the variant, not torch's fused kernel
        # A layer built by hand (no swap_attention) is protected too.
        layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, batch_first=True).eval()
        layer.self_attn = sla.MultiheadAttention.from_torch(layer.self_attn, attention="_test_counting", dropout=0.0)
        with torch.no_grad():
            layer(torch.randn(2, 5, E))
        assert len(calls) == 3
    finally:
        registry.unregister_variant("_test_counting")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_hand_built_encoder_with_nested_tensor_fast_path():
    # Layers swapped by hand keep the encoder's nested-tensor conversion on: the layer pads back.
    orig = encoder().eval()
    model = copy.deepcopy(orig)
    for layer in model.layers:
        layer.self_attn = sla.MultiheadAttention.from_torch(layer.self_attn)
    assert model.use_nested_tensor
    x = torch.randn(3, 7, E)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[0, 4:] = True
    with torch.no_grad():
        torch.testing.assert_close(
            orig(x, src_key_padding_mask=kpm), model(x, src_key_padding_mask=kpm), atol=2e-5, rtol=2e-5
        )


def test_swap_whole_transformer_and_single_layer():
    torch.manual_seed(7)
    model = nn.Transformer(
        E, H, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, dropout=0.0, batch_first=True
    )
    ref = copy.deepcopy(model)
    sla.swap_attention(model)
    assert sum(isinstance(m, sla.MultiheadAttention) for m in model.modules()) == 3
    src, tgt = torch.randn(2, 6, E), torch.randn(2, 4, E)
    mask = nn.Transformer.generate_square_subsequent_mask(4)
    torch.testing.assert_close(
        model(src, tgt, tgt_mask=mask, tgt_is_causal=True),
        ref(src, tgt, tgt_mask=mask, tgt_is_causal=True),
        atol=2e-5,
        rtol=2e-5,
    )
    single = sla.swap_attention(nn.MultiheadAttention(E, H))
    assert isinstance(single, sla.MultiheadAttention)
    with pytest.raises(ValueError, match="no torch.nn.MultiheadAttention"):
        sla.swap_attention(model)


# ---------------------------------------------------------------------------------------------
# Every registered variant through the layer.


def variant_config(name):
    info = sla.describe(name)
    return info, {"variant": name}


@pytest.mark.parametrize("positional", [None, "rope"])
@pytest.mark.parametrize("name", sla.available_variants())
def test_every_variant_forward_backward(name, positional):
    info, config = variant_config(name)
    torch.manual_seed(8)
    layer = sla.MultiheadAttention(E, H, batch_first=True, attention=config, positional=positional)
    x = torch.randn(2, 16, E, requires_grad=True)
    kw = {"need_weights": False}
    if info.causal:
        kw["is_causal"] = True
    if info.key_padding:
        kpm = torch.zeros(2, 16, dtype=torch.bool)
        kpm[1, 12:] = True
        kw["key_padding_mask"] = kpm
    out, w = layer(x, x, x, **kw)
    assert out.shape == x.shape and w is None and torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    if info.causal:  # causality reaches the variant: the first outputs ignore later tokens
        kw.pop("key_padding_mask", None)
        run = lambda t: layer(t, t, t, **kw)[0].detach()  # noqa: E731
        x0 = x.detach()
        base = run(x0)
        if torch.allclose(base, run(x0)):  # (a variant drawing fresh randomness per call is skipped)
            y = x0.clone()
            y[:, 8:] = torch.randn(2, 8, E)
            torch.testing.assert_close(run(y)[:, :8], base[:, :8], atol=1e-4, rtol=1e-4)
            assert (run(y)[:, 8:] - base[:, 8:]).abs().max() > 1e-3


# Exact over a pattern known without the inputs (data-dependent ones, like inexact ones, refuse).
EXACT = [n for n in sla.available_variants() if sla.describe(n).exact and not registry.get(n).data_dependent]
INEXACT = [n for n in sla.available_variants() if n not in EXACT]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", EXACT)
def test_exact_variants_combine_their_pattern_with_attn_mask(name, causal):
    # Reference: softmax over sla.dense_mask(variant) ∩ (not user mask), written out here.
    torch.manual_seed(12)
    N = 24
    layer = sla.MultiheadAttention(E, H, batch_first=True, attention={"variant": name, "causal": causal}).to(F64)
    nn.init.normal_(layer.in_proj_bias)
    x = torch.randn(2, N, E, dtype=F64)
    user = torch.rand(N, N) < 0.25
    user.fill_diagonal_(False)
    pattern = sla.dense_mask(name, N, N, causal=causal)
    visible = (pattern & ~user)[None] if pattern.dim() == 2 else pattern[None] & ~user
    scale = 1.0 if name == "dot_product" else None
    got = layer(x, x, x, attn_mask=user, need_weights=False)[0]
    close(got, reference_layer(layer, x, visible=visible, scale=scale), tol=1e-9)


@pytest.mark.parametrize("name", INEXACT)
def test_inexact_variants_refuse_arbitrary_masks_and_alibi(name):
    info = sla.describe(name)
    layer = sla.MultiheadAttention(E, H, batch_first=True, attention=name)
    x = torch.randn(1, 6, E)
    arbitrary = torch.rand(6, 6) < 0.3
    arbitrary.fill_diagonal_(False)
    arbitrary[0, 1] = True
    with pytest.raises(ValueError, match="cannot honour an arbitrary attn_mask"):
        layer(x, x, x, attn_mask=arbitrary, need_weights=False)
    with pytest.raises(ValueError, match="alibi"):
        sla.MultiheadAttention(E, H, attention=name, positional="alibi")
    if info.causal:  # the causal mask itself is fine: it goes to the variant as causal=True
        causal_bool = torch.ones(6, 6, dtype=torch.bool).triu(1)
        layer(x, x, x, attn_mask=causal_bool, need_weights=False)


def test_explicit_causal_mask_reaches_variants_without_dense_masks():
    # additive has no dense path; a causal bool mask must be recognised and sent as causal=True.
    torch.manual_seed(9)
    layer = sla.MultiheadAttention(E, H, batch_first=True, attention="additive")
    x = torch.randn(2, 6, E)
    bool_mask = torch.ones(6, 6, dtype=torch.bool).triu(1)
    a = layer(x, x, x, attn_mask=bool_mask, need_weights=False)[0]
    b = layer(x, x, x, is_causal=True, need_weights=False)[0]
    c = layer(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(6), need_weights=False)[0]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert (a - layer(x, x, x, need_weights=False)[0]).abs().max() > 1e-4
    assert set(k for k, _ in layer.named_parameters() if k.startswith("attn.")) == {
        "attn.impl.w_q",
        "attn.impl.w_k",
        "attn.impl.bias",
        "attn.impl.w",
    }
    layer.load_state_dict(
        sla.MultiheadAttention.from_torch(nn.MultiheadAttention(E, H), attention="additive").state_dict()
    )


def test_exact_sparse_pattern_combines_with_attn_mask():
    # An exact variant with a pattern (as sliding_window / block_sparse will be): the dense path
    # must intersect its pattern with the user's mask.
    def band(nq, nk, *, causal, width):
        i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
        return (i - j).abs() <= width

    def band_attention(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, width):
        from sparse_linear_attn.inputs import full_visibility

        m = full_visibility(
            q.shape[2],
            k.shape[2],
            causal=causal,
            key_padding_mask=key_padding_mask,
            pattern=band(q.shape[2], k.shape[2], causal=causal, width=width),
        )
        return dense_attention(q, k, v, scale=scale, mask=m, return_weights=return_weights)

    registry.add(
        registry.VariantSpec(
            "_test_band",
            "test",
            True,
            "O(N·w)",
            params={"width": registry.Param("width", 1, "half width", registry.int_at_least(0))},
            impls={"torch": registry.Impl(band_attention)},
            mask_fn=band,
        )
    )
    try:
        torch.manual_seed(10)
        layer = sla.MultiheadAttention(E, H, batch_first=True, attention={"variant": "_test_band", "width": 2}).to(F64)
        nn.init.normal_(layer.in_proj_bias)
        x = torch.randn(2, 8, E, dtype=F64)
        user = torch.rand(8, 8) < 0.3
        user.fill_diagonal_(False)
        allowed = band(8, 8, causal=False, width=2) & ~user
        close(layer(x, x, x, attn_mask=user, need_weights=False)[0], reference_layer(layer, x, visible=allowed))
        fmask = torch.randn(8, 8, dtype=F64)
        out, w = layer(x, x, x, attn_mask=fmask, is_causal=False)
        close(out, reference_layer(layer, x, visible=band(8, 8, causal=False, width=2), bias=fmask))
        assert (w[:, ~band(8, 8, causal=False, width=2)] == 0).all()
        with pytest.raises(ValueError, match="lose its sparsity"):
            sla.MultiheadAttention(E, H, attention="_test_band", dropout=0.1)
    finally:
        registry.unregister_variant("_test_band")


def test_dot_product_scale_and_dropout():
    torch.manual_seed(11)
    layer = sla.MultiheadAttention(E, H, batch_first=True, attention="dot_product", dropout=0.5).to(F64)
    x = torch.randn(2, 6, E, dtype=F64)
    user = torch.ones(6, 6, dtype=torch.bool).triu(2)
    layer.eval()
    close(layer(x, x, x, attn_mask=user)[0], reference_layer(layer, x, visible=~user, scale=1.0))
    layer.train()
    assert (layer(x, x, x)[0] - layer(x, x, x)[0]).abs().max() > 1e-6  # weights are dropped out
    # Dropout alone (fused SDPA path): still causal, and p -> 0 gives the exact result.
    y = x.clone()
    y[:, 3:] = torch.randn(2, 3, E, dtype=F64)
    torch.manual_seed(0)
    a = layer(x, x, x, is_causal=True, need_weights=False)[0]
    torch.manual_seed(0)
    b = layer(y, y, y, is_causal=True, need_weights=False)[0]
    close(a[:, :3], b[:, :3])
    layer.dropout = 1e-12
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    close(
        layer(x, x, x, is_causal=True, need_weights=False)[0],
        reference_layer(layer, x, visible=causal, scale=1.0),
        tol=1e-8,
    )


def test_fully_masked_query_gives_zero_attention_not_nan():
    layer = sla.MultiheadAttention(E, H, batch_first=True, bias=False)
    x = torch.randn(1, 4, E)
    m = torch.zeros(4, 4, dtype=torch.bool)
    m[2] = True
    out, w = layer(x, x, x, attn_mask=m)
    assert torch.isfinite(out).all() and (out[0, 2] == 0).all() and (w[0, 2] == 0).all()


# ---------------------------------------------------------------------------------------------
# Clear errors.


def test_errors_for_unsupported_combinations():
    with pytest.raises(ValueError, match="alibi.*rope"):
        sla.MultiheadAttention(E, H, attention="additive", positional="alibi")
    with pytest.raises(ValueError, match="no weight matrix to drop.*dropout=0.0"):
        sla.MultiheadAttention(E, H, attention="linear", dropout=0.1)
    with pytest.raises(ValueError, match="did you mean 'rope'|Did you mean 'rope'"):
        sla.MultiheadAttention(E, H, positional="rop")
    with pytest.raises(ValueError, match="Did you mean 'full'"):
        sla.MultiheadAttention(E, H, attention="ful")
    with pytest.raises(ValueError, match="even head_dim"):
        sla.MultiheadAttention(12, 4, positional="rope")
    with pytest.raises(ValueError, match="divisible"):
        sla.MultiheadAttention(10, 4)
    layer = sla.MultiheadAttention(E, H, batch_first=True, attention="additive")
    x = torch.randn(2, 5, E)
    arbitrary = torch.rand(5, 5) < 0.3
    arbitrary.fill_diagonal_(False)
    with pytest.raises(ValueError, match="cannot honour an arbitrary attn_mask.*full"):
        layer(x, x, x, attn_mask=arbitrary, need_weights=False)
    with pytest.raises(ValueError, match="score bias"):
        layer(x, x, x, attn_mask=torch.randn(5, 5), need_weights=False)
    full = sla.MultiheadAttention(E, H, batch_first=True)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        full(x, x, x, attn_mask=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        full(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="feature sizes"):
        full(x, torch.randn(2, 5, 8), x)
    with pytest.raises(TypeError, match="MultiheadAttention"):
        sla.MultiheadAttention.from_torch(nn.Linear(2, 2))


def test_need_weights_refused_by_variants_without_weights():
    def no_weights(q, k, v, *, causal, key_padding_mask, scale):
        return dense_attention(q, k, v, scale=scale, mask=None, return_weights=False)[0]

    sla.register_variant("_test_noweights", exact=False)(no_weights)
    try:
        layer = sla.MultiheadAttention(E, H, batch_first=True, attention="_test_noweights")
        x = torch.randn(1, 3, E)
        with pytest.raises(ValueError, match="need_weights=False"):
            layer(x, x, x)
        assert layer(x, x, x, need_weights=False)[1] is None
    finally:
        sla.unregister_variant("_test_noweights")


def test_attention_given_as_config_file_or_config(tmp_path):
    path = tmp_path / "attn.yaml"
    path.write_text("variant: dot_product\ncausal: true\n")
    layer = sla.MultiheadAttention(E, H, attention=str(path))
    assert layer.attn.config.variant == "dot_product" and layer.attn.config.causal
    layer = sla.MultiheadAttention(E, H, attention=sla.AttentionConfig("additive", params={"hidden_dim": 4}))
    assert layer.attn.params == {"head_dim": E // H, "hidden_dim": 4}
    with pytest.raises(FileNotFoundError):
        sla.MultiheadAttention(E, H, attention="missing.yaml")


@pytest.mark.parametrize("extra", [{"add_bias_kv": True}, {"add_zero_attn": True}])
def test_appended_keys_stay_outside_a_variants_pattern(extra):
    # torch with the band as attn_mask is the reference: the appended key is visible to all.
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=True, **extra).double().eval()
    ours = sla.MultiheadAttention.from_torch(ref, {"variant": "sliding_window", "window": 1}).double().eval()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    band_hidden = (torch.arange(7)[:, None] - torch.arange(7)).abs() > 1
    want, w_want = ref(x, x, x, attn_mask=band_hidden)
    got, w_got = ours(x, x, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w_got, w_want, rtol=1e-10, atol=1e-10)


def test_sinusoidal_positions_are_bottom_right_aligned_like_a_kv_cache():
    torch.manual_seed(0)
    m = (
        sla.MultiheadAttention(
            16, 2, batch_first=True, positional="sinusoidal", attention={"variant": "full", "causal": True}
        )
        .double()
        .eval()
    )
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    whole = m(x, x, x, need_weights=False)[0]
    last = m(x[:, -1:], x, x, need_weights=False)[0]  # decoding the last token against the cache
    torch.testing.assert_close(last, whole[:, -1:], rtol=1e-10, atol=1e-10)
