"""Paged decode attention (one query token per sequence), flash-decoding style.

One program handles every query head of one KV head group for one slice of a
sequence's context, so each KV tile is loaded once for the whole group. Long
contexts with few sequences are split over several programs (split-K); a second
kernel merges the partial results by their log-sum-exp. The split count depends
only on tensor shapes, never on tensor values, so the launch needs no host sync
and can be captured in a CUDA graph. A sequence of length 0 (batch padding) gets
zeros.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from baton.kernels.checks import check_attention_args, check_int_index


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters: keys per loop step, warps, pipeline depth, and how far to
    split the context (programs per SM to aim for, shortest split, most splits)."""

    tile_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 4
    min_split_tokens: int = 256
    max_splits: int = 64


DEFAULT_CONFIG = DecodeConfig()


@triton.jit
def _paged_decode_attention_kernel(
    q_ptr, kv_ptr, out_ptr, part_out_ptr, part_lse_ptr, seq_lens_ptr, tables_ptr,
    scale_log2, split_len,
    stride_q_seq, stride_q_head,
    stride_c_block, stride_c_kv, stride_c_tok, stride_c_head,
    stride_o_seq, stride_o_head,
    stride_t_seq,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * split_len
    end = tl.minimum(seq_len, start + split_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + d[None, :], mask=(g < GROUP)[:, None], other=0.0)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table = tables_ptr + seq * stride_t_seq
    head_off = kv_head.to(tl.int64) * stride_c_head
    for tile_start in range(start, end, TILE_N):
        pos = tile_start + tl.arange(0, TILE_N)
        valid = pos < end
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = block * stride_c_block + (pos % BLOCK_SIZE) * stride_c_tok + head_off
        k = tl.load(kv_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(kv_ptr + stride_c_kv + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        o_ptrs = out_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])
    else:
        safe_l = tl.where(l > 0, l, 1.0)
        lse = tl.where(l > 0, m + tl.math.log2(safe_l), float("-inf"))
        row_idx = (seq * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + row_idx[:, None] * HEAD_DIM + d[None, :], acc / safe_l[:, None], mask=(g < GROUP)[:, None])
        tl.store(part_lse_ptr + row_idx, lse, mask=g < GROUP)


@triton.jit
def _paged_decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_o_seq, stride_o_head,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Merge one head's split results, weighting each by its share of the softmax mass."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    row = (seq * NUM_HEADS + head) * NUM_SPLITS
    all_splits = tl.arange(0, SPLITS_PAD)
    lse_max = tl.max(tl.load(part_lse_ptr + row + all_splits, mask=all_splits < NUM_SPLITS, other=float("-inf")), 0)
    lse_max = tl.where(lse_max > float("-inf"), lse_max, 0.0)  # an empty sequence: every weight is 0
    acc = tl.zeros([HEAD_DIM], tl.float32)
    total = 0.0
    for first in tl.static_range(0, NUM_SPLITS, CHUNK):
        s = first + tl.arange(0, CHUNK)
        weight = tl.math.exp2(tl.load(part_lse_ptr + row + s, mask=s < NUM_SPLITS, other=float("-inf")) - lse_max)
        parts = tl.load(part_out_ptr + (row + s)[:, None] * HEAD_DIM + d[None, :], mask=(s < NUM_SPLITS)[:, None], other=0.0)
        acc += tl.sum(parts * weight[:, None], 0)
        total += tl.sum(weight, 0)
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + d, out.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def num_splits(device: torch.device, batch: int, num_kv_heads: int, max_context: int, config: DecodeConfig) -> int:
    """Split the context until about ``programs_per_sm`` programs per SM are busy,
    keeping each split at least ``min_split_tokens`` long."""
    wanted = math.ceil(config.programs_per_sm * _num_sms(device) / max(1, batch * num_kv_heads))
    return max(1, min(wanted, config.max_splits, math.ceil(max_context / config.min_split_tokens)))


def _check_decode_args(q: torch.Tensor, kv_cache: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor) -> None:
    check_attention_args(q, kv_cache)
    check_int_index("seq_lens", seq_lens, (q.shape[0],), kv_cache)
    check_int_index("block_tables", block_tables, (q.shape[0], -1), kv_cache)


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence (``q`` ``[batch, num_heads, head_dim]``) over its paged context."""
    return launch_paged_decode_attention(q, kv_cache, seq_lens, block_tables, scale, DEFAULT_CONFIG)


def launch_paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    config: DecodeConfig,
) -> torch.Tensor:
    """``paged_decode_attention`` with explicit launch parameters (benchmarks sweep them)."""
    _check_decode_args(q, kv_cache, seq_lens, block_tables)
    batch, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    out = torch.empty_like(q)
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    max_context = block_tables.shape[1] * block_size
    splits = num_splits(q.device, batch, num_kv_heads, max_context, config)
    split_len = triton.cdiv(triton.cdiv(max_context, splits), config.tile_n) * config.tile_n
    part_out = torch.empty((batch, num_heads, splits, head_dim) if splits > 1 else (0,), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, num_heads, splits) if splits > 1 else (0,), dtype=torch.float32, device=q.device)
    _paged_decode_attention_kernel[(batch, num_kv_heads, splits)](
        q, kv_cache, out, part_out, part_lse, seq_lens, block_tables,
        scale * math.log2(math.e), split_len,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE_N=config.tile_n, NUM_SPLITS=splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if splits > 1:
        _paged_decode_reduce_kernel[(batch, num_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), CHUNK=16,
        )
    return out
