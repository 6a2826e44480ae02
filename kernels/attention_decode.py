"""Paged decode attention (one query token per sequence, or a few: a generated token and
its speculative draft), flash-decoding style.

One program handles every query head of one KV head group for one slice of a
sequence's context, so each KV tile is loaded once for the whole group. Long
contexts with few sequences are split over several programs (split-K), as far as
one wave of resident programs allows; how heavy each program is (tile, warps,
pipeline depth) depends on how much of the batch that wave holds, and a few short
sequences take half-size tiles to split further. The launch
depends only on tensor shapes, never on tensor values, so it needs no host sync
and can be captured in a CUDA graph: the split count follows the block table's width,
and each sequence divides its own length among the splits (whole tiles, at least
the config's shortest split), so a short sequence in a wide table (a CUDA graph's,
sized for the longest context) still spreads over the wave. A sequence that fits in
one split is written directly; else
each split stores its partial result and log-sum-exp, and the last split of the
sequence to finish (counted on a per-device semaphore that it resets) merges them,
so there is no second launch. A sequence of length 0 (batch padding) gets zeros.

With ``query_len`` rows a sequence (a draft's verification) the program's tile holds every row
of its head group, ``query_len`` times the group's query heads, so each KV tile is still loaded
once for all of them; each row sees the keys up to its own position. Where the group's heads
alone pad the tile (16 rows at least), up to 16 / group rows cost no more than one.

With a sliding window of ``W`` keys (``attention_options``) a sequence attends only its
last ``W`` (with ``query_len`` rows, the last row's ``W`` and the ``query_len - 1`` keys before
them): its splits cover those, and the launch splits at most as many keys, so a long context
splits its window over the wave.

The semaphores are shared by every launch on a device: launches that may overlap
(on concurrent streams) must not both split. The first split launch on a device
allocates them, so it must not happen inside CUDA-graph capture (warm up first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from baton.kernels import pdl
from baton.kernels.attention_options import softcap_log2, window_and_softcap
from baton.kernels.checks import check_attention_args, check_int_index, num_sms
from baton.kernels.kv_dtype import dot_fp16, to_dot_dtype


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters: keys per loop step, warps, pipeline depth (3 keeps two KV
    tiles in flight, 2 one), how many programs fit an SM (the context is split until
    one wave of them is full), the shortest split, the most splits, how many
    partial-result elements each thread of the merge loads at once (a power of two),
    and how many of a split's first tiles (0 or a power of two) it asks L2 for while it
    waits for the kernel before (with programmatic dependent launch)."""

    tile_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 3
    min_split_tokens: int = 64
    max_splits: int = 32
    merge_per_thread: int = 128
    prefetch_tiles: int = 1

    @property
    def shortest_split(self) -> int:
        """``min_split_tokens`` rounded up to whole tiles: the fewest keys a sequence's split takes."""
        return triton.cdiv(self.min_split_tokens, self.tile_n) * self.tile_n


# The defaults by the largest head dim they serve: (two K/V tiles in flight per program,
# lighter programs). ``programs_per_sm`` is how many of a config's programs an H100 SM holds in the
# sm_90 compile of bf16 K/V, as ``default_config`` launches it (``test_kernels`` checks it): at head
# dim 64 the deep ones and the light one by shared memory (228 KB: 36 KB / 18.5 KB a program); at
# 128 the deep one (37 KB) and the light ones at 128 and 256 by registers (106-156 a thread;
# bench/results/kernels_h200.md has the sweep the configs were chosen from). At head dim 128 the deep
# programs take tiles of 32 keys: against 64, as many programs (three an SM), level or faster from
# one sequence of 2k keys to 48 of 2k, 26.6-26.8 against 27.2-27.3 us for one of 16k; one sequence
# of 256-512 keys up to 0.4 us slower (bench/results/kernels_h100.md, sixth round). Head dim 256
# (Gemma) is sized by shared memory alone, not swept: tiles of 32 keys hold the bytes of 64 at 128,
# where such programs fit an SM three times.
DEFAULT_CONFIGS: dict[int, tuple[DecodeConfig, DecodeConfig]] = {
    64: (DecodeConfig(64, 2, 3, programs_per_sm=6), DecodeConfig(32, 1, 3, programs_per_sm=11)),
    128: (DecodeConfig(32, 4, 3, programs_per_sm=3), DecodeConfig(64, 4, 2, programs_per_sm=4)),
    256: (DecodeConfig(32, 4, 3, programs_per_sm=3), DecodeConfig(32, 4, 2, programs_per_sm=3)),
}
# At head dim 128 over an 8-bit cache, tiles of twice the keys (a bf16 tile's bytes): within the
# wave 64, as the bf16 default's were before it took 32 (32 keys of fp8 took 1.14-1.17x the time of
# 64 for one sequence of 16-32k, sixth round); past it 128, two in flight, rather than the light
# programs' one tile of half those bytes: 0.72-0.75x their time at batch 64, 0.88-0.90x at 128
# (bench/results/kernels_h100.md, fp8 KV cache). Their registers (about 200 a thread past the wave)
# let an SM hold three and two.
FP8_CONFIGS_128: tuple[DecodeConfig, DecodeConfig] = (DecodeConfig(64, 4, 3, programs_per_sm=3),
                                                      DecodeConfig(128, 4, 3, programs_per_sm=2))


