"""The ``qwen3_coder`` tool-call parser (Qwen3-Coder), as vLLM's reads its calls: after the
answer's content, each call is a block of tags, a parameter's value its raw text up to
``</parameter>`` (one newline after its tag and one before ``</parameter>`` not its own)::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Verona
    </parameter>
    </function>
    </tool_call>

Between the tags of a block there is only whitespace; text between or after the blocks is not
read (vLLM reads none either). A value becomes the JSON value the ``type`` of its parameter in
the request's tools says: a string stays the raw text; an integer, number, boolean, object,
array or null is the text read as JSON where it is one of those, the raw text where it is not.
A parameter the tool does not declare, or declares without a type, is the text read as JSON
where it is JSON, else the raw text. A call's arguments are the JSON text of its parameters,
``json.dumps`` of them.

Streamed, content goes out as it comes (whitespace that opens the answer held until text
follows it, and text that may be the start of ``<tool_call>`` until it is not); a call is named
once ``<function=NAME>`` has come, and its arguments' text grows by each parameter once its
``</parameter>`` has come, then closes with ``</tool_call>``. A block that is not one of these,
or one cut short, makes the whole answer content; streamed, so it does from where it turns out
not to be one, unless a call was named before: then its pieces stay sent, and the rest is not
content (as ``tool_parsers`` says)."""

from __future__ import annotations

import json
import math
import re

from baton.services.gateway.protocol import DeltaToolCall, Tool, ToolCall
from baton.services.gateway.tokenizer import partial_suffix
from baton.services.gateway.tools import call_id, call_piece, new_call

_START, _END = "<tool_call>", "</tool_call>"
_VALUE_END = "</parameter>"
_TAG = re.compile(r"\s*(<[^<>\n]*>)")
_TAG_SO_FAR = re.compile(r"\s*(?:<[^<>\n]*)?")    # whole: a tag may yet come
_FUNCTION = re.compile(r"<function=([^<>\n]+)>")
_PARAMETER = re.compile(r"<parameter=([^<>\n]+)>")
# The JSON types a value read as JSON has, by its Python type; a string is the raw text's alone.
_JSON_TYPES = {bool: ("boolean",), int: ("integer", "number"), float: ("number",), str: (), list: ("array",),
               dict: ("object",), type(None): ("null",)}


def _finite(text: str) -> float:
    """A JSON number's value; refused (ValueError) where JSON text cannot hold it: NaN, infinities."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a JSON number")
    return value


def _typed(raw: str, schema: object) -> object:
    """A parameter's raw text as the value its ``schema`` (None: undeclared) types it."""
    declared = schema.get("type") if isinstance(schema, dict) else None
    types = [declared] if isinstance(declared, str) else declared if isinstance(declared, list) else []
    try:
        value = json.loads(raw, parse_float=_finite, parse_constant=_finite)
    except (ValueError, RecursionError):
        return raw
    if not types:
        return value
    return value if any(t in types for t in _JSON_TYPES[type(value)]) else raw


def _properties(tools: list[Tool] | None) -> dict[str, dict]:
    """Each tool's declared parameters (their schemas), by the tool's name."""
    properties = {}
    for tool in tools or []:
        declared = (tool.function.parameters or {}).get("properties")
        properties[tool.function.name] = declared if isinstance(declared, dict) else {}
    return properties


def _content(text: str) -> str | None:
    """The content ``text`` makes: None where it is only whitespace."""
    return text if text.strip() else None


