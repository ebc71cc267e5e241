"""The sweep: for every sequence length and variant spec, time, memory, FLOPs and error.

Each measurement becomes one JSON record appended to ``DIR/results.jsonl`` (flushed and fsynced
as soon as it is finished, so a crash loses at most the measurement in flight). A failure of
one point — out of memory, a backend that cannot run the call, an exception — is recorded with
its status and the sweep goes on. ``resume=True`` skips every key already in the file.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import sparse_linear_attn as sla

from .. import registry
from ..backends.dispatch import prepare, select_backend
from ..errors import BackendUnavailableError
from .flops import count_flops
from .inputs import INPUT_KINDS, make_inputs
from .memory import measure_peak, timing_malloc_thresholds
from .spec import BenchVariant

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
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
)
RESULTS = "results.jsonl"


@dataclass
class SweepSettings:
    variants: list[BenchVariant]
    seq_lens: list[int]
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "auto"
    causal: bool = False
    backward: bool = False
    inputs: str = "local"
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
    #: torch intra-op threads (None: torch's default). On a CPU shared with other jobs, one
    #: thread avoids waiting on a descheduled worker at every parallel op.
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not accepted; accepted: {', '.join(DTYPES)}")
        if self.inputs not in INPUT_KINDS:
            raise ValueError(f"inputs {self.inputs!r} not accepted; accepted: {', '.join(INPUT_KINDS)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device!r} not accepted; accepted: auto, cpu, cuda")
        for name in ("batch", "heads", "head_dim", "repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not self.variants:
            raise ValueError("no variants to benchmark")
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise ValueError(f"threads must be an int >= 1 or None, got {self.threads!r}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
        return dev


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


def read_results(path: str | os.PathLike, *, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a results.jsonl; a torn last line (a crash mid-write) is dropped (and cut off
    the file with ``repair=True`` so appending continues on a clean line)."""
    p = Path(path)
    if not p.exists():
        return []
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
            out.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"warning: {p}:{i} is not a JSON record; skipped")
    return out


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


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return 8 << 30


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


class _Point:
    """Inputs and cached references for one sequence length (shared by every variant)."""

    def __init__(self, s: SweepSettings, n: int, device: torch.device):
        self.n = n
        self.device = device
        self.dtype = DTYPES[s.dtype]
        self.notes: list[str] = []
        if s.inputs == "real":
            from .real import real_qkv

            q, k, v, note = real_qkv(n, layer=s.real_layer, batch=s.batch)
            self.notes.append(note)
        else:
            q, k, v = make_inputs(
                s.inputs, s.batch, s.heads, n, s.head_dim, temperature=s.temperature, causal=s.causal, seed=s.seed
            )
        # Inputs are rounded to the run dtype once; references use these same values upcast.
        self.q, self.k, self.v = (t.to(device=device, dtype=self.dtype) for t in (q, k, v))
        self.refs: dict[Any, tuple[torch.Tensor | None, str]] = {}

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]


def _full_reference(pt: _Point, causal: bool, scale: float, s: SweepSettings) -> tuple[torch.Tensor | None, str]:
    """Exact attention through SDPA's fused path (O(N) memory), cached per point: float64 on
    the CPU, float32 on CUDA (where float64 SDPA would fall back to an O(N²) path)."""
    key = ("full", causal, scale)
    if key not in pt.refs and s.reference_max_n is not None and pt.n > s.reference_max_n:
        pt.refs[key] = (None, f"exact reference skipped: N > reference_max_n={s.reference_max_n}")
    if key not in pt.refs:
        B, H, N, D = pt.shape
        rdtype = torch.float32 if pt.device.type == "cuda" else torch.float64
        size = 4 if rdtype == torch.float32 else 8
        need = 6 * B * H * N * D * size
        avail = _available_bytes(pt.device)
        if need > avail // 2:
            pt.refs[key] = (None, f"exact reference skipped: needs ~{_gib(need)}, {_gib(avail)} available")
        else:
            try:
                with torch.no_grad():
                    q, k, v = (t.to(rdtype) for t in (pt.q, pt.k, pt.v))
                    out = sla.attention(q, k, v, "full", causal=causal, scale=scale, backend="torch")
                pt.refs[key] = (out, f"full attention, {str(rdtype).replace('torch.', '')}, SDPA (torch backend)")
            except Exception as e:  # noqa: BLE001 — recorded, the sweep goes on
                pt.refs[key] = (None, f"exact reference failed: {type(e).__name__}: {e}")
    return pt.refs[key]


