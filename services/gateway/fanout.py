"""RPCs the gateway sends to many workers at once (``GrpcBackend``): each worker's reply or its
RPC error, gathered; a failure named by its worker, status and message. The LoRA adapters'
loads and unloads use them (``lora_fanout``), and so does the prefix-cache reset here: every
worker drops its cached blocks between engine steps (``ResetPrefixCache``), and those that
cannot are named with their reasons (the others stay reset: a reset has nothing to undo).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

import grpc

from baton.protos import common_pb2
from baton.services.gateway.backend import BackendError

logger = logging.getLogger(__name__)
ReplyT = TypeVar("ReplyT")


class Worker(Protocol):
    address: str
    role: str
    stub: Any           # a PrefillStub or a DecodeStub: both have the RPCs sent to every worker


async def gather_replies(calls: list[Awaitable[ReplyT]]) -> list[ReplyT | grpc.aio.AioRpcError]:
    """Each call's reply, or its RPC error; any other exception propagates."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, grpc.aio.AioRpcError):
            raise result
    return results


def is_error(result: object) -> bool:
    return isinstance(result, grpc.aio.AioRpcError)


def failure(worker: Worker, err: grpc.aio.AioRpcError) -> str:
    """A worker's failed RPC, as the gateway's answers name it."""
    return f"{worker.role} worker {worker.address}: {err.code().name}: {err.details()}"


async def reset_prefix_cache(workers: list[Worker], timeout: float) -> None:
    """``ResetPrefixCache`` on every worker of ``workers`` (a deadline of ``timeout`` each);
    ``BackendError`` naming each one that did not answer it."""
    request = common_pb2.ResetPrefixCacheRequest()
    results = await gather_replies([w.stub.ResetPrefixCache(request, timeout=timeout) for w in workers])
    failures = [failure(w, r) for w, r in zip(workers, results) if is_error(r)]
    if failures:
        raise BackendError("; ".join(failures), 503)
    logger.info("prefix cache reset on %d workers: %d cached blocks freed, %d held by requests uncached",
                len(workers), sum(r.freed_blocks for r in results), sum(r.held_blocks for r in results))
