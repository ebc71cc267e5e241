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

import numpy as np
import torch
from torch import nn

from .errors import ParameterError, UnknownNameError, unknown_name_message
from .inputs import check_scale

_MISSING = object()


@dataclass(frozen=True)
class Param:
    """One variant parameter: its default, its meaning, and a check of its value.

    ``check(value) -> str | None`` returns a description of what is wrong (``None`` when valid).
    Checks are module-level callables (such as :class:`IntRange`, :class:`OneOf`), so that specs,
    built modules and the layers holding them pickle (``torch.save``, spawned workers).
    """

    name: str
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None

    def validate(self, value: Any) -> Any:
        # Values read through numpy (np.int64, np.float32, np.bool_) count as the Python scalar.
        if isinstance(value, np.generic):
            value = value.item()
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise ParameterError(f"invalid {self.name}={value!r}: {problem}.")
        return value


@dataclass(frozen=True)
class IntRange:
    """Param check: an int (not a bool) with ``low <= value`` (and ``value <= high`` when given)."""

    low: int
    high: int | None = None

    def __call__(self, value: Any) -> str | None:
        expected = f"an int >= {self.low}" if self.high is None else f"an int in [{self.low}, {self.high}]"
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            return f"expected {expected}, got {type(value).__name__}"
        if value < self.low or (self.high is not None and value > self.high):
            return f"expected {expected}"
        return None

    def __repr__(self) -> str:
        return f"int_at_least({self.low})" if self.high is None else f"int_in_range({self.low}, {self.high})"


def int_at_least(low: int) -> IntRange:
    """Check: an int ``>= low``."""
    return IntRange(low)


def int_in_range(low: int, high: int) -> IntRange:
    """Check: an int in ``[low, high]``."""
    return IntRange(low, high)


@dataclass(frozen=True)
class OneOf:
    """Param check: one of ``choices``."""

    choices: tuple[Any, ...]

    def __call__(self, value: Any) -> str | None:
        return None if value in self.choices else f"expected one of {', '.join(map(repr, self.choices))}"

    def __repr__(self) -> str:
        return f"one_of({', '.join(map(repr, self.choices))})"


def one_of(*choices: Any) -> OneOf:
    """Check: one of ``choices``."""
    return OneOf(choices)


def is_bool(value: Any) -> str | None:
    """Check: ``True`` or ``False``."""
    return None if isinstance(value, bool) else f"expected True or False, got {type(value).__name__}"


#: Seeds go to ``torch.Generator.manual_seed``, which takes 64-bit values.
SEED_RANGE = IntRange(0, 2**64 - 1)


