"""sparse_linear_attn — efficient long-sequence attention behind one API.

    import sparse_linear_attn as sla
    out = sla.attention(q, k, v, "sliding_window", window=256, causal=True)
    layer = sla.build({"variant": "performer", "num_features": 256})
    cache = sla.make_cache("linear", batch=1, kv_heads=8, head_dim=64)   # incremental decoding

Shapes follow ``torch.nn.functional.scaled_dot_product_attention``: q ``(B, H, Nq, D)``,
k ``(B, Hkv, Nk, D)``, v ``(B, Hkv, Nk, Dv)``.
"""

from . import variants as _variants  # noqa: F401  (registers the built-in variants)
from .api import AttentionModule, attention, build, dense_mask
from .config import AttentionConfig
from .decoding import Cache, make_cache
from .estimators import available_estimators, register_estimator
from .feature_maps import available_feature_maps, register_feature_map
from .metrics import attention_recall, relative_error
from .nn import ALiBi, MultiheadAttention, RotaryEmbedding, SinusoidalPositionalEncoding, swap_attention
from .registry import available_variants, describe, register_variant, unregister_variant
from .selection import Selection, selection

__version__ = "0.1.0"


def __getattr__(name: str):
    # sla.distributed (context parallelism) and sla.testing (conformance checks) load on first
    # use: the single-process path never imports them.
    if name in ("distributed", "testing"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALiBi",
    "MultiheadAttention",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "swap_attention",
    "AttentionConfig",
    "AttentionModule",
    "Cache",
    "Selection",
    "attention",
    "attention_recall",
    "available_estimators",
    "available_feature_maps",
    "available_variants",
    "build",
    "dense_mask",
    "describe",
    "make_cache",
    "register_estimator",
    "register_feature_map",
    "register_variant",
    "relative_error",
    "selection",
    "unregister_variant",
]
