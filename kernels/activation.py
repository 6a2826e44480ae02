"""Gated MLP activations on the fused gate/up projection output: SwiGLU (``silu(gate) * up``,
Llama) and GeGLU (``gelu_tanh(gate) * up``, Gemma), picked by transformers' ``hidden_act`` name."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from baton.kernels import pdl
from baton.kernels.checks import check_dtype, check_last_dim_contiguous

_BLOCK = 1024

# The ``hidden_act`` names the kernels take, each with its torch function (the references').
_TORCH_ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh")}
ACTIVATIONS = tuple(_TORCH_ACTIVATIONS)


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")


@triton.jit
def silu_mul(gate, up, dtype: tl.constexpr):
    """``silu(gate) * up`` in ``dtype``, rounded as a ``dtype`` silu then product would be."""
    gate, up = gate.to(tl.float32), up.to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    return (silu * up).to(dtype)


@triton.jit
def gelu_tanh_mul(gate, up, dtype: tl.constexpr):
    """``gelu(gate, approximate="tanh") * up`` in ``dtype``, rounded as a ``dtype`` gelu then product
    would be. ``0.5 * (1 + tanh(u))`` is ``sigmoid(2u)``, taken from ``exp(-2|u|)``: an exp the
    interpreter runs too (unlike libdevice's tanh) that cannot overflow, where ``exp(-2u)`` would
    past |gate| of about 10."""
    gate, up = gate.to(tl.float32), up.to(tl.float32)
    u = 0.7978845608028654 * gate * (1.0 + 0.044715 * gate * gate)  # sqrt(2 / pi) * (gate + 0.044715 * gate**3)
    e = tl.exp(-2.0 * tl.abs(u))
    gelu = (gate * tl.where(u >= 0, 1.0, e) / (1.0 + e)).to(dtype).to(tl.float32)
    return (gelu * up).to(dtype)


@triton.jit
def act_mul(gate, up, dtype: tl.constexpr, ACTIVATION: tl.constexpr):
    """``silu_mul`` or ``gelu_tanh_mul`` by the ``ACTIVATION`` name; one is compiled, not both."""
    if ACTIVATION == "gelu_pytorch_tanh":
        out = gelu_tanh_mul(gate, up, dtype)
    else:
        out = silu_mul(gate, up, dtype)
    return out


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, act_mul(gate, up, out_ptr.dtype.element_ty, ACTIVATION), mask=mask)


def act_and_mul(x: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``x`` ``[tokens, 2 * inter]`` (gate then up) -> ``activation(gate) * up`` ``[tokens, inter]``;
    ``activation`` is one of ``ACTIVATIONS``."""
    check_activation(activation)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dim (gate then up), got shape {list(x.shape)}")
    check_dtype("x", x)
    check_last_dim_contiguous("x", x)
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter)
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    if out.numel():
        _act_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, _BLOCK))](
            x2, out, x2.stride(0), out.stride(0), inter, ACTIVATION=activation, BLOCK=_BLOCK, **pdl.launch_options(x))
    return out.view(*x.shape[:-1], inter)


def ref_act_and_mul(x: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``x`` ``[tokens, 2 * inter]`` (gate then up) -> ``[tokens, inter]``, as transformers'
    ``ACT2FN[activation](gate) * up``: the activation in ``x``'s dtype, then the product."""
    check_activation(activation)
    gate, up = x.chunk(2, dim=-1)
    return _TORCH_ACTIVATIONS[activation](gate) * up
