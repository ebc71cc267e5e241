"""pytest-benchmark timings of linear attention against exact causal SDPA (not run by default).

    python3 -m pytest benchmarks/test_linear_perf.py --benchmark-only --benchmark-columns=min,mean,rounds

Group ``causal-16k`` compares ``linear`` (elu, chunkwise), ``performer`` (FAVOR+, M=256) and
``F.scaled_dot_product_attention(is_causal=True)`` at B=1, H=8, N=16384, D=64, float32; the
target is SDPA/linear >= 30 for elu (``benchmarks/bench_linear.py`` prints the ratio).
``test_memory_at_64k`` asserts the extra peak RSS of one causal call at N=65536 stays within
4x the output (measured in a subprocess; see ``bench_linear.py``).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import sparse_linear_attn as sla

sys.path.insert(0, os.path.dirname(__file__))
from bench_linear import inputs, measure_memory  # noqa: E402

N, H, D = 16384, 8, 64


@pytest.fixture(scope="module")
def qkv():
    return inputs(N, H, D)


@pytest.mark.benchmark(group="causal-16k")
def test_sdpa_causal(benchmark, qkv):
    q, k, v = qkv
    with torch.no_grad():
        benchmark.pedantic(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), rounds=2, warmup_rounds=1)


@pytest.mark.benchmark(group="causal-16k")
def test_linear_elu_causal(benchmark, qkv):
    q, k, v = qkv
    with torch.no_grad():
        out = benchmark.pedantic(lambda: sla.attention(q, k, v, "linear", causal=True), rounds=5, warmup_rounds=1)
    assert torch.isfinite(out).all()


@pytest.mark.benchmark(group="causal-16k")
def test_performer_causal(benchmark, qkv):
    q, k, v = qkv
    with torch.no_grad():
        benchmark.pedantic(
            lambda: sla.attention(q, k, v, "performer", causal=True, num_features=256), rounds=3, warmup_rounds=1
        )


@pytest.mark.benchmark(group="causal-16k-train")
def test_linear_elu_causal_forward_backward(benchmark, qkv):
    q, k, v = (t.clone().requires_grad_() for t in qkv)

    def step():
        sla.attention(q, k, v, "linear", causal=True).sum().backward()

    benchmark.pedantic(step, rounds=2, warmup_rounds=1)


def test_memory_at_64k():
    mem = measure_memory(65536, H, D, {})
    print(f"extra peak {mem['extra_peak_bytes'] / 2**20:.0f} MiB = {mem['ratio']:.2f}x the output")
    assert mem["ratio"] <= 4.0, mem
