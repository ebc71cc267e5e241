"""``sla-bench decode``: per-token latency and cache memory of incremental decoding (see
:mod:`sparse_linear_attn.bench.decode`, which adds its own parser)."""

from __future__ import annotations

from ..decode import add_decode_parser as add_parser
from ..decode import cmd_decode as run

NAME = "decode"

__all__ = ["NAME", "add_parser", "run"]
