"""The :class:`Cache` base: what every decoding cache shares (checks, bookkeeping, reorder, state).

A cache holds, for a batch of sequences, what one attention variant needs from the tokens seen
so far: the keys and values themselves (``full``), the last ``window`` of them (a ring), or a
recurrent state (linear attention). A call ``sla.attention(q, k, v, variant, causal=True,
cache=cache)`` is prepared like any other (:func:`~sparse_linear_attn.backends.dispatch.prepare`
also runs :meth:`Cache.check_call`), then dispatch hands it to :meth:`Cache.step`, which runs the
family's step (``_advance``) and moves ``seq_len`` on. Subclasses name their batch-first state
tensors in ``_buffers`` and implement ``_advance`` and ``_clear``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..backends import dispatch
from ..errors import CacheError
from ..inputs import Call
from ..registry import VariantSpec


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _same(a: Any, b: Any) -> bool:
    if a is b:  # the usual step passes the very parameters the cache was made with: no copy, no sync
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    return bool(a == b)


@dataclass(frozen=True)
class CacheView:
    """What the ``T`` new queries of a step may see, for a caller's own dense masked path
    (``sla.MultiheadAttention`` with ALiBi adds a score bias the variants do not take).

    ``keys (B, Hkv, L, D)``, ``values (B, Hkv, L, Dv)``, ``key_padding_mask (B, L)`` or None,
    ``positions (L,)`` the keys' positions in the sequence, and ``visible (1 or H, T, L)``: the
    variant's pattern and causality over these keys (padding apart), exactly as in the one-shot
    call. O(T·L) memory.
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_padding_mask: torch.Tensor | None
    positions: torch.Tensor
    visible: torch.Tensor


