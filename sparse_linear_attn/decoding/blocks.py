"""``block_sparse`` — every key and value, attended through the layout's rows.

The one-shot causal call over ``N`` tokens lets query ``i`` see key ``j ≤ i`` when
``layout[i // block_size, j // block_size]``. Its rows come from
:func:`~sparse_linear_attn.variants.block_sparse.layout_rows`, a function of (query block, key
block) only — bigbird's causal random blocks are drawn per query block — so a step needs the row
of its own query block and nothing about the final length. A user ``layout`` must be square;
it bounds the positions at ``layout blocks · block_size``.

A step of ``T`` tokens is cut at block boundaries: tokens inside one query block gather the keys
of that row's visible blocks and run :func:`~sparse_linear_attn.backends.partial.partial_attention`
over them (O(T·visible·block_size·D)); a run of two or more whole blocks (a long prefill) runs the
variant's own call with those rows as an explicit layout. Memory as the ``kv`` cache (all keys).
"""

from __future__ import annotations

import torch

from ..backends.partial import partial_attention
from ..errors import CacheError
from ..variants.block_sparse import layout_rows
from .base import CacheView, attend_one_shot
from .kv import KVCache


class BlockSparseCache(KVCache):
    """Keys, values and padding flags as :class:`~sparse_linear_attn.decoding.kv.KVCache`."""

    family = "block_sparse"

    def __init__(self, spec, params, **kw):
        lay = params.get("layout")
        if lay is not None:
            lay = torch.as_tensor(lay)
            if lay.shape[-1] != lay.shape[-2]:
                raise CacheError(
                    f"a block_sparse cache needs a square layout (query blocks = key blocks, as in a "
                    f"causal self-attention call), got shape {tuple(lay.shape)}"
                )
        super().__init__(spec, params, **kw)
        self.block_size = int(self.params["block_size"])
        self._layout_blocks = None if lay is None else int(lay.shape[-1])
        self._row_cache: tuple[int, torch.Tensor] | None = None

    def limit(self) -> int | None:
        if self._layout_blocks is None:
            return self.max_len
        by_layout = self._layout_blocks * self.block_size
        return by_layout if self.max_len is None else min(self.max_len, by_layout)

    def _limit_reason(self) -> str:
        if self._layout_blocks is None:
            return super()._limit_reason()
        return f" (the layout covers {self._layout_blocks} blocks of {self.block_size}; max_len={self.max_len})"

    def _check_more(self, call) -> None:
        lay = self.params.get("layout")
        if lay is not None and torch.as_tensor(lay).dim() == 3 and torch.as_tensor(lay).shape[0] != call.heads:
            raise CacheError(f"the per-head layout has {torch.as_tensor(lay).shape[0]} heads but q has {call.heads}")

    def _row(self, block: int) -> torch.Tensor:
        """Row ``block`` of the layout over key blocks ``0 .. block``: ``(nkb,)`` or ``(H, nkb)``."""
        if self._row_cache is None or self._row_cache[0] != block:
            rows = layout_rows(torch.tensor([block]), block + 1, **self.params)
            self._row_cache = (block, rows[..., 0, :].to(self.device))
        return self._row_cache[1]

    def _advance(self, p, q, k, v, module):
        n0, T = self.seq_len, k.shape[2]
        keys, values, kpm = self._extend(k, v, p.key_padding_mask)
        bs, end = self.block_size, n0 + T
        pieces, s = [], n0
        while s < end:
            if s % bs == 0 and end - s > bs:
                # Whole blocks from here on: the variant's own call, with these rows as its layout.
                first, nkb = s // bs, -(-end // bs)
                rows = layout_rows(torch.arange(first, nkb), nkb, **self.params)
                params = {**self.params, "pattern": None, "layout": rows}
                pieces.append(attend_one_shot(p, q[:, :, s - n0 :], keys, values, kpm, module=module, params=params))
                break
            e = min(end, (s // bs + 1) * bs)
            pieces.append(self._block_step(p, q[:, :, s - n0 : e - n0], keys, values, kpm, s, e))
            s = e
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

    def _view(self, k, v, key_padding_mask):
        n0, T, bs = self.seq_len, k.shape[2], self.block_size
        keys, values, kpm = self._extend(k, v, key_padding_mask)
        n, dev = keys.shape[2], self.device
        first, last = n0 // bs, (n0 + T - 1) // bs
        rows = layout_rows(torch.arange(first, last + 1), last + 1, **self.params).to(dev)
        i = torch.arange(n0, n0 + T, device=dev)
        positions = torch.arange(n, device=dev)
        # Row of each query's block, each key block widened to its keys: (1 or H, T, n), O(T·n).
        visible = rows[..., i // bs - first, :].repeat_interleave(bs, -1)[..., :n] & (positions <= i[:, None])
        return CacheView(keys, values, kpm, positions, visible if visible.dim() == 3 else visible[None])

    def _block_step(self, p, q, keys, values, kpm, s: int, e: int) -> torch.Tensor:
        """Queries at positions ``s .. e − 1``, all in one block, over that row's visible keys."""
        bs, dev = self.block_size, q.device
        row = self._row(s // bs)
        seen = row.any(0) if row.dim() == 2 else row
        blocks = seen.nonzero()[:, 0]
        j = (blocks[:, None] * bs + torch.arange(bs, device=dev)).flatten()
        j = j[j < e]  # keys after the last query do not exist yet
        i = torch.arange(s, e, device=dev)
        mask = (j[None, :] <= i[:, None])[None, None]  # (1, 1, T, L)
        if row.dim() == 2:  # per head: (1, H, 1, L)
            mask = mask & row[:, j // bs][None, :, None, :]
        if kpm is not None:
            mask = mask & ~kpm[:, j][:, None, None, :]
        out, _ = partial_attention(q, keys.index_select(2, j), values.index_select(2, j), scale=p.scale, mask=mask)
        return out.to(q.dtype)
