"""``topk_block`` — exact softmax attention over key blocks chosen from the inputs.

    out_i = Σ_j softmax_j(q_i·k_j·scale over the j in selected blocks) v_j

Queries and keys are cut into blocks of ``block_size`` (ragged last blocks work). An estimator
(``sla.available_estimators()``: ``mean_pool``, ``key_pool``, ``antidiagonal``, ``oracle`` or a
user's from ``sla.register_estimator``) scores every (query block, key block) pair by the
attention mass it expects there, and each query-block row keeps:

* ``sink_blocks`` first key blocks and ``local_blocks`` around the diagonal (causal: the
  diagonal block and the ones just before it), always, counted toward the budget;
* with strict causality, every key block not complete at the row's first query (no estimator
  may look at it: see below);
* then the best-scored other reachable blocks until the budget is met: ``density`` — a fraction
  of the row's reachable blocks (at least one block), or ``mass`` — the fewest blocks whose
  estimated mass reaches that share of the row's (XAttention's τ, SpargeAttn's cdf threshold).

Reachable means not excluded by causality or padding. Query heads that share a key/value head
share one selection (their estimated masses summed), so each K/V tile is read once per group.
The output is exactly the dense masked softmax over ``sla.selection(q, k, "topk_block",
...).dense()``: causal element by element inside diagonal tiles, padded keys excluded.

**Causality is strict** (``selection="strict"``, the default): with ``causal=True`` the output
at position ``i`` depends on no input after ``i``, through the selection too. Query block ``a``
is scored from the ``block_size`` queries ending at its *first* query and from key blocks
complete at that query's position; key blocks that are not are kept unconditionally. So a
query's selection never sees a later query of its block. ``selection="block"`` scores each
query block from all its queries against every key block (as prefill-only systems do) and then
drops future blocks: it leaks within a block (a query's selection depends on later queries of
its block) and is there for comparison.

Cost: the estimator (see :mod:`sparse_linear_attn.estimators`) plus O(B·H·nnz·bs²·D) for the
selected tiles; memory O(B·Hkv·(N/bs)²) for the selection, never an ``Nq×Nk`` tensor outside
``oracle`` (which is O(N²) in time, chunked in memory) and ``return_weights``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..backends.flex import flex_run, flex_skip_in_auto, layout_block_mask
from ..backends.math import dense_attention
from ..estimators import EXTRA_KEYWORDS, check_estimator, estimate, scoreable_blocks
from ..registry import Impl, Param, Supports, VariantSpec, add, int_at_least, one_of
from ..selection import (
    Selection,
    block_counts,
    check_fraction,
    choose_blocks,
    forced_blocks,
    ratio,
    visible_per_tile,
)
from .block_sparse import block_attention

#: ``density`` when neither ``density`` nor ``mass`` is given.
DEFAULT_DENSITY = 0.125


def selection_params() -> dict[str, Param]:
    """The parameters of a block selection (``topk_block``'s, shared by ``hybrid``)."""
    return {
        "block_size": Param("block_size", 64, "query and key block size, in tokens", int_at_least(1)),
        "density": Param(
            "density",
            None,
            f"fraction in (0, 1] of each row's reachable key blocks kept ({DEFAULT_DENSITY} when mass is not given)",
            check_fraction,
        ),
        "mass": Param(
            "mass", None, "keep the fewest blocks whose estimated mass reaches this share, in (0, 1]", check_fraction
        ),
        "sink_blocks": Param("sink_blocks", 1, "first key blocks always kept (attention sinks)", int_at_least(0)),
        "local_blocks": Param(
            "local_blocks",
            1,
            "blocks at the diagonal always kept: causal the diagonal and local_blocks−1 before it, else |b−d| < n",
            int_at_least(0),
        ),
        "estimator": Param(
            "estimator", "mean_pool", "block-mass estimator (sla.available_estimators())", check_estimator
        ),
        "stride": Param("stride", 8, "antidiagonal estimator: cell size; must divide block_size", int_at_least(1)),
        "selection": Param(
            "selection",
            "strict",
            "'strict': causal selections use nothing after a block's first query; 'block': whole-block "
            "scoring (leaks within a block)",
            one_of("strict", "block"),
        ),
    }


def check_selection_params(p: Mapping[str, Any]) -> str | None:
    """Cross-parameter checks of a block selection."""
    if p["density"] is not None and p["mass"] is not None:
        return f"give one budget, density= or mass=, not both (got density={p['density']}, mass={p['mass']})"
    if p["estimator"] == "antidiagonal" and p["block_size"] % p["stride"]:
        return (
            f"estimator 'antidiagonal' needs stride dividing block_size, got stride={p['stride']}, "
            f"block_size={p['block_size']}"
        )
    return None


def topk_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    block_size: int,
    density: float | None,
    mass: float | None,
    sink_blocks: int,
    local_blocks: int,
    estimator: str,
    selection: str,
    **extra: Any,
) -> Selection:
    """The block selection of a ``topk_block`` call (module docstring); ``extra`` may hold the
    estimators' own keywords (``stride``) and is otherwise ignored (``hybrid``'s parameters)."""
    B, H, nq, _ = q.shape
    nk = k.shape[2]
    strict = selection == "strict"
    with torch.no_grad():
        scores = estimate(
            estimator, q, k, block_size=block_size, causal=causal and strict, key_padding_mask=key_padding_mask,
            scale=scale, **{key: extra[key] for key in EXTRA_KEYWORDS if key in extra},
        )  # fmt: skip
        if causal and strict:
            # Only complete past blocks carry a score; the others are forced.
            scores = scores * scoreable_blocks(nq, nk, block_size, True, device=q.device)
        visible = visible_per_tile(nq, nk, block_size, causal=causal, key_padding_mask=key_padding_mask,
                                   device=q.device)  # fmt: skip
        forced = forced_blocks(nq, nk, block_size, causal=causal, sink_blocks=sink_blocks, local_blocks=local_blocks,
                               strict=strict, device=q.device)  # fmt: skip
        if density is None and mass is None:
            density = DEFAULT_DENSITY
        block_mask = choose_blocks(scores, (visible > 0)[:, None], forced, density=density, mass=mass)
        computed, reachable = block_counts(block_mask, visible, H)
    return Selection(
        block_mask=block_mask, block_size=block_size, density=ratio(computed, reachable), compressed_density=0.0,
        nq=nq, nk=nk, heads=H, causal=causal, key_padding_mask=key_padding_mask, scores=scores,
    )  # fmt: skip


