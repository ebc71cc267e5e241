"""The sweep: for every input kind, causal mode, sequence length and variant spec, time, memory,
FLOPs, error and recall.

Each measurement becomes one JSON record appended to ``DIR/results.jsonl`` (flushed and fsynced
as soon as it is finished, so a crash loses at most the measurement in flight). A failure of
one point — out of memory, a backend that cannot run the call, an exception — is recorded with
its status and the sweep goes on; so is a point whose memory is predicted not to fit, which is
not run (on a CPU the kernel's OOM killer would end the process instead of raising).
``resume=True`` skips every key already in the file, after checking that the file was measured
with the same settings (:meth:`SweepSettings.recorded`).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import sparse_linear_attn as sla

from .. import registry
from ..backends.dispatch import prepare, select_backend
from ..errors import BackendUnavailableError
from . import accuracy
from .flops import avg_visible_keys, count_flops, oracle_flops
from .inputs import input_bytes, make_inputs
from .memory import available_bytes, measure_peak, predict_call_bytes, timing_malloc_thresholds
from .settings import DTYPES, SweepSettings, texts_id
from .spec import BenchVariant

__all__ = ["DTYPES", "KEY_FIELDS", "MEASURED_FIELDS", "SweepSettings", "read_results", "record_key", "run_sweep"]

#: Fields that identify a measurement (``--resume`` skips records whose key is present).
KEY_FIELDS = (
    "variant",
    "params",
    "backend_requested",
    "n",
    "batch",
    "heads",
    "head_dim",
    "dtype",
    "device",
    "causal",
    "backward",
    "inputs",
    "temperature",
    "seed",
    "texts",
)
RESULTS = "results.jsonl"
#: Share of the available memory a point may be predicted to take before it is refused.
MEMORY_SAFETY = 0.8


# ---------------------------------------------------------------------------------------------
# Environment and files.


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    # Read from package metadata: importing xformers on a CPU machine warns, and is not needed.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "xformers": _version("xformers"),
        "sla": sla.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }
    return env


def record_key(rec: dict[str, Any]) -> str:
    return json.dumps([rec.get(k) for k in KEY_FIELDS], sort_keys=True, default=str)


def is_record(obj: Any) -> bool:
    """A results line is a record when it is a JSON object with a ``variant`` name and an int ``n``."""
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("variant"), str)
        and isinstance(obj.get("n"), int)
        and not isinstance(obj.get("n"), bool)
    )


def read_results(path: str | os.PathLike, *, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a results.jsonl. A line that is not a record — torn by a crash mid-write, or
    valid JSON of another shape (``[1, 2]``, ``null``, ``{"foo": 1}``) — is skipped with a
    warning on stderr; with ``repair=True`` a torn last line is also cut off the file, so that
    appending continues on a clean line."""
    p = Path(path)
    if not p.exists():
        return []
    if p.is_dir():
        raise IsADirectoryError(f"{p} is a folder, not a results file")
    data = p.read_bytes()
    if repair and data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(p, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    out = []
    for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            print(f"warning: {p}:{i} is not valid JSON (a torn write?); skipped", file=sys.stderr)
            continue
        if not is_record(obj):
            print(
                f"warning: {p}:{i} is not a sla-bench record (a JSON object with 'variant' and 'n'); skipped",
                file=sys.stderr,
            )
            continue
        out.append(obj)
    return out


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """The output folder, created if needed; a clear ``OSError`` subclass message if it is a
    file, cannot be created, or is not writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output folder {str(out)!r} is an existing file; give a folder (--out DIR)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create the output folder {str(out)!r}: {e.strerror or e}") from None
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".sla-bench-probe-"):
            pass
    except OSError as e:
        raise PermissionError(f"output folder {str(out)!r} is not writable: {e.strerror or e}") from None
    return out


def results_path(out: Path) -> Path:
    path = out / RESULTS
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a results file: remove it or choose another --out")
    return path


class ResumeMismatchError(ValueError):
    """``--resume`` into a results file measured with other settings."""


def _normal(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def check_resumable(existing: list[dict[str, Any]], s: SweepSettings, path: Path) -> None:
    """Refuse to resume a file whose records were measured with other settings (any but the
    variants and lengths, which a resumed run may add), naming each differing setting."""
    current = _normal(s.recorded())
    for r in existing:
        old = r.get("settings")
        if not isinstance(old, dict):
            continue  # written before settings were recorded: nothing to compare
        old = _normal(old)
        diffs = [k for k in sorted(set(old) | set(current)) if old.get(k) != current.get(k)]
        if diffs:
            shown = "; ".join(f"{k}: {old.get(k)!r} in the file, {current.get(k)!r} now" for k in diffs[:4])
            more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
            raise ResumeMismatchError(
                f"cannot --resume {path}: it was measured with other settings — {shown}{more}. A resumed run may "
                "add variants and lengths only. Run with the file's settings, drop --resume to start a new file "
                "(the old one is kept as results.<time>.jsonl), or choose another --out."
            )


class ResultWriter:
    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict[str, Any]) -> None:
        self.f.write(json.dumps(rec, default=str) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------------------------------------
# Measuring one point.


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], Any], device: torch.device) -> float:
    """Seconds one ``step()`` takes: CUDA events around it on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


class _Unsupported(Exception):
    """This point cannot run (the variant or backend cannot take the call, or it would not fit
    in memory): recorded, not raised."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _real_layers(s: SweepSettings, n: int) -> list[int]:
    from .real import real_layers

    if s.layer_errors_max_n is None or n <= s.layer_errors_max_n:
        return list(range(real_layers()))
    return [s.real_layer]


def point_bytes(s: SweepSettings, kind: str, n: int, shape: tuple[int, ...], device: torch.device) -> int:
    """Memory making a point's inputs takes: generation (bounded per chunk or segment batch)
    plus the copies in the run's dtype and device."""
    B, H, _, D = shape
    copies = 1
    if kind == "real":
        from .real import real_input_bytes

        copies = len(_real_layers(s, n))
        gen = real_input_bytes(n, copies, B)
    else:
        gen = input_bytes(B, H, n, D)
    if device.type == "cuda" or s.dtype != "float32":
        gen += copies * 3 * B * H * n * D * DTYPES[s.dtype].itemsize
    return gen


class _Point:
    """Inputs, sampled rows and cached references for one (input kind, causal mode, length),
    shared by every variant."""

    def __init__(self, s: SweepSettings, kind: str, causal: bool, n: int, device: torch.device,
                 mask_rows: dict[Any, torch.Tensor] | None = None):  # fmt: skip
        self.kind, self.causal, self.n = kind, causal, n
        #: Sampled rows of static pattern masks, shared by every point of the sweep (they do
        #: not depend on the inputs).
        self.mask_rows: dict[Any, torch.Tensor] = {} if mask_rows is None else mask_rows
        self.device = device
        self.dtype = DTYPES[s.dtype]
        self.notes: list[str] = []
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if kind == "real":
            from .real import real_qkv_layers

            layers, note = real_qkv_layers(n, layers=_real_layers(s, n), batch=s.batch, texts=s.texts)
            self.notes.append(note)
            self.layers = {i: self._cast(t) for i, t in layers.items()}
            self.q, self.k, self.v = self.layers[s.real_layer]
        else:
            made = make_inputs(kind, s.batch, s.heads, n, s.head_dim, temperature=s.temperature, causal=causal,
                               seed=s.seed)  # fmt: skip
            self.q, self.k, self.v = self._cast(made)
        self.rows = accuracy.sample_rows(n, s.recall_rows, device=device)
        self.refs: dict[Any, tuple[torch.Tensor | None, str]] = {}
        #: Exact softmax weights of ``rows`` (``accuracy.row_weights``), made at the first recall.
        self.weights: dict[float, torch.Tensor] = {}
        self.oracles: dict[tuple[float, ...], dict[float, dict[str, float]]] = {}

    def _cast(self, qkv):
        # Inputs are rounded to the run dtype once; references use these same values upcast.
        return tuple(t.to(device=self.device, dtype=self.dtype) for t in qkv)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]


