"""``window`` — a ring buffer of ``sinks + window`` slots for ``sliding_window``.

A causal query at position ``i`` sees keys ``i − window .. i`` and, with ``sinks``, keys
``0 .. sinks − 1``. So the cache keeps the first ``sinks`` keys in slots of their own and the
last ``window`` keys in a ring (position ``t ≥ sinks`` in slot ``sinks + (t − sinks) mod
window``): memory ``B·Hkv·(sinks + window)·(D + Dv)`` elements whatever the length.

A step of ``T`` new tokens at positions ``p .. p + T − 1`` lays out, in order, the sink keys,
the ring's keys (positions ``max(sinks, p − window) .. p − 1``) and the new keys, and runs the
variant's own causal call over that sequence. Its band and sink rules, applied to indices in this
shorter sequence, select exactly the keys the one-shot call selects: the band is invariant to a
shift of both query and key positions, and the sink keys keep their indices ``0 .. sinks − 1``
(until the ring starts after them, the sequence is simply positions ``0 .. p + T − 1``). A
one-token step sees every key kept, so it runs :func:`~sparse_linear_attn.backends.partial.partial_attention`
over them directly. Cost per step O(T·(sinks + window + T)·D) at most, independent of ``seq_len``.
"""

from __future__ import annotations

import torch

from ..backends.partial import partial_attention
from .base import Cache, CacheView, attend_one_shot


class WindowCache(Cache):
    """Slots ``k (B, Hkv, sinks + window, D)``, ``v (B, Hkv, sinks + window, Dv)`` and padding
    flags ``pad (B, sinks + window)``; ``sinks`` is 0 when the variant has no such parameter."""

    family = "window"
    _buffers = ("k", "v", "pad")

    def __init__(self, spec, params, **kw):
        super().__init__(spec, params, **kw)
        self.window = int(self.params["window"])
        self.sinks = int(self.params.get("sinks", 0) or 0)
        slots = self.sinks + self.window
        B, Hkv, dt, dev = self.batch, self.kv_heads, self.dtype, self.device
        self.k = torch.zeros(B, Hkv, slots, self.head_dim, dtype=dt, device=dev)
        self.v = torch.zeros(B, Hkv, slots, self.value_dim, dtype=dt, device=dev)
        self.pad = torch.zeros(B, slots, dtype=torch.bool, device=self.device)
        self._padded = False

    def _slots(self, start: int, stop: int) -> torch.Tensor:
        """Slots of positions ``start .. stop − 1`` (each either a sink or in the ring)."""
        t = torch.arange(start, stop, device=self.device)
        s, w = self.sinks, self.window
        return torch.where(t < s, t, s + (t - s) % max(w, 1))

    def kept(self) -> tuple[int, int, int]:
        """Positions held now: sinks ``0 .. a − 1`` and the ring's ``b .. seq_len − 1``, as
        ``(a, b, seq_len)``."""
        p = self.seq_len
        a = min(self.sinks, p)  # fewer than ``sinks`` positions so far: all of them are sinks
        return a, max(a, p - self.window), p

    def _gather(self, k, v, given):
        """The kept keys then the new ones, in position order: ``(keys, values, kpm or None,
        new_pad, positions)``."""
        pos, T = self.seq_len, k.shape[2]
        a, b, _ = self.kept()
        idx = torch.cat([self._slots(0, a), self._slots(b, pos)])
        keys = torch.cat([self.k.index_select(2, idx), k], dim=2)
        values = torch.cat([self.v.index_select(2, idx), v], dim=2)
        new_pad = given if given is not None else torch.zeros(k.shape[0], T, dtype=torch.bool, device=k.device)
        self._padded = self._padded or given is not None
        kpm = torch.cat([self.pad.index_select(1, idx), new_pad], dim=1) if self._padded else None
        dev = self.device
        positions = torch.cat([torch.arange(a, device=dev), torch.arange(b, pos + T, device=dev)])
        return keys, values, kpm, new_pad, positions

    def _store(self, k, v, new_pad) -> None:
        """Keep the new positions that stay: sinks, and the last ``window`` of the others."""
        pos, T = self.seq_len, k.shape[2]
        first_kept = max(pos, pos + T - self.window) if self.window else pos + T
        for lo, hi in ((pos, min(pos + T, self.sinks)), (max(first_kept, self.sinks), pos + T)):
            if lo < hi:
                slots = self._slots(lo, hi)
                self.k.index_copy_(2, slots, k[:, :, lo - pos : hi - pos])
                self.v.index_copy_(2, slots, v[:, :, lo - pos : hi - pos])
                self.pad.index_copy_(1, slots, new_pad[:, lo - pos : hi - pos])

    def _advance(self, p, q, k, v, module):
        keys, values, kpm, new_pad, _ = self._gather(k, v, p.key_padding_mask)
        if k.shape[2] == 1:
            # The ring holds exactly the keys a lone new query sees (the band before it and the
            # sinks), so it attends to all of them, padding aside: no band to apply.
            mask = None if kpm is None else ~kpm[:, None, None, :]
            out = partial_attention(q, keys, values, scale=p.scale, mask=mask)[0].to(q.dtype)
        else:
            out = attend_one_shot(p, q, keys, values, kpm, module=module)
        self._store(k, v, new_pad)
        return out

    def _view(self, k, v, key_padding_mask):
        keys, values, kpm, new_pad, positions = self._gather(k, v, key_padding_mask)
        self._store(k, v, new_pad)
        # The variant's own mask over this shorter sequence selects what the one-shot call does.
        mask_fn = self.spec.mask_fn
        assert mask_fn is not None  # sliding_window has one
        visible = mask_fn(k.shape[2], keys.shape[2], causal=True, **self.params)
        return CacheView(keys, values, kpm, positions, visible.to(self.device)[None])

    def _clear(self) -> None:
        self.pad.zero_()
        self._padded = False

    def _load_state_tensors(self, tensors, seq_len):
        super()._load_state_tensors(tensors, seq_len)
        self._padded = bool(self.pad.any())
