"""Writing new keys/values into the paged KV cache, and packing a request's
blocks into one contiguous buffer (and back) for transfers.

KV cache layout, one tensor per layer: ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``.
A slot is ``block_id * block_size + offset``; a negative slot is padding and is skipped.
"""

from __future__ import annotations

import torch


def ref_store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` at ``slot_mapping`` ``[num_tokens]``."""
    block_size = kv_cache.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, 0, offsets] = key[valid].to(kv_cache.dtype)
    kv_cache[blocks, 1, offsets] = value[valid].to(kv_cache.dtype)


def ref_gather_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Pack blocks ``block_ids`` ``[n]`` into a new contiguous ``[n, 2, block_size, heads, head_dim]`` tensor."""
    return kv_cache.index_select(0, block_ids.long())


def ref_scatter_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor, packed: torch.Tensor) -> None:
    """Unpack ``packed`` ``[n, 2, block_size, heads, head_dim]`` into blocks ``block_ids`` ``[n]``."""
    kv_cache.index_copy_(0, block_ids.long(), packed.to(kv_cache.dtype))
