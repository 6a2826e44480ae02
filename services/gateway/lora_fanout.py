"""LoRA adapters loaded and unloaded while serving, on every worker at once (``GrpcBackend``).

A load goes to every worker given (``LoadLoRA``, one deadline each) and succeeds where all of
them hold the adapter afterwards, read from the same files (their digests agree); else it is
undone where it was done, or may have been (a worker that did not answer in time), and the
first refusal is the caller's ``BackendError``. An unload goes the same way (``UnloadLoRA``; a
worker without the adapter has nothing to do), undone by loading the adapter again from the
path and digest each worker reports. Each worker's ``loras`` holds the runtime adapters it is
known to hold: a worker the gateway first sees, or sees again after a silence or a restart,
gets them through ``sync`` before routing uses it (and is not routed requests under one it could
not load). Undoing is best effort: a worker that cannot undo keeps the outcome (logged), which
never serves other weights under a name, since a load under a loaded name with other weights is
refused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc

from baton.protos import common_pb2
from baton.services.gateway.backend import BackendError

logger = logging.getLogger(__name__)

# A worker's answer saying no (the adapter, the name or the worker's state is the reason): 400.
REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION)
ReplyT = TypeVar("ReplyT")


@dataclass(frozen=True)
class RuntimeAdapter:
    """An adapter loaded through the gateway: where from, and its weights' digest."""

    name: str
    path: str
    digest: str


class LoRAWorker(Protocol):
    address: str
    role: str
    stub: Any           # a PrefillStub or a DecodeStub: both have LoadLoRA and UnloadLoRA
    loras: set[str]     # the runtime adapters it is known to hold


async def _gather(calls: list[Awaitable[ReplyT]]) -> list[ReplyT | grpc.aio.AioRpcError]:
    """Each call's reply, or its RPC error; any other exception propagates."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, grpc.aio.AioRpcError):
            raise result
    return results


def _failed(result: object) -> bool:
    return isinstance(result, grpc.aio.AioRpcError)


def _refusal(worker: LoRAWorker, err: grpc.aio.AioRpcError) -> BackendError:
    status = 400 if err.code() in REFUSALS else 503
    return BackendError(f"{worker.role} worker {worker.address}: {err.code().name}: {err.details()}", status)


def _log_failures(what: str, workers: list[LoRAWorker], results: list[object]) -> None:
    """Log the failed undos (NOT_FOUND: a worker without the adapter had nothing to undo)."""
    for worker, result in zip(workers, results):
        if _failed(result) and result.code() != grpc.StatusCode.NOT_FOUND:
            logger.error("%s on %s worker %s failed: %s", what, worker.role, worker.address, result.details())


async def load_everywhere(workers: list[LoRAWorker], name: str, path: str, timeout: float) -> RuntimeAdapter:
    """Load adapter ``name`` from ``path`` on every worker of ``workers``, or on none."""
    request = common_pb2.LoadLoRARequest(name=name, path=path)
    results = await _gather([w.stub.LoadLoRA(request, timeout=timeout) for w in workers])
    failed = [(w, r) for w, r in zip(workers, results) if _failed(r)]
    digests = sorted({r.digest for r in results if not _failed(r)})
    if not failed and len(digests) == 1:
        for worker in workers:
            worker.loras.add(name)
        return RuntimeAdapter(name, path, digests[0])
    error = _refusal(*failed[0]) if failed else BackendError(
        f"the workers read different files at {path} (digests {', '.join(digests)})", 400)
    # Undo where it loaded, and where it may have (no answer); not where it was loaded before.
    undo = [w for w, r in zip(workers, results) if (r.code() not in REFUSALS if _failed(r) else not r.already_loaded)]
    unload = common_pb2.UnloadLoRARequest(name=name)
    undone = await _gather([w.stub.UnloadLoRA(unload, timeout=timeout) for w in undo])
    _log_failures(f"undoing the load of LoRA adapter {name!r}", undo, undone)
    raise error


async def unload_everywhere(workers: list[LoRAWorker], name: str, timeout: float) -> None:
    """Unload adapter ``name`` from every worker of ``workers``, or from none."""
    request = common_pb2.UnloadLoRARequest(name=name)
    results = await _gather([w.stub.UnloadLoRA(request, timeout=timeout) for w in workers])
    for worker, result in zip(workers, results):
        if _failed(result) and result.code() not in REFUSALS:
            worker.loras.discard(name)      # it may hold it or not: ``sync`` finds out
    failed = [(w, r) for w, r in zip(workers, results) if _failed(r) and r.code() != grpc.StatusCode.NOT_FOUND]
    if not failed:
        for worker in workers:
            worker.loras.discard(name)
        return
    redo = [(w, r) for w, r in zip(workers, results) if not _failed(r)]
    redone = await _gather([
        w.stub.LoadLoRA(common_pb2.LoadLoRARequest(name=name, path=r.path, digest=r.digest), timeout=timeout)
        for w, r in redo])
    _log_failures(f"undoing the unload of LoRA adapter {name!r}", [w for w, _ in redo], redone)
    for (worker, _), result in zip(redo, redone):
        if _failed(result):
            worker.loras.discard(name)
    raise _refusal(*failed[0])


async def sync(worker: LoRAWorker, adapters: list[RuntimeAdapter], timeout: float) -> str | None:
    """Load onto ``worker`` each of ``adapters`` it is not known to hold, with its digest (the same
    weights or none); the failures' messages (the worker goes without those adapters), or None."""
    failures = []
    for adapter in adapters:
        if adapter.name in worker.loras:
            continue
        request = common_pb2.LoadLoRARequest(name=adapter.name, path=adapter.path, digest=adapter.digest)
        try:
            await worker.stub.LoadLoRA(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            failures.append(f"LoRA adapter {adapter.name!r} did not load there: {err.code().name}: {err.details()}")
            continue
        worker.loras.add(adapter.name)
    return "; ".join(failures) or None
