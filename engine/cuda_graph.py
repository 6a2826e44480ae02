"""CUDA-graph capture and replay of decode steps.

A decode-only step (every chunk computes one token and samples it) replays a
graph captured for the smallest batch size in ``EngineConfig.cuda_graph_batch_sizes``
that holds it; prefill, mixed batches and steps with a layer hook run eagerly.
A step with a LoRA sequence replays a second set of graphs, captured with the
resident adapters (``engine/lora.py``: each row's adapter is one more static input,
-1 for the base model) and captured again whenever an adapter is loaded or unloaded;
a step of base sequences alone keeps the plain graphs, which compute no adapter.
With speculative decoding, a decode step where some chunk carries a draft replays
a graph of ``1 + num_speculative_tokens`` query rows a sequence: each chunk's own
token, its draft, then padding rows (no K/V written, logits dropped). Its attention
runs the decode kernel over those rows, causal, so a real row never reads a padding
row's key.

Each graph reads static device buffers: token ids, positions, slots, adapters, context
lengths, and block tables of a fixed width (``max_model_len`` plus the draft rows).
Rows past the real batch are padding: slot -1 (``rotary_store_kv`` writes no K/V
for it) and context length 0 (the decode kernel writes zeros, whatever block ids the
row still holds). The graph runs the whole forward and the logits of every row; ``run``
returns a view of the real rows, valid until the next replay (with drafts, a copy of them).

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

import numpy as np
import torch
from torch import nn

from baton.engine.attention import AttentionMetadata, to_device
from baton.engine.lora import LoRABatch, LoRAStack
from baton.engine.sequence import ScheduledChunk, Sequence

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
    """One new, sampled token of its own per chunk (a draft may follow it), and no prompt logits wanted."""
    for chunk in chunks:
        seq = chunk.seq
        if chunk.num_own_tokens != 1 or not chunk.samples:
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

    ``longs`` rows: token ids, positions, slots, adapters (int64), ``query_len`` entries a sequence.
    ``ints``: context lengths ``[max_batch]`` then block tables ``[max_batch, max_blocks]``
    (int32), so the lengths and the first ``batch`` table rows are one contiguous prefix.
    The tables reach ``max_query_len - 1`` positions past ``max_model_len``: padding rows'
    keys may lie there (stale, valid block ids; no real row reads them)."""

    def __init__(self, max_batch: int, max_query_len: int, max_model_len: int, block_size: int, vocab_size: int,
                 device: torch.device) -> None:
        self.max_batch, self.max_model_len, self.block_size, self.vocab_size = max_batch, max_model_len, block_size, vocab_size
        self.max_blocks = -(-(max_model_len + max_query_len - 1) // block_size)
        self.host_longs = torch.zeros((4, max_batch * max_query_len), dtype=torch.int64, pin_memory=True)
        self.host_ints = torch.zeros(max_batch * (1 + self.max_blocks), dtype=torch.int32, pin_memory=True)
        self.host_longs[2:] = -1
        self._longs_np, self._ints_np = self.host_longs.numpy(), self.host_ints.numpy()
        self._tables_np = self._ints_np[max_batch:].reshape(max_batch, self.max_blocks)
        self._written: list[tuple[list[int] | None, int]] = [(None, 0)] * max_batch   # per row: table list, entries copied
        self.longs = self.host_longs.to(device)
        self.ints = self.host_ints.to(device)
        self.cu_query_lens = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.copied = torch.cuda.Event()
        self.copied.record()

    def metadata(self, batch: int, query_len: int) -> AttentionMetadata:
        tables = self.ints[self.max_batch :].view(self.max_batch, self.max_blocks)
        rows = batch * query_len
        cu_query_lens = self.cu_query_lens[: batch + 1] * query_len if query_len > 1 else self.cu_query_lens[: batch + 1]
        return AttentionMetadata(
            positions=self.longs[1, :rows],
            slot_mapping=self.longs[2, :rows],
            cu_query_lens=cu_query_lens,
            seq_lens=self.ints[:batch],
            block_tables=tables[:batch],
            max_query_len=query_len,
            max_seq_len=self.max_model_len + query_len - 1,
            num_decode_chunks=batch,
            rest_cu_query_lens=None,
            decode_query_len=query_len,
        )

    def pad(self) -> None:
        """Make every row padding (no K/V written, zeros read), as before the first step: a
        capture between steps must not write K/V into the last step's slots."""
        self.copied.synchronize()
        self.longs[:2].zero_()
        self.longs[2:].fill_(-1)
        self.ints[: self.max_batch].zero_()

    def _check(self, seq: Sequence, end: int, num_blocks: int, lora: LoRAStack | None) -> None:
        """ValueError where ``seq``, computed up to ``end`` over ``num_blocks`` blocks, cannot be."""
        if end > self.max_model_len:
            raise ValueError(f"a sequence reaches {end} tokens, over max_model_len={self.max_model_len}")
        if seq.lora is not None and (lora is None or seq.lora not in lora.index):
            raise ValueError(f"sequence {seq.seq_id} runs under LoRA adapter {seq.lora!r}, which this CUDA graph lacks")
        if len(seq.block_table) < num_blocks:
            raise ValueError(f"sequence {seq.seq_id}: {len(seq.block_table)} blocks cannot hold {end} tokens "
                             f"(block_size {self.block_size})")

    def load(self, chunks: Seq[ScheduledChunk], batch: int, query_len: int, fed: FedTokens | None = None,
             lora: LoRAStack | None = None) -> None:
        """Stage ``chunks`` padded to ``batch`` sequences of ``query_len`` rows and start the
        copies to the device; then ``fed`` writes the tokens that are still on the device.
        With ``lora`` (the adapters the graph was captured with), each row's adapter is staged
        too (-1: none). Raises ValueError (before any copy) for a chunk the cache or vocab
        cannot take, or one under an adapter ``lora`` lacks (computed here, it would lack it).

        Block-table rows are written incrementally: a row that held the same block-table
        list last step (block tables only grow in place, and are replaced by a new list
        when a sequence is preempted) gets only its new entries. Entries past a row's
        length keep stale block ids, which are valid ids that attention masks out."""
        self.copied.synchronize()
        ids, positions, slots, starts, adapters = [], [], [], [], []
        tables, bs, written, last_position = self._tables_np, self.block_size, self._written, self.max_model_len - 1
        for i, chunk in enumerate(chunks):
            seq, start = chunk.seq, chunk.start
            table = seq.block_table
            end = start + chunk.num_new_tokens
            num_blocks = (end - 1) // bs + 1
            self._check(seq, end, num_blocks, lora)
            if lora is not None:
                adapters += [lora.index[seq.lora] if seq.lora is not None else -1] * query_len
            token = 0 if fed is not None and fed.rows[i] >= 0 else _token_at(chunk)
            if not 0 <= token < self.vocab_size or (chunk.draft and not all(0 <= t < self.vocab_size for t in chunk.draft)):
                raise ValueError(f"token ids must be in [0, {self.vocab_size}), got one outside")
            starts.append(start)
            if query_len == 1:     # plain decode, the common step: no lists to build
                ids.append(token)
                positions.append(start)
                slots.append(table[num_blocks - 1] * bs + start % bs)
            else:
                tokens = [token, *chunk.draft]
                padding = query_len - len(tokens)
                ids += tokens + [0] * padding
                positions += [*range(start, end), *(min(p, last_position) for p in range(end, end + padding))]
                slots += [table[p // bs] * bs + p % bs for p in range(start, end)] + [-1] * padding
            held, count = written[i]
            first = count if held is table else 0
            if first < num_blocks:
                tables[i, first:num_blocks] = table[first:num_blocks]
                written[i] = (table, num_blocks)
        n, real, rows = len(chunks), len(ids), batch * query_len
        longs, seq_lens = self._longs_np, self._ints_np
        longs[0, :real], longs[1, :real], longs[2, :real] = ids, positions, slots
        if lora is not None:
            longs[3, :real] = adapters
        seq_lens[:n] = np.asarray(starts) + query_len    # a sequence's rows are the last ones of its context
        # Padding sequences: length 0, so the decode kernel writes zeros for all their rows.
        longs[:2, real:rows], longs[2:, real:rows], seq_lens[n:batch] = 0, -1, 0
        self.longs[:, :rows].copy_(self.host_longs[:, :rows], non_blocking=True)
        used = self.max_batch + batch * self.max_blocks
        self.ints[:used].copy_(self.host_ints[:used], non_blocking=True)
        self.copied.record()
        if fed is not None:
            fed.write(self.longs[0], range(0, real, query_len))


class DecodeGraphs:
    """Captured decode graphs of ``model`` over ``kv_caches``, one per batch size, and with
    ``draft_len`` (speculative decoding's ``num_speculative_tokens``) one per batch size of
    ``1 + draft_len`` rows a sequence whose rows fit ``max_num_tokens``; with resident LoRA
    adapters (``capture_lora``), each of those shapes once more with them. A graph's key is
    its shape: (batch size, rows a sequence, with adapters)."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        batch_sizes: Seq[int],
        max_model_len: int,
        block_size: int,
        vocab_size: int,
        draft_len: int = 0,
        max_num_tokens: int | None = None,
    ) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.batch_sizes = sorted(batch_sizes)
        self.shapes = [(b, 1) for b in self.batch_sizes]
        self.draft_len = draft_len
        if draft_len:
            limit = max_num_tokens or self.batch_sizes[-1] * (1 + draft_len)
            self.shapes += [(b, 1 + draft_len) for b in self.batch_sizes if b * (1 + draft_len) <= limit]
        self.inputs = _StaticInputs(self.batch_sizes[-1], 1 + draft_len, max_model_len, block_size, vocab_size,
                                    kv_caches[0].device)
        self.lora: LoRAStack | None = None
        self.graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int, bool], torch.Tensor] = {}

    def _forward(self, batch: int, query_len: int, adapted: bool) -> torch.Tensor:
        meta = self.inputs.metadata(batch, query_len)
        rows = batch * query_len
        lora = LoRABatch(self.lora, self.inputs.longs[3, :rows]) if adapted else None
        hidden = self.model(self.inputs.longs[0, :rows], meta.positions, self.kv_caches, meta, lora=lora)
        return self.model.compute_logits(hidden)

    def capture(self) -> None:
        """Capture the plain graphs (before the first step)."""
        self._capture(adapted=False)

    def capture_lora(self, stack: LoRAStack) -> None:
        """Capture the graphs of steps with LoRA sequences over ``stack`` (a new one at every load
        and unload: the adapters' rows move), between steps; an empty stack drops them."""
        for shape in [shape for shape in self.graphs if shape[2]]:
            del self.graphs[shape], self.logits[shape]
        self.lora = stack if stack.names else None
        if self.lora is not None:
            self.inputs.pad()
            self._capture(adapted=True)

    @torch.inference_mode()
    def _capture(self, adapted: bool) -> None:
        """Warm up and capture every shape, largest first, into one memory pool (one for the plain
        graphs, one for those with adapters). The static inputs hold padding only, so neither
        touches the KV cache. Capture errors are this thread's alone: a worker's KV transfers may
        use the device meanwhile."""
        pool = None
        for batch, query_len in sorted(self.shapes, key=lambda s: s[0] * s[1], reverse=True):
            shape = (batch, query_len, adapted)
            for _ in range(_WARMUP_RUNS):
                self._forward(*shape)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.logits[shape] = self._forward(*shape)
            pool = graph.pool()
            self.graphs[shape] = graph
        torch.cuda.synchronize()

    def graph_shape(self, chunks: Seq[ScheduledChunk]) -> tuple[int, int, bool] | None:
        """The captured shape a decode step of ``chunks`` replays, if any."""
        if not chunks or not is_graph_step(chunks):
            return None
        longest_draft = max(len(chunk.draft) for chunk in chunks)
        if longest_draft > self.draft_len:
            return None
        query_len = 1 + self.draft_len if longest_draft else 1
        adapted = any(chunk.seq.lora is not None for chunk in chunks)
        return next(((b, q, adapted) for b, q in self.shapes
                     if q == query_len and b >= len(chunks) and (b, q, adapted) in self.graphs), None)

    def replay(self, chunks: Seq[ScheduledChunk], shape: tuple[int, int, bool], fed: FedTokens | None = None) -> torch.Tensor:
        """Replay the graph of ``shape`` (``graph_shape(chunks)``) for ``chunks`` (``fed``: the
        input tokens still on the device): the logits of each chunk's rows (its own token's, then
        its draft's; ``[len(chunks), vocab]`` without drafts) in the model's dtype, a view into the
        graph's output (valid until the next replay) or, with drafts, a copy of its real rows."""
        batch, query_len, adapted = shape
        self.inputs.load(chunks, batch, query_len, fed, self.lora if adapted else None)
        self.graphs[shape].replay()
        logits = self.logits[shape]
        if query_len == 1:
            return logits[: len(chunks)]
        rows = [i * query_len + j for i, chunk in enumerate(chunks) for j in range(chunk.num_new_tokens)]
        return logits.index_select(0, to_device(torch.tensor(rows, dtype=torch.int64), logits.device))
