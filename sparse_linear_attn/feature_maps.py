"""Feature maps φ for linear (kernelized) attention, and their registry.

Linear attention replaces ``exp(q·k·scale)`` by ``φ(q)·φ(k)`` with ``φ: R^D → R^M_{≥0}``:

* ``elu``    — ``elu(x) + 1`` (Katharopoulos et al. 2020), M = D, on the unscaled x;
* ``relu``   — ``relu(x)``, M = D, on the unscaled x (a row can have a zero normaliser: zeros);
* ``favor``  — Performer's positive orthogonal random features (Choromanski et al. 2020),
  ``φ(x) = exp(Wx − ‖x‖²/2) / √M`` on ``x·scale^{1/2}``, so ``E[φ(q)·φ(k)] = exp(q·k·scale)``;
* ``taylor`` — the 2nd-order Taylor map of Based, ``φ(x) = [1, x, vec(x⊗x)/√2]`` on
  ``x·scale^{1/2}``, so ``φ(q)·φ(k) = 1 + s + s²/2`` with ``s = q·k·scale``; M = 1 + D + D².

A map is a :class:`FeatureMap`: ``prepare`` sees the whole key tensor once (FAVOR+ draws its
projection there and finds its key stabiliser), then ``__call__`` maps any slice of q or k
row by row, so the attention code can apply it chunk by chunk. ``extend`` continues a causal
stream chunk by chunk (decoding): FAVOR+'s stabiliser becomes a running max, and the sums over
earlier keys are rescaled whenever it grows. Users add their own with
:func:`register_feature_map`; unknown names get the closest registered ones in the error.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from .errors import UnknownNameError, unknown_name_message

#: Key positions projected at once while FAVOR+ looks for its key stabiliser.
_KEY_BLOCK = 4096


@dataclass
class FeatureContext:
    """What ``prepare`` decided for one attention call (shared by every chunk of it)."""

    scale: float
    projection: torch.Tensor | None = None  # FAVOR+: W (M, D) in the work dtype
    # FAVOR+: one max over all keys of each head, (B, Hkv, 1, 1); a caller that lays keys out
    # differently reshapes it to broadcast against its key rows.
    key_shift: torch.Tensor | None = None
    # FAVOR+: the same max before heads that saw no key are given 0 (−inf there), so that
    # ``extend`` can tell "no key yet" from a max of 0.
    key_max: torch.Tensor | None = None


class FeatureMap:
    """Base class: subclasses set ``name``/``doc`` and implement ``__call__`` and ``dim``.

    ``__call__(x, ctx, *, is_query)`` maps ``(..., N, D)`` rows to non-negative ``(..., N, M)``
    features row by row (no mixing across positions), so slices may be mapped separately.
    ``x`` arrives in float32 (float64 stays float64).
    """

    name: str = ""
    doc: str = ""

    def dim(self, head_dim: int, num_features: int) -> int:
        return head_dim

    def prepare(
        self,
        k: torch.Tensor,
        *,
        scale: float,
        num_features: int,
        seed: int,
        key_padding_mask: torch.Tensor | None,
        work_dtype: torch.dtype,
    ) -> FeatureContext:
        return FeatureContext(scale=scale)

    def extend(
        self, ctx: FeatureContext, k: torch.Tensor, *, key_padding_mask: torch.Tensor | None
    ) -> tuple[FeatureContext, torch.Tensor | None]:
        """Continue a causal stream: the context for mapping the further keys ``k`` (and the
        queries that come with them), given ``ctx``, the context of the keys before them.

        Returns ``(ctx, factor)``: sums of key features built under the old context must be
        multiplied by ``factor`` (``(B, Hkv, 1, 1)``; ``None``: unchanged) to match the new one.
        A stream started with ``prepare`` over no keys and extended chunk by chunk then gives
        the outputs of one ``prepare`` over all its keys. Maps without a key-dependent context
        return ``ctx`` unchanged.
        """
        return ctx, None

    def __call__(self, x: torch.Tensor, ctx: FeatureContext, *, is_query: bool) -> torch.Tensor:
        raise NotImplementedError

    def check_scale(self, scale: float) -> str | None:
        """What is wrong with this attention ``scale`` for the map (``None``: it can use it)."""
        return None

    def apply_(self, x: torch.Tensor, ctx: FeatureContext, *, is_query: bool) -> torch.Tensor:
        """Like ``__call__`` but free to overwrite ``x`` (a scratch buffer the caller owns).

        Only used without autograd. Maps with ``M == D`` override it to work in place: on some
        machines (VMs especially) fresh memory costs a page fault per page, and the causal
        path maps many chunks.
        """
        return self(x, ctx, is_query=is_query)


class EluMap(FeatureMap):
    name = "elu"
    doc = "elu(x) + 1 on the unscaled x (Katharopoulos et al. 2020); M = D"

    def __call__(self, x, ctx, *, is_query):
        # In place on elu's fresh output (its backward keeps the input, not the output).
        return F.elu(x).add_(1.0)

    def apply_(self, x, ctx, *, is_query):
        # exp(min(x, 0)) + max(x, 0) is elu(x) + 1; exp runs ~25 % faster than elu's expm1.
        negative_part = x.clamp_max(0.0).exp_()
        return x.clamp_min_(0.0).add_(negative_part)


class ReluMap(FeatureMap):
    name = "relu"
    doc = "relu(x) on the unscaled x; M = D (a row whose features are all 0 gives zeros)"

    def __call__(self, x, ctx, *, is_query):
        return F.relu(x)

    def apply_(self, x, ctx, *, is_query):
        return x.clamp_min_(0.0)


def _needs_root(name: str, scale: float) -> str | None:
    if scale < 0:
        return f"feature map {name!r} maps x·scale^½, so it needs scale >= 0 (it estimates exp(q·k·scale))"
    return None


class TaylorMap(FeatureMap):
    name = "taylor"
    doc = "[1, x, vec(x⊗x)/√2] on x·scale^½ so φ(q)·φ(k) = 1 + s + s²/2 (Based); M = 1 + D + D²"

    def dim(self, head_dim, num_features):
        return 1 + head_dim + head_dim * head_dim

    def check_scale(self, scale):
        return _needs_root(self.name, scale)

    def __call__(self, x, ctx, *, is_query):
        x = x * math.sqrt(ctx.scale)
        second = (x[..., :, None] * x[..., None, :]).flatten(-2) * (1.0 / math.sqrt(2.0))
        return torch.cat([torch.ones_like(x[..., :1]), x, second], dim=-1)


def orthogonal_gaussian_projection(head_dim: int, num_features: int, seed: int) -> torch.Tensor:
    """FAVOR+'s W ``(num_features, head_dim)``, float64 on the CPU, deterministic in ``seed``.

    Rows come in blocks of ``head_dim`` orthonormal directions (QR of a Gaussian matrix); each
    row is then given the length of an independent Gaussian vector (chi-distributed with
    ``head_dim`` degrees of freedom), so every row is marginally N(0, I) while rows of a block
    are exactly orthogonal — the variance reduction of Performer's "ORF".
    """
    return _projection_cached(head_dim, num_features, seed).clone()


@lru_cache(maxsize=32)
def _projection_cached(head_dim: int, num_features: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    blocks = -(-num_features // head_dim)
    gauss = torch.randn(blocks, head_dim, head_dim, generator=g, dtype=torch.float64)
    qmat, r = torch.linalg.qr(gauss)
    # The sign fix makes each block Haar-distributed rather than following QR's convention.
    qmat = qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    directions = qmat.transpose(-1, -2).reshape(blocks * head_dim, head_dim)[:num_features]
    norms = torch.randn(num_features, head_dim, generator=g, dtype=torch.float64).norm(dim=1)
    return directions * norms[:, None]


class FavorMap(FeatureMap):
    name = "favor"
    doc = (
        "Performer FAVOR+: exp(Wx − ‖x‖²/2)/√M on x·scale^½, orthogonal random W (num_features "
        "rows, drawn from seed); estimates exp(q·k·scale)"
    )

    def dim(self, head_dim, num_features):
        return num_features

    def check_scale(self, scale):
        return _needs_root(self.name, scale)

    def prepare(self, k, *, scale, num_features, seed, key_padding_mask, work_dtype):
        w = _projection_cached(k.shape[-1], num_features, seed).to(device=k.device, dtype=work_dtype)
        # One max over every (unpadded) key and feature of a head: a common factor exp(-m) of
        # all keys cancels between numerator and denominator, unlike a per-key shift.
        key_max = _key_logit_max(k, w, scale, key_padding_mask)
        return FeatureContext(scale=scale, projection=w, key_shift=_finite(key_max), key_max=key_max)

    def extend(self, ctx, k, *, key_padding_mask):
        # A running max: the common factor of the keys so far, exp(−old), becomes exp(−new);
        # the factor is ≤ 1 (the max only grows), so rescaled sums never overflow.
        old = ctx.key_max
        new = torch.maximum(old, _key_logit_max(k, ctx.projection, ctx.scale, key_padding_mask))
        shift = _finite(new)
        # Before the first key the sums are zero: factor 0, not exp(0 − shift) (which could overflow).
        factor = torch.where(torch.isfinite(old), torch.exp(ctx.key_shift - shift), torch.zeros_like(shift))
        return replace(ctx, key_shift=shift, key_max=new), factor

    def __call__(self, x, ctx, *, is_query):
        w = ctx.projection
        x = x * math.sqrt(ctx.scale)
        logits = x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)
        if is_query:
            # Per-query shift: it scales a query's numerator and denominator alike.
            logits = logits - logits.amax(dim=-1, keepdim=True).detach()
        else:
            logits = logits - ctx.key_shift
        return torch.exp(logits) * (1.0 / math.sqrt(w.shape[0]))


def _key_logit_max(k: torch.Tensor, w: torch.Tensor, scale: float, key_padding_mask) -> torch.Tensor:
    """FAVOR+'s largest key logit ``max_{j,m} (W x_j)_m − ‖x_j‖²/2`` (``x = k·scale^½``) of each
    head over its unpadded keys: ``(B, Hkv, 1, 1)``, ``−inf`` for a head with no key. Keys are
    projected ``_KEY_BLOCK`` positions at a time, so memory stays O(block·M)."""
    root = math.sqrt(scale)
    B, Hkv, Nk, _ = k.shape
    shift = torch.full((B, Hkv), float("-inf"), device=k.device, dtype=w.dtype)
    with torch.no_grad():
        for s in range(0, Nk, _KEY_BLOCK):
            e = min(Nk, s + _KEY_BLOCK)
            x = k[:, :, s:e].to(w.dtype) * root
            logits = x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)
            if key_padding_mask is not None:
                logits = logits.masked_fill(key_padding_mask[:, None, s:e, None], float("-inf"))
            shift = torch.maximum(shift, logits.amax(dim=(-2, -1)))
    return shift[:, :, None, None]


def _finite(key_max: torch.Tensor) -> torch.Tensor:
    # A head that saw no key has nothing to stabilise: shift 0.
    return torch.where(torch.isfinite(key_max), key_max, torch.zeros_like(key_max))


class _FunctionMap(FeatureMap):
    """A user function ``fn(x) -> φ(x)`` (optionally ``fn(x, scale=...)``) as a FeatureMap."""

    def __init__(self, name: str, fn: Callable[..., torch.Tensor], doc: str, out_dim: int | Callable | None):
        self.name = name
        self.fn = fn
        self.doc = doc
        self.out_dim = out_dim
        self.takes_scale = "scale" in inspect.signature(fn).parameters

    def dim(self, head_dim, num_features):
        if self.out_dim is None:
            with torch.no_grad():
                return int(self(torch.zeros(1, head_dim), FeatureContext(scale=1.0), is_query=True).shape[-1])
        return self.out_dim(head_dim) if callable(self.out_dim) else int(self.out_dim)

    def __call__(self, x, ctx, *, is_query):
        return self.fn(x, scale=ctx.scale) if self.takes_scale else self.fn(x)


_MAPS: dict[str, FeatureMap] = {m.name: m for m in (EluMap(), ReluMap(), FavorMap(), TaylorMap())}


def get_feature_map(name: str) -> FeatureMap:
    """The registered map called ``name``; unknown names raise with the closest known ones."""
    if not isinstance(name, str):
        raise UnknownNameError(f"a feature map name must be a string, got {type(name).__name__} {name!r}")
    try:
        return _MAPS[name]
    except KeyError:
        raise UnknownNameError(unknown_name_message("feature map", name, _MAPS)) from None


def available_feature_maps() -> list[str]:
    """Sorted names of every registered feature map."""
    return sorted(_MAPS)


def register_feature_map(
    name: str,
    fn: Callable[..., torch.Tensor] | FeatureMap | None = None,
    *,
    doc: str = "",
    overwrite: bool = False,
) -> Any:
    """Add a feature map usable as ``sla.attention(..., "linear", feature_map=name)``.

    ``fn`` is either a :class:`FeatureMap` instance or a function mapping ``(..., N, D)`` rows
    to non-negative ``(..., N, M)`` features row by row, e.g.::

        @sla.register_feature_map("softplus")
        def softplus(x):
            return torch.nn.functional.softplus(x)

    A function that takes a ``scale`` keyword receives the attention scale. Works as a decorator
    (``fn`` omitted) or a plain call. Re-registering a name raises unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_feature_map needs a non-empty name string, got {name!r}")

    def add(obj):
        if name in _MAPS and not overwrite:
            raise ValueError(f"feature map {name!r} is already registered; pass overwrite=True to replace it.")
        if isinstance(obj, FeatureMap):
            fmap = obj
            fmap.name = name
        elif callable(obj):
            fmap = _FunctionMap(
                name, obj, doc or (inspect.getdoc(obj) or "").split("\n")[0] or "user feature map", None
            )
        else:
            raise TypeError(
                f"register_feature_map expects a function or a FeatureMap instance, got {type(obj).__name__}"
            )
        _MAPS[name] = fmap
        return obj

    return add if fn is None else add(fn)


def unregister_feature_map(name: str) -> None:
    """Remove a feature map (mainly for tests); built-in names may be removed too."""
    get_feature_map(name)
    del _MAPS[name]


def check_feature_map(value: Any) -> str | None:
    """Param check for ``feature_map``: raises the unknown-name error itself (closest names)."""
    get_feature_map(value)
    return None
