"""``sla-bench run``: run a sweep; writes OUT/results.jsonl, results.csv and PNGs."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from ...errors import ParameterError
from ..settings import DEFAULTS
from ..spec import (
    BenchVariant,
    load_study,
    make_variant,
    parse_seq_lens,
    parse_variant_specs,
    unique_variants,
    variants_from_entry,
)

NAME = "run"
HELP = "run a sweep; writes OUT/results.jsonl, results.csv and PNGs"
DESCRIPTION = "Run a sweep. Options given here override those of --config."

#: Variants of a bare ``sla-bench run``, each included when registered; the parameters are
#: applied only where the variant takes them.
DEFAULT_CANDIDATES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("full", {}),
    ("sliding_window", {"window": 256}),
    ("block_sparse", {}),
    ("linear", {}),
    ("performer", {"num_features": 256}),
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


def add_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("--config", help="study file (.yaml/.yml/.json/.toml) with these options and 'variants'")
    r.add_argument(
        "--variants",
        nargs="+",
        metavar="SPEC",
        help="variant specs name[:key=value,...], e.g. full sliding_window:window=256 "
        "performer:num_features=256 full:backend=math; a list sweeps a knob: 'sliding_window:window=[64,256]' "
        "(several lists: their cross product); oracle[:density=[...]] adds the best-selection reference "
        "(default: full plus whichever of sliding_window, block_sparse, linear, performer are registered)",
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
        help="input kind, or a comma list of kinds: random, local, peaked, real (default local: attention mass "
        "decays with distance, as in language models)",
    )
    r.add_argument("--texts", metavar="FILE", help="real inputs from this text file (one document per paragraph)")
    r.add_argument("--temperature", type=float, help="multiplies q (logit scale) for synthetic inputs")
    r.add_argument("--repeats", type=int, help="timed repeats after warm-up (default 5)")
    r.add_argument("--warmup", type=int, help="untimed calls after the first (default 1)")
    r.add_argument("--seed", type=int)
    r.add_argument("--out", help=f"output folder (default {DEFAULTS['out']})")
    r.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="skip points already in OUT/results.jsonl (the settings must match the file's)",
    )
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
        help="longest N at which exact references (errors, recall, oracle) are computed (default: no limit)",
    )
    r.add_argument(
        "--math-reference-max-n",
        type=int,
        help="longest N at which the variant's own math backend checks the fast one (default: no limit)",
    )
    r.add_argument(
        "--reference-dtype",
        choices=["auto", "float32", "float64"],
        help="dtype of the exact reference (default auto: float64 on the CPU, float32 on CUDA)",
    )
    r.add_argument(
        "--recall-rows", type=int, help="query rows per head on which recall and the oracle are evaluated (256)"
    )
    r.add_argument("--layer-errors-max-n", type=int, help="longest N of real inputs' per-layer errors (default 4096)")
    r.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's). On a shared CPU, 1 gives steadier times"
    )
    r.add_argument("--real-layer", type=int, help="layer whose Q/K/V --inputs real times (default 3)")


def settings_from_args(args: argparse.Namespace):
    """``(SweepSettings, plot)`` from the defaults, the study file and the command line, every
    option checked before anything runs."""
    from ..settings import SweepSettings

    opts: dict[str, Any] = dict(DEFAULTS)
    variants: list[BenchVariant] | None = None
    study_name = None
    if args.config:
        study = load_study(args.config)
        entries = study.pop("variants", None)
        unknown = [k for k in study if k not in DEFAULTS]
        if unknown:
            raise ParameterError(
                f"study file {args.config!r}: unknown option(s) {unknown}; accepted: variants, {', '.join(DEFAULTS)}"
            )
        opts.update(study)
        study_name = Path(args.config).name
        if entries is not None:
            if not isinstance(entries, list) or not entries:
                raise ParameterError(f"study file {args.config!r}: 'variants' must be a non-empty list")
            variants = [bv for e in entries for bv in variants_from_entry(e)]
    for name in DEFAULTS:
        value = getattr(args, name, None)
        if value is not None:
            opts[name] = value
    if isinstance(args.inputs, str) and "," in args.inputs:
        opts["inputs"] = [x.strip() for x in args.inputs.split(",") if x.strip()]
    if args.variants:
        variants = [bv for v in args.variants for bv in parse_variant_specs(v)]
    if variants is None:
        variants = default_variants()
    plot = opts.pop("plot")
    if not isinstance(plot, bool):
        raise ParameterError(f"invalid settings: plot: expected true or false, got {type(plot).__name__} {plot!r}")
    seq = opts.pop("seq_lens")
    if isinstance(seq, int) and not isinstance(seq, bool):
        seq = [seq]
    if not isinstance(seq, (str, list)):
        raise ParameterError(f"invalid settings: seq_lens: expected a list or a comma string, got {seq!r}")
    settings = SweepSettings(variants=unique_variants(variants), seq_lens=parse_seq_lens(seq), study=study_name, **opts)
    return settings, plot


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def summary_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    many_inputs = len({(r.get("inputs"), r.get("causal")) for r in records}) > 1
    cols = [
        "variant",
        *(["inputs"] if many_inputs else []),
        "N",
        "backend",
        "status",
        "median ms",
        "IQR ms",
        "TFLOP/s",
        "peak MiB",
        "density",
        "err vs full",
        "worst head",
        "recall",
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
        kind = [f"{r.get('inputs')}{' causal' if r.get('causal') else ''}"] if many_inputs else []
        rows.append(
            [
                r.get("label") or r["variant"],
                *kind,
                str(r["n"]),
                r.get("backend") or "-",
                status,
                _fmt(r.get("time_ms_median"), ".2f"),
                _fmt(iqr, ".2f"),
                _fmt(r.get("tflops"), ".3f"),
                _fmt(r.get("peak_mem_mb"), ".1f"),
                _fmt(r.get("density"), ".3f"),
                _fmt(r.get("rel_error_vs_full"), ".2e"),
                _fmt(r.get("rel_error_worst_head"), ".2e"),
                _fmt(r.get("recall_mean"), ".3f"),
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
            t.add_column(c, justify="left" if c in ("variant", "inputs", "backend", "status") else "right",
                         overflow="fold")  # fmt: skip
        for row in rows:
            t.add_row(*row)
        Console(width=max(160, Console().width)).print(t)
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
        self.measured = 0

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
        self.measured += 1
        desc = f"{rec.get('label')} {rec.get('inputs')} N={rec['n']} {rec.get('status')}"
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
        self.kind = "closed"


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run."""
    args = [a for a in argv if a != "--resume"]
    return "sla-bench " + shlex.join(args) + " --resume"


