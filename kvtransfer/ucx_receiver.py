"""The receiving half of the UCX KV transport (the ``ucxx`` package), and the
framing both halves share.

A sender opens UCX endpoints to the decode worker's listener; each carries one
transfer at a time, and one whose transfer completed carries the sender's next.
UCX picks the path (TCP here, RDMA, shared memory or CUDA IPC where the hardware
has them) and moves CUDA buffers without a host copy. Messages of a transfer,
in order on its endpoint:

    sender                                   receiver
    frame KVChunk(request_id, layout)   ->
                                        <-   frame KVAck(ok) or a refusal
    frame KVChunk(layer, first, n)      ->   checks the run, receives into a
    data: n blocks, packed              ->   staging buffer on the cache's device,
    ...                                      scatters it into the blocks
    frame KVChunk(last)                 ->
                                        <-   frame KVAck(ok, bytes) or a refusal

A frame is one UCX message of ``FRAME_BYTES``: a 4-byte little-endian length,
then the protobuf. Neither side waits for one message before sending or posting
the next (UCX matches them in the order posted), so several runs are in flight.
A refusal (``KVAck`` with the gRPC status code name and the
reason) may come at any point; the receiver then closes the endpoint. The
bookkeeping is ``landing.LandingReceiver``'s.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque

import numpy as np
import torch
from google.protobuf.message import DecodeError

from baton.kvtransfer.landing import Incoming, LandingReceiver, Refused
from baton.kvtransfer.layout import KVLayout
from baton.protos import kvtransfer_pb2

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")  # ucxx sets UCX_MEMTYPE_CACHE, which UCX 1.21 no longer reads
# UCX progresses on the event loop, woken by the worker's file descriptor: ucxx's default, a
# progress thread, competes with the engine thread for the GIL (bench/results/kvtransfer_h200.md).
os.environ.setdefault("UCXPY_PROGRESS_MODE", "blocking")
import ucxx  # noqa: E402
from ucxx.exceptions import UCXCanceled, UCXError, UCXMessageTruncatedError  # noqa: E402

FRAME_BYTES = 4096
DEFAULT_HANDSHAKE_TIMEOUT_S = 30.0
RUNS_IN_FLIGHT = 4  # runs a receiver receives at once (each in a staging buffer)
_LENGTH_BYTES = 4
# What a failed UCX operation raises: ucxx's Python errors, and the base of the errors of its
# C++ core (``ucxx.UCXXError``, which the package does not export by name).
UCX_ERRORS = (UCXError, UCXCanceled.__base__)


def buffer_of(t: torch.Tensor) -> object:
    """What ucxx sends from or receives into: the CUDA tensor itself (it exposes
    ``__cuda_array_interface__``), or a numpy view of host memory."""
    return t if t.is_cuda else t.numpy()


async def send_frame(ep: ucxx._lib_async.Endpoint, msg) -> None:
    body = msg.SerializeToString()
    if len(body) > FRAME_BYTES - _LENGTH_BYTES:
        raise ValueError(f"{type(msg).__name__} of {len(body)} bytes does not fit a {FRAME_BYTES}-byte frame")
    frame = np.zeros(FRAME_BYTES, dtype=np.uint8)
    frame[:_LENGTH_BYTES] = np.frombuffer(len(body).to_bytes(_LENGTH_BYTES, "little"), dtype=np.uint8)
    frame[_LENGTH_BYTES:_LENGTH_BYTES + len(body)] = np.frombuffer(body, dtype=np.uint8)
    await ep.send(frame)


async def recv_frame(ep: ucxx._lib_async.Endpoint, message_type):
    """The next frame's message."""
    frame = np.empty(FRAME_BYTES, dtype=np.uint8)
    try:
        await ep.recv(frame)
    except UCXMessageTruncatedError:
        raise Refused("INVALID_ARGUMENT", f"a message over the {FRAME_BYTES}-byte frame where a frame was due") from None
    length = int.from_bytes(frame[:_LENGTH_BYTES].tobytes(), "little")
    if length > FRAME_BYTES - _LENGTH_BYTES:
        raise Refused("INVALID_ARGUMENT", f"a frame claims {length} bytes, over the {FRAME_BYTES}-byte frame")
    try:
        return message_type.FromString(frame[_LENGTH_BYTES:_LENGTH_BYTES + length].tobytes())
    except DecodeError:
        raise Refused("INVALID_ARGUMENT", f"a frame that is not a {message_type.__name__}") from None


def post(posted: list[asyncio.Future], operation) -> asyncio.Future:
    """Start a UCX operation (operations start in the order posted), tracked in
    ``posted`` until it succeeds; one that failed stays there with its error."""
    def forget_if_succeeded(f: asyncio.Future) -> None:
        if not f.cancelled() and f.exception() is None:
            posted.remove(f)

    future = asyncio.ensure_future(operation)
    posted.append(future)
    future.add_done_callback(forget_if_succeeded)
    return future


