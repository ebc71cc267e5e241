"""Block-mass estimators for content-adaptive block selection, and their registry.

An estimator guesses, for every (query block, key block) pair, the softmax attention mass that
the block's queries put on that key block, without computing the attention:

    fn(q, k, *, block_size, causal, key_padding_mask, scale) -> scores (B, Hkv, nq_blocks, nk_blocks)

q ``(B, H, Nq, D)``, k ``(B, Hkv, Nk, D)``; query heads that share a key/value head return one
row, their masses summed (so they share one selection). Scores are non-negative; a larger score
means more mass. ``topk_block``'s ``density`` budget uses only their order within a row, its
``mass`` budget their share of the row's total.

**The causal contract.** With ``causal=True`` the row of query block ``a`` may use only queries
with index ``≤ a·block_size`` (the block's first query) and keys at positions ``≤ a·block_size +
Nk − Nq`` (the keys that query sees). Then a selection made from the scores depends on nothing
after any query of the block, and the output at position ``i`` on no input after ``i``. Key
blocks not complete by then cannot be scored; ``topk_block`` keeps them unconditionally, so
their scores are ignored. Every built-in estimator scores row ``a`` from its *scoring window*:

* non-causal: the block's own queries against every key block;
* causal: the ``block_size`` queries ending at the block's first query (``a·bs − bs < t ≤ a·bs``,
  fewer at the start) against the key blocks complete at that query (:func:`scoreable_blocks`).

Built-ins (the cost is for B·H heads of N queries and keys, blocks of ``bs``):

* ``mean_pool``  — softmax over key blocks of ``scale·q̄_a·k̄_b + log n_b``, with ``q̄_a`` the
  window's mean query, ``k̄_b`` the block's mean key and ``n_b`` its unpadded keys. O(N²·D/bs²).
* ``key_pool``   — each window query against the pooled keys (the same logits per query),
  softmax, averaged over the window (NSA/MoBA-style scoring). O(N²·D/bs).
* ``antidiagonal`` — XAttention: queries and keys cut into groups of ``stride``; a cell's logit is
  the mean of its ``stride`` antidiagonal scores (``scale·Σₘ q[r·S+S−1−m]·k[c·S+m] / S``), softmax
  over the cells of a query group, summed into blocks and averaged over the window. O(N²·D/stride).
* ``oracle``     — the true mass: exact softmax of each window query over the keys of the
  scoreable blocks, summed per key block, averaged. O(N²·D); for analysis and as the upper bound.

Each row's masses sum to 1 per query head (so to ``H/Hkv`` per kv head) over its scoreable
blocks; rows with none are zero. The built-ins compute in float32 whatever the input dtype.
Users add estimators with :func:`register_estimator`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ParameterError, UnknownNameError, unknown_name_message
from .inputs import causal_offset

#: Logit elements one chunk of an estimator computes at once (bounds its working memory).
CHUNK_ELEMENTS = 1 << 22


def num_blocks(n: int, block_size: int) -> int:
    """Blocks of ``block_size`` covering ``n`` positions (the last one may be short)."""
    return -(-n // block_size)


def scoreable_blocks(nq: int, nk: int, block_size: int, causal: bool, device=None) -> torch.Tensor:
    """Bool ``(nq_blocks, nk_blocks)``: the key blocks an estimator may score for each query block.

    Non-causal: all. Causal: those whose last key is at or before the position of the query
    block's first query, ``a·bs + Nk − Nq`` (complete before anything in the block).
    """
    nqb, nkb = num_blocks(nq, block_size), num_blocks(nk, block_size)
    if not causal:
        return torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    first = torch.arange(nqb, device=device)[:, None] * block_size + causal_offset(nq, nk)
    last_key = torch.clamp((torch.arange(nkb, device=device)[None, :] + 1) * block_size, max=nk) - 1
    return last_key <= first


def scoring_queries(q: torch.Tensor, block_size: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query block's scoring window: ``(qs, valid)``.

    ``qs`` ``(B, H, nq_blocks, bs, D)``: non-causal, the block's queries; causal, the ``bs``
    queries ending at the block's first query (index ``a·bs − bs + 1 + t``). ``valid`` bool
    ``(nq_blocks, bs)`` marks real queries (windows reaching before 0 or past Nq are short;
    the missing queries are zeros).
    """
    B, H, nq, D = q.shape
    bs = block_size
    nqb = num_blocks(nq, bs)
    index = torch.arange(nqb * bs, device=q.device)
    if causal:
        index = index - (bs - 1)
    valid = (index >= 0) & (index < nq)
    shift = bs - 1 if causal else 0
    qp = F.pad(q, (0, 0, shift, nqb * bs - shift - nq))[:, :, : nqb * bs]
    return qp.view(B, H, nqb, bs, D), valid.view(nqb, bs)


