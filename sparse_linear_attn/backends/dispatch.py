"""The one place that decides which backend runs a call, and runs it.

A call travels ``sla.attention`` / ``AttentionModule`` → :func:`prepare` (every check, once) →
:func:`run` → the variant's implementation. Two tables decide which implementation:

* ``BACKENDS`` — what each backend can do at all (devices, dtypes, autograd, returning
  weights, attention dropout) and whether it is installed;
* ``AUTO_ORDER`` — for ``backend="auto"``, the order in which a variant's backends are tried
  (fastest first). A variant not listed tries its implementations in registration order.

On top of those, a variant's implementation may rule itself out for a call it cannot run
(``Impl.rules_out``) or one that ``auto`` should leave to the next backend
(``Impl.skip_in_auto``, e.g. a compile that does not pay off at this size). A backend can
also decline while running by raising :class:`~sparse_linear_attn.errors.CannotRun` (Flex past
its compiled-graph limit); under ``auto`` the next candidate then runs. Every reason is
collected, and when nothing fits the error lists each backend with why it was ruled out.

A call with a decoding cache (:mod:`sparse_linear_attn.decoding`) is prepared the same way —
:func:`prepare` also checks that it fits the cache — and :func:`run` then hands it to the
cache's step, which runs the variant's math over the cached state.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import BackendUnavailableError, CannotRun, ParameterError, unknown_name_message
from ..inputs import Call, check_flag, check_inputs, check_probability, make_call, repeat_kv
from ..registry import Impl, VariantSpec, available_variants, get
from .dropout import Dropout, draw_seed

if TYPE_CHECKING:
    from ..decoding import Cache

_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@functools.cache
def _module_missing(module: str) -> str | None:
    # find_spec does not import: xformers warns at import on machines without CUDA, and users
    # who never asked for it must not see that.
    return None if importlib.util.find_spec(module) is not None else f"{module} is not installed"


def _flex_missing() -> str | None:
    return _module_missing("torch.nn.attention.flex_attention")


def _xformers_missing() -> str | None:
    return _module_missing("xformers")


def _never_missing() -> str | None:
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Backend:
    name: str
    devices: frozenset[str] | None  # None: any device
    dtypes: frozenset[torch.dtype]
    grad: bool | frozenset[str]  # True, False, or the devices on which backward works
    weights: bool
    missing: Callable[[], str | None] = _never_missing
    doc: str = ""
    dropout: bool = False  # can apply attention dropout (where the variant's Impl does)

    def rules_out(self, call: Call) -> str | None:
        """Why this backend cannot run ``call`` at all (None: it can)."""
        if self.devices is not None and call.device not in self.devices:
            return f"runs on {'/'.join(sorted(self.devices))} only, not {call.device}"
        if call.dtype not in self.dtypes:
            names = ", ".join(sorted(_dtype_name(d) for d in self.dtypes))
            return f"supports dtypes {names}, not {_dtype_name(call.dtype)}"
        if call.requires_grad:
            ok = self.grad if isinstance(self.grad, bool) else call.device in self.grad
            if not ok:
                return f"has no backward on {call.device} (inputs require grad)"
        if call.return_weights and not self.weights:
            return "does not return attention weights (use backend='math' or 'auto')"
        if call.dropout and not self.dropout:
            return "has no attention dropout (dropout_p > 0)"
        return self.missing()


#: What each backend supports. Read this table to know where a call can run.
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("torch", None, _FLOATS, True, False,
                doc="pure PyTorch: SDPA, tiled or chunked kernels; every device and dtype, autograd", dropout=True),
        Backend("math", None, _FLOATS, True, True,
                doc="explicit reference with O(Nq·Nk) memory; the path that returns weights", dropout=True),
        Backend("flex", frozenset({"cpu", "cuda"}), frozenset({torch.float16, torch.bfloat16, torch.float32}),
                frozenset({"cuda"}), False, _flex_missing,
                doc="torch.nn.attention.flex_attention, compiled; backward on CUDA only"),
        Backend("xformers", frozenset({"cuda"}), frozenset({torch.float16, torch.bfloat16}), True, False,
                _xformers_missing, doc="xformers.ops.memory_efficient_attention; CUDA, fp16/bf16"),
        Backend("module", None, _FLOATS, True, True, doc="an nn.Module variant (learned parameters)", dropout=True),
        Backend("user", None, _FLOATS, True, True, doc="a user-registered function", dropout=True),
    )
}  # fmt: skip

#: Order in which ``backend="auto"`` tries a variant's backends (fastest first).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    # SDPA picks FlashAttention/cuDNN/mem-efficient kernels itself on CUDA; xformers is the
    # fallback there, math the path that returns weights.
    "full": ("torch", "xformers", "math"),
    "dot_product": ("torch", "xformers", "math"),
    # xformers' local-attention kernel on CUDA (no key padding); Flex on CUDA from 1K tokens;
    # the tiled torch path everywhere else (measured faster than compiled Flex on CPU).
    "sliding_window": ("xformers", "flex", "torch", "math"),
    # On CUDA auto prefers Flex; the tile-gather torch path runs everywhere (and, on CPU,
    # measured faster than compiled Flex).
    "block_sparse": ("flex", "torch", "math"),
    # The selection feeds a Flex BlockMask on CUDA; block_sparse's tiled kernel elsewhere.
    "topk_block": ("flex", "torch", "math"),
    "hybrid": ("torch", "math"),
    # Chunkwise / sums-once first; the quadratic math form only when weights are asked for.
    "linear": ("torch", "math"),
    "performer": ("torch", "math"),
}


# ---------------------------------------------------------------------------------------------
# Preparing a call: every check, once.


@dataclass(frozen=True)
class Prepared:
    """One call after every check: the variant, its resolved parameters and what dispatch needs."""

    spec: VariantSpec
    params: Mapping[str, Any]
    call: Call
    scale: float
    causal: bool
    key_padding_mask: torch.Tensor | None
    return_weights: bool
    backend: str
    dropout_p: float = 0.0
    # A decoding cache: run() hands the call to its step (q, k, v then hold only new tokens).
    cache: Cache | None = None


def check_backend(spec: VariantSpec, backend: Any) -> str:
    """``backend`` if the variant can ever use it (``"auto"`` or one of its backends), else a clear error."""
    if not isinstance(backend, str):
        raise ParameterError(f"backend must be a name (a string such as 'auto'), got {backend!r}")
    if backend == "auto" or backend in spec.backends:
        return backend
    if backend not in BACKENDS:
        raise BackendUnavailableError(unknown_name_message("backend", backend, ["auto", *BACKENDS]))
    if spec.module is not None:
        raise ParameterError(
            f"variant {spec.name!r} is an nn.Module with learned parameters; its only backend is "
            f"'module' (or 'auto'), got backend={backend!r}"
        )
    raise BackendUnavailableError(
        f"variant {spec.name!r} has no {backend!r} backend; it has: {', '.join(spec.backends)} (or 'auto')."
    )


def check_dropout(spec: VariantSpec, dropout_p: Any, name: str = "dropout_p") -> float:
    """``dropout_p`` as a float in ``[0, 1)`` that the variant can apply, else a clear error."""
    p = check_probability(name, dropout_p)
    if p > 0.0 and not spec.supports.dropout:
        able = [n for n in available_variants() if get(n).supports.dropout]
        raise ValueError(
            f"variant {spec.name!r} does not support attention dropout ({name}={p}; sla.describe({spec.name!r}) "
            f"says why). Pass {name}=0.0 and regularise elsewhere, or use a variant that takes it: {', '.join(able)}."
        )
    return p


def check_supports(spec: VariantSpec, call: Call) -> None:
    """Raise if the variant cannot compute what ``call`` asks (whatever the backend)."""
    s = spec.supports
    problems = []
    if call.causal and not s.causal:
        problems.append("causal=True")
    if call.cross and not s.cross_attention:
        problems.append(f"cross-attention (Nq={call.nq} != Nk={call.nk})")
    if call.key_padding and not s.key_padding:
        problems.append("key_padding_mask")
    if call.return_weights and not s.weights:
        problems.append("return_weights=True")
    if call.heads != call.kv_heads and not s.grouped_query:
        problems.append(f"grouped-query heads (H={call.heads}, Hkv={call.kv_heads})")
    if problems:
        raise ValueError(f"variant {spec.name!r} does not support {', '.join(problems)}")


def prepare(
    spec: VariantSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    params: Mapping[str, Any],
    causal: Any = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_weights: Any = False,
    backend: Any = "auto",
    dropout_p: Any = 0.0,
    cache: Cache | None = None,
) -> Prepared:
    """Check a call once — flags, backend name, tensors, what the variant supports, the scale,
    the dropout probability, and that it fits ``cache`` if one is given — and return what
    :func:`run` needs. ``params`` are the variant's resolved parameters."""
    causal = check_flag("causal", causal)
    return_weights = check_flag("return_weights", return_weights)
    dropout_p = check_dropout(spec, dropout_p)
    backend = check_backend(spec, backend)
    check_inputs(q, k, v, key_padding_mask)
    call = make_call(
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, return_weights=return_weights, dropout=dropout_p > 0
    )
    check_supports(spec, call)
    if cache is not None:
        if not callable(getattr(cache, "check_call", None)) or not callable(getattr(cache, "step", None)):
            raise ParameterError(f"cache must be an sla.Cache (made by sla.make_cache), got {type(cache).__name__}")
        if dropout_p > 0.0:
            raise ParameterError(
                f"attention dropout (dropout_p={dropout_p}) does not apply to cached decoding: decode in eval() "
                f"mode (modules then use dropout_p=0) or pass dropout_p=0.0"
            )
        cache.check_call(spec, params, call, causal=causal, return_weights=return_weights, device=q.device)
    return Prepared(
        spec=spec,
        params=params,
        call=call,
        scale=spec.resolve_scale(scale, q.shape[-1], params),
        causal=causal,
        key_padding_mask=key_padding_mask,
        return_weights=return_weights,
        backend=backend,
        dropout_p=dropout_p,
        cache=cache,
    )


