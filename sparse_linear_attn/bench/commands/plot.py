"""``sla-bench plot``: redraw the PNGs and results.csv from a results.jsonl."""

from __future__ import annotations

import argparse

NAME = "plot"
HELP = "draw PNGs (vs N and the frontier) and results.csv from a results.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="results.jsonl (or the folder holding it)")
    p.add_argument("--out", help="output folder (default: next to RESULTS)")


def run(args: argparse.Namespace) -> int:
    from ..plot import plot_results

    paths = plot_results(args.results, args.out)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
