"""The gateway's side of Redis: prefix hits, the worker registry, and the runtime LoRA adapters.

``longest_prefixes`` asks, in one pipelined round trip, which workers hold each
of a prompt's leading block hashes (SMEMBERS per block key, at most
``max_blocks`` of them) and returns, per worker, the length of the run of
leading blocks it holds. ``live_workers`` lists the registry (SCAN + MGET),
skipping records whose model fingerprint or block size disagree with the
gateway's. ``runtime_loras`` reads the adapters gateways loaded while serving
(``put_lora`` and ``delete_lora`` write them).

Redis is advisory. When it does not answer (refused, timed out) every call still
returns: no hits, the last registry read, no adapters read (None) or none written
(False). Each failure counts in ``REDIS_ERRORS``; one warning is logged per outage;
after a failure Redis is left alone for ``retry_after_s`` so a dead or blackholed
server costs requests nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TypeVar

import redis.asyncio as aioredis

from baton.services.gateway.metrics import REDIS_ERRORS
from baton.services.redis_client import REDIS_ERRORS_CAUGHT, OutageLog, connect
from baton.services.redis_keys import WORKER_PREFIX, WorkerRecord, block_key, lora_key

logger = logging.getLogger(__name__)

DEFAULT_MAX_BLOCKS = 512
SCAN_COUNT = 256
# HDEL KEYS[1] ARGV[1] where its entry is still ARGV[2], in one step.
DELETE_IF_HELD = ("if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then "
                  "return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0")
_NO_ANSWER = object()   # ``PrefixIndex._attempt``'s result where Redis did not answer
T = TypeVar("T")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _lora_entry(path: str, digest: str) -> str:
    return json.dumps({"path": path, "digest": digest})


class PrefixIndex:
    def __init__(
        self,
        redis_client_or_url: aioredis.Redis | str,
        fingerprint: str,
        *,
        block_size: int | None = None,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        timeout_s: float = 0.25,
        retry_after_s: float = 1.0,
    ) -> None:
        """``block_size``: registry records with another block size are skipped
        (None: accept any). ``timeout_s`` applies when given a URL."""
        if isinstance(redis_client_or_url, str):
            self._redis = connect(redis_client_or_url, timeout_s)
        else:
            self._redis = redis_client_or_url
        self._delete_if_held = self._redis.register_script(DELETE_IF_HELD)
        self.fingerprint = fingerprint
        self.block_size = block_size
        self.max_blocks = max_blocks
        self._retry_after_s = retry_after_s
        self._skip_until = 0.0
        self._outage = OutageLog(logger, "gateway prefix index")
        self._workers: list[WorkerRecord] = []
        self._rejected: set[str] = set()

    async def longest_prefixes(self, block_hashes: Sequence[int], worker_ids: Collection[str]) -> dict[str, int]:
        """Per worker id, how many of the leading ``block_hashes`` (up to
        ``max_blocks``) it holds, counting from the first; all 0 without Redis."""
        runs = dict.fromkeys(worker_ids, 0)
        hashes = list(block_hashes[: self.max_blocks])
        if not hashes or not runs:
            return runs

        async def holders(r: aioredis.Redis) -> list[set[bytes]]:
            async with r.pipeline(transaction=False) as pipe:
                for block_hash in hashes:
                    pipe.smembers(block_key(self.fingerprint, block_hash))
                return await pipe.execute()

        holders_per_block = await self._attempt(holders)
        if holders_per_block is _NO_ANSWER:
            return runs
        remaining = set(runs)
        for block_holders in holders_per_block:
            remaining &= {_text(member) for member in block_holders}
            if not remaining:
                break
            for worker_id in remaining:
                runs[worker_id] += 1
        return runs

    async def live_workers(self) -> list[WorkerRecord]:
        """Registered workers that serve this gateway's model and block size;
        during an outage, the last list read."""

        async def registry(r: aioredis.Redis) -> tuple[list[bytes], list[bytes | None]]:
            keys = [key async for key in r.scan_iter(match=f"{WORKER_PREFIX}*", count=SCAN_COUNT)]
            return keys, (await r.mget(keys) if keys else [])

        read = await self._attempt(registry)
        if read is _NO_ANSWER:
            return list(self._workers)
        keys, raws = read
        records = (self._accept(_text(key), raw) for key, raw in zip(keys, raws) if raw is not None)
        self._workers = [record for record in records if record is not None]
        return list(self._workers)

    async def runtime_loras(self) -> dict[str, tuple[str, str]] | None:
        """The runtime LoRA adapters gateways of this model loaded, name: (path, digest); None
        when Redis does not answer. An unreadable entry is skipped."""
        raw = await self._attempt(lambda r: r.hgetall(lora_key(self.fingerprint)))
        if raw is _NO_ANSWER:
            return None
        adapters = {}
        for name, value in raw.items():
            try:
                entry = json.loads(value)
                adapters[_text(name)] = (str(entry["path"]), str(entry["digest"]))
            except (ValueError, KeyError, TypeError):
                self._reject(f"{lora_key(self.fingerprint)}[{_text(name)}]", "unreadable adapter entry")
        return adapters

    async def put_lora(self, name: str, path: str, digest: str) -> bool:
        """Record a runtime LoRA adapter for the other gateways; False when Redis does not answer."""
        entry = _lora_entry(path, digest)
        return await self._attempt(lambda r: r.hset(lora_key(self.fingerprint), name, entry)) is not _NO_ANSWER

    async def delete_lora(self, name: str, held: tuple[str, str] | None = None) -> bool:
        """Forget a runtime LoRA adapter: any, or only while Redis records it as ``held`` (path, digest),
        so that a late write does not forget another gateway's newer load. False when Redis does not answer."""
        key = lora_key(self.fingerprint)
        if held is None:
            return await self._attempt(lambda r: r.hdel(key, name)) is not _NO_ANSWER
        entry = _lora_entry(*held)
        deleted = await self._attempt(lambda r: self._delete_if_held(keys=[key], args=[name, entry], client=r))
        return deleted is not _NO_ANSWER

    async def _attempt(self, command: Callable[[aioredis.Redis], Awaitable[T]]) -> T | object:
        """``command``'s result, or ``_NO_ANSWER`` where Redis does not answer (counted, logged once
        an outage, then left alone for ``retry_after_s``) or is being left alone."""
        if not self._may_try():
            return _NO_ANSWER
        try:
            result = await command(self._redis)
        except REDIS_ERRORS_CAUGHT as err:
            self._failed(err)
            return _NO_ANSWER
        self._outage.ok()
        return result

    async def close(self) -> None:
        await self._redis.aclose()

    def _accept(self, key: str, raw: bytes | str) -> WorkerRecord | None:
        try:
            record = WorkerRecord.from_json(raw)
        except (ValueError, KeyError, TypeError) as err:
            self._reject(key, f"unreadable record ({err})")
            return None
        if record.fingerprint != self.fingerprint:
            self._reject(key, f"model fingerprint {record.fingerprint} != gateway's {self.fingerprint}")
            return None
        if self.block_size is not None and record.block_size != self.block_size:
            self._reject(key, f"block size {record.block_size} != gateway's {self.block_size}")
            return None
        if record.role not in ("prefill", "decode"):
            self._reject(key, f"unknown role {record.role!r}")
            return None
        return record

    def _reject(self, key: str, why: str) -> None:
        if key not in self._rejected:
            self._rejected.add(key)
            logger.warning("skipping registered worker %s: %s", key, why)

    def _may_try(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, err: BaseException) -> None:
        REDIS_ERRORS.inc()
        self._outage.failed(err)
        self._skip_until = time.monotonic() + self._retry_after_s
