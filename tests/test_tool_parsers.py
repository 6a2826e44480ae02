"""Tool-call parsers (tool_choice "auto"): what each reads in a finished text, and that reading
the same text streamed, cut anywhere, gives the same content and calls: each call's first piece
names it, and its pieces add up to its arguments, the model's own JSON text of them (pythonic:
its literal keyword arguments as JSON, anything else in them making the answer content)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.services.gateway.protocol import Tool
from baton.services.gateway.tool_parsers import PARSERS, make_parser

pytestmark = pytest.mark.unit

CITY = '{"city": "Verona"}'
WEATHER = f'{{"name": "get_weather", "arguments": {CITY}}}'
# Braces, brackets, tags, escaped quotes and a backslash inside strings, and nesting.
TRICKY = r'{"text": "a } b </tool_call> <tool_call> {", "quote": "she said \"}\"", "path": "C:\\", "deep": {"n": [1, {"x": "]}"}]}}'
# qwen3_coder's calls are typed by the request's tools.
TOOLS = {"qwen3_coder": [Tool.model_validate({"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
                                     "at": {"type": "object"}, "scale": {"type": "number"}, "hours": {"type": "array"},
                                     "note": {"type": ["string", "null"]}, "any": {}}}}})]}


def qwen_call(name: str, **parameters: str) -> str:
    """A Qwen3-Coder call block: each parameter's raw text between newlines."""
    tags = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in parameters.items())
    return f"<tool_call>\n<function={name}>\n{tags}</function>\n</tool_call>"