# ---------------------------------------------------------------------------------------------
# Choosing a backend.


def _rules_out(name: str, impl: Impl, call: Call, params: Mapping[str, Any], *, auto: bool) -> str | None:
    reason = BACKENDS[name].rules_out(call)
    if reason is None and call.dropout and not impl.dropout:
        reason = "this implementation applies no attention dropout"
    if reason is None and impl.rules_out is not None:
        reason = impl.rules_out(call, params)
    if reason is None and auto and impl.skip_in_auto is not None:
        reason = impl.skip_in_auto(call, params)
    return reason


def candidates(
    spec: VariantSpec, call: Call, params: Mapping[str, Any], backend: str = "auto"
) -> list[tuple[str, str | None]]:
    """The backends that may run ``call``, in the order tried, each with the reason it is ruled
    out (``None``: it may run). A named backend is the only candidate."""
    if spec.module is not None:
        return [("module", BACKENDS["module"].rules_out(call))]
    impls = spec.impls
    if backend != "auto":
        return [(backend, _rules_out(backend, impls[backend], call, params, auto=False))]
    order = AUTO_ORDER.get(spec.name, ())
    names = [b for b in order if b in impls] + [b for b in impls if b not in order]
    return [(b, _rules_out(b, impls[b], call, params, auto=True)) for b in names]


