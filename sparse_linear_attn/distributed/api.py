"""``sla.distributed.attention``: one call, every rank; checks, agreement, strategy, run.

Each rank checks its own inputs first (the variant, its parameters, shapes, dtypes, the
layout and strategy names) without communicating. Then one small all-gather carries every
rank's verdict and the facts the ranks must agree on (shapes, dtype, flags, a fingerprint of
the variant's parameters, shard lengths). From that same table every rank derives the same
decision: the first rank's problem is raised on every rank (with that rank's message), a
disagreement is raised on every rank, and otherwise the same strategy runs everywhere. No
rank starts moving data that another rank is not about to move too.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from .. import registry
from ..backends import dispatch
from ..errors import BackendUnavailableError, ParameterError, ShapeError, UnknownNameError
from ..inputs import check_flag
from . import comm
from .layout import Layout, check_layout_name, layout_problem
from .plan import Setup, StrategyError
from .strategies import check_strategy_name, choose

#: Exception types re-raised as themselves on every rank (others become RuntimeError).
_ERRORS: tuple[type[Exception], ...] = (
    UnknownNameError,
    ParameterError,
    ShapeError,
    StrategyError,
    BackendUnavailableError,
    NotImplementedError,
    TypeError,
    ValueError,
    RuntimeError,
)

#: What the ranks exchange and must agree on (besides the shard lengths ``n``).
_FIELDS = (
    "batch",
    "heads",
    "kv_heads",
    "head_dim",
    "v_dim",
    "dtype",
    "device",
    "causal",
    "key_padding_mask",
    "requires_grad",
    "variant",
    "parameters",
    "scale",
    "layout",
    "strategy",
)


def _digest(obj: Any, h) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj):
            h.update(repr(key).encode())
            _digest(obj[key], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _digest(item, h)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r}".encode())


def fingerprint(obj: Any) -> int:
    """A stable 63-bit fingerprint of a value (tensors by content), equal on every rank for equal values."""
    h = hashlib.sha1()
    _digest(obj, h)
    return int.from_bytes(h.digest()[:8], "big") >> 1


#: ``layout`` names the sharding here, so a variant parameter called ``layout`` (block_sparse's
#: block layout) is passed under this name.
_BLOCK_LAYOUT = "block_layout"


#: Keywords of ``sla.attention`` this call does not take (they would read as variant parameters).
_NOT_HERE = {
    "return_weights": "the (B, H, N, N) weights of a sharded sequence are not gathered",
    "backend": "each rank's local work picks its backend itself (auto)",
    "dropout_p": "attention dropout is not supported across ranks",
    "cache": "decoding caches are single-process",
}


def _local_checks(q, k, v, variant, causal, layout, strategy, key_padding_mask, scale, params):
    """Every check a rank can make alone; returns the facts to agree on and the resolved call."""
    for name, why in _NOT_HERE.items():
        if name in params:
            raise ParameterError(f"sla.distributed.attention does not take {name}=: {why}")
    spec = registry.get(variant)
    check_layout_name(layout)
    check_strategy_name(strategy)
    if spec.module is not None:
        raise ParameterError(
            f"variant {variant!r} is an nn.Module variant with learned parameters; "
            f"sla.distributed.attention runs parameter-free variants only"
        )
    resolved = spec.resolve_params(params)
    causal = check_flag("causal", causal)
    prepared = dispatch.prepare(
        spec, q, k, v, params=resolved, causal=causal, key_padding_mask=key_padding_mask, scale=scale
    )
    if q.shape[2] != k.shape[2]:
        raise ShapeError(
            f"sla.distributed.attention shards one sequence for queries and keys alike: this rank's q has "
            f"{q.shape[2]} positions and k {k.shape[2]}; they must be equal"
        )
    if q.shape[2] < 1:
        raise ShapeError("every rank needs at least one position of the sequence; this rank has none")
    call = prepared.call
    facts = dict(
        batch=call.batch,
        heads=call.heads,
        kv_heads=call.kv_heads,
        head_dim=call.head_dim,
        v_dim=call.v_dim,
        dtype=fingerprint(str(call.dtype)),
        device=fingerprint(call.device),
        causal=int(causal),
        key_padding_mask=int(call.key_padding),
        requires_grad=int(call.requires_grad),
        variant=fingerprint(variant),
        parameters=fingerprint(resolved),
        scale=fingerprint(float(prepared.scale).hex()),
        layout=fingerprint(layout),
        strategy=fingerprint(strategy),
    )
    return facts, spec, resolved, prepared


def _agree(g: comm.Group, problem: Exception | None, n: int, facts: dict[str, int] | None):
    """One all-gather of every rank's verdict and facts; raises the same error on every rank if
    any rank had a problem (then a second all-gather carries the messages)."""
    code = 0
    message = b""
    if problem is not None:
        kind = next((i for i, t in enumerate(_ERRORS) if isinstance(problem, t)), len(_ERRORS))
        code = kind + 1
        message = (
            f"{type(problem).__name__}: {problem}".encode()[:4000]
            if code > len(_ERRORS)
            else str(problem).encode()[:4000]
        )
    row = [code, len(message), n] + [0 if facts is None else facts[f] for f in _FIELDS]
    rows = comm.gather_ints(g, row)
    failed = [r for r, row in enumerate(rows) if row[0]]
    if not failed:
        return rows
    longest = max(rows[r][1] for r in failed)
    buf = torch.zeros(max(1, longest), dtype=torch.uint8, device=g.device)
    if message:
        buf[: len(message)] = torch.tensor(list(message), dtype=torch.uint8)
    texts = comm.all_gather(g, buf).cpu()
    first = failed[0]
    text = bytes(texts[first, : rows[first][1]].tolist()).decode(errors="replace")
    others = ""
    if len(failed) > 1:
        others = f" (rank{'s' if len(failed) > 2 else ''} {', '.join(map(str, failed[1:]))} too)"
    kind = rows[first][0]
    cls = _ERRORS[kind - 1] if kind <= len(_ERRORS) else RuntimeError
    err = cls(f"sla.distributed.attention on rank {first}: {text}{others}")
    raise err from problem


#: Disagreements on these are shape errors; on the others, parameter errors.
_SHAPE_FIELDS = ("batch", "heads", "kv_heads", "head_dim", "v_dim", "dtype", "device", "key_padding_mask")
#: Fields whose values mean something to a reader (the others are fingerprints).
_SHOWN = ("batch", "heads", "kv_heads", "head_dim", "v_dim", "causal", "key_padding_mask", "requires_grad")


def _disagreement(rows: list[list[int]]) -> Exception | None:
    for i, name in enumerate(_FIELDS):
        values = [row[3 + i] for row in rows]
        if len(set(values)) == 1:
            continue
        groups: dict[int, list[int]] = {}
        for r, val in enumerate(values):
            groups.setdefault(val, []).append(r)
        parts = [
            f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}" + (f": {val}" if name in _SHOWN else "")
            for val, rs in groups.items()
        ]
        what = "" if name in _SHOWN else " (different values)"
        cls = ShapeError if name in _SHAPE_FIELDS else ParameterError
        return cls(
            f"sla.distributed.attention: the ranks disagree on {name}{what}: {'; '.join(parts)}. Every rank "
            f"must make the same call on its shard."
        )
    return None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    variant: str,
    *,
    causal: bool = False,
    group=None,
    layout: str = "contiguous",
    strategy: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    **params: Any,
) -> torch.Tensor:
    """Attention over one sequence sharded along its positions over the ranks of ``group``.

    Every rank of the group calls it with its shard: q ``(B, H, n, D)``, k ``(B, Hkv, n, D)``,
    v ``(B, Hkv, n, Dv)`` and ``key_padding_mask`` ``(B, n)`` (True = padded key), where the
    shards follow ``layout`` (``"contiguous"`` or ``"zigzag"``, see :func:`shard`). Returns this
    rank's shard ``(B, H, n, Dv)`` of ``sla.attention`` over the whole sequence, with the same
    ``variant``, ``causal`` (query ``i`` sees keys ``j ≤ i``), ``scale`` and ``**params``.
    Autograd works: each rank's gradients are its shard of the whole call's gradients, of the
    sum of every rank's loss (every rank must run backward).

    ``strategy``: ``"auto"`` or one of ``ring``, ``halo``, ``scan``, ``allgather``, ``ulysses``
    (see :data:`~sparse_linear_attn.distributed.STRATEGIES` and docs/distributed.md).
    ``layout`` names the sharding, so ``block_sparse``'s own ``layout`` parameter (its bool block
    layout) is given as ``block_layout=``. A call
    that is bad on any rank raises the same error on every rank before any data moves; a rank
    that never calls makes the others fail after the process group's timeout.
    """
    g = comm.resolve(group)
    if _BLOCK_LAYOUT in params:
        params = dict(params)
        params["layout"] = params.pop(_BLOCK_LAYOUT)
    facts = spec = resolved = prepared = None
    problem: Exception | None = None
    n = q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
    try:
        facts, spec, resolved, prepared = _local_checks(
            q, k, v, variant, causal, layout, strategy, key_padding_mask, scale, params
        )
    except Exception as e:  # every rank must learn of it, whatever it is
        problem = e
    rows = _agree(g, problem, n, facts)
    assert spec is not None and prepared is not None and resolved is not None
    disagreement = _disagreement(rows)
    if disagreement is not None:
        raise disagreement
    lengths = tuple(row[2] for row in rows)
    problem_text = layout_problem(layout, lengths)
    if problem_text:
        raise ShapeError(f"sla.distributed.attention: {problem_text}")
    call = prepared.call
    setup = Setup(
        g=g,
        layout=Layout(layout, lengths),
        spec=spec,
        params=resolved,
        causal=prepared.causal,
        scale=prepared.scale,
        batch=call.batch,
        heads=call.heads,
        kv_heads=call.kv_heads,
        head_dim=call.head_dim,
        v_dim=call.v_dim,
        padding=call.key_padding,
        grad=call.requires_grad,
        dtype=call.dtype,
        device=q.device,
    )
    return choose(setup, strategy).run(setup, q, k, v, key_padding_mask)
