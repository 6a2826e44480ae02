"""The prefill worker's Prefill stream on the demo checkpoint, in process: the first token
goes out while the decode side still holds back its acknowledgement of the KV, the handoff's
end only after it, and the prompt's full block then sits in the worker's prefix cache; a
ticket that comes after the first token gets every layer then, and a stream that ends without
the ticket it promised holds nothing; a resumed request's earlier tokens are computed and sent with its prompt; a handoff that
cannot land blames the decode worker; a grammar that does not compile in time is the client's error; a
cache salt keeps requests to the cached blocks of their own salt."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from baton.kvtransfer.grpc_receiver import GrpcKVReceiver, KVTransferServicer
from baton.kvtransfer.grpc_transport import grpc_options
from baton.engine.llm import LLM
from baton.engine.sampling_params import SamplingParams
from baton.protos import FAILED_PEER_DECODE, FAILED_PEER_KEY, common_pb2, kvtransfer_pb2, kvtransfer_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from baton.services.prefill.server import PrefillServicer
from baton.services.worker import build_worker, worker_arg_parser

pytestmark = pytest.mark.model
PROMPT = [5, 61, 200, 17, 99, 3, 44, 871, 12, 8, 300, 7, 64, 2, 19, 27, 150, 9, 33]  # 19 tokens: 2 blocks


class HeldAck(KVTransferServicer):
    """``KVTransfer.Push`` that lands every layer but acknowledges only once ``ack`` is set."""

    def __init__(self, receiver: GrpcKVReceiver) -> None:
        super().__init__(receiver)
        self.ack = asyncio.Event()

    async def Push(self, request_iterator, context):
        reply = await super().Push(request_iterator, context)
        await self.ack.wait()
        return reply


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])


@pytest.fixture
async def worker(demo_model, request):
    """A prefill servicer and a gRPC KV receiver (acknowledging only once ``push.ack`` is set)
    on one loopback server, on the CPU (or the device an indirect parameter names); yields (ctx,
    receiver, push, the server's address, the receiver's caches)."""
    device = getattr(request, "param", "cpu")
    args = ["--model", demo_model, "--num-blocks", "64", "--device", device]
    ctx = build_worker(worker_arg_parser("prefill", 0).parse_args(args), "prefill", keep_finished_blocks=True)
    servicer = PrefillServicer(ctx)
    caches = [torch.zeros_like(c) for c in ctx.runner.kv_caches]
    server = grpc.aio.server(options=grpc_options())
    prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    receiver = GrpcKVReceiver(caches, address=f"127.0.0.1:{port}")
    push = HeldAck(receiver)
    kvtransfer_pb2_grpc.add_KVTransferServicer_to_server(push, server)
    await server.start()
    servicer.engine.start()
    try:
        yield ctx, servicer, receiver, push, f"127.0.0.1:{port}", caches
    finally:
        servicer.engine.stop()
        await server.stop(None)
        await receiver.close()


def messages(ticket: kvtransfer_pb2.TransferTicket | None = None, **request) -> list[prefill_pb2.PrefillInput]:
    """A Prefill stream's messages: the request, then its ``ticket`` if one is given (``ticket_follows``)."""
    opening = prefill_pb2.PrefillInput(request=prefill_pb2.PrefillRequest(ticket_follows=ticket is not None, **request))
    return [opening] if ticket is None else [opening, prefill_pb2.PrefillInput(ticket=ticket)]


def ticket_for(ctx, receiver, rid: str, block_ids: list[int], num_tokens: int) -> kvtransfer_pb2.TransferTicket:
    receiver.expect(rid, block_ids, ctx.layout)
    return kvtransfer_pb2.TransferTicket(
        request_id=rid, transport="grpc", address=receiver.address, block_ids=block_ids,
        layout=ctx.layout.to_proto(), num_tokens=num_tokens, cached_blocks=0,
    )


