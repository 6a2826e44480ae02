"""CUDA-graph capture and replay of decode steps.

A decode-only step (every chunk computes one token and samples it) replays a
graph captured for the smallest batch size in ``EngineConfig.cuda_graph_batch_sizes``
that holds it; prefill, mixed batches and steps with a layer hook run eagerly.

Each graph reads static device buffers: token ids, positions, slots, context
lengths, and block tables of a fixed width ``ceil(max_model_len / block_size)``.
Rows past the real batch are padding: slot -1 (``rotary_store_kv`` writes no K/V
for it) and context length 0 (attention writes zeros, whatever block ids the row
still holds). The graph runs the whole forward and the logits of every row;
``run`` returns a view of the real rows, valid until the next replay.

The host never waits on the GPU here: metadata is written into pinned staging
buffers and copied with ``non_blocking`` copies. Before overwriting the staging
buffers the host waits on the previous step's copy event, which in the engine
loop has completed (the host has read back the tokens of a step queued before it).
With async scheduling, input tokens the previous step sampled are copied on the
device into the token-id buffer after the staged ones (``FedTokens``).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import torch
from torch import nn

from baton.engine.attention import AttentionMetadata
from baton.engine.sequence import ScheduledChunk

if TYPE_CHECKING:
    from baton.engine.model_runner import FedTokens

_WARMUP_RUNS = 2


def capture_sizes(batch_sizes: Seq[int], max_num_seqs: int) -> list[int]:
    """The configured sizes up to the first one that holds ``max_num_seqs`` (ascending)."""
    sizes = sorted(set(batch_sizes))
    covering = [s for s in sizes if s >= max_num_seqs]
    limit = covering[0] if covering else sizes[-1]
    return [s for s in sizes if s <= limit]


def is_graph_step(chunks: Seq[ScheduledChunk]) -> bool:
    """One new, sampled token per chunk, and no prompt logits wanted."""
    for chunk in chunks:
        seq = chunk.seq
        if chunk.num_new_tokens != 1 or not chunk.samples:
            return False
        if seq.params.prompt_logprobs is not None and chunk.start < seq.num_prompt_tokens:
            return False
    return True


def _token_at(chunk: ScheduledChunk) -> int:
    seq, start = chunk.seq, chunk.start
    num_prompt = len(seq.prompt_token_ids)
    return seq.prompt_token_ids[start] if start < num_prompt else seq.output_token_ids[start - num_prompt]


class _StaticInputs:
    """Device buffers the graphs read, and the pinned host buffers that fill them.

    ``longs`` rows: token ids, positions, slots (int64). ``ints``: context lengths
    ``[max_batch]`` then block tables ``[max_batch, max_blocks]`` (int32), so the
    lengths and the first ``batch`` table rows are one contiguous prefix."""

    def __init__(self, max_batch: int, max_model_len: int, block_size: int, vocab_size: int, device: torch.device) -> None:
        self.max_batch, self.max_model_len, self.block_size, self.vocab_size = max_batch, max_model_len, block_size, vocab_size
        self.max_blocks = -(-max_model_len // block_size)
        self.host_longs = torch.zeros((3, max_batch), dtype=torch.int64, pin_memory=True)
        self.host_ints = torch.zeros(max_batch * (1 + self.max_blocks), dtype=torch.int32, pin_memory=True)
        self.host_longs[2] = -1
        self._longs_np, self._ints_np = self.host_longs.numpy(), self.host_ints.numpy()
        self._tables_np = self._ints_np[max_batch:].reshape(max_batch, self.max_blocks)
        self._written: list[tuple[list[int] | None, int]] = [(None, 0)] * max_batch   # per row: table list, entries copied
        self.longs = self.host_longs.to(device)
        self.ints = self.host_ints.to(device)
        self.cu_query_lens = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.copied = torch.cuda.Event()
        self.copied.record()

    def metadata(self, batch: int) -> AttentionMetadata:
        tables = self.ints[self.max_batch :].view(self.max_batch, self.max_blocks)
        return AttentionMetadata(
            positions=self.longs[1, :batch],
            slot_mapping=self.longs[2, :batch],
            cu_query_lens=self.cu_query_lens[: batch + 1],
            seq_lens=self.ints[:batch],
            block_tables=tables[:batch],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            num_decode_chunks=batch,
            rest_cu_query_lens=None,
        )

    def load(self, chunks: Seq[ScheduledChunk], batch: int, fed: FedTokens | None = None) -> None:
        """Stage ``chunks`` padded to ``batch`` rows and start the copies to the device;
        then ``fed`` writes the tokens that are still on the device.
        Raises ValueError (before any copy) for a chunk the cache or vocab cannot take.

        Block-table rows are written incrementally: a row that held the same block-table
        list last step (block tables only grow in place, and are replaced by a new list
        when a sequence is preempted) gets only its new entries. Entries past a row's
        length keep stale block ids, which are valid ids that attention masks out."""
        self.copied.synchronize()
        ids, positions, slots = [], [], []
        tables, bs, written = self._tables_np, self.block_size, self._written
        for i, chunk in enumerate(chunks):
            seq, start = chunk.seq, chunk.start
            table = seq.block_table
            num_blocks = start // bs + 1
            if start >= self.max_model_len:
                raise ValueError(f"a sequence reaches {start + 1} tokens, over max_model_len={self.max_model_len}")
            if len(table) < num_blocks:
                raise ValueError(
                    f"sequence {seq.seq_id}: {len(table)} blocks cannot hold {start + 1} tokens (block_size {bs})"
                )
            token = 0 if fed is not None and fed.rows[i] >= 0 else _token_at(chunk)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.vocab_size}), got one outside")
            ids.append(token)
            positions.append(start)
            slots.append(table[num_blocks - 1] * bs + start % bs)
            held, count = written[i]
            first = count if held is table else 0
            if first < num_blocks:
                tables[i, first:num_blocks] = table[first:num_blocks]
                written[i] = (table, num_blocks)
        n = len(chunks)
        longs, seq_lens = self._longs_np, self._ints_np
        longs[0, :n], longs[1, :n], longs[2, :n] = ids, positions, slots
        seq_lens[:n] = longs[1, :n] + 1
        longs[:2, n:batch], longs[2, n:batch], seq_lens[n:batch] = 0, -1, 0
        self.longs.copy_(self.host_longs, non_blocking=True)
        used = self.max_batch + batch * self.max_blocks
        self.ints[:used].copy_(self.host_ints[:used], non_blocking=True)
        self.copied.record()
        if fed is not None:
            fed.write(self.longs[0], range(n))


class DecodeGraphs:
    """Captured decode graphs of ``model`` over ``kv_caches``, one per batch size."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        batch_sizes: Seq[int],
        max_model_len: int,
        block_size: int,
        vocab_size: int,
    ) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.batch_sizes = sorted(batch_sizes)
        self.inputs = _StaticInputs(self.batch_sizes[-1], max_model_len, block_size, vocab_size, kv_caches[0].device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def _forward(self, batch: int) -> torch.Tensor:
        meta = self.inputs.metadata(batch)
        hidden = self.model(self.inputs.longs[0, :batch], meta.positions, self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every batch size, largest first, into one memory pool.
        The static inputs hold padding only, so neither touches the KV cache."""
        pool = None
        for batch in reversed(self.batch_sizes):
            for _ in range(_WARMUP_RUNS):
                self._forward(batch)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[batch] = self._forward(batch)
            pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize()

    def graph_size(self, num_seqs: int) -> int | None:
        """The captured batch size a step of ``num_seqs`` sequences runs in, if any."""
        return next((b for b in self.batch_sizes if b >= num_seqs and b in self.graphs), None)

    def can_run(self, chunks: Seq[ScheduledChunk]) -> bool:
        return bool(chunks) and self.graph_size(len(chunks)) is not None and is_graph_step(chunks)

    def run(self, chunks: Seq[ScheduledChunk], fed: FedTokens | None = None) -> torch.Tensor:
        """Replay the step for ``chunks`` (``fed``: the input tokens still on the device):
        ``[len(chunks), vocab]`` logits in the model's dtype, a view into the graph's output (valid
        until the next replay)."""
        if not self.can_run(chunks):
            raise ValueError(f"a step of {len(chunks)} chunks is not a decode step of at most {self.batch_sizes[-1]} sequences")
        batch = self.graph_size(len(chunks))
        self.inputs.load(chunks, batch, fed)
        self.graphs[batch].replay()
        return self.logits[batch][: len(chunks)]
