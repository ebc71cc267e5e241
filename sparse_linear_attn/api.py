"""The public calls: ``attention``, ``build`` and ``dense_mask``."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from . import registry
from .backends.dispatch import select_backend
from .backends.flex import FlexCacheFull
from .config import AttentionConfig, to_config
from .errors import ParameterError
from .inputs import check_inputs, full_visibility, make_call, repeat_kv


def _resolve_scale(spec: registry.VariantSpec, scale: float | None, head_dim: int) -> float:
    if scale is None:
        return spec.default_scale if spec.default_scale is not None else 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ParameterError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def _check_supports(spec: registry.VariantSpec, call) -> None:
    s = spec.supports
    problems = []
    if call.causal and not s.causal:
        problems.append("causal=True")
    if call.cross and not s.cross_attention:
        problems.append(f"cross-attention (Nq={call.nq} != Nk={call.nk})")
    if call.key_padding and not s.key_padding:
        problems.append("key_padding_mask")
    if call.return_weights and not s.weights:
        problems.append("return_weights=True")
    if call.heads != call.kv_heads and not s.grouped_query:
        problems.append(f"grouped-query heads (H={call.heads}, Hkv={call.kv_heads})")
    if problems:
        raise ValueError(f"variant {spec.name!r} does not support {', '.join(problems)}")


def _check_causal(causal: Any) -> bool:
    # numpy.bool_ is not a bool subclass but is what values read through numpy often are.
    if isinstance(causal, (bool, np.bool_)):
        return bool(causal)
    raise ParameterError(f"causal must be True or False, got {causal!r} ({type(causal).__name__})")


def _empty_result(q, k, v, return_weights):
    """Nothing to attend with or to: zeros of the right shapes (a query seeing no key gives zeros)."""
    B, H, Nq, _ = q.shape
    # Empty sums keep the graph to q, k, v (zero gradients) without 0·inf = NaN from their values.
    link = q.narrow(-1, 0, 0).sum(-1, keepdim=True) + k.narrow(2, 0, 0).sum() + v.narrow(2, 0, 0).sum()
    out = q.new_zeros(B, H, Nq, v.shape[-1]) + link
    return (out, q.new_zeros(B, H, Nq, k.shape[2])) if return_weights else out


def _run(
    spec: registry.VariantSpec,
    q,
    k,
    v,
    *,
    causal,
    key_padding_mask,
    scale,
    return_weights,
    backend,
    params,
    module=None,
):
    causal = _check_causal(causal)
    check_inputs(q, k, v, key_padding_mask)
    call = make_call(q, k, v, causal=causal, key_padding_mask=key_padding_mask, return_weights=return_weights)
    _check_supports(spec, call)
    scale = _resolve_scale(spec, scale, q.shape[-1])
    if q.numel() == 0 or k.shape[2] == 0:
        return _empty_result(q, k, v, return_weights)
    if module is not None:
        if backend not in ("auto", "module"):
            raise ParameterError(
                f"variant {spec.name!r} is an nn.Module with learned parameters; its only backend is "
                f"'module' (or 'auto'), got backend={backend!r}"
            )
        if spec.user_defined:
            k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
            kwargs = dict(causal=causal, key_padding_mask=key_padding_mask, scale=scale)
            if return_weights:
                return module(q, k, v, return_weights=True, **kwargs)
            return module(q, k, v, **kwargs)
        return module(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, return_weights=return_weights
        )
    name = select_backend(spec, call, params, backend)
    kwargs = dict(causal=causal, key_padding_mask=key_padding_mask, scale=scale, return_weights=return_weights)
    try:
        out, weights = _call_impl(spec.impls[name], q, k, v, kwargs, params)
    except FlexCacheFull:
        if backend != "auto":
            raise
        # auto chose Flex, whose compiled graphs are now at their limit: from here on
        # select_backend rules it out, so the next backend in the table runs this call.
        out, weights = _call_impl(spec.impls[select_backend(spec, call, params, backend)], q, k, v, kwargs, params)
    return (out, weights) if return_weights else out


def _call_impl(impl: registry.Impl, q, k, v, kwargs, params):
    if not impl.grouped_query:
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    return impl.fn(q, k, v, **kwargs, **params)


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
        **params: the variant's own parameters (``sla.describe(variant).params``).

    Returns:
        ``out`` of shape ``(B, H, Nq, Dv)`` in the input dtype, or ``(out, weights)``.
    """
    spec = registry.get(variant)
    if spec.module is not None:
        module = spec.module(**spec.resolve_params(params))
        if any(True for _ in module.parameters()):
            raise ValueError(
                f"variant {variant!r} has learned parameters; sla.attention cannot own them. Use "
                f"sla.build({{'variant': {variant!r}, ...}}) to get an nn.Module and call that."
            )
        module = module.to(q.device)
    else:
        module = None
    resolved = spec.resolve_params(params)
    return _run(
        spec,
        q,
        k,
        v,
        causal=causal,
        key_padding_mask=key_padding_mask,
        scale=scale,
        return_weights=return_weights,
        backend=backend,
        params=resolved,
        module=module,
    )


