"""Triton kernels against their plain-torch references on fresh random inputs.

Every check draws new random data, over GQA ratios (1, 2, 4, 8 and MQA), block
sizes, ragged lengths (1, not a multiple of the block size, cached prefix + new
tokens) and shuffled block tables. On CPU the kernels run under the Triton
interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set before triton is
imported): ``python tests/test_kernels.py`` runs the small cases that way. On a
CUDA GPU every kernel runs natively in fp16/bf16/fp32, and a pool of more than
2**31 elements checks the 64-bit block offsets.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import torch
import triton

from kernel_cases import GQA, fresh_seed, hopper_ptx, hopper_resources, interpreted_checks_passed, run_cases  # noqa: F401 (fresh_seed is an autouse fixture)

from baton.kernels import activation, attention, kv_cache, linear, norm, ops, rotary
from baton.kernels.attention_decode import (
    DEFAULT_CONFIGS, FP8_CONFIGS_128, DecodeConfig, launch_paged_decode_attention, merge_chunk,
)
from baton.kernels.attention_prefill import PrefillConfig, launch_paged_attention
from baton.kernels.linear import MAX_DISPATCH_ROWS, MAX_GEMV_ROWS, LinearConfig, launch_linear

TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1.5e-2,
             # a rounding that tips the other way costs an 8-bit float up to an eighth (a quarter)
             torch.float8_e4m3fn: 3e-2, torch.float8_e5m2: 6e-2}
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _poison_allocator(device: str, nbytes: int) -> None:
    """Leave NaN-filled memory in the CUDA caching allocator, so outputs that the
    wrappers allocate with ``torch.empty`` start as NaN and unwritten elements fail."""
    if device == "cuda":
        junk = torch.full((nbytes // 4 + 1,), float("nan"), device=device)
        del junk


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, tolerance: float = 0.0) -> None:
    """``got`` within ``dtype``'s ``TOLERANCE`` (or a looser ``tolerance``) of ``want``, relative, all finite."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    assert torch.isfinite(got.double()).all(), "output holds NaN/inf (unwritten or overflowing elements)"
    err = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12)
    bound = max(TOLERANCE[dtype], tolerance)
    assert err < bound, f"relative error {err:.2e} >= {bound:.0e}"


