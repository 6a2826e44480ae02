"""Stored Responses API responses (``store``, the default), so that a later request can go on
from one (``previous_response_id``) and a client can read or delete it (``GET`` / ``DELETE
/v1/responses/{id}``).

Each entry keeps the response as answered and the conversation it closes: the input items the
response answered (a previous response's conversation first), then its own output as input items
(its message as an assistant message, its calls as ``function_call`` items; reasoning is not
fed back, as chat templates drop it). A request that goes on from a response is that
conversation followed by its own input; as in OpenAI's API, the earlier ``instructions`` and
``tools`` do not carry over.

The store is this gateway's memory, bounded in bytes (``--responses-store-mb``): past it, the
least recently used entries go first. Gateways behind one load balancer do not share it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from baton.services.gateway.protocol import (
    InputItem, OutputFunctionCall, OutputMessage, ResponseFunctionCallItem, ResponseInputMessage, ResponseObject,
)


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
    size: int                        # bytes, as JSON


class ResponseStore:
    """Responses by id, at most ``max_bytes`` of them (as JSON), least recently used out first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: ResponseObject, answered: list[InputItem]) -> bool:
        """Keep ``response`` with the input items it ``answered``; False where it alone is over
        the bound (nothing is kept then)."""
        conversation = [*answered, *output_as_input(response)]
        size = len(response.model_dump_json()) + sum(len(item.model_dump_json()) for item in conversation)
        if size > self.max_bytes:
            return False
        self.delete(response.id)
        self._entries[response.id] = StoredResponse(response, conversation, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.size
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self.bytes -= entry.size
        return True
