"""The UCX KV transport (the ``ucxx`` package): TCP anywhere; RDMA, shared memory
or CUDA IPC (NVLink) where the hardware has them, and CUDA buffers sent without
a host copy.

Sender: each request takes an idle UCX endpoint to its receiver from the
sender's pool, or opens one, as soon as the session is (connection setup
overlaps the first layers); an endpoint whose transfer completed goes back to
the pool, any other is closed. ``submit_layer``
(``session.QueuedSession``) queues packed runs; on a CUDA cache they stay on the
device. The stream task sends the handshake, waits for the receiver's
acceptance, then sends each run as a header frame and its data, and finally the
last frame, and waits for the receiver's answer. A receive for that answer is
posted right after the acceptance, so a refusal midway surfaces at once. The
protocol and the receiver are in ``ucx_receiver``.

Waiting on the receiver (its acceptance; the sends, then its answer, once the last
layer is queued), the sender gives the transfer up (UNAVAILABLE) when none of those
operations completes for ``keepalive_s``: a frozen process, a dead host or a cut
network can leave the connection open, and UCX would wait on it until the stream's
deadline. One run must then cross the link within ``keepalive_s`` (64 MB in 10 s at
the defaults: links slower than 6.4 MB/s need a smaller ``chunk_bytes``).
"""

from __future__ import annotations

import asyncio
import time

import torch

from baton.kvtransfer.base import KVSender, TransferStats, TransferTicket, register_transport
from baton.kvtransfer.errors import TransferError
from baton.kvtransfer.landing import Refused
from baton.kvtransfer.layout import KVLayout
from baton.kvtransfer.session import (
    DEFAULT_KEEPALIVE_S, DEFAULT_STREAM_TIMEOUT_S, END, QueuedSession, blocks_per_message, split_address,
)
from baton.kvtransfer.ucx_receiver import UCX_ERRORS, UcxKVReceiver, buffer_of, post, recv_frame, send_frame, ucxx
from baton.protos import kvtransfer_pb2

__all__ = ["DEFAULT_CHUNK_BYTES", "UcxKVReceiver", "UcxKVSender", "UcxTransferSession"]

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT_S = 5.0


def _raise_failed(operations: list[asyncio.Future]) -> None:
    """Raise the error of an operation that already failed."""
    for op in operations:
        if op.done() and not op.cancelled() and op.exception() is not None:
            raise op.exception()


