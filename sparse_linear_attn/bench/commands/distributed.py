"""``sla-bench distributed``: per-rank time, peak memory and bytes sent of context parallelism
against the world size (see :mod:`sparse_linear_attn.bench.distributed`, which adds its own parser)."""

from __future__ import annotations

from ..distributed import add_distributed_parser as add_parser
from ..distributed import cmd_distributed as run

NAME = "distributed"

__all__ = ["NAME", "add_parser", "run"]
