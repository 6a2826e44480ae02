"""Tool calls a model writes on its own (``tool_choice`` "auto"), read out of its text in the
model family's format, as vLLM's ``--tool-call-parser`` reads them:

* ``hermes`` (Qwen2.5, Qwen3, Hermes): each call is ``<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>``; text outside the blocks is the message's content;
* ``llama3_json`` (Llama 3.1 / 3.2): the whole answer is one or more ``{"name": ...,
  "parameters": {...}}`` objects (``;``-separated), after an optional ``<|python_tag|>``;
* ``pythonic`` (Llama 3.2, Llama 4, ToolACE): the whole answer is a Python list of calls,
  ``[get_weather(city="Verona"), clock()]``, in ``<|python_start|>`` ... ``<|python_end|>`` or not;
* ``granite`` (Granite 3.x) and ``phi4_mini_json`` (Phi-4-mini): the whole answer is a JSON list
  of calls after a tag (``tool_parser_json_list``);
* ``mistral``: before the v11 tokenizers such a list after ``[TOOL_CALLS]``, from v11 on
  ``[TOOL_CALLS]name[ARGS]{...}`` for each call (``tool_parser_mistral``); it ids its calls with 9
  letters and digits, the only ids Mistral's chat templates take back in the next turn;
* ``qwen3_coder`` (Qwen3-Coder): ``<tool_call>`` blocks of ``<function=NAME>`` and
  ``<parameter=NAME>`` tags after the content (``tool_parser_qwen3_coder``); the one parser that
  reads the request's tools, whose schemas type its parameters' values.

A parser reads a finished text (``parse``) or one streamed piece by piece (``stream``). A call's
arguments are the model's own JSON text of them, as written (pythonic: its literal values as
JSON; qwen3_coder: its typed parameters as JSON). Streamed, content goes out as it comes, and a
call as vLLM streams it: a first piece with its index, id and name once the text has opened
``{"name": "...", "arguments": {`` (qwen3_coder: ``<function=NAME>``), then its arguments' text
as the model writes it (pythonic: each call whole, once the answer has ended; qwen3_coder: a
parameter at a time).
Both readings give the same content and calls, but for a call that streamed and then turned out
not to be one (bad JSON, or the output ended inside it): its pieces were sent and stay sent, and
its text is not sent again as content, where the finished reading makes that text content.

A parser names the ``markers`` it reads: where the served tokenizer makes one a special token
(Mistral's ``[TOOL_CALLS]``), the text the parser reads keeps it though ``skip_special_tokens``
skips the others, as vLLM's parsers keep theirs, and the parser takes it out.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Protocol

from baton.services.gateway.protocol import DeltaToolCall, Tool, ToolCall
from baton.services.gateway.tokenizer import partial_suffix
from baton.services.gateway.tool_json import (
    CallsStream, JsonScan, StreamedCall, call_head, call_of, calls_or_content, opens_with,
)
from baton.services.gateway.tool_parser_json_list import JsonListParser
from baton.services.gateway.tool_parser_mistral import MistralParser
from baton.services.gateway.tool_parser_qwen3_coder import Qwen3CoderParser
from baton.services.gateway.tools import call_id, call_piece, new_call

PARSERS = ("hermes", "llama3_json", "pythonic", "granite", "phi4_mini_json", "mistral", "qwen3_coder")
# vLLM turns tool_choice "auto" on with --enable-auto-tool-choice and a parser; here the parser
# alone does, and the flag is taken (and checked) as vLLM takes it.
AUTO_TOOL_CHOICE_NEEDS_PARSER = "--enable-auto-tool-choice requires --tool-call-parser"


class ToolStream(Protocol):
    def add(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        """Content that can go out now, and the pieces of calls that ``text`` adds (at most one a
        call): a call's first piece gives its index, id and name and its arguments' first text,
        later ones more of its arguments."""

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        """What was held back, once the output has ended."""


class ToolParser(Protocol):
    markers: tuple[str, ...]   # what marks its calls: kept in the output's text where they are special tokens

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A finished output's content (None: none) and calls."""

    def stream(self) -> ToolStream: ...

    def new_id(self) -> str:
        """A fresh call id in the form the model family takes back in a later turn: its own
        calls', and the gateway's where a request forces them."""


