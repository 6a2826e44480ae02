"""The gateway's view of the serving plane: one abstract ``Backend`` that runs a
single-sequence generation and yields chunks. ``serving.py`` depends only on
this; ``backend_grpc.py`` implements it over the prefill/decode workers, and the
tests use fakes."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import TokenLogprob


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams          # params.n == 1: the gateway fans out n > 1 itself
    output_token_ids: list[int] = field(default_factory=list)  # resumed: tokens already streamed
    colocate: tuple[str, ...] = ()  # a sibling's ``placement``: run beside it, over the KV it left cached
    priority: int = 0               # lower first, where the workers schedule by priority
    lora: str | None = None         # the LoRA adapter it runs under (None: the base model)
    cache_salt: str | None = None   # salts its blocks' hashes: it reuses only blocks cached under the same salt
    local_prefill_limit: int = 0    # as --max-local-prefill-length, for this request (the larger of the two counts)
    stream_each_token: bool = False  # its output is checked token by token (stop strings): not held back (--stream-interval)

    @property
    def token_ids(self) -> list[int]:
        """The tokens whose KV a worker computes: the prompt and any resumed output."""
        return self.prompt_token_ids + self.output_token_ids

    def resumed(self, output_token_ids: list[int]) -> GenerationRequest:
        """This request, to go on after ``output_token_ids`` (already streamed) on other workers;
        its prompt log-probs were streamed with its first token."""
        return replace(self, output_token_ids=list(output_token_ids), params=replace(self.params, prompt_logprobs=None))


@dataclass
class EmbedRequest:
    request_id: str
    prompt_token_ids: list[int]
    priority: int = 0
    cache_salt: str | None = None   # as a GenerationRequest's


@dataclass
class EmbedResult:
    embedding: list[float]          # the prompt's final hidden states, pooled as the prefill worker's pooler says
    prompt_tokens: int
    cached_tokens: int


@dataclass
class GenerationChunk:
    """New output tokens. The first chunk carries the prompt facts, where the backend runs the
    sequence (``placement``: opaque, to pass on as ``colocate``) and, where the backend knows them,
    the sequence's wait in a worker's queue and its prefill (``queued_seconds``, ``prefill_seconds``);
    the last has ``finish_reason`` set ("stop" or "length")."""

    tokens: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None
    placement: tuple[str, ...] = ()
    queued_seconds: float | None = None
    prefill_seconds: float | None = None


class BackendError(Exception):
    """A failure the client should see as HTTP ``status`` with ``message``."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Backend(abc.ABC):
    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Run one sequence. Closing the iterator early (client gone, stop string
        hit) aborts the request on every worker and frees its blocks. Raises
        ``BackendError`` when no worker can serve it."""

    @abc.abstractmethod
    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """One prompt's embedding (a prefill worker computes it; nothing is decoded). Raises
        ``BackendError`` when no worker can serve it."""

    @abc.abstractmethod
    async def reachable(self) -> dict[str, int]:
        """How many workers of each role (``prefill``, ``decode``) routing may use now; the
        gateway is ready while both have one."""

    def kv_cache_usage(self) -> dict[str, float]:
        """Each role's share of KV cache blocks that requests hold, over its workers that answer
        (a role with none is left out)."""
        return {}

    def runtime_loras(self) -> dict[str, str]:
        """The LoRA adapters loaded while serving (``load_lora``, here or through another gateway),
        name: path."""
        return {}

    async def load_lora(self, name: str, path: str) -> None:
        """Load LoRA adapter ``name`` from ``path`` (a PEFT directory where the workers run) on every
        worker, or on none: ``BackendError`` with the reason."""
        raise BackendError("this backend cannot load LoRA adapters", 501)

    async def unload_lora(self, name: str) -> None:
        """Unload LoRA adapter ``name`` from every worker, or from none: ``BackendError`` with the reason."""
        raise BackendError("this backend cannot unload LoRA adapters", 501)

    async def reset_prefix_cache(self) -> None:
        """Drop every worker's cached blocks (those requests hold are left to them, never reused):
        ``BackendError`` naming each worker that did not, and why."""
        raise BackendError("this backend cannot reset the prefix cache", 501)

    async def start(self) -> None:
        """Begin background work (discovery, load polling)."""

    async def close(self) -> None:
        """Stop background work and close connections."""
