"""One choice of a response: a backend sequence with its incremental
detokenizer and stop-string matcher, turning backend chunks into deltas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from baton.engine.sequence import TokenLogprob
from baton.services.gateway import metrics
from baton.services.gateway.backend import GenerationChunk, GenerationRequest
from baton.services.gateway.reasoning import ThinkStream
from baton.services.gateway.tokenizer import IncrementalDetokenizer, StopStringMatcher
from baton.services.gateway.tool_parsers import ToolStream


@dataclass
class Prompt:
    token_ids: list[int]
    text: str = ""                                        # decoded, only for echo
    offsets: list[int] = field(default_factory=list)      # each token's start within ``text``
    logprobs: list[TokenLogprob] | None = None            # each token's after the first, as its first sample got them


@dataclass
class Delta:
    """What one choice produced since its previous delta."""

    index: int
    text: str
    tokens: list[TokenLogprob]
    offsets: list[int]           # each token's start within the choice's output text
    finish_reason: str | None
    first: bool
    stop_reason: int | str | None = None   # with finish_reason "stop": the stop string or token id (vLLM's)


@dataclass
class Choice:
    """One backend sequence: its request and its text so far."""

    index: int
    sample: int                  # which of the prompt's n samples
    prompt: Prompt
    request: GenerationRequest
    detok: IncrementalDetokenizer
    stop: StopStringMatcher
    started: bool = False
    cached_tokens: int = 0
    num_tokens: int = 0
    text_len: int = 0
    finish_reason: str | None = None
    text: list[str] = field(default_factory=list)
    placement: tuple[str, ...] = ()   # where the backend runs it (the latest attempt's)
    reasoning: ThinkStream | None = None    # splits a reasoning model's thinking from its answer
    tool_stream: ToolStream | None = None   # reads a streamed answer's own tool calls (tool_choice "auto")
    tool_calls_sent: int = 0                # calls whose first piece has gone out
    eos_token_ids: frozenset[int] = frozenset()   # the model's: a stop on one of them has no stop_reason
    last_token: int | None = None
    stop_reason: int | str | None = None    # vLLM's: the stop string or stop token id that ended it, if one did
    prompt_only: bool = False               # its output is left out (CompletionRequest.prompt_only)

    def consume(self, chunk: GenerationChunk) -> Delta:
        first, self.started = not self.started, True
        if first:
            self.cached_tokens = chunk.cached_tokens
            metrics.record_prompt(len(self.prompt.token_ids), chunk.cached_tokens)
            if chunk.prompt_logprobs is not None:
                self.prompt.logprobs = chunk.prompt_logprobs
        if chunk.placement:
            self.placement = chunk.placement
        pieces: list[str] = []
        tokens: list[TokenLogprob] = []
        offsets: list[int] = []
        finish = None
        for token in chunk.tokens:
            tokens.append(token)
            offsets.append(self.text_len + sum(map(len, pieces)))
            self.last_token = token.token_id
            result = self.stop.feed(self.detok.add(token.token_id))
            pieces.append(result.text)
            if result.stopped:
                finish, self.stop_reason = "stop", result.matched
                break
        if finish is None and chunk.finish_reason is not None:
            tail = self.stop.feed(self.detok.flush())
            pieces.append(tail.text if tail.stopped else tail.text + self.stop.flush())
            finish = "stop" if tail.stopped else chunk.finish_reason
            self.stop_reason = tail.matched if tail.stopped else self._stop_token(finish)
        text = "".join(pieces)
        if self.prompt_only:   # the one token the workers had to generate is no part of the answer
            tokens, offsets, text, self.stop_reason = [], [], "", None
            finish = finish and "length"
        self.num_tokens += len(tokens)
        self.text_len += len(text)
        self.text.append(text)
        self.finish_reason = finish
        return Delta(self.index, text, tokens, offsets, finish, first, self.stop_reason if finish else None)

    def _stop_token(self, finish: str) -> int | None:
        """The stop token id (of ``stop_token_ids``) the workers stopped on, as vLLM reports it:
        none for an EOS token (unless ``ignore_eos``), nor for a stop with another cause."""
        params, last = self.request.params, self.last_token
        if finish != "stop" or last is None or last not in params.stop_token_ids:
            return None
        return None if last in self.eos_token_ids and not params.ignore_eos else last


async def close_stream(iterator: AsyncIterator[GenerationChunk]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
