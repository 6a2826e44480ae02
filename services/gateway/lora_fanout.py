"""LoRA adapters loaded and unloaded while serving, on every worker at once (``GrpcBackend``).

A load goes to every worker given (``LoadLoRA``, one deadline each) and succeeds where all of
them hold the adapter afterwards, read from the same files (their digests agree); else it is
undone where it was done, or may have been (a worker that did not answer in time), and the
first refusal is the caller's ``BackendError``. An unload goes the same way (``UnloadLoRA``; a
worker without the adapter has nothing to do), undone by loading the adapter again from the
path and digest each worker reports. Each worker's ``loras`` holds the runtime adapters it is
known to hold: a worker the gateway first sees, or sees again after a silence or a restart,
gets them through ``sync`` before routing uses it (and is not routed requests under one it could
not load; it is sent that one again after a wait that doubles at each failure, ``SyncBackoff``,
and at once after a restart). Undoing is best effort: a worker that cannot undo keeps the
outcome (logged), which never serves other weights under a name, since a load under a loaded
name with other weights is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from baton.protos import common_pb2
from baton.services.gateway.backend import BackendError
from baton.services.gateway.fanout import Worker, failure, gather_replies, is_error

logger = logging.getLogger(__name__)

# A worker's answer saying no (the adapter, the name or the worker's state is the reason): 400.
REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION)


@dataclass(frozen=True)
class RuntimeAdapter:
    """An adapter loaded through the gateway: where from, and its weights' digest."""

    name: str
    path: str
    digest: str


@dataclass
class SyncBackoff:
    """When ``sync`` may next send a worker each adapter it failed to load there: after ``first``
    seconds, doubling at each failure up to ``cap`` (the worker's files may be mended, but reading
    and refusing the same adapter at every poll is wasted work). ``clear`` starts over."""

    first: float = 1.0
    cap: float = 30.0
    _failed: dict[str, tuple[float, float, str]] = field(default_factory=dict)   # name: (next try, wait, why)

    def waiting(self, name: str, now: float) -> str | None:
        """Why ``name`` failed last, while its next try is not due; else None."""
        entry = self._failed.get(name)
        return entry[2] if entry is not None and now < entry[0] else None

    def failed(self, name: str, now: float, why: str) -> None:
        previous = self._failed.get(name)
        wait = self.first if previous is None else min(2 * previous[1], self.cap)
        self._failed[name] = (now + wait, wait, why)

    def loaded(self, name: str) -> None:
        self._failed.pop(name, None)

    def clear(self) -> None:
        self._failed.clear()


class LoRAWorker(Worker, Protocol):
    loras: set[str]     # the runtime adapters it is known to hold
    lora_error: str | None   # why the last sync of those left some out
    lora_backoff: SyncBackoff


def _refusal(worker: LoRAWorker, err: grpc.aio.AioRpcError) -> BackendError:
    return BackendError(failure(worker, err), 400 if err.code() in REFUSALS else 503)


def _log_failures(what: str, workers: list[LoRAWorker], results: list[object]) -> None:
    """Log the failed undos (NOT_FOUND: a worker without the adapter had nothing to undo)."""
    for worker, result in zip(workers, results):
        if is_error(result) and result.code() != grpc.StatusCode.NOT_FOUND:
            logger.error("%s on %s worker %s failed: %s", what, worker.role, worker.address, result.details())


async def load_everywhere(workers: list[LoRAWorker], name: str, path: str, timeout: float) -> RuntimeAdapter:
    """Load adapter ``name`` from ``path`` on every worker of ``workers``, or on none."""
    request = common_pb2.LoadLoRARequest(name=name, path=path)
    results = await gather_replies([w.stub.LoadLoRA(request, timeout=timeout) for w in workers])
    failed = [(w, r) for w, r in zip(workers, results) if is_error(r)]
    digests = sorted({r.digest for r in results if not is_error(r)})
    if not failed and len(digests) == 1:
        for worker in workers:
            worker.loras.add(name)
            worker.lora_backoff.loaded(name)
        return RuntimeAdapter(name, path, digests[0])
    error = _refusal(*failed[0]) if failed else BackendError(
        f"the workers read different files at {path} (digests {', '.join(digests)})", 400)
    # Undo where it loaded, and where it may have (no answer); not where it was loaded before.
    undo = [w for w, r in zip(workers, results) if (r.code() not in REFUSALS if is_error(r) else not r.already_loaded)]
    unload = common_pb2.UnloadLoRARequest(name=name)
    undone = await gather_replies([w.stub.UnloadLoRA(unload, timeout=timeout) for w in undo])
    _log_failures(f"undoing the load of LoRA adapter {name!r}", undo, undone)
    raise error


async def unload_everywhere(workers: list[LoRAWorker], name: str, timeout: float) -> None:
    """Unload adapter ``name`` from every worker of ``workers``, or from none."""
    request = common_pb2.UnloadLoRARequest(name=name)
    results = await gather_replies([w.stub.UnloadLoRA(request, timeout=timeout) for w in workers])
    for worker, result in zip(workers, results):
        if is_error(result) and result.code() not in REFUSALS:
            worker.loras.discard(name)      # it may hold it or not: ``sync`` finds out
    failed = [(w, r) for w, r in zip(workers, results) if is_error(r) and r.code() != grpc.StatusCode.NOT_FOUND]
    if not failed:
        for worker in workers:
            worker.loras.discard(name)
        return
    redo = [(w, r) for w, r in zip(workers, results) if not is_error(r)]
    redone = await gather_replies([
        w.stub.LoadLoRA(common_pb2.LoadLoRARequest(name=name, path=r.path, digest=r.digest), timeout=timeout)
        for w, r in redo])
    _log_failures(f"undoing the unload of LoRA adapter {name!r}", [w for w, _ in redo], redone)
    for (worker, _), result in zip(redo, redone):
        if is_error(result):
            worker.loras.discard(name)
    raise _refusal(*failed[0])


async def sync(worker: LoRAWorker, adapters: list[RuntimeAdapter], timeout: float, now: float) -> str | None:
    """Load onto ``worker`` each of ``adapters`` it is not known to hold, with its digest (the same
    weights or none), but those that failed there and are not due again (``now``: monotonic time);
    the failures' messages (the worker goes without those adapters), or None."""
    failures = []
    for adapter in adapters:
        if adapter.name in worker.loras:
            continue
        if (why := worker.lora_backoff.waiting(adapter.name, now)) is not None:
            failures.append(why)
            continue
        request = common_pb2.LoadLoRARequest(name=adapter.name, path=adapter.path, digest=adapter.digest)
        try:
            await worker.stub.LoadLoRA(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            why = f"LoRA adapter {adapter.name!r} did not load there: {err.code().name}: {err.details()}"
            worker.lora_backoff.failed(adapter.name, now, why)
            failures.append(why)
            continue
        worker.loras.add(adapter.name)
        worker.lora_backoff.loaded(adapter.name)
    return "; ".join(failures) or None
