"""pytest-benchmark suite: each variant family at a few lengths (not part of the CI tests).

    pytest benchmarks/ --benchmark-only                      # run
    pytest benchmarks/ --benchmark-only --benchmark-autosave # save, then later:
    pytest benchmarks/ --benchmark-only --benchmark-compare  # compare with the last saved run

Forward pass, B=1, H=8, D=64, float32 on the CPU (CUDA when present, synchronised). Families not
registered on this checkout are skipped. ``extra_info`` carries the FLOPs counted on visited
entries (see docs/benchmarks.md), so TFLOP/s = flops / mean time.
"""

from __future__ import annotations

import pytest
import torch

import sparse_linear_attn as sla
from sparse_linear_attn.bench.flops import count_flops

FAMILIES = {
    "full": {},
    "sliding_window": {"window": 256},
    "block_sparse": {},
    "linear": {},
    "performer": {"num_features": 256},
}
LENGTHS = (1024, 4096)
B, H, D = 1, 8, 64
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward(benchmark, family, n, causal):
    if family not in sla.available_variants():
        pytest.skip(f"variant {family!r} is not registered on this checkout")
    info = sla.describe(family)
    params = {k: v for k, v in FAMILIES[family].items() if k in info.params}
    if causal and not info.causal:
        pytest.skip(f"{family} does not support causal=True")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=gen).to(DEVICE) for _ in range(3))

    def run():
        with torch.no_grad():
            out = sla.attention(q, k, v, family, causal=causal, **params)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    counted = count_flops(
        family, params, batch=B, heads=H, nq=n, nk=n, head_dim=D, v_dim=D, causal=causal, backward=False
    )
    benchmark.extra_info.update(
        variant=family,
        params=params,
        n=n,
        causal=causal,
        device=str(DEVICE),
        flops=counted["flops"],
        flops_method=counted["flops_method"],
    )
    out = benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    assert out.shape == (B, H, n, D) and torch.isfinite(out).all()
