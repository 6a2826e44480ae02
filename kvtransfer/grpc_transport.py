"""The gRPC/TCP stream KV transport: works everywhere, no special hardware.

Sender: one client-streaming ``KVTransfer.Push`` call per request over a cached
channel per address, opened as soon as the session is (connection setup overlaps
the first layers). ``submit_layer`` runs on the engine's compute thread: it
gathers the request's blocks of that layer into one packed buffer right away and
hands it to the event loop with ``loop.call_soon_threadsafe`` into the session's
``asyncio.Queue``. The stream task first sends a handshake chunk (the layout, no
data) and waits for the receiver to accept it, then drains the queue: one
``KVChunk`` per (layer, run of at most ``chunk_bytes`` of whole blocks).
``finish`` sends the final chunk (no data, ``last``) and waits for the
``PushReply``. Receiver: see ``grpc_receiver``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import torch

from baton.kernels import ops
from baton.kvtransfer.base import KVSender, TransferSession, TransferStats, TransferTicket, register_transport
from baton.kvtransfer.errors import TransferError
from baton.kvtransfer.grpc_receiver import (
    ACCEPTED_KEY, ACCEPTED_VALUE, GrpcKVReceiver, KVTransferServicer, add_to_server,
)
from baton.kvtransfer.layout import KVLayout, check_layout
from baton.protos import MAX_MESSAGE_BYTES, kvtransfer_pb2, kvtransfer_pb2_grpc

__all__ = [
    "DEFAULT_CHUNK_BYTES", "GrpcKVReceiver", "GrpcKVSender",
    "GrpcTransferSession", "KVTransferServicer", "add_to_server", "grpc_options",
]

DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
DEFAULT_STREAM_TIMEOUT_S = 120.0
_END = object()          # queued by finish(): send the final chunk
_CALL_ENDED = object()   # queued when the call terminates: a failure surfaces at once


def grpc_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel / server options for KV traffic: message size limits both ways."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


@dataclass
class _Packed:
    """One layer's run of blocks, packed. ``data`` is ready on CPU; for a CUDA cache
    ``host`` is a pinned copy that is complete once ``ready`` has fired."""

    layer: int
    first_block: int
    num_blocks: int
    data: bytes | None = None
    host: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None

    def payload(self) -> bytes:
        if self.data is None:
            self.ready.synchronize()
            self.data = _tensor_bytes(self.host)
        return self.data


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


class GrpcTransferSession(TransferSession):
    """The sending half of one request's transfer over one ``Push`` stream."""

    def __init__(self, *, ticket: TransferTicket, channel: grpc.aio.Channel,
                 blocks_per_message: int, stream_timeout_s: float) -> None:
        self._ticket = ticket
        self._layout = ticket.layout
        self._blocks_per_message = blocks_per_message
        self._submitted = torch.zeros(ticket.layout.num_layers, len(ticket.block_ids), dtype=torch.bool)
        self._lock = threading.Lock()
        self._stopped = False
        self._call: grpc.aio.StreamUnaryCall | None = None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[_Packed | object] = asyncio.Queue()
        self._stub = kvtransfer_pb2_grpc.KVTransferStub(channel)
        self._task = self._loop.create_task(self._run(stream_timeout_s))
        self._task.add_done_callback(self._on_done)

    def submit_layer(self, layer: int, kv_cache: torch.Tensor, src_block_ids: Sequence[int], first: int = 0) -> None:
        if self._stopped:
            return
        num_blocks, count = len(self._ticket.block_ids), len(src_block_ids)
        if not 0 <= layer < self._layout.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self._layout.num_layers})")
        if count == 0 or not 0 <= first <= first + count <= num_blocks:
            raise ValueError(f"{count} blocks at {first} must be a non-empty run within the ticket's {num_blocks}")
        self._layout.check_cache(kv_cache)
        src = torch.tensor(src_block_ids, dtype=torch.int64).to(kv_cache.device, non_blocking=True)
        packed = ops.gather_blocks(kv_cache, src)
        items = [self._pack(layer, first + i, packed[i:i + self._blocks_per_message])
                 for i in range(0, count, self._blocks_per_message)]
        with self._lock:
            self._submitted[layer, first:first + count] = True
        try:
            for item in items:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nothing can be sent any more
            self._stopped = True

    def _pack(self, layer: int, first_block: int, packed: torch.Tensor) -> _Packed:
        item = _Packed(layer=layer, first_block=first_block, num_blocks=packed.shape[0])
        if packed.is_cuda:
            item.host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            item.host.copy_(packed, non_blocking=True)
            item.ready = torch.cuda.Event()
            item.ready.record()
        else:
            item.data = _tensor_bytes(packed)
        return item

    async def finish(self, timeout_s: float) -> TransferStats:
        if self._task.cancelled():
            raise TransferError(f"KV transfer of request {self._ticket.request_id!r} was aborted")
        with self._lock:
            missing = int((~self._submitted).sum())
        if missing and not self._task.done():
            await self.abort()
            raise TransferError(f"KV transfer of request {self._ticket.request_id!r}: "
                                f"{missing} layer-blocks were never submitted")
        self._stopped = True
        # call_soon keeps _END behind every chunk already handed over by submit_layer.
        self._loop.call_soon(self._queue.put_nowait, _END)
        try:
            return await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            await self.abort()
            raise TransferError(f"KV transfer of request {self._ticket.request_id!r} to {self._ticket.address} "
                                f"was not acknowledged within {timeout_s:g} s") from None

    async def abort(self) -> None:
        self._stopped = True
        if self._call is not None:
            self._call.cancel()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def _on_done(self, task: asyncio.Task) -> None:
        self._stopped = True
        if not task.cancelled():
            task.exception()  # retrieved here; finish() re-raises it

    async def _run(self, stream_timeout_s: float) -> TransferStats:
        call = self._call = self._stub.Push(timeout=stream_timeout_s)
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
            while (item := await self._queue.get()) is not _END:
                if item is _CALL_ENDED:
                    await call  # raises the status that ended it
                    raise TransferError(f"KV transfer of request {self._ticket.request_id!r}: "
                                        "the receiver closed the stream early")
                # A CUDA copy is usually done by now: wait in a thread only when it is not.
                ready = item.data is not None or item.ready.query()
                data = item.payload() if ready else await asyncio.to_thread(item.payload)
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
        return TransferError(f"KV transfer of request {self._ticket.request_id!r} to {self._ticket.address} "
                             f"failed: {code.name}: {details}")


