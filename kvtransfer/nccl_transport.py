"""The NCCL KV transport (torch.distributed): KV moves GPU to GPU over a process
group of two ranks, the receiver and one sender process (``pair``), with the
control messages on a gRPC stream beside it; between CPU caches the same
protocol runs over gloo.

Sender: one ``Link`` per receiver carries all of this process's transfers to it,
several at once: the control stream, opened with the first session, and the
pair's group, set up on the device of that session's first run, kept for the
next transfers; a link that broke is dropped, and the next session opens a new one.
``submit_layer`` (``session.QueuedSession``) queues packed runs, on the device
for a CUDA cache. A session's stream task hands its link the handshake, each
run and the final chunk, then waits for the receiver's answer to its request.
The link writes them from one queue, each run's header on the stream and its
data over the group, so the data of the pair's requests goes in the order of
the headers. The protocol and the receiver are in ``nccl_receiver``.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import torch

from baton.kvtransfer.base import KVSender, TransferStats, TransferTicket, register_transport
from baton.kvtransfer.errors import TransferError
from baton.kvtransfer.grpc_transport import grpc_options
from baton.kvtransfer.landing import Refused
from baton.kvtransfer.layout import KVLayout
from baton.kvtransfer.nccl_receiver import CONTROL_MESSAGE_BYTES, NcclKVReceiver
from baton.kvtransfer.pair import SENDER, PairGroup
from baton.kvtransfer.session import (
    DEFAULT_KEEPALIVE_S, DEFAULT_STREAM_TIMEOUT_S, END, Packed, QueuedSession, blocks_per_message, split_address,
)
from baton.protos import MAX_MESSAGE_BYTES, RECONNECT_OPTIONS, keepalive_options, kvtransfer_pb2, kvtransfer_pb2_grpc

__all__ = ["DEFAULT_CHUNK_BYTES", "Link", "NcclKVReceiver", "NcclKVSender", "NcclTransferSession"]

DEFAULT_CHUNK_BYTES = MAX_MESSAGE_BYTES  # what a receiver takes by default
DEFAULT_CONNECT_TIMEOUT_S = 60.0         # the stream, and the group's setup (NCCL's takes seconds)


class Link:
    """This process's half of a pair with the receiver at ``address`` (over ``channel``)."""

    def __init__(self, address: str, channel: grpc.aio.Channel, *, connect_timeout_s: float, timeout_s: float) -> None:
        self.address = address
        self._call = kvtransfer_pb2_grpc.KVPairStub(channel).Open()
        self._group: PairGroup | None = None
        self._answers: dict[str, asyncio.Future[kvtransfer_pb2.KVAck]] = {}
        self._outbox: asyncio.Queue[tuple[str, kvtransfer_pb2.PairRequest, torch.Tensor | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self.failure: kvtransfer_pb2.KVAck | None = None
        self._timeouts = connect_timeout_s, timeout_s
        self._connected: asyncio.Task | None = None

    async def connected(self, device: torch.device) -> None:
        """Once the pair's group is up: the first call sets it up on ``device``. Raises
        ``Refused`` when it could not be set up."""
        if self._connected is None:
            self._connected = asyncio.get_running_loop().create_task(self._connect(device, *self._timeouts))
            self._connected.add_done_callback(self._on_task_done)
        await asyncio.shield(self._connected)

    async def _connect(self, device: torch.device, connect_timeout_s: float, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(connect_timeout_s):
                reply = await self._call.read()
                if reply is grpc.aio.EOF or not reply.HasField("group"):
                    raise Refused("UNAVAILABLE", "the receiver did not name the pair's group")
                host, _ = split_address(self.address)
                self._group = await PairGroup.join((host, reply.group.store_port), reply.group.prefix, SENDER,
                                                   reply.group.backend, device, timeout_s)
        except grpc.aio.AioRpcError as e:
            raise Refused(e.code().name, e.details()) from None
        except TransferError as e:
            raise Refused("UNAVAILABLE", str(e)) from None
        except TimeoutError:
            raise Refused("DEADLINE_EXCEEDED", f"the pair was not set up within {connect_timeout_s:g} s") from None
        for work in (self._read(), self._write()):
            self._tasks.append(asyncio.get_running_loop().create_task(work))
            self._tasks[-1].add_done_callback(self._on_task_done)

    def open(self, request_id: str, layout: KVLayout) -> asyncio.Future[kvtransfer_pb2.KVAck]:
        """Send a request's handshake; the future is the receiver's answer to it."""
        answer = asyncio.get_running_loop().create_future()
        if self.failure is not None:
            answer.set_result(self.failure)
            return answer
        self._answers[request_id] = answer
        self._post(request_id, kvtransfer_pb2.KVChunk(request_id=request_id, layout=layout.to_proto()))
        return answer

    def send_run(self, request_id: str, item: Packed) -> None:
        """Send a run: its header on the stream, its data over the group."""
        if item.data.device != self._group.device:
            raise Refused("FAILED_PRECONDITION", f"KV on {item.data.device} cannot go over the pair's group "
                                                 f"on {self._group.device}")
        data = item.data.view(-1).view(torch.uint8)
        self._post(request_id, kvtransfer_pb2.KVChunk(
            request_id=request_id, layer=item.layer, first_block=item.first_block, num_blocks=item.num_blocks,
            data_bytes=data.numel()), data)

    def finish(self, request_id: str) -> None:
        self._post(request_id, kvtransfer_pb2.KVChunk(request_id=request_id, last=True))

    def abort(self, request_id: str) -> None:
        """Give a request up (nothing more of it is sent); a request answered already is left alone."""
        if self._answers.pop(request_id, None) is not None and self.failure is None:
            self._outbox.put_nowait((request_id, kvtransfer_pb2.PairRequest(abort=request_id), None))

    def _post(self, request_id: str, chunk: kvtransfer_pb2.KVChunk, data: torch.Tensor | None = None) -> None:
        self._outbox.put_nowait((request_id, kvtransfer_pb2.PairRequest(chunk=chunk), data))

    async def _write(self) -> None:
        """Write the outbox in order: a header, then post its data over the group at once."""
        while True:
            request_id, request, data = await self._outbox.get()
            if data is not None and request_id not in self._answers:
                continue  # its session gave up: neither the header nor the data goes
            try:
                await self._call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the call ended: reading it says why
            if data is not None:
                self._group.send(data).add_done_callback(self._on_sent)

    async def _read(self) -> None:
        """Hand each answer to its request's session."""
        try:
            while (reply := await self._call.read()) is not grpc.aio.EOF:
                if reply.HasField("broken"):
                    raise Refused(reply.broken.code, reply.broken.error)
                answer = self._answers.pop(reply.ack.request_id, None)
                if answer is not None and not answer.done():
                    answer.set_result(reply.ack)
        except grpc.aio.AioRpcError as e:
            raise Refused(e.code().name, e.details()) from None
        raise Refused("UNAVAILABLE", "the receiver closed the stream")

    def _on_sent(self, sent: asyncio.Future) -> None:
        if not sent.cancelled() and sent.exception() is not None:
            self._fail("UNAVAILABLE", f"sending over the pair's group failed: {sent.exception()}")

    def _on_task_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        if isinstance(error, Refused):
            self._fail(error.code, error.message)
        else:
            self._fail("UNKNOWN", f"{type(error).__name__}: {error}")

    def _fail(self, code: str, message: str) -> None:
        """The link broke: every request on it fails with ``message``, and the group is given up."""
        if self.failure is not None:
            return
        self.failure = kvtransfer_pb2.KVAck(ok=False, code=code, error=message)
        answers, self._answers = self._answers, {}
        for answer in answers.values():
            if not answer.done():
                answer.set_result(self.failure)
        self._call.cancel()
        for task in self._tasks:
            task.cancel()
        if self._group is not None:
            self._group.abort()

    async def close(self) -> None:
        self._fail("CANCELLED", "the sender closed")
        tasks = [*self._tasks, *([self._connected] if self._connected is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class NcclTransferSession(QueuedSession):
    """The sending half of one request's transfer over its receiver's link."""

    def __init__(self, *, ticket: TransferTicket, link: Link, blocks_per_message: int,
                 stream_timeout_s: float) -> None:
        self._link = link
        self._stream_timeout_s = stream_timeout_s
        super().__init__(ticket, blocks_per_message)

    async def _run(self) -> TransferStats:
        rid, link = self._ticket.request_id, self._link
        try:
            async with asyncio.timeout(self._stream_timeout_s):
                # The first run (finish() queues END only after every layer-block) tells the
                # device of a pair that is still to be set up.
                item = await self._queue.get()
                await link.connected(item.data.device)
                answer = self._answered_by(link.open(rid, self._layout))
                sent, started = 0, 0.0
                while item is not END:
                    await item.wait_ready()
                    started = started or time.perf_counter()
                    link.send_run(rid, item)
                    sent += item.data.numel() * item.data.element_size()
                    item = await self._next(answer)
                link.finish(rid)
                self._check(await answer)
                return TransferStats(bytes=sent, seconds=time.perf_counter() - started)
        except Refused as e:
            raise self._error(e.code, e.message) from None
        except TimeoutError:
            raise self._error("DEADLINE_EXCEEDED", f"no answer within {self._stream_timeout_s:g} s") from None
        finally:
            link.abort(rid)


class NcclKVSender(KVSender):
    """Sends each transfer over its receiver's link, in runs of at most ``chunk_bytes``."""

    transport = "nccl"

    def __init__(self, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, stream_timeout_s: float = DEFAULT_STREAM_TIMEOUT_S,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, keepalive_s: float = DEFAULT_KEEPALIVE_S) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self._chunk_bytes = chunk_bytes
        self._stream_timeout_s = stream_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._links: dict[str, Link] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def open(self, ticket: TransferTicket, local_layout: KVLayout) -> NcclTransferSession:
        count = blocks_per_message(self.transport, ticket, local_layout, self._chunk_bytes)
        split_address(ticket.address)
        return NcclTransferSession(ticket=ticket, link=self._link(ticket.address), blocks_per_message=count,
                                   stream_timeout_s=self._stream_timeout_s)

    def _link(self, address: str) -> Link:
        link = self._links.get(address)
        if link is None or link.failure is not None:
            if address not in self._channels:
                options = [*grpc_options(CONTROL_MESSAGE_BYTES), *keepalive_options(self._keepalive_s, self._keepalive_s),
                           *RECONNECT_OPTIONS]
                self._channels[address] = grpc.aio.insecure_channel(address, options=options)
            link = self._links[address] = Link(address, self._channels[address],
                                               connect_timeout_s=self._connect_timeout_s,
                                               timeout_s=self._stream_timeout_s)
        return link

    async def close(self) -> None:
        links, self._links = list(self._links.values()), {}
        channels, self._channels = list(self._channels.values()), {}
        for link in links:
            await link.close()
        for channel in channels:
            await channel.close()


register_transport("nccl", NcclKVSender, NcclKVReceiver)
