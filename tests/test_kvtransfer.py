"""The KV transport: layout handshake, backend registry, and the gRPC stream
backend end to end on a real ``grpc.aio`` server on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import socket
import threading
import time

import grpc
import pytest
import torch

from baton.kvtransfer import (
    KVLayout, LayoutMismatch, TransferError, TransferTicket, check_layout, create_receiver, create_sender,
)
from baton.kvtransfer.grpc_transport import GrpcKVReceiver, GrpcKVSender, grpc_options
from baton.protos import kvtransfer_pb2, kvtransfer_pb2_grpc

pytestmark = pytest.mark.unit

NUM_LAYERS, BLOCK_SIZE, HEADS, HEAD_DIM = 3, 16, 2, 64


def make_caches(num_blocks: int, dtype: torch.dtype, seed: int, layers: int = NUM_LAYERS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(num_blocks, 2, BLOCK_SIZE, HEADS, HEAD_DIM, generator=g).to(dtype) for _ in range(layers)]


def layout_of(caches: list[torch.Tensor]) -> KVLayout:
    return KVLayout.from_caches(caches, model_fingerprint="0123456789abcdef")


class Receiver:
    """A decode-side receiver served by a real grpc.aio server on an ephemeral port."""

    def __init__(self, caches: list[torch.Tensor], max_message_bytes: int = 64 << 20) -> None:
        self.caches = caches
        self.server = grpc.aio.server(options=grpc_options(max_message_bytes))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.receiver = create_receiver("grpc", caches, address=f"127.0.0.1:{port}", server=self.server)

    def ticket(self, request_id: str, block_ids: list[int], layout: KVLayout | None = None) -> TransferTicket:
        layout = layout or layout_of(self.caches)
        self.receiver.expect(request_id, block_ids, layout)
        return TransferTicket(request_id=request_id, transport="grpc", address=self.receiver.address,
                              block_ids=tuple(block_ids), layout=layout, num_tokens=len(block_ids) * BLOCK_SIZE - 3)


@pytest.fixture
async def make_receiver():
    made: list[Receiver] = []

    async def make(caches: list[torch.Tensor], **kwargs) -> Receiver:
        r = Receiver(caches, **kwargs)
        await r.server.start()
        made.append(r)
        return r

    yield make
    for r in made:
        await r.server.stop(grace=None)


@pytest.fixture
async def sender():
    s = create_sender("grpc")
    yield s
    await s.close()


def submit_all(session, caches: list[torch.Tensor]) -> None:
    """Submit every layer from another thread, as the engine's compute thread does."""
    thread = threading.Thread(target=lambda: [session.submit_layer(i, c) for i, c in enumerate(caches)])
    thread.start()
    thread.join()


async def until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------- layout


def test_layout_proto_round_trip_and_mismatch_names_field():
    layout = layout_of(make_caches(4, torch.bfloat16, 0))
    assert KVLayout.from_proto(layout.to_proto()) == layout
    assert layout.dtype == "bfloat16" and layout.num_layers == NUM_LAYERS and layout.layout == "NB2SHD"
    assert layout.block_bytes == 2 * BLOCK_SIZE * HEADS * HEAD_DIM * 2
    check_layout(layout, dataclasses.replace(layout))
    with pytest.raises(LayoutMismatch, match="KV layout mismatch: block_size is 16 here but 32 at the peer") as e:
        check_layout(layout, dataclasses.replace(layout, block_size=32))
    assert (e.value.field, e.value.local_value, e.value.remote_value) == ("block_size", 16, 32)
    for field, value in [("dtype", "float16"), ("num_kv_heads", 4), ("model_fingerprint", "x"), ("layout", "NHD")]:
        with pytest.raises(LayoutMismatch, match=field):
            check_layout(layout, dataclasses.replace(layout, **{field: value}))


