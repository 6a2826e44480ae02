"""The receiving half of the gRPC KV transport: the decode worker's
``KVTransfer.Push`` servicer. One client stream per request: its first chunk
is the sender's handshake (the layout, no blocks), accepted with initial
metadata; each later chunk carries one layer's run of packed blocks; the final
chunk (``last``) completes the request. A refusal ends the call with a gRPC
status naming the reason. The bookkeeping is ``landing.LandingReceiver``'s.
"""

from __future__ import annotations

import asyncio
import warnings

import grpc
import torch

from baton.kvtransfer.landing import Incoming, LandingReceiver, Refused
from baton.kvtransfer.layout import KVLayout
from baton.protos import kvtransfer_pb2, kvtransfer_pb2_grpc

# Initial metadata by which the receiver accepts a stream's handshake; the sender
# sends data only after it.
ACCEPTED_KEY, ACCEPTED_VALUE = "baton-kv-handshake", "accepted"


class GrpcKVReceiver(LandingReceiver):
    """Lands ``KVTransfer.Push`` streams into ``kv_caches`` (one tensor per layer).

    ``address`` is what tickets carry; pass ``server`` to register the servicer on
    an existing ``grpc.aio`` server (create it with ``grpc_options()``).
    """

    transport = "grpc"

    def __init__(self, kv_caches: list[torch.Tensor], *, address: str = "",
                 server: grpc.aio.Server | None = None) -> None:
        super().__init__(kv_caches)
        self.address = address
        if server is not None:
            add_to_server(server, self)

    def land_chunk(self, entry: Incoming, chunk: kvtransfer_pb2.KVChunk) -> None:
        """Check one chunk and scatter its blocks; complete the request on ``last``."""
        self.check_stream(entry, chunk.request_id)
        if chunk.num_blocks or chunk.data:  # the handshake and the final chunk carry no blocks
            self.check_run(entry, chunk.layer, chunk.first_block, chunk.num_blocks, len(chunk.data))
            with warnings.catch_warnings():  # protobuf bytes are read-only; the view is only read from
                warnings.simplefilter("ignore", UserWarning)
                data = torch.frombuffer(chunk.data, dtype=torch.uint8)
            self.land(entry, chunk.layer, chunk.first_block, data)
        if chunk.last:
            self.complete(entry)


class KVTransferServicer(kvtransfer_pb2_grpc.KVTransferServicer):
    """``KVTransfer.Push``: one client stream of chunks per request."""

    def __init__(self, receiver: GrpcKVReceiver) -> None:
        self._receiver = receiver

    async def Push(self, request_iterator, context: grpc.aio.ServicerContext) -> kvtransfer_pb2.PushReply:
        entry: Incoming | None = None
        try:
            async for chunk in request_iterator:
                if entry is None:
                    entry = self._receiver.bind(chunk.request_id)
                    layout = KVLayout.from_proto(chunk.layout) if chunk.HasField("layout") else None
                    self._receiver.handshake(entry, layout)
                    await context.send_initial_metadata(((ACCEPTED_KEY, ACCEPTED_VALUE),))
                self._receiver.land_chunk(entry, chunk)
                if chunk.last:
                    return kvtransfer_pb2.PushReply(bytes_received=entry.bytes)
            request = entry.request_id if entry is not None else "?"
            raise Refused("INVALID_ARGUMENT", f"the sender of request {request!r} ended the stream before its final chunk")
        except Refused as e:
            if entry is not None:
                self._receiver.fail(entry, e.message)
            await context.abort(grpc.StatusCode[e.code], e.message)
        except asyncio.CancelledError:
            if entry is not None and entry.cancelled:
                await context.abort(grpc.StatusCode.ABORTED, str(entry.error))
            if entry is not None:
                self._receiver.fail(entry, f"the sender of request {entry.request_id!r} went away")
            raise


def add_to_server(server: grpc.aio.Server, receiver: GrpcKVReceiver) -> None:
    """Serve ``receiver`` on an existing ``grpc.aio`` server (e.g. the decode worker's)."""
    kvtransfer_pb2_grpc.add_KVTransferServicer_to_server(KVTransferServicer(receiver), server)