def _full_reference(pt: _Point, scale: float, s: SweepSettings, layer: int | None = None):
    """``(out, how)``: exact attention through SDPA's fused path (O(N) memory), cached per point
    (and real-input layer), in ``s.reference_dtype`` (auto: float64 on the CPU, float32 on CUDA,
    where float64 SDPA would fall back to an O(N²) path)."""
    key = ("full", scale, layer)
    if key not in pt.refs and s.reference_max_n is not None and pt.n > s.reference_max_n:
        pt.refs[key] = (None, f"exact reference skipped: N > reference_max_n={s.reference_max_n}")
    if key not in pt.refs:
        q, k, v = pt.layers[layer] if layer is not None else (pt.q, pt.k, pt.v)
        B, H, N, D = q.shape
        rdtype = s.reference_torch_dtype(pt.device)
        need = 6 * B * H * N * D * rdtype.itemsize
        avail = available_bytes(pt.device)
        if need > avail // 2:
            pt.refs[key] = (None, f"exact reference skipped: needs ~{_gib(need)}, {_gib(avail)} available")
        else:
            try:
                with torch.no_grad():
                    q, k, v = (t.to(rdtype) for t in (q, k, v))
                    out = sla.attention(q, k, v, "full", causal=pt.causal, scale=scale, backend="torch")
                pt.refs[key] = (out, f"full attention, {str(rdtype).replace('torch.', '')}, SDPA (torch backend)")
            except Exception as e:  # noqa: BLE001 — recorded, the sweep goes on
                pt.refs[key] = (None, f"exact reference failed: {type(e).__name__}: {e}")
    return pt.refs[key]


