"""The prefill worker's Prefill stream on the demo checkpoint, in process: the first token
goes out while the decode side still holds back its acknowledgement of the KV, the handoff's
end only after it, and the prompt's full block then sits in the worker's prefix cache."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from baton.kvtransfer.grpc_receiver import GrpcKVReceiver, KVTransferServicer
from baton.kvtransfer.grpc_transport import grpc_options
from baton.protos import common_pb2, kvtransfer_pb2, kvtransfer_pb2_grpc, prefill_pb2, prefill_pb2_grpc
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


async def test_first_token_streams_before_the_handoff_is_acknowledged(demo_model):
    ctx = build_worker(worker_arg_parser("prefill", 0).parse_args(["--model", demo_model, "--num-blocks", "64"]),
                       "prefill", keep_finished_blocks=True)
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
        block_ids = [7, 3]
        receiver.expect("r1", block_ids, ctx.layout)
        ticket = kvtransfer_pb2.TransferTicket(
            request_id="r1", transport="grpc", address=receiver.address, block_ids=block_ids,
            layout=ctx.layout.to_proto(), num_tokens=len(PROMPT), cached_blocks=0,
        )
        params = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)
        before = await servicer.engine.call(ctx.core.stats)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = prefill_pb2_grpc.PrefillStub(channel).Prefill(
                prefill_pb2.PrefillRequest(request_id="r1", prompt_token_ids=PROMPT, params=params, ticket=ticket), timeout=60)
            first = await asyncio.wait_for(call.read(), 20)
            assert first.WhichOneof("event") == "first" and first.first.prompt_tokens == len(PROMPT)
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
    finally:
        servicer.engine.stop()
        await server.stop(None)
        await receiver.close()