QWEN_WEATHER = qwen_call("get_weather", city="Verona", days="3")
QWEN_CITY = '{"city": "Verona", "days": 3}'
# (text, content, calls[, streamed]): the finished reading, calls as (name, arguments); streamed:
# the streamed reading (content, calls) where a call streamed before it turned out not to be one.
CASES = {
    "hermes": [
        (f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n" '{"name": "now", "arguments": {}}\n</tool_call>',
         "Let me look.", [("get_weather", CITY), ("now", "{}")]),
        (f"A <tool_call>{WEATHER}</tool_call> B\n", "A  B", [("get_weather", CITY)]),
        (f'<tool_call>\n{{"name": "say", "arguments": {TRICKY}}}\n</tool_call>\nSaid.', "Said.", [("say", TRICKY)]),
        ('<tool_call>{"arguments": {"city": "Verona"}, "name": "get_weather"}</tool_call>', None, [("get_weather", CITY)]),
        ('<tool_call>{"name": "now"}</tool_call><tool_call>{"name": "sum", "arguments": { "xs" : [1, 2] }\n}</tool_call>',
         None, [("now", "{}"), ("sum", '{ "xs" : [1, 2] }')]),
        ('<tool_call>{"name": "a", "arguments": {"x": 1}, "id": 7}</tool_call>', None, [("a", '{"x": 1}')]),
        ("<tool_call>{not json}</tool_call> after", "<tool_call>{not json}</tool_call> after", []),
        ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
        (f"cut short <tool_call>{WEATHER[:20]}", f"cut short <tool_call>{WEATHER[:20]}", []),
        (f"cut short <tool_call>{WEATHER[:48]}", f"cut short <tool_call>{WEATHER[:48]}", [],
         ("cut short", [("get_weather", '{"city": "V')])),
        ("ends on <tool", "ends on <tool", []),
        ("  plain words, 1 < 2\n", "plain words, 1 < 2", []),
        ("", None, []),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Verona"}}', None, [("get_weather", CITY)]),
        ('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": "y;z"}}',
         None, [("a", "{}"), ("b", '{"x": "y;z"}')]),
        (f'{{"name": "say", "parameters": {TRICKY}}};{{"name": "now", "parameters": {{}}, "id": 2}}; {{"name": "b", "parameters": {{"y": 1}}}}',
         None, [("say", TRICKY), ("now", "{}"), ("b", '{"y": 1}')]),
        ('{"parameters": {"x": 1}, "name": "a"}\n{"name": "b", "arguments": {"s": "}{"}}', None, [("a", '{"x": 1}'), ("b", '{"s": "}{"}')]),
        ('{"nom": "get_weather"}', '{"nom": "get_weather"}', []),
        ('{"name": "a", "parameters": {}} and more', '{"name": "a", "parameters": {}} and more', [], ("", [("a", "{}")])),
        ('{"name": "a", "parameters": {"x": ', '{"name": "a", "parameters": {"x": ', [], ("", [("a", '{"x": ')])),
        ('Plainly: {"name": "a", "parameters": {}}', 'Plainly: {"name": "a", "parameters": {}}', []),
        ("  <|python", "  <|python", []),
        ("", None, []),
    ],
    "pythonic": [
        ('[get_weather(city="Verona", days=3), clock()]', None, [("get_weather", '{"city": "Verona", "days": 3}'), ("clock", "{}")]),
        ('<|python_start|>[f(x=-1.5, n=-2, ok=True, no=False, none=None, items=[1, "a", []], d={"k": {"n": [False]}}, s="日本 \\"q\\"")]<|python_end|>',
         None, [("f", '{"x": -1.5, "n": -2, "ok": true, "no": false, "none": null, "items": [1, "a", []], "d": {"k": {"n": [false]}}, "s": "日本 \\"q\\""}')]),
        ("  [\n  get_weather(city='Verona'),\n  clock()\n]\n", None, [("get_weather", '{"city": "Verona"}'), ("clock", "{}")]),
        # Not calls, so content: positional arguments, names, calls, sums, sets and tuples as values,
        # an attribute call, **arguments, an argument twice, a number JSON cannot hold, no calls.
        *[(refused, refused, []) for refused in (
            '[get_weather("Verona")]', "[get_weather(city=verona)]", '[os.system("x")]', "[f(x=g())]", "[f(**kw)]",
            "[f(x=1 + 2)]", "[f(x=1, x=2)]", "[f(x=1e999)]", "[f(d={1: 2})]", "[f(s={1, 2})]", "[f(t=(1, 2))]",
            "[f(x=-True)]", "[]", "[1, 2]", "[f(x=1)", '<|python_start|>print("hi")<|python_end|>', "Call [f(x=1)] later",
            "(f(x=1),)", "  <|python_st",
        )],
        ("", None, []),
    ],
    "granite": [
        (f"[{WEATHER}]", None, [("get_weather", CITY)]),
        ('<|tool_call|>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": "y,z"}}]',
         None, [("a", "{}"), ("b", '{"x": "y,z"}')]),
        (f'<tool_call> [\n{{"name": "say", "arguments": {TRICKY}}},{{"name": "now", "arguments": {{}}, "id": 2}}, {{"name": "b", "arguments": {{"y": 1}}}}\n]',
         None, [("say", TRICKY), ("now", "{}"), ("b", '{"y": 1}')]),
        ('[{"arguments": {"x": 1}, "name": "a"}, {"name": "b"}]', None, [("a", '{"x": 1}'), ("b", "{}")]),
        (WEATHER, WEATHER, []),
        ('[{"name": "a", "arguments": {}}] and more', '[{"name": "a", "arguments": {}}] and more', [], ("", [("a", "{}")])),
        ('[{"name": "a", "arguments": {}},]', '[{"name": "a", "arguments": {}},]', [], ("", [("a", "{}")])),
        ('[{"name": "a", "arguments": {"x": ', '[{"name": "a", "arguments": {"x": ', [], ("", [("a", '{"x": ')])),
        (f"Plainly: [{WEATHER}]", f"Plainly: [{WEATHER}]", []),
        ("[]", "[]", []),
        ("[1, 2]", "[1, 2]", []),
        ("  <|tool", "  <|tool", []),
        ("", None, []),
    ],
    "phi4_mini_json": [
        (f"functools[{WEATHER}]", None, [("get_weather", CITY)]),
        ('functools [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": "],["}}]',
         None, [("a", "{}"), ("b", '{"x": "],["}')]),
        (f"[{WEATHER}]", f"[{WEATHER}]", []),   # its tag is not optional
        ("functools[", "functools[", []),
        ("Use functools.reduce", "Use functools.reduce", []),
        ("  function", "  function", []),
        ("", None, []),
    ],
    "mistral": [   # its tag is a special token, skipped from the text unless the request keeps those
        (f"[{WEATHER}]", None, [("get_weather", CITY)]),
        (f'[TOOL_CALLS] [{WEATHER}, {{"name": "say", "arguments": {TRICKY}}}]', None, [("get_weather", CITY), ("say", TRICKY)]),
        (f"Sure. [TOOL_CALLS][{WEATHER}]", f"Sure. [TOOL_CALLS][{WEATHER}]", []),
        ("[TOOL_CALLS][", "[TOOL_CALLS][", []),
        ("  [TOOL_CA", "  [TOOL_CA", []),
        ("", None, []),
        # v11 and later: name[ARGS]{...} for each call, after the content, each behind its tag
        (f"[TOOL_CALLS]get_weather[ARGS]{CITY}", None, [("get_weather", CITY)]),
        (f"\nget_weather[ARGS]{CITY}\n", None, [("get_weather", CITY)]),
        (f"get_weather[ARGS]{CITY}now[ARGS]{{}}", None, [("get_weather", CITY), ("now", "{}")]),
        (f"Let me look.[TOOL_CALLS]get_weather[ARGS]{CITY}[TOOL_CALLS]say[ARGS]{TRICKY}",
         "Let me look.", [("get_weather", CITY), ("say", TRICKY)]),
        ("Not [TOOL_CALLS] yet, [TOOL_CALLS]now[ARGS]{ } \n", "Not [TOOL_CALLS] yet, ", [("now", "{ }")]),
        (f"Use get_weather[ARGS]{CITY}", f"Use get_weather[ARGS]{CITY}", []),
        (f"[TOOL_CALLS]get_weather[ARGS]{CITY} and more", f"[TOOL_CALLS]get_weather[ARGS]{CITY} and more", [],
         ("", [("get_weather", CITY)])),
        (f"Sure.[TOOL_CALLS]get_weather[ARGS]{CITY[:8]}", f"Sure.[TOOL_CALLS]get_weather[ARGS]{CITY[:8]}", [],
         ("Sure.", [("get_weather", CITY[:8])])),
        ("[TOOL_CALLS]get_weather[ARGS]", "[TOOL_CALLS]get_weather[ARGS]", []),
        ("[TOOL_CALLS]a[ARGS][1]", "[TOOL_CALLS]a[ARGS][1]", []),
        ("Done. [TOOL_CALL", "Done. [TOOL_CALL", []),
        ("get_weather", "get_weather", []),
        # v13: name[CALL_ID]id[ARGS]{...}, the id the model's (test_mistral_v13_calls_keep_the_models_ids)
        (f"[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{CITY}", None, [("get_weather", CITY)]),
        (f"get_weather[CALL_ID]abc123XYZ[ARGS]{CITY}say[CALL_ID]Z9y8X7w6V[ARGS]{TRICKY}",
         None, [("get_weather", CITY), ("say", TRICKY)]),
        (f"Let me look.[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{CITY}[TOOL_CALLS]now[ARGS]{{}}",
         "Let me look.", [("get_weather", CITY), ("now", "{}")]),
        *[(refused, refused, []) for refused in (   # an id that is not 9 letters and digits
            f"[TOOL_CALLS]get_weather[CALL_ID]abc123[ARGS]{CITY}", f"[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ0[ARGS]{CITY}",
            f"get_weather[CALL_ID]abc_23XYZ[ARGS]{CITY}", f"get_weather[CALL_ID][ARGS]{CITY}",
        )],
        (f"Sure.[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{CITY[:8]}",
         f"Sure.[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{CITY[:8]}", [], ("Sure.", [("get_weather", CITY[:8])])),
        ("Sure.[TOOL_CALLS]get_weather[CALL_ID]abc12", "Sure.[TOOL_CALLS]get_weather[CALL_ID]abc12", []),
        ("get_weather[CALL_I", "get_weather[CALL_I", []),
    ],
    "qwen3_coder": [   # TOOLS type get_weather's parameters; other tools' values are read as JSON where they are JSON
        (QWEN_WEATHER, None, [("get_weather", QWEN_CITY)]),
        (f"Let me look.\n\n{QWEN_WEATHER}\n{qwen_call('now')}\n", "Let me look.\n\n", [("get_weather", QWEN_CITY), ("now", "{}")]),
        (f"\n{QWEN_WEATHER}{QWEN_WEATHER}", None, [("get_weather", QWEN_CITY)] * 2),
        (qwen_call("get_weather", city="12", days="-4", metric="false", at='{"lat": 45.4, "n": [1]}', scale="2.5", hours="[9, 17]"),
         None, [("get_weather", '{"city": "12", "days": -4, "metric": false, "at": {"lat": 45.4, "n": [1]}, "scale": 2.5, "hours": [9, 17]}')]),
        (qwen_call("get_weather", days="three", metric="yes", at="{oops}", scale="NaN", hours='{"a": 1}', note="null", any="[true]"),
         None, [("get_weather", '{"days": "three", "metric": "yes", "at": "{oops}", "scale": "NaN", "hours": "{\\"a\\": 1}", "note": null, "any": [true]}')]),
        (qwen_call("get_weather", city='"Verona"', note="7"), None, [("get_weather", '{"city": "\\"Verona\\"", "note": "7"}')]),
        (qwen_call("lookup", n="7", ok="true", s="plain words", q='"quoted"', o='{"k": null}'),
         None, [("lookup", '{"n": 7, "ok": true, "s": "plain words", "q": "quoted", "o": {"k": null}}')]),
        (qwen_call("write", path="a.py", code="def f():\n    return '</tool_call> <tool_call> </function>'\n\n"),
         None, [("write", '{"path": "a.py", "code": "def f():\\n    return \'</tool_call> <tool_call> </function>\'\\n\\n"}')]),
        ("<tool_call><function=say><parameter=text>日本</parameter></function></tool_call>", None, [("say", '{"text": "日本"}')]),
        (f"{QWEN_WEATHER}\nDone.", None, [("get_weather", QWEN_CITY)]),   # text after the blocks is not read
        ("<tool_call>\noops\n</tool_call>", "<tool_call>\noops\n</tool_call>", []),
        ("Sure. <tool_call>\n<function=get_weather\n>", "Sure. <tool_call>\n<function=get_weather\n>", []),
        (f"Sure. {QWEN_WEATHER[:30]}", f"Sure. {QWEN_WEATHER[:30]}", []),
        (f"Sure. {QWEN_WEATHER[:40]}", f"Sure. {QWEN_WEATHER[:40]}", [], ("Sure. ", [("get_weather", "")])),
        (QWEN_WEATHER[:-12], QWEN_WEATHER[:-12], [], ("", [("get_weather", QWEN_CITY[:-1])])),
        (QWEN_WEATHER.replace("</function>\n", ""), QWEN_WEATHER.replace("</function>\n", ""), [],
         ("", [("get_weather", QWEN_CITY[:-1])])),
        (qwen_call("a", x="1", y="2").replace("y>", "x>"), qwen_call("a", x="1", y="2").replace("y>", "x>"), [],
         ("", [("a", '{"x": 1')])),   # a parameter given twice
        (qwen_call("a", x="1").replace("<parameter", "<param"), qwen_call("a", x="1").replace("<parameter", "<param"), [],
         ("", [("a", "")])),
        (f"{QWEN_WEATHER}<tool_call>{{}}</tool_call>", f"{QWEN_WEATHER}<tool_call>{{}}</tool_call>", [],
         ("", [("get_weather", QWEN_CITY)])),
        ("Plain words, 1 < 2 <tool", "Plain words, 1 < 2 <tool", []),
        ("  \n", None, []),
        ("", None, []),
    ],
}
ALL = [(parser, *case) for parser, cases in CASES.items() for case in cases]


