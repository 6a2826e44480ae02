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

import redis.asyncio as aioredis

from baton.services.gateway.metrics import REDIS_ERRORS
from baton.services.redis_client import REDIS_ERRORS_CAUGHT, OutageLog, connect
from baton.services.redis_keys import WORKER_PREFIX, WorkerRecord, block_key, lora_key

logger = logging.getLogger(__name__)

DEFAULT_MAX_BLOCKS = 512
SCAN_COUNT = 256


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
        if not hashes or not runs or not self._may_try():
            return runs
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for block_hash in hashes:
                    pipe.smembers(block_key(self.fingerprint, block_hash))
                holders_per_block = await pipe.execute()
        except REDIS_ERRORS_CAUGHT as err:
            self._failed(err)
            return runs
        self._outage.ok()
        remaining = set(runs)
        for holders in holders_per_block:
            remaining &= {_text(member) for member in holders}
            if not remaining:
                break
            for worker_id in remaining:
                runs[worker_id] += 1
        return runs

    async def live_workers(self) -> list[WorkerRecord]:
        """Registered workers that serve this gateway's model and block size;
        during an outage, the last list read."""
        if not self._may_try():
            return list(self._workers)
        try:
            keys = [key async for key in self._redis.scan_iter(match=f"{WORKER_PREFIX}*", count=SCAN_COUNT)]
            raws = await self._redis.mget(keys) if keys else []
        except REDIS_ERRORS_CAUGHT as err:
            self._failed(err)
            return list(self._workers)
        self._outage.ok()
        records = (self._accept(_text(key), raw) for key, raw in zip(keys, raws) if raw is not None)
        self._workers = [record for record in records if record is not None]
        return list(self._workers)

    async def runtime_loras(self) -> dict[str, tuple[str, str]] | None:
        """The runtime LoRA adapters gateways of this model loaded, name: (path, digest); None
        when Redis does not answer. An unreadable entry is skipped."""
        if not self._may_try():
            return None
        try:
            raw = await self._redis.hgetall(lora_key(self.fingerprint))
        except REDIS_ERRORS_CAUGHT as err:
            self._failed(err)
            return None
        self._outage.ok()
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
        entry = json.dumps({"path": path, "digest": digest})
        return await self._write(lambda r: r.hset(lora_key(self.fingerprint), name, entry))

    async def delete_lora(self, name: str) -> bool:
        """Forget a runtime LoRA adapter; False when Redis does not answer."""
        return await self._write(lambda r: r.hdel(lora_key(self.fingerprint), name))

    async def _write(self, command: Callable[[aioredis.Redis], Awaitable[object]]) -> bool:
        if not self._may_try():
            return False
        try:
            await command(self._redis)
        except REDIS_ERRORS_CAUGHT as err:
            self._failed(err)
            return False
        self._outage.ok()
        return True

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