class UcxTransferSession(QueuedSession):
    """The sending half of one request's transfer over one UCX endpoint."""

    def __init__(self, *, ticket: TransferTicket, pool: EndpointPool, blocks_per_message: int,
                 stream_timeout_s: float, keepalive_s: float) -> None:
        self._pool = pool
        self._stream_timeout_s = stream_timeout_s
        self._keepalive_s = keepalive_s
        self._ep = None
        super().__init__(ticket, blocks_per_message)

    def _cancel_call(self) -> None:
        if self._ep is not None:
            self._ep.abort()  # fails a send in flight before its buffer can be freed

    async def _run(self) -> TransferStats:
        rid = self._ticket.request_id
        answer: asyncio.Future | None = None
        sends: list[asyncio.Future] = []  # sends in flight, each holding its buffer
        try:
            async with asyncio.timeout(self._stream_timeout_s):
                ep = await self._handshake()
                answer = self._answered_by(asyncio.ensure_future(recv_frame(ep, kvtransfer_pb2.KVAck)))
                sent, started = 0, 0.0
                while (item := await self._next(answer)) is not END:
                    await item.wait_ready()
                    started = started or time.perf_counter()
                    header = kvtransfer_pb2.KVChunk(request_id=rid, layer=item.layer, first_block=item.first_block,
                                                    num_blocks=item.num_blocks)
                    # Not awaited one by one: UCX sends them in the order they start.
                    post(sends, send_frame(ep, header))
                    post(sends, ep.send(buffer_of(item.data.view(-1).view(torch.uint8))))
                    sent += item.data.numel() * item.data.element_size()
                    _raise_failed(sends)
                post(sends, send_frame(ep, kvtransfer_pb2.KVChunk(request_id=rid, last=True)))
                await self._from_receiver([*sends, answer])
                self._check(answer.result())
                self._pool.put(self._ticket.address, ep)
                self._ep = None
                return TransferStats(bytes=sent, seconds=time.perf_counter() - started)
        except UCX_ERRORS as e:
            raise await self._failure(answer, e) from e
        except Refused as e:  # the receiver broke the framing
            raise self._error(e.code, e.message) from None
        except TimeoutError:
            raise self._error("DEADLINE_EXCEEDED", f"no answer within {self._stream_timeout_s:g} s") from None
        finally:
            if answer is not None:
                answer.cancel()
            if self._ep is not None:
                self._ep.abort()  # cancels the sends in flight; only then may their buffers be freed
            for send in sends:
                send.cancel()
            await asyncio.gather(*sends, return_exceptions=True)

    async def _handshake(self):
        """An endpoint whose receiver accepted this request: a pooled one, or a new one."""
        ep = self._pool.take(self._ticket.address)
        if ep is not None:
            try:
                return await self._accepted(ep)
            except UCX_ERRORS:
                ep.abort()  # closed while idle (its receiver restarted, say)
        try:
            ep = await self._pool.connect(self._ticket.address)
        except (*UCX_ERRORS, TimeoutError, OSError) as e:
            raise self._error("UNAVAILABLE", f"could not connect ({type(e).__name__}: {e})") from e
        return await self._accepted(ep)

    async def _accepted(self, ep):
        self._ep = ep
        await send_frame(ep, kvtransfer_pb2.KVChunk(request_id=self._ticket.request_id, layout=self._layout.to_proto()))
        ack = asyncio.ensure_future(recv_frame(ep, kvtransfer_pb2.KVAck))
        try:
            await self._from_receiver([ack])
        finally:
            ack.cancel()
        self._check(ack.result())
        return ep

    async def _from_receiver(self, operations: list[asyncio.Future]) -> None:
        """Wait for ``operations`` on the endpoint while one of them completes every ``keepalive_s``
        (see the module docs); raise the first error among those done."""
        pending = set(operations)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=self._keepalive_s, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise self._error("UNAVAILABLE", f"the receiver took and answered nothing for {self._keepalive_s:g} s")
            for operation in done:
                operation.result()

    async def _failure(self, answer: asyncio.Future | None, error: Exception) -> TransferError:
        """The receiver's refusal when one explains the broken endpoint, else the UCX error."""
        if answer is not None:
            try:
                async with asyncio.timeout(1.0):
                    self._check(await asyncio.shield(answer))
            except TransferError as refusal:
                return refusal
            except (*UCX_ERRORS, TimeoutError):
                pass
        return self._error("ABORTED", f"{type(error).__name__}: {error}")


class EndpointPool:
    """Idle endpoints by receiver address (at most ``max_idle`` each), and new ones."""

    def __init__(self, connect_timeout_s: float, max_idle: int) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._max_idle = max_idle
        self._idle: dict[str, list] = {}

    def take(self, address: str):
        idle = self._idle.get(address, [])
        while idle:
            ep = idle.pop()
            if not ep.closed:
                return ep
        return None

    def put(self, address: str, ep) -> None:
        idle = self._idle.setdefault(address, [])
        if len(idle) < self._max_idle:
            idle.append(ep)
        else:
            ep.abort()

    async def connect(self, address: str):
        host, port = split_address(address)
        return await ucxx.create_endpoint(host, port, connect_timeout=self._connect_timeout_s)

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for ep in (ep for eps in idle.values() for ep in eps):
            ep.abort()


class UcxKVSender(KVSender):
    """Sends each transfer over one UCX endpoint (kept for the next transfer to the
    same receiver), in runs of at most ``chunk_bytes``."""

    transport = "ucx"

    def __init__(self, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 stream_timeout_s: float = DEFAULT_STREAM_TIMEOUT_S,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, max_idle_endpoints: int = 8,
                 keepalive_s: float = DEFAULT_KEEPALIVE_S) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self._chunk_bytes = chunk_bytes
        self._stream_timeout_s = stream_timeout_s
        self._keepalive_s = keepalive_s
        self._pool = EndpointPool(connect_timeout_s, max_idle_endpoints)

    def open(self, ticket: TransferTicket, local_layout: KVLayout) -> UcxTransferSession:
        count = blocks_per_message(self.transport, ticket, local_layout, self._chunk_bytes)
        split_address(ticket.address)
        return UcxTransferSession(ticket=ticket, pool=self._pool, blocks_per_message=count,
                                  stream_timeout_s=self._stream_timeout_s, keepalive_s=self._keepalive_s)

    async def close(self) -> None:
        self._pool.close()


register_transport("ucx", UcxKVSender, UcxKVReceiver)
