"""A request as the engine sees it, and the per-step batch the scheduler hands
to the model runner. Pure Python: no torch."""

from __future__ import annotations

import enum
from collections.abc import Callable, ItemsView, Iterator, Mapping, ValuesView
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from baton.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from baton.engine.pooling import PoolerConfig
    from baton.engine.speculative import NgramIndex
    from baton.engine.structured_output import Grammar


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # queued; no blocks (or preempted: blocks given back)
    RUNNING = "running"      # holds blocks; prefilling (chunk by chunk) or decoding
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class Logprob:
    """vLLM's: one token's log-prob at a position, its ``rank`` (how many tokens of the
    vocabulary are at least as likely; None where not computed) and its text (None where
    no tokenizer wrote it: the offline ``LLM``'s outputs carry it)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(slots=True)
class TokenLogprob(Mapping[int, Logprob]):
    """Log-probability of one token and, when asked for, its top alternatives. ``rank``: how many
    tokens of the vocabulary are at least as likely (1 = the most likely), as vLLM counts it;
    computed for prompt tokens only (None elsewhere).

    As a mapping it is vLLM's entry for the position (``out.logprobs[i][token_id].logprob``):
    ``ranked()``'s tokens, each entry's ``decoded_token`` written by ``decode`` (a token id's
    text; None: left None)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None
    decode: Callable[[int], str] | None = field(default=None, compare=False, repr=False)

    def ranked(self, k: int | None = None) -> dict[int, Logprob]:
        """The token itself, then its top-``k`` alternatives (all: None) not already in, with their
        ranks (the alternatives 1 to ``k``; the token its own ``rank``, or its place among them)."""
        return {token_id: self._logprob(token_id, logprob, rank) for token_id, logprob, rank in self._ranks(k)}

    def _ranks(self, k: int | None = None) -> Iterator[tuple[int, float, int | None]]:
        """``ranked``'s entries as (token id, log-prob, rank), in its order, none decoded."""
        rank = self.rank
        if rank is None:
            rank = next((place for place, (token_id, _) in enumerate(self.top, 1) if token_id == self.token_id), None)
        yield self.token_id, self.logprob, rank
        seen = {self.token_id}
        for place, (token_id, logprob) in enumerate(self.top[:k], 1):
            if token_id not in seen:
                seen.add(token_id)
                yield token_id, logprob, place

    def _logprob(self, token_id: int, logprob: float, rank: int | None) -> Logprob:
        return Logprob(logprob, rank, self.decode(token_id) if self.decode else None)

    # A lookup, iteration and length decode no other entry's text (ranked() would decode them all).
    def __getitem__(self, token_id: int) -> Logprob:
        entry = next((e for e in self._ranks() if e[0] == token_id), None)
        if entry is None:
            raise KeyError(token_id)
        return self._logprob(*entry)

    def __iter__(self) -> Iterator[int]:
        return (token_id for token_id, _, _ in self._ranks())

    def __len__(self) -> int:
        return sum(1 for _ in self._ranks())

    # items() and values() build the entries once (Mapping's own would look each key up again).
    def items(self) -> ItemsView[int, Logprob]:
        return self.ranked().items()

    def values(self) -> ValuesView[Logprob]:
        return self.ranked().values()


@dataclass(eq=False)
class Sequence:
    """One sequence: its tokens, its place in the paged KV cache, and its progress.

    ``num_computed_tokens`` counts the tokens whose KV is in the cache (a cached
    prefix counts); the next forward pass computes ``token_ids[num_computed_tokens:]``
    (or a chunk of it). With async scheduling, a token sampled by a step whose
    results the host has not read yet is *pending*: it counts in ``num_tokens`` (so
    the next step computes it, reading it on the device) but is not in ``token_ids``.
    """

    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int = 0                         # the sampling seed actually used (params.seed or drawn)
    arrival_time: float = 0.0             # time.monotonic() when the engine took it
    scheduled_time: float | None = None   # time.monotonic() when a step first computed it (None: not yet)
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0            # prompt tokens served from the prefix cache
    num_pending_tokens: int = 0           # sampled on the device, not yet appended (0 or 1)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None      # "stop" | "length" | "abort"
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    grammar: Grammar | None = None        # structured output: advanced over each appended token
    priority: int = 0                     # with the "priority" policy: lower is scheduled first
    ngram_index: NgramIndex | None = None  # speculative decoding: where its n-grams occurred
    pooling: PoolerConfig | None = None   # an embedding request: how its prompt's hidden states pool; no output
    pooled: torch.Tensor | None = None    # a pooling sequence's chunks' contributions so far (``engine_core``)
    embedding: list[float] | None = None  # a pooling sequence's, once its prompt is computed
    lora: str | None = None               # the LoRA adapter it runs under (None: the base model)
    cache_salt: str | None = None         # salts its blocks' hashes: only requests with the same salt share them

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def reuses_prefix(self) -> bool:
        """Whether a cached prefix may stand in for computing the prompt's start: not when rows
        that only computing it gives are wanted (prompt logprobs; MEAN or CLS pooling's hidden states)."""
        return self.params.prompt_logprobs is None and (self.pooling is None or not self.pooling.needs_whole_prompt)


@dataclass(slots=True)
class ScheduledChunk:
    """Compute ``seq.token_ids[start : start + num_new_tokens]`` this step, where
    ``start == seq.num_computed_tokens`` when the step was scheduled. The chunk
    samples a token when it reaches the end of the sequence (a pooling one's ``pools``
    instead: its embedding is complete). A decode chunk may carry a
    speculative ``draft``: tokens proposed to follow, computed after the sequence's own
    and counted in ``num_new_tokens``; it samples one token per position of the draft
    too (``engine/speculative.py``)."""

    seq: Sequence
    num_new_tokens: int
    draft: list[int] = field(default_factory=list)

    @property
    def start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def num_own_tokens(self) -> int:
        """The sequence's own tokens this chunk computes (the rest is its draft)."""
        return self.num_new_tokens - len(self.draft)

    @property
    def samples(self) -> bool:
        return self.start + self.num_own_tokens == self.seq.num_tokens and self.seq.pooling is None

    @property
    def pools(self) -> bool:
        return self.start + self.num_own_tokens == self.seq.num_tokens and self.seq.pooling is not None


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks
