"""The one place that decides which backend runs a call.

Two tables decide it:

* ``BACKENDS`` — what each backend can do at all (devices, dtypes, autograd, returning
  weights) and whether it is installed;
* ``AUTO_ORDER`` — for ``backend="auto"``, the order in which a variant's backends are tried
  (fastest first). A variant not listed tries its implementations in registration order.

On top of those, a variant's implementation may rule itself out for a call it cannot run
(``Impl.check``) or that it would run badly under ``auto`` (``Impl.prefer``, e.g. a compile
that does not pay off at this size). When nothing fits, the error lists every backend with
the reason it was ruled out.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from ..errors import BackendUnavailableError, unknown_name_message
from ..inputs import Call

_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@cache
def _module_missing(module: str) -> str | None:
    # find_spec does not import: xformers warns at import on machines without CUDA, and users
    # who never asked for it must not see that.
    return None if importlib.util.find_spec(module) is not None else f"{module} is not installed"


def _flex_missing() -> str | None:
    return _module_missing("torch.nn.attention.flex_attention")


@dataclass(frozen=True)
class Backend:
    name: str
    devices: frozenset[str] | None  # None: any device
    dtypes: frozenset[torch.dtype]
    grad: bool | frozenset[str]  # True, False, or the devices on which backward works
    weights: bool
    missing: Callable[[], str | None] = lambda: None
    doc: str = ""

    def rules_out(self, call: Call) -> str | None:
        if self.devices is not None and call.device not in self.devices:
            return f"runs on {'/'.join(sorted(self.devices))} only, not {call.device}"
        if call.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in self.dtypes))
            return f"supports dtypes {names}, not {str(call.dtype).replace('torch.', '')}"
        if call.requires_grad:
            ok = self.grad if isinstance(self.grad, bool) else call.device in self.grad
            if not ok:
                return f"has no backward on {call.device} (inputs require grad)"
        if call.return_weights and not self.weights:
            return "does not return attention weights (use backend='math' or 'auto')"
        return self.missing()


#: What each backend supports. Read this table to know where a call can run.
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "torch",
            None,
            _FLOATS,
            True,
            False,
            doc="pure PyTorch: SDPA, tiled or chunked kernels; every device and dtype, autograd",
        ),
        Backend(
            "math",
            None,
            _FLOATS,
            True,
            True,
            doc="explicit reference with O(Nq·Nk) memory; the path that returns weights",
        ),
        Backend(
            "flex",
            frozenset({"cpu", "cuda"}),
            frozenset({torch.float16, torch.bfloat16, torch.float32}),
            frozenset({"cuda"}),
            False,
            _flex_missing,
            doc="torch.nn.attention.flex_attention, compiled; backward on CUDA only",
        ),
        Backend(
            "xformers",
            frozenset({"cuda"}),
            frozenset({torch.float16, torch.bfloat16}),
            True,
            False,
            lambda: _module_missing("xformers"),
            doc="xformers.ops.memory_efficient_attention; CUDA, fp16/bf16",
        ),
        Backend("module", None, _FLOATS, True, True, doc="an nn.Module variant (learned parameters)"),
        Backend("user", None, _FLOATS, True, True, doc="a user-registered function"),
    )
}

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
    # Chunkwise / sums-once first; the quadratic math form only when weights are asked for.
    "linear": ("torch", "math"),
    "performer": ("torch", "math"),
}


def select_backend(spec, call: Call, params: Mapping[str, Any], requested: str = "auto") -> str:
    """Name of the backend that runs ``call`` for variant ``spec``; raises with reasons if none."""
    if spec.module is not None:
        return "module"
    impls = spec.impls
    if requested != "auto":
        if requested not in BACKENDS:
            raise BackendUnavailableError(unknown_name_message("backend", requested, ["auto", *BACKENDS]))
        if requested not in impls:
            raise BackendUnavailableError(
                f"variant {spec.name!r} has no {requested!r} backend; it has: {', '.join(impls)} (or 'auto')."
            )
        reason = _rules_out(requested, impls[requested], call, params, auto=False)
        if reason:
            raise BackendUnavailableError(f"backend {requested!r} cannot run this {spec.name!r} call: {reason}.")
        return requested
    order = AUTO_ORDER.get(spec.name, ())
    candidates = [b for b in order if b in impls] + [b for b in impls if b not in order]
    reasons = []
    for name in candidates:
        reason = _rules_out(name, impls[name], call, params, auto=True)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    raise BackendUnavailableError(
        f"no backend can run this {spec.name!r} call ({call.device}, {str(call.dtype).replace('torch.', '')}"
        f"{', grad' if call.requires_grad else ''}{', weights' if call.return_weights else ''}): " + "; ".join(reasons)
    )


def _rules_out(name: str, impl, call: Call, params: Mapping[str, Any], *, auto: bool) -> str | None:
    reason = BACKENDS[name].rules_out(call)
    if reason is None and impl.check is not None:
        reason = impl.check(call, params)
    if reason is None and auto and impl.prefer is not None:
        reason = impl.prefer(call, params)
    return reason


def backend_table() -> str:
    """The ``BACKENDS`` table as text (``sla-bench list`` and the docs print it)."""
    rows = []
    for b in BACKENDS.values():
        dev = "any" if b.devices is None else "/".join(sorted(b.devices))
        grad = ("yes" if b.grad else "no") if isinstance(b.grad, bool) else "/".join(sorted(b.grad))
        rows.append(f"{b.name:9} devices={dev:9} grad={grad:5} weights={'yes' if b.weights else 'no':3}  {b.doc}")
    return "\n".join(rows)
