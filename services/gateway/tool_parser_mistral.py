"""The ``mistral`` tool-call parser, for the two forms Mistral's chat templates teach, as vLLM's
reads them:

* before the v11 tokenizers (Mistral 7B v0.3, Nemo, Small before 3.2): the whole answer is
  ``[TOOL_CALLS]`` then a JSON list of ``{"name": ..., "arguments": {...}}`` calls
  (``tool_parser_json_list``);
* v11 and later (Mistral Small 3.2, Magistral, Devstral): each call is
  ``[TOOL_CALLS]name[ARGS]{...}``, one after another, after the answer's content if it has any;
  from v13 ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}``, where the model gives the call its id.

``[TOOL_CALLS]``, ``[ARGS]`` and ``[CALL_ID]`` are special tokens in Mistral's tokenizers: the
gateway keeps them in the text it reads here (``markers``). A list is read without the tag too
where it opens the answer, and v11 calls where the answer opens with ``name[ARGS]{``. A v11 call's
arguments are the JSON object after ``[ARGS]``, as written. Each call's id is 9 letters and
digits: Mistral's templates refuse any other id in a later turn. A v13 call's is the one the model
wrote after ``[CALL_ID]`` (a call whose id is not 9 letters and digits is not a call: its text is
content); the others' are made here.

Streamed as ``tool_parsers`` streams the others: content goes out as it comes (text that may
still open a call held until it does not), and a v11 call is named once ``name[ARGS]{`` has come
(v13: ``name[CALL_ID]id[ARGS]{``, its first piece under the model's id), then its arguments go out
as they come."""

from __future__ import annotations

import json
import re
import secrets
import string

from baton.services.gateway.protocol import DeltaToolCall, ToolCall
from baton.services.gateway.tokenizer import partial_suffix
from baton.services.gateway.tool_json import CallsStream
from baton.services.gateway.tool_parser_json_list import JsonListParser
from baton.services.gateway.tools import new_call

_TAG = "[TOOL_CALLS]"
_ARGS = "[ARGS]{"
# A v11 call's head, from where the text before it ends: its tag (optional), its name (the first
# group), from v13 [CALL_ID] and the call's id (the group "id"), then [ARGS] and the brace that
# opens its arguments.
_HEAD = re.compile(r"\s*(?:\[TOOL_CALLS\])?([A-Za-z0-9_-]+)(?:\[CALL_ID\](?P<id>[A-Za-z0-9]{9}))?\[ARGS\]\{")
_NAME = re.compile(r"[A-Za-z0-9_-]*")
_ANY = ("",)   # the v11 calls' stream starts where they open: whatever text it gets opens as calls
_ID_CHARS = string.ascii_letters + string.digits
_ID_ARGS = "[CALL_ID]" + "#" * 9 + _ARGS   # what follows a v13 call's name, a '#' for each character of its id


def mistral_id() -> str:
    """A call id as Mistral's templates take it back: 9 letters and digits."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


def _opens_call(text: str) -> bool | None:
    """Whether ``text`` opens with a v11 call's head (its tag optional); None while it may yet."""
    if _HEAD.match(text):
        return True
    if _TAG.startswith(text):
        return None
    rest = text.removeprefix(_TAG)
    return None if _may_follow_name(rest[_NAME.match(rest).end():]) else False


def _may_follow_name(rest: str) -> bool:
    """Whether ``rest``, what follows a call's name, may yet grow into ``[ARGS]{`` or v13's
    ``[CALL_ID]id[ARGS]{``."""
    if _ARGS.startswith(rest):
        return True
    return len(rest) <= len(_ID_ARGS) and all(c in _ID_CHARS if t == "#" else c == t for c, t in zip(rest, _ID_ARGS))


def _v11_calls(text: str) -> list[tuple[str, str, str | None]] | None:
    """The calls of a text that is only v11 calls, each its name, its arguments and the id the
    model gave it (v13; None: none given); None where the text is not only calls."""
    decoder, calls, pos, text = json.JSONDecoder(), [], 0, text.rstrip()
    while pos < len(text):
        head = _HEAD.match(text, pos)
        if head is None:
            return None
        try:
            _, pos = decoder.raw_decode(text, head.end() - 1)
        except ValueError:
            return None
        calls.append((head.group(1), text[head.end() - 1:pos], head.group("id")))
    return calls or None


