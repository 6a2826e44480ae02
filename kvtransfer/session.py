"""The sending half every KV transport shares. ``submit_layer`` runs on the
engine's compute thread: it gathers the request's blocks of that layer into one
packed buffer right away, lets the backend stage it (a pinned host copy, or the
device buffer as it is), and hands it to the event loop with
``loop.call_soon_threadsafe`` into the session's ``asyncio.Queue``. The
backend's stream task (``_run``) sends the queue in order until ``finish``
queues ``END``, then waits for the receiver's acknowledgement.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from baton.kernels import ops
from baton.kvtransfer.base import TransferSession, TransferStats, TransferTicket
from baton.kvtransfer.errors import TransferError
from baton.kvtransfer.layout import KVLayout, check_layout
from baton.protos import kvtransfer_pb2

END = object()  # queued by finish(): send the final message
_ANSWERED = object()  # queued when the receiver's answer arrives (see ``QueuedSession._next``)
DEFAULT_STREAM_TIMEOUT_S = 120.0
# A sender pings its receiver this often while a transfer's stream is open, and gives the stream
# up when a ping goes unanswered as long: a receiver gone silent fails its transfers in seconds.
DEFAULT_KEEPALIVE_S = 10.0


def blocks_per_message(transport: str, ticket: TransferTicket, local_layout: KVLayout, chunk_bytes: int) -> int:
    """Check a ticket before anything is sent (``LayoutMismatch`` for another layout,
    ``TransferError`` for an unusable ticket); how many whole blocks fit ``chunk_bytes``."""
    if ticket.transport != transport:
        raise TransferError(f"ticket asks for transport {ticket.transport!r}, this sender is {transport!r}")
    check_layout(local_layout, ticket.layout)
    if not ticket.block_ids:
        raise TransferError("ticket has no destination blocks")
    count = chunk_bytes // local_layout.block_bytes
    if count < 1:
        raise TransferError(f"one KV block is {local_layout.block_bytes} bytes, over the {chunk_bytes}-byte chunk limit")
    return count


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (the host may be a bracketed IPv6 address) of a ticket's address."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise TransferError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def warm_up_block_copies(kv_cache: torch.Tensor) -> None:
    """Compile the kernels that pack blocks for sending and unpack them on landing, before the
    first transfer needs them (compiled in the middle of serving, each stalled every request
    in flight): block 0 of ``kv_cache`` is packed and written back unchanged. Run it before
    the cache is in use."""
    ids = torch.zeros(1, dtype=torch.int64, device=kv_cache.device)
    ops.scatter_blocks(kv_cache, ids, ops.gather_blocks(kv_cache, ids))


@dataclass
class Packed:
    """One layer's run of ``num_blocks`` blocks for ticket blocks ``first_block ..``,
    packed in ``data``; on a CUDA device, ``data`` is complete once ``ready`` fired."""

    layer: int
    first_block: int
    num_blocks: int
    data: torch.Tensor
    ready: torch.cuda.Event | None = None

    async def wait_ready(self) -> None:
        """Wait for the copy that fills ``data`` (in a thread, only when it is not done)."""
        if self.ready is not None and not self.ready.query():
            await asyncio.to_thread(self.ready.synchronize)


class QueuedSession(TransferSession):
    """A transfer session whose stream task (``_run``, the backend's) sends queued
    ``Packed`` runs of at most ``blocks_per_message`` blocks."""

    def __init__(self, ticket: TransferTicket, blocks_per_message: int) -> None:
        self._ticket = ticket
        self._layout = ticket.layout
        self._blocks_per_message = blocks_per_message
        self._submitted = torch.zeros(ticket.layout.num_layers, len(ticket.block_ids), dtype=torch.bool)
        self._lock = threading.Lock()
        self._stopped = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Packed | object] = asyncio.Queue()
        self._task = self._loop.create_task(self._run())
        self._task.add_done_callback(self._on_done)

    @abc.abstractmethod
    async def _run(self) -> TransferStats:
        """Connect, send the handshake, then the queue until ``END``, then the final
        message; return once the receiver acknowledged it. Raise ``TransferError``."""

    def _stage(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Where a packed run waits to be sent (compute thread), and the event that
        completes it, if any: by default the packed buffer itself, on its device."""
        if not packed.is_cuda:
            return packed, None
        ready = torch.cuda.Event()
        ready.record()
        return packed, ready

    def _answered_by(self, answer: asyncio.Future) -> asyncio.Future:
        """Let ``_next`` raise as soon as ``answer`` (the receiver's ``KVAck``) arrives; returns it."""
        answer.add_done_callback(lambda _: self._queue.put_nowait(_ANSWERED))
        return answer

    async def _next(self, answer: asyncio.Future) -> Packed | object:
        """The next queued run, or ``END``; raises if the receiver answered before the final
        chunk (a refusal, or a failure standing for one)."""
        item = await self._queue.get()
        if item is _ANSWERED:
            self._check(answer.result())
            raise self._error("UNKNOWN", "the receiver answered before the final chunk")
        return item

    def _check(self, ack: kvtransfer_pb2.KVAck) -> None:
        """Raise the receiver's refusal, if ``ack`` is one."""
        if not ack.ok:
            raise self._error(ack.code or "UNKNOWN", ack.error)

    def _error(self, code: str, details: str) -> TransferError:
        """The transfer failed; ``code`` is the name of the gRPC status code it maps to."""
        return TransferError(f"KV transfer of request {self._ticket.request_id!r} to {self._ticket.address} "
                             f"failed: {code}: {details}")

    def _cancel_call(self) -> None:
        """End the backend's connection at once (``abort``); by default the task's cancellation does."""

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
        items = [Packed(layer, first + i, run.shape[0], *self._stage(run))
                 for i in range(0, count, self._blocks_per_message)
                 for run in [packed[i:i + self._blocks_per_message]]]
        with self._lock:
            self._submitted[layer, first:first + count] = True
        try:
            for item in items:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nothing can be sent any more
            self._stopped = True

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
        # call_soon keeps END behind every run already handed over by submit_layer.
        self._loop.call_soon(self._queue.put_nowait, END)
        try:
            return await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            await self.abort()
            raise TransferError(f"KV transfer of request {self._ticket.request_id!r} to {self._ticket.address} "
                                f"was not acknowledged within {timeout_s:g} s") from None

    async def abort(self) -> None:
        self._stopped = True
        self._cancel_call()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def _on_done(self, task: asyncio.Task) -> None:
        self._stopped = True
        if not task.cancelled():
            task.exception()  # retrieved here; finish() re-raises it
