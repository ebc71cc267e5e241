"""Attention configs: a dataclass, a flat mapping, or a JSON/YAML/TOML file holding one.

A flat mapping is what users write in their model configs::

    {"variant": "sliding_window", "window": 256, "causal": true}

Keys ``variant``, ``causal``, ``scale``, ``backend`` and ``dropout`` are common to every
variant; every other key is a parameter of the variant and is checked against its spec.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .errors import ParameterError
from .inputs import check_flag, check_probability, check_scale

COMMON_KEYS = ("variant", "causal", "scale", "backend", "dropout")


@dataclass
class AttentionConfig:
    """Which variant to run and how; ``params`` holds the variant's own parameters.

    ``dropout`` is the attention dropout a built module applies in training (``dropout_p`` of
    ``sla.attention``); 0 by default.
    """

    variant: str = "full"
    causal: bool = False
    scale: float | None = None
    backend: str = "auto"
    params: dict[str, Any] = field(default_factory=dict)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.variant, str):
            raise ParameterError(f"config 'variant' must be a string, got {self.variant!r}")
        self.causal = check_flag("config 'causal'", self.causal)
        self.scale = check_scale(self.scale, "config 'scale'")
        if not isinstance(self.backend, str):
            raise ParameterError(f"config 'backend' must be a string, got {self.backend!r}")
        self.dropout = check_probability("config 'dropout'", self.dropout)
        if not isinstance(self.params, Mapping):
            raise ParameterError(f"config 'params' must be a mapping of parameter names to values, got {self.params!r}")
        bad = [k for k in self.params if not isinstance(k, str)]
        if bad:
            raise ParameterError(f"variant parameter names must be strings, got {', '.join(map(repr, bad))}")
        self.params = dict(self.params)
        clash = [k for k in self.params if k in COMMON_KEYS]
        if clash:
            raise ParameterError(f"{clash} are common config keys, not variant parameters")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> AttentionConfig:
        if not isinstance(mapping, Mapping):
            raise ParameterError(f"an attention config must be a mapping, got {type(mapping).__name__}")
        bad = [k for k in mapping if not isinstance(k, str)]
        if bad:
            raise ParameterError(
                f"attention config keys must be strings (variant, causal, scale, backend or a parameter "
                f"name), got {', '.join(f'{k!r} ({type(k).__name__})' for k in bad)}"
            )
        m = dict(mapping)
        if "params" in m and isinstance(m["params"], Mapping):
            # Also accept the nested form {"variant": ..., "params": {...}} (the dataclass's shape).
            nested = m.pop("params")
            both = [k for k in nested if k in m]
            if both:
                raise ParameterError(
                    f"{', '.join(map(repr, both))} is given both at the top level and under 'params'; give it once"
                )
            m.update(nested)
        common = {k: m.pop(k) for k in COMMON_KEYS if k in m}
        return cls(**common, params=m)

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping form (what ``from_mapping`` and config files take)."""
        out: dict[str, Any] = {"variant": self.variant, "causal": self.causal, "backend": self.backend}
        if self.scale is not None:
            out["scale"] = self.scale
        if self.dropout:
            out["dropout"] = self.dropout
        out.update(self.params)
        return out


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` object hook: a key given twice is an error (JSON would silently keep the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


@cache
def _yaml_loader() -> type:
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML keeps the last)."""
    import yaml

    class UniqueKeySafeLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<' merges are overridden by explicit keys on purpose
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable: the base class reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeySafeLoader


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.json``, ``.yaml``/``.yml`` or ``.toml`` file into a mapping (YAML: safe loader).

    The file is UTF-8 (a byte-order mark is allowed); a key given twice in one mapping and a
    file without any key are errors in every format, as TOML makes the first one by itself.
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(
            f"attention config path {str(p)!r} is a directory; expected a .json, .yaml, .yml or .toml file"
        )
    if not p.is_file():
        raise FileNotFoundError(f"attention config file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml", ".toml"):
        raise ValueError(f"attention config file {str(p)!r} has suffix {suffix!r}; accepted: .json, .yaml, .yml, .toml")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"attention config file {str(p)!r} is not valid UTF-8 text: {e}") from None
    try:
        if suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_pairs)
        elif suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass
    except Exception as e:  # json/toml raise ValueErrors, yaml.YAMLError is not one
        raise ValueError(f"could not parse attention config file {str(p)!r}: {e}") from e
    if not isinstance(data, Mapping):
        raise ValueError(
            f"attention config file {str(p)!r} must hold a mapping of keys to values, got {type(data).__name__}"
        )
    if not data:
        raise ValueError(f"attention config file {str(p)!r} holds no keys; expected at least 'variant'")
    return dict(data)


def to_config(config: AttentionConfig | Mapping[str, Any] | str | os.PathLike) -> AttentionConfig:
    """Normalise anything ``sla.build`` accepts into an :class:`AttentionConfig`."""
    if isinstance(config, AttentionConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return AttentionConfig.from_mapping(load_config_file(config))
    if isinstance(config, Mapping):
        return AttentionConfig.from_mapping(config)
    raise ParameterError(
        "an attention config must be an AttentionConfig, a mapping, or a path to a "
        f".json/.yaml/.yml/.toml file; got {type(config).__name__}"
    )
