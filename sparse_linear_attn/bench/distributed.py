"""``sla-bench distributed``: per-rank time, peak memory and bytes sent against the world size.

For each world size ``W`` (default 1, 2, 4) a gloo process group of ``W`` local processes runs
``sla.distributed.attention`` on one sequence of fixed total length ``N``, each rank holding
``N/W`` positions, one thread per rank. Per rank and variant it records:

* time per call (median of ``--repeats``), as wall time and as the process's CPU time — with
  more ranks than cores the wall time includes waiting for a core, the CPU time does not;
* peak memory of one call above what the process held before it (:mod:`.memory`: sampled RSS);
* bytes sent: what the process wrote to its sockets during one call (``wchar`` of
  ``/proc/self/io``: gloo's payload plus its headers), what the library counted
  (:data:`sparse_linear_attn.distributed.traffic`, the textbook volume of each collective), and
  the strategy's closed-form formula (:func:`formula_bytes`, the one docs/distributed.md states).

Records go to ``OUT/distributed.jsonl`` (one per rank, variant and world size) and a table is
printed. This measures the algorithms' scaling on a CPU; GPU figures in the docs are projections.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import queue
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = dict(
    variants=[
        "full:strategy=ring",
        "sliding_window:window=256,strategy=halo",
        "linear:strategy=scan",
        "full:strategy=ulysses",
        "full:strategy=allgather",
    ],
    worlds="1,2,4",
    seq_len=8192,
    batch=1,
    heads=8,
    kv_heads=None,
    head_dim=64,
    dtype="float32",
    causal=False,
    backward=False,
    layout="contiguous",
    repeats=3,
    out="bench-out",
    timeout=120,
)


def add_distributed_parser(sub) -> None:
    """The ``distributed`` subcommand of ``sla-bench``."""
    p = sub.add_parser(
        "distributed",
        help="context parallelism: per-rank time, peak memory and bytes sent for 1, 2, 4 local gloo ranks",
        description="Run sla.distributed.attention on local gloo process groups of several sizes at a fixed total N.",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="SPEC",
        help="name[:key=value,...] with strategy=NAME among the keys (default: " + " ".join(DEFAULTS["variants"]) + ")",
    )
    p.add_argument("--worlds", help=f"comma list of world sizes (default {DEFAULTS['worlds']})")
    p.add_argument("--seq-len", type=int, help=f"total sequence length N (default {DEFAULTS['seq_len']})")
    p.add_argument("--batch", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    p.add_argument("--head-dim", type=int)
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16"))
    p.add_argument("--causal", action="store_true", default=None)
    p.add_argument("--backward", action="store_true", default=None, help="time forward + backward")
    p.add_argument("--layout", choices=("contiguous", "zigzag"))
    p.add_argument("--repeats", type=int)
    p.add_argument("--out", help=f"output folder (default {DEFAULTS['out']}); writes distributed.jsonl")
    p.add_argument("--timeout", type=int, help="process-group timeout in seconds (default 120)")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    cfg = dict(DEFAULTS)
    for key in DEFAULTS:
        val = getattr(args, key, None)
        if val is not None:
            cfg[key] = val
    cfg["worlds"] = [int(w) for w in str(cfg["worlds"]).split(",") if w.strip()]
    if any(w < 1 for w in cfg["worlds"]):
        raise ValueError(f"--worlds must be positive ints, got {cfg['worlds']}")
    cfg["kv_heads"] = cfg["kv_heads"] or cfg["heads"]
    cfg["variants"] = [parse_spec(s) for s in cfg["variants"]]
    return cfg


def parse_spec(text: str) -> dict[str, Any]:
    """``"sliding_window:window=256,strategy=halo"`` -> name, params, strategy (checked now)."""
    from ..distributed.strategies import AUTO, AUTO_DEFAULT, check_strategy_name
    from .spec import parse_variant_spec

    name, _, rest = text.partition(":")
    strategy = None
    kept = []
    for item in filter(None, rest.split(",")):
        key, _, val = item.partition("=")
        if key.strip() == "strategy":
            strategy = check_strategy_name(val.strip())
        else:
            kept.append(item)
    spec = parse_variant_spec(name + (":" + ",".join(kept) if kept else ""))
    if strategy in (None, "auto"):
        strategy = AUTO.get(spec.name, AUTO_DEFAULT)[0]
    label = f"{spec.label} [{strategy}]"
    return {"name": spec.name, "params": dict(spec.params), "strategy": strategy, "label": label}


# ---------------------------------------------------------------------------------------------
# Closed forms (the ones docs/distributed.md states).


def formula_bytes(variant: dict[str, Any], cfg: dict[str, Any], world: int) -> dict[str, float]:
    """Bytes each rank sends per call, on average over ranks, by the strategy's closed form:
    ``{"forward": ..., "backward": ...}``, payload only, the forward including the ``(W−1)·144``
    bytes of the ranks' agreement. Contiguous shards of equal length; ``halo`` for a window no
    wider than a shard; no key padding (which adds an all-gather of ``B·N`` bytes)."""
    import torch

    W, N, B, H, Hkv, D = world, cfg["seq_len"], cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    Dv = cfg.get("v_dim") or D
    s = torch.empty((), dtype=getattr(torch, cfg["dtype"])).element_size()
    work = max(4, s)
    n = N / W
    kv = n * B * Hkv * (D + Dv) * s  # one rank's keys and values
    strat = variant["strategy"]
    agree = (W - 1) * 18 * 8
    if W == 1:
        return {"forward": 0.0, "backward": 0.0}
    if strat == "ring":
        fwd, bwd = (W - 1) * kv, (W - 1) * kv + W * n * B * Hkv * (D + Dv) * work
    elif strat == "allgather":
        fwd = bwd = (W - 1) * kv
    elif strat == "halo":
        w = min(variant["params"].get("window", 256), N)
        # Every boundary between chunks of different ranks moves min(w, chunk) keys one way
        # (causal) or both ways: W − 1 boundaries contiguous, 2(W − 1) zigzag.
        zigzag = cfg["layout"] == "zigzag"
        chunk = n / 2 if zigzag else n
        per_boundary = min(w, chunk) * B * Hkv * (D + Dv) * s * (1 if cfg["causal"] else 2)
        fwd = bwd = (W - 1) * (2 if zigzag else 1) * per_boundary / W
    elif strat == "scan":
        M = (
            D
            if variant["params"].get("feature_map", "elu") in ("elu", "relu")
            else variant["params"].get("num_features", 256)
        )
        state = B * Hkv * M * (Dv + 1) * work
        chunks = 2 if cfg["layout"] == "zigzag" else 1
        fwd = bwd = (W - 1) * chunks * state if cfg["causal"] else 2 * (W - 1) / W * state
    elif strat == "ulysses":
        rep = W // math.gcd(Hkv, W)
        qkv = n * B * (H * D + Hkv * rep * (D + Dv)) * s
        out = n * B * H * Dv * s
        fwd = bwd = (W - 1) / W * (qkv + out)
    else:
        return {"forward": float("nan"), "backward": float("nan")}
    return {"forward": fwd + agree, "backward": bwd}


# ---------------------------------------------------------------------------------------------
# One rank.


def _wchar() -> int:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _call(sla, q, k, v, variant: dict[str, Any], cfg: dict[str, Any]):
    out = sla.distributed.attention(
        q,
        k,
        v,
        variant["name"],
        causal=cfg["causal"],
        layout=cfg["layout"],
        strategy=variant["strategy"],
        **variant["params"],
    )
    if cfg["backward"]:
        out.sum().backward()
        for t in (q, k, v):
            t.grad = None
    return out


def _measure(sla, tdist, variant: dict[str, Any], cfg: dict[str, Any], world: int, rank: int) -> dict[str, Any]:
    """One variant on this rank: warm-up, peak memory, bytes, then the timed repeats."""
    import torch

    from ..distributed import comm
    from .memory import measure_peak

    dtype = getattr(torch, cfg["dtype"])
    g = torch.Generator().manual_seed(0)
    shape = (cfg["batch"], cfg["heads"], cfg["seq_len"], cfg["head_dim"])
    kv_shape = (cfg["batch"], cfg["kv_heads"], cfg["seq_len"], cfg["head_dim"])
    whole = [torch.randn(s, generator=g).to(dtype) for s in (shape, kv_shape, kv_shape)]
    q, k, v = (sla.distributed.shard(t, layout=cfg["layout"]).clone().requires_grad_(cfg["backward"]) for t in whole)
    del whole
    _call(sla, q, k, v, variant, cfg)  # warm-up (imports, allocator)
    tdist.barrier()
    with measure_peak(torch.device("cpu")) as peak:
        out = _call(sla, q, k, v, variant, cfg)
    del out
    tdist.barrier()
    before = _wchar()
    with comm.counting() as counted:
        _call(sla, q, k, v, variant, cfg)
    sent = _wchar() - before if before >= 0 else None
    walls, cpus = [], []
    for _ in range(cfg["repeats"]):
        tdist.barrier()
        w0, c0 = time.perf_counter(), time.process_time()
        _call(sla, q, k, v, variant, cfg)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    formula = formula_bytes(variant, cfg, world)
    return {
        "variant": variant["label"],
        "strategy": variant["strategy"],
        "world": world,
        "rank": rank,
        "seq_len": cfg["seq_len"],
        "shard": q.shape[2],
        **{
            key: cfg[key] for key in ("batch", "heads", "kv_heads", "head_dim", "dtype", "causal", "backward", "layout")
        },
        "wall_ms": 1e3 * statistics.median(walls),
        "cpu_ms": 1e3 * statistics.median(cpus),
        "peak_bytes": peak.bytes,
        "peak_method": peak.method,
        "socket_bytes": sent,
        "counted_bytes": sum(counted.values()),
        "counted_by_op": dict(counted),
        "formula_bytes": formula["forward"] + (formula["backward"] if cfg["backward"] else 0.0),
    }


def _rank_main(rank: int, world: int, init_file: str, cfg: dict[str, Any], results) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch

    torch.set_num_threads(1)
    import torch.distributed as tdist

    import sparse_linear_attn as sla

    try:
        tdist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=cfg["timeout"]),
        )
        records = [_measure(sla, tdist, variant, cfg, world, rank) for variant in cfg["variants"]]
        results.put({"rank": rank, "records": records})
    except Exception as e:  # noqa: BLE001 - reported by the parent
        import traceback

        results.put({"rank": rank, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})
    results.close()
    results.join_thread()
    os._exit(0)


def run_world(world: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's records for one world size (local processes, gloo)."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "sparse_linear_attn"])
    results = ctx.Queue()
    init_file = os.path.join(tempfile.mkdtemp(), "pg")
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, init_file, cfg, results), daemon=True) for r in range(world)
    ]
    for p in procs:
        p.start()
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + cfg["timeout"] * (2 + len(cfg["variants"]) * (3 + cfg["repeats"]))
    try:
        while len(got) < world:
            if time.monotonic() > deadline:
                raise TimeoutError(f"world {world}: the ranks did not finish in time")
            try:
                got.append(results.get(timeout=1.0))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(
                        f"world {world}: a rank died, exit codes {[p.exitcode for p in procs]}"
                    ) from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [r["error"] for r in got if "error" in r]
    if errors:
        raise RuntimeError(f"world {world}: {errors[0]}")
    return [rec for r in sorted(got, key=lambda r: r["rank"]) for rec in r["records"]]


def summary(records: list[dict[str, Any]]) -> list[str]:
    """One line per (variant, world): per-rank time, peak memory and bytes sent (mean over ranks)."""
    lines = [
        f"{'variant [strategy]':44} {'W':>2} {'wall ms':>9} {'cpu ms':>9} {'peak MiB':>9} "
        f"{'sent MiB':>9} {'counted':>9} {'formula':>9}"
    ]
    keys: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        keys.setdefault((r["variant"], r["world"]), []).append(r)
    for (label, world), rs in keys.items():

        def mean(key: str, rs=rs) -> float:
            vals = [r[key] for r in rs if r[key] is not None]
            return sum(vals) / len(vals) if vals else float("nan")

        peak = max((r["peak_bytes"] or 0) for r in rs)
        lines.append(
            f"{label[:44]:44} {world:>2} {max(r['wall_ms'] for r in rs):9.1f} {max(r['cpu_ms'] for r in rs):9.1f} "
            f"{peak / 2**20:9.1f} {mean('socket_bytes') / 2**20:9.3f} {mean('counted_bytes') / 2**20:9.3f} "
            f"{mean('formula_bytes') / 2**20:9.3f}"
        )
    return lines


def cmd_distributed(args: argparse.Namespace) -> int:
    cfg = settings(args)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "distributed.jsonl"
    records: list[dict[str, Any]] = []
    with open("/proc/pressure/cpu") if os.path.exists("/proc/pressure/cpu") else open(os.devnull) as f:
        print("cpu pressure before:", f.readline().strip())
    for world in cfg["worlds"]:
        recs = run_world(world, {**cfg, "variants": cfg["variants"]})
        records += recs
        with open(path, "a") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        print(f"world {world}: done", flush=True)
    with open("/proc/pressure/cpu") if os.path.exists("/proc/pressure/cpu") else open(os.devnull) as f:
        print("cpu pressure after:", f.readline().strip())
    print("\n".join(summary(records)))
    print(f"records appended to {path}")
    return 0
