"""The variant registry: every attention variant, built-in or user-supplied, is a ``VariantSpec``.

A spec says what the variant computes (``summary``, ``exact``, ``cost``), which parameters it
takes (``params``, each with a default and a validator), what it supports, and how it runs:
either a set of backend implementations (``impls``: backend name -> function) or an
``nn.Module`` class for variants with learned parameters (``module``, available through
``sla.build`` only). Which backend runs is decided in :mod:`sparse_linear_attn.backends.dispatch`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ParameterError, UnknownNameError, unknown_name_message
from .inputs import check_scale

_MISSING = object()


@dataclass(frozen=True)
class Param:
    """One variant parameter: its default, its meaning, and a check of its value.

    ``check(value) -> str | None`` returns a description of what is wrong (``None`` when valid).
    """

    name: str
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None

    def validate(self, value: Any) -> Any:
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise ParameterError(f"invalid {self.name}={value!r}: {problem}.")
        return value


def int_at_least(low: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an int >= {low}, got {type(value).__name__}"
        if value < low:
            return f"expected an int >= {low}"
        return None

    return check


def one_of(*choices: Any) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"expected one of {', '.join(map(repr, choices))}"

    return check


@dataclass(frozen=True)
class Supports:
    """What a variant can do. ``backends`` is filled from ``impls`` at registration."""

    causal: bool = True
    cross_attention: bool = True
    key_padding: bool = True
    weights: bool = True
    grouped_query: bool = True


@dataclass(frozen=True)
class Impl:
    """One backend implementation of a variant.

    ``fn(q, k, v, *, causal, key_padding_mask, scale, return_weights, **params)`` returns
    ``(out, weights_or_None)``. ``k``/``v`` arrive with ``Hkv`` heads; an implementation that
    cannot group query heads itself sets ``grouped_query=False`` and receives them expanded.
    ``rules_out(call, params) -> reason | None`` says why this backend cannot run a call;
    ``skip_in_auto(call, params) -> reason | None`` why ``backend="auto"`` should leave a call
    to the next backend (e.g. a compile that does not pay off at this size). ``call`` is an
    :class:`~sparse_linear_attn.inputs.Call`. While running, ``fn`` may raise
    :class:`~sparse_linear_attn.errors.CannotRun` to decline a call it turns out it cannot run.
    """

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    rules_out: Callable[[Any, Mapping[str, Any]], str | None] | None = None
    skip_in_auto: Callable[[Any, Mapping[str, Any]], str | None] | None = None
    grouped_query: bool = True


@dataclass
class VariantSpec:
    name: str
    summary: str
    exact: bool
    cost: str
    params: dict[str, Param] = field(default_factory=dict)
    supports: Supports = field(default_factory=Supports)
    impls: dict[str, Impl] = field(default_factory=dict)
    module: type[nn.Module] | None = None
    # Default for ``scale`` when the caller passes None: None means 1/sqrt(head_dim).
    default_scale: float | None = None
    # (nq, nk, causal, **params) -> bool (nq, nk) or (H, nq, nk): the pattern an exact sparse
    # variant computes over. ``None`` means "every key" (subject to causal/padding).
    mask_fn: Callable[..., torch.Tensor] | None = None
    # (nq, nk, causal, **params) -> average number of keys a query sees (over queries and heads),
    # in closed form, so benchmarks can count FLOPs at any N without building the dense mask.
    visible_keys: Callable[..., float] | None = None
    # Cross-parameter checks that need more than one value: (params) -> reason | None.
    check_params: Callable[[Mapping[str, Any]], str | None] | None = None
    # Parameter sets, sized for short test sequences (N ≈ 16–40), that the conformance suite
    # (sla.testing) runs besides the defaults: the settings that exercise the variant's pattern.
    examples: tuple[Mapping[str, Any], ...] = ()
    # Data-dependent exact variants (the pattern is chosen from the inputs, so there is no
    # mask_fn): (q, k, *, causal, key_padding_mask, scale, **params) -> sla.Selection of what a
    # call with these inputs computes exactly. Its presence is what marks a variant as
    # data-dependent (``sla.selection`` and the conformance suite read it).
    selection_fn: Callable[..., Any] | None = None
    user_defined: bool = False

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self.impls) if self.module is None else ("module",)

    @property
    def data_dependent(self) -> bool:
        """Whether the variant chooses what it computes from the inputs (see ``selection_fn``)."""
        return self.selection_fn is not None

    @property
    def build_only(self) -> bool:
        return self.module is not None

    def resolve_scale(self, scale: Any, head_dim: int) -> float:
        """The ``scale`` a call runs with: the given finite number, else the variant's default
        (``default_scale``, or ``1/√head_dim``)."""
        checked = check_scale(scale)
        if checked is not None:
            return checked
        return self.default_scale if self.default_scale is not None else 1.0 / math.sqrt(head_dim)

    def resolve_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Fill defaults, reject unknown names (listing the accepted ones), validate values."""
        unknown = [k for k in given if k not in self.params]
        if unknown:
            accepted = ", ".join(self.params) or "none"
            from .errors import closest

            hints = []
            for u in unknown:
                near = closest(u, self.params)
                hints.append(f"{u!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
            raise ParameterError(
                f"variant {self.name!r} got unknown parameter(s) {', '.join(hints)}. Accepted parameters: {accepted}."
            )
        out = {}
        for name, p in self.params.items():
            out[name] = p.validate(given[name]) if name in given else p.default
        if self.check_params is not None:
            problem = self.check_params(out)
            if problem:
                raise ParameterError(f"variant {self.name!r}: {problem}")
        return out


@dataclass(frozen=True)
class VariantInfo:
    """What ``sla.describe(name)`` returns."""

    name: str
    summary: str
    exact: bool
    cost: str
    params: dict[str, tuple[Any, str]]
    causal: bool
    cross_attention: bool
    key_padding: bool
    weights: bool
    grouped_query: bool
    backends: tuple[str, ...]
    build_only: bool

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.summary}", f"  exact={self.exact}  cost={self.cost}"]
        flags = [
            k for k in ("causal", "cross_attention", "key_padding", "weights", "grouped_query") if getattr(self, k)
        ]
        lines.append(f"  supports: {', '.join(flags)}; backends: {', '.join(self.backends)}")
        if self.build_only:
            lines.append(
                "  nn.Module variant: use sla.build(config) (sla.attention runs it only without learned parameters)"
            )
        for pname, (default, doc) in self.params.items():
            lines.append(f"  {pname}={default!r}: {doc}")
        return "\n".join(lines)


