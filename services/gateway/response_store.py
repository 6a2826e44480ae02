"""Stored Responses API responses (``store``, the default), so that a later request can go on
from one (``previous_response_id``) and a client can read or delete it (``GET`` / ``DELETE
/v1/responses/{id}``).

Each entry keeps the response as answered and the conversation it closes: the input items the
response answered (a previous response's conversation first), then its own output as input items
(its message as an assistant message, its calls as ``function_call`` items; reasoning is not
fed back, as chat templates drop it). A request that goes on from a response is that
conversation followed by its own input; as in OpenAI's API, the earlier ``instructions`` and
``tools`` do not carry over.

Where the gateway has Redis (``--redis-url``), entries live there (``RedisResponseStore``), so
every gateway of the model sees them, whichever one a load balancer sends the next request to;
each expires ``--responses-store-ttl`` seconds after it was stored. Without Redis they live in
this gateway's memory (``MemoryResponseStore``), at most ``--responses-store-mb`` of them, the
least recently used out first. Entries are JSON, read back through the request models: nothing
is unpickled.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import redis.asyncio as aioredis
from pydantic import TypeAdapter

from baton.services.gateway.protocol import (
    APIError, InputItem, OutputFunctionCall, OutputMessage, ResponseFunctionCallItem, ResponseInputMessage,
    ResponseObject,
)
from baton.services.gateway.config import GatewayConfig
from baton.services.redis_client import REDIS_ERRORS_CAUGHT, connect
from baton.services.redis_keys import response_key

logger = logging.getLogger(__name__)
_CONVERSATION = TypeAdapter(list[InputItem])
T = TypeVar("T")


def output_as_input(response: ResponseObject) -> list[InputItem]:
    """A response's output as the input items that would repeat it."""
    items: list[InputItem] = []
    for item in response.output:
        if isinstance(item, OutputMessage):
            items.append(ResponseInputMessage(role="assistant", content="".join(part.text for part in item.content)))
        elif isinstance(item, OutputFunctionCall):
            items.append(ResponseFunctionCallItem(type="function_call", call_id=item.call_id, name=item.name,
                                                  arguments=item.arguments))
    return items


@dataclass
class StoredResponse:
    response: ResponseObject
    conversation: list[InputItem]    # the input it answered, then its output

    @classmethod
    def of(cls, response: ResponseObject, answered: list[InputItem]) -> StoredResponse:
        return cls(response, [*answered, *output_as_input(response)])

    def to_json(self) -> str:
        return json.dumps({"response": self.response.model_dump(mode="json"),
                           "conversation": _CONVERSATION.dump_python(self.conversation, mode="json")})

    @classmethod
    def from_json(cls, raw: str | bytes) -> StoredResponse:
        data = json.loads(raw)
        return cls(ResponseObject.model_validate(data["response"]), _CONVERSATION.validate_python(data["conversation"]))


class ResponseStore(Protocol):
    async def put(self, response: ResponseObject, answered: list[InputItem]) -> bool:
        """Keep ``response`` with the input items it ``answered``; whether it was kept."""

    async def get(self, response_id: str) -> StoredResponse | None: ...

    async def delete(self, response_id: str) -> bool: ...

    async def close(self) -> None: ...


def for_config(config: GatewayConfig) -> ResponseStore:
    """Redis's store where the gateway has Redis, else its own memory's."""
    if config.redis_url:
        return RedisResponseStore(connect(config.redis_url, config.control_timeout_s), config.responses_store_ttl_s)
    return MemoryResponseStore(config.responses_store_mb << 20)


class MemoryResponseStore:
    """Responses by id, at most ``max_bytes`` of them (as JSON), least recently used out first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[StoredResponse, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def put(self, response: ResponseObject, answered: list[InputItem]) -> bool:
        """False, keeping nothing, where this one alone is over the bound."""
        entry = StoredResponse.of(response, answered)
        size = len(entry.to_json())
        if size > self.max_bytes:
            return False
        await self.delete(response.id)
        self._entries[response.id] = (entry, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
        return True

    async def get(self, response_id: str) -> StoredResponse | None:
        if response_id not in self._entries:
            return None
        self._entries.move_to_end(response_id)
        return self._entries[response_id][0]

    async def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.bytes -= entry[1]
        return entry is not None

    async def close(self) -> None:
        self._entries.clear()
        self.bytes = 0


class RedisResponseStore:
    """Responses by id in Redis (``baton:response:{id}``), each kept ``ttl_s`` seconds. A response
    Redis does not take is not stored (logged); reading or deleting while Redis does not answer
    is a 503."""

    def __init__(self, client: aioredis.Redis, ttl_s: int) -> None:
        self._redis = client
        self.ttl_s = ttl_s

    async def put(self, response: ResponseObject, answered: list[InputItem]) -> bool:
        try:
            await self._redis.set(response_key(response.id), StoredResponse.of(response, answered).to_json(), ex=self.ttl_s)
        except REDIS_ERRORS_CAUGHT as err:
            logger.warning("response %s not stored: Redis does not answer (%s: %s)", response.id, type(err).__name__, err)
            return False
        return True

    async def get(self, response_id: str) -> StoredResponse | None:
        raw = await self._ask(self._redis.get(response_key(response_id)))
        return None if raw is None else StoredResponse.from_json(raw)

    async def delete(self, response_id: str) -> bool:
        return bool(await self._ask(self._redis.delete(response_key(response_id))))

    async def close(self) -> None:
        await self._redis.aclose()

    @staticmethod
    async def _ask(command: Awaitable[T]) -> T:
        try:
            return await command
        except REDIS_ERRORS_CAUGHT as err:
            raise APIError(f"stored responses are unavailable: Redis does not answer ({type(err).__name__})",
                           status=503, type="service_unavailable_error") from err
