"""Input checks and the small shape helpers every variant shares.

Conventions (those of ``torch.nn.functional.scaled_dot_product_attention``):
q ``(B, H, Nq, D)``, k ``(B, Hkv, Nk, D)``, v ``(B, Hkv, Nk, Dv)``, out ``(B, H, Nq, Dv)``,
weights ``(B, H, Nq, Nk)``; ``H`` is a multiple of ``Hkv`` (grouped-query attention).
``key_padding_mask`` is bool ``(B, Nk)`` with **True marking a padded key**.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import ParameterError, ShapeError


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool if it is one (``numpy.bool_`` included), else a clear error."""
    # numpy.bool_ is not a bool subclass but is what values read through numpy often are.
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ParameterError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_scale(value: Any, name: str = "scale") -> float | None:
    """``value`` as a float if it is a finite number, ``None`` if None, else a clear error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ParameterError(f"{name} must be a finite number or None, got {value!r}")
    if not math.isfinite(value):
        raise ParameterError(f"{name} must be a finite number or None, got {value!r}")
    return float(value)


def check_probability(name: str, value: Any) -> float:
    """``value`` as a float if it is a number in ``[0, 1)`` (a dropout probability), else a clear error."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ParameterError(f"{name} must be a number in [0, 1), got {value!r} ({type(value).__name__})")
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise ParameterError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Call:
    """What the dispatcher needs to know about one attention call."""

    device: str  # "cpu", "cuda", ...
    dtype: torch.dtype
    batch: int
    heads: int
    kv_heads: int
    nq: int
    nk: int
    head_dim: int
    v_dim: int
    causal: bool
    key_padding: bool
    return_weights: bool
    requires_grad: bool
    dropout: bool = False  # attention dropout on (dropout_p > 0)

    @property
    def cross(self) -> bool:
        return self.nq != self.nk


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ShapeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ShapeError(f"{name} must have 4 dims (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ShapeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ShapeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ShapeError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    B, H, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    Bv, Hv, Nv, Dv = v.shape
    expected = "expected q (B, H, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) with H % Hkv == 0"
    got = f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not (B == Bk == Bv):
        raise ShapeError(f"batch sizes differ: {got}; {expected}")
    if Hkv != Hv:
        raise ShapeError(f"k and v head counts differ: {got}; {expected}")
    if Hkv == 0 or H % Hkv != 0:
        raise ShapeError(f"query heads {H} are not a multiple of key/value heads {Hkv}: {got}; {expected}")
    if Dk != D:
        raise ShapeError(f"q and k head_dim differ: {got}; {expected}")
    if D == 0:
        raise ShapeError(f"q and k need a head_dim of at least 1 (their dot product is the score): {got}")
    if Nv != Nk:
        raise ShapeError(f"k and v sequence lengths differ: {got}; {expected}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise ShapeError(
                f"key_padding_mask must be a bool tensor (B, Nk) = ({B}, {Nk}), got {type(key_padding_mask).__name__}"
            )
        if key_padding_mask.dtype != torch.bool:
            raise ShapeError(
                f"key_padding_mask must have dtype torch.bool (True marks a padded key), got {key_padding_mask.dtype}"
            )
        if tuple(key_padding_mask.shape) != (B, Nk):
            raise ShapeError(
                f"key_padding_mask must have shape (B, Nk) = ({B}, {Nk}), got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ShapeError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")


def make_call(q, k, v, *, causal: bool, key_padding_mask, return_weights: bool, dropout: bool = False) -> Call:
    return Call(
        device=q.device.type,
        dtype=q.dtype,
        batch=q.shape[0],
        heads=q.shape[1],
        kv_heads=k.shape[1],
        nq=q.shape[2],
        nk=k.shape[2],
        head_dim=q.shape[3],
        v_dim=v.shape[3],
        causal=bool(causal),
        key_padding=key_padding_mask is not None,
        return_weights=bool(return_weights),
        requires_grad=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
        dropout=dropout,
    )


def repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Expand ``(B, Hkv, N, D)`` to ``(B, heads, N, D)``; query head ``h`` uses kv head ``h // (heads // Hkv)``."""
    hkv = t.shape[1]
    if hkv == heads:
        return t
    return t.repeat_interleave(heads // hkv, dim=1)


def causal_offset(nq: int, nk: int) -> int:
    """Bottom-right alignment: query ``i`` sees keys ``j <= i + offset`` when causal."""
    return nk - nq


def causal_mask(nq: int, nk: int, device=None) -> torch.Tensor:
    """Bool ``(nq, nk)``, True where query ``i`` may see key ``j`` (``j <= i + nk - nq``). O(nq·nk)."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return j <= i + causal_offset(nq, nk)


def full_visibility(
    nq: int,
    nk: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    pattern: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor | None:
    """The dense bool visibility mask broadcastable to ``(B, H, nq, nk)``, or None if all visible.

    Quadratic: only for paths that are quadratic anyway (exact full attention, references,
    weights for inspection).
    """
    mask = pattern
    if causal:
        c = causal_mask(nq, nk, device=device)
        mask = c if mask is None else mask & c
    if key_padding_mask is not None:
        kp = ~key_padding_mask[:, None, None, :]
        mask = kp if mask is None else mask & kp
    if mask is not None and mask.dim() == 2:
        mask = mask[None, None]
    elif mask is not None and mask.dim() == 3:  # per-head (H, nq, nk)
        mask = mask[None]
    return mask
