"""Context parallelism: one long sequence split over the ranks of a ``torch.distributed`` group.

    import torch.distributed as dist
    import sparse_linear_attn as sla

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))   # nccl on GPUs
    q, k, v = (sla.distributed.shard(t, layout="zigzag") for t in (q_all, k_all, v_all))
    out = sla.distributed.attention(q, k, v, "sliding_window", window=256, causal=True, layout="zigzag")
    whole = sla.distributed.unshard(out, layout="zigzag")

``attention`` returns this rank's shard of ``sla.attention`` over the whole sequence, with
gradients; ``strategy`` picks how (``ring``, ``halo``, ``scan``, ``allgather``, ``ulysses``;
``auto`` by the table in :mod:`.strategies`). See docs/distributed.md for each strategy's
communication, memory and limits. Nothing in the single-process path imports this package.
"""

from .api import attention
from .comm import counting, traffic
from .layout import LAYOUTS, Layout, positions, shard, unshard
from .plan import StrategyError
from .strategies import AUTO, AUTO_DEFAULT, STRATEGIES, strategy_table

__all__ = [
    "AUTO",
    "AUTO_DEFAULT",
    "LAYOUTS",
    "STRATEGIES",
    "Layout",
    "StrategyError",
    "attention",
    "counting",
    "positions",
    "shard",
    "strategy_table",
    "traffic",
    "unshard",
]
