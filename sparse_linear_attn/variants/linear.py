"""``linear`` — kernelized (linear) attention, and ``performer`` (= ``linear`` with FAVOR+).

Softmax's ``exp(q·k·scale)`` is replaced by a feature-map inner product ``φ(q)·φ(k)``
(:mod:`sparse_linear_attn.feature_maps`), so the sums over keys factor out::

    out_i = φ(q_i)ᵀ S / φ(q_i)ᵀ z,    S = Σ_j φ(k_j) v_jᵀ  (M, Dv),   z = Σ_j φ(k_j)  (M,)

with the sums over visible keys only: ``j ≤ i + Nk − Nq`` when causal (bottom-right aligned),
padded keys excluded (their φ(k) is zeroed). A query with a zero normaliser (nothing visible,
or ReLU features that all vanish) gets a zero row, not NaN.

Shapes ``(batch, heads, seq, head_dim)``: q ``(B, H, Nq, D)``, k ``(B, Hkv, Nk, D)``,
v ``(B, Hkv, Nk, Dv)`` with ``H % Hkv == 0``; φ has ``M`` features (``D`` for elu/relu,
``num_features`` for favor, ``1 + D + D²`` for taylor).

Backends:

* ``torch`` (:func:`linear_chunked`) — non-causal: ``S`` and ``z`` once, then one product per
  query, O((Nq + Nk)·M·Dv). Causal: the chunkwise form of flash-linear-attention — inside a
  chunk of ``chunk_size`` positions the masked quadratic ``tril(φQ φKᵀ) V``, across chunks a
  running ``(S, z)``; O(N·(C·M + M·Dv)) time. Positions are processed in groups of chunks so
  that only one group's per-chunk states and scores exist at a time: extra memory is the
  output plus O(group) — never N×N, never a per-position (N, M, Dv) state. ``z`` rides along
  as an extra all-ones column of V, so numerator and normaliser come from the same products.
* ``math`` (:func:`linear_reference`) — the quadratic form ``A = mask ⊙ φQ φKᵀ``,
  ``out = (A / A·1) V``: O(Nq·Nk) memory; returns the normalised ``A`` (``return_weights``).

Under float16/bfloat16 the features, state and normaliser are computed in float32 and the
output is returned in the input dtype.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F

from ..feature_maps import FeatureContext, FeatureMap, check_feature_map, get_feature_map
from ..inputs import full_visibility, repeat_kv
from ..registry import SEED_RANGE, Impl, Param, Supports, VariantSpec, add, int_at_least, is_bool

#: Floats of per-group workspace (features, scores, per-chunk states) the causal path aims at
#: without autograd (small groups stay in cache), and with it (fewer, larger autograd nodes
#: make the backward pass several times faster; the graph keeps every group's tensors anyway).
GROUP_ELEMENTS = 1 << 22
GRAD_GROUP_ELEMENTS = 1 << 24


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _setup(q, k, v, *, scale, key_padding_mask, feature_map, num_features, seed, redraw):
    fmap = get_feature_map(feature_map)
    if redraw and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # Training with redraw: a fresh projection each call, from torch's global generator so
        # that torch.manual_seed still makes a run reproducible.
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    ctx = fmap.prepare(
        k,
        scale=scale,
        num_features=num_features,
        seed=seed,
        key_padding_mask=key_padding_mask,
        work_dtype=_work_dtype(q.dtype),
    )
    return fmap, ctx


def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # A zero normaliser means a zero numerator too (features are non-negative), so 0/1 = 0;
    # dividing by 1 there also keeps the backward pass free of NaN.
    return num / torch.where(den > 0, den, torch.ones_like(den))


# ---------------------------------------------------------------------------------------------
# Reference: the explicit quadratic form.


def linear_reference(
    q,
    k,
    v,
    *,
    causal,
    key_padding_mask,
    scale,
    return_weights=False,
    feature_map="elu",
    num_features=256,
    seed=0,
    chunk_size=64,
    redraw=False,
):
    """``A = mask ⊙ φ(Q)φ(K)ᵀ``, ``W = A / rowsum(A)``, ``out = W V``. O(Nq·Nk) memory."""
    fmap, ctx = _setup(
        q,
        k,
        v,
        scale=scale,
        key_padding_mask=key_padding_mask,
        feature_map=feature_map,
        num_features=num_features,
        seed=seed,
        redraw=redraw,
    )
    work = _work_dtype(q.dtype)
    H = q.shape[1]
    fq = fmap(q.to(work), ctx, is_query=True)
    fk = repeat_kv(fmap(k.to(work), ctx, is_query=False), H)
    scores = fq @ fk.transpose(-1, -2)
    mask = full_visibility(q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    if mask is not None:
        scores = scores * mask
    weights = _safe_divide(scores, scores.sum(-1, keepdim=True))
    out = (weights @ repeat_kv(v, H).to(work)).to(q.dtype)
    return out, (weights.to(q.dtype) if return_weights else None)


# ---------------------------------------------------------------------------------------------
# Fast path: sums once (non-causal) or chunkwise with a running state (causal).


class _Features:
    """Feature slices of one call, in the work dtype, with padded keys' features zeroed."""

    def __init__(self, fmap: FeatureMap, ctx: FeatureContext, key_padding_mask, work):
        self.fmap, self.ctx, self.work = fmap, ctx, work
        self.keep = None if key_padding_mask is None else (~key_padding_mask)[:, None, :, None].to(work)

    def keys(self, k, s, e, k0=0):  # k (B, Hkv, Nk, D) -> (B, Hkv, e - s, M); k0: k's start in the mask
        f = self.fmap(k[:, :, s:e].to(self.work), self.ctx, is_query=False)
        return f if self.keep is None else f * self.keep[:, :, k0 + s : k0 + e]

    def queries(self, x):
        return self.fmap(x.to(self.work), self.ctx, is_query=True)


