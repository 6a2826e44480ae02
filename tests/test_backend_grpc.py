"""GrpcBackend against fake Prefill / Decode servicers on loopback ports, and
the proto conversions it relies on."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest

from baton.engine.sampling_params import SamplingParams, StructuredOutputParams
from baton.engine.sequence import TokenLogprob
from baton.protos import FAILED_PEER_DECODE, FAILED_PEER_KEY, common_pb2, decode_pb2, decode_pb2_grpc, kvtransfer_pb2, prefill_pb2, prefill_pb2_grpc
from baton.services.convert import logprob_from_proto, logprob_to_proto, params_from_proto, params_to_proto
from baton.services.gateway.backend import BackendError, EmbedRequest, GenerationChunk, GenerationRequest
from baton.services.gateway.backend_grpc import GrpcBackend
from baton.services.gateway.config import GatewayConfig
from baton.services.gateway.lora_fanout import SyncBackoff
from baton.services.gateway.metrics import KV_TRANSFER_BYTES, PREFILLS, REGISTRY, RETRIES, WORKER_ERRORS

pytestmark = pytest.mark.unit

FP = "00112233aabbccdd"
VOCAB = 1000
REMOTE = {"where": "remote"}


def first_token_of(prompt: list[int]) -> int:
    return (sum(prompt) * 31 + len(prompt)) % VOCAB


def token_at(prompt: list[int], index: int) -> int:
    """The fakes' output token ``index`` for ``prompt``: ``first, first + 1, ...``."""
    return (first_token_of(prompt) + index) % VOCAB


class FakeLoRAs:
    """LoadLoRA / UnloadLoRA as a worker answers them: an adapter's digest is ``digests[path]``
    (default ``"d-" + path``); ``refuse`` makes every load fail INVALID_ARGUMENT, ``in_use`` the unload
    of those names FAILED_PRECONDITION. ``calls`` records (rpc, name, digest) in order."""

    def _init_loras(self, loras: frozenset[str]) -> None:
        self.loras: dict[str, tuple[str, str]] = {name: (f"/start/{name}", f"d-/start/{name}") for name in loras}
        self.digests: dict[str, str] = {}
        self.refuse: str | None = None
        self.in_use: set[str] = set()
        self.calls: list[tuple[str, str, str]] = []

    async def LoadLoRA(self, request, context):
        self.calls.append(("load", request.name, request.digest))
        if self.refuse is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.refuse)
        digest = self.digests.get(request.path, f"d-{request.path}")
        if request.digest and request.digest != digest:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{request.path} here has digest {digest}")
        if request.name in self.loras:
            if self.loras[request.name][1] != digest:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, "loaded here with other weights")
            return common_pb2.LoadLoRAReply(digest=digest, already_loaded=True)
        self.loras[request.name] = (request.path, digest)
        return common_pb2.LoadLoRAReply(digest=digest)

    async def UnloadLoRA(self, request, context):
        self.calls.append(("unload", request.name, ""))
        if request.name not in self.loras:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"LoRA adapter {request.name!r} is not loaded here")
        if request.name in self.in_use:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"LoRA adapter {request.name!r} is in use")
        path, digest = self.loras.pop(request.name)
        return common_pb2.UnloadLoRAReply(path=path, digest=digest)


class FakeCacheReset:
    """ResetPrefixCache as a worker answers it: ``resets`` counts those answered; ``reset_failure``
    (a status and its message) fails each, ``reset_delay_s`` holds each that long first."""

    resets = 0
    reset_failure: tuple[grpc.StatusCode, str] | None = None
    reset_delay_s = 0.0

    async def ResetPrefixCache(self, request, context):
        await asyncio.sleep(self.reset_delay_s)
        if self.reset_failure is not None:
            await context.abort(*self.reset_failure)
        self.resets += 1
        return common_pb2.ResetPrefixCacheReply(freed_blocks=3, held_blocks=1)


class FakeDecode(FakeCacheReset, FakeLoRAs, decode_pb2_grpc.DecodeServicer):
    """Reserves (once ``reserving`` is set), then generates ``token_at(prompt, i)`` after the first token
    (and a resumed request's earlier ones) until max_tokens. A LoRA adapter other than those in ``loras``:
    NOT_FOUND."""

    def __init__(self, name: str, free_blocks: int = 100, room: bool = True, delay_s: float = 0.0,
                 loras: frozenset[str] = frozenset()) -> None:
        self.name, self.free_blocks, self.room, self.delay_s = name, free_blocks, room, delay_s
        self._init_loras(loras)
        self.reserved: dict[str, tuple[decode_pb2.ReserveRequest, kvtransfer_pb2.TransferTicket]] = {}
        self.local: list[decode_pb2.ReserveRequest] = []    # PrefillAndGenerate's requests
        self.aborted: list[str] = []
        self.first_tokens: list[int] = []
        self.stream_cancelled = asyncio.Event()
        self.fail_after: int | None = None       # abort the stream UNAVAILABLE after this many chunks
        self.reserving = asyncio.Event()
        self.reserving.set()

    async def Reserve(self, request, context):
        await self.reserving.wait()
        if request.lora and request.lora not in self.loras:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"LoRA adapter {request.lora!r} is not loaded here")
        if not self.room:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no free blocks")
        num_tokens = len(request.prompt_token_ids) + len(request.output_token_ids)
        ticket = kvtransfer_pb2.TransferTicket(
            request_id=request.request_id, transport="grpc", address=f"{self.name}:kv",
            block_ids=random.sample(range(self.free_blocks), -(-num_tokens // 16)), num_tokens=num_tokens,
        )
        self.reserved[request.request_id] = (request, ticket)
        return ticket

    async def Generate(self, request, context):
        reserve, _ = self.reserved[request.request_id]
        params = params_from_proto(reserve.params)
        self.first_tokens.append(request.first_token.token_id)
        prompt, done = list(reserve.prompt_token_ids), len(reserve.output_token_ids) + 1
        if request.first_token.token_id != token_at(prompt, done - 1):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "wrong first token")
        async for chunk in self._tokens(prompt, done, params.max_tokens, context):
            yield chunk
        if done == params.max_tokens:
            yield decode_pb2.GenerateChunk(finish_reason="length")

    async def PrefillAndGenerate(self, request, context):
        """The whole request: its first chunk carries the prompt's figures, as a prefill worker's first token."""
        self.local.append(request)
        if request.lora and request.lora not in self.loras:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"LoRA adapter {request.lora!r} is not loaded here")
        prompt, params = list(request.prompt_token_ids), params_from_proto(request.params)
        first = True
        async for chunk in self._tokens(prompt, len(request.output_token_ids), params.max_tokens, context):
            if first:
                chunk.prompt_tokens, chunk.cached_tokens = len(prompt), 16
                chunk.queued_seconds, chunk.prefill_seconds = 0.125, 0.0625
                if params.prompt_logprobs is not None:
                    chunk.prompt_logprobs.extend(common_pb2.TokenLogprob(token_id=t, logprob=-1.0) for t in prompt[1:])
                first = False
            yield chunk

    async def _tokens(self, prompt: list[int], start: int, max_tokens: int, context):
        try:
            for i in range(start, max_tokens):
                if self.fail_after is not None and i - start >= self.fail_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker shutting down")
                await asyncio.sleep(self.delay_s)
                token = common_pb2.TokenLogprob(token_id=token_at(prompt, i), logprob=-0.5)
                yield decode_pb2.GenerateChunk(tokens=[token], finish_reason="length" if i == max_tokens - 1 else "")
        except asyncio.CancelledError:
            self.stream_cancelled.set()
            raise

    async def Abort(self, request, context):
        self.aborted.append(request.request_id)
        return common_pb2.AbortReply(found=request.request_id in self.reserved)

    async def GetLoad(self, request, context):
        return common_pb2.WorkerLoad(worker_id=self.name, role="decode", free_blocks=self.free_blocks, total_blocks=200)


