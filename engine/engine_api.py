"""What the engine core exchanges with the model runner it drives and with the services that
drive it: the runner's protocol and its step's output, the hook a step calls per layer, the
engine's counters, and the errors an adapter's name, load or unload can meet."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from baton.engine.pooling import PoolerConfig
from baton.engine.sequence import ScheduledChunk

if TYPE_CHECKING:
    from baton.engine.lora_loader import LoRAAdapter
    from baton.engine.model_runner import FedTokens


class ModelOutputLike(Protocol):
    logits: torch.Tensor                     # [num sampling chunks, vocab]
    prompt_logits: dict[str, torch.Tensor]   # seq_id -> [num_new_tokens, vocab]
    pooled: dict[str, torch.Tensor]          # seq_id -> [hidden_size]: the chunk's part of its embedding


LayerHook = Callable[[int, list[ScheduledChunk]], None]


class UnknownLoRA(ValueError):
    """A request (or an unload) names a LoRA adapter this engine has not loaded."""


class LoRAInUse(ValueError):
    """An unload of a LoRA adapter that unfinished sequences run under."""


class LoRAConflict(ValueError):
    """A load under the name of a LoRA adapter loaded with other weights."""


class ModelRunnerLike(Protocol):
    num_blocks: int
    max_model_len: int
    vocab_size: int
    generates: bool          # False: no LM head, embedding requests only
    pooler: PoolerConfig     # how embedding requests pool
    lora_names: frozenset[str]  # the LoRA adapters requests may name
    adapters: dict[str, LoRAAdapter]

    def read_lora(self, name: str, path: str) -> LoRAAdapter: ...
    def add_lora(self, adapter: LoRAAdapter) -> None: ...
    def remove_lora(self, name: str) -> LoRAAdapter: ...

    def execute(
        self,
        chunks: list[ScheduledChunk],
        on_layer_done: Callable[[int], None] | None = None,
        fed: FedTokens | None = None,
    ) -> ModelOutputLike: ...


@dataclass
class EngineStats:
    running: int
    waiting: int
    total_blocks: int
    free_blocks: int
    used_blocks: int
    cached_blocks: int
    spec_proposed_tokens: int = 0    # speculative decoding: draft tokens verified so far
    spec_accepted_tokens: int = 0    # and of those, accepted
    # Since the engine started: prompt tokens computed (an embedding's included), tokens
    # generated, and the prompt tokens first allocations looked up in the prefix cache, and found.
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    preemptions: int = 0             # sequences preempted for want of KV blocks (recomputed later)