def feed(parser: str, pieces: list[str]) -> list[tuple[str, list]]:
    """What a stream gives for each piece of text, then for its end."""
    stream = make_parser(parser, TOOLS.get(parser)).stream()
    return [stream.add(p) for p in pieces] + [stream.finish()]


def assembled(deltas: list, parser: str = "") -> list[tuple[str, str]]:
    """Streamed call pieces put together, as a client would, checking each is in vLLM's shape:
    a call's first piece has the next index, an id (``mistral``'s: 9 letters and digits) and the
    name; later ones only arguments."""
    calls: list[list[str]] = []
    for d in deltas:
        if d.index == len(calls):
            assert (len(d.id) == 9 and d.id.isalnum()) if parser == "mistral" else d.id.startswith("call_")
            assert d.type == "function" and d.function.name
            calls.append([d.function.name, ""])
        else:
            assert d.index == len(calls) - 1 and d.id is d.type is d.function.name is None
        calls[d.index][1] += d.function.arguments
    return [tuple(c) for c in calls]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), [case[:4] for case in ALL])
def test_parse_reads_content_and_calls(parser, text, content, calls) -> None:
    got_content, got_calls = make_parser(parser, TOOLS.get(parser)).parse(text)
    assert got_content == content and [(c.function.name, c.function.arguments) for c in got_calls] == calls
    assert len({c.id for c in got_calls}) == len(got_calls)


