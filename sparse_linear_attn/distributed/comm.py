"""Communication for the distributed strategies: torch.distributed collectives and paired
point-to-point messages, with the autograd rules that make them differentiable.

Nothing here transports data itself; every byte goes through ``torch.distributed``. Each call
waits on the process group's own timeout (``init_process_group(timeout=...)`` /
``new_group(timeout=...)``), so a rank that never arrives makes the others fail with an error
after that time instead of hanging for ever.

Point-to-point exchanges post every send and receive before waiting on any: on gloo as paired
``isend``/``irecv`` (gloo's ``batch_isend_irecv`` can hang), on NCCL as one
``batch_isend_irecv`` (NCCL needs the group call to keep a ring of blocking sends from
deadlocking).

:data:`traffic` counts, per operation, the bytes this rank's calls put on the wire under the
textbook algorithm of each (ring all-gather ``(W−1)·|x|``, reduce-scatter and all-to-all
``(W−1)/W·|x|``, all-reduce ``2(W−1)/W·|x|``, a message its size); the benchmark compares it
with the bytes the process really wrote to its sockets.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

#: Bytes sent by this rank's calls, by operation (see the module docstring). Reset it freely.
traffic: Counter = Counter()


@dataclass(frozen=True)
class Group:
    """A process group as the strategies use it: its handle, this process's rank in it, its
    size, its backend, and the device small control tensors must live on for that backend."""

    handle: dist.ProcessGroup | None
    rank: int
    world: int
    backend: str
    device: torch.device

    def global_rank(self, rank: int) -> int:
        if self.handle is None:
            return rank
        return dist.get_global_rank(self.handle, rank)


def resolve(group=None) -> Group:
    """``group`` (``None``: the default group) as a :class:`Group`; a clear error when
    torch.distributed is not initialised or this process is not a member."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(backend, ...) "
            "on every rank first (gloo on CPUs, nccl on GPUs), with a timeout= so that a missing rank "
            "fails fast"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("this process is not a member of the given process group")
    backend = str(dist.get_backend(group)).lower()
    device = torch.device("cpu")
    if "nccl" in backend:
        device = torch.device("cuda", torch.cuda.current_device())
    return Group(group, rank, dist.get_world_size(group), backend, device)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------
# Collectives (plain, then differentiable).

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather(g: Group, x: torch.Tensor) -> torch.Tensor:
    """``(W, *x.shape)``: every rank's ``x`` (equal shapes), on every rank."""
    flat = x.contiguous().reshape(-1)
    if g.world == 1:
        return flat.clone().reshape(1, *x.shape)
    out = flat.new_empty(g.world * flat.numel())
    traffic["all_gather"] += (g.world - 1) * _nbytes(flat)
    _all_gather_single(out, flat, group=g.handle)
    return out.reshape(g.world, *x.shape)


