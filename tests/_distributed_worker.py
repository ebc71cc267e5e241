"""Spawned gloo process groups for tests/test_distributed.py.

Spawning a process group costs seconds (each process imports torch), so one group per world
size runs every case in a loop and sends back, per case, ``None`` or what went wrong. Each rank
builds the whole inputs from a seed, runs the single-process reference itself (``backend="math"``,
the dense definition), and compares its shard of the output and of the gradients with its
``sla.distributed.attention`` result.
"""

from __future__ import annotations

import datetime
import os
import queue
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.multiprocessing as mp

F64 = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)

#: The process group's timeout: every collective fails after this long instead of hanging.
GROUP_TIMEOUT_S = 30


@dataclass(frozen=True)
class Case:
    variant: str
    strategy: str
    causal: bool
    layout: str
    gqa: bool
    padding: bool
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    uneven: bool = False  # N = 12·W + 1: contiguous shards of unequal lengths

    @property
    def id(self) -> str:
        bits = [
            self.label or self.variant,
            self.strategy,
            "causal" if self.causal else "full",
            self.layout,
            "gqa" if self.gqa else "mha",
            "pad" if self.padding else "nopad",
        ] + (["uneven"] if self.uneven else [])
        return "-".join(bits)


#: (label, variant, params, strategies) — every family under every strategy that serves it; the
#: first strategy (auto's pick) runs every combination of causal × layout × grouped-query heads ×
#: key padding, the others a pairwise covering of them (every pair of settings of any two of the
#: four factors occurs), to keep the spawned groups' run short.
FAMILIES = (
    ("full", "full", {}, ("ring", "ulysses", "allgather")),
    ("dot_product", "dot_product", {}, ("ring",)),
    ("window3", "sliding_window", {"window": 3}, ("halo", "ulysses", "allgather")),
    ("window8", "sliding_window", {"window": 8}, ("halo",)),  # wider than a chunk: several hops
    ("window40", "sliding_window", {"window": 40}, ("halo",)),  # wider than the sequence
    (
        "bigbird",
        "block_sparse",
        {"block_size": 3, "pattern": "bigbird", "num_random_blocks": 1},
        ("allgather", "ulysses"),
    ),
    ("strided", "block_sparse", {"block_size": 2, "pattern": "strided", "stride": 3}, ("allgather",)),
    ("sinks", "sliding_window", {"window": 3, "sinks": 2}, ("halo", "ulysses", "allgather")),
    ("sinks8", "sliding_window", {"window": 2, "sinks": 8}, ("halo",)),  # sinks wider than a chunk
    ("topk", "topk_block", {"block_size": 3, "density": 0.5}, ("allgather", "ulysses")),
    (
        "topk_keypool",
        "topk_block",
        {"block_size": 3, "density": 0.4, "estimator": "key_pool", "sink_blocks": 0},
        ("allgather",),
    ),
    ("hybrid", "hybrid", {"block_size": 3, "density": 0.3, "remainder_near": 1}, ("allgather", "ulysses")),
    ("linear", "linear", {"feature_map": "elu", "chunk_size": 4}, ("scan", "ulysses", "allgather")),
    ("performer", "performer", {"num_features": 16, "chunk_size": 4}, ("scan",)),
)


def world_shape(world: int) -> dict[str, int]:
    """Sizes for a world: N divisible by 2W with chunks of 6, heads divisible by W."""
    heads = {2: 4, 3: 6}.get(world, 2 * world)
    return dict(batch=2, heads=heads, kv_mha=heads, kv_gqa={2: 1, 3: 2}.get(world, 1), n=12 * world, d=8, dv=6)


#: Rows of a strength-2 covering array of four two-valued factors.
PAIRWISE = ((0, 0, 0, 0), (0, 1, 1, 1), (1, 0, 1, 1), (1, 1, 0, 1), (1, 1, 1, 0))
EVERY = tuple((a, b, c, d) for a in (0, 1) for b in (0, 1) for c in (0, 1) for d in (0, 1))