class FakePrefill(FakeCacheReset, FakeLoRAs, prefill_pb2_grpc.PrefillServicer):
    """Streams the first token of the prompt (the next one of a resumed request), then, once its ticket
    has come on the stream (``tickets``), the handoff's end once ``handoff`` is set
    (or fails the next ``fail_handoffs`` UNAVAILABLE, blaming the decode worker as a real prefill
    worker does); INVALID_ARGUMENT past ``max_len``. Its load counts ``running`` and, as a real
    worker's does, the prompts it is prefilling."""

    def __init__(self, name: str, max_len: int = 10_000, delay_s: float = 0.0, running: int = 0) -> None:
        self.name, self.max_len, self.delay_s, self.running = name, max_len, delay_s, running
        self.requests: list[prefill_pb2.PrefillRequest] = []
        self.tickets: list[kvtransfer_pb2.TransferTicket] = []   # those that came after a first token
        self.prefilling = 0
        self.aborted: list[str] = []
        self.handoff = asyncio.Event()
        self.handoff.set()
        self.fail_handoffs = 0
        self._init_loras(frozenset())

    async def Prefill(self, stream, context):
        request = (await context.read()).request
        self.requests.append(request)
        self.prefilling += 1
        try:
            async for reply in self._prefill(request, context):
                yield reply
        finally:
            self.prefilling -= 1

    async def _prefill(self, request, context):
        n = len(request.prompt_token_ids)
        if n > self.max_len:   # after its ticket, as a real worker refuses a request (services/prefill/server.py)
            if request.ticket_follows:
                await context.read()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompt has {n} tokens, more than {self.max_len}")
        await asyncio.sleep(self.delay_s)
        prompt_logprobs = [common_pb2.TokenLogprob(token_id=t, logprob=-1.0) for t in request.prompt_token_ids[1:]]
        yield prefill_pb2.PrefillReply(first=prefill_pb2.FirstToken(
            request_id=request.request_id,
            token=common_pb2.TokenLogprob(
                token_id=token_at(list(request.prompt_token_ids), len(request.output_token_ids)), logprob=-0.1
            ),
            prompt_logprobs=prompt_logprobs if request.params.HasField("prompt_logprobs") else [],
            prompt_tokens=n, cached_tokens=16 * (n // 32), queued_seconds=0.25, prefill_seconds=0.5,
        ))
        if request.ticket_follows:
            self.tickets.append((await context.read()).ticket)
        await self.handoff.wait()
        if self.fail_handoffs:
            self.fail_handoffs -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "KV transfer to the decode worker failed: connection reset",
                                trailing_metadata=((FAILED_PEER_KEY, FAILED_PEER_DECODE),))
        yield prefill_pb2.PrefillReply(handoff=prefill_pb2.KVHandoff(bytes_sent=4096 * n, seconds=0.002))

    async def Embed(self, request, context):
        self.requests.append(request)
        n = len(request.prompt_token_ids)
        if n > self.max_len:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompt has {n} tokens, more than {self.max_len}")
        return prefill_pb2.EmbedReply(embedding=[n / 100, 0.5], prompt_tokens=n, cached_tokens=16 * (n // 32))

    async def Abort(self, request, context):
        self.aborted.append(request.request_id)
        return common_pb2.AbortReply(found=False)

    async def GetLoad(self, request, context):
        return common_pb2.WorkerLoad(
            worker_id=self.name, role="prefill", running=self.running + self.prefilling, free_blocks=50, total_blocks=50
        )


async def serve(servicer, address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    if isinstance(servicer, FakeDecode):
        decode_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
    else:
        prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, f"127.0.0.1:{port}"


def placement(chunks: list[GenerationChunk]) -> tuple[str, ...]:
    """Where a stream says its request ran: the latest placement a chunk named (``Choice`` keeps it so)."""
    return [c.placement for c in chunks if c.placement][-1]


def dead_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def config(prefill: list[str], decode: list[str], **kw) -> GatewayConfig:
    kw.setdefault("control_timeout_s", 1.0)
    kw.setdefault("load_poll_interval_s", 0.05)
    return GatewayConfig(
        model_dir="unused", served_model_name="m", prefill_addrs=prefill, decode_addrs=decode, **kw
    )


def request(prompt: list[int] | None = None, **params) -> GenerationRequest:
    prompt = prompt if prompt is not None else [random.randrange(VOCAB) for _ in range(random.randint(20, 70))]
    params.setdefault("temperature", 0.0)
    return GenerationRequest(f"req-{random.getrandbits(32):08x}", prompt, SamplingParams(**params))


async def collect(it: AsyncIterator[GenerationChunk]) -> list[GenerationChunk]:
    return [chunk async for chunk in it]


@pytest.fixture
async def cluster():
    """Start fakes, yield a helper that builds started backends; stop everything."""
    servers: list[grpc.aio.Server] = []
    backends: list[GrpcBackend] = []

    async def add(servicer) -> str:
        server, address = await serve(servicer)
        servers.append(server)
        return address

    async def backend(cfg: GatewayConfig) -> GrpcBackend:
        b = GrpcBackend(cfg, fingerprint=FP)
        await b.start()
        backends.append(b)
        return b

    yield add, backend, servers
    for b in backends:
        await b.close()
    for server in servers:
        await server.stop(None)


class HeldDecode(FakeDecode):
    """A decode worker whose requests hold ``used`` of its 200 blocks."""

    def __init__(self, name: str, used: int) -> None:
        super().__init__(name)
        self.used = used

    async def GetLoad(self, request, context):
        return common_pb2.WorkerLoad(worker_id=self.name, role="decode", used_blocks=self.used,
                                     free_blocks=200 - self.used, total_blocks=200)


async def test_kv_cache_usage_is_each_roles_held_share_over_its_answering_workers(cluster) -> None:
    add, make, servers = cluster
    backend = await make(config([await add(FakePrefill("p0"))], [await add(HeldDecode("d0", 30)),
                                                                 await add(HeldDecode("d1", 90))]))
    assert backend.kv_cache_usage() == {"prefill": 0.0, "decode": pytest.approx(120 / 400)}
    await servers[2].stop(None)                    # d1 stops answering: only d0 counts
    while (await backend.reachable())["decode"] == 2:
        await asyncio.sleep(0.05)
    assert backend.kv_cache_usage() == {"prefill": 0.0, "decode": pytest.approx(30 / 200)}


def histogram(name: str, labels: dict[str, str] | None = None) -> tuple[float, float]:
    """A gateway histogram's (count, sum) so far."""
    return tuple(REGISTRY.get_sample_value(f"{name}_{s}", labels or {}) or 0.0 for s in ("count", "sum"))


async def test_full_flow(cluster) -> None:
    add, make, _ = cluster
    prefill, decode = FakePrefill("p0", delay_s=0.05), FakeDecode("d0")
    backend = await make(config([await add(prefill)], [await add(decode)]))
    assert await backend.reachable() == {"prefill": 1, "decode": 1}
    req = request(max_tokens=5, prompt_logprobs=2, logprobs=1, seed=7, top_k=40, stop_token_ids=[3])
    kv_before = KV_TRANSFER_BYTES._value.get()
    reserves, rpcs = histogram("baton_reserve_seconds"), histogram("baton_prefill_rpc_first_token_seconds", REMOTE)
    chunks = await collect(backend.generate(req))

    first = first_token_of(req.prompt_token_ids)
    assert chunks[0].tokens == [TokenLogprob(first, pytest.approx(-0.1))]
    assert chunks[0].prompt_tokens == len(req.prompt_token_ids)
    assert chunks[0].cached_tokens == 16 * (len(req.prompt_token_ids) // 32)
    assert [p.token_id for p in chunks[0].prompt_logprobs] == req.prompt_token_ids[1:]
    assert [t.token_id for c in chunks for t in c.tokens] == [(first + i) % VOCAB for i in range(5)]
    assert [c.finish_reason for c in chunks] == [None] * 4 + ["length"]
    # The prefill worker got the decode worker's ticket and the same params.
    reserve, ticket = decode.reserved[req.request_id]
    assert prefill.requests[0].ticket_follows and prefill.tickets == [ticket]
    assert params_from_proto(reserve.params) == req.params == params_from_proto(prefill.requests[0].params)
    assert decode.first_tokens == [first]
    assert decode.aborted == [] and prefill.aborted == []
    assert KV_TRANSFER_BYTES._value.get() - kv_before == 4096 * len(req.prompt_token_ids)
    # The worker's phases reach the first chunk; the gateway times the Reserve and the Prefill RPC's first token.
    assert (chunks[0].queued_seconds, chunks[0].prefill_seconds) == (0.25, 0.5)
    assert histogram("baton_reserve_seconds")[0] == reserves[0] + 1
    count, total = histogram("baton_prefill_rpc_first_token_seconds", REMOTE)
    assert count == rpcs[0] + 1 and total - rpcs[1] >= 0.05   # the prefill worker's 50 ms are in it

    no_logprobs = await collect(backend.generate(request(max_tokens=1)))
    assert no_logprobs[0].prompt_logprobs is None
    assert [c.finish_reason for c in no_logprobs] == [None, "length"] and no_logprobs[1].tokens == []


async def test_closing_early_aborts_on_both_workers(cluster) -> None:
    add, make, _ = cluster
    prefill, decode = FakePrefill("p0"), FakeDecode("d0", delay_s=0.05)
    backend = await make(config([await add(prefill)], [await add(decode)]))
    req = request(max_tokens=100)
    stream = backend.generate(req)
    assert len((await anext(stream)).tokens) == 1
    await anext(stream)
    await stream.aclose()
    assert decode.aborted == [req.request_id] and prefill.aborted == [req.request_id]
    await asyncio.wait_for(decode.stream_cancelled.wait(), 2.0)

    # A consumer task cancelled while the prefill runs aborts too.
    slow = FakePrefill("p1", delay_s=5.0)
    backend2 = await make(config([await add(slow)], [await add(decode)]))
    req2 = request()
    task = asyncio.create_task(collect(backend2.generate(req2)))
    while not slow.requests:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert req2.request_id in decode.aborted and slow.aborted == [req2.request_id]


async def test_dead_decode_worker_fails_over_or_gives_503(cluster) -> None:
    add, make, servers = cluster
    prefill, doomed, healthy = FakePrefill("p0"), FakeDecode("d0", free_blocks=150), FakeDecode("d1", free_blocks=100)
    p_addr, doomed_addr, healthy_addr = await add(prefill), await add(doomed), await add(healthy)
    backend = await make(config([p_addr], [doomed_addr, healthy_addr], load_poll_interval_s=30.0))
    await servers[1].stop(None)                   # dies after its load report: routing still prefers it
    errors_before = WORKER_ERRORS.labels(role="decode")._value.get()
    chunks = await collect(backend.generate(request(max_tokens=3)))
    assert chunks[-1].finish_reason == "length" and len(healthy.reserved) == 1
    assert WORKER_ERRORS.labels(role="decode")._value.get() - errors_before == 1
    assert await backend.reachable() == {"prefill": 1, "decode": 1}
    assert (await collect(backend.generate(request(max_tokens=1))))[-1].finish_reason == "length"
    assert len(healthy.reserved) == 2             # the dead one is skipped while penalized

    lonely_addr = await add(FakeDecode("d2"))
    backend2 = await make(config([p_addr], [lonely_addr], load_poll_interval_s=30.0, request_timeout_s=10.0))
    await servers[-1].stop(None)
    started = time.monotonic()
    with pytest.raises(BackendError) as err:
        await collect(backend2.generate(request()))
    assert err.value.status == 503 and f"decode worker {lonely_addr}" in err.value.message
    assert time.monotonic() - started < 3.0


async def test_dead_prefill_worker_fails_over_with_a_fresh_reservation(cluster) -> None:
    add, make, servers = cluster
    doomed, healthy, decode = FakePrefill("p0"), FakePrefill("p1", running=2), FakeDecode("d0")
    prefill_addrs = [await add(doomed), await add(healthy)]
    backend = await make(config(prefill_addrs, [await add(decode)], load_poll_interval_s=30.0))
    await servers[0].stop(None)                   # the idle one dies: routing still prefers it
    req = request(max_tokens=2)
    chunks = await collect(backend.generate(req))
    assert [c.finish_reason for c in chunks] == [None, "length"]
    assert len(healthy.requests) == 1 and len(decode.reserved) == 1
    assert decode.aborted == [req.request_id]     # the first reservation was given back, then a fresh one


async def test_embeddings_go_to_a_prefill_worker_and_fail_over(cluster) -> None:
    """An embedding is the prefill worker's answer; a dead worker's is retried on another; an
    invalid one is a 400 and all workers down a 503."""
    add, make, servers = cluster
    doomed, healthy = FakePrefill("p0"), FakePrefill("p1", running=2, max_len=40)
    backend = await make(config([await add(doomed), await add(healthy)], [await add(FakeDecode("d0"))],
                                load_poll_interval_s=30.0))
    await servers[0].stop(None)                   # the idle one dies: routing still prefers it
    result = await backend.embed(EmbedRequest("e1", list(range(1, 33)), priority=3))
    assert (result.embedding, result.prompt_tokens, result.cached_tokens) == ([pytest.approx(0.32), 0.5], 32, 16)
    assert [(r.request_id, r.priority) for r in healthy.requests] == [("e1", 3)]
    with pytest.raises(BackendError) as caught:
        await backend.embed(EmbedRequest("e2", list(range(1, 50))))
    assert caught.value.status == 400 and "more than 40" in caught.value.message
    await servers[1].stop(None)
    with pytest.raises(BackendError) as caught:
        await backend.embed(EmbedRequest("e3", [1, 2, 3]))
    assert caught.value.status == 503


async def test_a_sibling_runs_beside_the_placement_it_names(cluster) -> None:
    """The stream names where a request runs; a request that names it as ``colocate``
    goes to those workers, whatever load and room say, unless one is full or down."""
    add, make, servers = cluster
    idle, busy = FakePrefill("p0"), FakePrefill("p1", running=5)
    roomy, small = FakeDecode("d0", free_blocks=150), FakeDecode("d1", free_blocks=10)
    p_addrs, d_addrs = [await add(idle), await add(busy)], [await add(roomy), await add(small)]
    backend = await make(config(p_addrs, d_addrs, load_poll_interval_s=30.0))
    assert placement(await collect(backend.generate(request(max_tokens=2)))) == (p_addrs[0], d_addrs[0])

    sibling = replace(request(max_tokens=2), colocate=(p_addrs[1], d_addrs[1]))
    assert placement(await collect(backend.generate(sibling))) == (p_addrs[1], d_addrs[1])
    assert sibling.request_id in small.reserved and [r.request_id for r in busy.requests] == [sibling.request_id]

    small.room = False
    crowded = replace(request(max_tokens=2), colocate=(p_addrs[1], d_addrs[1]))
    assert placement(await collect(backend.generate(crowded))) == (p_addrs[1], d_addrs[0])
    await servers[1].stop(None)                   # the busy prefill worker dies: a retry goes elsewhere
    orphan = replace(request(max_tokens=2), colocate=(p_addrs[1], d_addrs[0]))
    assert placement(await collect(backend.generate(orphan))) == (p_addrs[0], d_addrs[0])


async def test_a_burst_spreads_over_decode_workers_by_requests(cluster) -> None:
    """Eight requests at once over two decode workers, one reporting more free blocks: each
    gets four (room first sent all eight to the roomier one), and the count of requests
    in flight goes back to zero."""
    add, make, _ = cluster
    roomy, other = FakeDecode("d0", free_blocks=150, delay_s=0.02), FakeDecode("d1", free_blocks=100, delay_s=0.02)
    backend = await make(config([await add(FakePrefill("p0"))], [await add(roomy), await add(other)], load_poll_interval_s=30.0))
    await asyncio.gather(*(collect(backend.generate(request(max_tokens=6))) for _ in range(8)))
    assert len(roomy.reserved) == len(other.reserved) == 4
    assert all(load.in_flight == 0 for load in backend._pool.routing_loads().values())


async def test_static_dead_address_is_not_ready_and_fails_fast(cluster) -> None:
    add, make, _ = cluster
    prefill_addr = await add(FakePrefill("p0"))
    backend = await make(config([prefill_addr], [dead_address()]))
    assert await backend.reachable() == {"prefill": 1, "decode": 0}
    with pytest.raises(BackendError, match="no healthy decode worker") as err:
        await collect(backend.generate(request()))
    assert err.value.status == 503
    assert await (await make(config([prefill_addr], []))).reachable() == {"prefill": 1, "decode": 0}


async def test_a_worker_that_starts_late_is_reached_within_about_a_second(cluster) -> None:
    """After 11.5 s of refused connections (a worker still loading a large model), gRPC's
    default reconnect backoff (1 s, x1.6 a retry, +-20%) makes its next attempt 1.2-7.5 s
    later, 4.4 s on average; the gateway's channels cap the backoff at one second."""
    add, make, servers = cluster
    late = dead_address()
    backend = await make(config([await add(FakePrefill("p0"))], [late]))
    await asyncio.sleep(11.5)
    assert await backend.reachable() == {"prefill": 1, "decode": 0}
    server, _ = await serve(FakeDecode("d0"), late)
    servers.append(server)
    started = time.monotonic()
    while (await backend.reachable())["decode"] == 0:
        assert time.monotonic() - started < 2.5, "the late decode worker was not reached within 2.5 s"
        await asyncio.sleep(0.05)


async def test_invalid_argument_becomes_400_and_frees_the_reservation(cluster) -> None:
    add, make, _ = cluster
    decode = FakeDecode("d0")
    backend = await make(config([await add(FakePrefill("p0", max_len=8))], [await add(decode)]))
    req = request(list(range(9)))
    with pytest.raises(BackendError, match="prompt has 9 tokens") as err:
        await collect(backend.generate(req))
    assert err.value.status == 400 and decode.aborted == [req.request_id]
    with pytest.raises(BackendError) as bad:
        await collect(backend.generate(request([1, -2, 3])))
    assert bad.value.status == 400


async def test_the_lora_adapter_reaches_both_workers_and_one_they_lack_is_a_404(cluster) -> None:
    add, make, _ = cluster
    prefill, decode = FakePrefill("p0"), FakeDecode("d0", loras=frozenset({"one"}))
    backend = await make(config([await add(prefill)], [await add(decode)]))
    req = replace(request(max_tokens=2), lora="one")
    await collect(backend.generate(req))
    assert decode.reserved[req.request_id][0].lora == prefill.requests[0].lora == "one"
    await collect(backend.generate(request(max_tokens=2)))
    assert prefill.requests[1].lora == ""                   # the base model
    missing = replace(request(max_tokens=2), lora="two")
    with pytest.raises(BackendError, match="LoRA adapter 'two' is not loaded here") as err:
        await collect(backend.generate(missing))
    assert err.value.status == 404 and len(prefill.requests) == 3 and prefill.aborted == [missing.request_id]


async def lora_cluster(cluster, **decode_kw) -> tuple[GrpcBackend, list[FakePrefill], list[FakeDecode]]:
    add, make, _ = cluster
    prefills, decodes = [FakePrefill("p0"), FakePrefill("p1")], [FakeDecode("d0", **decode_kw), FakeDecode("d1", **decode_kw)]
    backend = await make(config([await add(p) for p in prefills], [await add(d) for d in decodes]))
    assert await backend.reachable() == {"prefill": 2, "decode": 2}
    return backend, prefills, decodes


async def test_a_runtime_adapter_loads_on_every_worker_and_serves(cluster) -> None:
    backend, prefills, decodes = await lora_cluster(cluster)
    await backend.load_lora("sql", "/a/sql")
    assert all(w.loras["sql"] == ("/a/sql", "d-/a/sql") for w in [*prefills, *decodes])
    for _ in range(4):
        await collect(backend.generate(replace(request(max_tokens=2), lora="sql")))
    await backend.unload_lora("sql")
    assert all("sql" not in w.loras for w in [*prefills, *decodes])
    with pytest.raises(BackendError) as err:
        await collect(backend.generate(replace(request(max_tokens=2), lora="sql")))
    assert err.value.status == 404


async def test_a_refused_load_is_undone_where_it_was_done(cluster) -> None:
    """One decode worker refuses: the others unload it again, and the reason is the error. Workers
    that read other files at the path (other digests): refused and undone too. A worker that held
    the same adapter before keeps it."""
    backend, prefills, decodes = await lora_cluster(cluster)
    decodes[1].refuse = "LoRA adapter 'big': rank 32 is above max_lora_rank=16"
    with pytest.raises(BackendError, match=r"decode worker .*: INVALID_ARGUMENT: .*rank 32 is above") as err:
        await backend.load_lora("big", "/a/big")
    assert err.value.status == 400
    assert all("big" not in w.loras for w in [*prefills, *decodes])
    assert [c for c in prefills[0].calls] == [("load", "big", ""), ("unload", "big", "")]
    assert decodes[1].calls == [("load", "big", "")]                 # refused: nothing to undo
    decodes[1].refuse = None
    prefills[1].digests["/a/sql"] = "other"
    decodes[0].loras["sql"] = ("/a/sql", "d-/a/sql")                 # held before: not unloaded
    with pytest.raises(BackendError, match="the workers read different files at /a/sql") as err:
        await backend.load_lora("sql", "/a/sql")
    assert err.value.status == 400
    assert [sorted(w.loras) for w in [*prefills, *decodes]] == [[], [], ["sql"], []]
    assert ("unload", "sql", "") not in decodes[0].calls


async def test_a_refused_unload_is_undone_where_it_was_done(cluster) -> None:
    backend, prefills, decodes = await lora_cluster(cluster)
    await backend.load_lora("sql", "/a/sql")
    decodes[0].in_use.add("sql")
    with pytest.raises(BackendError, match=r"decode worker .*: FAILED_PRECONDITION: LoRA adapter 'sql' is in use") as err:
        await backend.unload_lora("sql")
    assert err.value.status == 400
    assert all(w.loras["sql"] == ("/a/sql", "d-/a/sql") for w in [*prefills, *decodes])
    assert prefills[0].calls[-2:] == [("unload", "sql", ""), ("load", "sql", "d-/a/sql")]   # loaded again, the same weights
    await collect(backend.generate(replace(request(max_tokens=2), lora="sql")))
    decodes[0].in_use.clear()
    del prefills[1].loras["sql"]                                       # one without it: nothing to do there
    await backend.unload_lora("sql")
    assert all("sql" not in w.loras for w in [*prefills, *decodes])


async def test_a_worker_seen_later_or_restarted_gets_the_runtime_adapters_before_routing(cluster) -> None:
    """A worker that starts after the load is sent it (with its digest) by the poll that first finds
    it answering, and serves requests under it only then; one that cannot load the same weights
    serves the base model alone, and is sent it again after a wait that doubles (not at every poll);
    a restarted one (a new id) is sent it again at once; a worker that lost it (a restart the polls
    missed) has its request retried elsewhere rather than answered 404."""
    add, make, servers = cluster
    late = dead_address()
    prefill, decode = FakePrefill("p0"), FakeDecode("d0")
    backend = await make(config([await add(prefill)], [await add(decode), late]))
    await backend.load_lora("sql", "/a/sql")
    assert decode.loras["sql"] == ("/a/sql", "d-/a/sql")
    stranger = FakeDecode("d1")
    stranger.digests["/a/sql"] = "other"
    server, _ = await serve(stranger, late)
    servers.append(server)
    await asyncio.sleep(1.5)
    assert ("load", "sql", "d-/a/sql") in stranger.calls and "sql" not in stranger.loras
    assert len(stranger.calls) <= 2                                     # at 0 and 1 s, not at each of ~30 polls
    assert await backend.reachable() == {"prefill": 1, "decode": 2}
    retries = RETRIES.labels(resumed="false")._value.get()
    for _ in range(4):                                                  # routed to the worker holding it, never tried on the other
        req = replace(request(max_tokens=2), lora="sql")
        await collect(backend.generate(req))
        assert req.request_id in decode.reserved and not stranger.reserved
    assert RETRIES.labels(resumed="false")._value.get() == retries
    for _ in range(4):                                                  # the base model: both decode workers
        await collect(backend.generate(request(max_tokens=2)))
    assert stranger.reserved and all(not r.lora for r, _ in stranger.reserved.values())
    stranger.digests.clear()
    started = time.monotonic()
    while "sql" not in stranger.loras:                                  # the try 3 s after the first
        assert time.monotonic() - started < 3.5
        await asyncio.sleep(0.05)
    assert stranger.loras["sql"] == ("/a/sql", "d-/a/sql")
    for _ in range(4):
        await collect(backend.generate(replace(request(max_tokens=2), lora="sql")))
    assert any(r.lora == "sql" for r, _ in stranger.reserved.values())
    stranger.loras.clear()
    stranger.name = "d1-restarted"                                      # GetLoad reports a new id
    while "sql" not in stranger.loras:
        assert time.monotonic() - started < 5.5
        await asyncio.sleep(0.05)
    decode.loras.clear()                                                # lost without a sign
    for _ in range(4):
        await collect(backend.generate(replace(request(max_tokens=2), lora="sql")))
    while "sql" not in decode.loras:                                    # the next poll sends it again
        assert time.monotonic() - started < 7.5
        await asyncio.sleep(0.05)


def test_the_lora_sync_backoff_doubles_to_its_cap_and_starts_over_after_a_load_or_a_clear() -> None:
    backoff = SyncBackoff(first=1.0, cap=4.0)
    assert backoff.waiting("a", 0.0) is None
    tries = []
    for now in (x / 2 for x in range(40)):                              # a poll every 0.5 s for 20 s
        if backoff.waiting("a", now) is None:
            tries.append(now)
            backoff.failed("a", now, f"failed at {now}")
    assert tries == [0.0, 1.0, 3.0, 7.0, 11.0, 15.0, 19.0]
    assert backoff.waiting("a", 19.5) == "failed at 19.0" and backoff.waiting("b", 19.5) is None
    backoff.loaded("a")
    assert backoff.waiting("a", 19.5) is None
    backoff.failed("a", 20.0, "again")
    backoff.failed("b", 20.0, "b too")
    assert backoff.waiting("a", 20.5) == "again"                        # a first wait again: due at 21
    assert backoff.waiting("a", 21.0) is None
    backoff.clear()
    assert backoff.waiting("b", 20.5) is None


async def test_a_prefix_cache_reset_reaches_every_answering_worker_and_names_each_that_fails(cluster) -> None:
    """Every worker that answers is reset (one that does not is neither waited for nor blamed); a
    worker that refuses, or answers past the deadline, is named with its status and message."""
    add, make, _ = cluster
    workers = [FakePrefill("p0"), FakePrefill("p1"), FakeDecode("d0"), FakeDecode("d1")]
    addresses = [await add(w) for w in workers]
    silent = dead_address()
    backend = await make(config(addresses[:2], [*addresses[2:], silent], cache_reset_timeout_s=0.5))
    await backend.reset_prefix_cache()
    assert [w.resets for w in workers] == [1, 1, 1, 1]
    workers[3].reset_failure = (grpc.StatusCode.INTERNAL, "the engine thread is gone")
    workers[0].reset_delay_s = 2.0
    with pytest.raises(BackendError) as err:
        await backend.reset_prefix_cache()
    assert sorted(err.value.message.split("; ")) == [
        f"decode worker {addresses[3]}: INTERNAL: the engine thread is gone",
        f"prefill worker {addresses[0]}: DEADLINE_EXCEEDED: Deadline Exceeded"]
    assert [w.resets for w in workers[1:3]] == [2, 2]


async def test_a_prefix_cache_reset_with_no_worker_answering_fails(cluster) -> None:
    _, make, _ = cluster
    backend = await make(config([dead_address()], [dead_address()]))
    with pytest.raises(BackendError, match="no worker answers"):
        await backend.reset_prefix_cache()


async def test_the_cache_salt_reaches_both_workers_and_the_embedding_worker(cluster) -> None:
    add, make, _ = cluster
    prefill, decode = FakePrefill("p0"), FakeDecode("d0")
    backend = await make(config([await add(prefill)], [await add(decode)]))
    req = replace(request(max_tokens=2), cache_salt="tenant-a")
    await collect(backend.generate(req))
    assert decode.reserved[req.request_id][0].cache_salt == prefill.requests[0].cache_salt == "tenant-a"
    await collect(backend.generate(request(max_tokens=2)))
    assert prefill.requests[1].cache_salt == ""                 # unsalted
    await backend.embed(EmbedRequest("e1", list(range(1, 33)), cache_salt="tenant-b"))
    assert prefill.requests[2].cache_salt == "tenant-b"


async def test_full_decode_workers_are_skipped_then_503(cluster) -> None:
    add, make, _ = cluster
    full, roomy = FakeDecode("d0", free_blocks=180, room=False), FakeDecode("d1", free_blocks=20)
    p_addr = await add(FakePrefill("p0"))
    backend = await make(config([p_addr], [await add(full), await add(roomy)]))
    assert (await collect(backend.generate(request(max_tokens=2))))[-1].finish_reason == "length"
    assert len(roomy.reserved) == 1
    roomy.room = False
    with pytest.raises(BackendError, match="no decode worker has room") as err:
        await collect(backend.generate(request()))
    assert err.value.status == 503


async def test_decode_failure_mid_stream_resumes_on_another_worker(cluster) -> None:
    """A decode worker failing after three tokens were streamed: the request goes on where it
    broke on the other worker (after a prefill of the prompt and those tokens), and the
    client sees one unbroken stream. With no retries allowed it ends with a 503 instead."""
    add, make, _ = cluster
    prefill, decode, other = FakePrefill("p0"), FakeDecode("d0", free_blocks=150), FakeDecode("d1", free_blocks=10)
    decode.fail_after = 2
    addrs = [await add(prefill)], [await add(decode), await add(other)]
    backend = await make(config(*addrs, load_poll_interval_s=30.0))
    req = request(max_tokens=10, prompt_logprobs=1)
    resumed_before = RETRIES.labels(resumed="true")._value.get()
    chunks = await collect(backend.generate(req))
    assert [t.token_id for c in chunks for t in c.tokens] == [token_at(req.prompt_token_ids, i) for i in range(10)]
    assert chunks[-1].finish_reason == "length" and chunks[0].prompt_logprobs is not None
    streamed = [token_at(req.prompt_token_ids, i) for i in range(3)]
    again = prefill.requests[1]
    assert list(again.prompt_token_ids) == req.prompt_token_ids and list(again.output_token_ids) == streamed
    assert not again.params.HasField("prompt_logprobs")      # they went out with the first token
    assert list(other.reserved[req.request_id][0].output_token_ids) == streamed and prefill.tickets[1] == other.reserved[req.request_id][1]
    assert decode.aborted == [req.request_id] and other.aborted == []
    assert RETRIES.labels(resumed="true")._value.get() - resumed_before == 1

    strict = await make(config(*addrs, load_poll_interval_s=30.0, max_retries=0))
    seen: list[GenerationChunk] = []
    with pytest.raises(BackendError, match="decode worker .* UNAVAILABLE") as err:
        async for chunk in strict.generate(request(max_tokens=10)):
            seen.append(chunk)
    assert err.value.status == 503 and len(seen) == 3 and len(other.reserved) == 1


async def test_first_token_is_yielded_before_the_handoff_ends(cluster) -> None:
    """Time to first token does not wait for the rest of the KV handoff: the first chunk comes
    while the prefill worker still sends, and decode starts only once it has finished."""
    add, make, _ = cluster
    prefill, decode = FakePrefill("p0"), FakeDecode("d0")
    prefill.handoff.clear()
    backend = await make(config([await add(prefill)], [await add(decode)]))
    req = request(max_tokens=4)
    stream = backend.generate(req)
    first = await asyncio.wait_for(anext(stream), 5.0)
    assert first.tokens[0].token_id == first_token_of(req.prompt_token_ids)
    rest = asyncio.create_task(collect(stream))
    await asyncio.sleep(0.2)
    assert not rest.done() and decode.first_tokens == []
    prefill.handoff.set()
    chunks = await asyncio.wait_for(rest, 5.0)
    assert [c.finish_reason for c in chunks] == [None, None, "length"] and decode.first_tokens == [first.tokens[0].token_id]


async def test_the_first_token_does_not_wait_for_the_reservation(cluster) -> None:
    """The prompt runs while the decode worker reserves: a first token that comes before the
    reservation is yielded at once, placed on the prefill worker alone; the ticket follows on the
    prefill stream once reserved, and the first decode chunk names the decode worker too."""
    add, make, _ = cluster
    prefill, decode = FakePrefill("p0"), FakeDecode("d0")
    p_addr, d_addr = await add(prefill), await add(decode)
    backend = await make(config([p_addr], [d_addr]))
    decode.reserving.clear()
    req = request(max_tokens=3)
    stream = backend.generate(req)
    first = await asyncio.wait_for(anext(stream), 5.0)
    assert first.tokens[0].token_id == first_token_of(req.prompt_token_ids) and first.placement == (p_addr, "")
    assert decode.reserved == {} and prefill.tickets == []
    decode.reserving.set()
    chunks = await asyncio.wait_for(collect(stream), 5.0)
    assert [c.finish_reason for c in chunks] == [None, "length"] and chunks[0].placement == (p_addr, d_addr)
    assert prefill.tickets == [decode.reserved[req.request_id][1]] and decode.aborted == prefill.aborted == []


async def test_a_reservation_that_fails_ends_the_prefill_at_once(cluster) -> None:
    """No decode worker with room: the 503 comes without waiting for the prompt's first token,
    and the prefill worker is told to stop."""
    add, make, _ = cluster
    prefill, decode = FakePrefill("p0", delay_s=30.0), FakeDecode("d0", room=False)
    backend = await make(config([await add(prefill)], [await add(decode)]))
    req = request()
    with pytest.raises(BackendError, match="no decode worker has room") as err:
        await asyncio.wait_for(collect(backend.generate(req)), 10.0)
    assert err.value.status == 503 and [r.request_id for r in prefill.requests] == prefill.aborted == [req.request_id]


async def test_handoff_failure_after_first_token_blames_decode_and_resumes(cluster) -> None:
    """A KV handoff failing after the first token was streamed is the decode worker's failure:
    the request resumes after that token on the other decode worker (the prefill worker stays
    in use); with no other decode worker, a 503 that frees both workers."""
    add, make, _ = cluster
    prefill, decode, other = FakePrefill("p0"), FakeDecode("d0", free_blocks=150), FakeDecode("d1", free_blocks=10)
    prefill.fail_handoffs = 1
    backend = await make(config([await add(prefill)], [await add(decode), await add(other)], load_poll_interval_s=30.0))
    req = request(max_tokens=4)
    errors_before = {role: WORKER_ERRORS.labels(role=role)._value.get() for role in ("prefill", "decode")}
    chunks = await collect(backend.generate(req))
    assert [t.token_id for c in chunks for t in c.tokens] == [token_at(req.prompt_token_ids, i) for i in range(4)]
    first = token_at(req.prompt_token_ids, 0)
    assert [list(r.output_token_ids) for r in prefill.requests] == [[], [first]]
    assert list(other.reserved[req.request_id][0].output_token_ids) == [first]
    assert decode.first_tokens == [] and other.first_tokens == [token_at(req.prompt_token_ids, 1)]
    assert decode.aborted == [req.request_id] and prefill.aborted == [req.request_id]
    errors = {role: WORKER_ERRORS.labels(role=role)._value.get() - errors_before[role] for role in errors_before}
    assert errors == {"prefill": 0, "decode": 1}

    lonely, decode = FakePrefill("p1"), FakeDecode("d2")
    lonely.handoff.clear()
    lonely.fail_handoffs = 1
    backend = await make(config([await add(lonely)], [await add(decode)]))
    req = request(max_tokens=4)
    stream = backend.generate(req)
    assert len((await anext(stream)).tokens) == 1
    lonely.handoff.set()
    with pytest.raises(BackendError, match="decode worker .* UNAVAILABLE: KV transfer") as err:
        await anext(stream)
    assert err.value.status == 503 and decode.first_tokens == []
    assert decode.aborted == [req.request_id] and lonely.aborted == [req.request_id]


async def test_a_prompt_short_enough_is_computed_on_the_decode_worker_alone(cluster) -> None:
    """Under ``max_local_prefill_length`` a prompt with at most that many tokens to compute goes
    to the decode worker's PrefillAndGenerate (no prefill worker, no reservation, no KV), its first
    chunk with the prompt's figures and the decode worker alone as its placement; a longer one goes
    the disaggregated way. A local request closed early is aborted there; one whose decode worker
    fails mid-stream resumes after its streamed tokens on the other, again locally."""
    add, make, _ = cluster
    prefill, decode, other = FakePrefill("p0"), FakeDecode("d0", free_blocks=150), FakeDecode("d1", free_blocks=10)
    p_addr, d_addrs = await add(prefill), [await add(decode), await add(other)]
    backend = await make(config([p_addr], d_addrs, load_poll_interval_s=30.0, max_local_prefill_length=32))
    counts = {where: PREFILLS.labels(where=where)._value.get() for where in ("local", "remote")}
    local_rpcs = histogram("baton_prefill_rpc_first_token_seconds", {"where": "local"})[0]
    short = request(list(range(1, 33)), max_tokens=4, prompt_logprobs=1, seed=3)
    chunks = await collect(backend.generate(short))
    assert (chunks[0].queued_seconds, chunks[0].prefill_seconds) == (0.125, 0.0625)
    assert histogram("baton_prefill_rpc_first_token_seconds", {"where": "local"})[0] == local_rpcs + 1
    assert [t.token_id for c in chunks for t in c.tokens] == [token_at(short.prompt_token_ids, i) for i in range(4)]
    assert (chunks[0].prompt_tokens, chunks[0].cached_tokens, chunks[0].placement) == (32, 16, ("", d_addrs[0]))
    assert [p.token_id for p in chunks[0].prompt_logprobs] == short.prompt_token_ids[1:]
    assert [c.finish_reason for c in chunks] == [None, None, None, "length"]
    assert [r.request_id for r in decode.local] == [short.request_id] and params_from_proto(decode.local[0].params) == short.params
    assert prefill.requests == [] and decode.reserved == {} and decode.aborted == []
    long = request(list(range(1, 34)), max_tokens=2)
    assert [c.finish_reason for c in await collect(backend.generate(long))] == [None, "length"]
    assert [r.request_id for r in prefill.requests] == [long.request_id] and long.request_id in decode.reserved
    assert {where: PREFILLS.labels(where=where)._value.get() - counts[where] for where in counts} == {"local": 1, "remote": 1}
    assert (await collect(backend.generate(request([1, 2, 3], max_tokens=1))))[0].prompt_logprobs is None

    decode.delay_s = 0.05
    early = request(list(range(1, 9)), max_tokens=100)
    stream = backend.generate(early)
    await anext(stream)
    await stream.aclose()
    assert decode.aborted == [early.request_id] and prefill.aborted == []
    await asyncio.wait_for(decode.stream_cancelled.wait(), 2.0)

    decode.delay_s, decode.fail_after = 0.0, 2
    broken = request(list(range(5, 25)), max_tokens=6)
    chunks = await collect(backend.generate(broken))
    assert [t.token_id for c in chunks for t in c.tokens] == [token_at(broken.prompt_token_ids, i) for i in range(6)]
    assert list(other.local[-1].output_token_ids) == [token_at(broken.prompt_token_ids, i) for i in range(2)]

    with pytest.raises(BackendError) as err:   # a LoRA adapter the decode worker lacks: 404, nothing retried
        await collect(backend.generate(replace(request([1, 2, 3]), lora="sonnets")))
    assert err.value.status == 404 and "not loaded" in err.value.message and prefill.requests[1:] == []


async def test_a_request_may_be_computed_on_the_decode_worker_within_its_own_limit(cluster) -> None:
    """A request's ``local_prefill_limit`` (a beam search's later steps) is ``max_local_prefill_length``
    for it alone, on a gateway without that flag."""
    add, make, _ = cluster
    prefill, decode = FakePrefill("p0"), FakeDecode("d0")
    backend = await make(config([await add(prefill)], [await add(decode)], load_poll_interval_s=30.0))
    near = replace(request(list(range(1, 9)), max_tokens=1), local_prefill_limit=8)
    far = replace(request(list(range(1, 10)), max_tokens=1), local_prefill_limit=8)
    plain = request(list(range(1, 4)), max_tokens=1)
    for req in (near, far, plain):
        await collect(backend.generate(req))
    assert [r.request_id for r in decode.local] == [near.request_id]
    assert [r.request_id for r in prefill.requests] == [far.request_id, plain.request_id]


async def test_prompts_of_any_length_go_to_the_decode_worker_while_every_prefill_worker_is_busy(cluster) -> None:
    """Under ``max_prefill_queue_size`` a long prompt goes to a prefill worker while one has fewer
    prompts than that, to the decode worker once each has that many (as polled, or started by this
    gateway since), and when no prefill worker answers."""
    add, make, _ = cluster
    idle, busy, decode = FakePrefill("p0"), FakePrefill("p1", running=3), FakeDecode("d0")
    backend = await make(config([await add(idle), await add(busy)], [await add(decode)], max_prefill_queue_size=3))
    await asyncio.sleep(0.2)                                            # polled
    long = request(list(range(1, 200)), max_tokens=2)
    await collect(backend.generate(long))
    assert [r.request_id for r in idle.requests] == [long.request_id] and decode.local == []
    idle.running = 2
    await asyncio.sleep(0.2)
    idle.delay_s = 1.0
    held = asyncio.ensure_future(collect(backend.generate(request(max_tokens=2))))   # the third on p0, in flight
    while len(idle.requests) < 2:
        await asyncio.sleep(0.01)
    await collect(backend.generate(long))
    assert [r.request_id for r in decode.local] == [long.request_id] and busy.requests == []
    await held
    dead = await make(config([dead_address()], [await add(FakeDecode("d1"))], max_prefill_queue_size=3))
    assert [c.finish_reason for c in await collect(dead.generate(long))] == [None, "length"]


STRUCTURED = [
    None, StructuredOutputParams(json='{"type": "object"}', disable_any_whitespace=True), StructuredOutputParams(json_object=True),
    StructuredOutputParams(regex="[a-z]+"), StructuredOutputParams(choice=("a", "b \"c\"", "")),
    StructuredOutputParams(grammar='root ::= "x"'), StructuredOutputParams(regex="[0-9]+", reasoning_end=(151668,)),
    StructuredOutputParams(json_object=True, reasoning_end=(7, 0, 9)),
]


def test_params_and_logprobs_round_trip() -> None:
    for _ in range(50):                     # values exact in float32, so the round trip is exact
        params = SamplingParams(
            max_tokens=random.randint(1, 500), temperature=random.choice([0.0, 0.75, 1.25]),
            top_p=random.choice([1.0, 0.875]), top_k=random.choice([-1, 0, 50]), min_p=random.choice([0.0, 0.0625]),
            repetition_penalty=random.choice([1.0, 1.125]), presence_penalty=random.choice([-2.0, 0.0, 0.5]),
            frequency_penalty=random.choice([-0.25, 0.0, 1.5]), seed=random.choice([None, 0, 2**63]),
            stop_token_ids=random.sample(range(VOCAB), random.randint(0, 3)), ignore_eos=random.random() < 0.5,
            logprobs=random.choice([None, 0, 5]), prompt_logprobs=random.choice([None, 0, 20]),
            logit_bias=random.choice([{}, {3: -100.0, 17: 2.5}]), structured_output=random.choice(STRUCTURED),
            allowed_token_ids=random.choice([None, [0], random.sample(range(VOCAB), 5)]),
            bad_words_token_ids=random.choice([[], [[7]], [[1, 2, 3], [4]]]),
        )
        params.min_tokens = random.randint(0, params.max_tokens) if params.structured_output is None else 0
        wire = params_to_proto(params).SerializeToString()
        assert params_from_proto(common_pb2.SamplingParams.FromString(wire)) == params
    zero = params_from_proto(common_pb2.SamplingParams(max_tokens=4))
    assert (zero.top_p, zero.repetition_penalty, zero.seed, zero.logprobs) == (1.0, 1.0, None, None)
    with pytest.raises(ValueError, match="max_tokens"):
        params_from_proto(common_pb2.SamplingParams())
    with pytest.raises(ValueError, match="names no kind"):
        params_from_proto(common_pb2.SamplingParams(max_tokens=4, structured_output=common_pb2.StructuredOutput()))
    lp = TokenLogprob(random.randrange(VOCAB), -1.5, [(random.randrange(VOCAB), -0.25), (7, -3.0)])
    assert logprob_from_proto(logprob_to_proto(lp)) == lp
    ranked = TokenLogprob(5, -0.5, rank=3)
    assert logprob_from_proto(logprob_to_proto(ranked)) == ranked
