"""The KV transport: layout handshake, backend registry, and every backend end
to end on loopback: the gRPC stream on a real ``grpc.aio`` server, UCX (over
TCP here) on a real ``ucxx`` listener, and NCCL's protocol over gloo pair
groups (the CPU's backend of the same transport). Tests that take the
``transport`` fixture run on each."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable
from pathlib import Path

import grpc
import pytest
import torch

from baton.kvtransfer import (
    KVLayout, LayoutMismatch, TransferError, TransferTicket, check_layout, create_receiver, create_sender,
)
from baton.kvtransfer.grpc_transport import GrpcKVReceiver, GrpcKVSender, grpc_options
from baton.kvtransfer.nccl_receiver import CONTROL_MESSAGE_BYTES, NcclKVReceiver
from baton.kvtransfer.nccl_transport import NcclKVSender
from baton.kvtransfer.pair import SENDER, PairGroup
from baton.kvtransfer.ucx_receiver import FRAME_BYTES, recv_frame, send_frame, ucxx
from baton.kvtransfer.ucx_transport import UcxKVSender
from baton.protos import kvtransfer_pb2, kvtransfer_pb2_grpc
from polling import until

TRANSPORTS = ["grpc", "ucx", "nccl"]

NUM_LAYERS, BLOCK_SIZE, HEADS, HEAD_DIM = 3, 16, 2, 64
BLOCK_BYTES_F32 = 2 * BLOCK_SIZE * HEADS * HEAD_DIM * 4


def make_caches(num_blocks: int, dtype: torch.dtype, seed: int, layers: int = NUM_LAYERS,
                block_size: int = BLOCK_SIZE, heads: int = HEADS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(num_blocks, 2, block_size, heads, HEAD_DIM, generator=g).to(dtype) for _ in range(layers)]


def layout_of(caches: list[torch.Tensor]) -> KVLayout:
    return KVLayout.from_caches(caches, model_fingerprint="0123456789abcdef")


async def fails_within(seconds: float, wait: Awaitable, match: str) -> None:
    """``wait`` raises a ``TransferError`` matching ``match``, within ``seconds``."""
    started = time.monotonic()
    with pytest.raises(TransferError, match=match):
        await wait
    assert time.monotonic() - started < seconds


class Receiver:
    """A decode-side receiver on loopback: served by a real grpc.aio server on an
    ephemeral port, or listening for UCX or NCCL pairs on one. Build it on the test's event loop."""

    def __init__(self, transport: str, caches: list[torch.Tensor], max_message_bytes: int = 64 << 20,
                 **options) -> None:
        self.transport = transport
        self.caches = caches
        self.server = None
        if transport == "grpc":
            self.server = grpc.aio.server(options=grpc_options(max_message_bytes))
            port = self.server.add_insecure_port("127.0.0.1:0")
            self.receiver = create_receiver("grpc", caches, address=f"127.0.0.1:{port}", server=self.server)
        elif transport == "nccl":
            self.receiver = create_receiver("nccl", caches, max_message_bytes=max_message_bytes, **options)
        else:
            self.receiver = create_receiver(transport, caches)

    async def start(self) -> None:
        if self.server is not None:
            await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=None)
        await self.receiver.close()

    def ticket(self, request_id: str, block_ids: list[int], layout: KVLayout | None = None) -> TransferTicket:
        layout = layout or layout_of(self.caches)
        self.receiver.expect(request_id, block_ids, layout)
        return TransferTicket(request_id=request_id, transport=self.transport, address=self.receiver.address,
                              block_ids=tuple(block_ids), layout=layout, num_tokens=len(block_ids) * BLOCK_SIZE - 3)


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


@pytest.fixture
async def make_receiver(transport):
    made: list[Receiver] = []

    async def make(caches: list[torch.Tensor], **kwargs) -> Receiver:
        r = Receiver(transport, caches, **kwargs)
        await r.start()
        made.append(r)
        return r

    yield make
    for r in made:
        await r.stop()


@pytest.fixture
async def make_sender(transport):
    made = []

    def make(**options):
        made.append(create_sender(transport, **options))
        return made[-1]

    yield make
    for s in made:
        await s.close()


@pytest.fixture
async def sender(make_sender):
    return make_sender()


def submit_all(session, caches: list[torch.Tensor], src_ids: list[int]) -> None:
    """Submit every layer from another thread, as the engine's compute thread does."""
    thread = threading.Thread(target=lambda: [session.submit_layer(i, c, src_ids) for i, c in enumerate(caches)])
    thread.start()
    thread.join()


# ---------------------------------------------------------------- layout


@pytest.mark.unit
def test_layout_proto_round_trip_and_mismatch_names_field():
    layout = layout_of(make_caches(4, torch.bfloat16, 0))
    assert KVLayout.from_proto(layout.to_proto()) == layout
    assert layout.dtype == "bfloat16" and layout.num_layers == NUM_LAYERS and layout.layout == "NB2SHD"
    assert layout.block_bytes == 2 * BLOCK_SIZE * HEADS * HEAD_DIM * 2
    check_layout(layout, dataclasses.replace(layout))
    with pytest.raises(LayoutMismatch, match="KV layout mismatch: block_size is 16 here but 32 at the peer") as e:
        check_layout(layout, dataclasses.replace(layout, block_size=32))
    assert (e.value.field, e.value.local_value, e.value.remote_value) == ("block_size", 16, 32)
    assert layout.weight_quantization == ""
    assert KVLayout.from_caches(make_caches(4, torch.bfloat16, 0), "0123456789abcdef", "fp8").weight_quantization == "fp8"
    for field, value in [("dtype", "float16"), ("num_kv_heads", 4), ("model_fingerprint", "x"), ("layout", "NHD"),
                         ("weight_quantization", "fp8")]:
        with pytest.raises(LayoutMismatch, match=field):
            check_layout(layout, dataclasses.replace(layout, **{field: value}))