def paged_case(q_lens: list[int], seq_lens: list[int], heads: int, kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype, device: str, extra_blocks: int = 3,
               cache_dtype: torch.dtype | None = None, table_blocks: int = 0):
    """Random pool (in ``cache_dtype``, default ``dtype``), shuffled block tables with random
    padding entries (at least ``table_blocks`` wide: a CUDA graph's tables span the longest context),
    random queries."""
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    perm = torch.randperm(num_blocks)
    tables = torch.randint(0, num_blocks, (len(seq_lens), max(max(blocks_per_seq) + 2, table_blocks)), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = perm[used : used + n]
        used += n
    cache = torch.randn(num_blocks, 2, block_size, kv_heads, head_dim, dtype=dtype, device=device).to(cache_dtype or dtype)
    q = torch.randn(sum(q_lens), heads, head_dim, dtype=dtype, device=device)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, cache, cu, torch.tensor(seq_lens, dtype=torch.int32, device=device), tables.to(device)


def check_paged_attention(device: str, dtype: torch.dtype, heads: int, kv_heads: int, block_size: int, head_dim: int, pairs: list[tuple[int, int]],
                          config: PrefillConfig | None = None, scale: float | None = None, cache_dtype: torch.dtype | None = None,
                          sliding_window: int | None = None, softcap: float | None = None) -> None:
    """``pairs`` are (q_len, seq_len): q_len < seq_len means a cached prefix. ``config`` None: the
    default launch; ``scale`` None: ``head_dim**-0.5`` (a larger one makes the running maxima jump)."""
    q, cache, cu, seq_lens, tables = paged_case([a for a, _ in pairs], [b for _, b in pairs], heads, kv_heads, block_size, head_dim, dtype, device,
                                                cache_dtype=cache_dtype)
    scale = scale or head_dim**-0.5
    options = {"sliding_window": sliding_window, "softcap": softcap}
    _poison_allocator(device, q.numel() * q.element_size())
    if config is None:
        got = attention.paged_attention(q, cache, cu, seq_lens, tables, scale, **options)
    else:
        got = launch_paged_attention(q, cache, cu, seq_lens, tables, scale, config, **options)
    _assert_close(got, attention.ref_paged_attention(q, cache, cu, seq_lens, tables, scale, **options), dtype)


def check_paged_decode_attention(device: str, dtype: torch.dtype, heads: int, kv_heads: int, block_size: int, head_dim: int, lens: list[int],
                                 cache_dtype: torch.dtype | None = None, config: DecodeConfig | None = None, scale: float | None = None,
                                 sliding_window: int | None = None, softcap: float | None = None, table_blocks: int = 0,
                                 query_len: int = 1) -> None:
    """``config`` None: the default launch; ``scale`` None: ``head_dim**-0.5``; ``table_blocks``: the
    block tables' least width (``paged_case``); ``query_len`` rows a sequence (a token and its draft)."""
    q, cache, _, seq_lens, tables = paged_case([query_len] * len(lens), lens, heads, kv_heads, block_size, head_dim, dtype, device,
                                               cache_dtype=cache_dtype, table_blocks=table_blocks)
    scale = scale or head_dim**-0.5
    options = {"sliding_window": sliding_window, "softcap": softcap, "query_len": query_len}
    _poison_allocator(device, q.numel() * q.element_size())
    if config is None:
        got = attention.paged_decode_attention(q, cache, seq_lens, tables, scale, **options)
    else:
        got = launch_paged_decode_attention(q, cache, seq_lens, tables, scale, config, **options)
    _assert_close(got, attention.ref_paged_decode_attention(q, cache, seq_lens, tables, scale, **options), dtype)


def check_decode_many_splits_and_padding(device: str, dtype: torch.dtype, query_len: int = 1) -> None:
    """Forty splits (merged in chunks) and a length-0 padding sequence, whose rows get zeros."""
    q, cache, _, seq_lens, tables = paged_case([query_len] * 3, [700, query_len, 9], 4, 2, 16, 16, dtype, device)
    seq_lens[2] = 0
    config = DecodeConfig(tile_n=16, programs_per_sm=60, min_split_tokens=16, max_splits=40, merge_per_thread=1)
    _poison_allocator(device, q.numel() * q.element_size())
    got = launch_paged_decode_attention(q, cache, seq_lens, tables, 0.25, config, query_len=query_len)
    real = 2 * query_len
    want = attention.ref_paged_decode_attention(q[:real], cache, seq_lens[:2], tables[:2], 0.25, query_len=query_len)
    _assert_close(got[:real], want, dtype)
    assert torch.equal(got[real:], torch.zeros_like(got[real:]))


def check_store_kv(device: str, dtype: torch.dtype, block_size: int, kv_heads: int, head_dim: int) -> None:
    """Float32 keys and values written into a cache of ``dtype``, rounded as torch rounds them.
    Triton's interpreter rounds to 8-bit floats wrongly (1.99 to 1.0): there, the values are
    8-bit floats already."""
    cache = torch.randn(9, 2, block_size, kv_heads, head_dim, device=device).to(dtype)
    slots = torch.randperm(9 * block_size)[:13].to(torch.int32)
    slots[::4] = -1
    key = torch.randn(13, kv_heads, head_dim, dtype=torch.float32, device=device)
    value = torch.randn(13, kv_heads, 2 * head_dim, dtype=torch.float32, device=device)[..., ::2].contiguous()
    if device == "cpu" and dtype in FP8:
        key, value = key.to(dtype).float(), value.to(dtype).float()
    want = cache.clone()
    kv_cache.ref_store_kv(key, value, want, slots.to(device))
    kv_cache.store_kv(key, value, cache, slots.to(device))
    assert torch.equal(cache, want)


def check_gather_scatter(device: str, dtype: torch.dtype, block_size: int, kv_heads: int, head_dim: int) -> None:
    cache = torch.randn(12, 2, block_size, kv_heads, head_dim, device=device).to(dtype)
    ids = torch.randperm(12)[:5].to(torch.int32).to(device)
    _poison_allocator(device, 5 * cache[0].numel() * cache.element_size())
    packed = kv_cache.gather_blocks(cache, ids)
    assert torch.equal(packed, kv_cache.ref_gather_blocks(cache, ids))
    incoming = torch.randn(packed.shape, device=device).to(dtype)
    want = cache.clone()
    kv_cache.ref_scatter_blocks(want, ids, incoming)
    kv_cache.scatter_blocks(cache, ids, incoming)
    assert torch.equal(cache, want)


def check_rms_norm(device: str, dtype: torch.dtype, hidden: int, with_residual: bool, unit_offset: bool = False) -> None:
    x = torch.randn(7, hidden, dtype=dtype, device=device)
    w = torch.randn(hidden, dtype=dtype, device=device)
    r = torch.randn(7, hidden, dtype=dtype, device=device) if with_residual else None
    _poison_allocator(device, 2 * x.numel() * x.element_size())
    got, want = norm.rms_norm(x, w, 1e-6, r, unit_offset), norm.ref_rms_norm(x, w, 1e-6, r, unit_offset)
    for g, e in zip(got, want) if with_residual else ((got, want),):
        _assert_close(g, e, dtype)


def check_rotary(device: str, dtype: torch.dtype, head_dim: int, rotary_dim: int) -> None:
    cos_sin = torch.randn(64, rotary_dim, device=device)
    pos = torch.randint(0, 64, (11,), device=device)
    q, k = torch.randn(11, 6, head_dim, dtype=dtype, device=device), torch.randn(11, 2, head_dim, dtype=dtype, device=device)
    _poison_allocator(device, 2 * q.numel() * q.element_size())
    for g, e in zip(rotary.rotary_embedding(pos, q, k, cos_sin), rotary.ref_rotary_embedding(pos, q, k, cos_sin)):
        _assert_close(g, e, dtype)


def fused_qkv(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """q ``[T, heads, d]``, k and v ``[T, kv_heads, d]``: views into one random ``[T, (heads + 2 * kv_heads) * d]``
    tensor, as the fused qkv projection leaves them."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    parts = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return tuple(p.view(tokens, -1, head_dim) for p in parts)


def rotary_write_case(tokens: int, kv_heads: int, head_dim: int, rotary_dim: int, cache_dtype: torch.dtype, slot_dtype: torch.dtype,
                      device: str) -> tuple[torch.Tensor, ...]:
    """Positions, a cos/sin cache, a random cache of 5 blocks of 8 and distinct slots, every
    second one padding (-1)."""
    pos = torch.randint(0, 64, (tokens,), device=device)
    cos_sin = torch.randn(64, rotary_dim, device=device)
    cache = torch.randn(5, 2, 8, kv_heads, head_dim, device=device).to(cache_dtype)
    slots = torch.randperm(5 * 8)[:tokens].to(slot_dtype)
    slots[1::2] = -1
    return pos, cos_sin, cache, slots.to(device)


def _assert_written_rows(cache: torch.Tensor, want: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype, kv: int | slice) -> None:
    """The K (``kv`` 0) or K and V rows written at ``slots`` within ``dtype``'s tolerance of the
    reference (the kernel may fuse multiply-adds), every other element exactly as it left them."""
    written = slots[slots >= 0].long()
    blocks, offsets = written // cache.shape[2], written % cache.shape[2]
    _assert_close(cache[blocks, kv, offsets], want[blocks, kv, offsets], dtype)
    cache[blocks, kv, offsets] = want[blocks, kv, offsets]
    assert torch.equal(cache, want)


def check_rotary_store_kv(device: str, dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int, rotary_dim: int, slot_dtype: torch.dtype) -> None:
    """The rotated query, and the cache after the write (new keys are rounded to both dtypes)."""
    tokens, heads, kv_heads = 13, 6, 2
    q, k, v = fused_qkv(tokens, heads, kv_heads, head_dim, dtype, device)
    pos, cos_sin, cache, slots = rotary_write_case(tokens, kv_heads, head_dim, rotary_dim, cache_dtype, slot_dtype, device)
    want = cache.clone()
    want_q = rotary.ref_rotary_store_kv(pos, q, k, v, cos_sin, want, slots)
    _poison_allocator(device, q.numel() * q.element_size())
    got_q = rotary.rotary_store_kv(pos, q, k, v, cos_sin, cache, slots)
    _assert_close(got_q, want_q, dtype)
    _assert_written_rows(cache, want, slots, max(dtype, cache_dtype, key=TOLERANCE.__getitem__), 0)


def check_qkv_rotary_store_kv(device: str, dtype: torch.dtype, cache_dtype: torch.dtype, rows: int, heads: int, kv_heads: int,
                              head_dim: int, rotary_dim: int, hidden: int, with_bias: bool) -> None:
    """The projection, rotation and cache write in one launch against the reference: the query
    and the new K and V rows within tolerance, every other cache element exactly as it was."""
    w = torch.randn((heads + 2 * kv_heads) * head_dim, hidden, dtype=dtype, device=device)
    b = torch.randn(w.shape[0], dtype=dtype, device=device) if with_bias else None
    x = torch.randn(rows, hidden + 3, dtype=dtype, device=device)[:, :hidden]
    pos, cos_sin, cache, slots = rotary_write_case(rows, kv_heads, head_dim, rotary_dim, cache_dtype, torch.int64, device)
    want = cache.clone()
    want_q = rotary.ref_qkv_rotary_store_kv(x, w, b, pos, cos_sin, want, slots)
    _poison_allocator(device, want_q.numel() * want_q.element_size())
    got_q = rotary.qkv_rotary_store_kv(x, w, b, pos, cos_sin, cache, slots)
    _assert_close(got_q, want_q, dtype)
    _assert_written_rows(cache, want, slots, max(dtype, cache_dtype, key=TOLERANCE.__getitem__), slice(None))


def spread_gates(x: torch.Tensor) -> torch.Tensor:
    """``x`` (gate then up along its last dim) with its gates scaled from 0.1 to 30 along it: past
    |gate| of about 10, ``exp(-2u)`` of GELU's tanh argument ``u`` overflows fp32."""
    inter = x.shape[-1] // 2
    x[..., :inter] *= torch.logspace(-1, math.log10(30), inter, device=x.device)
    return x


def check_act_and_mul(device: str, dtype: torch.dtype, inter: int, act: str, tokens: tuple[int, ...] = (2, 3)) -> None:
    x = spread_gates(torch.randn(*tokens, 2 * inter, dtype=dtype, device=device))
    _poison_allocator(device, x.numel() * x.element_size())
    _assert_close(activation.act_and_mul(x, act), activation.ref_act_and_mul(x, act), dtype)


def check_linear(device: str, dtype: torch.dtype, m: int, n: int, k: int, with_bias: bool, config: LinearConfig | None = None,
                 gated: bool = False, act: str = "silu") -> None:
    """``x`` is a view with a row stride past its width, as a slice of a wider activation would be;
    ``gated``: ``x`` holds gate then up (2K wide) and the kernel applies ``act_and_mul(x, act)`` first."""
    width = 2 * k if gated else k
    w = torch.randn(n, k, dtype=dtype, device=device)
    b = torch.randn(n, dtype=dtype, device=device) if with_bias else None
    x = torch.randn(m, width + 3, dtype=dtype, device=device)[:, :width]
    if gated:
        spread_gates(x)
    _poison_allocator(device, m * n * x.element_size())
    got = launch_linear(x, w, b, config or linear.DEFAULT_CONFIG, gated, act)
    _assert_close(got, linear.ref_gated_linear(x, w, b, act) if gated else linear.ref_linear(x, w, b), dtype)


# Tiles at interpreter sizes, each with a cache block size: keys per tile above it (several
# block ids a tile), equal to it and below it (one id a tile); pipelined and not.
PREFILL_VARIANTS = (
    (PrefillConfig(16, 32, 4, 2), 32),
    (PrefillConfig(32, 16, 4, 3), 8),
    (PrefillConfig(16, 16, 4, 1), 32),
    (PrefillConfig(32, 32, 4, 1), 16),
)


def prefill_variant_cases(device: str, dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    """Each variant over a cached prefix, ragged lengths and a tile that ends past its sequence, at
    the usual softmax scale and at one so large that the running maxima jump between tiles."""
    pairs = [(1, 1), (9, 9), (5, 40), (37, 70), (20, 20 + 16)]
    for config, block_size in PREFILL_VARIANTS:
        for scale in (None, 20.0):
            yield (f"prefill {config} bs{block_size} scale {scale}",
                   lambda c=config, b=block_size, s=scale: check_paged_attention(device, dtype, 8, 2, b, 16, pairs, c, s))


# Split decode launches at interpreter sizes: splits of one tile and of two.
WINDOW_DECODE_CONFIGS = (
    DecodeConfig(tile_n=16, programs_per_sm=60, min_split_tokens=16, max_splits=40, merge_per_thread=1),
    DecodeConfig(tile_n=16, programs_per_sm=60, min_split_tokens=32, max_splits=8),
)


def window_softcap_cases(device: str, dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    """Sliding windows and capped scores against the references. Decode: windows of 1 and shorter
    than a tile (where the whole context would split), split over several programs with the first
    key (``seq_len - W``) mid-block and off the whole table's splits, as long as and longer than a
    context. Prefill: windows shorter than a query tile (no key every row sees), across the masked,
    unmasked and masked parts of a cached prefix, and past the context. Caps at a scale that bends
    most scores."""
    lens = [700, 1, 9, 57, 100, 101, 300]
    for config in WINDOW_DECODE_CONFIGS:
        for window in (5, 40, 100):
            yield (f"decode window {window} {config}",
                   lambda c=config, w=window: check_paged_decode_attention(device, dtype, 8, 2, 16, 16, lens, config=c, sliding_window=w))
        yield (f"decode window 100 softcap {config}",
               lambda c=config: check_paged_decode_attention(device, dtype, 8, 2, 16, 16, lens, config=c, scale=2.0,
                                                             sliding_window=100, softcap=5.0))
    for (heads, kv_heads), window, cap in (((4, 1), 1, None), ((2, 2), 7, 5.0), ((8, 2), None, 5.0), ((8, 2), 300, 5.0)):
        yield (f"decode h{heads}/{kv_heads} window {window} softcap {cap}",
               lambda h=heads, k=kv_heads, w=window, c=cap: check_paged_decode_attention(device, dtype, h, k, 8, 16, [1, 8, 300, 1000],
                                                                                         scale=2.0, sliding_window=w, softcap=c))
    pairs = [(1, 1), (40, 40), (21, 200), (5, 40), (0, 6)]   # window 80 over (21, 200): all three parts
    for (config, block_size), window in itertools.product(PREFILL_VARIANTS[:2], (1, 12, 40, 80, 300)):
        yield (f"prefill window {window} {config} bs{block_size}",
               lambda c=config, b=block_size, w=window: check_paged_attention(device, dtype, 8, 2, b, 16, pairs, c, sliding_window=w))
    for window in (None, 12):
        yield (f"prefill window {window} softcap",
               lambda w=window: check_paged_attention(device, dtype, 4, 2, 16, 16, pairs, scale=2.0, sliding_window=w, softcap=5.0))


def small_cases(device: str, dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    """The cases the interpreter can afford; also the first pass on GPU."""
    grid = [(h, k, 16) for h, k in GQA] + [(4, 2, 8), (4, 2, 32), (8, 1, 8)]
    for heads, kv_heads, bs in grid:
        pairs = [(1, 1), (9, 9), (5, 40), (1, 3 * bs + 1), (0, 6), (20, 20 + bs)]
        yield f"prefill h{heads}/{kv_heads} bs{bs}", lambda h=heads, k=kv_heads, b=bs, p=pairs: check_paged_attention(device, dtype, h, k, b, 16, p)
        lens = [1, bs, bs + 3, 300]  # 300: long enough to split the context
        yield f"decode h{heads}/{kv_heads} bs{bs}", lambda h=heads, k=kv_heads, b=bs, l=lens: check_paged_decode_attention(device, dtype, h, k, b, 16, l)
    yield "decode many splits + padding", lambda: check_decode_many_splits_and_padding(device, dtype)
    yield "decode one short sequence (half tiles)", lambda: check_paged_decode_attention(device, dtype, 8, 2, 16, 16, [40])
    yield "decode unsplit", lambda: check_paged_decode_attention(device, dtype, 8, 4, 16, 16, [1, 17, 33, 5, 2])
    for window in (None, 100):   # each sequence splits its own keys, not the table's
        yield (f"decode short sequences in a wide table, window {window}",
               lambda w=window: check_paged_decode_attention(device, dtype, 8, 2, 16, 16, [1, 40, 300, 700], sliding_window=w, table_blocks=256))
    # A token and its draft a sequence: rows of one head group fill 16 (3 x 4) and pad to 32 (5 x 4,
    # 5 x 8), split and not, merged in chunks, in a wide table, within windows shorter than the rows.
    for heads, kv_heads, query_len in ((4, 1, 3), (8, 2, 5), (8, 1, 5)):
        yield (f"decode drafts h{heads}/{kv_heads} {query_len} rows",
               lambda h=heads, k=kv_heads, n=query_len: check_paged_decode_attention(device, dtype, h, k, 16, 16, [n, 40, 300, 700],
                                                                                    query_len=n, table_blocks=64))
    yield "decode drafts, many splits + padding", lambda: check_decode_many_splits_and_padding(device, dtype, query_len=4)
    for window in (1, 3, 100):
        yield (f"decode drafts window {window}",
               lambda w=window: check_paged_decode_attention(device, dtype, 8, 2, 16, 16, [5, 40, 300, 700], config=WINDOW_DECODE_CONFIGS[0],
                                                             scale=2.0, sliding_window=w, softcap=5.0, query_len=5))
    yield "prefill dim 64", lambda: check_paged_attention(device, dtype, 4, 2, 16, 64, [(40, 70), (33, 33)])
    yield "prefill short query runs (drafts)", lambda: check_paged_attention(device, dtype, 8, 2, 16, 16, [(5, 40), (1, 3), (3, 3), (16, 50), (0, 6)])
    yield from prefill_variant_cases(device, dtype)
    yield from window_softcap_cases(device, dtype)
    for bs in (8, 16):
        yield f"store_kv bs{bs}", lambda b=bs: check_store_kv(device, dtype, b, 2, 16)
        yield f"gather/scatter bs{bs}", lambda b=bs: check_gather_scatter(device, dtype, b, 2, 16)
    for fp8 in FP8:
        yield f"prefill {fp8} cache", lambda c=fp8: check_paged_attention(device, dtype, 8, 2, 16, 16, [(9, 9), (5, 40), (20, 36)], cache_dtype=c)
        yield f"decode {fp8} cache", lambda c=fp8: check_paged_decode_attention(device, dtype, 8, 2, 16, 16, [1, 19, 300], cache_dtype=c)
        yield f"store_kv {fp8}", lambda c=fp8: check_store_kv(device, c, 16, 2, 16)
        yield f"gather/scatter {fp8}", lambda c=fp8: check_gather_scatter(device, c, 16, 2, 16)
    for hidden, res in ((64, False), (100, True)):
        yield f"rms_norm {hidden} residual={res}", lambda h=hidden, r=res: check_rms_norm(device, dtype, h, r)
        yield f"rms_norm {hidden} residual={res} unit offset", lambda h=hidden, r=res: check_rms_norm(device, dtype, h, r, True)
    for head_dim, rot in ((32, 32), (64, 48)):
        yield f"rotary {head_dim}/{rot}", lambda h=head_dim, r=rot: check_rotary(device, dtype, h, r)
    other = torch.float16 if dtype == torch.float32 else torch.float32
    yield "rotary_store_kv 64/64", lambda: check_rotary_store_kv(device, dtype, dtype, 64, 64, torch.int64)
    yield "rotary_store_kv 32/16 other cache dtype", lambda: check_rotary_store_kv(device, dtype, other, 32, 16, torch.int32)
    yield "qkv_rotary_store_kv 1 row 32/32 bias", lambda: check_qkv_rotary_store_kv(device, dtype, dtype, 1, 4, 2, 32, 32, 100, True)
    yield "qkv_rotary_store_kv 2 rows 32/16 other cache dtype", lambda: check_qkv_rotary_store_kv(device, dtype, other, 2, 6, 2, 32, 16, 300, False)
    yield "qkv_rotary_store_kv 4 rows even K, MQA", lambda: check_qkv_rotary_store_kv(device, dtype, dtype, MAX_GEMV_ROWS, 4, 1, 16, 16, 2048, True)
    for act in activation.ACTIVATIONS:
        yield f"act_and_mul {act}", lambda a=act: check_act_and_mul(device, dtype, 1500, a)
    for m, n, k, bias in ((1, 37, 100, True), (2, 24, 1024, False), (3, 64, 1030, True), (4, 19, 512, False)):
        yield f"linear {m}x{k} -> {n} bias={bias}", lambda m=m, n=n, k=k, b=bias: check_linear(device, dtype, m, n, k, b)
    ragged = LinearConfig(block_n=16, block_k=128)  # N and K not multiples of the tile, then K a multiple
    yield "linear ragged tiles", lambda: check_linear(device, dtype, MAX_GEMV_ROWS, 45, 300, True, ragged)
    yield "linear even K", lambda: check_linear(device, dtype, 3, 45, 256, False, ragged)
    yield "gated linear", lambda: check_linear(device, dtype, 2, 37, 300, True, gated=True)
    yield "gated linear ragged tiles", lambda: check_linear(device, dtype, 3, 45, 300, False, ragged, gated=True)
    yield "gated linear gelu_pytorch_tanh", lambda: check_linear(device, dtype, 2, 37, 300, True, gated=True, act="gelu_pytorch_tanh")
    yield "gated linear gelu_pytorch_tanh ragged tiles", lambda: check_linear(device, dtype, 4, 45, 300, False, ragged, gated=True,
                                                                                 act="gelu_pytorch_tanh")


@pytest.mark.unit
@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_the_reference_attends_a_batch_of_short_runs_as_each_sequence_alone(heads: int, kv_heads: int) -> None:
    """Short query runs (decodes, drafts) take the reference's padded call; one sequence at a
    time takes its loop: they must agree."""
    pairs = [(int(torch.randint(0, 17, ())), 0) for _ in range(6)]
    pairs = [(q, q + int(torch.randint(0 if q else 1, 60, ()))) for q, _ in pairs]
    q, cache, cu, seq_lens, tables = paged_case([a for a, _ in pairs], [b for _, b in pairs], heads, kv_heads, 8, 16, torch.float32, "cpu")
    batched = attention.ref_paged_attention(q, cache, cu, seq_lens, tables, 0.3)
    for i in range(len(pairs)):
        lo, hi = int(cu[i]), int(cu[i + 1])
        alone = attention.ref_paged_attention(q[lo:hi], cache, cu[i:i + 2] - lo, seq_lens[i:i + 1], tables[i:i + 1], 0.3)
        torch.testing.assert_close(batched[lo:hi], alone, rtol=1e-5, atol=1e-5)


def low_precision_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    """The interpreter's cases in 16-bit dtypes (``small_cases`` runs float32): a few ops' roundings."""
    yield "store_kv fp16", lambda: check_store_kv("cpu", torch.float16, 16, 2, 16)
    yield "rms_norm bf16", lambda: check_rms_norm("cpu", torch.bfloat16, 96, True)
    yield "rms_norm bf16 unit offset", lambda: check_rms_norm("cpu", torch.bfloat16, 96, True, True)
    yield "linear bf16", lambda: check_linear("cpu", torch.bfloat16, MAX_GEMV_ROWS, 37, 300, True)
    for half in (torch.float16, torch.bfloat16):   # GeGLU's two roundings
        yield f"act_and_mul gelu_pytorch_tanh {half}", lambda d=half: check_act_and_mul("cpu", d, 300, "gelu_pytorch_tanh")
        yield (f"gated linear gelu_pytorch_tanh {half}",
               lambda d=half: check_linear("cpu", d, 3, 37, 300, True, gated=True, act="gelu_pytorch_tanh"))


@pytest.mark.unit
def test_kernels_under_triton_interpreter() -> None:
    stdout = interpreted_checks_passed(__file__)
    expected = sum(1 for _ in small_cases("cpu", torch.float32)) + sum(1 for _ in low_precision_cases())
    assert f"{expected} interpreted checks passed" in stdout, stdout


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_kernels_on_gpu_small_cases(dtype: torch.dtype) -> None:
    assert run_cases(small_cases("cuda", dtype)) > 0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (32, 32), (32, 4), (8, 1)])
def test_attention_on_gpu_llama_shapes(dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    pairs = [(1, 1), (300, 300), (77, 1500), (1, 2049), (500, 517)]
    check_paged_attention("cuda", dtype, heads, kv_heads, 16, 128, pairs)
    check_paged_decode_attention("cuda", dtype, heads, kv_heads, 16, 128, [1, 4000, 17, 250])
    lens = torch.randint(1, 600, (96,)).tolist()  # batch large enough to run unsplit
    check_paged_decode_attention("cuda", dtype, heads, kv_heads, 16, 128, lens)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_attention_on_gpu_head_dim_64(dtype: torch.dtype) -> None:
    """Llama-3.2-1B's heads, which take their own default prefill and decode tiles."""
    pairs = [(1, 1), (512, 512), (77, 1500), (1, 2049), (64, 512), (500, 517)]
    check_paged_attention("cuda", dtype, 32, 8, 16, 64, pairs)
    check_paged_decode_attention("cuda", dtype, 32, 8, 16, 64, [1, 4000, 17, 250])
    lens = torch.randint(1, 600, (128,)).tolist()  # more KV heads than a wave of the deeper programs holds: the lighter ones
    check_paged_decode_attention("cuda", dtype, 32, 8, 16, 64, lens)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("window", [4096, 100, None], ids=lambda w: f"window {w}")
def test_window_and_softcap_on_gpu_gemma2_shapes(dtype: torch.dtype, window: int | None) -> None:
    """Gemma 2's attention (8 query heads over 4 KV heads of 256, scores capped at 50, a window of
    4096 keys on every other layer) and a short window, over contexts past the window, at its
    scale and at one where the cap bends the scores; decode batches that split the context, fill
    one wave of deep programs unsplit (96) and take the light ones (128)."""
    pairs = [(1, 1), (300, 300), (77, 5000), (1, 4097), (500, 4600), (4500, 4500)]
    for scale, cap in ((None, None), (None, 50.0), (1.0, 50.0)):
        check_paged_attention("cuda", dtype, 8, 4, 16, 256, pairs, scale=scale, sliding_window=window, softcap=cap)
        check_paged_decode_attention("cuda", dtype, 8, 4, 16, 256, [5000, 1, 4096, 4097, 100, 101], scale=scale,
                                     sliding_window=window, softcap=cap)
    for batch in (96, 128):
        lens = torch.randint(1, 6000, (batch,)).tolist()
        check_paged_decode_attention("cuda", dtype, 8, 4, 16, 256, lens, sliding_window=window, softcap=50.0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cache_dtype", FP8, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_fp8_kv_cache_on_gpu(dtype: torch.dtype, cache_dtype: torch.dtype) -> None:
    """8-bit KV caches at Llama shapes: attention reads them as the reference does, and every
    write (fresh values, rounded on the GPU) as torch rounds them, within a rounding's tolerance."""
    check_paged_attention("cuda", dtype, 32, 8, 16, 128, [(1, 1), (300, 300), (77, 1500), (500, 517)], cache_dtype=cache_dtype)
    check_paged_decode_attention("cuda", dtype, 32, 8, 16, 128, [1, 4000, 17, 250], cache_dtype=cache_dtype)
    for head_dim in (64, 128):   # batches past one wave of deep programs (128: the 8-bit cache's own tiles)
        check_paged_decode_attention("cuda", dtype, 32, 8, 16, head_dim, torch.randint(1, 600, (96,)).tolist(), cache_dtype=cache_dtype)
    check_store_kv("cuda", cache_dtype, 16, 8, 128)
    check_rotary_store_kv("cuda", dtype, cache_dtype, 128, 128, torch.int64)
    for rows in (1, MAX_GEMV_ROWS):
        check_qkv_rotary_store_kv("cuda", dtype, cache_dtype, rows, 32, 8, 128, 128, 512, False)


# Tiles the GPU sweep times (bench_kernels.py --prefill-sweep) besides the default, 16-bit only:
# 128 x 128 fp32 tiles do not fit in shared memory.
GPU_PREFILL_VARIANTS = (PrefillConfig(128, 64, 8, 4), PrefillConfig(64, 64, 4, 3), PrefillConfig(64, 128, 4, 3))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", GPU_PREFILL_VARIANTS, ids=str)
def test_prefill_variants_on_gpu_llama_shapes(dtype: torch.dtype, config: PrefillConfig) -> None:
    """At scale 1 the running maxima often jump between tiles."""
    pairs = [(1, 1), (300, 300), (77, 1500), (1, 2049), (500, 517)]
    for scale in (None, 1.0):
        check_paged_attention("cuda", dtype, 32, 8, 16, 128, pairs, config, scale)


def compiled_variants(kernel) -> int:
    """How many variants of a Triton kernel this process has compiled for the current GPU."""
    return len(kernel.device_caches[torch.cuda.current_device()][0])


@pytest.mark.gpu
@needs_cuda
def test_serving_shapes_reuse_one_compiled_kernel() -> None:
    """From step to step a worker's prompt batch changes size, its block tables change width,
    and KV runs are sent from slices of block-id tensors. None of it may compile a new variant
    of prefill attention or of the block copies: each compile in the middle of serving stalled
    every request in flight."""
    from baton.kernels.attention_prefill import _paged_attention_kernel
    from baton.kernels.kv_cache import _copy_blocks_kernel

    counts = []
    for q_lens, seq_lens in [([5], [5]), ([3, 9, 1], [40, 9, 17]), ([16] * 16, [16] * 16), ([4, 4], [224, 10]), ([7, 2], [300, 2])]:
        q, cache, cu, lens, tables = paged_case(q_lens, seq_lens, 32, 8, 16, 64, torch.bfloat16, "cuda")
        for first in (0, 1):   # index tensors read from an offset, as the rest of a mixed batch reads them
            pad = torch.zeros(first, dtype=torch.int32, device="cuda")
            cu_off = torch.cat([pad, cu])[first:]
            lens_off = torch.cat([pad, lens])[first:]
            tables_off = torch.cat([pad.new_zeros(first, tables.shape[1]), tables])[first:]
            got = attention.paged_attention(q, cache, cu_off, lens_off, tables_off, 0.125)
            _assert_close(got, attention.ref_paged_attention(q, cache, cu, lens, tables, 0.125), torch.bfloat16)
            ids = torch.arange(cache.shape[0] - 1, -1, -1, device="cuda")[first:]
            assert torch.equal(kv_cache.gather_blocks(cache, ids), kv_cache.ref_gather_blocks(cache, ids))
            counts.append((compiled_variants(_paged_attention_kernel), compiled_variants(_copy_blocks_kernel)))
    assert len(set(counts)) == 1, counts


@pytest.mark.gpu
@needs_cuda
def test_decode_split_counts_share_one_compiled_kernel() -> None:
    """Each batch size splits the context a different number of times, and an eager mixed step's
    decodes come in any batch size. Only the launch parameters and whether the context is split
    at all may pick a variant of decode attention, not the split count."""
    from baton.kernels.attention_decode import _paged_decode_attention_kernel, default_config, split_context

    device = torch.device("cuda")
    kinds, split_counts = set(), set()
    before = compiled_variants(_paged_decode_attention_kernel)
    for batch in range(1, 13):
        lens = [2000] + [500 + 37 * i for i in range(batch - 1)]   # one table width for every batch
        q, cache, _, seq_lens, tables = paged_case([1] * batch, lens, 32, 8, 16, 128, torch.bfloat16, "cuda")
        got = attention.paged_decode_attention(q, cache, seq_lens, tables, 0.125)
        _assert_close(got, attention.ref_paged_decode_attention(q, cache, seq_lens, tables, 0.125), torch.bfloat16)
        config = default_config(batch, 8, 128, tables.shape[1] * 16, device)
        splits = split_context(device, batch, 8, tables.shape[1] * 16, config)[0]
        kinds.add((config, splits > 1))
        split_counts.add(splits)
    assert len(split_counts) > len(kinds), "the cases must split the context in more ways than they have kinds of launch"
    assert compiled_variants(_paged_decode_attention_kernel) - before <= len(kinds), split_counts


def _decode_pointers(dtype: str, kv: str | None = None) -> dict[str, str]:
    return {"q_ptr": f"*{dtype}", "kv_ptr": f"*{kv or dtype}", "out_ptr": f"*{dtype}", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
            "sem_ptr": "*i32", "seq_lens_ptr": "*i32", "tables_ptr": "*i32", "scale_log2": "fp32"}


HOPPER_PDL_CASES = {   # case: (kernel, pointer parameters, constants); the rest are i32
    "decode bf16 head dim 128": (
        "attention_decode:_paged_decode_attention_kernel", _decode_pointers("bf16"),
        dict(GROUP=4, QUERY_LEN=1, ROWS_PAD=16, MERGE_PAD=4, HEAD_DIM=128, BLOCK_SIZE=16, TILE_N=64, SPLIT=True, SPLITS_PAD=32,
             CHUNK=8, DOT_PRECISION="tf32", DOT_FP16=False, PREFETCH_KEYS=64, LINE=64, WINDOW=0, SOFTCAP=0.0, MIN_SPLIT=64)),
    "decode bf16 head dim 256, a sliding window and capped scores": (   # Gemma 2's local layers
        "attention_decode:_paged_decode_attention_kernel", _decode_pointers("bf16"),
        dict(GROUP=2, QUERY_LEN=1, ROWS_PAD=16, MERGE_PAD=2, HEAD_DIM=256, BLOCK_SIZE=16, TILE_N=32, SPLIT=True, SPLITS_PAD=32,
             CHUNK=8, DOT_PRECISION="tf32", DOT_FP16=False, PREFETCH_KEYS=32, LINE=64, WINDOW=4096, SOFTCAP=50.0, MIN_SPLIT=64)),
    "decode bf16 over an fp8 KV cache": (   # the tiles widened to float16, the queries narrowed to it
        "attention_decode:_paged_decode_attention_kernel", _decode_pointers("bf16", "fp8e4nv"),
        dict(GROUP=4, QUERY_LEN=1, ROWS_PAD=16, MERGE_PAD=4, HEAD_DIM=128, BLOCK_SIZE=16, TILE_N=64, SPLIT=True, SPLITS_PAD=32,
             CHUNK=8, DOT_PRECISION="tf32", DOT_FP16=True, PREFETCH_KEYS=64, LINE=128, WINDOW=0, SOFTCAP=0.0, MIN_SPLIT=64)),
    "decode bf16, a token and a draft of 4 a sequence": (
        "attention_decode:_paged_decode_attention_kernel", _decode_pointers("bf16"),
        dict(GROUP=4, QUERY_LEN=5, ROWS_PAD=32, MERGE_PAD=4, HEAD_DIM=128, BLOCK_SIZE=16, TILE_N=32, SPLIT=True, SPLITS_PAD=32,
             CHUNK=32, DOT_PRECISION="tf32", DOT_FP16=False, PREFETCH_KEYS=32, LINE=64, WINDOW=0, SOFTCAP=0.0, MIN_SPLIT=64)),
    "decode fp32 head dim 64, two tiles to L2": (   # 128-byte lines of 32 elements, two to a row
        "attention_decode:_paged_decode_attention_kernel", _decode_pointers("fp32"),
        dict(GROUP=2, QUERY_LEN=1, ROWS_PAD=16, MERGE_PAD=2, HEAD_DIM=64, BLOCK_SIZE=16, TILE_N=32, SPLIT=False, SPLITS_PAD=1,
             CHUNK=1, DOT_PRECISION="ieee", DOT_FP16=False, PREFETCH_KEYS=64, LINE=32, WINDOW=0, SOFTCAP=0.0, MIN_SPLIT=64)),
    "gated GEMV": (
        "linear:_linear_kernel", {"x_ptr": "*bf16", "x_scale_ptr": "*bf16", "w_ptr": "*bf16", "w_scale_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16"},
        dict(M=1, M_PAD=16, HAS_BIAS=False, ACTIVATION="silu", BLOCK_N=64, BLOCK_K=128, EVEN_K=True, FP8=False, GROUP_N=0,
             GROUP_K=0)),
    "gated GEMV, GELU (tanh)": (
        "linear:_linear_kernel", {"x_ptr": "*fp16", "x_scale_ptr": "*fp16", "w_ptr": "*fp16", "w_scale_ptr": "*fp16", "b_ptr": "*fp16", "out_ptr": "*fp16"},
        dict(M=2, M_PAD=2, HAS_BIAS=True, ACTIVATION="gelu_pytorch_tanh", BLOCK_N=2, BLOCK_K=2048, EVEN_K=False, FP8=False,
             GROUP_N=0, GROUP_K=0)),
    "FP8 GEMV over rows quantized per token": (
        "linear:_linear_kernel", {"x_ptr": "*fp8e4nv", "x_scale_ptr": "*fp32", "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32",
                                  "b_ptr": "*bf16", "out_ptr": "*bf16"},
        dict(M=2, M_PAD=2, HAS_BIAS=True, ACTIVATION=None, BLOCK_N=4, BLOCK_K=2048, EVEN_K=True, FP8=True, GROUP_N=0,
             GROUP_K=0)),
    "FP8 GEMV over rows quantized per token and group, weights per 128 x 128 block": (
        "linear:_linear_kernel", {"x_ptr": "*fp8e4nv", "x_scale_ptr": "*fp32", "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32",
                                  "b_ptr": "*bf16", "out_ptr": "*bf16"},
        dict(M=1, M_PAD=1, HAS_BIAS=False, ACTIVATION=None, BLOCK_N=2, BLOCK_K=2048, EVEN_K=False, FP8=True, GROUP_N=128,
             GROUP_K=128)),

    "RMSNorm": (
        "norm:_rms_norm_kernel",
        {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16", "new_residual_ptr": "*bf16",
         "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "eps": "fp32"},
        dict(HAS_RESIDUAL=True, UNIT_OFFSET=False, QUANTIZE=False, BLOCK=4096)),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", HOPPER_PDL_CASES)
def test_pdl_kernels_compile_for_hopper(case: str) -> None:
    """The programmatic-dependent-launch path of a decode-step kernel runs only on a Hopper GPU,
    so compile it for one here: a mistake in it fails this run, not the next GPU run."""
    kernel, pointers, constants = HOPPER_PDL_CASES[case]
    ptx = hopper_ptx(f"baton.kernels.{kernel}", pointers, {**constants, "PDL": True})
    assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
    if constants.get("PREFETCH_KEYS"):
        assert "prefetch.global.L2" in ptx


# An H100 SM (compute capability 9.0): 64K 32-bit registers, allocated a warp at a time in runs of 256
# (8 a thread); 228 KB of shared memory, of which each resident program takes 1 KB more than it asks;
# 64 warps.
SM90_REGISTERS, SM90_REGISTER_RUN, SM90_SHARED, SM90_SHARED_RESERVED, SM90_WARPS = 65536, 8, 233472, 1024, 64


def resident_programs(registers: int, shared: int, num_warps: int) -> int:
    """How many programs of ``num_warps`` warps, each thread taking ``registers`` and each program
    ``shared`` bytes, one SM90 SM holds at once."""
    per_warp = -(-registers // SM90_REGISTER_RUN) * SM90_REGISTER_RUN * 32
    return min(SM90_REGISTERS // (per_warp * num_warps), SM90_SHARED // (shared + SM90_SHARED_RESERVED), SM90_WARPS // num_warps)


@pytest.mark.unit
def test_decode_configs_count_on_as_many_programs_as_an_sm_holds() -> None:
    """``split_context`` splits a context until one wave of ``programs_per_sm`` programs an SM is full:
    each default decode config's count is what an H100 SM holds of its sm_90 compile (registers and
    shared memory as a launch specializes it: strides and pointers divisible by 16), bf16 caches and
    the 8-bit ones of ``FP8_CONFIGS_128``. Each is compiled as ``default_config`` launches it
    (a group of 4 query heads): the deep configs, and their half-size tiles, split (the merge's
    chunk as the launch sizes it); the lighter ones past the wave never do. A kernel change that
    takes more registers or shared memory, without the count following, splits past the wave."""
    pairs = [(pair, head_dim, "bf16") for head_dim, pair in DEFAULT_CONFIGS.items()] + [(FP8_CONFIGS_128, 128, "fp8e4nv")]
    deep = [(pair[0], head_dim, kv) for pair, head_dim, kv in pairs]
    half = [(replace(config, tile_n=config.tile_n // 2), head_dim, kv) for config, head_dim, kv in deep]
    light = [(pair[1], head_dim, kv) for pair, head_dim, kv in pairs]
    cases = [(*case, True) for case in deep + half] + [(*case, False) for case in light]
    divisible = ["q_ptr", "kv_ptr", "out_ptr", "part_out_ptr", "part_lse_ptr", "sem_ptr", "seq_lens_ptr", "tables_ptr",
                 "table_tokens", "stride_q_seq", "stride_q_head", "stride_c_block", "stride_c_kv", "stride_c_tok",
                 "stride_c_head", "stride_o_seq", "stride_o_head", "stride_t_seq"]
    jobs = []
    for config, head_dim, kv, split in cases:
        splits_pad = triton.next_power_of_2(config.max_splits) if split else 1
        jobs.append({"pointers": _decode_pointers("bf16", kv), "divisible": divisible,
                     "options": {"num_warps": config.num_warps, "num_stages": config.num_stages},
                     "constants": dict(GROUP=4, QUERY_LEN=1, ROWS_PAD=16, MERGE_PAD=4, HEAD_DIM=head_dim, BLOCK_SIZE=16, TILE_N=config.tile_n,
                                       SPLIT=split, SPLITS_PAD=splits_pad, CHUNK=merge_chunk(config, 4, head_dim, splits_pad),
                                       DOT_PRECISION="tf32", DOT_FP16=kv != "bf16", PREFETCH_KEYS=config.prefetch_tiles * config.tile_n,
                                       LINE=64 if kv == "bf16" else 128, WINDOW=0, SOFTCAP=0.0, PDL=True,
                                       MIN_SPLIT=config.shortest_split)})
    found = hopper_resources("baton.kernels.attention_decode:_paged_decode_attention_kernel", jobs)
    held = [resident_programs(f["registers"], f["shared"], config.num_warps) for f, (config, *_) in zip(found, cases)]
    assert held == [config.programs_per_sm for config, *_ in cases], list(zip(held, found, cases))


@pytest.mark.unit
def test_linear_rejects_bad_arguments_and_dispatches_to_torch_on_cpu() -> None:
    x, w, b = torch.randn(2, 16), torch.randn(8, 16), torch.randn(8)
    bad = {
        "MAX_GEMV_ROWS": (torch.randn(MAX_GEMV_ROWS + 1, 16), w, b),
        "x must have shape": (torch.randn(16), w, b),
        "weight must have shape": (x, torch.randn(8, 15), b),
        "weight dtype": (x, w.double(), b),
        "weight must be contiguous": (x, torch.randn(16, 8).t(), b),
        "bias must have shape": (x, w, torch.randn(9)),
        "bias dtype": (x, w, b.half()),
        "x must be contiguous in its last dim": (torch.randn(2, 32)[:, ::2], w, b),
    }
    for message, args in bad.items():
        with pytest.raises(ValueError, match=message):
            linear.linear(*args)
    assert torch.equal(ops.linear(x, w, b), torch.nn.functional.linear(x, w, b))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("n,k", [(3072, 2048), (2048, 2048), (2048, 8192), (1003, 1500)])
def test_linear_on_gpu_llama_shapes(dtype: torch.dtype, n: int, k: int) -> None:
    """Llama-3.2-1B's qkv, o and down projections and a shape that fills no tile, at every row count the kernel takes."""
    for m in range(1, MAX_GEMV_ROWS + 1):
        for with_bias, gated in itertools.product((False, True), repeat=2):
            check_linear("cuda", dtype, m, n, k, with_bias, gated=gated)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("inter,hidden", [(9216, 2304), (14336, 3584)], ids=["gemma-2-2b", "gemma-2-9b"])
def test_gelu_tanh_on_gpu_gemma_shapes(dtype: torch.dtype, inter: int, hidden: int) -> None:
    """Gemma 2's GeGLU MLPs: ``act_and_mul`` over a prefill's tokens, and the down projection fused
    with it at every row count the GEMV takes."""
    check_act_and_mul("cuda", dtype, inter, "gelu_pytorch_tanh", (3, 171))
    for m in range(1, MAX_GEMV_ROWS + 1):
        for with_bias in (False, True):
            check_linear("cuda", dtype, m, hidden, inter, with_bias, gated=True, act="gelu_pytorch_tanh")


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", activation.ACTIVATIONS)
def test_ref_act_and_mul_matches_float64(act: str, dtype: torch.dtype) -> None:
    """The reference against the activation in float64 on the same inputs, within a rounding of the
    activation and one of the product; an odd width, gates up to 30 wide and one row from -30 to 30."""
    x = spread_gates(torch.randn(5, 2 * 37))
    x[0, :37] = torch.linspace(-30, 30, 37)
    x = x.to(dtype)
    gate, up = x[:, :37].double(), x[:, 37:].double()
    exact = {"silu": lambda g: g * torch.sigmoid(g), "gelu_pytorch_tanh": lambda g: torch.nn.functional.gelu(g, approximate="tanh")}
    got = activation.ref_act_and_mul(x, act)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), exact[act](gate) * up, rtol=2 * torch.finfo(dtype).eps, atol=1e-5)


@pytest.mark.unit
def test_unknown_activation_is_rejected() -> None:
    x, w = torch.randn(2, 32), torch.randn(8, 16)
    calls = [lambda: activation.act_and_mul(x, "gelu"), lambda: activation.ref_act_and_mul(x, "relu"), lambda: ops.act_and_mul(x, "swish"),
             lambda: linear.gated_linear(x, w, None, "gelu_new"), lambda: linear.ref_gated_linear(x, w, None, "tanh"),
             lambda: ops.gated_linear(x, w, None, "Silu")]
    for call in calls:
        with pytest.raises(ValueError, match="activation must be one of 'silu', 'gelu_pytorch_tanh', got"):
            call()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim,hidden", [(64, 2048), (128, 4096)], ids=["1B", "8B"])
def test_qkv_rotary_store_kv_on_gpu_llama_shapes(dtype: torch.dtype, head_dim: int, hidden: int) -> None:
    """Llama-3.2-1B's and Llama-3-8B's attention inputs (32 query heads, 8 KV heads) at every row count the kernel takes."""
    for rows in range(1, MAX_GEMV_ROWS + 1):
        for with_bias in (False, True):
            check_qkv_rotary_store_kv("cuda", dtype, dtype, rows, 32, 8, head_dim, head_dim, hidden, with_bias)


@pytest.mark.gpu
@needs_cuda
def test_linear_in_cuda_graph_and_dispatch() -> None:
    """A captured launch computes on the inputs present at replay; ``ops.linear`` hands
    more than ``MAX_DISPATCH_ROWS`` rows to torch."""
    x = torch.randn(1, 2048, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(3072, 2048, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(3072, dtype=torch.bfloat16, device="cuda")
    ops.linear(x, w, b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.linear(x, w, b)
    x.copy_(torch.randn_like(x))
    graph.replay()
    _assert_close(out, linear.ref_linear(x, w, b), torch.bfloat16)
    many = torch.randn(MAX_DISPATCH_ROWS + 1, 2048, dtype=torch.bfloat16, device="cuda")
    assert torch.equal(ops.linear(many, w, b), linear.ref_linear(many, w, b))
    gate_up = torch.randn(MAX_DISPATCH_ROWS + 1, 2 * 3072, dtype=torch.bfloat16, device="cuda")
    assert torch.equal(ops.gated_linear(gate_up, w.T.contiguous(), None), linear.ref_linear(ops.act_and_mul(gate_up), w.T.contiguous()))
    # The 1B's q/k/v: 32 query heads, 8 KV heads of 64; the fused launch, and the unfused ops past MAX_DISPATCH_ROWS.
    for rows in (1, MAX_DISPATCH_ROWS + 1):
        cache = torch.randn(4, 2, 16, 8, 64, dtype=torch.bfloat16, device="cuda")
        want_cache = cache.clone()
        x = torch.randn(rows, 2048, dtype=torch.bfloat16, device="cuda")
        pos, slots = torch.randint(0, 64, (rows,), device="cuda"), torch.randperm(64, device="cuda")[:rows]
        cos_sin = torch.randn(64, 64, device="cuda")
        got_q = ops.qkv_rotary_store_kv(x, w, b, pos, cos_sin, cache, slots)
        _assert_close(got_q, rotary.ref_qkv_rotary_store_kv(x, w, b, pos, cos_sin, want_cache, slots), torch.bfloat16)
        _assert_close(cache, want_cache, torch.bfloat16)


@pytest.mark.gpu
@needs_cuda
def test_kernels_on_gpu_pool_beyond_int32_offsets() -> None:
    block_size, kv_heads, head_dim = 16, 8, 128
    num_blocks = 2**31 // (2 * block_size * kv_heads * head_dim) + 64  # > 2**31 elements, ~4.3 GB bf16
    cache = torch.randn(num_blocks, 2, block_size, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    assert cache.numel() > 2**31
    high = torch.randperm(64)[:40].to(torch.int32) + (num_blocks - 64)
    slots = (high[:8].long() * block_size + torch.randint(0, block_size, (8,))).to(torch.int32).cuda()
    key = torch.randn(8, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    value = torch.randn_like(key)
    kv_cache.store_kv(key, value, cache, slots)
    blocks, offsets = slots.long() // block_size, slots.long() % block_size
    assert torch.equal(cache[blocks, 0, offsets], key) and torch.equal(cache[blocks, 1, offsets], value)
    q, k, v = fused_qkv(8, 32, kv_heads, head_dim, torch.bfloat16, "cuda")
    pos, cos_sin = torch.randint(0, 64, (8,), device="cuda"), torch.randn(64, head_dim, device="cuda")
    got_q = rotary.rotary_store_kv(pos, q, k, v, cos_sin, cache, slots)
    want_q, want_k = rotary.ref_rotary_embedding(pos, q, k, cos_sin)
    _assert_close(got_q, want_q, torch.bfloat16)
    _assert_close(cache[blocks, 0, offsets], want_k, torch.bfloat16)
    assert torch.equal(cache[blocks, 1, offsets], v)
    x = torch.randn(MAX_GEMV_ROWS, 256, dtype=torch.bfloat16, device="cuda")
    w = torch.randn((32 + 2 * kv_heads) * head_dim, 256, dtype=torch.bfloat16, device="cuda") / 16
    got_q = rotary.qkv_rotary_store_kv(x, w, None, pos[:MAX_GEMV_ROWS], cos_sin, cache, slots[:MAX_GEMV_ROWS])
    q, k, v = rotary.split_qkv(linear.ref_linear(x, w), kv_heads, head_dim)
    want_q, want_k = rotary.ref_rotary_embedding(pos[:MAX_GEMV_ROWS], q, k, cos_sin)
    _assert_close(got_q, want_q, torch.bfloat16)
    _assert_close(cache[blocks[:MAX_GEMV_ROWS], 0, offsets[:MAX_GEMV_ROWS]], want_k, torch.bfloat16)
    _assert_close(cache[blocks[:MAX_GEMV_ROWS], 1, offsets[:MAX_GEMV_ROWS]], v, torch.bfloat16)
    ids = high[8:24].cuda()
    assert torch.equal(kv_cache.gather_blocks(cache, ids), kv_cache.ref_gather_blocks(cache, ids))
    packed = torch.randn(16, 2, block_size, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    kv_cache.scatter_blocks(cache, ids, packed)
    assert torch.equal(cache[ids.long()], packed)
    tables = torch.stack([high[:20], high[20:40]]).cuda()
    seq_lens = torch.tensor([320, 250], dtype=torch.int32, device="cuda")
    q = torch.randn(2, 32, head_dim, dtype=torch.bfloat16, device="cuda")
    got = attention.paged_decode_attention(q, cache, seq_lens, tables, 0.088)
    _assert_close(got, attention.ref_paged_decode_attention(q, cache, seq_lens, tables, 0.088), torch.bfloat16)
    qp = torch.randn(70, 32, head_dim, dtype=torch.bfloat16, device="cuda")
    cu = torch.tensor([0, 30, 70], dtype=torch.int32, device="cuda")
    got = attention.paged_attention(qp, cache, cu, seq_lens, tables, 0.088)
    _assert_close(got, attention.ref_paged_attention(qp, cache, cu, seq_lens, tables, 0.088), torch.bfloat16)


if __name__ == "__main__":
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    passed = run_cases(small_cases("cpu", torch.float32)) + run_cases(low_precision_cases())
    print(f"{passed} interpreted checks passed")
