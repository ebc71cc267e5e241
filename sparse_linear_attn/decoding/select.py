"""``block_select`` — every key, pooled keys per block and a selection per query, for
``topk_block`` and ``hybrid``.

The one-shot variants choose key blocks per *query block*, from an estimator over the whole
call. A cache sees one token (or one chunk) at a time, so it selects per *query*, Quest-style,
from what it keeps: for query ``i`` in block ``c = i // bs`` (``bs = block_size``),

* complete blocks ``b < c`` are scored from their pooled keys ``k̄_b`` (the mean of their
  unpadded keys) and key counts ``n_b``: per query head ``softmax_b(scale·q_i·k̄_b + log n_b)``,
  summed over the query heads of each kv head (they share one selection, as in the one-shot
  call) — ``key_pool``'s rule with a window of this one query;
* the current block ``c`` (incomplete, or completed by ``i`` itself), the ``sink_blocks`` first
  blocks and the ``local_blocks`` blocks ending at ``c`` are always kept;
* then the variant's budget, exactly as in the one-shot call
  (:func:`~sparse_linear_attn.selection.choose_blocks`): ``density`` keeps ``max(1, ⌈density·R⌉)``
  blocks, ``R`` the blocks holding an unpadded key at or before ``i``; ``mass`` the fewest whose
  scores reach that share; forced blocks count toward it.

The query then attends exactly over the keys ``j ≤ i`` of its blocks (padded keys excluded).
``hybrid`` adds, as its one-shot definition does, one pseudo-key per group of the query block's
row (:func:`~sparse_linear_attn.variants.hybrid.remainder_groups`: chunks of
``remainder_block`` keys left of the local zone, coarsened dyadically) with logit
``scale·q·mean(k_G) + log|G|`` and value ``mean(v_G)`` over the group's unselected, unpadded
keys, merged with the exact part by log-sum-exp.

**Not the one-shot selection.** The one-shot call scores a query block once, from the ``bs``
queries ending at its first query and the variant's ``estimator``; a step scores each query from
its own vector and pooled keys (``estimator``, ``stride`` and ``selection`` are not used), so
outputs approximate the one-shot call rather than equal it (``exact = False``; docs/decoding.md
measures the gap). They are equal when the selection does not depend on scores — a budget that
keeps every reachable block (``density=1``: full attention), or one that keeps only the forced
blocks — and the tests hold both to the one-shot call. A query's selection depends only on the
keys at or before it, so any split of a sequence into calls (a prompt, chunks, one token at a
time) gives the same outputs and the same state.

State, preallocated with ``max_len`` (without it, doubled when full and the summaries rebuilt):
the keys, values and padding flags (``kv``'s), ``pooled (B, Hkv, blocks, D)`` and ``counts
(B, blocks)`` in float32 (float64 for float64 calls), and for ``hybrid`` the sums of keys, values
and unpadded counts over every aligned run of ``2^ℓ`` chunks (``chunk_k``, ``chunk_v``,
``chunk_n``: dyadic tables, twice the chunks' size), so a group's sums are one lookup. A step
recomputes the summaries of the blocks and chunks its tokens touch (a block's are final once it
is complete) and the dyadic sums above them: O(T·D + bs·D + log(n)·D).

Cost of a step of ``T`` tokens at context ``n``: scoring O(T·H·(n/bs)·D); the exact part
O(T·H·kept·bs·D), ``kept`` the selected blocks (a chunk's queries of one block gather the union
of their selections once, each masked to its own); hybrid's pseudo-keys O(T·H·S·(D + Dv)) with
``S ≈ remainder_near·log₂(n)``. No ``n × n`` tensor: score tiles are bounded by
:data:`STEP_ELEMENTS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..backends.math import masked_softmax
from ..backends.partial import merge_partials
from ..errors import CacheError
from ..estimators import block_sums, num_blocks, pooled_keys
from ..selection import choose_blocks
from ..variants.hybrid import compressed_rows, remainder_groups, slot_of_chunk
from ..variants.topk_block import DEFAULT_DENSITY
from .kv import KVCache

#: Score elements (batch · query heads · queries · keys) of one exact tile of a step; a chunk
#: whose queries would need more is cut into smaller runs of queries.
STEP_ELEMENTS = 1 << 24


class BlockSelectCache(KVCache):
    """Keys, values and padding flags as :class:`~sparse_linear_attn.decoding.kv.KVCache`, plus
    ``pooled (B, Hkv, blocks, D)`` (each block's mean unpadded key) and ``counts (B, blocks)``;
    ``hybrid`` adds the dyadic sum tables ``chunk_k``, ``chunk_v``, ``chunk_n`` (module docstring).

    Steps select key blocks per query from the pooled keys: they approximate the one-shot call,
    they do not equal it (``exact = False``). :meth:`step_selection` shows what they select.
    """

    family = "block_select"
    exact = False
    _buffers: ClassVar[tuple[str, ...]] = ("k", "v", "pad", "pooled", "counts", "chunk_k", "chunk_v", "chunk_n")
    #: Tensors of :meth:`state_dict` that are recomputed from ``k``, ``v``, ``pad`` on load.
    derived = ("pooled", "counts", "chunk_k", "chunk_v", "chunk_n")

    def __init__(self, spec, params, **kw):
        # Read before KVCache.__init__, which allocates through _allocate.
        self.block_size = int(params["block_size"])
        self.compressed = params.get("remainder", "none") != "none"
        self.chunk = int(params.get("remainder_block") or self.block_size)
        self.work_dtype = torch.promote_types(kw["dtype"], torch.float32)
        self._row_groups_cache: tuple[int, Any] | None = None
        self._workspace: list[torch.Tensor | None] = [None, None]  # gathered keys, values
        super().__init__(spec, params, **kw)

    # ---- buffers ----------------------------------------------------------------------------
    def _allocate(self, capacity: int) -> None:
        # Whole blocks, so that a step gathers keys a block (one contiguous row) at a time.
        super()._allocate(num_blocks(capacity, self.block_size) * self.block_size)
        B, Hkv, D, Dv = self.batch, self.kv_heads, self.head_dim, self.value_dim
        w, dev = self.work_dtype, self.device
        nkb = num_blocks(capacity, self.block_size)
        self.pooled = torch.zeros(B, Hkv, nkb, D, dtype=w, device=dev)
        self.counts = torch.zeros(B, nkb, dtype=w, device=dev)
        self._row_groups_cache = None  # table offsets change with the capacity
        self.chunk_k: torch.Tensor | None = None
        self.chunk_v: torch.Tensor | None = None
        self.chunk_n: torch.Tensor | None = None
        if not self.compressed:
            return
        nc = num_blocks(capacity, self.chunk)
        ncp = 1 << max(0, (nc - 1).bit_length())  # chunks rounded up to a power of two
        sizes = [ncp >> level for level in range(ncp.bit_length())]
        self._offsets = [sum(sizes[:level]) for level in range(len(sizes))]
        # The tables' last row stays zero: slots without a group read it.
        self._zero_row = sum(sizes)
        self.chunk_k = torch.zeros(B, Hkv, self._zero_row + 1, D, dtype=w, device=dev)
        self.chunk_v = torch.zeros(B, Hkv, self._zero_row + 1, Dv, dtype=w, device=dev)
        self.chunk_n = torch.zeros(B, self._zero_row + 1, dtype=w, device=dev)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hybrid``'s ``(chunk_k, chunk_v, chunk_n)`` (only when ``compressed``)."""
        assert self.chunk_k is not None and self.chunk_v is not None and self.chunk_n is not None
        return self.chunk_k, self.chunk_v, self.chunk_n

    def _ensure(self, n: int) -> None:
        if n <= self.capacity:
            return
        super()._ensure(n)  # new, larger buffers; keys copied, summaries rebuilt from them
        self._summarise(0, self.seq_len)

    def _clear(self) -> None:
        super()._clear()
        # Keys too: a step reads the current block whole (masking what is not there yet).
        for t in (self.k, self.v, self.pooled, self.counts, self.chunk_k, self.chunk_v, self.chunk_n):
            if t is not None:
                t.zero_()

    def _summarise(self, lo: int, hi: int) -> None:
        """Recompute the summaries of the blocks and chunks holding positions ``lo .. hi − 1``
        from the stored keys (positions from ``hi`` on are not read)."""
        if hi <= lo:
            return
        w, bs = self.work_dtype, self.block_size
        s = lo // bs * bs
        pooled, count = pooled_keys(self.k[:, :, s:hi].to(w), bs, self.pad[:, s:hi])
        b0, b1 = s // bs, s // bs + count.shape[1]
        self.counts[:, b0:b1] = count
        self.pooled[:, :, b0:b1] = pooled
        if not self.compressed:
            return
        ck, cv, cn = self._tables()
        r = self.chunk
        s = lo // r * r
        keep = (~self.pad[:, s:hi]).to(w)
        c0 = s // r
        kk = block_sums(self.k[:, :, s:hi].to(w), r, keep)
        c1 = c0 + kk.shape[2]
        ck[:, :, c0:c1] = kk
        cv[:, :, c0:c1] = block_sums(self.v[:, :, s:hi].to(w), r, keep)
        cn[:, c0:c1] = block_sums(keep[:, None, :, None], r)[:, 0, :, 0]
        for level in range(1, len(self._offsets)):
            prev, off = self._offsets[level - 1], self._offsets[level]
            u0, u1 = c0 >> level, (c1 - 1) >> level
            a, b = prev + 2 * u0, prev + 2 * u1 + 2
            for t in (ck, cv):
                t[:, :, off + u0 : off + u1 + 1] = t[:, :, a:b:2] + t[:, :, a + 1 : b : 2]
            cn[:, off + u0 : off + u1 + 1] = cn[:, a:b:2] + cn[:, a + 1 : b : 2]

    # ---- state ------------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, Any]:
        n = self.seq_len
        out = super()._state_tensors()
        nb = num_blocks(n, self.block_size)
        out["pooled"], out["counts"] = self.pooled[:, :, :nb], self.counts[:, :nb]
        if self.compressed:
            nc = num_blocks(n, self.chunk)  # the chunks' sums (level 0 of the tables)
            ck, cv, cn = self._tables()
            out["chunk_k"], out["chunk_v"], out["chunk_n"] = ck[:, :, :nc], cv[:, :, :nc], cn[:, :nc]
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """As :meth:`Cache.load_state_dict`; the summaries (``pooled``, ``counts``, ``chunk_*``)
        are recomputed from ``k``, ``v`` and ``pad``, so a state may also leave them out."""
        if isinstance(state, Mapping) and not set(self.derived) & set(state):
            state = {**state, **{n: None for n in self.derived if n in self.state_dict()}}
        super().load_state_dict(state)

    def _load_state_tensors(self, tensors: Mapping[str, Any], seq_len: int) -> None:
        super()._load_state_tensors({n: tensors[n] for n in ("k", "v", "pad")}, seq_len)
        self._summarise(0, seq_len)

    def _view(self, k, v, key_padding_mask):
        raise CacheError(
            f"a {self.variant!r} cache selects key blocks from each query, so it has no fixed "
            "visibility to show for a caller's dense path (a score bias such as ALiBi needs an exact "
            "variant with a fixed pattern)"
        )

    # ---- the step ---------------------------------------------------------------------------
    def _advance(self, p, q, k, v, module):
        n0, T = self.seq_len, k.shape[2]
        self._extend(k, v, p.key_padding_mask)
        self._summarise(n0, n0 + T)
        out = q.new_empty(q.shape[0], q.shape[1], T, self.value_dim)
        for s, e in self._runs(n0, n0 + T, q.shape[1]):
            out[:, :, s - n0 : e - n0] = self._attend(q[:, :, s - n0 : e - n0], s, e, p.scale)
        if T > 1:
            # A chunk's queries gather the union of their selections, up to every cached key:
            # a workspace that size would outlive the prompt at the size of ``k`` and ``v``.
            self._workspace = [None, None]
        return out

    def _runs(self, start: int, stop: int, heads: int):
        """Positions ``start .. stop − 1`` cut at block boundaries, and further so that an exact
        tile over every key before the run stays within :data:`STEP_ELEMENTS`."""
        bs, s = self.block_size, start
        while s < stop:
            e = min(stop, (s // bs + 1) * bs)
            width = max(1, STEP_ELEMENTS // (self.batch * heads * e))
            e = min(e, s + width)
            yield s, e
            s = e

    def _attend(self, q: torch.Tensor, s: int, e: int, scale: float) -> torch.Tensor:
        """Queries at positions ``s .. e − 1`` (one block, keys cached): ``(B, H, T, Dv)``."""
        B, H, T, _ = q.shape
        sel = self._select(q, s, e, scale)
        out, lse = self._exact(q, sel, s, e, scale)
        if self.compressed:
            rest, lse_rest = self._compressed(q, sel, s, scale)
            out, _ = merge_partials(out, lse, rest, lse_rest, inplace=True)
        return out.reshape(B, H, T, self.value_dim).to(q.dtype)

    def _select(self, q: torch.Tensor, s: int, e: int, scale: float) -> torch.Tensor:
        """Bool ``(B, Hkv, T, c + 1)``: the blocks each query at ``s .. e − 1`` (all in block
        ``c``) keeps, by the rule of the module docstring."""
        B, H, T, D = q.shape
        Hkv, bs, w = self.kv_heads, self.block_size, self.work_dtype
        G, c = H // Hkv, s // bs
        dev = self.device
        scores = torch.zeros(B, Hkv, T, c + 1, dtype=w, device=dev)
        count = self.counts[:, :c]
        if c > 0:
            logits = torch.matmul(q.to(w).reshape(B, Hkv, G * T, D), self.pooled[:, :, :c].transpose(-1, -2))
            logits.mul_(scale).add_(count.clamp_min(1.0).log()[:, None, None, :])
            prob = masked_softmax(logits, (count > 0)[:, None, None, :])  # all padded: zeros
            scores[..., :c] = prob.view(B, Hkv, G, T, c).sum(2)
        if self._padded:
            # Blocks before c: any unpadded key; block c: one at or before the query.
            kept = (~self.pad[:, c * bs : e]).cumsum(-1)[:, s - c * bs :] > 0  # (B, T)
            reach = torch.cat([(count > 0)[:, None, :].expand(B, T, c), kept[..., None]], -1)[:, None]
        else:
            reach = torch.ones(1, 1, T, c + 1, dtype=torch.bool, device=dev)
        b = torch.arange(c + 1, device=dev)
        forced = (b < self.params["sink_blocks"]) | (b > c - self.params["local_blocks"]) | (b == c)
        density, mass = self.params["density"], self.params["mass"]
        if density is None and mass is None:
            density = DEFAULT_DENSITY
        return choose_blocks(scores, reach, forced, density=density, mass=mass)

    def _exact(self, q, sel, s: int, e: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax of each query over the keys ``j ≤ i`` of its selected blocks: ``out (B, Hkv,
        G, T, Dv)`` and ``lse (B, Hkv, G, T)`` in the work dtype.

        The run's queries share one gather: the union of their selected complete blocks, then the
        current block's keys up to the run's end. Complete blocks are masked per (query, block)
        only — all their keys precede every query — and causality applies to the current block.
        """
        B, H, T, D = q.shape
        Hkv, bs, Dv, w, dev = self.kv_heads, self.block_size, self.value_dim, self.work_dtype, self.device
        G, c = H // Hkv, s // bs
        before = sel[..., :c]  # (B, Hkv, T, c)
        union = before.any(2)
        nu = int(union.sum(-1).max()) if c else 0
        if nu == c:  # every complete block: the cached keys in place
            keys, values = self.k[:, :, :e], self.v[:, :, :e]
            picked = before
            pad = self.pad[:, None, None, None, :e] if self._padded else None
            current_keys = torch.arange(c * bs, e, device=dev)
        else:
            blocks = torch.sort(union.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :nu]
            picked = before.gather(-1, blocks[:, :, None, :].expand(B, Hkv, T, nu))  # False past a short union
            blocks = torch.cat([blocks, blocks.new_full((B, Hkv, 1), c)], -1)  # and the current one, whole
            nbc = self.capacity // bs
            rows = (torch.arange(B * Hkv, device=dev).view(B, Hkv, 1) * nbc + blocks).flatten()
            keys = self._gather(self.k, rows, 0).view(B, Hkv, -1, D)
            values = self._gather(self.v, rows, 1).view(B, Hkv, -1, Dv)
            pad = None
            if self._padded:
                pad = self.pad.view(B, nbc, bs)[torch.arange(B, device=dev)[:, None, None], blocks]
                pad = pad.view(B, Hkv, 1, 1, -1)
            current_keys = torch.arange(c * bs, (c + 1) * bs, device=dev)  # those past e: after every query
        P = nu * bs
        sc = torch.matmul(q.to(w).reshape(B, Hkv, G * T, D), keys.to(w).transpose(-1, -2)).mul_(scale)
        sc = sc.view(B, Hkv, G, T, -1)
        sc[..., :P].view(B, Hkv, G, T, nu, bs).masked_fill_(~picked[:, :, None, :, :, None], float("-inf"))
        i = torch.arange(s, e, device=dev)[:, None]
        current = sel[..., c:] & (current_keys <= i)  # (B, Hkv, T, keys of block c)
        sc[..., P:].masked_fill_(~current[:, :, None], float("-inf"))
        if pad is not None:
            sc.masked_fill_(pad, float("-inf"))
        # In place, as backends/tiles.py: lse = max s − log(max p), with max p ≥ 1/L.
        top = sc.amax(-1)
        seen = torch.isfinite(top)
        everyone = bool(seen.all())
        if not everyone:  # rows that see no key: softmax of zeros, dropped below
            sc.masked_fill_(~seen[..., None], 0.0)
        torch.softmax(sc, dim=-1, out=sc)
        out = torch.matmul(sc.view(B, Hkv, G * T, -1), values.to(w)).view(B, Hkv, G, T, Dv)
        lse = top - sc.amax(-1).log()
        if not everyone:
            out.masked_fill_(~seen[..., None], 0.0)
            lse.masked_fill_(~seen, float("-inf"))
        return out, lse

    def _gather(self, t: torch.Tensor, rows: torch.Tensor, slot: int) -> torch.Tensor:
        """Blocks ``rows`` of ``t (B, Hkv, capacity, E)`` viewed as ``(B·Hkv·blocks, bs·E)``, copied
        into workspace ``slot``: a buffer kept between one-token steps (grown ×2 when short, never
        past ``t``'s size; dropped after a multi-token call), because a fresh buffer of tens of MiB
        per step costs a page fault per 4 KiB (measured: 33K faults and a third of a 64K-token,
        B=8 step)."""
        width = self.block_size * t.shape[-1]
        need = rows.numel() * width
        buf = self._workspace[slot]
        if buf is None or buf.numel() < need or buf.dtype != t.dtype or buf.device != t.device:
            grown = min(2 * buf.numel(), t.numel()) if buf is not None else 0
            buf = torch.empty(max(need, grown), dtype=t.dtype, device=t.device)
            self._workspace[slot] = buf
        out = buf[:need].view(rows.numel(), width)
        return torch.index_select(t.view(-1, width), 0, rows, out=out)

    @property
    def workspace_bytes(self) -> int:
        """Bytes of the gather workspace (outside :attr:`nbytes`: not state, and not saved): the
        selected keys and values of the largest one-token step since the last multi-token call,
        up to twice that."""
        return sum(b.numel() * b.element_size() for b in self._workspace if b is not None)

    def _row_groups(self, c: int):
        """``hybrid``'s groups of query block ``c`` as table rows: ``(rows (S,), slot of each
        chunk left of the local zone (left,), left)``, ``left`` in chunks."""
        if self._row_groups_cache is not None and self._row_groups_cache[0] == c:
            return self._row_groups_cache[1]
        bs, dev = self.block_size, self.device
        groups = remainder_groups(
            bs, (c + 1) * bs, bs, causal=True, local_blocks=self.params["local_blocks"], chunk=self.chunk,
            near=self.params["remainder_near"], device=dev,
        )  # fmt: skip
        valid = groups.valid[0]
        left = int(groups.left[0, 0])
        used = valid.nonzero()
        S = int(used.max()) + 1 if used.numel() else 0
        offsets = torch.tensor(self._offsets, device=dev)
        rows = torch.where(valid, offsets[groups.level[0]] + groups.unit[0], self._zero_row)[:S]
        chunks = torch.arange(left, device=dev)
        slots = slot_of_chunk(groups, torch.zeros_like(chunks), chunks)
        self._row_groups_cache = (c, (rows, slots, left))
        return rows, slots, left

    def _compressed(self, q, sel, s: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``hybrid``'s pseudo-keys: softmax of each query over its row's groups, each without
        the keys this query selected: ``out (B, Hkv, G, T, Dv)``, ``lse (B, Hkv, G, T)``."""
        B, H, T, D = q.shape
        Hkv, Dv, w = self.kv_heads, self.value_dim, self.work_dtype
        G, c = H // Hkv, s // self.block_size
        rows, slots, left = self._row_groups(c)
        S = rows.numel()
        if S == 0:
            return (torch.zeros(B, Hkv, G, T, Dv, dtype=w, device=self.device),
                    torch.full((B, Hkv, G, T), float("-inf"), dtype=w, device=self.device))  # fmt: skip
        ck, cv, cn = self._tables()
        ksum = ck[:, :, rows][:, :, None].expand(B, Hkv, T, S, D).clone()
        vsum = cv[:, :, rows][:, :, None].expand(B, Hkv, T, S, Dv).clone()
        n = cn[:, rows][:, None, None].expand(B, Hkv, T, S).clone()
        # Selected keys leave their group: subtract the chunks of selected blocks left of the zone.
        cpb = self.block_size // self.chunk
        hit = sel[..., : left // cpb].nonzero()  # (P, 4): batch, kv head, query, block
        if hit.numel():
            b, h, t = (x.repeat_interleave(cpb) for x in hit[:, :3].unbind(1))
            ch = (hit[:, 3:] * cpb + torch.arange(cpb, device=self.device)).flatten()
            target = ((b * Hkv + h) * T + t) * S + slots[ch]
            ksum.view(-1, D).index_add_(0, target, ck[b, h, ch], alpha=-1)
            vsum.view(-1, Dv).index_add_(0, target, cv[b, h, ch], alpha=-1)
            n.view(-1).index_add_(0, target, cn[b, ch], alpha=-1)
        # One row per (batch, kv head, query): its G query heads against its S pseudo-keys.
        qr = q.to(w).reshape(B, Hkv, G, T, D).transpose(2, 3).reshape(B * Hkv * T, G, D)
        out, lse = compressed_rows(qr, ksum.view(-1, S, D), vsum.view(-1, S, Dv), n.view(-1, S), scale)
        return out.view(B, Hkv, T, G, Dv).transpose(2, 3), lse.view(B, Hkv, T, G).transpose(2, 3)

    # ---- inspection -------------------------------------------------------------------------
    def step_selection(self, q: torch.Tensor, start: int | None = None, *, scale: float | None = None) -> torch.Tensor:
        """The key blocks the queries ``q (B, H, T, D)`` at positions ``start .. start + T − 1``
        select (``start`` defaults to ``seq_len − T``: the last call's tokens), by the rule of a
        step: bool ``(B, Hkv, T, blocks)`` over the blocks up to the last query's. Their keys
        must be cached (``start + T ≤ seq_len``); ``scale`` as in the calls (default
        ``1/√head_dim``). Nothing changes in the cache."""
        B, H, T, D = q.shape
        start = self.seq_len - T if start is None else start
        if B != self.batch or D != self.head_dim or H % self.kv_heads or T < 1:
            raise CacheError(
                f"step_selection expects q (batch={self.batch}, heads divisible by {self.kv_heads}, T >= 1, "
                f"head_dim={self.head_dim}), got {tuple(q.shape)}"
            )
        if start < 0 or start + T > self.seq_len:
            raise CacheError(
                f"step_selection: positions {start}..{start + T - 1} are not all cached (seq_len={self.seq_len})"
            )
        scale = self.spec.resolve_scale(scale, D)
        nb = num_blocks(start + T, self.block_size)
        out = torch.zeros(B, self.kv_heads, T, nb, dtype=torch.bool, device=self.device)
        with torch.no_grad():
            for s, e in self._runs(start, start + T, H):
                sel = self._select(q[:, :, s - start : e - start], s, e, scale)
                out[:, :, s - start : e - start, : sel.shape[-1]] = sel
        return out
