"""``kv`` — every key and value so far, for ``full``, ``dot_product`` and ``additive``.

A step writes the new keys/values (and their padding flags) after the cached ones, then runs the
variant's own causal call of the new queries over all of them: bottom-right alignment makes
query ``t`` of the step sit at position ``seq_len + t``, which is the matching row of the
one-shot call. Memory ``B·Hkv·capacity·(D + Dv)`` elements plus ``B·capacity`` flags: with
``max_len`` the buffers are allocated once at that size; without, they double when full
(amortised O(1) copies per token). A step costs what the variant's call of ``T`` queries over
``seq_len + T`` keys costs: O(T·seq_len·D) for ``full``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..errors import CacheError
from .base import Cache, CacheView, attend_one_shot

#: First allocation of a cache without ``max_len``, in positions.
MIN_CAPACITY = 64


class KVCache(Cache):
    """Keys ``k (B, Hkv, capacity, D)``, values ``v (B, Hkv, capacity, Dv)`` and padding flags
    ``pad (B, capacity)`` (True = padded key), filled up to ``seq_len``."""

    family = "kv"
    _buffers: ClassVar[tuple[str, ...]] = ("k", "v", "pad")

    def __init__(self, spec, params, **kw):
        super().__init__(spec, params, **kw)
        capacity = self.max_len if self.max_len is not None else 0
        self._allocate(capacity)
        # Whether any key stored is padded: without, the variant runs without a mask (its fast path).
        self._padded = False

    def _allocate(self, capacity: int) -> None:
        B, Hkv, dt, dev = self.batch, self.kv_heads, self.dtype, self.device
        self.k = torch.zeros(B, Hkv, capacity, self.head_dim, dtype=dt, device=dev)
        self.v = torch.zeros(B, Hkv, capacity, self.value_dim, dtype=dt, device=dev)
        self.pad = torch.zeros(B, capacity, dtype=torch.bool, device=self.device)

    @property
    def capacity(self) -> int:
        """Positions the buffers hold before they must grow."""
        return self.k.shape[2]

    def _ensure(self, n: int) -> None:
        if n <= self.capacity:
            return
        # Only without max_len (check_call refuses more than max_len): grow geometrically.
        new = max(n, 2 * self.capacity, MIN_CAPACITY)
        used = self.seq_len
        old = (self.k, self.v, self.pad)
        self._allocate(new)
        self.k[:, :, :used] = old[0][:, :, :used]
        self.v[:, :, :used] = old[1][:, :, :used]
        self.pad[:, :used] = old[2][:, :used]

    def _extend(self, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None):
        """Write ``T`` new keys/values after the cached ones and return views of all of them:
        ``(k (B, Hkv, n, D), v (B, Hkv, n, Dv), key_padding_mask (B, n) or None)`` with
        ``n = seq_len + T``. ``seq_len`` itself moves on in ``step``/``append``."""
        n0, T = self.seq_len, k.shape[2]
        self._ensure(n0 + T)
        self.k[:, :, n0 : n0 + T] = k
        self.v[:, :, n0 : n0 + T] = v
        if key_padding_mask is not None:
            self.pad[:, n0 : n0 + T] = key_padding_mask
            self._padded = True
        else:
            self.pad[:, n0 : n0 + T] = False
        n = n0 + T
        return self.k[:, :, :n], self.v[:, :, :n], (self.pad[:, :n] if self._padded else None)

    def _view(self, k, v, key_padding_mask):
        n0 = self.seq_len
        keys, values, kpm = self._extend(k, v, key_padding_mask)
        positions = torch.arange(keys.shape[2], device=self.device)
        visible = positions[None, :] <= torch.arange(n0, n0 + k.shape[2], device=self.device)[:, None]
        return CacheView(keys, values, kpm, positions, visible[None])

    def _advance(self, p, q, k, v, module):
        keys, values, kpm = self._extend(k, v, p.key_padding_mask)
        return attend_one_shot(p, q, keys, values, kpm, module=module)

    def _clear(self) -> None:
        self.pad.zero_()
        self._padded = False

    def _state_tensors(self) -> dict[str, Any]:
        n = self.seq_len
        return {"k": self.k[:, :, :n], "v": self.v[:, :, :n], "pad": self.pad[:, :n]}

    def _load_state_tensors(self, tensors: Mapping[str, Any], seq_len: int) -> None:
        k, v, pad = tensors["k"], tensors["v"], tensors["pad"]
        B = k.shape[0] if isinstance(k, torch.Tensor) else -1
        want = {
            "k": (B, self.kv_heads, seq_len, self.head_dim),
            "v": (B, self.kv_heads, seq_len, self.value_dim),
            "pad": (B, seq_len),
        }
        for name, t in (("k", k), ("v", v), ("pad", pad)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want[name]:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CacheError(f"state tensor {name!r} must have shape {want[name]}, got {got}")
        self.batch = B
        self._allocate(max(seq_len, self.max_len or 0))
        self.k[:, :, :seq_len] = k
        self.v[:, :, :seq_len] = v
        self.pad[:, :seq_len] = pad
        self._padded = bool(pad.any())
