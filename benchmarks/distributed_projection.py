"""Projected time per attention layer of sla.distributed's strategies at 128K–1M tokens on 8–64 GPUs.

Nothing here is measured on a GPU (none was available). The projection combines:

* the communication volume of each strategy — the closed forms of docs/distributed.md, which
  ``sla-bench distributed`` checks against the bytes the ranks really wrote to their sockets;
* one factor measured on the CPU (``--measured``, a ``distributed.jsonl`` of ``sla-bench
  distributed``): how much slower the ring's per-step kernel (``partial_attention``: scores,
  log-sum-exp, unfused) is than the fused single-process kernel on the same work (``full`` at
  W = 1 under ``ring`` against ``allgather``, which calls ``sla.attention``). It is assumed to
  carry over to GPUs, where it is more likely to grow (unfused scores make a round trip to HBM);
* ASSUMED hardware rates, with their sources, in :data:`HARDWARE`.

    python benchmarks/distributed_projection.py --measured bench-out/distributed.jsonl

prints a markdown table: per strategy and sequence length, the projected time per layer (forward)
on 8–64 GPUs with its compute and communication parts, and what limits it.
"""

from __future__ import annotations

import argparse
import json
import math

#: Assumed hardware (H100/H200 SXM class, 8 GPUs per node). Sources: NVIDIA H100/H200 datasheets
#: (NVLink 4: 900 GB/s bidirectional per GPU, so 450 GB/s each way; one 400 Gb/s ConnectX-7 NIC
#: per GPU: 50 GB/s each way between nodes); FlashAttention-3 (Shah et al., 2024) reports
#: 600–740 TFLOP/s for its FP16/BF16 forward pass on H100 at long sequences, so 600 is taken for
#: a fused attention kernel; sparse and linear kernels are assumed to reach a fraction of it
#: (FlexAttention reports ~85–90 % of FlashAttention-2 for sliding windows; chunkwise linear
#: attention kernels are matmul-bound at small chunk sizes). Latency per message/collective hop
#: is an order-of-magnitude assumption from NCCL benchmarks.
HARDWARE = dict(
    gpus_per_node=8,
    nvlink_bytes_per_s=450e9,
    network_bytes_per_s=50e9,
    hop_latency_s=10e-6,
    fused_attention_flops=600e12,
    window_attention_flops=0.6 * 600e12,
    linear_attention_flops=0.25 * 600e12,
)

#: The model shape projected: a Llama-3-8B-like attention layer.
MODEL = dict(batch=1, heads=32, kv_heads=8, head_dim=128, bytes_per_element=2, window=4096)


def link(world: int) -> float:
    """Bytes/s of the slowest link a ring over ``world`` GPUs crosses."""
    hw = HARDWARE
    return hw["nvlink_bytes_per_s"] if world <= hw["gpus_per_node"] else hw["network_bytes_per_s"]


def all_to_all_seconds(bytes_per_rank: float, world: int) -> float:
    """All-to-all: the share leaving the node goes over the network, the rest over NVLink."""
    hw = HARDWARE
    off_node = max(0, world - hw["gpus_per_node"]) / world
    return bytes_per_rank * (off_node / hw["network_bytes_per_s"] + (1 - off_node) / hw["nvlink_bytes_per_s"]) + hw[
        "hop_latency_s"
    ] * math.log2(max(2, world))


