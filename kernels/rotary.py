"""Rotary position embedding (the "rotate half" / NeoX form used by Llama,
Mistral and Qwen). ``cos_sin_cache`` is ``[max_positions, rotary_dim]``: the
cosines in the first half of the last dim, the sines in the second."""

from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = cos.shape[-1]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half : 2 * half]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated, xf[..., 2 * half :]), dim=-1).to(x.dtype)


def ref_rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``query`` ``[tokens, heads, head_dim]`` and ``key`` ``[tokens, kv_heads, head_dim]``
    by ``positions`` ``[tokens]``; returns the rotated pair."""
    cos_sin = cos_sin_cache.index_select(0, positions.long()).float()
    cos, sin = cos_sin.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return _rotate(query, cos, sin), _rotate(key, cos, sin)
