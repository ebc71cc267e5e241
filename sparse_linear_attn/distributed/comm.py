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


def _exchange(g: Group, x: torch.Tensor, plan: FetchPlan, dim: int) -> torch.Tensor:
    """Forward of :func:`fetch`: the planned pieces, concatenated along ``dim``."""
    sends = [(dst, torch.cat([x.narrow(dim, s, n) for s, n in pieces], dim)) for dst, pieces in plan.sends]
    recvs = []
    for src, n in plan.receives():
        if src != g.rank:
            shape = list(x.shape)
            shape[dim] = n
            recvs.append((src, x.new_empty(shape)))
    got = dict(zip([s for s, _ in recvs], post(g, sends, recvs, tag=1).wait()))
    offsets = dict.fromkeys(got, 0)
    parts = []
    for src, s, n in plan.pieces:
        if src == g.rank:
            parts.append(x.narrow(dim, s, n))
        else:
            parts.append(got[src].narrow(dim, offsets[src], n))
            offsets[src] += n
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0].clone()


def _exchange_back(g: Group, grad: torch.Tensor, plan: FetchPlan, shape, dim: int) -> torch.Tensor:
    """Backward of :func:`fetch`: each piece's gradient returns to, and is added at, its source."""
    out = grad.new_zeros(shape)
    by_src: dict[int, list[torch.Tensor]] = {}
    at = 0
    for src, s, n in plan.pieces:
        piece = grad.narrow(dim, at, n)
        at += n
        if src == g.rank:
            out.narrow(dim, s, n).add_(piece)
        else:
            by_src.setdefault(src, []).append(piece)
    sends = [(src, torch.cat(parts, dim)) for src, parts in sorted(by_src.items())]
    recvs = []
    for dst, pieces in plan.sends:
        size = list(shape)
        size[dim] = sum(n for _, n in pieces)
        recvs.append((dst, grad.new_empty(size)))
    for (_dst, pieces), buf in zip(plan.sends, post(g, sends, recvs, tag=2).wait()):
        at = 0
        for s, n in pieces:
            out.narrow(dim, s, n).add_(buf.narrow(dim, at, n))
            at += n
    return out


class _Fetch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, plan, dim):
        ctx.g, ctx.plan, ctx.dim, ctx.shape = g, plan, dim, x.shape
        return _exchange(g, x, plan, dim)

    @staticmethod
    def backward(ctx, grad):
        return _exchange_back(ctx.g, grad.contiguous(), ctx.plan, ctx.shape, ctx.dim), None, None, None


def fetch(g: Group, x: torch.Tensor, plan: FetchPlan, dim: int = 2) -> torch.Tensor:
    """The pieces of the sharded sequence ``plan`` names, concatenated along ``dim``, from this
    rank's shard ``x`` and messages from their owners. Every rank must call it with its plan of
    the same exchange. Differentiable: gradients travel back to the pieces' owners."""
    if x.requires_grad and torch.is_grad_enabled():
        return _Fetch.apply(x, g, plan, dim)
    return _exchange(g, x, plan, dim)


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
