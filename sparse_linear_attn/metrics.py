"""The approximation-error measure the whole project reports."""

from __future__ import annotations

import torch


def relative_error(approx: torch.Tensor, exact: torch.Tensor, *, per_head: bool = False) -> torch.Tensor:
    """``‖approx − exact‖_F / ‖exact‖_F`` computed in float64.

    With ``per_head=True`` the norms are taken over the last two dims separately for each
    leading index, giving a ``(B, H)`` tensor for ``(B, H, N, D)`` inputs. Returns a float64
    tensor (0-dim by default). Where ``exact`` is all zeros the error is 0 if ``approx`` is too,
    else ``inf``.
    """
    if approx.shape != exact.shape:
        raise ValueError(
            f"relative_error needs tensors of one shape, got {tuple(approx.shape)} and {tuple(exact.shape)}"
        )
    a = approx.detach().to(torch.float64)
    e = exact.detach().to(a.device, torch.float64)
    diff = a - e
    if per_head:
        if a.dim() < 2:
            raise ValueError(f"per_head=True needs at least 2 dims, got shape {tuple(a.shape)}")
        num = torch.linalg.vector_norm(diff.flatten(-2), dim=-1)
        den = torch.linalg.vector_norm(e.flatten(-2), dim=-1)
    else:
        num = torch.linalg.vector_norm(diff)
        den = torch.linalg.vector_norm(e)
    zero = den == 0
    out = num / torch.where(zero, torch.ones_like(den), den)
    return torch.where(zero, torch.where(num == 0, 0.0, float("inf")).to(out), out)
