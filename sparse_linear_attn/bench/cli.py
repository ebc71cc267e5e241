"""Command line of ``sla-bench`` (also ``python -m sparse_linear_attn.bench``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .spec import BenchVariant, load_study, make_variant, parse_seq_lens, parse_variant_spec, variant_from_entry

#: Variants of a bare ``sla-bench run``, each included when registered; the parameters are
#: applied only where the variant takes them.
DEFAULT_CANDIDATES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("full", {}),
    ("sliding_window", {"window": 256}),
    ("block_sparse", {}),
    ("linear", {}),
    ("performer", {"num_features": 256}),
)
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
    threads=None,
)


def default_variants() -> list[BenchVariant]:
    import sparse_linear_attn as sla

    have = set(sla.available_variants())
    out = []
    for name, params in DEFAULT_CANDIDATES:
        if name in have:
            accepted = sla.describe(name).params
            out.append(make_variant(name, {k: v for k, v in params.items() if k in accepted}))
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sla-bench",
        description="Accuracy-versus-cost benchmarks of sparse_linear_attn variants across sequence lengths.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="run a sweep; writes OUT/results.jsonl, results.csv and PNGs",
        description="Run a sweep. Options given here override those of --config.",
    )
    r.add_argument("--config", help="study file (.yaml/.yml/.json/.toml) with these options and 'variants'")
    r.add_argument(
        "--variants",
        nargs="+",
        metavar="SPEC",
        help="variant specs name[:key=value,...], e.g. full sliding_window:window=256 "
        "performer:num_features=256 full:backend=math (default: full plus whichever of "
        "sliding_window, block_sparse, linear, performer are registered)",
    )
    r.add_argument("--seq-lens", help=f"comma list, suffixes k/m allowed (default {DEFAULTS['seq_lens']})")
    r.add_argument("--batch", type=int)
    r.add_argument("--heads", type=int)
    r.add_argument("--head-dim", type=int)
    r.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"])
    r.add_argument("--device", help="auto (CUDA when present), cpu or cuda")
    r.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None, help="causal masking (default off)")
    r.add_argument(
        "--backward",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time forward+backward instead of forward",
    )
    r.add_argument(
        "--inputs",
        choices=["random", "local", "peaked", "real"],
        help="input kind (default local: attention mass decays with distance, as in language models)",
    )
    r.add_argument("--temperature", type=float, help="multiplies q (logit scale) for synthetic inputs")
    r.add_argument("--repeats", type=int, help="timed repeats after warm-up (default 5)")
    r.add_argument("--warmup", type=int, help="untimed calls after the first (default 1)")
    r.add_argument("--seed", type=int)
    r.add_argument("--out", help=f"output folder (default {DEFAULTS['out']})")
    r.add_argument("--resume", action="store_true", default=None, help="skip points already in OUT/results.jsonl")
    r.add_argument(
        "--plot",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw the PNGs at the end (--no-plot: don't)",
    )
    r.add_argument(
        "--max-time-per-point", type=float, help="seconds the timed repeats of one point may take (default 5)"
    )
    r.add_argument(
        "--reference-max-n",
        type=int,
        help="longest N at which exact references (errors) are computed (default: no limit)",
    )
    r.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's). On a shared CPU, 1 gives steadier times"
    )
    r.add_argument("--real-layer", type=int, help="layer whose Q/K/V --inputs real captures (default 3)")

    p = sub.add_parser("plot", help="draw PNGs and results.csv from a results.jsonl")
    p.add_argument("results", help="results.jsonl (or the folder holding it)")
    p.add_argument("--out", help="output folder (default: next to RESULTS)")

    sub.add_parser("list", help="registered variants, their parameters and cost; the backend table")
    return ap


def _settings(args: argparse.Namespace):
    from .runner import SweepSettings

    opts: dict[str, Any] = dict(DEFAULTS)
    variants: list[BenchVariant] | None = None
    if args.config:
        study = load_study(args.config)
        entries = study.pop("variants", None)
        unknown = [k for k in study if k not in DEFAULTS]
        if unknown:
            raise ValueError(
                f"study file {args.config!r}: unknown option(s) {unknown}; accepted: variants, {', '.join(DEFAULTS)}"
            )
        opts.update(study)
        if entries is not None:
            if not isinstance(entries, list):
                raise ValueError(f"study file {args.config!r}: 'variants' must be a list")
            variants = [variant_from_entry(e) for e in entries]
    for name in DEFAULTS:
        value = getattr(args, name, None)
        if value is not None:
            opts[name] = value
    if args.variants:
        variants = [parse_variant_spec(v) for v in args.variants]
    if variants is None:
        variants = default_variants()
    plot = opts.pop("plot")
    seq = opts.pop("seq_lens")
    return SweepSettings(variants=variants, seq_lens=parse_seq_lens(seq), **opts), plot


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def summary_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    cols = [
        "variant",
        "N",
        "backend",
        "status",
        "median ms",
        "IQR ms",
        "TFLOP/s",
        "peak MiB",
        "err vs full",
        "err vs math",
        "e2e cos",
    ]
    rows = []
    for r in records:
        iqr = None
        if r.get("time_ms_p75") is not None and r.get("time_ms_p25") is not None:
            iqr = r["time_ms_p75"] - r["time_ms_p25"]
        status = r.get("status", "?")
        if status != "ok" and r.get("reason"):
            status += f": {r['reason'][:48]}…"
        rows.append(
            [
                r.get("label") or r["variant"],
                str(r["n"]),
                r.get("backend") or "-",
                status,
                _fmt(r.get("time_ms_median"), ".2f"),
                _fmt(iqr, ".2f"),
                _fmt(r.get("tflops"), ".3f"),
                _fmt(r.get("peak_mem_mb"), ".1f"),
                _fmt(r.get("rel_error_vs_full"), ".2e"),
                _fmt(r.get("rel_error_backend"), ".2e"),
                _fmt(r.get("e2e_cosine"), ".4f"),
            ]
        )
    return cols, rows


def print_summary(records: list[dict[str, Any]], title: str = "") -> None:
    cols, rows = summary_rows(records)
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title or None, show_lines=False)
        for c in cols:
            t.add_column(c, justify="left" if c in ("variant", "backend", "status") else "right", overflow="fold")
        for row in rows:
            t.add_row(*row)
        Console(width=max(140, Console().width)).print(t)
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        if title:
            print(title)
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        for row in rows:
            print("  ".join(x.ljust(w) for x, w in zip(row, widths)))


class _Progress:
    """rich, else tqdm, else one line per point."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.kind = "plain"
        self.total = 0
        self.count = 0

    def start(self, total: int, done: int) -> None:
        self.total, self.count = total, done
        if not sys.stderr.isatty():
            print(f"{total} points to measure" + (f" ({done} already done)" if done else ""), flush=True)
            return
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("sla-bench", total=total, completed=done)
            self.kind = "rich"
        except ImportError:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, desc="sla-bench")
                self.kind = "tqdm"
            except ImportError:
                pass

    def update(self, rec: dict[str, Any], skipped: bool) -> None:
        if skipped:
            return
        self.count += 1
        desc = f"{rec.get('label')} N={rec['n']} {rec.get('status')}"
        if self.kind == "rich":
            self.bar.update(self.task, advance=1, description=desc)
        elif self.kind == "tqdm":
            self.bar.set_description(desc)
            self.bar.update(1)
        else:
            t = rec.get("time_ms_median")
            print(f"[{self.count}/{self.total}] {desc}" + (f" {t:.2f} ms" if t is not None else ""), flush=True)

    def close(self) -> None:
        if self.kind == "rich":
            self.bar.stop()
        elif self.kind == "tqdm":
            self.bar.close()


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import run_sweep

    settings, plot = _settings(args)
    if settings.inputs == "real":
        from .real import missing_reason

        reason = missing_reason()
        if reason:
            print(f"sla-bench: {reason}", file=sys.stderr)
            return 2
    device = settings.resolved_device()
    print(
        f"sla-bench run: {len(settings.variants)} variant(s) x {len(settings.seq_lens)} length(s) on {device}"
        f" ({settings.dtype}, causal={settings.causal}, {'fwd+bwd' if settings.backward else 'forward'}, "
        f"inputs={settings.inputs}) -> {settings.out}/results.jsonl",
        flush=True,
    )
    prog = _Progress()
    try:
        records = run_sweep(settings, on_start=prog.start, on_record=prog.update)
    finally:
        prog.close()
    print_summary(records, title=f"sla-bench results ({settings.out}/results.jsonl)")
    from .plot import plot_results, write_csv

    out = Path(settings.out)
    if plot:
        paths = plot_results(out / "results.jsonl", out)
    else:
        paths = [write_csv(_all(out), out / "results.csv")]
    print("wrote " + ", ".join(str(p) for p in [out / "results.jsonl", *paths]))
    return 0


def _all(out: Path):
    from .runner import read_results

    return read_results(out / "results.jsonl")


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_results

    paths = plot_results(args.results, args.out)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import sparse_linear_attn as sla
    from sparse_linear_attn.backends.dispatch import AUTO_ORDER, backend_table

    print("Registered variants (sla.describe):\n")
    for name in sla.available_variants():
        print(sla.describe(name))
        order = AUTO_ORDER.get(name)
        if order:
            print(f"  auto tries: {' > '.join(order)}")
        print()
    print("Backends (sla.backends.BACKENDS):\n")
    print(backend_table())
    print("\nDefault variants of a bare `sla-bench run`: " + " ".join(v.label for v in default_variants()))
    print("Input kinds: random, local, peaked, real (all-MiniLM-L6-v2 on stdlib text; extra 'real')")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"run": cmd_run, "plot": cmd_plot, "list": cmd_list}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"sla-bench {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