def _math_reference(pt: _Point, bv: BenchVariant, causal: bool, s: SweepSettings) -> tuple[torch.Tensor | None, str]:
    """The variant's own ``math`` backend (dense, O(N²) memory) in float64 where it fits, else float32."""
    key = ("math", bv.name, bv.params_json(), causal)
    if key not in pt.refs and s.reference_max_n is not None and pt.n > s.reference_max_n:
        pt.refs[key] = (None, f"math reference skipped: N > reference_max_n={s.reference_max_n}")
    if key not in pt.refs:
        B, H, N, _ = pt.shape
        entries = B * H * N * N
        budget = min(s.max_reference_bytes, _available_bytes(pt.device) // 2)
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
                    out = sla.attention(q, k, v, bv.name, causal=causal, backend="math", **bv.params)
                pt.refs[key] = (out, f"{bv.name} math backend, {str(dtype).replace('torch.', '')}")
            except Exception as e:  # noqa: BLE001
                pt.refs[key] = (None, f"math reference failed: {type(e).__name__}: {e}")
    return pt.refs[key]


#: Fields of a measurement besides the identifying ones (``KEY_FIELDS``), ``env`` and ``timestamp``.
MEASURED_FIELDS = (
    "status", "reason", "backend", "exact", "cost", "repeats_done", "first_call_ms", "time_ms_median",
    "time_ms_p25", "time_ms_p75", "time_ms_min", "time_ms_max", "peak_mem_mb", "mem_method", "avg_visible_keys",
    "flops", "flops_method", "tflops", "rel_error_vs_full", "error_reference", "rel_error_backend",
    "backend_reference", "error_note", "e2e_cosine", "e2e_cosine_min", "e2e_note", "density", "compressed_density",
)  # fmt: skip


class _Unsupported(Exception):
    """This point cannot run (the variant or backend cannot take the call): recorded, not raised."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _step(bv: BenchVariant, pt: _Point, s: SweepSettings) -> tuple[Callable[[], torch.Tensor], str, bool]:
    """``(step, backend, learned)``: one timed call (forward, or forward + backward), the backend
    it runs on, and whether the variant has learned parameters. Raises :class:`_Unsupported`."""
    spec = registry.get(bv.name)
    B, H, N, D = pt.shape
    leaves = [t.detach().clone().requires_grad_(s.backward) for t in (pt.q, pt.k, pt.v)]
    q, k, v = leaves
    try:
        if spec.module is not None:
            cfg = {"variant": bv.name, "causal": s.causal, **bv.params}
            if "head_dim" in spec.params and "head_dim" not in bv.params:
                cfg["head_dim"] = D
            torch.manual_seed(s.seed)
            module = sla.build(cfg).to(device=pt.device, dtype=pt.dtype)
            backend = "module"

            def forward() -> torch.Tensor:
                return module(q, k, v)
        else:
            with torch.set_grad_enabled(s.backward):
                p = prepare(spec, q, k, v, params=spec.resolve_params(bv.params), causal=s.causal, backend=bv.backend)
            backend = select_backend(p.spec, p.call, p.params, p.backend)

            def forward() -> torch.Tensor:
                return sla.attention(q, k, v, bv.name, causal=s.causal, backend=backend, **bv.params)
    except (BackendUnavailableError, ValueError) as e:
        raise _Unsupported("unsupported", str(e)) from None
    if backend == "math" and pt.device.type == "cpu":
        need, avail = 3 * B * H * N * N * 4, _available_bytes(pt.device)
        if need > avail:
            # On CPU the kernel's OOM killer would end the process instead of raising.
            raise _Unsupported(
                "oom", f"predicted: the math backend needs ~{_gib(need)}, {_gib(avail)} available; not run"
            )

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

    return step, backend, spec.module is not None


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


def _errors(out: torch.Tensor, bv: BenchVariant, pt: _Point, s: SweepSettings, backend: str, notes: list[str]):
    """Error fields: against exact full attention, the fast backend against the variant's math
    one, and (real inputs) the end-to-end embedding cosine."""
    spec = registry.get(bv.name)
    N, D = pt.shape[2], pt.shape[3]
    rec: dict[str, Any] = {}
    ref, how = _full_reference(pt, s.causal, spec.resolve_scale(None, D), s)
    rec["error_reference"] = how
    if ref is not None:
        rec["rel_error_vs_full"] = float(sla.relative_error(out, ref))
    else:
        notes.append(how)
    if "math" in spec.impls and backend != "math":
        mref, mhow = _math_reference(pt, bv, s.causal, s)
        rec["backend_reference"] = mhow
        if mref is not None:
            rec["rel_error_backend"] = float(sla.relative_error(out, mref))
        else:
            notes.append(mhow)
    if s.inputs == "real":
        from .real import MAX_POSITIONS, e2e_cosine

        if N > MAX_POSITIONS:
            rec["e2e_note"] = f"end-to-end skipped: the model has {MAX_POSITIONS} positions"
        else:
            try:
                cos, how = e2e_cosine(bv.name, bv.params, bv.backend, n=N, batch=s.batch)
                rec["e2e_cosine"], rec["e2e_cosine_min"], rec["e2e_note"] = float(cos.mean()), float(cos.min()), how
            except Exception as e:  # noqa: BLE001 — recorded, the sweep goes on
                rec["e2e_note"] = f"end-to-end failed: {type(e).__name__}: {e}"[:500]
    return rec


def measure(bv: BenchVariant, pt: _Point, s: SweepSettings) -> dict[str, Any]:
    """Every field of one (variant, N) measurement except the identifying ones and env."""
    info = sla.describe(bv.name)
    B, H, N, D = pt.shape
    rec: dict[str, Any] = dict.fromkeys(MEASURED_FIELDS)
    rec.update(status="ok", exact=info.exact, cost=info.cost, repeats_done=0)
    sel = None
    if registry.get(bv.name).data_dependent:
        # What these inputs make the variant compute: its cost is counted from that.
        sel = sla.selection(pt.q, pt.k, bv.name, causal=s.causal, **bv.params)
        rec.update(density=sel.density, compressed_density=sel.compressed_density)
    flops = count_flops(bv.name, bv.params, batch=B, heads=H, nq=N, nk=N, head_dim=D, v_dim=D, causal=s.causal,
                        backward=s.backward, selection=sel)  # fmt: skip
    rec.update(flops)
    notes: list[str] = list(pt.notes)
    try:
        step, rec["backend"], learned = _step(bv, pt, s)
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
        rec.update(_errors(out, bv, pt, s, rec["backend"], notes))
    rec["error_note"] = "; ".join(notes) or None
    return rec


# ---------------------------------------------------------------------------------------------
# The sweep.


def _ident(bv: BenchVariant, n: int, s: SweepSettings, device: torch.device, shape=None) -> dict[str, Any]:
    B, H, D = (s.batch, s.heads, s.head_dim) if shape is None else (shape[0], shape[1], shape[3])
    return {
        "variant": bv.name,
        "params": bv.params_json(),
        "label": bv.label,
        "backend_requested": bv.backend,
        "n": n,
        "batch": B,
        "heads": H,
        "head_dim": D,
        "dtype": s.dtype,
        "device": device.type,
        "causal": s.causal,
        "backward": s.backward,
        "inputs": s.inputs,
        "temperature": s.temperature,
        "seed": s.seed,
    }


def planned(s: SweepSettings) -> list[tuple[int, BenchVariant]]:
    return [(n, bv) for n in s.seq_lens for bv in s.variants]


def run_sweep(
    s: SweepSettings,
    *,
    on_start: Callable[[int, int], None] | None = None,
    on_record: Callable[[dict[str, Any], bool], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every (N, variant) point not yet in ``s.out/results.jsonl``; returns all records of the
    sweep's points (those found on resume and those measured now).

    ``on_start(total, done_before)`` is called once; ``on_record(record, skipped)`` after each point.
    """
    device = s.resolved_device()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    if device.type == "cpu":
        timing_malloc_thresholds()  # fixed allocator behaviour for the timed calls (see bench.memory)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    if not s.resume and path.exists() and path.stat().st_size > 0:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        moved = path.with_name(f"results.{stamp}.jsonl")
        path.rename(moved)
        print(f"note: an earlier {path} was kept as {moved} (use --resume to continue it)")
    existing = {record_key(r): r for r in read_results(path, repair=True)} if s.resume else {}
    env = environment(device)
    plan = planned(s)
    real_shape = None
    if s.inputs == "real":
        from .real import real_shape as _rs

        real_shape = _rs(s.batch)
    if on_start:
        on_start(len(plan), sum(record_key(_ident(bv, n, s, device, real_shape)) in existing for n, bv in plan))
    writer = ResultWriter(path)
    results: list[dict[str, Any]] = []
    point: _Point | None = None
    try:
        for n, bv in plan:
            ident = _ident(bv, n, s, device, real_shape)
            key = record_key(ident)
            if key in existing:
                results.append(existing[key])
                if on_record:
                    on_record(existing[key], True)
                continue
            if point is None or point.n != n:
                point = None  # free the previous length's inputs and references first
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                try:
                    point = _Point(s, n, device)
                except Exception as e:  # noqa: BLE001
                    rec = {
                        **ident,
                        "status": "oom" if is_oom(e) else "error",
                        "reason": f"making inputs failed: {type(e).__name__}: {e}"[:2000],
                    }
                    rec.update(env=env, timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat())
                    writer.write(rec)
                    results.append(rec)
                    if on_record:
                        on_record(rec, False)
                    continue
            rec = {
                **ident,
                **measure(bv, point, s),
                "env": env,
                "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            }
            writer.write(rec)
            results.append(rec)
            if on_record:
                on_record(rec, False)
    finally:
        writer.close()
    return results
