"""``sla-bench frontier RESULTS.jsonl``: the accuracy-versus-cost frontier at each N."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "frontier"
HELP = "draw the error-versus-cost frontier: one panel per N, one line per family ordered by its knob"
DESCRIPTION = (
    "One figure per input kind / causal mode / dtype / device in the file, one panel per N: the error of "
    "each setting against its cost, one line per family ordered by its knob, full attention (star) and the "
    "oracle selection (dashed) as references. Writes frontier_<x>[_<y>][_<group>].png."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..plot import FRONTIER_X, FRONTIER_Y

    p.add_argument("results", help="results.jsonl (or the folder holding it)")
    p.add_argument(
        "--x",
        nargs="+",
        default=["time"],
        choices=list(FRONTIER_X),
        help="cost axis: measured time, FLOPs, or computed-entry fraction (density + compressed density); "
        "several give one figure each (default: time)",
    )
    p.add_argument(
        "--y",
        default="error",
        choices=list(FRONTIER_Y),
        help="error: relative error against exact attention (default); cosine: 1 − end-to-end embedding "
        "cosine (real inputs, N ≤ 512)",
    )
    p.add_argument("--out", help="output folder (default: next to RESULTS)")


def run(args: argparse.Namespace) -> int:
    from ..plot import load_records, plot_frontier

    records = load_records(args.results)
    src = Path(args.results)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent)
    paths = []
    for x in dict.fromkeys(args.x):
        paths += plot_frontier(records, out, x=x, y=args.y)
    if not paths:
        raise ValueError(f"{args.results}: no successful point has both a {args.y} value and a cost on {args.x}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
