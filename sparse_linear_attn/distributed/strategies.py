"""The strategy table: which strategies run which variants, and what ``strategy="auto"`` picks.

Read it like :mod:`sparse_linear_attn.backends.dispatch`'s backend table: ``STRATEGIES`` says
what each strategy moves and which variants it serves (``None``: any), and its ``rules_out``
says why it cannot run a particular call; ``AUTO`` lists, per variant, the strategies
``strategy="auto"`` tries in order (variants not listed try :data:`AUTO_DEFAULT`). Every reason
is collected, and when nothing fits the error lists each strategy with why it was ruled out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UnknownNameError, unknown_name_message
from . import gather, halo, ring, scan, ulysses
from .plan import Setup, StrategyError


@dataclass(frozen=True)
class Strategy:
    name: str
    doc: str
    variants: frozenset[str] | None  # None: any variant
    run: Callable[..., torch.Tensor]
    rules_out: Callable[[Setup], str | None] | None = None
    #: Per-rank memory of K/V-sized tensors, as it scales with the world size W.
    memory: str = ""


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "ring",
            "K/V blocks travel round the ring; partial outputs merge by log-sum-exp",
            frozenset({"full", "dot_product"}),
            ring.run,
            memory="O(N/W)",
        ),
        Strategy(
            "halo",
            "each rank fetches the window's keys beyond its shard (and the sinks) from their owners",
            frozenset({"sliding_window"}),
            halo.run,
            memory="O(N/W + window)",
        ),
        Strategy(
            "scan",
            "all-gather of each chunk's linear-attention state, exclusive prefix sum (non-causal: the total)",
            frozenset({"linear", "performer"}),
            scan.run,
            scan.rules_out,
            memory="O(N/W + W·M·Dv)",
        ),
        Strategy(
            "allgather",
            "every rank gathers the keys/values it needs (block_sparse: only its layout's blocks)",
            None,
            gather.run,
            gather.rules_out,
            memory="O(N) (block_sparse: O(N/W + fetched blocks))",
        ),
        Strategy(
            "ulysses",
            "all-to-all from sequence shards to head shards, the whole sequence per head group, and back",
            None,
            ulysses.run,
            ulysses.rules_out,
            memory="O(N/W)",
        ),
    )
}

#: ``strategy="auto"``: the strategies tried for each variant, in order.
AUTO: dict[str, tuple[str, ...]] = {
    "full": ("ring", "ulysses", "allgather"),
    "dot_product": ("ring", "ulysses", "allgather"),
    "sliding_window": ("halo", "ulysses", "allgather"),
    "block_sparse": ("allgather", "ulysses"),
    "linear": ("scan", "ulysses", "allgather"),
    "performer": ("scan", "ulysses", "allgather"),
    "topk_block": ("allgather", "ulysses"),
    "hybrid": ("allgather", "ulysses"),
}
#: Variants not in :data:`AUTO` (user variants included).
AUTO_DEFAULT = ("ulysses", "allgather")


def check_strategy_name(name: object) -> str:
    if not isinstance(name, str) or (name != "auto" and name not in STRATEGIES):
        raise UnknownNameError(unknown_name_message("strategy", str(name), ["auto", *STRATEGIES]))
    return name


def applicable(variant: str) -> list[str]:
    """Strategies that serve ``variant`` at all."""
    return [s.name for s in STRATEGIES.values() if s.variants is None or variant in s.variants]


def why_not(name: str, setup: Setup) -> str | None:
    """Why strategy ``name`` cannot run this call (``None``: it can)."""
    s = STRATEGIES[name]
    if s.variants is not None and setup.variant not in s.variants:
        return f"it serves {', '.join(sorted(s.variants))} only"
    return s.rules_out(setup) if s.rules_out is not None else None


def choose(setup: Setup, name: str) -> Strategy:
    """The strategy that runs this call: ``name``, or ``auto``'s first that can; else a clear error."""
    if name != "auto":
        reason = why_not(name, setup)
        if reason is not None:
            raise StrategyError(
                f"strategy {name!r} cannot run this {setup.variant!r} call: {reason}. Strategies for "
                f"{setup.variant!r}: {', '.join(applicable(setup.variant))} (or 'auto')."
            )
        return STRATEGIES[name]
    reasons = []
    for candidate in AUTO.get(setup.variant, AUTO_DEFAULT):
        reason = why_not(candidate, setup)
        if reason is None:
            return STRATEGIES[candidate]
        reasons.append(f"{candidate}: {reason}")
    raise StrategyError(f"no strategy can run this {setup.variant!r} call: " + "; ".join(reasons))


def strategy_table() -> str:
    """The strategy table as text (the docs print it)."""
    rows = []
    for s in STRATEGIES.values():
        serves = "any variant" if s.variants is None else ", ".join(sorted(s.variants))
        auto = [v for v, order in AUTO.items() if order[0] == s.name]
        pick = f"; auto's first pick for {', '.join(auto)}" if auto else ""
        rows.append(f"{s.name:9} {serves:22} memory {s.memory}: {s.doc}{pick}")
    return "\n".join(rows)
