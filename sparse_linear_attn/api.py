"""The public calls: ``attention``, ``build`` and ``dense_mask`` (``make_cache`` lives in
:mod:`sparse_linear_attn.decoding`).

Both ``attention`` and :class:`AttentionModule` hand a call to
:mod:`sparse_linear_attn.backends.dispatch` (``prepare`` checks it once, ``run`` picks the backend
and runs the variant); nothing here knows about any one backend or variant.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any, Literal, overload

import torch
from torch import nn

from . import registry
from .backends import dispatch
from .config import AttentionConfig, to_config
from .decoding import Cache, make_cache
from .errors import CacheError
from .inputs import check_flag, full_visibility


@overload
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    variant: str = ...,
    *,
    causal: bool = ...,
    key_padding_mask: torch.Tensor | None = ...,
    scale: float | None = ...,
    return_weights: Literal[False] = ...,
    backend: str = ...,
    dropout_p: float = ...,
    cache: Cache | None = ...,
    **params: Any,
) -> torch.Tensor: ...
@overload
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    variant: str = ...,
    *,
    causal: bool = ...,
    key_padding_mask: torch.Tensor | None = ...,
    scale: float | None = ...,
    return_weights: Literal[True],
    backend: str = ...,
    dropout_p: float = ...,
    cache: Cache | None = ...,
    **params: Any,
) -> tuple[torch.Tensor, torch.Tensor]: ...
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    variant: str = "full",
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_weights: bool = False,
    backend: str = "auto",
    dropout_p: float = 0.0,
    cache: Cache | None = None,
    **params: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over ``k``/``v`` with the named variant.

    Args:
        q: ``(B, H, Nq, D)``.
        k: ``(B, Hkv, Nk, D)`` with ``H % Hkv == 0`` (grouped-query / multi-query attention).
        v: ``(B, Hkv, Nk, Dv)``.
        variant: a name from ``sla.available_variants()``.
        causal: query ``i`` sees keys ``j <= i + Nk - Nq`` (bottom-right aligned, as in
            FlashAttention and KV-cache decoding).
        key_padding_mask: bool ``(B, Nk)``; **True marks a padded key to ignore**. A query that
            sees no key gets a zero output row.
        scale: multiplies ``q·k``; defaults to ``1/sqrt(D)`` (``dot_product``: 1).
        return_weights: also return the ``(B, H, Nq, Nk)`` attention matrix — O(Nq·Nk) memory,
            meant for inspection.
        backend: ``"auto"`` or a backend name (see ``sla.backends.BACKENDS``).
        dropout_p: attention dropout, as in ``F.scaled_dot_product_attention``: each softmax
            weight is dropped with this probability and the rest scaled by ``1/(1 − p)``, on
            every call (modules apply it in training only). Variants with
            ``sla.describe(variant).dropout``; the mask is a hash of the position and a seed
            drawn from torch's generator, so ``torch.manual_seed`` reproduces it.
        cache: an ``sla.Cache`` from ``sla.make_cache`` for incremental decoding: q, k, v then
            hold only the new tokens (any number), which follow the ``cache.seq_len`` cached
            ones; the cache is updated in place and the output is the matching rows of the
            one-shot causal call over the whole sequence. Needs ``causal=True``; a
            ``key_padding_mask`` covers the new keys and is kept for later steps.
        **params: the variant's own parameters (``sla.describe(variant).params``).

    Returns:
        ``out`` of shape ``(B, H, Nq, Dv)`` in the input dtype, or ``(out, weights)``.
    """
    spec = registry.get(variant)
    resolved = spec.resolve_params(params)
    module = None
    if spec.module is not None:
        module = spec.module(**resolved)
        if any(True for _ in module.parameters()):
            raise ValueError(
                f"variant {variant!r} has learned parameters; sla.attention cannot own them. Use "
                f"sla.build({{'variant': {variant!r}, ...}}) to get an nn.Module and call that."
            )
        module = module.to(q.device)
    prepared = dispatch.prepare(
        spec, q, k, v, params=resolved, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
        return_weights=return_weights, backend=backend, dropout_p=dropout_p, cache=cache,
    )  # fmt: skip
    return dispatch.run(prepared, q, k, v, module=module)