def _nothing_fits(spec: VariantSpec, call: Call, backend: str, reasons: list[str]) -> BackendUnavailableError:
    if backend != "auto":
        return BackendUnavailableError(f"backend {backend!r} cannot run this {spec.name!r} call: {reasons[-1]}.")
    what = f"{call.device}, {_dtype_name(call.dtype)}"
    what += ", grad" if call.requires_grad else ""
    what += ", weights" if call.return_weights else ""
    what += ", dropout" if call.dropout else ""
    return BackendUnavailableError(f"no backend can run this {spec.name!r} call ({what}): " + "; ".join(reasons))


def select_backend(spec: VariantSpec, call: Call, params: Mapping[str, Any], backend: str = "auto") -> str:
    """Name of the backend that would run ``call`` (the first candidate not ruled out); raises
    with every reason if none fits. A backend may still decline while running (:func:`run`)."""
    backend = check_backend(spec, backend)
    reasons = []
    for name, reason in candidates(spec, call, params, backend):
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}" if backend == "auto" else reason)
    raise _nothing_fits(spec, call, backend, reasons)


# ---------------------------------------------------------------------------------------------
# Running it.


def empty_result(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_weights: bool):
    """Nothing to attend with or to: zeros of the right shapes (a query seeing no key gives zeros)."""
    B, H, Nq, _ = q.shape
    # Empty sums keep the graph to q, k, v (zero gradients) without 0·inf = NaN from their values.
    link = q.narrow(-1, 0, 0).sum(-1, keepdim=True) + k.narrow(2, 0, 0).sum() + v.narrow(2, 0, 0).sum()
    out = q.new_zeros(B, H, Nq, v.shape[-1]) + link
    return (out, q.new_zeros(B, H, Nq, k.shape[2])) if return_weights else out


