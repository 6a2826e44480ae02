"""Running a request's choices on the backend: each choice's backend stream turned into
deltas (``run``), every choice of the request merged as their deltas come, a prompt's later
samples starting beside its first (``merge``), and the merged deltas collected for one
response (``collect``) or formatted as SSE chunks (``stream``); each request metered once.

Every backend iterator is closed when its choice ends early (stop string, client gone,
error): closing it aborts the sequence on the workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Protocol

from baton.services.gateway import metrics
from baton.services.gateway.backend import BackendError, GenerationChunk, GenerationRequest
from baton.services.gateway.choice import Choice, Delta, close_stream
from baton.services.gateway.protocol import (
    DONE, BaseGenerationRequest, ChatCompletionChunk, CompletionRequest, CompletionResponse, PromptTokensDetails,
    UsageInfo,
)
from baton.services.gateway.streaming import error_event

ChunkFormatter = Callable[[BaseGenerationRequest, str, Choice, Delta], list[CompletionResponse | ChatCompletionChunk]]


class Generator(Protocol):
    """What runs a choice's sequence: a ``Backend``, or a ``beam_search.BeamSearch``."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...


class ChoiceRunner:
    """Runs choices on ``backend``; prompts of more than ``block_size`` tokens share blocks
    between samples. ``force_include_usage``: every stream ends with a usage chunk (vLLM's
    ``--enable-force-include-usage``)."""

    def __init__(self, backend: Generator, block_size: int, force_include_usage: bool) -> None:
        self.backend, self.block_size, self.force_include_usage = backend, block_size, force_include_usage

    def over(self, backend: Generator) -> ChoiceRunner:
        """This runner, running its choices on ``backend`` instead."""
        return ChoiceRunner(backend, self.block_size, self.force_include_usage)

    async def run(self, choice: Choice, tracker: metrics.RequestMetrics) -> AsyncGenerator[Delta, None]:
        stream = self.backend.generate(choice.request)
        try:
            async for chunk in stream:
                if choice.finish_reason is not None:
                    break  # nothing may follow the finishing chunk
                if chunk.queued_seconds is not None and chunk.prefill_seconds is not None:
                    tracker.on_phases(choice.index, chunk.queued_seconds, chunk.prefill_seconds)
                delta = choice.consume(chunk)
                tracker.on_tokens(choice.index, len(delta.tokens))
                yield delta
                if delta.finish_reason is not None and chunk.finish_reason is None:
                    return  # a stop string: closing the stream aborts the sequence
            if choice.finish_reason is None:
                raise BackendError("a worker ended the sequence without finishing it", 502)
        finally:
            await close_stream(stream)

    async def merge(self, choices: list[Choice], tracker: metrics.RequestMetrics) -> AsyncGenerator[Delta, None]:
        """Every choice's deltas as they come; an error in one ends them all.

        A prompt with a block to share (a full block before the one holding its last token,
        which is always computed again) has its first sample lead: the others start once its
        decode has begun (its second token, or its end), beside it (``colocate``), so that its
        prefill and decode workers hold the prompt's blocks in their prefix caches and compute
        and send only the last one again. So does a prompt whose log-probs are asked for (only its
        first sample computes them, ``_choices``). Other prompts' samples all start at once."""
        queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()
        decoding = {c.index: asyncio.Event() for c in choices if c.sample == 0}

        def follows(choice: Choice) -> bool:
            leader = choices[choice.index - choice.sample]
            shares = (len(choice.prompt.token_ids) - 1) // self.block_size > 0
            return choice.sample > 0 and (shares or leader.request.params.prompt_logprobs is not None)

        async def pump(choice: Choice) -> None:
            leads = choice.sample == 0
            try:
                if follows(choice):
                    leader = choices[choice.index - choice.sample]
                    await decoding[leader.index].wait()
                    choice.request = replace(choice.request, colocate=leader.placement)
                async with aclosing(self.run(choice, tracker)) as deltas:
                    async for delta in deltas:
                        queue.put_nowait(delta)
                        if leads and choice.num_tokens >= 2:
                            decoding[choice.index].set()
                queue.put_nowait(None)
            except Exception as exc:  # handed to the consumer, which decides
                queue.put_nowait(exc)
            finally:
                if leads:
                    decoding[choice.index].set()

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            for _ in choices:
                while (item := await queue.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self, choices: list[Choice], arrival: float) -> dict[int, list[Delta]]:
        tracker = metrics.RequestMetrics(arrival)
        deltas: dict[int, list[Delta]] = {c.index: [] for c in choices}
        status = "error"
        try:
            async with aclosing(self.merge(choices, tracker)) as merged:
                async for delta in merged:
                    deltas[delta.index].append(delta)
            status = "success"
        except asyncio.CancelledError:
            status = "aborted"
            raise
        finally:
            tracker.finish(status)
            record(choices, status, tracker)
        return deltas

    async def stream(
        self, req: BaseGenerationRequest, request_id: str, choices: list[Choice], format_delta: ChunkFormatter,
        arrival: float,
    ) -> AsyncGenerator[str, None]:
        tracker = metrics.RequestMetrics(arrival)
        status, sent = "aborted", False
        try:
            try:
                async with aclosing(self.merge(choices, tracker)) as merged:
                    async for delta in merged:
                        for chunk in format_delta(req, request_id, choices[delta.index], delta):
                            if req.continuous_usage:
                                chunk.usage = usage(choices)
                            sent = True
                            yield chunk.model_dump_json()
            except Exception as exc:
                status = "error"
                if not sent:
                    raise
                yield error_event(exc)
                yield DONE
                return
            status = "success"
            if req.include_usage or self.force_include_usage:
                usage_chunk = CompletionResponse if isinstance(req, CompletionRequest) else ChatCompletionChunk
                yield usage_chunk(id=request_id, model=req.model, choices=[], usage=usage(choices)).model_dump_json()
            yield DONE
        finally:
            tracker.finish(status)
            record(choices, status, tracker)


def record(choices: list[Choice], status: str, tracker: metrics.RequestMetrics) -> None:
    """vLLM's per-request metrics of a request's choices, once it ends with ``status``; a choice cut
    short finished by "abort" (the client went away) or "error"."""
    cut = "abort" if status == "aborted" else "error"
    params = choices[0].request.params
    metrics.record_sequences(max(c.sample for c in choices) + 1, params.max_tokens, [
        tracker.sequence(c.index, len(c.prompt.token_ids), c.num_tokens, c.finish_reason or cut) for c in choices])


def usage(choices: list[Choice]) -> UsageInfo:
    """A response's token counts: each prompt once (its first sample's, with its cached tokens), every choice's output."""
    firsts = [c for c in choices if c.sample == 0]
    prompt_tokens = sum(len(c.prompt.token_ids) for c in firsts)
    completion_tokens = sum(c.num_tokens for c in choices)
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(c.cached_tokens for c in firsts)),
    )
