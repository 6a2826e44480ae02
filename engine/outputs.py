"""What the offline ``LLM`` answers, as vLLM's ``vllm.outputs`` types: a generation's
``RequestOutput`` (one ``CompletionOutput`` per sample), an embedding's ``EmbeddingRequestOutput``
and a scored pair's ``ScoringRequestOutput``, with vLLM's field names and order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from baton.engine.sequence import TokenLogprob

O = TypeVar("O")


@dataclass
class CompletionOutput:
    """One sample, as vLLM's: ``stop_reason`` is the stop string or stop token id that ended it
    (None for EOS or a length); ``logprobs`` and ``cumulative_logprob`` (the sum of its tokens'
    log-probs) are None unless ``logprobs`` were asked for. Each of ``logprobs`` is also vLLM's
    entry for its position, a mapping of token ids to ``Logprob`` (``TokenLogprob``)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    # vLLM's: None unless asked for; then None for the first token (nothing before it scores it), and
    # each later token's log-prob with its top alternatives (as a mapping, vLLM's entry)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt: str | None = None        # the prompt's text, where it was given as text
    finished: bool = True


@dataclass
class EmbeddingOutput:
    """vLLM's: a prompt's pooled embedding."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ScoringOutput:
    """vLLM's: a pair's score."""

    score: float


@dataclass
class PoolingRequestOutput(Generic[O]):
    """vLLM's: what a pooling call answers for one prompt (or one scored pair)."""

    request_id: str
    outputs: O
    prompt_token_ids: list[int]
    num_cached_tokens: int = 0
    finished: bool = True


@dataclass
class EmbeddingRequestOutput(PoolingRequestOutput[EmbeddingOutput]):
    """vLLM's: what ``LLM.embed`` answers for one prompt."""


@dataclass
class ScoringRequestOutput(PoolingRequestOutput[ScoringOutput]):
    """vLLM's: what ``LLM.score`` answers for one pair (``LLM.score`` says what its fields hold)."""