def _with_ones(v: torch.Tensor, work) -> torch.Tensor:
    """``[v, 1]``: the extra column turns ``φ(k)ᵀ[v, 1]`` into ``[S, z]``."""
    v = v.to(work)
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def key_state(
    k: torch.Tensor,
    v: torch.Tensor,
    fmap: FeatureMap,
    ctx: FeatureContext,
    key_padding_mask: torch.Tensor | None,
    work: torch.dtype,
    *,
    step: int,
) -> torch.Tensor:
    """``Σ_j φ(k_j) [v_jᵀ, 1]`` over the keys of ``k (B, Hkv, Nk, D)`` (padded ones excluded):
    the state ``[S, z]`` ``(B, Hkv, M, Dv + 1)`` in ``work``, mapping ``step`` keys at a time."""
    feats = _Features(fmap, ctx, key_padding_mask, work)
    total = None
    for s in range(0, k.shape[2], step):
        e = min(k.shape[2], s + step)
        part = feats.keys(k, s, e).transpose(-1, -2) @ _with_ones(v[:, :, s:e], work)
        total = part if total is None else total + part
    if total is None:
        M = fmap(k[:1, :1, :0].to(work), ctx, is_query=False).shape[-1]
        total = torch.zeros(*k.shape[:2], M, v.shape[-1] + 1, dtype=work, device=k.device)
    return total