def run(args: argparse.Namespace) -> int:
    from ..runner import RESULTS, read_results, run_sweep

    settings, plot = settings_from_args(args)
    if "real" in settings.input_kinds:
        from ..real import missing_reason

        reason = missing_reason()
        if reason:
            print(f"sla-bench: {reason}", file=sys.stderr)
            return 2
    device = settings.resolved_device()
    out = Path(settings.out)
    kinds = ",".join(settings.input_kinds)
    modes = ",".join("causal" if c else "bidirectional" for c in settings.causal_modes)
    print(
        f"sla-bench run: {len(settings.variants)} variant setting(s) x {len(settings.seq_lens)} length(s) on {device}"
        f" ({settings.dtype}, {modes}, {'fwd+bwd' if settings.backward else 'forward'}, inputs={kinds})"
        f" -> {out / RESULTS}",
        flush=True,
    )
    prog = _Progress()
    try:
        records = run_sweep(settings, on_start=prog.start, on_record=prog.update)
    except KeyboardInterrupt:
        prog.close()
        saved = len(read_results(out / RESULTS)) if (out / RESULTS).is_file() else 0
        print(
            f"\nsla-bench run: interrupted. {prog.measured} point(s) measured in this run were saved; "
            f"{out / RESULTS} holds {saved} record(s) (the point in flight was lost).\n"
            f"Resume with:\n  {resume_command(args.argv)}",
            file=sys.stderr,
        )
        return 130
    finally:
        prog.close()
    print_summary(records, title=f"sla-bench results ({out / RESULTS})")
    from ..plot import plot_results, write_csv

    if plot:
        paths = plot_results(out / RESULTS, out)
    else:
        paths = [write_csv(read_results(out / RESULTS), out / "results.csv")]
    print("wrote " + ", ".join(str(p) for p in [out / RESULTS, *paths]))
    return 0