async def test_first_token_streams_before_the_handoff_is_acknowledged(worker):
    ctx, servicer, receiver, push, address, caches = worker
    block_ids = [7, 3]
    ticket = ticket_for(ctx, receiver, "r1", block_ids, len(PROMPT))
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)
    before = await servicer.engine.call(ctx.core.stats)
    async with grpc.aio.insecure_channel(address) as channel:
        call = prefill_pb2_grpc.PrefillStub(channel).Prefill(
            messages(ticket, request_id="r1", prompt_token_ids=PROMPT, params=params), timeout=60)
        first = await asyncio.wait_for(call.read(), 20)
        assert first.WhichOneof("event") == "first" and first.first.prompt_tokens == len(PROMPT)
        assert first.first.queued_seconds >= 0 and first.first.prefill_seconds > 0
        await asyncio.wait_for(receiver.wait_complete("r1", 30), 30)   # every layer landed, not yet acknowledged
        handoff = asyncio.ensure_future(call.read())
        await asyncio.sleep(0.3)
        assert not handoff.done()
        push.ack.set()
        last = await asyncio.wait_for(handoff, 30)
        assert last.WhichOneof("event") == "handoff" and last.handoff.bytes_sent > 0
        assert await call.read() is grpc.aio.EOF and await call.code() == grpc.StatusCode.OK
    assert all(cache[block_ids].abs().sum() > 0 for cache in caches)   # every layer's KV landed
    after = await servicer.engine.call(ctx.core.stats)
    assert after.used_blocks == 0 and after.cached_blocks == before.cached_blocks + len(PROMPT) // 16


@pytest.mark.parametrize("worker", ["cpu", CUDA], indirect=True)
async def test_a_ticket_that_comes_after_the_first_token_gets_every_layer(worker):
    """The prompt runs before its ticket comes (the gateway still reserving): the first token goes
    out, the blocks stay held, and the ticket, once it comes, gets every layer at once: the KV of a
    request whose ticket came first."""
    ctx, servicer, receiver, push, address, caches = worker
    push.ack.set()
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)
    early, late = [7, 3], [11, 12]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = prefill_pb2_grpc.PrefillStub(channel)
        replies = [r async for r in stub.Prefill(messages(ticket_for(ctx, receiver, "early", early, len(PROMPT)),
                                                          request_id="early", prompt_token_ids=PROMPT, params=params), timeout=60)]
        assert [r.WhichOneof("event") for r in replies] == ["first", "handoff"]
        call = stub.Prefill(timeout=60)
        await call.write(prefill_pb2.PrefillInput(request=prefill_pb2.PrefillRequest(
            request_id="late", prompt_token_ids=PROMPT, params=params, ticket_follows=True)))
        first = await asyncio.wait_for(call.read(), 20)
        assert first.first.token == replies[0].first.token
        assert (await servicer.engine.call(ctx.core.stats)).used_blocks == 2     # held for the ticket
        assert all(cache[late].abs().sum() == 0 for cache in caches)
        await call.write(prefill_pb2.PrefillInput(ticket=ticket_for(ctx, receiver, "late", late, len(PROMPT))))
        await call.done_writing()
        last = await asyncio.wait_for(call.read(), 30)
        assert last.WhichOneof("event") == "handoff" and last.handoff.bytes_sent == replies[1].handoff.bytes_sent
    for cache in caches:   # the late one computed its last 3 tokens over the cached first block: rounding differs
        assert cache[late].abs().sum() > 0
        torch.testing.assert_close(cache[late], cache[early])
    assert (await servicer.engine.call(ctx.core.stats)).used_blocks == 0


