"""Variant specs (``name:key=value,key=value``), knob sweeps, sequence-length lists and study files.

A list value sweeps a knob: ``sliding_window:window=[32,64,128]`` is three specs, and several
lists give their cross product (``topk_block:density=[0.05,0.1],block_size=[32,64]`` is four).
A list of lists is a value, not a sweep (a ``block_sparse`` ``layout``). ``oracle`` is not a
registered variant but a reference the benchmark computes itself: the best selection of
entries at a given ``density`` (see :mod:`.accuracy`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from .. import registry
from ..errors import ParameterError

#: Keys of a spec that are not variant parameters.
SPEC_KEYS = ("backend",)
#: The reference selection drawn on frontier plots (not a registered variant).
ORACLE = "oracle"
#: Densities of a bare ``oracle`` spec.
ORACLE_DENSITIES = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


@dataclass(frozen=True)
class BenchVariant:
    """One variant to benchmark: registry name, its parameters, and the backend asked for.

    ``sweep`` names the parameters a list in the spec swept, in the spec's order (the first one
    orders a family's line on frontier plots); it does not take part in equality.
    """

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    backend: str = "auto"
    sweep: tuple[str, ...] = field(default=(), compare=False)

    @property
    def label(self) -> str:
        """``name:key=value,...`` (the spec string; ``backend=`` last when not auto)."""
        items = [f"{k}={_fmt(v)}" for k, v in sorted(self.params.items())]
        if self.backend != "auto":
            items.append(f"backend={self.backend}")
        return self.name + (":" + ",".join(items) if items else "")

    def params_json(self) -> str:
        return json.dumps(dict(sorted(self.params.items())), sort_keys=True, default=str)

    @property
    def is_oracle(self) -> bool:
        return self.name == ORACLE


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def parse_value(text: str) -> Any:
    """Typed value of ``text``: int, float, bool (true/false), None (none/null), a list
    (``[1, 2]``, ``[local, bigbird]``: JSON, or comma-separated plain values), else str."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    if t[:1] in "[{":
        try:
            return json.loads(t)
        except json.JSONDecodeError:
            pass
        if t[:1] == "[":
            if not t.endswith("]"):
                raise ParameterError(f"value {text!r} opens a list '[' that is not closed (e.g. window=[32,64])")
            inner = t[1:-1]
            if "[" in inner or "]" in inner:
                raise ParameterError(f"value {text!r} is not a valid list (nested lists must be JSON)")
            return [] if not inner.strip() else [parse_value(p) for p in inner.split(",")]
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    return t


def _split_spec(text: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(text, str) or not text.strip():
        raise ParameterError(f"a variant spec must be 'name' or 'name:key=value,...', got {text!r}")
    name, _, rest = text.strip().partition(":")
    params: dict[str, Any] = {}
    if rest.strip():
        # Split on commas that start a new key=value (a list value holds commas of its own).
        parts: list[str] = []
        depth = 0
        for piece in rest.split(","):
            if parts and (depth > 0 or "=" not in piece):
                parts[-1] += "," + piece
            else:
                parts.append(piece)
            depth = parts[-1].count("[") - parts[-1].count("]")
        for part in parts:
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise ParameterError(
                    f"variant spec {text!r}: expected key=value after ':', got {part!r} "
                    f"(e.g. 'sliding_window:window=256,backend=torch')"
                )
            if key.strip() in params:
                raise ParameterError(f"variant spec {text!r}: {key.strip()!r} is given twice")
            try:
                params[key.strip()] = parse_value(value)
            except ParameterError as e:
                raise ParameterError(f"variant spec {text!r}: {e}") from None
    return name.strip(), params


def parse_variant_specs(text: str) -> list[BenchVariant]:
    """``"sliding_window:window=[64,256]"`` -> one :class:`BenchVariant` per swept value.

    Values are typed (:func:`parse_value`); ``backend=NAME`` picks a backend instead of auto.
    Names and every expanded parameter set are checked against the registry here, before any
    run, with the closest names suggested for typos.
    """
    name, params = _split_spec(text)
    return expand_variant(name, params, where=f"variant spec {text!r}")


def parse_variant_spec(text: str) -> BenchVariant:
    """One spec without sweeps: ``"sliding_window:window=256"`` -> ``BenchVariant``."""
    out = parse_variant_specs(text)
    if len(out) != 1:
        raise ParameterError(f"variant spec {text!r} sweeps {len(out)} settings; expected one")
    return out[0]


def _is_sweep(value: Any) -> bool:
    """A list of plain values sweeps; a list holding lists (a layout) is one value."""
    return isinstance(value, (list, tuple)) and not any(isinstance(x, (list, tuple, Mapping)) for x in value)


def expand_variant(name: str, params: Mapping[str, Any], *, where: str | None = None) -> list[BenchVariant]:
    """The cross product of a spec's list values, each checked like a single spec."""
    where = where or f"variant {name!r}"
    swept = [k for k, v in params.items() if _is_sweep(v)]
    if name == ORACLE and "density" not in params:
        params = {**params, "density": list(ORACLE_DENSITIES)}
        swept = ["density", *swept]
    for k in swept:
        values = list(params[k])
        if not values:
            raise ParameterError(f"{where}: {k}=[] sweeps nothing; give at least one value, e.g. {k}=[32,64]")
        seen: list[Any] = []
        for x in values:
            if any(type(x) is type(y) and x == y for y in seen):
                raise ParameterError(f"{where}: {k}={values!r} repeats the value {x!r}")
            seen.append(x)
    out = []
    for combo in itertools.product(*(list(params[k]) for k in swept)):
        one = {**params, **dict(zip(swept, combo))}
        try:
            bv = make_variant(name, one)
        except ParameterError as e:
            if not swept:
                raise
            setting = ", ".join(f"{k}={v!r}" for k, v in zip(swept, combo))
            raise type(e)(f"{where}, setting {setting}: {e}") from None
        out.append(BenchVariant(bv.name, bv.params, bv.backend, sweep=tuple(k for k in swept if k != "backend")))
    return out


def _check_oracle(params: Mapping[str, Any]) -> None:
    unknown = [k for k in params if k != "density"]
    if unknown:
        raise ParameterError(f"oracle takes one parameter, density (a fraction in (0, 1]); got {unknown}")
    d = params["density"]
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 < d <= 1) or not math.isfinite(d):
        raise ParameterError(f"oracle: density must be a number in (0, 1], got {d!r}")


def make_variant(name: str, params: Mapping[str, Any]) -> BenchVariant:
    params = dict(params)
    backend = params.pop("backend", "auto")
    if not isinstance(backend, str):
        raise ParameterError(f"variant {name!r}: backend must be a name, got {backend!r}")
    if name == ORACLE:
        if backend != "auto":
            raise ParameterError("oracle is computed by the benchmark itself; it takes no backend")
        _check_oracle(params)
        return BenchVariant(name, {"density": float(params["density"])})
    from ..backends.dispatch import BACKENDS
    from ..errors import UnknownNameError, unknown_name_message

    if backend != "auto" and backend not in BACKENDS:
        raise UnknownNameError(unknown_name_message("backend", backend, ["auto", *BACKENDS]))
    spec = registry.get(name)  # unknown names -> closest matches
    spec.resolve_params(params)  # unknown / invalid parameters -> clear error now, not mid-sweep
    return BenchVariant(name, params, backend)


def variants_from_entry(entry: Any) -> list[BenchVariant]:
    """A study file's variant entry: a spec string or a mapping ``{variant|name: ..., key: value}``;
    list values sweep as in a spec string."""
    if isinstance(entry, str):
        return parse_variant_specs(entry)
    if isinstance(entry, Mapping):
        m = dict(entry)
        name = m.pop("variant", None) or m.pop("name", None)
        if not isinstance(name, str):
            raise ParameterError(f"a variant entry needs 'variant: NAME', got {entry!r}")
        nested = m.pop("params", None)
        if isinstance(nested, Mapping):
            m.update(nested)
        return expand_variant(name, m, where=f"variant entry {entry!r}")
    raise ParameterError(f"a variant entry is a spec string or a mapping, got {entry!r}")


def variant_from_entry(entry: Any) -> BenchVariant:
    """One variant entry without sweeps."""
    out = variants_from_entry(entry)
    if len(out) != 1:
        raise ParameterError(f"variant entry {entry!r} sweeps {len(out)} settings; expected one")
    return out[0]


def unique_variants(variants: list[BenchVariant]) -> list[BenchVariant]:
    """The list without repeats (the same spec twice would be measured and plotted twice)."""
    out: dict[str, BenchVariant] = {}
    for bv in variants:
        out.setdefault(bv.label, bv)
    return list(out.values())


_SUFFIX = {"k": 1024, "m": 1024 * 1024}
#: Longest sequence length accepted (2^40: anything longer is a typo, not a benchmark).
MAX_SEQ_LEN = 1 << 40


def parse_seq_len(text: str | int) -> int:
    """``"4k"`` -> 4096, ``"1m"`` -> 1048576, ``"1000"`` -> 1000, ``"1.5k"`` -> 1536.

    The length must come out a whole number ≥ 1: ``1.5``, ``0.4k`` (409.6), ``inf`` and
    ``1e400`` are refused with a message, never rounded.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ParameterError(f"a sequence length is an int or a string like 4k, got {text!r}")
    t = str(text).strip().lower()
    mult = _SUFFIX.get(t[-1:], 1)
    body = t[:-1] if mult != 1 else t
    try:
        value = Decimal(body)
        if value.is_finite() and value.adjusted() > 15:  # before int() builds a huge number
            if value < 0:
                raise ParameterError(f"sequence length must be >= 1, got {text!r}")
            raise ParameterError(f"sequence length {text!r} is beyond any machine (limit 2^40 tokens)")
        value *= mult
    except (InvalidOperation, ArithmeticError):
        raise ParameterError(f"sequence length {text!r} is not a number like 512, 4k or 1m") from None
    if not value.is_finite():
        raise ParameterError(f"sequence length {text!r} is not finite; give a whole number like 4096 or 4k")
    if value > MAX_SEQ_LEN:
        raise ParameterError(f"sequence length {text!r} is beyond any machine (limit 2^40 tokens)")
    if value != value.to_integral_value():
        raise ParameterError(
            f"sequence length {text!r} is {value.normalize():f} tokens, not a whole number (k = 1024, m = 1024²)"
        )
    n = int(value)
    if n < 1:
        raise ParameterError(f"sequence length must be >= 1, got {text!r}")
    return n


def parse_seq_lens(text: str | list) -> list[int]:
    items = text if isinstance(text, (list, tuple)) else [t for t in str(text).split(",") if t.strip()]
    if not items:
        raise ParameterError(f"expected a comma-separated list of sequence lengths, got {text!r}")
    # Repeats ("1k,1024") would measure the same point twice and plot it twice: keep the first.
    return list(dict.fromkeys(parse_seq_len(t) for t in items))


def load_study(path: str | os.PathLike) -> dict[str, Any]:
    """Read a study file (.yaml/.yml/.json/.toml): a mapping of ``run`` options plus ``variants``."""
    from ..config import load_config_file

    data = load_config_file(path)
    if not isinstance(data, Mapping):
        raise ParameterError(f"study file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