@pytest.mark.unit
def test_ticket_proto_round_trip_and_registry():
    layout = layout_of(make_caches(2, torch.float32, 0))
    ticket = TransferTicket("r1", "grpc", "127.0.0.1:1", (5, 2, 9), layout, 40)
    assert TransferTicket.from_proto(kvtransfer_pb2.TransferTicket.FromString(
        ticket.to_proto().SerializeToString())) == ticket
    assert isinstance(create_sender("grpc"), GrpcKVSender)
    assert isinstance(create_sender("ucx"), UcxKVSender)
    assert isinstance(create_sender("nccl"), NcclKVSender)
    with pytest.raises(ValueError, match=r"unknown KV transport 'carrier-pigeon'; known: grpc, nccl, ucx"):
        create_sender("carrier-pigeon")
    with pytest.raises(ValueError, match="carrier-pigeon"):
        create_receiver("carrier-pigeon", make_caches(2, torch.float32, 0))


@pytest.mark.unit
def test_a_backend_whose_package_is_missing_is_refused_by_name(monkeypatch):
    from baton.kvtransfer import base

    monkeypatch.setitem(base._BUILTIN_MODULES, "carrier-pigeon", "baton_missing_backend_package")
    with pytest.raises(ValueError, match=r"KV transport 'carrier-pigeon' needs the 'baton_missing_backend_package' package"):
        create_sender("carrier-pigeon")


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
@pytest.mark.unit
async def test_round_trip_bit_exact(dtype, make_receiver, sender):
    src = make_caches(40, dtype, seed=1)
    dst = make_caches(48, dtype, seed=2)
    untouched = [c.clone() for c in dst]
    rng = random.Random(3)
    src_ids, dst_ids = rng.sample(range(40), 11), rng.sample(range(48), 11)
    recv = await make_receiver(dst)
    session = sender.open(recv.ticket("req-1", dst_ids), layout_of(src))
    await asyncio.to_thread(submit_all, session, src, src_ids)
    stats = await session.finish(timeout_s=10)
    got = await recv.receiver.wait_complete("req-1", timeout_s=10)

    layer_bytes = 11 * layout_of(src).block_bytes
    assert stats.bytes == got.bytes == NUM_LAYERS * layer_bytes and stats.seconds > 0
    others = sorted(set(range(48)) - set(dst_ids))
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[dtype.itemsize]
    for layer in range(NUM_LAYERS):
        assert torch.equal(dst[layer][dst_ids].view(bits), src[layer][src_ids].view(bits))
        assert torch.equal(dst[layer][others], untouched[layer][others])


@pytest.mark.unit
async def test_concurrent_requests(make_receiver, sender):
    src, dst = make_caches(16, torch.bfloat16, 26), make_caches(16, torch.bfloat16, 27)
    recv = await make_receiver(dst)
    plans = {"a": ([0, 5, 9], [15, 3, 7]), "b": ([2, 14], [0, 11]), "c": ([6, 1, 12, 4], [9, 2, 13, 5])}
    sessions = {rid: sender.open(recv.ticket(rid, d), layout_of(src)) for rid, (s, d) in plans.items()}

    def engine() -> None:  # one compute thread steps all requests layer by layer
        for layer in range(NUM_LAYERS):
            for rid, session in sessions.items():
                session.submit_layer(layer, src[layer], plans[rid][0])

    await asyncio.to_thread(engine)
    await asyncio.gather(*(s.finish(timeout_s=10) for s in sessions.values()))
    await asyncio.gather(*(recv.receiver.wait_complete(rid, timeout_s=10) for rid in plans))
    for s_ids, d_ids in plans.values():
        for layer in range(NUM_LAYERS):
            assert torch.equal(dst[layer][d_ids].view(torch.int16), src[layer][s_ids].view(torch.int16))


@pytest.mark.unit
async def test_layer_larger_than_chunk_limit_is_split(transport, make_receiver):
    src, dst = make_caches(30, torch.float32, 4), make_caches(30, torch.float32, 5)
    layout = layout_of(src)
    # 3 blocks per message, and a gRPC receiver that refuses anything bigger than ~4 blocks.
    chunk_bytes = 3 * layout.block_bytes + 100
    if transport == "grpc":
        sender = GrpcKVSender(max_message_bytes=4 * layout.block_bytes + 1024, chunk_bytes=chunk_bytes)
        recv = await make_receiver(dst, max_message_bytes=4 * layout.block_bytes + 1024)
    else:
        sender, recv = create_sender(transport, chunk_bytes=chunk_bytes), await make_receiver(dst)
    src_ids, dst_ids = list(range(29, 19, -1)), random.Random(6).sample(range(30), 10)
    session = sender.open(recv.ticket("big", dst_ids), layout)
    await asyncio.to_thread(submit_all, session, src, src_ids)
    await session.finish(timeout_s=10)
    await recv.receiver.wait_complete("big", timeout_s=10)
    for layer in range(NUM_LAYERS):
        assert torch.equal(dst[layer][dst_ids], src[layer][src_ids])
    await sender.close()


@pytest.mark.unit
async def test_ucx_sender_reuses_an_endpoint_and_replaces_a_closed_one():
    src, dst = make_caches(12, torch.float32, 40), make_caches(12, torch.float32, 41)
    recv, sender = Receiver("ucx", dst), UcxKVSender()
    plans = [("one", [0, 1], [5, 6]), ("two", [2, 3], [7, 8]), ("three", [4, 5], [9, 10])]
    served = []
    for rid, s_ids, d_ids in plans:
        if rid == "three":  # the receiver drops the idle connection (as a restart would)
            for task in list(recv.receiver._handlers):
                task.cancel()
            await until(lambda: not recv.receiver._handlers)
        session = sender.open(recv.ticket(rid, d_ids), layout_of(src))
        await asyncio.to_thread(submit_all, session, src, s_ids)
        await session.finish(timeout_s=10)
        await recv.receiver.wait_complete(rid, timeout_s=10)
        served.append(set(recv.receiver._handlers))
        for layer in range(NUM_LAYERS):
            assert torch.equal(dst[layer][d_ids], src[layer][s_ids])
    assert len(served[0]) == 1 and served[1] == served[0]  # "two" went over the endpoint of "one"
    assert len(served[2]) == 1 and served[2] != served[0]
    await sender.close()
    await recv.stop()