async def test_a_stream_without_the_ticket_it_promised_holds_nothing(worker):
    """A request whose ticket was to follow, on a stream that ends without one, or a stream that does not
    open with a request: INVALID_ARGUMENT, and no block stays held."""
    ctx, servicer, receiver, push, address, caches = worker
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)
    promised = prefill_pb2.PrefillInput(request=prefill_pb2.PrefillRequest(
        request_id="r4", prompt_token_ids=PROMPT, params=params, ticket_follows=True))
    ticket_first = prefill_pb2.PrefillInput(ticket=ticket_for(ctx, receiver, "r5", [1, 2], len(PROMPT)))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = prefill_pb2_grpc.PrefillStub(channel)
        for stream, message in (([promised], "said a ticket follows; its stream sent none"),
                                ([ticket_first], "opens with its request")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Prefill(stream, timeout=60):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    assert (await servicer.engine.call(ctx.core.stats)).used_blocks == 0


async def test_a_resumed_request_sends_its_earlier_tokens_kv_and_samples_the_next(worker, demo_model):
    """Resumed after 15 tokens, the 34 tokens' KV fill three blocks and the token sampled is the
    16th that one process generates."""
    ctx, servicer, receiver, push, address, caches = worker
    push.ack.set()
    whole = LLM(demo_model).generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0]
    earlier = whole.outputs[0].token_ids[:15]
    block_ids = [9, 2, 40]
    ticket = ticket_for(ctx, receiver, "r2", block_ids, len(PROMPT) + 15)
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    async with grpc.aio.insecure_channel(address) as channel:
        call = prefill_pb2_grpc.PrefillStub(channel).Prefill(messages(
            ticket, request_id="r2", prompt_token_ids=PROMPT, params=params, output_token_ids=earlier), timeout=60)
        replies = [reply async for reply in call]
    assert [r.WhichOneof("event") for r in replies] == ["first", "handoff"]
    assert replies[0].first.token.token_id == whole.outputs[0].token_ids[15]
    assert all(cache[block_ids].abs().sum() > 0 for cache in caches)
    assert (await servicer.engine.call(ctx.core.stats)).used_blocks == 0


async def test_a_handoff_that_cannot_land_blames_the_decode_worker(worker):
    """KV the receiver does not expect (its decode worker gave the request up): the stream ends
    UNAVAILABLE with the trailing metadata that makes the gateway avoid the decode worker."""
    ctx, servicer, receiver, push, address, caches = worker
    ticket = kvtransfer_pb2.TransferTicket(
        request_id="r3", transport="grpc", address=receiver.address, block_ids=[5, 6],
        layout=ctx.layout.to_proto(), num_tokens=len(PROMPT), cached_blocks=0,
    )
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)
    async with grpc.aio.insecure_channel(address) as channel:
        call = prefill_pb2_grpc.PrefillStub(channel).Prefill(
            messages(ticket, request_id="r3", prompt_token_ids=PROMPT, params=params), timeout=60)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "decode worker" in err.value.details()
    assert (FAILED_PEER_KEY, FAILED_PEER_DECODE) in tuple(err.value.trailing_metadata())
    assert (await servicer.engine.call(ctx.core.stats)).used_blocks == 0


async def test_a_grammar_that_does_not_compile_in_time_is_the_clients_error(worker, monkeypatch):
    """A grammar xgrammar refuses, or one still compiling when the RPC's deadline nears, ends the
    call INVALID_ARGUMENT (the gateway's 400, no blame on the worker) and holds nothing."""
    ctx, servicer, receiver, push, address, caches = worker
    structured = ctx.core.structured_outputs
    compile_now = structured.compile

    def slow_compile(spec):
        time.sleep(2.0)
        return compile_now(spec)

    cases = [(common_pb2.StructuredOutput(regex="(a"), 60, "Regex parsing error"),
             (common_pb2.StructuredOutput(regex="[a-z]+"), 1.5, "did not compile within")]
    monkeypatch.setattr(structured, "compile", slow_compile)
    async with grpc.aio.insecure_channel(address) as channel:
        for i, (grammar, timeout, message) in enumerate(cases):
            params = common_pb2.SamplingParams(temperature=0.0, max_tokens=8, structured_output=grammar)
            call = prefill_pb2_grpc.PrefillStub(channel).Prefill(
                messages(request_id=f"g{i}", prompt_token_ids=PROMPT, params=params), timeout=timeout)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    assert (await servicer.engine.call(ctx.core.stats)).used_blocks == 0