def reduce_scatter(g: Group, y: torch.Tensor) -> torch.Tensor:
    """``Σ_r y_r[me]`` for ``y`` ``(W, ...)`` on every rank ``r``: this rank's slice of the sum."""
    if g.world == 1:
        return y[0].clone()
    flat = y.contiguous().reshape(-1)
    out = flat.new_empty(flat.numel() // g.world)
    traffic["reduce_scatter"] += (g.world - 1) * _nbytes(out)
    _reduce_scatter_single(out, flat, group=g.handle)
    return out.reshape(y.shape[1:])


def all_reduce(g: Group, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A reduced copy of ``x`` (sum by default) over the group."""
    x = x.contiguous().clone()
    if g.world > 1:
        traffic["all_reduce"] += 2 * (g.world - 1) * _nbytes(x) // g.world
        dist.all_reduce(x, op=op, group=g.handle)
    return x


_A2A_UNSUPPORTED: set[str] = set()


def all_to_all(g: Group, x: torch.Tensor) -> torch.Tensor:
    """For ``x`` ``(W, ...)``: ``out[r]`` is rank ``r``'s ``x[me]``.

    Backends without all-to-all fall back to an all-gather of the whole ``x`` (``W×`` the bytes).
    """
    x = x.contiguous()
    if g.world == 1:
        return x.clone()
    if g.backend not in _A2A_UNSUPPORTED:
        out = torch.empty_like(x)
        try:
            dist.all_to_all_single(out, x, group=g.handle)
        except RuntimeError as e:  # the same on every rank: a property of the backend
            if "support" not in str(e).lower():
                raise
            _A2A_UNSUPPORTED.add(g.backend)
        else:
            traffic["all_to_all"] += (g.world - 1) * _nbytes(x) // g.world
            return out
    return all_gather(g, x)[:, g.rank]


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return all_gather(g, x)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss may use every rank's copy of x: this rank's x gets the sum.
        return reduce_scatter(ctx.g, grad), None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return all_reduce(g, x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(ctx.g, grad), None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return all_to_all(g, x)

    @staticmethod
    def backward(ctx, grad):
        # out_me[r] = x_r[me], so d/dx_me[j] = grad_j[me]: the same exchange of the gradients.
        return all_to_all(ctx.g, grad), None


def gather_diff(g: Group, x: torch.Tensor) -> torch.Tensor:
    """:func:`all_gather`, differentiable (backward: reduce-scatter of the gradients)."""
    return _AllGather.apply(x, g)


def all_reduce_diff(g: Group, x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiable (backward: the sum of the gradients)."""
    return _AllReduceSum.apply(x, g)


def all_to_all_diff(g: Group, x: torch.Tensor) -> torch.Tensor:
    """:func:`all_to_all`, differentiable (backward: the same exchange of the gradients)."""
    return _AllToAll.apply(x, g)


def gather_shards(g: Group, x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Every rank's ``x`` (``lengths[r]`` rows along dim 0) concatenated in rank order, on every
    rank; differentiable. Unequal lengths are padded to the longest for the all-gather."""
    longest = max(lengths)
    padded = x
    if x.shape[0] < longest:
        padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    whole = gather_diff(g, padded) if x.requires_grad else all_gather(g, padded)
    if all(n == longest for n in lengths):
        return whole.reshape(-1, *x.shape[1:])
    return torch.cat([whole[r, :n] for r, n in enumerate(lengths)])


def gather_ints(g: Group, values: Sequence[int], device=None) -> list[list[int]]:
    """Every rank's list of ints (equal lengths), on every rank."""
    t = torch.tensor(list(values), dtype=torch.int64, device=g.device if device is None else device)
    if t.device.type != g.device.type:
        t = t.to(g.device)
    return all_gather(g, t).tolist()


# ---------------------------------------------------------------------------------------------
# Point-to-point.


class Pending:
    """Posted sends and receives; :meth:`wait` returns the receive buffers once all arrived."""

    def __init__(self, works: list[Any], received: list[torch.Tensor], keep: list[torch.Tensor]):
        self._works, self._received, self._keep = works, received, keep

    def wait(self) -> list[torch.Tensor]:
        for w in self._works:
            w.wait()
        self._works, self._keep = [], []
        return self._received


def post(
    g: Group,
    sends: Sequence[tuple[int, torch.Tensor]],
    recvs: Sequence[tuple[int, torch.Tensor]],
    *,
    tag: int = 0,
) -> Pending:
    """Post messages ``(peer, tensor)`` to send and buffers ``(peer, tensor)`` to receive into.

    Messages between one pair of ranks are matched in the order posted, so every rank must
    post its part of an exchange in the same order as its peers expect (``tag`` separates
    exchanges that run at the same time). Messages to oneself are copied.
    """
    sends = [(p, t.contiguous()) for p, t in sends]
    own = [t for p, t in sends if p == g.rank]
    received: list[torch.Tensor] = []
    works: list[Any] = []
    ops: list[dist.P2POp] = []
    for p, buf in recvs:
        if p == g.rank:
            buf.copy_(own.pop(0))
        received.append(buf)
    for p, t in sends:
        if p != g.rank:
            traffic["p2p"] += _nbytes(t)
    remote_sends = [(p, t) for p, t in sends if p != g.rank]
    remote_recvs = [(p, b) for p, b in recvs if p != g.rank]
    if "nccl" in g.backend:
        for p, t in remote_sends:
            ops.append(dist.P2POp(dist.isend, t, g.global_rank(p), g.handle, tag))
        for p, b in remote_recvs:
            ops.append(dist.P2POp(dist.irecv, b, g.global_rank(p), g.handle, tag))
        if ops:
            works = dist.batch_isend_irecv(ops)
    else:
        for p, b in remote_recvs:
            works.append(dist.irecv(b, g.global_rank(p), group=g.handle, tag=tag))
        for p, t in remote_sends:
            works.append(dist.isend(t, g.global_rank(p), group=g.handle, tag=tag))
    return Pending(works, received, [t for _, t in remote_sends])


# ---------------------------------------------------------------------------------------------
# Fetching ranges of a sharded sequence (halo exchange, block fetch).


@dataclass(frozen=True)
class FetchPlan:
    """Who sends which pieces of their shard to whom, so that each rank ends up with the
    global ranges it asked for. Built identically on every rank from every rank's needs.

    ``pieces``: this rank's output, in order: ``(source rank, local start, length)``.
    ``sends``: ``(destination, [(local start, length), ...])``, each destination's pieces of
    this rank's shard in the order the destination needs them.
    """

    pieces: tuple[tuple[int, int, int], ...]
    sends: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]

    @property
    def length(self) -> int:
        return sum(p[2] for p in self.pieces)

    def receives(self) -> list[tuple[int, int]]:
        """``(source, length)`` of each remote message, sources in increasing order."""
        sizes: dict[int, int] = {}
        for src, _, n in self.pieces:
            sizes[src] = sizes.get(src, 0) + n
        return sorted(sizes.items())


def fetch_plan(layout, needs: Sequence[Sequence[tuple[int, int]]], rank: int) -> FetchPlan:
    """The plan for ``rank`` when rank ``r`` needs global ranges ``needs[r]`` (in that order)."""
    mine = []
    for start, stop in needs[rank]:
        mine += layout.owners(start, stop)
    sends = []
    for dst, ranges in enumerate(needs):
        if dst == rank:
            continue
        pieces = []
        for start, stop in ranges:
            pieces += [(s, n) for src, s, n in layout.owners(start, stop) if src == rank]
        if pieces:
            sends.append((dst, tuple(pieces)))
    return FetchPlan(tuple(mine), tuple(sends))


def _pack(xs: Sequence[torch.Tensor], pieces, dim: int) -> torch.Tensor:
    """One flat message: for each tensor in turn, its ``pieces`` ``(start, length)`` along ``dim``."""
    return torch.cat([torch.cat([x.narrow(dim, s, n) for s, n in pieces], dim).reshape(-1) for x in xs])


def _unpack(buf: torch.Tensor, shapes: Sequence[torch.Size], length: int, dim: int) -> list[torch.Tensor]:
    """The inverse of :func:`_pack` for a message of ``length`` positions along ``dim``."""
    out, at = [], 0
    for shape in shapes:
        size = list(shape)
        size[dim] = length
        numel = math.prod(size)
        out.append(buf[at : at + numel].view(size))
        at += numel
    return out


def _per_position(shapes: Sequence[torch.Size], dim: int) -> int:
    return sum(math.prod(shape) // shape[dim] for shape in shapes)


def _exchange(g: Group, xs: Sequence[torch.Tensor], plan: FetchPlan, dim: int) -> list[torch.Tensor]:
    """Forward of :func:`fetch`: for each tensor, the planned pieces concatenated along ``dim``."""
    shapes = [x.shape for x in xs]
    sends = [(dst, _pack(xs, pieces, dim)) for dst, pieces in plan.sends]
    sizes = [(src, n) for src, n in plan.receives() if src != g.rank]
    recvs = [(src, xs[0].new_empty(n * _per_position(shapes, dim))) for src, n in sizes]
    got = {src: _unpack(buf, shapes, n, dim) for (src, n), buf in zip(sizes, post(g, sends, recvs, tag=1).wait())}
    offsets = dict.fromkeys(got, 0)
    parts: list[list[torch.Tensor]] = [[] for _ in xs]
    for src, s, n in plan.pieces:
        for i, x in enumerate(xs):
            parts[i].append(x.narrow(dim, s, n) if src == g.rank else got[src][i].narrow(dim, offsets[src], n))
        if src != g.rank:
            offsets[src] += n
    return [
        torch.cat(p, dim) if len(p) > 1 else p[0].clone() if p else x.narrow(dim, 0, 0).clone()
        for p, x in zip(parts, xs)
    ]


def _exchange_back(
    g: Group, grads: Sequence[torch.Tensor], plan: FetchPlan, shapes: Sequence[torch.Size], dim: int
) -> list[torch.Tensor]:
    """Backward of :func:`fetch`: each piece's gradient returns to, and is added at, its source."""
    outs = [grad.new_zeros(shape) for grad, shape in zip(grads, shapes)]
    by_src: dict[int, list[tuple[int, int]]] = {}
    at = 0
    for src, s, n in plan.pieces:
        if src == g.rank:
            for out, grad in zip(outs, grads):
                out.narrow(dim, s, n).add_(grad.narrow(dim, at, n))
        else:
            by_src.setdefault(src, []).append((at, n))
        at += n
    sends = [(src, _pack(grads, pieces, dim)) for src, pieces in sorted(by_src.items())]
    per_position = _per_position(shapes, dim)
    recvs = [(dst, grads[0].new_empty(sum(n for _, n in pieces) * per_position)) for dst, pieces in plan.sends]
    for (_dst, pieces), buf in zip(plan.sends, post(g, sends, recvs, tag=2).wait()):
        length = sum(n for _, n in pieces)
        for out, part in zip(outs, _unpack(buf, shapes, length, dim)):
            at = 0
            for s, n in pieces:
                out.narrow(dim, s, n).add_(part.narrow(dim, at, n))
                at += n
    return outs


class _Fetch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, plan, dim, *xs):
        ctx.g, ctx.plan, ctx.dim = g, plan, dim
        ctx.shapes = [x.shape for x in xs]
        return tuple(_exchange(g, xs, plan, dim))

    @staticmethod
    def backward(ctx, *grads):
        filled = []
        for grad, shape in zip(grads, ctx.shapes):
            if grad is None:  # an output that no loss used
                size = list(shape)
                size[ctx.dim] = ctx.plan.length
                grad = torch.zeros(size, dtype=next(gr for gr in grads if gr is not None).dtype)
            filled.append(grad.contiguous())
        return (None, None, None, *_exchange_back(ctx.g, filled, ctx.plan, ctx.shapes, ctx.dim))


def fetch(g: Group, xs: Sequence[torch.Tensor], plan: FetchPlan, dim: int = 2) -> list[torch.Tensor]:
    """For each tensor of ``xs`` (shards of the sequence along ``dim``, one dtype), the pieces
    ``plan`` names, concatenated along ``dim``: local pieces are copied, remote ones arrive in
    one message per pair of ranks. Every rank must call it with its plan of the same exchange.
    Differentiable: gradients travel back to the pieces' owners."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        return list(_Fetch.apply(g, plan, dim, *xs))
    return _exchange(g, xs, plan, dim)


@contextmanager
def counting():
    """``with counting() as c: ...`` → ``c`` holds the bytes counted inside, by operation."""
    before = Counter(traffic)
    result: Counter = Counter()
    try:
        yield result
    finally:
        result.update({k: traffic[k] - before.get(k, 0) for k in traffic if traffic[k] != before.get(k, 0)})


__all__ = [
    "FetchPlan",
    "Group",
    "Pending",
    "all_gather",
    "all_reduce",
    "all_reduce_diff",
    "all_to_all",
    "all_to_all_diff",
    "counting",
    "fetch",
    "fetch_plan",
    "gather_diff",
    "gather_ints",
    "gather_shards",
    "post",
    "reduce_scatter",
    "resolve",
    "traffic",
]