def _math_reference(pt: _Point, bv: BenchVariant, s: SweepSettings) -> tuple[torch.Tensor | None, str]:
    """The variant's own ``math`` backend (dense, O(N²) memory) in float64 where it fits, else float32."""
    key = ("math", bv.name, bv.params_json())
    limits = [(s.reference_max_n, "reference_max_n"), (s.math_reference_max_n, "math_reference_max_n")]
    for limit, name in limits:
        if key not in pt.refs and limit is not None and pt.n > limit:
            pt.refs[key] = (None, f"math reference skipped: N > {name}={limit}")
    if key not in pt.refs:
        B, H, N, _ = pt.shape
        entries = B * H * N * N
        budget = min(s.max_reference_bytes, available_bytes(pt.device) // 2)
        dtype = None
        for cand, size in ((torch.float64, 8), (torch.float32, 4)):
            if 4 * entries * size <= budget:
                dtype = cand
                break
        if dtype is None:
            pt.refs[key] = (None, f"math reference skipped: needs ~{_gib(4 * entries * 4)} (budget {_gib(budget)})")
        else:
            try:
                with torch.no_grad():
                    q, k, v = (t.to(dtype) for t in (pt.q, pt.k, pt.v))
                    out = sla.attention(q, k, v, bv.name, causal=pt.causal, backend="math", **bv.params)
                pt.refs[key] = (out, f"{bv.name} math backend, {str(dtype).replace('torch.', '')}")
            except Exception as e:  # noqa: BLE001
                pt.refs[key] = (None, f"math reference failed: {type(e).__name__}: {e}")
    return pt.refs[key]


#: Fields of a measurement besides the identifying ones (``KEY_FIELDS``, ``label``, ``sweep``),
#: ``settings``, ``env`` and ``timestamp``. docs/benchmarks.md says what each one means.
MEASURED_FIELDS = (
    "status", "reason", "backend", "exact", "cost", "repeats_done", "first_call_ms", "time_ms_median",
    "time_ms_p25", "time_ms_p75", "time_ms_min", "time_ms_max", "peak_mem_mb", "mem_method", "predicted_mem_mb",
    "mem_model", "avg_visible_keys", "flops", "flops_method", "tflops", "density", "compressed_density",
    "rel_error_vs_full", "rel_error_worst_head", "error_reference", "rel_error_backend", "backend_reference",
    "recall_mean", "recall_p5", "recall_rows", "recall_method", "layer_rel_errors", "layer_errors_note",
    "error_note", "e2e_cosine", "e2e_cosine_min", "e2e_note",
)  # fmt: skip


def _backend(bv: BenchVariant, pt: _Point, s: SweepSettings) -> str:
    """The backend the call runs on (``module`` for learned variants); raises :class:`_Unsupported`."""
    spec = registry.get(bv.name)
    if spec.module is not None:
        return "module"
    try:
        with torch.set_grad_enabled(s.backward):
            p = prepare(spec, pt.q, pt.k, pt.v, params=spec.resolve_params(bv.params), causal=pt.causal,
                        backend=bv.backend)  # fmt: skip
        return select_backend(p.spec, p.call, p.params, p.backend)
    except (BackendUnavailableError, ValueError) as e:
        raise _Unsupported("unsupported", str(e)) from None


def _step(bv: BenchVariant, pt: _Point, s: SweepSettings, backend: str) -> Callable[[], torch.Tensor]:
    """One timed call: forward, or forward + backward (on copies of q, k, v that require grad)."""
    spec = registry.get(bv.name)
    D = pt.shape[3]
    leaves = [t.detach().clone().requires_grad_() for t in (pt.q, pt.k, pt.v)] if s.backward else []
    q, k, v = leaves or (pt.q, pt.k, pt.v)
    if spec.module is not None:
        cfg = {"variant": bv.name, "causal": pt.causal, **bv.params}
        if "head_dim" in spec.params and "head_dim" not in bv.params:
            cfg["head_dim"] = D
        torch.manual_seed(s.seed)
        try:
            module = sla.build(cfg).to(device=pt.device, dtype=pt.dtype)
        except ValueError as e:
            raise _Unsupported("unsupported", str(e)) from None

        def forward() -> torch.Tensor:
            return module(q, k, v)
    else:

        def forward() -> torch.Tensor:
            return sla.attention(q, k, v, bv.name, causal=pt.causal, backend=backend, **bv.params)

    grad_out = None

    def step() -> torch.Tensor:
        nonlocal grad_out
        if not s.backward:
            with torch.no_grad():
                return forward()
        out = forward()
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(s.seed + 1)).to(out)
        out.backward(grad_out)
        for t in leaves:
            t.grad = None
        return out.detach()

    return step


