"""Tool-call parsers (tool_choice "auto"): what each reads in a finished text, and that reading
the same text streamed, cut anywhere, gives the same content and calls."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.services.gateway.tool_parsers import make_parser

pytestmark = pytest.mark.unit

WEATHER = '{"name": "get_weather", "arguments": {"city": "Verona"}}'
CASES = {
    "hermes": [
        (f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n" '{"name": "now", "arguments": {}}\n</tool_call>',
         "Let me look.", [("get_weather", {"city": "Verona"}), ("now", {})]),
        (f"A <tool_call>{WEATHER}</tool_call> B\n", "A  B", [("get_weather", {"city": "Verona"})]),
        ("<tool_call>{not json}</tool_call> after", "<tool_call>{not json}</tool_call> after", []),
        ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
        (f"cut short <tool_call>{WEATHER[:20]}", f"cut short <tool_call>{WEATHER[:20]}", []),
        ("ends on <tool", "ends on <tool", []),
        ("  plain words, 1 < 2\n", "plain words, 1 < 2", []),
        ("", None, []),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Verona"}}', None, [("get_weather", {"city": "Verona"})]),
        ('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": "y;z"}}',
         None, [("a", {}), ("b", {"x": "y;z"})]),
        ('{"nom": "get_weather"}', '{"nom": "get_weather"}', []),
        ('{"name": "a", "parameters": {}} and more', '{"name": "a", "parameters": {}} and more', []),
        ('Plainly: {"name": "a", "parameters": {}}', 'Plainly: {"name": "a", "parameters": {}}', []),
        ("  <|python", "  <|python", []),
        ("", None, []),
    ],
}
ALL = [(parser, *case) for parser, cases in CASES.items() for case in cases]


def calls_of(calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), ALL)
def test_parse_reads_content_and_calls(parser, text, content, calls) -> None:
    got_content, got_calls = make_parser(parser).parse(text)
    assert got_content == content and calls_of(got_calls) == calls
    assert len({c.id for c in got_calls}) == len(got_calls)


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(ALL), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_streamed_pieces_read_as_the_whole(case, cuts) -> None:
    parser, text, content, calls = case
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    stream = make_parser(parser).stream()
    out, got = "", []
    for a, b in zip(bounds, bounds[1:]):
        piece, made = stream.add(text[a:b])
        out, got = out + piece, got + made
    piece, made = stream.finish()
    assert (out + piece) == (content or "") and calls_of(got + made) == calls


def test_unknown_parser() -> None:
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        make_parser("pythonic")
