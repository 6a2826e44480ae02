"""A tool call's JSON text as a model writes it, ``{"name": ..., "arguments": {...}}``: the
name and the arguments' own text of a finished call (``call_of``), and a call streamed as its
text comes (``StreamedCall``), read with a scanner that knows JSON strings and nesting
(``JsonScan``). The tool-call parsers (``tool_parsers``) find the calls in each format."""

from __future__ import annotations

import json
import re

from baton.services.gateway.protocol import DeltaToolCall
from baton.services.gateway.tools import call_piece

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
    that closes them."""

    def __init__(self, head: re.Pattern[str], index: int) -> None:
        self.index = index
        self.began = False       # its first piece went out
        self.done = False        # its arguments are closed
        self.end = 0             # how far into the text the arguments have gone out
        self._head = head
        self._scan = JsonScan()

    def pieces(self, text: str) -> list[DeltaToolCall]:
        """The piece that ``text`` (the call's text so far) adds to it, if any."""
        name = None
        if not self.began:
            head = self._head.match(text)
            if head is None:
                return []
            self.began, name, self.end = True, head.group(1), head.end() - 1
        start = self.end
        while self.end < len(text) and not self.done:
            self._scan.step(text[self.end])
            self.end += 1
            self.done = self._scan.depth == 0
        if name is None and start == self.end:
            return []
        return [call_piece(self.index, text[start:self.end], name)]
