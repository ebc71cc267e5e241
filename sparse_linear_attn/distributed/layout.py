"""Where each position of a sharded sequence lives: the layouts, and ``shard``, ``unshard``, ``positions``.

A sequence of ``N`` positions is split over the ``W`` ranks of a process group:

* ``contiguous`` — rank ``r`` holds one run of positions, rank 0 the first. ``shard`` gives the
  first ``N mod W`` ranks one position more (``torch.tensor_split``); ``attention`` accepts any
  lengths ≥ 1 (ranks learn each other's lengths in their one agreement exchange).
* ``zigzag`` — the sequence is cut into ``2W`` equal chunks and rank ``r`` holds chunks ``r`` and
  ``2W−1−r``, in that order. Under ``causal=True`` every rank then has the same amount of work
  (an early chunk that sees little and a late one that sees much). Needs ``N`` divisible by ``2W``.

A :class:`Layout` (the layout's name and every rank's shard length) answers which global
positions a rank holds (:meth:`Layout.chunks`) and which rank holds a range (:meth:`Layout.owners`);
the strategies plan their communication from it, identically on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..errors import ShapeError, UnknownNameError, unknown_name_message
from . import comm

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Chunk:
    """A run of consecutive global positions held by one rank: ``[start, start + length)``,
    stored at ``[local, local + length)`` of that rank's shard."""

    start: int
    length: int
    local: int

    @property
    def stop(self) -> int:
        return self.start + self.length


def check_layout_name(name: object) -> str:
    if not isinstance(name, str) or name not in LAYOUTS:
        raise UnknownNameError(unknown_name_message("layout", str(name), LAYOUTS))
    return name


def layout_problem(name: str, lengths: tuple[int, ...]) -> str | None:
    """Why these shard lengths cannot form layout ``name`` (``None``: they can)."""
    if any(n < 1 for n in lengths):
        return f"every rank needs at least one position; shard lengths by rank: {list(lengths)}"
    if name == "zigzag":
        w = len(lengths)
        if len(set(lengths)) != 1 or lengths[0] % 2:
            return (
                f"layout 'zigzag' needs N divisible by 2·W = {2 * w}, so equal, even shard lengths; "
                f"got shard lengths by rank {list(lengths)} (N = {sum(lengths)})"
            )
    return None


@dataclass(frozen=True)
class Layout:
    """Layout ``name`` with shard length ``lengths[r]`` on rank ``r``."""

    name: str
    lengths: tuple[int, ...]

    def __post_init__(self):
        check_layout_name(self.name)
        problem = layout_problem(self.name, self.lengths)
        if problem:
            raise ShapeError(problem)

    @property
    def world(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @cached_property
    def _chunks(self) -> tuple[tuple[Chunk, ...], ...]:
        w = self.world
        if self.name == "contiguous":
            starts = [sum(self.lengths[:r]) for r in range(w)]
            return tuple((Chunk(starts[r], self.lengths[r], 0),) for r in range(w))
        c = self.lengths[0] // 2
        return tuple((Chunk(r * c, c, 0), Chunk((2 * w - 1 - r) * c, c, c)) for r in range(w))

    def chunks(self, rank: int) -> tuple[Chunk, ...]:
        """The runs of global positions rank ``rank`` holds, in the order of its shard."""
        return self._chunks[rank]

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """Global position of each element of rank ``rank``'s shard: int64 ``(lengths[rank],)``."""
        return torch.cat([torch.arange(c.start, c.stop, device=device) for c in self.chunks(rank)])

    def owners(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """The pieces of global range ``[start, stop)``: ``(rank, local_start, length)`` in order."""
        pieces = []
        for rank in range(self.world):
            for c in self.chunks(rank):
                lo, hi = max(start, c.start), min(stop, c.stop)
                if lo < hi:
                    pieces.append((lo, rank, c.local + lo - c.start, hi - lo))
        return [p[1:] for p in sorted(pieces)]

    @property
    def in_order(self) -> bool:
        """Whether the rank-major concatenation of the shards is already the global order."""
        return self.name == "contiguous"

    def order(self) -> torch.Tensor:
        """``g = order()``: the rank-major concatenation of all shards, indexed by ``g``, is the
        sequence in global order (int64 ``(N,)``)."""
        return torch.argsort(torch.cat([self.positions(r) for r in range(self.world)]))


def _split(x: torch.Tensor, dim: int, name: str, world: int, rank: int) -> torch.Tensor:
    n = x.shape[dim]
    if name == "contiguous":
        if n < world:
            raise ShapeError(f"cannot shard {n} positions over {world} ranks: every rank needs at least one")
        return torch.tensor_split(x, world, dim=dim)[rank]
    if n % (2 * world):
        raise ShapeError(
            f"layout 'zigzag' needs the sequence length divisible by 2·W = {2 * world}; got {n} (dim {dim})"
        )
    c = n // (2 * world)
    return torch.cat([x.narrow(dim, rank * c, c), x.narrow(dim, (2 * world - 1 - rank) * c, c)], dim=dim)


def _dim(x: torch.Tensor, dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ShapeError(f"dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def shard(x: torch.Tensor, *, group=None, layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """This rank's shard of ``x``, a tensor every rank holds whole, along ``dim`` (the sequence).

    ``dim=2`` fits ``(B, H, N, D)``; use ``dim=1`` for a key padding mask ``(B, N)``. Local: no
    communication. ``contiguous`` returns a view (``torch.tensor_split``), ``zigzag`` a copy.
    """
    check_layout_name(layout)
    g = comm.resolve(group)
    return _split(x, _dim(x, dim), layout, g.world, g.rank)


def unshard(x: torch.Tensor, *, group=None, layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """The whole tensor from every rank's shard ``x`` along ``dim``, on every rank (collective).

    Differentiable: the gradient each rank receives is the sum over ranks of their gradients
    with respect to their copy of the whole, restricted to its shard. Costs two all-gathers
    (shard lengths, then the data).
    """
    check_layout_name(layout)
    g = comm.resolve(group)
    d = _dim(x, dim)
    lengths = comm.gather_ints(g, [x.shape[d]], device=x.device)
    lay = Layout(layout, tuple(row[0] for row in lengths))
    moved = x.movedim(d, 0)
    whole = comm.gather_shards(g, moved, lay.lengths)  # rank-major concatenation
    return whole.index_select(0, lay.order().to(x.device)).movedim(0, d)


def positions(n_local: int, *, group=None, layout: str = "contiguous") -> torch.Tensor:
    """Global positions (int64 ``(n_local,)``, on the CPU) of this rank's ``n_local`` positions.

    For RoPE, ALiBi or masks built from positions. ``contiguous`` is collective (ranks exchange
    their lengths, so unequal shards work); ``zigzag`` needs no communication.
    """
    check_layout_name(layout)
    if isinstance(n_local, bool) or not isinstance(n_local, int) or n_local < 1:
        raise ShapeError(f"n_local must be a positive int, got {n_local!r}")
    g = comm.resolve(group)
    if layout == "zigzag":
        lengths = (n_local,) * g.world
    else:
        lengths = tuple(row[0] for row in comm.gather_ints(g, [n_local]))
    return Layout(layout, lengths).positions(g.rank)
