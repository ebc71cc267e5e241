"""``sla.MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` running any variant.

    out = W_o · concat_h attention_variant(W_q^h x_q, W_k^h x_k, W_v^h x_v)

Same constructor meaning for the arguments ``nn.MultiheadAttention`` has, the same
``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
average_attn_weights=True, is_causal=False) -> (output, weights or None)`` and mask
conventions (True in a bool mask = *do not attend*; a float mask is added to the scores), and
the same ``state_dict`` keys, so existing weights load unchanged; with the ``full`` variant the
outputs are those of ``nn.MultiheadAttention``.

What decides how a call runs:

* causal (``is_causal=True``, an ``attn_mask`` equal to the causal mask, or ``causal: true``
  in the attention config) and ``key_padding_mask`` go to the variant itself, so every
  variant — linear ones included — keeps its own cost;
* attention dropout in training goes to the variant too (``dropout_p``) when it supports it
  (``sla.describe(name).dropout``: ``full``, ``dot_product``, ``sliding_window``,
  ``block_sparse`` and ``additive`` drop weights inside their own tiles);
* an arbitrary ``attn_mask``, a float mask with finite non-zero entries, ALiBi, or dropout for
  an exact variant that does not apply it itself need a score matrix. Exact variants run them
  through one dense masked path — the variant's own pattern (``sla.dense_mask``) combined with
  the mask — in O(Nq·Nk) memory; other variants refuse them with an error that says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .. import registry
from ..api import AttentionModule
from ..backends import dispatch
from ..config import AttentionConfig, to_config
from ..decoding import Cache
from ..errors import ShapeError, unknown_name_message
from ..inputs import causal_mask, causal_offset, full_visibility
from .dense import masked_biased_attention, split_float_mask
from .positional import POSITIONAL, ALiBi, RotaryEmbedding, sinusoidal_encoding

AttentionSpec = AttentionConfig | Mapping[str, Any] | str | os.PathLike | None


def _attention_config(attention: AttentionSpec) -> AttentionConfig:
    """Anything ``sla.build`` takes, plus ``None`` (full) and a bare registered variant name."""
    if attention is None:
        return AttentionConfig()
    if isinstance(attention, str) and not os.path.splitext(attention)[1] and not os.path.exists(attention):
        registry.get(attention)  # unknown names: error with the closest matches
        return AttentionConfig(variant=attention)
    return to_config(attention)


def _keep_variant_in_torch_layers(module, args):
    """A no-op forward pre-hook, registered on purpose.

    ``nn.TransformerEncoderLayer`` in ``eval()``/``no_grad`` takes a fused fast path that reads
    ``self_attn.in_proj_weight`` directly and never calls ``self_attn`` — it would silently run
    full attention instead of the chosen variant. PyTorch skips that path whenever a submodule
    carries a forward hook, so this hook keeps the variant running in inference as in training.
    """
    return None


def dense_capable(spec: registry.VariantSpec) -> bool:
    """An exact variant without learned parameters: softmax attention over a known pattern, so an
    arbitrary mask, a score bias or attention dropout can be honoured on the dense path. A
    data-dependent variant (``topk_block``) chooses its pattern from the inputs, not known here."""
    return spec.exact and spec.module is None and not spec.data_dependent


@dataclass(frozen=True)
class _Masks:
    """One call's masks: bool visibility (True = may attend) and finite float biases, each
    broadcastable to ``(B, H, Nq, Nk)``, and what is left to ``causal``."""

    nq: int
    nk: int  # real keys, before any appended by add_bias_kv / add_zero_attn
    causal: bool
    pattern_causal: bool  # causal of the variant's pattern, placed on the real keys
    kp_visible: torch.Tensor | None = None
    kp_bias: torch.Tensor | None = None
    am_visible: torch.Tensor | None = None
    am_bias: torch.Tensor | None = None
    appended: int = 0  # keys appended after the real ones

    def bias(self) -> torch.Tensor | None:
        biases = [b for b in (self.am_bias, self.kp_bias) if b is not None]
        return None if not biases else biases[0] if len(biases) == 1 else biases[0] + biases[1]


class MultiheadAttention(nn.Module):
    """Multi-head attention whose core is any registered variant.

    Args (those shared with ``nn.MultiheadAttention`` keep its meaning and positional order):
        embed_dim, num_heads: model width ``E`` and query heads ``H`` (``head_dim = E // H``).
        dropout: dropout on the attention weights in training (variants with
            ``sla.describe(name).dropout``, and exact ones on the dense path); may also come as
            ``dropout`` in the attention config.
        bias: biases on the input and output projections.
        add_bias_kv, add_zero_attn: append a learned / a zero key-value pair to the keys.
        kdim, vdim: feature sizes of ``key`` and ``value`` (default ``E``).
        batch_first: ``(B, N, E)`` inputs instead of ``(N, B, E)``.
        attention: the variant — anything ``sla.build`` accepts (mapping, ``AttentionConfig``,
            config file path) or a registered variant name; default ``full``. A variant with a
            ``head_dim`` parameter (``additive``) gets ``E // H`` unless the config sets it.
        num_kv_heads: grouped-query attention: ``H % num_kv_heads == 0`` key/value heads.
        positional: ``None``, ``"rope"`` (rotary on q and k before the variant: any variant),
            ``"sinusoidal"`` (added to the query and key inputs, not the values) or
            ``"alibi"`` (a per-head distance bias: exact variants only).
        rope_base: the RoPE/sinusoidal frequency base.

    Cost: the projections O(N·E²) plus the variant's own cost; O(Nq·Nk) memory whenever the
    dense path runs (arbitrary masks, ALiBi, ``need_weights=True``).
    """

    __constants__ = ["batch_first"]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        attention: AttentionSpec = None,
        num_kv_heads: int | None = None,
        positional: str | None = None,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if (
            isinstance(num_kv_heads, bool)
            or not isinstance(num_kv_heads, int)
            or num_kv_heads < 1
            or num_heads % num_kv_heads
        ):
            raise ValueError(
                f"num_kv_heads must be a positive int dividing num_heads ({num_heads}), got {num_kv_heads!r}"
            )
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if positional is not None and positional not in POSITIONAL:
            raise ValueError(unknown_name_message("positional encoding", str(positional), POSITIONAL) + " Or None.")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.positional = positional
        kv_dim = num_kv_heads * self.head_dim

        config = _attention_config(attention)
        spec = registry.get(config.variant)
        if "head_dim" in spec.params and "head_dim" not in config.params:
            config = replace(config, params={**config.params, "head_dim": self.head_dim})
        if config.dropout:
            if self.dropout and self.dropout != config.dropout:
                raise ValueError(
                    f"attention dropout given twice: dropout={dropout} and the attention config's "
                    f"dropout={config.dropout}; give it once"
                )
            self.dropout = config.dropout
        self.attn = AttentionModule(config)
        self.spec = spec

        if not dense_capable(spec):
            why = f"variant {spec.name!r} is not exact softmax attention over a dense pattern"
            if spec.data_dependent:
                why = f"variant {spec.name!r} chooses its pattern from the inputs (no fixed dense pattern)"
            if positional == "alibi":
                raise ValueError(
                    f"positional='alibi' adds a bias to attention scores, but {why}, so it has no "
                    f"score to bias. Use positional='rope' (works with every variant) or an exact "
                    f"variant ({', '.join(_dense_variants())})."
                )
            if self.dropout > 0.0 and not spec.supports.dropout:
                raise ValueError(
                    f"dropout={self.dropout} drops attention weights, but {why}, so it has no weight "
                    f"matrix to drop. Pass dropout=0.0 (swap_attention(..., dropout=0.0) does it "
                    f"for every layer) and regularise elsewhere."
                )
        elif self.dropout > 0.0 and not spec.supports.dropout and spec.mask_fn is not None:
            raise ValueError(
                f"dropout={self.dropout} drops attention weights; variant {spec.name!r} does not apply "
                f"dropout itself, so it would need the dense O(Nq·Nk) path in every training step and "
                f"lose its sparsity. Pass dropout=0.0 (swap_attention(..., dropout=0.0) does it for "
                f"every layer) and regularise elsewhere."
            )
        if positional == "rope" and self.head_dim % 2:
            raise ValueError(
                f"positional='rope' needs an even head_dim, got {self.head_dim} "
                f"(embed_dim={embed_dim}, num_heads={num_heads})"
            )
        self.rotary = RotaryEmbedding(self.head_dim, base=rope_base) if positional == "rope" else None
        self.alibi = ALiBi(num_heads) if positional == "alibi" else None
        self.rope_base = float(rope_base)

        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(embed_dim + 2 * kv_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(kv_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(kv_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * kv_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        self.bias_k: nn.Parameter | None
        self.bias_v: nn.Parameter | None
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, kv_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, kv_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()
        self.register_forward_pre_hook(_keep_variant_in_torch_layers)

    def _reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation, so that training from scratch matches too.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None and self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def extra_repr(self) -> str:
        parts = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}"]
        if self.num_kv_heads != self.num_heads:
            parts.append(f"num_kv_heads={self.num_kv_heads}")
        if not self._qkv_same_embed_dim:
            parts.append(f"kdim={self.kdim}, vdim={self.vdim}")
        parts.append(f"batch_first={self.batch_first}")
        if self.positional:
            parts.append(f"positional={self.positional!r}")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        return ", ".join(parts)

    # -----------------------------------------------------------------------------------------
    @classmethod
    def from_torch(
        cls,
        mha: nn.MultiheadAttention,
        attention: AttentionSpec = None,
        *,
        positional: str | None = None,
        dropout: float | None = None,
    ) -> MultiheadAttention:
        """A layer with ``mha``'s configuration and weights (copied), running ``attention``.

        ``dropout=None`` keeps ``mha.dropout``; variants without a weight matrix need 0.0.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_torch expects a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        ref = mha.out_proj.weight
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout if dropout is None else dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device=ref.device,
            dtype=ref.dtype,
            attention=attention,
            positional=positional,
        )
        missing, unexpected = new.load_state_dict(mha.state_dict(), strict=False)
        # Only a learned variant's own parameters (under ``attn.``) may be missing.
        missing = [k for k in missing if not k.startswith("attn.")]
        if missing or unexpected:
            raise RuntimeError(f"state_dict mismatch converting {mha}: missing {missing}, unexpected {unexpected}")
        new.train(mha.training)
        return new

    # -----------------------------------------------------------------------------------------
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Shapes as ``nn.MultiheadAttention``: query ``(L, B, E)`` (``(B, L, E)`` if
        ``batch_first``, ``(L, E)`` unbatched), key/value ``(S, B, kdim/vdim)``;
        ``key_padding_mask (B, S)``, ``attn_mask (L, S)`` or ``(B·H, L, S)``. Returns the output
        in the query's layout and, if ``need_weights``, weights ``(B, L, S)`` averaged over
        heads or ``(B, H, L, S)``.

        ``cache`` (from :meth:`make_cache`): incremental decoding of causal self-attention.
        query, key and value then hold only the new tokens (``S == L``), which follow the
        ``cache.seq_len`` cached ones; positions (RoPE, sinusoidal, ALiBi) continue from there,
        the cache is updated in place, and the output equals the matching rows of the uncached
        call over the whole sequence. ``key_padding_mask`` (bool) covers the new tokens and is
        kept. No ``attn_mask``, ``need_weights``, dropout in training or appended keys."""
        if cache is not None:
            return self._forward_cached(query, key, value, key_padding_mask, need_weights, attn_mask, cache)
        if query.is_nested:
            return self._forward_nested(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ShapeError(
                f"query, key and value must all be 3-D (batched) or 2-D (unbatched); got query "
                f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        batched = query.dim() == 3
        if not batched:
            query, key, value = query[None], key[None], value[None]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out, weights = self._attend(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
        if not batched:
            return out[0], (None if weights is None else weights[0])
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def make_cache(self, batch: int, max_len: int | None = None) -> Cache:
        """An empty decoding cache for ``forward(x, x, x, cache=cache)`` on ``batch`` sequences,
        in the dtype and on the device of the layer's weights. The attention config must be
        causal. ``max_len``: positions it may reach (caches that keep every key allocate it)."""
        w = self.out_proj.weight
        return self.attn.make_cache(
            batch, self.num_kv_heads, self.head_dim, self.head_dim, dtype=w.dtype, device=w.device, max_len=max_len
        )

    def _forward_cached(self, query, key, value, key_padding_mask, need_weights, attn_mask, cache):
        if query.is_nested or query.dim() != 3 or not (query.shape[:-1] == key.shape[:-1] == value.shape[:-1]):
            raise ShapeError(
                f"with a cache, query, key and value are 3-D and hold the same new tokens (self-attention); "
                f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        problems = [
            what
            for what, on in (
                ("need_weights=True (pass need_weights=False)", need_weights),
                ("an attn_mask (the cached call is causal already)", attn_mask is not None),
                ("add_bias_kv/add_zero_attn", self.bias_k is not None or self.add_zero_attn),
                (f"attention dropout ({self.dropout}) in training (call .eval())", self.training and self.dropout > 0),
                ("a non-bool key_padding_mask", key_padding_mask is not None and key_padding_mask.dtype != torch.bool),
                ("a non-causal attention config", not self.attn.config.causal),
            )
            if on
        ]
        if problems:
            raise ValueError(f"a call with a cache cannot take {' or '.join(problems)}")
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, T, E = query.shape
        offset = cache.seq_len
        q, k, v = self._project(query, key, value, offset=offset)
        if self.alibi is None:
            dropout_p = self.dropout if self.training else 0.0  # refused with a cache: decode in eval()
            out = self.attn(q, k, v, key_padding_mask=key_padding_mask, causal=True, cache=cache, dropout_p=dropout_p)
        else:
            # ALiBi biases scores, which the variants do not take: the dense path over the keys
            # the cache shows, with distances from their positions.
            a = self.attn
            dispatch.prepare(
                a.spec, q, k, v, params=a.params, causal=True, key_padding_mask=key_padding_mask,
                scale=a.config.scale, backend=a.config.backend, cache=cache,
            )  # fmt: skip
            view = cache.append(k, v, key_padding_mask)
            visible = view.visible[None]
            if view.key_padding_mask is not None:
                visible = visible & ~view.key_padding_mask[:, None, None, :]
            qpos = torch.arange(offset, offset + T, device=q.device)
            bias = self.alibi.bias(qpos, view.positions, dtype=torch.promote_types(q.dtype, torch.float32))
            out, _ = masked_biased_attention(
                q, view.keys, view.values, scale=a.scale_for(self.head_dim), visible=visible, bias=bias[None]
            )
        out, _ = self._finish(out, None, B, T, E, True)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _forward_nested(
        self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
    ):
        # nn.TransformerEncoder turns padded batches into nested tensors in inference; pad them
        # back (the padding becomes a key_padding_mask) so the variant runs on a dense batch.
        if not (query is key and key is value) or key_padding_mask is not None or attn_mask is not None:
            raise ShapeError("nested-tensor inputs are accepted for self-attention without masks only")
        parts = query.unbind()
        lengths = torch.tensor([p.shape[0] for p in parts], device=parts[0].device)
        x = query.to_padded_tensor(0.0)
        pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]
        out, weights = self._attend(x, x, x, pad, need_weights, None, average_attn_weights, is_causal)
        out = torch.nested.as_nested_tensor([o[:n] for o, n in zip(out, lengths.tolist())])
        return out, weights

    def _projections(self):
        e, kv = self.embed_dim, self.num_kv_heads * self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split([e, kv, kv])
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        if self.in_proj_bias is None:
            return (w_q, None), (w_k, None), (w_v, None)
        b_q, b_k, b_v = self.in_proj_bias.split([e, kv, kv])
        return (w_q, b_q), (w_k, b_k), (w_v, b_v)

    def _attend(self, query, key, value, key_padding_mask, need_weights, attn_mask, average, is_causal):
        """Batch-first ``(B, L, E)`` inputs → ``(out (B, L, E), weights or None)``."""
        B, Nq, E = query.shape
        Nk = key.shape[1]
        q, k, v = self._project(query, key, value)
        masks = self._masks(key_padding_mask, attn_mask, is_causal, B, Nq, Nk, q.device)
        k, v, masks = self._append_keys(k, v, masks)
        dropout_p = self.dropout if self.training else 0.0
        reasons = self._dense_reasons(masks, dropout_p)
        if reasons:
            out, weights = self._attend_dense(q, k, v, masks, reasons, dropout_p, need_weights)
        else:
            if need_weights and not self.spec.supports.weights:
                raise ValueError(
                    f"variant {self.spec.name!r} does not compute attention weights; call the layer with "
                    f"need_weights=False (nn.MultiheadAttention's default is True; "
                    f"nn.TransformerEncoderLayer already passes False)"
                )
            kpm = None if masks.kp_visible is None else ~masks.kp_visible[:, 0, 0, :]
            res = self.attn(
                q, k, v, key_padding_mask=kpm, return_weights=need_weights, causal=masks.causal, dropout_p=dropout_p
            )
            out, weights = res if need_weights else (res, None)
        return self._finish(out, weights, B, Nq, E, average)

    def _project(self, query, key, value, offset: int = 0):
        """Checked batch-first inputs → q ``(B, H, Nq, D)``, k/v ``(B, Hkv, Nk, D)`` with positions
        applied; keys sit at positions ``offset .. offset + Nk − 1`` (``offset``: a cache's length)."""
        B, Nq, E = query.shape
        Nk = key.shape[1]
        if E != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ShapeError(
                f"expected feature sizes query {self.embed_dim}, key {self.kdim}, value {self.vdim}; got "
                f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        if key.shape[:2] != value.shape[:2] or key.shape[0] != B:
            raise ShapeError(
                f"query, key and value batch sizes and key/value lengths must agree; got query "
                f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)} (batch-first view)"
            )
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q_in, k_in = query, key
        if self.positional == "sinusoidal":
            q_in = query + sinusoidal_encoding(
                Nq, E, base=self.rope_base, offset=offset + causal_offset(Nq, Nk), device=query.device,
                dtype=query.dtype,
            )  # fmt: skip
            k_in = key + sinusoidal_encoding(
                Nk, self.kdim, base=self.rope_base, offset=offset, device=key.device, dtype=key.dtype
            )
        (w_q, b_q), (w_k, b_k), (w_v, b_v) = self._projections()
        q = F.linear(q_in, w_q, b_q).reshape(B, Nq, H, D).transpose(1, 2)
        k = F.linear(k_in, w_k, b_k).reshape(B, Nk, Hkv, D).transpose(1, 2)
        v = F.linear(value, w_v, b_v).reshape(B, Nk, Hkv, D).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, k, offset=offset)
        return q, k, v

    def _masks(self, key_padding_mask, attn_mask, is_causal, B, Nq, Nk, device) -> _Masks:
        """The call's masks as bool visibility and finite float bias; a causal mask becomes ``causal``."""
        causal = self.attn.config.causal
        kp_visible = kp_bias = None
        if key_padding_mask is not None:
            kpm = key_padding_mask
            if tuple(kpm.shape) != (B, Nk):
                raise ShapeError(f"key_padding_mask must have shape (batch, S) = ({B}, {Nk}), got {tuple(kpm.shape)}")
            if kpm.dtype == torch.bool:
                kp_visible = ~kpm
            elif kpm.is_floating_point():
                kp_visible, kp_bias = split_float_mask(kpm)
            else:
                raise ShapeError(f"key_padding_mask must be bool (True = ignore) or float, got {kpm.dtype}")
            kp_visible = kp_visible[:, None, None, :]
            kp_bias = None if kp_bias is None else kp_bias[:, None, None, :]
        am_visible = am_bias = None
        if attn_mask is not None:
            am_visible, am_bias = self._split_attn_mask(attn_mask, B, Nq, Nk)
            if bool(am_visible.all()):
                am_visible = None  # e.g. an all-zero float mask: nothing hidden
        if is_causal and (attn_mask is None or Nq == Nk):
            # Like nn.MultiheadAttention, trust the hint for square masks (and allow it alone).
            causal, am_visible, am_bias = True, None, None
        elif (
            am_visible is not None
            and am_bias is None
            and bool((am_visible == causal_mask(Nq, Nk, device=device)).all())
        ):
            causal, am_visible = True, None  # a causal mask given explicitly: the variant does it cheaply
        return _Masks(Nq, Nk, causal, causal, kp_visible, kp_bias, am_visible, am_bias)

    def _append_keys(self, k, v, masks: _Masks):
        """``add_bias_kv`` / ``add_zero_attn``: keys (and mask columns) appended after the real ones,
        visible to every query; with them, ``causal`` becomes an explicit mask on the real keys."""
        extra = (self.bias_k is not None) + bool(self.add_zero_attn)
        if not extra:
            return k, v, masks
        B, Hkv, Nk, D = k.shape
        am_visible = masks.am_visible
        if masks.causal:
            c = causal_mask(masks.nq, Nk, device=k.device)[None, None]
            am_visible = c if am_visible is None else am_visible & c
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.view(1, Hkv, 1, D).expand(B, -1, -1, -1)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, Hkv, 1, D).expand(B, -1, -1, -1)], dim=2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, Hkv, 1, D)], dim=2)
            v = torch.cat([v, v.new_zeros(B, Hkv, 1, D)], dim=2)

        def grow(t, fill):
            return None if t is None else F.pad(t, (0, extra), value=fill)

        return (
            k,
            v,
            replace(
                masks,
                causal=False,
                appended=extra,
                kp_visible=grow(masks.kp_visible, True),
                kp_bias=grow(masks.kp_bias, 0.0),
                am_visible=grow(am_visible, True),
                am_bias=grow(masks.am_bias, 0.0),
            ),
        )

    def _dense_reasons(self, masks: _Masks, dropout_p: float) -> list[str]:
        """What this call asks that only the dense masked path can honour (empty: the variant runs)."""
        extra = masks.appended > 0
        return [
            r
            for r, on in (
                ("an arbitrary attn_mask", masks.am_visible is not None),
                ("a float mask with finite non-zero entries (a score bias)", masks.bias() is not None),
                ("positional='alibi'", self.alibi is not None),
                (
                    f"attention dropout ({self.dropout}) in training",
                    dropout_p > 0.0 and not self.spec.supports.dropout,
                ),
                ("add_bias_kv/add_zero_attn with a causal mask", extra and masks.am_visible is not None),
                # The appended keys sit outside the pattern (visible to every query): dense path.
                ("add_bias_kv/add_zero_attn with a patterned variant", extra and self.spec.mask_fn is not None),
            )
            if on
        ]

    def _attend_dense(self, q, k, v, masks: _Masks, reasons, dropout_p, need_weights):
        """Exact variants on the dense masked path: their pattern ∩ the masks, plus any bias."""
        spec = self.spec
        if not dense_capable(spec):
            raise ValueError(
                f"variant {spec.name!r} cannot honour {' and '.join(reasons)}: it is not exact "
                f"softmax attention over a dense pattern, so it has no score matrix to mask or bias. "
                f"It takes is_causal=True (or the causal mask) and key_padding_mask. Variants that "
                f"take any mask: {', '.join(_dense_variants())}."
            )
        Nq, Nk, Nk_all = masks.nq, masks.nk, k.shape[2]
        scale = self.attn.scale_for(self.head_dim)
        bias = masks.bias()
        if self.alibi is not None:
            ab = self.alibi(Nq, Nk, device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))
            ab = F.pad(ab, (0, Nk_all - Nk))[None]
            bias = ab if bias is None else bias + ab
        visible_given = masks.am_visible is not None or masks.kp_visible is not None
        if not visible_given and bias is None and spec.mask_fn is None and not need_weights:
            if not masks.causal or Nq == Nk_all:
                # Dropout alone keeps SDPA's fused kernels (top-left causal = ours when square).
                gqa = q.shape[1] != k.shape[1]
                out = F.scaled_dot_product_attention(
                    q, k, v, dropout_p=dropout_p, is_causal=masks.causal, scale=scale, enable_gqa=gqa
                )
                return out, None
        pattern = None
        if spec.mask_fn is not None:
            pattern = spec.mask_fn(Nq, Nk, causal=masks.pattern_causal, **self.attn.params)
            pattern = F.pad(pattern.to(q.device), (0, Nk_all - Nk), value=True)
        visible = full_visibility(
            Nq, Nk_all, causal=masks.causal, key_padding_mask=None, pattern=pattern, device=q.device
        )
        for m in (masks.am_visible, masks.kp_visible):
            if m is not None:
                visible = m if visible is None else visible & m
        return masked_biased_attention(
            q, k, v, scale=scale, visible=visible, bias=bias, dropout_p=dropout_p, return_weights=need_weights
        )

    def _finish(self, out, weights, B, Nq, E, average):
        out = self.out_proj(out.transpose(1, 2).reshape(B, Nq, E))
        if weights is not None and average:
            weights = weights.mean(dim=1)
        return out, weights

    def _split_attn_mask(self, attn_mask, B, Nq, Nk):
        H = self.num_heads
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (Nq, Nk):
                raise ShapeError(f"2-D attn_mask must have shape (L, S) = ({Nq}, {Nk}), got {tuple(attn_mask.shape)}")
            m = attn_mask[None, None]
        elif attn_mask.dim() == 3:
            if tuple(attn_mask.shape) != (B * H, Nq, Nk):
                raise ShapeError(
                    f"3-D attn_mask must have shape (batch·num_heads, L, S) = ({B * H}, {Nq}, {Nk}), "
                    f"got {tuple(attn_mask.shape)}"
                )
            m = attn_mask.view(B, H, Nq, Nk)
        else:
            raise ShapeError(f"attn_mask must be 2-D (L, S) or 3-D (B·H, L, S), got shape {tuple(attn_mask.shape)}")
        if m.dtype == torch.bool:
            return ~m, None
        if m.is_floating_point():
            return split_float_mask(m)
        raise ShapeError(f"attn_mask must be bool (True = do not attend) or float (added), got {m.dtype}")


def _dense_variants() -> list[str]:
    return [n for n in registry.available_variants() if dense_capable(registry.get(n))]
