"""What this machine can run, and what a source file imports: shared by several test files."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def flex_compiles() -> str | None:
    """None when compiled FlexAttention runs on the CPU here, else the reason it does not
    (probed once per session: each probe compiles)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        x = torch.randn(1, 1, 128, 16)
        bm = create_block_mask(lambda b, h, i, j: j <= i, None, None, 128, 128, device="cpu")
        torch.compile(flex_attention, dynamic=False)(x, x, x, block_mask=bm)
        return None
    except Exception as e:  # no C++ compiler, unsupported platform...
        return f"FlexAttention does not compile here: {type(e).__name__}: {str(e)[:200]}"


def imported_modules(path: Path, package: Path) -> set[str]:
    """Absolute names of the modules (and ``module.name`` for ``from module import name``) a
    file of ``package`` imports."""
    here = list(path.relative_to(package.parent).with_suffix("").parts)[:-1]  # the file's package
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            out |= {module, *(f"{module}.{a.name}" for a in node.names)}
    return out
