"""results.jsonl -> results.csv and PNGs (matplotlib, an optional dependency: extra ``bench``).

* ``time_vs_n.png``   — median time vs N, log-log, with O(N) and O(N²) reference slopes;
* ``memory_vs_n.png`` — peak extra memory of the call vs N, log-log;
* ``error_vs_n.png``  — relative error against exact full attention vs N;
* ``frontier_<x>[_<group>].png`` — the accuracy-versus-cost frontier: one panel per N, error
  against cost, one line per family ordered by its knob, ``full`` and the ``oracle`` selection
  as references (:func:`plot_frontier`; also ``sla-bench frontier``).

One series per variant label (name, parameters, requested backend) plus whatever of
dtype/device/causal/inputs/backward varies inside the file.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from .runner import prepare_out_dir, read_results
from .spec import ORACLE

CSV_FIRST = [
    "label",
    "variant",
    "params",
    "inputs",
    "causal",
    "backend_requested",
    "backend",
    "n",
    "status",
    "time_ms_median",
    "time_ms_p25",
    "time_ms_p75",
    "peak_mem_mb",
    "tflops",
    "flops",
    "density",
    "compressed_density",
    "rel_error_vs_full",
    "rel_error_worst_head",
    "recall_mean",
    "recall_p5",
    "rel_error_backend",
    "e2e_cosine",
    "density",
    "compressed_density",
]
SERIES_EXTRA = ("dtype", "device", "causal", "inputs", "backward", "batch", "heads", "head_dim", "temperature", "texts")


def flatten(rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in rec.items() if k != "env"}
    for k, v in (rec.get("env") or {}).items():
        out[f"env_{k}"] = v
    return out


def write_csv(records: list[dict[str, Any]], path: str | Path) -> Path:
    rows = [flatten(r) for r in records]
    cols = list(dict.fromkeys(CSV_FIRST))
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
    records = load_records(results)
    folder = Path(results) if Path(results).is_dir() else Path(results).parent
    out = prepare_out_dir(out_dir if out_dir is not None else folder)
    written = [write_csv(records, out / "results.csv")]
    measured = [r for r in records if r.get("variant") != ORACLE]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install -e .[bench]); wrote results.csv only")
        return written
    groups = _series(measured or records)
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

    written += plot_frontier(records, out, x="time")
    if any(r.get("density") is not None for r in records):
        written += plot_frontier(records, out, x="density")
    if any(r.get("e2e_cosine") is not None for r in records):
        written += plot_frontier(records, out, x="time", y="cosine")
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


def load_records(results: str | Path) -> list[dict[str, Any]]:
    """The records of a results.jsonl (or of the folder holding one), with clear errors."""
    path = Path(results)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no results file at {path} (give a results.jsonl or the folder holding one)")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a results file")
    records = read_results(path)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


# ---------------------------------------------------------------------------------------------
# The frontier: error against cost at each N, one line per family ordered by its knob.

#: x-axes of the frontier: record field(s) and label.
FRONTIER_X = {
    "time": ("median time per call [ms]", lambda r: r.get("time_ms_median")),
    "flops": ("FLOPs per call (counted on computed entries)", lambda r: r.get("flops")),
    "density": (
        "computed-entry fraction (density + compressed density)",
        lambda r: None if r.get("density") is None else r["density"] + (r.get("compressed_density") or 0.0),
    ),
}
#: y-axes of the frontier.
FRONTIER_Y = {
    "error": ("relative error ‖out − exact‖/‖exact‖", lambda r: r.get("rel_error_vs_full")),
    "cosine": (
        "1 − end-to-end embedding cosine (all-MiniLM-L6-v2)",
        lambda r: None if r.get("e2e_cosine") is None else 1.0 - r["e2e_cosine"],
    ),
}
#: Values below this are drawn at it (log axes; full attention's error is rounding, ~1e-7).
Y_FLOOR = 1e-7
#: What separates one frontier figure from another (one figure per combination present).
FIGURE_KEYS = ("inputs", "causal", "dtype", "device", "backward", "batch", "heads", "head_dim", "temperature", "texts")


def _params(r: dict[str, Any]) -> dict[str, Any]:
    p = r.get("params")
    if isinstance(p, str):
        try:
            p = json.loads(p)
        except json.JSONDecodeError:
            return {"params": p}
    return p if isinstance(p, dict) else {}


def _label(variant: str, params: dict[str, Any], backend: str | None) -> str:
    items = [f"{k}={v}" for k, v in sorted(params.items())]
    if backend and backend != "auto":
        items.append(f"backend={backend}")
    return variant + (":" + ",".join(items) if items else "")


def frontier_lines(records: list[dict[str, Any]]) -> dict[str, tuple[str | None, list[dict[str, Any]]]]:
    """``{line label: (knob, records)}``: the records of one figure grouped into families.

    A family is one variant and requested backend with the same parameters except its knob: the
    first parameter a list in the spec swept (the record's ``sweep``), or, for files without
    that, the one parameter whose value varies among the variant's records (with several, the
    one with most values; the others split the family into lines). Records are ordered by the
    knob's value. ``oracle`` records form their own line.
    """
    by_variant: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_variant[(r["variant"], r.get("backend_requested") or "auto")].append(r)
    lines: dict[str, tuple[str | None, list[dict[str, Any]]]] = {}
    for (variant, backend), recs in by_variant.items():
        inferred = None
        if not any(r.get("sweep") for r in recs):  # a file without sweep information
            names = {k for r in recs for k in _params(r)}
            values = {k: {json.dumps(_params(r).get(k), sort_keys=True) for r in recs} for k in names}
            varying = sorted((k for k in names if len(values[k]) > 1), key=lambda k: (-len(values[k]), k))
            inferred = varying[0] if varying else None
        groups: dict[tuple[str, str | None], list[dict[str, Any]]] = defaultdict(list)
        for r in recs:
            knob = r["sweep"][0] if r.get("sweep") else inferred
            fixed = {k: v for k, v in _params(r).items() if k != knob}
            groups[(_label(variant, fixed, backend), knob)].append(r)
        for (label, knob), members in groups.items():

            def order(r, knob=knob):
                v = _params(r).get(knob) if knob else None
                return (0, v, "") if isinstance(v, (int, float)) else (1, 0, json.dumps(v, default=str))

            name = label if knob is None else f"{label} ({knob})"
            lines[name] = (knob, sorted(members, key=order))
    return dict(sorted(lines.items()))


def _figure_groups(records: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """``(name suffix, records)`` per combination of the FIGURE_KEYS that vary in the file. A key
    whose value the earlier ones determine (real inputs' heads and head_dim) splits nothing and
    stays out of the name."""

    def value(r, k):
        return json.dumps(r.get(k), default=str)

    varying: list[str] = []
    for k in FIGURE_KEYS:
        if len({value(r, k) for r in records}) < 2:
            continue
        seen: dict[tuple[str, ...], set[str]] = defaultdict(set)
        for r in records:
            seen[tuple(value(r, j) for j in varying)].add(value(r, k))
        if not varying or any(len(v) > 1 for v in seen.values()):
            varying.append(k)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        parts = []
        for k in varying:
            v = r.get(k)
            if k == "inputs":
                parts.append(str(v))
            elif k == "causal":
                parts.append("causal" if v else "bidirectional")
            else:
                parts.append(f"{k}={v}")
        groups["_".join(parts)].append(r)
    return sorted(groups.items())


def _short_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _draw_panel(ax, n, lines, role, colors, xget, yget, handles, missing) -> None:
    """One N: each family's line (knob values written at its points), the oracle dashed, full as a
    star — drawn on the panel's lower edge, with its value, when its error is far below the rest
    (rounding, ~1e-7), so that it does not squeeze the approximations into the top of the panel."""
    drawn = []
    for name, (knob, members) in lines.items():
        pts = [(xget(r), yget(r), r) for r in members if r["n"] == n]
        if not pts:
            continue
        ok = [(a, max(b, Y_FLOOR), r) for a, b, r in pts if a is not None and b is not None and a > 0]
        if not ok:
            missing.add(name)
            continue
        drawn.append((name, knob, ok))
    rest = [b for name, _, ok in drawn if role[name] != "full" for _, b, _ in ok]
    low = min(rest) / 3 if rest else None
    front = []
    for name, knob, ok in drawn:
        xs, ys = [a for a, _, _ in ok], [b for _, b, _ in ok]
        if role[name] == ORACLE:
            (h,) = ax.plot(xs, ys, "k--", lw=1.2, marker=".", ms=5, alpha=0.8)
            handles.setdefault("oracle: the entries of largest exact weight (most mass for the count)", h)
        elif role[name] == "full":
            shown = [max(y, low) if low is not None else y for y in ys]
            h = ax.scatter(xs, shown, marker="*", s=110, color="k", zorder=5, clip_on=False)
            handles.setdefault(name + " — exact (reference)", h)
            for a, y, y0 in zip(xs, shown, ys):
                if y0 < y:
                    ax.annotate(f"{y0:.0e}", (a, y), fontsize=6, xytext=(4, 3), textcoords="offset points")
            front += list(zip(xs, shown))
        else:
            (h,) = ax.plot(xs, ys, marker="o", ms=4, lw=1.3, color=colors[name])
            handles.setdefault(name, h)
            front += list(zip(xs, ys))
        if knob and role[name] != "full":
            for a, b, r in ok:
                ax.annotate(_short_value(_params(r).get(knob)), (a, b), fontsize=6, xytext=(3, 2),
                            textcoords="offset points", color="0.25")  # fmt: skip
    if low is not None:
        ax.set_ylim(bottom=low)
    from matplotlib.ticker import NullFormatter

    for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        if lo > 0 and hi / lo >= 10:  # a decade or more: the minor tick labels would collide
            axis.set_minor_formatter(NullFormatter())
        else:
            axis.set_tick_params(which="minor", labelsize=6)
    pf = pareto_front(front)
    if len(pf) > 1:
        ax.step(*zip(*pf), where="post", color="0.6", lw=4, alpha=0.25, zorder=0)


def plot_frontier(
    records: list[dict[str, Any]] | str | Path,
    out_dir: str | Path,
    *,
    x: str = "time",
    y: str = "error",
) -> list[Path]:
    """Draw ``frontier_<x>[_<y>][_<group>].png`` into ``out_dir``: for each combination of
    input kind, causal mode, dtype, device (… whatever varies in the file), one panel per N with
    ``y`` against ``x``, one line per family ordered by its knob (the knob's values written at
    the points), ``full`` as a star and the ``oracle`` selection as a dashed line (on the FLOP
    and density axes; it has no time). Families without an ``x`` value (no computed entries on
    the density axis, or failed points) are listed under the figure. Returns the paths written."""
    if x not in FRONTIER_X:
        raise ValueError(f"unknown frontier x-axis {x!r}; accepted: {', '.join(FRONTIER_X)}")
    if y not in FRONTIER_Y:
        raise ValueError(f"unknown frontier y-axis {y!r}; accepted: {', '.join(FRONTIER_Y)}")
    if not isinstance(records, list):
        records = load_records(records)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = prepare_out_dir(out_dir)
    xlabel, xget = FRONTIER_X[x]
    ylabel, yget = FRONTIER_Y[y]
    written: list[Path] = []
    for suffix, recs in _figure_groups(records):
        usable = [r for r in recs if r.get("status") == "ok" and xget(r) is not None and yget(r) is not None]
        ns = sorted({r["n"] for r in recs})
        if not usable:
            continue
        lines = frontier_lines([r for r in recs if r.get("status") == "ok"])
        role = {name: members[0]["variant"] if members[0]["variant"] in (ORACLE, "full") else "family"
                for name, (_, members) in lines.items()}  # fmt: skip
        families = [name for name in lines if role[name] == "family"]
        cmap = plt.get_cmap("tab10" if len(families) <= 10 else "tab20")
        colors = {name: cmap(i % cmap.N) for i, name in enumerate(families)}
        ncols = 2 if len(ns) == 4 else min(3, len(ns))
        nrows = math.ceil(len(ns) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.3 * nrows + 1.6), squeeze=False)
        missing: set[str] = set()
        handles: dict[str, Any] = {}
        for ax, n in zip(axes.flat, ns):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.25)
            ax.set_title(f"N = {n:,}" + (f" ({_short_n(n)})" if _short_n(n) != str(n) else ""), fontsize=10)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            _draw_panel(ax, n, lines, role, colors, xget, yget, handles, missing)
        for ax in list(axes.flat)[len(ns) :]:
            ax.axis("off")
        r0 = recs[0]
        env = r0.get("env") or {}
        kinds = f"{r0.get('inputs')}" + (f" ({r0.get('texts')})" if r0.get("texts") else "")
        fig.suptitle(
            f"{ylabel.split(' ‖')[0]} vs {xlabel.split(' (')[0].split(' [')[0]} at each N — inputs={kinds}, "
            f"{r0.get('dtype')}, {'causal' if r0.get('causal') else 'bidirectional'}, "
            f"{'fwd+bwd' if r0.get('backward') else 'forward'}\n"
            f"{r0.get('device')}: {env.get('device_name', '?')} · B={r0.get('batch')} H={r0.get('heads')} "
            f"D={r0.get('head_dim')} · torch {env.get('torch', '?')} · lower-left is better; grey band: the "
            "best trade-off measured; small numbers: the knob's value",
            fontsize=9,
        )
        notes = []
        missing -= {name for name in missing if role.get(name) == ORACLE}
        if missing:
            notes.append(f"not on this axis ({x}): " + ", ".join(sorted(missing)))
        if x == "time" and ORACLE in role.values():
            notes.append("the oracle has no time: see the FLOP and density axes")
        fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", fontsize=7,
                   ncol=2 if len(handles) > 6 else 1, frameon=False)  # fmt: skip
        if notes:
            fig.text(0.01, 0.005, "; ".join(notes), fontsize=6.5, color="0.35")
        legend_rows = math.ceil(len(handles) / (2 if len(handles) > 6 else 1))
        fig.tight_layout(rect=(0, min(0.45, 0.035 + 0.028 * legend_rows * 4.3 / fig.get_figheight()), 1, 1))
        name = f"frontier_{x}" + (f"_{y}" if y != "error" else "") + (f"_{suffix}" if suffix else "") + ".png"
        path = out / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
