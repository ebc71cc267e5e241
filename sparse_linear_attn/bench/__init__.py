"""``sla-bench``: accuracy-versus-cost benchmarks of attention variants across sequence lengths.

    sla-bench run --variants full 'sliding_window:window=[64,256]' performer:num_features=256 \
                  --seq-lens 1k,2k,4k --out bench-out
    sla-bench frontier bench-out/results.jsonl --x time density
    sla-bench plot bench-out/results.jsonl
    sla-bench list

Also ``python -m sparse_linear_attn.bench``. See docs/benchmarks.md for every column.
"""

from .spec import BenchVariant, parse_seq_lens, parse_variant_spec, parse_variant_specs


def __getattr__(name):  # the runner pulls in torch-heavy modules only when asked for
    if name == "SweepSettings":
        from .settings import SweepSettings

        return SweepSettings
    if name == "run_sweep":
        from .runner import run_sweep

        return run_sweep
    raise AttributeError(name)


__all__ = [
    "BenchVariant",
    "SweepSettings",
    "parse_seq_lens",
    "parse_variant_spec",
    "parse_variant_specs",
    "run_sweep",
    "main",
]


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)
