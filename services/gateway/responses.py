"""OpenAI's Responses API (``POST /v1/responses``) over the chat completions.

A request becomes a chat completion (``ResponsesRequest.chat_request``: the instructions as the
system message, the input items as messages, ``text.format`` as the response format); its answer
becomes a ``ResponseObject`` (``from_chat``), with a reasoning model's thinking (``--reasoning-parser``)
as a reasoning item before the message, and each tool call as a ``function_call`` item after it.
Streamed, the chat chunks become the Responses events (``ResponseEvents``): ``response.created``,
``response.in_progress``, then for each output item ``response.output_item.added``, its deltas
(a text's ``response.content_part.added``, ``response.reasoning_text.delta`` or
``response.output_text.delta``; a call's ``response.function_call_arguments.delta``) and the
matching ``.done`` events, and last ``response.completed`` (``response.incomplete`` when cut at
``max_output_tokens``). A failure after the stream began is an ``error`` event. A stored
response (``store``) is kept once answered (``response_store``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from baton.services.gateway.protocol import (
    DONE, ChatCompletionResponse, ChatLogprobToken, InputTokensDetails, IncompleteDetails, OutputFunctionCall, OutputMessage,
    OutputReasoning, OutputText, ReasoningText, ResponseObject, ResponsesRequest, ResponseUsage,
)


_FIELD_NAMES = {"messages": "input", "max_completion_tokens": "max_output_tokens"}


def field_name(chat_field: str | None) -> str | None:
    """A chat request's field as the Responses request names it (errors name the client's field)."""
    return _FIELD_NAMES.get(chat_field, chat_field)


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _shell(req: ResponsesRequest, response_id: str, status: str) -> ResponseObject:
    return ResponseObject(id=response_id, status=status, model=req.model, instructions=req.instructions,
                          max_output_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
                          text=req.text, metadata=req.metadata, user=req.user, tools=req.tools,
                          tool_choice=req.tool_choice or "auto", parallel_tool_calls=req.parallel_tool_calls,
                          store=req.store, previous_response_id=req.previous_response_id, truncation=req.truncation,
                          top_logprobs=req.top_logprobs)


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> ResponseUsage:
    return ResponseUsage(input_tokens=prompt_tokens, input_tokens_details=InputTokensDetails(cached_tokens=cached_tokens),
                         output_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


def _finish(response: ResponseObject, finish_reason: str | None) -> ResponseObject:
    response.status = _status(finish_reason)
    if finish_reason == "length":
        response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
    return response


def from_chat(req: ResponsesRequest, response_id: str, chat: ChatCompletionResponse) -> ResponseObject:
    """The response a finished chat completion (one choice) makes."""
    choice = chat.choices[0]
    status = _status(choice.finish_reason)
    response = _shell(req, response_id, status)
    if choice.message.reasoning:
        response.output.append(OutputReasoning(id=_item_id("rs"), status=status,
                                               content=[ReasoningText(text=choice.message.reasoning)]))
    calls = choice.message.tool_calls
    if choice.message.content or not calls:
        logprobs = choice.logprobs.content if choice.logprobs is not None and choice.logprobs.content else []
        response.output.append(OutputMessage(id=_item_id("msg"), status=status,
                                             content=[OutputText(text=choice.message.content or "", logprobs=logprobs)]))
    response.output += [OutputFunctionCall(id=_item_id("fc"), call_id=c.id, name=c.function.name,
                                           arguments=c.function.arguments, status=status) for c in calls]
    usage = chat.usage
    details = usage.prompt_tokens_details
    response.usage = _usage(usage.prompt_tokens, usage.completion_tokens, details.cached_tokens if details else 0)
    return _finish(response, choice.finish_reason)


class ResponseEvents:
    """The Responses events of one streamed chat completion, chunk by chunk (the chunks as the
    chat stream sends them: decoded JSON)."""

    def __init__(self, req: ResponsesRequest, response_id: str) -> None:
        self.response = _shell(req, response_id, "in_progress")
        self._sequence = 0
        self._open: OutputReasoning | OutputMessage | OutputFunctionCall | None = None   # the item deltas now go to
        self._finish_reason: str | None = None

    def start(self) -> list[dict[str, Any]]:
        snapshot = self.response.model_dump(mode="json")
        return [self._event("response.created", response=snapshot), self._event("response.in_progress", response=snapshot)]

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        if chunk.get("usage"):
            u = chunk["usage"]
            cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            self.response.usage = _usage(u["prompt_tokens"], u["completion_tokens"], cached)
        for choice in chunk.get("choices", []):
            delta = choice.get("delta") or {}
            if delta.get("reasoning"):
                events += self._text("reasoning", delta["reasoning"])
            if delta.get("content"):
                events += self._text("message", delta["content"], (choice.get("logprobs") or {}).get("content") or [])
            for piece in delta.get("tool_calls") or []:
                events += self._call_piece(piece)
            self._finish_reason = choice.get("finish_reason") or self._finish_reason
        return events

    def finish(self) -> list[dict[str, Any]]:
        """The events that close the output; the response is finished then (``completed`` sends it)."""
        events = self._close()
        if not any(isinstance(item, (OutputMessage, OutputFunctionCall)) for item in self.response.output):
            events += self._text("message", "") + self._close()     # nothing said: an empty message
        _finish(self.response, self._finish_reason)
        return events

    def completed(self) -> dict[str, Any]:
        """The last event: the finished response."""
        kind = "response.incomplete" if self.response.status == "incomplete" else "response.completed"
        return self._event(kind, response=self.response.model_dump(mode="json"))

    def error(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """A failure after the stream began (the chat stream's error event)."""
        error = body.get("error", {})
        return [self._event("error", code=error.get("code"), message=error.get("message", "internal error"),
                            param=error.get("param"))]

    def _text(self, kind: str, text: str, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """A text delta of the ``kind`` item ("reasoning" or "message", opened where another is),
        a message's with its tokens' ``logprobs`` (the chat chunk's)."""
        events = []
        if self._open is None or self._open.type != kind:
            events += self._close()
            index = len(self.response.output)
            if kind == "reasoning":
                self._open = OutputReasoning(id=_item_id("rs"), status="in_progress", content=[])
                part: ReasoningText | OutputText = ReasoningText(text="")
            else:
                self._open = OutputMessage(id=_item_id("msg"), status="in_progress", content=[])
                part = OutputText(text="")
            events.append(self._event("response.output_item.added", output_index=index, item=self._open.model_dump(mode="json")))
            self._open.content.append(part)
            self.response.output.append(self._open)
            events.append(self._event("response.content_part.added", item_id=self._open.id, output_index=index,
                                      content_index=0, part=part.model_dump(mode="json")))
        self._open.content[0].text += text
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {}
        if kind == "message":
            self._open.content[0].logprobs += [ChatLogprobToken.model_validate(t) for t in logprobs or []]
            extra = {"logprobs": logprobs or []}
        events.append(self._event(name, item_id=self._open.id, output_index=len(self.response.output) - 1,
                                  content_index=0, delta=text, **extra))
        return events

    def _call_piece(self, piece: dict[str, Any]) -> list[dict[str, Any]]:
        """A streamed tool-call piece: the first (with an id) opens a function_call item."""
        events = []
        function = piece.get("function") or {}
        if piece.get("id"):
            events += self._close()
            self._open = OutputFunctionCall(id=_item_id("fc"), call_id=piece["id"], name=function.get("name", ""),
                                            arguments="", status="in_progress")
            self.response.output.append(self._open)
            events.append(self._event("response.output_item.added", output_index=len(self.response.output) - 1,
                                      item=self._open.model_dump(mode="json")))
        arguments = function.get("arguments") or ""
        if arguments and isinstance(self._open, OutputFunctionCall):
            self._open.arguments += arguments
            events.append(self._event("response.function_call_arguments.delta", item_id=self._open.id,
                                      output_index=len(self.response.output) - 1, delta=arguments))
        return events

    def _close(self) -> list[dict[str, Any]]:
        item, self._open = self._open, None
        if item is None:
            return []
        index = self.response.output.index(item)
        item.status = _status(self._finish_reason)
        if isinstance(item, OutputFunctionCall):
            return [
                self._event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                            arguments=item.arguments),
                self._event("response.output_item.done", output_index=index, item=item.model_dump(mode="json")),
            ]
        text = item.content[0].text
        done = "response.reasoning_text.done" if item.type == "reasoning" else "response.output_text.done"
        extra = {} if item.type == "reasoning" else {"logprobs": [t.model_dump(mode="json") for t in item.content[0].logprobs]}
        return [
            self._event(done, item_id=item.id, output_index=index, content_index=0, text=text, **extra),
            self._event("response.content_part.done", item_id=item.id, output_index=index, content_index=0,
                        part=item.content[0].model_dump(mode="json")),
            self._event("response.output_item.done", output_index=index, item=item.model_dump(mode="json")),
        ]

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event


async def stream_events(
    req: ResponsesRequest, response_id: str, chat_stream: AsyncIterator[str],
    answered: Callable[[ResponseObject], Awaitable[bool]],
) -> AsyncGenerator[dict[str, str], None]:
    """The Responses SSE events (``event:`` and ``data:``) of a streamed chat completion; the
    finished response goes to ``answered`` (which says whether it is stored) before its last event."""
    events = ResponseEvents(req, response_id)
    try:
        for event in events.start():
            yield _sse(event)
        async for item in chat_stream:
            if item == DONE:
                break
            chunk = json.loads(item)
            if "error" in chunk:
                for event in events.error(chunk):
                    yield _sse(event)
                return
            for event in events.chunk(chunk):
                yield _sse(event)
        for event in events.finish():
            yield _sse(event)
        events.response.store = await answered(events.response)
        yield _sse(events.completed())
    finally:
        await chat_stream.aclose()


def _sse(event: dict[str, Any]) -> dict[str, str]:
    return {"event": event["type"], "data": json.dumps(event)}