def topk_block_reference(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, **params):
    """Dense masked softmax over ``selection(...).dense()``: the ``math`` backend (O(Nq·Nk))."""
    sel = topk_selection(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale, **params)
    return dense_attention(q, k, v, scale=scale, mask=sel.dense(), return_weights=return_weights)


def topk_block_torch(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, **params):
    """The selection, then block_sparse's tiled kernel with it as a per-(batch, kv head) layout."""
    sel = topk_selection(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale, **params)
    out = block_attention(q, k, v, sel.block_mask, block_size=sel.block_size, causal=causal,
                          key_padding_mask=key_padding_mask, scale=scale)  # fmt: skip
    return out, None


def selection_block_mask(sel: Selection, heads: int, device) -> Any:
    """A FlexAttention ``BlockMask`` computing exactly ``sel.dense()`` for ``heads`` query heads
    (:func:`~sparse_linear_attn.backends.flex.layout_block_mask` over the selection's blocks)."""
    lay = sel.block_mask.to(device).repeat_interleave(heads // sel.block_mask.shape[1], dim=1)  # (B, H, nqb, nkb)
    return layout_block_mask(lay, sel.nq, sel.nk, sel.block_size, causal=sel.causal,
                             key_padding_mask=sel.key_padding_mask)  # fmt: skip


def topk_block_flex(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, **params):
    """Compiled FlexAttention with a BlockMask built from the call's selection (built per call:
    it depends on the inputs)."""
    sel = topk_selection(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale, **params)
    return flex_run(q, k, v, block_mask=selection_block_mask(sel, q.shape[1], q.device), scale=scale), None


def _flex_rules_out(call, params) -> str | None:
    if params["block_size"] < 16 or params["block_size"] % 16:
        return f"FlexAttention needs block_size a multiple of 16, got {params['block_size']}"
    return None


add(
    VariantSpec(
        name="topk_block",
        summary="exact softmax attention over the key blocks an estimator scores highest (density or mass budget)",
        exact=True,
        cost="estimator + O(nnz_blocks·block_size²·D)",
        params=selection_params(),
        supports=Supports(),
        impls={
            "torch": Impl(topk_block_torch),
            "flex": Impl(topk_block_flex, rules_out=_flex_rules_out, skip_in_auto=flex_skip_in_auto),
            "math": Impl(topk_block_reference),
        },
        check_params=check_selection_params,
        selection_fn=topk_selection,
        cache_family="block_select",
        examples=(
            {"block_size": 4, "density": 0.5},
            {"block_size": 4, "density": 0.3, "estimator": "key_pool", "sink_blocks": 0},
            {"block_size": 8, "mass": 0.7, "estimator": "antidiagonal", "stride": 4},
            {"block_size": 5, "density": 0.4, "estimator": "oracle", "local_blocks": 2},
            {"block_size": 4, "density": 0.25, "selection": "block"},
        ),
    )
)
