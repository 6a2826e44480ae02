"""SwiGLU: ``silu(gate) * up`` on the fused gate/up projection output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from baton.kernels import pdl
from baton.kernels.checks import check_dtype, check_last_dim_contiguous

_BLOCK = 1024


@triton.jit
def silu_mul(gate, up, dtype: tl.constexpr):
    """``silu(gate) * up`` in ``dtype``, rounded as a ``dtype`` silu then product would be."""
    gate, up = gate.to(tl.float32), up.to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    return (silu * up).to(dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, silu_mul(gate, up, out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[tokens, 2 * inter]`` (gate then up) -> ``[tokens, inter]``."""
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dim (gate then up), got shape {list(x.shape)}")
    check_dtype("x", x)
    check_last_dim_contiguous("x", x)
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter)
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    if out.numel():
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, _BLOCK))](
            x2, out, x2.stride(0), out.stride(0), inter, BLOCK=_BLOCK, **pdl.launch_options(x))
    return out.view(*x.shape[:-1], inter)


def ref_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[tokens, 2 * inter]`` (gate then up) -> ``[tokens, inter]``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