@dataclass(frozen=True)
class Supports:
    """What a variant can do. ``backends`` is filled from ``impls`` at registration.

    ``dropout``: attention dropout (``dropout_p``) on its softmax weights; a variant opts in (and
    gives its implementations that apply it ``Impl(dropout=True)``).
    """

    causal: bool = True
    cross_attention: bool = True
    key_padding: bool = True
    weights: bool = True
    grouped_query: bool = True
    dropout: bool = False


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

    ``dropout=True``: ``fn`` also takes ``dropout`` (``None`` or a
    :class:`~sparse_linear_attn.backends.dropout.Dropout`) and applies it to its softmax weights;
    other implementations never receive a call with dropout. ``double_backward=True`` promises
    second-order gradients (``create_graph=True`` through its backward); fused kernels have none.
    """

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    rules_out: Callable[[Any, Mapping[str, Any]], str | None] | None = None
    skip_in_auto: Callable[[Any, Mapping[str, Any]], str | None] | None = None
    grouped_query: bool = True
    dropout: bool = False
    double_backward: bool = False


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
    # Which values of ``scale`` the variant can run with: (scale, params) -> reason | None.
    check_scale: Callable[[float, Mapping[str, Any]], str | None] | None = None
    # Parameter sets, sized for short test sequences (N ≈ 16–40), that the conformance suite
    # (sla.testing) runs besides the defaults: the settings that exercise the variant's pattern.
    examples: tuple[Mapping[str, Any], ...] = ()
    # What users should know that the flags do not say (shown by sla.describe).
    notes: tuple[str, ...] = ()
    # The decoding cache family (a name in ``sla.decoding.FAMILIES``) that runs this variant token
    # by token with ``sla.make_cache``; None: no incremental decoding. A name, not a class, so that
    # variants never import the decoding package (it imports them).
    cache_family: str | None = None
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

    def resolve_scale(self, scale: Any, head_dim: int, params: Mapping[str, Any] | None = None) -> float:
        """The ``scale`` a call runs with: the given finite number, else the variant's default
        (``default_scale``, or ``1/√head_dim``). With ``params`` (resolved), also checked against
        what the variant accepts (:meth:`validate_scale`)."""
        checked = check_scale(scale)
        if checked is None:
            checked = self.default_scale if self.default_scale is not None else 1.0 / math.sqrt(head_dim)
        if params is not None:
            self.validate_scale(checked, params)
        return checked

    def validate_scale(self, scale: float, params: Mapping[str, Any]) -> None:
        """Raise if the variant cannot run with this ``scale`` (e.g. a feature map taking its root)."""
        if self.check_scale is not None:
            problem = self.check_scale(scale, params)
            if problem:
                raise ParameterError(f"variant {self.name!r} cannot run with scale={scale!r}: {problem}")

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
    dropout: bool = False
    #: Backends whose backward is itself differentiable (second-order gradients, create_graph=True).
    second_order: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.summary}", f"  exact={self.exact}  cost={self.cost}"]
        flags = [
            k
            for k in ("causal", "cross_attention", "key_padding", "weights", "grouped_query", "dropout")
            if getattr(self, k)
        ]
        lines.append(f"  supports: {', '.join(flags)}; backends: {', '.join(self.backends)}")
        if self.build_only:
            lines.append(
                "  nn.Module variant: use sla.build(config) (sla.attention runs it only without learned parameters)"
            )
        without = [b for b in self.backends if b not in self.second_order]
        if self.second_order and without:
            lines.append(
                f"  second-order gradients: backend={self.second_order[0]!r}"
                + "".join(f" or {b!r}" for b in self.second_order[1:])
                + f" ({', '.join(without)}: no double backward)"
            )
        elif without and not self.build_only:
            lines.append("  second-order gradients: no backend promises them")
        lines += [f"  note: {n}" for n in self.notes]
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
        dropout=s.dropout,
        second_order=tuple(b for b, impl in spec.impls.items() if impl.double_backward),
        notes=spec.notes,
    )


# ---------------------------------------------------------------------------------------------
# Registration of user variants.

_STANDARD_ARGS = {"q", "k", "v", "causal", "key_padding_mask", "scale", "return_weights", "dropout_p"}


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


@dataclass(frozen=True)
class UserFunction:
    """A user's variant function in the ``Impl.fn`` calling convention (a class, so that it pickles)."""

    fn: Callable
    accepts_weights: bool
    accepts_dropout: bool = False

    def __call__(self, q, k, v, *, causal, key_padding_mask, scale, return_weights, dropout=None, **params):
        kwargs = dict(causal=causal, key_padding_mask=key_padding_mask, scale=scale, **params)
        if self.accepts_dropout:
            kwargs["dropout_p"] = 0.0 if dropout is None else dropout.p
        if self.accepts_weights:
            result = self.fn(q, k, v, return_weights=return_weights, **kwargs)
            if return_weights:
                return result
            return result, None
        return self.fn(q, k, v, **kwargs), None


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
    with learned parameters run through ``sla.build`` only. A function (or ``forward``) with a
    ``dropout_p`` keyword supports attention dropout: it receives the probability (0.0 when off)
    and draws its mask from torch's generator, as ``F.scaled_dot_product_attention`` does.

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
            accepts_dropout = "dropout_p" in inspect.signature(obj).parameters
            module = None
            impls = {
                "user": Impl(
                    UserFunction(obj, accepts_weights, accepts_dropout), grouped_query=False, dropout=accepts_dropout
                )
            }
        else:
            raise TypeError(f"register_variant expects a function or an nn.Module subclass, got {type(obj).__name__}")
        if params:
            for pname, (default, doc) in params.items():
                found[pname] = Param(pname, default, doc)
        sup = supports
        if sup is None:
            signature = inspect.signature(obj.forward if module is not None else obj).parameters
            sup = Supports(weights=module is None and "return_weights" in signature, dropout="dropout_p" in signature)
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