def _predict(bv: BenchVariant, backend: str, pt: _Point, s: SweepSettings) -> dict[str, Any]:
    """The predicted memory of the call (its own model plus the copies of q, k, v the benchmark
    makes); raises :class:`_Unsupported` ("oom") when it would not fit."""
    B, H, N, D = pt.shape
    need, how = predict_call_bytes(bv.name, dict(bv.params), backend, batch=B, heads=H, n=N, head_dim=D,
                                   elem=pt.dtype.itemsize, backward=s.backward, device_type=pt.device.type)  # fmt: skip
    if s.backward:
        need += 3 * B * H * N * D * pt.dtype.itemsize  # the copies of q, k, v that require grad
    avail = available_bytes(pt.device)
    if need > MEMORY_SAFETY * avail:
        raise _Unsupported("oom", f"predicted: needs ~{_gib(need)} ({how}), {_gib(avail)} available; not run")
    return {"predicted_mem_mb": need / 2**20, "mem_model": how}


def _timings(step: Callable[[], torch.Tensor], dev: torch.device, s: SweepSettings, notes: list[str]):
    """``(fields, out)``: first-call, repeat statistics and peak memory of ``step``, and its output."""
    rec: dict[str, Any] = {}
    first = _timed(step, dev)
    rec["first_call_ms"] = first * 1e3
    est = first
    for _ in range(s.warmup if first * 3 < s.max_time_per_point else 0):
        est = _timed(step, dev)
    reps = max(1, min(s.repeats, int(s.max_time_per_point / max(est, 1e-9))))
    if reps < s.repeats:
        notes.append(f"repeats cut to {reps} by max_time_per_point={s.max_time_per_point:g}s")
    ms = sorted(_timed(step, dev) * 1e3 for _ in range(reps))
    rec["repeats_done"] = reps
    rec["time_ms_median"] = statistics.median(ms)
    if len(ms) >= 2:
        qs = statistics.quantiles(ms, n=4, method="inclusive")
        rec["time_ms_p25"], rec["time_ms_p75"] = qs[0], qs[2]
    else:
        rec["time_ms_p25"] = rec["time_ms_p75"] = ms[0]
    rec["time_ms_min"], rec["time_ms_max"] = ms[0], ms[-1]
    with measure_peak(dev) as mem:
        out = step()
    rec["peak_mem_mb"] = mem.bytes / 2**20
    rec["mem_method"] = mem.method
    return rec, out


