"""Server-sent event streams, primed to their first event so that a failure before anything
was sent is still a plain HTTP error (``PrimedStream``), and how a failure during generation
reaches the client (``as_api_error``; within a stream, an ``error_event``) and the log (a
server-side one, ``logged_api_error``, wherever it reaches the client)."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator

from baton.services.gateway.backend import BackendError
from baton.services.gateway.protocol import APIError

logger = logging.getLogger(__name__)


def as_api_error(exc: Exception) -> APIError:
    """How a failure during generation reaches the client."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BackendError) and exc.status == 404:    # a worker lacks the request's LoRA adapter
        return APIError(exc.message, status=404, param="model", code="model_not_found")
    if isinstance(exc, BackendError):
        kind = "invalid_request_error" if exc.status == 400 else "service_unavailable_error"
        return APIError(exc.message, status=exc.status, type=kind)
    return APIError("internal error while generating", status=500, type="internal_server_error")


def logged_api_error(exc: Exception) -> APIError:
    """``as_api_error``; a server-side failure that is not one already is logged, whether it becomes
    the HTTP error or, tokens already streamed, an ``error_event``."""
    error = as_api_error(exc)
    if error.status >= 500 and not isinstance(exc, APIError):
        logger.error("request failed: %s", exc, exc_info=error.status == 500)
    return error


def error_event(exc: Exception) -> str:
    return logged_api_error(exc).body().model_dump_json()


SSEItem = str | dict[str, str]   # an event's data, or its data and name ({"event": ..., "data": ...})


class PrimedStream:
    """An SSE event stream already run up to its first event, so that an error
    before anything was sent still becomes a proper HTTP error. ``aclose()``
    ends the generation (aborting it on the workers if it is still running)."""

    def __init__(self, stream: AsyncGenerator[SSEItem, None], first: SSEItem | None) -> None:
        self._stream = stream
        self._first = first

    @classmethod
    async def start(cls, stream: AsyncGenerator[SSEItem, None]) -> PrimedStream:
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            first = None
        return cls(stream, first)

    def __aiter__(self) -> PrimedStream:
        return self

    async def __anext__(self) -> SSEItem:
        if self._first is not None:
            item, self._first = self._first, None
            return item
        return await anext(self._stream)

    async def aclose(self) -> None:
        await self._stream.aclose()