class GrpcKVSender(KVSender):
    """Opens ``Push`` streams, one cached channel per receiver address."""

    transport = "grpc"

    def __init__(self, *, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 stream_timeout_s: float = DEFAULT_STREAM_TIMEOUT_S) -> None:
        if not 0 < chunk_bytes < max_message_bytes:
            raise ValueError(f"chunk_bytes must be in (0, max_message_bytes={max_message_bytes}), got {chunk_bytes}")
        self._max_message_bytes = max_message_bytes
        self._chunk_bytes = chunk_bytes
        self._stream_timeout_s = stream_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def open(self, ticket: TransferTicket, local_layout: KVLayout) -> GrpcTransferSession:
        if ticket.transport != self.transport:
            raise TransferError(f"ticket asks for transport {ticket.transport!r}, this sender is {self.transport!r}")
        check_layout(local_layout, ticket.layout)
        if not ticket.block_ids:
            raise TransferError("ticket has no destination blocks")
        blocks_per_message = self._chunk_bytes // local_layout.block_bytes
        if blocks_per_message < 1:
            raise TransferError(f"one KV block is {local_layout.block_bytes} bytes, over the "
                                f"{self._chunk_bytes}-byte chunk limit")
        return GrpcTransferSession(ticket=ticket, channel=self._channel(ticket.address),
                                   blocks_per_message=blocks_per_message, stream_timeout_s=self._stream_timeout_s)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=grpc_options(self._max_message_bytes))
        return self._channels[address]

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


register_transport("grpc", GrpcKVSender, GrpcKVReceiver)