def make_parser(name: str, tools: list[Tool] | None = None) -> ToolParser:
    """Parser ``name``, for a request with ``tools`` (which only ``qwen3_coder`` reads: they type
    its calls' parameters)."""
    if name == "hermes":
        return HermesParser()
    if name == "llama3_json":
        return Llama3JsonParser()
    if name == "pythonic":
        return PythonicParser()
    if name == "granite":
        return JsonListParser(("<|tool_call|>", "<tool_call>"), tag_required=False)
    if name == "phi4_mini_json":
        return JsonListParser(("functools",), tag_required=True)
    if name == "mistral":
        return MistralParser()
    if name == "qwen3_coder":
        return Qwen3CoderParser(tools)
    raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(PARSERS)}")


# ---- hermes -------------------------------------------------------------------

_START, _END = "<tool_call>", "</tool_call>"
_HERMES_HEAD = call_head("arguments")


def _hermes_call(block: str) -> tuple[str, str] | None:
    """The call a whole block's text makes (its name and arguments); None if it is not one."""
    try:
        value = json.loads(block)
    except ValueError:
        return None
    return call_of(value, block, len(block) - len(block.lstrip()), ("arguments",))


class _Block:
    """A ``<tool_call>`` block's text as it comes, up to its end: the first ``</tool_call>``
    outside a JSON string."""

    def __init__(self) -> None:
        self.text = ""
        self.closed = False
        self._read = 0           # the text before this is the block's: no </tool_call> starts in it
        self._scan = JsonScan()

    def add(self, text: str) -> str:
        """Takes in ``text``; what follows the block's end, once that has come."""
        self.text += text
        while self._read < len(self.text):
            if self.text[self._read] == "<" and not self._scan.in_string:
                tail = self.text[self._read:]
                if tail.startswith(_END):
                    self.text, self.closed = self.text[: self._read], True
                    return tail[len(_END):]
                if _END.startswith(tail):
                    break
            self._scan.step(self.text[self._read])
            self._read += 1
        return ""

    @property
    def known(self) -> str:
        """The text known to be the block's so far."""
        return self.text[: self._read]


