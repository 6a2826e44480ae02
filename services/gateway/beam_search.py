"""vLLM's beam search (``use_beam_search``: ``n`` beams, ``length_penalty``), run by the gateway over
the backend as vLLM's front end runs it: each step sends one single-token request per live beam to
the backend (``engine.beam_search`` has the search's rules). A prompt's ``n`` choices are its ``n``
best beams, best first; they run through ``ChoiceRunner`` as samples do (``BeamSearch.generate``
stands in for the backend's), one chunk each holding the whole beam, so stop strings cut the
chosen beams' text afterwards as they cut a sample's. A step past the first has at most a block of
tokens that the decode worker of its beam's last step does not hold cached: it is computed there
(``local_prefill_limit``), a round trip shorter than through a prefill worker and a KV transfer.

The search ranks the model's own log-probs, so it follows no sampling parameter: temperature and
the other sampling knobs (and the model's defaults for them) change nothing, and a request that
sets a logit bias, bad words, allowed tokens, penalties or a structured output is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace

from baton.engine.beam_search import Beam, BeamRules, best, extend
from baton.services.gateway.backend import Backend, BackendError, GenerationChunk, GenerationRequest
from baton.services.gateway.choice import Choice
from baton.services.gateway.protocol import APIError, BaseGenerationRequest, ChatCompletionRequest


def check_request(req: BaseGenerationRequest, logprob_limit: int) -> None:
    """``APIError`` for a beam search the model's raw log-probs cannot serve as ``req`` asks, or
    whose steps would ask the workers for more than ``logprob_limit`` log-probs."""
    if isinstance(req, ChatCompletionRequest) and req.forced_tools:
        changed = "tool_choice"
    elif req.structured_output is not None:
        changed = "structured_outputs" if req.response_format is None else "response_format"
    else:
        changed = next((name for name, on in (
            ("logit_bias", bool(req.logit_bias)), ("bad_words", bool(req.bad_words)),
            ("allowed_token_ids", req.allowed_token_ids is not None),
            ("repetition_penalty", req.repetition_penalty != 1.0), ("presence_penalty", req.presence_penalty != 0.0),
            ("frequency_penalty", req.frequency_penalty != 0.0),
        ) if on), None)
    if changed is not None:
        raise APIError(f"{changed} is not supported with use_beam_search: beam search ranks the model's own "
                       "log-probs", param=changed)
    if 2 * req.n > logprob_limit:
        raise APIError(f"use_beam_search with n={req.n} asks the workers for {2 * req.n} log-probs a step, more than "
                       f"--max-logprobs allows ({logprob_limit})", param="n")


class BeamSearch:
    """Searches each prompt of a request once, over ``backend``, and hands each of its choices
    (``width`` a prompt, in ``serving``'s order) its beam: ``generate`` is the backend's for
    ``ChoiceRunner``."""

    def __init__(self, backend: Backend, choices: list[Choice], width: int, length_penalty: float,
                 block_size: int) -> None:
        self.backend = backend
        self.length_penalty = length_penalty
        self.width = width
        self.block_size = block_size
        self._leaders = [c for c in choices if c.sample == 0]
        self._rank = {c.request.request_id: (c.index // width, c.sample) for c in choices}
        self._done = [asyncio.Event() for _ in self._leaders]
        self._results: dict[int, tuple[list[Beam], GenerationChunk]] = {}
        self._started: set[int] = set()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        prompt, rank = self._rank[request.request_id]
        if prompt not in self._started:       # the first of its choices to come runs the search
            self._started.add(prompt)
            try:
                self._results[prompt] = await self._search(self._leaders[prompt])
            finally:
                self._done[prompt].set()
        await self._done[prompt].wait()
        if prompt not in self._results:
            raise BackendError("the beam search of this prompt failed", 502)
        beams, first = self._results[prompt]
        if rank >= len(beams):
            raise BackendError(f"beam search kept {len(beams)} beams of the {self.width} asked for: too many of the "
                               "likeliest tokens were stop tokens", 500)
        beam = beams[rank]
        yield GenerationChunk(
            tokens=beam.tokens, finish_reason="stop" if beam.finished else "length", prompt_tokens=first.prompt_tokens,
            cached_tokens=first.cached_tokens, prompt_logprobs=first.prompt_logprobs if rank == 0 else None,
        )

    async def _search(self, leader: Choice) -> tuple[list[Beam], GenerationChunk]:
        """The prompt's best beams, and the first step's chunk (its prompt facts)."""
        request, params = leader.request, leader.request.params
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else leader.eos_token_ids)
        rules = BeamRules(self.width, self.length_penalty, len(request.prompt_token_ids), stop_ids,
                          params.min_tokens, params.logprobs or 0)
        first_step = replace(request, params=replace(rules.step_params(), prompt_logprobs=params.prompt_logprobs))
        later_step = replace(request, params=rules.step_params(), local_prefill_limit=self.block_size)
        live, finished = [Beam()], []
        first = GenerationChunk()
        for step in range(params.max_tokens):
            try:
                async with asyncio.TaskGroup() as group:   # one failure cancels (and aborts) the others
                    tasks = [group.create_task(self._next_token(replace(
                                 later_step if step else first_step, request_id=f"{request.request_id}-s{step}-b{i}",
                                 prompt_token_ids=request.prompt_token_ids + beam.token_ids)))
                             for i, beam in enumerate(live)]
            except* Exception as errors:
                raise errors.exceptions[0] from None
            chunks = [task.result() for task in tasks]
            if step == 0:
                first = chunks[0]
            live, ended = extend(live, [c.tokens[0] for c in chunks], rules)
            finished += ended
            if not live:
                break
        return best(finished + live, rules), first

    async def _next_token(self, request: GenerationRequest) -> GenerationChunk:
        """The backend's one token after ``request``'s tokens, in the first chunk's facts."""
        got: GenerationChunk | None = None
        async with aclosing(self.backend.generate(request)) as chunks:
            async for chunk in chunks:
                if got is None:
                    got = chunk
                elif chunk.tokens:
                    got.tokens += chunk.tokens
        count = 0 if got is None else len(got.tokens)
        if got is None or count != 1:
            raise BackendError(f"a worker answered a beam step with {count} tokens", 502)
        return got
