"""``scan`` — ``linear`` / ``performer``: placeholder while the state kernels land."""

from __future__ import annotations

from .plan import Setup


def rules_out(setup: Setup) -> str | None:
    return "not yet"


def run(setup: Setup, q, k, v, key_padding_mask):
    raise NotImplementedError
