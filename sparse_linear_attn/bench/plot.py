"""results.jsonl -> results.csv and four PNGs (matplotlib, an optional dependency: extra ``bench``).

* ``time_vs_n.png``   — median time vs N, log-log, with O(N) and O(N²) reference slopes;
* ``memory_vs_n.png`` — peak extra memory of the call vs N, log-log;
* ``error_vs_n.png``  — relative error against exact full attention vs N;
* ``pareto.png``      — error vs time, one point per variant × N (lower-left is better).

One line per series: variant label (name, parameters, requested backend) plus whatever of
dtype/device/causal/inputs/backward varies inside the file.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from .runner import read_results

CSV_FIRST = [
    "label",
    "variant",
    "params",
    "backend_requested",
    "backend",
    "n",
    "status",
    "time_ms_median",
    "time_ms_p25",
    "time_ms_p75",
    "peak_mem_mb",
    "tflops",
    "rel_error_vs_full",
    "rel_error_backend",
    "e2e_cosine",
    "density",
    "compressed_density",
]
SERIES_EXTRA = ("dtype", "device", "causal", "inputs", "backward", "batch", "heads", "head_dim", "temperature")


def flatten(rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in rec.items() if k != "env"}
    for k, v in (rec.get("env") or {}).items():
        out[f"env_{k}"] = v
    return out


def write_csv(records: list[dict[str, Any]], path: str | Path) -> Path:
    rows = [flatten(r) for r in records]
    cols = list(CSV_FIRST)
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
    return path


def series_label(rec: dict[str, Any], varying: tuple[str, ...]) -> str:
    label = rec.get("label") or rec["variant"]
    extra = [f"{k}={rec.get(k)}" for k in varying]
    return label + (f" [{', '.join(extra)}]" if extra else "")


def _series(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    varying = tuple(k for k in SERIES_EXTRA if len({json.dumps(r.get(k)) for r in records}) > 1)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[series_label(r, varying)].append(r)
    for g in groups.values():
        g.sort(key=lambda r: r["n"])
    return dict(sorted(groups.items()))


def _points(recs, field):
    pts = [(r["n"], r.get(field)) for r in recs if r.get("status") == "ok" and r.get(field) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _subtitle(records) -> str:
    r = records[0]
    env = r.get("env") or {}
    return (
        f"{env.get('device_name', r.get('device'))} · {r.get('dtype')} · B={r.get('batch')} "
        f"H={r.get('heads')} D={r.get('head_dim')} · causal={r.get('causal')} · inputs={r.get('inputs')}"
        f"{' · fwd+bwd' if r.get('backward') else ' · forward'} · torch {env.get('torch')}"
    )


def plot_results(results: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write results.csv and the PNGs next to ``results`` (or into ``out_dir``); returns the paths."""
    results = Path(results)
    if results.is_dir():
        results = results / "results.jsonl"
    if not results.is_file():
        raise FileNotFoundError(f"no results file at {results} (give a results.jsonl or the folder holding one)")
    records = read_results(results)
    if not records:
        raise ValueError(f"{results} holds no records")
    out = Path(out_dir) if out_dir is not None else results.parent
    out.mkdir(parents=True, exist_ok=True)
    written = [write_csv(records, out / "results.csv")]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install -e .[bench]); wrote results.csv only")
        return written
    groups = _series(records)
    allx = sorted({r["n"] for r in records})
    sub = _subtitle(records)
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    colors = {name: cmap(i % cmap.N) for i, name in enumerate(groups)}

    def figure(title, ylabel, logy=True):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n{sub}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(allx, [_short_n(x) for x in allx])
        return fig, ax

    def finish(fig, ax, name):
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no successful measurements", ha="center", transform=ax.transAxes)
        fig.tight_layout()
        p = out / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    # Time vs N with reference slopes anchored at the first measured point.
    fig, ax = figure("median time vs N (whiskers: interquartile range)", "time [ms]")
    firsts: list[tuple[int, float]] = []
    for name, recs in groups.items():
        ok = [r for r in recs if r.get("status") == "ok" and r.get("time_ms_median")]
        if not ok:
            continue
        xs = [r["n"] for r in ok]
        ys = [r["time_ms_median"] for r in ok]
        lo = [max(0.0, y - (r.get("time_ms_p25") or y)) for y, r in zip(ys, ok)]
        hi = [max(0.0, (r.get("time_ms_p75") or y) - y) for y, r in zip(ys, ok)]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=4, capsize=2, label=name, color=colors[name])
        firsts.append((xs[0], ys[0]))
    allx = sorted({r["n"] for r in records})
    if firsts and len(allx) > 1:
        # Anchor the slopes at the geometric mean of the series' times at the smallest N.
        n0 = min(x for x, _ in firsts)
        at = [t for x, t in firsts if x == n0]
        t0 = math.exp(sum(math.log(t) for t in at) / len(at))
        ax.plot(allx, [t0 * (x / n0) for x in allx], "k--", lw=1, alpha=0.5, label="O(N) reference")
        ax.plot(allx, [t0 * (x / n0) ** 2 for x in allx], "k:", lw=1, alpha=0.6, label="O(N²) reference")
    finish(fig, ax, "time_vs_n.png")

    fig, ax = figure("peak extra memory of one call vs N (incl. output)", "peak memory [MiB]")
    for name, recs in groups.items():
        xs, ys = _points(recs, "peak_mem_mb")
        pos = [(x, y) for x, y in zip(xs, ys) if y > 0]
        if pos:
            ax.plot(*zip(*pos), marker="o", ms=4, label=name, color=colors[name])
    finish(fig, ax, "memory_vs_n.png")

    fig, ax = figure("relative error ‖out − exact‖/‖exact‖ vs N (exact: full attention, fp32)", "relative error")
    floor = 1e-9
    for name, recs in groups.items():
        xs, ys = _points(recs, "rel_error_vs_full")
        if xs:
            ax.plot(xs, [max(y, floor) for y in ys], marker="o", ms=4, label=name, color=colors[name])
    finish(fig, ax, "error_vs_n.png")

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("median time [ms]")
    ax.set_ylabel("relative error vs exact (floored at 1e-9)")
    ax.set_title(f"error vs time: one point per variant × N (label: N); lower-left is better\n{sub}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    for name, recs in groups.items():
        ok = [
            r
            for r in recs
            if r.get("status") == "ok" and r.get("time_ms_median") and r.get("rel_error_vs_full") is not None
        ]
        if not ok:
            continue
        xs = [r["time_ms_median"] for r in ok]
        ys = [max(r["rel_error_vs_full"], floor) for r in ok]
        sizes = [12 + 10 * math.log2(max(1, r["n"]) / max(1, ok[0]["n"]) + 1) for r in ok]
        ax.scatter(xs, ys, s=sizes, label=name, color=colors[name], alpha=0.8)
        for x, y, r in zip(xs, ys, ok):
            ax.annotate(_short_n(r["n"]), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(
        [
            (r["time_ms_median"], max(r["rel_error_vs_full"], floor))
            for r in records
            if r.get("status") == "ok" and r.get("time_ms_median") and r.get("rel_error_vs_full") is not None
        ]
    )
    if len(front) > 1:
        ax.step(*zip(*front), where="post", color="k", lw=0.8, alpha=0.5, label="Pareto front")
    finish(fig, ax, "pareto.png")
    return written


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (time, error) points no other point beats on both, sorted by time."""
    front: list[tuple[float, float]] = []
    for t, e in sorted(points):
        if not front or e < front[-1][1]:
            front.append((t, e))
    return front


def _short_n(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