@pytest.mark.unit
async def test_chunked_submission_by_block_ranges(make_receiver, sender):
    """Chunked prefill: each step submits the blocks it wrote; a rewritten block is resent."""
    src, dst = make_caches(12, torch.float32, 7), make_caches(12, torch.float32, 8)
    recv = await make_receiver(dst)
    src_ids, dst_ids = [3, 0, 7, 5, 1], [11, 2, 4, 9, 6]
    session = sender.open(recv.ticket("chunked", dst_ids), layout_of(src))
    for layer in range(NUM_LAYERS):
        session.submit_layer(layer, src[layer], src_ids[0:3], first=0)
    for layer in range(NUM_LAYERS):
        src[layer][src_ids[2]] += 1.0  # the next step fills block 2 further
        session.submit_layer(layer, src[layer], src_ids[2:5], first=2)
    await session.finish(timeout_s=10)
    await recv.receiver.wait_complete("chunked", timeout_s=10)
    for layer in range(NUM_LAYERS):
        assert torch.equal(dst[layer][dst_ids], src[layer][src_ids])


@pytest.mark.unit
async def test_finish_refuses_missing_layers(make_receiver, sender):
    src, dst = make_caches(4, torch.float32, 9), make_caches(4, torch.float32, 10)
    recv = await make_receiver(dst)
    session = sender.open(recv.ticket("partial", [0, 1]), layout_of(src))
    session.submit_layer(0, src[0], [2, 3])
    await until(lambda: torch.equal(dst[0][[0, 1]], src[0][[2, 3]]))
    with pytest.raises(TransferError, match="never submitted"):
        await session.finish(timeout_s=5)
    await fails_within(2, recv.receiver.wait_complete("partial", timeout_s=5),
                       "sender of request 'partial' (ended the stream|went away)")


@pytest.mark.unit
async def test_chunk_over_the_receivers_message_limit_fails_clearly():
    src, dst = make_caches(8, torch.float32, 11), make_caches(8, torch.float32, 12)
    layout = layout_of(src)
    recv = Receiver("grpc", dst, max_message_bytes=2 * layout.block_bytes)
    await recv.start()
    sender = GrpcKVSender(chunk_bytes=4 * layout.block_bytes)
    session = sender.open(recv.ticket("huge", [0, 1, 2, 3]), layout)
    await asyncio.to_thread(submit_all, session, src, [4, 5, 6, 7])
    with pytest.raises(TransferError, match="RESOURCE_EXHAUSTED"):
        await session.finish(timeout_s=10)
    await sender.close()
    await recv.stop()


# ---------------------------------------------------------------- refusals and failures


@pytest.mark.parametrize("field", ["block_size", "dtype", "num_kv_heads"])
@pytest.mark.unit
async def test_sender_refuses_mismatched_ticket_before_sending(field, make_receiver, sender):
    dst = make_caches(4, torch.float32, 13)
    before = [c.clone() for c in dst]
    recv = await make_receiver(dst)
    ticket = recv.ticket("mismatch", [1, 2])
    changed = {"block_size": 32, "dtype": "bfloat16", "num_kv_heads": 4}[field]
    local = dataclasses.replace(ticket.layout, **{field: changed})
    with pytest.raises(LayoutMismatch, match=f"KV layout mismatch: {field} is {changed!r}|{changed} here") as e:
        sender.open(ticket, local)
    assert e.value.field == field
    with pytest.raises(TransferError, match="did not arrive"):  # nothing was sent
        await recv.receiver.wait_complete("mismatch", timeout_s=0.2)
    assert all(torch.equal(a, b) for a, b in zip(dst, before))


@pytest.mark.parametrize("field", ["block_size", "dtype", "num_kv_heads"])
@pytest.mark.unit
async def test_receiver_refuses_mismatched_layout_naming_field(field, transport, make_receiver, sender):
    """A ticket that does not describe the receiver (stale or forged) is refused at the handshake."""
    kwargs = {"block_size": {"block_size": 32}, "dtype": {"dtype": torch.float8_e4m3fn},  # an fp8 worker, a float32 one
              "num_kv_heads": {"heads": 4}}[field]
    src = make_caches(4, kwargs.pop("dtype", torch.float32), 14, **kwargs)
    dst = make_caches(4, torch.float32, 15)
    before = [c.clone() for c in dst]
    recv = await make_receiver(dst)
    recv.receiver.expect("stale", [1, 2], layout_of(dst))
    ticket = TransferTicket("stale", transport, recv.receiver.address, (1, 2), layout_of(src), 20)
    session = sender.open(ticket, layout_of(src))
    await asyncio.to_thread(submit_all, session, src, [0, 3])
    with pytest.raises(TransferError, match=f"FAILED_PRECONDITION: KV layout mismatch: {field} is"):
        await session.finish(timeout_s=10)
    with pytest.raises(TransferError, match=f"mismatch: {field}"):
        await recv.receiver.wait_complete("stale", timeout_s=5)
    assert all(torch.equal(a, b) for a, b in zip(dst, before))


@pytest.mark.unit
async def test_unknown_request_is_refused(transport, make_receiver, sender):
    src, dst = make_caches(4, torch.float32, 16), make_caches(4, torch.float32, 17)
    recv = await make_receiver(dst)
    ticket = TransferTicket("nobody", transport, recv.receiver.address, (0, 1), layout_of(dst), 20)
    session = sender.open(ticket, layout_of(src))
    await asyncio.to_thread(submit_all, session, src, [2, 3])
    with pytest.raises(TransferError, match="NOT_FOUND: no KV transfer is expected for request 'nobody'"):
        await session.finish(timeout_s=10)


@pytest.mark.unit
async def test_receiver_cancel_fails_sender_promptly(make_receiver, sender):
    src, dst = make_caches(6, torch.float32, 18), make_caches(6, torch.float32, 19)
    before = [c.clone() for c in dst]
    recv = await make_receiver(dst)
    session = sender.open(recv.ticket("cancel-me", [4, 5]), layout_of(src))
    session.submit_layer(0, src[0], [0, 1])
    await until(lambda: torch.equal(dst[0][[4, 5]], src[0][[0, 1]]))
    assert recv.receiver.cancel("cancel-me") and not recv.receiver.cancel("cancel-me")
    await asyncio.sleep(0.05)
    for layer in range(1, NUM_LAYERS):
        session.submit_layer(layer, src[layer], [0, 1])  # the engine carries on; nothing may land any more
    await fails_within(5, session.finish(timeout_s=30), "cancelled by the receiver")
    assert all(torch.equal(dst[layer], before[layer]) for layer in range(1, NUM_LAYERS))


