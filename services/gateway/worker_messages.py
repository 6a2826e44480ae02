"""The gateway's side of the worker RPCs' messages: the requests built from a
``GenerationRequest``, the replies read into ``GenerationChunk``s, and the checks a request
passes before any RPC. Pure conversions: no channel, no state (``backend_grpc`` makes the calls)."""

from __future__ import annotations

from baton.protos import decode_pb2, kvtransfer_pb2, prefill_pb2
from baton.services.convert import logprob_from_proto, params_to_proto
from baton.services.gateway.backend import BackendError, GenerationChunk, GenerationRequest

INT32_MAX = 2**31 - 1


def reserve_message(request: GenerationRequest) -> decode_pb2.ReserveRequest:
    """What a decode worker takes to reserve ``request``'s blocks, or to serve it whole."""
    return decode_pb2.ReserveRequest(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        params=params_to_proto(request.params),
        output_token_ids=request.output_token_ids,
        priority=request.priority,
        lora=request.lora or "",
        cache_salt=request.cache_salt or "",
        stream_each_token=request.stream_each_token,
    )


def prefill_message(request: GenerationRequest) -> prefill_pb2.PrefillInput:
    """What opens a prefill worker's stream for ``request``: its KV's ticket follows (``ticket_message``)."""
    return prefill_pb2.PrefillInput(request=prefill_pb2.PrefillRequest(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        params=params_to_proto(request.params),
        output_token_ids=request.output_token_ids,
        priority=request.priority,
        lora=request.lora or "",
        cache_salt=request.cache_salt or "",
        ticket_follows=True,
    ))


def ticket_message(ticket: kvtransfer_pb2.TransferTicket) -> prefill_pb2.PrefillInput:
    """The decode worker's ``ticket``, sent on the prefill worker's stream after the request."""
    return prefill_pb2.PrefillInput(ticket=ticket)


def first_chunk(request: GenerationRequest, first: prefill_pb2.FirstToken, placement: tuple[str, ...]) -> GenerationChunk:
    """The first chunk of ``request``'s stream, from its prefill worker's first token, run at ``placement``."""
    return _with_prompt_facts(GenerationChunk(tokens=[logprob_from_proto(first.token)]), first, request, placement)


def decode_chunk(msg: decode_pb2.GenerateChunk, request: GenerationRequest, placement: tuple[str, ...]) -> GenerationChunk:
    """A decode worker's chunk: tokens, and the finish reason on the last; the first of
    ``PrefillAndGenerate`` (``prompt_tokens`` set) carries the prompt's facts too."""
    chunk = GenerationChunk(tokens=[logprob_from_proto(t) for t in msg.tokens], finish_reason=msg.finish_reason or None)
    return _with_prompt_facts(chunk, msg, request, placement) if msg.prompt_tokens else chunk


def _with_prompt_facts(
    chunk: GenerationChunk, msg: prefill_pb2.FirstToken | decode_pb2.GenerateChunk, request: GenerationRequest,
    placement: tuple[str, ...],
) -> GenerationChunk:
    chunk.prompt_tokens, chunk.cached_tokens = msg.prompt_tokens, msg.cached_tokens
    chunk.queued_seconds, chunk.prefill_seconds = msg.queued_seconds, msg.prefill_seconds
    chunk.placement = placement
    if request.params.prompt_logprobs is not None:
        chunk.prompt_logprobs = [logprob_from_proto(p) for p in msg.prompt_logprobs]
    return chunk


def validate(request: GenerationRequest) -> None:
    if request.params.n != 1:
        raise BackendError(f"the gRPC backend runs one sequence per request (n=1), got n={request.params.n}", 400)
    check_prompt(request.prompt_token_ids)


def check_prompt(ids: list[int]) -> None:
    if not ids:
        raise BackendError("the prompt must contain at least one token", 400)
    if min(ids) < 0 or max(ids) > INT32_MAX:
        raise BackendError("prompt token ids must be in [0, 2**31)", 400)