_REGISTRY: dict[str, VariantSpec] = {}


def add(spec: VariantSpec, *, overwrite: bool = False) -> VariantSpec:
    if not spec.name or not isinstance(spec.name, str):
        raise ValueError(f"a variant name must be a non-empty string, got {spec.name!r}")
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"variant {spec.name!r} is already registered; pass overwrite=True to replace it.")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> VariantSpec:
    if not isinstance(name, str):
        raise UnknownNameError(f"a variant name must be a string, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(unknown_name_message("variant", name, _REGISTRY)) from None


def available_variants() -> list[str]:
    """Sorted names of every registered variant."""
    return sorted(_REGISTRY)


def describe(name: str) -> VariantInfo:
    """What a variant computes, its cost, parameters (default, meaning) and what it supports."""
    spec = get(name)
    s = spec.supports
    return VariantInfo(
        name=spec.name,
        summary=spec.summary,
        exact=spec.exact,
        cost=spec.cost,
        params={n: (p.default, p.doc) for n, p in spec.params.items()},
        causal=s.causal,
        cross_attention=s.cross_attention,
        key_padding=s.key_padding,
        weights=s.weights,
        grouped_query=s.grouped_query,
        backends=spec.backends,
        build_only=spec.build_only,
    )


# ---------------------------------------------------------------------------------------------
# Registration of user variants.

_STANDARD_ARGS = {"q", "k", "v", "causal", "key_padding_mask", "scale", "return_weights"}


def _params_from_signature(fn: Callable, skip_first: int) -> dict[str, Param]:
    sig = inspect.signature(fn)
    out: dict[str, Param] = {}
    for i, (pname, p) in enumerate(sig.parameters.items()):
        if i < skip_first or pname in _STANDARD_ARGS:
            continue
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        out[pname] = Param(pname, default, "user parameter")
    return out


def _wrap_user_function(fn: Callable, accepts_weights: bool) -> Callable:
    def run(q, k, v, *, causal, key_padding_mask, scale, return_weights, **params):
        kwargs = dict(causal=causal, key_padding_mask=key_padding_mask, scale=scale, **params)
        if accepts_weights:
            result = fn(q, k, v, return_weights=return_weights, **kwargs)
            if return_weights:
                return result
            return result, None
        return fn(q, k, v, **kwargs), None

    return run


def register_variant(
    name: str,
    *,
    summary: str = "",
    exact: bool = False,
    cost: str = "unknown",
    params: Mapping[str, tuple[Any, str]] | None = None,
    supports: Supports | None = None,
    overwrite: bool = False,
) -> Callable:
    """Decorator that adds a user's variant to the registry.

    It accepts either a plain function::

        @sla.register_variant("my_attn", cost="O(N²·D)")
        def my_attn(q, k, v, *, causal, key_padding_mask, scale, alpha=1.0):
            ...  # q (B, H, Nq, D), k/v (B, H, Nk, D/Dv) -> (B, H, Nq, Dv)

    or an ``nn.Module`` subclass whose constructor takes the variant's parameters and whose
    ``forward(q, k, v, *, causal, key_padding_mask, scale)`` returns the output. Module variants
    with learned parameters run through ``sla.build`` only.

    Parameters are read from the keyword arguments of the function (or the constructor), with
    their defaults; ``params`` may give ``{name: (default, meaning)}`` to document them. The
    function receives ``k``/``v`` expanded to the query's head count. Registering a name that
    exists raises ``ValueError`` unless ``overwrite=True``.
    """

    def decorator(obj):
        if inspect.isclass(obj) and issubclass(obj, nn.Module):
            found = _params_from_signature(obj.__init__, skip_first=1)
            module = obj
            impls: dict[str, Impl] = {}
        elif callable(obj):
            found = _params_from_signature(obj, skip_first=3)
            accepts_weights = "return_weights" in inspect.signature(obj).parameters
            module = None
            impls = {"user": Impl(_wrap_user_function(obj, accepts_weights), grouped_query=False)}
        else:
            raise TypeError(f"register_variant expects a function or an nn.Module subclass, got {type(obj).__name__}")
        if params:
            for pname, (default, doc) in params.items():
                found[pname] = Param(pname, default, doc)
        sup = supports
        if sup is None:
            accepts_weights = module is None and "return_weights" in inspect.signature(obj).parameters
            sup = Supports(weights=accepts_weights)
        add(
            VariantSpec(
                name=name,
                # obj.__doc__, not inspect.getdoc: a Module subclass without a docstring would
                # otherwise be summarised by nn.Module's own.
                summary=summary or inspect.cleandoc(obj.__doc__ or "").split("\n")[0] or "user variant",
                exact=exact,
                cost=cost,
                params=found,
                supports=sup,
                impls=impls,
                module=module,
                user_defined=True,
            ),
            overwrite=overwrite,
        )
        return obj

    if not isinstance(name, str) or not name:
        raise ValueError(f"register_variant needs a non-empty name string, got {name!r}")
    return decorator


def unregister_variant(name: str) -> None:
    """Remove a variant (mainly for tests and interactive sessions)."""
    get(name)
    del _REGISTRY[name]
