"""Runs the model for one scheduled step: packs the chunks' tokens into one flat
batch, builds the attention metadata once, runs the forward over the paged KV
cache, and returns the logits (in the model's dtype) of the rows that need them.
On CUDA, decode steps replay captured graphs (``engine/cuda_graph.py``), those with a
LoRA sequence graphs captured with the resident adapters (``engine/lora.py``) again at
each load and unload; everything else runs eagerly.

The runner owns the weights and the KV cache tensors (one per layer,
``[num_blocks, 2, block_size, num_kv_heads, head_dim]``). It never mutates the
``Sequence`` objects: the engine core advances them after sampling.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from baton.engine.attention import build_attention_metadata, to_device
from baton.engine.config import KV_CACHE_DTYPE_NAMES, EngineConfig
from baton.engine.cuda_graph import DecodeGraphs, capture_sizes
from baton.engine.loader import build_model, resolve_model_dir
from baton.engine.lora import LoRAStack
from baton.engine.lora_loader import LoRAAdapter, load_adapter, load_adapters
from baton.engine.model_config import ModelConfig, load_model_config, load_pooler_config
from baton.engine.pooling import PoolerConfig
from baton.engine.quantization import resolve_quantization
from baton.engine.rope import build_cos_sin_cache
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import ScheduledChunk, Sequence
from baton.kernels.checks import DTYPES, KV_DTYPES


@dataclass
class FedTokens:
    """Input tokens a step reads on the device rather than from the host (async
    scheduling): chunk ``i`` with ``rows[i] >= 0`` is a one-token chunk whose token
    is ``tokens[rows[i]]``, sampled by the step before and not yet read back."""

    tokens: torch.Tensor    # [n] int64, on the runner's device
    rows: list[int]         # per chunk: a row of ``tokens``, or -1 (the host has the token)

    def write(self, ids: torch.Tensor, offsets: Seq[int]) -> None:
        """Copy the fed tokens into ``ids`` (a step's flat input ids, on the device),
        chunk ``i``'s at ``offsets[i]``; no host wait."""
        dst = [offset for offset, row in zip(offsets, self.rows) if row >= 0]
        src = [row for row in self.rows if row >= 0]
        if dst:
            index = to_device(torch.tensor([dst, src], dtype=torch.int64), ids.device)
            ids.index_copy_(0, index[0], self.tokens.index_select(0, index[1]))


@dataclass
class ModelOutput:
    """``logits``: ``[rows, vocab]`` in the model's dtype, for each chunk with ``chunk.samples``
    in chunk order one row per position of its draft and one for its last own token, in token
    order (the last row is the last token's). ``prompt_logits``: seq_id -> ``[num_new_tokens, vocab]``
    for prompt chunks of sequences that asked for prompt logprobs; row ``j`` predicts the
    token at position ``chunk.start + j + 1``. ``pooled``: seq_id -> the chunk's part of its
    pooling sequence's embedding ``[hidden_size]`` (``pooled_part``), for chunks that have one."""

    logits: torch.Tensor
    prompt_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)


