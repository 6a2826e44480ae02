"""The receiving half of the gRPC KV transport: the decode worker's
``KVTransfer.Push`` servicer, which lands each chunk into reserved blocks.

Per request: ``expect`` registers the destination (state *expected*); the first
chunk of a ``Push`` stream (the sender's handshake: layout, no blocks) binds the
stream after checking the request id and the layout, and accepts it with initial
metadata (*streaming*); each chunk is validated and scattered into the
request's blocks; the final chunk completes the request when every layer of
every block has landed (*complete*). A refusal, the sender going away, a
receiver ``cancel`` or a ``wait_complete`` timeout fails it (*failed*); after
that nothing is written into its blocks. ``wait_complete`` reports the outcome
and forgets the request. Everything runs on the event loop thread, so a
cancellation can never interleave with a scatter.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import warnings
from dataclasses import dataclass, field

import grpc
import torch

from baton.kernels import ops
from baton.kvtransfer.base import KVReceiver, TransferStats
from baton.kvtransfer.errors import LayoutMismatch, TransferError
from baton.kvtransfer.layout import KVLayout, check_layout
from baton.protos import kvtransfer_pb2, kvtransfer_pb2_grpc

# Initial metadata by which the receiver accepts a stream's handshake; the sender
# sends data only after it.
ACCEPTED_KEY, ACCEPTED_VALUE = "baton-kv-handshake", "accepted"


@dataclass(eq=False)
class _Incoming:
    """One expected transfer."""

    request_id: str
    block_ids: torch.Tensor            # destination blocks, sequence order
    layout: KVLayout
    landed: torch.Tensor               # bool [num_layers, num_blocks]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    stream: asyncio.Task | None = None
    error: TransferError | None = None
    complete: bool = False
    cancelled: bool = False
    bytes: int = 0
    started: float = 0.0               # first data chunk
    finished: float = 0.0              # final chunk


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class GrpcKVReceiver(KVReceiver):
    """Lands ``KVTransfer.Push`` streams into ``kv_caches`` (one tensor per layer).

    ``address`` is what tickets carry; pass ``server`` to register the servicer on
    an existing ``grpc.aio`` server (create it with ``grpc_options()``).
    """

    transport = "grpc"

    def __init__(self, kv_caches: list[torch.Tensor], *, address: str = "",
                 server: grpc.aio.Server | None = None) -> None:
        if not kv_caches:
            raise ValueError("kv_caches is empty")
        self._caches = kv_caches
        self.address = address
        # Land CUDA chunks on a side stream: on the compute stream each copy would wait
        # behind the decode steps already queued there.
        self._copy_stream = torch.cuda.Stream(kv_caches[0].device) if kv_caches[0].is_cuda else None
        self._incoming: dict[str, _Incoming] = {}
        if server is not None:
            add_to_server(server, self)

    def expect(self, request_id: str, block_ids: list[int], layout: KVLayout) -> None:
        if request_id in self._incoming:
            raise ValueError(f"a transfer for request {request_id!r} is already expected")
        if layout.num_layers != len(self._caches):
            raise ValueError(f"layout has {layout.num_layers} layers, the receiver's cache {len(self._caches)}")
        for cache in self._caches:
            layout.check_cache(cache)
        num_blocks = self._caches[0].shape[0]
        if not block_ids:
            raise ValueError("block_ids is empty")
        if len(set(block_ids)) != len(block_ids) or min(block_ids) < 0 or max(block_ids) >= num_blocks:
            raise ValueError(f"block_ids must be distinct and within [0, {num_blocks})")
        with self._on_copy_stream():
            ids = torch.tensor(block_ids, dtype=torch.int64, device=self._caches[0].device)
        if self._copy_stream is not None:
            # With async scheduling a step may still be running on the compute stream that
            # writes the last KV of a sequence that finished and gave these blocks back:
            # land after it.
            self._copy_stream.wait_stream(torch.cuda.current_stream(self._copy_stream.device))
        self._incoming[request_id] = _Incoming(
            request_id=request_id,
            block_ids=ids,
            layout=layout,
            landed=torch.zeros(layout.num_layers, len(block_ids), dtype=torch.bool),
        )

    async def wait_complete(self, request_id: str, timeout_s: float) -> TransferStats:
        entry = self._incoming.get(request_id)
        if entry is None:
            raise TransferError(f"no KV transfer is expected for request {request_id!r}")
        try:
            await asyncio.wait_for(entry.done.wait(), timeout_s)
        except TimeoutError:
            landed, total = int(entry.landed.sum()), entry.landed.numel()
            self._fail(entry, f"KV of request {request_id!r} did not arrive within {timeout_s:g} s "
                              f"({landed} of {total} layer-blocks landed)", cancel=True)
        finally:
            self._incoming.pop(request_id, None)
        if entry.error is not None:
            raise entry.error
        return TransferStats(bytes=entry.bytes, seconds=entry.finished - entry.started)

    def cancel(self, request_id: str) -> bool:
        entry = self._incoming.pop(request_id, None)
        if entry is None:
            return False
        self._fail(entry, f"KV transfer of request {request_id!r} was cancelled by the receiver", cancel=True)
        return True

    def _fail(self, entry: _Incoming, message: str, cancel: bool = False) -> None:
        """Fail ``entry`` (first failure wins); with ``cancel``, also end its stream now."""
        if entry.complete or entry.error is not None:
            return
        entry.error = TransferError(message)
        entry.done.set()
        if cancel:
            entry.cancelled = True
            if entry.stream is not None and entry.stream is not asyncio.current_task():
                entry.stream.cancel()

    def _bind(self, chunk: kvtransfer_pb2.KVChunk) -> _Incoming:
        """Attach a new stream to its request."""
        entry = self._incoming.get(chunk.request_id)
        if entry is None:
            raise _Refused(grpc.StatusCode.NOT_FOUND, f"no KV transfer is expected for request {chunk.request_id!r}")
        if entry.stream is not None or entry.error is not None:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                           f"request {chunk.request_id!r} already has a transfer stream")
        entry.stream = asyncio.current_task()
        return entry

    def _handshake(self, entry: _Incoming, chunk: kvtransfer_pb2.KVChunk) -> None:
        """Refuse a first chunk without a layout or with a layout unlike the expected one."""
        if not chunk.HasField("layout"):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "the first chunk of a stream must carry the KV layout")
        try:
            check_layout(entry.layout, KVLayout.from_proto(chunk.layout))
        except LayoutMismatch as e:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from e

    def _land(self, entry: _Incoming, chunk: kvtransfer_pb2.KVChunk) -> None:
        """Validate one chunk and scatter its blocks; complete the request on ``last``."""
        if entry.error is not None:
            raise _Refused(grpc.StatusCode.ABORTED, str(entry.error))
        if chunk.request_id != entry.request_id:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"chunk for request {chunk.request_id!r} in the stream of {entry.request_id!r}")
        if chunk.num_blocks or chunk.data:  # the handshake and the final chunk carry no blocks
            self._scatter(entry, chunk)
        if chunk.last:
            missing = int((~entry.landed).sum())
            if missing:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"final chunk of request {entry.request_id!r} arrived with {missing} "
                               f"of {entry.landed.numel()} layer-blocks missing")
            if self._copy_stream is not None:
                self._copy_stream.synchronize()  # the blocks are complete before decode reads them
            entry.complete, entry.finished = True, time.perf_counter()
            entry.done.set()

    def _on_copy_stream(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else contextlib.nullcontext()

    def _scatter(self, entry: _Incoming, chunk: kvtransfer_pb2.KVChunk) -> None:
        layout, n = entry.layout, len(entry.block_ids)
        first, count = chunk.first_block, chunk.num_blocks
        if not 0 <= chunk.layer < layout.num_layers:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"layer {chunk.layer} outside [0, {layout.num_layers})")
        if count < 1 or first < 0 or first + count > n:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"blocks [{first}, {first + count}) outside the ticket's {n} blocks")
        if len(chunk.data) != count * layout.block_bytes:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"chunk carries {len(chunk.data)} bytes, expected {count * layout.block_bytes} "
                           f"for {count} blocks")
        entry.started = entry.started or time.perf_counter()
        cache = self._caches[chunk.layer]
        with warnings.catch_warnings():  # protobuf bytes are read-only; the view is only read from
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(chunk.data, dtype=torch.uint8)
        packed = raw.view(cache.dtype).view(count, *layout.block_shape)
        with self._on_copy_stream():
            ops.scatter_blocks(cache, entry.block_ids[first:first + count], packed.to(cache.device))
        entry.landed[chunk.layer, first:first + count] = True
        entry.bytes += len(chunk.data)


class KVTransferServicer(kvtransfer_pb2_grpc.KVTransferServicer):
    """``KVTransfer.Push``: one client stream of chunks per request."""

    def __init__(self, receiver: GrpcKVReceiver) -> None:
        self._receiver = receiver

    async def Push(self, request_iterator, context: grpc.aio.ServicerContext) -> kvtransfer_pb2.PushReply:
        entry: _Incoming | None = None
        try:
            async for chunk in request_iterator:
                if entry is None:
                    entry = self._receiver._bind(chunk)
                    self._receiver._handshake(entry, chunk)
                    await context.send_initial_metadata(((ACCEPTED_KEY, ACCEPTED_VALUE),))
                self._receiver._land(entry, chunk)
                if chunk.last:
                    return kvtransfer_pb2.PushReply(bytes_received=entry.bytes)
            request = entry.request_id if entry is not None else "?"
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the sender of request {request!r} ended the stream before its final chunk")
        except _Refused as e:
            if entry is not None:
                self._receiver._fail(entry, e.message)
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            if entry is not None and entry.cancelled:
                await context.abort(grpc.StatusCode.ABORTED, str(entry.error))
            if entry is not None:
                self._receiver._fail(entry, f"the sender of request {entry.request_id!r} went away")
            raise


def add_to_server(server: grpc.aio.Server, receiver: GrpcKVReceiver) -> None:
    """Serve ``receiver`` on an existing ``grpc.aio`` server (e.g. the decode worker's)."""
    kvtransfer_pb2_grpc.add_KVTransferServicer_to_server(KVTransferServicer(receiver), server)
