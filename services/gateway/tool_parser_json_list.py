"""Tool-call parsers for answers that are a JSON list of calls, ``[{"name": ..., "arguments":
{...}}, ...]``, after a tag, as vLLM's read them:

* ``granite`` (IBM Granite 3.x): after an optional ``<|tool_call|>`` (Granite 3.0) or
  ``<tool_call>`` (3.1 and later);
* ``phi4_mini_json`` (Phi-4-mini): after ``functools``, which it needs.

Streamed as ``tool_parsers`` streams the others: each call that opens ``{"name": "...",
"arguments": {`` where the previous one closed names itself, then its arguments go out as they come."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from baton.services.gateway.protocol import ToolCall
from baton.services.gateway.tool_json import CallsStream, call_head, call_of, calls_or_content
from baton.services.gateway.tools import call_id

_HEAD = call_head("arguments", r"\s*\[")               # from after the tag
_NEXT = call_head("arguments", r"\s*\}\s*,")           # from the end of the previous call's arguments
_WS = re.compile(r"\s*")


class JsonListParser:
    """An answer that is ``tags[0]`` (or another of ``tags``; with ``tag_required`` false, none)
    then a JSON list of calls, each under an id from ``new_id``."""

    def __init__(self, tags: tuple[str, ...], tag_required: bool, new_id: Callable[[], str] = call_id) -> None:
        self._tags, self._required, self.new_id = tags, tag_required, new_id
        self.markers = tags

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return calls_or_content(text, self._calls(text), self.new_id)

    def stream(self) -> CallsStream:
        starts = self._tags if self._required else ("[", *self._tags)
        return CallsStream(starts, self._body, _HEAD, _NEXT, self._calls, self.new_id)

    def _body(self, text: str) -> str:
        """The answer without its leading whitespace and tag."""
        head = text.lstrip()
        for tag in self._tags:
            if head.startswith(tag):
                return head.removeprefix(tag)
        return head

    def _calls(self, text: str) -> list[tuple[str, str]] | None:
        """The calls (names and arguments) of a whole answer that is only a list of calls; None otherwise."""
        if self._required and not text.lstrip().startswith(self._tags):
            return None
        body = self._body(text).strip()
        if not body.startswith("["):
            return None
        decoder, calls, pos = json.JSONDecoder(), [], _WS.match(body, 1).end()
        while pos < len(body) and body[pos] != "]":
            try:
                value, end = decoder.raw_decode(body, pos)
            except ValueError:
                return None
            call = call_of(value, body, pos, ("arguments",))
            if call is None:
                return None
            calls.append(call)
            pos = _WS.match(body, end).end()
            if body.startswith(",", pos):
                pos = _WS.match(body, pos + 1).end()
                if body.startswith("]", pos):
                    return None   # a trailing comma: not JSON
            elif not body.startswith("]", pos):
                return None
        return calls if calls and body[pos:] == "]" else None