def _require_fp8_device(device: torch.device, what: str) -> None:
    """ValueError naming ``what`` where ``device`` is a GPU without 8-bit float arithmetic (compute
    capability below 8.9: before Ada and Hopper); the CPU takes the references."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"{what} need a GPU of compute capability 8.9 or later (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} has "
                         f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}")


class ModelRunner:
    """Loads ``model`` (a directory or hub id) per ``config`` and executes scheduled steps."""

    def __init__(self, model: str, config: EngineConfig) -> None:
        self.config = config
        self.model_dir: Path = resolve_model_dir(model, config.revision, config.download_dir)
        self.tokenizer_dir: Path = (resolve_model_dir(config.tokenizer, config.revision, config.download_dir)
                                    if config.tokenizer else self.model_dir)
        mc = load_model_config(self.model_dir, config.max_model_len)
        mc = replace(mc, quantization=resolve_quantization(config.quantization, mc.quantization, mc.moe is not None))
        self.model_config: ModelConfig = mc
        self.max_model_len: int = config.max_model_len or mc.max_position_embeddings
        self.vocab_size: int = mc.vocab_size
        self.generates: bool = mc.has_lm_head   # False: a base model, embeddings only
        self.pooler: PoolerConfig = config.pooler or load_pooler_config(self.model_dir)
        if not 0 < self.max_model_len <= mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} must be in [1, max_position_embeddings={mc.max_position_embeddings}]"
            )
        dtype_name = config.dtype or mc.dtype
        if dtype_name not in DTYPES:
            raise ValueError(f"dtype {dtype_name!r} is not supported; supported: {', '.join(DTYPES)}")
        self.dtype: torch.dtype = DTYPES[dtype_name]
        self.device = torch.device(config.device)
        kv_name = KV_CACHE_DTYPE_NAMES[config.kv_cache_dtype]
        self.kv_dtype: torch.dtype = KV_DTYPES[kv_name] if kv_name else self.dtype
        if kv_name:
            _require_fp8_device(self.device, f"kv_cache_dtype {config.kv_cache_dtype!r}: 8-bit float KV caches")
        if mc.quantization:
            _require_fp8_device(self.device, f"{mc.quantization} quantization: E4M3 weights")
        self.block_size = config.block_size
        self.model = build_model(self.model_dir, mc, self.dtype, self.device)
        local = build_cos_sin_cache(mc.local_rope, mc.rotary_dim, self.max_model_len, self.device) if mc.local_rope else None
        self.model.set_cos_sin_cache(build_cos_sin_cache(mc.rope, mc.rotary_dim, self.max_model_len, self.device), local)
        self.cuda_graphs: DecodeGraphs | None = None
        self._set_adapters({a.name: a for a in load_adapters(config.lora_modules, mc, config.max_lora_rank)})
        self.num_blocks: int = config.num_blocks or (
            self._blocks_in_device_share() if config.gpu_memory_utilization is not None else self._blocks_that_fit())
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        shape = (self.num_blocks, 2, self.block_size, mc.num_kv_heads, mc.head_dim)
        self.kv_caches: list[torch.Tensor] = [
            torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(mc.num_layers)
        ]
        if self.device.type == "cuda" and not config.enforce_eager:
            sizes = capture_sizes(config.cuda_graph_batch_sizes, config.max_num_seqs)
            draft_len = config.speculative.num_speculative_tokens if config.speculative is not None else 0
            self.cuda_graphs = DecodeGraphs(self.model, self.kv_caches, sizes, self.max_model_len, self.block_size, self.vocab_size,
                                            draft_len, config.max_num_batched_tokens)
            self.cuda_graphs.capture()
            self.cuda_graphs.capture_lora(self.lora)

    # -- LoRA adapters: those of ``config.lora_modules``, and any loaded or unloaded since ---------

    def read_lora(self, name: str, path: str) -> LoRAAdapter:
        """Read and check an adapter for this model, as those of ``lora_modules`` are at start; changes
        nothing, so any thread may call it."""
        return load_adapter(name, path, self.model_config, self.config.max_lora_rank)

    def add_lora(self, adapter: LoRAAdapter) -> None:
        """Make ``adapter`` resident, for the steps after this call (between steps only); ValueError
        where its name is taken or ``max_loras`` adapters are loaded already."""
        if adapter.name in self.adapters:
            raise ValueError(f"LoRA adapter {adapter.name!r} is loaded already")
        if len(self.adapters) >= self.config.max_loras:
            raise ValueError(f"LoRA adapter {adapter.name!r}: {len(self.adapters)} adapters are loaded "
                             f"({', '.join(self.adapters)}) and max_loras={self.config.max_loras}; unload one first")
        self._set_adapters({**self.adapters, adapter.name: adapter})

    def remove_lora(self, name: str) -> LoRAAdapter:
        """Drop a resident adapter (between steps only, and only once no sequence runs under it)."""
        adapters = dict(self.adapters)
        removed = adapters.pop(name)
        self._set_adapters(adapters)
        return removed

    def _set_adapters(self, adapters: dict[str, LoRAAdapter]) -> None:
        """Restack the resident adapters (each one's rows move; the engine core swaps them between
        steps) and capture the graphs that read them."""
        self.lora = LoRAStack(list(adapters.values()), self.model_config, self.device, self.dtype)
        self.adapters = adapters
        self.lora_names: frozenset[str] = frozenset(adapters)
        if self.cuda_graphs is not None:
            self.cuda_graphs.capture_lora(self.lora)

    def block_bytes(self) -> int:
        """Bytes one block takes across all layers (K and V)."""
        mc = self.model_config
        per_layer = 2 * self.block_size * mc.num_kv_heads * mc.head_dim * self.kv_dtype.itemsize
        return per_layer * mc.num_layers

    def _blocks_that_fit(self) -> int:
        num_blocks = self.config.kv_cache_memory_bytes // self.block_bytes()
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory_bytes={self.config.kv_cache_memory_bytes} cannot hold one block "
                f"({self.block_bytes()} bytes)"
            )
        return num_blocks

    def _blocks_in_device_share(self) -> int:
        """The KV blocks that fit ``gpu_memory_utilization`` of the device's memory beside what this
        process's torch allocations peak at without them: the weights, and the activations of
        the largest step (run once, over a scratch cache). The CUDA context and the CUDA graphs
        captured later come on top."""
        torch.cuda.reset_peak_memory_stats(self.device)
        scratch = self.profile_step()
        peak = torch.cuda.max_memory_allocated(self.device) - scratch
        torch.cuda.empty_cache()   # the scratch cache and the activations go back to the device
        free, total = torch.cuda.mem_get_info(self.device)
        return kv_blocks_in_share(self.config.gpu_memory_utilization, total, peak, free, self.block_bytes(), str(self.device))

    @torch.inference_mode()
    def profile_step(self) -> int:
        """Run the largest step this engine schedules (``max_num_batched_tokens`` prompt tokens of
        one sequence, logits for ``max_num_seqs`` rows) over a scratch KV cache, freed after;
        return the scratch cache's bytes."""
        mc = self.model_config
        tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        blocks = -(-tokens // self.block_size)
        scratch = [torch.zeros((blocks, 2, self.block_size, mc.num_kv_heads, mc.head_dim), dtype=self.kv_dtype,
                               device=self.device) for _ in range(mc.num_layers)]
        seq = Sequence("memory-profile", [0] * tokens, SamplingParams(max_tokens=1))
        seq.block_table = list(range(blocks))
        chunk = ScheduledChunk(seq, tokens)
        meta = build_attention_metadata([chunk], self.block_size, self.device)
        hidden = self.model(torch.zeros(tokens, dtype=torch.int64, device=self.device), meta.positions, scratch, meta)
        if self.generates:
            self.model.compute_logits(hidden[: min(tokens, self.config.max_num_seqs)])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return sum(cache.numel() * cache.element_size() for cache in scratch)

    @torch.inference_mode()
    def execute(
        self,
        chunks: list[ScheduledChunk],
        on_layer_done: Callable[[int], None] | None = None,
        fed: FedTokens | None = None,
    ) -> ModelOutput:
        """Compute ``chunks`` (writing their KV into the cache) and return the logits they need.
        ``on_layer_done(i)`` is called once layer ``i`` has written this step's KV; ``fed``
        gives the chunks whose input token is still on the device.
        A decode step without a hook (speculative drafts included) replays a CUDA graph when
        one holds it; its logits are then a view into the graph's output, valid until the next
        step (with drafts, a copy of the real rows)."""
        shape = self.cuda_graphs.graph_shape(chunks) if on_layer_done is None and self.cuda_graphs is not None else None
        if shape is not None:
            return ModelOutput(logits=self.cuda_graphs.replay(chunks, shape, fed))
        meta = build_attention_metadata(chunks, self.block_size, self.device)
        if meta.max_seq_len > self.max_model_len:
            raise ValueError(f"a sequence reaches {meta.max_seq_len} tokens, over max_model_len={self.max_model_len}")
        ends = list(itertools.accumulate(chunk.num_new_tokens for chunk in chunks))
        input_ids = self._input_ids(chunks, fed)
        if fed is not None:
            fed.write(input_ids, [end - 1 for end in ends])
        hidden = self.model(input_ids, meta.positions, self.kv_caches, meta, on_layer_done, self.lora.batch(chunks))
        sample_rows = [row for i, chunk in enumerate(chunks) if chunk.samples
                       for row in range(ends[i] - 1 - len(chunk.draft), ends[i])]
        rows = to_device(torch.tensor(sample_rows, dtype=torch.int64), self.device)
        output = ModelOutput(logits=self.model.compute_logits(hidden.index_select(0, rows)) if sample_rows
                             else hidden.new_empty((0, self.vocab_size)))
        for i, chunk in enumerate(chunks):
            seq = chunk.seq
            wants_logits = seq.params.prompt_logprobs is not None and chunk.start < seq.num_prompt_tokens
            if seq.pooling is None and not wants_logits:    # most chunks: no per-chunk rows to slice
                continue
            chunk_hidden = hidden[ends[i] - chunk.num_new_tokens : ends[i]]
            part = pooled_part(chunk, chunk_hidden) if seq.pooling is not None else None
            if part is not None:
                output.pooled[seq.seq_id] = part
            if wants_logits:
                output.prompt_logits[seq.seq_id] = self.model.compute_logits(chunk_hidden)
        return output

    def _input_ids(self, chunks: list[ScheduledChunk], fed: FedTokens | None) -> torch.Tensor:
        """The chunks' input ids from the host; a fed chunk's token is a 0 for ``fed.write`` to replace."""
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            if fed is not None and fed.rows[i] >= 0:
                ids.append(0)
            else:
                ids.extend(_chunk_token_ids(chunk.seq, chunk.start, chunk.num_own_tokens) + chunk.draft)
        vocab = self.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}), got one outside")
        return to_device(torch.tensor(ids, dtype=torch.int64), self.device)