def apply_state(
    q: torch.Tensor, state: torch.Tensor, fmap: FeatureMap, ctx: FeatureContext, work: torch.dtype, *, step: int
) -> torch.Tensor:
    """``φ(q)ᵀS / φ(q)ᵀz`` for every query of ``q (B, H, Nq, D)`` against ``state (B, Hkv, M,
    Dv + 1)`` (zero rows where the normaliser is 0), ``step`` queries at a time: ``(B, H, Nq, Dv)``
    in q's dtype."""
    B, H, nq, D = q.shape
    Hkv, Dv = state.shape[1], state.shape[-1] - 1
    # Query heads h = g_kv·G + g share kv head g_kv: this view groups them without copying.
    qg = q.reshape(B, Hkv, H // Hkv, nq, D)
    pieces = []
    for s in range(0, nq, step):
        num = fmap(qg[:, :, :, s : s + step].to(work), ctx, is_query=True) @ state[:, :, None]
        pieces.append(_safe_divide(num[..., :Dv], num[..., Dv:]).to(q.dtype))
    out = torch.cat(pieces, dim=3) if len(pieces) != 1 else pieces[0]
    return out.reshape(B, H, nq, Dv)


def _group_length(per_position: int, chunk: int, budget: int | None = None) -> int:
    budget = GROUP_ELEMENTS if budget is None else budget
    return max(chunk, (budget // max(1, per_position)) // chunk * chunk)


def linear_chunked(
    q,
    k,
    v,
    *,
    causal,
    key_padding_mask,
    scale,
    return_weights=False,
    feature_map="elu",
    num_features=256,
    seed=0,
    chunk_size=64,
    redraw=False,
):
    """The ``torch`` backend: O(N·M·Dv) non-causal, chunkwise O(N·(C·M + M·Dv)) causal."""
    fmap, ctx = _setup(
        q,
        k,
        v,
        scale=scale,
        key_padding_mask=key_padding_mask,
        feature_map=feature_map,
        num_features=num_features,
        seed=seed,
        redraw=redraw,
    )
    work = _work_dtype(q.dtype)
    feats = _Features(fmap, ctx, key_padding_mask, work)
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    # Query heads h = g_kv·G + g share kv head g_kv: this view groups them without copying k/v.
    qg = q.reshape(B, Hkv, G, Nq, D)
    M = fmap(q[:1, :1, :1].to(work), ctx, is_query=True).shape[-1]
    state = torch.zeros(B, Hkv, M, Dv + 1, dtype=work, device=q.device)

    if not causal:
        step = _group_length(B * Hkv * (G * (D + M + 2 * Dv + 2) + D + M + Dv + 1), 1)
        state = key_state(k, v, fmap, ctx, key_padding_mask, work, step=step)
        return apply_state(q, state, fmap, ctx, work, step=step), None

    # Bottom-right alignment: query i sees keys j <= i + off. Reduce to the square case:
    # off > 0 -> the first `off` keys are seen by every query (an initial state);
    # off < 0 -> the first -off queries see nothing (zero rows).
    off = Nk - Nq
    if off > 0:
        kpm = None if key_padding_mask is None else key_padding_mask[:, :off]
        state = key_state(k[:, :, :off], v[:, :, :off], fmap, ctx, kpm, work, step=4096)
    lead = max(0, -off)
    k0 = max(0, off)
    rows = dict(chunk_size=chunk_size, k0=k0, grad=grad)
    if not grad:
        out = q.new_empty(B, H, Nq, Dv)
        if lead:
            out[:, :, :lead] = 0
        target = out.view(B, Hkv, G, Nq, Dv)[:, :, :, lead:]
        _causal_rows(feats, qg[:, :, :, lead:], k[:, :, k0:], v[:, :, k0:], state, out=target, **rows)
        return out, None
    out, _ = _causal_rows(feats, qg[:, :, :, lead:], k[:, :, k0:], v[:, :, k0:], state, **rows)
    if lead:
        out = torch.cat([q.new_zeros(B, Hkv, G, lead, Dv), out], dim=3)
    return out.reshape(B, H, Nq, Dv), None


def linear_causal_continue(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    *,
    fmap: FeatureMap,
    ctx: FeatureContext,
    key_padding_mask: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention of ``N`` new positions continuing a stream (incremental decoding).

    Query ``n`` sees the earlier keys, summed in ``state = [S, z]`` ``(B, Hkv, M, Dv + 1)``
    (``S = Σ φ(k_j) v_jᵀ``, ``z = Σ φ(k_j)`` in the work dtype, float32 or float64), and the
    new keys ``0..n``: ``out_n = φ(q_n)ᵀ(S + Σ_{j≤n} φ(k_j)v_jᵀ) / φ(q_n)ᵀ(z + Σ_{j≤n} φ(k_j))``.
    q ``(B, H, N, D)``, k ``(B, Hkv, N, D)``, v ``(B, Hkv, N, Dv)``; ``fmap``/``ctx`` map them
    (``ctx`` from ``FeatureMap.prepare``/``extend``); padded keys add nothing. Returns ``out``
    ``(B, H, N, Dv)`` in q's dtype and the state after the new keys (``state`` is not modified).
    The same chunkwise kernels as :func:`linear_chunked`: O(N·(C·M + M·Dv)) time.
    """
    B, H, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    feats = _Features(fmap, ctx, key_padding_mask, state.dtype)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, state))
    out, state = _causal_rows(
        feats, q.reshape(B, Hkv, H // Hkv, N, D), k, v, state, chunk_size=chunk_size, k0=0, grad=grad
    )
    return out.reshape(B, H, N, Dv), state


def _causal_rows(feats: _Features, qg, k, v, state, *, chunk_size: int, k0: int, grad: bool, out=None):
    """The square causal chunkwise form: query ``n`` of ``qg (B, Hkv, G, N, D)`` sees keys ``0..n``
    of ``k``/``v`` and every key summed in the initial ``state (B, Hkv, M, Dv + 1)``.

    Returns ``(out (B, Hkv, G, N, Dv), final state)``; without ``grad`` ``out`` may be given to
    write into. ``k0`` is where these keys start in the caller's key-padding mask.
    """
    B, Hkv, G, N, D = qg.shape
    Dv, M = v.shape[-1], state.shape[-2]
    # A chunk longer than the sequence only adds padding (a C×C block per chunk): clamp it.
    C = max(1, min(chunk_size, N))
    work = feats.work
    if not grad:
        if out is None:
            out = qg.new_empty(B, Hkv, G, N, Dv)
        return out, _causal_inference(feats, qg, k, v, state, out, C, k0)
    per_position = B * Hkv * (G * (2 * D + M + C + 3 * (Dv + 1)) + D + M + 2 * (Dv + 1) + M * (Dv + 1) // C + 1)
    L = _group_length(per_position, C, GRAD_GROUP_ELEMENTS)
    tri = torch.ones(C, C, dtype=torch.bool, device=qg.device).tril()
    tri = tri.repeat(G, 1).to(work)  # (G·C, C): the same causal block for each grouped head
    pieces = []
    for s in range(0, N, L):
        e = min(N, s + L)
        n = -(-(e - s) // C)
        pad = n * C - (e - s)
        fk = feats.keys(k, s, e, k0)  # (B, Hkv, l, M)
        vv = _with_ones(v[:, :, s:e], work)  # (B, Hkv, l, Dv+1)
        fq = feats.queries(qg[:, :, :, s:e])  # (B, Hkv, G, l, M)
        if pad:
            # Zero features of the padding positions contribute nothing to any sum.
            fk = F.pad(fk, (0, 0, 0, pad))
            vv = F.pad(vv, (0, 0, 0, pad))
            fq = F.pad(fq, (0, 0, 0, pad))
        fk = fk.reshape(B, Hkv, n, C, M)
        vv = vv.reshape(B, Hkv, n, C, Dv + 1)
        # (B, Hkv, G, n, C, M) -> (B, Hkv, n, G·C, M): one matmul per chunk for all its heads.
        fq = fq.reshape(B, Hkv, G, n, C, M)
        fq = fq.reshape(B, Hkv, n, C, M) if G == 1 else fq.permute(0, 1, 3, 2, 4, 5).reshape(B, Hkv, n, G * C, M)
        chunk_kv = fk.transpose(-1, -2) @ vv  # (B, Hkv, n, M, Dv+1)
        running = torch.cumsum(chunk_kv, dim=2)
        before = torch.cat([state[:, :, None], state[:, :, None] + running[:, :, :-1]], dim=2)
        state = state + running[:, :, -1]
        scores = fq @ fk.transpose(-1, -2) * tri  # (B, Hkv, n, G·C, C)
        num = fq @ before + scores @ vv
        o = _safe_divide(num[..., :Dv], num[..., Dv:])  # (B, Hkv, n, G·C, Dv)
        o = o.reshape(B, Hkv, n, G, C, Dv).permute(0, 1, 3, 2, 4, 5).reshape(B, Hkv, G, n * C, Dv)
        pieces.append(o[:, :, :, : e - s].to(qg.dtype))
    if not pieces:
        return qg.new_zeros(B, Hkv, G, 0, Dv), state
    return (torch.cat(pieces, dim=3) if len(pieces) > 1 else pieces[0]), state


def _chunk_major(x: torch.Tensor, n: int, C: int) -> torch.Tensor:
    """``(BH, [G,] l, d)`` -> contiguous ``(n, BH, [G,] C, d)``, zero-padding ``l`` up to ``n·C``."""
    length = x.shape[-2]
    if length < n * C:
        x = F.pad(x, (0, 0, 0, n * C - length))
    x = x.reshape(*x.shape[:-2], n, C, x.shape[-1])
    return x.movedim(-3, 0).contiguous()


def _causal_inference(feats: _Features, qg, k, v, state, out, C: int, k0: int) -> torch.Tensor:
    """The causal chunkwise form without autograd, writing into ``out`` (B, Hkv, G, N, Dv);
    returns the state after the last key.

    Same algorithm as the autograd path in :func:`linear_chunked`, laid out chunk-major
    ``(n, B·Hkv, C, ·)`` so that the exclusive prefix sum of the per-chunk states is one
    in-place cumsum over a buffer whose row 0 holds the running state, and the intra-chunk
    product accumulates into the inter-chunk one in place (no concatenations, few passes).
    ``k0`` is where these keys start in the caller's key-padding mask.
    """
    B, Hkv, G, N, D = qg.shape
    Dv = v.shape[-1]
    BH = B * Hkv
    work = feats.work
    M = state.shape[-2]
    per_position = BH * (G * (D + M + C + 2 * (Dv + 1)) + D + M + 2 * (Dv + 1) + M * (Dv + 1) // C + 1)
    L = _group_length(per_position, C)
    tri = torch.ones(C, C, dtype=torch.bool, device=qg.device).tril().repeat(G, 1).to(work)
    qf = qg.reshape(BH, G, N, D)
    kf = k.reshape(BH, N, D)
    vf = v.reshape(BH, N, Dv)
    keep = feats.keep
    fmap, ctx = feats.fmap, feats.ctx
    if ctx.key_shift is not None:  # keys are laid out (n, B·Hkv, C, D) here
        ctx = replace(ctx, key_shift=ctx.key_shift.reshape(1, BH, 1, 1))
    state = state.reshape(BH, M, Dv + 1)
    n_max = -(-min(L, N) // C)
    # Every group reuses these buffers: fresh memory costs a page fault per page (dearly in
    # VMs), and V's all-ones column is then written only once. Zeros, not empty, so that the
    # padding rows of a last, partial group hold finite values.
    dev = qg.device
    vv_buf = torch.zeros(n_max, BH, C, Dv + 1, dtype=work, device=dev)
    vv_buf[..., Dv] = 1.0
    states_buf = torch.empty(n_max + 1, BH, M, Dv + 1, dtype=work, device=dev)
    xk_buf = torch.zeros(n_max, BH, C, D, dtype=work, device=dev)
    xq_buf = torch.zeros(n_max, BH, G, C, D, dtype=work, device=dev)
    num_buf = torch.empty(n_max, BH, G * C, Dv + 1, dtype=work, device=dev)
    scores_buf = torch.empty(n_max, BH, G * C, C, dtype=work, device=dev)
    tiny = torch.finfo(work).tiny
    for s in range(0, N, L):
        e = min(N, s + L)
        size = e - s
        n = -(-size // C)
        full = size == n * C
        xk, xq, vv = xk_buf[:n], xq_buf[:n], vv_buf[:n]
        if full:  # one strided copy each into the chunk-major scratch buffers
            xk.copy_(kf[:, s:e].reshape(BH, n, C, D).transpose(0, 1))
            xq.copy_(qf[:, :, s:e].reshape(BH, G, n, C, D).permute(2, 0, 1, 3, 4))
            vv[..., :Dv] = vf[:, s:e].reshape(BH, n, C, Dv).transpose(0, 1)
        else:
            xk.copy_(_chunk_major(kf[:, s:e], n, C))
            xq.copy_(_chunk_major(qf[:, :, s:e], n, C))
            vv[..., :Dv] = _chunk_major(vf[:, s:e], n, C)
        fk = fmap.apply_(xk, ctx, is_query=False)  # (n, BH, C, M)
        if keep is not None:
            kp = _chunk_major(keep[:, 0, k0 + s : k0 + e].to(work), n, C)  # (n, B, C, 1)
            fk.view(n, B, Hkv, C, M).mul_(kp[:, :, None])
        if not full:
            fk[-1, :, size - (n - 1) * C :] = 0  # padding positions must add nothing
        fq = fmap.apply_(xq, ctx, is_query=True).view(n, BH, G * C, M)
        states = states_buf[: n + 1]
        states[0] = state
        torch.matmul(fk.transpose(-1, -2), vv, out=states[1:])
        # states[c] = state before chunk c. Row by row: torch's in-place cumsum over dim 0 is
        # many times slower on CPU than these contiguous adds (docs/decoding.md).
        for c in range(1, n + 1):
            states[c].add_(states[c - 1])
        state = states[n]
        num = torch.matmul(fq, states[:n], out=num_buf[:n])  # (n, BH, G·C, Dv+1)
        scores = torch.matmul(fq, fk.transpose(-1, -2), out=scores_buf[:n]).mul_(tri)
        num.view(n * BH, G * C, Dv + 1).baddbmm_(scores.view(n * BH, G * C, C), vv.view(n * BH, C, Dv + 1))
        # A zero normaliser comes with a zero numerator (non-negative features): 0 / tiny = 0.
        den = num[..., Dv:].clamp_min_(tiny)
        quotient = (num[..., :Dv].view(n, B, Hkv, G, C, Dv), den.view(n, B, Hkv, G, C, 1))
        target = out[:, :, :, s:e]
        if full:
            # Divide straight into the output, whose layout (B, Hkv, G, n, C, Dv) this permutes to.
            torch.div(*quotient, out=target.view(B, Hkv, G, n, C, Dv).permute(3, 0, 1, 2, 4, 5))
        else:
            o = torch.div(*quotient).permute(1, 2, 3, 0, 4, 5).reshape(B, Hkv, G, n * C, Dv)
            target.copy_(o[:, :, :, :size])
    # A view into states_buf (or the initial state when there were no positions).
    return state.reshape(B, Hkv, M, Dv + 1)


# ---------------------------------------------------------------------------------------------
# Registration.


#: Why linear attention takes no ``dropout_p`` (shown by ``sla.describe``).
NO_DROPOUT = (
    "no attention dropout: dropout drops softmax weights, and linear attention never forms its "
    "weight matrix (it sums φ(K)ᵀV first, which is where its O(N) cost comes from), so there is no "
    "weight to drop; regularise elsewhere (dropout on the layer's output or projections)"
)


def _check_scale(scale: float, params) -> str | None:
    """Maps that take ``scale``'s root (favor, taylor) need it non-negative; performer is favor."""
    return get_feature_map(params.get("feature_map", "favor")).check_scale(scale)


def _params(feature_map: bool) -> dict[str, Param]:
    out = {}
    if feature_map:
        out["feature_map"] = Param(
            "feature_map",
            "elu",
            "φ: elu (elu+1), relu, favor (Performer), taylor, or a name added with sla.register_feature_map",
            check_feature_map,
        )
    out.update(
        num_features=Param("num_features", 256, "M, random features of favor (ignored by the others)", int_at_least(1)),
        seed=Param("seed", 0, "seed of favor's random projection (same seed, same features)", SEED_RANGE),
        chunk_size=Param(
            "chunk_size", 64, "C, positions per chunk of the causal chunkwise form (at most N)", int_at_least(1)
        ),
        redraw=Param(
            "redraw",
            False,
            "favor: draw a fresh projection on every call that builds a graph (training)",
            is_bool,
        ),
    )
    return out


add(
    VariantSpec(
        name="linear",
        summary="kernelized attention φ(Q)(φ(K)ᵀV) normalised by φ(Q)Σφ(K); feature_map elu/relu/favor/taylor",
        exact=False,
        cost="O(N·M·Dv) (causal: O(N·(C·M + M·Dv)))",
        params=_params(feature_map=True),
        supports=Supports(),
        cache_family="recurrent",
        impls={
            "torch": Impl(linear_chunked, double_backward=True),
            "math": Impl(linear_reference, double_backward=True),
        },
        check_scale=_check_scale,
        notes=(NO_DROPOUT,),
        # Each feature map; chunks shorter than N, ragged and not (N = 16, 24, 40).
        examples=(
            {"feature_map": "elu", "chunk_size": 5},
            {"feature_map": "relu", "chunk_size": 7},
            {"feature_map": "favor", "num_features": 16, "seed": 1, "chunk_size": 8},
            {"feature_map": "taylor", "chunk_size": 16},
        ),
    )
)

add(
    VariantSpec(
        name="performer",
        summary="Performer: linear attention with FAVOR+ positive orthogonal random features (≈ softmax)",
        exact=False,
        cost="O(N·M·Dv) (causal: O(N·(C·M + M·Dv)))",
        params=_params(feature_map=False),
        supports=Supports(),
        cache_family="performer",
        impls={
            "torch": Impl(partial(linear_chunked, feature_map="favor"), double_backward=True),
            "math": Impl(partial(linear_reference, feature_map="favor"), double_backward=True),
        },
        check_scale=_check_scale,
        notes=(NO_DROPOUT,),
        examples=(
            {"num_features": 16, "chunk_size": 5},
            {"num_features": 7, "seed": 2, "chunk_size": 16},
            {"num_features": 16, "redraw": True},
        ),
    )
)