@settings(max_examples=600, deadline=None)
@given(case=st.sampled_from(ALL), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_streamed_pieces_read_as_the_whole(case, cuts) -> None:
    parser, text, content, calls, *streamed = case
    content, calls = streamed[0] if streamed else (content or "", calls)
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    steps = feed(parser, [text[a:b] for a, b in zip(bounds, bounds[1:])])
    assert all(len({d.index for d in deltas}) == len(deltas) for _, deltas in steps)
    assert "".join(out for out, _ in steps) == content
    assert assembled([d for _, deltas in steps for d in deltas], parser) == calls


@pytest.mark.parametrize(("parser", "text"), [
    ("hermes", f'Saying. <tool_call>{{"name": "say", "arguments": {TRICKY}}}</tool_call>'),
    ("llama3_json", f'<|python_tag|>{{"name": "now", "parameters": {{}}}}; {{"name": "now", "parameters": {{}}}}\n{{"name": "say", "arguments": {TRICKY}}}'),
    ("granite", f'<tool_call>[{{"name": "now", "arguments": {{}}}}, {{"name": "say", "arguments": {TRICKY}}}]'),
    ("phi4_mini_json", f'functools[{{"name": "say", "arguments": {TRICKY}}}]'),
    ("mistral", f'[TOOL_CALLS][{{"name": "say", "arguments": {TRICKY}}}]'),
    ("mistral", f"Calling.[TOOL_CALLS]now[ARGS]{{}}[TOOL_CALLS]say[ARGS]{TRICKY}"),
    ("mistral", f"now[ARGS]{{}}say[ARGS]{TRICKY}"),
    ("mistral", f"Calling.[TOOL_CALLS]now[CALL_ID]abc123XYZ[ARGS]{{}}[TOOL_CALLS]say[CALL_ID]Z9y8X7w6V[ARGS]{TRICKY}"),
])
def test_arguments_stream_as_the_model_writes_them(parser, text) -> None:
    """Written a character at a time, a call is named once its arguments open (Mistral v11 and v13:
    once ``[ARGS]{`` has come), and each of their characters goes out as it comes, strings holding
    braces and tags included."""
    steps = feed(parser, list(text))
    deltas = [(at, d) for at, (_, ds) in enumerate(steps) for d in ds]
    said = [(at, d) for at, d in deltas if d.index == deltas[-1][1].index]   # the last call's: say's
    first_at, first = said[0]
    assert first.function.name == "say" and text[: first_at + 1].endswith(('"arguments": {', "say[ARGS]{",
                                                                          "say[CALL_ID]Z9y8X7w6V[ARGS]{"))
    assert [d.function.arguments for _, d in said] == list(TRICKY)
    assert [at for at, _ in said] == list(range(first_at, first_at + len(TRICKY)))


def test_a_call_with_its_arguments_first_comes_whole() -> None:
    """A block with its arguments before its name cannot stream: it is held, and its call goes
    out in one piece at ``</tool_call>``."""
    text = '<tool_call>{"arguments": {"city": "Verona"}, "name": "get_weather"}</tool_call>'
    steps = feed("hermes", list(text))
    assert [at for at, (_, deltas) in enumerate(steps) if deltas] == [len(text) - 1]
    assert assembled(steps[len(text) - 1][1]) == [("get_weather", CITY)]


def test_a_streamed_call_that_turns_out_bad_stays_sent() -> None:
    """Cut before its end, a block that streamed and then is not JSON keeps its pieces, and is not
    content too; read whole, it is content."""
    text = 'Calling. <tool_call>{"name": "a", "arguments": {"x": 1}, oops}</tool_call> Done.'
    cut = text.index('"x"')
    steps = feed("hermes", [text[:cut], text[cut:]])
    assert "".join(out for out, _ in steps) == "Calling.  Done."
    assert assembled([d for _, deltas in steps for d in deltas]) == [("a", '{"x": 1}')]
    assert feed("hermes", [text]) == [(text, []), ("", [])]
    assert make_parser("hermes").parse(text) == (text, [])


def test_pythonic_calls_go_out_whole_at_the_end() -> None:
    """A pythonic answer is held to its end, then each call goes out in one piece."""
    text = '[get_weather(city="Verona"), clock()]'
    steps = feed("pythonic", list(text))
    assert all(step == ("", []) for step in steps[:-1])
    assert [(d.index, d.function.name, d.function.arguments) for d in steps[-1][1]] == [
        (0, "get_weather", '{"city": "Verona"}'), (1, "clock", "{}")]


def test_qwen3_coder_arguments_grow_a_parameter_at_a_time() -> None:
    """Written a character at a time, content goes out as it comes, a Qwen3-Coder call is named
    once ``<function=NAME>`` has come, and its arguments grow by each parameter once its
    ``</parameter>`` has come, closing at ``</tool_call>``."""
    text = f"Let me look.{QWEN_WEATHER}"
    steps = feed("qwen3_coder", list(text))
    assert [out for out, _ in steps[:12]] == list("Let me look.")
    pieces = [(at + 1, d.function.name, d.function.arguments) for at, (_, deltas) in enumerate(steps) for d in deltas]
    ends = [m.end() for m in re.finditer("<function=get_weather>|</parameter>|</tool_call>", text)]
    assert pieces == [(ends[0], "get_weather", ""), (ends[1], None, '{"city": "Verona"'), (ends[2], None, ', "days": 3'),
                      (ends[3], None, "}")]


def test_qwen3_coder_types_values_by_the_requests_tools() -> None:
    """A value is typed by its parameter's schema in the request's tools; without them, read as
    JSON where it is JSON."""
    text = qwen_call("get_weather", city="12", days="3")
    typed = make_parser("qwen3_coder", TOOLS["qwen3_coder"]).parse(text)[1]
    untyped = make_parser("qwen3_coder").parse(text)[1]
    assert [c.function.arguments for c in typed + untyped] == ['{"city": "12", "days": 3}', '{"city": 12, "days": 3}']


def test_mistral_call_ids_are_nine_letters_and_digits_parsed_or_streamed() -> None:
    """Mistral's chat templates refuse a call id that is not 9 letters and digits when the
    conversation comes back with the call in it: in either form."""
    for text in (f"[TOOL_CALLS][{WEATHER}, {WEATHER}]", f"[TOOL_CALLS]get_weather[ARGS]{CITY}[TOOL_CALLS]get_weather[ARGS]{CITY}"):
        _, calls = make_parser("mistral").parse(text)
        streamed = [d.id for _, deltas in feed("mistral", [text[:40], text[40:]]) for d in deltas if d.id]
        for ids in ([c.id for c in calls], streamed):
            assert len(ids) == 2 and len(set(ids)) == 2
            assert all(len(i) == 9 and i.isalnum() and i.isascii() for i in ids)


def test_mistral_v13_calls_keep_the_models_ids() -> None:
    """A v13 call's id is the one the model wrote after ``[CALL_ID]``, read whole or streamed in two
    pieces cut at each character; streamed, the call's first piece carries it, and goes out as
    soon as ``[ARGS]{`` has come. A v11 call beside it gets a fresh id."""
    text = f"Sure.[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{CITY}[TOOL_CALLS]now[ARGS]{{}}"
    content, calls = make_parser("mistral").parse(text)
    assert content == "Sure." and calls[0].id == "abc123XYZ" and calls[1].id != "abc123XYZ"
    for cut in range(len(text) + 1):
        steps = feed("mistral", [text[:cut], text[cut:]])
        firsts = [d for _, deltas in steps for d in deltas if d.id]
        assert [(d.index, d.function.name) for d in firsts] == [(0, "get_weather"), (1, "now")], cut
        assert firsts[0].id == "abc123XYZ" and firsts[1].id != "abc123XYZ", cut
    steps = feed("mistral", list(text))
    named = [at for at, (_, deltas) in enumerate(steps) for d in deltas if d.id == "abc123XYZ"]
    assert named == [text.index("[ARGS]{") + len("[ARGS]{") - 1]
    assert "".join(out for out, _ in steps) == "Sure."


def test_parsers_give_ids_in_their_familys_form() -> None:
    """``new_id``: Mistral's 9 letters and digits, ``call_`` and hex digits for the others."""
    for parser in PARSERS:
        ids = {make_parser(parser).new_id() for _ in range(20)}
        assert len(ids) == 20
        if parser == "mistral":
            assert all(len(i) == 9 and i.isalnum() and i.isascii() for i in ids)
        else:
            assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)


def test_each_parser_names_the_markers_it_reads() -> None:
    """What the gateway keeps in the text it hands a parser, where the tokenizer makes a marker a
    special token (Mistral's are, in its tokenizers)."""
    assert {name: make_parser(name).markers for name in PARSERS} == {
        "hermes": ("<tool_call>", "</tool_call>"), "llama3_json": ("<|python_tag|>",),
        "pythonic": ("<|python_start|>", "<|python_end|>"), "granite": ("<|tool_call|>", "<tool_call>"),
        "phi4_mini_json": ("functools",), "mistral": ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
        "qwen3_coder": ("<tool_call>", "</tool_call>"),
    }


def test_unknown_parser() -> None:
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        make_parser("xml")
