"""Decode worker: reserves KV blocks, receives a prompt's KV from a prefill
worker, and generates the rest of the tokens with continuous batching.

Queues: ``_reservations`` (request id -> the expiry of a reservation awaiting its KV and its
first token) and ``_streams`` (request id -> queue of engine updates for the
open Generate stream). The running batch is the engine scheduler's.

A request passes through:
  RESERVED   Reserve: blocks for the prompt allocated, reusing the prefix this
             worker's cache already holds; the KV receiver told to expect the
             rest, a ticket returned; expires after ``reservation_ttl``. A LoRA
             adapter this worker has not loaded: NOT_FOUND
  RECEIVING  prefill pushes layers into the reserved blocks (KVTransfer.Push)
  RUNNING    Generate: once every layer has landed, the request joins the batch
             with the first token prefill sampled; tokens stream back each step
             (``--stream-interval N``: N at a time, unless the gateway checks
             each as it comes: ``stream_each_token``, for stop strings)
  FINISHED   stop token, EOS or max_tokens: the last chunk carries the reason
An Abort, a cancelled stream, an expired reservation or a failed transfer frees
every block the request holds. LoRA adapters load and unload while serving (``LoadLoRA``,
``UnloadLoRA``: ``services/worker.py``); a reserved request counts as running under its adapter.
``ResetPrefixCache`` uncaches every block, those of reserved and running requests kept for them.

PrefillAndGenerate skips the prefill worker (the gateway's choice for a prompt short enough,
or mostly cached here: Dynamo's conditional disaggregation): the request joins this worker's
batch as an aggregated engine's would, its prompt computed here in chunks beside the others'
decode steps, and streams like Generate, the first chunk with the prompt's figures.
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
from baton.engine.sequence import TokenLogprob
from baton.kvtransfer.base import KVReceiver, TransferError
from baton.protos import common_pb2, decode_pb2, decode_pb2_grpc, kvtransfer_pb2
from baton.services.convert import logprob_from_proto, logprob_to_proto, params_from_proto
from baton.services.engine_loop import EngineLoop, SeqUpdate
from baton.services.worker import WorkerContext, WorkerRPCs, compile_grammar, time_remaining

log = logging.getLogger(__name__)


def _chunk(update: SeqUpdate) -> decode_pb2.GenerateChunk:
    return decode_pb2.GenerateChunk(tokens=[logprob_to_proto(t) for t in update.new_tokens],
                                    finish_reason=update.finish_reason or "")


def _merged(updates: list[SeqUpdate]) -> SeqUpdate:
    """A stream's updates as one: every token in order, the latest figures (prompt log-probs,
    cached tokens, finish reason), and the phase times of the first that carried a token."""
    if len(updates) == 1:
        return updates[0]
    timed = next((u for u in updates if u.new_tokens), updates[-1])
    return dataclasses.replace(updates[-1], new_tokens=[t for u in updates for t in u.new_tokens],
                               queued_seconds=timed.queued_seconds, prefill_seconds=timed.prefill_seconds)


class DecodeServicer(WorkerRPCs, decode_pb2_grpc.DecodeServicer):
    role = "decode"

    def __init__(self, ctx: WorkerContext, receiver: KVReceiver, reservation_ttl_s: float = 180.0,
                 stream_interval: int = 1) -> None:
        self._ctx = ctx
        self._receiver = receiver
        self._ttl = reservation_ttl_s
        self._interval = stream_interval   # tokens a stream holds back to send together (--stream-interval)
        self._reservations: dict[str, asyncio.TimerHandle] = {}  # request id -> its expiry
        self._streams: dict[str, asyncio.Queue[SeqUpdate]] = {}
        # Its cached prompt blocks go to the prefix index too: the gateway routes by them.
        on_events = ctx.publisher.publish if ctx.publisher is not None else None
        self.engine = EngineLoop(ctx.core, self._on_outputs, on_block_events=on_events, metrics=ctx.engine_metrics)

    def _on_outputs(self, updates: list[SeqUpdate]) -> None:
        for update in updates:
            queue = self._streams.get(update.seq_id)
            if queue is not None:
                queue.put_nowait(update)

    async def Reserve(self, request: decode_pb2.ReserveRequest, context) -> kvtransfer_pb2.TransferTicket:
        rid = request.request_id
        if not rid or rid in self._reservations or rid in self._streams:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id {rid!r} is empty or already in use")
        try:
            params = params_from_proto(request.params)
            prompt, resumed = list(request.prompt_token_ids), list(request.output_token_ids)
            await compile_grammar(self._ctx, params, context)
            seq = await self.engine.call(
                lambda: self._ctx.core.reserve(rid, prompt, params, resumed, request.priority, request.lora or None,
                                               request.cache_salt or None))
        except UnknownLoRA as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except asyncio.CancelledError:
            self.engine.abort(rid)  # the reservation may have been made after all
            raise
        if seq is None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no free KV blocks for this prompt; try another decode worker")
        num_blocks = math.ceil(seq.num_tokens / self._ctx.layout.block_size)
        cached = seq.num_cached_tokens // self._ctx.layout.block_size  # already here: not sent again
        block_ids = list(seq.block_table[cached:num_blocks])
        self._reservations[rid] = asyncio.get_running_loop().call_later(self._ttl, self._expire, rid)
        self._receiver.expect(rid, block_ids, self._ctx.layout)
        return kvtransfer_pb2.TransferTicket(
            request_id=rid,
            transport=self._receiver.transport,
            address=self._receiver.address,
            block_ids=block_ids,
            layout=self._ctx.layout.to_proto(),
            num_tokens=seq.num_tokens,
            cached_blocks=cached,
        )

    def _expire(self, rid: str) -> None:
        if self._reservations.pop(rid, None) is not None:
            log.warning("reservation %s expired without a Generate call; freeing its blocks", rid)
            self._free(rid)

    def _free(self, rid: str) -> None:
        self._receiver.cancel(rid)
        self.engine.abort(rid)

    async def Generate(self, request: decode_pb2.GenerateRequest, context):
        rid = request.request_id
        expiry = self._reservations.pop(rid, None)
        if expiry is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no reservation for request {rid!r} (expired or aborted?)")
        expiry.cancel()
        queue: asyncio.Queue[SeqUpdate] = asyncio.Queue()
        self._streams[rid] = queue
        finished = False
        try:
            try:
                await self._receiver.wait_complete(rid, time_remaining(context))
            except TransferError as exc:
                await context.abort(grpc.StatusCode.ABORTED, f"the prompt's KV did not arrive: {exc}")
            first = logprob_from_proto(request.first_token)
            try:
                finish = await self.engine.call(lambda: self._activate(rid, first))
            except KeyError:
                await context.abort(grpc.StatusCode.ABORTED, f"request {rid!r} was aborted before its KV arrived")
            if finish == "abort":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {rid!r}: the first token does not fit its grammar")
            if finish is not None:
                finished = True
                yield decode_pb2.GenerateChunk(finish_reason=finish)
                return
            interval = 1 if request.stream_each_token else self._interval
            async for update in self._updates(rid, queue, context, interval, sent=1):   # prefill sent the first
                finished = update.finish_reason is not None
                yield _chunk(update)
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._free(rid)

    async def PrefillAndGenerate(self, request: decode_pb2.ReserveRequest, context):
        """The whole request here: its prompt (what this worker's prefix cache does not hold of it)
        computed in this worker's batches, as an aggregated engine would; the first chunk carries
        what a prefill worker's first token would (prompt and cached tokens, prompt log-probs)."""
        received = time.monotonic()   # its wait in the queue starts here (the engine takes it between steps)
        rid = request.request_id
        if not rid or rid in self._reservations or rid in self._streams:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id {rid!r} is empty or already in use")
        prompt, resumed = list(request.prompt_token_ids), list(request.output_token_ids)
        queue: asyncio.Queue[SeqUpdate] = asyncio.Queue()
        self._streams[rid] = queue
        finished = False
        try:
            try:
                params = params_from_proto(request.params)
                if params.n != 1:
                    raise ValueError(f"request {rid}: PrefillAndGenerate takes one sequence (n=1), got n={params.n}")
                await compile_grammar(self._ctx, params, context)
                await self.engine.call(lambda: self._add(rid, prompt, params, resumed, request, received))
            except UnknownLoRA as exc:
                await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            first = True
            interval = 1 if request.stream_each_token else self._interval
            async for update in self._updates(rid, queue, context, interval, sent=len(resumed)):
                finished = update.finish_reason is not None
                if first and not (update.new_tokens or finished):
                    continue   # a prompt chunk, before the first token
                chunk = _chunk(update)
                if first:
                    chunk.prompt_tokens, chunk.cached_tokens = len(prompt), update.num_cached_tokens
                    chunk.queued_seconds, chunk.prefill_seconds = update.queued_seconds, update.prefill_seconds
                    chunk.prompt_logprobs.extend(logprob_to_proto(lp) for lp in update.prompt_logprobs)
                    first = False
                yield chunk
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self.engine.abort(rid)

    def _add(self, rid: str, prompt: list[int], params: SamplingParams, resumed: list[int],
             request: decode_pb2.ReserveRequest, received: float) -> None:
        """Engine thread: queue the whole request; a resumed one's earlier tokens are not sent again."""
        self._ctx.core.add_request(rid, prompt, params, resumed, request.priority, request.lora or None,
                                   request.cache_salt or None, received)
        self.engine.mark_sent(rid, len(resumed))

    @staticmethod
    async def _updates(rid: str, queue: asyncio.Queue[SeqUpdate], context, interval: int = 1,
                       sent: int = 0) -> AsyncIterator[SeqUpdate]:
        """The request's updates, up to the one that finishes it; an abort ends the RPC ABORTED.
        Those that queued up while the stream was busy go out as one (``_merged``): a loop that
        falls behind sends fewer, fuller chunks rather than falling further behind. Tokens are held
        back until ``interval`` of them have come (``--stream-interval``), but for the request's
        first (``sent``: the tokens its client has had) and the last."""
        held: list[SeqUpdate] = []
        while True:
            held.append(await queue.get())
            while held[-1].finish_reason is None and not queue.empty():
                held.append(queue.get_nowait())
            update = _merged(held)
            if update.finish_reason is None and sent > 0 and len(update.new_tokens) < interval:
                continue
            held = []
            if update.finish_reason == "abort":
                await context.abort(grpc.StatusCode.ABORTED, f"request {rid!r} was aborted on the decode worker")
            sent += len(update.new_tokens)
            yield update
            if update.finish_reason is not None:
                return

    def _activate(self, rid: str, first: TokenLogprob) -> str | None:
        """Engine thread: join the batch; the reason if the first token already ends it."""
        seq = self._ctx.core.activate(rid, first)
        if seq.is_finished:
            return seq.finish_reason
        self.engine.mark_sent(rid, len(seq.output_token_ids))  # the first token and a resumed request's earlier ones
        return None

    async def Abort(self, request: common_pb2.AbortRequest, context) -> common_pb2.AbortReply:
        rid = request.request_id
        expiry = self._reservations.pop(rid, None)
        if expiry is not None:
            expiry.cancel()
        stream = self._streams.get(rid)
        if stream is not None:
            stream.put_nowait(SeqUpdate(rid, [], "abort", 0, []))
        self._free(rid)  # also when this worker never recorded it: a cancelled Reserve may have reserved
        return common_pb2.AbortReply(found=expiry is not None or stream is not None)
