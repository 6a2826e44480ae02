"""The LoRA adapters a gateway serves that were loaded while serving (``GrpcBackend``'s).

``load`` and ``unload`` go to every worker that answers, all or none (``lora_fanout``), one at a
time (a lock, which ``sync`` and ``refresh`` also take, or skip a round while it is held). With
Redis, each is recorded there for the other gateways (``baton:loras:*``, ``PrefixIndex``); one
Redis did not take (it did not answer) waits in ``_unrecorded`` and is written again at each
``refresh`` until it does. ``refresh`` then adopts what other gateways, or this one before a
restart, recorded: an adapter that appeared is served here too, one that disappeared is no
longer (but for the names of this gateway's own ``--lora-modules`` and its own changes Redis has
yet to take). ``sync`` sends a worker the adapters it is not known to hold.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable

from baton.services.gateway.backend import BackendError
from baton.services.gateway.lora_fanout import LoRAWorker, RuntimeAdapter, load_everywhere, sync, unload_everywhere
from baton.services.gateway.prefix_index import PrefixIndex

logger = logging.getLogger(__name__)


class LoRARegistry:
    def __init__(self, start_modules: Collection[str], timeout_s: float, index: PrefixIndex | None) -> None:
        """``start_modules``: the names of the gateway's own ``--lora-modules`` (Redis does not
        override them); ``timeout_s``: the deadline of one worker's load or unload."""
        self._start_modules = start_modules
        self._timeout_s = timeout_s
        self._index = index
        self.adapters: dict[str, RuntimeAdapter] = {}
        self._recorded: set[str] | None = None   # the adapters Redis listed at the last read
        # Per adapter name, the latest load or unload here that Redis did not take.
        self._unrecorded: dict[str, Callable[[PrefixIndex], Awaitable[bool]]] = {}
        self._lock = asyncio.Lock()

    def __contains__(self, name: object) -> bool:
        return name in self.adapters

    def paths(self) -> dict[str, str]:
        return {name: adapter.path for name, adapter in self.adapters.items()}

    async def load(self, answering: Callable[[], list[LoRAWorker]], name: str, path: str) -> None:
        """Load the adapter on every worker ``answering()`` lists once no other load or unload runs."""
        async with self._lock:
            workers = answering()
            if not workers:
                raise BackendError("no worker answers: no LoRA adapter can load now", 503)
            adapter = self.adapters[name] = await load_everywhere(workers, name, path, self._timeout_s)
            await self._record(name, "loaded", lambda index: index.put_lora(name, adapter.path, adapter.digest))

    async def unload(self, answering: Callable[[], list[LoRAWorker]], name: str) -> None:
        async with self._lock:
            adapter = self.adapters.pop(name, None)
            try:
                await unload_everywhere(answering(), name, self._timeout_s)
            except BaseException:
                if adapter is not None:
                    self.adapters[name] = adapter
                raise
            held = (adapter.path, adapter.digest) if adapter is not None else None
            await self._record(name, "unloaded", lambda index: index.delete_lora(name, held))

    async def _record(self, name: str, done: str, write: Callable[[PrefixIndex], Awaitable[bool]]) -> None:
        """Tell the other gateways, through Redis, of a load or unload here (``write``); where Redis
        does not answer, at a later refresh."""
        if self._index is None:
            return
        if await write(self._index):
            self._unrecorded.pop(name, None)
        else:
            self._unrecorded[name] = write
            logger.warning("LoRA adapter %r %s; Redis did not answer: other gateways learn of it once it does", name, done)

    async def refresh(self, workers: Iterable[LoRAWorker]) -> None:
        """With Redis: write what it did not take before, then adopt what it records (``workers``:
        every known worker, which forget an adapter dropped or replaced)."""
        if self._index is not None:
            await self._record_later(self._index)
            await self._adopt(self._index, workers)

    async def _record_later(self, index: PrefixIndex) -> None:
        """Write what Redis did not take before, in order, while it answers; not while a load or unload runs."""
        if not self._unrecorded or self._lock.locked():
            return
        async with self._lock:
            for name, write in list(self._unrecorded.items()):
                if not await write(index):
                    return
                del self._unrecorded[name]
                logger.info("Redis took the change of LoRA adapter %r at last", name)

    async def _adopt(self, index: PrefixIndex, workers: Iterable[LoRAWorker]) -> None:
        """Take up the runtime adapters Redis lists that this gateway does not hold (or holds with other
        weights), but for those it unloaded since the last read or changed without Redis taking it, and
        drop those listed then and no longer; not while a load or unload runs here (the next refresh)."""
        recorded = await index.runtime_loras()
        if recorded is None or self._lock.locked():
            return
        before = self._recorded if self._recorded is not None else set()
        changed = []
        for name, (path, digest) in recorded.items():
            ours = self.adapters.get(name)
            if name in self._start_modules or name in self._unrecorded:
                continue        # its own, or changed here and Redis not yet told
            if ours is not None and ours.digest == digest:
                continue
            if ours is None and name in before:
                continue        # unloaded here since, and Redis not yet told
            logger.info("serving LoRA adapter %r (%s), loaded through another gateway", name, path)
            changed.append(name)
            self.adapters[name] = RuntimeAdapter(name, path, digest)
        for name in (before - recorded.keys() - self._unrecorded.keys()) & self.adapters.keys():
            logger.info("LoRA adapter %r was unloaded through another gateway", name)
            changed.append(name)
            del self.adapters[name]
        for worker in workers:
            worker.loras.difference_update(changed)
        self._recorded = set(recorded)

    async def sync(self, worker: LoRAWorker) -> None:
        """Load the runtime adapters ``worker`` lacks (not while a load or unload runs: the next poll)."""
        if self.adapters.keys() <= worker.loras or self._lock.locked():
            return
        async with self._lock:
            error = await sync(worker, list(self.adapters.values()), self._timeout_s, time.monotonic())
        if error is not None and error != worker.lora_error:
            logger.error("%s worker %s serves no request under the adapters it lacks: %s", worker.role, worker.address,
                         error)
        elif error is None and worker.lora_error is not None:
            logger.info("%s worker %s holds every LoRA adapter again", worker.role, worker.address)
        worker.lora_error = error