@pytest.mark.unit
async def test_dead_receiver_fails_within_deadline(transport, sender):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = make_caches(2, torch.float32, 20)
    ticket = TransferTicket("dead", transport, f"127.0.0.1:{port}", (0, 1), layout_of(src), 20)
    session = sender.open(ticket, layout_of(src))
    submit_all(session, src, [0, 1])
    await fails_within(10, session.finish(timeout_s=10), "UNAVAILABLE")


@pytest.mark.unit
async def test_wait_complete_timeout_cancels_and_forgets(make_receiver, sender):
    src, dst = make_caches(4, torch.float32, 21), make_caches(4, torch.float32, 22)
    before = [c.clone() for c in dst]
    recv = await make_receiver(dst)
    ticket = recv.ticket("slow", [0, 3])
    await fails_within(2, recv.receiver.wait_complete("slow", timeout_s=0.2),
                       r"'slow' did not arrive within 0.2 s \(0 of 6 layer-blocks landed\)")
    with pytest.raises(TransferError, match="no KV transfer is expected"):
        await recv.receiver.wait_complete("slow", timeout_s=0.2)
    session = sender.open(ticket, layout_of(src))  # a late sender finds nothing to fill
    await asyncio.to_thread(submit_all, session, src, [1, 2])
    with pytest.raises(TransferError, match="NOT_FOUND"):
        await session.finish(timeout_s=10)
    assert all(torch.equal(a, b) for a, b in zip(dst, before))


def chunk(request_id: str, layout: KVLayout | None = None, **fields) -> kvtransfer_pb2.KVChunk:
    msg = kvtransfer_pb2.KVChunk(request_id=request_id, **fields)
    if layout is not None:
        msg.layout.CopyFrom(layout.to_proto())
    return msg


async def ucx_push(address: str, messages: list[tuple[object, int | None]]) -> kvtransfer_pb2.KVAck:
    """Send raw UCX messages (a protobuf as a frame, raw frame bytes, or ``size`` bytes
    of data when the message is None) and return the receiver's first answer after them."""
    host, port = address.rsplit(":", 1)
    ep = await ucxx.create_endpoint(host, int(port))
    try:
        for msg, size in messages:
            if isinstance(msg, bytearray):  # a raw frame
                await ep.send(msg)
            else:
                await (send_frame(ep, msg) if msg is not None else ep.send(bytearray(size)))
            if isinstance(msg, kvtransfer_pb2.KVChunk) and msg.HasField("layout"):
                assert (await recv_frame(ep, kvtransfer_pb2.KVAck)).ok
        return await asyncio.wait_for(recv_frame(ep, kvtransfer_pb2.KVAck), 10)
    finally:
        ep.abort()


@contextlib.asynccontextmanager
async def raw_pair(address: str):
    """A hand-driven NCCL pair with the receiver at ``address``: its control call, and
    the sender's half of its (gloo) group."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = kvtransfer_pb2_grpc.KVPairStub(channel).Open()
        named = (await call.read()).group
        group = await PairGroup.join((address.rsplit(":", 1)[0], named.store_port), named.prefix, SENDER,
                                     named.backend, torch.device("cpu"), timeout_s=10)
        try:
            yield call, group
        finally:
            call.cancel()
            group.abort()


async def push_raw(recv: Receiver, layout: KVLayout, fields: dict, size: int) -> tuple[str, str]:
    """Send the handshake, then one hand-made chunk of ``size`` data bytes; the
    receiver's refusal as (status code name, message)."""
    if recv.transport == "grpc":
        async with grpc.aio.insecure_channel(recv.receiver.address) as channel:
            chunks = [chunk("bad", layout), chunk("bad", data=bytes(size), **fields)]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await kvtransfer_pb2_grpc.KVTransferStub(channel).Push(iter(chunks), timeout=10)
        return e.value.code().name, e.value.details()
    if recv.transport == "nccl":
        async with raw_pair(recv.receiver.address) as (call, group):
            await call.write(kvtransfer_pb2.PairRequest(chunk=chunk("bad", layout)))
            await call.write(kvtransfer_pb2.PairRequest(chunk=chunk("bad", data_bytes=size, **fields)))
            if size:
                group.send(torch.zeros(size, dtype=torch.uint8))
            answer = (await asyncio.wait_for(call.read(), 10)).ack
        assert not answer.ok and answer.request_id == "bad"
        return answer.code, answer.error
    messages = [(chunk("bad", layout), None), (chunk("bad", **fields), None)] + ([(None, size)] if size else [])
    answer = await ucx_push(recv.receiver.address, messages)
    assert not answer.ok
    return answer.code, answer.error


@pytest.mark.parametrize("fields, size, message", [
    ({"layer": 0, "first_block": 1, "num_blocks": 2}, 2 * BLOCK_BYTES_F32, r"blocks \[1, 3\) outside the ticket's 2"),
    ({"layer": 0, "first_block": -1, "num_blocks": 1}, BLOCK_BYTES_F32, r"blocks \[-1, 0\) outside the ticket"),
    ({"layer": NUM_LAYERS, "first_block": 0, "num_blocks": 1}, BLOCK_BYTES_F32, r"layer 3 outside \[0, 3\)"),
    ({"layer": 0, "first_block": 0, "num_blocks": 1}, BLOCK_BYTES_F32 + 4,  # gRPC sees the size, UCX a truncation
     f"carries ({BLOCK_BYTES_F32 + 4} bytes, expected {BLOCK_BYTES_F32}|more than the {BLOCK_BYTES_F32} bytes of its 1)"),
    ({"last": True}, 0, "arrived with 6 of 6 layer-blocks missing"),
])
@pytest.mark.unit
async def test_receiver_rejects_bad_chunks(fields, size, message, make_receiver):
    dst = make_caches(4, torch.float32, 23)
    before = [c.clone() for c in dst]
    recv = await make_receiver(dst)
    layout = layout_of(dst)
    recv.receiver.expect("bad", [2, 0], layout)
    code, details = await push_raw(recv, layout, fields, size)
    assert code == "INVALID_ARGUMENT" and re.search(message, details)
    with pytest.raises(TransferError, match=message):
        await recv.receiver.wait_complete("bad", timeout_s=5)
    assert all(torch.equal(a, b) for a, b in zip(dst, before))


