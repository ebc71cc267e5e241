"""Variant specs (``name:key=value,key=value``), sequence-length lists and study files."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import registry
from ..errors import ParameterError

#: Keys of a spec that are not variant parameters.
SPEC_KEYS = ("backend",)


@dataclass(frozen=True)
class BenchVariant:
    """One variant to benchmark: registry name, its parameters, and the backend asked for."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    backend: str = "auto"

    @property
    def label(self) -> str:
        """``name:key=value,...`` (the spec string; ``backend=`` last when not auto)."""
        items = [f"{k}={_fmt(v)}" for k, v in sorted(self.params.items())]
        if self.backend != "auto":
            items.append(f"backend={self.backend}")
        return self.name + (":" + ",".join(items) if items else "")

    def params_json(self) -> str:
        return json.dumps(dict(sorted(self.params.items())), sort_keys=True, default=str)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    return str(v)


def parse_value(text: str) -> Any:
    """Typed value of ``text``: int, float, bool (true/false), None (none/null), JSON list, else str."""
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
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    return t


def parse_variant_spec(text: str) -> BenchVariant:
    """``"sliding_window:window=256"`` -> ``BenchVariant("sliding_window", {"window": 256})``.

    Values are typed (``parse_value``); ``backend=NAME`` picks a backend instead of auto. The
    name and parameters are checked against the registry here, before any run, with the
    closest names suggested for typos.
    """
    if not isinstance(text, str) or not text.strip():
        raise ParameterError(f"a variant spec must be 'name' or 'name:key=value,...', got {text!r}")
    name, _, rest = text.strip().partition(":")
    params: dict[str, Any] = {}
    if rest.strip():
        # Split on commas that start a new key=value (a JSON list value may hold commas).
        parts: list[str] = []
        for piece in rest.split(","):
            if parts and "=" not in piece:
                parts[-1] += "," + piece
            else:
                parts.append(piece)
        for part in parts:
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise ParameterError(
                    f"variant spec {text!r}: expected key=value after ':', got {part!r} "
                    f"(e.g. 'sliding_window:window=256,backend=torch')"
                )
            params[key.strip()] = parse_value(value)
    return make_variant(name.strip(), params)


def make_variant(name: str, params: Mapping[str, Any]) -> BenchVariant:
    params = dict(params)
    backend = params.pop("backend", "auto")
    if not isinstance(backend, str):
        raise ParameterError(f"variant {name!r}: backend must be a name, got {backend!r}")
    from ..backends.dispatch import BACKENDS
    from ..errors import UnknownNameError, unknown_name_message

    if backend != "auto" and backend not in BACKENDS:
        raise UnknownNameError(unknown_name_message("backend", backend, ["auto", *BACKENDS]))
    spec = registry.get(name)  # unknown names -> closest matches
    spec.resolve_params(params)  # unknown / invalid parameters -> clear error now, not mid-sweep
    return BenchVariant(name, params, backend)


def variant_from_entry(entry: Any) -> BenchVariant:
    """A study file's variant entry: a spec string or a mapping ``{variant|name: ..., key: value}``."""
    if isinstance(entry, str):
        return parse_variant_spec(entry)
    if isinstance(entry, Mapping):
        m = dict(entry)
        name = m.pop("variant", None) or m.pop("name", None)
        if not isinstance(name, str):
            raise ParameterError(f"a variant entry needs 'variant: NAME', got {entry!r}")
        nested = m.pop("params", None)
        if isinstance(nested, Mapping):
            m.update(nested)
        return make_variant(name, m)
    raise ParameterError(f"a variant entry is a spec string or a mapping, got {entry!r}")


_SUFFIX = {"k": 1024, "m": 1024 * 1024}


def parse_seq_len(text: str | int) -> int:
    """``"4k"`` -> 4096, ``"1m"`` -> 1048576, ``"1000"`` -> 1000."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        t = str(text).strip().lower()
        mult = _SUFFIX.get(t[-1:], 1)
        body = t[:-1] if mult != 1 else t
        try:
            n = int(float(body) * mult)
        except ValueError:
            raise ParameterError(f"sequence length {text!r} is not a number like 512, 4k or 1m") from None
    if n < 1:
        raise ParameterError(f"sequence length must be >= 1, got {text!r}")
    return n


def parse_seq_lens(text: str | list) -> list[int]:
    items = text if isinstance(text, list) else [t for t in str(text).split(",") if t.strip()]
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
