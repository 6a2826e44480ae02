"""SwiGLU: ``silu(gate) * up`` on the fused gate/up projection output."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ref_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[tokens, 2 * inter]`` (gate then up) -> ``[tokens, inter]``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
