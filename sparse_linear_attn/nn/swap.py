"""``sla.swap_attention``: replace every ``nn.MultiheadAttention`` in a model by ours."""

from __future__ import annotations

from torch import nn

from .multihead import AttentionSpec, MultiheadAttention


def swap_attention(
    model: nn.Module,
    attention: AttentionSpec = None,
    *,
    positional: str | None = None,
    dropout: float | None = None,
) -> nn.Module:
    """Replace, in place, every ``torch.nn.MultiheadAttention`` inside ``model`` by an
    ``sla.MultiheadAttention`` with the same configuration and weights running ``attention``
    (anything ``sla.build`` accepts, or a variant name). Returns the model (or the new layer
    if ``model`` itself is an ``nn.MultiheadAttention``).

    ``dropout=None`` keeps each layer's attention dropout; variants without a weight matrix
    (linear ones) need ``dropout=0.0``. ``positional`` adds RoPE/sinusoidal/ALiBi per layer.

    PyTorch's fused inference paths are kept from bypassing the variant: the new layers carry a
    forward pre-hook (which makes ``nn.TransformerEncoderLayer`` skip its fused path), and
    every ``nn.TransformerEncoder`` gets ``use_nested_tensor = False`` (no nested-tensor
    conversion; the layer would pad them back anyway).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_attention expects an nn.Module, got {type(model).__name__}")

    def convert(mha: nn.MultiheadAttention) -> MultiheadAttention:
        return MultiheadAttention.from_torch(mha, attention, positional=positional, dropout=dropout)

    if isinstance(model, nn.MultiheadAttention):
        return convert(model)
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.MultiheadAttention)
    ]
    if not targets:
        raise ValueError(
            f"swap_attention found no torch.nn.MultiheadAttention inside {type(model).__name__} "
            f"(layers already swapped are sla.MultiheadAttention and are left alone)"
        )
    converted: dict[int, MultiheadAttention] = {}  # a layer shared by several parents stays shared
    for parent, name, child in targets:
        if id(child) not in converted:
            converted[id(child)] = convert(child)
        setattr(parent, name, converted[id(child)])
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
    return model
