"""Error types and the "did you mean" helper shared by every user-facing check."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UnknownNameError(ValueError):
    """An unknown variant, backend, pattern or feature-map name."""


class ParameterError(TypeError, ValueError):
    """An unknown or invalid parameter.

    It is both a ``TypeError`` (like an unexpected keyword argument to a Python
    function) and a ``ValueError`` (like a bad value), so callers can catch either.
    """


class ShapeError(ValueError):
    """Tensors whose ranks, shapes, dtypes or devices do not fit together."""


class CacheError(ValueError):
    """A call that does not fit the decoding cache it was given: another variant or other
    parameters, other shapes, dtype or device, or a step past the cache's ``max_len``."""


class BackendUnavailableError(ValueError):
    """No backend (or not the requested one) can run this call; the message says why."""


class CannotRun(BackendUnavailableError):
    """Raised by a backend, while running, for a call it turns out it cannot run; ``reason``
    says why. Under ``backend="auto"`` dispatch then runs the next candidate backend."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not found:
        # Substring matches catch abbreviations that difflib scores low ("sliding" -> "sliding_window").
        found = [c for c in choices if name and (name in c or c in name)][:n]
    return found


def unknown_name_message(kind: str, name: str, choices: Iterable[str]) -> str:
    choices = sorted(choices)
    near = closest(name, choices)
    hint = f" Did you mean {', '.join(repr(c) for c in near)}?" if near else ""
    return f"unknown {kind} {name!r}.{hint} Known: {', '.join(choices) or '(none)'}."