def pooled_part(chunk: ScheduledChunk, hidden: torch.Tensor) -> torch.Tensor | None:
    """A pooling chunk's part of its sequence's embedding, from the chunk's final hidden states
    ``hidden`` (``[num_new_tokens, hidden_size]``): MEAN, their float32 sum (the engine core adds
    the chunks' up and divides); CLS, position 0's, in the chunk that starts there (a copy: kept
    until the prompt ends, a view would keep the whole step's states); LAST, the last token's, in
    the chunk that ends the prompt. None when the chunk has no part."""
    pooling_type = chunk.seq.pooling.pooling_type
    if pooling_type == "MEAN":
        return hidden.sum(dim=0, dtype=torch.float32)
    if pooling_type == "CLS":
        return hidden[0].clone() if chunk.start == 0 else None
    return hidden[-1] if chunk.pools else None


def _chunk_token_ids(seq: Sequence, start: int, n: int) -> list[int]:
    """``seq.token_ids[start:start + n]`` without concatenating the whole sequence."""
    num_prompt = len(seq.prompt_token_ids)
    if start + n > num_prompt + len(seq.output_token_ids):
        raise ValueError(f"sequence {seq.seq_id}: chunk [{start}, {start + n}) runs past its {seq.num_tokens} tokens")
    if start >= num_prompt:
        return seq.output_token_ids[start - num_prompt : start - num_prompt + n]
    if start + n <= num_prompt:
        return seq.prompt_token_ids[start : start + n]
    return seq.prompt_token_ids[start:] + seq.output_token_ids[: start + n - num_prompt]


def kv_blocks_in_share(utilization: float, total: int, peak: int, available: int, block_bytes: int, device: str) -> int:
    """How many KV blocks of ``block_bytes`` fit ``utilization`` of a device's ``total`` bytes beside
    ``peak`` (what the engine takes without its KV cache); ValueError where none does, or where
    the device has less than that ``available`` (another process holds the rest)."""
    share = utilization * total
    kv_bytes = share - peak
    if kv_bytes < block_bytes:
        raise ValueError(f"gpu_memory_utilization={utilization:g} gives {share / 2**30:.2f} GiB of {device}, and the "
                         f"weights and the activations of the largest step take {peak / 2**30:.2f} GiB of it: no room for "
                         f"a KV block of {block_bytes / 2**20:.2f} MiB (raise it, or lower max_num_batched_tokens)")
    if kv_bytes > available:
        raise ValueError(f"gpu_memory_utilization={utilization:g} asks for a {kv_bytes / 2**30:.2f} GiB KV cache, but "
                         f"{device} has {available / 2**30:.2f} GiB free (other processes hold the rest): lower it")
    return int(kv_bytes // block_bytes)