class Cache:
    """Decoding state of one variant for ``batch`` sequences; made by ``sla.make_cache``.

    Attributes: ``variant``, ``params`` (the variant's resolved parameters), ``batch``,
    ``kv_heads``, ``head_dim``, ``value_dim``, ``dtype``, ``device``, ``max_len`` (``None``:
    unbounded) and ``seq_len``, the number of positions seen (the next token's position).
    """

    #: The family name this class is registered under (``sla.decoding.FAMILIES``).
    family: ClassVar[str] = ""
    #: Whether steps equal the one-shot causal call (up to rounding). A cache that approximates
    #: it (e.g. a content-adaptive selection made per step from pooled keys) sets False.
    exact: ClassVar[bool] = True
    #: Names of the state tensors, each with the batch as dim 0.
    _buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        spec: VariantSpec,
        params: Mapping[str, Any],
        *,
        batch: int,
        kv_heads: int,
        head_dim: int,
        value_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_len: int | None,
    ):
        self.spec = spec
        self.variant = spec.name
        self.params = dict(params)
        self.batch = batch
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.value_dim = value_dim
        self.dtype = dtype
        self.device = device
        self.max_len = max_len
        self._seq_len = 0

    # ---- what users read ------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        """Positions seen so far; the next token sits at position ``seq_len``."""
        return self._seq_len

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's state tensors (allocated capacity, not just what is used)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def __repr__(self) -> str:
        limit = "" if self.max_len is None else f", max_len={self.max_len}"
        return (
            f"{type(self).__name__}(variant={self.variant!r}, batch={self.batch}, kv_heads={self.kv_heads}, "
            f"head_dim={self.head_dim}, value_dim={self.value_dim}, dtype={_dtype_name(self.dtype)}, "
            f"seq_len={self.seq_len}{limit}, nbytes={self.nbytes})"
        )

    # ---- life cycle -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every position: ``seq_len`` back to 0, state cleared (memory kept)."""
        self._clear()
        self._seq_len = 0

    def reorder(self, index: torch.Tensor | Sequence[int]) -> None:
        """Keep batch rows ``index`` in that order (beam search): row ``i`` of the cache becomes
        old row ``index[i]``. Rows may repeat or be dropped; the batch becomes ``len(index)``."""
        idx = torch.as_tensor(index)
        if idx.dim() != 1 or idx.dtype in (torch.bool,) or idx.is_floating_point() or idx.is_complex():
            raise CacheError(
                f"reorder expects a 1-D integer index of batch rows, got {tuple(idx.shape)} {_dtype_name(idx.dtype)}"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.batch):
            raise CacheError(
                f"reorder index holds rows {int(idx.min())}..{int(idx.max())}, but the cache has batch "
                f"{self.batch}: accepted rows are 0..{self.batch - 1}"
            )
        idx = idx.to(device=self.device, dtype=torch.long)
        for name in self._buffers:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, idx))
        self.batch = int(idx.numel())

    def state_dict(self) -> dict[str, Any]:
        """The state as a dict: ``variant``, ``seq_len`` and the family's tensors (references,
        as ``nn.Module.state_dict`` gives; only the used part of a preallocated buffer)."""
        return {"variant": self.variant, "seq_len": self.seq_len, **self._state_tensors()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (copied in; the batch may differ)."""
        if not isinstance(state, Mapping):
            raise CacheError(f"load_state_dict expects a mapping, got {type(state).__name__}")
        if state.get("variant") != self.variant:
            raise CacheError(
                f"this state was saved from a {state.get('variant')!r} cache; this cache is for {self.variant!r}"
            )
        expected = set(self.state_dict())
        if set(state) != expected:
            raise CacheError(
                f"state keys {sorted(state)} do not match this {self.variant!r} cache's {sorted(expected)}"
            )
        seq_len = state["seq_len"]
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
            raise CacheError(f"state 'seq_len' must be an int >= 0, got {seq_len!r}")
        if self.max_len is not None and seq_len > self.max_len:
            raise CacheError(f"state has seq_len={seq_len}, past this cache's max_len={self.max_len}")
        tensors = {k: v for k, v in state.items() if k not in ("variant", "seq_len")}
        batches = {t.shape[0] for t in tensors.values() if isinstance(t, torch.Tensor)}
        if len(batches) > 1:
            raise CacheError(f"state tensors disagree on the batch size: {sorted(batches)}")
        self._load_state_tensors(tensors, seq_len)
        if batches:
            self.batch = batches.pop()
        self._seq_len = seq_len

    # ---- the call -------------------------------------------------------------------------
    def check_call(
        self,
        spec: VariantSpec,
        params: Mapping[str, Any],
        call: Call,
        *,
        causal: bool,
        return_weights: bool,
        device: torch.device,
    ) -> None:
        """Raise :class:`~sparse_linear_attn.errors.CacheError` if this call cannot continue this
        cache: another variant or other parameters, a non-causal call, weights or autograd
        asked for, other shapes/dtype/device, or more positions than ``max_len`` allows."""
        if spec.name != self.variant:
            raise CacheError(
                f"this cache was made for variant {self.variant!r}, but the call runs {spec.name!r}; "
                f"make one for it with sla.make_cache({spec.name!r}, ...)"
            )
        differ = [n for n in set(params) | set(self.params) if not _same(params.get(n), self.params.get(n))]
        if differ:
            shown = ", ".join(f"{n}={self.params.get(n)!r} (call: {params.get(n)!r})" for n in sorted(differ))
            raise CacheError(f"this {self.variant!r} cache was made with other parameters: {shown}")
        if not causal:
            raise CacheError("a cache decodes causally: call with causal=True (the new tokens follow the cached ones)")
        if return_weights:
            raise CacheError("return_weights=True is not available with a cache (the cache may not hold every key)")
        if call.requires_grad:
            raise CacheError(
                "a cache is for inference and does not carry gradients to earlier steps: run under "
                "torch.no_grad() (or torch.inference_mode()); inputs require grad here"
            )
        got = (call.batch, call.kv_heads, call.head_dim, call.v_dim)
        want = (self.batch, self.kv_heads, self.head_dim, self.value_dim)
        if got != want:
            raise CacheError(
                f"the call's (batch, kv_heads, head_dim, value_dim) = {got} do not match the cache's {want}"
            )
        if call.dtype != self.dtype or device != self.device:
            raise CacheError(
                f"the call runs in {_dtype_name(call.dtype)} on {device}; the cache holds "
                f"{_dtype_name(self.dtype)} on {self.device}"
            )
        if call.nq != call.nk:
            raise CacheError(
                f"with a cache, q, k and v hold the same new tokens; got {call.nq} queries and {call.nk} keys"
            )
        limit = self.limit()
        if limit is not None and self.seq_len + call.nk > limit:
            raise CacheError(
                f"{call.nk} new token(s) after {self.seq_len} would pass this cache's limit of {limit} "
                f"positions{self._limit_reason()}; make a cache with a larger max_len"
            )
        self._check_more(call)

    def step(self, p: dispatch.Prepared, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, module=None):
        """Attend the new tokens over the cached ones and themselves, and add them to the cache.

        ``p`` is the prepared call (:func:`~sparse_linear_attn.backends.dispatch.prepare` has run
        :meth:`check_call`). Returns ``out (B, H, T, Dv)``: the rows of the one-shot causal call
        over the whole sequence at positions ``seq_len .. seq_len + T − 1``.
        """
        out = self._advance(p, q, k, v, module)
        self._seq_len += k.shape[2]
        return out

    def append(self, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> CacheView:
        """Add ``T`` new keys/values (a step without its attention) and return what the new
        queries may see, for a dense path of the caller's own. Check the call first (as
        :func:`~sparse_linear_attn.backends.dispatch.prepare` does with ``cache=``). Caches that
        keep no keys (a recurrent state) raise :class:`~sparse_linear_attn.errors.CacheError`."""
        view = self._view(k, v, key_padding_mask)
        self._seq_len += k.shape[2]
        return view

    # ---- what families implement ----------------------------------------------------------
    def _view(self, k, v, key_padding_mask) -> CacheView:
        raise CacheError(
            f"a {self.variant!r} cache keeps no keys ({type(self).__name__}), so it has no dense view "
            f"for a score bias; only caches that keep keys (full, dot_product, sliding_window, block_sparse) do"
        )

    def limit(self) -> int | None:
        """The largest ``seq_len`` this cache can reach (``max_len``, or a family's own bound)."""
        return self.max_len

    def _limit_reason(self) -> str:
        return f" (max_len={self.max_len})"

    def _check_more(self, call: Call) -> None:
        """Family-specific checks of a call."""

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {n: t for n in self._buffers if (t := getattr(self, n)) is not None}

    def _state_tensors(self) -> dict[str, Any]:
        return dict(self._tensors())

    def _load_state_tensors(self, tensors: Mapping[str, Any], seq_len: int) -> None:
        for name, t in tensors.items():
            mine = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.shape[1:] != mine.shape[1:]:
                raise CacheError(
                    f"state tensor {name!r} must have shape (batch, {', '.join(map(str, mine.shape[1:]))}), "
                    f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                )
            setattr(self, name, t.to(device=mine.device, dtype=mine.dtype).clone())

    def _clear(self) -> None:
        raise NotImplementedError

    def _advance(self, p: dispatch.Prepared, q, k, v, module) -> torch.Tensor:
        raise NotImplementedError


def attend_one_shot(
    p: dispatch.Prepared,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    *,
    module=None,
    params: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """The variant's own causal call of the new queries over the keys ``k``/``v`` (bottom-right
    aligned: the last query sees the last key), through dispatch like any call."""
    sub = dispatch.prepare(
        p.spec, q, k, v, params=p.params if params is None else params, causal=True,
        key_padding_mask=key_padding_mask, scale=p.scale, backend=p.backend,
    )  # fmt: skip
    return dispatch.run(sub, q, k, v, module=module)
