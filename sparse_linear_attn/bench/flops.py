"""FLOPs counted on the entries a variant actually visits.

Softmax variants (exact patterns): ``2·B·H·Nq·K̄·(D + Dv)`` forward (``4·B·H·Nq·K̄·D`` when
``Dv = D``), where ``K̄`` is the average number of keys a query sees — FlashAttention-3's
benchmark count, which credits a causal mask or a sliding window only with the entries inside
it. Backward counts 2.5× the forward (5 of the 7 matmuls' worth), so ``--backward`` reports
3.5× the forward.

Linear (kernelized) variants with feature dimension ``M`` (``elu``/``relu``: ``M = D``;
``favor``: ``M = num_features``; ``taylor``: ``M = 1 + D + D²``):

* non-causal: ``φ(K)ᵀV`` and ``φ(Q)·S`` take ``2·N·M·Dv`` each, the normaliser ``2·N·M`` twice,
  so ``B·H·(4·N·M·Dv + 4·N·M)``; plus the feature map (``favor``: ``2·N·D·M`` for q and for k);
* causal (chunkwise, chunk ``C``): the same state products plus the masked quadratic form inside
  each chunk, ``2·N·C̄·(M + Dv)`` with ``C̄ = (C + 1)/2`` visible keys on average.

``K̄`` comes from the variant's closed form (``VariantSpec.visible_keys``: ``full``,
``dot_product``, ``sliding_window`` and ``block_sparse`` — the latter counted tile by tile from
its layout, causal diagonal tiles and ragged edges included); for a user variant with only a
``mask_fn``, from ``sla.dense_mask`` up to N = 16K, else from dense masks at N = 4K, 8K, 16K and
a quadratic fit of the total count in N. The method is recorded with every result.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch

from .. import registry

#: Largest Nq·Nk for which the dense bool mask is built directly (256 MiB at N = 16K).
DENSE_LIMIT = 1 << 28
FIT_LENGTHS = (4096, 8192, 16384)
BACKWARD_FACTOR = 2.5


def _mask_visible(name: str, nq: int, nk: int, causal: bool, params_items: tuple) -> float:
    from ..api import dense_mask

    counts = dense_mask(name, nq, nk, causal=causal, **dict(params_items)).sum(-1, dtype=torch.int64)
    return float(counts.double().mean())


@lru_cache(maxsize=256)
def _visible_cached(name: str, nq: int, nk: int, causal: bool, params_items: tuple) -> tuple[float, str]:
    spec = registry.get(name)
    if spec.visible_keys is not None:
        return spec.visible_keys(nq, nk, causal=causal, **dict(params_items)), "closed form (VariantSpec.visible_keys)"
    if nq * nk <= DENSE_LIMIT:
        return _mask_visible(name, nq, nk, causal, params_items), "dense_mask"
    if nq != nk:
        raise ValueError("extrapolating the visible-key count assumes Nq == Nk")
    # The total count of visible entries of local/global/strided/random block patterns is a
    # quadratic polynomial in N (edges included); three dense counts determine it.
    ns = FIT_LENGTHS
    totals = [_mask_visible(name, m, m, causal, params_items) * m for m in ns]
    a = torch.tensor([[1.0, m, m * m] for m in ns], dtype=torch.float64)
    c = torch.linalg.solve(a, torch.tensor(totals, dtype=torch.float64))
    total = float(c[0] + c[1] * nq + c[2] * nq * nq)
    lengths = ",".join(map(str, ns))
    return max(0.0, min(float(nk), total / nq)), f"quadratic fit of dense_mask totals at N={lengths}"


def avg_visible_keys(name: str, params: Mapping[str, Any], nq: int, nk: int, causal: bool) -> tuple[float, str]:
    """Average number of keys a query sees under an exact variant's pattern, and how it was found."""
    spec = registry.get(name)
    resolved = spec.resolve_params(dict(params))
    items = tuple(sorted((k, _hashable(v)) for k, v in resolved.items()))
    return _visible_cached(name, nq, nk, causal, items)


def _hashable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        raise TypeError("tensor parameters (e.g. a layout) are not cached")
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


def _feature_dim(params: Mapping[str, Any], head_dim: int) -> tuple[int, str]:
    fmap = str(params.get("feature_map", "elu"))
    if fmap == "favor":
        return int(params.get("num_features", 256)), fmap
    if fmap == "taylor":
        return 1 + head_dim + head_dim * head_dim, fmap
    return head_dim, fmap