def cases(world: int) -> list[Case]:
    out = []
    layouts = ("contiguous", "zigzag")
    for label, variant, params, strategies in FAMILIES:
        for i, strategy in enumerate(strategies):
            for causal, layout, gqa, padding in EVERY if i == 0 else PAIRWISE:
                if strategy == "ulysses" and variant in ("topk_block", "hybrid") and gqa and world > 1:
                    continue  # a selection shared by a key/value head's query heads: refused (see _errors)
                out.append(
                    Case(variant, strategy, bool(causal), layouts[layout], bool(gqa), bool(padding), params, label)
                )
    # Unequal contiguous shards (N = 12·W + 1), for every strategy that takes them.
    for label, variant, params, strategies in FAMILIES:
        for strategy in strategies:
            if strategy == "ulysses" or variant in ("block_sparse", "topk_block", "hybrid"):
                continue  # equal shards, or block-aligned chunks, needed
            if label in ("dot_product", "window40", "sinks8"):
                continue
            for causal in (False, True):
                out.append(Case(variant, strategy, causal, "contiguous", True, True, params, label, uneven=True))
    # Performer drawing a fresh projection (training with redraw=True).
    for causal in (False, True):
        params = {"num_features": 16, "chunk_size": 4, "redraw": True}
        out.append(Case("performer", "scan", causal, "zigzag", True, True, params, "redraw"))
    # A per-head block layout (sliced per rank by ulysses, read per head by the block fetch).
    nb = world_shape(world)["n"] // 3
    heads = world_shape(world)["heads"]
    g = torch.Generator().manual_seed(7)
    per_head = (torch.rand(heads, nb, nb, generator=g) < 0.3) | torch.eye(nb, dtype=torch.bool)
    for strategy in ("allgather", "ulysses"):
        for causal in (False, True):
            out.append(
                Case(
                    "block_sparse",
                    strategy,
                    causal,
                    "zigzag",
                    True,
                    True,
                    {"block_size": 3, "block_layout": per_head},
                    "perhead",
                )
            )
    return out


def inputs(world: int, case: Case, seed: int = 0):
    s = dict(world_shape(world))
    s["n"] += case.uneven
    g = torch.Generator().manual_seed(seed)
    hkv = s["kv_gqa"] if case.gqa else s["kv_mha"]
    q = torch.randn(s["batch"], s["heads"], s["n"], s["d"], generator=g, dtype=F64)
    k = torch.randn(s["batch"], hkv, s["n"], s["d"], generator=g, dtype=F64)
    v = torch.randn(s["batch"], hkv, s["n"], s["dv"], generator=g, dtype=F64)
    w = torch.randn(s["batch"], s["heads"], s["n"], s["dv"], generator=g, dtype=F64)
    mask = None
    if case.padding:
        mask = torch.rand(s["batch"], s["n"], generator=g) < 0.2
        mask[0, :2] = True  # causal: the first queries of row 0 see no key at all
        mask[1, -5:] = True
    return q, k, v, w, mask


def check_case(sla, world: int, rank: int, case: Case) -> None:
    """Raise if this rank's output or gradients differ from its shard of the single-process call."""
    dist = sla.distributed
    q, k, v, w, mask = inputs(world, case)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    params = dict(case.params)
    if "block_layout" in params:  # sla.distributed's name for block_sparse's `layout`
        params["layout"] = params.pop("block_layout")
    if params.get("redraw"):
        # A fresh FAVOR+ projection is drawn from torch's generator: the ranks' generators
        # differ here, and only rank 0's draws as the single-process call did (its is used).
        torch.manual_seed(1234)
    ref = sla.attention(*leaves, case.variant, causal=case.causal, key_padding_mask=mask, backend="math", **params)
    (ref * w).sum().backward()
    lay = case.layout
    mine = [dist.shard(t, layout=lay).clone().requires_grad_() for t in (q, k, v)]
    if params.get("redraw"):
        torch.manual_seed(1234 + rank)
    out = dist.attention(
        *mine,
        case.variant,
        causal=case.causal,
        layout=lay,
        strategy=case.strategy,
        key_padding_mask=None if mask is None else dist.shard(mask, layout=lay, dim=1),
        **case.params,
    )
    (out * dist.shard(w, layout=lay)).sum().backward()
    _close("output", out, dist.shard(ref.detach(), layout=lay))
    for name, got, whole in zip("qkv", mine, leaves):
        _close(f"d{name}", got.grad, dist.shard(whole.grad, layout=lay))


