"""Attention configs: a dataclass, a flat mapping, or a JSON/YAML/TOML file holding one.

A flat mapping is what users write in their model configs::

    {"variant": "sliding_window", "window": 256, "causal": true}

Keys ``variant``, ``causal``, ``scale`` and ``backend`` are common to every variant; every
other key is a parameter of the variant and is checked against its spec.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ParameterError
from .inputs import check_flag, check_scale

COMMON_KEYS = ("variant", "causal", "scale", "backend")


@dataclass
class AttentionConfig:
    """Which variant to run and how; ``params`` holds the variant's own parameters."""

    variant: str = "full"
    causal: bool = False
    scale: float | None = None
    backend: str = "auto"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.variant, str):
            raise ParameterError(f"config 'variant' must be a string, got {self.variant!r}")
        self.causal = check_flag("config 'causal'", self.causal)
        self.scale = check_scale(self.scale, "config 'scale'")
        if not isinstance(self.backend, str):
            raise ParameterError(f"config 'backend' must be a string, got {self.backend!r}")
        clash = [k for k in self.params if k in COMMON_KEYS]
        if clash:
            raise ParameterError(f"{clash} are common config keys, not variant parameters")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> AttentionConfig:
        if not isinstance(mapping, Mapping):
            raise ParameterError(f"an attention config must be a mapping, got {type(mapping).__name__}")
        m = dict(mapping)
        if "params" in m and isinstance(m["params"], Mapping):
            # Also accept the nested form that to_dict(flat=False) writes.
            m.update(m.pop("params"))
        common = {k: m.pop(k) for k in COMMON_KEYS if k in m}
        return cls(**common, params=m)

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping form (what ``from_mapping`` and config files take)."""
        out: dict[str, Any] = {"variant": self.variant, "causal": self.causal, "backend": self.backend}
        if self.scale is not None:
            out["scale"] = self.scale
        out.update(self.params)
        return out


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.json``, ``.yaml``/``.yml`` or ``.toml`` file into a mapping (YAML: safe loader)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"attention config file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    text = p.read_text(encoding="utf-8")
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            raise ValueError(
                f"attention config file {str(p)!r} has suffix {suffix!r}; accepted: .json, .yaml, .yml, .toml"
            )
    except ValueError as e:
        if "has suffix" in str(e):
            raise
        raise ValueError(f"could not parse attention config file {str(p)!r}: {e}") from e
    except Exception as e:  # yaml.YAMLError is not a ValueError
        raise ValueError(f"could not parse attention config file {str(p)!r}: {e}") from e
    if not isinstance(data, Mapping):
        raise ValueError(
            f"attention config file {str(p)!r} must hold a mapping of keys to values, got {type(data).__name__}"
        )
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