def test_ticket_proto_round_trip_and_registry():
    layout = layout_of(make_caches(2, torch.float32, 0))
    ticket = TransferTicket("r1", "grpc", "127.0.0.1:1", (5, 2, 9), layout, 40)
    assert TransferTicket.from_proto(kvtransfer_pb2.TransferTicket.FromString(
        ticket.to_proto().SerializeToString())) == ticket
    assert isinstance(create_sender("grpc"), GrpcKVSender)
    with pytest.raises(ValueError, match=r"unknown KV transport 'carrier-pigeon'; known: grpc"):
        create_sender("carrier-pigeon")
    with pytest.raises(ValueError, match="carrier-pigeon"):
        create_receiver("carrier-pigeon", make_caches(2, torch.float32, 0))


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
async def test_round_trip_bit_exact(dtype, make_receiver, sender):
    src = make_caches(40, dtype, seed=1)
    dst = make_caches(48, dtype, seed=2)
    untouched = [c.clone() for c in dst]
    rng = random.Random(3)
    src_ids, dst_ids = rng.sample(range(40), 11), rng.sample(range(48), 11)
    recv = await make_receiver(dst)
    session = sender.open(recv.ticket("req-1", dst_ids), layout_of(src), src_ids)
    await asyncio.to_thread(submit_all, session, src)
    stats = await session.finish(timeout_s=10)
    got = await recv.receiver.wait_complete("req-1", timeout_s=10)

    layer_bytes = 11 * layout_of(src).block_bytes
    assert stats.bytes == got.bytes == NUM_LAYERS * layer_bytes and stats.seconds > 0
    others = sorted(set(range(48)) - set(dst_ids))
    for layer in range(NUM_LAYERS):
        assert torch.equal(dst[layer][dst_ids].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           src[layer][src_ids].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
        assert torch.equal(dst[layer][others], untouched[layer][others])


async def test_layer_larger_than_chunk_limit_is_split(make_receiver):
    src, dst = make_caches(30, torch.float32, 4), make_caches(30, torch.float32, 5)
    layout = layout_of(src)
    # 3 blocks per message, and a receiver that refuses anything bigger than ~4 blocks.
    sender = GrpcKVSender(max_message_bytes=4 * layout.block_bytes + 1024, chunk_bytes=3 * layout.block_bytes + 100)
    recv = await make_receiver(dst, max_message_bytes=4 * layout.block_bytes + 1024)
    src_ids, dst_ids = list(range(29, 19, -1)), random.Random(6).sample(range(30), 10)
    session = sender.open(recv.ticket("big", dst_ids), layout, src_ids)
    await asyncio.to_thread(submit_all, session, src)
    await session.finish(timeout_s=10)
    await recv.receiver.wait_complete("big", timeout_s=10)
    for layer in range(NUM_LAYERS):
        assert torch.equal(dst[layer][dst_ids], src[layer][src_ids])
    await sender.close()


async def test_chunked_submission_by_block_ranges(make_receiver, sender):
    """Chunked prefill: each step submits the blocks it wrote; a rewritten block is resent."""
    src, dst = make_caches(12, torch.float32, 7), make_caches(12, torch.float32, 8)
    recv = await make_receiver(dst)
    src_ids, dst_ids = [3, 0, 7, 5, 1], [11, 2, 4, 9, 6]
    session = sender.open(recv.ticket("chunked", dst_ids), layout_of(src), src_ids)
    for layer in range(NUM_LAYERS):
        session.submit_layer(layer, src[layer], range(0, 3))
    for layer in range(NUM_LAYERS):
        src[layer][src_ids[2]] += 1.0  # the next step fills block 2 further
        session.submit_layer(layer, src[layer], range(2, 5))
    await session.finish(timeout_s=10)
    await recv.receiver.wait_complete("chunked", timeout_s=10)
    for layer in range(NUM_LAYERS):
        assert torch.equal(dst[layer][dst_ids], src[layer][src_ids])


async def test_finish_refuses_missing_layers(make_receiver, sender):
    src, dst = make_caches(4, torch.float32, 9), make_caches(4, torch.float32, 10)
    recv = await make_receiver(dst)
    session = sender.open(recv.ticket("partial", [0, 1]), layout_of(src), [2, 3])
    session.submit_layer(0, src[0])
    await until(lambda: torch.equal(dst[0][[0, 1]], src[0][[2, 3]]))
    with pytest.raises(TransferError, match="never submitted"):
        await session.finish(timeout_s=5)
    started = time.monotonic()
    with pytest.raises(TransferError, match="sender of request 'partial' ended the stream"):
        await recv.receiver.wait_complete("partial", timeout_s=5)
    assert time.monotonic() - started < 2
