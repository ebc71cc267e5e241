"""Incremental decoding: a cache per variant, so that token steps equal the one-shot causal call.

    cache = sla.make_cache("sliding_window", batch=2, kv_heads=4, head_dim=64, window=256)
    out = sla.attention(q, k, v, "sliding_window", window=256, causal=True, cache=cache)

``q``, ``k``, ``v`` hold only the new tokens (any count: a prompt, a chunk of one, one token);
the cache is updated in place and positions continue from ``cache.seq_len``. The outputs are
the rows of ``sla.attention(q_all, k_all, v_all, variant, causal=True)`` at those positions.

Each variant names its family in ``VariantSpec.cache_family``; :data:`FAMILIES` maps the name
to the class that keeps what the family needs:

* ``kv`` (``full``, ``dot_product``, ``additive``): every key and value, preallocated with
  ``max_len`` — :mod:`.kv`;
* ``window`` (``sliding_window``): a ring of ``sinks + window`` slots — :mod:`.window`;
* ``block_sparse``: every key and value, attended through the layout's rows — :mod:`.blocks`;
* ``recurrent`` / ``performer`` (``linear``, ``performer``): the state ``[S, z]`` — :mod:`.recurrent`;
* ``block_select`` (``topk_block``, ``hybrid``): every key, pooled keys per block and a block
  selection per query (Quest-style; it approximates the one-shot selection, ``exact = False``)
  — :mod:`.select`.

A new family subclasses :class:`Cache` and is added with :func:`register_cache_family`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from .. import registry
from ..config import AttentionConfig, to_config
from ..errors import CacheError, ParameterError
from .base import Cache, CacheView, attend_one_shot
from .blocks import BlockSparseCache
from .kv import KVCache
from .recurrent import PerformerCache, RecurrentCache
from .select import BlockSelectCache
from .window import WindowCache

#: Cache family name -> its class (``VariantSpec.cache_family`` names one).
FAMILIES: dict[str, type[Cache]] = {
    c.family: c for c in (KVCache, WindowCache, BlockSparseCache, RecurrentCache, PerformerCache, BlockSelectCache)
}


def register_cache_family(name: str, cls: type[Cache], *, overwrite: bool = False) -> None:
    """Make ``cls`` the cache of every variant whose spec has ``cache_family=name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a cache family needs a non-empty name, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Cache)):
        raise TypeError(f"a cache family must be a subclass of sla.Cache, got {cls!r}")
    if name in FAMILIES and not overwrite:
        raise ValueError(f"cache family {name!r} is already registered; pass overwrite=True to replace it.")
    FAMILIES[name] = cls


def _positive(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def decodable_variants() -> list[str]:
    """Registered variants that have a decoding cache."""
    return [n for n in registry.available_variants() if registry.get(n).cache_family in FAMILIES]


def make_cache(
    variant_or_config: str | AttentionConfig | Mapping[str, Any] | os.PathLike,
    *,
    batch: int,
    kv_heads: int,
    head_dim: int,
    value_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_len: int | None = None,
    **params: Any,
) -> Cache:
    """An empty decoding cache for ``batch`` sequences of a variant.

    Args:
        variant_or_config: a variant name, or a config (``AttentionConfig``, mapping or config
            file) whose variant parameters are used; ``**params`` add to or override them.
        batch, kv_heads, head_dim, value_dim: the shapes of the calls' ``k (B, Hkv, T, D)`` and
            ``v (B, Hkv, T, Dv)``; ``value_dim`` defaults to ``head_dim``.
        dtype, device: those of the calls' tensors.
        max_len: positions the cache may reach; a step past it raises. Caches that keep every
            key (``full``, ``block_sparse``) allocate it at once; ``None``: grow as needed.
        **params: the variant's parameters, as given to ``sla.attention``; a call with the
            cache must pass the same ones.
    """
    if isinstance(variant_or_config, str) and not os.path.splitext(variant_or_config)[1]:
        name, given = variant_or_config, dict(params)
    else:
        config = to_config(variant_or_config)
        if not config.causal:
            raise CacheError(
                f"a cache decodes causally, but this {config.variant!r} config has causal=False; "
                f"set causal: true (a cache's calls pass causal=True)"
            )
        name, given = config.variant, {**config.params, **params}
    spec = registry.get(name)
    if "head_dim" in spec.params and "head_dim" not in given:
        # A variant with a head_dim parameter of its own (additive) takes the cache's.
        given["head_dim"] = head_dim
    for n, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim)):
        _positive(n, value)
    value_dim = head_dim if value_dim is None else value_dim
    _positive("value_dim", value_dim)
    _positive("max_len", max_len, allow_none=True)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ParameterError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ParameterError(f"device must be a torch.device or a name such as 'cpu' or 'cuda:0': {e}") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    family = FAMILIES.get(spec.cache_family) if spec.cache_family is not None else None
    if family is None:
        raise CacheError(
            f"variant {name!r} has no decoding cache. Variants with one: {', '.join(decodable_variants())}."
        )
    resolved = spec.resolve_params(given)
    return family(
        spec, resolved, batch=batch, kv_heads=kv_heads, head_dim=head_dim, value_dim=value_dim,
        dtype=dtype, device=device, max_len=max_len,
    )  # fmt: skip


__all__ = [
    "FAMILIES",
    "BlockSelectCache",
    "BlockSparseCache",
    "Cache",
    "CacheView",
    "KVCache",
    "PerformerCache",
    "RecurrentCache",
    "WindowCache",
    "attend_one_shot",
    "decodable_variants",
    "make_cache",
    "register_cache_family",
]
