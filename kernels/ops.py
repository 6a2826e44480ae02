"""The functions the engine calls. Each picks the Triton kernel for CUDA tensors
and the plain-torch reference otherwise, so the CPU path is the reference path."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from baton.kernels import activation, attention, fp8, kv_cache, logits, lora, moe, norm, rotary, sampling
from baton.kernels import linear as gemv

F = TypeVar("F", bound=Callable)


def _dispatch(kernel: F, ref: F) -> F:
    """``kernel`` when the first tensor argument is on a CUDA device, else ``ref``."""

    def call(*args, **kwargs):
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        return (kernel if first.is_cuda else ref)(*args, **kwargs)

    call.__name__, call.__doc__ = kernel.__name__, kernel.__doc__
    return call  # type: ignore[return-value]


gather_blocks = _dispatch(kv_cache.gather_blocks, kv_cache.ref_gather_blocks)
scatter_blocks = _dispatch(kv_cache.scatter_blocks, kv_cache.ref_scatter_blocks)
paged_attention = _dispatch(attention.paged_attention, attention.ref_paged_attention)
paged_decode_attention = _dispatch(attention.paged_decode_attention, attention.ref_paged_decode_attention)
rms_norm = _dispatch(norm.rms_norm, norm.ref_rms_norm)
rms_norm_fp8 = _dispatch(norm.rms_norm_fp8, norm.ref_rms_norm_fp8)
rotary_store_kv = _dispatch(rotary.rotary_store_kv, rotary.ref_rotary_store_kv)
act_and_mul = _dispatch(activation.act_and_mul, activation.ref_act_and_mul)
exponential_race = _dispatch(sampling.exponential_race, sampling.ref_exponential_race)
max_logsumexp = _dispatch(logits.max_logsumexp, logits.ref_max_logsumexp)
lora_shrink = _dispatch(lora.lora_shrink, lora.ref_lora_shrink)
lora_expand_add = _dispatch(lora.lora_expand_add, lora.ref_lora_expand_add)
fused_moe = _dispatch(moe.fused_moe, moe.ref_fused_moe)


def _gemv_rows(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dim() == 2 and x.shape[0] <= gemv.MAX_DISPATCH_ROWS


def _gemv_block_rows(x: torch.Tensor, block: tuple[int, int] | None) -> bool:
    """The GEMV's rows, and weights it scales itself: unscaled or per channel, or per block it takes."""
    return _gemv_rows(x) and (block is None or gemv.takes_block(block))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           weight_scale: torch.Tensor | None = None, block: tuple[int, int] | None = None,
           x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``x`` ``[M, K]`` @ ``weight`` ``[N, K]``.T + ``bias``: the Triton GEMV for CUDA inputs of at
    most ``MAX_DISPATCH_ROWS`` rows (decode steps), ``F.linear`` (cuBLAS on GPU) for anything else.
    With ``weight_scale``, ``weight`` is E4M3 (``kernels/fp8.py``): scaled per output channel, the GEMV,
    else on CUDA ``fp8.fp8_linear`` (cuBLAS's or Triton's FP8 GEMM), else the reference; scaled per
    ``block`` ``(bn, bk)`` (``weight_scale`` ``[ceil(N / bn), ceil(K / bk)]``), the GEMV where it takes
    the block (``gemv.takes_block``), else on CUDA ``fp8.block_fp8_linear`` (cuBLAS's or Triton's
    block-scaled FP8 GEMM), else the block reference. ``x_fp8``: ``x``'s rows quantized before
    (``rms_norm_fp8``: per token, for a ``block`` per group of ``bk``), taken as they are."""
    fp8.check_x_fp8(x_fp8, x, weight_scale, block)
    if weight_scale is None:
        return gemv.linear(x, weight, bias) if _gemv_rows(x) else gemv.ref_linear(x, weight, bias)
    if _gemv_block_rows(x, block):
        return gemv.linear(x, weight, bias, weight_scale, block, x_fp8)
    if block is not None:
        return (fp8.block_fp8_linear if x.is_cuda else fp8.ref_fp8_block_linear)(x, weight, weight_scale, block, bias,
                                                                                 x_fp8)
    return (fp8.fp8_linear if x.is_cuda else fp8.ref_fp8_linear)(x, weight, weight_scale, bias, x_fp8)


def qkv_rotary_store_kv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    weight_scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
    x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The fused q/k/v projection, then ``rotary_store_kv``: one GEMV launch where ``linear`` takes
    the GEMV (after the rows' quantization with FP8 weights, per channel or per block, unless
    ``x_fp8`` holds them), else the two ops. Returns the rotated query ``[tokens, heads, head_dim]``."""
    if _gemv_block_rows(x, block):
        return rotary.qkv_rotary_store_kv(x, weight, bias, positions, cos_sin_cache, kv_cache, slot_mapping, weight_scale,
                                          block, x_fp8)
    q, k, v = rotary.split_qkv(linear(x, weight, bias, weight_scale, block, x_fp8), kv_cache.shape[3], kv_cache.shape[4])
    return rotary_store_kv(positions, q, k, v, cos_sin_cache, kv_cache, slot_mapping)


def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 activation: str = "silu", weight_scale: torch.Tensor | None = None,
                 block: tuple[int, int] | None = None) -> torch.Tensor:
    """``linear(act_and_mul(x, activation), weight, bias, weight_scale, block)``: one GEMV launch where
    ``linear`` takes the GEMV (after the rows' quantization with FP8 weights, the activation made
    there); with FP8 weights on CUDA past the GEMV's rows, the rows' quantization (the activation
    made there) and the FP8 GEMM; else the two ops."""
    if _gemv_block_rows(x, block):
        return gemv.gated_linear(x, weight, bias, activation, weight_scale, block)
    if weight_scale is not None and x.is_cuda:
        if block is None:
            return fp8.fp8_linear(x, weight, weight_scale, bias, activation=activation)
        return fp8.block_fp8_linear(x, weight, weight_scale, block, bias, activation=activation)
    return linear(act_and_mul(x, activation), weight, bias, weight_scale, block)
