"""sla.distributed on real spawned gloo process groups of 1, 2 and 3 ranks (CPU, float64).

Each world size is spawned once (see tests/_distributed_worker.py) and runs every case in a
loop: every family under every strategy that serves it, causal or not, contiguous or zigzag,
grouped-query heads, key padding. Each rank's output and dq/dk/dv must equal its shard of the
single-process ``backend="math"`` call to 1e-10. Then bad calls (each must raise the same error
on every rank, and leave the group usable) and a rank that never calls (the other must fail by
the group's timeout, not hang).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _env import imported_modules

import _distributed_worker as worker  # isort: skip

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

#: World sizes spawned: 1 (the strategies' no-communication paths), 2, and 3 (odd sizes catch
#: zigzag parity bugs).
WORLDS = (1, 2, 3)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """``reports(world)``: the spawned ranks' reports, spawning each world size once."""
    done: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in done:
            done[world] = worker.spawn(world, str(tmp_path_factory.mktemp(f"pg{world}")), deadline_s=240)
            for rep in done[world]:
                assert "fatal" not in rep, f"rank {rep['rank']} failed outside the cases:\n{rep['fatal']}"
        return done[world]

    return get


@pytest.mark.parametrize(("world", "case"), [(w, c.id) for w in WORLDS for c in worker.cases(w)], ids=lambda x: str(x))
def test_each_rank_gets_its_shard_of_the_single_process_result(reports, world, case):
    for rep in reports(world):
        err = rep["cases"][case]
        assert err is None, f"rank {rep['rank']} of {world}: {err}"


@pytest.mark.parametrize("world", WORLDS)
def test_shard_unshard_and_positions(reports, world):
    for rep in reports(world):
        for name, err in rep["layouts"].items():
            assert err is None, f"rank {rep['rank']} of {world}, {name}: {err}"


@pytest.mark.parametrize("world", WORLDS)
def test_bytes_sent_follow_the_formulas_of_the_docs(reports, world):
    from sparse_linear_attn.bench.distributed import formula_bytes, parse_spec

    reps = reports(world)
    for name, variant, params, strategy, causal, layout in worker.TRAFFIC:
        spec = parse_spec(f"{variant}:" + ",".join([f"{k}={v}" for k, v in params.items()] + [f"strategy={strategy}"]))
        want = formula_bytes(spec, worker.traffic_config(world, causal, layout), world)["forward"]
        mean = sum(rep["traffic"][name] for rep in reps) / len(reps)
        # The counter rounds fractional shares (all-reduce, all-to-all) down to whole bytes.
        assert abs(mean - want) < 2, f"{name}: counted {mean} bytes per rank, formula {want}"


#: For each bad call: the error type and words the message must contain.
EXPECTED = {
    "one_rank_bad_shape": ("ShapeError", "on rank 1"),
    "one_rank_bad_param": ("ParameterError", "window=-1"),
    "ranks_disagree_causal": ("ParameterError", "disagree on causal"),
    "ranks_disagree_params": ("ParameterError", "disagree on parameters"),
    "unequal_zigzag": ("ShapeError", "zigzag"),
    "odd_zigzag": ("ShapeError", "divisible by 2·W"),
    "unequal_ulysses": ("StrategyError", "equal shard lengths"),
    "heads_ulysses": ("StrategyError", "divisible by the world size"),
    "unknown_strategy": ("UnknownNameError", "Did you mean 'ring'"),
    "wrong_strategy": ("StrategyError", "serves dot_product, full only"),
    "unknown_layout": ("UnknownNameError", "zigzag"),
    "misaligned_blocks": ("StrategyError", "multiples of block_size=4"),
    "split_selection": ("StrategyError", "shares one selection"),
    "user_selection_allgather": ("StrategyError", "knows how to split the selection of hybrid, topk_block only"),
    "user_selection_ulysses": ("StrategyError", "heads share a selection for hybrid, topk_block only"),
    "no_weights": ("ParameterError", "does not take return_weights="),
}


@pytest.mark.parametrize("world", WORLDS[1:])
def test_a_bad_call_raises_the_same_error_on_every_rank(reports, world):
    reps = reports(world)
    for name, (kind, words) in EXPECTED.items():
        messages = {rep["errors"][name] for rep in reps}
        assert len(messages) == 1, f"{name}: the ranks raised different errors: {messages}"
        (message,) = messages
        assert message.startswith(kind + ":") and words in message, f"{name}: {message}"
    for rep in reps:
        assert rep["errors"]["after_errors"] == "ok", f"rank {rep['rank']}: {rep['errors']['after_errors']}"


@pytest.mark.parametrize("world", WORLDS[1:])
def test_a_missing_rank_makes_the_others_fail_by_timeout(reports, world):
    hang = reports(world)[0]["hang"]
    assert hang["error"] is not None, "the call returned although another rank never joined it"
    assert "Timed out" in hang["error"] or "timeout" in hang["error"].lower(), hang["error"]
    assert hang["seconds"] < 15, f"failed only after {hang['seconds']:.1f} s with a 2 s group timeout"


def test_the_single_process_path_never_imports_distributed():
    import sparse_linear_attn as sla

    package = Path(sla.__file__).parent
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel.startswith(("distributed/", "bench/distributed.py")):
            continue  # the package itself, and the benchmark tool on top of it
        imported = imported_modules(path, package)
        assert not any(m.startswith("sparse_linear_attn.distributed") for m in imported), f"{rel} imports it"


def test_sla_bench_distributed_records_time_memory_and_bytes(tmp_path):
    import json

    from sparse_linear_attn.bench.cli import main

    argv = ["distributed", "--worlds", "1,2", "--seq-len", "64", "--heads", "2", "--head-dim", "8"]
    argv += ["--variants", "full:strategy=ring", "sliding_window:window=4,strategy=halo", "--repeats", "1"]
    assert main([*argv, "--out", str(tmp_path), "--timeout", "60"]) == 0
    records = [json.loads(line) for line in (tmp_path / "distributed.jsonl").read_text().splitlines()]
    assert {(r["variant"], r["world"], r["rank"]) for r in records} == {
        (v, w, r) for v in ("full [ring]", "sliding_window:window=4 [halo]") for w in (1, 2) for r in range(w)
    }
    for r in records:
        assert r["wall_ms"] > 0 and r["cpu_ms"] > 0 and r["peak_bytes"] is not None
        assert abs(r["counted_bytes"] - r["formula_bytes"]) < 2, r
        if r["socket_bytes"] is not None:  # Linux: what the process wrote to its sockets
            assert r["socket_bytes"] >= r["counted_bytes"], r
