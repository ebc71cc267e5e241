"""``sla-bench list``: registered variants, their parameters and cost; the backend table."""

from __future__ import annotations

import argparse

NAME = "list"
HELP = "registered variants, their parameters and cost; the backend table"


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    import sparse_linear_attn as sla
    from sparse_linear_attn.backends.dispatch import AUTO_ORDER, backend_table

    from .run import default_variants

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
    print("Input kinds: random, local, peaked, real (all-MiniLM-L6-v2 on stdlib text or --texts FILE; extra 'real')")
    print("References: oracle[:density=...] (the entries of largest exact weight; frontier plots)")
    return 0
