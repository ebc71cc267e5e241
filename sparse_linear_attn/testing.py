"""Conformance checks: does every backend of a variant compute what the variant's definition says,
on the inputs that break attention code?

    import sparse_linear_attn as sla
    sla.testing.check_variant("sliding_window", window=5)   # raises AssertionError on a mismatch
    sla.testing.check_variant("my_variant", alpha=0.5)      # a variant you registered yourself

:func:`check_variant` runs the cases of :data:`CASES` — causal and not, ``Nq == Nk`` and
``Nq != Nk`` both ways (bottom-right aligned), grouped-query heads (``Hkv`` = 2 and 1), key
padding with a fully padded batch row, queries that see no key, empty inputs, strided inputs,
an explicit ``scale``, float64/float32/bfloat16, attention dropout (variants that take it) — on
every backend of the variant that this machine can run (dispatch says which; the others are
reported as skipped, with its reason).
Each case compares the output and the gradients ``dq, dk, dv`` of ``<out, g>`` for a fixed
random ``g``, with one tolerance table (:data:`TOLERANCES`), against:

* the variant's ``math`` backend run in float64 on the same input values (every other backend);
* :func:`reference_attention` — a plain float64 masked softmax over :func:`reference_visibility`
  (causal and key padding written here, the variant's pattern from ``sla.dense_mask``) — for
  ``math`` itself (or the only backend of a user variant) when the variant is exact;
* with neither (``math`` of an inexact variant, ``nn.Module`` variants): the same backend run in
  float64, for the lower precisions, plus invariants.

Dropout cases draw the call's seed from ``torch.manual_seed(0)`` on every backend, so backends
whose mask is the library's positional one (``sla.backends.dropout``) drop the same weights as
``math`` and as the definition (the masked softmax times that mask). Off the CPU, fused kernels
may draw their own mask (SDPA's dropout on CUDA), so there dropout cases check invariants only.

Invariants checked everywhere: outputs and gradients are finite; a query that sees no key gets
an exact zero row; changing keys a query cannot see (the future, padded keys) leaves its row
unchanged; returned weights are zero where a key is not visible, rows sum to 1 (or 0) and
``out = weights·V``.

For tests only: the library never imports this module, and it imports no test framework.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import torch

from . import registry
from .api import attention, build, dense_mask
from .backends import dispatch
from .backends.dropout import Dropout, dense_rows, draw_seed
from .errors import CannotRun, ParameterError, unknown_name_message
from .selection import selection

__all__ = [
    "CASES",
    "COMPILED_BACKENDS",
    "TOLERANCES",
    "Case",
    "ConformanceCase",
    "ConformanceReport",
    "Tolerance",
    "check_variant",
    "conformance_cases",
    "reference_attention",
    "reference_visibility",
]


@dataclass(frozen=True)
class Tolerance:
    """``|got − ref| <= atol + rtol · max|ref|`` over a whole tensor (output or one gradient)."""

    atol: float
    rtol: float

    def bound(self, ref_max: float) -> float:
        return self.atol + self.rtol * ref_max


#: One table for every variant, backend, output and gradient. Loose enough for rounding in the
#: dtype (bfloat16 keeps 8 bits), tight enough that a shifted band or a wrong scale fails.
#: float32's rtol leaves room for linear attention's gradients, which divide by the row's
#: normaliser: a small one (ReLU features) amplifies rounding (2e-5 · max|ref| seen here).
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-12, rtol=1e-10),
    torch.float32: Tolerance(atol=1e-6, rtol=5e-5),
    torch.bfloat16: Tolerance(atol=1e-3, rtol=2e-2),
}


@dataclass(frozen=True)
class Case:
    """One call the suite makes: shapes, masking, dtype and what it asks for.

    ``padding``: ``"none"``, ``"some"`` (random padded keys) or ``"row"`` (random padded keys,
    and every key of batch row 1 padded). ``strided``: inputs laid out ``(B, N, H, D)`` in
    memory and viewed as ``(B, H, N, D)``.
    """

    name: str
    nq: int
    nk: int
    heads: int = 4
    kv_heads: int = 4
    causal: bool = False
    padding: str = "none"
    scale: float | None = None
    strided: bool = False
    dtype: torch.dtype = torch.float64
    grad: bool = True
    weights: bool = False
    batch: int = 2
    head_dim: int = 8
    v_dim: int = 6
    dropout: float = 0.0

    @property
    def label(self) -> str:
        how = [str(self.dtype).replace("torch.", ""), "grad" if self.grad else "no grad"]
        if self.weights:
            how.append("return_weights")
        if self.dropout:
            how.append(f"dropout_p={self.dropout}")
        return f"{self.name} [{', '.join(how)}]"

    def describe(self) -> str:
        parts = [
            f"B={self.batch} H={self.heads} Hkv={self.kv_heads} Nq={self.nq} Nk={self.nk}",
            "causal" if self.causal else "not causal",
            f"padding={self.padding}",
        ]
        if self.scale is not None:
            parts.append(f"scale={self.scale}")
        if self.strided:
            parts.append("strided inputs")
        return ", ".join(parts)


_F64, _F32, _BF16 = torch.float64, torch.float32, torch.bfloat16
_SELF_CAUSAL = Case("self-causal-gqa-padded", 24, 24, kv_heads=2, causal=True, padding="some", scale=0.37, strided=True)
_SHORT_Q_CAUSAL = Case("short-q-causal-mqa-padded-row", 16, 40, kv_heads=1, causal=True, padding="row")
_LONG_Q_CAUSAL = Case("long-q-causal-gqa", 40, 16, kv_heads=2, causal=True)  # queries 0..23 see no key

#: The calls :func:`check_variant` makes, in order. Sizes are small (N ≤ 40) so a variant's whole
#: check takes a fraction of a second; ``examples`` of a variant are sized for these lengths.
CASES: tuple[Case, ...] = (
    Case("self", 24, 24),
    _SELF_CAUSAL,
    _SHORT_Q_CAUSAL,
    _LONG_Q_CAUSAL,
    Case("long-q-mqa-padded-row", 40, 16, kv_heads=1, padding="row"),
    Case("short-q-scaled", 16, 40, scale=0.37),
    replace(_SELF_CAUSAL, dtype=_F32),
    replace(_LONG_Q_CAUSAL, dtype=_F32),
    replace(_SELF_CAUSAL, dtype=_BF16),
    replace(_SHORT_Q_CAUSAL, dtype=_BF16),
    # Without grad in float32: what backends with no backward (Flex on CPU) can run. One case,
    # so that a backend compiling per shape and mask compiles once.
    replace(_SHORT_Q_CAUSAL, dtype=_F32, grad=False),
    replace(_SELF_CAUSAL, grad=False, weights=True),
    replace(_LONG_Q_CAUSAL, grad=False, weights=True),
    # Attention dropout (variants with sla.describe(name).dropout): the mask is positional.
    replace(_SELF_CAUSAL, dropout=0.3),
    replace(_SHORT_Q_CAUSAL, dropout=0.3),
    Case("empty-q", 0, 24, kv_heads=2, causal=True, padding="some", dtype=_F32),
    Case("empty-k", 24, 0, kv_heads=2, causal=True, dtype=_F32),
)


# ---------------------------------------------------------------------------------------------
# The reference: written from the definitions, sharing nothing with the backends but dense_mask.


def reference_visibility(
    variant: str,
    params: Mapping[str, Any],
    nq: int,
    nk: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Bool ``(B or 1, H or 1, nq, nk)``: True where query ``i`` may see key ``j``.

    Causal is bottom-right aligned (``j <= i + nk − nq``), padded keys are hidden, and an exact
    variant's pattern comes from ``sla.dense_mask``. An inexact variant may give any weight to
    a visible key, none to the others. A data-dependent exact variant (one with a
    ``VariantSpec.selection_fn``) has no static mask: its pattern is ``sla.selection(q, k, ...)
    .dense()`` of these inputs, or, without ``q``/``k``, none (causality and padding only).
    """
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    vis = (j <= i + nk - nq) if causal else torch.ones(nq, nk, dtype=torch.bool)
    vis = vis[None, None]
    spec = registry.get(variant)
    if spec.exact and spec.data_dependent and nq > 0 and nk > 0:
        if q is not None and k is not None:
            chosen = selection(q, k, variant, causal=causal, key_padding_mask=key_padding_mask, scale=scale, **params)
            vis = vis & chosen.dense().cpu()
    elif spec.exact and nq > 0 and nk > 0:
        pattern = dense_mask(variant, nq, nk, causal=causal, **params).cpu()
        vis = vis & (pattern[None, None] if pattern.dim() == 2 else pattern[None])
    if key_padding_mask is not None:
        vis = vis & ~key_padding_mask.cpu()[:, None, None, :]
    return vis


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``softmax(q kᵀ·scale)`` over the visible keys, times ``v``: ``(out, weights)``.

    ``q (B, H, Nq, D)``, ``k (B, Hkv, Nk, D)``, ``v (B, Hkv, Nk, Dv)``; query head ``h`` reads
    kv head ``h // (H / Hkv)``. A row that sees no key is zero. Differentiable.
    """
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) * scale
    visible = visible.to(scores.device).expand_as(scores)
    seen = visible.any(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(~visible, -math.inf).masked_fill(~seen, 0.0), dim=-1) * seen
    return weights @ v, weights


# ---------------------------------------------------------------------------------------------
# Conformance parametrisation and report.

#: Backends that compile per input shape and mask (seconds per graph on CPU).
#: :func:`conformance_cases` runs them with one parameter set per variant.
COMPILED_BACKENDS = frozenset({"flex"})


@dataclass(frozen=True)
class ConformanceCase:
    """One :func:`check_variant` call of the registry-wide suite."""

    variant: str
    params: Mapping[str, Any]
    backends: tuple[str, ...] | None = None  # None: every backend of the variant

    @property
    def id(self) -> str:
        if not self.params:
            return f"{self.variant}-defaults"
        return self.variant + "-" + ",".join(f"{k}={v}" for k, v in self.params.items())

    def run(self) -> ConformanceReport:
        return check_variant(self.variant, backends=self.backends, **self.params)


def conformance_cases(variants: Iterable[str] | None = None) -> list[ConformanceCase]:
    """Every registered variant (or those named) with its defaults and each entry of its
    ``VariantSpec.examples``. Backends in :data:`COMPILED_BACKENDS` run with one of these sets
    per variant — its first example, or the defaults when it has none."""
    out = []
    for name in registry.available_variants() if variants is None else variants:
        spec = registry.get(name)
        sets = [{}, *(dict(e) for e in spec.examples)]
        compiled_at = 1 if spec.examples else 0
        cheap = tuple(b for b in spec.backends if b not in COMPILED_BACKENDS)
        for i, params in enumerate(sets):
            backends = None if i == compiled_at or len(cheap) == len(spec.backends) else cheap
            out.append(ConformanceCase(name, params, backends))
    return out


@dataclass
class ConformanceReport:
    """What :func:`check_variant` ran: case labels per backend, and the skipped ones with why."""

    variant: str
    params: dict[str, Any]
    ran: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{_call_text(self.variant, self.params)}: passed"]
        for b in sorted(set(self.ran) | set(self.skipped)):
            ran, skipped = self.ran.get(b, []), self.skipped.get(b, [])
            line = f"  {b}: {len(ran)} case(s) passed"
            if skipped:
                reasons = sorted({r for _, r in skipped})
                line += f", {len(skipped)} skipped ({'; '.join(reasons)})"
            lines.append(line)
        return "\n".join(lines)


def _call_text(variant: str, params: Mapping[str, Any]) -> str:
    return f"check_variant({', '.join([repr(variant), *(f'{k}={v!r}' for k, v in params.items())])})"


# ---------------------------------------------------------------------------------------------
# Running one case.


@dataclass
class _Result:
    out: torch.Tensor
    weights: torch.Tensor | None
    grads: tuple[torch.Tensor, ...] | None  # dq, dk, dv
    param_grads: tuple[torch.Tensor, ...] = ()


@dataclass
class _Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: torch.Tensor | None
    cotangent: torch.Tensor

    def to(self, dtype: torch.dtype) -> _Inputs:
        q, k, v = (t.to(dtype) for t in (self.q, self.k, self.v))
        return _Inputs(q, k, v, self.key_padding_mask, self.cotangent.to(dtype))


def _make_inputs(case: Case, head_dim: int, device: torch.device, seed: int) -> _Inputs:
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, nq, nk, Dv = case.batch, case.heads, case.kv_heads, case.nq, case.nk, case.v_dim

    def randn(heads: int, n: int, d: int) -> torch.Tensor:
        if case.strided:
            return torch.randn(B, n, heads, d, generator=g, dtype=_F64).transpose(1, 2)
        return torch.randn(B, heads, n, d, generator=g, dtype=_F64)

    q, k, v = randn(H, nq, head_dim), randn(Hkv, nk, head_dim), randn(Hkv, nk, Dv)
    kpm = None
    if case.padding != "none":
        kpm = torch.rand(B, nk, generator=g) < 0.25
        if nk > 1:
            kpm[0, nk // 3] = True  # at least one padded key, the last one visible
            kpm[0, -1] = False
        if case.padding == "row":
            kpm[1] = True
        kpm = kpm.to(device)
    cot = torch.randn(B, H, nq, Dv, generator=g, dtype=_F64)
    # .to keeps the strides of a strided view (memory_format=preserve_format).
    q, k, v = (t.to(device=device, dtype=case.dtype) for t in (q, k, v))
    return _Inputs(q, k, v, kpm, cot.to(device, case.dtype))


Runner = Callable[..., Any]  # (q, k, v, key_padding_mask, return_weights) -> out | (out, weights)


def _evaluate(run: Runner, x: _Inputs, *, grad: bool, weights: bool, params: tuple = ()) -> _Result:
    if not grad:
        with torch.no_grad():
            res = run(x.q, x.k, x.v, x.key_padding_mask, weights)
        out, w = res if weights else (res, None)
        return _Result(out, w, None)
    leaves = [t.detach().requires_grad_() for t in (x.q, x.k, x.v)]
    res = run(*leaves, x.key_padding_mask, weights)
    out, w = res if weights else (res, None)
    if out.shape != x.cotangent.shape:
        raise AssertionError(f"out has shape {tuple(out.shape)}, expected {tuple(x.cotangent.shape)}")
    if not out.requires_grad:
        raise AssertionError("the output is not connected to the autograd graph of q, k, v")
    wrt = [*leaves, *params]
    grads = torch.autograd.grad(out, wrt, x.cotangent.to(out.dtype), allow_unused=True)
    grads = tuple(torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads))
    return _Result(out.detach(), None if w is None else w.detach(), grads[:3], grads[3:])


def _index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape))


class _Checker:
    """Raises AssertionError with the variant, params, backend, case and what differed."""

    def __init__(self, variant: str, params: Mapping[str, Any], backend: str, case: Case):
        self.where = f"{_call_text(variant, params)}: backend {backend!r}, case {case.label!r} ({case.describe()})"

    def fail(self, what: str) -> NoReturn:
        raise AssertionError(f"{self.where}: {what}")

    @contextmanager
    def running(self, what: str) -> Iterator[None]:
        """An exception inside (but CannotRun) becomes an AssertionError that says where."""
        try:
            yield
        except CannotRun:
            raise
        except AssertionError as e:
            self.fail(f"{what}: {e}")
        except Exception as e:
            raise AssertionError(f"{self.where}: {what} raised {type(e).__name__}: {e}") from e

    def finite(self, name: str, t: torch.Tensor) -> None:
        bad = ~torch.isfinite(t)
        if bad.any():
            first = _index(int(bad.flatten().nonzero()[0]), t.shape)
            self.fail(f"{name} has {int(bad.sum())} non-finite value(s), the first at index {first}")

    def close(self, name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, against: str) -> None:
        if tuple(got.shape) != tuple(ref.shape):
            self.fail(f"{name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        self.finite(name, got)
        if got.numel() == 0:
            return
        g, r = got.detach().double().cpu(), ref.detach().double().cpu()
        err = (g - r).abs()
        worst = int(err.argmax())
        ref_max = float(r.abs().max())
        tol = TOLERANCES[dtype]
        bound = tol.bound(ref_max)
        if float(err.flatten()[worst]) > bound:
            at = _index(worst, g.shape)
            self.fail(
                f"{name} differs from {against}: max |error| {float(err.flatten()[worst]):.3e} > tolerance "
                f"{bound:.3e} (atol {tol.atol:g} + rtol {tol.rtol:g} · max|ref| {ref_max:.3g}) at index {at}: "
                f"got {float(g[at]):.6g}, expected {float(r[at]):.6g}"
            )

    def zero_rows(self, out: torch.Tensor, empty_rows: torch.Tensor) -> None:
        """Rows whose query sees no key must be exact zeros."""
        empty = empty_rows.expand(out.shape[:3])
        nonzero = empty & (out.detach().cpu() != 0).any(-1)
        if bool(nonzero.any()):
            first = tuple(int(i) for i in nonzero.nonzero()[0])
            self.fail(
                f"a query that sees no key must give an exact zero row; {int(nonzero.sum())} of the "
                f"{int(empty.sum())} such rows are not, the first (b, h, i) = {first} with max |out| "
                f"{float(out[first].double().abs().max()):.3e}"
            )

    def weights(self, w: torch.Tensor, out: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, dtype) -> None:
        """Weights of a call: zero where not visible, rows summing to 1 (or 0), ``out = w·v``."""
        B, H, nq, nk = out.shape[0], out.shape[1], out.shape[2], v.shape[2]
        if tuple(w.shape) != (B, H, nq, nk):
            self.fail(f"weights have shape {tuple(w.shape)}, expected {(B, H, nq, nk)}")
        self.finite("weights", w)
        wd = w.detach().double().cpu()
        hidden = ~visible.expand(wd.shape)
        if bool((wd[hidden] != 0).any()):
            self.fail(f"weights are nonzero on {int((wd[hidden] != 0).sum())} key(s) the query cannot see")
        if bool((wd < 0).any()):
            self.fail(f"weights has negative entries (min {float(wd.min()):.3e})")
        sums = wd.sum(-1)
        off = torch.minimum((sums - 1).abs(), sums.abs())
        tol = TOLERANCES[dtype].bound(1.0) * max(1, nk) ** 0.5
        if float(off.max()) > tol:
            at = _index(int(off.argmax()), off.shape)
            self.fail(f"weights row {at} sums to {float(sums[at]):.6g}, expected 1 (or 0 for a row that sees nothing)")
        group = H // v.shape[1]
        self.close("out", out, wd @ v.detach().double().cpu().repeat_interleave(group, 1), dtype, "weights @ v")


def _perturbed(x: _Inputs, visible: torch.Tensor) -> tuple[_Inputs, torch.Tensor] | None:
    """``x`` with the keys (and values) no query of some row may see changed, and those rows:
    the last key, hidden from all but the last query under causal, and every padded key."""
    nk = x.k.shape[2]
    if nk == 0 or x.q.shape[2] == 0:
        return None
    changed = torch.zeros(x.q.shape[0], nk, dtype=torch.bool)
    changed[:, -1] = True
    if x.key_padding_mask is not None:
        changed |= x.key_padding_mask.cpu()
    unaffected = ~(visible & changed[:, None, None, :]).any(-1)  # (B|1, H|1, nq)
    if not bool(unaffected.any()):
        return None
    sel = changed.to(x.k.device)[:, None, :, None]
    k = torch.where(sel, x.k * -3.0 + 1.0, x.k)
    v = torch.where(sel, x.v * 5.0 - 2.0, x.v)
    return _Inputs(x.q, k, v, x.key_padding_mask, x.cotangent), unaffected


def _rng_fork(device: torch.device):
    devices = [] if device.type != "cuda" else [device.index if device.index is not None else 0]
    return torch.random.fork_rng(devices=devices)


# ---------------------------------------------------------------------------------------------
# The check.


def _skip_reason(info, case: Case) -> str | None:
    """Why the variant itself (any backend) does not take this case."""
    if case.causal and not info.causal:
        return "variant does not support causal"
    if case.nq != case.nk and not info.cross_attention:
        return "variant does not support Nq != Nk"
    if case.padding != "none" and not info.key_padding:
        return "variant does not support key_padding_mask"
    if case.weights and not info.weights:
        return "variant does not return weights"
    if case.heads != case.kv_heads and not info.grouped_query:
        return "variant does not support grouped-query heads"
    if case.dropout and not info.dropout:
        return "variant does not take attention dropout"
    return None


def check_variant(
    name: str,
    /,
    *,
    backends: Iterable[str] | None = None,
    device: str | torch.device = "cpu",
    **params: Any,
) -> ConformanceReport:
    """Run every case of :data:`CASES` on every backend of variant ``name`` with ``params``.

    Raises ``AssertionError`` naming the variant, parameters, backend, case and the largest
    error against its tolerance at the first failure. Returns a :class:`ConformanceReport` of
    the cases run and skipped per backend. ``backends`` limits the check to some of the
    variant's backends; ``device`` is where inputs live (these two names are therefore not
    passed on as variant parameters). Variants with learned parameters
    (``nn.Module``) are built with ``sla.build``; a parameter called ``head_dim`` sets the
    inputs' head size.
    """
    spec = registry.get(name)
    info = registry.describe(name)
    resolved = spec.resolve_params(params)
    names = list(spec.backends) if backends is None else list(backends)
    for b in names:
        if b not in spec.backends:
            raise ParameterError(unknown_name_message(f"backend of variant {name!r}", b, spec.backends))
    # math first: the others are compared with it, so a fault in math is reported as math's.
    names.sort(key=lambda b: b != "math")
    target = _Target(spec, dict(params), resolved, torch.device(device))
    report = ConformanceReport(name, dict(params), {b: [] for b in names}, {})
    for index, case in enumerate(CASES):
        reason = _skip_reason(info, case)
        if reason is not None:
            for b in names:
                report.skipped.setdefault(b, []).append((case.label, reason))
            continue
        _check_case(target, case, _make_inputs(case, target.head_dim, target.device, seed=1000 + index), names, report)
    return report


@dataclass
class _Target:
    """One variant with its parameters, and how to call it on a backend."""

    spec: registry.VariantSpec
    params: dict[str, Any]  # as given (sla.attention / sla.build resolve them again)
    resolved: dict[str, Any]
    device: torch.device

    @property
    def head_dim(self) -> int:
        return self.resolved["head_dim"] if isinstance(self.resolved.get("head_dim"), int) else 8

    def runner(self, backend: str, case: Case, dtype: torch.dtype) -> tuple[Runner, tuple]:
        """``run(q, k, v, key_padding_mask, return_weights)`` and the learned parameters it uses."""
        name = self.spec.name
        if self.spec.module is None:

            def run(q, k, v, kpm, weights):
                return attention(
                    q, k, v, name, causal=case.causal, key_padding_mask=kpm, scale=case.scale,
                    return_weights=weights, backend=backend, dropout_p=case.dropout, **self.params,
                )  # fmt: skip

            return run, ()
        with _rng_fork(self.device):
            torch.manual_seed(0)
            config = {"variant": name, "causal": case.causal, "scale": case.scale, **self.params}
            module = build(config).to(device=self.device, dtype=case.dtype)
        if dtype != case.dtype:  # the float64 twin of the module the case runs, same (rounded) weights
            module = copy.deepcopy(module).to(dtype)

        def run_module(q, k, v, kpm, weights):
            return module(q, k, v, key_padding_mask=kpm, return_weights=weights, dropout_p=case.dropout)

        return run_module, tuple(p for p in module.parameters() if p.requires_grad)

    def evaluate(self, backend: str, case: Case, x: _Inputs, dtype: torch.dtype) -> _Result:
        run, learned = self.runner(backend, case, dtype)
        with _rng_fork(self.device):
            torch.manual_seed(0)  # a variant drawing random numbers draws the same ones on every backend
            return _evaluate(run, x, grad=case.grad, weights=case.weights, params=learned)


def _reference_kind(
    spec: registry.VariantSpec, backend: str, dtype: torch.dtype, dropout: bool = False, device: str = "cpu"
) -> tuple[str, str] | None:
    """What ``backend`` is compared with: math (float64) for other backends; the definition for
    math of an exact variant; else the backend itself in float64 (lower precisions only).
    Dropout off the CPU: nothing (a fused kernel may draw its own mask)."""
    if dropout and device != "cpu":
        return None
    if backend != "math" and "math" in spec.backends:
        return "math", "backend 'math' in float64"
    if spec.exact:
        source = "sla.selection(...).dense()" if spec.data_dependent else "sla.dense_mask"
        return "definition", f"the float64 masked softmax over {source}"
    if dtype != _F64:
        return f"self:{backend}", f"backend {backend!r} in float64"
    return None


def _check_case(target: _Target, case: Case, x: _Inputs, names: list[str], report: ConformanceReport) -> None:
    spec, name = target.spec, target.spec.name
    kpm = x.key_padding_mask
    visible = reference_visibility(name, target.resolved, case.nq, case.nk, causal=case.causal, key_padding_mask=kpm,
                                   q=x.q, k=x.k, scale=case.scale)  # fmt: skip
    # What a query may depend on at all: for a data-dependent variant, every reachable key (its
    # selection reads them), not only the ones it selected.
    reachable = visible
    if spec.data_dependent:
        reachable = reference_visibility(name, target.resolved, case.nq, case.nk, causal=case.causal,
                                         key_padding_mask=kpm)  # fmt: skip
    references: dict[str, _Result] = {}

    def reference(kind: str, backend: str) -> _Result:
        if kind not in references:
            x64 = x.to(_F64)
            if kind == "definition":
                scale = spec.resolve_scale(case.scale, target.head_dim)
                q, k, v = (t.detach().requires_grad_(case.grad) for t in (x64.q, x64.k, x64.v))
                with torch.set_grad_enabled(case.grad):
                    out, w = reference_attention(q, k, v, visible, scale)
                    if case.dropout:
                        out = _dropped(w, v, case.dropout)
                grads = torch.autograd.grad(out, (q, k, v), x64.cotangent) if case.grad else None
                references[kind] = _Result(out.detach(), w.detach(), grads)
            else:
                references[kind] = target.evaluate(backend, case, x64, _F64)
        return references[kind]

    for backend in names:
        why = _ruled_out(spec, target.resolved, backend, case, x)
        if why is not None:
            report.skipped.setdefault(backend, []).append((case.label, why))
            continue
        check = _Checker(name, target.params, backend, case)
        try:
            with check.running("the call"):
                got = target.evaluate(backend, case, x, case.dtype)
        except CannotRun as e:
            report.skipped.setdefault(backend, []).append((case.label, e.reason))
            continue
        expected_shape = (case.batch, case.heads, case.nq, case.v_dim)
        if tuple(got.out.shape) != expected_shape or got.out.dtype != case.dtype:
            check.fail(
                f"out has shape {tuple(got.out.shape)} and dtype {got.out.dtype}, expected "
                f"{expected_shape} and {case.dtype}"
            )
        check.finite("out", got.out)
        for what, g in zip(("dq", "dk", "dv"), got.grads or ()):
            check.finite(what, g)
        for i, g in enumerate(got.param_grads):
            check.finite(f"gradient of learned parameter {i}", g)
        check.zero_rows(got.out, ~visible.any(-1))

        kind = _reference_kind(spec, backend, case.dtype, bool(case.dropout), target.device.type)
        if kind is not None:
            with check.running(f"its reference, {kind[1]},"):
                ref = reference(kind[0], "math" if kind[0] == "math" else backend)
            check.close("out", got.out, ref.out, case.dtype, kind[1])
            for what, g, r in zip(("dq", "dk", "dv"), got.grads or (), ref.grads or ()):
                check.close(what, g, r, case.dtype, kind[1])
            if got.weights is not None and ref.weights is not None:
                check.close("weights", got.weights, ref.weights, case.dtype, kind[1])
        if got.weights is not None:
            check.weights(got.weights, got.out, x.v, visible, case.dtype)

        # Keys a query cannot see must not change its row (float64, where this is exact enough).
        moved = _perturbed(x, reachable) if case.dtype == _F64 and not case.weights else None
        if moved is not None and (case.causal or case.padding != "none"):
            x2, unaffected = moved
            with check.running("the call with changed future/padded keys"):
                again = target.evaluate(backend, case, x2, case.dtype)
            keep = unaffected.expand(got.out.shape[:3])
            check.close(
                "out of rows that cannot see the changed keys",
                again.out.cpu()[keep],
                got.out.cpu()[keep],
                case.dtype,
                "the same rows before the future/padded keys were changed",
            )
        report.ran[backend].append(case.label)


def _dropped(weights: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
    """``(weights ⊙ keep / (1 − p)) · v`` with the mask dispatch draws after ``torch.manual_seed(0)``
    (the positional mask of ``sla.backends.dropout``; its hash is tested on its own)."""
    with _rng_fork(weights.device):
        torch.manual_seed(0)
        seed = draw_seed()
    B, H, nq, nk = weights.shape
    keep = Dropout(p, seed).keep(dense_rows(B, H, nq, weights.device), torch.arange(nk, device=weights.device))
    return (weights * keep / (1 - p)) @ v.double().repeat_interleave(H // v.shape[1], 1)


def _ruled_out(spec, params: Mapping[str, Any], backend: str, case: Case, x: _Inputs) -> str | None:
    """Dispatch's reason why ``backend`` cannot run this case (None: it can)."""
    with torch.set_grad_enabled(case.grad):
        q, k, v = (t.detach().requires_grad_(case.grad) for t in (x.q, x.k, x.v))
        prepared = dispatch.prepare(
            spec, q, k, v, params=params, causal=case.causal, key_padding_mask=x.key_padding_mask,
            scale=case.scale, return_weights=case.weights, backend=backend, dropout_p=case.dropout,
        )  # fmt: skip
    return dispatch.candidates(spec, prepared.call, prepared.params, backend)[0][1]