def _computed(bv: BenchVariant, pt: _Point, scale: float) -> accuracy.Computed | str:
    try:
        return accuracy.computed_entries(bv.name, bv.params, pt.q, pt.k, causal=pt.causal, rows=pt.rows, scale=scale,
                                         cache=pt.mask_rows)  # fmt: skip
    except Exception as e:  # noqa: BLE001 — recorded, the sweep goes on
        return f"computed entries unknown: {type(e).__name__}: {e}"[:500]


def _errors(out: torch.Tensor, bv: BenchVariant, pt: _Point, s: SweepSettings, backend: str, notes: list[str],
            computed: accuracy.Computed | str | None) -> dict[str, Any]:  # fmt: skip
    """Error fields: against exact full attention (whole output and worst head), the fast backend
    against the variant's math one, attention-mass recall of exact patterns, and (real inputs)
    every layer's error and the end-to-end embedding cosine."""
    spec = registry.get(bv.name)
    N, D = pt.shape[2], pt.shape[3]
    scale = spec.resolve_scale(None, D)
    rec: dict[str, Any] = {}
    ref, how = _full_reference(pt, scale, s)
    rec["error_reference"] = how
    if ref is not None:
        rec["rel_error_vs_full"] = float(sla.relative_error(out, ref))
        rec["rel_error_worst_head"] = float(sla.relative_error(out, ref, per_head=True).max())
    else:
        notes.append(how)
    if "math" in spec.impls and backend != "math":
        mref, mhow = _math_reference(pt, bv, s)
        rec["backend_reference"] = mhow
        if mref is not None:
            rec["rel_error_backend"] = float(sla.relative_error(out, mref))
        else:
            notes.append(mhow)
    if spec.exact or accuracy.is_data_dependent(bv.name):
        if s.reference_max_n is not None and N > s.reference_max_n:
            rec["recall_method"] = f"recall skipped: N > reference_max_n={s.reference_max_n}"
        else:
            if computed is None:
                computed = _computed(bv, pt, scale)
            if isinstance(computed, str):
                rec["recall_method"] = computed
            else:
                rec.update(accuracy.recall_of(computed, pt.q, pt.k, causal=pt.causal, rows=pt.rows, scale=scale,
                                              weights=_row_weights(pt, scale, computed)))  # fmt: skip
                rec["recall_rows"] = int(pt.rows.numel())
                rec["recall_method"] = computed.how
    if pt.kind == "real":
        rec.update(_layer_errors(bv, pt, s, backend, scale, out))
        from .real import MAX_POSITIONS, e2e_cosine

        if N > MAX_POSITIONS:
            rec["e2e_note"] = f"end-to-end skipped: the model has {MAX_POSITIONS} positions"
        else:
            try:
                cos, ehow = e2e_cosine(bv.name, bv.params, bv.backend, n=N, batch=s.batch, texts=s.texts)
                rec["e2e_cosine"], rec["e2e_cosine_min"], rec["e2e_note"] = float(cos.mean()), float(cos.min()), ehow
            except Exception as e:  # noqa: BLE001 — recorded, the sweep goes on
                rec["e2e_note"] = f"end-to-end failed: {type(e).__name__}: {e}"[:500]
    return rec


