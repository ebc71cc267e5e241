"""Command line of ``sla-bench`` (also ``python -m sparse_linear_attn.bench``): a dispatcher.

Each subcommand is a module of :mod:`.commands` with ``NAME``, ``run(args) -> int`` and either
``HELP`` and ``add_arguments(parser)`` or ``add_parser(subparsers)`` (which adds its own); adding
one is a module and a line in :data:`COMMANDS`. Errors a user can fix (bad options, files, folders) end with one line on
stderr and exit status 2; Ctrl-C ends with exit status 130.
"""

from __future__ import annotations

import argparse
import sys

from .commands import decode, distributed, frontier, listing, plot, run

COMMANDS = (run, plot, frontier, listing, decode, distributed)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sla-bench",
        description="Accuracy-versus-cost benchmarks of sparse_linear_attn variants across sequence lengths.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    for mod in COMMANDS:
        if hasattr(mod, "add_parser"):
            mod.add_parser(sub)
        else:
            p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
            mod.add_arguments(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    run = {mod.NAME: mod.run for mod in COMMANDS}[args.command]
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"\nsla-bench {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as e:
        print(f"sla-bench {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
