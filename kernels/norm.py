"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch


def ref_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Normalize over the last dim. With ``residual``: ``x = x + residual`` first,
    and return ``(normed, x)`` so the sum becomes the next residual."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return normed if residual is None else (normed, x)