class AttentionModule(nn.Module):
    """An attention variant as an ``nn.Module`` (what ``sla.build`` returns).

    ``forward(q, k, v, *, key_padding_mask=None, return_weights=False, causal=None,
    dropout_p=None, cache=None)`` behaves as ``sla.attention(q, k, v, **config)``; ``causal=None``
    uses the config's, ``dropout_p=None`` the config's ``dropout`` in training and 0 in eval (as
    FlashAttention's modules do). Variants with learned parameters hold them in ``self.impl``.
    :meth:`make_cache` makes a decoding cache for ``forward(..., cache=cache)``.
    """

    def __init__(self, config: AttentionConfig):
        super().__init__()
        # A copy: the caller may keep and change its config; this module must not change with it.
        self.config = copy.deepcopy(config)
        config = self.config
        self.spec = registry.get(config.variant)
        self.params = self.spec.resolve_params(config.params)
        dispatch.check_backend(self.spec, config.backend)
        dispatch.check_dropout(self.spec, config.dropout, "config 'dropout'")
        if config.scale is not None:
            self.spec.validate_scale(config.scale, self.params)
        self.impl = self.spec.module(**self.params) if self.spec.module is not None else None

    def scale_for(self, head_dim: int) -> float:
        """The scale a call with this head dimension runs with."""
        return self.spec.resolve_scale(self.config.scale, head_dim)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        return_weights: bool = False,
        causal: bool | None = None,
        dropout_p: float | None = None,
        cache: Cache | None = None,
    ):
        c = self.config
        if dropout_p is None:
            dropout_p = c.dropout if self.training else 0.0
        prepared = dispatch.prepare(
            self.spec, q, k, v, params=self.params, causal=c.causal if causal is None else causal,
            key_padding_mask=key_padding_mask, scale=c.scale, return_weights=return_weights, backend=c.backend,
            dropout_p=dropout_p, cache=cache,
        )  # fmt: skip
        return dispatch.run(prepared, q, k, v, module=self.impl)

    def make_cache(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        value_dim: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_len: int | None = None,
    ) -> Cache:
        """An empty decoding cache for this module's variant and parameters (see
        ``sla.make_cache``); the module's config must be causal."""
        if not self.config.causal:
            raise CacheError(
                f"a cache decodes causally, but this {self.config.variant!r} module was built with "
                f"causal=False; build it with causal=True"
            )
        return make_cache(
            AttentionConfig(self.config.variant, True, params=dict(self.params)), batch=batch, kv_heads=kv_heads,
            head_dim=head_dim, value_dim=value_dim, dtype=dtype, device=device, max_len=max_len,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items())


def build(config: AttentionConfig | Mapping[str, Any] | str | os.PathLike) -> AttentionModule:
    """An ``nn.Module`` running the configured variant.

    ``config`` is a flat mapping such as ``{"variant": "sliding_window", "window": 256,
    "causal": True}`` (keys ``variant``, ``causal``, ``scale``, ``backend`` plus the variant's
    parameters), an :class:`AttentionConfig`, or a path to a ``.json``/``.yaml``/``.yml``/
    ``.toml`` file holding that mapping. Everything is validated here, before any forward. The
    module keeps its own copy of the config: changing the caller's afterwards changes nothing.
    """
    return AttentionModule(to_config(config))


def dense_mask(variant: str, nq: int, nk: int, *, causal: bool = False, **params: Any) -> torch.Tensor:
    """The bool mask ``(nq, nk)`` (or ``(H, nq, nk)`` for per-head layouts) an exact variant uses.

    True where query ``i`` may attend to key ``j``. O(nq·nk): for inspection, tests and plots.
    """
    spec = registry.get(variant)
    causal = check_flag("causal", causal)
    for name, n in (("nq", nq), ("nk", nk)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if not spec.exact:
        raise ValueError(
            f"variant {variant!r} is not an exact pattern of softmax attention, so it has no dense mask; "
            f"variants with one: {', '.join(n for n in registry.available_variants() if registry.get(n).exact)}"
        )
    if spec.data_dependent:
        raise ValueError(
            f"variant {variant!r} chooses what it computes from the inputs, so it has no fixed mask; "
            f"use sla.selection(q, k, {variant!r}, ...).dense() for the entries a call computes"
        )
    resolved = spec.resolve_params(params)
    pattern = spec.mask_fn(nq, nk, causal=causal, **resolved) if spec.mask_fn is not None else None
    mask = full_visibility(nq, nk, causal=causal, key_padding_mask=None, pattern=pattern)
    if mask is None:
        return torch.ones(nq, nk, dtype=torch.bool)
    return mask[0, 0] if mask.shape[1] == 1 else mask[0]