def _call_backend(name: str, p: Prepared, q, k, v, module: nn.Module | None, dropout: Dropout | None):
    kwargs: dict[str, Any] = dict(causal=p.causal, key_padding_mask=p.key_padding_mask, scale=p.scale)
    heads = q.shape[1]
    if name == "module":
        assert module is not None
        if p.spec.user_defined:  # user modules receive k/v expanded to the query heads, as user functions do
            k, v = repeat_kv(k, heads), repeat_kv(v, heads)
            if dropout is not None:  # users get SDPA's convention: the probability, their own RNG
                kwargs["dropout_p"] = dropout.p
        elif dropout is not None:
            kwargs["dropout"] = dropout
        if not p.return_weights:
            return module(q, k, v, **kwargs), None
        return module(q, k, v, return_weights=True, **kwargs)
    impl = p.spec.impls[name]
    if not impl.grouped_query:
        k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    if impl.dropout:
        kwargs["dropout"] = dropout
    return impl.fn(q, k, v, return_weights=p.return_weights, **kwargs, **p.params)


def run(p: Prepared, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, module: nn.Module | None = None):
    """Run a prepared call on the first candidate backend that accepts it.

    Returns ``out`` ``(B, H, Nq, Dv)``, or ``(out, weights)`` when ``p.return_weights``.
    ``module`` is the ``nn.Module`` instance of a module variant. With ``p.dropout_p > 0`` one
    seed is drawn from torch's default generator (whatever the shapes, so the random stream
    advances alike) and the backend drops weights by it (:mod:`.dropout`).
    """
    dropout = Dropout(p.dropout_p, draw_seed()) if p.dropout_p > 0.0 else None
    if q.numel() == 0 or k.shape[2] == 0 or (v.shape[-1] == 0 and not p.return_weights):
        return empty_result(q, k, v, p.return_weights)
    if p.spec.module is not None and module is None:
        raise ParameterError(f"variant {p.spec.name!r} is an nn.Module variant: build it with sla.build(config)")
    if p.cache is not None:
        return p.cache.step(p, q, k, v, module=module)
    reasons = []
    for name, reason in candidates(p.spec, p.call, p.params, p.backend):
        if reason is None:
            try:
                out, weights = _call_backend(name, p, q, k, v, module, dropout)
            except CannotRun as e:
                if p.backend != "auto":
                    raise
                reason = e.reason
            else:
                return (out, weights) if p.return_weights else out
        reasons.append(f"{name}: {reason}" if p.backend == "auto" else reason)
    raise _nothing_fits(p.spec, p.call, p.backend, reasons)


def backend_table() -> str:
    """The ``BACKENDS`` table as text (``sla-bench list`` and the docs print it)."""
    rows = []
    for b in BACKENDS.values():
        dev = "any" if b.devices is None else "/".join(sorted(b.devices))
        grad = ("yes" if b.grad else "no") if isinstance(b.grad, bool) else "/".join(sorted(b.grad))
        rows.append(
            f"{b.name:9} devices={dev:9} grad={grad:5} weights={'yes' if b.weights else 'no':3} "
            f"dropout={'yes' if b.dropout else 'no':3}  {b.doc}"
        )
    return "\n".join(rows)
