"""Rotary position embedding (the "rotate half" / NeoX form used by Llama,
Mistral and Qwen). ``cos_sin_cache`` is ``[max_positions, rotary_dim]``: the
cosines in the first half of the last dim, the sines in the second. Dims past
``rotary_dim`` pass through unchanged."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.checks import check_device, check_dtype, check_int_index, check_last_dim_contiguous, check_shape


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, src_tok, src_head, dst_tok, dst_head, token, cos, sin,
                  NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr):
    """Rotate every head of one token (each head's row is contiguous)."""
    h = tl.arange(0, HEADS_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < NUM_HEADS) & (j < HALF)
    src = src_ptr + token * src_tok + h * src_head
    dst = dst_ptr + token * dst_tok + h * dst_head
    x1 = tl.load(src + j, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + j, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + j, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF + j, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
    if TAIL_PAD > 0:
        t = 2 * HALF + tl.arange(0, TAIL_PAD)[None, :]
        tail_mask = (h < NUM_HEADS) & (t < HEAD_DIM)
        tl.store(dst + t, tl.load(src + t, mask=tail_mask), mask=tail_mask)


@triton.jit
def _rotary_embedding_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr, q_out_ptr, k_out_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head,
    stride_qo_tok, stride_qo_head, stride_ko_tok, stride_ko_head, stride_cache,
    NUM_Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr, NUM_K_HEADS: tl.constexpr, K_HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    j = tl.arange(0, HALF_PAD)[None, :]
    cos = tl.load(cache_ptr + pos * stride_cache + j, mask=j < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, stride_q_tok, stride_q_head, stride_qo_tok, stride_qo_head, token, cos, sin,
                  NUM_Q_HEADS, Q_HEADS_PAD, HEAD_DIM, HALF, HALF_PAD, TAIL_PAD)
    _rotate_heads(k_ptr, k_out_ptr, stride_k_tok, stride_k_head, stride_ko_tok, stride_ko_head, token, cos, sin,
                  NUM_K_HEADS, K_HEADS_PAD, HEAD_DIM, HALF, HALF_PAD, TAIL_PAD)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``query`` ``[tokens, heads, head_dim]`` and ``key`` ``[tokens, kv_heads, head_dim]``
    by ``positions`` ``[tokens]``; returns the rotated pair."""
    num_tokens = query.shape[0] if query.dim() == 3 else -1
    head_dim = query.shape[-1]
    for name, t in (("query", query), ("key", key)):
        check_shape(name, t, (num_tokens, -1, head_dim))
        check_dtype(name, t)
        check_device(name, t, query)
        check_last_dim_contiguous(name, t)
    check_int_index("positions", positions, (num_tokens,), query)
    check_shape("cos_sin_cache", cos_sin_cache, (-1, -1))
    check_dtype("cos_sin_cache", cos_sin_cache)
    check_device("cos_sin_cache", cos_sin_cache, query)
    check_last_dim_contiguous("cos_sin_cache", cos_sin_cache)
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"cos_sin_cache width {rotary_dim} must be even and <= head_dim {head_dim}")
    q_out, k_out = torch.empty_like(query), torch.empty_like(key)
    if num_tokens == 0:
        return q_out, k_out
    half, tail = rotary_dim // 2, head_dim - rotary_dim
    _rotary_embedding_kernel[(num_tokens,)](
        positions, query, key, cos_sin_cache, q_out, k_out,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=query.shape[1], Q_HEADS_PAD=triton.next_power_of_2(query.shape[1]),
        NUM_K_HEADS=key.shape[1], K_HEADS_PAD=triton.next_power_of_2(key.shape[1]),
        HEAD_DIM=head_dim, HALF=half, HALF_PAD=triton.next_power_of_2(half),
        TAIL_PAD=triton.next_power_of_2(tail) if tail else 0,
    )
    return q_out, k_out


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
