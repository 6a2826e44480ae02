"""Redis client helpers shared by the workers' ``IndexPublisher`` and the
gateway's ``PrefixIndex``: a client that fails fast, and outage logging."""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

REDIS_ERRORS_CAUGHT = (aioredis.RedisError, OSError)


def connect(url: str, timeout_s: float) -> aioredis.Redis:
    """A client with short socket timeouts and no retries: callers own the policy."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


class OutageLog:
    """One warning when Redis stops answering, one info line when it is back."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log = log
        self._what = what
        self.down = False

    def failed(self, err: BaseException) -> None:
        if not self.down:
            self._log.warning("Redis unavailable (%s): %s: %s", self._what, type(err).__name__, err)
        self.down = True

    def ok(self) -> None:
        if self.down:
            self._log.info("Redis is back (%s)", self._what)
        self.down = False
