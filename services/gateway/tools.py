"""Tool calls where the request forces them, as vLLM makes them without a tool-call parser.

``tool_choice`` naming a function constrains the output to that function's arguments (its
``parameters`` schema, any JSON object without one); ``"required"`` constrains it to a JSON
array of ``{"name": ..., "parameters": {...}}`` calls of the given tools (exactly one unless
``parallel_tool_calls``), written compactly: the arguments are for a program, and whitespace
anywhere only invites a model into loops of blank lines. The finished output is read back into OpenAI ``tool_calls``: for a
named function as it streams (each piece of text is a piece of the arguments), for
``"required"`` once the array is complete. ``"auto"`` calls are read in the model family's own
format by a tool-call parser (``tool_parsers``), which makes its calls and pieces here too. Call
ids are ``call_`` and hex digits, or where a tool-call parser is set the form its family takes
back (its ``new_id``), forced calls' too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

from baton.engine.sampling_params import StructuredOutputParams
from baton.services.gateway.protocol import (
    ChatCompletionRequest, DeltaFunctionCall, DeltaToolCall, FunctionCall, NamedToolChoice, Tool, ToolCall,
)

ANY_OBJECT = {"type": "object"}


def grammar(req: ChatCompletionRequest) -> StructuredOutputParams | None:
    """The structure a forced ``tool_choice`` gives the output; None when it forces nothing."""
    if isinstance(req.tool_choice, NamedToolChoice):
        return StructuredOutputParams(json=_parameters(_named_tool(req)), disable_any_whitespace=True)
    if req.tool_choice == "required":
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "parameters": _parameters(t)},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in req.tools or []
        ]
        array = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not req.parallel_tool_calls:
            array["maxItems"] = 1
        return StructuredOutputParams(json=array, disable_any_whitespace=True)
    return None


def tool_calls(req: ChatCompletionRequest, text: str, new_id: Callable[[], str]) -> list[ToolCall] | None:
    """The calls a finished output makes, each under an id from ``new_id``; None if it is not
    complete calls (one cut short). A named function's arguments are the text itself, as streamed."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(req.tool_choice, NamedToolChoice):
        return [new_call(req.tool_choice.function.name, text, new_id)]
    if not isinstance(value, list) or not all(isinstance(c, dict) and c.keys() == {"name", "parameters"} for c in value):
        return None
    return [new_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False), new_id) for c in value]


def named_call_piece(req: ChatCompletionRequest, text: str, first: bool, new_id: Callable[[], str]) -> DeltaToolCall:
    """A streamed piece of a named function's call: ``text`` adds to its arguments; the first
    piece also gives the call's id (from ``new_id``) and the function's name."""
    return call_piece(0, text, _named_tool(req).function.name if first else None, new_id)


def call_id() -> str:
    """A fresh call id, as OpenAI and vLLM make them: ``call_`` and 24 hex digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


def call_piece(index: int, arguments: str, name: str | None = None, new_id: Callable[[], str] = call_id) -> DeltaToolCall:
    """A streamed piece of call ``index``: ``arguments`` adds to its arguments; the first piece
    (``name`` given) also names the call and gives it a fresh id from ``new_id``."""
    if name is None:
        return DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=arguments))
    return DeltaToolCall(index=index, id=new_id(), type="function", function=DeltaFunctionCall(name=name, arguments=arguments))


def as_deltas(calls: list[ToolCall], first_index: int = 0) -> list[DeltaToolCall]:
    """Whole calls as streamed pieces, one each, numbered from ``first_index``."""
    return [
        DeltaToolCall(index=i, id=c.id, type="function", function=DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments))
        for i, c in enumerate(calls, first_index)
    ]


def _named_tool(req: ChatCompletionRequest) -> Tool:
    name = req.tool_choice.function.name
    return next(t for t in req.tools or [] if t.function.name == name)


def _parameters(tool: Tool) -> dict:
    return tool.function.parameters if tool.function.parameters is not None else ANY_OBJECT


def new_call(name: str, arguments: str, new_id: Callable[[], str] = call_id) -> ToolCall:
    """A call of ``name`` with ``arguments`` (JSON text), under a fresh id from ``new_id``."""
    return ToolCall(id=new_id(), function=FunctionCall(name=name, arguments=arguments))
