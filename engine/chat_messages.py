"""Chat messages in OpenAI's form as a chat template reads them, as vLLM hands them over: the
gateway's requests and the offline ``LLM.chat`` both go through ``template_message``. Pure logic."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def template_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """``message`` as the template sees it: content given as parts becomes their texts joined by
    newlines (vLLM's "string" content format; a part that is not text is a ValueError, as images
    are not served), no content an empty string, and an assistant's tool calls carry their
    arguments as an object where they are JSON, as transformers' templates expect them. Other keys
    pass as they are."""
    out = {**message, "content": content_text(message.get("content"))}
    if message.get("tool_calls"):
        out["tool_calls"] = [{**call, "function": {**call["function"], "arguments": _json_or_text(call["function"]["arguments"])}}
                             for call in message["tool_calls"]]
    return out


def content_text(content: str | list[Mapping[str, Any]] | None) -> str:
    """A message's content as one string: its text parts joined by newlines, as vLLM joins them."""
    if content is None or isinstance(content, str):
        return content or ""
    kinds = {part.get("type") for part in content} - {"text"}
    if kinds:
        raise ValueError(f"a message's content parts must be text; got {', '.join(sorted(map(str, kinds)))}")
    return "\n".join(part["text"] for part in content)


def _json_or_text(arguments: Any) -> Any:
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