class AttentionModule(nn.Module):
    """An attention variant as an ``nn.Module`` (what ``sla.build`` returns).

    ``forward(q, k, v, *, key_padding_mask=None, return_weights=False)`` behaves as
    ``sla.attention(q, k, v, **config)``. Variants with learned parameters hold them in
    ``self.impl``.
    """

    def __init__(self, config: AttentionConfig):
        super().__init__()
        self.config = config
        self.spec = registry.get(config.variant)
        self.params = self.spec.resolve_params(config.params)
        self.impl = self.spec.module(**self.params) if self.spec.module is not None else None
        if self.impl is not None and config.backend not in ("auto", "module"):
            raise ParameterError(
                f"variant {self.spec.name!r} is an nn.Module with learned parameters; its only backend "
                f"is 'module' (or 'auto'), got backend={config.backend!r}"
            )
        if self.spec.module is None and config.backend != "auto":
            from .backends.dispatch import BACKENDS
            from .errors import BackendUnavailableError, unknown_name_message

            if config.backend not in BACKENDS:
                raise BackendUnavailableError(unknown_name_message("backend", config.backend, ["auto", *BACKENDS]))
            if config.backend not in self.spec.impls:
                raise BackendUnavailableError(
                    f"variant {self.spec.name!r} has no {config.backend!r} backend; it has: "
                    f"{', '.join(self.spec.impls)} (or 'auto')."
                )

    def forward(self, q, k, v, *, key_padding_mask=None, return_weights=False):
        c = self.config
        return _run(
            self.spec,
            q,
            k,
            v,
            causal=c.causal,
            key_padding_mask=key_padding_mask,
            scale=c.scale,
            return_weights=return_weights,
            backend=c.backend,
            params=self.params,
            module=self.impl,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items())


def build(config: AttentionConfig | Mapping[str, Any] | str | os.PathLike) -> AttentionModule:
    """An ``nn.Module`` running the configured variant.

    ``config`` is a flat mapping such as ``{"variant": "sliding_window", "window": 256,
    "causal": True}`` (keys ``variant``, ``causal``, ``scale``, ``backend`` plus the variant's
    parameters), an :class:`AttentionConfig`, or a path to a ``.json``/``.yaml``/``.yml``/
    ``.toml`` file holding that mapping. Everything is validated here, before any forward.
    """
    return AttentionModule(to_config(config))


def dense_mask(variant: str, nq: int, nk: int, *, causal: bool = False, **params: Any) -> torch.Tensor:
    """The bool mask ``(nq, nk)`` (or ``(H, nq, nk)`` for per-head layouts) an exact variant uses.

    True where query ``i`` may attend to key ``j``. O(nq·nk): for inspection, tests and plots.
    """
    spec = registry.get(variant)
    for name, n in (("nq", nq), ("nk", nk)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if not spec.exact:
        raise ValueError(
            f"variant {variant!r} is not an exact pattern of softmax attention, so it has no dense mask; "
            f"variants with one: {', '.join(n for n in registry.available_variants() if registry.get(n).exact)}"
        )
    resolved = spec.resolve_params(params)
    pattern = spec.mask_fn(nq, nk, causal=causal, **resolved) if spec.mask_fn is not None else None
    mask = full_visibility(nq, nk, causal=causal, key_padding_mask=None, pattern=pattern)
    if mask is None:
        return torch.ones(nq, nk, dtype=torch.bool)
    return mask[0, 0] if mask.shape[1] == 1 else mask[0]
