"""The settings of a sweep, every one checked before the first point runs.

:class:`SweepSettings` is what ``sla-bench run`` builds from its defaults, a study file and the
command line (in that order of precedence). Its checks run on construction, so a study file
with ``causal: "false"`` or ``temperature: "2"`` stops at once with a message naming every bad
option, instead of recording errors point by point or failing mid-sweep.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ParameterError
from .inputs import INPUT_KINDS
from .spec import BenchVariant

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
REFERENCE_DTYPES = ("auto", "float32", "float64")

#: Options of ``sla-bench run`` (and of study files) and their defaults, besides ``variants``.
DEFAULTS: dict[str, Any] = dict(
    seq_lens="1k,2k,4k,8k",
    batch=1,
    heads=8,
    head_dim=64,
    dtype="float32",
    device="auto",
    causal=False,
    backward=False,
    inputs="local",
    temperature=1.0,
    repeats=5,
    warmup=1,
    seed=0,
    out="bench-out",
    resume=False,
    plot=True,
    max_time_per_point=5.0,
    real_layer=3,
    reference_max_n=None,
    math_reference_max_n=None,
    reference_dtype="auto",
    recall_rows=256,
    layer_errors_max_n=4096,
    texts=None,
    threads=None,
)

#: Settings that may change between a run and its ``--resume`` (they add points); every other
#: one must match what the results file was measured with.
EXTENDABLE = ("variants", "seq_lens")
#: Settings that are not about what is measured.
NOT_RECORDED = ("out", "resume", "extra")


@dataclass
class SweepSettings:
    variants: list[BenchVariant]
    seq_lens: list[int]
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "auto"
    #: One mode or a list of modes: each is a sweep of its own within the file.
    causal: bool | list[bool] = False
    backward: bool = False
    #: One input kind or a list of kinds.
    inputs: str | list[str] = "local"
    temperature: float = 1.0
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    out: str = "bench-out"
    resume: bool = False
    #: Seconds the timed repeats of one point may take; repeats are cut down (to at least one)
    #: when the first calls say they would take longer.
    max_time_per_point: float = 5.0
    #: Memory a dense float64/float32 reference (the ``math`` backend) may take, in bytes.
    max_reference_bytes: int = 4 << 30
    real_layer: int = 3
    #: Longest N at which the exact references are computed (None: no limit). On a CPU the
    #: exact reference at N = 64K takes as long as full attention itself: minutes.
    reference_max_n: int | None = None
    #: Longest N at which the variant's own ``math`` backend checks the fast one (None: no limit).
    math_reference_max_n: int | None = None
    #: dtype of the exact full-attention reference: auto = float64 on the CPU, float32 on CUDA.
    reference_dtype: str = "auto"
    #: Query rows per (batch, head) on which recall and the oracle are evaluated (evenly spaced).
    recall_rows: int = 256
    #: Longest N at which real inputs' per-layer errors are computed (None: no limit).
    layer_errors_max_n: int | None = 4096
    #: A text file (one document per paragraph) for real inputs instead of the bundled text.
    texts: str | None = None
    #: torch intra-op threads (None: torch's default). On a CPU shared with other jobs, one
    #: thread avoids waiting on a descheduled worker at every parallel op.
    threads: int | None = None
    #: Name of the study file the settings came from (None: the command line only).
    study: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ParameterError("invalid settings: " + "; ".join(problems))

    @property
    def input_kinds(self) -> list[str]:
        return list(self.inputs) if isinstance(self.inputs, (list, tuple)) else [self.inputs]

    @property
    def causal_modes(self) -> list[bool]:
        return list(self.causal) if isinstance(self.causal, (list, tuple)) else [self.causal]

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
        return dev

    def reference_torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.reference_dtype == "auto":
            return torch.float32 if device.type == "cuda" else torch.float64
        return DTYPES[self.reference_dtype]

    def recorded(self) -> dict[str, Any]:
        """The settings stored with every record (``settings``), against which ``--resume`` checks."""
        d = asdict(self)
        for k in (*EXTENDABLE, *NOT_RECORDED):
            d.pop(k, None)
        d["texts"] = texts_id(self.texts)
        return d


def texts_id(path: str | None) -> str | None:
    """``NAME (sha256 PREFIX)`` of a text file: the same text under another path is the same input."""
    if path is None:
        return None
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    return f"{Path(path).name} (sha256 {digest})"


def _int(v: Any, low: int, *, none: bool = False) -> str | None:
    if v is None and none:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        return f"expected an int >= {low}{' or none' if none else ''}, got {type(v).__name__} {v!r}"
    if v < low:
        return f"expected an int >= {low}, got {v}"
    return None


def _number(v: Any, *, positive: bool) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"expected a number, got {type(v).__name__} {v!r}"
    if not math.isfinite(v) or (positive and v <= 0):
        return f"expected a finite number{' > 0' if positive else ''}, got {v!r}"
    return None


def _bool(v: Any) -> str | None:
    if not isinstance(v, bool):
        hint = " (write true or false without quotes)" if isinstance(v, str) else ""
        return f"expected true or false, got {type(v).__name__} {v!r}{hint}"
    return None


def _choice(v: Any, choices) -> str | None:
    if not isinstance(v, str) or v not in choices:
        return f"expected one of {', '.join(choices)}, got {v!r}"
    return None


def _list_or_one(v: Any, check) -> str | None:
    items = v if isinstance(v, (list, tuple)) else [v]
    if not items:
        return "expected a value or a non-empty list"
    if len(set(map(repr, items))) != len(items):
        return f"a list of distinct values, got {list(items)!r}"
    for x in items:
        problem = check(x)
        if problem:
            return problem
    return None


def _problems(s: SweepSettings) -> list[str]:
    """Every invalid setting, named, with what is accepted."""
    checks: dict[str, str | None] = {
        "batch": _int(s.batch, 1),
        "heads": _int(s.heads, 1),
        "head_dim": _int(s.head_dim, 1),
        "repeats": _int(s.repeats, 1),
        "warmup": _int(s.warmup, 0),
        "seed": _int(s.seed, 0) or (f"expected an int < 2^63, got {s.seed}" if s.seed >= 1 << 63 else None),
        "real_layer": _int(s.real_layer, 0),
        "reference_max_n": _int(s.reference_max_n, 1, none=True),
        "math_reference_max_n": _int(s.math_reference_max_n, 1, none=True),
        "layer_errors_max_n": _int(s.layer_errors_max_n, 1, none=True),
        "recall_rows": _int(s.recall_rows, 1),
        "threads": _int(s.threads, 1, none=True),
        "max_reference_bytes": _int(s.max_reference_bytes, 1),
        "dtype": _choice(s.dtype, DTYPES),
        "reference_dtype": _choice(s.reference_dtype, REFERENCE_DTYPES),
        "inputs": _list_or_one(s.inputs, lambda x: _choice(x, INPUT_KINDS)),
        "causal": _list_or_one(s.causal, _bool),
        "backward": _bool(s.backward),
        "resume": _bool(s.resume),
        "temperature": _number(s.temperature, positive=False),
        "max_time_per_point": _number(s.max_time_per_point, positive=True),
    }
    if not isinstance(s.device, str) or not (s.device in ("auto", "cpu", "cuda") or s.device.startswith("cuda:")):
        checks["device"] = f"expected auto, cpu, cuda or cuda:N, got {s.device!r}"
    if not isinstance(s.out, (str, os.PathLike)) or not str(s.out).strip():
        checks["out"] = f"expected a folder path, got {s.out!r}"
    if s.texts is not None:
        if not isinstance(s.texts, (str, os.PathLike)):
            checks["texts"] = f"expected a path to a text file, got {s.texts!r}"
        elif not Path(s.texts).is_file():
            checks["texts"] = f"no text file at {str(s.texts)!r}"
    if s.study is not None and not isinstance(s.study, str):
        checks["study"] = f"expected a name, got {s.study!r}"
    if not isinstance(s.seq_lens, list) or not s.seq_lens:
        checks["seq_lens"] = f"expected a non-empty list of lengths, got {s.seq_lens!r}"
    if not isinstance(s.variants, list) or not s.variants:
        checks["variants"] = "no variants to benchmark"
    elif not all(isinstance(v, BenchVariant) for v in s.variants):
        checks["variants"] = "expected BenchVariant entries (see sla.bench.parse_variant_specs)"
    return [f"{k}: {p}" for k, p in checks.items() if p]
