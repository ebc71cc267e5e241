"""pytest-benchmark timings of the exact sparse variants against their baselines (CPU, float32).

    python3 -m pytest benchmarks/test_sparse_perf.py --benchmark-only -q
    SLA_BENCH_N=16384 python3 -m pytest benchmarks/test_sparse_perf.py --benchmark-only -q

Group "sliding_window" compares full causal SDPA, sliding_window (auto) and compiled Flex with
the same mask; group "block_sparse" compares bigbird (auto) with compiled Flex on the same
layout. Read the ratios of the means inside one run; the issue's targets and the script that
prints them are in benchmarks/bench_sparse.py. Flex cases are skipped where Flex cannot compile.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import sparse_linear_attn as sla
from sparse_linear_attn.variants.block_sparse import resolve_layout

sys.path.insert(0, os.path.dirname(__file__))
from bench_sparse import flex_layout, flex_sliding  # noqa: E402

N = int(os.environ.get("SLA_BENCH_N", "8192"))
B, H, D, WINDOW, BLOCK = 1, 8, 64, 256, 64


@pytest.fixture(scope="module")
def qkv():
    torch.manual_seed(0)
    return tuple(torch.randn(B, H, N, D) for _ in range(3))


def _flex_or_skip(make):
    try:
        fn = make()
        with torch.no_grad():
            fn()
        return fn
    except Exception as e:  # no compiler / unsupported platform
        pytest.skip(f"FlexAttention does not compile here: {type(e).__name__}")


@pytest.mark.benchmark(group="sliding_window")
def test_full_causal_sdpa(benchmark, qkv):
    q, k, v = qkv
    with torch.no_grad():
        benchmark(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.benchmark(group="sliding_window")
def test_sliding_window_auto(benchmark, qkv):
    q, k, v = qkv
    with torch.no_grad():
        benchmark(lambda: sla.attention(q, k, v, "sliding_window", window=WINDOW, causal=True))


@pytest.mark.benchmark(group="sliding_window")
def test_sliding_window_flex_baseline(benchmark, qkv):
    q, k, v = qkv
    fn = _flex_or_skip(lambda: flex_sliding(q, k, v, WINDOW))
    with torch.no_grad():
        benchmark(fn)


@pytest.mark.benchmark(group="block_sparse")
def test_bigbird_auto(benchmark, qkv):
    q, k, v = qkv
    with torch.no_grad():
        benchmark(lambda: sla.attention(q, k, v, "block_sparse", pattern="bigbird", block_size=BLOCK, causal=True))


@pytest.mark.benchmark(group="block_sparse")
def test_bigbird_flex_baseline(benchmark, qkv):
    q, k, v = qkv
    layout = resolve_layout(N, N, causal=True, pattern="bigbird", block_size=BLOCK)
    fn = _flex_or_skip(lambda: flex_layout(q, k, v, layout, BLOCK))
    with torch.no_grad():
        benchmark(fn)
