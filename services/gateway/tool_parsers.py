"""Tool calls a model writes on its own (``tool_choice`` "auto"), read out of its text in the
model family's format, as vLLM's ``--tool-call-parser`` reads them:

* ``hermes`` (Qwen2.5, Qwen3, Hermes): each call is ``<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>``; text outside the blocks is the message's content;
* ``llama3_json`` (Llama 3.1 / 3.2): the whole answer is one or more ``{"name": ...,
  "parameters": {...}}`` objects (``;``-separated), after an optional ``<|python_tag|>``.

A parser reads a finished text (``parse``) or one streamed piece by piece (``stream``); both
give the same content and calls. Streamed, content goes out as it comes, and each call whole
once its text is complete (a call that does not parse is content after all).
"""

from __future__ import annotations

import json
from typing import Protocol

from baton.services.gateway.protocol import ToolCall
from baton.services.gateway.tokenizer import partial_suffix
from baton.services.gateway.tools import new_call

PARSERS = ("hermes", "llama3_json")


class ToolStream(Protocol):
    def add(self, text: str) -> tuple[str, list[ToolCall]]:
        """Content that can go out now, and the calls completed by ``text``."""

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What was held back, once the output has ended."""


class ToolParser(Protocol):
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A finished output's content (None: none) and calls."""

    def stream(self) -> ToolStream: ...


def make_parser(name: str) -> ToolParser:
    if name == "hermes":
        return HermesParser()
    if name == "llama3_json":
        return Llama3JsonParser()
    raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(PARSERS)}")


def _call(value: object, arguments_key: str) -> ToolCall | None:
    """A call from a decoded ``{"name": ..., arguments_key: {...}}``; None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, {})
    if not isinstance(arguments, dict):
        return None
    return new_call(value["name"], json.dumps(arguments, ensure_ascii=False))


# ---- hermes -------------------------------------------------------------------

_START, _END = "<tool_call>", "</tool_call>"


def _hermes_call(block: str) -> ToolCall | None:
    try:
        return _call(json.loads(block), "arguments")
    except ValueError:
        return None


class HermesParser:
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        stream = self.stream()
        content, calls = stream.add(text)
        rest, more = stream.finish()
        return (content + rest) or None, calls + more

    def stream(self) -> HermesStream:
        return HermesStream()


class HermesStream:
    """Content is the text outside the blocks with its ends stripped: whitespace is held until
    more content follows it, and text that may be the start of ``<tool_call>`` until it is not."""

    def __init__(self) -> None:
        self._buf = ""
        self._in_call = False
        self._ws = ""              # trailing whitespace held until more content follows it
        self._started = False      # some content went out: whitespace before more content counts

    def add(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buf += text
        out, calls = "", []
        while True:
            if self._in_call:
                end = self._buf.find(_END)
                if end < 0:
                    break
                block, self._buf, self._in_call = self._buf[:end], self._buf[end + len(_END):], False
                call = _hermes_call(block)
                if call is not None:
                    calls.append(call)
                else:
                    out += self._content(_START + block + _END)
                continue
            start = self._buf.find(_START)
            if start < 0:
                held = partial_suffix(self._buf, [_START])
                ready, self._buf = self._buf[: len(self._buf) - held], self._buf[len(self._buf) - held:]
                out += self._content(ready)
                break
            out += self._content(self._buf[:start])
            self._buf, self._in_call = self._buf[start + len(_START):], True
        return out, calls

    def _content(self, text: str) -> str:
        """``text`` as it may go out now: its trailing whitespace stays held."""
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body):]
        if not self._started:
            body = body.lstrip()
        self._started = self._started or bool(body)
        return body

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest = (_START if self._in_call else "") + self._buf
        self._buf, self._in_call = "", False
        return self._content(rest), []


# ---- llama3_json ----------------------------------------------------------------

_PYTHON_TAG = "<|python_tag|>"


def _llama3_calls(text: str) -> list[ToolCall] | None:
    """The calls of a whole answer that is only calls; None otherwise."""
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(body):
        try:
            value, pos = decoder.raw_decode(body, pos)
        except ValueError:
            return None
        call = _call(value, "parameters" if isinstance(value, dict) and "parameters" in value else "arguments")
        if call is None:
            return None
        calls.append(call)
        while pos < len(body) and (body[pos].isspace() or body[pos] == ";"):
            pos += 1
    return calls or None


class Llama3JsonParser:
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        calls = _llama3_calls(text)
        return (None, calls) if calls else (text or None, [])

    def stream(self) -> Llama3JsonStream:
        return Llama3JsonStream()


class Llama3JsonStream:
    """An answer that opens with ``{`` or ``<|python_tag|>`` is held to its end (it may be calls);
    any other goes out as it comes."""

    def __init__(self) -> None:
        self._buf = ""
        self._calls: bool | None = None    # None: not known yet

    def add(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buf += text
        if self._calls is None:
            head = self._buf.lstrip()
            if not head or (_PYTHON_TAG.startswith(head) and len(head) < len(_PYTHON_TAG)):
                return "", []
            self._calls = head.startswith(("{", _PYTHON_TAG))
        if self._calls:
            return "", []
        out, self._buf = self._buf, ""
        return out, []

    def finish(self) -> tuple[str, list[ToolCall]]:
        text, self._buf = self._buf, ""
        calls = _llama3_calls(text) if self._calls is not False else None
        return ("", calls) if calls else (text, [])
