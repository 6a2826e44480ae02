"""Writing new keys/values into the paged KV cache, and packing a request's
blocks into one contiguous buffer (and back) for transfers.

KV cache layout, one tensor per layer: ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``;
new keys and values are rounded to its dtype (an 8-bit float one too) as they are written.
A slot is ``block_id * block_size + offset``; a negative slot is padding and is skipped.
Block offsets are computed in int64, so pools of more than 2**31 elements work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.checks import FP8_KV_DTYPES, check_contiguous, check_device, check_dtype, check_int_index, check_kv_cache, check_last_dim_contiguous, check_shape

_COPY_BLOCK = 4096


@triton.jit
def _cache_row(cache_ptr, slot, stride_c_block, stride_c_tok, BLOCK_SIZE: tl.constexpr):
    """Pointer to the K row of ``slot`` (int64, >= 0): ``[num_kv_heads, head_dim]``, contiguous;
    its V row starts ``stride_c_kv`` elements further on."""
    return cache_ptr + (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_tok


@triton.jit
def _load_heads(src_ptr, stride_src_head, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROW_PAD: tl.constexpr):
    """One token's heads (each head's row contiguous, ``stride_src_head`` apart) as one flat row ``[ROW_PAD]``."""
    idx = tl.arange(0, ROW_PAD)
    return tl.load(src_ptr + (idx // HEAD_DIM) * stride_src_head + idx % HEAD_DIM, mask=idx < NUM_HEADS * HEAD_DIM)


@triton.jit
def _store_row(dst_ptr, x, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROW_PAD: tl.constexpr):
    """Store a flat row from ``_load_heads`` at the contiguous ``dst_ptr``, converted to its dtype."""
    idx = tl.arange(0, ROW_PAD)
    tl.store(dst_ptr + idx, x.to(dst_ptr.dtype.element_ty), mask=idx < NUM_HEADS * HEAD_DIM)


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_ptr,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_c_block,
    stride_c_kv,
    stride_c_tok,
    BLOCK_SIZE: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROW_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        k = _load_heads(key_ptr + token * stride_k_tok, stride_k_head, NUM_HEADS, HEAD_DIM, ROW_PAD)
        v = _load_heads(value_ptr + token * stride_v_tok, stride_v_head, NUM_HEADS, HEAD_DIM, ROW_PAD)
        row = _cache_row(cache_ptr, slot, stride_c_block, stride_c_tok, BLOCK_SIZE)
        _store_row(row, k, NUM_HEADS, HEAD_DIM, ROW_PAD)
        _store_row(row + stride_c_kv, v, NUM_HEADS, HEAD_DIM, ROW_PAD)


def check_store_kv_args(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """What a write of ``key``/``value`` at ``slot_mapping`` into ``kv_cache`` needs (``store_kv``,
    ``rotary.rotary_store_kv``)."""
    check_kv_cache(kv_cache)
    _, _, _, num_heads, head_dim = kv_cache.shape
    num_tokens = key.shape[0] if key.dim() == 3 else -1
    for name, t in (("key", key), ("value", value)):
        check_shape(name, t, (num_tokens, num_heads, head_dim))
        check_dtype(name, t)
        check_device(name, t, kv_cache)
        check_last_dim_contiguous(name, t)
    check_int_index("slot_mapping", slot_mapping, (num_tokens,), kv_cache)


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` at ``slot_mapping`` ``[num_tokens]``."""
    check_store_kv_args(key, value, kv_cache, slot_mapping)
    _, _, block_size, num_heads, head_dim = kv_cache.shape
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        BLOCK_SIZE=block_size, NUM_HEADS=num_heads, HEAD_DIM=head_dim,
        ROW_PAD=triton.next_power_of_2(num_heads * head_dim),
    )


@triton.jit(do_not_specialize_on_alignment=["ids_ptr"])   # block ids are often a slice of a run
def _copy_blocks_kernel(
    src_ptr,
    dst_ptr,
    ids_ptr,
    block_elems,
    GATHER: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Copy one chunk of one block; ``GATHER`` reads pool block ``ids[i]`` into
    packed slot ``i``, otherwise packed slot ``i`` goes to pool block ``ids[i]``."""
    i = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_elems
    pool_block = tl.load(ids_ptr + i).to(tl.int64)
    if GATHER:
        src, dst = src_ptr + pool_block * block_elems, dst_ptr + i * block_elems
    else:
        src, dst = src_ptr + i * block_elems, dst_ptr + pool_block * block_elems
    x = tl.load(src + offs, mask=mask)
    tl.store(dst + offs, x.to(dst_ptr.dtype.element_ty), mask=mask)


def _launch_copy(src: torch.Tensor, dst: torch.Tensor, block_ids: torch.Tensor, gather: bool) -> None:
    n = block_ids.shape[0]
    if n == 0:
        return
    block_elems = src[0].numel()
    grid = (n, triton.cdiv(block_elems, _COPY_BLOCK))
    _copy_blocks_kernel[grid](src, dst, block_ids, block_elems, GATHER=gather, CHUNK=_COPY_BLOCK)


def gather_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Pack blocks ``block_ids`` ``[n]`` into a new contiguous ``[n, 2, block_size, heads, head_dim]`` tensor."""
    check_kv_cache(kv_cache)
    check_int_index("block_ids", block_ids, (-1,), kv_cache)
    packed = torch.empty((block_ids.shape[0], *kv_cache.shape[1:]), dtype=kv_cache.dtype, device=kv_cache.device)
    _launch_copy(kv_cache, packed, block_ids, gather=True)
    return packed


def scatter_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor, packed: torch.Tensor) -> None:
    """Unpack ``packed`` ``[n, 2, block_size, heads, head_dim]`` into blocks ``block_ids`` ``[n]``."""
    check_kv_cache(kv_cache)
    check_int_index("block_ids", block_ids, (-1,), kv_cache)
    check_shape("packed", packed, (block_ids.shape[0], *kv_cache.shape[1:]))
    check_device("packed", packed, kv_cache)
    check_contiguous("packed", packed)
    _launch_copy(packed, kv_cache, block_ids, gather=False)


def ref_store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` at ``slot_mapping`` ``[num_tokens]``."""
    num_blocks, _, block_size, heads, head_dim = kv_cache.shape
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    # Rows of the cache seen as [num_blocks * 2 * block_size, heads, head_dim]: K then V per block.
    rows = slots // block_size * (2 * block_size) + slots % block_size
    flat = _indexable(kv_cache.view(num_blocks * 2 * block_size, heads, head_dim))
    flat.index_copy_(0, rows, _indexable(key[valid].to(kv_cache.dtype)))
    flat.index_copy_(0, rows + block_size, _indexable(value[valid].to(kv_cache.dtype)))


def _indexable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or the bytes of an 8-bit float one (torch's CPU ``index_copy_`` does not take those)."""
    return t.view(torch.uint8) if t.dtype in FP8_KV_DTYPES.values() else t


def ref_gather_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Pack blocks ``block_ids`` ``[n]`` into a new contiguous ``[n, 2, block_size, heads, head_dim]`` tensor."""
    return kv_cache.index_select(0, block_ids.long())


def ref_scatter_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor, packed: torch.Tensor) -> None:
    """Unpack ``packed`` ``[n, 2, block_size, heads, head_dim]`` into blocks ``block_ids`` ``[n]``."""
    _indexable(kv_cache).index_copy_(0, block_ids.long(), _indexable(packed.to(kv_cache.dtype)))