def _close(what: str, got, want) -> None:
    # torch.testing.assert_close would import torch.distributed.tensor (seconds) on first use.
    if got is None or got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(
            f"{what}: got {None if got is None else (tuple(got.shape), got.dtype)}, "
            f"want {(tuple(want.shape), want.dtype)}"
        )
    err = (got - want).abs()
    bad = err > TOL["atol"] + TOL["rtol"] * want.abs()
    if bad.any() or not torch.isfinite(got).all():
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ, max error {float(err.max()):.3g}"
        )


def _layouts(sla, world: int, rank: int) -> dict[str, str | None]:
    """shard / unshard / positions: round trips, positions of the shards, unshard's gradient."""
    dist = sla.distributed
    out: dict[str, str | None] = {}
    for layout in ("contiguous", "zigzag"):
        for n in (12 * world, 12 * world + 1) if layout == "contiguous" else (12 * world,):
            name = f"{layout}-{n}"
            try:
                whole = torch.arange(2 * 3 * n, dtype=F64).reshape(2, 3, n)
                mine = dist.shard(whole, layout=layout, dim=2)
                pos = dist.positions(mine.shape[2], layout=layout)
                assert torch.equal(mine, whole[:, :, pos]), "shard != whole[positions]"
                assert torch.equal(dist.shard(whole[0], layout=layout, dim=1), mine[0]), "dim=1 differs"
                leaf = mine.clone().requires_grad_()
                back = dist.unshard(leaf, layout=layout, dim=-1)
                assert torch.equal(back, whole), "unshard(shard(x)) != x"
                # Every rank's loss uses the whole: each shard's gradient is the sum over ranks.
                weight = torch.arange(n, dtype=F64) * (rank + 1)
                (back * weight).sum().backward()
                total = sum(r + 1 for r in range(world))
                want = (torch.arange(n, dtype=F64) * total)[pos].expand_as(leaf)
                assert torch.equal(leaf.grad, want), "unshard's gradient is not the sum over ranks"
                out[name] = None
            except Exception as e:  # noqa: BLE001
                out[name] = f"{type(e).__name__}: {e}"
    return out


#: (name, variant, params, strategy, causal, layout) whose bytes are compared with the formulas.
TRAFFIC = (
    ("ring", "full", {}, "ring", False, "contiguous"),
    ("ring-causal-zigzag", "full", {}, "ring", True, "zigzag"),
    ("halo", "sliding_window", {"window": 3}, "halo", False, "contiguous"),
    ("halo-causal", "sliding_window", {"window": 5}, "halo", True, "contiguous"),
    ("halo-zigzag", "sliding_window", {"window": 4}, "halo", False, "zigzag"),
    ("scan", "linear", {}, "scan", False, "contiguous"),
    ("scan-causal-zigzag", "linear", {}, "scan", True, "zigzag"),
    ("allgather", "full", {}, "allgather", False, "contiguous"),
    ("ulysses", "full", {}, "ulysses", True, "contiguous"),
)


