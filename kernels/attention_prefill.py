"""Paged prefill attention: each sequence's new query tokens (the last ``q_len``
positions of its ``seq_len``-token context) attend causally over the whole paged
context, cached prefix included.

Programs are (query head, query tile). Sequence ``i`` owns the tile ids from
``cu_query_lens[i] // BLOCK_M + i``, so the grid ``num_tokens // BLOCK_M + batch``
covers every tile without reading lengths on the host; each program finds its
sequence by binary search. Keys before a tile's first query position need no
causal mask, so the loop is split into an unmasked and a masked part. With a sliding
window (``attention_options``) the loop starts at the first key a row of the tile sees,
and keys that only some rows' windows hold take the masked part too: a long context
costs a window's work.

Each tile's cache block ids are loaded one tile ahead and once per block (not per
key): with the ids loaded in the same loop step as the K/V they address, Triton
keeps one K/V tile in flight instead of ``num_stages - 1``. On an H200 this took the
4k-token prompt of the Llama-3-8B shape from 343 to 402 TFLOP/s
(``bench/results/kernels_h200.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from baton.kernels.attention_options import softcap_log2, window_and_softcap
from baton.kernels.checks import check_attention_args, check_int_index
from baton.kernels.kv_dtype import dot_fp16, to_dot_dtype


@triton.jit
def _block_ids(table, tile_start, seq_len, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The cache block of each of the ``BLOCK_N`` keys from ``tile_start`` (0 from ``seq_len``
    on): one table load per cache block, broadcast to its keys."""
    NUM_IDS: tl.constexpr = BLOCK_N // BLOCK_SIZE if BLOCK_N > BLOCK_SIZE else 1
    index = tile_start // BLOCK_SIZE + tl.arange(0, NUM_IDS)
    ids = tl.load(table + index, mask=index * BLOCK_SIZE < seq_len, other=0)
    return tl.reshape(tl.broadcast_to(ids[:, None], (NUM_IDS, BLOCK_N // NUM_IDS)), (BLOCK_N,))


@triton.jit
def _attend_range(
    q, acc, m, l, kv_ptr, table, head_off, q_pos, start, end, seq_len,
    stride_c_block, stride_c_kv, stride_c_tok, scale_log2,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Online softmax of a query tile over the keys ``start`` to ``end``, ``BLOCK_N`` a step
    (``MASKED``: causally, and within each row's ``WINDOW`` where that is not 0; scores capped
    at ``SOFTCAP`` where that is not 0). Block ids run one tile ahead, so no K/V load waits for
    a load of its own step and the pipeliner keeps ``num_stages - 1`` K/V tiles in flight."""
    d = tl.arange(0, HEAD_DIM)
    next_block = _block_ids(table, start, seq_len, BLOCK_SIZE, BLOCK_N)
    for tile_start in range(start, end, BLOCK_N):
        block = next_block
        next_block = _block_ids(table, tile_start + BLOCK_N, seq_len, BLOCK_SIZE, BLOCK_N)
        pos = tile_start + tl.arange(0, BLOCK_N)
        row = block.to(tl.int64) * stride_c_block + (pos % BLOCK_SIZE) * stride_c_tok + head_off
        k = tl.load(kv_ptr + row[:, None] + d[None, :]).to(q.dtype)
        v = tl.load(kv_ptr + stride_c_kv + row[:, None] + d[None, :]).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SOFTCAP > 0:
            s = softcap_log2(s * scale_log2, SOFTCAP)
            s_scale = 1.0
        else:
            s_scale = scale_log2
        if MASKED:
            seen = (pos[None, :] <= q_pos[:, None]) & (pos < seq_len)[None, :]
            if WINDOW > 0:
                seen = seen & (pos[None, :] > q_pos[:, None] - WINDOW)
            s = tl.where(seen, s, float("-inf"))
        # Scale inside the exponent: one fused multiply-add per score.
        m_new = tl.maximum(m, tl.max(s, 1) * s_scale)
        m_sub = m_new
        if WINDOW > 0:
            if MASKED:
                # A row whose window starts past this tile has seen no key yet: subtract 0, not -inf (NaN).
                m_sub = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.math.exp2(s * s_scale - m_sub[:, None])
        alpha = tl.math.exp2(m - m_sub)
        l = l * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m = m_new
    return acc, m, l


@triton.jit
def _find_sequence(cu_query_lens_ptr, num_seqs, tile_id, BLOCK_M: tl.constexpr):
    """Sequence ``i`` owns tiles from ``cu_query_lens[i] // BLOCK_M + i``: binary search for ``tile_id``."""
    lo = tile_id * 0
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(cu_query_lens_ptr + mid) // BLOCK_M + mid
        if first_tile <= tile_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# The batch's size, its block tables' width and the index tensors' addresses change from step
# to step: specialising on them compiled new variants in the middle of serving, each one
# stalling every request in flight.
@triton.jit(do_not_specialize=["num_seqs", "stride_t_seq"],
            do_not_specialize_on_alignment=["cu_query_lens_ptr", "seq_lens_ptr", "tables_ptr"])
def _paged_attention_kernel(
    q_ptr, kv_ptr, out_ptr, cu_query_lens_ptr, seq_lens_ptr, tables_ptr,
    num_seqs, scale_log2,
    stride_q_tok, stride_q_head,
    stride_c_block, stride_c_kv, stride_c_tok, stride_c_head,
    stride_o_tok, stride_o_head,
    stride_t_seq,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP16: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # Heads vary fastest and the last tiles (the longest causal rows) start first.
    head = tl.program_id(0)
    tile_id = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = _find_sequence(cu_query_lens_ptr, num_seqs, tile_id, BLOCK_M)
    q_start = tl.load(cu_query_lens_ptr + seq)
    q_len = tl.load(cu_query_lens_ptr + seq + 1) - q_start
    tile = tile_id - (q_start // BLOCK_M + seq)
    if tile * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        context_len = seq_len - q_len
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        d = tl.arange(0, HEAD_DIM)
        tokens = (q_start + rows).to(tl.int64)
        q = tl.load(q_ptr + tokens[:, None] * stride_q_tok + head * stride_q_head + d[None, :], mask=row_ok[:, None], other=0.0)
        q = to_dot_dtype(q, DOT_FP16)
        q_pos = context_len + rows

        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        table = tables_ptr + seq.to(tl.int64) * stride_t_seq
        head_off = (head // GROUP).to(tl.int64) * stride_c_head
        # Keys before the tile's first query position are visible to every row of the tile.
        unmasked_end = (context_len + tile * BLOCK_M) // BLOCK_N * BLOCK_N
        end = tl.minimum(seq_len, context_len + (tile + 1) * BLOCK_M)
        if WINDOW > 0:
            # The loop starts at the tile boundary before the first row's window. Keys from the
            # last row's window start to the first row's position are in every row's window,
            # those before it in only some.
            start = tl.maximum(context_len + tile * BLOCK_M - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
            unmasked_start = tl.minimum(tl.cdiv(tl.maximum(end - WINDOW, 0), BLOCK_N) * BLOCK_N, unmasked_end)
            acc, m, l = _attend_range(
                q, acc, m, l, kv_ptr, table, head_off, q_pos, start, unmasked_start, seq_len,
                stride_c_block, stride_c_kv, stride_c_tok, scale_log2,
                BLOCK_SIZE, BLOCK_N, HEAD_DIM, True, DOT_PRECISION, WINDOW, SOFTCAP,
            )
        else:
            unmasked_start = 0
        acc, m, l = _attend_range(
            q, acc, m, l, kv_ptr, table, head_off, q_pos, unmasked_start, unmasked_end, seq_len,
            stride_c_block, stride_c_kv, stride_c_tok, scale_log2,
            BLOCK_SIZE, BLOCK_N, HEAD_DIM, False, DOT_PRECISION, WINDOW, SOFTCAP,
        )
        acc, m, l = _attend_range(
            q, acc, m, l, kv_ptr, table, head_off, q_pos, unmasked_end, end, seq_len,
            stride_c_block, stride_c_kv, stride_c_tok, scale_log2,
            BLOCK_SIZE, BLOCK_N, HEAD_DIM, True, DOT_PRECISION, WINDOW, SOFTCAP,
        )
        out = acc / l[:, None]
        o_ptrs = out_ptr + tokens[:, None] * stride_o_tok + head * stride_o_head + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters: query rows and keys per tile, warps, pipeline depth."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_config(q: torch.Tensor) -> PrefillConfig:
    """Tiles from the H200 sweeps (bench/results/kernels_h200.md): 128 x 128 with 8 warps at head
    dim 128 (399-461 TFLOP/s at 4k-16k tokens); 64 x 64 with 4 warps at head dims up to 64, where
    the larger tile was 1.13-1.57x slower on every Llama-3.2-1B case of the sweep (16 prompts of
    512 tokens: 131 against 84 us)."""
    if q.device.type != "cuda":
        return PrefillConfig(32, 32, 4, 1)
    if q.dtype == torch.float32 or q.shape[-1] > 128:
        return PrefillConfig(64, 32, 4, 2)
    if q.shape[-1] <= 64:
        return PrefillConfig(64, 64, 4, 3)
    return PrefillConfig(128, 128, 8, 3)


def _check_prefill_args(q: torch.Tensor, kv_cache: torch.Tensor, cu_query_lens: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor) -> None:
    check_attention_args(q, kv_cache)
    batch = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    check_int_index("seq_lens", seq_lens, (batch,), kv_cache)
    check_int_index("cu_query_lens", cu_query_lens, (batch + 1,), kv_cache)
    check_int_index("block_tables", block_tables, (batch, -1), kv_cache)


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    cu_query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its paged context."""
    return launch_paged_attention(q, kv_cache, cu_query_lens, seq_lens, block_tables, scale, default_config(q),
                                  sliding_window=sliding_window, softcap=softcap)


def launch_paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    cu_query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    config: PrefillConfig,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``paged_attention`` with explicit launch parameters (benchmarks sweep them)."""
    _check_prefill_args(q, kv_cache, cu_query_lens, seq_lens, block_tables)
    window, cap = window_and_softcap(sliding_window, softcap)
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    out = torch.empty_like(q)
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    grid = (num_heads, num_tokens // config.block_m + batch)
    _paged_attention_kernel[grid](
        q, kv_cache, out, cu_query_lens, seq_lens, block_tables,
        batch, scale * math.log2(math.e),
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", DOT_FP16=dot_fp16(q, kv_cache),
        WINDOW=window, SOFTCAP=cap,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
