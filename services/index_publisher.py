"""A worker's side of the Redis index: registry heartbeat and block events.

Queues: ``publish()`` appends SADD / SREM operations to ``_pending`` (cheap,
never blocks; call it on the event loop's thread, e.g. handed over from the
engine thread with ``call_soon_threadsafe``); a background flusher drains them in
pipelined batches of at most ``batch_size`` commands. A heartbeat task writes the
worker's ``WorkerRecord`` under ``baton:worker:{id}`` with a TTL, refreshed every
TTL / 3; an expired key tells the gateway the worker is gone.

Block events: the ``BlockStored`` / ``BlockRemoved`` dataclasses that
``baton.engine.block_manager`` emits (pure Python, no torch); anything else is
refused with ``TypeError``.

Redis down: one warning per outage, the worker keeps serving; operations queue
up to ``max_pending`` (past that the queue is dropped). Once Redis answers
again the worker re-registers at once and re-adds every block it holds, then
applies the queue (entries removed while the queue was dropped may stay stale:
the index is advisory). ``stop()`` deletes the registry
key and removes this worker from every block it still holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from baton.engine.block_manager import BlockEvent, BlockRemoved, BlockStored
from baton.services.redis_client import REDIS_ERRORS_CAUGHT, OutageLog, connect
from baton.services.redis_keys import DEFAULT_HEARTBEAT_TTL_S, WorkerRecord, block_key, worker_key

logger = logging.getLogger(__name__)


def is_stored(event: BlockEvent) -> bool:
    """True for ``BlockStored``, False for ``BlockRemoved``; TypeError otherwise."""
    if isinstance(event, BlockStored):
        return True
    if isinstance(event, BlockRemoved):
        return False
    raise TypeError(f"expected BlockStored or BlockRemoved, got {type(event).__name__}")


class IndexPublisher:
    """Registers a worker in Redis and mirrors its prefix cache into the index."""

    def __init__(
        self,
        redis_url: str,
        record: WorkerRecord,
        heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S,
        *,
        flush_interval_s: float = 0.05,
        batch_size: int = 1024,
        max_pending: int = 100_000,
        timeout_s: float = 1.0,
    ) -> None:
        if heartbeat_ttl_s <= 0:
            raise ValueError(f"heartbeat_ttl_s must be positive, got {heartbeat_ttl_s}")
        self.record = record
        self._redis = connect(redis_url, timeout_s)
        self._ttl_ms = max(int(heartbeat_ttl_s * 1000), 1)
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._max_pending = max_pending
        self._pending: list[tuple[bool, int]] = []      # (stored?, block hash), in order
        self._held: set[int] = set()
        self._resync = False
        self._outage = OutageLog(logger, f"index publisher {record.worker_id}")
        self._tasks: list[asyncio.Task[None]] = []
        self._flushing = asyncio.Lock()

    async def start(self) -> None:
        """Register now (best effort) and start the heartbeat and flusher tasks."""
        await self._heartbeat_once()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="index-heartbeat"),
            asyncio.create_task(self._flush_loop(), name="index-flush"),
        ]

    def publish(self, events: Iterable[BlockEvent]) -> None:
        """Queue block events; the flusher writes them in order."""
        for event in events:
            stored = is_stored(event)
            for block_hash in event.block_hashes:
                if stored:
                    self._held.add(block_hash)
                else:
                    self._held.discard(block_hash)
                self._pending.append((stored, block_hash))
        if len(self._pending) > self._max_pending:
            logger.warning("index publisher: %d queued operations dropped; will resync", len(self._pending))
            self._pending.clear()
            self._resync = True

    async def flush(self) -> bool:
        """Write every queued operation now; False if Redis did not answer."""
        async with self._flushing:
            try:
                if self._resync:
                    await self._redis.set(worker_key(self.record.worker_id), self.record.to_json(), px=self._ttl_ms)
                    held = [(True, h) for h in self._held]
                    for start in range(0, len(held), self._batch_size):
                        await self._write(held[start : start + self._batch_size])
                    self._resync = False
                while self._pending:
                    batch, self._pending = self._pending[: self._batch_size], self._pending[self._batch_size :]
                    try:
                        await self._write(batch)
                    except BaseException:
                        self._pending[:0] = batch        # publish() may have appended meanwhile
                        raise
            except REDIS_ERRORS_CAUGHT as err:
                self._resync = True
                self._outage.failed(err)
                return False
        self._outage.ok()
        return True

    async def stop(self) -> None:
        """Stop the tasks, deregister, and remove this worker from its blocks."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._pending.extend((False, h) for h in self._held)
        self._held.clear()
        self._resync = False
        try:
            await self.flush()
            await self._redis.delete(worker_key(self.record.worker_id))
        except REDIS_ERRORS_CAUGHT as err:
            self._outage.failed(err)
        finally:
            await self._redis.aclose()

    async def _write(self, ops: list[tuple[bool, int]]) -> None:
        member = self.record.worker_id
        async with self._redis.pipeline(transaction=False) as pipe:
            for stored, block_hash in ops:
                key = block_key(self.record.fingerprint, block_hash)
                if stored:
                    pipe.sadd(key, member)
                else:
                    pipe.srem(key, member)
            await pipe.execute()

    async def _heartbeat_once(self) -> None:
        try:
            await self._redis.set(worker_key(self.record.worker_id), self.record.to_json(), px=self._ttl_ms)
        except REDIS_ERRORS_CAUGHT as err:
            self._resync = True          # Redis may come back empty
            self._outage.failed(err)
            return
        self._outage.ok()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            await self._heartbeat_once()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval_s)
            await self.flush()