def traffic_config(world: int, causal: bool, layout: str) -> dict[str, Any]:
    s = world_shape(world)
    return dict(
        seq_len=s["n"], batch=s["batch"], heads=s["heads"], kv_heads=s["kv_gqa"], head_dim=s["d"],
        v_dim=s["dv"], dtype="float64", causal=causal, layout=layout,
    )  # fmt: skip


def _traffic(sla, world: int, rank: int) -> dict[str, int]:
    """Bytes this rank's forward call counted, per TRAFFIC entry (the parent checks the mean)."""
    out = {}
    for name, variant, params, strategy, causal, layout in TRAFFIC:
        q, k, v, _, _ = inputs(world, Case(variant, strategy, causal, layout, True, False, params))
        shards = [sla.distributed.shard(t, layout=layout) for t in (q, k, v)]
        with sla.distributed.counting() as counted:
            sla.distributed.attention(*shards, variant, causal=causal, layout=layout, strategy=strategy, **params)
        out[name] = sum(counted.values())
    return out


def _errors(sla, world: int, rank: int) -> dict[str, str]:
    """Bad calls: each must raise on every rank; returns {case: 'ExcType: message'}."""
    dist = sla.distributed
    s = world_shape(world)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, s["heads"], 6, 8, generator=g, dtype=F64)
    k = torch.randn(1, s["heads"], 6, 8, generator=g, dtype=F64)
    v = torch.randn(1, s["heads"], 6, 8, generator=g, dtype=F64)
    from dataclasses import replace

    from sparse_linear_attn import registry

    if "user_topk" not in sla.available_variants():
        registry.add(replace(registry.get("topk_block"), name="user_topk"))
    bad = {
        # Only rank 1's call is wrong: every rank must still raise.
        "one_rank_bad_shape": lambda: dist.attention(q, k if rank != 1 else k[..., :4], v, "full"),
        "one_rank_bad_param": lambda: dist.attention(q, k, v, "sliding_window", window=2 if rank != 1 else -1),
        "ranks_disagree_causal": lambda: dist.attention(q, k, v, "full", causal=rank == 0),
        "ranks_disagree_params": lambda: dist.attention(q, k, v, "sliding_window", window=2 + rank),
        "unequal_zigzag": lambda: dist.attention(
            q[:, :, : 6 - (rank == 1) * 2],
            k[:, :, : 6 - (rank == 1) * 2],
            v[:, :, : 6 - (rank == 1) * 2],
            "full",
            layout="zigzag",
        ),
        "odd_zigzag": lambda: dist.attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], "full", layout="zigzag"),
        "unequal_ulysses": lambda: dist.attention(
            q[:, :, : 6 - (rank == 1)],
            k[:, :, : 6 - (rank == 1)],
            v[:, :, : 6 - (rank == 1)],
            "full",
            strategy="ulysses",
        ),
        "heads_ulysses": lambda: dist.attention(q[:, :1], k[:, :1], v[:, :1], "full", strategy="ulysses"),
        "unknown_strategy": lambda: dist.attention(q, k, v, "full", strategy="rign"),
        "wrong_strategy": lambda: dist.attention(q, k, v, "sliding_window", window=2, strategy="ring"),
        "unknown_layout": lambda: dist.attention(q, k, v, "full", layout="zig"),
        "no_weights": lambda: dist.attention(q, k, v, "full", return_weights=True),
        "split_selection": lambda: dist.attention(
            q, k[:, :1], v[:, :1], "topk_block", block_size=3, density=0.5, strategy="ulysses"
        ),
        "misaligned_blocks": lambda: dist.attention(q, k, v, "block_sparse", block_size=4, strategy="allgather"),
        # A user's data-dependent variant: no strategy knows how to split its selection.
        "user_selection_allgather": lambda: dist.attention(q, k, v, "user_topk", block_size=3, strategy="allgather"),
        "user_selection_ulysses": lambda: dist.attention(q, k, v, "user_topk", block_size=3, strategy="ulysses"),
    }
    out = {}
    for name, fn in bad.items():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded and compared by the parent
            out[name] = f"{type(e).__name__}: {e}"
        else:
            out[name] = "no error"
    # The group still works after all those errors.
    try:
        r = dist.attention(q, k, v, "full")
        out["after_errors"] = "ok" if r.shape == (1, s["heads"], 6, 8) else f"shape {tuple(r.shape)}"
    except Exception as e:  # noqa: BLE001
        out["after_errors"] = f"{type(e).__name__}: {e}"
    return out


