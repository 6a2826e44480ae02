"""Attention over the paged KV cache.

``paged_attention`` serves any batch: each sequence has ``q_len`` new query
tokens that are the last ``q_len`` positions of its ``seq_len``-token context
(a cached prefix, earlier chunks, then the new tokens), attended causally.
``paged_decode_attention`` is the special case of every sequence's ``q_len`` equal and short
(1, or a token and its draft).

Shapes: ``q`` ``[num_tokens, num_heads, head_dim]``; ``kv_cache``
``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` (in ``q``'s dtype, or 8-bit floats
widened to it as they are read); ``cu_query_lens``
``[batch + 1]`` int32 prefix sums of ``q_len``; ``seq_lens`` ``[batch]`` int32;
``block_tables`` ``[batch, max_blocks]`` int32 (entries past a sequence's
blocks are ignored). Query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``.
Both take ``sliding_window`` and ``softcap`` (``attention_options``): each query sees only
its last ``sliding_window`` keys, and scores are capped at ``softcap``.

The Triton kernels live in ``attention_prefill`` and ``attention_decode`` and are
re-exported here beside their references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from baton.kernels.attention_decode import paged_decode_attention
from baton.kernels.attention_options import window_and_softcap
from baton.kernels.attention_prefill import paged_attention

__all__ = ["paged_attention", "paged_decode_attention", "ref_paged_attention", "ref_paged_decode_attention"]


def _gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence as ``[seq_len, num_kv_heads, head_dim]`` each."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = kv_cache.index_select(0, block_table[:num_blocks].long())
    k = blocks[:, 0].flatten(0, 1)[:seq_len]
    v = blocks[:, 1].flatten(0, 1)[:seq_len]
    return k, v


def _visible(k_pos: torch.Tensor, q_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Whether the query at ``q_pos`` sees the key at ``k_pos`` (broadcast): causally, and within
    the last ``window`` keys where ``window`` is not 0."""
    seen = k_pos <= q_pos
    return seen & (k_pos > q_pos - window) if window else seen


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, cap: float) -> torch.Tensor:
    """Float32 attention of ``q`` ``[..., heads, L, d]`` over ``k``, ``v`` ``[..., kv_heads, S, d]``
    where the boolean ``mask`` (broadcast to ``[..., heads, L, S]``) holds. SDPA has no cap on
    scores, so capped ones take the math written out; there, as from SDPA, a row that sees no
    key gets zeros."""
    q, k, v = q.float(), k.float(), v.float()
    if not cap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    s = q @ k.transpose(-2, -1) * scale
    s = (cap * torch.tanh(s / cap)).masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


# Query runs up to this long (decodes, speculative drafts) are attended in one padded call:
# a loop over sequences costs more than the padding there. Prompts, longer, go one at a time.
_PADDED_QUERY_LEN = 16


def ref_paged_attention(
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
    window, cap = window_and_softcap(sliding_window, softcap)
    starts, lens = cu_query_lens.tolist(), seq_lens.tolist()
    q_lens = [b - a for a, b in zip(starts, starts[1:])]
    if len(lens) > 1 and max(q_lens) <= _PADDED_QUERY_LEN:
        return _ref_padded_attention(q, kv_cache, q_lens, lens, block_tables, scale, window, cap)
    out = torch.empty_like(q)
    for i, seq_len in enumerate(lens):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        k, v = _gather_context(kv_cache, block_tables[i], seq_len)
        # Query j sits at absolute position seq_len - q_len + j.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = _visible(torch.arange(seq_len, device=q.device)[None, :], q_pos[:, None], window)
        o = _attend(q[q_start:q_end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask, scale, cap)
        out[q_start:q_end] = o.transpose(0, 1).to(q.dtype)
    return out


def _ref_padded_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, q_lens: list[int], seq_lens: list[int], block_tables: torch.Tensor, scale: float,
    window: int, cap: float,
) -> torch.Tensor:
    """``ref_paged_attention`` in one call: queries padded to the longest run, contexts to the
    longest context. Padding query rows are dropped."""
    batch, (_, _, block_size, _, head_dim) = len(seq_lens), kv_cache.shape
    max_q, max_blocks = max(q_lens), -(-max(seq_lens) // block_size)
    k, v = _gather_padded(kv_cache, block_tables, max_blocks)
    row = torch.arange(max_q)
    lens = torch.tensor(q_lens)
    real = (row[None, :] < lens[:, None]).reshape(-1).to(q.device)
    padded = q.new_zeros(batch * max_q, q.shape[1], head_dim)
    padded[real] = q
    q_pos = torch.tensor(seq_lens)[:, None] - lens[:, None] + row[None, :]           # [batch, max_q]
    mask = _visible(torch.arange(max_blocks * block_size)[None, None, :], q_pos[:, :, None], window).to(q.device)
    o = _attend(padded.view(batch, max_q, -1, head_dim).transpose(1, 2), k, v, mask[:, None], scale, cap)
    return o.transpose(1, 2).reshape(batch * max_q, -1, head_dim)[real].to(q.dtype)


def _gather_padded(kv_cache: torch.Tensor, block_tables: torch.Tensor, max_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of every sequence's first ``max_blocks`` blocks, ``[batch, kv_heads, ctx, head_dim]`` each
    (each block's K is contiguous, so K and V are gathered separately)."""
    batch, (_, _, block_size, num_kv_heads, head_dim) = block_tables.shape[0], kv_cache.shape
    ids = block_tables[:, :max_blocks].reshape(-1).long()
    k = kv_cache[:, 0].index_select(0, ids).view(batch, max_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)
    v = kv_cache[:, 1].index_select(0, ids).view(batch, max_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)
    return k, v


def ref_paged_decode_attention(
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
    """``query_len`` query rows per sequence (``q`` ``[batch * query_len, num_heads, head_dim]``),
    the last ``query_len`` positions of its paged context, attended causally."""
    window, cap = window_and_softcap(sliding_window, softcap)
    rows, num_heads, head_dim = q.shape
    batch = rows // query_len
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    max_len = int(seq_lens.max()) if batch else 0
    max_blocks = (max_len + block_size - 1) // block_size
    ctx_len = max_blocks * block_size
    k, v = _gather_padded(kv_cache, block_tables, max_blocks)
    # Each KV head serves its group's query heads at every row: [batch, kv_heads, rows x group, dim].
    # On the CPU (the engine's decode path there) SDPA repeating the KV heads took up to 4x as long.
    qg = q.view(batch, query_len, num_kv_heads, group, head_dim).transpose(1, 2)
    qg = qg.reshape(batch, num_kv_heads, query_len * group, head_dim)
    q_pos = seq_lens[:, None].to(q.device) - query_len + torch.arange(query_len, device=q.device)   # [batch, query_len]
    mask = _visible(torch.arange(ctx_len, device=q.device)[None, None, :], q_pos[:, :, None], window)   # [batch, query_len, ctx]
    if query_len > 1:   # else one mask row for every head (a broadcast mask: 2x faster at one short sequence)
        mask = mask[:, :, None].expand(batch, query_len, group, ctx_len).reshape(batch, query_len * group, ctx_len)
    o = _attend(qg, k, v, mask[:, None], scale, cap)
    return o.view(batch, num_kv_heads, query_len, group, head_dim).transpose(1, 2).reshape(rows, num_heads, head_dim).to(q.dtype)