def count_flops(
    name: str,
    params: Mapping[str, Any],
    *,
    batch: int,
    heads: int,
    nq: int,
    nk: int,
    head_dim: int,
    v_dim: int,
    causal: bool,
    backward: bool,
    selection: Any = None,
) -> dict[str, Any]:
    """``{"flops", "avg_visible_keys", "flops_method"}`` (flops None where no count is defined).

    Data-dependent variants (``topk_block``, ``hybrid``) are counted from ``selection`` (the
    ``sla.selection`` of the measured inputs): each computed entry, exact or compressed, costs
    ``2·(D + Dv)`` like any score-and-value pair, plus the built-in estimator's logits
    (:func:`selection_flops`; a user estimator is not counted, and the method says so). With
    ``backward`` the entries count 3.5× and the estimator once: it runs without autograd.
    """
    spec = registry.get(name)
    out: dict[str, Any] = {"flops": None, "avg_visible_keys": None, "flops_method": None}
    resolved = spec.resolve_params(dict(params))
    once = 0.0  # FLOPs a backward pass does not repeat (the estimator runs without autograd)
    if spec.data_dependent:
        if selection is None:
            out["flops_method"] = "not counted: a data-dependent variant is counted from the selection of its inputs"
            return out
        fwd, once, kbar, method = selection_flops(
            selection, resolved, batch=batch, heads=heads, head_dim=head_dim, v_dim=v_dim
        )
        out.update(avg_visible_keys=kbar, flops_method=method)
    elif spec.exact and spec.module is None:
        try:
            kbar, method = avg_visible_keys(name, resolved, nq, nk, causal)
        except Exception as e:  # a pattern we cannot count: report, never guess
            out["flops_method"] = f"not counted: {type(e).__name__}: {e}"
            return out
        fwd = 2.0 * batch * heads * nq * kbar * (head_dim + v_dim)
        out.update(avg_visible_keys=kbar, flops_method=method)
    elif name in ("linear", "performer") or "feature_map" in resolved:
        p = dict(resolved)
        if name == "performer":
            p.setdefault("feature_map", "favor")
        m, fmap = _feature_dim(p, head_dim)
        n = nq
        fwd = 4.0 * n * m * v_dim + 4.0 * n * m
        if fmap == "favor":
            fwd += 2.0 * (nq + nk) * head_dim * m
        if causal:
            c = int(p.get("chunk_size", 64))
            cbar = (min(c, nk) + 1) / 2.0
            fwd += 2.0 * nq * cbar * (m + v_dim)
        fwd *= batch * heads
        out.update(flops_method=f"linear attention, feature dim M={m} ({fmap})")
    else:
        out["flops_method"] = "not counted: no FLOP model for this variant"
        return out
    out["flops"] = (fwd * (1.0 + BACKWARD_FACTOR) if backward else fwd) + once
    return out


def estimator_flops(name: str, params: Mapping[str, Any], *, batch: int, heads: int, nq: int, nk: int,
                    head_dim: int, causal: bool) -> float | None:  # fmt: skip
    """Multiply-add FLOPs of a built-in estimator's logits (``2·rows·units·width`` over the
    (query block, key block) pairs it may score); None for a user estimator."""
    from ..estimators import num_blocks, scoreable_blocks

    bs, est = params["block_size"], params["estimator"]
    strict = causal and params.get("selection", "strict") == "strict"
    pairs = (
        float(scoreable_blocks(nq, nk, bs, strict).sum()) if strict else float(num_blocks(nq, bs) * num_blocks(nk, bs))
    )
    per_pair = {
        "mean_pool": 2.0 * head_dim,  # one pooled query · one pooled key
        "key_pool": 2.0 * bs * head_dim,  # bs queries · one pooled key
        "antidiagonal": 2.0 * bs * bs * head_dim / params.get("stride", 8),  # (bs/S)² cells of S·D
        "oracle": 2.0 * bs * bs * head_dim,  # every score
    }.get(est)
    return None if per_pair is None else batch * heads * pairs * per_pair


def selection_flops(selection: Any, params: Mapping[str, Any], *, batch: int, heads: int, head_dim: int,
                    v_dim: int) -> tuple[float, float, float, str]:  # fmt: skip
    """``(forward FLOPs of the entries, estimator FLOPs, average entries per query, method)`` of a
    data-dependent call from its selection: ``2·(exact + compressed entries)·(D + Dv)``, and the
    estimator's logits apart (0 where not counted), since a backward pass repeats only the former."""
    from ..variants.full import full_visible_keys

    nq, nk, causal = selection.nq, selection.nk, selection.causal
    reachable = full_visible_keys(nq, nk, causal=causal)  # per query, no padding in benchmarks
    kbar = (selection.density + selection.compressed_density) * reachable
    fwd = 2.0 * batch * heads * nq * kbar * (head_dim + v_dim)
    method = (
        f"from the selection: density {selection.density:.4f} exact + {selection.compressed_density:.4f} "
        "compressed entries"
    )
    name = params.get("estimator")
    if name is None or "block_size" not in params:  # a user's data-dependent variant
        return fwd, 0.0, kbar, method + " (what chose them not counted)"
    est = estimator_flops(name, params, batch=batch, heads=heads, nq=nq, nk=nk, head_dim=head_dim, causal=causal)
    if est is None:
        return fwd, 0.0, kbar, method + f"; estimator {name!r} not counted"
    return fwd, est, kbar, method + f", plus the {name} estimator's logits ({est:.3g})"


def oracle_flops(
    density: float, *, batch: int, heads: int, nq: int, nk: int, head_dim: int, v_dim: int, causal: bool
) -> dict[str, Any]:
    """FLOPs of exact attention over a ``density`` share of the reachable entries (the oracle)."""
    reach, _ = avg_visible_keys("full", {}, nq, nk, causal)
    kbar = density * reach
    return {
        "flops": 2.0 * batch * heads * nq * kbar * (head_dim + v_dim),
        "avg_visible_keys": kbar,
        "flops_method": "oracle: density × reachable keys (the selection itself not counted)",
    }