#: Most bytes a point's cached exact row weights may take (else each recall recomputes its rows).
ROW_WEIGHTS_MAX_BYTES = 1 << 30


def _row_weights(pt: _Point, scale: float, computed: accuracy.Computed) -> torch.Tensor | None:
    """The point's exact weights on its sampled rows, made once and shared by every variant's
    recall (each would otherwise redo the float64 scores of those rows), or
    None where they would not fit."""
    if computed.mask is None:
        return None
    if scale not in pt.weights:
        B, H, N, _ = pt.shape
        need = 8 * B * H * int(pt.rows.numel()) * pt.k.shape[2]
        if need > min(ROW_WEIGHTS_MAX_BYTES, available_bytes(pt.device) // 4):
            return None
        pt.weights[scale] = accuracy.row_weights(pt.q, pt.k, causal=pt.causal, rows=pt.rows, scale=scale)
    return pt.weights[scale]


def _layer_errors(bv: BenchVariant, pt: _Point, s: SweepSettings, backend: str, scale: float, out) -> dict[str, Any]:
    """``layer_rel_errors``: the variant against exact attention on every layer's Q/K/V."""
    if len(pt.layers) < 2:
        return {"layer_errors_note": f"per-layer errors skipped: N > layer_errors_max_n={s.layer_errors_max_n}"}
    errors: list[float | None] = []
    for layer in sorted(pt.layers):
        ref, how = _full_reference(pt, scale, s, layer=layer)
        if ref is None:
            return {"layer_errors_note": how}
        if layer == s.real_layer:
            got = out
        else:
            q, k, v = pt.layers[layer]
            with torch.no_grad():
                got = sla.attention(q, k, v, bv.name, causal=pt.causal, backend=backend, **bv.params)
        errors.append(float(sla.relative_error(got, ref)))
    return {"layer_rel_errors": errors, "layer_errors_note": f"layers 0..{len(errors) - 1}, against {how}"}


def _reachable_keys(pt: _Point) -> float:
    return avg_visible_keys("full", {}, pt.n, pt.n, pt.causal)[0]


def _oracle_record(bv: BenchVariant, pt: _Point, s: SweepSettings) -> dict[str, Any]:
    """The oracle selection at ``bv.params["density"]``; every density of the sweep at this
    point comes from one pass (one sort per evaluated row), cached."""
    B, H, N, D = pt.shape
    rec: dict[str, Any] = dict.fromkeys(MEASURED_FIELDS)
    rec.update(status="ok", exact=True, cost="reference (not a runnable variant)", backend="oracle", repeats_done=0)
    if s.reference_max_n is not None and N > s.reference_max_n:
        rec.update(status="skipped", reason=f"oracle skipped: N > reference_max_n={s.reference_max_n}")
        return rec
    densities = tuple(sorted({float(v.params["density"]) for v in s.variants if v.is_oracle}))
    if densities not in pt.oracles:
        scale = 1.0 / D**0.5
        with torch.no_grad():
            pt.oracles[densities] = accuracy.oracle(pt.q, pt.k, pt.v, densities, scale=scale, causal=pt.causal,
                                                    rows=pt.rows)  # fmt: skip
    res = pt.oracles[densities][float(bv.params["density"])]
    rec.update(oracle_flops(res["density"], batch=B, heads=H, nq=N, nk=N, head_dim=D, v_dim=D, causal=pt.causal))
    rec.update(
        density=res["density"],
        compressed_density=0.0,
        rel_error_vs_full=res["rel_error"],
        recall_mean=res["recall_mean"],
        recall_p5=res["recall_p5"],
        recall_rows=int(pt.rows.numel()),
        recall_method="oracle: the entries of largest exact weight, at least one per row",
        error_reference=f"exact attention on the same {int(pt.rows.numel())} rows per head, float64",
        error_note="oracle: error and recall evaluated on evenly spaced rows (an estimate of the whole output's)",
    )
    return rec


def measure(bv: BenchVariant, pt: _Point, s: SweepSettings) -> dict[str, Any]:
    """Every field of one (variant, N) measurement except the identifying ones and env."""
    if bv.is_oracle:
        return _oracle_record(bv, pt, s)
    info = sla.describe(bv.name)
    spec = registry.get(bv.name)
    B, H, N, D = pt.shape
    rec: dict[str, Any] = dict.fromkeys(MEASURED_FIELDS)
    rec.update(status="ok", exact=info.exact, cost=info.cost, repeats_done=0)
    notes: list[str] = list(pt.notes)
    computed: accuracy.Computed | str | None = None
    density = compressed = sel = None
    if accuracy.is_data_dependent(bv.name):
        # What these inputs make the variant compute: its cost and recall are counted from that.
        computed = _computed(bv, pt, spec.resolve_scale(None, D))
        if isinstance(computed, accuracy.Computed):
            density, compressed, sel = computed.density, computed.compressed_density, computed.selection
    flops = count_flops(bv.name, bv.params, batch=B, heads=H, nq=N, nk=N, head_dim=D, v_dim=D, causal=pt.causal,
                        backward=s.backward, selection=sel)  # fmt: skip
    rec.update(flops)
    if density is not None:
        rec.update(density=density, compressed_density=compressed)
    elif spec.exact and spec.module is None and rec["avg_visible_keys"] is not None:
        rec.update(density=rec["avg_visible_keys"] / _reachable_keys(pt), compressed_density=0.0)
    learned = spec.module is not None
    try:
        rec["backend"] = _backend(bv, pt, s)
        rec.update(_predict(bv, rec["backend"], pt, s))
        step = _step(bv, pt, s, rec["backend"])
    except _Unsupported as e:
        rec.update(status=e.status, reason=e.reason)
        return rec
    try:
        timings, out = _timings(step, pt.device, s, notes)
    except Exception as e:  # noqa: BLE001 — recorded, the sweep goes on
        if pt.device.type == "cuda":
            torch.cuda.empty_cache()
        rec.update(status="oom" if is_oom(e) else "error", reason=f"{type(e).__name__}: {e}"[:2000])
        rec["error_note"] = "; ".join(notes) or None
        return rec
    rec.update(timings)
    if rec["flops"]:
        rec["tflops"] = rec["flops"] / (rec["time_ms_median"] / 1e3) / 1e12
    if learned:
        notes.append("learned score function (random init): no exact reference")
    else:
        rec.update(_errors(out, bv, pt, s, rec["backend"], notes, computed))
    rec["error_note"] = "; ".join(notes) or None
    return rec


# ---------------------------------------------------------------------------------------------
# The sweep.


def _ident(bv: BenchVariant, kind: str, causal: bool, n: int, s: SweepSettings, device, shape=None) -> dict[str, Any]:
    B, H, D = (s.batch, s.heads, s.head_dim) if shape is None else (shape[0], shape[1], shape[3])
    return {
        "variant": bv.name,
        "params": bv.params_json(),
        "label": bv.label,
        "sweep": list(bv.sweep),
        "backend_requested": bv.backend,
        "n": n,
        "batch": B,
        "heads": H,
        "head_dim": D,
        "dtype": s.dtype,
        "device": device.type,
        "causal": causal,
        "backward": s.backward,
        "inputs": kind,
        "temperature": s.temperature,
        "seed": s.seed,
        "texts": texts_id(s.texts) if kind == "real" else None,
    }


def planned(s: SweepSettings) -> list[tuple[str, bool, int, BenchVariant]]:
    """Every (input kind, causal mode, N, variant) of the sweep, in the order they run."""
    return [(kind, c, n, bv) for kind in s.input_kinds for c in s.causal_modes for n in s.seq_lens for bv in s.variants]


def run_sweep(
    s: SweepSettings,
    *,
    on_start: Callable[[int, int], None] | None = None,
    on_record: Callable[[dict[str, Any], bool], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every point not yet in ``s.out/results.jsonl``; returns all records of the sweep's
    points (those found on resume and those measured now).

    ``on_start(total, done_before)`` is called once; ``on_record(record, skipped)`` after each point.
    """
    device = s.resolved_device()
    out = prepare_out_dir(s.out)
    path = results_path(out)
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    if device.type == "cpu":
        timing_malloc_thresholds()  # fixed allocator behaviour for the timed calls (see bench.memory)
    if not s.resume and path.exists() and path.stat().st_size > 0:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        moved = path.with_name(f"results.{stamp}.jsonl")
        path.rename(moved)
        print(f"note: an earlier {path} was kept as {moved} (use --resume to continue it)")
    found = read_results(path, repair=True) if s.resume else []
    check_resumable(found, s, path)
    existing = {record_key(r): r for r in found}
    env = environment(device)
    settings = s.recorded()
    plan = planned(s)
    real_shape = None
    if "real" in s.input_kinds:
        from .real import real_shape as _rs

        real_shape = _rs(s.batch)

    def ident(kind, c, n, bv):
        return _ident(bv, kind, c, n, s, device, real_shape if kind == "real" else None)

    if on_start:
        on_start(len(plan), sum(record_key(ident(*p)) in existing for p in plan))
    writer = ResultWriter(path)
    results: list[dict[str, Any]] = []
    point: _Point | None = None
    mask_rows: dict[Any, torch.Tensor] = {}
    point_key = None
    point_failure: dict[str, Any] | None = None
    try:
        for kind, c, n, bv in plan:
            idn = ident(kind, c, n, bv)
            key = record_key(idn)
            if key in existing:
                results.append(existing[key])
                if on_record:
                    on_record(existing[key], True)
                continue
            if point_key != (kind, c, n):
                point, point_key, point_failure = None, (kind, c, n), None  # free the previous inputs first
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                shape = (idn["batch"], idn["heads"], n, idn["head_dim"])
                need, avail = point_bytes(s, kind, n, shape, device), available_bytes(device)
                if need > MEMORY_SAFETY * avail:
                    point_failure = {
                        "status": "oom",
                        "reason": f"predicted: the inputs need ~{_gib(need)}, {_gib(avail)} available; not made",
                    }
                else:
                    try:
                        point = _Point(s, kind, c, n, device, mask_rows)
                    except Exception as e:  # noqa: BLE001
                        point_failure = {
                            "status": "oom" if is_oom(e) else "error",
                            "reason": f"making inputs failed: {type(e).__name__}: {e}"[:2000],
                        }
            if point_failure is not None or point is None:
                fields = point_failure or {"status": "error", "reason": "no inputs"}
                rec = {**idn, **dict.fromkeys(MEASURED_FIELDS), **fields}
            else:
                rec = {**idn, **measure(bv, point, s)}
            rec.update(settings=settings, env=env, timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat())
            writer.write(rec)
            results.append(rec)
            if on_record:
                on_record(rec, False)
    finally:
        writer.close()
    return results