class _Blocks:
    """The answer's calls, read as they come from after its first ``<tool_call>``: each block
    read tag by tag; ``bad`` once the text is not blocks."""

    def __init__(self, properties: dict[str, dict]) -> None:
        self.calls = 0             # calls named
        self.bad = False
        self._properties = properties
        self._buf = ""             # text not read yet
        self._searched = 0         # a value's end does not start before this in _buf
        self._state = "function"   # what comes next: function, parameter (or </function>), value, end, between
        self._schemas: dict = {}   # the parameters the current call's tool declares
        self._keys: list[str] = []  # the current call's parameters so far
        self._key = ""             # the parameter whose value is being read
        self._out: list[list] = []  # pieces read by this add: [index, arguments, name or None]

    @property
    def closed(self) -> bool:
        """Every block so far is a whole call."""
        return self._state == "between" and not self.bad

    def add(self, text: str) -> list[tuple[int, str, str | None]]:
        """Takes in ``text``; the pieces of calls it adds, at most one a call: (index, arguments'
        text, name where it names the call)."""
        self._buf += text
        while not self.bad and self._step():
            pass
        out, self._out = self._out, []
        return [tuple(piece) for piece in out]

    def _step(self) -> bool:
        """Reads the next thing the text at hand holds whole; False where it holds none yet."""
        if self._state == "between":
            at = self._buf.find(_START)
            if at < 0:
                self._buf = self._buf[len(self._buf) - partial_suffix(self._buf, [_START]):]
                return False
            self._buf, self._state = self._buf[at + len(_START):], "function"
            return True
        if self._state == "value":
            at = self._buf.find(_VALUE_END, self._searched)
            if at < 0:
                self._searched = max(0, len(self._buf) - len(_VALUE_END) + 1)
                return False
            self._value(self._buf[:at].removeprefix("\n").removesuffix("\n"))
            self._buf, self._state, self._searched = self._buf[at + len(_VALUE_END):], "parameter", 0
            return True
        tag = _TAG.match(self._buf)
        if tag is None:
            self.bad = _TAG_SO_FAR.fullmatch(self._buf) is None
            return False
        self._buf = self._buf[tag.end():]
        self.bad = not self._tag(tag.group(1))
        return not self.bad

    def _tag(self, tag: str) -> bool:
        """Reads a tag where the block is at; False if it does not belong there."""
        function, parameter = _FUNCTION.fullmatch(tag), _PARAMETER.fullmatch(tag)
        if self._state == "function" and function:
            name, self._keys, self._state = function.group(1), [], "parameter"
            self._schemas = self._properties.get(name, {})
            self.calls += 1
            self._out.append([self.calls - 1, "", name])
        elif self._state == "parameter" and parameter and parameter.group(1) not in self._keys:
            self._key, self._state = parameter.group(1), "value"
        elif self._state == "parameter" and tag == "</function>":
            self._state = "end"
        elif self._state == "end" and tag == _END:
            self._arguments("}" if self._keys else "{}")
            self._state = "between"
        else:
            return False
        return True

    def _value(self, raw: str) -> None:
        """A parameter's value has come: its member of the arguments."""
        value = json.dumps(_typed(raw, self._schemas.get(self._key)), ensure_ascii=False)
        self._arguments(("{" if not self._keys else ", ") + json.dumps(self._key, ensure_ascii=False) + ": " + value)
        self._keys.append(self._key)

    def _arguments(self, text: str) -> None:
        """``text`` adds to the current call's arguments: to its piece of this add, if it has one."""
        if self._out and self._out[-1][0] == self.calls - 1:
            self._out[-1][1] += text
        else:
            self._out.append([self.calls - 1, text, None])


class Qwen3CoderParser:
    """Reads calls against the request's ``tools``, which type their parameters."""

    markers = (_START, _END)
    new_id = staticmethod(call_id)

    def __init__(self, tools: list[Tool] | None = None) -> None:
        self._properties = _properties(tools)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The text before the first ``<tool_call>`` is the content, the blocks from there the
        calls; if any block is not a whole call, the whole text is content."""
        start = text.find(_START)
        if start < 0:
            return _content(text), []
        blocks = _Blocks(self._properties)
        pieces = blocks.add(text[start + len(_START):])
        if not blocks.closed:
            return _content(text), []
        return _content(text[:start]), [new_call(name, arguments) for _, arguments, name in pieces]

    def stream(self) -> Qwen3CoderStream:
        return Qwen3CoderStream(self._properties)


class Qwen3CoderStream:
    """Content up to the first ``<tool_call>``, then the blocks, read by ``_Blocks``; their text
    is kept while no call is named, to go out as content if they turn out not to be blocks."""

    def __init__(self, properties: dict[str, dict]) -> None:
        self._properties = properties
        self._buf = ""                         # content held: it may be the start of <tool_call>
        self._ws: str | None = ""              # whitespace that opens the answer, held; None once text went out
        self._blocks: _Blocks | None = None    # reads the blocks, once the first opens
        self._held = ""                        # the blocks' text, while no call is named
        self._plain = False                    # the rest is content: the blocks were not blocks

    def add(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        if self._blocks is not None:
            return self._read(text)
        self._buf += text
        start = -1 if self._plain else self._buf.find(_START)
        if start < 0:
            cut = len(self._buf) - (0 if self._plain else partial_suffix(self._buf, [_START]))
            out, self._buf = self._buf[:cut], self._buf[cut:]
            return self._content(out), []
        out, rest = self._content(self._buf[:start]), self._buf[start + len(_START):]
        self._buf, self._held, self._blocks = "", _START, _Blocks(self._properties)
        content, pieces = self._read(rest)
        return out + content, pieces

    def _read(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        """The pieces that ``text`` adds to the calls; if the blocks turn out not to be blocks
        before a call is named, their text as content, and all that follows as content too."""
        pieces = [call_piece(*piece) for piece in self._blocks.add(text)]
        if self._blocks.calls:
            self._held = ""
            return "", pieces
        self._held += text
        if not self._blocks.bad:
            return "", []
        held, self._held, self._blocks, self._plain = self._held, "", None, True
        return self._content(held), []

    def _content(self, text: str) -> str:
        """``text`` as it may go out now: whitespace that opens the answer stays held until more
        text follows it."""
        if self._ws is None:
            return text
        self._ws += text
        if not self._ws.strip():
            return ""
        text, self._ws = self._ws, None
        return text

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        rest = self._buf if self._blocks is None else self._held
        self._buf = self._held = ""
        return self._content(rest), []