class HermesParser:
    markers = (_START, _END)
    new_id = staticmethod(call_id)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Each whole block that is a call is one; other blocks, one cut short included, and the
        text around the blocks are the content (its ends stripped)."""
        content, calls, rest = "", [], text
        while (start := rest.find(_START)) >= 0:
            block = _Block()
            after = block.add(rest[start + len(_START):])
            if not block.closed:
                break
            call = _hermes_call(block.text)
            if call is None:
                content += rest[:start] + _START + block.text + _END
            else:
                content, calls = content + rest[:start], calls + [new_call(*call)]
            rest = after
        return (content + rest).strip() or None, calls

    def stream(self) -> HermesStream:
        return HermesStream()


class HermesStream:
    """Content is the text outside the blocks with its ends stripped: whitespace is held until
    more content follows it, and text that may be the start of ``<tool_call>`` until it is not.

    A block that ends within the text at hand is read whole: one piece with the whole call, or
    content if it is not a call. One still open once the text at hand is read streams if it has
    opened ``{"name": "...", "arguments": {``: the name goes out, then the arguments as they
    come; what follows them is held to the block's end. From then on the block is a call: if it
    ends as bad JSON, or the output ends inside it, the pieces sent stay sent and its text is not
    content (vLLM does the same). A block that opens otherwise (``arguments`` before ``name``) is
    held to its end and read whole."""

    def __init__(self) -> None:
        self._buf = ""                           # text after the blocks read so far
        self._block: _Block | None = None        # the block being read
        self._call: StreamedCall | None = None   # its call, if it streams
        self._calls = 0                          # calls begun
        self._ws = ""              # trailing whitespace held until more content follows it
        self._started = False      # some content went out: whitespace before more content counts

    def add(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        self._buf += text
        out, pieces = "", []
        while True:
            if self._block is None:
                start = self._buf.find(_START)
                if start < 0:
                    held = partial_suffix(self._buf, [_START])
                    ready, self._buf = self._buf[: len(self._buf) - held], self._buf[len(self._buf) - held:]
                    return out + self._content(ready), pieces
                out += self._content(self._buf[:start])
                self._buf, self._block = self._buf[start + len(_START):], _Block()
                self._call = StreamedCall(_HERMES_HEAD, self._calls)
            self._buf = self._block.add(self._buf)
            if not self._block.closed:
                return out, pieces + self._call.pieces(self._block.known)
            content, more = self._close()
            out, pieces = out + content, pieces + more

    def _close(self) -> tuple[str, list[DeltaToolCall]]:
        """The block has ended: the rest of its streamed call, the whole call, or content."""
        block, call = self._block.text, self._call
        self._block = self._call = None
        if call.began:
            self._calls += 1
            return "", call.pieces(block)
        found = _hermes_call(block)
        if found is None:
            return self._content(_START + block + _END), []
        self._calls += 1
        name, arguments = found
        return "", [call_piece(call.index, arguments, name)]

    def _content(self, text: str) -> str:
        """``text`` as it may go out now: its trailing whitespace stays held."""
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body):]
        if not self._started:
            body = body.lstrip()
        self._started = self._started or bool(body)
        return body

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        streamed = self._call is not None and self._call.began
        rest = "" if streamed else (_START + self._block.text if self._block else "") + self._buf
        self._buf, self._block, self._call = "", None, None
        return self._content(rest), []


# ---- llama3_json ----------------------------------------------------------------

_PYTHON_TAG = "<|python_tag|>"
_SEPARATORS = re.compile(r"[\s;]*")
_LLAMA3_HEAD = call_head("parameters|arguments")
_LLAMA3_NEXT = call_head("parameters|arguments", r"\s*\}[\s;]*")   # from the end of the previous call's arguments


def _llama3_calls(text: str) -> list[tuple[str, str]] | None:
    """The calls (names and arguments) of a whole answer that is only calls; None otherwise."""
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(body):
        try:
            value, end = decoder.raw_decode(body, pos)
        except ValueError:
            return None
        call = call_of(value, body, pos, ("parameters", "arguments"))
        if call is None:
            return None
        calls.append(call)
        pos = _SEPARATORS.match(body, end).end()
    return calls or None


class Llama3JsonParser:
    markers = (_PYTHON_TAG,)
    new_id = staticmethod(call_id)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return calls_or_content(text, _llama3_calls(text))

    def stream(self) -> CallsStream:
        """Calls that open ``{"name": "...", "parameters": {`` (or ``"arguments"``) stream."""
        return CallsStream(("{", _PYTHON_TAG), lambda text: text.lstrip().removeprefix(_PYTHON_TAG), _LLAMA3_HEAD,
                           _LLAMA3_NEXT, _llama3_calls)


# ---- pythonic -------------------------------------------------------------------

_PYTHON_START, _PYTHON_END = "<|python_start|>", "<|python_end|>"


def _pythonic_calls(text: str) -> list[tuple[str, str]] | None:
    """The calls (names and arguments) of a whole answer that is a Python list of calls by name
    with literal keyword arguments; None otherwise. The text is parsed, never run: only literal
    nodes are read, by ``_literal``."""
    body = text.strip().removeprefix(_PYTHON_START).removesuffix(_PYTHON_END).strip()
    try:
        tree = ast.parse(body, mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        return [_pythonic_call(node) for node in tree.elts]
    except (SyntaxError, ValueError, RecursionError):
        return None


def _pythonic_call(node: ast.expr) -> tuple[str, str]:
    """A call ``name(key=literal, ...)``: its name and its arguments as JSON text."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        raise ValueError("not a call of a name with keyword arguments")
    arguments = {k.arg: _literal(k.value) for k in node.keywords}
    if None in arguments or len(arguments) < len(node.keywords):
        raise ValueError("**arguments, or an argument given twice")
    return node.func.id, json.dumps(arguments, ensure_ascii=False, allow_nan=False)


def _literal(node: ast.expr) -> object:
    """A literal's value: a string, a number (negative too), True, False, None, or a list or a
    dict (string keys) of literals."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
            and type(node.operand.value) in (int, float):
        return -node.operand.value
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.keys):
        return {k.value: _literal(v) for k, v in zip(node.keys, node.values)}
    raise ValueError("not a literal")


class PythonicParser:
    markers = (_PYTHON_START, _PYTHON_END)
    new_id = staticmethod(call_id)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return calls_or_content(text, _pythonic_calls(text))

    def stream(self) -> PythonicStream:
        return PythonicStream()


class PythonicStream:
    """An answer that opens with ``[`` or ``<|python_start|>`` may be calls: it is held to its end,
    then goes out as calls, each whole in one piece, or as content. Any other answer goes out as
    it comes."""

    def __init__(self) -> None:
        self._buf = ""
        self._calls: bool | None = None    # None: not known yet

    def add(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        self._buf += text
        if self._calls is None:
            self._calls = opens_with(self._buf, ("[", _PYTHON_START))
        if self._calls is not False:
            return "", []
        out, self._buf = self._buf, ""
        return out, []

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        text, self._buf = self._buf, ""
        calls = _pythonic_calls(text) if self._calls is not False else None
        if calls is None:
            return text, []
        return "", [call_piece(i, arguments, name) for i, (name, arguments) in enumerate(calls)]
