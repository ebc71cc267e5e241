"""``halo`` — ``sliding_window`` with each rank fetching only the keys its window reaches.

A query chunk ``[a, a + c)`` with window ``w`` sees keys ``[a − w, a + c + w)`` (causal:
``[a − w, a + c)``) clipped to the sequence, plus the first ``sinks`` keys when the variant
has sinks. Each rank asks for exactly those ranges; their owners send them directly (one
message per pair of ranks that share anything, so a window wider than a shard simply reaches
further ranks), and the sinks come from whoever holds the start of the sequence (rank 0).

The local work is the library's own single-process call, ``sla.attention(..., "sliding_window")``,
on the fetched keys. Its window is bottom-right aligned, so the keys handed to it end exactly
where the chunk's aligned position ends: causal, the keys end with the chunk; non-causal, the
chunk is followed by ``min(w, N − a − c)`` zero query rows (computed, then dropped) so that the
keys may run ``w`` past it. Sink keys that the window does not already cover are put in front;
the local call's own ``sinks`` then marks them, and the band does not reach them.

Cost per rank: the single-process call on ``c`` (+ up to ``w`` padding) queries over
``c + w·(1 or 2)`` keys: O((N/W + w)·w·D) time and memory. Communication per rank: about
``w·(1 or 2)`` keys and values received per chunk (+ ``sinks``), and the same bytes of
gradients sent back in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import api
from . import comm
from .plan import Setup


def _chunk_ranges(setup: Setup, rank: int) -> list[list[tuple[int, int]]]:
    """For each chunk of rank ``rank``: the global key ranges it needs, the sinks the window
    does not already cover (if any) first, then the window's span."""
    w, sinks, n = setup.params["window"], setup.params.get("sinks", 0) or 0, setup.total
    out = []
    for c in setup.layout.chunks(rank):
        lo = max(0, c.start - w)
        hi = c.stop if setup.causal else min(n, c.stop + w)
        out.append(([(0, min(sinks, lo))] if min(sinks, lo) > 0 else []) + [(lo, hi)])
    return out


def run(setup: Setup, q, k, v, key_padding_mask):
    """This rank's output shard of ``sliding_window`` over the whole sequence."""
    g = setup.g
    ranges = [_chunk_ranges(setup, r) for r in range(g.world)]
    plan = comm.fetch_plan(setup.layout, [sum(per_chunk, []) for per_chunk in ranges], g.rank)
    ks, vs = comm.fetch(g, [k, v], plan)
    pad = None
    if key_padding_mask is not None:
        (pad8,) = comm.fetch(g, [key_padding_mask.to(torch.uint8)], plan, dim=1)
        pad = pad8.bool()
    outs, at = [], 0
    for c, spans in zip(setup.chunks, ranges[g.rank]):
        stop = at + sum(hi - lo for lo, hi in spans)
        extra = spans[-1][1] - c.stop  # query rows past the chunk so that the keys end where the rows do
        qc = q[:, :, c.local : c.local + c.length]
        if extra:
            qc = F.pad(qc, (0, 0, 0, extra))
        o = api.attention(
            qc,
            ks[:, :, at:stop],
            vs[:, :, at:stop],
            setup.variant,
            causal=setup.causal,
            key_padding_mask=None if pad is None else pad[:, at:stop],
            scale=setup.scale,
            **setup.params,
        )
        outs.append(o[:, :, : c.length])
        at = stop
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
