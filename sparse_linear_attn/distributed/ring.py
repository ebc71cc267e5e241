"""``ring`` — exact softmax attention (``full``, ``dot_product``) with K/V travelling round the ring.

Rank ``r`` keeps its queries; at step ``t = 0 … W−1`` it holds the keys/values of rank
``s = r − t (mod W)`` and computes the attention of its queries over them alone, with each
row's log-sum-exp (:func:`~sparse_linear_attn.backends.partial.partial_attention`), while the
K/V block moves on to rank ``r + 1``. The parts merge exactly (in float32 at least):

    o = Σₛ e^{ℓₛ − ℓ} oₛ,    ℓ = log Σₛ e^{ℓₛ}              (merge_partials, one step at a time)

Masks come from global positions (causal ``j ≤ i``, key padding), so any layout works. A query
chunk and a key chunk that see nothing of each other under ``causal`` are skipped; a chunk pair
wholly in the past needs no mask. With ``layout="zigzag"`` every rank computes about the same
number of visible pairs at each step.

Backward recomputes each step from the saved ``q``, ``out`` and ``ℓ`` (FlashAttention's
rule ``P = e^{S − ℓ}``, ``dS = P ⊙ (dP − rowsum(dO ⊙ O))``): the K/V blocks travel round the
ring again, and with each goes the running sum of its ``dK``/``dV`` (in the work dtype), which
arrives back at its owner after the last step.

Cost per rank: O(N²·D/W) time (about half under causal with zigzag). Memory per rank, all
O(N/W): the K/V block in use and the next one arriving (sent as they are, never copied into one
buffer), the output and log-sum-exp in the work dtype, one score tile of ``TILE_ELEMENTS``;
backward adds the block's running ``dK, dV`` sum in flight and the one arriving. Communication
per rank: forward ``(W−1)·|KV|``, backward ``(W−1)·|KV| + W·|dKV|`` bytes sent, where ``|KV|``
is one rank's keys and values and ``|dKV|`` their gradients in the work dtype.
"""

from __future__ import annotations

import torch

from ..backends.partial import merge_partials, partial_attention
from . import comm
from .layout import Chunk
from .plan import Setup, shard_masks

#: Score elements (batch · heads · rows · keys) of one tile; bounds the working memory.
TILE_ELEMENTS = 1 << 20


def _relation(qc: Chunk, kc: Chunk, causal: bool) -> str:
    if not causal or kc.stop - 1 <= qc.start:
        return "full"
    if kc.start > qc.stop - 1:
        return "none"
    return "partial"


def _step_plan(setup: Setup, src: int) -> list[tuple[Chunk, Chunk, bool]]:
    """The pairs (query chunk of this rank, key chunk of ``src``) that see anything of each other
    (pairs that see nothing under ``causal`` are skipped), and whether the pair needs a causal mask."""
    plan = []
    for qc in setup.chunks:
        for kc in setup.layout.chunks(src):
            rel = _relation(qc, kc, setup.causal)
            if rel != "none":
                plan.append((qc, kc, rel == "partial"))
    return plan


