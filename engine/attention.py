"""Attention over the paged KV cache: the per-step metadata every layer shares,
and the layer's attention over a cache that already holds the step's new K/V
(each layer writes them first, fused with rotary: ``ops.rotary_store_kv``).

Tokens of all scheduled chunks are packed into one flat batch ``[T]``; chunk ``i``
owns rows ``cu_query_lens[i]:cu_query_lens[i + 1]``, which sit at the last
``q_len`` positions of its ``seq_lens[i]``-token context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from baton.engine.sequence import ScheduledChunk
from baton.kernels import ops


@dataclass
class AttentionMetadata:
    """Index tensors for one forward pass, built once per step and passed to every layer."""

    positions: torch.Tensor       # [T] int64, absolute position of each new token
    slot_mapping: torch.Tensor    # [T] int64, block_id * block_size + offset where its K/V goes
    cu_query_lens: torch.Tensor   # [B + 1] int32, prefix sums of new tokens per chunk
    seq_lens: torch.Tensor        # [B] int32, context length (cached + new) per chunk
    block_tables: torch.Tensor    # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    num_decode_chunks: int        # leading chunks of decode_query_len rows each (a generated token, its draft): the decode kernel's
    rest_cu_query_lens: torch.Tensor | None  # [B - num_decode_chunks + 1] int32: cu_query_lens of the other chunks, from 0
    decode_query_len: int = 1     # rows per decode chunk: 1, or 1 + k in a CUDA graph's drafted step (every chunk padded to it)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def is_decode_only(self) -> bool:
        """Every chunk has exactly one new token."""
        return self.rest_cu_query_lens is None


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` (on the host) on ``device``; to a GPU through pinned memory without
    blocking the host (the caching host allocator keeps the buffer until the copy is done)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def build_attention_metadata(
    chunks: list[ScheduledChunk], block_size: int, device: torch.device | str = "cpu"
) -> AttentionMetadata:
    """Metadata for ``chunks`` (each computing ``seq.token_ids[start:start + num_new_tokens]``).
    Block tables are ``chunk.seq.block_table``; each must cover its chunk's last token."""
    if not chunks:
        raise ValueError("cannot build attention metadata for an empty batch")
    starts, q_lens, tables = [], [], []
    for chunk in chunks:
        start, n = chunk.start, chunk.num_new_tokens
        table = chunk.seq.block_table
        if n < 1:
            raise ValueError(f"sequence {chunk.seq.seq_id}: a chunk needs at least one new token, got {n}")
        if len(table) * block_size < start + n:
            raise ValueError(
                f"sequence {chunk.seq.seq_id}: {len(table)} blocks cannot hold {start + n} tokens "
                f"(block_size {block_size})"
            )
        starts.append(start)
        q_lens.append(n)
        tables.append(table)
    seq_lens_list = [s + n for s, n in zip(starts, q_lens)]
    num_decode = next((i for i, (chunk, start, n) in enumerate(zip(chunks, starts, q_lens))
                       if n != 1 or start < chunk.seq.num_prompt_tokens), len(q_lens))
    max_blocks = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
    if max(q_lens) == 1:
        # Decode: one token per chunk at position ``start``; plain Python beats tensor ops here.
        cu_query_lens = torch.arange(len(chunks) + 1, dtype=torch.int32)
        positions = torch.tensor(starts, dtype=torch.int64)
        slots = [t[s // block_size] * block_size + s % block_size for s, t in zip(starts, tables)]
        slot_mapping = torch.tensor(slots, dtype=torch.int64)
    else:
        cu_query_lens, positions, slot_mapping = _packed_positions_and_slots(starts, q_lens, block_tables, block_size)
    cu_on_device = to_device(cu_query_lens, device)
    if num_decode == len(q_lens):
        rest_cu_query_lens = None
    else:
        rest_cu_query_lens = cu_on_device if num_decode == 0 else to_device(cu_query_lens[num_decode:] - num_decode, device)
    return AttentionMetadata(
        positions=to_device(positions, device),
        slot_mapping=to_device(slot_mapping, device),
        cu_query_lens=cu_on_device,
        seq_lens=to_device(torch.tensor(seq_lens_list, dtype=torch.int32), device),
        block_tables=to_device(block_tables, device),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens_list),
        num_decode_chunks=num_decode,
        rest_cu_query_lens=rest_cu_query_lens,
    )


def _packed_positions_and_slots(
    starts: list[int], q_lens: list[int], block_tables: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cu_query_lens`` (int32), and per-token positions and cache slots (int64) of a packed batch.
    Computed in numpy: torch's CPU indexing took 13-19 ms for 4,096 tokens on a GPU host's
    virtual CPUs (thread-pool wake-ups), numpy takes tens of microseconds."""
    q_lens_np = np.asarray(q_lens, dtype=np.int64)
    cu_query_lens = np.zeros(len(q_lens) + 1, dtype=np.int64)
    np.cumsum(q_lens_np, out=cu_query_lens[1:])
    chunk_of_token = np.repeat(np.arange(len(q_lens)), q_lens_np)
    positions = np.asarray(starts, dtype=np.int64)[chunk_of_token] + np.arange(cu_query_lens[-1]) - cu_query_lens[:-1][chunk_of_token]
    block_ids = block_tables.numpy()[chunk_of_token, positions // block_size].astype(np.int64)
    slots = block_ids * block_size + positions % block_size
    return torch.from_numpy(cu_query_lens.astype(np.int32)), torch.from_numpy(positions), torch.from_numpy(slots)


def paged_attention_forward(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attend ``q`` ``[T, heads, head_dim]`` over each chunk's paged context in ``kv_cache``,
    which must already hold the chunk's new keys/values at ``meta.slot_mapping``; each query sees
    its last ``sliding_window`` keys only, and scores are capped at ``softcap`` (both None: off).

    The leading chunks that compute one generated token (the decodes the scheduler puts first)
    take the decode kernel, the others the prefill kernel. In the prefill kernel a one-token
    chunk fills one row of a 128-row query tile and each query head reloads its KV head's
    context. The split took the 1B model's batch-128 offline generate from 527 to 485 ms on an
    H200 (``bench/results/model_h200.md``). A CUDA graph's drafted step (every chunk a token and
    its draft, padded to ``meta.decode_query_len`` rows) takes the decode kernel whole, which also
    splits long contexts: 5 rows a sequence over 16k keys at the 8B shape took 34 us against the
    prefill kernel's 306 (``bench/results/kernels_h100.md``). A one-token chunk that ends a
    prompt (all of it but the last token cached) stays with the prompts: the decode kernel
    compiles a variant per batch and table width it meets eagerly, and a prefill worker, which
    sees only such chunks, compiled them in the middle of serving (``bench/results/serving_h200.md``)."""
    options = {"sliding_window": sliding_window, "softcap": softcap, "query_len": meta.decode_query_len}
    if meta.is_decode_only:
        return ops.paged_decode_attention(q, kv_cache, meta.seq_lens, meta.block_tables, scale, **options)
    n = meta.num_decode_chunks
    rows = n * meta.decode_query_len
    rest = ops.paged_attention(q[rows:], kv_cache, meta.rest_cu_query_lens, meta.seq_lens[n:], meta.block_tables[n:], scale,
                               sliding_window=sliding_window, softcap=softcap)
    if n == 0:
        return rest
    return torch.cat([ops.paged_decode_attention(q[:rows], kv_cache, meta.seq_lens[:n], meta.block_tables[:n], scale, **options), rest])