def _hang(sla, world: int, rank: int) -> dict[str, Any]:
    """Rank 0 calls, the others do not: rank 0 must fail after the group's timeout, not hang."""
    import torch.distributed as tdist

    group = tdist.new_group(timeout=datetime.timedelta(seconds=2))
    q = torch.randn(1, 2, 6, 8, dtype=F64)
    result: dict[str, Any] = {}
    if rank == 0:
        start = time.monotonic()
        try:
            sla.distributed.attention(q, q, q, "full", group=group)
        except Exception as e:  # noqa: BLE001
            result = {"error": f"{type(e).__name__}: {e}"[:300], "seconds": time.monotonic() - start}
        else:
            result = {"error": None, "seconds": time.monotonic() - start}
    else:
        time.sleep(4)  # outlive rank 0's timeout, then leave without joining the call
    return result


def _worker(rank: int, world: int, init_file: str, results, only: list[str] | None) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as tdist

    import sparse_linear_attn as sla
    from sparse_linear_attn.distributed import ring, scan

    # Tiny tiles and blocks, so that the tests cross their boundaries (several row tiles per
    # ring step, causal tiles cut short, several blocks per chunk state).
    ring.TILE_ELEMENTS = 200
    scan.BLOCK = 5
    report: dict[str, Any] = {"rank": rank}
    try:
        tdist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
        )
        failures: dict[str, str | None] = {}
        started = time.monotonic()
        for case in cases(world):
            if only is not None and case.id not in only:
                continue
            try:
                check_case(sla, world, rank, case)
                failures[case.id] = None
            except Exception as e:  # noqa: BLE001
                failures[case.id] = f"{type(e).__name__}: {e}"[:2000] + "\n" + traceback.format_exc()[-1500:]
        report["cases"] = failures
        report["cases_seconds"] = time.monotonic() - started
        if only is None:
            report["layouts"] = _layouts(sla, world, rank)
            report["traffic"] = _traffic(sla, world, rank)
        if only is None and world > 1:  # these need a second rank
            report["errors"] = _errors(sla, world, rank)
            tdist.barrier()
            report["hang"] = _hang(sla, world, rank)
    except Exception as e:  # noqa: BLE001
        report["fatal"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    results.put(report)
    results.close()
    results.join_thread()  # the report is written to the pipe before the process ends
    # Leave without destroy_process_group: after the hang test the group is not usable.
    os._exit(0)


def spawn(world: int, tmpdir: str, *, only: list[str] | None = None, deadline_s: float = 120) -> list[dict]:
    """Run the worker on ``world`` spawned ranks; returns their reports (rank order)."""
    # A fork server that imported torch and the library once forks the ranks: a fresh process
    # per rank (no threads inherited from pytest) without each re-importing them (seconds each).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "sparse_linear_attn", "_distributed_worker"])
    results = ctx.Queue()
    init_file = os.path.join(tmpdir, f"pg-{world}-{os.getpid()}-{time.monotonic_ns()}")
    procs = [ctx.Process(target=_worker, args=(r, world, init_file, results, only), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    reports, end = [], time.monotonic() + deadline_s
    try:
        while len(reports) < world:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the {world} spawned ranks did not finish within {deadline_s} s")
            try:
                reports.append(results.get(timeout=min(left, 1.0)))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(f"a spawned rank died: exit codes {[p.exitcode for p in procs]}") from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return sorted(reports, key=lambda r: r["rank"])
