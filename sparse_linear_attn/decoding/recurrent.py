"""``recurrent`` — linear attention's state, for ``linear`` (every feature map) and ``performer``.

Causal linear attention needs only the sums over past keys: ``S = Σ_j φ(k_j) v_jᵀ`` ``(M, Dv)``
and ``z = Σ_j φ(k_j)`` ``(M,)`` per batch row and key/value head, held together as
``state (B, Hkv, M, Dv + 1)`` (``z`` is the last column) in float32 (float64 for float64
calls). A step of ``T`` tokens runs the variant's own chunkwise kernel
(:func:`~sparse_linear_attn.variants.linear.linear_causal_continue`) from that state:
O(T·(C·M + M·Dv)) time, and memory independent of ``seq_len``.

FAVOR+ shifts key logits by a per-head max so that ``exp`` cannot overflow; the one-shot call
takes that max over all its keys. A stream cannot, so the cache keeps a running max and, when a
new key raises it, multiplies ``S`` and ``z`` by ``exp(old − new)`` (``FeatureMap.extend``).
The shift is a common factor of numerator and normaliser, so outputs equal the one-shot call's
up to rounding. The feature map's context (FAVOR+'s projection, from ``seed``) is made at the
first step, with that call's ``scale``; later calls must use the same scale.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import CacheError
from ..feature_maps import FeatureContext, get_feature_map
from ..variants.linear import linear_causal_continue
from .base import Cache


class RecurrentCache(Cache):
    """``state (B, Hkv, M, Dv + 1)`` = ``[S, z]``, and ``scale``, the scale the state was built
    with (``None`` before the first step). Maps with a key stabiliser (FAVOR+) add ``key_max
    (B, Hkv, 1, 1)``, the running max of the key logits (``−inf`` before the first key)."""

    family = "recurrent"
    _buffers = ("state", "key_max")
    #: The feature map when the variant has no ``feature_map`` parameter (performer: FAVOR+).
    default_feature_map = "elu"

    def __init__(self, spec, params, **kw):
        super().__init__(spec, params, **kw)
        self.fmap = get_feature_map(self.params.get("feature_map", self.default_feature_map))
        self.num_features = int(self.params["num_features"])
        self.work_dtype = torch.promote_types(self.dtype, torch.float32)
        M = self.fmap.dim(self.head_dim, self.num_features)
        self.state = torch.zeros(self.batch, self.kv_heads, M, self.value_dim + 1, dtype=self.work_dtype,
                                 device=self.device)  # fmt: skip
        self.scale: float | None = None
        self._base: FeatureContext | None = None  # the map's context for `scale`, before any key
        probe = self._base_context(1.0)
        self.key_max = None if probe.key_max is None else probe.key_max.clone()

    @property
    def S(self) -> torch.Tensor:
        """``Σ φ(k_j) v_jᵀ`` over the keys so far, ``(B, Hkv, M, Dv)`` (a view)."""
        return self.state[..., :-1]

    @property
    def z(self) -> torch.Tensor:
        """``Σ φ(k_j)`` over the keys so far, ``(B, Hkv, M)`` (a view)."""
        return self.state[..., -1]

    def _base_context(self, scale: float) -> FeatureContext:
        if self._base is None or self._base.scale != scale:
            empty = torch.zeros(self.batch, self.kv_heads, 0, self.head_dim, dtype=self.work_dtype, device=self.device)
            self._base = self.fmap.prepare(
                empty, scale=scale, num_features=self.num_features, seed=int(self.params["seed"]),
                key_padding_mask=None, work_dtype=self.work_dtype,
            )  # fmt: skip
        return self._base

    def _advance(self, p, q, k, v, module):
        if self.scale is not None and p.scale != self.scale and self.seq_len > 0:
            raise CacheError(
                f"this cache's state was built with scale={self.scale}; the call has scale={p.scale} "
                f"(reset() the cache to change it)"
            )
        ctx = self._base_context(p.scale)
        if self.key_max is not None:
            shift = torch.where(torch.isfinite(self.key_max), self.key_max, 0.0)
            ctx = replace(ctx, key_max=self.key_max, key_shift=shift)
        ctx, factor = self.fmap.extend(ctx, k, key_padding_mask=p.key_padding_mask)
        if factor is not None:
            self.state.mul_(factor)
        out, state = linear_causal_continue(
            q, k, v, self.state, fmap=self.fmap, ctx=ctx, key_padding_mask=p.key_padding_mask,
            chunk_size=int(self.params["chunk_size"]),  # clamped to the step's length there
        )  # fmt: skip
        self.state.copy_(state)
        if self.key_max is not None:
            self.key_max = ctx.key_max
        self.scale = p.scale
        return out

    def _clear(self) -> None:
        self.state.zero_()
        if self.key_max is not None:
            self.key_max.fill_(float("-inf"))
        self.scale = None

    def _state_tensors(self):
        out = {"state": self.state, "scale": self.scale}
        if self.key_max is not None:
            out["key_max"] = self.key_max
        return out

    def _load_state_tensors(self, tensors, seq_len):
        scale = tensors["scale"]
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise CacheError(f"state 'scale' must be a number or None, got {scale!r}")
        super()._load_state_tensors({k: t for k, t in tensors.items() if k != "scale"}, seq_len)
        self.scale = None if scale is None else float(scale)


class PerformerCache(RecurrentCache):
    """The ``performer`` variant: ``linear`` with the FAVOR+ feature map."""

    family = "performer"
    default_feature_map = "favor"
