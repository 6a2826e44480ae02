"""The receiving half every KV transport shares: which transfers are expected, the
handshake and chunk checks, landing packed blocks into the caches, and how a
transfer completes, fails or is cancelled. A backend adds only the wire: it binds
each incoming stream to its request, hands over the handshake and each chunk,
and reports refusals to its sender.

Per request: ``expect`` registers the destination (state *expected*); the
sender's handshake binds a stream after checking the request id and the layout
(*streaming*); each chunk is checked and scattered into the request's blocks; the
final message completes the request when every layer of every block has landed
(*complete*). A refusal, the sender going away, a receiver ``cancel`` or a
``wait_complete`` timeout fails it (*failed*); after that nothing is written into
its blocks, and on CUDA the compute stream waits for the scatters already queued
(the blocks are freed next). ``wait_complete`` reports the outcome and forgets the
request. Everything runs on the event loop thread, so a cancellation can never
interleave with a scatter.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import torch

from baton.kernels import ops
from baton.kvtransfer.base import KVReceiver, TransferStats
from baton.kvtransfer.errors import LayoutMismatch, TransferError
from baton.kvtransfer.layout import KVLayout, check_layout


class Refused(Exception):
    """The receiver refuses a stream or a chunk. ``code`` is the name of the gRPC
    status code it maps to; other transports send it beside the message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(eq=False)
class Incoming:
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


class LandingReceiver(KVReceiver):
    """Lands packed blocks into ``kv_caches`` (one tensor per layer); the base of
    every backend's receiver."""

    def __init__(self, kv_caches: list[torch.Tensor]) -> None:
        if not kv_caches:
            raise ValueError("kv_caches is empty")
        self._caches = kv_caches
        # Land CUDA chunks on a side stream: on the compute stream each copy would wait
        # behind the decode steps already queued there.
        self._copy_stream = torch.cuda.Stream(kv_caches[0].device) if kv_caches[0].is_cuda else None
        self._incoming: dict[str, Incoming] = {}

    @property
    def device(self) -> torch.device:
        return self._caches[0].device

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
            ids = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        if self._copy_stream is not None:
            # With async scheduling a step may still be running on the compute stream that
            # writes the last KV of a sequence that finished and gave these blocks back:
            # land after it.
            self._copy_stream.wait_stream(torch.cuda.current_stream(self._copy_stream.device))
        self._incoming[request_id] = Incoming(
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
            self.fail(entry, f"KV of request {request_id!r} did not arrive within {timeout_s:g} s "
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
        self.fail(entry, f"KV transfer of request {request_id!r} was cancelled by the receiver", cancel=True)
        return True

    def fail(self, entry: Incoming, message: str, cancel: bool = False) -> None:
        """Fail ``entry`` (first failure wins); with ``cancel``, also end its stream now."""
        if entry.complete or entry.error is not None:
            return
        entry.error = TransferError(message)
        if self._copy_stream is not None and entry.bytes:
            # Its blocks go back to the pool now: whatever the compute stream writes into them
            # next runs after the scatters already queued for this request, not under them.
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        entry.done.set()
        if cancel:
            entry.cancelled = True
            if entry.stream is not None and entry.stream is not asyncio.current_task():
                entry.stream.cancel()

    def bind(self, request_id: str) -> Incoming:
        """Attach the current task's new stream to its request."""
        entry = self._incoming.get(request_id)
        if entry is None:
            raise Refused("NOT_FOUND", f"no KV transfer is expected for request {request_id!r}")
        if entry.stream is not None or entry.error is not None:
            raise Refused("FAILED_PRECONDITION", f"request {request_id!r} already has a transfer stream")
        entry.stream = asyncio.current_task()
        return entry

    @staticmethod
    def handshake(entry: Incoming, layout: KVLayout | None) -> None:
        """Refuse a handshake without a layout or with a layout unlike the expected one."""
        if layout is None:
            raise Refused("INVALID_ARGUMENT", "the first chunk of a stream must carry the KV layout")
        try:
            check_layout(entry.layout, layout)
        except LayoutMismatch as e:
            raise Refused("FAILED_PRECONDITION", str(e)) from e

    @staticmethod
    def check_stream(entry: Incoming, request_id: str) -> None:
        """Refuse any further message of a failed transfer, or one naming another request."""
        if entry.error is not None:
            raise Refused("ABORTED", str(entry.error))
        if request_id != entry.request_id:
            raise Refused("INVALID_ARGUMENT", f"chunk for request {request_id!r} in the stream of {entry.request_id!r}")

    @staticmethod
    def check_run(entry: Incoming, layer: int, first: int, count: int, nbytes: int) -> None:
        """Refuse a run of blocks that does not fit the request's ticket and layout."""
        layout, n = entry.layout, len(entry.block_ids)
        if not 0 <= layer < layout.num_layers:
            raise Refused("INVALID_ARGUMENT", f"layer {layer} outside [0, {layout.num_layers})")
        if count < 1 or first < 0 or first + count > n:
            raise Refused("INVALID_ARGUMENT", f"blocks [{first}, {first + count}) outside the ticket's {n} blocks")
        if nbytes != count * layout.block_bytes:
            raise Refused("INVALID_ARGUMENT", f"chunk carries {nbytes} bytes, expected {count * layout.block_bytes} "
                                              f"for {count} blocks")

    def land(self, entry: Incoming, layer: int, first: int, data: torch.Tensor) -> None:
        """Scatter ``data`` (the packed bytes of a run that passed ``check_run``, on any
        device) into the request's blocks ``first ..``."""
        entry.started = entry.started or time.perf_counter()
        cache = self._caches[layer]
        packed = data.view(cache.dtype).view(-1, *entry.layout.block_shape)
        with self._on_copy_stream():
            packed = packed.to(cache.device)
            if self._copy_stream is not None:  # no reuse of the buffer before the scatter has read it
                packed.record_stream(self._copy_stream)
            ops.scatter_blocks(cache, entry.block_ids[first:first + packed.shape[0]], packed)
        entry.landed[layer, first:first + packed.shape[0]] = True
        entry.bytes += data.numel()

    def complete(self, entry: Incoming) -> None:
        """The sender's final message: complete the request if every block of every layer landed."""
        missing = int((~entry.landed).sum())
        if missing:
            raise Refused("INVALID_ARGUMENT", f"final chunk of request {entry.request_id!r} arrived with {missing} "
                                              f"of {entry.landed.numel()} layer-blocks missing")
        if self._copy_stream is not None:
            self._copy_stream.synchronize()  # the blocks are complete before decode reads them
        entry.complete, entry.finished = True, time.perf_counter()
        entry.done.set()

    def _on_copy_stream(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else contextlib.nullcontext()
