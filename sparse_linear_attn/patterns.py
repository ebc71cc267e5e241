"""Named block layouts for ``block_sparse``: which key blocks each query block may see.

A layout is a bool ``(Nq_blocks, Nk_blocks)`` tensor, True where query block ``a`` may attend
to key block ``b``. Block positions are bottom-right aligned like ``causal``: query block ``a``
sits at key block ``a + Nk_blocks − Nq_blocks``.

* ``local``: the own block and ``num_local_blocks − 1`` blocks on each side;
* ``strided`` (Child et al. 2019): ``local`` with ``num_local_blocks = stride``, plus every
  block a multiple of ``stride`` blocks away;
* ``fixed`` (Child et al. 2019): blocks in the same chunk of ``num_local_blocks`` blocks, plus
  the last ``num_global_blocks`` blocks of every chunk ("summary" blocks), seen by all;
* ``longformer``: ``local`` plus ``num_global_blocks`` global blocks at the start, which see
  and are seen by every block;
* ``bigbird``: ``longformer`` plus ``num_random_blocks`` random key blocks per query block,
  drawn from ``seed`` (deterministic; with ``causal=True`` drawn among past blocks, each query
  block from a generator of its own, so that its row does not depend on the sequence length).

Every rule is a function of (query block, key block) — :func:`pattern_rule` — so that decoding
can build one row at a time. Cost O(Nq_blocks·Nk_blocks) per layout, cached.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import torch

from .errors import ParameterError, UnknownNameError, unknown_name_message

PATTERNS = ("bigbird", "fixed", "local", "longformer", "strided")

#: Which parameters each named pattern reads.
PATTERN_PARAMS = {
    "local": ("num_local_blocks",),
    "strided": ("stride",),
    "fixed": ("num_local_blocks", "num_global_blocks"),
    "longformer": ("num_local_blocks", "num_global_blocks"),
    "bigbird": ("num_local_blocks", "num_global_blocks", "num_random_blocks", "seed"),
}


def pattern_layout(*args, **kwargs) -> torch.Tensor:
    """The bool ``(nq_blocks, nk_blocks)`` layout of a named pattern (see the module docstring).

    ``pattern_layout(pattern, nq_blocks, nk_blocks, *, causal=False, num_local_blocks=3,
    num_global_blocks=1, num_random_blocks=2, stride=4, seed=0)``; cached, returns a copy.
    """
    return shared_pattern_layout(*args, **kwargs).clone()


@lru_cache(maxsize=64)
def shared_pattern_layout(
    pattern: str,
    nq_blocks: int,
    nk_blocks: int,
    *,
    causal: bool = False,
    num_local_blocks: int = 3,
    num_global_blocks: int = 1,
    num_random_blocks: int = 2,
    stride: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    """:func:`pattern_layout` without the copy: the cached tensor itself, never to be modified."""
    if not isinstance(pattern, str) or pattern not in PATTERNS:
        raise UnknownNameError(unknown_name_message("block_sparse pattern", str(pattern), PATTERNS))

    def need(name: str, value: int, limit: int, what: str) -> None:
        if value > limit:
            raise ParameterError(
                f"block_sparse pattern {pattern!r}: {name}={value} does not fit the sequence, which "
                f"has {nk_blocks} key block(s) of block_size; accepted: {name} <= {limit} ({what})."
            )

    if pattern == "strided":
        need("stride", stride, nk_blocks, "the number of key blocks")
    if pattern == "fixed":
        need("num_local_blocks", num_local_blocks, nk_blocks, "the number of key blocks")
        if num_global_blocks > num_local_blocks:
            raise ParameterError(
                f"block_sparse pattern 'fixed': num_global_blocks={num_global_blocks} must be <= "
                f"num_local_blocks={num_local_blocks} (summary blocks are the last ones of each chunk)."
            )
    if pattern in ("longformer", "bigbird"):
        need("num_global_blocks", num_global_blocks, nk_blocks, "the number of key blocks")
    if pattern == "bigbird":
        need("num_random_blocks", num_random_blocks, nk_blocks, "the number of key blocks")
    return pattern_rule(
        pattern,
        torch.arange(nq_blocks) + (nk_blocks - nq_blocks),  # aligned query blocks
        nk_blocks,
        causal=causal,
        num_local_blocks=num_local_blocks,
        num_global_blocks=num_global_blocks,
        num_random_blocks=num_random_blocks,
        stride=stride,
        seed=seed,
    )


def pattern_rule(
    pattern: str,
    query_blocks: torch.Tensor,
    nk_blocks: int,
    *,
    causal: bool = False,
    num_local_blocks: int = 3,
    num_global_blocks: int = 1,
    num_random_blocks: int = 2,
    stride: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    """Rows of a named pattern: bool ``(len(query_blocks), nk_blocks)``, True where (aligned)
    query block ``a`` sees key block ``b``.

    With ``causal`` each row depends on ``a`` and ``b`` only, never on the number of blocks
    (non-causal bigbird draws its random blocks among all ``nk_blocks``), so a decoding cache
    can ask for the row of one new query block and get the row of the one-shot call's layout.
    No check that the parameters fit the sequence: :func:`pattern_layout` does those.
    """
    if not isinstance(pattern, str) or pattern not in PATTERNS:
        raise UnknownNameError(unknown_name_message("block_sparse pattern", str(pattern), PATTERNS))
    a = query_blocks[:, None]
    b = torch.arange(nk_blocks)[None, :]
    d = a - b  # > 0: key block in the past
    if pattern == "local":
        return d.abs() < num_local_blocks
    if pattern == "strided":
        return (d.abs() < stride) | (d % stride == 0)
    if pattern == "fixed":
        same_chunk = torch.div(a, num_local_blocks, rounding_mode="floor") == b // num_local_blocks
        summary = (b % num_local_blocks) >= num_local_blocks - num_global_blocks
        return same_chunk | summary
    layout = (d.abs() < num_local_blocks) | (b < num_global_blocks) | (a < num_global_blocks)
    if pattern == "bigbird" and num_random_blocks > 0:
        # Random blocks come from those not already visible (and, causal, not in the future):
        # the num_random_blocks highest of a seeded uniform draw over the allowed ones. Causal
        # rows draw from a generator of their own (seeded by seed and the row), over blocks
        # 0..a only, so that a row is the same whatever the sequence length.
        if causal:
            score = torch.full(layout.shape, -1.0)
            for r, row in enumerate(query_blocks.tolist()):
                if row >= 0:
                    m = min(row + 1, nk_blocks)
                    score[r, :m] = torch.rand(m, generator=_row_generator(seed, row))
        else:
            score = torch.rand(layout.shape, generator=torch.Generator().manual_seed(seed))
        allowed = ~layout & ((b <= a) if causal else torch.ones_like(layout))
        score = score.masked_fill(~allowed, -1.0)
        top, idx = score.topk(min(num_random_blocks, nk_blocks), dim=-1)
        layout = layout.scatter(1, idx, top >= 0) | layout
    return layout


def _row_generator(seed: int, row: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def layout_elements(layout: torch.Tensor, block_size: int, nq: int, nk: int) -> torch.Tensor:
    """The element mask ``(..., nq, nk)`` of a block layout ``(..., nq_blocks, nk_blocks)``:
    each block repeated ``block_size × block_size``, the ragged last ones cut. O(nq·nk)."""
    return layout.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :nq, :nk]
