"""Smoke and behaviour tests of ``sla-bench`` on tiny sizes (the whole file runs in seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import sparse_linear_attn as sla
from sparse_linear_attn import registry
from sparse_linear_attn.backends.dispatch import check_backend
from sparse_linear_attn.bench.cli import main
from sparse_linear_attn.bench.runner import KEY_FIELDS, read_results, record_key
from sparse_linear_attn.bench.spec import (
    load_study,
    parse_seq_lens,
    parse_value,
    parse_variant_spec,
    variant_from_entry,
    variants_from_entry,
)
from sparse_linear_attn.errors import ParameterError, UnknownNameError

TINY = ["--heads", "2", "--head-dim", "8", "--repeats", "2", "--warmup", "0"]
FIELDS = set(KEY_FIELDS) | {
    "label",
    "status",
    "reason",
    "backend",
    "exact",
    "cost",
    "repeats_done",
    "first_call_ms",
    "time_ms_median",
    "time_ms_p25",
    "time_ms_p75",
    "time_ms_min",
    "time_ms_max",
    "peak_mem_mb",
    "mem_method",
    "avg_visible_keys",
    "flops",
    "flops_method",
    "tflops",
    "rel_error_vs_full",
    "error_reference",
    "rel_error_backend",
    "backend_reference",
    "error_note",
    "e2e_cosine",
    "e2e_cosine_min",
    "e2e_note",
    "env",
    "timestamp",
}
ENV_FIELDS = {"torch", "xformers", "sla", "python", "platform", "device_name", "cpu_count", "threads", "cuda"}

STATE = {"interrupt_at": None}


@pytest.fixture(scope="module", autouse=True)
def user_variants():
    """Variants that fail in known ways, registered for this module only."""

    @sla.register_variant("bench_oom")
    def bench_oom(q, k, v, *, causal, key_padding_mask, scale):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB (simulated)")

    @sla.register_variant("bench_boom")
    def bench_boom(q, k, v, *, causal, key_padding_mask, scale):
        raise RuntimeError("simulated kernel failure")

    @sla.register_variant("bench_zero")
    def bench_zero(q, k, v, *, causal, key_padding_mask, scale):
        return torch.zeros_like(q[..., : v.shape[-1]])

    @sla.register_variant("bench_interrupt")
    def bench_interrupt(q, k, v, *, causal, key_padding_mask, scale):
        if STATE["interrupt_at"] == q.shape[2]:
            raise KeyboardInterrupt  # what Ctrl-C or a kill mid-sweep does to the loop
        return torch.zeros_like(q)

    yield
    for name in ("bench_oom", "bench_boom", "bench_zero", "bench_interrupt"):
        sla.unregister_variant(name)


def test_variant_spec_parsing():
    assert parse_value("256") == 256 and isinstance(parse_value("256"), int)
    assert parse_value("1e-3") == 1e-3
    assert parse_value("true") is True and parse_value("none") is None
    assert parse_value("[1, 2]") == [1, 2] and parse_value("favor") == "favor"
    bv = parse_variant_spec("additive:hidden_dim=32,backend=module")
    assert (bv.name, dict(bv.params), bv.backend) == ("additive", {"hidden_dim": 32}, "module")
    assert bv.label == "additive:hidden_dim=32,backend=module"
    assert parse_variant_spec("full").params == {}
    with pytest.raises(UnknownNameError, match="full"):
        parse_variant_spec("ful")
    with pytest.raises(ParameterError, match="hidden_dim"):
        parse_variant_spec("additive:hiden_dim=3")
    with pytest.raises(UnknownNameError, match="'flex'"):
        parse_variant_spec("full:backend=flx")
    with pytest.raises(ParameterError, match="key=value"):
        parse_variant_spec("additive:32")
    assert parse_seq_lens("1k,2K,512") == [1024, 2048, 512]
    assert parse_seq_lens("256,1k,256,1024") == [256, 1024]  # each length measured once
    with pytest.raises(ParameterError, match="4x"):
        parse_seq_lens("4x")


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in sla.available_variants():
        assert f"{name}: " in out
    assert "O(N²·D)" in out and "devices=" in out and "xformers" in out


def test_run_schema_statuses_flops_errors_plots(tmp_path, capsys):
    n_big = 1 << 18  # the math backend would need ~0.8 TB here: predicted OOM, never run
    rc = main(
        [
            "run",
            "--variants",
            "full",
            "full:backend=math",
            "full:backend=xformers",
            "bench_oom",
            "bench_boom",
            "bench_zero",
            "dot_product",
            "--seq-lens",
            "16,48",
            "--causal",
            "--out",
            str(tmp_path),
            *TINY,
        ]
    )
    assert rc == 0
    recs = read_results(tmp_path / "results.jsonl")
    assert len(recs) == 7 * 2
    for r in recs:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert ENV_FIELDS <= set(r["env"])
        assert r["device"] == "cpu" and r["causal"] is True
    by = {(r["label"], r["n"]): r for r in recs}
    B, H, D = 1, 2, 8
    for n in (16, 48):
        full = by[("full", n)]
        assert full["status"] == "ok" and full["backend"] == "torch" and full["repeats_done"] == 2
        # Causal: query i sees i + 1 keys -> 4·B·H·D·N(N+1)/2 FLOPs.
        assert full["flops"] == pytest.approx(4 * B * H * D * n * (n + 1) / 2)
        assert full["avg_visible_keys"] == pytest.approx((n + 1) / 2)
        assert full["rel_error_backend"] < 1e-5 and full["time_ms_median"] > 0
        assert full["time_ms_min"] <= full["time_ms_median"] <= full["time_ms_max"]
        assert by[("full:backend=math", n)]["backend"] == "math"
        xf = by[("full:backend=xformers", n)]
        assert xf["status"] == "unsupported" and "cuda" in xf["reason"]
        assert by[("bench_oom", n)]["status"] == "oom"
        boom = by[("bench_boom", n)]
        assert boom["status"] == "error" and "simulated kernel failure" in boom["reason"]
        # Zero output: ‖0 − exact‖/‖exact‖ is exactly 1.
        assert by[("bench_zero", n)]["rel_error_vs_full"] == pytest.approx(1.0)
        # dot_product is compared with exact attention at its own scale (1), not 1/√D.
        assert by[("dot_product", n)]["rel_error_vs_full"] < 1e-5
    csv_lines = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(recs) and csv_lines[0].startswith("label,variant")
    out = capsys.readouterr().out
    assert "bench_boom" in out and "err vs full" in out  # the summary table

    # A predicted out-of-memory is recorded, not run, and the sweep goes on.
    rc = main(
        [
            "run",
            "--variants",
            "full:backend=math",
            "bench_zero",
            "--seq-lens",
            str(n_big),
            "--heads",
            "1",
            "--head-dim",
            "4",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path / "big"),
            "--no-plot",
            "--reference-max-n",
            "1024",
        ]
    )
    assert rc == 0
    big = {r["label"]: r for r in read_results(tmp_path / "big" / "results.jsonl")}
    assert big["full:backend=math"]["status"] == "oom" and "predicted" in big["full:backend=math"]["reason"]
    assert big["bench_zero"]["status"] == "ok" and big["bench_zero"]["rel_error_vs_full"] is None
    assert "reference_max_n" in big["bench_zero"]["error_note"]

    # `sla-bench plot` redraws from the file alone.
    assert main(["plot", str(tmp_path / "results.jsonl"), "--out", str(tmp_path / "replot")]) == 0
    assert (tmp_path / "replot" / "results.csv").read_text() == (tmp_path / "results.csv").read_text()
    pytest.importorskip("matplotlib")
    for folder in (tmp_path, tmp_path / "replot"):
        for png in ("time_vs_n.png", "memory_vs_n.png", "error_vs_n.png", "frontier_time.png"):
            p = folder / png
            assert p.stat().st_size > 5000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_after_interrupted_sweep(tmp_path):
    args = [
        "run",
        "--variants",
        "full",
        "bench_interrupt",
        "--seq-lens",
        "16,32,64",
        "--out",
        str(tmp_path),
        "--no-plot",
        *TINY,
    ]
    STATE["interrupt_at"] = 32
    assert main(args) == 130  # Ctrl-C: what was saved and how to resume, exit status 130
    path = tmp_path / "results.jsonl"
    first = read_results(path)
    assert [(r["variant"], r["n"]) for r in first] == [("full", 16), ("bench_interrupt", 16), ("full", 32)]
    with open(path, "a") as f:  # a kill in the middle of a write leaves a torn line
        f.write('{"variant": "bench_interrupt", "n": 3')
    STATE["interrupt_at"] = None
    assert main([*args, "--resume"]) == 0
    recs = read_results(path)
    keys = [record_key(r) for r in recs]
    assert len(keys) == len(set(keys)) == 6
    assert sorted((r["variant"], r["n"]) for r in recs) == sorted(
        (v, n) for v in ("full", "bench_interrupt") for n in (16, 32, 64)
    )
    assert [r["timestamp"] for r in recs[:3]] == [r["timestamp"] for r in first]  # not re-measured
    # Without --resume an earlier file is kept aside, never overwritten.
    assert main(args) == 0
    assert len(read_results(path)) == 6
    kept = [p for p in tmp_path.glob("results.*.jsonl")]
    assert len(kept) == 1 and len(read_results(kept[0])) == 6


def test_study_files(tmp_path, capsys):
    study = {
        "variants": ["full", {"variant": "full", "backend": "math"}],
        "seq_lens": [16],
        "heads": 2,
        "head_dim": 8,
        "repeats": 1,
        "warmup": 0,
        "out": str(tmp_path / "o"),
        "plot": False,
    }
    (tmp_path / "s.json").write_text(json.dumps(study))
    toml = "\n".join(
        [
            'variants = ["full"]',
            'seq_lens = "16"',
            "heads = 1",
            "head_dim = 4",
            "repeats = 1",
            f'out = "{tmp_path / "t"}"',
            "plot = false",
        ]
    )
    (tmp_path / "s.toml").write_text(toml)
    assert main(["run", "--config", str(tmp_path / "s.json")]) == 0
    assert [r["label"] for r in read_results(tmp_path / "o" / "results.jsonl")] == ["full", "full:backend=math"]
    # Command-line options override the file.
    assert main(["run", "--config", str(tmp_path / "s.toml"), "--seq-lens", "8,16"]) == 0
    assert [r["n"] for r in read_results(tmp_path / "t" / "results.jsonl")] == [8, 16]
    (tmp_path / "bad.yaml").write_text("variants: [full]\nseq_len: 4\n")
    assert main(["run", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "seq_len" in capsys.readouterr().err


def test_pareto_front():
    from sparse_linear_attn.bench.plot import pareto_front

    pts = [(1.0, 0.5), (2.0, 0.6), (3.0, 0.1), (0.5, 0.9), (3.0, 0.05), (4.0, 0.2)]
    assert pareto_front(pts) == [(0.5, 0.9), (1.0, 0.5), (3.0, 0.05)]


def test_backward_sweep(tmp_path):
    assert (
        main(
            [
                "run",
                "--variants",
                "full",
                "additive:hidden_dim=8",
                "--seq-lens",
                "16",
                "--backward",
                "--no-plot",
                "--out",
                str(tmp_path),
                *TINY,
            ]
        )
        == 0
    )
    full, additive = read_results(tmp_path / "results.jsonl")
    assert full["backward"] is True and full["status"] == "ok" and additive["status"] == "ok"
    assert full["flops"] == pytest.approx(3.5 * 4 * 1 * 2 * 16 * 16 * 8)  # forward + 2.5× backward
    assert "no exact reference" in additive["error_note"] and additive["rel_error_vs_full"] is None


STUDIES = sorted((Path(__file__).parent.parent / "benchmarks" / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_committed_studies_name_registered_variants_and_backends(path):
    """Every committed study names registered variants and backends, and builds its settings
    (every option checked) as `sla-bench run` would."""
    from sparse_linear_attn.bench.cli import _parser
    from sparse_linear_attn.bench.commands.run import settings_from_args

    study = load_study(path)
    assert study["variants"], f"{path.name} lists no variants"
    for entry in study["variants"]:
        for bench in variants_from_entry(entry):  # unknown variant or parameter: raises
            if bench.is_oracle:
                continue
            assert bench.name in sla.available_variants()
            check_backend(registry.get(bench.name), bench.backend)  # e.g. backend=xformers on a variant without it
    settings, _ = settings_from_args(_parser().parse_args(["run", "--config", str(path), "--device", "cpu"]))
    assert settings.variants and settings.study == path.name


def test_a_study_naming_an_unknown_variant_is_an_error(tmp_path):
    assert len(STUDIES) >= 2  # the glob above found the committed studies
    study = tmp_path / "renamed.yaml"
    study.write_text("variants:\n  - full\n  - sliding_windw:window=8\n")
    entries = load_study(study)["variants"]
    variant_from_entry(entries[0])
    with pytest.raises(UnknownNameError, match="'sliding_windw'. Did you mean 'sliding_window'"):
        variant_from_entry(entries[1])
    with pytest.raises(ParameterError, match="'windw'"):
        variant_from_entry({"variant": "sliding_window", "windw": 8})
    with pytest.raises(ValueError, match="has no 'flex' backend"):
        check_backend(registry.get("linear"), variant_from_entry("linear:backend=flex").backend)


def test_synthetic_inputs_have_their_shape_of_attention():
    from sparse_linear_attn.bench.inputs import make_inputs

    n = 256
    dist = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs().double()

    def stats(kind):
        q, k, v = make_inputs(kind, 1, 8, n, 32, seed=1)  # 8 heads: averages out one draw's luck
        w = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(32), dim=-1)
        return float((w * dist).sum(-1).mean()), float(w.topk(4, dim=-1).values.sum(-1).mean())

    rand_dist, rand_top = stats("random")
    local_dist, _ = stats("local")
    _, peaked_top = stats("peaked")
    assert local_dist < rand_dist / 3  # mass near the diagonal (~21 vs ~85 positions on average)
    assert peaked_top > 0.8 > 0.5 > rand_top  # a few keys take almost all the mass


def test_real_model_loader_on_short_text(tmp_path):
    from sparse_linear_attn.bench import real

    reason = real.missing_reason()
    if reason:
        pytest.skip(reason)
    q, k, v, note = real.real_qkv(40, layer=1)
    assert q.shape == k.shape == v.shape == (1, 12, 40, 32) and torch.isfinite(q).all()
    assert "all-MiniLM-L6-v2" in note
    cos, _ = real.e2e_cosine("full", {}, n=24)
    assert cos.shape == (4,) and float(cos.min()) > 0.99999
    # Unscaled scores change every layer: the end-to-end metric must see it.
    assert float(real.e2e_cosine("dot_product", {}, n=24)[0].mean()) < 0.999
    # Through the sweep: real shapes recorded, end-to-end cosine of the exact variant is 1.
    out = tmp_path / "real"
    threads = torch.get_num_threads()
    try:
        assert (
            main(
                [
                    "run",
                    "--inputs",
                    "real",
                    "--variants",
                    "full",
                    "--seq-lens",
                    "16",
                    "--repeats",
                    "1",
                    "--warmup",
                    "0",
                    "--no-plot",
                    "--threads",
                    "1",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    (rec,) = read_results(out / "results.jsonl")
    assert rec["env"]["threads"] == 1
    assert (rec["heads"], rec["head_dim"], rec["status"]) == (12, 32, "ok")
    assert rec["e2e_cosine"] > 0.99999 and "all-MiniLM-L6-v2" in rec["error_note"]
    # Two segments beyond 512 tokens: the first 512 positions equal a single-segment capture.
    q2, _, _, note2 = real.real_qkv(600, layer=1)
    q1, _, _, _ = real.real_qkv(512, layer=1)
    assert q2.shape[2] == 600 and "segments" in note2 and torch.equal(q2[:, :, :512], q1)


def test_real_encoder_matches_transformers_bert():
    from sparse_linear_attn.bench import real

    if real.missing_reason():
        pytest.skip(real.missing_reason())
    transformers = pytest.importorskip("transformers", reason="transformers is the independent reference")
    ids = real._chunks(20, 2)
    model = transformers.BertModel.from_pretrained(str(real._model_dir())).eval()
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    assert torch.allclose(real.encode(ids), ref, atol=1e-4, rtol=1e-4)


def test_visible_key_counts_against_brute_force(monkeypatch):
    from sparse_linear_attn.bench import flops
    from sparse_linear_attn.registry import Impl, VariantSpec, add, unregister_variant

    def brute(mask_of):
        return float(sum(sum(1 for j in range(nk) if mask_of(i, j)) for i in range(nq)) / nq)

    for nq, nk, w, causal in ((40, 40, 5, False), (40, 40, 5, True), (24, 40, 3, True), (1, 9, 100, False)):
        off = nk - nq

        def sees(i, j, off=off, w=w, causal=causal):
            p = i + off
            return p - w <= j <= (p if causal else p + w)

        got, _ = flops.avg_visible_keys("sliding_window", {"window": w}, nq, nk, causal)
        assert got == pytest.approx(brute(sees))
    for nq, nk in ((40, 40), (24, 40), (40, 24)):
        got, _ = flops.avg_visible_keys("full", {}, nq, nk, True)
        assert got == pytest.approx(brute(lambda i, j, nq=nq, nk=nk: j <= i + nk - nq))

    # A block-local exact pattern: dense count when small, fitted from smaller dense masks when large.
    def band_blocks(nq, nk, *, causal, block):
        bi = torch.arange(nq)[:, None] // block
        bj = torch.arange(nk)[None, :] // block
        return (bi - bj).abs() <= 1

    add(
        VariantSpec(
            name="bench_band",
            summary="test",
            exact=True,
            cost="O(N)",
            impls={"math": Impl(lambda *a, **k: None)},
            mask_fn=lambda nq, nk, causal: band_blocks(nq, nk, causal=causal, block=16),
        )
    )
    try:
        nq = nk = 512
        dense, how = flops.avg_visible_keys("bench_band", {}, 512, 512, False)
        expect = float(band_blocks(512, 512, causal=False, block=16).sum(-1).double().mean())
        assert how == "dense_mask" and dense == pytest.approx(expect)
        monkeypatch.setattr(flops, "DENSE_LIMIT", 1000)
        monkeypatch.setattr(flops, "FIT_LENGTHS", (128, 256, 384))
        flops._visible_cached.cache_clear()
        fitted, how = flops.avg_visible_keys("bench_band", {}, 512, 512, False)
        assert how.startswith("quadratic fit") and fitted == pytest.approx(expect, rel=1e-3)
        f = flops.count_flops(
            "bench_band", {}, batch=2, heads=3, nq=512, nk=512, head_dim=8, v_dim=8, causal=False, backward=True
        )
        assert f["flops"] == pytest.approx(4 * 2 * 3 * 512 * fitted * 8 * 3.5)
    finally:
        flops._visible_cached.cache_clear()
        unregister_variant("bench_band")


def test_plot_of_a_missing_results_file_says_so(tmp_path):
    from sparse_linear_attn.bench.plot import plot_results

    with pytest.raises(FileNotFoundError, match="no results file at"):
        plot_results(tmp_path / "nowhere")
