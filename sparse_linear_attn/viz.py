"""Render an attention mask or block layout to a PNG (matplotlib, an optional dependency).

    import sparse_linear_attn as sla
    from sparse_linear_attn.viz import save_mask_png
    save_mask_png(sla.dense_mask("block_sparse", 1024, 1024, causal=True, pattern="bigbird"),
                  "bigbird.png", title="bigbird, causal")

Install matplotlib with ``pip install matplotlib`` (or ``pip install sparse-linear-attn[plot]``).
"""

from __future__ import annotations

import os
from typing import Any

import torch


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "sparse_linear_attn.viz needs matplotlib, which is not installed; install it with "
            "`pip install matplotlib` (or `pip install sparse-linear-attn[plot]`)."
        ) from None
    return plt


def save_mask_png(
    mask: torch.Tensor,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    head: int = 0,
    max_pixels: int = 512,
    dpi: int = 100,
) -> str:
    """Save a bool mask ``(nq, nk)`` (or one head of ``(H, nq, nk)``) as a black-on-white PNG.

    Rows are queries, columns keys; black where a query may attend. Masks larger than
    ``max_pixels`` on a side are shown downsampled by block-wise "any" (a pixel is black if any
    entry it covers is), so thin diagonals stay visible. Returns the path written.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = type(mask).__name__ if not isinstance(mask, torch.Tensor) else f"tensor of dtype {mask.dtype}"
        raise ValueError(f"save_mask_png expects a bool tensor (nq, nk) or (H, nq, nk), got a {got}")
    if mask.dim() == 3:
        if not 0 <= head < mask.shape[0]:
            raise ValueError(f"head={head} is out of range for a mask with {mask.shape[0]} heads")
        mask = mask[head]
    if mask.dim() != 2:
        raise ValueError(f"save_mask_png expects a mask of shape (nq, nk) or (H, nq, nk), got {tuple(mask.shape)}")
    plt = _pyplot()
    img = _downsample(mask.cpu(), max_pixels)
    nq, nk = mask.shape
    fig, ax = plt.subplots(figsize=(4, 4 * nq / nk if nk else 4), dpi=dpi)
    ax.imshow(img.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest", extent=(0, nk, nq, 0), aspect="auto")
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    density = float(mask.float().mean())
    ax.set_title(f"{title + '  ' if title else ''}(density {density:.3f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)
    return os.fspath(path)


def save_layout_png(layout: torch.Tensor, path: str | os.PathLike, **kwargs: Any) -> str:
    """Save a block layout ``(nq_blocks, nk_blocks)`` (or ``(H, ...)``) as a PNG, one pixel per block."""
    return save_mask_png(layout, path, **kwargs)


def _downsample(mask: torch.Tensor, max_pixels: int) -> torch.Tensor:
    nq, nk = mask.shape
    f = max(1, -(-max(nq, nk) // max_pixels))
    if f == 1:
        return mask.float()
    pad_q, pad_k = (-nq) % f, (-nk) % f
    m = torch.nn.functional.pad(mask.float()[None, None], (0, pad_k, 0, pad_q))
    return torch.nn.functional.max_pool2d(m, f)[0, 0]


def render_named_patterns(
    out_dir: str | os.PathLike, *, n: int = 1024, block_size: int = 64, dpi: int = 60
) -> list[str]:
    """Write a PNG of every named sparse pattern (what docs/sparse.md shows); returns the paths."""
    import sparse_linear_attn as sla
    from sparse_linear_attn.patterns import PATTERNS

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for causal in (False, True):
        tag = "causal" if causal else "bidirectional"
        m = sla.dense_mask("sliding_window", n, n, causal=causal, window=128)
        written.append(
            save_mask_png(
                m, os.path.join(out_dir, f"sliding_window_{tag}.png"), title=f"sliding_window w=128, {tag}", dpi=dpi
            )
        )
    for pattern in PATTERNS:
        m = sla.dense_mask("block_sparse", n, n, causal=True, pattern=pattern, block_size=block_size)
        written.append(
            save_mask_png(
                m,
                os.path.join(out_dir, f"block_sparse_{pattern}.png"),
                title=f"{pattern}, bs={block_size}, causal",
                dpi=dpi,
            )
        )
    return written


if __name__ == "__main__":  # python -m sparse_linear_attn.viz docs/img
    import sys

    for p in render_named_patterns(sys.argv[1] if len(sys.argv) > 1 else "docs/img"):
        print(p)
