"""What every rank agreed on before any data moves: one :class:`Setup` per distributed call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..registry import VariantSpec
from . import comm
from .comm import Group
from .layout import Chunk, Layout


class StrategyError(ValueError):
    """A strategy that does not exist for this variant or cannot run this call; the message says why."""


@dataclass(frozen=True)
class Setup:
    """A distributed call after every rank's checks and their agreement.

    Shapes are per rank: q ``(batch, heads, n, head_dim)``, k ``(batch, kv_heads, n, head_dim)``,
    v ``(batch, kv_heads, n, v_dim)`` with ``n = layout.lengths[g.rank]``.
    """

    g: Group
    layout: Layout
    spec: VariantSpec
    params: dict[str, Any]
    causal: bool
    scale: float
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    v_dim: int
    padding: bool
    grad: bool
    dtype: torch.dtype
    device: torch.device

    @property
    def variant(self) -> str:
        return self.spec.name

    @property
    def chunks(self) -> tuple[Chunk, ...]:
        """This rank's runs of global positions."""
        return self.layout.chunks(self.g.rank)

    @property
    def n(self) -> int:
        """This rank's shard length."""
        return self.layout.lengths[self.g.rank]

    @property
    def total(self) -> int:
        return self.layout.total

    @property
    def work_dtype(self) -> torch.dtype:
        return torch.promote_types(self.dtype, torch.float32)


def shard_masks(setup: Setup, key_padding_mask: torch.Tensor | None) -> list[torch.Tensor] | None:
    """Every rank's key padding mask shard, ``[(batch, lengths[r]) bool for each rank r]``, on
    every rank (one all-gather of ``batch·N`` bytes); ``None`` without padding."""
    if not setup.padding:
        return None
    assert key_padding_mask is not None
    rows = comm.gather_shards(setup.g, key_padding_mask.t().to(torch.uint8), setup.layout.lengths)
    return [part.t().bool() for part in torch.split(rows, list(setup.layout.lengths))]


def global_mask(setup: Setup, key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The whole key padding mask ``(batch, N)`` in global order, on every rank; ``None`` without padding."""
    masks = shard_masks(setup, key_padding_mask)
    if masks is None:
        return None
    whole = torch.cat(masks, dim=1)
    return whole if setup.layout.in_order else whole.index_select(1, setup.layout.order().to(whole.device))
