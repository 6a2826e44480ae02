"""A tool call's JSON text as a model writes it, ``{"name": ..., "arguments": {...}}``: the
name and the arguments' own text of a finished call (``call_of``), and a call streamed as its
text comes (``StreamedCall``), read with a scanner that knows JSON strings and nesting
(``JsonScan``); and what every parser of an answer that is all calls or all content needs
(``opens_with``, ``calls_or_content``, ``CallsStream``). The tool-call parsers (``tool_parsers``) find the calls
in each format."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from baton.services.gateway.protocol import DeltaToolCall, ToolCall
from baton.services.gateway.tools import call_id, call_piece, new_call

_JSON_WS = re.compile(r"[ \t\n\r]*")


def call_of(value: object, text: str, start: int, keys: tuple[str, ...]) -> tuple[str, str] | None:
    """The name and arguments (their JSON text) of ``value``, decoded from the object at
    ``start`` in ``text``, if it is a call ``{"name": ..., key: {...}}`` (``key`` the first of
    ``keys`` it has; none: no arguments, ``{}``); None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    key = next((k for k in keys if k in value), None)
    if key is None:
        return value["name"], "{}"
    if not isinstance(value[key], dict):
        return None
    return value["name"], _member_text(text, start, key)


def _member_text(text: str, start: int, key: str) -> str:
    """The JSON text of member ``key`` of the valid JSON object at ``start`` in ``text`` (the last
    where the key repeats, as ``json.loads`` reads it)."""
    decoder, pos, found = json.JSONDecoder(), start + 1, ""
    while True:
        pos = _JSON_WS.match(text, pos).end()
        if text[pos] == "}":
            return found
        name, pos = decoder.raw_decode(text, pos)
        pos = _JSON_WS.match(text, pos).end() + 1      # past the ':'
        pos = _JSON_WS.match(text, pos).end()
        _, end = decoder.raw_decode(text, pos)
        if name == key:
            found = text[pos:end]
        pos = _JSON_WS.match(text, end).end()
        if text[pos] == ",":
            pos += 1


class JsonScan:
    """Where JSON text read a character at a time stands: inside a string or not, and how deep
    in objects and arrays."""

    def __init__(self) -> None:
        self.in_string = False
        self.escaped = False       # the string's previous character was a backslash
        self.depth = 0

    def step(self, char: str) -> None:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
        elif char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1


def call_head(keys: str, lead: str = "") -> re.Pattern[str]:
    """What opens a call that can stream, after ``lead``: ``{"name": "...", key: {`` with ``key``
    one of ``keys`` (``|``-separated); the name (plain, without escapes) is its group."""
    return re.compile(lead + r'\s*\{\s*"name"\s*:\s*"([^"\\\x00-\x1f]*)"\s*,\s*"(?:' + keys + r')"\s*:\s*\{')


class StreamedCall:
    """One call's text as it comes, from where it may start: once it opens as ``head`` has it, a
    first piece names it, and later pieces carry its arguments' text as it comes, up to the brace
    that closes them. Its id is the one its head gives (a group named ``id``), where the format
    writes one, else a fresh one from ``new_id``."""

    def __init__(self, head: re.Pattern[str], index: int, new_id: Callable[[], str] = call_id) -> None:
        self.index = index
        self.began = False       # its first piece went out
        self.done = False        # its arguments are closed
        self.end = 0             # how far into the text the arguments have gone out
        self._head, self._new_id = head, new_id
        self._given: str | None = None   # the id its head gives
        self._scan = JsonScan()

    def pieces(self, text: str) -> list[DeltaToolCall]:
        """The piece that ``text`` (the call's text so far) adds to it, if any."""
        name = None
        if not self.began:
            head = self._head.match(text)
            if head is None:
                return []
            self.began, name, self.end = True, head.group(1), head.end() - 1
            self._given = head.groupdict().get("id")
        start = self.end
        while self.end < len(text) and not self.done:
            self._scan.step(text[self.end])
            self.end += 1
            self.done = self._scan.depth == 0
        if name is None and start == self.end:
            return []
        return [call_piece(self.index, text[start:self.end], name, self._id)]

    def _id(self) -> str:
        return self._given or self._new_id()


def opens_with(text: str, starts: tuple[str, ...]) -> bool | None:
    """Whether an answer opens with one of ``starts`` (after whitespace); None while it is all
    whitespace or may yet grow into one of them."""
    head = text.lstrip()
    if not head or any(len(head) < len(s) and s.startswith(head) for s in starts):
        return None
    return head.startswith(starts)


def calls_or_content(text: str, calls: list[tuple[str, str]] | None,
                     new_id: Callable[[], str] = call_id) -> tuple[str | None, list[ToolCall]]:
    """The finished reading of an answer that is calls only if it is all calls: ``calls`` (names
    and arguments; None: it is not calls; ids from ``new_id``), or else all content."""
    return (None, [new_call(*c, new_id) for c in calls]) if calls else (text or None, [])


class CallsStream:
    """An answer that is either all calls, JSON objects one after another, or content, read as it
    streams. One that opens with one of ``starts`` may be calls: it is held, but each call streams
    once it opens as ``head`` has it (the first, from where ``body``, the answer without its
    leading whitespace and tag, starts) or as ``next_head`` has it (each later one, from where the
    previous one's arguments closed): its name goes out, then its arguments as they come. At the
    end the answer is read whole (``calls``: its calls, None where it is not all calls): the calls
    that did not stream go out whole. If it is not all calls, the pieces already sent stay sent and
    the rest is not content (vLLM does the same); an answer none of whose calls streamed is
    content, as in the finished reading. Any other answer goes out as it comes. Calls take their ids
    from ``new_id``."""

    def __init__(self, starts: tuple[str, ...], body: Callable[[str], str], head: re.Pattern[str],
                 next_head: re.Pattern[str], calls: Callable[[str], list[tuple[str, str]] | None],
                 new_id: Callable[[], str] = call_id) -> None:
        self._starts, self._body, self._next, self._read, self._new_id = starts, body, next_head, calls, new_id
        self._buf = ""
        self._calls: bool | None = None    # None: not known yet
        self._at = 0                       # where the text of the call being read starts
        self._call = StreamedCall(head, 0, new_id)

    def add(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        self._buf += text
        if self._calls is None:
            self._calls = opens_with(self._buf, self._starts)
            if self._calls is None:
                return "", []
            self._at = len(self._buf) - len(self._body(self._buf))
        if not self._calls:
            out, self._buf = self._buf, ""
            return out, []
        pieces = []
        while True:
            pieces += self._call.pieces(self._buf[self._at:])
            if not self._call.done:
                return "", pieces
            self._at += self._call.end
            self._call = StreamedCall(self._next, self._call.index + 1, self._new_id)

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        text, self._buf = self._buf, ""
        calls = self._read(text) if self._calls is not False else None
        sent = self._call.index + self._call.began
        if calls is None:
            return ("", []) if sent else (text, [])
        return "", [call_piece(i, arguments, name, self._new_id) for i, (name, arguments) in enumerate(calls[sent:], sent)]
