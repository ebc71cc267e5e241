"""Model building blocks: the multi-head layer, the swap helper and positional encodings."""

from .multihead import MultiheadAttention
from .positional import ALiBi, RotaryEmbedding, SinusoidalPositionalEncoding, alibi_slopes, apply_rope
from .swap import swap_attention

__all__ = [
    "ALiBi",
    "MultiheadAttention",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "alibi_slopes",
    "apply_rope",
    "swap_attention",
]