def project(strategy: str, n_total: int, world: int, ring_kernel_factor: float) -> dict[str, float | str]:
    """Forward time of one causal layer (zigzag) on ``world`` GPUs."""
    m, hw = MODEL, HARDWARE
    B, H, Hkv, D, s = m["batch"], m["heads"], m["kv_heads"], m["head_dim"], m["bytes_per_element"]
    n = n_total / world
    lat = hw["hop_latency_s"]
    kv_block = B * n * Hkv * 2 * D * s
    if strategy == "ring":
        flops = 2 * n_total**2 * H * D / world  # causal: half of 4·N²·H·D
        compute = flops / hw["fused_attention_flops"] * ring_kernel_factor
        comm = (world - 1) * (kv_block / link(world) + lat)
        total = max(compute, comm)  # each step's transfer overlaps the step's compute
        limit = "compute (steps hide the transfers)" if compute >= comm else "K/V transfer per step"
    elif strategy == "ulysses":
        if H % world:
            return {"compute_ms": math.nan, "comm_ms": math.nan, "total_ms": math.nan, "limit": f"heads {H} < W"}
        rep = world // math.gcd(Hkv, world)
        flops = 2 * n_total**2 * H * D / world
        compute = flops / hw["fused_attention_flops"]
        moved = (world - 1) / world * B * n * (2 * H * D + 2 * Hkv * rep * D) * s
        comm = all_to_all_seconds(moved, world)
        total = compute + comm  # all-to-all, attention, all-to-all: in sequence
        limit = f"heads (W ≤ {H}); kv replicated ×{rep}" if rep > 1 else f"heads (W ≤ {H})"
    elif strategy == "halo":
        w = m["window"]
        flops = 4 * n_total * (w + 1) * H * D / world
        compute = flops / hw["window_attention_flops"]
        # The w keys before each chunk (two chunks per GPU with zigzag), from ceil(w / chunk) GPUs.
        chunk = n / 2
        comm = 2 * w * B * Hkv * 2 * D * s / link(world) + lat * math.ceil(w / chunk)
        total = compute + comm
        limit = "compute (only window keys cross)" if compute >= comm else "fetching the window's keys"
    elif strategy == "scan":
        C = 64
        flops = 4 * n_total * H * (C * D + D * D) / world  # chunkwise: intra-chunk + state products
        compute = flops / hw["linear_attention_flops"]
        state = B * Hkv * D * (D + 1) * 4  # float32 (S, z) per kv head
        comm = (world - 1) * 2 * state / link(world) + lat * (world - 1)  # ring all-gather of 2 chunks
        total = compute + comm
        limit = "latency of the state all-gather (grows with W)" if comm > compute else "compute"
    elif strategy == "allgather":
        flops = 2 * n_total**2 * H * D / world * 0.125  # a block-sparse layout of density 1/8
        compute = flops / hw["fused_attention_flops"]
        comm = (world - 1) * (kv_block / link(world) + lat)
        total = compute + comm
        limit = f"K/V of the whole sequence on every GPU ({B * n_total * Hkv * 2 * D * s / 2**30:.1f} GiB)"
    else:
        raise ValueError(strategy)
    return {"compute_ms": 1e3 * compute, "comm_ms": 1e3 * comm, "total_ms": 1e3 * total, "limit": limit}


def ring_kernel_factor(path: str | None) -> float:
    """CPU time of ``full`` under ``ring`` over ``allgather`` (the fused single-process call), at W = 1."""
    if not path:
        return 1.0
    best: dict[str, float] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r["world"] == 1 and r["variant"].startswith("full ["):
                best[r["strategy"]] = min(best.get(r["strategy"], math.inf), r["cpu_ms"])
    if "ring" not in best or "allgather" not in best:
        raise SystemExit(f"{path} has no W=1 'full' records under both ring and allgather")
    return best["ring"] / best["allgather"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measured", help="distributed.jsonl of sla-bench distributed (for the ring kernel factor)")
    args = ap.parse_args()
    factor = ring_kernel_factor(args.measured)
    m = MODEL
    print(
        f"Forward, causal, zigzag; B={m['batch']} H={m['heads']} Hkv={m['kv_heads']} D={m['head_dim']} bf16, "
        f"window {m['window']}; ring kernel factor {factor:.2f} (measured on CPU)\n"
    )
    worlds = (8, 16, 32, 64)
    print("Time per layer in ms, as total (compute + communication; ring: the larger of the two).\n")
    print("| strategy | N | " + " | ".join(f"{w} GPUs" for w in worlds) + " | limited by (at 64 GPUs) |")
    print("|---|---|" + "---|" * len(worlds) + "---|")
    for strategy in ("ring", "ulysses", "halo", "scan", "allgather"):
        for n_total in (128 * 1024, 512 * 1024, 1024 * 1024):
            cells, limit = [], ""
            for world in worlds:
                p = project(strategy, n_total, world, factor)
                if math.isnan(p["total_ms"]):
                    cells.append("—")
                else:
                    cells.append(f"{p['total_ms']:.3g} ({p['compute_ms']:.3g} + {p['comm_ms']:.3g})")
                limit = str(p["limit"])
            print(f"| {strategy} | {n_total // 1024}K | " + " | ".join(cells) + f" | {limit} |")


if __name__ == "__main__":
    main()