def _tiles(setup: Setup, qc: Chunk, keys: int):
    rows = max(1, TILE_ELEMENTS // max(1, setup.batch * setup.heads * keys))
    for t0 in range(0, qc.length, rows):
        yield t0, min(qc.length, t0 + rows)


def _seen(qc: Chunk, kc: Chunk, t1: int, partial: bool) -> int:
    """How many keys of ``kc`` rows ``..t1`` of ``qc`` can see at all: causal tiles stop at their
    last row's position, so the future part of a diagonal block is never computed."""
    if not partial:
        return kc.length
    return max(0, min(kc.length, qc.start + t1 - kc.start))


def _tile_mask(qc: Chunk, kc: Chunk, t0: int, t1: int, m: int, partial: bool, pad, groups: int, device):
    """Bool ``(B|1, 1, G·T, m)`` (True = visible) for rows ``t0:t1`` of ``qc`` over the first ``m``
    keys of ``kc``, or None when every pair is visible."""
    mask = None
    if partial:
        qpos = torch.arange(qc.start + t0, qc.start + t1, device=device)
        kpos = torch.arange(kc.start, kc.start + m, device=device)
        mask = (kpos[None, :] <= qpos[:, None])[None]  # (1, T, m)
    if pad is not None:
        keep = ~pad[:, None, kc.local : kc.local + m]  # (B, 1, m)
        mask = keep if mask is None else mask & keep
    if mask is None:
        return None
    b, t = mask.shape[0], t1 - t0
    return mask[:, None, None].expand(b, 1, groups, t, m).reshape(b, 1, groups * t, m)


def _rows(x: torch.Tensor, qc: Chunk, t0: int, t1: int) -> torch.Tensor:
    """Rows ``t0:t1`` of chunk ``qc`` of ``x`` ``(B, Hkv, G, n, ·)`` as ``(B, Hkv, G·T, ·)``."""
    part = x[:, :, :, qc.local + t0 : qc.local + t1]
    return part.reshape(*part.shape[:2], -1, part.shape[-1])


def _forward_step(setup: Setup, qg, keys, values, src: int, out, lse, started: set[int], masks) -> None:
    """Merge the attention of this rank's queries over ``src``'s K/V block into ``out``/``lse``.
    (A function of its own, so that its views of the block die before the next one arrives.)"""
    B, Hkv, G = qg.shape[:3]
    Dv = out.shape[-1]
    pad = None if masks is None else masks[src]
    for qc, kc, partial in _step_plan(setup, src):
        ks = keys.narrow(2, kc.local, kc.length).to(setup.work_dtype)
        vs = values.narrow(2, kc.local, kc.length).to(setup.work_dtype)
        for t0, t1 in _tiles(setup, qc, kc.length):
            m = _seen(qc, kc, t1, partial)
            if m == 0:
                continue
            mask = _tile_mask(qc, kc, t0, t1, m, partial, pad, G, qg.device)
            o, ell = partial_attention(_rows(qg, qc, t0, t1), ks[:, :, :m], vs[:, :, :m], scale=setup.scale, mask=mask)
            rows = slice(qc.local + t0, qc.local + t1)
            o, ell = o.reshape(B, Hkv, G, t1 - t0, Dv), ell.reshape(B, Hkv, G, t1 - t0)
            if qc.local in started:
                o, ell = merge_partials(out[:, :, :, rows], lse[:, :, :, rows], o, ell)
            out[:, :, :, rows], lse[:, :, :, rows] = o, ell
        started.add(qc.local)


def _pass_on(g, k: torch.Tensor, v: torch.Tensor, incoming: int) -> comm.Pending:
    """Send this K/V block to the next rank and receive the previous rank's (``incoming``
    positions): two messages each way, so the block is never copied into one buffer."""
    nxt, prv = (g.rank + 1) % g.world, (g.rank - 1) % g.world
    shape_k, shape_v = list(k.shape), list(v.shape)
    shape_k[2] = shape_v[2] = incoming
    return comm.post(g, [(nxt, k), (nxt, v)], [(prv, k.new_empty(shape_k)), (prv, v.new_empty(shape_v))], tag=3)


def _forward(setup: Setup, q, k, v, masks):
    g, lay = setup.g, setup.layout
    B, H, n, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    work = setup.work_dtype
    qg = q.reshape(B, Hkv, G, n, D).to(work)
    out = torch.zeros(B, Hkv, G, n, Dv, dtype=work, device=q.device)
    lse = torch.full((B, Hkv, G, n), float("-inf"), dtype=work, device=q.device)
    started: set[int] = set()  # query chunks (by local offset) that some step has written
    for t in range(g.world):
        src = (g.rank - t) % g.world
        pending = _pass_on(g, k, v, lay.lengths[(src - 1) % g.world]) if t < g.world - 1 else None
        _forward_step(setup, qg, k, v, src, out, lse, started, masks)
        if pending is not None:
            k, v = pending.wait()  # the block just sent is dropped: two blocks in flight at most
    return out, lse


def _tile_grads(qt, kt, vt, dot, lse_t, delta_t, mask, scale):
    """Gradients of one tile given the final ``ℓ`` (``+∞`` for rows that see nothing) and
    ``delta = rowsum(dO ⊙ O)``: ``(dq, dk, dv)`` of the tile, in the work dtype. Runs outside
    autograd, so the score-sized blocks are reused in place."""
    s = torch.matmul(qt, kt.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        s.masked_fill_(mask.logical_not(), float("-inf"))
    p = s.sub_(lse_t[..., None]).exp_()
    dv = torch.matmul(p.transpose(-1, -2), dot)
    ds = torch.matmul(dot, vt.transpose(-1, -2)).sub_(delta_t[..., None]).mul_(p)
    return torch.matmul(ds, kt).mul_(scale), torch.matmul(ds.transpose(-1, -2), qt).mul_(scale), dv


def _backward_step(setup: Setup, qg, do, lse, delta, keys, values, src: int, dq, masks) -> torch.Tensor:
    """This rank's contribution to ``src``'s ``[dK, dV]`` (work dtype), adding to ``dq`` in place."""
    B, Hkv, G, _, D = qg.shape
    work = setup.work_dtype
    dkv = torch.zeros(B, Hkv, keys.shape[2], D + values.shape[-1], dtype=work, device=qg.device)
    pad = None if masks is None else masks[src]
    for qc, kc, partial in _step_plan(setup, src):
        ks = keys.narrow(2, kc.local, kc.length).to(work)
        vs = values.narrow(2, kc.local, kc.length).to(work)
        dkc = dkv.narrow(2, kc.local, kc.length)
        for t0, t1 in _tiles(setup, qc, kc.length):
            m = _seen(qc, kc, t1, partial)
            if m == 0:
                continue
            mask = _tile_mask(qc, kc, t0, t1, m, partial, pad, G, qg.device)
            rows = slice(qc.local + t0, qc.local + t1)
            dqt, dkt, dvt = _tile_grads(
                _rows(qg, qc, t0, t1),
                ks[:, :, :m],
                vs[:, :, :m],
                _rows(do, qc, t0, t1),
                lse[:, :, :, rows].reshape(B, Hkv, -1),
                delta[:, :, :, rows].reshape(B, Hkv, -1),
                mask,
                setup.scale,
            )
            dq[:, :, :, rows] += dqt.reshape(B, Hkv, G, t1 - t0, D)
            dkc[:, :, :m, :D] += dkt
            dkc[:, :, :m, D:] += dvt
    return dkv


def _backward(setup: Setup, q, k, v, out, lse, dout, masks):
    g, lay = setup.g, setup.layout
    B, H, n, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    work = setup.work_dtype
    qg = q.reshape(B, Hkv, G, n, D).to(work)
    do = dout.reshape(B, Hkv, G, n, Dv).to(work)
    delta = (do * out).sum(-1)
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
    dq = torch.zeros_like(qg)
    if g.world == 1:
        dkv = _backward_step(setup, qg, do, lse, delta, k, v, g.rank, dq, masks)
        return dq.reshape(B, H, n, D), dkv[..., :D], dkv[..., D:]
    nxt, prv = (g.rank + 1) % g.world, (g.rank - 1) % g.world
    acc_pending = None
    for t in range(g.world):
        src = (g.rank - t) % g.world
        kv_pending = _pass_on(g, k, v, lay.lengths[(src - 1) % g.world]) if t < g.world - 1 else None
        dkv = _backward_step(setup, qg, do, lse, delta, k, v, src, dq, masks)
        if acc_pending is not None:
            dkv += acc_pending.wait()[0]  # what the ranks before added for this block
        buf = dkv.new_empty(B, Hkv, lay.lengths[(src - 1) % g.world], D + Dv)
        acc_pending = comm.post(g, [(nxt, dkv)], [(prv, buf)], tag=4)
        del dkv, buf
        if kv_pending is not None:
            k, v = kv_pending.wait()
    assert acc_pending is not None
    mine = acc_pending.wait()[0]  # after W steps this rank's own block's sum has come home
    return dq.reshape(B, H, n, D), mine[..., :D], mine[..., D:]


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, setup, masks):
        out, lse = _forward(setup, q, k, v, masks)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup, ctx.masks = setup, masks
        B, Hkv, G, n, Dv = out.shape
        return out.reshape(B, Hkv * G, n, Dv).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(ctx.setup, q, k, v, out, lse, dout, ctx.masks)
        need = ctx.needs_input_grad
        return (
            dq.to(q.dtype) if need[0] else None,
            dk.to(k.dtype) if need[1] else None,
            dv.to(v.dtype) if need[2] else None,
            None,
            None,
        )


def run(setup: Setup, q, k, v, key_padding_mask):
    """This rank's output shard of exact attention over the whole sequence (see the module docstring)."""
    return _Ring.apply(q, k, v, setup, shard_masks(setup, key_padding_mask))