@pytest.mark.unit
async def test_grpc_first_chunk_without_layout_is_refused():
    recv = Receiver("grpc", make_caches(4, torch.float32, 24))
    await recv.start()
    recv.receiver.expect("nolayout", [1], layout_of(recv.caches))
    async with grpc.aio.insecure_channel(recv.receiver.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await kvtransfer_pb2_grpc.KVTransferStub(channel).Push(iter([chunk("nolayout", last=True)]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "must carry the KV layout" in e.value.details()
    await recv.stop()


@pytest.mark.unit
async def test_ucx_handshake_refusals():
    recv = Receiver("ucx", make_caches(4, torch.float32, 24))
    recv.receiver.expect("nolayout", [1], layout_of(recv.caches))
    answer = await ucx_push(recv.receiver.address, [(chunk("nolayout", last=True), None)])
    assert (answer.ok, answer.code) == (False, "INVALID_ARGUMENT") and "must carry the KV layout" in answer.error
    answer = await ucx_push(recv.receiver.address, [(None, FRAME_BYTES + 1)])
    assert (answer.ok, answer.code) == (False, "INVALID_ARGUMENT") and f"over the {FRAME_BYTES}-byte frame" in answer.error
    garbage = bytearray(FRAME_BYTES)
    garbage[:6] = (2).to_bytes(4, "little") + b"\xff\xff"
    answer = await ucx_push(recv.receiver.address, [(garbage, None)])
    assert (answer.ok, answer.code) == (False, "INVALID_ARGUMENT") and "not a KVChunk" in answer.error
    with pytest.raises(ValueError, match="does not fit"):
        await send_frame(None, chunk("x" * FRAME_BYTES))
    await recv.stop()


# ---------------------------------------------------------------- NCCL pairs (over gloo here)


@pytest.mark.parametrize("transport", ["nccl"])
@pytest.mark.unit
async def test_nccl_pair_carries_a_senders_transfers_and_two_senders_at_once(make_receiver, make_sender):
    """One sender's transfers share its pair (one after another, and at once), and another
    sender's pair lands beside it; a refused or cancelled request leaves its pair's others alone."""
    src, dst = make_caches(16, torch.float32, 50), make_caches(16, torch.float32, 51)
    recv, one, two = await make_receiver(dst), make_sender(), make_sender()
    plans = {"a": (one, [0, 1], [2, 3]), "b": (two, [4, 5], [6, 7]), "c": (one, [8, 9], [10, 11]),
             "cancelled": (one, [12], [12])}
    sessions = {rid: sender.open(recv.ticket(rid, d), layout_of(src)) for rid, (sender, _, d) in plans.items()}
    for rid, session in sessions.items():
        session.submit_layer(0, src[0], plans[rid][1])
    await until(lambda: torch.equal(dst[0][12], src[0][12]))
    assert recv.receiver.cancel("cancelled")
    for layer in range(1, NUM_LAYERS):
        for rid, session in sessions.items():
            session.submit_layer(layer, src[layer], plans[rid][1])
    await asyncio.gather(*(sessions[rid].finish(timeout_s=10) for rid in "abc"))
    await asyncio.gather(*(recv.receiver.wait_complete(rid, timeout_s=10) for rid in "abc"))
    with pytest.raises(TransferError, match="cancelled by the receiver"):
        await sessions["cancelled"].finish(timeout_s=10)
    for _, s_ids, d_ids in plans.values():
        for layer in range(NUM_LAYERS):
            assert torch.equal(dst[layer][d_ids], src[layer][s_ids]) == (d_ids != [12] or layer == 0)
    first_pair = one._links[recv.receiver.address]
    session = one.open(recv.ticket("later", [13]), layout_of(src))
    await asyncio.to_thread(submit_all, session, src, [13])
    await session.finish(timeout_s=10)
    await recv.receiver.wait_complete("later", timeout_s=10)
    assert one._links[recv.receiver.address] is first_pair and first_pair is not two._links[recv.receiver.address]


@pytest.mark.parametrize("transport", ["nccl"])
@pytest.mark.unit
async def test_nccl_data_of_a_cancelled_request_already_on_its_way_is_dropped(make_receiver):
    """The receiver still takes the data that a sender sent for a request cancelled meanwhile
    (the pair stays in step) but lands none of it, also of a header it read before the cancel;
    the pair's next request lands whole."""
    dst = make_caches(4, torch.float32, 57)
    before = [c.clone() for c in dst]
    recv = await make_receiver(dst)
    layout = layout_of(dst)
    recv.receiver.expect("gone", [0], layout)
    recv.receiver.expect("kept", [1], layout)
    async with raw_pair(recv.receiver.address) as (call, group):
        async def header(rid: str, layer: int) -> None:
            await call.write(kvtransfer_pb2.PairRequest(chunk=chunk(rid, layer=layer, first_block=0, num_blocks=1,
                                                                    data_bytes=layout.block_bytes)))

        async def data(value: int) -> None:
            await group.send(torch.full((layout.block_bytes,), value, dtype=torch.uint8))

        for rid in ("gone", "kept"):
            await call.write(kvtransfer_pb2.PairRequest(chunk=chunk(rid, layout)))
        await header("gone", 0)
        await data(1)
        await until(lambda: bool((dst[0][0].view(torch.uint8) == 1).all()))
        await header("gone", 1)
        await asyncio.sleep(0.2)  # the receiver reads it and waits for its data
        assert recv.receiver.cancel("gone")
        answer = (await asyncio.wait_for(call.read(), 10)).ack
        assert (answer.request_id, answer.ok, answer.code) == ("gone", False, "ABORTED")
        await data(2)
        for layer in range(NUM_LAYERS):
            await header("gone", layer)
            await data(2)
            await header("kept", layer)
            await data(3)
        await call.write(kvtransfer_pb2.PairRequest(chunk=chunk("kept", last=True)))
        answer = (await asyncio.wait_for(call.read(), 10)).ack
        assert (answer.request_id, answer.ok, answer.bytes_received) == ("kept", True, NUM_LAYERS * layout.block_bytes)
    await recv.receiver.wait_complete("kept", timeout_s=10)
    assert all(bool((dst[layer][1].view(torch.uint8) == 3).all()) for layer in range(NUM_LAYERS))
    assert bool((dst[0][0].view(torch.uint8) == 1).all())  # what landed before the cancel, and nothing after it
    assert all(torch.equal(dst[layer][0], before[layer][0]) for layer in range(1, NUM_LAYERS))


@pytest.mark.unit
async def test_nccl_pair_refuses_caches_its_backend_does_not_take():
    """A CPU prefill worker cannot pair with a GPU decode worker (nor the other way round)."""
    with pytest.raises(TransferError, match="the receiver's KV moves over nccl, which does not take KV on cpu: "
                                            "the nccl transport needs both caches on CUDA or both on the CPU"):
        await PairGroup.join(("127.0.0.1", 1), "pair/", SENDER, "nccl", torch.device("cpu"), timeout_s=1)


async def sender_to_kill(address: str, layout: KVLayout) -> None:
    """A sender process that sends layer 0 of request 'killed', then the header of layer 1,
    whose data never comes, says 'ready' and waits to be killed."""
    async with raw_pair(address) as (call, group):
        def header(layer: int) -> kvtransfer_pb2.PairRequest:
            return kvtransfer_pb2.PairRequest(chunk=chunk("killed", layer=layer, first_block=0, num_blocks=2,
                                                          data_bytes=2 * layout.block_bytes))
        await call.write(kvtransfer_pb2.PairRequest(chunk=chunk("killed", layout)))
        await call.write(header(0))
        await group.send(torch.ones(2 * layout.block_bytes, dtype=torch.uint8))
        await call.write(header(1))
        print("ready", flush=True)
        await asyncio.sleep(60)


_SENDER_TO_KILL = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from baton.protos import common_pb2
from test_kvtransfer import KVLayout, sender_to_kill
asyncio.run(sender_to_kill(sys.argv[2], KVLayout.from_proto(common_pb2.KVLayout.FromString(bytes.fromhex(sys.argv[3])))))
"""


@pytest.mark.parametrize("transport", ["nccl"])
@pytest.mark.unit
async def test_nccl_sender_killed_mid_transfer_fails_the_request_and_the_next_sender_gets_a_new_pair(
        make_receiver, make_sender):
    src, dst = make_caches(4, torch.float32, 52), make_caches(4, torch.float32, 53)
    before = [c.clone() for c in dst]
    recv = await make_receiver(dst)
    layout = layout_of(dst)
    recv.receiver.expect("killed", [0, 1], layout)
    args = [str(Path(__file__).parent), recv.receiver.address, layout.to_proto().SerializeToString().hex()]
    proc = subprocess.Popen([sys.executable, "-c", _SENDER_TO_KILL, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60) == "ready\n"
        await until(lambda: bool((dst[0][[0, 1]].view(torch.uint8) == 1).all()))
        proc.send_signal(signal.SIGKILL)
        await fails_within(5, recv.receiver.wait_complete("killed", timeout_s=30),
                           "the sender of request 'killed' went away")
    finally:
        proc.kill()
        proc.wait()
    assert all(torch.equal(dst[layer], before[layer]) for layer in range(1, NUM_LAYERS))
    sender = make_sender()
    session = sender.open(recv.ticket("next", [2, 3]), layout)
    await asyncio.to_thread(submit_all, session, src, [0, 1])
    await session.finish(timeout_s=10)
    await recv.receiver.wait_complete("next", timeout_s=10)
    assert all(torch.equal(dst[layer][[2, 3]], src[layer][[0, 1]]) for layer in range(NUM_LAYERS))


@pytest.mark.parametrize("transport", ["nccl"])
@pytest.mark.unit
async def test_nccl_sender_gone_fails_its_requests_at_once_while_a_task_of_the_pair_is_slow_to_end(
        make_receiver, monkeypatch):
    """The pair's requests fail when it breaks, not once all of its tasks have ended."""
    release = asyncio.Event()

    async def slow_to_end(pair, context) -> None:   # stands for a task stuck in a long wait
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()

    monkeypatch.setattr(NcclKVReceiver, "_reply", staticmethod(slow_to_end))
    dst = make_caches(4, torch.float32, 57)
    recv = await make_receiver(dst)
    layout = layout_of(dst)
    recv.receiver.expect("slow", [0], layout)
    try:
        async with raw_pair(recv.receiver.address) as (call, group):
            await call.write(kvtransfer_pb2.PairRequest(chunk=chunk("slow", layout)))
            await call.write(kvtransfer_pb2.PairRequest(chunk=chunk("slow", layer=0, first_block=0, num_blocks=1,
                                                                    data_bytes=layout.block_bytes)))
            await group.send(torch.ones(layout.block_bytes, dtype=torch.uint8))
            await until(lambda: bool((dst[0][0].view(torch.uint8) == 1).all()))
        await fails_within(5, recv.receiver.wait_complete("slow", timeout_s=30),
                           "the sender of request 'slow' went away")
    finally:
        release.set()


@pytest.mark.parametrize("transport", ["nccl"])
@pytest.mark.unit
async def test_nccl_data_that_never_comes_breaks_the_pair_within_its_deadline(make_receiver):
    dst = make_caches(4, torch.float32, 54)
    recv = await make_receiver(dst, timeout_s=1.0)
    layout = layout_of(dst)
    recv.receiver.expect("stalled", [0], layout)
    async with raw_pair(recv.receiver.address) as (call, _):
        await call.write(kvtransfer_pb2.PairRequest(chunk=chunk("stalled", layout)))
        await call.write(kvtransfer_pb2.PairRequest(chunk=chunk("stalled", layer=0, first_block=0, num_blocks=1,
                                                                data_bytes=layout.block_bytes)))
        await fails_within(5, recv.receiver.wait_complete("stalled", timeout_s=30), "'stalled' went away .*Timed out")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(call.read(), 10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "the pair's gloo group failed" in e.value.details()


@pytest.mark.parametrize("transport", ["nccl"])
@pytest.mark.unit
async def test_nccl_header_over_the_receivers_limit_breaks_the_pair_and_the_next_transfer_opens_another(
        make_receiver, make_sender):
    src, dst = make_caches(8, torch.float32, 55), make_caches(8, torch.float32, 56)
    layout = layout_of(src)
    recv = await make_receiver(dst, max_message_bytes=2 * layout.block_bytes)
    sender = make_sender(chunk_bytes=4 * layout.block_bytes)
    session = sender.open(recv.ticket("huge", [0, 1, 2, 3]), layout)
    await asyncio.to_thread(submit_all, session, src, [4, 5, 6, 7])
    message = rf"INVALID_ARGUMENT: a header of request 'huge' announces {4 * layout.block_bytes} bytes of data, " \
              rf"outside \(0, {2 * layout.block_bytes}\]"
    with pytest.raises(TransferError, match=message):
        await session.finish(timeout_s=10)
    with pytest.raises(TransferError, match=message.removeprefix("INVALID_ARGUMENT: ")):
        await recv.receiver.wait_complete("huge", timeout_s=10)
    session = sender.open(recv.ticket("small", [4, 5]), layout)
    await asyncio.to_thread(submit_all, session, src, [0, 1])
    await session.finish(timeout_s=10)
    await recv.receiver.wait_complete("small", timeout_s=10)
    assert all(torch.equal(dst[layer][[4, 5]], src[layer][[0, 1]]) for layer in range(NUM_LAYERS))
    recv.ticket("raw", [6, 7])
    async with raw_pair(recv.receiver.address) as (call, _):  # the break is said in the stream, before its end
        await call.write(kvtransfer_pb2.PairRequest(chunk=chunk("raw", layout)))
        await call.write(kvtransfer_pb2.PairRequest(chunk=chunk("raw", layer=0, first_block=0, num_blocks=2,
                                                                data_bytes=4 * layout.block_bytes)))
        reply = await asyncio.wait_for(call.read(), 10)
        assert reply.HasField("broken") and reply.broken.code == "INVALID_ARGUMENT"
        assert re.search(message.removeprefix("INVALID_ARGUMENT: ").replace("'huge'", "'raw'"), reply.broken.error)
    async with raw_pair(recv.receiver.address) as (call, _):  # a control message over its limit
        await call.write(kvtransfer_pb2.PairRequest(chunk=chunk("x" * CONTROL_MESSAGE_BYTES)))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(call.read(), 10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.unit
async def test_nccl_control_port_listens_on_the_receivers_host_only():
    receiver = create_receiver("nccl", make_caches(2, torch.float32, 59), host="127.0.0.1")
    port = int(receiver.address.rsplit(":", 1)[1])

    def accepts(host: str) -> bool:
        with socket.socket() as s:
            return s.connect_ex((host, port)) == 0

    try:
        await until(lambda: accepts("127.0.0.1"))
        assert not accepts("127.0.0.2")   # another loopback address, as another interface's would be
    finally:
        await receiver.close()


async def receiver_to_stop(transport: str) -> None:
    """A receiver process expecting requests 'first' (blocks 0, 1) and 'second' (2, 3): prints
    its address, then serves until it is stopped or killed."""
    recv = Receiver(transport, make_caches(4, torch.float32, 58))
    await recv.start()
    for request_id, blocks in (("first", [0, 1]), ("second", [2, 3])):
        recv.receiver.expect(request_id, blocks, layout_of(recv.caches))
    print(recv.receiver.address, flush=True)
    await asyncio.sleep(120)


_RECEIVER_TO_STOP = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from test_kvtransfer import receiver_to_stop
asyncio.run(receiver_to_stop(sys.argv[2]))
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.unit
async def test_a_receiver_that_stops_answering_fails_its_transfer_in_seconds_not_at_the_deadline(
        transport, make_sender):
    """The receiver's process frozen (SIGSTOP: its connections stay open, nothing answers on
    them, as with a host gone or a network cut), a transfer to it waits for an answer; the
    sender's keepalive pings (gRPC, NCCL's control stream) or, over UCX, its wait on an
    endpoint where nothing completes find the receiver gone long before the stream's deadline."""
    src = make_caches(4, torch.float32, 57)
    layout = layout_of(src)
    proc = subprocess.Popen([sys.executable, "-c", _RECEIVER_TO_STOP, str(Path(__file__).parent), transport],
                            stdout=subprocess.PIPE, text=True)
    try:
        address = (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)).strip()
        sender = make_sender(keepalive_s=1.0, stream_timeout_s=30.0)

        async def transfer(request_id: str, blocks: list[int]) -> None:
            ticket = TransferTicket(request_id, transport, address, tuple(blocks), layout, 2 * BLOCK_SIZE)
            session = sender.open(ticket, layout)
            await asyncio.to_thread(submit_all, session, src, [0, 1])
            await session.finish(timeout_s=60)

        await transfer("first", [0, 1])   # connected (for NCCL: the pair set up)
        proc.send_signal(signal.SIGSTOP)
        await fails_within(10, transfer("second", [2, 3]), "UNAVAILABLE")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.unit
def test_expect_and_open_validate_arguments():
    caches = make_caches(4, torch.float32, 25)
    layout = layout_of(caches)
    receiver = GrpcKVReceiver(caches, address="127.0.0.1:1")
    receiver.expect("a", [0, 1], layout)
    with pytest.raises(ValueError, match="already expected"):
        receiver.expect("a", [2], layout)
    with pytest.raises(ValueError, match="distinct and within"):
        receiver.expect("b", [3, 4], layout)
    with pytest.raises(ValueError, match="distinct"):
        receiver.expect("b", [1, 1], layout)
    with pytest.raises(ValueError, match="does not match the layout"):
        receiver.expect("b", [2], dataclasses.replace(layout, head_dim=128))
    with pytest.raises(ValueError, match="layers"):
        receiver.expect("b", [2], dataclasses.replace(layout, num_layers=NUM_LAYERS + 1))
    ticket = TransferTicket("a", "grpc", "127.0.0.1:1", (0, 1), layout, 20)
    with pytest.raises(TransferError, match="no destination blocks"):
        GrpcKVSender().open(dataclasses.replace(ticket, block_ids=()), layout)
    with pytest.raises(TransferError, match="transport 'ucx'"):
        GrpcKVSender().open(dataclasses.replace(ticket, transport="ucx"), layout)
    with pytest.raises(TransferError, match="over the 1000-byte chunk limit"):
        GrpcKVSender(chunk_bytes=1000).open(ticket, layout)
    with pytest.raises(TransferError, match="transport 'grpc'"):
        UcxKVSender().open(ticket, layout)
    with pytest.raises(TransferError, match="'nohost' is not host:port"):
        UcxKVSender().open(dataclasses.replace(ticket, transport="ucx", address="nohost"), layout)
    with pytest.raises(TransferError, match="'nohost' is not host:port"):
        NcclKVSender().open(dataclasses.replace(ticket, transport="nccl", address="nohost"), layout)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("transport", ["grpc", "ucx"])
def test_cuda_round_trip_bit_exact(transport):
    """CUDA caches on both ends: gather on the GPU, then a pinned async copy out (gRPC) or
    the device buffer itself (UCX), scattered back in on the GPU."""
    src = [c.cuda() for c in make_caches(40, torch.bfloat16, 30)]
    dst = [c.cuda() for c in make_caches(48, torch.bfloat16, 31)]
    untouched = [c.clone() for c in dst]
    src_ids, dst_ids = gpu_blocks()

    async def transfer() -> None:
        recv = Receiver(transport, dst)
        await recv.start()
        chunk_bytes = 5 * layout_of(src).block_bytes  # split into runs too
        sender = GrpcKVSender(chunk_bytes=chunk_bytes) if transport == "grpc" else UcxKVSender(chunk_bytes=chunk_bytes)
        try:
            session = sender.open(recv.ticket("gpu", dst_ids), layout_of(src))
            await asyncio.to_thread(submit_all, session, src, src_ids)
            await session.finish(timeout_s=30)
            await recv.receiver.wait_complete("gpu", timeout_s=30)
        finally:
            await sender.close()
            await recv.stop()

    asyncio.run(transfer())
    check_landed_bit_exact(src, src_ids, dst, dst_ids, untouched)


def gpu_blocks() -> tuple[list[int], list[int]]:
    """The source and destination blocks of the GPU round trips (of 40 and 48)."""
    rng = random.Random(32)
    return rng.sample(range(40), 13), rng.sample(range(48), 13)


def check_landed_bit_exact(src, src_ids, dst, dst_ids, untouched) -> None:
    others = sorted(set(range(dst[0].shape[0])) - set(dst_ids))
    for layer in range(NUM_LAYERS):
        assert torch.equal(dst[layer][dst_ids].view(torch.int16).cpu(), src[layer][src_ids].view(torch.int16).cpu())
        assert torch.equal(dst[layer][others], untouched[layer][others])


async def receive_on_cuda_1() -> None:
    """The receiving process of the two-GPU NCCL test: prints its address, then checks
    what landed in its caches on cuda:1."""
    dst = [c.to("cuda:1") for c in make_caches(48, torch.bfloat16, 31)]
    untouched = [c.clone() for c in dst]
    src_ids, dst_ids = gpu_blocks()
    recv = Receiver("nccl", dst)
    recv.ticket("gpu", dst_ids)
    print(recv.receiver.address, flush=True)
    await recv.receiver.wait_complete("gpu", timeout_s=120)
    check_landed_bit_exact(make_caches(40, torch.bfloat16, 30), src_ids, dst, dst_ids, untouched)
    await recv.stop()


_RECEIVER_ON_CUDA_1 = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from test_kvtransfer import receive_on_cuda_1
asyncio.run(receive_on_cuda_1())
"""


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_nccl_round_trip_between_two_gpus_bit_exact():
    """NCCL refuses two ranks on one GPU: the sender (this process) packs on cuda:0, the
    receiver (another process) lands on cuda:1, in runs of 5 blocks."""
    proc = subprocess.Popen([sys.executable, "-c", _RECEIVER_ON_CUDA_1, str(Path(__file__).parent)],
                            stdout=subprocess.PIPE, text=True)
    try:
        address = proc.stdout.readline().strip()
        src = [c.to("cuda:0") for c in make_caches(40, torch.bfloat16, 30)]
        src_ids, dst_ids = gpu_blocks()
        layout = layout_of(src)

        async def transfer() -> None:
            sender = NcclKVSender(chunk_bytes=5 * layout.block_bytes)
            try:
                session = sender.open(TransferTicket("gpu", "nccl", address, tuple(dst_ids), layout, 200), layout)
                await asyncio.to_thread(submit_all, session, src, src_ids)
                await session.finish(timeout_s=120)
            finally:
                await sender.close()

        asyncio.run(transfer())
        assert proc.wait(timeout=60) == 0  # it checked what landed
    finally:
        proc.kill()
        proc.wait()


_LONE_NCCL_RECEIVER = """
import asyncio, sys, time, torch, torch.distributed as dist
from baton.kvtransfer.errors import TransferError
from baton.kvtransfer.pair import RECEIVER, PairGroup

async def main():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    started = time.perf_counter()
    try:
        await PairGroup.join(store, "pair-0", RECEIVER, "nccl", torch.device("cuda:0"), 5.0)
    except TransferError as e:
        print(f"refused after {time.perf_counter() - started:.1f} s: {e}", flush=True)

asyncio.run(main())
time.sleep(2)    # an aborted communicator's watchdog must not take the process down meanwhile
print("cuda after the abort:", (torch.ones(4, device="cuda") * 2).sum().item(), flush=True)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_lone_nccl_rank_gives_up_within_its_deadline_and_its_process_lives_on():
    """What one GPU can check of NCCL's pair group: a receiver whose sender never joins gives
    the group up after its 5 s deadline (a non-blocking communicator, aborted), and neither
    the abort nor torch's NCCL watchdog ends the worker's process."""
    out = subprocess.run([sys.executable, "-c", _LONE_NCCL_RECEIVER], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    refused = re.search(r"refused after ([\d.]+) s", out.stdout)
    assert refused is not None and 4.5 <= float(refused.group(1)) < 30, out.stdout
    assert "cuda after the abort: 8.0" in out.stdout, out.stdout
