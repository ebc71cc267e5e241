"""The examples run and keep their promise (cached generation equals uncached generation)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_generate_cached_equals_uncached(monkeypatch, capsys):
    # The script raises SystemExit naming any exact variant whose cached tokens differ.
    argv = ["generate.py", "--new-tokens", "6", "--prompt", "10", "--threads", "1", "--dtype", "float64"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLES / "generate.py"), run_name="__main__")
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) >= {"full", "sliding_window", "block_sparse", "linear", "performer", "topk_block", "hybrid"}
    assert all(rows[v] == "True" for v in ("full", "sliding_window", "block_sparse", "linear", "performer"))
    assert all(rows[v].endswith("%") for v in ("topk_block", "hybrid"))