def _call(name: str, arguments: str, given: str | None) -> ToolCall:
    """A call under the id the model gave it (v13), else a fresh one."""
    return new_call(name, arguments, lambda: given or mistral_id())


def _v11_start(text: str) -> int | None:
    """Where a finished answer's v11 calls open: at its start, or, in an answer that does not open
    with ``[`` (a list), at the first ``[TOOL_CALLS]`` a call's head follows; None: nowhere."""
    head = text.lstrip()
    if _HEAD.match(head):
        return 0
    if head.startswith("["):
        return None
    at = text.find(_TAG)
    while at >= 0 and not _HEAD.match(text, at):
        at = text.find(_TAG, at + 1)
    return at if at >= 0 else None


def _v11_stream() -> CallsStream:
    """Calls that stream each from its head, which names the call and gives the model's id where
    it wrote one: by the output's end every call has streamed, and the whole text's reading only
    tells whether it was all calls."""
    return CallsStream(_ANY, lambda text: text, _HEAD, _HEAD, _v11_names_and_arguments, mistral_id)


def _v11_names_and_arguments(text: str) -> list[tuple[str, str]] | None:
    calls = _v11_calls(text)
    return None if calls is None else [(name, arguments) for name, arguments, _ in calls]


class MistralParser:
    markers = (_TAG, "[ARGS]", "[CALL_ID]")
    new_id = staticmethod(mistral_id)

    def __init__(self) -> None:
        self._list = JsonListParser((_TAG,), tag_required=False, new_id=mistral_id)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A list that is the whole answer, or v11 calls that end it (the text before them its
        content); an answer whose calls are not all whole calls is content."""
        at = _v11_start(text)
        if at is None:
            return self._list.parse(text)
        calls = _v11_calls(text[at:])
        if calls is None:
            return text or None, []
        return text[:at] or None, [_call(*call) for call in calls]

    def stream(self) -> MistralStream:
        return MistralStream(self._list)


class MistralStream:
    """The answer's start tells its form: a list (it opens with ``[`` but not a v11 call's head)
    streams as ``JsonListParser`` streams it; v11 calls, from the answer's start or from the first
    ``[TOOL_CALLS]`` a call's head follows, stream as ``CallsStream`` streams calls, each from
    where the previous one's arguments closed. Text before them is content."""

    def __init__(self, list_parser: JsonListParser) -> None:
        self._list = list_parser
        self._buf = ""                          # text held: it may open calls
        self._opening = True                    # the answer's start is not read yet
        self._calls: CallsStream | None = None  # reads the calls, once they open

    def add(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        if self._calls is not None:
            return self._calls.add(text)
        self._buf += text
        if self._opening:
            head = self._buf.lstrip()
            opens = _opens_call(head)
            if opens is None:
                return "", []
            self._opening = False
            if opens:
                return self._open(0, _v11_stream())
            if head.startswith("["):
                return self._open(0, self._list.stream())
        return self._content()

    def _content(self) -> tuple[str, list[DeltaToolCall]]:
        """Content up to where v11 calls open, and their first pieces if they have; text that may
        be the start of their head is held."""
        at = self._buf.find(_TAG)
        while at >= 0:
            opens = _opens_call(self._buf[at:])
            if opens:
                return self._open(at, _v11_stream())
            if opens is None:
                break
            at = self._buf.find(_TAG, at + 1)
        if at < 0:
            at = len(self._buf) - partial_suffix(self._buf, [_TAG])
        out, self._buf = self._buf[:at], self._buf[at:]
        return out, []

    def _open(self, at: int, calls: CallsStream) -> tuple[str, list[DeltaToolCall]]:
        """The text before ``at`` as content; ``calls`` reads the rest, and all that follows."""
        out, rest, self._buf, self._calls = self._buf[:at], self._buf[at:], "", calls
        content, deltas = calls.add(rest)
        return out + content, deltas

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        if self._calls is not None:
            return self._calls.finish()
        out, self._buf = self._buf, ""
        return out, []