class UcxKVReceiver(LandingReceiver):
    """Lands KV sent over UCX into ``kv_caches`` (one tensor per layer). Listens on
    ``port`` (0: any free port) on every interface; tickets carry
    ``advertise_host:port``. Create it on the event loop that will serve it.
    A sender's endpoint carries one request at a time, and after a transfer that
    completed, the sender may reuse it for the next."""

    transport = "ucx"

    def __init__(self, kv_caches: list[torch.Tensor], *, advertise_host: str = "127.0.0.1", port: int = 0,
                 handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S) -> None:
        super().__init__(kv_caches)
        self._handshake_timeout_s = handshake_timeout_s
        self._handlers: set[asyncio.Task] = set()
        self._listener = ucxx.create_listener(self._serve, port)
        self.address = f"{advertise_host}:{self._listener.port}"

    async def close(self) -> None:
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        self._listener.close()

    async def _serve(self, ep: ucxx._lib_async.Endpoint) -> None:
        """One sender's endpoint: transfers one after another, until one fails or the
        sender closes it. Only a new endpoint's first handshake has a deadline; an idle
        endpoint waits in the sender's pool."""
        task = asyncio.current_task()
        self._handlers.add(task)
        posted: list[asyncio.Future] = []  # receives posted ahead, each holding its buffer
        try:
            timeout_s = self._handshake_timeout_s
            while await self._serve_one(ep, timeout_s, posted):
                timeout_s = None
        finally:
            ep.abort()  # cancels the receives still posted; only then may their buffers be freed
            for receive in posted:
                receive.cancel()
            await asyncio.gather(*posted, return_exceptions=True)
            self._handlers.discard(task)

    async def _serve_one(self, ep: ucxx._lib_async.Endpoint, timeout_s: float | None,
                         posted: list[asyncio.Future]) -> bool:
        """One transfer: the handshake, runs of blocks, the final frame. Whether it
        completed (and the endpoint may carry another)."""
        entry: Incoming | None = None
        try:
            async with asyncio.timeout(timeout_s):
                first = await recv_frame(ep, kvtransfer_pb2.KVChunk)
            entry = self.bind(first.request_id)
            self.handshake(entry, KVLayout.from_proto(first.layout) if first.HasField("layout") else None)
            await send_frame(ep, kvtransfer_pb2.KVAck(ok=True))
            await self._receive_runs(ep, entry, posted)
            await send_frame(ep, kvtransfer_pb2.KVAck(ok=True, bytes_received=entry.bytes))
            return True
        except Refused as e:
            if entry is not None:
                self.fail(entry, e.message)
            await self._refuse(ep, e.code, e.message)
        except asyncio.CancelledError:  # cancel(), a wait_complete timeout, or close()
            if entry is not None and entry.cancelled:
                await self._refuse(ep, "ABORTED", str(entry.error))
        except (*UCX_ERRORS, TimeoutError) as e:
            if entry is not None:
                self.fail(entry, f"the sender of request {entry.request_id!r} went away ({e})")
        return False

    async def _receive_runs(self, ep: ucxx._lib_async.Endpoint, entry: Incoming, posted: list[asyncio.Future]) -> None:
        """Land runs until the final frame. Frames are read ahead of the data (up to
        ``RUNS_IN_FLIGHT`` runs): each run's receive and the next frame's are posted at
        once, in that order, which is the order UCX matches them in; runs land in order
        as their data arrives."""
        runs: deque[tuple[kvtransfer_pb2.KVChunk, torch.Tensor, asyncio.Future]] = deque()
        frame: asyncio.Future | None = post(posted, recv_frame(ep, kvtransfer_pb2.KVChunk))
        while frame is not None or runs:
            reading = frame is not None and len(runs) < RUNS_IN_FLIGHT
            waiting = {frame} if reading else set()
            if runs:
                waiting.add(runs[0][2])
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if reading and frame.done():
                chunk = frame.result()
                self.check_stream(entry, chunk.request_id)
                if chunk.num_blocks:
                    nbytes = chunk.num_blocks * entry.layout.block_bytes
                    self.check_run(entry, chunk.layer, chunk.first_block, chunk.num_blocks, nbytes)
                    data = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                    runs.append((chunk, data, post(posted, ep.recv(buffer_of(data)))))
                frame = None if chunk.last else post(posted, recv_frame(ep, kvtransfer_pb2.KVChunk))
            while runs and runs[0][2].done():
                chunk, data, received = runs.popleft()
                try:
                    received.result()
                except UCXMessageTruncatedError:
                    raise Refused("INVALID_ARGUMENT", f"chunk carries more than the {data.numel()} bytes of its "
                                                      f"{chunk.num_blocks} blocks") from None
                self.check_stream(entry, chunk.request_id)  # failed while the data was in flight: land nothing
                self.land(entry, chunk.layer, chunk.first_block, data)
        self.complete(entry)

    @staticmethod
    async def _refuse(ep: ucxx._lib_async.Endpoint, code: str, message: str) -> None:
        """Tell the sender why, then wait (bounded) until it has read that and closed its
        end: closing first could drop the answer. Whatever it still sends is drained."""
        scratch = np.empty(FRAME_BYTES, dtype=np.uint8)
        try:
            async with asyncio.timeout(1.0):
                await send_frame(ep, kvtransfer_pb2.KVAck(ok=False, code=code, error=message))
            async with asyncio.timeout(5.0):
                while True:
                    await ep.recv(scratch)
        except (*UCX_ERRORS, TimeoutError):
            pass
