"""The receiving half of the NCCL KV transport, and the protocol both halves share.

A sender process opens one ``KVPair.Open`` control stream (gRPC, to the
receiver's own server at the ticket's address) per receiver; it carries all of
that process's transfers to this receiver, several at once. The receiver's first
reply names the pair's process group (``pair.PairGroup``: NCCL between CUDA
caches, gloo between CPU ones), which both ends then join through the
receiver's ``TCPStore``. Then, in order on the stream, with the data over the group:

    sender                                        receiver
    KVChunk(request_id, layout)              ->   binds the request, checks the layout
    KVChunk(request_id, layer, first, n,     ->   posts a receive of data_bytes on the
            data_bytes)                           cache's device; lands the run once
    group: n blocks, packed                  ->   it is filled
    ...
    KVChunk(request_id, last)                ->   completes the request
                                             <-   KVAck(request_id, ok, bytes) or a refusal
    abort(request_id)                        ->   (the sender gave the request up)

The receiver answers each request once: at its end, or at a refusal or
cancellation. The data announced by a header is received in the order of the
headers, also when its request was refused or cancelled meanwhile (it is then
dropped), so one request's failure leaves the pair's other requests alone.
What breaks the pair -- a header announcing more than ``max_message_bytes``, a
receive that fails or misses its deadline, the sender going away -- fails every
request on it, ends the stream with a status saying why and gives the group up;
the sender's next transfer opens a new pair. The bookkeeping is
``landing.LandingReceiver``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
from dataclasses import dataclass, field

import grpc
import torch
import torch.distributed as dist

from baton.kvtransfer.errors import TransferError
from baton.kvtransfer.grpc_transport import grpc_options
from baton.kvtransfer.landing import Incoming, LandingReceiver, Refused
from baton.kvtransfer.layout import KVLayout
from baton.kvtransfer.pair import RECEIVER, PairGroup, backend_for
from baton.kvtransfer.session import DEFAULT_STREAM_TIMEOUT_S
from baton.protos import ACCEPT_PINGS, MAX_MESSAGE_BYTES, kvtransfer_pb2, kvtransfer_pb2_grpc

CONTROL_MESSAGE_BYTES = 64 * 1024  # the size limit of a message on the control stream
RUNS_IN_FLIGHT = 4                 # runs a pair receives at once (each in its own buffer)


@dataclass(eq=False)
class Pair:
    """The receiver's side of one sender process's control stream."""

    replies: asyncio.Queue = field(default_factory=asyncio.Queue)
    runs: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(RUNS_IN_FLIGHT))
    entries: dict[str, Incoming] = field(default_factory=dict)  # the requests it carries
    codes: dict[str, str] = field(default_factory=dict)         # the status code of a refused one

    def answer(self, request_id: str, code: str = "", error: str = "", bytes_received: int = 0) -> None:
        ack = kvtransfer_pb2.KVAck(request_id=request_id, ok=not code, code=code, error=error,
                                   bytes_received=bytes_received)
        self.replies.put_nowait(kvtransfer_pb2.PairReply(ack=ack))


class NcclKVReceiver(LandingReceiver):
    """Lands KV sent over pair process groups into ``kv_caches`` (one tensor per
    layer). Serves the control streams on ``host:port`` (port 0: any free one), and a
    ``TCPStore`` on another free port (torch's store listens on every interface);
    tickets carry ``advertise_host:port``. Create it on the event loop that will serve it."""

    transport = "nccl"

    def __init__(self, kv_caches: list[torch.Tensor], *, host: str = "127.0.0.1", advertise_host: str = "127.0.0.1",
                 port: int = 0,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, timeout_s: float = DEFAULT_STREAM_TIMEOUT_S) -> None:
        super().__init__(kv_caches)
        self._max_message_bytes = max_message_bytes
        self._timeout_s = timeout_s
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        self._pair_ids = itertools.count()
        self._server = grpc.aio.server(options=[*grpc_options(CONTROL_MESSAGE_BYTES), *ACCEPT_PINGS])
        kvtransfer_pb2_grpc.add_KVPairServicer_to_server(KVPairServicer(self), self._server)
        self.address = f"{advertise_host}:{self._server.add_insecure_port(f'{host}:{port}')}"
        self._started = asyncio.get_running_loop().create_task(self._server.start())

    async def close(self) -> None:
        await self._started
        await self._server.stop(grace=None)

    async def serve_pair(self, context: grpc.aio.ServicerContext) -> None:
        """One sender process's control stream, until it ends or the pair breaks."""
        backend, prefix = backend_for(self.device), f"pair{next(self._pair_ids)}/"
        await context.write(kvtransfer_pb2.PairReply(group=kvtransfer_pb2.PairGroup(
            backend=backend, store_port=self._store.port, prefix=prefix)))
        try:
            group = await PairGroup.join(self._store, prefix, RECEIVER, backend, self.device, self._timeout_s)
        except TransferError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        pair = Pair()
        tasks = [asyncio.get_running_loop().create_task(work) for work in
                 (self._read(pair, group, context), self._land(pair), self._reply(pair, context))]
        error: BaseException | None = None  # none: the sender went away (closed or cancelled the stream)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            error = done.pop().exception()
        finally:
            # Its requests fail before anything here awaits: a task slow to end, or this one
            # cancelled again meanwhile, must not leave them waiting out their deadlines.
            for task in tasks:
                task.cancel()
            group.abort()
            for entry in list(pair.entries.values()):
                self.fail(entry, error.message if isinstance(error, Refused) else
                          f"the sender of request {entry.request_id!r} went away" + (f" ({error})" if error else ""))
            await asyncio.gather(*tasks, return_exceptions=True)
        if isinstance(error, Refused):
            # Said in-band first: a sender still writing may read the stream's end as another status.
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                await context.write(kvtransfer_pb2.PairReply(broken=kvtransfer_pb2.KVAck(
                    ok=False, code=error.code, error=error.message)))
            await context.abort(grpc.StatusCode[error.code], error.message)
        if error is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the pair's {backend} group failed: {error}")

    async def _read(self, pair: Pair, group: PairGroup, context: grpc.aio.ServicerContext) -> None:
        """Handle the control stream's messages in order, posting each header's receive."""
        while (request := await context.read()) is not grpc.aio.EOF:
            if request.HasField("abort"):
                if (entry := pair.entries.get(request.abort)) is not None:
                    self.fail(entry, f"the sender of request {request.abort!r} went away (it gave the transfer up)")
                continue
            chunk = request.chunk
            if chunk.HasField("layout"):
                self._open(pair, chunk)
                continue
            data = received = None
            if not chunk.last:
                if not 0 < chunk.data_bytes <= self._max_message_bytes:
                    raise Refused("INVALID_ARGUMENT",
                                  f"a header of request {chunk.request_id!r} announces {chunk.data_bytes} bytes "
                                  f"of data, outside (0, {self._max_message_bytes}]")
                data = torch.empty(chunk.data_bytes, dtype=torch.uint8, device=self.device)
                received = group.recv(data)
            await pair.runs.put((pair.entries.get(chunk.request_id), chunk, data, received))

    def _open(self, pair: Pair, chunk: kvtransfer_pb2.KVChunk) -> None:
        """A request's handshake: bind it to this pair (it answers once, from its own task)."""
        try:
            entry = self.bind(chunk.request_id)
        except Refused as e:
            pair.answer(chunk.request_id, e.code, e.message)
            return
        # The request's own task stands for its stream: cancelling it (``cancel``, a
        # ``wait_complete`` timeout) answers the sender and leaves the pair's other requests alone.
        entry.stream = asyncio.get_running_loop().create_task(self._answer(pair, entry))
        pair.entries[entry.request_id] = entry
        try:
            self.handshake(entry, KVLayout.from_proto(chunk.layout))
        except Refused as e:
            self._refuse(pair, entry, e)

    async def _land(self, pair: Pair) -> None:
        """Land the runs in the order of their headers, each once its data arrived."""
        while True:
            entry, chunk, data, received = await pair.runs.get()
            if received is not None:
                await received
            if entry is None or entry.error is not None:
                continue  # its request was refused, cancelled or never opened: the data is dropped
            try:
                if chunk.last:
                    self.complete(entry)
                else:
                    self.check_run(entry, chunk.layer, chunk.first_block, chunk.num_blocks, chunk.data_bytes)
                    self.land(entry, chunk.layer, chunk.first_block, data)
            except Refused as e:
                self._refuse(pair, entry, e)

    async def _answer(self, pair: Pair, entry: Incoming) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # cancelled by fail(), which set the error first
            await entry.done.wait()
        pair.entries.pop(entry.request_id, None)
        code = pair.codes.pop(entry.request_id, "ABORTED")
        if entry.error is not None:
            pair.answer(entry.request_id, code, str(entry.error))
        else:
            pair.answer(entry.request_id, bytes_received=entry.bytes)

    def _refuse(self, pair: Pair, entry: Incoming, refusal: Refused) -> None:
        pair.codes[entry.request_id] = refusal.code
        self.fail(entry, refusal.message)

    @staticmethod
    async def _reply(pair: Pair, context: grpc.aio.ServicerContext) -> None:
        while True:
            await context.write(await pair.replies.get())


class KVPairServicer(kvtransfer_pb2_grpc.KVPairServicer):
    """``KVPair.Open``: one control stream per sender process."""

    def __init__(self, receiver: NcclKVReceiver) -> None:
        self._receiver = receiver

    async def Open(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        await self._receiver.serve_pair(context)
