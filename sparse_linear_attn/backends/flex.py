"""``torch.nn.attention.flex_attention``, compiled, for the exact sparse variants.

FlexAttention skips whole ``(block, block)`` tiles that a ``BlockMask`` marks empty and runs a
``mask_mod`` element by element only on the partial tiles, so its cost follows the pattern.
Two things are cached so that repeated calls neither rebuild nor recompile:

* one compiled ``flex_attention`` per process (``torch.compile`` then caches a graph per input
  shape/dtype and mask function itself);
* the ``BlockMask`` per (variant, parameters, lengths, causal, device), built straight from a
  block layout (never from an ``Nq×Nk`` mask). A call with a ``key_padding_mask`` depends on
  that tensor's values, so its mask is built for the call and not cached.

On CPU, FlexAttention compiles for inference only (no backward): the dispatch table
(``BACKENDS["flex"]``) rules it out when inputs require grad, and ``backend="auto"`` then uses
the pure-PyTorch path.

The compiled function holds one graph per input shape, dtype and mask function. Past torch's
recompile limit (8 by default) dynamo would silently run FlexAttention *unfused*, which builds
the whole ``Nq×Nk`` score matrix — the O(N²) memory this backend exists to avoid. Calls here
raise that limit to :data:`MAX_COMPILED_GRAPHS` and turn hitting it into :class:`FlexCacheFull`;
``backend="auto"`` then runs the next backend in the table, and stops choosing Flex.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from ..errors import CannotRun
from ..inputs import causal_offset

#: BlockMasks kept (least recently used dropped first).
MAX_CACHED_MASKS = 32
#: Graphs the compiled ``flex_attention`` may hold in this process (one per input shape, dtype
#: and mask function); each costs a compile (seconds on CPU).
MAX_COMPILED_GRAPHS = 64

_COMPILED: Callable | None = None
_MASKS: OrderedDict[Hashable, object] = OrderedDict()
_FULL_AT: int | None = None  # the MAX_COMPILED_GRAPHS in force when a call found the cache full


class FlexCacheFull(CannotRun):
    """The compiled FlexAttention holds :data:`MAX_COMPILED_GRAPHS` graphs and this call needs
    another one; running it anyway would be unfused (O(Nq·Nk) memory)."""


def compiled_flex() -> Callable:
    """The process-wide ``torch.compile(flex_attention)``, created on first use."""
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


def clear_cache() -> None:
    """Forget cached BlockMasks (the compiled function stays)."""
    _MASKS.clear()


def cached_block_mask(key: Hashable | None, build: Callable[[], object]):
    """``build()`` once per ``key`` (``None``: never cached)."""
    if key is None:
        return build()
    if key in _MASKS:
        _MASKS.move_to_end(key)
        return _MASKS[key]
    mask = build()
    _MASKS[key] = mask
    while len(_MASKS) > MAX_CACHED_MASKS:
        _MASKS.popitem(last=False)
    return mask


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Count and indices of the True entries of each row, True ones first, in column order.
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


def block_mask_from_layout(
    any_visible: torch.Tensor,
    all_visible: torch.Tensor | None,
    mask_mod: Callable,
    nq: int,
    nk: int,
    block_size: int,
):
    """A ``BlockMask`` from block layouts, without evaluating ``mask_mod`` on every entry.

    ``any_visible`` bool ``(B|1, H|1, nq_blocks, nk_blocks)``: tiles with at least one visible
    entry. ``all_visible`` (same shape, or None): tiles every entry of which is visible — Flex
    skips ``mask_mod`` there. ``mask_mod(b, h, q_idx, kv_idx)`` is exact on the partial tiles.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if all_visible is None:
        all_visible = torch.zeros_like(any_visible)
    partial = any_visible & ~all_visible
    num, idx = _ordered(partial)
    full_num, full_idx = _ordered(all_visible)
    return BlockMask.from_kv_blocks(
        num, idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(nq, nk)
    )


def layout_block_mask(
    layout: torch.Tensor, nq: int, nk: int, block_size: int, *, causal: bool, key_padding_mask: torch.Tensor | None
):
    """A ``BlockMask`` computing exactly the entries of the bool block ``layout``
    ``(B|1, H|1, nq_blocks, nk_blocks)``, with causality (bottom-right) and key padding applied
    element-wise: tiles wholly in the future are dropped, selected tiles wholly visible (not
    crossing the diagonal, not ragged, no padding) are marked full so Flex skips ``mask_mod``."""
    bs, off, kpm, dev = block_size, causal_offset(nq, nk), key_padding_mask, layout.device
    nqb, nkb = layout.shape[-2:]
    qb = torch.arange(nqb, device=dev)[:, None]
    kb = torch.arange(nkb, device=dev)[None, :]
    whole = ((qb + 1) * bs <= nq) & ((kb + 1) * bs <= nk)
    any_v, full = layout.clone(), layout & whole
    if causal:
        any_v &= kb * bs <= torch.clamp((qb + 1) * bs, max=nq) - 1 + off
        full &= torch.clamp((kb + 1) * bs, max=nk) - 1 <= qb * bs + off
    if kpm is not None:
        full = torch.zeros_like(full)
    lay = layout.contiguous()
    per_batch, per_head = lay.shape[0] > 1, lay.shape[1] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        keep = lay[b if per_batch else 0, h if per_head else 0, q_idx // bs, kv_idx // bs]
        if causal:
            keep = keep & (kv_idx <= q_idx + off)
        if kpm is not None:
            keep = keep & ~kpm[b, kv_idx]
        return keep

    return block_mask_from_layout(any_v, full, mask_mod, nq, nk, bs)


def flex_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_mask, scale: float) -> torch.Tensor:
    """Compiled FlexAttention; rows that see no key come back as zeros (Flex's own convention).

    Raises :class:`FlexCacheFull` instead of running unfused when a new graph would exceed
    :data:`MAX_COMPILED_GRAPHS`.
    """
    global _FULL_AT
    import torch._dynamo

    fn = compiled_flex()
    try:
        with torch._dynamo.config.patch(recompile_limit=MAX_COMPILED_GRAPHS, fail_on_recompile_limit_hit=True):
            return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        _FULL_AT = MAX_COMPILED_GRAPHS
        raise FlexCacheFull(
            f"the compiled FlexAttention already holds {MAX_COMPILED_GRAPHS} graphs in this process (one "
            f"per input shape, dtype and mask) and this call (q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"{str(q.dtype).replace('torch.', '')}) needs a new one; past that limit torch would run "
            "FlexAttention unfused with O(Nq·Nk) memory. Use backend='torch' or 'auto' (which now "
            "skips flex), or raise sla.backends.flex.MAX_COMPILED_GRAPHS."
        ) from None


def cache_full_reason() -> str | None:
    """Why ``auto`` should not pick Flex any more in this process (None: it may)."""
    if _FULL_AT is not None and MAX_COMPILED_GRAPHS <= _FULL_AT:
        return f"its compiled graphs reached MAX_COMPILED_GRAPHS ({_FULL_AT}) in this process"
    return None


def flex_skip_in_auto(call, params) -> str | None:
    """``auto`` uses Flex on CUDA only: on CPU the tiled PyTorch path was measured faster."""
    full = cache_full_reason()
    if full:
        return full
    if call.device != "cuda":
        return "auto prefers the tiled torch path on CPU (measured faster; see docs/sparse.md)"
    if max(call.nq, call.nk) < 1024:
        return "sequence too short for a compile to pay off (auto uses it from 1024 tokens)"
    return None
