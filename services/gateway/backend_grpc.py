"""``GrpcBackend``: the gateway's serving plane over the prefill and decode workers.

One request (one sequence) passes through these states::

    look up the prompt's cached prefix on every worker (one Redis round trip)
    -> at once: route decode (load, then room + cached prefix) -> RESERVED (Decode.Reserve: blocks + transfer ticket)
       and route prefill (cached prefix + load) -> PREFILLING (Prefill.Prefill stream: the request,
       then the ticket as soon as it is reserved; the worker pushes KV to it layer by layer
       and sends the first token)
      -> first chunk yielded at once (time to first token waits for neither the
         reservation, the rest of the handoff nor decode) -> HANDED OFF (the stream's last
         message: the decode worker holds every layer)
      -> GENERATING (Decode.Generate stream) -> FINISHED (a chunk with finish_reason)

(The RPCs' messages are built and read in ``worker_messages``.)

A request that names a sibling's ``placement`` in ``colocate`` (the gateway's
``n > 1`` choices) is routed to that sibling's prefill and decode workers while they
are healthy and have room: the prompt blocks they cached for it are computed and
sent once.

Leaving by any other path (the consumer closes the iterator, a cancellation,
a failed step) cancels the in-flight RPC and sends ``Abort`` to both workers,
best effort, with a short deadline. UNAVAILABLE / DEADLINE_EXCEEDED from a
worker penalizes it for a few seconds (routing skips it; a prefill worker whose KV
could not reach the decode worker names that one instead) and the request is
retried on other workers (fresh Reserve), up to ``max_retries`` times. A request
whose tokens were already streamed is *resumed*: the retry carries them as
``output_token_ids``, the new prefill worker computes their KV with the prompt's
and samples the next token, and the stream goes on where it broke (greedy and
seeded output are what they would have been, since sampling depends only on the
seed and the token's index). INVALID_ARGUMENT becomes HTTP 400, NOT_FOUND from Reserve
or Prefill (a LoRA adapter the worker has not loaded) 404, anything else 503 naming the
worker, and the end-to-end deadline (``request_timeout_s``) 504. A request's LoRA adapter
and cache salt go to both workers, and into the block hashes its cached prefix is looked up
by (``hashing.block_extra``), as the workers hash its blocks: routing follows the salted cache.

Background task (``start()``): every ``load_poll_interval_s`` poll ``GetLoad``
on every known worker (a worker is *down* until it answers), and about once a
second refresh the Redis registry (``baton:worker:*``) on top of the static
addresses (``worker_pool``). Where a request runs is ``placement``'s choice (its rules in
``router``; the Redis reads in ``prefix_index``).

LoRA adapters loaded through the gateway (``load_lora``, ``unload_lora``) go to every worker that
answers, all or none, and through Redis to the other gateways (``lora_registry``). A request under
one of them is routed only to workers that hold it: a worker seen for the first time, or again
after it stopped answering or restarted (a new id), is sent those it lacks by the poll that finds
it answering; one that cannot load an adapter serves the base model and the other adapters. The
registry refresh adopts what other gateways, or this one before a restart, recorded (its workers
are sent an adopted adapter, with its digest, as above).
A prefix-cache reset (``reset_prefix_cache``) goes to every worker that answers too (``fanout``); the
workers publish the blocks they drop, so routing stops counting them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace

import grpc

from baton.engine.hashing import model_fingerprint
from baton.protos import FAILED_PEER_DECODE, FAILED_PEER_KEY, common_pb2, decode_pb2, kvtransfer_pb2, prefill_pb2
from baton.services.gateway import fanout
from baton.services.gateway.backend import (
    Backend, BackendError, EmbedRequest, EmbedResult, GenerationChunk, GenerationRequest,
)
from baton.services.gateway.config import GatewayConfig
from baton.services.gateway.lora_registry import LoRARegistry
from baton.services.gateway.metrics import (
    KV_TRANSFER_BYTES, KV_TRANSFER_SECONDS, PREFILL_RPC_FIRST_TOKEN, PREFILLS, RESERVE_SECONDS, RETRIES, WORKER_ERRORS,
)
from baton.services.gateway.placement import Placement
from baton.services.gateway.prefix_index import PrefixIndex
from baton.services.gateway.router import Load
from baton.services.gateway.worker_messages import (
    check_prompt, decode_chunk, first_chunk, prefill_message, reserve_message, ticket_message, validate,
)
from baton.services.gateway.worker_pool import Worker, WorkerPool

logger = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 2.0
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class _WorkerFailure(Exception):
    """A worker failed in a way another worker may not: retry elsewhere."""

    def __init__(self, message: str, worker: Worker) -> None:
        super().__init__(message)
        self.message = message
        self.worker = worker


Reserving = asyncio.Task[tuple[Worker, kvtransfer_pb2.TransferTicket]]   # a decode worker's Reserve under way


def _reserved(reserving: Reserving) -> Worker | None:
    """The decode worker the reservation was made on; None while it is under way, or if it failed."""
    if reserving.done() and not reserving.cancelled() and reserving.exception() is None:
        return reserving.result()[0]
    return None


async def _send_request(call: grpc.aio.StreamStreamCall, request: GenerationRequest, reserving: Reserving) -> None:
    """Open a Prefill stream with ``request``, then send the ticket once ``reserving`` has it
    (its failure raises here). A call that has ended takes no more: reading it tells why."""
    try:
        await call.write(prefill_message(request))
        ticket = (await reserving)[1]
        await call.write(ticket_message(ticket))
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass


class GrpcBackend(Backend):
    def __init__(self, config: GatewayConfig, *, fingerprint: str | None = None) -> None:
        """``fingerprint``: the model's (default: computed from ``config.model_dir``)."""
        self.config = config
        self.fingerprint = fingerprint or model_fingerprint(config.model_dir)
        self._index = (
            PrefixIndex(config.redis_url, self.fingerprint, block_size=config.block_size)
            if config.redis_url
            else None
        )
        self._aborts: set[asyncio.Task[None]] = set()
        self._loras = LoRARegistry(config.lora_modules, config.lora_timeout_s, self._index)
        self._pool = WorkerPool(config, self._index, self._loras)
        self._place = Placement(config, self._pool, self._index, self.fingerprint)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        await self._pool.start()

    async def close(self) -> None:
        await asyncio.gather(*self._aborts, return_exceptions=True)   # they use the pool's channels
        await self._pool.close()
        if self._index is not None:
            await self._index.close()

    async def reachable(self) -> dict[str, int]:
        return {role: len(self._pool.healthy(role, set())) for role in ("prefill", "decode")}

    def kv_cache_usage(self) -> dict[str, float]:
        return self._pool.kv_cache_usage()

    # -- one request -------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        validate(request)
        deadline = time.monotonic() + self.config.request_timeout_s
        avoid: set[str] = set()
        streamed: list[int] = []
        attempt = request
        for retry in range(self.config.max_retries + 1):
            try:
                async with aclosing(self._attempt(attempt, deadline, avoid)) as chunks:
                    async for chunk in chunks:
                        streamed += [t.token_id for t in chunk.tokens]
                        yield chunk
                return
            except _WorkerFailure as failure:
                avoid.add(failure.worker.address)
                if retry == self.config.max_retries or not self._pool.healthy(failure.worker.role, avoid, request.lora):
                    raise BackendError(failure.message, 503) from failure
                RETRIES.labels(resumed=str(bool(streamed)).lower()).inc()
                if streamed:
                    attempt = request.resumed(streamed)
                    logger.warning("request %s: %s; resuming after %d tokens on other workers",
                                   request.request_id, failure.message, len(streamed))
                else:
                    logger.warning("request %s: %s; retrying on other workers", request.request_id, failure.message)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """On the prefill worker ``router`` picks for the prompt; a failed worker's request is
        retried on another."""
        check_prompt(request.prompt_token_ids)
        deadline = time.monotonic() + self.config.request_timeout_s
        msg = prefill_pb2.EmbedRequest(request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
                                       priority=request.priority, cache_salt=request.cache_salt or "")
        avoid: set[str] = set()     # the workers that failed it
        while True:
            cached = await self._place.cached_prefixes(request.prompt_token_ids, avoid, cache_salt=request.cache_salt)
            worker = self._place.choose_prefill(request.prompt_token_ids, avoid, cached)
            self._pool.in_flight[worker.address] += 1
            try:
                reply = await worker.stub.Embed(msg, timeout=self._timeout(deadline, self.config.prefill_timeout_s))
                return EmbedResult(list(reply.embedding), reply.prompt_tokens, reply.cached_tokens)
            except grpc.aio.AioRpcError as err:
                failure = self._failure(worker, err, deadline)
                if not isinstance(failure, _WorkerFailure):
                    raise failure from err
                avoid.add(worker.address)
                if len(avoid) > self.config.max_retries or not self._pool.healthy("prefill", avoid):
                    raise BackendError(failure.message, 503) from err
                RETRIES.labels(resumed="false").inc()
                logger.warning("embedding %s: %s; retrying on another prefill worker", request.request_id, failure.message)
            finally:
                self._pool.in_flight[worker.address] -= 1

    async def _attempt(
        self, request: GenerationRequest, deadline: float, avoid: set[str]
    ) -> AsyncIterator[GenerationChunk]:
        cached = await self._place.cached_prefixes(request.token_ids, avoid, request.lora, request.cache_salt,
                                                   self._place.local_prefill(request))
        local = self._place.local_decode(request, avoid, cached)
        if local is not None:
            async with aclosing(self._prefill_and_generate(local, request, deadline)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        PREFILLS.labels(where="remote").inc()
        # The decode worker reserves while the prompt runs; its ticket follows on the prefill stream.
        reserving = asyncio.create_task(self._reserve(request, deadline, avoid, cached))  # counts it in flight there
        prefill: Worker | None = None
        finished = False
        try:
            prefill = self._place.choose_prefill(request.token_ids, avoid, cached, request.colocate, request.lora)
            async with aclosing(self._prefill(prefill, request, reserving, deadline)) as replies:
                async for first in replies:
                    placed = _reserved(reserving)
                    yield first_chunk(request, first, (prefill.address, placed.address if placed else ""))
            decode = reserving.result()[0]
            call = decode.stub.Generate(
                decode_pb2.GenerateRequest(request_id=request.request_id, first_token=first.token,
                                           stream_each_token=request.stream_each_token),
                timeout=self._timeout(deadline, math.inf),
            )
            placement = () if placed else (prefill.address, decode.address)   # the first token came before the reservation
            try:
                async for msg in call:
                    chunk = decode_chunk(msg, request, ())
                    if placement:
                        chunk.placement, placement = placement, ()
                    finished = chunk.finish_reason is not None
                    yield chunk
                    if finished:
                        return
            except grpc.aio.AioRpcError as err:
                raise self._failure(decode, err, deadline) from err
            finally:
                call.cancel()
            raise BackendError(f"decode worker {decode.address} ended the stream without a finish reason", 503)
        finally:
            reserving.cancel()   # one still under way aborts itself
            await asyncio.gather(reserving, return_exceptions=True)
            decode = _reserved(reserving)
            if decode is not None:
                self._pool.in_flight[decode.address] -= 1
            if not finished:
                await self._abort(request.request_id, [decode, prefill])

    async def _prefill_and_generate(
        self, decode: Worker, request: GenerationRequest, deadline: float
    ) -> AsyncIterator[GenerationChunk]:
        """The whole request on ``decode`` (``Decode.PrefillAndGenerate``)."""
        PREFILLS.labels(where="local").inc()
        self._pool.in_flight[decode.address] += 1
        started, first = time.perf_counter(), True
        call = decode.stub.PrefillAndGenerate(reserve_message(request), timeout=self._timeout(deadline, math.inf))
        finished = False
        try:
            async for msg in call:
                chunk = decode_chunk(msg, request, ("", decode.address))   # a sibling's prefill worker: routing's choice
                if first:
                    PREFILL_RPC_FIRST_TOKEN.labels(where="local").observe(time.perf_counter() - started)
                    first = False
                finished = chunk.finish_reason is not None
                yield chunk
                if finished:
                    return
        except grpc.aio.AioRpcError as err:
            raise self._failure(decode, err, deadline, names_model=True, lora=request.lora) from err
        finally:
            call.cancel()
            self._pool.in_flight[decode.address] -= 1
            if not finished:
                await self._abort(request.request_id, [decode])
        raise BackendError(f"decode worker {decode.address} ended the stream without a finish reason", 503)

    async def _reserve(
        self, request: GenerationRequest, deadline: float, avoid: set[str], cached: dict[str, int]
    ) -> tuple[Worker, kvtransfer_pb2.TransferTicket]:
        """Reserve on the decode worker ``router`` picks (RESOURCE_EXHAUSTED: the next one); the
        request counts in flight there from the pick on, so that a burst spreads out at once."""
        msg = reserve_message(request)
        full: set[str] = set()
        while True:
            address = self._place.pick_decode(request, self._pool.healthy("decode", avoid | full, request.lora), cached)
            if address is None:
                raise BackendError("no decode worker has room" if full else "no healthy decode worker", 503)
            worker = self._pool.workers[address]
            self._pool.in_flight[address] += 1
            started = time.perf_counter()
            try:
                ticket = await worker.stub.Reserve(msg, timeout=self._timeout(deadline, self.config.control_timeout_s))
                RESERVE_SECONDS.observe(time.perf_counter() - started)
            except grpc.aio.AioRpcError as err:
                self._pool.in_flight[address] -= 1
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    full.add(address)
                    continue
                self._abort_later(request.request_id, [worker])     # it may have reserved anyway
                raise self._failure(worker, err, deadline, names_model=True, lora=request.lora) from err
            except BaseException:
                self._pool.in_flight[address] -= 1
                self._abort_later(request.request_id, [worker])
                raise
            load = self._pool.loads.get(address, Load())
            self._pool.loads[address] = replace(load, free_blocks=max(load.free_blocks - len(ticket.block_ids), 0))
            return worker, ticket

    async def _prefill(
        self, worker: Worker, request: GenerationRequest, reserving: Reserving, deadline: float,
    ) -> AsyncIterator[prefill_pb2.FirstToken]:
        """Yield the first token as soon as the prefill worker sends it, whether or not the decode
        worker's reservation (``reserving``) has come: its ticket goes on the stream when it does. End
        once the worker reports the KV handed off (the decode worker then holds every layer). A
        reservation that fails before the first token ends the call at once."""
        started = time.perf_counter()
        call = worker.stub.Prefill(timeout=self._timeout(deadline, self.config.prefill_timeout_s))
        self._pool.in_flight[worker.address] += 1
        sending = asyncio.create_task(_send_request(call, request, reserving))
        reading = asyncio.ensure_future(self._read(call, worker, None, deadline, "first", request.lora))
        try:
            await asyncio.wait((reading, sending), return_when=asyncio.FIRST_COMPLETED)
            if sending.done():
                sending.result()   # a failed reservation raises here
            first = await reading
            PREFILL_RPC_FIRST_TOKEN.labels(where="remote").observe(time.perf_counter() - started)
            yield first
            await sending
            handoff = await self._read(call, worker, reserving.result()[0], deadline, "handoff", request.lora)
        finally:
            reading.cancel()
            sending.cancel()
            await asyncio.gather(reading, sending, return_exceptions=True)
            self._pool.in_flight[worker.address] -= 1
            call.cancel()
        if handoff.bytes_sent > 0:
            KV_TRANSFER_BYTES.inc(handoff.bytes_sent)
            KV_TRANSFER_SECONDS.observe(handoff.seconds)

    async def _read(
        self, call: grpc.aio.StreamStreamCall, worker: Worker, decode: Worker | None, deadline: float, event: str,
        lora: str | None,
    ) -> prefill_pb2.FirstToken | prefill_pb2.KVHandoff:
        """The next message of a Prefill stream (of a request under LoRA adapter ``lora``, its KV going to
        ``decode`` once the ticket is sent), which must be ``event``."""
        try:
            reply = await call.read()
        except grpc.aio.AioRpcError as err:
            raise self._failure(worker, err, deadline, peer=decode, names_model=True, lora=lora) from err
        if reply is grpc.aio.EOF or reply.WhichOneof("event") != event:
            raise BackendError(f"prefill worker {worker.address} sent no {event!r} message in its place in the stream", 503)
        return getattr(reply, event)

    # -- LoRA adapters loaded while serving ---------------------------------

    def runtime_loras(self) -> dict[str, str]:
        return self._loras.paths()

    async def load_lora(self, name: str, path: str) -> None:
        await self._loras.load(self._pool.answering, name, path)

    async def unload_lora(self, name: str) -> None:
        await self._loras.unload(self._pool.answering, name)

    # -- the workers' prefix caches ------------------------------------------

    async def reset_prefix_cache(self) -> None:
        workers = self._pool.answering()
        if not workers:
            raise BackendError("no worker answers", 503)
        await fanout.reset_prefix_cache(workers, self.config.cache_reset_timeout_s)

    # -- failures and aborts -----------------------------------------------

    def _timeout(self, deadline: float, cap: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BackendError(f"request timed out after {self.config.request_timeout_s:g} s", 504)
        return min(cap, remaining)

    def _failure(
        self, worker: Worker, err: grpc.aio.AioRpcError, deadline: float, peer: Worker | None = None,
        names_model: bool = False, lora: str | None = None,
    ) -> Exception:
        """The exception a failed RPC to ``worker`` becomes (see module docs); a prefill worker
        whose KV could not reach the decode worker ``peer`` says so, and the peer is blamed.
        ``names_model``: the RPC names the request's model (Reserve, Prefill: LoRA adapter ``lora``),
        so NOT_FOUND is an adapter the worker has not loaded: a 404, unless the gateway loaded it at
        runtime (the worker restarted since): then it gets the adapter again before it is routed
        to, and the request is retried elsewhere."""
        code = err.code()
        if peer is not None and (FAILED_PEER_KEY, FAILED_PEER_DECODE) in tuple(err.trailing_metadata() or ()):
            worker = peer
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return BackendError(err.details() or "invalid request", 400)
        if code == grpc.StatusCode.NOT_FOUND and names_model and lora in self._loras:
            worker.loras.discard(lora)
            return _WorkerFailure(f"{worker.role} worker {worker.address} lost LoRA adapter {lora!r}", worker)
        if code == grpc.StatusCode.NOT_FOUND and names_model:
            return BackendError(f"{worker.role} worker {worker.address}: {err.details()}", 404)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() >= deadline:
            return BackendError(f"request timed out after {self.config.request_timeout_s:g} s", 504)
        WORKER_ERRORS.labels(role=worker.role).inc()
        message = f"{worker.role} worker {worker.address} failed: {code.name}: {err.details()}"
        if code in RETRYABLE:
            self._pool.health.penalize(worker.address, time.monotonic())
            return _WorkerFailure(message, worker)
        return BackendError(message, 503)

    async def _abort(self, request_id: str, workers: list[Worker | None]) -> None:
        """Abort on every worker; survives a second cancellation of the caller."""
        await asyncio.shield(self._abort_later(request_id, workers))

    def _abort_later(self, request_id: str, workers: list[Worker | None]) -> asyncio.Task[None]:
        task = asyncio.create_task(self._send_aborts(request_id, [w for w in workers if w is not None]))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)
        return task

    async def _send_aborts(self, request_id: str, workers: list[Worker]) -> None:
        timeout = min(self.config.control_timeout_s, ABORT_TIMEOUT_S)
        msg = common_pb2.AbortRequest(request_id=request_id)
        results = await asyncio.gather(
            *(w.stub.Abort(msg, timeout=timeout) for w in workers), return_exceptions=True
        )
        for worker, result in zip(workers, results):
            if isinstance(result, BaseException):
                logger.info("abort of %s on %s %s failed: %s", request_id, worker.role, worker.address, result)
