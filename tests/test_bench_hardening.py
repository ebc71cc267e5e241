"""``sla-bench`` under hostile but realistic input (issue 15, items 4 and 10–15): broken results
files, bad lengths, bad output folders, badly typed study files, resuming with other settings,
lengths too long for memory, and Ctrl-C. Every case ends with one clear message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _trace import LargestTensor

from sparse_linear_attn.bench.cli import main
from sparse_linear_attn.bench.runner import read_results

TINY = ["--heads", "2", "--head-dim", "8", "--repeats", "1", "--warmup", "0", "--no-plot"]
ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path, *extra, variants=("full",), seq="16"):
    return main(["run", "--variants", *variants, "--seq-lens", seq, "--out", str(tmp_path), *TINY, *extra])


# --- item 4: results lines that are valid JSON but not records ---------------------------------


def test_resume_and_plot_skip_json_lines_that_are_not_records(tmp_path, capsys):
    assert _run(tmp_path) == 0
    path = tmp_path / "results.jsonl"
    good = path.read_text()
    path.write_text('[1, 2]\nnull\n{"foo": 1}\n"text"\n{"variant": "full", "n": "16"}\n' + good + "3\n")
    capsys.readouterr()
    assert len(read_results(path)) == 1
    err = capsys.readouterr().err
    for line in (1, 2, 3, 4, 5, 7):
        assert f"results.jsonl:{line} is not a sla-bench record" in err
    assert main(["plot", str(path), "--out", str(tmp_path / "p")]) == 0
    assert main(["plot", str(tmp_path)]) == 0  # a folder: the files go into it
    assert (tmp_path / "results.csv").is_file() and not (tmp_path.parent / "results.csv").exists()
    assert _run(tmp_path, "--resume", seq="16,32") == 0  # the record at 16 is kept, 32 is added
    assert [r["n"] for r in read_results(path)] == [16, 32]


# --- item 10: sequence lengths that are not whole numbers ---------------------------------------


@pytest.mark.parametrize("bad", ["inf", "1e400", "1.5", "0.4k", "nan", "-3", "0", "1e999999999999"])
def test_non_integer_sequence_lengths_are_refused(tmp_path, capsys, bad):
    assert _run(tmp_path, seq=bad) == 2
    err = capsys.readouterr().err
    assert "sequence length" in err and bad in err and "Traceback" not in err
    assert not (tmp_path / "results.jsonl").exists()


def test_whole_lengths_with_suffixes_are_accepted():
    from sparse_linear_attn.bench.spec import parse_seq_lens

    assert parse_seq_lens("1.5k,1e3,2k,0.5m,1024.0") == [1536, 1000, 2048, 524288, 1024]


# --- item 11: output folders that cannot be used ------------------------------------------------


def test_output_folder_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert _run(f) == 2
    err = capsys.readouterr().err
    assert "is an existing file" in err and "Traceback" not in err
    assert main(["plot", str(_results(tmp_path)), "--out", str(f)]) == 2
    assert "is an existing file" in capsys.readouterr().err


def _results(tmp_path):
    out = tmp_path / "res"
    assert _run(out) == 0
    return out / "results.jsonl"


def test_results_path_that_is_a_folder(tmp_path, capsys):
    (tmp_path / "results.jsonl").mkdir()
    assert _run(tmp_path) == 2
    assert "is a folder, not a results file" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_output_folder_that_cannot_be_created_or_written(tmp_path, capsys):
    if os.geteuid() != 0:  # permissions stop an ordinary user
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        targets = [(ro, "not writable"), (ro / "sub", "cannot create")]
    elif Path("/sys/kernel").is_dir():  # they do not stop root; sysfs does
        targets = [(Path("/sys/kernel"), "not writable"), (Path("/sys/sla-bench-test"), "cannot create")]
    else:
        pytest.skip("no folder here that this user cannot write")
    for target, message in targets:
        assert _run(target) == 2
        err = capsys.readouterr().err
        assert message in err and str(target) in err and "Traceback" not in err


# --- item 12: every option of a study checked before the first point ----------------------------


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("causal", "false", "causal: expected true or false, got str 'false' (write true or false without quotes)"),
        ("temperature", "2", "temperature: expected a number, got str '2'"),
        ("backward", "yes", "backward: expected true or false"),
        ("plot", "false", "plot: expected true or false"),
        ("repeats", 2.5, "repeats: expected an int >= 1, got float 2.5"),
        ("inputs", ["local", "bogus"], "inputs: expected one of random, local, peaked, real, got 'bogus'"),
        ("seed", 2**64, "seed: expected an int < 2^63"),
        ("max_time_per_point", 0, "max_time_per_point: expected a finite number > 0"),
        ("texts", "/nonexistent/docs.txt", "texts: no text file at"),
        ("seq_lens", {"a": 1}, "seq_lens"),
    ],
)
def test_study_option_types_are_checked_before_the_first_point(tmp_path, capsys, option, value, message):
    study = {
        "variants": ["full"],
        "seq_lens": [16],
        "heads": 2,
        "head_dim": 8,
        "out": str(tmp_path / "o"),
        option: value,
    }
    (tmp_path / "s.json").write_text(json.dumps(study))
    assert main(["run", "--config", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing ran, nothing was written


def test_every_bad_option_is_named_at_once(tmp_path, capsys):
    study = {"variants": ["full"], "causal": "no", "temperature": "2", "repeats": 0, "out": str(tmp_path)}
    (tmp_path / "s.json").write_text(json.dumps(study))
    assert main(["run", "--config", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert "causal:" in err and "temperature:" in err and "repeats:" in err


# --- item 13: --resume with other settings ------------------------------------------------------


def test_resume_with_other_settings_is_refused_naming_the_setting(tmp_path, capsys):
    assert _run(tmp_path, "--threads", "1") == 0
    before = (tmp_path / "results.jsonl").read_text()
    capsys.readouterr()
    assert _run(tmp_path, "--threads", "1", "--resume", "--repeats", "2") == 2
    err = capsys.readouterr().err
    assert "repeats: 1 in the file, 2 now" in err and "--resume" in err
    assert _run(tmp_path, "--threads", "2", "--resume") == 2
    assert "threads: 1 in the file, 2 now" in capsys.readouterr().err
    assert (tmp_path / "results.jsonl").read_text() == before  # untouched
    # Another study into the same folder.
    study = {"variants": ["full"], "seq_lens": [16], "heads": 2, "head_dim": 8, "repeats": 1, "warmup": 0,
             "threads": 1, "plot": False, "out": str(tmp_path)}  # fmt: skip
    (tmp_path / "other.json").write_text(json.dumps(study))
    assert main(["run", "--config", str(tmp_path / "other.json"), "--resume"]) == 2
    assert "study: None in the file, 'other.json' now" in capsys.readouterr().err
    # The same settings may add lengths and variants.
    assert _run(tmp_path, "--threads", "1", "--resume", variants=("full", "linear"), seq="16,32") == 0
    assert len(read_results(tmp_path / "results.jsonl")) == 4


# --- item 14: lengths whose memory would not fit ------------------------------------------------


def test_inputs_are_made_in_bounded_memory():
    from sparse_linear_attn.bench.inputs import make_inputs

    B, H, n, D = 1, 2, 1 << 15, 16
    for kind in ("random", "local", "peaked"):
        with LargestTensor() as mode:
            q, k, v = make_inputs(kind, B, H, n, D, causal=True)
        # Nothing bigger than one of the three outputs: no (N + taps)-long noise, no (N, 4, D) gather.
        assert mode.largest <= B * H * n * D, kind
        assert q.shape == (B, H, n, D) and torch.isfinite(q).all()


def test_points_that_would_not_fit_are_refused_before_allocating(tmp_path, monkeypatch):
    from sparse_linear_attn.bench import runner

    monkeypatch.setattr(runner, "available_bytes", lambda device: 64 << 20)
    n = 1 << 20  # inputs alone: 3 × 1M × 2 heads × 8 dims × 4 bytes = 192 MiB
    with LargestTensor() as mode:
        assert _run(tmp_path, variants=("full", "sliding_window:window=4"), seq=str(n)) == 0
    assert mode.largest < n  # the inputs were never made
    for rec in read_results(tmp_path / "results.jsonl"):
        assert rec["status"] == "oom" and rec["reason"].startswith("predicted: the inputs need")

    # Inputs that fit, a variant whose own model does not: taylor features are N × (1 + D + D²).
    monkeypatch.setattr(runner, "available_bytes", lambda device: 256 << 20)
    out = tmp_path / "taylor"
    args = ["--heads", "4", "--head-dim", "32", "--reference-max-n", "1024"]
    assert _run(out, *args, variants=("linear:feature_map=taylor", "sliding_window:window=4"), seq="8192") == 0
    taylor, sw = read_results(out / "results.jsonl")
    assert taylor["status"] == "oom" and "kernelized: features" in taylor["reason"] and "M=1057" in taylor["reason"]
    assert taylor["time_ms_median"] is None
    assert sw["status"] == "ok" and sw["predicted_mem_mb"] > sw["peak_mem_mb"]


def test_memory_models_cover_what_the_variants_allocate():
    """Each model bounds the largest tensor the call allocates (the tracer sees every op's
    output); for the dense ``math`` backend at this N its N² term is what does it."""
    import sparse_linear_attn as sla
    from sparse_linear_attn.bench.memory import predict_call_bytes

    B, H, n, D = 1, 2, 4096, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
    cases = [("full", {}, "torch"), ("full", {}, "math"), ("sliding_window", {"window": 64}, "torch"),
             ("block_sparse", {}, "torch"), ("linear", {}, "torch"), ("performer", {"num_features": 64}, "torch"),
             ("linear", {"feature_map": "taylor"}, "torch")]  # fmt: skip
    for name, params, backend in cases:
        with LargestTensor() as mode, torch.no_grad():
            sla.attention(q, k, v, name, backend=backend, causal=True, **params)
        need, _ = predict_call_bytes(name, params, backend, batch=B, heads=H, n=n, head_dim=D, elem=4, backward=False)
        assert 4 * mode.largest <= need, (name, backend)
        if backend == "math":
            assert 4 * mode.largest > 64 << 20  # the N×N scores, far above any constant term


# --- item 15: Ctrl-C ----------------------------------------------------------------------------


def test_ctrl_c_says_what_was_saved_and_how_to_resume(tmp_path):
    """A real SIGINT to a running sweep: exit status 130, no traceback, the resume command."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sparse_linear_attn.bench", "run", "--variants", "full", "linear",
           "--seq-lens", "64,128,256,512,1k,2k,4k,8k", "--repeats", "50", "--max-time-per-point", "60",
           "--heads", "2", "--head-dim", "8", "--no-plot", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 1:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr and "interrupted" in stderr
    saved = len(read_results(results))
    assert saved >= 1 and f"holds {saved} record(s)" in stderr
    assert "Resume with:" in stderr and "--resume" in stderr.splitlines()[-1] and str(out) in stderr


def test_gpu_check_script_refuses_bad_arguments(tmp_path):
    """The one-command GPU run (its full dry run takes minutes; docs/benchmarks.md): bad calls
    stop at once with a message, before touching anything."""
    script = ROOT / "scripts" / "gpu-check.sh"
    for args, message in (([], "usage"), ([str(tmp_path), "--bogus"], "usage")):
        proc = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr
    f = tmp_path / "file"
    f.write_text("x")
    proc = subprocess.run(["bash", str(script), str(f)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is a file" in proc.stderr
