"""The gRPC/TCP stream KV transport: works everywhere, no special hardware.

Sender: one client-streaming ``KVTransfer.Push`` call per request over a cached
channel per address, opened as soon as the session is (connection setup overlaps
the first layers). ``submit_layer`` (``session.QueuedSession``) queues packed
runs, staged in pinned host memory for a CUDA cache. The stream task first sends
a handshake chunk (the layout, no data) and waits for the receiver to accept it,
then drains the queue: one ``KVChunk`` per (layer, run of at most
``chunk_bytes`` of whole blocks).
``finish`` sends the final chunk (no data, ``last``) and waits for the
``PushReply``. Receiver: see ``grpc_receiver``.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import torch

from baton.kvtransfer.base import KVSender, TransferStats, TransferTicket, register_transport
from baton.kvtransfer.errors import TransferError
from baton.kvtransfer.grpc_receiver import (
    ACCEPTED_KEY, ACCEPTED_VALUE, GrpcKVReceiver, KVTransferServicer, add_to_server,
)
from baton.kvtransfer.layout import KVLayout
from baton.kvtransfer.session import DEFAULT_KEEPALIVE_S, DEFAULT_STREAM_TIMEOUT_S, END, QueuedSession, blocks_per_message
from baton.protos import MAX_MESSAGE_BYTES, RECONNECT_OPTIONS, keepalive_options, kvtransfer_pb2, kvtransfer_pb2_grpc

__all__ = [
    "DEFAULT_CHUNK_BYTES", "GrpcKVReceiver", "GrpcKVSender",
    "GrpcTransferSession", "KVTransferServicer", "add_to_server", "grpc_options",
]

DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
_CALL_ENDED = object()   # queued when the call terminates: a failure surfaces at once


def grpc_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel / server options for KV traffic: message size limits both ways."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


class GrpcTransferSession(QueuedSession):
    """The sending half of one request's transfer over one ``Push`` stream."""

    def __init__(self, *, ticket: TransferTicket, channel: grpc.aio.Channel,
                 blocks_per_message: int, stream_timeout_s: float) -> None:
        self._stub = kvtransfer_pb2_grpc.KVTransferStub(channel)
        self._stream_timeout_s = stream_timeout_s
        self._call: grpc.aio.StreamUnaryCall | None = None
        super().__init__(ticket, blocks_per_message)

    def _stage(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if not packed.is_cuda:
            return packed, None
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    def _cancel_call(self) -> None:
        if self._call is not None:
            self._call.cancel()

    async def _run(self) -> TransferStats:
        call = self._call = self._stub.Push(timeout=self._stream_timeout_s)
        call.add_done_callback(lambda _: self._queue.put_nowait(_CALL_ENDED))
        sent, started = 0, 0.0
        try:
            # The handshake: the layout, no data. The receiver binds the stream to the
            # request now, so a refusal or an abort is seen by either end at once.
            await call.write(kvtransfer_pb2.KVChunk(request_id=self._ticket.request_id,
                                                    layout=self._layout.to_proto()))
            # Data waits for the receiver's acceptance (its initial metadata): a refused
            # handshake then ends the call before any write can race with it, which would
            # replace the receiver's status with INTERNAL (grpc/grpc#36066).
            if (ACCEPTED_KEY, ACCEPTED_VALUE) not in tuple(await call.initial_metadata()):
                await call  # refused: raises the receiver's status
                raise TransferError(f"KV transfer of request {self._ticket.request_id!r}: "
                                    "the receiver ended the stream without accepting it")
            while (item := await self._queue.get()) is not END:
                if item is _CALL_ENDED:
                    await call  # raises the status that ended it
                    raise TransferError(f"KV transfer of request {self._ticket.request_id!r}: "
                                        "the receiver closed the stream early")
                await item.wait_ready()
                data = item.data.contiguous().view(torch.uint8).numpy().tobytes()
                chunk = kvtransfer_pb2.KVChunk(request_id=self._ticket.request_id, layer=item.layer,
                                               first_block=item.first_block, num_blocks=item.num_blocks, data=data)
                started = started or time.perf_counter()
                await call.write(chunk)
                sent += len(data)
            await call.write(kvtransfer_pb2.KVChunk(request_id=self._ticket.request_id, last=True))
            await call.done_writing()
            await call
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            raise await self._failure(call, e) from e
        return TransferStats(bytes=sent, seconds=time.perf_counter() - started)

    async def _failure(self, call: grpc.aio.StreamUnaryCall, error: Exception) -> TransferError:
        if isinstance(error, grpc.aio.AioRpcError):
            code, details = error.code(), error.details()
        else:  # a write after the call ended: the call's own status says why
            code, details = await call.code(), await call.details()
        if code == grpc.StatusCode.INTERNAL and details == "Internal error from Core":
            details = "the receiver ended the stream while data was in flight (grpc/grpc#36066 hides its status)"
        return self._error(code.name, details)


class GrpcKVSender(KVSender):
    """Opens ``Push`` streams, one cached channel per receiver address."""

    transport = "grpc"

    def __init__(self, *, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 stream_timeout_s: float = DEFAULT_STREAM_TIMEOUT_S,
                 keepalive_s: float = DEFAULT_KEEPALIVE_S) -> None:
        if not 0 < chunk_bytes < max_message_bytes:
            raise ValueError(f"chunk_bytes must be in (0, max_message_bytes={max_message_bytes}), got {chunk_bytes}")
        self._max_message_bytes = max_message_bytes
        self._chunk_bytes = chunk_bytes
        self._stream_timeout_s = stream_timeout_s
        self._keepalive_s = keepalive_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def open(self, ticket: TransferTicket, local_layout: KVLayout) -> GrpcTransferSession:
        count = blocks_per_message(self.transport, ticket, local_layout, self._chunk_bytes)
        return GrpcTransferSession(ticket=ticket, channel=self._channel(ticket.address),
                                   blocks_per_message=count, stream_timeout_s=self._stream_timeout_s)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            options = [*grpc_options(self._max_message_bytes), *keepalive_options(self._keepalive_s, self._keepalive_s),
                       *RECONNECT_OPTIONS]
            self._channels[address] = grpc.aio.insecure_channel(address, options=options)
        return self._channels[address]

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


register_transport("grpc", GrpcKVSender, GrpcKVReceiver)
