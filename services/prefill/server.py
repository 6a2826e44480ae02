"""Prefill worker: runs prompts and hands their KV to a decode worker.

Queues: ``_pending`` (request id -> future of its first token) and ``_sessions``
(request id -> open KV transfer). The engine's own waiting/running queues live
in its scheduler.

A request passes through:
  RECEIVED  the stream's first message, validated
  QUEUED    added to the engine to sample one token (after a resumed request's
            earlier ones, whose KV it computes and sends with the prompt's)
  RUNNING   prefilled chunk by chunk over the local prefix cache; in the step of
            the final chunk, each layer's blocks are pushed as soon as that
            layer is computed (``_on_layer_done``), overlapping later layers,
            if the ticket has come
  SAMPLED   the first token is sampled and streamed to the gateway at once;
            the blocks stay held
  SENT      the decode worker acknowledged every layer
  RELEASED  blocks queued for release to the prefix cache (before the next
            step, without waiting for the running one); the handoff's end
            (bytes, seconds) is streamed and the stream ends
The ticket (``ticket_follows``) is the stream's second message: the gateway reserves on the
decode worker while the prompt runs. It may come in any state up to SAMPLED: once it does, a KV
transfer to its decode worker is opened and attached (``_attach``): the layers of a final chunk
that has not run yet are pushed as they are computed, those of one that has, at once.
A request naming a LoRA adapter this worker has not loaded ends NOT_FOUND before it is queued;
adapters load and unload while serving (``LoadLoRA``, ``UnloadLoRA``: ``services/worker.py``), and
``ResetPrefixCache`` uncaches every block, those of requests in any state here kept for them.
An abort, a deadline, a ticket that does not come or does not fit, or a transfer failure at any
point aborts the transfer, releases the blocks and ends the stream with an error status (a
transfer failure's names the decode worker in its trailing metadata). A request refused before it
is queued (invalid, or naming an adapter not loaded) reads its ticket before its status goes out
(``_end_before_ticket``), so the gateway is never writing as the call ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator

import grpc

from baton.engine.engine_api import UnknownLoRA
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import ScheduledChunk
from baton.kvtransfer.base import KVSender, TransferError, TransferSession, TransferTicket, create_sender
from baton.kvtransfer.errors import LayoutMismatch
from baton.protos import FAILED_PEER_DECODE, FAILED_PEER_KEY, common_pb2, prefill_pb2, prefill_pb2_grpc
from baton.services.convert import logprob_to_proto, params_from_proto
from baton.services.engine_loop import EngineLoop, SeqUpdate
from baton.services.worker import WorkerContext, WorkerRPCs, compile_grammar, time_remaining

log = logging.getLogger(__name__)


class EngineAborted(Exception):
    """The engine dropped the request (a failed step aborts everything running)."""


class EndCall(Exception):
    """The call ends with ``code`` and ``message`` (and ``trailing`` metadata): raised where the
    servicer context is not at hand, or from a task other than the handler's. (A KV receiver's
    refusal is ``kvtransfer``'s own ``Refused``.)"""

    def __init__(self, code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.trailing = code, message, trailing

    async def end(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(self.code, self.message, trailing_metadata=self.trailing)


def prefill_params(params: SamplingParams, num_resumed: int = 0) -> SamplingParams:
    """What the prefill engine samples with: one token after the prompt and a resumed
    request's ``num_resumed`` output tokens. ``min_tokens`` stays (capped there) so a stop
    token is masked for that token exactly as when one process generates everything."""
    limit = num_resumed + 1
    return dataclasses.replace(params, max_tokens=limit, min_tokens=min(params.min_tokens, limit), n=1)


async def _end_before_ticket(request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext,
                             message: str) -> None:
    """End a call INVALID_ARGUMENT before its request is queued, having read the ticket that follows
    it first, if one does. A status that reaches the gateway while it is writing the ticket turns,
    in grpc's asyncio client, into INTERNAL "Internal error from Core" (a call whose write fails is
    marked so), and a client's 400 would become a 503."""
    if request.ticket_follows:
        await context.read()
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)


def _decode_failed(message: str) -> EndCall:
    """The call's end UNAVAILABLE, naming the decode worker as the one that failed."""
    return EndCall(grpc.StatusCode.UNAVAILABLE, message, ((FAILED_PEER_KEY, FAILED_PEER_DECODE),))


class PrefillServicer(WorkerRPCs, prefill_pb2_grpc.PrefillServicer):
    role = "prefill"

    def __init__(self, ctx: WorkerContext) -> None:
        self._ctx = ctx
        self._block_size = ctx.layout.block_size
        self._tasks: dict[str, asyncio.Task] = {}
        self._pending: dict[str, asyncio.Future[SeqUpdate]] = {}
        self._sessions: dict[str, tuple[TransferSession, slice]] = {}  # with the block-table slice to send
        self._senders: dict[str, KVSender] = {}
        on_events = ctx.publisher.publish if ctx.publisher is not None else None
        self.engine = EngineLoop(ctx.core, self._on_outputs, self._on_layer_done, on_events, ctx.engine_metrics)

    # engine thread ---------------------------------------------------------
    def _attach(self, rid: str, session: TransferSession, blocks: slice, num_tokens: int) -> None:
        """Send ``rid``'s KV over ``session``: each layer as its final chunk computes it, or, if that
        chunk has run (all ``num_tokens`` computed), every layer now."""
        seqs = self._ctx.core.requests.get(rid)
        if not seqs or seqs[0].num_computed_tokens < num_tokens:
            self._sessions[rid] = (session, blocks)
            return
        try:
            for layer, kv_cache in enumerate(self._ctx.runner.kv_caches):
                session.submit_layer(layer, kv_cache, seqs[0].block_table[blocks])
        except Exception:  # the transfer fails at finish()
            log.exception("KV push of request %s failed", rid)

    def _on_layer_done(self, layer: int, chunks: list[ScheduledChunk]) -> None:
        for chunk in chunks:
            seq = chunk.seq
            transfer = self._sessions.get(seq.seq_id)
            if transfer is None or not chunk.samples:
                continue
            session, blocks = transfer
            try:
                session.submit_layer(layer, self._ctx.runner.kv_caches[layer], seq.block_table[blocks])
            except Exception:  # this transfer fails at finish(); the others go on
                log.exception("KV push of request %s failed; dropping its transfer", seq.seq_id)
                self._sessions.pop(seq.seq_id, None)

    # event loop ------------------------------------------------------------
    def _on_outputs(self, updates: list[SeqUpdate]) -> None:
        for update in updates:
            future = self._pending.get(update.seq_id)
            if future is None or future.done():
                continue
            if update.finish_reason == "abort":
                future.set_exception(EngineAborted(f"the prefill engine aborted request {update.seq_id!r}"))
            elif update.new_tokens or update.embedding is not None:
                future.set_result(update)

    async def _sender(self, transport: str) -> KVSender:
        if transport not in self._senders:
            # The first use imports the backend (ucxx takes ~0.5 s): not on the event loop.
            sender = await asyncio.to_thread(create_sender, transport)
            self._senders.setdefault(transport, sender)
        return self._senders[transport]

    async def Prefill(self, stream: AsyncIterator[prefill_pb2.PrefillInput], context: grpc.aio.ServicerContext):
        """The first token, then the KV's handoff (see the module docs). The ``stream``'s messages are
        read with ``context.read()``: the request here, the ticket in ``_receive_ticket``."""
        received = time.monotonic()   # its wait in the queue starts here (the engine takes it between steps)
        opening = await context.read()
        if opening is grpc.aio.EOF or opening.WhichOneof("input") != "request":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a Prefill stream opens with its request")
        request = opening.request
        rid = request.request_id
        if not rid or rid in self._tasks:
            await _end_before_ticket(request, context, f"request_id {rid!r} is empty or already in use")
        prompt, resumed = list(request.prompt_token_ids), list(request.output_token_ids)
        try:
            params = prefill_params(params_from_proto(request.params), len(resumed))
            await compile_grammar(self._ctx, params, context)
        except ValueError as exc:
            await _end_before_ticket(request, context, str(exc))
        self._tasks[rid] = asyncio.current_task()
        ticket = asyncio.create_task(self._receive_ticket(request, context)) if request.ticket_follows else None
        future: asyncio.Future[SeqUpdate] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        session: TransferSession | None = None
        released = False
        try:
            try:
                await self.engine.call(lambda: self._add(rid, prompt, params, resumed, request, received))
            except UnknownLoRA as exc:
                raise EndCall(grpc.StatusCode.NOT_FOUND, str(exc)) from exc
            except ValueError as exc:
                raise EndCall(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
            update = await future
            yield prefill_pb2.PrefillReply(first=prefill_pb2.FirstToken(
                request_id=rid,
                token=logprob_to_proto(update.new_tokens[0]),
                prompt_logprobs=[logprob_to_proto(lp) for lp in update.prompt_logprobs],
                prompt_tokens=len(prompt),
                cached_tokens=update.num_cached_tokens,
                queued_seconds=update.queued_seconds,
                prefill_seconds=update.prefill_seconds,
            ))
            session = await ticket if ticket is not None else None
            stats = await session.finish(time_remaining(context)) if session is not None else None
            self.engine.release(rid)
            released = True
            if stats is not None:
                yield prefill_pb2.PrefillReply(handoff=prefill_pb2.KVHandoff(bytes_sent=stats.bytes, seconds=stats.seconds))
        except EndCall as exc:
            if session is None and ticket is not None:   # its ticket read first, as _end_before_ticket says why
                opened = (await asyncio.gather(ticket, return_exceptions=True))[0]
                session = opened if isinstance(opened, TransferSession) else None
            await exc.end(context)
        except TransferError as exc:
            await _decode_failed(f"KV transfer to the decode worker failed: {exc}").end(context)
        except EngineAborted as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        finally:
            self._tasks.pop(rid, None)
            self._pending.pop(rid, None)
            self._sessions.pop(rid, None)
            if not released:
                self.engine.abort(rid)
                if session is None and ticket is not None:
                    ticket.cancel()
                    opened = (await asyncio.gather(ticket, return_exceptions=True))[0]
                    session = opened if isinstance(opened, TransferSession) else None
                if session is not None:
                    await session.abort()

    def _add(self, rid: str, prompt: list[int], params: SamplingParams, resumed: list[int],
             request: prefill_pb2.PrefillRequest, received: float) -> None:
        """Engine thread: queue the request (its priority, LoRA adapter and cache salt as ``request``
        gives them); a resumed one's earlier tokens are not sent again."""
        self._ctx.core.add_request(rid, prompt, params, resumed, request.priority, request.lora or None,
                                   request.cache_salt or None, received)
        self.engine.mark_sent(rid, len(resumed))

    async def _receive_ticket(self, request: prefill_pb2.PrefillRequest, context) -> TransferSession:
        """The ticket that follows ``request`` on its stream: its transfer opened and attached to the
        prompt's computation (``_attach``)."""
        message = await context.read()
        if message is grpc.aio.EOF or message.WhichOneof("input") != "ticket":
            raise EndCall(grpc.StatusCode.INVALID_ARGUMENT,
                          f"request {request.request_id!r} said a ticket follows; its stream sent none")
        ticket = message.ticket
        num_tokens = len(request.prompt_token_ids) + len(request.output_token_ids)
        num_blocks = math.ceil(num_tokens / self._block_size)
        cached = ticket.cached_blocks
        if (ticket.request_id != request.request_id or ticket.num_tokens != num_tokens or not 0 <= cached < num_blocks
                or len(ticket.block_ids) != num_blocks - cached):
            raise EndCall(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the ticket (request {ticket.request_id!r}, {ticket.num_tokens} tokens, {len(ticket.block_ids)} blocks "
                f"after {cached} cached) does not fit request {request.request_id!r} ({num_tokens} tokens, {num_blocks} blocks)",
            )
        try:
            session = (await self._sender(ticket.transport)).open(TransferTicket.from_proto(ticket), self._ctx.layout)
        except LayoutMismatch as exc:
            raise EndCall(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
        except (TransferError, ValueError) as exc:
            raise _decode_failed(f"cannot reach the decode worker: {exc}") from exc
        try:
            await self.engine.call(lambda: self._attach(request.request_id, session, slice(cached, num_blocks), num_tokens))
        except BaseException:
            await session.abort()
            raise
        return session

    async def Embed(self, request: prefill_pb2.EmbedRequest, context: grpc.aio.ServicerContext) -> prefill_pb2.EmbedReply:
        rid = request.request_id
        if not rid or rid in self._tasks:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id {rid!r} is empty or already in use")
        prompt = list(request.prompt_token_ids)
        self._tasks[rid] = asyncio.current_task()
        future: asyncio.Future[SeqUpdate] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        done = False
        try:
            try:
                await self.engine.call(lambda: self._ctx.core.add_embedding_request(
                    rid, prompt, request.priority, request.cache_salt or None))
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            try:
                update = await future
            except EngineAborted as exc:
                await context.abort(grpc.StatusCode.INTERNAL, str(exc))
            done = True
            return prefill_pb2.EmbedReply(embedding=update.embedding, prompt_tokens=len(prompt),
                                          cached_tokens=update.num_cached_tokens)
        finally:
            self._tasks.pop(rid, None)
            self._pending.pop(rid, None)
            # Finished, its prompt's blocks go to the prefix cache; else they are freed.
            (self.engine.release if done else self.engine.abort)(rid)

    async def Abort(self, request: common_pb2.AbortRequest, context) -> common_pb2.AbortReply:
        task = self._tasks.get(request.request_id)
        if task is not None:
            task.cancel()  # its cleanup aborts the transfer and frees the blocks
        return common_pb2.AbortReply(found=task is not None)