def block_sums(x: torch.Tensor, block_size: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ`` over each block of ``block_size`` rows of ``x (B, H, N, E)`` (the last one may be
    short), each row multiplied by ``weight (B, N)`` when given: ``(B, H, n_blocks, E)``."""
    B, H, n, E = x.shape
    nb = num_blocks(n, block_size)
    if weight is not None:
        x = x * weight[:, None, :, None]
    if n % block_size:
        x = F.pad(x, (0, 0, 0, nb * block_size - n))
    return x.view(B, H, nb, block_size, E).sum(3)


def pooled_keys(
    k: torch.Tensor, block_size: int, key_padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean key of each block over its unpadded keys ``(B, Hkv, nk_blocks, D)`` and the counts
    ``(B, nk_blocks)`` (float; blocks with no key have mean 0 and count 0)."""
    B, Hkv, nk, D = k.shape
    nkb = num_blocks(nk, block_size)
    if key_padding_mask is None:
        counts = torch.clamp(nk - torch.arange(nkb, device=k.device) * block_size, max=block_size)
        counts = counts.to(k.dtype)[None].expand(B, nkb)
        sums = block_sums(k, block_size)
    else:
        keep = (~key_padding_mask).to(k.dtype)
        counts = block_sums(keep[:, None, :, None], block_size)[:, 0, :, 0]
        sums = block_sums(k, block_size, keep)
    return sums / counts.clamp_min(1.0)[:, None, :, None], counts


def window_means(q: torch.Tensor, block_size: int, causal: bool) -> torch.Tensor:
    """The mean query of each block's scoring window (:func:`scoring_queries`) ``(B, H, nqb, D)``,
    from block sums in one pass: causal window ``a`` is block ``a − 1`` minus its first query
    plus query ``a·bs``."""
    nq, bs = q.shape[2], block_size
    sums = block_sums(q, bs)
    nqb = sums.shape[2]
    if not causal:
        counts = torch.clamp(nq - torch.arange(nqb, device=q.device) * bs, max=bs).to(q.dtype)
        return sums / counts[:, None]
    firsts = q[:, :, ::bs]  # queries a·bs, (B, H, nqb, D)
    win = firsts.clone()
    win[:, :, 1:] += sums[:, :, :-1] - firsts[:, :, :-1]
    counts = torch.full((nqb,), float(bs), dtype=q.dtype, device=q.device)
    counts[0] = 1.0
    return win / counts[:, None]


def _work(t: torch.Tensor) -> torch.Tensor:
    # float32 whatever the input: scores are estimates, and one precision means one selection,
    # so a float64 reference selects exactly what a float32 or bfloat16 call on the same values does.
    return t.float()


def _group_sum(p: torch.Tensor, hkv: int) -> torch.Tensor:
    """``(B, H, ...)`` → ``(B, Hkv, ...)``: sum over the query heads of each kv head."""
    B, H = p.shape[:2]
    return p.reshape(B, hkv, H // hkv, *p.shape[2:]).sum(2)


def _row_masses(
    qs: torch.Tensor,
    valid_rows: torch.Tensor,
    units: torch.Tensor,
    bias: torch.Tensor,
    allowed: torch.Tensor,
    *,
    units_per_block: int,
    scale: float,
    cells: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Softmax of each scoring row over key *units*, summed into key blocks, averaged over rows.

    qs ``(B, H, nqb, R, E)`` scoring rows of each query block; valid_rows bool ``(nqb, R)``;
    units ``(B, Hkv, nkb·upb, E)`` (the key units, ``upb`` per block, in block order); bias
    ``(B, nkb·upb)`` added to the logits (``−inf`` hides a unit); allowed bool ``(nqb, nkb)``:
    the blocks each row may score. ``cells = (vq (nqb, R, S), vk (B, nkb·upb, S))``: validity of
    the antidiagonal pairs; a logit is then divided by its number of valid pairs ``n`` and
    ``log n`` added (cells without a pair hidden). Returns ``(B, Hkv, nqb, nkb)``, summed over
    the query heads of each kv head. Chunked over query blocks (:data:`CHUNK_ELEMENTS`); causal
    rows read only the key prefix their allowed blocks reach.
    """
    B, H, nqb, R, E = qs.shape
    Hkv, U = units.shape[1], units.shape[2]
    nkb = U // units_per_block
    G = H // Hkv
    out = qs.new_zeros(B, Hkv, nqb, nkb)
    reach = torch.where(allowed.any(1), nkb - allowed.flip(1).to(torch.int8).argmax(1), 0).tolist()
    step = max(1, CHUNK_ELEMENTS // max(1, B * H * R * U))
    qs = qs * scale
    for a0 in range(0, nqb, step):
        a1 = min(nqb, a0 + step)
        rows, width = a1 - a0, max(reach[a0:a1])
        if width == 0:
            continue
        u = width * units_per_block
        q5 = qs[:, :, a0:a1].reshape(B, Hkv, G * rows * R, E)
        s = torch.matmul(q5, units[:, :, :u].transpose(-1, -2)).view(B, Hkv, G, rows, R, u)
        hide = ~allowed[a0:a1, :width].repeat_interleave(units_per_block, 1)[:, None, :]  # (rows, 1, u)
        if cells is not None:
            pairs = torch.einsum("ars,bcs->barc", cells[0][a0:a1], cells[1][:, :u])  # (B, rows, R, u)
            s = s.div_(pairs.clamp_min(1.0)[:, None, None]).add_(pairs.clamp_min(1e-30).log()[:, None, None])
            hide = hide | (pairs == 0)[:, None, None]
        s.add_(bias[:, None, None, None, None, :u]).masked_fill_(hide, float("-inf"))
        # A row that can see no unit gives NaN here: it is dropped below (weight 0).
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)
        p = p.view(B, Hkv, G, rows, R, width, units_per_block).sum(-1)
        # Rows to average: real queries that could see a unit (rows of zeros otherwise).
        w = (valid_rows[a0:a1, :, None] & (p.sum(-1, keepdim=True) > 0)).to(p.dtype)  # (B, Hkv, G, rows, R, 1)
        p = (p * w).sum(4) / w.sum(4).clamp_min(1.0)
        out[:, :, a0:a1, :width] = p.sum(2)
    return out


def mean_pool(q, k, *, block_size, causal, key_padding_mask, scale):
    """Softmax over key blocks of the scoring window's mean query · each block's mean key.

    ``softmax_b(scale·q̄_a·k̄_b + log n_b)`` over the scoreable blocks (module docstring), summed
    over the query heads of each kv head. O(B·H·(N·D + N²·D/bs²)) time, O(B·H·N²/bs²) memory.
    """
    q, k = _work(q), _work(k)
    Hkv = k.shape[1]
    nq, nk = q.shape[2], k.shape[2]
    qbar = window_means(q, block_size, causal)  # (B, H, nqb, D)
    kbar, counts = pooled_keys(k, block_size, key_padding_mask)
    H = q.shape[1]
    kx = kbar.repeat_interleave(H // Hkv, dim=1)
    s = torch.matmul(qbar, kx.transpose(-1, -2)) * scale + counts.clamp_min(1e-30).log()[:, None, None, :]
    allowed = scoreable_blocks(nq, nk, block_size, causal, device=q.device)[None, None]
    s = s.masked_fill(~allowed | (counts == 0)[:, None, None, :], float("-inf"))
    seen = torch.isfinite(s.amax(-1, keepdim=True))
    p = torch.softmax(s.masked_fill(~seen, 0.0), dim=-1) * seen
    return _group_sum(p, Hkv)


def key_pool(q, k, *, block_size, causal, key_padding_mask, scale):
    """Each scoring-window query against the pooled keys, softmax, averaged over the window.

    ``mean_t softmax_b(scale·q_t·k̄_b + log n_b)`` (NSA / MoBA-style block scoring), summed over
    the query heads of each kv head. O(B·H·N²·D/bs) time; memory bounded by chunking.
    """
    q, k = _work(q), _work(k)
    nq, nk = q.shape[2], k.shape[2]
    qs, valid = scoring_queries(q, block_size, causal)
    kbar, counts = pooled_keys(k, block_size, key_padding_mask)
    bias = counts.clamp_min(1e-30).log().masked_fill(counts == 0, float("-inf"))
    allowed = scoreable_blocks(nq, nk, block_size, causal, device=q.device)
    return _row_masses(qs, valid, kbar, bias, allowed, units_per_block=1, scale=scale)


def antidiagonal(q, k, *, block_size, causal, key_padding_mask, scale, stride=8):
    """XAttention's strided antidiagonal scoring (module docstring); ``stride`` divides ``block_size``.

    Cells of ``stride`` queries × ``stride`` keys; a cell's logit is ``scale·Σₘ q[rS+S−1−m]·k[cS+m]``
    over its valid pairs divided by their number, plus the log of that number; softmax over a
    query group's cells, summed per key block, averaged over the window's groups.
    O(B·H·N²·D/stride) time; memory bounded by chunking.
    """
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or block_size % stride:
        raise ParameterError(
            f"antidiagonal estimator: stride={stride!r} must be a positive int dividing block_size={block_size}"
        )
    q, k = _work(q), _work(k)
    B, H, nq, D = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    S, bs = stride, block_size
    nqb, nkb = num_blocks(nq, bs), num_blocks(nk, bs)
    qs, valid = scoring_queries(q, bs, causal)
    qs = qs * valid[..., None].to(q.dtype)
    R = bs // S
    # Query group r takes its queries in reverse order, key group c in order: their product is
    # the antidiagonal sum of the (S × S) cell.
    qr = qs.view(B, H, nqb, R, S, D).flip(4).reshape(B, H, nqb, R, S * D)
    vq = valid.view(nqb, R, S).flip(-1).to(q.dtype)
    keep = torch.ones(B, nk, dtype=q.dtype, device=q.device)
    if key_padding_mask is not None:
        keep = (~key_padding_mask).to(q.dtype)
    keep = F.pad(keep, (0, nkb * bs - nk))
    kp = F.pad(k, (0, 0, 0, nkb * bs - nk)) * keep[:, None, :, None]
    kr = kp.reshape(B, Hkv, nkb * R, S * D)
    vk = keep.view(B, nkb * R, S)
    bias = torch.zeros(B, nkb * R, dtype=q.dtype, device=q.device)
    allowed = scoreable_blocks(nq, nk, bs, causal, device=q.device)
    valid_rows = valid.view(nqb, R, S).any(-1)
    return _row_masses(qr, valid_rows, kr, bias, allowed, units_per_block=R, scale=scale, cells=(vq, vk))


def oracle(q, k, *, block_size, causal, key_padding_mask, scale):
    """The true block mass: exact softmax of each scoring-window query over the keys of the
    scoreable blocks, summed per key block, averaged over the window. O(B·H·N²·D) time (the
    quadratic cost the others avoid); memory bounded by chunking. For analysis and as the
    upper bound of what a block estimator can reach.
    """
    q, k = _work(q), _work(k)
    B, H, nq, D = q.shape
    nk = k.shape[2]
    bs = block_size
    nkb = num_blocks(nk, bs)
    qs, valid = scoring_queries(q, bs, causal)
    keep = torch.zeros(B, nkb * bs, dtype=torch.bool, device=q.device)
    keep[:, :nk] = True if key_padding_mask is None else ~key_padding_mask
    bias = torch.zeros(B, nkb * bs, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
    kp = F.pad(k, (0, 0, 0, nkb * bs - nk))
    allowed = scoreable_blocks(nq, nk, bs, causal, device=q.device)
    return _row_masses(qs, valid, kp, bias, allowed, units_per_block=bs, scale=scale)


# ---------------------------------------------------------------------------------------------
# The registry.


@dataclass(frozen=True)
class Estimator:
    """A registered estimator: ``fn`` with the signature in the module docstring; ``extra``
    names the further keywords it accepts (``antidiagonal``: ``stride``)."""

    name: str
    fn: Callable[..., torch.Tensor]
    doc: str
    extra: tuple[str, ...] = field(default=())


#: Keywords that variants may pass on to the estimators that accept them.
EXTRA_KEYWORDS = ("stride",)

_ESTIMATORS: dict[str, Estimator] = {}


def _make(name: str, fn: Callable, doc: str) -> Estimator:
    params = inspect.signature(fn).parameters
    extra = tuple(p for p in EXTRA_KEYWORDS if p in params)
    return Estimator(name, fn, doc or (inspect.getdoc(fn) or "").split("\n")[0] or "user estimator", extra)


for _fn in (mean_pool, key_pool, antidiagonal, oracle):
    _ESTIMATORS[_fn.__name__] = _make(_fn.__name__, _fn, "")


def get_estimator(name: Any) -> Estimator:
    """The registered estimator called ``name``; unknown names raise with the closest known ones."""
    if not isinstance(name, str):
        raise UnknownNameError(f"an estimator name must be a string, got {type(name).__name__} {name!r}")
    try:
        return _ESTIMATORS[name]
    except KeyError:
        raise UnknownNameError(unknown_name_message("estimator", name, _ESTIMATORS)) from None


def available_estimators() -> list[str]:
    """Sorted names of every registered estimator."""
    return sorted(_ESTIMATORS)


def register_estimator(name: str, fn: Callable[..., torch.Tensor] | None = None, *, doc: str = "",
                       overwrite: bool = False) -> Any:  # fmt: skip
    """Add a block-mass estimator usable as ``topk_block`` / ``hybrid``'s ``estimator=name``.

    ``fn(q, k, *, block_size, causal, key_padding_mask, scale) -> scores (B, Hkv, nq_blocks,
    nk_blocks)``: non-negative estimated masses, query heads of one kv head summed; with
    ``causal=True`` it must keep the causal contract of this module's docstring (row ``a`` uses
    no query after ``a·block_size`` and no key after that query's position), or the selection
    leaks the future. It runs without autograd. Works as a decorator (``fn`` omitted) or a plain
    call; re-registering a name raises unless ``overwrite=True``::

        @sla.register_estimator("first_key")
        def first_key(q, k, *, block_size, causal, key_padding_mask, scale):
            ...
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_estimator needs a non-empty name string, got {name!r}")

    def add(obj):
        if not callable(obj):
            raise TypeError(f"register_estimator expects a function, got {type(obj).__name__}")
        if name in _ESTIMATORS and not overwrite:
            raise ValueError(f"estimator {name!r} is already registered; pass overwrite=True to replace it.")
        _ESTIMATORS[name] = _make(name, obj, doc)
        return obj

    return add if fn is None else add(fn)


def unregister_estimator(name: str) -> None:
    """Remove an estimator (mainly for tests); built-in names may be removed too."""
    get_estimator(name)
    del _ESTIMATORS[name]


def check_estimator(value: Any) -> str | None:
    """Param check for ``estimator``: raises the unknown-name error itself (closest names)."""
    get_estimator(value)
    return None


@torch.no_grad()
def estimate(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    **extra: Any,
) -> torch.Tensor:
    """Run estimator ``name`` (passing those of ``extra`` it accepts) and check what it returns:
    float ``(B, Hkv, nq_blocks, nk_blocks)``, no NaN, no negative value."""
    est = get_estimator(name)
    kwargs = {key: extra[key] for key in est.extra if key in extra}
    scores = est.fn(
        q.detach(), k.detach(), block_size=block_size, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
        **kwargs,
    )  # fmt: skip
    expected = (q.shape[0], k.shape[1], num_blocks(q.shape[2], block_size), num_blocks(k.shape[2], block_size))
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise ValueError(
            f"estimator {name!r} must return a float tensor (B, Hkv, nq_blocks, nk_blocks) = {expected}, "
            f"got {type(scores).__name__}" + (f" of dtype {scores.dtype}" if isinstance(scores, torch.Tensor) else "")
        )
    if tuple(scores.shape) != expected:
        raise ValueError(
            f"estimator {name!r} returned shape {tuple(scores.shape)}; expected (B, Hkv, nq_blocks, nk_blocks) = "
            f"{expected} for q {tuple(q.shape)}, k {tuple(k.shape)}, block_size={block_size}"
        )
    if bool(torch.isnan(scores).any()) or bool((scores < 0).any()):
        raise ValueError(f"estimator {name!r} returned NaN or negative scores; scores must be masses >= 0")
    return scores.float() if scores.dtype != torch.float64 else scores