def default_config(batch: int, num_kv_heads: int, head_dim: int, max_context: int, device: torch.device,
                   kv_bytes: int = 2) -> DecodeConfig:
    """Two K/V tiles in flight per program while one wave of such programs holds a program
    for every sequence's KV heads (the context is then split to fill the wave); beyond
    that, lighter programs, so that more of the batch is resident at once (at head dim 128
    over a cache of ``kv_bytes`` 1, tiles of twice the keys: ``FP8_CONFIGS_128``). Where each split
    would be a single tile and the wave has room for more (a few short sequences: a chain of
    dependent loads per program, not bandwidth, sets the time), tiles of half the keys
    split the context twice as far. Head dims take the entry of the smallest head dim at least
    as large (the largest past them all)."""
    key = min((d for d in DEFAULT_CONFIGS if d >= head_dim), default=max(DEFAULT_CONFIGS))
    deep, light = FP8_CONFIGS_128 if kv_bytes == 1 and key == 128 else DEFAULT_CONFIGS[key]
    if batch * num_kv_heads > deep.programs_per_sm * num_sms(device):
        return light
    splits, split_len = split_context(device, batch, num_kv_heads, max_context, deep)
    if split_len == deep.tile_n:
        half = replace(deep, tile_n=deep.tile_n // 2, min_split_tokens=deep.tile_n // 2)
        if split_context(device, batch, num_kv_heads, max_context, half)[0] > splits:
            return half
    return deep


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines at ``ptrs``; nothing waits for them."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _merge_splits(
    part_out_ptr, part_lse_ptr, out_ptr, rows, head_ok, used,
    MERGE_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr, CHUNK: tl.constexpr,
):
    """Merge ``used`` split results of a head group (``rows`` index their first split),
    weighting each by its share of the softmax mass; other programs wrote them, so
    the loads skip L1."""
    d = tl.arange(0, HEAD_DIM)
    all_splits = tl.arange(0, SPLITS_PAD)
    lse = tl.load(part_lse_ptr + rows[:, None] + all_splits[None, :], mask=head_ok[:, None] & (all_splits < used)[None, :],
                  other=float("-inf"), cache_modifier=".cg")
    lse_max = tl.max(lse, 1)
    lse_max = tl.where(lse_max > float("-inf"), lse_max, 0.0)  # an empty sequence: every weight is 0
    acc = tl.zeros([MERGE_PAD, HEAD_DIM], tl.float32)
    total = tl.zeros([MERGE_PAD], tl.float32)
    for first in tl.static_range(0, SPLITS_PAD, CHUNK):
        s = first + tl.arange(0, CHUNK)
        ok = head_ok[:, None] & (s < used)[None, :]
        idx = rows[:, None] + s[None, :]
        weight = tl.math.exp2(tl.load(part_lse_ptr + idx, mask=ok, other=float("-inf"), cache_modifier=".cg") - lse_max[:, None])
        parts = tl.load(part_out_ptr + idx[:, :, None] * HEAD_DIM + d[None, None, :], mask=ok[:, :, None], other=0.0, cache_modifier=".cg")
        acc += tl.sum(parts * weight[:, :, None], 1)
        total += tl.sum(weight, 1)
    tl.store(out_ptr, (acc / tl.where(total > 0, total, 1.0)[:, None]).to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


# The split count is a value, not a constant, or eager steps and each batch size captured in a
# graph would compile a variant per count; the merge reads up to ``SPLITS_PAD``, fixed per
# config. It costs 0.1-0.2 us on short split launches (bench/results/kernels_h200.md, ninth round).
@triton.jit(do_not_specialize=["num_splits"])
def _paged_decode_attention_kernel(
    q_ptr, kv_ptr, out_ptr, part_out_ptr, part_lse_ptr, sem_ptr, seq_lens_ptr, tables_ptr,
    scale_log2, table_tokens, num_splits,
    stride_q_seq, stride_q_head,
    stride_c_block, stride_c_kv, stride_c_tok, stride_c_head,
    stride_o_seq, stride_o_head,
    stride_t_seq,
    GROUP: tl.constexpr, QUERY_LEN: tl.constexpr, ROWS_PAD: tl.constexpr, MERGE_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, SPLIT: tl.constexpr, SPLITS_PAD: tl.constexpr,
    CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP16: tl.constexpr, PDL: tl.constexpr,
    PREFETCH_KEYS: tl.constexpr, LINE: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    MIN_SPLIT: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # The length and the first block ids (step metadata) load while the kernel before,
    # which writes the queries and the newest K/V, may still run; then the queries.
    seq_len = tl.load(seq_lens_ptr + seq)
    # The keys any of the sequence's rows sees (the last row's WINDOW and the QUERY_LEN - 1 before it)
    # over the launch's splits, whole tiles, at least MIN_SPLIT a split.
    keys = tl.minimum(seq_len, WINDOW + QUERY_LEN - 1) if WINDOW > 0 else seq_len
    split_len = tl.maximum(tl.cdiv(tl.cdiv(keys, num_splits), TILE_N) * TILE_N, MIN_SPLIT)
    start = seq_len - keys + split * split_len
    table = tables_ptr + seq * stride_t_seq
    pos = start + tl.arange(0, TILE_N)
    block = tl.load(table + pos // BLOCK_SIZE, mask=pos < table_tokens, other=0)
    # Row i of the tile: query row i // GROUP of the sequence, head i % GROUP of the group.
    i = tl.arange(0, ROWS_PAD)
    row_ok = i < GROUP * QUERY_LEN
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + i % GROUP
    tokens = seq * QUERY_LEN + i // GROUP
    if PDL and PREFETCH_KEYS > 0:
        # HBM idles until the kernel before finishes: start this split's first K/V rows on
        # their way to L2 meanwhile. A line that kernel then writes (the newest token) is
        # read fresh, as every write and read meets in L2; rows past the split read offset 0.
        ahead = start + tl.arange(0, PREFETCH_KEYS)
        wanted = ahead < tl.minimum(seq_len, start + split_len)
        ahead_block = tl.load(table + ahead // BLOCK_SIZE, mask=wanted, other=0).to(tl.int64)
        ahead_row = tl.where(wanted, ahead_block * stride_c_block + (ahead % BLOCK_SIZE) * stride_c_tok + kv_head.to(tl.int64) * stride_c_head, 0)
        lines = kv_ptr + ahead_row[:, None] + (tl.arange(0, HEAD_DIM // LINE) * LINE)[None, :]
        _prefetch_l2(lines)
        _prefetch_l2(lines + stride_c_kv)
    pdl.wait(PDL)
    q = tl.load(q_ptr + tokens[:, None] * stride_q_seq + heads[:, None] * stride_q_head + d[None, :], mask=row_ok[:, None], other=0.0)
    q = to_dot_dtype(q, DOT_FP16)
    if SPLIT:
        used = tl.maximum(tl.cdiv(keys, split_len), 1)
    else:
        used = 1
    if split < used:
        end = tl.minimum(seq_len, start + split_len)
        m = tl.full([ROWS_PAD], float("-inf"), tl.float32)
        l = tl.zeros([ROWS_PAD], tl.float32)
        acc = tl.zeros([ROWS_PAD, HEAD_DIM], tl.float32)
        q_pos = seq_len - QUERY_LEN + i // GROUP
        head_off = kv_head.to(tl.int64) * stride_c_head
        # Block ids run one tile ahead, so the KV loads depend on no load of their own iteration.
        for tile_start in range(start, end, TILE_N):
            pos = tile_start + tl.arange(0, TILE_N)
            valid = pos < end
            row = block.to(tl.int64) * stride_c_block + (pos % BLOCK_SIZE) * stride_c_tok + head_off
            block = tl.load(table + (pos + TILE_N) // BLOCK_SIZE, mask=pos + TILE_N < end, other=0)
            k = tl.load(kv_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)
            v = tl.load(kv_ptr + stride_c_kv + row[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            if SOFTCAP > 0:
                s = softcap_log2(s, SOFTCAP)
            if QUERY_LEN == 1:
                s = tl.where(valid[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                m_sub = m_new
            else:
                # Each row sees keys up to its own position (and its own window): a row may see
                # none of a tile, so subtract 0, not -inf (NaN), until it has seen one.
                seen = valid[None, :] & (pos[None, :] <= q_pos[:, None])
                if WINDOW > 0:
                    seen = seen & (pos[None, :] > q_pos[:, None] - WINDOW)
                s = tl.where(seen, s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                m_sub = tl.where(m_new > float("-inf"), m_new, 0.0)
            p = tl.math.exp2(s - m_sub[:, None])
            alpha = tl.math.exp2(m - m_sub)
            l = l * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m = m_new
        # Only now may the next kernel's programs start: waiting beside this loop, they slowed
        # a 16k-token single sequence (256 programs) from 22.4 to 26.9 us on an H200.
        pdl.launch_dependents(PDL)

        safe_l = tl.where(l > 0, l, 1.0)
        if used == 1:
            o_ptrs = out_ptr + tokens[:, None] * stride_o_seq + heads[:, None] * stride_o_head + d[None, :]
            tl.store(o_ptrs, (acc / safe_l[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            lse = tl.where(l > 0, m + tl.math.log2(safe_l), float("-inf"))
            # Partials of a (sequence, KV head) lie together, row after row: ``i`` indexes them in the merge.
            row_idx = ((seq * tl.num_programs(1) + kv_head) * (GROUP * QUERY_LEN) + i) * num_splits + split
            tl.store(part_out_ptr + row_idx[:, None] * HEAD_DIM + d[None, :], acc / safe_l[:, None], mask=row_ok[:, None])
            tl.store(part_lse_ptr + row_idx, lse, mask=row_ok)
            # Every thread's partial is stored before one thread counts this split in
            # (release); the last split's count (acquire) makes all partials visible.
            tl.debug_barrier()
            sem = sem_ptr + seq * tl.num_programs(1) + kv_head
            if tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu") == used - 1:
                # One query row's head group at a time: the merge's registers are a single row's.
                mg = tl.arange(0, MERGE_PAD)
                merge_heads = kv_head * GROUP + mg
                first_row = (seq * tl.num_programs(1) + kv_head) * (GROUP * QUERY_LEN)
                for r in tl.range(0, QUERY_LEN, loop_unroll_factor=1):
                    rows = (first_row + r * GROUP + mg) * num_splits
                    o_ptrs = out_ptr + (seq * QUERY_LEN + r) * stride_o_seq + merge_heads[:, None] * stride_o_head + d[None, :]
                    _merge_splits(part_out_ptr, part_lse_ptr, o_ptrs, rows, mg < GROUP, used, MERGE_PAD, HEAD_DIM, SPLITS_PAD, CHUNK)
                tl.store(sem, 0)


def split_context(device: torch.device, batch: int, num_kv_heads: int, max_context: int, config: DecodeConfig) -> tuple[int, int]:
    """(splits, tokens a split): the context is split as far as one wave of resident programs
    (``programs_per_sm`` on every SM) allows, each split at least ``min_split_tokens`` and a
    whole number of tiles long."""
    wanted = config.programs_per_sm * num_sms(device) // max(1, batch * num_kv_heads)
    splits = max(1, min(wanted, config.max_splits, math.ceil(max_context / config.min_split_tokens)))
    split_len = triton.cdiv(triton.cdiv(max_context, splits), config.tile_n) * config.tile_n
    return triton.cdiv(max_context, split_len), split_len  # rounding up split_len can leave the last splits empty


def merge_chunk(config: DecodeConfig, group: int, head_dim: int, splits_pad: int) -> int:
    """How many splits' partial results the merge loads at once (``CHUNK``): ``merge_per_thread``
    elements a thread, at most ``splits_pad`` (1 for a launch that does not split)."""
    per_split = triton.next_power_of_2(group) * head_dim
    return min(splits_pad, max(1, config.merge_per_thread * 32 * config.num_warps // per_split))


_SEMAPHORES: dict[torch.device, list[torch.Tensor]] = {}


def _semaphores(device: torch.device, count: int) -> torch.Tensor:
    """At least ``count`` zeroed int32 split counters on ``device``, shared by its launches
    (every launch leaves them at zero). Grows only outside CUDA-graph capture, and
    keeps the smaller buffers alive: graphs captured earlier still use them."""
    buffers = _SEMAPHORES.setdefault(device, [])
    if not buffers or buffers[-1].numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("paged_decode_attention: run a split launch of this size once before CUDA-graph capture")
        buffers.append(torch.zeros(max(1024, triton.next_power_of_2(count)), dtype=torch.int32, device=device))
    return buffers[-1]


def _check_decode_args(q: torch.Tensor, kv_cache: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, query_len: int) -> int:
    """The batch (sequences) of a decode launch of ``query_len`` rows a sequence; ValueError where
    the arguments do not fit."""
    check_attention_args(q, kv_cache)
    if isinstance(query_len, bool) or not isinstance(query_len, int) or query_len < 1:
        raise ValueError(f"query_len must be a positive int, got {query_len!r}")
    if q.shape[0] % query_len:
        raise ValueError(f"q holds {q.shape[0]} rows, not a whole number of sequences of query_len={query_len}")
    batch = q.shape[0] // query_len
    check_int_index("seq_lens", seq_lens, (batch,), kv_cache)
    check_int_index("block_tables", block_tables, (batch, -1), kv_cache)
    return batch


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    query_len: int = 1,
) -> torch.Tensor:
    """``query_len`` query rows per sequence (``q`` ``[batch * query_len, num_heads, head_dim]``, a
    sequence's rows together: a generated token and its draft), the last ``query_len`` positions of
    its paged context, attended causally."""
    return launch_paged_decode_attention(q, kv_cache, seq_lens, block_tables, scale, None, sliding_window=sliding_window,
                                         softcap=softcap, query_len=query_len)


def attended_keys(max_context: int, window: int, query_len: int) -> int:
    """The most keys a sequence's rows attend: the table's width in tokens, or, where shorter, the
    last row's window (not 0) and the ``query_len - 1`` keys before it."""
    return min(max_context, window + query_len - 1) if window else max_context


def launch_paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    config: DecodeConfig | None,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    query_len: int = 1,
) -> torch.Tensor:
    """``paged_decode_attention`` with explicit launch parameters (benchmarks sweep them; None:
    ``default_config``'s)."""
    batch = _check_decode_args(q, kv_cache, seq_lens, block_tables, query_len)
    window, cap = window_and_softcap(sliding_window, softcap)
    _, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    out = torch.empty_like(q)
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    rows = group * query_len
    table_tokens = block_tables.shape[1] * block_size
    keys = attended_keys(table_tokens, window, query_len)
    if config is None:
        config = default_config(batch, num_kv_heads, head_dim, keys, q.device, kv_cache.element_size())
    splits, _ = split_context(q.device, batch, num_kv_heads, keys, config)
    split_shape = (batch, num_kv_heads, rows, splits, head_dim) if splits > 1 else (0,)
    part_out = torch.empty(split_shape, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(split_shape[:-1], dtype=torch.float32, device=q.device)
    sems = _semaphores(q.device, batch * num_kv_heads) if splits > 1 else seq_lens
    merge_pad = triton.next_power_of_2(group)
    splits_pad = triton.next_power_of_2(config.max_splits) if splits > 1 else 1
    _paged_decode_attention_kernel[(batch, num_kv_heads, splits)](
        q, kv_cache, out, part_out, part_lse, sems, seq_lens, block_tables,
        scale * math.log2(math.e), table_tokens, splits,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, QUERY_LEN=query_len, ROWS_PAD=max(16, triton.next_power_of_2(rows)), MERGE_PAD=merge_pad, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE_N=config.tile_n, SPLIT=splits > 1, SPLITS_PAD=splits_pad,
        CHUNK=merge_chunk(config, group, head_dim, splits_pad),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", DOT_FP16=dot_fp16(q, kv_cache),
        PREFETCH_KEYS=config.prefetch_tiles * config.tile_n, LINE=min(head_dim, 128 // kv_cache.element_size()),
        WINDOW=window, SOFTCAP=cap, MIN_SPLIT=config.shortest_split,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **pdl.launch_options(q),
    )
    return out