async def test_an_adapter_the_worker_has_not_loaded_is_not_found(worker):
    ctx, servicer, receiver, push, address, caches = worker
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=4)
    async with grpc.aio.insecure_channel(address) as channel:
        call = prefill_pb2_grpc.PrefillStub(channel).Prefill(
            messages(request_id="r1", prompt_token_ids=PROMPT, params=params, lora="sonnets"), timeout=60)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "LoRA adapter 'sonnets' is not loaded here (loaded: none)" in err.value.details()
    assert (await servicer.engine.call(ctx.core.stats)).used_blocks == 0


async def test_a_request_refused_before_it_is_queued_ends_only_once_its_ticket_has_come(worker):
    """An invalid request (a grammar that does not compile) and one naming an adapter not loaded end
    INVALID_ARGUMENT and NOT_FOUND, but not while the gateway may still be writing their ticket: a
    status that came during that write would reach it as INTERNAL (grpc's asyncio client marks a call
    whose write fails so)."""
    ctx, servicer, receiver, push, address, caches = worker
    bad_grammar = common_pb2.SamplingParams(temperature=0.0, max_tokens=4,
                                            structured_output=common_pb2.StructuredOutput(regex="(a"))
    good = common_pb2.SamplingParams(temperature=0.0, max_tokens=4)
    cases = [("t1", {"params": bad_grammar}, grpc.StatusCode.INVALID_ARGUMENT, "Regex parsing error"),
             ("t2", {"params": good, "lora": "sonnets"}, grpc.StatusCode.NOT_FOUND, "'sonnets' is not loaded")]
    async with grpc.aio.insecure_channel(address) as channel:
        for rid, fields, code, says in cases:
            opening, ticket = messages(ticket_for(ctx, receiver, rid, [1, 2], len(PROMPT)), request_id=rid,
                                       prompt_token_ids=PROMPT, **fields)
            call = prefill_pb2_grpc.PrefillStub(channel).Prefill(timeout=60)
            await call.write(opening)
            await asyncio.sleep(0.5)
            assert not call.done(), f"{rid} ended while its ticket could still be on its way"
            await call.write(ticket)
            await call.done_writing()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == code and says in err.value.details()
    assert (await servicer.engine.call(ctx.core.stats)).used_blocks == 0


async def test_a_cache_salt_keeps_prefill_and_embeddings_to_their_own_cached_blocks(worker):
    """The prompt's cached block serves later requests (prefill or embedding) with the same salt only."""
    ctx, servicer, receiver, push, address, caches = worker
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=4)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = prefill_pb2_grpc.PrefillStub(channel)

        async def prefill(rid: str, salt: str) -> int:
            call = stub.Prefill(messages(request_id=rid, prompt_token_ids=PROMPT, params=params, cache_salt=salt), timeout=60)
            replies = [reply async for reply in call]
            return replies[0].first.cached_tokens

        async def embed(rid: str, salt: str) -> int:
            request = prefill_pb2.EmbedRequest(request_id=rid, prompt_token_ids=PROMPT, cache_salt=salt)
            return (await stub.Embed(request, timeout=60)).cached_tokens

        assert await prefill("r1", "tenant-a") == 0
        assert await prefill("r2", "tenant-a") == 16
        assert await prefill("r3", "tenant-b") == 0
        assert await prefill("r4", "") == 0          # unsalted
        assert await embed("e1", "tenant-a") == 16
        assert await embed("e2", "tenant-c") == 0
        assert await embed("e3", "tenant-c") == 16
    assert (await servicer.engine.call(ctx.core.stats)).used_blocks == 0
